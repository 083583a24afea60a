//! Snapshot tests of the pure builders: every object a MailQueue produces,
//! as YAML under `tests/snapshots/`, for a minimal MailQueue (all defaults)
//! and for the chart's full example. A change to a builder shows up as a
//! reviewable diff; `POSTERN_UPDATE_SNAPSHOTS=1` rewrites them.

mod common;

use kube::Resource;
use postern_operator::build;
use postern_operator::crd::MailQueue;
use postern_operator::relay_config;

fn all_objects(mq: &MailQueue) -> String {
    let config = relay_config::render(mq).unwrap();
    let grace = relay_config::drain_timeout(mq).unwrap().as_secs() as i64;
    let docs = [
        serde_yaml::to_string(&build::service_account(mq)).unwrap(),
        serde_yaml::to_string(&build::config_map(mq, &config)).unwrap(),
        serde_yaml::to_string(&build::peer_service(mq)).unwrap(),
        serde_yaml::to_string(&build::smtp_service(mq)).unwrap(),
        serde_yaml::to_string(&build::stateful_set(mq, &config, mq.spec.replicas, grace)).unwrap(),
        serde_yaml::to_string(&build::pod_disruption_budget(mq)).unwrap(),
    ];
    docs.iter().map(|doc| format!("---\n{doc}")).collect()
}

#[test]
fn minimal_mail_queue() {
    let mq = common::mail_queue("mx", serde_json::json!({"image": "postern:0.1.0"}));
    common::assert_file("operator/tests/snapshots/minimal.yaml", &all_objects(&mq));
}

#[test]
fn chart_example_mail_queue() {
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    common::assert_file("operator/tests/snapshots/example.yaml", &all_objects(&mq));
}

#[test]
fn every_object_is_owned_by_the_mail_queue() {
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    let config = relay_config::render(&mq).unwrap();
    let owners = [
        build::service_account(&mq).metadata.owner_references,
        build::config_map(&mq, &config).metadata.owner_references,
        build::peer_service(&mq).metadata.owner_references,
        build::smtp_service(&mq).metadata.owner_references,
        build::stateful_set(&mq, &config, 3, 300)
            .metadata
            .owner_references,
        build::pod_disruption_budget(&mq).metadata.owner_references,
    ];
    for owner in owners {
        let owner = owner.unwrap();
        assert_eq!(owner.len(), 1);
        assert_eq!(owner[0].kind, "MailQueue");
        assert_eq!(owner[0].api_version, "postern.dev/v1alpha1");
        assert_eq!(Some(&owner[0].uid), mq.meta().uid.as_ref());
        assert_eq!(owner[0].controller, Some(true));
    }
}

#[test]
fn a_config_change_changes_the_pod_template() {
    let mq = common::mail_queue("mx", serde_json::json!({"image": "postern:0.1.0"}));
    let mut changed = mq.clone();
    changed.spec.delivery.max_age = "3d".into();
    let hash = |mq: &MailQueue| {
        let config = relay_config::render(mq).unwrap();
        let sts = build::stateful_set(mq, &config, 2, 300);
        sts.spec
            .unwrap()
            .template
            .metadata
            .unwrap()
            .annotations
            .unwrap()[build::CONFIG_HASH]
            .clone()
    };
    assert_ne!(hash(&mq), hash(&changed));
    let cm = build::config_map(&changed, &relay_config::render(&changed).unwrap());
    let toml = &cm.data.unwrap()[relay_config::CONFIG_FILE];
    assert!(toml.contains("max_age = \"3days\""), "{toml}");
}

#[test]
fn a_clustered_mail_queue_mounts_the_peer_secret_and_exposes_the_peer_port() {
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    let secret = mq.spec.etcd.as_ref().unwrap().peer_secret.clone().unwrap();
    let config = relay_config::render(&mq).unwrap();
    let sts = build::stateful_set(&mq, &config, 3, 300);
    let pod = sts.spec.unwrap().template.spec.unwrap();
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(&secret))
        .expect("a volume of the peer Secret");
    let items = volume.secret.unwrap().items.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].key, "secret");
    let container = &pod.containers[0];
    let mount = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == volume.name)
        .expect("the peer Secret is mounted");
    assert_eq!(mount.read_only, Some(true));
    // The relay reads the file its configuration names.
    let secret_file = config.config.cluster.as_ref().unwrap().secret_file.clone();
    assert_eq!(
        secret_file,
        Some(std::path::Path::new(&mount.mount_path).join(&items[0].path))
    );
    let port = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("peer"))
        .expect("a container port named peer");
    assert_eq!(port.container_port, 9327);

    let peers = build::peer_service(&mq).spec.unwrap().ports.unwrap();
    let port = peers
        .iter()
        .find(|p| p.name.as_deref() == Some("peer"))
        .expect("the headless Service has the peer port");
    assert_eq!(port.port, 9327);
    assert_eq!(
        port.target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(9327))
    );
    // Peers reach each other only through the headless Service.
    let smtp = build::smtp_service(&mq).spec.unwrap().ports.unwrap();
    assert!(smtp.iter().all(|p| p.port != 9327));
}

#[test]
fn an_unclustered_mail_queue_has_no_peer_port_or_secret() {
    let mq = common::mail_queue("mx", serde_json::json!({"image": "postern:0.1.0"}));
    let config = relay_config::render(&mq).unwrap();
    let pod = build::stateful_set(&mq, &config, 2, 300)
        .spec
        .unwrap()
        .template
        .spec
        .unwrap();
    assert!(pod.volumes.unwrap().iter().all(|v| v.name != "peer-secret"));
    let ports = pod.containers[0].ports.clone().unwrap();
    assert!(ports.iter().all(|p| p.container_port != 9327), "{ports:?}");
    let peers = build::peer_service(&mq).spec.unwrap().ports.unwrap();
    assert!(peers.iter().all(|p| p.name.as_deref() != Some("peer")));
}

#[test]
fn termination_grace_follows_the_drain_timeout() {
    let mq = common::mail_queue(
        "mx",
        serde_json::json!({"image": "postern:0.1.0", "drainTimeout": "2m30s"}),
    );
    assert_eq!(relay_config::drain_timeout(&mq).unwrap().as_secs(), 150);
}
