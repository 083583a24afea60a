//! The relays' StatefulSet: stable identities and one spool volume per relay,
//! probes on the relay's health endpoints, a termination grace period long
//! enough to drain, and the configuration hash on the pod template. The pods
//! run as a non-root user under the runtime's default seccomp profile, with a
//! read-only root filesystem and no capabilities, and request modest
//! resources when the MailQueue names none.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, PersistentVolumeClaim, PersistentVolumeClaimSpec, PodAffinityTerm,
    PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{labels, metadata, selector_labels, Names, CONFIG_HASH, TRAFFIC_LABEL, TRAFFIC_SERVE};
use crate::crd::{MailQueue, PullPolicy};
use crate::relay_config::{
    dkim_dir, RelayConfig, AUTH_DIR, AUTH_PASSWD_KEY, CONFIG_DIR, CONFIG_FILE, DATA_DIR, DKIM_KEY,
    ETCD_AUTH_DIR, ETCD_CA_KEY, ETCD_CERT_KEY, ETCD_KEY_KEY, ETCD_PASSWORD_KEY, ETCD_TLS_DIR,
    ETCD_USERNAME_KEY, HTTP_PORT, PEER_PORT, PEER_PORT_NAME, PEER_SECRET_DIR, PEER_SECRET_KEY,
    PEER_TLS_DIR, ROUTE_AUTH_DIR, TLS_DIR,
};

/// User and group the relay runs as (the distroless `nonroot` ids); the
/// spool volume is made writable for the group.
const RELAY_UID: i64 = 65532;
const SPOOL_VOLUME: &str = "spool";
const CONFIG_VOLUME: &str = "config";
const PEER_SECRET_VOLUME: &str = "peer-secret";
const PEER_TLS_VOLUME: &str = "peer-tls";
const AUTH_VOLUME: &str = "auth";
const ETCD_TLS_VOLUME: &str = "etcd-tls";
const ETCD_AUTH_VOLUME: &str = "etcd-auth";
/// CPU the relay container requests when the MailQueue sets no `resources`.
pub const DEFAULT_CPU_REQUEST: &str = "100m";
/// Memory the relay container requests when the MailQueue sets no `resources`.
pub const DEFAULT_MEMORY_REQUEST: &str = "128Mi";

