//! The SMTP conversation with the relay's submission socket: greeting, EHLO,
//! `AUTH EXTERNAL =` (the relay knows the user from the socket's peer
//! credentials), then one transaction; or, for `-bs`, the same preamble and
//! then a byte-for-byte proxy between standard input/output and the socket.
//!
//! Blocking I/O on purpose: one message, one connection, no runtime. Reply
//! parsing, capabilities, command formatting and dot-stuffing are the
//! sans-I/O pieces of [`crate::smtp::client`].

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::smtp::client::{mail_command, parse_reply, rcpt_command, Capabilities, DotStuffer};
use crate::smtp::params::{Body, MailParams, Notify, RcptParams, Ret};
use crate::smtp::Reply;

/// How long to wait for each reply (RFC 5321 §4.5.3.2 gives 5 minutes for
/// most commands).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// How long to wait for the reply to the final dot (RFC 5321: 10 minutes).
pub const DATA_END_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The name sent in EHLO: the relay identifies the user from the socket, not from this.
const EHLO_NAME: &str = "localhost";

/// Where in the conversation something happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Waiting for the 220 greeting.
    Greeting,
    /// EHLO.
    Ehlo,
    /// AUTH EXTERNAL.
    Auth,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// DATA (waiting for 354).
    Data,
    /// Sending the message and waiting for the reply to the final dot.
    EndOfData,
    /// Copying bytes for `-bs`.
    Proxy,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Greeting => "the greeting",
            Stage::Ehlo => "EHLO",
            Stage::Auth => "AUTH EXTERNAL",
            Stage::Mail => "MAIL FROM",
            Stage::Rcpt => "RCPT TO",
            Stage::Data => "DATA",
            Stage::EndOfData => "the end of the message",
            Stage::Proxy => "the SMTP session",
        })
    }
}

/// What became of the message when a failure left the relay's answer unknown:
/// only after the final dot may it have been accepted.
fn fate(stage: &Stage) -> &'static str {
    match stage {
        Stage::EndOfData => "the relay may or may not have accepted the message",
        _ => "the message was NOT sent",
    }
}

/// A reply on one line: `553 5.7.1 text more text`.
pub fn one_line(reply: &Reply) -> String {
    let mut text = reply.code.to_string();
    if let Some(status) = &reply.status {
        text.push(' ');
        text.push_str(status);
    }
    for line in &reply.lines {
        if !line.is_empty() {
            text.push(' ');
            text.push_str(line);
        }
    }
    text
}

/// A recipient the relay refused permanently.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The address as sent in RCPT TO.
    pub recipient: String,
    /// The relay's 5xx reply.
    pub reply: Reply,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the relay refused recipient <{}>: {}",
            self.recipient,
            one_line(&self.reply)
        )
    }
}

