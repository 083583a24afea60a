//! What the API server serves, where it differs between the Kubernetes
//! versions the operator supports: PodDisruptionBudgets are `policy/v1` from
//! 1.21 and only `policy/v1beta1` before (and 1.25 removed v1beta1).

use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client};

/// The PodDisruptionBudget API version the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PdbVersion {
    /// `policy/v1` (Kubernetes 1.21 and later).
    V1,
    /// `policy/v1beta1` (Kubernetes 1.20 and earlier).
    V1beta1,
}

/// Discovery failed or found no PodDisruptionBudget API.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The API server could not be asked.
    #[error("API discovery failed: {0}")]
    Kube(#[from] kube::Error),
    /// Neither policy/v1 nor policy/v1beta1 is served.
    #[error("the API server serves no PodDisruptionBudget API (policy/v1 or policy/v1beta1)")]
    NoPdbApi,
}

/// Asks the server (`GET /apis`) which PodDisruptionBudget version it serves.
pub async fn pdb_version(client: &Client) -> Result<PdbVersion, DiscoveryError> {
    let groups = client.list_api_groups().await?;
    let versions: Vec<&str> = groups
        .groups
        .iter()
        .filter(|group| group.name == "policy")
        .flat_map(|group| group.versions.iter().map(|v| v.version.as_str()))
        .collect();
    if versions.contains(&"v1") {
        Ok(PdbVersion::V1)
    } else if versions.contains(&"v1beta1") {
        Ok(PdbVersion::V1beta1)
    } else {
        Err(DiscoveryError::NoPdbApi)
    }
}

impl PdbVersion {
    /// The API resource of PodDisruptionBudgets in this version.
    pub fn api_resource(self) -> ApiResource {
        let version = match self {
            PdbVersion::V1 => "v1",
            PdbVersion::V1beta1 => "v1beta1",
        };
        ApiResource {
            group: "policy".into(),
            version: version.into(),
            api_version: format!("policy/{version}"),
            kind: "PodDisruptionBudget".into(),
            plural: "poddisruptionbudgets".into(),
        }
    }

    /// Server-side applies a PodDisruptionBudget built as `policy/v1` in this
    /// version (the fields the builder sets mean the same in v1beta1).
    pub async fn apply(
        self,
        client: Client,
        namespace: &str,
        pdb: &PodDisruptionBudget,
        params: &PatchParams,
    ) -> Result<DynamicObject, kube::Error> {
        let resource = self.api_resource();
        let mut body = serde_json::to_value(pdb).map_err(kube::Error::SerdeError)?;
        body["apiVersion"] = resource.api_version.clone().into();
        body["kind"] = resource.kind.clone().into();
        let name = pdb.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> = Api::namespaced_with(client, namespace, &resource);
        api.patch(&name, params, &Patch::Apply(&body)).await
    }
}
