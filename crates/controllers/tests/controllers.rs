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
    let controllers = controllers::spawn_all(store.clone(), stop_rx);
    Harness {
        store,
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
            .all(|s| s.reconciles_total >= 1)
            .then_some(stats)
    })
    .await;
    let names: Vec<&str> = stats.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["organizations", "projects"]);
    assert!(stats.iter().all(|s| s.errors_total == 0), "{stats:?}");
    let text = runtime::render_prometheus(h.controllers.stats());
    assert!(
        text.contains("kiln_controller_reconciles_total{controller=\"projects\"}"),
        "{text}"
    );
}
