//! The operator against a real Kubernetes API server: kube-apiserver and
//! kube-controller-manager 1.20.2 (Debian's source package, built by
//! e2e/kube/install) with Debian's etcd, the Helm chart installed with helm,
//! `postern-operator run` with the chart's ServiceAccount and RBAC, and real
//! `postern serve` relays run by a stand-in kubelet (tests/kube_harness).
//!
//! Missing tools fail these tests; they are never skipped.

mod kube_harness;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, Patch, PatchParams};
use kube_harness::*;
use serde_json::Value;

/// A StatefulSet shaped like the operator's (command, subPath ConfigMap
/// mount, spool claim, readiness on the `http` port), without the operator:
/// the harness itself against the real control plane.
const RELAY_STATEFULSET: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: relay-config}
data:
  postern.toml: |
    hostname = "relay.e2e"
    data_dir = "/var/lib/postern"
    [[listener]]
    name = "smtp"
    address = "0.0.0.0:2525"
    [http]
    listen = "0.0.0.0:9325"
    [policy]
    trusted_networks = ["127.0.0.0/8"]
    [delivery]
    relayhost = "127.0.0.1:9"
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: relay}
spec:
  serviceName: relay
  replicas: 2
  podManagementPolicy: Parallel
  selector: {matchLabels: {app: relay}}
  template:
    metadata: {labels: {app: relay}}
    spec:
      terminationGracePeriodSeconds: 20
      containers:
      - name: relay
        image: postern:dev
        command: [postern, serve, --config, /etc/postern/postern.toml]
        ports: [{name: smtp, containerPort: 2525}, {name: http, containerPort: 9325}]
        readinessProbe: {httpGet: {path: /readyz, port: http}}
        volumeMounts:
        - {name: spool, mountPath: /var/lib/postern}
        - {name: config, mountPath: /etc/postern/postern.toml, subPath: postern.toml}
      volumes:
      - name: config
        configMap: {name: relay-config}
  volumeClaimTemplates:
  - metadata: {name: spool}
    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}
"#;

/// The harness works on its own: a StatefulSet's pods get bound, run as real
/// relays, turn Ready, and are stopped gracefully on scale-down; deleting the
/// StatefulSet garbage-collects its pods.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_runs_a_statefulset_of_relays() {
    let cluster = Cluster::start();
    let client = cluster.client().await;
    let root = tempfile::tempdir().unwrap();
    let kubelet = Kubelet::start(client.clone(), "default", "app=relay", root.path()).await;
    cluster.apply_yaml(RELAY_STATEFULSET);
    let sets: Api<StatefulSet> = Api::namespaced(client.clone(), "default");
    eventually("2 ready replicas", Duration::from_secs(60), || async {
        let sts = sets.get("relay").await.map_err(|e| e.to_string())?;
        let ready = sts
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if ready == 2 {
            Ok(())
        } else {
            Err(format!(
                "ready {ready}; kubelet errors {:?}",
                kubelet.errors()
            ))
        }
    })
    .await;
    let pods = kubelet.pods();
    let relay0 = &pods["relay-0"];
    send_mail(relay0.ports["smtp"], "someone@example.org");
    let (code, body) = http_get(relay0.ports["http"], "/stats").await.unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"queue_depth\":1"), "{body}");

    sets.patch(
        "relay",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
    )
    .await
    .unwrap();
    eventually("relay-1 removed", Duration::from_secs(60), || async {
        let events = kubelet.events();
        let removed = events
            .iter()
            .any(|e| matches!(e, KubeletEvent::Removed { pod, .. } if pod == "relay-1"));
        if removed {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await;
    let events = kubelet.events();
    let position = |want: &str| {
        events.iter().position(|e| match (e, want) {
            (KubeletEvent::Terminating { pod, .. }, "terminating") => pod == "relay-1",
            (KubeletEvent::Exited { pod, .. }, "exited") => pod == "relay-1",
            (KubeletEvent::Removed { pod, .. }, "removed") => pod == "relay-1",
            _ => false,
        })
    };
    assert!(
        position("terminating") < position("exited") && position("exited") < position("removed"),
        "SIGTERM, exit, then removal: {events:?}"
    );
    cluster.kubectl(&["delete", "statefulset", "relay"]);
    eventually("pods gone", Duration::from_secs(60), || async {
        let out = cluster.kubectl(&["get", "pods", "-o", "name"]);
        if out.trim().is_empty() {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    assert!(kubelet.errors().is_empty(), "{:?}", kubelet.errors());
    kubelet.shutdown().await;
}

/// Prints the logs that explain a failure.
struct Diagnostics<'a> {
    cluster: &'a Cluster,
    operator_log: Option<std::path::PathBuf>,
    kubelet: Option<KubeletView>,
}

impl Drop for Diagnostics<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if let Some(log) = &self.operator_log {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!(
                "--- postern-operator log ---\n{}",
                lines[lines.len().saturating_sub(80)..].join("\n")
            );
        }
        if let Some(kubelet) = &self.kubelet {
            eprintln!("{}", kubelet.describe());
        }
        eprintln!(
            "--- kube-controller-manager ---\n{}",
            self.cluster.log_tail("kube-controller-manager", 20)
        );
        eprintln!(
            "--- kube-apiserver ---\n{}",
            self.cluster.log_tail("kube-apiserver", 20)
        );
        let objects = self.cluster.kubectl_output(
            &self.cluster.kubeconfig,
            &[
                "get",
                "mailqueues,statefulsets,pods,services,configmaps,events",
                "-n",
                "mail",
                "-o",
                "wide",
            ],
            None,
        );
        eprintln!(
            "--- objects ---\n{}",
            String::from_utf8_lossy(&objects.stdout)
        );
    }
}

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

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|err| panic!("not JSON ({err}): {text}"))
}

