//! Typed configuration: one TOML file, unknown keys rejected, every field documented.
//!
//! Every section has named defaults so an empty file (or no file at all) is the
//! embedded single-machine default: SMTP on 127.0.0.1:2525, data under
//! `./postern-data`, local spool plus an object-store copy in a local directory,
//! health on 127.0.0.1:9325, loopback trusted, nothing else relayed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::cluster::etcd::{EtcdIdentity, EtcdOptions, EtcdTls, EtcdUser};

/// How long a client waits for the end-of-data reply (RFC 5321 §4.5.3.2.6).
pub const CLIENT_END_OF_DATA_WAIT: Duration = Duration::from_secs(600);

/// Longest one scanner or one early delivery may hold the end-of-data reply.
pub const MAX_END_OF_DATA_WORK: Duration = Duration::from_secs(300);

/// The whole relay configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name this relay uses in its greeting, EHLO reply and `Received:` header.
    /// Default: the machine's host name.
    pub hostname: String,
    /// Directory holding the spool, the local object store and the admin socket.
    pub data_dir: PathBuf,
    /// SMTP listeners. Default: one plain listener on 127.0.0.1:2525.
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Protocol limits (RFC 5321 §4.5.3) and timeouts.
    pub limits: LimitsConfig,
    /// Who may relay through this server.
    pub policy: PolicyConfig,
    /// How fast one client may send (`[rate_limits]`).
    pub rate_limits: RateLimitsConfig,
    /// Where copies go and how many must confirm before 250.
    pub spool: SpoolConfig,
    /// The object-store copy.
    pub object_store: ObjectStoreConfig,
    /// Health endpoints.
    pub http: HttpConfig,
    /// Outbound delivery: scheduler, retries, timeouts.
    pub delivery: DeliveryConfig,
    /// DNS for MX lookups.
    pub dns: DnsConfig,
    /// Static routes: domains to next hops; everything else goes by MX
    /// (or to `delivery.relayhost`).
    #[serde(rename = "route")]
    pub routes: Vec<RouteConfig>,
    /// The admin gRPC service (`postern queue ...`).
    pub admin: AdminConfig,
    /// Cluster membership, peer replication and takeover; absent on one machine.
    pub cluster: Option<ClusterConfig>,
    /// Local submission (`postern sendmail`) over a Unix socket.
    pub submission: SubmissionConfig,
    /// Password authentication for `submission`/`submissions` listeners.
    pub auth: AuthConfig,
    /// DKIM keys: outgoing mail from a domain with a key is signed.
    #[serde(rename = "dkim", skip_serializing_if = "Vec::is_empty")]
    pub dkim: Vec<DkimConfig>,
    /// Content scanners that listeners name in `scanners`.
    #[serde(rename = "scanner", skip_serializing_if = "Vec::is_empty")]
    pub scanners: Vec<ScannerConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            hostname: default_hostname(),
            data_dir: PathBuf::from("./postern-data"),
            listeners: vec![ListenerConfig::default()],
            limits: LimitsConfig::default(),
            policy: PolicyConfig::default(),
            rate_limits: RateLimitsConfig::default(),
            spool: SpoolConfig::default(),
            object_store: ObjectStoreConfig::default(),
            http: HttpConfig::default(),
            delivery: DeliveryConfig::default(),
            dns: DnsConfig::default(),
            routes: Vec::new(),
            admin: AdminConfig::default(),
            cluster: None,
            submission: SubmissionConfig::default(),
            auth: AuthConfig::default(),
            dkim: Vec::new(),
            scanners: Vec::new(),
        }
    }
}

/// `[rate_limits]`: how fast one client may send, per client address (an
/// IPv6 client by its /64) or local user, across this relay's listeners.
/// Each is `"COUNT/PERIOD"` (`"120/1m"`): up to COUNT at once, then one
/// more each PERIOD/COUNT. Off unless set (as Postfix's anvil rates);
/// clients in `policy.trusted_networks` are not limited unless
/// `limit_trusted`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// New connections; over it the client hears `421 4.7.0` and is
    /// disconnected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<Rate>,
    /// Transactions (MAIL commands accepted); over it, `450 4.7.1`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub messages: Option<Rate>,
    /// Recipients accepted; over it, `450 4.7.1` for the recipient.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Rate>,
    /// Limit trusted networks too.
    pub limit_trusted: bool,
}

/// A rate: `count` per `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// How many.
    pub count: std::num::NonZeroU32,
    /// Per how long.
    pub period: Duration,
}

impl std::str::FromStr for Rate {
    type Err = String;

    fn from_str(text: &str) -> Result<Rate, String> {
        let (count, period) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not COUNT/PERIOD, e.g. \"120/1m\""))?;
        let count: std::num::NonZeroU32 = count
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: the count must be a positive whole number"))?;
        let period = humantime::parse_duration(period.trim())
            .map_err(|err| format!("{text:?}: the period: {err}"))?;
        if period.is_zero() {
            return Err(format!("{text:?}: the period must be longer than zero"));
        }
        Ok(Rate { count, period })
    }
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}",
            self.count,
            humantime::format_duration(self.period)
        )
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Rate, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One SMTP listener.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerConfig {
    /// Name used in logs and in the envelope (`listener`).
    pub name: String,
    /// Address and port to bind.
    pub address: SocketAddr,
    /// PEM certificate chain; STARTTLS is offered when this and `tls_key` are set.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Names of `[[scanner]]`s run, in order, on every message before the reply.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scanners: Vec<String>,
    /// What the listener is for: relaying (`smtp`, the default) or
    /// authenticated submission (`submission`, `submissions`).
    #[serde(skip_serializing_if = "ListenerMode::is_smtp")]
    pub mode: ListenerMode,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        ListenerConfig {
            name: "smtp".into(),
            address: SocketAddr::from(([127, 0, 0, 1], 2525)),
            tls_cert: None,
            tls_key: None,
            scanners: Vec::new(),
            mode: ListenerMode::Smtp,
        }
    }
}

/// What a listener is for.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Relaying (port 25): the relay policy decides; STARTTLS offered when
    /// a certificate is set; no AUTH.
    #[default]
    Smtp,
    /// Message submission (port 587, RFC 6409): STARTTLS, then AUTH PLAIN or
    /// LOGIN, are required before MAIL; a user relays anywhere, only from
    /// its own addresses (`[auth.senders]`).
    Submission,
    /// Submission over implicit TLS (port 465, RFC 8314): TLS from the first
    /// octet, then AUTH as for `submission`.
    Submissions,
}

impl ListenerMode {
    /// Whether this is the relaying default.
    pub fn is_smtp(&self) -> bool {
        *self == ListenerMode::Smtp
    }

    /// Whether clients must authenticate with a password.
    pub fn is_submission(self) -> bool {
        self != ListenerMode::Smtp
    }
}

/// `[[dkim]]`: one signing key. Mail the relay accepts from its own users —
/// authenticated sessions, local submission and `policy.trusted_networks`
/// — whose `From:` address is at `domain` (or a subdomain of it) is signed
/// with it once, at the end of data; the signature goes out before the
/// message like a scanner's headers, and the spooled message is never
/// changed. Two entries for one domain (RSA and Ed25519) sign twice.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    /// The signing domain (`d=`).
    pub domain: String,
    /// The selector (`s=`): the key is published at
    /// `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// PEM private key: RSA (PKCS#1 or PKCS#8, 2048 bits or more) or
    /// Ed25519 (PKCS#8), as `openssl genpkey` writes them.
    pub key_file: PathBuf,
    /// Header fields signed, when present. Default: the ones a reader sees
    /// and a forwarder should not change (RFC 6376 §5.4.1).
    #[serde(default = "default_dkim_headers")]
    pub headers: Vec<String>,
}

/// RFC 6376 §5.4.1's recommendation, plus the MIME and list fields.
pub fn default_dkim_headers() -> Vec<String> {
    [
        "From",
        "Reply-To",
        "Subject",
        "Date",
        "To",
        "Cc",
        "Resent-Date",
        "Resent-From",
        "Resent-To",
        "Resent-Cc",
        "In-Reply-To",
        "References",
        "Message-ID",
        "MIME-Version",
        "Content-Type",
        "Content-Transfer-Encoding",
        "List-Id",
        "List-Help",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "List-Subscribe",
        "List-Post",
        "List-Owner",
        "List-Archive",
    ]
    .map(String::from)
    .to_vec()
}

