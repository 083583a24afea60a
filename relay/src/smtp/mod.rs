//! SMTP protocol without I/O: command parser, replies, the server session state
//! machine and the DATA/BDAT decoders. Bytes in, events and replies out.

pub mod params;
