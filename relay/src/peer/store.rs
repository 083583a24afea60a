//! Replicas on disk (`<data_dir>/replicas/<spool>/<id>.msg`, the same
//! sealed message files as the local spool, see
//! [`message_file`](crate::spool::message_file)) and the one durable write
//! path every replica takes, whether it arrives through `Replicate` or is
//! fetched by [`PeerClient::fetch`](super::PeerClient::fetch).
//!
//! A replica is written like the local spool commits a message: the file
//! is created as `<id>.part` (never reused), filled as the data streams in
//! and checked against the announced length and SHA-256; then it is sealed
//! with the envelope and renamed to `<id>.msg` without replacing anything,
//! and a group-committed `syncfs(2)` makes all of it durable,
//! shared with every replica written meanwhile (so the replicas streamed to
//! a peer at once cost it one sync). Only then is the write confirmed.
//! Whatever fails (or is cancelled) before the rename leaves no file behind;
//! a failed sync takes the replica back.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};

use super::{valid_spool, CHUNK};
use crate::spool::fsync::{remove_if_present, rename_noreplace, sync_dir, DirSync};
use crate::spool::id;
use crate::spool::local::{available_bytes, Writer};
use crate::spool::message_file::{self, Seal};
use crate::spool::sweep::{sweep, Older};

/// Why a replica could not be written, read or removed. Each maps to one
/// gRPC status ([`ReplicaError::to_status`]).
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// Not a usable spool name (see [`valid_spool`]).
    #[error("invalid spool name {0:?}: use 1-128 of [A-Za-z0-9._-]")]
    InvalidSpool(String),
    /// Not a spool id.
    #[error("invalid message id {0:?}")]
    InvalidId(String),
    /// The stream did not have the expected shape.
    #[error("malformed replica stream: {0}")]
    Protocol(String),
    /// A replica of this message with a different envelope is already here.
    #[error("a different replica of {id} already exists")]
    AlreadyExists {
        /// The message.
        id: String,
    },
    /// Another stream is writing a replica of this message right now.
    #[error("a replica of {id} is being written")]
    Busy {
        /// The message.
        id: String,
    },
    /// The message was removed while its replica was being written.
    #[error("{id} was removed while its replica was written")]
    Removed {
        /// The message.
        id: String,
    },
    /// More or fewer data octets than announced.
    #[error("{got} octets of data received, {expected} announced")]
    Length {
        /// Announced.
        expected: u64,
        /// Received (so far, when there were too many).
        got: u64,
    },
    /// The data's SHA-256 is not the announced one.
    #[error("data SHA-256 is {got}, {expected} announced")]
    Digest {
        /// Announced, lower-case hex.
        expected: String,
        /// Computed, lower-case hex.
        got: String,
    },
    /// The disk lacks room for the replica.
    #[error("insufficient space for a replica: {needed} octets needed, {available} available")]
    NoRoom {
        /// Octets the replica needs.
        needed: u64,
        /// Octets available.
        available: u64,
    },
    /// The data stream broke before its end.
    #[error("the data stream broke: {0}")]
    Stream(String),
    /// A local file operation failed.
    #[error("replica I/O error: {0}")]
    Io(#[from] io::Error),
}

impl ReplicaError {
    /// How this error reaches a gRPC client.
    pub fn to_status(&self) -> tonic::Status {
        use tonic::Status;
        let message = self.to_string();
        match self {
            ReplicaError::InvalidSpool(_)
            | ReplicaError::InvalidId(_)
            | ReplicaError::Protocol(_) => Status::invalid_argument(message),
            ReplicaError::AlreadyExists { .. } => Status::already_exists(message),
            ReplicaError::Busy { .. } | ReplicaError::Removed { .. } => Status::aborted(message),
            ReplicaError::Length { .. } => Status::out_of_range(message),
            ReplicaError::Digest { .. } => Status::data_loss(message),
            ReplicaError::NoRoom { .. } => Status::resource_exhausted(message),
            ReplicaError::Stream(_) => Status::cancelled(message),
            ReplicaError::Io(_) => Status::internal(message),
        }
    }
}

/// Checks a message id from the network.
pub fn check_id(id: &str) -> Result<(), ReplicaError> {
    if id::is_valid(id) {
        Ok(())
    } else {
        Err(ReplicaError::InvalidId(id.to_owned()))
    }
}

