//! Prometheus metrics: counters, gauges and histograms rendered as text for
//! `/metrics`. Plain atomics; no global registry (passed in as `Arc<Metrics>`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::config::CopyKind;
use crate::health::{Delivery, StallReason};
use crate::smtp::Reply;

/// A latency histogram with fixed buckets (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, value: Duration) {
        let seconds = value.as_secs_f64();
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add(value.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        self.render_series(name, "", out);
    }

    /// The series of one histogram of a family; `labels` (`key="value"`,
    /// or empty) go before `le`.
    fn render_series(&self, name: &str, labels: &str, out: &mut String) {
        // `{labels}` for _sum and _count; `labels,` before `le`.
        let (braced, before_le) = if labels.is_empty() {
            (String::new(), String::new())
        } else {
            (format!("{{{labels}}}"), format!("{labels},"))
        };
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{before_le}le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{before_le}le=\"+Inf\"}} {total}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(
            out,
            "{name}_sum{braced} {sum}\n{name}_count{braced} {total}"
        );
    }
}

/// How long each kind of copy took to confirm a message (the spool's
/// `postern_copy_latency_seconds{copy="local|object_store|peer"}`).
#[derive(Debug)]
pub struct CopyLatency {
    local: Histogram,
    object_store: Histogram,
    peer: Histogram,
}

impl Default for CopyLatency {
    fn default() -> Self {
        CopyLatency {
            local: Histogram::new(ACK_BUCKETS),
            object_store: Histogram::new(ACK_BUCKETS),
            peer: Histogram::new(ACK_BUCKETS),
        }
    }
}

impl CopyLatency {
    fn of(&self, kind: CopyKind) -> &Histogram {
        match kind {
            CopyKind::Local => &self.local,
            CopyKind::ObjectStore => &self.object_store,
            CopyKind::Peer => &self.peer,
        }
    }

    /// Records a copy of `kind` confirmed `took` after it started.
    pub fn observe(&self, kind: CopyKind, took: Duration) {
        self.of(kind).observe(took);
    }

    /// Appends the family `postern_copy_latency_seconds`.
    pub fn render(&self, out: &mut String) {
        let name = "postern_copy_latency_seconds";
        let _ = writeln!(
            out,
            "# HELP {name} Time from the start of a message's copy to its confirmation, by kind of copy.\n# TYPE {name} histogram"
        );
        for (kind, label) in [
            (CopyKind::Local, "local"),
            (CopyKind::ObjectStore, "object_store"),
            (CopyKind::Peer, "peer"),
        ] {
            self.of(kind)
                .render_series(name, &format!("copy=\"{label}\""), out);
        }
    }
}

/// The `reason` label of deferrals: the subject of the reply's enhanced
/// status code (RFC 3463 `class.subject.detail`), `other` without one.
pub const DEFERRAL_REASONS: [&str; 8] = [
    "other",
    "addressing",
    "mailbox",
    "mail_system",
    "network",
    "protocol",
    "content",
    "security",
];

/// The index in [`DEFERRAL_REASONS`] of a deferral that said `reply`.
pub fn deferral_reason(reply: &Reply) -> usize {
    reply
        .status
        .as_deref()
        .and_then(|status| status.split('.').nth(1))
        .and_then(|subject| subject.parse::<usize>().ok())
        .filter(|subject| (1..DEFERRAL_REASONS.len()).contains(subject))
        .unwrap_or(0)
}

const ACK_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const DELIVERY_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21600.0, 86400.0,
];

/// Appends `postern_delivery_stalled{reason="…"}`: 1 for the reason
/// delivery is stalled by now, 0 for every other reason (so alerts and
/// graphs see each series whether or not it fired).
pub fn render_delivery(delivery: &Delivery, out: &mut String) {
    let _ = writeln!(
        out,
        "# HELP postern_delivery_stalled Whether delivery is stalled, by reason (the relay still accepts mail).\n# TYPE postern_delivery_stalled gauge"
    );
    let stalled = delivery.stall_reason();
    for reason in StallReason::ALL {
        let _ = writeln!(
            out,
            "postern_delivery_stalled{{reason=\"{}\"}} {}",
            reason.as_str(),
            u8::from(stalled == Some(reason))
        );
    }
}

