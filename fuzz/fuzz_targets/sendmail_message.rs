//! `postern sendmail`'s message handling: whatever a program pipes in, what
//! goes to the relay is wire format the relay accepts — CRLF line ends only,
//! no NUL, no line over 998 octets — with the Bcc: header gone.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::sendmail::message::{read_lines, Defaults, Message};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, input)) = data.split_first() else {
        return;
    };
    let Ok(lines) = read_lines(input, flags & 1 == 1, None) else {
        return; // NUL: refused with exit 65, nothing sent
    };
    let mut message = Message::parse(lines);
    let _ = message.recipients();
    message.remove_bcc();
    message.complete(&Defaults {
        from: "user@relay.test".into(),
        date: "Thu, 26 Nov 2026 04:00:00 +0000".into(),
        message_id: "<id@relay.test>".into(),
    });
    let wire = message.to_wire();
    assert!(wire.ends_with(b"\r\n"));
    assert!(!wire.contains(&0));
    for line in wire.split(|&b| b == b'\n') {
        if line.is_empty() {
            continue; // after the final LF
        }
        let body = line.strip_suffix(b"\r").expect("every line ends in CRLF");
        assert!(!body.contains(&b'\r'), "bare CR in {line:?}");
        assert!(body.len() <= 998, "line of {} octets", body.len());
    }
    let head_end = wire
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header and a body");
    let head = String::from_utf8_lossy(&wire[..head_end]).to_ascii_lowercase();
    assert!(
        !head.starts_with("bcc:") && !head.contains("\nbcc:"),
        "{head}"
    );
});
