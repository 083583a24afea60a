//! Validates a MailQueue spec and renders it into the relay's own typed
//! [`Config`], so the TOML in the ConfigMap is exactly what `postern serve`
//! accepts (same types, same `validate()`); nothing here writes TOML by hand.

use std::net::SocketAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use postern::config::{
    Config, ConfigError, CopyKind as RelayCopy, ListenerConfig, ObjectStoreConfig, Protocol,
    RouteConfig, TlsMode,
};
use sha2::{Digest, Sha256};

use crate::crd::{self, CopyKind, MailQueue, RouteProtocol, RouteTls};

/// Where the spool volume is mounted in the relay container.
pub const DATA_DIR: &str = "/var/lib/postern";
/// Where the ConfigMap is mounted.
pub const CONFIG_DIR: &str = "/etc/postern";
/// The configuration file's name in the ConfigMap.
pub const CONFIG_FILE: &str = "postern.toml";
/// Container port of `/healthz`, `/readyz`, `/stats`, `/metrics`.
pub const HTTP_PORT: u16 = 9325;
/// Where listener TLS Secrets are mounted (`<dir>/<listener>/tls.crt`).
pub const TLS_DIR: &str = "/etc/postern/tls";
/// Where route credential Secrets are mounted (`<dir>/<index>/auth`).
pub const ROUTE_AUTH_DIR: &str = "/etc/postern/routes";

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
    /// Things the spec asks for that the relay cannot do yet (reported as events).
    pub warnings: Vec<String>,
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
    for (index, listener) in spec.listeners.iter().enumerate() {
        let at = format!("listeners[{index}]");
        let port = u16::try_from(listener.port)
            .ok()
            .filter(|port| *port > 0)
            .ok_or_else(|| field(format!("{at}.port"), "must be between 1 and 65535"))?;
        if !ports.insert(port) {
            return Err(field(
                format!("{at}.port"),
                format!("port {port} is used twice (the relay's HTTP port is {HTTP_PORT})"),
            ));
        }
        if !names.insert(listener.name.clone()) {
            return Err(field(
                format!("{at}.name"),
                format!(
                    "name {:?} is used twice (\"http\" is reserved)",
                    listener.name
                ),
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
        });
    }
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
        })
        .collect();
    config.spool.required = positive(ack.required, "ackPolicy.required")?;
    if config.spool.required > config.spool.copies.len() {
        return Err(field(
            "ackPolicy.required",
            format!(
                "{} copies required but only {} listed in ackPolicy.copies",
                ack.required,
                ack.copies.len()
            ),
        ));
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
    if let Some(etcd) = &spec.etcd {
        warnings.push(format!(
            "spec.etcd ({} endpoints) is not used yet: this relay version has no etcd \
             configuration, each relay delivers its own spool",
            etcd.endpoints.len()
        ));
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
        .map(|(index, route)| RouteConfig {
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
        })
        .collect();

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
