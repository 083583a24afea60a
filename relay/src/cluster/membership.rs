//! A relay's membership: the lease kept alive in the background, re-joining
//! after it is lost, and [`Safety`], the local judgement of whether the lease
//! is certainly still held.
//!
//! Safety is counted from the moment the last successful renewal was *sent*:
//! the service received it later, so the lease lives at least until
//! `sent + ttl`. The relay is safe until `sent + ttl - margin`, and unsafe
//! from then on until a renewal succeeds again, whatever the network does.
//! The check is a clock comparison ([`Safety::is_safe`]), so a relay that
//! wakes from SIGSTOP or a long pause is unsafe at once, before any task of
//! its own has run.
//!
//! The status also keeps the last [`LeaseTrouble`] (a failed or timed-out
//! request, or the service saying the lease is gone) until a grant or
//! renewal succeeds again, so the relay can say why it stopped delivering.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{Change, Claim, Coordinator, Error, LeaseId, MemberId, Revision, SpoolId};

/// Timing of the lease. [`LeaseOptions::new`] derives sensible values from the TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseOptions {
    /// The lease's time to live at the service.
    pub ttl: Duration,
    /// Time between the starts of two renewals.
    pub renew_every: Duration,
    /// How long before the lease could expire the relay stops considering
    /// itself safe: room for clock-rate differences and for work already
    /// under way when safety ends.
    pub margin: Duration,
    /// Longest wait for one request to the service.
    pub request_timeout: Duration,
    /// Wait between failed attempts to (re-)join.
    pub retry_every: Duration,
}

impl LeaseOptions {
    /// Renewals every TTL/5, each allowed TTL/5, unsafe TTL/4 before the
    /// lease could expire: three renewals in a row may fail before safety ends.
    pub fn new(ttl: Duration) -> LeaseOptions {
        LeaseOptions {
            ttl,
            renew_every: ttl / 5,
            margin: ttl / 4,
            request_timeout: ttl / 5,
            retry_every: ttl / 5,
        }
    }

    /// Checks that a renewal can succeed before safety ends.
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl.is_zero() || self.renew_every.is_zero() || self.request_timeout.is_zero() {
            return Err("lease ttl, renew_every and request_timeout must be positive".into());
        }
        if self.renew_every + self.request_timeout + self.margin >= self.ttl {
            return Err(format!(
                "renew_every ({:?}) + request_timeout ({:?}) + margin ({:?}) must be less than the ttl ({:?})",
                self.renew_every, self.request_timeout, self.margin, self.ttl
            ));
        }
        Ok(())
    }
}

/// What the membership knows about its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseStatus {
    /// Incremented each time a new lease is granted (0: never joined). Claims
    /// made under an earlier epoch are gone.
    pub epoch: u64,
    /// The lease held or being renewed, if any.
    pub lease: Option<LeaseId>,
    /// Until when the lease is certainly alive; `None` once that has passed or
    /// the lease is known lost.
    pub safe_until: Option<Instant>,
    /// What went wrong since the last successful grant or renewal, if anything.
    pub trouble: Option<LeaseTrouble>,
}

/// Why the lease could not be granted or renewed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseTrouble {
    /// A request failed or got no answer in time: the service is down,
    /// stopped, partitioned away or refusing. Says which request and why.
    Unreachable(String),
    /// The service answered that the lease no longer exists (it expired
    /// before a renewal reached it); a new one is being granted.
    Expired,
}

impl LeaseStatus {
    /// Whether the lease is certainly alive now.
    pub fn is_safe(&self) -> bool {
        self.safe_until.is_some_and(|until| Instant::now() < until)
    }
}

/// A cheap, cloneable view of the membership's safety for delivery workers.
#[derive(Debug, Clone)]
pub struct Safety {
    rx: watch::Receiver<LeaseStatus>,
}

impl Safety {
    /// Whether this relay may deliver and commit now (no I/O).
    pub fn is_safe(&self) -> bool {
        self.rx.borrow().is_safe()
    }

    /// The current status.
    pub fn status(&self) -> LeaseStatus {
        self.rx.borrow().clone()
    }

