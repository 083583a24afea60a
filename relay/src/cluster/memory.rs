//! The in-process coordinator: [`SingleNode`], the embedded default on one
//! machine, and the simulated network of the cluster unit tests.
//!
//! A [`Store`] plays the coordination service: leases that expire on the
//! Tokio clock (so paused-time tests are exact), member keys, claims, a spool
//! registry and committed state, with etcd's semantics (one revision per
//! change, a lease's keys deleted in one step). Every [`SingleNode`] is one
//! member's connection to a store, through a [`Link`] a test can cut or make
//! lose replies. Nothing is durable: on one machine nobody takes over, so the
//! queue's local state files remain the record.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::{
    valid_state_key, Change, Claim, Coordinator, Error, Event, EventStream, FencingToken, Holder,
    Lease, LeaseId, Member, MemberId, Revision, Snapshot, SpoolId, SpoolInfo,
};

/// Watch events kept for watchers that resume at an older revision.
const HISTORY: usize = 4096;

/// How long a request waits on a cut link before it fails.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The shared in-memory service; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Store {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    /// Wakes the reaper when the set of lease deadlines changed.
    leases_changed: Arc<Notify>,
}

#[derive(Debug)]
struct LeaseEntry {
    ttl: Duration,
    expires: Instant,
}

#[derive(Debug)]
struct ClaimEntry {
    holder: MemberId,
    lease: LeaseId,
    token: FencingToken,
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    next_lease: i64,
    reaper_started: bool,
    leases: HashMap<LeaseId, LeaseEntry>,
    members: BTreeMap<MemberId, Member>,
    claims: BTreeMap<SpoolId, ClaimEntry>,
    spools: BTreeSet<SpoolId>,
    values: BTreeMap<(SpoolId, String), Bytes>,
    history: VecDeque<(Revision, Event)>,
    /// Events at or below this revision were dropped from `history`.
    compacted: u64,
    watchers: Vec<mpsc::UnboundedSender<(Revision, Event)>>,
}

impl State {
    fn next_revision(&mut self) -> Revision {
        self.revision += 1;
        Revision(self.revision)
    }

    fn emit(&mut self, revision: Revision, event: Event) {
        if self.history.len() == HISTORY {
            if let Some((old, _)) = self.history.pop_front() {
                self.compacted = old.0;
            }
        }
        self.history.push_back((revision, event.clone()));
        self.watchers
            .retain(|watcher| watcher.send((revision, event.clone())).is_ok());
    }

    /// Ends every lease whose deadline has passed, oldest first.
    fn expire(&mut self, now: Instant) {
        let mut due: Vec<(Instant, LeaseId)> = self
            .leases
            .iter()
            .filter(|(_, lease)| lease.expires <= now)
            .map(|(id, lease)| (lease.expires, *id))
            .collect();
        due.sort();
        for (_, id) in due {
            self.end_lease(id);
        }
    }

    /// Deletes the lease and everything bound to it at one revision.
    fn end_lease(&mut self, id: LeaseId) {
        if self.leases.remove(&id).is_none() {
            return;
        }
        let members: Vec<MemberId> = self
            .members
            .values()
            .filter(|m| m.lease == id)
            .map(|m| m.id.clone())
            .collect();
        let claims: Vec<SpoolId> = self
            .claims
            .iter()
            .filter(|(_, c)| c.lease == id)
            .map(|(s, _)| s.clone())
            .collect();
        if members.is_empty() && claims.is_empty() {
            return;
        }
        let revision = self.next_revision();
        for member in members {
            self.members.remove(&member);
            self.emit(revision, Event::Left(member));
        }
        for spool in claims {
            self.claims.remove(&spool);
            self.emit(
                revision,
                Event::Released {
                    spool,
                    retired: false,
                },
            );
        }
    }

    fn require_lease(&self, lease: LeaseId) -> Result<(), Error> {
        if self.leases.contains_key(&lease) {
            Ok(())
        } else {
            Err(Error::LeaseExpired(lease))
        }
    }

    /// Ok iff `claim` is the spool's current claim.
    fn current(&self, claim: &Claim) -> Result<(), Error> {
        let current = self.claims.get(&claim.spool).map(|c| c.token);
        if current == Some(claim.token) {
            Ok(())
        } else {
            Err(Error::Fenced {
                spool: claim.spool.clone(),
                token: claim.token,
                current,
            })
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.expires).min()
    }
}

impl Store {
    /// An empty store.
    pub fn new() -> Store {
        Store::default()
    }

    /// A member's connection to this store over a link that is always up.
    pub fn connect(&self) -> SingleNode {
        self.connect_via(Link::new())
    }

