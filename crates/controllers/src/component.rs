//! The Component controller: turns what a component runs into an immutable, content-addressed Release, and with
//! `autoDeploy` binds the newest release in the first environment of the project's pipeline.
//!
//! A release is named `<component>-<hash>`, the hash being SHA-256 of the canonical JSON of the release snapshot
//! (the part of the spec that decides what runs), so an unchanged spec yields no new release and the same spec
//! always yields the same name. Conditions: `Released` (a release exists for the current spec) and `Deployed`
//! (auto-deploy bound it, or why not).

use std::sync::Arc;

use model::kinds::{
    BindingState, ComponentSpec, DeploymentPipelineSpec, ReleaseBindingSpec, ReleaseSnapshot,
    ReleaseSpec, RELEASE_HASH_LEN,
};
use model::{ConditionStatus, Kind, ObjectMeta, Resource};
use runtime::conditions::{new_condition, set_condition};
use runtime::{Action, Cache, Context, Controller, Reconciler, StoreSource};
use serde_json::Value;
use sha2::{Digest, Sha256};
use store::{Key, Store, StoreError};

use crate::status::{record_event, write_status, EventType};
use crate::Error;

/// Label on releases and bindings naming their component.
pub const LABEL_COMPONENT: &str = "kiln.dev/component";

/// Reconciles Components.
pub struct ComponentController {
    store: Store,
}

