//! BDAT (RFC 3030 CHUNKING): counted chunks, no dot-stuffing.

use super::{DataDecoder, Event, Pending, Reply, Session, State, Verdict};

impl Session {
    pub(super) fn bdat(&mut self, size: u64, last: bool) {
        // The chunk's octets follow whatever we answer; a refused chunk is
        // still read (and discarded) so its content is never taken as commands.
        let refusal = if !self.esmtp {
            Some(Reply::new(503, "5.5.1", "BDAT needs EHLO"))
        } else if !self.transaction.has_mail() {
            Some(Reply::new(503, "5.5.1", "Need MAIL command"))
        } else if self.transaction.rcpts.is_empty() {
            Some(Reply::new(554, "5.5.1", "No valid recipients"))
        } else {
            None
        };
        if let Some(refusal) = refusal {
            self.reset_transaction();
            self.state = State::Bdat {
                remaining: size,
                last,
                decoder: None,
                refusal: Some(refusal),
            };
            return;
        }
        match self.transaction.bdat.take() {
            Some(decoder) => {
                self.state = State::Bdat {
                    remaining: size,
                    last,
                    decoder: Some(decoder),
                    refusal: None,
                };
            }
            None => self.pause(Pending::BdatStart { size, last }, Event::MessageStart),
        }
    }

    pub(super) fn bdat_start_decided(&mut self, size: u64, last: bool, verdict: Verdict) {
        match verdict {
            Verdict::Accept => {
                self.state = State::Bdat {
                    remaining: size,
                    last,
                    decoder: Some(DataDecoder::for_bdat(
                        self.config.max_line_length,
                        self.config.max_message_size,
                    )),
                    refusal: None,
                };
            }
            Verdict::Reply(reply) => {
                self.reset_transaction();
                self.state = State::Bdat {
                    remaining: size,
                    last,
                    decoder: None,
                    refusal: Some(reply),
                };
            }
        }
    }

    pub(super) fn read_bdat(&mut self) -> bool {
        let State::Bdat {
            remaining, decoder, ..
        } = &mut self.state
        else {
            return false;
        };
        if *remaining > 0 {
            if self.input.is_empty() {
                return false;
            }
            let take = usize::try_from(*remaining)
                .unwrap_or(usize::MAX)
                .min(self.input.len());
            if let Some(decoder) = decoder {
                self.transaction.bdat_octets += take as u64;
                let mut out = Vec::new();
                decoder.decode(&self.input[..take], &mut out);
                if !out.is_empty() {
                    self.events.push_back(Event::MessageData(out));
                }
            }
            self.input.drain(..take);
            *remaining -= take as u64;
            if *remaining > 0 {
                return true;
            }
        }
        let State::Bdat {
            last,
            decoder,
            refusal,
            ..
        } = std::mem::replace(&mut self.state, State::Command)
        else {
            return false;
        };
        match (decoder, refusal) {
            (_, Some(refusal)) => {
                if refusal.is_permanent() {
                    self.error(refusal);
                } else {
                    self.reply(refusal);
                }
            }
            (Some(mut decoder), None) if last => {
                let mut out = Vec::new();
                decoder.finish_bdat(&mut out);
                if !out.is_empty() {
                    self.events.push_back(Event::MessageData(out));
                }
                self.end_message(decoder.error());
            }
            (Some(decoder), None) => {
                let received = self.transaction.bdat_octets;
                self.transaction.bdat = Some(decoder);
                self.reply(Reply::new(
                    250,
                    "2.0.0",
                    format!("{received} octets received"),
                ));
            }
            (None, None) => {}
        }
        true
    }
}
