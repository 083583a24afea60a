//! Slows password guessing down: failed AUTH attempts are counted per client
//! address (an IPv6 client by its /64) and per user name over a window. Each
//! failure's `535` waits longer than the last (`failure_delay`, doubling, up
//! to `max_failure_delay`); at `max_failures` the address or the user is
//! refused with `421` until its failures age out of the window, without its
//! password being checked.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::AuthConfig;

/// Whose failures are counted together.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Key {
    V4(u32),
    V6Prefix(u64),
    User(String),
}

impl Key {
    fn ip(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key::V4(v4.into()),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Key::V4(v4.into()),
                None => Key::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }

    fn user(name: &str) -> Key {
        Key::User(name.to_lowercase())
    }
}

/// What follows a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// How long to wait before answering.
    pub delay: Duration,
    /// Failures counted in the window for the address or the user,
    /// whichever has more.
    pub count: u32,
    /// Whether the limit is now reached: answer 421 and close.
    pub locked: bool,
}

/// Failure counts shared by all sessions of the relay.
#[derive(Debug)]
pub struct AuthThrottle {
    max_failures: u32,
    window: Duration,
    first_delay: Duration,
    max_delay: Duration,
    failures: Mutex<HashMap<Key, VecDeque<Instant>>>,
}

/// Above this many tracked keys, keys with no failure in the window are dropped.
const TIDY_ABOVE: usize = 10_000;

impl AuthThrottle {
    /// From `[auth]`.
    pub fn new(config: &AuthConfig) -> AuthThrottle {
        AuthThrottle {
            max_failures: config.max_failures,
            window: config.failure_window,
            first_delay: config.failure_delay,
            max_delay: config.max_failure_delay,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the address or the user has reached its limit (checked before
    /// the password, so a locked user cannot go on guessing).
    pub fn is_locked(&self, ip: Option<IpAddr>, user: &str, now: Instant) -> bool {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        self.keys(ip, user)
            .iter()
            .any(|key| self.recent(&mut failures, key, now) >= self.max_failures)
    }

    /// Records a failed attempt and says what follows.
    pub fn failed(&self, ip: Option<IpAddr>, user: &str, now: Instant) -> Failure {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failures.len() > TIDY_ABOVE {
            let window = self.window;
            failures.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|last| now.saturating_duration_since(*last) < window)
            });
        }
        let mut count = 0;
        for key in self.keys(ip, user) {
            self.recent(&mut failures, &key, now);
            let times = failures.entry(key).or_default();
            times.push_back(now);
            while times.len() > self.max_failures as usize {
                times.pop_front();
            }
            count = count.max(times.len() as u32);
        }
        let doublings = count.saturating_sub(1).min(16);
        let delay = self
            .first_delay
            .saturating_mul(1 << doublings)
            .min(self.max_delay);
        Failure {
            delay,
            count,
            locked: count >= self.max_failures,
        }
    }

    /// A success clears the user's failures (not the address's: one right
    /// password does not excuse guesses at other users).
    pub fn succeeded(&self, user: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        failures.remove(&Key::user(user));
    }

    fn keys(&self, ip: Option<IpAddr>, user: &str) -> Vec<Key> {
        ip.map(Key::ip)
            .into_iter()
            .chain((!user.is_empty()).then(|| Key::user(user)))
            .collect()
    }

    /// Drops failures older than the window; how many are left.
    fn recent(
        &self,
        failures: &mut HashMap<Key, VecDeque<Instant>>,
        key: &Key,
        now: Instant,
    ) -> u32 {
        let Some(times) = failures.get_mut(key) else {
            return 0;
        };
        while times
            .front()
            .is_some_and(|first| now.saturating_duration_since(*first) >= self.window)
        {
            times.pop_front();
        }
        times.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn throttle() -> AuthThrottle {
        AuthThrottle::new(&AuthConfig {
            max_failures: 4,
            failure_window: Duration::from_secs(600),
            failure_delay: Duration::from_millis(100),
            max_failure_delay: Duration::from_millis(350),
            ..AuthConfig::default()
        })
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn delays_grow_then_the_address_is_locked_until_the_window_passes() {
        let throttle = throttle();
        let start = Instant::now();
        let delays: Vec<(u64, bool)> = (0..4)
            .map(|n| {
                let failure = throttle.failed(ip("192.0.2.1"), &format!("user{n}"), start);
                (failure.delay.as_millis() as u64, failure.locked)
            })
            .collect();
        assert_eq!(
            delays,
            [(100, false), (200, false), (350, false), (350, true)]
        );
        assert!(throttle.is_locked(ip("192.0.2.1"), "someone", start));
        assert!(!throttle.is_locked(ip("192.0.2.2"), "someone", start));
        assert!(
            throttle.is_locked(ip("192.0.2.1"), "", start + Duration::from_secs(599)),
            "still in the window"
        );
        assert!(!throttle.is_locked(ip("192.0.2.1"), "", start + Duration::from_secs(600)));
    }

    #[test]
    fn a_user_guessed_at_from_many_addresses_is_locked_and_a_success_clears_it() {
        let throttle = throttle();
        let now = Instant::now();
        for n in 1..=4 {
            throttle.failed(ip(&format!("198.51.100.{n}")), "Alice", now);
        }
        assert!(throttle.is_locked(ip("203.0.113.9"), "alice", now));
        throttle.succeeded("alice");
        assert!(!throttle.is_locked(ip("203.0.113.9"), "alice", now));
        assert!(!throttle.is_locked(ip("2001:db8::1"), "alice", now));
    }

    #[test]
    fn an_ipv6_client_is_counted_by_its_64() {
        let throttle = throttle();
        let now = Instant::now();
        for n in 1..=4 {
            throttle.failed(ip(&format!("2001:db8:1:2::{n}")), &format!("u{n}"), now);
        }
        assert!(throttle.is_locked(ip("2001:db8:1:2::99"), "other", now));
        assert!(!throttle.is_locked(ip("2001:db8:1:3::1"), "other", now));
    }
}
