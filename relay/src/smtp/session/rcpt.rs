//! RCPT TO.

use super::{Event, Pending, Reply, Session, State, Verdict};
use crate::smtp::params::{self, Mailbox, RcptParams};

impl Session {
    pub(super) fn rcpt(&mut self, args: &str) {
        let Some((_, mail_params)) = &self.transaction.mail else {
            return self.error(Reply::new(503, "5.5.1", "Need MAIL before RCPT"));
        };
        if self.transaction.bdat.is_some() {
            return self.error(Reply::new(503, "5.5.1", "RCPT not allowed during BDAT"));
        }
        let smtputf8 = mail_params.smtputf8;
        let (path, params) = match params::parse_rcpt(args, smtputf8) {
            Ok(parsed) => parsed,
            Err(err) => return self.param_error(err),
        };
        if !self.esmtp && params != RcptParams::default() {
            return self.error(Reply::new(555, "5.5.4", "RCPT parameters need EHLO"));
        }
        if self.transaction.rcpts.len() >= self.config.max_recipients {
            // Not counted as an error: RFC 5321 §4.5.3.1.10 expects clients to retry.
            return self.reply(Reply::new(452, "4.5.3", "Too many recipients"));
        }
        self.pause(
            Pending::Rcpt(path.clone(), params.clone()),
            Event::Rcpt {
                forward_path: path,
                params,
            },
        );
    }

    /// Answers a paused RCPT by accepting it for `forward_path` with
    /// `params` instead of what the client sent: the transaction records
    /// these (mail for the relay's own postmaster goes to the mailbox
    /// configured for it). Ignored unless the session waits on a RCPT.
    pub fn accept_rcpt_as(&mut self, forward_path: Mailbox, params: RcptParams) {
        if matches!(self.state, State::Paused(Pending::Rcpt(..))) {
            self.state = State::Command;
            self.rcpt_decided(forward_path, params, Verdict::Accept);
        }
    }

    pub(super) fn rcpt_decided(&mut self, path: Mailbox, params: RcptParams, verdict: Verdict) {
        match verdict {
            Verdict::Accept => {
                self.transaction.rcpts.push((path, params));
                self.reply(Reply::new(250, "2.1.5", "Recipient ok"));
            }
            Verdict::Reply(reply) => {
                if reply.is_permanent() {
                    self.error(reply);
                } else {
                    self.reply(reply);
                }
            }
        }
    }
}