impl ComponentController {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The controller, ready to run: Components, re-checked when a Project or a DeploymentPipeline changes.
pub(crate) fn controller(store: Store) -> Controller<ComponentController> {
    let components = StoreSource::new(store.clone(), Kind::Component);
    let projects = StoreSource::new(store.clone(), Kind::Project);
    let pipelines = StoreSource::new(store.clone(), Kind::DeploymentPipeline);
    Controller::new("components", components, ComponentController::new(store))
        .concurrency(4)
        .watches(projects, components_of_project)
        .watches(pipelines, components_of_organization)
}

fn keys(items: Vec<Arc<Resource>>) -> Vec<Key> {
    items.iter().filter_map(|c| Key::of(c)).collect()
}

fn components_of_project(project: &Resource, components: &Cache) -> Vec<Key> {
    let (org, name) = (&project.metadata.organization, &project.metadata.name);
    keys(
        components.filter(|c| {
            &c.metadata.organization == org && c.metadata.project.as_ref() == Some(name)
        }),
    )
}

fn components_of_organization(pipeline: &Resource, components: &Cache) -> Vec<Key> {
    let org = &pipeline.metadata.organization;
    keys(components.filter(|c| &c.metadata.organization == org))
}

/// What a component runs, as recorded in its releases.
pub fn snapshot(spec: &ComponentSpec) -> ReleaseSnapshot {
    ReleaseSnapshot {
        type_: spec.type_,
        artifact: None,
        workload: spec.workload.clone(),
        replicas: spec.replicas,
        resources: spec.resources.clone(),
        probes: spec.probes.clone(),
        endpoints: spec.endpoints.clone(),
        dependencies: spec.dependencies.clone(),
        schedule: spec.schedule.clone(),
    }
}

/// Hex SHA-256 of the snapshot's canonical JSON (object keys sorted, no whitespace).
pub fn content_hash(snapshot: &ReleaseSnapshot) -> String {
    // `serde_json::Value` keeps object keys sorted, which makes the encoding canonical.
    let canonical = serde_json::to_value(snapshot)
        .and_then(|v| serde_json::to_vec(&v))
        .unwrap_or_default();
    Sha256::digest(&canonical)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name of the release with this hash.
pub fn release_name(component: &str, hash: &str) -> String {
    format!("{component}-{}", &hash[..RELEASE_HASH_LEN.min(hash.len())])
}

/// The environment a pipeline starts from: the first source environment that no path promotes into.
pub fn first_environment(pipeline: &DeploymentPipelineSpec) -> Option<String> {
    let targets: Vec<&str> = pipeline
        .promotion_paths
        .iter()
        .flat_map(|p| p.target_environment_refs.iter().map(|t| t.name.as_str()))
        .collect();
    pipeline
        .promotion_paths
        .iter()
        .map(|p| p.source_environment_ref.as_str())
        .find(|s| !targets.contains(s))
        .map(str::to_owned)
}

fn store_err<'a>(what: &'static str, key: &'a Key) -> impl FnOnce(StoreError) -> Error + 'a {
    move |source| Error::Store {
        what,
        key: key.clone(),
        source,
    }
}

/// A new object of `kind` in the component's organization and project, labelled with the component.
fn owned(kind: Kind, name: String, component: &Resource, spec: Value) -> Resource {
    let mut metadata = ObjectMeta {
        name,
        organization: component.metadata.organization.clone(),
        project: component.metadata.project.clone(),
        ..Default::default()
    };
    metadata
        .labels
        .insert(LABEL_COMPONENT.to_owned(), component.metadata.name.clone());
    Resource {
        api_version: model::API_VERSION.to_owned(),
        kind: kind.as_str().to_owned(),
        metadata,
        spec,
        status: Value::Null,
    }
}

/// The outcome of auto-deploy, as the `Deployed` condition.
struct Deployed {
    status: ConditionStatus,
    reason: &'static str,
    message: String,
}

impl ComponentController {
    async fn get(&self, key: &Key) -> Result<Option<Resource>, Error> {
        match self.store.get(key).await {
            Ok(r) => Ok(Some(r)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(source) => Err(Error::Store {
                what: "reading",
                key: key.clone(),
                source,
            }),
        }
    }

    /// Creates the release unless it exists; `true` if it was created now.
    async fn ensure_release(
        &self,
        component: &Resource,
        spec: ReleaseSpec,
        name: &str,
    ) -> Result<bool, Error> {
        let key = Key {
            kind: Kind::Release,
            organization: component.metadata.organization.clone(),
            project: component.metadata.project.clone(),
            name: name.to_owned(),
        };
        if self.get(&key).await?.is_some() {
            return Ok(false);
        }
        let value = serde_json::to_value(&spec).unwrap_or(Value::Null);
        let release = owned(Kind::Release, name.to_owned(), component, value);
        match self.store.create(release).await {
            Ok(_) => Ok(true),
            Err(StoreError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(store_err("creating", &key)(e)),
        }
    }

    /// The first environment of the component's project's pipeline, or why there is none.
    async fn first_environment(
        &self,
        component: &Resource,
    ) -> Result<Result<String, (&'static str, String)>, Error> {
        let org = component.metadata.organization.clone();
        let project_key = Key {
            kind: Kind::Project,
            organization: org.clone(),
            project: None,
            name: component.metadata.project.clone().unwrap_or_default(),
        };
        let Some(project) = self.get(&project_key).await? else {
            return Ok(Err((
                "ProjectNotFound",
                format!("project {} does not exist", project_key.name),
            )));
        };
        let pipeline_name = project
            .spec
            .get("deploymentPipelineRef")
            .and_then(Value::as_str)
            .unwrap_or(model::kinds::DEFAULT_PIPELINE)
            .to_owned();
        let pipeline_key = Key {
            kind: Kind::DeploymentPipeline,
            organization: org,
            project: None,
            name: pipeline_name.clone(),
        };
        let Some(pipeline) = self.get(&pipeline_key).await? else {
            return Ok(Err((
                "DeploymentPipelineNotFound",
                format!("DeploymentPipeline {pipeline_name:?} does not exist"),
            )));
        };
        let spec: DeploymentPipelineSpec = match model::typed_spec(&pipeline) {
            Ok(s) => s,
            Err(e) => {
                return Ok(Err((
                    "InvalidPipeline",
                    format!("DeploymentPipeline {pipeline_name:?}: {e}"),
                )))
            }
        };
        Ok(first_environment(&spec).ok_or((
            "EmptyPipeline",
            format!("DeploymentPipeline {pipeline_name:?} names no environments"),
        )))
    }

    /// Binds `release` in the pipeline's first environment (creating the binding, or re-pointing it there).
    async fn auto_deploy(&self, component: &Resource, release: &str) -> Result<Deployed, Error> {
        let env = match self.first_environment(component).await? {
            Ok(env) => env,
            Err((reason, message)) => {
                return Ok(Deployed {
                    status: ConditionStatus::False,
                    reason,
                    message,
                })
            }
        };
        let name = ReleaseBindingSpec::name_for(&component.metadata.name, &env);
        let key = Key {
            kind: Kind::ReleaseBinding,
            organization: component.metadata.organization.clone(),
            project: component.metadata.project.clone(),
            name: name.clone(),
        };
        let bound = |how: &str| Deployed {
            status: ConditionStatus::True,
            reason: "AutoDeployed",
            message: format!("release {release} {how} environment {env}"),
        };
        match self.get(&key).await? {
            None => {
                let spec = ReleaseBindingSpec {
                    component: component.metadata.name.clone(),
                    environment: env.clone(),
                    release: release.to_owned(),
                    state: BindingState::Active,
                };
                let binding = owned(
                    Kind::ReleaseBinding,
                    name,
                    component,
                    serde_json::to_value(&spec).unwrap_or(Value::Null),
                );
                match self.store.create(binding).await {
                    Ok(_) | Err(StoreError::AlreadyExists(_)) => {
                        record_event(
                            &self.store,
                            &Key::of(component).unwrap_or(key.clone()),
                            EventType::Normal,
                            "Deployed",
                            format!("release {release} bound to environment {env}"),
                        )
                        .await;
                        Ok(bound("bound to"))
                    }
                    Err(e) => Err(store_err("creating", &key)(e)),
                }
            }
            Some(mut binding) => {
                if binding.spec.get("release").and_then(Value::as_str) == Some(release) {
                    return Ok(bound("runs in"));
                }
                binding.spec["release"] = Value::String(release.to_owned());
                match self.store.update(binding).await {
                    Ok(_) => {
                        record_event(
                            &self.store,
                            &Key::of(component).unwrap_or(key.clone()),
                            EventType::Normal,
                            "Deployed",
                            format!("release {release} bound to environment {env}"),
                        )
                        .await;
                        Ok(bound("bound to"))
                    }
                    Err(StoreError::Conflict { .. }) => Ok(Deployed {
                        status: ConditionStatus::Unknown,
                        reason: "Retrying",
                        message: "the binding changed meanwhile".into(),
                    }),
                    Err(e) => Err(store_err("updating", &key)(e)),
                }
            }
        }
    }
}

impl Reconciler for ComponentController {
    type Error = Error;

    async fn reconcile(&self, obj: Arc<Resource>, ctx: &Context) -> Result<Action, Error> {
        if obj.metadata.deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        let generation = obj.metadata.generation;
        let mut status = obj.status.clone();
        let spec: ComponentSpec = match model::typed_spec(&obj) {
            Ok(s) => s,
            Err(e) => {
                set_condition(
                    &mut status,
                    new_condition(
                        "Released",
                        ConditionStatus::False,
                        "InvalidSpec",
                        e.to_string(),
                        generation,
                    ),
                );
                return Ok(write_status(&self.store, &ctx.key, &obj, status)
                    .await?
                    .action());
            }
        };
        let runnable = spec
            .workload
            .as_ref()
            .is_some_and(|w| w.image.is_some() || w.command.is_some());
        if !runnable {
            let message = "nothing to run yet: set spec.workload.image or spec.workload.command (builds from spec.source come from pipelines)";
            set_condition(
                &mut status,
                new_condition(
                    "Released",
                    ConditionStatus::False,
                    "NoArtifact",
                    message.to_owned(),
                    generation,
                ),
            );
            return Ok(write_status(&self.store, &ctx.key, &obj, status)
                .await?
                .action());
        }
        let snap = snapshot(&spec);
        let hash = content_hash(&snap);
        let name = release_name(&obj.metadata.name, &hash);
        let release = ReleaseSpec {
            component: obj.metadata.name.clone(),
            hash,
            component_generation: generation.unwrap_or(0),
            snapshot: snap,
        };
        if self.ensure_release(&obj, release, &name).await? {
            record_event(
                &self.store,
                &ctx.key,
                EventType::Normal,
                "ReleaseCreated",
                format!("release {name} created"),
            )
            .await;
        }
        set_condition(
            &mut status,
            new_condition(
                "Released",
                ConditionStatus::True,
                "Released",
                format!("release {name} is current"),
                generation,
            ),
        );
        if spec.auto_deploy {
            let d = self.auto_deploy(&obj, &name).await?;
            set_condition(
                &mut status,
                new_condition("Deployed", d.status, d.reason, d.message, generation),
            );
        }
        if let Value::Object(map) = &mut status {
            map.insert("latestRelease".into(), Value::String(name));
        } else {
            status = serde_json::json!({ "latestRelease": name });
        }
        Ok(write_status(&self.store, &ctx.key, &obj, status)
            .await?
            .action())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(v: Value) -> ComponentSpec {
        serde_json::from_value(v).expect("a component spec")
    }

    #[test]
    fn the_hash_follows_what_runs_and_only_that() {
        let a = spec(json!({"type": "service", "workload": {"command": ["./srv"]}}));
        let mut b = a.clone();
        b.auto_deploy = false;
        assert_eq!(
            content_hash(&snapshot(&a)),
            content_hash(&snapshot(&b)),
            "autoDeploy does not change what runs"
        );
        let mut c = a.clone();
        c.replicas = 2;
        assert_ne!(content_hash(&snapshot(&a)), content_hash(&snapshot(&c)));
        let h = content_hash(&snapshot(&a));
        assert_eq!(h.len(), 64);
        assert_eq!(release_name("web", &h), format!("web-{}", &h[..10]));
    }

    #[test]
    fn the_first_environment_is_the_root_of_the_pipeline() {
        let p: DeploymentPipelineSpec = serde_json::from_value(json!({"promotionPaths": [
            {"sourceEnvironmentRef": "staging", "targetEnvironmentRefs": [{"name": "prod"}]},
            {"sourceEnvironmentRef": "dev", "targetEnvironmentRefs": [{"name": "staging"}]}
        ]}))
        .unwrap();
        assert_eq!(first_environment(&p).as_deref(), Some("dev"));
        let empty: DeploymentPipelineSpec = serde_json::from_value(json!({})).unwrap();
        assert_eq!(first_environment(&empty), None);
    }
}
