//! Connected laptops (the orchestrator): every `kiln daemon` session, what it consumes and serves, and the
//! routing of served endpoints.
//!
//! A daemon dials `/api/v1/orgs/{org}/connect?project=P&environment=E&device=D` with its user's token (the user
//! must see the project's components). The server sends the environment's deployed components and endpoints
//! ([`connect::proto::ToDaemon::Services`]) at once and whenever the gateway's routing table changes them. The
//! daemon's `svc:<component>/<endpoint>` streams are carried to that endpoint in the environment ([`carry`]).
//!
//! A serve ([`connect::proto::ToServer::Serve`], the `developer` role in the project) makes an *intercept* of
//! the endpoint: requests carrying its header (by default `kiln-serve: <user>`), or with `all` every request,
//! are sent to the daemon as a `serve:<id>` stream instead of to a replica. Every way into an endpoint
//! honours intercepts: the gateway (public URLs), the mesh (a consumer's dependency address) and other laptops'
//! consumes. Without intercepts these stay byte relays; with header intercepts a connection is read as
//! HTTP/1.1 and each request routed on its own (upgrades pass through); with only an `all` intercept the bytes
//! go to the laptop. When an intercept starts, relays of that endpoint already open end, so the consumer's next
//! connection is routed by the new rule. When its session ends (the laptop disconnected, or its keepalive went
//! unanswered for 4 s) the intercepts go with it, and a request that cannot reach the laptop goes to a replica.
//!
//! Sessions belong to the server the daemon dialed: routing to a laptop happens on that server.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use connect::proto::{self, HeaderMatch, Service, ToDaemon, ToServer};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use model::Kind;
use serde::Serialize;
use serde_json::json;
use store::AuditRecord;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tunnel_io::{Event, Session};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, Verb};
use crate::routes::{Api, Op};
use crate::workspaces::org_key;
use crate::workspaces::ws::{AxumWs, MAX_MESSAGE};
use crate::AppState;

/// How long opening a stream to a serving laptop may take before the request goes to a replica instead.
const OPEN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a daemon is told of the other laptops in its environment, at most.
const PEERS_EVERY: Duration = Duration::from_millis(250);
/// The most serves one daemon session may hold.
const MAX_SERVES: usize = 16;
/// How long connecting to a replica may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub fn register(api: Api) -> Api {
    api.op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/connect",
            "connectDaemon",
            "connect",
            "A laptop daemon's tunnel to one environment (WebSocket): consume its services, serve its components",
        )
        .query("project", "The project (required)")
        .query("environment", "The environment (required)")
        .query("device", "The laptop's name, as others see it")
        .returns(101, None),
        connect_daemon,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/connections",
            "listConnections",
            "connect",
            "Connected laptops: who is connected to which environment, what each consumes and serves \
             (with watch=true the whole list each time it changes: NDJSON, or SSE with Accept: text/event-stream)",
        )
        .query("project", "Only this project")
        .query("environment", "Only this environment")
        .query("watch", "true: a stream, one list per change"),
        list_connections,
    )
}

/// Every daemon session of this server, and the intercepts their serves make.
pub struct Connections {
    conns: Mutex<HashMap<u64, Conn>>,
    /// Route key (`org/project/env/component/endpoint`) → its intercepts, header ones first.
    intercepts: RwLock<HashMap<String, Vec<Intercept>>>,
    /// How many intercepts exist (routing skips every lookup while none do).
    active: AtomicUsize,
    /// Bumped on every change to a session, serve or consume count.
    changed: watch::Sender<u64>,
    /// Bumped when an intercept starts or ends.
    routing: watch::Sender<u64>,
    next_id: AtomicU64,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            conns: Mutex::default(),
            intercepts: RwLock::default(),
            active: AtomicUsize::new(0),
            changed: watch::channel(0).0,
            routing: watch::channel(0).0,
            next_id: AtomicU64::new(1),
        }
    }
}

struct Conn {
    info: ConnInfo,
}

