//! The spool: message ids, wire-format `.eml` files, `.env` envelopes, the
//! local spool, the object-store copy, the quorum writer and recovery on start.
//!
//! INTERFACE STUB — being implemented; signatures are the contract.

pub mod envelope;

use std::time::Duration;

use crate::config::{Config, CopyKind};
use envelope::Envelope;

/// Why the spool could not take or commit a message; each maps to one SMTP reply.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The spool disk lacks room (452 4.3.1).
    #[error("insufficient spool space: {needed} octets needed, {available} available")]
    NoRoom {
        /// Octets the message (plus reserve) needs.
        needed: u64,
        /// Octets available to us.
        available: u64,
    },
    /// Fewer copies than the ack policy requires confirmed before the deadline (451 4.3.0).
    #[error("quorum not reached: {confirmed} of {required} copies confirmed ({detail})")]
    QuorumFailed {
        /// Copies that confirmed.
        confirmed: usize,
        /// Copies the policy requires.
        required: usize,
        /// What went wrong with the others.
        detail: String,
    },
    /// A local I/O error (451 4.3.0).
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The result of a successful commit.
#[derive(Debug, Clone)]
pub struct Committed {
    /// The spool id.
    pub id: String,
    /// Copies that had confirmed when the quorum was reached.
    pub confirmed: Vec<CopyKind>,
    /// Time from `commit` to quorum.
    pub quorum_time: Duration,
}

/// What recovery found on start.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Committed messages, oldest first.
    pub messages: Vec<Envelope>,
    /// Uncommitted leftovers removed.
    pub removed: usize,
    /// Damaged records moved to quarantine.
    pub quarantined: usize,
}

/// Handle to the spool; cheap to clone.
#[derive(Clone, Debug)]
pub struct Spool {}

impl Spool {
    /// Opens (creating) the spool described by `config`, runs recovery.
    pub async fn open(_config: &Config) -> Result<(Spool, Recovered), SpoolError> {
        unimplemented!()
    }

    /// Checks that a message of `size` octets fits on the spool disk.
    pub fn check_room(&self, _size: u64) -> Result<(), SpoolError> {
        unimplemented!()
    }

    /// Starts receiving a message: assigns its id and opens its `.eml`.
    pub async fn begin(&self) -> Result<Incoming, SpoolError> {
        unimplemented!()
    }
}

/// A message being received; dropped without `commit`, it leaves nothing behind.
#[derive(Debug)]
pub struct Incoming {}

impl Incoming {
    /// The spool id assigned to this message.
    pub fn id(&self) -> &str {
        unimplemented!()
    }

    /// Appends wire-format bytes.
    pub async fn write(&mut self, _data: &[u8]) -> Result<(), SpoolError> {
        unimplemented!()
    }

    /// Writes every copy the policy names and returns once the quorum confirmed;
    /// fills `id`, `data_len` and `data_sha256` of `envelope`.
    pub async fn commit(self, _envelope: Envelope) -> Result<Committed, SpoolError> {
        unimplemented!()
    }

    /// Discards the message.
    pub async fn abort(self) {}
}
