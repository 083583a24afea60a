//! The `Queue` admin service: list, show, flush, hold, release, delete and
//! stats over the scheduler's queue (`crate::queue::Queue`).

use std::collections::BTreeMap;
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::cluster::{forwarded, is_forwarded, ClusterAdmin};
use super::proto::{self, queue_server};
use crate::queue::schedule::now_ms;
use crate::queue::state::Status as RecipientStatus;
use crate::queue::{Entry, Queue, QueueError};
use crate::smtp::params::{Body, Ret};
use crate::spool::envelope::Envelope;

/// How long `delete` waits for a delivery attempt in progress to end.
const BUSY_WAIT: Duration = Duration::from_secs(10);

/// Serves `postern.admin.v1.Queue` over one relay's queue.
#[derive(Debug, Clone)]
pub struct QueueService {
    queue: Queue,
    cluster: Option<ClusterAdmin>,
}

/// Passes a request by id on to the peers when this relay does not hold the
/// message: the first answer other than NOT_FOUND wins.
macro_rules! pass_on {
    ($self:ident, $request:ident, $local:expr, |$client:ident, $message:ident| $call:expr) => {{
        let local = $local;
        match (&local, &$self.cluster) {
            (Err(status), Some(cluster))
                if status.code() == tonic::Code::NotFound && !is_forwarded(&$request) =>
            {
                let original = $request.into_inner();
                for (_, client) in cluster.peers().await {
                    let Ok(mut $client) = client else { continue };
                    let $message = original.clone();
                    match $call.await {
                        Err(status) if status.code() != tonic::Code::NotFound => {
                            if matches!(
                                status.code(),
                                tonic::Code::Unavailable
                                    | tonic::Code::DeadlineExceeded
                                    | tonic::Code::Cancelled
                            ) {
                                continue;
                            }
                            return Err(status);
                        }
                        Err(_) => continue,
                        Ok(response) => return Ok(response),
                    }
                }
                local
            }
            _ => local,
        }
    }};
}

impl QueueService {
    /// A service over `queue`.
    pub fn new(queue: Queue) -> QueueService {
        QueueService {
            queue,
            cluster: None,
        }
    }

    /// Also answers for the rest of `cluster` (`cluster` listings, and
    /// requests by id for messages other relays hold).
    pub fn with_cluster(mut self, cluster: ClusterAdmin) -> QueueService {
        self.cluster = Some(cluster);
        self
    }

    fn message(&self, entry: &Entry, envelope: &Envelope, now: u64) -> proto::Message {
        let mut message = message(entry, envelope, now, |domain| {
            self.queue.destination(domain)
        });
        if let Some(cluster) = &self.cluster {
            message.relay = cluster.member().to_owned();
        }
        message
    }

    async fn current(&self, id: &str) -> Result<proto::Message, Status> {
        let entry = self
            .queue
            .get(id)
            .ok_or_else(|| status(QueueError::NotFound(id.to_owned())))?;
        let envelope = self
            .queue
            .envelope_of(&entry)
            .await
            .map_err(|err| status(QueueError::Io(err)))?;
        Ok(self.message(&entry, &envelope, now_ms()))
    }
}

/// How a queue error reaches the client.
fn status(err: QueueError) -> Status {
    match err {
        QueueError::NotFound(_) => Status::not_found(err.to_string()),
        QueueError::Busy(_) => Status::failed_precondition(err.to_string()),
        QueueError::Io(_) => Status::internal(err.to_string()),
    }
}

fn require_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("a message id is required"));
    }
    Ok(())
}

/// Where a message stands: held, active (due or being delivered) or deferred.
pub fn state_of(entry: &Entry, now: u64) -> proto::MessageState {
    if entry.state.held {
        proto::MessageState::Held
    } else if entry.in_flight || entry.state.next_attempt_ms <= now {
        proto::MessageState::Active
    } else {
        proto::MessageState::Deferred
    }
}

fn status_name(status: RecipientStatus) -> &'static str {
    match status {
        RecipientStatus::Pending => "pending",
        RecipientStatus::Delivered => "delivered",
        RecipientStatus::Failed => "failed",
    }
}

