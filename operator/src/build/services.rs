//! The Services: one that carries SMTP to the relays that take traffic, and a
//! headless one that gives every relay a stable DNS name for its peers.

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{metadata, selector_labels, Names, TRAFFIC_LABEL, TRAFFIC_SERVE};
use crate::crd::{MailQueue, ServiceType};
use crate::relay_config::{HTTP_PORT, PEER_PORT, PEER_PORT_NAME};

/// The SMTP Service: selects relays whose traffic label says `serve`, so a
/// relay being drained gets no new sessions.
pub fn smtp_service(mq: &MailQueue) -> Service {
    let mut meta = metadata(mq, &Names::of(mq).relay);
    if !mq.spec.service.annotations.is_empty() {
        meta.annotations = Some(mq.spec.service.annotations.clone());
    }
    let mut selector = selector_labels(mq);
    selector.insert(TRAFFIC_LABEL.into(), TRAFFIC_SERVE.into());
    let type_ = match mq.spec.service.type_ {
        ServiceType::ClusterIP => "ClusterIP",
        ServiceType::NodePort => "NodePort",
        ServiceType::LoadBalancer => "LoadBalancer",
    };
    Service {
        metadata: meta,
        spec: Some(ServiceSpec {
            type_: Some(type_.into()),
            selector: Some(selector),
            ports: Some(
                mq.spec
                    .listeners
                    .iter()
                    .map(|listener| ServicePort {
                        name: Some(listener.name.clone()),
                        protocol: Some("TCP".into()),
                        port: listener.service_port.unwrap_or(listener.port),
                        target_port: Some(IntOrString::String(listener.name.clone())),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The headless Service for peers: every relay, ready or not, under
/// `<pod>.<name>-peers.<namespace>.svc`; a clustered MailQueue's relays find
/// each other's peer port (`peer`, 9327) through it.
pub fn peer_service(mq: &MailQueue) -> Service {
    let mut ports: Vec<ServicePort> = mq
        .spec
        .listeners
        .iter()
        .map(|listener| ServicePort {
            name: Some(listener.name.clone()),
            protocol: Some("TCP".into()),
            port: listener.port,
            target_port: Some(IntOrString::Int(listener.port)),
            ..ServicePort::default()
        })
        .collect();
    ports.push(ServicePort {
        name: Some("http".into()),
        protocol: Some("TCP".into()),
        port: i32::from(HTTP_PORT),
        target_port: Some(IntOrString::Int(i32::from(HTTP_PORT))),
        ..ServicePort::default()
    });
    if mq.spec.etcd.is_some() {
        ports.push(ServicePort {
            name: Some(PEER_PORT_NAME.into()),
            protocol: Some("TCP".into()),
            port: i32::from(PEER_PORT),
            target_port: Some(IntOrString::Int(i32::from(PEER_PORT))),
            ..ServicePort::default()
        });
    }
    Service {
        metadata: metadata(mq, &Names::of(mq).peers),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(mq)),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
