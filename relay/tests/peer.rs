//! Peer replication over real gRPC on loopback: replicas are durable and
//! exact, refused without the secret, leave nothing when cut or corrupt;
//! list, fetch and remove see replicas and the origin's own spool; PeerCopy
//! fails over and spreads replicas; a spool with `"peer"` copies commits to
//! a peer.

#[path = "common/pki.rs"]
mod pki;
#[path = "spool_suite.rs"]
mod suite;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use postern::config::{ClusterConfig, Config, CopyKind, MutualTlsFiles};
use postern::peer::proto::peer_client::PeerClient as RawClient;
use postern::peer::proto::{self, replicate_chunk};
use postern::peer::tls::MutualTls;
use postern::peer::{routes, serve, PeerClient, PeerCopy, PeerError, PeerService, Peers};
use postern::peer::{ReplicaStore, CHUNK};
use postern::spool::quorum::{CopyError, CopyJob, CopyTarget};
use postern::spool::Spool;
use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

const SECRET: &str = "test-secret-0123456789";

/// A peer service on 127.0.0.1:0 over `data_dir`; stops when dropped.
struct Server {
    addr: SocketAddr,
    replicas: PathBuf,
    _stop: oneshot::Sender<()>,
}

async fn start(data_dir: &Path, spool: Option<Spool>) -> Server {
    start_with(data_dir, spool, None).await
}

async fn start_with(
    data_dir: &Path,
    spool: Option<Spool>,
    admin: Option<postern::admin::queue_service::QueueService>,
) -> Server {
    start_serving(data_dir, spool, admin, None).await
}

async fn start_serving(
    data_dir: &Path,
    spool: Option<Spool>,
    admin: Option<postern::admin::queue_service::QueueService>,
    tls: Option<Arc<MutualTls>>,
) -> Server {
    let store = Arc::new(ReplicaStore::open(data_dir).unwrap());
    let replicas = store.root().to_owned();
    let service = PeerService::new(store, spool);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(serve(
        listener,
        routes(service, admin, SECRET),
        tls,
        async {
            let _ = stopped.await;
        },
    ));
    Server {
        addr,
        replicas,
        _stop: stop,
    }
}

fn client() -> PeerClient {
    PeerClient::new(SECRET, Duration::from_secs(10), None).unwrap()
}

/// A client presenting the certificate of `files` over mutual TLS.
fn tls_client(files: &MutualTlsFiles) -> PeerClient {
    let tls = MutualTls::load(files).unwrap();
    PeerClient::new(SECRET, Duration::from_secs(10), Some(tls)).unwrap()
}

/// A job of `spool` for `data`, staged in `dir`, its envelope recording
/// length and digest as the spool does.
fn job(dir: &Path, spool: &str, data: &[u8]) -> Arc<CopyJob> {
    let id = postern::spool::id::IdGenerator::new().next_id();
    let data_path = dir.join(format!("{id}.part"));
    std::fs::write(&data_path, data).unwrap();
    let mut envelope = suite::envelope();
    envelope.id = id.clone();
    envelope.spool = spool.into();
    envelope.data_len = data.len() as u64;
    envelope.data_sha256 = hex::encode(Sha256::digest(data));
    Arc::new(CopyJob {
        spool: spool.into(),
        id,
        data_file: Arc::new(std::fs::File::open(&data_path).unwrap()),
        data_path,
        data_len: data.len() as u64,
        envelope_json: Bytes::from(serde_json::to_vec(&envelope).unwrap()),
    })
}

/// The data and the envelope JSON of the sealed message `id` in `dir`.
fn sealed(dir: &Path, id: &str) -> (Vec<u8>, Vec<u8>) {
    use postern::spool::message_file::{path, read_sealed};
    read_sealed(&path(dir, id)).unwrap()
}

