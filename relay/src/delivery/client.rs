//! The SMTP/LMTP client transport: one connection to a next hop, over which
//! messages are sent one transaction at a time, straight from the spool file.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

use crate::config::{Protocol, TlsMode};
use crate::smtp::client::{mail_command, parse_reply, rcpt_command, Capabilities, DotStuffer};
use crate::smtp::Reply;
use crate::spool::envelope::Envelope;

/// Client timeouts (RFC 5321 §4.5.3.2).
#[derive(Debug, Clone)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Greeting, EHLO, MAIL, RCPT, RSET, QUIT replies.
    pub command: Duration,
    /// Reply to DATA.
    pub data_init: Duration,
    /// Each write of message data.
    pub data_block: Duration,
    /// Reply after the end of data.
    pub data_end: Duration,
}

/// How one recipient fared in one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// Accepted by the next hop (2xx after the data).
    Delivered(Reply),
    /// Try again later (4xx, or the connection failed).
    Deferred(Reply),
    /// Refused for good (5xx).
    Failed(Reply),
}

impl RcptOutcome {
    fn from_reply(reply: Reply) -> RcptOutcome {
        if reply.is_positive() {
            RcptOutcome::Delivered(reply)
        } else if reply.is_permanent() {
            RcptOutcome::Failed(reply)
        } else {
            RcptOutcome::Deferred(reply)
        }
    }

    /// The reply behind this outcome.
    pub fn reply(&self) -> &Reply {
        match self {
            RcptOutcome::Delivered(r) | RcptOutcome::Deferred(r) | RcptOutcome::Failed(r) => r,
        }
    }
}

/// Why a connection or transaction failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Network trouble: connect, read, write, timeout, TLS.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The server answered something unusable.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server refused the session (greeting, EHLO, STARTTLS, AUTH, MAIL).
    #[error("{0}")]
    Refused(Reply),
}