    /// A member's connection to this store over `link`.
    pub fn connect_via(&self, link: Link) -> SingleNode {
        SingleNode {
            store: self.clone(),
            link,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// Runs `f` on the state after expiring due leases.
    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.shared.state.lock().expect("store lock poisoned");
        state.expire(Instant::now());
        f(&mut state)
    }

    /// Starts the task that ends leases on time even when nobody calls in, so
    /// watchers learn of expiries. Needs a Tokio runtime (the first grant is
    /// made inside one).
    fn start_reaper(&self, state: &mut State) {
        if state.reaper_started {
            return;
        }
        state.reaper_started = true;
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        let wake = Arc::clone(&self.shared.leases_changed);
        tokio::spawn(async move {
            loop {
                let deadline = match weak.upgrade() {
                    Some(shared) => {
                        let mut state = shared.state.lock().expect("store lock poisoned");
                        state.expire(Instant::now());
                        state.next_deadline()
                    }
                    None => return,
                };
                match deadline {
                    Some(deadline) => {
                        tokio::select! {
                            () = tokio::time::sleep_until(deadline) => {}
                            () = wake.notified() => {}
                        }
                    }
                    None => wake.notified().await,
                }
            }
        });
    }
}

/// What a [`Link`] does to requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Requests and replies pass.
    Up,
    /// Requests do not arrive: they wait until the link is up again or the
    /// request timeout passes, then fail with [`Error::Unavailable`]; watch
    /// streams fail.
    Cut,
    /// Requests arrive and are applied, but their replies are lost: the
    /// caller sees [`Error::Unavailable`] after the change was made.
    DropReplies,
}

/// A switchable network link between one member and a [`Store`]; clones
/// share the switch.
#[derive(Debug, Clone)]
pub struct Link {
    state: Arc<watch::Sender<LinkState>>,
}

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

impl Link {
    /// A link that is up.
    pub fn new() -> Link {
        Link {
            state: Arc::new(watch::Sender::new(LinkState::Up)),
        }
    }

    /// Sets what the link does.
    pub fn set(&self, state: LinkState) {
        self.state.send_replace(state);
    }

    /// Partitions the member from the store.
    pub fn cut(&self) {
        self.set(LinkState::Cut);
    }

    /// Heals the link.
    pub fn restore(&self) {
        self.set(LinkState::Up);
    }

    /// What the link does now.
    pub fn state(&self) -> LinkState {
        *self.state.borrow()
    }
}

/// One member's connection to a [`Store`]: the in-process [`Coordinator`].
#[derive(Debug, Clone)]
pub struct SingleNode {
    store: Store,
    link: Link,
    request_timeout: Duration,
}

impl Default for SingleNode {
    fn default() -> Self {
        SingleNode::new()
    }
}

impl SingleNode {
    /// A coordinator with a private store: the embedded default.
    pub fn new() -> SingleNode {
        Store::new().connect()
    }

    /// How long a request waits on a cut link before failing.
    pub fn with_request_timeout(mut self, timeout: Duration) -> SingleNode {
        self.request_timeout = timeout;
        self
    }

    /// The store behind this connection.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The link this connection goes through.
    pub fn link(&self) -> &Link {
        &self.link
    }

    /// Carries one request over the link: waits out a cut (up to the request
    /// timeout), applies `f`, and loses the reply if the link says so.
    async fn request<T>(&self, f: impl FnOnce(&Store) -> Result<T, Error>) -> Result<T, Error> {
        let mut rx = self.link.state.subscribe();
        if *rx.borrow_and_update() == LinkState::Cut {
            let up = rx.wait_for(|s| *s != LinkState::Cut);
            match tokio::time::timeout(self.request_timeout, up).await {
                Ok(Ok(_)) => {}
                _ => return Err(Error::Unavailable("link cut".into())),
            }
        }
        let result = f(&self.store);
        if self.link.state() != LinkState::Up {
            return Err(Error::Unavailable("reply lost".into()));
        }
        result
    }
}