/// Checks a spool name from the network.
pub fn check_spool(spool: &str) -> Result<(), ReplicaError> {
    if valid_spool(spool) {
        Ok(())
    } else {
        Err(ReplicaError::InvalidSpool(spool.to_owned()))
    }
}

/// What a replica is, known before its data arrives.
#[derive(Debug, Clone)]
pub struct Header {
    /// The spool id.
    pub id: String,
    /// The envelope JSON, stored as it is.
    pub envelope_json: Bytes,
    /// Announced length of the data.
    pub data_len: u64,
    /// Announced SHA-256 of the data, lower-case hex; `None` skips the check.
    pub data_sha256: Option<String>,
}

/// How a successful write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The replica was written now.
    Stored,
    /// An identical replica (same envelope bytes) was already committed; the
    /// data stream was not read.
    AlreadyThere,
}

/// The message files being written, so two streams never write one
/// replica, and a removal during a write keeps the write from committing.
#[derive(Debug, Clone, Default)]
pub struct Writing {
    /// Message file path → removed while being written.
    paths: Arc<Mutex<HashMap<PathBuf, bool>>>,
}

impl Writing {
    /// Registers a write of `path`; `None` when one is running.
    fn enter(&self, path: &Path) -> Option<WritingGuard> {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        if paths.contains_key(path) {
            return None;
        }
        paths.insert(path.to_owned(), false);
        Some(WritingGuard {
            writing: self.clone(),
            path: path.to_owned(),
        })
    }

    /// Keeps a running write of `path` from committing.
    pub fn cancel(&self, path: &Path) {
        let mut paths = self.paths.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(removed) = paths.get_mut(path) {
            *removed = true;
        }
    }
}

/// One registered write; deregisters on drop.
struct WritingGuard {
    writing: Writing,
    path: PathBuf,
}

impl WritingGuard {
    /// Runs `commit` (the seal committing the replica) unless the
    /// message was removed meanwhile; holds the registry lock while it runs,
    /// so a removal comes either before (and wins) or after (and sees it).
    fn commit(
        &self,
        id: &str,
        commit: impl FnOnce() -> io::Result<()>,
    ) -> Result<(), ReplicaError> {
        let paths = self.writing.paths.lock().unwrap_or_else(|e| e.into_inner());
        if paths.get(&self.path).copied().unwrap_or(true) {
            return Err(ReplicaError::Removed { id: id.to_owned() });
        }
        commit()?;
        drop(paths);
        Ok(())
    }
}

impl Drop for WritingGuard {
    fn drop(&mut self) {
        let mut paths = self.writing.paths.lock().unwrap_or_else(|e| e.into_inner());
        paths.remove(&self.path);
    }
}

/// Files of an unfinished write, removed on drop unless disarmed (so a
/// cancelled write leaves nothing).
struct Leftovers {
    paths: Vec<PathBuf>,
}

impl Leftovers {
    fn disarm(&mut self) {
        self.paths.clear();
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for path in &self.paths {
            if let Err(err) = remove_if_present(path) {
                tracing::warn!(path = %path.display(), error = %err, "cannot remove a partial replica");
            }
        }
    }
}

/// Reads the seal of `id`'s message file in `dir`; `None` when there is
/// no file.
fn read_seal(dir: &Path, id: &str) -> io::Result<Option<Seal>> {
    match message_file::read_seal_at(&message_file::path(dir, id)) {
        Ok(seal) => Ok(Some(seal)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err),
    }
}

/// The envelope JSON of the committed message `id` in `dir`, if any.
fn read_envelope(dir: &Path, id: &str) -> io::Result<Option<Vec<u8>>> {
    Ok(match read_seal(dir, id)? {
        Some(Seal::Sealed { envelope_json, .. }) => Some(envelope_json),
        _ => None,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReplicaError> + Send + 'static,
) -> Result<T, ReplicaError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|join| ReplicaError::Io(io::Error::other(join)))?
}

