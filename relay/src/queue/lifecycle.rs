//! What a delivery attempt's answers do to a message, without I/O: the
//! recipients' new states, expiry, and the next step (finish, or try again
//! at a time), as a pure function of the state, the answers and the clock
//! ([`settle`]); whether that outcome must be recorded ([`must_record`]);
//! and what follows from how recording went ([`after_recording`]: saved,
//! not saved, not committed, or the message lost to another relay); what an
//! operator's action does ([`act`]: hold, release, flush, delete, bounce);
//! and what taking over a spool does to each of its messages
//! ([`take_over`], [`adopted_state`]). The queue's `attempt` and admin
//! methods and the cluster node's takeover are the drivers that deliver,
//! persist, commit, fetch and report; the invariants are tested here over
//! simulated weeks, with crashes, failed saves, lost claims, takeovers and
//! operators' actions injected. A message enters through [`accepted`]
//! (what end of data leaves to queue after early delivery, whose results
//! `inbound::early` sorts).

use std::time::Duration;

use super::schedule::{is_expired, retry_delay};
use super::state::{DeliveryState, Status};

/// How a message's life is ruled (from `[delivery]`).
#[derive(Debug, Clone, Copy)]
pub struct Rules<'a> {
    /// Delays between attempts, the last repeating.
    pub retry_schedule: &'a [Duration],
    /// Age at which recipients still pending fail.
    pub max_age: Duration,
    /// Age after which the sender is told of the delay (once).
    pub delay_warning: Option<Duration>,
}

/// What the next hop (or the attempt) said about one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Said {
    /// Accepted: delivered.
    Delivered,
    /// Refused for good.
    Failed,
    /// Refused for now.
    Deferred,
}

/// One recipient's answer in an attempt.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The recipient's index in the envelope.
    pub index: usize,
    /// What was said.
    pub said: Said,
    /// The reply, on one line.
    pub reply: String,
    /// The server that said it.
    pub remote: Option<String>,
}

/// What comes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Every recipient is final: report the failed ones and remove the
    /// message's copies.
    Finish,
    /// Some are pending: save the state and try again at `at_ms`;
    /// `warn_delay` when the sender is due a delay warning now.
    Retry {
        /// When (Unix ms).
        at_ms: u64,
        /// A delay warning is due.
        warn_delay: bool,
    },
}

/// The result of [`settle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    /// Recipients that expired in this attempt (now failed).
    pub expired: usize,
    /// Answers about recipients already final, left unapplied (a driver
    /// never asks about those; counted so a test can tell it did).
    pub ignored: usize,
    /// What to do next.
    pub next: Next,
}

/// Applies an attempt's `answers` to `state` at `now_ms`: the attempt is
/// counted; each answer about a pending recipient records its reply and, if
/// final, its status (a final recipient never changes again); recipients
/// still pending when the message has outlived `max_age` fail with a reply
/// saying so; and the next step is decided.
pub fn settle(
    state: &mut DeliveryState,
    answers: &[Answer],
    arrival_ms: u64,
    now_ms: u64,
    rules: &Rules<'_>,
) -> Settled {
    state.attempts += 1;
    let mut ignored = 0;
    for answer in answers {
        let Some(recipient) = state
            .recipients
            .get_mut(answer.index)
            .filter(|r| r.status == Status::Pending)
        else {
            ignored += 1;
            continue;
        };
        recipient.last_reply = Some(answer.reply.clone());
        recipient.remote = answer.remote.clone();
        match answer.said {
            Said::Delivered => recipient.status = Status::Delivered,
            Said::Failed => recipient.status = Status::Failed,
            Said::Deferred => {}
        }
    }
    let mut expired = 0;
    if !state.is_final() && is_expired(arrival_ms, now_ms, rules.max_age) {
        for recipient in state
            .recipients
            .iter_mut()
            .filter(|r| r.status == Status::Pending)
        {
            let last = recipient.last_reply.take().unwrap_or_default();
            recipient.status = Status::Failed;
            recipient.last_reply = Some(format!(
                "554 4.4.7 Message expired after {}; last error: {last}",
                humantime::format_duration(rules.max_age)
            ));
            expired += 1;
        }
    }
    let next = if state.is_final() {
        Next::Finish
    } else {
        Next::Retry {
            at_ms: now_ms + retry_delay(rules.retry_schedule, state.attempts).as_millis() as u64,
            warn_delay: !state.delay_warned
                && rules.delay_warning.is_some_and(|after| {
                    now_ms.saturating_sub(arrival_ms) >= after.as_millis() as u64
                }),
        }
    };
    Settled {
        expired,
        ignored,
        next,
    }
}

