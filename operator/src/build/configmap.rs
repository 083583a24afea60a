//! The ConfigMap holding the relay's TOML configuration.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use super::{metadata, Names, CONFIG_HASH};
use crate::crd::MailQueue;
use crate::relay_config::{RelayConfig, CONFIG_FILE};

/// The ConfigMap with `postern.toml`.
pub fn config_map(mq: &MailQueue, config: &RelayConfig) -> ConfigMap {
    let mut meta = metadata(mq, &Names::of(mq).config);
    meta.annotations = Some(BTreeMap::from([(
        CONFIG_HASH.to_owned(),
        config.hash.clone(),
    )]));
    ConfigMap {
        metadata: meta,
        data: Some(BTreeMap::from([(
            CONFIG_FILE.to_owned(),
            config.toml.clone(),
        )])),
        ..ConfigMap::default()
    }
}
