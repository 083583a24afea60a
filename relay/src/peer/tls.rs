//! Mutual TLS on the peer channel and the TCP admin service: each end
//! presents a certificate issued by the configured CA (the cluster's, or the
//! admin CA) and talks only to an end that presents one too. A peer with no
//! certificate, one from another CA, or an expired one is refused in the
//! handshake, before any request is read, and the relay logs why.
//!
//! The files (`cluster.tls`, `admin.tls`: `cert_file`, `key_file`, `ca_file`, as
//! cert-manager writes `tls.crt`, `tls.key`, `ca.crt`) are looked at again
//! at most once a second when a connection is made, and re-read when one
//! changed, so a rotated certificate is used without a restart (a file that
//! does not load keeps the previous configuration, with a log line).
//!
//! Peers are dialled at resolved addresses, so a certificate is not checked
//! against the address dialled. With `member_name` set, every certificate —
//! the server's and the client's — must be valid for that one name (the peer
//! Service's): a certificate the same CA issued for another name is refused.
//! Without it, every certificate the CA issued is a member: then give the
//! cluster a CA of its own.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::config::MutualTlsFiles;
use crate::watch::Reloading;

/// How long a peer may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the files could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read or parsed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// rustls refused the certificates or key.
    #[error("peer TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The CA file holds no usable certificate.
    #[error("peer TLS CA: {0}")]
    Verifier(String),
}

/// Both ends' configurations, built from one reading of the files.
#[derive(Debug)]
struct Configs {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// Mutual TLS kept current with its files.
#[derive(Debug)]
pub struct MutualTls {
    configs: Reloading<Configs>,
}

fn file_error(path: &Path, reason: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|err| file_error(path, err))?
        .collect::<Result<_, _>>()
        .map_err(|err| file_error(path, err))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate found"));
    }
    Ok(certs)
}

fn build(files: &MutualTlsFiles) -> Result<Configs, TlsError> {
    let chain = certificates(&files.cert_file)?;
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|err| file_error(&files.key_file, err))?;
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.ca_file)? {
        roots
            .add(ca)
            .map_err(|err| file_error(&files.ca_file, err))?;
    }
    let roots = Arc::new(roots);
    let member_name = match &files.member_name {
        Some(name) => Some(
            ServerName::try_from(name.clone())
                .map_err(|err| TlsError::Verifier(format!("member_name {name:?}: {err}")))?,
        ),
        None => None,
    };
    let clients = WebPkiClientVerifier::builder(Arc::clone(&roots))
        .build()
        .map_err(|err| TlsError::Verifier(err.to_string()))?;
    let clients: Arc<dyn ClientCertVerifier> = match &member_name {
        Some(name) => Arc::new(NamedClients {
            inner: clients,
            name: name.clone(),
        }),
        None => clients,
    };
    let mut server = ServerConfig::builder()
        .with_client_cert_verifier(clients)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    // The strongest suite both ends have, not the client's first choice.
    server.ignore_client_order = true;
    let servers = WebPkiServerVerifier::builder(roots)
        .build()
        .map_err(|err| TlsError::Verifier(err.to_string()))?;
    let mut client = ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(MemberVerifier {
            inner: servers,
            name: member_name,
        }))
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Configs {
        server: Arc::new(server),
        client: Arc::new(client),
    })
}

impl MutualTls {
    /// Reads the files; an error names the file and what is wrong with it.
    pub fn load(files: &MutualTlsFiles) -> Result<Arc<MutualTls>, TlsError> {
        let first = build(files)?;
        let paths = vec![
            files.cert_file.clone(),
            files.key_file.clone(),
            files.ca_file.clone(),
        ];
        let files = files.clone();
        Ok(Arc::new(MutualTls {
            configs: Reloading::new(first, paths, move || {
                build(&files).map_err(|err| err.to_string())
            }),
        }))
    }

    /// The configurations to use now, re-read first if a file changed.
    fn current(&self) -> Arc<Configs> {
        self.configs.current()
    }

