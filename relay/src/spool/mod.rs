//! The spool: message ids, message files (wire-format data, sealed with the
//! envelope once committed), the local spool, the object-store copy, the
//! quorum writer and recovery on start.
//!
//! On disk, under `data_dir`:
//!
//! ```text
//! spool/<c>/<id>.msg      message bytes exactly as they go on the wire, then
//!                         (once committed) the envelope JSON and a footer;
//!                         see message_file
//!                         (<c>: the id's last character, see local::Shards)
//! spool/free/<n>          finished message files kept for reuse (free_files)
//! spool/.lock             held (flock) by the relay that owns the spool
//! quarantine/             damaged records found by recovery, kept for a human
//! objects/segments/<seq>.seg   the local-directory object store (when configured)
//! ```
//!
//! In S3 the object copy is segments of many messages each,
//! `<prefix>/segments/<seq>.seg` (`<prefix>/spools/<spool>/segments/` in a
//! cluster; see [`object`] and [`segment`]); `<prefix>/staging/` briefly
//! holds large segments during upload.

pub mod envelope;
pub mod free_files;
pub mod fsync;
pub mod id;
pub mod local;
pub mod message_file;
pub mod object;
pub mod quorum;
pub mod recovery;
pub mod remove;
pub mod segment;
pub mod sweep;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, CopyKind};
use crate::metrics::CopyLatency;
use envelope::Envelope;
use free_files::FreeFiles;
use fsync::{remove_if_present, DirSync};
use local::{LocalCopy, Writer};
use object::ObjectCopy;
use quorum::{Background, CopyJob, CopyTarget, Policy};

/// Most commits that may run at once (far above any connection limit).
const COMMITS_IN_FLIGHT: usize = 1 << 20;

/// The subdirectory of the spool that holds free message files (see
/// [`free_files`]).
pub const FREE_DIR: &str = "free";

/// Why the spool could not take or commit a message; each maps to one SMTP reply.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool disk lacks room (452 4.3.1).
    #[error("insufficient spool space: {needed} octets needed, {available} available")]
    NoRoom {
        /// Octets the message (plus reserve) needs.
        needed: u64,
        /// Octets available to us.
        available: u64,
    },
    /// Fewer copies than the ack policy requires confirmed before the deadline (451 4.3.0).
    #[error("quorum not reached: {confirmed} of {required} copies confirmed ({detail})")]
    QuorumFailed {
        /// Copies that confirmed.
        confirmed: usize,
        /// Copies the policy requires.
        required: usize,
        /// What went wrong with the others.
        detail: String,
    },
    /// A local I/O error (451 4.3.0).
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The result of a successful commit.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The spool id.
    pub id: String,
    /// The cluster spool the message went into (empty outside a cluster).
    pub spool: String,
    /// Copies that had confirmed when the quorum was reached.
    pub confirmed: Vec<CopyKind>,
    /// Time from `commit` to quorum.
    pub quorum_time: Duration,
    /// Length of the data, as recorded in the envelope.
    pub data_len: u64,
    /// SHA-256 of the data, as recorded in the envelope.
    pub data_sha256: String,
}

/// What recovery found on start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Committed messages, oldest first.
    pub messages: Vec<Envelope>,
    /// Uncommitted leftovers removed.
    pub removed: usize,
    /// Damaged records moved to quarantine.
    pub quarantined: usize,
    /// Ids of committed message files whose seal does not hold, left in
    /// place to be repaired from another copy (see [`Recovery::next_batch`]).
    pub damaged: Vec<String>,
}

/// Recovery of the spool, one subdirectory at a time, while the relay may
/// already receive new messages: those this process began are left alone.
#[derive(Debug)]
pub struct Recovery {
    spool: Spool,
    /// Directories still to recover, the next one last.
    dirs: Vec<PathBuf>,
    /// Leftovers removed and records quarantined so far.
    counts: Recovered,
}