/// `[auth]`: how `submission`/`submissions` listeners check passwords, which
/// senders each user may use, and how failed attempts are slowed down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A file of `user:hash` lines, crypt-style hashes only: argon2id
    /// (`$argon2id$`), bcrypt (`$2b$`, `$2y$`, `$2a$`) or SHA-512-crypt
    /// (`$6$`). A plaintext or unknown hash refuses to load. Re-read when it
    /// changes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Dovecot's authentication service (what Postfix's `smtpd_sasl_type =
    /// dovecot` talks to): a Unix socket path (`/run/dovecot/auth-client`)
    /// or `host:port` of an `inet_listener`. Instead of `password_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dovecot: Option<String>,
    /// How long to wait for Dovecot's answer before a 454 4.7.0.
    #[serde(with = "humantime_serde")]
    pub dovecot_timeout: Duration,
    /// Which envelope senders each user may use, as Postfix's
    /// `reject_sender_login_mismatch`: user → addresses, `@domain` for any
    /// address at a domain, `<>` for the null sender. A user not listed may
    /// use its own login when that is an address, and nothing else.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub senders: std::collections::BTreeMap<String, Vec<String>>,
    /// Failed attempts from one client address, or for one user, within
    /// `failure_window` before it is refused with 421 4.7.0 for the rest of
    /// the window.
    pub max_failures: u32,
    /// The window failures are counted in.
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// Delay before the first `535`; each further failure in the window
    /// doubles it, up to `max_failure_delay`.
    #[serde(with = "humantime_serde")]
    pub failure_delay: Duration,
    /// Longest delay before a `535`.
    #[serde(with = "humantime_serde")]
    pub max_failure_delay: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            password_file: None,
            dovecot: None,
            dovecot_timeout: Duration::from_secs(10),
            senders: std::collections::BTreeMap::new(),
            max_failures: 10,
            failure_window: Duration::from_secs(15 * 60),
            failure_delay: Duration::from_secs(1),
            max_failure_delay: Duration::from_secs(16),
        }
    }
}

/// Limits from RFC 5321 §4.5.3 and connection limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest message accepted, in octets, as counted on the wire after our
    /// `Received:` header is left out. Advertised in EHLO's SIZE.
    pub max_message_size: u64,
    /// Most recipients in one transaction (RFC 5321 asks for at least 100).
    pub max_recipients: usize,
    /// Longest text line in message data, CRLF included (RFC 5321: 1000).
    pub max_line_length: usize,
    /// Protocol errors tolerated in one session before it is closed.
    pub max_errors: u32,
    /// Concurrent connections over all listeners.
    pub max_connections: usize,
    /// Concurrent connections from one client IP address (and from one local
    /// user on the submission socket).
    pub max_connections_per_ip: usize,
    /// How long a whole command may take to arrive (RFC 5321 §4.5.3.2.7: 5
    /// minutes). Measured from the last reply, not from the last read: a
    /// client trickling a byte at a time cannot extend it.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long each line's worth of message data (`max_line_length`
    /// octets) may take to arrive (RFC 5321 §4.5.3.2.5: 3 minutes), however
    /// it is split into reads.
    #[serde(with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Pause before the greeting; a client that talks first is refused (554).
    /// Zero only refuses bytes already waiting when the greeting is sent.
    #[serde(with = "humantime_serde")]
    pub greet_pause: Duration,
    /// After a shutdown signal, how long the listeners stay open answering
    /// new connections with `421 4.3.2` even when no session is left, so
    /// clients that a load balancer or kube-proxy still sends here (until
    /// readiness has propagated) hear 421 instead of a refused connection.
    /// The operator sets a few seconds; zero closes as soon as the sessions end.
    #[serde(with = "humantime_serde")]
    pub shutdown_linger: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 1000,
            max_line_length: 1000,
            max_errors: 20,
            max_connections: 1000,
            max_connections_per_ip: 50,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            greet_pause: Duration::ZERO,
            shutdown_linger: Duration::ZERO,
        }
    }
}

/// Relay policy: recipients are accepted only for `relay_domains`, or from
/// `trusted_networks`; everything else gets 554 5.7.1 (no open relay).
/// Mail for this relay's own postmaster is the exception (see `postmaster`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Domains we accept mail for from anyone (compared case-insensitively).
    /// `postmaster@` one of them is relayed like any other address there.
    pub relay_domains: Vec<String>,
    /// Client networks allowed to relay to any domain. Default: loopback only.
    pub trusted_networks: Vec<IpNet>,
    /// The mailbox (`local@domain`) that receives mail for this relay's own
    /// postmaster: `RCPT TO:<postmaster>` (no domain) and
    /// `postmaster@<hostname>`, which RFC 5321 §4.5.1 requires a relay to
    /// accept from anyone. A relay has no mailboxes of its own, so the
    /// envelope recipient becomes this address (the message is not changed)
    /// and the address the client gave is kept as the recipient's ORCPT
    /// (RFC 3461) unless the client sent one. Unset (the default), such
    /// recipients get `550 5.1.1` saying so, and `postern config check` warns.
    pub postmaster: Option<String>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            relay_domains: Vec::new(),
            trusted_networks: vec![
                "127.0.0.0/8".parse().expect("valid network"),
                "::1/128".parse().expect("valid network"),
            ],
            postmaster: None,
        }
    }
}

/// A kind of durable copy the quorum writer can make.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum CopyKind {
    /// The fsync'd local-disk spool under `data_dir/spool`.
    Local,
    /// The object store (`[object_store]`).
    ObjectStore,
    /// A peer relay's replica (`[cluster]`, `cluster.replicas` of them).
    Peer,
}

/// How the local spool makes a commit durable. (Peer replicas always use
/// `syncfs` rounds of the data directory's filesystem.)
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// One `syncfs(2)` of the spool's filesystem per round of commits (group
    /// commit). Fastest when `data_dir` is a filesystem of its own (a
    /// Kubernetes volume); on a filesystem shared with heavy writers each
    /// round also waits for their data.
    #[default]
    Filesystem,
    /// `fdatasync` of each message's files and a group-committed directory
    /// fsync: costs do not depend on anyone else's writes.
    Files,
}

/// The ack policy: which copies are written and how many must confirm before 250.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Copies written for every message, in parallel.
    pub copies: Vec<CopyKind>,
    /// How many of `copies` must confirm (fsync'd) before the client gets 250.
    pub required: usize,
    /// How long end-of-data may wait for the quorum before answering 451 4.3.0.
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Free space the spool disk must keep beyond a message before it is taken
    /// (452 4.3.1 otherwise).
    pub reserve_bytes: u64,
    /// How a local commit is made durable (`filesystem` or `files`).
    pub sync: SyncMode,
    /// How long a batch of object-store copies stays open after its first
    /// message before it goes up as one segment object; unset: 50 ms when
    /// every copy must confirm (the 250 waits for it), else 200 ms.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub segment_window: Option<Duration>,
    /// Size at which a batch of object-store copies goes up at once.
    pub segment_bytes: u64,
    /// Age after which a segment whose live messages hold less than half its
    /// bytes has them copied into a new segment, so it can go.
    #[serde(with = "humantime_serde")]
    pub segment_forward_after: Duration,
    /// Finished message files kept in `spool/free/` for new messages to
    /// overwrite instead of creating and unlinking a file per message (at
    /// most 8 MiB of them, files up to 1 MiB); 0 unlinks every finished file.
    pub free_files: usize,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            copies: vec![CopyKind::Local],
            required: 1,
            deadline: Duration::from_secs(30),
            reserve_bytes: 16 * 1024 * 1024,
            sync: SyncMode::Filesystem,
            segment_window: None,
            segment_bytes: 4 * 1024 * 1024,
            segment_forward_after: Duration::from_secs(3600),
            free_files: crate::spool::free_files::MAX_FILES,
        }
    }
}

/// The object-store backend.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, tag = "kind", rename_all = "snake_case")]
pub enum ObjectStoreConfig {
    /// A directory on a local filesystem (the single-machine default).
    Local {
        /// Directory; default `data_dir/objects`.
        #[serde(default)]
        path: Option<PathBuf>,
    },
    /// An S3-compatible service.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix under which messages are stored.
        #[serde(default)]
        prefix: String,
        /// Endpoint URL (for MinIO, moto, Ceph…); AWS when absent.
        #[serde(default)]
        endpoint: Option<String>,
        /// Region; default `us-east-1`.
        #[serde(default = "default_region")]
        region: String,
        /// Access key id; taken from `AWS_ACCESS_KEY_ID` when absent.
        #[serde(default)]
        access_key_id: Option<String>,
        /// Secret key; taken from `AWS_SECRET_ACCESS_KEY` when absent.
        #[serde(default)]
        secret_access_key: Option<String>,
        /// Allow a plain-HTTP endpoint (test servers).
        #[serde(default)]
        allow_http: bool,
    },
}

