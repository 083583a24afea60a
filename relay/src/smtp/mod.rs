//! SMTP protocol without I/O: command parser, replies, the server session state
//! machine and the DATA/BDAT decoders. Bytes in, events and replies out.

pub mod base64;
pub mod client;
pub mod command;
pub mod data;
pub mod params;
pub mod reply;
pub mod session;

pub use reply::Reply;
pub use session::{Credentials, Event, Mechanism, Password, Session, SessionConfig, Verdict};
