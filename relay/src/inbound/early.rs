//! Early delivery's bookkeeping: what the next hops said during end-of-data
//! becomes our reply and decides what is left to queue.
//!
//! A recipient the next hop accepted is done (no queueing); one it refused
//! for good is reported to the sender — in our own reply when every
//! recipient was refused, else in a DSN; everything else (4xx, timeout,
//! unreachable, or a route without early delivery) is queued as usual.

use crate::delivery::client::RcptOutcome;
use crate::delivery::engine::RecipientResult;
use crate::smtp::Reply;

/// Early delivery's results, sorted.
#[derive(Debug, Default)]
pub struct EarlyOutcome {
    /// Accepted by their next hop.
    pub delivered: Vec<RecipientResult>,
    /// Refused for good by their next hop.
    pub refused: Vec<RecipientResult>,
    /// Indexes of recipients still to deliver, in envelope order.
    pub remaining: Vec<usize>,
    /// Those of them the next hop deferred (4xx, timeout, unreachable).
    pub deferred: Vec<RecipientResult>,
}

impl EarlyOutcome {
    /// Sorts the results of an early attempt over `recipients` recipients
    /// (those without a result were not tried).
    pub fn sort(results: Vec<RecipientResult>, recipients: usize) -> EarlyOutcome {
        let mut outcome = EarlyOutcome::default();
        let mut settled = vec![false; recipients];
        for result in results {
            match result.outcome {
                RcptOutcome::Delivered(_) => {
                    settled[result.index] = true;
                    outcome.delivered.push(result);
                }
                RcptOutcome::Failed(_) => {
                    settled[result.index] = true;
                    outcome.refused.push(result);
                }
                RcptOutcome::Deferred(_) => outcome.deferred.push(result),
            }
        }
        outcome.remaining = (0..recipients).filter(|&i| !settled[i]).collect();
        outcome
    }

    /// Whether the next hops settled nothing (the message is queued whole).
    pub fn settled_nothing(&self) -> bool {
        self.delivered.is_empty() && self.refused.is_empty()
    }

    /// The reply when every recipient was refused for good: the next hop's
    /// own (the first, when several refused), so the sender sees its verdict.
    pub fn all_refused(&self) -> Option<Reply> {
        if !self.delivered.is_empty() || !self.remaining.is_empty() {
            return None;
        }
        self.refused
            .first()
            .map(|first| first.outcome.reply().clone())
    }

    /// Moves the refused recipients back to `remaining` (when their DSN
    /// could not be queued, the queue retries them and reports them itself).
    pub fn requeue_refused(&mut self) {
        self.remaining
            .extend(self.refused.drain(..).map(|result| result.index));
        self.remaining.sort_unstable();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(index: usize, code: u16) -> RecipientResult {
        let reply = Reply::new(code, "x.0.0", format!("reply {code}"));
        RecipientResult {
            index,
            outcome: match code {
                200..=299 => RcptOutcome::Delivered(reply),
                500..=599 => RcptOutcome::Failed(reply),
                _ => RcptOutcome::Deferred(reply),
            },
            remote: Some("hop".into()),
        }
    }

    #[test]
    fn mixed_results_leave_deferred_and_untried_recipients() {
        let outcome = EarlyOutcome::sort(vec![result(0, 250), result(1, 550), result(3, 451)], 4);
        assert_eq!(outcome.delivered.len(), 1);
        assert_eq!(outcome.refused.len(), 1);
        assert_eq!(outcome.remaining, vec![2, 3]);
        assert_eq!(outcome.deferred.len(), 1);
        assert_eq!(outcome.all_refused(), None);
        assert!(!outcome.settled_nothing());
    }

    #[test]
    fn every_recipient_refused_gives_the_next_hops_reply() {
        let outcome = EarlyOutcome::sort(vec![result(1, 554), result(0, 550)], 2);
        assert!(outcome.remaining.is_empty());
        assert_eq!(outcome.all_refused().unwrap().code, 554);
    }

    #[test]
    fn refused_recipients_can_go_back_to_the_queue() {
        let mut outcome = EarlyOutcome::sort(vec![result(2, 550), result(0, 451)], 3);
        outcome.requeue_refused();
        assert!(outcome.refused.is_empty());
        assert_eq!(outcome.remaining, vec![0, 1, 2]);
    }

    #[test]
    fn nothing_settled() {
        let outcome = EarlyOutcome::sort(vec![result(0, 421)], 1);
        assert!(outcome.settled_nothing());
        assert_eq!(outcome.remaining, vec![0]);
    }
}
