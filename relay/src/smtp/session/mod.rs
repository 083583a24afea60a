//! The server session state machine: bytes in, events and replies out.
//!
//! The driver feeds what it reads with [`Session::feed`] and pulls
//! [`Event`]s with [`Session::next_event`]. Events that need a decision
//! (MAIL, RCPT, the start and the end of a message) pause the session until
//! the driver answers with [`Session::decide`]; pipelined input waits in the
//! buffer meanwhile. The session never blocks and never touches a socket, so
//! it is tested with transcripts and fuzzed directly.

mod auth;
mod bdat;
mod data;
mod ehlo;
mod mail;
mod rcpt;
mod simple;

pub use auth::{parse_plain, Credentials, Mechanism, Password, PlainError};

use std::collections::VecDeque;

use super::command::{self, Command, CommandError, MAX_ANY_LINE};
use super::data::DataDecoder;
use super::params::{MailParams, Mailbox, RcptParams};
use super::reply::Reply;

/// What the session needs to know about its listener and limits.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our host name, for the greeting and EHLO.
    pub hostname: String,
    /// Largest message in octets (advertised as SIZE).
    pub max_message_size: u64,
    /// Most recipients per transaction.
    pub max_recipients: usize,
    /// Longest text line in message data, CRLF included.
    pub max_line_length: usize,
    /// Protocol errors tolerated before the session is closed.
    pub max_errors: u32,
    /// Whether STARTTLS can be offered (a certificate is configured).
    pub starttls: bool,
    /// Whether AUTH EXTERNAL is offered: the listener knows who the client
    /// is from outside the protocol (a Unix socket's peer credentials).
    pub auth_external: bool,
    /// Whether AUTH PLAIN and LOGIN are offered (only once TLS is active):
    /// a submission listener that checks passwords.
    pub auth_password: bool,
    /// Whether MAIL needs a successful AUTH first (530 5.7.0 otherwise).
    pub require_auth: bool,
    /// Whether AUTH and MAIL need TLS first (530 5.7.0 otherwise): a
    /// submission listener, where STARTTLS is required (RFC 8314 §3.3).
    pub require_tls: bool,
}

/// Something the driver must do or decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Send this reply.
    Reply(Reply),
    /// A MAIL command passed syntax checks; decide with [`Verdict`].
    Mail {
        /// The reverse path (`None` for `<>`).
        reverse_path: Option<Mailbox>,
        /// Its parameters.
        params: MailParams,
    },
    /// A RCPT command passed syntax checks; decide with [`Verdict`], or
    /// accept it for another mailbox with [`Session::accept_rcpt_as`].
    Rcpt {
        /// The forward path.
        forward_path: Mailbox,
        /// Its parameters.
        params: RcptParams,
    },
    /// The message content is about to start (DATA, or the first BDAT);
    /// decide with [`Verdict`] (e.g. open the spool file and write the trace header).
    MessageStart,
    /// Decoded wire-format message octets.
    MessageData(Vec<u8>),
    /// The message ended cleanly; decide with [`Verdict::Reply`] (the quorum's answer).
    MessageEnd,
    /// The message was refused by the decoder; discard what was received.
    /// The session sends its own reply next.
    MessageAborted,
    /// AUTH EXTERNAL: the client asks to be `authzid` (empty: whoever the
    /// listener knows it to be); decide with [`Verdict`] (235 on Accept).
    AuthExternal {
        /// The requested authorization identity, decoded.
        authzid: String,
    },
    /// AUTH PLAIN or LOGIN: check the password; decide with [`Verdict`]
    /// (235 on Accept), or close with [`Session::abort`].
    AuthPassword {
        /// What the client presented.
        credentials: Credentials,
    },
    /// Start the TLS handshake now, then call [`Session::tls_started`].
    StartTls,
    /// Close the connection after sending the replies before this event.
    Close,
}

/// The driver's answer to a paused event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on with the session's own positive reply (MAIL, RCPT, MessageStart).
    Accept,
    /// Answer this instead (a refusal, or the reply to MessageEnd).
    Reply(Reply),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Mail(Option<Mailbox>, MailParams),
    Rcpt(Mailbox, RcptParams),
    /// DATA: MessageStart awaited.
    DataStart,
    /// BDAT's first chunk: MessageStart awaited.
    BdatStart {
        size: u64,
        last: bool,
    },
    MessageEnd,
    Auth,
}

