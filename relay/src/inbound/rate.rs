//! `[rate_limits]`: how fast one client may open connections, start
//! transactions and add recipients, counted per client (an IPv4 address,
//! an IPv6 /64, a local user, or a user authenticated with a password —
//! such a session is counted both by its address and by its user) with
//! governor's GCRA: up to COUNT at once,
//! then one more each PERIOD/COUNT. Clients in the trusted networks are
//! exempt unless `limit_trusted`.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use super::limits::ClientKey;
use crate::config::{Rate, RateLimitsConfig};

/// Whom a rate counts: one address, or one IPv6 /64 (what one client
/// usually controls), or one local user.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Counted {
    V4(u32),
    V6Prefix(u64),
    Uid(u32),
    Login(String),
}

impl Counted {
    fn of(key: ClientKey) -> Counted {
        match key {
            ClientKey::Ip(IpAddr::V4(v4)) => Counted::V4(v4.into()),
            ClientKey::Ip(IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => Counted::V4(v4.into()),
                None => Counted::V6Prefix((u128::from(v6) >> 64) as u64),
            },
            ClientKey::Uid(uid) => Counted::Uid(uid),
        }
    }
}

fn limiter(rate: Option<Rate>) -> Option<DefaultKeyedRateLimiter<Counted>> {
    let rate = rate?;
    let every = rate.period / rate.count.get();
    let quota =
        Quota::with_period(every.max(std::time::Duration::from_nanos(1)))?.allow_burst(rate.count);
    Some(RateLimiter::keyed(quota))
}

/// The limits, shared by the sessions of the listeners that hold them.
pub struct RateLimits {
    connections: Option<DefaultKeyedRateLimiter<Counted>>,
    messages: Option<DefaultKeyedRateLimiter<Counted>>,
    recipients: Option<DefaultKeyedRateLimiter<Counted>>,
    limit_trusted: bool,
    /// Checks made, so the counters of clients gone quiet are dropped now
    /// and then.
    checks: AtomicU64,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("connections", &self.connections.is_some())
            .field("messages", &self.messages.is_some())
            .field("recipients", &self.recipients.is_some())
            .field("limit_trusted", &self.limit_trusted)
            .finish()
    }
}

/// What a limit is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// New connections.
    Connections,
    /// Transactions.
    Messages,
    /// Recipients.
    Recipients,
}

impl RateLimits {
    /// The limits of `[rate_limits]`.
    pub fn new(config: &RateLimitsConfig) -> RateLimits {
        RateLimits {
            connections: limiter(config.connections),
            messages: limiter(config.messages),
            recipients: limiter(config.recipients),
            limit_trusted: config.limit_trusted,
            checks: AtomicU64::new(0),
        }
    }

    /// Whether `client` (trusted or not) may do one more `what` now; a
    /// client with no key (an unknown Unix peer) is not limited.
    pub fn allows(&self, what: Limited, client: Option<ClientKey>, trusted: bool) -> bool {
        let Some(client) = client else {
            return true;
        };
        if trusted && !self.limit_trusted {
            return true;
        }
        self.check(what, &Counted::of(client))
    }

    /// Whether the user `login` (authenticated with a password) may do one
    /// more `what` now, wherever it connects from.
    pub fn allows_login(&self, what: Limited, login: &str) -> bool {
        self.check(what, &Counted::Login(login.to_lowercase()))
    }

    fn check(&self, what: Limited, counted: &Counted) -> bool {
        let limiter = match what {
            Limited::Connections => &self.connections,
            Limited::Messages => &self.messages,
            Limited::Recipients => &self.recipients,
        };
        let Some(limiter) = limiter else {
            return true;
        };
        if self.checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            for limiter in [&self.connections, &self.messages, &self.recipients]
                .into_iter()
                .flatten()
            {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
        limiter.check_key(counted).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(text: &str) -> RateLimits {
        RateLimits::new(&RateLimitsConfig {
            messages: Some(text.parse().unwrap()),
            ..RateLimitsConfig::default()
        })
    }

    fn ip(text: &str) -> Option<ClientKey> {
        Some(ClientKey::Ip(text.parse().unwrap()))
    }

    #[test]
    fn a_burst_passes_then_the_client_waits_and_others_do_not() {
        let limits = limits("3/1h");
        let one = ip("192.0.2.1");
        for _ in 0..3 {
            assert!(limits.allows(Limited::Messages, one, false));
        }
        assert!(!limits.allows(Limited::Messages, one, false));
        assert!(limits.allows(Limited::Messages, ip("192.0.2.2"), false));
        assert!(limits.allows(Limited::Messages, one, true), "trusted");
        assert!(
            limits.allows(Limited::Recipients, one, false),
            "no limit set"
        );
        assert!(limits.allows(Limited::Messages, None, false), "no key");
    }

    #[test]
    fn a_login_is_counted_wherever_it_connects_from() {
        let limits = limits("2/1h");
        assert!(limits.allows_login(Limited::Messages, "alice"));
        assert!(limits.allows_login(Limited::Messages, "Alice"));
        assert!(!limits.allows_login(Limited::Messages, "alice"));
        assert!(limits.allows_login(Limited::Messages, "bob"));
        assert!(limits.allows(Limited::Messages, ip("192.0.2.1"), false));
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let limits = limits("2/1h");
        assert!(limits.allows(Limited::Messages, ip("2001:db8:1:2::1"), false));
        assert!(limits.allows(Limited::Messages, ip("2001:db8:1:2::ffff"), false));
        assert!(!limits.allows(Limited::Messages, ip("2001:db8:1:2:abcd::9"), false));
        assert!(limits.allows(Limited::Messages, ip("2001:db8:1:3::1"), false));
        // A v4-mapped address counts as the IPv4 address.
        assert!(limits.allows(Limited::Messages, ip("::ffff:192.0.2.7"), false));
        assert!(limits.allows(Limited::Messages, ip("192.0.2.7"), false));
        assert!(!limits.allows(Limited::Messages, ip("192.0.2.7"), false));
    }
}
