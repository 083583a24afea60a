//! Per-recipient delivery state, kept apart from the immutable message file
//! (DESIGN.md §2.5) and recorded in the state journal
//! ([`journal`](super::journal)) before the next step. Outside a cluster a
//! message delivered to every recipient gets none: it is removed at once
//! (`Queue::attempt`).

use serde::{Deserialize, Serialize};

/// Version written by this build.
pub const STATE_VERSION: u32 = 1;

/// Where one recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Not delivered yet.
    Pending,
    /// Accepted by the next hop.
    Delivered,
    /// Refused for good or expired; a DSN reports it.
    Failed,
}

/// One recipient's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipientState {
    /// Where it stands.
    pub status: Status,
    /// The last reply (ours or the next hop's), for `queue show` and DSNs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_reply: Option<String>,
    /// The server that gave it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<String>,
}

/// The mutable state of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Format version.
    pub version: u32,
    /// Attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due (Unix ms).
    pub next_attempt_ms: u64,
    /// Held by an operator: not delivered until released.
    #[serde(default)]
    pub held: bool,
    /// A delay warning was sent.
    #[serde(default)]
    pub delay_warned: bool,
    /// Per recipient, in envelope order.
    pub recipients: Vec<RecipientState>,
}

impl DeliveryState {
    /// The state of a new message: everything pending, due now.
    pub fn new(recipients: usize, now_ms: u64) -> DeliveryState {
        DeliveryState {
            version: STATE_VERSION,
            attempts: 0,
            next_attempt_ms: now_ms,
            held: false,
            delay_warned: false,
            recipients: vec![
                RecipientState {
                    status: Status::Pending,
                    last_reply: None,
                    remote: None,
                };
                recipients
            ],
        }
    }

    /// Indexes of recipients still pending.
    pub fn pending(&self) -> Vec<usize> {
        (0..self.recipients.len())
            .filter(|&i| self.recipients[i].status == Status::Pending)
            .collect()
    }

    /// Whether every recipient is delivered or failed.
    pub fn is_final(&self) -> bool {
        self.recipients.iter().all(|r| r.status != Status::Pending)
    }

    /// This state with `other`'s knowledge added: a recipient final in
    /// either is final (delivery outcomes never go back to pending).
    pub fn merged(&self, other: &DeliveryState) -> DeliveryState {
        let mut merged = self.clone();
        merged.attempts = self.attempts.max(other.attempts);
        merged.delay_warned |= other.delay_warned;
        for (mine, theirs) in merged.recipients.iter_mut().zip(&other.recipients) {
            if mine.status == Status::Pending && theirs.status != Status::Pending {
                *mine = theirs.clone();
            }
        }
        merged
    }

    /// The last reply of any pending recipient, for listings.
    pub fn last_error(&self) -> Option<&str> {
        self.recipients
            .iter()
            .filter(|r| r.status == Status::Pending)
            .find_map(|r| r.last_reply.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_final_and_merged() {
        let mut state = DeliveryState::new(2, 5);
        state.recipients[0].status = Status::Delivered;
        assert_eq!(state.pending(), vec![1]);
        assert!(!state.is_final());
        let mut other = DeliveryState::new(2, 5);
        other.recipients[1].status = Status::Failed;
        other.attempts = 3;
        let merged = state.merged(&other);
        assert!(merged.is_final());
        assert_eq!(merged.attempts, 3);
        assert_eq!(merged.recipients[0].status, Status::Delivered);
    }
}
