//! Validates a MailQueue spec and renders it into the relay's own typed
//! [`Config`], so the TOML in the ConfigMap is exactly what `postern serve`
//! accepts (same types, same `validate()`); nothing here writes TOML by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use postern::config::{
    default_dkim_headers, AuthConfig, ClusterConfig, Config, ConfigError, CopyKind as RelayCopy,
    DkimConfig, ListenerConfig, ListenerMode, MutualTlsFiles, ObjectStoreConfig, Protocol,
    RouteConfig, ScannerConfig, ScannerFailure, ScannerKind, TlsMode, DEFAULT_EARLY_BUDGET,
    DEFAULT_SCAN_TIMEOUT,
};
use sha2::{Digest, Sha256};

use crate::crd::{self, CopyKind, MailQueue, RouteProtocol, RouteTls};

/// Where the spool volume is mounted in the relay container.
pub const DATA_DIR: &str = "/var/lib/postern";
/// Where the ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/postern";
/// The configuration file's name in the ConfigMap.
pub const CONFIG_FILE: &str = "postern.toml";
/// How long a stopping relay answers new connections with 421 after its
/// sessions ended (endpoint changes take a moment to reach kube-proxy).
pub const SHUTDOWN_LINGER: std::time::Duration = std::time::Duration::from_secs(5);

/// Container port of `/healthz`, `/readyz`, `/stats`, `/metrics`.
pub const HTTP_PORT: u16 = 9325;
/// Where listener TLS Secrets are mounted (`<dir>/<listener>/tls.crt`).
pub const TLS_DIR: &str = "/etc/postern/tls";
/// Where route credential Secrets are mounted (`<dir>/<index>/auth`).
pub const ROUTE_AUTH_DIR: &str = "/etc/postern/routes";
/// Container port of the relays' peer service (replicas, takeover reads,
/// cluster admin) when `spec.etcd` is set; a named port `peer`.
pub const PEER_PORT: u16 = 9327;
/// Name of the peer port on the pods and on the headless Service.
pub const PEER_PORT_NAME: &str = "peer";
/// Where the `spec.etcd.peerSecret` Secret is mounted.
pub const PEER_SECRET_DIR: &str = "/etc/postern/peer";
/// The key of the peer Secret that holds the shared secret (also the file
/// name under [`PEER_SECRET_DIR`]).
pub const PEER_SECRET_KEY: &str = "secret";
/// Where the `spec.etcd.peerTlsSecret` Secret is mounted; its keys are
/// cert-manager's (`tls.crt`, `tls.key`, `ca.crt`), as for etcd's.
pub const PEER_TLS_DIR: &str = "/etc/postern/peer-tls";
/// Where `spec.auth.passwordSecret` is mounted.
pub const AUTH_DIR: &str = "/etc/postern/auth";
/// The password file's key in that Secret (and its file name).
pub const AUTH_PASSWD_KEY: &str = "passwd";
/// Where the DKIM keys' Secrets are mounted, one directory each.
pub const DKIM_DIR: &str = "/etc/postern/dkim";
/// The private key's key in a DKIM Secret (and its file name).
pub const DKIM_KEY: &str = "private.key";
/// Where the `spec.etcd.tlsSecret` Secret is mounted.
pub const ETCD_TLS_DIR: &str = "/etc/postern/etcd/tls";
/// Keys of the etcd TLS Secret (cert-manager's names), also the file names
/// under [`ETCD_TLS_DIR`]: the CA, then the client certificate and its key.
pub const ETCD_CA_KEY: &str = "ca.crt";
/// The client certificate's key in the etcd TLS Secret.
pub const ETCD_CERT_KEY: &str = "tls.crt";
/// The client key's key in the etcd TLS Secret.
pub const ETCD_KEY_KEY: &str = "tls.key";
/// Where the `spec.etcd.authSecret` Secret is mounted.
pub const ETCD_AUTH_DIR: &str = "/etc/postern/etcd/auth";
/// The etcd user's name in the auth Secret (and its file name).
pub const ETCD_USERNAME_KEY: &str = "username";
/// The etcd user's password in the auth Secret (and its file name).
pub const ETCD_PASSWORD_KEY: &str = "password";

/// Why a MailQueue cannot be turned into a relay configuration.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// A field has a value the schema let through but the relay cannot use.
    #[error("spec.{field}: {message}")]
    Field {
        /// Path below `spec`.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// The relay's own validation rejects the rendered configuration.
    #[error("the relay rejects the configuration: {0}")]
    Relay(#[source] ConfigError),
}

/// Where a DKIM key's Secret is mounted.
pub fn dkim_dir(key: &crd::DkimKey) -> PathBuf {
    PathBuf::from(DKIM_DIR).join(format!("{}.{}", key.selector, key.domain))
}

/// `spec.auth` as the relay's `[auth]`: the password Secret's file, or
/// Dovecot's address, and the sender rules.
fn auth_config(auth: &crd::SubmissionAuth) -> Result<AuthConfig, SpecError> {
    if auth.password_secret.is_some() == auth.dovecot.is_some() {
        return Err(field(
            "auth",
            "set exactly one of passwordSecret and dovecot",
        ));
    }
    if let Some(dovecot) = &auth.dovecot {
        if dovecot.starts_with('/') || !dovecot.contains(':') {
            return Err(field(
                "auth.dovecot",
                "must be host:port of Dovecot's auth inet_listener",
            ));
        }
    }
    let defaults = AuthConfig::default();
    Ok(AuthConfig {
        password_file: auth
            .password_secret
            .as_ref()
            .map(|_| PathBuf::from(AUTH_DIR).join(AUTH_PASSWD_KEY)),
        dovecot: auth.dovecot.clone(),
        senders: auth.senders.clone(),
        max_failures: match auth.max_failures {
            Some(max) => u32::try_from(max)
                .ok()
                .filter(|max| *max > 0)
                .ok_or_else(|| field("auth.maxFailures", "must be at least 1"))?,
            None => defaults.max_failures,
        },
        ..defaults
    })
}

fn field(field: impl Into<String>, message: impl Into<String>) -> SpecError {
    SpecError::Field {
        field: field.into(),
        message: message.into(),
    }
}

/// The rendered configuration of a MailQueue.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// The relay's typed configuration.
    pub config: Config,
    /// `config` as TOML, the ConfigMap's content.
    pub toml: String,
    /// SHA-256 of `toml` (hex, first 16 characters): a change rolls the pods.
    pub hash: String,
    /// Things in the spec that will not work as asked (reported as Warning events).
    pub warnings: Vec<Warning>,
}

