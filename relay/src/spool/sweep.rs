//! What a crash left in one directory of message files: the sweep that the
//! local spool's recovery ([`super::recovery`]) and the peer replica
//! store's opening ([`crate::peer::store::ReplicaStore::open`]) share.
//!
//! One pass over the directory:
//! - a `<id>.part` (a commit that never reached its rename) and an older
//!   version's `<id>.env.tmp` are removed;
//! - an older version's `<id>.eml` + `<id>.env` pair becomes a sealed
//!   `<id>.msg` when the caller's [`Older`] rule says so (an `.eml` without
//!   its `.env` is removed);
//! - every `<id>.msg` has its seal read: sealed ones are returned with their
//!   envelope JSON, damaged ones with why.
//!
//! What to do with damage is the caller's: the spool repairs from another
//! copy or quarantines; a replica store removes (the owner writes the
//! replica again). Nothing here reads a message's data.

use std::collections::BTreeSet;
use std::io;
use std::path::Path;

use super::fsync::remove_if_present;
use super::id;
use super::message_file::{self, Seal};

/// What to do with an older version's record (`<id>.env`, and `<id>.eml`
/// if `has_data`), given its envelope JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Older {
    /// Turn it into a sealed `<id>.msg`.
    Convert,
    /// Remove its files.
    Drop,
    /// Leave its files for the caller (listed in [`Swept::refused`]).
    Refuse,
}

/// The rule a caller gives for older records: `(id, envelope JSON,
/// has_data)`.
pub type OlderRule<'a> = &'a dyn Fn(&str, &[u8], bool) -> Older;

/// What one directory held, once swept.
#[derive(Debug, Default)]
pub struct Swept {
    /// Sealed `<id>.msg` files: id and envelope JSON, sorted by id.
    pub sealed: Vec<(String, Vec<u8>)>,
    /// `<id>.msg` files whose seal does not hold or cannot be read: id and
    /// why, sorted by id.
    pub damaged: Vec<(String, String)>,
    /// Names of record files whose stem is not a spool id (left in place).
    pub misnamed: Vec<String>,
    /// Ids of older records the rule refused (left in place).
    pub refused: Vec<String>,
    /// Leftover files removed.
    pub removed: usize,
}

/// The id part of a record file's name (this version's `.msg` and `.part`,
/// and the `.eml`, `.env` and `.env.tmp` of older ones).
pub fn record_stem(name: &str) -> Option<&str> {
    [".msg", ".part", ".env.tmp", ".env", ".eml"]
        .iter()
        .find_map(|suffix| name.strip_suffix(suffix))
}

/// A directory's record files, by kind.
#[derive(Default)]
struct Listing {
    messages: BTreeSet<String>,
    envelopes: BTreeSet<String>,
    data: BTreeSet<String>,
}

/// Blocking: sweeps `dir` (see the module's documentation), leaving alone
/// the records whose id `skip` names (messages the caller is writing now).
/// Removals are not synced: a leftover that comes back is swept again.
pub fn sweep(dir: &Path, skip: &dyn Fn(&str) -> bool, older: OlderRule<'_>) -> io::Result<Swept> {
    let mut swept = Swept::default();
    let mut found = Listing::default();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            tracing::warn!(file = ?entry.path(), "ignoring a file with a non-UTF-8 name among message files");
            continue;
        };
        if name.starts_with('.') || entry.file_type()?.is_dir() {
            continue;
        }
        let Some(stem) = record_stem(name) else {
            tracing::warn!(file = %entry.path().display(), "ignoring an unknown file among message files");
            continue;
        };
        if skip(stem) {
            continue;
        }
        if !id::is_valid(stem) {
            swept.misnamed.push(name.to_owned());
        } else if name.ends_with(".env.tmp") || message_file::id_of_part(name).is_some() {
            remove_if_present(&entry.path())?;
            swept.removed += 1;
        } else if message_file::id_of(name).is_some() {
            found.messages.insert(stem.to_owned());
        } else if name.ends_with(".env") {
            found.envelopes.insert(stem.to_owned());
        } else {
            found.data.insert(stem.to_owned());
        }
    }
    convert_older(dir, older, &mut found, &mut swept)?;
    for stem in found.messages {
        match message_file::read_seal_at(&message_file::path(dir, &stem)) {
            Ok(Seal::Sealed { envelope_json, .. }) => swept.sealed.push((stem, envelope_json)),
            Ok(Seal::Unsealed) => swept
                .damaged
                .push((stem, "no seal at the end of the file".into())),
            Ok(Seal::Damaged(why)) => swept.damaged.push((stem, why)),
            Err(err) => swept
                .damaged
                .push((stem, format!("cannot read the message file: {err}"))),
        }
    }
    swept.misnamed.sort();
    Ok(swept)
}

