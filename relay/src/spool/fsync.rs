//! Durability helpers: group-committed directory fsyncs and the blocking
//! file operations every copy uses to make a new name durable.
//!
//! A rename or link is durable only once its directory is fsync'd. One
//! directory fsync persists every entry changed before it started, so
//! concurrent commits share them: the first caller starts a round, callers
//! arriving while it runs join the next round, and each round's result is
//! handed to all of its members.
//!
//! [`DirSync::filesystem`] group-commits `syncfs(2)` the same way: one call
//! makes every file written on the filesystem before it durable, names
//! included, so a batch of messages costs one sync instead of two fsyncs
//! each plus a directory fsync.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

/// The outcome of one fsync round, shared by its members.
type RoundResult = Option<Result<(), (io::ErrorKind, String)>>;

/// How a directory is made durable ([`sync_dir`], or a test double).
type Syncer = Arc<dyn Fn(&Path) -> io::Result<()> + Send + Sync>;

/// Group-commits fsyncs of one directory.
pub struct DirSync {
    dir: PathBuf,
    state: Mutex<State>,
    syncer: Syncer,
}

impl std::fmt::Debug for DirSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirSync")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Default)]
struct State {
    /// The round that collects callers until the running one finishes.
    next: Option<watch::Sender<RoundResult>>,
    /// Whether a round is being driven.
    running: bool,
}

impl DirSync {
    /// A group committer for `dir`.
    pub fn new(dir: PathBuf) -> Arc<DirSync> {
        DirSync::with_syncer(dir, Arc::new(sync_dir))
    }

    /// A group committer of `syncfs(2)` on the filesystem holding `dir`:
    /// after [`sync`](DirSync::sync), every file written and every name
    /// changed there before the call is durable.
    ///
    /// The filesystem is held open from now on, so a writeback error since
    /// this call is reported to the next sync; after one, every later sync
    /// fails too (the data of a file whose writeback failed may be gone,
    /// and the kernel reports that once): the relay stops confirming
    /// anything until it is restarted, as PostgreSQL learned to.
    pub fn filesystem(dir: PathBuf) -> io::Result<Arc<DirSync>> {
        use std::os::fd::AsRawFd;
        let handle = File::open(&dir)?;
        let syncer = poisoned_after_failure(move || {
            // SAFETY: syncfs on a descriptor this closure owns for its life.
            if unsafe { libc::syncfs(handle.as_raw_fd()) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
        Ok(DirSync::with_syncer(dir, syncer))
    }

    /// A group committer running `sync` for each round (`dir` names what it
    /// makes durable in errors), poisoned like [`filesystem`](DirSync::filesystem):
    /// after one failure every later round fails without trying.
    pub fn rounds_of(
        dir: PathBuf,
        sync: impl Fn() -> io::Result<()> + Send + Sync + 'static,
    ) -> Arc<DirSync> {
        DirSync::with_syncer(dir, poisoned_after_failure(sync))
    }

    fn with_syncer(dir: PathBuf, syncer: Syncer) -> Arc<DirSync> {
        Arc::new(DirSync {
            dir,
            state: Mutex::new(State::default()),
            syncer,
        })
    }

    /// The directory this committer syncs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Returns once an fsync of the directory that started after this call
    /// has completed, so every entry changed before the call is durable.
    pub async fn sync(self: &Arc<Self>) -> io::Result<()> {
        let (mut rx, lead) = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let round = state.next.get_or_insert_with(|| watch::channel(None).0);
            let rx = round.subscribe();
            if state.running {
                (rx, None)
            } else {
                state.running = true;
                (rx, state.next.take())
            }
        };
        if let Some(round) = lead {
            // Driven by its own task so a cancelled caller cannot strand the
            // other members of the round.
            tokio::spawn(Arc::clone(self).drive(round));
        }
        let result = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| io::Error::other("directory sync task ended without a result"))?;
        match result.as_ref() {
            Some(Ok(())) => Ok(()),
            Some(Err((kind, message))) => Err(io::Error::new(*kind, message.clone())),
            None => Err(io::Error::other("directory sync ended without a result")),
        }
    }

    async fn drive(self: Arc<Self>, mut round: watch::Sender<RoundResult>) {
        loop {
            let (dir, syncer) = (self.dir.clone(), Arc::clone(&self.syncer));
            let result = tokio::task::spawn_blocking(move || syncer(&dir))
                .await
                .unwrap_or_else(|join| Err(io::Error::other(join.to_string())));
            round.send_replace(Some(result.map_err(|e| (e.kind(), e.to_string()))));
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            match state.next.take() {
                Some(next) => round = next,
                None => {
                    state.running = false;
                    return;
                }
            }
        }
    }
}

/// A syncer running `sync` until it fails once; from then on every call
/// fails without trying (see [`DirSync::filesystem`]).
fn poisoned_after_failure(sync: impl Fn() -> io::Result<()> + Send + Sync + 'static) -> Syncer {
    use std::sync::atomic::{AtomicBool, Ordering};
    let failed = AtomicBool::new(false);
    Arc::new(move |dir: &Path| {
        if failed.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "an earlier sync of {} failed; restart the relay",
                dir.display()
            )));
        }
        sync().inspect_err(|err| {
            failed.store(true, Ordering::SeqCst);
            tracing::error!(dir = %dir.display(), error = %err, "sync failed; nothing more is confirmed until restart");
        })
    })
}

