//! What is wrong with a MailQueue's relays, found in what reconcile already
//! reads: the relay pods' container states, the kubelet's `FailedMount`
//! events of pods stuck creating, and the relays' `/stats`. Pure functions:
//! each returns [`Fault`]s (pod, kind, cause), and [`summary`] turns them
//! into the `Degraded` condition's reason and message.
//!
//! A Secret the pods mount (the peer secret, TLS, route credentials) that
//! does not exist leaves the pod in `ContainerCreating` with a `FailedMount`
//! event; a missing Secret referenced from the environment (object-store
//! credentials) gives `CreateContainerConfigError`. The operator does not
//! read Secrets (its RBAC grants none: a `get` on Secrets would be every
//! Secret of every watched namespace), so it learns of a missing one from the
//! kubelet's pod status and events, which name it.

use k8s_openapi::api::core::v1::{ContainerStatus, Event, Pod};
use kube::ResourceExt;
use postern::health::StallReason;

use crate::stats::{DeliveryState, RelayStats};

/// The kind of fault; the declaration order is the order of importance
/// (the first one present names the `Degraded` condition's reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FaultKind {
    /// The relay image cannot be pulled (`ErrImagePull`, `ImagePullBackOff`,
    /// `InvalidImageName`, `ErrImageNeverPull`).
    ImagePullFailed,
    /// The Secret named by `spec.etcd.peerSecret` does not exist.
    PeerSecretMissing,
    /// Another Secret the pods use does not exist.
    SecretMissing,
    /// Any other `CreateContainerConfigError` (e.g. a key missing from a Secret).
    ContainerConfigError,
    /// The relay container exits again and again (`CrashLoopBackOff`).
    RelayCrashLooping,
    /// The relay reports delivery stalled because etcd does not answer.
    EtcdUnreachable,
    /// The relay reports delivery stalled for another reason.
    DeliveryStalled,
}

impl FaultKind {
    /// The condition reason (also what `kubectl get mq` shows under STATUS).
    pub fn reason(self) -> &'static str {
        match self {
            FaultKind::ImagePullFailed => "ImagePullFailed",
            FaultKind::PeerSecretMissing => "PeerSecretMissing",
            FaultKind::SecretMissing => "SecretMissing",
            FaultKind::ContainerConfigError => "ContainerConfigError",
            FaultKind::RelayCrashLooping => "RelayCrashLooping",
            FaultKind::EtcdUnreachable => "EtcdUnreachable",
            FaultKind::DeliveryStalled => "DeliveryStalled",
        }
    }
}

/// One fault of one relay pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The pod's name.
    pub pod: String,
    /// What kind of fault.
    pub kind: FaultKind,
    /// What is wrong, in words (pods with the same cause are listed together).
    pub cause: String,
}

/// Waiting reasons of a container whose image cannot be pulled.
const IMAGE_PULL: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];

/// Longest kubelet message quoted in a cause.
const QUOTE: usize = 300;

fn quote(text: &str) -> String {
    let mut quoted: String = text.chars().take(QUOTE).collect();
    if text.chars().nth(QUOTE).is_some() {
        quoted.push('…');
    }
    quoted
}

fn statuses(pod: &Pod) -> impl Iterator<Item = &ContainerStatus> {
    pod.status.as_ref().into_iter().flat_map(|status| {
        status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
    })
}

/// The Secret a kubelet message says is missing: the `NAME` of
/// `secret "NAME" not found` (the wording of kubelets since 1.x for both
/// volumes and environment references).
fn missing_secret(message: &str) -> Option<&str> {
    let start = message.find("secret \"")? + "secret \"".len();
    let rest = &message[start..];
    let end = rest.find('"')?;
    rest[end..]
        .starts_with("\" not found")
        .then(|| &rest[..end])
}

fn secret_fault(pod: &str, secret: &str, peer_secret: Option<&str>, seen: &str) -> Fault {
    if peer_secret == Some(secret) {
        Fault {
            pod: pod.to_owned(),
            kind: FaultKind::PeerSecretMissing,
            cause: format!(
                "Secret {secret:?} named by spec.etcd.peerSecret does not exist ({seen})"
            ),
        }
    } else {
        Fault {
            pod: pod.to_owned(),
            kind: FaultKind::SecretMissing,
            cause: format!("Secret {secret:?} does not exist ({seen})"),
        }
    }
}

