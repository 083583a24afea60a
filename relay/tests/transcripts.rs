//! Transcript tests of the SMTP session state machine: each file under
//! `tests/transcripts/` is a conversation, client input and expected replies.
//!
//! Format, one directive per line:
//! - `C: text`  the client sends `text` CRLF (escapes: `\r \n \0 \t \\`);
//! - `R: text`  the client sends `text` with escapes and no CRLF added;
//!   consecutive C/R lines go in one write, as a pipelining client sends them;
//! - `S: text`  the next reply line the server must send;
//! - `CLOSED`   the server closed the connection here;
//! - `COMMITTED n`  n messages were handed over for commit so far;
//! - `| text`   a line (CRLF added) of the last committed message, in order;
//! - `RECIPIENTS a, b ORCPT=x`  the envelope recipients of the last committed
//!   message, in order, each with its ORCPT when it has one;
//! - `CONFIG key=value`  session setting (max_recipients, max_message_size,
//!   max_line_length, max_errors, starttls, auth_external, auth_password,
//!   require_auth, require_tls, implicit_tls) or
//!   `postmaster` (the relay policy's `policy.postmaster`);
//! - `# …` comments and blank lines.
//!
//! The greeting is sent just before the first expected reply, so C lines above
//! the first S line are input sent before the greeting. The test driver plays a
//! simple policy, for a client that may not relay: the relay's own postmaster
//! (`<postmaster>`, `postmaster@mx.test`) is decided by the real
//! [`RelayPolicy`], recipients at `denied.example` get 554 5.7.1, senders at
//! `full.example` get 452 4.3.1, every message gets `250 2.0.0 Ok: queued as
//! TEST<n>`, AUTH EXTERNAL succeeds for the identity `alice` (or none asked)
//! and gets 535 5.7.8 for any other; AUTH PLAIN/LOGIN succeeds for `alice`
//! with password `secret`, closes with 421 for the password `lockout` (as
//! the driver's throttle does) and gets 535 5.7.8 for anything else.

use std::collections::VecDeque;
use std::path::Path;

use postern::config::Config;
use postern::inbound::policy::{RcptDecision, RelayPolicy};
use postern::smtp::params::RcptParams;
use postern::smtp::{Event, Reply, Session, SessionConfig, Verdict};

struct Harness {
    session: Session,
    policy: RelayPolicy,
    /// Envelope recipients of each committed message, as `RECIPIENTS` shows them.
    recipients: Vec<String>,
    started: bool,
    output: VecDeque<String>,
    closed: bool,
    current: Vec<u8>,
    committed: Vec<Vec<u8>>,
}

