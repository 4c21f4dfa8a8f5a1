//! The gateway: every endpoint with visibility `public` in the release a ReleaseBinding runs gets URLs on the
//! server itself, in two forms:
//!
//! - path form: `/x/<org>/<project>/<env>/<component>/<endpoint>/<rest>` → `<endpoint path>/<rest>` (query kept,
//!   `X-Forwarded-Prefix` set to the stripped prefix);
//! - subdomain form: `Host: <endpoint>--<component>--<project>--<env>.<base-domain>` → `<endpoint path>/<path>`.
//!   The organization is not in the host: it is the one organization with such a binding (two or more: 409).
//!
//! Requests are balanced round-robin over the ready replicas the binding's status lists
//! (`status.endpoints`, written by the ReleaseBinding controller). Routing reads an in-memory table, never the
//! store: [`spawn_gateway_table`] lists the bindings, then follows their changes, reading each release once
//! (releases are immutable). Until the first list has loaded, gateway requests answer 503.
//!
//! Proxying is HTTP/1.1 over TCP with bodies streamed both ways, idle backend connections kept for reuse, and
//! WebSocket (any `Upgrade`) passed through. Failures are pages a person can act on: 404 (no such public
//! endpoint), 503 (no ready replica, with the binding's Ready message), 502 (the backend could not be reached,
//! after trying one other ready replica).

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::header::InvalidHeaderValue;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, TrySendError};
use hyper_util::rt::TokioIo;
use model::kinds::Visibility;
use model::kinds::{BindingState, Endpoint, EndpointProtocol, ReleaseBindingSpec, ReleaseSpec};
use model::{Kind, Resource};
use serde_json::Value;
use store::{EventType, Key, ListQuery, Store, StoreError, WatchQuery};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::console::html::esc;
use crate::AppState;

pub(crate) mod forward;

/// How long connecting to a backend may take before the next replica is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle connections kept per backend address.
const MAX_IDLE_PER_BACKEND: usize = 64;
/// How long a backend connection may sit idle in the pool.
const MAX_IDLE: Duration = Duration::from_secs(60);
/// How often the pool is swept for connections idle too long or closed by their backend.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// How often bindings whose release could not be read are retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// More cached releases than this and the cache starts over.
const RELEASE_CACHE_MAX: usize = 50_000;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// The gateway's routing table and backend connections. One per server, shared through [`AppState`].
#[derive(Default)]
pub struct Gateway {
    table: RwLock<Table>,
    loaded: AtomicBool,
    pool: Arc<Pool>,
    /// Idle connections of the forwarding path ([`forward`]).
    raw: Arc<forward::RawPool>,
    /// Bumped whenever the table changes.
    changes: watch::Sender<u64>,
}

impl Gateway {
    /// Whether the routing table has been loaded (gateway requests answer 503 until then).
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// How many (organization, project, environment, component, endpoint) routes the table holds.
    pub fn routes(&self) -> usize {
        self.table.read().map(|t| t.routes.len()).unwrap_or(0)
    }

    /// Resolves each time the table changes.
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    /// Whether a deployed component has this endpoint (`org/project/env/component/endpoint`).
    pub(crate) fn has_route(&self, key: &str) -> bool {
        self.table
            .read()
            .is_ok_and(|t| t.routes.get(key).is_some_and(|r| r.active))
    }

    /// The ready replicas of a route.
    pub(crate) fn backends(&self, key: &str) -> Vec<SocketAddr> {
        self.table
            .read()
            .ok()
            .and_then(|t| t.routes.get(key).map(|r| r.backends.clone()))
            .unwrap_or_default()
    }

    /// The components deployed in an environment and their endpoints, sorted (what laptops connected to it
    /// resolve).
    pub(crate) fn services(
        &self,
        org: &str,
        project: &str,
        env: &str,
    ) -> Vec<connect::proto::Service> {
        let Ok(t) = self.table.read() else {
            return Vec::new();
        };
        let mut by: BTreeMap<&str, Vec<connect::proto::ServiceEndpoint>> = BTreeMap::new();
        for r in t.routes.values() {
            if r.active && r.org == org && r.project == project && r.env == env {
                by.entry(r.component.as_str())
                    .or_default()
                    .push(r.service_endpoint());
            }
        }
        by.into_iter()
            .map(|(component, mut endpoints)| {
                endpoints.sort_by(|a, b| a.name.cmp(&b.name));
                connect::proto::Service {
                    component: component.to_string(),
                    endpoints,
                }
            })
            .collect()
    }

    /// The endpoints of one deployed component, sorted by name.
    pub(crate) fn endpoints_of(
        &self,
        org: &str,
        project: &str,
        env: &str,
        component: &str,
    ) -> Vec<connect::proto::ServiceEndpoint> {
        self.services(org, project, env)
            .into_iter()
            .find(|s| s.component == component)
            .map(|s| s.endpoints)
            .unwrap_or_default()
    }
}

/// One endpoint of one binding: where its requests go.
struct Route {
    org: String,
    project: String,
    env: String,
    component: String,
    endpoint: String,
    visibility: Visibility,
    protocol: EndpointProtocol,
    /// The endpoint's base path on the workload.
    path: String,
    /// The port it declares.
    port: u32,
    /// Deployed (not undeployed, not being deleted).
    active: bool,
    /// Addresses of the ready replicas.
    backends: Vec<SocketAddr>,
    ready: u64,
    total: u64,
    /// The binding's `Ready` condition message.
    message: String,
    next: AtomicUsize,
}

/// The routes, indexed the ways requests look them up.
#[derive(Default)]
struct Table {
    /// `org/project/env/component/endpoint` → route.
    routes: HashMap<String, Arc<Route>>,
    /// `project/env/component/endpoint` → the organizations that have it (subdomain lookups).
    hosts: HashMap<String, Vec<String>>,
    /// `org/project/env/component` → how many bindings deploy it (for telling "no such endpoint" apart).
    deployed: HashMap<String, usize>,
    /// `org/project/binding` → what that binding contributed.
    bindings: HashMap<String, Contribution>,
}

