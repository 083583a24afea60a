//! The local spool: streams a message into `<id>.part` through a bounded
//! buffer, watches disk space while doing so; at the end of data the spool
//! seals the file (the envelope and a footer after the data, see
//! [`message_file`]) and renames it to `<id>.msg`, and the local copy makes
//! it durable by waiting for a group-committed `syncfs(2)` that covers the
//! data, the seal and the name at once, for every message committed
//! meanwhile (`spool.sync = "filesystem"`); or, with `spool.sync = "files"`,
//! by `fdatasync`ing the file and waiting for a group-committed directory
//! fsync.
//!
//! Layout under `data_dir/spool/`: 32 subdirectories named by the last
//! character of the ids they hold (`spool/<c>/`, see [`Shards`]), each with
//! one `<id>.msg` per committed message and one `<id>.part` per message
//! being received. Creating, renaming and unlinking a name locks its
//! directory; with one directory, every session and delivery queued on that
//! lock. A new message's file is preferably a finished one taken from
//! `spool/free/` ([`super::free_files`]), which the writer overwrites and
//! cuts to what it wrote.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::free_files::FreeFiles;
use super::fsync::{remove_if_present, DirSync};
use super::id;
use super::message_file;
use super::quorum::{joined, CopyError, CopyJob, CopyTarget};
use crate::config::CopyKind;

/// Bytes a message may hold in memory before they go to disk.
pub const BUFFER_CAP: usize = 128 * 1024;

/// How many bytes may be written between two free-space checks.
pub const SPACE_CHECK_INTERVAL: u64 = 1024 * 1024;

/// `<spool_dir>/<c>/`, where `<c>` is the last character of `id`: the
/// subdirectory of the local spool that holds message `id`'s files.
pub fn shard_dir(spool_dir: &Path, id: &str) -> PathBuf {
    spool_dir.join(shard_name(id::last_digit(id)))
}

fn shard_name(digit: usize) -> String {
    id::digit_char(digit).to_string()
}

/// The local spool's subdirectories, each with its group-committed
/// directory fsync (removals; commits with `spool.sync = "files"`).
#[derive(Debug)]
pub struct Shards {
    root: PathBuf,
    syncs: Vec<Arc<DirSync>>,
}

impl Shards {
    /// Creates (when missing) the subdirectories of `root`.
    pub fn open(root: &Path) -> io::Result<Shards> {
        let mut syncs = Vec::with_capacity(id::LAST_DIGITS);
        for digit in 0..id::LAST_DIGITS {
            let dir = root.join(shard_name(digit));
            std::fs::create_dir_all(&dir)?;
            syncs.push(DirSync::new(dir));
        }
        Ok(Shards {
            root: root.to_owned(),
            syncs,
        })
    }

    /// The spool directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The subdirectory holding message `id`.
    pub fn dir_of(&self, id: &str) -> &Path {
        self.sync_of(id).dir()
    }

    /// The directory fsync of the subdirectory holding message `id`.
    pub fn sync_of(&self, id: &str) -> &Arc<DirSync> {
        &self.syncs[id::last_digit(id)]
    }

    /// Every subdirectory.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.syncs.iter().map(|sync| sync.dir())
    }
}

