//! The Project controller: a project is `Ready` when the DeploymentPipeline it names exists in its
//! organization, and reports the components it lists that have no Component object (`ComponentsPresent`, not
//! fatal to `Ready`). Creating or deleting a pipeline or a component re-checks the projects concerned.
//!
//! The finalizer `kiln.dev/project` holds a deleted project until its Components are gone: it deletes them (each
//! component's finalizer then removes its bindings, their workloads and its releases) and waits, the `Deleting`
//! condition saying for what.

use std::collections::BTreeSet;
use std::sync::Arc;

use model::{ConditionStatus, Kind, Resource};
use runtime::conditions::{condition_status, new_condition, set_condition};
use runtime::{Action, Cache, Context, Controller, Reconciler, StoreSource};
use serde_json::Value;
use store::{Key, ListQuery, Store, StoreError};

use crate::cleanup::{self, delete_each, list_all, set_finalizer};
use crate::status::{record_event, write_status, EventType, Written};
use crate::Error;

/// Finalizer that holds a project until its components are gone.
pub const FINALIZER: &str = "kiln.dev/project";

/// The pipeline a project uses when its spec names none.
const DEFAULT_PIPELINE: &str = "default";

/// Reconciles Projects.
pub struct ProjectController {
    store: Store,
}

impl ProjectController {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The controller, ready to run: Projects, plus the DeploymentPipelines and Components they depend on.
pub(crate) fn controller(store: Store) -> Controller<ProjectController> {
    let projects = StoreSource::new(store.clone(), Kind::Project);
    let pipelines = StoreSource::new(store.clone(), Kind::DeploymentPipeline);
    let components = StoreSource::new(store.clone(), Kind::Component);
    Controller::new("projects", projects, ProjectController::new(store))
        .concurrency(4)
        .watches(pipelines, projects_using_pipeline)
        .watches(components, project_of_component)
}

/// The projects of the pipeline's organization that name it.
fn projects_using_pipeline(pipeline: &Resource, projects: &Cache) -> Vec<Key> {
    let org = &pipeline.metadata.organization;
    let name = pipeline.metadata.name.as_str();
    projects
        .filter(|p| &p.metadata.organization == org && pipeline_ref(&p.spec).as_deref() == Ok(name))
        .iter()
        .filter_map(|p| Key::of(p))
        .collect()
}

/// The project a component belongs to.
fn project_of_component(component: &Resource, _: &Cache) -> Vec<Key> {
    match (
        &component.metadata.organization,
        &component.metadata.project,
    ) {
        (Some(org), Some(project)) => vec![Key {
            kind: Kind::Project,
            organization: Some(org.clone()),
            project: None,
            name: project.clone(),
        }],
        _ => Vec::new(),
    }
}

/// `spec.deploymentPipelineRef`, `default` when absent; an error message when it is malformed.
fn pipeline_ref(spec: &Value) -> Result<String, String> {
    let field = match spec {
        Value::Null => None,
        Value::Object(map) => map.get("deploymentPipelineRef"),
        _ => return Err("spec must be an object".into()),
    };
    match field {
        None | Some(Value::Null) => Ok(DEFAULT_PIPELINE.to_owned()),
        Some(Value::String(s)) if s.is_empty() => {
            Err("spec.deploymentPipelineRef must not be empty".into())
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err("spec.deploymentPipelineRef must be a string".into()),
    }
}

/// The names in `spec.components[].name`; an error message when they are malformed.
fn component_names(spec: &Value) -> Result<Vec<String>, String> {
    let field = match spec {
        Value::Null => None,
        Value::Object(map) => map.get("components"),
        _ => return Err("spec must be an object".into()),
    };
    let items = match field {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err("spec.components must be a list".into()),
    };
    items
        .iter()
        .enumerate()
        .map(|(i, item)| match item.get("name") {
            Some(Value::String(name)) if !name.is_empty() => Ok(name.clone()),
            _ => Err(format!(
                "spec.components[{i}].name must be a non-empty string"
            )),
        })
        .collect()
}

/// The `Ready` condition's status, reason and message, given whether the named pipeline exists.
fn ready(
    pipeline: &Result<String, String>,
    exists: bool,
    org: &str,
) -> (ConditionStatus, &'static str, String) {
    match pipeline {
        Err(message) => (ConditionStatus::False, "InvalidSpec", message.clone()),
        Ok(name) if exists => (
            ConditionStatus::True,
            "Ready",
            format!("deployment pipeline {name:?} found"),
        ),
        Ok(name) => (
            ConditionStatus::False,
            "DeploymentPipelineNotFound",
            format!("DeploymentPipeline {name:?} does not exist in organization {org:?}"),
        ),
    }
}

/// The `ComponentsPresent` condition's status, reason and message, given the components that exist.
fn components_present(
    listed: &Result<Vec<String>, String>,
    existing: &BTreeSet<String>,
) -> (ConditionStatus, &'static str, String) {
    match listed {
        Err(message) => (ConditionStatus::False, "InvalidSpec", message.clone()),
        Ok(names) => {
            let missing: Vec<&str> = names
                .iter()
                .filter(|n| !existing.contains(*n))
                .map(String::as_str)
                .collect();
            if missing.is_empty() {
                (
                    ConditionStatus::True,
                    "AllComponentsPresent",
                    format!("{} listed, all present", names.len()),
                )
            } else {
                let message = format!("no Component named {} in the project", missing.join(", "));
                (ConditionStatus::False, "ComponentNotFound", message)
            }
        }
    }
}

impl ProjectController {
    /// Whether the DeploymentPipeline `name` exists in `org`.
    async fn pipeline_exists(&self, org: &str, name: &str) -> Result<bool, Error> {
        let key = Key {
            kind: Kind::DeploymentPipeline,
            organization: Some(org.to_owned()),
            project: None,
            name: name.to_owned(),
        };
        match self.store.get(&key).await {
            Ok(_) => Ok(true),
            Err(StoreError::NotFound(_)) => Ok(false),
            Err(source) => Err(Error::Store {
                what: "reading",
                key,
                source,
            }),
        }
    }

    /// The names of the Components of the project `key`.
    async fn existing_components(&self, key: &Key, org: &str) -> Result<BTreeSet<String>, Error> {
        let mut query = ListQuery {
            kind: Some(Kind::Component),
            organization: Some(org.to_owned()),
            project: Some(key.name.clone()),
            ..ListQuery::default()
        };
        let mut names = BTreeSet::new();
        loop {
            let page = self
                .store
                .list(&query)
                .await
                .map_err(|source| Error::Store {
                    what: "listing the components of",
                    key: key.clone(),
                    source,
                })?;
            names.extend(page.items.into_iter().map(|c| c.metadata.name));
            match page.continue_token {
                Some(token) => query.continue_token = Some(token),
                None => return Ok(names),
            }
        }
    }
}

impl ProjectController {
    /// A deletion step: delete the components, wait until none is left, then remove the finalizer.
    async fn clean_up(&self, obj: &Resource, key: &Key) -> Result<Action, Error> {
        let query = ListQuery {
            kind: Some(Kind::Component),
            organization: obj.metadata.organization.clone(),
            project: Some(obj.metadata.name.clone()),
            ..ListQuery::default()
        };
        let components = list_all(&self.store, query, key).await?;
        if !components.is_empty() {
            delete_each(&self.store, &components).await?;
            let message = format!(
                "waiting for {} component(s) to remove what they deployed: {}",
                components.len(),
                cleanup::names(&components)
            );
            return cleanup::waiting(&self.store, key, obj, "RemovingComponents", message).await;
        }
        Ok(set_finalizer(&self.store, key, obj, FINALIZER, false)
            .await?
            .unwrap_or_else(Action::await_change))
    }
}

impl Reconciler for ProjectController {
    type Error = Error;

    async fn reconcile(&self, obj: Arc<Resource>, ctx: &Context) -> Result<Action, Error> {
        if obj.metadata.deletion_timestamp.is_some() {
            if !obj.metadata.finalizers.iter().any(|f| f == FINALIZER) {
                return Ok(Action::await_change());
            }
            return self.clean_up(&obj, &ctx.key).await;
        }
        if let Some(action) = set_finalizer(&self.store, &ctx.key, &obj, FINALIZER, true).await? {
            return Ok(action);
        }
        // The store only keeps projects with an organization; an empty one simply matches no pipeline.
        let org = obj.metadata.organization.clone().unwrap_or_default();
        let generation = obj.metadata.generation;

        let pipeline = pipeline_ref(&obj.spec);
        let exists = match &pipeline {
            Ok(name) => self.pipeline_exists(&org, name).await?,
            Err(_) => false,
        };
        let (ready_status, ready_reason, ready_message) = ready(&pipeline, exists, &org);

        let listed = component_names(&obj.spec);
        let existing = match &listed {
            Ok(names) if !names.is_empty() => self.existing_components(&ctx.key, &org).await?,
            _ => BTreeSet::new(),
        };
        let (comp_status, comp_reason, comp_message) = components_present(&listed, &existing);

        let was = condition_status(&obj.status, "Ready");
        let mut status = obj.status.clone();
        let ready_condition = new_condition(
            "Ready",
            ready_status,
            ready_reason,
            ready_message.clone(),
            generation,
        );
        set_condition(&mut status, ready_condition);
        let components_condition = new_condition(
            "ComponentsPresent",
            comp_status,
            comp_reason,
            comp_message,
            generation,
        );
        set_condition(&mut status, components_condition);

        let written = write_status(&self.store, &ctx.key, &obj, status).await?;
        if written == Written::Updated && was != Some(ready_status) {
            let type_ = match ready_status {
                ConditionStatus::True => EventType::Normal,
                _ => EventType::Warning,
            };
            record_event(&self.store, &ctx.key, type_, ready_reason, ready_message).await;
        }
        Ok(written.action())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_pipeline_reference_defaults_and_malformed_ones_are_explained() {
        assert_eq!(pipeline_ref(&Value::Null), Ok("default".into()));
        assert_eq!(pipeline_ref(&json!({})), Ok("default".into()));
        assert_eq!(
            pipeline_ref(&json!({"deploymentPipelineRef": null})),
            Ok("default".into())
        );
        assert_eq!(
            pipeline_ref(&json!({"deploymentPipelineRef": "fast"})),
            Ok("fast".into())
        );
        assert_eq!(
            pipeline_ref(&json!({"deploymentPipelineRef": 3})),
            Err("spec.deploymentPipelineRef must be a string".into())
        );
        assert_eq!(
            pipeline_ref(&json!({"deploymentPipelineRef": ""})),
            Err("spec.deploymentPipelineRef must not be empty".into())
        );
        assert_eq!(
            pipeline_ref(&json!([1])),
            Err("spec must be an object".into())
        );
    }

    #[test]
    fn component_names_are_read_and_malformed_entries_are_named() {
        assert_eq!(component_names(&json!({})), Ok(vec![]));
        assert_eq!(
            component_names(
                &json!({"components": [{"name": "api"}, {"name": "web", "source": "./web"}]})
            ),
            Ok(vec!["api".into(), "web".into()])
        );
        assert_eq!(
            component_names(&json!({"components": [{"name": "api"}, {"nom": "web"}]})),
            Err("spec.components[1].name must be a non-empty string".into())
        );
        assert_eq!(
            component_names(&json!({"components": "api"})),
            Err("spec.components must be a list".into())
        );
    }

    #[test]
    fn ready_names_the_missing_pipeline() {
        let (status, reason, message) = ready(&Ok("fast".into()), false, "acme");
        assert_eq!(
            (status, reason),
            (ConditionStatus::False, "DeploymentPipelineNotFound")
        );
        assert_eq!(
            message,
            r#"DeploymentPipeline "fast" does not exist in organization "acme""#
        );
        assert_eq!(
            ready(&Ok("fast".into()), true, "acme").0,
            ConditionStatus::True
        );
        assert_eq!(ready(&Err("bad".into()), true, "acme").1, "InvalidSpec");
    }

    #[test]
    fn components_present_lists_the_missing_ones() {
        let existing: BTreeSet<String> = ["api".to_owned()].into();
        let listed = Ok(vec!["api".into(), "web".into(), "db".into()]);
        let (status, reason, message) = components_present(&listed, &existing);
        assert_eq!(
            (status, reason),
            (ConditionStatus::False, "ComponentNotFound")
        );
        assert_eq!(message, "no Component named web, db in the project");
        assert_eq!(
            components_present(&Ok(vec!["api".into()]), &existing).0,
            ConditionStatus::True
        );
        assert_eq!(
            components_present(&Ok(vec![]), &existing).0,
            ConditionStatus::True
        );
    }

    fn resource(kind: Kind, org: &str, project: Option<&str>, name: &str, spec: Value) -> Resource {
        Resource {
            api_version: model::API_VERSION.into(),
            kind: kind.as_str().into(),
            metadata: model::ObjectMeta {
                name: name.into(),
                organization: Some(org.into()),
                project: project.map(Into::into),
                ..model::ObjectMeta::default()
            },
            spec,
            status: Value::Null,
        }
    }

    #[test]
    fn a_pipeline_maps_to_the_projects_of_its_organization_that_name_it() {
        let projects = [
            resource(
                Kind::Project,
                "acme",
                None,
                "shop",
                json!({"deploymentPipelineRef": "fast"}),
            ),
            resource(Kind::Project, "acme", None, "blog", json!({})),
            resource(
                Kind::Project,
                "other",
                None,
                "shop",
                json!({"deploymentPipelineRef": "fast"}),
            ),
            resource(
                Kind::Project,
                "acme",
                None,
                "bad",
                json!({"deploymentPipelineRef": 1}),
            ),
        ];
        let cache: Cache = projects.iter().cloned().collect();
        let names = |pipeline: &Resource| -> Vec<String> {
            let mut keys: Vec<String> = projects_using_pipeline(pipeline, &cache)
                .into_iter()
                .map(|k| k.to_string())
                .collect();
            keys.sort();
            keys
        };
        assert_eq!(
            names(&resource(
                Kind::DeploymentPipeline,
                "acme",
                None,
                "fast",
                json!({})
            )),
            ["Project acme/shop"]
        );
        assert_eq!(
            names(&resource(
                Kind::DeploymentPipeline,
                "acme",
                None,
                "default",
                json!({})
            )),
            ["Project acme/blog"]
        );
        assert!(names(&resource(
            Kind::DeploymentPipeline,
            "zzz",
            None,
            "fast",
            json!({})
        ))
        .is_empty());

        let component = resource(Kind::Component, "acme", Some("shop"), "api", json!({}));
        let keys: Vec<String> = project_of_component(&component, &cache)
            .iter()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, ["Project acme/shop"]);
    }
}