#[async_trait]
impl Coordinator for SingleNode {
    async fn grant(&self, ttl: Duration) -> Result<Lease, Error> {
        self.request(|store| {
            store.with(|state| {
                store.start_reaper(state);
                state.next_lease += 1;
                let id = LeaseId(state.next_lease);
                state.leases.insert(
                    id,
                    LeaseEntry {
                        ttl,
                        expires: Instant::now() + ttl,
                    },
                );
                store.shared.leases_changed.notify_one();
                Ok(Lease { id, ttl })
            })
        })
        .await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, Error> {
        self.request(|store| {
            store.with(|state| match state.leases.get_mut(&lease) {
                Some(entry) => {
                    entry.expires = Instant::now() + entry.ttl;
                    store.shared.leases_changed.notify_one();
                    Ok(entry.ttl)
                }
                None => Err(Error::LeaseExpired(lease)),
            })
        })
        .await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), Error> {
        self.request(|store| {
            store.with(|state| {
                state.end_lease(lease);
                Ok(())
            })
        })
        .await
    }

    async fn register(&self, lease: LeaseId, member: &MemberId, info: &str) -> Result<(), Error> {
        self.request(|store| {
            store.with(|state| {
                state.require_lease(lease)?;
                let revision = state.next_revision();
                let member = Member {
                    id: member.clone(),
                    info: info.to_owned(),
                    lease,
                };
                state.members.insert(member.id.clone(), member.clone());
                state.emit(revision, Event::Joined(member));
                Ok(())
            })
        })
        .await
    }

    async fn snapshot(&self) -> Result<Snapshot, Error> {
        self.request(|store| {
            store.with(|state| {
                Ok(Snapshot {
                    revision: Revision(state.revision),
                    members: state.members.values().cloned().collect(),
                    spools: state
                        .spools
                        .iter()
                        .map(|spool| SpoolInfo {
                            spool: spool.clone(),
                            holder: state.claims.get(spool).map(|c| Holder {
                                member: c.holder.clone(),
                                token: c.token,
                            }),
                        })
                        .collect(),
                })
            })
        })
        .await
    }

    async fn watch(&self, after: Revision) -> Result<EventStream, Error> {
        let rx = self
            .request(|store| {
                store.with(|state| {
                    if after.0 < state.compacted {
                        return Err(Error::Compacted(after));
                    }
                    let (tx, rx) = mpsc::unbounded_channel();
                    for (revision, event) in &state.history {
                        if *revision > after {
                            let _ = tx.send((*revision, event.clone()));
                        }
                    }
                    state.watchers.push(tx);
                    Ok(rx)
                })
            })
            .await?;
        let link = self.link.clone();
        let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        // Events stop at a cut: the stream fails, as a broken connection does.
        let stream = events
            .map(move |item| match link.state() {
                LinkState::Up => Ok(item),
                _ => Err(Error::Unavailable("link cut".into())),
            })
            .scan(false, |failed, item| {
                let next = if *failed { None } else { Some(item) };
                if matches!(next, Some(Err(_))) {
                    *failed = true;
                }
                futures::future::ready(next)
            });
        Ok(stream.boxed())
    }

    async fn claim(
        &self,
        lease: LeaseId,
        holder: &MemberId,
        spool: &SpoolId,
    ) -> Result<Claim, Error> {
        self.request(|store| {
            store.with(|state| {
                state.require_lease(lease)?;
                if let Some(current) = state.claims.get(spool) {
                    if current.holder == *holder && current.lease == lease {
                        return Ok(Claim {
                            spool: spool.clone(),
                            holder: holder.clone(),
                            lease,
                            token: current.token,
                        });
                    }
                    return Err(Error::Claimed {
                        spool: spool.clone(),
                        holder: current.holder.clone(),
                        token: current.token,
                    });
                }
                let revision = state.next_revision();
                let token = FencingToken(revision.0);
                state.claims.insert(
                    spool.clone(),
                    ClaimEntry {
                        holder: holder.clone(),
                        lease,
                        token,
                    },
                );
                state.spools.insert(spool.clone());
                state.emit(
                    revision,
                    Event::Claimed {
                        spool: spool.clone(),
                        holder: holder.clone(),
                        token,
                    },
                );
                Ok(Claim {
                    spool: spool.clone(),
                    holder: holder.clone(),
                    lease,
                    token,
                })
            })
        })
        .await
    }

    async fn check(&self, claim: &Claim) -> Result<(), Error> {
        self.request(|store| store.with(|state| state.current(claim)))
            .await
    }

    async fn commit(&self, claim: &Claim, key: &str, change: Change) -> Result<Revision, Error> {
        self.commit_many(claim, &[(key.to_owned(), change)]).await
    }

    async fn commit_many(
        &self,
        claim: &Claim,
        changes: &[(String, Change)],
    ) -> Result<Revision, Error> {
        for (key, _) in changes {
            valid_state_key(key)?;
        }
        let changes = changes.to_vec();
        self.request(|store| {
            store.with(|state| {
                state.current(claim)?;
                let revision = state.next_revision();
                for (key, change) in changes {
                    let key = (claim.spool.clone(), key);
                    match change {
                        Change::Put(value) => {
                            state.values.insert(key, value);
                        }
                        Change::Delete => {
                            state.values.remove(&key);
                        }
                    }
                }
                Ok(revision)
            })
        })
        .await
    }

    async fn load(&self, spool: &SpoolId, prefix: &str) -> Result<Vec<(String, Bytes)>, Error> {
        self.request(|store| {
            store.with(|state| {
                Ok(state
                    .values
                    .range((spool.clone(), prefix.to_owned())..)
                    .take_while(|((s, key), _)| s == spool && key.starts_with(prefix))
                    .map(|((_, key), value)| (key.clone(), value.clone()))
                    .collect())
            })
        })
        .await
    }

    async fn release(&self, claim: &Claim) -> Result<(), Error> {
        self.request(|store| {
            store.with(|state| {
                state.current(claim)?;
                let revision = state.next_revision();
                state.claims.remove(&claim.spool);
                state.emit(
                    revision,
                    Event::Released {
                        spool: claim.spool.clone(),
                        retired: false,
                    },
                );
                Ok(())
            })
        })
        .await
    }

    async fn retire(&self, claim: &Claim) -> Result<(), Error> {
        self.request(|store| {
            store.with(|state| {
                state.current(claim)?;
                let revision = state.next_revision();
                state.claims.remove(&claim.spool);
                state.spools.remove(&claim.spool);
                state.values.retain(|(spool, _), _| *spool != claim.spool);
                state.emit(
                    revision,
                    Event::Released {
                        spool: claim.spool.clone(),
                        retired: true,
                    },
                );
                Ok(())
            })
        })
        .await
    }
}
