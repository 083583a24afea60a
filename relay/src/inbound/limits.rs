//! Connection limits: total and per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Counts open connections; a slot is held by a [`ConnectionSlot`].
#[derive(Debug, Clone)]
pub struct ConnectionLimiter {
    inner: Arc<Mutex<Counts>>,
    max_total: usize,
    max_per_ip: usize,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitExceeded {
    /// All slots are taken.
    Total,
    /// This address has too many connections.
    PerIp,
}

/// An open connection; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnectionSlot {
    limiter: ConnectionLimiter,
    ip: Option<IpAddr>,
}

impl ConnectionLimiter {
    /// A limiter with the given maxima.
    pub fn new(max_total: usize, max_per_ip: usize) -> ConnectionLimiter {
        ConnectionLimiter {
            inner: Arc::default(),
            max_total,
            max_per_ip,
        }
    }

    /// Takes a slot for a connection from `ip` (`None` for Unix sockets).
    pub fn acquire(&self, ip: Option<IpAddr>) -> Result<ConnectionSlot, LimitExceeded> {
        let mut counts = self.inner.lock().expect("limiter lock");
        if counts.total >= self.max_total {
            return Err(LimitExceeded::Total);
        }
        if let Some(ip) = ip {
            let count = counts.per_ip.entry(ip).or_default();
            if *count >= self.max_per_ip {
                return Err(LimitExceeded::PerIp);
            }
            *count += 1;
        }
        counts.total += 1;
        Ok(ConnectionSlot {
            limiter: self.clone(),
            ip,
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
        if let Some(ip) = self.ip {
            if let Some(count) = counts.per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    counts.per_ip.remove(&ip);
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
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limiter.acquire(Some(a)).unwrap();
        let _second = limiter.acquire(Some(a)).unwrap();
        assert_eq!(limiter.acquire(Some(a)).unwrap_err(), LimitExceeded::PerIp);
        let _third = limiter.acquire(Some(b)).unwrap();
        assert_eq!(limiter.acquire(Some(b)).unwrap_err(), LimitExceeded::Total);
        drop(first);
        let _again = limiter.acquire(Some(a)).unwrap();
        assert_eq!(limiter.open(), 3);
    }
}
