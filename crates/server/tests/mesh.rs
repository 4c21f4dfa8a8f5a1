//! The mesh: dependency addresses forwarding to real `kiln-testsvc` replicas (round-robin, backends changing
//! behind a fixed address, routes that are not allowed, addresses kept across a restart), and the ReleaseBinding
//! controller resolving dependencies into addresses and conditions (missing and not-visible dependencies).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use controllers::{Mesh as _, MeshRoute, MeshTarget};
use serde_json::{json, Value};
use server::mesh::Mesh;

/// A running `kiln-testsvc` replica, stopped on drop.
type Replica = testsvc::Local;

/// Starts replica `index` of the test service on a free loopback port and waits until it accepts connections.
async fn replica(index: u32) -> Replica {
    testsvc::start_local(index, "api")
}

/// The body of a GET of `url`.
async fn get_text(http: &reqwest::Client, url: String) -> String {
    http.get(url).send().await.unwrap().text().await.unwrap()
}

fn object(kind: &str, project: Option<&str>, name: &str, spec: Value) -> model::Resource {
    let mut meta = json!({"name": name, "organization": "acme"});
    if let Some(p) = project {
        meta["project"] = json!(p);
    }
    let r: model::Resource = serde_json::from_value(
        json!({"apiVersion": "kiln.dev/v1", "kind": kind, "metadata": meta, "spec": spec}),
    )
    .unwrap();
    model::normalize(r).unwrap()
}

fn key(kind: model::Kind, project: Option<&str>, name: &str) -> store::Key {
    store::Key {
        kind,
        organization: Some("acme".into()),
        project: project.map(Into::into),
        name: name.into(),
    }
}

async fn open_store() -> (store::Store, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store::Store::open_sqlite(&tmp.path().join("kiln.db"), store::Options::default())
        .await
        .unwrap();
    (store, tmp)
}

fn consumer() -> dataplane::WorkloadId {
    dataplane::WorkloadId {
        organization: "acme".into(),
        project: "shop".into(),
        environment: "dev".into(),
        component: "web".into(),
    }
}

fn api_target() -> MeshTarget {
    MeshTarget {
        organization: "acme".into(),
        project: "shop".into(),
        environment: "dev".into(),
        component: "api".into(),
        endpoint: "http".into(),
    }
}

fn route(allowed: bool) -> MeshRoute {
    MeshRoute {
        consumer: consumer(),
        dependency: "api".into(),
        target: api_target(),
        allowed,
        host: None,
    }
}

