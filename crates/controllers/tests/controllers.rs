//! The controllers against the real SQLite store in a temp dir: conditions appear, flip when what they wait for
//! is created, and the controllers stop on shutdown.

use std::future::Future;
use std::time::Duration;

use model::{ConditionStatus, Kind, ObjectMeta, Resource, API_VERSION};
use serde_json::{json, Value};
use store::{Key, Options, Store};
use tokio::sync::watch;
use tokio::time::{sleep, timeout, Instant};

/// How long a controller may take to react (generous: CI machines are slow; the poll returns as soon as it can).
const WITHIN: Duration = Duration::from_secs(20);

struct Harness {
    store: Store,
    /// The driver behind `process` data planes: the no-op one, which runs nothing and reports ready.
    noop: std::sync::Arc<dataplane::noop::NoopDriver>,
    stop_tx: watch::Sender<bool>,
    controllers: controllers::Controllers,
    _dir: tempfile::TempDir,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open_sqlite(&dir.path().join("kiln.db"), Options::default())
        .await
        .expect("open sqlite");
    let (stop_tx, stop_rx) = watch::channel(false);
    let noop = std::sync::Arc::new(dataplane::noop::NoopDriver::new());
    let drivers = controllers::Drivers {
        process: Some(noop.clone()),
        docker: None,
    };
    let controllers = controllers::spawn_all(store.clone(), drivers, stop_rx);
    Harness {
        store,
        noop,
        stop_tx,
        controllers,
        _dir: dir,
    }
}

fn resource(
    kind: Kind,
    org: Option<&str>,
    project: Option<&str>,
    name: &str,
    spec: Value,
) -> Resource {
    Resource {
        api_version: API_VERSION.into(),
        kind: kind.as_str().into(),
        metadata: ObjectMeta {
            name: name.into(),
            organization: org.map(Into::into),
            project: project.map(Into::into),
            ..ObjectMeta::default()
        },
        spec,
        status: Value::Null,
    }
}

fn key(kind: Kind, org: Option<&str>, name: &str) -> Key {
    Key {
        kind,
        organization: org.map(Into::into),
        project: None,
        name: name.into(),
    }
}

