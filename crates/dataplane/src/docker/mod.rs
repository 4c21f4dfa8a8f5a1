//! The `docker` driver: workloads as containers on the local Docker Engine, spoken to over its unix socket.
//!
//! - Each project-environment gets its own user-defined bridge network `kiln--<org>--<project>--<env>`, created on
//!   demand and removed with its last container. Containers join only that network (never the default bridge), so
//!   the Engine's isolation rules keep project-environments apart while replicas of one can talk.
//! - Replica `i` of a workload is the container `<org>--<project>--<env>--<component>--r<i>`, labelled with its
//!   workload, release, index and a hash of the spec it was made from; each named port is published on a free
//!   loopback port that status reports as the replica's endpoint.
//! - Crashes are restarted by the Engine (`unless-stopped`, with its backoff). A container stopped or killed
//!   behind Kiln's back is not restarted by the Engine (it counts as stopped by hand), so the driver's event
//!   watcher starts it again, and sweeps for such containers whenever it (re)connects to the event stream.
//! - Everything is found again by label: a new driver adopts running containers instead of creating duplicates.
//! - A container the driver takes down is first renamed `<name>--retiring-<n>`: its name is free for its
//!   successor at once, and no watcher (of this driver or another) mistakes its stop for a kill to undo.
//! - Run `n` of a scheduled task is the container `<org>--<project>--<env>--<component>--run-<n>` (see `runs.rs`):
//!   made like a replica and on the same network, but labelled with its run number, never restarted and never
//!   counted as a replica.

mod api;
mod engine_types;
mod events;
mod liveness;
mod logs;
mod probe;
mod runs;
mod spec;
mod status;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::StatusCode;
use serde_json::json;
use tokio::sync::broadcast;

use crate::{
    BoxFuture, DataPlane, Error, HostAddress, LogOptions, LogStream, Result, RunStatus, Workload,
    WorkloadId, WorkloadStatus, LABEL_WORKLOAD,
};
pub use api::{next_chunk, query_escape, ApiError, Engine};
use engine_types::{ContainerSummary, NetworkInspect};
/// The HTTP method type [`Engine::call`] takes.
pub use hyper::Method;
pub use logs::Demux;
pub use spec::{
    LABEL_ENVIRONMENT, LABEL_LIVENESS, LABEL_NETWORK, LABEL_PORTS, LABEL_READINESS, LABEL_REPLICA,
    LABEL_RUN, LABEL_SPEC_HASH,
};

/// Settings of the docker driver.
#[derive(Debug, Clone)]
pub struct DockerConfig {
    /// Run the Engine's init as PID 1 in every container (`docker run --init`): images that do not handle
    /// SIGTERM (PID 1 ignores it by default) still stop promptly.
    pub init: bool,
    /// The host address the named ports are published on; the server reaches replicas there.
    pub publish_ip: String,
    /// Seconds a replica gets between SIGTERM and SIGKILL when it is taken down.
    pub stop_timeout_secs: u32,
    /// During a rolling replacement, how long to wait for a new replica to become ready before its predecessor
    /// is taken down anyway (a new replica that crashes ends the wait at once).
    pub rollout_ready_timeout: Duration,
    /// When set, the driver's background work (reviving stopped containers, liveness checks) only touches
    /// workloads whose organization starts with this prefix, so several drivers can share one Engine without
    /// acting on each other's containers. `None`: every Kiln workload on the Engine.
    pub scope_prefix: Option<String>,
}

impl Default for DockerConfig {
    fn default() -> DockerConfig {
        DockerConfig {
            init: true,
            publish_ip: "127.0.0.1".into(),
            stop_timeout_secs: 10,
            rollout_ready_timeout: Duration::from_secs(30),
            scope_prefix: None,
        }
    }
}

/// The docker data plane. Dropping it stops its event watcher and liveness checks; the containers keep running.
pub struct DockerDriver {
    inner: Arc<Inner>,
    /// The event watcher and the liveness checker.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

struct Inner {
    engine: Engine,
    config: DockerConfig,
    changes_tx: broadcast::Sender<WorkloadId>,
    /// Replica counts from `apply` (an adopted workload's count is the number of its containers).
    desired: Mutex<HashMap<WorkloadId, u32>>,
    /// Times the driver started a container again (stopped behind its back, or failing its liveness probe), per
    /// container id; added to the Engine's restart count.
    revived: Mutex<HashMap<String, u32>>,
    /// The last readiness seen per container id, to announce changes of it.
    ready: Mutex<HashMap<String, bool>>,
    /// Held while a network is looked up and perhaps created.
    networks_lock: tokio::sync::Mutex<()>,
    /// The status of each finished run, per container id: it never changes once the run has ended.
    finished_runs: Mutex<HashMap<String, RunStatus>>,
}

impl DockerDriver {
    /// Connects to the Engine named by `DOCKER_HOST` (a `unix://` socket) or `/var/run/docker.sock`, with the
    /// default settings.
    pub async fn connect() -> Result<DockerDriver> {
        DockerDriver::connect_config(DockerConfig::default()).await
    }

