//! `postern queue list`: one line per message, and the JSON form of a
//! message that `show`, `hold` and `release` print too.

use serde_json::{json, Value};

use super::{next_attempt, sender, short_duration, short_size, state_name, timestamp};
use crate::admin::proto;

/// Longest last error shown in the table; `show` prints it whole.
const LAST_ERROR_WIDTH: usize = 70;

/// [`table`] with the relay holding each message first (`--cluster`).
pub fn cluster_table(messages: &[proto::Message]) -> String {
    if messages.is_empty() {
        return "Queue is empty on every relay\n".into();
    }
    let mut out = String::new();
    let mut relays: Vec<&str> = messages.iter().map(|m| m.relay.as_str()).collect();
    relays.sort();
    relays.dedup();
    for relay in relays {
        let held: Vec<proto::Message> = messages
            .iter()
            .filter(|m| m.relay == relay)
            .cloned()
            .collect();
        out += &format!("== {relay}\n");
        out += &table(&held);
    }
    out
}

/// The table: id, age, size, sender, recipients (count and first), next
/// attempt and last error, then a summary line.
pub fn table(messages: &[proto::Message]) -> String {
    if messages.is_empty() {
        return "Queue is empty\n".into();
    }
    let rows: Vec<Vec<String>> = messages
        .iter()
        .map(|m| {
            let first = m
                .recipients
                .first()
                .map(|r| r.address.clone())
                .unwrap_or_default();
            vec![
                m.id.clone(),
                short_duration(m.now_ms.saturating_sub(m.arrival_ms)),
                short_size(m.size),
                sender(m),
                m.recipients.len().to_string(),
                first,
                next_attempt(m),
                super::truncate(m.last_error.as_deref().unwrap_or("-"), LAST_ERROR_WIDTH),
            ]
        })
        .collect();
    let mut out = super::table(
        &[
            "ID",
            "AGE",
            "SIZE",
            "SENDER",
            "RCPTS",
            "RECIPIENT",
            "NEXT",
            "LAST ERROR",
        ],
        &rows,
    );
    let octets: u64 = messages.iter().map(|m| m.size).sum();
    let recipients: usize = messages.iter().map(|m| m.recipients.len()).sum();
    out += &format!(
        "-- {} message{}, {recipients} recipient{}, {} octets\n",
        messages.len(),
        plural(messages.len()),
        plural(recipients),
        octets
    );
    out
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// A message as JSON: times as Unix ms and RFC 3339, ages in seconds.
pub fn message_json(m: &proto::Message) -> Value {
    let recipients: Vec<Value> = m
        .recipients
        .iter()
        .map(|r| {
            json!({
                "address": r.address,
                "status": r.status,
                "destination": r.destination,
                "last_reply": r.last_reply,
                "remote": r.remote,
                "notify": r.notify,
                "orcpt": r.orcpt,
            })
        })
        .collect();
    json!({
        "id": m.id,
        "relay": m.relay,
        "sender": m.sender,
        "recipients": recipients,
        "size": m.size,
        "received_at": m.received_at,
        "age_seconds": m.now_ms.saturating_sub(m.arrival_ms) / 1000,
        "state": state_name(m.state()),
        "in_flight": m.in_flight,
        "attempts": m.attempts,
        "next_attempt_ms": m.next_attempt_ms,
        "next_attempt_at": timestamp(m.next_attempt_ms),
        "last_error": m.last_error,
        "client": {
            "addr": m.client_addr,
            "helo": m.helo,
            "tls": m.tls,
            "auth": m.auth,
        },
        "listener": m.listener,
        "envid": m.envid,
        "ret": m.ret,
        "body": m.body,
        "smtputf8": m.smtputf8,
        "data_sha256": m.data_sha256,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A deferred message as the relay would send it.
    pub(crate) fn sample() -> proto::Message {
        proto::Message {
            id: "0001AAAA".into(),
            sender: "alice@example.org".into(),
            recipients: vec![
                proto::Recipient {
                    address: "bob@example.net".into(),
                    status: "pending".into(),
                    last_reply: Some("451 4.4.1 connection refused".into()),
                    remote: None,
                    destination: "127.0.0.1:1".into(),
                    notify: None,
                    orcpt: None,
                },
                proto::Recipient {
                    address: "carol@example.net".into(),
                    status: "delivered".into(),
                    last_reply: Some("250 2.0.0 ok".into()),
                    remote: Some("mx.example.net".into()),
                    destination: "127.0.0.1:1".into(),
                    notify: Some("FAILURE,DELAY".into()),
                    orcpt: None,
                },
            ],
            size: 1536,
            received_at: "2024-05-01T12:00:00.000Z".into(),
            arrival_ms: 1_714_564_800_000,
            state: proto::MessageState::Deferred.into(),
            attempts: 2,
            next_attempt_ms: 1_714_564_800_000 + 600_000,
            in_flight: false,
            last_error: Some("451 4.4.1 connection refused".into()),
            now_ms: 1_714_564_800_000 + 330_000,
            client_addr: "127.0.0.1:40000".into(),
            helo: "client.test".into(),
            listener: "smtp".into(),
            ..Default::default()
        }
    }

    #[test]
    fn list_table() {
        let mut held = sample();
        held.id = "0002BBBB".into();
        held.sender = String::new();
        held.recipients.truncate(1);
        held.size = 300;
        held.state = proto::MessageState::Held.into();
        held.last_error = None;
        assert_eq!(
            table(&[sample(), held]),
            "\
ID        AGE  SIZE  SENDER             RCPTS  RECIPIENT        NEXT   LAST ERROR
0001AAAA  5m   1.5K  alice@example.org  2      bob@example.net  in 4m  451 4.4.1 connection refused
0002BBBB  5m   300   <>                 1      bob@example.net  held   -
-- 2 messages, 3 recipients, 1836 octets
"
        );
    }

    #[test]
    fn empty_list() {
        assert_eq!(table(&[]), "Queue is empty\n");
    }

    #[test]
    fn json_form() {
        let value = message_json(&sample());
        assert_eq!(value["state"], "deferred");
        assert_eq!(value["age_seconds"], 330);
        assert_eq!(value["next_attempt_at"], "2024-05-01T12:10:00Z");
        assert_eq!(value["recipients"][1]["status"], "delivered");
        assert_eq!(value["recipients"][0]["destination"], "127.0.0.1:1");
    }
}
