//! The scale plan: how many relays the StatefulSet keeps while a scale-down
//! drains the highest ordinals first. Pure: it sees the desired and current
//! numbers and each relay pod's drain mark and queue, and says what to do.
//!
//! A relay is drained by taking it out of the SMTP Service (its traffic label
//! becomes `drain`) while it keeps delivering its queue. It is removed (the
//! StatefulSet lowered past it) once its queue is empty, it is gone, or the
//! drain timeout has passed; its spool volume stays, so a later scale-up gets
//! any message still on it back.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

/// What the plan needs to know about one relay pod.
#[derive(Debug, Clone, PartialEq)]
pub struct PodState {
    /// The pod's name (`<mailqueue>-<ordinal>`).
    pub name: String,
    /// Its StatefulSet ordinal.
    pub ordinal: i32,
    /// When the operator marked it draining, if it did.
    pub draining_since: Option<Timestamp>,
    /// Its queue depth from `/stats`, when it answered.
    pub queue_depth: Option<i64>,
}

/// A relay being drained.
#[derive(Debug, Clone, PartialEq)]
pub struct Draining {
    /// The pod.
    pub name: String,
    /// Its queue depth, when known.
    pub queue_depth: Option<i64>,
    /// Whether it may go now (queue empty or drain timeout passed).
    pub done: bool,
}

/// What reconcile does about the number of relays.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScalePlan {
    /// Replicas to apply to the StatefulSet.
    pub replicas: i32,
    /// Pods to take out of the SMTP Service now.
    pub start_draining: Vec<String>,
    /// Pods marked draining that are wanted again (a scale-up cancelled the drain).
    pub stop_draining: Vec<String>,
    /// Every relay above the desired number that still exists.
    pub draining: Vec<Draining>,
}

/// Plans the StatefulSet's replicas. `current` is its replicas now (`None`
/// before it exists).
pub fn plan(
    desired: i32,
    current: Option<i32>,
    pods: &[PodState],
    now: Timestamp,
    drain_timeout: Duration,
) -> ScalePlan {
    let mut plan = ScalePlan {
        replicas: desired,
        ..ScalePlan::default()
    };
    plan.stop_draining = pods
        .iter()
        .filter(|pod| pod.ordinal < desired && pod.draining_since.is_some())
        .map(|pod| pod.name.clone())
        .collect();
    let Some(current) = current.filter(|current| *current > desired) else {
        return plan;
    };
    let mut highest_kept = None;
    let mut excess: Vec<&PodState> = pods
        .iter()
        .filter(|pod| pod.ordinal >= desired && pod.ordinal < current)
        .collect();
    excess.sort_by_key(|pod| pod.ordinal);
    for pod in excess {
        let done = match pod.draining_since {
            None => {
                plan.start_draining.push(pod.name.clone());
                false
            }
            Some(since) => {
                let waited = now.duration_since(since);
                pod.queue_depth == Some(0)
                    || waited.as_secs()
                        >= i64::try_from(drain_timeout.as_secs()).unwrap_or(i64::MAX)
            }
        };
        if !done {
            highest_kept = Some(pod.ordinal);
        }
        plan.draining.push(Draining {
            name: pod.name.clone(),
            queue_depth: pod.queue_depth,
            done,
        });
    }
    plan.replicas = highest_kept.map_or(desired, |ordinal| ordinal + 1);
    plan
}

/// The ordinal of a StatefulSet pod from its name.
pub fn ordinal(statefulset: &str, pod: &str) -> Option<i32> {
    pod.strip_prefix(statefulset)?
        .strip_prefix('-')?
        .parse()
        .ok()
        .filter(|ordinal: &i32| *ordinal >= 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(300);

    fn now() -> Timestamp {
        "2026-01-01T12:00:00Z".parse().unwrap()
    }

    fn pod(ordinal: i32, draining_for: Option<i64>, queue: Option<i64>) -> PodState {
        PodState {
            name: format!("mx-{ordinal}"),
            ordinal,
            draining_since: draining_for
                .map(|secs| now() - k8s_openapi::jiff::SignedDuration::from_secs(secs)),
            queue_depth: queue,
        }
    }

    #[test]
    fn scale_up_and_steady_state_apply_the_spec() {
        let pods = [pod(0, None, Some(3)), pod(1, None, Some(0))];
        assert_eq!(plan(3, Some(2), &pods, now(), TIMEOUT).replicas, 3);
        assert_eq!(plan(2, Some(2), &pods, now(), TIMEOUT).replicas, 2);
        assert_eq!(plan(2, None, &[], now(), TIMEOUT).replicas, 2);
    }

    #[test]
    fn scale_down_first_marks_the_highest_ordinals_draining() {
        let pods = [
            pod(0, None, Some(0)),
            pod(1, None, Some(4)),
            pod(2, None, Some(0)),
        ];
        let plan = plan(1, Some(3), &pods, now(), TIMEOUT);
        assert_eq!(plan.replicas, 3, "nothing is removed before it is drained");
        assert_eq!(plan.start_draining, ["mx-1", "mx-2"]);
    }

    #[test]
    fn a_drained_top_relay_goes_while_a_busy_one_below_stays() {
        let pods = [
            pod(0, None, Some(0)),
            pod(1, Some(10), Some(4)),
            pod(2, Some(10), Some(0)),
        ];
        let plan = plan(1, Some(3), &pods, now(), TIMEOUT);
        assert_eq!(plan.replicas, 2);
        assert!(plan.start_draining.is_empty());
        assert_eq!(
            plan.draining.iter().map(|d| d.done).collect::<Vec<_>>(),
            [false, true]
        );
    }

    #[test]
    fn a_busy_top_relay_holds_the_ones_below() {
        let pods = [pod(1, Some(10), Some(0)), pod(2, Some(10), Some(7))];
        assert_eq!(plan(1, Some(3), &pods, now(), TIMEOUT).replicas, 3);
    }

    #[test]
    fn the_drain_timeout_ends_the_wait() {
        let pods = [pod(1, Some(301), Some(7))];
        assert_eq!(plan(1, Some(2), &pods, now(), TIMEOUT).replicas, 1);
        let pods = [pod(1, Some(120), None)];
        assert_eq!(
            plan(1, Some(2), &pods, now(), TIMEOUT).replicas,
            2,
            "no stats: wait"
        );
    }

    #[test]
    fn gone_relays_do_not_hold_the_scale_down() {
        assert_eq!(
            plan(1, Some(3), &[pod(0, None, Some(0))], now(), TIMEOUT).replicas,
            1
        );
    }

    #[test]
    fn scaling_back_up_cancels_the_drain() {
        let pods = [pod(1, Some(10), Some(3)), pod(2, Some(10), Some(3))];
        let plan = plan(3, Some(3), &pods, now(), TIMEOUT);
        assert_eq!(plan.replicas, 3);
        assert_eq!(plan.stop_draining, ["mx-1", "mx-2"]);
        assert!(plan.draining.is_empty());
    }

    #[test]
    fn ordinals_come_from_pod_names() {
        assert_eq!(ordinal("mx", "mx-12"), Some(12));
        assert_eq!(ordinal("mx", "mx-peers-1"), None);
        assert_eq!(ordinal("mx", "mxx-1"), None);
    }
}
