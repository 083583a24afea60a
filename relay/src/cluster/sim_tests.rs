//! Deterministic tests of takeover and fencing: relays as [`Membership`]s on
//! one in-memory [`Store`], each behind a [`Link`] the test cuts, on paused
//! Tokio time, so every deadline is checked to the instant.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::memory::{Link, LinkState, Store};
use super::takeover::Orphans;
use super::{
    Change, Coordinator, Error, LeaseOptions, LeaseTrouble, MemberId, Membership, SpoolId,
};

const TTL: Duration = Duration::from_secs(10);

fn options() -> LeaseOptions {
    LeaseOptions::new(TTL)
}

fn member(name: &str) -> MemberId {
    MemberId::new(name).unwrap()
}

fn spool(name: &str) -> SpoolId {
    SpoolId::new(name).unwrap()
}

/// A relay on `store` behind its own link; requests wait out a cut for up to
/// `request_timeout`.
async fn relay(store: &Store, name: &str, request_timeout: Duration) -> (Arc<Membership>, Link) {
    let link = Link::new();
    let node = store
        .connect_via(link.clone())
        .with_request_timeout(request_timeout);
    let membership = Membership::join(Arc::new(node), member(name), name, options())
        .await
        .unwrap();
    (Arc::new(membership), link)
}

fn put(value: &str) -> Change {
    Change::Put(Bytes::from(value.to_owned()))
}

async fn value(coordinator: &dyn Coordinator, spool_id: &SpoolId, key: &str) -> Option<String> {
    coordinator
        .load(spool_id, key)
        .await
        .unwrap()
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| String::from_utf8(v.to_vec()).unwrap())
}

#[tokio::test(start_paused = true)]
async fn partitioned_owner_goes_unsafe_before_expiry_and_is_fenced_after_takeover() {
    let store = Store::new();
    let (a, link_a) = relay(&store, "a", Duration::from_secs(2)).await;
    let (b, _) = relay(&store, "b", Duration::from_secs(2)).await;
    let mut orphans = Orphans::start(Arc::clone(&b), Duration::from_secs(1));
    let spool_a = spool("a");
    let claim_a = a.claim(&spool_a).await.unwrap();
    a.commit(&claim_a, "m1", put("attempt 1 by a"))
        .await
        .unwrap();

    let cut_at = Instant::now();
    link_a.cut();
    a.safety().wait_unsafe().await;
    let unsafe_at = Instant::now();
    // A renewal was sent at most `renew_every` before the cut; safety ends
    // `margin` before the lease could expire.
    assert!(unsafe_at - cut_at <= TTL - options().margin);
    assert!(unsafe_at - cut_at > TTL - options().margin - options().renew_every);
    // The lease still exists: A stopped while it was still the owner.
    let snapshot = b.coordinator().snapshot().await.unwrap();
    assert!(snapshot.members.iter().any(|m| m.id == member("a")));
    assert_eq!(
        snapshot.spools[0].holder.as_ref().unwrap().member,
        member("a")
    );
    assert!(matches!(
        a.commit(&claim_a, "m1", put("late")).await,
        Err(Error::Unsafe)
    ));

    // The lease expires; B's orphan follower claims the spool.
    let claim_b = orphans.next().await.unwrap();
    let claimed_at = Instant::now();
    assert_eq!(claim_b.spool, spool_a);
    assert_eq!(claim_b.holder, member("b"));
    assert!(claim_b.token > claim_a.token);
    assert!(claimed_at - unsafe_at >= options().margin);
    assert_eq!(
        value(b.coordinator().as_ref(), &spool_a, "m1")
            .await
            .as_deref(),
        Some("attempt 1 by a")
    );
    b.commit(&claim_b, "m1", put("delivered by b"))
        .await
        .unwrap();

    // A's network heals: its old claim is refused by the store itself.
    link_a.restore();
    match a.coordinator().commit(&claim_a, "m1", put("late")).await {
        Err(Error::Fenced { token, current, .. }) => {
            assert_eq!(token, claim_a.token);
            assert_eq!(current, Some(claim_b.token));
        }
        other => panic!("stale commit: {other:?}"),
    }
    // A re-joins with a new lease (epoch 2) but the spool stays B's.
    let status = a.safety().wait_safe().await;
    assert_eq!(status.epoch, 2);
    assert!(matches!(
        a.commit(&claim_a, "m1", put("late")).await,
        Err(Error::Fenced { .. })
    ));
    match a.claim(&spool_a).await {
        Err(Error::Claimed { holder, token, .. }) => {
            assert_eq!(holder, member("b"));
            assert_eq!(token, claim_b.token);
        }
        other => panic!("reclaim: {other:?}"),
    }
    assert_eq!(
        value(a.coordinator().as_ref(), &spool_a, "m1")
            .await
            .as_deref(),
        Some("delivered by b")
    );
}

