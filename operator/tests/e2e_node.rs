//! The real-Kubernetes tier on a real node (issue 11): the control plane of
//! `e2e/kube/cluster` with kubelet, containerd, runc, CNI, kube-proxy,
//! kube-scheduler and a cluster DNS stand-in (`e2e/kube/node`); the chart's
//! operator and the relays run from the images `deploy/image/build` made.
//!
//! One scenario: `helm install` of charts/postern, a clustered MailQueue of
//! three relays (etcd, peer replicas, S3 on moto, all on the host and
//! reached through the node address), mail flowing through the SMTP Service
//! (its ClusterIP, through kube-proxy) at a steady rate, and on that load a
//! relay killed with SIGKILL, a scale-down whose operator is deleted midway,
//! and a rolling update of the configuration and then of the image. After
//! each step every acknowledged message is at the sink exactly once or is a
//! counted duplicate; none is lost.
//!
//! Nothing is skipped: a missing tool or image fails the test naming the
//! command that provides it.

mod kube_harness;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kube_harness::{eventually, http_get, repo_root, report, Cluster, Process, Sink};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const NS: &str = "mail";
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The second tag of the relay image, for the image roll.
const ROLLED_TAG: &str = "rollout";

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The image archives deploy/image/build wrote.
fn image_archive(name: &str) -> PathBuf {
    let dir = std::env::var_os("POSTERN_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target"))
                .join("image")
        });
    let path = dir.join(format!("{name}-{VERSION}.docker.tar"));
    assert!(
        path.is_file(),
        "{} is missing: build the images with `bash deploy/image/build` (e2e/run-tests does)",
        path.display()
    );
    path
}

/// A free port on the node address.
fn free_port_on(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port on the node address")
        .port()
}

