//! The client side without I/O: reply parsing, EHLO capabilities, command
//! formatting and dot-stuffing of wire-format data.

use super::params::{encode_xtext, Body, MailParams, RcptParams, Ret};
use super::reply::Reply;

/// Longest reply line we accept from a server (RFC 5321 §4.5.3.1.5 says 512).
const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one reply.
const MAX_REPLY_LINES: usize = 100;

/// Why a server's reply could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    /// Not `ddd[ -]text`, or codes differ between lines.
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    /// A line or the reply is too long.
    #[error("reply too long")]
    TooLong,
}

/// Parses one complete reply from the front of `buf`; `Ok(None)` when more
/// input is needed. Returns the reply and the octets it used.
pub fn parse_reply(buf: &[u8]) -> Result<Option<(Reply, usize)>, ReplyError> {
    let mut offset = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let rest = &buf[offset..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > MAX_REPLY_LINE {
                return Err(ReplyError::TooLong);
            }
            return Ok(None);
        };
        let raw = &rest[..lf];
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        offset += lf + 1;
        // A reply we may pass on (early delivery, scanners) must not carry
        // a bare CR or other controls into our own replies.
        let line: String = String::from_utf8_lossy(raw)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let bytes = line.as_bytes();
        if bytes.len() < 3
            || !bytes[..3].iter().all(u8::is_ascii_digit)
            || !(b'2'..=b'5').contains(&bytes[0])
        {
            return Err(ReplyError::Malformed(line));
        }
        let this_code: u16 = line[..3]
            .parse()
            .map_err(|_| ReplyError::Malformed(line.clone()))?;
        if code.is_some_and(|c| c != this_code) {
            return Err(ReplyError::Malformed(line));
        }
        code = Some(this_code);
        let (more, text) = match bytes.get(3) {
            None => (false, ""),
            Some(b' ') => (false, &line[4..]),
            Some(b'-') => (true, &line[4..]),
            Some(_) => return Err(ReplyError::Malformed(line)),
        };
        lines.push(text.to_owned());
        if lines.len() > MAX_REPLY_LINES {
            return Err(ReplyError::TooLong);
        }
        if !more {
            break;
        }
    }
    let code = code.unwrap_or(0);
    // Keep an enhanced status code apart when every line carries the same one.
    let status = lines.first().and_then(|first| {
        let candidate = first.split(' ').next()?;
        let valid = candidate.split('.').count() == 3
            && candidate
                .split('.')
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
            && candidate.as_bytes()[0] == bytes_first_digit(code);
        (valid && lines.iter().all(|l| l.starts_with(candidate))).then(|| candidate.to_owned())
    });
    let lines = match &status {
        Some(status) => lines
            .iter()
            .map(|l| l[status.len()..].trim_start().to_owned())
            .collect(),
        None => lines,
    };
    Ok(Some((
        Reply {
            code,
            status,
            lines,
        },
        offset,
    )))
}

fn bytes_first_digit(code: u16) -> u8 {
    b'0' + (code / 100) as u8
}

/// What a server said it supports in its EHLO/LHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE and its limit (0 = no limit given).
    pub size: Option<u64>,
    /// 8BITMIME.
    pub eight_bit_mime: bool,
    /// SMTPUTF8.
    pub smtputf8: bool,
    /// CHUNKING (BDAT).
    pub chunking: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// STARTTLS.
    pub starttls: bool,
    /// ENHANCEDSTATUSCODES.
    pub enhanced_status_codes: bool,
    /// AUTH mechanisms.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Reads the keywords of an EHLO reply (the first line is the greeting).
    pub fn from_ehlo(reply: &Reply) -> Capabilities {
        let mut caps = Capabilities::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            match keyword.to_ascii_uppercase().as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => caps.size = Some(words.next().and_then(|w| w.parse().ok()).unwrap_or(0)),
                "8BITMIME" => caps.eight_bit_mime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "CHUNKING" => caps.chunking = true,
                "DSN" => caps.dsn = true,
                "STARTTLS" => caps.starttls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "AUTH" => caps.auth = words.map(|w| w.to_ascii_uppercase()).collect(),
                _ => {}
            }
        }
        caps
    }
}

/// `MAIL FROM:<…>` with the parameters the server supports.
pub fn mail_command(
    reverse_path: &str,
    params: &MailParams,
    size: u64,
    caps: &Capabilities,
) -> String {
    let mut command = format!("MAIL FROM:<{reverse_path}>");
    if caps.size.is_some() {
        command.push_str(&format!(" SIZE={size}"));
    }
    if caps.eight_bit_mime {
        match params.body {
            Some(Body::EightBitMime) => command.push_str(" BODY=8BITMIME"),
            Some(Body::SevenBit) => command.push_str(" BODY=7BIT"),
            None => {}
        }
    }
    if params.smtputf8 && caps.smtputf8 {
        command.push_str(" SMTPUTF8");
    }
    if caps.dsn {
        match params.ret {
            Some(Ret::Full) => command.push_str(" RET=FULL"),
            Some(Ret::Hdrs) => command.push_str(" RET=HDRS"),
            None => {}
        }
        if let Some(envid) = &params.envid {
            command.push_str(&format!(" ENVID={}", encode_xtext(envid)));
        }
    }
    command.push_str("\r\n");
    command
}

