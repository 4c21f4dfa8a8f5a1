//! The typed `spec` of every kind, with serde defaults and semantic validation.
//!
//! Each spec is `deny_unknown_fields` and camelCase; every field with a default is filled in when a spec is
//! decoded and re-encoded, so a stored object always shows the values in effect. Validation is separate from
//! decoding: [`KindSpec::validate`] collects every problem with its path rooted at the manifest (`spec.…`).

mod component;
mod dataplane;
mod environment;
mod organization;
mod pipeline;
mod project;
mod rbac;
mod release;
mod secret;
mod workload;
mod workspace;

pub use component::{
    Build, ComponentSpec, ComponentType, ConcurrencyPolicy, Dependency, Endpoint, EndpointProtocol,
    GitSource, Source, Visibility, DEFAULT_RUN_HISTORY, MAX_REPLICAS, MAX_RUN_HISTORY,
};
pub use dataplane::{
    Cluster, DataPlaneSpec, DataPlaneType, DockerConfig, KubernetesConfig, NodeGroup, ProcessConfig,
};
pub use environment::{DeploymentPipelineSpec, EnvironmentSpec, PromotionPath, PromotionTarget};
pub use organization::{
    Communication, Isolation, NetworkPolicies, OrganizationSpec, ResourceQuotas,
};
pub use pipeline::{
    check_commit, expand_steps, glob_match, Approval, Cache, CronTrigger, Event, Failure,
    GitProvider, ImageTrigger, PipelineParam, PipelineRunSpec, PipelineSource, PipelineSpec,
    PollTrigger, Retry, RunTrigger, SecretKeyRef, SecretRef, Service, StatusCondition, Step,
    StepApproval, Trigger, WebhookTrigger, When, MAX_ATTEMPTS, MAX_MATRIX, MAX_STEPS,
    PIPELINE_LABEL,
};
pub use project::{ProjectComponent, ProjectSpec, DEFAULT_PIPELINE};
pub use rbac::{
    builtin_roles, is_builtin_role, PolicyRule, RoleBindingSpec, RoleSpec, Subject, SubjectKind,
    Verb,
};
pub use release::{
    BindingState, ReleaseBindingSpec, ReleaseSnapshot, ReleaseSpec, RELEASE_HASH_LEN,
};
pub use secret::SecretSpec;
pub use workload::{
    EnvVar, ExecAction, HttpGetAction, Probe, Probes, ResourceList, Resources, TcpSocketAction,
    Workload,
};
pub use workspace::{
    parse_duration, resolve_parameters, AgentSpec, App, Autostart, DesiredState, DockerTemplate,
    Healthcheck, MetadataItem, Parameter, ParameterOption, ParameterType, ProvisionerJobSpec,
    ProvisionerType, Script, ShareLevel, TemplateSpec, TemplateVersionSpec, Transition, Validation,
    WorkspaceSpec, MAX_TEMPLATE_FILES, TEMPLATE_HASH_LEN,
};

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;

use schemars::JsonSchema;
use serde::{de::DeserializeOwned, Serialize};

use crate::names::{field, index};
use crate::{validate_name, FieldError, Kind, ObjectMeta};

/// What every kind's spec type provides.
pub trait KindSpec: Serialize + DeserializeOwned + JsonSchema + Clone + Debug + PartialEq {
    /// The kind this is the spec of.
    const KIND: Kind;

    /// Fills in defaults that depend on other fields or on the metadata. Plain defaults come from serde.
    fn apply_defaults(&mut self, _meta: &ObjectMeta) {}

    /// Pushes every semantic problem found, each with a path under `spec`.
    fn validate(&self, meta: &ObjectMeta, errors: &mut Vec<FieldError>);
}

pub(crate) fn default_true() -> bool {
    true
}

/// Validates a reference to another object by name, pushing the error if any.
pub(crate) fn check_name(errors: &mut Vec<FieldError>, path: &str, name: &str) {
    if let Err(e) = validate_name(path, name) {
        errors.push(e);
    }
}

/// Validates each `name` of a list of named items and reports duplicates, e.g.
/// `spec.endpoints[1].name: duplicate name "api" (also at spec.endpoints[0])`.
pub(crate) fn check_unique_names<'a>(
    errors: &mut Vec<FieldError>,
    list_path: &str,
    names: impl IntoIterator<Item = &'a str>,
) {
    let mut seen = FirstSeen::default();
    for (i, name) in names.into_iter().enumerate() {
        let path = field(&index(list_path, i), "name");
        check_name(errors, &path, name);
        if let Some(first) = seen.check(name, i) {
            errors.push(FieldError::new(
                path,
                format!(
                    "duplicate name {name:?} (also at {})",
                    index(list_path, first)
                ),
            ));
        }
    }
}