/// Writes the replica `header` describes into `dir` (which must exist) from
/// `data`, durably: returns once `files` (a [`DirSync::filesystem`] of
/// `dir`'s filesystem) has synced the sealed `<id>.msg`.
///
/// An identical replica already committed is [`Written::AlreadyThere`]; one
/// with different envelope bytes is [`ReplicaError::AlreadyExists`]. A
/// stream that breaks, runs past `data_len`, ends short or has another
/// SHA-256 leaves no file behind; so does cancelling the returned future
/// before the data has ended. `writing` registers the write, so a second
/// stream for the same replica gets [`ReplicaError::Busy`] and
/// [`Writing::cancel`] keeps it from committing.
pub async fn write_replica<S>(
    dir: &Path,
    files: &Arc<DirSync>,
    writing: &Writing,
    header: Header,
    data: S,
) -> Result<Written, ReplicaError>
where
    S: Stream<Item = Result<Bytes, ReplicaError>> + Send,
{
    check_id(&header.id)?;
    let id = header.id.clone();
    let path = message_file::path(dir, &id);
    let part = message_file::part_path(dir, &id);
    let guard = writing
        .enter(&path)
        .ok_or_else(|| ReplicaError::Busy { id: id.clone() })?;

    let prepared = {
        let (dir, id, path, part) = (dir.to_owned(), id.clone(), path.clone(), part.clone());
        let envelope = header.envelope_json.clone();
        let needed = header
            .data_len
            .saturating_add(header.envelope_json.len() as u64);
        blocking(move || {
            if let Some(existing) = read_envelope(&dir, &id)? {
                return if existing == envelope[..] {
                    Ok(None)
                } else {
                    Err(ReplicaError::AlreadyExists { id })
                };
            }
            let available = available_bytes(&dir)?;
            if available < needed {
                return Err(ReplicaError::NoRoom { needed, available });
            }
            // Not sealed and no running write: anything here is what a
            // crash mid-write left, or a damaged replica, written again.
            remove_if_present(&part)?;
            remove_if_present(&path)?;
            Ok(Some(message_file::create(&part)?))
        })
        .await?
    };
    let Some(file) = prepared else {
        // Committed by an earlier attempt; make sure it is durable before
        // confirming again.
        files.sync().await?;
        return Ok(Written::AlreadyThere);
    };
    let mut leftovers = Leftovers {
        paths: vec![part.clone()],
    };

    let mut writer = Writer::new(file);
    let mut data = std::pin::pin!(data);
    while let Some(chunk) = data.next().await {
        let mut rest = &chunk?[..];
        if writer.written() + rest.len() as u64 > header.data_len {
            return Err(ReplicaError::Length {
                expected: header.data_len,
                got: writer.written() + rest.len() as u64,
            });
        }
        while !rest.is_empty() {
            let take = writer.room().min(rest.len());
            writer.push(&rest[..take]);
            rest = &rest[take..];
            if writer.room() == 0 {
                writer = blocking(move || {
                    writer.flush_blocking()?;
                    Ok(writer)
                })
                .await?;
            }
        }
    }

    // From here the blocking task owns the files: once started it either
    // commits the replica whole or removes it, even if this future is dropped.
    leftovers.disarm();
    let expected_len = header.data_len;
    let expected_sha = header.data_sha256.map(|s| s.to_ascii_lowercase());
    let envelope = header.envelope_json;
    let commit_id = id.clone();
    let (commit_part, commit_path) = (part.clone(), path.clone());
    blocking(move || {
        let mut leftovers = Leftovers {
            paths: vec![commit_part.clone()],
        };
        let (file, len, digest) = writer.finish_blocking()?;
        if len != expected_len {
            return Err(ReplicaError::Length {
                expected: expected_len,
                got: len,
            });
        }
        if let Some(expected) = expected_sha {
            if expected != digest {
                return Err(ReplicaError::Digest {
                    expected,
                    got: digest,
                });
            }
        }
        guard.commit(&commit_id, || {
            message_file::seal(&file, len, &envelope)?;
            rename_noreplace(&commit_part, &commit_path)
        })?;
        leftovers.disarm();
        Ok(())
    })
    .await?;
    if let Err(err) = files.sync().await {
        // Sealed but maybe not durable: not a replica anyone may count on.
        let _ = remove_if_present(&path);
        return Err(err.into());
    }
    Ok(Written::Stored)
}

/// Streams `len` octets of `file` from offset 0 in [`CHUNK`]-sized pieces,
/// each read on a blocking thread, so at most one chunk is in memory.
pub fn read_chunks(
    file: Arc<File>,
    len: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    futures::stream::try_unfold(0u64, move |offset| {
        let file = Arc::clone(&file);
        async move {
            if offset >= len {
                return Ok(None);
            }
            let n = (len - offset).min(CHUNK as u64) as usize;
            let buf = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; n];
                file.read_exact_at(&mut buf, offset).map(|()| buf)
            })
            .await
            .map_err(io::Error::other)??;
            Ok(Some((Bytes::from(buf), offset + n as u64)))
        }
    })
}