    /// Waits until the relay is safe and returns the status then. Never
    /// returns after the membership has left.
    pub async fn wait_safe(&mut self) -> LeaseStatus {
        loop {
            {
                let status = self.rx.borrow_and_update();
                if status.is_safe() {
                    return status.clone();
                }
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits until the relay is no longer safe (returns at once if it is not).
    /// Hold it next to a delivery to abandon the delivery when safety ends.
    pub async fn wait_unsafe(&mut self) {
        loop {
            let until = {
                let status = self.rx.borrow_and_update();
                match status.safe_until {
                    Some(until) if Instant::now() < until => until,
                    _ => return,
                }
            };
            tokio::select! {
                () = tokio::time::sleep_until(until) => {}
                changed = self.rx.changed() => if changed.is_err() { return },
            }
        }
    }
}

/// A relay's membership of the cluster. Dropping it stops renewing (the
/// lease then expires as after a crash); [`leave`](Membership::leave) hands
/// everything over at once.
#[derive(Debug)]
pub struct Membership {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    coordinator: Arc<dyn Coordinator>,
    id: MemberId,
    info: String,
    options: LeaseOptions,
    status: watch::Sender<LeaseStatus>,
}

impl Drop for Membership {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Membership {
    /// Starts joining in the background and returns at once (unsafe until
    /// the first lease is granted). Needs a Tokio runtime.
    pub fn start(
        coordinator: Arc<dyn Coordinator>,
        id: MemberId,
        info: impl Into<String>,
        options: LeaseOptions,
    ) -> Result<Membership, Error> {
        options.validate().map_err(Error::Backend)?;
        let (status, _) = watch::channel(LeaseStatus {
            epoch: 0,
            lease: None,
            safe_until: None,
            trouble: None,
        });
        let shared = Arc::new(Shared {
            coordinator,
            id,
            info: info.into(),
            options,
            status,
        });
        let renewer = tokio::spawn(renew(Arc::clone(&shared)));
        let watchdog = tokio::spawn(watchdog(Arc::clone(&shared)));
        Ok(Membership {
            shared,
            tasks: vec![renewer, watchdog],
        })
    }

    /// [`start`](Membership::start), then waits until the lease is held
    /// (for ever while the service is unreachable: callers bound it).
    pub async fn join(
        coordinator: Arc<dyn Coordinator>,
        id: MemberId,
        info: impl Into<String>,
        options: LeaseOptions,
    ) -> Result<Membership, Error> {
        let membership = Membership::start(coordinator, id, info, options)?;
        membership.safety().wait_safe().await;
        Ok(membership)
    }

    /// This relay's name.
    pub fn id(&self) -> &MemberId {
        &self.shared.id
    }

    /// The backend.
    pub fn coordinator(&self) -> &Arc<dyn Coordinator> {
        &self.shared.coordinator
    }

    /// The lease timing.
    pub fn options(&self) -> &LeaseOptions {
        &self.shared.options
    }

    /// A view of the safety for workers.
    pub fn safety(&self) -> Safety {
        Safety {
            rx: self.shared.status.subscribe(),
        }
    }

    /// The current status.
    pub fn status(&self) -> LeaseStatus {
        self.shared.status.borrow().clone()
    }

    /// Whether the lease is certainly held now.
    pub fn is_safe(&self) -> bool {
        self.shared.status.borrow().is_safe()
    }

    /// The current lease, if safe.
    fn safe_lease(&self) -> Result<LeaseId, Error> {
        let status = self.shared.status.borrow();
        match status.lease {
            Some(lease) if status.is_safe() => Ok(lease),
            _ => Err(Error::Unsafe),
        }
    }

    /// Claims `spool` under the current lease ([`Coordinator::claim`]);
    /// refused with [`Error::Unsafe`] while unsafe.
    pub async fn claim(&self, spool: &SpoolId) -> Result<Claim, Error> {
        let lease = self.safe_lease()?;
        self.shared
            .coordinator
            .claim(lease, &self.shared.id, spool)
            .await
    }

    /// Commits a state change under `claim`: refused locally with
    /// [`Error::Unsafe`] while unsafe, and by the service with
    /// [`Error::Fenced`] when the claim is no longer current.
    pub async fn commit(
        &self,
        claim: &Claim,
        key: &str,
        change: Change,
    ) -> Result<Revision, Error> {
        self.safe_lease()?;
        self.shared.coordinator.commit(claim, key, change).await
    }

    /// [`Coordinator::commit_many`] under this relay's lease.
    pub async fn commit_many(
        &self,
        claim: &Claim,
        changes: &[(String, Change)],
    ) -> Result<Revision, Error> {
        self.safe_lease()?;
        self.shared.coordinator.commit_many(claim, changes).await
    }

    /// Checks that the claim is current and this relay safe.
    pub async fn check(&self, claim: &Claim) -> Result<(), Error> {
        self.safe_lease()?;
        self.shared.coordinator.check(claim).await
    }

    /// Hands a spool over at once ([`Coordinator::release`]).
    pub async fn release(&self, claim: &Claim) -> Result<(), Error> {
        self.shared.coordinator.release(claim).await
    }

    /// Ends the membership: stops renewing, then revokes the lease, which
    /// deletes the member key and all its claims in one step (drain).
    pub async fn leave(self) -> Result<(), Error> {
        self.revoke().await
    }

    /// [`leave`](Membership::leave) through a shared reference: stops
    /// renewing and revokes the lease; the membership stays unsafe after.
    pub async fn revoke(&self) -> Result<(), Error> {
        for task in &self.tasks {
            task.abort();
        }
        let lease = self.shared.status.borrow().lease;
        self.shared.status.send_modify(|status| {
            status.lease = None;
            status.safe_until = None;
        });
        match lease {
            Some(lease) => self.shared.coordinator.revoke(lease).await,
            None => Ok(()),
        }
    }
}

/// `sent + ttl - margin`: until when a renewal sent at `sent` proves the lease.
fn safe_until(sent: Instant, ttl: Duration, margin: Duration) -> Option<Instant> {
    ttl.checked_sub(margin).map(|valid| sent + valid)
}

/// Records a successful grant or renewal sent at `sent`. Notifies watchers
/// only when something other than the deadline's extension changed.
fn renewed(shared: &Shared, sent: Instant, ttl: Duration) {
    let until = safe_until(sent, ttl, shared.options.margin);
    shared.status.send_if_modified(|status| {
        let was_safe = status.is_safe();
        // A reply to an older request never shortens a later one's deadline.
        if status.safe_until.is_none() || until > status.safe_until {
            status.safe_until = until;
        }
        status.trouble = None;
        was_safe != status.is_safe()
    });
}

/// Records what went wrong, without waking watchers (safety did not change).
fn troubled(shared: &Shared, trouble: LeaseTrouble) {
    shared.status.send_if_modified(|status| {
        status.trouble = Some(trouble);
        false
    });
}

/// Keeps the lease: join, renew every `renew_every`, re-join when lost.
async fn renew(shared: Arc<Shared>) {
    let options = shared.options;
    let coordinator = &shared.coordinator;
    loop {
        // Join: a new lease and the member key bound to it.
        let (lease, sent, ttl) = loop {
            let sent = Instant::now();
            let joined = tokio::time::timeout(options.request_timeout * 2, async {
                let lease = coordinator.grant(options.ttl).await?;
                coordinator
                    .register(lease.id, &shared.id, &shared.info)
                    .await?;
                Ok::<_, Error>(lease)
            })
            .await;
            match joined {
                Ok(Ok(lease)) => break (lease.id, sent, lease.ttl),
                Ok(Err(err)) => {
                    tracing::warn!(member = %shared.id, error = %err, "cannot join");
                    troubled(
                        &shared,
                        LeaseTrouble::Unreachable(format!("cannot join: {err}")),
                    );
                }
                Err(_) => {
                    tracing::warn!(member = %shared.id, "joining timed out");
                    troubled(
                        &shared,
                        LeaseTrouble::Unreachable(format!(
                            "joining got no answer within {:?}",
                            options.request_timeout * 2
                        )),
                    );
                }
            }
            tokio::time::sleep(options.retry_every).await;
        };
        shared.status.send_modify(|status| {
            status.epoch += 1;
            status.lease = Some(lease);
            status.safe_until = safe_until(sent, ttl, options.margin);
            status.trouble = None;
        });
        tracing::info!(member = %shared.id, %lease, epoch = shared.status.borrow().epoch, "holding lease");

        // Renew until the service says the lease is gone.
        let mut next = sent + options.renew_every;
        loop {
            tokio::time::sleep_until(next).await;
            let sent = Instant::now();
            next = sent + options.renew_every;
            match tokio::time::timeout(options.request_timeout, coordinator.keep_alive(lease)).await
            {
                Ok(Ok(ttl)) => renewed(&shared, sent, ttl),
                Ok(Err(Error::LeaseExpired(_))) => {
                    tracing::warn!(member = %shared.id, %lease, "lease lost; re-joining");
                    shared.status.send_modify(|status| {
                        status.lease = None;
                        status.safe_until = None;
                        status.trouble = Some(LeaseTrouble::Expired);
                    });
                    break;
                }
                Ok(Err(err)) => {
                    tracing::warn!(member = %shared.id, %lease, error = %err, "cannot renew");
                    troubled(
                        &shared,
                        LeaseTrouble::Unreachable(format!("cannot renew the lease: {err}")),
                    );
                }
                Err(_) => {
                    tracing::warn!(member = %shared.id, %lease, "renewal timed out");
                    troubled(
                        &shared,
                        LeaseTrouble::Unreachable(format!(
                            "renewing the lease got no answer within {:?}",
                            options.request_timeout
                        )),
                    );
                }
            }
        }
    }
}

/// Publishes the end of safety when its deadline passes without a renewal.
async fn watchdog(shared: Arc<Shared>) {
    let mut rx = shared.status.subscribe();
    loop {
        let until = rx.borrow_and_update().safe_until;
        match until {
            Some(until) => {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => {
                        shared.status.send_if_modified(|status| match status.safe_until {
                            Some(current) if current <= Instant::now() => {
                                status.safe_until = None;
                                tracing::warn!(member = %shared.id, "lease not renewed in time: unsafe");
                                true
                            }
                            _ => false,
                        });
                    }
                    changed = rx.changed() => if changed.is_err() { return },
                }
            }
            None => {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        }
    }
}