    /// Like [`DockerDriver::connect`], with the given settings.
    pub async fn connect_config(config: DockerConfig) -> Result<DockerDriver> {
        DockerDriver::connect_with(Engine::from_env()?.socket(), config).await
    }

    /// Connects to the Engine listening on `socket`. Fails, naming the socket, when the Engine does not answer.
    /// Starts the event watcher, so it must run inside a tokio runtime.
    pub async fn connect_with(socket: &Path, config: DockerConfig) -> Result<DockerDriver> {
        let mut engine = Engine::at(socket);
        engine.negotiate().await.map_err(|e| {
            Error::Backend(format!(
                "the docker data plane cannot reach the Docker Engine at {}: {e}",
                socket.display()
            ))
        })?;
        tracing::debug!(socket = %socket.display(), api = engine.api_version(), "connected to the Docker Engine");
        let (changes_tx, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            engine,
            config,
            changes_tx,
            desired: Mutex::new(HashMap::new()),
            revived: Mutex::new(HashMap::new()),
            ready: Mutex::new(HashMap::new()),
            networks_lock: tokio::sync::Mutex::new(()),
            finished_runs: Mutex::new(HashMap::new()),
        });
        let tasks = vec![
            tokio::spawn(events::watch(inner.clone())),
            tokio::spawn(liveness::check(inner.clone())),
        ];
        Ok(DockerDriver { inner, tasks })
    }

    /// The Engine's socket.
    pub fn socket(&self) -> &Path {
        self.inner.engine.socket()
    }

    /// The Engine API version in use (the daemon's, capped at the newest this driver knows).
    pub fn api_version(&self) -> &str {
        self.inner.engine.api_version()
    }
}

impl Drop for DockerDriver {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl DataPlane for DockerDriver {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn apply<'a>(&'a self, workload: &'a Workload) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.apply(workload))
    }

    fn remove<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.remove(id))
    }

    fn status<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<Option<WorkloadStatus>>> {
        Box::pin(self.inner.status(id))
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkloadId>>> {
        Box::pin(self.inner.list())
    }

    fn logs<'a>(
        &'a self,
        id: &'a WorkloadId,
        opts: LogOptions,
    ) -> BoxFuture<'a, Result<LogStream>> {
        Box::pin(self.inner.logs(id, opts))
    }

    fn changes(&self) -> broadcast::Receiver<WorkloadId> {
        self.inner.changes_tx.subscribe()
    }

    fn host_address<'a>(
        &'a self,
        id: &'a WorkloadId,
    ) -> BoxFuture<'a, Result<Option<HostAddress>>> {
        Box::pin(async move {
            let net = self.inner.ensure_network(id).await?;
            Inner::network_gateway(&net).map(Some)
        })
    }

    fn start_run<'a>(&'a self, workload: &'a Workload, run: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.start_run(workload, run))
    }

    fn runs<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<Vec<RunStatus>>> {
        Box::pin(self.inner.runs(id))
    }

    fn stop_run<'a>(&'a self, id: &'a WorkloadId, run: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.stop_run(id, run))
    }

    fn remove_run<'a>(&'a self, id: &'a WorkloadId, run: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.inner.remove_run(id, run))
    }
}

impl Inner {
    /// Whether the driver's background work may act on this workload (see [`DockerConfig::scope_prefix`]).
    pub(crate) fn in_scope(&self, id: &WorkloadId) -> bool {
        self.config
            .scope_prefix
            .as_deref()
            .is_none_or(|p| id.organization.starts_with(p))
    }

    fn notify(&self, id: &WorkloadId) {
        // No receiver is not an error: nobody is watching yet.
        let _ = self.changes_tx.send(id.clone());
    }