#[derive(Debug)]
enum State {
    /// Before `start`.
    New,
    /// Reading command lines.
    Command,
    /// Waiting for `decide`.
    Paused(Pending),
    /// Reading DATA content.
    Data(DataDecoder),
    /// Reading `remaining` octets of a BDAT chunk. With `decoder` absent the
    /// octets are discarded (a refused chunk).
    Bdat {
        remaining: u64,
        last: bool,
        decoder: Option<DataDecoder>,
        refusal: Option<Reply>,
    },
    /// After `334`: reading the client's SASL response line.
    AuthResponse(auth::AuthStep),
    /// Waiting for the TLS handshake.
    AwaitingTls,
    /// Closed; everything else is ignored.
    Closed,
}

/// The envelope collected so far in the current transaction.
#[derive(Debug, Default, Clone)]
pub struct Transaction {
    /// MAIL FROM, once accepted.
    pub mail: Option<(Option<Mailbox>, MailParams)>,
    /// Accepted recipients.
    pub rcpts: Vec<(Mailbox, RcptParams)>,
    /// Decoder of a BDAT transaction in progress.
    bdat: Option<DataDecoder>,
    /// Octets received in BDAT chunks so far.
    bdat_octets: u64,
}

impl Transaction {
    /// Whether MAIL was accepted.
    pub fn has_mail(&self) -> bool {
        self.mail.is_some()
    }
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    state: State,
    input: Vec<u8>,
    events: VecDeque<Event>,
    /// EHLO/HELO argument.
    helo: Option<String>,
    esmtp: bool,
    tls: bool,
    /// AUTH succeeded (kept across EHLO, as RFC 4954 keeps it until QUIT).
    authenticated: bool,
    errors: u32,
    /// Skipping the rest of an over-long command line.
    discarding_line: bool,
    transaction: Transaction,
}

impl Session {
    /// A session that has not greeted yet.
    pub fn new(config: SessionConfig) -> Session {
        Session {
            config,
            state: State::New,
            input: Vec::new(),
            events: VecDeque::new(),
            helo: None,
            esmtp: false,
            tls: false,
            authenticated: false,
            errors: 0,
            discarding_line: false,
            transaction: Transaction::default(),
        }
    }

    /// Sends the greeting, or 554 and close when the client already talked
    /// (RFC 5321 §4.3.1: the client waits for the greeting).
    pub fn start(&mut self) {
        if !matches!(self.state, State::New) {
            return;
        }
        if !self.input.is_empty() {
            self.reply(Reply::new(
                554,
                "5.5.0",
                "Protocol error: client sent data before the greeting",
            ));
            self.close();
            return;
        }
        self.state = State::Command;
        self.reply(Reply::plain(
            220,
            vec![format!("{} ESMTP Postern", self.config.hostname)],
        ));
    }