/// Every file under `dir`, relative, sorted.
fn tree(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                out.push(path.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// Waits (up to 10 s) until `check` holds.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn raw(addr: SocketAddr) -> RawClient<tonic::transport::Channel> {
    RawClient::connect(format!("http://{addr}")).await.unwrap()
}

fn bearer<T>(mut request: tonic::Request<T>, secret: &str) -> tonic::Request<T> {
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    request
}

fn header_chunk(job: &CopyJob, data_sha256: String) -> proto::ReplicateChunk {
    proto::ReplicateChunk {
        part: Some(replicate_chunk::Part::Header(proto::ReplicaHeader {
            spool: job.spool.clone(),
            id: job.id.clone(),
            envelope_json: job.envelope_json.to_vec(),
            data_len: job.data_len,
            data_sha256,
        })),
    }
}

fn data_chunk(data: &[u8]) -> proto::ReplicateChunk {
    proto::ReplicateChunk {
        part: Some(replicate_chunk::Part::Data(data.to_vec())),
    }
}

fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn a_replica_is_byte_equal_and_committed_and_retries_are_idempotent() {
    let peer = tempfile::tempdir().unwrap();
    let server = start(peer.path(), None).await;
    let staging = tempfile::tempdir().unwrap();
    let data = suite::message(200_000);
    let job = job(staging.path(), "s1", &data);
    let client = client();

    client.replicate(server.addr, &job).await.unwrap();
    let dir = server.replicas.join("s1");
    let (stored, envelope) = sealed(&dir, &job.id);
    assert_eq!(stored, data);
    assert_eq!(envelope, job.envelope_json);
    assert_eq!(tree(&server.replicas), vec![format!("s1/{}.msg", job.id)]);

    // The same replica again (a retry after a lost answer) is confirmed.
    client.replicate(server.addr, &job).await.unwrap();
    // The same id with another envelope is refused, and the first one kept.
    let mut other = suite::envelope();
    other.id = job.id.clone();
    other.spool = "s1".into();
    let conflicting = CopyJob {
        spool: job.spool.clone(),
        id: job.id.clone(),
        data_path: job.data_path.clone(),
        data_file: Arc::clone(&job.data_file),
        data_len: job.data_len,
        envelope_json: Bytes::from(serde_json::to_vec(&other).unwrap()),
    };
    let err = client
        .replicate(server.addr, &conflicting)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::AlreadyExists), "{err}");
    assert_eq!(sealed(&dir, &job.id).1, job.envelope_json);
}

#[tokio::test]
async fn without_the_secret_nothing_is_written() {
    let peer = tempfile::tempdir().unwrap();
    let server = start(peer.path(), None).await;
    let staging = tempfile::tempdir().unwrap();
    let job = job(staging.path(), "s1", &suite::message(1000));

    let wrong = PeerClient::new("not-the-secret-at-all", Duration::from_secs(10), None).unwrap();
    let err = wrong.replicate(server.addr, &job).await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err}");
    let err = wrong.list(server.addr, "s1").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::Unauthenticated), "{err}");

    // No authorization at all.
    let mut raw = raw(server.addr).await;
    let sha = hex::encode(Sha256::digest(suite::message(1000)));
    let stream = futures::stream::iter(vec![
        header_chunk(&job, sha),
        data_chunk(&suite::message(1000)),
    ]);
    let status = raw.replicate(stream).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let status = raw
        .drop_spool(proto::DropSpoolRequest { spool: "s1".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);

    assert!(
        tree(&server.replicas).is_empty(),
        "{:?}",
        tree(&server.replicas)
    );
    // The right secret works on the same server.
    client().replicate(server.addr, &job).await.unwrap();
    assert_eq!(tree(&server.replicas).len(), 1);
}

