//! The client of the peer API: one lazily connected channel per peer address,
//! the cluster secret on every request, and message data streamed from and
//! to files so a large message never sits in memory whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tonic::codegen::InterceptedService;
use tonic::transport::{Channel, Endpoint};

use super::auth::AttachSecret;
use super::proto::{self, fetch_chunk, peer_client::PeerClient as Grpc, replicate_chunk};
use super::service::{is_sha256_hex, recorded_sha256};
use super::store::{file_sha256, read_chunks, write_replica, Header, ReplicaError, Writing};
use super::tls::MutualTls;
use super::PeerError;
use crate::spool::fsync::DirSync;
use crate::spool::message_file;
use crate::spool::quorum::CopyJob;

/// How long connecting to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

type Stub = Grpc<InterceptedService<Channel, AttachSecret>>;

/// Talks to peer services; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct PeerClient {
    auth: AttachSecret,
    /// Mutual TLS, when `cluster.tls` is set; plaintext h2c otherwise.
    tls: Option<Arc<MutualTls>>,
    timeout: Duration,
    channels: Mutex<HashMap<SocketAddr, Channel>>,
    /// Fetches being written, so two fetches of one message do not collide.
    writing: Writing,
    /// `syncfs` committers by destination directory, so concurrent fetches
    /// (a takeover copies many messages at once) share sync rounds.
    files: Mutex<HashMap<PathBuf, Arc<DirSync>>>,
}

impl PeerClient {
    /// A client presenting `secret`. `timeout` bounds each RPC as a whole
    /// (`Replicate` included), and for `Fetch` each wait for the next chunk.
    pub fn new(
        secret: &str,
        timeout: Duration,
        tls: Option<Arc<MutualTls>>,
    ) -> Result<PeerClient, PeerError> {
        Ok(PeerClient {
            auth: AttachSecret::new(secret)?,
            tls,
            timeout,
            channels: Mutex::new(HashMap::new()),
            writing: Writing::default(),
            files: Mutex::new(HashMap::new()),
        })
    }