/// Something the spec asks for that the relays cannot do (yet), or cannot
/// do with the current number of relays: a Warning event, not an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    /// The event's reason (`Unsupported`, `QuorumUnreachable`).
    pub reason: &'static str,
    /// The event's note.
    pub message: String,
}

/// Validates the spec and renders the relay configuration.
pub fn render(mq: &MailQueue) -> Result<RelayConfig, SpecError> {
    let spec = &mq.spec;
    let name = mq.metadata.name.as_deref().unwrap_or_default();
    let namespace = mq.metadata.namespace.as_deref().unwrap_or("default");
    let mut config = Config {
        hostname: spec
            .hostname
            .clone()
            .unwrap_or_else(|| format!("{name}.{namespace}.svc")),
        data_dir: PathBuf::from(DATA_DIR),
        ..Config::default()
    };
    let mut warnings = Vec::new();

    config.listeners.clear();
    let mut ports = std::collections::BTreeSet::from([HTTP_PORT]);
    let mut names = std::collections::BTreeSet::from(["http".to_owned()]);
    let mut reserved = format!("the relay's HTTP port is {HTTP_PORT}");
    let mut reserved_names = "\"http\" is reserved".to_owned();
    if spec.etcd.is_some() {
        ports.insert(PEER_PORT);
        names.insert(PEER_PORT_NAME.to_owned());
        reserved.push_str(&format!(", its peer port {PEER_PORT}"));
        reserved_names = format!("\"http\" and \"{PEER_PORT_NAME}\" are reserved");
    }
    for (index, listener) in spec.listeners.iter().enumerate() {
        let at = format!("listeners[{index}]");
        let port = u16::try_from(listener.port)
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| field(format!("{at}.port"), "must be between 1 and 65535"))?;
        if !ports.insert(port) {
            return Err(field(
                format!("{at}.port"),
                format!("port {port} is used twice ({reserved})"),
            ));
        }
        if !names.insert(listener.name.clone()) {
            return Err(field(
                format!("{at}.name"),
                format!("name {:?} is used twice ({reserved_names})", listener.name),
            ));
        }
        let tls_dir = PathBuf::from(TLS_DIR).join(&listener.name);
        config.listeners.push(ListenerConfig {
            name: listener.name.clone(),
            address: SocketAddr::from(([0, 0, 0, 0], port)),
            tls_cert: listener
                .tls_secret
                .as_ref()
                .map(|_| tls_dir.join("tls.crt")),
            tls_key: listener
                .tls_secret
                .as_ref()
                .map(|_| tls_dir.join("tls.key")),
            scanners: listener.scanners.clone(),
            mode: match listener.mode {
                crd::ListenerMode::Smtp => ListenerMode::Smtp,
                crd::ListenerMode::Submission => ListenerMode::Submission,
                crd::ListenerMode::Submissions => ListenerMode::Submissions,
            },
        });
        if !listener.mode.is_smtp() {
            if listener.tls_secret.is_none() {
                return Err(field(
                    format!("{at}.tlsSecret"),
                    "a submission listener needs a certificate: passwords are only taken under TLS",
                ));
            }
            if spec.auth.is_none() {
                return Err(field(
                    "auth",
                    format!(
                        "{at} is a submission listener: set auth.passwordSecret or auth.dovecot"
                    ),
                ));
            }
        }
    }
    if let Some(auth) = &spec.auth {
        config.auth = auth_config(auth)?;
    }
    config.dkim = spec
        .dkim
        .iter()
        .map(|key| DkimConfig {
            domain: key.domain.clone(),
            selector: key.selector.clone(),
            key_file: dkim_dir(key).join(DKIM_KEY),
            headers: default_dkim_headers(),
        })
        .collect();
    let mut service_ports = std::collections::BTreeSet::new();
    for (index, listener) in spec.listeners.iter().enumerate() {
        let port = listener.service_port.unwrap_or(listener.port);
        if !service_ports.insert(port) {
            return Err(field(
                format!("listeners[{index}].servicePort"),
                format!("Service port {port} is used twice"),
            ));
        }
    }

    config.limits.max_message_size =
        positive(spec.limits.max_message_size, "limits.maxMessageSize")?;
    config.limits.max_recipients = positive(spec.limits.max_recipients, "limits.maxRecipients")?;
    config.limits.max_connections = positive(spec.limits.max_connections, "limits.maxConnections")?;
    config.limits.max_connections_per_ip = positive(
        spec.limits.max_connections_per_ip,
        "limits.maxConnectionsPerIp",
    )?;
    // A stopping relay's pod leaves the Service's endpoints at once, but
    // kube-proxy on every node needs a moment to follow: until then new
    // clients still reach it and should hear 421, not a refused connection.
    config.limits.shutdown_linger = SHUTDOWN_LINGER;

    config.policy.relay_domains = spec.relay_domains.iter().map(|d| d.0.clone()).collect();
    config.policy.trusted_networks = spec
        .trusted_networks
        .iter()
        .enumerate()
        .map(|(index, network)| {
            network.0.parse::<IpNet>().map_err(|err| {
                field(
                    format!("trustedNetworks[{index}]"),
                    format!("{:?} is not a network: {err}", network.0),
                )
            })
        })
        .collect::<Result<_, _>>()?;

    let ack = &spec.ack_policy;
    config.spool.copies = ack
        .copies
        .iter()
        .map(|copy| match copy {
            CopyKind::Local => RelayCopy::Local,
            CopyKind::ObjectStore => RelayCopy::ObjectStore,
            CopyKind::Peer => RelayCopy::Peer,
        })
        .collect();
    if config.spool.copies.contains(&RelayCopy::Peer) && spec.etcd.is_none() {
        return Err(field(
            "ackPolicy.copies",
            "a \"peer\" copy needs spec.etcd: relays only replicate to each other in a cluster",
        ));
    }
    config.spool.required = positive(ack.required, "ackPolicy.required")?;
    let peer_replicas: usize = positive(ack.peer_replicas, "ackPolicy.peerReplicas")?;
    config.cluster = spec
        .etcd
        .as_ref()
        .map(|etcd| cluster(mq, etcd, peer_replicas))
        .transpose()?;
    let copies = config.copy_count();
    if config.spool.required > copies {
        return Err(field(
            "ackPolicy.required",
            format!(
                "{} copies required but ackPolicy.copies makes only {copies} (a peer copy \
                 counts peerReplicas times)",
                ack.required,
            ),
        ));
    }
    if let Some(reachable) = reachable_copies(&config, spec.replicas) {
        if config.spool.required > reachable {
            warnings.push(Warning {
                reason: "QuorumUnreachable",
                message: format!(
                    "ackPolicy.required is {} but with {} relays only {reachable} copies can \
                     confirm (each relay has at most {} peers): every message will get 451 \
                     until there are more relays",
                    ack.required,
                    spec.replicas,
                    spec.replicas - 1
                ),
            });
        }
    }
    config.spool.deadline = duration(&ack.deadline, "ackPolicy.deadline")?;

    config.object_store = match &spec.object_store {
        None => ObjectStoreConfig::Local { path: None },
        Some(store) => ObjectStoreConfig::S3 {
            bucket: store.bucket.clone(),
            prefix: store.prefix.clone(),
            endpoint: store.endpoint.clone(),
            region: store.region.clone(),
            // From the credentials Secret through the environment, never in the ConfigMap.
            access_key_id: None,
            secret_access_key: None,
            allow_http: store.allow_http,
        },
    };
    if let Some(secret) = spec
        .etcd
        .as_ref()
        .and_then(|etcd| etcd.credentials_secret.as_ref())
    {
        warnings.push(Warning {
            reason: "Deprecated",
            message: format!(
                "spec.etcd.credentialsSecret ({secret}) is deprecated and ignored: set \
                 spec.etcd.tlsSecret (ca.crt, tls.crt, tls.key) and spec.etcd.authSecret \
                 (username, password) instead"
            ),
        });
    }

    config.http.listen = SocketAddr::from(([0, 0, 0, 0], HTTP_PORT));

    let delivery = &spec.delivery;
    config.delivery.paused = delivery.paused;
    config.delivery.relayhost = spec.relayhost.clone();
    config.delivery.max_concurrency =
        positive(delivery.max_concurrency, "delivery.maxConcurrency")?;
    config.delivery.max_per_destination =
        positive(delivery.max_per_destination, "delivery.maxPerDestination")?;
    config.delivery.retry_schedule = delivery
        .retry_schedule
        .iter()
        .enumerate()
        .map(|(index, text)| duration(text, &format!("delivery.retrySchedule[{index}]")))
        .collect::<Result<_, _>>()?;
    config.delivery.max_age = duration(&delivery.max_age, "delivery.maxAge")?;
    config.delivery.delay_warning = delivery
        .delay_warning
        .as_deref()
        .map(|text| duration(text, "delivery.delayWarning"))
        .transpose()?;

    config.routes = spec
        .routes
        .iter()
        .enumerate()
        .map(|(index, route)| {
            Ok(RouteConfig {
                domains: route.domains.iter().map(|d| d.0.clone()).collect(),
                next_hop: route.next_hop.clone(),
                protocol: match route.protocol {
                    RouteProtocol::Smtp => Protocol::Smtp,
                    RouteProtocol::Lmtp => Protocol::Lmtp,
                },
                tls: match route.tls {
                    RouteTls::None => TlsMode::None,
                    RouteTls::Opportunistic => TlsMode::Opportunistic,
                    RouteTls::Required => TlsMode::Required,
                },
                auth_file: route.credentials_secret.as_ref().map(|_| {
                    PathBuf::from(ROUTE_AUTH_DIR)
                        .join(index.to_string())
                        .join("auth")
                }),
                early_delivery: route.early_delivery,
                early_budget: optional_duration(
                    route.early_budget.as_deref(),
                    &format!("routes[{index}].earlyBudget"),
                    DEFAULT_EARLY_BUDGET,
                )?,
            })
        })
        .collect::<Result<_, _>>()?;
    config.scanners = spec
        .scanners
        .iter()
        .enumerate()
        .map(|(index, scanner)| {
            Ok(ScannerConfig {
                name: scanner.name.clone(),
                kind: match scanner.kind {
                    crd::ScannerKind::Rspamd => ScannerKind::Rspamd,
                    crd::ScannerKind::Smtp => ScannerKind::Smtp,
                    crd::ScannerKind::Lmtp => ScannerKind::Lmtp,
                },
                address: scanner.address.clone(),
                timeout: optional_duration(
                    scanner.timeout.as_deref(),
                    &format!("scanners[{index}].timeout"),
                    DEFAULT_SCAN_TIMEOUT,
                )?,
                on_failure: match scanner.on_failure {
                    crd::ScannerFailure::Tempfail => ScannerFailure::Tempfail,
                    crd::ScannerFailure::Accept => ScannerFailure::Accept,
                },
                pass_file: scanner.pass_file,
            })
        })
        .collect::<Result<_, SpecError>>()?;

    drain_timeout(mq)?;
    crd::parse_quantity_ok(&spec.spool.size)
        .then_some(())
        .ok_or_else(|| {
            field(
                "spool.size",
                format!("{:?} is not a quantity", spec.spool.size),
            )
        })?;

    config.validate().map_err(SpecError::Relay)?;
    let toml = toml::to_string(&config).map_err(|err| {
        SpecError::Relay(ConfigError::Invalid(format!(
            "cannot be written as TOML: {err}"
        )))
    })?;
    let hash = hex::encode(Sha256::digest(toml.as_bytes()))[..16].to_owned();
    Ok(RelayConfig {
        config,
        toml,
        hash,
        warnings,
    })
}

