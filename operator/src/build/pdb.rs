//! The PodDisruptionBudget: voluntary disruptions (node drains) take one
//! relay at a time. Built as `policy/v1`; [`crate::discovery`] serves it as
//! `policy/v1beta1` to servers that lack v1 (the shape used here is the same).

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{metadata, selector_labels, Names};
use crate::crd::MailQueue;

/// The PodDisruptionBudget of the relay pods (maxUnavailable 1).
pub fn pod_disruption_budget(mq: &MailQueue) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: metadata(mq, &Names::of(mq).relay),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(mq)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
