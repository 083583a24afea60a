//! MAIL FROM.

use super::{Event, Pending, Reply, Session, Verdict};
use crate::smtp::params::{self, MailParams, Mailbox, ParamError};

impl Session {
    pub(super) fn mail(&mut self, args: &str) {
        if self.helo.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
        }
        if self.transaction.has_mail() {
            return self.error(Reply::new(503, "5.5.1", "Nested MAIL command"));
        }
        if self.config.require_tls && !self.tls {
            return self.error(Reply::new(
                530,
                "5.7.0",
                "Must issue a STARTTLS command first",
            ));
        }
        if self.config.require_auth && !self.authenticated {
            return self.error(Reply::new(530, "5.7.0", "Authentication required"));
        }
        let (path, params) = match params::parse_mail(args) {
            Ok(parsed) => parsed,
            Err(err) => return self.param_error(err),
        };
        if !self.esmtp && params != MailParams::default() {
            return self.error(Reply::new(555, "5.5.4", "MAIL parameters need EHLO"));
        }
        if params
            .size
            .is_some_and(|size| size > self.config.max_message_size)
        {
            return self.error(Reply::new(
                552,
                "5.3.4",
                format!(
                    "Message size exceeds the limit of {} octets",
                    self.config.max_message_size
                ),
            ));
        }
        self.pause(
            Pending::Mail(path.clone(), params.clone()),
            Event::Mail {
                reverse_path: path,
                params,
            },
        );
    }

    pub(super) fn mail_decided(
        &mut self,
        path: Option<Mailbox>,
        params: MailParams,
        verdict: Verdict,
    ) {
        match verdict {
            Verdict::Accept => {
                self.transaction.mail = Some((path, params));
                self.reply(Reply::new(250, "2.1.0", "Sender ok"));
            }
            Verdict::Reply(reply) => self.reply(reply),
        }
    }

    /// Maps a path or parameter error onto its reply (RFC 5321 §4.2, RFC 1869 §4.3).
    pub(super) fn param_error(&mut self, err: ParamError) {
        let reply = match err {
            ParamError::BadPath => Reply::new(501, "5.1.7", "Syntax error in mailbox address"),
            ParamError::LocalPartTooLong => {
                Reply::new(501, "5.1.3", "Local part longer than 64 octets")
            }
            ParamError::DomainTooLong => Reply::new(501, "5.1.3", "Domain longer than 255 octets"),
            ParamError::NeedsSmtpUtf8 => {
                Reply::new(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
            }
            ParamError::Unknown(name) => {
                Reply::new(555, "5.5.4", format!("Unsupported parameter {name}"))
            }
            ParamError::BadValue(name) => {
                Reply::new(501, "5.5.4", format!("Invalid value for parameter {name}"))
            }
        };
        self.error(reply);
    }
}
