mod kube_harness;

use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::api::{Api, Patch, PatchParams};
use kube_harness::*;

const STS: &str = r#"
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_runs_a_statefulset_of_relays() {
    let cluster = Cluster::start();
    let client = cluster.client().await;
    let root = tempfile::tempdir().unwrap();
    let kubelet = Kubelet::start(client.clone(), "default", "app=relay", root.path()).await;
    cluster.apply_yaml(STS);
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
    println!(
        "{}",
        cluster.kubectl(&["get", "sts,pods,pvc,nodes", "-o", "wide"])
    );
    let pods = kubelet.pods();
    let relay0 = &pods["relay-0"];
    send_mail(relay0.ports["smtp"], "someone@example.org");
    let (code, body) = http_get(relay0.ports["http"], "/stats").await.unwrap();
    println!("stats {code} {body}");
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
        if events
            .iter()
            .any(|e| matches!(e, KubeletEvent::Removed { pod, .. } if pod == "relay-1"))
        {
            Ok(())
        } else {
            Err(format!("{events:?}"))
        }
    })
    .await;
    println!("{:#?}", kubelet.events());
    cluster.kubectl(&["delete", "sts", "relay"]);
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
