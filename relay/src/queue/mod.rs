//! The queue: durable per-recipient state, the retry schedule and the scheduler
//! that hands due messages to the delivery engine.
//!
//! Every outcome is persisted before the next step: a deferral or failure in
//! the state file, a delivery to every recipient by removing the message
//! (outside a cluster no state file is written for it). When all recipients
//! are final, failures are reported in one DSN (queued through the same
//! durable path) and every copy of the message is removed. A due index keeps
//! the scheduler's work proportional to what is due, not to the queue.

pub mod journal;
pub mod lifecycle;
pub mod schedule;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;

use tokio::sync::{Notify, Semaphore};
use tracing::{info, warn};

use crate::config::{Config, DeliveryConfig};
use crate::delivery::client::RcptOutcome;
use crate::delivery::dsn::{self, Action, Reported};
use crate::delivery::engine::{Deliverer, RecipientResult};
use crate::metrics::{Metrics, QueueGauges};
use crate::spool::envelope::{ClientInfo, Envelope, Recipient, ENVELOPE_VERSION};
use crate::spool::{id, Checked, Spool};
use journal::StateJournal;
use schedule::{now_ms, retry_delay};
use state::{DeliveryState, Status};

/// One queued message as the queue keeps it in memory: its schedule and
/// per-recipient state, and only as much of its envelope as scheduling and
/// statistics need. The envelope itself is kept while the message is new
/// (at most [`ENVELOPES_KEPT`] of them) and read back from its message
/// file's seal otherwise ([`Queue::envelope_of`]), so a deep queue costs
/// a few hundred bytes per message.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Its id's bits ([`id::to_bits`]).
    key: u128,
    /// Its envelope, while kept in memory.
    envelope: Option<Arc<Envelope>>,
    /// The cluster spool it was accepted into; empty outside a cluster.
    pub spool: Arc<str>,
    /// Each recipient's domain, in envelope order.
    pub domains: Box<[Arc<str>]>,
    /// Length of its data in octets.
    pub data_len: u64,
    /// Its delivery state.
    pub state: DeliveryState,
    /// Arrival time, Unix ms.
    pub arrival_ms: u64,
    /// A delivery attempt is running.
    pub in_flight: bool,
    /// Where its message file is when not in the local spool: a replica of a
    /// spool taken over.
    replica: Option<Box<PathBuf>>,
    /// The latest state is saved locally but not yet committed to the cluster.
    pub uncommitted: bool,
    /// Recovered at start, whose data's digest has not been checked yet
    /// (done before its first delivery).
    pub unverified: bool,
}

impl Entry {
    /// Its spool id.
    pub fn id(&self) -> String {
        id::from_bits(self.key)
    }
}

/// One copy of each domain and spool name the queue's entries share (most
/// messages go to a few domains), dropped when no entry uses it any more.
#[derive(Debug, Default)]
struct Names {
    names: std::collections::HashSet<Arc<str>>,
    /// How many there were after the last clean-up.
    kept: usize,
}

impl Names {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(shared) = self.names.get(name) {
            return Arc::clone(shared);
        }
        let shared: Arc<str> = name.into();
        self.names.insert(Arc::clone(&shared));
        shared
    }

    /// Forgets the names no entry uses, once there are twice as many as
    /// after the last clean-up.
    fn clean(&mut self) {
        if self.names.len() >= 2 * self.kept.max(512) {
            self.names.retain(|name| Arc::strong_count(name) > 1);
            self.kept = self.names.len();
        }
    }
}

/// How many queued messages keep their envelope in memory: new ones, which
/// are about to be delivered, up to this many; the rest read it back.
pub const ENVELOPES_KEPT: usize = 10_000;

/// The queued messages by id, counting those that keep their envelope.
#[derive(Debug, Default)]
struct Entries {
    map: BTreeMap<u128, Entry>,
    kept: usize,
}

impl Entries {
    /// Adds `entry` (replacing one with its id); it keeps its envelope only
    /// while fewer than [`ENVELOPES_KEPT`] do.
    fn insert(&mut self, mut entry: Entry) {
        if entry.envelope.is_some() {
            if self.kept >= ENVELOPES_KEPT {
                entry.envelope = None;
            } else {
                self.kept += 1;
            }
        }
        if let Some(old) = self.map.insert(entry.key, entry) {
            self.forget(&old);
        }
    }

    fn remove(&mut self, key: u128) -> Option<Entry> {
        let removed = self.map.remove(&key)?;
        self.forget(&removed);
        Some(removed)
    }

    fn retain(&mut self, mut keep: impl FnMut(&Entry) -> bool) {
        let mut dropped_kept = 0;
        self.map.retain(|_, entry| {
            let keeping = keep(entry);
            if !keeping && entry.envelope.is_some() {
                dropped_kept += 1;
            }
            keeping
        });
        self.kept -= dropped_kept;
    }

    /// Lets message `key`'s envelope go (read back when needed).
    fn release_envelope(&mut self, key: u128) {
        if let Some(entry) = self.map.get_mut(&key) {
            if entry.envelope.take().is_some() {
                self.kept -= 1;
            }
        }
    }

    fn forget(&mut self, removed: &Entry) {
        if removed.envelope.is_some() {
            self.kept -= 1;
        }
    }

    fn get(&self, key: u128) -> Option<&Entry> {
        self.map.get(&key)
    }

    fn get_mut(&mut self, key: u128) -> Option<&mut Entry> {
        self.map.get_mut(&key)
    }

    fn contains(&self, key: u128) -> bool {
        self.map.contains_key(&key)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn values(&self) -> impl Iterator<Item = &Entry> {
        self.map.values()
    }
}

/// Why the cluster refused a state commit.
#[derive(Debug, thiserror::Error)]
pub enum OwnershipError {
    /// The spool is no longer this relay's: another relay took it over.
    #[error("spool {0} is no longer ours")]
    Lost(String),
    /// The commit could not be made now (etcd unreachable, lease unsure).
    #[error("cannot commit now: {0}")]
    Unavailable(String),
}

/// What the queue needs from the cluster: who may deliver, and a fenced
/// record of delivery state that a relay taking the spool over reads.
/// Absent on a relay outside a cluster (it owns everything it holds).
#[async_trait]
pub trait Ownership: Send + Sync + std::fmt::Debug + 'static {
    /// Whether this relay may deliver messages of `spool` now (no I/O).
    fn may_deliver(&self, spool: &str) -> bool;
    /// Records message `id`'s state (`None`: the message is gone) under this
    /// relay's claim on `spool`; fails with `Lost` when the claim is stale.
    async fn commit_state(
        &self,
        spool: &str,
        id: &str,
        state: Option<&DeliveryState>,
    ) -> Result<(), OwnershipError>;
    /// Resolves when this relay stops being sure it may deliver (its lease
    /// could expire soon); at once if it is not sure now.
    async fn until_unsafe(&self);
    /// Removes the copies of a finished message kept outside the local spool
    /// and the object store: the replica a takeover delivered from, and those
    /// on other relays; `false` when some could not be removed.
    async fn remove_remote(&self, spool: &str, id: &str) -> bool;
}

