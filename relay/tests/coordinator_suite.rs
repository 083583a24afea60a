//! The conformance suite every `Coordinator` backend must pass: one function
//! per property, called by `coordinator_memory.rs` (SingleNode, paused time)
//! and `coordinator_etcd.rs` (a real etcd server, real time).
//!
//! Included with `#[path]`; compiled alone it has no tests.
#![allow(dead_code, async_fn_in_trait)]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use postern::cluster::{
    Change, Coordinator, Error, Event, EventStream, LeaseOptions, MemberId, Membership, Revision,
    SpoolId,
};
use tokio::time::{timeout, Instant};

/// One member's connection to the backend under test, and a switch that
/// partitions it (true) or heals it (false).
pub struct Node {
    pub coordinator: Arc<dyn Coordinator>,
    pub cut: Box<dyn Fn(bool) + Send + Sync>,
}

/// A backend under test: every `node` talks to the same service, in a
/// namespace no other test uses.
pub trait Backend {
    /// Lease timing for this backend.
    fn options(&self) -> LeaseOptions;
    /// How late after the TTL the service may notice an expiry.
    fn expiry_slack(&self) -> Duration;
    /// A new connection.
    async fn node(&self) -> Node;
}

pub fn member(name: &str) -> MemberId {
    MemberId::new(name).unwrap()
}

pub fn spool(name: &str) -> SpoolId {
    SpoolId::new(name).unwrap()
}

fn put(value: &str) -> Change {
    Change::Put(Bytes::from(value.to_owned()))
}

async fn join<B: Backend>(backend: &B, name: &str) -> (Membership, Node) {
    let node = backend.node().await;
    let membership = timeout(
        Duration::from_secs(30),
        Membership::join(
            Arc::clone(&node.coordinator),
            member(name),
            format!("{name}.test:2525"),
            backend.options(),
        ),
    )
    .await
    .expect("joining took more than 30 s")
    .unwrap();
    (membership, node)
}

/// A watch from the current revision.
async fn watch(coordinator: &dyn Coordinator) -> EventStream {
    let snapshot = coordinator.snapshot().await.unwrap();
    coordinator.watch(snapshot.revision).await.unwrap()
}

/// Waits (at most `limit`) for an event matching `wanted`, returning it.
async fn expect_event(
    events: &mut EventStream,
    limit: Duration,
    wanted: impl Fn(&Event) -> bool,
) -> (Revision, Event) {
    let deadline = Instant::now() + limit;
    loop {
        let item = tokio::time::timeout_at(deadline, events.next())
            .await
            .expect("expected event did not arrive in time")
            .expect("watch ended")
            .unwrap();
        if wanted(&item.1) {
            return item;
        }
    }
}