impl Route {
    /// `org/project/env/component/endpoint`.
    fn key(&self) -> String {
        route_key(
            &self.org,
            &self.project,
            &self.env,
            &self.component,
            &self.endpoint,
        )
    }

    fn service_endpoint(&self) -> connect::proto::ServiceEndpoint {
        connect::proto::ServiceEndpoint {
            name: self.endpoint.clone(),
            port: u16::try_from(self.port).unwrap_or(0),
            protocol: match self.protocol {
                EndpointProtocol::Http => "http",
                EndpointProtocol::Https => "https",
                EndpointProtocol::Tcp => "tcp",
                EndpointProtocol::Udp => "udp",
                EndpointProtocol::Grpc => "grpc",
                EndpointProtocol::WebSocket => "websocket",
            }
            .into(),
            ready: self.backends.len() as u64,
        }
    }
}

struct Contribution {
    deployed_key: String,
    routes: Vec<Arc<Route>>,
}

fn route_key(org: &str, project: &str, env: &str, component: &str, endpoint: &str) -> String {
    format!("{org}/{project}/{env}/{component}/{endpoint}")
}

fn host_key(project: &str, env: &str, component: &str, endpoint: &str) -> String {
    format!("{project}/{env}/{component}/{endpoint}")
}

impl Table {
    fn remove(&mut self, binding: &str) {
        let Some(old) = self.bindings.remove(binding) else {
            return;
        };
        if let Some(n) = self.deployed.get_mut(&old.deployed_key) {
            *n -= 1;
            if *n == 0 {
                self.deployed.remove(&old.deployed_key);
            }
        }
        for r in old.routes {
            let rk = route_key(&r.org, &r.project, &r.env, &r.component, &r.endpoint);
            if self.routes.get(&rk).is_some_and(|cur| Arc::ptr_eq(cur, &r)) {
                self.routes.remove(&rk);
            }
            let hk = host_key(&r.project, &r.env, &r.component, &r.endpoint);
            if let Some(orgs) = self.hosts.get_mut(&hk) {
                if let Some(i) = orgs.iter().position(|o| *o == r.org) {
                    orgs.swap_remove(i);
                }
                if orgs.is_empty() {
                    self.hosts.remove(&hk);
                }
            }
        }
    }

    fn insert(&mut self, binding: String, deployed_key: String, routes: Vec<Arc<Route>>) {
        self.remove(&binding);
        *self.deployed.entry(deployed_key.clone()).or_default() += 1;
        for r in &routes {
            let rk = route_key(&r.org, &r.project, &r.env, &r.component, &r.endpoint);
            self.routes.insert(rk, r.clone());
            let hk = host_key(&r.project, &r.env, &r.component, &r.endpoint);
            self.hosts.entry(hk).or_default().push(r.org.clone());
        }
        self.bindings.insert(
            binding,
            Contribution {
                deployed_key,
                routes,
            },
        );
    }
}

// ---- the table's maintenance ----

/// Starts the task that keeps the gateway's routing table: it lists the ReleaseBindings, then follows their
/// changes (re-listing when the watch breaks), until `shutdown` flips. The same task closes idle backend
/// connections now and then.
pub fn spawn_gateway_table(state: AppState, shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
    let pool = state.gateway.pool.clone();
    let raw = state.gateway.raw.clone();
    let mut stop = shutdown.clone();
    let sweep = async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SWEEP_EVERY) => {
                    pool.sweep(MAX_IDLE);
                    raw.sweep(MAX_IDLE);
                }
                _ = stopped(&mut stop) => return,
            }
        }
    };
    let table = maintain(state.store.clone(), state.gateway.clone(), shutdown);
    tokio::spawn(async move {
        tokio::join!(table, sweep);
    })
}

enum Stopped {
    Shutdown,
}