/// Why the message was not (or not surely) submitted. Each maps to a
/// sysexits.h code through [`SendError::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Connecting to the socket failed: no such file, refused, permission denied.
    #[error("the relay is not reachable at {} ({source}); the message was NOT sent", .path.display())]
    Unreachable {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        source: io::Error,
    },
    /// A 4xx reply: nothing was accepted; trying again later may work.
    #[error("the relay refused temporarily at {stage}: {}; the message was NOT sent", one_line(.reply))]
    Temporary {
        /// Where.
        stage: Stage,
        /// The reply.
        reply: Reply,
    },
    /// AUTH EXTERNAL refused with 535 or a 5.7.x status: this user may not submit.
    #[error("the relay did not accept this user (AUTH EXTERNAL): {}; the message was NOT sent", one_line(.reply))]
    AuthRefused {
        /// The reply.
        reply: Reply,
    },
    /// MAIL FROM refused with a 5.7.x status: this user may not use that sender.
    #[error("the relay refused sender <{sender}>: {}; the message was NOT sent", one_line(.reply))]
    SenderRefused {
        /// The envelope sender as sent.
        sender: String,
        /// The reply.
        reply: Reply,
    },
    /// Every RCPT TO got a 5xx reply.
    #[error("the relay refused every recipient; the message was NOT sent")]
    NoRecipientAccepted {
        /// Each recipient and its reply.
        refused: Vec<Refusal>,
    },
    /// Another 5xx reply (EHLO, MAIL FROM without 5.7.x, DATA, the final dot).
    #[error("the relay refused the message at {stage}: {}; the message was NOT sent", one_line(.reply))]
    Refused {
        /// Where.
        stage: Stage,
        /// The reply.
        reply: Reply,
    },
    /// Larger than the SIZE the relay announced in its EHLO reply.
    #[error("the message is {size} octets, more than the {limit} the relay accepts; the message was NOT sent")]
    TooLarge {
        /// The message's size with CRLF line ends.
        size: u64,
        /// The relay's SIZE.
        limit: u64,
    },
    /// No reply in time.
    #[error("the relay did not answer within {} seconds at {stage}; {}", .waited.as_secs(), fate(.stage))]
    Timeout {
        /// Where.
        stage: Stage,
        /// How long we waited.
        waited: Duration,
    },
    /// The relay closed the connection.
    #[error("the relay closed the connection at {stage}; {}", fate(.stage))]
    Closed {
        /// Where.
        stage: Stage,
    },
    /// Reading or writing the socket failed.
    #[error("the connection to the relay failed at {stage} ({source}); {}", fate(.stage))]
    Io {
        /// Where.
        stage: Stage,
        /// The error.
        source: io::Error,
    },
    /// The relay sent something that is not an SMTP reply, or not the one expected.
    #[error("the relay's answer at {stage} is not what SMTP allows ({detail}); {}", fate(.stage))]
    Protocol {
        /// Where.
        stage: Stage,
        /// What was wrong.
        detail: String,
    },
}

impl SendError {
    /// The sysexits.h code: 75 EX_TEMPFAIL for anything worth retrying,
    /// 76 EX_PROTOCOL, 77 EX_NOPERM, 67 EX_NOUSER, 69 EX_UNAVAILABLE,
    /// 65 EX_DATAERR for a message too large.
    pub fn exit_code(&self) -> u8 {
        use super::exit;
        match self {
            SendError::Unreachable { .. }
            | SendError::Temporary { .. }
            | SendError::Timeout { .. }
            | SendError::Closed { .. }
            | SendError::Io { .. } => exit::TEMPFAIL,
            SendError::Protocol { .. } => exit::PROTOCOL,
            SendError::AuthRefused { .. } | SendError::SenderRefused { .. } => exit::NOPERM,
            SendError::NoRecipientAccepted { .. } => exit::NOUSER,
            SendError::Refused { .. } => exit::UNAVAILABLE,
            SendError::TooLarge { .. } => exit::DATAERR,
        }
    }
}

/// The envelope of one submission.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Envelope {
    /// The reverse path; empty for the null sender `<>`.
    pub sender: String,
    /// Forward paths, in order, without duplicates.
    pub recipients: Vec<String>,
    /// NOTIFY= for every recipient (`-N`).
    pub notify: Option<Vec<Notify>>,
    /// RET= (`-R`).
    pub ret: Option<Ret>,
    /// ENVID= (`-V`).
    pub envid: Option<String>,
    /// BODY= (`-B`); without it, 8BITMIME is declared when the message has 8-bit octets.
    pub body: Option<Body>,
}

/// A message the relay accepted, and the recipients it refused (5xx) while
/// accepting others.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outcome {
    /// Refused recipients; empty when all were accepted.
    pub refused: Vec<Refusal>,
}

/// A stream whose reads can be bounded in time.
pub trait Transport: Read + Write {
    /// Fails reads that wait longer than `timeout`.
    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl Transport for UnixStream {
    fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        UnixStream::set_read_timeout(self, Some(timeout))
    }
}

/// Connects to the submission socket.
pub fn connect(path: &Path) -> Result<UnixStream, SendError> {
    let unreachable = |source| SendError::Unreachable {
        path: path.to_owned(),
        source,
    };
    let stream = UnixStream::connect(path).map_err(unreachable)?;
    // A relay that stops reading must not hang us forever either.
    stream
        .set_write_timeout(Some(REPLY_TIMEOUT))
        .map_err(unreachable)?;
    Ok(stream)
}