impl Recovery {
    /// The committed messages of the next directory, oldest first (possibly
    /// none); `None` once every directory is done.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Envelope>>, SpoolError> {
        let Some(dir) = self.dirs.pop() else {
            return Ok(None);
        };
        let spool = self.spool.clone();
        let mut found = tokio::task::spawn_blocking(move || {
            let mut found = Recovered::default();
            let skip = |id: &str| spool.begun_since_open(id);
            recovery::recover_dir(&dir, spool.quarantine_dir(), &skip, &mut found).map(|()| found)
        })
        .await
        .map_err(std::io::Error::other)??;
        self.counts.removed += found.removed;
        self.counts.quarantined += found.quarantined;
        for id in std::mem::take(&mut found.damaged) {
            match self.spool.repair_damaged(&id).await? {
                Some(envelope) => found.messages.push(envelope),
                None => self.counts.quarantined += 1,
            }
        }
        found.messages.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Some(found.messages))
    }

    /// Ends recovery and returns the leftovers removed and the records
    /// quarantined (`messages` empty).
    pub fn finish(mut self) -> Recovered {
        std::mem::take(&mut self.counts)
    }
}

impl Drop for Recovery {
    /// Recovery is over (done, failed or given up): new messages need no
    /// more tracking.
    fn drop(&mut self) {
        *self.spool.inner.begun.lock().expect("spool lock") = None;
    }
}

/// What checking a message's local data before its first delivery found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Length and digest as the envelope records.
    Intact,
    /// Damaged, and replaced with the intact data of this other copy.
    Repaired(CopyKind),
    /// Damaged with no intact copy elsewhere: moved to quarantine.
    Quarantined,
}

/// Handle to the spool; cheap to clone.
#[derive(Clone, Debug)]
pub struct Spool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    quarantine_dir: PathBuf,
    /// Where other copies' data is written to repair a damaged local copy.
    repair_dir: PathBuf,
    reserve_bytes: u64,
    policy: Policy,
    ids: id::IdGenerator,
    /// Every copy of the ack policy, in `spool.copies` order.
    copies: Vec<Arc<dyn CopyTarget>>,
    /// Whether the local message file is a copy (else only staging for the others).
    keep_local: bool,
    /// Finished message files kept for new messages to overwrite (with a
    /// local copy only).
    free: Option<Arc<FreeFiles>>,
    /// How long each kind of copy took (for `/metrics`).
    copy_latency: Arc<CopyLatency>,
    /// The spool's subdirectories, each with its group-committed fsync.
    shards: Arc<local::Shards>,
    object: Option<Arc<ObjectCopy>>,
    background: Background,
    /// The spool new messages go into (see [`Spool::rotate`]).
    current: std::sync::Mutex<String>,
    /// Messages whose copies are still being written, each with a receiver
    /// that turns true when the last one has finished.
    copying:
        std::sync::Mutex<std::collections::HashMap<String, tokio::sync::watch::Receiver<bool>>>,
    /// One permit per commit in progress.
    committing: tokio::sync::Semaphore,
    /// Until recovery has run: the ids of the messages this process began,
    /// which recovery must not take for leftovers of the last run.
    begun: std::sync::Mutex<Option<std::collections::HashSet<String>>>,
    /// Held for the life of the spool so two relays never share it.
    _lock: std::fs::File,
}

impl std::fmt::Debug for dyn CopyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.kind())
    }
}

impl Spool {
    /// Opens (creating) the spool described by `config`, runs recovery.
    pub async fn open(config: &Config) -> Result<(Spool, Recovered), SpoolError> {
        Spool::open_with_peers(config, Vec::new()).await
    }

    /// [`open`](Spool::open) with the peer replicas of a cluster: `peers`
    /// stand for the `"peer"` entry of `spool.copies`.
    pub async fn open_with_peers(
        config: &Config,
        peers: Vec<Arc<dyn CopyTarget>>,
    ) -> Result<(Spool, Recovered), SpoolError> {
        let spool = Spool::open_unrecovered(config, peers).await?;
        let mut recovery = spool.recover().await?;
        let mut messages = Vec::new();
        while let Some(batch) = recovery.next_batch().await? {
            messages.extend(batch);
        }
        let mut recovered = recovery.finish();
        messages.sort_by(|a, b| a.id.cmp(&b.id));
        recovered.messages = messages;
        Ok((spool, recovered))
    }