/// Why an admin operation failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// No message with that id.
    #[error("no queued message {0}")]
    NotFound(String),
    /// The message is being delivered right now; try again.
    #[error("message {0} is being delivered right now")]
    Busy(String),
    /// Persisting failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The queue; cheap to clone.
#[derive(Clone, Debug)]
pub struct Queue {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    spool: Spool,
    states: StateJournal,
    deliverer: Deliverer,
    settings: DeliveryConfig,
    hostname: String,
    metrics: Arc<Metrics>,
    entries: Mutex<Entries>,
    /// The domain and spool names entries share.
    names: Mutex<Names>,
    /// When each message is next due, so the scheduler looks only at what
    /// is due instead of the whole queue. Lazy: a key may be stale (the
    /// message gone, busy, held or due later), and is checked when popped.
    /// Locked after `entries` when both are held.
    due: Mutex<BTreeSet<(u64, u128)>>,
    wake: Notify,
    workers: Arc<Semaphore>,
    ownership: OnceLock<Arc<dyn Ownership>>,
    /// Ids of messages finished here lately, so a takeover's listing made
    /// before they finished cannot queue them again.
    finished: Mutex<RecentIds>,
    /// A state commit failed for want of the cluster: new deliveries wait
    /// until one succeeds (each would be a duplicate if the spool moved).
    commit_stalled: std::sync::atomic::AtomicBool,
    /// State commits under way, by sequence number, with their start: one
    /// that takes long means the cluster may be out of reach, and new
    /// deliveries wait rather than pile up states that cannot be recorded.
    commits_pending: Mutex<std::collections::HashMap<u64, std::time::Instant>>,
    commit_seq: std::sync::atomic::AtomicU64,
}

/// How long a state commit may take before new deliveries wait for it.
const COMMIT_LAG: Duration = Duration::from_millis(100);

/// How many state commits may be under way before new deliveries wait: the
/// most deliveries whose outcome a partition can keep from the cluster.
pub const COMMITS_AHEAD: usize = 16;

/// A bounded memory of ids, oldest forgotten first.
#[derive(Debug, Default)]
struct RecentIds {
    order: std::collections::VecDeque<u128>,
    set: std::collections::HashSet<u128>,
}

impl RecentIds {
    const CAPACITY: usize = 100_000;

