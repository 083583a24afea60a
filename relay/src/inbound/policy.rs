//! Relay policy: who may send to which recipients (no open relay), and where
//! mail for this relay's own postmaster goes.

use std::collections::HashSet;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::Config;
use crate::smtp::params::{Mailbox, ParamError, RcptParams};
use crate::smtp::Reply;

/// What the policy says about one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptDecision {
    /// Accept it as the client gave it.
    Accept,
    /// Mail for this relay's own postmaster (RFC 5321 §4.5.1): accept it
    /// for the configured mailbox instead, with these parameters (the
    /// client's, plus an ORCPT naming the address it gave).
    Postmaster {
        /// `policy.postmaster`.
        forward_path: Mailbox,
        /// The client's parameters, ORCPT filled in when it sent none.
        params: RcptParams,
    },
    /// The client may not relay to this domain: 554 5.7.1.
    RelayDenied,
    /// Mail for this relay's own postmaster, but `policy.postmaster` is not
    /// set: 550 5.1.1 with the reason.
    NoPostmaster,
}

impl RcptDecision {
    /// The reply refusing `rcpt` (as the client gave it), or `None` when the
    /// decision accepts it.
    pub fn refusal(&self, rcpt: &Mailbox) -> Option<Reply> {
        match self {
            RcptDecision::Accept | RcptDecision::Postmaster { .. } => None,
            RcptDecision::RelayDenied => Some(Reply::new(
                554,
                "5.7.1",
                format!("<{}>: Relay access denied", rcpt.address()),
            )),
            RcptDecision::NoPostmaster => Some(Reply::new(
                550,
                "5.1.1",
                format!(
                    "<{}>: This relay has no postmaster mailbox: its operator has not set \
                     policy.postmaster",
                    rcpt.address()
                ),
            )),
        }
    }
}

/// `policy.postmaster` is not a mailbox.
#[derive(Debug, thiserror::Error)]
#[error("policy.postmaster {address:?} is not a mailbox local@domain: {reason}")]
pub struct PolicyError {
    /// The configured text.
    pub address: String,
    /// What is wrong with it.
    pub reason: ParamError,
}

/// Decides whether a recipient may be accepted from a client.
#[derive(Debug, Clone)]
pub struct RelayPolicy {
    domains: HashSet<String>,
    /// Entries given as `.example.org`: any subdomain matches.
    parent_domains: Vec<String>,
    trusted: Vec<IpNet>,
    /// This relay's name: `postmaster@hostname` is its own postmaster.
    hostname: String,
    /// Where its postmaster's mail goes (`policy.postmaster`).
    postmaster: Option<Mailbox>,
}