    /// Opens (creating) the spool without recovering it: new messages may be
    /// received at once, and [`recover`](Spool::recover) finds what the last
    /// run left while they are.
    pub async fn open_unrecovered(
        config: &Config,
        peers: Vec<Arc<dyn CopyTarget>>,
    ) -> Result<Spool, SpoolError> {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Spool::open_blocking(&config, peers))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Starts recovering what the last run left in the spool (once); see
    /// [`Recovery`].
    pub async fn recover(&self) -> Result<Recovery, SpoolError> {
        let (spool_dir, quarantine_dir) =
            (self.inner.dir.clone(), self.inner.quarantine_dir.clone());
        let mut dirs =
            tokio::task::spawn_blocking(move || recovery::prepare(&spool_dir, &quarantine_dir))
                .await
                .map_err(std::io::Error::other)??;
        dirs.reverse();
        Ok(Recovery {
            spool: self.clone(),
            dirs,
            counts: Recovered::default(),
        })
    }

    /// Whether this process began message `id` while recovery runs.
    fn begun_since_open(&self, id: &str) -> bool {
        self.inner
            .begun
            .lock()
            .expect("spool lock")
            .as_ref()
            .is_some_and(|ids| ids.contains(id))
    }

    fn open_blocking(
        config: &Config,
        peers: Vec<Arc<dyn CopyTarget>>,
    ) -> Result<Spool, SpoolError> {
        if config.spool.copies.contains(&CopyKind::Peer) == peers.is_empty() {
            return Err(SpoolError::Io(std::io::Error::other(
                "spool.copies names \"peer\" exactly when peer replicas are configured",
            )));
        }
        let dir = config.spool_dir();
        let quarantine_dir = config.data_dir.join("quarantine");
        // Scratch space of repairs; what a crash left there is incomplete.
        let repair_dir = config.data_dir.join("repair");
        if let Err(err) = std::fs::remove_dir_all(&repair_dir) {
            if err.kind() != std::io::ErrorKind::NotFound {
                return Err(err.into());
            }
        }
        std::fs::create_dir_all(&dir)?;
        let lock = lock_spool(&dir)?;
        let shards = Arc::new(local::Shards::open(&dir)?);
        let keep_local = config.spool.copies.contains(&CopyKind::Local);
        let max_free = if keep_local {
            config.spool.free_files
        } else {
            0
        };
        // Opened even when off, to give back what an earlier run kept.
        let free = FreeFiles::open(dir.join(FREE_DIR), max_free)?;
        let free = (max_free > 0).then(|| Arc::new(free));
        let files = match config.spool.sync {
            crate::config::SyncMode::Filesystem => Some(DirSync::filesystem(dir.clone())?),
            crate::config::SyncMode::Files => None,
        };
        let object = if config.spool.copies.contains(&CopyKind::ObjectStore) {
            Some(Arc::new(ObjectCopy::from_config(config)?))
        } else {
            None
        };
        let copies = config
            .spool
            .copies
            .iter()
            .flat_map(|kind| match kind {
                CopyKind::Local => {
                    vec![Arc::new(LocalCopy::new(Arc::clone(&shards), files.clone()))
                        as Arc<dyn CopyTarget>]
                }
                CopyKind::ObjectStore => {
                    vec![Arc::clone(object.as_ref().expect("built above")) as Arc<dyn CopyTarget>]
                }
                CopyKind::Peer => peers.clone(),
            })
            .collect();
        let inner = Inner {
            dir,
            quarantine_dir,
            repair_dir,
            reserve_bytes: config.spool.reserve_bytes,
            policy: Policy {
                required: config.spool.required,
                deadline: config.spool.deadline,
            },
            ids: id::IdGenerator::new(),
            copies,
            keep_local,
            free,
            copy_latency: Arc::default(),
            shards,
            object,
            background: Background::default(),
            current: std::sync::Mutex::new(String::new()),
            copying: std::sync::Mutex::new(std::collections::HashMap::new()),
            committing: tokio::sync::Semaphore::new(COMMITS_IN_FLIGHT),
            begun: std::sync::Mutex::new(Some(std::collections::HashSet::new())),
            _lock: lock,
        };
        Ok(Spool {
            inner: Arc::new(inner),
        })
    }

