//! A relay's life in a cluster: the spool it accepts into, the spools it
//! holds claims on, taking over the spools of relays that are gone, fenced
//! state commits for the queue, repair of missing copies, and hand-over on
//! drain.
//!
//! # Spools
//!
//! Mail is accepted into the relay's *current spool*, named
//! `<member>.<stamp>` (the stamp is a fresh spool id, so names sort by
//! creation). A new current spool starts with every process and with every
//! new lease: when a relay loses its lease its claims die with it and a peer
//! may take its spool over, so it never writes into that spool again once it
//! knows. [`Spool::rotate`] waits for the commits still running into the
//! old one before the new one is claimed, so once a peer sees the new claim,
//! the old spool can no longer grow, and it may be retired when empty.
//!
//! # Takeover
//!
//! For a spool this relay wins (an orphan, or one of its own older ones),
//! it loads the state the previous owners committed, lists the spool's
//! messages wherever copies may be (its own local spool and replicas, the
//! object store, every peer), copies each pending one into
//! `<data_dir>/replicas/<spool>/` unless it already has one, and queues it
//! with that state. A spool that is not current is listed again every
//! repair interval (an owner that was cut off may have written into it after
//! the claim) and retired when empty and its origin has moved on.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::state_commits::{Apply, CommitFailure, Linger, StateCommits};

use super::etcd::{Etcd, EtcdOptions};
use super::membership::{LeaseOptions, Membership};
use super::takeover::Orphans;
use super::{Change, Claim, Coordinator, Error, LeaseTrouble, MemberId, SpoolId};
use crate::config::{Config, CopyKind};
use crate::health::{ClusterDelivery, Delivery, StallReason};
use crate::peer::store::{Header, ReplicaError, ReplicaStore};
use crate::queue::lifecycle::{self, Takeover};
use crate::queue::state::DeliveryState;
use crate::queue::{Ownership, OwnershipError, Queue};
use crate::spool::envelope::Envelope;
use crate::spool::object::{ObjectCopy, SegmentEvent};
use crate::spool::quorum::CopyJob;
use crate::spool::Spool;

/// What the node needs from the peer service of the other relays.
#[async_trait]
pub trait PeerAccess: Send + Sync + std::fmt::Debug + 'static {
    /// The other relays' peer addresses, resolved now.
    async fn addresses(&self) -> Vec<SocketAddr>;
    /// Ids of the committed messages of `spool` that relay `addr` holds.
    async fn list(&self, addr: SocketAddr, spool: &str) -> Result<Vec<String>, String>;
    /// Copies message `id` of `spool` from `addr` durably into `dest_dir`
    /// (a sealed `<id>.msg`).
    async fn fetch(
        &self,
        addr: SocketAddr,
        spool: &str,
        id: &str,
        dest_dir: &Path,
    ) -> Result<(), String>;
    /// Tells `addr` that message `id` is finished.
    async fn remove(&self, addr: SocketAddr, spool: &str, id: &str) -> Result<(), String>;
    /// Tells `addr` that `spool` is retired.
    async fn drop_spool(&self, addr: SocketAddr, spool: &str) -> Result<(), String>;
}

/// [`PeerAccess`] over the peer gRPC service: `cluster.peers` resolved on
/// every use, one client for all.
#[derive(Debug)]
pub struct PeerNetwork {
    /// The configured peers.
    pub peers: crate::peer::Peers,
    /// The client.
    pub client: Arc<crate::peer::PeerClient>,
}

#[async_trait]
impl PeerAccess for PeerNetwork {
    async fn addresses(&self) -> Vec<SocketAddr> {
        self.peers.resolve().await.addrs
    }

    async fn list(&self, addr: SocketAddr, spool: &str) -> Result<Vec<String>, String> {
        self.client
            .list(addr, spool)
            .await
            .map_err(|e| e.to_string())
    }