impl Default for ObjectStoreConfig {
    fn default() -> Self {
        ObjectStoreConfig::Local { path: None }
    }
}

fn default_region() -> String {
    "us-east-1".into()
}

/// The HTTP endpoint for `/healthz` and `/readyz`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to bind.
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9325)),
        }
    }
}

/// The admin gRPC service. It always listens on the Unix socket
/// `<data_dir>/admin.sock`, where each request is authorized from the
/// caller's kernel-reported credentials (root, the relay's user, members of
/// `group`); `listen` adds a TCP listener: with `tls`, mutual TLS (a client
/// certificate from its CA is the authorization); without it,
/// unauthenticated, which only a loopback address may be.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// TCP address for the admin service as well; none by default.
    pub listen: Option<SocketAddr>,
    /// A group whose members may manage the queue over the Unix socket.
    pub group: Option<String>,
    /// Mutual TLS on `listen`: the service's certificate and key, and the
    /// CA whose certificates clients must present. `postern queue --config`
    /// presents `cert_file` and `key_file` as its own.
    pub tls: Option<MutualTlsFiles>,
}

/// A relay's part in a cluster (DESIGN.md §3): its name, etcd, its peers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This relay's member name, unique in the cluster (`[A-Za-z0-9._-]`).
    /// Default: the machine's host name (a pod's name in Kubernetes), not
    /// `hostname`, which relays of one cluster often share.
    pub name: Option<String>,
    /// etcd endpoints, e.g. `["http://127.0.0.1:2379"]`; `https://` ones
    /// need `etcd_ca`.
    pub etcd: Vec<String>,
    /// PEM file of the CA certificate(s) that signed etcd's server
    /// certificate. Required with `https://` endpoints and only allowed with
    /// them: nothing else is trusted (no system roots), and the endpoint's
    /// host (name or IP address) must be in etcd's certificate.
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate (chain) presented to etcd, for an etcd started
    /// with `--client-cert-auth`; set with `etcd_key`, needs `etcd_ca`.
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key of `etcd_cert` (PKCS#8, PKCS#1 or SEC1).
    pub etcd_key: Option<PathBuf>,
    /// etcd user to authenticate as (etcd's `auth enable`); set with
    /// `etcd_password_file`. Its roles must grant read and write on `prefix`.
    pub etcd_user: Option<String>,
    /// File holding the etcd user's name, instead of `etcd_user` (a mounted
    /// Secret key); surrounding whitespace is ignored.
    pub etcd_user_file: Option<PathBuf>,
    /// File holding the etcd user's password; one trailing newline is
    /// ignored. There is deliberately no way to write the password into this
    /// TOML, and it is never logged.
    pub etcd_password_file: Option<PathBuf>,
    /// Key prefix in etcd, so clusters can share one etcd.
    pub prefix: String,
    /// The membership lease's TTL: how long a dead relay keeps its spool.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Address the peer service (replicas, takeover reads, cluster admin) binds.
    pub peer_listen: SocketAddr,
    /// `host:port` peers reach this relay's peer service at. Default:
    /// `peer_listen`, or `<machine host name>:<port>` when that is a wildcard
    /// address (a pod's name resolves to its own IP inside the pod).
    pub advertise: Option<String>,
    /// Peer services as `host:port`; DNS names (a headless Service) are
    /// resolved again for every use and may stand for several relays. This
    /// relay's own address is skipped.
    pub peers: Vec<String>,
    /// Shared secret every peer request carries.
    pub secret: Option<String>,
    /// File holding the shared secret (instead of `secret`).
    pub secret_file: Option<PathBuf>,
    /// Peer replicas written per message when `spool.copies` has `"peer"`.
    pub replicas: usize,
    /// How often the repair task re-creates copies that are missing.
    #[serde(with = "humantime_serde")]
    pub repair_interval: Duration,
    /// Mutual TLS on the peer channel; without it the channel is
    /// plaintext h2c, readable by anything on the network between relays.
    pub tls: Option<MutualTlsFiles>,
}

/// `[cluster.tls]` and `[admin.tls]`: this relay's certificate and key, and
/// the CA the other end's certificate must come from (PEM files; in
/// Kubernetes a Secret's `tls.crt`, `tls.key` and `ca.crt`, as cert-manager
/// writes them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTlsFiles {
    /// This relay's certificate chain.
    pub cert_file: PathBuf,
    /// Its private key.
    pub key_file: PathBuf,
    /// The CA certificates the other end's certificate must come from.
    pub ca_file: PathBuf,
    /// A DNS name every member's certificate must be valid for (the peer
    /// Service's, `mx-peers.mail.svc`, or a wildcard's parent), checked
    /// both ways: a certificate the same CA issued for another name —
    /// another cluster's relays, another service — is refused. Unset:
    /// every certificate of the CA is a member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_name: Option<String>,
}

impl MutualTlsFiles {
    /// Reads the three files, naming one that is missing or holds nothing
    /// usable.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(name) = &self.member_name {
            if rustls_pki_types::DnsName::try_from(name.as_str()).is_err() {
                return Err(ConfigError::Invalid(format!(
                    "tls.member_name {name:?} is not a DNS name"
                )));
            }
        }
        read_pem(&self.cert_file, Pem::Certificates)?;
        read_pem(&self.key_file, Pem::PrivateKey)?;
        read_pem(&self.ca_file, Pem::Certificates)?;
        Ok(())
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            name: None,
            etcd: Vec::new(),
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_user: None,
            etcd_user_file: None,
            etcd_password_file: None,
            prefix: "/postern".into(),
            lease_ttl: Duration::from_secs(10),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 9327)),
            advertise: None,
            peers: Vec::new(),
            secret: None,
            secret_file: None,
            replicas: 1,
            repair_interval: Duration::from_secs(30),
            tls: None,
        }
    }
}

impl ClusterConfig {
    /// The member name.
    pub fn member_name(&self) -> String {
        self.name.clone().unwrap_or_else(default_hostname)
    }

    /// The address peers reach this relay at.
    pub fn advertised(&self) -> String {
        match &self.advertise {
            Some(advertise) => advertise.clone(),
            None if self.peer_listen.ip().is_unspecified() => {
                format!("{}:{}", default_hostname(), self.peer_listen.port())
            }
            None => self.peer_listen.to_string(),
        }
    }

