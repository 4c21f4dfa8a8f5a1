//! Organization: the tenant boundary, with its isolation mode, network policy defaults and resource quotas.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{FirstSeen, KindSpec};
use crate::names::{field, index};
use crate::{FieldError, Kind, ObjectMeta, Quantity};

/// The spec of an Organization.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OrganizationSpec {
    /// Human-readable name shown in the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// How strictly the organization's workloads are separated from other organizations'. Default `shared`.
    #[serde(default)]
    pub isolation: Isolation,
    /// Network policy defaults applied to every environment of the organization.
    #[serde(default)]
    pub network_policies: NetworkPolicies,
    /// Upper bounds on what the organization's workloads may request, summed over all of them; enforced when a
    /// Component is written (replicas × limits, or requests where a component sets no limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_quotas: Option<ResourceQuotas>,
}

/// Tenant isolation mode.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Dedicated namespaces/networks per organization, with nothing shared with other organizations.
    Strict,
    /// Shared infrastructure; separation by namespace and policy only.
    #[default]
    Shared,
}

/// Network policy defaults.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicies {
    /// Deny all traffic that `allowedCommunication` does not allow. Default false.
    #[serde(default)]
    pub default_deny: bool,
    /// Which traffic is allowed when `defaultDeny` is set.
    #[serde(default)]
    pub allowed_communication: Vec<Communication>,
}

/// A class of network traffic.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Communication {
    /// Within one project and environment.
    Internal,
    /// Between projects of the same organization.
    Organization,
    /// From outside the organization (the gateway).
    Public,
}

/// Resource quotas in Kubernetes quantity syntax.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceQuotas {
    /// CPU cores, e.g. `100` or `500m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory bytes, e.g. `500Gi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Persistent storage bytes, e.g. `1Ti`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Quantity>,
    /// Replicas, summed over the organization's components.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// Workspaces running (or starting) at once in the organization.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_workspaces: Option<u32>,
}

impl KindSpec for OrganizationSpec {
    const KIND: Kind = Kind::Organization;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        let list = "spec.networkPolicies.allowedCommunication";
        let mut seen = FirstSeen::default();
        for (i, c) in self
            .network_policies
            .allowed_communication
            .iter()
            .enumerate()
        {
            if let Some(first) = seen.check(c, i) {
                errors.push(FieldError::new(
                    index(list, i),
                    format!("duplicate value (also at {})", index(list, first)),
                ));
            }
        }
        if let Some(q) = &self.resource_quotas {
            let base = "spec.resourceQuotas";
            for (name, value) in [
                ("cpu", &q.cpu),
                ("memory", &q.memory),
                ("storage", &q.storage),
            ] {
                if let Some(e) = value
                    .as_ref()
                    .and_then(|v| v.validate(&field(base, name)).err())
                {
                    errors.push(e);
                }
            }
        }
    }
}
