//! Group commit of delivery-state changes: the changes to one spool's state
//! that arrive while a fenced transaction for that spool is in flight go
//! together in the next one, so the coordinator sees one write per batch
//! instead of one per change. The claim's token still fences every batch.
//!
//! A batch lingers: it is sent once [`Linger::enough`] waited-for changes
//! are in it, or [`Linger::window`] after the driver started on it, so a
//! relay delivering steadily sends one transaction per `enough` outcomes
//! rather than one per transaction's round trip.
//!
//! Changes nobody waits for ([`StateCommits::commit_later`]: forgetting the
//! state of a message whose copies are all gone) ride along with the next
//! batch, or go on their own once [`MAX_CHANGES`] of them wait or
//! [`LATER_EVERY`] has passed. One lost (the relay dies first, or the
//! transaction fails) leaves a key whose message no longer exists: a later
//! owner finds no copy of it, and retiring the spool removes it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use tokio::sync::oneshot;

use super::Change;

/// Most changes in one transaction (etcd refuses more than `--max-txn-ops`,
/// 128 by default).
pub const MAX_CHANGES: usize = 100;

/// How long a change nobody waits for may wait for company.
pub const LATER_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// When a batch stops waiting for company.
#[derive(Debug, Clone, Copy)]
pub struct Linger {
    /// Longest wait before a batch goes.
    pub window: std::time::Duration,
    /// Waited-for changes that send a batch at once (the most the queue
    /// lets wait, so nobody else can come).
    pub enough: usize,
}

impl Linger {
    /// No lingering: a batch goes as soon as its driver starts.
    pub const NONE: Linger = Linger {
        window: std::time::Duration::ZERO,
        enough: 1,
    };
}

/// Why a batch was not applied; every change in the batch gets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommitFailure {
    /// The claim is stale (or gone): the spool is no longer this relay's.
    #[error("spool {0} is no longer ours")]
    Lost(String),
    /// The coordinator could not apply it now.
    #[error("cannot commit now: {0}")]
    Unavailable(String),
}

/// Applies one batch of changes to `spool`'s state in one fenced transaction.
pub type Apply = Arc<
    dyn Fn(String, Vec<(String, Change)>) -> BoxFuture<'static, Result<(), CommitFailure>>
        + Send
        + Sync,
>;

type Waiter = oneshot::Sender<Result<(), CommitFailure>>;

/// Changes waiting for a spool's next transaction, in the order they came;
/// those without a waiter were asked for with `commit_later`.
#[derive(Default)]
struct Waiting {
    changes: Vec<(String, Change, Option<Waiter>)>,
    /// A task is sending this spool's batches.
    running: bool,
}

/// The group committer; one per relay.
pub struct StateCommits {
    apply: Apply,
    linger: Linger,
    /// Woken whenever a waited-for change arrives.
    arrived: tokio::sync::Notify,
    /// Per spool: what waits for the next transaction, and whether one is
    /// being sent.
    spools: Mutex<HashMap<String, Waiting>>,
}

impl std::fmt::Debug for StateCommits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCommits").finish_non_exhaustive()
    }
}

