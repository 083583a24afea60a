//! One message, one file: `<id>.msg` holds the message's wire-format bytes
//! from offset 0, then its envelope JSON and a fixed-size footer at the
//! very end (the *seal*). While it is received the file is `<id>.part`,
//! data only; committing seals it and renames it to `<id>.msg`, so a
//! `.part` is always a leftover and a `.msg` whose seal does not hold is
//! always damage (repaired from another copy, or quarantined).
//!
//! ```text
//! [0, data_len)                       the data, exactly as it goes on the wire
//! [data_len, data_len + env_len)      the envelope JSON
//! last FOOTER_LEN octets              "PSTNSEAL" | data_len u64 LE | env_len u32 LE
//!                                     | CRC-32C u32 LE of (JSON, data_len, env_len)
//! ```
//!
//! Sealing is one positioned write at `data_len` (no other call on the
//! accept path); a torn seal reads as unsealed or damaged, never as another message (the
//! footer's CRC-32C covers the envelope and both lengths). Readers of the data stop at
//! `data_len` (`sendfile(2)` with that length, DATA dot-stuffing through a
//! `take`); scanners and early delivery read the file before it is sealed,
//! so a path to it is a path to the message alone.
//!
//! Compared with a separate `<id>.env` (create, write, rename; unlink at the
//! end), the seal saves two metadata operations per message and the disk
//! block a small second file costs.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Octets of the footer.
pub const FOOTER_LEN: u64 = 24;

/// The footer's first octets.
const MAGIC: &[u8; 8] = b"PSTNSEAL";

/// Largest envelope a seal may carry (far above any real one: 1,000
/// recipients of 256 octets, their parameters and added headers).
pub const MAX_ENVELOPE_LEN: u32 = 16 << 20;

/// `<dir>/<id>.msg`.
pub fn path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.msg"))
}

/// The id a message file's name carries (`<id>.msg`), if it is one.
pub fn id_of(name: &str) -> Option<&str> {
    name.strip_suffix(".msg")
}

/// `<dir>/<id>.part`: the file of a message being received.
pub fn part_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.part"))
}

/// The id a part file's name carries (`<id>.part`), if it is one.
pub fn id_of_part(name: &str) -> Option<&str> {
    name.strip_suffix(".part")
}

/// Creates a message file (`<id>.part` or `<id>.msg`), readable and
/// writable, refusing to reuse a name.
pub fn create(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// What the end of a message file says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seal {
    /// No footer.
    Unsealed,
    /// A footer whose lengths or checksum do not hold: damaged.
    Damaged(String),
    /// Committed.
    Sealed {
        /// Octets of data from offset 0.
        data_len: u64,
        /// The envelope JSON, as written.
        envelope_json: Vec<u8>,
    },
}

fn checksum(envelope_json: &[u8], data_len: u64, env_len: u32) -> u32 {
    let mut digest = crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi);
    digest.update(envelope_json);
    digest.update(&data_len.to_le_bytes());
    digest.update(&env_len.to_le_bytes());
    digest.finalize() as u32
}

/// The seal to write after `data_len` octets of data: the envelope JSON and
/// the footer.
pub fn seal_bytes(data_len: u64, envelope_json: &[u8]) -> io::Result<Vec<u8>> {
    let env_len = u32::try_from(envelope_json.len())
        .ok()
        .filter(|len| *len <= MAX_ENVELOPE_LEN)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an envelope of {} octets is too large", envelope_json.len()),
            )
        })?;
    let mut out = Vec::with_capacity(envelope_json.len() + FOOTER_LEN as usize);
    out.extend_from_slice(envelope_json);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(&env_len.to_le_bytes());
    out.extend_from_slice(&checksum(envelope_json, data_len, env_len).to_le_bytes());
    Ok(out)
}

/// Blocking: seals `file`, which holds exactly `data_len` octets of data:
/// one positioned write of the envelope and the footer after them. Not
/// synced; the caller syncs.
pub fn seal(file: &File, data_len: u64, envelope_json: &[u8]) -> io::Result<()> {
    file.write_all_at(&seal_bytes(data_len, envelope_json)?, data_len)
}

