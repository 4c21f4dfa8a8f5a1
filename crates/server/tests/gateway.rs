//! The gateway end to end: the whole router served on a loopback socket, a real HTTP client, and real backends —
//! two `kiln-testsvc` processes as the replicas of component `web`, plus an in-test HTTP/WebSocket echo server
//! that shows what the backend received. Bindings' statuses are written here directly; in production the
//! ReleaseBinding controller writes them from what the data plane reports.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use reqwest::StatusCode;
use serde_json::{json, Value};
use sha1::Digest as _;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const ORG: &str = "acme";
const RELEASE: &str = "web-0123456789";

/// A running `kiln-testsvc` replica, stopped on drop.
type Replica = testsvc::Local;

/// Starts replica `index` of the test service on a free loopback port and waits until it accepts connections.
async fn replica(index: u32) -> Replica {
    testsvc::start_local(index, "web")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An address nothing listens on.
fn dead_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// An HTTP/1.1 keep-alive server that answers every request with what it received (request line, headers and
/// body), and speaks just enough WebSocket to echo text frames after an upgrade.
struct Echo {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn echo_backend() -> Echo {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(echo_connection(stream));
        }
    });
    Echo { addr, connections }
}

fn websocket_accept(key: &str) -> String {
    let mut h = sha1::Sha1::new();
    h.update(key.as_bytes());
    h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Reads a request head up to its blank line (which is left out); `None` when the connection ends first.
async fn read_request_head(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line).await {
            Ok(0) | Err(_) => return None,
            Ok(_) => {}
        }
        if line == "\r\n" {
            return Some(head);
        }
        head.push_str(&line);
    }
}

async fn echo_connection(stream: TcpStream) {
    let mut r = BufReader::new(stream);
    loop {
        let Some(head) = read_request_head(&mut r).await else {
            return;
        };
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        if header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket")) {
            let key = header("sec-websocket-key").unwrap_or_default();
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
                websocket_accept(&key)
            );
            if r.get_mut().write_all(resp.as_bytes()).await.is_err() {
                return;
            }
            // Echo frames (unmasked, as a server sends them) until a close frame or EOF.
            loop {
                let mut h = [0u8; 2];
                if r.read_exact(&mut h).await.is_err() {
                    return;
                }
                let opcode = h[0] & 0x0f;
                let len = usize::from(h[1] & 0x7f);
                assert!(len < 126, "the test sends short frames only");
                let mut mask = [0u8; 4];
                if h[1] & 0x80 != 0 && r.read_exact(&mut mask).await.is_err() {
                    return;
                }
                let mut payload = vec![0u8; len];
                if r.read_exact(&mut payload).await.is_err() {
                    return;
                }
                for (i, b) in payload.iter_mut().enumerate() {
                    *b ^= mask[i % 4];
                }
                let mut frame = vec![0x80 | opcode, len as u8];
                frame.extend_from_slice(&payload);
                if r.get_mut().write_all(&frame).await.is_err() || opcode == 8 {
                    return;
                }
            }
        }
        let len: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        let mut out = head.into_bytes();
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
            out.len()
        );
        if r.get_mut().write_all(resp.as_bytes()).await.is_err()
            || r.get_mut().write_all(&out).await.is_err()
        {
            return;
        }
    }
}

/// A server with the gateway, on a loopback port.
struct Env {
    addr: SocketAddr,
    store: store::Store,
    state: server::AppState,
    client: reqwest::Client,
    shutdown_rx: tokio::sync::watch::Receiver<bool>,
    _shutdown: tokio::sync::watch::Sender<bool>,
    _tmp: tempfile::TempDir,
}

async fn env() -> Env {
    let env = env_without_table().await;
    server::gateway::spawn_gateway_table(env.state.clone(), env.shutdown_rx.clone());
    env
}

/// A server whose gateway table is not started yet.
async fn env_without_table() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let store = store::Store::open_sqlite(&tmp.path().join("kiln.db"), store::Options::default())
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    let config = server::Config {
        data_dir: tmp.path().to_path_buf(),
        ..Default::default()
    };
    let state = server::AppState::new(store.clone(), config, rx.clone());
    state.set_ready(true);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(server::listen::serve(
        listener,
        state.clone(),
        std::future::pending(),
    ));
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    Env {
        addr,
        store,
        state,
        client,
        shutdown_rx: rx,
        _shutdown: tx,
        _tmp: tmp,
    }
}

