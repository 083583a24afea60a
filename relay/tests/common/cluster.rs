//! A three-relay cluster for the fault tier (tests/e2e_cluster.rs): one real
//! etcd, one moto S3 server, one aiosmtpd sink (e2e/sink.py) and three real
//! `postern serve` processes with a `[cluster]` section (peer channel over
//! mutual TLS, one test CA), all on addresses of
//! one /24 that the test owns:
//!
//! ```text
//! .1             the test itself (clients, health checks)
//! .2             etcd :2379/:2380, moto :5000, the sink :2526
//! .11 .12 .13    relay-a, relay-b, relay-c: SMTP :2525, HTTP :9325, peers :7070
//! ```
//!
//! On loopback the /24 is `127.0.N.0/24` (every 127/8 address is local on
//! Linux, so tests with distinct N run in parallel on the same ports). With
//! [`Spec::netns`] it is `10.77.N.0/24` across network namespaces the fixture
//! creates: one per relay, one for etcd, moto and the sink, a bridge in a hub
//! namespace, and a veth from the test's own namespace into the bridge; the
//! partition test then drops a relay's traffic with nftables inside its
//! namespace. Namespaces are removed on drop (and stale ones of the same name
//! before they are created).
//!
//! Every message the load sends carries a unique marker (`X-Marker:`) and is
//! recorded with its SHA-256; at the sink the relay's `Received:` header is
//! stripped and the rest hashed again, so "delivered" means "delivered
//! unchanged". The sink's `.json` names the delivering relay (its EHLO name)
//! and the arrival time.
//!
//! A missing tool fails the test naming `e2e/install-deps`.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{
    find, http_request, postern_bin, repo_root, require_python_module, require_tool, sha256_hex,
    wait_for, Reply,
};

pub const ETCD_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
pub const MOTO_PORT: u16 = 5000;
pub const SINK_PORT: u16 = 2526;
pub const SMTP_PORT: u16 = 2525;
pub const HTTP_PORT: u16 = 9325;
pub const PEER_PORT: u16 = 7070;
pub const BUCKET: &str = "mail";
pub const NAMES: [&str; 3] = ["relay-a", "relay-b", "relay-c"];
const SECRET: &str = "0123456789abcdef-cluster-test-secret";

/// Seconds since the Unix epoch (the sink records arrival times the same way).
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ---------------------------------------------------------------- processes

/// A child process (optionally inside a network namespace via `ip netns
/// exec`, which execs, so the pid is the program's) with its output appended
/// to a log file. It gets SIGKILL when the test thread that spawned it ends,
/// and on drop.
pub struct Proc {
    pub name: String,
    argv: Vec<OsString>,
    netns: Option<String>,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl Proc {
    pub fn new(name: &str, netns: Option<String>, log_path: PathBuf, argv: Vec<OsString>) -> Proc {
        Proc {
            name: name.to_owned(),
            argv,
            netns,
            log_path,
            child: None,
        }
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let mut log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        writeln!(log, "==== {:.3} start {:?}", now(), self.argv).unwrap();
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = Command::new(require_tool("ip"));
                c.args(["netns", "exec", ns]).arg(&self.argv[0]);
                c
            }
            None => Command::new(&self.argv[0]),
        };
        command
            .args(&self.argv[1..])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("RUST_BACKTRACE", "1")
            .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {} ({:?}): {e}", self.name, self.argv));
        self.child = Some(child);
    }

    /// Polls `ready` until it holds; fails if the process exits first.
    pub fn wait_ready(&mut self, timeout: Duration, mut ready: impl FnMut() -> bool) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_exit() {
                panic!(
                    "{} exited with {status} before it was ready; log:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            if ready() {
                return;
            }
            if start.elapsed() > timeout {
                panic!(
                    "{} not ready after {timeout:?}; log:\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    pub fn pid(&self) -> i32 {
        self.child
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
            .id() as i32
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.pid();
        // SAFETY: kill(2) on our own, not yet reaped child.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) for {}", self.name);
    }

    /// SIGKILL (after SIGCONT, in case it is stopped), then reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            // SAFETY: as in `signal`; a stopped process dies of SIGKILL anyway.
            unsafe { libc::kill(child.id() as i32, libc::SIGCONT) };
            let _ = child.wait();
        }
    }

    /// The exit status if it has exited (then it is reaped and not running).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        Some(status)
    }

    /// Waits up to `timeout` for the exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.try_exit())
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.log_path).unwrap_or_default()).into_owned()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

// ---------------------------------------------------------------- namespaces

