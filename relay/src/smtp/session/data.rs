//! DATA and the end of a message (shared with BDAT).

use super::{DataDecoder, Event, Pending, Reply, Session, State, Verdict};
use crate::smtp::data::DataError;

impl Session {
    pub(super) fn data(&mut self) {
        if self.transaction.bdat.is_some() {
            return self.error(Reply::new(503, "5.5.1", "DATA not allowed during BDAT"));
        }
        if !self.transaction.has_mail() {
            return self.error(Reply::new(503, "5.5.1", "Need MAIL command"));
        }
        if self.transaction.rcpts.is_empty() {
            return self.error(Reply::new(554, "5.5.1", "No valid recipients"));
        }
        // DATA must end a pipelined group: its content may come only after 354.
        if self.pipelining_violation("DATA") {
            return;
        }
        self.pause(Pending::DataStart, Event::MessageStart);
    }

    pub(super) fn data_start_decided(&mut self, verdict: Verdict) {
        match verdict {
            Verdict::Accept => {
                self.state = State::Data(DataDecoder::for_data(
                    self.config.max_line_length,
                    self.config.max_message_size,
                ));
                self.reply(Reply::new(354, "2.0.0", "End data with <CR><LF>.<CR><LF>"));
            }
            Verdict::Reply(reply) => {
                self.reset_transaction();
                self.reply(reply);
            }
        }
    }

    pub(super) fn read_data(&mut self) -> bool {
        let State::Data(decoder) = &mut self.state else {
            return false;
        };
        if self.input.is_empty() {
            return false;
        }
        let mut out = Vec::new();
        let used = decoder.decode(&self.input, &mut out);
        self.input.drain(..used);
        let finished = decoder.is_finished();
        let error = decoder.error();
        if !out.is_empty() {
            self.events.push_back(Event::MessageData(out));
        }
        if finished {
            self.state = State::Command;
            self.end_message(error);
        }
        true
    }

    /// The message content ended: refuse it, or ask the driver to commit it.
    pub(super) fn end_message(&mut self, error: Option<DataError>) {
        if let Some(error) = error {
            self.events.push_back(Event::MessageAborted);
            self.reset_transaction();
            return self.data_error(error);
        }
        // Commands may follow the end of the content in the same write: RFC 2920
        // §3.1 lets message content open a group, and Postfix and Exim pipeline
        // QUIT (or the next MAIL) right behind the final dot or BDAT LAST. They
        // wait in the buffer until the reply has been sent. What makes smuggling
        // impossible is that only a real <CRLF>.<CRLF> ends the data.
        self.pause(Pending::MessageEnd, Event::MessageEnd);
    }

    pub(super) fn message_end_decided(&mut self, verdict: Verdict) {
        self.reset_transaction();
        match verdict {
            Verdict::Accept => self.reply(Reply::new(250, "2.0.0", "Ok")),
            Verdict::Reply(reply) => self.reply(reply),
        }
    }

    fn data_error(&mut self, error: DataError) {
        match error {
            DataError::BareCrLf => {
                self.reply(Reply::new(
                    550,
                    "5.6.11",
                    "Message refused: bare CR or LF in message data (SMTP smuggling protection)",
                ));
                self.close();
            }
            DataError::Nul => self.error(Reply::new(
                550,
                "5.6.0",
                "Message refused: NUL octet in message data",
            )),
            DataError::LineTooLong => self.error(Reply::new(
                550,
                "5.6.0",
                format!(
                    "Message refused: a line is longer than {} octets",
                    self.config.max_line_length
                ),
            )),
            DataError::TooBig => self.reply(Reply::new(
                552,
                "5.3.4",
                format!(
                    "Message size exceeds the limit of {} octets",
                    self.config.max_message_size
                ),
            )),
        }
    }
}
