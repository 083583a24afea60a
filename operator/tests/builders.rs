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
    let policy = build::wants_network_policy(mq)
        .then(|| serde_yaml::to_string(&build::network_policy(mq)).unwrap());
    docs.iter()
        .chain(policy.iter())
        .map(|doc| format!("---\n{doc}"))
        .collect()
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
        build::network_policy(&mq).metadata.owner_references,
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

fn pod_spec(mq: &MailQueue) -> k8s_openapi::api::core::v1::PodSpec {
    let config = relay_config::render(mq).unwrap();
    build::stateful_set(mq, &config, 2, 300)
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
}

#[test]
fn etcd_tls_and_auth_secrets_are_mounted_where_the_relay_reads_them() {
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    let etcd = mq.spec.etcd.clone().unwrap();
    let cluster = relay_config::render(&mq).unwrap().config.cluster.unwrap();
    let pod = pod_spec(&mq);
    let mounted = |secret: &str| {
        let volume = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.secret.as_ref().and_then(|s| s.secret_name.as_deref()) == Some(secret))
            .unwrap_or_else(|| panic!("a volume of {secret}"));
        let mount = pod.containers[0]
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == volume.name)
            .unwrap_or_else(|| panic!("{secret} is mounted"));
        assert_eq!(mount.read_only, Some(true));
        let source = volume.secret.as_ref().unwrap();
        assert_eq!(source.default_mode, Some(0o440));
        source
            .items
            .as_ref()
            .unwrap()
            .iter()
            .map(|item| {
                assert_eq!(item.key, item.path);
                std::path::Path::new(&mount.mount_path).join(&item.path)
            })
            .collect::<Vec<_>>()
    };
    // Every file the relay's [cluster] section names is a key of a Secret.
    let tls = mounted(etcd.tls_secret.as_deref().unwrap());
    assert_eq!(
        tls,
        [
            cluster.etcd_ca.clone().unwrap(),
            cluster.etcd_cert.clone().unwrap(),
            cluster.etcd_key.clone().unwrap()
        ]
    );
    let auth = mounted(etcd.auth_secret.as_deref().unwrap());
    assert_eq!(
        auth,
        [
            cluster.etcd_user_file.clone().unwrap(),
            cluster.etcd_password_file.clone().unwrap()
        ]
    );
    // Nothing of them in the environment.
    let env = pod.containers[0].env.clone().unwrap_or_default();
    assert!(env.iter().all(|e| !e.name.contains("ETCD")), "{env:?}");

    // Only ca.crt when the Secret holds no client certificate.
    let mut ca_only = mq.clone();
    ca_only.spec.etcd.as_mut().unwrap().tls_client_certificate = Some(false);
    let pod = pod_spec(&ca_only);
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "etcd-tls")
        .unwrap();
    let items = volume.secret.unwrap().items.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].key, "ca.crt");
}

#[test]
fn relay_pods_run_under_runtime_default_seccomp_with_default_requests() {
    let mq = common::mail_queue("mx", serde_json::json!({"image": "postern:0.1.0"}));
    let pod = pod_spec(&mq);
    let security = pod.security_context.unwrap();
    assert_eq!(security.seccomp_profile.unwrap().type_, "RuntimeDefault");
    assert_eq!(security.run_as_non_root, Some(true));
    let resources = pod.containers[0].resources.clone().unwrap();
    let requests = resources.requests.unwrap();
    assert_eq!(requests["cpu"].0, build::DEFAULT_CPU_REQUEST);
    assert_eq!(requests["memory"].0, build::DEFAULT_MEMORY_REQUEST);
    assert_eq!(resources.limits, None);

    // The MailQueue's own resources replace the defaults entirely.
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    let resources = pod_spec(&mq).containers[0].resources.clone().unwrap();
    assert_eq!(resources.requests.unwrap()["cpu"].0, "250m");
    assert_eq!(resources.limits.unwrap()["memory"].0, "1Gi");
}

#[test]
fn every_service_port_says_tcp() {
    for mq in [
        common::mail_queue("mx", serde_json::json!({"image": "postern:0.1.0"})),
        common::mail_queue_from("charts/postern/examples/mailqueue.yaml"),
    ] {
        for service in [build::smtp_service(&mq), build::peer_service(&mq)] {
            for port in service.spec.unwrap().ports.unwrap() {
                assert_eq!(port.protocol.as_deref(), Some("TCP"), "{port:?}");
            }
        }
        for port in build::network_policy(&mq)
            .spec
            .unwrap()
            .ingress
            .unwrap()
            .into_iter()
            .flat_map(|rule| rule.ports.unwrap())
        {
            assert_eq!(port.protocol.as_deref(), Some("TCP"), "{port:?}");
        }
    }
}

