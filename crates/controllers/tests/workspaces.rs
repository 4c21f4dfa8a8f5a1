//! The workspace controller's timers on a real (SQLite) store, with the real job queue: a running workspace idle
//! past its `ttl` is stopped (and says so), activity within the ttl keeps it running, and a stopped workspace
//! whose `autostart` schedule came due is started, once the organization's quota of running workspaces has
//! room. The builds are completed through `controllers::jobs` by a
//! loop standing in for a provisioner (what provisioners do is tested elsewhere); times in the past are
//! written into the records the timers read, instead of waiting an hour.

use std::time::Duration;

use controllers::jobs::{self, Outcome, Phase, ProvisionerInfo, Provisioners};
use model::kinds::ProvisionerType;
use model::{Kind, ObjectMeta, Resource, API_VERSION};
use serde_json::{json, Value};
use store::{Key, Options, Store, StoreError};
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

const ORG: &str = "acme";
const WITHIN: Duration = Duration::from_secs(20);

fn key(kind: Kind, name: &str) -> Key {
    Key {
        kind,
        organization: Some(ORG.into()),
        project: None,
        name: name.into(),
    }
}

fn object(kind: Kind, org: Option<&str>, name: &str, spec: Value) -> Resource {
    Resource {
        api_version: API_VERSION.into(),
        kind: kind.as_str().into(),
        metadata: ObjectMeta {
            name: name.into(),
            organization: org.map(Into::into),
            ..ObjectMeta::default()
        },
        spec,
        status: Value::Null,
    }
}

/// Completes every job as it is queued, as a provisioner would.
fn provisioner(store: Store, registry: Provisioners, mut stop: watch::Receiver<bool>) {
    tokio::spawn(async move {
        let me = ProvisionerInfo {
            name: "test".into(),
            types: vec![ProvisionerType::Process],
            tags: Default::default(),
            organization: None,
        };
        while !*stop.borrow() {
            registry.seen(&me);
            match jobs::claim(&store, &me, "hash").await {
                Ok(Some(c)) => {
                    let done = Outcome {
                        phase: Phase::Succeeded,
                        error: None,
                        outputs: Value::Null,
                    };
                    jobs::complete(&store, &c.key, c.epoch, done, vec![])
                        .await
                        .unwrap();
                }
                _ => {
                    tokio::select! {
                        () = registry.wait_queued(Duration::from_millis(50)) => {}
                        _ = stop.changed() => {}
                    }
                }
            }
        }
    });
}