async fn maintain(store: Store, gw: Arc<Gateway>, mut shutdown: watch::Receiver<bool>) {
    let mut sync = Sync {
        store,
        gw,
        releases: HashMap::new(),
        pending: HashMap::new(),
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        match sync.run(&mut shutdown).await {
            Ok(Stopped::Shutdown) => return,
            Err(e) => {
                tracing::warn!(error = %e, "gateway: following release bindings failed; re-listing");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stopped(&mut shutdown) => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Resolves once the server shuts down (or the shutdown signal's sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

struct Sync {
    store: Store,
    gw: Arc<Gateway>,
    /// `org/project/release` → the release's endpoints.
    releases: HashMap<String, Arc<Vec<Endpoint>>>,
    /// Bindings whose release could not be read yet, retried every [`RETRY_EVERY`].
    pending: HashMap<String, Resource>,
}

fn binding_key(obj: &Resource) -> String {
    format!(
        "{}/{}/{}",
        obj.metadata.organization.as_deref().unwrap_or(""),
        obj.metadata.project.as_deref().unwrap_or(""),
        obj.metadata.name
    )
}

impl Sync {
    async fn run(&mut self, shutdown: &mut watch::Receiver<bool>) -> Result<Stopped, StoreError> {
        let mut q = ListQuery {
            kind: Some(Kind::ReleaseBinding),
            ..Default::default()
        };
        let mut items = Vec::new();
        let mut revision = None;
        loop {
            let page = self.store.list(&q).await?;
            revision.get_or_insert(page.revision);
            items.extend(page.items);
            match page.continue_token {
                Some(t) => q.continue_token = Some(t),
                None => break,
            }
        }
        let revision = revision.unwrap_or(0);
        let mut table = Table::default();
        self.pending.clear();
        for obj in items {
            if let Some((bkey, dkey, routes)) = self.routes_of(&obj).await {
                table.insert(bkey, dkey, routes);
            }
        }
        let n = table.routes.len();
        if let Ok(mut t) = self.gw.table.write() {
            *t = table;
        }
        self.gw.loaded.store(true, Ordering::Release);
        self.gw.changed();
        tracing::debug!(routes = n, revision, "gateway: routing table loaded");
        let mut events = self
            .store
            .watch(&WatchQuery {
                kind: Some(Kind::ReleaseBinding),
                from_revision: Some(revision),
                ..Default::default()
            })
            .await?;
        let mut retry = tokio::time::interval(RETRY_EVERY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stopped(shutdown) => return Ok(Stopped::Shutdown),
                ev = events.next_event() => match ev {
                    Some(Ok(ev)) => self.apply(ev.type_, ev.object).await,
                    Some(Err(e)) => return Err(e),
                    None => return Err(StoreError::Backend("the watch ended".into())),
                },
                _ = retry.tick(), if !self.pending.is_empty() => {
                    let pending: Vec<Resource> = self.pending.drain().map(|(_, o)| o).collect();
                    for obj in pending {
                        self.apply(EventType::Modified, obj).await;
                    }
                }
            }
        }
    }

    async fn apply(&mut self, type_: EventType, obj: Resource) {
        if type_ == EventType::Deleted {
            let bkey = binding_key(&obj);
            self.pending.remove(&bkey);
            if let Ok(mut t) = self.gw.table.write() {
                t.remove(&bkey);
            }
            self.gw.changed();
            return;
        }
        if let Some((bkey, dkey, routes)) = self.routes_of(&obj).await {
            if let Ok(mut t) = self.gw.table.write() {
                t.insert(bkey, dkey, routes);
            }
            self.gw.changed();
        }
    }

    /// The routes a binding makes: one per endpoint of the release it runs. `None` when the release cannot be
    /// read (the binding is then retried) or the binding is malformed (it has no routes).
    async fn routes_of(&mut self, obj: &Resource) -> Option<(String, String, Vec<Arc<Route>>)> {
        let bkey = binding_key(obj);
        let spec: ReleaseBindingSpec = match model::typed_spec(obj) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(binding = %bkey, error = %e, "gateway: ignoring a malformed binding");
                if let Ok(mut t) = self.gw.table.write() {
                    t.remove(&bkey);
                }
                return None;
            }
        };
        let org = obj.metadata.organization.clone().unwrap_or_default();
        let project = obj.metadata.project.clone().unwrap_or_default();
        let status = &obj.status;
        // The release whose replicas `status.endpoints` lists; the spec's until the controller has reported.
        let release = status
            .get("release")
            .and_then(Value::as_str)
            .unwrap_or(&spec.release)
            .to_owned();
        let endpoints = match self.release_endpoints(&org, &project, &release).await {
            Ok(e) => e,
            Err(e) => {
                tracing::debug!(binding = %bkey, release, error = %e, "gateway: release not readable yet; retrying");
                self.pending.insert(bkey, obj.clone());
                return None;
            }
        };
        self.pending.remove(&bkey);
        let undeployed = spec.state == BindingState::Undeployed;
        let active = !undeployed && obj.metadata.deletion_timestamp.is_none();
        let ready = status
            .get("readyReplicas")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let total = status.get("replicas").and_then(Value::as_u64).unwrap_or(0);
        let message = obj
            .conditions()
            .into_iter()
            .find(|c| c.type_ == "Ready")
            .map(|c| c.message)
            .unwrap_or_else(|| "the binding has not been reconciled yet".into());
        let addrs = status.get("endpoints");
        let routes = endpoints
            .iter()
            .map(|ep| {
                let backends = if undeployed {
                    Vec::new()
                } else {
                    addrs
                        .and_then(|a| a.get(&ep.name))
                        .and_then(Value::as_array)
                        .map(|list| {
                            list.iter()
                                .filter_map(Value::as_str)
                                .filter_map(|s| s.parse::<SocketAddr>().ok())
                                .collect()
                        })
                        .unwrap_or_default()
                };
                Arc::new(Route {
                    org: org.clone(),
                    project: project.clone(),
                    env: spec.environment.clone(),
                    component: spec.component.clone(),
                    endpoint: ep.name.clone(),
                    visibility: ep.visibility,
                    protocol: ep.protocol,
                    path: ep.path.clone(),
                    port: ep.port,
                    active,
                    backends,
                    ready: if undeployed { 0 } else { ready },
                    total,
                    message: message.clone(),
                    next: AtomicUsize::new(0),
                })
            })
            .collect();
        let dkey = format!("{org}/{project}/{}/{}", spec.environment, spec.component);
        Some((bkey, dkey, routes))
    }

    async fn release_endpoints(
        &mut self,
        org: &str,
        project: &str,
        name: &str,
    ) -> Result<Arc<Vec<Endpoint>>, String> {
        let ck = format!("{org}/{project}/{name}");
        if let Some(e) = self.releases.get(&ck) {
            return Ok(e.clone());
        }
        let key = Key {
            kind: Kind::Release,
            organization: Some(org.to_owned()),
            project: Some(project.to_owned()),
            name: name.to_owned(),
        };
        let obj = self.store.get(&key).await.map_err(|e| e.to_string())?;
        let spec: ReleaseSpec = model::typed_spec(&obj).map_err(|e| e.to_string())?;
        if self.releases.len() >= RELEASE_CACHE_MAX {
            self.releases.clear();
        }
        let eps = Arc::new(spec.snapshot.endpoints);
        self.releases.insert(ck, eps.clone());
        Ok(eps)
    }
}

// ---- request routing ----

/// What a request addresses, when it is for the gateway.
pub(crate) enum Target {
    Host {
        project: String,
        env: String,
        component: String,
        endpoint: String,
    },
    /// A host under the base domain that looks like a gateway host but does not have four parts.
    BadHost(String),
    /// `/x/<org>/<project>/<env>/<component>/<endpoint>/<rest>`: the path's bytes `3..key_end` are the route key
    /// (`org/project/env/component/endpoint`), and what follows the `/` after it is the rest.
    Path { key_end: usize },
    /// `/x/…` with fewer than five names.
    BadPath,
    /// `/x/o/p/e/c/ep` without the trailing slash: redirect to it.
    Slash(String),
}

/// The name part of a gateway host (`ep--comp--proj--env`), if `host` is one under `base`.
fn gateway_label<'a>(host: &'a str, base: &str) -> Option<&'a str> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let cut = host.len().checked_sub(base.len() + 1)?;
    if !host.is_char_boundary(cut) || host.as_bytes()[cut] != b'.' {
        return None;
    }
    if !host[cut + 1..].eq_ignore_ascii_case(base) {
        return None;
    }
    let label = &host[..cut];
    (!label.contains('.') && label.contains("--")).then_some(label)
}

