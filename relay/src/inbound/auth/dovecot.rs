//! A client of Dovecot's authentication service, the protocol Postfix's
//! `smtpd_sasl_type = dovecot` speaks (Dovecot's "auth client protocol"):
//! tab-separated lines over a Unix socket or TCP. The relay always asks
//! with PLAIN, whatever mechanism its own client used, flags the request
//! `secured` (it only ever happens under TLS) and `nologin`, and passes the
//! client's address (`rip`) so Dovecot's logs and its own penalties see it.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};

use crate::smtp::base64;

/// Longest line we read from Dovecot.
const MAX_LINE: usize = 16 * 1024;

/// Why Dovecot could not answer.
#[derive(Debug, thiserror::Error)]
pub enum DovecotError {
    /// Connecting, reading or writing failed.
    #[error("Dovecot auth at {at}: {source}")]
    Io {
        /// The socket.
        at: String,
        /// What went wrong.
        source: std::io::Error,
    },
    /// No answer within the timeout.
    #[error("Dovecot auth at {at} did not answer within {timeout:?}")]
    Timeout {
        /// The socket.
        at: String,
        /// How long we waited.
        timeout: Duration,
    },
    /// Dovecot said something we do not understand.
    #[error("Dovecot auth at {at}: {why}")]
    Protocol {
        /// The socket.
        at: String,
        /// What was wrong.
        why: String,
    },
}

/// Dovecot's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DovecotAnswer {
    /// The password is right; Dovecot's canonical name of the user.
    Ok {
        /// `user=` of the OK line (the name the client gave when absent).
        user: String,
    },
    /// The password is wrong, or the user unknown or disabled.
    Fail {
        /// Dovecot's `reason=`, when it gave one (never the password).
        reason: Option<String>,
    },
}

/// Where Dovecot's authentication service listens.
#[derive(Debug, Clone)]
pub struct DovecotAuth {
    address: String,
    timeout: Duration,
}

impl DovecotAuth {
    /// A Unix socket path (starts with `/`) or `host:port`.
    pub fn new(address: &str, timeout: Duration) -> DovecotAuth {
        DovecotAuth {
            address: address.to_owned(),
            timeout,
        }
    }

    /// Asks Dovecot whether `password` is `user`'s (acting as `authzid`
    /// when not empty).
    pub async fn check(
        &self,
        authzid: &str,
        user: &str,
        password: &str,
        client: Option<IpAddr>,
    ) -> Result<DovecotAnswer, DovecotError> {
        let at = self.address.clone();
        let exchange = async {
            if self.address.starts_with('/') {
                let stream = tokio::net::UnixStream::connect(&self.address).await?;
                exchange(stream, authzid, user, password, client).await
            } else {
                let stream = tokio::net::TcpStream::connect(&self.address).await?;
                exchange(stream, authzid, user, password, client).await
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(DovecotError::Timeout {
                at,
                timeout: self.timeout,
            }),
            Ok(Err(Failure::Io(source))) => Err(DovecotError::Io { at, source }),
            Ok(Err(Failure::Protocol(why))) => Err(DovecotError::Protocol { at, why }),
            Ok(Ok(answer)) => Ok(answer),
        }
    }
}

enum Failure {
    Io(std::io::Error),
    Protocol(String),
}

impl From<std::io::Error> for Failure {
    fn from(err: std::io::Error) -> Failure {
        Failure::Io(err)
    }
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    authzid: &str,
    user: &str,
    password: &str,
    client: Option<IpAddr>,
) -> Result<DovecotAnswer, Failure> {
    let mut stream = BufReader::new(stream);
    let handshake = format!("VERSION\t1\t2\nCPID\t{}\n", std::process::id());
    stream.get_mut().write_all(handshake.as_bytes()).await?;
    // The server's handshake: VERSION, MECH…, SPID, CUID, COOKIE, DONE.
    let mut plain = false;
    loop {
        let line = read_line(&mut stream).await?;
        let mut fields = line.split('\t');
        match fields.next() {
            Some("VERSION") if fields.next() != Some("1") => {
                return Err(Failure::Protocol(format!(
                    "unsupported protocol version: {line}"
                )))
            }
            Some("MECH") if fields.next() == Some("PLAIN") => plain = true,
            Some("DONE") => break,
            _ => {}
        }
    }
    if !plain {
        return Err(Failure::Protocol(
            "PLAIN is not among its mechanisms (auth_mechanisms)".into(),
        ));
    }
    let response = base64::encode(format!("{authzid}\0{user}\0{password}").as_bytes());
    let mut request = String::from("AUTH\t1\tPLAIN\tservice=smtp\tsecured\tnologin");
    if let Some(ip) = client {
        request.push_str(&format!("\trip={ip}"));
    }
    request.push_str(&format!("\tresp={response}\n"));
    stream.get_mut().write_all(request.as_bytes()).await?;
    loop {
        let line = read_line(&mut stream).await?;
        let mut fields = line.split('\t');
        let verb = fields.next().unwrap_or("");
        if fields.next() != Some("1") {
            continue;
        }
        let params: Vec<(&str, String)> = fields
            .map(|field| {
                let (key, value) = field.split_once('=').unwrap_or((field, ""));
                (key, unescape(value))
            })
            .collect();
        let param = |name: &str| {
            params
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.clone())
        };
        return match verb {
            "OK" => Ok(DovecotAnswer::Ok {
                user: param("user").unwrap_or_else(|| user.to_owned()),
            }),
            "FAIL" => Ok(DovecotAnswer::Fail {
                reason: param("reason"),
            }),
            other => Err(Failure::Protocol(format!(
                "unexpected {other:?} to a PLAIN request"
            ))),
        };
    }
}

/// One line without its LF; an over-long line or EOF is an error.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<String, Failure> {
    let mut line = Vec::new();
    let read = (&mut *reader)
        .take(MAX_LINE as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Err(Failure::Protocol("closed the connection".into()));
    }
    if line.pop() != Some(b'\n') {
        return Err(Failure::Protocol("line too long".into()));
    }
    String::from_utf8(line).map_err(|_| Failure::Protocol("line is not UTF-8".into()))
}

/// Undoes Dovecot's tab escaping (`\x01` followed by `1`, `t`, `r`, `n`).
fn unescape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\x01' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('1') => out.push('\x01'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaped_values_are_restored() {
        assert_eq!(unescape("a\x01tb\x011c"), "a\tb\x01c");
        assert_eq!(unescape("plain"), "plain");
    }
}
