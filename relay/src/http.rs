//! Health and metrics over HTTP: `/healthz` (the process runs), `/readyz`
//! (it accepts mail: spool recovered, listeners bound, not draining),
//! `/metrics` (Prometheus text format) and `/stats` (JSON for the operator:
//! readiness, queue depth, oldest message, and whether delivery runs, see
//! [`crate::health`]). Readiness is about accepting only: a relay whose
//! delivery is stalled (etcd unreachable) stays ready.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::health::Health;
use crate::metrics::{self, CopyLatency, Metrics};

/// Shared readiness flag.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the relay ready or not.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// Whether the relay is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Serves the health endpoints until `shutdown` resolves.
pub async fn serve(
    socket: TcpListener,
    readiness: Readiness,
    metrics: Arc<Metrics>,
    copy_latency: Arc<CopyLatency>,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stats_readiness = readiness.clone();
    let stats_metrics = Arc::clone(&metrics);
    let stats_health = health.clone();
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(readiness)
        .route(
            "/stats",
            get(move || {
                let queue = stats_metrics.queue();
                let ready = stats_readiness.is_ready();
                let delivery = stats_health.delivery();
                async move {
                    let oldest = (queue.depth > 0).then(|| {
                        let age = chrono::Duration::milliseconds(
                            (queue.oldest_age_seconds * 1000.0) as i64,
                        );
                        (chrono::Utc::now() - age)
                            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                    });
                    let mut body = serde_json::json!({
                        "ready": ready,
                        "queue_depth": queue.depth,
                        "oldest_age_seconds": queue.oldest_age_seconds,
                        "oldest_message_time": oldest,
                        "state_records": queue.state_records,
                    });
                    if let Some(object) = body.as_object_mut() {
                        delivery.stats_fields(object);
                    }
                    ([("content-type", "application/json")], format!("{body}\n"))
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let mut text = metrics.render();
                copy_latency.render(&mut text);
                metrics::render_delivery(&health.delivery(), &mut text);
                async move { ([("content-type", "text/plain; version=0.0.4")], text) }
            }),
        );
    axum::serve(socket, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn ready(State(readiness): State<Readiness>) -> (StatusCode, &'static str) {
    if readiness.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
