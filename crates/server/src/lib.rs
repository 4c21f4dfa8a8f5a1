//! Kiln's HTTP server: the REST API under `/api/v1`, authentication, RBAC, audit, health and metrics, the
//! console pages, and the wiring of store and controllers into one process.
//!
//! Architecture invariants:
//! - [`app`] builds the whole router from state alone, so handlers are tested with `oneshot`, no socket needed.
//! - Every API route is registered through [`routes::Api::op`], which also documents it: the OpenAPI document
//!   cannot drift from the router.
//! - Handlers check access before they read: a caller never learns of objects in organizations they cannot see.

mod audit;
pub mod auth;
pub mod bootstrap;
pub mod connections;
mod console;
mod ctrl;
mod delivery;
pub mod error;
pub mod gateway;
mod identity_api;
mod keys;
pub mod listen;
mod logfollow;
mod logs;
pub mod mesh;
mod metrics;
pub mod pipelines;
mod quota;
pub mod rbac;
pub mod resources;
pub mod routes;
pub mod runners;
mod schemas;
pub mod secrets;
pub mod triggers;
pub mod workspaces;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::State;
use axum::http::{header, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde_json::Value;
use store::Store;
use tokio::sync::watch;

pub use error::{ApiError, Problem};
pub use identity_api::parse_duration;
use routes::{Api, Op};

/// Server settings, from flags and environment.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `postgres://…` to use PostgreSQL; `None` for SQLite in the data directory.
    pub database_url: Option<String>,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long SIGTERM waits for in-flight requests before exiting anyway.
    pub drain_timeout: Duration,
    /// The domain under which the gateway's host names live (`<endpoint>--<component>--<project>--<env>.<base>`).
    pub base_domain: String,
    /// Serve `process` and `docker` DataPlanes with the no-op driver, which runs nothing and reports every
    /// replica ready. For measuring the control plane alone (benchmarks); never for serving anything.
    pub noop_data_planes: bool,
    /// The URL workspace agents dial to reach this server (default: `http://` + the listen address, with
    /// 127.0.0.1 for an unspecified address).
    pub access_url: Option<String>,
    /// The program and arguments the process provider runs as a workspace's agent (default: this executable
    /// with `agent`).
    pub agent_command: Option<Vec<String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7080)),
            data_dir: PathBuf::from(".kiln"),
            database_url: None,
            max_body_bytes: 1 << 20,
            drain_timeout: Duration::from_secs(30),
            base_domain: "localhost".into(),
            noop_data_planes: false,
            access_url: None,
            agent_command: None,
        }
    }
}

/// Shared by every handler. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub config: Arc<Config>,
    metrics: Arc<metrics::Metrics>,
    /// Flips to `true` when the server starts draining; long-lived streams end on it.
    pub shutdown: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
    openapi: Arc<OnceLock<Value>>,
    /// Token ids used since the last flush, with when; written to the store in batches.
    token_uses: Arc<Mutex<HashMap<String, jiff::Timestamp>>>,
    dummy_hash: Arc<OnceLock<String>>,
    controllers: Arc<Mutex<Option<ctrl::Handle>>>,
    /// Callers' access per organization (see [`rbac::AccessCache`]).
    pub access: Arc<rbac::AccessCache>,
    /// The gateway's routing table and backend connections (see [`gateway`]).
    gateway: Arc<gateway::Gateway>,
    /// The data plane drivers the controllers deploy with; component logs are read from them.
    pub(crate) drivers: controllers::Drivers,
    /// Connected workspace agents.
    pub hub: Arc<workspaces::Hub>,
    /// Connected laptop daemons and the intercepts of their serves (see [`connections`]).
    pub connections: Arc<connections::Connections>,
    /// Provisioners asking for workspace builds.
    pub provisioners: controllers::jobs::Provisioners,
    /// Wakes the built-in runner when a pipeline run is queued.
    pub runs: runners::RunQueue,
    /// Seals and opens Secret values (see [`secrets`]).
    pub sealer: Arc<secrets::Sealer>,
    /// The URL browsers and agents reach this server at, once it is listening (see [`access_url`]).
    bound_url: Arc<OnceLock<String>>,
}

