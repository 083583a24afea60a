//! The etcd coordinator (`etcd-client`, etcd v3 API; tested against etcd 3.4).
//!
//! Keys, under a prefix shared by the relays of one cluster:
//!
//! ```text
//! <prefix>claims/<spool>          holder name; bound to the holder's lease;
//!                                 its create_revision is the fencing token
//! <prefix>members/<member>        advertised info; bound to the member's lease
//! <prefix>spools/<spool>          registry of spools not yet retired (no lease)
//! <prefix>state/<spool>/<key>     committed state (no lease)
//! ```
//!
//! Every conditional operation is one transaction comparing the claim key's
//! `create_revision` with the token, so check and change are one atomic step
//! at the etcd leader. A deleted and re-created claim key has a new, larger
//! create_revision, so an old token never matches again.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions,
};
use tokio::sync::Mutex;

use super::{
    valid_state_key, Change, Claim, Coordinator, Error, Event, EventStream, FencingToken, Holder,
    Lease, LeaseId, Member, MemberId, Revision, Snapshot, SpoolId, SpoolInfo,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster; a `/` is appended if missing.
    pub prefix: String,
    /// Longest wait for one unary request.
    pub request_timeout: Duration,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
}

impl EtcdOptions {
    /// Options for `endpoints` under `prefix`, with 5 s timeouts.
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: prefix.into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// The open keep-alive stream of one lease.
#[derive(Debug)]
struct KeepAlive {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// A [`Coordinator`] backed by etcd.
pub struct Etcd {
    client: Client,
    prefix: String,
    request_timeout: Duration,
    /// Open keep-alive streams by lease. An entry is taken out for the
    /// duration of a renewal and put back only when its reply was read, so a
    /// renewal abandoned half way never leaves a reply behind that a later
    /// renewal would mistake for its own.
    keep_alives: Mutex<HashMap<LeaseId, KeepAlive>>,
}

/// A TTL in whole seconds, rounded up (etcd grants leases in seconds).
fn ttl_seconds(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

fn seconds(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

fn revision(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Maps a client error; `lease` names the lease a NotFound refers to.
fn map_err(err: etcd_client::Error, lease: Option<LeaseId>) -> Error {
    use etcd_client::Error as E;
    match err {
        E::GRpcStatus(status) => match (status.code(), lease) {
            // etcd answers NotFound only for an unknown lease.
            (tonic::Code::NotFound, Some(lease)) => Error::LeaseExpired(lease),
            (
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown,
                _,
            ) => Error::Unavailable(status.to_string()),
            _ => Error::Backend(status.to_string()),
        },
        E::TransportError(err) => Error::Unavailable(err.to_string()),
        E::IoError(err) => Error::Unavailable(err.to_string()),
        other => Error::Backend(other.to_string()),
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(bytes).map_err(|_| Error::Backend("non-UTF-8 key or value".into()))
}

impl Etcd {
    /// Connects (lazily: the first request opens the connection).
    pub async fn connect(options: EtcdOptions) -> Result<Etcd, Error> {
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            // HTTP/2 pings find a dead connection under a long-lived watch.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(
            options.connect_timeout,
            Client::connect(&options.endpoints, Some(connect)),
        )
        .await
        .map_err(|_| Error::Unavailable("connecting to etcd timed out".into()))?
        .map_err(|err| map_err(err, None))?;
        let mut prefix = options.prefix;
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Etcd {
            client,
            prefix,
            request_timeout: options.request_timeout,
            keep_alives: Mutex::new(HashMap::new()),
        })
    }

    /// The underlying client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn claim_key(&self, spool: &SpoolId) -> String {
        format!("{}claims/{spool}", self.prefix)
    }

    fn member_key(&self, member: &MemberId) -> String {
        format!("{}members/{member}", self.prefix)
    }

    fn spool_key(&self, spool: &SpoolId) -> String {
        format!("{}spools/{spool}", self.prefix)
    }

    fn state_prefix(&self, spool: &SpoolId) -> String {
        format!("{}state/{spool}/", self.prefix)
    }

    /// Runs one request with the request timeout.
    async fn call<T>(
        &self,
        lease: Option<LeaseId>,
        request: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Error> {
        match tokio::time::timeout(self.request_timeout, request).await {
            Ok(result) => result.map_err(|err| map_err(err, lease)),
            Err(_) => Err(Error::Unavailable("etcd request timed out".into())),
        }
    }

    async fn txn(&self, lease: Option<LeaseId>, txn: Txn) -> Result<TxnResponse, Error> {
        let mut kv = self.client.kv_client();
        self.call(lease, kv.txn(txn)).await
    }

    /// A transaction that applies `ops` iff `claim` is current; on failure
    /// reports the current token.
    async fn fenced(&self, claim: &Claim, ops: Vec<TxnOp>) -> Result<TxnResponse, Error> {
        let key = self.claim_key(&claim.spool);
        let token = i64::try_from(claim.token.0).unwrap_or(i64::MAX);
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                token,
            )])
            .and_then(ops)
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(None, txn).await?;
        if response.succeeded() {
            return Ok(response);
        }
        let current = first_kv(&response).map(|kv| FencingToken(revision(kv.create_revision())));
        Err(Error::Fenced {
            spool: claim.spool.clone(),
            token: claim.token,
            current,
        })
    }