    /// A TLS connection to the peer at `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<TlsClientStream> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let connector = TlsConnector::from(Arc::clone(&self.current().client));
        let stream = connector
            .connect(ServerName::IpAddress(addr.ip().into()), tcp)
            .await?;
        Ok(TlsClientStream(Box::new(stream)))
    }

    /// A lazily connecting channel to the peer at `addr` over this TLS.
    pub fn channel(self: &Arc<Self>, endpoint: Endpoint, addr: SocketAddr) -> Channel {
        let tls = Arc::clone(self);
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let tls = Arc::clone(&tls);
            async move {
                let stream = tls.connect(addr).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
    }

    /// The connections `listener` accepts whose handshake succeeded, as a
    /// stream for the gRPC server; refused handshakes are logged with the
    /// peer's address and the reason. Each handshake runs on its own, so a
    /// slow one holds up nobody.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsServerStream>> {
        let (tx, rx) = mpsc::channel(64);
        let tls = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = tx.closed() => return,
                };
                let (tcp, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!("TLS listener: accept failed: {err}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = TlsAcceptor::from(Arc::clone(&tls.current().server));
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx
                                .send(Ok(TlsServerStream {
                                    inner: Box::new(stream),
                                    remote,
                                }))
                                .await;
                        }
                        Ok(Err(err)) => {
                            tracing::warn!(peer = %remote, reason = %refusal(&err), "TLS handshake refused");
                        }
                        Err(_) => {
                            tracing::warn!(peer = %remote, reason = "no handshake within 10 s", "TLS handshake refused");
                        }
                    }
                });
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// A handshake error in words an operator can act on.
fn refusal(err: &io::Error) -> String {
    let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return format!("cut short: {err}");
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "the peer presented no certificate".into(),
        rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
            "the peer's certificate is not from the configured CA".into()
        }
        rustls::Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "the peer's certificate has expired".into(),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
        ) => "the peer's certificate is not valid yet".into(),
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => "the peer's certificate is from the CA but not for the member name \
              (tls.member_name): another cluster's or service's certificate"
            .into(),
        rustls::Error::InvalidMessage(_) => format!("not TLS (plaintext?): {tls}"),
        other => other.to_string(),
    }
}

/// Checks a peer's server certificate against the cluster's CA and, with a
/// member name, that it is valid for that name instead of the address
/// dialled (see the module's comment).
#[derive(Debug)]
struct MemberVerifier {
    inner: Arc<WebPkiServerVerifier>,
    name: Option<ServerName<'static>>,
}

impl ServerCertVerifier for MemberVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(name) = &self.name {
            return self.inner.verify_server_cert(
                end_entity,
                intermediates,
                name,
                ocsp_response,
                now,
            );
        }
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Checks a client certificate against the CA (`inner`), then that it is
/// valid for the member name.
#[derive(Debug)]
struct NamedClients {
    inner: Arc<dyn ClientCertVerifier>,
    name: ServerName<'static>,
}

impl ClientCertVerifier for NamedClients {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_is_valid_for_subject_name(&self.name)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A peer connection the server accepted.
pub struct TlsServerStream {
    inner: Box<tokio_rustls::server::TlsStream<TcpStream>>,
    remote: SocketAddr,
}

/// A connection to a peer.
pub struct TlsClientStream(Box<tokio_rustls::client::TlsStream<TcpStream>>);

impl Connected for TlsServerStream {
    type ConnectInfo = SocketAddr;

    fn connect_info(&self) -> SocketAddr {
        self.remote
    }
}

macro_rules! delegate_io {
    ($type:ty, $($field:tt)+) => {
        impl AsyncRead for $type {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut *self.$($field)+).poll_read(cx, buf)
            }
        }

        impl AsyncWrite for $type {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut *self.$($field)+).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                Pin::new(&mut *self.$($field)+).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.$($field)+.is_write_vectored()
            }

            fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(&mut *self.$($field)+).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<io::Result<()>> {
                Pin::new(&mut *self.$($field)+).poll_shutdown(cx)
            }
        }
    };
}

delegate_io!(TlsServerStream, inner);
delegate_io!(TlsClientStream, 0);
