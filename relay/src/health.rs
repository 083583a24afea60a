//! Whether the relay delivers, and if not why, for `/stats` (which the
//! operator reads into the MailQueue's conditions) and `/metrics`.
//!
//! Accepting and delivering are separate: a relay that cannot reach etcd
//! keeps accepting (etcd is not in the accept path, and readiness stays
//! true) but stops delivering before its lease could expire. [`Health`]
//! says which of those holds now: running, paused by configuration,
//! draining, joining the cluster, or stalled with a [`StallReason`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why delivery is stalled (the `reason` label of `postern_delivery_stalled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallReason {
    /// Requests to etcd fail or time out: the relay cannot join or renew its
    /// lease, so it may not deliver.
    EtcdUnreachable,
    /// etcd said the lease had expired (the relay was cut off or paused for
    /// longer than the lease TTL); it is joining again with a new lease.
    LeaseExpired,
}

impl StallReason {
    /// Every reason, in the order `/metrics` lists them.
    pub const ALL: [StallReason; 2] = [StallReason::EtcdUnreachable, StallReason::LeaseExpired];

    /// The reason spelled `name` (as [`StallReason::as_str`] spells it).
    pub fn from_name(name: &str) -> Option<StallReason> {
        StallReason::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The reason as `/stats` and `/metrics` spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            StallReason::EtcdUnreachable => "etcd_unreachable",
            StallReason::LeaseExpired => "lease_expired",
        }
    }
}

/// What the relay's delivery is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Delivering.
    Running,
    /// `delivery.paused` is set: accepting and queueing only.
    Paused,
    /// Shutting down: no longer accepting, handing its spools over.
    Draining,
    /// In a cluster, before the first lease: nothing has failed yet.
    Joining,
    /// Not delivering because of a fault, with a message naming it.
    Stalled {
        /// The kind of fault.
        reason: StallReason,
        /// What failed, e.g. `etcd unreachable: cannot renew the lease: …`.
        message: String,
    },
}

impl Delivery {
    /// The state as `/stats` spells it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Delivery::Running => "running",
            Delivery::Paused => "paused",
            Delivery::Draining => "draining",
            Delivery::Joining => "joining",
            Delivery::Stalled { .. } => "stalled",
        }
    }

    /// The stall reason, if stalled.
    pub fn stall_reason(&self) -> Option<StallReason> {
        match self {
            Delivery::Stalled { reason, .. } => Some(*reason),
            _ => None,
        }
    }

    /// A sentence for people; `None` while running.
    pub fn message(&self) -> Option<String> {
        match self {
            Delivery::Running => None,
            Delivery::Paused => Some("delivery.paused is set in the configuration".into()),
            Delivery::Draining => Some("shutting down: handing the spools over".into()),
            Delivery::Joining => Some("joining the cluster".into()),
            Delivery::Stalled { message, .. } => Some(message.clone()),
        }
    }

    /// The `/stats` fields: `delivery`, and `delivery_reason` (stalled only)
    /// and `delivery_message` (all but running).
    pub fn stats_fields(&self, object: &mut serde_json::Map<String, serde_json::Value>) {
        object.insert("delivery".into(), self.as_str().into());
        if let Some(reason) = self.stall_reason() {
            object.insert("delivery_reason".into(), reason.as_str().into());
        }
        if let Some(message) = self.message() {
            object.insert("delivery_message".into(), message.into());
        }
    }
}

/// Where the cluster's view of delivery comes from (the cluster node).
pub trait ClusterDelivery: Send + Sync + std::fmt::Debug {
    /// [`Delivery::Running`] while the relay may deliver,
    /// [`Delivery::Joining`] before its first lease, else
    /// [`Delivery::Stalled`]. Cheap: no I/O.
    fn delivery(&self) -> Delivery;
}

/// The relay's delivery state, shared by the server and the HTTP endpoint.
#[derive(Debug, Clone)]
pub struct Health {
    paused: bool,
    draining: Arc<AtomicBool>,
    cluster: Option<Arc<dyn ClusterDelivery>>,
}

impl Health {
    /// `paused` is `delivery.paused`; `cluster` is the cluster node, if any.
    pub fn new(paused: bool, cluster: Option<Arc<dyn ClusterDelivery>>) -> Health {
        Health {
            paused,
            draining: Arc::new(AtomicBool::new(false)),
            cluster,
        }
    }

    /// Marks the relay as shutting down.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// The state now. Draining comes first (the relay is going away), then a
    /// cluster that stops delivery, then the configuration's pause.
    pub fn delivery(&self) -> Delivery {
        if self.draining.load(Ordering::SeqCst) {
            return Delivery::Draining;
        }
        let cluster = self
            .cluster
            .as_ref()
            .map_or(Delivery::Running, |cluster| cluster.delivery());
        match cluster {
            Delivery::Running if self.paused => Delivery::Paused,
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug)]
    struct Fixed(Mutex<Delivery>);

    impl ClusterDelivery for Fixed {
        fn delivery(&self) -> Delivery {
            self.0.lock().unwrap().clone()
        }
    }

    fn stalled() -> Delivery {
        Delivery::Stalled {
            reason: StallReason::EtcdUnreachable,
            message: "etcd unreachable: connection refused".into(),
        }
    }

    #[test]
    fn a_stalled_cluster_outranks_the_pause_and_draining_outranks_both() {
        let cluster = Arc::new(Fixed(Mutex::new(Delivery::Running)));
        let health = Health::new(true, Some(cluster.clone()));
        assert_eq!(health.delivery(), Delivery::Paused);
        *cluster.0.lock().unwrap() = stalled();
        assert_eq!(health.delivery(), stalled());
        *cluster.0.lock().unwrap() = Delivery::Joining;
        assert_eq!(health.delivery(), Delivery::Joining);
        health.set_draining();
        assert_eq!(health.delivery(), Delivery::Draining);
        assert_eq!(Health::new(false, None).delivery(), Delivery::Running);
    }

    #[test]
    fn reasons_read_back_from_their_names() {
        for reason in StallReason::ALL {
            assert_eq!(StallReason::from_name(reason.as_str()), Some(reason));
        }
        assert_eq!(StallReason::from_name("disk_full"), None);
    }

    #[test]
    fn stats_fields_carry_the_reason_only_when_stalled() {
        let mut object = serde_json::Map::new();
        stalled().stats_fields(&mut object);
        assert_eq!(
            serde_json::Value::Object(object),
            serde_json::json!({"delivery": "stalled", "delivery_reason": "etcd_unreachable",
                               "delivery_message": "etcd unreachable: connection refused"})
        );
        let mut object = serde_json::Map::new();
        Delivery::Running.stats_fields(&mut object);
        assert_eq!(
            serde_json::Value::Object(object),
            serde_json::json!({"delivery": "running"})
        );
    }
}
