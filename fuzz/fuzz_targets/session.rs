//! Arbitrary client bytes into a server `Session`, in arbitrary pieces, with
//! arbitrary verdicts; every event is drained. Beyond "no panic, no hang" it
//! checks the smuggling invariant: a message that reaches `MessageEnd` is
//! wire format (CRLF line ends only, no NUL, ends with CRLF).
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::smtp::{Event, Reply, Session, SessionConfig, Verdict};

/// Fuzzer-chosen decisions, taken from the first octets of the input.
struct Choices<'a> {
    bytes: &'a [u8],
    next: usize,
}

impl Choices<'_> {
    fn next(&mut self) -> u8 {
        let byte = self.bytes.get(self.next).copied().unwrap_or(0);
        self.next = (self.next + 1) % self.bytes.len().max(1);
        byte
    }
}

fuzz_target!(|data: &[u8]| {
    let (control, input) = data.split_at(data.len().min(8));
    let mut choices = Choices {
        bytes: control,
        next: 0,
    };
    let piece = 1 + usize::from(choices.next());
    let mut session = Session::new(SessionConfig {
        hostname: "fuzz.postern.test".into(),
        max_message_size: 64 * 1024,
        max_recipients: 4,
        max_line_length: 1000,
        max_errors: 8,
        starttls: choices.next() & 1 == 1,
        auth_external: true,
        auth_password: choices.next() & 1 == 1,
        require_auth: choices.next() & 1 == 1,
        require_tls: choices.next() & 1 == 1,
    });
    session.start();
    let mut message = Vec::new();
    for chunk in input.chunks(piece) {
        session.feed(chunk);
        drain(&mut session, &mut choices, &mut message);
        if session.is_closed() {
            return;
        }
    }
    if choices.next() & 1 == 1 {
        session.abort(Reply::new(421, "4.4.2", "timeout"));
        drain(&mut session, &mut choices, &mut message);
    }
});

fn drain(session: &mut Session, choices: &mut Choices<'_>, message: &mut Vec<u8>) {
    while let Some(event) = session.next_event() {
        match event {
            Event::AuthPassword { .. } if choices.next() < 32 => {
                session.abort(Reply::new(421, "4.7.0", "too many failures"));
            }
            Event::Mail { .. }
            | Event::Rcpt { .. }
            | Event::MessageStart
            | Event::AuthExternal { .. }
            | Event::AuthPassword { .. } => {
                message.clear();
                let verdict = match choices.next() % 8 {
                    0 => Verdict::Reply(Reply::new(450, "4.7.1", "try later")),
                    1 => Verdict::Reply(Reply::new(554, "5.7.1", "refused")),
                    _ => Verdict::Accept,
                };
                session.decide(verdict);
            }
            Event::MessageData(bytes) => message.extend_from_slice(&bytes),
            Event::MessageEnd => {
                check_wire_format(message);
                message.clear();
                let verdict = match choices.next() % 4 {
                    0 => Reply::new(451, "4.3.0", "quorum not reached"),
                    _ => Reply::new(250, "2.0.0", "Ok: queued as FUZZ"),
                };
                session.decide(Verdict::Reply(verdict));
            }
            Event::MessageAborted => message.clear(),
            Event::StartTls => session.tls_started(),
            Event::Reply(reply) => {
                let wire = reply.to_wire();
                assert!(
                    wire.ends_with(b"\r\n"),
                    "reply not CRLF-terminated: {wire:?}"
                );
            }
            Event::Close => {}
        }
    }
}

fn check_wire_format(message: &[u8]) {
    assert!(!message.contains(&0), "NUL in an accepted message");
    assert!(
        message.is_empty() || message.ends_with(b"\r\n"),
        "accepted message does not end with CRLF"
    );
    for (index, &byte) in message.iter().enumerate() {
        match byte {
            b'\r' => assert_eq!(
                message.get(index + 1),
                Some(&b'\n'),
                "bare CR at {index} in an accepted message"
            ),
            b'\n' => assert!(
                index > 0 && message[index - 1] == b'\r',
                "bare LF at {index} in an accepted message"
            ),
            _ => {}
        }
    }
}