impl Harness {
    fn pump(&mut self) {
        if !self.started {
            self.started = true;
            self.session.start();
        }
        while let Some(event) = self.session.next_event() {
            match event {
                Event::Reply(reply) => {
                    let text = reply.to_string();
                    for line in text.split_terminator("\r\n") {
                        self.output.push_back(line.to_owned());
                    }
                }
                Event::Mail { reverse_path, .. } => {
                    let verdict = match reverse_path {
                        Some(path) if path.domain == "full.example" => {
                            Verdict::Reply(Reply::new(452, "4.3.1", "Insufficient system storage"))
                        }
                        _ => Verdict::Accept,
                    };
                    self.session.decide(verdict);
                }
                Event::Rcpt {
                    forward_path,
                    params,
                } if self.policy.is_own_postmaster(&forward_path) => {
                    let decision = self.policy.decide(None, false, &forward_path, &params);
                    match (decision.refusal(&forward_path), decision) {
                        (Some(refusal), _) => self.session.decide(Verdict::Reply(refusal)),
                        (
                            None,
                            RcptDecision::Postmaster {
                                forward_path,
                                params,
                            },
                        ) => self.session.accept_rcpt_as(forward_path, params),
                        (None, _) => self.session.decide(Verdict::Accept),
                    }
                }
                Event::Rcpt { forward_path, .. } => {
                    let verdict = if forward_path.domain == "denied.example" {
                        Verdict::Reply(Reply::new(554, "5.7.1", "Relay access denied"))
                    } else {
                        Verdict::Accept
                    };
                    self.session.decide(verdict);
                }
                Event::MessageStart => {
                    self.current.clear();
                    self.session.decide(Verdict::Accept);
                }
                Event::MessageData(bytes) => self.current.extend_from_slice(&bytes),
                Event::MessageEnd => {
                    self.committed.push(std::mem::take(&mut self.current));
                    let recipients: Vec<String> = self
                        .session
                        .transaction()
                        .rcpts
                        .iter()
                        .map(|(mailbox, params)| recipient_label(mailbox.address(), params))
                        .collect();
                    self.recipients.push(recipients.join(", "));
                    let id = format!("TEST{}", self.committed.len());
                    self.session.decide(Verdict::Reply(Reply::new(
                        250,
                        "2.0.0",
                        format!("Ok: queued as {id}"),
                    )));
                }
                Event::MessageAborted => self.current.clear(),
                Event::AuthExternal { authzid } => {
                    let verdict = if authzid.is_empty() || authzid == "alice" {
                        Verdict::Accept
                    } else {
                        Verdict::Reply(Reply::new(
                            535,
                            "5.7.8",
                            "Authentication credentials invalid",
                        ))
                    };
                    self.session.decide(verdict);
                }
                Event::AuthPassword { credentials } => {
                    let verdict = match (credentials.user.as_str(), credentials.password.expose()) {
                        ("alice", "secret")
                            if credentials.authzid.is_empty() || credentials.authzid == "alice" =>
                        {
                            Verdict::Accept
                        }
                        (_, "lockout") => {
                            self.session.abort(Reply::new(
                                421,
                                "4.7.0",
                                "Too many failed authentications",
                            ));
                            continue;
                        }
                        _ => Verdict::Reply(Reply::new(
                            535,
                            "5.7.8",
                            "Authentication credentials invalid",
                        )),
                    };
                    self.session.decide(verdict);
                }
                Event::StartTls => self.session.tls_started(),
                Event::Close => self.closed = true,
            }
        }
    }
}

fn recipient_label(address: String, params: &RcptParams) -> String {
    match &params.orcpt {
        Some(orcpt) => format!("{address} ORCPT={orcpt}"),
        None => address,
    }
}

fn unescape(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('0') => out.push(0),
            Some('t') => out.push(b'\t'),
            Some('\\') => out.push(b'\\'),
            other => panic!("bad escape \\{other:?} in {text:?}"),
        }
    }
    out
}

