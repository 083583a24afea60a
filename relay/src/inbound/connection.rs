//! Drives one SMTP session over a stream: reads, feeds the sans-I/O session,
//! answers its decisions (policy, spool, quorum) and writes its replies.

use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use super::auth::Checked;

use super::early::EarlyOutcome;
use super::local::LocalUser;
use super::policy::RcptDecision;
use super::rate::Limited;
use super::received::{received_header, TraceInfo};
use super::tls::MaybeTls;
use super::{Listener, Peer};
use crate::config::ListenerMode;
use crate::metrics::Metrics;
use crate::queue::lifecycle::{self, Queued, RefusedEarly};
use crate::queue::schedule::now_ms;
use crate::smtp::params::{MailParams, Mailbox, RcptParams};
use crate::smtp::{Credentials, Event, Reply, Session, Verdict};
use crate::spool::envelope::{ClientInfo, Envelope, Recipient, ENVELOPE_VERSION};
use crate::spool::{Incoming, SpoolError};

/// Read buffer size; also bounds how much unprocessed input a session holds.
const READ_BUFFER: usize = 64 * 1024;

/// The message being received and what went wrong with it, if anything.
struct MessageInProgress {
    incoming: Option<Incoming>,
    error: Option<SpoolError>,
    started: Instant,
    /// Octets of data written, our trace header included.
    size: u64,
}

/// Runs a session on `stream` until it ends.
pub async fn handle<S>(listener: &Listener, stream: S, peer: Peer)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut connection = Connection {
        listener,
        stream: MaybeTls::Plain(stream),
        peer,
        session: Session::new(listener.session_config.clone()),
        output: Vec::new(),
        message: None,
        identity: None,
    };
    if listener.mode == ListenerMode::Submissions && !connection.implicit_tls().await {
        return;
    }
    if let Err(err) = connection.run().await {
        tracing::debug!(client = %connection.client_label(), "connection ended: {err}");
    }
    if let Some(message) = connection.message.take() {
        if let Some(incoming) = message.incoming {
            incoming.abort().await;
        }
    }
}

struct Connection<'a, S> {
    listener: &'a Listener,
    stream: MaybeTls<S>,
    peer: Peer,
    session: Session,
    output: Vec<u8>,
    message: Option<MessageInProgress>,
    /// Who the client is, once AUTH succeeded.
    identity: Option<Identity>,
}

/// Who an authenticated client is.
#[derive(Debug, Clone)]
enum Identity {
    /// A local user, by the socket's peer credentials (AUTH EXTERNAL).
    Local(LocalUser),
    /// A user who gave a password (AUTH PLAIN or LOGIN).
    Login(String),
}