/// Blocking: applies `older` to the `<id>.env` records of older versions
/// (converted ones join `found.messages`), and removes an `.eml` without
/// its `.env`. Safe to repeat after a crash at any point: an `.env` goes
/// only once the sealed `.msg` that replaces it is durable.
fn convert_older(
    dir: &Path,
    older: OlderRule<'_>,
    found: &mut Listing,
    swept: &mut Swept,
) -> io::Result<()> {
    let mut converted = Vec::new();
    for stem in &found.envelopes {
        let env = dir.join(format!("{stem}.env"));
        if found.messages.contains(stem) {
            // Converted before a crash that came before the `.env` went.
            converted.push(env);
            continue;
        }
        let has_data = found.data.contains(stem);
        let json = std::fs::read(&env)?;
        match older(stem, &json, has_data) {
            Older::Convert => {
                message_file::convert_older(dir, stem, &json)?;
                found.messages.insert(stem.clone());
                converted.push(env);
            }
            Older::Drop => {
                remove_if_present(&dir.join(format!("{stem}.eml")))?;
                remove_if_present(&env)?;
                swept.removed += 1;
            }
            Older::Refuse => swept.refused.push(stem.clone()),
        }
    }
    for stem in found.data.difference(&found.envelopes) {
        // An older version's data whose envelope never committed.
        remove_if_present(&dir.join(format!("{stem}.eml")))?;
        swept.removed += 1;
    }
    message_file::remove_converted(dir, &converted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::file_names as names;
    use crate::spool::id::IdGenerator;

    fn sealed_file(dir: &Path, id: &str, data: &[u8], json: &[u8]) {
        let mut whole = data.to_vec();
        whole.extend(message_file::seal_bytes(data.len() as u64, json).unwrap());
        std::fs::write(message_file::path(dir, id), whole).unwrap();
    }

    #[test]
    fn one_pass_sorts_every_kind_of_record() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ids = IdGenerator::new();
        let [sealed, torn, part, tmp, orphan_eml, old, old_refused, old_dropped, skipped] =
            std::array::from_fn(|_| ids.next_id());
        sealed_file(d, &sealed, b"data\r\n", b"{\"a\":1}");
        let mut cut = b"data\r\n".to_vec();
        cut.extend(message_file::seal_bytes(6, b"{}").unwrap());
        cut.truncate(cut.len() - 3);
        std::fs::write(message_file::path(d, &torn), cut).unwrap();
        std::fs::write(message_file::part_path(d, &part), b"half").unwrap();
        std::fs::write(d.join(format!("{tmp}.env.tmp")), b"{").unwrap();
        std::fs::write(d.join(format!("{orphan_eml}.eml")), b"x").unwrap();
        for stem in [&old, &old_refused] {
            std::fs::write(d.join(format!("{stem}.eml")), b"old\r\n").unwrap();
            std::fs::write(
                d.join(format!("{stem}.env")),
                format!("{{\"id\":\"{stem}\"}}"),
            )
            .unwrap();
        }
        std::fs::write(d.join(format!("{old_dropped}.env")), b"{}").unwrap();
        std::fs::write(message_file::part_path(d, &skipped), b"mine").unwrap();
        std::fs::write(d.join("not-an-id.msg"), b"?").unwrap();
        std::fs::write(d.join("README"), b"?").unwrap();

        let rule = |stem: &str, json: &[u8], has_data: bool| {
            assert!(json.starts_with(b"{"));
            if stem == old_refused {
                Older::Refuse
            } else if has_data {
                Older::Convert
            } else {
                Older::Drop
            }
        };
        let swept = sweep(d, &|stem| stem == skipped, &rule).unwrap();

        let mut sealed_ids: Vec<&str> = swept.sealed.iter().map(|(id, _)| id.as_str()).collect();
        sealed_ids.sort();
        let mut expected = vec![sealed.as_str(), old.as_str()];
        expected.sort();
        assert_eq!(sealed_ids, expected);
        assert!(swept
            .sealed
            .contains(&(sealed.clone(), b"{\"a\":1}".to_vec())));
        assert_eq!(swept.damaged.len(), 1);
        assert_eq!(swept.damaged[0].0, torn);
        assert_eq!(swept.refused, vec![old_refused.clone()]);
        assert_eq!(swept.misnamed, vec!["not-an-id.msg".to_owned()]);
        // .part, .env.tmp, the .eml alone, the dropped .env.
        assert_eq!(swept.removed, 4);
        let mut left = vec![
            format!("{sealed}.msg"),
            format!("{torn}.msg"),
            format!("{old}.msg"),
            format!("{old_refused}.eml"),
            format!("{old_refused}.env"),
            format!("{skipped}.part"),
            "not-an-id.msg".to_owned(),
            "README".to_owned(),
        ];
        left.sort();
        assert_eq!(names(d), left);
        let (data, _) = message_file::read_sealed(&message_file::path(d, &old)).unwrap();
        assert_eq!(data, b"old\r\n");
    }

    #[test]
    fn a_conversion_interrupted_before_the_env_went_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let id = IdGenerator::new().next_id();
        sealed_file(d, &id, b"x\r\n", b"{}");
        std::fs::write(d.join(format!("{id}.env")), b"{}").unwrap();
        let swept = sweep(d, &|_| false, &|_, _, _| panic!("not asked")).unwrap();
        assert_eq!(swept.sealed.len(), 1);
        assert_eq!(names(d), vec![format!("{id}.msg")]);
    }
}