/// Whether `req` is for the gateway, and what it addresses. Allocates only for subdomain hosts.
pub(crate) fn target<B>(base: &str, req: &axum::http::Request<B>) -> Option<Target> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    target_of(base, host, req.uri().path(), req.uri().query())
}

/// [`target`] for a request with this `Host` header, path and query.
pub(crate) fn target_of(
    base: &str,
    host: Option<&str>,
    path: &str,
    query: Option<&str>,
) -> Option<Target> {
    if let Some(host) = host {
        if let Some(label) = gateway_label(host, base) {
            let label = label.to_ascii_lowercase();
            let parts: Vec<&str> = label.split("--").collect();
            return Some(match parts[..] {
                [endpoint, component, project, env] if parts.iter().all(|p| !p.is_empty()) => {
                    Target::Host {
                        project: project.to_owned(),
                        env: env.to_owned(),
                        component: component.to_owned(),
                        endpoint: endpoint.to_owned(),
                    }
                }
                _ => Target::BadHost(host.to_owned()),
            });
        }
    }
    let tail = path.strip_prefix("/x/")?;
    let mut it = tail.splitn(6, '/');
    let mut key_len = 0;
    for i in 0..5 {
        let name = it.next().unwrap_or("");
        if name.is_empty() {
            return Some(Target::BadPath);
        }
        key_len += name.len() + usize::from(i > 0);
    }
    Some(match it.next() {
        None => {
            let mut to = format!("{path}/");
            if let Some(q) = query {
                to.push('?');
                to.push_str(q);
            }
            Target::Slash(to)
        }
        Some(_) => Target::Path {
            key_end: "/x/".len() + key_len,
        },
    })
}

/// Answers a request [`target`] found to be for the gateway (the listener calls it ahead of the API router).
pub(crate) async fn handle(
    state: &AppState,
    target: Target,
    req: Request,
    peer: SocketAddr,
) -> Response {
    let resp = serve(state, target, req, peer).await;
    state.metrics.observe_gateway(resp.status().as_u16());
    resp
}

pub(crate) fn wants_html(headers: &HeaderMap) -> bool {
    accepts(headers, "text/html")
}

/// Whether the request's `Accept` names `media`.
pub(crate) fn accepts(headers: &HeaderMap, media: &str) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains(media))
}

fn path_form(org: &str, project: &str, env: &str, component: &str, endpoint: &str) -> String {
    format!("/x/{org}/{project}/{env}/{component}/{endpoint}/")
}

