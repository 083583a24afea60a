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
use crate::smtp::command::MAX_AUTH_LINE;

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

/// Why a PLAIN response cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlainError {
    /// Not three fields separated by two NULs.
    #[error("PLAIN response must be authzid NUL authcid NUL password")]
    Fields,
    /// The authentication identity is empty.
    #[error("PLAIN response has an empty user name")]
    EmptyUser,
    /// A field is not UTF-8 (RFC 4616 §2).
    #[error("PLAIN response is not UTF-8")]
    NotUtf8,
}

/// Decodes a PLAIN message (RFC 4616 §2, already base64-decoded):
/// `[authzid] NUL authcid NUL passwd`, each UTF-8 without NUL.
pub fn parse_plain(message: &[u8]) -> Result<Credentials, PlainError> {
    let mut fields = message.split(|&b| b == 0);
    let (Some(authzid), Some(user), Some(password), None) =
        (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err(PlainError::Fields);
    };
    let text = |field: &[u8]| String::from_utf8(field.to_vec()).map_err(|_| PlainError::NotUtf8);
    let credentials = Credentials {
        mechanism: Mechanism::Plain,
        authzid: text(authzid)?,
        user: text(user)?,
        password: Password::new(text(password)?),
    };
    if credentials.user.is_empty() {
        return Err(PlainError::EmptyUser);
    }
    Ok(credentials)
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
            if self.input.len() > MAX_AUTH_LINE {
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
        if line.len() > MAX_AUTH_LINE {
            self.error(Reply::new(500, "5.5.6", "Authentication response too long"));
            return true;
        }
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
            AuthStep::Plain => match parse_plain(text.as_bytes()) {
                Ok(credentials) => self.pause(Pending::Auth, Event::AuthPassword { credentials }),
                Err(err) => self.error(Reply::new(501, "5.5.2", err.to_string())),
            },
            AuthStep::LoginUser if text.is_empty() => {
                self.error(Reply::new(501, "5.5.2", "LOGIN needs a user name"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::SessionConfig;

    #[test]
    fn plain_messages_split_into_three_utf8_fields_with_a_user() {
        let ok = parse_plain(b"\0alice\0pass word").unwrap();
        assert_eq!((ok.authzid.as_str(), ok.user.as_str()), ("", "alice"));
        assert_eq!(ok.password.expose(), "pass word");
        assert!(!format!("{ok:?}").contains("pass word"), "Debug hides it");
        let proxy = parse_plain("bob\0alice\0pw\u{e9}".as_bytes()).unwrap();
        assert_eq!(proxy.authzid, "bob");
        for (message, err) in [
            (&b"alice\0pw"[..], PlainError::Fields),
            (b"\0alice\0pw\0extra", PlainError::Fields),
            (b"", PlainError::Fields),
            (b"\0\0pw", PlainError::EmptyUser),
            (b"\0al\xffice\0pw", PlainError::NotUtf8),
        ] {
            assert_eq!(parse_plain(message).unwrap_err(), err, "{message:?}");
        }
    }

    fn submission() -> Session {
        let mut session = Session::new(SessionConfig {
            hostname: "mx.test".into(),
            max_message_size: 1 << 20,
            max_recipients: 10,
            max_line_length: 1000,
            max_errors: 10,
            starttls: true,
            auth_external: false,
            auth_password: true,
            require_auth: true,
            require_tls: true,
        });
        session.tls_from_start();
        session.start();
        session.feed(b"EHLO client.example\r\n");
        while session.next_event().is_some() {}
        session
    }

    fn replies(session: &mut Session) -> Vec<String> {
        std::iter::from_fn(|| session.next_event())
            .filter_map(|event| match event {
                Event::Reply(reply) => Some(reply.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn auth_lines_up_to_12288_octets_are_read_and_longer_ones_refused() {
        // A long password in the initial response fits (RFC 4954 §4).
        let mut session = submission();
        let response = base64::encode(format!("\0alice\0{}", "p".repeat(9000)).as_bytes());
        session.feed(format!("AUTH PLAIN {response}\r\n").as_bytes());
        let event = session.next_event();
        assert!(
            matches!(&event, Some(Event::AuthPassword { credentials }) if credentials.password.expose().len() == 9000),
            "{event:?}"
        );
        // After 334, a response line over 12288 octets is refused, and the
        // rest of it is not read as commands.
        let mut session = submission();
        session.feed(b"AUTH PLAIN\r\n");
        assert_eq!(replies(&mut session), ["334 \r\n"]);
        session.feed(&vec![b'A'; MAX_AUTH_LINE + 10]);
        session.feed(b"QUIT\r\nNOOP\r\n");
        assert_eq!(
            replies(&mut session),
            [
                "500 5.5.6 Authentication response too long\r\n",
                "250 2.0.0 Ok\r\n"
            ]
        );
    }
}
