//! The SASL decoders of AUTH PLAIN and LOGIN: base64 (RFC 4648) and the
//! PLAIN message (RFC 4616). Whatever the input, no panic; a PLAIN message
//! that parses has a user and is exactly its three fields joined by NUL;
//! base64 decodes what it encodes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::base64;
use postern::smtp::session::parse_plain;

fuzz_target!(|input: &[u8]| {
    if let Ok(credentials) = parse_plain(input) {
        assert!(!credentials.user.is_empty());
        let joined = format!(
            "{}\0{}\0{}",
            credentials.authzid,
            credentials.user,
            credentials.password.expose()
        );
        assert_eq!(joined.as_bytes(), input);
    }
    assert_eq!(
        base64::decode(&base64::encode(input)).as_deref(),
        Some(input)
    );
    if let Ok(text) = std::str::from_utf8(input) {
        if let Some(decoded) = base64::decode(text) {
            let _ = parse_plain(&decoded);
        }
    }
});
