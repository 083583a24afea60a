//! Noticing that files changed on disk: their modification times and
//! lengths, looked at no more than once a second, so a certificate renewed
//! in place (cert-manager, certbot) is taken by the next connection
//! without a restart and without a syscall per connection.

use std::path::PathBuf;
use std::sync::Mutex;
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
