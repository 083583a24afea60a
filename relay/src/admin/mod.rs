//! The admin gRPC API (`proto/admin.proto`): its server, one file per
//! service, and its command-line client `postern queue`.
//!
//! The server always listens on the Unix socket `<data_dir>/admin.sock` and
//! on TCP when `[admin] listen` is set. Anyone may connect to the socket;
//! every request on it is authorized from the caller's kernel-reported
//! credentials ([`access::AdminAccess`]): root, the relay's user, and
//! members of `[admin] group`.

pub mod access;
pub mod cli;
pub mod cluster;
pub mod queue_service;

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tonic::transport::Server;
use tracing::info;

/// The generated messages, client and server of `postern.admin.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    tonic::include_proto!("postern.admin.v1");
}

/// The largest answer an admin client takes (tonic's default is 4 MiB): a
/// listing of 100,000 queued messages is about 23 MB, of 1,000,000 about
/// 230 MB.
pub const MAX_RESPONSE_BYTES: usize = 1 << 30;

/// Binds the admin Unix socket at `path` with mode 0666 (who may use it is
/// decided per request from the caller's credentials).
///
/// A socket file left by a relay that died is removed; one that still
/// answers belongs to a running relay on the same data directory, which is
/// refused. The socket is bound under a temporary name and renamed into
/// place after its mode is set, so it is never reachable with a wider mode.
pub async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if tokio::net::UnixStream::connect(path).await.is_ok() {
        return Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!(
                "{} is in use: another relay runs on this data directory",
                path.display()
            ),
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => info!(socket = %path.display(), "removed a stale socket"),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let tmp = temp_name(path);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o666))
        .and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(err);
    }
    Ok(listener)
}

fn temp_name(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(format!(".{}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Serves the admin API on the Unix socket until `shutdown` resolves, then
/// removes the socket file (when it is still ours, at `path`). Each request
/// must pass `access`.
pub async fn serve_unix(
    listener: UnixListener,
    path: PathBuf,
    service: queue_service::QueueService,
    access: access::AdminAccess,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let result = Server::builder()
        .add_service(proto::queue_server::QueueServer::with_interceptor(
            service, access,
        ))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    result
}

/// Serves the admin API on TCP until `shutdown` resolves.
pub async fn serve_tcp(
    listener: TcpListener,
    service: queue_service::QueueService,
    tls: Option<std::sync::Arc<crate::peer::tls::MutualTls>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    match tls {
        Some(tls) => {
            router(service)
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await
        }
        None => {
            router(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await
        }
    }
}

fn router(service: queue_service::QueueService) -> tonic::transport::server::Router {
    Server::builder().add_service(proto::queue_server::QueueServer::new(service))
}
