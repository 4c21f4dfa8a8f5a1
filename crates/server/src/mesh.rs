//! The mesh: the addresses consumers reach their dependencies at.
//!
//! For each declared dependency of a running consumer (`{component, endpoint, project}` in its release), the
//! ReleaseBinding controller asks the mesh (through [`controllers::Mesh`]) for an address, injects it as
//! `<NAME>_URL`/`_HOST`/`_PORT`, and records it in the consumer binding's `status.dependencies`. The mesh owns one
//! TCP listener per (consumer workload, dependency), bound on the address where the consumer's replicas reach the
//! server's host — loopback for the process data plane; for docker, the gateway of the consumer's
//! project-environment network, accepting only peers on that network (a container of another network could
//! otherwise reach the host's address on this one) — on the port recorded before a restart when that port is
//! still free. Each accepted connection is
//! forwarded at layer 4 — bytes both ways, so HTTP, gRPC and WebSocket all pass — to a ready replica of the
//! dependency's binding in the consumer's environment, round-robin, trying the next replica when one refuses.
//! While a laptop serves the dependency (see [`crate::connections`]), connections are carried by its routing
//! instead: by request to the laptop or a replica.
//!
//! Backends come from an in-memory table kept by [`spawn_table`] from a list+watch of ReleaseBindings
//! (`status.endpoints`, written by the controller from what the data plane reports); a connection costs no store
//! query. Since the address is fixed while the table changes, a dependency can move (new replicas, a new release)
//! without the consumer restarting.
//!
//! A route the controller did not allow (the dependency does not exist or its visibility does not admit the
//! consumer) accepts connections and closes them at once. An allowed route with no ready replica holds the
//! connection for up to [`WAIT_FOR_BACKEND`], retrying, then closes it — so a consumer that starts before its
//! dependency is ready sees a slow connection rather than an immediate failure.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use controllers::{MeshRoute, MeshTarget};

use crate::connections::{self, Connections};
use dataplane::{HostAddress, WorkloadId};
use model::kinds::{BindingState, ReleaseBindingSpec};
use model::{Kind, Resource};
use serde_json::Value;
use store::{EventType, ListQuery, Store, StoreError, WatchQuery};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long connecting to one replica may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a connection to an allowed dependency without a ready replica is held while waiting for one.
pub const WAIT_FOR_BACKEND: Duration = Duration::from_secs(5);

/// The dependency addresses of one server. Cheap to clone (shared).
#[derive(Clone)]
pub struct Mesh {
    inner: Arc<Inner>,
}

struct Inner {
    host: IpAddr,
    /// `org/project/env/component` → endpoint → ready replica addresses.
    backends: RwLock<HashMap<String, BTreeMap<String, Vec<SocketAddr>>>>,
    loaded: AtomicBool,
    /// Consumer workload → dependency name → its listener.
    listeners: Mutex<HashMap<WorkloadId, HashMap<String, Listener>>>,
    /// The serves that may take a dependency's traffic.
    connections: Option<Arc<Connections>>,
}

/// What a listener forwards to, updated in place by the controller.
struct RouteState {
    target: MeshTarget,
    allowed: bool,
    /// Connections from outside this network are closed at once (`None`: the host's loopback, where any local
    /// process can connect anyway).
    network: Option<HostAddress>,
}

struct Listener {
    addr: SocketAddr,
    state: Arc<RwLock<RouteState>>,
    task: JoinHandle<()>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn target_key(t: &MeshTarget) -> String {
    format!(
        "{}/{}/{}/{}",
        t.organization, t.project, t.environment, t.component
    )
}

/// The key a target's intercepts are kept under (see [`connections::route_key`]).
fn intercept_key(t: &MeshTarget) -> String {
    connections::route_key(
        &t.organization,
        &t.project,
        &t.environment,
        &t.component,
        &t.endpoint,
    )
}

impl Mesh {
    /// A mesh whose listeners bind on `host`.
    pub fn new(host: IpAddr) -> Self {
        Mesh {
            inner: Arc::new(Inner {
                host,
                backends: RwLock::default(),
                loaded: AtomicBool::new(false),
                listeners: Mutex::default(),
                connections: None,
            }),
        }
    }