/// Queue figures sampled when metrics are scraped.
#[derive(Debug, Default, Clone, Copy)]
pub struct QueueGauges {
    /// Messages in the queue.
    pub depth: u64,
    /// Age of the oldest message, seconds.
    pub oldest_age_seconds: f64,
    /// Damaged object-store segments moved to quarantine since start.
    pub segments_quarantined: u64,
    /// Messages with a delivery state in the state journal.
    pub state_records: u64,
    /// Octets the state journal's files hold.
    pub state_journal_bytes: u64,
}

/// The relay's metrics.
#[derive(Debug)]
pub struct Metrics {
    /// Messages accepted (250 after the quorum).
    pub accepted: AtomicU64,
    /// Transactions refused (policy, protocol, quorum, space).
    pub refused: AtomicU64,
    /// Recipients delivered.
    pub delivered: AtomicU64,
    /// Recipient delivery attempts deferred, by [`DEFERRAL_REASONS`]
    /// (the total is [`Metrics::deferred`]).
    deferred_by_reason: [AtomicU64; DEFERRAL_REASONS.len()],
    /// Spools this relay took over from a member that left (in a cluster).
    pub takeovers: AtomicU64,
    /// Recipients bounced (failed for good).
    pub bounced: AtomicU64,
    /// Recipients the next hop took during early delivery (no queueing).
    pub delivered_early: AtomicU64,
    /// Recipients early delivery left for the queue (4xx, timeout, unreachable).
    pub early_deferred: AtomicU64,
    /// Messages a scanner refused (5xx).
    pub scan_rejected: AtomicU64,
    /// Messages a scanner deferred (4xx).
    pub scan_tempfailed: AtomicU64,
    /// Scans that failed (scanner down, slow or unintelligible).
    pub scan_failures: AtomicU64,
    /// Damaged local copies repaired from another copy before delivery.
    pub repaired: AtomicU64,
    /// Damaged local copies quarantined before delivery (no intact copy).
    pub quarantined: AtomicU64,
    /// AUTH PLAIN/LOGIN attempts that failed or were refused by the throttle.
    pub auth_failures: AtomicU64,
    /// DKIM signatures added to accepted messages.
    pub dkim_signatures: AtomicU64,
    /// Messages that should have been signed but could not be (sent unsigned).
    pub dkim_failures: AtomicU64,
    /// End-of-data to reply.
    pub ack_latency: Histogram,
    /// Accept to final outcome, per recipient.
    pub delivery_latency: Histogram,
    gauges: Mutex<QueueGauges>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            deferred_by_reason: std::array::from_fn(|_| AtomicU64::new(0)),
            takeovers: AtomicU64::new(0),
            bounced: AtomicU64::new(0),
            delivered_early: AtomicU64::new(0),
            early_deferred: AtomicU64::new(0),
            scan_rejected: AtomicU64::new(0),
            scan_tempfailed: AtomicU64::new(0),
            scan_failures: AtomicU64::new(0),
            repaired: AtomicU64::new(0),
            quarantined: AtomicU64::new(0),
            auth_failures: AtomicU64::new(0),
            dkim_signatures: AtomicU64::new(0),
            dkim_failures: AtomicU64::new(0),
            ack_latency: Histogram::new(ACK_BUCKETS),
            delivery_latency: Histogram::new(DELIVERY_BUCKETS),
            gauges: Mutex::new(QueueGauges::default()),
        }
    }
}

impl Metrics {
    /// Adds one to a counter.
    pub fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a recipient deferred with `reply`.
    pub fn count_deferral(&self, reply: &Reply) {
        Metrics::count(&self.deferred_by_reason[deferral_reason(reply)]);
    }