    /// Sends one renewal on the lease's stream (opened if needed) and reads its reply.
    async fn renew(&self, lease: LeaseId) -> Result<Duration, Error> {
        let open = self.keep_alives.lock().await.remove(&lease);
        let mut keep_alive = match open {
            Some(open) => open,
            None => {
                let mut client = self.client.lease_client();
                let opened = tokio::time::timeout(self.request_timeout, client.keep_alive(lease.0))
                    .await
                    .map_err(|_| Error::Unavailable("etcd request timed out".into()))?;
                let (keeper, stream) = match opened {
                    Ok(opened) => opened,
                    // Opening reads the first reply; this variant means its TTL was 0.
                    Err(etcd_client::Error::LeaseKeepAliveError(_)) => {
                        return Err(Error::LeaseExpired(lease))
                    }
                    Err(err) => return Err(map_err(err, Some(lease))),
                };
                KeepAlive { keeper, stream }
            }
        };
        keep_alive
            .keeper
            .keep_alive()
            .await
            .map_err(|err| Error::Unavailable(err.to_string()))?;
        let reply = self
            .call(Some(lease), keep_alive.stream.message())
            .await?
            .ok_or_else(|| Error::Unavailable("keep-alive stream closed".into()))?;
        if reply.ttl() <= 0 {
            return Err(Error::LeaseExpired(lease));
        }
        self.keep_alives.lock().await.insert(lease, keep_alive);
        Ok(seconds(reply.ttl()))
    }
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("prefix", &self.prefix)
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

fn first_kv(response: &TxnResponse) -> Option<KeyValue> {
    response.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().cloned(),
        _ => None,
    })
}

fn header_revision(response: &TxnResponse) -> Revision {
    Revision(revision(response.header().map_or(0, |h| h.revision())))
}

/// What follows `prefix` in `key`, if `key` starts with it.
fn strip<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix)
}