impl ClientError {
    /// The outcome every recipient of a transaction gets from this error.
    pub fn outcome(&self, host: &str) -> RcptOutcome {
        match self {
            ClientError::Refused(reply) => RcptOutcome::from_reply(reply.clone()),
            ClientError::Io(err) => {
                RcptOutcome::Deferred(Reply::new(451, "4.4.1", format!("{host}: {err}")))
            }
            ClientError::Protocol(what) => {
                RcptOutcome::Deferred(Reply::new(451, "4.5.0", format!("{host}: {what}")))
            }
        }
    }
}

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A TCP address, with the host name for TLS and logs.
    Tcp {
        /// Address.
        addr: SocketAddr,
        /// Name (MX host or next-hop host).
        name: String,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

impl Target {
    /// For logs and DSNs.
    pub fn label(&self) -> String {
        match self {
            Target::Tcp { addr, name } => format!("{name}[{}]", addr.ip()),
            Target::Unix(path) => format!("unix:{}", path.display()),
        }
    }
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Our EHLO/LHLO name.
    pub helo_name: String,
    /// SMTP or LMTP.
    pub protocol: Protocol,
    /// STARTTLS policy.
    pub tls: TlsMode,
    /// Client TLS configuration (verification per `tls`).
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// `(user, password)` for AUTH PLAIN, only over TLS.
    pub auth: Option<(String, String)>,
    /// Timeouts.
    pub timeouts: Timeouts,
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Closed,
}

/// An open session with a next hop, ready for a transaction.
pub struct Connection {
    stream: Stream,
    input: Vec<u8>,
    caps: Capabilities,
    settings: ClientSettings,
    label: String,
    /// Transactions completed on this connection.
    pub transactions: usize,
    /// How the last message's content went: `BDAT` or `DATA`.
    pub last_transfer: Option<&'static str>,
}

impl Connection {
    /// Connects, reads the greeting, says EHLO/LHLO, and upgrades to TLS as
    /// the policy asks.
    pub async fn open(
        target: &Target,
        settings: ClientSettings,
    ) -> Result<Connection, ClientError> {
        let stream = match target {
            Target::Tcp { addr, .. } => {
                let stream =
                    tokio::time::timeout(settings.timeouts.connect, TcpStream::connect(addr))
                        .await
                        .map_err(|_| {
                            io::Error::new(io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                let _ = stream.set_nodelay(true);
                Stream::Tcp(stream)
            }
            Target::Unix(path) => Stream::Unix(UnixStream::connect(path).await?),
        };
        let mut connection = Connection {
            stream,
            input: Vec::new(),
            caps: Capabilities::default(),
            settings,
            label: target.label(),
            transactions: 0,
            last_transfer: None,
        };
        let greeting = connection
            .read_reply(connection.settings.timeouts.command)
            .await?;
        if greeting.code != 220 {
            return Err(ClientError::Refused(greeting));
        }
        connection.hello().await?;
        let wants_tls = matches!(
            connection.settings.tls,
            TlsMode::Opportunistic | TlsMode::Required
        );
        if wants_tls && connection.caps.starttls && matches!(connection.stream, Stream::Tcp(_)) {
            connection.starttls(target).await?;
            connection.hello().await?;
        } else if connection.settings.tls == TlsMode::Required {
            return Err(ClientError::Refused(Reply::new(
                451,
                "4.7.5",
                format!(
                    "{}: TLS is required but STARTTLS is not offered",
                    connection.label
                ),
            )));
        }
        if let Some((user, password)) = connection.settings.auth.clone() {
            connection.authenticate(&user, &password).await?;
        }
        Ok(connection)
    }

    /// What the server offered.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The server's label, for logs and DSNs.
    pub fn label(&self) -> &str {
        &self.label
    }

    async fn hello(&mut self) -> Result<(), ClientError> {
        let verb = match self.settings.protocol {
            Protocol::Smtp => "EHLO",
            Protocol::Lmtp => "LHLO",
        };
        let command = format!("{verb} {}\r\n", self.settings.helo_name);
        self.write(command.as_bytes(), self.settings.timeouts.command)
            .await?;
        let reply = self.read_reply(self.settings.timeouts.command).await?;
        if reply.code == 250 {
            self.caps = Capabilities::from_ehlo(&reply);
            return Ok(());
        }
        if self.settings.protocol == Protocol::Lmtp || !reply.is_permanent() {
            return Err(ClientError::Refused(reply));
        }
        // An old server without ESMTP: HELO, no extensions.
        self.write(
            format!("HELO {}\r\n", self.settings.helo_name).as_bytes(),
            self.settings.timeouts.command,
        )
        .await?;
        let reply = self.read_reply(self.settings.timeouts.command).await?;
        if reply.code != 250 {
            return Err(ClientError::Refused(reply));
        }
        self.caps = Capabilities::default();
        Ok(())
    }

    async fn starttls(&mut self, target: &Target) -> Result<(), ClientError> {
        self.write(b"STARTTLS\r\n", self.settings.timeouts.command)
            .await?;
        let reply = self.read_reply(self.settings.timeouts.command).await?;
        if reply.code != 220 {
            if self.settings.tls == TlsMode::Required {
                return Err(ClientError::Refused(Reply::new(
                    451,
                    "4.7.5",
                    format!(
                        "{}: STARTTLS refused: {}",
                        self.label,
                        reply.to_string().trim_end()
                    ),
                )));
            }
            return Ok(());
        }
        if !self.input.is_empty() {
            // The server spoke out of turn (RFC 3207 §4.2 forbids it).
            return Err(ClientError::Protocol(
                "data after the STARTTLS reply".into(),
            ));
        }
        let Some(config) = self.settings.tls_config.clone() else {
            return Err(ClientError::Protocol("no TLS client configuration".into()));
        };
        let name = match target {
            Target::Tcp { name, addr } => rustls_pki_types::ServerName::try_from(name.clone())
                .unwrap_or_else(|_| rustls_pki_types::ServerName::IpAddress(addr.ip().into())),
            Target::Unix(_) => return Err(ClientError::Protocol("TLS over a Unix socket".into())),
        };
        let Stream::Tcp(tcp) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            return Err(ClientError::Protocol("TLS already active".into()));
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        let tls =
            tokio::time::timeout(self.settings.timeouts.command, connector.connect(name, tcp))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
                .map_err(|err| {
                    ClientError::Refused(Reply::new(
                        451,
                        "4.7.5",
                        format!("{}: TLS handshake failed: {err}", self.label),
                    ))
                })?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    async fn authenticate(&mut self, user: &str, password: &str) -> Result<(), ClientError> {
        if !matches!(self.stream, Stream::Tls(_)) {
            return Err(ClientError::Refused(Reply::new(
                451,
                "4.7.0",
                format!("{}: not sending credentials without TLS", self.label),
            )));
        }
        if !self.caps.auth.iter().any(|m| m == "PLAIN") {
            return Err(ClientError::Refused(Reply::new(
                451,
                "4.7.0",
                format!("{}: AUTH PLAIN not offered", self.label),
            )));
        }
        let token = crate::smtp::base64::encode(format!("\0{user}\0{password}").as_bytes());
        self.write(
            format!("AUTH PLAIN {token}\r\n").as_bytes(),
            self.settings.timeouts.command,
        )
        .await?;
        let reply = self.read_reply(self.settings.timeouts.command).await?;
        if reply.code != 235 {
            return Err(ClientError::Refused(reply));
        }
        Ok(())
    }

    /// Sends one message to `recipients` (indexes into `envelope.recipients`),
    /// reading the data from `data_path` with `prefix` (extra header lines) before it.
    /// Returns one outcome per recipient given, in order. A connection-level
    /// error is returned as `Err` (then no recipient was delivered by this call,
    /// except for LMTP replies already read, which are in the partial result).
    pub async fn send(
        &mut self,
        envelope: &Envelope,
        recipients: &[usize],
        data_path: &Path,
    ) -> Result<Vec<RcptOutcome>, (ClientError, Vec<Option<RcptOutcome>>)> {
        let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; recipients.len()];
        match self
            .transaction(envelope, recipients, data_path, &mut outcomes)
            .await
        {
            Ok(()) => Ok(outcomes
                .into_iter()
                .map(|o| {
                    o.unwrap_or_else(|| RcptOutcome::Deferred(Reply::new(451, "4.3.0", "no reply")))
                })
                .collect()),
            Err(err) => Err((err, outcomes)),
        }
    }

    async fn transaction(
        &mut self,
        envelope: &Envelope,
        recipients: &[usize],
        data_path: &Path,
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Result<(), ClientError> {
        let command = self.settings.timeouts.command;
        if self.transactions > 0 {
            self.write(b"RSET\r\n", command).await?;
            let reply = self.read_reply(command).await?;
            if !reply.is_positive() {
                return Err(ClientError::Refused(reply));
            }
        }
        self.transactions += 1;
        let caps = self.caps.clone();
        if envelope.mail_params.smtputf8 && !caps.smtputf8 {
            let reply = Reply::new(
                553,
                "5.6.7",
                format!(
                    "{} does not support SMTPUTF8, which this message needs",
                    self.label
                ),
            );
            outcomes
                .iter_mut()
                .for_each(|o| *o = Some(RcptOutcome::Failed(reply.clone())));
            return Ok(());
        }
        if let Some(limit) = caps
            .size
            .filter(|&limit| limit > 0 && envelope.wire_len() > limit)
        {
            let reply = Reply::new(
                552,
                "5.3.4",
                format!(
                    "{}: message of {} octets exceeds its limit of {limit}",
                    self.label,
                    envelope.wire_len()
                ),
            );
            outcomes
                .iter_mut()
                .for_each(|o| *o = Some(RcptOutcome::Failed(reply.clone())));
            return Ok(());
        }
        let reverse_path = envelope
            .reverse_path
            .as_ref()
            .map(|m| m.address())
            .unwrap_or_default();
        let mut group = mail_command(
            &reverse_path,
            &envelope.mail_params,
            envelope.wire_len(),
            &caps,
        )
        .into_bytes();
        let rcpt_commands: Vec<Vec<u8>> = recipients
            .iter()
            .map(|&index| {
                let rcpt = &envelope.recipients[index];
                rcpt_command(&rcpt.address.address(), &rcpt.params, &caps).into_bytes()
            })
            .collect();
        // With PIPELINING, MAIL and every RCPT go in one write (RFC 2920).
        let mail_reply = if caps.pipelining {
            for rcpt in &rcpt_commands {
                group.extend_from_slice(rcpt);
            }
            self.write(&group, command).await?;
            self.read_reply(command).await?
        } else {
            self.write(&group, command).await?;
            self.read_reply(command).await?
        };
        let mut accepted = Vec::new();
        for (position, rcpt) in rcpt_commands.iter().enumerate() {
            if !caps.pipelining {
                if !mail_reply.is_positive() {
                    break;
                }
                self.write(rcpt, command).await?;
            }
            let reply = self.read_reply(command).await?;
            if mail_reply.is_positive() {
                if reply.is_positive() {
                    accepted.push(position);
                } else {
                    outcomes[position] = Some(RcptOutcome::from_reply(reply));
                }
            }
        }
        if !mail_reply.is_positive() {
            let outcome = RcptOutcome::from_reply(mail_reply);
            outcomes.iter_mut().for_each(|o| *o = Some(outcome.clone()));
            return Ok(());
        }
        if accepted.is_empty() {
            return Ok(());
        }
        let final_replies = if caps.chunking {
            self.last_transfer = Some("BDAT");
            self.send_bdat(envelope, data_path).await?;
            self.read_final_replies(accepted.len()).await?
        } else {
            self.last_transfer = Some("DATA");
            self.write(b"DATA\r\n", command).await?;
            let reply = self.read_reply(self.settings.timeouts.data_init).await?;
            if reply.code != 354 {
                let outcome = RcptOutcome::from_reply(reply);
                accepted
                    .iter()
                    .for_each(|&p| outcomes[p] = Some(outcome.clone()));
                return Ok(());
            }
            self.send_data(
                envelope.added_headers.as_bytes(),
                data_path,
                envelope.data_len,
            )
            .await?;
            self.read_final_replies(accepted.len()).await?
        };
        for (position, reply) in accepted.iter().zip(final_replies) {
            outcomes[*position] = Some(RcptOutcome::from_reply(reply));
        }
        Ok(())
    }

    /// SMTP: one reply for all; LMTP: one per accepted recipient (RFC 2033).
    async fn read_final_replies(&mut self, accepted: usize) -> Result<Vec<Reply>, ClientError> {
        let timeout = self.settings.timeouts.data_end;
        match self.settings.protocol {
            Protocol::Smtp => {
                let reply = self.read_reply(timeout).await?;
                Ok(vec![reply; accepted])
            }
            Protocol::Lmtp => {
                let mut replies = Vec::with_capacity(accepted);
                for _ in 0..accepted {
                    replies.push(self.read_reply(timeout).await?);
                }
                Ok(replies)
            }
        }
    }

    /// BDAT LAST with the added headers and the file as one chunk: the
    /// spool is already wire format.
    async fn send_bdat(
        &mut self,
        envelope: &Envelope,
        data_path: &Path,
    ) -> Result<(), ClientError> {
        let len = envelope.data_len;
        let file = open_data(data_path, len).await?;
        let mut command = format!("BDAT {} LAST\r\n", envelope.wire_len()).into_bytes();
        command.extend_from_slice(envelope.added_headers.as_bytes());
        self.write(&command, self.settings.timeouts.data_block)
            .await?;
        if let Stream::Tcp(tcp) = &self.stream {
            // Plain TCP: the kernel copies the spool file to the socket.
            return sendfile_all(tcp, &file, len, self.settings.timeouts.data_block).await;
        }
        let mut file = tokio::fs::File::from_std(file).take(len);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            self.write(&buf[..n], self.settings.timeouts.data_block)
                .await?;
        }
        Ok(())
    }

    /// DATA content (`prefix`, then the file's first `len` octets: its
    /// data, not its seal), dot-stuffed on the fly.
    async fn send_data(
        &mut self,
        prefix: &[u8],
        data_path: &Path,
        len: u64,
    ) -> Result<(), ClientError> {
        let mut stuffer = DotStuffer::default();
        if len <= WHOLE_READ_MAX {
            // Small: opened, checked and read in one blocking call, sent in
            // one write.
            let data = read_data(data_path, len).await?;
            let mut out = Vec::with_capacity(prefix.len() + data.len() + data.len() / 64 + 8);
            stuffer.stuff(prefix, &mut out);
            stuffer.stuff(&data, &mut out);
            out.extend_from_slice(stuffer.finish());
            return self.write(&out, self.settings.timeouts.data_block).await;
        }
        let file = open_data(data_path, len).await?;
        let mut file = tokio::fs::File::from_std(file).take(len);
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(66 * 1024);
        if !prefix.is_empty() {
            stuffer.stuff(prefix, &mut out);
            self.write(&out, self.settings.timeouts.data_block).await?;
            out.clear();
        }
        loop {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            out.clear();
            stuffer.stuff(&buf[..n], &mut out);
            let chunk = std::mem::take(&mut out);
            self.write(&chunk, self.settings.timeouts.data_block)
                .await?;
            out = chunk;
        }
        self.write(stuffer.finish(), self.settings.timeouts.data_block)
            .await?;
        Ok(())
    }

    /// Ends the session politely.
    pub async fn quit(mut self) {
        if self
            .write(b"QUIT\r\n", Duration::from_secs(5))
            .await
            .is_ok()
        {
            let _ = self.read_reply(Duration::from_secs(5)).await;
        }
        let _ = self.shutdown().await;
    }

    async fn shutdown(&mut self) -> io::Result<()> {
        match &mut self.stream {
            Stream::Tcp(s) => s.shutdown().await,
            Stream::Unix(s) => s.shutdown().await,
            Stream::Tls(s) => s.shutdown().await,
            Stream::Closed => Ok(()),
        }
    }

    async fn write(&mut self, bytes: &[u8], timeout: Duration) -> Result<(), ClientError> {
        let stream = &mut self.stream;
        let result = tokio::time::timeout(timeout, async move {
            let mut io = StreamIo(stream);
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await;
        match result {
            Ok(result) => Ok(result?),
            Err(_) => Err(ClientError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                "write timed out",
            ))),
        }
    }

    async fn read_reply(&mut self, timeout: Duration) -> Result<Reply, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match parse_reply(&self.input) {
                Ok(Some((reply, used))) => {
                    self.input.drain(..used);
                    return Ok(reply);
                }
                Ok(None) => {}
                Err(err) => return Err(ClientError::Protocol(err.to_string())),
            }
            let mut buf = [0u8; 8192];
            let mut io = StreamIo(&mut self.stream);
            let n = tokio::time::timeout_at(deadline, io.read(&mut buf))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "timed out waiting for a reply")
                })??;
            if n == 0 {
                return Err(ClientError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                )));
            }
            self.input.extend_from_slice(&buf[..n]);
        }
    }
}