/// Joins an endpoint's base path and the rest of a request path (without its leading `/`).
fn join_path(base: &str, rest: &str, query: Option<&str>) -> String {
    let mut out = String::with_capacity(base.len() + rest.len() + 2 + query.map_or(0, str::len));
    if !base.starts_with('/') {
        out.push('/');
    }
    out.push_str(base);
    if !out.ends_with('/') {
        out.push('/');
    }
    out.push_str(rest);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

async fn serve(state: &AppState, target: Target, mut req: Request, peer: SocketAddr) -> Response {
    let html = wants_html(req.headers());
    let (path, query) = (req.uri().path(), req.uri().query());
    let found = match resolve(state, target, path, query, html) {
        Ok(r) => r,
        Err(page) => return *page,
    };
    let route = found.route;
    let backend_path = found.backend_path;
    let prefix = found.prefix.map(|p| HeaderValue::from_str(&p));
    if state.connections.any() {
        if let Some(laptop) = state.connections.pick(&route.key(), req.headers()) {
            let prefix = prefix.as_ref().and_then(|p| p.as_ref().ok().cloned());
            match to_laptop(&laptop, req, peer, &backend_path, prefix).await {
                Ok(resp) => return resp,
                Err((e, back)) => {
                    tracing::debug!(route = %route.key(), error = %e, "gateway: a serving laptop did not take a request");
                    let Some(back) = back else {
                        return page(StatusCode::BAD_GATEWAY, "Bad gateway", &[e], html);
                    };
                    req = back;
                }
            }
        }
        if route.backends.is_empty() {
            return no_ready_replica(&route, html);
        }
    }
    proxy(state, &route, req, peer, backend_path, prefix, html).await
}

/// Sends a gateway request to the laptop serving its route. When the laptop cannot be reached the request
/// comes back unsent, for a replica.
async fn to_laptop(
    laptop: &crate::connections::Intercept,
    req: Request,
    peer: SocketAddr,
    path: &str,
    prefix: Option<HeaderValue>,
) -> Result<Response, (String, Option<Request>)> {
    let stream = match laptop.open().await {
        Ok(s) => s,
        Err(e) => return Err((e, Some(req))),
    };
    let (out, client_upgrade) =
        outgoing(req, peer, path.to_string(), prefix).map_err(|e| (e, None))?;
    let resp = crate::connections::exchange(Box::new(stream), out)
        .await
        .map_err(|e| (e, None))?;
    let mut resp = crate::connections::finish(resp, client_upgrade);
    strip_set_cookies(resp.headers_mut(), &[crate::auth::SESSION_COOKIE]);
    Ok(resp)
}

/// Where a gateway request goes: the route, the backend's path and query, and (path form) the prefix stripped.
struct Resolved {
    route: Arc<Route>,
    backend_path: String,
    prefix: Option<String>,
}

/// Looks `target` up in the routing table. A request the gateway cannot forward gets the page that says why.
fn resolve(
    state: &AppState,
    target: Target,
    full: &str,
    query: Option<&str>,
    html: bool,
) -> Result<Resolved, Box<Response>> {
    let gw = &state.gateway;
    if !gw.is_loaded() {
        return Err(Box::new(page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The gateway is starting",
            &["The routing table has not loaded yet; try again in a moment.".into()],
            html,
        )));
    }
    let (route, backend_path, prefix) = match target {
        Target::Slash(to) => {
            return Err(Box::new(
                (
                    StatusCode::PERMANENT_REDIRECT,
                    [(header::LOCATION, to)],
                    "the endpoint's URL ends with a slash\n",
                )
                    .into_response(),
            ));
        }
        Target::BadPath => {
            return Err(Box::new(page(
                StatusCode::NOT_FOUND,
                "Not a gateway URL",
                &[
                    "Gateway URLs have the form /x/<organization>/<project>/<environment>/<component>/<endpoint>/."
                        .into(),
                ],
                html,
            )));
        }
        Target::BadHost(host) => {
            return Err(Box::new(page(
                StatusCode::NOT_FOUND,
                "Not a gateway host",
                &[format!(
                    "{host} is not of the form <endpoint>--<component>--<project>--<environment>.{}.",
                    state.config.base_domain
                )],
                html,
            )));
        }
        Target::Path { key_end } => {
            let key = &full[3..key_end];
            let found = gw.table.read().ok().map(|t| {
                t.routes.get(key).cloned().ok_or_else(|| {
                    // `org/project/env/component`: is the component deployed at all?
                    let component = key.rsplit_once('/').map_or(key, |(c, _)| c);
                    t.deployed.contains_key(component)
                })
            });
            let route = match found {
                Some(Ok(r)) => r,
                Some(Err(deployed)) => {
                    let n: Vec<&str> = key.split('/').collect();
                    return Err(Box::new(not_found(
                        n[0], n[1], n[2], n[3], n[4], deployed, html,
                    )));
                }
                None => return Err(Box::new(internal(html))),
            };
            let path = join_path(&route.path, &full[key_end + 1..], query);
            (route, path, Some(full[..key_end].to_owned()))
        }
        Target::Host {
            project,
            env,
            component,
            endpoint,
        } => {
            let hk = host_key(&project, &env, &component, &endpoint);
            // One organization has it (the usual case): that one. Several: the one where it is public, or none
            // and the request is ambiguous.
            let found = gw.table.read().ok().map(|t| {
                let orgs = t.hosts.get(&hk).map(Vec::as_slice).unwrap_or(&[]);
                let route = |o: &str| {
                    t.routes
                        .get(&route_key(o, &project, &env, &component, &endpoint))
                        .cloned()
                };
                match orgs.first() {
                    None => Err(Vec::new()),
                    Some(first) if orgs.iter().all(|o| o == first) => {
                        route(first).ok_or_else(Vec::new)
                    }
                    Some(first) => {
                        let mut public: Vec<String> = orgs
                            .iter()
                            .filter(|o| {
                                route(o).is_some_and(|r| r.visibility == Visibility::Public)
                            })
                            .cloned()
                            .collect();
                        public.sort();
                        public.dedup();
                        match public.len() {
                            0 => route(first).ok_or(public),
                            1 => route(&public[0]).ok_or(public),
                            _ => Err(public),
                        }
                    }
                }
            });
            let route = match found {
                Some(Ok(r)) => r,
                Some(Err(orgs)) if orgs.len() > 1 => {
                    let mut lines = vec![format!(
                        "Endpoint {endpoint} of component {component} in project {project}, environment {env} \
                         exists in {} organizations, and this host name does not say which. Use the path form:",
                        orgs.len()
                    )];
                    lines.extend(
                        orgs.iter()
                            .map(|o| path_form(o, &project, &env, &component, &endpoint)),
                    );
                    return Err(Box::new(page(
                        StatusCode::CONFLICT,
                        "Ambiguous URL",
                        &lines,
                        html,
                    )));
                }
                Some(Err(_)) => {
                    return Err(Box::new(page(
                        StatusCode::NOT_FOUND,
                        "No such endpoint",
                        &[format!(
                            "No component {component} with endpoint {endpoint} is deployed in environment {env} \
                             of project {project}."
                        )],
                        html,
                    )));
                }
                None => return Err(Box::new(internal(html))),
            };
            let rest = full.trim_start_matches('/');
            let path = join_path(&route.path, rest, query);
            (route, path, None)
        }
    };
    if route.visibility != Visibility::Public {
        return Err(Box::new(page(
            StatusCode::NOT_FOUND,
            "Endpoint not public",
            &[format!(
                "Endpoint {} of component {} in project {}, environment {} is not public (its visibility is {}); \
                 the gateway serves public endpoints only.",
                route.endpoint,
                route.component,
                route.project,
                route.env,
                match route.visibility {
                    Visibility::Project => "project",
                    Visibility::Organization => "organization",
                    Visibility::Public => "public",
                }
            )],
            html,
        )));
    }
    if !matches!(
        route.protocol,
        EndpointProtocol::Http | EndpointProtocol::WebSocket
    ) {
        return Err(Box::new(page(
            StatusCode::NOT_FOUND,
            "Endpoint not served by the gateway",
            &[format!(
                "Endpoint {} of component {} speaks a protocol the gateway does not proxy; it serves HTTP and \
                 WebSocket endpoints.",
                route.endpoint, route.component
            )],
            html,
        )));
    }
    if route.backends.is_empty() && !state.connections.intercepted(&route.key()) {
        return Err(Box::new(no_ready_replica(&route, html)));
    }
    Ok(Resolved {
        route,
        backend_path,
        prefix,
    })
}

fn no_ready_replica(route: &Route, html: bool) -> Response {
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        "No ready replica",
        &[
            format!(
                "{}/{} replicas of {} in {} are ready.",
                route.ready, route.total, route.component, route.env
            ),
            route.message.clone(),
        ],
        html,
    )
}