    /// The shared secret, read from `secret_file` when set.
    pub fn shared_secret(&self) -> Result<String, ConfigError> {
        if let Some(secret) = &self.secret {
            return Ok(secret.clone());
        }
        let path = self.secret_file.as_ref().ok_or_else(|| {
            ConfigError::Invalid("cluster.secret or secret_file is required".into())
        })?;
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.clone(),
            source,
        })?;
        let secret = text.trim().to_owned();
        if secret.len() < 16 {
            return Err(ConfigError::Invalid(format!(
                "{}: the cluster secret must be at least 16 characters",
                path.display()
            )));
        }
        Ok(secret)
    }

    /// How to reach etcd: the endpoints and prefix, and the TLS material and
    /// credentials read from their files now. Fails naming a file that cannot
    /// be read or holds nothing usable. The files are read when the relay
    /// starts: replacing them (a renewed certificate, a new password) takes a
    /// restart.
    pub fn etcd_options(&self) -> Result<EtcdOptions, ConfigError> {
        let mut options = EtcdOptions::new(self.etcd.clone(), self.prefix.clone());
        let ca = self
            .etcd_ca
            .as_deref()
            .map(|ca| read_pem(ca, Pem::Certificates))
            .transpose()?;
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some(EtcdIdentity {
                cert: read_pem(cert, Pem::Certificates)?,
                key: read_pem(key, Pem::PrivateKey)?,
            }),
            (None, None) => None,
            _ => {
                return Err(ConfigError::Invalid(
                    "cluster: etcd_cert and etcd_key must be set together".into(),
                ))
            }
        };
        options.tls =
            match (ca, identity) {
                (Some(ca), identity) => Some(EtcdTls { ca, identity }),
                (None, None) => None,
                (None, Some(_)) => return Err(ConfigError::Invalid(
                    "cluster: etcd_cert needs etcd_ca (a client certificate is only sent over TLS)"
                        .into(),
                )),
            };
        let name = match (&self.etcd_user, &self.etcd_user_file) {
            (Some(name), None) => Some(name.clone()),
            (None, Some(path)) => {
                let name = read_text(path)?.trim().to_owned();
                if name.is_empty() {
                    return Err(file_error(path, "the etcd user name is empty"));
                }
                Some(name)
            }
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid(
                    "cluster: set etcd_user or etcd_user_file, not both".into(),
                ))
            }
        };
        options.user = match (name, &self.etcd_password_file) {
            (Some(name), Some(path)) => {
                let text = read_text(path)?;
                let password = text
                    .strip_suffix('\n')
                    .map(|text| text.strip_suffix('\r').unwrap_or(text))
                    .unwrap_or(&text);
                if password.is_empty() {
                    return Err(file_error(path, "the etcd password is empty"));
                }
                Some(EtcdUser {
                    name,
                    password: password.to_owned(),
                })
            }
            (None, None) => None,
            _ => return Err(ConfigError::Invalid(ETCD_USER_AND_PASSWORD.into())),
        };
        Ok(options)
    }

    /// The rules of the etcd fields that need no file.
    fn validate_etcd(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if self.etcd.is_empty() {
            return invalid("cluster.etcd must name at least one endpoint".into());
        }
        if self.etcd_cert.is_some() != self.etcd_key.is_some() {
            return invalid("cluster: etcd_cert and etcd_key must be set together".into());
        }
        if self.etcd_user.is_some() && self.etcd_user_file.is_some() {
            return invalid("cluster: set etcd_user or etcd_user_file, not both".into());
        }
        if self.etcd_user.as_deref().is_some_and(str::is_empty) {
            return invalid("cluster.etcd_user must not be empty".into());
        }
        if (self.etcd_user.is_some() || self.etcd_user_file.is_some())
            != self.etcd_password_file.is_some()
        {
            return invalid(ETCD_USER_AND_PASSWORD.into());
        }
        let tls = self.etcd_ca.is_some() || self.etcd_cert.is_some();
        for endpoint in &self.etcd {
            let https = endpoint.starts_with("https://");
            if https && self.etcd_ca.is_none() {
                return invalid(format!(
                    "cluster.etcd: {endpoint:?} is https:// but cluster.etcd_ca is not set (the \
                     CA that signed etcd's certificate; no other CA is trusted)"
                ));
            }
            if tls && !https {
                return invalid(format!(
                    "cluster.etcd: {endpoint:?} is not https:// but cluster.{} is set: with TLS \
                     every endpoint must be https://",
                    if self.etcd_ca.is_some() {
                        "etcd_ca"
                    } else {
                        "etcd_cert"
                    }
                ));
            }
        }
        Ok(())
    }
}

const ETCD_USER_AND_PASSWORD: &str =
    "cluster: etcd_user (or etcd_user_file) and etcd_password_file must be set together";

/// What a PEM file must hold.
#[derive(Clone, Copy)]
enum Pem {
    /// One or more certificates.
    Certificates,
    /// One private key.
    PrivateKey,
}

fn file_error(path: &Path, reason: impl Into<String>) -> ConfigError {
    ConfigError::File {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

fn read_text(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads a PEM file and checks that it holds what `kind` says, so a wrong
/// file is named at start instead of failing every TLS handshake later.
fn read_pem(path: &Path, kind: Pem) -> Result<Vec<u8>, ConfigError> {
    use rustls_pki_types::pem::{Error as PemError, PemObject};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    match kind {
        Pem::Certificates => {
            let certificates = CertificateDer::pem_slice_iter(&bytes)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| file_error(path, format!("not a PEM certificate file: {err}")))?;
            if certificates.is_empty() {
                return Err(file_error(path, "holds no PEM certificate"));
            }
        }
        Pem::PrivateKey => {
            PrivateKeyDer::from_pem_slice(&bytes).map_err(|err| match err {
                PemError::NoItemsFound => file_error(path, "holds no PEM private key"),
                other => file_error(path, format!("not a PEM private key file: {other}")),
            })?;
        }
    }
    Ok(bytes)
}

/// Outbound delivery settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DeliveryConfig {
    /// Accept and keep mail queued but deliver nothing (like Postfix's
    /// `defer_transports`); `postern queue flush` does not override it.
    pub paused: bool,
    /// Send everything without a matching route to this next hop
    /// (`host:port`, `[host]:port`, or `unix:/path`), like Postfix's relayhost.
    pub relayhost: Option<String>,
    /// Name we give in EHLO/LHLO; default: `hostname`.
    pub helo_name: Option<String>,
    /// Port used for hosts found by MX lookup (25; tests change it).
    pub mx_port: u16,
    /// Deliveries in progress over all destinations.
    pub max_concurrency: usize,
    /// Deliveries in progress to one destination (next hop or MX domain).
    pub max_per_destination: usize,
    /// Messages sent over one connection before it is closed.
    pub max_messages_per_connection: usize,
    /// How long an idle connection is kept for the next message.
    #[serde(with = "humantime_serde")]
    pub idle_connection_timeout: Duration,
    /// TCP connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Waiting for the greeting, EHLO, MAIL and RCPT replies (RFC 5321 §4.5.3.2: 5 min).
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Waiting for the reply to DATA (RFC 5321 §4.5.3.2.3: 2 min).
    #[serde(with = "humantime_serde")]
    pub data_init_timeout: Duration,
    /// Writing each block of message data (RFC 5321 §4.5.3.2.5: 3 min).
    #[serde(with = "humantime_serde")]
    pub data_block_timeout: Duration,
    /// Waiting for the reply after the end of data (RFC 5321 §4.5.3.2.6: 10 min).
    #[serde(with = "humantime_serde")]
    pub data_end_timeout: Duration,
    /// Delays between attempts; the last one repeats until `max_age`.
    #[serde(with = "humantime_serde_vec")]
    pub retry_schedule: Vec<Duration>,
    /// A message still undelivered after this long bounces.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Send a delay warning DSN once a message has waited this long (off when absent).
    #[serde(default, with = "humantime_serde")]
    pub delay_warning: Option<Duration>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        let minutes = |m: u64| Duration::from_secs(m * 60);
        DeliveryConfig {
            paused: false,
            relayhost: None,
            helo_name: None,
            mx_port: 25,
            max_concurrency: 100,
            max_per_destination: 10,
            max_messages_per_connection: 100,
            idle_connection_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(30),
            command_timeout: minutes(5),
            data_init_timeout: minutes(2),
            data_block_timeout: minutes(3),
            data_end_timeout: minutes(10),
            retry_schedule: vec![
                minutes(1),
                minutes(5),
                minutes(15),
                minutes(30),
                minutes(60),
                minutes(120),
                minutes(240),
            ],
            max_age: Duration::from_secs(5 * 24 * 3600),
            delay_warning: None,
        }
    }
}

/// DNS resolver settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers (`ip:port`), queried over UDP and TCP; the system's
    /// `/etc/resolv.conf` when empty.
    pub nameservers: Vec<SocketAddr>,
}

/// Protocol spoken to a next hop.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// ESMTP (RFC 5321).
    #[default]
    Smtp,
    /// LMTP (RFC 2033): one reply per recipient after the data.
    Lmtp,
}

/// TLS towards a next hop.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, without certificate verification.
    #[default]
    Opportunistic,
    /// STARTTLS must succeed and the certificate must verify, or the delivery defers.
    Required,
}

/// A static route.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Recipient domains this route serves; `.example.org` matches subdomains.
    pub domains: Vec<String>,
    /// `host:port`, `[host]:port` (no MX lookup either way) or `unix:/path`.
    pub next_hop: String,
    /// SMTP or LMTP.
    #[serde(default)]
    pub protocol: Protocol,
    /// STARTTLS policy.
    #[serde(default)]
    pub tls: TlsMode,
    /// File holding `username:password` for AUTH PLAIN (only over TLS).
    #[serde(default)]
    pub auth_file: Option<PathBuf>,
    /// Early delivery: at the end of the data, before answering the client,
    /// try this next hop; its verdict becomes ours (see `early_budget`).
    #[serde(default)]
    pub early_delivery: bool,
    /// How long early delivery may take before the message is queued
    /// instead (well under the client's 10-minute end-of-data timeout).
    #[serde(default = "default_early_budget", with = "humantime_serde")]
    pub early_budget: Duration,
}

/// `early_budget` when a route does not say.
pub const DEFAULT_EARLY_BUDGET: Duration = Duration::from_secs(20);

fn default_early_budget() -> Duration {
    DEFAULT_EARLY_BUDGET
}