    /// Recipient delivery attempts deferred, whatever the reason.
    pub fn deferred(&self) -> u64 {
        self.deferred_by_reason
            .iter()
            .map(|counter| counter.load(Ordering::Relaxed))
            .sum()
    }

    /// Updates the queue gauges.
    pub fn set_queue(&self, gauges: QueueGauges) {
        *self.gauges.lock().expect("gauges lock") = gauges;
    }

    /// The queue gauges last set.
    pub fn queue(&self) -> QueueGauges {
        *self.gauges.lock().expect("gauges lock")
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (name, help, counter) in [
            (
                "postern_messages_accepted_total",
                "Messages accepted with 250 after the quorum.",
                &self.accepted,
            ),
            (
                "postern_transactions_refused_total",
                "SMTP transactions refused.",
                &self.refused,
            ),
            (
                "postern_auth_failures_total",
                "Password authentications that failed or were refused by the throttle.",
                &self.auth_failures,
            ),
            (
                "postern_dkim_signatures_total",
                "DKIM signatures added to accepted messages.",
                &self.dkim_signatures,
            ),
            (
                "postern_dkim_failures_total",
                "Messages that should have been DKIM-signed but went unsigned.",
                &self.dkim_failures,
            ),
            (
                "postern_recipients_delivered_total",
                "Recipients delivered to the next hop.",
                &self.delivered,
            ),
            (
                "postern_recipients_bounced_total",
                "Recipients that failed for good.",
                &self.bounced,
            ),
            (
                "postern_recipients_delivered_early_total",
                "Recipients the next hop accepted during early delivery, before our reply.",
                &self.delivered_early,
            ),
            (
                "postern_early_delivery_deferred_total",
                "Recipients early delivery left for the queue (4xx, timeout, unreachable).",
                &self.early_deferred,
            ),
            (
                "postern_scan_rejected_total",
                "Messages a content scanner refused.",
                &self.scan_rejected,
            ),
            (
                "postern_scan_tempfailed_total",
                "Messages a content scanner deferred.",
                &self.scan_tempfailed,
            ),
            (
                "postern_scan_failures_total",
                "Scans that failed: scanner down, too slow or unintelligible.",
                &self.scan_failures,
            ),
            (
                "postern_messages_repaired_total",
                "Damaged local copies repaired from another copy before delivery.",
                &self.repaired,
            ),
            (
                "postern_messages_quarantined_total",
                "Damaged local copies moved to quarantine before delivery, no intact copy elsewhere.",
                &self.quarantined,
            ),
            (
                "postern_takeovers_total",
                "Spools this relay took over from a cluster member that left.",
                &self.takeovers,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let name = "postern_recipients_deferred_total";
        let _ = writeln!(
            out,
            "# HELP {name} Recipient delivery attempts deferred, by the subject of the reply's enhanced status code (RFC 3463).\n# TYPE {name} counter"
        );
        for (reason, counter) in DEFERRAL_REASONS.iter().zip(&self.deferred_by_reason) {
            let _ = writeln!(
                out,
                "{name}{{reason=\"{reason}\"}} {}",
                counter.load(Ordering::Relaxed)
            );
        }
        let gauges = *self.gauges.lock().expect("gauges lock");
        let _ = writeln!(
            out,
            "# HELP postern_queue_depth Messages in the queue.\n# TYPE postern_queue_depth gauge\npostern_queue_depth {}",
            gauges.depth
        );
        let _ = writeln!(
            out,
            "# HELP postern_queue_oldest_age_seconds Age of the oldest queued message.\n# TYPE postern_queue_oldest_age_seconds gauge\npostern_queue_oldest_age_seconds {}",
            gauges.oldest_age_seconds
        );
        let _ = writeln!(
            out,
            "# HELP postern_object_segments_quarantined_total Damaged object-store segments moved to quarantine.\n# TYPE postern_object_segments_quarantined_total counter\npostern_object_segments_quarantined_total {}",
            gauges.segments_quarantined
        );
        let _ = writeln!(
            out,
            "# HELP postern_state_records Messages with a delivery state in the state journal.\n# TYPE postern_state_records gauge\npostern_state_records {}",
            gauges.state_records
        );
        let _ = writeln!(
            out,
            "# HELP postern_state_journal_bytes Octets the state journal's files hold.\n# TYPE postern_state_journal_bytes gauge\npostern_state_journal_bytes {}",
            gauges.state_journal_bytes
        );
        self.ack_latency.render(
            "postern_ack_latency_seconds",
            "Time from end of data to the reply.",
            &mut out,
        );
        self.delivery_latency.render(
            "postern_delivery_latency_seconds",
            "Time from acceptance to the final outcome of a recipient.",
            &mut out,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let metrics = Metrics::default();
        Metrics::count(&metrics.accepted);
        metrics.ack_latency.observe(Duration::from_millis(3));
        metrics.ack_latency.observe(Duration::from_millis(30));
        let text = metrics.render();
        assert!(text.contains("postern_messages_accepted_total 1\n"));
        assert!(text.contains("postern_ack_latency_seconds_bucket{le=\"0.005\"} 1\n"));
        assert!(text.contains("postern_ack_latency_seconds_bucket{le=\"0.05\"} 2\n"));
        assert!(text.contains("postern_ack_latency_seconds_count 2\n"));
    }

    #[test]
    fn deferrals_are_counted_by_the_subject_of_their_status_code() {
        let metrics = Metrics::default();
        metrics.count_deferral(&Reply::new(451, "4.4.1", "no answer from host"));
        metrics.count_deferral(&Reply::new(452, "4.2.2", "mailbox full"));
        metrics.count_deferral(&Reply::new(451, "4.4.2", "connection dropped"));
        metrics.count_deferral(&Reply::plain(421, vec!["try later".into()]));
        metrics.count_deferral(&Reply::new(450, "4.9.9", "no such subject"));
        let text = metrics.render();
        for line in [
            "postern_recipients_deferred_total{reason=\"network\"} 2\n",
            "postern_recipients_deferred_total{reason=\"mailbox\"} 1\n",
            "postern_recipients_deferred_total{reason=\"other\"} 2\n",
            "postern_recipients_deferred_total{reason=\"security\"} 0\n",
        ] {
            assert!(text.contains(line), "{line} in {text}");
        }
        assert_eq!(metrics.deferred(), 5);
    }

    #[test]
    fn copy_latency_has_one_histogram_per_kind_of_copy() {
        let latency = CopyLatency::default();
        latency.observe(CopyKind::ObjectStore, Duration::from_millis(40));
        let mut text = String::new();
        latency.render(&mut text);
        assert!(text.contains("# TYPE postern_copy_latency_seconds histogram\n"));
        assert!(text.contains(
            "postern_copy_latency_seconds_bucket{copy=\"object_store\",le=\"0.05\"} 1\n"
        ));
        assert!(text.contains(
            "postern_copy_latency_seconds_bucket{copy=\"object_store\",le=\"0.025\"} 0\n"
        ));
        assert!(text.contains("postern_copy_latency_seconds_count{copy=\"local\"} 0\n"));
        assert!(text.contains("postern_copy_latency_seconds_count{copy=\"object_store\"} 1\n"));
    }

    #[test]
    fn the_stalled_gauge_has_one_series_per_reason() {
        let mut text = String::new();
        render_delivery(
            &Delivery::Stalled {
                reason: StallReason::EtcdUnreachable,
                message: "etcd unreachable: connection refused".into(),
            },
            &mut text,
        );
        assert!(text.contains("# TYPE postern_delivery_stalled gauge\n"));
        assert!(text.contains("postern_delivery_stalled{reason=\"etcd_unreachable\"} 1\n"));
        assert!(text.contains("postern_delivery_stalled{reason=\"lease_expired\"} 0\n"));
        let mut text = String::new();
        render_delivery(&Delivery::Paused, &mut text);
        assert!(text.contains("postern_delivery_stalled{reason=\"etcd_unreachable\"} 0\n"));
    }
}
