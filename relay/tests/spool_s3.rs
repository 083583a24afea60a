//! The spool against a real S3 server: moto, started and killed by the test.
//!
//! moto_server must be installed (`python3 -m pip install 'moto[server]'`);
//! without it these tests fail, they never skip.

#[path = "spool_suite.rs"]
mod suite;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::ObjectStore;
use postern::config::{Config, CopyKind, ObjectStoreConfig};
use postern::spool::{Spool, SpoolError};
use suite::{files, message, receive};

const BUCKET: &str = "postern-test";

/// A moto_server process on 127.0.0.1, killed on drop.
struct Moto {
    child: Option<Child>,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        Moto::start_on(port)
    }

    fn start_on(port: u16) -> Moto {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| {
                panic!(
                    "cannot start moto_server ({err}); these tests need a real S3 server: \
                     python3 -m pip install 'moto[server]'"
                )
            });
        let mut moto = Moto {
            child: Some(child),
            port,
        };
        moto.wait_ready();
        moto.create_bucket(BUCKET);
        moto
    }

    /// Polls until the server answers HTTP, failing if it exits or takes too long.
    fn wait_ready(&mut self) {
        let give_up = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("moto_server exited during start-up: {status}");
            }
            if self.request("GET", "/").is_some() {
                return;
            }
            assert!(
                Instant::now() < give_up,
                "moto_server did not answer within 60 s"
            );
            // Polling a readiness condition, not waiting for an event we could observe.
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends a bodiless request and returns the status code.
    fn request(&self, method: &str, path: &str) -> Option<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        response.split_whitespace().nth(1)?.parse().ok()
    }

    fn create_bucket(&self, bucket: &str) {
        let status = self.request("PUT", &format!("/{bucket}"));
        assert_eq!(status, Some(200), "creating bucket {bucket} in moto");
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

fn config(root: &std::path::Path, moto: &Moto, required: usize, deadline: Duration) -> Config {
    let mut config = Config {
        data_dir: root.to_owned(),
        object_store: ObjectStoreConfig::S3 {
            bucket: BUCKET.into(),
            prefix: "relay-a".into(),
            endpoint: Some(moto.endpoint()),
            region: "us-east-1".into(),
            access_key_id: Some("testing".into()),
            secret_access_key: Some("testing".into()),
            allow_http: true,
        },
        ..Config::default()
    };
    config.spool.copies = vec![CopyKind::Local, CopyKind::ObjectStore];
    config.spool.required = required;
    config.spool.deadline = deadline;
    config.spool.reserve_bytes = 0;
    config
}

/// Every key under the spool's prefix.
async fn keys(spool: &Spool) -> Vec<String> {
    let store = spool.object_copy().unwrap().store();
    let prefix = object_store::path::Path::from("relay-a");
    let listed: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    let mut keys: Vec<String> = listed.into_iter().map(|m| m.location.to_string()).collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_copy_conformance_s3() {
    let moto = Moto::start();
    let root = tempfile::tempdir().unwrap();
    suite::object_copy_conformance(&config(root.path(), &moto, 2, Duration::from_secs(10))).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_local_data_is_repaired_from_s3() {
    let moto = Moto::start();
    let root = tempfile::tempdir().unwrap();
    let config = config(root.path(), &moto, 2, Duration::from_secs(10));
    suite::damaged_local_data_is_repaired_from_the_object_copy(&config).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_of_local_and_s3_has_both_copies_with_equal_bytes() {
    let moto = Moto::start();
    let root = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&config(root.path(), &moto, 2, Duration::from_secs(10)))
        .await
        .unwrap();
    let data = message(200_000);
    let committed = receive(&spool, &data, 1000).await.unwrap();
    let id = committed.id.clone();
    let mut confirmed = committed.confirmed.clone();
    confirmed.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(confirmed, vec![CopyKind::Local, CopyKind::ObjectStore]);

    let copy = spool.object_copy().unwrap();
    let (env, eml) = copy.read(&id).await.unwrap().expect("an object copy");
    let (local_data, local_json) = suite::sealed(&spool.message_path(&id));
    assert_eq!(&eml[..], &local_data[..]);
    assert_eq!(&eml[..], &data[..]);
    assert_eq!(&env[..], &local_json[..]);
    let keys = keys(&spool).await;
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(
        keys[0].starts_with("relay-a/segments/") && keys[0].ends_with(".seg"),
        "{keys:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_down_a_quorum_of_two_fails_in_time_and_leaves_no_committed_copy() {
    let mut moto = Moto::start();
    let port = moto.port;
    let root = tempfile::tempdir().unwrap();
    let deadline = Duration::from_secs(2);
    let (spool, _) = Spool::open(&config(root.path(), &moto, 2, deadline))
        .await
        .unwrap();
    moto.kill();

    let started = Instant::now();
    let err = receive(&spool, &message(50_000), 1000).await.unwrap_err();
    let took = started.elapsed();
    match err {
        SpoolError::QuorumFailed {
            confirmed,
            required,
            ref detail,
        } => {
            assert_eq!(required, 2);
            assert!(confirmed <= 1, "{err}");
            assert!(!detail.is_empty());
        }
        other => panic!("expected QuorumFailed, got {other}"),
    }
    assert!(
        took <= deadline + Duration::from_millis(500),
        "took {took:?}"
    );
    assert!(files(spool.dir()).is_empty(), "{:?}", files(spool.dir()));
    assert!(spool.committed().await.unwrap().is_empty());

    // S3 comes back while the object copy may still be retrying: whatever it
    // manages to write must be taken back.
    let _moto = Moto::start_on(port);
    spool.drain().await;
    let left = keys(&spool).await;
    assert!(!left.iter().any(|k| k.ends_with(".seg")), "{left:?}");
    assert!(files(spool.dir()).is_empty(), "{:?}", files(spool.dir()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_down_a_quorum_of_one_commits_locally() {
    let mut moto = Moto::start();
    let root = tempfile::tempdir().unwrap();
    let (spool, _) = Spool::open(&config(root.path(), &moto, 1, Duration::from_secs(2)))
        .await
        .unwrap();
    moto.kill();
    let data = message(30_000);
    let committed = receive(&spool, &data, 1000).await.unwrap();
    assert_eq!(committed.confirmed, vec![CopyKind::Local]);
    assert!(suite::sealed(&spool.message_path(&committed.id)).0 == data);
    // The object copy fails in the background; the local copy is untouched.
    spool.drain().await;
    assert_eq!(spool.committed().await.unwrap().len(), 1);
    assert!(suite::sealed(&spool.message_path(&committed.id)).0 == data);
}