#[async_trait]
impl Coordinator for Etcd {
    async fn grant(&self, ttl: Duration) -> Result<Lease, Error> {
        let mut client = self.client.lease_client();
        let response = self
            .call(None, client.grant(ttl_seconds(ttl), None))
            .await?;
        if !response.error().is_empty() {
            return Err(Error::Backend(response.error().to_owned()));
        }
        Ok(Lease {
            id: LeaseId(response.id()),
            ttl: seconds(response.ttl()),
        })
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration, Error> {
        self.renew(lease).await
    }

    async fn revoke(&self, lease: LeaseId) -> Result<(), Error> {
        self.keep_alives.lock().await.remove(&lease);
        let mut client = self.client.lease_client();
        match self.call(Some(lease), client.revoke(lease.0)).await {
            Ok(_) | Err(Error::LeaseExpired(_)) => Ok(()),
            Err(err) => Err(err),
        }
    }

    async fn register(&self, lease: LeaseId, member: &MemberId, info: &str) -> Result<(), Error> {
        let mut kv = self.client.kv_client();
        let put = kv.put(
            self.member_key(member),
            info,
            Some(PutOptions::new().with_lease(lease.0)),
        );
        self.call(Some(lease), put).await.map(drop)
    }

    async fn snapshot(&self) -> Result<Snapshot, Error> {
        let prefixed = |part: &str| {
            TxnOp::get(
                format!("{}{part}", self.prefix),
                Some(GetOptions::new().with_prefix()),
            )
        };
        let txn = Txn::new().and_then([
            prefixed("members/"),
            prefixed("claims/"),
            prefixed("spools/"),
        ]);
        let response = self.txn(None, txn).await?;
        let mut ranges = response.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(get) => get.kvs().to_vec(),
            _ => Vec::new(),
        });
        let (members, claims, spools) = (
            ranges.next().unwrap_or_default(),
            ranges.next().unwrap_or_default(),
            ranges.next().unwrap_or_default(),
        );
        let members_prefix = format!("{}members/", self.prefix);
        let members = members
            .iter()
            .map(|kv| {
                Ok(Member {
                    id: MemberId::new(strip(utf8(kv.key())?, &members_prefix).unwrap_or(""))?,
                    info: utf8(kv.value())?.to_owned(),
                    lease: LeaseId(kv.lease()),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let claims_prefix = format!("{}claims/", self.prefix);
        let mut holders = HashMap::new();
        for kv in &claims {
            let spool = strip(utf8(kv.key())?, &claims_prefix).unwrap_or("");
            holders.insert(
                spool.to_owned(),
                Holder {
                    member: MemberId::new(utf8(kv.value())?)?,
                    token: FencingToken(revision(kv.create_revision())),
                },
            );
        }
        let spools_prefix = format!("{}spools/", self.prefix);
        let spools = spools
            .iter()
            .map(|kv| {
                let name = strip(utf8(kv.key())?, &spools_prefix).unwrap_or("");
                Ok(SpoolInfo {
                    spool: SpoolId::new(name)?,
                    holder: holders.get(name).cloned(),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(Snapshot {
            revision: header_revision(&response),
            members,
            spools,
        })
    }

    async fn watch(&self, after: Revision) -> Result<EventStream, Error> {
        // One range, claims/ to spools/ inclusive ('0' follows '/'), so the
        // events of claims, members and the registry arrive in one order.
        let start = format!("{}claims/", self.prefix);
        let end = format!("{}spools0", self.prefix);
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(i64::try_from(after.0 + 1).unwrap_or(i64::MAX));
        let mut client = self.client.watch_client();
        let stream = self.call(None, client.watch(start, Some(options))).await?;
        let prefix = self.prefix.clone();
        let state = (stream, std::collections::VecDeque::new(), false);
        let events = futures::stream::unfold(state, move |(mut stream, mut queue, done)| {
            let prefix = prefix.clone();
            async move {
                loop {
                    if let Some(item) = queue.pop_front() {
                        return Some((Ok(item), (stream, queue, done)));
                    }
                    if done {
                        return None;
                    }
                    match stream.message().await {
                        Ok(Some(response)) => {
                            if response.canceled() {
                                let err = if response.compact_revision() > 0 {
                                    Error::Compacted(after)
                                } else {
                                    Error::Unavailable(format!(
                                        "watch cancelled: {}",
                                        response.cancel_reason()
                                    ))
                                };
                                return Some((Err(err), (stream, queue, true)));
                            }
                            match translate(&prefix, response.events()) {
                                Ok(events) => queue.extend(events),
                                Err(err) => return Some((Err(err), (stream, queue, true))),
                            }
                        }
                        Ok(None) => {
                            let err = Error::Unavailable("watch stream closed".into());
                            return Some((Err(err), (stream, queue, true)));
                        }
                        Err(err) => return Some((Err(map_err(err, None)), (stream, queue, true))),
                    }
                }
            }
        });
        Ok(Box::pin(events))
    }

    async fn claim(
        &self,
        lease: LeaseId,
        holder: &MemberId,
        spool: &SpoolId,
    ) -> Result<Claim, Error> {
        let key = self.claim_key(spool);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(
                    key.clone(),
                    holder.as_str(),
                    Some(PutOptions::new().with_lease(lease.0)),
                ),
                TxnOp::put(self.spool_key(spool), "", None),
            ])
            .or_else([TxnOp::get(key, None)]);
        let response = self.txn(Some(lease), txn).await?;
        if response.succeeded() {
            return Ok(Claim {
                spool: spool.clone(),
                holder: holder.clone(),
                lease,
                token: FencingToken(header_revision(&response).0),
            });
        }
        let current = first_kv(&response)
            .ok_or_else(|| Error::Backend("claim compare failed on an absent key".into()))?;
        let current_holder = MemberId::new(utf8(current.value())?)?;
        let token = FencingToken(revision(current.create_revision()));
        if current_holder == *holder && current.lease() == lease.0 {
            // An earlier attempt whose reply was lost.
            return Ok(Claim {
                spool: spool.clone(),
                holder: holder.clone(),
                lease,
                token,
            });
        }
        Err(Error::Claimed {
            spool: spool.clone(),
            holder: current_holder,
            token,
        })
    }

    async fn check(&self, claim: &Claim) -> Result<(), Error> {
        self.fenced(claim, Vec::new()).await.map(drop)
    }

    async fn commit(&self, claim: &Claim, key: &str, change: Change) -> Result<Revision, Error> {
        valid_state_key(key)?;
        let key = format!("{}{key}", self.state_prefix(&claim.spool));
        let op = match change {
            Change::Put(value) => TxnOp::put(key, value.to_vec(), None),
            Change::Delete => TxnOp::delete(key, None),
        };
        let response = self.fenced(claim, vec![op]).await?;
        Ok(header_revision(&response))
    }

    async fn load(&self, spool: &SpoolId, prefix: &str) -> Result<Vec<(String, Bytes)>, Error> {
        let base = self.state_prefix(spool);
        let mut kv = self.client.kv_client();
        let get = kv.get(
            format!("{base}{prefix}"),
            Some(GetOptions::new().with_prefix()),
        );
        let response = self.call(None, get).await?;
        response
            .kvs()
            .iter()
            .map(|kv| {
                let key = strip(utf8(kv.key())?, &base).unwrap_or("").to_owned();
                Ok((key, Bytes::copy_from_slice(kv.value())))
            })
            .collect()
    }

    async fn release(&self, claim: &Claim) -> Result<(), Error> {
        let op = TxnOp::delete(self.claim_key(&claim.spool), None);
        self.fenced(claim, vec![op]).await.map(drop)
    }

    async fn retire(&self, claim: &Claim) -> Result<(), Error> {
        let ops = vec![
            TxnOp::delete(self.claim_key(&claim.spool), None),
            TxnOp::delete(self.spool_key(&claim.spool), None),
            TxnOp::delete(
                self.state_prefix(&claim.spool),
                Some(DeleteOptions::new().with_prefix()),
            ),
        ];
        self.fenced(claim, ops).await.map(drop)
    }
}

/// Turns one watch response's key events into [`Event`]s. The events of one
/// revision always arrive in one response, so a claim deleted together with
/// its registry key is reported as retired.
fn translate(prefix: &str, events: &[etcd_client::Event]) -> Result<Vec<(Revision, Event)>, Error> {
    let claims = format!("{prefix}claims/");
    let members = format!("{prefix}members/");
    let spools = format!("{prefix}spools/");
    let mut retired = HashSet::new();
    for event in events {
        if let (EventType::Delete, Some(kv)) = (event.event_type(), event.kv()) {
            if let Some(spool) = strip(utf8(kv.key())?, &spools) {
                retired.insert((revision(kv.mod_revision()), spool.to_owned()));
            }
        }
    }
    let mut out = Vec::new();
    for event in events {
        let Some(kv) = event.kv() else { continue };
        let key = utf8(kv.key())?;
        let at = revision(kv.mod_revision());
        let translated = match (
            event.event_type(),
            strip(key, &claims),
            strip(key, &members),
        ) {
            (EventType::Put, Some(spool), _) => Event::Claimed {
                spool: SpoolId::new(spool)?,
                holder: MemberId::new(utf8(kv.value())?)?,
                token: FencingToken(revision(kv.create_revision())),
            },
            (EventType::Delete, Some(spool), _) => Event::Released {
                spool: SpoolId::new(spool)?,
                retired: retired.contains(&(at, spool.to_owned())),
            },
            (EventType::Put, None, Some(member)) => Event::Joined(Member {
                id: MemberId::new(member)?,
                info: utf8(kv.value())?.to_owned(),
                lease: LeaseId(kv.lease()),
            }),
            (EventType::Delete, None, Some(member)) => Event::Left(MemberId::new(member)?),
            _ => continue,
        };
        out.push((Revision(at), translated));
    }
    Ok(out)
}