/// How recording an attempt's outcome went (the driver's I/O).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Not needed ([`must_record`] said so).
    Skipped,
    /// Saved in the state journal and, in a cluster, committed under the
    /// claim.
    Committed,
    /// The save failed: the outcome is only in memory.
    SaveFailed,
    /// Saved, but the cluster did not take the commit; `still_owned` when
    /// the message is still this relay's.
    CommitFailed {
        /// The message is still ours to deliver.
        still_owned: bool,
    },
}

/// What the driver does once the outcome is recorded (or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Then {
    /// Report the failed recipients and remove every copy.
    Finish,
    /// Keep it queued until `at_ms`; `uncommitted` when the cluster does not
    /// have this outcome yet (new deliveries wait for a commit that works).
    Keep {
        /// When it is due again (Unix ms).
        at_ms: u64,
        /// The cluster lacks the outcome.
        uncommitted: bool,
    },
    /// Another relay owns the message now and delivers the rest: forget it.
    Forget,
}

/// How soon an outcome that could not be recorded is tried again.
pub const RECORD_RETRY_MS: u64 = 1000;

/// Whether an attempt's new `state` must be recorded before the next step.
/// Outside a cluster a message delivered to every recipient needs no record:
/// removing its copies next is what records that it is done (a crash in
/// between delivers it again, the one duplicate a crash may cause).
pub fn must_record(state: &DeliveryState, clustered: bool) -> bool {
    clustered
        || !state
            .recipients
            .iter()
            .all(|r| r.status == Status::Delivered)
}

/// The step after recording an attempt whose [`settle`] said `next`. An
/// outcome that is not durable is never acted on: a failed save keeps the
/// message and tries again soon, so nothing is finished (its copies removed)
/// on the strength of a state only memory holds.
pub fn after_recording(next: Next, recorded: Recorded, now_ms: u64) -> Then {
    let soon = now_ms + RECORD_RETRY_MS;
    let due = match next {
        Next::Finish => None,
        Next::Retry { at_ms, .. } => Some(at_ms),
    };
    match recorded {
        Recorded::SaveFailed => Then::Keep {
            at_ms: soon,
            uncommitted: false,
        },
        Recorded::CommitFailed { still_owned: false } => Then::Forget,
        Recorded::CommitFailed { still_owned: true } => Then::Keep {
            at_ms: due.map_or(soon, |at| at.min(soon)),
            uncommitted: true,
        },
        Recorded::Skipped | Recorded::Committed => match due {
            None => Then::Finish,
            Some(at_ms) => Then::Keep {
                at_ms,
                uncommitted: false,
            },
        },
    }
}

/// An operator's action on one queued message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep it from being delivered until released.
    Hold,
    /// Let a held message be delivered again, now.
    Release,
    /// Make it due now (unless held).
    Flush,
    /// Remove it without telling the sender.
    Delete,
    /// Remove it, failing its pending recipients and telling the sender.
    Bounce,
}

/// The reply recorded for recipients an operator bounced.
pub const BOUNCED_REPLY: &str = "550 5.3.0 Message deleted by the postmaster";

/// What the driver does for an operator's [`Action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acted {
    /// An attempt is running; refused (the operator tries again).
    Busy,
    /// Nothing changes (holding a held message, flushing a held one,
    /// releasing one not held).
    Unchanged,
    /// The state changed: record it, then schedule the message at `due_ms`
    /// (`None`: not while it is held).
    Record {
        /// When it is due (Unix ms), if it may be delivered.
        due_ms: Option<u64>,
    },
    /// Due at `due_ms`; nothing to record (a flush).
    Schedule {
        /// When it is due (Unix ms).
        due_ms: u64,
    },
    /// Report the recipients now failed and remove every copy, as an
    /// attempt's [`Then::Finish`] does.
    Finish,
    /// Remove every copy and the record, reporting nothing.
    Remove,
}

