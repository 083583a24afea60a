//! Postern's Kubernetes operator: the `MailQueue` custom resource, pure
//! builders for the objects that run a relay cluster, and the reconcile loop
//! that applies them with server-side apply and reports status.

pub mod build;
pub mod crd;
pub mod discovery;
pub mod faults;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod reconcile;
pub mod relay_config;
pub mod scale;
pub mod stats;
pub mod status;