    /// Checks that a message of `size` octets fits on the spool disk.
    pub fn check_room(&self, size: u64) -> Result<(), SpoolError> {
        let available = local::available_bytes(&self.inner.dir)?;
        let needed = size.saturating_add(self.inner.reserve_bytes);
        if available < needed {
            return Err(SpoolError::NoRoom { needed, available });
        }
        Ok(())
    }

    /// Starts receiving a message: assigns its id; its file is created
    /// when the first bytes go to disk (see [`Writer::create_at`]).
    ///
    /// Fails with `NoRoom` when the disk is already down to the reserve.
    pub async fn begin(&self) -> Result<Incoming, SpoolError> {
        let id = self.inner.ids.next_id();
        if let Some(begun) = self.inner.begun.lock().expect("spool lock").as_mut() {
            begun.insert(id.clone());
        }
        let path = message_file::part_path(self.inner.shards.dir_of(&id), &id);
        // statvfs reads counters the kernel keeps in memory: no disk wait.
        self.check_room(0)?;
        Ok(Incoming {
            spool: self.clone(),
            id,
            writer: Some(Writer::create_at(path.clone(), self.inner.free.clone())),
            path,
            unchecked: 0,
            armed: true,
        })
    }

    /// How long each kind of copy took to confirm (rendered on `/metrics`).
    pub fn copy_latency(&self) -> &Arc<CopyLatency> {
        &self.inner.copy_latency
    }

    /// The spool directory (`data_dir/spool`).
    pub fn dir(&self) -> &std::path::Path {
        &self.inner.dir
    }

    /// Where damaged records go (`data_dir/quarantine`).
    pub fn quarantine_dir(&self) -> &std::path::Path {
        &self.inner.quarantine_dir
    }

