//! `[auth.senders]`: which envelope senders an authenticated user may use,
//! as Postfix's `reject_sender_login_mismatch`. A user listed may use the
//! addresses and `@domain`s listed (and `<>` when listed); a user not listed
//! may use its login when that is an address, and nothing else.

use std::collections::HashMap;

use crate::config::AuthConfig;
use crate::smtp::params::Mailbox;

/// One allowed sender.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Allowed {
    /// `<>`.
    Null,
    /// Any local part at this domain (lowercase, no trailing dot).
    Domain(String),
    /// Exactly this address (local part as written, domain lowercase).
    Address { local: String, domain: String },
}

fn domain_key(domain: &str) -> String {
    domain.trim_end_matches('.').to_ascii_lowercase()
}

fn address(text: &str) -> Option<Allowed> {
    let (local, domain) = text.rsplit_once('@')?;
    (!local.is_empty() && !domain.is_empty()).then(|| Allowed::Address {
        local: local.to_owned(),
        domain: domain_key(domain),
    })
}

/// The sender rules of `[auth.senders]`.
#[derive(Debug, Clone, Default)]
pub struct SenderLogins {
    users: HashMap<String, Vec<Allowed>>,
}

impl SenderLogins {
    /// From the validated `[auth]`.
    pub fn new(config: &AuthConfig) -> SenderLogins {
        let users = config
            .senders
            .iter()
            .map(|(user, senders)| {
                let allowed = senders
                    .iter()
                    .filter_map(|sender| match sender.as_str() {
                        "<>" => Some(Allowed::Null),
                        _ => match sender.strip_prefix('@') {
                            Some(domain) => Some(Allowed::Domain(domain_key(domain))),
                            None => address(sender),
                        },
                    })
                    .collect();
                (user.clone(), allowed)
            })
            .collect();
        SenderLogins { users }
    }

    fn allowed(&self, user: &str) -> Vec<Allowed> {
        match self.users.get(user) {
            Some(allowed) => allowed.clone(),
            None => address(user).into_iter().collect(),
        }
    }

    /// Whether `user` may use `sender` (`None`: the null sender).
    pub fn may_send_as(&self, user: &str, sender: Option<&Mailbox>) -> bool {
        self.allowed(user)
            .iter()
            .any(|allowed| match (allowed, sender) {
                (Allowed::Null, None) => true,
                (Allowed::Domain(domain), Some(sender)) => domain_key(&sender.domain) == *domain,
                (Allowed::Address { local, domain }, Some(sender)) => {
                    sender.local == *local && domain_key(&sender.domain) == *domain
                }
                _ => false,
            })
    }

    /// The rule, for refusals.
    pub fn describe(&self, user: &str) -> String {
        let allowed = self.allowed(user);
        if allowed.is_empty() {
            return "no sender (not in auth.senders)".into();
        }
        allowed
            .iter()
            .map(|allowed| match allowed {
                Allowed::Null => "<>".to_owned(),
                Allowed::Domain(domain) => format!("@{domain}"),
                Allowed::Address { local, domain } => format!("{local}@{domain}"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mailbox(text: &str) -> Mailbox {
        let (local, domain) = text.split_once('@').unwrap();
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn listed_users_get_their_list_and_others_their_own_address() {
        let mut config = AuthConfig::default();
        config.senders.insert(
            "alice".into(),
            vec![
                "alice@example.org".into(),
                "@Sales.Example.ORG".into(),
                "<>".into(),
            ],
        );
        let senders = SenderLogins::new(&config);
        assert!(senders.may_send_as("alice", Some(&mailbox("alice@EXAMPLE.org."))));
        assert!(senders.may_send_as("alice", Some(&mailbox("anyone@sales.example.org"))));
        assert!(senders.may_send_as("alice", None));
        assert!(!senders.may_send_as("alice", Some(&mailbox("Alice@example.org"))));
        assert!(!senders.may_send_as("alice", Some(&mailbox("bob@example.org"))));
        assert!(senders.may_send_as("bob@example.net", Some(&mailbox("bob@example.net"))));
        assert!(!senders.may_send_as("bob@example.net", Some(&mailbox("bob@example.org"))));
        assert!(!senders.may_send_as("bob@example.net", None));
        assert!(!senders.may_send_as("carol", Some(&mailbox("carol@example.org"))));
        assert_eq!(senders.describe("carol"), "no sender (not in auth.senders)");
        assert_eq!(
            senders.describe("alice"),
            "alice@example.org, @sales.example.org, <>"
        );
    }
}
