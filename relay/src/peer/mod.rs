//! Peer spool replication (issue #4): the `postern.peer.v1.Peer` gRPC
//! service (`proto/peer.proto`) that stores replicas of other relays'
//! messages, its client, and [`PeerCopy`], the `"peer"` copy of the quorum
//! writer.
//!
//! # Pieces
//!
//! - [`store::ReplicaStore`]: replicas on disk, and the one durable write
//!   path ([`store::write_replica`]) that both `Replicate` and
//!   [`PeerClient::fetch`] use.
//! - [`service::PeerService`]: the server side; [`routes`] puts it (and
//!   optionally the admin `Queue` service) behind the shared-secret check,
//!   [`serve`] runs it on a TCP listener until a shutdown future resolves.
//! - [`PeerClient`]: one lazily connected channel per peer address.
//! - [`Peers`]: `cluster.peers` resolved on every use, minus this relay.
//! - [`PeerCopy`]: a [`CopyTarget`](crate::spool::quorum::CopyTarget) that
//!   streams a message to one peer, failing over to the next.
//!
//! # On disk, under `data_dir`
//!
//! ```text
//! replicas/<spool>/<id>.msg       message bytes, then (once committed) the
//!                                 envelope and a footer: the local spool's
//!                                 format, see crate::spool::message_file
//! ```
//!
//! `<spool>` is the origin's spool (1-128 of `[A-Za-z0-9._-]`, never `.` or
//! `..`), `<id>` a spool id ([`crate::spool::id::is_valid`]), so no name
//! from the network can leave `replicas/`.
//!
//! # Authentication
//!
//! With `cluster.tls` set, connections are mutual TLS ([`tls`]): a peer
//! without a certificate from the cluster's CA is refused in the handshake.
//! Every request also carries `authorization: Bearer <cluster secret>`
//! ([`auth::AttachSecret`]); the server compares it in constant time
//! ([`auth::RequireSecret`]) before the handler runs, so a request without
//! it writes nothing. The secret stays under TLS as a second factor: a
//! relay's leaked key alone does not let anyone in.

pub mod auth;
pub mod client;
pub mod copy;
pub mod peers;
pub mod service;
pub mod store;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::Routes;
use tonic::transport::Server;

pub use client::PeerClient;
pub use copy::PeerCopy;
pub use peers::Peers;
pub use service::PeerService;
pub use store::{ReplicaError, ReplicaStore};

/// The generated messages, client and server of `postern.peer.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("postern.peer.v1");
}

/// Octets of message data per chunk of `Replicate` and `Fetch`.
pub const CHUNK: usize = 64 * 1024;

/// Whether `name` may name a spool's replica directory: 1-128 of
/// `[A-Za-z0-9._-]` (as [`crate::cluster::SpoolId`]) and not `.` or `..`.
pub fn valid_spool(name: &str) -> bool {
    (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && name != "."
        && name != ".."
}

/// Why a peer request failed, as the client sees it.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer answered with an error status (UNAUTHENTICATED, NOT_FOUND,
    /// ALREADY_EXISTS, DATA_LOSS, UNAVAILABLE when it cannot be reached...).
    #[error("peer {addr}: {:?}: {}", status.code(), status.message())]
    Rpc {
        /// The peer.
        addr: SocketAddr,
        /// What it answered.
        status: Box<tonic::Status>,
    },
    /// The peer did not answer within the request timeout.
    #[error("peer {addr}: no answer within {after:?}")]
    Timeout {
        /// The peer.
        addr: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// The peer's answer broke the protocol (a missing header, say).
    #[error("peer {addr}: {detail}")]
    Protocol {
        /// The peer.
        addr: SocketAddr,
        /// What was wrong.
        detail: String,
    },
    /// Writing a fetched replica here failed (or its data did not match).
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// Reading the message to send failed.
    #[error("reading the message: {0}")]
    Io(#[from] std::io::Error),
    /// The shared secret cannot go into a request header.
    #[error("the cluster secret must be visible ASCII")]
    InvalidSecret,
    /// No peer confirmed a replica ([`PeerCopy`]).
    #[error("no peer replica of {id}: {detail}")]
    NotReplicated {
        /// The message.
        id: String,
        /// What each peer tried answered.
        detail: String,
    },
    /// Some peers did not confirm a removal, so copies may remain there.
    #[error("replicas of {id} may remain: {detail}")]
    NotRemoved {
        /// The message.
        id: String,
        /// Which peers failed, and why.
        detail: String,
    },
}

impl PeerError {
    /// The gRPC status code, when the peer answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            PeerError::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// The peer service, and optionally the admin `Queue` service, behind one
/// shared-secret check: every request to either needs
/// `authorization: Bearer <secret>`.
pub fn routes(
    peer: PeerService,
    admin: Option<crate::admin::queue_service::QueueService>,
    secret: &str,
) -> Routes {
    let check = auth::RequireSecret::new(secret);
    let routes = Routes::new(proto::peer_server::PeerServer::with_interceptor(
        peer,
        check.clone(),
    ));
    match admin {
        Some(admin) => routes.add_service(
            crate::admin::proto::queue_server::QueueServer::with_interceptor(admin, check),
        ),
        None => routes,
    }
}

/// Serves `routes` on `listener` until `shutdown` resolves: over mutual TLS
/// when `tls` is given (plaintext connections then fail their handshake),
/// plaintext h2c otherwise.
pub async fn serve(
    listener: TcpListener,
    routes: Routes,
    tls: Option<Arc<tls::MutualTls>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let server = Server::builder().add_routes(routes);
    match tls {
        Some(tls) => {
            server
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
        None => {
            server
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spool_names_never_leave_the_directory() {
        assert!(valid_spool("relay-0.7"));
        assert!(valid_spool(&"a".repeat(128)));
        for bad in ["", ".", "..", "../x", "a/b", "a\0", "é", &"a".repeat(129)] {
            assert!(!valid_spool(bad), "{bad:?}");
        }
    }
}