fn not_found(
    org: &str,
    project: &str,
    env: &str,
    component: &str,
    endpoint: &str,
    deployed: bool,
    html: bool,
) -> Response {
    let detail = if deployed {
        format!(
            "Component {component} in project {project} of organization {org} runs in environment {env}, but has no \
             endpoint named {endpoint}."
        )
    } else {
        format!(
            "No component {component} of project {project} in organization {org} is deployed in environment {env} \
             (looked up endpoint {endpoint})."
        )
    };
    page(StatusCode::NOT_FOUND, "No such endpoint", &[detail], html)
}

fn internal(html: bool) -> Response {
    page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Gateway error",
        &["The routing table is unavailable.".into()],
        html,
    )
}

/// An error page: HTML for browsers, plain text otherwise.
pub(crate) fn page(status: StatusCode, title: &str, lines: &[String], html: bool) -> Response {
    let (ctype, body) = page_text(status, title, lines, html);
    (
        status,
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(ctype)),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response()
}

/// An error page's content type and text.
fn page_text(
    status: StatusCode,
    title: &str,
    lines: &[String],
    html: bool,
) -> (&'static str, String) {
    let lines = lines.iter().filter(|l| !l.is_empty());
    if html {
        let mut b = format!(
            "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{} {}</title>\
             <style>body{{font-family:system-ui,sans-serif;max-width:44rem;margin:4rem auto;padding:0 1rem;\
             color:#222}}h1{{font-size:1.4rem}}code{{background:#f3f3f3;padding:0 .2rem}}\
             .muted{{color:#888;font-size:.85rem}}</style></head><body><h1>{}</h1>\n",
            status.as_u16(),
            esc(title),
            esc(title)
        );
        for l in lines {
            let _ = writeln!(b, "<p>{}</p>", esc(l));
        }
        let _ = writeln!(b, "<p class=\"muted\">{status} · Kiln</p></body></html>");
        ("text/html; charset=utf-8", b)
    } else {
        let mut b = format!("{title}\n");
        for l in lines {
            b.push_str(l);
            b.push('\n');
        }
        ("text/plain; charset=utf-8", b)
    }
}

// ---- proxying ----

/// Whether the request asks to switch protocols (`Connection: upgrade` with an `Upgrade` header).
pub(crate) fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

/// Keeps Kiln's cookies (`names`) away from workloads: they are removed from what is forwarded (a workload
/// served under the server's own origin would otherwise receive the console's session).
pub(crate) fn strip_cookies(h: &mut HeaderMap, names: &[&str]) {
    let ours = |c: &str| {
        let k = c.split_once('=').map_or(c, |(k, _)| k).trim();
        names.contains(&k)
    };
    let has = |v: &HeaderValue| v.to_str().is_ok_and(|s| s.split(';').any(ours));
    if !h.get_all(header::COOKIE).iter().any(has) {
        return;
    }
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !ours(c))
        .map(str::to_owned)
        .collect();
    h.remove(header::COOKIE);
    if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
        if !kept.is_empty() {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Removes `Set-Cookie` headers that would set one of Kiln's cookies (`names`); an unreadable one goes too.
pub(crate) fn strip_set_cookies(h: &mut HeaderMap, names: &[&str]) {
    let sets = |v: &HeaderValue| {
        v.to_str().map_or(true, |s| {
            s.split_once('=')
                .is_some_and(|(k, _)| names.contains(&k.trim()))
        })
    };
    if !h.get_all(header::SET_COOKIE).iter().any(sets) {
        return;
    }
    let kept: Vec<HeaderValue> = h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !sets(v))
        .cloned()
        .collect();
    h.remove(header::SET_COOKIE);
    for v in kept {
        h.append(header::SET_COOKIE, v);
    }
}

fn connection_close(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
    })
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): the fixed ones and those `Connection` names.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
    for n in [
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
}

async fn proxy(
    state: &AppState,
    route: &Route,
    req: Request,
    peer: SocketAddr,
    path: String,
    prefix: Option<Result<HeaderValue, InvalidHeaderValue>>,
    html: bool,
) -> Response {
    let upgrade = is_upgrade(req.headers());
    let (mut out, client_upgrade) = match outgoing(req, peer, path, prefix.and_then(Result::ok)) {
        Ok(o) => o,
        Err(e) => return page(StatusCode::BAD_REQUEST, "Bad request", &[e], html),
    };
    let no_host = !out.headers().contains_key(header::HOST);

    let n = route.backends.len();
    let first = route.next.fetch_add(1, Ordering::Relaxed) % n;
    let attempts = n.min(2);
    let mut failures = Vec::new();
    for i in 0..attempts {
        let addr = route.backends[(first + i) % n];
        if no_host {
            if let Ok(v) = HeaderValue::from_str(&addr.to_string()) {
                out.headers_mut().insert(header::HOST, v);
            }
        }
        match state.gateway.pool.send(addr, out, upgrade).await {
            Ok((resp, conn)) => {
                return respond(&state.gateway.pool, resp, conn, addr, client_upgrade);
            }
            Err(SendError::Connect(back, e)) => {
                failures.push(connect_error(state, addr, &e));
                out = *back;
            }
            Err(SendError::Failed(e)) => {
                upstream_error(state);
                tracing::debug!(backend = %addr, error = %e, "gateway: backend exchange failed");
                return page(
                    StatusCode::BAD_GATEWAY,
                    "Bad gateway",
                    &exchange_failed(route, addr, e),
                    html,
                );
            }
        }
    }
    page(
        StatusCode::BAD_GATEWAY,
        "Bad gateway",
        &connect_failed(route, failures),
        html,
    )
}

/// Counts and logs a backend that could not be reached; the line for the 502 page, should no replica be.
fn connect_error(state: &AppState, addr: SocketAddr, e: &str) -> String {
    upstream_error(state);
    tracing::debug!(backend = %addr, error = %e, "gateway: cannot connect to backend");
    format!("{addr}: {e}")
}

/// Counts a backend failure (`kiln_gateway_upstream_errors_total`).
fn upstream_error(state: &AppState) {
    state
        .metrics
        .gateway_upstream_errors
        .fetch_add(1, Ordering::Relaxed);
}

