//! `postern queue stats`: messages by state and by destination, and the
//! oldest message's age.

use serde_json::{json, Value};

use super::{short_duration, table};
use crate::admin::proto;

/// Two small tables and the oldest message's age.
pub fn render(stats: &proto::StatsResponse) -> String {
    let states = [
        ("active", stats.active),
        ("deferred", stats.deferred),
        ("held", stats.held),
        ("total", stats.total),
    ];
    let rows: Vec<Vec<String>> = states
        .iter()
        .map(|(name, count)| vec![(*name).to_owned(), count.to_string()])
        .collect();
    let mut out = table(&["STATE", "MESSAGES"], &rows);
    out.push('\n');
    if stats.destinations.is_empty() {
        out += "No recipients pending\n";
    } else {
        let rows: Vec<Vec<String>> = stats
            .destinations
            .iter()
            .map(|d| {
                vec![
                    d.destination.clone(),
                    d.messages.to_string(),
                    d.recipients.to_string(),
                ]
            })
            .collect();
        out += &table(&["DESTINATION", "MESSAGES", "RECIPIENTS"], &rows);
    }
    out.push('\n');
    match stats.oldest_arrival_ms {
        Some(oldest) => {
            out += &format!(
                "Oldest message: {}\n",
                short_duration(stats.now_ms.saturating_sub(oldest))
            )
        }
        None => out += "Oldest message: - (queue is empty)\n",
    }
    out
}

/// The JSON form.
pub fn stats_json(stats: &proto::StatsResponse) -> Value {
    let destinations: Vec<Value> = stats
        .destinations
        .iter()
        .map(|d| {
            json!({
                "destination": d.destination,
                "messages": d.messages,
                "recipients": d.recipients,
            })
        })
        .collect();
    json!({
        "total": stats.total,
        "active": stats.active,
        "deferred": stats.deferred,
        "held": stats.held,
        "destinations": destinations,
        "oldest_age_seconds": stats.oldest_arrival_ms.map(|t| stats.now_ms.saturating_sub(t) / 1000),
        "relays": stats.relays,
        "unreachable": stats.unreachable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_tables() {
        let stats = proto::StatsResponse {
            total: 4,
            active: 1,
            deferred: 2,
            held: 1,
            destinations: vec![
                proto::DestinationCount {
                    destination: "127.0.0.1:2526".into(),
                    messages: 3,
                    recipients: 5,
                    oldest_arrival_ms: Some(1_000),
                },
                proto::DestinationCount {
                    destination: "mx:example.org".into(),
                    messages: 1,
                    recipients: 1,
                    oldest_arrival_ms: None,
                },
            ],
            oldest_arrival_ms: Some(1_000),
            now_ms: 1_000 + 2 * 3_600_000 + 5 * 60_000,
            ..Default::default()
        };
        assert_eq!(
            render(&stats),
            "\
STATE     MESSAGES
active    1
deferred  2
held      1
total     4

DESTINATION     MESSAGES  RECIPIENTS
127.0.0.1:2526  3         5
mx:example.org  1         1

Oldest message: 2h5m
"
        );
        let value = stats_json(&stats);
        assert_eq!(value["oldest_age_seconds"], 7500);
        assert_eq!(value["destinations"][0]["recipients"], 5);
    }

    #[test]
    fn empty_queue_stats() {
        let text = render(&proto::StatsResponse::default());
        assert!(text.contains("total     0\n"), "{text}");
        assert!(text.contains("No recipients pending\n"), "{text}");
        assert!(
            text.ends_with("Oldest message: - (queue is empty)\n"),
            "{text}"
        );
    }
}