impl StateCommits {
    /// A committer that applies batches with `apply`, lingering as
    /// `linger` says; sends the changes nobody waits for every
    /// [`LATER_EVERY`] (needs a Tokio runtime).
    pub fn new(apply: Apply, linger: Linger) -> Arc<StateCommits> {
        let commits = Arc::new(StateCommits {
            apply,
            linger,
            arrived: tokio::sync::Notify::new(),
            spools: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&commits);
        tokio::spawn(async move {
            let start = tokio::time::Instant::now() + LATER_EVERY;
            let mut tick = tokio::time::interval_at(start, LATER_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(commits) = weak.upgrade() else {
                    return;
                };
                commits.send_later();
            }
        });
        commits
    }

    /// Queues `change` to state key `key` of `spool` without waiting: it
    /// goes with the spool's next transaction (see the module's notes).
    pub fn commit_later(self: &Arc<Self>, spool: &str, key: String, change: Change) {
        let lead = {
            let mut spools = self.spools.lock().unwrap_or_else(|e| e.into_inner());
            let waiting = spools.entry(spool.to_owned()).or_default();
            waiting.changes.push((key, change, None));
            let lead = !waiting.running && waiting.changes.len() >= MAX_CHANGES;
            waiting.running |= lead;
            lead
        };
        if lead {
            tokio::spawn(Arc::clone(self).drive(spool.to_owned()));
        }
    }

    /// Starts a transaction for every spool whose changes nobody waits for.
    fn send_later(self: &Arc<Self>) {
        let idle: Vec<String> = {
            let mut spools = self.spools.lock().unwrap_or_else(|e| e.into_inner());
            spools
                .iter_mut()
                .filter(|(_, waiting)| !waiting.running && !waiting.changes.is_empty())
                .map(|(spool, waiting)| {
                    waiting.running = true;
                    spool.clone()
                })
                .collect()
        };
        for spool in idle {
            tokio::spawn(Arc::clone(self).drive(spool));
        }
    }

    /// Applies `change` to state key `key` of `spool`; returns once the
    /// transaction that carried it was applied (or failed).
    pub async fn commit(
        self: &Arc<Self>,
        spool: &str,
        key: String,
        change: Change,
    ) -> Result<(), CommitFailure> {
        let (done, result) = oneshot::channel();
        let lead = {
            let mut spools = self.spools.lock().unwrap_or_else(|e| e.into_inner());
            let waiting = spools.entry(spool.to_owned()).or_default();
            // With a transaction in flight this joins the next one.
            waiting.changes.push((key, change, Some(done)));
            !std::mem::replace(&mut waiting.running, true)
        };
        self.arrived.notify_waiters();
        if lead {
            // Its own task, so a caller that goes away cannot strand the others.
            tokio::spawn(Arc::clone(self).drive(spool.to_owned()));
        }
        result
            .await
            .unwrap_or_else(|_| Err(CommitFailure::Unavailable("state commit task ended".into())))
    }

    /// Waits until `spool`'s next batch has enough waited-for changes, is
    /// full, or the linger window has passed.
    async fn linger(&self, spool: &str) {
        if self.linger.window.is_zero() {
            return;
        }
        let until = tokio::time::Instant::now() + self.linger.window;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let ready = {
                let spools = self.spools.lock().unwrap_or_else(|e| e.into_inner());
                spools.get(spool).is_none_or(|waiting| {
                    waiting.changes.len() >= MAX_CHANGES
                        || waiting
                            .changes
                            .iter()
                            .filter(|(_, _, done)| done.is_some())
                            .count()
                            >= self.linger.enough
                })
            };
            if ready || tokio::time::timeout_at(until, arrived).await.is_err() {
                return;
            }
        }
    }

