//! The cluster fault tier (issue #4, "Must show"): three real relays, a real
//! etcd, moto's S3 server and an aiosmtpd sink (tests/common/cluster.rs).
//! Each test puts the cluster under load, injects one fault, and then checks
//! that every message that got a 250 reached the sink unchanged (by content
//! digest), and counts duplicates.
//!
//! The tests run in parallel: each owns a /24 (127.0.N.0/24, or 10.77.N.0/24
//! in network namespaces for the partition test) and an etcd prefix. Timing
//! bounds are in units of the lease TTL (3 s here).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::cluster::{now, Cluster, Outcome, Sent, SessionEvent, Spec, NAMES};

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

fn sleep(seconds: f64) {
    std::thread::sleep(Duration::from_secs_f64(seconds));
}

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

/// B's acknowledged messages (before `t`) that were not at the sink at `t`.
fn backlog(cluster: &Cluster, acked: &[Sent], relay: usize, t: f64) -> Vec<Sent> {
    let arrived = cluster.by_marker();
    acked
        .iter()
        .filter(|s| s.relay == relay && s.reply_at <= t && !arrived.contains_key(&s.marker))
        .cloned()
        .collect()
}

fn markers(sent: &[Sent]) -> HashSet<String> {
    sent.iter().map(|s| s.marker.clone()).collect()
}

/// Asserts that `relay` went on acknowledging mail after `t`.
fn assert_accepting_after(acked: &[Sent], relay: usize, t: f64, what: &str) {
    let n = acked
        .iter()
        .filter(|s| s.relay == relay && s.data_end > t)
        .count();
    assert!(n > 0, "{} acknowledged nothing {what}", NAMES[relay]);
}

/// No fault: every relay accepts and delivers its own mail exactly once, and
/// the S3 copies are removed once the messages are delivered.
#[test]
fn steady_cluster_delivers_everything_once_and_removes_the_copies() {
    let cluster = Cluster::start(Spec {
        net: 9,
        ..Spec::default()
    });
    let load = cluster.load("steady", &[A, B, C], 6);
    sleep(3.0);
    let result = load.stop();
    let acked = result.acked();
    eprintln!("load: {}", result.summary());
    assert_eq!(
        acked.len(),
        result.sent.len(),
        "refusals without a fault: {}",
        result.summary()
    );
    for relay in [A, B, C] {
        assert!(
            !result.acked_by(relay).is_empty(),
            "{} acknowledged nothing",
            NAMES[relay]
        );
    }
    let dups = cluster.assert_all_delivered(&acked, secs(30));
    assert_eq!(
        dups,
        0,
        "duplicates without a fault: {:?}",
        cluster.duplicates()
    );
    // Each message is delivered by the relay that accepted it.
    let by_marker = cluster.by_marker();
    for sent in &acked {
        let arrival = &by_marker[&sent.marker][0];
        assert_eq!(
            arrival.helo, cluster.relays[sent.relay].hostname,
            "{} accepted by {} was delivered by {}",
            sent.marker, NAMES[sent.relay], arrival.helo
        );
    }
    let ids: std::collections::BTreeSet<String> = acked
        .iter()
        .filter_map(|s| s.id().map(str::to_owned))
        .collect();
    let left = common::wait_for(secs(20), || {
        let left: Vec<String> = cluster.s3_messages().intersection(&ids).cloned().collect();
        left.is_empty().then_some(())
    });
    if left.is_none() {
        let left: Vec<String> = cluster.s3_messages().intersection(&ids).cloned().collect();
        let moto = cluster.moto.log();
        let mut report = format!(
            "S3 copies of {} of the {} delivered messages were not removed within 20 s:\n",
            left.len(),
            ids.len()
        );
        for id in left.iter().take(3) {
            report += &format!("{id}: moto requests:\n");
            for line in moto.lines().filter(|l| l.contains(id.as_str())) {
                report += &format!("  {line}\n");
            }
            report += "relay log lines:\n";
            for relay in &cluster.relays {
                for line in relay.proc.log().lines().filter(|l| l.contains(id.as_str())) {
                    report += &format!("  [{}] {line}\n", relay.name);
                }
            }
        }
        panic!("{report}");
    }
}

