//! The Helm chart `charts/postern`: `helm lint --strict` with every values
//! file under `ci/`, a render of each validated strictly against the
//! Kubernetes schemas (`kubernetes-validate --strict`, oldest and newest
//! versions it knows), the builders' snapshots validated the same way, the
//! chart's CRD equal to `crds/`, values.schema.json rejecting unknown keys,
//! least-privilege RBAC, and the operator accepting the Deployment's arguments.
//!
//! helm comes from `e2e/install-deps` (under /opt/postern-e2e/bin); these
//! tests fail, naming that script, when it is missing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde::Deserialize;
use serde_json::Value;

/// Oldest and newest Kubernetes versions kubernetes-validate ships schemas for
/// (it has none for 1.20, the e2e tier's server).
const KUBE_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

fn tool(name: &str) -> PathBuf {
    let dir = std::env::var_os("POSTERN_E2E_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/postern-e2e"));
    let installed = dir.join("bin").join(name);
    if installed.exists() {
        return installed;
    }
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.exists())
    });
    on_path.unwrap_or_else(|| panic!("{name} is not installed: run `bash e2e/install-deps`"))
}

fn run(command: &mut Command) -> Output {
    let output = command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"));
    output
}

fn check(command: &mut Command) -> String {
    let output = run(command);
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn chart() -> PathBuf {
    common::repo_root().join("charts/postern")
}

fn values_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "expected several values files in ci/");
    files
}