/// Blocking: replaces the seal of a file whose first `data_len` octets are
/// the data (cuts what follows them, then [`seal`]s). Tests use it to
/// write damaged envelopes under an intact footer.
#[cfg(test)]
pub(crate) fn reseal(file: &File, data_len: u64, envelope_json: &[u8]) -> io::Result<()> {
    file.set_len(data_len)?;
    seal(file, data_len, envelope_json)
}

/// Blocking: reads the seal of an open message file.
pub fn read_seal(file: &File) -> io::Result<Seal> {
    let len = file.metadata()?.len();
    if len < FOOTER_LEN {
        return Ok(Seal::Unsealed);
    }
    let mut footer = [0u8; FOOTER_LEN as usize];
    file.read_exact_at(&mut footer, len - FOOTER_LEN)?;
    if &footer[..8] != MAGIC {
        return Ok(Seal::Unsealed);
    }
    let data_len = u64::from_le_bytes(footer[8..16].try_into().expect("8 octets"));
    let env_len = u32::from_le_bytes(footer[16..20].try_into().expect("4 octets"));
    let crc = u32::from_le_bytes(footer[20..24].try_into().expect("4 octets"));
    let expected_len = data_len
        .checked_add(u64::from(env_len))
        .and_then(|n| n.checked_add(FOOTER_LEN));
    if env_len > MAX_ENVELOPE_LEN || expected_len != Some(len) {
        return Ok(Seal::Damaged(format!(
            "the footer says {data_len} octets of data and {env_len} of envelope, the file has {len}"
        )));
    }
    let mut envelope_json = vec![0u8; env_len as usize];
    file.read_exact_at(&mut envelope_json, data_len)?;
    if checksum(&envelope_json, data_len, env_len) != crc {
        return Ok(Seal::Damaged("the envelope fails its checksum".into()));
    }
    Ok(Seal::Sealed {
        data_len,
        envelope_json,
    })
}

/// Blocking: the seal of the message file at `path`; a file that is not
/// there is `NotFound`.
pub fn read_seal_at(path: &Path) -> io::Result<Seal> {
    read_seal(&File::open(path)?)
}

/// Blocking: the envelope JSON of the committed message file at `path`;
/// unsealed or damaged is `InvalidData`.
pub fn read_envelope_json(path: &Path) -> io::Result<Vec<u8>> {
    match read_seal_at(path)? {
        Seal::Sealed { envelope_json, .. } => Ok(envelope_json),
        Seal::Unsealed => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not committed", path.display()),
        )),
        Seal::Damaged(why) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {why}", path.display()),
        )),
    }
}