    /// Sends `spool`'s waiting changes, a batch at a time, until none wait.
    async fn drive(self: Arc<Self>, spool: String) {
        loop {
            self.linger(&spool).await;
            let batch: Vec<(String, Change, Option<Waiter>)> = {
                let mut spools = self.spools.lock().unwrap_or_else(|e| e.into_inner());
                let Some(waiting) = spools.get_mut(&spool) else {
                    return;
                };
                if waiting.changes.is_empty() {
                    spools.remove(&spool);
                    return;
                }
                let take = waiting.changes.len().min(MAX_CHANGES);
                waiting.changes.drain(..take).collect()
            };
            // One change per key, the latest (a transaction may not name a
            // key twice); the callers' order is kept.
            let mut changes: Vec<(String, Change)> = Vec::with_capacity(batch.len());
            let mut index: HashMap<&str, usize> = HashMap::new();
            for (key, change, _) in &batch {
                match index.get(key.as_str()) {
                    Some(&at) => changes[at].1 = change.clone(),
                    None => {
                        index.insert(key, changes.len());
                        changes.push((key.clone(), change.clone()));
                    }
                }
            }
            let result = (self.apply)(spool.clone(), changes).await;
            if let Err(err) = &result {
                tracing::debug!(%spool, "state changes not committed: {err}");
            }
            for (_, _, done) in batch {
                if let Some(done) = done {
                    let _ = done.send(result.clone());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    type Seen = Arc<Mutex<Vec<(String, Vec<(String, Change)>)>>>;

    /// A committer whose first transaction waits for `release`; every
    /// transaction is recorded in `seen` and answered with `answer`.
    fn held_committer(
        answer: Result<(), CommitFailure>,
    ) -> (Arc<StateCommits>, Seen, oneshot::Sender<()>) {
        let seen: Seen = Arc::default();
        let (release, released) = oneshot::channel::<()>();
        let released = Arc::new(Mutex::new(Some(released)));
        let apply: Apply = {
            let seen = Arc::clone(&seen);
            Arc::new(move |spool, changes| {
                let first = seen.lock().unwrap().is_empty();
                seen.lock().unwrap().push((spool, changes));
                let gate = if first {
                    released.lock().unwrap().take()
                } else {
                    None
                };
                let answer = answer.clone();
                Box::pin(async move {
                    if let Some(gate) = gate {
                        let _ = gate.await;
                    }
                    answer
                })
            })
        };
        (StateCommits::new(apply, Linger::NONE), seen, release)
    }

    fn put(text: &'static str) -> Change {
        Change::Put(Bytes::from_static(text.as_bytes()))
    }

    #[tokio::test]
    async fn changes_arriving_during_a_transaction_share_the_next_one() {
        let (commits, seen, release) = held_committer(Ok(()));
        let first = tokio::spawn({
            let commits = Arc::clone(&commits);
            async move { commits.commit("s1", "m0".into(), put("a")).await }
        });
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        let mut later: Vec<_> = (1..=30)
            .map(|n| {
                let commits = Arc::clone(&commits);
                tokio::spawn(async move { commits.commit("s1", format!("m{n}"), put("b")).await })
            })
            .collect();
        // The same key twice in one batch: only the latest change is sent.
        later.push(tokio::spawn({
            let commits = Arc::clone(&commits);
            async move { commits.commit("s1", "m1".into(), Change::Delete).await }
        }));
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        first.await.unwrap().unwrap();
        for task in later {
            task.await.unwrap().unwrap();
        }
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.len(),
            2,
            "one transaction held, one for the 31 behind it"
        );
        assert_eq!(seen[1].1.len(), 30);
        assert_eq!(seen[1].1[0], ("m1".to_owned(), Change::Delete));
        let sent: usize = seen.iter().map(|(_, changes)| changes.len()).sum();
        assert_eq!(sent, 31, "32 changes asked for, m1 twice");
    }

    #[tokio::test]
    async fn spools_commit_independently_and_a_batch_is_bounded() {
        let (commits, seen, release) = held_committer(Ok(()));
        let held = tokio::spawn({
            let commits = Arc::clone(&commits);
            async move { commits.commit("s1", "m".into(), put("a")).await }
        });
        while seen.lock().unwrap().is_empty() {
            tokio::task::yield_now().await;
        }
        // Another spool is not held back by s1's transaction.
        commits.commit("s2", "m".into(), put("b")).await.unwrap();
        let behind: Vec<_> = (0..MAX_CHANGES + 5)
            .map(|n| {
                let commits = Arc::clone(&commits);
                tokio::spawn(async move { commits.commit("s1", format!("k{n}"), put("c")).await })
            })
            .collect();
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        release.send(()).unwrap();
        held.await.unwrap().unwrap();
        for task in behind {
            task.await.unwrap().unwrap();
        }
        let sizes: Vec<(String, usize)> = seen
            .lock()
            .unwrap()
            .iter()
            .map(|(spool, changes)| (spool.clone(), changes.len()))
            .collect();
        assert_eq!(
            sizes,
            vec![
                ("s1".to_owned(), 1),
                ("s2".to_owned(), 1),
                ("s1".to_owned(), MAX_CHANGES),
                ("s1".to_owned(), 5)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_nobody_waits_for_ride_along_or_go_after_a_while() {
        let (commits, seen, release) = held_committer(Ok(()));
        release.send(()).unwrap();
        commits.commit_later("s1", "gone1".into(), Change::Delete);
        commits.commit_later("s1", "gone2".into(), Change::Delete);
        tokio::task::yield_now().await;
        assert!(
            seen.lock().unwrap().is_empty(),
            "sent before anything needed it"
        );
        // A waited-for change takes them along, in order, in one transaction.
        commits.commit("s1", "m".into(), put("a")).await.unwrap();
        assert_eq!(
            seen.lock().unwrap().last().unwrap().1,
            vec![
                ("gone1".to_owned(), Change::Delete),
                ("gone2".to_owned(), Change::Delete),
                ("m".to_owned(), put("a"))
            ]
        );
        // Alone, they go within LATER_EVERY.
        commits.commit_later("s2", "gone3".into(), Change::Delete);
        tokio::time::sleep(LATER_EVERY * 2).await;
        assert_eq!(
            seen.lock().unwrap().last().unwrap(),
            &("s2".to_owned(), vec![("gone3".to_owned(), Change::Delete)])
        );
        // MAX_CHANGES of them go at once.
        let before = seen.lock().unwrap().len();
        for n in 0..MAX_CHANGES {
            commits.commit_later("s3", format!("k{n}"), Change::Delete);
        }
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(seen.lock().unwrap().len(), before + 1);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3);
        let sent: usize = seen.iter().map(|(_, changes)| changes.len()).sum();
        assert_eq!(sent, MAX_CHANGES + 4);
    }

    #[tokio::test]
    async fn a_fenced_batch_fails_every_change_in_it() {
        let (commits, _seen, release) = held_committer(Err(CommitFailure::Lost("s1".to_owned())));
        release.send(()).unwrap();
        let results = futures::future::join_all(
            (0..5).map(|n| commits.commit("s1", format!("m{n}"), Change::Delete)),
        )
        .await;
        assert!(results
            .iter()
            .all(|r| *r == Err(CommitFailure::Lost("s1".to_owned()))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_lingers_for_company_until_enough_or_the_window_ends() {
        let seen: Seen = Arc::default();
        let apply: Apply = {
            let seen = Arc::clone(&seen);
            Arc::new(move |spool, changes| {
                seen.lock().unwrap().push((spool, changes));
                Box::pin(async { Ok(()) })
            })
        };
        let window = std::time::Duration::from_millis(20);
        let commits = StateCommits::new(apply, Linger { window, enough: 4 });
        let spawn = |key: &str| {
            let (commits, key) = (Arc::clone(&commits), key.to_owned());
            tokio::spawn(async move { commits.commit("s1", key, put("a")).await })
        };
        // Three arrive within the window: nothing goes until it ends, then
        // all three go together.
        let started = tokio::time::Instant::now();
        let first: Vec<_> = ["a", "b", "c"].into_iter().map(spawn).collect();
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(
            seen.lock().unwrap().is_empty(),
            "sent before the window ended"
        );
        for task in first {
            task.await.unwrap().unwrap();
        }
        assert!(started.elapsed() >= window);
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert_eq!(seen.lock().unwrap()[0].1.len(), 3);
        // Four (enough) go at once, without waiting out the window.
        let started = tokio::time::Instant::now();
        let second: Vec<_> = ["d", "e", "f", "g"].into_iter().map(spawn).collect();
        for task in second {
            task.await.unwrap().unwrap();
        }
        assert!(started.elapsed() < window, "{:?}", started.elapsed());
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].1.len(), 4);
    }
}