/// `kubectl get mailqueues -o wide` as column → value for one MailQueue
/// (kubectl aligns each column under its header; an empty value is blank).
fn mailqueue_columns(cluster: &Cluster, name: &str) -> (String, Vec<(String, String)>) {
    let table = cluster.kubectl(&["get", "mailqueues", "-n", "mail", "-o", "wide"]);
    (table.clone(), table_row(&table, name))
}

/// The row of `name` in a kubectl table, as (header, value) pairs.
fn table_row(table: &str, name: &str) -> Vec<(String, String)> {
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let mut starts = Vec::new();
    let mut previous = ' ';
    for (index, ch) in header.char_indices() {
        if ch != ' ' && previous == ' ' {
            starts.push(index);
        }
        previous = ch;
    }
    let Some(row) = lines.find(|line| line.split_whitespace().next() == Some(name)) else {
        return Vec::new();
    };
    starts
        .iter()
        .enumerate()
        .map(|(i, start)| {
            let end = starts.get(i + 1).copied().unwrap_or(usize::MAX);
            let cell = |text: &str| {
                text.get(*start..end.min(text.len()))
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            };
            (cell(header), cell(row))
        })
        .collect()
}

fn column(columns: &[(String, String)], name: &str) -> String {
    columns
        .iter()
        .find(|(header, _)| header == name)
        .map(|(_, value)| value.clone())
        .unwrap_or_default()
}

/// Waits until the MailQueue's printed columns satisfy `check`.
async fn until_columns(
    cluster: &Cluster,
    what: &str,
    timeout: Duration,
    check: impl Fn(&[(String, String)]) -> bool,
) -> Vec<(String, String)> {
    eventually(what, timeout, || async {
        let (table, columns) = mailqueue_columns(cluster, "mx");
        if check(&columns) {
            Ok(columns)
        } else {
            Err(table)
        }
    })
    .await
}

