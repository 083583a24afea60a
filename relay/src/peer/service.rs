//! The `postern.peer.v1.Peer` service: stores replicas for other relays and
//! serves them, together with this relay's own spooled messages of a spool,
//! to whoever takes that spool over.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::proto::{self, fetch_chunk, peer_server, replicate_chunk};
use super::store::{
    check_id, check_spool, open_committed, read_chunks, remove_message, Header, Opened,
    ReplicaError, ReplicaStore,
};
use crate::spool::envelope::Envelope;
use crate::spool::Spool;

/// Serves `postern.peer.v1.Peer` from this relay's replicas and local spool.
#[derive(Debug, Clone)]
pub struct PeerService {
    replicas: Arc<ReplicaStore>,
    local: Option<Local>,
}

/// This relay's own spool, read (and pruned) for the spools it accepted into.
#[derive(Debug, Clone)]
struct Local {
    spool: Spool,
}

impl PeerService {
    /// A service over `replicas` and, when given, this relay's own `spool`:
    /// its committed messages of a spool are listed, fetched and removed as
    /// if they were replicas of it (only the files of the local spool
    /// directory, never the object-store copy).
    pub fn new(replicas: Arc<ReplicaStore>, spool: Option<Spool>) -> PeerService {
        PeerService {
            replicas,
            local: spool.map(|spool| Local { spool }),
        }
    }

    /// The replica store.
    pub fn replicas(&self) -> &Arc<ReplicaStore> {
        &self.replicas
    }

    /// Opens the local committed message `id` when its envelope says it was
    /// accepted into `spool`.
    async fn local_message(&self, spool: &str, id: &str) -> Result<Option<Opened>, Status> {
        let Some(local) = &self.local else {
            return Ok(None);
        };
        let dir = local.spool.message_dir(id).to_owned();
        let (spool, id) = (spool.to_owned(), id.to_owned());
        tokio::task::spawn_blocking(move || -> std::io::Result<Option<Opened>> {
            let Some(opened) = open_committed(&dir, &id)? else {
                return Ok(None);
            };
            Ok(belongs_to(&opened.envelope_json, &spool).then_some(opened))
        })
        .await
        .map_err(|join| Status::internal(join.to_string()))?
        .map_err(|err| ReplicaError::Io(err).to_status())
    }
}

/// Whether the envelope JSON says its message was accepted into `spool`.
fn belongs_to(envelope_json: &[u8], spool: &str) -> bool {
    serde_json::from_slice::<Envelope>(envelope_json).is_ok_and(|envelope| envelope.spool == spool)
}

/// The SHA-256 an envelope JSON records (`data_sha256`), when it is one.
pub fn recorded_sha256(envelope_json: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Recorded {
        data_sha256: String,
    }
    let recorded: Recorded = serde_json::from_slice(envelope_json).ok()?;
    is_sha256_hex(&recorded.data_sha256).then(|| recorded.data_sha256.to_ascii_lowercase())
}

/// Whether `text` is a SHA-256 in hex.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

fn status(err: ReplicaError) -> Status {
    err.to_status()
}

type FetchStream = Pin<Box<dyn Stream<Item = Result<proto::FetchChunk, Status>> + Send>>;

