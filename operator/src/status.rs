//! The MailQueue's status as a pure function of what reconcile observed: the
//! counts, the queue totals and the four conditions (`Ready`, `Progressing`,
//! `Degraded`, `Draining`), each with a reason and a message. A condition
//! keeps its `lastTransitionTime` while its status stays the same.
//!
//! `Degraded` names the most important fault of the relays
//! ([`crate::faults`]: an image that cannot be pulled, a missing Secret,
//! etcd unreachable, …) and lists them all; `status.state`, the STATUS
//! column, is its reason while it is true and `Ready`'s reason otherwise.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

use crate::crd::MailQueueStatus;
use crate::faults::{self, Fault};
use crate::scale::Draining;

/// Condition types.
pub const READY: &str = "Ready";
/// See [`READY`].
pub const PROGRESSING: &str = "Progressing";
/// See [`READY`].
pub const DEGRADED: &str = "Degraded";
/// See [`READY`].
pub const DRAINING: &str = "Draining";

/// What reconcile saw and did, for the status.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// The MailQueue's generation.
    pub generation: Option<i64>,
    /// `spec.replicas`.
    pub desired: i32,
    /// The StatefulSet as the API server returned it after the apply.
    pub statefulset: Option<StatefulSet>,
    /// Label selector of the relay pods.
    pub selector: String,
    /// Hash of the configuration applied.
    pub config_hash: String,
    /// Sum of the queue depths the relays reported.
    pub queue_depth: i64,
    /// Oldest queued message over all relays.
    pub oldest_message: Option<Timestamp>,
    /// Relays above the desired number.
    pub draining: Vec<Draining>,
    /// Ready relays whose `/stats` could not be read, with why.
    pub stats_failures: Vec<(String, String)>,
    /// What is wrong with the relay pods ([`crate::faults`]).
    pub faults: Vec<Fault>,
}

/// The status after a successful reconcile.
pub fn observed_status(
    observed: &Observed,
    previous: Option<&MailQueueStatus>,
    now: Timestamp,
) -> MailQueueStatus {
    let sts_status = observed
        .statefulset
        .as_ref()
        .and_then(|sts| sts.status.clone())
        .unwrap_or_default();
    let sts_generation = observed
        .statefulset
        .as_ref()
        .and_then(|sts| sts.metadata.generation);
    let replicas = sts_status.replicas;
    let ready = sts_status.ready_replicas.unwrap_or(0);
    let updated = sts_status.updated_replicas.unwrap_or(0);
    let desired = observed.desired;
    let mut conditions = Conditions::new(previous, observed.generation, now);

    if desired == 0 {
        conditions.set(
            READY,
            false,
            "ScaledToZero",
            "spec.replicas is 0: no relay runs",
        );
    } else if ready >= desired {
        conditions.set(
            READY,
            true,
            "RelaysReady",
            &format!("{ready}/{desired} relays ready"),
        );
    } else {
        conditions.set(
            READY,
            false,
            "RelaysNotReady",
            &format!("{ready}/{desired} relays ready"),
        );
    }

    let rolling = sts_status.update_revision.is_some()
        && sts_status.current_revision != sts_status.update_revision;
    let sts_behind = sts_generation.is_some() && sts_status.observed_generation < sts_generation;
    let draining_names: Vec<&str> = observed.draining.iter().map(|d| d.name.as_str()).collect();
    if !observed.draining.is_empty() {
        conditions.set(
            PROGRESSING,
            true,
            "ScalingDown",
            &format!(
                "draining {} before scaling down to {desired}",
                draining_names.join(", ")
            ),
        );
    } else if sts_behind || rolling || updated < replicas {
        conditions.set(
            PROGRESSING,
            true,
            "RollingUpdate",
            &format!(
                "{updated}/{replicas} relays run configuration {}",
                observed.config_hash
            ),
        );
    } else if replicas < desired || ready < desired {
        conditions.set(
            PROGRESSING,
            true,
            "ScalingUp",
            &format!("{replicas} relays exist, {ready} ready, {desired} wanted"),
        );
    } else {
        conditions.set(
            PROGRESSING,
            false,
            "Stable",
            &format!(
                "{desired} relays run configuration {}",
                observed.config_hash
            ),
        );
    }

    let stats_failures = (!observed.stats_failures.is_empty()).then(|| {
        let failures: Vec<String> = observed
            .stats_failures
            .iter()
            .map(|(pod, why)| format!("{pod}: {why}"))
            .collect();
        format!("no /stats from ready relays ({})", failures.join("; "))
    });
    match (faults::summary(&observed.faults), stats_failures) {
        (Some((kind, mut message)), stats_failures) => {
            if let Some(stats_failures) = stats_failures {
                message = format!("{message}; {stats_failures}");
            }
            conditions.set(DEGRADED, true, kind.reason(), &message);
        }
        (None, Some(stats_failures)) => {
            conditions.set(DEGRADED, true, "StatsUnavailable", &stats_failures);
        }
        (None, None) => {
            conditions.set(
                DEGRADED,
                false,
                "AsExpected",
                "the spec is valid and applied",
            );
        }
    }

    if observed.draining.is_empty() {
        conditions.set(DRAINING, false, "NotDraining", "no relay is being drained");
    } else {
        let detail: Vec<String> = observed
            .draining
            .iter()
            .map(|d| match (d.done, d.queue_depth) {
                (true, _) => format!("{}: drained", d.name),
                (false, Some(depth)) => format!("{}: {depth} queued", d.name),
                (false, None) => format!("{}: queue unknown", d.name),
            })
            .collect();
        conditions.set(DRAINING, true, "ScaleDown", &detail.join(", "));
    }

    MailQueueStatus {
        observed_generation: observed.generation,
        replicas,
        ready_replicas: ready,
        ready: Some(format!("{ready}/{desired}")),
        selector: Some(observed.selector.clone()),
        queue_depth: observed.queue_depth,
        oldest_message_time: observed.oldest_message.map(Time),
        draining: (!draining_names.is_empty()).then(|| draining_names.join(",")),
        config_hash: Some(observed.config_hash.clone()),
        state: conditions.state(),
        conditions: conditions.into_vec(),
    }
}

