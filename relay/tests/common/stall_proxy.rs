//! A TCP proxy between a relay's coordinator and etcd that a test can stall,
//! to partition one member from etcd while the others go on.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy (TLS passes through it untouched). While cut it forwards
/// nothing in either direction and holds new connections, like a network
/// partition.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    /// `true` cuts the connection, `false` heals it.
    pub cut: Arc<watch::Sender<bool>>,
}

impl Proxy {
    /// Forwards connections on a new loopback port to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = Arc::new(watch::Sender::new(false));
        let switch = Arc::clone(&cut);
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let mut rx = switch.subscribe();
                tokio::spawn(async move {
                    if rx.wait_for(|cut| !cut).await.is_err() {
                        return;
                    }
                    let Ok(outbound) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (in_read, in_write) = inbound.into_split();
                    let (out_read, out_write) = outbound.into_split();
                    tokio::spawn(pump(in_read, out_write, rx.clone()));
                    tokio::spawn(pump(out_read, in_write, rx));
                });
            }
        });
        Proxy { addr, cut }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if cut.wait_for(|cut| !cut).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
