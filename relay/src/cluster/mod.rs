//! Cluster coordination: membership leases, spool claims with fencing tokens,
//! and the watch that tells survivors when a spool has lost its owner
//! (DESIGN.md §3).
//!
//! # Pieces
//!
//! - [`Coordinator`]: the small trait a coordination service implements —
//!   leases, member keys, spool claims, token-conditional commits, one
//!   consistent snapshot and a watch. Two backends: [`memory::SingleNode`]
//!   (in-process; the embedded default, and the simulated network of the unit
//!   tests) and [`etcd::Etcd`].
//! - [`membership::Membership`]: the keep-alive loop shared by every backend.
//!   It holds the relay's lease, re-joins after losing it, and publishes
//!   [`membership::Safety`]: a relay considers itself unsafe `margin` before
//!   its lease could expire, counted from the *sending* of the last renewal
//!   that succeeded, so it stops delivering while the lease still exists.
//!
//! # Model
//!
//! A *spool* (named by a [`SpoolId`]) is a set of messages with one owner at a
//! time. The owner is whoever holds the spool's claim. A claim is bound to the
//! claimant's lease: when the lease ends (expiry, revoke on drain) every claim
//! under it disappears in the same atomic step as the member key, and the
//! spool is up for grabs. Claiming is create-if-absent, so of any number of
//! racing relays exactly one wins. The claim's creation revision is its
//! [`FencingToken`]; tokens of successive claims of one spool strictly grow,
//! and a commit made with a token that is no longer the current claim's fails
//! with [`Error::Fenced`], so an owner that was paused, partitioned or
//! presumed dead cannot overwrite the work of the one that took over.
//!
//! Claimed spools are also recorded in a persistent registry (not bound to a
//! lease) until their last owner [retires](Coordinator::retire) them; a
//! [`Snapshot`] lists registered spools without a claim, so orphans are found
//! again after a cold start of the whole cluster, not only by whoever saw the
//! lease expire.
//!
//! # How the relay uses it
//!
//! [`node::ClusterNode`] wires this into a running relay (see its module
//! docs): it joins with [`Membership`], accepts into a current spool per
//! lease epoch (`<member>.<stamp>`), claims it, follows
//! [`takeover::Orphans`], and implements the queue's `Ownership`: delivery
//! only while [`Safety::is_safe`](membership::Safety::is_safe) and the
//! spool's [`Claim`] is held, per-recipient state committed with
//! [`Membership::commit`](membership::Membership::commit) under the claim,
//! and [`Membership::revoke`](membership::Membership::revoke) on drain so
//! peers take the spools over at once.

pub mod etcd;
pub mod membership;
pub mod memory;
pub mod node;
pub mod state_commits;
pub mod takeover;

#[cfg(test)]
mod sim_tests;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

pub use membership::{LeaseOptions, LeaseStatus, LeaseTrouble, Membership, Safety};

/// Why a coordination request failed. Callers match on the variant; backends
/// map their private errors in.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spool is already claimed (by someone else, or by an earlier lease
    /// of the caller).
    #[error("spool {spool} is claimed by {holder} (token {token})")]
    Claimed {
        /// The spool.
        spool: SpoolId,
        /// Who holds it.
        holder: MemberId,
        /// The current claim's token.
        token: FencingToken,
    },
    /// The claim used is no longer the spool's current claim: it was released,
    /// its lease ended, or a newer claim exists. Nothing was written.
    #[error("fenced: token {token} on spool {spool} is stale (current: {current:?})")]
    Fenced {
        /// The spool.
        spool: SpoolId,
        /// The stale token that was presented.
        token: FencingToken,
        /// The current claim's token, if the spool is claimed.
        current: Option<FencingToken>,
    },
    /// The lease does not exist any more (expired or revoked).
    #[error("lease {0} has expired")]
    LeaseExpired(LeaseId),
    /// Refused locally: this relay cannot prove that its lease is alive.
    #[error("not safe: the lease is not known to be held")]
    Unsafe,
    /// A watch cannot resume at that revision (history compacted, or the
    /// watcher fell behind). Take a new snapshot.
    #[error("watch history compacted past revision {0}")]
    Compacted(Revision),
    /// A name that is not usable as a key.
    #[error("invalid name {0:?}: use 1-128 of [A-Za-z0-9._-]")]
    InvalidName(String),
    /// The service did not answer in time or the connection failed; the
    /// request may or may not have been applied.
    #[error("coordinator unavailable: {0}")]
    Unavailable(String),
    /// The service refused this relay's credentials (etcd: an unknown user
    /// or a wrong password, no user while authentication is on, or a user
    /// whose roles do not cover the prefix). Retrying does not help until
    /// the credentials or the roles change.
    #[error("coordinator refused access: {0}")]
    Unauthorized(String),
    /// The TLS session could not be set up: the service's certificate is not
    /// signed by the configured CA or does not name its host, or the service
    /// refused the client certificate (or its absence).
    #[error("TLS with the coordinator failed: {0}")]
    Tls(String),
    /// Any other backend failure.
    #[error("coordinator error: {0}")]
    Backend(String),
}

