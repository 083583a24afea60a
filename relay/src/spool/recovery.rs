//! Recovery on start: decides, file by file, what a crash left in the local
//! spool. A valid `.env` is a committed message; one that is damaged goes
//! to quarantine with its data (never deleted, never a crash loop);
//! uncommitted leftovers (`.eml` without `.env`, `.env.tmp`) are removed.
//! Records of the flat layout of older versions are first moved into their
//! subdirectory. Start reads no message body: each recovered message's data
//! (length and digest) is checked before its first delivery
//! ([`verify_data`]), where a damaged one is repaired from another copy or
//! quarantined, so a deep queue is accepting again in the time it takes to
//! list it.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::envelope::{Envelope, ENVELOPE_VERSION};
use super::fsync::{remove_if_present, sync_dir};
use super::id;
use super::local::{eml_path, env_path, shard_dir, Shards};
use super::Recovered;

/// Why a committed record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum Damage {
    /// The file name is not `<id>.env`.
    #[error("the file name is not a spool id")]
    BadName,
    /// The `.env` could not be read.
    #[error("cannot read the envelope: {0}")]
    Unreadable(io::Error),
    /// The `.env` is not a valid envelope.
    #[error("the envelope is not valid JSON of a known shape: {0}")]
    Malformed(serde_json::Error),
    /// The `.env` was written by a newer version.
    #[error("envelope version {0} is newer than {ENVELOPE_VERSION}")]
    TooNew(u32),
    /// The `.env` names another message.
    #[error("the envelope names id {0}")]
    WrongId(String),
    /// The `.eml` is missing.
    #[error("the data file is missing")]
    NoData,
    /// The `.eml` could not be read.
    #[error("cannot read the data file: {0}")]
    DataUnreadable(io::Error),
    /// The `.eml` has the wrong length.
    #[error("the data file has {actual} octets, the envelope says {expected}")]
    Length {
        /// `data_len` of the envelope.
        expected: u64,
        /// Length on disk.
        actual: u64,
    },
    /// The `.eml` has the wrong digest.
    #[error("the data file's SHA-256 is {actual}, the envelope says {expected}")]
    Digest {
        /// `data_sha256` of the envelope.
        expected: String,
        /// Digest of the file.
        actual: String,
    },
}

/// Blocking: scans `spool_dir` and its subdirectories (moving records of
/// the flat layout that older versions wrote into their subdirectory
/// first), quarantines into `quarantine_dir`, removes leftovers and returns
/// the committed messages, oldest first.
pub fn recover(spool_dir: &Path, quarantine_dir: &Path) -> io::Result<Recovered> {
    let mut recovered = Recovered::default();
    for dir in prepare(spool_dir, quarantine_dir)? {
        recover_dir(&dir, quarantine_dir, &|_| false, &mut recovered)?;
    }
    recovered.messages.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(recovered)
}

/// Blocking: creates the spool's directories, moves records of the flat
/// layout into their subdirectory, and returns the directories to recover
/// ([`recover_dir`]): the spool directory itself first (what is left there
/// is no id, and is quarantined), then its subdirectories.
pub fn prepare(spool_dir: &Path, quarantine_dir: &Path) -> io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(spool_dir)?;
    std::fs::create_dir_all(quarantine_dir)?;
    let shards = Shards::open(spool_dir)?;
    let dirs: Vec<PathBuf> = std::iter::once(spool_dir)
        .chain(shards.dirs())
        .map(Path::to_owned)
        .collect();
    if move_into_shards(spool_dir)? > 0 {
        for dir in &dirs {
            sync_dir(dir)?;
        }
    }
    Ok(dirs)
}

/// Blocking: moves the `<id>.eml`, `<id>.env` and `<id>.env.tmp` files
/// directly under `spool_dir` (the layout before subdirectories) into the
/// subdirectory of their id; returns how many moved.
fn move_into_shards(spool_dir: &Path) -> io::Result<usize> {
    let mut moved = 0;
    for entry in std::fs::read_dir(spool_dir)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            continue;
        }
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(record_stem) else {
            continue;
        };
        if id::is_valid(stem) {
            std::fs::rename(entry.path(), shard_dir(spool_dir, stem).join(&name))?;
            moved += 1;
        }
    }
    Ok(moved)
}

