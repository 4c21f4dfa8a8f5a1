//! The Component controller: turns what a component runs into an immutable, content-addressed Release, and with
//! `autoDeploy` binds the newest release in the first environment of the project's pipeline.
//!
//! A release is named `<component>-<hash>`, the hash being SHA-256 of the canonical JSON of the release snapshot
//! (the part of the spec that decides what runs), so an unchanged spec yields no new release and the same spec
//! always yields the same name. Conditions: `Released` (a release exists for the current spec) and `Deployed`
//! (auto-deploy bound it, or why not).
//!
//! The finalizer `kiln.dev/component` holds a deleted component until what it deployed is gone: its
//! ReleaseBindings are deleted first (each one's own finalizer removes its workload from the data plane), and
//! once none is left its Releases; then the finalizer goes and the store removes the component. Meanwhile the
//! `Deleting` condition says what the deletion waits for, and nothing new is released or bound.

use std::sync::Arc;

use model::kinds::{
    BindingState, Build, ComponentSpec, DeploymentPipelineSpec, PipelineRunSpec,
    ReleaseBindingSpec, ReleaseSnapshot, ReleaseSpec, PIPELINE_LABEL, RELEASE_HASH_LEN,
};
use model::{ConditionStatus, Kind, ObjectMeta, Resource};
use runtime::conditions::{new_condition, set_condition};
use runtime::{Action, Cache, Context, Controller, Reconciler, StoreSource};
use serde_json::Value;
use sha2::{Digest, Sha256};
use store::{Key, ListQuery, Store, StoreError};

use crate::cleanup::{self, delete_each, list_all, set_finalizer, spec_str};
use crate::status::{record_event, write_status, EventType};
use crate::Error;

/// Label on releases and bindings naming their component.
pub const LABEL_COMPONENT: &str = "kiln.dev/component";
/// Finalizer that holds a component until its bindings and releases are gone.
pub const FINALIZER: &str = "kiln.dev/component";

/// Reconciles Components.
pub struct ComponentController {
    store: Store,
}