/// `RCPT TO:<…>` with DSN parameters when the server supports DSN.
pub fn rcpt_command(forward_path: &str, params: &RcptParams, caps: &Capabilities) -> String {
    let mut command = format!("RCPT TO:<{forward_path}>");
    if caps.dsn {
        if let Some(notify) = &params.notify {
            let words: Vec<&str> = notify.iter().map(|n| n.keyword()).collect();
            command.push_str(&format!(" NOTIFY={}", words.join(",")));
        }
        if let Some(orcpt) = &params.orcpt {
            if let Some((kind, address)) = orcpt.split_once(';') {
                command.push_str(&format!(" ORCPT={kind};{}", encode_xtext(address)));
            }
        }
    }
    command.push_str("\r\n");
    command
}

/// Dot-stuffs wire-format data for DATA, across calls.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    at_line_start: bool,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer {
            at_line_start: true,
        }
    }
}

impl DotStuffer {
    /// Appends `input` to `out`, doubling dots that start a line.
    pub fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>) {
        for &byte in input {
            if self.at_line_start && byte == b'.' {
                out.push(b'.');
            }
            out.push(byte);
            self.at_line_start = byte == b'\n';
        }
    }

    /// The end-of-data marker, preceded by a CRLF when the data did not end a line.
    pub fn finish(&self) -> &'static [u8] {
        if self.at_line_start {
            b".\r\n"
        } else {
            b"\r\n.\r\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::params::Notify;

    #[test]
    fn multi_line_reply_with_enhanced_codes() {
        let (reply, used) = parse_reply(b"250-2.0.0 first\r\n250 2.0.0 second\r\nextra")
            .unwrap()
            .unwrap();
        assert_eq!(used, 35);
        assert_eq!(reply.code, 250);
        assert_eq!(reply.status.as_deref(), Some("2.0.0"));
        assert_eq!(reply.lines, vec!["first", "second"]);
        assert_eq!(parse_reply(b"250-partial\r\n").unwrap(), None);
        assert!(parse_reply(b"hello\r\n").is_err());
        assert!(parse_reply(b"250-a\r\n251 b\r\n").is_err());
    }

    #[test]
    fn ehlo_capabilities() {
        let (reply, _) = parse_reply(
            b"250-mx Hello\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-CHUNKING\r\n250-DSN\r\n250 AUTH PLAIN LOGIN\r\n",
        )
        .unwrap()
        .unwrap();
        let caps = Capabilities::from_ehlo(&reply);
        assert!(caps.pipelining && caps.chunking && caps.dsn && !caps.starttls);
        assert_eq!(caps.size, Some(1000));
        assert_eq!(caps.auth, vec!["PLAIN", "LOGIN"]);
    }

    #[test]
    fn commands_carry_supported_parameters_only() {
        let params = MailParams {
            size: Some(1),
            body: Some(Body::EightBitMime),
            smtputf8: false,
            ret: Some(Ret::Hdrs),
            envid: Some("a b".into()),
        };
        let mut caps = Capabilities {
            size: Some(0),
            eight_bit_mime: true,
            ..Capabilities::default()
        };
        assert_eq!(
            mail_command("a@b", &params, 42, &caps),
            "MAIL FROM:<a@b> SIZE=42 BODY=8BITMIME\r\n"
        );
        caps.dsn = true;
        assert_eq!(
            mail_command("a@b", &params, 42, &caps),
            "MAIL FROM:<a@b> SIZE=42 BODY=8BITMIME RET=HDRS ENVID=a+20b\r\n"
        );
        let rcpt = RcptParams {
            notify: Some(vec![Notify::Failure, Notify::Delay]),
            orcpt: Some("rfc822;x@y".into()),
        };
        assert_eq!(
            rcpt_command("x@y", &rcpt, &caps),
            "RCPT TO:<x@y> NOTIFY=FAILURE,DELAY ORCPT=rfc822;x@y\r\n"
        );
    }

    #[test]
    fn dot_stuffing_across_chunks() {
        let mut stuffer = DotStuffer::default();
        let mut out = Vec::new();
        stuffer.stuff(b".a\r\n", &mut out);
        stuffer.stuff(b"b\r", &mut out);
        stuffer.stuff(b"\n.", &mut out);
        stuffer.stuff(b"c\r\n", &mut out);
        assert_eq!(out, b"..a\r\nb\r\n..c\r\n");
        assert_eq!(stuffer.finish(), b".\r\n");
    }
}
