//! The inbound driver over an in-memory stream with the real spool on a temp
//! directory: what reaches the disk, relay policy, STARTTLS, limits, timeouts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use postern::config::{Config, CopyKind, ObjectStoreConfig};
use postern::inbound::connection;
use postern::inbound::limits::ConnectionLimiter;
use postern::inbound::{Listener, Peer};
use postern::spool::envelope::Envelope;
use postern::spool::Spool;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};

fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::default();
    config.hostname = "mx.test".into();
    config.data_dir = data_dir.to_owned();
    config.object_store = ObjectStoreConfig::Local { path: None };
    config.spool.copies = vec![CopyKind::Local, CopyKind::ObjectStore];
    config.spool.required = 2;
    config.spool.reserve_bytes = 0;
    config.policy.relay_domains = vec!["relay.example".into()];
    config
}

async fn listener(config: &Config) -> Arc<Listener> {
    let (spool, _) = Spool::open(config).await.expect("spool opens");
    let limiter = ConnectionLimiter::new(10, 10);
    Arc::new(Listener::new(config, &config.listeners[0], spool, limiter).expect("listener"))
}

/// A client end that reads whole replies.
struct Client<S> {
    reader: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    async fn send(&mut self, text: &str) {
        self.reader
            .get_mut()
            .write_all(text.as_bytes())
            .await
            .unwrap();
    }

    /// Reads one (possibly multi-line) reply and returns its lines.
    async fn reply(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line))
                .await
                .expect("reply within 10 s")
                .unwrap();
            assert!(n > 0, "connection closed; replies so far {lines:?}");
            let line = line.trim_end_matches("\r\n").to_owned();
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return lines;
            }
        }
    }

    async fn expect(&mut self, code: &str) -> String {
        let reply = self.reply().await;
        let last = reply.last().unwrap().clone();
        assert!(last.starts_with(code), "expected {code}, got {reply:?}");
        last
    }

    async fn closed(&mut self) -> bool {
        let mut line = String::new();
        matches!(
            tokio::time::timeout(Duration::from_secs(10), self.reader.read_line(&mut line)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

fn connect(listener: Arc<Listener>, peer: &str) -> Client<tokio::io::DuplexStream> {
    let (client, server) = tokio::io::duplex(1 << 20);
    let peer: SocketAddr = peer.parse().unwrap();
    tokio::spawn(async move { connection::handle(&listener, server, Peer::Tcp(peer)).await });
    Client {
        reader: BufReader::new(client),
    }
}

/// The local spool's file of message `id` with extension `ext`.
fn spool_file(dir: &Path, id: &str) -> PathBuf {
    postern::spool::message_file::path(
        &postern::spool::local::shard_dir(&dir.join("spool"), id),
        id,
    )
}

/// The data and the envelope JSON of committed message `id` in the local
/// spool under `dir`.
fn sealed(dir: &Path, id: &str) -> (Vec<u8>, Vec<u8>) {
    postern::spool::message_file::read_sealed(&spool_file(dir, id)).unwrap()
}

fn envelope_of(dir: &Path, id: &str) -> Envelope {
    serde_json::from_slice(&sealed(dir, id).1).unwrap()
}

/// Every file in the local spool's subdirectories.
fn spool_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for shard in std::fs::read_dir(dir.join("spool")).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            found.extend(std::fs::read_dir(shard).unwrap().map(|e| e.unwrap().path()));
        }
    }
    found.sort();
    found
}

fn committed(dir: &Path) -> Vec<PathBuf> {
    let mut found = spool_files(dir);
    found.retain(|p| {
        matches!(
            postern::spool::message_file::read_seal_at(p),
            Ok(postern::spool::message_file::Seal::Sealed { .. })
        )
    });
    found
}

fn queued_id(reply: &str) -> String {
    reply.rsplit(' ').next().unwrap().to_owned()
}

