//! Local submission: the Unix socket `postern sendmail` talks SMTP to. The
//! kernel tells us who connected (`SO_PEERCRED`); AUTH EXTERNAL makes that
//! the session's identity, and a user may send only as themselves unless
//! trusted (root always is).

use std::collections::HashSet;

use crate::config::Config;
use crate::smtp::params::Mailbox;

/// The local user on the other end of the socket, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalUser {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Process id, when the kernel gave it.
    pub pid: Option<i32>,
    /// Login name; the uid in decimal when the account has no name.
    pub name: String,
}

impl LocalUser {
    /// The user behind a connected Unix socket. The name lookup may ask
    /// NSS (LDAP, sssd): it runs on a blocking thread.
    pub async fn of(stream: &tokio::net::UnixStream) -> std::io::Result<LocalUser> {
        let cred = stream.peer_cred()?;
        let uid = cred.uid();
        let name = tokio::task::spawn_blocking(move || crate::users::by_uid(uid))
            .await
            .ok()
            .flatten()
            .map(|entry| entry.name);
        Ok(LocalUser {
            uid,
            gid: cred.gid(),
            pid: cred.pid(),
            name: name.unwrap_or_else(|| uid.to_string()),
        })
    }
}

/// Which envelope senders a local user may use.
#[derive(Debug, Clone)]
pub struct SenderPolicy {
    trusted: HashSet<String>,
    own_domains: HashSet<String>,
}

impl SenderPolicy {
    /// From `[submission]`: `trusted_users`, and `hostname` plus `domains`
    /// as the domains of a user's own address.
    pub fn new(config: &Config) -> SenderPolicy {
        SenderPolicy {
            trusted: config.submission.trusted_users.iter().cloned().collect(),
            own_domains: std::iter::once(&config.hostname)
                .chain(&config.submission.domains)
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
        }
    }

    /// Whether `user` may use `sender` (`None`: the null sender `<>`).
    pub fn may_send_as(&self, user: &LocalUser, sender: Option<&Mailbox>) -> bool {
        if self.is_trusted(user) {
            return true;
        }
        sender.is_some_and(|sender| {
            sender.local == user.name
                && self
                    .own_domains
                    .contains(&sender.domain.trim_end_matches('.').to_ascii_lowercase())
        })
    }

    /// Whether `user` may use any sender.
    pub fn is_trusted(&self, user: &LocalUser) -> bool {
        user.uid == 0 || self.trusted.contains(&user.name)
    }

    /// The rule, for refusals.
    pub fn describe(&self, user: &LocalUser) -> String {
        let mut domains: Vec<&str> = self.own_domains.iter().map(String::as_str).collect();
        domains.sort_unstable();
        format!("{}@{{{}}}", user.name, domains.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(uid: u32, name: &str) -> LocalUser {
        LocalUser {
            uid,
            gid: uid,
            pid: None,
            name: name.into(),
        }
    }

    fn mailbox(local: &str, domain: &str) -> Mailbox {
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    #[test]
    fn users_send_as_themselves_at_own_domains_only() {
        let mut config = Config::default();
        config.hostname = "mx.example.org".into();
        config.submission.domains = vec!["Example.ORG".into()];
        config.submission.trusted_users = vec!["www-data".into()];
        let policy = SenderPolicy::new(&config);
        let alice = user(1000, "alice");
        assert!(policy.may_send_as(&alice, Some(&mailbox("alice", "mx.example.org"))));
        assert!(policy.may_send_as(&alice, Some(&mailbox("alice", "example.org."))));
        assert!(!policy.may_send_as(&alice, Some(&mailbox("bob", "example.org"))));
        assert!(!policy.may_send_as(&alice, Some(&mailbox("alice", "elsewhere.example"))));
        assert!(!policy.may_send_as(&alice, Some(&mailbox("Alice", "example.org"))));
        assert!(!policy.may_send_as(&alice, None), "null sender needs trust");
        assert!(policy.may_send_as(&user(0, "root"), Some(&mailbox("bob", "x.example"))));
        assert!(policy.may_send_as(&user(33, "www-data"), None));
        assert_eq!(
            policy.describe(&alice),
            "alice@{example.org,mx.example.org}"
        );
    }
}