/// A committed message opened for reading.
#[derive(Debug)]
pub struct Opened {
    /// The message file, open (so it stays readable if removed meanwhile).
    pub file: Arc<File>,
    /// Octets of data, from offset 0.
    pub data_len: u64,
    /// The envelope JSON.
    pub envelope_json: Bytes,
}

/// Opens the committed message `id` in `dir`; `None` when it is absent or
/// not sealed.
pub fn open_committed(dir: &Path, id: &str) -> io::Result<Option<Opened>> {
    let file = match File::open(message_file::path(dir, id)) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(err),
    };
    let Seal::Sealed {
        data_len,
        envelope_json,
    } = message_file::read_seal(&file)?
    else {
        return Ok(None);
    };
    Ok(Some(Opened {
        file: Arc::new(file),
        data_len,
        envelope_json: envelope_json.into(),
    }))
}

/// Ids of the message files in `dir` (committed or being written), sorted;
/// an absent directory holds none.
fn message_ids(dir: &Path) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        if let Some(id) = name.to_str().and_then(message_file::id_of) {
            if id::is_valid(id) {
                ids.push(id.to_owned());
            }
        }
    }
    ids.sort();
    Ok(ids)
}

/// Ids of the committed (sealed) messages in `dir`, sorted; an absent
/// directory holds none.
pub fn committed_ids(dir: &Path) -> io::Result<Vec<String>> {
    let mut ids = message_ids(dir)?;
    let mut kept = Vec::with_capacity(ids.len());
    for id in ids.drain(..) {
        if matches!(read_seal(dir, &id)?, Some(Seal::Sealed { .. })) {
            kept.push(id);
        }
    }
    Ok(kept)
}

/// Removes message `id` from `dir`, durably (the directory is synced when
/// a file went). Absent is fine.
pub async fn remove_message(dir: &Path, sync: &Arc<DirSync>, id: &str) -> Result<(), ReplicaError> {
    let path = message_file::path(dir, id);
    let removed = blocking(move || Ok(crate::spool::fsync::remove_existing(&path)?)).await?;
    if removed {
        sync.sync().await?;
    }
    Ok(())
}

/// The replicas this relay holds for others, under `<data_dir>/replicas/`.
#[derive(Debug)]
pub struct ReplicaStore {
    root: PathBuf,
    /// One group committer per spool directory.
    syncs: Mutex<HashMap<String, Arc<DirSync>>>,
    /// `syncfs` rounds of the replicas' filesystem (writes).
    files: Arc<DirSync>,
    writing: Writing,
}

