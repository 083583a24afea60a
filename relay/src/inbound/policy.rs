//! Relay policy: who may send to which recipients (no open relay).

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::PolicyConfig;
use crate::smtp::params::Mailbox;

/// Decides whether a recipient may be accepted from a client.
#[derive(Debug, Clone)]
pub struct RelayPolicy {
    domains: HashSet<String>,
    /// Entries given as `.example.org`: any subdomain matches.
    parent_domains: Vec<String>,
    trusted: Vec<IpNet>,
}

impl RelayPolicy {
    /// Builds the policy from its configuration section.
    pub fn new(config: &PolicyConfig) -> RelayPolicy {
        let mut domains = HashSet::new();
        let mut parent_domains = Vec::new();
        for domain in &config.relay_domains {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            if domain.starts_with('.') {
                parent_domains.push(domain);
            } else {
                domains.insert(domain);
            }
        }
        RelayPolicy {
            domains,
            parent_domains,
            trusted: config.trusted_networks.clone(),
        }
    }

    /// Whether the client address is in a trusted network.
    pub fn is_trusted(&self, client: Option<IpAddr>) -> bool {
        client.is_some_and(|ip| {
            let ip = match ip {
                IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
                v4 => v4,
            };
            self.trusted.iter().any(|net| net.contains(&ip))
        })
    }

    /// Whether the domain is one we accept mail for from anyone.
    pub fn is_relay_domain(&self, domain: &str) -> bool {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        self.domains.contains(&domain)
            || self
                .parent_domains
                .iter()
                .any(|parent| domain.ends_with(parent.as_str()))
    }

    /// Whether `rcpt` may be accepted from this client.
    pub fn may_relay(&self, client: Option<IpAddr>, authenticated: bool, rcpt: &Mailbox) -> bool {
        authenticated
            || self.is_trusted(client)
            || (!rcpt.domain.is_empty() && self.is_relay_domain(&rcpt.domain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(domain: &str) -> Mailbox {
        Mailbox {
            local: "x".into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn not_an_open_relay() {
        let policy = RelayPolicy::new(&PolicyConfig {
            relay_domains: vec!["Example.org".into(), ".sub.example.net".into()],
            trusted_networks: vec!["10.1.0.0/16".parse().unwrap()],
        });
        let stranger: Option<IpAddr> = Some("192.0.2.7".parse().unwrap());
        assert!(policy.may_relay(stranger, false, &mailbox("example.ORG")));
        assert!(policy.may_relay(stranger, false, &mailbox("a.sub.example.net")));
        assert!(!policy.may_relay(stranger, false, &mailbox("sub.example.net.evil")));
        assert!(!policy.may_relay(stranger, false, &mailbox("elsewhere.example")));
        assert!(policy.may_relay(stranger, true, &mailbox("elsewhere.example")));
        assert!(policy.may_relay(
            Some("10.1.2.3".parse().unwrap()),
            false,
            &mailbox("elsewhere.example")
        ));
        assert!(policy.may_relay(
            Some("::ffff:10.1.2.3".parse().unwrap()),
            false,
            &mailbox("elsewhere.example")
        ));
        assert!(!policy.may_relay(None, false, &mailbox("elsewhere.example")));
    }
}
