//! The `Received:` trace header we prepend to every message (RFC 5321 §4.4).

use chrono::Utc;

/// What the trace header records.
#[derive(Debug)]
pub struct TraceInfo<'a> {
    /// EHLO/HELO argument.
    pub helo: &'a str,
    /// Client IP address, or `None` for a Unix socket.
    pub client_ip: Option<std::net::IpAddr>,
    /// Our host name.
    pub hostname: &'a str,
    /// EHLO rather than HELO.
    pub esmtp: bool,
    /// SMTPUTF8 transaction.
    pub smtputf8: bool,
    /// TLS description, when encrypted.
    pub tls: Option<&'a str>,
    /// Authenticated.
    pub authenticated: bool,
    /// The local user (name, uid) who submitted over the Unix socket.
    pub local_user: Option<(&'a str, u32)>,
    /// Spool id.
    pub id: &'a str,
    /// The single recipient, when there is exactly one.
    pub single_recipient: Option<&'a str>,
}

/// Formats the header, folded, ending in CRLF.
pub fn received_header(info: &TraceInfo<'_>) -> String {
    // RFC 3848 / RFC 6531 protocol names.
    let mut protocol = String::from(match (info.smtputf8, info.esmtp) {
        (true, _) => "UTF8SMTP",
        (false, true) => "ESMTP",
        (false, false) => "SMTP",
    });
    if info.tls.is_some() {
        protocol.push('S');
    }
    if info.authenticated {
        protocol.push('A');
    }
    let helo = sanitize(info.helo);
    let from = match (info.client_ip, info.local_user) {
        (Some(ip), _) => format!("from {helo} ([{ip}])"),
        (None, Some((user, uid))) => {
            format!("from {helo} (local user {} uid {uid})", sanitize(user))
        }
        (None, None) => format!("from {helo} (local socket)"),
    };
    let mut header = format!(
        "Received: {from}\r\n\tby {} (Postern)",
        sanitize(info.hostname)
    );
    if let Some(tls) = info.tls {
        header.push_str(&format!(" ({})", sanitize(tls)));
    }
    header.push_str(&format!("\r\n\twith {protocol} id {}", info.id));
    if let Some(rcpt) = info.single_recipient {
        header.push_str(&format!("\r\n\tfor <{}>", sanitize(rcpt)));
    }
    header.push_str(&format!(
        ";\r\n\t{}\r\n",
        Utc::now().format("%a, %d %b %Y %H:%M:%S +0000")
    ));
    header
}

/// Keeps a client-supplied word from breaking the header.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() || c == '(' || c == ')' {
                '?'
            } else {
                c
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_folded_and_names_the_protocol() {
        let header = received_header(&TraceInfo {
            helo: "client.example\r\nX-Injected: 1",
            client_ip: Some("192.0.2.1".parse().unwrap()),
            hostname: "mx.test",
            esmtp: true,
            smtputf8: false,
            tls: Some("TLSv1_3 with cipher X"),
            authenticated: false,
            local_user: None,
            id: "ID1",
            single_recipient: Some("b@example.net"),
        });
        assert!(header.starts_with(
            "Received: from client.example??X-Injected: 1 ([192.0.2.1])\r\n\tby mx.test (Postern)"
        ));
        assert!(header.contains("with ESMTPS id ID1"));
        assert!(header.contains("for <b@example.net>;"));
        assert!(header.ends_with(" +0000\r\n"));
        assert_eq!(header.matches("\r\n").count(), 5);
    }

    #[test]
    fn local_submission_names_the_user_and_uid() {
        let header = received_header(&TraceInfo {
            helo: "localhost",
            client_ip: None,
            hostname: "mx.test",
            esmtp: true,
            smtputf8: false,
            tls: None,
            authenticated: true,
            local_user: Some(("alice(x)", 1000)),
            id: "ID2",
            single_recipient: None,
        });
        assert!(header.starts_with(
            "Received: from localhost (local user alice?x? uid 1000)\r\n\tby mx.test (Postern)"
        ));
        assert!(header.contains("with ESMTPA id ID2;"));
    }
}