impl AppState {
    pub fn new(store: Store, config: Config, shutdown: watch::Receiver<bool>) -> Self {
        AppState {
            store,
            config: Arc::new(config),
            metrics: Arc::default(),
            shutdown,
            ready: Arc::default(),
            openapi: Arc::default(),
            token_uses: Arc::default(),
            dummy_hash: Arc::default(),
            controllers: Arc::default(),
            access: Arc::default(),
            gateway: Arc::default(),
            drivers: controllers::Drivers::default(),
            hub: Arc::default(),
            connections: Arc::default(),
            provisioners: Default::default(),
            runs: Default::default(),
            bound_url: Arc::default(),
            sealer: Arc::new(secrets::Sealer::ephemeral()),
        }
    }

    /// The URL this server is reached at: the access URL, or the listen address once bound.
    pub fn public_url(&self) -> String {
        match self.bound_url.get() {
            Some(u) => u.clone(),
            None => access_url(&self.config, self.config.listen),
        }
    }

    /// The same state, with the configured key for Secret values ([`secrets::Sealer::load`]); until then a
    /// key of this process only seals them.
    pub fn with_sealer(mut self, sealer: secrets::Sealer) -> Self {
        self.sealer = Arc::new(sealer);
        self
    }

    /// The same state, with the data plane drivers that component logs are read from.
    pub fn with_drivers(mut self, drivers: controllers::Drivers) -> Self {
        self.drivers = drivers;
        self
    }

    /// Marks the server ready (`/readyz` answers 200).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    fn touch_token(&self, id: &str) {
        if let Ok(mut m) = self.token_uses.lock() {
            m.insert(id.to_string(), jiff::Timestamp::now());
        }
    }

    fn take_token_uses(&self) -> Vec<String> {
        match self.token_uses.lock() {
            Ok(mut m) => m.drain().map(|(id, _)| id).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Writes the batched token last-use times.
    pub async fn flush_token_uses(&self) {
        let batch = self.take_token_uses();
        for id in batch {
            if let Err(e) = self.store.touch_token(&id).await {
                tracing::warn!(error = %e, "could not record token use");
            }
        }
    }

    /// A password hash to verify against when the user does not exist, so both paths cost the same.
    pub(crate) fn dummy_hash(&self) -> &str {
        self.dummy_hash
            .get_or_init(|| auth::hash_password("not a real password").unwrap_or_default())
    }
}

/// The API routes, documented: everything under `/api/v1` plus health, readiness and metrics.
pub fn api() -> Api {
    let api = Api::new()
        .op(
            Op::new(
                Method::GET,
                "/healthz",
                "healthz",
                "meta",
                "Liveness: the process serves HTTP",
            )
            .public()
            .returns_type(200, "text/plain"),
            || async { "ok\n" },
        )
        .op(
            Op::new(
                Method::GET,
                "/readyz",
                "readyz",
                "meta",
                "Readiness: the store answers and controllers run",
            )
            .public()
            .returns_type(200, "text/plain"),
            readyz,
        )
        .op(
            Op::new(
                Method::GET,
                "/metrics",
                "metrics",
                "meta",
                "Prometheus metrics",
            )
            .public()
            .returns_type(200, "text/plain; version=0.0.4"),
            metrics_handler,
        )
        .op(
            Op::new(
                Method::GET,
                "/api/v1/openapi.json",
                "openapi",
                "meta",
                "This document",
            )
            .public()
            .returns_type(200, "application/json"),
            openapi_handler,
        );
    let api = resources::register(api);
    let api = identity_api::register(api);
    let api = delivery::register(api);
    let api = workspaces::register(api);
    let api = pipelines::register(api);
    let api = runners::register(api);
    let api = triggers::register(api);
    let api = connections::register(api);
    logs::register(api)
}

async fn readyz(State(state): State<AppState>) -> Response {
    if !state.ready.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response();
    }
    if *state.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response();
    }
    match state.store.revision().await {
        Ok(_) => (StatusCode::OK, "ok\n").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: store unreachable");
            (StatusCode::SERVICE_UNAVAILABLE, "store unreachable\n").into_response()
        }
    }
}

async fn metrics_handler(State(state): State<AppState>) -> Response {
    let mut extra = String::new();
    if let Ok(rev) = state.store.revision().await {
        extra.push_str("# HELP kiln_store_revision The store's current revision.\n# TYPE kiln_store_revision gauge\n");
        extra.push_str(&format!("kiln_store_revision {rev}\n"));
    }
    if let Ok(guard) = state.controllers.lock() {
        if let Some(h) = guard.as_ref() {
            extra.push_str(&h.render_metrics());
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&extra),
    )
        .into_response()
}