impl Identity {
    fn name(&self) -> &str {
        match self {
            Identity::Local(user) => &user.name,
            Identity::Login(user) => user,
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<'_, S> {
    /// Implicit TLS (port 465): the handshake comes before the greeting,
    /// within the command timeout. False when it failed (already logged).
    async fn implicit_tls(&mut self) -> bool {
        let Some(tls) = &self.listener.tls else {
            return false;
        };
        let acceptor = tls.acceptor();
        let timeout = self.listener.limits.command_timeout;
        match tokio::time::timeout(timeout, self.stream.upgrade(&acceptor)).await {
            Ok(Ok(())) => {
                self.session.tls_from_start();
                true
            }
            Ok(Err(err)) => {
                info!(client = %self.client_label(), "TLS handshake failed: {err}");
                false
            }
            Err(_) => {
                info!(client = %self.client_label(), "TLS handshake not done within {timeout:?}");
                false
            }
        }
    }

    async fn run(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; READ_BUFFER];
        self.pregreet(&mut buf).await?;
        self.session.start();
        // The timeouts bound progress, not single reads: a client that
        // trickles a byte at a time cannot hold a session open. Progress is
        // a reply (a whole command was read) or a line's worth of message
        // data (`max_line_length` octets), as Postfix's per-record deadline.
        let mut deadline = Instant::now();
        let mut unproductive = 0usize;
        loop {
            let mut replied = false;
            while let Some(event) = self.session.next_event() {
                replied |= matches!(event, Event::Reply(_));
                if self.handle_event(event).await? {
                    self.flush().await?;
                    let _ = self.stream.shutdown().await;
                    return Ok(());
                }
            }
            self.flush().await?;
            let timeout = if self.session.in_message() {
                self.listener.limits.data_timeout
            } else {
                self.listener.limits.command_timeout
            };
            if replied || unproductive >= self.listener.limits.max_line_length {
                deadline = Instant::now() + timeout;
                unproductive = 0;
            }
            // A draining relay lets a transaction in progress finish, but
            // closes sessions that are between transactions.
            let mut draining = self.listener.draining.clone();
            let drain = async move {
                if draining.wait_for(|drain| *drain).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            let in_transaction = self.session.in_message() || self.session.transaction().has_mail();
            tokio::select! {
                read = tokio::time::timeout_at(deadline.into(), self.stream.read(&mut buf)) => match read {
                    Ok(Ok(0)) => return Ok(()),
                    Ok(Ok(n)) => {
                        unproductive += n;
                        self.session.feed(&buf[..n]);
                    }
                    Ok(Err(err)) => return Err(err),
                    Err(_) => {
                        info!(client = %self.client_label(), "timeout: no progress within {timeout:?}");
                        self.session.abort(Reply::new(
                            421,
                            "4.4.2",
                            format!("{} Timeout, closing connection", self.hostname()),
                        ));
                    }
                },
                () = drain, if !in_transaction => {
                    self.session.abort(Reply::new(
                        421,
                        "4.3.2",
                        format!("{} Service shutting down, try again later", self.hostname()),
                    ));
                }
            }
        }
    }

    /// Gives a client that talks before the greeting the chance to show it
    /// (RFC 5321 §4.3.1); bytes read are fed so `start` refuses them.
    async fn pregreet(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let pause = self.listener.limits.greet_pause;
        let read = if pause.is_zero() {
            futures::FutureExt::now_or_never(self.stream.read(buf))
        } else {
            tokio::time::timeout(pause, self.stream.read(buf))
                .await
                .ok()
        };
        if let Some(result) = read {
            let n = result?;
            if n > 0 {
                warn!(client = %self.client_label(), "client talked before the greeting");
                self.session.feed(&buf[..n]);
            }
        }
        Ok(())
    }

    /// Handles one event; true when the connection must close.
    async fn handle_event(&mut self, event: Event) -> std::io::Result<bool> {
        match event {
            Event::Reply(reply) => self.output.extend_from_slice(&reply.to_wire()),
            Event::Mail {
                reverse_path,
                params,
            } => {
                let verdict = self.check_mail(reverse_path.as_ref(), &params);
                self.session.decide(verdict);
            }
            Event::Rcpt {
                forward_path,
                params,
            } => self.check_rcpt(&forward_path, &params),
            Event::MessageStart => {
                let verdict = self.start_message().await;
                self.session.decide(verdict);
            }
            Event::MessageData(bytes) => self.write_message(&bytes).await,
            Event::MessageEnd => {
                // Replies already queued (pipelined) go out before the quorum wait.
                self.flush().await?;
                let reply = self.commit_message().await;
                self.session.decide(Verdict::Reply(reply));
            }
            Event::MessageAborted => {
                if let Some(message) = self.message.take() {
                    if let Some(incoming) = message.incoming {
                        incoming.abort().await;
                    }
                }
                Metrics::count(&self.listener.metrics.refused);
                info!(client = %self.client_label(), "message refused by the protocol checks");
            }
            Event::AuthExternal { authzid } => {
                let verdict = self.check_auth(&authzid);
                self.session.decide(verdict);
            }
            Event::AuthPassword { credentials } => {
                // Replies already queued go out before a slow check or delay.
                self.flush().await?;
                match self.check_password(&credentials).await {
                    Ok(verdict) => self.session.decide(verdict),
                    Err(closing) => self.session.abort(closing),
                }
            }
            Event::StartTls => {
                self.flush().await?;
                let Some(tls) = &self.listener.tls else {
                    return Ok(true);
                };
                let acceptor = tls.acceptor();
                match self.stream.upgrade(&acceptor).await {
                    Ok(()) => self.session.tls_started(),
                    Err(err) => {
                        info!(client = %self.client_label(), "TLS handshake failed: {err}");
                        return Ok(true);
                    }
                }
            }
            Event::Close => return Ok(true),
        }
        Ok(false)
    }

    /// AUTH EXTERNAL: the identity is the kernel's word on who connected;
    /// the client may only ask to be that user (or ask for nothing).
    fn check_auth(&mut self, authzid: &str) -> Verdict {
        let refusal = match (&self.peer, &self.listener.local) {
            (Peer::Local(user), Some(_)) if authzid.is_empty() || authzid == user.name => {
                info!(client = %self.peer, "authenticated by peer credentials");
                self.identity = Some(Identity::Local(user.clone()));
                return Verdict::Accept;
            }
            (Peer::Local(user), Some(_)) => {
                format!("You are {} (uid {}), not {authzid:?}", user.name, user.uid)
            }
            _ => "No peer credentials on this connection".to_owned(),
        };
        info!(client = %self.peer, authzid, "AUTH EXTERNAL refused: {refusal}");
        Verdict::Reply(Reply::new(535, "5.7.8", refusal))
    }

    /// AUTH PLAIN or LOGIN: the throttle first (a locked address or user
    /// is refused without its password being checked), then the password.
    /// `Err` is a 421 that closes the session.
    async fn check_password(&mut self, credentials: &Credentials) -> Result<Verdict, Reply> {
        let Some(auth) = self.listener.auth.as_deref() else {
            return Ok(Verdict::Reply(Reply::new(
                454,
                "4.7.0",
                "Temporary authentication failure",
            )));
        };
        let ip = self.peer.ip();
        let user = credentials.user.as_str();
        let mechanism = credentials.mechanism.name();
        let hostname = self.hostname().to_owned();
        let too_many = move || {
            Reply::new(
                421,
                "4.7.0",
                format!("{hostname} Error: too many failed authentications, try again later"),
            )
        };
        if auth.throttle.is_locked(ip, user, Instant::now()) {
            Metrics::count(&self.listener.metrics.auth_failures);
            warn!(
                "SASL {mechanism} authentication refused from {}: over auth.max_failures; user={user:?}",
                self.client_ip_label()
            );
            return Err(too_many());
        }
        match auth.check(credentials, ip).await {
            Ok(Checked::Valid { user }) => {
                auth.throttle.succeeded(&credentials.user);
                info!(client = %self.client_label(), user = %user, mechanism, "authenticated");
                self.identity = Some(Identity::Login(user));
                Ok(Verdict::Accept)
            }
            Ok(Checked::Invalid { reason }) => {
                Metrics::count(&self.listener.metrics.auth_failures);
                let failure = auth.throttle.failed(ip, user, Instant::now());
                // One line per failure, the address right after "from", for
                // fail2ban (deploy/fail2ban/); the user name quoted and escaped.
                warn!(
                    "SASL {mechanism} authentication failed from {}: user={user:?} failures={} reason={:?}",
                    self.client_ip_label(),
                    failure.count,
                    reason.as_deref().unwrap_or("invalid credentials")
                );
                tokio::time::sleep(failure.delay).await;
                if failure.locked {
                    return Err(too_many());
                }
                Ok(Verdict::Reply(Reply::new(
                    535,
                    "5.7.8",
                    "Authentication credentials invalid",
                )))
            }
            Err(err) => {
                warn!(client = %self.client_label(), "authentication unavailable: {err}");
                Ok(Verdict::Reply(Reply::new(
                    454,
                    "4.7.0",
                    "Temporary authentication failure",
                )))
            }
        }
    }

    fn check_mail(&self, reverse_path: Option<&Mailbox>, params: &MailParams) -> Verdict {
        if let (Some(auth), Some(Identity::Login(user))) = (&self.listener.auth, &self.identity) {
            if !auth.senders.may_send_as(user, reverse_path) {
                Metrics::count(&self.listener.metrics.refused);
                info!(client = %self.client_label(), user = %user, from = %path_label(reverse_path), "refused MAIL: not the user's sender (auth.senders)");
                return Verdict::Reply(Reply::new(
                    553,
                    "5.7.1",
                    format!(
                        "<{}>: Sender address rejected: not owned by user {user}; it may use {}",
                        reverse_path.map(Mailbox::address).unwrap_or_default(),
                        auth.senders.describe(user)
                    ),
                ));
            }
        }
        if let (Some(policy), Some(Identity::Local(user))) = (&self.listener.local, &self.identity)
        {
            if !policy.may_send_as(user, reverse_path) {
                Metrics::count(&self.listener.metrics.refused);
                info!(client = %self.peer, from = %path_label(reverse_path), "refused MAIL: not the user's own sender");
                return Verdict::Reply(Reply::new(
                    553,
                    "5.7.1",
                    format!(
                        "<{}>: user {} (uid {}) may only send as {}",
                        reverse_path.map(Mailbox::address).unwrap_or_default(),
                        user.name,
                        user.uid,
                        policy.describe(user)
                    ),
                ));
            }
        }
        if !self.within_rate(Limited::Messages) {
            Metrics::count(&self.listener.metrics.refused);
            info!(client = %self.client_label(), from = %path_label(reverse_path), "refused MAIL: over rate_limits.messages");
            return Verdict::Reply(Reply::new(
                450,
                "4.7.1",
                format!(
                    "Error: too much mail from {}, slow down",
                    self.rate_subject()
                ),
            ));
        }
        if let Err(err) = self.listener.spool.check_room(params.size.unwrap_or(0)) {
            info!(client = %self.client_label(), from = %path_label(reverse_path), "refused MAIL: {err}");
            return Verdict::Reply(Reply::new(452, "4.3.1", "Insufficient system storage"));
        }
        Verdict::Accept
    }

    /// Whether this client may do one more `what` under `[rate_limits]`:
    /// counted by its address (or local user), and a password user also by
    /// its name.
    fn within_rate(&self, what: Limited) -> bool {
        let trusted = self.listener.policy.is_trusted(self.peer.ip());
        let rates = self.listener.connections.rates();
        let by_login = match &self.identity {
            Some(Identity::Login(user)) => rates.allows_login(what, user),
            _ => true,
        };
        by_login && rates.allows(what, self.peer.limit_key(), trusted)
    }

    /// Who a rate refusal names: the user who logged in, the client's
    /// address, or the local user.
    fn rate_subject(&self) -> String {
        match (&self.peer, &self.identity) {
            (_, Some(Identity::Login(user))) => format!("user {user}"),
            (Peer::Tcp(addr), _) => addr.ip().to_string(),
            (_, Some(identity)) => format!("user {}", identity.name()),
            (peer, None) => peer.to_string(),
        }
    }

    /// The client's address alone, for fail2ban.
    fn client_ip_label(&self) -> String {
        self.peer
            .ip()
            .map_or_else(|| self.peer.to_string(), |ip| ip.to_string())
    }

    /// Answers a paused RCPT with the relay policy's decision.
    fn check_rcpt(&mut self, rcpt: &Mailbox, params: &RcptParams) {
        let decision =
            self.listener
                .policy
                .decide(self.peer.ip(), self.identity.is_some(), rcpt, params);
        if let Some(refusal) = decision.refusal(rcpt) {
            Metrics::count(&self.listener.metrics.refused);
            let why = match decision {
                RcptDecision::NoPostmaster => "postmaster mail, but policy.postmaster is not set",
                _ => "relay access denied",
            };
            info!(client = %self.client_label(), rcpt = %rcpt.address(), "refused RCPT: {why}");
            return self.session.decide(Verdict::Reply(refusal));
        }
        if !self.within_rate(Limited::Recipients) {
            Metrics::count(&self.listener.metrics.refused);
            info!(client = %self.client_label(), rcpt = %rcpt.address(), "refused RCPT: over rate_limits.recipients");
            return self.session.decide(Verdict::Reply(Reply::new(
                450,
                "4.7.1",
                format!(
                    "Error: too many recipients from {}, slow down",
                    self.rate_subject()
                ),
            )));
        }
        match decision {
            RcptDecision::Postmaster {
                forward_path,
                params,
            } => {
                info!(client = %self.client_label(), rcpt = %rcpt.address(), to = %forward_path.address(), "postmaster mail goes to policy.postmaster");
                self.session.accept_rcpt_as(forward_path, params);
            }
            _ => self.session.decide(Verdict::Accept),
        }
    }

    async fn start_message(&mut self) -> Verdict {
        let started = Instant::now();
        let mut incoming = match self.listener.spool.begin().await {
            Ok(incoming) => incoming,
            Err(err) => {
                info!(client = %self.client_label(), "refused message: {err}");
                return Verdict::Reply(spool_error_reply(&err));
            }
        };
        let transaction = self.session.transaction();
        let smtputf8 = transaction
            .mail
            .as_ref()
            .is_some_and(|(_, params)| params.smtputf8);
        let single_recipient = match transaction.rcpts.as_slice() {
            [(only, _)] => Some(only.address()),
            _ => None,
        };
        let tls = self.stream.tls_description();
        let header = received_header(&TraceInfo {
            helo: self.session.helo().unwrap_or(""),
            client_ip: self.peer.ip(),
            hostname: self.hostname(),
            esmtp: self.session.is_esmtp(),
            smtputf8,
            tls: tls.as_deref(),
            authenticated: self.identity.is_some(),
            local_user: match &self.identity {
                Some(Identity::Local(user)) => Some((user.name.as_str(), user.uid)),
                _ => None,
            },
            id: incoming.id(),
            single_recipient: single_recipient.as_deref(),
        });
        if let Err(err) = incoming.write(header.as_bytes()).await {
            info!(client = %self.client_label(), "refused message: {err}");
            incoming.abort().await;
            return Verdict::Reply(spool_error_reply(&err));
        }
        self.message = Some(MessageInProgress {
            incoming: Some(incoming),
            error: None,
            started,
            size: header.len() as u64,
        });
        Verdict::Accept
    }

    async fn write_message(&mut self, bytes: &[u8]) {
        let Some(message) = self.message.as_mut() else {
            return;
        };
        let Some(incoming) = message.incoming.as_mut() else {
            return;
        };
        message.size += bytes.len() as u64;
        if let Err(err) = incoming.write(bytes).await {
            // Keep reading to the end of the data, then answer with this error.
            if let Some(incoming) = message.incoming.take() {
                incoming.abort().await;
            }
            message.error = Some(err);
        }
    }

    async fn commit_message(&mut self) -> Reply {
        let Some(message) = self.message.take() else {
            return Reply::new(451, "4.3.0", "Internal error: no message in progress");
        };
        let (incoming, error) = (message.incoming, message.error);
        let Some(incoming) = incoming.filter(|_| error.is_none()) else {
            let err = error.unwrap_or(SpoolError::Io(std::io::Error::other("message lost")));
            info!(client = %self.client_label(), "refused message: {err}");
            return spool_error_reply(&err);
        };
        let end_of_data = Instant::now();
        let reply = self
            .settle(incoming, message.size, message.started.elapsed())
            .await;
        self.listener
            .metrics
            .ack_latency
            .observe(end_of_data.elapsed());
        reply
    }

    /// End of data: scanners, early delivery, then the quorum write of
    /// whatever is left to deliver; returns the reply.
    async fn settle(
        &mut self,
        mut incoming: Incoming,
        size: u64,
        receive_time: std::time::Duration,
    ) -> Reply {
        let mut envelope = self.envelope();
        let from = path_label(envelope.reverse_path.as_ref());
        let recipients = envelope.recipients.len();
        let early = self.listener.queue.as_ref().filter(|queue| {
            let deliverer = queue.deliverer();
            deliverer.has_early_routes()
                && envelope
                    .recipients
                    .iter()
                    .any(|r| deliverer.route(&r.address.domain).early_budget.is_some())
        });
        // Our own users' mail is signed; mail arriving from elsewhere is not.
        let dkim =
            self.listener.dkim.as_ref().filter(|_| {
                self.identity.is_some() || self.listener.policy.is_trusted(self.peer.ip())
            });
        if !self.listener.scanners.is_empty() || early.is_some() || dkim.is_some() {
            // Scanners, the signer and next hops read the spooled file itself.
            match incoming.write_out().await {
                Ok(len) => envelope.data_len = len,
                Err(err) => {
                    Metrics::count(&self.listener.metrics.refused);
                    info!(client = %self.client_label(), "refused message: {err}");
                    return spool_error_reply(&err);
                }
            }
            envelope.id = incoming.id().to_owned();
        }
        if !self.listener.scanners.is_empty() {
            let scanned = self
                .listener
                .scanners
                .run(
                    &mut envelope,
                    incoming.path(),
                    self.peer.ip(),
                    self.identity.as_ref().map(Identity::name),
                    &self.listener.session_config.hostname,
                    &self.listener.metrics,
                )
                .await;
            if let Err(reply) = scanned {
                Metrics::count(&self.listener.metrics.refused);
                incoming.abort().await;
                return reply;
            }
        }
        if let Some(keys) = dkim {
            let client = self.client_label();
            let metrics = &self.listener.metrics;
            sign(keys, &mut envelope, incoming.path(), metrics, &client).await;
        }
        let mut settled = EarlyOutcome::sort(Vec::new(), recipients);
        if let Some(queue) = early {
            let results = queue
                .deliverer()
                .attempt_early(&envelope, incoming.path())
                .await;
            settled = EarlyOutcome::sort(results, recipients);
            self.log_early(&envelope, &settled);
            if let Some(reply) = settled.all_refused() {
                Metrics::count(&self.listener.metrics.refused);
                incoming.abort().await;
                return reply;
            }
            // Every recipient settled: the refused ones get their DSN now.
            // (With recipients left, the refused ones are queued already
            // failed and the queue reports them with the others.)
            if settled.remaining.is_empty() && !settled.refused.is_empty() {
                if let Err(err) = queue.report_refused(&envelope, &settled.refused).await {
                    warn!(id = %envelope.id, "cannot queue the DSN for recipients refused early ({err}); queueing them instead");
                    settled.requeue_refused();
                }
            }
            if settled.remaining.is_empty() {
                incoming.abort().await;
                let last = settled.delivered.last().map(|r| r.outcome.reply().clone());
                return Reply::new(
                    250,
                    "2.0.0",
                    format!(
                        "Ok: delivered early as {} ({})",
                        envelope.id,
                        last.map(|reply| short(&reply)).unwrap_or_default()
                    ),
                );
            }
        }
        // Queued: the recipients still to deliver, and those refused early,
        // already failed, for the queue's DSN (delivered ones are left out).
        let refused: Vec<RefusedEarly> = settled
            .refused
            .iter()
            .map(|result| RefusedEarly {
                index: result.index,
                reply: short(result.outcome.reply()),
                remote: result.remote.clone(),
            })
            .collect();
        for _ in &refused {
            Metrics::count(&self.listener.metrics.bounced);
        }
        let Queued { kept, state } = lifecycle::accepted(&settled.remaining, &refused, now_ms());
        if kept.len() < recipients {
            envelope.recipients = kept
                .iter()
                .map(|&index| envelope.recipients[index].clone())
                .collect();
        }
        let result = incoming.commit(envelope.clone()).await;
        match result {
            Ok(committed) => {
                Metrics::count(&self.listener.metrics.accepted);
                info!(
                    id = %committed.id,
                    size,
                    from = %from,
                    recipients,
                    queued = envelope.recipients.len(),
                    client = %self.client_label(),
                    copies = ?committed.confirmed,
                    quorum_ms = committed.quorum_time.as_millis() as u64,
                    receive_ms = receive_time.as_millis() as u64,
                    "accepted"
                );
                let reply = Reply::new(250, "2.0.0", format!("Ok: queued as {}", committed.id));
                if let Some(queue) = &self.listener.queue {
                    envelope.id = committed.id;
                    envelope.spool = committed.spool;
                    envelope.data_len = committed.data_len;
                    envelope.data_sha256 = committed.data_sha256;
                    queue.submit_with_state(envelope, state);
                }
                reply
            }
            Err(err) => {
                Metrics::count(&self.listener.metrics.refused);
                warn!(client = %self.client_label(), from = %from, recipients, "refused message: {err}");
                spool_error_reply(&err)
            }
        }
    }

    fn log_early(&self, envelope: &Envelope, settled: &EarlyOutcome) {
        let metrics = &self.listener.metrics;
        for (result, verdict) in settled
            .delivered
            .iter()
            .map(|r| (r, "delivered early"))
            .chain(settled.refused.iter().map(|r| (r, "refused early")))
            .chain(
                settled
                    .deferred
                    .iter()
                    .map(|r| (r, "early delivery deferred, queueing")),
            )
        {
            let address = envelope.recipients[result.index].address.address();
            let reply = result.outcome.reply().to_string();
            let remote = result.remote.as_deref().unwrap_or("-");
            info!(id = %envelope.id, to = %address, relay = %remote, "{verdict}: {}", reply.trim_end());
        }
        for _ in &settled.delivered {
            Metrics::count(&metrics.delivered);
            Metrics::count(&metrics.delivered_early);
        }
        for _ in &settled.deferred {
            Metrics::count(&metrics.early_deferred);
        }
    }

    fn envelope(&self) -> Envelope {
        let transaction = self.session.transaction();
        let (reverse_path, mail_params) = transaction.mail.clone().unwrap_or_default();
        Envelope {
            version: ENVELOPE_VERSION,
            id: String::new(),
            spool: String::new(),
            reverse_path,
            mail_params,
            recipients: transaction
                .rcpts
                .iter()
                .map(|(address, params)| Recipient {
                    address: address.clone(),
                    params: params.clone(),
                })
                .collect(),
            client: ClientInfo {
                addr: self.client_label(),
                helo: self.session.helo().unwrap_or("").to_owned(),
                esmtp: self.session.is_esmtp(),
                tls: self.stream.tls_description(),
                auth: self.identity.as_ref().map(|identity| match identity {
                    Identity::Local(user) => format!("{} (uid {})", user.name, user.uid),
                    Identity::Login(user) => user.clone(),
                }),
            },
            listener: self.listener.name.clone(),
            received_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            data_len: 0,
            data_sha256: String::new(),
            added_headers: String::new(),
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if !self.output.is_empty() {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await?;
            self.output.clear();
        }
        Ok(())
    }

    fn hostname(&self) -> &str {
        &self.listener.session_config.hostname
    }

    fn client_label(&self) -> String {
        self.peer.to_string()
    }
}

/// A reply as one line of at most 200 characters, for logs, states and
/// our own replies that quote another server's.
/// Signs the spooled message with the keys for its `From:` domain; the
/// signatures go first in the added headers. A failure is logged and
/// counted, and the message goes out unsigned rather than not at all.
async fn sign(
    keys: &std::sync::Arc<crate::dkim::DkimKeys>,
    envelope: &mut Envelope,
    path: &std::path::Path,
    metrics: &Metrics,
    client: &str,
) {
    let keys = std::sync::Arc::clone(keys);
    let path = path.to_owned();
    let signed = tokio::task::spawn_blocking(move || {
        let message = std::fs::read(&path).map_err(|err| err.to_string())?;
        keys.sign(&message).map_err(|err| err.to_string())
    })
    .await
    .unwrap_or_else(|err| Err(err.to_string()));
    match signed {
        Ok(headers) => {
            metrics
                .dkim_signatures
                .fetch_add(headers.len() as u64, std::sync::atomic::Ordering::Relaxed);
            envelope.added_headers.insert_str(0, &headers.concat());
        }
        Err(err) => {
            Metrics::count(&metrics.dkim_failures);
            warn!(client = %client, id = %envelope.id, "DKIM signing failed, sending unsigned: {err}");
        }
    }
}

fn short(reply: &Reply) -> String {
    let text = reply.one_line();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

fn path_label(path: Option<&Mailbox>) -> String {
    path.map(|mailbox| mailbox.address())
        .unwrap_or_else(|| "<>".into())
}

/// The reply for a spool failure: 452 4.3.1 for lack of room, 451 4.3.0 otherwise.
fn spool_error_reply(err: &SpoolError) -> Reply {
    match err {
        SpoolError::NoRoom { .. } => Reply::new(452, "4.3.1", "Insufficient system storage"),
        SpoolError::QuorumFailed { .. } => Reply::new(
            451,
            "4.3.0",
            "Temporary failure: the message could not be stored durably, try again later",
        ),
        SpoolError::Io(_) => Reply::new(451, "4.3.0", "Temporary local problem, try again later"),
    }
}