/// The status of a MailQueue that could not be applied: `Degraded` with
/// `reason` and `message`, `Ready` false when the spec itself is invalid;
/// the counts stay as last observed.
pub fn failed_status(
    previous: Option<&MailQueueStatus>,
    generation: Option<i64>,
    reason: &str,
    message: &str,
    invalid_spec: bool,
    now: Timestamp,
) -> MailQueueStatus {
    let mut status = previous.cloned().unwrap_or_default();
    let mut conditions = Conditions::new(previous, generation, now);
    conditions.set(DEGRADED, true, reason, message);
    if invalid_spec {
        conditions.set(
            READY,
            false,
            reason,
            "the spec is invalid (see Degraded); relays keep their last configuration",
        );
        conditions.set(
            PROGRESSING,
            false,
            reason,
            "nothing is applied until the spec is fixed",
        );
        status.observed_generation = generation;
    }
    for kind in [READY, PROGRESSING, DRAINING] {
        if !conditions.has(kind) {
            conditions.set(kind, false, "Unknown", "not observed yet");
        }
    }
    status.state = conditions.state();
    status.conditions = conditions.into_vec();
    status
}

/// The conditions being built, with the previous ones for transition times.
struct Conditions<'a> {
    previous: &'a [Condition],
    generation: Option<i64>,
    now: Timestamp,
    set: Vec<Condition>,
}

impl<'a> Conditions<'a> {
    fn new(previous: Option<&'a MailQueueStatus>, generation: Option<i64>, now: Timestamp) -> Self {
        let previous = previous.map_or(&[][..], |status| status.conditions.as_slice());
        // Conditions not set again keep their previous value.
        Conditions {
            previous,
            generation,
            now,
            set: previous.to_vec(),
        }
    }

    /// The STATUS column: `Degraded`'s reason while it is true, else `Ready`'s.
    fn state(&self) -> Option<String> {
        let find = |kind: &str| self.set.iter().find(|c| c.type_ == kind);
        find(DEGRADED)
            .filter(|c| c.status == "True")
            .or_else(|| find(READY))
            .map(|c| c.reason.clone())
    }

    fn has(&self, kind: &str) -> bool {
        self.set.iter().any(|c| c.type_ == kind)
    }