/// Local submission: `postern sendmail` speaks SMTP to `<data_dir>/submit.sock`
/// and authenticates with AUTH EXTERNAL; the relay knows the user from the
/// socket's peer credentials (`SO_PEERCRED`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SubmissionConfig {
    /// Whether the socket is served.
    pub enabled: bool,
    /// Users who may use any envelope sender (root always may).
    pub trusted_users: Vec<String>,
    /// Domains whose `<user>@domain` is a user's own sender, besides `hostname`.
    pub domains: Vec<String>,
    /// Scanners run on locally submitted mail.
    pub scanners: Vec<String>,
}

impl Default for SubmissionConfig {
    fn default() -> Self {
        SubmissionConfig {
            enabled: true,
            trusted_users: Vec::new(),
            domains: Vec::new(),
            scanners: Vec::new(),
        }
    }
}

/// The protocol a content scanner speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScannerKind {
    /// rspamd's HTTP protocol (`POST /checkv2`).
    Rspamd,
    /// An SMTP server that takes or refuses the message.
    Smtp,
    /// An LMTP server (per-recipient replies; any refusal refuses the message).
    Lmtp,
}

/// What to answer when a scanner is down or too slow.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScannerFailure {
    /// 451 4.7.1: the client tries again later.
    #[default]
    Tempfail,
    /// Accept the message unscanned (and count it).
    Accept,
}

/// A content scanner, run after the message is on the local spool and before
/// the reply; it reads the spooled message and never re-injects it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScannerConfig {
    /// Name that listeners use in `scanners`.
    pub name: String,
    /// rspamd, smtp or lmtp.
    pub kind: ScannerKind,
    /// rspamd: `host:port` of its normal worker; smtp/lmtp: `host:port` or `unix:/path`.
    pub address: String,
    /// Longest a scan may take.
    #[serde(default = "default_scan_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Down or too slow: `tempfail` (451) or `accept`.
    #[serde(default)]
    pub on_failure: ScannerFailure,
    /// rspamd on the same filesystem: pass the spooled file's path in the
    /// `File` header instead of sending the message over the socket.
    #[serde(default)]
    pub pass_file: bool,
}

/// A scanner's `timeout` when it does not say.
pub const DEFAULT_SCAN_TIMEOUT: Duration = Duration::from_secs(30);