/// Applies an operator's `action` to a message in `state` at `now_ms`;
/// `in_flight` when a delivery attempt is running. Hold, release and flush
/// do not wait for an attempt: its outcome keeps the hold (the driver
/// merges it). Delete and bounce do: a message must not be removed under
/// an attempt that may still record a delivery.
pub fn act(state: &mut DeliveryState, action: Action, in_flight: bool, now_ms: u64) -> Acted {
    match action {
        Action::Hold if state.held => Acted::Unchanged,
        Action::Hold => {
            state.held = true;
            Acted::Record { due_ms: None }
        }
        Action::Release if !state.held => Acted::Unchanged,
        Action::Release => {
            state.held = false;
            state.next_attempt_ms = now_ms;
            Acted::Record {
                due_ms: Some(now_ms),
            }
        }
        Action::Flush if state.held => Acted::Unchanged,
        Action::Flush => {
            state.next_attempt_ms = now_ms;
            Acted::Schedule { due_ms: now_ms }
        }
        Action::Delete | Action::Bounce if in_flight => Acted::Busy,
        Action::Delete => Acted::Remove,
        Action::Bounce => {
            for recipient in state
                .recipients
                .iter_mut()
                .filter(|r| r.status == Status::Pending)
            {
                recipient.status = Status::Failed;
                recipient.last_reply = Some(BOUNCED_REPLY.into());
            }
            Acted::Finish
        }
    }
}

/// What taking over a spool does with one of its messages, from whether
/// this relay has it queued already and the state its previous owner
/// committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Takeover {
    /// Queued here already: its state gains what was committed
    /// ([`DeliveryState::merged`]).
    Merge,
    /// Every recipient is final in the record: only copies are left, to be
    /// removed (and the record with them); it is never delivered again.
    Leftover,
    /// Fetch a copy here and queue it with [`adopted_state`].
    Adopt,
}

/// Decides [`Takeover`] for one message of a spool taken over.
pub fn take_over(queued_here: bool, committed: Option<&DeliveryState>) -> Takeover {
    if queued_here {
        Takeover::Merge
    } else if committed.is_some_and(DeliveryState::is_final) {
        Takeover::Leftover
    } else {
        Takeover::Adopt
    }
}

/// A recipient its next hop refused for good during end of data (early
/// delivery), with what it said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedEarly {
    /// Index in the envelope as received.
    pub index: usize,
    /// The next hop's reply, on one line.
    pub reply: String,
    /// The next hop.
    pub remote: Option<String>,
}

/// What a message accepted at end of data enters the queue with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// The envelope's recipients (indexes as received) the queue keeps, in
    /// envelope order.
    pub kept: Vec<usize>,
    /// Their states, slot for slot.
    pub state: DeliveryState,
}

/// Accept: what end of data leaves to the queue once early delivery
/// settled some recipients. Kept are those still to deliver (`remaining`,
/// pending) and those refused early (already failed, so the queue's DSN
/// reports them with the others); recipients delivered early are left out,
/// so the queue never delivers them again.
pub fn accepted(remaining: &[usize], refused: &[RefusedEarly], now_ms: u64) -> Queued {
    let mut kept: Vec<usize> = remaining.to_vec();
    kept.extend(refused.iter().map(|r| r.index));
    kept.sort_unstable();
    kept.dedup();
    let mut state = DeliveryState::new(kept.len(), now_ms);
    for (slot, index) in kept.iter().enumerate() {
        if let Some(refused) = refused.iter().find(|r| r.index == *index) {
            let recipient = &mut state.recipients[slot];
            recipient.status = Status::Failed;
            recipient.last_reply = Some(refused.reply.clone());
            recipient.remote = refused.remote.clone();
        }
    }
    Queued { kept, state }
}

