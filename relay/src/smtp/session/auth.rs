//! AUTH (RFC 4954). Two kinds of listener authenticate clients:
//! - one that knows who the client is from outside the protocol (a Unix
//!   socket's peer credentials) offers EXTERNAL (RFC 4422 App. A);
//! - a submission listener offers PLAIN (RFC 4616) and LOGIN, and only once
//!   TLS is active (RFC 4954 §4, RFC 8314), so a password never crosses the
//!   network in the clear.
//!
//! The session decodes the exchange; the driver checks the identity or the
//! password and answers with [`Verdict`].

use std::fmt;

use super::{Event, Pending, Reply, Session, State, Verdict};
use crate::smtp::base64;
use crate::smtp::command::MAX_ANY_LINE;

/// A password mechanism.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// RFC 4616: `authzid NUL authcid NUL passwd` in one response.
    Plain,
    /// The de-facto LOGIN mechanism: user name, then password, each after a 334.
    Login,
}

impl Mechanism {
    /// The name on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// A password, kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: String) -> Password {
        Password(password)
    }

    /// The password itself, for checking it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(..)")
    }
}

/// What a client presented with a password mechanism.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// How they came.
    pub mechanism: Mechanism,
    /// Who asks to act (PLAIN's authzid; empty: the same as `user`).
    pub authzid: String,
    /// Whose password it is (the authentication identity).
    pub user: String,
    /// The password.
    pub password: Password,
}

/// Which response the session waits for after its `334`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AuthStep {
    External,
    Plain,
    LoginUser,
    LoginPassword { user: String },
}

/// "Username:" and "Password:", as LOGIN's challenges.
const LOGIN_USER_CHALLENGE: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD_CHALLENGE: &str = "UGFzc3dvcmQ6";

impl Session {
    /// The mechanisms EHLO offers now (empty: AUTH is not offered).
    pub(super) fn offered_mechanisms(&self) -> Vec<&'static str> {
        let mut offered = Vec::new();
        if self.config.auth_external {
            offered.push("EXTERNAL");
        }
        if self.config.auth_password && self.tls {
            offered.extend(["PLAIN", "LOGIN"]);
        }
        offered
    }

    pub(super) fn auth(&mut self, args: &str) {
        if self.config.require_tls && !self.tls {
            return self.error(Reply::new(
                530,
                "5.7.0",
                "Must issue a STARTTLS command first",
            ));
        }
        let offered = self.offered_mechanisms();
        if offered.is_empty() {
            return self.error(Reply::new(
                502,
                "5.5.1",
                "AUTH not available on this listener",
            ));
        }
        if self.transaction.has_mail() {
            return self.error(Reply::new(
                503,
                "5.5.1",
                "AUTH not allowed during a mail transaction",
            ));
        }
        if self.authenticated {
            return self.error(Reply::new(503, "5.5.1", "Already authenticated"));
        }
        if !self.esmtp {
            return self.error(Reply::new(503, "5.5.1", "Send EHLO first"));
        }
        let mut words = args.split_ascii_whitespace();
        let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
        let initial = words.next();
        if words.next().is_some() || mechanism.is_empty() {
            return self.error(Reply::new(
                501,
                "5.5.4",
                "Syntax: AUTH mechanism [response]",
            ));
        }
        if !offered.contains(&mechanism.as_str()) {
            return self.error(Reply::new(
                504,
                "5.5.4",
                format!(
                    "Unrecognized authentication mechanism; {} offered",
                    match offered.as_slice() {
                        [one] => format!("{one} is"),
                        many => format!("{} are", many.join(", ")),
                    }
                ),
            ));
        }
        let step = match mechanism.as_str() {
            "EXTERNAL" => AuthStep::External,
            "PLAIN" => AuthStep::Plain,
            _ => AuthStep::LoginUser,
        };
        match initial {
            // RFC 4954 §4: "=" is an empty initial response.
            Some(response) => self.auth_response(step, response, true),
            None => self.challenge(step),
        }
    }

    /// Sends the `334` that asks for `step`'s response.
    fn challenge(&mut self, step: AuthStep) {
        let text = match step {
            AuthStep::LoginUser => LOGIN_USER_CHALLENGE,
            AuthStep::LoginPassword { .. } => LOGIN_PASSWORD_CHALLENGE,
            AuthStep::External | AuthStep::Plain => "",
        };
        self.reply(Reply::plain(334, vec![text.to_owned()]));
        self.state = State::AuthResponse(step);
    }

    /// Reads the response line that follows our `334`.
    pub(super) fn read_auth_response(&mut self) -> bool {
        let Some(lf) = self.input.iter().position(|&b| b == b'\n') else {
            if self.input.len() > MAX_ANY_LINE {
                // Skip the rest of the line too, so it is not read as a command.
                self.input.clear();
                self.discarding_line = true;
                self.state = State::Command;
                self.error(Reply::new(500, "5.5.6", "Authentication response too long"));
                return true;
            }
            return false;
        };
        let line: Vec<u8> = self.input.drain(..=lf).collect();
        let State::AuthResponse(step) = std::mem::replace(&mut self.state, State::Command) else {
            return true;
        };
        let Some(body) = line[..line.len() - 1].strip_suffix(b"\r") else {
            return self.bare_line_ending();
        };
        let response = String::from_utf8_lossy(body).into_owned();
        if response == "*" {
            self.error(Reply::new(501, "5.0.0", "Authentication cancelled"));
        } else {
            self.auth_response(step, &response, false);
        }
        true
    }

    fn auth_response(&mut self, step: AuthStep, response: &str, initial: bool) {
        let decoded = if response.is_empty() || (initial && response == "=") {
            Some(Vec::new())
        } else {
            base64::decode(response)
        };
        let Some(text) = decoded.and_then(|bytes| String::from_utf8(bytes).ok()) else {
            return self.error(Reply::new(
                501,
                "5.5.2",
                "Cannot decode the authentication response (base64 of UTF-8 expected)",
            ));
        };
        match step {
            AuthStep::External => {
                self.pause(Pending::Auth, Event::AuthExternal { authzid: text });
            }
            AuthStep::Plain => {
                let mut parts = text.split('\0');
                let (Some(authzid), Some(user), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    return self.error(Reply::new(
                        501,
                        "5.5.2",
                        "PLAIN response must be authzid NUL authcid NUL password",
                    ));
                };
                let credentials = Credentials {
                    mechanism: Mechanism::Plain,
                    authzid: authzid.to_owned(),
                    user: user.to_owned(),
                    password: Password::new(password.to_owned()),
                };
                self.pause(Pending::Auth, Event::AuthPassword { credentials });
            }
            AuthStep::LoginUser => self.challenge(AuthStep::LoginPassword { user: text }),
            AuthStep::LoginPassword { user } => {
                let credentials = Credentials {
                    mechanism: Mechanism::Login,
                    authzid: String::new(),
                    user,
                    password: Password::new(text),
                };
                self.pause(Pending::Auth, Event::AuthPassword { credentials });
            }
        }
    }

    pub(super) fn auth_decided(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Accept => {
                self.authenticated = true;
                self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
            }
            Verdict::Reply(reply) => self.error(reply),
        }
    }
}
