//! AUTH (RFC 4954) with the one mechanism a listener can verify without a
//! password: EXTERNAL (RFC 4422 App. A), where the identity comes from
//! outside the protocol (a Unix socket's peer credentials).

use super::{Event, Pending, Reply, Session, State, Verdict};
use crate::smtp::base64;
use crate::smtp::command::MAX_ANY_LINE;

impl Session {
    pub(super) fn auth(&mut self, args: &str) {
        if !self.config.auth_external {
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
        let mechanism = words.next().unwrap_or("");
        let initial = words.next();
        if words.next().is_some() || mechanism.is_empty() {
            return self.error(Reply::new(
                501,
                "5.5.4",
                "Syntax: AUTH mechanism [response]",
            ));
        }
        if !mechanism.eq_ignore_ascii_case("EXTERNAL") {
            return self.error(Reply::new(
                504,
                "5.5.4",
                "Unrecognized authentication mechanism; EXTERNAL is offered",
            ));
        }
        match initial {
            // RFC 4954 §4: "=" is an empty initial response.
            Some(response) => self.auth_response(response, true),
            None => {
                self.reply(Reply::plain(334, vec![String::new()]));
                self.state = State::AuthResponse;
            }
        }
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
        self.state = State::Command;
        let Some(body) = line[..line.len() - 1].strip_suffix(b"\r") else {
            return self.bare_line_ending();
        };
        let response = String::from_utf8_lossy(body).into_owned();
        if response == "*" {
            self.error(Reply::new(501, "5.0.0", "Authentication cancelled"));
        } else {
            self.auth_response(&response, false);
        }
        true
    }

    fn auth_response(&mut self, response: &str, initial: bool) {
        let decoded = if response.is_empty() || (initial && response == "=") {
            Some(Vec::new())
        } else {
            base64::decode(response)
        };
        let Some(authzid) = decoded.and_then(|bytes| String::from_utf8(bytes).ok()) else {
            return self.error(Reply::new(
                501,
                "5.5.2",
                "Cannot decode the authentication response (base64 of UTF-8 expected)",
            ));
        };
        self.pause(Pending::AuthExternal, Event::AuthExternal { authzid });
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