/// A client's request as a proxy sends it on: `path` as its target, HTTP/1.1, the headers
/// [`forwarded_headers`] makes; and, for an upgrade, the client side of it.
fn outgoing(
    mut req: Request,
    peer: SocketAddr,
    path: String,
    prefix: Option<HeaderValue>,
) -> Result<(Request, Option<hyper::upgrade::OnUpgrade>), String> {
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let headers = forwarded_headers(
        parts.headers,
        upgrade,
        peer,
        prefix,
        &[crate::auth::SESSION_COOKIE],
    );
    let mut out = axum::http::Request::builder()
        .method(parts.method)
        .uri(path)
        .version(Version::HTTP_11)
        .body(body)
        .map_err(|e| format!("the request cannot be forwarded: {e}"))?;
    *out.headers_mut() = headers;
    Ok((out, client_upgrade))
}

/// The 502 page's lines when no replica could be reached (`failures`: one line per replica tried).
fn connect_failed(route: &Route, failures: Vec<String>) -> Vec<String> {
    let mut lines = vec![format!(
        "Could not connect to {} of the {} ready replicas of {} in {}.",
        if failures.len() == 1 {
            "the one"
        } else {
            "two"
        },
        route.backends.len(),
        route.component,
        route.env
    )];
    lines.extend(failures);
    lines
}

/// The 502 page's lines when replica `addr` failed during the exchange.
fn exchange_failed(route: &Route, addr: SocketAddr, e: String) -> Vec<String> {
    vec![
        format!(
            "Replica {addr} of {} in {} failed while answering.",
            route.component, route.env
        ),
        e,
    ]
}

/// What a proxy forwards of a client's request headers: hop-by-hop headers and Kiln's `cookies` removed (an
/// upgrade's `Connection` and `Upgrade` kept), `X-Forwarded-For`, `-Host` and `-Proto` added, and
/// `X-Forwarded-Prefix` set to `prefix` or removed.
pub(crate) fn forwarded_headers(
    mut headers: HeaderMap,
    upgrade: bool,
    peer: SocketAddr,
    prefix: Option<HeaderValue>,
    cookies: &[&str],
) -> HeaderMap {
    let upgrade_proto = headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut headers);
    strip_cookies(&mut headers, cookies);
    if let (true, Some(proto)) = (upgrade, upgrade_proto) {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, proto);
    }
    let ip = peer.ip();
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if let Some(host) = headers.get(header::HOST).cloned() {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    match prefix {
        Some(p) => headers.insert(X_FORWARDED_PREFIX.clone(), p),
        None => headers.remove(&X_FORWARDED_PREFIX),
    };
    headers
}

/// The answer to a backend's `101 Switching Protocols`: its head without hop-by-hop headers (the upgrade
/// kept), and, once both the client and the backend have switched, `splice` run on the two connections.
pub(crate) fn switching_protocols<F, Fut>(
    mut resp: axum::http::Response<Incoming>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    splice: F,
) -> Response
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>, TokioIo<hyper::upgrade::Upgraded>) -> Fut
        + Send
        + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let backend_upgrade = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    let proto = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(p) = proto {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, p);
    }
    if let Some(client_upgrade) = client_upgrade {
        tokio::spawn(async move {
            match tokio::join!(client_upgrade, backend_upgrade) {
                (Ok(c), Ok(b)) => splice(TokioIo::new(c), TokioIo::new(b)).await,
                (c, b) => tracing::debug!(
                    client = c.is_ok(),
                    backend = b.is_ok(),
                    "proxy: upgrade did not complete"
                ),
            }
        });
    }
    Response::from_parts(parts, Body::empty())
}

/// The backend's response, passed on: hop-by-hop headers removed, the body streamed (and the connection
/// returned to the pool when it ends), or for `101 Switching Protocols` both connections spliced together.
fn respond(
    pool: &Arc<Pool>,
    resp: axum::http::Response<Incoming>,
    upstream: Option<Upstream>,
    addr: SocketAddr,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Response {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        return switching_protocols(resp, client_upgrade, |mut client, mut backend| async move {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
        });
    }
    let (mut parts, body) = resp.into_parts();
    let keep = !connection_close(&parts.headers);
    strip_hop_by_hop(&mut parts.headers);
    strip_set_cookies(&mut parts.headers, &[crate::auth::SESSION_COOKIE]);
    let body = PooledBody {
        inner: body,
        upstream,
        keep: keep.then(|| (addr, pool.clone())),
    };
    Response::from_parts(parts, Body::new(body))
}

enum SendError {
    /// No connection could be made; the request was not sent and comes back for another backend.
    Connect(Box<axum::http::Request<Body>>, String),
    /// The request was (perhaps partly) sent and the exchange failed.
    Failed(String),
}

type Connection = http1::Connection<TokioIo<TcpStream>, Body>;

/// An HTTP/1 connection to a backend whose I/O is driven by the task using it: the request's own task while
/// it sends the request and streams the response body, nobody while it sits idle in the pool. One task per
/// proxied exchange instead of a driver task beside it saves a cross-task wake-up at every step.
struct Upstream {
    send: http1::SendRequest<Body>,
    /// `None` once the connection has ended.
    conn: Option<Connection>,
    /// When it went back to the pool.
    idle_since: Instant,
}