/// The owner reference of an object, checked to be the MailQueue's controller reference.
fn assert_owned(cluster: &Cluster, resource: &str, name: &str, mq_uid: &str) {
    let object = json(&cluster.kubectl(&["get", resource, name, "-n", "mail", "-o", "json"]));
    let owners = object["metadata"]["ownerReferences"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        owners.iter().any(|owner| owner["kind"] == "MailQueue"
            && owner["name"] == "mx"
            && owner["uid"] == mq_uid
            && owner["controller"] == true
            && owner["apiVersion"] == "postern.dev/v1alpha1"),
        "{resource}/{name} is not owned by MailQueue mx ({mq_uid}): {owners:?}"
    );
}

fn mailqueue_yaml(replicas: i32, relayhost: SocketAddr, relay_domains: &[&str]) -> String {
    format!(
        r#"apiVersion: postern.dev/v1alpha1
kind: MailQueue
metadata:
  name: mx
  namespace: mail
spec:
  replicas: {replicas}
  image: postern:e2e
  trustedNetworks: ["127.0.0.0/8"]
  relayDomains: {relay_domains:?}
  relayhost: "{relayhost}"
  delivery:
    retrySchedule: ["1s"]
    maxAge: 1h
  drainTimeout: 5m
"#
    )
}

/// The tier of issue 5: chart, operator, MailQueue, relays, columns, config
/// roll, drain before scale-down, garbage collection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mailqueue_on_a_real_kube_apiserver() {
    let started = Instant::now();
    let cluster = Cluster::start();
    let client = cluster.client().await;
    let mut diagnostics = Diagnostics {
        cluster: &cluster,
        operator_log: None,
        kubelet: None,
    };
    let version = json(&cluster.kubectl(&["version", "-o", "json"]));
    let server_version = version["serverVersion"]["gitVersion"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(server_version, format!("v{KUBE_VERSION}"));
    report(&format!(
        "control plane: etcd, kube-apiserver and kube-controller-manager {server_version} at {}",
        cluster.server
    ));

    // What this server serves, and so what the tier can and cannot check.
    let groups = cluster.kubectl(&["api-versions"]);
    let policy_v1 = groups.lines().any(|line| line == "policy/v1");
    let policy_v1beta1 = groups.lines().any(|line| line == "policy/v1beta1");
    assert!(
        !policy_v1 && policy_v1beta1,
        "a 1.20 server serves policy/v1beta1 only: {groups}"
    );

    // The chart: CRD (as a template), RBAC, ServiceAccount, Deployment.
    let chart = repo_root().join("charts/postern");
    cluster.helm(&[
        "install",
        "postern",
        chart.to_str().unwrap(),
        "--namespace",
        "postern-system",
        "--create-namespace",
    ]);
    eventually(
        "the MailQueue CRD established",
        Duration::from_secs(30),
        || async {
            let crd =
                json(&cluster.kubectl(&["get", "crd", "mailqueues.postern.dev", "-o", "json"]));
            let established = crd["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Established" && c["status"] == "True");
            if established {
                Ok(())
            } else {
                Err(crd["status"].to_string())
            }
        },
    )
    .await;
    let crd = json(&cluster.kubectl(&["get", "crd", "mailqueues.postern.dev", "-o", "json"]));
    assert_eq!(
        crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
        "the chart's CRD is kept on uninstall"
    );
    // The server keeps the whole schema and the columns (1.20 drops what it
    // does not know, such as CEL rules, without a word).
    let generated = serde_json::to_value(postern_operator::crd::crd()).unwrap();
    let served_version = &crd["spec"]["versions"][0];
    let generated_version = &generated["spec"]["versions"][0];
    for part in ["schema", "additionalPrinterColumns", "subresources"] {
        let mut differences = Vec::new();
        json_diff(
            &generated_version[part],
            &served_version[part],
            part,
            &mut differences,
        );
        assert!(
            differences.is_empty(),
            "the 1.20 server does not serve the CRD's {part} as generated: {differences:#?}"
        );
    }
    let uses_cel = generated.to_string().contains("x-kubernetes-validations");
    report("installed charts/postern with helm; the MailQueue CRD is established and served with the generated schema, printer columns and status/scale subresources");

    // The operator, as the chart's ServiceAccount (its least-privilege RBAC).
    let token = eventually(
        "the operator's ServiceAccount token",
        Duration::from_secs(30),
        || async {
            // 1.20's tokens controller puts a token Secret in the ServiceAccount.
            let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "postern-system");
            let secrets: Api<Secret> = Api::namespaced(client.clone(), "postern-system");
            let account = accounts.get("postern").await.map_err(|e| e.to_string())?;
            let secret = account
                .secrets
                .iter()
                .flatten()
                .find_map(|reference| reference.name.clone())
                .ok_or("no token Secret yet")?;
            let secret = secrets.get(&secret).await.map_err(|e| e.to_string())?;
            let token = secret
                .data
                .as_ref()
                .and_then(|data| data.get("token"))
                .ok_or("no token yet")?;
            Ok(String::from_utf8_lossy(&token.0).into_owned())
        },
    )
    .await;
    let operator_kubeconfig = cluster.token_kubeconfig("operator", &token, "postern-system");
    let can_i = cluster.kubectl_output(
        &operator_kubeconfig,
        &["auth", "can-i", "delete", "statefulsets", "-n", "mail"],
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&can_i.stdout).trim(),
        "no",
        "the operator's RBAC must not delete what it owns (garbage collection does)"
    );
    let operator_port = free_port();
    let work = tempfile::Builder::new()
        .prefix("postern-kube-e2e-")
        .disable_cleanup(std::env::var_os("POSTERN_KEEP_KUBE").is_some())
        .tempdir()
        .unwrap();
    let mut operator = Process::spawn(
        Command::new(env!("CARGO_BIN_EXE_postern-operator"))
            .arg("run")
            .arg(format!("--http=127.0.0.1:{operator_port}"))
            .arg("--lease-name=postern-operator")
            // Steady MailQueues refresh their queue columns this often.
            .arg("--resync=5s")
            .env("KUBECONFIG", &operator_kubeconfig)
            .env("POD_NAMESPACE", "postern-system")
            .env("POD_NAME", "postern-e2e-operator")
            .env("RUST_LOG", "info,postern_operator=debug"),
        work.path().join("operator.log"),
    );
    diagnostics.operator_log = Some(operator.log.clone());
    let health: SocketAddr = format!("127.0.0.1:{operator_port}").parse().unwrap();
    eventually(
        "the operator's /healthz",
        Duration::from_secs(30),
        || async {
            match http_get(health, "/healthz").await {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    eventually(
        "the operator holds the Lease",
        Duration::from_secs(30),
        || async {
            let lease = cluster.kubectl_output(
                &cluster.kubeconfig,
                &[
                    "get",
                    "lease",
                    "postern-operator",
                    "-n",
                    "postern-system",
                    "-o",
                    "json",
                ],
                None,
            );
            let text = String::from_utf8_lossy(&lease.stdout).into_owned();
            if text.contains("\"holderIdentity\": \"postern-e2e-operator\"") {
                Ok(())
            } else {
                Err(format!("{text}{}", String::from_utf8_lossy(&lease.stderr)))
            }
        },
    )
    .await;
    report("postern-operator runs with the chart's ServiceAccount and RBAC and holds the Lease");

    // A MailQueue, and a stand-in kubelet for its relays.
    cluster.kubectl(&["create", "namespace", "mail"]);
    // The chart's example is a clustered MailQueue (etcd, peerSecret, peer
    // copies): the 1.20 server's schema accepts it and fills in defaults.
    let example = repo_root().join("charts/postern/examples/mailqueue.yaml");
    let dry_run = json(&cluster.kubectl(&[
        "apply",
        "--dry-run=server",
        "-o",
        "json",
        "-f",
        example.to_str().unwrap(),
    ]));
    assert_eq!(dry_run["spec"]["etcd"]["peerSecret"], "mx-peer");
    assert_eq!(dry_run["spec"]["ackPolicy"]["copies"][2], "peer");
    assert_eq!(dry_run["spec"]["ackPolicy"]["peerReplicas"], 1);
    let example_text = std::fs::read_to_string(&example).unwrap();
    let rejected = cluster.kubectl_output(
        &cluster.kubeconfig,
        &["apply", "--dry-run=server", "-f", "-"],
        Some(&example_text.replace("peerReplicas: 1", "peerReplicas: 0")),
    );
    assert!(
        !rejected.status.success()
            && String::from_utf8_lossy(&rejected.stderr).contains("peerReplicas"),
        "peerReplicas below 1 must be rejected by the schema: {rejected:?}"
    );
    report("the 1.20 server accepts the chart's clustered example MailQueue (etcd.peerSecret, peer copies) and rejects peerReplicas 0");
    let kubelet = Kubelet::start(
        client.clone(),
        "mail",
        "app.kubernetes.io/managed-by=postern-operator",
        work.path(),
    )
    .await;
    diagnostics.kubelet = Some(kubelet.view());
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    cluster.apply_yaml(&mailqueue_yaml(2, sink_addr, &[]));
    let mq = json(&cluster.kubectl(&["get", "mailqueue", "mx", "-n", "mail", "-o", "json"]));
    let mq_uid = mq["metadata"]["uid"].as_str().unwrap().to_owned();

    eventually("the owned objects", Duration::from_secs(60), || async {
        let out = cluster.kubectl_output(
            &cluster.kubeconfig,
            &[
                "get",
                "statefulset/mx",
                "service/mx",
                "service/mx-peers",
                "configmap/mx-config",
                "serviceaccount/mx-relay",
                "poddisruptionbudgets.v1beta1.policy/mx",
                "-n",
                "mail",
                "-o",
                "name",
            ],
            None,
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    })
    .await;
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
    let peers = json(&cluster.kubectl(&["get", "service", "mx-peers", "-n", "mail", "-o", "json"]));
    assert_eq!(
        peers["spec"]["clusterIP"], "None",
        "the peer Service is headless"
    );
    let pdb = json(&cluster.kubectl(&[
        "get",
        "poddisruptionbudgets.v1beta1.policy",
        "mx",
        "-n",
        "mail",
        "-o",
        "json",
    ]));
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    report("MailQueue mx: StatefulSet, SMTP and headless peer Services, ConfigMap, ServiceAccount and a policy/v1beta1 PodDisruptionBudget appear, each with the MailQueue as controlling owner");

    // The relays run; Ready follows.
    let columns = until_columns(&cluster, "Ready 2/2", Duration::from_secs(90), |c| {
        column(c, "READY") == "2/2" && column(c, "STATUS") == "RelaysReady"
    })
    .await;
    let headers: Vec<&str> = columns.iter().map(|(h, _)| h.as_str()).collect();
    assert_eq!(
        headers,
        ["NAME", "READY", "QUEUED", "OLDEST", "STATUS", "AGE", "IMAGE", "DRAINING"],
        "kubectl get mailqueues -o wide prints the CRD's columns"
    );
    assert_eq!(column(&columns, "QUEUED"), "0");
    assert_eq!(column(&columns, "IMAGE"), "postern:e2e");
    let plain = cluster.kubectl(&["get", "mq", "-n", "mail"]);
    assert!(
        plain
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .collect::<Vec<_>>()
            == ["NAME", "READY", "QUEUED", "OLDEST", "STATUS", "AGE"],
        "{plain}"
    );
    report(&format!("kubectl get mq:\n{plain}"));
    let pods = kubelet.pods();
    assert_eq!(pods.len(), 2, "{pods:?}");
    let first_hash =
        json(&cluster.kubectl(&["get", "configmap", "mx-config", "-n", "mail", "-o", "json"]));
    let first_toml = first_hash["data"]["postern.toml"]
        .as_str()
        .unwrap()
        .to_owned();
    let started_hash = kubelet
        .events()
        .iter()
        .find_map(|e| match e {
            KubeletEvent::Started { config_hash, .. } => config_hash.clone(),
            _ => None,
        })
        .expect("relay pods carry the config hash");

    // Queued follows: mail for a next hop that is down stays queued.
    let mx0 = pods["mx-0"].clone();
    for n in 0..3 {
        send_mail(mx0.ports["smtp"], &format!("user{n}@example.net"));
    }
    let (_, stats) = http_get(mx0.ports["http"], "/stats").await.unwrap();
    assert!(stats.contains("\"queue_depth\":3"), "{stats}");
    let queued_at = Instant::now();
    let columns = until_columns(&cluster, "Queued 3", Duration::from_secs(45), |c| {
        column(c, "QUEUED") == "3" && !column(c, "OLDEST").is_empty()
    })
    .await;
    report(&format!(
        "3 messages queued on mx-0 (next hop down): QUEUED 3, OLDEST {} after {:.0?} (the operator reads /stats every --resync, 5 s here)",
        column(&columns, "OLDEST"),
        queued_at.elapsed()
    ));

    // An edit of the spec rolls the configuration.
    cluster.apply_yaml(&mailqueue_yaml(2, sink_addr, &["e2e.test"]));
    let config = eventually(
        "a new relay configuration",
        Duration::from_secs(30),
        || async {
            let cm = json(&cluster.kubectl(&[
                "get",
                "configmap",
                "mx-config",
                "-n",
                "mail",
                "-o",
                "json",
            ]));
            let toml = cm["data"]["postern.toml"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if toml != first_toml && toml.contains("e2e.test") {
                Ok(toml)
            } else {
                Err(toml)
            }
        },
    )
    .await;
    let sts = json(&cluster.kubectl(&["get", "statefulset", "mx", "-n", "mail", "-o", "json"]));
    let new_hash = sts["spec"]["template"]["metadata"]["annotations"]["postern.dev/config-hash"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(
        new_hash, started_hash,
        "the pod template's config hash changes"
    );
    eventually("both relays restarted with the new configuration", Duration::from_secs(120), || async {
        let pods = kubelet.pods();
        let events = kubelet.events();
        let rolled: Vec<&str> = ["mx-0", "mx-1"]
            .into_iter()
            .filter(|name| {
                events.iter().any(|e| matches!(e, KubeletEvent::Started { pod, config_hash: Some(hash), .. } if pod == name && *hash == new_hash))
                    && pods.get(*name).is_some_and(|p| p.ready && !p.terminating)
            })
            .collect();
        if rolled.len() == 2 {
            Ok(())
        } else {
            Err(format!("rolled {rolled:?}; {events:?}"))
        }
    })
    .await;
    for pod in kubelet.pods().values() {
        let run_config = pod.log.with_file_name("postern.toml");
        let text = std::fs::read_to_string(&run_config).unwrap();
        assert!(
            text.contains("e2e.test"),
            "{}: {text}",
            run_config.display()
        );
    }
    assert!(config.contains("e2e.test"));
    let columns = until_columns(
        &cluster,
        "Ready 2/2 after the roll, still 3 queued",
        Duration::from_secs(100),
        |c| column(c, "READY") == "2/2" && column(c, "QUEUED") == "3",
    )
    .await;
    let mq = json(&cluster.kubectl(&["get", "mailqueue", "mx", "-n", "mail", "-o", "json"]));
    assert_eq!(
        mq["status"]["observedGeneration"],
        mq["metadata"]["generation"]
    );
    report(&format!(
        "spec edit: new ConfigMap, config hash {started_hash} → {new_hash}, both relays restarted with it (gracefully, one at a time); READY {} QUEUED {} (the spool outlived the pods)",
        column(&columns, "READY"),
        column(&columns, "QUEUED")
    ));

    // Scale-down drains before it removes: mx-1 holds mail while the next hop is down.
    let mx1 = kubelet.pods()["mx-1"].clone();
    for n in 0..2 {
        send_mail(mx1.ports["smtp"], &format!("late{n}@example.net"));
    }
    let before_scale = kubelet.events().len();
    let mx1_stopped = |events: &[KubeletEvent]| {
        events[before_scale..]
            .iter()
            .any(|e| matches!(e, KubeletEvent::Terminating { pod, .. } if pod == "mx-1"))
    };
    cluster.kubectl(&["scale", "mailqueue", "mx", "-n", "mail", "--replicas=1"]);
    eventually("mx-1 marked draining", Duration::from_secs(30), || async {
        let pod = json(&cluster.kubectl(&["get", "pod", "mx-1", "-n", "mail", "-o", "json"]));
        let label = &pod["metadata"]["labels"]["postern.dev/traffic"];
        let since = &pod["metadata"]["annotations"]["postern.dev/draining-since"];
        if label == "drain" && since.is_string() {
            Ok(())
        } else {
            Err(pod["metadata"].to_string())
        }
    })
    .await;
    // Out of the SMTP Service: its selector wants traffic=serve. (The
    // Endpoints themselves cannot be checked: the API server refuses loopback
    // addresses in Endpoints, and the pod IPs here are loopback.)
    let smtp = json(&cluster.kubectl(&["get", "service", "mx", "-n", "mail", "-o", "json"]));
    assert_eq!(smtp["spec"]["selector"]["postern.dev/traffic"], "serve");
    let columns = until_columns(&cluster, "Draining mx-1", Duration::from_secs(30), |c| {
        column(c, "DRAINING").contains("mx-1")
    })
    .await;
    // While its queue is not empty, mx-1 stays.
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(15) {
        let sts = json(&cluster.kubectl(&["get", "statefulset", "mx", "-n", "mail", "-o", "json"]));
        assert_eq!(sts["spec"]["replicas"], 2, "lowered before mx-1 drained");
        assert!(
            !mx1_stopped(&kubelet.events()),
            "mx-1 stopped before its queue drained"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    report(&format!(
        "scale to 1: mx-1 is labelled postern.dev/traffic=drain (out of the SMTP Service), DRAINING {}, and kept for 15 s while its queue holds mail",
        column(&columns, "DRAINING")
    ));
    // The next hop comes up: the queues empty, then mx-1 goes.
    let sink = Sink::start(sink_addr, &work.path().join("sink"));
    let delivered_before = eventually(
        "mx-1 stopped after draining",
        Duration::from_secs(120),
        || async {
            let delivered = sink.recipients();
            if mx1_stopped(&kubelet.events()) {
                Ok(delivered)
            } else {
                Err(format!("sink has {delivered:?}"))
            }
        },
    )
    .await;
    for late in ["late0@example.net", "late1@example.net"] {
        assert!(
            delivered_before.iter().any(|r| r == late),
            "mx-1 was stopped before its message to {late} was delivered: {delivered_before:?}; kubelet events since the scale-down: {:?}",
            &kubelet.events()[before_scale..]
        );
    }
    eventually(
        "all 5 messages delivered",
        Duration::from_secs(30),
        || async {
            let count = sink.count();
            if count == 5 {
                Ok(())
            } else {
                Err(format!("{count}"))
            }
        },
    )
    .await;
    let columns = until_columns(
        &cluster,
        "Ready 1/1, nothing queued",
        Duration::from_secs(100),
        |c| {
            column(c, "READY") == "1/1"
                && column(c, "QUEUED") == "0"
                && column(c, "DRAINING").is_empty()
        },
    )
    .await;
    let events = cluster.kubectl(&["get", "events", "-n", "mail", "-o", "json"]);
    let events = json(&events);
    let reasons: Vec<String> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["involvedObject"]["kind"] == "MailQueue")
        .filter_map(|e| e["reason"].as_str().map(str::to_owned))
        .collect();
    for reason in ["Created", "ConfigChanged", "Draining", "ScaledDown"] {
        assert!(
            reasons.iter().any(|r| r == reason),
            "no {reason} event: {reasons:?}"
        );
    }
    report(&format!(
        "next hop up: all 5 messages delivered, then the StatefulSet went to 1 and mx-1 got SIGTERM; READY {} QUEUED {}; events {reasons:?}",
        column(&columns, "READY"),
        column(&columns, "QUEUED")
    ));

    // An invalid spec is reported, and the controller goes on.
    cluster.kubectl(&[
        "patch",
        "mailqueue",
        "mx",
        "-n",
        "mail",
        "--type=merge",
        "-p",
        r#"{"spec":{"ackPolicy":{"required":2,"copies":["local"]}}}"#,
    ]);
    until_columns(
        &cluster,
        "Status InvalidSpec",
        Duration::from_secs(30),
        |c| column(c, "STATUS") == "InvalidSpec",
    )
    .await;
    cluster.kubectl(&[
        "patch",
        "mailqueue",
        "mx",
        "-n",
        "mail",
        "--type=merge",
        "-p",
        r#"{"spec":{"ackPolicy":null}}"#,
    ]);
    until_columns(
        &cluster,
        "Status RelaysReady again",
        Duration::from_secs(60),
        |c| column(c, "STATUS") == "RelaysReady",
    )
    .await;
    report("an invalid spec (2 copies required, 1 listed) shows STATUS InvalidSpec; fixed, it is RelaysReady again");

    // Deleting the MailQueue: garbage collection removes what it owned.
    cluster.kubectl(&["delete", "mailqueue", "mx", "-n", "mail"]);
    eventually("garbage collection", Duration::from_secs(90), || async {
        let out = cluster.kubectl(&[
            "get",
            "statefulsets,services,configmaps,serviceaccounts,poddisruptionbudgets.v1beta1.policy,pods",
            "-n",
            "mail",
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
    assert!(kubelet.pods().is_empty(), "{:?}", kubelet.pods());
    let claims = cluster.kubectl(&["get", "pvc", "-n", "mail", "-o", "name"]);
    report(&format!(
        "deleted the MailQueue: garbage collection removed the StatefulSet, Services, ConfigMap, ServiceAccount, PodDisruptionBudget and pods; the spool claims stay, as a StatefulSet's do ({})",
        claims.split_whitespace().collect::<Vec<_>>().join(", ")
    ));

    let metrics = http_get(health, "/metrics")
        .await
        .map(|(_, body)| body)
        .unwrap_or_default();
    let kubelet_errors = kubelet.errors();
    let unexpected: Vec<&String> = kubelet_errors
        .iter()
        .filter(|e| !e.contains("Conflict") && !e.contains("NotFound"))
        .collect();
    assert!(unexpected.is_empty(), "stand-in kubelet: {unexpected:?}");
    assert!(metrics.contains("postern_operator"), "{metrics}");

    // What a 1.20 server could not check, plainly.
    report("NOT CHECKED on Kubernetes 1.20: policy/v1 PodDisruptionBudgets (the server serves policy/v1beta1 only; the operator discovered that and applied v1beta1, which is what was checked)");
    if uses_cel {
        report("NOT CHECKED on Kubernetes 1.20: the CRD's CEL rules (x-kubernetes-validations); a 1.20 server ignores them");
    } else {
        report("NOT CHECKED on Kubernetes 1.20: CEL validation; the CRD has no CEL rules (x-kubernetes-validations), so cross-field mistakes reach the operator, which reports them as Degraded/InvalidSpec (checked above)");
    }
    report("NOT CHECKED here: Service Endpoints (the API server refuses the loopback pod IPs in Endpoints, so a drained pod leaving the SMTP Service is checked as its label against the Service's selector)");
    report("NOT CHECKED here: a real kubelet, scheduler, container runtime, kube-proxy and volume provisioning (the harness binds pods, runs the relay binary as a process per pod on its own 127.0.x.y address, and keeps each claim as a directory)");
    drop(diagnostics);
    assert!(
        operator.child.try_wait().unwrap().is_none(),
        "the operator is still running:\n{}",
        operator.log_tail(40)
    );
    let status = operator.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "the operator stops cleanly on SIGTERM: {status:?}\n{}",
        operator.log_tail(40)
    );
    kubelet.shutdown().await;
    report(&format!("tier done in {:.0?}", started.elapsed()));
}
