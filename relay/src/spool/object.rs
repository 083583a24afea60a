//! The object-store copy, in segments: many messages per object, each
//! message's envelope and wire-format data contiguous, an index at the end
//! ([`super::segment`]). Keys are `<prefix>/spools/<spool>/segments/<seq>.seg`
//! in a cluster and `<prefix>/segments/<seq>.seg` outside one, `<seq>` a
//! fresh time-ordered id; every object is created only if absent.
//!
//! A write joins the open batch of its spool. The batch closes when its
//! window ends (the first message's arrival plus `spool.segment_window`) or
//! when it holds `spool.segment_bytes`; then it goes up in one PUT (in parts
//! above [`SINGLE_PUT_MAX`]) and every write in it returns, all with the
//! same outcome. So a 250 that counts on this copy waits for the flush that
//! covers its message, and no more than one PUT goes out per window and spool.
//!
//! This relay keeps an index of the segments it knows (its own, and those it
//! listed when it took a spool over): which messages each holds and which of
//! those are still live. Finishing a message releases it; a segment whose
//! messages are all released is deleted, and only then may the cluster forget
//! the final states of its messages (a later owner that finds a segment must
//! be able to tell finished messages from new ones). [`ObjectCopy::events`]
//! hands those out.
//!
//! The backends are S3 (the `object_store` crate) and a local directory (our
//! own writer, because `object_store`'s LocalFileSystem does not fsync; its
//! reader serves the directory). Memory stays bounded: uploads draw on a
//! shared byte budget and large segments go up in parts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3CopyIfNotExists};
use object_store::path::Path as ObjectPath;
use object_store::{
    ClientOptions, GetOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::fsync::{remove_if_present, rename_noreplace, write_synced, DirSync};
use super::id::IdGenerator;
use super::quorum::{joined, CopyError, CopyJob, CopyTarget};
use super::segment::{self, SegmentError, Slot};
use crate::config::{Config, CopyKind, ObjectStoreConfig};

/// Largest segment uploaded with one PUT; larger ones go up in parts.
pub const SINGLE_PUT_MAX: u64 = 8 * 1024 * 1024;

/// Size of each part of a multipart upload (S3 wants at least 5 MiB).
pub const PART_SIZE: u64 = 8 * 1024 * 1024;

/// Message bytes all uploads together may hold in memory, in KiB.
const MEMORY_BUDGET_KIB: u32 = 64 * 1024;

/// Keys of deleted segments remembered, so a listing taken before a delete
/// cannot bring a segment back into the index.
const DELETED_REMEMBERED: usize = 65_536;

#[derive(Debug)]
enum Backend {
    S3 {
        store: Arc<AmazonS3>,
        prefix: ObjectPath,
    },
    Dir {
        root: PathBuf,
        sync: Arc<DirSync>,
        reader: Arc<object_store::local::LocalFileSystem>,
    },
}

/// A write waiting in an open batch.
struct Waiting {
    job: Arc<CopyJob>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The open batch of one spool.
#[derive(Default)]
struct Batch {
    generation: u64,
    bytes: u64,
    waiting: Vec<Waiting>,
}

/// One segment this relay knows of.
#[derive(Debug)]
struct Segment {
    spool: String,
    size: u64,
    slots: HashMap<String, Slot>,
    /// Messages not yet released.
    live: HashSet<String>,
    /// Released messages whose final state may be forgotten once the
    /// segment is gone.
    forget: Vec<String>,
    /// A delete is running.
    deleting: bool,
    /// Listed, not written by this process.
    foreign: bool,
    /// When it was written, Unix ms.
    written_ms: u64,
}

impl Segment {
    /// Octets of its live messages.
    fn live_bytes(&self) -> u64 {
        self.live
            .iter()
            .filter_map(|id| self.slots.get(id))
            .map(|slot| slot.envelope.1 + slot.data.1)
            .sum()
    }
}

/// What this relay knows about segments.
#[derive(Debug, Default)]
struct SegmentIndex {
    segments: HashMap<ObjectPath, Segment>,
    /// Segments holding each live message (two after a crash between a
    /// copy and the delete of the segment it was copied from).
    by_id: HashMap<String, Vec<ObjectPath>>,
    /// Messages in an open batch or a flush.
    pending: HashSet<String>,
    /// Recently deleted segments, oldest first.
    deleted: VecDeque<ObjectPath>,
    deleted_set: HashSet<ObjectPath>,
    /// Empty segments whose delete failed; retried on the next release.
    undeleted: bool,
}

impl SegmentIndex {
    /// Records a segment, all its messages live; a segment already known or
    /// recently deleted is not recorded again.
    fn insert(
        &mut self,
        key: ObjectPath,
        spool: &str,
        size: u64,
        slots: Vec<Slot>,
        foreign: bool,
        written_ms: u64,
    ) {
        if self.segments.contains_key(&key) || self.deleted_set.contains(&key) {
            return;
        }
        let live: HashSet<String> = slots.iter().map(|s| s.id.clone()).collect();
        for id in &live {
            self.by_id.entry(id.clone()).or_default().push(key.clone());
        }
        let slots = slots.into_iter().map(|s| (s.id.clone(), s)).collect();
        self.segments.insert(
            key,
            Segment {
                spool: spool.to_owned(),
                size,
                slots,
                live,
                forget: Vec::new(),
                deleting: false,
                foreign,
                written_ms,
            },
        );
    }

    /// Releases `id` from every segment holding it; returns the segments
    /// that became empty (now marked deleting) and whether any held it.
    fn release(&mut self, id: &str, forget: bool) -> (Vec<ObjectPath>, bool) {
        let Some(keys) = self.by_id.remove(id) else {
            return (Vec::new(), false);
        };
        (self.let_go(id, keys, forget), true)
    }

    /// Moves live message `id` to segment `to` alone: every other segment
    /// holding it lets go of it. Returns the segments that became empty.
    fn moved(&mut self, id: &str, to: &ObjectPath) -> Vec<ObjectPath> {
        let Some(keys) = self.by_id.get_mut(id) else {
            return Vec::new();
        };
        let old: Vec<ObjectPath> = keys.iter().filter(|k| *k != to).cloned().collect();
        keys.retain(|k| k == to);
        self.let_go(id, old, false)
    }

    /// Takes `id` out of the live messages of the segments `keys` (noting it
    /// to be forgotten with them when `forget`); returns those left empty,
    /// now marked deleting.
    fn let_go(&mut self, id: &str, keys: Vec<ObjectPath>, forget: bool) -> Vec<ObjectPath> {
        let mut empty = Vec::new();
        for key in keys {
            if let Some(segment) = self.segments.get_mut(&key) {
                segment.live.remove(id);
                if forget {
                    segment.forget.push(id.to_owned());
                }
                if segment.live.is_empty() && !segment.deleting {
                    segment.deleting = true;
                    empty.push(key);
                }
            }
        }
        empty
    }

    /// Empty segments not being deleted (after failed deletes).
    fn take_undeleted(&mut self) -> Vec<ObjectPath> {
        if !std::mem::take(&mut self.undeleted) {
            return Vec::new();
        }
        let mut keys = Vec::new();
        for (key, segment) in &mut self.segments {
            if segment.live.is_empty() && !segment.deleting {
                segment.deleting = true;
                keys.push(key.clone());
            }
        }
        keys
    }

    /// Forgets a deleted segment; returns its spool and the ids whose state
    /// may go now.
    fn deleted(&mut self, key: &ObjectPath) -> Option<(String, Vec<String>)> {
        let segment = self.segments.remove(key)?;
        self.deleted.push_back(key.clone());
        self.deleted_set.insert(key.clone());
        while self.deleted.len() > DELETED_REMEMBERED {
            if let Some(old) = self.deleted.pop_front() {
                self.deleted_set.remove(&old);
            }
        }
        Some((segment.spool, segment.forget))
    }
}

/// What the cluster must record about messages in segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEvent {
    /// The segments holding these messages of the spool are gone: their
    /// final states may be forgotten.
    Forget(String, Vec<String>),
    /// This message of the spool was refused (its quorum was lost) after its
    /// copy landed in a segment that stays for other messages: a later owner
    /// that lists the segment must find it final, not new.
    Withdrawn(String, String),
}

/// Settings of the batches.
#[derive(Debug, Clone, Copy)]
struct Batching {
    /// How long a batch stays open after its first message.
    window: Duration,
    /// Size at which a batch closes at once.
    max_bytes: u64,
}

impl Batching {
    /// The batching `config` asks for: `spool.segment_window`, else 50 ms
    /// when every copy must confirm (a 250 waits for the flush) and 200 ms
    /// when the ack policy can do without this copy (it is written behind).
    fn from_config(config: &Config) -> Batching {
        let spool = &config.spool;
        let window = spool
            .segment_window
            .unwrap_or(if spool.required >= spool.copies.len() {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(200)
            });
        Batching {
            window,
            max_bytes: spool.segment_bytes,
        }
    }
}

/// The object-store copy of messages.
pub struct ObjectCopy {
    backend: Backend,
    budget: Semaphore,
    batching: Batching,
    seq: IdGenerator,
    generation: AtomicU64,
    batches: Mutex<HashMap<String, Batch>>,
    index: Mutex<SegmentIndex>,
    events: Mutex<Option<mpsc::UnboundedSender<SegmentEvent>>>,
    /// Damaged segments moved to quarantine since start.
    quarantined: AtomicU64,
}

impl std::fmt::Debug for ObjectCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectCopy")
            .field("backend", &self.backend)
            .field("batching", &self.batching)
            .finish_non_exhaustive()
    }
}