    fn insert(&mut self, key: u128) {
        if self.set.insert(key) {
            self.order.push_back(key);
            if self.order.len() > Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

impl Queue {
    /// Builds the queue over the recovered messages (more may come later
    /// through [`add_recovered`](Queue::add_recovered)).
    pub fn open(
        config: &Config,
        spool: Spool,
        messages: Vec<Envelope>,
        metrics: Arc<Metrics>,
    ) -> Result<Queue, String> {
        let states = StateJournal::open(&config.data_dir.join("state"))
            .map_err(|err| format!("state journal: {err}"))?;
        let deliverer = Deliverer::new(config)?;
        let queue = Queue {
            inner: Arc::new(Inner {
                spool,
                states,
                deliverer,
                settings: config.delivery.clone(),
                hostname: config.hostname.clone(),
                metrics,
                entries: Mutex::new(Entries::default()),
                names: Mutex::new(Names::default()),
                due: Mutex::new(BTreeSet::new()),
                wake: Notify::new(),
                workers: Arc::new(Semaphore::new(config.delivery.max_concurrency)),
                ownership: OnceLock::new(),
                finished: Mutex::new(RecentIds::default()),
                commit_stalled: std::sync::atomic::AtomicBool::new(false),
                commits_pending: Mutex::new(std::collections::HashMap::new()),
                commit_seq: std::sync::atomic::AtomicU64::new(0),
            }),
        };
        let recovered = queue.recovered_entries(messages);
        queue.insert_recovered(recovered);
        Ok(queue)
    }

    /// Queues messages that recovery found in the local spool, each with its
    /// saved delivery state (or a fresh one); their data's digest is checked
    /// before their first delivery.
    pub async fn add_recovered(&self, messages: Vec<Envelope>) {
        if messages.is_empty() {
            return;
        }
        let queue = self.clone();
        let Ok(recovered) =
            tokio::task::spawn_blocking(move || queue.recovered_entries(messages)).await
        else {
            return;
        };
        self.insert_recovered(recovered);
    }

    /// Blocking: the entries of recovered messages, with their saved states.
    fn recovered_entries(&self, messages: Vec<Envelope>) -> Vec<Entry> {
        let now = now_ms();
        let mut recovered = Vec::with_capacity(messages.len());
        for envelope in messages {
            let state = self
                .inner
                .states
                .load(&envelope.id)
                .filter(|state| state.recipients.len() == envelope.recipients.len())
                .unwrap_or_else(|| DeliveryState::new(envelope.recipients.len(), now));
            // Read back at its first attempt: a deep queue keeps no envelopes.
            if let Some(mut entry) = self.new_entry(envelope, state, None, false) {
                entry.unverified = true;
                recovered.push(entry);
            }
        }
        recovered
    }

    fn insert_recovered(&self, recovered: Vec<Entry>) {
        {
            let mut entries = self.inner.entries.lock().expect("queue lock");
            let mut due = self.inner.due.lock().expect("queue lock");
            for entry in recovered {
                due.insert((entry.state.next_attempt_ms, entry.key));
                entries.insert(entry);
            }
        }
        self.update_gauges();
        self.inner.wake.notify_one();
    }

    /// Removes the state files of messages no longer queued (a crash between
    /// removing a message and its state); call once recovery is complete.
    pub async fn remove_orphan_states(&self) {
        let states = self.inner.states.clone();
        let Ok(Ok(ids)) = tokio::task::spawn_blocking(move || states.ids()).await else {
            return;
        };
        let orphans: Vec<String> = {
            let entries = self.inner.entries.lock().expect("queue lock");
            ids.into_iter()
                .filter(|id| id::to_bits(id).is_none_or(|key| !entries.contains(key)))
                .collect()
        };
        for id in orphans {
            if let Err(err) = self.inner.states.remove(&id).await {
                warn!(
                    id,
                    "cannot remove the state of a message no longer queued: {err}"
                );
            }
        }
    }

    /// Puts the queue under the cluster's ownership rules (once, at start).
    pub fn set_ownership(&self, ownership: Arc<dyn Ownership>) {
        let _ = self.inner.ownership.set(ownership);
        let queue = Arc::downgrade(&self.inner);
        self.inner
            .deliverer
            .set_gate(Arc::new(move |envelope: &Envelope| {
                queue.upgrade().is_some_and(|inner| {
                    let queue = Queue { inner };
                    queue.may_deliver(&envelope.spool) && !queue.commits_lagging()
                })
            }));
    }

    /// The relay's counters, which the queue and the listeners share.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The delivery engine; early delivery shares its connections and limits.
    pub fn deliverer(&self) -> &Deliverer {
        &self.inner.deliverer
    }

    /// Sends one DSN for recipients that early delivery saw refused for
    /// good, while the client still gets 250 for the others (the message
    /// `envelope.id` is still at its spool path, uncommitted or not).
    pub async fn report_refused(
        &self,
        envelope: &Envelope,
        refused: &[RecipientResult],
    ) -> Result<(), String> {
        let reported: Vec<Reported<'_>> = refused
            .iter()
            .filter(|result| dsn::wants_notice(&envelope.recipients[result.index], Action::Failed))
            .map(|result| Reported {
                recipient: &envelope.recipients[result.index],
                action: Action::Failed,
                diagnostic: result.outcome.reply().one_line(),
                remote: result.remote.clone(),
            })
            .collect();
        for _ in refused {
            Metrics::count(&self.inner.metrics.bounced);
        }
        if reported.is_empty() || envelope.reverse_path.is_none() {
            return Ok(());
        }
        self.send_report(envelope, &reported).await
    }

    /// Adds a freshly committed message; delivery starts at once.
    pub fn submit(&self, envelope: Envelope) {
        let state = DeliveryState::new(envelope.recipients.len(), now_ms());
        self.submit_with_state(envelope, state);
    }

    /// [`submit`](Queue::submit) with recipients already settled (refused
    /// during early delivery): they are reported with the others' outcomes.
    pub fn submit_with_state(&self, envelope: Envelope, state: DeliveryState) {
        let at = state.next_attempt_ms;
        let Some(entry) = self.new_entry(envelope, state, None, true) else {
            return;
        };
        let key = entry.key;
        self.inner.entries.lock().expect("queue lock").insert(entry);
        self.schedule(key, at);
        self.update_gauges();
        self.inner.wake.notify_one();
    }

    /// Takes over a message of a spool this relay now owns, with the state
    /// its previous owner committed; `false` if it is queued already.
    pub fn adopt(&self, envelope: Envelope, data_path: PathBuf, state: DeliveryState) -> bool {
        let at = state.next_attempt_ms;
        let local = data_path == self.inner.spool.message_path(&envelope.id);
        let replica = (!local).then_some(data_path);
        let Some(entry) = self.new_entry(envelope, state, replica, true) else {
            return false;
        };
        let key = entry.key;
        if self
            .inner
            .finished
            .lock()
            .expect("queue lock")
            .set
            .contains(&key)
        {
            return false;
        }
        let added = {
            let mut entries = self.inner.entries.lock().expect("queue lock");
            if entries.contains(key) {
                false
            } else {
                entries.insert(entry);
                self.schedule(key, at);
                true
            }
        };
        if added {
            self.update_gauges();
            self.inner.wake.notify_one();
        }
        added
    }

    /// Forgets the messages of `spool` (another relay owns it now); their
    /// files stay for that relay to read. Returns how many were dropped.
    pub fn drop_spool(&self, spool: &str) -> usize {
        let dropped = {
            let mut entries = self.inner.entries.lock().expect("queue lock");
            let before = entries.len();
            entries.retain(|e| &*e.spool != spool || e.in_flight);
            before - entries.len()
        };
        if dropped > 0 {
            info!(
                spool,
                dropped, "spool owned by another relay: its messages left our queue"
            );
            self.update_gauges();
        }
        dropped
    }

    /// Adds what another owner committed to message `id`'s state.
    pub fn merge_state(&self, id: &str, committed: &DeliveryState) {
        let Some(key) = id::to_bits(id) else {
            return;
        };
        let mut entries = self.inner.entries.lock().expect("queue lock");
        if let Some(entry) = entries.get_mut(key) {
            if committed.recipients.len() == entry.state.recipients.len() {
                entry.state = entry.state.merged(committed);
            }
        }
    }

    /// Marks message `id` busy as if a delivery attempt ran (so none starts
    /// and it is not finished meanwhile); `false` if it is gone or busy.
    pub fn mark_busy(&self, id: &str) -> bool {
        let Some(key) = id::to_bits(id) else {
            return false;
        };
        let mut entries = self.inner.entries.lock().expect("queue lock");
        match entries.get_mut(key) {
            Some(entry) if !entry.in_flight => {
                entry.in_flight = true;
                true
            }
            _ => false,
        }
    }

    /// Copies the live messages of stale object-store segments (see
    /// [`ObjectCopy::stale_segments`](crate::spool::object::ObjectCopy::stale_segments))
    /// into new segments, so the old ones go. Each message is busy while it
    /// moves; one being delivered is left for the next round. Returns how
    /// many moved.
    pub async fn forward_stale_segments(&self, after: Duration) -> usize {
        let Some(objects) = self.inner.spool.object_copy().cloned() else {
            return 0;
        };
        let ids: Vec<String> = objects
            .stale_segments(after)
            .into_iter()
            .flat_map(|(_, ids)| ids)
            .collect();
        let mut moved = 0;
        for chunk in ids.chunks(256) {
            let forwards = chunk.iter().map(|id| {
                let objects = Arc::clone(&objects);
                async move {
                    let entry = self.get(id)?;
                    if !self.mark_busy(id) {
                        return None;
                    }
                    let result = match crate::spool::quorum::CopyJob::from_files(
                        &entry.spool,
                        id,
                        &self.message_path(&entry),
                        entry.data_len,
                    )
                    .await
                    {
                        Ok(job) => objects.forward(Arc::new(job)).await,
                        Err(err) => Err(err.into()),
                    };
                    self.unmark_busy(id);
                    match result {
                        Ok(()) => Some(()),
                        Err(err) => {
                            warn!(%id, error = %err, "cannot copy a message forward into a new segment");
                            None
                        }
                    }
                }
            });
            moved += futures::future::join_all(forwards)
                .await
                .into_iter()
                .flatten()
                .count();
        }
        if moved > 0 {
            info!(
                moved,
                "copied long-queued messages forward into new segments"
            );
        }
        moved
    }

    /// Ends [`mark_busy`](Queue::mark_busy).
    pub fn unmark_busy(&self, id: &str) {
        let Some(key) = id::to_bits(id) else {
            return;
        };
        if let Some(entry) = self.inner.entries.lock().expect("queue lock").get_mut(key) {
            entry.in_flight = false;
            self.schedule(key, entry.state.next_attempt_ms);
        }
        self.inner.wake.notify_one();
    }

    /// Ids of the queued messages of `spool`.
    pub fn ids_of_spool(&self, spool: &str) -> Vec<String> {
        self.inner
            .entries
            .lock()
            .expect("queue lock")
            .values()
            .filter(|e| &*e.spool == spool)
            .map(Entry::id)
            .collect()
    }

    /// Whether a state commit has been under way for longer than
    /// [`COMMIT_LAG`], or [`COMMITS_AHEAD`] are.
    fn commits_lagging(&self) -> bool {
        let pending = self.inner.commits_pending.lock().expect("queue lock");
        pending.len() >= COMMITS_AHEAD
            || pending
                .values()
                .any(|started| started.elapsed() > COMMIT_LAG)
    }

    fn may_deliver(&self, spool: &str) -> bool {
        self.inner
            .ownership
            .get()
            .is_none_or(|ownership| ownership.may_deliver(spool))
    }

    /// Commits `state` to the cluster (a no-op outside one). `Lost` drops the
    /// message from this queue: the relay that took its spool over delivers it.
    async fn commit(&self, spool: &str, id: &str, state: Option<&DeliveryState>) -> Result<(), ()> {
        let Some(ownership) = self.inner.ownership.get() else {
            return Ok(());
        };
        let stalled = &self.inner.commit_stalled;
        let seq = self
            .inner
            .commit_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner
            .commits_pending
            .lock()
            .expect("queue lock")
            .insert(seq, std::time::Instant::now());
        let committed = ownership.commit_state(spool, id, state).await;
        self.inner
            .commits_pending
            .lock()
            .expect("queue lock")
            .remove(&seq);
        match committed {
            Ok(()) => {
                if stalled.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    info!("state commits go through again: delivering");
                    self.inner.wake.notify_one();
                }
                Ok(())
            }
            Err(OwnershipError::Lost(_)) => {
                warn!(
                    id,
                    spool,
                    "spool taken over by another relay; dropping the message from this queue"
                );
                if let Some(key) = id::to_bits(id) {
                    self.inner.entries.lock().expect("queue lock").remove(key);
                }
                self.drop_spool(spool);
                Err(())
            }
            Err(err) => {
                warn!(id, "cannot commit delivery state: {err}");
                stalled.store(true, std::sync::atomic::Ordering::Relaxed);
                Err(())
            }
        }
    }

    /// Runs the scheduler until `shutdown` resolves, then waits for the
    /// attempts in progress.
    pub async fn run(&self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut reaper = tokio::time::interval(Duration::from_secs(1));
        loop {
            let sleep = if self.inner.settings.paused {
                self.update_gauges();
                Duration::from_secs(1)
            } else {
                self.dispatch_due().await
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = self.inner.wake.notified() => {}
                () = tokio::time::sleep(sleep) => {}
                _ = reaper.tick() => {
                    self.inner.names.lock().expect("queue lock").clean();
                    self.inner.deliverer.close_idle(false).await
                }
            }
        }
        // Wait for attempts in progress: every permit back means none runs.
        let all = self.inner.settings.max_concurrency as u32;
        let _ = self.inner.workers.acquire_many(all).await;
        self.inner.deliverer.close_idle(true).await;
    }

    /// Starts attempts for due messages; returns how long to sleep.
    async fn dispatch_due(&self) -> Duration {
        let now = now_ms();
        let mut next_due = u64::MAX;
        let due: Vec<u128> = {
            let mut entries = self.inner.entries.lock().expect("queue lock");
            let mut index = self.inner.due.lock().expect("queue lock");
            let mut due = Vec::new();
            let lagging = self.commits_lagging();
            let mut stalled = self
                .inner
                .commit_stalled
                .load(std::sync::atomic::Ordering::Relaxed);
            if stalled && !entries.values().any(|e| e.uncommitted) {
                // Nothing left to prove the cluster is back with: try again.
                self.inner
                    .commit_stalled
                    .store(false, std::sync::atomic::Ordering::Relaxed);
                stalled = false;
            }
            let mut waiting = Vec::new();
            // No more than the free workers: the rest stay due, and each
            // attempt that ends wakes the loop for the next. Taking the
            // whole backlog at once kept the loop from a shutdown, and the
            // messages arriving meanwhile behind all of it.
            let free = self.inner.workers.available_permits();
            while let Some((at, _)) = index.first() {
                if *at > now {
                    next_due = next_due.min(*at);
                    break;
                }
                if due.len() >= free {
                    next_due = next_due.min(now + 1000);
                    break;
                }
                let Some((_, key)) = index.pop_first() else {
                    break;
                };
                // Gone, busy or held: scheduled again when that ends.
                let Some(entry) = entries.get_mut(key) else {
                    continue;
                };
                if entry.in_flight || entry.state.held {
                    continue;
                }
                if entry.state.next_attempt_ms > now {
                    // A stale key: the message was put off since.
                    index.insert((entry.state.next_attempt_ms, key));
                    continue;
                }
                if ((stalled || lagging) && !entry.uncommitted) || !self.may_deliver(&entry.spool) {
                    // Waiting for the cluster, not for a time: look again soon.
                    waiting.push(key);
                    continue;
                }
                entry.in_flight = true;
                due.push(key);
            }
            if !waiting.is_empty() {
                next_due = next_due.min(now + 200);
                index.extend(waiting.into_iter().map(|key| (now + 200, key)));
            }
            due
        };
        for key in due {
            // Free (counted above); only a shutdown may hold them now.
            let Ok(permit) = Arc::clone(&self.inner.workers).try_acquire_owned() else {
                self.release_attempt(key, now, false);
                continue;
            };
            let queue = self.clone();
            tokio::spawn(async move {
                queue.attempt(key).await;
                drop(permit);
                queue.inner.wake.notify_one();
            });
        }
        self.update_gauges();
        Duration::from_millis(next_due.saturating_sub(now_ms()).clamp(10, 60_000))
    }

    /// One delivery attempt of message `key`.
    async fn attempt(&self, key: u128) {
        let Some(entry) = self
            .inner
            .entries
            .lock()
            .expect("queue lock")
            .get(key)
            .cloned()
        else {
            return;
        };
        let id = entry.id();
        let id = id.as_str();
        let data_path = self.message_path(&entry);
        let envelope = match self.envelope_of(&entry).await {
            Ok(envelope) => envelope,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                warn!(
                    id,
                    "the message's envelope is gone; dropping it from the queue"
                );
                self.inner.entries.lock().expect("queue lock").remove(key);
                self.update_gauges();
                return;
            }
            Err(err) => {
                warn!(id, "cannot read the message's envelope: {err}");
                self.release_attempt(key, now_ms() + 60_000, false);
                return;
            }
        };
        let Entry {
            mut state,
            arrival_ms,
            uncommitted,
            unverified,
            spool,
            ..
        } = entry;
        if unverified && !self.verified(key, &envelope).await {
            return;
        }
        // A state the cluster has not seen yet goes first: delivering again
        // before it is committed would widen the window for duplicates.
        if uncommitted && self.commit(&spool, id, Some(&state)).await.is_err() {
            self.release_attempt(key, now_ms() + 1000, false);
            return;
        }
        // Checked again right before delivering: ownership may have ended
        // while the attempt waited for a worker.
        if !self.may_deliver(&spool) || (!uncommitted && self.commits_lagging()) {
            self.release_attempt(key, now_ms() + 200, false);
            return;
        }
        let pending = state.pending();
        let results = if pending.is_empty() {
            Vec::new()
        } else {
            let delivery = self
                .inner
                .deliverer
                .attempt(&envelope, &data_path, &pending);
            match self.inner.ownership.get() {
                None => delivery.await,
                // The transaction is dropped (its connection closed, so a
                // next hop still receiving the data discards it) the moment
                // this relay can no longer be sure of its lease: a peer may
                // take the spool over soon after.
                Some(ownership) => tokio::select! {
                    biased;
                    () = ownership.until_unsafe() => {
                        warn!(id, "lease no longer certain: delivery abandoned");
                        self.release_attempt(key, now_ms() + 1000, false);
                        return;
                    }
                    results = delivery => results,
                },
            }
        };
        if results.is_empty() && !pending.is_empty() {
            // Held back at the gate: not an attempt.
            self.release_attempt(key, now_ms() + 200, false);
            return;
        }
        let answers = self.record(&envelope, arrival_ms, results);
        let now = now_ms();
        let settings = &self.inner.settings;
        let rules = lifecycle::Rules {
            retry_schedule: &settings.retry_schedule,
            max_age: settings.max_age,
            delay_warning: settings.delay_warning,
        };
        let settled = lifecycle::settle(&mut state, &answers, arrival_ms, now, &rules);
        for _ in 0..settled.expired {
            Metrics::count(&self.inner.metrics.bounced);
        }
        if let lifecycle::Next::Retry { at_ms, warn_delay } = settled.next {
            state.next_attempt_ms = at_ms;
            if warn_delay {
                self.warn_delay(&envelope, &mut state).await;
            }
        }
        let clustered = self.inner.ownership.get().is_some();
        let recorded = if !lifecycle::must_record(&state, clustered) {
            lifecycle::Recorded::Skipped
        } else if let Err(err) = self.inner.states.save(id, &state).await {
            // Only in memory: kept and tried again soon, never dropped.
            warn!(id, "cannot save delivery state: {err}");
            lifecycle::Recorded::SaveFailed
        } else if self.commit(&spool, id, Some(&state)).await.is_err() {
            let still_owned = self.inner.entries.lock().expect("queue lock").contains(key);
            lifecycle::Recorded::CommitFailed { still_owned }
        } else {
            lifecycle::Recorded::Committed
        };
        let mut uncommitted = false;
        match lifecycle::after_recording(settled.next, recorded, now) {
            lifecycle::Then::Forget => return, // The new owner delivers the rest.
            lifecycle::Then::Keep {
                at_ms,
                uncommitted: lacking,
            } => {
                state.next_attempt_ms = at_ms;
                uncommitted = lacking;
            }
            lifecycle::Then::Finish => {
                if self.finish(&envelope, &state).await.is_ok() {
                    self.inner.finished.lock().expect("queue lock").insert(key);
                    self.inner.entries.lock().expect("queue lock").remove(key);
                    self.update_gauges();
                    return;
                }
                // The bounce could not be queued (spool full?): try again soon.
                state.next_attempt_ms =
                    now + retry_delay(&self.inner.settings.retry_schedule, 1).as_millis() as u64;
            }
        }
        let mut entries = self.inner.entries.lock().expect("queue lock");
        if let Some(entry) = entries.get_mut(key) {
            // `hold` may have been set while we were delivering.
            state.held |= entry.state.held;
            let at = state.next_attempt_ms;
            entry.state = state;
            entry.in_flight = false;
            entry.uncommitted = uncommitted;
            self.schedule(key, at);
        }
        // Not new any more: it waits on disk until its next attempt.
        entries.release_envelope(key);
    }

    /// Checks the digest of a message recovered at start before its first
    /// delivery; a damaged one leaves the queue (it is in quarantine).
    async fn verified(&self, key: u128, envelope: &Envelope) -> bool {
        let id = envelope.id.as_str();
        let checked = self.inner.spool.verify_or_repair(envelope).await;
        if let Ok(Checked::Repaired(_)) = checked {
            Metrics::count(&self.inner.metrics.repaired);
        }
        match checked {
            Ok(Checked::Intact | Checked::Repaired(_)) => {
                if let Some(entry) = self.inner.entries.lock().expect("queue lock").get_mut(key) {
                    entry.unverified = false;
                }
                true
            }
            Ok(Checked::Quarantined) => {
                Metrics::count(&self.inner.metrics.quarantined);
                self.inner.entries.lock().expect("queue lock").remove(key);
                let _ = self.inner.states.remove(id).await;
                self.update_gauges();
                false
            }
            Err(err) => {
                warn!(id, "cannot check the message's data: {err}");
                self.release_attempt(key, now_ms() + 1000, false);
                false
            }
        }
    }

    /// Ends an attempt that did not run: due again at `next_ms`.
    fn release_attempt(&self, key: u128, next_ms: u64, uncommitted: bool) {
        let mut entries = self.inner.entries.lock().expect("queue lock");
        if let Some(entry) = entries.get_mut(key) {
            entry.in_flight = false;
            entry.uncommitted |= uncommitted;
            entry.state.next_attempt_ms = entry.state.next_attempt_ms.max(next_ms);
            self.schedule(key, entry.state.next_attempt_ms);
        }
    }

    /// Logs and counts the outcomes of an attempt, and returns them as the
    /// lifecycle's answers.
    fn record(
        &self,
        envelope: &Envelope,
        arrival_ms: u64,
        results: Vec<RecipientResult>,
    ) -> Vec<lifecycle::Answer> {
        let metrics = &self.inner.metrics;
        let mut answers = Vec::with_capacity(results.len());
        for result in results {
            let reply_text = result.outcome.reply().one_line();
            let address = envelope.recipients[result.index].address.address();
            let remote = result.remote.as_deref().unwrap_or("-");
            let said = match result.outcome {
                RcptOutcome::Delivered(_) => {
                    Metrics::count(&metrics.delivered);
                    metrics
                        .delivery_latency
                        .observe(Duration::from_millis(now_ms().saturating_sub(arrival_ms)));
                    info!(id = %envelope.id, to = %address, relay = %remote, "delivered: {reply_text}");
                    lifecycle::Said::Delivered
                }
                RcptOutcome::Failed(_) => {
                    Metrics::count(&metrics.bounced);
                    metrics
                        .delivery_latency
                        .observe(Duration::from_millis(now_ms().saturating_sub(arrival_ms)));
                    info!(id = %envelope.id, to = %address, relay = %remote, "bounced: {reply_text}");
                    lifecycle::Said::Failed
                }
                RcptOutcome::Deferred(_) => {
                    metrics.count_deferral(result.outcome.reply());
                    info!(id = %envelope.id, to = %address, relay = %remote, "deferred: {reply_text}");
                    lifecycle::Said::Deferred
                }
            };
            answers.push(lifecycle::Answer {
                index: result.index,
                said,
                reply: reply_text,
                remote: result.remote,
            });
        }
        answers
    }

    /// Sends the failure report, then removes every copy of the message.
    /// Fails only when the report could not be queued; the message is kept then.
    async fn finish(&self, envelope: &Envelope, state: &DeliveryState) -> Result<(), String> {
        let failed: Vec<Reported<'_>> = envelope
            .recipients
            .iter()
            .zip(&state.recipients)
            .filter(|(recipient, s)| {
                s.status == Status::Failed && dsn::wants_notice(recipient, Action::Failed)
            })
            .map(|(recipient, s)| Reported {
                recipient,
                action: Action::Failed,
                diagnostic: s.last_reply.clone().unwrap_or_default(),
                remote: s.remote.clone(),
            })
            .collect();
        if !failed.is_empty() && envelope.reverse_path.is_some() {
            if let Err(err) = self.send_report(envelope, &failed).await {
                // Keep the message so the report is not lost; retry later.
                warn!(id = %envelope.id, "cannot queue the bounce: {err}; keeping the message");
                return Err(err);
            }
        }
        self.remove_copies(envelope).await;
        let _ = self.inner.states.remove(&envelope.id).await;
        info!(id = %envelope.id, "removed: all recipients final");
        Ok(())
    }

    /// Removes every copy of a finished message: the local one here,
    /// replicas through the cluster ([`Ownership::remove_remote`]), then
    /// releases its object copy. The cluster forgets its state only when all
    /// went, so a copy left behind on an unreachable relay is recognised as
    /// finished by a later owner; an object copy goes with its segment, and
    /// the state with it (the cluster node hears of that from the object copy).
    async fn remove_copies(&self, envelope: &Envelope) {
        let spool = &self.inner.spool;
        let mut all_removed = true;
        let ownership = self.inner.ownership.get();
        if let Err(err) = spool.remove_local(&envelope.id, ownership.is_some()).await {
            warn!(id = %envelope.id, "cannot remove finished message: {err}");
            all_removed = false;
        }
        if let Some(ownership) = ownership {
            all_removed &= ownership.remove_remote(&envelope.spool, &envelope.id).await;
        }
        // A segment still holding it keeps the state until it goes.
        let in_segment = spool.release_object(&envelope.id, all_removed).await;
        if let Some(ownership) = ownership.filter(|_| all_removed && !in_segment) {
            let _ = ownership
                .commit_state(&envelope.spool, &envelope.id, None)
                .await;
        }
    }

    /// Sends the delay warning the lifecycle found due, to the recipients
    /// whose NOTIFY asks for one; recorded in the state once queued.
    async fn warn_delay(&self, envelope: &Envelope, state: &mut DeliveryState) {
        if envelope.reverse_path.is_none() {
            return;
        }
        let delayed: Vec<Reported<'_>> = envelope
            .recipients
            .iter()
            .zip(&state.recipients)
            .filter(|(recipient, s)| {
                s.status == Status::Pending
                    && recipient
                        .params
                        .notify
                        .as_ref()
                        .is_none_or(|n| n.contains(&crate::smtp::params::Notify::Delay))
            })
            .map(|(recipient, s)| Reported {
                recipient,
                action: Action::Delayed,
                diagnostic: s.last_reply.clone().unwrap_or_default(),
                remote: s.remote.clone(),
            })
            .collect();
        if delayed.is_empty() {
            return;
        }
        match self.send_report(envelope, &delayed).await {
            Ok(()) => state.delay_warned = true,
            Err(err) => warn!(id = %envelope.id, "cannot queue the delay warning: {err}"),
        }
    }

    /// Queues a DSN for `reported` recipients of `envelope`, from `<>`.
    async fn send_report(
        &self,
        envelope: &Envelope,
        reported: &[Reported<'_>],
    ) -> Result<(), String> {
        let Some(sender) = envelope.reverse_path.clone() else {
            return Ok(());
        };
        let spool = &self.inner.spool;
        let mut incoming = spool.begin().await.map_err(|e| e.to_string())?;
        let report_id = incoming.id().to_owned();
        let (head, tail) = dsn::report(&self.inner.hostname, envelope, reported, &report_id);
        incoming
            .write(head.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let data_path = match self.get(&envelope.id) {
            Some(entry) => self.message_path(&entry),
            None => {
                let committed = spool.message_path(&envelope.id);
                if tokio::fs::try_exists(&committed).await.unwrap_or(false) {
                    committed
                } else {
                    // Refused early, before it was committed: being received.
                    spool.receiving_path(&envelope.id)
                }
            }
        };
        let mut original = envelope.added_headers.clone().into_bytes();
        let mut data = tokio::fs::read(data_path)
            .await
            .map_err(|e| e.to_string())?;
        // The data only, not the seal after it.
        data.truncate(usize::try_from(envelope.data_len).unwrap_or(usize::MAX));
        original.extend(data);
        let original = if dsn::returns_full_message(envelope) {
            &original[..]
        } else {
            let end = original
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .map_or(original.len(), |p| p + 2);
            &original[..end]
        };
        incoming.write(original).await.map_err(|e| e.to_string())?;
        incoming
            .write(tail.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let report = Envelope {
            version: ENVELOPE_VERSION,
            id: report_id,
            spool: String::new(),
            reverse_path: None,
            mail_params: crate::smtp::params::MailParams {
                smtputf8: dsn::is_international(envelope, reported),
                ..Default::default()
            },
            recipients: vec![Recipient {
                address: sender,
                params: Default::default(),
            }],
            client: ClientInfo {
                addr: "local".into(),
                helo: self.inner.hostname.clone(),
                esmtp: true,
                tls: None,
                auth: None,
            },
            listener: "dsn".into(),
            received_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            data_len: 0,
            data_sha256: String::new(),
            added_headers: String::new(),
        };
        let committed = incoming
            .commit(report.clone())
            .await
            .map_err(|e| e.to_string())?;
        info!(id = %envelope.id, dsn = %committed.id, "queued a delivery status notification");
        let mut report = report;
        report.id = committed.id;
        report.spool = committed.spool;
        report.data_len = committed.data_len;
        report.data_sha256 = committed.data_sha256;
        self.submit(report);
        Ok(())
    }

    /// Puts message `key` in the due index at `at` (Unix ms).
    fn schedule(&self, key: u128, at: u64) {
        self.inner.due.lock().expect("queue lock").insert((at, key));
    }

    fn update_gauges(&self) {
        let entries = self.inner.entries.lock().expect("queue lock");
        let now = now_ms();
        // Ids sort by arrival (spool::id), so the first is the oldest.
        let oldest = entries.values().next().map_or(now, |e| e.arrival_ms);
        let (state_records, state_journal_bytes) = self.inner.states.size();
        self.inner.metrics.set_queue(QueueGauges {
            state_records,
            state_journal_bytes,
            depth: entries.len() as u64,
            oldest_age_seconds: now.saturating_sub(oldest) as f64 / 1000.0,
            segments_quarantined: self
                .inner
                .spool
                .object_copy()
                .map_or(0, |objects| objects.quarantined_segments()),
        });
    }

    /// A snapshot of the queue, oldest first.
    pub fn list(&self) -> Vec<Entry> {
        self.inner
            .entries
            .lock()
            .expect("queue lock")
            .values()
            .cloned()
            .collect()
    }

    /// One message.
    pub fn get(&self, id: &str) -> Option<Entry> {
        let key = id::to_bits(id)?;
        self.inner
            .entries
            .lock()
            .expect("queue lock")
            .get(key)
            .cloned()
    }

    /// [`entry`] with the queue's shared names.
    fn new_entry(
        &self,
        envelope: Envelope,
        state: DeliveryState,
        replica: Option<PathBuf>,
        keep: bool,
    ) -> Option<Entry> {
        let mut names = self.inner.names.lock().expect("queue lock");
        entry(&mut names, envelope, state, replica, keep)
    }

    /// Where `entry`'s data is: the local spool, or the replica of a spool
    /// taken over that it is delivered from. Its envelope is sealed into it.
    pub fn message_path(&self, entry: &Entry) -> PathBuf {
        match &entry.replica {
            Some(path) => PathBuf::clone(path),
            None => self.inner.spool.message_path(&entry.id()),
        }
    }

    /// `entry`'s envelope: the one kept in memory, or read from its file's seal.
    pub async fn envelope_of(&self, entry: &Entry) -> std::io::Result<Arc<Envelope>> {
        if let Some(envelope) = &entry.envelope {
            return Ok(Arc::clone(envelope));
        }
        let path = self.message_path(entry);
        tokio::task::spawn_blocking(move || Envelope::read(&path).map(Arc::new))
            .await
            .map_err(std::io::Error::other)?
    }

    /// [`list`](Queue::list) with each message's envelope, read in one
    /// blocking task; messages that finished meanwhile are left out.
    pub async fn list_with_envelopes(&self) -> Vec<(Entry, Arc<Envelope>)> {
        let queue = self.clone();
        let entries = self.list();
        tokio::task::spawn_blocking(move || {
            entries
                .into_iter()
                .filter_map(|entry| {
                    let envelope = match &entry.envelope {
                        Some(kept) => Arc::clone(kept),
                        None => Arc::new(Envelope::read(&queue.message_path(&entry)).ok()?),
                    };
                    Some((entry, envelope))
                })
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// The destination key (next hop or `mx:domain`) a recipient domain is
    /// delivered through, for listings and statistics.
    pub fn destination(&self, domain: &str) -> String {
        self.inner.deliverer.route(domain).key()
    }

    /// Makes one message (or all) due now.
    pub fn flush(&self, id: Option<&str>) -> Result<usize, QueueError> {
        let now = now_ms();
        let only = match id {
            Some(id) => Some(id::to_bits(id).ok_or_else(|| QueueError::NotFound(id.to_owned()))?),
            None => None,
        };
        let mut entries = self.inner.entries.lock().expect("queue lock");
        let mut count = 0;
        for (key, entry) in entries.map.iter_mut() {
            if only.is_some_and(|only| only != *key) {
                continue;
            }
            let acted = lifecycle::act(
                &mut entry.state,
                lifecycle::Action::Flush,
                entry.in_flight,
                now,
            );
            if let lifecycle::Acted::Schedule { due_ms } = acted {
                self.schedule(*key, due_ms);
                count += 1;
            }
        }
        drop(entries);
        if let Some(id) = id {
            if count == 0 && self.get(id).is_none() {
                return Err(QueueError::NotFound(id.to_owned()));
            }
        }
        self.inner.wake.notify_one();
        Ok(count)
    }

    /// Holds or releases a message (persisted).
    pub async fn set_held(&self, id: &str, held: bool) -> Result<(), QueueError> {
        let not_found = || QueueError::NotFound(id.to_owned());
        let key = id::to_bits(id).ok_or_else(not_found)?;
        let action = if held {
            lifecycle::Action::Hold
        } else {
            lifecycle::Action::Release
        };
        let state = {
            let mut entries = self.inner.entries.lock().expect("queue lock");
            let entry = entries.get_mut(key).ok_or_else(not_found)?;
            match lifecycle::act(&mut entry.state, action, entry.in_flight, now_ms()) {
                lifecycle::Acted::Record { due_ms } => {
                    if let Some(due_ms) = due_ms {
                        self.schedule(key, due_ms);
                    }
                    entry.state.clone()
                }
                // Already so: nothing to record.
                _ => return Ok(()),
            }
        };
        self.inner.states.save(id, &state).await?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Deletes a message, optionally bouncing its pending recipients.
    pub async fn delete(&self, id: &str, bounce: bool) -> Result<(), QueueError> {
        let not_found = || QueueError::NotFound(id.to_owned());
        let key = id::to_bits(id).ok_or_else(not_found)?;
        let action = if bounce {
            lifecycle::Action::Bounce
        } else {
            lifecycle::Action::Delete
        };
        let (entry, state, acted) = {
            let mut entries = self.inner.entries.lock().expect("queue lock");
            let entry = entries.get(key).ok_or_else(not_found)?;
            let mut state = entry.state.clone();
            let acted = lifecycle::act(&mut state, action, entry.in_flight, now_ms());
            if acted == lifecycle::Acted::Busy {
                return Err(QueueError::Busy(id.to_owned()));
            }
            (entries.remove(key).expect("present"), state, acted)
        };
        let envelope = match self.envelope_of(&entry).await {
            Ok(envelope) => envelope,
            Err(err) => {
                self.inner.entries.lock().expect("queue lock").insert(entry);
                return Err(err.into());
            }
        };
        if acted == lifecycle::Acted::Finish {
            if let Err(err) = self.finish(&envelope, &state).await {
                // Nothing was removed: put the message back as it was.
                self.inner.entries.lock().expect("queue lock").insert(entry);
                return Err(QueueError::Io(std::io::Error::other(format!(
                    "the bounce could not be queued: {err}"
                ))));
            }
        } else {
            self.remove_copies(&envelope).await;
            self.inner.states.remove(id).await?;
            info!(id, "deleted by the postmaster");
        }
        self.update_gauges();
        Ok(())
    }
}

/// The entry of a message; its data at `replica` when not in the local
/// spool, and its envelope kept in memory when `keep` (the queue's bound
/// permitting). `None` (logged) when its id is not a spool id.
fn entry(
    names: &mut Names,
    envelope: Envelope,
    state: DeliveryState,
    replica: Option<PathBuf>,
    keep: bool,
) -> Option<Entry> {
    let Some(key) = id::to_bits(&envelope.id) else {
        warn!(id = %envelope.id, "not a spool id; the message is not queued");
        return None;
    };
    let arrival_ms = chrono::DateTime::parse_from_rfc3339(&envelope.received_at)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .unwrap_or_else(|_| now_ms());
    Some(Entry {
        key,
        spool: names.get(&envelope.spool),
        domains: envelope
            .recipients
            .iter()
            .map(|r| names.get(&r.address.domain))
            .collect(),
        data_len: envelope.data_len,
        envelope: keep.then(|| Arc::new(envelope)),
        state,
        arrival_ms,
        in_flight: false,
        replica: replica.map(Box::new),
        uncommitted: false,
        unverified: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::id::IdGenerator;

    fn new_entry(ids: &IdGenerator) -> Entry {
        let envelope = Envelope::for_tests(&ids.next_id());
        entry(
            &mut Names::default(),
            envelope,
            DeliveryState::new(0, 0),
            None,
            true,
        )
        .unwrap()
    }

    fn kept(entries: &Entries) -> usize {
        entries.values().filter(|e| e.envelope.is_some()).count()
    }

    #[test]
    fn no_more_than_the_bound_keep_their_envelope() {
        let ids = IdGenerator::new();
        let mut entries = Entries::default();
        let mut keys = Vec::new();
        for _ in 0..ENVELOPES_KEPT + 5 {
            let entry = new_entry(&ids);
            keys.push(entry.key);
            entries.insert(entry);
        }
        assert_eq!(entries.len(), ENVELOPES_KEPT + 5);
        assert_eq!(kept(&entries), ENVELOPES_KEPT);
        assert_eq!(entries.kept, ENVELOPES_KEPT);
        assert!(entries
            .get(keys[ENVELOPES_KEPT])
            .unwrap()
            .envelope
            .is_none());

        // Every way out gives a place back.
        entries.release_envelope(keys[0]);
        entries.remove(keys[1]);
        entries.retain(|e| e.key != keys[2]);
        entries.release_envelope(keys[ENVELOPES_KEPT + 1]); // kept none
        assert_eq!(entries.kept, ENVELOPES_KEPT - 3);
        assert_eq!(kept(&entries), entries.kept);
        let entry = new_entry(&ids);
        let key = entry.key;
        entries.insert(entry);
        assert!(entries.get(key).unwrap().envelope.is_some());
        assert_eq!(kept(&entries), entries.kept);

        // Replacing an entry counts it once.
        let again = entries.get(key).unwrap().clone();
        entries.insert(again);
        assert_eq!(kept(&entries), entries.kept);
    }

    #[test]
    fn entries_share_names_and_unused_ones_go() {
        let mut names = Names::default();
        let a = names.get("example.net");
        let b = names.get("example.net");
        assert!(Arc::ptr_eq(&a, &b));
        for n in 0..2000 {
            drop(names.get(&format!("d{n}.example")));
        }
        names.clean();
        assert_eq!(names.names.len(), 1, "only the name still in use stays");
        assert!(Arc::ptr_eq(&names.get("example.net"), &a));
    }

    #[test]
    fn an_entry_keeps_what_scheduling_and_statistics_need() {
        let ids = IdGenerator::new();
        let entry = new_entry(&ids);
        let id = entry.envelope.as_ref().unwrap().id.clone();
        assert_eq!(entry.id(), id);
        assert_eq!(entry.arrival_ms, 1_767_225_600_000);
    }
}
