//! Delivery states in an append-only journal (DESIGN.md §2.5), so a deferral
//! costs one appended record and a share of one group-committed `fdatasync`,
//! not a file per message (write, fsync, rename, directory fsync) and a disk
//! block each.
//!
//! Files `<sequence:016x>.journal` under `<data_dir>/state/`, replayed in
//! order at start: an id's last record wins. A record is
//!
//! ```text
//! body length (u32 LE) | CRC-32C of the body (u32 LE) | body
//! body = kind (1 = state, 2 = removed) | id (u128 LE) | DeliveryState JSON
//! ```
//!
//! Saves append and then wait for an `fdatasync` that started after their
//! append; one sync covers every save waiting on it ([`DirSync::rounds_of`]).
//! A removal appends without waiting: a crash that loses it leaves a state
//! whose message is gone, which start-up drops (`remove_orphan_states`).
//!
//! A file is sealed at [`FILE_BYTES`]. When the files hold more than twice
//! the live records and at least [`COMPACT_MIN_BYTES`], every live record
//! is copied forward into new files and the old ones are deleted, oldest
//! first (a crash in between replays the copies after the originals).
//!
//! Damage found at start: a record whose checksum fails is skipped with a
//! log line and the reader resynchronises at the next intact record; the
//! message falls back to its previous state (or a fresh one), which may
//! deliver a recipient again but never loses one. A torn tail of the newest
//! file (a crash mid-append) is truncated.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{error, info, warn};

use super::state::DeliveryState;
use crate::spool::fsync::{remove_if_present, sync_dir, DirSync};
use crate::spool::id;

/// Octets before a record's body: its length and checksum.
const HEADER: usize = 8;
/// A body's kind and id.
const BODY_PREFIX: usize = 1 + 16;
/// Larger bodies are taken for damage (a state is well under 1 KiB per
/// recipient).
const MAX_BODY: usize = 16 << 20;
/// A file is sealed once it holds this much.
pub const FILE_BYTES: u64 = 64 << 20;
/// The files are compacted only once they hold at least this much.
pub const COMPACT_MIN_BYTES: u64 = 1 << 20;

const SAVED: u8 = 1;
const REMOVED: u8 = 2;

/// One record read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Record<'a> {
    kind: u8,
    key: u128,
    payload: &'a [u8],
}

fn checksum(body: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, body) as u32
}

/// The bytes of one record.
fn encode(kind: u8, key: u128, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::with_capacity(BODY_PREFIX + payload.len());
    body.push(kind);
    body.extend_from_slice(&key.to_le_bytes());
    body.extend_from_slice(payload);
    let mut record = Vec::with_capacity(HEADER + body.len());
    record.extend_from_slice(&(body.len() as u32).to_le_bytes());
    record.extend_from_slice(&checksum(&body).to_le_bytes());
    record.extend_from_slice(&body);
    record
}

/// The record at the start of `bytes` and its length, if one is there whole
/// and intact.
fn decode(bytes: &[u8]) -> Option<(Record<'_>, usize)> {
    let len = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    if !(BODY_PREFIX..=MAX_BODY).contains(&len) {
        return None;
    }
    let sum = u32::from_le_bytes(bytes.get(4..HEADER)?.try_into().ok()?);
    let body = bytes.get(HEADER..HEADER + len)?;
    if checksum(body) != sum || !matches!(body[0], SAVED | REMOVED) {
        return None;
    }
    let key = u128::from_le_bytes(body[1..BODY_PREFIX].try_into().ok()?);
    let record = Record {
        kind: body[0],
        key,
        payload: &body[BODY_PREFIX..],
    };
    Some((record, HEADER + len))
}

/// What reading one file found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Scan<'a> {
    /// Intact records with their offsets, in order.
    records: Vec<(u64, Record<'a>)>,
    /// Damaged stretches skipped before an intact record: (offset, octets).
    skipped: Vec<(u64, usize)>,
    /// Where the last intact record ends.
    end: u64,
}

