//! Finished message files kept for the next messages to overwrite, as
//! PostgreSQL recycles WAL segments: removing a delivered message renames
//! its file into `spool/free/` instead of unlinking it, and a new message
//! takes a free file (renamed to its `<id>.part`) instead of creating one.
//! Each message then costs no inode allocation, no block allocation and no
//! block freeing (nor the discard a `discard` mount sends for it); on ext4
//! without a journal, where allocating an inode skips every inode freed in
//! the last 30 seconds, that is most of what a message costs the kernel.
//!
//! A free file still holds an earlier message's octets until it is
//! overwritten, readable only by the relay (as the disk blocks of an
//! unlinked file are): a taken file is cut to what was written before
//! anyone is given its path (see [`super::local::Writer`]). The pool is
//! bounded ([`MAX_FILES`], [`MAX_BYTES`], files up to [`MAX_FILE_BYTES`]);
//! what does not fit is unlinked as before. Nothing here is ever read as a
//! message: recovery does not look into `free/`, and the pool is adopted
//! as it is found at start.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::fsync::{remove_if_present, rename_noreplace};

/// Most files the pool keeps by default (`spool.free_files`).
pub const MAX_FILES: usize = 128;

/// Most octets the pool's files may hold together.
pub const MAX_BYTES: u64 = 8 << 20;

/// Largest file the pool keeps (a larger one is unlinked, giving its space
/// back at once).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

/// The pool of free message files in one directory.
#[derive(Debug)]
pub struct FreeFiles {
    dir: PathBuf,
    pool: Mutex<Pool>,
}

#[derive(Debug)]
struct Pool {
    /// Most files kept.
    max_files: usize,
    /// Free files: their number (the name) and length.
    files: Vec<(u64, u64)>,
    /// Octets the free files hold.
    bytes: u64,
    /// The next file's number.
    next: u64,
}

impl Pool {
    fn has_room_for(&self, len: u64) -> bool {
        len <= MAX_FILE_BYTES && self.files.len() < self.max_files && self.bytes + len <= MAX_BYTES
    }
}