/// Messages up to this size are read whole and sent with one write.
const WHOLE_READ_MAX: u64 = 256 * 1024;

/// Blocking: opens the spool file at `path` and checks that it holds `len`
/// octets of data (its seal follows them).
fn open_checked(path: &Path, len: u64) -> Result<std::fs::File, ClientError> {
    let file = std::fs::File::open(path)?;
    let actual = file.metadata()?.len();
    if actual < len {
        return Err(ClientError::Protocol(format!(
            "spool file {} has {actual} octets, envelope says {len} of data",
            path.display()
        )));
    }
    Ok(file)
}

/// [`open_checked`] in one blocking call.
async fn open_data(path: &Path, len: u64) -> Result<std::fs::File, ClientError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || open_checked(&path, len))
        .await
        .map_err(std::io::Error::other)?
}

/// The first `len` octets of the spool file at `path` (its data), opened,
/// checked and read in one blocking call.
async fn read_data(path: &Path, len: u64) -> Result<Vec<u8>, ClientError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = open_checked(&path, len)?;
        let mut data = vec![0u8; len as usize];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut data, 0)?;
        Ok(data)
    })
    .await
    .map_err(std::io::Error::other)?
}

/// Sends `len` octets of `file` to `tcp` with sendfile(2), waiting for the
/// socket to be writable; each wait is bounded by `block_timeout`.
async fn sendfile_all(
    tcp: &TcpStream,
    file: &std::fs::File,
    len: u64,
    block_timeout: Duration,
) -> Result<(), ClientError> {
    use std::os::fd::AsRawFd;
    let mut offset: libc::off_t = 0;
    while (offset as u64) < len {
        tokio::time::timeout(block_timeout, tcp.writable())
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "write timed out"))??;
        let remaining = (len - offset as u64).min(1 << 30) as usize;
        let sent = tcp.try_io(tokio::io::Interest::WRITABLE, || {
            // SAFETY: both descriptors are open for the duration of the call and
            // `offset` is a valid pointer to our own variable.
            let n = unsafe {
                libc::sendfile(tcp.as_raw_fd(), file.as_raw_fd(), &mut offset, remaining)
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        });
        match sent {
            Ok(0) => {
                return Err(ClientError::Protocol(
                    "spool file shorter than its envelope says".into(),
                ));
            }
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => return Err(ClientError::Io(err)),
        }
    }
    Ok(())
}

/// Adapts `&mut Stream` to the tokio I/O traits.
struct StreamIo<'a>(&'a mut Stream);

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl AsyncRead for StreamIo<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut *self.get_mut().0 {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for StreamIo<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut *self.get_mut().0 {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self.get_mut().0 {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut *self.get_mut().0 {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Closed => Poll::Ready(Err(closed())),
        }
    }
}
