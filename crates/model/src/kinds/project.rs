//! Project: a group of components promoted together along one deployment pipeline.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_not_blank, check_unique_names, KindSpec};
use crate::names::{field, index};
use crate::{FieldError, Kind, ObjectMeta};

/// The pipeline a project uses when it names none.
pub const DEFAULT_PIPELINE: &str = "default";

fn default_pipeline() -> String {
    DEFAULT_PIPELINE.to_string()
}

/// The spec of a Project.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectSpec {
    /// Human-readable name shown in the console.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The DeploymentPipeline (in the same organization) that orders this project's environments.
    /// Default `default`.
    #[serde(default = "default_pipeline")]
    pub deployment_pipeline_ref: String,
    /// The components that make up the project and where their sources live (e.g. folders of a monorepo).
    /// The Component objects themselves are separate resources.
    #[serde(default)]
    pub components: Vec<ProjectComponent>,
}

impl Default for ProjectSpec {
    fn default() -> Self {
        Self {
            display_name: None,
            description: None,
            deployment_pipeline_ref: default_pipeline(),
            components: vec![],
        }
    }
}

/// One component listed by a project.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProjectComponent {
    /// The component's name (a DNS-1123 label).
    pub name: String,
    /// Where its source lives, e.g. `./services/user` or a repository URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

impl KindSpec for ProjectSpec {
    const KIND: Kind = Kind::Project;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        super::check_name(
            errors,
            "spec.deploymentPipelineRef",
            &self.deployment_pipeline_ref,
        );
        check_unique_names(
            errors,
            "spec.components",
            self.components.iter().map(|c| c.name.as_str()),
        );
        for (i, c) in self.components.iter().enumerate() {
            if let Some(source) = &c.source {
                check_not_blank(
                    errors,
                    &field(&index("spec.components", i), "source"),
                    source,
                );
            }
        }
    }
}