/// The wire form of a queue entry; `destination` routes a recipient domain.
pub fn message(
    entry: &Entry,
    envelope: &Envelope,
    now: u64,
    destination: impl Fn(&str) -> String,
) -> proto::Message {
    let params = &envelope.mail_params;
    let recipients = envelope
        .recipients
        .iter()
        .zip(&entry.state.recipients)
        .map(|(recipient, state)| proto::Recipient {
            address: recipient.address.address(),
            status: status_name(state.status).into(),
            last_reply: state.last_reply.clone(),
            remote: state.remote.clone(),
            destination: destination(&recipient.address.domain),
            notify: recipient.params.notify.as_ref().map(|notify| {
                notify
                    .iter()
                    .map(|n| n.keyword())
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            orcpt: recipient.params.orcpt.clone(),
        })
        .collect();
    proto::Message {
        id: envelope.id.clone(),
        sender: envelope
            .reverse_path
            .as_ref()
            .map(|m| m.address())
            .unwrap_or_default(),
        recipients,
        size: envelope.data_len,
        received_at: envelope.received_at.clone(),
        arrival_ms: entry.arrival_ms,
        state: state_of(entry, now).into(),
        attempts: entry.state.attempts,
        next_attempt_ms: entry.state.next_attempt_ms,
        in_flight: entry.in_flight,
        last_error: entry.state.last_error().map(str::to_owned),
        now_ms: now,
        client_addr: envelope.client.addr.clone(),
        helo: envelope.client.helo.clone(),
        listener: envelope.listener.clone(),
        tls: envelope.client.tls.clone(),
        auth: envelope.client.auth.clone(),
        envid: params.envid.clone(),
        ret: params.ret.map(|ret| {
            match ret {
                Ret::Full => "FULL",
                Ret::Hdrs => "HDRS",
            }
            .into()
        }),
        body: params.body.map(|body| {
            match body {
                Body::SevenBit => "7BIT",
                Body::EightBitMime => "8BITMIME",
            }
            .into()
        }),
        smtputf8: params.smtputf8,
        data_sha256: envelope.data_sha256.clone(),
        relay: String::new(),
    }
}

/// Counts by state and by destination (of pending recipients).
pub fn stats(
    entries: &[Entry],
    now: u64,
    destination: impl Fn(&str) -> String,
) -> proto::StatsResponse {
    let mut response = proto::StatsResponse {
        total: entries.len() as u64,
        now_ms: now,
        oldest_arrival_ms: entries.iter().map(|e| e.arrival_ms).min(),
        ..Default::default()
    };
    let mut destinations: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for entry in entries {
        match state_of(entry, now) {
            proto::MessageState::Held => response.held += 1,
            proto::MessageState::Deferred => response.deferred += 1,
            _ => response.active += 1,
        }
        let mut seen = Vec::new();
        for (domain, state) in entry.domains.iter().zip(&entry.state.recipients) {
            if state.status != RecipientStatus::Pending {
                continue;
            }
            let key = destination(domain);
            let counts = destinations
                .entry(key.clone())
                .or_insert((0, 0, entry.arrival_ms));
            counts.1 += 1;
            counts.2 = counts.2.min(entry.arrival_ms);
            if !seen.contains(&key) {
                counts.0 += 1;
                seen.push(key);
            }
        }
    }
    response.destinations = destinations
        .into_iter()
        .map(
            |(destination, (messages, recipients, oldest))| proto::DestinationCount {
                destination,
                messages,
                recipients,
                oldest_arrival_ms: Some(oldest),
            },
        )
        .collect();
    response
}

/// The relay's counters since it started.
fn counters(metrics: &crate::metrics::Metrics) -> proto::Counters {
    use std::sync::atomic::Ordering::Relaxed;
    proto::Counters {
        accepted: metrics.accepted.load(Relaxed),
        refused: metrics.refused.load(Relaxed),
        delivered: metrics.delivered.load(Relaxed),
        deferred: metrics.deferred(),
        bounced: metrics.bounced.load(Relaxed),
    }
}

/// Adds a peer's statistics to `total`.
fn add_stats(total: &mut proto::StatsResponse, peer: proto::StatsResponse, relay: String) {
    total.total += peer.total;
    total.active += peer.active;
    total.deferred += peer.deferred;
    total.held += peer.held;
    if let Some(peer) = peer.counters {
        let sum = total.counters.get_or_insert_with(Default::default);
        sum.accepted += peer.accepted;
        sum.refused += peer.refused;
        sum.delivered += peer.delivered;
        sum.deferred += peer.deferred;
        sum.bounced += peer.bounced;
    }
    total.oldest_arrival_ms = match (total.oldest_arrival_ms, peer.oldest_arrival_ms) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    for count in peer.destinations {
        match total
            .destinations
            .iter_mut()
            .find(|d| d.destination == count.destination)
        {
            Some(sum) => {
                sum.messages += count.messages;
                sum.recipients += count.recipients;
                sum.oldest_arrival_ms = match (sum.oldest_arrival_ms, count.oldest_arrival_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            None => total.destinations.push(count),
        }
    }
    total
        .destinations
        .sort_by(|a, b| a.destination.cmp(&b.destination));
    total.relays.push(relay);
}

#[tonic::async_trait]
impl queue_server::Queue for QueueService {
    async fn list(
        &self,
        request: Request<proto::ListRequest>,
    ) -> Result<Response<proto::ListResponse>, Status> {
        let now = now_ms();
        let mut messages: Vec<proto::Message> = self
            .queue
            .list_with_envelopes()
            .await
            .iter()
            .map(|(entry, envelope)| self.message(entry, envelope, now))
            .collect();
        let mut unreachable = Vec::new();
        if let (true, Some(cluster)) = (request.get_ref().cluster, &self.cluster) {
            for (addr, client) in cluster.peers().await {
                let answer = match client {
                    Ok(mut client) => client
                        .list(forwarded(proto::ListRequest { cluster: false }))
                        .await
                        .map_err(|status| status.message().to_owned()),
                    Err(err) => Err(err),
                };
                match answer {
                    Ok(response) => messages.extend(response.into_inner().messages),
                    Err(err) => unreachable.push(format!("{addr}: {err}")),
                }
            }
            messages.sort_by(|a, b| (a.arrival_ms, &a.id).cmp(&(b.arrival_ms, &b.id)));
        }
        Ok(Response::new(proto::ListResponse {
            messages,
            unreachable,
        }))
    }

    async fn show(
        &self,
        request: Request<proto::ShowRequest>,
    ) -> Result<Response<proto::Message>, Status> {
        let id = request.get_ref().id.clone();
        require_id(&id)?;
        pass_on!(
            self,
            request,
            self.current(&id).await.map(Response::new),
            |client, message| client.show(forwarded(message))
        )
    }

    async fn flush(
        &self,
        request: Request<proto::FlushRequest>,
    ) -> Result<Response<proto::FlushResponse>, Status> {
        let id = request.get_ref().id.clone().filter(|id| !id.is_empty());
        if let Some(id) = &id {
            // Flushing a held message would do nothing; say why.
            if self.queue.get(id).is_some_and(|entry| entry.state.held) {
                return Err(Status::failed_precondition(format!(
                    "message {id} is held; release it to deliver it"
                )));
            }
        }
        let local = self
            .queue
            .flush(id.as_deref())
            .map_err(status)
            .map(|flushed| {
                Response::new(proto::FlushResponse {
                    flushed: flushed as u64,
                })
            });
        pass_on!(self, request, local, |client, message| client
            .flush(forwarded(message)))
    }

    async fn hold(
        &self,
        request: Request<proto::HoldRequest>,
    ) -> Result<Response<proto::Message>, Status> {
        let id = request.get_ref().id.clone();
        require_id(&id)?;
        let local = match self.queue.set_held(&id, true).await {
            Ok(()) => self.current(&id).await.map(Response::new),
            Err(err) => Err(status(err)),
        };
        pass_on!(self, request, local, |client, message| client
            .hold(forwarded(message)))
    }

    async fn release(
        &self,
        request: Request<proto::ReleaseRequest>,
    ) -> Result<Response<proto::Message>, Status> {
        let id = request.get_ref().id.clone();
        require_id(&id)?;
        let local = match self.queue.set_held(&id, false).await {
            Ok(()) => self.current(&id).await.map(Response::new),
            Err(err) => Err(status(err)),
        };
        pass_on!(self, request, local, |client, message| client
            .release(forwarded(message)))
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> Result<Response<proto::DeleteResponse>, Status> {
        let proto::DeleteRequest { id, bounce } = request.get_ref().clone();
        require_id(&id)?;
        if self.queue.get(&id).is_none() {
            let local = Err(status(QueueError::NotFound(id.clone())));
            return pass_on!(self, request, local, |client, message| client
                .delete(forwarded(message)));
        }
        // A DSN goes out only for a real sender and recipients still pending.
        let bounced = bounce
            && match self.queue.get(&id) {
                Some(entry) if !entry.state.is_final() => self
                    .queue
                    .envelope_of(&entry)
                    .await
                    .is_ok_and(|envelope| envelope.reverse_path.is_some()),
                _ => false,
            };
        // An attempt in progress usually ends within moments; wait for it
        // rather than make the operator retry.
        let deadline = tokio::time::Instant::now() + BUSY_WAIT;
        loop {
            match self.queue.delete(&id, bounce).await {
                Err(QueueError::Busy(_)) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                result => break result.map_err(status)?,
            }
        }
        Ok(Response::new(proto::DeleteResponse { id, bounced }))
    }

    async fn stats(
        &self,
        request: Request<proto::StatsRequest>,
    ) -> Result<Response<proto::StatsResponse>, Status> {
        let entries = self.queue.list();
        let mut response = stats(&entries, now_ms(), |domain| self.queue.destination(domain));
        response.counters = Some(counters(self.queue.metrics()));
        if let (true, Some(cluster)) = (request.get_ref().cluster, &self.cluster) {
            response.relays.push(cluster.member().to_owned());
            for (addr, client) in cluster.peers().await {
                let answer = match client {
                    Ok(mut client) => client
                        .stats(forwarded(proto::StatsRequest { cluster: false }))
                        .await
                        .map_err(|status| status.message().to_owned()),
                    Err(err) => Err(err),
                };
                match answer {
                    Ok(peer) => add_stats(&mut response, peer.into_inner(), addr.to_string()),
                    Err(err) => response.unreachable.push(format!("{addr}: {err}")),
                }
            }
        }
        Ok(Response::new(response))
    }
}
