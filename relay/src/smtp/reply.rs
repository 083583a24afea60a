//! SMTP replies: a code, an enhanced status code (RFC 3463) and text lines.

use std::fmt;

/// One SMTP reply, possibly multi-line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code such as `2.1.0`; absent only where RFC 2034 says so
    /// (the greeting and the EHLO/HELO reply).
    pub status: Option<String>,
    /// Text lines, without code or CRLF.
    pub lines: Vec<String>,
}

impl Reply {
    /// A single-line reply with an enhanced status code.
    pub fn new(code: u16, status: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            status: Some(status.to_owned()),
            lines: vec![text.into()],
        }
    }

    /// A reply without an enhanced status code (greeting, EHLO).
    pub fn plain(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            status: None,
            lines,
        }
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// The reply as it goes on the wire.
    pub fn to_wire(&self) -> Vec<u8> {
        self.to_string().into_bytes()
    }

    /// The wire text on one line (lines joined by spaces), for states,
    /// logs and DSN diagnostics.
    pub fn one_line(&self) -> String {
        self.to_string().trim_end().replace("\r\n", " ")
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.lines.len().saturating_sub(1);
        if self.lines.is_empty() {
            return write!(f, "{}\r\n", self.code);
        }
        for (index, line) in self.lines.iter().enumerate() {
            let sep = if index == last { ' ' } else { '-' };
            match &self.status {
                Some(status) => write!(f, "{}{}{} {}\r\n", self.code, sep, status, line)?,
                None => write!(f, "{}{}{}\r\n", self.code, sep, line)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_line_with_and_without_status() {
        let reply = Reply::plain(250, vec!["a".into(), "b".into()]);
        assert_eq!(reply.to_string(), "250-a\r\n250 b\r\n");
        let reply = Reply::new(550, "5.7.1", "no");
        assert_eq!(reply.to_string(), "550 5.7.1 no\r\n");
        assert!(reply.is_permanent() && !reply.is_transient());
        assert_eq!(reply.one_line(), "550 5.7.1 no");
        assert_eq!(
            Reply::plain(250, vec!["a".into(), "b".into()]).one_line(),
            "250-a 250 b"
        );
    }
}
