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
        pub enum Kind { $($variant),* }

        impl Kind {
            pub const ALL: &'static [Kind] = &[$(Kind::$variant),*];

            /// The `kind:` string, e.g. `DeploymentPipeline`.
            pub fn as_str(self) -> &'static str {
                match self { $(Kind::$variant => $name),* }
            }

            /// The lower-case plural used in URLs and by the CLI, e.g. `deploymentpipelines`.
            pub fn plural(self) -> &'static str {
                match self { $(Kind::$variant => $plural),* }
            }

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
    pub name: String,
    /// The owning organization, for organization- and project-scoped kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    /// The owning project, for project-scoped kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Opaque version for optimistic concurrency: the store revision of the last write to this object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Bumped by the store when, and only when, `spec` changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
    /// Set when deletion was requested while finalizers remained.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletion_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub finalizers: Vec<String>,
}

/// Any resource, with its spec and status as JSON. Typed views of each kind live in [`crate::kinds`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub spec: Value,
    #[serde(default, skip_serializing_if = "Value::is_null")]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// One observed condition, in the Kubernetes manner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: ConditionStatus,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    /// The generation of the object this condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<u64>,
    /// RFC 3339; changes only when `status` changes.
    #[serde(default)]
    pub last_transition_time: String,
}