#[tonic::async_trait]
impl peer_server::Peer for PeerService {
    async fn replicate(
        &self,
        request: Request<Streaming<proto::ReplicateChunk>>,
    ) -> Result<Response<proto::ReplicateReply>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty replica stream"))?;
        let Some(replicate_chunk::Part::Header(header)) = first.part else {
            return Err(Status::invalid_argument(
                "the first chunk of a replica must be its header",
            ));
        };
        if !is_sha256_hex(&header.data_sha256) {
            return Err(Status::invalid_argument(
                "data_sha256 must be a SHA-256 in hex",
            ));
        }
        let data = stream.map(|chunk| match chunk {
            Ok(proto::ReplicateChunk {
                part: Some(replicate_chunk::Part::Data(data)),
            }) => Ok(Bytes::from(data)),
            Ok(_) => Err(ReplicaError::Protocol(
                "every chunk after the header must be data".into(),
            )),
            Err(status) => Err(ReplicaError::Stream(status.message().to_owned())),
        });
        let written = self
            .replicas
            .write(
                &header.spool,
                Header {
                    id: header.id.clone(),
                    envelope_json: header.envelope_json.into(),
                    data_len: header.data_len,
                    data_sha256: Some(header.data_sha256),
                },
                data,
            )
            .await
            .map_err(status)?;
        tracing::debug!(spool = %header.spool, id = %header.id, ?written, "replica stored");
        Ok(Response::new(proto::ReplicateReply {}))
    }

    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListReply>, Status> {
        let spool = request.into_inner().spool;
        let mut ids = self.replicas.list(&spool).await.map_err(status)?;
        if let Some(local) = &self.local {
            let committed = local
                .spool
                .committed()
                .await
                .map_err(|err| Status::internal(err.to_string()))?;
            ids.extend(
                committed
                    .into_iter()
                    .filter(|envelope| envelope.spool == spool)
                    .map(|envelope| envelope.id),
            );
        }
        ids.sort();
        ids.dedup();
        Ok(Response::new(proto::ListReply { ids }))
    }

    type FetchStream = FetchStream;

    async fn fetch(
        &self,
        request: Request<proto::FetchRequest>,
    ) -> Result<Response<FetchStream>, Status> {
        let proto::FetchRequest { spool, id } = request.into_inner();
        let opened = match self
            .replicas
            .open_message(&spool, &id)
            .await
            .map_err(status)?
        {
            Some(opened) => opened,
            None => self
                .local_message(&spool, &id)
                .await?
                .ok_or_else(|| Status::not_found(format!("{spool}/{id} is not held here")))?,
        };
        let header = proto::FetchChunk {
            part: Some(fetch_chunk::Part::Header(proto::FetchHeader {
                data_sha256: recorded_sha256(&opened.envelope_json).unwrap_or_default(),
                envelope_json: opened.envelope_json.to_vec(),
                data_len: opened.data_len,
            })),
        };
        let data = read_chunks(opened.file, opened.data_len).map(|chunk| match chunk {
            Ok(data) => Ok(proto::FetchChunk {
                part: Some(fetch_chunk::Part::Data(data.to_vec())),
            }),
            Err(err) => Err(ReplicaError::Io(err).to_status()),
        });
        let stream = futures::stream::once(async { Ok(header) }).chain(data);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn remove(
        &self,
        request: Request<proto::RemoveRequest>,
    ) -> Result<Response<proto::RemoveReply>, Status> {
        let proto::RemoveRequest { spool, id } = request.into_inner();
        check_spool(&spool).map_err(status)?;
        check_id(&id).map_err(status)?;
        self.replicas.remove(&spool, &id).await.map_err(status)?;
        if let Some(local) = &self.local {
            let dir = local.spool.message_dir(&id).to_owned();
            if local_belongs(&dir, &id, &spool).await? {
                remove_message(&dir, local.spool.message_dir_sync(&id), &id)
                    .await
                    .map_err(status)?;
            }
        }
        Ok(Response::new(proto::RemoveReply {}))
    }

    async fn drop_spool(
        &self,
        request: Request<proto::DropSpoolRequest>,
    ) -> Result<Response<proto::DropSpoolReply>, Status> {
        let spool = request.into_inner().spool;
        self.replicas.drop_spool(&spool).await.map_err(status)?;
        Ok(Response::new(proto::DropSpoolReply {}))
    }
}

/// Whether the local spool holds a committed `id` of `spool`.
async fn local_belongs(dir: &Path, id: &str, spool: &str) -> Result<bool, Status> {
    let path = crate::spool::message_file::path(dir, id);
    let spool = spool.to_owned();
    tokio::task::spawn_blocking(move || {
        match crate::spool::message_file::read_envelope_json(&path) {
            Ok(json) => Ok(belongs_to(&json, &spool)),
            // Absent, being received, or damaged: not a committed message.
            Err(err)
                if matches!(
                    err.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::InvalidData
                ) =>
            {
                Ok(false)
            }
            Err(err) => Err(err),
        }
    })
    .await
    .map_err(|join| Status::internal(join.to_string()))?
    .map_err(|err| ReplicaError::Io(err).to_status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recorded_digest_is_read_from_the_envelope() {
        let sha = "AB".repeat(32);
        let json = format!("{{\"id\":\"x\",\"data_sha256\":\"{sha}\",\"other\":1}}");
        assert_eq!(
            recorded_sha256(json.as_bytes()),
            Some(sha.to_ascii_lowercase())
        );
        assert_eq!(recorded_sha256(b"{}"), None);
        assert_eq!(recorded_sha256(b"{\"data_sha256\":\"abc\"}"), None);
        assert_eq!(recorded_sha256(b"not json"), None);
    }

    #[test]
    fn only_envelopes_of_the_spool_belong_to_it() {
        assert!(belongs_to(
            serde_json::to_vec(&envelope("s1")).unwrap().as_slice(),
            "s1"
        ));
        assert!(!belongs_to(
            serde_json::to_vec(&envelope("s2")).unwrap().as_slice(),
            "s1"
        ));
        assert!(!belongs_to(
            serde_json::to_vec(&envelope("")).unwrap().as_slice(),
            "s1"
        ));
        assert!(!belongs_to(b"{}", "s1"));
    }

    fn envelope(spool: &str) -> Envelope {
        Envelope {
            spool: spool.into(),
            ..Envelope::for_tests("01ARZ3NDEKTSV4RRFFQ69G5FAV")
        }
    }
}
