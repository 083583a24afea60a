//! The operator's own metrics, served as Prometheus text on `/metrics`.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// Counters shared by reconcile, leader election and the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    reconciles: AtomicU64,
    reconcile_errors: AtomicU64,
    reconcile_micros: AtomicU64,
    invalid_specs: AtomicU64,
    drains_started: AtomicU64,
    leader: AtomicBool,
}

impl Metrics {
    /// One reconcile finished, successfully or not, after `elapsed`.
    pub fn reconciled(&self, ok: bool, elapsed: Duration) {
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.reconcile_errors.fetch_add(1, Ordering::Relaxed);
        }
        self.reconcile_micros
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// A MailQueue with an invalid spec was seen.
    pub fn invalid_spec(&self) {
        self.invalid_specs.fetch_add(1, Ordering::Relaxed);
    }

    /// A relay was marked draining.
    pub fn drain_started(&self) {
        self.drains_started.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether this process holds the leader Lease.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Whether this process holds the leader Lease.
    pub fn is_leader(&self) -> bool {
        self.leader.load(Ordering::Relaxed)
    }

    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        metric(
            "postern_operator_reconciles_total",
            "counter",
            "Reconciles of MailQueues, successful or not.",
            load(&self.reconciles).to_string(),
        );
        metric(
            "postern_operator_reconcile_errors_total",
            "counter",
            "Reconciles that failed and were retried.",
            load(&self.reconcile_errors).to_string(),
        );
        metric(
            "postern_operator_reconcile_seconds_total",
            "counter",
            "Time spent reconciling.",
            format!("{:.6}", load(&self.reconcile_micros) as f64 / 1e6),
        );
        metric(
            "postern_operator_invalid_specs_total",
            "counter",
            "Reconciles that found an invalid MailQueue spec.",
            load(&self.invalid_specs).to_string(),
        );
        metric(
            "postern_operator_drains_started_total",
            "counter",
            "Relays taken out of service to drain before a scale-down.",
            load(&self.drains_started).to_string(),
        );
        metric(
            "postern_operator_leader",
            "gauge",
            "1 while this process holds the leader Lease.",
            u8::from(self.is_leader()).to_string(),
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let metrics = Metrics::default();
        metrics.reconciled(true, Duration::from_millis(5));
        metrics.reconciled(false, Duration::from_millis(5));
        metrics.set_leader(true);
        let text = metrics.render();
        assert!(
            text.contains("postern_operator_reconciles_total 2\n"),
            "{text}"
        );
        assert!(
            text.contains("postern_operator_reconcile_errors_total 1\n"),
            "{text}"
        );
        assert!(text.contains("postern_operator_leader 1\n"), "{text}");
        assert!(
            text.contains("# TYPE postern_operator_leader gauge\n"),
            "{text}"
        );
    }
}
