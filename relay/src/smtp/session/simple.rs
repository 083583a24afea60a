//! RSET, QUIT, HELP and STARTTLS.

use super::{Reply, Session, State};

impl Session {
    pub(super) fn rset(&mut self) {
        if self.transaction.bdat.is_some() {
            // A BDAT transaction in progress is abandoned: drop its content.
            self.events.push_back(super::Event::MessageAborted);
        }
        self.reset_transaction();
        self.reply(Reply::new(250, "2.0.0", "Ok"));
    }

    pub(super) fn quit(&mut self) {
        if self.transaction.bdat.is_some() {
            self.events.push_back(super::Event::MessageAborted);
        }
        self.reply(Reply::new(221, "2.0.0", "Bye"));
        self.close();
    }

    pub(super) fn help(&mut self) {
        self.reply(Reply {
            code: 214,
            status: Some("2.0.0".into()),
            lines: vec![
                "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS".into(),
                "See RFC 5321".into(),
            ],
        });
    }

    pub(super) fn starttls(&mut self) {
        if !self.config.starttls {
            return self.error(Reply::new(502, "5.5.1", "STARTTLS not available"));
        }
        if self.tls {
            return self.error(Reply::new(503, "5.5.1", "TLS already active"));
        }
        if !self.esmtp {
            return self.error(Reply::new(503, "5.5.1", "Send EHLO first"));
        }
        if self.transaction.has_mail() {
            return self.error(Reply::new(
                503,
                "5.5.1",
                "STARTTLS not allowed during a transaction",
            ));
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        // Whatever the client pipelined after STARTTLS is plaintext it must not
        // get to inject into the TLS session: `tls_started` discards it.
        self.state = State::AwaitingTls;
        self.events.push_back(super::Event::StartTls);
    }
}