async fn openapi_handler(State(state): State<AppState>) -> Response {
    let doc = state
        .openapi
        .get_or_init(|| routes::openapi(&api().ops, env!("CARGO_PKG_VERSION")));
    Json(doc.clone()).into_response()
}

async fn no_route() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "no-route",
        "no such endpoint; see /api/v1/openapi.json",
    )
}

async fn wrong_method() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "this endpoint does not take that method; see /api/v1/openapi.json",
    )
}

/// The whole application: API, console, fallbacks, audit and metrics layers.
pub fn app(state: AppState) -> Router {
    let router = api().router.merge(console::routes());
    router
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

async fn observe(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = req.method().as_str().to_string();
    let start = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .observe(&method, resp.status().as_u16(), start.elapsed());
    resp
}

/// The URL agents dial: the configured access URL, or this server's listen address.
pub fn access_url(config: &Config, bound: SocketAddr) -> String {
    if let Some(u) = &config.access_url {
        return u.trim_end_matches('/').to_string();
    }
    let host = if bound.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        bound.ip()
    };
    format!("http://{}", SocketAddr::new(host, bound.port()))
}

/// The providers of the built-in provisioner: `process`, with workspaces under `<data-dir>/workspaces`, and
/// `docker` when the Engine answers (its containers run this executable as their agent).
async fn builtin_providers(config: &Config) -> anyhow::Result<provision::Providers> {
    let exe = std::env::current_exe().context("finding this executable (the agent it runs)")?;
    let command = match &config.agent_command {
        Some(c) => c.clone(),
        None => vec![exe.to_string_lossy().into_owned(), "agent".into()],
    };
    let data = std::path::absolute(&config.data_dir).unwrap_or(config.data_dir.clone());
    Ok(provision::Providers::detect(&data, &exe, command).await)
}

/// Tasks aborted when this is dropped (with the task that holds it).
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Opens the store the configuration names.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let opts = store::Options::default();
    match &config.database_url {
        Some(url) => Store::open_postgres(url, opts)
            .await
            .with_context(|| "opening the PostgreSQL store (--database-url)"),
        None => {
            let path = config.data_dir.join("kiln.db");
            Store::open_sqlite(&path, opts)
                .await
                .with_context(|| format!("opening the SQLite store at {}", path.display()))
        }
    }
}

fn create_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// The data plane drivers this server deploys with: supervised processes (state in `<data-dir>/workloads`)
/// always; Docker when its Engine answers (otherwise environments on docker data planes say it is unavailable).
/// With `noop_data_planes` (benchmarks only), both are the no-op driver and nothing runs.
async fn data_plane_drivers(config: &Config) -> anyhow::Result<controllers::Drivers> {
    if config.noop_data_planes {
        tracing::warn!(
            "--noop-data-planes: process and docker DataPlanes are served by the no-op driver; \
             NOTHING WILL RUN, every replica is reported ready without existing (for benchmarks only)"
        );
        let noop: Arc<dyn dataplane::DataPlane> = Arc::new(dataplane::noop::NoopDriver::new());
        return Ok(controllers::Drivers {
            process: Some(noop.clone()),
            docker: Some(noop),
        });
    }
    let process = dataplane::process::ProcessDriver::new(config.data_dir.join("workloads"))
        .context("starting the process data plane")?;
    let docker: Option<Arc<dyn dataplane::DataPlane>> =
        match dataplane::docker::DockerDriver::connect().await {
            Ok(d) => Some(Arc::new(d)),
            Err(e) => {
                tracing::info!(error = %e, "docker data planes are unavailable");
                None
            }
        };
    Ok(controllers::Drivers {
        process: Some(Arc::new(process)),
        docker,
    })
}

