//! Delivery status notifications (RFC 3464): the report for failed (or
//! delayed) recipients, sent from `<>` to the reverse path.

use chrono::Utc;

use crate::smtp::params::{Notify, Ret};
use crate::spool::envelope::{Envelope, Recipient};

/// What happened to a recipient the report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Delivery failed for good.
    Failed,
    /// Still trying (delay warning).
    Delayed,
}

/// One recipient in the report.
#[derive(Debug, Clone)]
pub struct Reported<'a> {
    /// The recipient and its DSN parameters.
    pub recipient: &'a Recipient,
    /// Failed or delayed.
    pub action: Action,
    /// The reply that decided it (`550 5.1.1 …`), as text.
    pub diagnostic: String,
    /// The server that gave it, if any.
    pub remote: Option<String>,
}

/// Whether the sender asked (or did not refuse) to hear about `action` for this recipient.
pub fn wants_notice(recipient: &Recipient, action: Action) -> bool {
    match &recipient.params.notify {
        None => action == Action::Failed,
        Some(list) => list.contains(&match action {
            Action::Failed => Notify::Failure,
            Action::Delayed => Notify::Delay,
        }),
    }
}

/// Whether the original message goes back whole (RET=FULL or no RET) or only its headers.
pub fn returns_full_message(envelope: &Envelope) -> bool {
    envelope.mail_params.ret != Some(Ret::Hdrs)
}

/// The report before the returned message, and what closes it. The caller
/// writes `head`, then the original (whole, or its header section), then `tail`.
pub fn report(
    hostname: &str,
    envelope: &Envelope,
    reported: &[Reported<'_>],
    id_hint: &str,
) -> (String, String) {
    let boundary = format!("{id_hint}/{hostname}");
    // RFC 6533: reports about internationalized mail use utf-8 addresses and
    // the message/global-* types.
    let international = is_international(envelope, reported);
    let address_type = if international { "utf-8" } else { "rfc822" };
    let now = Utc::now().format("%a, %d %b %Y %H:%M:%S +0000").to_string();
    let to = envelope
        .reverse_path
        .as_ref()
        .map(|m| m.address())
        .unwrap_or_default();
    let delayed = reported.iter().all(|r| r.action == Action::Delayed);
    let subject = if delayed {
        "Delayed Mail (still being retried)"
    } else {
        "Undelivered Mail Returned to Sender"
    };
    let mut head = String::new();
    head.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    head.push_str(&format!("To: <{to}>\r\n"));
    head.push_str(&format!("Subject: {subject}\r\n"));
    head.push_str(&format!("Date: {now}\r\n"));
    head.push_str(&format!("Message-ID: <{id_hint}.dsn@{hostname}>\r\n"));
    head.push_str("Auto-Submitted: auto-replied\r\n");
    head.push_str("MIME-Version: 1.0\r\n");
    head.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    head.push_str("\r\nThis is a MIME-encapsulated message.\r\n\r\n");

    head.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ));
    head.push_str(&format!(
        "This is the mail system at host {hostname}.\r\n\r\n"
    ));
    if delayed {
        head.push_str("Your message could not be delivered yet. It is still being retried;\r\n");
        head.push_str("you do not need to send it again.\r\n\r\n");
    } else {
        head.push_str("Your message could not be delivered to one or more recipients.\r\n");
        head.push_str("It is attached below.\r\n\r\n");
    }
    for item in reported {
        head.push_str(&format!(
            "<{}>: {}\r\n",
            item.recipient.address.address(),
            one_line(&item.diagnostic)
        ));
    }
    head.push_str("\r\n");

    let status_type = if international {
        "message/global-delivery-status"
    } else {
        "message/delivery-status"
    };
    head.push_str(&format!(
        "--{boundary}\r\nContent-Type: {status_type}\r\n\r\n"
    ));
    head.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    if let Some(envid) = &envelope.mail_params.envid {
        head.push_str(&format!("Original-Envelope-Id: {}\r\n", one_line(envid)));
    }
    head.push_str(&format!("X-Postern-Queue-ID: {}\r\n", envelope.id));
    if let Ok(arrival) = chrono::DateTime::parse_from_rfc3339(&envelope.received_at) {
        head.push_str(&format!(
            "Arrival-Date: {}\r\n",
            arrival.format("%a, %d %b %Y %H:%M:%S %z")
        ));
    }
    for item in reported {
        head.push_str("\r\n");
        head.push_str(&format!(
            "Final-Recipient: {address_type}; {}\r\n",
            item.recipient.address.address()
        ));
        if let Some(orcpt) = &item.recipient.params.orcpt {
            if let Some((kind, address)) = orcpt.split_once(';') {
                head.push_str(&format!(
                    "Original-Recipient: {kind}; {}\r\n",
                    one_line(address)
                ));
            }
        }
        let (action, default_status) = match item.action {
            Action::Failed => ("failed", "5.0.0"),
            Action::Delayed => ("delayed", "4.0.0"),
        };
        head.push_str(&format!("Action: {action}\r\n"));
        head.push_str(&format!(
            "Status: {}\r\n",
            status_of(&item.diagnostic).unwrap_or(default_status)
        ));
        if let Some(remote) = &item.remote {
            head.push_str(&format!("Remote-MTA: dns; {}\r\n", one_line(remote)));
        }
        head.push_str(&format!(
            "Diagnostic-Code: smtp; {}\r\n",
            one_line(&item.diagnostic)
        ));
        head.push_str(&format!("Last-Attempt-Date: {now}\r\n"));
    }
    head.push_str("\r\n");
    let original_type = match (returns_full_message(envelope), international) {
        (true, false) => "message/rfc822",
        (true, true) => "message/global",
        (false, false) => "text/rfc822-headers",
        (false, true) => "message/global-headers",
    };
    head.push_str(&format!(
        "--{boundary}\r\nContent-Type: {original_type}\r\n\r\n"
    ));
    let tail = format!("\r\n--{boundary}--\r\n");
    (head, tail)
}

