//! The queue: durable per-recipient state, the retry schedule and the scheduler.

pub mod schedule;
pub mod state;
