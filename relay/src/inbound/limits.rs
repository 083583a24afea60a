//! Connection limits: total and per client (its address, or for the local
//! submission socket its uid).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::rate::RateLimits;
use crate::config::RateLimitsConfig;

/// Counts open connections; a slot is held by a [`ConnectionSlot`].
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    inner: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_ip: usize,
    /// `[rate_limits]`, shared like the counts.
    rates: Arc<RateLimits>,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_client: HashMap<ClientKey, usize>,
}

/// Whose connections are counted together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// A TCP client's address.
    Ip(IpAddr),
    /// A local user on the submission socket.
    Uid(u32),
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    /// All slots are taken.
    Total,
    /// This client (address or local user) has too many connections.
    PerClient,
}

/// An open connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: ConnectionLimiter,
    client: Option<ClientKey>,
}

impl ConnectionLimiter {
    /// A limiter with the given maxima.
    pub fn new(max_total: usize, max_per_ip: usize) -> ConnectionLimiter {
        ConnectionLimiter {
            inner: Arc::default(),
            max_total,
            max_per_ip,
            rates: Arc::new(RateLimits::new(&RateLimitsConfig::default())),
        }
    }

    /// This limiter with `rates` as its `[rate_limits]`.
    pub fn with_rates(mut self, rates: RateLimits) -> ConnectionLimiter {
        self.rates = Arc::new(rates);
        self
    }

    /// The `[rate_limits]` every listener sharing this limiter counts in.
    pub fn rates(&self) -> &RateLimits {
        &self.rates
    }

    /// Takes a slot for a connection from `client` (`None`: counted in the
    /// total only); `max_connections_per_ip` bounds each client.
    pub fn acquire(&self, client: Option<ClientKey>) -> Result<ConnectionSlot, LimitExceeded> {
        let mut counts = self.inner.lock().expect("limiter lock");
        if counts.total >= self.max_total {
            return Err(LimitExceeded::Total);
        }
        if let Some(client) = client {
            let count = counts.per_client.entry(client).or_default();
            if *count >= self.max_per_ip {
                return Err(LimitExceeded::PerClient);
            }
            *count += 1;
        }
        counts.total += 1;
        Ok(ConnectionSlot {
            limiter: self.clone(),
            client,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.inner.lock().expect("limiter lock").total
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut counts = self.limiter.inner.lock().expect("limiter lock");
        counts.total -= 1;
        if let Some(client) = self.client {
            if let Some(count) = counts.per_client.get_mut(&client) {
                *count -= 1;
                if *count == 0 {
                    counts.per_client.remove(&client);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_ip_and_total() {
        let limiter = ConnectionLimiter::new(3, 2);
        let a = ClientKey::Ip("192.0.2.1".parse().unwrap());
        let b = ClientKey::Ip("192.0.2.2".parse().unwrap());
        let first = limiter.acquire(Some(a)).unwrap();
        let _second = limiter.acquire(Some(a)).unwrap();
        assert_eq!(
            limiter.acquire(Some(a)).unwrap_err(),
            LimitExceeded::PerClient
        );
        let _third = limiter.acquire(Some(b)).unwrap();
        assert_eq!(limiter.acquire(Some(b)).unwrap_err(), LimitExceeded::Total);
        drop(first);
        let _again = limiter.acquire(Some(a)).unwrap();
        assert_eq!(limiter.open(), 3);
    }

    #[test]
    fn local_users_are_limited_by_uid() {
        let limiter = ConnectionLimiter::new(10, 1);
        let _alice = limiter.acquire(Some(ClientKey::Uid(1000))).unwrap();
        assert_eq!(
            limiter.acquire(Some(ClientKey::Uid(1000))).unwrap_err(),
            LimitExceeded::PerClient
        );
        let _bob = limiter.acquire(Some(ClientKey::Uid(1001))).unwrap();
        let _unknown = limiter.acquire(None).unwrap();
        assert_eq!(limiter.open(), 3);
    }
}