/// A connected daemon, as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnInfo {
    pub id: u64,
    pub organization: String,
    pub project: String,
    pub environment: String,
    pub user: String,
    pub device: String,
    pub connected_at: String,
    pub serves: Vec<ServeInfo>,
    /// `component/endpoint` → connections carried.
    pub consumes: BTreeMap<String, Consumed>,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServeInfo {
    pub id: String,
    pub component: String,
    pub endpoint: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
    pub all: bool,
    pub since: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Consumed {
    pub open: u64,
    pub total: u64,
}

/// Where an intercepted request goes.
#[derive(Clone)]
pub(crate) struct Intercept {
    conn: u64,
    serve: String,
    user: String,
    port: u16,
    header: Option<(HeaderName, HeaderValue)>,
    session: Session,
}

impl Intercept {
    /// Opens a stream to the serving laptop.
    pub(crate) async fn open(&self) -> Result<tunnel_io::TunnelStream, String> {
        match tokio::time::timeout(
            OPEN_TIMEOUT,
            self.session
                .open(&format!("{}{}", proto::SERVE_TARGET, self.serve)),
        )
        .await
        {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(e)) => Err(format!(
                "the laptop of {} serving this endpoint on port {} did not take the request: {e}",
                self.user, self.port
            )),
            Err(_) => Err(format!(
                "the laptop of {} serving this endpoint did not answer within {OPEN_TIMEOUT:?}",
                self.user
            )),
        }
    }
}

/// How a connection to an endpoint is carried.
pub(crate) enum Mode {
    /// No intercept: bytes to a replica.
    Replicas,
    /// One intercept takes everything: bytes to the laptop.
    All(Intercept),
    /// Header intercepts: request by request.
    Http,
}

pub(crate) fn route_key(
    org: &str,
    project: &str,
    env: &str,
    component: &str,
    endpoint: &str,
) -> String {
    format!("{org}/{project}/{env}/{component}/{endpoint}")
}

impl Connections {
    /// Whether any intercept exists (cheap; checked before any lookup).
    pub(crate) fn any(&self) -> bool {
        self.active.load(Ordering::Acquire) > 0
    }

    /// Whether the route has intercepts.
    pub(crate) fn intercepted(&self, key: &str) -> bool {
        self.any()
            && self
                .intercepts
                .read()
                .is_ok_and(|m| m.get(key).is_some_and(|l| !l.is_empty()))
    }

    /// The intercept a request with these headers goes to: the first whose header it carries, else an `all`
    /// one.
    pub(crate) fn pick(&self, key: &str, headers: &HeaderMap) -> Option<Intercept> {
        if !self.any() {
            return None;
        }
        let map = self.intercepts.read().ok()?;
        let list = map.get(key)?;
        list.iter()
            .find(|i| {
                i.header
                    .as_ref()
                    .is_some_and(|(n, v)| headers.get_all(n).iter().any(|x| x == v))
            })
            .or_else(|| list.iter().find(|i| i.header.is_none()))
            .cloned()
    }

    pub(crate) fn mode(&self, key: &str) -> Mode {
        if !self.any() {
            return Mode::Replicas;
        }
        let Ok(map) = self.intercepts.read() else {
            return Mode::Replicas;
        };
        match map.get(key).map(Vec::as_slice).unwrap_or_default() {
            [] => Mode::Replicas,
            list if list.iter().all(|i| i.header.is_none()) => Mode::All(list[0].clone()),
            _ => Mode::Http,
        }
    }

    /// Resolves once `key` has an intercept (a relay of it then ends, so the next connection is routed anew).
    pub(crate) async fn until_intercepted(&self, key: &str) {
        self.until(|| self.intercepted(key)).await
    }

    /// Resolves once serve `serve` no longer intercepts `key` (a byte relay to its laptop then ends).
    async fn until_gone(&self, key: &str, serve: &str) {
        self.until(|| {
            !self.intercepts.read().is_ok_and(|m| {
                m.get(key)
                    .is_some_and(|l| l.iter().any(|i| i.serve == serve))
            })
        })
        .await
    }