    /// Checks the seal, length and digest of message `envelope.id`'s data
    /// against its envelope (start checks only the seal). A damaged one is
    /// repaired from the first other copy of the policy that holds it intact
    /// (the damaged file kept in quarantine); with none, the message is moved
    /// to quarantine. Each outcome is logged.
    pub async fn verify_or_repair(&self, envelope: &Envelope) -> Result<Checked, SpoolError> {
        let dir = self.message_dir(&envelope.id).to_owned();
        let quarantine_dir = self.inner.quarantine_dir.clone();
        let shared = Arc::new(envelope.clone());
        let checked = Arc::clone(&shared);
        let check_dir = dir.clone();
        let damage =
            match tokio::task::spawn_blocking(move || recovery::verify_data(&check_dir, &checked))
                .await
                .map_err(std::io::Error::other)?
            {
                Ok(()) => return Ok(Checked::Intact),
                Err(damage) => damage,
            };
        let id = envelope.id.as_str();
        tracing::error!(id, reason = %damage, "damaged spool record found before delivery");
        if let Some((kind, _)) = self.repair(&envelope.spool, id, Some(&shared)).await? {
            return Ok(Checked::Repaired(kind));
        }
        tracing::error!(id, reason = %damage, "quarantining a damaged spool record: no other copy holds it intact");
        let id_owned = id.to_owned();
        tokio::task::spawn_blocking(move || {
            recovery::quarantine_message(&dir, &quarantine_dir, &id_owned)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Checked::Quarantined)
    }

    /// Repairs committed message `id`, whose seal recovery found damaged
    /// (so its envelope is unknown here), from the first other copy that
    /// holds it intact, and returns the envelope that copy had; with none,
    /// quarantines it and returns `None`. The copies are asked for it in
    /// the spool new messages go into (on a single relay, the only one).
    async fn repair_damaged(&self, id: &str) -> Result<Option<Envelope>, SpoolError> {
        if let Some((_, envelope)) = self.repair(&self.current_spool(), id, None).await? {
            return Ok(Some(envelope));
        }
        tracing::error!(
            id,
            "quarantining a damaged spool record: no other copy holds it intact"
        );
        let (dir, quarantine_dir, id_owned) = (
            self.message_dir(id).to_owned(),
            self.inner.quarantine_dir.clone(),
            id.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            recovery::quarantine_message(&dir, &quarantine_dir, &id_owned)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(None)
    }

    /// Puts an intact copy of message `spool`/`id` from the first other copy
    /// holding one in place of the local file (the damaged one kept in
    /// quarantine); returns which copy and the envelope it had. `expected`:
    /// the envelope the data must match (else the copy's own envelope must
    /// name `id` and match its data).
    async fn repair(
        &self,
        spool: &str,
        id: &str,
        expected: Option<&Arc<Envelope>>,
    ) -> Result<Option<(CopyKind, Envelope)>, SpoolError> {
        let dir = self.message_dir(id).to_owned();
        let quarantine_dir = self.inner.quarantine_dir.clone();
        for copy in self.copies().iter().filter(|c| c.kind() != CopyKind::Local) {
            let kind = copy.kind();
            let scratch = self.inner.repair_dir.clone();
            if let Some(envelope) = self.restore_from(copy, spool, id, expected, &scratch).await {
                let (dir, quarantine_dir, id_owned) =
                    (dir.clone(), quarantine_dir.clone(), id.to_owned());
                let repaired = message_file::path(&scratch, id);
                let replaced = tokio::task::spawn_blocking(move || {
                    recovery::replace_data(&dir, &quarantine_dir, &id_owned, &repaired)
                })
                .await
                .map_err(std::io::Error::other)?;
                clear_scratch(&scratch, id);
                replaced?;
                tracing::warn!(id, copy = ?kind, "repaired a damaged spool record from another copy; the damaged file is in quarantine");
                return Ok(Some((kind, envelope)));
            }
            clear_scratch(&scratch, id);
        }
        Ok(None)
    }

    /// Message `spool`/`id` from `copy` into `scratch` as a sealed message
    /// file, if that copy holds it intact: data of the length and digest
    /// `expected` records (or, with no `expected`, its own envelope does,
    /// naming `id`). Returns the envelope it was sealed with.
    async fn restore_from(
        &self,
        copy: &Arc<dyn CopyTarget>,
        spool: &str,
        id: &str,
        expected: Option<&Arc<Envelope>>,
        scratch: &std::path::Path,
    ) -> Option<Envelope> {
        let kind = copy.kind();
        let made = std::fs::create_dir_all(scratch);
        if let Err(err) = made {
            tracing::warn!(id, "cannot make the repair directory: {err}");
            return None;
        }
        match Arc::clone(copy)
            .restore(spool.to_owned(), id.to_owned(), scratch.to_owned())
            .await
        {
            Ok(true) => {}
            Ok(false) => return None,
            Err(err) => {
                tracing::warn!(id, copy = ?kind, error = %err, "cannot read the message back from this copy");
                return None;
            }
        }
        let (scratch, id_owned, expected) =
            (scratch.to_owned(), id.to_owned(), expected.map(Arc::clone));
        let verdict = tokio::task::spawn_blocking(move || -> Result<Envelope, recovery::Damage> {
            let path = message_file::path(&scratch, &id_owned);
            let json =
                message_file::read_envelope_json(&path).map_err(recovery::Damage::Unreadable)?;
            let own = recovery::check_envelope(&id_owned, &json)?;
            let envelope = match expected {
                Some(expected) => Envelope::clone(&expected),
                None => own,
            };
            recovery::verify_data(&scratch, &envelope)?;
            Ok(envelope)
        })
        .await;
        match verdict {
            Ok(Ok(envelope)) => Some(envelope),
            Ok(Err(damage)) => {
                tracing::error!(id, copy = ?kind, reason = %damage, "that copy is damaged too");
                None
            }
            Err(_) => None,
        }
    }

    /// The subdirectory of the spool that holds message `id`'s files.
    pub fn message_dir(&self, id: &str) -> &std::path::Path {
        self.inner.shards.dir_of(id)
    }

    /// The group-committed fsync of [`message_dir`](Spool::message_dir).
    pub fn message_dir_sync(&self, id: &str) -> &Arc<DirSync> {
        self.inner.shards.sync_of(id)
    }

    /// The local message file of committed message `id`.
    pub fn message_path(&self, id: &str) -> PathBuf {
        message_file::path(self.message_dir(id), id)
    }

    /// The file of message `id` while it is being received (not committed).
    pub fn receiving_path(&self, id: &str) -> PathBuf {
        message_file::part_path(self.message_dir(id), id)
    }

    /// The envelopes of the locally committed messages, oldest first.
    /// Unreadable records are skipped with a warning (recovery quarantines them).
    pub async fn committed(&self) -> Result<Vec<Envelope>, SpoolError> {
        let shards = Arc::clone(&self.inner.shards);
        tokio::task::spawn_blocking(move || -> Result<Vec<Envelope>, SpoolError> {
            let mut found = Vec::new();
            for dir in shards.dirs() {
                found.extend(read_envelopes(std::fs::read_dir(dir)?)?);
            }
            found.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(found)
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// The object-store copy, when the policy has one.
    pub fn object_copy(&self) -> Option<&Arc<ObjectCopy>> {
        self.inner.object.as_ref()
    }

    /// Every copy of the ack policy, in `spool.copies` order (repair writes
    /// the missing ones again).
    pub fn copies(&self) -> &[Arc<dyn CopyTarget>] {
        &self.inner.copies
    }

    /// Waits until every copy of message `id` that is still being written
    /// (after its quorum answered) has finished, at most `spool.deadline`
    /// twice over.
    pub async fn copies_settled(&self, id: &str) {
        let running = self
            .inner
            .copying
            .lock()
            .expect("spool lock")
            .get(id)
            .cloned();
        if let Some(mut running) = running {
            let limit = self.inner.policy.deadline * 2;
            let _ = tokio::time::timeout(limit, running.wait_for(|done| *done)).await;
        }
    }

    /// The spool new messages are committed into.
    pub fn current_spool(&self) -> String {
        self.inner.current.lock().expect("spool lock").clone()
    }

    /// Commits started from now on go into `spool`; returns once every
    /// commit into the previous one has finished, so after this no new
    /// message can appear in it.
    pub async fn rotate(&self, spool: String) {
        *self.inner.current.lock().expect("spool lock") = spool;
        let all = u32::try_from(COMMITS_IN_FLIGHT).unwrap_or(u32::MAX);
        // Every permit back means no commit into the old spool is running.
        if let Ok(permits) = self.inner.committing.acquire_many(all).await {
            drop(permits);
        }
    }

    /// Waits until the copies still running after their commits answered, and
    /// the clean-ups after lost quorums, have finished.
    pub async fn drain(&self) {
        self.inner.background.idle().await;
    }
}

/// Removes what a repair of message `id` left in the scratch directory
/// (one directory for all repairs, so a peer fetch opens it once).
/// For unit tests: the names of the entries in `dir`, sorted (none when
/// it is absent).
#[cfg(test)]
pub(crate) fn file_names(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    names
}

fn clear_scratch(scratch: &std::path::Path, id: &str) {
    let Ok(entries) = std::fs::read_dir(scratch) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(id) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Blocking: the envelopes of the sealed message files among `entries` (one
/// spool subdirectory's listing); unreadable ones are skipped with a warning.
fn read_envelopes(entries: std::fs::ReadDir) -> Result<Vec<Envelope>, SpoolError> {
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(message_file::id_of) else {
            continue;
        };
        match Envelope::read(&entry.path()) {
            Ok(envelope) => found.push(envelope),
            // Removed, or finished and reused, since it was listed: no
            // longer committed.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            // Being received, or damaged (recovery quarantines it).
            Err(err) if err.kind() == std::io::ErrorKind::InvalidData => {
                tracing::debug!(id = %stem, error = %err, "skipping an uncommitted message file");
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(found)
}

/// Takes an exclusive, non-blocking flock on `<dir>/.lock`.
fn lock_spool(dir: &std::path::Path) -> Result<std::fs::File, SpoolError> {
    use std::os::fd::AsRawFd;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(".lock"))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(SpoolError::Io(std::io::Error::new(
            err.kind(),
            format!("spool {} is in use by another relay: {err}", dir.display()),
        )));
    }
    Ok(file)
}

/// A message being received; dropped without `commit`, it leaves nothing behind.
#[derive(Debug)]
pub struct Incoming {
    spool: Spool,
    id: String,
    path: PathBuf,
    /// `None` once a write failed (or was cancelled mid-flush).
    writer: Option<Writer>,
    /// Octets written since the last free-space check.
    unchecked: u64,
    /// Whether dropping this removes the message file.
    armed: bool,
}

impl Incoming {
    /// The spool id assigned to this message.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Appends wire-format bytes.
    ///
    /// At most `local::BUFFER_CAP` octets wait in memory; the rest is on disk.
    /// `NoRoom` when the disk fills up or the free space falls below
    /// `spool.reserve_bytes` (checked every `local::SPACE_CHECK_INTERVAL`
    /// octets). After any error the partial message is already removed and
    /// further calls fail.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), SpoolError> {
        let mut rest = data;
        while !rest.is_empty() {
            let writer = self.writer.as_mut().ok_or_else(broken)?;
            let take = writer.room().min(rest.len());
            writer.push(&rest[..take]);
            rest = &rest[take..];
            self.unchecked += take as u64;
            if writer.room() == 0 {
                self.flush().await?;
            }
        }
        Ok(())
    }

    /// Puts everything written so far into the message file (not yet
    /// fsync'd) so a scanner or an early delivery can read it at
    /// [`path`](Incoming::path); returns its length. `commit` still works after.
    pub async fn write_out(&mut self) -> Result<u64, SpoolError> {
        self.flush().await?;
        Ok(self.writer.as_ref().ok_or_else(broken)?.written())
    }

    /// Where the message file being received is (only the data until it is
    /// committed).
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Writes the buffer out on a blocking thread, checking free space every
    /// `SPACE_CHECK_INTERVAL` octets.
    async fn flush(&mut self) -> Result<(), SpoolError> {
        let mut writer = self.writer.take().ok_or_else(broken)?;
        let check = self.unchecked >= local::SPACE_CHECK_INTERVAL;
        if check {
            self.unchecked = 0;
        }
        let dir = self.spool.inner.dir.clone();
        let reserve = self.spool.inner.reserve_bytes;
        let outcome = tokio::task::spawn_blocking(move || {
            let result = writer
                .flush_blocking()
                .map_err(|err| no_room_or_io(err, &dir, writer.written(), reserve));
            let result = result.and_then(|()| {
                if !check {
                    return Ok(());
                }
                let available = local::available_bytes(&dir)?;
                if available < reserve {
                    return Err(SpoolError::NoRoom {
                        needed: writer.written().saturating_add(reserve),
                        available: available.saturating_add(writer.written()),
                    });
                }
                Ok(())
            });
            (writer, result)
        })
        .await;
        match outcome {
            Ok((writer, Ok(()))) => {
                self.writer = Some(writer);
                Ok(())
            }
            Ok((_, Err(err))) => {
                self.discard();
                Err(err)
            }
            Err(join) => {
                self.discard();
                Err(std::io::Error::other(join).into())
            }
        }
    }

    /// Removes the partial message file now, to give the space back at once.
    fn discard(&mut self) {
        self.writer = None;
        if self.armed {
            self.armed = false;
            if let Err(err) = remove_if_present(&self.path) {
                tracing::warn!(id = %self.id, error = %err, "cannot remove a discarded message");
            }
        }
    }

    /// Writes every copy the policy names and returns once the quorum confirmed;
    /// fills `id`, `data_len` and `data_sha256` of `envelope`.
    ///
    /// On `QuorumFailed` no committed copy is left: copies that confirmed are
    /// taken back before this returns, copies still running when the deadline
    /// passed are taken back in the background as they finish (see
    /// [`Spool::drain`]).
    pub async fn commit(mut self, mut envelope: Envelope) -> Result<Committed, SpoolError> {
        let writer = self.writer.take().ok_or_else(broken)?;
        // Held until the quorum answered, so `rotate` can wait for it.
        let spool_inner = Arc::clone(&self.spool.inner);
        let _committing = spool_inner
            .committing
            .acquire()
            .await
            .map_err(std::io::Error::other)?;
        envelope.id = self.id.clone();
        envelope.spool = self.spool.current_spool();
        let dir = self.spool.inner.dir.clone();
        let reserve = self.spool.inner.reserve_bytes;
        // The local copy's file is sealed and named before any copy starts,
        // so it is whole (and where the queue reads it) whichever copies
        // answer first; the local copy then makes it durable. A crash before
        // that may leave it sealed though its client got no 250: delivered
        // all the same, never lost.
        let named = self
            .spool
            .inner
            .keep_local
            .then(|| (self.path.clone(), self.spool.message_path(&self.id)));
        // One blocking call: the tail written, the digest, the envelope, the
        // seal and the name.
        let finished = tokio::task::spawn_blocking(move || {
            let len = writer.written();
            let full = |err| no_room_or_io(err, &dir, len, reserve);
            let (file, data_len, data_sha256) = writer.finish_blocking().map_err(full)?;
            envelope.data_len = data_len;
            envelope.data_sha256 = data_sha256;
            let mut json = serde_json::to_vec_pretty(&envelope).map_err(std::io::Error::other)?;
            json.push(b'\n');
            if let Some((part, path)) = named {
                message_file::seal(&file, data_len, &json).map_err(full)?;
                std::fs::rename(&part, &path)?;
            }
            Ok::<_, SpoolError>((file, envelope, json))
        })
        .await
        .map_err(std::io::Error::other)
        .map_err(SpoolError::from)
        .and_then(|r| r);
        let (file, envelope, json) = match finished {
            Ok(done) => done,
            Err(err) => {
                self.discard();
                return Err(err);
            }
        };
        if self.spool.inner.keep_local {
            self.path = self.spool.message_path(&self.id);
        }
        let data_len = envelope.data_len;

        // From here on the quorum writer owns the file: it removes it when the
        // commit fails, or when it was only staging.
        self.armed = false;
        let job = Arc::new(CopyJob {
            spool: envelope.spool.clone(),
            id: self.id.clone(),
            data_path: self.path.clone(),
            data_file: Arc::new(file),
            data_len,
            envelope_json: json.into(),
        });
        let inner = Arc::clone(&self.spool.inner);
        // Copies may still be running after the quorum answered; removing
        // the message waits for them (else a late PUT outlives the message).
        let (copies_done, copies_running) = tokio::sync::watch::channel(false);
        inner
            .copying
            .lock()
            .expect("spool lock")
            .insert(self.id.clone(), copies_running);
        let staging = (!inner.keep_local).then(|| self.path.clone());
        let finally: Option<Box<dyn FnOnce() + Send>> = {
            let id = self.id.clone();
            let inner = Arc::clone(&inner);
            Some(Box::new(move || {
                if let Some(path) = staging {
                    if let Err(err) = remove_if_present(&path) {
                        tracing::warn!(%id, error = %err, "cannot remove a staging file");
                    }
                }
                inner.copying.lock().expect("spool lock").remove(&id);
                let _ = copies_done.send(true);
            }))
        };
        // Its own task, so a client that vanishes mid-commit cannot cut the
        // quorum writer off between writing copies and taking them back.
        let task = inner.background.spawn({
            let inner = Arc::clone(&inner);
            async move {
                let latency = Some(Arc::clone(&inner.copy_latency));
                quorum::commit(
                    &inner.copies,
                    job,
                    inner.policy,
                    &inner.background,
                    finally,
                    latency,
                )
                .await
            }
        });
        let mut committed = task.await.map_err(std::io::Error::other)??;
        committed.data_sha256 = envelope.data_sha256;
        committed.spool = envelope.spool;
        Ok(committed)
    }

    /// Discards the message.
    pub async fn abort(mut self) {
        self.discard();
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.discard();
    }
}

fn broken() -> SpoolError {
    SpoolError::Io(std::io::Error::other(
        "the message was discarded after an earlier error",
    ))
}

/// Turns ENOSPC/EDQUOT into `NoRoom`, anything else into `Io`.
fn no_room_or_io(
    err: std::io::Error,
    dir: &std::path::Path,
    written: u64,
    reserve: u64,
) -> SpoolError {
    if local::is_out_of_space(&err) {
        SpoolError::NoRoom {
            needed: written.saturating_add(reserve),
            available: local::available_bytes(dir).unwrap_or(0),
        }
    } else {
        SpoolError::Io(err)
    }
}
