//! Outbound delivery: routes, MX lookup, the SMTP/LMTP client and DSNs.

pub mod client;
pub mod dsn;
pub mod engine;
pub mod mx;
pub mod route;
pub mod summary;
pub mod tls;