    /// The same mesh, routing by the serves of connected laptops.
    pub fn with_connections(self, connections: Arc<Connections>) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|_| {
            panic!("Mesh::with_connections is called before the mesh is shared")
        });
        inner.connections = Some(connections);
        Mesh {
            inner: Arc::new(inner),
        }
    }

    /// Whether the backend table has been loaded once.
    pub fn is_loaded(&self) -> bool {
        self.inner.loaded.load(Ordering::Acquire)
    }

    /// How many dependency addresses are served.
    pub fn listeners(&self) -> usize {
        self.inner
            .listeners
            .lock()
            .map(|l| l.values().map(HashMap::len).sum())
            .unwrap_or(0)
    }

    /// The ready replicas of a target, as the table has them now.
    pub fn backends(&self, target: &MeshTarget) -> Vec<SocketAddr> {
        self.inner.backends_of(target)
    }

    /// Closes every listener (on shutdown).
    pub fn close_all(&self) {
        if let Ok(mut l) = self.inner.listeners.lock() {
            l.clear();
        }
    }
}

impl Inner {
    fn backends_of(&self, target: &MeshTarget) -> Vec<SocketAddr> {
        self.backends
            .read()
            .ok()
            .and_then(|b| {
                b.get(&target_key(target))
                    .and_then(|eps| eps.get(&target.endpoint))
                    .cloned()
            })
            .unwrap_or_default()
    }
}

/// Binds a listener on `host`: on `preferred`'s port when it is on `host` and free, else on a new port. Address
/// reuse is on, so a port whose old connections linger in TIME_WAIT (a restarted server) can be bound again.
fn bind(host: IpAddr, preferred: Option<SocketAddr>) -> std::io::Result<TcpListener> {
    let on = |addr: SocketAddr| -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(1024)
    };
    if let Some(p) = preferred.filter(|p| p.ip() == host && p.port() != 0) {
        match on(p) {
            Ok(l) => return Ok(l),
            Err(e) => {
                tracing::info!(address = %p, error = %e, "mesh: the recorded dependency address is taken; assigning another")
            }
        }
    }
    on(SocketAddr::new(host, 0))
}

impl controllers::Mesh for Mesh {
    fn listen(
        &self,
        route: &MeshRoute,
        preferred: Option<SocketAddr>,
    ) -> Result<SocketAddr, String> {
        let host = route.host.map_or(self.inner.host, |h| h.ip);
        let mut all = self.inner.listeners.lock().map_err(|e| e.to_string())?;
        let mine = all.entry(route.consumer.clone()).or_default();
        match mine.get(&route.dependency) {
            Some(l) if l.addr.ip() == host => {
                if let Ok(mut s) = l.state.write() {
                    s.target = route.target.clone();
                    s.allowed = route.allowed;
                    s.network = route.host;
                }
                return Ok(l.addr);
            }
            // The consumer's host address changed (its docker network was re-created): serve on the new one.
            Some(_) => {
                mine.remove(&route.dependency);
            }
            None => {}
        }
        let listener = bind(host, preferred).map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let state = Arc::new(RwLock::new(RouteState {
            target: route.target.clone(),
            allowed: route.allowed,
            network: route.host,
        }));
        let task = tokio::spawn(accept(listener, state.clone(), self.inner.clone()));
        tracing::debug!(consumer = %route.consumer, dependency = %route.dependency, %addr, "mesh: serving a dependency");
        mine.insert(route.dependency.clone(), Listener { addr, state, task });
        Ok(addr)
    }

    fn retain(&self, consumer: &WorkloadId, keep: &[String]) {
        let Ok(mut all) = self.inner.listeners.lock() else {
            return;
        };
        if let Some(mine) = all.get_mut(consumer) {
            mine.retain(|name, _| keep.contains(name));
            if mine.is_empty() {
                all.remove(consumer);
            }
        }
    }
}

async fn accept(listener: TcpListener, state: Arc<RwLock<RouteState>>, inner: Arc<Inner>) {
    let next = Arc::new(AtomicUsize::new(0));
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "mesh: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (target, allowed) = match state.read() {
            Ok(s) => (
                s.target.clone(),
                s.allowed && s.network.is_none_or(|n| n.admits(peer.ip())),
            ),
            Err(_) => continue,
        };
        if !allowed {
            drop(conn);
            continue;
        }
        // Only while some laptop serves anything is the route looked up (no key is built otherwise).
        if let Some(c) = inner.connections.as_ref().filter(|c| c.any()) {
            let key = intercept_key(&target);
            if c.intercepted(&key) {
                let (c, me) = (c.clone(), inner.clone());
                let backends: connections::Backends = Arc::new(move || me.backends_of(&target));
                let _ = conn.set_nodelay(true);
                tokio::spawn(connections::carry(c, conn, key, peer, backends));
                continue;
            }
        }
        tokio::spawn(forward(conn, target, inner.clone(), next.clone()));
    }
}