/// The `[cluster]` section of a clustered MailQueue: one etcd prefix per
/// MailQueue, a wildcard peer listener (each relay advertises its pod name,
/// which resolves to the pod's IP inside the pod), the headless Service as
/// the peer list, the shared secret and etcd's TLS files and credentials
/// from the mounted Secrets. The member name stays unset, so every relay is
/// its pod's name.
fn cluster(mq: &MailQueue, etcd: &crd::Etcd, replicas: usize) -> Result<ClusterConfig, SpecError> {
    let name = mq.metadata.name.as_deref().unwrap_or_default();
    let namespace = mq.metadata.namespace.as_deref().unwrap_or("default");
    if etcd.peer_secret.is_none() {
        return Err(field(
            "etcd.peerSecret",
            format!(
                "a clustered MailQueue needs a Secret whose key {PEER_SECRET_KEY:?} holds the \
                 shared secret between relays (at least 16 characters)"
            ),
        ));
    }
    for (index, endpoint) in etcd.endpoints.iter().enumerate() {
        let https = endpoint.0.starts_with("https://");
        if https && etcd.tls_secret.is_none() {
            return Err(field(
                "etcd.tlsSecret",
                format!(
                    "endpoint {:?} is https://: name a Secret whose {ETCD_CA_KEY:?} is the CA \
                     that signed etcd's certificate",
                    endpoint.0
                ),
            ));
        }
        if !https && etcd.tls_secret.is_some() {
            return Err(field(
                format!("etcd.endpoints[{index}]"),
                format!("{:?} must be https:// when tlsSecret is set", endpoint.0),
            ));
        }
    }
    if etcd.tls_client_certificate.is_some() && etcd.tls_secret.is_none() {
        return Err(field(
            "etcd.tlsClientCertificate",
            "says what tlsSecret holds, and tlsSecret is not set",
        ));
    }
    let peer_service = format!("{}.{namespace}.svc", crate::build::Names::of(mq).peers);
    let peers = format!("{peer_service}:{PEER_PORT}");
    let tls = PathBuf::from(ETCD_TLS_DIR);
    let auth = PathBuf::from(ETCD_AUTH_DIR);
    let client_certificate = etcd.client_certificate();
    Ok(ClusterConfig {
        etcd: etcd.endpoints.iter().map(|e| e.0.clone()).collect(),
        prefix: format!("/postern/{namespace}/{name}"),
        peer_listen: SocketAddr::from(([0, 0, 0, 0], PEER_PORT)),
        peers: vec![peers],
        secret_file: Some(PathBuf::from(PEER_SECRET_DIR).join(PEER_SECRET_KEY)),
        replicas,
        etcd_ca: etcd.tls_secret.as_ref().map(|_| tls.join(ETCD_CA_KEY)),
        etcd_cert: client_certificate.then(|| tls.join(ETCD_CERT_KEY)),
        etcd_key: client_certificate.then(|| tls.join(ETCD_KEY_KEY)),
        // Both from files of the mounted Secret: the operator never sees them.
        etcd_user_file: etcd
            .auth_secret
            .as_ref()
            .map(|_| auth.join(ETCD_USERNAME_KEY)),
        etcd_password_file: etcd
            .auth_secret
            .as_ref()
            .map(|_| auth.join(ETCD_PASSWORD_KEY)),
        tls: etcd.peer_tls_secret.as_ref().map(|_| {
            let dir = PathBuf::from(PEER_TLS_DIR);
            MutualTlsFiles {
                cert_file: dir.join(ETCD_CERT_KEY),
                key_file: dir.join(ETCD_KEY_KEY),
                ca_file: dir.join(ETCD_CA_KEY),
                // Certificates the CA issued for other names (another
                // MailQueue's relays, under a shared issuer) are refused.
                member_name: Some(peer_service.clone()),
            }
        }),
        ..ClusterConfig::default()
    })
}