/// Polls `check` until it returns `Some`, failing the test after [`WITHIN`].
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Some(found) = check().await {
            return found;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the controller `name` has no reconcile running or queued. Called after observing a status
/// write, it means the reconcile that wrote has returned (and recorded its events).
async fn idle(controllers: &controllers::Controllers, name: &str) {
    let stats = controllers
        .stats()
        .iter()
        .find(|s| s.name == name)
        .expect("a controller of that name")
        .clone();
    eventually(&format!("{name} to be idle"), || async {
        let s = stats.snapshot();
        (s.in_flight == 0 && s.queue_depth == 0).then_some(())
    })
    .await;
}

/// Waits until the object's condition `type_` has `status` and `reason`; returns the object.
async fn condition(
    store: &Store,
    key: &Key,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
) -> Resource {
    let what = format!("{key}: {type_}={status:?} ({reason})");
    eventually(&what, || async {
        let obj = store.get(key).await.ok()?;
        let c = obj.condition(type_)?;
        (c.status == status && c.reason == reason).then_some(obj)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn organization_becomes_ready_with_an_event() {
    let h = start().await;
    let created = h
        .store
        .create(resource(Kind::Organization, None, None, "acme", json!({})))
        .await
        .unwrap();
    let k = key(Kind::Organization, None, "acme");

    let obj = condition(&h.store, &k, "Ready", ConditionStatus::True, "Ready").await;
    assert_eq!(
        obj.status["observedGeneration"],
        json!(created.metadata.generation)
    );
    assert_eq!(
        obj.condition("Ready").unwrap().observed_generation,
        created.metadata.generation
    );

    let events = eventually("the Ready event", || async {
        let events = h
            .store
            .list_events("Organization", None, None, "acme", 10)
            .await
            .ok()?;
        (!events.is_empty()).then_some(events)
    })
    .await;
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].type_.as_str(), events[0].reason.as_str()),
        ("Normal", "Ready")
    );

    // Reconciling again (a spec change) keeps it ready without a second event or a new transition time.
    let first_transition = obj.condition("Ready").unwrap().last_transition_time;
    let mut changed = obj.clone();
    changed.spec = json!({"displayName": "Acme"});
    let generation = h.store.update(changed).await.unwrap().metadata.generation;
    assert_ne!(generation, created.metadata.generation);
    let obj = eventually("observedGeneration to follow the spec", || async {
        let obj = h.store.get(&k).await.ok()?;
        (obj.status["observedGeneration"] == json!(generation)).then_some(obj)
    })
    .await;
    let ready = obj.condition("Ready").unwrap();
    assert_eq!(ready.observed_generation, generation);
    assert_eq!(ready.last_transition_time, first_transition);
    idle(&h.controllers, "organizations").await;
    let events = h
        .store
        .list_events("Organization", None, None, "acme", 10)
        .await
        .unwrap();
    assert_eq!(events.len(), 1, "no event without a transition");

    h.stop_tx.send(true).unwrap();
    timeout(WITHIN, h.controllers.wait())
        .await
        .expect("controllers stop on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn project_waits_for_its_pipeline_and_reports_missing_components() {
    let h = start().await;
    let org = Some("acme");
    h.store
        .create(resource(Kind::Organization, None, None, "acme", json!({})))
        .await
        .unwrap();
    let spec = json!({"deploymentPipelineRef": "release", "components": [{"name": "api"}, {"name": "web"}]});
    h.store
        .create(resource(Kind::Project, org, None, "shop", spec))
        .await
        .unwrap();
    h.store
        .create(resource(Kind::Project, org, None, "blog", json!({})))
        .await
        .unwrap();
    let shop = key(Kind::Project, org, "shop");
    let blog = key(Kind::Project, org, "blog");

    let obj = condition(
        &h.store,
        &shop,
        "Ready",
        ConditionStatus::False,
        "DeploymentPipelineNotFound",
    )
    .await;
    let ready = obj.condition("Ready").unwrap();
    assert!(
        ready.message.contains("\"release\""),
        "the message names the pipeline: {}",
        ready.message
    );
    assert_eq!(ready.observed_generation, Some(1));
    let components = obj
        .condition("ComponentsPresent")
        .expect("ComponentsPresent is set");
    assert_eq!(
        (components.status, components.reason.as_str()),
        (ConditionStatus::False, "ComponentNotFound")
    );
    assert!(
        components.message.contains("api, web"),
        "{}",
        components.message
    );
    let obj = condition(
        &h.store,
        &blog,
        "Ready",
        ConditionStatus::False,
        "DeploymentPipelineNotFound",
    )
    .await;
    assert!(
        obj.condition("Ready")
            .unwrap()
            .message
            .contains("\"default\""),
        "blog uses the default pipeline"
    );

    // Creating the pipeline later re-checks the project that names it (and only that one).
    h.store
        .create(resource(
            Kind::DeploymentPipeline,
            org,
            None,
            "release",
            json!({}),
        ))
        .await
        .unwrap();
    condition(&h.store, &shop, "Ready", ConditionStatus::True, "Ready").await;
    let obj = h.store.get(&blog).await.unwrap();
    assert_eq!(
        obj.condition("Ready").unwrap().status,
        ConditionStatus::False
    );

    // So does a component appearing; the pipeline of another organization does not count.
    h.store
        .create(resource(Kind::Organization, None, None, "other", json!({})))
        .await
        .unwrap();
    h.store
        .create(resource(
            Kind::DeploymentPipeline,
            Some("other"),
            None,
            "default",
            json!({}),
        ))
        .await
        .unwrap();
    h.store
        .create(resource(
            Kind::Component,
            org,
            Some("shop"),
            "api",
            json!({}),
        ))
        .await
        .unwrap();
    let obj = eventually("ComponentsPresent to name only web", || async {
        let obj = h.store.get(&shop).await.ok()?;
        obj.condition("ComponentsPresent")?
            .message
            .contains("named web in")
            .then_some(obj)
    })
    .await;
    assert_eq!(
        obj.condition("Ready").unwrap().status,
        ConditionStatus::True,
        "missing components are not fatal"
    );
    h.store
        .create(resource(
            Kind::Component,
            org,
            Some("shop"),
            "web",
            json!({}),
        ))
        .await
        .unwrap();
    condition(
        &h.store,
        &shop,
        "ComponentsPresent",
        ConditionStatus::True,
        "AllComponentsPresent",
    )
    .await;
    let obj = h.store.get(&blog).await.unwrap();
    assert_eq!(
        obj.condition("Ready").unwrap().reason,
        "DeploymentPipelineNotFound"
    );

    // Deleting the pipeline makes the project not ready again.
    h.store
        .delete(&key(Kind::DeploymentPipeline, org, "release"), None)
        .await
        .unwrap();
    condition(
        &h.store,
        &shop,
        "Ready",
        ConditionStatus::False,
        "DeploymentPipelineNotFound",
    )
    .await;

    // Events are recorded just after the status write that makes the transition.
    let expected = [
        "DeploymentPipelineNotFound",
        "Ready",
        "DeploymentPipelineNotFound",
    ];
    let reasons = eventually("an event per Ready transition", || async {
        let events = h
            .store
            .list_events("Project", org, None, "shop", 10)
            .await
            .ok()?;
        let reasons: Vec<String> = events.into_iter().map(|e| e.reason).collect();
        (reasons.len() >= expected.len()).then_some(reasons)
    })
    .await;
    assert_eq!(reasons, expected, "newest first");

    h.stop_tx.send(true).unwrap();
    timeout(WITHIN, h.controllers.wait())
        .await
        .expect("controllers stop on shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_project_spec_becomes_a_condition() {
    let h = start().await;
    let org = Some("acme");
    h.store
        .create(resource(Kind::Organization, None, None, "acme", json!({})))
        .await
        .unwrap();
    let spec = json!({"deploymentPipelineRef": 7, "components": [{"nom": "api"}]});
    h.store
        .create(resource(Kind::Project, org, None, "odd", spec))
        .await
        .unwrap();
    let obj = condition(
        &h.store,
        &key(Kind::Project, org, "odd"),
        "Ready",
        ConditionStatus::False,
        "InvalidSpec",
    )
    .await;
    assert_eq!(
        obj.condition("Ready").unwrap().message,
        "spec.deploymentPipelineRef must be a string"
    );
    let components = obj.condition("ComponentsPresent").unwrap();
    assert_eq!(components.reason, "InvalidSpec");
    assert_eq!(
        components.message,
        "spec.components[0].name must be a non-empty string"
    );

    // The loop books a reconcile just after the reconciler returned.
    let stats = eventually("both controllers to count their reconciles", || async {
        let stats: Vec<_> = h.controllers.stats().iter().map(|s| s.snapshot()).collect();
        stats
            .iter()
            .filter(|s| s.name == "organizations" || s.name == "projects")
            .all(|s| s.reconciles_total >= 1)
            .then_some(stats)
    })
    .await;
    let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "organizations",
            "projects",
            "components",
            "environments",
            "releasebindings",
            "workspaces"
        ]
    );
    assert!(stats.iter().all(|s| s.errors_total == 0), "{stats:?}");
    let text = runtime::render_prometheus(h.controllers.stats());
    assert!(
        text.contains("kiln_controller_reconciles_total{controller=\"projects\"}"),
        "{text}"
    );
}

fn in_project(kind: Kind, name: &str) -> Key {
    Key {
        kind,
        organization: Some("acme".into()),
        project: Some("shop".into()),
        name: name.into(),
    }
}

/// Organization `acme` with project `shop`, environments dev → staging and the default pipeline.
async fn delivery_fixture(h: &Harness) {
    let s = &h.store;
    s.create(resource(Kind::Organization, None, None, "acme", json!({})))
        .await
        .unwrap();
    s.create(resource(
        Kind::DataPlane,
        Some("acme"),
        None,
        "local",
        json!({"type": "process"}),
    ))
    .await
    .unwrap();
    for env in ["dev", "staging"] {
        s.create(resource(
            Kind::Environment,
            Some("acme"),
            None,
            env,
            json!({"dataPlaneRef": "local"}),
        ))
        .await
        .unwrap();
    }
    s.create(resource(
        Kind::Project,
        Some("acme"),
        None,
        "shop",
        json!({}),
    ))
    .await
    .unwrap();
    let pipeline = json!({"promotionPaths": [{"sourceEnvironmentRef": "dev", "targetEnvironmentRefs": [{"name": "staging"}]}]});
    s.create(resource(
        Kind::DeploymentPipeline,
        Some("acme"),
        None,
        "default",
        pipeline,
    ))
    .await
    .unwrap();
}

fn web(replicas: u32) -> Value {
    json!({"type": "web-application", "workload": {"command": ["./web"]}, "replicas": replicas, "endpoints": [{"name": "http", "port": 8080}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_gets_content_addressed_releases_bound_in_the_first_environment() {
    let h = start().await;
    delivery_fixture(&h).await;
    let comp = model::normalize(resource(
        Kind::Component,
        Some("acme"),
        Some("shop"),
        "web",
        web(1),
    ))
    .unwrap();
    h.store.create(comp).await.unwrap();
    let ck = in_project(Kind::Component, "web");
    let c = condition(
        &h.store,
        &ck,
        "Deployed",
        ConditionStatus::True,
        "AutoDeployed",
    )
    .await;
    let first = c.status["latestRelease"].as_str().unwrap().to_string();
    assert!(
        first.starts_with("web-") && first.len() == "web-".len() + 10,
        "{first}"
    );
    let release = h
        .store
        .get(&in_project(Kind::Release, &first))
        .await
        .unwrap();
    assert_eq!(release.spec["snapshot"]["replicas"], 1);
    assert_eq!(release.metadata.labels["kiln.dev/component"], "web");
    let binding = h
        .store
        .get(&in_project(Kind::ReleaseBinding, "web-dev"))
        .await
        .unwrap();
    assert_eq!(binding.spec["release"], first.as_str());
    assert_eq!(binding.spec["environment"], "dev");

    // A change that does not touch what runs makes no new release.
    let mut current = h.store.get(&ck).await.unwrap();
    current.spec["autoDeploy"] = json!(true);
    current.metadata.labels.insert("team".into(), "web".into());
    h.store.update(current).await.unwrap();
    idle(&h.controllers, "components").await;
    let releases = h
        .store
        .list(&store::ListQuery {
            kind: Some(Kind::Release),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(releases.items.len(), 1);

    // A change to what runs makes a new release, and auto-deploy re-points the dev binding at it.
    let mut current = h.store.get(&ck).await.unwrap();
    current.spec = model::normalize(resource(
        Kind::Component,
        Some("acme"),
        Some("shop"),
        "web",
        web(2),
    ))
    .unwrap()
    .spec;
    h.store.update(current).await.unwrap();
    let second = eventually("a second release bound in dev", || async {
        let b = h
            .store
            .get(&in_project(Kind::ReleaseBinding, "web-dev"))
            .await
            .ok()?;
        let r = b.spec["release"].as_str()?.to_string();
        (r != first).then_some(r)
    })
    .await;
    let release = h
        .store
        .get(&in_project(Kind::Release, &second))
        .await
        .unwrap();
    assert_eq!(release.spec["snapshot"]["replicas"], 2);
    // The first release is still there: releases are history.
    h.store
        .get(&in_project(Kind::Release, &first))
        .await
        .unwrap();
    assert!(
        h.store
            .get(&in_project(Kind::ReleaseBinding, "web-staging"))
            .await
            .is_err(),
        "only the first environment is auto-deployed"
    );
    let _ = h.stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_with_nothing_to_run_or_no_pipeline_says_why() {
    let h = start().await;
    let s = &h.store;
    s.create(resource(Kind::Organization, None, None, "acme", json!({})))
        .await
        .unwrap();
    s.create(resource(
        Kind::Project,
        Some("acme"),
        None,
        "shop",
        json!({}),
    ))
    .await
    .unwrap();
    let source_only =
        json!({"type": "service", "source": {"git": {"repository": "github.com/acme/api"}}});
    s.create(
        model::normalize(resource(
            Kind::Component,
            Some("acme"),
            Some("shop"),
            "api",
            source_only,
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let c = condition(
        s,
        &in_project(Kind::Component, "api"),
        "Released",
        ConditionStatus::False,
        "NoArtifact",
    )
    .await;
    assert!(c
        .condition("Released")
        .unwrap()
        .message
        .contains("spec.workload"));
    s.create(
        model::normalize(resource(
            Kind::Component,
            Some("acme"),
            Some("shop"),
            "web",
            web(1),
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let c = condition(
        s,
        &in_project(Kind::Component, "web"),
        "Deployed",
        ConditionStatus::False,
        "DeploymentPipelineNotFound",
    )
    .await;
    assert_eq!(
        c.condition("Released").unwrap().status,
        ConditionStatus::True
    );
    // Creating the pipeline (and its first environment) deploys without touching the component.
    s.create(resource(
        Kind::DataPlane,
        Some("acme"),
        None,
        "local",
        json!({"type": "process"}),
    ))
    .await
    .unwrap();
    s.create(resource(
        Kind::Environment,
        Some("acme"),
        None,
        "dev",
        json!({"dataPlaneRef": "local"}),
    ))
    .await
    .unwrap();
    let pipeline = json!({"promotionPaths": [{"sourceEnvironmentRef": "dev", "targetEnvironmentRefs": [{"name": "prod"}]}]});
    s.create(resource(
        Kind::DeploymentPipeline,
        Some("acme"),
        None,
        "default",
        pipeline,
    ))
    .await
    .unwrap();
    condition(
        s,
        &in_project(Kind::Component, "web"),
        "Deployed",
        ConditionStatus::True,
        "AutoDeployed",
    )
    .await;
    let _ = h.stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_runs_its_release_on_the_data_plane_and_cleans_up() {
    use dataplane::DataPlane;
    let h = start().await;
    delivery_fixture(&h).await;
    let comp = model::normalize(resource(
        Kind::Component,
        Some("acme"),
        Some("shop"),
        "web",
        web(2),
    ))
    .unwrap();
    h.store.create(comp).await.unwrap();
    let bk = in_project(Kind::ReleaseBinding, "web-dev");
    let b = condition(&h.store, &bk, "Ready", ConditionStatus::True, "Ready").await;
    assert_eq!(b.status["readyReplicas"], 2);
    assert_eq!(b.status["history"][0]["release"], b.spec["release"]);
    assert_eq!(b.metadata.finalizers, ["kiln.dev/workload"]);
    let id = dataplane::WorkloadId {
        organization: "acme".into(),
        project: "shop".into(),
        environment: "dev".into(),
        component: "web".into(),
    };
    let running = h
        .noop
        .status(&id)
        .await
        .unwrap()
        .expect("the workload was applied");
    assert_eq!(running.desired, 2);
    assert_eq!(
        running.replicas[0].release,
        b.spec["release"].as_str().unwrap()
    );

    // Undeployed: nothing runs, the binding stays.
    let mut undeployed = b.clone();
    undeployed.spec["state"] = json!("undeployed");
    undeployed.metadata.resource_version = None;
    h.store.update(undeployed).await.unwrap();
    condition(&h.store, &bk, "Ready", ConditionStatus::False, "Undeployed").await;
    assert!(h.noop.status(&id).await.unwrap().is_none());

    // Deleting the binding removes the workload first, then the binding.
    let mut active = h.store.get(&bk).await.unwrap();
    active.spec["state"] = json!("active");
    h.store.update(active).await.unwrap();
    condition(&h.store, &bk, "Ready", ConditionStatus::True, "Ready").await;
    h.store.delete(&bk, None).await.unwrap();
    eventually("the binding to be gone", || async {
        h.store.get(&bk).await.is_err().then_some(())
    })
    .await;
    assert!(
        h.noop.status(&id).await.unwrap().is_none(),
        "the workload is removed with its binding"
    );
    let _ = h.stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binding_on_a_data_plane_without_a_driver_says_so() {
    let h = start().await;
    delivery_fixture(&h).await;
    let s = &h.store;
    s.create(resource(
        Kind::DataPlane,
        Some("acme"),
        None,
        "cluster",
        json!({"type": "kubernetes"}),
    ))
    .await
    .unwrap();
    s.create(resource(
        Kind::Environment,
        Some("acme"),
        None,
        "prod",
        json!({"dataPlaneRef": "cluster"}),
    ))
    .await
    .unwrap();
    // prod joins the pipeline after staging.
    let mut pipeline = s
        .get(&key(Kind::DeploymentPipeline, Some("acme"), "default"))
        .await
        .unwrap();
    pipeline.spec = json!({"promotionPaths": [
        {"sourceEnvironmentRef": "dev", "targetEnvironmentRefs": [{"name": "staging"}]},
        {"sourceEnvironmentRef": "staging", "targetEnvironmentRefs": [{"name": "prod"}]}
    ]});
    s.update(pipeline).await.unwrap();
    let comp = model::normalize(resource(
        Kind::Component,
        Some("acme"),
        Some("shop"),
        "web",
        web(1),
    ))
    .unwrap();
    s.create(comp).await.unwrap();
    let dev = condition(
        s,
        &in_project(Kind::ReleaseBinding, "web-dev"),
        "Ready",
        ConditionStatus::True,
        "Ready",
    )
    .await;
    let spec = json!({"component": "web", "environment": "prod", "release": dev.spec["release"]});
    s.create(resource(
        Kind::ReleaseBinding,
        Some("acme"),
        Some("shop"),
        "web-prod",
        spec,
    ))
    .await
    .unwrap();
    let prod = condition(
        s,
        &in_project(Kind::ReleaseBinding, "web-prod"),
        "Ready",
        ConditionStatus::False,
        "DataPlaneUnavailable",
    )
    .await;
    assert!(prod
        .condition("Ready")
        .unwrap()
        .message
        .contains("kubernetes data planes are not available yet"));
    // The child's failure surfaces on the component, naming the environment.
    let c = condition(
        s,
        &in_project(Kind::Component, "web"),
        "Ready",
        ConditionStatus::False,
        "NotReady",
    )
    .await;
    let message = c.condition("Ready").unwrap().message;
    assert!(message.contains("prod: DataPlaneUnavailable"), "{message}");
    let _ = h.stop_tx.send(true);
}

/// Every object of `kind` in project `shop` of `acme`.
async fn in_shop(s: &Store, kind: Kind) -> Vec<Resource> {
    s.list(&store::ListQuery {
        kind: Some(kind),
        organization: Some("acme".into()),
        project: Some("shop".into()),
        ..Default::default()
    })
    .await
    .unwrap()
    .items
}

/// Creates the component `name` in `shop` and waits until its binding in dev runs; returns the component.
async fn running_component(h: &Harness, name: &str) -> Resource {
    let comp = model::normalize(resource(
        Kind::Component,
        Some("acme"),
        Some("shop"),
        name,
        web(1),
    ))
    .unwrap();
    h.store.create(comp).await.unwrap();
    condition(
        &h.store,
        &in_project(Kind::ReleaseBinding, &format!("{name}-dev")),
        "Ready",
        ConditionStatus::True,
        "Ready",
    )
    .await;
    h.store
        .get(&in_project(Kind::Component, name))
        .await
        .unwrap()
}

fn workload(project: &str, env: &str, component: &str) -> dataplane::WorkloadId {
    dataplane::WorkloadId {
        organization: "acme".into(),
        project: project.into(),
        environment: env.into(),
        component: component.into(),
    }
}

/// Binds the component's current release in `env` by hand (as `kiln promote` would), and waits until it runs.
async fn bind(h: &Harness, component: &str, env: &str) {
    let c = h
        .store
        .get(&in_project(Kind::Component, component))
        .await
        .unwrap();
    let spec =
        json!({"component": component, "environment": env, "release": c.status["latestRelease"]});
    let mut b = resource(
        Kind::ReleaseBinding,
        Some("acme"),
        Some("shop"),
        &format!("{component}-{env}"),
        spec,
    );
    b.metadata
        .labels
        .insert("kiln.dev/component".into(), component.into());
    h.store.create(b).await.unwrap();
    condition(
        &h.store,
        &in_project(Kind::ReleaseBinding, &format!("{component}-{env}")),
        "Ready",
        ConditionStatus::True,
        "Ready",
    )
    .await;
}

/// The kinds and names of the deletions the store committed after `from`, in commit order, until `last` is
/// deleted.
async fn deletions_until(s: &Store, from: u64, last: &Key) -> Vec<(Kind, String)> {
    let mut watch = s
        .watch(&store::WatchQuery {
            organization: Some("acme".into()),
            from_revision: Some(from),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + WITHIN;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = timeout(left, watch.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {last} to go; saw {out:?}"))
            .expect("the watch goes on")
            .unwrap();
        if ev.type_ != store::EventType::Deleted {
            continue;
        }
        let kind = ev.object.kind().unwrap();
        let done = Key::of(&ev.object).as_ref() == Some(last);
        out.push((kind, ev.object.metadata.name.clone()));
        if done {
            return out;
        }
    }
}

/// The position of each deletion of `kind`.
fn positions(deletions: &[(Kind, String)], kind: Kind) -> Vec<usize> {
    deletions
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| *k == kind)
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_component_removes_its_workloads_bindings_and_releases_in_order() {
    use dataplane::DataPlane;
    let h = start().await;
    delivery_fixture(&h).await;
    let web_c = running_component(&h, "web").await;
    assert_eq!(web_c.metadata.finalizers, ["kiln.dev/component"]);
    bind(&h, "web", "staging").await;
    // A second release (the first stays as history), and a neighbour that must survive.
    let mut changed = h
        .store
        .get(&in_project(Kind::Component, "web"))
        .await
        .unwrap();
    changed.spec = model::normalize(resource(
        Kind::Component,
        Some("acme"),
        Some("shop"),
        "web",
        web(2),
    ))
    .unwrap()
    .spec;
    h.store.update(changed).await.unwrap();
    eventually("a second release of web", || async {
        (in_shop(&h.store, Kind::Release).await.len() == 2).then_some(())
    })
    .await;
    running_component(&h, "api").await;
    assert!(h
        .noop
        .status(&workload("shop", "staging", "web"))
        .await
        .unwrap()
        .is_some());

    let ck = in_project(Kind::Component, "web");
    let from = h.store.revision().await.unwrap();
    let deleted = h.store.delete(&ck, None).await.unwrap();
    assert!(
        matches!(deleted, store::Deleted::Pending(_)),
        "held by its finalizer"
    );
    let order = deletions_until(&h.store, from, &ck).await;

    // Bindings (whose finalizers removed the workloads) first, then the releases, then the component.
    let bindings = positions(&order, Kind::ReleaseBinding);
    let releases = positions(&order, Kind::Release);
    assert_eq!(bindings.len(), 2, "{order:?}");
    assert_eq!(releases.len(), 2, "{order:?}");
    assert!(bindings.iter().max() < releases.iter().min(), "{order:?}");
    assert_eq!(order.last().unwrap().0, Kind::Component);
    assert_eq!(order.len(), 5, "nothing else was deleted: {order:?}");
    for env in ["dev", "staging"] {
        assert!(
            h.noop
                .status(&workload("shop", env, "web"))
                .await
                .unwrap()
                .is_none(),
            "web still runs in {env}"
        );
    }
    // The neighbour is untouched.
    assert!(h
        .noop
        .status(&workload("shop", "dev", "api"))
        .await
        .unwrap()
        .is_some());
    let left: Vec<String> = in_shop(&h.store, Kind::ReleaseBinding)
        .await
        .into_iter()
        .chain(in_shop(&h.store, Kind::Release).await)
        .map(|r| r.metadata.labels["kiln.dev/component"].clone())
        .collect();
    assert!(
        !left.is_empty() && left.iter().all(|c| c == "api"),
        "{left:?}"
    );
    let _ = h.stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_waiting_for_its_bindings_says_so_and_deploys_nothing_new() {
    use dataplane::DataPlane;
    let h = start().await;
    delivery_fixture(&h).await;
    running_component(&h, "web").await;
    // A binding held by someone else's finalizer keeps the component waiting.
    let bk = in_project(Kind::ReleaseBinding, "web-dev");
    let mut b = h.store.get(&bk).await.unwrap();
    b.metadata.finalizers.push("example.com/hold".into());
    h.store.update(b).await.unwrap();
    let ck = in_project(Kind::Component, "web");
    h.store.delete(&ck, None).await.unwrap();
    let c = condition(
        &h.store,
        &ck,
        "Deleting",
        ConditionStatus::True,
        "RemovingBindings",
    )
    .await;
    assert!(
        c.condition("Deleting").unwrap().message.contains("web-dev"),
        "{c:?}"
    );
    eventually("the workload to be removed", || async {
        h.noop
            .status(&workload("shop", "dev", "web"))
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    assert_eq!(
        in_shop(&h.store, Kind::Release).await.len(),
        1,
        "releases wait for the bindings"
    );

    // A change to what runs while deleting makes no release and no binding.
    let mut current = h.store.get(&ck).await.unwrap();
    current.spec["replicas"] = json!(3);
    h.store.update(current).await.unwrap();
    let mut held = h.store.get(&bk).await.unwrap();
    held.metadata.finalizers.retain(|f| f != "example.com/hold");
    h.store.update(held).await.unwrap();
    eventually("the component to be gone", || async {
        h.store.get(&ck).await.is_err().then_some(())
    })
    .await;
    assert!(in_shop(&h.store, Kind::Release).await.is_empty());
    assert!(in_shop(&h.store, Kind::ReleaseBinding).await.is_empty());
    let _ = h.stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_environment_is_ready_with_its_data_plane_and_deleting_it_removes_only_its_bindings() {
    use dataplane::DataPlane;
    let h = start().await;
    delivery_fixture(&h).await;
    let s = &h.store;
    // Another project deploying into dev too.
    s.create(resource(
        Kind::Project,
        Some("acme"),
        None,
        "blog",
        json!({}),
    ))
    .await
    .unwrap();
    s.create(
        model::normalize(resource(
            Kind::Component,
            Some("acme"),
            Some("blog"),
            "web",
            web(1),
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    running_component(&h, "web").await;
    bind(&h, "web", "staging").await;
    let blog_dev = Key {
        kind: Kind::ReleaseBinding,
        organization: Some("acme".into()),
        project: Some("blog".into()),
        name: "web-dev".into(),
    };
    condition(s, &blog_dev, "Ready", ConditionStatus::True, "Ready").await;

    let dev = key(Kind::Environment, Some("acme"), "dev");
    let env = condition(s, &dev, "Ready", ConditionStatus::True, "Ready").await;
    assert_eq!(env.metadata.finalizers, ["kiln.dev/environment"]);
    // An environment on a missing data plane says so.
    s.create(resource(
        Kind::Environment,
        Some("acme"),
        None,
        "qa",
        json!({"dataPlaneRef": "elsewhere"}),
    ))
    .await
    .unwrap();
    let qa = key(Kind::Environment, Some("acme"), "qa");
    condition(s, &qa, "Ready", ConditionStatus::False, "DataPlaneNotFound").await;
    s.create(resource(
        Kind::DataPlane,
        Some("acme"),
        None,
        "elsewhere",
        json!({"type": "process"}),
    ))
    .await
    .unwrap();
    condition(s, &qa, "Ready", ConditionStatus::True, "Ready").await;

    let deleted = s.delete(&dev, None).await.unwrap();
    assert!(
        matches!(deleted, store::Deleted::Pending(_)),
        "held by its finalizer"
    );
    eventually("the environment to be gone", || async {
        s.get(&dev).await.is_err().then_some(())
    })
    .await;
    for (project, key) in [
        ("shop", in_project(Kind::ReleaseBinding, "web-dev")),
        ("blog", blog_dev),
    ] {
        assert!(s.get(&key).await.is_err(), "{key} is gone");
        assert!(h
            .noop
            .status(&workload(project, "dev", "web"))
            .await
            .unwrap()
            .is_none());
    }
    // Staging, the releases and the components are untouched.
    s.get(&in_project(Kind::ReleaseBinding, "web-staging"))
        .await
        .unwrap();
    assert!(h
        .noop
        .status(&workload("shop", "staging", "web"))
        .await
        .unwrap()
        .is_some());
    assert_eq!(in_shop(s, Kind::Release).await.len(), 1);
    s.get(&in_project(Kind::Component, "web")).await.unwrap();
    let _ = h.stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_project_removes_its_components_and_all_they_deployed_in_order() {
    use dataplane::DataPlane;
    let h = start().await;
    delivery_fixture(&h).await;
    let s = &h.store;
    running_component(&h, "web").await;
    running_component(&h, "api").await;
    bind(&h, "web", "staging").await;
    let pk = key(Kind::Project, Some("acme"), "shop");
    let project = condition(s, &pk, "Ready", ConditionStatus::True, "Ready").await;
    assert_eq!(project.metadata.finalizers, ["kiln.dev/project"]);

    let from = s.revision().await.unwrap();
    let deleted = s.delete(&pk, None).await.unwrap();
    assert!(
        matches!(deleted, store::Deleted::Pending(_)),
        "held by its finalizer"
    );
    let order = deletions_until(s, from, &pk).await;
    assert_eq!(order.last().unwrap().0, Kind::Project);
    for component in ["web", "api"] {
        let at = |kind: Kind| -> Vec<usize> {
            order
                .iter()
                .enumerate()
                .filter(|(_, (k, n))| {
                    *k == kind && (n == component || n.starts_with(&format!("{component}-")))
                })
                .map(|(i, _)| i)
                .collect()
        };
        let (bindings, releases, comp) = (
            at(Kind::ReleaseBinding),
            at(Kind::Release),
            at(Kind::Component),
        );
        assert!(!bindings.is_empty() && !releases.is_empty(), "{order:?}");
        assert_eq!(comp.len(), 1, "{order:?}");
        assert!(bindings.iter().max() < releases.iter().min(), "{order:?}");
        assert!(releases.iter().max() < comp.iter().min(), "{order:?}");
    }
    assert!(
        h.noop
            .list()
            .await
            .unwrap()
            .iter()
            .all(|id| id.project != "shop"),
        "nothing of the project runs"
    );
    for kind in [Kind::Component, Kind::Release, Kind::ReleaseBinding] {
        assert!(in_shop(s, kind).await.is_empty(), "{kind:?} left");
    }
    // What the project did not own stays.
    s.get(&key(Kind::Environment, Some("acme"), "dev"))
        .await
        .unwrap();
    s.get(&key(Kind::DeploymentPipeline, Some("acme"), "default"))
        .await
        .unwrap();
    let _ = h.stop_tx.send(true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_is_ready_when_its_environments_are_and_a_deleted_binding_stays_deleted() {
    let h = start().await;
    delivery_fixture(&h).await;
    let comp = model::normalize(resource(
        Kind::Component,
        Some("acme"),
        Some("shop"),
        "web",
        web(1),
    ))
    .unwrap();
    h.store.create(comp).await.unwrap();
    let ck = in_project(Kind::Component, "web");
    let c = condition(&h.store, &ck, "Ready", ConditionStatus::True, "Ready").await;
    assert_eq!(c.status["environments"][0]["environment"], "dev");
    assert_eq!(c.status["environments"][0]["ready"], true);
    // Deleting the auto-deployed binding by hand sticks: the component says so instead of recreating it.
    let bk = in_project(Kind::ReleaseBinding, "web-dev");
    h.store.delete(&bk, None).await.unwrap();
    condition(
        &h.store,
        &ck,
        "Deployed",
        ConditionStatus::False,
        "BindingRemoved",
    )
    .await;
    condition(
        &h.store,
        &ck,
        "Ready",
        ConditionStatus::False,
        "NotDeployed",
    )
    .await;
    assert!(h.store.get(&bk).await.is_err());
    let _ = h.stop_tx.send(true);
}
