//! `postern queue show ID`: the envelope of one message and where each
//! recipient stands.

use super::{next_attempt, short_duration, state_name, table, timestamp};
use crate::admin::proto;

/// The envelope as labelled lines, then a table of recipients.
pub fn render(m: &proto::Message) -> String {
    let mut lines: Vec<(&str, String)> = Vec::new();
    lines.push(("Message", m.id.clone()));
    let mut state = format!(
        "{}, {} attempt{}",
        state_name(m.state()),
        m.attempts,
        if m.attempts == 1 { "" } else { "s" }
    );
    if m.state() != proto::MessageState::Held {
        state += &format!(", next {}", next_attempt(m));
        if m.next_attempt_ms > m.now_ms && !m.in_flight {
            state += &format!(" ({})", timestamp(m.next_attempt_ms));
        }
    }
    lines.push(("State", state));
    lines.push((
        "Arrived",
        format!(
            "{} ({} ago)",
            m.received_at,
            short_duration(m.now_ms.saturating_sub(m.arrival_ms))
        ),
    ));
    let mut client = format!(
        "{} (HELO {}) on listener {}",
        m.client_addr, m.helo, m.listener
    );
    if let Some(tls) = &m.tls {
        client += &format!(", TLS {tls}");
    }
    if let Some(auth) = &m.auth {
        client += &format!(", AUTH {auth}");
    }
    lines.push(("Client", client));
    let sender = if m.sender.is_empty() {
        "<> (a delivery status notification)".to_owned()
    } else {
        format!("<{}>", m.sender)
    };
    lines.push(("Sender", sender));
    lines.push((
        "Size",
        format!("{} octets, SHA-256 {}", m.size, m.data_sha256),
    ));
    let mut params = Vec::new();
    if let Some(body) = &m.body {
        params.push(format!("BODY={body}"));
    }
    if m.smtputf8 {
        params.push("SMTPUTF8".into());
    }
    if let Some(ret) = &m.ret {
        params.push(format!("RET={ret}"));
    }
    if let Some(envid) = &m.envid {
        params.push(format!("ENVID={envid}"));
    }
    if !params.is_empty() {
        lines.push(("Params", params.join(" ")));
    }
    let mut out = String::new();
    for (label, value) in lines {
        out += &format!("{label:<9}{value}\n");
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = m
        .recipients
        .iter()
        .map(|r| {
            let mut address = r.address.clone();
            if let Some(notify) = &r.notify {
                address += &format!(" NOTIFY={notify}");
            }
            if let Some(orcpt) = &r.orcpt {
                address += &format!(" ORCPT={orcpt}");
            }
            let reply = match (&r.last_reply, &r.remote) {
                (Some(reply), Some(remote)) => format!("{reply} (from {remote})"),
                (Some(reply), None) => reply.clone(),
                (None, _) => "-".into(),
            };
            vec![address, r.status.clone(), r.destination.clone(), reply]
        })
        .collect();
    out += &table(&["RECIPIENT", "STATUS", "DESTINATION", "LAST REPLY"], &rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::cli::list::tests::sample;

    #[test]
    fn show_deferred_message() {
        let mut message = sample();
        message.ret = Some("HDRS".into());
        message.envid = Some("abc".into());
        message.data_sha256 = "00ff".into();
        assert_eq!(
            render(&message),
            "\
Message  0001AAAA
State    deferred, 2 attempts, next in 4m (2024-05-01T12:10:00Z)
Arrived  2024-05-01T12:00:00.000Z (5m ago)
Client   127.0.0.1:40000 (HELO client.test) on listener smtp
Sender   <alice@example.org>
Size     1536 octets, SHA-256 00ff
Params   RET=HDRS ENVID=abc

RECIPIENT                               STATUS     DESTINATION  LAST REPLY
bob@example.net                         pending    127.0.0.1:1  451 4.4.1 connection refused
carol@example.net NOTIFY=FAILURE,DELAY  delivered  127.0.0.1:1  250 2.0.0 ok (from mx.example.net)
"
        );
    }

    #[test]
    fn show_held_bounce() {
        let mut message = sample();
        message.sender = String::new();
        message.state = proto::MessageState::Held.into();
        message.attempts = 1;
        let text = render(&message);
        assert!(text.contains("State    held, 1 attempt\n"), "{text}");
        assert!(
            text.contains("Sender   <> (a delivery status notification)\n"),
            "{text}"
        );
    }
}