fn wait_listening(addr: SocketAddr, process: &mut Process, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        if let Ok(Some(status)) = process.child.try_wait() {
            panic!("{what} exited ({status}):\n{}", process.log_tail(20));
        }
        assert!(
            Instant::now() < deadline,
            "{what} does not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// One HTTP/1.0 request with an empty body; the status code.
async fn http_request(addr: SocketAddr, method: &str, path: &str) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connects");
    stream
        .write_all(
            format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

// --- the load -------------------------------------------------------------

/// What one SMTP transaction of the load got.
#[derive(Debug, Clone)]
enum Outcome {
    /// 250 after the data: the relay owes this message.
    Acked,
    /// A reply refused it (the code), e.g. 421 from a draining relay.
    Refused(u16),
    /// The connection failed or broke (no reply to the data).
    Broken(String),
}

#[derive(Debug, Clone)]
struct Sent {
    marker: String,
    outcome: Outcome,
}

/// Steady SMTP load on the Service: `workers` sessions in a loop, each
/// message with a unique recipient `m<N>@example.net`.
struct Load {
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(target: SocketAddr, workers: usize, pause: Duration) -> Load {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let counter = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tasks = (0..workers)
            .map(|_| {
                let sent = sent.clone();
                let stop = stop.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let marker = format!("m{n}");
                        let outcome = match tokio::time::timeout(
                            Duration::from_secs(60),
                            smtp_send(target, &marker),
                        )
                        .await
                        {
                            Ok(outcome) => outcome,
                            Err(_) => Outcome::Broken("timed out".into()),
                        };
                        sent.lock().unwrap().push(Sent { marker, outcome });
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Load { sent, stop, tasks }
    }

    fn snapshot(&self) -> Vec<Sent> {
        self.sent.lock().unwrap().clone()
    }

    async fn stop(self) -> Vec<Sent> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        self.sent.lock().unwrap().clone()
    }
}

/// One message over SMTP (a small client: the relays are what is tested).
async fn smtp_send(target: SocketAddr, marker: &str) -> Outcome {
    let stream = match tokio::net::TcpStream::connect(target).await {
        Ok(stream) => stream,
        Err(err) => return Outcome::Broken(format!("connect: {err}")),
    };
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    async fn reply(read: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Result<u16, String> {
        loop {
            let mut line = String::new();
            match read.read_line(&mut line).await {
                Ok(0) => return Err("connection closed".into()),
                Ok(_) => {}
                Err(err) => return Err(err.to_string()),
            }
            if line.len() < 4 {
                return Err(format!("short reply {line:?}"));
            }
            if line.as_bytes()[3] == b' ' {
                return line[..3].parse().map_err(|_| format!("bad reply {line:?}"));
            }
        }
    }
    let body = format!(
        "From: load@e2e.test\r\nTo: {marker}@example.net\r\nSubject: load {marker}\r\nMessage-ID: <{marker}@e2e.test>\r\n\r\nPostern on a real node, message {marker}.\r\n.\r\n"
    );
    let steps: [(Option<String>, u16); 6] = [
        (None, 220),
        (Some("EHLO load.e2e.test\r\n".into()), 250),
        (Some("MAIL FROM:<load@e2e.test>\r\n".into()), 250),
        (Some(format!("RCPT TO:<{marker}@example.net>\r\n")), 250),
        (Some("DATA\r\n".into()), 354),
        (Some(body), 250),
    ];
    for (command, want) in steps {
        if let Some(command) = command {
            if let Err(err) = write.write_all(command.as_bytes()).await {
                return Outcome::Broken(err.to_string());
            }
        }
        match reply(&mut read).await {
            Ok(code) if code == want => {}
            Ok(code) => return Outcome::Refused(code),
            Err(err) => return Outcome::Broken(err),
        }
    }
    let _ = write.write_all(b"QUIT\r\n").await;
    Outcome::Acked
}

/// One delivered message as the sink stored it.
#[derive(Debug, Clone)]
struct Arrival {
    marker: String,
    /// The relay's spool id (the `id` of our Received header).
    spool_id: String,
    /// The delivering relay's pod IP.
    peer: String,
    time: f64,
}

fn arrivals(sink: &Sink) -> Vec<Arrival> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&sink.dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|ext| ext != "json") {
            continue;
        }
        let Ok(meta) =
            serde_json::from_str::<Value>(&std::fs::read_to_string(&path).unwrap_or_default())
        else {
            continue;
        };
        let eml = std::fs::read_to_string(path.with_extension("eml")).unwrap_or_default();
        let spool_id = eml
            .split("with ESMTP id ")
            .nth(1)
            .or_else(|| eml.split(" id ").nth(1))
            .map(|rest| {
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric())
                    .collect()
            })
            .unwrap_or_default();
        for rcpt in meta["rcpt_tos"].as_array().into_iter().flatten() {
            if let Some(marker) = rcpt.as_str().and_then(|r| r.strip_suffix("@example.net")) {
                out.push(Arrival {
                    marker: marker.to_owned(),
                    spool_id: String::clone(&spool_id),
                    peer: meta["peer"].as_str().unwrap_or_default().to_owned(),
                    time: meta["time"].as_f64().unwrap_or_default(),
                });
            }
        }
    }
    out
}

/// Counts of one step: what the clients saw and what reached the sink.
#[derive(Debug, Default)]
struct Tally {
    acked: usize,
    refused: BTreeMap<u16, usize>,
    broken: usize,
    /// What the first few broken transactions saw.
    broken_examples: BTreeSet<String>,
    lost: Vec<String>,
    duplicated: usize,
}

/// Waits until every message acknowledged in `range` of the load is at the
/// sink (or `timeout`), then counts.
async fn account(sink: &Sink, sent: &[Sent], timeout: Duration) -> Tally {
    let acked: BTreeSet<&str> = sent
        .iter()
        .filter(|s| matches!(s.outcome, Outcome::Acked))
        .map(|s| s.marker.as_str())
        .collect();
    let deadline = Instant::now() + timeout;
    let counts = loop {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for arrival in arrivals(sink) {
            *counts.entry(arrival.marker).or_default() += 1;
        }
        let missing = acked.iter().filter(|m| !counts.contains_key(**m)).count();
        if missing == 0 || Instant::now() >= deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let mut tally = Tally {
        acked: acked.len(),
        ..Tally::default()
    };
    for s in sent {
        match &s.outcome {
            Outcome::Acked => match counts.get(&s.marker) {
                None => tally.lost.push(s.marker.clone()),
                Some(n) if *n > 1 => tally.duplicated += n - 1,
                Some(_) => {}
            },
            Outcome::Refused(code) => *tally.refused.entry(*code).or_default() += 1,
            Outcome::Broken(why) => {
                tally.broken += 1;
                if tally.broken_examples.len() < 3 {
                    tally.broken_examples.insert(why.clone());
                }
            }
        }
    }
    tally
}

fn describe(tally: &Tally) -> String {
    format!(
        "{} acked, {} lost, {} duplicated; refused {:?}; {} connections broken or refused before a reply {:?}",
        tally.acked,
        tally.lost.len(),
        tally.duplicated,
        tally.refused,
        tally.broken,
        tally.broken_examples
    )
}

// --- the cluster ----------------------------------------------------------

/// Where two JSON values differ, as paths with both values.
fn json_diff(want: &Value, got: &Value, path: &str, out: &mut Vec<String>) {
    match (want, got) {
        (Value::Object(a), Value::Object(b)) => {
            for key in a.keys().chain(b.keys().filter(|k| !a.contains_key(*k))) {
                let null = Value::Null;
                json_diff(
                    a.get(key).unwrap_or(&null),
                    b.get(key).unwrap_or(&null),
                    &format!("{path}.{key}"),
                    out,
                );
            }
        }
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => {
            for (index, (x, y)) in a.iter().zip(b).enumerate() {
                json_diff(x, y, &format!("{path}[{index}]"), out);
            }
        }
        // 1 and 1.0 (the Rust types hold minimums as f64) are the same bound.
        (Value::Number(a), Value::Number(b)) if a.as_f64() == b.as_f64() => {}
        _ if want != got => out.push(format!("{path}: generated {want}, served {got}")),
        _ => {}
    }
}

/// Checks that an object is controlled by the MailQueue.
fn assert_owned(cluster: &Cluster, resource: &str, name: &str, mq_uid: &str) {
    let object = json(&cluster.kubectl(&["get", resource, name, "-n", NS, "-o", "json"]));
    let owners = object["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        owners.iter().any(|owner| owner["kind"] == "MailQueue"
            && owner["name"] == "mx"
            && owner["uid"] == mq_uid
            && owner["controller"] == true),
        "{resource}/{name} is not owned by MailQueue mx ({mq_uid}): {owners:?}"
    );
}

/// `kubectl get mq -n mail` columns of MailQueue `name` (with -o wide).
fn mq_columns(cluster: &Cluster, name: &str) -> BTreeMap<String, String> {
    let table = cluster.kubectl(&["get", "mailqueues", "-n", NS, "-o", "wide"]);
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    // Columns start where the header's words start.
    let starts: Vec<(usize, &str)> = header
        .match_indices(|c: char| !c.is_whitespace())
        .filter(|(i, _)| *i == 0 || header.as_bytes()[i - 1] == b' ')
        .map(|(i, _)| (i, header[i..].split_whitespace().next().unwrap()))
        .collect();
    let row = lines
        .find(|line| line.split_whitespace().next() == Some(name))
        .unwrap_or_default();
    let mut columns = BTreeMap::new();
    for (k, (start, title)) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map(|(s, _)| *s).unwrap_or(usize::MAX);
        let cell = row
            .get(*start..end.min(row.len()))
            .unwrap_or_default()
            .trim();
        columns.insert((*title).to_owned(), cell.to_owned());
    }
    columns
}

async fn until_mq(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    check: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    until_named_mq(cluster, "mx", what, timeout, check).await
}