/// Copies that can confirm a message with `relays` relays running, when
/// that is fewer than `config` writes (a peer copy needs another relay);
/// `None` when nothing is missing or no relay runs at all.
fn reachable_copies(config: &Config, relays: i32) -> Option<usize> {
    let cluster = config.cluster.as_ref()?;
    if relays < 1 || !config.spool.copies.contains(&RelayCopy::Peer) {
        return None;
    }
    let others = usize::try_from(relays - 1).unwrap_or(0);
    let missing = cluster.replicas.saturating_sub(others);
    (missing > 0).then(|| config.copy_count() - missing)
}

/// The drain timeout of a MailQueue.
pub fn drain_timeout(mq: &MailQueue) -> Result<std::time::Duration, SpecError> {
    duration(&mq.spec.drain_timeout, "drainTimeout")
}

fn duration(text: &str, at: &str) -> Result<std::time::Duration, SpecError> {
    crd::parse_duration(text)
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            field(
                at,
                format!("{text:?} is not a positive duration such as 90s, 5m or 1h30m"),
            )
        })
}

/// `text` as a positive duration, or `default` when the field is absent.
fn optional_duration(
    text: Option<&str>,
    at: &str,
    default: std::time::Duration,
) -> Result<std::time::Duration, SpecError> {
    text.map_or(Ok(default), |text| duration(text, at))
}