fn default_scan_timeout() -> Duration {
    DEFAULT_SCAN_TIMEOUT
}

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown or mistyped keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The values are individually valid but make no sense together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A file the configuration names was read but holds nothing usable.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl Config {
    /// Reads and validates a TOML file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|err| match err {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: err.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// `[auth]` and the submission listeners that need it.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let auth = &self.auth;
        let submission = self.listeners.iter().find(|l| l.mode.is_submission());
        match (&auth.password_file, &auth.dovecot, submission) {
            (Some(_), Some(_), _) => {
                return invalid("auth: set password_file or dovecot, not both".into())
            }
            (None, None, Some(listener)) => {
                return invalid(format!(
                    "listener {:?} is a submission listener but [auth] has neither \
                     password_file nor dovecot",
                    listener.name
                ))
            }
            _ => {}
        }
        if auth.dovecot.as_deref().is_some_and(str::is_empty) {
            return invalid("auth.dovecot must not be empty".into());
        }
        if auth.max_failures == 0 {
            return invalid("auth.max_failures must be at least 1".into());
        }
        if auth.failure_window.is_zero() {
            return invalid("auth.failure_window must be more than 0".into());
        }
        if auth.failure_delay > auth.max_failure_delay {
            return invalid("auth.failure_delay is above auth.max_failure_delay".into());
        }
        if auth.max_failure_delay > Duration::from_secs(60) {
            return invalid(
                "auth.max_failure_delay is above 60s: clients time out before the 535".into(),
            );
        }
        for (user, senders) in &auth.senders {
            for sender in senders {
                let ok = sender == "<>"
                    || sender
                        .strip_prefix('@')
                        .map_or_else(|| sender.contains('@'), |domain| !domain.is_empty());
                if !ok || sender.contains(char::is_whitespace) {
                    return invalid(format!(
                        "auth.senders.{user:?}: {sender:?} is not an address, @domain or <>"
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the rules that span fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return invalid(format!("hostname {:?} is not a host name", self.hostname));
        }
        if self.listeners.is_empty() {
            return invalid("at least one [[listener]] is needed".into());
        }
        if let Some(listen) = self.admin.listen {
            if !listen.ip().is_loopback() && self.admin.tls.is_none() {
                return invalid(format!(
                    "admin.listen = {listen} is not a loopback address: it needs [admin.tls] \
                     (client certificates), or anyone who reaches it manages the queue"
                ));
            }
        }
        for listener in &self.listeners {
            if listener.tls_cert.is_some() != listener.tls_key.is_some() {
                return invalid(format!(
                    "listener {:?}: tls_cert and tls_key must be set together",
                    listener.name
                ));
            }
            if listener.mode.is_submission() && listener.tls_cert.is_none() {
                return invalid(format!(
                    "listener {:?}: mode = {:?} needs tls_cert and tls_key (passwords are \
                     only taken under TLS)",
                    listener.name, listener.mode
                ));
            }
        }
        self.validate_auth()?;
        for (index, dkim) in self.dkim.iter().enumerate() {
            let label = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_';
            if dkim.domain.is_empty() || !dkim.domain.chars().all(label) {
                return invalid(format!(
                    "dkim[{index}].domain {:?} is not a domain",
                    dkim.domain
                ));
            }
            if dkim.selector.is_empty() || !dkim.selector.chars().all(label) {
                return invalid(format!(
                    "dkim[{index}].selector {:?} is not a DNS label",
                    dkim.selector
                ));
            }
            if !dkim.headers.iter().any(|h| h.eq_ignore_ascii_case("From")) {
                return invalid(format!(
                    "dkim[{index}].headers must include From (RFC 6376 §5.4)"
                ));
            }
        }
        let limits = &self.limits;
        if limits.max_line_length < 80 {
            return invalid(format!(
                "limits.max_line_length = {} is below 80",
                limits.max_line_length
            ));
        }
        if limits.max_recipients < 1 {
            return invalid("limits.max_recipients must be at least 1".into());
        }
        if limits.max_message_size < 1024 {
            return invalid("limits.max_message_size must be at least 1024".into());
        }
        if limits.max_connections_per_ip == 0 || limits.max_connections == 0 {
            return invalid(
                "limits.max_connections and max_connections_per_ip must be at least 1".into(),
            );
        }
        let spool = &self.spool;
        if spool.copies.is_empty() {
            return invalid("spool.copies must name at least one copy".into());
        }
        let mut seen = std::collections::HashSet::new();
        for copy in &spool.copies {
            if !seen.insert(copy) {
                return invalid(format!("spool.copies names {copy:?} twice"));
            }
        }
        let copies = self.copy_count();
        if spool.required == 0 || spool.required > copies {
            return invalid(format!(
                "spool.required = {} must be between 1 and the {copies} copies in spool.copies",
                spool.required,
            ));
        }
        if spool.deadline.is_zero() {
            return invalid("spool.deadline must be positive".into());
        }
        if spool
            .segment_window
            .is_some_and(|w| w.is_zero() || w >= spool.deadline)
        {
            return invalid(
                "spool.segment_window must be positive and below spool.deadline".into(),
            );
        }
        if spool.segment_forward_after.is_zero() {
            return invalid("spool.segment_forward_after must be positive".into());
        }
        if spool.segment_bytes == 0 {
            return invalid("spool.segment_bytes must be positive".into());
        }
        for domain in &self.policy.relay_domains {
            if domain.is_empty() || domain.len() > 255 || domain.contains(['@', ' ']) {
                return invalid(format!("policy.relay_domains: {domain:?} is not a domain"));
            }
        }
        if let Some(postmaster) = &self.policy.postmaster {
            let mailbox = crate::smtp::params::Mailbox::parse(postmaster).map_err(|err| {
                ConfigError::Invalid(format!(
                    "policy.postmaster {postmaster:?} is not a mailbox local@domain ({err})"
                ))
            })?;
            if mailbox.is_postmaster() && self.is_own_domain(&mailbox.domain) {
                return invalid(format!(
                    "policy.postmaster {postmaster:?} is this relay's own postmaster address \
                     (hostname {:?}): name a mailbox the relay delivers elsewhere",
                    self.hostname
                ));
            }
        }
        let delivery = &self.delivery;
        if delivery.retry_schedule.is_empty() || delivery.retry_schedule.iter().any(|d| d.is_zero())
        {
            return invalid("delivery.retry_schedule needs at least one positive delay".into());
        }
        if delivery.max_concurrency == 0 || delivery.max_per_destination == 0 {
            return invalid(
                "delivery.max_concurrency and max_per_destination must be at least 1".into(),
            );
        }
        if let Some(relayhost) = &delivery.relayhost {
            crate::delivery::route::NextHop::parse(relayhost)
                .map_err(|err| ConfigError::Invalid(format!("delivery.relayhost: {err}")))?;
        }
        for (index, route) in self.routes.iter().enumerate() {
            if route.domains.is_empty() {
                return invalid(format!("route {index}: domains must not be empty"));
            }
            crate::delivery::route::NextHop::parse(&route.next_hop)
                .map_err(|err| ConfigError::Invalid(format!("route {index}: next_hop: {err}")))?;
            if route.early_delivery
                && (route.early_budget.is_zero() || route.early_budget > MAX_END_OF_DATA_WORK)
            {
                return invalid(format!(
                    "route {index}: early_budget must be between 0 and {}",
                    humantime::format_duration(MAX_END_OF_DATA_WORK)
                ));
            }
        }
        let mut scanner_names = std::collections::HashSet::new();
        for scanner in &self.scanners {
            if !scanner_names.insert(scanner.name.as_str()) {
                return invalid(format!("scanner {:?} is defined twice", scanner.name));
            }
            if scanner.timeout.is_zero() || scanner.timeout > MAX_END_OF_DATA_WORK {
                return invalid(format!(
                    "scanner {:?}: timeout must be between 0 and {}",
                    scanner.name,
                    humantime::format_duration(MAX_END_OF_DATA_WORK)
                ));
            }
            let address_ok = match scanner.kind {
                ScannerKind::Rspamd => scanner
                    .address
                    .rsplit_once(':')
                    .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok()),
                ScannerKind::Smtp | ScannerKind::Lmtp => {
                    crate::delivery::route::NextHop::parse(&scanner.address).is_ok()
                }
            };
            if !address_ok {
                return invalid(format!(
                    "scanner {:?}: address {:?} is not host:port{}",
                    scanner.name,
                    scanner.address,
                    if scanner.kind == ScannerKind::Rspamd {
                        ""
                    } else {
                        " or unix:/path"
                    }
                ));
            }
            if scanner.pass_file && scanner.kind != ScannerKind::Rspamd {
                return invalid(format!(
                    "scanner {:?}: pass_file is for rspamd scanners",
                    scanner.name
                ));
            }
        }
        let named = self
            .listeners
            .iter()
            .map(|l| (format!("listener {:?}", l.name), &l.scanners))
            .chain([("submission".to_owned(), &self.submission.scanners)]);
        let longest_early = self
            .routes
            .iter()
            .filter(|route| route.early_delivery)
            .map(|route| route.early_budget)
            .max()
            .unwrap_or_default();
        for (owner, scanners) in named {
            if let Some(unknown) = scanners
                .iter()
                .find(|name| !scanner_names.contains(name.as_str()))
            {
                return invalid(format!("{owner}: no [[scanner]] named {unknown:?}"));
            }
            // Scanners run one after the other, then early delivery, then the
            // quorum write: together under the client's 10-minute wait.
            let scanning: Duration = scanners
                .iter()
                .filter_map(|name| self.scanners.iter().find(|s| &s.name == name))
                .map(|scanner| scanner.timeout)
                .sum();
            let worst = scanning + longest_early + spool.deadline;
            if worst >= CLIENT_END_OF_DATA_WAIT {
                return invalid(format!(
                    "{owner}: scanner timeouts ({}) + early_budget ({}) + spool.deadline ({}) reach the \
                     client's {} end-of-data timeout (RFC 5321 §4.5.3.2.6)",
                    humantime::format_duration(scanning),
                    humantime::format_duration(longest_early),
                    humantime::format_duration(spool.deadline),
                    humantime::format_duration(CLIENT_END_OF_DATA_WAIT)
                ));
            }
        }
        if spool.copies.contains(&CopyKind::Peer) {
            match &self.cluster {
                Some(cluster) if !cluster.peers.is_empty() => {}
                _ => {
                    return invalid(
                        "spool.copies has \"peer\": [cluster] with at least one peer is needed"
                            .into(),
                    )
                }
            }
        }
        if let Some(cluster) = &self.cluster {
            let name = cluster.member_name();
            if crate::cluster::MemberId::new(name.clone()).is_err() {
                return invalid(format!(
                    "cluster.name {name:?}: use 1-128 of [A-Za-z0-9._-] (set cluster.name)"
                ));
            }
            cluster.validate_etcd()?;
            if cluster.secret.is_some() == cluster.secret_file.is_some() {
                return invalid("cluster: set exactly one of secret and secret_file".into());
            }
            if cluster.secret.as_ref().is_some_and(|s| s.len() < 16) {
                return invalid("cluster.secret must be at least 16 characters".into());
            }
            if cluster.lease_ttl < Duration::from_secs(2) {
                return invalid("cluster.lease_ttl must be at least 2s".into());
            }
            if cluster.replicas == 0 {
                return invalid("cluster.replicas must be at least 1".into());
            }
            if cluster.repair_interval.is_zero() {
                return invalid("cluster.repair_interval must be positive".into());
            }
        }
        if let ObjectStoreConfig::S3 { bucket, .. } = &self.object_store {
            if bucket.is_empty() {
                return invalid("object_store.bucket must not be empty".into());
            }
        }
        Ok(())
    }

    /// Whether `domain` names this relay itself (`hostname`, compared
    /// case-insensitively, a trailing dot ignored): its postmaster is
    /// `policy.postmaster`.
    pub fn is_own_domain(&self, domain: &str) -> bool {
        domain
            .trim_end_matches('.')
            .eq_ignore_ascii_case(self.hostname.trim_end_matches('.'))
    }

    /// What is valid but probably not meant, one sentence each: `postern
    /// config check` prints them and `postern serve` logs them at start.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.policy.postmaster.is_none() {
            warnings.push(format!(
                "policy.postmaster is not set: mail to <postmaster> and <postmaster@{}> is \
                 refused with 550 5.1.1, though RFC 5321 §4.5.1 requires accepting it; \
                 set it to a mailbox that is read",
                self.hostname
            ));
        }
        if self.spool.copies.contains(&CopyKind::ObjectStore)
            && matches!(self.object_store, ObjectStoreConfig::Local { path: None })
        {
            warnings.push(format!(
                "spool.copies has \"object_store\" in the data directory ({}), on the same \
                 disk as the local spool: the second copy costs a write and an fsync per \
                 message and survives nothing the first does not; set object_store.path to \
                 another disk, use S3, or drop it",
                self.local_object_dir().display()
            ));
        }
        warnings
    }

    /// What the ack policy promises, for the start-up log: how many copies
    /// are durable before 250 and what an acknowledged message survives.
    pub fn durability_summary(&self) -> String {
        let copies = self.copy_count();
        let required = self.spool.required;
        let names: Vec<String> = self
            .spool
            .copies
            .iter()
            .map(|kind| match kind {
                CopyKind::Local => "local spool".to_owned(),
                CopyKind::ObjectStore => match &self.object_store {
                    ObjectStoreConfig::S3 { bucket, .. } => format!("S3 bucket {bucket}"),
                    ObjectStoreConfig::Local { .. } => {
                        format!("directory {}", self.local_object_dir().display())
                    }
                },
                CopyKind::Peer => format!(
                    "{} peer replica(s)",
                    self.cluster.as_ref().map_or(1, |c| c.replicas)
                ),
            })
            .collect();
        let survives = if required == 1 {
            "a crash or power loss of this relay, not the loss of the place holding its copy"
                .to_owned()
        } else {
            format!(
                "a crash or power loss, and the loss of any {} of the places holding its copies",
                required - 1
            )
        };
        format!(
            "250 after {required} of {copies} copies are durable (fsync'd) [{}]; an acknowledged \
             message survives {survives}",
            names.join(", ")
        )
    }

    /// Reads the files the relay needs at start, so a missing or unreadable
    /// one is named before anything runs: the cluster's shared secret, the
    /// peer channel's certificate, key and CA, and etcd's CA, client
    /// certificate and key, user and password files.
    /// [`validate`](Self::validate) stays free of I/O because the operator
    /// validates configurations whose files exist only inside the relay pods,
    /// and `postern sendmail` loads this configuration as a user who may not
    /// read them; `postern serve` and `postern config check` call this too.
    pub fn check_files(&self) -> Result<(), ConfigError> {
        if let Some(cluster) = &self.cluster {
            cluster.shared_secret()?;
            cluster.etcd_options()?;
            if let Some(tls) = &cluster.tls {
                tls.check()?;
            }
        }
        if let Some(tls) = &self.admin.tls {
            tls.check()?;
        }
        Ok(())
    }

    /// Copies written per message: each entry of `spool.copies`, `"peer"`
    /// counting `cluster.replicas` times.
    pub fn copy_count(&self) -> usize {
        let replicas = self.cluster.as_ref().map_or(1, |c| c.replicas);
        self.spool
            .copies
            .iter()
            .map(|kind| if *kind == CopyKind::Peer { replicas } else { 1 })
            .sum()
    }

    /// The local submission socket (`postern sendmail`).
    pub fn submission_socket(&self) -> PathBuf {
        self.data_dir.join("submit.sock")
    }

    /// The admin service's Unix socket.
    pub fn admin_socket(&self) -> PathBuf {
        self.data_dir.join("admin.sock")
    }

    /// The local spool directory.
    pub fn spool_dir(&self) -> PathBuf {
        self.data_dir.join("spool")
    }

    /// The local object-store directory when `object_store.kind = "local"`.
    pub fn local_object_dir(&self) -> PathBuf {
        match &self.object_store {
            ObjectStoreConfig::Local { path: Some(path) } => path.clone(),
            _ => self.data_dir.join("objects"),
        }
    }
}