async fn until_named_mq(
    cluster: &Cluster,
    name: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&BTreeMap<String, String>) -> bool,
) -> BTreeMap<String, String> {
    eventually(what, timeout, || async {
        let columns = mq_columns(cluster, name);
        if check(&columns) {
            Ok(columns)
        } else {
            Err(format!("{columns:?}"))
        }
    })
    .await
}

/// The relay pods: name → (IP, ready, uid).
fn relay_pods(cluster: &Cluster) -> BTreeMap<String, (String, bool, String)> {
    let pods = json(&cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        NS,
        "-l",
        "app.kubernetes.io/instance=mx",
        "-o",
        "json",
    ]));
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|pod| pod["metadata"]["deletionTimestamp"].is_null())
        .map(|pod| {
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (
                pod["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                (
                    pod["status"]["podIP"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    ready,
                    pod["metadata"]["uid"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                ),
            )
        })
        .collect()
}

/// The containerd id of a pod's first container.
fn container_id(cluster: &Cluster, pod: &str, namespace: &str) -> String {
    let pod = json(&cluster.kubectl(&["get", "pod", pod, "-n", namespace, "-o", "json"]));
    pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("containerd://"))
        .unwrap_or_else(|| panic!("no containerd id: {}", pod["status"]))
        .to_owned()
}

/// uid and gid of a container's process, as the kernel reports them.
fn process_ids(cluster: &Cluster, container: &str) -> (u32, String) {
    let tasks = cluster.ctr(&["tasks", "ls"]);
    let pid: u32 = tasks
        .lines()
        .find(|line| line.starts_with(container))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no task for {container}: {tasks}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned()
    };
    (
        pid,
        format!(
            "uid={} gid={} (pid {pid} on the node, {})",
            field("Uid:"),
            field("Gid:"),
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ")
                .trim()
        ),
    )
}

fn mailqueue_yaml(
    image: &str,
    node_ip: Ipv4Addr,
    ports: &HostPorts,
    max_recipients: u32,
) -> String {
    format!(
        r#"apiVersion: postern.dev/v1alpha1
kind: MailQueue
metadata:
  name: mx
  namespace: {NS}
spec:
  replicas: 3
  image: {image}
  imagePullPolicy: IfNotPresent
  listeners:
    - name: smtp
      port: 2525
      servicePort: 25
  trustedNetworks: ["10.0.0.0/8"]
  relayhost: "[{node_ip}]:{sink}"
  ackPolicy:
    copies: [local, peer, objectStore]
    required: 2
    peerReplicas: 1
    deadline: 30s
  objectStore:
    endpoint: http://{node_ip}:{s3}
    bucket: postern-e2e
    prefix: mx/
    region: us-east-1
    credentialsSecret: mx-s3
    allowHttp: true
  etcd:
    endpoints: ["http://{node_ip}:{etcd}"]
    peerSecret: mx-peer
  delivery:
    retrySchedule: ["1s"]
    maxAge: 1h
  limits:
    maxRecipients: {max_recipients}
  spool:
    size: 1Gi
  drainTimeout: 3m
"#,
        sink = ports.sink,
        s3 = ports.s3,
        etcd = ports.etcd,
    )
}

struct HostPorts {
    sink: u16,
    s3: u16,
    etcd: u16,
}