/// Remembers where each value was first seen, to report duplicates in linear time.
pub(crate) struct FirstSeen<'a, T: ?Sized>(HashMap<&'a T, usize>);

impl<T: ?Sized> Default for FirstSeen<'_, T> {
    fn default() -> Self {
        Self(HashMap::new())
    }
}

impl<'a, T: ?Sized + Eq + Hash> FirstSeen<'a, T> {
    /// Records `value` at `i`; returns where it was seen first if this is a repeat.
    pub(crate) fn check(&mut self, value: &'a T, i: usize) -> Option<usize> {
        match self.0.entry(value) {
            Entry::Occupied(e) => Some(*e.get()),
            Entry::Vacant(e) => {
                e.insert(i);
                None
            }
        }
    }
}

/// Rejects an empty or whitespace-only string that must carry a value.
/// Checks that `tz` looks like an IANA time zone name. Whether the zone exists is checked where the time-zone
/// database is (at admission).
pub(crate) fn check_timezone(errors: &mut Vec<FieldError>, path: &str, tz: &str) {
    let ok = !tz.is_empty()
        && tz.len() <= 64
        && tz
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/_+-".contains(&b))
        && !tz.starts_with('/')
        && !tz.split('/').any(|p| p.is_empty() || p == "." || p == "..");
    if !ok {
        errors.push(FieldError::new(
            path,
            format!("{tz:?} is not an IANA time zone name (such as \"Europe/Paris\" or \"UTC\")"),
        ));
    }
}

pub(crate) fn check_not_blank(errors: &mut Vec<FieldError>, path: &str, value: &str) {
    if value.trim().is_empty() {
        errors.push(FieldError::new(path, "must not be empty"));
    }
}

/// Calls `$f::<SpecType>($args…)` with the spec type of `$kind`.
macro_rules! with_spec_type {
    ($kind:expr, $f:ident ( $($arg:expr),* )) => {
        match $kind {
            $crate::Kind::Organization => $f::<$crate::kinds::OrganizationSpec>($($arg),*),
            $crate::Kind::DataPlane => $f::<$crate::kinds::DataPlaneSpec>($($arg),*),
            $crate::Kind::Environment => $f::<$crate::kinds::EnvironmentSpec>($($arg),*),
            $crate::Kind::DeploymentPipeline => $f::<$crate::kinds::DeploymentPipelineSpec>($($arg),*),
            $crate::Kind::Project => $f::<$crate::kinds::ProjectSpec>($($arg),*),
            $crate::Kind::Secret => $f::<$crate::kinds::SecretSpec>($($arg),*),
            $crate::Kind::Role => $f::<$crate::kinds::RoleSpec>($($arg),*),
            $crate::Kind::RoleBinding => $f::<$crate::kinds::RoleBindingSpec>($($arg),*),
            $crate::Kind::Component => $f::<$crate::kinds::ComponentSpec>($($arg),*),
            $crate::Kind::Release => $f::<$crate::kinds::ReleaseSpec>($($arg),*),
            $crate::Kind::ReleaseBinding => $f::<$crate::kinds::ReleaseBindingSpec>($($arg),*),
            $crate::Kind::Template => $f::<$crate::kinds::TemplateSpec>($($arg),*),
            $crate::Kind::TemplateVersion => $f::<$crate::kinds::TemplateVersionSpec>($($arg),*),
            $crate::Kind::Workspace => $f::<$crate::kinds::WorkspaceSpec>($($arg),*),
            $crate::Kind::ProvisionerJob => $f::<$crate::kinds::ProvisionerJobSpec>($($arg),*),
            $crate::Kind::Pipeline => $f::<$crate::kinds::PipelineSpec>($($arg),*),
            $crate::Kind::PipelineRun => $f::<$crate::kinds::PipelineRunSpec>($($arg),*),
        }
    };
}
pub(crate) use with_spec_type;

/// The JSON Schema of `kind`'s spec, for the OpenAPI document and editor integrations.
pub fn spec_schema(kind: Kind) -> schemars::schema::RootSchema {
    fn schema<T: KindSpec>() -> schemars::schema::RootSchema {
        schemars::schema_for!(T)
    }
    with_spec_type!(kind, schema())
}