/// Serde helpers for a list of human-readable durations.
mod humantime_serde_vec {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            value
                .iter()
                .map(|d| humantime::format_duration(*d).to_string()),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        let texts = Vec::<String>::deserialize(deserializer)?;
        texts
            .iter()
            .map(|text| humantime::parse_duration(text).map_err(serde::de::Error::custom))
            .collect()
    }
}

fn default_hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into a buffer we own.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        if let Ok(name) = std::str::from_utf8(&buf[..end]) {
            if !name.is_empty() {
                return name.to_owned();
            }
        }
    }
    "localhost".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_default() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.listeners[0].address.to_string(), "127.0.0.1:2525");
        assert_eq!(config.http.listen.to_string(), "127.0.0.1:9325");
        // One durable local copy, as Postfix keeps: a second copy on the
        // same disk would survive nothing the first does not.
        assert_eq!(config.spool.copies, vec![CopyKind::Local]);
        assert_eq!(config.spool.required, 1);
        assert_eq!(config.admin.listen, None);
        assert_eq!(
            config.admin_socket(),
            PathBuf::from("./postern-data/admin.sock")
        );
        assert_eq!(
            config.local_object_dir(),
            PathBuf::from("./postern-data/objects")
        );
    }

    #[test]
    fn the_start_up_log_says_what_the_ack_policy_survives() {
        let single = Config::parse("").unwrap();
        let text = single.durability_summary();
        assert!(text.starts_with("250 after 1 of 1 copies"), "{text}");
        assert!(text.contains("not the loss of the place"), "{text}");
        assert!(!single.warnings().iter().any(|w| w.contains("same disk")));

        let same_disk =
            Config::parse("[spool]\ncopies = [\"local\", \"object_store\"]\nrequired = 2\n")
                .unwrap();
        assert!(same_disk
            .durability_summary()
            .contains("the loss of any 1 of the places"));
        assert!(
            same_disk.warnings().iter().any(|w| w.contains("same disk")),
            "{:?}",
            same_disk.warnings()
        );
        let elsewhere = Config::parse(
            "[spool]\ncopies = [\"local\", \"object_store\"]\nrequired = 2\n\
             [object_store]\nkind = \"local\"\npath = \"/mnt/other\"\n",
        )
        .unwrap();
        assert!(!elsewhere.warnings().iter().any(|w| w.contains("same disk")));
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::parse("[limits]\nmax_mesage_size = 10\n").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("max_mesage_size"), "{text}");
    }

    #[test]
    fn quorum_larger_than_copies_is_invalid() {
        let err = Config::parse("[spool]\ncopies = [\"local\"]\nrequired = 2\n").unwrap_err();
        assert!(err.to_string().contains("spool.required = 2"), "{err}");
    }

    #[test]
    fn postmaster_is_a_mailbox_elsewhere_and_its_absence_is_a_warning() {
        let config = Config::parse("hostname = \"mx.example.org\"\n").unwrap();
        let warnings = config.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("policy.postmaster is not set")
                && warnings[0].contains("<postmaster@mx.example.org>"),
            "{warnings:?}"
        );
        let config = Config::parse(
            "hostname = \"mx.example.org\"\n[policy]\npostmaster = \"ops@example.org\"\n",
        )
        .unwrap();
        assert_eq!(config.policy.postmaster.as_deref(), Some("ops@example.org"));
        assert!(config.warnings().is_empty(), "{:?}", config.warnings());
        for (value, needle) in [
            ("ops", "is not a mailbox local@domain"),
            ("<ops@example.org>", "is not a mailbox local@domain"),
            ("PostMaster@MX.example.org", "this relay's own postmaster"),
        ] {
            let err = Config::parse(&format!(
                "hostname = \"mx.example.org\"\n[policy]\npostmaster = {value:?}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains(needle), "{value:?}: {err}");
        }
    }

    #[test]
    fn admin_listen_parses() {
        let config = Config::parse("[admin]\nlisten = \"127.0.0.1:9326\"\n").unwrap();
        assert_eq!(config.admin.listen, Some("127.0.0.1:9326".parse().unwrap()));
    }

    #[test]
    fn s3_store_and_durations_parse() {
        let config = Config::parse(
            "[object_store]\nkind = \"s3\"\nbucket = \"mail\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n\
             [spool]\ndeadline = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(config.spool.deadline, Duration::from_secs(5));
        assert!(
            matches!(config.object_store, ObjectStoreConfig::S3 { ref bucket, .. } if bucket == "mail")
        );
    }

    #[test]
    fn cluster_section_parses_and_counts_peer_replicas() {
        let config = Config::parse(
            "[spool]\ncopies = [\"local\", \"peer\", \"object_store\"]\nrequired = 3\n\
             [cluster]\nname = \"relay-a\"\netcd = [\"http://127.0.0.1:2379\"]\n\
             peers = [\"relays.mail.svc:9327\"]\nsecret = \"0123456789abcdef\"\nreplicas = 2\n\
             peer_listen = \"0.0.0.0:9327\"\n",
        )
        .unwrap();
        let cluster = config.cluster.as_ref().unwrap();
        assert_eq!(config.copy_count(), 4);
        assert_eq!(cluster.member_name(), "relay-a");
        assert_eq!(cluster.lease_ttl, Duration::from_secs(10));
        // A wildcard listener is advertised under the machine's name.
        assert_eq!(cluster.advertised(), format!("{}:9327", default_hostname()));
        assert_eq!(cluster.shared_secret().unwrap(), "0123456789abcdef");
    }

    #[test]
    fn cluster_rules_are_enforced() {
        let base = "[cluster]\netcd = [\"http://127.0.0.1:2379\"]\nname = \"a\"\n";
        for (extra, needle) in [
            ("", "exactly one of secret and secret_file"),
            ("secret = \"short\"\n", "at least 16"),
            (
                "secret = \"0123456789abcdef\"\nlease_ttl = \"1s\"\n",
                "lease_ttl",
            ),
            ("secret = \"0123456789abcdef\"\nreplicas = 0\n", "replicas"),
        ] {
            let err = Config::parse(&format!("{base}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
        let err = Config::parse("[spool]\ncopies = [\"local\", \"peer\"]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("[cluster] with at least one peer"), "{err}");
        let err = Config::parse(
            "[cluster]\netcd = [\"http://e:2379\"]\nsecret = \"0123456789abcdef\"\nname = \"a/b\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cluster.name"), "{err}");
    }

    #[test]
    fn rates_parse_print_and_refuse_nonsense() {
        let rate: Rate = "120/1m".parse().unwrap();
        assert_eq!(rate.count.get(), 120);
        assert_eq!(rate.period, Duration::from_secs(60));
        assert_eq!(rate.to_string().parse::<Rate>().unwrap(), rate);
        for bad in ["120", "0/1m", "-1/1m", "5/0s", "5/fortnight", "x/1m"] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
        let config = Config::parse(
            "[[listener]]\nname = \"smtp\"\naddress = \"127.0.0.1:25\"\n\n\
             [rate_limits]\nmessages = \"5/1m\"\nconnections = \"30/10s\"\n",
        )
        .unwrap();
        assert_eq!(config.rate_limits.messages.unwrap().count.get(), 5);
        assert_eq!(config.rate_limits.recipients, None);
        assert!(Config::parse("[rate_limits]\nmessages = \"lots\"\n").is_err());
    }

    #[test]
    fn etcd_tls_and_user_rules_are_enforced() {
        let base = "[cluster]\nname = \"a\"\nsecret = \"0123456789abcdef\"\n";
        let https = "etcd = [\"https://etcd:2379\"]\n";
        let http = "etcd = [\"http://etcd:2379\"]\n";
        for (extra, needle) in [
            (
                format!("{https}etcd_ca = \"/ca\"\netcd_cert = \"/crt\"\n"),
                "etcd_cert and etcd_key must be set together",
            ),
            (
                format!("{https}etcd_ca = \"/ca\"\netcd_key = \"/key\"\n"),
                "etcd_cert and etcd_key must be set together",
            ),
            (
                format!("{http}etcd_user = \"relay\"\n"),
                "etcd_password_file must be set together",
            ),
            (
                format!("{http}etcd_password_file = \"/pw\"\n"),
                "etcd_password_file must be set together",
            ),
            (
                format!(
                    "{http}etcd_user = \"relay\"\netcd_user_file = \"/user\"\n\
                     etcd_password_file = \"/pw\"\n"
                ),
                "etcd_user or etcd_user_file, not both",
            ),
            (
                format!("{http}etcd_user = \"\"\netcd_password_file = \"/pw\"\n"),
                "etcd_user must not be empty",
            ),
            (https.to_owned(), "cluster.etcd_ca is not set"),
            (
                format!("{http}etcd_ca = \"/ca\"\n"),
                "is not https:// but cluster.etcd_ca is set",
            ),
            (
                "etcd = [\"https://a:2379\", \"http://b:2379\"]\netcd_ca = \"/ca\"\n".to_owned(),
                "\"http://b:2379\" is not https://",
            ),
            (
                format!("{http}etcd_cert = \"/crt\"\netcd_key = \"/key\"\n"),
                "is not https:// but cluster.etcd_cert is set",
            ),
        ] {
            let err = Config::parse(&format!("{base}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
        // Validation reads no file: the operator validates configurations
        // whose files exist only in the relay pods.
        let config = Config::parse(&format!(
            "{base}{https}etcd_ca = \"/nonexistent/ca.crt\"\netcd_cert = \"/nonexistent/tls.crt\"\n\
             etcd_key = \"/nonexistent/tls.key\"\netcd_user_file = \"/nonexistent/username\"\n\
             etcd_password_file = \"/nonexistent/password\"\n"
        ))
        .unwrap();
        let err = config.check_files().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/ca.crt"), "{err}");
    }

    /// A `[cluster]` section with etcd TLS and a user, files in `dir`.
    fn etcd_files(dir: &Path) -> ClusterConfig {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
        let client = rcgen::generate_simple_self_signed(vec!["relay.test".to_owned()]).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        ClusterConfig {
            etcd: vec!["https://etcd:2379".into()],
            secret: Some("0123456789abcdef".into()),
            etcd_ca: Some(write("ca.crt", &ca.cert.pem())),
            etcd_cert: Some(write("tls.crt", &client.cert.pem())),
            etcd_key: Some(write("tls.key", &client.signing_key.serialize_pem())),
            etcd_user_file: Some(write("username", " relay\n")),
            etcd_password_file: Some(write("password", "pass word\n")),
            ..ClusterConfig::default()
        }
    }

    #[test]
    fn etcd_options_read_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = etcd_files(dir.path());
        let options = cluster.etcd_options().unwrap();
        let tls = options.tls.as_ref().unwrap();
        assert!(String::from_utf8_lossy(&tls.ca).contains("BEGIN CERTIFICATE"));
        let identity = tls.identity.as_ref().unwrap();
        assert!(String::from_utf8_lossy(&identity.key).contains("PRIVATE KEY"));
        let user = options.user.as_ref().unwrap();
        assert_eq!(user.name, "relay");
        // One trailing newline is the file's, the inner space the password's.
        assert_eq!(user.password, "pass word");
        let debug = format!("{options:?}");
        assert!(!debug.contains("pass word"), "{debug}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");

        let config = Config {
            cluster: Some(cluster.clone()),
            ..Config::default()
        };
        config.validate().unwrap();
        config.check_files().unwrap();
        // The TOML names the password's file, never the password.
        let toml = toml::to_string(&config).unwrap();
        assert!(!toml.contains("pass word"), "{toml}");
        assert_eq!(Config::parse(&toml).unwrap(), config);
    }

    #[test]
    fn unusable_etcd_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cluster = etcd_files(dir.path());
        type Break = fn(&mut ClusterConfig, &Path);
        let cases: [(&str, Break, &str); 5] = [
            (
                "missing CA",
                |c, dir| c.etcd_ca = Some(dir.join("nope.crt")),
                "nope.crt",
            ),
            (
                "a key where the certificate belongs",
                |c, _| c.etcd_cert = c.etcd_key.clone(),
                "tls.key: holds no PEM certificate",
            ),
            (
                "a certificate where the key belongs",
                |c, _| c.etcd_key = c.etcd_cert.clone(),
                "tls.crt: holds no PEM private key",
            ),
            (
                "an empty password",
                |c, dir| {
                    std::fs::write(dir.join("empty"), "\n").unwrap();
                    c.etcd_password_file = Some(dir.join("empty"));
                },
                "the etcd password is empty",
            ),
            (
                "an unreadable password file",
                |c, dir| c.etcd_password_file = Some(dir.join("no-password")),
                "no-password",
            ),
        ];
        for (what, change, needle) in cases {
            let mut broken = cluster.clone();
            change(&mut broken, dir.path());
            let err = broken.etcd_options().unwrap_err().to_string();
            assert!(err.contains(needle), "{what}: {err}");
        }
    }

    #[test]
    fn scanners_and_early_delivery_parse() {
        let config = Config::parse(
            "[[listener]]\nscanners = [\"rspamd\", \"av\"]\n\n\
             [submission]\ntrusted_users = [\"www-data\"]\n\n\
             [[scanner]]\nname = \"rspamd\"\nkind = \"rspamd\"\naddress = \"127.0.0.1:11333\"\npass_file = true\n\n\
             [[scanner]]\nname = \"av\"\nkind = \"lmtp\"\naddress = \"unix:/run/av.sock\"\non_failure = \"accept\"\ntimeout = \"5s\"\n\n\
             [[route]]\ndomains = [\"example.org\"]\nnext_hop = \"127.0.0.1:25\"\nearly_delivery = true\n",
        )
        .unwrap();
        assert_eq!(config.listeners[0].scanners, ["rspamd", "av"]);
        assert_eq!(config.scanners[1].on_failure, ScannerFailure::Accept);
        assert_eq!(config.scanners[0].timeout, Duration::from_secs(30));
        assert!(config.routes[0].early_delivery);
        assert_eq!(config.routes[0].early_budget, Duration::from_secs(20));
        assert!(config.submission.enabled);
    }

    #[test]
    fn scanner_and_early_delivery_rules_are_enforced() {
        let rspamd =
            "[[scanner]]\nname = \"s\"\nkind = \"rspamd\"\naddress = \"127.0.0.1:11333\"\n";
        for (text, needle) in [
            ("[[listener]]\nscanners = [\"nope\"]\n".to_owned(), "no [[scanner]] named \"nope\""),
            (format!("[submission]\nscanners = [\"x\"]\n{rspamd}"), "submission: no [[scanner]]"),
            (format!("{rspamd}{rspamd}"), "defined twice"),
            (
                "[[scanner]]\nname = \"s\"\nkind = \"smtp\"\naddress = \"127.0.0.1:25\"\npass_file = true\n".to_owned(),
                "pass_file is for rspamd",
            ),
            (
                "[[scanner]]\nname = \"s\"\nkind = \"rspamd\"\naddress = \"unix:/x\"\n".to_owned(),
                "is not host:port",
            ),
            (format!("{rspamd}timeout = \"11m\"\n"), "timeout must be between"),
            (
                format!(
                    "[[listener]]\nscanners = [\"s\", \"t\"]\n{rspamd}timeout = \"5m\"\n\
                     [[scanner]]\nname = \"t\"\nkind = \"smtp\"\naddress = \"h:25\"\ntimeout = \"4m\"\n\
                     [spool]\ndeadline = \"1m\"\n"
                ),
                "reach the client's 10m end-of-data timeout",
            ),
            (
                "[[route]]\ndomains = [\"a\"]\nnext_hop = \"h:25\"\nearly_delivery = true\nearly_budget = \"10m\"\n".to_owned(),
                "early_budget must be between",
            ),
        ] {
            let err = Config::parse(&text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?}: {err}");
        }
    }
}