impl ComponentController {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

/// The controller, ready to run: Components, re-checked when a Project, a DeploymentPipeline or an Environment
/// changes, and, while deleting, when one of their ReleaseBindings changes or goes.
pub(crate) fn controller(store: Store) -> Controller<ComponentController> {
    let components = StoreSource::new(store.clone(), Kind::Component);
    let projects = StoreSource::new(store.clone(), Kind::Project);
    let pipelines = StoreSource::new(store.clone(), Kind::DeploymentPipeline);
    let environments = StoreSource::new(store.clone(), Kind::Environment);
    let bindings = StoreSource::new(store.clone(), Kind::ReleaseBinding);
    let runs = StoreSource::new(store.clone(), Kind::PipelineRun);
    Controller::new("components", components, ComponentController::new(store))
        .concurrency(4)
        .watches(projects, components_of_project)
        .watches(pipelines, components_of_organization)
        .watches(environments, components_of_organization)
        .watches(bindings, component_of_child)
        .watches(runs, components_built_by)
}

/// The components built by the pipeline a run belongs to (same organization).
fn components_built_by(run: &Resource, components: &Cache) -> Vec<Key> {
    let Some(pipeline) = spec_str(run, "pipeline") else {
        return Vec::new();
    };
    let org = &run.metadata.organization;
    keys(components.filter(|c| {
        &c.metadata.organization == org
            && c.spec
                .get("build")
                .and_then(|b| b.get("pipeline"))
                .and_then(Value::as_str)
                == Some(pipeline)
    }))
}

/// An artifact a pipeline run built for a component.
#[derive(Debug, Clone, PartialEq)]
pub struct Built {
    /// The run that built it.
    pub run: String,
    /// The commit it built.
    pub commit: Option<String>,
    /// The output's value.
    pub value: String,
    /// Where the file is, when the artifact is a file (an absolute path, or one of the run's saved artifacts);
    /// otherwise the value is an image reference.
    pub file: Option<String>,
}

/// The artifact of the newest successful run of `build.pipeline` on the component's branch that set the
/// output; `None` when there is none yet.
pub fn newest_build(runs: &[Resource], spec: &ComponentSpec, build: &Build) -> Option<Built> {
    let wanted_branch = build
        .branch
        .clone()
        .or_else(|| spec.source.as_ref().map(|s| s.git.branch.clone()));
    let output = build.output_name();
    runs.iter()
        .filter(|r| r.status.get("phase").and_then(Value::as_str) == Some("Succeeded"))
        .filter_map(|r| {
            let run: PipelineRunSpec = model::typed_spec(r).ok()?;
            let branch = wanted_branch
                .clone()
                .unwrap_or_else(|| run.snapshot.source.branch.clone());
            if run.branch != branch {
                return None;
            }
            let value = r.status.get("outputs")?.get(output)?.as_str()?.to_string();
            let saved = r
                .status
                .get("artifacts")
                .and_then(Value::as_array)
                .is_some_and(|a| a.iter().any(|p| p.as_str() == Some(value.as_str())));
            let dir = r.status.get("artifactsDir").and_then(Value::as_str);
            let file = match dir {
                Some(dir) if saved => Some(format!("{dir}/{value}")),
                _ if value.starts_with('/') => Some(value.clone()),
                _ => None,
            };
            let built = Built {
                run: r.metadata.name.clone(),
                commit: r
                    .status
                    .get("commit")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                value,
                file,
            };
            Some((run.number, built))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, b)| b)
}

/// The snapshot with a built artifact in place: the image, or the program of the command.
pub fn with_artifact(mut snap: ReleaseSnapshot, built: &Built) -> ReleaseSnapshot {
    snap.artifact = Some(built.value.clone());
    let mut w = snap.workload.take().unwrap_or_default();
    match &built.file {
        Some(path) => {
            let mut command = w.command.take().unwrap_or_default();
            match command.first_mut() {
                Some(program) => *program = path.clone(),
                None => command.push(path.clone()),
            }
            w.command = Some(command);
        }
        None => w.image = Some(built.value.clone()),
    }
    snap.workload = Some(w);
    snap
}

/// The component a release or binding belongs to (its label, else its `spec.component`): a binding's status
/// feeds the component's `Ready`, and a deletion waits for its bindings to go.
fn component_of_child(child: &Resource, _components: &Cache) -> Vec<Key> {
    let name = child
        .metadata
        .labels
        .get(LABEL_COMPONENT)
        .map(String::as_str)
        .or_else(|| spec_str(child, "component"));
    let (Some(name), Some(_)) = (name, &child.metadata.project) else {
        return Vec::new();
    };
    vec![Key {
        kind: Kind::Component,
        organization: child.metadata.organization.clone(),
        project: child.metadata.project.clone(),
        name: name.to_owned(),
    }]
}

/// Whether a release or binding belongs to `component` (by label, or by `spec.component` when unlabelled).
fn belongs_to(child: &Resource, component: &str) -> bool {
    match child.metadata.labels.get(LABEL_COMPONENT) {
        Some(label) => label == component,
        None => spec_str(child, "component") == Some(component),
    }
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

fn components_of_organization(obj: &Resource, components: &Cache) -> Vec<Key> {
    let org = &obj.metadata.organization;
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
        timezone: spec.timezone.clone(),
        concurrency_policy: spec.concurrency_policy,
        run_history_limit: spec.run_history_limit,
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

    /// The component's project's pipeline, or why there is none.
    async fn pipeline(
        &self,
        component: &Resource,
    ) -> Result<Result<DeploymentPipelineSpec, (&'static str, String)>, Error> {
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
        Ok(model::typed_spec(&pipeline).map_err(|e| {
            (
                "InvalidPipeline",
                format!("DeploymentPipeline {pipeline_name:?}: {e}"),
            )
        }))
    }

    /// The first environment of the component's project's pipeline, or why there is none.
    async fn first_environment(
        &self,
        component: &Resource,
    ) -> Result<Result<String, (&'static str, String)>, Error> {
        Ok(match self.pipeline(component).await? {
            Ok(spec) => first_environment(&spec).ok_or((
                "EmptyPipeline",
                "the deployment pipeline names no environments".to_owned(),
            )),
            Err(e) => Err(e),
        })
    }

    /// The component's bindings in the environments of its pipeline, by their conventional names
    /// (`<component>-<environment>`: every binding Kiln creates is named so). A few point reads, so that a
    /// project with thousands of components does not make every reconcile list every binding.
    async fn bindings_in_pipeline(&self, component: &Resource) -> Result<Vec<Resource>, Error> {
        let Ok(spec) = self.pipeline(component).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (env, _) in spec.environment_refs() {
            let key = Key {
                kind: Kind::ReleaseBinding,
                organization: component.metadata.organization.clone(),
                project: component.metadata.project.clone(),
                name: ReleaseBindingSpec::name_for(&component.metadata.name, env),
            };
            if let Some(b) = self.get(&key).await? {
                out.push(b);
            }
        }
        Ok(out)
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
        let env_key = Key {
            kind: Kind::Environment,
            organization: component.metadata.organization.clone(),
            project: None,
            name: env.clone(),
        };
        // Never bind into an environment that is missing or going (its deletion removes bindings into it).
        match self.get(&env_key).await? {
            None => {
                return Ok(Deployed {
                    status: ConditionStatus::False,
                    reason: "EnvironmentNotFound",
                    message: format!("environment {env} does not exist"),
                })
            }
            Some(e) if e.metadata.deletion_timestamp.is_some() => {
                return Ok(Deployed {
                    status: ConditionStatus::False,
                    reason: "EnvironmentDeleting",
                    message: format!("environment {env} is being deleted"),
                })
            }
            Some(_) => {}
        }
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
        let deployed_before = component
            .status
            .get("deployedRelease")
            .and_then(Value::as_str)
            == Some(release);
        match self.get(&key).await? {
            // The binding of a release that was deployed before was deleted on purpose: leave it deleted until
            // a new release (or a promotion) deploys again.
            None if deployed_before => Ok(Deployed {
                status: ConditionStatus::False,
                reason: "BindingRemoved",
                message: format!(
                    "the binding of {release} in environment {env} was deleted; a new release deploys again"
                ),
            }),
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

impl ComponentController {
    /// The component's children of `kind` (releases or bindings).
    async fn children(
        &self,
        component: &Resource,
        key: &Key,
        kind: Kind,
    ) -> Result<Vec<Resource>, Error> {
        let query = ListQuery {
            kind: Some(kind),
            organization: component.metadata.organization.clone(),
            project: component.metadata.project.clone(),
            ..ListQuery::default()
        };
        let name = component.metadata.name.as_str();
        let mut items = list_all(&self.store, query, key).await?;
        items.retain(|c| belongs_to(c, name));
        Ok(items)
    }

    /// A deletion step: bindings first (their finalizers remove the workloads), then releases, then the
    /// finalizer.
    async fn clean_up(&self, obj: &Resource, key: &Key) -> Result<Action, Error> {
        let bindings = self.children(obj, key, Kind::ReleaseBinding).await?;
        if !bindings.is_empty() {
            delete_each(&self.store, &bindings).await?;
            let message = format!(
                "waiting for {} release binding(s) to remove their workloads: {}",
                bindings.len(),
                cleanup::names(&bindings)
            );
            return cleanup::waiting(&self.store, key, obj, "RemovingBindings", message).await;
        }
        let releases = self.children(obj, key, Kind::Release).await?;
        if !releases.is_empty() {
            delete_each(&self.store, &releases).await?;
            // Releases carry no finalizer of ours: normally they are gone now.
            let left = self.children(obj, key, Kind::Release).await?;
            if !left.is_empty() {
                let message = format!(
                    "waiting for {} release(s) to go: {}",
                    left.len(),
                    cleanup::names(&left)
                );
                return cleanup::waiting(&self.store, key, obj, "RemovingReleases", message).await;
            }
        }
        Ok(set_finalizer(&self.store, key, obj, FINALIZER, false)
            .await?
            .unwrap_or_else(Action::await_change))
    }
}

impl Reconciler for ComponentController {
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
        let build = spec.build.clone().filter(|b| b.pipeline.is_some());
        let built = match &build {
            Some(b) => {
                let pipeline = b.pipeline.clone().unwrap_or_default();
                let org = obj.metadata.organization.clone();
                let query = ListQuery {
                    kind: Some(Kind::PipelineRun),
                    organization: org,
                    selector: Some(format!("{PIPELINE_LABEL}={pipeline}")),
                    ..ListQuery::default()
                };
                let runs = self
                    .store
                    .list(&query)
                    .await
                    .map_err(store_err("listing the pipeline runs of", &ctx.key))?
                    .items;
                match newest_build(&runs, &spec, b) {
                    Some(built) => Some(built),
                    None => {
                        let message = format!(
                            "waiting for a successful run of pipeline {pipeline} that sets the output {:?} \
                             (a step writes {}=<image or file> to $KILN_OUTPUT)",
                            b.output_name(),
                            b.output_name()
                        );
                        set_condition(
                            &mut status,
                            new_condition(
                                "Released",
                                ConditionStatus::False,
                                "AwaitingBuild",
                                message,
                                generation,
                            ),
                        );
                        return Ok(write_status(&self.store, &ctx.key, &obj, status)
                            .await?
                            .action());
                    }
                }
            }
            None => None,
        };
        let runnable = built.is_some()
            || spec
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
        let snap = match &built {
            Some(b) => with_artifact(snapshot(&spec), b),
            None => snapshot(&spec),
        };
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
                match &built {
                    Some(b) => format!(
                        "release {name} is current, built by run {}{}",
                        b.run,
                        b.commit
                            .as_deref()
                            .map(|c| format!(" at commit {}", &c[..c.len().min(12)]))
                            .unwrap_or_default()
                    ),
                    None => format!("release {name} is current"),
                },
                generation,
            ),
        );
        if spec.auto_deploy {
            let d = self.auto_deploy(&obj, &name).await?;
            if d.status == ConditionStatus::True {
                // Remembered so that a binding of this release deleted by hand is not recreated.
                if let Value::Object(map) = &mut status {
                    map.insert("deployedRelease".into(), Value::String(name.clone()));
                }
            }
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
        let bindings = self.bindings_in_pipeline(&obj).await?;
        let (ready, environments) = readiness(&bindings);
        set_condition(
            &mut status,
            new_condition("Ready", ready.0, ready.1, ready.2, generation),
        );
        if let Value::Object(map) = &mut status {
            map.insert("environments".into(), Value::Array(environments));
        }
        Ok(write_status(&self.store, &ctx.key, &obj, status)
            .await?
            .action())
    }
}

/// The component's `Ready` over the environments it runs in, and a summary per environment: ready when every
/// active binding is ready; otherwise not ready, naming each environment that is not and why (a crash in one
/// environment surfaces here).
fn readiness(bindings: &[Resource]) -> ((ConditionStatus, &'static str, String), Vec<Value>) {
    let mut summary = Vec::new();
    let mut problems = Vec::new();
    let mut active = 0;
    for b in bindings {
        let env = spec_str(b, "environment").unwrap_or("?").to_owned();
        let state = spec_str(b, "state").unwrap_or("active");
        let ready = b.condition("Ready");
        summary.push(serde_json::json!({
            "environment": env,
            "release": spec_str(b, "release"),
            "state": state,
            "ready": ready.as_ref().is_some_and(|c| c.status == ConditionStatus::True),
            "readyReplicas": b.status.get("readyReplicas"),
            "replicas": b.status.get("replicas"),
        }));
        if state != "active" {
            continue;
        }
        active += 1;
        match ready {
            Some(c) if c.status == ConditionStatus::True => {}
            Some(c) => problems.push(format!("{env}: {} ({})", c.reason, c.message)),
            None => problems.push(format!("{env}: not reported yet")),
        }
    }
    summary.sort_by(|a, b| a["environment"].as_str().cmp(&b["environment"].as_str()));
    let ready = if active == 0 {
        (
            ConditionStatus::False,
            "NotDeployed",
            "the component runs in no environment".to_owned(),
        )
    } else if problems.is_empty() {
        (
            ConditionStatus::True,
            "Ready",
            format!("ready in {active} environment(s)"),
        )
    } else {
        (ConditionStatus::False, "NotReady", problems.join("; "))
    };
    (ready, summary)
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

#[cfg(test)]
mod build_tests {
    use serde_json::json;

    use super::*;

    fn run(number: u64, branch: &str, phase: &str, outputs: Value) -> Resource {
        serde_json::from_value(json!({
            "apiVersion": "kiln.dev/v1",
            "kind": "PipelineRun",
            "metadata": {"name": format!("ci-{number}"), "organization": "default"},
            "spec": {
                "pipeline": "ci", "number": number, "branch": branch,
                "snapshot": {"source": {"repository": "/r.git", "branch": "main"}, "steps": [{"name": "b", "commands": ["true"]}]},
            },
            "status": {"phase": phase, "outputs": outputs, "commit": "abc123",
                       "artifacts": ["dist/app"], "artifactsDir": "/data/artifacts/default/ci-4"},
        }))
        .unwrap()
    }

    #[test]
    fn the_newest_successful_run_on_the_branch_with_the_output_is_the_build() {
        let spec: ComponentSpec = serde_json::from_value(json!({
            "type": "service", "build": {"pipeline": "ci"}, "workload": {"command": ["old", "--port", "8080"]},
        }))
        .unwrap();
        let build = spec.build.clone().unwrap();
        let runs = vec![
            run(1, "main", "Succeeded", json!({"artifact": "shop/api:1"})),
            run(2, "main", "Succeeded", json!({"artifact": "shop/api:2"})),
            run(3, "main", "Failed", json!({"artifact": "shop/api:3"})),
            run(4, "main", "Succeeded", json!({"artifact": "dist/app"})),
            run(5, "topic", "Succeeded", json!({"artifact": "shop/api:5"})),
            run(6, "main", "Succeeded", json!({"other": "x"})),
        ];
        let built = newest_build(&runs, &spec, &build).expect("a build");
        assert_eq!(built.run, "ci-4");
        assert_eq!(
            built.file.as_deref(),
            Some("/data/artifacts/default/ci-4/dist/app")
        );
        let snap = with_artifact(snapshot(&spec), &built);
        assert_eq!(snap.artifact.as_deref(), Some("dist/app"));
        let command = snap.workload.unwrap().command.unwrap();
        assert_eq!(
            command,
            ["/data/artifacts/default/ci-4/dist/app", "--port", "8080"]
        );
        // An image reference becomes the image.
        let built = newest_build(&runs[..3], &spec, &build).unwrap();
        assert_eq!((built.run.as_str(), built.file.clone()), ("ci-2", None));
        let snap = with_artifact(snapshot(&spec), &built);
        assert_eq!(snap.workload.unwrap().image.as_deref(), Some("shop/api:2"));
        // No run of the branch set the output yet.
        assert_eq!(newest_build(&runs[2..3], &spec, &build), None);
    }
}