#[tokio::test]
async fn accepted_message_is_spooled_in_wire_format_with_both_copies() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let mut client = connect(listener(&config).await, "127.0.0.1:40000");
    client.expect("220 mx.test").await;
    client.send("EHLO client.example\r\n").await;
    client.expect("250 ").await;
    client
        .send("MAIL FROM:<a@example.org> RET=HDRS\r\nRCPT TO:<b@example.net> NOTIFY=FAILURE\r\nDATA\r\n")
        .await;
    client.expect("250 2.1.0").await;
    client.expect("250 2.1.5").await;
    client.expect("354").await;
    let body = "Subject: test\r\n\r\n..dot\r\nline two\r\n";
    client.send(&format!("{body}.\r\n")).await;
    let reply = client.expect("250 2.0.0 Ok: queued as ").await;
    let id = queued_id(&reply);

    let (eml, envelope_json) = sealed(dir.path(), &id);
    let text = String::from_utf8(eml.clone()).unwrap();
    assert!(
        text.starts_with("Received: from client.example ([127.0.0.1])\r\n\tby mx.test (Postern)"),
        "{text}"
    );
    assert!(text.contains(&format!("with ESMTP id {id}")));
    let unstuffed = "Subject: test\r\n\r\n.dot\r\nline two\r\n";
    assert!(text.ends_with(unstuffed), "{text}");

    let env: Envelope = serde_json::from_slice(&envelope_json).unwrap();
    assert_eq!(env.id, id);
    assert_eq!(env.data_len, eml.len() as u64);
    assert_eq!(env.recipients[0].address.address(), "b@example.net");
    assert_eq!(env.reverse_path.unwrap().address(), "a@example.org");
    assert_eq!(env.client.helo, "client.example");

    // The object-store copy: a segment holding the same bytes and envelope.
    let segments: Vec<PathBuf> = walk(&config.local_object_dir())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    assert_eq!(segments.len(), 1, "{segments:?}");
    let object = std::fs::read(&segments[0]).unwrap();
    let slots =
        postern::spool::segment::parse_tail(&object, object.len() as u64).expect("a segment");
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].id, id);
    let range = |r: std::ops::Range<u64>| &object[r.start as usize..r.end as usize];
    assert_eq!(range(slots[0].data_range()), &eml[..]);
    assert_eq!(range(slots[0].envelope_range()), &envelope_json[..]);
    client.send("QUIT\r\n").await;
    client.expect("221").await;
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[tokio::test]
async fn strangers_may_send_only_to_relay_domains() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let mut client = connect(listener(&config).await, "192.0.2.9:40000");
    client.expect("220").await;
    client
        .send("EHLO stranger.example\r\nMAIL FROM:<s@stranger.example>\r\n")
        .await;
    client.expect("250 ").await;
    client.expect("250 2.1.0").await;
    client.send("RCPT TO:<victim@elsewhere.example>\r\n").await;
    let refusal = client.expect("554 5.7.1").await;
    assert!(refusal.contains("Relay access denied"));
    client
        .send("RCPT TO:<user@relay.example>\r\nDATA\r\n")
        .await;
    client.expect("250 2.1.5").await;
    client.expect("354").await;
    client.send("Subject: ok\r\n\r\nhi\r\n.\r\n").await;
    client.expect("250 2.0.0").await;
    assert_eq!(committed(dir.path()).len(), 1);
}

#[tokio::test]
async fn strangers_reach_the_postmaster_whose_mail_goes_to_policy_postmaster() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.policy.postmaster = Some("ops@ops.example".into());
    let mut client = connect(listener(&config).await, "192.0.2.9:40000");
    client.expect("220").await;
    client
        .send("EHLO stranger.example\r\nMAIL FROM:<s@stranger.example>\r\n")
        .await;
    client.expect("250 ").await;
    client.expect("250 2.1.0").await;
    client
        .send("RCPT TO:<postmaster>\r\nRCPT TO:<Postmaster@MX.TEST>\r\nRCPT TO:<postmaster@elsewhere.example>\r\nDATA\r\n")
        .await;
    client.expect("250 2.1.5").await;
    client.expect("250 2.1.5").await;
    client
        .expect("554 5.7.1 <postmaster@elsewhere.example>")
        .await;
    client.expect("354").await;
    let body = "To: <postmaster>\r\nSubject: abuse report\r\n\r\nhi\r\n";
    client.send(&format!("{body}.\r\n")).await;
    let id = queued_id(&client.expect("250 2.0.0").await);

    let env = envelope_of(dir.path(), &id);
    let recipients: Vec<(String, Option<String>)> = env
        .recipients
        .iter()
        .map(|r| (r.address.address(), r.params.orcpt.clone()))
        .collect();
    assert_eq!(
        recipients,
        [
            (
                "ops@ops.example".to_owned(),
                Some("rfc822;postmaster@mx.test".to_owned())
            ),
            (
                "ops@ops.example".to_owned(),
                Some("rfc822;Postmaster@MX.TEST".to_owned())
            ),
        ]
    );
    // The message is what the client sent, behind our trace header.
    let eml = String::from_utf8(sealed(dir.path(), &id).0).unwrap();
    assert!(eml.starts_with("Received: "), "{eml}");
    assert!(eml.ends_with(body), "{eml}");
}

#[tokio::test]
async fn without_policy_postmaster_the_refusal_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let mut client = connect(listener(&config).await, "192.0.2.9:40000");
    client.expect("220").await;
    client
        .send("EHLO stranger.example\r\nMAIL FROM:<s@stranger.example>\r\nRCPT TO:<postmaster>\r\n")
        .await;
    client.expect("250 ").await;
    client.expect("250 2.1.0").await;
    let refusal = client.expect("550 5.1.1 <postmaster>: ").await;
    assert!(refusal.contains("policy.postmaster"), "{refusal}");
}