#[tokio::test]
async fn a_cut_stream_leaves_no_partial_replica() {
    let peer = tempfile::tempdir().unwrap();
    let server = start(peer.path(), None).await;
    let staging = tempfile::tempdir().unwrap();
    let data = suite::message(10 * CHUNK);
    let job = job(staging.path(), "s1", &data);
    let sha = hex::encode(Sha256::digest(&data));

    // Three chunks, then the sender stalls and its call is dropped.
    let mut raw = raw(server.addr).await;
    let chunks: Vec<_> = std::iter::once(header_chunk(&job, sha.clone()))
        .chain(data.chunks(CHUNK).take(3).map(data_chunk))
        .collect();
    let stream =
        futures::StreamExt::chain(futures::stream::iter(chunks), futures::stream::pending());
    let call = tokio::spawn(async move {
        raw.replicate(bearer(tonic::Request::new(stream), SECRET))
            .await
    });
    let part = server.replicas.join("s1").join(format!("{}.part", job.id));
    eventually("the partial replica is being written", || {
        std::fs::metadata(&part).is_ok_and(|m| m.len() > 0)
    })
    .await;
    call.abort();
    let dir = server.replicas.join("s1");
    eventually("the partial replica is removed", || tree(&dir).is_empty()).await;

    // A stream that ends early is refused as well.
    let mut raw2 = self::raw(server.addr).await;
    let short: Vec<_> = std::iter::once(header_chunk(&job, sha))
        .chain(data.chunks(CHUNK).take(2).map(data_chunk))
        .collect();
    let status = raw2
        .replicate(bearer(
            tonic::Request::new(futures::stream::iter(short)),
            SECRET,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(tree(&dir).is_empty(), "{:?}", tree(&dir));

    // And the message can be replicated whole afterwards.
    client().replicate(server.addr, &job).await.unwrap();
    assert_eq!(sealed(&dir, &job.id).0, data);
}

#[tokio::test]
async fn corrupt_or_oversized_data_is_refused() {
    let peer = tempfile::tempdir().unwrap();
    let server = start(peer.path(), None).await;
    let staging = tempfile::tempdir().unwrap();
    let data = suite::message(3 * CHUNK + 10);
    let job = job(staging.path(), "s1", &data);
    let dir = server.replicas.join("s1");

    // The announced digest is not that of the data.
    let mut corrupt = data.clone();
    corrupt[CHUNK + 1] ^= 0x20;
    let chunks: Vec<_> = std::iter::once(header_chunk(&job, hex::encode(Sha256::digest(&data))))
        .chain(corrupt.chunks(CHUNK).map(data_chunk))
        .collect();
    let status = raw(server.addr)
        .await
        .replicate(bearer(
            tonic::Request::new(futures::stream::iter(chunks)),
            SECRET,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(tree(&dir).is_empty(), "{:?}", tree(&dir));

    // More data than announced.
    let chunks: Vec<_> = std::iter::once(header_chunk(&job, hex::encode(Sha256::digest(&data))))
        .chain(data.chunks(CHUNK).map(data_chunk))
        .chain(std::iter::once(data_chunk(b"extra")))
        .collect();
    let status = raw(server.addr)
        .await
        .replicate(bearer(
            tonic::Request::new(futures::stream::iter(chunks)),
            SECRET,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(tree(&dir).is_empty(), "{:?}", tree(&dir));

    // A name that would leave the replica directory.
    let mut escaping = header_chunk(&job, hex::encode(Sha256::digest(&data)));
    if let Some(replicate_chunk::Part::Header(h)) = &mut escaping.part {
        h.spool = "..".into();
    }
    let status = raw(server.addr)
        .await
        .replicate(bearer(
            tonic::Request::new(futures::stream::iter(vec![escaping])),
            SECRET,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(tree(&server.replicas).is_empty());
    assert_eq!(tree(peer.path()), Vec::<String>::new());
}

/// A spool on `root` with only the local copy, accepting into spool "s1".
async fn local_spool(root: &Path) -> Spool {
    let mut config = Config {
        data_dir: root.to_owned(),
        ..Config::default()
    };
    config.spool.copies = vec![CopyKind::Local];
    config.spool.required = 1;
    config.spool.reserve_bytes = 0;
    let (spool, _) = Spool::open(&config).await.unwrap();
    spool
}

#[tokio::test]
async fn list_fetch_and_remove_see_replicas_and_the_origins_own_spool() {
    let origin = tempfile::tempdir().unwrap();
    let spool = local_spool(origin.path()).await;
    spool.rotate("s1".into()).await;
    let own = suite::message(150_000);
    let own_id = suite::receive(&spool, &own, 4096).await.unwrap().id;
    spool.rotate("s2".into()).await;
    let elsewhere_id = suite::receive(&spool, &suite::message(500), 4096)
        .await
        .unwrap()
        .id;
    let server = start(origin.path(), Some(spool.clone())).await;
    let client = client();

    // A replica of another relay's message of s1 is held here as well.
    let staging = tempfile::tempdir().unwrap();
    let replicated = suite::message(70_000);
    let job = job(staging.path(), "s1", &replicated);
    client.replicate(server.addr, &job).await.unwrap();

    let mut expected = vec![own_id.clone(), job.id.clone()];
    expected.sort();
    assert_eq!(client.list(server.addr, "s1").await.unwrap(), expected);
    assert_eq!(
        client.list(server.addr, "s2").await.unwrap(),
        vec![elsewhere_id.clone()]
    );
    assert!(client.list(server.addr, "s3").await.unwrap().is_empty());

    // Fetch writes exact, committed copies into the destination.
    let taker = tempfile::tempdir().unwrap();
    let dest = taker.path().join("replicas").join("s1");
    let (eml, envelope) = client
        .fetch(server.addr, "s1", &own_id, &dest)
        .await
        .unwrap();
    assert_eq!(eml, dest.join(format!("{own_id}.msg")));
    assert_eq!(sealed(&dest, &own_id).0, own);
    assert_eq!(envelope, sealed(spool.message_dir(&own_id), &own_id).1);
    assert_eq!(sealed(&dest, &own_id).1, envelope);
    let (eml, envelope) = client
        .fetch(server.addr, "s1", &job.id, &dest)
        .await
        .unwrap();
    assert_eq!(eml, dest.join(format!("{}.msg", job.id)));
    assert_eq!(sealed(&dest, &job.id).0, replicated);
    assert_eq!(envelope, job.envelope_json);
    // A message of another spool is not served as one of s1.
    let err = client
        .fetch(server.addr, "s1", &elsewhere_id, &dest)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");
    assert_eq!(tree(&dest).len(), 2);

    // Remove: the replica and the local files of s1's message go; the
    // message of s2 stays; absent is fine.
    client.remove(server.addr, "s1", &own_id).await.unwrap();
    client.remove(server.addr, "s1", &job.id).await.unwrap();
    client.remove(server.addr, "s1", &job.id).await.unwrap();
    client
        .remove(server.addr, "s1", &elsewhere_id)
        .await
        .unwrap();
    assert!(!spool.message_path(&own_id).exists());
    assert!(spool.message_path(&elsewhere_id).exists());
    assert!(tree(&server.replicas).is_empty());
    assert!(client.list(server.addr, "s1").await.unwrap().is_empty());
    let err = client
        .fetch(server.addr, "s1", &own_id, &dest)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");

    // Dropping a spool removes its replica directory.
    client.replicate(server.addr, &job).await.unwrap();
    client.drop_spool(server.addr, "s1").await.unwrap();
    assert!(!server.replicas.join("s1").exists());
}

#[tokio::test]
async fn a_large_message_streams_through_and_back() {
    let peer = tempfile::tempdir().unwrap();
    let server = start(peer.path(), None).await;
    let staging = tempfile::tempdir().unwrap();
    let data = suite::message(20 * 1024 * 1024);
    let job = job(staging.path(), "s1", &data);
    let client = client();
    client.replicate(server.addr, &job).await.unwrap();
    let stored = sealed(&server.replicas.join("s1"), &job.id).0;
    assert_eq!(Sha256::digest(&stored), Sha256::digest(&data));
    let back = tempfile::tempdir().unwrap();
    client
        .fetch(server.addr, "s1", &job.id, back.path())
        .await
        .unwrap();
    assert!(sealed(back.path(), &job.id).0 == data);
}

#[tokio::test]
async fn peer_copies_fail_over_spread_and_remove_everywhere() {
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (
        start(a_dir.path(), None).await,
        start(b_dir.path(), None).await,
    );
    let client = Arc::new(client());
    let staging = tempfile::tempdir().unwrap();
    let held = |server: &Server, job: &CopyJob| {
        server
            .replicas
            .join(&job.spool)
            .join(format!("{}.msg", job.id))
            .exists()
    };

    // One live peer behind a closed port: replica 0 and replica 1 start at
    // different addresses, so one of them meets the closed port first.
    let closed = closed_port();
    let peers = Peers::new(vec![closed.to_string(), a.addr.to_string()], Vec::new());
    let job1 = job(staging.path(), "s1", &suite::message(5000));
    for index in 0..2 {
        let target = PeerCopy::new(
            index,
            Arc::new(peers.clone()),
            Arc::clone(&client),
            Arc::default(),
        );
        Arc::new(target).write(Arc::clone(&job1)).await.unwrap();
        assert!(held(&a, &job1));
    }

    // Two replicas over two live peers land on both.
    let group = PeerCopy::group(
        2,
        Peers::new(vec![a.addr.to_string(), b.addr.to_string()], Vec::new()),
        Arc::clone(&client),
    );
    let job2 = job(staging.path(), "s1", &suite::message(5000));
    let writes = group.iter().map(|t| Arc::clone(t).write(Arc::clone(&job2)));
    for result in futures::future::join_all(writes).await {
        result.unwrap();
    }
    assert!(held(&a, &job2) && held(&b, &job2));
    // Remove reaches every peer.
    Arc::clone(&group[0])
        .remove("s1".into(), job2.id.clone())
        .await
        .unwrap();
    assert!(!held(&a, &job2) && !held(&b, &job2));

    // Two replicas, one live peer: the second cannot be placed.
    let group = PeerCopy::group(2, peers.clone(), Arc::clone(&client));
    let job3 = job(staging.path(), "s1", &suite::message(5000));
    let writes = group.iter().map(|t| Arc::clone(t).write(Arc::clone(&job3)));
    let results = futures::future::join_all(writes).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1);
    let err = results.into_iter().find_map(Result::err).unwrap();
    assert!(
        matches!(err, CopyError::Peer(PeerError::NotReplicated { .. })),
        "{err}"
    );
    // Removing while a peer is unreachable reports that copies may remain.
    let err = Arc::clone(&group[0])
        .remove("s1".into(), job3.id.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(err, CopyError::Peer(PeerError::NotRemoved { .. })),
        "{err}"
    );
    assert!(!held(&a, &job3));
}

/// A relay's configuration in `data_dir` keeping a local copy and one
/// replica on `server`, both needed for 250.
fn local_and_peer(data_dir: &Path, server: &Server) -> Config {
    let mut config = Config {
        data_dir: data_dir.to_owned(),
        ..Config::default()
    };
    config.spool.copies = vec![CopyKind::Local, CopyKind::Peer];
    config.spool.required = 2;
    config.spool.reserve_bytes = 0;
    config.cluster = Some(ClusterConfig {
        peer_listen: closed_port(),
        peers: vec![server.addr.to_string()],
        secret: Some(SECRET.into()),
        replicas: 1,
        ..ClusterConfig::default()
    });
    config
}

#[tokio::test]
async fn a_spool_with_peer_copies_commits_a_replica_on_a_peer() {
    let peer = tempfile::tempdir().unwrap();
    let server = start(peer.path(), None).await;
    let origin = tempfile::tempdir().unwrap();
    let config = local_and_peer(origin.path(), &server);
    let client = Arc::new(client());
    let targets = PeerCopy::targets(&config, client);
    assert_eq!(targets.len(), 1);
    let (spool, _) = Spool::open_with_peers(&config, targets).await.unwrap();
    spool.rotate("origin.1".into()).await;
    let data = suite::message(100_000);
    let committed = suite::receive(&spool, &data, 4096).await.unwrap();
    assert!(committed.confirmed.contains(&CopyKind::Peer));
    let dir = server.replicas.join("origin.1");
    let (replica, envelope) = sealed(&dir, &committed.id);
    assert!(replica == data);
    assert_eq!(
        envelope,
        sealed(spool.message_dir(&committed.id), &committed.id).1
    );
    spool.drain().await;
}

/// Local data damaged while the relay was down is repaired from a peer's
/// replica (fetched, checked against the envelope's digest); when the
/// replica is damaged too, the message goes to quarantine, never out.
#[tokio::test]
async fn damaged_local_data_is_repaired_from_a_peer_replica_unless_that_is_damaged_too() {
    use postern::spool::Checked;
    let peer = tempfile::tempdir().unwrap();
    let server = start(peer.path(), None).await;
    let origin = tempfile::tempdir().unwrap();
    let config = local_and_peer(origin.path(), &server);
    let open = || Spool::open_with_peers(&config, PeerCopy::targets(&config, Arc::new(client())));
    let (spool, _) = open().await.unwrap();
    spool.rotate("origin.1".into()).await;
    let (one, two) = (suite::message(60_000), suite::message(61_000));
    let first = suite::receive(&spool, &one, 4096).await.unwrap().id;
    let second = suite::receive(&spool, &two, 4096).await.unwrap().id;
    spool.drain().await;
    let flip = |path: std::path::PathBuf| {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[1_000] ^= 1;
        std::fs::write(&path, bytes).unwrap();
    };
    flip(spool.message_path(&first));
    flip(spool.message_path(&second));
    flip(
        server
            .replicas
            .join("origin.1")
            .join(format!("{second}.msg")),
    );
    drop(spool);

    let (spool, recovered) = open().await.unwrap();
    let mut outcomes = Vec::new();
    for envelope in &recovered.messages {
        outcomes.push(spool.verify_or_repair(envelope).await.unwrap());
    }
    assert_eq!(
        outcomes,
        vec![Checked::Repaired(CopyKind::Peer), Checked::Quarantined]
    );
    assert!(sealed(spool.message_dir(&first), &first).0 == one);
    assert!(!spool.message_path(&second).exists());
    spool.drain().await;
}

#[tokio::test]
async fn the_admin_service_can_share_the_server_and_its_secret() {
    use postern::admin::proto::queue_client::QueueClient;
    let root = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: root.path().to_owned(),
        ..Config::default()
    };
    config.spool.copies = vec![CopyKind::Local];
    config.spool.required = 1;
    let (spool, recovered) = Spool::open(&config).await.unwrap();
    let queue =
        postern::queue::Queue::open(&config, spool.clone(), recovered.messages, Arc::default())
            .unwrap();
    let admin = postern::admin::queue_service::QueueService::new(queue);
    let server = start_with(root.path(), Some(spool), Some(admin)).await;
    let mut queue = QueueClient::connect(format!("http://{}", server.addr))
        .await
        .unwrap();
    let status = queue.stats(proto_stats()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    let stats = queue
        .stats(bearer(proto_stats(), SECRET))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stats.total, 0);
    // And the peer service answers on the same port.
    assert!(client().list(server.addr, "s1").await.unwrap().is_empty());
}

fn proto_stats() -> tonic::Request<postern::admin::proto::StatsRequest> {
    tonic::Request::new(postern::admin::proto::StatsRequest { cluster: false })
}

/// Log lines written on this thread while the guard lives (the tests run
/// on a current-thread runtime, so the server's tasks log here too).
fn capture_log() -> (
    tracing::subscriber::DefaultGuard,
    Arc<std::sync::Mutex<Vec<u8>>>,
) {
    #[derive(Clone)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = Captured(Arc::clone(&buffer));
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    (tracing::subscriber::set_default(subscriber), buffer)
}

/// Waits until the captured log has a line with every one of `wanted`.
async fn logged(buffer: &std::sync::Mutex<Vec<u8>>, wanted: &[&str]) -> String {
    for _ in 0..100 {
        let text = String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned();
        if wanted.iter().all(|w| {
            text.lines()
                .any(|l| l.contains("TLS handshake refused") && l.contains(w))
        }) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned();
    panic!("the log lacks a refusal saying one of {wanted:?}:\n{text}");
}

/// With `cluster.tls` the peer channel is mutual TLS: a member (a
/// certificate from the cluster's CA) replicates; a certificate from
/// another CA, an expired one, no certificate and plaintext are refused in
/// the handshake, write nothing, and the log says why for each.
#[tokio::test]
async fn mutual_tls_lets_members_in_and_refuses_the_rest_saying_why() {
    let (_guard, log) = capture_log();
    let pki_dir = tempfile::tempdir().unwrap();
    let cluster = pki::ca("cluster CA");
    let other = pki::ca("another CA");
    let server_files = pki::member_files(pki_dir.path(), &cluster, "server");
    let member = pki::member_files(pki_dir.path(), &cluster, "member");
    // Strangers trust the cluster's CA, so only the server can refuse them.
    let mut stranger = pki::member_files(pki_dir.path(), &other, "stranger");
    stranger.ca_file = member.ca_file.clone();
    let expired = pki::member_files_with(pki_dir.path(), &cluster, "expired", |params| {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let peer = tempfile::tempdir().unwrap();
    let tls = MutualTls::load(&server_files).unwrap();
    let server = start_serving(peer.path(), None, None, Some(tls)).await;
    let staging = tempfile::tempdir().unwrap();
    let held = |job: &CopyJob| {
        server
            .replicas
            .join(&job.spool)
            .join(format!("{}.msg", job.id))
            .exists()
    };

    let job = job(staging.path(), "s1", &suite::message(50_000));
    tls_client(&member)
        .replicate(server.addr, &job)
        .await
        .unwrap();
    assert!(held(&job));

    for (who, client) in [
        ("another CA", tls_client(&stranger)),
        ("expired", tls_client(&expired)),
        ("plaintext", client()),
    ] {
        let refused = self::job(staging.path(), "s1", &suite::message(1_000));
        let err = client.replicate(server.addr, &refused).await.unwrap_err();
        assert!(!held(&refused), "{who}: a replica was written ({err})");
    }

    // A TLS client with no certificate of its own.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from(
            cluster.der().to_vec(),
        ))
        .unwrap();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(server.addr.ip().into());
    let anonymous = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    if let Ok(mut stream) = anonymous {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // TLS 1.3 finishes the client's side first; the refusal follows.
        let _ = stream.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        let mut buf = [0u8; 64];
        assert!(
            !matches!(stream.read(&mut buf).await, Ok(n) if n > 0),
            "a client without a certificate got an answer"
        );
    }

    logged(
        &log,
        &[
            "not from the configured CA",
            "has expired",
            "presented no certificate",
            "not TLS (plaintext?)",
        ],
    )
    .await;
}

/// With `member_name`, a certificate the cluster's CA issued for another
/// name (another cluster's relays under a shared issuer) is refused in
/// both directions, and the log says so; one for the member name gets in.
#[tokio::test]
async fn with_a_member_name_certificates_for_other_names_are_refused_both_ways() {
    let (_guard, log) = capture_log();
    let pki_dir = tempfile::tempdir().unwrap();
    let ca = pki::ca("shared CA");
    let named = |file: &str, dns: &'static str| {
        let mut files = pki::member_files_with(pki_dir.path(), &ca, file, |params| {
            params
                .subject_alt_names
                .push(rcgen::SanType::DnsName(dns.try_into().unwrap()));
        });
        files.member_name = Some("mx-peers.mail.svc".into());
        files
    };
    let server_files = named("server", "mx-peers.mail.svc");
    let member = named("member", "mx-peers.mail.svc");
    let other_cluster = named("other", "other-peers.mail.svc");
    let peer = tempfile::tempdir().unwrap();
    let server = start_serving(
        peer.path(),
        None,
        None,
        Some(MutualTls::load(&server_files).unwrap()),
    )
    .await;
    let staging = tempfile::tempdir().unwrap();
    let held = |job: &CopyJob| {
        server
            .replicas
            .join(&job.spool)
            .join(format!("{}.msg", job.id))
            .exists()
    };
    let job = job(staging.path(), "s1", &suite::message(10_000));
    tls_client(&member)
        .replicate(server.addr, &job)
        .await
        .unwrap();
    assert!(held(&job), "a member replicates");

    // Another cluster's relay, same CA: the server refuses it.
    let refused = self::job(staging.path(), "s1", &suite::message(1_000));
    let err = tls_client(&other_cluster)
        .replicate(server.addr, &refused)
        .await
        .unwrap_err();
    assert!(!held(&refused), "a replica was written ({err})");
    logged(&log, &["not for the member name"]).await;

    // And a member does not send to a server whose certificate is another
    // cluster's: the client refuses it.
    let impostor_dir = tempfile::tempdir().unwrap();
    let impostor = start_serving(
        impostor_dir.path(),
        None,
        None,
        Some(MutualTls::load(&other_cluster).unwrap()),
    )
    .await;
    let err = tls_client(&member)
        .replicate(impostor.addr, &refused)
        .await
        .unwrap_err();
    assert!(
        !impostor
            .replicas
            .join("s1")
            .join(format!("{}.msg", refused.id))
            .exists(),
        "sent to an impostor ({err})"
    );
    eprintln!("member to another cluster's server: {err}");
}

/// The certificate files are re-read when they change: after the server's
/// files move to a new CA, members of the new CA get in and those of the old
/// one no longer do, without a restart.
#[tokio::test]
async fn rotated_certificate_files_are_used_without_a_restart() {
    let pki_dir = tempfile::tempdir().unwrap();
    let old_ca = pki::ca("old cluster CA");
    let new_ca = pki::ca("new cluster CA");
    let server_files = pki::member_files(pki_dir.path(), &old_ca, "server");
    let old_member = pki::member_files(pki_dir.path(), &old_ca, "old-member");
    let new_member = pki::member_files(pki_dir.path(), &new_ca, "new-member");
    let peer = tempfile::tempdir().unwrap();
    let server = start_serving(
        peer.path(),
        None,
        None,
        Some(MutualTls::load(&server_files).unwrap()),
    )
    .await;
    let staging = tempfile::tempdir().unwrap();
    let data = suite::message(5_000);
    tls_client(&old_member)
        .replicate(server.addr, &job(staging.path(), "s1", &data))
        .await
        .unwrap();
    assert!(tls_client(&new_member)
        .replicate(server.addr, &job(staging.path(), "s1", &data))
        .await
        .is_err());

    // Rotate: the same paths now hold a certificate of the new CA.
    let rotated = pki::member_files(pki_dir.path(), &new_ca, "server");
    assert_eq!(rotated, server_files);
    let mut taken = false;
    for _ in 0..100 {
        let attempt = tls_client(&new_member)
            .replicate(server.addr, &job(staging.path(), "s1", &data))
            .await;
        if attempt.is_ok() {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(taken, "the rotated files were never used");
    assert!(tls_client(&old_member)
        .replicate(server.addr, &job(staging.path(), "s1", &data))
        .await
        .is_err());
}