/// Faults shown by the pod's container states: images that cannot be
/// pulled, container configuration errors (a missing Secret among them),
/// crash loops.
pub fn container_faults(pod: &Pod, peer_secret: Option<&str>) -> Vec<Fault> {
    let name = pod.name_any();
    let mut faults = Vec::new();
    for status in statuses(pod) {
        let Some(waiting) = status.state.as_ref().and_then(|s| s.waiting.as_ref()) else {
            continue;
        };
        let reason = waiting.reason.as_deref().unwrap_or_default();
        let message = waiting.message.as_deref().unwrap_or_default();
        let fault = if IMAGE_PULL.contains(&reason) {
            Fault {
                pod: name.clone(),
                kind: FaultKind::ImagePullFailed,
                cause: format!(
                    "image {:?} cannot be pulled ({reason}{}{})",
                    status.image,
                    if message.is_empty() { "" } else { ": " },
                    quote(message)
                ),
            }
        } else if reason == "CreateContainerConfigError" {
            match missing_secret(message) {
                Some(secret) => {
                    secret_fault(&name, secret, peer_secret, "CreateContainerConfigError")
                }
                None => Fault {
                    pod: name.clone(),
                    kind: FaultKind::ContainerConfigError,
                    cause: format!("CreateContainerConfigError: {}", quote(message)),
                },
            }
        } else if reason == "CrashLoopBackOff" {
            let last = status
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| {
                    let mut last = format!("last exit code {}", t.exit_code);
                    if let Some(message) = t.message.as_deref().filter(|m| !m.trim().is_empty()) {
                        last += &format!(": {}", quote(message.trim()));
                    }
                    last
                })
                .unwrap_or_else(|| "no exit status yet".into());
            Fault {
                pod: name.clone(),
                kind: FaultKind::RelayCrashLooping,
                cause: format!(
                    "container {} keeps exiting (CrashLoopBackOff, {last})",
                    status.name
                ),
            }
        } else {
            continue;
        };
        if !faults.contains(&fault) {
            faults.push(fault);
        }
    }
    faults
}

/// Whether the pod is still being set up (a container waits in
/// `ContainerCreating`): then its `FailedMount` events say what it waits for.
pub fn creating(pod: &Pod) -> bool {
    statuses(pod).any(|status| {
        status
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .and_then(|w| w.reason.as_deref())
            == Some("ContainerCreating")
    })
}

/// Faults shown by `FailedMount` events of this pod (matched by uid, so
/// events of an earlier pod of the same name do not count): Secrets that do
/// not exist.
pub fn mount_faults(pod: &Pod, events: &[Event], peer_secret: Option<&str>) -> Vec<Fault> {
    let Some(uid) = pod.metadata.uid.as_deref() else {
        return Vec::new();
    };
    let name = pod.name_any();
    let mut faults: Vec<Fault> = Vec::new();
    for event in events {
        if event.involved_object.uid.as_deref() != Some(uid)
            || event.reason.as_deref() != Some("FailedMount")
        {
            continue;
        }
        let Some(secret) = event.message.as_deref().and_then(missing_secret) else {
            continue;
        };
        let fault = secret_fault(&name, secret, peer_secret, "FailedMount");
        if !faults.contains(&fault) {
            faults.push(fault);
        }
    }
    faults
}

/// The fault a relay reports in its `/stats`: delivery stalled, and why.
pub fn delivery_fault(pod: &str, stats: &RelayStats) -> Option<Fault> {
    if stats.delivery != Some(DeliveryState::Stalled) {
        return None;
    }
    let reason = stats.delivery_reason.as_deref().unwrap_or("unknown");
    let kind = match StallReason::from_name(reason) {
        Some(StallReason::EtcdUnreachable) => FaultKind::EtcdUnreachable,
        _ => FaultKind::DeliveryStalled,
    };
    let cause = match (&stats.delivery_message, kind) {
        (Some(message), FaultKind::EtcdUnreachable) => {
            format!("delivery stalled: {}", quote(message))
        }
        (Some(message), _) => format!("delivery stalled ({reason}): {}", quote(message)),
        (None, _) => format!("delivery stalled ({reason})"),
    };
    Some(Fault {
        pod: pod.to_owned(),
        kind,
        cause,
    })
}