/// One piece of a segment's bytes.
enum Piece {
    Bytes(Bytes),
    /// The first `len` octets of a file.
    File(Arc<File>, u64),
}

impl Piece {
    fn len(&self) -> u64 {
        match self {
            Piece::Bytes(bytes) => bytes.len() as u64,
            Piece::File(_, len) => *len,
        }
    }
}

impl ObjectCopy {
    /// Builds the copy `config.object_store` describes; creates the directory
    /// of the local backend. Requests are retried for at most `spool.deadline`.
    pub fn from_config(config: &Config) -> io::Result<ObjectCopy> {
        let backend = match &config.object_store {
            ObjectStoreConfig::Local { .. } => {
                let root = config.local_object_dir();
                let segments = root.join("segments");
                std::fs::create_dir_all(&segments)?;
                Backend::Dir {
                    reader: Arc::new(
                        object_store::local::LocalFileSystem::new_with_prefix(&root)
                            .map_err(io::Error::other)?,
                    ),
                    root,
                    sync: DirSync::new(segments),
                }
            }
            ObjectStoreConfig::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
            } => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_allow_http(*allow_http)
                    .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
                    .with_retry(RetryConfig {
                        retry_timeout: config.spool.deadline,
                        ..RetryConfig::default()
                    })
                    .with_client_options(
                        ClientOptions::new()
                            .with_allow_http(*allow_http)
                            .with_connect_timeout(
                                Duration::from_secs(5).min(config.spool.deadline),
                            ),
                    );
                if let Some(endpoint) = endpoint {
                    // Test servers and most S3-compatible stores are not
                    // reachable through bucket subdomains.
                    builder = builder
                        .with_endpoint(endpoint)
                        .with_virtual_hosted_style_request(false);
                }
                if let Some(key) = access_key_id {
                    builder = builder.with_access_key_id(key);
                }
                if let Some(secret) = secret_access_key {
                    builder = builder.with_secret_access_key(secret);
                }
                let store = builder.build().map_err(io::Error::other)?;
                Backend::S3 {
                    store: Arc::new(store),
                    prefix: ObjectPath::from(prefix.as_str()),
                }
            }
        };
        Ok(ObjectCopy {
            backend,
            budget: Semaphore::new(MEMORY_BUDGET_KIB as usize),
            batching: Batching::from_config(config),
            seq: IdGenerator::new(),
            generation: AtomicU64::new(0),
            batches: Mutex::new(HashMap::new()),
            index: Mutex::new(SegmentIndex::default()),
            events: Mutex::new(None),
            quarantined: AtomicU64::new(0),
        })
    }

    /// Where the segments of `spool` live: `<prefix>/spools/<spool>/segments`
    /// in S3 (so the relay that takes a spool over lists exactly its
    /// messages), `<prefix>/segments` for a relay outside a cluster, and
    /// `segments` in the local-directory backend, which serves one machine.
    pub fn segments_prefix(&self, spool: &str) -> ObjectPath {
        match &self.backend {
            Backend::S3 { prefix, .. } if !spool.is_empty() => {
                prefix.clone().join("spools").join(spool).join("segments")
            }
            Backend::S3 { prefix, .. } => prefix.clone().join("segments"),
            Backend::Dir { .. } => ObjectPath::from("segments"),
        }
    }

    /// Where damaged segments of `spool` are moved: beside its `segments`,
    /// `quarantine` (kept for a human, never read by the relay).
    pub fn quarantine_prefix(&self, spool: &str) -> ObjectPath {
        let segments = self.segments_prefix(spool);
        let mut parts: Vec<_> = segments.parts().collect();
        parts.pop();
        ObjectPath::from_iter(parts).join("quarantine")
    }

    /// Segments moved to quarantine since start.
    pub fn quarantined_segments(&self) -> u64 {
        self.quarantined.load(Ordering::Relaxed)
    }

    /// Moves the damaged segment `key` of `spool` to quarantine (a copy that
    /// never replaces one already there, then the delete); left in place,
    /// with the error logged, when that fails.
    async fn quarantine(&self, spool: &str, key: &ObjectPath, damage: &str) {
        let store = self.store();
        let to = self
            .quarantine_prefix(spool)
            .join(key.filename().unwrap_or("segment"));
        let moved = match store.copy_if_not_exists(key, &to).await {
            Ok(()) | Err(object_store::Error::AlreadyExists { .. }) => store.delete(key).await,
            Err(err) => Err(err),
        };
        match moved {
            Ok(()) => {
                self.quarantined.fetch_add(1, Ordering::Relaxed);
                tracing::error!(key = %key, quarantine = %to, error = %damage, "a damaged segment in the object store moved to quarantine; its messages come from the other copies");
            }
            Err(err) => {
                tracing::error!(key = %key, error = %damage, move_error = %err, "a damaged segment in the object store could not be moved to quarantine; left in place, its messages come from the other copies");
            }
        }
    }

    /// The prefix all S3 keys of this relay live under (`None` for the
    /// local-directory backend).
    pub fn s3_prefix(&self) -> Option<&ObjectPath> {
        match &self.backend {
            Backend::S3 { prefix, .. } => Some(prefix),
            Backend::Dir { .. } => None,
        }
    }

    /// The store, for readers (repair, takeover, tests).
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        match &self.backend {
            Backend::S3 { store, .. } => Arc::clone(store) as Arc<dyn ObjectStore>,
            Backend::Dir { reader, .. } => Arc::clone(reader) as Arc<dyn ObjectStore>,
        }
    }

    /// From now on, what the cluster must record about messages in
    /// segments ([`SegmentEvent`]). One subscriber (the cluster node);
    /// outside a cluster nobody asks.
    pub fn events(&self) -> mpsc::UnboundedReceiver<SegmentEvent> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.events.lock().expect("object lock") = Some(tx);
        rx
    }

    fn send(&self, event: SegmentEvent) {
        if let Some(tx) = &*self.events.lock().expect("object lock") {
            let _ = tx.send(event);
        }
    }

    /// Whether a known segment holds message `id` (repair writes the copy
    /// of a message that has none).
    pub fn holds(&self, id: &str) -> bool {
        self.index
            .lock()
            .expect("object lock")
            .by_id
            .contains_key(id)
    }

    fn location(&self, id: &str) -> Option<(ObjectPath, Slot)> {
        let index = self.index.lock().expect("object lock");
        let key = index.by_id.get(id)?.first()?.clone();
        let slot = index.segments.get(&key)?.slots.get(id)?.clone();
        Some((key, slot))
    }

    /// The envelope JSON and the data of message `id`, read with ranged GETs
    /// from the segment holding it; `None` when no known segment does.
    pub async fn read(&self, id: &str) -> Result<Option<(Bytes, Bytes)>, object_store::Error> {
        if self.location(id).is_none() {
            return Ok(None);
        }
        let (envelope, data) = self.open(id).await?;
        let chunks: Vec<Bytes> = data.try_collect().await?;
        Ok(Some((envelope, chunks.concat().into())))
    }

    /// The envelope JSON of message `id` and its data as a stream (for the
    /// relay that copies it here to deliver it).
    pub async fn open(
        &self,
        id: &str,
    ) -> Result<(Bytes, BoxStream<'static, object_store::Result<Bytes>>), object_store::Error> {
        let Some((key, slot)) = self.location(id) else {
            return Err(object_store::Error::NotFound {
                path: id.to_owned(),
                source: "no known segment holds the message".into(),
            });
        };
        let store = self.store();
        let envelope = store.get_range(&key, slot.envelope_range()).await?;
        let options = GetOptions::default().with_range(Some(slot.data_range()));
        let data = store.get_opts(&key, options).await?.into_stream();
        Ok((envelope, data))
    }

    /// Lists the segments of `spool`, reads the index of each one not known
    /// yet (one ranged GET of its tail, two for a long index) and returns the
    /// live messages they hold, sorted. A segment whose index is still
    /// damaged when read again is moved to quarantine
    /// ([`quarantine_prefix`](ObjectCopy::quarantine_prefix)), logged and
    /// counted ([`quarantined_segments`](ObjectCopy::quarantined_segments));
    /// its messages are not counted: the other copies serve them (and
    /// repair, in a cluster, writes them into a new segment).
    pub async fn list_spool(&self, spool: &str) -> Result<Vec<String>, object_store::Error> {
        let prefix = self.segments_prefix(spool);
        let store = self.store();
        let metas: Vec<object_store::ObjectMeta> = store.list(Some(&prefix)).try_collect().await?;
        for meta in metas {
            let key = meta.location;
            if !key.as_ref().ends_with(".seg") {
                continue;
            }
            {
                let index = self.index.lock().expect("object lock");
                if index.segments.contains_key(&key) || index.deleted_set.contains(&key) {
                    continue;
                }
            }
            let mut read = read_index(store.as_ref(), &key, meta.size).await;
            if matches!(read, Err(IndexError::Damaged(_))) {
                // Once more, in case the read and not the object was bad.
                read = read_index(store.as_ref(), &key, meta.size).await;
            }
            match read {
                Ok(slots) => self.index.lock().expect("object lock").insert(
                    key,
                    spool,
                    meta.size,
                    slots,
                    true,
                    meta.last_modified.timestamp_millis().max(0) as u64,
                ),
                Err(IndexError::Store(object_store::Error::NotFound { .. })) => {}
                Err(IndexError::Store(err)) => return Err(err),
                Err(IndexError::Damaged(err)) => {
                    self.quarantine(spool, &key, &err.to_string()).await
                }
            }
        }
        let index = self.index.lock().expect("object lock");
        let mut ids: Vec<String> = index
            .segments
            .values()
            .filter(|s| s.spool == spool)
            .flat_map(|s| s.live.iter().cloned())
            .collect();
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    /// Releases every message of `spool`'s listed segments (not written by
    /// this process) for which `live` says no (after a restart outside a
    /// cluster: what recovery did not find was finished), so they go.
    pub async fn release_foreign_unless(&self, spool: &str, live: impl Fn(&str) -> bool) {
        let ids: Vec<String> = {
            let index = self.index.lock().expect("object lock");
            index
                .segments
                .values()
                .filter(|s| s.spool == spool && s.foreign)
                .flat_map(|s| s.live.iter().filter(|id| !live(id)).cloned())
                .collect()
        };
        for id in ids {
            self.release(&id, true).await;
        }
    }

    /// Releases message `id`: it is finished. Segments left without a live
    /// message are deleted. Returns whether a segment held it: then, with
    /// `forget_state`, its final state may be forgotten only once
    /// [`ObjectCopy::events`] says so.
    pub async fn release(&self, id: &str, forget_state: bool) -> bool {
        self.release_as(id, forget_state, None).await
    }

    /// [`release`](ObjectCopy::release); for a message of cluster spool
    /// `withdrawn` that was never acknowledged, a segment that stays with
    /// other messages first gets it recorded as final.
    async fn release_as(&self, id: &str, forget_state: bool, withdrawn: Option<&str>) -> bool {
        let (mut empty, held, stays) = {
            let mut index = self.index.lock().expect("object lock");
            let keys = index.by_id.get(id).cloned().unwrap_or_default();
            let (empty, held) = index.release(id, forget_state);
            let stays = keys.iter().any(|key| !empty.contains(key));
            (empty, held, stays)
        };
        if let (Some(spool), true) = (withdrawn, stays) {
            self.send(SegmentEvent::Withdrawn(spool.to_owned(), id.to_owned()));
        }
        empty.extend(self.index.lock().expect("object lock").take_undeleted());
        for key in empty {
            self.delete_segment(&key).await;
        }
        held
    }

    /// Deletes every segment of `spool` (it was retired: all its messages
    /// are finished) and forgets them.
    pub async fn drop_spool(&self, spool: &str) -> Result<(), object_store::Error> {
        let prefix = self.segments_prefix(spool);
        let store = self.store();
        let keys: Vec<ObjectPath> = store
            .list(Some(&prefix))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?;
        for key in keys {
            self.delete_object(&key).await?;
            let mut index = self.index.lock().expect("object lock");
            if let Some(segment) = index.segments.get(&key) {
                for id in segment.slots.keys().cloned().collect::<Vec<_>>() {
                    index.by_id.remove(&id);
                }
            }
            index.deleted(&key);
        }
        Ok(())
    }

    /// Segments written more than `after` ago whose live messages hold less
    /// than half their bytes, each with those messages: copying these
    /// forward into a new segment lets the old one go, so a message that
    /// stays deferred never pins the storage of the many finished around it.
    pub fn stale_segments(&self, after: Duration) -> Vec<(ObjectPath, Vec<String>)> {
        let before = now_ms().saturating_sub(after.as_millis() as u64);
        let index = self.index.lock().expect("object lock");
        index
            .segments
            .iter()
            .filter(|(_, s)| {
                s.written_ms <= before
                    && !s.deleting
                    && !s.live.is_empty()
                    && s.live_bytes() * 2 < s.size
            })
            .map(|(key, s)| {
                let mut ids: Vec<String> = s.live.iter().cloned().collect();
                ids.sort();
                (key.clone(), ids)
            })
            .collect()
    }

    /// Copies live message `job.id` into a new segment (with the messages
    /// of its window), then lets go of it in the segments that held it;
    /// those left empty are deleted. The caller keeps the message from being
    /// finished meanwhile (the queue marks it busy).
    pub async fn forward(self: Arc<Self>, job: Arc<CopyJob>) -> Result<(), CopyError> {
        let id = job.id.clone();
        Arc::clone(&self).write_batched(job, true).await?;
        let empty = {
            let mut index = self.index.lock().expect("object lock");
            let to = index.by_id.get(&id).and_then(|keys| keys.last()).cloned();
            match to {
                Some(to) => index.moved(&id, &to),
                None => Vec::new(),
            }
        };
        for key in empty {
            self.delete_segment(&key).await;
        }
        Ok(())
    }

    async fn delete_segment(&self, key: &ObjectPath) {
        match self.delete_object(key).await {
            Ok(()) => {
                let gone = self.index.lock().expect("object lock").deleted(key);
                if let Some((spool, forget)) = gone {
                    tracing::debug!(key = %key, finished = forget.len(), "segment deleted");
                    if !forget.is_empty() {
                        self.send(SegmentEvent::Forget(spool, forget));
                    }
                }
            }
            Err(err) => {
                tracing::warn!(key = %key, error = %err, "cannot delete a finished segment; trying again later");
                let mut index = self.index.lock().expect("object lock");
                if let Some(segment) = index.segments.get_mut(key) {
                    segment.deleting = false;
                }
                index.undeleted = true;
            }
        }
    }

    async fn delete_object(&self, key: &ObjectPath) -> Result<(), object_store::Error> {
        let result = match &self.backend {
            Backend::S3 { store, .. } => store.delete(key).await,
            Backend::Dir { root, .. } => {
                let path = root.join(key.as_ref());
                tokio::task::spawn_blocking(move || remove_if_present(&path))
                    .await
                    .map_err(|e| object_store::Error::Generic {
                        store: "dir",
                        source: Box::new(e),
                    })?
                    .map_err(|e| object_store::Error::Generic {
                        store: "dir",
                        source: Box::new(e),
                    })
            }
        };
        match result {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// Adds `job` to its spool's open batch and waits for the flush; a
    /// message some segment holds already is refused unless `forward`.
    async fn write_batched(
        self: Arc<Self>,
        job: Arc<CopyJob>,
        forward: bool,
    ) -> Result<(), CopyError> {
        {
            let mut index = self.index.lock().expect("object lock");
            let held = index.by_id.contains_key(&job.id);
            if held != forward || !index.pending.insert(job.id.clone()) {
                return Err(CopyError::AlreadyExists {
                    key: format!("object copy of {}", job.id),
                });
            }
        }
        let (done, outcome) = oneshot::channel();
        let spool = job.spool.clone();
        let size = job.envelope_json.len() as u64 + job.data_len;
        enum Next {
            FlushNow(Batch),
            Timer(u64),
            Wait,
        }
        let next = {
            let mut batches = self.batches.lock().expect("object lock");
            let batch = batches.entry(spool.clone()).or_default();
            let first = batch.waiting.is_empty();
            if first {
                batch.generation = self.generation.fetch_add(1, Ordering::Relaxed);
            }
            batch.bytes += size;
            batch.waiting.push(Waiting { job, done });
            if batch.bytes >= self.batching.max_bytes {
                Next::FlushNow(std::mem::take(batch))
            } else if first {
                Next::Timer(batch.generation)
            } else {
                Next::Wait
            }
        };
        match next {
            Next::FlushNow(batch) => {
                tokio::spawn(Arc::clone(&self).flush(spool, batch));
            }
            Next::Timer(generation) => {
                let copy = Arc::clone(&self);
                tokio::spawn(async move {
                    tokio::time::sleep(copy.batching.window).await;
                    let batch = {
                        let mut batches = copy.batches.lock().expect("object lock");
                        match batches.get_mut(&spool) {
                            Some(batch)
                                if batch.generation == generation && !batch.waiting.is_empty() =>
                            {
                                Some(std::mem::take(batch))
                            }
                            _ => None,
                        }
                    };
                    if let Some(batch) = batch {
                        copy.flush(spool, batch).await;
                    }
                });
            }
            Next::Wait => {}
        }
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(CopyError::Io(io::Error::other(err))),
            Err(_) => Err(CopyError::Io(io::Error::other(
                "the segment flush was dropped",
            ))),
        }
    }

    /// Uploads one closed batch as a segment and answers every write in it.
    async fn flush(self: Arc<Self>, spool: String, batch: Batch) {
        let key = self
            .segments_prefix(&spool)
            .join(format!("{}.seg", self.seq.next_id()).as_str());
        let slots = segment::layout(batch.waiting.iter().map(|w| {
            (
                w.job.id.clone(),
                w.job.envelope_json.len() as u64,
                w.job.data_len,
            )
        }));
        let mut pieces = Vec::with_capacity(batch.waiting.len() * 2 + 1);
        for waiting in &batch.waiting {
            pieces.push(Piece::Bytes(waiting.job.envelope_json.clone()));
            pieces.push(Piece::File(
                Arc::clone(&waiting.job.data_file),
                waiting.job.data_len,
            ));
        }
        pieces.push(Piece::Bytes(segment::trailer(&slots).into()));
        let pieces = Arc::new(pieces);
        let size: u64 = pieces.iter().map(Piece::len).sum();
        let result = self.upload(&key, &pieces, size).await;
        {
            let mut index = self.index.lock().expect("object lock");
            for waiting in &batch.waiting {
                index.pending.remove(&waiting.job.id);
            }
            if result.is_ok() {
                index.insert(key.clone(), &spool, size, slots, false, now_ms());
            }
        }
        match &result {
            Ok(()) => {
                tracing::debug!(key = %key, messages = batch.waiting.len(), size, "segment written");
            }
            Err(err) => {
                tracing::warn!(key = %key, messages = batch.waiting.len(), error = %err, "segment upload failed")
            }
        }
        for waiting in batch.waiting {
            let _ = waiting
                .done
                .send(result.as_ref().map(|_| ()).map_err(|e| e.to_string()));
        }
    }

    async fn upload(
        &self,
        key: &ObjectPath,
        pieces: &Arc<Vec<Piece>>,
        size: u64,
    ) -> Result<(), CopyError> {
        match &self.backend {
            Backend::S3 { store, prefix } => {
                if size <= SINGLE_PUT_MAX {
                    let _permit = self.reserve(size).await;
                    let bytes = read_pieces(pieces, 0, size).await?;
                    let opts = PutOptions {
                        mode: PutMode::Create,
                        ..PutOptions::default()
                    };
                    store.put_opts(key, bytes.into(), opts).await?;
                    Ok(())
                } else {
                    // Multipart uploads cannot be conditional, so the parts go
                    // to a staging key and a conditional copy creates the real one.
                    let staging = prefix
                        .clone()
                        .join("staging")
                        .join(key.filename().unwrap_or("segment").to_owned().as_str());
                    let result = self.upload_parts(store, &staging, pieces, size).await;
                    let result = match result {
                        Ok(()) => store
                            .copy_if_not_exists(&staging, key)
                            .await
                            .map_err(CopyError::from),
                        Err(err) => Err(err),
                    };
                    if let Err(err) = store.delete(&staging).await {
                        tracing::warn!(key = %staging, error = %err, "cannot delete a staging object");
                    }
                    result
                }
            }
            Backend::Dir { root, sync, .. } => {
                let path = root.join(key.as_ref());
                let pieces = Arc::clone(pieces);
                tokio::task::spawn_blocking(move || write_segment_file(&path, &pieces)).await??;
                sync.sync().await?;
                Ok(())
            }
        }
    }

    async fn upload_parts(
        &self,
        store: &AmazonS3,
        key: &ObjectPath,
        pieces: &Arc<Vec<Piece>>,
        size: u64,
    ) -> Result<(), CopyError> {
        let mut upload = store.put_multipart(key).await?;
        let mut offset = 0;
        let result = async {
            while offset < size {
                let len = PART_SIZE.min(size - offset);
                let _permit = self.reserve(len).await;
                let bytes = read_pieces(pieces, offset, len).await?;
                upload.put_part(PutPayload::from(bytes)).await?;
                offset += len;
            }
            upload.complete().await?;
            Ok::<(), CopyError>(())
        }
        .await;
        if result.is_err() {
            let _ = upload.abort().await;
        }
        result
    }

    async fn reserve(&self, len: u64) -> tokio::sync::SemaphorePermit<'_> {
        let kib = len.div_ceil(1024).clamp(1, u64::from(MEMORY_BUDGET_KIB)) as u32;
        self.budget
            .acquire_many(kib)
            .await
            .expect("the upload budget is never closed")
    }
}