fn object(
    kind: &str,
    org: Option<&str>,
    project: Option<&str>,
    name: &str,
    spec: Value,
) -> model::Resource {
    let mut meta = json!({"name": name});
    if let Some(o) = org {
        meta["organization"] = json!(o);
    }
    if let Some(p) = project {
        meta["project"] = json!(p);
    }
    let r: model::Resource = serde_json::from_value(
        json!({"apiVersion": "kiln.dev/v1", "kind": kind, "metadata": meta, "spec": spec}),
    )
    .unwrap();
    model::normalize(r).unwrap()
}

fn binding_key(org: &str) -> store::Key {
    store::Key {
        kind: model::Kind::ReleaseBinding,
        organization: Some(org.into()),
        project: Some("shop".into()),
        name: "web-dev".into(),
    }
}

/// The status the ReleaseBinding controller would write: `ready` of 2 replicas, with these addresses per
/// endpoint.
fn status(ready: u32, endpoints: Value, message: &str) -> Value {
    let condition = if ready == 2 { "True" } else { "False" };
    json!({
        "release": RELEASE,
        "replicas": 2,
        "readyReplicas": ready,
        "endpoints": endpoints,
        "conditions": [{
            "type": "Ready", "status": condition, "reason": if ready == 2 { "Ready" } else { "CrashLoop" },
            "message": message, "lastTransitionTime": "2025-01-01T00:00:00Z"
        }]
    })
}

fn addrs(list: &[SocketAddr]) -> Value {
    json!(list.iter().map(|a| a.to_string()).collect::<Vec<_>>())
}

impl Env {
    /// Organization `org` with project `shop`, environment `dev`, component `web` (endpoints `web` on `/`,
    /// `env` on `/env`, `echo` on `/base`, all public, and `private` with project visibility), its release and
    /// its binding in `dev`, with `status` as the binding's status.
    async fn deploy(&self, org: &str, status: Value) {
        let s = &self.store;
        s.create(object("Organization", None, None, org, json!({})))
            .await
            .unwrap();
        s.create(object(
            "DataPlane",
            Some(org),
            None,
            "local",
            json!({"type": "process"}),
        ))
        .await
        .unwrap();
        s.create(object(
            "Environment",
            Some(org),
            None,
            "dev",
            json!({"dataPlaneRef": "local"}),
        ))
        .await
        .unwrap();
        s.create(object("Project", Some(org), None, "shop", json!({})))
            .await
            .unwrap();
        let endpoints = json!([
            {"name": "web", "port": 8080, "visibility": "public"},
            {"name": "env", "port": 8080, "path": "/env", "visibility": "public"},
            {"name": "echo", "port": 9000, "path": "/base", "visibility": "public"},
            {"name": "private", "port": 8080, "visibility": "project"}
        ]);
        let workload = json!({"command": ["kiln-testsvc"]});
        s.create(object(
            "Component",
            Some(org),
            Some("shop"),
            "web",
            json!({"type": "service", "workload": workload, "replicas": 2, "endpoints": endpoints}),
        ))
        .await
        .unwrap();
        s.create(object(
            "Release",
            Some(org),
            Some("shop"),
            RELEASE,
            json!({
                "component": "web",
                "hash": format!("0123456789{}", "0".repeat(54)),
                "snapshot": {"type": "service", "workload": workload, "replicas": 2, "endpoints": endpoints}
            }),
        ))
        .await
        .unwrap();
        s.create(object(
            "ReleaseBinding",
            Some(org),
            Some("shop"),
            "web-dev",
            json!({"component": "web", "environment": "dev", "release": RELEASE}),
        ))
        .await
        .unwrap();
        self.set_status(org, status).await;
    }

