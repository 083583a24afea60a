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
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, KeyValue, LeaseKeepAliveStream, LeaseKeeper, PutOptions, TlsOptions, Txn, TxnOp,
    TxnOpResponse, TxnResponse, WatchOptions,
};
use tokio::sync::Mutex;

use super::{
    valid_state_key, Change, Claim, Coordinator, Error, Event, EventStream, FencingToken, Holder,
    Lease, LeaseId, Member, MemberId, Revision, Snapshot, SpoolId, SpoolInfo,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs, e.g. `http://127.0.0.1:2379`; all `https://` when `tls`
    /// is set (etcd-client refuses TLS options with an `http://` URL).
    pub endpoints: Vec<String>,
    /// Key prefix of this cluster; a `/` is appended if missing.
    pub prefix: String,
    /// Longest wait for one unary request.
    pub request_timeout: Duration,
    /// Longest wait for a connection.
    pub connect_timeout: Duration,
    /// TLS towards etcd; `None` for `http://` endpoints.
    pub tls: Option<EtcdTls>,
    /// The etcd user to authenticate as (etcd's `auth enable`). The client
    /// gets a token when it connects and a new one whenever etcd refuses an
    /// expired token.
    pub user: Option<EtcdUser>,
}

impl EtcdOptions {
    /// Options for `endpoints` under `prefix`, with 5 s timeouts, without
    /// TLS or a user.
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: prefix.into(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            tls: None,
            user: None,
        }
    }
}

/// TLS towards etcd, from PEM bytes. The server's certificate must be signed
/// by `ca` and name the endpoint's host; no other root is trusted.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// PEM certificate(s) of the CA that signed etcd's server certificate.
    pub ca: Vec<u8>,
    /// The client certificate, for an etcd run with `--client-cert-auth`.
    pub identity: Option<EtcdIdentity>,
}

/// A client certificate and its private key, PEM.
#[derive(Clone)]
pub struct EtcdIdentity {
    /// PEM certificate chain, leaf first.
    pub cert: Vec<u8>,
    /// PEM private key.
    pub key: Vec<u8>,
}

impl std::fmt::Debug for EtcdIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdIdentity")
            .field("cert", &format_args!("{} bytes", self.cert.len()))
            .field("key", &format_args!("<redacted>"))
            .finish()
    }
}

/// An etcd user and password.
#[derive(Clone)]
pub struct EtcdUser {
    /// The user's name.
    pub name: String,
    /// The password; never logged.
    pub password: String,
}

impl std::fmt::Debug for EtcdUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdUser")
            .field("name", &self.name)
            .field("password", &format_args!("<redacted>"))
            .finish()
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
    // etcd_client::Error has no source(): look into the variants that wrap one.
    let inner: Option<&(dyn std::error::Error + 'static)> = match &err {
        E::GRpcStatus(status) => Some(status),
        E::TransportError(err) => Some(err),
        E::IoError(err) => Some(err),
        _ => None,
    };
    if let Some(tls) = inner.and_then(tls_failure) {
        return Error::Tls(tls);
    }
    match err {
        E::GRpcStatus(status) => match (status.code(), lease) {
            // etcd answers NotFound only for an unknown lease.
            (tonic::Code::NotFound, Some(lease)) => Error::LeaseExpired(lease),
            // A user without a role on the prefix, or auth enabled and no
            // (valid) user given.
            (tonic::Code::PermissionDenied | tonic::Code::Unauthenticated, _) => {
                Error::Unauthorized(describe_status(&status))
            }
            (
                tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                | tonic::Code::Cancelled
                | tonic::Code::Unknown,
                _,
            ) => Error::Unavailable(describe_status(&status)),
            _ => Error::Backend(describe_status(&status)),
        },
        E::TransportError(err) => Error::Unavailable(describe(&err)),
        E::IoError(err) => Error::Unavailable(describe(&err)),
        other => Error::Backend(describe(&other)),
    }
}

/// A status's message followed by its sources' (the transport error under
/// an Unavailable says what failed), each said once.
fn describe_status(status: &tonic::Status) -> String {
    let mut text = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_owned()
    };
    if let Some(source) = std::error::Error::source(status) {
        append_sources(&mut text, source);
    }
    text
}

/// An error's message followed by its sources', each said once.
fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    if let Some(source) = err.source() {
        append_sources(&mut text, source);
    }
    text
}