/// The wall clock in Unix ms.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a segment's index could not be read.
enum IndexError {
    Store(object_store::Error),
    Damaged(SegmentError),
}

/// Reads the index of the segment at `key` of `size` octets: its tail first,
/// then more of it when the index is longer than the tail read.
async fn read_index(
    store: &dyn ObjectStore,
    key: &ObjectPath,
    size: u64,
) -> Result<Vec<Slot>, IndexError> {
    let mut want = segment::TAIL_READ.min(size);
    loop {
        let tail = store
            .get_range(key, size - want..size)
            .await
            .map_err(IndexError::Store)?;
        match segment::parse_tail(&tail, size) {
            Err(SegmentError::NeedMore(more)) if want + more <= size => want += more,
            Ok(slots) => return Ok(slots),
            Err(err) => return Err(IndexError::Damaged(err)),
        }
    }
}

/// Reads `len` octets at `offset` of the concatenation of `pieces`, on a
/// blocking thread.
async fn read_pieces(pieces: &Arc<Vec<Piece>>, offset: u64, len: u64) -> io::Result<Bytes> {
    let pieces = Arc::clone(pieces);
    tokio::task::spawn_blocking(move || {
        let mut buf = PageBuf::new(len as usize)?;
        let out = buf.as_mut();
        let mut at = 0u64; // start of the current piece
        for piece in pieces.iter() {
            let piece_len = piece.len();
            let start = offset.max(at);
            let end = (offset + len).min(at + piece_len);
            if start < end {
                let dest = &mut out[(start - offset) as usize..(end - offset) as usize];
                match piece {
                    Piece::Bytes(bytes) => {
                        dest.copy_from_slice(&bytes[(start - at) as usize..(end - at) as usize])
                    }
                    Piece::File(file, _) => file.read_exact_at(dest, start - at)?,
                }
            }
            at += piece_len;
        }
        Ok(Bytes::from_owner(buf))
    })
    .await
    .map_err(io::Error::other)?
}

