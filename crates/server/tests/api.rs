//! API tests against the whole router via `oneshot` (no socket) on a real SQLite store: the OpenAPI document
//! matches the router, every non-public route requires authentication, every route × role × organization is
//! authorised as the built-in roles say, and bad input is refused without storing anything.

use std::collections::{BTreeMap, BTreeSet};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use model::{Kind, Scope};
use serde_json::{json, Value};
use tower::ServiceExt;

struct Env {
    app: Router,
    admin: String,
    store: store::Store,
    _tmp: tempfile::TempDir,
    _shutdown: tokio::sync::watch::Sender<bool>,
}

async fn call(
    app: &Router,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let body = match body {
        Some(b) => {
            req = req.header("content-type", "application/json");
            Body::from(serde_json::to_vec(&b).unwrap())
        }
        None => Body::empty(),
    };
    let resp = app.clone().oneshot(req.body(body).unwrap()).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let store = store::Store::open_sqlite(&tmp.path().join("kiln.db"), store::Options::default())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = server::Config {
        data_dir: tmp.path().to_path_buf(),
        ..Default::default()
    };
    let state = server::AppState::new(store.clone(), config, rx);
    server::bootstrap::first_start(&state, tmp.path())
        .await
        .unwrap()
        .expect("first start");
    state.set_ready(true);
    let admin = std::fs::read_to_string(tmp.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    Env {
        app: server::app(state),
        admin,
        store,
        _tmp: tmp,
        _shutdown: tx,
    }
}

fn manifest(kind: Kind, name: &str) -> Value {
    let spec = match kind {
        Kind::Organization => json!({}),
        Kind::DataPlane => json!({"type": "process"}),
        Kind::Environment => json!({"dataPlaneRef": "local"}),
        Kind::DeploymentPipeline => json!({"promotionPaths": []}),
        Kind::Project => json!({"description": "a project"}),
        Kind::Secret => json!({"stringData": {"k": "v"}}),
        Kind::Role => json!({"rules": [{"kinds": ["projects"], "verbs": ["get"]}]}),
        Kind::RoleBinding => {
            json!({"roleRef": "viewer", "subjects": [{"kind": "User", "name": "nobody"}]})
        }
        Kind::Component => {
            json!({"type": "service", "workload": {"image": "nginx:1"}, "endpoints": [{"name": "http", "port": 8080}]})
        }
        Kind::Release => json!({
            "component": "fixture",
            "hash": format!("{}{}", &RELEASE_HASH, "0".repeat(54)),
            "snapshot": {"type": "service", "workload": {"image": "nginx:1"}, "replicas": 1}
        }),
        Kind::ReleaseBinding => json!({
            "component": "fixture",
            "environment": "fixture",
            "release": format!("fixture-{RELEASE_HASH}")
        }),
        Kind::Template => json!({"description": "a template"}),
        Kind::TemplateVersion => json!({
            "template": "fixture",
            "hash": format!("{}{}", &RELEASE_HASH, "0".repeat(54)),
            "snapshot": {}
        }),
        Kind::Workspace => json!({"template": "fixture"}),
        Kind::Pipeline => json!({
            "source": {"repository": "/srv/git/fixture.git"},
            "steps": [{"name": "test", "commands": ["true"]}]
        }),
        Kind::PipelineRun => json!({
            "pipeline": "fixture",
            "number": 1,
            "branch": "main",
            "snapshot": {
                "source": {"repository": "/srv/git/fixture.git"},
                "steps": [{"name": "test", "commands": ["true"]}]
            }
        }),
        Kind::ProvisionerJob => json!({
            "workspace": "fixture",
            "build": 1,
            "transition": "stop",
            "templateVersion": "fixture-0123456789",
            "provisioner": "process",
            "owner": "admin"
        }),
    };
    json!({"apiVersion": "kiln.dev/v1", "kind": kind.as_str(), "metadata": {"name": name}, "spec": spec})
}

/// The content hash (its first ten digits) of the fixture Release.
const RELEASE_HASH: &str = "0123456789";

/// The object each kind's item routes address in the RBAC table (present in both organizations).
fn fixture_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Release => "fixture-0123456789",
        Kind::TemplateVersion => "fixture-0123456789",
        Kind::DataPlane => "local",
        Kind::Project => "shop",
        Kind::DeploymentPipeline => "default",
        Kind::Role => "custom",
        _ => "fixture",
    }
}

fn item_path(kind: Kind, org: &str, name: &str) -> String {
    match kind.scope() {
        Scope::Cluster => format!("/api/v1/orgs/{name}"),
        Scope::Organization => format!("/api/v1/orgs/{org}/{}/{name}", kind.plural()),
        Scope::Project => format!("/api/v1/orgs/{org}/projects/shop/{}/{name}", kind.plural()),
    }
}

