//! The relays' NetworkPolicy (`spec.networkPolicy.enabled`): SMTP and the
//! HTTP port from anywhere, the peer port only from the same MailQueue's
//! relays.
//!
//! Why the operator renders it and not the chart: a NetworkPolicy admits
//! only what it lists once it selects a pod, so a policy for the relays must
//! list every listener port, and those are per MailQueue (`spec.listeners`,
//! changed at will); the peer port must be open to exactly the pods of one
//! MailQueue, which only its labels say. The chart knows neither; the
//! operator builds the policy from the same spec as the StatefulSet and the
//! Services, so a new listener is admitted in the same reconcile that opens
//! its port. The cost is RBAC on networkpolicies for the operator.

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{metadata, selector_labels, Names};
use crate::crd::MailQueue;
use crate::relay_config::{HTTP_PORT, PEER_PORT};

/// Whether the MailQueue asks for a NetworkPolicy.
pub fn wants_network_policy(mq: &MailQueue) -> bool {
    mq.spec
        .network_policy
        .as_ref()
        .is_some_and(|policy| policy.enabled)
}

fn tcp(port: i32) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("TCP".into()),
        port: Some(IntOrString::Int(port)),
        ..NetworkPolicyPort::default()
    }
}

/// The NetworkPolicy `<name>` of the relay pods (ingress only: relays reach
/// etcd, S3, DNS and next hops wherever they are).
pub fn network_policy(mq: &MailQueue) -> NetworkPolicy {
    let relays = LabelSelector {
        match_labels: Some(selector_labels(mq)),
        ..LabelSelector::default()
    };
    // Listeners and HTTP (probes come from the node, /stats from the
    // operator, /metrics from Prometheus) from anywhere.
    let mut open: Vec<NetworkPolicyPort> = mq
        .spec
        .listeners
        .iter()
        .map(|listener| tcp(listener.port))
        .collect();
    open.push(tcp(i32::from(HTTP_PORT)));
    let mut ingress = vec![NetworkPolicyIngressRule {
        ports: Some(open),
        from: None,
    }];
    if mq.spec.etcd.is_some() {
        ingress.push(NetworkPolicyIngressRule {
            ports: Some(vec![tcp(i32::from(PEER_PORT))]),
            from: Some(vec![NetworkPolicyPeer {
                pod_selector: Some(relays.clone()),
                ..NetworkPolicyPeer::default()
            }]),
        });
    }
    NetworkPolicy {
        metadata: metadata(mq, &Names::of(mq).relay),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(relays),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(ingress),
            ..NetworkPolicySpec::default()
        }),
    }
}
