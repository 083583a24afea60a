//! Drives one SMTP session over a stream: reads, feeds the sans-I/O session,
//! answers its decisions (policy, spool, quorum) and writes its replies.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use super::received::{received_header, TraceInfo};
use super::tls::MaybeTls;
use super::Listener;
use crate::metrics::Metrics;
use crate::smtp::params::{MailParams, Mailbox};
use crate::smtp::{Event, Reply, Session, Verdict};
use crate::spool::envelope::{ClientInfo, Envelope, Recipient, ENVELOPE_VERSION};
use crate::spool::{Incoming, SpoolError};

/// Read buffer size; also bounds how much unprocessed input a session holds.
const READ_BUFFER: usize = 64 * 1024;

/// The message being received and what went wrong with it, if anything.
struct MessageInProgress {
    incoming: Option<Incoming>,
    error: Option<SpoolError>,
    started: Instant,
    /// Octets of `.eml` written, our trace header included.
    size: u64,
}

/// Runs a session on `stream` until it ends.
pub async fn handle<S>(listener: &Listener, stream: S, peer: Option<SocketAddr>)
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
    };
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
    peer: Option<SocketAddr>,
    session: Session,
    output: Vec<u8>,
    message: Option<MessageInProgress>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<'_, S> {
    async fn run(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; READ_BUFFER];
        self.pregreet(&mut buf).await?;
        self.session.start();
        loop {
            while let Some(event) = self.session.next_event() {
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
                read = tokio::time::timeout(timeout, self.stream.read(&mut buf)) => match read {
                    Ok(Ok(0)) => return Ok(()),
                    Ok(Ok(n)) => self.session.feed(&buf[..n]),
                    Ok(Err(err)) => return Err(err),
                    Err(_) => {
                        info!(client = %self.client_label(), "timeout after {timeout:?}");
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
            Event::Rcpt { forward_path, .. } => {
                let verdict = self.check_rcpt(&forward_path);
                self.session.decide(verdict);
            }
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
            Event::StartTls => {
                self.flush().await?;
                let Some(acceptor) = &self.listener.tls else {
                    return Ok(true);
                };
                match self.stream.upgrade(acceptor).await {
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

    fn check_mail(&self, reverse_path: Option<&Mailbox>, params: &MailParams) -> Verdict {
        if let Err(err) = self.listener.spool.check_room(params.size.unwrap_or(0)) {
            info!(client = %self.client_label(), from = %path_label(reverse_path), "refused MAIL: {err}");
            return Verdict::Reply(Reply::new(452, "4.3.1", "Insufficient system storage"));
        }
        Verdict::Accept
    }

    fn check_rcpt(&self, rcpt: &Mailbox) -> Verdict {
        let ip = self.peer.map(|peer| peer.ip());
        if self.listener.policy.may_relay(ip, false, rcpt) {
            Verdict::Accept
        } else {
            Metrics::count(&self.listener.metrics.refused);
            info!(client = %self.client_label(), rcpt = %rcpt.address(), "refused RCPT: relay access denied");
            Verdict::Reply(Reply::new(
                554,
                "5.7.1",
                format!("<{}>: Relay access denied", rcpt.address()),
            ))
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
            client_ip: self.peer.map(|peer| peer.ip()),
            hostname: self.hostname(),
            esmtp: self.session.is_esmtp(),
            smtputf8,
            tls: tls.as_deref(),
            authenticated: false,
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
        let mut envelope = self.envelope();
        let from = path_label(envelope.reverse_path.as_ref());
        let recipients = envelope.recipients.len();
        let receive_time = message.started.elapsed();
        let end_of_data = Instant::now();
        let result = incoming.commit(envelope.clone()).await;
        self.listener
            .metrics
            .ack_latency
            .observe(end_of_data.elapsed());
        match result {
            Ok(committed) => {
                Metrics::count(&self.listener.metrics.accepted);
                info!(
                    id = %committed.id,
                    size = message.size,
                    from = %from,
                    recipients,
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
                    queue.submit(envelope);
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
                auth: None,
            },
            listener: self.listener.name.clone(),
            received_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            data_len: 0,
            data_sha256: String::new(),
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
        self.peer
            .map(|peer| peer.to_string())
            .unwrap_or_else(|| "unix".into())
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
