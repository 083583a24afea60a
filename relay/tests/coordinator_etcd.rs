//! The coordinator conformance suite against a real etcd server (Debian's
//! etcd-server 3.4), started once for this test binary; each test works under
//! its own key prefix. Each member connects through a TCP proxy the test can
//! stall, to partition one member from etcd while the others go on.
//!
//! etcd must be installed (`bash e2e/install-deps`); without it these tests
//! fail, they never skip.

#[path = "common/etcd.rs"]
mod etcd_server;
#[path = "common/stall_proxy.rs"]
mod stall_proxy;
#[path = "coordinator_suite.rs"]
mod suite;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use postern::cluster::etcd::{Etcd, EtcdOptions};
use postern::cluster::{Coordinator, LeaseOptions, Membership};
use stall_proxy::Proxy;
use suite::{member, Backend, Node};

/// etcd's shortest lease (1.5 × its election timeout, rounded up).
const TTL: Duration = Duration::from_secs(2);

struct EtcdBackend {
    upstream: SocketAddr,
    prefix: String,
}

impl EtcdBackend {
    fn new(url: &str) -> EtcdBackend {
        let upstream = url.trim_start_matches("http://").parse().unwrap();
        EtcdBackend {
            upstream,
            prefix: format!("/postern-test/{:016x}/", rand::random::<u64>()),
        }
    }

    fn shared() -> EtcdBackend {
        EtcdBackend::new(etcd_server::shared())
    }
}

impl Backend for EtcdBackend {
    fn options(&self) -> LeaseOptions {
        LeaseOptions::new(TTL)
    }

    fn expiry_slack(&self) -> Duration {
        // etcd looks for expired leases every 500 ms; allow for a busy machine.
        Duration::from_secs(3)
    }

    async fn node(&self) -> Node {
        let proxy = Proxy::start(self.upstream).await;
        let mut options = EtcdOptions::new(vec![format!("http://{}", proxy.addr)], &self.prefix);
        options.request_timeout = Duration::from_secs(2);
        options.connect_timeout = Duration::from_secs(2);
        let etcd = Etcd::connect(options).await.unwrap();
        let cut = proxy.cut;
        Node {
            coordinator: Arc::new(etcd),
            cut: Box::new(move |on| {
                cut.send_replace(on);
            }),
        }
    }
}

macro_rules! conformance {
    ($($property:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $property() {
                suite::$property(&EtcdBackend::shared()).await;
            }
        )*
    };
}

conformance!(
    racing_claims_have_one_winner,
    claims_are_idempotent_and_tokens_grow,
    stale_token_is_fenced,
    lease_expiry_is_seen_by_watchers,
    release_frees_the_claim_at_once,
    unrenewable_lease_is_unsafe_before_expiry,
    snapshot_commit_load_retire,
    batched_commits_are_one_revision_and_fenced_whole,
    watch_resumes_after_a_revision,
);

/// etcd itself stops (SIGSTOP): the relay is unsafe within TTL − margin of
/// its last renewal, and safe again once etcd runs (SIGCONT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_is_unsafe_while_etcd_is_stopped_and_recovers() {
    let server = etcd_server::EtcdServer::start();
    let options = LeaseOptions::new(TTL);
    let mut etcd_options = EtcdOptions::new(vec![server.client_url.clone()], "/stop-test/");
    etcd_options.request_timeout = Duration::from_secs(1);
    let etcd = Etcd::connect(etcd_options).await.unwrap();
    let relay = Membership::join(Arc::new(etcd), member("a"), "", options)
        .await
        .unwrap();
    let mut safety = relay.safety();

    let stopped_at = tokio::time::Instant::now();
    server.signal(libc::SIGSTOP);
    tokio::time::timeout(TTL, safety.wait_unsafe())
        .await
        .expect("still safe a TTL after etcd stopped");
    let unsafe_after = stopped_at.elapsed();
    server.signal(libc::SIGCONT);
    // Half the margin is left for a busy scheduler.
    assert!(
        unsafe_after <= options.ttl - options.margin / 2,
        "unsafe only {unsafe_after:?} after etcd stopped"
    );
    tokio::time::timeout(Duration::from_secs(30), safety.wait_safe())
        .await
        .expect("not safe again after etcd resumed");
    let snapshot = relay.coordinator().snapshot().await.unwrap();
    assert_eq!(snapshot.members[0].id, member("a"));
}

/// A missing etcd names the install script instead of skipping.
#[test]
fn missing_binary_message_names_install_deps() {
    assert!(include_str!("common/etcd.rs").contains("e2e/install-deps"));
}

/// Unreachable etcd: requests fail as Unavailable within the timeout.
#[tokio::test]
async fn unreachable_etcd_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut options = EtcdOptions::new(vec![format!("http://127.0.0.1:{port}")], "/x/");
    options.request_timeout = Duration::from_millis(500);
    options.connect_timeout = Duration::from_millis(500);
    match Etcd::connect(options).await {
        Err(postern::cluster::Error::Unavailable(_)) => {}
        Ok(etcd) => match etcd.snapshot().await {
            Err(postern::cluster::Error::Unavailable(_)) => {}
            other => panic!("expected Unavailable, got {other:?}"),
        },
        Err(other) => panic!("expected Unavailable, got {other:?}"),
    }
}