    fn set(&mut self, kind: &str, status: bool, reason: &str, message: &str) {
        let status = if status { "True" } else { "False" };
        let since = self
            .previous
            .iter()
            .find(|c| c.type_ == kind && c.status == status)
            .map_or(Time(self.now), |c| c.last_transition_time.clone());
        let condition = Condition {
            type_: kind.to_owned(),
            status: status.to_owned(),
            reason: reason.to_owned(),
            message: message.to_owned(),
            observed_generation: self.generation,
            last_transition_time: since,
        };
        match self.set.iter_mut().find(|c| c.type_ == kind) {
            Some(existing) => *existing = condition,
            None => self.set.push(condition),
        }
    }

    fn into_vec(mut self) -> Vec<Condition> {
        let order = |kind: &str| {
            [READY, PROGRESSING, DEGRADED, DRAINING]
                .iter()
                .position(|k| *k == kind)
                .unwrap_or(usize::MAX)
        };
        self.set.sort_by_key(|c| order(&c.type_));
        self.set
    }
}

/// The condition of a type, if set.
pub fn condition<'a>(status: &'a MailQueueStatus, kind: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == kind)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::faults::FaultKind;
    use k8s_openapi::api::apps::v1::StatefulSetStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn t(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn sts(replicas: i32, ready: i32, updated: i32) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(2),
                ..ObjectMeta::default()
            },
            status: Some(StatefulSetStatus {
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                observed_generation: Some(2),
                current_revision: Some("r1".into()),
                update_revision: Some("r1".into()),
                ..StatefulSetStatus::default()
            }),
            ..StatefulSet::default()
        }
    }

    fn observed(desired: i32, sts: StatefulSet) -> Observed {
        Observed {
            generation: Some(4),
            desired,
            statefulset: Some(sts),
            selector: "app=x".into(),
            config_hash: "abc".into(),
            ..Observed::default()
        }
    }

    #[test]
    fn all_ready_is_ready_and_stable() {
        let mut obs = observed(3, sts(3, 3, 3));
        obs.queue_depth = 12;
        obs.oldest_message = Some(t("2026-01-01T11:00:00Z"));
        let status = observed_status(&obs, None, t("2026-01-01T12:00:00Z"));
        assert_eq!(status.ready.as_deref(), Some("3/3"));
        assert_eq!(status.queue_depth, 12);
        let ready = condition(&status, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "RelaysReady")
        );
        assert_eq!(condition(&status, PROGRESSING).unwrap().reason, "Stable");
        assert_eq!(condition(&status, DEGRADED).unwrap().status, "False");
        assert_eq!(condition(&status, DRAINING).unwrap().status, "False");
        assert_eq!(status.observed_generation, Some(4));
    }

    #[test]
    fn transition_time_moves_only_when_the_status_changes() {
        let first = observed_status(&observed(3, sts(3, 1, 3)), None, t("2026-01-01T12:00:00Z"));
        let later = observed_status(
            &observed(3, sts(3, 2, 3)),
            Some(&first),
            t("2026-01-01T12:05:00Z"),
        );
        let ready = condition(&later, READY).unwrap();
        assert_eq!(ready.message, "2/3 relays ready");
        assert_eq!(ready.last_transition_time, Time(t("2026-01-01T12:00:00Z")));
        let done = observed_status(
            &observed(3, sts(3, 3, 3)),
            Some(&later),
            t("2026-01-01T12:06:00Z"),
        );
        assert_eq!(
            condition(&done, READY).unwrap().last_transition_time,
            Time(t("2026-01-01T12:06:00Z"))
        );
    }

    #[test]
    fn a_rolling_update_is_progressing() {
        let mut rolling = sts(3, 3, 1);
        rolling.status.as_mut().unwrap().update_revision = Some("r2".into());
        let status = observed_status(&observed(3, rolling), None, t("2026-01-01T12:00:00Z"));
        let progressing = condition(&status, PROGRESSING).unwrap();
        assert_eq!(progressing.reason, "RollingUpdate");
        assert_eq!(progressing.message, "1/3 relays run configuration abc");
    }

    #[test]
    fn draining_names_the_relays_and_their_queues() {
        let mut obs = observed(2, sts(3, 3, 3));
        obs.draining = vec![Draining {
            name: "mx-2".into(),
            queue_depth: Some(5),
            done: false,
        }];
        let status = observed_status(&obs, None, t("2026-01-01T12:00:00Z"));
        assert_eq!(status.draining.as_deref(), Some("mx-2"));
        let draining = condition(&status, DRAINING).unwrap();
        assert_eq!(
            (draining.status.as_str(), draining.message.as_str()),
            ("True", "mx-2: 5 queued")
        );
        assert_eq!(
            condition(&status, PROGRESSING).unwrap().reason,
            "ScalingDown"
        );
    }

    #[test]
    fn an_invalid_spec_is_degraded_and_keeps_the_counts() {
        let good = observed_status(&observed(3, sts(3, 3, 3)), None, t("2026-01-01T12:00:00Z"));
        let bad = failed_status(
            Some(&good),
            Some(5),
            "InvalidSpec",
            "spec.ackPolicy.required: too many",
            true,
            t("2026-01-01T12:01:00Z"),
        );
        assert_eq!(bad.ready_replicas, 3);
        assert_eq!(bad.observed_generation, Some(5));
        let degraded = condition(&bad, DEGRADED).unwrap();
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, "InvalidSpec");
        assert_eq!(condition(&bad, READY).unwrap().reason, "InvalidSpec");
        assert_eq!(bad.conditions.len(), 4);
        assert_eq!(bad.state.as_deref(), Some("InvalidSpec"));
    }

    fn fault(pod: &str, kind: FaultKind, cause: &str) -> Fault {
        Fault {
            pod: pod.into(),
            kind,
            cause: cause.into(),
        }
    }

    #[test]
    fn the_state_is_the_ready_reason_while_nothing_is_wrong() {
        let status = observed_status(&observed(3, sts(3, 3, 3)), None, t("2026-01-01T12:00:00Z"));
        assert_eq!(status.state.as_deref(), Some("RelaysReady"));
        let status = observed_status(&observed(3, sts(3, 1, 3)), None, t("2026-01-01T12:00:00Z"));
        assert_eq!(status.state.as_deref(), Some("RelaysNotReady"));
    }

    #[test]
    fn an_image_that_cannot_be_pulled_is_degraded_and_shown_as_the_state() {
        let mut obs = observed(2, sts(2, 0, 2));
        obs.faults = vec![
            fault(
                "mx-0",
                FaultKind::ImagePullFailed,
                "image \"p:x\" cannot be pulled (ErrImagePull)",
            ),
            fault(
                "mx-1",
                FaultKind::ImagePullFailed,
                "image \"p:x\" cannot be pulled (ErrImagePull)",
            ),
        ];
        let status = observed_status(&obs, None, t("2026-01-01T12:00:00Z"));
        let degraded = condition(&status, DEGRADED).unwrap();
        assert_eq!(
            (
                degraded.status.as_str(),
                degraded.reason.as_str(),
                degraded.message.as_str()
            ),
            (
                "True",
                "ImagePullFailed",
                "mx-0, mx-1: image \"p:x\" cannot be pulled (ErrImagePull)"
            )
        );
        assert_eq!(status.state.as_deref(), Some("ImagePullFailed"));
        assert_eq!(condition(&status, READY).unwrap().reason, "RelaysNotReady");
    }

    #[test]
    fn etcd_unreachable_keeps_ready_and_recovers_when_the_fault_clears() {
        let mut obs = observed(2, sts(2, 2, 2));
        obs.faults = vec![fault(
            "mx-1",
            FaultKind::EtcdUnreachable,
            "delivery stalled: etcd unreachable: connection refused",
        )];
        obs.stats_failures = vec![("mx-0".into(), "connection refused".into())];
        let stalled = observed_status(&obs, None, t("2026-01-01T12:00:00Z"));
        let degraded = condition(&stalled, DEGRADED).unwrap();
        assert_eq!(degraded.reason, "EtcdUnreachable");
        assert_eq!(
            degraded.message,
            "mx-1: delivery stalled: etcd unreachable: connection refused; \
             no /stats from ready relays (mx-0: connection refused)"
        );
        assert_eq!(condition(&stalled, READY).unwrap().status, "True");
        assert_eq!(stalled.state.as_deref(), Some("EtcdUnreachable"));

        let healed = observed_status(
            &observed(2, sts(2, 2, 2)),
            Some(&stalled),
            t("2026-01-01T12:03:00Z"),
        );
        let degraded = condition(&healed, DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("False", "AsExpected")
        );
        assert_eq!(
            degraded.last_transition_time,
            Time(t("2026-01-01T12:03:00Z"))
        );
        assert_eq!(healed.state.as_deref(), Some("RelaysReady"));
    }
}