/// One SMTP client connection. `trace`, when given, receives the dialog as
/// `<<< ` server lines and `>>> ` client lines (`-v`); message content is not
/// traced.
pub struct Client<'a, T: Transport> {
    stream: T,
    /// Received octets not yet parsed into a reply.
    pending: Vec<u8>,
    trace: Option<&'a mut dyn Write>,
    /// Per-reply timeout.
    pub reply_timeout: Duration,
    /// Timeout for the reply to the final dot.
    pub data_end_timeout: Duration,
}

impl<'a, T: Transport> Client<'a, T> {
    /// A client on a connected stream.
    pub fn new(stream: T, trace: Option<&'a mut dyn Write>) -> Self {
        Client {
            stream,
            pending: Vec::new(),
            trace,
            reply_timeout: REPLY_TIMEOUT,
            data_end_timeout: DATA_END_TIMEOUT,
        }
    }

    fn trace(&mut self, prefix: &str, text: &[u8]) {
        if let Some(trace) = self.trace.as_mut() {
            for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                // Trace output is best effort: a closed stderr must not stop the mail.
                let _ = writeln!(trace, "{prefix}{}", String::from_utf8_lossy(line));
            }
        }
    }

    fn read_reply(&mut self, stage: Stage, timeout: Duration) -> Result<Reply, SendError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(|source| SendError::Io { stage, source })?;
        loop {
            match parse_reply(&self.pending) {
                Ok(Some((reply, used))) => {
                    let raw: Vec<u8> = self.pending.drain(..used).collect();
                    self.trace("<<< ", &raw);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(err) => {
                    return Err(SendError::Protocol {
                        stage,
                        detail: err.to_string(),
                    })
                }
            }
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(SendError::Closed { stage }),
                Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) if is_timeout(&err) => {
                    return Err(SendError::Timeout {
                        stage,
                        waited: timeout,
                    })
                }
                Err(source) => return Err(SendError::Io { stage, source }),
            }
        }
    }

    fn write(&mut self, stage: Stage, bytes: &[u8]) -> Result<(), SendError> {
        self.stream.write_all(bytes).map_err(|source| {
            if is_timeout(&source) {
                SendError::Timeout {
                    stage,
                    waited: REPLY_TIMEOUT,
                }
            } else {
                SendError::Io { stage, source }
            }
        })
    }

    /// Sends one command line (with its CRLF) and reads the reply.
    fn command(&mut self, stage: Stage, line: &str) -> Result<Reply, SendError> {
        self.trace(">>> ", line.as_bytes());
        self.write(stage, line.as_bytes())?;
        self.read_reply(stage, self.reply_timeout)
    }

    /// Reads the greeting, sends EHLO and `AUTH EXTERNAL =`. Returns the
    /// greeting (for `-bs`) and the relay's capabilities.
    pub fn open(&mut self) -> Result<(Reply, Capabilities), SendError> {
        let greeting = self.read_reply(Stage::Greeting, self.reply_timeout)?;
        expect(Stage::Greeting, &greeting, 220)?;
        let ehlo = self.command(Stage::Ehlo, &format!("EHLO {EHLO_NAME}\r\n"))?;
        expect(Stage::Ehlo, &ehlo, 250)?;
        let caps = Capabilities::from_ehlo(&ehlo);
        // Sent even when EXTERNAL is not listed: the relay's answer then says
        // more than a guess would.
        let auth = self.command(Stage::Auth, "AUTH EXTERNAL =\r\n")?;
        if auth.is_permanent() && (auth.code == 535 || is_policy(&auth)) {
            return Err(SendError::AuthRefused { reply: auth });
        }
        expect(Stage::Auth, &auth, 235)?;
        Ok((greeting, caps))
    }

    /// Runs one transaction for `message` (wire form: CRLF, not dot-stuffed).
    /// Any 4xx aborts it before DATA, so that nobody gets the message and the
    /// caller can retry it whole; 5xx recipients are skipped and reported.
    pub fn send(
        &mut self,
        caps: &Capabilities,
        envelope: &Envelope,
        message: &[u8],
    ) -> Result<Outcome, SendError> {
        let size = message.len() as u64;
        if let Some(limit) = caps.size.filter(|&limit| limit > 0) {
            if size > limit {
                return Err(SendError::TooLarge { size, limit });
            }
        }
        let body = envelope.body.or_else(|| {
            message
                .iter()
                .any(|&b| b >= 0x80)
                .then_some(Body::EightBitMime)
        });
        let params = MailParams {
            size: Some(size),
            body,
            smtputf8: !envelope.sender.is_ascii()
                || envelope.recipients.iter().any(|r| !r.is_ascii()),
            ret: envelope.ret,
            envid: envelope.envid.clone(),
        };
        let mail = self.command(
            Stage::Mail,
            &mail_command(&envelope.sender, &params, size, caps),
        )?;
        if mail.is_permanent() && is_policy(&mail) {
            return Err(SendError::SenderRefused {
                sender: envelope.sender.clone(),
                reply: mail,
            });
        }
        expect(Stage::Mail, &mail, 250)?;
        let rcpt_params = RcptParams {
            notify: envelope.notify.clone(),
            orcpt: None,
        };
        let mut refused = Vec::new();
        for recipient in &envelope.recipients {
            let reply = self.command(Stage::Rcpt, &rcpt_command(recipient, &rcpt_params, caps))?;
            if reply.is_permanent() {
                refused.push(Refusal {
                    recipient: recipient.clone(),
                    reply,
                });
            } else {
                expect(Stage::Rcpt, &reply, 250)?;
            }
        }
        if refused.len() == envelope.recipients.len() {
            return Err(SendError::NoRecipientAccepted { refused });
        }
        let data = self.command(Stage::Data, "DATA\r\n")?;
        expect(Stage::Data, &data, 354)?;
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        for chunk in message.chunks(64 * 1024) {
            out.clear();
            stuffer.stuff(chunk, &mut out);
            self.write(Stage::EndOfData, &out)?;
        }
        self.trace(">>> ", b".");
        self.write(Stage::EndOfData, stuffer.finish())?;
        let end = self.read_reply(Stage::EndOfData, self.data_end_timeout)?;
        expect(Stage::EndOfData, &end, 250)?;
        Ok(Outcome { refused })
    }

    /// Says QUIT and waits briefly for the 221; failures do not matter by then.
    pub fn quit(&mut self) {
        self.trace(">>> ", b"QUIT");
        if self.stream.write_all(b"QUIT\r\n").is_ok() {
            let _ = self.read_reply(Stage::Proxy, Duration::from_secs(5));
        }
    }

    /// The stream and the octets already received but not yet used.
    pub fn into_parts(self) -> (T, Vec<u8>) {
        (self.stream, self.pending)
    }
}

