//! [`PeerCopy`]: the `"peer"` copy of the quorum writer. Each target streams
//! the message to one peer, trying the peers in an order that starts at a
//! place given by the message id and the target's replica index, so the
//! replicas of a message land on different relays.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

use super::{PeerClient, PeerError, Peers};
use crate::config::{Config, CopyKind};
use crate::spool::quorum::{CopyError, CopyJob, CopyTarget};

/// How long a peer may take to confirm before the next one is tried too.
const HEDGE_AFTER: Duration = Duration::from_millis(750);

/// Which peers the targets of one group are writing each message to, so two
/// targets never count one peer's replica twice.
#[derive(Debug, Default)]
pub struct Placement {
    /// Message id → (targets writing it, peers taken for it).
    taken: Mutex<HashMap<String, (usize, Vec<SocketAddr>)>>,
}

impl Placement {
    /// Registers a writer of `id`; the entry goes when the last one leaves.
    fn join(self: &Arc<Self>, id: &str) -> PlacementGuard {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        taken.entry(id.to_owned()).or_default().0 += 1;
        PlacementGuard {
            placement: Arc::clone(self),
            id: id.to_owned(),
        }
    }

    /// Takes `addr` for `id`; false when another target already has it.
    fn take(&self, id: &str, addr: SocketAddr) -> bool {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let (_, addrs) = taken.entry(id.to_owned()).or_default();
        if addrs.contains(&addr) {
            return false;
        }
        addrs.push(addr);
        true
    }
}

struct PlacementGuard {
    placement: Arc<Placement>,
    id: String,
}

impl Drop for PlacementGuard {
    fn drop(&mut self) {
        let mut taken = self
            .placement
            .taken
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some((writers, _)) = taken.get_mut(&self.id) {
            *writers -= 1;
            if *writers == 0 {
                taken.remove(&self.id);
            }
        }
    }
}

/// One peer replica of each message (replica `index` of `cluster.replicas`).
///
/// `write` resolves the peers, starts at `(hash(id) + index) % peers` in the
/// sorted address list and tries each peer in turn until one confirms a
/// durable replica; peers another target of the same group is writing the
/// message to are skipped. It fails with [`PeerError::NotReplicated`] (every
/// peer's answer in it) when none confirmed.
///
/// `remove` asks every peer to remove the message, since any may hold it.
/// It fails with [`PeerError::NotRemoved`] when a peer did not answer or a
/// configured name did not resolve: replicas may then remain there (a peer
/// that was down keeps its replica until it is removed again, or its spool
/// dropped).
///
/// Placement is only coordinated among targets writing the same message at
/// the same time; a later single write (a repair) may pick a peer that
/// already holds a replica, which then confirms without a second copy.
#[derive(Debug)]
pub struct PeerCopy {
    index: usize,
    peers: Arc<Peers>,
    client: Arc<PeerClient>,
    placement: Arc<Placement>,
}

impl PeerCopy {
    /// Replica `index` over `peers`, sharing `placement` with the other
    /// targets of its group.
    pub fn new(
        index: usize,
        peers: Arc<Peers>,
        client: Arc<PeerClient>,
        placement: Arc<Placement>,
    ) -> PeerCopy {
        PeerCopy {
            index,
            peers,
            client,
            placement,
        }
    }

    /// `replicas` targets (indexes `0..replicas`) sharing one placement.
    pub fn group(
        replicas: usize,
        peers: Peers,
        client: Arc<PeerClient>,
    ) -> Vec<Arc<dyn CopyTarget>> {
        let peers = Arc::new(peers);
        let placement = Arc::new(Placement::default());
        (0..replicas)
            .map(|index| {
                Arc::new(PeerCopy::new(
                    index,
                    Arc::clone(&peers),
                    Arc::clone(&client),
                    Arc::clone(&placement),
                )) as Arc<dyn CopyTarget>
            })
            .collect()
    }

    /// The `cluster.replicas` peer targets of `config` (none outside a
    /// cluster), for [`Spool::open_with_peers`](crate::spool::Spool::open_with_peers).
    pub fn targets(config: &Config, client: Arc<PeerClient>) -> Vec<Arc<dyn CopyTarget>> {
        match &config.cluster {
            Some(cluster) => PeerCopy::group(cluster.replicas, Peers::from_config(cluster), client),
            None => Vec::new(),
        }
    }

    /// One replicate call, labelled with its peer.
    async fn replicate_to(
        &self,
        addr: SocketAddr,
        job: &CopyJob,
    ) -> (SocketAddr, Result<(), PeerError>) {
        (addr, self.client.replicate(addr, job).await)
    }

    /// Where this target starts among `count` peers for message `id`.
    fn start(&self, id: &str, count: usize) -> usize {
        (fnv1a(id.as_bytes()) as usize).wrapping_add(self.index) % count
    }
}

