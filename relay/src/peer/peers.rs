//! Peer addresses: `cluster.peers` (`host:port`, where a DNS name such as a
//! headless Service may stand for several relays) resolved again on every
//! use, minus this relay's own addresses.

use std::net::SocketAddr;

use crate::config::ClusterConfig;

/// The peers of this relay, as configured.
#[derive(Debug, Clone)]
pub struct Peers {
    peers: Vec<String>,
    own: Vec<String>,
}

/// The outcome of one resolution.
#[derive(Debug, Default)]
pub struct Resolved {
    /// Every peer address, sorted, without duplicates or this relay's own.
    pub addrs: Vec<SocketAddr>,
    /// Configured peers that did not resolve, with why.
    pub unresolved: Vec<(String, std::io::Error)>,
}

impl Peers {
    /// `peers` (`host:port` each), skipping whatever `own` (`host:port` each:
    /// this relay's advertised and listening addresses) resolves to.
    pub fn new(peers: Vec<String>, own: Vec<String>) -> Peers {
        Peers { peers, own }
    }

    /// The peers of `cluster`: `cluster.peers` minus `cluster.advertised()`
    /// and `cluster.peer_listen`. A wildcard `peer_listen` (`0.0.0.0`) only
    /// matches itself, so a relay that binds it should set `advertise`.
    pub fn from_config(cluster: &ClusterConfig) -> Peers {
        Peers::new(
            cluster.peers.clone(),
            vec![cluster.advertised(), cluster.peer_listen.to_string()],
        )
    }

    /// Resolves every configured peer now (DNS answers change as relays
    /// come and go).
    pub async fn resolve(&self) -> Resolved {
        let mut own = Vec::new();
        for name in &self.own {
            // This relay's own name not resolving only means it cannot be
            // among the peers' addresses.
            if let Ok(addrs) = tokio::net::lookup_host(name.as_str()).await {
                own.extend(addrs);
            }
        }
        let mut resolved = Resolved::default();
        for name in &self.peers {
            match tokio::net::lookup_host(name.as_str()).await {
                Ok(addrs) => resolved
                    .addrs
                    .extend(addrs.filter(|addr| !own.contains(addr))),
                Err(err) => resolved.unresolved.push((name.clone(), err)),
            }
        }
        resolved.addrs.sort();
        resolved.addrs.dedup();
        resolved
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peers_are_resolved_sorted_deduplicated_and_without_us() {
        let peers = Peers::new(
            vec![
                "127.0.0.1:9003".into(),
                "127.0.0.1:9001".into(),
                "localhost:9002".into(),
                "127.0.0.1:9001".into(),
                "127.0.0.1:9009".into(),
                "no-such-host.invalid:1".into(),
            ],
            vec!["127.0.0.1:9009".into(), "also-not.invalid:2".into()],
        );
        let resolved = peers.resolve().await;
        let ports: Vec<u16> = resolved
            .addrs
            .iter()
            .filter(|a| a.ip().is_ipv4())
            .map(SocketAddr::port)
            .collect();
        assert_eq!(ports, vec![9001, 9002, 9003]);
        let mut sorted = resolved.addrs.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, resolved.addrs);
        assert_eq!(resolved.unresolved.len(), 1);
        assert_eq!(resolved.unresolved[0].0, "no-such-host.invalid:1");
    }

    #[tokio::test]
    async fn the_config_skips_our_own_addresses() {
        let cluster = ClusterConfig {
            peer_listen: "127.0.0.1:9100".parse().unwrap(),
            advertise: Some("127.0.0.1:9101".into()),
            peers: vec![
                "127.0.0.1:9100".into(),
                "127.0.0.1:9101".into(),
                "127.0.0.1:9102".into(),
            ],
            ..ClusterConfig::default()
        };
        let resolved = Peers::from_config(&cluster).resolve().await;
        assert_eq!(resolved.addrs, vec!["127.0.0.1:9102".parse().unwrap()]);
    }
}