/// Forwards one connection to a ready replica of `target`, round-robin, trying each replica once; waits up to
/// [`WAIT_FOR_BACKEND`] for one to be ready.
async fn forward(
    mut conn: TcpStream,
    target: MeshTarget,
    inner: Arc<Inner>,
    next: Arc<AtomicUsize>,
) {
    let deadline = Instant::now() + WAIT_FOR_BACKEND;
    loop {
        let backends = inner.backends_of(&target);
        if !backends.is_empty() {
            let start = next.fetch_add(1, Ordering::Relaxed);
            for i in 0..backends.len() {
                let addr = backends[(start + i) % backends.len()];
                if let Ok(Ok(mut upstream)) =
                    tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await
                {
                    let _ = conn.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    let relay = tokio::io::copy_bidirectional(&mut conn, &mut upstream);
                    match inner.connections.as_ref() {
                        // A serve starting ends the relay, so the consumer's next connection is routed by it.
                        Some(c) => {
                            let key = intercept_key(&target);
                            tokio::select! {
                                _ = relay => {}
                                _ = c.until_intercepted(&key) => {}
                            }
                        }
                        None => {
                            let _ = relay.await;
                        }
                    }
                    return;
                }
            }
        }
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps the mesh's backend table from a list+watch of ReleaseBindings until `shutdown`, then closes every
/// listener.
pub fn spawn_table(
    mesh: Mesh,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            if *shutdown.borrow() {
                break;
            }
            match follow(&mesh, &store, &mut shutdown).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "mesh: following release bindings failed; re-listing");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|s| *s) => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        mesh.close_all();
    })
}

/// `(target key, endpoint → ready addresses)` of a binding; `None` when it is malformed.
fn entry(obj: &Resource) -> Option<(String, BTreeMap<String, Vec<SocketAddr>>)> {
    let spec: ReleaseBindingSpec = model::typed_spec(obj).ok()?;
    let key = format!(
        "{}/{}/{}/{}",
        obj.metadata.organization.as_deref().unwrap_or(""),
        obj.metadata.project.as_deref().unwrap_or(""),
        spec.environment,
        spec.component
    );
    let mut eps = BTreeMap::new();
    if spec.state != BindingState::Undeployed && obj.metadata.deletion_timestamp.is_none() {
        if let Some(Value::Object(map)) = obj.status.get("endpoints") {
            for (name, list) in map {
                let addrs: Vec<SocketAddr> = list
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .filter_map(|s| s.parse().ok())
                    .collect();
                eps.insert(name.clone(), addrs);
            }
        }
    }
    Some((key, eps))
}

async fn follow(
    mesh: &Mesh,
    store: &Store,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), StoreError> {
    let mut q = ListQuery {
        kind: Some(Kind::ReleaseBinding),
        ..Default::default()
    };
    let mut table = HashMap::new();
    let mut revision = None;
    loop {
        let page = store.list(&q).await?;
        revision.get_or_insert(page.revision);
        for obj in &page.items {
            if let Some((k, eps)) = entry(obj) {
                table.insert(k, eps);
            }
        }
        match page.continue_token {
            Some(t) => q.continue_token = Some(t),
            None => break,
        }
    }
    if let Ok(mut b) = mesh.inner.backends.write() {
        *b = table;
    }
    mesh.inner.loaded.store(true, Ordering::Release);
    let mut events = store
        .watch(&WatchQuery {
            kind: Some(Kind::ReleaseBinding),
            from_revision: revision,
            ..Default::default()
        })
        .await?;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return Ok(()),
            ev = events.next_event() => match ev {
                Some(Ok(ev)) => {
                    let Some((k, eps)) = entry(&ev.object) else { continue };
                    if let Ok(mut b) = mesh.inner.backends.write() {
                        if ev.type_ == EventType::Deleted {
                            b.remove(&k);
                        } else {
                            b.insert(k, eps);
                        }
                    }
                }
                Some(Err(e)) => return Err(e),
                None => return Err(StoreError::Backend("the watch ended".into())),
            },
        }
    }
}
