//! A private rspamd (Debian's `rspamd`) on loopback for the scanning tests,
//! started by e2e/rspamd-start (offline config, marker rules), and a
//! byte-counting TCP proxy that shows what crossed the socket to it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tempfile::TempDir;

use super::*;

/// Held while an rspamd starts: the first start compiles the shared
/// hyperscan cache (~10 s of CPU), the others then find it warm.
static STARTING: Mutex<()> = Mutex::new(());

/// A running rspamd; stopped (its whole process group) on drop.
pub struct Rspamd {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    child: Child,
    _work: TempDir,
}

impl Rspamd {
    pub fn start() -> Rspamd {
        require_tool("rspamd");
        let _starting = STARTING.lock().unwrap_or_else(|e| e.into_inner());
        let work = tempfile::Builder::new()
            .prefix("rspamd-e2e-")
            .tempdir()
            .unwrap();
        let dir = work.path().to_path_buf();
        let port = free_port();
        let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("rspamd-hs-cache");
        let child = Command::new("sh")
            .arg(repo_root().join("e2e/rspamd-start"))
            .arg(&dir)
            .arg(port.to_string())
            .env("RSPAMD_HS_CACHE_DIR", &cache)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut rspamd = Rspamd {
            addr,
            dir,
            child,
            _work: work,
        };
        let ready = wait_for(Duration::from_secs(90), || {
            if let Ok(Some(status)) = rspamd.child.try_wait() {
                panic!("rspamd exited at start ({status}); log:\n{}", rspamd.log());
            }
            let (status, body) = http_request(addr, "GET", "/ping", &[], b"").ok()?;
            (status == 200 && body.starts_with(b"pong")).then_some(())
        });
        assert!(
            ready.is_some(),
            "rspamd did not answer /ping; log:\n{}",
            rspamd.log()
        );
        rspamd
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("rspamd.log")).unwrap_or_default()
    }
}

impl Drop for Rspamd {
    fn drop(&mut self) {
        // SIGKILL to the main process alone leaves its workers serving the
        // port: stop the whole group, politely first.
        let group = -(self.child.id() as i32);
        // SAFETY: kill(2) with a negative pid signals our child's process group.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let stopped = wait_for(Duration::from_secs(3), || {
            self.child.try_wait().ok().flatten()
        });
        if stopped.is_none() {
            // SAFETY: as above.
            unsafe { libc::kill(group, libc::SIGKILL) };
            let _ = self.child.wait();
        }
    }
}

/// Forwards TCP connections to `target`, counting the octets clients sent.
pub struct CountingProxy {
    pub addr: SocketAddr,
    sent: Arc<AtomicU64>,
}

impl CountingProxy {
    pub fn start(target: SocketAddr) -> CountingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let counter = Arc::clone(&counter);
                let (mut client_in, mut server_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    while let Ok(n) = client_in.read(&mut buf) {
                        if n == 0 || server_out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        counter.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    let _ = server_out.shutdown(std::net::Shutdown::Write);
                });
                let (mut server_in, mut client_out) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut server_in, &mut client_out);
                    let _ = client_out.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        CountingProxy { addr, sent }
    }

    /// Octets clients have sent through the proxy so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::SeqCst)
    }
}
