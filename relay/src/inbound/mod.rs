//! Inbound SMTP: listeners, the per-connection driver, relay policy, limits and TLS.

pub mod connection;
pub mod limits;
pub mod policy;
pub mod received;
pub mod tls;

use std::future::Future;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::{Config, LimitsConfig, ListenerConfig};
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::smtp::{Reply, SessionConfig};
use crate::spool::Spool;
use limits::{ConnectionLimiter, LimitExceeded};
use policy::RelayPolicy;

/// Everything a connection on one listener needs, passed in (no globals).
pub struct Listener {
    /// Listener name (logs, envelope).
    pub name: String,
    /// Session settings.
    pub session_config: SessionConfig,
    /// Timeouts and limits.
    pub limits: LimitsConfig,
    /// Relay policy.
    pub policy: RelayPolicy,
    /// The spool messages go to.
    pub spool: Spool,
    /// STARTTLS, when a certificate is configured.
    pub tls: Option<TlsAcceptor>,
    /// Connection counts shared by all listeners.
    pub connections: ConnectionLimiter,
    /// Turns true when the relay drains: idle sessions are closed with 421.
    pub draining: watch::Receiver<bool>,
    /// Where committed messages go for delivery (none: accept only).
    pub queue: Option<Queue>,
    /// Counters and latencies.
    pub metrics: Arc<Metrics>,
}

impl Listener {
    /// Builds a listener's context from the configuration.
    pub fn new(
        config: &Config,
        listener: &ListenerConfig,
        spool: Spool,
        connections: ConnectionLimiter,
    ) -> Result<Listener, String> {
        let tls = match (&listener.tls_cert, &listener.tls_key) {
            (Some(cert), Some(key)) => Some(tls::load_acceptor(cert, key)?),
            _ => None,
        };
        Ok(Listener {
            name: listener.name.clone(),
            session_config: SessionConfig {
                hostname: config.hostname.clone(),
                max_message_size: config.limits.max_message_size,
                max_recipients: config.limits.max_recipients,
                max_line_length: config.limits.max_line_length,
                max_errors: config.limits.max_errors,
                starttls: tls.is_some(),
            },
            limits: config.limits.clone(),
            policy: RelayPolicy::new(&config.policy),
            spool,
            tls,
            connections,
            draining: watch::channel(false).1,
            queue: None,
            metrics: Arc::default(),
        })
    }
}

/// Accepts connections until `shutdown` resolves, then waits for the
/// sessions in progress to end (each holds a completion guard).
pub async fn serve(
    listener: Arc<Listener>,
    socket: TcpListener,
    shutdown: impl Future<Output = ()>,
) {
    let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = socket.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (mut stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(listener = %listener.name, "accept failed: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let slot = listener.connections.acquire(Some(peer.ip()));
        let listener = Arc::clone(&listener);
        let guard = done_tx.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let _slot = match slot {
                Ok(slot) => slot,
                Err(exceeded) => {
                    let reply = match exceeded {
                        LimitExceeded::Total => {
                            Reply::new(421, "4.7.0", "Too many connections, try again later")
                        }
                        LimitExceeded::PerIp => Reply::new(
                            421,
                            "4.7.0",
                            "Too many connections from your address, try again later",
                        ),
                    };
                    info!(client = %peer, "connection refused: {}", reply.lines[0]);
                    let _ = stream.write_all(&reply.to_wire()).await;
                    let _ = stream.shutdown().await;
                    return;
                }
            };
            connection::handle(&listener, stream, Some(peer)).await;
        });
    }
    drop(done_tx);
    // Every session holds a sender; recv() returns None once all have ended.
    // Meanwhile the socket stays open and new clients hear 421 4.3.2 (a load
    // balancer may still send some until readiness has propagated) instead of
    // a reset from a closed listener.
    let hostname = listener.session_config.hostname.clone();
    loop {
        tokio::select! {
            _ = done_rx.recv() => break,
            accepted = socket.accept() => if let Ok((mut stream, peer)) = accepted {
                let reply = Reply::new(
                    421,
                    "4.3.2",
                    format!("{hostname} Service shutting down, try again later"),
                );
                info!(client = %peer, "draining: connection refused with 421");
                tokio::spawn(async move {
                    let _ = stream.write_all(&reply.to_wire()).await;
                    let _ = stream.shutdown().await;
                });
            },
        }
    }
}
