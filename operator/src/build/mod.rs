//! Pure builders: one function per Kubernetes object, each a function of the
//! MailQueue (and its rendered relay configuration) alone, so tests can
//! snapshot them and reconcile only has to apply what they return.
//!
//! Builders set only fields a Kubernetes 1.20 API server knows: server-side
//! apply rejects fields outside the server's schema.

mod configmap;
mod networkpolicy;
mod pdb;
mod serviceaccount;
mod services;
mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};

use crate::crd::MailQueue;

pub use configmap::config_map;
pub use networkpolicy::{network_policy, wants_network_policy};
pub use pdb::pod_disruption_budget;
pub use serviceaccount::service_account;
pub use services::{peer_service, smtp_service};
pub use statefulset::{
    keep_spool_claim, stateful_set, DEFAULT_CPU_REQUEST, DEFAULT_MEMORY_REQUEST,
};

/// Label on relay pods that the SMTP Service selects; a draining pod gets
/// [`TRAFFIC_DRAIN`] so no new sessions reach it.
pub const TRAFFIC_LABEL: &str = "postern.dev/traffic";
/// [`TRAFFIC_LABEL`] value of pods that take SMTP sessions.
pub const TRAFFIC_SERVE: &str = "serve";
/// [`TRAFFIC_LABEL`] value of pods being drained before a scale-down.
pub const TRAFFIC_DRAIN: &str = "drain";
/// Pod annotation: when the operator started draining the pod (RFC 3339).
pub const DRAINING_SINCE: &str = "postern.dev/draining-since";
/// Pod template annotation: hash of the relay configuration, so a change rolls the pods.
pub const CONFIG_HASH: &str = "postern.dev/config-hash";

/// Names of the objects a MailQueue owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// StatefulSet, SMTP Service, PodDisruptionBudget and NetworkPolicy.
    pub relay: String,
    /// Headless Service giving each relay a stable DNS name for its peers.
    pub peers: String,
    /// ConfigMap with the relay TOML.
    pub config: String,
    /// ServiceAccount of the relay pods.
    pub service_account: String,
}

impl Names {
    /// The names for a MailQueue.
    pub fn of(mq: &MailQueue) -> Names {
        let name = mq.name_any();
        Names {
            peers: format!("{name}-peers"),
            config: format!("{name}-config"),
            service_account: format!("{name}-relay"),
            relay: name,
        }
    }
}

/// Labels that select a MailQueue's relay pods (stable: a StatefulSet's
/// selector cannot change).
pub fn selector_labels(mq: &MailQueue) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "postern".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), mq.name_any()),
    ])
}

/// The selector as a string, for the scale subresource and pod listing.
pub fn selector_string(mq: &MailQueue) -> String {
    selector_labels(mq)
        .iter()
        .map(|(key, value)| format!("{key}={value}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Labels on every object a MailQueue owns.
pub fn labels(mq: &MailQueue) -> BTreeMap<String, String> {
    let mut labels = selector_labels(mq);
    labels.insert("app.kubernetes.io/component".into(), "relay".into());
    labels.insert(
        "app.kubernetes.io/managed-by".into(),
        "postern-operator".into(),
    );
    labels
}

/// The owner reference that makes the MailQueue the controller of an object
/// (garbage collection deletes the object with the MailQueue).
pub fn owner_reference(mq: &MailQueue) -> Vec<OwnerReference> {
    mq.controller_owner_ref(&()).into_iter().collect()
}

/// Metadata of an owned object.
pub fn metadata(mq: &MailQueue, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: mq.namespace(),
        labels: Some(labels(mq)),
        owner_references: Some(owner_reference(mq)),
        ..ObjectMeta::default()
    }
}