#[test]
fn the_network_policy_opens_listeners_and_http_and_the_peer_port_to_relays_only() {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    assert!(build::wants_network_policy(&mq));
    let policy = build::network_policy(&mq);
    assert_eq!(policy.metadata.name.as_deref(), Some("mx"));
    let spec = policy.spec.unwrap();
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    let relays = spec.pod_selector.unwrap().match_labels.unwrap();
    assert_eq!(relays, build::selector_labels(&mq));
    let ports = |rule: &k8s_openapi::api::networking::v1::NetworkPolicyIngressRule| {
        rule.ports
            .as_ref()
            .unwrap()
            .iter()
            .map(|p| match p.port {
                Some(IntOrString::Int(port)) => port,
                ref other => panic!("{other:?}"),
            })
            .collect::<Vec<_>>()
    };
    let ingress = spec.ingress.unwrap();
    assert_eq!(ingress.len(), 2);
    // Container ports (what a policy matches), not the Service's 25, 587, 465.
    assert_eq!(ports(&ingress[0]), [2525, 2587, 2465, 9325]);
    assert_eq!(ingress[0].from, None, "from anywhere");
    assert_eq!(ports(&ingress[1]), [9327]);
    let from = ingress[1].from.as_ref().unwrap();
    assert_eq!(from.len(), 1);
    assert_eq!(from[0].namespace_selector, None, "this namespace only");
    assert_eq!(
        from[0]
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap(),
        &build::selector_labels(&mq)
    );

    // Without etcd there is no peer port to admit; off by default.
    let mq = common::mail_queue(
        "mx",
        serde_json::json!({"image": "postern:0.1.0", "networkPolicy": {"enabled": true}}),
    );
    let ingress = build::network_policy(&mq).spec.unwrap().ingress.unwrap();
    assert_eq!(ingress.len(), 1);
    assert_eq!(ports(&ingress[0]), [2525, 9325]);
    let mq = common::mail_queue("mx", serde_json::json!({"image": "postern:0.1.0"}));
    assert!(!build::wants_network_policy(&mq));
}

/// The chart's cert-manager example for mutual TLS between relays issues
/// the Secret the example MailQueue names, for both ends of a connection
/// (server and client auth), valid for the relays' peer Service, from a CA
/// of its own.
#[test]
fn the_peer_tls_example_issues_the_secret_the_mail_queue_names() {
    use serde::Deserialize;
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    let wanted = mq.spec.etcd.as_ref().unwrap().peer_tls_secret.clone();
    let text =
        std::fs::read_to_string(common::repo_root().join("charts/postern/examples/peer-tls.yaml"))
            .unwrap();
    let docs: Vec<serde_json::Value> = serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["Issuer", "Certificate", "Issuer", "Certificate"]);
    let ca = &docs[1]["spec"];
    assert_eq!(ca["isCA"], true);
    assert_eq!(docs[2]["spec"]["ca"]["secretName"], ca["secretName"]);
    let relays = &docs[3]["spec"];
    assert_eq!(relays["secretName"].as_str(), wanted.as_deref());
    assert_eq!(relays["issuerRef"]["name"], docs[2]["metadata"]["name"]);
    let usages: Vec<&str> = relays["usages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    assert!(usages.contains(&"server auth") && usages.contains(&"client auth"));
    let peers = format!(
        "{}.{}.svc",
        build::Names::of(&mq).peers,
        mq.metadata.namespace.as_deref().unwrap()
    );
    assert!(
        relays["dnsNames"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n == &peers),
        "{relays}"
    );
}

/// The example's submission listeners: container and Service ports, the
/// password Secret mounted where the rendered `[auth]` looks, and the
/// listeners' modes in the relay configuration.
#[test]
fn the_examples_submission_listeners_get_their_ports_and_password_file() {
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    let rendered = relay_config::render(&mq).unwrap();
    let config = postern::config::Config::parse(&rendered.toml).unwrap();
    let modes: Vec<(String, postern::config::ListenerMode)> = config
        .listeners
        .iter()
        .map(|l| (l.name.clone(), l.mode))
        .collect();
    assert_eq!(
        modes,
        [
            ("smtp".to_owned(), postern::config::ListenerMode::Smtp),
            (
                "submission".to_owned(),
                postern::config::ListenerMode::Submission
            ),
            (
                "submissions".to_owned(),
                postern::config::ListenerMode::Submissions
            ),
        ]
    );
    let password_file = config.auth.password_file.clone().unwrap();
    let sts = serde_json::to_value(build::stateful_set(&mq, &rendered, 3, 300)).unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    assert_eq!(secret_file(pod, "mx-users", "passwd"), password_file);
    let ports: Vec<i64> = pod["containers"][0]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert!(ports.contains(&2587) && ports.contains(&2465), "{ports:?}");
}

/// The example's DKIM keys: each Secret's `private.key` is mounted where
/// the rendered `[[dkim]]` reads it.
#[test]
fn the_examples_dkim_keys_are_mounted_where_the_relay_reads_them() {
    let mq = common::mail_queue_from("charts/postern/examples/mailqueue.yaml");
    let rendered = relay_config::render(&mq).unwrap();
    let config = postern::config::Config::parse(&rendered.toml).unwrap();
    assert_eq!(config.dkim.len(), 2);
    let sts = serde_json::to_value(build::stateful_set(&mq, &rendered, 3, 300)).unwrap();
    let pod = &sts["spec"]["template"]["spec"];
    for (dkim, secret) in config.dkim.iter().zip(["mx-dkim-rsa", "mx-dkim-ed25519"]) {
        assert_eq!(secret_file(pod, secret, "private.key"), dkim.key_file);
    }
}

/// Where the pod sees `key` of the Secret `secret`: its volume projects
/// only that key, mounted read-only.
fn secret_file(pod: &serde_json::Value, secret: &str, key: &str) -> std::path::PathBuf {
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == secret)
        .unwrap_or_else(|| panic!("{secret} is a volume"));
    assert_eq!(volume["secret"]["items"][0]["key"], key);
    let mount = pod["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .unwrap_or_else(|| panic!("{secret} is mounted"));
    assert_eq!(mount["readOnly"], true);
    std::path::Path::new(mount["mountPath"].as_str().unwrap()).join(key)
}
