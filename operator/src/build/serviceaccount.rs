//! The relay pods' ServiceAccount: relays need no Kubernetes API access, so
//! no token is mounted.

use k8s_openapi::api::core::v1::ServiceAccount;

use super::{metadata, Names};
use crate::crd::MailQueue;

/// The ServiceAccount of the relay pods.
pub fn service_account(mq: &MailQueue) -> ServiceAccount {
    ServiceAccount {
        metadata: metadata(mq, &Names::of(mq).service_account),
        automount_service_account_token: Some(false),
        ..ServiceAccount::default()
    }
}