    async fn fetch(
        &self,
        addr: SocketAddr,
        spool: &str,
        id: &str,
        dest_dir: &Path,
    ) -> Result<(), String> {
        self.client
            .fetch(addr, spool, id, dest_dir)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn remove(&self, addr: SocketAddr, spool: &str, id: &str) -> Result<(), String> {
        self.client
            .remove(addr, spool, id)
            .await
            .map_err(|e| e.to_string())
    }

    async fn drop_spool(&self, addr: SocketAddr, spool: &str) -> Result<(), String> {
        self.client
            .drop_spool(addr, spool)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Longest wait for a peer's answer to a listing or removal (a stopped
/// peer accepts connections and never answers).
const PEER_CALL: Duration = Duration::from_secs(2);

/// How long a batch of delivery-state changes waits for company (well
/// under the queue's `COMMIT_LAG`, after which deliveries pause).
const STATE_LINGER: Duration = Duration::from_millis(40);

/// Where a copy of a message was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// This relay's local spool.
    Local,
    /// This relay's replica directory of the spool.
    Replica,
    /// The object store.
    Object,
    /// Another relay.
    Peer(SocketAddr),
}

/// Cluster membership of a running relay; implements the queue's
/// [`Ownership`].
#[derive(Debug, Clone)]
pub struct ClusterNode {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    member: MemberId,
    spool: Spool,
    queue: Queue,
    peers: Arc<dyn PeerAccess>,
    /// The replicas held here (shared with the peer service).
    replica_store: Arc<ReplicaStore>,
    /// The S3 copy, read when taking spools over and repairing (a local
    /// directory is not shared).
    objects: Option<Arc<ObjectCopy>>,
    copies: Vec<CopyKind>,
    replicas: usize,
    repair_every: Duration,
    lease: LeaseOptions,
    membership: OnceLock<Arc<Membership>>,
    held: Mutex<HashMap<String, Claim>>,
    /// One listing-and-copying at a time (a takeover and a relist of the
    /// same spool would fetch the same messages into the same files).
    adopting: tokio::sync::Mutex<()>,
    task: Mutex<Option<JoinHandle<()>>>,
    info: String,
    etcd: EtcdOptions,
    /// Why connecting to etcd failed last, before there is a membership.
    connect_error: Mutex<Option<String>>,
    /// The queue's state changes, group-committed per spool.
    state_commits: Arc<StateCommits>,
}

/// How [`StateCommits`] applies a batch: one fenced transaction under this
/// relay's current claim on the spool; a stale claim is dropped.
fn apply_state_changes(inner: std::sync::Weak<Inner>) -> Apply {
    Arc::new(move |spool: String, changes: Vec<(String, Change)>| {
        let inner = inner.clone();
        Box::pin(async move {
            let inner = inner
                .upgrade()
                .ok_or_else(|| CommitFailure::Unavailable("the relay is stopping".into()))?;
            let membership = inner
                .membership
                .get()
                .ok_or_else(|| CommitFailure::Unavailable("not joined yet".into()))?;
            let claim = inner
                .held
                .lock()
                .expect("node lock")
                .get(&spool)
                .cloned()
                .ok_or_else(|| CommitFailure::Lost(spool.clone()))?;
            match membership.commit_many(&claim, &changes).await {
                Ok(_) => Ok(()),
                Err(Error::Fenced { .. }) => {
                    let mut held = inner.held.lock().expect("node lock");
                    // Only the claim this batch used: a newer one stays.
                    if held.get(&spool) == Some(&claim) {
                        held.remove(&spool);
                    }
                    Err(CommitFailure::Lost(spool))
                }
                Err(err) => Err(CommitFailure::Unavailable(err.to_string())),
            }
        })
    })
}

impl ClusterNode {
    /// Starts the relay's membership in the background: connecting to etcd,
    /// joining, claiming its spools and following orphans. Accepting mail
    /// does not wait for any of it. Needs `config.cluster`.
    pub async fn start(
        config: &Config,
        spool: Spool,
        queue: Queue,
        peers: Arc<dyn PeerAccess>,
        replicas: Arc<ReplicaStore>,
    ) -> anyhow::Result<ClusterNode> {
        let cluster = config
            .cluster
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no [cluster] section"))?;
        let member = MemberId::new(cluster.member_name())?;
        let current = new_spool_name(&member);
        spool.rotate(current.clone()).await;
        let objects = spool
            .object_copy()
            .filter(|copy| copy.s3_prefix().is_some())
            .cloned();
        let info = serde_json::json!({
            "peer": cluster.advertised(),
            "smtp": config.listeners.first().map(|l| l.address.to_string()),
        })
        .to_string();
        let mut lease = LeaseOptions::new(cluster.lease_ttl);
        lease.request_timeout = lease.request_timeout.min(Duration::from_secs(2));
        let etcd = {
            let mut options = cluster.etcd_options()?;
            // A commit that cannot finish well inside the lease is
            // worth nothing: fail fast and stop delivering.
            options.request_timeout = (cluster.lease_ttl / 3).min(options.request_timeout);
            options
        };
        let node = ClusterNode {
            inner: Arc::new_cyclic(|inner| Inner {
                state_commits: StateCommits::new(
                    apply_state_changes(inner.clone()),
                    Linger {
                        window: STATE_LINGER,
                        enough: crate::queue::COMMITS_AHEAD,
                    },
                ),
                member,
                spool,
                queue,
                peers,
                replica_store: replicas,
                objects,
                copies: config.spool.copies.clone(),
                replicas: cluster.replicas,
                repair_every: cluster.repair_interval,
                lease,
                membership: OnceLock::new(),
                held: Mutex::new(HashMap::new()),
                adopting: tokio::sync::Mutex::new(()),
                task: Mutex::new(None),
                info,
                etcd,
                connect_error: Mutex::new(None),
            }),
        };
        tracing::info!(member = %node.inner.member, spool = %current, "joining the cluster");
        let task = tokio::spawn(run(Arc::clone(&node.inner)));
        *node.inner.task.lock().expect("node lock") = Some(task);
        Ok(node)
    }

    /// This relay's member name.
    pub fn member(&self) -> &MemberId {
        &self.inner.member
    }

    /// Spools this relay holds claims on now.
    pub fn held_spools(&self) -> Vec<String> {
        let mut spools: Vec<String> = self
            .inner
            .held
            .lock()
            .expect("node lock")
            .keys()
            .cloned()
            .collect();
        spools.sort();
        spools
    }

    /// The live members and what they advertise (`None` before joining).
    pub async fn members(&self) -> Option<Vec<(String, String)>> {
        let membership = self.inner.membership.get()?;
        let snapshot = membership.coordinator().snapshot().await.ok()?;
        Some(
            snapshot
                .members
                .into_iter()
                .map(|m| (m.id.to_string(), m.info))
                .collect(),
        )
    }

    /// Hands everything over at once: stops following orphans and revokes
    /// the lease, which deletes every claim, so peers take this relay's
    /// spools over without waiting for a TTL. Call after the queue stopped.
    pub async fn leave(&self) {
        if let Some(task) = self.inner.task.lock().expect("node lock").take() {
            task.abort();
        }
        self.inner.held.lock().expect("node lock").clear();
        if let Some(membership) = self.inner.membership.get() {
            match membership.revoke().await {
                Ok(()) => {
                    tracing::info!(member = %self.inner.member, "left the cluster: spools handed over")
                }
                Err(err) => {
                    tracing::warn!(member = %self.inner.member, error = %err, "cannot revoke the lease; peers take over after its TTL")
                }
            }
        }
    }
}

impl ClusterDelivery for ClusterNode {
    fn delivery(&self) -> Delivery {
        let Some(membership) = self.inner.membership.get() else {
            return match self.inner.connect_error.lock().expect("node lock").clone() {
                Some(why) => Delivery::Stalled {
                    reason: StallReason::EtcdUnreachable,
                    message: format!("etcd unreachable: {why}"),
                },
                None => Delivery::Joining,
            };
        };
        let status = membership.status();
        if status.is_safe() {
            return Delivery::Running;
        }
        match status.trouble {
            Some(LeaseTrouble::Unreachable(why)) => Delivery::Stalled {
                reason: StallReason::EtcdUnreachable,
                message: format!("etcd unreachable: {why}"),
            },
            Some(LeaseTrouble::Expired) => Delivery::Stalled {
                reason: StallReason::LeaseExpired,
                message: "the etcd lease expired; joining again".into(),
            },
            // Not renewed in time with no failure seen: the relay itself was
            // paused (SIGSTOP, a stall of the host) past its safety margin.
            None if status.epoch > 0 => Delivery::Stalled {
                reason: StallReason::LeaseExpired,
                message: "the etcd lease was not renewed in time".into(),
            },
            None => Delivery::Joining,
        }
    }
}

#[async_trait]
impl Ownership for ClusterNode {
    fn may_deliver(&self, spool: &str) -> bool {
        let Some(membership) = self.inner.membership.get() else {
            return false;
        };
        // Mail accepted before this relay joined a cluster belongs to no
        // spool: nobody else can take it over, so it is ours while we are.
        membership.is_safe()
            && (spool.is_empty()
                || self
                    .inner
                    .held
                    .lock()
                    .expect("node lock")
                    .contains_key(spool))
    }

    async fn commit_state(
        &self,
        spool: &str,
        id: &str,
        state: Option<&DeliveryState>,
    ) -> Result<(), OwnershipError> {
        if spool.is_empty() {
            // No spool, no claim: only the local state file records it.
            return Ok(());
        }
        let Some(state) = state else {
            // Every copy is gone: forgetting the state can wait for the next
            // transaction (a key left behind names a message no owner finds).
            self.inner
                .state_commits
                .commit_later(spool, id.to_owned(), Change::Delete);
            return Ok(());
        };
        let change = Change::Put(Bytes::from(
            serde_json::to_vec(state).map_err(|e| OwnershipError::Unavailable(e.to_string()))?,
        ));
        // Group-committed with the other changes to this spool's state.
        match self
            .inner
            .state_commits
            .commit(spool, id.to_owned(), change)
            .await
        {
            Ok(()) => Ok(()),
            Err(CommitFailure::Lost(spool)) => Err(OwnershipError::Lost(spool)),
            Err(err) => Err(OwnershipError::Unavailable(err.to_string())),
        }
    }

    async fn until_unsafe(&self) {
        if let Some(membership) = self.inner.membership.get() {
            membership.safety().wait_unsafe().await;
        }
    }

    async fn remove_remote(&self, spool: &str, id: &str) -> bool {
        if spool.is_empty() {
            return true; // never replicated: accepted before the cluster
        }
        remove_replicas(&self.inner, spool, id).await
    }
}

/// Removes the replicas of message `id` of `spool`: this relay's and every
/// peer's (side by side, each bounded by [`PEER_CALL`]); `false` when some
/// could not be removed.
async fn remove_replicas(inner: &Inner, spool: &str, id: &str) -> bool {
    let addresses = inner.peers.addresses().await;
    let removals = addresses.iter().map(|&addr| async move {
        let removed = tokio::time::timeout(PEER_CALL, inner.peers.remove(addr, spool, id))
            .await
            .unwrap_or_else(|_| Err("no answer".into()));
        if let Err(err) = &removed {
            tracing::warn!(%id, %addr, error = %err, "cannot remove a peer's copy; its state stays in the cluster");
        }
        removed.is_ok()
    });
    let replica_removed = inner.replica_store.remove(spool, id).await.is_ok();
    let peers_removed = futures::future::join_all(removals)
        .await
        .into_iter()
        .all(|removed| removed);
    replica_removed && peers_removed
}

/// `<member>.<stamp>`: a new spool name, later ones sorting after earlier ones.
fn new_spool_name(member: &MemberId) -> String {
    format!(
        "{member}.{}",
        crate::spool::id::IdGenerator::new().next_id()
    )
}

/// The member that created `spool` and the spool's stamp.
fn origin(spool: &str) -> Option<(&str, &str)> {
    spool.rsplit_once('.')
}

/// Connects, joins and then serves the node's duties until aborted.
async fn run(inner: Arc<Inner>) {
    let coordinator: Arc<dyn Coordinator> = loop {
        match Etcd::connect(inner.etcd.clone()).await {
            Ok(etcd) => break Arc::new(etcd),
            Err(err @ (Error::Unauthorized(_) | Error::Tls(_))) => {
                // A configuration problem, not an outage: say so loudly, and
                // keep trying (the user or its role may be created later).
                tracing::error!(
                    error = %err,
                    "etcd refuses this relay (check cluster.etcd_ca, etcd_cert, etcd_key, \
                     etcd_user and etcd's roles); accepting goes on, delivery waits"
                );
                tokio::time::sleep(inner.lease.retry_every.max(Duration::from_secs(10))).await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot reach etcd; accepting goes on, delivery waits");
                *inner.connect_error.lock().expect("node lock") =
                    Some(format!("cannot connect: {err}"));
                tokio::time::sleep(inner.lease.retry_every).await;
            }
        }
    };
    let membership = match Membership::start(
        coordinator,
        inner.member.clone(),
        inner.info.clone(),
        inner.lease,
    ) {
        Ok(membership) => Arc::new(membership),
        Err(err) => {
            tracing::error!(error = %err, "cannot start the membership");
            return;
        }
    };
    let _ = inner.membership.set(Arc::clone(&membership));
    let mut orphans = Orphans::start(Arc::clone(&membership), inner.lease.retry_every);
    // Takeovers and the periodic relist/repair run beside the epoch loop, so
    // a slow peer (stopped, partitioned) delays none of the others.
    let _children = AbortOnDrop(vec![
        tokio::spawn({
            let (inner, membership) = (Arc::clone(&inner), Arc::clone(&membership));
            async move {
                while let Some(claim) = orphans.next().await {
                    take_over(&inner, &membership, claim).await;
                }
            }
        }),
        periodically(inner.repair_every, Arc::clone(&membership), {
            let (inner, membership) = (Arc::clone(&inner), Arc::clone(&membership));
            move || {
                let (inner, membership) = (Arc::clone(&inner), Arc::clone(&membership));
                async move { relist(&inner, &membership).await }
            }
        }),
        periodically(inner.repair_every, Arc::clone(&membership), {
            let inner = Arc::clone(&inner);
            move || {
                let inner = Arc::clone(&inner);
                async move { repair(&inner).await }
            }
        }),
        tokio::spawn(record_segment_events(Arc::clone(&inner))),
    ]);
    let mut status: watch::Receiver<()> = status_changes(&membership);
    let mut epoch = 0;
    loop {
        let current_epoch = membership.status().epoch;
        if current_epoch != epoch
            && membership.is_safe()
            && new_epoch(&inner, &membership, current_epoch).await
        {
            epoch = current_epoch;
        }
        tokio::select! {
            changed = status.changed() => if changed.is_err() { return },
            // Retries a failed epoch start.
            () = tokio::time::sleep(inner.lease.retry_every), if current_epoch != epoch => {}
        }
    }
}

/// Runs `work` every `every` while the relay is safe, in its own task.
fn periodically<F, Fut>(every: Duration, membership: Arc<Membership>, work: F) -> JoinHandle<()>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if membership.is_safe() {
                work().await;
            }
        }
    })
}