/// fsyncs a directory so the names created, renamed or removed in it persist.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Removes a file; one that is already gone is not an error.
pub fn remove_if_present(path: &Path) -> io::Result<()> {
    remove_existing(path).map(drop)
}

/// [`remove_if_present`], saying whether there was a file to remove.
pub fn remove_existing(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(err) => Err(err),
    }
}

/// Creates `path` (which must not exist) holding `bytes`, fsync'd; the
/// caller renames it into place and syncs the directory.
pub fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_new(path, bytes)?.sync_data()
}

/// Creates `path` (which must not exist) holding `bytes`, not synced (a
/// [`DirSync::filesystem`] round makes it durable).
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<File> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(bytes)?;
    Ok(file)
}

/// Renames `from` to `to` unless `to` exists (then `AlreadyExists`), atomically.
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
        };
        let (from_c, to_c) = (c(from)?, c(to)?);
        // SAFETY: both paths are NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                from_c.as_ptr(),
                libc::AT_FDCWD,
                to_c.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        // Filesystems without RENAME_NOREPLACE fall through to link + unlink.
        if !matches!(err.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) {
            return Err(err);
        }
    }
    std::fs::hard_link(from, to)?;
    remove_if_present(from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_syncs_all_complete() {
        let dir = tempfile::tempdir().unwrap();
        let sync = DirSync::new(dir.path().to_owned());
        let tasks: Vec<_> = (0..64)
            .map(|_| {
                let sync = Arc::clone(&sync);
                tokio::spawn(async move { sync.sync().await })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        assert!(!sync.state.lock().unwrap().running);
    }

    #[tokio::test]
    async fn callers_arriving_during_a_round_share_the_next_one() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let (entered_tx, entered_rx) = tokio::sync::oneshot::channel();
        let entered_tx = Mutex::new(Some(entered_tx));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Mutex::new(release_rx);
        let syncer: Syncer = {
            let calls = Arc::clone(&calls);
            Arc::new(move |_: &Path| {
                if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                    // Hold the first round open until the test has queued
                    // the others behind it.
                    let _ = entered_tx.lock().unwrap().take().unwrap().send(());
                    release_rx.lock().unwrap().recv().unwrap();
                }
                Ok(())
            })
        };
        let sync = DirSync::with_syncer(PathBuf::from("/unused"), syncer);
        let first = tokio::spawn({
            let sync = Arc::clone(&sync);
            async move { sync.sync().await }
        });
        entered_rx.await.unwrap();
        let mut later: Vec<_> = (0..10).map(|_| Box::pin(sync.sync())).collect();
        for call in &mut later {
            assert!(futures::poll!(call.as_mut()).is_pending());
        }
        release_tx.send(()).unwrap();
        first.await.unwrap().unwrap();
        for result in futures::future::join_all(later).await {
            result.unwrap();
        }
        // One round for the first caller, one shared by the ten that came later.
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_failed_fsync_reaches_its_members() {
        let dir = tempfile::tempdir().unwrap();
        let sync = DirSync::new(dir.path().join("missing"));
        let err = sync.sync().await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        // The committer is usable again once the directory exists.
        std::fs::create_dir(dir.path().join("missing")).unwrap();
        sync.sync().await.unwrap();
    }

    #[tokio::test]
    async fn after_a_failed_filesystem_sync_every_later_one_fails() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let syncer = poisoned_after_failure({
            let calls = Arc::clone(&calls);
            move || match calls.fetch_add(1, Ordering::SeqCst) {
                1 => Err(io::Error::from_raw_os_error(libc::EIO)),
                _ => Ok(()),
            }
        });
        let sync = DirSync::with_syncer(PathBuf::from("/spool"), syncer);
        sync.sync().await.unwrap();
        let failed = sync.sync().await.unwrap_err();
        assert!(
            failed.to_string().contains("Input/output error"),
            "{failed}"
        );
        // The kernel would report the lost write only once: later rounds do
        // not ask it again and fail.
        for _ in 0..3 {
            let err = sync.sync().await.unwrap_err();
            assert!(err.to_string().contains("restart the relay"), "{err}");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_filesystem_sync_covers_files_written_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let sync = DirSync::filesystem(dir.path().to_owned()).unwrap();
        write_new(&dir.path().join("a"), b"a").unwrap();
        sync.sync().await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), b"a");
        assert!(DirSync::filesystem(dir.path().join("missing")).is_err());
    }

    #[test]
    fn rename_noreplace_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, c) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("c"),
        );
        write_synced(&a, b"a").unwrap();
        write_synced(&b, b"b").unwrap();
        let err = rename_noreplace(&a, &b).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).unwrap(), b"b");
        rename_noreplace(&a, &c).unwrap();
        assert!(!a.exists());
        assert_eq!(std::fs::read(&c).unwrap(), b"a");
        assert_eq!(
            write_synced(&c, b"x").unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
    }
}