/// kill -9 one relay under load: every acknowledged message is delivered (a
/// peer takes the dead relay's spool over); duplicates are at most the
/// messages that relay had in flight; restarting it on its old data dir
/// delivers nothing a second time.
#[test]
fn kill9_under_load_loses_nothing_and_duplicates_at_most_what_was_not_committed() {
    let spec = Spec {
        net: 1,
        // A slow sink keeps a backlog on every relay, so the kill leaves
        // undelivered mail (and deliveries in flight) behind.
        sink_delay: 0.3,
        ..Spec::default()
    };
    let ttl = spec.lease_ttl as f64;
    let mut cluster = Cluster::start(spec);
    let load = cluster.load("k9", &[A, B, C], 9);
    sleep(2.5);
    let t_kill = now();
    cluster.kill9(B);
    let backlog = backlog(&cluster, &load.acked(), B, t_kill);
    assert!(
        !backlog.is_empty(),
        "test calibration: relay-b had delivered everything before the kill"
    );
    cluster.set_sink_delay(0.0);
    sleep(2.0);
    let result = load.stop();
    eprintln!(
        "load: {}; relay-b backlog at the kill: {}",
        result.summary(),
        backlog.len()
    );
    let acked = result.acked();
    assert_accepting_after(&acked, A, t_kill, "after relay-b was killed");
    assert_accepting_after(&acked, C, t_kill, "after relay-b was killed");

    let dups = cluster.assert_all_delivered(&acked, secs(60));
    let first_takeover = cluster
        .arrivals()
        .into_iter()
        .filter(|a| {
            a.marker
                .as_ref()
                .is_some_and(|m| markers(&backlog).contains(m))
        })
        .map(|a| a.time)
        .fold(f64::INFINITY, f64::min);
    eprintln!(
        "first delivery of relay-b's backlog by a peer: {:.2} s after kill -9 (lease TTL {ttl} s)",
        first_takeover - t_kill
    );
    // Delivered again: what relay-b had in flight, and what it had
    // delivered whose state was still waiting to be committed with others
    // (at most queue::COMMITS_AHEAD outcomes wait; a commit lingers up to
    // 40 ms to carry more of them).
    let in_flight = cluster.spec.max_per_destination + result.unanswered(B).len();
    let bound = in_flight + postern::queue::COMMITS_AHEAD;
    assert!(
        dups <= bound,
        "{dups} duplicates, more than relay-b's {in_flight} messages in flight and {} outcomes awaiting their commit: {:?}",
        postern::queue::COMMITS_AHEAD,
        cluster.duplicates()
    );

    // The survivors count the takeover on /metrics.
    let takeovers: u64 = [A, C]
        .iter()
        .map(|&i| common::counter_of(cluster.relays[i].http, "postern_takeovers_total"))
        .sum();
    assert!(takeovers >= 1, "no takeover counted by relay-a or relay-c");

    // The killed relay comes back on its old data dir: its old spool now
    // belongs to the peer, so nothing is delivered again.
    cluster.restart(B);
    sleep(2.0 * ttl);
    let again: usize = cluster.duplicates().iter().map(|(_, n)| n - 1).sum();
    assert_eq!(
        again,
        dups,
        "restarting relay-b delivered messages again: {:?}",
        cluster.duplicates()
    );
    let load = cluster.load("k9-after", &[B], 2);
    sleep(1.0);
    let after = load.stop();
    assert!(
        !after.acked().is_empty(),
        "restarted relay-b accepts nothing: {}",
        after.summary()
    );
    cluster.assert_all_delivered(&after.acked(), secs(30));
}

