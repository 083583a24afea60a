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
fn termination_grace_follows_the_drain_timeout() {
    let mq = common::mail_queue(
        "mx",
        serde_json::json!({"image": "postern:0.1.0", "drainTimeout": "2m30s"}),
    );
    assert_eq!(relay_config::drain_timeout(&mq).unwrap().as_secs(), 150);
}