/// The id part of a spool record's file name.
fn record_stem(name: &str) -> Option<&str> {
    [".env.tmp", ".env", ".eml"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
}

/// Blocking: recovers the records of one spool directory into `recovered`
/// (unsorted), leaving alone those of the ids `skip` names (messages this
/// process began: they are its own, not leftovers).
pub fn recover_dir(
    dir: &Path,
    quarantine_dir: &Path,
    skip: &dyn Fn(&str) -> bool,
    recovered: &mut Recovered,
) -> io::Result<()> {
    let mut envs = BTreeSet::new();
    let mut emls = BTreeSet::new();
    let (removed, quarantined) = (recovered.removed, recovered.quarantined);
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::warn!(file = ?entry.path(), "ignoring a file with a non-UTF-8 name in the spool");
            continue;
        };
        if name.starts_with('.')
            || entry.file_type()?.is_dir()
            || record_stem(name).is_some_and(skip)
        {
            continue;
        }
        if name.ends_with(".env.tmp") {
            // A commit that never reached its rename.
            remove_if_present(&entry.path())?;
            recovered.removed += 1;
        } else if let Some(stem) = name.strip_suffix(".env") {
            envs.insert(stem.to_owned());
        } else if let Some(stem) = name.strip_suffix(".eml") {
            emls.insert(stem.to_owned());
        } else {
            tracing::warn!(file = %name, "ignoring an unknown file in the spool");
        }
    }

    for stem in &envs {
        match check(dir, stem) {
            Ok(envelope) => recovered.messages.push(envelope),
            Err(damage) => {
                tracing::error!(id = %stem, reason = %damage, "quarantining a damaged spool record");
                quarantine(dir, quarantine_dir, stem)?;
                recovered.quarantined += 1;
            }
        }
    }
    for stem in emls.difference(&envs) {
        // Data whose envelope never committed: the client got no 250.
        remove_if_present(&eml_path(dir, stem))?;
        recovered.removed += 1;
    }
    if recovered.removed > removed || recovered.quarantined > quarantined {
        sync_dir(dir)?;
        sync_dir(quarantine_dir)?;
    }
    Ok(())
}

/// Reads and checks one committed record's envelope.
pub fn check(spool_dir: &Path, stem: &str) -> Result<Envelope, Damage> {
    if !id::is_valid(stem) {
        return Err(Damage::BadName);
    }
    let text = std::fs::read(env_path(spool_dir, stem)).map_err(Damage::Unreadable)?;
    let envelope: Envelope = match serde_json::from_slice(&text) {
        Ok(envelope) => envelope,
        Err(err) => {
            // A newer writer may have changed the shape; say so when we can.
            let version = serde_json::from_slice::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
            return Err(match version {
                Some(v) if v > u64::from(ENVELOPE_VERSION) => Damage::TooNew(v as u32),
                _ => Damage::Malformed(err),
            });
        }
    };
    if envelope.version > ENVELOPE_VERSION {
        return Err(Damage::TooNew(envelope.version));
    }
    if envelope.id != stem {
        return Err(Damage::WrongId(envelope.id));
    }
    // The data is checked before the first delivery (`verify_data`), where a
    // damaged copy can be repaired from another one.
    Ok(envelope)
}

/// Opens message `id`'s `.eml`; missing or unreadable is damage.
fn open_data(spool_dir: &Path, id: &str) -> Result<File, Damage> {
    File::open(eml_path(spool_dir, id)).map_err(|err| match err.kind() {
        io::ErrorKind::NotFound => Damage::NoData,
        _ => Damage::DataUnreadable(err),
    })
}

fn check_length(file: &File, envelope: &Envelope) -> Result<(), Damage> {
    let actual = file.metadata().map_err(Damage::DataUnreadable)?.len();
    if actual != envelope.data_len {
        return Err(Damage::Length {
            expected: envelope.data_len,
            actual,
        });
    }
    Ok(())
}