impl RelayPolicy {
    /// Builds the policy from the configuration (`[policy]` and `hostname`).
    pub fn new(config: &Config) -> Result<RelayPolicy, PolicyError> {
        let policy = &config.policy;
        let mut domains = HashSet::new();
        let mut parent_domains = Vec::new();
        for domain in &policy.relay_domains {
            let domain = domain.trim_end_matches('.').to_ascii_lowercase();
            if domain.starts_with('.') {
                parent_domains.push(domain);
            } else {
                domains.insert(domain);
            }
        }
        let postmaster = policy
            .postmaster
            .as_ref()
            .map(|address| {
                Mailbox::parse(address).map_err(|reason| PolicyError {
                    address: address.clone(),
                    reason,
                })
            })
            .transpose()?;
        Ok(RelayPolicy {
            domains,
            parent_domains,
            trusted: policy.trusted_networks.clone(),
            hostname: config.hostname.trim_end_matches('.').to_ascii_lowercase(),
            postmaster,
        })
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

    /// Whether `rcpt` is this relay's own postmaster: `<postmaster>` without
    /// a domain, or `postmaster@<hostname>` (case-insensitive).
    pub fn is_own_postmaster(&self, rcpt: &Mailbox) -> bool {
        rcpt.is_postmaster()
            && (rcpt.domain.is_empty()
                || rcpt.domain.trim_end_matches('.').to_ascii_lowercase() == self.hostname)
    }

    /// Decides on `rcpt` (with its RCPT parameters) from this client.
    ///
    /// The relay's own postmaster is accepted from anyone and goes to
    /// `policy.postmaster`, whatever the client; without one, `<postmaster>`
    /// is refused (it names no domain to relay to) and `postmaster@<hostname>`
    /// is refused unless the client may relay anywhere (then it is relayed as
    /// any address). `postmaster@` a relay domain is relayed like the rest of
    /// that domain: its own mail server has the postmaster.
    pub fn decide(
        &self,
        client: Option<IpAddr>,
        authenticated: bool,
        rcpt: &Mailbox,
        params: &RcptParams,
    ) -> RcptDecision {
        let may_relay_anywhere = authenticated || self.is_trusted(client);
        if self.is_own_postmaster(rcpt) {
            return match &self.postmaster {
                Some(postmaster) => {
                    let mut params = params.clone();
                    if params.orcpt.is_none() {
                        params.orcpt =
                            Some(format!("rfc822;{}@{}", rcpt.local, self.qualified(rcpt)));
                    }
                    RcptDecision::Postmaster {
                        forward_path: postmaster.clone(),
                        params,
                    }
                }
                None if may_relay_anywhere && !rcpt.domain.is_empty() => RcptDecision::Accept,
                None => RcptDecision::NoPostmaster,
            };
        }
        if may_relay_anywhere || (!rcpt.domain.is_empty() && self.is_relay_domain(&rcpt.domain)) {
            RcptDecision::Accept
        } else {
            RcptDecision::RelayDenied
        }
    }

    /// The domain of an own-postmaster address: as given, or our host name
    /// for `<postmaster>`.
    fn qualified<'a>(&'a self, rcpt: &'a Mailbox) -> &'a str {
        if rcpt.domain.is_empty() {
            &self.hostname
        } else {
            &rcpt.domain
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    fn policy(postmaster: Option<&str>) -> RelayPolicy {
        let mut config = Config::default();
        config.hostname = "MX.example.com".into();
        config.policy.relay_domains = vec!["Example.org".into(), ".sub.example.net".into()];
        config.policy.trusted_networks = vec!["10.1.0.0/16".parse().unwrap()];
        config.policy.postmaster = postmaster.map(str::to_owned);
        RelayPolicy::new(&config).unwrap()
    }

    fn decide(
        policy: &RelayPolicy,
        client: &str,
        authenticated: bool,
        rcpt: &Mailbox,
    ) -> RcptDecision {
        policy.decide(
            Some(client.parse().unwrap()),
            authenticated,
            rcpt,
            &RcptParams::default(),
        )
    }

    const STRANGER: &str = "192.0.2.7";

    #[test]
    fn not_an_open_relay() {
        let policy = policy(None);
        let accepted = |client: &str, authenticated, domain: &str| {
            decide(&policy, client, authenticated, &mailbox("x", domain)) == RcptDecision::Accept
        };
        assert!(accepted(STRANGER, false, "example.ORG"));
        assert!(accepted(STRANGER, false, "a.sub.example.net"));
        assert!(!accepted(STRANGER, false, "sub.example.net.evil"));
        assert!(!accepted(STRANGER, false, "elsewhere.example"));
        assert!(accepted(STRANGER, true, "elsewhere.example"));
        assert!(accepted("10.1.2.3", false, "elsewhere.example"));
        assert!(accepted("::ffff:10.1.2.3", false, "elsewhere.example"));
        assert_eq!(
            decide(&policy, STRANGER, false, &mailbox("x", "elsewhere.example")),
            RcptDecision::RelayDenied
        );
        assert_eq!(
            policy.decide(
                None,
                false,
                &mailbox("x", "elsewhere.example"),
                &RcptParams::default()
            ),
            RcptDecision::RelayDenied
        );
    }

    #[test]
    fn own_postmaster_goes_to_the_configured_mailbox_from_anyone() {
        let policy = policy(Some("ops@example.org"));
        for (rcpt, orcpt) in [
            (
                mailbox("postmaster", ""),
                "rfc822;postmaster@mx.example.com",
            ),
            (
                mailbox("PostMaster", ""),
                "rfc822;PostMaster@mx.example.com",
            ),
            (
                mailbox("Postmaster", "mx.EXAMPLE.com."),
                "rfc822;Postmaster@mx.EXAMPLE.com.",
            ),
        ] {
            for client in [STRANGER, "10.1.2.3"] {
                assert_eq!(
                    decide(&policy, client, false, &rcpt),
                    RcptDecision::Postmaster {
                        forward_path: mailbox("ops", "example.org"),
                        params: RcptParams {
                            orcpt: Some(orcpt.into()),
                            ..RcptParams::default()
                        },
                    },
                    "{rcpt:?} from {client}"
                );
            }
        }
        // The client's own ORCPT and NOTIFY are kept.
        let given = RcptParams {
            notify: Some(vec![crate::smtp::params::Notify::Failure]),
            orcpt: Some("rfc822;postmaster@original.example".into()),
        };
        assert_eq!(
            policy.decide(
                Some(STRANGER.parse().unwrap()),
                false,
                &mailbox("postmaster", ""),
                &given
            ),
            RcptDecision::Postmaster {
                forward_path: mailbox("ops", "example.org"),
                params: given.clone(),
            }
        );
        // postmaster@ a relay domain is that domain's, relayed as it is.
        assert_eq!(
            decide(
                &policy,
                STRANGER,
                false,
                &mailbox("postmaster", "example.org")
            ),
            RcptDecision::Accept
        );
        // Other domains and other local parts are not ours.
        assert_eq!(
            decide(
                &policy,
                STRANGER,
                false,
                &mailbox("postmaster", "elsewhere.example")
            ),
            RcptDecision::RelayDenied
        );
        assert_eq!(
            decide(
                &policy,
                STRANGER,
                false,
                &mailbox("postmasterx", "mx.example.com")
            ),
            RcptDecision::RelayDenied
        );
    }

    #[test]
    fn without_a_postmaster_its_mail_is_refused_with_the_reason() {
        let policy = policy(None);
        for client in [STRANGER, "10.1.2.3"] {
            assert_eq!(
                decide(&policy, client, false, &mailbox("postmaster", "")),
                RcptDecision::NoPostmaster,
                "{client}"
            );
        }
        assert_eq!(
            decide(
                &policy,
                STRANGER,
                false,
                &mailbox("postmaster", "mx.example.com")
            ),
            RcptDecision::NoPostmaster
        );
        // A trusted client may still relay postmaster@hostname by MX, as before.
        assert_eq!(
            decide(
                &policy,
                "10.1.2.3",
                false,
                &mailbox("postmaster", "mx.example.com")
            ),
            RcptDecision::Accept
        );
    }
}