    /// Containers carrying `label` (`key` or `key=value`), stopped ones included.
    async fn containers(&self, label: &str) -> Result<Vec<ContainerSummary>, ApiError> {
        let filters = json!({ "label": [label] }).to_string();
        self.engine
            .json(
                Method::GET,
                &format!("/containers/json?all=1&filters={}", query_escape(&filters)),
                None,
            )
            .await
    }

    /// Every container of the workload: its replicas, retiring ones included, and its runs.
    async fn all_containers_of(&self, id: &WorkloadId) -> Result<Vec<ContainerSummary>, ApiError> {
        self.containers(&format!("{LABEL_WORKLOAD}={id}")).await
    }

    /// The workload's replicas, retiring ones included (its runs left out: they are no replicas).
    async fn containers_of(&self, id: &WorkloadId) -> Result<Vec<ContainerSummary>, ApiError> {
        let mut containers = self.all_containers_of(id).await?;
        containers.retain(|c| c.label(LABEL_RUN).is_none());
        Ok(containers)
    }

    /// The workload's replicas by index (retiring containers left out; of duplicates, the first listed).
    fn replicas_by_index(
        id: &WorkloadId,
        containers: &[ContainerSummary],
    ) -> (BTreeMap<u32, ContainerSummary>, Vec<ContainerSummary>) {
        let mut replicas = BTreeMap::new();
        let mut strays = Vec::new();
        for c in containers {
            match spec::index_from_name(id, c.name()) {
                Some(i) if !replicas.contains_key(&i) => {
                    replicas.insert(i, c.clone());
                }
                _ => strays.push(c.clone()),
            }
        }
        (replicas, strays)
    }

    async fn apply(&self, w: &Workload) -> Result<()> {
        let image = workload_image(w)?;
        self.check_image(image).await?;
        self.ensure_network(&w.id).await?;
        self.desired
            .lock()
            .expect("desired lock")
            .insert(w.id.clone(), w.replicas);

        let hash = spec::spec_hash(w);
        let existing = self.containers_of(&w.id).await?;
        let (replicas, strays) = Self::replicas_by_index(&w.id, &existing);
        // Leftovers of an interrupted rollout, and containers of ours with names we did not give.
        for c in &strays {
            self.take_down(c).await?;
        }
        // Scale down first, highest index first.
        for (_, c) in replicas.range(w.replicas..).rev() {
            self.take_down(c).await?;
        }
        for index in 0..w.replicas {
            match replicas.get(&index) {
                None => {
                    let id = self.create(w, index, image).await?;
                    self.start(&id).await?;
                }
                Some(c) if c.label(LABEL_SPEC_HASH) == Some(hash.as_str()) => {
                    // Adopted or current. One stopped behind our back while no driver watched is started again;
                    // one whose start failed last time is started now.
                    match c.state.as_str() {
                        "exited" => self.revive(&c.id).await?,
                        "created" => self.start(&c.id).await?,
                        _ => {}
                    }
                }
                Some(old) => self.replace(w, index, image, old).await?,
            }
        }
        self.notify(&w.id);
        Ok(())
    }

    /// Rolling replacement of one replica: the old container steps aside (renamed), the new one starts and gets
    /// a bounded wait to become ready, then the old one stops.
    async fn replace(
        &self,
        w: &Workload,
        index: u32,
        image: &str,
        old: &ContainerSummary,
    ) -> Result<()> {
        let retired_name = self.retire(old).await?;
        let new_id = match self.create(w, index, image).await {
            Ok(id) => id,
            Err(e) => {
                // Put the old replica back under its name so that it stays the replica until the next apply.
                let _ = self
                    .rename(&old.id, &spec::container_name(&w.id, index))
                    .await;
                tracing::debug!(old = %retired_name, "rollout step failed; old replica kept");
                return Err(e);
            }
        };
        self.start(&new_id).await?;
        self.wait_ready(&new_id).await;
        self.stop_and_delete(&old.id).await
    }