fn append_sources(text: &mut String, first: &(dyn std::error::Error + 'static)) {
    let mut source = Some(first);
    while let Some(err) = source {
        let message = err.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = err.source();
    }
}

/// Why TLS with `endpoint` fails, from a handshake of our own with the same
/// certificates, or `None` when it does not (or the endpoint cannot be
/// reached at all). etcd refuses a client certificate, or its absence,
/// after a TLS 1.3 handshake has completed on the client's side, with an
/// alert that the gRPC client only reports as a closed connection; here the
/// alert is read and named.
async fn diagnose_tls(endpoint: &str, tls: &EtcdTls, wait: Duration) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt;

    let uri: tonic::codegen::http::Uri = endpoint.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(2379);
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&tls.ca) {
        roots.add(cert.ok()?).ok()?;
    }
    let provider = rustls::crypto::CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .ok()?
        .with_root_certificates(roots);
    let config = match &tls.identity {
        Some(identity) => {
            let chain = CertificateDer::pem_slice_iter(&identity.cert)
                .collect::<Result<Vec<_>, _>>()
                .ok()?;
            let key = PrivateKeyDer::from_pem_slice(&identity.key).ok()?;
            match builder.with_client_auth_cert(chain, key) {
                Ok(config) => config,
                Err(err) => return Some(format!("the client certificate or key: {err}")),
            }
        }
        None => builder.with_no_client_auth(),
    };
    let name = ServerName::try_from(host.to_owned()).ok()?;
    let tcp = tokio::time::timeout(wait, tokio::net::TcpStream::connect((host, port)))
        .await
        .ok()?
        .ok()?;
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut stream = match tokio::time::timeout(wait, connector.connect(name, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(err)) => return tls_failure(&err),
        Err(_) => return None,
    };
    // A server that accepted us waits for the client to speak; one that
    // refuses sends its alert at once.
    let mut byte = [0u8; 1];
    match tokio::time::timeout(wait.min(Duration::from_secs(1)), stream.read(&mut byte)).await {
        Ok(Err(err)) => tls_failure(&err),
        _ => None,
    }
}

/// The TLS error (from rustls) somewhere in `err`'s sources: the handshake
/// failed, or the server ended the session with an alert (such as
/// `CertificateRequired` when no client certificate was sent).
fn tls_failure(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        // io::Error hides the error it wraps from source(): look inside.
        if let Some(tls) = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        next = err.source();
    }
    None
}

fn utf8(bytes: &[u8]) -> Result<&str, Error> {
    std::str::from_utf8(bytes).map_err(|_| Error::Backend("non-UTF-8 key or value".into()))
}

impl Etcd {
    /// Connects: lazily without a user (the first request opens the
    /// connection); with one, the connection is opened at once to
    /// authenticate, so wrong credentials fail here with
    /// [`Error::Unauthorized`] and an untrusted certificate or a refused
    /// client certificate with [`Error::Tls`].
    pub async fn connect(options: EtcdOptions) -> Result<Etcd, Error> {
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(options.connect_timeout)
            // HTTP/2 pings find a dead connection under a long-lived watch.
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = &options.tls {
            let mut config = TlsOptions::new().ca_certificate(Certificate::from_pem(&tls.ca));
            if let Some(identity) = &tls.identity {
                config = config.identity(Identity::from_pem(&identity.cert, &identity.key));
            }
            connect = connect.with_tls(config);
        }
        let authenticating = options.user.is_some();
        if let Some(user) = &options.user {
            if options.tls.is_none() {
                tracing::warn!(
                    user = %user.name,
                    "the etcd password goes over plain http://: use https:// endpoints"
                );
            }
            // etcd's tokens expire (5 minutes unused by default, or at a
            // fixed time with JWT): fetch a new one and retry the request.
            connect = connect
                .with_user(user.name.clone(), user.password.clone())
                .with_auto_token_refresh(true);
        }
        let mut prefix = options.prefix;
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let connected = tokio::time::timeout(options.connect_timeout, async {
            let client = Client::connect(&options.endpoints, Some(connect))
                .await
                .map_err(|err| match map_err(err, None) {
                    // The only request connect makes is etcd's Authenticate,
                    // which answers InvalidArgument to a wrong user or password.
                    Error::Backend(message) if authenticating => Error::Unauthorized(message),
                    other => other,
                })?;
            if options.tls.is_some() && !authenticating {
                // Nothing was sent yet: try the certificates (and a user
                // named by the certificate) now rather than at the first
                // delivery.
                client
                    .kv_client()
                    .get(
                        prefix.as_str(),
                        Some(GetOptions::new().with_prefix().with_count_only()),
                    )
                    .await
                    .map_err(|err| map_err(err, None))?;
            }
            Ok(client)
        })
        .await
        .unwrap_or_else(|_| Err(Error::Unavailable("connecting to etcd timed out".into())));
        let client = match (connected, &options.tls) {
            (Err(Error::Unavailable(message)), Some(tls)) => {
                // Refused client certificates under TLS 1.3 look like a
                // closed connection to the gRPC client: find out.
                let probes = options
                    .endpoints
                    .iter()
                    .map(|endpoint| diagnose_tls(endpoint, tls, options.connect_timeout));
                let found = tokio::time::timeout(
                    options.connect_timeout,
                    futures::future::join_all(probes),
                )
                .await
                .ok()
                .and_then(|found| found.into_iter().flatten().next());
                return Err(found.map_or(Error::Unavailable(message), Error::Tls));
            }
            (connected, _) => connected?,
        };
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
        self.commit_many(claim, &[(key.to_owned(), change)]).await
    }

    async fn commit_many(
        &self,
        claim: &Claim,
        changes: &[(String, Change)],
    ) -> Result<Revision, Error> {
        let prefix = self.state_prefix(&claim.spool);
        let mut ops = Vec::with_capacity(changes.len());
        for (key, change) in changes {
            valid_state_key(key)?;
            let key = format!("{prefix}{key}");
            ops.push(match change {
                Change::Put(value) => TxnOp::put(key, value.to_vec(), None),
                Change::Delete => TxnOp::delete(key, None),
            });
        }
        let response = self.fenced(claim, ops).await?;
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