/// The state a message taken over is queued with: the committed one (a
/// recipient recorded as delivered is never delivered again), or a new one
/// when nothing was committed; due now. `None` when the record does not fit
/// the envelope's `recipients` (left alone, with a log line by the driver).
pub fn adopted_state(
    committed: Option<&DeliveryState>,
    recipients: usize,
    now_ms: u64,
) -> Option<DeliveryState> {
    let mut state = committed
        .cloned()
        .unwrap_or_else(|| DeliveryState::new(recipients, now_ms));
    if state.recipients.len() != recipients {
        return None;
    }
    state.next_attempt_ms = now_ms;
    Some(state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const MINUTE: u64 = 60_000;
    const HOUR: u64 = 60 * MINUTE;
    const DAY: u64 = 24 * HOUR;

    #[test]
    fn accepted_keeps_what_is_left_and_what_was_refused_never_what_was_delivered() {
        let refused = RefusedEarly {
            index: 3,
            reply: "550 5.1.1 no such user".into(),
            remote: Some("mx.example".into()),
        };
        // Recipients 0..5: 1 and 4 delivered early, 3 refused, 0 and 2 left.
        let queued = accepted(&[0, 2], std::slice::from_ref(&refused), 42);
        assert_eq!(queued.kept, vec![0, 2, 3]);
        let statuses: Vec<Status> = queued.state.recipients.iter().map(|r| r.status).collect();
        assert_eq!(
            statuses,
            vec![Status::Pending, Status::Pending, Status::Failed]
        );
        assert_eq!(
            queued.state.recipients[2].last_reply.as_deref(),
            Some("550 5.1.1 no such user")
        );
        assert_eq!(
            queued.state.recipients[2].remote.as_deref(),
            Some("mx.example")
        );
        assert_eq!(queued.state.recipients.len(), queued.kept.len());
        // Nothing settled early: everything is queued, pending.
        let whole = accepted(&[0, 1, 2], &[], 42);
        assert_eq!(whole.kept, vec![0, 1, 2]);
        assert!(whole
            .state
            .recipients
            .iter()
            .all(|r| r.status == Status::Pending));
    }

    fn schedule() -> Vec<Duration> {
        [5, 10, 20, 40, 80, 160, 240]
            .iter()
            .map(|m| Duration::from_secs(m * 60))
            .collect()
    }

    fn answer(index: usize, said: Said) -> Answer {
        Answer {
            index,
            said,
            reply: format!("{said:?}"),
            remote: Some("mx.example.net".into()),
        }
    }

    /// One simulated message: arrival, state, when it is due, and what its
    /// recipients were told over its life.
    struct Message {
        arrival_ms: u64,
        state: DeliveryState,
        due_ms: u64,
        finished_ms: Option<u64>,
        delivered_twice: bool,
        warned_at: Option<u64>,
        attempts_at: Vec<u64>,
    }

    /// A week of a queue: messages arrive every few minutes with one to
    /// four recipients; each attempt asks about the pending recipients only
    /// (as the driver does), and the next hop answers at random, some
    /// destinations deferring for days. After each attempt the invariants
    /// are checked; at the end every message is finished within its
    /// maximum age plus one retry.
    #[test]
    fn a_simulated_week_keeps_the_lifecycle_invariants() {
        let schedule = schedule();
        let rules = Rules {
            retry_schedule: &schedule,
            max_age: Duration::from_millis(5 * DAY),
            delay_warning: Some(Duration::from_millis(4 * HOUR)),
        };
        for seed in 0..20u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut messages: Vec<Message> = Vec::new();
            let mut now = 0;
            let mut next_arrival = 0;
            let end = 7 * DAY;
            while now <= end {
                if now >= next_arrival && now < 2 * DAY {
                    let recipients = rng.random_range(1..=4);
                    messages.push(Message {
                        arrival_ms: now,
                        state: DeliveryState::new(recipients, now),
                        due_ms: now,
                        finished_ms: None,
                        delivered_twice: false,
                        warned_at: None,
                        attempts_at: Vec::new(),
                    });
                    next_arrival = now + rng.random_range(1..10) * MINUTE;
                }
                for message in messages
                    .iter_mut()
                    .filter(|m| m.finished_ms.is_none() && m.due_ms <= now)
                {
                    let before = message.state.clone();
                    // The driver asks only about pending recipients.
                    let answers: Vec<Answer> = message
                        .state
                        .pending()
                        .into_iter()
                        .map(|index| {
                            let said = match rng.random_range(0..100) {
                                0..60 => Said::Delivered,
                                60..65 => Said::Failed,
                                _ => Said::Deferred,
                            };
                            answer(index, said)
                        })
                        .collect();
                    message.attempts_at.push(now);
                    let settled = settle(
                        &mut message.state,
                        &answers,
                        message.arrival_ms,
                        now,
                        &rules,
                    );
                    assert_eq!(settled.ignored, 0);
                    assert_eq!(message.state.attempts, before.attempts + 1);
                    for (old, new) in before.recipients.iter().zip(&message.state.recipients) {
                        if old.status != Status::Pending {
                            // Final is final: never delivered or failed again.
                            assert_eq!(old, new);
                        }
                    }
                    for answer in &answers {
                        if answer.said == Said::Delivered
                            && before.recipients[answer.index].status == Status::Delivered
                        {
                            message.delivered_twice = true;
                        }
                    }
                    match settled.next {
                        Next::Finish => {
                            assert!(message.state.is_final());
                            message.finished_ms = Some(now);
                        }
                        Next::Retry { at_ms, warn_delay } => {
                            assert!(!message.state.is_final());
                            assert!(at_ms > now, "the next attempt is later");
                            assert!(now - message.arrival_ms < rules.max_age.as_millis() as u64);
                            if warn_delay {
                                assert!(message.warned_at.is_none(), "warned twice");
                                assert!(now - message.arrival_ms >= 4 * HOUR);
                                message.warned_at = Some(now);
                                // The driver records it once the warning is queued.
                                message.state.delay_warned = true;
                            }
                            message.due_ms = at_ms;
                        }
                    }
                }
                now += MINUTE;
            }
            assert!(!messages.is_empty());
            for message in &messages {
                assert!(!message.delivered_twice);
                let finished = message
                    .finished_ms
                    .unwrap_or_else(|| panic!("seed {seed}: a message never finished"));
                let last_delay = schedule.last().unwrap().as_millis() as u64;
                assert!(finished - message.arrival_ms <= 5 * DAY + last_delay + MINUTE);
                // Attempts follow the schedule (to the simulation's minute).
                for (n, pair) in message.attempts_at.windows(2).enumerate() {
                    let wanted = retry_delay(&schedule, n as u32 + 1).as_millis() as u64;
                    assert!(pair[1] - pair[0] >= wanted && pair[1] - pair[0] < wanted + MINUTE);
                }
                // Expired recipients say so.
                for recipient in &message.state.recipients {
                    if recipient.status == Status::Failed
                        && finished - message.arrival_ms >= 5 * DAY
                    {
                        let reply = recipient.last_reply.as_deref().unwrap_or_default();
                        assert!(reply.contains("expired") || reply == "Failed", "{reply}");
                    }
                }
            }
        }
    }

    /// One message in the faulty simulation.
    struct Faulty {
        arrival_ms: u64,
        /// What survives a crash or a hand-over: the last recorded state
        /// (the journal's, or in a cluster the committed one).
        durable: Option<DeliveryState>,
        /// The queue's entry and when it is due; gone after a crash until
        /// recovery, and for good once the message is finished.
        memory: Option<(DeliveryState, u64)>,
        finished: bool,
        /// Per recipient: deliveries made, and deliveries a crash or lost
        /// claim caught before they were recorded (each may be repeated).
        delivered: Vec<u32>,
        unrecorded: Vec<u32>,
        last_seen: DeliveryState,
        /// Held by the operator, who releases it at this time.
        held_until: Option<u64>,
        /// Deleted by the operator (finished without a report).
        removed: bool,
    }

    /// A week with faults and an operator. Each attempt may be cut short by
    /// a crash after the next hop answered (nothing recorded), its save may
    /// fail, its commit may fail, or (in a cluster) its claim may be lost,
    /// another relay then taking it over from the last recorded state
    /// ([`take_over`], [`adopted_state`]; a restart recovers the same way).
    /// Meanwhile an operator holds (releasing hours later), releases,
    /// flushes, deletes and bounces messages ([`act`]). Checked: a recipient
    /// recorded as delivered is never delivered again, not even by a bounce;
    /// a recipient is delivered more than once only for deliveries a fault
    /// caught unrecorded; a held message is never attempted until released,
    /// across crashes and takeovers; every message not deleted is finished,
    /// each recipient delivered or failed: none lost.
    #[test]
    fn crashes_failed_saves_and_lost_claims_lose_nothing_and_repeat_only_unrecorded_deliveries() {
        let schedule = schedule();
        let rules = Rules {
            retry_schedule: &schedule,
            max_age: Duration::from_millis(3 * DAY),
            delay_warning: None,
        };
        let mut faults_seen = [0usize; 4];
        let mut actions_seen = [0usize; 5];
        for seed in 0..40u64 {
            let clustered = seed % 2 == 1;
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut messages: Vec<Faulty> = Vec::new();
            let mut now = 0;
            while now <= 5 * DAY {
                if now < DAY && rng.random_range(0..5) == 0 {
                    let recipients = rng.random_range(1..=3);
                    let state = DeliveryState::new(recipients, now);
                    messages.push(Faulty {
                        arrival_ms: now,
                        durable: None,
                        memory: Some((state.clone(), now)),
                        finished: false,
                        delivered: vec![0; recipients],
                        unrecorded: vec![0; recipients],
                        last_seen: state,
                        held_until: None,
                        removed: false,
                    });
                }
                for message in messages.iter_mut().filter(|m| !m.finished) {
                    operate(message, &mut rng, now, &mut actions_seen);
                }
                let mut crashed = false;
                for message in messages.iter_mut().filter(|m| !m.finished) {
                    let Some((mut state, due)) = message.memory.clone() else {
                        continue;
                    };
                    if due > now || crashed {
                        continue;
                    }
                    if state.held {
                        // The driver never attempts a held message.
                        assert!(message.held_until.is_some(), "seed {seed}: held by nobody");
                        continue;
                    }
                    assert!(
                        message.held_until.is_none(),
                        "seed {seed}: a held message was attempted (the hold was lost)"
                    );
                    let answers: Vec<Answer> = state
                        .pending()
                        .into_iter()
                        .map(|index| {
                            let said = match rng.random_range(0..100) {
                                0..50 => Said::Delivered,
                                50..53 => Said::Failed,
                                _ => Said::Deferred,
                            };
                            answer(index, said)
                        })
                        .collect();
                    for a in answers.iter().filter(|a| a.said == Said::Delivered) {
                        let recorded = message
                            .durable
                            .as_ref()
                            .is_some_and(|d| d.recipients[a.index].status == Status::Delivered);
                        assert!(!recorded, "seed {seed}: a recorded delivery was repeated");
                        message.delivered[a.index] += 1;
                    }
                    let settled = settle(&mut state, &answers, message.arrival_ms, now, &rules);
                    let fault = rng.random_range(0..100);
                    if fault < 2 {
                        // Crash before anything was recorded.
                        faults_seen[0] += 1;
                        crashed = true;
                        message.memory = Some((state, due));
                        continue;
                    }
                    let recorded = if !must_record(&state, clustered) {
                        Recorded::Skipped
                    } else if fault < 5 {
                        faults_seen[1] += 1;
                        Recorded::SaveFailed
                    } else if clustered && fault < 8 {
                        faults_seen[2] += 1;
                        Recorded::CommitFailed { still_owned: true }
                    } else if clustered && fault < 9 {
                        faults_seen[3] += 1;
                        Recorded::CommitFailed { still_owned: false }
                    } else {
                        Recorded::Committed
                    };
                    if recorded == Recorded::Committed {
                        message.durable = Some(state.clone());
                    }
                    if fault >= 9 && !state.is_final() {
                        // No fault: a message still queued has its outcome recorded.
                        assert_eq!(message.durable.as_ref(), Some(&state), "seed {seed}");
                    }
                    message.last_seen = state.clone();
                    match after_recording(settled.next, recorded, now) {
                        Then::Finish => {
                            assert!(state.is_final());
                            assert!(
                                matches!(recorded, Recorded::Skipped | Recorded::Committed),
                                "finished on an outcome that is not durable"
                            );
                            // A cluster learns every final outcome before the
                            // copies go: a replica left behind must not be
                            // taken over and delivered again.
                            assert!(!clustered || recorded == Recorded::Committed);
                            message.finished = true;
                            message.memory = None;
                        }
                        Then::Keep { at_ms, uncommitted } => {
                            assert!(at_ms > now);
                            // Nothing is delivered under a lost claim.
                            assert_ne!(recorded, Recorded::CommitFailed { still_owned: false });
                            assert_eq!(
                                uncommitted,
                                matches!(recorded, Recorded::CommitFailed { .. })
                            );
                            message.memory = Some((state, at_ms));
                        }
                        Then::Forget => {
                            assert_eq!(recorded, Recorded::CommitFailed { still_owned: false });
                            // Another relay carries on from the record.
                            message.memory = Some((state, now));
                            lose_memory(message, now);
                        }
                    }
                }
                if crashed {
                    for message in messages.iter_mut().filter(|m| !m.finished) {
                        lose_memory(message, now);
                    }
                }
                now += MINUTE;
            }
            for message in &messages {
                assert!(message.finished, "seed {seed}: a message was lost");
                for (index, recipient) in message.last_seen.recipients.iter().enumerate() {
                    match recipient.status {
                        Status::Delivered => assert!(message.delivered[index] >= 1),
                        Status::Failed => {}
                        Status::Pending if message.removed => {}
                        Status::Pending => panic!("seed {seed}: finished with a pending recipient"),
                    }
                    assert!(
                        message.delivered[index] <= 1 + message.unrecorded[index],
                        "seed {seed}: delivered {} times with {} unrecorded",
                        message.delivered[index],
                        message.unrecorded[index]
                    );
                }
            }
        }
        assert!(
            faults_seen.iter().all(|&n| n > 10),
            "every fault was injected: {faults_seen:?}"
        );
        assert!(
            actions_seen.iter().all(|&n| n > 10),
            "every action was taken: {actions_seen:?}"
        );
    }

    /// The operator's turn on one message, as the queue's admin methods
    /// drive [`act`]: a held message is released when its time comes; any
    /// other may be acted on at random (before day 3, so every hold ends
    /// before the simulation does). The driver records before it answers,
    /// so a recorded change is durable.
    fn operate(
        message: &mut Faulty,
        rng: &mut rand::rngs::StdRng,
        now: u64,
        seen: &mut [usize; 5],
    ) {
        let Some((mut state, due)) = message.memory.clone() else {
            return;
        };
        let action = if message.held_until.is_some_and(|at| at <= now) {
            Action::Release
        } else if now < 3 * DAY && rng.random_range(0..600) == 0 {
            match rng.random_range(0..10) {
                0..3 => Action::Hold,
                3..5 => Action::Flush,
                5 => Action::Delete,
                6 => Action::Bounce,
                _ => Action::Release,
            }
        } else {
            return;
        };
        let before = state.clone();
        match act(&mut state, action, false, now) {
            Acted::Busy => panic!("no attempt is running"),
            Acted::Unchanged => assert_eq!(state, before),
            Acted::Record { due_ms } => {
                match action {
                    Action::Hold => {
                        seen[0] += 1;
                        assert!(due_ms.is_none());
                        message.held_until = Some(now + rng.random_range(1..12) * HOUR);
                    }
                    Action::Release => {
                        seen[1] += 1;
                        assert_eq!(due_ms, Some(now));
                        message.held_until = None;
                    }
                    other => panic!("{other:?} records nothing"),
                }
                message.durable = Some(state.clone());
                message.last_seen = state.clone();
                message.memory = Some((state, due_ms.unwrap_or(u64::MAX)));
            }
            Acted::Schedule { due_ms } => {
                seen[2] += 1;
                assert_eq!(action, Action::Flush);
                assert!(due_ms <= due.max(now));
                message.memory = Some((state, due_ms));
            }
            Acted::Remove => {
                seen[3] += 1;
                assert_eq!(action, Action::Delete);
                message.finished = true;
                message.removed = true;
                message.memory = None;
            }
            Acted::Finish => {
                seen[4] += 1;
                assert_eq!(action, Action::Bounce);
                assert!(state.is_final());
                for (old, new) in before.recipients.iter().zip(&state.recipients) {
                    if old.status != Status::Pending {
                        assert_eq!(old, new, "a bounce changed a final recipient");
                    } else {
                        assert_eq!(new.last_reply.as_deref(), Some(BOUNCED_REPLY));
                    }
                }
                message.finished = true;
                message.last_seen = state;
                message.memory = None;
            }
        }
    }

    /// A crash or hand-over: what memory held and the record lacks is
    /// forgotten (its deliveries may repeat), and the message is queued
    /// again from its record, due now.
    fn lose_memory(message: &mut Faulty, now: u64) {
        let recipients = message.delivered.len();
        let record = message.durable.clone();
        if let Some((state, _)) = &message.memory {
            for (index, recipient) in state.recipients.iter().enumerate() {
                let recorded = record
                    .as_ref()
                    .is_some_and(|d| d.recipients[index].status == Status::Delivered);
                if recipient.status == Status::Delivered && !recorded {
                    message.unrecorded[index] += 1;
                }
            }
        }
        match take_over(false, record.as_ref()) {
            Takeover::Merge => unreachable!("not queued anywhere now"),
            Takeover::Leftover => {
                // Final in the record: only its copies go.
                message.last_seen = record.expect("final record");
                message.finished = true;
                message.memory = None;
            }
            Takeover::Adopt => {
                let state = adopted_state(record.as_ref(), recipients, now)
                    .expect("the record fits the envelope");
                message.last_seen = state.clone();
                message.memory = Some((state, now));
            }
        }
    }

    #[test]
    fn delete_and_bounce_wait_for_a_running_attempt_hold_does_not() {
        let mut state = DeliveryState::new(2, 0);
        assert_eq!(act(&mut state, Action::Delete, true, 5), Acted::Busy);
        assert_eq!(act(&mut state, Action::Bounce, true, 5), Acted::Busy);
        assert_eq!(state, DeliveryState::new(2, 0));
        assert_eq!(
            act(&mut state, Action::Hold, true, 5),
            Acted::Record { due_ms: None }
        );
        assert_eq!(act(&mut state, Action::Flush, false, 6), Acted::Unchanged);
        assert_eq!(act(&mut state, Action::Hold, false, 6), Acted::Unchanged);
        assert_eq!(
            act(&mut state, Action::Release, false, 7),
            Acted::Record { due_ms: Some(7) }
        );
        assert_eq!(state.next_attempt_ms, 7);
        assert_eq!(act(&mut state, Action::Release, false, 8), Acted::Unchanged);
        assert_eq!(
            act(&mut state, Action::Flush, false, 9),
            Acted::Schedule { due_ms: 9 }
        );
        assert_eq!(act(&mut state, Action::Delete, false, 9), Acted::Remove);
    }

    #[test]
    fn a_takeover_never_queues_a_finished_message_nor_forgets_a_delivery() {
        let mut done = DeliveryState::new(2, 0);
        done.recipients[0].status = Status::Delivered;
        done.recipients[1].status = Status::Failed;
        assert_eq!(take_over(false, Some(&done)), Takeover::Leftover);
        assert_eq!(take_over(true, Some(&done)), Takeover::Merge);
        assert_eq!(take_over(false, None), Takeover::Adopt);
        let mut half = DeliveryState::new(2, 0);
        half.recipients[0].status = Status::Delivered;
        half.held = true;
        assert_eq!(take_over(false, Some(&half)), Takeover::Adopt);
        let adopted = adopted_state(Some(&half), 2, 50).unwrap();
        assert_eq!(adopted.recipients[0].status, Status::Delivered);
        assert!(adopted.held, "a hold survives the takeover");
        assert_eq!(adopted.next_attempt_ms, 50);
        assert_eq!(adopted_state(Some(&half), 3, 50), None);
        assert_eq!(adopted_state(None, 3, 50).unwrap().pending(), vec![0, 1, 2]);
    }

    #[test]
    fn an_answer_about_a_final_recipient_changes_nothing() {
        let schedule = schedule();
        let rules = Rules {
            retry_schedule: &schedule,
            max_age: Duration::from_millis(5 * DAY),
            delay_warning: None,
        };
        let mut state = DeliveryState::new(2, 0);
        let first = settle(
            &mut state,
            &[answer(0, Said::Delivered), answer(1, Said::Deferred)],
            0,
            1000,
            &rules,
        );
        assert_eq!(
            first.next,
            Next::Retry {
                at_ms: 1000 + 5 * MINUTE,
                warn_delay: false
            }
        );
        let delivered = state.recipients[0].clone();
        let second = settle(
            &mut state,
            &[answer(0, Said::Failed), answer(1, Said::Delivered)],
            0,
            2000,
            &rules,
        );
        assert_eq!(second.ignored, 1);
        assert_eq!(state.recipients[0], delivered);
        assert_eq!(second.next, Next::Finish);
    }

    #[test]
    fn pending_recipients_expire_with_their_last_error() {
        let schedule = schedule();
        let rules = Rules {
            retry_schedule: &schedule,
            max_age: Duration::from_millis(DAY),
            delay_warning: Some(Duration::from_millis(HOUR)),
        };
        let mut state = DeliveryState::new(2, 0);
        let settled = settle(
            &mut state,
            &[answer(0, Said::Delivered), answer(1, Said::Deferred)],
            0,
            DAY,
            &rules,
        );
        assert_eq!(settled.expired, 1);
        assert_eq!(settled.next, Next::Finish);
        assert_eq!(state.recipients[0].status, Status::Delivered);
        assert_eq!(state.recipients[1].status, Status::Failed);
        assert_eq!(
            state.recipients[1].last_reply.as_deref(),
            Some("554 4.4.7 Message expired after 1day; last error: Deferred")
        );
    }
}