/// SIGSTOP a relay for longer than its lease TTL: a peer takes its spool
/// over; after SIGCONT the stale relay delivers none of those messages again
/// (beyond the deliveries it had in flight when it was stopped), and nothing
/// is lost.
#[test]
fn sigstop_past_the_lease_then_sigcont_the_stale_relay_does_not_deliver_again() {
    let spec = Spec {
        net: 2,
        sink_delay: 0.3,
        ..Spec::default()
    };
    let ttl = spec.lease_ttl as f64;
    let cluster = Cluster::start(spec);
    let b_host = cluster.relays[B].hostname.clone();
    let load = cluster.load("stop", &[A, B, C], 9);
    sleep(2.5);
    let t_stop = now();
    cluster.sigstop(B);
    let acked_before: Vec<Sent> = load
        .acked()
        .into_iter()
        .filter(|s| s.relay == B && s.reply_at <= t_stop)
        .collect();
    let backlog = backlog(&cluster, &acked_before, B, t_stop);
    assert!(
        !backlog.is_empty(),
        "test calibration: relay-b had no backlog when stopped"
    );
    cluster.set_sink_delay(0.0);

    // A peer delivers some of relay-b's backlog: the takeover.
    let backlog_markers = markers(&backlog);
    let takeover = common::wait_for(Duration::from_secs_f64(4.0 * ttl + 10.0), || {
        cluster.arrivals().into_iter().find(|a| {
            a.helo != b_host
                && a.marker
                    .as_ref()
                    .is_some_and(|m| backlog_markers.contains(m))
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "no peer delivered any of relay-b's {} undelivered messages within {} s of SIGSTOP",
            backlog.len(),
            4.0 * ttl + 10.0
        )
    });
    eprintln!(
        "{} delivered relay-b's backlog {:.2} s after SIGSTOP (lease TTL {ttl} s)",
        takeover.helo,
        takeover.time - t_stop
    );
    // Stopped for well over the TTL in any case.
    sleep((t_stop + ttl + 1.0 - now()).max(0.0));
    let t_cont = now();
    cluster.sigcont(B);
    sleep(2.0 * ttl);
    let result = load.stop();
    eprintln!("load: {}", result.summary());
    let dups = cluster.assert_all_delivered(&result.acked(), secs(60));

    let old = markers(&acked_before);
    let b_old: Vec<_> = cluster
        .arrivals()
        .into_iter()
        .filter(|a| a.helo == b_host && a.time > t_stop)
        .filter(|a| a.marker.as_ref().is_some_and(|m| old.contains(m)))
        .collect();
    let late: Vec<_> = b_old.iter().filter(|a| a.time > t_cont + 1.0).collect();
    assert!(
        late.is_empty(),
        "the stale relay-b delivered messages of its taken-over spool {:?} s after SIGCONT: {late:?}",
        late.iter().map(|a| a.time - t_cont).collect::<Vec<_>>()
    );
    let in_flight = cluster.spec.max_per_destination;
    assert!(
        b_old.len() <= in_flight,
        "after SIGSTOP relay-b completed {} deliveries of old messages, more than the {in_flight} it can have in flight: {b_old:?}",
        b_old.len()
    );
    // As after a kill -9: the transactions in flight, and the outcomes
    // frozen before their batched commit reached etcd.
    let bound = in_flight + result.unanswered(B).len() + postern::queue::COMMITS_AHEAD;
    assert!(
        dups <= bound,
        "{dups} duplicates (bound {bound}): {:?}",
        cluster.duplicates()
    );
}

/// Kill a relay, delete its whole data dir and start it fresh: what it had
/// acknowledged is still delivered, from a peer's replica or S3.
#[test]
fn wiped_data_dir_acknowledged_mail_is_delivered_from_a_replica_or_s3() {
    let mut cluster = Cluster::start(Spec {
        net: 3,
        // Nothing is delivered before the wipe.
        sink_up: false,
        ..Spec::default()
    });
    let load = cluster.load("wipe", &[A, B, C], 9);
    sleep(2.0);
    let result = load.stop();
    eprintln!("load: {}", result.summary());
    assert!(
        !result.acked_by(B).is_empty(),
        "relay-b acknowledged nothing"
    );
    cluster.kill9(B);
    cluster.wipe(B);
    cluster.restart(B);
    cluster.start_sink();
    let dups = cluster.assert_all_delivered(&result.acked(), secs(60));
    assert_eq!(
        dups,
        0,
        "duplicates (nothing was in flight): {:?}",
        cluster.duplicates()
    );
    let load = cluster.load("wipe-after", &[B], 2);
    sleep(1.0);
    let after = load.stop();
    assert!(
        !after.acked().is_empty(),
        "fresh relay-b accepts nothing: {}",
        after.summary()
    );
    cluster.assert_all_delivered(&after.acked(), secs(30));
}

/// S3 down under load with the ack policy 2 of {local, peer, S3}: accepting
/// goes on (local + peer), and once S3 is back the repair task uploads the
/// copies it missed; then everything is delivered once.
#[test]
fn s3_down_with_two_of_three_accepting_continues_and_repair_uploads_the_missing_copies() {
    let mut cluster = Cluster::start(Spec {
        net: 4,
        // Messages stay queued until the repair has been checked.
        sink_up: false,
        ..Spec::default()
    });
    let load = cluster.load("s3", &[A, B, C], 6);
    sleep(1.5);
    let t_down = now();
    // Killed, not stopped: a SIGSTOPped moto would later replay the PUTs the
    // relays gave up on, and those would pass for repairs.
    cluster.s3_kill();
    sleep(4.0);
    let result = load.stop();
    eprintln!("load: {}", result.summary());
    assert!(
        result.sent.iter().all(Sent::acked),
        "refusals while S3 was down with 2 of {{local, peer, S3}}: {}",
        result.summary()
    );
    let during: Vec<Sent> = result
        .acked()
        .into_iter()
        .filter(|s| s.data_end > t_down)
        .collect();
    assert!(!during.is_empty(), "nothing acknowledged while S3 was down");
    cluster.s3_restart();
    let wanted: HashSet<String> = during
        .iter()
        .filter_map(|s| s.id().map(str::to_owned))
        .collect();
    let repaired = common::wait_for(secs(30), || {
        let held = cluster.s3_messages();
        wanted.iter().all(|id| held.contains(id)).then_some(())
    });
    if repaired.is_none() {
        let held = cluster.s3_messages();
        let missing: Vec<&String> = wanted.iter().filter(|id| !held.contains(*id)).collect();
        let keys = cluster.s3_keys();
        panic!(
            "repair did not upload the S3 copies of {} of the {} messages accepted while S3 was down \
             within 30 s (e.g. {:?}); the bucket has {} keys, e.g. {:?}",
            missing.len(),
            wanted.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            keys.len(),
            keys.iter().take(5).collect::<Vec<_>>()
        );
    }
    cluster.start_sink();
    let dups = cluster.assert_all_delivered(&result.acked(), secs(60));
    assert_eq!(
        dups,
        0,
        "duplicates without a relay fault: {:?}",
        cluster.duplicates()
    );
}

/// S3 down with an ack policy that requires S3 (local + S3, 2 of 2): the
/// relays answer 451 4.3.0 while it is down, keep nothing they refused, and
/// lose nothing they acknowledged.
#[test]
fn s3_down_with_a_policy_that_requires_s3_answers_451_and_loses_nothing() {
    let mut cluster = Cluster::start(Spec {
        net: 5,
        copies: vec!["local", "object_store"],
        required: 2,
        ..Spec::default()
    });
    let load = cluster.load("s3req", &[A, B, C], 6);
    sleep(1.5);
    let t_down = now();
    cluster.s3_kill();
    // Longer than two quorum deadlines (3 s), so every session sees a whole
    // transaction begin and end inside the outage.
    sleep(7.0);
    let t_restart = now();
    cluster.s3_restart();
    let t_up = now();
    sleep(2.5);
    let result = load.stop();
    eprintln!("load: {}", result.summary());
    let in_outage: Vec<&Sent> = result
        .sent
        .iter()
        .filter(|s| s.data_end > t_down && s.reply_at < t_restart)
        .collect();
    let acked_in_outage: Vec<_> = in_outage.iter().filter(|s| s.acked()).collect();
    assert!(
        acked_in_outage.is_empty(),
        "250 while S3 (required) was down: {acked_in_outage:?}"
    );
    // Every session began a transaction within a deadline of the kill, so
    // each has a 451 answered inside the outage.
    let refused: Vec<_> = in_outage.iter().filter(|s| s.code() == Some(451)).collect();
    assert!(
        !refused.is_empty(),
        "no 451 while S3 was down: {}",
        result.summary()
    );
    let other: Vec<_> = in_outage.iter().filter(|s| s.code() != Some(451)).collect();
    assert!(
        other.is_empty(),
        "replies other than 451 while S3 was down: {other:?}"
    );
    let acked = result.acked();
    for relay in [A, B, C] {
        assert_accepting_after(&acked, relay, t_up, "after S3 came back");
    }
    let dups = cluster.assert_all_delivered(&acked, secs(45));
    assert_eq!(
        dups,
        0,
        "duplicates without a relay fault: {:?}",
        cluster.duplicates()
    );
    // What got 451 left no committed copy: it is never delivered.
    sleep(3.0);
    let refused_markers: HashSet<String> = result
        .sent
        .iter()
        .filter(|s| !s.acked())
        .map(|s| s.marker.clone())
        .collect();
    let delivered_refused: Vec<_> = cluster
        .arrivals()
        .into_iter()
        .filter(|a| {
            a.marker
                .as_ref()
                .is_some_and(|m| refused_markers.contains(m))
        })
        .collect();
    assert!(
        delivered_refused.is_empty(),
        "messages that got 451 were delivered: {delivered_refused:?}"
    );
}

/// etcd down under load: accepting goes on (etcd is not in the accept path),
/// delivery stops before the leases could expire, and resumes when etcd is
/// back; nothing is lost.
#[test]
fn etcd_down_accepting_continues_delivery_pauses_and_resumes() {
    let spec = Spec {
        net: 6,
        ..Spec::default()
    };
    let ttl = spec.lease_ttl as f64;
    let mut cluster = Cluster::start(spec);
    let load = cluster.load("etcd", &[A, B, C], 6);
    sleep(2.0);
    let t_down = now();
    cluster.etcd_kill();
    sleep(ttl + 4.0);
    let t_restart = now();
    let arrived_in_pause: Vec<_> = cluster
        .arrivals()
        .into_iter()
        .filter(|a| a.time > t_down + ttl + 1.0)
        .collect();
    let during = load.sent();
    cluster.etcd_restart();
    let t_up = now();
    sleep(2.0);
    let result = load.stop();
    eprintln!("load: {}", result.summary());
    let in_outage: Vec<&Sent> = during
        .iter()
        .filter(|s| s.data_end > t_down && s.reply_at < t_restart)
        .collect();
    assert!(
        in_outage.iter().all(|s| s.acked()),
        "refusals while etcd was down: {:?}",
        in_outage
            .iter()
            .filter(|s| !s.acked())
            .take(5)
            .collect::<Vec<_>>()
    );
    for relay in [A, B, C] {
        assert_accepting_after(&during, relay, t_down + ttl + 1.0, "while etcd was down");
    }
    assert!(
        arrived_in_pause.is_empty(),
        "{} messages delivered more than the lease TTL after etcd went down (relays that \
         cannot renew their lease must stop delivering): {:?}",
        arrived_in_pause.len(),
        arrived_in_pause.iter().take(5).collect::<Vec<_>>()
    );
    let dups = cluster.assert_all_delivered(&result.acked(), secs(60));
    let last = cluster
        .arrivals()
        .iter()
        .map(|a| a.time)
        .fold(0.0, f64::max);
    eprintln!(
        "delivery resumed; last message delivered {:.2} s after etcd came back",
        last - t_up
    );
    let bound = 3 * cluster.spec.max_per_destination;
    assert!(
        dups <= bound,
        "{dups} duplicates (bound {bound}): {:?}",
        cluster.duplicates()
    );
}

/// One relay cut off from its peers and etcd by nftables drop rules (the
/// relays, etcd, S3 and the sink each in a network namespace): a peer takes
/// its spool over; the cut-off relay delivers nothing once its lease could
/// have expired (it can still reach the sink); after the partition heals
/// everything acknowledged is delivered, with bounded duplicates.
#[test]
fn partitioned_relay_is_taken_over_without_loss() {
    let spec = Spec {
        net: 7,
        netns: true,
        sink_delay: 0.5,
        ..Spec::default()
    };
    let ttl = spec.lease_ttl as f64;
    let cluster = Cluster::start(spec);
    let b_host = cluster.relays[B].hostname.clone();
    // relay-b gets most of the load, so it has a backlog when it is cut off.
    let load = cluster.load("part", &[A, B, C, B, B], 10);
    sleep(2.5);
    let t_cut = now();
    cluster.partition(B);
    let acked_before: Vec<Sent> = load
        .acked()
        .into_iter()
        .filter(|s| s.relay == B && s.reply_at <= t_cut)
        .collect();
    let backlog_markers = markers(&backlog(&cluster, &acked_before, B, t_cut));
    assert!(
        !backlog_markers.is_empty(),
        "test calibration: relay-b had no backlog when cut off"
    );
    // The slow sink made the backlog; the takeover is timed without it.
    cluster.set_sink_delay(0.0);

    let takeover = common::wait_for(Duration::from_secs_f64(4.0 * ttl + 15.0), || {
        cluster
            .arrivals()
            .into_iter()
            .find(|a| a.helo != b_host && a.marker.as_ref().is_some_and(|m| backlog_markers.contains(m)))
    })
    .unwrap_or_else(|| {
        panic!(
            "no peer delivered any of relay-b's {} undelivered messages within {} s of the partition",
            backlog_markers.len(),
            4.0 * ttl + 15.0
        )
    });
    eprintln!(
        "{} delivered relay-b's backlog {:.2} s after the partition (lease TTL {ttl} s)",
        takeover.helo,
        takeover.time - t_cut
    );
    cluster.set_sink_delay(0.0);
    sleep((t_cut + 2.0 * ttl + 2.0 - now()).max(0.0));
    let t_heal = now();
    let acked_during = load.acked();
    cluster.heal(B);
    sleep(3.0);
    let result = load.stop();
    eprintln!("load: {}", result.summary());
    assert_accepting_after(&acked_during, A, t_cut, "during the partition");
    assert_accepting_after(&acked_during, C, t_cut, "during the partition");

    let stale: Vec<_> = cluster
        .arrivals()
        .into_iter()
        .filter(|a| a.helo == b_host && a.time > t_cut + ttl + 1.0 && a.time < t_heal)
        .collect();
    assert!(
        stale.is_empty(),
        "cut-off relay-b went on delivering after its lease could have expired: {:?}",
        stale.iter().take(5).collect::<Vec<_>>()
    );
    let dups = cluster.assert_all_delivered(&result.acked(), secs(60));
    // relay-b rightly goes on delivering until its lease is no longer
    // certain, but the state of those deliveries cannot reach etcd any more,
    // so the new owner may deliver them again. The relay bounds them: no new
    // delivery starts while 16 state commits are outstanding or one is late
    // (queue::COMMITS_AHEAD), plus the transactions in flight.
    let unconfirmed = cluster
        .arrivals()
        .into_iter()
        .filter(|a| a.helo == b_host && a.time >= t_cut && a.time <= t_cut + ttl)
        .count();
    let bound = 16 + cluster.spec.max_per_destination + result.unanswered(B).len();
    eprintln!("{dups} duplicates; relay-b delivered {unconfirmed} in the lease TTL after the cut");
    assert!(
        dups <= bound,
        "{dups} duplicates (bound {bound}): {:?}",
        cluster.duplicates()
    );
}

/// SIGTERM under load: readiness goes false, clients see 421 or a completed
/// transaction (never a dropped one), the relay exits 0, and a peer starts
/// delivering the drained spool within the lease TTL of the exit (the lease
/// is released, not left to expire). relay-b's delivery is paused, so every
/// message it accepted is delivered by the peer that takes its spool over.
#[test]
fn sigterm_drains_and_a_peer_delivers_the_spool_within_the_lease_ttl() {
    let spec = Spec {
        net: 8,
        paused: [false, true, false],
        ..Spec::default()
    };
    let ttl = spec.lease_ttl as f64;
    let mut cluster = Cluster::start(spec);
    let load = cluster.load("term", &[B], 8);
    sleep(2.5);
    let before = load.acked();
    assert!(!before.is_empty(), "relay-b acknowledged nothing");
    let t_term = now();
    cluster.sigterm(B);
    let not_ready = common::wait_for(secs(1), || (cluster.readyz(B) != Some(200)).then_some(()));
    assert!(not_ready.is_some(), "relay-b still ready 1 s after SIGTERM");
    let status = cluster.wait_exit(B, secs(30));
    let t_exit = now();
    assert!(
        status.success(),
        "relay-b exited with {status} after SIGTERM"
    );
    let result = load.stop();
    eprintln!("load: {}", result.summary());
    let acked = result.acked();
    let all = markers(&acked);
    let first = common::wait_for(Duration::from_secs_f64(ttl + 10.0), || {
        cluster
            .arrivals()
            .into_iter()
            .find(|a| a.marker.as_ref().is_some_and(|m| all.contains(m)))
    })
    .expect("no peer delivered anything of the drained spool");
    eprintln!(
        "drain took {:.2} s; {} delivered the first drained message {:.2} s after the exit \
         ({:.2} s after SIGTERM)",
        t_exit - t_term,
        first.helo,
        first.time - t_exit,
        first.time - t_term
    );
    assert!(
        first.time - t_exit < ttl,
        "hand-over took {:.2} s after the exit, not less than the lease TTL ({ttl} s)",
        first.time - t_exit
    );

    let dropped: Vec<&Sent> = result
        .sent
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::NoReply { .. }))
        .collect();
    assert!(
        dropped.is_empty(),
        "transactions cut off without a reply: {dropped:?}"
    );
    let not_421: Vec<&Sent> = result
        .sent
        .iter()
        .filter(|s| !s.acked() && s.code() != Some(421))
        .collect();
    assert!(
        not_421.is_empty(),
        "refusals other than 421 while draining: {not_421:?}"
    );
    let greetings_421 = result
        .events
        .iter()
        .filter(|e| matches!(e, SessionEvent::Greeting { reply, .. } if reply.code == 421))
        .count();
    let replies_421 = result.sent.iter().filter(|s| s.code() == Some(421)).count();
    assert!(
        greetings_421 + replies_421 > 0,
        "no client saw a 421 during the drain: {}",
        result.summary()
    );
    // A connection the listener had not yet accepted may be reset as the
    // relay exits; that loses nothing, but is shown.
    let dropped: Vec<&SessionEvent> = result
        .events
        .iter()
        .filter(|e| matches!(e, SessionEvent::Dropped { .. }))
        .collect();
    eprintln!("sessions closed before the greeting or EHLO reply: {dropped:?}");
    let dups = cluster.assert_all_delivered(&acked, secs(30));
    assert_eq!(
        dups,
        0,
        "duplicates after an orderly hand-over: {:?}",
        cluster.duplicates()
    );
}

