//! Routing: which next hop a recipient domain goes to (static routes, the
//! relayhost, or MX).

use std::path::PathBuf;
use std::time::Duration;

use crate::config::{Config, Protocol, RouteConfig, TlsMode};

/// Where a static route or the relayhost points.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// A host name or address and port; never looked up as MX.
    Host {
        /// Host name or IP address (brackets removed).
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix stream socket.
    Unix(PathBuf),
}

impl NextHop {
    /// Parses `host:port`, `[host]:port`, `[v6addr]:port` or `unix:/path`.
    pub fn parse(text: &str) -> Result<NextHop, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!("{text:?}: a Unix socket path must be absolute"));
            }
            return Ok(NextHop::Unix(PathBuf::from(path)));
        }
        let (host, port) = text
            .rsplit_once(':')
            .ok_or_else(|| format!("{text:?}: expected host:port or unix:/path"))?;
        let port: u16 = port.parse().map_err(|_| format!("{text:?}: bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{text:?}: empty host"));
        }
        Ok(NextHop::Host {
            host: host.to_owned(),
            port,
        })
    }
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextHop::Host { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NextHop::Host { host, port } => write!(f, "{host}:{port}"),
            NextHop::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// How a recipient domain is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Destination {
    /// A static next hop, or `None` for MX lookup of `domain`.
    pub next_hop: Option<NextHop>,
    /// The recipient domain (lower case); for MX routes, what is looked up.
    pub domain: String,
    /// SMTP or LMTP.
    pub protocol: Protocol,
    /// STARTTLS policy.
    pub tls: TlsMode,
    /// AUTH credentials file.
    pub auth_file: Option<PathBuf>,
    /// Early delivery's budget, when the route opts in.
    pub early_budget: Option<Duration>,
}

impl Destination {
    /// The key deliveries are grouped and limited by: the next hop, or the
    /// domain for MX routes.
    pub fn key(&self) -> String {
        match &self.next_hop {
            Some(hop) => hop.to_string(),
            None => format!("mx:{}", self.domain),
        }
    }
}

/// Routing table built from the configuration.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(Vec<String>, Destination)>,
    relayhost: Option<NextHop>,
}

impl Router {
    /// Builds the table; the configuration was validated already.
    pub fn new(config: &Config) -> Router {
        let routes = config
            .routes
            .iter()
            .filter_map(|route: &RouteConfig| {
                let next_hop = NextHop::parse(&route.next_hop).ok()?;
                let domains = route
                    .domains
                    .iter()
                    .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                    .collect();
                Some((
                    domains,
                    Destination {
                        next_hop: Some(next_hop),
                        domain: String::new(),
                        protocol: route.protocol,
                        tls: route.tls,
                        auth_file: route.auth_file.clone(),
                        early_budget: route.early_delivery.then_some(route.early_budget),
                    },
                ))
            })
            .collect();
        let relayhost = config
            .delivery
            .relayhost
            .as_deref()
            .and_then(|text| NextHop::parse(text).ok());
        Router { routes, relayhost }
    }

    /// Whether any route delivers early (else the end of data need not
    /// route each recipient to find out).
    pub fn has_early_routes(&self) -> bool {
        self.routes
            .iter()
            .any(|(_, destination)| destination.early_budget.is_some())
    }

    /// The destination for a recipient domain.
    pub fn route(&self, domain: &str) -> Destination {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        for (domains, destination) in &self.routes {
            let hit = domains
                .iter()
                .any(|pattern| match pattern.strip_prefix('.') {
                    Some(parent) => domain.ends_with(pattern.as_str()) || domain == parent,
                    None => *pattern == domain,
                });
            if hit {
                return Destination {
                    domain,
                    ..destination.clone()
                };
            }
        }
        Destination {
            next_hop: self.relayhost.clone(),
            domain,
            protocol: Protocol::Smtp,
            tls: TlsMode::Opportunistic,
            auth_file: None,
            early_budget: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hop_forms() {
        assert_eq!(
            NextHop::parse("[127.0.0.1]:25").unwrap(),
            NextHop::Host {
                host: "127.0.0.1".into(),
                port: 25
            }
        );
        assert_eq!(
            NextHop::parse("[::1]:2525").unwrap().to_string(),
            "[::1]:2525"
        );
        assert_eq!(
            NextHop::parse("unix:/run/lmtp").unwrap(),
            NextHop::Unix("/run/lmtp".into())
        );
        assert!(NextHop::parse("unix:relative").is_err());
        assert!(NextHop::parse("nohost").is_err());
    }

    #[test]
    fn routes_then_relayhost_then_mx() {
        let mut config = Config::default();
        config.routes = vec![RouteConfig {
            domains: vec!["Example.org".into(), ".lists.example.net".into()],
            next_hop: "unix:/run/lmtp".into(),
            protocol: Protocol::Lmtp,
            tls: TlsMode::None,
            auth_file: None,
            early_delivery: false,
            early_budget: Duration::from_secs(20),
        }];
        let router = Router::new(&config);
        assert_eq!(router.route("EXAMPLE.org.").protocol, Protocol::Lmtp);
        assert_eq!(router.route("a.lists.example.net").protocol, Protocol::Lmtp);
        let mx = router.route("elsewhere.example");
        assert_eq!(mx.next_hop, None);
        assert_eq!(mx.key(), "mx:elsewhere.example");
        config.delivery.relayhost = Some("smart.example:587".into());
        let router = Router::new(&config);
        assert_eq!(router.route("elsewhere.example").key(), "smart.example:587");
        assert!(!router.has_early_routes());
        config.routes[0].early_delivery = true;
        let router = Router::new(&config);
        assert!(router.has_early_routes());
        assert_eq!(
            router.route("example.org").early_budget,
            Some(Duration::from_secs(20))
        );
        assert_eq!(router.route("elsewhere.example").early_budget, None);
    }
}