    /// Appends octets read from the client.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !matches!(self.state, State::Closed) {
            self.input.extend_from_slice(bytes);
        }
    }

    /// Octets fed but not yet processed.
    pub fn buffered(&self) -> usize {
        self.input.len()
    }

    /// The next event, or `None` when the session needs more input or a verdict.
    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Some(event);
            }
            if !self.advance() {
                return None;
            }
        }
    }

    /// Whether the session waits for [`Session::decide`].
    pub fn is_paused(&self) -> bool {
        matches!(self.state, State::Paused(_))
    }

    /// Whether the session is reading message content (for the data timeout).
    pub fn in_message(&self) -> bool {
        matches!(self.state, State::Data(_) | State::Bdat { .. })
    }

    /// Whether the session has closed.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// EHLO/HELO argument, once given.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// Whether EHLO (not HELO) was used.
    pub fn is_esmtp(&self) -> bool {
        self.esmtp
    }

    /// Whether TLS is active.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether AUTH succeeded.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated
    }

    /// The current transaction.
    pub fn transaction(&self) -> &Transaction {
        &self.transaction
    }

    /// The connection is TLS from its first octet (implicit TLS, RFC 8314
    /// port 465); call before [`Session::start`].
    pub fn tls_from_start(&mut self) {
        if matches!(self.state, State::New) {
            self.tls = true;
        }
    }

    /// The TLS handshake succeeded: plaintext sent after STARTTLS is discarded
    /// (CVE-2011-0411) and the session starts over, waiting for EHLO.
    pub fn tls_started(&mut self) {
        if matches!(self.state, State::AwaitingTls) {
            self.input.clear();
            self.tls = true;
            self.authenticated = false;
            self.helo = None;
            self.esmtp = false;
            self.transaction = Transaction::default();
            self.state = State::Command;
        }
    }

    /// Closes the session from the driver's side (timeout, shutdown) with a reply.
    pub fn abort(&mut self, reply: Reply) {
        if !matches!(self.state, State::Closed) {
            if self.in_message() || self.transaction.bdat.is_some() {
                self.events.push_back(Event::MessageAborted);
            }
            self.reply(reply);
            self.close();
        }
    }

    /// Answers the paused event.
    pub fn decide(&mut self, verdict: Verdict) {
        let State::Paused(pending) = std::mem::replace(&mut self.state, State::Command) else {
            return;
        };
        match pending {
            Pending::Mail(path, params) => self.mail_decided(path, params, verdict),
            Pending::Rcpt(path, params) => self.rcpt_decided(path, params, verdict),
            Pending::DataStart => self.data_start_decided(verdict),
            Pending::BdatStart { size, last } => self.bdat_start_decided(size, last, verdict),
            Pending::MessageEnd => self.message_end_decided(verdict),
            Pending::Auth => self.auth_decided(verdict),
        }
    }

    /// Processes buffered input; false when nothing more can be done now.
    fn advance(&mut self) -> bool {
        match &mut self.state {
            State::New | State::Paused(_) | State::AwaitingTls | State::Closed => false,
            State::Command => self.read_command(),
            State::AuthResponse(_) => self.read_auth_response(),
            State::Data(_) => self.read_data(),
            State::Bdat { .. } => self.read_bdat(),
        }
    }

    /// Reads and dispatches one command line.
    fn read_command(&mut self) -> bool {
        let Some(lf) = self.input.iter().position(|&b| b == b'\n') else {
            if self.input.len() > MAX_ANY_LINE {
                // Drop what we have and skip to the end of this line.
                self.input.clear();
                if !self.discarding_line {
                    self.discarding_line = true;
                    self.error(Reply::new(500, "5.5.6", "Command line too long"));
                }
                return true;
            }
            return false;
        };
        let line: Vec<u8> = self.input.drain(..=lf).collect();
        if self.discarding_line {
            self.discarding_line = false;
            return true;
        }
        let body = &line[..line.len() - 1];
        let Some(body) = body.strip_suffix(b"\r") else {
            return self.bare_line_ending();
        };
        if body.contains(&b'\r') {
            return self.bare_line_ending();
        }
        match command::parse(body) {
            Ok(command) => self.dispatch(command),
            Err(CommandError::Unrecognized) => {
                self.error(Reply::new(500, "5.5.2", "Command unrecognized"))
            }
            Err(CommandError::TooLong) => {
                self.error(Reply::new(500, "5.5.6", "Command line too long"))
            }
            Err(CommandError::Syntax(why)) => {
                self.error(Reply::new(501, "5.5.4", format!("Syntax error: {why}")))
            }
        }
        true
    }

    fn bare_line_ending(&mut self) -> bool {
        self.reply(Reply::new(
            500,
            "5.5.2",
            "Bare CR or LF in command; lines must end with CRLF",
        ));
        self.close();
        true
    }

    fn dispatch(&mut self, command: Command) {
        match command {
            Command::Ehlo(domain) => self.ehlo(domain, true),
            Command::Helo(domain) => self.ehlo(domain, false),
            Command::Mail(args) => self.mail(&args),
            Command::Rcpt(args) => self.rcpt(&args),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => self.rset(),
            Command::Noop => self.reply(Reply::new(250, "2.0.0", "Ok")),
            Command::Quit => self.quit(),
            Command::Vrfy => self.reply(Reply::new(
                252,
                "2.5.2",
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Command::Expn => self.error(Reply::new(502, "5.5.1", "EXPN not available")),
            Command::Help => self.help(),
            Command::StartTls => self.starttls(),
            Command::Auth(args) => self.auth(&args),
        }
    }

    /// Whether more input is waiting right after a command that RFC 2920
    /// requires to end a pipelined group; if so, refuse with 554 and close.
    fn pipelining_violation(&mut self, after: &str) -> bool {
        if self.input.is_empty() {
            return false;
        }
        self.input.clear();
        self.reply(Reply::new(
            554,
            "5.5.0",
            format!("Protocol error: commands pipelined after {after} before its reply (RFC 2920)"),
        ));
        self.close();
        true
    }

    fn reset_transaction(&mut self) {
        self.transaction = Transaction::default();
    }

    fn reply(&mut self, reply: Reply) {
        self.events.push_back(Event::Reply(reply));
    }

    /// Sends an error reply and counts it; too many close the session.
    fn error(&mut self, reply: Reply) {
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.reply(Reply::new(
                421,
                "4.7.0",
                "Too many errors, closing connection",
            ));
            self.close();
        }
    }

    fn pause(&mut self, pending: Pending, event: Event) {
        self.state = State::Paused(pending);
        self.events.push_back(event);
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.input.clear();
        self.events.push_back(Event::Close);
    }
}