#[tokio::test]
async fn no_room_on_the_spool_disk_gives_452_at_mail() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.spool.reserve_bytes = u64::MAX / 4;
    let mut client = connect(listener(&config).await, "127.0.0.1:40000");
    client.expect("220").await;
    client
        .send("EHLO c.example\r\nMAIL FROM:<a@example.org> SIZE=1000\r\n")
        .await;
    client.expect("250 ").await;
    client.expect("452 4.3.1").await;
    assert!(committed(dir.path()).is_empty());
}

#[tokio::test]
async fn idle_client_times_out_with_421() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.limits.command_timeout = Duration::from_millis(200);
    let mut client = connect(listener(&config).await, "127.0.0.1:40000");
    client.expect("220").await;
    client.expect("421 4.4.2").await;
    assert!(client.closed().await);
}

#[tokio::test]
async fn client_disconnecting_mid_data_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let listener = listener(&config).await;
    let (client, server) = tokio::io::duplex(1 << 20);
    let task = tokio::spawn({
        let listener = Arc::clone(&listener);
        async move {
            connection::handle(&listener, server, Peer::Tcp("127.0.0.1:1".parse().unwrap())).await
        }
    });
    let mut client = Client {
        reader: BufReader::new(client),
    };
    client.expect("220").await;
    client
        .send("HELO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\n")
        .await;
    client.expect("250").await;
    client.expect("250").await;
    client.expect("250").await;
    client.send("DATA\r\n").await;
    client.expect("354").await;
    client.send("Subject: half\r\n\r\nsome data").await;
    drop(client);
    task.await.unwrap();
    let leftovers: Vec<_> = spool_files(dir.path())
        .into_iter()
        .filter_map(|path| path.file_name().map(ToOwned::to_owned))
        .filter(|name| {
            let name = name.to_string_lossy();
            name.ends_with(".msg")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn starttls_discards_pipelined_plaintext_and_records_tls() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    let cert = rcgen::generate_simple_self_signed(vec!["mx.test".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    config.listeners[0].tls_cert = Some(cert_path);
    config.listeners[0].tls_key = Some(key_path);
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let (client_io, server) = tokio::io::duplex(1 << 20);
    let listener = listener(&config).await;
    tokio::spawn(async move {
        connection::handle(&listener, server, Peer::Tcp("127.0.0.1:2".parse().unwrap())).await
    });
    let mut plain = Client {
        reader: BufReader::new(client_io),
    };
    plain.expect("220").await;
    plain.send("EHLO c.example\r\n").await;
    let ehlo = plain.reply().await;
    assert!(ehlo.iter().any(|l| l == "250-STARTTLS"), "{ehlo:?}");
    // The injected MAIL rides in the same write as STARTTLS.
    plain
        .send("STARTTLS\r\nMAIL FROM:<injected@example.org>\r\n")
        .await;
    plain.expect("220 2.0.0").await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let tls_config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_config));
    let io = plain.reader.into_inner();
    let tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from("mx.test").unwrap(),
            io,
        )
        .await
        .expect("TLS handshake");
    let mut client = Client {
        reader: BufReader::new(tls),
    };
    // Had the injected MAIL survived, this RCPT would be accepted.
    client.send("EHLO c.example\r\n").await;
    let ehlo = client.reply().await;
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")), "{ehlo:?}");
    client.send("RCPT TO:<b@example.net>\r\n").await;
    client.expect("503 5.5.1").await;
    client
        .send("MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        .await;
    client.expect("250").await;
    client.expect("250").await;
    client.expect("354").await;
    client.send("Subject: secret\r\n\r\nbody\r\n.\r\n").await;
    let id = queued_id(&client.expect("250 2.0.0").await);
    let eml = String::from_utf8(sealed(dir.path(), &id).0).unwrap();
    assert!(eml.contains("with ESMTPS id"), "{eml}");
}

/// The certificate a STARTTLS on `listener` presents.
async fn presented_certificate(listener: &Arc<Listener>, roots: &rustls::RootCertStore) -> Vec<u8> {
    let (client_io, server) = tokio::io::duplex(1 << 20);
    let serving = Arc::clone(listener);
    tokio::spawn(async move {
        connection::handle(&serving, server, Peer::Tcp("127.0.0.1:2".parse().unwrap())).await
    });
    let mut plain = Client {
        reader: BufReader::new(client_io),
    };
    plain.expect("220").await;
    plain.send("EHLO c.example\r\n").await;
    plain.reply().await;
    plain.send("STARTTLS\r\n").await;
    plain.expect("220 2.0.0").await;
    let tls_config = rustls::ClientConfig::builder()
        .with_root_certificates(roots.clone())
        .with_no_client_auth();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config))
        .connect(
            rustls_pki_types::ServerName::try_from("mx.test").unwrap(),
            plain.reader.into_inner(),
        )
        .await
        .expect("TLS handshake");
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A listener's certificate renewed in place is served to the next STARTTLS
/// without a restart.
#[tokio::test]
async fn a_renewed_listener_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    let first = rcgen::generate_simple_self_signed(vec!["mx.test".to_owned()]).unwrap();
    let second = rcgen::generate_simple_self_signed(vec!["mx.test".to_owned()]).unwrap();
    let cert_path = dir.path().join("cert.pem");
    let key_path = dir.path().join("key.pem");
    std::fs::write(&cert_path, first.cert.pem()).unwrap();
    std::fs::write(&key_path, first.signing_key.serialize_pem()).unwrap();
    config.listeners[0].tls_cert = Some(cert_path.clone());
    config.listeners[0].tls_key = Some(key_path.clone());
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(first.cert.der().clone()).unwrap();
    roots.add(second.cert.der().clone()).unwrap();
    let listener = listener(&config).await;
    assert_eq!(
        presented_certificate(&listener, &roots).await,
        first.cert.der().to_vec()
    );

    std::fs::write(&key_path, second.signing_key.serialize_pem()).unwrap();
    std::fs::write(&cert_path, second.cert.pem()).unwrap();
    let mut served = Vec::new();
    for _ in 0..50 {
        served = presented_certificate(&listener, &roots).await;
        if served == second.cert.der().to_vec() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        served,
        second.cert.der().to_vec(),
        "the renewed certificate"
    );
}