/// Blocking: checks that message `envelope.id`'s `.eml` has the length and
/// SHA-256 its envelope records (recovery checks only the length).
pub fn verify_data(spool_dir: &Path, envelope: &Envelope) -> Result<(), Damage> {
    let mut file = open_data(spool_dir, &envelope.id)?;
    check_length(&file, envelope)?;
    let digest = sha256_of(&mut file).map_err(Damage::DataUnreadable)?;
    if !digest.eq_ignore_ascii_case(&envelope.data_sha256) {
        return Err(Damage::Digest {
            expected: envelope.data_sha256.clone(),
            actual: digest,
        });
    }
    Ok(())
}

/// Blocking: moves message `id`'s files into quarantine, durably.
pub fn quarantine_message(spool_dir: &Path, quarantine_dir: &Path, id: &str) -> io::Result<()> {
    std::fs::create_dir_all(quarantine_dir)?;
    quarantine(spool_dir, quarantine_dir, id)?;
    sync_dir(spool_dir)?;
    sync_dir(quarantine_dir)
}

fn sha256_of(file: &mut File) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

/// Moves `<stem>.env` and `<stem>.eml` (those present) into quarantine,
/// never replacing an earlier quarantined file.
/// A name in `quarantine_dir` for `file` that no earlier quarantined file
/// has (`<name>`, `<name>.1`, ...).
fn free_name(quarantine_dir: &Path, file: &Path) -> PathBuf {
    let name = file.file_name().map(PathBuf::from).unwrap_or_default();
    let mut to = quarantine_dir.join(&name);
    let mut n = 1;
    while to.exists() {
        to = quarantine_dir.join(format!("{}.{n}", name.display()));
        n += 1;
    }
    to
}