    /// Writes a binding's status (the ReleaseBinding controller's job in production).
    async fn set_status(&self, org: &str, status: Value) {
        self.store
            .update_status(&binding_key(org), status, None)
            .await
            .unwrap();
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn get(&self, path: &str) -> (StatusCode, String) {
        let r = self.client.get(self.url(path)).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// A GET of `path` with `Host: <host>:<port>` (the name resolved to the server's loopback address).
    async fn get_host(&self, host: &str, path: &str) -> (StatusCode, String) {
        let client = reqwest::Client::builder()
            .resolve(host, self.addr)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let r = client
            .get(format!("http://{host}:{}{path}", self.addr.port()))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    }

    /// Polls `path` until `ok` holds for its answer, for at most 10 s.
    async fn eventually(
        &self,
        path: &str,
        ok: impl Fn(StatusCode, &str) -> bool,
    ) -> (StatusCode, String) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (s, b) = self.get(path).await;
            if ok(s, &b) {
                return (s, b);
            }
            assert!(
                Instant::now() < deadline,
                "{path} never satisfied the check; last: {s} {b}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Both replicas serving every public endpoint, and the echo backend on `echo`.
fn healthy(replicas: &[Replica], echo: &Echo) -> Value {
    let r: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    status(
        2,
        json!({"web": addrs(&r), "env": addrs(&r), "echo": addrs(&[echo.addr]), "private": addrs(&r)}),
        "2/2 replicas of web-0123456789 ready",
    )
}

#[tokio::test]
async fn path_and_subdomain_forms_reach_both_replicas() {
    let e = env().await;
    let replicas = [replica(0).await, replica(1).await];
    let echo = echo_backend().await;
    e.deploy(ORG, healthy(&replicas, &echo)).await;

    let (_, b) = e
        .eventually("/x/acme/shop/dev/web/web/", |s, _| s == StatusCode::OK)
        .await;
    assert!(b.starts_with("hello from web"), "{b}");

    // Round-robin: consecutive requests alternate between the two replicas.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let (s, b) = e.get("/x/acme/shop/dev/web/web/").await;
        assert_eq!(s, StatusCode::OK, "{b}");
        seen.insert(b.contains("replica 1"));
    }
    assert_eq!(seen.len(), 2, "both replicas answer");

    // The endpoint's path prefix: /x/.../env/KILN_REPLICA is /env/KILN_REPLICA on the replica.
    let (s, b) = e.get("/x/acme/shop/dev/web/env/KILN_REPLICA").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b == "0\n" || b == "1\n", "{b}");

    // Subdomain form, any path.
    let (s, b) = e.get_host("web--web--shop--dev.localhost", "/").await;
    assert_eq!(s, StatusCode::OK, "{b}");
    assert!(b.starts_with("hello from web"), "{b}");
    let (s, b) = e
        .get_host("env--web--shop--dev.localhost", "/SERVICE_NAME")
        .await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "web\n"));

    // Non-gateway hosts reach the API as before.
    let (s, b) = e.get("/healthz").await;
    assert_eq!((s, b.as_str()), (StatusCode::OK, "ok\n"));
    let (s, _) = e.get_host("www.localhost", "/healthz").await;
    assert_eq!(s, StatusCode::OK);