#[tokio::test(start_paused = true)]
async fn commit_sent_while_safe_but_delivered_after_takeover_is_refused() {
    let store = Store::new();
    // A's requests wait out the cut rather than fail: a slow network.
    let (a, link_a) = relay(&store, "a", Duration::from_secs(600)).await;
    let (b, _) = relay(&store, "b", Duration::from_secs(2)).await;
    let mut orphans = Orphans::start(Arc::clone(&b), Duration::from_secs(1));
    let spool_a = spool("a");
    let claim_a = a.claim(&spool_a).await.unwrap();

    link_a.cut();
    assert!(a.is_safe());
    let late = {
        let a = Arc::clone(&a);
        let claim_a = claim_a.clone();
        tokio::spawn(async move { a.commit(&claim_a, "m1", put("late")).await })
    };
    let claim_b = orphans.next().await.unwrap();
    link_a.restore();
    match late.await.unwrap() {
        Err(Error::Fenced { current, .. }) => assert_eq!(current, Some(claim_b.token)),
        other => panic!("late commit: {other:?}"),
    }
    assert_eq!(value(b.coordinator().as_ref(), &spool_a, "m1").await, None);
}

#[tokio::test(start_paused = true)]
async fn short_partition_keeps_lease_and_claims() {
    let store = Store::new();
    let (a, link_a) = relay(&store, "a", Duration::from_secs(2)).await;
    let spool_a = spool("a");
    let claim = a.claim(&spool_a).await.unwrap();
    link_a.cut();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        a.is_safe(),
        "three seconds without renewal is within the margin"
    );
    link_a.restore();
    tokio::time::sleep(options().renew_every * 2).await;
    let status = a.status();
    assert!(status.is_safe());
    assert_eq!(status.epoch, 1);
    a.commit(&claim, "m1", put("ok")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn unsafe_then_healed_before_expiry_regains_the_same_lease() {
    let store = Store::new();
    let (a, link_a) = relay(&store, "a", Duration::from_secs(1)).await;
    let claim = a.claim(&spool("a")).await.unwrap();
    let mut safety = a.safety();
    link_a.cut();
    safety.wait_unsafe().await;
    assert!(matches!(
        a.commit(&claim, "m1", put("no")).await,
        Err(Error::Unsafe)
    ));
    // Heal well before the lease can expire (margin after unsafe).
    tokio::time::sleep(options().margin / 4).await;
    link_a.restore();
    let status = safety.wait_safe().await;
    assert_eq!(status.epoch, 1, "same lease, not a re-join");
    a.commit(&claim, "m1", put("yes")).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn the_status_says_why_the_lease_is_not_held_until_it_is_again() {
    let store = Store::new();
    let (a, link_a) = relay(&store, "a", Duration::from_secs(1)).await;
    assert_eq!(a.status().trouble, None);
    let mut safety = a.safety();
    link_a.cut();
    safety.wait_unsafe().await;
    match a.status().trouble {
        Some(LeaseTrouble::Unreachable(why)) => {
            assert!(why.starts_with("cannot renew the lease"), "{why}")
        }
        other => panic!("trouble after a cut: {other:?}"),
    }
    // Cut past the TTL: the lease is gone at the store; on healing the
    // service says so, and a new lease clears the trouble.
    tokio::time::sleep(TTL).await;
    link_a.restore();
    let status = safety.wait_safe().await;
    assert_eq!(status.epoch, 2);
    assert_eq!(a.status().trouble, None);
}

#[tokio::test(start_paused = true)]
async fn safety_is_a_clock_comparison_so_a_paused_relay_is_unsafe_on_waking() {
    let store = Store::new();
    let (a, _link) = relay(&store, "a", Duration::from_secs(2)).await;
    let safety = a.safety();
    let until = a.status().safe_until.unwrap();
    // As after SIGSTOP: the clock jumps past the deadline before any of the
    // relay's tasks runs again.
    tokio::time::advance(until - Instant::now()).await;
    assert!(!safety.is_safe());
    assert!(!a.is_safe());
}

#[tokio::test(start_paused = true)]
async fn drain_hands_spools_over_without_waiting_for_the_ttl() {
    let store = Store::new();
    let (a, _) = relay(&store, "a", Duration::from_secs(2)).await;
    let (b, _) = relay(&store, "b", Duration::from_secs(2)).await;
    let spool_a = spool("a");
    let first = a.claim(&spool_a).await.unwrap();
    let mut orphans = Orphans::start(Arc::clone(&b), Duration::from_secs(1));
    // Let the follower take its snapshot first.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let left_at = Instant::now();
    Arc::into_inner(a).unwrap().leave().await.unwrap();
    let claim = orphans.next().await.unwrap();
    assert_eq!(Instant::now(), left_at, "handed over in no time");
    assert!(claim.token > first.token);
    let snapshot = b.coordinator().snapshot().await.unwrap();
    assert_eq!(
        snapshot.members.iter().map(|m| &m.id).collect::<Vec<_>>(),
        [&member("b")]
    );
}

#[tokio::test(start_paused = true)]
async fn orphan_found_by_a_relay_that_starts_after_the_owner_died() {
    let store = Store::new();
    let (a, _) = relay(&store, "a", Duration::from_secs(2)).await;
    a.claim(&spool("a")).await.unwrap();
    drop(a); // a crash: no renewals, no revoke
    tokio::time::sleep(TTL * 3).await;
    let (b, _) = relay(&store, "b", Duration::from_secs(2)).await;
    let mut orphans = Orphans::start(b, Duration::from_secs(1));
    assert_eq!(orphans.next().await.unwrap().spool, spool("a"));
}

#[tokio::test(start_paused = true)]
async fn claim_whose_reply_was_lost_is_returned_again() {
    let store = Store::new();
    let (a, link_a) = relay(&store, "a", Duration::from_secs(2)).await;
    link_a.set(LinkState::DropReplies);
    assert!(matches!(
        a.claim(&spool("x")).await,
        Err(Error::Unavailable(_))
    ));
    link_a.restore();
    let claim = a.claim(&spool("x")).await.unwrap();
    let again = a.claim(&spool("x")).await.unwrap();
    assert_eq!(claim, again);
}

#[tokio::test(start_paused = true)]
async fn retired_spool_is_not_claimed_again() {
    let store = Store::new();
    let (a, _) = relay(&store, "a", Duration::from_secs(2)).await;
    let (b, _) = relay(&store, "b", Duration::from_secs(2)).await;
    let mut orphans = Orphans::start(Arc::clone(&b), Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(1)).await;
    let done = a.claim(&spool("done")).await.unwrap();
    a.coordinator().retire(&done).await.unwrap();
    let keep = a.claim(&spool("keep")).await.unwrap();
    a.release(&keep).await.unwrap();
    // Only the released spool is taken; the retired one is gone for good.
    assert_eq!(orphans.next().await.unwrap().spool, spool("keep"));
    let snapshot = b.coordinator().snapshot().await.unwrap();
    let spools: Vec<_> = snapshot.spools.iter().map(|s| s.spool.as_str()).collect();
    assert_eq!(spools, ["keep"]);
}