/// Runs the server until SIGTERM or Ctrl-C, then drains in-flight requests and returns.
pub async fn run(config: Config) -> anyhow::Result<()> {
    create_data_dir(&config.data_dir)?;
    let store = open_store(&config).await?;
    let sealer =
        secrets::Sealer::load(&config.data_dir).context("the key that seals Secret values")?;
    let sealed = secrets::seal_stored(&store, &sealer).await?;
    if sealed > 0 {
        tracing::info!(
            secrets = sealed,
            "sealed the values of Secrets stored in plain text"
        );
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let state =
        AppState::new(store.clone(), config.clone(), shutdown_rx.clone()).with_sealer(sealer);
    let first = bootstrap::first_start(&state, &config.data_dir).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr = listener.local_addr()?;
    let drivers = data_plane_drivers(&config).await?;
    let state = state.with_drivers(drivers.clone());
    let _ = state.bound_url.set(access_url(&config, addr));
    // Dependency addresses for the process data plane, on loopback (see `mesh`).
    let mesh = mesh::Mesh::new(std::net::Ipv4Addr::LOCALHOST.into())
        .with_connections(state.connections.clone());
    let mesh_table = mesh::spawn_table(mesh.clone(), store.clone(), shutdown_rx.clone());
    let handle = ctrl::start(
        store.clone(),
        drivers,
        Some(Arc::new(mesh)),
        state.provisioners.clone(),
        shutdown_rx.clone(),
    );
    // Finding the providers (the Engine's API, `terraform version`) takes a while; readiness does not wait.
    let builtin = {
        let (config, store, registry) = (config.clone(), store.clone(), state.provisioners.clone());
        let (url, shutdown) = (access_url(&config, addr), shutdown_rx.clone());
        tokio::spawn(async move {
            let providers = match builtin_providers(&config).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "the built-in provisioner cannot start");
                    return;
                }
            };
            let mut workers = AbortOnDrop(workspaces::builtin::spawn(
                store, registry, providers, url, shutdown,
            ));
            for w in &mut workers.0 {
                let _ = w.await;
            }
        })
    };
    let runner = AbortOnDrop(vec![runners::spawn_builtin(
        store.clone(),
        state.sealer.clone(),
        state.runs.clone(),
        std::path::absolute(&config.data_dir).unwrap_or(config.data_dir.clone()),
        shutdown_rx.clone(),
    )]);
    let trigger_loop = AbortOnDrop(vec![triggers::spawn(
        store.clone(),
        state.runs.clone(),
        shutdown_rx.clone(),
    )]);
    let gateway_table = gateway::spawn_gateway_table(state.clone(), shutdown_rx.clone());
    let access_watch = tokio::spawn(rbac::watch_access_changes(
        state.clone(),
        shutdown_rx.clone(),
    ));
    if let Ok(mut c) = state.controllers.lock() {
        *c = Some(handle);
    }
    let flusher = {
        let state = state.clone();
        let mut stop = shutdown_rx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(30)) => state.flush_token_uses().await,
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
                }
            }
        })
    };
    state.set_ready(true);
    println!("Kiln is listening on http://{addr}");
    match first {
        Some(f) => {
            println!(
                "First start: created user {} (superuser) and organization {}.",
                bootstrap::OWNER,
                bootstrap::DEFAULT_ORG
            );
            println!("API token:       {}", f.token_path.display());
            println!(
                "Console password: {} (user {})",
                f.password_path.display(),
                bootstrap::OWNER
            );
            println!(
                "Try: export KILN_URL=http://{addr} KILN_TOKEN=$(cat {})",
                f.token_path.display()
            );
        }
        None => println!(
            "Admin token file: {}",
            config.data_dir.join("admin-token").display()
        ),
    }
    let drain_timeout = config.drain_timeout;
    let serve = listen::serve(listener, state.clone(), async move {
        shutdown_signal().await;
        tracing::info!("shutting down: draining in-flight requests");
        let _ = shutdown_tx.send(true);
    });
    let mut stop = shutdown_rx.clone();
    let serve = tokio::spawn(serve);
    // After the signal, give in-flight requests `drain_timeout` to finish.
    let drained = async {
        let _ = stop.wait_for(|s| *s).await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        r = serve => r.context("server task")?.context("serving HTTP")?,
        _ = drained => tracing::warn!("drain timeout reached; exiting with requests still in flight"),
    }
    let handle = state.controllers.lock().ok().and_then(|mut c| c.take());
    if let Some(h) = handle {
        h.stop().await;
    }
    builtin.abort();
    let mut runner = runner;
    for r in &mut runner.0 {
        let _ = r.await;
    }
    drop(trigger_loop);
    let _ = flusher.await;
    let _ = access_watch.await;
    let _ = gateway_table.await;
    let _ = mesh_table.await;
    state.flush_token_uses().await;
    Ok(())
}