fn valid_name(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `name`: 1-128 characters of `[A-Za-z0-9._-]`, so it is
            /// safe in a key, a file name and an object path.
            pub fn new(name: impl Into<String>) -> Result<$name, Error> {
                let name = name.into();
                if valid_name(&name) {
                    Ok($name(name))
                } else {
                    Err(Error::InvalidName(name))
                }
            }

            /// The name.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<$name, Error> {
                $name::new(s)
            }
        }
    };
}

name_type!(
    /// A relay's name in the cluster.
    MemberId
);
name_type!(
    /// The name of a spool: the unit of ownership that is claimed and taken over.
    SpoolId
);

/// A lease as the backend numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A revision of the coordinator's store: every change gets the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Revision(pub u64);

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The fencing token of a claim: the revision that created it. A newer claim
/// of the same spool always has a larger token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FencingToken(pub u64);

impl fmt::Display for FencingToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Its id.
    pub id: LeaseId,
    /// The TTL the service granted (it may round up what was asked for).
    pub ttl: Duration,
}

/// A live member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name.
    pub id: MemberId,
    /// What it advertises (its peer and admin addresses, for example).
    pub info: String,
    /// The lease its key is bound to.
    pub lease: LeaseId,
}

/// A held claim: the right to change the spool's state while `token` is current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// The spool.
    pub spool: SpoolId,
    /// Who claimed it.
    pub holder: MemberId,
    /// The lease the claim is bound to.
    pub lease: LeaseId,
    /// Its fencing token.
    pub token: FencingToken,
}

/// Who holds a spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The holder.
    pub member: MemberId,
    /// Its claim's token.
    pub token: FencingToken,
}

/// A registered spool and its current claim, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolInfo {
    /// The spool.
    pub spool: SpoolId,
    /// Its holder; `None` means orphaned: it should be claimed.
    pub holder: Option<Holder>,
}

/// Members and spools at one revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The revision the snapshot is consistent at; watch after it.
    pub revision: Revision,
    /// Live members, by name.
    pub members: Vec<Member>,
    /// Registered spools, by name.
    pub spools: Vec<SpoolInfo>,
}

impl Snapshot {
    /// Registered spools that nobody holds.
    pub fn orphans(&self) -> impl Iterator<Item = &SpoolId> {
        self.spools
            .iter()
            .filter(|s| s.holder.is_none())
            .map(|s| &s.spool)
    }
}

/// A change seen by [`Coordinator::watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A member key appeared (a join, or a re-join with a new lease).
    Joined(Member),
    /// A member key disappeared: its lease expired or was revoked.
    Left(MemberId),
    /// A spool was claimed.
    Claimed {
        /// The spool.
        spool: SpoolId,
        /// The new holder.
        holder: MemberId,
        /// The new claim's token.
        token: FencingToken,
    },
    /// A spool's claim disappeared: released, or its holder's lease ended.
    Released {
        /// The spool.
        spool: SpoolId,
        /// The spool was retired at the same time (it is finished; do not
        /// claim it).
        retired: bool,
    },
}

/// A change to one state key under a claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Create or replace the value.
    Put(Bytes),
    /// Remove the key (absent is fine).
    Delete,
}

/// The stream [`Coordinator::watch`] returns.
pub type EventStream = BoxStream<'static, Result<(Revision, Event), Error>>;

