//! Recovery on start: decides, file by file, what a crash left in the local
//! spool. A sealed `<id>.msg` (see [`message_file`]) is a committed message;
//! one whose seal does not hold is damaged, and is listed for repair from
//! another copy (see [`super::Recovery`]); one whose envelope is not valid
//! goes to quarantine (never deleted, never a crash loop); a `<id>.part` is
//! a message whose client never got its 250, and is removed. Records of
//! older versions are converted first:
//! the flat layout is moved into subdirectories, and `<id>.eml` + `<id>.env`
//! pairs become one sealed `<id>.msg`. Start reads no message body, only the
//! seals: each recovered message's data (length and digest) is checked
//! before its first delivery ([`verify_data`]), where a damaged one is
//! repaired from another copy or quarantined, so a deep queue is accepting
//! again in the time it takes to list it.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::envelope::{Envelope, ENVELOPE_VERSION};
use super::fsync::sync_dir;
use super::id;
use super::local::{shard_dir, Shards};
use super::message_file::{self, Seal};
use super::sweep::{record_stem, sweep, Older};
use super::Recovered;

/// Why a committed record cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Damage {
    /// The message file could not be read.
    #[error("cannot read the message file: {0}")]
    Unreadable(io::Error),
    /// The seal (envelope and footer) fails its own checks.
    #[error("the seal is damaged: {0}")]
    Seal(String),
    /// The envelope is not a valid one.
    #[error("the envelope is not valid JSON of a known shape: {0}")]
    Malformed(serde_json::Error),
    /// The envelope was written by a newer version.
    #[error("envelope version {0} is newer than {ENVELOPE_VERSION}")]
    TooNew(u32),
    /// The envelope names another message.
    #[error("the envelope names id {0}")]
    WrongId(String),
    /// The message file is missing.
    #[error("the message file is missing")]
    NoData,
    /// The data has the wrong length.
    #[error("the file holds {actual} octets of data, the envelope says {expected}")]
    Length {
        /// `data_len` of the envelope.
        expected: u64,
        /// Data octets the file holds.
        actual: u64,
    },
    /// The data has the wrong digest.
    #[error("the data's SHA-256 is {actual}, the envelope says {expected}")]
    Digest {
        /// `data_sha256` of the envelope.
        expected: String,
        /// Digest of the data.
        actual: String,
    },
}