    /// Waits until a new replica is ready, has crashed, or the rollout timeout passes.
    async fn wait_ready(&self, container: &str) {
        let deadline = tokio::time::Instant::now() + self.config.rollout_ready_timeout;
        while tokio::time::Instant::now() < deadline {
            match self.inspect(container).await {
                Ok(Some(c)) => {
                    if c.state.restarting
                        || c.restart_count > 0
                        || (!c.state.running && c.state.status == "exited")
                    {
                        return;
                    }
                    if c.state.running && self.probe_ready(&c).await {
                        return;
                    }
                }
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn check_image(&self, image: &str) -> Result<()> {
        match self
            .engine
            .call(Method::GET, &format!("/images/{image}/json"), None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.is_not_found() => Err(missing_image(image)),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the project-environment network unless it exists, and returns it. Creation is serialized: the
    /// Engine accepts two networks of one name (it no longer checks for duplicates), after which the name is
    /// ambiguous. Duplicates left by an earlier race are removed, keeping the oldest.
    async fn ensure_network(&self, id: &WorkloadId) -> Result<NetworkInspect> {
        let name = spec::network_name(id);
        let _guard = self.networks_lock.lock().await;
        let mut found = self.networks_named(&name).await?;
        if found.is_empty() {
            self.engine
                .call(
                    Method::POST,
                    "/networks/create",
                    Some(&spec::network_body(id)),
                )
                .await?;
            tracing::info!(network = %name, "created the project-environment network");
            found = self.networks_named(&name).await?;
        }
        found.sort_by(|a, b| a.created.cmp(&b.created));
        let mut found = found.into_iter();
        let keep = found.next().ok_or_else(|| {
            Error::Backend(format!("network {name} vanished right after its creation"))
        })?;
        for extra in found {
            match self
                .engine
                .call(Method::DELETE, &format!("/networks/{}", extra.id), None)
                .await
            {
                Ok(_) => {
                    tracing::warn!(network = %name, id = %extra.id, "removed a duplicate network")
                }
                Err(e) => {
                    tracing::warn!(network = %name, id = %extra.id, error = %e, "a duplicate network could not be removed")
                }
            }
        }
        Ok(keep)
    }

    /// The networks whose name is exactly `name` (the Engine's name filter matches substrings).
    async fn networks_named(&self, name: &str) -> Result<Vec<NetworkInspect>> {
        let filters = query_escape(&json!({ "name": [name] }).to_string());
        let all: Vec<NetworkInspect> = self
            .engine
            .json(Method::GET, &format!("/networks?filters={filters}"), None)
            .await?;
        Ok(all.into_iter().filter(|n| n.name == name).collect())
    }

    /// The host's address on the project-environment network (its IPv4 gateway) and the network's prefix.
    fn network_gateway(net: &NetworkInspect) -> Result<HostAddress> {
        net.ipam
            .config
            .iter()
            .filter_map(|c| {
                let ip = c.gateway.as_deref()?.parse::<std::net::IpAddr>().ok()?;
                let prefix_len = c.subnet.as_deref()?.split_once('/')?.1.parse().ok()?;
                Some(HostAddress { ip, prefix_len })
            })
            .find(|h| h.ip.is_ipv4())
            .ok_or_else(|| {
                Error::Backend(format!("network {} has no IPv4 gateway address", net.name))
            })
    }

    /// Removes the project-environment network once no container of ours is on it.
    async fn remove_network_if_unused(&self, id: &WorkloadId) -> Result<()> {
        let name = spec::network_name(id);
        let _guard = self.networks_lock.lock().await;
        if !self
            .containers(&format!("{LABEL_NETWORK}={name}"))
            .await?
            .is_empty()
        {
            return Ok(());
        }
        match self
            .engine
            .call(Method::DELETE, &format!("/networks/{name}"), None)
            .await
        {
            Ok(_) => {
                tracing::info!(network = %name, "removed the project-environment network");
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            // Something else (not ours) is still attached: leave the network.
            Err(e) if e.status() == Some(StatusCode::FORBIDDEN) || e.is_conflict() => {
                tracing::warn!(network = %name, error = %e, "network still in use; left in place");
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    fn host_options(&self) -> spec::HostOptions {
        spec::HostOptions {
            init: self.config.init,
            publish_ip: self.config.publish_ip.clone(),
        }
    }

    /// Creates replica `index`; returns the container's id.
    async fn create(&self, w: &Workload, index: u32, image: &str) -> Result<String> {
        let body = spec::container_body(w, index, image, &self.host_options());
        let name = spec::container_name(&w.id, index);
        self.create_container(&name, &body)
            .await
            .map_err(|e| create_error(&name, image, e))
    }

    /// `POST /containers/create`; returns the new container's id.
    async fn create_container(
        &self,
        name: &str,
        body: &serde_json::Value,
    ) -> Result<String, ApiError> {
        #[derive(serde::Deserialize)]
        struct Created {
            #[serde(rename = "Id")]
            id: String,
        }
        self.engine
            .json::<Created>(
                Method::POST,
                &format!("/containers/create?name={}", query_escape(name)),
                Some(body),
            )
            .await
            .map(|c| c.id)
    }

    async fn start(&self, container: &str) -> Result<()> {
        match self
            .engine
            .call(
                Method::POST,
                &format!("/containers/{container}/start"),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(StatusCode::NOT_MODIFIED) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts a container that was stopped behind the driver's back, counting it as a restart.
    async fn revive(&self, container: &str) -> Result<()> {
        self.start(container).await?;
        *self
            .revived
            .lock()
            .expect("revived lock")
            .entry(container.to_string())
            .or_default() += 1;
        Ok(())
    }

    /// Renames a container out of the way (see the module doc); returns its new name.
    async fn retire(&self, c: &ContainerSummary) -> Result<String> {
        if spec::is_retiring(c.name()) {
            return Ok(c.name().to_string());
        }
        let nanos = jiff::Timestamp::now().as_nanosecond();
        let name = format!("{}{}{nanos}", c.name(), spec::RETIRING);
        match self.rename(&c.id, &name).await {
            Ok(()) => Ok(name),
            Err(e) if e.is_not_found() => Ok(name),
            Err(e) => Err(e.into()),
        }
    }

    /// Renames a container.
    async fn rename(&self, container: &str, name: &str) -> Result<(), ApiError> {
        self.engine
            .call(
                Method::POST,
                &format!("/containers/{container}/rename?name={}", query_escape(name)),
                None,
            )
            .await
            .map(drop)
    }

    /// Stops a container: SIGTERM, then SIGKILL after the grace period. One already stopped is fine.
    async fn stop(&self, container: &str) -> Result<(), ApiError> {
        let t = self.config.stop_timeout_secs;
        match self
            .engine
            .call(
                Method::POST,
                &format!("/containers/{container}/stop?t={t}"),
                None,
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(StatusCode::NOT_MODIFIED) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn stop_and_delete(&self, container: &str) -> Result<()> {
        match self.stop(container).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => tracing::warn!(container, error = %e, "stopping failed; removing by force"),
        }
        match self
            .engine
            .call(
                Method::DELETE,
                &format!("/containers/{container}?force=1&v=1"),
                None,
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        self.revived.lock().expect("revived lock").remove(container);
        self.ready.lock().expect("ready lock").remove(container);
        self.finished_runs
            .lock()
            .expect("finished runs lock")
            .remove(container);
        Ok(())
    }

    /// Retires, stops and deletes a container.
    async fn take_down(&self, c: &ContainerSummary) -> Result<()> {
        self.retire(c).await?;
        self.stop_and_delete(&c.id).await
    }

    /// Removes the replicas and the runs.
    async fn remove(&self, id: &WorkloadId) -> Result<()> {
        let containers = self.all_containers_of(id).await?;
        // Rename them all first, so that none is revived while the others stop.
        for c in &containers {
            self.retire(c).await?;
        }
        let results =
            futures_util::future::join_all(containers.iter().map(|c| self.stop_and_delete(&c.id)))
                .await;
        results.into_iter().collect::<Result<Vec<()>>>()?;
        self.desired.lock().expect("desired lock").remove(id);
        self.remove_network_if_unused(id).await?;
        self.notify(id);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<WorkloadId>> {
        let mut ids: Vec<WorkloadId> = self
            .containers(LABEL_WORKLOAD)
            .await?
            .iter()
            .filter_map(|c| c.label(LABEL_WORKLOAD).and_then(WorkloadId::parse))
            .collect();
        ids.extend(self.desired.lock().expect("desired lock").keys().cloned());
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// The image a workload's containers are made from.
fn workload_image(w: &Workload) -> Result<&str> {
    w.image.as_deref().ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: the docker data plane runs container images, and this workload names none",
            w.id
        ))
    })
}

/// A failed container creation: the Engine answers 404 when the image is missing.
fn create_error(name: &str, image: &str, e: ApiError) -> Error {
    if e.is_not_found() {
        missing_image(image)
    } else {
        Error::Backend(format!("creating container {name}: {e}"))
    }
}

fn missing_image(image: &str) -> Error {
    Error::Backend(format!(
        "image {image} is not on the Docker Engine, and this data plane does not pull images (no registry is \
         reachable from it): build or load it on the Docker host first, e.g. `docker build -t {image} .`"
    ))
}