fn ip(args: &[&str]) {
    let output = Command::new(require_tool("ip"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new(require_tool("ip"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The namespaces of one cluster: `pe2e<N>-hub` holds the bridge, every
/// member namespace has an `eth0` on it, and the veth `pe2e<N>root` puts the
/// test's own namespace on it as `.1`.
pub struct Netns {
    hub: String,
    members: Vec<String>,
    root_veth: String,
}

impl Netns {
    /// Creates the hub and one namespace per `(name, host)`, each with
    /// address `10.77.<net>.<host>/24`.
    pub fn create(net: u8, members: &[(&str, u8)]) -> Netns {
        require_tool("ip");
        require_tool("nft");
        let hub = format!("pe2e{net}-hub");
        let root_veth = format!("pe2e{net}root");
        let netns = Netns {
            hub: hub.clone(),
            members: members
                .iter()
                .map(|(name, _)| format!("pe2e{net}-{name}"))
                .collect(),
            root_veth: root_veth.clone(),
        };
        netns.remove(); // leftovers of a run that was killed
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        ip(&[
            "link", "add", &root_veth, "type", "veth", "peer", "name", "v-root", "netns", &hub,
        ]);
        ip(&["-n", &hub, "link", "set", "v-root", "master", "br0", "up"]);
        ip(&[
            "addr",
            "add",
            &format!("10.77.{net}.1/24"),
            "dev",
            &root_veth,
        ]);
        ip(&["link", "set", &root_veth, "up"]);
        for ((_, host), ns) in members.iter().zip(&netns.members) {
            let hub_side = format!("v-{host}");
            ip(&["netns", "add", ns]);
            ip(&[
                "-n", &hub, "link", "add", &hub_side, "type", "veth", "peer", "name", "eth0",
                "netns", ns,
            ]);
            ip(&["-n", &hub, "link", "set", &hub_side, "master", "br0", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.77.{net}.{host}/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        netns
    }

    fn remove(&self) {
        for ns in &self.members {
            ip_quiet(&["netns", "del", ns]);
        }
        ip_quiet(&["netns", "del", &self.hub]);
        ip_quiet(&["link", "del", &self.root_veth]);
    }

    /// Runs `nft -f -` with `script` inside namespace `ns`.
    pub fn nft(ns: &str, script: &str) {
        let mut child = Command::new(require_tool("ip"))
            .args(["netns", "exec", ns])
            .arg(require_tool("nft"))
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "nft in {ns} failed: {}\nscript:\n{script}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.remove();
    }
}

// ---------------------------------------------------------------- the cluster

/// What a cluster looks like.
#[derive(Clone, Debug)]
pub struct Spec {
    /// The third octet of the cluster's /24: distinct per test.
    pub net: u8,
    /// Run every process in its own network namespace (10.77.net.0/24).
    pub netns: bool,
    /// `spool.copies`.
    pub copies: Vec<&'static str>,
    /// `spool.required`.
    pub required: usize,
    /// `spool.deadline`.
    pub deadline: &'static str,
    /// `cluster.lease_ttl`, in seconds.
    pub lease_ttl: u64,
    /// `delivery.max_per_destination` (every relay delivers to the one sink,
    /// so this bounds the deliveries a relay has in flight).
    pub max_per_destination: usize,
    /// `delivery.paused`, per relay.
    pub paused: [bool; 3],
    /// Start the sink with the cluster (else [`Cluster::start_sink`]).
    pub sink_up: bool,
    /// Seconds the sink waits before answering each message's data.
    pub sink_delay: f64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            net: 1,
            netns: false,
            copies: vec!["local", "peer", "object_store"],
            required: 2,
            deadline: "3s",
            lease_ttl: 3,
            max_per_destination: 2,
            paused: [false; 3],
            sink_up: true,
            sink_delay: 0.0,
        }
    }
}

/// One relay of the cluster.
pub struct Node {
    pub name: String,
    pub hostname: String,
    pub smtp: SocketAddr,
    pub http: SocketAddr,
    pub peer: SocketAddr,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub netns: Option<String>,
    pub proc: Proc,
}

/// One message found at the sink.
#[derive(Clone, Debug)]
pub struct Arrival {
    pub file: String,
    /// The `X-Marker:` value (None for messages the load did not send, e.g. DSNs).
    pub marker: Option<String>,
    /// SHA-256 of the message after the delivering relay's `Received:` header.
    pub sha256: String,
    /// The EHLO name of the relay that delivered it.
    pub helo: String,
    /// Arrival time (Unix seconds).
    pub time: f64,
}

pub struct Cluster {
    pub spec: Spec,
    /// The prefix in etcd, unique per cluster.
    pub prefix: String,
    pub etcd: Proc,
    pub moto: Proc,
    pub sink: Proc,
    pub sink_dir: PathBuf,
    pub delay_file: PathBuf,
    pub relays: Vec<Node>,
    pub etcd_addr: SocketAddr,
    pub moto_addr: SocketAddr,
    pub sink_addr: SocketAddr,
    arrivals: Mutex<BTreeMap<String, Arrival>>,
    /// The cluster's CA for the peer channel, and a certificate it issued
    /// for the test's own TLS clients.
    authority: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    client_tls: postern::config::MutualTlsFiles,
    work: Option<tempfile::TempDir>,
    // Last: the namespaces go after every process in them.
    net: Option<Netns>,
}

impl Cluster {
    fn addr(spec: &Spec, host: u8) -> IpAddr {
        if spec.netns {
            IpAddr::V4(Ipv4Addr::new(10, 77, spec.net, host))
        } else {
            IpAddr::V4(Ipv4Addr::new(127, 0, spec.net, host))
        }
    }

    pub fn host(&self, host: u8) -> IpAddr {
        Cluster::addr(&self.spec, host)
    }

    /// Starts etcd, moto (with the bucket), the sink (unless `!sink_up`) and
    /// three relays, and waits until each answers `/readyz` with 200.
    pub fn start(spec: Spec) -> Cluster {
        require_python_module("aiosmtpd");
        require_python_module("moto.server");
        let moto_bin = require_tool("moto_server");
        let python = require_tool("python3");
        let etcd_bin = require_tool("etcd");
        let work = tempfile::Builder::new()
            .prefix(&format!("postern-cluster-{}-", spec.net))
            .tempdir()
            .unwrap();
        let dir = work.path().to_owned();
        let net = spec.netns.then(|| {
            Netns::create(
                spec.net,
                &[("infra", 2), (NAMES[0], 11), (NAMES[1], 12), (NAMES[2], 13)],
            )
        });
        let ns = |name: &str| net.as_ref().map(|_| format!("pe2e{}-{name}", spec.net));
        let infra = Cluster::addr(&spec, 2);
        let etcd_addr = SocketAddr::new(infra, ETCD_PORT);
        let moto_addr = SocketAddr::new(infra, MOTO_PORT);
        let sink_addr = SocketAddr::new(infra, SINK_PORT);
        let unique = format!(
            "{}-{}-{}",
            spec.net,
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis()
        );
        let prefix = format!("/postern-test-{unique}");

        let etcd_url = format!("http://{etcd_addr}");
        let etcd_peer = format!("http://{}", SocketAddr::new(infra, ETCD_PEER_PORT));
        let etcd_argv: Vec<OsString> = vec![
            etcd_bin.into(),
            "--name".into(),
            "cluster-test".into(),
            "--data-dir".into(),
            dir.join("etcd-data").into(),
            "--listen-client-urls".into(),
            etcd_url.clone().into(),
            "--advertise-client-urls".into(),
            etcd_url.clone().into(),
            "--listen-peer-urls".into(),
            etcd_peer.clone().into(),
            "--initial-advertise-peer-urls".into(),
            etcd_peer.clone().into(),
            "--initial-cluster".into(),
            format!("cluster-test={etcd_peer}").into(),
            "--initial-cluster-state".into(),
            "new".into(),
        ];
        let mut etcd = Proc::new("etcd", ns("infra"), dir.join("etcd.log"), etcd_argv);
        let mut moto = Proc::new(
            "moto",
            ns("infra"),
            dir.join("moto.log"),
            vec![
                moto_bin.into(),
                "-H".into(),
                infra.to_string().into(),
                "-p".into(),
                MOTO_PORT.to_string().into(),
            ],
        );
        let sink_dir = dir.join("sink");
        let delay_file = dir.join("sink-delay");
        fs::write(&delay_file, spec.sink_delay.to_string()).unwrap();
        let sink = Proc::new(
            "sink",
            ns("infra"),
            dir.join("sink.log"),
            vec![
                python.into(),
                repo_root().join("e2e/sink.py").into(),
                "--listen".into(),
                sink_addr.to_string().into(),
                "--dir".into(),
                sink_dir.clone().into(),
                "--delay-file".into(),
                delay_file.clone().into(),
            ],
        );
        etcd.spawn();
        moto.spawn();

        let peers: Vec<String> = (0..3)
            .map(|i| {
                format!(
                    "\"{}\"",
                    SocketAddr::new(Cluster::addr(&spec, 11 + i), PEER_PORT)
                )
            })
            .collect();
        // Mutual TLS on the peer channel: one CA for the cluster, a
        // certificate for each relay.
        let authority = super::pki::ca("test cluster CA");
        let mut relays = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let ip = Cluster::addr(&spec, 11 + i as u8);
            let node_dir = dir.join(name);
            fs::create_dir_all(&node_dir).unwrap();
            let hostname = format!("{name}.cluster.test");
            let data_dir = node_dir.join("data");
            let config_path = node_dir.join("postern.toml");
            let copies: Vec<String> = spec.copies.iter().map(|c| format!("\"{c}\"")).collect();
            let tls = super::pki::member_files(&node_dir, &authority, name);
            let config = format!(
                r#"hostname = "{hostname}"
data_dir = "{data_dir}"

[[listener]]
name = "smtp"
address = "{smtp}"

[http]
listen = "{http}"

[limits]
max_connections_per_ip = 1000

[policy]
relay_domains = ["example.test"]

[spool]
copies = [{copies}]
required = {required}
deadline = "{deadline}"

[object_store]
kind = "s3"
bucket = "{BUCKET}"
endpoint = "http://{moto_addr}"
allow_http = true
access_key_id = "testing"
secret_access_key = "testing"

[delivery]
paused = {paused}
relayhost = "{sink_addr}"
helo_name = "{hostname}"
retry_schedule = ["1s"]
max_per_destination = {max_per_destination}
connect_timeout = "2s"

[cluster]
name = "{name}"
etcd = ["{etcd_url}"]
prefix = "{prefix}"
lease_ttl = "{ttl}s"
peer_listen = "{peer}"
peers = [{peers}]
secret = "{SECRET}"
replicas = 1
repair_interval = "2s"

[cluster.tls]
cert_file = "{cert}"
key_file = "{key}"
ca_file = "{ca}"
"#,
                cert = tls.cert_file.display(),
                key = tls.key_file.display(),
                ca = tls.ca_file.display(),
                data_dir = data_dir.display(),
                smtp = SocketAddr::new(ip, SMTP_PORT),
                http = SocketAddr::new(ip, HTTP_PORT),
                copies = copies.join(", "),
                required = spec.required,
                deadline = spec.deadline,
                paused = spec.paused[i],
                max_per_destination = spec.max_per_destination,
                ttl = spec.lease_ttl,
                peer = SocketAddr::new(ip, PEER_PORT),
                peers = peers.join(", "),
            );
            fs::write(&config_path, config).unwrap();
            let proc = Proc::new(
                name,
                ns(name),
                node_dir.join("postern.log"),
                vec![
                    postern_bin().into(),
                    "serve".into(),
                    "--config".into(),
                    config_path.clone().into(),
                ],
            );
            relays.push(Node {
                name: name.to_string(),
                hostname,
                smtp: SocketAddr::new(ip, SMTP_PORT),
                http: SocketAddr::new(ip, HTTP_PORT),
                peer: SocketAddr::new(ip, PEER_PORT),
                data_dir,
                config_path,
                netns: ns(name),
                proc,
            });
        }

        let mut cluster = Cluster {
            spec,
            prefix,
            etcd,
            moto,
            sink,
            sink_dir,
            delay_file,
            relays,
            etcd_addr,
            moto_addr,
            sink_addr,
            arrivals: Mutex::new(BTreeMap::new()),
            client_tls: super::pki::member_files(&dir, &authority, "test-client"),
            authority,
            work: Some(work),
            net,
        };
        cluster.wait_etcd();
        cluster.wait_moto();
        cluster.create_bucket();
        if cluster.spec.sink_up {
            cluster.start_sink();
        }
        for relay in &mut cluster.relays {
            relay.proc.spawn();
        }
        for i in 0..3 {
            cluster.wait_relay_ready(i);
        }
        cluster
    }

    pub fn work_dir(&self) -> &Path {
        self.work.as_ref().unwrap().path()
    }

    fn wait_etcd(&mut self) {
        let addr = self.etcd_addr;
        self.etcd.wait_ready(Duration::from_secs(30), || {
            matches!(http_request(addr, "GET", "/health", &[], b""),
                     Ok((200, body)) if find(&body, b"\"health\":\"true\"").is_some())
        });
    }

    fn wait_moto(&mut self) {
        let addr = self.moto_addr;
        self.moto.wait_ready(Duration::from_secs(60), || {
            http_request(addr, "GET", "/", &[], b"").is_ok()
        });
    }

    fn create_bucket(&self) {
        let (status, body) =
            http_request(self.moto_addr, "PUT", &format!("/{BUCKET}"), &[], b"").unwrap();
        assert_eq!(
            status,
            200,
            "create bucket: {}",
            String::from_utf8_lossy(&body)
        );
    }

    fn wait_relay_ready(&mut self, i: usize) {
        let http = self.relays[i].http;
        self.relays[i].proc.wait_ready(Duration::from_secs(30), || {
            matches!(http_request(http, "GET", "/readyz", &[], b""), Ok((200, _)))
        });
        let log = self.relays[i].proc.log();
        assert!(
            log.lines()
                .any(|l| l.contains("peer service listening") && l.contains("tls=true")),
            "{} serves its peer port without TLS:\n{log}",
            self.relays[i].name
        );
    }

    /// Renews relay `i`'s peer certificate in place (same CA, a new key), as
    /// cert-manager does; returns the new certificate (PEM).
    pub fn renew_peer_certificate(&self, i: usize) -> String {
        let dir = self.relays[i].config_path.parent().unwrap();
        let files = super::pki::member_files(dir, &self.authority, &self.relays[i].name);
        fs::read_to_string(files.cert_file).unwrap()
    }

    /// The certificate relay `i`'s peer port presents to a new connection
    /// (PEM), as `openssl s_client` sees it with a client certificate of the
    /// cluster's CA; panics when the handshake fails.
    pub fn peer_certificate(&self, i: usize) -> String {
        let output = Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &self.relays[i].peer.to_string(),
                "-cert",
            ])
            .arg(&self.client_tls.cert_file)
            .arg("-key")
            .arg(&self.client_tls.key_file)
            .arg("-CAfile")
            .arg(&self.client_tls.ca_file)
            .args(["-verify_return_error", "-showcerts"])
            .stdin(Stdio::null())
            .output()
            .expect("openssl (Debian's openssl package)");
        let text = String::from_utf8_lossy(&output.stdout);
        let begin = "-----BEGIN CERTIFICATE-----";
        let end = "-----END CERTIFICATE-----";
        let start = text.find(begin).unwrap_or_else(|| {
            panic!(
                "{}: no certificate from s_client:\n{text}\n{}",
                self.relays[i].name,
                String::from_utf8_lossy(&output.stderr)
            )
        });
        let stop = text[start..].find(end).unwrap() + start + end.len();
        format!("{}\n", &text[start..stop])
    }

    /// `/readyz` status, or None when nothing answers.
    pub fn readyz(&self, i: usize) -> Option<u16> {
        http_request(self.relays[i].http, "GET", "/readyz", &[], b"")
            .ok()
            .map(|(status, _)| status)
    }

    // ------------------------------------------------------------ faults

    pub fn kill9(&mut self, i: usize) {
        self.relays[i].proc.kill9();
    }

    pub fn sigstop(&self, i: usize) {
        self.relays[i].proc.signal(libc::SIGSTOP);
    }

    pub fn sigcont(&self, i: usize) {
        self.relays[i].proc.signal(libc::SIGCONT);
    }

    pub fn sigterm(&self, i: usize) {
        self.relays[i].proc.signal(libc::SIGTERM);
    }

    /// Waits for relay `i` to exit; fails the test after `timeout`.
    pub fn wait_exit(&mut self, i: usize, timeout: Duration) -> ExitStatus {
        let relay = &mut self.relays[i];
        relay.proc.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "{} did not exit within {timeout:?}; log:\n{}",
                relay.name,
                relay.proc.log_tail(60)
            )
        })
    }

    /// Removes relay `i`'s whole data dir (it must not be running).
    pub fn wipe(&mut self, i: usize) {
        let relay = &self.relays[i];
        assert!(!relay.proc.running(), "wipe {} while it runs", relay.name);
        fs::remove_dir_all(&relay.data_dir).unwrap();
    }

    /// Starts relay `i` again on its config and waits until it is ready.
    pub fn restart(&mut self, i: usize) {
        self.relays[i].proc.spawn();
        self.wait_relay_ready(i);
    }

    /// S3 stops answering (SIGSTOP: connections hang, nothing is lost from
    /// moto's in-memory store).
    pub fn s3_pause(&self) {
        self.moto.signal(libc::SIGSTOP);
    }

    pub fn s3_resume(&self) {
        self.moto.signal(libc::SIGCONT);
    }

    /// Kills moto (connections refused; its in-memory objects are gone).
    pub fn s3_kill(&mut self) {
        self.moto.kill9();
    }

    /// Starts moto again on the same port, with an empty bucket.
    pub fn s3_restart(&mut self) {
        self.moto.spawn();
        self.wait_moto();
        self.create_bucket();
    }

    pub fn etcd_pause(&self) {
        self.etcd.signal(libc::SIGSTOP);
    }

    pub fn etcd_resume(&self) {
        self.etcd.signal(libc::SIGCONT);
    }

    /// Kills etcd (connections refused).
    pub fn etcd_kill(&mut self) {
        self.etcd.kill9();
    }

    /// Starts etcd again on the same data dir and ports.
    pub fn etcd_restart(&mut self) {
        self.etcd.spawn();
        self.wait_etcd();
    }

    /// Drops all traffic between relay `i` and the other relays and etcd
    /// (nftables in its namespace; S3 and the sink stay reachable).
    pub fn partition(&self, i: usize) {
        let ns = self.relays[i]
            .netns
            .as_ref()
            .expect("partition needs Spec::netns");
        let infra = self.host(2);
        let others: Vec<String> = (0..3u8)
            .filter(|&j| j as usize != i)
            .map(|j| self.host(11 + j).to_string())
            .collect();
        let others = others.join(", ");
        Netns::nft(
            ns,
            &format!(
                "table inet partition {{\n\
                 \tchain input {{ type filter hook input priority 0; policy accept;\n\
                 \t\tip saddr {{ {others} }} drop\n\
                 \t\tip saddr {infra} tcp sport {{ {ETCD_PORT}, {ETCD_PEER_PORT} }} drop\n\t}}\n\
                 \tchain output {{ type filter hook output priority 0; policy accept;\n\
                 \t\tip daddr {{ {others} }} drop\n\
                 \t\tip daddr {infra} tcp dport {{ {ETCD_PORT}, {ETCD_PEER_PORT} }} drop\n\t}}\n}}\n"
            ),
        );
    }

    pub fn heal(&self, i: usize) {
        let ns = self.relays[i]
            .netns
            .as_ref()
            .expect("heal needs Spec::netns");
        Netns::nft(ns, "delete table inet partition\n");
    }

    // ------------------------------------------------------------ the sink

    pub fn start_sink(&mut self) {
        self.sink.spawn();
        let addr = self.sink_addr;
        self.sink.wait_ready(Duration::from_secs(30), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        });
    }

    pub fn set_sink_delay(&self, seconds: f64) {
        let tmp = self.delay_file.with_extension("tmp");
        fs::write(&tmp, seconds.to_string()).unwrap();
        fs::rename(&tmp, &self.delay_file).unwrap();
    }

    /// Every message at the sink so far, in arrival order.
    pub fn arrivals(&self) -> Vec<Arrival> {
        let mut cache = self.arrivals.lock().unwrap();
        let names = super::mail::sink_messages(&self.sink_dir);
        for name in names {
            if cache.contains_key(&name) {
                continue;
            }
            let eml = fs::read(self.sink_dir.join(&name)).unwrap();
            let json_path = self.sink_dir.join(name.replace(".eml", ".json"));
            let json: serde_json::Value =
                serde_json::from_slice(&fs::read(&json_path).unwrap()).unwrap();
            let body = after_received(&eml);
            cache.insert(
                name.clone(),
                Arrival {
                    file: name,
                    marker: marker_of(&eml),
                    sha256: sha256_hex(body),
                    helo: json["helo"].as_str().unwrap_or_default().to_owned(),
                    time: json["time"].as_f64().unwrap_or_default(),
                },
            );
        }
        let mut all: Vec<Arrival> = cache.values().cloned().collect();
        all.sort_by(|a, b| a.time.total_cmp(&b.time));
        all
    }

    /// Digest → how many times it arrived.
    pub fn sink_digests(&self) -> HashMap<String, usize> {
        let mut out = HashMap::new();
        for arrival in self.arrivals() {
            *out.entry(arrival.sha256).or_insert(0) += 1;
        }
        out
    }

    /// Marker → its arrivals.
    pub fn by_marker(&self) -> HashMap<String, Vec<Arrival>> {
        let mut out: HashMap<String, Vec<Arrival>> = HashMap::new();
        for arrival in self.arrivals() {
            if let Some(marker) = arrival.marker.clone() {
                out.entry(marker).or_default().push(arrival);
            }
        }
        out
    }

    /// Extra copies at the sink: the markers that arrived more than once, and
    /// how many times.
    pub fn duplicates(&self) -> Vec<(String, usize)> {
        let mut dups: Vec<(String, usize)> = self
            .by_marker()
            .into_iter()
            .filter(|(_, arrivals)| arrivals.len() > 1)
            .map(|(marker, arrivals)| (marker, arrivals.len()))
            .collect();
        dups.sort();
        dups
    }

    /// Waits until every message in `acked` is at the sink, unchanged (same
    /// digest); fails the test naming what is missing, with the relay log
    /// lines that mention it. Returns the number of extra copies of any
    /// message the load sent.
    pub fn assert_all_delivered(&self, acked: &[Sent], timeout: Duration) -> usize {
        let missing = |arrived: &HashMap<String, Vec<Arrival>>| -> Vec<&Sent> {
            acked
                .iter()
                .filter(|s| !arrived.contains_key(&s.marker))
                .collect()
        };
        let arrived = wait_for(timeout, || {
            let arrived = self.by_marker();
            missing(&arrived).is_empty().then_some(arrived)
        });
        let arrived = arrived.unwrap_or_else(|| {
            let arrived = self.by_marker();
            let missing = missing(&arrived);
            let mut report = format!(
                "{} of {} acknowledged messages did not reach the sink within {timeout:?}:\n",
                missing.len(),
                acked.len()
            );
            for sent in missing.iter().take(10) {
                report += &format!(
                    "  {} accepted by {} as {} at {:.3}\n",
                    sent.marker,
                    NAMES[sent.relay],
                    sent.id().unwrap_or("?"),
                    sent.reply_at
                );
            }
            for sent in missing.iter().take(3) {
                let id = sent.id().unwrap_or("?");
                report += &format!("relay log lines naming {id}:\n");
                for relay in &self.relays {
                    for line in relay.proc.log().lines().filter(|l| l.contains(id)) {
                        report += &format!("  [{}] {line}\n", relay.name);
                    }
                }
            }
            panic!("{report}");
        });
        for sent in acked {
            for arrival in &arrived[&sent.marker] {
                assert_eq!(
                    arrival.sha256, sent.sha256,
                    "{} ({} at {}) arrived changed: sink file {}",
                    sent.marker, NAMES[sent.relay], sent.reply_at, arrival.file
                );
            }
        }
        arrived.values().map(|a| a.len() - 1).sum()
    }

    // ------------------------------------------------------------ S3

    /// Every key in the bucket (ListObjectsV2, all pages).
    pub fn s3_keys(&self) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/{BUCKET}?list-type=2");
            if let Some(token) = &token {
                path += &format!("&continuation-token={}", percent_encode(token));
            }
            // moto answers 500 now and then while it is deleting under load:
            // a listing is retried a few times before it counts as a failure.
            let (mut status, mut body) = (0, Vec::new());
            for _ in 0..5 {
                (status, body) = http_request(self.moto_addr, "GET", &path, &[], b"").unwrap();
                if status == 200 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            let body = String::from_utf8_lossy(&body).into_owned();
            assert_eq!(status, 200, "list bucket: {body}");
            keys.extend(xml_values(&body, "Key"));
            token = xml_values(&body, "NextContinuationToken")
                .into_iter()
                .next();
            if token.is_none() || !body.contains("<IsTruncated>true</IsTruncated>") {
                return keys;
            }
        }
    }

    /// Ids of the messages the segment objects in the bucket hold.
    pub fn s3_messages(&self) -> std::collections::BTreeSet<String> {
        self.s3_keys()
            .iter()
            .filter(|key| key.ends_with(".seg"))
            // Deleted between the listing and the GET: holds nothing.
            .filter_map(|key| super::s3_get(self.moto_addr, BUCKET, key))
            .flat_map(|object| super::segment_messages(&object))
            .map(|(id, _, _)| id)
            .collect()
    }

    // ------------------------------------------------------------ load

    /// Starts `sessions` concurrent SMTP sessions, assigned round-robin to
    /// `targets` (relay indexes), each sending messages back to back until
    /// [`Load::stop`]. A session whose relay is gone keeps trying to connect.
    pub fn load(&self, tag: &str, targets: &[usize], sessions: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let record = Arc::new(Mutex::new(Vec::new()));
        let events = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..sessions)
            .map(|session| {
                let relay = targets[session % targets.len()];
                let addr = self.relays[relay].smtp;
                let (stop, record, events) = (stop.clone(), record.clone(), events.clone());
                let tag = format!("{tag}-s{session}");
                std::thread::spawn(move || {
                    run_session(addr, relay, &tag, &stop, &record, &events);
                })
            })
            .collect();
        Load {
            stop,
            record,
            events,
            threads,
        }
    }

    /// The tail of every process's log, for a failing test.
    fn print_logs(&self) {
        for relay in &self.relays {
            eprintln!(
                "---- {} log ({}), last 120 lines:\n{}",
                relay.name,
                relay.proc.log_path.display(),
                relay.proc.log_tail(120)
            );
        }
        for proc in [&self.etcd, &self.moto, &self.sink] {
            eprintln!(
                "---- {} log, last 15 lines:\n{}",
                proc.name,
                proc.log_tail(15)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for relay in &mut self.relays {
            relay.proc.kill9();
        }
        self.sink.kill9();
        self.moto.kill9();
        self.etcd.kill9();
        if std::thread::panicking() {
            self.print_logs();
            if let Some(work) = self.work.take() {
                eprintln!("---- cluster files kept in {}", work.keep().display());
            }
        }
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn xml_values(body: &str, tag: &str) -> Vec<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    body.split(&open)
        .skip(1)
        .filter_map(|rest| rest.split_once(&close).map(|(v, _)| v.to_owned()))
        .collect()
}

/// The message after the first header field when that is `Received:` (the
/// delivering relay's trace header), else all of it.
fn after_received(eml: &[u8]) -> &[u8] {
    if !eml.starts_with(b"Received:") {
        return eml;
    }
    let mut pos = 0;
    loop {
        let Some(end) = find(&eml[pos..], b"\r\n").map(|i| pos + i + 2) else {
            return eml;
        };
        match eml.get(end) {
            Some(b' ' | b'\t') => pos = end,
            _ => return &eml[end..],
        }
    }
}

fn marker_of(eml: &[u8]) -> Option<String> {
    let start = find(eml, b"\r\nX-Marker: ")? + b"\r\nX-Marker: ".len();
    let len = find(&eml[start..], b"\r\n")?;
    Some(String::from_utf8_lossy(&eml[start..start + len]).into_owned())
}

// ---------------------------------------------------------------- load

/// How one transaction ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 250 to the end of data, with the spool id.
    Acked(String),
    /// A reply other than the expected one, at any step.
    Refused(Reply),
    /// The connection failed (EOF, reset, timeout) with no reply; `after_data`
    /// when the whole message had been sent (the relay may have committed it).
    NoReply { after_data: bool, error: String },
}

/// One transaction the load attempted.
#[derive(Clone, Debug)]
pub struct Sent {
    pub marker: String,
    /// SHA-256 of the message data as sent (what the sink must get after the
    /// relay's `Received:`).
    pub sha256: String,
    pub relay: usize,
    /// When MAIL was sent, when the final `.` was sent (0 if not reached) and
    /// when the outcome was known (Unix seconds).
    pub started: f64,
    pub data_end: f64,
    pub reply_at: f64,
    pub outcome: Outcome,
}

impl Sent {
    pub fn acked(&self) -> bool {
        matches!(self.outcome, Outcome::Acked(_))
    }

    pub fn id(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Acked(id) => Some(id),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<u16> {
        match &self.outcome {
            Outcome::Acked(_) => Some(250),
            Outcome::Refused(reply) => Some(reply.code),
            Outcome::NoReply { .. } => None,
        }
    }
}

/// Something a session saw outside a transaction.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    /// TCP connect failed (nothing listening, or a timeout).
    ConnectFailed {
        relay: usize,
        at: f64,
        error: String,
    },
    /// A greeting other than 220 (421 while draining).
    Greeting { relay: usize, at: f64, reply: Reply },
    /// The connection closed or failed before a greeting or EHLO reply.
    Dropped {
        relay: usize,
        at: f64,
        error: String,
    },
}

/// Running sessions; [`Load::stop`] ends them.
pub struct Load {
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Vec<Sent>>>,
    events: Arc<Mutex<Vec<SessionEvent>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// Transactions finished so far.
    pub fn sent(&self) -> Vec<Sent> {
        self.record.lock().unwrap().clone()
    }

    /// Messages acknowledged so far.
    pub fn acked(&self) -> Vec<Sent> {
        self.sent().into_iter().filter(Sent::acked).collect()
    }

    /// Stops every session after its current transaction; returns everything.
    pub fn stop(mut self) -> LoadResult {
        self.stop.store(true, Ordering::SeqCst);
        for thread in std::mem::take(&mut self.threads) {
            thread.join().expect("a load session panicked");
        }
        let sent = std::mem::take(&mut *self.record.lock().unwrap());
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        LoadResult { sent, events }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

pub struct LoadResult {
    pub sent: Vec<Sent>,
    pub events: Vec<SessionEvent>,
}

impl LoadResult {
    pub fn acked(&self) -> Vec<Sent> {
        self.sent.iter().filter(|s| s.acked()).cloned().collect()
    }

    pub fn acked_by(&self, relay: usize) -> Vec<Sent> {
        self.sent
            .iter()
            .filter(|s| s.acked() && s.relay == relay)
            .cloned()
            .collect()
    }

    /// Transactions whose whole message was sent but got no reply.
    pub fn unanswered(&self, relay: usize) -> Vec<Sent> {
        self.sent
            .iter()
            .filter(|s| {
                s.relay == relay
                    && matches!(
                        s.outcome,
                        Outcome::NoReply {
                            after_data: true,
                            ..
                        }
                    )
            })
            .cloned()
            .collect()
    }

    /// Counts of outcomes, for messages: "250: 120, 451: 3, no reply: 1".
    pub fn summary(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for sent in &self.sent {
            let key = match &sent.outcome {
                Outcome::Acked(_) => "250".to_owned(),
                Outcome::Refused(reply) => reply.code.to_string(),
                Outcome::NoReply { after_data, .. } => {
                    format!("no reply{}", if *after_data { " after data" } else { "" })
                }
            };
            *counts
                .entry(format!("{} {key}", NAMES[sent.relay]))
                .or_insert(0) += 1;
        }
        let mut events: BTreeMap<String, usize> = BTreeMap::new();
        for event in &self.events {
            let key = match event {
                SessionEvent::ConnectFailed { relay, .. } => {
                    format!("{} connect failed", NAMES[*relay])
                }
                SessionEvent::Greeting { relay, reply, .. } => {
                    format!("{} greeting {}", NAMES[*relay], reply.code)
                }
                SessionEvent::Dropped { relay, .. } => format!("{} dropped", NAMES[*relay]),
            };
            *events.entry(key).or_insert(0) += 1;
        }
        format!("transactions {counts:?}; sessions {events:?}")
    }
}

/// Message data (CRLF, ends with CRLF; no line starts with a dot except one
/// that tests dot-stuffing) of about 2 KiB with `marker` in it.
pub fn message_data(marker: &str) -> Vec<u8> {
    let mut data = format!(
        "From: <load@origin.test>\r\nTo: <rcpt@example.test>\r\nSubject: cluster test {marker}\r\n\
         Message-ID: <{marker}@origin.test>\r\nX-Marker: {marker}\r\n\r\n"
    )
    .into_bytes();
    let mut line = sha256_hex(marker.as_bytes());
    for i in 0..28 {
        line = sha256_hex(line.as_bytes());
        data.extend_from_slice(format!("{i:02} {line} {marker}\r\n").as_bytes());
    }
    data.extend_from_slice(b".a line that starts with a dot\r\nend\r\n");
    data
}

struct Client {
    reader: BufReader<TcpStream>,
    stream: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(15)))?;
        stream.set_write_timeout(Some(Duration::from_secs(15)))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            reader: BufReader::new(stream.try_clone()?),
            stream,
        })
    }

    fn reply(&mut self) -> std::io::Result<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = Vec::new();
            if self.reader.read_until(b'\n', &mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
            let line = String::from_utf8_lossy(&line)
                .trim_end_matches(['\r', '\n'])
                .to_owned();
            let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad reply {line:?}"),
                )
            })?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return Ok(Reply { code, lines });
            }
        }
    }

    fn cmd(&mut self, line: &str) -> std::io::Result<Reply> {
        self.stream.write_all(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }
}