impl Upstream {
    /// Moves the connection's I/O along; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(conn) = self.conn.as_mut() {
            if let Poll::Ready(r) = Pin::new(conn).poll(cx) {
                if let Err(e) = r {
                    tracing::trace!(error = %e, "gateway: backend connection ended");
                }
                self.conn = None;
            }
        }
        self.conn.is_some()
    }

    /// Waits until the connection can take a request; false if it has closed.
    async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            let alive = self.drive(cx);
            match self.send.poll_ready(cx) {
                Poll::Ready(r) => Poll::Ready(r.is_ok()),
                Poll::Pending if alive => Poll::Pending,
                Poll::Pending => Poll::Ready(false),
            }
        })
        .await
    }

    /// Sends `req` and waits for the response's head, driving the connection meanwhile.
    async fn exchange(
        &mut self,
        req: axum::http::Request<Body>,
    ) -> Result<axum::http::Response<Incoming>, TrySendError<axum::http::Request<Body>>> {
        let mut response = std::pin::pin!(self.send.try_send_request(req));
        std::future::poll_fn(|cx| {
            self.drive(cx);
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// Idle HTTP/1 connections to backends, by address.
#[derive(Default)]
struct Pool {
    idle: Mutex<HashMap<SocketAddr, Vec<Upstream>>>,
}

impl Pool {
    fn take(&self, addr: SocketAddr) -> Option<Upstream> {
        self.idle.lock().ok()?.get_mut(&addr)?.pop()
    }

    fn put(&self, addr: SocketAddr, mut up: Upstream) {
        if up.conn.is_none() || up.send.is_closed() {
            return;
        }
        up.idle_since = Instant::now();
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry(addr).or_default();
            if list.len() < MAX_IDLE_PER_BACKEND {
                list.push(up);
            }
        }
    }

    /// Closes connections idle for longer than `max_idle` and those the backend has closed (nothing reads an
    /// idle connection, so a backend that went away would otherwise leave its sockets open here).
    fn sweep(&self, max_idle: Duration) {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let Ok(mut idle) = self.idle.lock() else {
            return;
        };
        idle.retain(|_, list| {
            list.retain_mut(|up| up.idle_since.elapsed() < max_idle && up.drive(&mut cx));
            !list.is_empty()
        });
    }

    /// Sends `req` to `addr` over an idle connection, or a new one. Upgrade requests always get a connection
    /// of their own, driven by a task of its own and never pooled.
    async fn send(
        &self,
        addr: SocketAddr,
        mut req: axum::http::Request<Body>,
        upgrade: bool,
    ) -> Result<(axum::http::Response<Incoming>, Option<Upstream>), SendError> {
        if !upgrade {
            while let Some(mut up) = self.take(addr) {
                if !up.ready().await {
                    continue;
                }
                match up.exchange(req).await {
                    Ok(resp) => return Ok((resp, Some(up))),
                    Err(mut e) => match e.take_message() {
                        // Never written: the connection had closed. Try another.
                        Some(r) => req = r,
                        None => return Err(SendError::Failed(e.into_error().to_string())),
                    },
                }
            }
        }
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(Box::new(req), e.to_string())),
            Err(_) => {
                return Err(SendError::Connect(
                    Box::new(req),
                    format!("no connection within {}s", CONNECT_TIMEOUT.as_secs()),
                ))
            }
        };
        let _ = stream.set_nodelay(true);
        let (mut send, conn) = match http1::handshake(TokioIo::new(stream)).await {
            Ok(x) => x,
            Err(e) => return Err(SendError::Connect(Box::new(req), e.to_string())),
        };
        if upgrade {
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
            });
            return match send.send_request(req).await {
                Ok(resp) => Ok((resp, None)),
                Err(e) => Err(SendError::Failed(e.to_string())),
            };
        }
        let mut up = Upstream {
            send,
            conn: Some(conn),
            idle_since: Instant::now(),
        };
        match up.exchange(req).await {
            Ok(resp) => Ok((resp, Some(up))),
            Err(e) => Err(SendError::Failed(e.into_error().to_string())),
        }
    }
}

/// A backend's response body. Reading it drives the backend connection; once it has been read to the end the
/// connection goes back to the pool (unless the backend asked to close it).
struct PooledBody {
    inner: Incoming,
    upstream: Option<Upstream>,
    /// Where the connection goes back to, if it may be reused.
    keep: Option<(SocketAddr, Arc<Pool>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let (Some(up), Some((addr, pool))) = (self.upstream.take(), self.keep.take()) {
            pool.put(addr, up);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(up) = this.upstream.as_mut() {
            up.drive(cx);
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release(),
            Poll::Ready(Some(Err(_))) => this.upstream = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_hosts() {
        assert_eq!(
            gateway_label("web--web--shop--dev.localhost:7080", "localhost"),
            Some("web--web--shop--dev")
        );
        assert_eq!(
            gateway_label("WEB--web--shop--dev.LocalHost", "localhost"),
            Some("WEB--web--shop--dev")
        );
        assert_eq!(
            gateway_label("a--b--c--d.apps.example.com", "apps.example.com"),
            Some("a--b--c--d")
        );
        assert_eq!(gateway_label("localhost:7080", "localhost"), None);
        assert_eq!(gateway_label("www.localhost", "localhost"), None);
        assert_eq!(gateway_label("a--b.x.localhost", "localhost"), None);
        assert_eq!(gateway_label("a--b--c--dlocalhost", "localhost"), None);
        assert_eq!(gateway_label("[::1]:7080", "localhost"), None);
    }

    #[test]
    fn paths_join() {
        assert_eq!(join_path("/", "a/b", Some("x=1")), "/a/b?x=1");
        assert_eq!(join_path("/api", "", None), "/api/");
        assert_eq!(join_path("/api/", "v1", None), "/api/v1");
        assert_eq!(join_path("api", "v1", None), "/api/v1");
    }

    #[test]
    fn the_console_session_stays_with_the_server() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; kiln_session=secret"),
        );
        h.append(header::COOKIE, HeaderValue::from_static("kiln_session_x=2"));
        strip_cookies(&mut h, &[crate::auth::SESSION_COOKIE]);
        assert_eq!(h[header::COOKIE], "a=1; kiln_session_x=2");
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("kiln_session=secret"),
        );
        strip_cookies(&mut h, &[crate::auth::SESSION_COOKIE]);
        assert!(!h.contains_key(header::COOKIE));
        let mut h = HeaderMap::new();
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("kiln_session=evil; Path=/"),
        );
        h.append(
            header::SET_COOKIE,
            HeaderValue::from_static("app=1; Path=/"),
        );
        strip_set_cookies(&mut h, &[crate::auth::SESSION_COOKIE]);
        assert_eq!(
            h.get_all(header::SET_COOKIE).iter().collect::<Vec<_>>(),
            ["app=1; Path=/"]
        );
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ACCEPT));
    }
}