impl ReplicaStore {
    /// Opens (creating) `<data_dir>/replicas`, sweeping each spool's
    /// directory as the local spool's recovery does ([`sweep`]): older
    /// versions' replicas become sealed message files, what interrupted
    /// writes left goes, and so do message files whose seal does not hold
    /// (the owner writes a replica again when it repairs its copies).
    /// Blocking; call it before serving.
    pub fn open(data_dir: &Path) -> io::Result<ReplicaStore> {
        let root = data_dir.join("replicas");
        if !root.exists() {
            std::fs::create_dir_all(&root)?;
            sync_dir(data_dir)?;
        }
        let mut removed = 0usize;
        for spool in std::fs::read_dir(&root)? {
            let spool = spool?;
            if !spool.file_type()?.is_dir() {
                continue;
            }
            let dir = spool.path();
            // An older replica without its data: the owner writes it again.
            let older = |_: &str, _: &[u8], has_data: bool| {
                if has_data {
                    Older::Convert
                } else {
                    Older::Drop
                }
            };
            let swept = sweep(&dir, &|_| false, &older)?;
            removed += swept.removed;
            let damaged = swept.damaged.into_iter().map(|(id, why)| {
                tracing::warn!(%id, reason = %why, "removing a damaged replica");
                message_file::path(&dir, &id)
            });
            let misnamed = swept.misnamed.iter().map(|name| dir.join(name));
            for path in damaged.chain(misnamed) {
                remove_if_present(&path)?;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(removed, "removed partial replicas");
        }
        Ok(ReplicaStore {
            syncs: Mutex::new(HashMap::new()),
            files: DirSync::filesystem(root.clone())?,
            root,
            writing: Writing::default(),
        })
    }

    /// `<data_dir>/replicas`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<data_dir>/replicas/<spool>`, once `spool` is checked.
    pub fn spool_dir(&self, spool: &str) -> Result<PathBuf, ReplicaError> {
        check_spool(spool)?;
        Ok(self.root.join(spool))
    }

    fn sync_of(&self, spool: &str, dir: &Path) -> Arc<DirSync> {
        let mut syncs = self.syncs.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(
            syncs
                .entry(spool.to_owned())
                .or_insert_with(|| DirSync::new(dir.to_owned())),
        )
    }

    /// Writes a replica of a message of `spool` ([`write_replica`] in
    /// `replicas/<spool>/`, created as needed).
    pub async fn write<S>(
        &self,
        spool: &str,
        header: Header,
        data: S,
    ) -> Result<Written, ReplicaError>
    where
        S: Stream<Item = Result<Bytes, ReplicaError>> + Send,
    {
        let dir = self.spool_dir(spool)?;
        check_id(&header.id)?;
        let (root, created) = (self.root.clone(), dir.clone());
        blocking(move || {
            if !created.is_dir() {
                std::fs::create_dir_all(&created)?;
                sync_dir(&root)?;
            }
            Ok(())
        })
        .await?;
        write_replica(&dir, &self.files, &self.writing, header, data).await
    }

    /// Ids of the committed replicas of `spool`, sorted.
    pub async fn list(&self, spool: &str) -> Result<Vec<String>, ReplicaError> {
        let dir = self.spool_dir(spool)?;
        blocking(move || Ok(committed_ids(&dir)?)).await
    }

    /// Opens the committed replica `spool`/`id`; `None` when absent.
    pub async fn open_message(
        &self,
        spool: &str,
        id: &str,
    ) -> Result<Option<Opened>, ReplicaError> {
        let dir = self.spool_dir(spool)?;
        check_id(id)?;
        let id = id.to_owned();
        blocking(move || Ok(open_committed(&dir, &id)?)).await
    }

    /// Removes the replica `spool`/`id` durably, and keeps a write of it
    /// that is still running from committing. Absent is fine.
    pub async fn remove(&self, spool: &str, id: &str) -> Result<(), ReplicaError> {
        let dir = self.spool_dir(spool)?;
        check_id(id)?;
        self.writing.cancel(&message_file::path(&dir, id));
        if !dir.is_dir() {
            return Ok(());
        }
        let sync = self.sync_of(spool, &dir);
        remove_message(&dir, &sync, id).await
    }

    /// Removes every replica of `spool` and its directory. Absent is fine.
    pub async fn drop_spool(&self, spool: &str) -> Result<(), ReplicaError> {
        let dir = self.spool_dir(spool)?;
        let root = self.root.clone();
        blocking(move || {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(err) => return Err(err.into()),
            }
            Ok(sync_dir(&root)?)
        })
        .await?;
        self.syncs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(spool);
        Ok(())
    }
}