/// Creates `org` with one object of every kind (as the superuser).
async fn seed_org(e: &Env, org: &str) {
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/orgs",
        Some(&e.admin),
        Some(manifest(Kind::Organization, org)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    for &kind in Kind::ALL.iter().filter(|k| **k != Kind::Organization) {
        let name = fixture_name(kind);
        let (s, b) = call(
            &e.app,
            Method::PUT,
            &item_path(kind, org, name),
            Some(&e.admin),
            Some(manifest(kind, name)),
        )
        .await;
        assert!(s.is_success(), "seeding {kind} {name} in {org}: {s} {b}");
    }
}

/// A user bound in `org` with `role` (optionally limited to `project`), and an API token for them.
async fn user_with_role(
    e: &Env,
    name: &str,
    org: &str,
    role: &str,
    project: Option<&str>,
) -> String {
    let mut body =
        json!({"name": name, "organization": org, "role": role, "password": "password-123"});
    if let Some(p) = project {
        body["project"] = json!(p);
    }
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/users",
        Some(&e.admin),
        Some(body),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/tokens",
        Some(&e.admin),
        Some(json!({"user": name})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    b["token"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn openapi_document_and_router_agree() {
    let e = env().await;
    let (s, doc) = call(&e.app, Method::GET, "/api/v1/openapi.json", None, None).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.0.3");
    let paths = doc["paths"].as_object().expect("paths");
    let mut documented = BTreeSet::new();
    for (path, ops) in paths {
        for method in ops.as_object().unwrap().keys() {
            documented.insert((method.to_uppercase(), path.clone()));
        }
    }
    // The document is generated from the same table the router is built from...
    let registered: BTreeSet<(String, String)> = server::api()
        .ops
        .iter()
        .map(|o| (o.method.to_string(), o.path.clone()))
        .collect();
    assert_eq!(documented, registered);
    let all_methods = ["GET", "POST", "PUT", "PATCH", "DELETE"];
    for (path, ops) in paths {
        let concrete = path
            .replace("{org}", "default")
            .replace("{project}", "p")
            .replace("{name}", "n")
            .replace("{user}", "u")
            .replace("{id}", "i");
        for m in all_methods {
            let (status, body) = call(
                &e.app,
                Method::from_bytes(m.as_bytes()).unwrap(),
                &concrete,
                None,
                None,
            )
            .await;
            let router_miss = body["type"] == "https://kiln.dev/problems/no-route";
            let wrong_method = status == StatusCode::METHOD_NOT_ALLOWED;
            if ops.get(m.to_lowercase()).is_some() {
                // ...and every documented operation is served (never the router's "no route" or 405)...
                assert!(
                    !router_miss && !wrong_method,
                    "{m} {path} is documented but not served ({status})"
                );
            } else {
                // ...and nothing undocumented is served on a documented path.
                assert!(
                    wrong_method,
                    "{m} {path} is served ({status}) but not documented"
                );
            }
        }
    }
    // Paths the router does not serve fall through to the documented "no route" problem.
    for p in [
        "/api/v1/nothing",
        "/api/v1/orgs/default/widgets",
        "/api/v2/orgs",
    ] {
        let (status, body) = call(&e.app, Method::GET, p, Some(&e.admin), None).await;
        assert_eq!(
            (status, body["type"].as_str()),
            (
                StatusCode::NOT_FOUND,
                Some("https://kiln.dev/problems/no-route")
            ),
            "{p}"
        );
    }
    // Schemas referenced by operations exist.
    let schemas = doc["components"]["schemas"].as_object().unwrap();
    for name in [
        "Resource",
        "Problem",
        "ResourceList",
        "LoginRequest",
        "WhoAmI",
        "TokenInfo",
    ] {
        assert!(schemas.contains_key(name), "schema {name} missing");
    }
}

#[tokio::test]
async fn every_non_public_route_requires_authentication() {
    let e = env().await;
    let public = [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/openapi.json",
        "/api/v1/login",
        // Authenticated by the agent token of a workspace build, not a user's.
        "/api/v1/agent/connect",
        "/api/v1/agent/stream",
        // A browser's way to a subdomain app: it sends the signed-out to sign in.
        "/api/v1/apps/auth",
        // The provisioner queue: authenticated with a provisioner key, not a user's token.
        "/api/v1/provisioner/acquire",
        "/api/v1/provisioner/jobs/{org}/{name}/logs",
        "/api/v1/provisioner/jobs/{org}/{name}/renew",
        "/api/v1/provisioner/jobs/{org}/{name}/complete",
        // The runner queue: authenticated with a runner token, not a user's.
        "/api/v1/runner/acquire",
        "/api/v1/runner/runs/{org}/{name}/{op}",
        "/api/v1/runner/runs/{org}/{name}/artifacts/{*path}",
        // Webhook deliveries: verified by the trigger's signature or token, not a user's.
        "/api/v1/hooks/{org}/{pipeline}/{trigger}",
    ];
    for op in server::api().ops {
        assert_eq!(
            op.public,
            public.contains(&op.path.as_str()),
            "{} {} public flag",
            op.method,
            op.path
        );
        if op.public {
            continue;
        }
        let concrete = op
            .path
            .replace("{org}", "default")
            .replace("{project}", "p")
            .replace("{name}", "n")
            .replace("{user}", "admin")
            .replace("{id}", "i");
        for token in [None, Some("kiln_not-a-real-token")] {
            let (status, body) =
                call(&e.app, op.method.clone(), &concrete, token, Some(json!({}))).await;
            assert_eq!(
                status,
                StatusCode::UNAUTHORIZED,
                "{} {} with {token:?}: {body}",
                op.method,
                op.path
            );
        }
    }
    for p in ["/healthz", "/readyz", "/metrics", "/api/v1/openapi.json"] {
        assert_eq!(
            call(&e.app, Method::GET, p, None, None).await.0,
            StatusCode::OK,
            "{p}"
        );
    }
}

/// What the built-in roles grant, written out independently of their definitions.
fn expected_allowed(role: &str, verb: &str, kind: Kind) -> bool {
    let read = matches!(verb, "get" | "list" | "watch");
    match role {
        "owner" => true,
        "admin" => kind != Kind::Organization || !matches!(verb, "create" | "delete"),
        "developer" => {
            if kind == Kind::Secret && verb == "get" {
                return false;
            }
            read || matches!(
                kind,
                Kind::Project | Kind::Component | Kind::Secret | Kind::Workspace
            )
        }
        "viewer" => read && !(kind == Kind::Secret && verb == "get"),
        _ => unreachable!("unknown role {role}"),
    }
}

fn verb_of(method: &Method, path: &str) -> &'static str {
    let item = path.ends_with('}') || path.ends_with("/status");
    match (method.as_str(), item) {
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", _) => "delete",
        _ => unreachable!(),
    }
}

/// The delivery actions on a component (promote, approve, rollback, releases) and its logs (called without
/// `env`: 400 once access is granted, 404 where the component is invisible).
fn is_delivery(path: &str) -> bool {
    ["promote", "approve", "rollback", "releases", "logs"]
        .iter()
        .any(|s| path.ends_with(&format!("/components/{{name}}/{s}")))
}

fn kind_of_path(path: &str) -> Option<Kind> {
    let segs: Vec<&str> = path
        .split('/')
        .filter(|s| !s.is_empty() && !s.starts_with('{'))
        .collect();
    // The last literal segment names the kind (or `status`, whose kind precedes it).
    segs.iter().rev().find_map(|s| {
        Kind::from_plural(s).or(if *s == "orgs" {
            Some(Kind::Organization)
        } else {
            None
        })
    })
}

/// The key `fixture` of an organization in `collection` (`provisionerkeys`, `runnertokens`), made (again) by
/// the server's admin.
async fn key_fixture(e: &Env, org: &str, collection: &str) {
    let (s, b) = call(
        &e.app,
        Method::POST,
        &format!("/api/v1/orgs/{org}/{collection}"),
        Some(&e.admin),
        Some(json!({"name": "fixture"})),
    )
    .await;
    assert!(s.is_success(), "making {collection} fixture in {org}: {b}");
}

#[tokio::test]
async fn rbac_every_route_by_role_and_organization() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    seed_org(&e, "beta").await;
    for org in ["alpha", "beta"] {
        key_fixture(&e, org, "provisionerkeys").await;
        key_fixture(&e, org, "runnertokens").await;
    }
    // An artifact of each organization's fixture run, for the artifact route.
    for org in ["alpha", "beta"] {
        let dir = e._tmp.path().join(format!("artifacts/{org}/fixture/dist"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("out.txt"), "fixture\n").unwrap();
    }
    let roles = ["owner", "admin", "developer", "viewer"];
    let mut tokens = BTreeMap::new();
    for r in roles {
        tokens.insert(
            r,
            user_with_role(&e, &format!("{r}-a"), "alpha", r, None).await,
        );
    }
    let mut checked = 0;
    for op in server::api().ops {
        let path = op.path.as_str();
        if op.public {
            continue;
        }
        for role in roles {
            let token = tokens[role].as_str();
            for org in ["alpha", "beta"] {
                let same = org == "alpha";
                let kind = kind_of_path(path);
                let (status, body, expect): (StatusCode, Value, &str) = match (path, kind) {
                    ("/api/v1/orgs", _) if op.method == Method::GET => {
                        let (s, b) = call(&e.app, Method::GET, path, Some(token), None).await;
                        let names: Vec<&str> = b["items"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .filter_map(|o| o["metadata"]["name"].as_str())
                            .collect();
                        assert_eq!(
                            names,
                            ["alpha"],
                            "{role} lists only the organizations it belongs to"
                        );
                        (s, b, "allowed")
                    }
                    ("/api/v1/orgs", _) => {
                        let (s, b) = call(
                            &e.app,
                            Method::POST,
                            path,
                            Some(token),
                            Some(manifest(Kind::Organization, &format!("new-{role}"))),
                        )
                        .await;
                        (s, b, "forbidden")
                    }
                    (p, _)
                        if p.contains("/provisionerkeys")
                            || p.ends_with("/provisioners")
                            || p.contains("/runnertokens")
                            || p.ends_with("/runners") =>
                    {
                        // Keys are the administrators'; the live provisioners are readable like templates,
                        // the live runners like pipelines.
                        let req_path = p.replace("{org}", org).replace("{name}", "fixture");
                        let body = (op.method == Method::POST)
                            .then(|| json!({"name": format!("by-{role}"), "tags": {"site": "a"}}));
                        let (s, b) =
                            call(&e.app, op.method.clone(), &req_path, Some(token), body).await;
                        if s.is_success() && op.method == Method::DELETE {
                            let collection = if p.contains("/runnertokens") {
                                "runnertokens"
                            } else {
                                "provisionerkeys"
                            };
                            key_fixture(&e, org, collection).await;
                        }
                        let expect = if !same {
                            "hidden"
                        } else if p.ends_with("/provisioners")
                            || p.ends_with("/runners")
                            || matches!(role, "owner" | "admin")
                        {
                            "allowed"
                        } else {
                            "forbidden"
                        };
                        (s, b, expect)
                    }
                    (p, Some(kind))
                        if p.starts_with("/api/v1/orgs/{org}")
                            && !p.ends_with("/events")
                            && !is_delivery(p) =>
                    {
                        let verb = verb_of(&op.method, p);
                        let name = if verb == "create" {
                            format!("made-by-{role}")
                        } else {
                            fixture_name(kind).to_string()
                        };
                        let concrete = p
                            .replace("{org}", org)
                            .replace("{project}", "shop")
                            .replace("{name}", &name)
                            .replace("{*path}", "dist/out.txt");
                        let concrete = if kind == Kind::Organization {
                            concrete
                        } else {
                            concrete.replace("/{name}", "")
                        };
                        let body = match (op.method.as_str(), p.ends_with("/status")) {
                            ("PUT", true) => Some(json!({"status": {"note": role}})),
                            ("PUT" | "POST", false) => {
                                let mut m = manifest(kind, &name);
                                if kind == Kind::Organization {
                                    m["metadata"]["name"] = json!(org);
                                }
                                Some(m)
                            }
                            ("PATCH", _) => {
                                Some(json!({"metadata": {"labels": {"touched-by": role}}}))
                            }
                            _ => None,
                        };
                        let method = op.method.clone();
                        let req_path = if kind == Kind::Organization {
                            concrete.replace("{org}", org)
                        } else {
                            concrete
                        };
                        let (s, b) = if method == Method::PATCH {
                            let req = Request::builder()
                                .method(Method::PATCH)
                                .uri(&req_path)
                                .header("authorization", format!("Bearer {token}"))
                                .header("content-type", "application/merge-patch+json")
                                .body(Body::from(serde_json::to_vec(&body.unwrap()).unwrap()))
                                .unwrap();
                            let resp = e.app.clone().oneshot(req).await.unwrap();
                            let st = resp.status();
                            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
                            (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
                        } else {
                            call(&e.app, method, &req_path, Some(token), body).await
                        };
                        // Restore what a successful delete removed, so later cases find their fixture.
                        if s.is_success() && verb == "delete" {
                            let fixture = item_path(kind, org, fixture_name(kind));
                            let (rs, rb) = call(
                                &e.app,
                                Method::PUT,
                                &fixture,
                                Some(&e.admin),
                                Some(manifest(kind, fixture_name(kind))),
                            )
                            .await;
                            assert!(rs.is_success(), "restoring {fixture}: {rb}");
                        }
                        // A workspace's tunnel and streams are its owner's (here the admin who made the
                        // fixture) and administrators' only, whatever else the role may read.
                        let connect = path.ends_with("/tunnel") || path.ends_with("/stream");
                        let expect = if !same {
                            "hidden"
                        } else if connect && !matches!(role, "owner" | "admin") {
                            "forbidden"
                        } else if expected_allowed(role, verb, kind) {
                            "allowed"
                        } else {
                            "forbidden"
                        };
                        (s, b, expect)
                    }
                    _ => {
                        let (s, b) = identity_case(&e, &op.method, path, token, role, org).await;
                        let expect = identity_expectation(&op.method, path, role, same);
                        (s, b, expect)
                    }
                };
                let ok = match expect {
                    "allowed" => !matches!(
                        status,
                        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN | StatusCode::NOT_FOUND
                    ),
                    "forbidden" => status == StatusCode::FORBIDDEN,
                    "hidden" => status == StatusCode::NOT_FOUND,
                    _ => unreachable!(),
                };
                assert!(
                    ok,
                    "{} {path} as {role} in {org}: expected {expect}, got {status}: {body}",
                    op.method
                );
                checked += 1;
            }
        }
    }
    assert!(
        checked > 500,
        "only {checked} route × role × organization cases ran"
    );
}

/// Calls a non-resource route as `role` against organization `org` where the route takes one.
async fn identity_case(
    e: &Env,
    method: &Method,
    path: &str,
    token: &str,
    role: &str,
    org: &str,
) -> (StatusCode, Value) {
    let m = method.clone();
    match (method.as_str(), path) {
        ("POST", "/api/v1/logout")
        | ("GET", "/api/v1/whoami")
        | ("GET", "/api/v1/version")
        | ("GET", "/api/v1/users")
        | ("GET", "/api/v1/tokens") => call(&e.app, m, path, Some(token), None).await,
        ("POST", "/api/v1/users") => {
            let name = format!("made-{role}-{org}");
            call(
                &e.app,
                m,
                path,
                Some(token),
                Some(json!({"name": name, "organization": org, "role": "viewer"})),
            )
            .await
        }
        ("GET", "/api/v1/users/{user}") => {
            call(
                &e.app,
                m,
                &format!("/api/v1/users/viewer-{}", &org[..1]),
                Some(token),
                None,
            )
            .await
        }
        ("DELETE", "/api/v1/users/{user}") | ("PUT", "/api/v1/users/{user}/password") => {
            // Acting on a user of the other organization must not reveal them; on one's own organization's
            // users only an owner (of every organization they are in) may.
            let target = format!(
                "target-{}-{role}-{org}",
                method.as_str().to_ascii_lowercase()
            );
            let (s, b) = call(
                &e.app,
                Method::POST,
                "/api/v1/users",
                Some(&e.admin),
                Some(json!({"name": target, "organization": org, "role": "viewer"})),
            )
            .await;
            assert_eq!(s, StatusCode::CREATED, "{b}");
            let p = path.replace("{user}", &target);
            call(
                &e.app,
                m,
                &p,
                Some(token),
                if path.ends_with("password") {
                    Some(json!({"password": "new-password-1"}))
                } else {
                    None
                },
            )
            .await
        }
        ("POST", "/api/v1/tokens") => {
            call(&e.app, m, path, Some(token), Some(json!({"name": "t"}))).await
        }
        ("DELETE", "/api/v1/tokens/{id}") => {
            let (_, t) = call(
                &e.app,
                Method::POST,
                "/api/v1/tokens",
                Some(token),
                Some(json!({"name": "to-revoke"})),
            )
            .await;
            call(
                &e.app,
                m,
                &format!("/api/v1/tokens/{}", t["id"].as_str().unwrap()),
                Some(token),
                None,
            )
            .await
        }
        ("GET", "/api/v1/audit") => {
            call(
                &e.app,
                m,
                &format!("/api/v1/audit?organization={org}"),
                Some(token),
                None,
            )
            .await
        }
        ("GET", "/api/v1/orgs/{org}/events") => {
            call(
                &e.app,
                m,
                &format!("/api/v1/orgs/{org}/events?kind=Project&name=shop"),
                Some(token),
                None,
            )
            .await
        }
        (_, p) if is_delivery(p) => {
            let concrete = p
                .replace("{org}", org)
                .replace("{project}", "shop")
                .replace("{name}", "fixture");
            let body = match p.rsplit('/').next() {
                Some("promote") => Some(json!({"from": "fixture", "to": "fixture"})),
                Some("approve") => Some(json!({"environment": "fixture"})),
                Some("rollback") => Some(json!({"environment": "fixture"})),
                _ => None,
            };
            call(&e.app, m, &concrete, Some(token), body).await
        }
        _ => panic!("{method} {path}: add this route to the RBAC table in tests/api.rs"),
    }
}

fn identity_expectation(method: &Method, path: &str, role: &str, same_org: bool) -> &'static str {
    let admin_like = matches!(role, "owner" | "admin");
    match (method.as_str(), path) {
        ("POST", "/api/v1/users") | ("GET", "/api/v1/audit") if !same_org => "hidden",
        ("POST", "/api/v1/users") | ("GET", "/api/v1/audit") => {
            if admin_like {
                "allowed"
            } else {
                "forbidden"
            }
        }
        ("GET", "/api/v1/users/{user}") if !same_org => "hidden",
        ("GET", "/api/v1/users/{user}") => {
            if role == "developer" || role == "viewer" || admin_like {
                // Users visible through role bindings the caller may list (every built-in role may).
                "allowed"
            } else {
                "hidden"
            }
        }
        ("DELETE", "/api/v1/users/{user}") | ("PUT", "/api/v1/users/{user}/password")
            if !same_org =>
        {
            "hidden"
        }
        ("DELETE", "/api/v1/users/{user}") | ("PUT", "/api/v1/users/{user}/password") => {
            if role == "owner" {
                "allowed"
            } else {
                "forbidden"
            }
        }
        ("GET", "/api/v1/orgs/{org}/events") if !same_org => "hidden",
        (_, p) if is_delivery(p) && !same_org => "hidden",
        // Re-pointing bindings takes `update` on releasebindings; reading history, `list`.
        ("POST", p) if is_delivery(p) => {
            if admin_like {
                "allowed"
            } else {
                "forbidden"
            }
        }
        _ => "allowed",
    }
}

#[tokio::test]
async fn project_limited_binding_sees_only_its_project() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/projects/other",
        Some(&e.admin),
        Some(manifest(Kind::Project, "other")),
    )
    .await;
    assert!(s.is_success(), "{b}");
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/projects/other/components/hidden",
        Some(&e.admin),
        Some(manifest(Kind::Component, "hidden")),
    )
    .await;
    assert!(s.is_success(), "{b}");
    let dev = user_with_role(&e, "shop-dev", "alpha", "developer", Some("shop")).await;
    let (s, _) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/projects/shop/components/mine",
        Some(&dev),
        Some(manifest(Kind::Component, "mine")),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED);
    let (s, _) = call(
        &e.app,
        Method::GET,
        "/api/v1/orgs/alpha/projects/other/components/hidden",
        Some(&dev),
        None,
    )
    .await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "another project's component is hidden"
    );
    let (s, _) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/projects/other/components/x",
        Some(&dev),
        Some(manifest(Kind::Component, "x")),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // Listing across projects returns only what the binding covers (the store read is filtered).
    let (s, b) = call(
        &e.app,
        Method::GET,
        "/api/v1/orgs/alpha/components",
        Some(&dev),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let mut names: Vec<&str> = b["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["metadata"]["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["fixture", "mine"]);
    let (s, _) = call(
        &e.app,
        Method::GET,
        "/api/v1/orgs/alpha/projects/shop",
        Some(&dev),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = call(
        &e.app,
        Method::DELETE,
        "/api/v1/orgs/alpha/projects/shop",
        Some(&dev),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
}

async fn raw_put(e: &Env, body: &'static str, ct: &'static str) -> (StatusCode, String, Value) {
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/api/v1/orgs/default/projects/p1")
        .header("authorization", format!("Bearer {}", e.admin))
        .header("content-type", ct)
        .body(Body::from(body))
        .unwrap();
    let resp = e.app.clone().oneshot(req).await.unwrap();
    let st = resp.status();
    let ct = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (st, ct, serde_json::from_slice::<Value>(&bytes).unwrap())
}

#[tokio::test]
async fn bad_input_is_refused_with_field_paths_and_nothing_is_stored() {
    let e = env().await;
    let t = Some(e.admin.as_str());
    let cases: Vec<(&str, &str, u16, &str)> = vec![
        ("{\"apiVersion\": ", "application/json", 400, "line 1"),
        ("kind: [", "application/yaml", 400, "line"),
        (
            r#"{"apiVersion":"kiln.dev/v1","kind":"Project","metadata":{"name":"p1"},"spec":{"bogus":1}}"#,
            "application/json",
            422,
            "spec.bogus",
        ),
        (
            r#"{"apiVersion":"choreo.dev/v1","kind":"Project","metadata":{"name":"p1"}}"#,
            "application/json",
            422,
            "apiVersion: must be kiln.dev/v1",
        ),
        (
            r#"{"apiVersion":"kiln.dev/v1","kind":"Widget","metadata":{"name":"p1"}}"#,
            "application/json",
            422,
            "kind",
        ),
        (
            r#"{"apiVersion":"kiln.dev/v1","kind":"Component","metadata":{"name":"p1"}}"#,
            "application/json",
            422,
            "kind: this endpoint takes Project",
        ),
        (
            r#"{"apiVersion":"kiln.dev/v1","kind":"Project","metadata":{"name":"P1"}}"#,
            "application/json",
            422,
            "metadata.name",
        ),
        (
            r#"{"apiVersion":"kiln.dev/v1","kind":"Project","metadata":{"name":"p1","extra":true}}"#,
            "application/json",
            400,
            "extra",
        ),
    ];
    for (body, ct, code, needle) in cases {
        let (status, content_type, problem) = raw_put(&e, body, ct).await;
        assert_eq!(status.as_u16(), code, "{body}: {problem}");
        assert_eq!(content_type, "application/problem+json");
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains(needle),
            "{body}: detail {detail:?} should mention {needle:?}"
        );
        assert_eq!(problem["status"], code);
    }
    // A component with a bad port names the exact path; a missing data plane names the reference.
    let mut comp = manifest(Kind::Component, "c1");
    comp["spec"]["endpoints"][0]["port"] = json!(70000);
    call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/default/projects/shop",
        t,
        Some(manifest(Kind::Project, "shop")),
    )
    .await;
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/default/projects/shop/components/c1",
        t,
        Some(comp),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("spec.endpoints[0].port: must be 1-65535"),
        "{b}"
    );
    assert_eq!(b["errors"][0]["path"], "spec.endpoints[0].port");
    let mut env_m = manifest(Kind::Environment, "dev");
    env_m["spec"]["dataPlaneRef"] = json!("missing");
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/default/environments/dev",
        t,
        Some(env_m),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("spec.dataPlaneRef: DataPlane missing does not exist"),
        "{b}"
    );
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/default/projects/nope/components/c2",
        t,
        Some(manifest(Kind::Component, "c2")),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("metadata.project: Project nope does not exist"),
        "{b}"
    );
    // Oversize bodies: 413 with the limit named.
    let big = format!(
        r#"{{"apiVersion":"kiln.dev/v1","kind":"Project","metadata":{{"name":"p1"}},"spec":{{"description":"{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    let req = Request::builder()
        .method(Method::PUT)
        .uri("/api/v1/orgs/default/projects/p1")
        .header("authorization", format!("Bearer {}", e.admin))
        .body(Body::from(big))
        .unwrap();
    let resp = e.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing was stored by any of the refused writes.
    for p in [
        "/api/v1/orgs/default/projects/p1",
        "/api/v1/orgs/default/environments/dev",
        "/api/v1/orgs/default/projects/shop/components/c1",
    ] {
        assert_eq!(
            call(&e.app, Method::GET, p, t, None).await.0,
            StatusCode::NOT_FOUND,
            "{p} must not exist"
        );
    }
    // The server still serves.
    assert_eq!(
        call(&e.app, Method::GET, "/readyz", None, None).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn stale_write_is_a_conflict_naming_the_current_version() {
    let e = env().await;
    let t = Some(e.admin.as_str());
    let (_, first) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/default/projects/p",
        t,
        Some(manifest(Kind::Project, "p")),
    )
    .await;
    let rv = first["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_string();
    let mut m = manifest(Kind::Project, "p");
    m["spec"]["description"] = json!("second");
    let (s, second) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/default/projects/p",
        t,
        Some(m.clone()),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(second["metadata"]["generation"], 2);
    m["metadata"]["resourceVersion"] = json!(rv);
    m["spec"]["description"] = json!("third");
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/default/projects/p",
        t,
        Some(m),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let current = second["metadata"]["resourceVersion"].as_str().unwrap();
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains(&format!("current resourceVersion is {current}")),
        "{b}"
    );
}

#[tokio::test]
async fn secrets_values_are_never_returned_and_audit_records_writes() {
    let e = env().await;
    let t = Some(e.admin.as_str());
    let (s, b) = call(&e.app, Method::PUT, "/api/v1/orgs/default/secrets/db", t, Some(json!({"apiVersion": "kiln.dev/v1", "kind": "Secret", "metadata": {"name": "db"}, "spec": {"stringData": {"password": "hunter2"}}}))).await;
    assert!(s.is_success(), "{b}");
    let (_, got) = call(
        &e.app,
        Method::GET,
        "/api/v1/orgs/default/secrets/db",
        t,
        None,
    )
    .await;
    assert!(!got.to_string().contains("hunter2"), "{got}");
    let (_, audit) = call(&e.app, Method::GET, "/api/v1/audit?kind=Secret", t, None).await;
    let first = &audit["items"][0];
    assert_eq!(first["user"], "admin");
    assert_eq!(first["kind"], "Secret");
    assert_eq!(first["name"], "db");
    assert_eq!(first["status"], 201);
    // Refused requests are audited too, as anonymous when unauthenticated.
    call(
        &e.app,
        Method::DELETE,
        "/api/v1/orgs/default/secrets/db",
        None,
        None,
    )
    .await;
    let (_, audit) = call(&e.app, Method::GET, "/api/v1/audit?user=anonymous", t, None).await;
    assert_eq!(audit["items"][0]["status"], 401);
}

#[tokio::test]
async fn access_cache_follows_changes_to_bindings() {
    let tmp = tempfile::tempdir().unwrap();
    let store = store::Store::open_sqlite(&tmp.path().join("kiln.db"), store::Options::default())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let state = server::AppState::new(
        store.clone(),
        server::Config {
            data_dir: tmp.path().to_path_buf(),
            ..Default::default()
        },
        rx.clone(),
    );
    server::bootstrap::first_start(&state, tmp.path())
        .await
        .unwrap();
    state.set_ready(true);
    let watcher = tokio::spawn(server::rbac::watch_access_changes(state.clone(), rx));
    let access = state.access.clone();
    let admin = std::fs::read_to_string(tmp.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    let e = Env {
        app: server::app(state),
        admin,
        store: store.clone(),
        _tmp: tmp,
        _shutdown: tx,
    };
    let t = Some(e.admin.as_str());
    call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/default/projects/shop",
        t,
        Some(manifest(Kind::Project, "shop")),
    )
    .await;
    let viewer = user_with_role(&e, "val", "default", "viewer", None).await;
    let get = |token: String| {
        let app = e.app.clone();
        async move {
            call(
                &app,
                Method::GET,
                "/api/v1/orgs/default/projects/shop",
                Some(&token),
                None,
            )
            .await
            .0
        }
    };
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !access.is_live() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the access cache never went live"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // Computed once, then served from the cache.
    assert_eq!(get(viewer.clone()).await, StatusCode::OK);
    assert_eq!(get(viewer.clone()).await, StatusCode::OK);
    // A change through the API is visible to the very next request.
    let (s, b) = call(
        &e.app,
        Method::DELETE,
        "/api/v1/orgs/default/rolebindings/val-viewer",
        t,
        None,
    )
    .await;
    assert!(s.is_success(), "{b}");
    assert_eq!(get(viewer.clone()).await, StatusCode::NOT_FOUND);
    // A change written to the store by someone else (another server) arrives through the watch: first a new
    // binding, then its removal while the caller's access is cached.
    let binding: model::Resource = serde_json::from_value(json!({
        "apiVersion": "kiln.dev/v1", "kind": "RoleBinding",
        "metadata": {"name": "val-again", "organization": "default"},
        "spec": {"roleRef": "viewer", "subjects": [{"kind": "User", "name": "val"}]}
    }))
    .unwrap();
    let binding = store
        .create(model::normalize(binding).unwrap())
        .await
        .unwrap();
    assert_eq!(get(viewer.clone()).await, StatusCode::OK);
    assert_eq!(get(viewer.clone()).await, StatusCode::OK);
    store
        .delete(&store::Key::of(&binding).unwrap(), None)
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while get(viewer.clone()).await != StatusCode::NOT_FOUND {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a removed binding kept granting access"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let _ = e._shutdown.send(true);
    watcher.await.unwrap();
}

/// A merge patch as `token`.
async fn patch_json(e: &Env, path: &str, token: &str, body: Value) -> (StatusCode, Value) {
    let req = Request::builder()
        .method(Method::PATCH)
        .uri(path)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/merge-patch+json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    let resp = e.app.clone().oneshot(req).await.unwrap();
    let st = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (st, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

fn binding(name: &str, role: &str, user: &str, project: Option<&str>) -> Value {
    let mut spec = json!({"roleRef": role, "subjects": [{"kind": "User", "name": user}]});
    if let Some(p) = project {
        spec["project"] = json!(p);
    }
    json!({"apiVersion": "kiln.dev/v1", "kind": "RoleBinding", "metadata": {"name": name}, "spec": spec})
}

fn role_manifest(name: &str, kinds: &[&str], verbs: &[&str]) -> Value {
    json!({"apiVersion": "kiln.dev/v1", "kind": "Role", "metadata": {"name": name},
           "spec": {"rules": [{"kinds": kinds, "verbs": verbs}]}})
}

#[tokio::test]
async fn roles_and_bindings_cannot_grant_more_than_the_caller_holds() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    let admin = user_with_role(&e, "ada", "alpha", "admin", None).await;
    let owner = user_with_role(&e, "olga", "alpha", "owner", None).await;
    let a = Some(admin.as_str());
    // An admin may not bind anyone (themselves included) to `owner`, by any write.
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/orgs/alpha/rolebindings",
        a,
        Some(binding("ada-owner", "owner", "ada", None)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/rolebindings/ada-owner",
        a,
        Some(binding("ada-owner", "owner", "ada", None)),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = patch_json(
        &e,
        "/api/v1/orgs/alpha/rolebindings/fixture",
        &admin,
        json!({"spec": {"roleRef": "owner", "subjects": [{"kind": "User", "name": "ada"}]}}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    // Nor define a role holding more than they do, or widen one they are bound to.
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/roles/everything",
        a,
        Some(role_manifest("everything", &["*"], &["*"])),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/roles/readers",
        a,
        Some(role_manifest("readers", &["projects"], &["get"])),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/rolebindings/ada-readers",
        a,
        Some(binding("ada-readers", "readers", "ada", None)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = patch_json(
        &e,
        "/api/v1/orgs/alpha/roles/readers",
        &admin,
        json!({"spec": {"rules": [{"kinds": ["organizations"], "verbs": ["delete"]}]}}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/roles/readers",
        a,
        Some(role_manifest("readers", &["*"], &["*"])),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    // Nor create a user bound to `owner` (with a password the admin chose).
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/users",
        a,
        Some(json!({"name": "sock", "organization": "alpha", "role": "owner", "password": "password-123"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, _) = call(
        &e.app,
        Method::POST,
        "/api/v1/login",
        None,
        Some(json!({"username": "sock", "password": "password-123"})),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::UNAUTHORIZED,
        "the refused user was not created"
    );
    // So the admin still cannot delete the organization.
    let (s, _) = call(&e.app, Method::DELETE, "/api/v1/orgs/alpha", a, None).await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    // What the caller holds they may grant: an admin grants admin and developer; an owner grants owner.
    for (role, token) in [("admin", &admin), ("developer", &admin), ("owner", &owner)] {
        let name = format!("grant-{role}");
        let (s, b) = call(
            &e.app,
            Method::PUT,
            &format!("/api/v1/orgs/alpha/rolebindings/{name}"),
            Some(token),
            Some(binding(&name, role, "nobody", None)),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{role}: {b}");
    }
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/roles/everything",
        Some(&owner),
        Some(role_manifest("everything", &["*"], &["*"])),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

#[tokio::test]
async fn project_limited_grants_stay_within_what_the_caller_holds() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/roles/binder",
        Some(&e.admin),
        Some(role_manifest(
            "binder",
            &["rolebindings", "components"],
            &["*"],
        )),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    // Organization-wide: may write bindings and components, nothing else.
    let binder = user_with_role(&e, "bea", "alpha", "binder", None).await;
    // A binding to a role granting more (owner, even limited to one project) is refused...
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/rolebindings/bea-shop-owner",
        Some(&binder),
        Some(binding("bea-shop-owner", "owner", "bea", Some("shop"))),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    // ...while one to the caller's own role, limited to a project, is fine.
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/rolebindings/nobody-binder-shop",
        Some(&binder),
        Some(binding(
            "nobody-binder-shop",
            "binder",
            "nobody",
            Some("shop"),
        )),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

#[tokio::test]
async fn users_cannot_be_created_under_names_bound_elsewhere() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    seed_org(&e, "beta").await;
    let admin = user_with_role(&e, "ada", "alpha", "admin", None).await;
    // Beta binds a user who does not exist yet.
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/beta/rolebindings/dave-viewer",
        Some(&e.admin),
        Some(binding("dave-viewer", "viewer", "dave", None)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    // An admin of alpha creating `dave` with a password of their choosing would gain beta through it.
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/users",
        Some(&admin),
        Some(json!({"name": "dave", "organization": "alpha", "role": "viewer", "password": "password-123"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    let (s, _) = call(
        &e.app,
        Method::POST,
        "/api/v1/login",
        None,
        Some(json!({"username": "dave", "password": "password-123"})),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    // A fresh name is fine; a superuser may create the pre-bound one.
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/users",
        Some(&admin),
        Some(json!({"name": "erin", "organization": "alpha", "role": "viewer"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/users",
        Some(&e.admin),
        Some(json!({"name": "dave"})),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
}

#[tokio::test]
async fn events_of_other_organizations_are_hidden() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    seed_org(&e, "beta").await;
    for (kind, org, project, name) in [
        ("Organization", None, None, "beta"),
        ("Project", Some("alpha"), None, "shop"),
    ] {
        e.store
            .record_event(store::Event {
                time: jiff::Timestamp::now(),
                kind: kind.into(),
                organization: org.map(str::to_string),
                project,
                name: name.into(),
                type_: "Normal".into(),
                reason: "Ready".into(),
                message: format!("{name} is ready"),
            })
            .await
            .unwrap();
    }
    let viewer = user_with_role(&e, "val", "alpha", "viewer", None).await;
    let (s, b) = call(
        &e.app,
        Method::GET,
        "/api/v1/orgs/alpha/events?kind=Organization&name=beta",
        Some(&viewer),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    // A project-limited caller reads its own project's events.
    let dev = user_with_role(&e, "dev", "alpha", "developer", Some("shop")).await;
    let (s, b) = call(
        &e.app,
        Method::GET,
        "/api/v1/orgs/alpha/events?kind=Project&name=shop",
        Some(&dev),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert_eq!(b["items"][0]["reason"], "Ready", "{b}");
}

#[tokio::test]
async fn patch_is_checked_before_it_is_written() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    let t = e.admin.clone();
    // A dangling reference is refused and not stored.
    let (s, b) = patch_json(
        &e,
        "/api/v1/orgs/alpha/environments/fixture",
        &t,
        json!({"spec": {"dataPlaneRef": "missing"}}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let (_, got) = call(
        &e.app,
        Method::GET,
        "/api/v1/orgs/alpha/environments/fixture",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(got["spec"]["dataPlaneRef"], "local", "{got}");
    // A role cannot be patched into a (then immutable) built-in one.
    let (s, b) = patch_json(
        &e,
        "/api/v1/orgs/alpha/roles/custom",
        &t,
        json!({"metadata": {"labels": {"kiln.dev/builtin": "true"}}}),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "{b}");
    let (s, b) = call(
        &e.app,
        Method::DELETE,
        "/api/v1/orgs/alpha/roles/custom",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
}

#[tokio::test]
async fn a_binding_to_a_deleted_role_does_not_break_identity_endpoints() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    let viewer = user_with_role(&e, "val", "alpha", "viewer", None).await;
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/alpha/rolebindings/val-custom",
        Some(&e.admin),
        Some(binding("val-custom", "custom", "val", None)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    let (s, b) = call(
        &e.app,
        Method::DELETE,
        "/api/v1/orgs/alpha/rolebindings/val-viewer",
        Some(&e.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = call(
        &e.app,
        Method::DELETE,
        "/api/v1/orgs/alpha/roles/custom",
        Some(&e.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    for path in ["/api/v1/whoami", "/api/v1/users", "/api/v1/users/val"] {
        let (s, b) = call(&e.app, Method::GET, path, Some(&viewer), None).await;
        assert_eq!(s, StatusCode::OK, "{path}: {b}");
    }
}

#[tokio::test]
async fn a_release_never_changes() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    let t = Some(e.admin.as_str());
    let path = item_path(Kind::Release, "alpha", fixture_name(Kind::Release));
    let mut changed = manifest(Kind::Release, fixture_name(Kind::Release));
    changed["spec"]["snapshot"]["replicas"] = json!(3);
    let (s, b) = call(&e.app, Method::PUT, &path, t, Some(changed)).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("spec: a Release is immutable"),
        "{b}"
    );
    let req = Request::builder()
        .method(Method::PATCH)
        .uri(&path)
        .header("authorization", format!("Bearer {}", e.admin))
        .header("content-type", "application/merge-patch+json")
        .body(Body::from(r#"{"spec":{"snapshot":{"replicas":5}}}"#))
        .unwrap();
    let resp = e.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // Labels may still change, and re-applying the same spec is accepted.
    let (s, b) = call(
        &e.app,
        Method::PUT,
        &path,
        t,
        Some(manifest(Kind::Release, fixture_name(Kind::Release))),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (_, got) = call(&e.app, Method::GET, &path, t, None).await;
    assert_eq!(got["spec"]["snapshot"]["replicas"], 1);
}

/// The next NDJSON line of a watch body, or `None` when the stream ended; panics after 5 s of silence.
async fn next_line(body: &mut Body) -> Option<Value> {
    let frame = tokio::time::timeout(std::time::Duration::from_secs(5), body.frame())
        .await
        .expect("the watch stream neither sent nor ended");
    let bytes = frame?.unwrap().into_data().unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

async fn watch_projects(e: &Env, token: &str) -> Body {
    let req = Request::builder()
        .uri("/api/v1/orgs/alpha/projects?watch=true")
        .header("authorization", format!("Bearer {token}"))
        .body(Body::empty())
        .unwrap();
    let resp = e.app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body()
}

#[tokio::test]
async fn watch_streams_end_when_credentials_or_access_go() {
    let e = env().await;
    seed_org(&e, "alpha").await;
    let t = Some(e.admin.as_str());
    let put_project = |name: &'static str| {
        let app = e.app.clone();
        let admin = e.admin.clone();
        async move {
            let (s, b) = call(
                &app,
                Method::PUT,
                &format!("/api/v1/orgs/alpha/projects/{name}"),
                Some(&admin),
                Some(manifest(Kind::Project, name)),
            )
            .await;
            assert!(s.is_success(), "{b}");
        }
    };
    // A revoked token.
    let viewer = user_with_role(&e, "val", "alpha", "viewer", None).await;
    let mut body = watch_projects(&e, &viewer).await;
    put_project("p1").await;
    assert_eq!(
        next_line(&mut body).await.unwrap()["object"]["metadata"]["name"],
        "p1"
    );
    let (_, tokens) = call(&e.app, Method::GET, "/api/v1/tokens?user=val", t, None).await;
    let id = tokens["items"][0]["id"].as_str().unwrap().to_string();
    let (s, _) = call(
        &e.app,
        Method::DELETE,
        &format!("/api/v1/tokens/{id}"),
        t,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    put_project("p2").await;
    assert_eq!(
        next_line(&mut body).await,
        None,
        "a revoked token kept watching"
    );
    // A removed binding.
    let dev = user_with_role(&e, "dev", "alpha", "developer", None).await;
    let mut body = watch_projects(&e, &dev).await;
    put_project("p3").await;
    assert_eq!(
        next_line(&mut body).await.unwrap()["object"]["metadata"]["name"],
        "p3"
    );
    let (s, _) = call(
        &e.app,
        Method::DELETE,
        "/api/v1/orgs/alpha/rolebindings/dev-developer",
        t,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    put_project("p4").await;
    assert_eq!(
        next_line(&mut body).await,
        None,
        "a removed binding kept watching"
    );
}

/// A server state with the controllers running, `process` data planes served by the no-op driver.
async fn env_with_controllers() -> (Env, tokio::sync::watch::Receiver<bool>) {
    let tmp = tempfile::tempdir().unwrap();
    let store = store::Store::open_sqlite(&tmp.path().join("kiln.db"), store::Options::default())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let state = server::AppState::new(
        store.clone(),
        server::Config {
            data_dir: tmp.path().to_path_buf(),
            ..Default::default()
        },
        rx.clone(),
    );
    server::bootstrap::first_start(&state, tmp.path())
        .await
        .unwrap();
    state.set_ready(true);
    let noop: std::sync::Arc<dyn dataplane::DataPlane> =
        std::sync::Arc::new(dataplane::noop::NoopDriver::new());
    let drivers = controllers::Drivers {
        process: Some(noop),
        docker: None,
    };
    std::mem::forget(controllers::spawn_all(store.clone(), drivers, rx.clone()));
    let admin = std::fs::read_to_string(tmp.path().join("admin-token"))
        .unwrap()
        .trim()
        .to_string();
    (
        Env {
            app: server::app(state),
            admin,
            store,
            _tmp: tmp,
            _shutdown: tx,
        },
        rx,
    )
}

async fn until<T>(
    what: &str,
    mut f: impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<T>> + Send>>,
) -> T {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The release bound in `env`, once its binding is Ready.
async fn ready_release(e: &Env, env: &str) -> String {
    let app = e.app.clone();
    let admin = e.admin.clone();
    let path = format!("/api/v1/orgs/default/projects/shop/releasebindings/web-{env}");
    until(&format!("web to be ready in {env}"), move || {
        let (app, admin, path) = (app.clone(), admin.clone(), path.clone());
        Box::pin(async move {
            let (s, b) = call(&app, Method::GET, &path, Some(&admin), None).await;
            let ready = b["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            (s == StatusCode::OK && ready && b["status"]["release"] == b["spec"]["release"])
                .then(|| b["spec"]["release"].as_str().unwrap().to_string())
        })
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_follows_the_pipeline_waits_for_approval_and_rolls_back() {
    let (e, _rx) = env_with_controllers().await;
    let t = Some(e.admin.as_str());
    let put = |path: String, body: Value| {
        let app = e.app.clone();
        let admin = e.admin.clone();
        async move {
            let (s, b) = call(&app, Method::PUT, &path, Some(&admin), Some(body)).await;
            assert!(s.is_success(), "{path}: {b}");
        }
    };
    put(
        "/api/v1/orgs/default/dataplanes/local".into(),
        manifest(Kind::DataPlane, "local"),
    )
    .await;
    for env in ["dev", "staging", "prod"] {
        put(
            format!("/api/v1/orgs/default/environments/{env}"),
            manifest(Kind::Environment, env),
        )
        .await;
    }
    let mut pipeline = manifest(Kind::DeploymentPipeline, "default");
    pipeline["spec"] = json!({"promotionPaths": [
        {"sourceEnvironmentRef": "dev", "targetEnvironmentRefs": [{"name": "staging"}]},
        {"sourceEnvironmentRef": "staging", "targetEnvironmentRefs": [{"name": "prod", "requiresApproval": true}]}
    ]});
    put(
        "/api/v1/orgs/default/deploymentpipelines/default".into(),
        pipeline,
    )
    .await;
    put(
        "/api/v1/orgs/default/projects/shop".into(),
        manifest(Kind::Project, "shop"),
    )
    .await;
    let mut web = manifest(Kind::Component, "web");
    web["spec"] = json!({"type": "service", "workload": {"command": ["./web"]}, "endpoints": [{"name": "http", "port": 8080}]});
    put(
        "/api/v1/orgs/default/projects/shop/components/web".into(),
        web.clone(),
    )
    .await;
    let first = ready_release(&e, "dev").await;

    let base = "/api/v1/orgs/default/projects/shop/components/web";
    let (s, b) = call(
        &e.app,
        Method::POST,
        &format!("{base}/promote"),
        t,
        Some(json!({"from": "dev", "to": "prod"})),
    )
    .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(
        b["detail"]
            .as_str()
            .unwrap()
            .contains("no promotion path dev → prod; allowed from dev: staging"),
        "{b}"
    );

    let (s, b) = call(
        &e.app,
        Method::POST,
        &format!("{base}/promote"),
        t,
        Some(json!({"from": "dev", "to": "staging"})),
    )
    .await;
    assert_eq!(
        (s, b["result"].as_str()),
        (StatusCode::OK, Some("promoted")),
        "{b}"
    );
    assert_eq!(ready_release(&e, "staging").await, first);

    // staging → prod needs an approval from someone other than the requester.
    let alice = user_with_role(&e, "alice", "default", "admin", None).await;
    let bob = user_with_role(&e, "bob", "default", "admin", None).await;
    let dev = user_with_role(&e, "dana", "default", "developer", None).await;
    let (s, b) = call(
        &e.app,
        Method::POST,
        &format!("{base}/promote"),
        Some(&alice),
        Some(json!({"from": "staging", "to": "prod"})),
    )
    .await;
    assert_eq!(
        (s, b["result"].as_str()),
        (StatusCode::ACCEPTED, Some("pending-approval")),
        "{b}"
    );
    let (s, b) = call(
        &e.app,
        Method::GET,
        "/api/v1/orgs/default/projects/shop/releasebindings/web-prod",
        t,
        None,
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        b["spec"]["state"], "undeployed",
        "nothing runs in prod before the approval"
    );
    let (s, _) = call(
        &e.app,
        Method::POST,
        &format!("{base}/approve"),
        Some(&alice),
        Some(json!({"environment": "prod"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "the requester cannot approve");
    let (s, _) = call(
        &e.app,
        Method::POST,
        &format!("{base}/approve"),
        Some(&dev),
        Some(json!({"environment": "prod"})),
    )
    .await;
    assert_eq!(s, StatusCode::FORBIDDEN, "a developer may not approve");
    let (s, b) = call(
        &e.app,
        Method::POST,
        &format!("{base}/approve"),
        Some(&bob),
        Some(json!({"environment": "prod"})),
    )
    .await;
    assert_eq!(
        (s, b["result"].as_str()),
        (StatusCode::OK, Some("approved")),
        "{b}"
    );
    assert_eq!(ready_release(&e, "prod").await, first);

    // A new release reaches dev by itself, staging by promotion; rolling staging back returns to the first.
    web["spec"]["replicas"] = json!(2);
    put(
        "/api/v1/orgs/default/projects/shop/components/web".into(),
        web,
    )
    .await;
    let second = until("a second release in dev", || {
        let e_app = e.app.clone();
        let admin = e.admin.clone();
        let first = first.clone();
        Box::pin(async move {
            let (_, b) = call(
                &e_app,
                Method::GET,
                "/api/v1/orgs/default/projects/shop/releasebindings/web-dev",
                Some(&admin),
                None,
            )
            .await;
            let r = b["spec"]["release"].as_str()?.to_string();
            (r != first).then_some(r)
        })
    })
    .await;
    let (s, _) = call(
        &e.app,
        Method::POST,
        &format!("{base}/promote"),
        t,
        Some(json!({"from": "dev", "to": "staging"})),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(ready_release(&e, "staging").await, second);
    let (s, b) = call(
        &e.app,
        Method::POST,
        &format!("{base}/rollback"),
        t,
        Some(json!({"environment": "staging"})),
    )
    .await;
    assert_eq!(
        (s, b["release"].as_str()),
        (StatusCode::OK, Some(first.as_str())),
        "{b}"
    );
    assert_eq!(ready_release(&e, "staging").await, first);
    let (s, _) = call(
        &e.app,
        Method::POST,
        &format!("{base}/rollback"),
        t,
        Some(json!({"environment": "staging", "to": "web-0000000000"})),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY);

    let (_, hist) = call(&e.app, Method::GET, &format!("{base}/releases"), t, None).await;
    assert_eq!(hist["releases"].as_array().unwrap().len(), 2, "{hist}");
    let envs: Vec<&str> = hist["environments"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["environment"].as_str())
        .collect();
    assert_eq!(envs.len(), 3, "{hist}");
    let (_, audit) = call(&e.app, Method::GET, "/api/v1/audit?kind=Component", t, None).await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["action"].as_str())
        .collect();
    assert!(
        actions.iter().any(|a| a.ends_with("/approve"))
            && actions.iter().any(|a| a.ends_with("/rollback")),
        "{actions:?}"
    );
}

/// A Component manifest for the quota test: `replicas` replicas with `resources` (JSON null for none).
fn quota_component(name: &str, replicas: u32, resources: Value) -> Value {
    let mut spec =
        json!({"type": "worker", "workload": {"image": "busybox:1"}, "replicas": replicas});
    if !resources.is_null() {
        spec["resources"] = resources;
    }
    json!({"apiVersion": "kiln.dev/v1", "kind": "Component", "metadata": {"name": name}, "spec": spec})
}

#[tokio::test]
async fn organization_quotas_are_enforced_when_components_are_written() {
    let e = env().await;
    let t = Some(e.admin.as_str());
    let mut org = manifest(Kind::Organization, "acme");
    org["spec"]["resourceQuotas"] = json!({"replicas": 10, "cpu": "2", "memory": "1Gi"});
    let (s, b) = call(&e.app, Method::POST, "/api/v1/orgs", t, Some(org.clone())).await;
    assert_eq!(s, StatusCode::CREATED, "{b}");
    for (kind, name) in [(Kind::Project, "shop"), (Kind::Project, "blog")] {
        let (s, b) = call(
            &e.app,
            Method::PUT,
            &format!("/api/v1/orgs/acme/projects/{name}"),
            t,
            Some(manifest(kind, name)),
        )
        .await;
        assert!(s.is_success(), "{b}");
    }
    let comp = |project: &str, name: &str| {
        format!("/api/v1/orgs/acme/projects/{project}/components/{name}")
    };
    let (s, b) = call(
        &e.app,
        Method::PUT,
        &comp("shop", "a"),
        t,
        Some(quota_component("a", 8, Value::Null)),
    )
    .await;
    assert_eq!(s, StatusCode::CREATED, "{b}");

    // Replicas: summed over every project of the organization; refused with 422 and nothing stored.
    let (s, b) = call(
        &e.app,
        Method::POST,
        "/api/v1/orgs/acme/projects/blog/components",
        t,
        Some(quota_component("b", 4, Value::Null)),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert_eq!(b["type"], "https://kiln.dev/problems/quota-exceeded", "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains(
            "spec.replicas: organization acme's quota allows 10 replicas (spec.resourceQuotas.replicas); 8 are used by other components and this asks for 4"
        ),
        "{b}"
    );
    let (s, _) = call(&e.app, Method::GET, &comp("blog", "b"), t, None).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "a refused write stores nothing");
    let (s, b) = call(
        &e.app,
        Method::PUT,
        &comp("blog", "b"),
        t,
        Some(quota_component("b", 2, Value::Null)),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::CREATED,
        "exactly at the quota is allowed: {b}"
    );

    // CPU: replicas × limit (8 × 250m = 2, the quota), and requests where no limit is set.
    let (s, b) = call(
        &e.app,
        Method::PUT,
        &comp("shop", "a"),
        t,
        Some(quota_component(
            "a",
            8,
            json!({"limits": {"cpu": "250m"}, "requests": {"cpu": "100m"}}),
        )),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = patch_json(
        &e,
        &comp("blog", "b"),
        &e.admin,
        json!({"spec": {"resources": {"requests": {"cpu": "100m"}}}}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains(
            "spec.resources.limits.cpu: organization acme's quota allows 2 cpu (spec.resourceQuotas.cpu); 2 are used by other components and this asks for 200m"
        ),
        "{b}"
    );
    // Memory, through PUT.
    let (s, b) = call(
        &e.app,
        Method::PUT,
        &comp("blog", "b"),
        t,
        Some(quota_component(
            "b",
            2,
            json!({"limits": {"memory": "768Mi"}}),
        )),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("quota allows 1Gi memory (spec.resourceQuotas.memory); 0 are used by other components and this asks for 1.50Gi"),
        "{b}"
    );

    // Lowering a quota refuses nothing already stored: unchanged or shrinking writes pass, growth does not.
    org["spec"]["resourceQuotas"]["replicas"] = json!(5);
    let (s, b) = call(&e.app, Method::PUT, "/api/v1/orgs/acme", t, Some(org)).await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = patch_json(
        &e,
        &comp("shop", "a"),
        &e.admin,
        json!({"metadata": {"labels": {"tier": "x"}}}),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{b}");
    let (s, b) = patch_json(
        &e,
        &comp("shop", "a"),
        &e.admin,
        json!({"spec": {"replicas": 6}}),
    )
    .await;
    assert_eq!(
        s,
        StatusCode::OK,
        "shrinking is allowed while over the quota: {b}"
    );
    let (s, b) = patch_json(
        &e,
        &comp("shop", "a"),
        &e.admin,
        json!({"spec": {"replicas": 7}}),
    )
    .await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("allows 5 replicas"),
        "{b}"
    );
}

#[tokio::test]
async fn an_organization_quota_caps_running_workspaces_and_only_starts_count() {
    let e = env().await;
    seed_org(&e, "q").await; // its fixture workspace runs: one of two
    let mut org = manifest(Kind::Organization, "q");
    org["spec"]["resourceQuotas"] = json!({"runningWorkspaces": 2});
    let (s, b) = call(
        &e.app,
        Method::PUT,
        "/api/v1/orgs/q",
        Some(&e.admin),
        Some(org),
    )
    .await;
    assert!(s.is_success(), "{b}");
    let put = |name: &'static str, state: &'static str, ttl: Option<&'static str>| {
        let mut m = manifest(Kind::Workspace, name);
        m["spec"]["state"] = json!(state);
        if let Some(t) = ttl {
            m["spec"]["ttl"] = json!(t);
        }
        let app = e.app.clone();
        let token = e.admin.clone();
        async move {
            call(
                &app,
                Method::PUT,
                &item_path(Kind::Workspace, "q", name),
                Some(&token),
                Some(m),
            )
            .await
        }
    };

    let (s, b) = put("two", "running", None).await;
    assert!(s.is_success(), "{b}");
    let (s, b) = put("three", "running", None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    let detail = b["detail"].as_str().unwrap();
    assert!(
        detail.contains("allows 2 running workspace(s)")
            && detail.contains("spec.resourceQuotas.runningWorkspaces"),
        "{detail}"
    );
    // Nothing was stored by the refused write.
    let (s, _) = call(
        &e.app,
        Method::GET,
        &item_path(Kind::Workspace, "q", "three"),
        Some(&e.admin),
        None,
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // A stopped workspace is within any quota; starting it is not, while two run.
    let (s, b) = put("three", "stopped", None).await;
    assert!(s.is_success(), "{b}");
    let (s, b) = put("three", "running", None).await;
    assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "{b}");
    // Changing a workspace that already runs is no start.
    let (s, b) = put("two", "running", Some("2h")).await;
    assert!(s.is_success(), "{b}");
    // Stopping one makes room.
    let (s, b) = put("two", "stopped", None).await;
    assert!(s.is_success(), "{b}");
    let (s, b) = put("three", "running", None).await;
    assert!(s.is_success(), "{b}");
}
