//! Release and ReleaseBinding: what delivery is made of. A Release is an immutable snapshot of everything a
//! component runs (its workload and artifact), named by a hash of that content; a ReleaseBinding says which
//! release of a component runs in which environment. Promotion re-points a binding; rollback points it back.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::component::{ComponentType, ConcurrencyPolicy, Dependency, Endpoint};
use super::workload::{Probes, Resources, Workload};
use super::{check_name, KindSpec};
use crate::{FieldError, Kind, ObjectMeta};

/// Hex digits of the content hash used in a release's name (`<component>-<hash>`).
pub const RELEASE_HASH_LEN: usize = 10;

/// The spec of a Release. Written by the component controller; never changed after creation.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseSpec {
    /// The component this is a release of (same project).
    pub component: String,
    /// Hex SHA-256 of the canonical JSON of `snapshot`; its first ten digits end the release's name.
    pub hash: String,
    /// The component's `metadata.generation` the snapshot was taken from.
    #[serde(default)]
    pub component_generation: u64,
    /// What runs.
    pub snapshot: ReleaseSnapshot,
}

/// The part of a component's spec that decides what runs. Changing anything here makes a new release.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseSnapshot {
    /// The component's type.
    #[serde(rename = "type")]
    pub type_: ComponentType,
    /// The built artifact (an image reference) when the component is built from source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact: Option<String>,
    /// The component's workload: image or command, working directory, environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    /// Instances to run.
    pub replicas: u32,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Liveness and readiness checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<Probes>,
    /// Endpoints served.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Endpoints and services used.
    #[serde(default)]
    pub dependencies: Vec<Dependency>,
    /// The cron schedule of a scheduled task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The time zone of the schedule (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// What a due run does while another runs (default `Allow`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,
    /// Finished runs kept (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_history_limit: Option<u32>,
}

impl KindSpec for ReleaseSpec {
    const KIND: Kind = Kind::Release;

    fn validate(&self, meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_name(errors, "spec.component", &self.component);
        if self.hash.len() < RELEASE_HASH_LEN || !self.hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            errors.push(FieldError::new(
                "spec.hash",
                format!("must be at least {RELEASE_HASH_LEN} hexadecimal digits"),
            ));
        } else {
            let expected = format!("{}-{}", self.component, &self.hash[..RELEASE_HASH_LEN]);
            if meta.name != expected {
                errors.push(FieldError::new(
                    "metadata.name",
                    format!(
                        "a release of {} with hash {}… must be named {expected}",
                        self.component,
                        &self.hash[..RELEASE_HASH_LEN]
                    ),
                ));
            }
        }
    }
}

/// Whether a binding's release runs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BindingState {
    /// The release runs in the environment.
    #[default]
    Active,
    /// Nothing runs; the binding keeps its place in history.
    Undeployed,
}

/// The spec of a ReleaseBinding: component × environment → release.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseBindingSpec {
    /// The component (same project).
    pub component: String,
    /// The environment (same organization).
    pub environment: String,
    /// The release of `component` to run there.
    pub release: String,
    /// Default `active`.
    #[serde(default)]
    pub state: BindingState,
}

impl ReleaseBindingSpec {
    /// The conventional name of the binding of `component` in `environment`.
    pub fn name_for(component: &str, environment: &str) -> String {
        format!("{component}-{environment}")
    }
}

impl KindSpec for ReleaseBindingSpec {
    const KIND: Kind = Kind::ReleaseBinding;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_name(errors, "spec.component", &self.component);
        check_name(errors, "spec.environment", &self.environment);
        check_name(errors, "spec.release", &self.release);
        if !self.release.starts_with(&format!("{}-", self.component)) {
            errors.push(FieldError::new(
                "spec.release",
                format!(
                    "{:?} is not a release of component {}",
                    self.release, self.component
                ),
            ));
        }
    }
}