/// The operator pod holding the leader Lease.
fn operator_leader(cluster: &Cluster) -> String {
    let lease = json(&cluster.kubectl(&[
        "get",
        "lease",
        "postern-operator",
        "-n",
        "postern-system",
        "-o",
        "json",
    ]));
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Sets mx's ack policy to 2 of `copies` (a JSON list) and waits until its
/// STATUS column reads `status`.
async fn set_copies_until(cluster: &Cluster, copies: &str, status: &str) {
    let patch = format!(r#"{{"spec":{{"ackPolicy":{{"required":2,"copies":{copies}}}}}}}"#);
    cluster.kubectl(&[
        "patch",
        "mailqueue",
        "mx",
        "-n",
        NS,
        "--type=merge",
        "-p",
        &patch,
    ]);
    until_mq(
        cluster,
        &format!("STATUS {status}"),
        Duration::from_secs(120),
        |c| c.get("STATUS").map(String::as_str) == Some(status),
    )
    .await;
}

/// The StatefulSet's update and current revisions, updated and ready replicas.
fn revisions(cluster: &Cluster) -> (String, String, i64, i64) {
    let sts = json(&cluster.kubectl(&["get", "statefulset", "mx", "-n", NS, "-o", "json"]));
    let text = |key: &str| sts["status"][key].as_str().unwrap_or_default().to_owned();
    let count = |key: &str| sts["status"][key].as_i64().unwrap_or(0);
    (
        text("updateRevision"),
        text("currentRevision"),
        count("updatedReplicas"),
        count("readyReplicas"),
    )
}

/// Applies a MailQueue of two relays and waits until its StatefulSet rolled
/// to a new revision, both relays updated and ready.
async fn apply_and_roll(cluster: &Cluster, yaml: &str, what: &str) {
    let before = revisions(cluster);
    cluster.apply_yaml(yaml);
    eventually(what, Duration::from_secs(300), || async {
        let now = revisions(cluster);
        if now.0 != before.0 && now.0 == now.1 && now.2 == 2 && now.3 == 2 {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    })
    .await;
}

/// Waits until a relay's own /stats (at its pod IP) reports 3 or more
/// messages queued.
async fn wait_for_backlog(cluster: &Cluster, pod: &str) {
    eventually(
        &format!("a backlog on {pod}"),
        Duration::from_secs(60),
        || async {
            let ip: IpAddr = relay_pods(cluster)[pod].0.parse().unwrap();
            let (_, stats) = http_get(SocketAddr::new(ip, 9325), "/stats").await?;
            if json(&stats)["queue_depth"].as_u64().unwrap_or(0) >= 3 {
                Ok(())
            } else {
                Err(stats)
            }
        },
    )
    .await;
}

/// A pod's log with terminal colour codes taken out.
fn plain_log(cluster: &Cluster, pod: &str) -> String {
    let log = cluster.kubectl(&["logs", "-n", NS, pod]);
    let mut plain = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters, ending with a letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

/// The spool a relay joined the cluster with (its log's last "joining the
/// cluster" line).
fn joined_spool(cluster: &Cluster, pod: &str) -> String {
    let log = plain_log(cluster, pod);
    log.lines()
        .filter(|l| l.contains("joining the cluster"))
        .filter_map(|l| l.split("spool=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .next_back()
        .unwrap_or_else(|| panic!("{pod} logged no 'joining the cluster': {log}"))
        .to_owned()
}

/// Queued spool ids of a relay, from its own admin socket (`kubectl exec`).
fn queued_ids(cluster: &Cluster, pod: &str) -> BTreeSet<String> {
    let out = cluster.kubectl(&[
        "exec",
        "-n",
        NS,
        pod,
        "--",
        "postern",
        "queue",
        "list",
        "--json",
        "--config",
        "/etc/postern/postern.toml",
    ]);
    let value = json(&out);
    let items = value
        .as_array()
        .cloned()
        .or_else(|| value["messages"].as_array().cloned())
        .unwrap_or_default();
    items
        .iter()
        .filter_map(|m| m["id"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clustered_mailqueue_on_a_real_node() {
    let started = Instant::now();
    let relay_image = image_archive("postern");
    let operator_image = image_archive("postern-operator");
    let cluster = Cluster::start_with_node();
    let node_ip = cluster.node_ip();
    let version = json(&cluster.kubectl(&["version", "-o", "json"]));
    let node = json(&cluster.kubectl(&["get", "node", "postern-node", "-o", "json"]));
    report(&format!(
        "control plane {} at {}; node postern-node Ready: kubelet {}, {} (containerd), kube-proxy iptables, CNI bridge; cluster DNS is a stand-in: dnsmasq fed from the API (e2e/kube/dns-feed), not CoreDNS ({:.0?})",
        version["serverVersion"]["gitVersion"],
        cluster.server,
        node["status"]["nodeInfo"]["kubeletVersion"],
        node["status"]["nodeInfo"]["containerRuntimeVersion"],
        started.elapsed()
    ));

    // The images, as a registry would hand them to the node.
    cluster.import_images(&[&relay_image, &operator_image]);
    let relay_ref = format!("localhost/postern:{VERSION}");
    let rolled_ref = format!("localhost/postern:{ROLLED_TAG}");
    cluster.ctr(&["images", "tag", &relay_ref, &rolled_ref]);
    let images = cluster.ctr(&["images", "ls", "-q"]);
    for want in [&relay_ref, &format!("localhost/postern-operator:{VERSION}")] {
        assert!(
            images.lines().any(|l| l == want),
            "{want} not in containerd: {images}"
        );
    }
    for (name, path) in [
        ("postern", &relay_image),
        ("postern-operator", &operator_image),
    ] {
        report(&format!(
            "image localhost/{name}:{VERSION}: {:.1} MiB as an archive ({})",
            std::fs::metadata(path).unwrap().len() as f64 / 1048576.0,
            path.display()
        ));
    }

    // Host services the pods reach through the node address.
    let work = tempfile::Builder::new()
        .prefix("postern-node-e2e-")
        .disable_cleanup(std::env::var_os("POSTERN_KEEP_KUBE").is_some())
        .tempdir()
        .unwrap();
    let ports = HostPorts {
        sink: free_port_on(node_ip),
        s3: free_port_on(node_ip),
        etcd: free_port_on(node_ip),
    };
    let etcd_peer = free_port_on(Ipv4Addr::LOCALHOST);
    let mut etcd = Process::spawn(
        Command::new("etcd")
            .arg("--name=relays")
            .arg(format!("--data-dir={}", work.path().join("etcd").display()))
            .arg(format!(
                "--listen-client-urls=http://{node_ip}:{}",
                ports.etcd
            ))
            .arg(format!(
                "--advertise-client-urls=http://{node_ip}:{}",
                ports.etcd
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"
            ))
            .arg(format!(
                "--initial-cluster=relays=http://127.0.0.1:{etcd_peer}"
            )),
        work.path().join("etcd.log"),
    );
    wait_listening(
        SocketAddr::new(node_ip.into(), ports.etcd),
        &mut etcd,
        "etcd",
    );
    let mut moto = Process::spawn(
        Command::new("moto_server").args(["-H", &node_ip.to_string(), "-p", &ports.s3.to_string()]),
        work.path().join("moto.log"),
    );
    let s3_addr = SocketAddr::new(node_ip.into(), ports.s3);
    wait_listening(
        s3_addr,
        &mut moto,
        "moto_server (pip install 'moto[server]')",
    );
    assert_eq!(
        http_request(s3_addr, "PUT", "/postern-e2e").await,
        200,
        "bucket created"
    );
    let delay_file = work.path().join("sink-delay");
    let sink = Sink::start_with(
        SocketAddr::new(node_ip.into(), ports.sink),
        &work.path().join("sink"),
        &["--delay-file", delay_file.to_str().unwrap()],
    );
    let slow_sink = |seconds: f64| std::fs::write(&delay_file, seconds.to_string()).unwrap();
    report(&format!(
        "host services on the node address: etcd {node_ip}:{}, S3 (moto) {node_ip}:{}, the next hop (an aiosmtpd sink) {node_ip}:{}",
        ports.etcd, ports.s3, ports.sink
    ));

    // The chart, with its default images: the operator runs as its pod.
    let chart = repo_root().join("charts/postern");
    let helm_started = Instant::now();
    cluster.helm(&[
        "install",
        "postern",
        chart.to_str().unwrap(),
        "--namespace",
        "postern-system",
        "--create-namespace",
        "--set",
        "replicaCount=2",
        "--wait",
        "--timeout",
        "3m",
    ]);
    let deployment =
        json(&cluster.kubectl(&["get", "deployment", "-n", "postern-system", "-o", "json"]));
    let operator_image_used = deployment["items"][0]["spec"]["template"]["spec"]["containers"][0]
        ["image"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(
        operator_image_used,
        format!("localhost/postern-operator:{VERSION}")
    );
    let leader = eventually("an operator leader", Duration::from_secs(60), || async {
        let leader = operator_leader(&cluster);
        if leader.is_empty() {
            Err("no holder".into())
        } else {
            Ok(leader)
        }
    })
    .await;
    let operator_container = container_id(&cluster, &leader, "postern-system");
    let (_, operator_ids) = process_ids(&cluster, &operator_container);
    assert!(
        operator_ids.starts_with("uid=65532 gid=65532"),
        "{operator_ids}"
    );
    report(&format!(
        "helm install charts/postern --wait: {:.1?}; 2 operator pods from {operator_image_used}, leader {leader}: {operator_ids}",
        helm_started.elapsed()
    ));

    // The CRD as the chart installed it: kept on uninstall, served with the
    // generated schema, columns and subresources (1.20 drops what it does not
    // know without a word).
    let crd = json(&cluster.kubectl(&["get", "crd", "mailqueues.postern.dev", "-o", "json"]));
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"],
        "keep"
    );
    let generated = serde_json::to_value(postern_operator::crd::crd()).unwrap();
    for part in ["schema", "additionalPrinterColumns", "subresources"] {
        let mut differences = Vec::new();
        json_diff(
            &generated["spec"]["versions"][0][part],
            &crd["spec"]["versions"][0][part],
            part,
            &mut differences,
        );
        assert!(
            differences.is_empty(),
            "the CRD's {part} as served: {differences:#?}"
        );
    }
    let can_delete = cluster.kubectl_output(
        &cluster.kubeconfig,
        &[
            "auth",
            "can-i",
            "delete",
            "statefulsets",
            "-n",
            NS,
            "--as=system:serviceaccount:postern-system:postern",
        ],
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&can_delete.stdout).trim(),
        "no",
        "the operator's RBAC must not delete what it owns (garbage collection does)"
    );
    report("the MailQueue CRD is served with the generated schema, columns and subresources, kept on uninstall; the operator's ServiceAccount may not delete StatefulSets");

    // A clustered MailQueue.
    cluster.kubectl(&["create", "namespace", NS]);
    cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "mx-peer",
        "-n",
        NS,
        "--from-literal=secret=e2e-peer-secret-0123456789",
    ]);
    cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "mx-s3",
        "-n",
        NS,
        "--from-literal=AWS_ACCESS_KEY_ID=testing",
        "--from-literal=AWS_SECRET_ACCESS_KEY=testing",
    ]);
    let mq_started = Instant::now();
    cluster.apply_yaml(&mailqueue_yaml(&relay_ref, node_ip, &ports, 1000));
    let columns = until_mq(&cluster, "READY 3/3", Duration::from_secs(180), |c| {
        c.get("READY").map(String::as_str) == Some("3/3")
            && c.get("STATUS").map(String::as_str) == Some("RelaysReady")
    })
    .await;
    report(&format!(
        "MailQueue mx (3 relays, ack 2 of local/peer/objectStore, etcd, peer secret) READY {} in {:.1?}",
        columns["READY"],
        mq_started.elapsed()
    ));
    let mq = json(&cluster.kubectl(&["get", "mailqueue", "mx", "-n", NS, "-o", "json"]));
    let mq_uid = mq["metadata"]["uid"].as_str().unwrap().to_owned();
    for (resource, name) in [
        ("statefulset", "mx"),
        ("service", "mx"),
        ("service", "mx-peers"),
        ("configmap", "mx-config"),
        ("serviceaccount", "mx-relay"),
        ("poddisruptionbudgets.v1beta1.policy", "mx"),
    ] {
        assert_owned(&cluster, resource, name, &mq_uid);
    }
    let headers: Vec<String> = cluster
        .kubectl(&["get", "mq", "-n", NS, "-o", "wide"])
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        headers,
        ["NAME", "READY", "QUEUED", "OLDEST", "STATUS", "AGE", "IMAGE", "DRAINING"]
    );
    let pods = relay_pods(&cluster);
    let relay_container = container_id(&cluster, "mx-0", NS);
    let (_, relay_ids) = process_ids(&cluster, &relay_container);
    assert!(relay_ids.starts_with("uid=65532 gid=65532"), "{relay_ids}");
    report(&format!("relay mx-0 runs {relay_ids}"));
    // Spools on PersistentVolumes: each claim is bound to a node hostPath volume.
    let claims = json(&cluster.kubectl(&["get", "pvc", "-n", NS, "-o", "json"]));
    let bound: Vec<String> = claims["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["status"]["phase"] == "Bound")
        .map(|c| {
            format!(
                "{}→{}",
                c["metadata"]["name"].as_str().unwrap_or(""),
                c["spec"]["volumeName"].as_str().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(bound.len(), 3, "{claims}");
    // Peers find each other through cluster DNS (the headless Service).
    let peer_dns = Command::new("python3")
        .arg(repo_root().join("e2e/kube/dns-feed"))
        .args([
            "--resolve",
            &format!("mx-peers.{NS}.svc.cluster.local"),
            "--server",
        ])
        .arg(node_ip.to_string())
        .output()
        .unwrap();
    let peer_ips: BTreeSet<String> = String::from_utf8_lossy(&peer_dns.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let pod_ips: BTreeSet<String> = pods.values().map(|(ip, _, _)| ip.clone()).collect();
    assert_eq!(
        peer_ips, pod_ips,
        "mx-peers resolves to the relays' pod IPs"
    );
    let cluster_stats = cluster.kubectl(&[
        "exec",
        "-n",
        NS,
        "mx-0",
        "--",
        "postern",
        "queue",
        "stats",
        "--cluster",
        "--config",
        "/etc/postern/postern.toml",
    ]);
    // "Relays: mx-0, <peer>:9327, <peer>:9327": itself and both peers, found
    // through the headless Service.
    let relays: Vec<&str> = cluster_stats
        .lines()
        .find_map(|line| line.strip_prefix("Relays: "))
        .unwrap_or_default()
        .split(", ")
        .collect();
    assert_eq!(
        relays.len(),
        3,
        "queue stats --cluster reaches 3 relays: {cluster_stats}"
    );
    for peer in &relays[1..] {
        let ip = peer.rsplit_once(':').map(|(ip, _)| ip).unwrap_or(peer);
        assert!(
            pod_ips.contains(ip),
            "{peer} is not a relay pod: {cluster_stats}"
        );
    }
    assert!(!cluster_stats.contains("Not answering"), "{cluster_stats}");
    report(&format!(
        "claims {}; mx-peers.{NS}.svc.cluster.local → {peer_ips:?}; `postern queue stats --cluster` in mx-0 (kubectl exec) reaches all three relays over the peer channel",
        bound.join(", ")
    ));

    // Mail through the SMTP Service's ClusterIP (kube-proxy), from the host.
    let service = json(&cluster.kubectl(&["get", "service", "mx", "-n", NS, "-o", "json"]));
    let cluster_ip: IpAddr = service["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let target = SocketAddr::new(cluster_ip, 25);
    let load = Load::start(target, 4, Duration::from_millis(250));
    eventually(
        "mail flowing through the Service",
        Duration::from_secs(60),
        || async {
            let acked = load
                .snapshot()
                .iter()
                .filter(|s| matches!(s.outcome, Outcome::Acked))
                .count();
            let delivered = arrivals(&sink).len();
            if acked >= 20 && delivered >= 10 {
                Ok(())
            } else {
                Err(format!(
                    "{acked} acked, {delivered} delivered: {:?}",
                    load.snapshot().last()
                ))
            }
        },
    )
    .await;
    report(&format!(
        "steady load: 4 SMTP sessions in a loop to the Service {target} (ClusterIP via kube-proxy)"
    ));
    let mut step_start = load.snapshot().len();

    // Step 1: a relay killed. The sink is slowed first, so the relays hold a backlog.
    slow_sink(4.0);
    wait_for_backlog(&cluster, "mx-1").await;
    let dead_ids = queued_ids(&cluster, "mx-1");
    assert!(!dead_ids.is_empty(), "mx-1 has queued mail before it dies");
    let old_mx1 = relay_pods(&cluster)["mx-1"].clone();
    let old_spool = joined_spool(&cluster, "mx-1");
    let victim = container_id(&cluster, "mx-1", NS);
    let t_kill = now_unix();
    cluster.ctr(&["tasks", "kill", "-s", "SIGKILL", &victim]);
    cluster.kubectl(&[
        "delete",
        "pod",
        "mx-1",
        "-n",
        NS,
        "--grace-period=0",
        "--force",
    ]);
    slow_sink(0.0);
    let takeover = eventually(
        "a peer delivering mx-1's mail",
        Duration::from_secs(120),
        || async {
            arrivals(&sink)
                .into_iter()
                .filter(|a| dead_ids.contains(&a.spool_id) && a.time > t_kill)
                .min_by(|a, b| a.time.total_cmp(&b.time))
                .ok_or_else(|| format!("none of {} ids delivered yet", dead_ids.len()))
        },
    )
    .await;
    eventually("mx-1 back", Duration::from_secs(120), || async {
        match relay_pods(&cluster).get("mx-1") {
            Some((_, true, uid)) if *uid != old_mx1.2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let new_mx1_ip = relay_pods(&cluster)["mx-1"].0.clone();
    assert_ne!(takeover.peer, old_mx1.0, "the dead relay cannot deliver");
    let by_new_mx1 = arrivals(&sink)
        .iter()
        .filter(|a| dead_ids.contains(&a.spool_id) && a.peer == new_mx1_ip)
        .count();
    // The new mx-1 joined with a new spool; a peer took the old one over.
    let new_spool = joined_spool(&cluster, "mx-1");
    assert_ne!(new_spool, old_spool, "mx-1 came back with a new spool");
    // Whoever claims it first after the dead lease expires: a peer, or the
    // new mx-1 when it is back by then (an older spool of its own).
    let taken_by: Vec<&str> = ["mx-0", "mx-1", "mx-2"]
        .into_iter()
        .filter(|pod| {
            plain_log(&cluster, pod)
                .lines()
                .any(|l| l.contains("taking over spool") && l.contains(&old_spool))
        })
        .collect();
    assert_eq!(
        taken_by.len(),
        1,
        "one relay took spool {old_spool} over: {taken_by:?}"
    );
    let sent = load.snapshot();
    let tally = account(&sink, &sent[step_start..], Duration::from_secs(120)).await;
    assert!(tally.lost.is_empty(), "pod kill lost {:?}", tally.lost);
    report(&format!(
        "step 1, mx-1 killed (SIGKILL through containerd, pod force-deleted) with {} messages queued: the relay at {} delivered its first one {:.1} s after the kill; {} took its spool {old_spool} over; mx-1 came back on its claim with spool {new_spool} ({} of the dead relay's messages delivered by the new mx-1); {}",
        dead_ids.len(),
        takeover.peer,
        takeover.time - t_kill,
        taken_by[0],
        by_new_mx1,
        describe(&tally)
    ));
    step_start = sent.len();

    // Step 2: scale down, and the operator's leader deleted midway.
    slow_sink(3.0);
    wait_for_backlog(&cluster, "mx-2").await;
    let t_scale = Instant::now();
    cluster.kubectl(&["scale", "mq", "mx", "-n", NS, "--replicas=2"]);
    // QUEUED and OLDEST follow the relays' queues while mx-2 drains.
    let draining = until_mq(
        &cluster,
        "DRAINING mx-2 with mail queued",
        Duration::from_secs(60),
        |c| {
            c.get("DRAINING").is_some_and(|d| d.contains("mx-2"))
                && c.get("QUEUED")
                    .and_then(|q| q.parse::<u64>().ok())
                    .unwrap_or(0)
                    > 0
                && c.get("OLDEST").is_some_and(|o| !o.is_empty())
        },
    )
    .await;
    let old_leader = operator_leader(&cluster);
    cluster.kubectl(&[
        "delete",
        "pod",
        &old_leader,
        "-n",
        "postern-system",
        "--wait=false",
    ]);
    let new_leader = eventually(
        "a new operator leader",
        Duration::from_secs(120),
        || async {
            let leader = operator_leader(&cluster);
            if !leader.is_empty() && leader != old_leader {
                Ok(leader)
            } else {
                Err(leader)
            }
        },
    )
    .await;
    slow_sink(0.0);
    eventually(
        "mx-2 gone and the StatefulSet at 2",
        Duration::from_secs(240),
        || async {
            let sts = json(&cluster.kubectl(&["get", "statefulset", "mx", "-n", NS, "-o", "json"]));
            let pods = relay_pods(&cluster);
            if sts["spec"]["replicas"] == 2 && !pods.contains_key("mx-2") {
                Ok(())
            } else {
                Err(format!(
                    "replicas {}, pods {:?}",
                    sts["spec"]["replicas"],
                    pods.keys()
                ))
            }
        },
    )
    .await;
    let drain_time = t_scale.elapsed();
    let sent = load.snapshot();
    let tally = account(&sink, &sent[step_start..], Duration::from_secs(120)).await;
    assert!(tally.lost.is_empty(), "scale-down lost {:?}", tally.lost);
    let columns = until_mq(&cluster, "READY 2/2", Duration::from_secs(60), |c| {
        c.get("READY").map(String::as_str) == Some("2/2")
            && c.get("DRAINING").is_none_or(|d| d.is_empty())
    })
    .await;
    report(&format!(
        "step 2, kubectl scale mq mx --replicas=2 with mx-2 holding mail, and the operator leader {old_leader} deleted while mx-2 drained: {new_leader} took over and finished; drain time (scale → mx-2 gone) {drain_time:.1?}; while draining kubectl get mq showed READY {} QUEUED {} OLDEST {} DRAINING {}, then READY {}; {}",
        draining["READY"],
        draining["QUEUED"],
        draining["OLDEST"],
        draining["DRAINING"],
        columns["READY"],
        describe(&tally)
    ));
    step_start = sent.len();

    // Step 3: a rolling update, the configuration and then the image.
    let t_roll = Instant::now();
    let two = |image: &str| {
        mailqueue_yaml(image, node_ip, &ports, 500).replace("replicas: 3", "replicas: 2")
    };
    apply_and_roll(&cluster, &two(&relay_ref), "the configuration rolled").await;
    let config_roll = t_roll.elapsed();
    apply_and_roll(&cluster, &two(&rolled_ref), "the image rolled").await;
    let roll_time = t_roll.elapsed();
    until_mq(
        &cluster,
        "READY 2/2 after the roll",
        Duration::from_secs(60),
        |c| {
            c.get("READY").map(String::as_str) == Some("2/2")
                && c.get("IMAGE").map(String::as_str) == Some(rolled_ref.as_str())
        },
    )
    .await;
    let sent = load.stop().await;
    let tally = account(&sink, &sent[step_start..], Duration::from_secs(120)).await;
    assert!(
        tally.lost.is_empty(),
        "rolling update lost {:?}",
        tally.lost
    );
    let refused_other: Vec<u16> = tally
        .refused
        .keys()
        .copied()
        .filter(|c| *c != 421)
        .collect();
    report(&format!(
        "step 3, rolling update: configuration {config_roll:.1?}, then image localhost/postern:{ROLLED_TAG}, {roll_time:.1?} in all; {}{}",
        describe(&tally),
        if refused_other.is_empty() { String::new() } else { format!(" (replies other than 421: {refused_other:?})") }
    ));
    assert!(
        refused_other.is_empty(),
        "clients saw replies other than 421 during the roll: {:?}",
        tally.refused
    );

    // All of it, once more over the whole run.
    let tally = account(&sink, &sent, Duration::from_secs(60)).await;
    assert!(tally.lost.is_empty(), "lost {:?}", tally.lost);
    let columns = until_mq(&cluster, "QUEUED 0", Duration::from_secs(60), |c| {
        c.get("QUEUED").map(String::as_str) == Some("0")
    })
    .await;
    let mut accepted = 0.0;
    for (pod, (ip, _, _)) in relay_pods(&cluster) {
        let (code, metrics) = http_get(SocketAddr::new(ip.parse().unwrap(), 9325), "/metrics")
            .await
            .unwrap();
        assert_eq!(code, 200, "{pod} /metrics");
        let value = metrics
            .lines()
            .find_map(|l| l.strip_prefix("postern_messages_accepted_total "))
            .unwrap_or_else(|| panic!("{pod}: no postern_messages_accepted_total"));
        accepted += value.trim().parse::<f64>().unwrap();
    }
    report(&format!(
        "whole run: {}; kubectl get mq: READY {} QUEUED {} OLDEST {:?} STATUS {}; /metrics scraped from both relays' pod IPs (postern_messages_accepted_total {accepted} since their last start)",
        describe(&tally),
        columns["READY"],
        columns["QUEUED"],
        columns.get("OLDEST"),
        columns["STATUS"]
    ));
    // Faults a newcomer makes, each shown in STATUS with the operator running
    // on: an image that cannot be pulled, a peer Secret that does not exist,
    // an etcd nobody answers at (the relays still accept mail).
    let bad = |image: &str, peer_secret: &str, etcd_port: u16| {
        mailqueue_yaml(image, node_ip, &ports, 1000)
            .replace("name: mx\n", "name: bad\n")
            .replace("replicas: 3", "replicas: 1")
            .replace("peerSecret: mx-peer", &format!("peerSecret: {peer_secret}"))
            .replace(
                &format!("{node_ip}:{}\"", ports.etcd),
                &format!("{node_ip}:{etcd_port}\""),
            )
    };
    let closed_port = free_port_on(node_ip);
    let fault_started = Instant::now();
    cluster.apply_yaml(&bad("localhost/postern:no-such-tag", "mx-peer", ports.etcd));
    let image_fault = until_named_mq(
        &cluster,
        "bad",
        "STATUS ImagePullFailed",
        Duration::from_secs(120),
        |c| c.get("STATUS").map(String::as_str) == Some("ImagePullFailed"),
    )
    .await;
    cluster.apply_yaml(&bad(&relay_ref, "bad-peer-missing", ports.etcd));
    cluster.kubectl(&["delete", "pod", "bad-0", "-n", NS, "--wait=false"]);
    until_named_mq(
        &cluster,
        "bad",
        "STATUS PeerSecretMissing",
        Duration::from_secs(120),
        |c| c.get("STATUS").map(String::as_str) == Some("PeerSecretMissing"),
    )
    .await;
    let degraded = |cluster: &Cluster| {
        let mq = json(&cluster.kubectl(&["get", "mq", "bad", "-n", NS, "-o", "json"]));
        mq["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Degraded")
            .map(|c| format!("{}: {}", c["reason"], c["message"]))
            .unwrap_or_default()
    };
    let secret_message = degraded(&cluster);
    cluster.apply_yaml(&bad(&relay_ref, "mx-peer", closed_port));
    cluster.kubectl(&["delete", "pod", "bad-0", "-n", NS, "--wait=false"]);
    let etcd_fault = until_named_mq(
        &cluster,
        "bad",
        "STATUS EtcdUnreachable with the relay ready",
        Duration::from_secs(180),
        |c| {
            c.get("STATUS").map(String::as_str) == Some("EtcdUnreachable")
                && c.get("READY").map(String::as_str) == Some("1/1")
        },
    )
    .await;
    let bad_ip: IpAddr = json(&cluster.kubectl(&["get", "pod", "bad-0", "-n", NS, "-o", "json"]))
        ["status"]["podIP"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let (_, bad_stats) = http_get(SocketAddr::new(bad_ip, 9325), "/stats")
        .await
        .unwrap();
    let bad_stats = json(&bad_stats);
    assert_eq!(bad_stats["delivery"], "stalled", "{bad_stats}");
    assert_eq!(
        bad_stats["delivery_reason"], "etcd_unreachable",
        "{bad_stats}"
    );
    let (_, bad_metrics) = http_get(SocketAddr::new(bad_ip, 9325), "/metrics")
        .await
        .unwrap();
    assert!(
        bad_metrics.contains("postern_delivery_stalled{reason=\"etcd_unreachable\"} 1"),
        "{bad_metrics}"
    );
    assert!(
        matches!(
            smtp_send(SocketAddr::new(bad_ip, 2525), "stalled").await,
            Outcome::Acked
        ),
        "a relay that cannot reach etcd still accepts mail"
    );
    let operator_restarts =
        json(&cluster.kubectl(&["get", "pods", "-n", "postern-system", "-o", "json"]))["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                p["status"]["containerStatuses"][0]["restartCount"]
                    .as_i64()
                    .unwrap_or(0)
            })
            .sum::<i64>();
    assert_eq!(operator_restarts, 0, "the operator kept running");
    cluster.kubectl(&["delete", "mq", "bad", "-n", NS]);
    report(&format!(
        "faults in STATUS ({:.0?} for all three): an image that cannot be pulled → {} (READY {}); a missing peer Secret → PeerSecretMissing ({secret_message}); etcd unreachable → {} with READY {}, the relay's /stats delivery=stalled reason=etcd_unreachable, postern_delivery_stalled{{reason=\"etcd_unreachable\"}} 1, and it still answers 250; the operator never restarted",
        fault_started.elapsed(),
        image_fault["STATUS"],
        image_fault["READY"],
        etcd_fault["STATUS"],
        etcd_fault["READY"],
    ));

    // An invalid spec is reported and the operator goes on; fixed, it is ready.
    set_copies_until(&cluster, r#"["local"]"#, "InvalidSpec").await;
    set_copies_until(&cluster, r#"["local","peer","objectStore"]"#, "RelaysReady").await;
    // Deleting the MailQueue: garbage collection removes what it owned.
    cluster.kubectl(&["delete", "mailqueue", "mx", "-n", NS]);
    eventually("garbage collection", Duration::from_secs(120), || async {
        let out = cluster.kubectl(&[
            "get",
            "statefulsets,services,configmaps,serviceaccounts,poddisruptionbudgets.v1beta1.policy,pods",
            "-n",
            NS,
            "-l",
            "app.kubernetes.io/instance=mx",
            "-o",
            "name",
        ]);
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    report("an invalid spec shows STATUS InvalidSpec and is RelaysReady again once fixed; deleting the MailQueue garbage-collects its StatefulSet, Services, ConfigMap, ServiceAccount, PodDisruptionBudget and pods (the spool claims stay)");
    report("NOT like production here: one node (pod anti-affinity cannot spread relays; a node failure is not simulated), cluster DNS is dnsmasq fed from the API instead of CoreDNS, hostPath volumes instead of a storage provisioner, etcd/S3/the next hop run on the host instead of in the cluster, images come from containerd's store instead of a registry, Kubernetes 1.20 (Debian's source)");
    drop(etcd);
    drop(moto);
    let stopping = Instant::now();
    cluster.stop();
    report(&format!(
        "stopped the node and control plane in {:.0?}, nothing left behind (addresses, bridge, iptables, mounts, processes, kubelet's paths); tier done in {:.0?}",
        stopping.elapsed(),
        started.elapsed()
    ));
}
