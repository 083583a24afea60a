//! `postern queue shape`: Postfix's qshape — how many messages wait for each
//! destination domain, by age (minutes, each bucket twice the last), so a
//! backlog building up for one domain stands out.

use serde_json::{json, Value};

use crate::admin::proto;

/// Upper bounds of the age buckets, in minutes; older goes in `1280+`.
const BUCKETS: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// What a row counts messages by.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum By {
    /// The domains of pending recipients (a message counts once per domain).
    #[default]
    Recipient,
    /// The sender's domain (`<>` for the null sender).
    Sender,
}

/// One row: a domain (or TOTAL), its total, and its count per bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The domain.
    pub domain: String,
    /// Messages in every bucket.
    pub total: u64,
    /// Messages per bucket, the last one `1280+`.
    pub counts: [u64; BUCKETS.len() + 1],
}

fn domain_of(address: &str) -> String {
    address
        .rsplit_once('@')
        .map_or("", |(_, d)| d)
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// The rows: TOTAL first, then domains by total, most first.
pub fn shape(messages: &[proto::Message], by: By) -> Vec<Row> {
    let mut rows: std::collections::BTreeMap<String, Row> = Default::default();
    let mut total = Row {
        domain: "TOTAL".into(),
        total: 0,
        counts: Default::default(),
    };
    for message in messages {
        let age_min = message.now_ms.saturating_sub(message.arrival_ms) / 60_000;
        let bucket = BUCKETS
            .iter()
            .position(|&limit| age_min < limit)
            .unwrap_or(BUCKETS.len());
        let mut domains: Vec<String> = match by {
            By::Recipient => message
                .recipients
                .iter()
                .filter(|r| r.status == "pending")
                .map(|r| domain_of(&r.address))
                .collect(),
            By::Sender if message.sender.is_empty() => vec!["<>".into()],
            By::Sender => vec![domain_of(&message.sender)],
        };
        domains.sort();
        domains.dedup();
        if domains.is_empty() {
            continue;
        }
        total.total += 1;
        total.counts[bucket] += 1;
        for domain in domains {
            let row = rows.entry(domain.clone()).or_insert_with(|| Row {
                domain,
                total: 0,
                counts: Default::default(),
            });
            row.total += 1;
            row.counts[bucket] += 1;
        }
    }
    let mut rows: Vec<Row> = rows.into_values().collect();
    rows.sort_by(|a, b| b.total.cmp(&a.total).then_with(|| a.domain.cmp(&b.domain)));
    std::iter::once(total).chain(rows).collect()
}

fn bucket_names() -> Vec<String> {
    BUCKETS
        .iter()
        .map(u64::to_string)
        .chain(std::iter::once(format!("{}+", BUCKETS[BUCKETS.len() - 1])))
        .collect()
}

/// The table, right-aligned as qshape prints it.
pub fn render(rows: &[Row]) -> String {
    let header: Vec<String> = std::iter::once("T".to_owned())
        .chain(bucket_names())
        .collect();
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            std::iter::once(row.total.to_string())
                .chain(row.counts.iter().map(u64::to_string))
                .collect()
        })
        .collect();
    let name_width = rows
        .iter()
        .map(|r| r.domain.chars().count())
        .max()
        .unwrap_or(5);
    let widths: Vec<usize> = (0..header.len())
        .map(|column| {
            cells
                .iter()
                .map(|row| row[column].len())
                .chain(std::iter::once(header[column].len()))
                .max()
                .unwrap_or(1)
        })
        .collect();
    let line = |name: &str, values: &[String]| {
        let mut text = format!("{name:>name_width$}");
        for (value, width) in values.iter().zip(&widths) {
            text.push_str(&format!(" {value:>width$}"));
        }
        text.push('\n');
        text
    };
    let mut out = line("", &header);
    for (row, values) in rows.iter().zip(&cells) {
        out.push_str(&line(&row.domain, values));
    }
    out
}

/// The rows as JSON: the bucket names and, per row, total and counts.
pub fn json(rows: &[Row]) -> Value {
    json!({
        "buckets_minutes": bucket_names(),
        "rows": rows.iter().map(|row| json!({
            "domain": row.domain,
            "total": row.total,
            "counts": row.counts.to_vec(),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::super::filter::tests::message;
    use super::*;
    use proto::MessageState::Deferred;

    #[test]
    fn messages_count_once_per_pending_domain_in_their_age_bucket() {
        let messages = vec![
            message(
                "a@s.test",
                &[("x@one.test", "pending"), ("y@one.test", "pending")],
                3,
                Deferred,
            ),
            message(
                "",
                &[("x@one.test", "pending"), ("z@two.test", "pending")],
                45,
                Deferred,
            ),
            message(
                "b@s.test",
                &[("x@two.test", "delivered"), ("w@Three.test", "pending")],
                5000,
                Deferred,
            ),
            message("c@s.test", &[("x@two.test", "delivered")], 1, Deferred),
        ];
        let rows = shape(&messages, By::Recipient);
        let summary: Vec<(String, u64, Vec<u64>)> = rows
            .iter()
            .map(|r| (r.domain.clone(), r.total, r.counts.to_vec()))
            .collect();
        assert_eq!(
            summary,
            [
                ("TOTAL".to_owned(), 3, vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 1]),
                ("one.test".to_owned(), 2, vec![1, 0, 0, 0, 1, 0, 0, 0, 0, 0]),
                (
                    "three.test".to_owned(),
                    1,
                    vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
                ),
                ("two.test".to_owned(), 1, vec![0, 0, 0, 0, 1, 0, 0, 0, 0, 0]),
            ]
        );
        let table = render(&rows);
        assert_eq!(
            table.lines().next().unwrap(),
            "           T 5 10 20 40 80 160 320 640 1280 1280+"
        );
        assert_eq!(
            table.lines().nth(1).unwrap(),
            "     TOTAL 3 1  0  0  0  1   0   0   0    0     1"
        );
        let by_sender = shape(&messages, By::Sender);
        assert_eq!(by_sender[1].domain, "s.test");
        assert!(by_sender.iter().any(|r| r.domain == "<>"));
    }
}