/// The most important kind among `faults` and a message listing every
/// fault, pods with the same cause together (`mx-0, mx-1: …; mx-2: …`),
/// most important kind first, otherwise in the order found. `None` without
/// faults.
pub fn summary(faults: &[Fault]) -> Option<(FaultKind, String)> {
    let kind = faults.iter().map(|f| f.kind).min()?;
    let mut by_cause: Vec<(FaultKind, &str, Vec<&str>)> = Vec::new();
    for fault in faults {
        match by_cause
            .iter_mut()
            .find(|(kind, cause, _)| *kind == fault.kind && *cause == fault.cause)
        {
            Some((_, _, pods)) if pods.contains(&fault.pod.as_str()) => {}
            Some((_, _, pods)) => pods.push(&fault.pod),
            None => by_cause.push((fault.kind, &fault.cause, vec![&fault.pod])),
        }
    }
    by_cause.sort_by_key(|(kind, _, _)| *kind);
    let parts: Vec<String> = by_cause
        .into_iter()
        .map(|(_, cause, pods)| format!("{}: {cause}", pods.join(", ")))
        .collect();
    Some((kind, parts.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, uid: &str, waiting: Option<(&str, &str)>) -> Pod {
        let state = match waiting {
            Some((reason, message)) => json!({"waiting": {"reason": reason, "message": message}}),
            None => json!({"running": {"startedAt": "2026-01-01T12:00:00Z"}}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": uid},
            "status": {"phase": "Pending", "containerStatuses": [{
                "name": "relay", "image": "postern:nope", "imageID": "", "ready": false,
                "restartCount": 0, "state": state}]}
        }))
        .unwrap()
    }

    fn event(uid: &str, reason: &str, message: &str) -> Event {
        serde_json::from_value(json!({
            "metadata": {"name": "mx-0.1"},
            "involvedObject": {"kind": "Pod", "name": "mx-0", "uid": uid},
            "reason": reason, "message": message, "type": "Warning"
        }))
        .unwrap()
    }

    #[test]
    fn image_pull_failures_name_the_image_and_the_kubelets_words() {
        for reason in IMAGE_PULL {
            let faults = container_faults(
                &pod("mx-0", "u0", Some((reason, "pull access denied"))),
                None,
            );
            assert_eq!(faults.len(), 1, "{reason}");
            assert_eq!(faults[0].kind, FaultKind::ImagePullFailed);
            assert_eq!(
                faults[0].cause,
                format!("image \"postern:nope\" cannot be pulled ({reason}: pull access denied)")
            );
        }
        assert!(container_faults(&pod("mx-0", "u0", None), None).is_empty());
        assert!(
            container_faults(&pod("mx-0", "u0", Some(("ContainerCreating", ""))), None).is_empty()
        );
    }

    #[test]
    fn a_config_error_names_a_missing_secret_and_tells_the_peer_secret_apart() {
        let missing = pod(
            "mx-0",
            "u0",
            Some(("CreateContainerConfigError", "secret \"mx-peer\" not found")),
        );
        let faults = container_faults(&missing, Some("mx-peer"));
        assert_eq!(faults[0].kind, FaultKind::PeerSecretMissing);
        assert_eq!(
            faults[0].cause,
            "Secret \"mx-peer\" named by spec.etcd.peerSecret does not exist \
             (CreateContainerConfigError)"
        );
        assert_eq!(
            container_faults(&missing, Some("other"))[0].kind,
            FaultKind::SecretMissing
        );
        let key = pod(
            "mx-0",
            "u0",
            Some((
                "CreateContainerConfigError",
                "couldn't find key AWS_ACCESS_KEY_ID in Secret mail/s3",
            )),
        );
        let faults = container_faults(&key, None);
        assert_eq!(faults[0].kind, FaultKind::ContainerConfigError);
        assert!(faults[0].cause.contains("AWS_ACCESS_KEY_ID"), "{faults:?}");
    }

    #[test]
    fn a_crash_loop_quotes_the_last_exit() {
        let mut crashing = pod("mx-0", "u0", Some(("CrashLoopBackOff", "back-off 5m0s")));
        crashing
            .status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .last_state = Some(
            serde_json::from_value(json!({"terminated": {"exitCode": 1,
                    "message": "Error: cannot read /etc/postern/postern.toml\n"}}))
            .unwrap(),
        );
        let faults = container_faults(&crashing, None);
        assert_eq!(faults[0].kind, FaultKind::RelayCrashLooping);
        assert_eq!(
            faults[0].cause,
            "container relay keeps exiting (CrashLoopBackOff, last exit code 1: \
             Error: cannot read /etc/postern/postern.toml)"
        );
    }

    #[test]
    fn failed_mounts_of_this_pod_name_the_missing_secret() {
        let creating_pod = pod("mx-0", "u1", Some(("ContainerCreating", "")));
        assert!(creating(&creating_pod));
        assert!(!creating(&pod("mx-0", "u1", None)));
        let events = [
            // An earlier pod of the same name: not this one's problem.
            event(
                "u0",
                "FailedMount",
                "MountVolume.SetUp failed for volume \"tls-smtp\" : secret \"old\" not found",
            ),
            event(
                "u1",
                "FailedMount",
                "MountVolume.SetUp failed for volume \"peer-secret\" : secret \"mx-peer\" not found",
            ),
            event(
                "u1",
                "FailedMount",
                "MountVolume.SetUp failed for volume \"peer-secret\" : secret \"mx-peer\" not found",
            ),
            event("u1", "Scheduled", "Successfully assigned mail/mx-0 to node-1"),
            event(
                "u1",
                "FailedMount",
                "Unable to attach or mount volumes: timed out waiting for the condition",
            ),
        ];
        let faults = mount_faults(&creating_pod, &events, Some("mx-peer"));
        assert_eq!(
            faults,
            [Fault {
                pod: "mx-0".into(),
                kind: FaultKind::PeerSecretMissing,
                cause: "Secret \"mx-peer\" named by spec.etcd.peerSecret does not exist \
                        (FailedMount)"
                    .into(),
            }]
        );
    }

    #[test]
    fn a_stalled_relay_is_etcd_unreachable_or_stalled() {
        let mut stats = RelayStats {
            ready: true,
            delivery: Some(DeliveryState::Stalled),
            delivery_reason: Some("etcd_unreachable".into()),
            delivery_message: Some("etcd unreachable: cannot renew the lease: refused".into()),
            ..RelayStats::default()
        };
        let fault = delivery_fault("mx-1", &stats).unwrap();
        assert_eq!(fault.kind, FaultKind::EtcdUnreachable);
        assert_eq!(
            fault.cause,
            "delivery stalled: etcd unreachable: cannot renew the lease: refused"
        );
        stats.delivery_reason = Some("lease_expired".into());
        stats.delivery_message = None;
        let fault = delivery_fault("mx-1", &stats).unwrap();
        assert_eq!(fault.kind, FaultKind::DeliveryStalled);
        assert_eq!(fault.cause, "delivery stalled (lease_expired)");
        stats.delivery = Some(DeliveryState::Paused);
        assert_eq!(delivery_fault("mx-1", &stats), None);
        stats.delivery = None;
        assert_eq!(delivery_fault("mx-1", &stats), None);
    }

    #[test]
    fn the_summary_leads_with_the_most_important_kind_and_groups_pods() {
        let fault = |pod: &str, kind, cause: &str| Fault {
            pod: pod.into(),
            kind,
            cause: cause.into(),
        };
        let faults = [
            fault(
                "mx-0",
                FaultKind::EtcdUnreachable,
                "delivery stalled: etcd unreachable: x",
            ),
            fault(
                "mx-2",
                FaultKind::ImagePullFailed,
                "image \"p:2\" cannot be pulled (ErrImagePull)",
            ),
            fault(
                "mx-1",
                FaultKind::EtcdUnreachable,
                "delivery stalled: etcd unreachable: x",
            ),
        ];
        let (kind, message) = summary(&faults).unwrap();
        assert_eq!(kind, FaultKind::ImagePullFailed);
        assert_eq!(
            message,
            "mx-2: image \"p:2\" cannot be pulled (ErrImagePull); \
             mx-0, mx-1: delivery stalled: etcd unreachable: x"
        );
        assert_eq!(summary(&[]), None);
    }

    #[test]
    fn long_kubelet_messages_are_cut() {
        let long = "x".repeat(1000);
        let faults = container_faults(&pod("mx-0", "u0", Some(("ErrImagePull", &long))), None);
        assert!(faults[0].cause.chars().count() < 400, "{}", faults[0].cause);
        assert!(faults[0].cause.ends_with("…)"));
    }
}