async fn load(coordinator: &dyn Coordinator, spool: &SpoolId, key: &str) -> Option<Bytes> {
    coordinator
        .load(spool, key)
        .await
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// Of many relays racing to claim one spool, exactly one wins, and every
/// loser learns who did.
pub async fn racing_claims_have_one_winner<B: Backend>(backend: &B) {
    let mut relays = Vec::new();
    for i in 0..6 {
        relays.push(join(backend, &format!("racer-{i}")).await.0);
    }
    let dead = spool("dead-relay");
    let results = futures::future::join_all(relays.iter().map(|relay| relay.claim(&dead))).await;
    let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let winner = winners[0];
    for result in &results {
        match result {
            Ok(_) => {}
            Err(Error::Claimed { holder, token, .. }) => {
                assert_eq!(*holder, winner.holder);
                assert_eq!(*token, winner.token);
            }
            Err(other) => panic!("unexpected: {other:?}"),
        }
    }
}

/// Claiming again under the same lease returns the same claim (a lost reply
/// is harmless); each new claim of a spool has a larger token.
pub async fn claims_are_idempotent_and_tokens_grow<B: Backend>(backend: &B) {
    let (a, _) = join(backend, "a").await;
    let x = spool("x");
    let first = a.claim(&x).await.unwrap();
    assert_eq!(a.claim(&x).await.unwrap(), first);
    a.release(&first).await.unwrap();
    let second = a.claim(&x).await.unwrap();
    assert!(second.token > first.token);
}

/// After a newer claim, a commit (or check, release, retire) with the old
/// token fails with `Fenced` and changes nothing.
pub async fn stale_token_is_fenced<B: Backend>(backend: &B) {
    let (a, node_a) = join(backend, "a").await;
    let (b, _) = join(backend, "b").await;
    let x = spool("x");
    let old = a.claim(&x).await.unwrap();
    a.commit(&old, "msg-1", put("a was here")).await.unwrap();
    // A's lease ends (as if it expired), B claims.
    let lease = a.status().lease.unwrap();
    drop(a);
    node_a.coordinator.revoke(lease).await.unwrap();
    let new = b.claim(&x).await.unwrap();
    assert!(new.token > old.token);

    let stale = node_a.coordinator.as_ref();
    let fenced = |result: Result<(), Error>| match result {
        Err(Error::Fenced { token, current, .. }) => {
            assert_eq!(token, old.token);
            assert_eq!(current, Some(new.token));
        }
        other => panic!("expected Fenced, got {other:?}"),
    };
    fenced(stale.commit(&old, "msg-1", put("late")).await.map(drop));
    fenced(stale.commit(&old, "msg-1", Change::Delete).await.map(drop));
    fenced(stale.check(&old).await);
    fenced(stale.release(&old).await);
    fenced(stale.retire(&old).await);
    assert_eq!(
        load(stale, &x, "msg-1").await.as_deref(),
        Some(&b"a was here"[..])
    );
    b.commit(&new, "msg-1", put("b delivered")).await.unwrap();
    b.check(&new).await.unwrap();
    assert_eq!(
        load(stale, &x, "msg-1").await.as_deref(),
        Some(&b"b delivered"[..])
    );
    // A spool nobody holds fences too.
    b.release(&new).await.unwrap();
    match stale.commit(&new, "msg-1", put("x")).await {
        Err(Error::Fenced { current: None, .. }) => {}
        other => panic!("expected Fenced with no holder, got {other:?}"),
    }
}

/// `commit_many` applies every change (one transaction) under a current claim,
/// and none under a stale one (the batch is fenced as a whole).
pub async fn batched_commits_are_one_revision_and_fenced_whole<B: Backend>(backend: &B) {
    let (a, node_a) = join(backend, "a").await;
    let (b, _) = join(backend, "b").await;
    let x = spool("x");
    let old = a.claim(&x).await.unwrap();
    a.commit(&old, "m0", put("pending")).await.unwrap();
    let batch: Vec<(String, Change)> = (1..=50)
        .map(|n| (format!("m{n}"), put("delivered")))
        .chain([("m0".to_owned(), Change::Delete)])
        .collect();
    let before = node_a.coordinator.snapshot().await.unwrap().revision;
    let revision = a.commit_many(&old, &batch).await.unwrap();
    // (Other tests share the etcd server, so later revisions may be theirs.)
    assert!(revision > before, "{revision:?} after {before:?}");
    let all = node_a.coordinator.load(&x, "").await.unwrap();
    assert_eq!(all.len(), 50);
    assert!(all
        .iter()
        .all(|(k, v)| k != "m0" && v == &Bytes::from("delivered")));

    let lease = a.status().lease.unwrap();
    drop(a);
    node_a.coordinator.revoke(lease).await.unwrap();
    let new = b.claim(&x).await.unwrap();
    let late: Vec<(String, Change)> = vec![
        ("m1".to_owned(), Change::Delete),
        ("m99".to_owned(), put("late")),
    ];
    match node_a.coordinator.commit_many(&old, &late).await {
        Err(Error::Fenced { current, .. }) => assert_eq!(current, Some(new.token)),
        other => panic!("expected Fenced, got {other:?}"),
    }
    let all = node_a.coordinator.load(&x, "").await.unwrap();
    assert_eq!(all.len(), 50, "a fenced batch changed something: {all:?}");
    // Invalid keys are refused before anything is sent.
    assert!(matches!(
        b.commit_many(&new, &[("has space".to_owned(), Change::Delete)])
            .await,
        Err(Error::InvalidName(_))
    ));
}

/// A member that stops renewing (crashed) disappears after its TTL, not
/// before; another member's watch sees it leave and its claims released.
pub async fn lease_expiry_is_seen_by_watchers<B: Backend>(backend: &B) {
    let options = backend.options();
    let (a, _) = join(backend, "a").await;
    let (b, _) = join(backend, "b").await;
    a.claim(&spool("a")).await.unwrap();
    let mut events = watch(b.coordinator().as_ref()).await;
    let crashed_at = Instant::now();
    drop(a); // stops renewing; no revoke
    let limit = options.ttl + backend.expiry_slack();
    // The member key and the claim go at one revision, in no set order.
    let released = Event::Released {
        spool: spool("a"),
        retired: false,
    };
    let (first_rev, first) = expect_event(&mut events, limit, |e| {
        *e == Event::Left(member("a")) || *e == released
    })
    .await;
    let elapsed = crashed_at.elapsed();
    // The last renewal was sent at most `renew_every` before the crash.
    assert!(
        elapsed + options.renew_every >= options.ttl,
        "expired after {elapsed:?}, TTL {:?}",
        options.ttl
    );
    let other = if first == released {
        Event::Left(member("a"))
    } else {
        released
    };
    let (second_rev, _) = expect_event(&mut events, Duration::from_secs(1), |e| *e == other).await;
    assert_eq!(first_rev, second_rev, "member key and claims go at once");
    let snapshot = b.coordinator().snapshot().await.unwrap();
    let members: Vec<_> = snapshot.members.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(members, ["b"]);
    assert_eq!(snapshot.orphans().collect::<Vec<_>>(), [&spool("a")]);
}

/// Release (and leave, on drain) makes claims available at once.
pub async fn release_frees_the_claim_at_once<B: Backend>(backend: &B) {
    let (a, _) = join(backend, "a").await;
    let (b, _) = join(backend, "b").await;
    let x = spool("x");
    let held = a.claim(&x).await.unwrap();
    assert!(matches!(b.claim(&x).await, Err(Error::Claimed { .. })));
    let mut events = watch(b.coordinator().as_ref()).await;
    a.release(&held).await.unwrap();
    expect_event(&mut events, Duration::from_secs(1), |e| {
        *e == Event::Released {
            spool: x.clone(),
            retired: false,
        }
    })
    .await;
    let taken = b.claim(&x).await.unwrap();
    assert!(taken.token > held.token);

    // Leaving revokes the lease: member key and all claims, immediately.
    let y = spool("y");
    a.claim(&y).await.unwrap();
    let started = Instant::now();
    a.leave().await.unwrap();
    expect_event(&mut events, Duration::from_secs(1), |e| {
        *e == Event::Left(member("a"))
    })
    .await;
    b.claim(&y).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
}

/// A relay that cannot renew (partitioned from the service) reports unsafe
/// while its lease still exists, refuses to commit, and after healing is
/// safe again under a new lease whose epoch shows its old claims are gone.
pub async fn unrenewable_lease_is_unsafe_before_expiry<B: Backend>(backend: &B) {
    let options = backend.options();
    let (a, node_a) = join(backend, "a").await;
    let (b, _) = join(backend, "b").await;
    let x = spool("x");
    let claim = a.claim(&x).await.unwrap();
    let mut events = watch(b.coordinator().as_ref()).await;
    let mut safety = a.safety();

    let cut_at = Instant::now();
    (node_a.cut)(true);
    timeout(options.ttl, safety.wait_unsafe())
        .await
        .expect("still safe a TTL after the cut");
    let unsafe_after = cut_at.elapsed();
    // Due at most TTL - margin after the cut (the last renewal went out
    // before it); half the margin is left for a busy scheduler.
    assert!(
        unsafe_after <= options.ttl - options.margin / 2,
        "unsafe only {unsafe_after:?} after the cut"
    );
    // The lease still exists at that moment.
    let snapshot = b.coordinator().snapshot().await.unwrap();
    assert!(
        snapshot.members.iter().any(|m| m.id == member("a")),
        "A's lease expired before A knew it was unsafe"
    );
    assert!(matches!(
        a.commit(&claim, "m", put("no")).await,
        Err(Error::Unsafe)
    ));
    assert!(matches!(a.claim(&spool("z")).await, Err(Error::Unsafe)));

    expect_event(&mut events, options.ttl + backend.expiry_slack(), |e| {
        *e == Event::Left(member("a"))
    })
    .await;
    assert!(cut_at.elapsed() > unsafe_after);

    (node_a.cut)(false);
    let status = timeout(Duration::from_secs(30), safety.wait_safe())
        .await
        .expect("not safe again after healing");
    assert_eq!(status.epoch, 2, "a new lease after the old one expired");
    assert!(matches!(
        a.commit(&claim, "m", put("no")).await,
        Err(Error::Fenced { .. })
    ));
    expect_event(
        &mut events,
        Duration::from_secs(5),
        |e| matches!(e, Event::Joined(m) if m.id == member("a")),
    )
    .await;
    a.claim(&x).await.unwrap();
}

/// Snapshot lists live members (with what they advertise) and registered
/// spools with their holders; load returns what was committed, by prefix;
/// retire forgets the spool and its state.
pub async fn snapshot_commit_load_retire<B: Backend>(backend: &B) {
    let (a, _) = join(backend, "a").await;
    let (b, _) = join(backend, "b").await;
    let (x, y) = (spool("x"), spool("y"));
    let cx = a.claim(&x).await.unwrap();
    let cy = b.claim(&y).await.unwrap();
    a.commit(&cx, "0001", put("one")).await.unwrap();
    a.commit(&cx, "0002", put("two")).await.unwrap();
    a.commit(&cx, "0101", put("other")).await.unwrap();
    a.commit(&cx, "0002", Change::Delete).await.unwrap();
    let all = a.coordinator().load(&x, "").await.unwrap();
    let keys: Vec<_> = all.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(keys, ["0001", "0101"]);
    let some = a.coordinator().load(&x, "00").await.unwrap();
    assert_eq!(some, [("0001".to_owned(), Bytes::from("one"))]);
    assert!(a.coordinator().load(&y, "").await.unwrap().is_empty());

    let snapshot = a.coordinator().snapshot().await.unwrap();
    let members: HashSet<_> = snapshot
        .members
        .iter()
        .map(|m| (m.id.as_str(), m.info.as_str()))
        .collect();
    assert_eq!(
        members,
        HashSet::from([("a", "a.test:2525"), ("b", "b.test:2525")])
    );
    let holders: Vec<_> = snapshot
        .spools
        .iter()
        .map(|s| {
            let holder = s.holder.as_ref().unwrap();
            (s.spool.as_str(), holder.member.as_str(), holder.token)
        })
        .collect();
    assert_eq!(holders, [("x", "a", cx.token), ("y", "b", cy.token)]);

    let mut events = watch(a.coordinator().as_ref()).await;
    a.coordinator().retire(&cx).await.unwrap();
    expect_event(&mut events, Duration::from_secs(1), |e| {
        *e == Event::Released {
            spool: x.clone(),
            retired: true,
        }
    })
    .await;
    assert!(a.coordinator().load(&x, "").await.unwrap().is_empty());
    let snapshot = a.coordinator().snapshot().await.unwrap();
    let spools: Vec<_> = snapshot.spools.iter().map(|s| s.spool.as_str()).collect();
    assert_eq!(spools, ["y"]);
}

/// A watch resumed after a revision replays what happened since, in order.
pub async fn watch_resumes_after_a_revision<B: Backend>(backend: &B) {
    let (a, _) = join(backend, "a").await;
    let start = a.coordinator().snapshot().await.unwrap().revision;
    let c1 = a.claim(&spool("p")).await.unwrap();
    a.release(&c1).await.unwrap();
    let c2 = a.claim(&spool("q")).await.unwrap();
    let mut events = a.coordinator().watch(start).await.unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (revision, event) = timeout(Duration::from_secs(5), events.next())
            .await
            .expect("replay too slow")
            .unwrap()
            .unwrap();
        assert!(revision > start);
        seen.push(event);
    }
    assert_eq!(
        seen,
        [
            Event::Claimed {
                spool: spool("p"),
                holder: member("a"),
                token: c1.token
            },
            Event::Released {
                spool: spool("p"),
                retired: false
            },
            Event::Claimed {
                spool: spool("q"),
                holder: member("a"),
                token: c2.token
            },
        ]
    );
}
