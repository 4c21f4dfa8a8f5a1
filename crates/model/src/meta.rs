//! The resource envelope every kind shares: API version, [`Kind`], [`ObjectMeta`], spec, status, conditions.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The one API version every Kiln manifest carries.
pub const API_VERSION: &str = "kiln.dev/v1";

/// Where a kind's names are unique.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// One namespace for the whole server (Organization).
    Cluster,
    /// Unique within an organization.
    Organization,
    /// Unique within a project of an organization.
    Project,
}

macro_rules! kinds {
    ($( $variant:ident => $name:literal, $plural:literal, [$($alias:literal),*], $scope:ident; )*) => {
        /// Every kind the API serves.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[allow(missing_docs)]
        pub enum Kind { $($variant),* }

        impl Kind {
            /// Every kind, in the order objects are created by `kiln apply -f DIR`.
            pub const ALL: &'static [Kind] = &[$(Kind::$variant),*];

            /// The `kind:` string, e.g. `DeploymentPipeline`.
            pub fn as_str(self) -> &'static str {
                match self { $(Kind::$variant => $name),* }
            }

            /// The lower-case plural used in URLs and by the CLI, e.g. `deploymentpipelines`.
            pub fn plural(self) -> &'static str {
                match self { $(Kind::$variant => $plural),* }
            }

            /// Where names of this kind are unique.
            pub fn scope(self) -> Scope {
                match self { $(Kind::$variant => Scope::$scope),* }
            }

            /// Accepts the kind name, its plural, its singular lower-case form and short aliases,
            /// case-insensitively: `Component`, `components`, `component`, `comp`.
            pub fn parse_loose(s: &str) -> Option<Kind> {
                let l = s.to_ascii_lowercase();
                $(
                    if l == $name.to_ascii_lowercase() || l == $plural $(|| l == $alias)* {
                        return Some(Kind::$variant);
                    }
                )*
                None
            }

            /// Accepts exactly the plural as used in URLs.
            pub fn from_plural(s: &str) -> Option<Kind> {
                match s { $($plural => Some(Kind::$variant),)* _ => None }
            }
        }
    };
}

// Order matters: it is the order in which `kiln apply -f DIR` creates objects, so that what a kind refers to
// exists before it (organizations, then data planes, environments, pipelines, projects, components, access).
kinds! {
    Organization => "Organization", "organizations", ["org", "orgs"], Cluster;
    DataPlane => "DataPlane", "dataplanes", ["dp"], Organization;
    Environment => "Environment", "environments", ["env", "envs"], Organization;
    DeploymentPipeline => "DeploymentPipeline", "deploymentpipelines", ["pipeline-def", "dpl"], Organization;
    Project => "Project", "projects", ["proj"], Organization;
    Secret => "Secret", "secrets", [], Organization;
    Role => "Role", "roles", [], Organization;
    RoleBinding => "RoleBinding", "rolebindings", ["rb"], Organization;
    Component => "Component", "components", ["comp"], Project;
    Release => "Release", "releases", ["rel"], Project;
    ReleaseBinding => "ReleaseBinding", "releasebindings", ["binding", "bindings"], Project;
    Template => "Template", "templates", ["tpl"], Organization;
    TemplateVersion => "TemplateVersion", "templateversions", ["tplv"], Organization;
    Workspace => "Workspace", "workspaces", ["ws"], Organization;
    ProvisionerJob => "ProvisionerJob", "provisionerjobs", ["job", "jobs", "pj"], Organization;
    Pipeline => "Pipeline", "pipelines", ["pl"], Organization;
    PipelineRun => "PipelineRun", "pipelineruns", ["run", "runs", "pr"], Organization;
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| format!("unknown kind {s:?}"))
    }
}

/// Object metadata. Users write `name`, `labels`, `annotations` (and `organization`/`project` where the kind is
/// scoped); the store owns every other field.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectMeta {
    /// The object's name: a DNS-1123 label, unique within the kind's scope.
    pub name: String,
    /// The owning organization, for organization- and project-scoped kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// The owning project, for project-scoped kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Identifying key/value pairs, selectable (`kiln get components -l tier=web`).
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// Non-identifying key/value pairs for tools and people.
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Set by the store on creation; never reused.
    pub uid: Option<String>,
    /// Opaque version for optimistic concurrency: the store revision of the last write to this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Bumped by the store when, and only when, `spec` changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// RFC 3339, set by the store on creation.
    pub creation_timestamp: Option<String>,
    /// Set when deletion was requested while finalizers remained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// Controllers that must finish cleaning up before the object is removed.
    pub finalizers: Vec<String>,
}

/// Any resource, with its spec and status as JSON. Typed views of each kind live in [`crate::kinds`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource {
    /// Always [`API_VERSION`] once normalized.
    pub api_version: String,
    /// The kind's name, e.g. `Component`; see [`Resource::kind`].
    pub kind: String,
    /// Name, scope, labels and the store-owned fields.
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    /// What the user wants; typed by the kind's spec in [`crate::kinds`].
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    /// What the controllers observed; written only by controllers.
    pub status: Value,
}

impl Resource {
    /// The typed kind, when `kind` names one.
    pub fn kind(&self) -> Option<Kind> {
        self.kind.parse().ok()
    }

    /// The status conditions, if any are set and well-formed.
    pub fn conditions(&self) -> Vec<Condition> {
        self.status
            .get("conditions")
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default()
    }

    /// The condition of the given type, if set.
    pub fn condition(&self, type_: &str) -> Option<Condition> {
        self.conditions().into_iter().find(|c| c.type_ == type_)
    }
}

/// Whether a condition holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ConditionStatus {
    /// It holds.
    True,
    /// It does not hold.
    False,
    /// Not (yet) known.
    Unknown,
}

/// One observed condition, in the Kubernetes manner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    /// What the condition is about, e.g. `Ready`.
    pub type_: String,
    /// Whether it holds.
    pub status: ConditionStatus,
    /// A CamelCase machine-readable cause, e.g. `DataPlaneMissing`.
    #[serde(default)]
    pub reason: String,
    /// A sentence for people.
    #[serde(default)]
    pub message: String,
    /// The generation of the object this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    /// RFC 3339; changes only when `status` changes.
    #[serde(default)]
    pub last_transition_time: String,
}
