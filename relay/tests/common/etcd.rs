//! A real etcd server (Debian's `etcd-server`) for tests: on 127.0.0.1 with
//! free client and peer ports and a temp data dir.
//!
//! [`shared`] starts one per test binary, on first use; it is killed and its
//! directory removed when the process exits (and killed by the kernel if the
//! process dies). [`EtcdServer::start`] starts a private one for a test that
//! stops or kills it. A missing `etcd` binary fails the test, naming
//! `e2e/install-deps`; nothing is skipped.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where to find etcd, and what to run when it is missing.
const HINT: &str = "etcd is not installed: run `bash e2e/install-deps` (as root), \
                    which installs Debian's etcd-server";

/// TLS for a server: its certificate and key, and the CA whose client
/// certificates it requires (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM server certificate; it must name 127.0.0.1 and, because etcd 3.4's
    /// gateway presents it as a client certificate, allow client auth too.
    pub cert: PathBuf,
    /// PEM key of `cert`.
    pub key: PathBuf,
    /// PEM CA that signs the clients' certificates.
    pub client_ca: PathBuf,
    /// More flags for etcd.
    pub args: Vec<String>,
}

/// A running etcd.
#[derive(Debug)]
pub struct EtcdServer {
    /// `http://127.0.0.1:PORT` (`https://` with TLS), for clients.
    pub client_url: String,
    /// Its client port.
    pub client_port: u16,
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn etcd_binary() -> PathBuf {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| {
            let path = std::env::var_os("PATH")?;
            std::env::split_paths(&path)
                .map(|d| d.join("etcd"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("{HINT}"))
}

/// Spawns etcd with its data in `dir`; killed by the kernel if the thread
/// that spawned it ends (so spawn from a thread that outlives the use).
/// With `tls`, clients must use https and present a certificate, and
/// `/health` is served in plain http on `health_port` (otherwise on the
/// client port).
fn spawn(dir: &Path, client_port: u16, peer_port: u16, tls: Option<(&ServerTls, u16)>) -> Child {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let client = format!("{scheme}://127.0.0.1:{client_port}");
    let peer = format!("http://127.0.0.1:{peer_port}");
    let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
    let mut command = Command::new(etcd_binary());
    command
        .args(["--name", "postern-test"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("postern-test={peer}")])
        .args(["--initial-cluster-state", "new"])
        .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
    if let Some((tls, health_port)) = tls {
        command
            .arg("--cert-file")
            .arg(&tls.cert)
            .arg("--key-file")
            .arg(&tls.key)
            .arg("--trusted-ca-file")
            .arg(&tls.client_ca)
            .arg("--client-cert-auth")
            .args([
                "--listen-metrics-urls",
                &format!("http://127.0.0.1:{health_port}"),
            ])
            .args(&tls.args);
    }
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    command
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start etcd ({err}): {HINT}"))
}

/// Polls `/health` until etcd answers healthy.
fn wait_healthy(child: &mut Child, port: u16, dir: &Path) {
    let give_up = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let log = std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default();
            panic!("etcd exited during start-up ({status}):\n{log}");
        }
        if health(port) {
            return;
        }
        assert!(Instant::now() < give_up, "etcd not healthy within 30 s");
        // Polling a readiness condition, not waiting for an event we could observe.
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn health(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

impl EtcdServer {
    /// Starts a private etcd, killed when dropped. The spawning thread must
    /// outlive the server (true for the test's own thread).
    pub fn start() -> EtcdServer {
        let dir = tempfile::tempdir().unwrap();
        let (client_port, peer_port) = (free_port(), free_port());
        let mut child = spawn(dir.path(), client_port, peer_port, None);
        wait_healthy(&mut child, client_port, dir.path());
        EtcdServer {
            client_url: format!("http://127.0.0.1:{client_port}"),
            client_port,
            child: Some(child),
            dir: Some(dir),
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, …) to the server.
    pub fn signal(&self, signal: i32) {
        let pid = self.child.as_ref().expect("a private server").id();
        // SAFETY: kill(2) on our own child's pid.
        let rc = unsafe { libc::kill(pid as i32, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal})");
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

static SHARED_PID: AtomicI32 = AtomicI32::new(0);
static SHARED_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

extern "C" fn stop_shared() {
    let pid = SHARED_PID.swap(0, Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill and waitpid on the child this process started.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    }
    if let Ok(mut dir) = SHARED_DIR.lock() {
        if let Some(dir) = dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// The etcd shared by the tests of this binary (client URL), started once.
pub fn shared() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| start_shared(None))
}

/// Like [`shared`], with TLS and client certificates (`https://` URL); a
/// test binary uses one of the two. `tls` is only read by the first call.
pub fn shared_tls(tls: &ServerTls) -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| start_shared(Some(tls.clone())))
}

fn start_shared(tls: Option<ServerTls>) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    // Spawned from a thread that never ends: the kernel kills etcd when
    // the spawning thread exits, and a test's thread ends with the test.
    std::thread::spawn(move || {
        let dir = tempfile::tempdir().unwrap().keep();
        *SHARED_DIR.lock().unwrap() = Some(dir.clone());
        let (client_port, peer_port) = (free_port(), free_port());
        let health_port = if tls.is_some() {
            free_port()
        } else {
            client_port
        };
        let mut child = spawn(
            &dir,
            client_port,
            peer_port,
            tls.as_ref().map(|tls| (tls, health_port)),
        );
        SHARED_PID.store(child.id() as i32, Ordering::SeqCst);
        // SAFETY: registers a plain extern "C" function.
        unsafe { libc::atexit(stop_shared) };
        wait_healthy(&mut child, health_port, &dir);
        let scheme = if tls.is_some() { "https" } else { "http" };
        tx.send(format!("{scheme}://127.0.0.1:{client_port}"))
            .unwrap();
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("etcd did not start")
}