/// Octets of the filesystem holding `dir` that an unprivileged writer may use.
pub fn available_bytes(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and `stat` is a valid out-pointer.
    let rc = unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field widths differ between targets
    Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Whether an I/O error means the disk (or our quota) is full.
pub fn is_out_of_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// The open `.msg` of a message being received, its unwritten tail and the
/// running digest. Moved into blocking tasks whole, so the runtime never
/// blocks on the disk.
#[derive(Debug)]
pub struct Writer {
    /// The message file: open, or only named until the first write reaches
    /// the disk (a message that fits the buffer is created, written and
    /// hashed in one blocking call at the end).
    file: Target,
    buf: Vec<u8>,
    hasher: Sha256,
    /// Octets accepted so far (buffered included).
    len: u64,
    /// Octets of an earlier message a reused file holds beyond what was
    /// written; cut at the next write, so the file never holds more than
    /// this message's data.
    stale: u64,
}

/// Where a [`Writer`]'s bytes go.
#[derive(Debug)]
enum Target {
    /// A file already open.
    Open(File),
    /// A file to take from the free files, or else to create (with
    /// [`message_file::create`]), at the first write.
    Named(PathBuf, Option<Arc<FreeFiles>>),
}

impl Target {
    /// Blocking: the open file, taken or created now if it was only named;
    /// `stale` is set to what a taken file holds.
    fn open(&mut self, stale: &mut u64) -> io::Result<&mut File> {
        if let Target::Named(path, free) = self {
            let reused = free.as_ref().and_then(|free| free.take(path));
            let file = match reused {
                Some((file, held)) => {
                    *stale = held;
                    file
                }
                None => message_file::create(path)?,
            };
            *self = Target::Open(file);
        }
        match self {
            Target::Open(file) => Ok(file),
            Target::Named(..) => unreachable!("opened above"),
        }
    }
}

impl Writer {
    /// Wraps a freshly created message file.
    pub fn new(file: File) -> Writer {
        Writer::with_target(Target::Open(file))
    }

    /// A writer whose message file at `path` is, when the first bytes go
    /// to disk, a free file taken from `free` (if any) or else a new one
    /// (never reusing a name).
    pub fn create_at(path: PathBuf, free: Option<Arc<FreeFiles>>) -> Writer {
        Writer::with_target(Target::Named(path, free))
    }

    fn with_target(file: Target) -> Writer {
        Writer {
            file,
            buf: Vec::with_capacity(BUFFER_CAP),
            hasher: Sha256::new(),
            len: 0,
            stale: 0,
        }
    }

    /// Octets accepted so far.
    pub fn written(&self) -> u64 {
        self.len
    }

    /// Room left in the buffer.
    pub fn room(&self) -> usize {
        BUFFER_CAP.saturating_sub(self.buf.len())
    }

    /// Buffers `data`, which must fit in `room()`.
    pub fn push(&mut self, data: &[u8]) {
        debug_assert!(data.len() <= self.room());
        self.buf.extend_from_slice(data);
        self.len += data.len() as u64;
    }

    /// Blocking: hashes and writes the buffered bytes (the file then holds
    /// exactly the octets written so far).
    pub fn flush_blocking(&mut self) -> io::Result<()> {
        self.hasher.update(&self.buf);
        let file = self.file.open(&mut self.stale)?;
        file.write_all(&self.buf)?;
        if self.stale > self.len {
            file.set_len(self.len)?;
        }
        self.stale = 0;
        self.buf.clear();
        Ok(())
    }

    /// Blocking: writes the tail and returns the file, length and hex digest.
    pub fn finish_blocking(mut self) -> io::Result<(File, u64, String)> {
        self.flush_blocking()?;
        let digest = hex::encode(self.hasher.finalize());
        match self.file {
            Target::Open(file) => Ok((file, self.len, digest)),
            Target::Named(..) => unreachable!("flush_blocking opened it"),
        }
    }
}

/// The local-disk copy: the `<id>.msg` the receiver wrote, sealed and
/// named, made durable.
#[derive(Debug)]
pub struct LocalCopy {
    /// The spool's subdirectories and their fsyncs (removals).
    shards: Arc<Shards>,
    /// `syncfs` rounds of the spool's filesystem (commits); `None`: each
    /// commit fsyncs its own file.
    files: Option<Arc<DirSync>>,
}

impl LocalCopy {
    /// The copy in the spool directory `shards.root()`; `files` syncs its
    /// filesystem ([`DirSync::filesystem`]), or each commit fsyncs its own
    /// file when it is `None`.
    pub fn new(shards: Arc<Shards>, files: Option<Arc<DirSync>>) -> LocalCopy {
        LocalCopy { shards, files }
    }
}

impl CopyTarget for LocalCopy {
    fn kind(&self) -> CopyKind {
        CopyKind::Local
    }

    fn write(self: Arc<Self>, job: Arc<CopyJob>) -> BoxFuture<'static, Result<(), CopyError>> {
        Box::pin(async move {
            // The spool sealed and named the file before the copies started
            // (see `Incoming::commit`); this makes it durable.
            match &self.files {
                // One syncfs makes the data, the seal and the name durable,
                // shared with every commit that sealed before it started. A
                // crash before it returns may leave a seal whose data did
                // not all reach the disk: the client never got its 250, and
                // recovery (length) or the check before the first delivery
                // (SHA-256) finds it. A failed sync fails the commit; the
                // quorum then takes the copy back.
                Some(files) => files.sync().await?,
                // The file's own sync, then its directory's for the name.
                None => {
                    let synced = {
                        let job = Arc::clone(&job);
                        tokio::task::spawn_blocking(move || job.data_file.sync_data())
                    };
                    joined(synced.await)?;
                    self.shards.sync_of(&job.id).sync().await?
                }
            }
            Ok(())
        })
    }

    fn remove(
        self: Arc<Self>,
        _spool: String,
        id: String,
    ) -> BoxFuture<'static, Result<(), CopyError>> {
        Box::pin(async move {
            let dir = self.shards.dir_of(&id);
            let (path, part) = (
                message_file::path(dir, &id),
                message_file::part_path(dir, &id),
            );
            tokio::task::spawn_blocking(move || {
                remove_if_present(&path)?;
                remove_if_present(&part)
            })
            .await??;
            // The seal must be gone for good before the client hears 451.
            self.shards.sync_of(&id).sync().await?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writer_hashes_and_counts_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.msg");
        let mut writer = Writer::new(message_file::create(&path).unwrap());
        let data = vec![b'x'; BUFFER_CAP * 2 + 17];
        for chunk in data.chunks(BUFFER_CAP / 3) {
            let mut rest = chunk;
            while !rest.is_empty() {
                if writer.room() == 0 {
                    writer.flush_blocking().unwrap();
                }
                let take = writer.room().min(rest.len());
                writer.push(&rest[..take]);
                rest = &rest[take..];
            }
        }
        let (_, len, digest) = writer.finish_blocking().unwrap();
        assert_eq!(len, data.len() as u64);
        assert_eq!(digest, hex::encode(Sha256::digest(&data)));
        assert_eq!(std::fs::read(&path).unwrap(), data);
    }

    #[test]
    fn a_reused_file_holds_only_the_new_message_from_its_first_write() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let free = Arc::new(
            FreeFiles::open(dir.path().join("free"), super::super::free_files::MAX_FILES).unwrap(),
        );
        // Longer, shorter and as long as the earlier message.
        for new_len in [10usize, 5_000, 40_000] {
            let earlier = dir.path().join("earlier.msg");
            std::fs::write(&earlier, vec![b'o'; 20_000]).unwrap();
            let inode = std::fs::metadata(&earlier).unwrap().ino();
            assert!(free.keep(&earlier));

            let path = dir.path().join(format!("{new_len}.part"));
            let mut writer = Writer::create_at(path.clone(), Some(Arc::clone(&free)));
            let data: Vec<u8> = (0..new_len).map(|i| b'a' + (i % 26) as u8).collect();
            let (first, rest) = data.split_at(new_len / 2);
            writer.push(first);
            // What a scanner is given at the end of data: the data alone.
            writer.flush_blocking().unwrap();
            assert_eq!(
                std::fs::read(&path).unwrap(),
                first,
                "after the first write"
            );
            writer.push(rest);
            let (_, len, digest) = writer.finish_blocking().unwrap();
            assert_eq!(len, new_len as u64);
            assert_eq!(digest, hex::encode(Sha256::digest(&data)));
            assert_eq!(std::fs::read(&path).unwrap(), data);
            assert_eq!(
                std::fs::metadata(&path).unwrap().ino(),
                inode,
                "the same file"
            );
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn a_message_file_never_reuses_a_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.msg");
        message_file::create(&path).unwrap();
        assert_eq!(
            message_file::create(&path).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn available_bytes_reads_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).unwrap() > 0);
        assert!(available_bytes(&dir.path().join("missing")).is_err());
    }

    #[tokio::test]
    async fn the_local_copy_makes_the_sealed_file_durable_and_takes_it_back() {
        let root = tempfile::tempdir().unwrap();
        let shards = Arc::new(Shards::open(root.path()).unwrap());
        let id = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
        let dir = shards.dir_of(id).to_owned();
        assert_eq!(dir, root.path().join("V"));
        let path = message_file::path(&dir, id);
        let data = b"Subject: x\r\n\r\nbody\r\n";
        for files in [
            Some(DirSync::filesystem(root.path().to_owned()).unwrap()),
            None,
        ] {
            let mut writer = Writer::new(message_file::create(&path).unwrap());
            writer.push(data);
            let (file, data_len, _) = writer.finish_blocking().unwrap();
            message_file::seal(&file, data_len, b"{}").unwrap();
            let job = Arc::new(CopyJob {
                spool: String::new(),
                id: id.into(),
                data_path: path.clone(),
                data_file: Arc::new(file),
                data_len,
                envelope_json: bytes::Bytes::from_static(b"{}"),
            });
            let copy = Arc::new(LocalCopy::new(Arc::clone(&shards), files));
            Arc::clone(&copy).write(job).await.unwrap();
            assert_eq!(
                message_file::read_seal_at(&path).unwrap(),
                message_file::Seal::Sealed {
                    data_len,
                    envelope_json: b"{}".to_vec()
                }
            );
            assert_eq!(&std::fs::read(&path).unwrap()[..data.len()], data);
            copy.remove(String::new(), id.into()).await.unwrap();
            assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        }
    }
}
