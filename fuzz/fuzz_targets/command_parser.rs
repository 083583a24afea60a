//! Arbitrary octets as one SMTP command line, and as MAIL/RCPT arguments.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::command;
use postern::smtp::params::{decode_xtext, encode_xtext, parse_mail, parse_rcpt};

fuzz_target!(|data: &[u8]| {
    let _ = command::parse(data);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok((mailbox, params)) = parse_mail(text) {
            if let Some(mailbox) = mailbox {
                assert!(!mailbox.local.is_empty() && !mailbox.domain.is_empty());
            }
            if let Some(envid) = params.envid {
                assert_eq!(
                    decode_xtext(&encode_xtext(&envid)).as_deref(),
                    Some(envid.as_str())
                );
            }
        }
        let _ = parse_rcpt(text, false);
        let _ = parse_rcpt(text, true);
        assert_eq!(decode_xtext(&encode_xtext(text)).as_deref(), Some(text));
    }
});