/// The StatefulSet of relays with `replicas` pods (reconcile decides the
/// number: during a scale-down it stays above the spec until drained).
pub fn stateful_set(
    mq: &MailQueue,
    config: &RelayConfig,
    replicas: i32,
    termination_grace_seconds: i64,
) -> StatefulSet {
    let names = Names::of(mq);
    let spec = &mq.spec;
    let mut pod_labels = labels(mq);
    pod_labels.insert(TRAFFIC_LABEL.into(), TRAFFIC_SERVE.into());

    let mut volumes = vec![Volume {
        name: CONFIG_VOLUME.into(),
        config_map: Some(ConfigMapVolumeSource {
            name: names.config.clone(),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![
        VolumeMount {
            name: SPOOL_VOLUME.into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: CONFIG_VOLUME.into(),
            mount_path: format!("{CONFIG_DIR}/{CONFIG_FILE}"),
            sub_path: Some(CONFIG_FILE.into()),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    for listener in &spec.listeners {
        if let Some(secret) = &listener.tls_secret {
            let volume = format!("tls-{}", listener.name);
            volumes.push(secret_volume(&volume, secret, &[]));
            mounts.push(VolumeMount {
                name: volume,
                mount_path: format!("{TLS_DIR}/{}", listener.name),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    if let Some(secret) = spec
        .auth
        .as_ref()
        .and_then(|auth| auth.password_secret.as_ref())
    {
        volumes.push(secret_volume(AUTH_VOLUME, secret, &[AUTH_PASSWD_KEY]));
        mounts.push(VolumeMount {
            name: AUTH_VOLUME.into(),
            mount_path: AUTH_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    for (index, key) in spec.dkim.iter().enumerate() {
        let volume = format!("dkim-{index}");
        volumes.push(secret_volume(&volume, &key.secret, &[DKIM_KEY]));
        mounts.push(VolumeMount {
            name: volume,
            mount_path: dkim_dir(key).display().to_string(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    for (index, route) in spec.routes.iter().enumerate() {
        if let Some(secret) = &route.credentials_secret {
            let volume = format!("route-{index}");
            volumes.push(secret_volume(&volume, secret, &["auth"]));
            mounts.push(VolumeMount {
                name: volume,
                mount_path: format!("{ROUTE_AUTH_DIR}/{index}"),
                read_only: Some(true),
                ..VolumeMount::default()
            });
        }
    }
    if let Some(secret) = spec
        .etcd
        .as_ref()
        .and_then(|etcd| etcd.peer_secret.as_ref())
    {
        volumes.push(secret_volume(
            PEER_SECRET_VOLUME,
            secret,
            &[PEER_SECRET_KEY],
        ));
        mounts.push(VolumeMount {
            name: PEER_SECRET_VOLUME.into(),
            mount_path: PEER_SECRET_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    // etcd's CA, client certificate and credentials: files the relay's
    // `[cluster]` section names (relay_config), never environment variables.
    if let Some(etcd) = &spec.etcd {
        let tls_keys: &[&str] = if etcd.client_certificate() {
            &[ETCD_CA_KEY, ETCD_CERT_KEY, ETCD_KEY_KEY]
        } else {
            &[ETCD_CA_KEY]
        };
        for (volume, secret, keys, dir) in [
            (ETCD_TLS_VOLUME, &etcd.tls_secret, tls_keys, ETCD_TLS_DIR),
            (
                PEER_TLS_VOLUME,
                &etcd.peer_tls_secret,
                &[ETCD_CA_KEY, ETCD_CERT_KEY, ETCD_KEY_KEY][..],
                PEER_TLS_DIR,
            ),
            (
                ETCD_AUTH_VOLUME,
                &etcd.auth_secret,
                &[ETCD_USERNAME_KEY, ETCD_PASSWORD_KEY][..],
                ETCD_AUTH_DIR,
            ),
        ] {
            if let Some(secret) = secret {
                volumes.push(secret_volume(volume, secret, keys));
                mounts.push(VolumeMount {
                    name: volume.into(),
                    mount_path: dir.into(),
                    read_only: Some(true),
                    ..VolumeMount::default()
                });
            }
        }
    }

    let mut env = Vec::new();
    if let Some(secret) = spec
        .object_store
        .as_ref()
        .and_then(|store| store.credentials_secret.as_ref())
    {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            env.push(EnvVar {
                name: key.into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: secret.clone(),
                        key: key.into(),
                        ..SecretKeySelector::default()
                    }),
                    ..EnvVarSource::default()
                }),
                ..EnvVar::default()
            });
        }
    }

    let mut ports: Vec<ContainerPort> = spec
        .listeners
        .iter()
        .map(|listener| ContainerPort {
            name: Some(listener.name.clone()),
            container_port: listener.port,
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        })
        .collect();
    ports.push(ContainerPort {
        name: Some("http".into()),
        container_port: i32::from(HTTP_PORT),
        protocol: Some("TCP".into()),
        ..ContainerPort::default()
    });
    if spec.etcd.is_some() {
        ports.push(ContainerPort {
            name: Some(PEER_PORT_NAME.into()),
            container_port: i32::from(PEER_PORT),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        });
    }

    let container = Container {
        name: "relay".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|policy| {
            match policy {
                PullPolicy::Always => "Always",
                PullPolicy::IfNotPresent => "IfNotPresent",
                PullPolicy::Never => "Never",
            }
            .to_owned()
        }),
        command: Some(vec![
            "postern".into(),
            "serve".into(),
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_FILE}"),
        ]),
        ports: Some(ports),
        env: (!env.is_empty()).then_some(env),
        readiness_probe: Some(http_probe("/readyz", 5, 2)),
        liveness_probe: Some(http_probe("/healthz", 10, 6)),
        volume_mounts: Some(mounts),
        resources: Some(
            spec.resources
                .as_ref()
                .map_or_else(default_resources, |r| r.to_requirements()),
        ),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };

    let pod = PodSpec {
        service_account_name: Some(names.service_account.clone()),
        automount_service_account_token: Some(false),
        termination_grace_period_seconds: Some(termination_grace_seconds),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(LabelSelector {
                                match_labels: Some(selector_labels(mq)),
                                ..LabelSelector::default()
                            }),
                            topology_key: "kubernetes.io/hostname".into(),
                            ..PodAffinityTerm::default()
                        },
                    },
                ]),
                ..PodAntiAffinity::default()
            }),
            ..Affinity::default()
        }),
        security_context: Some(PodSecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RELAY_UID),
            run_as_group: Some(RELAY_UID),
            fs_group: Some(RELAY_UID),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                ..SeccompProfile::default()
            }),
            ..PodSecurityContext::default()
        }),
        containers: vec![container],
        volumes: Some(volumes),
        ..PodSpec::default()
    };

    let mut claim_spec = PersistentVolumeClaimSpec {
        access_modes: Some(vec!["ReadWriteOnce".into()]),
        resources: Some(VolumeResourceRequirements {
            requests: Some(BTreeMap::from([(
                "storage".to_owned(),
                Quantity(spec.spool.size.clone()),
            )])),
            ..VolumeResourceRequirements::default()
        }),
        ..PersistentVolumeClaimSpec::default()
    };
    claim_spec.storage_class_name = spec.spool.storage_class_name.clone();

    StatefulSet {
        metadata: metadata(mq, &names.relay),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector_labels(mq)),
                ..LabelSelector::default()
            },
            service_name: Some(names.peers),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([
                        (CONFIG_HASH.to_owned(), config.hash.clone()),
                        (
                            "kubectl.kubernetes.io/default-container".to_owned(),
                            "relay".to_owned(),
                        ),
                    ])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            volume_claim_templates: Some(vec![PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(SPOOL_VOLUME.into()),
                    labels: Some(selector_labels(mq)),
                    ..ObjectMeta::default()
                },
                spec: Some(claim_spec),
                ..PersistentVolumeClaim::default()
            }]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn http_probe(path: &str, period_seconds: i32, failure_threshold: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period_seconds),
        timeout_seconds: Some(2),
        failure_threshold: Some(failure_threshold),
        ..Probe::default()
    }
}