impl FreeFiles {
    /// Blocking: opens (creating) the pool of at most `max_files` files in
    /// `dir`, adopting the free files found there (those beyond the bounds,
    /// and anything not named as a free file, are removed; so is every file
    /// when `max_files` is 0).
    pub fn open(dir: PathBuf, max_files: usize) -> io::Result<FreeFiles> {
        std::fs::create_dir_all(&dir)?;
        let mut pool = Pool {
            max_files,
            files: Vec::new(),
            bytes: 0,
            next: 0,
        };
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let number = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok());
            let len = entry.metadata()?.len();
            match number {
                Some(n) if entry.file_type()?.is_file() && pool.has_room_for(len) => {
                    pool.files.push((n, len));
                    pool.bytes += len;
                    pool.next = pool.next.max(n + 1);
                }
                _ if entry.file_type()?.is_dir() => {}
                _ => remove_if_present(&entry.path())?,
            }
        }
        Ok(FreeFiles {
            dir,
            pool: Mutex::new(pool),
        })
    }

    fn path_of(&self, number: u64) -> PathBuf {
        self.dir.join(number.to_string())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Free files in the pool, and the octets they hold.
    pub fn size(&self) -> (usize, u64) {
        let pool = self.lock();
        (pool.files.len(), pool.bytes)
    }

    /// Blocking: moves a free file to `to` (a name that must not exist) and
    /// opens it for writing from offset 0; returns it with its length (an
    /// earlier message's octets, for the writer to overwrite or cut).
    /// `None` when the pool is empty or the file could not be moved: the
    /// caller creates a new file then.
    pub fn take(&self, to: &Path) -> Option<(File, u64)> {
        let (number, len) = {
            let mut pool = self.lock();
            let (number, len) = pool.files.pop()?;
            pool.bytes -= len;
            (number, len)
        };
        let from = self.path_of(number);
        if let Err(err) = rename_noreplace(&from, to) {
            tracing::debug!(file = %from.display(), "cannot reuse a free message file: {err}");
            if err.kind() != io::ErrorKind::NotFound {
                // Still free: back into the pool.
                let mut pool = self.lock();
                pool.files.push((number, len));
                pool.bytes += len;
            }
            return None;
        }
        let opened = std::fs::OpenOptions::new().read(true).write(true).open(to);
        match opened {
            Ok(file) => Some((file, len)),
            Err(err) => {
                tracing::debug!(file = %to.display(), "cannot open a reused message file: {err}");
                let _ = std::fs::remove_file(to);
                None
            }
        }
    }

    /// Blocking: puts the finished message file at `path` into the pool.
    /// `false` when the pool has no room for it, it is not there, or it
    /// could not be moved (logged): the caller unlinks it then.
    pub fn keep(&self, path: &Path) -> bool {
        let len = match std::fs::metadata(path) {
            Ok(meta) => meta.len(),
            Err(err) => {
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(file = %path.display(), "cannot keep a finished message file: {err}");
                }
                return false;
            }
        };
        let number = {
            let mut pool = self.lock();
            if !pool.has_room_for(len) {
                return false;
            }
            // Counted now, so concurrent keeps cannot overfill the pool.
            pool.bytes += len;
            pool.next += 1;
            pool.next - 1
        };
        match std::fs::rename(path, self.path_of(number)) {
            Ok(()) => {
                self.lock().files.push((number, len));
                true
            }
            Err(err) => {
                self.lock().bytes -= len;
                if err.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(file = %path.display(), "cannot keep a finished message file: {err}");
                }
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::file_names as names;
    use std::io::Read;

    #[test]
    fn a_kept_file_is_taken_under_its_new_name_with_its_old_length() {
        let root = tempfile::tempdir().unwrap();
        let free = FreeFiles::open(root.path().join("free"), MAX_FILES).unwrap();
        let done = root.path().join("A.msg");
        std::fs::write(&done, b"an earlier message").unwrap();
        assert!(free.keep(&done));
        assert!(!done.exists());
        assert_eq!(free.size(), (1, 18));

        let next = root.path().join("B.part");
        let (mut file, len) = free.take(&next).unwrap();
        assert_eq!(len, 18);
        let mut held = String::new();
        file.read_to_string(&mut held).unwrap();
        assert_eq!(held, "an earlier message");
        assert_eq!(free.size(), (0, 0));
        assert!(names(&root.path().join("free")).is_empty());
        assert!(free.take(&root.path().join("C.part")).is_none());
    }

    #[test]
    fn the_pool_keeps_within_its_bounds_and_takes_no_name_twice() {
        let root = tempfile::tempdir().unwrap();
        let free = FreeFiles::open(root.path().join("free"), MAX_FILES).unwrap();
        let big = root.path().join("big.msg");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_FILE_BYTES + 1)
            .unwrap();
        assert!(!free.keep(&big), "too large to keep");
        assert!(big.exists());
        assert!(!free.keep(&root.path().join("gone.msg")));
        for n in 0..MAX_FILES + 3 {
            let path = root.path().join(format!("{n}.msg"));
            std::fs::write(&path, b"x").unwrap();
            assert_eq!(free.keep(&path), n < MAX_FILES, "file {n}");
        }
        assert_eq!(free.size(), (MAX_FILES, MAX_FILES as u64));
        // A name that exists is never replaced.
        let taken = root.path().join("0.msg");
        std::fs::write(&taken, b"mine").unwrap();
        assert!(free.take(&taken).is_none());
        assert_eq!(std::fs::read(&taken).unwrap(), b"mine");
        assert_eq!(free.size(), (MAX_FILES, MAX_FILES as u64), "still free");
    }

    #[test]
    fn opening_adopts_the_free_files_and_removes_strangers() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("free");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("7"), b"seven").unwrap();
        std::fs::write(dir.join("stranger"), b"?").unwrap();
        let free = FreeFiles::open(dir.clone(), MAX_FILES).unwrap();
        assert_eq!(free.size(), (1, 5));
        assert_eq!(names(&dir), vec!["7".to_owned()]);
        let done = root.path().join("A.msg");
        std::fs::write(&done, b"a").unwrap();
        assert!(free.keep(&done));
        assert_eq!(names(&dir), vec!["7".to_owned(), "8".to_owned()]);
        drop(free);
        // Turned off (spool.free_files = 0): what was kept goes.
        let off = FreeFiles::open(dir.clone(), 0).unwrap();
        assert_eq!(off.size(), (0, 0));
        assert!(names(&dir).is_empty());
    }
}