/// Blocking: scans `spool_dir` and its subdirectories (converting records
/// that older versions wrote first), quarantines into `quarantine_dir`
/// (damaged message files too: this has no other copy to repair them
/// from), removes leftovers and returns the committed messages, oldest first.
pub fn recover(spool_dir: &Path, quarantine_dir: &Path) -> io::Result<Recovered> {
    let mut recovered = Recovered::default();
    for dir in prepare(spool_dir, quarantine_dir)? {
        recover_dir(&dir, quarantine_dir, &|_| false, &mut recovered)?;
        for id in std::mem::take(&mut recovered.damaged) {
            quarantine_message(&dir, quarantine_dir, &id)?;
            recovered.quarantined += 1;
        }
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

/// Blocking: moves the record files directly under `spool_dir` (the layout
/// before subdirectories) into the subdirectory of their id; returns how
/// many moved.
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

/// Blocking: recovers the records of one spool directory into `recovered`
/// (unsorted; damaged message files into `recovered.damaged`, left in
/// place), leaving alone those of the ids `skip` names (messages this
/// process began: they are its own, not leftovers). The directory is swept
/// as a replica store's is ([`sweep`]); what is not a committed message of
/// this spool goes to quarantine.
pub fn recover_dir(
    dir: &Path,
    quarantine_dir: &Path,
    skip: &dyn Fn(&str) -> bool,
    recovered: &mut Recovered,
) -> io::Result<()> {
    let older = |stem: &str, json: &[u8], _has_data: bool| match check_envelope(stem, json) {
        // Without its `.eml` it becomes a message with no data, whose
        // length is found wrong before delivery (repaired or quarantined).
        Ok(_) => Older::Convert,
        Err(damage) => {
            tracing::error!(id = %stem, reason = %damage, "quarantining a damaged spool record");
            Older::Refuse
        }
    };
    let swept = sweep(dir, skip, &older)?;
    recovered.removed += swept.removed;
    let mut quarantined = swept.refused.len() + swept.misnamed.len();
    for stem in &swept.refused {
        quarantine(dir, quarantine_dir, stem)?;
    }
    for name in &swept.misnamed {
        tracing::error!(file = %name, "quarantining a spool record whose name is not a spool id");
        let from = dir.join(name);
        std::fs::rename(&from, free_name(quarantine_dir, &from))?;
    }
    for (stem, why) in swept.damaged {
        // Committed (it has its final name) but its seal does not hold:
        // another copy may still have it whole.
        tracing::error!(id = %stem, reason = %why, "damaged spool record found at start");
        recovered.damaged.push(stem);
    }
    for (stem, json) in swept.sealed {
        match check_envelope(&stem, &json) {
            Ok(envelope) => recovered.messages.push(envelope),
            Err(damage) => {
                tracing::error!(id = %stem, reason = %damage, "quarantining a damaged spool record");
                quarantine(dir, quarantine_dir, &stem)?;
                quarantined += 1;
            }
        }
    }
    recovered.quarantined += quarantined;
    if swept.removed > 0 || quarantined > 0 {
        sync_dir(dir)?;
        sync_dir(quarantine_dir)?;
    }
    Ok(())
}

/// Parses an envelope and checks it belongs to message `stem`.
pub fn check_envelope(stem: &str, json: &[u8]) -> Result<Envelope, Damage> {
    let envelope: Envelope = match serde_json::from_slice(json) {
        Ok(envelope) => envelope,
        Err(err) => {
            // A newer writer may have changed the shape; say so when we can.
            let version = serde_json::from_slice::<serde_json::Value>(json)
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
    Ok(envelope)
}

/// Blocking: checks that message `envelope.id`'s file in `spool_dir` is
/// sealed and holds data of the length and SHA-256 its envelope records.
pub fn verify_data(spool_dir: &Path, envelope: &Envelope) -> Result<(), Damage> {
    let file = File::open(message_file::path(spool_dir, &envelope.id)).map_err(|err| match err
        .kind()
    {
        io::ErrorKind::NotFound => Damage::NoData,
        _ => Damage::Unreadable(err),
    })?;
    let data_len = match message_file::read_seal(&file).map_err(Damage::Unreadable)? {
        Seal::Sealed { data_len, .. } => data_len,
        Seal::Unsealed => return Err(Damage::Seal("the file is no longer sealed".into())),
        Seal::Damaged(why) => return Err(Damage::Seal(why)),
    };
    if data_len != envelope.data_len {
        return Err(Damage::Length {
            expected: envelope.data_len,
            actual: data_len,
        });
    }
    let digest = sha256_of(&file, data_len).map_err(Damage::Unreadable)?;
    if !digest.eq_ignore_ascii_case(&envelope.data_sha256) {
        return Err(Damage::Digest {
            expected: envelope.data_sha256.clone(),
            actual: digest,
        });
    }
    Ok(())
}

/// Blocking: moves message `id`'s file into quarantine, durably.
pub fn quarantine_message(spool_dir: &Path, quarantine_dir: &Path, id: &str) -> io::Result<()> {
    std::fs::create_dir_all(quarantine_dir)?;
    quarantine(spool_dir, quarantine_dir, id)?;
    sync_dir(spool_dir)?;
    sync_dir(quarantine_dir)
}

/// The SHA-256 of the first `len` octets of `file`, lower-case hex.
fn sha256_of(file: &File, len: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], offset)?;
        hasher.update(&buf[..n]);
        offset += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

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

/// Blocking: puts the intact, sealed message file at `repaired` in place of
/// message `id`'s damaged one, durably. The damaged file is linked into
/// quarantine first, so the spool never lacks the message.
pub fn replace_data(
    spool_dir: &Path,
    quarantine_dir: &Path,
    id: &str,
    repaired: &Path,
) -> io::Result<()> {
    std::fs::create_dir_all(quarantine_dir)?;
    let path = message_file::path(spool_dir, id);
    match std::fs::hard_link(&path, free_name(quarantine_dir, &path)) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
        _ => {}
    }
    std::fs::rename(repaired, &path)?;
    sync_dir(spool_dir)?;
    sync_dir(quarantine_dir)
}

/// Moves message `stem`'s files (its `.msg`, and an older version's `.env`
/// and `.eml`; those present) into quarantine, never replacing an earlier
/// quarantined file.
fn quarantine(spool_dir: &Path, quarantine_dir: &Path, stem: &str) -> io::Result<()> {
    for suffix in ["msg", "env", "eml"] {
        let from = spool_dir.join(format!("{stem}.{suffix}"));
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

    /// Writes the sealed message file of `id` with `data` and `json` as its
    /// envelope into `dir`.
    fn write_sealed(dir: &Path, id: &str, data: &[u8], json: &[u8]) {
        let mut whole = data.to_vec();
        whole.extend(message_file::seal_bytes(data.len() as u64, json).unwrap());
        std::fs::write(message_file::path(dir, id), whole).unwrap();
    }

    /// Writes a committed message in the shard of its id and returns its id.
    fn committed(dirs: &Dirs, ids: &IdGenerator, data: &[u8]) -> String {
        let id = ids.next_id();
        let dir = shard_dir(&dirs.spool, &id);
        std::fs::create_dir_all(&dir).unwrap();
        let json = serde_json::to_vec(&envelope(&id, data)).unwrap();
        write_sealed(&dir, &id, data, &json);
        id
    }

    /// Writes a committed message as versions before the seal did (`.eml`
    /// and `.env`, directly in the spool directory) and returns its id.
    fn committed_by_an_older_version(dirs: &Dirs, ids: &IdGenerator, data: &[u8]) -> String {
        let id = ids.next_id();
        std::fs::write(dirs.spool.join(format!("{id}.eml")), data).unwrap();
        std::fs::write(
            dirs.spool.join(format!("{id}.env")),
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

    fn data_of(dirs: &Dirs, id: &str) -> Vec<u8> {
        let path = message_file::path(&shard_dir(&dirs.spool, id), id);
        let Seal::Sealed { data_len, .. } = message_file::read_seal_at(&path).unwrap() else {
            panic!("{id} is not sealed");
        };
        std::fs::read(path).unwrap()[..data_len as usize].to_vec()
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
        assert_eq!(
            spool_files(&dirs),
            vec![format!("{a}.msg"), format!("{b}.msg")]
        );
    }

    #[test]
    fn records_of_older_versions_become_sealed_message_files() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let old = committed_by_an_older_version(&dirs, &ids, b"old layout\r\n");
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.messages.len(), 1);
        assert_eq!(found.messages[0], envelope(&old, b"old layout\r\n"));
        let dir = shard_dir(&dirs.spool, &old);
        assert_eq!(dir.file_name().unwrap().to_str(), old.get(25..));
        assert_eq!(data_of(&dirs, &old), b"old layout\r\n");
        verify_data(&dir, &found.messages[0]).unwrap();
        assert_eq!(spool_files(&dirs), vec![format!("{old}.msg")]);
        // A second start finds it where the first put it.
        let again = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(again.messages, found.messages);
    }

    #[test]
    fn a_conversion_cut_short_by_a_crash_is_finished() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        // Sealed but not renamed yet.
        let sealed = committed_by_an_older_version(&dirs, &ids, b"sealed\r\n");
        let eml = dirs.spool.join(format!("{sealed}.eml"));
        let json = std::fs::read(dirs.spool.join(format!("{sealed}.env"))).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&eml)
            .unwrap();
        message_file::seal(&file, 8, &json).unwrap();
        // Renamed, with the `.env` still there.
        let renamed = committed_by_an_older_version(&dirs, &ids, b"renamed\r\n");
        let json = std::fs::read(dirs.spool.join(format!("{renamed}.env"))).unwrap();
        write_sealed(&dirs.spool, &renamed, b"renamed\r\n", &json);
        std::fs::remove_file(dirs.spool.join(format!("{renamed}.eml"))).unwrap();

        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.messages.len(), 2);
        assert_eq!((found.removed, found.quarantined), (0, 0));
        assert_eq!(data_of(&dirs, &sealed), b"sealed\r\n");
        assert_eq!(data_of(&dirs, &renamed), b"renamed\r\n");
        for envelope in &found.messages {
            verify_data(&shard_dir(&dirs.spool, &envelope.id), envelope).unwrap();
        }
        let mut expected = vec![format!("{sealed}.msg"), format!("{renamed}.msg")];
        expected.sort();
        assert_eq!(spool_files(&dirs), expected);
    }

    #[test]
    fn an_older_record_without_data_is_kept_for_repair() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let id = committed_by_an_older_version(&dirs, &ids, b"gone\r\n");
        std::fs::remove_file(dirs.spool.join(format!("{id}.eml"))).unwrap();
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.messages.len(), 1);
        let damage = verify_data(&shard_dir(&dirs.spool, &id), &found.messages[0]).unwrap_err();
        assert!(
            matches!(
                damage,
                Damage::Length {
                    actual: 0,
                    expected: 6
                }
            ),
            "{damage}"
        );
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
        // A message being received now: its data, not sealed yet.
        let receiving_file = message_file::path(&shard_dir(&dirs.spool, &receiving), &receiving);
        std::fs::write(&receiving_file, b"half").unwrap();
        let skip = |id: &str| id == receiving || id == new;
        for dir in prepared {
            recover_dir(&dir, &dirs.quarantine, &skip, &mut found).unwrap();
        }
        let got: Vec<&str> = found.messages.iter().map(|m| m.id.as_str()).collect();
        assert_eq!(got, vec![old.as_str()]);
        assert_eq!((found.removed, found.quarantined), (0, 0));
        assert!(
            receiving_file.exists(),
            "a message being received is not a leftover"
        );
        assert!(message_file::path(&shard_dir(&dirs.spool, &new), &new).exists());
    }

    #[test]
    fn uncommitted_leftovers_are_removed() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let kept = committed(&dirs, &ids, b"kept\r\n");
        // Being received when the last run stopped.
        let receiving = ids.next_id();
        std::fs::write(
            message_file::part_path(&dirs.spool, &receiving),
            b"half a mess",
        )
        .unwrap();
        // What older versions left mid-commit.
        let orphan = ids.next_id();
        std::fs::write(dirs.spool.join(format!("{orphan}.eml")), b"half").unwrap();
        std::fs::write(dirs.spool.join(format!("{orphan}.env.tmp")), b"{\"ver").unwrap();
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.removed, 3);
        assert_eq!(found.messages.len(), 1);
        assert_eq!(spool_files(&dirs), vec![format!("{kept}.msg")]);
    }

    /// Damages one committed message with `damage` and checks it lands in
    /// quarantine while its neighbour survives.
    fn quarantines(damage: impl FnOnce(&Path, &str)) {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let good = committed(&dirs, &ids, b"good\r\n");
        let bad = committed(&dirs, &ids, b"bad message\r\n");
        damage(&shard_dir(&dirs.spool, &bad), &bad);
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.quarantined, 1);
        assert_eq!(found.messages.len(), 1);
        assert_eq!(found.messages[0].id, good);
        assert!(
            quarantined(&dirs).contains(&format!("{bad}.msg")),
            "{:?}",
            quarantined(&dirs)
        );
        assert!(!spool_files(&dirs).iter().any(|f| f.starts_with(&bad)));
    }

    /// Replaces message `id`'s envelope with `json`, sealed properly.
    fn reseal(dir: &Path, id: &str, json: &[u8]) {
        let path = message_file::path(dir, id);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let Seal::Sealed { data_len, .. } = message_file::read_seal(&file).unwrap() else {
            panic!("not sealed");
        };
        message_file::reseal(&file, data_len, json).unwrap();
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
        let bad_dir = shard_dir(&dirs.spool, &bad);
        damage(&bad_dir, &bad);
        let recovered = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(recovered.quarantined, 0);
        assert_eq!(recovered.messages.len(), 2);
        assert_eq!(recovered.messages[0].id, good);
        verify_data(&shard_dir(&dirs.spool, &good), &recovered.messages[0]).unwrap();
        let damage = verify_data(&bad_dir, &recovered.messages[1]).unwrap_err();
        assert!(found(&damage), "{damage}");
    }

    #[test]
    fn a_flipped_data_octet_is_found_before_delivery_not_at_start() {
        left_for_the_check_before_delivery(
            |dir, id| {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(message_file::path(dir, id))
                    .unwrap();
                file.write_all_at(b"B", 0).unwrap();
            },
            |damage| matches!(damage, Damage::Digest { .. }),
        );
    }

    #[test]
    fn data_cut_short_under_an_intact_seal_is_found_before_delivery() {
        left_for_the_check_before_delivery(
            |dir, id| {
                let bytes = std::fs::read(message_file::path(dir, id)).unwrap();
                let json = &bytes[13..bytes.len() - message_file::FOOTER_LEN as usize];
                write_sealed(dir, id, b"bad", json);
            },
            |damage| {
                matches!(
                    damage,
                    Damage::Length {
                        actual: 3,
                        expected: 13
                    }
                )
            },
        );
    }

    #[test]
    fn a_file_gone_after_start_is_found_before_delivery() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let id = committed(&dirs, &ids, b"x\r\n");
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        let dir = shard_dir(&dirs.spool, &id);
        std::fs::remove_file(message_file::path(&dir, &id)).unwrap();
        let damage = verify_data(&dir, &found.messages[0]).unwrap_err();
        assert!(matches!(damage, Damage::NoData), "{damage}");
    }

    #[test]
    fn a_damaged_seal_is_quarantined() {
        quarantines(|dir, id| {
            let path = message_file::path(dir, id);
            let mut bytes = std::fs::read(&path).unwrap();
            let at = bytes.len() - 40;
            bytes[at] ^= 1;
            std::fs::write(path, bytes).unwrap();
        });
    }

    #[test]
    fn a_committed_file_cut_short_is_quarantined_when_no_copy_can_repair_it() {
        // The seal is gone with the tail; the name says it was committed.
        quarantines(|dir, id| {
            let path = message_file::path(dir, id);
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            file.set_len(10).unwrap();
        });
    }

    #[test]
    fn a_damaged_seal_is_left_for_repair_by_the_spool() {
        let dirs = dirs();
        let ids = IdGenerator::new();
        let bad = committed(&dirs, &ids, b"bad message\r\n");
        let dir = shard_dir(&dirs.spool, &bad);
        std::fs::write(message_file::path(&dir, &bad), b"bad mess").unwrap();
        let mut found = Recovered::default();
        for dir in prepare(&dirs.spool, &dirs.quarantine).unwrap() {
            recover_dir(&dir, &dirs.quarantine, &|_| false, &mut found).unwrap();
        }
        assert_eq!(found.damaged, vec![bad.clone()]);
        assert_eq!((found.removed, found.quarantined), (0, 0));
        assert!(found.messages.is_empty());
        assert!(message_file::path(&dir, &bad).exists(), "left in place");
    }

    #[test]
    fn a_garbled_envelope_is_quarantined() {
        quarantines(|dir, id| reseal(dir, id, b"{\"version\": 1, \"id\":"));
    }

    #[test]
    fn an_empty_envelope_is_quarantined() {
        quarantines(|dir, id| reseal(dir, id, b""));
    }

    #[test]
    fn a_newer_envelope_version_is_quarantined() {
        quarantines(|dir, id| {
            let json = format!("{{\"version\": 9, \"id\": \"{id}\", \"new\": []}}");
            reseal(dir, id, json.as_bytes());
        });
    }

    #[test]
    fn an_envelope_naming_another_id_is_quarantined() {
        quarantines(|dir, id| {
            let other = IdGenerator::new().next_id();
            let json = serde_json::to_vec(&envelope(&other, b"bad message\r\n")).unwrap();
            reseal(dir, id, &json);
        });
    }

    #[test]
    fn a_badly_named_record_is_quarantined_and_never_escapes_the_spool() {
        let dirs = dirs();
        write_sealed(&dirs.spool, "not-an-id", b"x", b"{}");
        std::fs::write(dirs.spool.join("other-bad.env"), b"{}").unwrap();
        let found = recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(found.quarantined, 2);
        assert_eq!(quarantined(&dirs), vec!["not-an-id.msg", "other-bad.env"]);
    }

    #[test]
    fn quarantine_keeps_earlier_evidence() {
        let dirs = dirs();
        std::fs::create_dir_all(&dirs.quarantine).unwrap();
        std::fs::write(dirs.quarantine.join("x.msg"), b"old").unwrap();
        write_sealed(&dirs.spool, "x", b"new", b"{}");
        recover(&dirs.spool, &dirs.quarantine).unwrap();
        assert_eq!(quarantined(&dirs), vec!["x.msg", "x.msg.1"]);
        assert_eq!(
            std::fs::read(dirs.quarantine.join("x.msg")).unwrap(),
            b"old"
        );
    }
}
