//! Noticing that files changed on disk: their modification times and
//! lengths, looked at no more than once a second, so a certificate renewed
//! in place (cert-manager, certbot) is taken by the next connection
//! without a restart and without a syscall per connection.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

/// How often, at most, the files are looked at.
const RECHECK: Duration = Duration::from_secs(1);

/// What the files looked like: modification time and length, or nothing
/// for a file that could not be looked at.
type Stamp = Vec<Option<(SystemTime, u64)>>;

/// A set of files watched for changes.
#[derive(Debug)]
pub struct Watched {
    paths: Vec<PathBuf>,
    checked: Mutex<(Instant, Stamp)>,
}

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some((meta.modified().ok()?, meta.len()))
        })
        .collect()
}

impl Watched {
    /// Watches `paths` from how they look now.
    pub fn new(paths: Vec<PathBuf>) -> Watched {
        let now = stamp(&paths);
        Watched {
            paths,
            checked: Mutex::new((Instant::now(), now)),
        }
    }

    /// Whether a file changed since the last call that said so (looking at
    /// most once a second; a call in between says no).
    pub fn changed(&self) -> bool {
        let mut checked = self.checked.lock().unwrap_or_else(|e| e.into_inner());
        if checked.0.elapsed() < RECHECK {
            return false;
        }
        checked.0 = Instant::now();
        let now = stamp(&self.paths);
        if now == checked.1 {
            return false;
        }
        checked.1 = now;
        true
    }
}

/// A value built from files (TLS settings), built again when they change;
/// files that do not build keep the previous value, with an error in the
/// log.
pub struct Reloading<T> {
    watched: Watched,
    current: RwLock<Arc<T>>,
    build: Box<dyn Fn() -> Result<T, String> + Send + Sync>,
    /// What the files are, for the log lines.
    what: &'static str,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("paths", &self.watched.paths)
            .finish_non_exhaustive()
    }
}

impl<T> Reloading<T> {
    /// `first`, built from `paths` by `build`, which builds it again when
    /// they change.
    pub fn new(
        first: T,
        paths: Vec<PathBuf>,
        build: impl Fn() -> Result<T, String> + Send + Sync + 'static,
    ) -> Reloading<T> {
        Reloading {
            watched: Watched::new(paths),
            current: RwLock::new(Arc::new(first)),
            build: Box::new(build),
            what: "TLS files",
        }
    }

    /// Names the files in log lines ("TLS files" unless told).
    pub fn describing(mut self, what: &'static str) -> Reloading<T> {
        self.what = what;
        self
    }

    /// The value to use now, built again first if a file changed.
    pub fn current(&self) -> Arc<T> {
        if self.watched.changed() {
            match (self.build)() {
                Ok(value) => {
                    tracing::info!(files = ?self.watched.paths, "{} changed; new connections use them", self.what);
                    *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(value);
                }
                Err(err) => tracing::error!(
                    "{} changed but cannot be used, keeping the previous ones: {err}",
                    self.what
                ),
            }
        }
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewritten_file_is_noticed_once_and_not_before_a_second_passes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tls.crt");
        std::fs::write(&path, "one").unwrap();
        let watched = Watched::new(vec![path.clone(), dir.path().join("missing")]);
        std::fs::write(&path, "two, longer").unwrap();
        assert!(!watched.changed(), "looked again within a second");
        watched.checked.lock().unwrap().0 -= RECHECK;
        assert!(watched.changed());
        watched.checked.lock().unwrap().0 -= RECHECK;
        assert!(!watched.changed(), "the same change twice");
    }
}