fn positive<T: TryFrom<i64>>(value: impl Into<i64>, at: &str) -> Result<T, SpecError> {
    let value = value.into();
    if value < 1 {
        return Err(field(at, format!("{value} is below 1")));
    }
    T::try_from(value).map_err(|_| field(at, format!("{value} is too large")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{MailQueueSpec, Network};

    fn mail_queue(spec: serde_json::Value) -> MailQueue {
        let spec: MailQueueSpec = serde_json::from_value(spec).unwrap();
        let mut mq = MailQueue::new("mx", spec);
        mq.metadata.namespace = Some("mail".into());
        mq
    }

    #[test]
    fn rendered_toml_is_what_the_relay_parses() {
        let mq = mail_queue(serde_json::json!({
            "image": "postern:1",
            "relayDomains": ["example.org"],
            "trustedNetworks": ["10.0.0.0/8"],
            "routes": [{"domains": ["example.org"], "nextHop": "[mx.example.org]:25",
                        "protocol": "lmtp", "credentialsSecret": "mx-auth"}],
            "objectStore": {"bucket": "mail", "endpoint": "http://s3:9000", "allowHttp": true},
            "delivery": {"retrySchedule": ["1m", "1h"], "maxAge": "2d"},
        }));
        let rendered = render(&mq).unwrap();
        let parsed = Config::parse(&rendered.toml).unwrap();
        assert_eq!(parsed, rendered.config);
        assert_eq!(parsed.hostname, "mx.mail.svc");
        assert_eq!(parsed.listeners[0].address.to_string(), "0.0.0.0:2525");
        assert_eq!(
            parsed.routes[0].auth_file.as_deref(),
            Some(std::path::Path::new("/etc/postern/routes/0/auth"))
        );
        assert_eq!(rendered.hash.len(), 16);
    }

    #[test]
    fn scanners_and_early_delivery_are_rendered() {
        let mq = mail_queue(serde_json::json!({
            "image": "postern:1",
            "listeners": [{"name": "smtp", "port": 2525, "scanners": ["rspamd"]}],
            "scanners": [{"name": "rspamd", "kind": "rspamd", "address": "rspamd.mail.svc:11333",
                          "timeout": "10s", "onFailure": "accept"}],
            "routes": [{"domains": ["example.org"], "nextHop": "unix:/run/lmtp",
                        "protocol": "lmtp", "earlyDelivery": true, "earlyBudget": "15s"}],
        }));
        let rendered = render(&mq).unwrap();
        let parsed = Config::parse(&rendered.toml).unwrap();
        assert_eq!(parsed, rendered.config);
        assert_eq!(parsed.listeners[0].scanners, ["rspamd"]);
        assert_eq!(parsed.scanners[0].kind, ScannerKind::Rspamd);
        assert_eq!(
            parsed.scanners[0].timeout,
            std::time::Duration::from_secs(10)
        );
        assert_eq!(parsed.scanners[0].on_failure, ScannerFailure::Accept);
        assert!(parsed.routes[0].early_delivery);
        assert_eq!(
            parsed.routes[0].early_budget,
            std::time::Duration::from_secs(15)
        );

        // A listener naming a scanner that is not defined: the relay says so.
        let mut mq = mq;
        mq.spec.listeners[0].scanners = vec!["clamav".into()];
        let err = render(&mq).unwrap_err().to_string();
        assert!(err.contains("no [[scanner]] named \"clamav\""), "{err}");
    }

    #[test]
    fn cross_field_mistakes_are_spec_errors() {
        let mut mq = mail_queue(serde_json::json!({"image": "postern:1"}));
        mq.spec.ack_policy.required = 3;
        let err = render(&mq).unwrap_err().to_string();
        assert!(err.contains("spec.ackPolicy.required"), "{err}");

        let mut mq = mail_queue(serde_json::json!({"image": "postern:1"}));
        mq.spec.trusted_networks = vec![Network("10.0.0.1/33".into())];
        let err = render(&mq).unwrap_err().to_string();
        assert!(err.contains("spec.trustedNetworks[0]"), "{err}");

        let mut mq = mail_queue(serde_json::json!({"image": "postern:1"}));
        mq.spec.listeners[0].port = 9325;
        let err = render(&mq).unwrap_err().to_string();
        assert!(err.contains("used twice"), "{err}");
    }

    #[test]
    fn submission_listeners_and_auth_are_rendered() {
        let mq = mail_queue(serde_json::json!({
            "image": "postern:1",
            "listeners": [
                {"name": "smtp", "port": 2525, "servicePort": 25},
                {"name": "submission", "port": 2587, "servicePort": 587,
                 "tlsSecret": "mx-tls", "mode": "submission"},
                {"name": "submissions", "port": 2465, "servicePort": 465,
                 "tlsSecret": "mx-tls", "mode": "submissions"},
            ],
            "auth": {"passwordSecret": "mx-users", "maxFailures": 5,
                     "senders": {"alice": ["alice@example.org", "@sales.example.org"]}},
        }));
        let rendered = render(&mq).unwrap();
        let parsed = Config::parse(&rendered.toml).unwrap();
        assert_eq!(parsed, rendered.config);
        let modes: Vec<ListenerMode> = parsed.listeners.iter().map(|l| l.mode).collect();
        assert_eq!(
            modes,
            [
                ListenerMode::Smtp,
                ListenerMode::Submission,
                ListenerMode::Submissions
            ]
        );
        assert_eq!(
            parsed.auth.password_file.as_deref(),
            Some(std::path::Path::new("/etc/postern/auth/passwd"))
        );
        assert_eq!(parsed.auth.max_failures, 5);
        assert_eq!(parsed.auth.senders["alice"][1], "@sales.example.org");

        let dovecot = mail_queue(serde_json::json!({
            "image": "postern:1",
            "listeners": [{"name": "submission", "port": 2587, "tlsSecret": "mx-tls",
                           "mode": "submission"}],
            "auth": {"dovecot": "dovecot.mail.svc:12345"},
        }));
        let parsed = Config::parse(&render(&dovecot).unwrap().toml).unwrap();
        assert_eq!(
            parsed.auth.dovecot.as_deref(),
            Some("dovecot.mail.svc:12345")
        );
        assert_eq!(parsed.auth.password_file, None);
    }

    #[test]
    fn submission_mistakes_are_spec_errors() {
        let submission = |listener: serde_json::Value, auth: serde_json::Value| {
            let mut spec = serde_json::json!({"image": "postern:1", "listeners": [listener]});
            if !auth.is_null() {
                spec["auth"] = auth;
            }
            render(&mail_queue(spec)).unwrap_err().to_string()
        };
        let err = submission(
            serde_json::json!({"name": "sub", "port": 2587, "mode": "submission"}),
            serde_json::json!({"passwordSecret": "users"}),
        );
        assert!(err.contains("spec.listeners[0].tlsSecret"), "{err}");
        let err = submission(
            serde_json::json!({"name": "sub", "port": 2587, "mode": "submissions",
                               "tlsSecret": "tls"}),
            serde_json::Value::Null,
        );
        assert!(err.contains("spec.auth"), "{err}");
        let err = submission(
            serde_json::json!({"name": "sub", "port": 2587, "mode": "submission",
                               "tlsSecret": "tls"}),
            serde_json::json!({"passwordSecret": "users", "dovecot": "dovecot:1"}),
        );
        assert!(err.contains("exactly one"), "{err}");
        let err = submission(
            serde_json::json!({"name": "sub", "port": 2587, "mode": "submission",
                               "tlsSecret": "tls"}),
            serde_json::json!({"dovecot": "/run/dovecot/auth-client"}),
        );
        assert!(err.contains("spec.auth.dovecot"), "{err}");
        let err = submission(
            serde_json::json!({"name": "sub", "port": 2587, "mode": "submission",
                               "tlsSecret": "tls"}),
            serde_json::json!({"passwordSecret": "users", "senders": {"a": ["not an address"]}}),
        );
        assert!(err.contains("auth.senders"), "{err}");
    }

    fn clustered(ack: serde_json::Value) -> MailQueue {
        mail_queue(serde_json::json!({
            "image": "postern:1",
            "replicas": 3,
            "ackPolicy": ack,
            "etcd": {"endpoints": ["http://etcd-0.etcd:2379", "http://etcd-1.etcd:2379"],
                     "peerSecret": "mx-peer"},
        }))
    }

    #[test]
    fn etcd_renders_a_cluster_section_the_relay_accepts() {
        let mq = clustered(serde_json::json!({"copies": ["local", "peer"], "required": 2}));
        let rendered = render(&mq).unwrap();
        assert!(rendered.toml.contains("\n[cluster]\n"), "{}", rendered.toml);
        assert!(rendered.warnings.is_empty(), "{:?}", rendered.warnings);
        let parsed = Config::parse(&rendered.toml).unwrap();
        parsed.validate().unwrap();
        assert_eq!(parsed, rendered.config);
        let cluster = parsed.cluster.as_ref().unwrap();
        assert_eq!(
            cluster.etcd,
            ["http://etcd-0.etcd:2379", "http://etcd-1.etcd:2379"]
        );
        assert_eq!(cluster.prefix, "/postern/mail/mx");
        assert_eq!(cluster.peer_listen.to_string(), "0.0.0.0:9327");
        assert_eq!(cluster.peers, ["mx-peers.mail.svc:9327"]);
        assert_eq!(
            cluster.secret_file.as_deref(),
            Some(std::path::Path::new("/etc/postern/peer/secret"))
        );
        assert_eq!(
            cluster.secret, None,
            "the secret never lands in the ConfigMap"
        );
        assert_eq!(cluster.name, None, "each relay is named after its pod");
        assert_eq!(cluster.advertise, None);
        assert_eq!(cluster.replicas, 1);
        assert_eq!(cluster.lease_ttl, ClusterConfig::default().lease_ttl);
        assert_eq!(parsed.spool.copies, [RelayCopy::Local, RelayCopy::Peer]);
        assert_eq!(parsed.copy_count(), 2);
    }

    #[test]
    fn peer_copies_count_peer_replicas_times() {
        let mq = clustered(
            serde_json::json!({"copies": ["local", "peer"], "required": 3, "peerReplicas": 2}),
        );
        let rendered = render(&mq).unwrap();
        assert_eq!(rendered.config.cluster.as_ref().unwrap().replicas, 2);
        assert_eq!(rendered.config.copy_count(), 3);
        assert_eq!(Config::parse(&rendered.toml).unwrap().copy_count(), 3);

        let mq = clustered(serde_json::json!({"copies": ["local", "peer"], "required": 3}));
        let err = render(&mq).unwrap_err().to_string();
        assert!(
            err.contains("spec.ackPolicy.required") && err.contains("only 2"),
            "{err}"
        );
    }

    #[test]
    fn a_peer_copy_without_etcd_is_a_spec_error() {
        let mq = mail_queue(serde_json::json!({
            "image": "postern:1",
            "ackPolicy": {"copies": ["local", "peer"], "required": 1},
        }));
        let err = render(&mq).unwrap_err().to_string();
        assert!(
            err.contains("spec.ackPolicy.copies") && err.contains("spec.etcd"),
            "{err}"
        );
    }

    #[test]
    fn etcd_without_a_peer_secret_is_a_spec_error() {
        let mut mq = clustered(serde_json::json!({"copies": ["local"], "required": 1}));
        mq.spec.etcd.as_mut().unwrap().peer_secret = None;
        let err = render(&mq).unwrap_err().to_string();
        assert!(err.contains("spec.etcd.peerSecret"), "{err}");
    }

    #[test]
    fn without_etcd_there_is_no_cluster_section() {
        let rendered = render(&mail_queue(serde_json::json!({"image": "postern:1"}))).unwrap();
        assert_eq!(rendered.config.cluster, None);
        assert!(!rendered.toml.contains("[cluster]"), "{}", rendered.toml);
        assert!(rendered.warnings.is_empty());
    }

    #[test]
    fn the_peer_port_and_name_are_reserved_in_a_cluster() {
        let unclustered = mail_queue(serde_json::json!({
            "image": "postern:1",
            "listeners": [{"name": "peer", "port": 9327}],
        }));
        render(&unclustered).unwrap();

        let mut mq = clustered(serde_json::json!({"copies": ["local"], "required": 1}));
        mq.spec.listeners[0].port = 9327;
        let err = render(&mq).unwrap_err().to_string();
        assert!(
            err.contains("spec.listeners[0].port") && err.contains("peer port 9327"),
            "{err}"
        );
        let mut mq = clustered(serde_json::json!({"copies": ["local"], "required": 1}));
        mq.spec.listeners[0].name = "peer".into();
        let err = render(&mq).unwrap_err().to_string();
        assert!(err.contains("spec.listeners[0].name"), "{err}");
    }

    fn secured(etcd: serde_json::Value) -> MailQueue {
        let mut mq = clustered(serde_json::json!({"copies": ["local"], "required": 1}));
        let mut spec = serde_json::to_value(mq.spec.etcd.take().unwrap()).unwrap();
        for (key, value) in etcd.as_object().unwrap() {
            spec[key] = value.clone();
        }
        mq.spec.etcd = Some(serde_json::from_value(spec).unwrap());
        mq
    }

    #[test]
    fn a_peer_tls_secret_becomes_mutual_tls_on_the_peer_channel() {
        let mq = secured(serde_json::json!({"peerTlsSecret": "mx-peer-tls"}));
        let rendered = render(&mq).unwrap();
        let parsed = Config::parse(&rendered.toml).unwrap();
        assert_eq!(parsed, rendered.config);
        let tls = parsed.cluster.unwrap().tls.expect("[cluster.tls]");
        assert_eq!(
            tls.cert_file,
            PathBuf::from("/etc/postern/peer-tls/tls.crt")
        );
        assert_eq!(tls.key_file, PathBuf::from("/etc/postern/peer-tls/tls.key"));
        assert_eq!(tls.ca_file, PathBuf::from("/etc/postern/peer-tls/ca.crt"));
        assert_eq!(tls.member_name.as_deref(), Some("mx-peers.mail.svc"));
        let plain = render(&secured(serde_json::json!({}))).unwrap();
        assert_eq!(plain.config.cluster.unwrap().tls, None);
    }

    #[test]
    fn etcd_tls_and_auth_secrets_become_file_paths() {
        let mq = secured(serde_json::json!({
            "endpoints": ["https://etcd-0.etcd:2379", "https://etcd-1.etcd:2379"],
            "tlsSecret": "etcd-client-tls",
            "authSecret": "etcd-auth",
        }));
        let rendered = render(&mq).unwrap();
        assert!(rendered.warnings.is_empty(), "{:?}", rendered.warnings);
        let parsed = Config::parse(&rendered.toml).unwrap();
        assert_eq!(parsed, rendered.config);
        let cluster = parsed.cluster.unwrap();
        let path = |p: &str| Some(PathBuf::from(p));
        assert_eq!(cluster.etcd_ca, path("/etc/postern/etcd/tls/ca.crt"));
        assert_eq!(cluster.etcd_cert, path("/etc/postern/etcd/tls/tls.crt"));
        assert_eq!(cluster.etcd_key, path("/etc/postern/etcd/tls/tls.key"));
        assert_eq!(
            cluster.etcd_user, None,
            "the user name is read from the Secret"
        );
        assert_eq!(
            cluster.etcd_user_file,
            path("/etc/postern/etcd/auth/username")
        );
        assert_eq!(
            cluster.etcd_password_file,
            path("/etc/postern/etcd/auth/password")
        );

        // Server verification only: no client certificate.
        let mq = secured(serde_json::json!({
            "endpoints": ["https://etcd:2379"],
            "tlsSecret": "etcd-ca",
            "tlsClientCertificate": false,
        }));
        let cluster = render(&mq).unwrap().config.cluster.unwrap();
        assert_eq!(cluster.etcd_ca, path("/etc/postern/etcd/tls/ca.crt"));
        assert_eq!((cluster.etcd_cert, cluster.etcd_key), (None, None));
        assert_eq!(cluster.etcd_password_file, None);

        // A user over plain http is the user's choice (etcd allows it).
        let mq = secured(serde_json::json!({"authSecret": "etcd-auth"}));
        let cluster = render(&mq).unwrap().config.cluster.unwrap();
        assert_eq!(cluster.etcd_ca, None);
        assert!(cluster.etcd_password_file.is_some());
    }

    #[test]
    fn etcd_tls_mistakes_are_spec_errors() {
        for (etcd, needle) in [
            (
                serde_json::json!({"endpoints": ["https://etcd:2379"]}),
                "spec.etcd.tlsSecret",
            ),
            (
                serde_json::json!({"endpoints": ["https://etcd-0:2379", "http://etcd-1:2379"],
                                   "tlsSecret": "etcd-tls"}),
                "spec.etcd.endpoints[1]",
            ),
            (
                serde_json::json!({"tlsClientCertificate": true}),
                "spec.etcd.tlsClientCertificate",
            ),
        ] {
            let err = render(&secured(etcd.clone())).unwrap_err().to_string();
            assert!(err.contains(needle), "{etcd}: {err}");
        }
    }

    #[test]
    fn etcd_credentials_and_an_unreachable_quorum_are_warnings() {
        let mut mq = clustered(serde_json::json!({"copies": ["local"], "required": 1}));
        mq.spec.etcd.as_mut().unwrap().credentials_secret = Some("etcd-client".into());
        let rendered = render(&mq).unwrap();
        let warnings = rendered.warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].reason, "Deprecated");
        assert!(
            warnings[0]
                .message
                .contains("credentialsSecret (etcd-client) is deprecated and ignored"),
            "{warnings:?}"
        );
        let cluster = rendered.config.cluster.unwrap();
        assert_eq!((cluster.etcd_ca, cluster.etcd_password_file), (None, None));

        // Two peer replicas need three relays; with two, only two of the
        // three copies can confirm.
        let mut mq = clustered(
            serde_json::json!({"copies": ["local", "peer"], "required": 3, "peerReplicas": 2}),
        );
        mq.spec.replicas = 2;
        let warnings = render(&mq).unwrap().warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].reason, "QuorumUnreachable");
        assert!(
            warnings[0].message.contains("only 2 copies"),
            "{warnings:?}"
        );
        // Enough copies for the quorum even with one peer missing: no warning.
        mq.spec.ack_policy.required = 2;
        assert!(render(&mq).unwrap().warnings.is_empty());
        // Three relays reach the quorum; zero relays accept no mail at all.
        mq.spec.ack_policy.required = 3;
        mq.spec.replicas = 3;
        assert!(render(&mq).unwrap().warnings.is_empty());
        mq.spec.replicas = 0;
        assert!(render(&mq).unwrap().warnings.is_empty());
    }

    #[test]
    fn a_different_spec_has_a_different_hash() {
        let mq = mail_queue(serde_json::json!({"image": "postern:1"}));
        let mut other = mq.clone();
        other
            .spec
            .relay_domains
            .push(crate::crd::Domain("example.net".into()));
        assert_ne!(render(&mq).unwrap().hash, render(&other).unwrap().hash);
        // The image is not part of the configuration.
        let mut image = mq.clone();
        image.spec.image = "postern:2".into();
        assert_eq!(render(&mq).unwrap().hash, render(&image).unwrap().hash);
    }
}