/// Tasks that end with their owner.
struct AbortOnDrop(Vec<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// A watch that fires whenever the membership status changes.
fn status_changes(membership: &Membership) -> watch::Receiver<()> {
    let (tx, rx) = watch::channel(());
    let mut safety = membership.safety();
    tokio::spawn(async move {
        loop {
            safety.wait_safe().await;
            if tx.send(()).is_err() {
                return;
            }
            safety.wait_unsafe().await;
            if tx.send(()).is_err() {
                return;
            }
        }
    });
    rx
}

/// Records what the object copy reports about messages in segments, each
/// change with the next state transaction of its spool: final states
/// forgotten once their segments are gone, and refused messages whose copy
/// stays in a segment recorded as final (no recipients left).
async fn record_segment_events(inner: Arc<Inner>) {
    // Any object copy, S3 or a directory: its segments pin states alike.
    let Some(objects) = inner.spool.object_copy().cloned() else {
        return;
    };
    let mut events = objects.events();
    let withdrawn =
        Bytes::from(serde_json::to_vec(&DeliveryState::new(0, 0)).expect("a state serializes"));
    while let Some(event) = events.recv().await {
        match event {
            SegmentEvent::Forget(spool, ids) => {
                for id in ids {
                    inner.state_commits.commit_later(&spool, id, Change::Delete);
                }
            }
            SegmentEvent::Withdrawn(spool, id) => {
                tracing::info!(%spool, %id, "a refused message stays in a segment; recording it as final");
                inner
                    .state_commits
                    .commit_later(&spool, id, Change::Put(withdrawn.clone()));
            }
        }
    }
}

/// A lease was granted: claim the current spool (a fresh one after a lost
/// lease), and this relay's older spools that nobody holds.
async fn new_epoch(inner: &Arc<Inner>, membership: &Arc<Membership>, epoch: u64) -> bool {
    // Every claim of an earlier lease died with it.
    let previous: Vec<String> = inner
        .held
        .lock()
        .expect("node lock")
        .drain()
        .map(|(spool, _)| spool)
        .collect();
    if !previous.is_empty() {
        tracing::info!(?previous, "claims of the previous lease are gone");
    }
    if epoch > 1 {
        let next = new_spool_name(&inner.member);
        tracing::warn!(member = %inner.member, epoch, spool = %next, "lease was lost: new mail goes to a new spool");
        inner.spool.rotate(next).await;
    }
    loop {
        let current = inner.spool.current_spool();
        let Ok(spool) = SpoolId::new(current.clone()) else {
            return true;
        };
        match membership.claim(&spool).await {
            Ok(claim) => {
                tracing::info!(member = %inner.member, %spool, token = %claim.token, "holding current spool");
                inner.held.lock().expect("node lock").insert(current, claim);
                break;
            }
            Err(Error::Claimed { holder, .. }) => {
                tracing::warn!(%spool, %holder, "current spool was taken over; rotating");
                inner.spool.rotate(new_spool_name(&inner.member)).await;
            }
            Err(err) => {
                tracing::warn!(%spool, error = %err, "cannot claim the current spool; retrying");
                return false;
            }
        }
    }
    // Older spools with copies here: ours again if nobody holds them.
    let local: Vec<String> = match inner.spool.committed().await {
        Ok(envelopes) => {
            let mut spools: Vec<String> = envelopes.into_iter().map(|e| e.spool).collect();
            spools.sort();
            spools.dedup();
            spools
        }
        Err(_) => Vec::new(),
    };
    let current = inner.spool.current_spool();
    for name in local.into_iter().filter(|s| !s.is_empty() && *s != current) {
        let Ok(spool) = SpoolId::new(name.clone()) else {
            continue;
        };
        match membership.claim(&spool).await {
            Ok(claim) => take_over(inner, membership, claim).await,
            Err(Error::Claimed { holder, .. }) => {
                tracing::info!(%spool, %holder, "an older spool of ours is held by another relay");
                inner.queue.drop_spool(&name);
            }
            Err(err) => tracing::warn!(%spool, error = %err, "cannot claim an older spool"),
        }
    }
    true
}

/// Gathers where the messages of `spool` are: local spool, own replicas,
/// object store, peers.
async fn gather(inner: &Inner, spool: &str) -> BTreeMap<String, Vec<Source>> {
    let mut found: BTreeMap<String, Vec<Source>> = BTreeMap::new();
    if let Ok(envelopes) = inner.spool.committed().await {
        for envelope in envelopes.into_iter().filter(|e| e.spool == spool) {
            found.entry(envelope.id).or_default().push(Source::Local);
        }
    }
    if let Ok(ids) = inner.replica_store.list(spool).await {
        for id in ids {
            found.entry(id).or_default().push(Source::Replica);
        }
    }
    if let Some(objects) = &inner.objects {
        match objects.list_spool(spool).await {
            Ok(ids) => {
                for id in ids {
                    found.entry(id).or_default().push(Source::Object);
                }
            }
            Err(err) => tracing::warn!(spool, error = %err, "cannot list the object store"),
        }
    }
    let addresses = inner.peers.addresses().await;
    let listings = addresses.iter().map(|&addr| async move {
        let listed = tokio::time::timeout(PEER_CALL, inner.peers.list(addr, spool))
            .await
            .unwrap_or_else(|_| Err("no answer".into()));
        (addr, listed)
    });
    for (addr, listed) in futures::future::join_all(listings).await {
        match listed {
            Ok(ids) => {
                for id in ids {
                    found.entry(id).or_default().push(Source::Peer(addr));
                }
            }
            Err(err) => tracing::debug!(spool, %addr, error = %err, "peer did not list"),
        }
    }
    found
}

/// Makes the spool `claim` names ours: its messages join the queue with the
/// state committed so far.
async fn take_over(inner: &Arc<Inner>, membership: &Arc<Membership>, claim: Claim) {
    let spool = claim.spool.to_string();
    tracing::info!(member = %inner.member, %spool, token = %claim.token, "taking over spool");
    crate::metrics::Metrics::count(&inner.queue.metrics().takeovers);
    inner
        .held
        .lock()
        .expect("node lock")
        .insert(spool.clone(), claim);
    adopt_all(inner, membership, &spool).await;
}

/// Queues every message of `spool` found anywhere that is not queued yet.
/// Returns how many messages of the spool exist (queued or found).
async fn adopt_all(inner: &Arc<Inner>, membership: &Arc<Membership>, spool: &str) -> usize {
    let _adopting = inner.adopting.lock().await;
    // Listed first, state loaded after: a message finished meanwhile shows
    // up final (or gone) rather than pending.
    let found = gather(inner, spool).await;
    let states: HashMap<String, DeliveryState> = match membership
        .coordinator()
        .load(&SpoolId::new(spool).expect("valid spool"), "")
        .await
    {
        Ok(states) => states
            .into_iter()
            .filter_map(|(id, bytes)| Some((id, serde_json::from_slice(&bytes).ok()?)))
            .collect(),
        Err(err) => {
            tracing::warn!(spool, error = %err, "cannot load committed state; trying again later");
            return usize::MAX;
        }
    };
    tracing::debug!(
        spool,
        found = found.len(),
        committed = states.len(),
        "listed the spool's messages"
    );
    let mut count = 0;
    let mut adopted = 0;
    let mut leftovers: Vec<&str> = Vec::new();
    let mut pending: Vec<(&String, &Vec<Source>, Option<&DeliveryState>)> = Vec::new();
    for (id, sources) in &found {
        let committed = states.get(id);
        match lifecycle::take_over(inner.queue.get(id).is_some(), committed) {
            Takeover::Merge => {
                count += 1;
                if let Some(committed) = committed {
                    inner.queue.merge_state(id, committed);
                }
            }
            Takeover::Leftover => leftovers.push(id.as_str()),
            Takeover::Adopt => {
                count += 1;
                pending.push((id, sources, committed));
            }
        }
    }
    // Copied here side by side (an object-store GET or a peer fetch each),
    // oldest first, and queued as they arrive.
    for batch in pending.chunks(16) {
        let mut copying = Vec::with_capacity(batch.len());
        for (id, sources, _) in batch {
            copying.push(materialize(inner, spool, id, sources));
        }
        let copied = futures::future::join_all(copying).await;
        for ((id, _, committed), copied) in batch.iter().zip(copied) {
            match copied {
                Ok((envelope, path)) => {
                    let now = crate::queue::schedule::now_ms();
                    match lifecycle::adopted_state(*committed, envelope.recipients.len(), now) {
                        Some(state) => {
                            if inner.queue.adopt(envelope, path, state) {
                                adopted += 1;
                            }
                        }
                        None => tracing::warn!(
                            spool,
                            %id,
                            "the committed state does not fit the message's envelope; it is left alone"
                        ),
                    }
                }
                Err(err) => {
                    tracing::warn!(spool, %id, error = %err, "cannot copy a taken-over message here yet")
                }
            }
        }
    }
    if adopted > 0 {
        tracing::info!(spool, adopted, "queued messages of a spool taken over");
    }
    // Delivered already; only copies are left somewhere (after the pending
    // ones, and side by side: an unreachable peer costs a timeout each). One
    // that cannot be removed yet keeps the spool from being retired (its
    // state would go, and the copy would look new to a later owner).
    for batch in leftovers.chunks(16) {
        let mut finishing = Vec::with_capacity(batch.len());
        for id in batch {
            finishing.push(finish_leftover(inner, spool, id));
        }
        let finished = futures::future::join_all(finishing).await;
        count += finished.iter().filter(|removed| !**removed).count();
    }
    count + inner.queue.ids_of_spool(spool).len().saturating_sub(count)
}

/// Removes the copies of a message whose committed state is final; `true`
/// when all are gone and its state was forgotten. A segment still holding
/// it keeps the state until the segment goes (then the object copy says so).
async fn finish_leftover(inner: &Inner, spool: &str, id: &str) -> bool {
    let local_removed = inner.spool.remove_local(id, true).await.is_ok();
    let all = remove_replicas(inner, spool, id).await && local_removed;
    if inner.spool.release_object(id, all).await {
        return false;
    }
    let claim = inner.held.lock().expect("node lock").get(spool).cloned();
    match (all, inner.membership.get(), claim) {
        (true, Some(membership), Some(claim)) => {
            membership.commit(&claim, id, Change::Delete).await.is_ok()
        }
        _ => false,
    }
}

/// A local copy of message `id` to deliver from: the local spool or a
/// replica, fetched from the object store or a peer when there is none.
async fn materialize(
    inner: &Inner,
    spool: &str,
    id: &str,
    sources: &[Source],
) -> Result<(Envelope, PathBuf), String> {
    if sources.contains(&Source::Local) {
        let path = inner.spool.message_path(id);
        return Ok((read_envelope(&path)?, path));
    }
    let dir = inner
        .replica_store
        .spool_dir(spool)
        .map_err(|e| e.to_string())?;
    let path = crate::spool::message_file::path(&dir, id);
    if sources.contains(&Source::Replica) {
        return Ok((read_envelope(&path)?, path));
    }
    // Both fetches write through the replica store's one durable write path,
    // which checks the length and digest the envelope announces.
    let mut last = String::from("no copy found");
    for source in sources {
        let fetched = match source {
            Source::Object => fetch_object(inner, spool, id).await,
            Source::Peer(addr) => match tokio::fs::create_dir_all(&dir).await {
                Ok(()) => inner.peers.fetch(*addr, spool, id, &dir).await,
                Err(err) => Err(err.to_string()),
            },
            Source::Local | Source::Replica => continue,
        };
        match fetched {
            Ok(()) => return Ok((read_envelope(&path)?, path)),
            Err(err) => last = format!("{source:?}: {err}"),
        }
    }
    Err(last)
}

fn read_envelope(path: &Path) -> Result<Envelope, String> {
    Envelope::read(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Copies message `id` of `spool` from the object store into this relay's
/// replicas (the data streamed and checked against the envelope, then
/// sealed and synced).
async fn fetch_object(inner: &Inner, spool: &str, id: &str) -> Result<(), String> {
    let objects = inner.objects.as_ref().ok_or("no object store")?;
    let (envelope_json, data) = objects.open(id).await.map_err(|e| e.to_string())?;
    let envelope: Envelope = serde_json::from_slice(&envelope_json).map_err(|e| e.to_string())?;
    let data = data.map(|chunk| chunk.map_err(|e| ReplicaError::Stream(e.to_string())));
    let header = Header {
        id: id.to_owned(),
        envelope_json,
        data_len: envelope.data_len,
        data_sha256: (!envelope.data_sha256.is_empty()).then_some(envelope.data_sha256),
    };
    inner
        .replica_store
        .write(spool, header, data)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// Lists held spools other than the current one again: adopts messages
/// that appeared, retires spools that are finished.
async fn relist(inner: &Arc<Inner>, membership: &Arc<Membership>) {
    let current = inner.spool.current_spool();
    let spools: Vec<String> = inner
        .held
        .lock()
        .expect("node lock")
        .keys()
        .filter(|s| **s != current)
        .cloned()
        .collect();
    for spool in spools {
        let left = adopt_all(inner, membership, &spool).await;
        if left == 0 && origin_moved_on(inner, membership, &spool).await {
            retire(inner, membership, &spool).await;
        }
    }
}

/// Whether the relay that created `spool` writes into a later spool now, so
/// `spool` can no longer grow.
async fn origin_moved_on(inner: &Inner, membership: &Membership, spool: &str) -> bool {
    let Some((origin_member, stamp)) = origin(spool) else {
        return false;
    };
    if origin_member == inner.member.as_str() {
        return true;
    }
    let Ok(snapshot) = membership.coordinator().snapshot().await else {
        return false;
    };
    snapshot.spools.iter().any(|info| {
        info.holder
            .as_ref()
            .is_some_and(|h| h.member.as_str() == origin_member)
            && origin(info.spool.as_str())
                .is_some_and(|(member, later)| member == origin_member && later > stamp)
    })
}

/// Retires a finished spool and asks every peer to drop its replicas of it.
async fn retire(inner: &Inner, membership: &Membership, spool: &str) {
    let Some(claim) = inner.held.lock().expect("node lock").get(spool).cloned() else {
        return;
    };
    // Segments first: a spool retired with a segment left would leave it
    // to nobody.
    if let Some(objects) = &inner.objects {
        if let Err(err) = objects.drop_spool(spool).await {
            tracing::warn!(spool, error = %err, "cannot delete the segments of a finished spool; retiring it later");
            return;
        }
    }
    match membership.coordinator().retire(&claim).await {
        Ok(()) => {
            tracing::info!(spool, "spool finished and retired");
            inner.held.lock().expect("node lock").remove(spool);
            for addr in inner.peers.addresses().await {
                let _ = inner.peers.drop_spool(addr, spool).await;
            }
            let _ = inner.replica_store.drop_spool(spool).await;
        }
        Err(err) => tracing::warn!(spool, error = %err, "cannot retire spool"),
    }
}

/// Re-creates object-store and peer copies that the messages of the held
/// spools are missing (a copy that failed after the quorum, or was lost with
/// a peer's disk).
async fn repair(inner: &Arc<Inner>) {
    let wants_object = inner.copies.contains(&CopyKind::ObjectStore);
    let wants_peer = inner.copies.contains(&CopyKind::Peer);
    if !wants_object && !wants_peer {
        return;
    }
    let spools: Vec<String> = inner
        .held
        .lock()
        .expect("node lock")
        .keys()
        .cloned()
        .collect();
    let targets = inner.spool.copies().to_vec();
    let peer_addresses = inner.peers.addresses().await;
    for spool in spools {
        let ids = inner.queue.ids_of_spool(&spool);
        if ids.is_empty() {
            continue;
        }
        let mut on_peers: HashMap<String, usize> = HashMap::new();
        if wants_peer {
            for addr in &peer_addresses {
                if let Ok(listed) = inner.peers.list(*addr, &spool).await {
                    for id in listed {
                        *on_peers.entry(id).or_default() += 1;
                    }
                }
            }
        }
        let mut wanting = Vec::new();
        for id in ids {
            let Some(entry) = inner.queue.get(&id) else {
                continue;
            };
            if entry.in_flight {
                continue;
            }
            let missing_object = wants_object
                && inner
                    .objects
                    .as_ref()
                    .is_some_and(|objects| !objects.holds(&id));
            // The relay delivering from a local spool copy counts itself out:
            // peers hold replicas, the origin its local copy.
            let peer_copies = on_peers.get(&id).copied().unwrap_or(0);
            let missing_peer = wants_peer && peer_copies < inner.replicas;
            if missing_object || missing_peer {
                wanting.push((id, entry, missing_object, missing_peer));
            }
        }
        for batch in wanting.chunks(16) {
            let mut repairs = Vec::with_capacity(batch.len());
            let targets = &targets;
            for (id, entry, missing_object, missing_peer) in batch {
                // Busy while repairing: the message can neither be delivered
                // and removed under us (which would leave the new copy
                // behind) nor repaired twice.
                if !inner.queue.mark_busy(id) {
                    continue;
                }
                let path = inner.queue.message_path(entry);
                repairs.push(async move {
                    repair_one(targets, id, entry, &path, *missing_object, *missing_peer).await;
                    inner.queue.unmark_busy(id);
                });
            }
            futures::future::join_all(repairs).await;
        }
    }
}

/// Writes the missing copies of one message.
async fn repair_one(
    targets: &[Arc<dyn crate::spool::quorum::CopyTarget>],
    id: &str,
    entry: &crate::queue::Entry,
    data_path: &Path,
    missing_object: bool,
    missing_peer: bool,
) {
    let Ok(job) = CopyJob::from_files(&entry.spool, id, data_path, entry.data_len).await else {
        return;
    };
    let job = Arc::new(job);
    // One peer replica per round is enough to converge.
    let mut peer_wanted = missing_peer;
    for target in targets {
        let wanted = match target.kind() {
            CopyKind::ObjectStore => missing_object,
            CopyKind::Peer => std::mem::take(&mut peer_wanted),
            CopyKind::Local => false,
        };
        if !wanted {
            continue;
        }
        match Arc::clone(target).write(Arc::clone(&job)).await {
            Ok(()) => {
                tracing::info!(%id, kind = ?target.kind(), "repair re-created a missing copy")
            }
            Err(err) if err.is_already_exists() => {}
            Err(err) => {
                tracing::warn!(%id, kind = ?target.kind(), error = %err, "repair failed; trying again later")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_names_carry_their_origin_and_sort_by_age() {
        let member = MemberId::new("relay-a.test").unwrap();
        let first = new_spool_name(&member);
        std::thread::sleep(Duration::from_millis(2));
        let second = new_spool_name(&member);
        assert!(second > first);
        let (origin_member, stamp) = origin(&first).unwrap();
        assert_eq!(origin_member, "relay-a.test");
        assert!(crate::spool::id::is_valid(stamp), "{stamp}");
        assert!(SpoolId::new(first).is_ok());
    }

    use crate::queue::state::Status;

    #[test]
    fn merged_state_keeps_every_final_recipient() {
        let mut local = DeliveryState::new(3, 0);
        let mut committed = DeliveryState::new(3, 0);
        local.recipients[0].status = Status::Delivered;
        committed.recipients[1].status = Status::Failed;
        committed.attempts = 4;
        let merged = local.merged(&committed);
        assert_eq!(merged.recipients[0].status, Status::Delivered);
        assert_eq!(merged.recipients[1].status, Status::Failed);
        assert_eq!(merged.recipients[2].status, Status::Pending);
        assert_eq!(merged.attempts, 4);
    }
}