/// FNV-1a: a stable hash, so placement does not change between runs.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl CopyTarget for PeerCopy {
    fn kind(&self) -> CopyKind {
        CopyKind::Peer
    }

    fn write(self: Arc<Self>, job: Arc<CopyJob>) -> BoxFuture<'static, Result<(), CopyError>> {
        Box::pin(async move {
            let _writing = self.placement.join(&job.id);
            let resolved = self.peers.resolve().await;
            let mut tried: Vec<String> = resolved
                .unresolved
                .iter()
                .map(|(name, err)| format!("{name}: {err}"))
                .collect();
            let addrs = resolved.addrs;
            if addrs.is_empty() {
                tried.push("no peer address".into());
            } else {
                let start = self.start(&job.id, addrs.len());
                let order: Vec<SocketAddr> = (0..addrs.len())
                    .map(|k| addrs[(start + k) % addrs.len()])
                    .collect();
                let mut candidates = order
                    .into_iter()
                    .filter(|addr| self.placement.take(&job.id, *addr));
                // A peer that is stopped (SIGSTOP, a partition) accepts the
                // connection and never answers: after HEDGE_AFTER the next
                // peer is tried alongside it, and the first to confirm wins.
                let mut running = FuturesUnordered::new();
                loop {
                    if running.is_empty() {
                        let Some(addr) = candidates.next() else { break };
                        running.push(self.replicate_to(addr, &job));
                    }
                    tokio::select! {
                        Some((addr, result)) = running.next() => match result {
                            Ok(()) => return Ok(()),
                            Err(err) => {
                                tracing::debug!(id = %job.id, %addr, error = %err, "peer replica failed, trying the next peer");
                                tried.push(err.to_string());
                            }
                        },
                        () = tokio::time::sleep(HEDGE_AFTER) => {
                            if let Some(addr) = candidates.next() {
                                tracing::debug!(id = %job.id, %addr, "a peer is slow to confirm; trying another alongside");
                                running.push(self.replicate_to(addr, &job));
                            }
                        }
                    }
                }
                if tried.is_empty() {
                    tried.push("every peer holds another replica of it".into());
                }
            }
            Err(PeerError::NotReplicated {
                id: job.id.clone(),
                detail: tried.join("; "),
            }
            .into())
        })
    }

    fn remove(
        self: Arc<Self>,
        spool: String,
        id: String,
    ) -> BoxFuture<'static, Result<(), CopyError>> {
        Box::pin(async move {
            let resolved = self.peers.resolve().await;
            let removals = resolved
                .addrs
                .iter()
                .map(|&addr| self.client.remove(addr, &spool, &id));
            let mut failed: Vec<String> = futures::future::join_all(removals)
                .await
                .into_iter()
                .filter_map(Result::err)
                .map(|err| err.to_string())
                .collect();
            failed.extend(
                resolved
                    .unresolved
                    .iter()
                    .map(|(name, err)| format!("{name}: {err}")),
            );
            if failed.is_empty() {
                Ok(())
            } else {
                Err(PeerError::NotRemoved {
                    id,
                    detail: failed.join("; "),
                }
                .into())
            }
        })
    }

    fn restore(
        self: Arc<Self>,
        spool: String,
        id: String,
        scratch: PathBuf,
    ) -> BoxFuture<'static, Result<bool, CopyError>> {
        Box::pin(async move {
            // Every target of the group sees every peer: the first asks them.
            if self.index != 0 {
                return Ok(false);
            }
            for addr in self.peers.resolve().await.addrs {
                match self.client.fetch(addr, &spool, &id, &scratch).await {
                    Ok(_) => return Ok(true),
                    Err(err) => {
                        tracing::debug!(%id, %addr, error = %err, "no intact replica there");
                    }
                }
            }
            Ok(false)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy(index: usize) -> PeerCopy {
        PeerCopy::new(
            index,
            Arc::new(Peers::new(Vec::new(), Vec::new())),
            Arc::new(
                PeerClient::new(
                    "s3cret-s3cret-s3cret",
                    std::time::Duration::from_secs(1),
                    None,
                )
                .unwrap(),
            ),
            Arc::default(),
        )
    }

    #[test]
    fn replicas_of_one_message_start_at_different_peers() {
        let (a, b) = (copy(0), copy(1));
        let id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
        for count in 2..6 {
            assert_ne!(a.start(id, count), b.start(id, count));
            assert_eq!(a.start(id, count), copy(0).start(id, count));
        }
        // Different messages spread over the peers.
        let starts: std::collections::HashSet<usize> = (0..50)
            .map(|i| a.start(&format!("01ARZ3NDEKTSV4RRFFQ69G5F{i:02}"), 3))
            .collect();
        assert_eq!(starts.len(), 3);
    }

    #[test]
    fn a_peer_taken_for_a_message_is_not_taken_again_while_it_is_written() {
        let placement = Arc::new(Placement::default());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let first = placement.join("m");
        let second = placement.join("m");
        assert!(placement.take("m", addr));
        assert!(!placement.take("m", addr));
        assert!(placement.take("other", addr));
        drop(first);
        assert!(!placement.take("m", addr));
        drop(second);
        // Forgotten once every writer of "m" has finished.
        assert!(!placement.taken.lock().unwrap().contains_key("m"));
    }

    #[tokio::test]
    async fn without_peers_a_write_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.msg");
        let job = Arc::new(CopyJob {
            spool: "s1".into(),
            id: "01ARZ3NDEKTSV4RRFFQ69G5FAV".into(),
            data_file: Arc::new(std::fs::File::create(&path).unwrap()),
            data_path: path,
            data_len: 0,
            envelope_json: bytes::Bytes::from_static(b"{}"),
        });
        let err = Arc::new(copy(0)).write(job).await.unwrap_err();
        assert!(
            matches!(&err, CopyError::Peer(PeerError::NotReplicated { detail, .. }) if detail.contains("no peer")),
            "{err}"
        );
    }
}