/// Blocking: turns an older version's record in `dir` (`<id>.eml` with the
/// data, its envelope `json` read from `<id>.env`) into a sealed, synced
/// `<id>.msg`, and returns its path. The `.env` is left for the caller to
/// remove once the directory is synced. Sealed where the data ends,
/// whatever the envelope says: a length that differs is found before
/// delivery; a missing `.eml` becomes a message with no data. Safe to repeat
/// after a crash.
pub fn convert_older(dir: &Path, id: &str, json: &[u8]) -> io::Result<PathBuf> {
    let eml = dir.join(format!("{id}.eml"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&eml)?;
    if !matches!(read_seal(&file)?, Seal::Sealed { .. }) {
        let data_len = file.metadata()?.len();
        seal(&file, data_len, json)?;
    }
    file.sync_all()?;
    let converted = path(dir, id);
    std::fs::rename(&eml, &converted)?;
    Ok(converted)
}

/// Blocking: once the sealed files that replace them are durable (the
/// directory `dir` is synced first), removes the `.env` files of converted
/// records (`envelopes`), durably; says so in the log.
pub fn remove_converted(dir: &Path, envelopes: &[PathBuf]) -> io::Result<()> {
    if envelopes.is_empty() {
        return Ok(());
    }
    super::fsync::sync_dir(dir)?;
    for env in envelopes {
        super::fsync::remove_if_present(env)?;
    }
    super::fsync::sync_dir(dir)?;
    tracing::info!(dir = %dir.display(), converted = envelopes.len(), "converted records of an older version into sealed message files");
    Ok(())
}

/// Blocking: the data and the envelope JSON of the sealed message file at
/// `path`; one that is not sealed, or damaged, is `InvalidData`.
pub fn read_sealed(path: &Path) -> io::Result<(Vec<u8>, Vec<u8>)> {
    let file = File::open(path)?;
    match read_seal(&file)? {
        Seal::Sealed {
            data_len,
            envelope_json,
        } => {
            let mut data = vec![0u8; data_len as usize];
            file.read_exact_at(&mut data, 0)?;
            Ok((data, envelope_json))
        }
        other => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not sealed: {other:?}", path.display()),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = path(dir.path(), "A");
        let file = create(&path).unwrap();
        file.write_all_at(bytes, 0).unwrap();
        (dir, file)
    }

    #[test]
    fn a_sealed_file_keeps_its_data_and_gives_back_its_envelope() {
        let data = b"Subject: x\r\n\r\nbody\r\n";
        let (_dir, file) = file_with(data);
        assert_eq!(read_seal(&file).unwrap(), Seal::Unsealed);
        seal(&file, data.len() as u64, b"{\"id\":\"A\"}").unwrap();
        let sealed = read_seal(&file).unwrap();
        assert_eq!(
            sealed,
            Seal::Sealed {
                data_len: data.len() as u64,
                envelope_json: b"{\"id\":\"A\"}".to_vec(),
            }
        );
        let mut back = vec![0u8; data.len()];
        file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back, data);
    }

    #[test]
    fn resealing_replaces_the_seal() {
        let (_dir, file) = file_with(b"data\r\n");
        seal(&file, 6, b"{\"a\":1}").unwrap();
        let first = file.metadata().unwrap().len();
        // A second seal replaces the first, never stacks on it.
        reseal(&file, 6, b"{}").unwrap();
        assert_eq!(file.metadata().unwrap().len(), first - 5);
        assert!(
            matches!(read_seal(&file).unwrap(), Seal::Sealed { envelope_json, .. } if envelope_json == b"{}")
        );
    }

    #[test]
    fn short_or_unmarked_files_are_unsealed() {
        assert_eq!(read_seal(&file_with(b"").1).unwrap(), Seal::Unsealed);
        assert_eq!(read_seal(&file_with(b"tiny").1).unwrap(), Seal::Unsealed);
        let body = vec![b'x'; 4096];
        assert_eq!(read_seal(&file_with(&body).1).unwrap(), Seal::Unsealed);
    }

    #[test]
    fn every_flipped_octet_of_the_seal_is_caught() {
        let data = b"Subject: x\r\n\r\nbody\r\n";
        let envelope = b"{\"id\":\"A\",\"data_len\":20}";
        let mut whole = data.to_vec();
        whole.extend(seal_bytes(data.len() as u64, envelope).unwrap());
        for at in data.len()..whole.len() {
            let mut damaged = whole.clone();
            damaged[at] ^= 0x20;
            let (_dir, file) = file_with(&damaged);
            let seal = read_seal(&file).unwrap();
            assert!(
                !matches!(seal, Seal::Sealed { .. }),
                "a flip at octet {at} went unnoticed"
            );
        }
    }

    #[test]
    fn a_torn_seal_is_not_a_seal() {
        let data = b"hello\r\n";
        let mut whole = data.to_vec();
        whole.extend(seal_bytes(data.len() as u64, b"{}").unwrap());
        for cut in data.len()..whole.len() {
            let (_dir, file) = file_with(&whole[..cut]);
            assert!(
                !matches!(read_seal(&file).unwrap(), Seal::Sealed { .. }),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn an_oversized_envelope_is_refused() {
        let (_dir, file) = file_with(b"x");
        let big = vec![b' '; MAX_ENVELOPE_LEN as usize + 1];
        assert_eq!(
            seal(&file, 1, &big).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
