//! The quorum writer: starts every copy of a message in parallel, answers as
//! soon as the ack policy is met, and when it cannot be met before the
//! deadline, takes back whatever was written so no committed copy remains.
//!
//! Copies sit behind [`CopyTarget`] so this logic is tested with fakes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Committed, SpoolError};
use crate::config::CopyKind;
use crate::metrics::CopyLatency;

/// Why one copy failed; turned into text only in [`SpoolError::QuorumFailed`].
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A local file operation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The object store refused or could not be reached.
    #[error("{0}")]
    ObjectStore(#[from] object_store::Error),
    /// The object already exists; copies never overwrite.
    #[error("{key} already exists")]
    AlreadyExists {
        /// The key or path that exists.
        key: String,
    },
    /// The task writing the copy panicked or was cancelled.
    #[error("copy task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    /// A peer replica could not be written or removed.
    #[error("{0}")]
    Peer(#[from] crate::peer::PeerError),
}

impl CopyError {
    /// Whether the copy found the message already there (and so wrote nothing
    /// it may take back).
    pub fn is_already_exists(&self) -> bool {
        matches!(
            self,
            CopyError::AlreadyExists { .. }
                | CopyError::ObjectStore(object_store::Error::AlreadyExists { .. })
        )
    }
}

/// Flattens the result of a blocking task.
pub fn joined<T>(
    result: Result<std::io::Result<T>, tokio::task::JoinError>,
) -> Result<T, CopyError> {
    Ok(result??)
}

/// A message whose data has ended, ready to be copied.
#[derive(Debug)]
pub struct CopyJob {
    /// The spool (unit of ownership) the message belongs to; empty on a
    /// relay that is not in a cluster.
    pub spool: String,
    /// Spool id.
    pub id: String,
    /// The local message file (the local copy, or staging for the others).
    pub data_path: PathBuf,
    /// An open handle on `data_path`, all data written; readable, and
    /// writable when the local copy seals it.
    pub data_file: Arc<std::fs::File>,
    /// Length of the data in octets.
    pub data_len: u64,
    /// The envelope JSON.
    pub envelope_json: Bytes,
}

impl CopyJob {
    /// A job for a message already committed here, in the sealed message
    /// file at `path` (opened read-only: for copies other than the local one).
    pub async fn from_files(
        spool: &str,
        id: &str,
        path: &std::path::Path,
        data_len: u64,
    ) -> std::io::Result<CopyJob> {
        let opened = path.to_owned();
        let (file, envelope_json) = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&opened)?;
            match super::message_file::read_seal(&file)? {
                super::message_file::Seal::Sealed { envelope_json, .. } => {
                    Ok((file, envelope_json))
                }
                _ => Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{} is not sealed", opened.display()),
                )),
            }
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(CopyJob {
            spool: spool.to_owned(),
            id: id.to_owned(),
            data_path: path.to_owned(),
            data_file: Arc::new(file),
            data_len,
            envelope_json: envelope_json.into(),
        })
    }
}

/// One durable copy of messages.
///
/// `write` returns `Ok` only once the data and the envelope are durable (fsync'd
/// or acknowledged by the store); it never overwrites an existing copy.
/// `remove` takes the copy back (uncommitting it first), and succeeds when it is
/// already absent.
pub trait CopyTarget: Send + Sync + 'static {
    /// Which copy of the ack policy this is.
    fn kind(&self) -> CopyKind;
    /// Writes the copy.
    fn write(self: Arc<Self>, job: Arc<CopyJob>) -> BoxFuture<'static, Result<(), CopyError>>;
    /// Removes the copy of message `id`.
    fn remove(
        self: Arc<Self>,
        spool: String,
        id: String,
    ) -> BoxFuture<'static, Result<(), CopyError>>;
    /// Writes message `id` of `spool` as this copy holds it (data and
    /// envelope) to `<scratch>/<id>.msg`, sealed and fsync'd, to repair a
    /// damaged local copy (the caller checks it). `Ok(false)` when this copy
    /// does not hold the message; the local copy never does (it is the one
    /// being repaired).
    fn restore(
        self: Arc<Self>,
        spool: String,
        id: String,
        scratch: PathBuf,
    ) -> BoxFuture<'static, Result<bool, CopyError>> {
        let _ = (spool, id, scratch);
        Box::pin(async { Ok(false) })
    }
}

