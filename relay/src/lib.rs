//! Postern: an SMTP relay that answers 250 only after a durable quorum of copies.

pub mod admin;
pub mod cluster;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod health;
pub mod http;
pub mod inbound;
pub mod metrics;
pub mod peer;
pub mod queue;
pub mod scan;
pub mod sendmail;
pub mod server;
pub mod smtp;
pub mod spool;
pub mod users;
pub mod watch;