/// A client that opens a new connection per request (so each request is balanced on its own).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn set_endpoints(store: &store::Store, addrs: &[SocketAddr]) {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    store
        .update_status(
            &key(model::Kind::ReleaseBinding, Some("shop"), "api-dev"),
            json!({"endpoints": {"http": list}, "readyReplicas": addrs.len(), "replicas": addrs.len()}),
            None,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn forwards_round_robin_follows_backends_and_keeps_its_address() {
    let (store, _tmp) = open_store().await;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mesh = Mesh::new([127, 0, 0, 1].into());
    server::mesh::spawn_table(mesh.clone(), store.clone(), rx.clone());
    let (r0, r1) = (replica(0).await, replica(1).await);
    store
        .create(object(
            "ReleaseBinding",
            Some("shop"),
            "api-dev",
            json!({"component": "api", "environment": "dev", "release": "api-0123456789"}),
        ))
        .await
        .unwrap();
    set_endpoints(&store, &[r0.addr, r1.addr]).await;
    let addr = mesh.listen(&route(true), None).unwrap();
    assert!(addr.ip().is_loopback());
    until("both backends in the table", || {
        mesh.backends(&api_target()).len() == 2
    })
    .await;

    // Round-robin over both replicas, each connection to one.
    let http = client();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let body = get_text(&http, format!("http://{addr}/")).await;
        seen.insert(body);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    let env = get_text(&http, format!("http://{addr}/env/SERVICE_NAME")).await;
    assert_eq!(env, "api\n");

    // The backends change behind the same address.
    let r2 = replica(2).await;
    set_endpoints(&store, &[r2.addr]).await;
    until("the new backend in the table", || {
        mesh.backends(&api_target()) == [r2.addr]
    })
    .await;
    drop((r0, r1));
    for _ in 0..3 {
        let body = get_text(&http, format!("http://{addr}/")).await;
        assert!(body.contains("replica 2"), "{body}");
    }
    // Asking again keeps the address.
    assert_eq!(mesh.listen(&route(true), None).unwrap(), addr);

    // A route that is not allowed accepts and closes.
    assert_eq!(mesh.listen(&route(false), None).unwrap(), addr);
    assert!(http.get(format!("http://{addr}/")).send().await.is_err());
    assert_eq!(mesh.listen(&route(true), None).unwrap(), addr);
    assert!(http.get(format!("http://{addr}/")).send().await.is_ok());

    // Dropping the dependency closes its address; a new mesh (a restarted server) binds the recorded one again.
    mesh.retain(&consumer(), &[]);
    assert_eq!(mesh.listeners(), 0);
    // The aborted accept task lets go of its socket on the runtime's next turn.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let restarted = Mesh::new([127, 0, 0, 1].into());
    let again = restarted.listen(&route(true), Some(addr)).unwrap();
    assert_eq!(again, addr);
}

#[tokio::test]
async fn the_controller_resolves_dependencies_into_addresses_and_conditions() {
    let (store, _tmp) = open_store().await;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let mesh = Mesh::new([127, 0, 0, 1].into());
    server::mesh::spawn_table(mesh.clone(), store.clone(), rx.clone());
    let noop: Arc<dyn dataplane::DataPlane> = Arc::new(dataplane::noop::NoopDriver::new());
    let drivers = controllers::Drivers {
        process: Some(noop),
        docker: None,
    };
    std::mem::forget(controllers::spawn_all_with_mesh(
        store.clone(),
        drivers,
        Some(Arc::new(mesh.clone())),
        rx.clone(),
    ));
    let ep = |visibility: &str| json!([{"name": "http", "port": 8080, "visibility": visibility}]);
    let objects = [
        object("DataPlane", None, "local", json!({"type": "process"})),
        object("Environment", None, "dev", json!({"dataPlaneRef": "local"})),
        object(
            "Component",
            Some("shop"),
            "api",
            json!({"type": "service", "autoDeploy": false, "workload": {"command": ["x"]}, "endpoints": ep("project")}),
        ),
        object(
            "Component",
            Some("other"),
            "secret",
            json!({"type": "service", "autoDeploy": false, "workload": {"command": ["x"]}, "endpoints": ep("project")}),
        ),
        object(
            "Component",
            Some("other"),
            "shared",
            json!({"type": "service", "autoDeploy": false, "workload": {"command": ["x"]}, "endpoints": ep("organization")}),
        ),
        object(
            "Release",
            Some("shop"),
            "web-0123456789",
            json!({"component": "web", "hash": "0123456789abcdef", "snapshot": {
                "type": "service",
                "replicas": 1,
                "workload": {"command": ["x"]},
                "dependencies": [
                    {"name": "api", "component": "api", "endpoint": "http"},
                    {"name": "missing", "component": "api", "endpoint": "grpc"},
                    {"name": "secret", "component": "secret", "endpoint": "http", "project": "other"},
                    {"name": "shared", "component": "shared", "endpoint": "http", "project": "other"},
                    {"name": "database", "type": "postgres"}
                ]
            }}),
        ),
        object(
            "ReleaseBinding",
            Some("shop"),
            "web-dev",
            json!({"component": "web", "environment": "dev", "release": "web-0123456789"}),
        ),
    ];
    for o in objects {
        store.create(o).await.unwrap();
    }
    let binding_key = key(model::Kind::ReleaseBinding, Some("shop"), "web-dev");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let b = store.get(&binding_key).await.unwrap();
        if b.status["dependencies"].as_object().map(|m| m.len()) == Some(4) {
            break b.status;
        }
        assert!(Instant::now() < deadline, "no dependencies in {}", b.status);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let deps = &status["dependencies"];
    assert_eq!(deps["api"]["forwarding"], true, "{status}");
    assert_eq!(deps["shared"]["forwarding"], true, "{status}");
    assert_eq!(deps["missing"]["forwarding"], false, "{status}");
    assert_eq!(deps["secret"]["forwarding"], false, "{status}");
    assert!(deps.get("database").is_none());
    let cond = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "DependenciesReady")
        .cloned()
        .unwrap();
    assert_eq!(cond["status"], "False");
    assert_eq!(cond["reason"], "DependencyNotFound");
    let message = cond["message"].as_str().unwrap();
    assert!(message.contains("has no endpoint grpc"), "{message}");
    assert!(
        message.contains("secret: endpoint http of component secret in project other is visible"),
        "{message}"
    );
    assert_eq!(mesh.listeners(), 4);

    // Each address is stable across reconciles.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let again = store.get(&binding_key).await.unwrap();
    assert_eq!(again.status["dependencies"], *deps);
}