#[tokio::test]
async fn draining_closes_idle_sessions_and_lets_transactions_finish() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(dir.path());
    let (spool, _) = Spool::open(&config).await.unwrap();
    let mut listener = Listener::new(
        &config,
        &config.listeners[0],
        spool,
        ConnectionLimiter::new(10, 10),
    )
    .unwrap();
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    listener.draining = drain_rx;
    let listener = Arc::new(listener);

    let mut idle = connect(Arc::clone(&listener), "127.0.0.1:1");
    let mut busy = connect(Arc::clone(&listener), "127.0.0.1:2");
    idle.expect("220").await;
    busy.expect("220").await;
    idle.send("EHLO idle.example\r\n").await;
    idle.expect("250 ").await;
    busy.send("EHLO busy.example\r\nMAIL FROM:<a@example.org>\r\n")
        .await;
    busy.expect("250 ").await;
    busy.expect("250 2.1.0").await;

    drain_tx.send(true).unwrap();
    idle.expect("421 4.3.2").await;
    assert!(idle.closed().await);

    busy.send("RCPT TO:<b@example.net>\r\nDATA\r\n").await;
    busy.expect("250 2.1.5").await;
    busy.expect("354").await;
    busy.send("Subject: in flight\r\n\r\nx\r\n.\r\n").await;
    busy.expect("250 2.0.0").await;
    busy.expect("421 4.3.2").await;
    assert_eq!(committed(dir.path()).len(), 1);
}

#[tokio::test]
async fn connection_limits_per_address_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(dir.path());
    config.limits.max_connections = 3;
    config.limits.max_connections_per_ip = 2;
    let (spool, _) = Spool::open(&config).await.unwrap();
    let limiter = ConnectionLimiter::new(3, 2);
    let listener = Arc::new(Listener::new(&config, &config.listeners[0], spool, limiter).unwrap());
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(postern::inbound::serve(listener, socket, async {
        let _ = stop_rx.await;
    }));
    let connect_from = |ip: &'static str| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let mut client = Client {
            reader: BufReader::new(stream),
        };
        let greeting = client.reply().await;
        (client, greeting.last().unwrap().clone())
    };
    let (_a1, g1) = connect_from("127.0.0.1").await;
    let (_a2, g2) = connect_from("127.0.0.1").await;
    assert!(g1.starts_with("220") && g2.starts_with("220"));
    // A third from the same address is over the per-address limit.
    let (mut a3, g3) = connect_from("127.0.0.1").await;
    assert!(g3.starts_with("421 4.7.0"), "{g3}");
    assert!(a3.closed().await);
    // Another address still gets in, up to the total.
    let (_b1, h1) = connect_from("127.0.0.2").await;
    assert!(h1.starts_with("220"), "{h1}");
    let (_b2, h2) = connect_from("127.0.0.2").await;
    assert!(h2.starts_with("421 4.7.0"), "over the total: {h2}");
    drop(_a1);
    // The freed slot is reusable once the server notices the close.
    let reopened = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let (_c, g) = connect_from("127.0.0.3").await;
            if g.starts_with("220") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        reopened.is_ok(),
        "the slot of a closed connection was not freed"
    );
    let _ = stop_tx.send(());
    drop((_a2, _b1));
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
}