    /// Resolves once `holds` does, checking it again after each change to the intercepts.
    async fn until(&self, holds: impl Fn() -> bool) {
        let mut rx = self.routing.subscribe();
        loop {
            if holds() {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// The connected daemons, as the API shows them.
    pub fn list(&self) -> Vec<ConnInfo> {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<ConnInfo> = conns.values().map(|c| c.info.clone()).collect();
        v.sort_by_key(|c| c.id);
        v
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n += 1);
    }

    fn consumed(&self, conn: u64, what: &str, opened: bool) {
        if let Ok(mut conns) = self.conns.lock() {
            if let Some(c) = conns.get_mut(&conn) {
                let e = c.info.consumes.entry(what.to_string()).or_default();
                if opened {
                    e.open += 1;
                    e.total += 1;
                } else {
                    e.open = e.open.saturating_sub(1);
                }
            }
        }
        self.bump();
    }

    /// Adds an intercept. It replaces the same serve still held by an older session of the same user (a laptop
    /// that reconnected before the server noticed the old session was gone), and the laptop's other serve of
    /// the same endpoint; the `(connection, serve)` pairs it replaced.
    fn add_intercept(&self, key: String, i: Intercept) -> Vec<(u64, String)> {
        let mut replaced = Vec::new();
        if let Ok(mut m) = self.intercepts.write() {
            for (k, list) in m.iter_mut() {
                list.retain(|x| {
                    let stale = x.user == i.user && x.serve == i.serve && x.conn != i.conn;
                    let same_endpoint = *k == key && x.conn == i.conn;
                    if stale || same_endpoint {
                        replaced.push((x.conn, x.serve.clone()));
                    }
                    !(stale || same_endpoint)
                });
            }
            m.retain(|_, l| !l.is_empty());
            self.active.fetch_sub(replaced.len(), Ordering::AcqRel);
            let list = m.entry(key).or_default();
            if i.header.is_some() {
                let at = list
                    .iter()
                    .position(|x| x.header.is_none())
                    .unwrap_or(list.len());
                list.insert(at, i);
            } else {
                list.push(i);
            }
            self.active.fetch_add(1, Ordering::AcqRel);
        }
        self.routing.send_modify(|n| *n = n.wrapping_add(1));
        replaced
    }

    /// Removes the intercepts of `conn` (only serve `serve` when given).
    fn remove_intercepts(&self, conn: u64, serve: Option<&str>) {
        if let Ok(mut m) = self.intercepts.write() {
            let mut removed = 0;
            m.retain(|_, list| {
                let before = list.len();
                list.retain(|i| !(i.conn == conn && serve.is_none_or(|s| s == i.serve)));
                removed += before - list.len();
                !list.is_empty()
            });
            self.active.fetch_sub(removed, Ordering::AcqRel);
        }
        self.routing.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Who serves `key` with this header already (another laptop), or `all`. The same serve of an older session
    /// of the same user is not a conflict: it is replaced.
    fn conflict(
        &self,
        key: &str,
        conn: u64,
        user: &str,
        serve: &str,
        header: Option<&(HeaderName, HeaderValue)>,
    ) -> Option<String> {
        let m = self.intercepts.read().ok()?;
        m.get(key)?
            .iter()
            .filter(|i| i.conn != conn && !(i.user == user && i.serve == serve))
            .find(|i| match (&i.header, header) {
                (None, None) => true,
                (Some(a), Some(b)) => a == b,
                _ => false,
            })
            .map(|i| i.user.clone())
    }
}

// ---- carrying connections ----

/// A byte stream either way.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Replicas of a route, as the caller's table has them now.
pub(crate) type Backends = Arc<dyn Fn() -> Vec<SocketAddr> + Send + Sync>;

/// Carries one connection to the endpoint `key`, honouring intercepts.
pub(crate) async fn carry(
    conns: Arc<Connections>,
    mut io: impl Io,
    key: String,
    peer: SocketAddr,
    backends: Backends,
) {
    match conns.mode(&key) {
        Mode::Replicas => {
            let Some(mut up) = connect_replica(&backends).await else {
                return;
            };
            tokio::select! {
                _ = tunnel_io::relay(&mut io, &mut up) => {}
                _ = conns.until_intercepted(&key) => {}
            }
        }
        Mode::All(i) => match i.open().await {
            Ok(mut s) => {
                tokio::select! {
                    _ = tunnel_io::relay(&mut io, &mut s) => {}
                    _ = conns.until_gone(&key, &i.serve) => {}
                }
            }
            Err(e) => {
                tracing::debug!(route = %key, error = %e, "connect: the serving laptop is unreachable; using a replica");
                if let Some(mut up) = connect_replica(&backends).await {
                    let _ = tunnel_io::relay(&mut io, &mut up).await;
                }
            }
        },
        Mode::Http => {
            let svc = hyper::service::service_fn(move |req| {
                let (conns, key, backends) = (conns.clone(), key.clone(), backends.clone());
                async move {
                    Ok::<_, Infallible>(route_request(&conns, &key, peer, &backends, req).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades()
                .await;
        }
    }
}

/// A connection to one of the replicas, round-robin from a random start, trying each once.
async fn connect_replica(backends: &Backends) -> Option<TcpStream> {
    let list = backends();
    if list.is_empty() {
        return None;
    }
    let start = rand::random::<usize>() % list.len();
    for i in 0..list.len() {
        let addr = list[(start + i) % list.len()];
        if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
    }
    None
}

fn text(status: StatusCode, msg: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg + "\n",
    )
        .into_response()
}

/// Routes one request of an HTTP-mode connection: to the laptop its headers pick, else to a replica.
async fn route_request(
    conns: &Connections,
    key: &str,
    peer: SocketAddr,
    backends: &Backends,
    mut req: hyper::Request<Incoming>,
) -> Response {
    // Picked on the headers as sent, as the gateway does.
    let laptop = conns.pick(key, req.headers());
    let upgrade = crate::gateway::is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    parts.headers = crate::gateway::forwarded_headers(parts.headers, upgrade, peer, None, &[]);
    let req = hyper::Request::from_parts(parts, body);
    let mut failure = None;
    let upstream: Box<dyn Io> = match laptop {
        Some(i) => match i.open().await {
            Ok(s) => Box::new(s),
            Err(e) => {
                failure = Some(e);
                match connect_replica(backends).await {
                    Some(s) => Box::new(s),
                    None => return text(StatusCode::BAD_GATEWAY, failure.unwrap_or_default()),
                }
            }
        },
        None => match connect_replica(backends).await {
            Some(s) => Box::new(s),
            None => {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("no ready replica of {key} could be reached"),
                )
            }
        },
    };
    if let Some(f) = failure {
        tracing::debug!(route = %key, error = %f, "connect: a request for a serving laptop went to a replica");
    }
    match exchange(upstream, req).await {
        Ok(resp) => finish(resp, client_upgrade),
        Err(e) => text(StatusCode::BAD_GATEWAY, e),
    }
}

/// Sends `req` over a fresh HTTP/1.1 connection on `io`.
pub(crate) async fn exchange<B>(
    io: Box<dyn Io>,
    req: hyper::Request<B>,
) -> Result<hyper::Response<Incoming>, String>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("the HTTP exchange failed: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    send.send_request(req)
        .await
        .map_err(|e| format!("the HTTP exchange failed: {e}"))
}

/// The upstream's response, passed on (hop-by-hop headers removed; a `101` spliced to the client).
pub(crate) fn finish(
    resp: hyper::Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return crate::gateway::switching_protocols(
            resp,
            client_upgrade,
            |mut a, mut b| async move {
                let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
            },
        );
    }
    let (mut parts, body) = resp.into_parts();
    crate::gateway::strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, Body::new(body))
}

// ---- the daemon's session ----

fn not_websocket(e: WebSocketUpgradeRejection) -> ApiError {
    ApiError::bad_request(format!(
        "this endpoint takes a WebSocket upgrade (the tunnel protocol, as `kiln daemon` speaks it): {e}"
    ))
}

/// `GET /api/v1/orgs/{org}/connect`.
async fn connect_daemon(
    State(state): State<AppState>,
    principal: Principal,
    Path(org): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    let project = q.get("project").cloned().unwrap_or_default();
    let env = q.get("environment").cloned().unwrap_or_default();
    for (what, v) in [("project", &project), ("environment", &env)] {
        model::validate_name(what, v)
            .map_err(|e| ApiError::bad_request(format!("the query parameter {e}")))?;
    }
    let device: String = q
        .get("device")
        .map(|d| d.chars().filter(|c| !c.is_control()).take(64).collect())
        .unwrap_or_else(|| "unnamed".into());
    access.check(
        Verb::Get,
        Kind::Component,
        Some(&project),
        &format!("the components of project {project}"),
    )?;
    for (kind, name, what) in [
        (Kind::Project, &project, "project"),
        (Kind::Environment, &env, "environment"),
    ] {
        match state.store.get(&org_key(kind, &org, name)).await {
            Ok(_) => {}
            Err(store::StoreError::NotFound(_)) => {
                return Err(ApiError::not_found(format!(
                    "{what} {name} does not exist in organization {org}"
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
    let upgrade = upgrade.map_err(not_websocket)?;
    let id = state.connections.next_id.fetch_add(1, Ordering::Relaxed);
    let user = principal.user.name.clone();
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            let info = ConnInfo {
                id,
                organization: org,
                project,
                environment: env,
                user,
                device,
                connected_at: Timestamp::now().to_string(),
                serves: Vec::new(),
                consumes: BTreeMap::new(),
            };
            run_daemon(state, AxumWs(socket), info, principal).await;
        })
        .into_response())
}

/// Sends what `message` makes of `now` unless it equals what was sent `last`.
fn send_changed<T: PartialEq + Clone>(
    session: &Session,
    last: &mut Option<T>,
    now: T,
    message: impl FnOnce(T) -> ToDaemon,
) {
    if last.as_ref() != Some(&now) {
        send(session, &message(now.clone()));
        *last = Some(now);
    }
}

fn send(session: &Session, m: &ToDaemon) {
    if let Ok(b) = serde_json::to_vec(m) {
        let _ = session.send_message(Bytes::from(b));
    }
}

async fn run_daemon(state: AppState, socket: AxumWs, info: ConnInfo, principal: Principal) {
    let config =
        connect::daemon::session_config(&format!("kiln-server {}", env!("CARGO_PKG_VERSION")));
    let (session, mut events) = match tunnel_io::accept(socket, config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(user = %info.user, error = %e, "daemon tunnel handshake failed");
            return;
        }
    };
    let id = info.id;
    let (org, project, env) = (
        info.organization.clone(),
        info.project.clone(),
        info.environment.clone(),
    );
    tracing::info!(id, user = %info.user, device = %info.device, org, project, env, "laptop connected");
    send(
        &session,
        &ToDaemon::Welcome {
            user: info.user.clone(),
            connection: id,
        },
    );
    {
        let mut conns = state
            .connections
            .conns
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        conns.insert(id, Conn { info: info.clone() });
    }
    state.connections.bump();
    audit(
        &state,
        &info.user,
        &org,
        &project,
        format!("connect {project}/{env} from {}", info.device),
    );
    // However this task ends (its session closed, a panic, the server stopping), the session's intercepts go.
    let forget = Forget {
        connections: state.connections.clone(),
        id,
    };
    let mut table = state.gateway.subscribe();
    let mut last: Option<Vec<Service>> = None;
    let mut peers_changed = state.connections.changed.subscribe();
    let mut last_peers: Option<Vec<serde_json::Value>> = None;
    let mut peers_due = Some(tokio::time::Instant::now());
    loop {
        // The orchestrator view of this environment, at most every PEERS_EVERY (consumes change it often).
        if peers_due.is_some_and(|at| at <= tokio::time::Instant::now()) {
            peers_due = None;
            let peers: Vec<serde_json::Value> = state
                .connections
                .list()
                .into_iter()
                .filter(|c| c.organization == org && c.project == project && c.environment == env)
                .filter_map(|c| serde_json::to_value(c).ok())
                .collect();
            send_changed(&session, &mut last_peers, peers, |connections| {
                ToDaemon::Peers { connections }
            });
        }
        let services = state.gateway.services(&org, &project, &env);
        send_changed(&session, &mut last, services, |services| {
            ToDaemon::Services { services }
        });
        tokio::select! {
            ev = events.recv() => match ev {
                None => break,
                Some(Event::Message(b)) => match serde_json::from_slice::<ToServer>(&b) {
                    Ok(m) => on_message(&state, &session, &info, &principal, m).await,
                    Err(e) => tracing::info!(id, error = %e, "ignoring a malformed message from a daemon"),
                },
                Some(Event::Stream(incoming)) => on_stream(&state, &info, incoming),
            },
            r = table.changed() => if r.is_err() { break },
            _ = peers_changed.changed(), if peers_due.is_none() => {
                peers_due = Some(tokio::time::Instant::now() + PEERS_EVERY);
            }
            _ = tokio::time::sleep_until(peers_due.unwrap_or_else(tokio::time::Instant::now)), if peers_due.is_some() => {}
        }
    }
    let reason = session.closed().await;
    drop(forget);
    audit(
        &state,
        &info.user,
        &org,
        &project,
        format!("disconnect {project}/{env} from {}: {reason}", info.device),
    );
    tracing::info!(id, user = %info.user, reason, "laptop disconnected");
}

/// Removes a session and its intercepts when dropped.
struct Forget {
    connections: Arc<Connections>,
    id: u64,
}

impl Drop for Forget {
    fn drop(&mut self) {
        let c = &self.connections;
        c.remove_intercepts(self.id, None);
        c.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        c.bump();
    }
}

fn audit(state: &AppState, user: &str, org: &str, project: &str, action: String) {
    let record = AuditRecord {
        id: 0,
        time: Timestamp::now(),
        user: user.to_string(),
        action,
        kind: Some("Component".into()),
        organization: Some(org.to_string()),
        project: Some(project.to_string()),
        name: None,
        status: 200,
        outcome: "ok".into(),
    };
    let store = state.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.append_audit(record).await {
            tracing::error!(error = %e, "could not write an audit record");
        }
    });
}

fn on_stream(state: &AppState, info: &ConnInfo, incoming: tunnel_io::Incoming) {
    let target = incoming.target().to_string();
    let Some((component, endpoint)) = target
        .strip_prefix(proto::SERVICE_TARGET)
        .and_then(|t| t.split_once('/'))
    else {
        incoming.refuse(&format!(
            "unknown target {target:?}; a laptop opens {}<component>/<endpoint>",
            proto::SERVICE_TARGET
        ));
        return;
    };
    let key = route_key(
        &info.organization,
        &info.project,
        &info.environment,
        component,
        endpoint,
    );
    if !state.gateway.has_route(&key) {
        incoming.refuse(&format!(
            "no component {component} with endpoint {endpoint} is deployed in {}/{}",
            info.project, info.environment
        ));
        return;
    }
    let Ok(stream) = incoming.accept() else {
        return;
    };
    let (state, id, what) = (state.clone(), info.id, format!("{component}/{endpoint}"));
    let peer = SocketAddr::from(([127, 0, 0, 1], 0));
    tokio::spawn(async move {
        state.connections.consumed(id, &what, true);
        let gw = state.gateway.clone();
        let k = key.clone();
        let backends: Backends = Arc::new(move || gw.backends(&k));
        carry(state.connections.clone(), stream, key, peer, backends).await;
        state.connections.consumed(id, &what, false);
    });
}

async fn on_message(
    state: &AppState,
    session: &Session,
    info: &ConnInfo,
    principal: &Principal,
    m: ToServer,
) {
    match m {
        ToServer::Serve(s) => {
            let id = s.id.clone();
            let answer = match serve(state, session, info, principal, s).await {
                Ok((endpoint, header)) => ToDaemon::Served {
                    id,
                    endpoint: Some(endpoint),
                    header,
                    error: None,
                },
                Err(e) => ToDaemon::Served {
                    id,
                    endpoint: None,
                    header: None,
                    error: Some(e),
                },
            };
            send(session, &answer);
        }
        ToServer::Unserve { id } => {
            let c = &state.connections;
            c.remove_intercepts(info.id, Some(&id));
            let mut ended = None;
            if let Ok(mut conns) = c.conns.lock() {
                if let Some(conn) = conns.get_mut(&info.id) {
                    ended = conn
                        .info
                        .serves
                        .iter()
                        .find(|s| s.id == id)
                        .map(|s| s.component.clone());
                    conn.info.serves.retain(|s| s.id != id);
                }
            }
            c.bump();
            if let Some(component) = ended {
                audit(
                    state,
                    &info.user,
                    &info.organization,
                    &info.project,
                    format!("unserve {component} in {}", info.environment),
                );
            }
        }
    }
}

/// Checks and registers a serve; its endpoint and header as routed.
async fn serve(
    state: &AppState,
    session: &Session,
    info: &ConnInfo,
    principal: &Principal,
    s: proto::Serve,
) -> Result<(String, Option<HeaderMatch>), String> {
    if !proto::valid_serve_id(&s.id) {
        return Err("serve id: 1 to 64 of a-z, 0-9 and -".into());
    }
    model::validate_name("component", &s.component).map_err(|e| e.to_string())?;
    let access = rbac::org_access(state, principal, &info.organization)
        .await
        .map_err(|e| e.to_string())?;
    if !access.allows(Verb::Update, Kind::Component, Some(&info.project)) {
        return Err(format!(
            "serving a component needs the developer role in project {}; {} does not have it",
            info.project, info.user
        ));
    }
    let endpoints = state.gateway.endpoints_of(
        &info.organization,
        &info.project,
        &info.environment,
        &s.component,
    );
    if endpoints.is_empty() {
        return Err(format!(
            "component {} is not deployed in {}/{}",
            s.component, info.project, info.environment
        ));
    }
    let names = || {
        endpoints
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let ep = match &s.endpoint {
        Some(e) => endpoints.iter().find(|x| x.name == *e).ok_or_else(|| {
            format!(
                "component {} has no endpoint {e}; it has {}",
                s.component,
                names()
            )
        })?,
        None if endpoints.len() == 1 => &endpoints[0],
        None => {
            return Err(format!(
                "component {} has several endpoints ({}); name one with --endpoint",
                s.component,
                names()
            ))
        }
    };
    let header = match (&s.header, s.all) {
        (Some(_), true) => return Err("give a header or all, not both".into()),
        (Some(h), false) => Some(h.clone()),
        (None, false) => Some(HeaderMatch {
            name: proto::DEFAULT_HEADER.into(),
            value: info.user.clone(),
        }),
        (None, true) => None,
    };
    if let Some(h) = &header {
        proto::check_header(h)?;
        if !ep.is_http() {
            return Err(format!(
                "endpoint {} speaks {}: requests can be told apart by header on HTTP and WebSocket endpoints only; serve it with --all",
                ep.name, ep.protocol
            ));
        }
    }
    let parsed = match &header {
        Some(h) => Some((
            HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|e| format!("header {}: {e}", h.name))?,
            HeaderValue::from_str(&h.value).map_err(|e| format!("header {}: {e}", h.name))?,
        )),
        None => None,
    };
    let key = route_key(
        &info.organization,
        &info.project,
        &info.environment,
        &s.component,
        &ep.name,
    );
    let c = &state.connections;
    let held = c
        .conns
        .lock()
        .map(|m| m.get(&info.id).map_or(0, |x| x.info.serves.len()))
        .unwrap_or(0);
    if held >= MAX_SERVES {
        return Err(format!(
            "this laptop already serves {held} endpoints here, the most one connection may; stop one first"
        ));
    }
    if let Some(who) = c.conflict(&key, info.id, &info.user, &s.id, parsed.as_ref()) {
        return Err(match &header {
            Some(h) => format!(
                "{who} already serves {} with header {h}; choose another value",
                s.component
            ),
            None => format!(
                "{who} already serves every request of {}; only one laptop may use --all",
                s.component
            ),
        });
    }
    let replaced = c.add_intercept(
        key,
        Intercept {
            conn: info.id,
            serve: s.id.clone(),
            user: info.user.clone(),
            port: s.port,
            header: parsed,
            session: session.clone(),
        },
    );
    if let Ok(mut conns) = c.conns.lock() {
        for (conn, serve) in &replaced {
            if let Some(x) = conns.get_mut(conn) {
                x.info.serves.retain(|v| v.id != *serve);
            }
        }
        if let Some(conn) = conns.get_mut(&info.id) {
            conn.info.serves.push(ServeInfo {
                id: s.id.clone(),
                component: s.component.clone(),
                endpoint: ep.name.clone(),
                port: s.port,
                header: header.clone(),
                all: s.all,
                since: Timestamp::now().to_string(),
            });
        }
    }
    c.bump();
    audit(
        state,
        &info.user,
        &info.organization,
        &info.project,
        format!(
            "serve {} in {} ({})",
            s.component,
            info.environment,
            header
                .as_ref()
                .map_or("every request".to_string(), |h| format!(
                    "requests with {h}"
                ))
        ),
    );
    Ok((ep.name.clone(), header))
}

// ---- the orchestrator view ----

/// `GET /api/v1/orgs/{org}/connections`.
async fn list_connections(
    State(state): State<AppState>,
    principal: Principal,
    Path(org): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    let sse = crate::gateway::accepts(&headers, "text/event-stream");
    let project = q.get("project").cloned();
    let env = q.get("environment").cloned();
    let visible = move |c: &ConnInfo| {
        c.organization == org
            && project.as_ref().is_none_or(|p| *p == c.project)
            && env.as_ref().is_none_or(|e| *e == c.environment)
            && access.allows(Verb::Get, Kind::Component, Some(&c.project))
    };
    let items = move |conns: &Connections| -> Vec<ConnInfo> {
        conns.list().into_iter().filter(|c| visible(c)).collect()
    };
    if q.get("watch").map(String::as_str) != Some("true") {
        return Ok(axum::Json(json!({ "items": items(&state.connections) })).into_response());
    }
    let mut rx = state.connections.changed.subscribe();
    let mut shutdown = state.shutdown.clone();
    let conns = state.connections.clone();
    let stream = async_stream(move |tx| async move {
        let mut last = None;
        loop {
            let now = serde_json::to_string(&json!({ "items": items(&conns) })).unwrap_or_default();
            if last.as_ref() != Some(&now) {
                let event = if sse {
                    format!("event: connections\ndata: {now}\n\n")
                } else {
                    format!("{now}\n")
                };
                if tx.send(event).await.is_err() {
                    return;
                }
                last = Some(now);
            }
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(Duration::from_secs(15)) => {
                    let keepalive = if sse { ": keepalive\n\n" } else { "\n" };
                    if tx.send(keepalive.into()).await.is_err() { return }
                }
                _ = stopped(&mut shutdown) => return,
            }
            // Changes come in bursts (a consume opens many connections): one event per 200 ms at most.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(resp)
}

/// Resolves once the server shuts down.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// A stream of what `f` sends on its channel.
fn async_stream<F, Fut>(f: F) -> impl futures_util::Stream<Item = Result<String, Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|s| (Ok(s), rx)) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn session() -> Session {
        let (a, b) = tunnel_io::memory_pair();
        let accept = tokio::spawn(tunnel_io::accept(b, tunnel_io::Config::new("server")));
        let (s, _) = tunnel_io::dial(a, tunnel_io::Config::new("daemon"))
            .await
            .unwrap();
        let _ = accept.await.unwrap().unwrap();
        s
    }

    fn intercept(
        conn: u64,
        serve: &str,
        user: &str,
        header: Option<&str>,
        s: &Session,
    ) -> Intercept {
        Intercept {
            conn,
            serve: serve.into(),
            user: user.into(),
            port: 3000,
            header: header.map(|v| {
                (
                    HeaderName::from_static("kiln-serve"),
                    HeaderValue::from_str(v).unwrap(),
                )
            }),
            session: s.clone(),
        }
    }

    #[tokio::test]
    async fn intercepts_route_by_header_and_replace_what_they_supersede() {
        let c = Connections::default();
        let s = session().await;
        let key = "o/p/e/api/http";
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("kiln-serve", HeaderValue::from_str(v).unwrap());
            m
        };
        assert!(c.pick(key, &h("alice")).is_none() && !c.any());

        // Alice and Bob each get their own requests; Bob's --all takes the rest.
        c.add_intercept(key.into(), intercept(1, "a1", "alice", Some("alice"), &s));
        c.add_intercept(key.into(), intercept(2, "b1", "bob", None, &s));
        assert_eq!(c.pick(key, &h("alice")).unwrap().serve, "a1");
        assert_eq!(c.pick(key, &HeaderMap::new()).unwrap().serve, "b1");
        assert!(matches!(c.mode(key), Mode::Http));
        // Another laptop may not take alice's header; alice's own serve sent again from a new session may.
        let alice = (
            HeaderName::from_static("kiln-serve"),
            HeaderValue::from_static("alice"),
        );
        assert_eq!(
            c.conflict(key, 3, "carol", "c1", Some(&alice)).as_deref(),
            Some("alice")
        );
        assert_eq!(c.conflict(key, 3, "alice", "a1", Some(&alice)), None);
        let replaced = c.add_intercept(key.into(), intercept(3, "a1", "alice", Some("alice"), &s));
        assert_eq!(replaced, vec![(1, "a1".to_string())]);
        assert_eq!(c.pick(key, &h("alice")).unwrap().conn, 3);
        // A laptop's new serve of the endpoint replaces its earlier one.
        let replaced = c.add_intercept(key.into(), intercept(3, "a2", "alice", Some("al"), &s));
        assert_eq!(replaced, vec![(3, "a1".to_string())]);
        assert!(
            c.pick(key, &h("alice")).unwrap().header.is_none(),
            "bob's --all"
        );
        // A session's end takes its intercepts with it; the count stays exact.
        c.remove_intercepts(2, None);
        c.remove_intercepts(3, None);
        assert!(!c.any() && c.pick(key, &h("al")).is_none());
        assert!(matches!(c.mode(key), Mode::Replicas));
    }
}