/// Blocking: writes `pieces` to a private temp file beside `path`, fsyncs it
/// and names it `path` unless that exists.
fn write_segment_file(path: &std::path::Path, pieces: &[Piece]) -> Result<(), CopyError> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::other("no directory"))?;
    let tmp = dir.join(format!(".{:016x}.tmp", rand::random::<u64>()));
    let result = (|| -> Result<(), CopyError> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        for piece in pieces {
            match piece {
                Piece::Bytes(bytes) => io::Write::write_all(&mut file, bytes)?,
                Piece::File(source, len) => {
                    // Positional reads: the handle is shared, its offset is not ours.
                    let mut chunk = vec![0u8; (*len).min(256 * 1024) as usize];
                    let mut at = 0u64;
                    while at < *len {
                        let n = ((*len - at) as usize).min(chunk.len());
                        source.read_exact_at(&mut chunk[..n], at)?;
                        io::Write::write_all(&mut file, &chunk[..n])?;
                        at += n as u64;
                    }
                }
            }
        }
        file.sync_data()?;
        match rename_noreplace(&tmp, path) {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                Err(CopyError::AlreadyExists {
                    key: path.display().to_string(),
                })
            }
            Err(err) => Err(err.into()),
        }
    })();
    let _ = remove_if_present(&tmp);
    result
}