async fn until(store: &Store, what: &str, f: impl Fn(&Resource) -> bool) -> Resource {
    let deadline = Instant::now() + WITHIN;
    loop {
        if let Ok(w) = store.get(&key(Kind::Workspace, "dev")).await {
            if f(&w) {
                return w;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {w:#?}"
            );
        }
        sleep(Duration::from_millis(20)).await;
    }
}

/// Rewrites part of an object's status (retrying on a conflict with the controller).
async fn set_status(store: &Store, k: &Key, f: impl Fn(&mut serde_json::Map<String, Value>)) {
    loop {
        let obj = store.get(k).await.unwrap();
        let mut status = obj.status.as_object().cloned().unwrap_or_default();
        f(&mut status);
        let rv = obj.metadata.resource_version.as_deref();
        match store.update_status(k, Value::Object(status), rv).await {
            Ok(_) => return,
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

fn ago(d: Duration) -> String {
    (jiff::Timestamp::now() - d).to_string()
}

/// What last changed the workspace's desired state on its own.
fn changed_by(w: &Resource) -> Option<&str> {
    w.metadata
        .annotations
        .get("kiln.dev/state-changed-by")
        .map(String::as_str)
}

fn build_of(w: &Resource) -> u64 {
    w.status["build"]["number"].as_u64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_stops_an_idle_workspace_and_autostart_starts_a_stopped_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(&dir.path().join("kiln.db"), Options::default())
        .await
        .unwrap();
    let (stop_tx, stop_rx) = watch::channel(false);
    let registry = Provisioners::default();
    let drivers = controllers::Drivers::default();
    let _controllers = controllers::spawn_all_with(
        store.clone(),
        drivers,
        None,
        registry.clone(),
        stop_rx.clone(),
    );
    provisioner(store.clone(), registry, stop_rx);

    store
        .create(object(Kind::Organization, None, ORG, json!({})))
        .await
        .unwrap();
    store
        .create(object(
            Kind::TemplateVersion,
            Some(ORG),
            "local-0000000000",
            json!({"template": "local", "hash": "0", "snapshot": {}}),
        ))
        .await
        .unwrap();
    store
        .create(object(
            Kind::Workspace,
            Some(ORG),
            "dev",
            json!({
                "template": "local",
                "templateVersion": "local-0000000000",
                "owner": "ann",
                "state": "running",
                "ttl": "1h",
            }),
        ))
        .await
        .unwrap();
    let w = until(&store, "the first start", |w| {
        w.status["phase"] == "running"
    })
    .await;
    assert_eq!(build_of(&w), 1);

    // Activity half an hour ago, the build two hours ago: within the ttl, it keeps running.
    let ws_key = key(Kind::Workspace, "dev");
    let job1 = key(Kind::ProvisionerJob, "dev-build-1");
    set_status(&store, &job1, |s| {
        s.insert("finishedAt".into(), json!(ago(Duration::from_secs(7200))));
    })
    .await;
    set_status(&store, &ws_key, |s| {
        s.insert("lastActivity".into(), json!(ago(Duration::from_secs(1800))));
    })
    .await;
    sleep(Duration::from_millis(500)).await;
    let w = store.get(&ws_key).await.unwrap();
    assert_eq!(w.spec["state"], "running", "{w:#?}");
    assert_eq!(build_of(&w), 1);

    // Idle for longer than the ttl: stopped by the controller, which says why.
    set_status(&store, &ws_key, |s| {
        s.insert("lastActivity".into(), json!(ago(Duration::from_secs(3700))));
    })
    .await;
    let w = until(&store, "the ttl stop", |w| {
        w.spec["state"] == "stopped" && w.status["phase"] == "stopped"
    })
    .await;
    assert_eq!(changed_by(&w), Some("ttl"), "{w:#?}");
    assert_eq!(build_of(&w), 2);
    let events = store
        .list_events(Kind::Workspace.as_str(), Some(ORG), None, "dev", 50)
        .await
        .unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.message.contains("without activity (spec.ttl)")),
        "{events:?}"
    );

    // A schedule that came due since the stop starts it again.
    let mut w = store.get(&ws_key).await.unwrap();
    w.spec["autostart"] = json!({"schedule": "0 * * * *", "timezone": "UTC"});
    store.update(w).await.unwrap();
    sleep(Duration::from_millis(300)).await;
    assert_eq!(store.get(&ws_key).await.unwrap().spec["state"], "stopped");
    // While the organization's quota of running workspaces is full, a due autostart waits and says why.
    let org_key = Key {
        kind: Kind::Organization,
        organization: None,
        project: None,
        name: ORG.into(),
    };
    let mut org = store.get(&org_key).await.unwrap();
    org.spec = json!({"resourceQuotas": {"runningWorkspaces": 1}});
    store.update(org).await.unwrap();
    store
        .create(object(
            Kind::Workspace,
            Some(ORG),
            "other",
            json!({"template": "local", "templateVersion": "local-0000000000", "owner": "bob", "state": "running"}),
        ))
        .await
        .unwrap();
    set_status(&store, &key(Kind::ProvisionerJob, "dev-build-2"), |s| {
        s.insert("finishedAt".into(), json!(ago(Duration::from_secs(7200))));
    })
    .await;
    let w = until(&store, "the autostart held by the quota", |w| {
        w.status["autostartHeld"].is_string()
    })
    .await;
    assert_eq!(w.spec["state"], "stopped");
    let held = w.status["autostartHeld"].as_str().unwrap();
    assert!(held.contains("runs 1 of the 1 workspace(s)"), "{held}");

    // Room again (the other one stopped): the next check starts it.
    let mut other = store.get(&key(Kind::Workspace, "other")).await.unwrap();
    other.spec["state"] = json!("stopped");
    store.update(other).await.unwrap();
    let mut w = store.get(&ws_key).await.unwrap();
    w.metadata
        .annotations
        .insert("example.com/poke".into(), "1".into());
    store.update(w).await.unwrap();
    let w = until(&store, "the autostart", |w| {
        w.spec["state"] == "running" && w.status["phase"] == "running"
    })
    .await;
    assert_eq!(changed_by(&w), Some("autostart"), "{w:#?}");
    assert_eq!(build_of(&w), 3);
    assert!(w.status.get("autostartHeld").is_none(), "{w:#?}");
    let _ = stop_tx.send(true);
}