    /// The stub for `addr`, on its cached channel (created on first use;
    /// it connects, and reconnects, when a request needs it).
    fn stub(&self, addr: SocketAddr) -> Stub {
        let channel = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            channels
                .entry(addr)
                .or_insert_with(|| {
                    let endpoint = Endpoint::from(
                        format!("http://{addr}")
                            .parse::<tonic::transport::Uri>()
                            .expect("a socket address makes a valid URI"),
                    )
                    .connect_timeout(CONNECT_TIMEOUT)
                    .tcp_nodelay(true);
                    match &self.tls {
                        Some(tls) => tls.channel(endpoint, addr),
                        None => endpoint.connect_lazy(),
                    }
                })
                .clone()
        };
        Grpc::with_interceptor(channel, self.auth.clone())
    }

    /// Runs `call` under the request timeout, mapping its status.
    async fn call<T>(
        &self,
        addr: SocketAddr,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, PeerError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(response)) => Ok(response.into_inner()),
            Ok(Err(status)) => Err(PeerError::Rpc {
                addr,
                status: Box::new(status),
            }),
            Err(_) => Err(PeerError::Timeout {
                addr,
                after: self.timeout,
            }),
        }
    }

    /// Streams the message of `job` to the peer at `addr`; returns once the
    /// peer has its replica durably (sealed and synced). The data
    /// is read from `job.data_file` one chunk at a time.
    pub async fn replicate(&self, addr: SocketAddr, job: &CopyJob) -> Result<(), PeerError> {
        let file = Arc::clone(&job.data_file);
        let data_len = job.data_len;
        let data_sha256 = match recorded_sha256(&job.envelope_json) {
            Some(sha) => sha,
            None => {
                let file = Arc::clone(&file);
                tokio::task::spawn_blocking(move || file_sha256(&file, data_len))
                    .await
                    .map_err(std::io::Error::other)??
            }
        };
        let header = proto::ReplicateChunk {
            part: Some(replicate_chunk::Part::Header(proto::ReplicaHeader {
                spool: job.spool.clone(),
                id: job.id.clone(),
                envelope_json: job.envelope_json.to_vec(),
                data_len,
                data_sha256,
            })),
        };
        // A read error ends the stream early (the peer then refuses the
        // short replica) and is reported instead of the peer's answer.
        let failed: Arc<Mutex<Option<std::io::Error>>> = Arc::default();
        let data = {
            let failed = Arc::clone(&failed);
            read_chunks(file, data_len).scan((), move |(), chunk| {
                let chunk = match chunk {
                    Ok(data) => Some(proto::ReplicateChunk {
                        part: Some(replicate_chunk::Part::Data(data.to_vec())),
                    }),
                    Err(err) => {
                        *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(err);
                        None
                    }
                };
                futures::future::ready(chunk)
            })
        };
        let request = futures::stream::once(async { header }).chain(data);
        let result = self.call(addr, self.stub(addr).replicate(request)).await;
        if let Some(err) = failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(PeerError::Io(err));
        }
        result.map(|_| ())
    }

    /// Ids of the committed messages of `spool` the peer at `addr` holds.
    pub async fn list(&self, addr: SocketAddr, spool: &str) -> Result<Vec<String>, PeerError> {
        let request = proto::ListRequest {
            spool: spool.to_owned(),
        };
        Ok(self.call(addr, self.stub(addr).list(request)).await?.ids)
    }

    /// Fetches message `spool`/`id` from the peer at `addr` and writes it
    /// durably into `dest_dir` (created as needed) as a sealed `<id>.msg`,
    /// with the same write path (and the same checks) as a replica the peer
    /// service receives. Returns its path and the envelope JSON.
    ///
    /// When `dest_dir` already holds it with the same envelope, nothing is
    /// written. NOT_FOUND comes back as [`PeerError::Rpc`].
    pub async fn fetch(
        &self,
        addr: SocketAddr,
        spool: &str,
        id: &str,
        dest_dir: &Path,
    ) -> Result<(PathBuf, Bytes), PeerError> {
        super::store::check_id(id)?;
        let request = proto::FetchRequest {
            spool: spool.to_owned(),
            id: id.to_owned(),
        };
        let mut stream = self.call(addr, self.stub(addr).fetch(request)).await?;
        let first = self.next_chunk(addr, &mut stream).await?;
        let Some(proto::FetchChunk {
            part: Some(fetch_chunk::Part::Header(header)),
        }) = first
        else {
            return Err(PeerError::Protocol {
                addr,
                detail: "the first chunk of a fetch must be its header".into(),
            });
        };
        let envelope_json = Bytes::from(header.envelope_json);
        let header = Header {
            id: id.to_owned(),
            envelope_json: envelope_json.clone(),
            data_len: header.data_len,
            data_sha256: is_sha256_hex(&header.data_sha256).then_some(header.data_sha256),
        };
        let timeout = self.timeout;
        let data = futures::stream::unfold(Some(stream), move |stream| async move {
            let mut stream = stream?;
            let item = match tokio::time::timeout(timeout, stream.message()).await {
                Ok(Ok(Some(proto::FetchChunk {
                    part: Some(fetch_chunk::Part::Data(data)),
                }))) => Ok(Bytes::from(data)),
                Ok(Ok(Some(_))) => Err(ReplicaError::Protocol(
                    "every chunk after the header must be data".into(),
                )),
                Ok(Ok(None)) => return None,
                Ok(Err(status)) => Err(ReplicaError::Stream(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                ))),
                Err(_) => Err(ReplicaError::Stream(format!(
                    "no data from {addr} within {timeout:?}"
                ))),
            };
            let next = item.is_ok().then_some(stream);
            Some((item, next))
        });
        let dir = dest_dir.to_owned();
        tokio::task::spawn_blocking(move || std::fs::create_dir_all(&dir))
            .await
            .map_err(std::io::Error::other)??;
        let files = self.files_of(dest_dir)?;
        write_replica(dest_dir, &files, &self.writing, header, data).await?;
        Ok((message_file::path(dest_dir, id), envelope_json))
    }

    /// The shared `syncfs` committer of `dir` (opened on first use).
    fn files_of(&self, dir: &Path) -> std::io::Result<Arc<DirSync>> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = files.get(dir) {
            return Ok(Arc::clone(found));
        }
        let opened = DirSync::filesystem(dir.to_owned())?;
        files.insert(dir.to_owned(), Arc::clone(&opened));
        Ok(opened)
    }

    async fn next_chunk(
        &self,
        addr: SocketAddr,
        stream: &mut tonic::Streaming<proto::FetchChunk>,
    ) -> Result<Option<proto::FetchChunk>, PeerError> {
        match tokio::time::timeout(self.timeout, stream.message()).await {
            Ok(Ok(chunk)) => Ok(chunk),
            Ok(Err(status)) => Err(PeerError::Rpc {
                addr,
                status: Box::new(status),
            }),
            Err(_) => Err(PeerError::Timeout {
                addr,
                after: self.timeout,
            }),
        }
    }

    /// Tells the peer at `addr` that message `spool`/`id` is finished: it
    /// removes its replica (and its own local copy, if the message was
    /// accepted there). Absent is not an error.
    pub async fn remove(&self, addr: SocketAddr, spool: &str, id: &str) -> Result<(), PeerError> {
        let request = proto::RemoveRequest {
            spool: spool.to_owned(),
            id: id.to_owned(),
        };
        self.call(addr, self.stub(addr).remove(request)).await?;
        Ok(())
    }

    /// Tells the peer at `addr` that `spool` is retired: it removes every
    /// replica of it.
    pub async fn drop_spool(&self, addr: SocketAddr, spool: &str) -> Result<(), PeerError> {
        let request = proto::DropSpoolRequest {
            spool: spool.to_owned(),
        };
        self.call(addr, self.stub(addr).drop_spool(request)).await?;
        Ok(())
    }
}