/// Requests of a relay container whose MailQueue sets no `resources`:
/// enough for the scheduler to place relays sensibly, no limits.
fn default_resources() -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(DEFAULT_CPU_REQUEST.into())),
            ("memory".to_owned(), Quantity(DEFAULT_MEMORY_REQUEST.into())),
        ])),
        ..ResourceRequirements::default()
    }
}

/// A volume of `secret`: only `keys` (each as a file of its name), or every
/// key when `keys` is empty. A listed key missing from the Secret keeps the
/// pod from starting, with an event that names it.
fn secret_volume(volume: &str, secret: &str, keys: &[&str]) -> Volume {
    Volume {
        name: volume.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            // Group-readable: the relay reads them through fsGroup.
            default_mode: Some(0o440),
            items: (!keys.is_empty()).then(|| {
                keys.iter()
                    .map(|key| KeyToPath {
                        key: (*key).into(),
                        path: (*key).into(),
                        ..KeyToPath::default()
                    })
                    .collect()
            }),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

/// Kubernetes forbids changing a StatefulSet's volumeClaimTemplates. When the
/// spec's spool size or storage class differs from the live StatefulSet's,
/// keep the live values in `desired` (so the rest still applies) and say what
/// was kept.
pub fn keep_spool_claim(desired: &mut StatefulSet, live: &StatefulSet) -> Option<String> {
    let claim_spec = |sts: &StatefulSet| {
        sts.spec
            .as_ref()?
            .volume_claim_templates
            .as_ref()?
            .iter()
            .find(|claim| claim.metadata.name.as_deref() == Some(SPOOL_VOLUME))?
            .spec
            .clone()
    };
    let facts = |spec: &PersistentVolumeClaimSpec| {
        let size = spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .map(|q| q.0.clone());
        (size, spec.storage_class_name.clone())
    };
    let live_spec = claim_spec(live)?;
    let wanted = claim_spec(desired)?;
    let (live_size, live_class) = facts(&live_spec);
    let (size, class) = facts(&wanted);
    if (&live_size, &live_class) == (&size, &class) {
        return None;
    }
    let claim = desired
        .spec
        .as_mut()?
        .volume_claim_templates
        .as_mut()?
        .iter_mut()
        .find(|claim| claim.metadata.name.as_deref() == Some(SPOOL_VOLUME))?;
    let spec = claim.spec.as_mut()?;
    if let (Some(requests), Some(live_size)) = (
        spec.resources.as_mut().and_then(|r| r.requests.as_mut()),
        &live_size,
    ) {
        requests.insert("storage".into(), Quantity(live_size.clone()));
    }
    spec.storage_class_name = live_class.clone();
    let show = |size: &Option<String>, class: &Option<String>| {
        format!(
            "{} on {}",
            size.as_deref().unwrap_or("?"),
            class.as_deref().unwrap_or("the default storage class")
        )
    };
    Some(format!(
        "spec.spool asks for {} but a StatefulSet's volume claims cannot change; the relays \
         keep {} (recreate the MailQueue, or resize the PersistentVolumeClaims, to change it)",
        show(&size, &class),
        show(&live_size, &live_class)
    ))
}