/// Whether the report must be internationalized (RFC 6533): the original used
/// SMTPUTF8, or an address in it is not ASCII. Its envelope then needs SMTPUTF8.
pub fn is_international(envelope: &Envelope, reported: &[Reported<'_>]) -> bool {
    envelope.mail_params.smtputf8
        || envelope
            .reverse_path
            .as_ref()
            .is_some_and(|m| !m.address().is_ascii())
        || reported
            .iter()
            .any(|r| !r.recipient.address.address().is_ascii())
}

/// The enhanced status code in a reply text such as `550 5.1.1 no such user`.
fn status_of(diagnostic: &str) -> Option<&str> {
    let candidate = diagnostic.split_whitespace().nth(1)?;
    let parts: Vec<&str> = candidate.split('.').collect();
    let valid = parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && matches!(parts[0], "2" | "4" | "5");
    valid.then_some(candidate)
}

fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smtp::params::{MailParams, Mailbox, RcptParams};
    use crate::spool::envelope::{ClientInfo, ENVELOPE_VERSION};

    fn mailbox(address: &str) -> Mailbox {
        let (local, domain) = address.split_once('@').unwrap();
        Mailbox {
            local: local.into(),
            domain: domain.into(),
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            version: ENVELOPE_VERSION,
            id: "ID1".into(),
            spool: String::new(),
            reverse_path: Some(mailbox("sender@example.org")),
            mail_params: MailParams {
                envid: Some("ENV-1".into()),
                ret: Some(Ret::Hdrs),
                ..MailParams::default()
            },
            recipients: vec![Recipient {
                address: mailbox("gone@example.net"),
                params: RcptParams {
                    notify: None,
                    orcpt: Some("rfc822;Gone@example.net".into()),
                },
            }],
            client: ClientInfo {
                addr: "127.0.0.1:1".into(),
                helo: "c".into(),
                esmtp: true,
                tls: None,
                auth: None,
            },
            listener: "smtp".into(),
            received_at: "2026-11-25T10:00:00.000Z".into(),
            data_len: 0,
            data_sha256: String::new(),
            added_headers: String::new(),
        }
    }

    #[test]
    fn failure_report_fields() {
        let envelope = envelope();
        let reported = [Reported {
            recipient: &envelope.recipients[0],
            action: Action::Failed,
            diagnostic: "550 5.1.1 no such user".into(),
            remote: Some("mx.example.net[127.0.0.1]".into()),
        }];
        let (head, tail) = report("relay.test", &envelope, &reported, "DSNID");
        assert!(head.contains("To: <sender@example.org>\r\n"));
        assert!(head.contains("report-type=delivery-status"));
        assert!(head.contains("Original-Envelope-Id: ENV-1\r\n"));
        assert!(head.contains("Final-Recipient: rfc822; gone@example.net\r\n"));
        assert!(head.contains("Original-Recipient: rfc822; Gone@example.net\r\n"));
        assert!(head.contains("Action: failed\r\nStatus: 5.1.1\r\n"));
        assert!(head.contains("Diagnostic-Code: smtp; 550 5.1.1 no such user\r\n"));
        assert!(head.ends_with("Content-Type: text/rfc822-headers\r\n\r\n"));
        assert_eq!(tail, "\r\n--DSNID/relay.test--\r\n");
        assert!(!head.contains("\n\n") && !head.replace("\r\n", "").contains('\n'));
    }

    #[test]
    fn notify_rules() {
        let mut recipient = envelope().recipients[0].clone();
        assert!(wants_notice(&recipient, Action::Failed));
        assert!(!wants_notice(&recipient, Action::Delayed));
        recipient.params.notify = Some(vec![Notify::Never]);
        assert!(!wants_notice(&recipient, Action::Failed));
        recipient.params.notify = Some(vec![Notify::Delay]);
        assert!(wants_notice(&recipient, Action::Delayed));
    }
}