fn run_transcript(path: &Path) -> Result<(), String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let mut config = SessionConfig {
        hostname: "mx.test".into(),
        max_message_size: 10_485_760,
        max_recipients: 100,
        max_line_length: 1000,
        max_errors: 20,
        starttls: false,
        auth_external: false,
        auth_password: false,
        require_auth: false,
        require_tls: false,
    };
    let mut implicit_tls = false;
    let mut relay = Config::default();
    relay.hostname = config.hostname.clone();
    let mut pending_input: Vec<u8> = Vec::new();
    let mut expected_message: Option<Vec<u8>> = None;
    let mut harness: Option<Harness> = None;
    let mut lines = text.lines().enumerate().peekable();
    while let Some((number, line)) = lines.next() {
        let at = format!("{}:{}", path.display(), number + 1);
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(setting) = line.strip_prefix("CONFIG ") {
            if harness.is_some() {
                return Err(format!("{at}: CONFIG must come first"));
            }
            let (key, value) = setting
                .split_once('=')
                .ok_or(format!("{at}: CONFIG key=value"))?;
            match key.trim() {
                "max_recipients" => config.max_recipients = value.trim().parse().unwrap(),
                "max_message_size" => config.max_message_size = value.trim().parse().unwrap(),
                "max_line_length" => config.max_line_length = value.trim().parse().unwrap(),
                "max_errors" => config.max_errors = value.trim().parse().unwrap(),
                "starttls" => config.starttls = value.trim().parse().unwrap(),
                "implicit_tls" => implicit_tls = value.trim().parse().unwrap(),
                "auth_external" => config.auth_external = value.trim().parse().unwrap(),
                "auth_password" => config.auth_password = value.trim().parse().unwrap(),
                "require_auth" => config.require_auth = value.trim().parse().unwrap(),
                "require_tls" => config.require_tls = value.trim().parse().unwrap(),
                "postmaster" => relay.policy.postmaster = Some(value.trim().to_owned()),
                other => return Err(format!("{at}: unknown setting {other}")),
            }
            continue;
        }
        if harness.is_none() {
            relay
                .validate()
                .map_err(|err| format!("{at}: CONFIG: {err}"))?;
        }
        let harness = harness.get_or_insert_with(|| Harness {
            session: {
                let mut session = Session::new(config.clone());
                if implicit_tls {
                    session.tls_from_start();
                }
                session
            },
            policy: RelayPolicy::new(&relay).expect("validated"),
            recipients: Vec::new(),
            started: false,
            output: VecDeque::new(),
            closed: false,
            current: Vec::new(),
            committed: Vec::new(),
        });
        if let Some(input) = line
            .strip_prefix("C: ")
            .or(if line == "C:" { Some("") } else { None })
        {
            pending_input.extend(unescape(input));
            pending_input.extend_from_slice(b"\r\n");
            continue;
        }
        if let Some(input) = line.strip_prefix("R: ") {
            pending_input.extend(unescape(input));
            continue;
        }
        if let Some(message_line) =
            line.strip_prefix("| ")
                .or(if line == "|" { Some("") } else { None })
        {
            let message = expected_message.get_or_insert_with(Vec::new);
            message.extend(unescape(message_line));
            message.extend_from_slice(b"\r\n");
            let next_is_message = lines
                .peek()
                .is_some_and(|(_, l)| l.starts_with("| ") || *l == "|");
            if !next_is_message {
                let expected = expected_message.take().unwrap();
                let last = harness
                    .committed
                    .last()
                    .ok_or(format!("{at}: no message committed"))?;
                if *last != expected {
                    return Err(format!(
                        "{at}: committed message differs\n  got:  {:?}\n  want: {:?}",
                        String::from_utf8_lossy(last),
                        String::from_utf8_lossy(&expected)
                    ));
                }
            }
            continue;
        }
        if !pending_input.is_empty() {
            harness.session.feed(&pending_input);
            pending_input.clear();
        }
        harness.pump();
        if let Some(expected) = line.strip_prefix("S: ") {
            match harness.output.pop_front() {
                Some(got) if got == expected => {}
                Some(got) => return Err(format!("{at}: expected reply {expected:?}, got {got:?}")),
                None => return Err(format!("{at}: expected reply {expected:?}, got nothing")),
            }
        } else if line == "CLOSED" {
            if let Some(extra) = harness.output.front() {
                return Err(format!("{at}: expected close, got reply {extra:?}"));
            }
            if !harness.closed {
                return Err(format!("{at}: expected the server to close the connection"));
            }
        } else if let Some(expected) = line.strip_prefix("RECIPIENTS ") {
            match harness.recipients.last() {
                Some(got) if got == expected => {}
                got => {
                    return Err(format!(
                        "{at}: recipients of the last message: expected {expected:?}, got {got:?}"
                    ))
                }
            }
        } else if let Some(count) = line.strip_prefix("COMMITTED ") {
            let count: usize = count
                .trim()
                .parse()
                .map_err(|_| format!("{at}: COMMITTED n"))?;
            if harness.committed.len() != count {
                return Err(format!(
                    "{at}: {} messages committed, expected {count}",
                    harness.committed.len()
                ));
            }
        } else {
            return Err(format!("{at}: unknown directive {line:?}"));
        }
    }
    if let Some(harness) = harness.as_mut() {
        if !pending_input.is_empty() {
            harness.session.feed(&pending_input);
        }
        harness.pump();
        if let Some(extra) = harness.output.front() {
            return Err(format!(
                "{}: unexpected reply at end: {extra:?}",
                path.display()
            ));
        }
    }
    Ok(())
}

#[test]
fn transcripts() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/transcripts");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 10,
        "expected the transcript files in {}",
        dir.display()
    );
    let failures: Vec<String> = files
        .iter()
        .filter_map(|file| run_transcript(file).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} transcripts failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}
