//! Inbound SMTP: listeners, the per-connection driver, relay policy, limits and TLS.

pub mod auth;
pub mod connection;
pub mod early;
pub mod limits;
pub mod local;
pub mod policy;
pub mod rate;
pub mod received;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::config::{Config, LimitsConfig, ListenerConfig, ListenerMode};
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::scan::ScanChain;
use crate::smtp::{Reply, SessionConfig};
use crate::spool::Spool;
use limits::{ClientKey, ConnectionLimiter, LimitExceeded};
use local::{LocalUser, SenderPolicy};
use policy::RelayPolicy;
use rate::Limited;

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
    pub tls: Option<Arc<tls::ServerTls>>,
    /// Connection counts shared by all listeners.
    pub connections: ConnectionLimiter,
    /// Turns true when the relay drains: idle sessions are closed with 421.
    pub draining: watch::Receiver<bool>,
    /// Where committed messages go for delivery (none: accept only).
    pub queue: Option<Queue>,
    /// Counters and latencies.
    pub metrics: Arc<Metrics>,
    /// Content scanners run before the end-of-data reply.
    pub scanners: ScanChain,
    /// Local submission: who may use which sender (this listener then
    /// offers AUTH EXTERNAL and requires it).
    pub local: Option<SenderPolicy>,
    /// Relaying or submission (and then whether TLS starts at once).
    pub mode: ListenerMode,
    /// How a submission listener checks passwords (shared by all of them,
    /// so failures count across listeners).
    pub auth: Option<Arc<auth::SubmissionAuth>>,
    /// DKIM keys: mail from authenticated, local or trusted clients is
    /// signed when its `From:` domain has one.
    pub dkim: Option<Arc<crate::dkim::DkimKeys>>,
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
            (Some(cert), Some(key)) => Some(Arc::new(tls::ServerTls::load(cert, key)?)),
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
                starttls: tls.is_some() && listener.mode != ListenerMode::Submissions,
                auth_external: false,
                auth_password: listener.mode.is_submission(),
                require_auth: listener.mode.is_submission(),
                require_tls: listener.mode.is_submission(),
            },
            limits: config.limits.clone(),
            policy: RelayPolicy::new(config).map_err(|err| err.to_string())?,
            spool,
            tls,
            connections,
            draining: watch::channel(false).1,
            queue: None,
            metrics: Arc::default(),
            scanners: ScanChain::new(&listener.scanners, &config.scanners),
            local: None,
            mode: listener.mode,
            auth: None,
            dkim: None,
        })
    }

    /// The local submission listener (`[submission]`, `postern sendmail`).
    pub fn submission(
        config: &Config,
        spool: Spool,
        connections: ConnectionLimiter,
    ) -> Result<Listener, String> {
        let mut listener = Listener::new(
            config,
            &ListenerConfig {
                name: "submission".into(),
                scanners: config.submission.scanners.clone(),
                ..ListenerConfig::default()
            },
            spool,
            connections,
        )?;
        listener.session_config.auth_external = true;
        listener.session_config.require_auth = true;
        listener.local = Some(SenderPolicy::new(config));
        Ok(listener)
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub enum Peer {
    /// A TCP client.
    Tcp(SocketAddr),
    /// A local process on a Unix socket, as the kernel reports it.
    Local(LocalUser),
    /// A Unix-socket client whose credentials are unknown.
    Unknown,
}

impl Peer {
    /// The client's IP address, for TCP clients.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        match self {
            Peer::Tcp(addr) => Some(addr.ip()),
            _ => None,
        }
    }

    /// Whose connections this one counts with for the per-client limit.
    pub fn limit_key(&self) -> Option<ClientKey> {
        match self {
            Peer::Tcp(addr) => Some(ClientKey::Ip(addr.ip())),
            Peer::Local(user) => Some(ClientKey::Uid(user.uid)),
            Peer::Unknown => None,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(addr) => write!(f, "{addr}"),
            Peer::Local(user) => write!(f, "local:{}(uid {})", user.name, user.uid),
            Peer::Unknown => write!(f, "unix"),
        }
    }
}

/// A listening socket sessions are accepted from.
pub trait Acceptor: Send + Sync + 'static {
    /// The connected stream.
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// Waits for the next client.
    fn accept(&self) -> impl Future<Output = std::io::Result<(Self::Stream, Peer)>> + Send;
}

impl Acceptor for TcpListener {
    type Stream = TcpStream;
    async fn accept(&self) -> std::io::Result<(TcpStream, Peer)> {
        let (stream, addr) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, Peer::Tcp(addr)))
    }
}

impl Acceptor for UnixListener {
    type Stream = UnixStream;
    async fn accept(&self) -> std::io::Result<(UnixStream, Peer)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let peer = match LocalUser::of(&stream).await {
            Ok(user) => Peer::Local(user),
            Err(err) => {
                warn!("cannot read the peer credentials of a local client: {err}");
                Peer::Unknown
            }
        };
        Ok((stream, peer))
    }
}

/// Accepts connections until `shutdown` resolves, then waits for the
/// sessions in progress to end (each holds a completion guard).
pub async fn serve<A: Acceptor>(
    listener: Arc<Listener>,
    socket: A,
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
        let trusted = listener.policy.is_trusted(peer.ip());
        if !listener
            .connections
            .rates()
            .allows(Limited::Connections, peer.limit_key(), trusted)
        {
            Metrics::count(&listener.metrics.refused);
            info!(client = %peer, "connection refused: over rate_limits.connections");
            let reply = Reply::new(
                421,
                "4.7.0",
                format!(
                    "{} Error: too many connections from {}, try again later",
                    listener.session_config.hostname,
                    peer.ip()
                        .map_or_else(|| peer.to_string(), |ip| ip.to_string())
                ),
            );
            tokio::spawn(async move {
                let _ = stream.write_all(&reply.to_wire()).await;
                let _ = stream.shutdown().await;
            });
            continue;
        }
        let slot = listener.connections.acquire(peer.limit_key());
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
                        LimitExceeded::PerClient => Reply::new(
                            421,
                            "4.7.0",
                            match &peer {
                                Peer::Local(_) => {
                                    "Too many connections from your user, try again later"
                                }
                                _ => "Too many connections from your address, try again later",
                            },
                        ),
                    };
                    info!(client = %peer, "connection refused: {}", reply.lines[0]);
                    let _ = stream.write_all(&reply.to_wire()).await;
                    let _ = stream.shutdown().await;
                    return;
                }
            };
            connection::handle(&listener, stream, peer).await;
        });
    }
    drop(done_tx);
    // Every session holds a sender; recv() returns None once all have ended.
    // Meanwhile the socket stays open and new clients hear 421 4.3.2 (a load
    // balancer may still send some until readiness has propagated) instead of
    // a reset from a closed listener.
    // The socket also stays open until `shutdown_linger` has passed, even with
    // no session left.
    let hostname = listener.session_config.hostname.clone();
    let linger = tokio::time::sleep(listener.limits.shutdown_linger);
    tokio::pin!(linger);
    let (mut sessions_done, mut lingered) = (false, false);
    while !(sessions_done && lingered) {
        tokio::select! {
            done = done_rx.recv(), if !sessions_done => if done.is_none() {
                sessions_done = true;
            },
            () = &mut linger, if !lingered => lingered = true,
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