    // The path form without its trailing slash redirects to it.
    let r = e
        .client
        .get(e.url("/x/acme/shop/dev/web/web?a=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
    assert_eq!(r.headers()["location"], "/x/acme/shop/dev/web/web/?a=1");
}

#[tokio::test]
async fn backend_sees_the_rewritten_path_query_body_and_forwarding_headers() {
    let e = env().await;
    let replicas = [replica(0).await, replica(1).await];
    let echo = echo_backend().await;
    e.deploy(ORG, healthy(&replicas, &echo)).await;
    e.eventually("/x/acme/shop/dev/web/echo/", |s, _| s == StatusCode::OK)
        .await;

    let r = e
        .client
        .post(e.url("/x/acme/shop/dev/web/echo/a/b?x=1&y=two"))
        .header("x-custom", "kept")
        .header("cookie", "app=1; kiln_session=console-secret")
        .body("the body")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let b = r.text().await.unwrap();
    let lower = b.to_ascii_lowercase();
    assert!(
        b.starts_with("POST /base/a/b?x=1&y=two HTTP/1.1\r\n"),
        "{b}"
    );
    assert!(
        lower.contains("x-forwarded-prefix: /x/acme/shop/dev/web/echo\r\n"),
        "{b}"
    );
    assert!(lower.contains("x-forwarded-for: 127.0.0.1\r\n"), "{b}");
    assert!(
        lower.contains(&format!("x-forwarded-host: {}\r\n", e.addr)),
        "{b}"
    );
    assert!(lower.contains("x-forwarded-proto: http\r\n"), "{b}");
    assert!(lower.contains("x-custom: kept\r\n"), "{b}");
    // The console's session cookie is not handed to workloads; their own cookies are.
    assert!(lower.contains("cookie: app=1\r\n"), "{b}");
    assert!(!b.contains("console-secret"), "{b}");
    assert!(b.ends_with("\r\n\r\nthe body"), "{b}");

    // Subdomain form: the whole path goes under the endpoint's base path; no prefix header.
    let (s, b) = e
        .get_host("echo--web--shop--dev.localhost", "/deep/path?q=1")
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(b.starts_with("GET /base/deep/path?q=1 HTTP/1.1\r\n"), "{b}");
    assert!(
        !b.to_ascii_lowercase().contains("x-forwarded-prefix"),
        "{b}"
    );
    assert!(
        b.to_ascii_lowercase().contains(&format!(
            "x-forwarded-host: echo--web--shop--dev.localhost:{}\r\n",
            e.addr.port()
        )),
        "{b}"
    );

    // Connections to the backend are reused: ten sequential requests need far fewer than ten connections.
    let before = echo.connections.load(Ordering::SeqCst);
    for _ in 0..10 {
        let (s, _) = e.get("/x/acme/shop/dev/web/echo/").await;
        assert_eq!(s, StatusCode::OK);
    }
    let used = echo.connections.load(Ordering::SeqCst) - before;
    assert!(
        used <= 3,
        "{used} backend connections for 10 sequential requests"
    );
}

#[tokio::test]
async fn missing_unready_down_and_private_endpoints_get_clear_errors() {
    let e = env().await;
    let replicas = [replica(0).await, replica(1).await];
    let echo = echo_backend().await;
    e.deploy(ORG, healthy(&replicas, &echo)).await;
    e.eventually("/x/acme/shop/dev/web/web/", |s, _| s == StatusCode::OK)
        .await;

    // Unknown endpoint, unknown component, unknown subdomain.
    let (s, b) = e.get("/x/acme/shop/dev/web/nope/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b.contains("no endpoint named nope"), "{b}");
    let (s, b) = e.get("/x/acme/shop/dev/ghost/web/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b.contains("No component ghost"), "{b}");
    let (s, b) = e.get_host("web--ghost--shop--dev.localhost", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b.contains("No component ghost"), "{b}");

    // Not public: not served.
    let (s, b) = e.get("/x/acme/shop/dev/web/private/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b.contains("not public"), "{b}");
    let (s, b) = e.get_host("private--web--shop--dev.localhost", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(b.contains("not public"), "{b}");

    // Browsers get HTML.
    let r = e
        .client
        .get(e.url("/x/acme/shop/dev/web/nope/"))
        .header("accept", "text/html,application/xhtml+xml")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let b = r.text().await.unwrap();
    assert!(
        b.starts_with("<!doctype html>") && b.contains("nope"),
        "{b}"
    );

    // One replica down: the other answers every request.
    let live = [dead_addr(), replicas[1].addr];
    e.set_status(
        ORG,
        status(
            2,
            json!({"web": addrs(&live)}),
            "2/2 replicas of web-0123456789 ready",
        ),
    )
    .await;
    e.eventually("/x/acme/shop/dev/web/env/", |s, _| {
        s == StatusCode::NOT_FOUND || s == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    for _ in 0..4 {
        let (s, b) = e.get("/x/acme/shop/dev/web/web/").await;
        assert_eq!(s, StatusCode::OK, "{b}");
        assert!(b.contains("replica 1"), "{b}");
    }

    // Every backend down: 502.
    e.set_status(
        ORG,
        status(
            2,
            json!({"web": addrs(&[dead_addr(), dead_addr()])}),
            "2/2 ready",
        ),
    )
    .await;
    let (s, b) = e
        .eventually("/x/acme/shop/dev/web/web/", |s, _| s != StatusCode::OK)
        .await;
    assert_eq!(s, StatusCode::BAD_GATEWAY, "{b}");
    assert!(b.contains("Could not connect"), "{b}");

    // No ready replica: 503 saying so, with the binding's Ready message.
    e.set_status(
        ORG,
        status(
            0,
            json!({}),
            "replica 0 exited with 3 (crashed; restarts 2): crashing on purpose",
        ),
    )
    .await;
    let (s, b) = e
        .eventually("/x/acme/shop/dev/web/web/", |s, _| {
            s == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(b.contains("0/2 replicas of web in dev are ready"), "{b}");
    assert!(b.contains("exited with 3"), "{b}");

    // Metrics count gateway requests and upstream errors.
    let (_, m) = e.get("/metrics").await;
    let value = |name: &str| -> u64 {
        m.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(value("kiln_gateway_upstream_errors_total ") >= 3, "{m}");
    assert!(
        value("kiln_gateway_requests_total{code=\"2xx\"} ") >= 5,
        "{m}"
    );
    assert!(
        value("kiln_gateway_requests_total{code=\"5xx\"} ") >= 2,
        "{m}"
    );
}

#[tokio::test]
async fn routing_follows_binding_status_changes() {
    let e = env_without_table().await;
    let replicas = [replica(0).await, replica(1).await];
    let echo = echo_backend().await;
    e.deploy(ORG, healthy(&replicas, &echo)).await;

    // Until the table has loaded, the gateway answers 503 (and the API is unaffected).
    let (s, b) = e.get("/x/acme/shop/dev/web/web/").await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    assert!(b.contains("starting"), "{b}");
    assert_eq!(e.get("/healthz").await.0, StatusCode::OK);
    server::gateway::spawn_gateway_table(e.state.clone(), e.shutdown_rx.clone());
    e.eventually("/x/acme/shop/dev/web/web/", |s, _| s == StatusCode::OK)
        .await;

    // Replica 0 leaves: within a bounded wait, every request goes to replica 1.
    e.set_status(
        ORG,
        status(
            1,
            json!({"web": addrs(&[replicas[1].addr])}),
            "1/2 replicas of web-0123456789 ready",
        ),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    'wait: loop {
        for _ in 0..6 {
            let (s, b) = e.get("/x/acme/shop/dev/web/web/").await;
            assert_eq!(s, StatusCode::OK, "{b}");
            if !b.contains("replica 1") {
                assert!(Instant::now() < deadline, "routing never dropped replica 0");
                tokio::time::sleep(Duration::from_millis(25)).await;
                continue 'wait;
            }
        }
        break;
    }

    // The binding goes away: so does the route.
    e.store.delete(&binding_key(ORG), None).await.unwrap();
    e.eventually("/x/acme/shop/dev/web/web/", |s, _| {
        s == StatusCode::NOT_FOUND
    })
    .await;
}

#[tokio::test]
async fn subdomain_shared_by_two_organizations_is_ambiguous() {
    let e = env().await;
    let replicas = [replica(0).await, replica(1).await];
    let echo = echo_backend().await;
    e.deploy(ORG, healthy(&replicas, &echo)).await;
    e.deploy("beta", healthy(&replicas, &echo)).await;
    e.eventually("/x/beta/shop/dev/web/web/", |s, _| s == StatusCode::OK)
        .await;
    let (s, b) = e.get_host("web--web--shop--dev.localhost", "/").await;
    assert_eq!(s, StatusCode::CONFLICT, "{b}");
    assert!(b.contains("ambiguous") || b.contains("Ambiguous"), "{b}");
    assert!(b.contains("/x/acme/shop/dev/web/web/"), "{b}");
    assert!(b.contains("/x/beta/shop/dev/web/web/"), "{b}");
    // Ambiguity is about public endpoints only: one that is public nowhere is simply not public.
    let (s, b) = e.get_host("private--web--shop--dev.localhost", "/").await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{b}");
    assert!(b.contains("not public"), "{b}");
    // The path forms work for both.
    assert_eq!(e.get("/x/acme/shop/dev/web/web/").await.0, StatusCode::OK);
    // Once one organization's binding is gone, the host is unambiguous again.
    e.store.delete(&binding_key("beta"), None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (s, b) = e.get_host("web--web--shop--dev.localhost", "/").await;
        if s == StatusCode::OK {
            assert!(b.starts_with("hello from web"), "{b}");
            break;
        }
        assert!(Instant::now() < deadline, "still {s} {b}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Reads an HTTP response head (through the blank line) from a raw stream.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "connection closed in the head"
        );
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

/// A masked client text frame.
fn client_frame(text: &str) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[tokio::test]
async fn websocket_upgrade_passes_through_and_echoes() {
    let e = env().await;
    let replicas = [replica(0).await, replica(1).await];
    let echo = echo_backend().await;
    e.deploy(ORG, healthy(&replicas, &echo)).await;
    e.eventually("/x/acme/shop/dev/web/echo/", |s, _| s == StatusCode::OK)
        .await;

    for (host, path) in [
        (
            e.addr.to_string(),
            "/x/acme/shop/dev/web/echo/ws".to_string(),
        ),
        (
            format!("echo--web--shop--dev.localhost:{}", e.addr.port()),
            "/ws".to_string(),
        ),
    ] {
        let mut s = TcpStream::connect(e.addr).await.unwrap();
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let head = read_head(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(
            lower.contains(&format!(
                "sec-websocket-accept: {}\r\n",
                websocket_accept(key).to_ascii_lowercase()
            )),
            "{head}"
        );
        assert!(lower.contains("upgrade: websocket\r\n"), "{head}");
        for text in ["hello", "through the gateway"] {
            s.write_all(&client_frame(text)).await.unwrap();
            let mut h = [0u8; 2];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut h))
                .await
                .expect("echo frame in time")
                .unwrap();
            assert_eq!(h[0], 0x81);
            let mut payload = vec![0u8; usize::from(h[1] & 0x7f)];
            s.read_exact(&mut payload).await.unwrap();
            assert_eq!(String::from_utf8(payload).unwrap(), text);
        }
    }
}

/// A backend that answers each request with what `answer` makes of its head and body, and closes the
/// connection after an answer when `answer` says so.
async fn scripted_backend(answer: fn(&str, &[u8]) -> (Vec<u8>, bool)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut r = BufReader::new(stream);
                loop {
                    let Some(head) = read_request_head(&mut r).await else {
                        return;
                    };
                    let len = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse::<usize>().ok())?
                        })
                        .unwrap_or(0);
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let (out, close) = answer(&head, &body);
                    if r.get_mut().write_all(&out).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn ok_text(text: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}",
        text.len()
    )
    .into_bytes()
}

const CHUNKED_BODY: &str = "5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n";

/// The scripted backend's answers, by the request path's last segment.
fn scripted(head: &str, body: &[u8]) -> (Vec<u8>, bool) {
    let path = head.split(' ').nth(1).unwrap_or("");
    match path.rsplit('/').next().unwrap_or("") {
        "chunked" => (
            format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n{CHUNKED_BODY}").into_bytes(),
            false,
        ),
        "until-close" => (b"HTTP/1.1 200 OK\r\n\r\nall of it".to_vec(), true),
        // Keep-alive by its headers, yet closed: the gateway's pooled connection goes stale.
        "then-close" => (ok_text("once"), true),
        "garbage" => (b"SSH-2.0-not-http\r\n\r\n".to_vec(), true),
        "early-hints" => (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                .to_vec(),
            false,
        ),
        "size" => (ok_text(&body.len().to_string()), false),
        _ => (ok_text(path), false),
    }
}

/// A raw client connection with a read buffer, for exchanges reqwest cannot show (pipelining, interim
/// responses, a connection reused across the gateway and the API).
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    async fn connect(addr: SocketAddr) -> RawClient {
        RawClient {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads more; false at the end of the stream.
    async fn fill(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), self.stream.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n > 0
    }

    async fn head(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                return String::from_utf8(head).unwrap();
            }
            assert!(self.fill().await, "connection closed in a head");
        }
    }

    async fn body(&mut self, n: usize) -> String {
        while self.buf.len() < n {
            assert!(self.fill().await, "connection closed in a body");
        }
        String::from_utf8(self.buf.drain(..n).collect()).unwrap()
    }

    /// A response with a `Content-Length` body: its head and body.
    async fn response(&mut self) -> (String, String) {
        let head = self.head().await;
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or_else(|| panic!("no content-length in {head}"));
        let body = self.body(len).await;
        (head, body)
    }

    async fn until_closed(&mut self) -> String {
        while self.fill().await {}
        String::from_utf8(std::mem::take(&mut self.buf)).unwrap()
    }
}

#[tokio::test]
async fn forwarded_exchanges_keep_framing_order_and_the_connection() {
    let e = env().await;
    let backend = scripted_backend(scripted).await;
    e.deploy(
        ORG,
        status(2, json!({"echo": addrs(&[backend])}), "2/2 replicas ready"),
    )
    .await;
    e.eventually("/x/acme/shop/dev/web/echo/x", |s, _| s == StatusCode::OK)
        .await;
    let base = "/x/acme/shop/dev/web/echo";
    let host = e.addr;
    let get = |seg: &str| format!("GET {base}/{seg} HTTP/1.1\r\nHost: {host}\r\n\r\n");

    let mut c = RawClient::connect(e.addr).await;
    // A chunked body passes through in its coding, trailers included, and the connection stays usable.
    c.send(get("chunked").as_bytes()).await;
    let head = c.head().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("transfer-encoding: chunked\r\n"),
        "{head}"
    );
    assert_eq!(c.body(CHUNKED_BODY.len()).await, CHUNKED_BODY);

    // A request body larger than one read reaches the backend whole.
    let big = vec![b'x'; 300_000];
    let mut req = format!(
        "POST {base}/size HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n\r\n",
        big.len()
    )
    .into_bytes();
    req.extend_from_slice(&big);
    c.send(&req).await;
    let (head, body) = c.response().await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "300000");

    // HEAD: a length but no body; then two pipelined requests answered in order.
    c.send(format!("HEAD {base}/h HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    let head = c.head().await;
    assert!(
        head.to_ascii_lowercase().contains("content-length: 7\r\n"),
        "{head}"
    );
    c.send(format!("{}{}", get("first"), get("second")).as_bytes())
        .await;
    assert_eq!(c.response().await.1, "/base/first");
    assert_eq!(c.response().await.1, "/base/second");

    // An interim response is passed on before the final one.
    c.send(get("early-hints").as_bytes()).await;
    let interim = c.head().await;
    assert!(interim.starts_with("HTTP/1.1 103"), "{interim}");
    assert_eq!(c.response().await.1, "ok");

    // The same connection then asks the API, and the gateway again.
    c.send(format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(c.response().await.1, "ok\n");
    c.send(get("after").as_bytes()).await;
    assert_eq!(c.response().await.1, "/base/after");

    // A backend that closes its keep-alive connections after each answer: every request still succeeds.
    let mut c = RawClient::connect(e.addr).await;
    for _ in 0..5 {
        c.send(get("then-close").as_bytes()).await;
        let (head, body) = c.response().await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, "once");
    }

    // A body that ends when the backend closes: the client's connection closes after it.
    let mut c = RawClient::connect(e.addr).await;
    c.send(get("until-close").as_bytes()).await;
    let all = c.until_closed().await;
    assert!(all.starts_with("HTTP/1.1 200"), "{all}");
    assert!(
        all.to_ascii_lowercase().contains("connection: close\r\n"),
        "{all}"
    );
    assert!(all.ends_with("\r\n\r\nall of it"), "{all}");

    // A backend that does not speak HTTP: a 502 that says so.
    let mut c = RawClient::connect(e.addr).await;
    c.send(get("garbage").as_bytes()).await;
    let (head, body) = c.response().await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(body.contains("not a valid HTTP/1 response head"), "{body}");
}