/// A buffer in its own anonymous mapping, so its memory goes back to the
/// system when dropped. Multi-megabyte buffers from malloc raise glibc's
/// dynamic mmap threshold and then stay in the heap: with many uploads that
/// kept RSS near 300 MiB although the budget allows 64 MiB in flight.
struct PageBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: PageBuf owns its mapping exclusively; it is plain memory.
unsafe impl Send for PageBuf {}
// SAFETY: shared access is read-only through `as_ref`.
unsafe impl Sync for PageBuf {}

impl PageBuf {
    fn new(len: usize) -> io::Result<PageBuf> {
        if len == 0 {
            return Ok(PageBuf {
                ptr: std::ptr::NonNull::dangling(),
                len,
            });
        }
        // SAFETY: a fresh private anonymous mapping; no existing memory is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(PageBuf { ptr, len })
    }
}

impl AsRef<[u8]> for PageBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes (zero-filled by mmap) while self lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsMut<[u8]> for PageBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PageBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping created in `new`.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        }
    }
}

impl CopyTarget for ObjectCopy {
    fn kind(&self) -> CopyKind {
        CopyKind::ObjectStore
    }

    fn write(self: Arc<Self>, job: Arc<CopyJob>) -> BoxFuture<'static, Result<(), CopyError>> {
        Box::pin(self.write_batched(job, false))
    }

    /// Takes back the copy of a message that was never acknowledged (its
    /// quorum was lost): released, and recorded as final in the cluster
    /// when its segment stays.
    fn remove(
        self: Arc<Self>,
        spool: String,
        id: String,
    ) -> BoxFuture<'static, Result<(), CopyError>> {
        Box::pin(async move {
            let withdrawn = (!spool.is_empty()).then_some(spool.as_str());
            self.release_as(&id, true, withdrawn).await;
            Ok(())
        })
    }

    fn restore(
        self: Arc<Self>,
        spool: String,
        id: String,
        scratch: PathBuf,
    ) -> BoxFuture<'static, Result<bool, CopyError>> {
        Box::pin(async move {
            if self.location(&id).is_none() {
                // Not seen since start (single-node relays list no segments).
                self.list_spool(&spool).await?;
            }
            let Some((envelope_json, data)) = self.read(&id).await? else {
                return Ok(false);
            };
            let path = super::message_file::path(&scratch, &id);
            joined(
                tokio::task::spawn_blocking(move || {
                    remove_if_present(&path)?;
                    let mut sealed = data.to_vec();
                    let len = data.len() as u64;
                    sealed.extend(super::message_file::seal_bytes(len, &envelope_json)?);
                    write_synced(&path, &sealed)
                })
                .await,
            )?;
            Ok(true)
        })
    }
}