/// Reads every intact record of a file; after damage, resynchronises at the
/// next offset where an intact record starts.
fn scan(bytes: &[u8]) -> Scan<'_> {
    let mut found = Scan::default();
    let mut at = 0;
    let mut damage: Option<usize> = None;
    while at < bytes.len() {
        match decode(&bytes[at..]) {
            Some((record, len)) => {
                if let Some(start) = damage.take() {
                    found.skipped.push((start as u64, at - start));
                }
                found.records.push((at as u64, record));
                at += len;
                found.end = at as u64;
            }
            None => {
                damage.get_or_insert(at);
                at += 1;
            }
        }
    }
    found
}

/// Where an id's live record lies.
#[derive(Debug, Clone, Copy)]
struct Location {
    file: u64,
    offset: u64,
    len: u32,
}

/// The files and the index of live records; one writer at a time.
#[derive(Debug)]
struct Files {
    dir: PathBuf,
    /// Every file by sequence, the last one appended to.
    open: BTreeMap<u64, Arc<File>>,
    active: u64,
    active_len: u64,
    /// The file the next sync round covers.
    current: Arc<Mutex<Arc<File>>>,
    index: HashMap<u128, Location>,
    live_bytes: u64,
    total_bytes: u64,
    /// An append failed and could not be undone: nothing more is written.
    broken: bool,
}

fn file_name(sequence: u64) -> String {
    format!("{sequence:016x}.journal")
}

fn create_file(dir: &Path, sequence: u64) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create_new(true)
        .open(dir.join(file_name(sequence)))
}

impl Files {
    /// Appends one record; a failed append is cut off again so the file
    /// never holds half a record before the next one.
    fn append(&mut self, record: &[u8]) -> io::Result<Location> {
        if self.broken {
            return Err(io::Error::other(
                "the state journal could not undo a failed write; restart the relay",
            ));
        }
        if self.active_len + record.len() as u64 > FILE_BYTES && self.active_len > 0 {
            self.rotate()?;
        }
        let file = Arc::clone(&self.open[&self.active]);
        if let Err(err) = (&*file).write_all(record) {
            if file.set_len(self.active_len).is_err() {
                self.broken = true;
            }
            return Err(err);
        }
        let location = Location {
            file: self.active,
            offset: self.active_len,
            len: record.len() as u32,
        };
        self.active_len += record.len() as u64;
        self.total_bytes += record.len() as u64;
        Ok(location)
    }

    /// Seals the active file (synced, so no later round has to cover it)
    /// and starts the next.
    fn rotate(&mut self) -> io::Result<()> {
        self.open[&self.active].sync_data()?;
        let next = self.active + 1;
        let file = Arc::new(create_file(&self.dir, next)?);
        sync_dir(&self.dir)?;
        self.open.insert(next, Arc::clone(&file));
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = file;
        self.active = next;
        self.active_len = 0;
        Ok(())
    }

    fn read(&self, location: Location) -> io::Result<Vec<u8>> {
        let mut bytes = vec![0; location.len as usize];
        self.open[&location.file].read_exact_at(&mut bytes, location.offset)?;
        Ok(bytes)
    }

    fn index(&mut self, key: u128, location: Location) {
        if let Some(old) = self.index.insert(key, location) {
            self.live_bytes -= u64::from(old.len);
        }
        self.live_bytes += u64::from(location.len);
    }

    fn unindex(&mut self, key: u128) -> bool {
        match self.index.remove(&key) {
            Some(old) => {
                self.live_bytes -= u64::from(old.len);
                true
            }
            None => false,
        }
    }

    fn wants_compaction(&self) -> bool {
        self.total_bytes >= COMPACT_MIN_BYTES && self.total_bytes > 2 * self.live_bytes
    }

    /// Copies every live record into new files and deletes the old ones.
    fn compact(&mut self) -> io::Result<()> {
        let before = self.total_bytes;
        self.rotate()?;
        let old: Vec<u64> = self.open.range(..self.active).map(|(&s, _)| s).collect();
        let moving: Vec<(u128, Location)> = self
            .index
            .iter()
            .filter(|(_, at)| at.file < self.active)
            .map(|(&key, &at)| (key, at))
            .collect();
        for (key, at) in moving {
            let record = self.read(at)?;
            let moved = self.append(&record)?;
            self.index(key, moved);
        }
        self.open[&self.active].sync_data()?;
        for sequence in old {
            let file = self.open.remove(&sequence).expect("listed");
            self.total_bytes -= file.metadata().map_or(0, |m| m.len());
            std::fs::remove_file(self.dir.join(file_name(sequence)))?;
        }
        sync_dir(&self.dir)?;
        info!(
            records = self.index.len(),
            before,
            after = self.total_bytes,
            "state journal compacted"
        );
        Ok(())
    }
}