/// The SHA-256 of `len` octets of `file`, lower-case hex, read in
/// [`CHUNK`]-sized pieces. Blocking.
pub fn file_sha256(file: &File, len: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0; CHUNK];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(CHUNK as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset)?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::file_names as names;

    const ID: &str = "01ARZ3NDEKTSV4RRFFQ69G5FAV";

    fn header(data: &[u8]) -> Header {
        Header {
            id: ID.into(),
            envelope_json: Bytes::from_static(b"{\"id\":\"x\"}"),
            data_len: data.len() as u64,
            data_sha256: Some(hex::encode(Sha256::digest(data))),
        }
    }

    fn chunks(data: &[u8], size: usize) -> Vec<Result<Bytes, ReplicaError>> {
        data.chunks(size)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect()
    }

    fn setup() -> (tempfile::TempDir, ReplicaStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ReplicaStore::open(dir.path()).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn a_replica_is_stored_whole_and_listed() {
        let (_dir, store) = setup();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let written = store
            .write(
                "s1",
                header(&data),
                futures::stream::iter(chunks(&data, 7000)),
            )
            .await
            .unwrap();
        assert_eq!(written, Written::Stored);
        let spool = store.spool_dir("s1").unwrap();
        let opened = open_committed(&spool, ID).unwrap().unwrap();
        assert_eq!(opened.data_len, data.len() as u64);
        assert_eq!(&opened.envelope_json[..], b"{\"id\":\"x\"}");
        assert_eq!(
            file_sha256(&opened.file, opened.data_len).unwrap(),
            hex::encode(Sha256::digest(&data))
        );
        assert_eq!(
            &std::fs::read(message_file::path(&spool, ID)).unwrap()[..data.len()],
            &data[..]
        );
        assert_eq!(names(&spool), vec![format!("{ID}.msg")]);
        assert_eq!(store.list("s1").await.unwrap(), vec![ID.to_owned()]);
        assert!(store.list("other").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn bad_length_or_digest_leaves_nothing() {
        let (_dir, store) = setup();
        let data = b"Subject: x\r\n\r\nbody\r\n".to_vec();
        let spool = store.spool_dir("s1").unwrap();

        let mut wrong_digest = header(&data);
        wrong_digest.data_sha256 = Some(hex::encode(Sha256::digest(b"other")));
        let err = store
            .write("s1", wrong_digest, futures::stream::iter(chunks(&data, 5)))
            .await
            .unwrap_err();
        assert!(matches!(err, ReplicaError::Digest { .. }), "{err}");
        assert_eq!(err.to_status().code(), tonic::Code::DataLoss);
        assert!(names(&spool).is_empty(), "{:?}", names(&spool));

        let short = futures::stream::iter(chunks(&data[..10], 5));
        let err = store.write("s1", header(&data), short).await.unwrap_err();
        assert!(
            matches!(err, ReplicaError::Length { expected, got: 10 } if expected == data.len() as u64)
        );
        assert!(names(&spool).is_empty());

        let mut long = data.clone();
        long.extend_from_slice(b"more");
        let err = store
            .write("s1", header(&data), futures::stream::iter(chunks(&long, 5)))
            .await
            .unwrap_err();
        assert!(matches!(err, ReplicaError::Length { .. }), "{err}");
        assert!(names(&spool).is_empty());

        let broken = futures::stream::iter(vec![
            Ok(Bytes::from_static(b"Subj")),
            Err(ReplicaError::Stream("reset".into())),
        ]);
        let err = store.write("s1", header(&data), broken).await.unwrap_err();
        assert!(matches!(err, ReplicaError::Stream(_)), "{err}");
        assert!(names(&spool).is_empty());
    }

    #[tokio::test]
    async fn a_cancelled_write_leaves_nothing() {
        let (_dir, store) = setup();
        let data = vec![b'x'; 100_000];
        let spool = store.spool_dir("s1").unwrap();
        // Some data, then a stream that never ends.
        let stalled = futures::stream::iter(chunks(&data[..50_000], 10_000))
            .chain(futures::stream::pending());
        let write = store.write("s1", header(&data), stalled);
        let cut = tokio::time::timeout(std::time::Duration::from_millis(200), write).await;
        assert!(cut.is_err());
        assert!(names(&spool).is_empty(), "{:?}", names(&spool));
        // The id is free again.
        store
            .write(
                "s1",
                header(&data),
                futures::stream::iter(chunks(&data, 4096)),
            )
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn identical_retries_succeed_and_different_envelopes_are_refused() {
        let (_dir, store) = setup();
        let data = b"hello".to_vec();
        store
            .write("s1", header(&data), futures::stream::iter(chunks(&data, 2)))
            .await
            .unwrap();
        let again = store
            .write("s1", header(&data), futures::stream::iter(chunks(&data, 2)))
            .await
            .unwrap();
        assert_eq!(again, Written::AlreadyThere);
        let mut other = header(&data);
        other.envelope_json = Bytes::from_static(b"{\"id\":\"y\"}");
        let err = store
            .write("s1", other, futures::stream::iter(chunks(&data, 2)))
            .await
            .unwrap_err();
        assert!(matches!(err, ReplicaError::AlreadyExists { .. }), "{err}");
        let spool = store.spool_dir("s1").unwrap();
        assert_eq!(
            read_envelope(&spool, ID).unwrap().unwrap(),
            b"{\"id\":\"x\"}"
        );
    }

    #[tokio::test]
    async fn a_removal_during_the_write_keeps_it_from_committing() {
        let (_dir, store) = setup();
        let data = vec![b'y'; 1000];
        let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Bytes, ReplicaError>>();
        tx.unbounded_send(Ok(Bytes::copy_from_slice(&data[..500])))
            .unwrap();
        let write = store.write("s1", header(&data), rx);
        let remove = async {
            // Let the write start, then remove the message and end the data.
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            store.remove("s1", ID).await.unwrap();
            tx.unbounded_send(Ok(Bytes::copy_from_slice(&data[500..])))
                .unwrap();
            drop(tx);
        };
        let (result, ()) = tokio::join!(write, remove);
        assert!(
            matches!(result, Err(ReplicaError::Removed { .. })),
            "{result:?}"
        );
        assert!(names(&store.spool_dir("s1").unwrap()).is_empty());
    }

    #[tokio::test]
    async fn names_from_the_network_are_checked() {
        let (dir, store) = setup();
        let data = b"x".to_vec();
        for spool in ["..", ".", "a/b", ""] {
            let err = store
                .write(
                    spool,
                    header(&data),
                    futures::stream::iter(chunks(&data, 1)),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(err, ReplicaError::InvalidSpool(_)),
                "{spool:?}: {err}"
            );
        }
        let mut bad = header(&data);
        bad.id = "../../etc/passwd".into();
        let err = store
            .write("s1", bad, futures::stream::iter(chunks(&data, 1)))
            .await
            .unwrap_err();
        assert!(matches!(err, ReplicaError::InvalidId(_)), "{err}");
        assert_eq!(names(dir.path()), vec!["replicas"]);
        assert!(names(store.root()).is_empty());
    }

    #[tokio::test]
    async fn remove_and_drop_spool() {
        let (_dir, store) = setup();
        let data = b"x".to_vec();
        store
            .write("s1", header(&data), futures::stream::iter(chunks(&data, 1)))
            .await
            .unwrap();
        store.remove("s1", ID).await.unwrap();
        assert!(names(&store.spool_dir("s1").unwrap()).is_empty());
        store.remove("s1", ID).await.unwrap();
        store.remove("never", ID).await.unwrap();
        store
            .write("s1", header(&data), futures::stream::iter(chunks(&data, 1)))
            .await
            .unwrap();
        store.drop_spool("s1").await.unwrap();
        assert!(!store.spool_dir("s1").unwrap().exists());
        store.drop_spool("s1").await.unwrap();
    }

    #[test]
    fn opening_sweeps_what_interrupted_writes_left_and_converts_older_replicas() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("replicas").join("s1");
        std::fs::create_dir_all(&spool).unwrap();
        let (older, partial, unsealed) = (
            "01ARZ3NDEKTSV4RRFFQ69G5FAW",
            "01ARZ3NDEKTSV4RRFFQ69G5FAX",
            "01ARZ3NDEKTSV4RRFFQ69G5FAY",
        );
        // Committed by this version.
        let mut sealed = b"kept".to_vec();
        sealed.extend(message_file::seal_bytes(4, b"{}").unwrap());
        std::fs::write(message_file::path(&spool, ID), sealed).unwrap();
        // Committed by an older version.
        std::fs::write(spool.join(format!("{older}.eml")), b"older").unwrap();
        std::fs::write(spool.join(format!("{older}.env")), b"{\"o\":1}").unwrap();
        // Interrupted writes of an older version and of this one.
        std::fs::write(spool.join(format!("{partial}.eml")), b"partial").unwrap();
        std::fs::write(spool.join(format!("{partial}.env.tmp")), b"{}").unwrap();
        std::fs::write(message_file::path(&spool, unsealed), b"half").unwrap();
        ReplicaStore::open(dir.path()).unwrap();
        assert_eq!(
            names(&spool),
            vec![format!("{ID}.msg"), format!("{older}.msg")]
        );
        let converted = open_committed(&spool, older).unwrap().unwrap();
        assert_eq!(
            (converted.data_len, &converted.envelope_json[..]),
            (5, &b"{\"o\":1}"[..])
        );
    }

    #[tokio::test]
    async fn read_chunks_streams_the_file_in_pieces() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..(CHUNK * 2 + 5)).map(|i| i as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let pieces: Vec<Bytes> = read_chunks(Arc::clone(&file), data.len() as u64)
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert_eq!(
            pieces.iter().map(Bytes::len).collect::<Vec<_>>(),
            vec![CHUNK, CHUNK, 5]
        );
        assert_eq!(pieces.concat(), data);
        assert_eq!(
            file_sha256(&file, data.len() as u64).unwrap(),
            hex::encode(Sha256::digest(&data))
        );
        // Asking for more than the file holds fails instead of padding.
        let over: Vec<io::Result<Bytes>> = read_chunks(file, data.len() as u64 + 1).collect().await;
        assert!(over.last().unwrap().is_err());
    }
}
