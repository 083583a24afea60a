//! TLS for STARTTLS: loading the certificate and a stream that can be upgraded.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::watch::Reloading;

/// Builds a TLS acceptor from PEM files.
fn load_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|err| format!("{}: {err}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|err| format!("{}: {err}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|err| format!("{}: {err}", key.display()))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|err| format!("TLS certificate/key: {err}"))?;
    // The strongest suite both ends have, not the client's first choice.
    config.ignore_client_order = true;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A listener's certificate and key, re-read when the files change (looked
/// at no more than once a second, when a client starts TLS), so a renewed
/// certificate is served without a restart; files that do not load keep
/// the previous ones, with an error in the log.
#[derive(Debug)]
pub struct ServerTls(Reloading<TlsAcceptor>);

impl ServerTls {
    /// Loads the certificate chain and key (PEM files).
    pub fn load(cert: &Path, key: &Path) -> Result<ServerTls, String> {
        let first = load_acceptor(cert, key)?;
        let (cert, key) = (cert.to_owned(), key.to_owned());
        let paths = vec![cert.clone(), key.clone()];
        Ok(ServerTls(Reloading::new(first, paths, move || {
            load_acceptor(&cert, &key)
        })))
    }

    /// The acceptor to use now, re-read first if a file changed.
    pub fn acceptor(&self) -> TlsAcceptor {
        (*self.0.current()).clone()
    }
}

/// A stream that starts in plaintext and may switch to TLS.
pub enum MaybeTls<S> {
    /// Plaintext.
    Plain(S),
    /// After STARTTLS.
    Tls(Box<TlsStream<S>>),
    /// Between the two; any I/O fails.
    Upgrading,
}

impl<S: AsyncRead + AsyncWrite + Unpin> MaybeTls<S> {
    /// Runs the server handshake on a plaintext stream.
    pub async fn upgrade(&mut self, acceptor: &TlsAcceptor) -> io::Result<()> {
        match std::mem::replace(self, MaybeTls::Upgrading) {
            MaybeTls::Plain(stream) => {
                let tls = acceptor.accept(stream).await?;
                *self = MaybeTls::Tls(Box::new(tls));
                Ok(())
            }
            other => {
                *self = other;
                Err(io::Error::other("TLS already active"))
            }
        }
    }

    /// Protocol version and cipher suite, once TLS is active.
    pub fn tls_description(&self) -> Option<String> {
        let MaybeTls::Tls(stream) = self else {
            return None;
        };
        let (_, connection) = stream.get_ref();
        let version = connection
            .protocol_version()
            .map(|v| format!("{v:?}"))
            .unwrap_or_default();
        let cipher = connection
            .negotiated_cipher_suite()
            .map(|c| format!("{:?}", c.suite()))
            .unwrap_or_default();
        Some(format!("{version} with cipher {cipher}"))
    }
}

fn upgrading() -> io::Error {
    io::Error::other("stream is being upgraded to TLS")
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_flush(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            MaybeTls::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}