/// `postern queue` across the cluster: `list --cluster` and `stats
/// --cluster` on one relay cover all three, and hold, show and delete by id
/// reach the relay that holds the message (over the peer service, with the
/// shared secret).
#[test]
fn cluster_admin_lists_every_relay_and_acts_by_id_on_the_holder() {
    let cluster = Cluster::start(Spec {
        net: 10,
        paused: [true; 3],
        ..Spec::default()
    });
    let mut ids = Vec::new();
    for relay in &cluster.relays {
        let mut smtp = common::Smtp::connect(relay.smtp);
        smtp.ehlo();
        let data = common::crlf(&format!(
            "Subject: admin {}\n\nheld by {}\n",
            relay.name, relay.name
        ));
        let reply = smtp.send_mail("<admin@origin.test>", &["<rcpt@example.test>"], &data);
        assert!(reply.is_positive(), "{}: {}", relay.name, reply.text());
        ids.push(reply.queued_id());
    }
    let queue = |relay: usize, args: &[&str]| -> serde_json::Value {
        let output = std::process::Command::new(common::postern_bin())
            .arg("queue")
            .args(args)
            .arg("--json")
            .arg("--config")
            .arg(&cluster.relays[relay].config_path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "queue {args:?} on {}: {}",
            cluster.relays[relay].name,
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).unwrap()
    };

    // Each relay alone lists its own message; --cluster lists all three,
    // each with the relay that holds it.
    let own = queue(A, &["list"]);
    assert_eq!(own.as_array().unwrap().len(), 1, "{own}");
    let all = queue(A, &["list", "--cluster"]);
    let held_by: HashSet<(String, String)> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_owned(),
                m["relay"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let expected: HashSet<(String, String)> = ids
        .iter()
        .zip(&cluster.relays)
        .map(|(id, relay)| (id.clone(), relay.name.clone()))
        .collect();
    assert_eq!(held_by, expected, "{all}");
    let stats = queue(B, &["stats", "--cluster"]);
    assert_eq!(stats["total"], 3, "{stats}");
    assert_eq!(stats["relays"].as_array().unwrap().len(), 3, "{stats}");
    assert!(
        stats["unreachable"].as_array().unwrap().is_empty(),
        "{stats}"
    );

    // By id, from a relay that does not hold the message.
    let held = queue(A, &["hold", &ids[C]]);
    assert_eq!(held["state"], "held", "{held}");
    let shown = queue(B, &["show", &ids[C]]);
    assert_eq!(shown["state"], "held", "{shown}");
    assert_eq!(shown["relay"], cluster.relays[C].name.as_str(), "{shown}");
    queue(C, &["delete", &ids[B]]);
    let left: Vec<String> = queue(A, &["list", "--cluster"])
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(!left.contains(&ids[B]), "{left:?}");
    assert!(
        !postern::spool::local::shard_dir(&cluster.relays[B].data_dir.join("spool"), &ids[B])
            .join(format!("{}.msg", ids[B]))
            .exists(),
        "the deleted message's local copy is gone"
    );
    // An id nobody holds is still NOT_FOUND.
    let missing = std::process::Command::new(common::postern_bin())
        .args(["queue", "show", "01AAAAAAAAAAAAAAAAAAAAAAAA", "--config"])
        .arg(&cluster.relays[A].config_path)
        .output()
        .unwrap();
    assert!(!missing.status.success());
}

/// A relay that ran alone and is then put into a cluster delivers the mail
/// it accepted before (it belongs to no spool, so no peer can take it over;
/// it is the relay's own while the relay holds its lease).
#[test]
fn mail_accepted_before_joining_the_cluster_is_delivered() {
    let mut cluster = Cluster::start(Spec {
        net: 11,
        ..Spec::default()
    });
    cluster.sigterm(A);
    assert!(cluster.wait_exit(A, secs(20)).success());
    // relay-a's own configuration without [cluster] and without peer copies,
    // delivery paused: a relay outside any cluster.
    let clustered = std::fs::read_to_string(&cluster.relays[A].config_path).unwrap();
    let alone = clustered[..clustered.find("[cluster]").unwrap()]
        .replace("\"peer\", ", "")
        .replace("paused = false", "paused = true");
    let alone_path = cluster.work_dir().join("relay-a-alone.toml");
    std::fs::write(&alone_path, alone).unwrap();
    let mut solo = std::process::Command::new(common::postern_bin())
        .args(["serve", "--config"])
        .arg(&alone_path)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let smtp_addr = cluster.relays[A].smtp;
    let mut smtp = common::wait_for(secs(20), || {
        std::net::TcpStream::connect(smtp_addr)
            .ok()
            .map(|_| common::Smtp::connect(smtp_addr))
    })
    .expect("the lone relay listens");
    smtp.ehlo();
    let marker = "before-joining-4b1c";
    let data = common::crlf(&format!("Subject: {marker}\n\nmarker {marker}\n"));
    let reply = smtp.send_mail("<alone@origin.test>", &["<rcpt@example.test>"], &data);
    assert!(reply.is_positive(), "{}", reply.text());
    drop(smtp);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(solo.id() as i32, libc::SIGTERM) };
    assert!(solo.wait().unwrap().success());
    let sink_has = |cluster: &Cluster| {
        std::fs::read_dir(&cluster.sink_dir)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
            .filter(|e| {
                std::fs::read(e.path())
                    .is_ok_and(|bytes| common::contains(&bytes, marker.as_bytes()))
            })
            .count()
    };
    assert_eq!(sink_has(&cluster), 0, "delivery was paused");

    // Back in the cluster: it delivers that message, once.
    cluster.restart(A);
    let delivered = common::wait_for(secs(30), || (sink_has(&cluster) > 0).then_some(()));
    assert!(
        delivered.is_some(),
        "mail from before the cluster was not delivered; relay-a log:\n{}",
        cluster.relays[A].proc.log_tail(40)
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(sink_has(&cluster), 1, "delivered exactly once");
}

/// Peer certificates renewed in place (same CA, new keys, as cert-manager
/// renews a Secret) while mail flows: every acknowledged message is
/// delivered once, each relay logs that it took the new files, and its peer
/// port then presents the new certificate to a new connection (`openssl
/// s_client`), all without a restart.
#[test]
fn peer_certificates_renewed_while_mail_flows_are_used_without_a_restart() {
    let cluster = Cluster::start(Spec {
        net: 12,
        ..Spec::default()
    });
    let before: Vec<String> = (0..3).map(|i| cluster.peer_certificate(i)).collect();
    let load = cluster.load("renew", &[A, B, C], 6);
    sleep(1.0);
    let renewed: Vec<String> = (0..3).map(|i| cluster.renew_peer_certificate(i)).collect();
    sleep(2.0);
    let result = load.stop();
    let acked = result.acked();
    eprintln!("load: {}", result.summary());
    assert_eq!(
        acked.len(),
        result.sent.len(),
        "refusals across a renewal: {}",
        result.summary()
    );
    let dups = cluster.assert_all_delivered(&acked, secs(30));
    assert_eq!(dups, 0, "duplicates: {:?}", cluster.duplicates());
    for i in [A, B, C] {
        assert_ne!(before[i], renewed[i]);
        let presented = common::wait_for(secs(10), || {
            let now = cluster.peer_certificate(i);
            (now == renewed[i]).then_some(now)
        });
        assert!(
            presented.is_some(),
            "{} still presents its old certificate",
            NAMES[i]
        );
        let log = cluster.relays[i].proc.log();
        assert!(
            log.contains("TLS files changed; new connections use them"),
            "{}: {log}",
            NAMES[i]
        );
    }
}
