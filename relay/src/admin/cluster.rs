//! Passing admin requests on to the other relays of a cluster: over their
//! peer service (the admin API is served there too, behind the cluster's
//! shared secret), marked so that a relay never passes them on again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use super::proto::queue_client::QueueClient;
use crate::peer::auth::AttachSecret;
use crate::peer::tls::MutualTls;
use crate::peer::Peers;

/// Metadata key set on requests one relay passes to another.
pub const FORWARDED: &str = "x-postern-forwarded";

/// How long a peer may take to answer an admin request.
const PEER_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of a peer's admin service.
pub type PeerQueueClient = QueueClient<InterceptedService<Channel, AttachSecret>>;

/// This relay's view of the cluster for the admin service.
#[derive(Debug, Clone)]
pub struct ClusterAdmin {
    member: String,
    peers: Peers,
    secret: String,
    tls: Option<Arc<MutualTls>>,
}

impl ClusterAdmin {
    /// Member `member`, reaching `peers` with `secret` (over `tls` when set).
    pub fn new(
        member: String,
        peers: Peers,
        secret: String,
        tls: Option<Arc<MutualTls>>,
    ) -> ClusterAdmin {
        ClusterAdmin {
            member,
            peers,
            secret,
            tls,
        }
    }

    /// This relay's member name.
    pub fn member(&self) -> &str {
        &self.member
    }

    /// A client for every peer resolvable now (connecting lazily).
    pub async fn peers(&self) -> Vec<(SocketAddr, Result<PeerQueueClient, String>)> {
        let mut clients = Vec::new();
        for addr in self.peers.resolve().await.addrs {
            clients.push((addr, self.client(addr)));
        }
        clients
    }

    fn client(&self, addr: SocketAddr) -> Result<PeerQueueClient, String> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(2))
            .timeout(PEER_TIMEOUT);
        let secret = AttachSecret::new(&self.secret).map_err(|e| e.to_string())?;
        let channel = match &self.tls {
            Some(tls) => tls.channel(endpoint, addr),
            None => endpoint.connect_lazy(),
        };
        Ok(QueueClient::with_interceptor(channel, secret)
            .max_decoding_message_size(super::MAX_RESPONSE_BYTES))
    }
}

/// `message` as a request marked as passed on.
pub fn forwarded<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
    request
}

/// Whether `request` came from another relay.
pub fn is_forwarded<T>(request: &Request<T>) -> bool {
    request.metadata().contains_key(FORWARDED)
}