fn render(values: &Path) -> String {
    check(
        Command::new(tool("helm"))
            .args(["template", "postern", "--namespace", "postern-system"])
            .arg(chart())
            .arg("--values")
            .arg(values),
    )
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

fn validate_strictly(file: &Path) {
    for version in KUBE_VERSIONS {
        // As a module: pip's script directory need not be on PATH.
        check(
            Command::new("python3")
                .args(["-m", "kubernetes_validate", "--strict", "--quiet"])
                .args(["--kubernetes-version", version])
                .arg(file),
        );
    }
}

#[test]
fn helm_lint_passes_with_every_values_file() {
    check(
        Command::new(tool("helm"))
            .args(["lint", "--strict"])
            .arg(chart()),
    );
    for values in values_files() {
        check(
            Command::new(tool("helm"))
                .args(["lint", "--strict"])
                .arg(chart())
                .arg("--values")
                .arg(&values),
        );
    }
}

#[test]
fn rendered_objects_validate_strictly() {
    let dir = tempfile::tempdir().unwrap();
    for values in values_files() {
        let rendered = render(&values);
        let file = dir.path().join(values.file_name().unwrap());
        std::fs::write(&file, &rendered).unwrap();
        validate_strictly(&file);
    }
}

#[test]
fn builder_snapshots_validate_strictly() {
    for snapshot in ["minimal.yaml", "example.yaml"] {
        validate_strictly(
            &common::repo_root()
                .join("operator/tests/snapshots")
                .join(snapshot),
        );
    }
}

#[test]
fn chart_crd_equals_the_generated_one() {
    let committed: Value = serde_yaml::from_str(
        &std::fs::read_to_string(common::repo_root().join("crds/mailqueues.postern.dev.yaml"))
            .unwrap(),
    )
    .unwrap();
    let rendered = render(&chart().join("ci/default-values.yaml"));
    let mut crds: Vec<Value> = documents(&rendered)
        .into_iter()
        .filter(|doc| doc["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(crds.len(), 1, "the chart installs the CRD by default");
    let mut crd = crds.remove(0);
    let annotations = crd["metadata"]["annotations"].as_object_mut().unwrap();
    assert_eq!(
        annotations.remove("helm.sh/resource-policy"),
        Some(Value::from("keep")),
        "helm uninstall must keep the CRD (and every MailQueue)"
    );
    assert!(annotations.is_empty());
    crd["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    assert_eq!(crd, committed);

    let without = render(&chart().join("ci/bring-your-own-values.yaml"));
    assert!(documents(&without)
        .iter()
        .all(|doc| doc["kind"] != "CustomResourceDefinition"));
}

#[test]
fn values_schema_rejects_unknown_and_mistyped_keys() {
    for bad in [
        "replicas=2",
        "image.tag=1",
        "metrics.port=0",
        "watchNamespace=Not_A_Namespace",
        "serviceMonitor.interval=often",
        "serviceMonitor.scrape=true",
    ] {
        let mut command = Command::new(tool("helm"));
        command.arg("template").arg(chart()).arg("--set").arg(bad);
        if bad == "image.tag=1" {
            // A number where a string belongs.
            command.args(["--set", "image.pullPolicy=Sometimes"]);
        }
        let output = run(&mut command);
        assert!(!output.status.success(), "--set {bad} was accepted");
        assert!(
            String::from_utf8_lossy(&output.stderr).contains("schema"),
            "--set {bad}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[test]
fn rbac_is_least_privilege() {
    let objects = documents(&render(&chart().join("ci/default-values.yaml")));
    let roles: Vec<&Value> = objects
        .iter()
        .filter(|doc| doc["kind"] == "ClusterRole" || doc["kind"] == "Role")
        .collect();
    assert_eq!(
        roles.len(),
        2,
        "the operator's ClusterRole and the leader-election Role"
    );
    for role in roles {
        for rule in role["rules"].as_array().unwrap() {
            for key in ["apiGroups", "resources", "verbs"] {
                for item in rule[key].as_array().unwrap() {
                    assert_ne!(item, "*", "wildcard {key} in {rule}");
                }
            }
            // Owned objects go by garbage collection; the one exception is
            // the NetworkPolicy, deleted when spec.networkPolicy is turned
            // off (delete on it grants nothing patch does not).
            let network_policies = rule["resources"] == serde_json::json!(["networkpolicies"]);
            for verb in rule["verbs"].as_array().unwrap() {
                let verb = verb.as_str().unwrap();
                assert!(
                    !["deletecollection", "escalate", "bind", "impersonate"].contains(&verb)
                        && (verb != "delete" || network_policies),
                    "{verb} in {rule}"
                );
            }
            assert!(
                !rule["resources"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r == "secrets"),
                "the operator never reads Secrets: {rule}"
            );
        }
    }
    let namespaced = documents(&render(&chart().join("ci/namespaced-values.yaml")));
    assert!(namespaced.iter().all(|doc| doc["kind"] != "ClusterRole"));
    assert!(namespaced
        .iter()
        .any(|doc| doc["kind"] == "Role" && doc["metadata"]["namespace"] == "mail"));
}

#[test]
fn operator_accepts_the_deployment_arguments() {
    for values in values_files() {
        let objects = documents(&render(&values));
        let deployment = objects
            .iter()
            .find(|doc| doc["kind"] == "Deployment")
            .expect("a Deployment");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(container["command"][0], "postern-operator");
        let args: Vec<&str> = container["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|arg| arg.as_str().unwrap())
            .collect();
        // clap rejects an unknown argument before it reaches --help.
        check(
            Command::new(env!("CARGO_BIN_EXE_postern-operator"))
                .args(&args)
                .arg("--help"),
        );
    }
}

fn render_with(values: &[&str]) -> Vec<Value> {
    let mut command = Command::new(tool("helm"));
    command
        .args(["template", "postern", "--namespace", "postern-system"])
        .arg(chart());
    for value in values {
        command.args(["--set", value]);
    }
    documents(&check(&mut command))
}

#[test]
fn every_service_port_says_tcp() {
    let mut services = 0;
    for values in values_files() {
        for doc in documents(&render(&values))
            .iter()
            .chain(render_with(&["serviceMonitor.enabled=true"]).iter())
            .filter(|doc| doc["kind"] == "Service")
        {
            services += 1;
            for port in doc["spec"]["ports"].as_array().unwrap() {
                assert_eq!(port["protocol"], "TCP", "{doc}");
            }
        }
    }
    assert!(services > 0, "no Service rendered at all");
}

#[test]
fn service_monitors_are_rendered_only_when_asked() {
    let kinds = |docs: &[Value]| {
        docs.iter()
            .filter(|doc| doc["kind"] == "ServiceMonitor")
            .cloned()
            .collect::<Vec<_>>()
    };
    for values in values_files() {
        assert!(
            kinds(&documents(&render(&values))).is_empty(),
            "{}: a ServiceMonitor without serviceMonitor.enabled",
            values.display()
        );
    }

    check(
        Command::new(tool("helm"))
            .args(["lint", "--strict"])
            .arg(chart())
            .args(["--set", "serviceMonitor.enabled=true"]),
    );
    let docs = render_with(&[
        "serviceMonitor.enabled=true",
        "serviceMonitor.labels.release=prometheus",
    ]);
    let monitors = kinds(&docs);
    assert_eq!(monitors.len(), 2, "{monitors:?}");
    for monitor in &monitors {
        assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
        assert_eq!(monitor["metadata"]["namespace"], "postern-system");
        assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], "http");
        assert_eq!(endpoint["path"], "/metrics");
        assert_eq!(endpoint["interval"], "30s");
    }

    // The operator's: its metrics Service exists (even with
    // metrics.service.enabled false) and matches the selector.
    let operator = &monitors[0];
    let service = docs
        .iter()
        .find(|doc| doc["kind"] == "Service")
        .expect("the operator's metrics Service");
    let selected = operator["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    for (key, value) in selected {
        assert_eq!(&service["metadata"]["labels"][key], value, "{key}");
    }
    assert_eq!(service["spec"]["ports"][0]["name"], "http");

    // The relays': the labels the operator puts on a MailQueue's headless
    // Service, whose port "http" is the relays' 9325; every namespace.
    let relays = &monitors[1];
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    let peers = postern_operator::build::peer_service(&mq);
    let labels = peers.metadata.labels.unwrap();
    for (key, value) in relays["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(labels.get(key).map(String::as_str), value.as_str(), "{key}");
    }
    assert!(peers
        .spec
        .unwrap()
        .ports
        .unwrap()
        .iter()
        .any(|p| p.name.as_deref() == Some("http") && p.port == 9325));
    assert_eq!(relays["spec"]["namespaceSelector"]["any"], true);

    // With watchNamespace, only that namespace.
    let docs = render_with(&["serviceMonitor.enabled=true", "watchNamespace=mail"]);
    let relays = &kinds(&docs)[1];
    assert_eq!(
        relays["spec"]["namespaceSelector"]["matchNames"],
        serde_json::json!(["mail"])
    );
}

/// What the relays and the operator serve on `/metrics`, rendered by the
/// same code: every family's name and type, and its series lines.
fn exported_metrics() -> (std::collections::HashMap<String, String>, Vec<String>) {
    let mut text = postern::metrics::Metrics::default().render();
    postern::metrics::CopyLatency::default().render(&mut text);
    postern::metrics::render_delivery(&postern::health::Delivery::Running, &mut text);
    text.push_str(&postern_operator::metrics::Metrics::default().render());
    let mut types = std::collections::HashMap::new();
    let mut series = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_owned(), kind.to_owned());
        } else if !line.starts_with('#') && !line.is_empty() {
            series.push(line.to_owned());
        }
    }
    (types, series)
}

/// Names of the form `postern_…` in a query.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("postern_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        names.push(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The dashboard the chart ships (dashboard.enabled) is a ConfigMap for
/// Grafana's sidecar whose every query names a metric the binaries export,
/// with the right type: `rate`/`increase` only over counters and histogram
/// buckets, `histogram_quantile` only over histogram buckets, and every
/// label a legend shows carried by the series it queries.
#[test]
fn the_dashboard_queries_only_metrics_the_binaries_export() {
    let objects = documents(&render(&chart().join("ci/dashboard-values.yaml")));
    let config_map = objects
        .iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == "postern-dashboard")
        .expect("the dashboard ConfigMap");
    assert_eq!(config_map["metadata"]["namespace"], "monitoring");
    assert_eq!(config_map["metadata"]["labels"]["grafana_dashboard"], "1");
    let json = config_map["data"]["postern.json"].as_str().unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(json).unwrap();
    assert_eq!(dashboard["uid"], "postern-overview");
    // Off by default.
    let default = documents(&render(&chart().join("ci/default-values.yaml")));
    assert!(!default.iter().any(|o| o["kind"] == "ConfigMap"));

    let (types, series) = exported_metrics();
    let kind_of = |name: &str| -> Option<(&str, bool)> {
        if let Some(kind) = types.get(name) {
            return Some((kind.as_str(), false));
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))?;
        (types.get(base)? == "histogram").then_some(("histogram", name.ends_with("_bucket")))
    };
    let mut queries = 0;
    let mut seen = std::collections::BTreeSet::new();
    let templating = dashboard["templating"]["list"].as_array().unwrap();
    let variable_queries = templating
        .iter()
        .filter_map(|v| v["definition"].as_str().map(|q| (q, "")));
    let panel_queries = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| {
            let expr = t["expr"].as_str().unwrap().to_owned();
            let legend = t["legendFormat"].as_str().unwrap_or("").to_owned();
            (expr, legend)
        })
        .collect::<Vec<_>>();
    let all = variable_queries
        .map(|(q, l)| (q.to_owned(), l.to_owned()))
        .chain(panel_queries);
    for (expr, legend) in all {
        queries += 1;
        let names = metric_names(&expr);
        assert!(
            !names.is_empty(),
            "a query that names no Postern metric: {expr}"
        );
        for name in &names {
            let Some((kind, bucket)) = kind_of(name) else {
                panic!("{name} (in {expr}) is not exported; exported: {types:?}");
            };
            seen.insert(name.clone());
            for function in ["rate(", "increase("] {
                if expr.contains(&format!("{function}{name}")) {
                    assert!(
                        kind == "counter" || bucket,
                        "{function}…) over the {kind} {name}: {expr}"
                    );
                }
            }
            if expr.contains("histogram_quantile(") && expr.contains(&format!("({name}")) {
                assert!(
                    bucket,
                    "histogram_quantile over {name}, not a bucket: {expr}"
                );
            }
        }
        // Labels a legend shows: Prometheus's own target labels, or ones
        // the queried series carry.
        for label in legend
            .split("{{")
            .skip(1)
            .filter_map(|l| l.split_once("}}"))
        {
            let label = label.0.trim();
            if ["pod", "instance", "namespace", "job"].contains(&label) {
                continue;
            }
            let carried = names.iter().any(|name| {
                series
                    .iter()
                    .any(|s| s.starts_with(name.as_str()) && s.contains(&format!("{label}=\"")))
            });
            assert!(carried, "legend label {label} is on none of {names:?}");
        }
    }
    assert!(queries >= 20, "only {queries} queries");
    // The list: throughput, ack latency, queue depth and age,
    // deferrals by reason, takeovers and drains, copy latency.
    for wanted in [
        "postern_messages_accepted_total",
        "postern_ack_latency_seconds_bucket",
        "postern_queue_depth",
        "postern_queue_oldest_age_seconds",
        "postern_recipients_deferred_total",
        "postern_takeovers_total",
        "postern_operator_drains_started_total",
        "postern_copy_latency_seconds_bucket",
    ] {
        assert!(
            seen.contains(wanted),
            "the dashboard does not show {wanted}"
        );
    }
}