fn run_session(
    addr: SocketAddr,
    relay: usize,
    tag: &str,
    stop: &AtomicBool,
    record: &Mutex<Vec<Sent>>,
    events: &Mutex<Vec<SessionEvent>>,
) {
    let mut seq = 0usize;
    let event = |e: SessionEvent| events.lock().unwrap().push(e);
    while !stop.load(Ordering::SeqCst) {
        let mut client = match Client::connect(addr) {
            Ok(client) => client,
            Err(err) => {
                event(SessionEvent::ConnectFailed {
                    relay,
                    at: now(),
                    error: err.to_string(),
                });
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match client.reply() {
            Ok(reply) if reply.code == 220 => {}
            Ok(reply) => {
                event(SessionEvent::Greeting {
                    relay,
                    at: now(),
                    reply,
                });
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(err) => {
                event(SessionEvent::Dropped {
                    relay,
                    at: now(),
                    error: format!("greeting: {err}"),
                });
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        match client.cmd("EHLO load.test") {
            Ok(reply) if reply.code == 250 => {}
            Ok(reply) => {
                event(SessionEvent::Greeting {
                    relay,
                    at: now(),
                    reply,
                });
                continue;
            }
            Err(err) => {
                event(SessionEvent::Dropped {
                    relay,
                    at: now(),
                    error: format!("EHLO: {err}"),
                });
                continue;
            }
        }
        // Transactions until stopped, the relay refuses, or the connection fails.
        while !stop.load(Ordering::SeqCst) {
            seq += 1;
            let marker = format!("{tag}-n{seq}");
            let data = message_data(&marker);
            let mut sent = Sent {
                marker: marker.clone(),
                sha256: sha256_hex(&data),
                relay,
                started: now(),
                data_end: 0.0,
                reply_at: 0.0,
                outcome: Outcome::NoReply {
                    after_data: false,
                    error: String::new(),
                },
            };
            let outcome = transaction(&mut client, tag, &data, &mut sent.data_end);
            sent.reply_at = now();
            sent.outcome = outcome;
            let go_on = sent.acked();
            record.lock().unwrap().push(sent);
            if !go_on {
                break;
            }
        }
        let _ = client.cmd("QUIT");
    }
}

fn transaction(client: &mut Client, tag: &str, data: &[u8], data_end: &mut f64) -> Outcome {
    let no_reply = |after_data: bool, err: std::io::Error| Outcome::NoReply {
        after_data,
        error: err.to_string(),
    };
    for (line, code) in [
        ("MAIL FROM:<load@origin.test>".to_owned(), 250),
        (format!("RCPT TO:<{tag}@example.test>"), 250),
        ("DATA".to_owned(), 354),
    ] {
        match client.cmd(&line) {
            Ok(reply) if reply.code == code => {}
            Ok(reply) => return Outcome::Refused(reply),
            Err(err) => return no_reply(false, err),
        }
    }
    let mut wire = super::dot_stuff(data);
    wire.extend_from_slice(b".\r\n");
    if let Err(err) = client.stream.write_all(&wire) {
        return no_reply(false, err);
    }
    *data_end = now();
    match client.reply() {
        Ok(reply) if reply.code == 250 => match super::queued_id(&reply.text()) {
            Some(id) => Outcome::Acked(id),
            None => Outcome::Refused(reply),
        },
        Ok(reply) => Outcome::Refused(reply),
        Err(err) => no_reply(true, err),
    }
}