/// Reads and writes delivery states; cheap to clone.
#[derive(Debug, Clone)]
pub struct StateJournal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    files: Mutex<Files>,
    sync: Arc<DirSync>,
    records: AtomicU64,
    bytes: AtomicU64,
}

impl StateJournal {
    /// Opens (creating) the journal in `dir`, replaying its files and taking
    /// in the state files (`<id>.json`) an older relay left there.
    pub fn open(dir: &Path) -> io::Result<StateJournal> {
        StateJournal::open_with_fault(dir, None)
    }

    fn open_with_fault(dir: &Path, fault: Option<Arc<AtomicBool>>) -> io::Result<StateJournal> {
        std::fs::create_dir_all(dir)?;
        let mut sequences = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let name = entry?.file_name();
            let sequence = name
                .to_str()
                .and_then(|n| n.strip_suffix(".journal"))
                .and_then(|n| u64::from_str_radix(n, 16).ok());
            sequences.extend(sequence);
        }
        sequences.sort_unstable();
        let mut open = BTreeMap::new();
        let mut index = HashMap::new();
        let mut total_bytes = 0;
        let last = sequences.last().copied();
        for &sequence in &sequences {
            let path = dir.join(file_name(sequence));
            let bytes = std::fs::read(&path)?;
            let found = scan(&bytes);
            for &(offset, len) in &found.skipped {
                error!(file = %path.display(), offset, len, "damaged state journal records skipped; those messages may be delivered again to recipients already done");
            }
            let mut len = bytes.len() as u64;
            if Some(sequence) == last && found.end < len {
                warn!(file = %path.display(), octets = len - found.end, "torn tail of the state journal truncated");
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(found.end)?;
                len = found.end;
            } else if found.end < len {
                error!(file = %path.display(), offset = found.end, "the end of a sealed state journal file is damaged");
            }
            for (offset, record) in found.records {
                match record.kind {
                    SAVED => {
                        let record_len = (HEADER + BODY_PREFIX + record.payload.len()) as u32;
                        index.insert(
                            record.key,
                            Location {
                                file: sequence,
                                offset,
                                len: record_len,
                            },
                        );
                    }
                    _ => {
                        index.remove(&record.key);
                    }
                }
            }
            total_bytes += len;
            let file = OpenOptions::new().read(true).append(true).open(&path)?;
            open.insert(sequence, Arc::new(file));
        }
        let (active, active_len) = match last {
            Some(sequence) => (sequence, open[&sequence].metadata()?.len()),
            None => {
                open.insert(1, Arc::new(create_file(dir, 1)?));
                sync_dir(dir)?;
                (1, 0)
            }
        };
        let current = Arc::new(Mutex::new(Arc::clone(&open[&active])));
        let live_bytes = index.values().map(|at: &Location| u64::from(at.len)).sum();
        let files = Files {
            dir: dir.to_owned(),
            open,
            active,
            active_len,
            current: Arc::clone(&current),
            index,
            live_bytes,
            total_bytes,
            broken: false,
        };
        let sync = DirSync::rounds_of(dir.to_owned(), move || {
            if fault.as_ref().is_some_and(|f| f.load(Ordering::SeqCst)) {
                return Err(io::Error::other("injected fdatasync failure"));
            }
            let file = Arc::clone(&current.lock().unwrap_or_else(|e| e.into_inner()));
            file.sync_data()
        });
        let journal = StateJournal {
            inner: Arc::new(Inner {
                files: Mutex::new(files),
                sync,
                records: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
            }),
        };
        journal.take_in_state_files(dir)?;
        let mut files = journal.lock();
        if files.wants_compaction() {
            files.compact()?;
        }
        journal.publish(&files);
        drop(files);
        Ok(journal)
    }

    /// Moves the per-message state files of relays before the journal into
    /// it: appended, synced, then deleted (a crash in between takes them in
    /// again, which changes nothing).
    fn take_in_state_files(&self, dir: &Path) -> io::Result<()> {
        let mut taken = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(".json.tmp") {
                remove_if_present(&path)?;
                continue;
            }
            let Some(key) = name.strip_suffix(".json").and_then(id::to_bits) else {
                continue;
            };
            let state = std::fs::read(&path).ok().and_then(|bytes| {
                serde_json::from_slice::<DeliveryState>(&bytes)
                    .inspect_err(|err| error!(file = %path.display(), "damaged delivery state, starting over: {err}"))
                    .ok()
            });
            if let Some(state) = state {
                let payload = serde_json::to_vec(&state).map_err(io::Error::other)?;
                let mut files = self.lock();
                let at = files.append(&encode(SAVED, key, &payload))?;
                files.index(key, at);
            }
            taken.push(path);
        }
        if taken.is_empty() {
            return Ok(());
        }
        {
            let files = self.lock();
            files.open[&files.active].sync_data()?;
        }
        for path in &taken {
            remove_if_present(path)?;
        }
        sync_dir(dir)?;
        info!(
            files = taken.len(),
            "state files moved into the state journal"
        );
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Files> {
        self.inner.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn publish(&self, files: &Files) {
        self.inner
            .records
            .store(files.index.len() as u64, Ordering::Relaxed);
        self.inner.bytes.store(files.total_bytes, Ordering::Relaxed);
    }

    /// Blocking: appends a record, compacting when due.
    fn append(&self, kind: u8, key: u128, payload: &[u8]) -> io::Result<()> {
        let mut files = self.lock();
        if kind == REMOVED && !files.index.contains_key(&key) {
            return Ok(());
        }
        let at = files.append(&encode(kind, key, payload))?;
        if kind == SAVED {
            files.index(key, at);
        } else {
            files.unindex(key);
        }
        if files.wants_compaction() {
            if let Err(err) = files.compact() {
                // The records stay where they were; the next append tries again.
                warn!("cannot compact the state journal: {err}");
            }
        }
        self.publish(&files);
        Ok(())
    }

    /// Blocking: the saved state, if any; a damaged record reads as absent
    /// (the message is then retried from scratch, which may duplicate but
    /// never loses).
    pub fn load(&self, id: &str) -> Option<DeliveryState> {
        let key = id::to_bits(id)?;
        let bytes = {
            let files = self.lock();
            let at = *files.index.get(&key)?;
            files.read(at)
        };
        let bytes = bytes
            .inspect_err(|err| error!(id, "cannot read a delivery state: {err}"))
            .ok()?;
        let Some((record, _)) = decode(&bytes).filter(|(r, _)| r.key == key && r.kind == SAVED)
        else {
            error!(id, "damaged delivery state record, starting over");
            return None;
        };
        serde_json::from_slice(record.payload)
            .inspect_err(|err| error!(id, "undecodable delivery state, starting over: {err}"))
            .ok()
    }

    /// Durably records `state` as the message's.
    pub async fn save(&self, id: &str, state: &DeliveryState) -> io::Result<()> {
        let key = id::to_bits(id)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a message id"))?;
        let payload = serde_json::to_vec(state).map_err(io::Error::other)?;
        let journal = self.clone();
        tokio::task::spawn_blocking(move || journal.append(SAVED, key, &payload))
            .await
            .map_err(io::Error::other)??;
        self.inner.sync.sync().await
    }

    /// Forgets the state of a finished message (most have none); not waited
    /// for (see the module's comment).
    pub async fn remove(&self, id: &str) -> io::Result<()> {
        let Some(key) = id::to_bits(id) else {
            return Ok(());
        };
        let journal = self.clone();
        tokio::task::spawn_blocking(move || journal.append(REMOVED, key, &[]))
            .await
            .map_err(io::Error::other)?
    }

    /// Blocking: ids that have a state.
    pub fn ids(&self) -> io::Result<Vec<String>> {
        Ok(self
            .lock()
            .index
            .keys()
            .map(|&k| id::from_bits(k))
            .collect())
    }

    /// Messages with a state, and the octets the journal's files hold.
    pub fn size(&self) -> (u64, u64) {
        (
            self.inner.records.load(Ordering::Relaxed),
            self.inner.bytes.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::state::Status;

    const A: &str = "01J9Z8Y7X6W5V4T3S2R1Q0P9N8";
    const B: &str = "01J9Z8Y7X6W5V4T3S2R1Q0P9N9";

    fn state(attempts: u32) -> DeliveryState {
        let mut state = DeliveryState::new(2, 5);
        state.attempts = attempts;
        state.recipients[0].status = Status::Delivered;
        state.recipients[1].last_reply = Some("451 4.4.1 try again".into());
        state
    }

    fn journal_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "journal"))
            .collect();
        files.sort();
        files
    }

    #[test]
    fn records_round_trip_and_damage_is_skipped_to_the_next_intact_record() {
        let one = encode(SAVED, 7, b"{\"a\":1}");
        let two = encode(REMOVED, 8, b"");
        let three = encode(SAVED, 9, b"{}");
        let mut bytes = [one.clone(), two.clone(), three.clone()].concat();
        let clean = scan(&bytes);
        assert_eq!(clean.records.len(), 3);
        assert_eq!(clean.records[1].1.kind, REMOVED);
        assert_eq!(clean.records[2].1.key, 9);
        assert!(clean.skipped.is_empty());
        assert_eq!(clean.end, bytes.len() as u64);
        // A flipped byte in the middle record's body: only it is lost.
        bytes[one.len() + HEADER + 3] ^= 0x40;
        let flipped = scan(&bytes);
        let keys: Vec<u128> = flipped.records.iter().map(|(_, r)| r.key).collect();
        assert_eq!(keys, vec![7, 9]);
        assert_eq!(flipped.skipped, vec![(one.len() as u64, two.len())]);
        // A flipped length: the reader finds the next record all the same.
        bytes[one.len() + HEADER + 3] ^= 0x40;
        bytes[one.len() + 2] = 0x7f;
        let keys: Vec<u128> = scan(&bytes).records.iter().map(|(_, r)| r.key).collect();
        assert_eq!(keys, vec![7, 9]);
        // A torn last record ends the intact part where the one before ends.
        let torn = [one.clone(), three[..three.len() - 1].to_vec()].concat();
        assert_eq!(scan(&torn).end, one.len() as u64);
    }

    #[tokio::test]
    async fn states_survive_a_reopen_and_removals_stick() {
        let dir = tempfile::tempdir().unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        journal.save(A, &state(1)).await.unwrap();
        journal.save(B, &state(1)).await.unwrap();
        journal.save(A, &state(2)).await.unwrap();
        journal.remove(B).await.unwrap();
        assert_eq!(journal.load(A), Some(state(2)));
        assert_eq!(journal.load(B), None);
        assert_eq!(journal.size().0, 1);
        drop(journal);
        let journal = StateJournal::open(dir.path()).unwrap();
        assert_eq!(journal.load(A), Some(state(2)));
        assert_eq!(journal.load(B), None);
        assert_eq!(journal.ids().unwrap(), vec![A.to_owned()]);
        assert!(journal.save("not an id", &state(1)).await.is_err());
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        journal.save(A, &state(1)).await.unwrap();
        journal.save(B, &state(3)).await.unwrap();
        drop(journal);
        let file = journal_files(dir.path()).pop().unwrap();
        let len = std::fs::metadata(&file).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&file)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        assert_eq!(journal.load(A), Some(state(1)));
        assert_eq!(journal.load(B), None, "the torn record is gone");
        let bytes = std::fs::read(&file).unwrap();
        let kept = scan(&bytes);
        assert_eq!(kept.records.len(), 1);
        assert_eq!(kept.end, bytes.len() as u64, "the torn part is cut off");
        journal.save(B, &state(4)).await.unwrap();
        drop(journal);
        let journal = StateJournal::open(dir.path()).unwrap();
        assert_eq!(journal.load(B), Some(state(4)));
        assert_eq!(journal.load(A), Some(state(1)));
    }

    #[tokio::test]
    async fn a_flipped_byte_loses_only_that_record() {
        let dir = tempfile::tempdir().unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        journal.save(A, &state(1)).await.unwrap();
        journal.save(A, &state(2)).await.unwrap();
        journal.save(B, &state(5)).await.unwrap();
        drop(journal);
        let file = journal_files(dir.path()).pop().unwrap();
        let mut bytes = std::fs::read(&file).unwrap();
        let first = decode(&bytes).unwrap().1;
        // Flip a byte inside A's second record.
        bytes[first + HEADER + BODY_PREFIX + 2] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        assert_eq!(
            journal.load(A),
            Some(state(1)),
            "back to the previous state"
        );
        assert_eq!(journal.load(B), Some(state(5)));
    }

    #[tokio::test]
    async fn compaction_keeps_only_live_records_and_a_reopen_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        // Far more rewrites than live records: the files must shrink.
        let (a, b) = (id::to_bits(A).unwrap(), id::to_bits(B).unwrap());
        for round in 0..4000u32 {
            let payload = |n| serde_json::to_vec(&state(n)).unwrap();
            journal.append(SAVED, a, &payload(round)).unwrap();
            journal.append(SAVED, b, &payload(round + 1)).unwrap();
        }
        journal.inner.sync.sync().await.unwrap();
        let (records, bytes) = journal.size();
        assert_eq!(records, 2);
        assert!(bytes < COMPACT_MIN_BYTES, "{bytes} octets for two states");
        assert_eq!(journal.load(A), Some(state(3999)));
        drop(journal);
        let journal = StateJournal::open(dir.path()).unwrap();
        assert_eq!(journal.load(A), Some(state(3999)));
        assert_eq!(journal.load(B), Some(state(4000)));
    }

    #[tokio::test]
    async fn a_crash_between_copying_forward_and_deleting_replays_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        journal.save(A, &state(1)).await.unwrap();
        journal.save(B, &state(2)).await.unwrap();
        journal.remove(B).await.unwrap();
        let old = std::fs::read(journal_files(dir.path()).pop().unwrap()).unwrap();
        journal.lock().compact().unwrap();
        drop(journal);
        // Put the deleted file back, as if the crash came before the delete.
        std::fs::write(dir.path().join(file_name(1)), old).unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        assert_eq!(journal.load(A), Some(state(1)));
        assert_eq!(journal.load(B), None);
    }

    #[tokio::test]
    async fn state_files_of_an_older_relay_are_taken_in() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(format!("{A}.json")),
            serde_json::to_vec(&state(3)).unwrap(),
        )
        .unwrap();
        std::fs::write(dir.path().join(format!("{B}.json")), b"{").unwrap();
        std::fs::write(dir.path().join(format!("{B}.json.tmp")), b"x").unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        assert_eq!(journal.load(A), Some(state(3)));
        assert_eq!(journal.load(B), None);
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| !n.to_string_lossy().ends_with(".journal"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[tokio::test]
    async fn a_failed_sync_fails_the_save_and_every_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let fault = Arc::new(AtomicBool::new(false));
        let journal = StateJournal::open_with_fault(dir.path(), Some(Arc::clone(&fault))).unwrap();
        journal.save(A, &state(1)).await.unwrap();
        fault.store(true, Ordering::SeqCst);
        assert!(journal.save(A, &state(2)).await.is_err());
        fault.store(false, Ordering::SeqCst);
        assert!(
            journal.save(B, &state(1)).await.is_err(),
            "a sync after a failed one proves nothing"
        );
    }

    #[tokio::test]
    async fn concurrent_saves_share_syncs_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let journal = StateJournal::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..200u128)
            .map(|n| id::from_bits((1u128 << 100) + n))
            .collect();
        let saves = ids.iter().map(|id| {
            let journal = journal.clone();
            let id = id.clone();
            tokio::spawn(async move { journal.save(&id, &state(7)).await })
        });
        for save in futures::future::join_all(saves).await {
            save.unwrap().unwrap();
        }
        drop(journal);
        let journal = StateJournal::open(dir.path()).unwrap();
        assert_eq!(journal.size().0, 200);
        assert!(ids.iter().all(|id| journal.load(id) == Some(state(7))));
    }
}