/// Tracks tasks that outlive the request that started them, so shutdown and
/// tests can wait for them instead of sleeping.
#[derive(Debug, Clone)]
pub struct Background {
    running: Arc<watch::Sender<usize>>,
}

impl Default for Background {
    fn default() -> Self {
        Background {
            running: Arc::new(watch::channel(0).0),
        }
    }
}

struct BackgroundGuard(Arc<watch::Sender<usize>>);

impl Drop for BackgroundGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

impl Background {
    /// Spawns `task`, counted until it ends.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.running.send_modify(|n| *n += 1);
        let guard = BackgroundGuard(Arc::clone(&self.running));
        tokio::spawn(async move {
            let _guard = guard;
            task.await
        })
    }

    /// Waits until no tracked task is running.
    pub async fn idle(&self) {
        let mut rx = self.running.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// The ack policy of one commit.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Copies that must confirm.
    pub required: usize,
    /// Time allowed for them.
    pub deadline: Duration,
}

type Outcome = (usize, Result<Result<(), CopyError>, tokio::task::JoinError>);

/// Writes `job` to every target and returns once `policy.required` confirmed.
///
/// `finally` runs after every copy has finished, whatever the outcome (the
/// spool uses it to drop a staging file); `latency` records how long each
/// copy that confirmed took.
pub async fn commit(
    targets: &[Arc<dyn CopyTarget>],
    job: Arc<CopyJob>,
    policy: Policy,
    background: &Background,
    finally: Option<Box<dyn FnOnce() + Send>>,
    latency: Option<Arc<CopyLatency>>,
) -> Result<Committed, SpoolError> {
    let started = Instant::now();
    let deadline = started + policy.deadline;
    let mut running: FuturesUnordered<BoxFuture<'static, Outcome>> = FuturesUnordered::new();
    for (index, target) in targets.iter().enumerate() {
        let (kind, write) = (target.kind(), Arc::clone(target).write(Arc::clone(&job)));
        let latency = latency.clone();
        // Timed where it runs, so a copy that confirms after the quorum
        // answered is counted too.
        let timed = async move {
            let result = write.await;
            if let (Ok(()), Some(latency)) = (&result, latency) {
                latency.observe(kind, started.elapsed());
            }
            result
        };
        let handle = background.spawn(timed);
        running.push(Box::pin(async move { (index, handle.await) }));
    }

    let mut confirmed: Vec<usize> = Vec::new();
    let mut failed: Vec<(usize, CopyError)> = Vec::new();
    let timed_out = loop {
        if confirmed.len() >= policy.required {
            break false;
        }
        if targets.len() - failed.len() < policy.required {
            break false;
        }
        match tokio::time::timeout_at(deadline, running.next()).await {
            Ok(Some((index, Ok(Ok(()))))) => confirmed.push(index),
            Ok(Some((index, Ok(Err(err))))) => failed.push((index, err)),
            Ok(Some((index, Err(join)))) => failed.push((index, CopyError::Task(join))),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };

    let id = job.id.clone();
    if confirmed.len() >= policy.required {
        let kinds = targets.to_vec();
        background.spawn(async move {
            while let Some((index, outcome)) = running.next().await {
                let kind = kinds[index].kind();
                match outcome {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => tracing::warn!(%id, ?kind, error = %err, "copy failed after the quorum; repair will re-create it"),
                    Err(err) => tracing::warn!(%id, ?kind, error = %err, "copy task failed after the quorum; repair will re-create it"),
                }
            }
            if let Some(finally) = finally {
                finally();
            }
        });
        return Ok(Committed {
            id: job.id.clone(),
            spool: job.spool.clone(),
            confirmed: confirmed.iter().map(|&i| targets[i].kind()).collect(),
            quorum_time: started.elapsed(),
            data_len: job.data_len,
            data_sha256: String::new(),
        });
    }

    // The quorum is lost: take back every copy. Copies still running get the
    // rest of the deadline to finish, so that those that land (the local one,
    // typically) are taken back while the client waits: a committed copy left
    // behind would be delivered after we answered 451. Later ones are taken
    // back in the background as they finish.
    let confirmed_in_time = confirmed.len();
    while let Ok(Some((index, outcome))) = tokio::time::timeout_at(deadline, running.next()).await {
        match outcome {
            Ok(Ok(())) => confirmed.push(index),
            Ok(Err(err)) => failed.push((index, err)),
            Err(join) => failed.push((index, CopyError::Task(join))),
        }
    }
    let timed_out = timed_out || confirmed.len() + failed.len() < targets.len();
    let mut detail: Vec<String> = failed
        .iter()
        .map(|(i, err)| format!("{:?}: {err}", targets[*i].kind()))
        .collect();
    if timed_out {
        detail.push(format!(
            "{} still running at the {:?} deadline",
            targets.len() - confirmed.len() - failed.len(),
            policy.deadline
        ));
    }
    let removals: Vec<_> = confirmed
        .iter()
        .map(|&i| background.spawn(Arc::clone(&targets[i]).remove(job.spool.clone(), id.clone())))
        .collect();
    for (removal, &index) in removals.into_iter().zip(&confirmed) {
        let kind = targets[index].kind();
        match tokio::time::timeout(policy.deadline, removal).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(err))) => {
                tracing::error!(%id, ?kind, error = %err, "cannot take back a copy after a lost quorum")
            }
            Ok(Err(err)) => {
                tracing::error!(%id, ?kind, error = %err, "cannot take back a copy after a lost quorum")
            }
            Err(_) => {
                tracing::error!(%id, ?kind, "taking back a copy after a lost quorum is still running")
            }
        }
    }
    // A copy that failed may have written part of it; one that found the
    // message already there must not delete what it did not write.
    let leftovers: Vec<Arc<dyn CopyTarget>> = failed
        .iter()
        .filter(|(_, err)| !err.is_already_exists())
        .map(|(i, _)| Arc::clone(&targets[*i]))
        .collect();
    let kinds = targets.to_vec();
    let cleanup_id = id.clone();
    let spool = job.spool.clone();
    background.spawn(async move {
        let id = cleanup_id;
        for target in leftovers {
            if let Err(err) = target.remove(spool.clone(), id.clone()).await {
                tracing::warn!(%id, error = %err, "cannot remove a partial copy");
            }
        }
        while let Some((index, outcome)) = running.next().await {
            if matches!(&outcome, Ok(Err(err)) if err.is_already_exists()) {
                continue;
            }
            let target = Arc::clone(&kinds[index]);
            let kind = target.kind();
            if let Err(err) = target.remove(spool.clone(), id.clone()).await {
                tracing::error!(%id, ?kind, error = %err, "cannot take back a late copy after a lost quorum");
            }
        }
        if let Some(finally) = finally {
            finally();
        }
    });
    Err(SpoolError::QuorumFailed {
        confirmed: confirmed_in_time,
        required: policy.required,
        detail: detail.join("; "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::sync::Notify;

    /// How a fake copy behaves.
    #[derive(Clone)]
    enum Behaviour {
        Succeed,
        Fail,
        /// Waits for the notify, then succeeds.
        Gate(Arc<Notify>),
        Hang,
        /// Finds the message already there.
        Exists,
    }

    struct Fake {
        kind: CopyKind,
        behaviour: Behaviour,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl CopyTarget for Fake {
        fn kind(&self) -> CopyKind {
            self.kind
        }
        fn write(self: Arc<Self>, job: Arc<CopyJob>) -> BoxFuture<'static, Result<(), CopyError>> {
            Box::pin(async move {
                match &self.behaviour {
                    Behaviour::Succeed => {}
                    Behaviour::Fail => return Err(std::io::Error::other("disk on fire").into()),
                    Behaviour::Gate(gate) => gate.notified().await,
                    Behaviour::Hang => std::future::pending::<()>().await,
                    Behaviour::Exists => {
                        return Err(CopyError::AlreadyExists {
                            key: job.id.clone(),
                        })
                    }
                }
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("wrote {:?} {}", self.kind, job.id));
                Ok(())
            })
        }
        fn remove(
            self: Arc<Self>,
            _spool: String,
            id: String,
        ) -> BoxFuture<'static, Result<(), CopyError>> {
            Box::pin(async move {
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("removed {:?} {id}", self.kind));
                Ok(())
            })
        }
    }

    struct Harness {
        targets: Vec<Arc<dyn CopyTarget>>,
        log: Arc<Mutex<Vec<String>>>,
        background: Background,
        job: Arc<CopyJob>,
        _dir: tempfile::TempDir,
    }

    fn harness(behaviours: &[(CopyKind, Behaviour)]) -> Harness {
        let log = Arc::new(Mutex::new(Vec::new()));
        let targets = behaviours
            .iter()
            .map(|(kind, behaviour)| {
                Arc::new(Fake {
                    kind: *kind,
                    behaviour: behaviour.clone(),
                    log: Arc::clone(&log),
                }) as Arc<dyn CopyTarget>
            })
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let data_path = dir.path().join("X.msg");
        let job = Arc::new(CopyJob {
            spool: String::new(),
            id: "X".into(),
            data_file: Arc::new(std::fs::File::create(&data_path).unwrap()),
            data_path,
            data_len: 0,
            envelope_json: Bytes::from_static(b"{}"),
        });
        Harness {
            targets,
            log,
            background: Background::default(),
            job,
            _dir: dir,
        }
    }

    fn policy(required: usize) -> Policy {
        Policy {
            required,
            deadline: Duration::from_secs(3),
        }
    }

    fn log_of(h: &Harness) -> Vec<String> {
        let mut log = h.log.lock().unwrap().clone();
        log.sort();
        log
    }

    #[tokio::test(start_paused = true)]
    async fn returns_at_quorum_and_finishes_the_rest_in_the_background() {
        let gate = Arc::new(Notify::new());
        let h = harness(&[
            (CopyKind::Local, Behaviour::Succeed),
            (CopyKind::ObjectStore, Behaviour::Gate(Arc::clone(&gate))),
        ]);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let finally: Box<dyn FnOnce() + Send> = Box::new(move || {
            let _ = done_tx.send(());
        });
        let latency = Arc::new(CopyLatency::default());
        let committed = commit(
            &h.targets,
            Arc::clone(&h.job),
            policy(1),
            &h.background,
            Some(finally),
            Some(Arc::clone(&latency)),
        )
        .await
        .unwrap();
        assert_eq!(committed.confirmed, vec![CopyKind::Local]);
        assert_eq!(log_of(&h), vec!["wrote Local X"]);
        gate.notify_one();
        done_rx.await.unwrap();
        h.background.idle().await;
        assert_eq!(log_of(&h), vec!["wrote Local X", "wrote ObjectStore X"]);
        // Both copies timed, the one that confirmed after the quorum too.
        let mut text = String::new();
        latency.render(&mut text);
        for kind in ["local", "object_store"] {
            let line = format!("postern_copy_latency_seconds_count{{copy=\"{kind}\"}} 1\n");
            assert!(text.contains(&line), "{line} in {text}");
        }
        assert!(text.contains("postern_copy_latency_seconds_count{copy=\"peer\"} 0\n"));
    }

    #[tokio::test(start_paused = true)]
    async fn waits_for_every_required_copy() {
        let h = harness(&[
            (CopyKind::Local, Behaviour::Succeed),
            (CopyKind::ObjectStore, Behaviour::Succeed),
        ]);
        let committed = commit(
            &h.targets,
            Arc::clone(&h.job),
            policy(2),
            &h.background,
            None,
            None,
        )
        .await
        .unwrap();
        let mut kinds = committed.confirmed.clone();
        kinds.sort_by_key(|k| format!("{k:?}"));
        assert_eq!(kinds, vec![CopyKind::Local, CopyKind::ObjectStore]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_copy_fails_at_once_and_the_confirmed_one_is_taken_back() {
        let h = harness(&[
            (CopyKind::Local, Behaviour::Succeed),
            (CopyKind::ObjectStore, Behaviour::Fail),
        ]);
        let before = Instant::now();
        let err = commit(
            &h.targets,
            Arc::clone(&h.job),
            policy(2),
            &h.background,
            None,
            None,
        )
        .await
        .unwrap_err();
        // Impossible quorums are reported without waiting for the deadline.
        assert!(before.elapsed() < Duration::from_secs(1));
        match err {
            SpoolError::QuorumFailed {
                required, detail, ..
            } => {
                assert_eq!(required, 2);
                assert!(detail.contains("disk on fire"), "{detail}");
            }
            other => panic!("unexpected {other:?}"),
        }
        // The confirmed copy is removed before commit returns.
        assert!(log_of(&h).contains(&"removed Local X".to_string()));
        h.background.idle().await;
        assert!(log_of(&h).contains(&"removed ObjectStore X".to_string()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_fails_the_commit_and_a_late_copy_is_removed_when_it_lands() {
        let gate = Arc::new(Notify::new());
        let h = harness(&[
            (CopyKind::Local, Behaviour::Succeed),
            (CopyKind::ObjectStore, Behaviour::Gate(Arc::clone(&gate))),
        ]);
        let before = Instant::now();
        let err = commit(
            &h.targets,
            Arc::clone(&h.job),
            policy(2),
            &h.background,
            None,
            None,
        )
        .await
        .unwrap_err();
        assert_eq!(before.elapsed(), Duration::from_secs(3));
        assert!(
            matches!(err, SpoolError::QuorumFailed { ref detail, .. } if detail.contains("deadline")),
            "{err}"
        );
        assert_eq!(log_of(&h), vec!["removed Local X", "wrote Local X"]);
        gate.notify_one();
        h.background.idle().await;
        assert_eq!(
            log_of(&h),
            vec![
                "removed Local X",
                "removed ObjectStore X",
                "wrote Local X",
                "wrote ObjectStore X"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_hanging_copy_does_not_block_a_quorum_of_the_others() {
        let h = harness(&[
            (CopyKind::ObjectStore, Behaviour::Hang),
            (CopyKind::Local, Behaviour::Succeed),
        ]);
        let committed = commit(
            &h.targets,
            Arc::clone(&h.job),
            policy(1),
            &h.background,
            None,
            None,
        )
        .await
        .unwrap();
        assert_eq!(committed.confirmed, vec![CopyKind::Local]);
        assert_eq!(committed.quorum_time, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_copy_that_found_the_message_there_is_not_taken_back() {
        let h = harness(&[
            (CopyKind::Local, Behaviour::Succeed),
            (CopyKind::ObjectStore, Behaviour::Exists),
        ]);
        let err = commit(
            &h.targets,
            Arc::clone(&h.job),
            policy(2),
            &h.background,
            None,
            None,
        )
        .await
        .unwrap_err();
        assert!(
            matches!(
                err,
                SpoolError::QuorumFailed {
                    confirmed: 1,
                    required: 2,
                    ..
                }
            ),
            "{err}"
        );
        h.background.idle().await;
        assert_eq!(log_of(&h), vec!["removed Local X", "wrote Local X"]);
    }
}