/// Blocking: puts the intact data at `repaired` in place of message `id`'s
/// damaged `.eml`, durably. The damaged file is linked into quarantine
/// first, so the spool never lacks the message's data.
pub fn replace_data(
    spool_dir: &Path,
    quarantine_dir: &Path,
    id: &str,
    repaired: &Path,
) -> io::Result<()> {
    std::fs::create_dir_all(quarantine_dir)?;
    let eml = eml_path(spool_dir, id);
    match std::fs::hard_link(&eml, free_name(quarantine_dir, &eml)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    std::fs::rename(repaired, &eml)?;
    sync_dir(spool_dir)?;
    sync_dir(quarantine_dir)
}

fn quarantine(spool_dir: &Path, quarantine_dir: &Path, stem: &str) -> io::Result<()> {
    for from in [env_path(spool_dir, stem), eml_path(spool_dir, stem)] {
        if !from.exists() {
            continue;
        }
        std::fs::rename(&from, free_name(quarantine_dir, &from))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::id::IdGenerator;

    struct Dirs {
        _root: tempfile::TempDir,
        spool: PathBuf,
        quarantine: PathBuf,
    }

    fn dirs() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        let spool = root.path().join("spool");
        let quarantine = root.path().join("quarantine");
        std::fs::create_dir_all(&spool).unwrap();
        Dirs {
            _root: root,
            spool,
            quarantine,
        }
    }

    fn envelope(id: &str, data: &[u8]) -> Envelope {
        Envelope {
            data_len: data.len() as u64,
            data_sha256: hex::encode(Sha256::digest(data)),
            ..Envelope::for_tests(id)
        }
    }

    /// Writes a committed message and returns its id.
    fn committed(dirs: &Dirs, ids: &IdGenerator, data: &[u8]) -> String {
        let id = ids.next_id();
        std::fs::write(eml_path(&dirs.spool, &id), data).unwrap();
        std::fs::write(
            env_path(&dirs.spool, &id),
            serde_json::to_vec(&envelope(&id, data)).unwrap(),
        )
        .unwrap();
        id
    }

    fn quarantined(dirs: &Dirs) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&dirs.quarantine)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// The files in the spool and its subdirectories, by name.
    fn spool_files(dirs: &Dirs) -> Vec<String> {
        let mut names = Vec::new();
        for entry in walk(&dirs.spool) {
            names.push(entry.file_name().unwrap().to_str().unwrap().to_owned());
        }
        names.sort();
        names
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(walk(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[test]
    fn whole_messages_are_returned_oldest_first() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let a = committed(&dirs, &ids, b"first\r\n");
        let b = committed(&dirs, &ids, b"second\r\n");
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        let got: Vec<&str> = found.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(got, vec![a.as_str(), b.as_str()]);
        assert_eq!((found.removed, found.quarantined), (0, 0));
    }

    #[test]
    fn records_of_the_flat_layout_move_into_their_subdirectory() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        // `committed` writes where versions before subdirectories did.
        let old = committed(&dirs, &ids, b"old layout\r\n");
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.messages.len(), 1);
        let dir = shard_dir(&dirs.spool, &old);
        assert_eq!(dir.file_name().unwrap().to_str(), old.get(25..));
        assert_eq!(
            std::fs::read(eml_path(&dir, &old)).unwrap(),
            b"old layout\r\n"
        );
        verify_data(&dir, &found.messages[0]).unwrap();
        let mut files = walk(&dirs.spool);
        files.sort();
        assert_eq!(files, vec![eml_path(&dir, &old), env_path(&dir, &old)]);
        // A second start finds them where the first put them.
        let again = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(again.messages, found.messages);
    }

    #[test]
    fn records_of_ids_to_skip_are_left_alone() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let old = committed(&dirs, &ids, b"from the last run\r\n");
        let receiving = ids.next_id();
        let new = committed(&dirs, &ids, b"accepted meanwhile\r\n");
        let mut found = Recovered::default();
        let prepared = prepare(&dirs.spool, &dirs.quarantine).unwrap();
        // A message being received now: its data without an envelope yet.
        let receiving_eml = eml_path(&shard_dir(&dirs.spool, &receiving), &receiving);
        std::fs::write(&receiving_eml, b"half").unwrap();
        let skip = |id: &str| id == receiving || id == new;
        for dir in prepared {
            recover_dir(&dir, &dirs.quarantine, &skip, &mut found).unwrap();
        }
        let got: Vec<&str> = found.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(got, vec![old.as_str()]);
        assert_eq!((found.removed, found.quarantined), (0, 0));
        assert!(
            receiving_eml.exists(),
            "a message being received is not a leftover"
        );
        assert!(env_path(&shard_dir(&dirs.spool, &new), &new).exists());
    }

    #[test]
    fn uncommitted_leftovers_are_removed() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let kept = committed(&dirs, &ids, b"kept\r\n");
        let orphan = ids.next_id();
        std::fs::write(eml_path(&dirs.spool, &orphan), b"half a mess").unwrap();
        std::fs::write(dirs.spool.join(format!("{orphan}.env.tmp")), b"{\"ver").unwrap();
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.removed, 2);
        assert_eq!(found.messages.len(), 1);
        assert_eq!(
            spool_files(&dirs),
            vec![format!("{kept}.eml"), format!("{kept}.env")]
        );
    }

    /// Damages one committed message with `damage` and checks it lands in
    /// quarantine while its neighbour survives.
    fn quarantines(damage: impl FnOnce(&Path, &str)) {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let good = committed(&dirs, &ids, b"good\r\n");
        let bad = committed(&dirs, &ids, b"bad message\r\n");
        damage(&dirs.spool, &bad);
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.quarantined, 1);
        assert_eq!(found.messages.len(), 1);
        assert_eq!(found.messages[0].id, good);
        assert!(
            quarantined(&dirs).contains(&format!("{bad}.env")),
            "{:?}",
            quarantined(&dirs)
        );
        assert!(!spool_files(&dirs).iter().any(|f| f.starts_with(&bad)));
    }

    /// Damages the data of one committed message with `damage`: start keeps
    /// it (its data is checked before delivery, where another copy can
    /// repair it) and the check finds what `found` expects.
    fn left_for_the_check_before_delivery(
        damage: impl FnOnce(&Path, &str),
        found: impl Fn(&Damage) -> bool,
    ) {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let good = committed(&dirs, &ids, b"good\r\n");
        let bad = committed(&dirs, &ids, b"bad message\r\n");
        damage(&dirs.spool, &bad);
        let recovered = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(recovered.quarantined, 0);
        assert_eq!(recovered.messages.len(), 2);
        assert_eq!(recovered.messages[0].id, good);
        let bad_dir = shard_dir(&dirs.spool, &bad);
        let damage = verify_data(&bad_dir, &recovered.messages[1]).unwrap_err();
        assert!(found(&damage), "{damage}");
    }

    #[test]
    fn a_truncated_data_file_is_found_before_delivery() {
        left_for_the_check_before_delivery(
            |dir, id| std::fs::write(eml_path(dir, id), b"bad").unwrap(),
            |damage| matches!(damage, Damage::Length { actual: 3, .. }),
        );
    }

    #[test]
    fn a_corrupted_data_file_is_found_before_delivery_not_at_start() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let good = committed(&dirs, &ids, b"good\r\n");
        let bad = committed(&dirs, &ids, b"bad message\r\n");
        // Same length, one byte flipped: start reads no body, so it is kept.
        std::fs::write(eml_path(&dirs.spool, &bad), b"BAD message\r\n").unwrap();
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.quarantined, 0);
        assert_eq!(found.messages.len(), 2);
        verify_data(&shard_dir(&dirs.spool, &good), &found.messages[0]).unwrap();
        let bad_dir = shard_dir(&dirs.spool, &bad);
        let damage = verify_data(&bad_dir, &found.messages[1]).unwrap_err();
        assert!(matches!(damage, Damage::Digest { .. }), "{damage}");
        assert_eq!(found.messages[0].id, good);
        quarantine_message(&bad_dir, &dirs.quarantine, &bad).unwrap();
        let mut expected = vec![format!("{bad}.env"), format!("{bad}.eml")];
        expected.sort();
        assert_eq!(quarantined(&dirs), expected);
        assert!(!spool_files(&dirs).iter().any(|f| f.starts_with(&bad)));
    }

    #[test]
    fn a_missing_data_file_is_found_before_delivery() {
        left_for_the_check_before_delivery(
            |dir, id| std::fs::remove_file(eml_path(dir, id)).unwrap(),
            |damage| matches!(damage, Damage::NoData),
        );
    }

    #[test]
    fn a_garbled_envelope_is_quarantined() {
        quarantines(|dir, id| {
            std::fs::write(env_path(dir, id), b"{\"version\": 1, \"id\":").unwrap()
        });
    }

    #[test]
    fn an_empty_envelope_is_quarantined() {
        quarantines(|dir, id| std::fs::write(env_path(dir, id), b"").unwrap());
    }

    #[test]
    fn a_newer_envelope_version_is_quarantined() {
        quarantines(|dir, id| {
            std::fs::write(
                env_path(dir, id),
                format!("{{\"version\": 9, \"id\": \"{id}\", \"new\": []}}"),
            )
            .unwrap()
        });
    }

    #[test]
    fn an_envelope_naming_another_id_is_quarantined() {
        quarantines(|dir, id| {
            let text = std::fs::read_to_string(env_path(dir, id)).unwrap();
            std::fs::write(
                env_path(dir, id),
                text.replace(id, &IdGenerator::new().next_id()),
            )
            .unwrap();
        });
    }

    #[test]
    fn a_badly_named_envelope_is_quarantined_and_never_escapes_the_spool() {
        let dirs = dirs();
        std::fs::write(dirs.spool.join("not-an-id.env"), b"{}").unwrap();
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.quarantined, 1);
        assert_eq!(quarantined(&dirs), vec!["not-an-id.env"]);
    }

    #[test]
    fn quarantine_keeps_earlier_evidence() {
        let dirs = dirs();
        std::fs::create_dir_all(&dirs.quarantine).unwrap();
        std::fs::write(dirs.quarantine.join("x.env"), b"old").unwrap();
        std::fs::write(dirs.spool.join("x.env"), b"new").unwrap();
        recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(quarantined(&dirs), vec!["x.env", "x.env.1"]);
        assert_eq!(
            std::fs::read(dirs.quarantine.join("x.env")).unwrap(),
            b"old"
        );
    }
}
