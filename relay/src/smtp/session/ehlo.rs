//! EHLO and HELO.

use super::{Reply, Session};

impl Session {
    pub(super) fn ehlo(&mut self, domain: String, esmtp: bool) {
        // EHLO/HELO reset any transaction (RFC 5321 §4.1.4).
        self.reset_transaction();
        let greeting = format!("{} Hello {}", self.config.hostname, domain);
        self.helo = Some(domain);
        self.esmtp = esmtp;
        if !esmtp {
            self.reply(Reply::plain(250, vec![greeting]));
            return;
        }
        let mut lines = vec![
            greeting,
            "PIPELINING".to_owned(),
            format!("SIZE {}", self.config.max_message_size),
            "8BITMIME".to_owned(),
            "SMTPUTF8".to_owned(),
            "ENHANCEDSTATUSCODES".to_owned(),
            "CHUNKING".to_owned(),
            "DSN".to_owned(),
        ];
        let offered = self.offered_mechanisms();
        if !offered.is_empty() && !self.authenticated {
            lines.push(format!("AUTH {}", offered.join(" ")));
        }
        if self.config.starttls && !self.tls {
            lines.push("STARTTLS".to_owned());
        }
        lines.push("HELP".to_owned());
        self.reply(Reply::plain(250, lines));
    }
}