/// A coordination service: leases, member keys, spool claims and fenced state.
///
/// Shaped like `object_store::ObjectStore`: few required methods, each one
/// request to the service, with the atomicity it guarantees written down.
/// Policy (when to renew, when to consider oneself unsafe, what to claim)
/// lives in [`Membership`] and [`takeover`], the same for every backend.
///
/// Guarantees every implementation gives (the conformance suite in
/// `relay/tests/coordinator_suite.rs` checks them):
///
/// - All methods are linearizable: a request that returned `Ok` is visible to
///   every request that starts after it, on any member.
/// - A lease ends either by [`revoke`](Self::revoke) or by the service
///   receiving no [`keep_alive`](Self::keep_alive) for its TTL. When it ends,
///   the member key and every claim bound to it are deleted in one atomic
///   step. A lease never ends earlier than its TTL after the service received
///   the last renewal, hence never earlier than a TTL after the member *sent*
///   it: the basis of [`Safety`].
/// - [`claim`](Self::claim) is atomic create-if-absent: of concurrent claims
///   of one spool exactly one succeeds. Fencing tokens of successive claims
///   of a spool strictly increase.
/// - [`commit`](Self::commit), [`release`](Self::release) and
///   [`retire`](Self::retire) compare the claim's token with the spool's
///   current claim and apply their change in the same atomic step, or fail
///   with [`Error::Fenced`] and change nothing.
/// - [`snapshot`](Self::snapshot) is consistent at one revision, and
///   [`watch`](Self::watch) delivers every membership and claim change after
///   a revision, in order, or fails with [`Error::Compacted`].
/// - [`Error::Unavailable`] leaves the outcome unknown; every method may be
///   retried ([`claim`](Self::claim) returns the caller's own claim again when
///   an earlier attempt under the same lease succeeded).
#[async_trait]
pub trait Coordinator: Send + Sync + fmt::Debug + 'static {
    /// Grants a new lease of at least `ttl` (backends may round up).
    async fn grant(&self, ttl: Duration) -> Result<Lease, Error>;

    /// Renews `lease` for another TTL, returned. Fails with
    /// [`Error::LeaseExpired`] when the lease no longer exists.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, Error>;

    /// Ends `lease` now, deleting its member key and claims atomically. A
    /// lease that already ended is not an error.
    async fn revoke(&self, lease: LeaseId) -> Result<(), Error>;

    /// Creates or replaces the member key of `member`, bound to `lease`.
    async fn register(&self, lease: LeaseId, member: &MemberId, info: &str) -> Result<(), Error>;

    /// Live members and registered spools at one revision.
    async fn snapshot(&self) -> Result<Snapshot, Error>;

    /// Every membership and claim change after revision `after`, in order.
    /// The stream ends with an error when the connection fails; resume with a
    /// new watch after the last revision seen (or a new snapshot on
    /// [`Error::Compacted`]).
    async fn watch(&self, after: Revision) -> Result<EventStream, Error>;

    /// Claims `spool` for `holder` under `lease` if nobody holds it, and
    /// registers the spool. Fails with [`Error::Claimed`] if someone does, and
    /// with [`Error::LeaseExpired`] if `lease` has ended.
    async fn claim(
        &self,
        lease: LeaseId,
        holder: &MemberId,
        spool: &SpoolId,
    ) -> Result<Claim, Error>;

    /// Succeeds iff `claim` is the spool's current claim at the time of the
    /// request. Not atomic with anything that follows: use
    /// [`commit`](Self::commit) for changes that must be fenced.
    async fn check(&self, claim: &Claim) -> Result<(), Error>;

    /// Applies `change` to the state key `key` of the claim's spool iff the
    /// claim is still current, atomically. Returns the revision of the change.
    async fn commit(&self, claim: &Claim, key: &str, change: Change) -> Result<Revision, Error>;

    /// Applies every change (each to its state key of the claim's spool, no
    /// key twice) iff the claim is still current: all of them atomically in
    /// one revision, or none. At most [`state_commits::MAX_CHANGES`].
    async fn commit_many(
        &self,
        claim: &Claim,
        changes: &[(String, Change)],
    ) -> Result<Revision, Error>;

    /// The committed state keys of `spool` that start with `prefix` (all of
    /// them for `""`), by key. Needs no claim: the new owner reads what the
    /// old one committed.
    async fn load(&self, spool: &SpoolId, prefix: &str) -> Result<Vec<(String, Bytes)>, Error>;

    /// Deletes the claim iff it is current, so another relay may claim the
    /// spool at once. The spool stays registered (it still holds messages).
    async fn release(&self, claim: &Claim) -> Result<(), Error>;

    /// The spool is finished: deletes the claim, the registration and all
    /// committed state of the spool, iff the claim is current.
    async fn retire(&self, claim: &Claim) -> Result<(), Error>;
}

/// Validates a state key: non-empty, printable ASCII without spaces.
fn valid_state_key(key: &str) -> Result<(), Error> {
    if !key.is_empty() && key.len() <= 256 && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(Error::InvalidName(key.to_owned()))
    }
}