fn is_timeout(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// An enhanced status of class 5.7 (security or policy).
fn is_policy(reply: &Reply) -> bool {
    reply
        .status
        .as_deref()
        .is_some_and(|status| status.starts_with("5.7."))
}

/// `Ok` for the expected code; otherwise the error its class calls for.
fn expect(stage: Stage, reply: &Reply, code: u16) -> Result<(), SendError> {
    if reply.code == code || (code == 250 && reply.code == 251) {
        return Ok(());
    }
    let reply = reply.clone();
    Err(if reply.is_transient() {
        SendError::Temporary { stage, reply }
    } else if reply.is_permanent() {
        SendError::Refused { stage, reply }
    } else {
        SendError::Protocol {
            stage,
            detail: format!("expected {code}, got {}", one_line(&reply)),
        }
    })
}

/// Submits one message over `stream`: the whole conversation, QUIT included
/// (also after a refusal, so the relay logs a clean end). `build` makes the
/// envelope and the wire message once the relay has named itself in its
/// greeting (the domain bare local parts are qualified with).
pub fn submit<T: Transport>(
    stream: T,
    trace: Option<&mut dyn Write>,
    build: impl FnOnce(&str) -> (Envelope, Vec<u8>),
) -> Result<Outcome, SendError> {
    let mut client = Client::new(stream, trace);
    let result = client.open().and_then(|(greeting, caps)| {
        let relay_name = greeting
            .lines
            .first()
            .and_then(|line| line.split_whitespace().next())
            .unwrap_or("localhost");
        let (envelope, message) = build(relay_name);
        client.send(&caps, &envelope, &message)
    });
    match &result {
        Err(SendError::Io { .. } | SendError::Closed { .. } | SendError::Timeout { .. }) => {}
        _ => client.quit(),
    }
    result
}

/// `-bs`: authenticates on `stream`, then hands the session to the caller:
/// writes the relay's greeting to `output` and copies bytes both ways until
/// either side closes. When the preamble fails, `output` gets a `421` so an
/// SMTP-speaking caller sees why, and the error is returned.
pub fn serve_stdio(
    stream: UnixStream,
    trace: Option<&mut dyn Write>,
    input: Box<dyn Read + Send>,
    output: &mut dyn Write,
) -> Result<(), SendError> {
    let mut client = Client::new(stream, trace);
    let greeting = match client.open() {
        Ok((greeting, _)) => greeting,
        Err(err) => {
            let _ = write!(output, "421 4.3.0 {err}\r\n");
            let _ = output.flush();
            return Err(err);
        }
    };
    let (stream, pending) = client.into_parts();
    let io_error = |source| SendError::Io {
        stage: Stage::Proxy,
        source,
    };
    // The caller speaks at its own pace: no reply timeout from here on.
    stream.set_read_timeout(None).map_err(io_error)?;
    stream.set_write_timeout(None).map_err(io_error)?;
    output.write_all(&greeting.to_wire()).map_err(io_error)?;
    output.write_all(&pending).map_err(io_error)?;
    output.flush().map_err(io_error)?;
    let mut upstream = stream.try_clone().map_err(io_error)?;
    // Not joined: when the relay ends the session, standard input may still be
    // open, and the process exiting is what ends this thread.
    std::thread::spawn(move || {
        let mut input = input;
        let _ = io::copy(&mut input, &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    let mut downstream = stream;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = match downstream.read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(io_error(source)),
        };
        output.write_all(&chunk[..n]).map_err(io_error)?;
        output.flush().map_err(io_error)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    /// What the fake relay saw: command lines, and the raw DATA octets up to
    /// and including the final dot.
    #[derive(Debug, Default)]
    struct Seen {
        commands: Vec<String>,
        data: Vec<u8>,
    }

    /// A scripted relay: answers each command with the reply the script
    /// gives for it (by verb), 354 DATA with the reply for ".".
    fn fake_relay(dir: &Path, script: fn(&str) -> &'static str) -> (PathBuf, JoinHandle<Seen>) {
        let path = dir.join("submit.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            let mut seen = Seen::default();
            writer.write_all(script("greeting").as_bytes()).unwrap();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    return seen;
                }
                let command = line.trim_end().to_owned();
                seen.commands.push(command.clone());
                let verb = command
                    .split([' ', ':'])
                    .next()
                    .unwrap()
                    .to_ascii_uppercase();
                let reply = script(&verb);
                let _ = writer.write_all(reply.as_bytes());
                if verb == "DATA" && reply.starts_with("354") {
                    loop {
                        let mut data = Vec::new();
                        reader.read_until(b'\n', &mut data).unwrap();
                        seen.data.extend_from_slice(&data);
                        if data == b".\r\n" || data.is_empty() {
                            break;
                        }
                    }
                    let _ = writer.write_all(script(".").as_bytes());
                }
                if verb == "QUIT" {
                    return seen;
                }
            }
        });
        (path, handle)
    }

    fn happy(verb: &str) -> &'static str {
        match verb {
            "greeting" => "220 relay.test ESMTP Postern\r\n",
            "EHLO" => {
                "250-relay.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n\
                       250-DSN\r\n250-SIZE 1000\r\n250-ENHANCEDSTATUSCODES\r\n250 AUTH EXTERNAL\r\n"
            }
            "AUTH" => "235 2.7.0 Authentication successful\r\n",
            "MAIL" | "RCPT" => "250 2.1.0 Ok\r\n",
            "DATA" => "354 End data with <CR><LF>.<CR><LF>\r\n",
            "." => "250 2.0.0 Ok: queued as X\r\n",
            "QUIT" => "221 2.0.0 Bye\r\n",
            _ => "502 5.5.1 unexpected\r\n",
        }
    }

    fn envelope(recipients: &[&str]) -> Envelope {
        Envelope {
            sender: "joe".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            ..Envelope::default()
        }
    }

    fn run(
        script: fn(&str) -> &'static str,
        envelope: &Envelope,
        message: &[u8],
    ) -> (Result<Outcome, SendError>, Seen) {
        let dir = tempfile::tempdir().unwrap();
        let (path, relay) = fake_relay(dir.path(), script);
        let result = connect(&path)
            .and_then(|stream| submit(stream, None, |_| (envelope.clone(), message.to_vec())));
        (result, relay.join().unwrap())
    }

    #[test]
    fn a_successful_submission_sends_exactly_this() {
        let mut env = envelope(&["a@x", "b@y"]);
        env.notify = Some(vec![Notify::Success, Notify::Failure]);
        env.ret = Some(Ret::Hdrs);
        env.envid = Some("id+1".into());
        let message = b"Subject: s\r\n\r\n.leading dot\r\n.\r\nend\r\n";
        let (result, seen) = run(happy, &env, message);
        assert_eq!(result.unwrap(), Outcome::default());
        assert_eq!(
            seen.commands,
            vec![
                "EHLO localhost",
                "AUTH EXTERNAL =",
                "MAIL FROM:<joe> SIZE=36 RET=HDRS ENVID=id+2B1",
                "RCPT TO:<a@x> NOTIFY=SUCCESS,FAILURE",
                "RCPT TO:<b@y> NOTIFY=SUCCESS,FAILURE",
                "DATA",
                "QUIT",
            ]
        );
        assert_eq!(
            seen.data,
            b"Subject: s\r\n\r\n..leading dot\r\n..\r\nend\r\n.\r\n".to_vec()
        );
    }

    #[test]
    fn eight_bit_content_declares_8bitmime_and_the_null_sender_is_empty() {
        let mut env = envelope(&["a@x"]);
        env.sender = String::new();
        let (result, seen) = run(happy, &env, "Subject: é\r\n\r\n".as_bytes());
        result.unwrap();
        assert_eq!(seen.commands[2], "MAIL FROM:<> SIZE=15 BODY=8BITMIME");
    }

    #[test]
    fn the_relay_down_is_a_temporary_failure() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("submit.sock");
        let err = connect(&path).unwrap_err();
        assert_eq!(err.exit_code(), 75);
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("the message was NOT sent"), "{text}");
        assert!(text.contains("No such file"), "{text}");
    }

    #[test]
    fn a_refused_sender_is_no_permission() {
        fn script(verb: &str) -> &'static str {
            match verb {
                "MAIL" => "553 5.7.1 <boss@x>: you may not send as this sender\r\n",
                other => happy(other),
            }
        }
        let mut env = envelope(&["a@x"]);
        env.sender = "boss@x".into();
        let (result, seen) = run(script, &env, b"\r\n");
        let err = result.unwrap_err();
        assert_eq!(err.exit_code(), 77);
        assert_eq!(
            err.to_string(),
            "the relay refused sender <boss@x>: 553 5.7.1 <boss@x>: you may not send as \
             this sender; the message was NOT sent"
        );
        // No RCPT after the refusal, and a clean QUIT.
        assert_eq!(seen.commands.last().unwrap(), "QUIT");
        assert!(!seen.commands.iter().any(|c| c.starts_with("RCPT")));
    }

    #[test]
    fn every_recipient_refused_is_no_user() {
        fn script(verb: &str) -> &'static str {
            match verb {
                "RCPT" => "550 5.1.1 no such user\r\n",
                other => happy(other),
            }
        }
        let (result, seen) = run(script, &envelope(&["a@x", "b@y"]), b"\r\n");
        let err = result.unwrap_err();
        assert_eq!(err.exit_code(), 67);
        let SendError::NoRecipientAccepted { refused } = err else {
            panic!("{err}")
        };
        assert_eq!(refused.len(), 2);
        assert_eq!(
            refused[1].to_string(),
            "the relay refused recipient <b@y>: 550 5.1.1 no such user"
        );
        assert!(!seen.commands.contains(&"DATA".to_owned()));
    }

    #[test]
    fn some_recipients_refused_still_sends_to_the_others() {
        fn script(verb: &str) -> &'static str {
            happy(verb)
        }
        // The fake relay answers by verb, so make the refusal depend on order
        // through a relay that refuses the first RCPT only.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("submit.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let relay = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writer.write_all(script("greeting").as_bytes()).unwrap();
            let mut rcpts = 0;
            let mut in_data = false;
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 0 {
                let reply = if in_data {
                    if line == ".\r\n" {
                        in_data = false;
                        script(".")
                    } else {
                        ""
                    }
                } else if line.starts_with("RCPT") {
                    rcpts += 1;
                    if rcpts == 1 {
                        "550 5.1.1 unknown\r\n"
                    } else {
                        script("RCPT")
                    }
                } else {
                    let verb = line.split([' ', ':', '\r']).next().unwrap().to_owned();
                    in_data = verb == "DATA";
                    script(&verb)
                };
                writer.write_all(reply.as_bytes()).unwrap();
                line.clear();
            }
        });
        let stream = connect(&path).unwrap();
        let outcome = submit(stream, None, |_| {
            (envelope(&["gone@x", "here@y"]), b"\r\nhi\r\n".to_vec())
        })
        .unwrap();
        relay.join().unwrap();
        assert_eq!(outcome.refused.len(), 1);
        assert_eq!(outcome.refused[0].recipient, "gone@x");
    }

    #[test]
    fn a_451_after_the_dot_is_a_temporary_failure() {
        fn script(verb: &str) -> &'static str {
            match verb {
                "." => "451 4.3.0 could not store enough copies\r\n",
                other => happy(other),
            }
        }
        let (result, _) = run(script, &envelope(&["a@x"]), b"\r\nbody\r\n");
        let err = result.unwrap_err();
        assert_eq!(err.exit_code(), 75);
        let text = err.to_string();
        assert!(text.contains("451 4.3.0 could not store"), "{text}");
        assert!(text.contains("NOT sent"), "{text}");
    }

    #[test]
    fn a_554_after_the_dot_is_unavailable() {
        fn script(verb: &str) -> &'static str {
            match verb {
                "." => "554 5.6.0 message refused\r\n",
                other => happy(other),
            }
        }
        let (result, _) = run(script, &envelope(&["a@x"]), b"\r\nbody\r\n");
        assert_eq!(result.unwrap_err().exit_code(), 69);
    }

    #[test]
    fn a_4xx_recipient_aborts_before_data() {
        fn script(verb: &str) -> &'static str {
            match verb {
                "RCPT" => "450 4.2.0 try later\r\n",
                other => happy(other),
            }
        }
        let (result, seen) = run(script, &envelope(&["a@x", "b@y"]), b"\r\n");
        assert_eq!(result.unwrap_err().exit_code(), 75);
        assert!(!seen.commands.contains(&"DATA".to_owned()));
    }

    #[test]
    fn refused_auth_is_no_permission() {
        fn script(verb: &str) -> &'static str {
            match verb {
                "AUTH" => "535 5.7.8 no account for uid 1234\r\n",
                other => happy(other),
            }
        }
        let (result, seen) = run(script, &envelope(&["a@x"]), b"\r\n");
        assert_eq!(result.unwrap_err().exit_code(), 77);
        assert!(!seen.commands.iter().any(|c| c.starts_with("MAIL")));
    }

    #[test]
    fn too_large_for_the_announced_size() {
        let message = vec![b'x'; 1001];
        let (result, seen) = run(happy, &envelope(&["a@x"]), &message);
        let err = result.unwrap_err();
        assert_eq!(err.exit_code(), 65);
        assert!(err.to_string().contains("1001 octets"), "{err}");
        assert!(!seen.commands.iter().any(|c| c.starts_with("MAIL")));
    }

    #[test]
    fn a_silent_relay_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("submit.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let relay = std::thread::spawn(move || {
            let (_stream, _) = listener.accept().unwrap();
            // Hold the connection open, say nothing.
            let _ = done_rx.recv();
        });
        let mut client = Client::new(connect(&path).unwrap(), None);
        client.reply_timeout = Duration::from_millis(100);
        let err = client.open().unwrap_err();
        done_tx.send(()).unwrap();
        relay.join().unwrap();
        assert!(
            matches!(
                err,
                SendError::Timeout {
                    stage: Stage::Greeting,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.exit_code(), 75);
    }

    #[test]
    fn verbose_prints_the_dialog() {
        let dir = tempfile::tempdir().unwrap();
        let (path, relay) = fake_relay(dir.path(), happy);
        let mut trace = Vec::new();
        submit(connect(&path).unwrap(), Some(&mut trace), |_| {
            (envelope(&["a@x"]), b"Subject: secret\r\n\r\n".to_vec())
        })
        .unwrap();
        relay.join().unwrap();
        let trace = String::from_utf8(trace).unwrap();
        let lines: Vec<&str> = trace.lines().collect();
        assert_eq!(lines[0], "<<< 220 relay.test ESMTP Postern");
        assert_eq!(lines[1], ">>> EHLO localhost");
        assert!(lines.contains(&"<<< 250-PIPELINING"));
        assert!(lines.contains(&">>> AUTH EXTERNAL ="));
        assert!(lines.contains(&">>> RCPT TO:<a@x>"));
        assert!(lines.contains(&">>> ."));
        assert_eq!(*lines.last().unwrap(), "<<< 221 2.0.0 Bye");
        // The message itself is not traced.
        assert!(!trace.contains("secret"));
    }

    #[test]
    fn dash_bs_authenticates_then_forwards_the_greeting_and_proxies() {
        let dir = tempfile::tempdir().unwrap();
        let (path, relay) = fake_relay(dir.path(), happy);
        let input = b"EHLO me\r\nMAIL FROM:<joe>\r\nQUIT\r\n".to_vec();
        let mut output = Vec::new();
        serve_stdio(
            connect(&path).unwrap(),
            None,
            Box::new(io::Cursor::new(input)),
            &mut output,
        )
        .unwrap();
        let seen = relay.join().unwrap();
        // The relay saw our EHLO and AUTH before the caller's commands.
        assert_eq!(
            seen.commands,
            vec![
                "EHLO localhost",
                "AUTH EXTERNAL =",
                "EHLO me",
                "MAIL FROM:<joe>",
                "QUIT"
            ]
        );
        let output = String::from_utf8(output).unwrap();
        // The caller sees the relay's greeting first, not our preamble's replies.
        assert!(
            output.starts_with("220 relay.test ESMTP Postern\r\n250-relay.test\r\n"),
            "{output}"
        );
        assert!(!output.contains("235"), "{output}");
        assert!(output.ends_with("221 2.0.0 Bye\r\n"), "{output}");
    }

    #[test]
    fn dash_bs_reports_a_failed_preamble_as_421() {
        fn script(verb: &str) -> &'static str {
            match verb {
                "AUTH" => "454 4.7.0 temporary authentication failure\r\n",
                other => happy(other),
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let (path, relay) = fake_relay(dir.path(), script);
        let mut output = Vec::new();
        let stream = connect(&path).unwrap();
        let err = serve_stdio(stream, None, Box::new(io::empty()), &mut output).unwrap_err();
        drop(relay);
        assert_eq!(err.exit_code(), 75);
        let output = String::from_utf8(output).unwrap();
        assert!(output.starts_with("421 4.3.0 "), "{output}");
        assert!(output.contains("454 4.7.0"), "{output}");
    }
}
