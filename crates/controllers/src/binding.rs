//! The ReleaseBinding controller: runs a binding's release in its environment. It renders the release into a
//! data-plane [`Workload`], applies it with the driver of the environment's DataPlane, and reads the replicas'
//! health back into the binding's conditions: `Ready` (all replicas ready), `Progressing` (still converging) and
//! `Degraded` (a replica crashed, saying why: exit code and last lines). A finalizer removes the workload before
//! the binding goes; an `undeployed` binding runs nothing.
//!
//! Dependencies on other components' endpoints (`{component, endpoint, project}`) become variables
//! `<NAME>_URL`, `<NAME>_HOST` and `<NAME>_PORT` in the workload's environment, pointing at an address the
//! [`Mesh`] owns for this (consumer, dependency) pair; the mesh forwards connections to the ready replicas of the
//! dependency in the same environment. The address is assigned before the workload is first applied and kept in
//! `status.dependencies` (so it survives a restart of the server); what it forwards to can change without the
//! consumer restarting. A dependency that does not exist, or whose endpoint's visibility does not admit the
//! consumer, is reported by the condition `DependenciesReady=False` (reasons `DependencyNotFound`,
//! `DependencyNotVisible`): the consumer still runs and still gets its variables, but the address forwards nothing
//! until a later reconcile finds the dependency allowed. Service dependencies by `type` are left alone.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dataplane::{
    DataPlane, HostAddress, PortSpec, Probe as DpProbe, ProbeSpec, ReplicaState, Workload,
    WorkloadId, WorkloadStatus,
};
use model::kinds::{
    BindingState, ComponentSpec, ComponentType, DataPlaneSpec, DataPlaneType, Dependency,
    EndpointProtocol, EnvironmentSpec, Probe, ReleaseBindingSpec, ReleaseSpec, Visibility,
};
use model::{ConditionStatus, Kind, Resource};
use runtime::conditions::{condition_status, new_condition, set_condition};
use runtime::{Action, Context, Controller, Reconciler, StoreSource};
use serde_json::{json, Value};
use store::{Key, Store, StoreError};

use crate::status::{record_event, write_status, EventType};
use crate::Error;

/// Finalizer that holds a binding until its workload is removed from the data plane.
pub const FINALIZER: &str = "kiln.dev/workload";
/// How often a binding is re-checked while it converges, and once it is ready. Both are safety nets: the
/// driver's change notifications (see `changes.rs`) reconcile a binding as soon as its workload changes.
const PROGRESS_RECHECK: Duration = Duration::from_secs(5);
const READY_RECHECK: Duration = Duration::from_secs(30);

/// The data plane drivers, by the type of DataPlane they serve. A type without a driver is reported on the
/// bindings that need it.
#[derive(Clone, Default)]
pub struct Drivers {
    pub process: Option<Arc<dyn DataPlane>>,
    pub docker: Option<Arc<dyn DataPlane>>,
}

impl Drivers {
    /// The driver for a data plane type, or the reason there is none.
    pub fn for_type(&self, t: DataPlaneType) -> Result<Arc<dyn DataPlane>, (&'static str, String)> {
        let missing = |what: &str| {
            (
                "DataPlaneUnavailable",
                format!("the {what} data plane driver is not available on this server"),
            )
        };
        match t {
            DataPlaneType::Process => self.process.clone().ok_or_else(|| missing("process")),
            DataPlaneType::Docker => self.docker.clone().ok_or_else(|| missing("docker")),
            other => Err((
                "DataPlaneUnavailable",
                format!(
                    "{} data planes are not available yet; use process or docker",
                    other.as_str()
                ),
            )),
        }
    }

    /// Every driver present.
    pub fn all(&self) -> Vec<Arc<dyn DataPlane>> {
        self.process
            .iter()
            .chain(self.docker.iter())
            .cloned()
            .collect()
    }
}

/// What a consumer's dependency address forwards to: one endpoint of one component, in the consumer's
/// environment.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct MeshTarget {
    pub organization: String,
    pub project: String,
    pub environment: String,
    pub component: String,
    pub endpoint: String,
}

/// One declared dependency of a consumer, as the mesh serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshRoute {
    /// The consuming workload.
    pub consumer: WorkloadId,
    /// The dependency's name (unique within the consumer).
    pub dependency: String,
    pub target: MeshTarget,
    /// Whether connections are forwarded (the dependency exists and its visibility admits the consumer);
    /// otherwise they are accepted and closed.
    pub allowed: bool,
    /// The address the consumer's replicas reach the server's host at, where the listener is bound and whose
    /// network alone may connect (a docker network's gateway); `None` for the mesh's own host address
    /// (loopback, for replicas on the host).
    pub host: Option<HostAddress>,
}

/// Owns the addresses consumers reach their dependencies at (implemented by the server, which can open
/// listeners). Calls are cheap and idempotent: the binding controller makes them on every reconcile.
pub trait Mesh: Send + Sync {
    /// Ensures an address serves `route` and returns it. A route already served keeps its address (its target and
    /// `allowed` are updated) unless it must move to another host address; a new one binds `preferred` (the
    /// address assigned before a restart) when it can.
    fn listen(
        &self,
        route: &MeshRoute,
        preferred: Option<SocketAddr>,
    ) -> Result<SocketAddr, String>;
    /// Stops serving the consumer's dependencies not named in `keep`.
    fn retain(&self, consumer: &WorkloadId, keep: &[String]);
}

/// Reconciles ReleaseBindings.
pub struct BindingController {
    store: Store,
    drivers: Drivers,
    mesh: Option<Arc<dyn Mesh>>,
    /// Bindings whose `DependenciesReady` is `False`: a data plane change may be what they wait for.
    waiting: Waiting,
}

/// The keys of the bindings waiting on a dependency, kept by the reconciler as it writes that condition, so
/// a data plane notification finds them without scanning every binding.
pub(crate) type Waiting = Arc<std::sync::Mutex<std::collections::HashSet<Key>>>;

pub(crate) fn controller(
    store: Store,
    drivers: Drivers,
    mesh: Option<Arc<dyn Mesh>>,
) -> Controller<BindingController> {
    let bindings = StoreSource::new(store.clone(), Kind::ReleaseBinding);
    let waiting = Waiting::default();
    let ctrl = Controller::new(
        "releasebindings",
        bindings,
        BindingController {
            store,
            drivers: drivers.clone(),
            mesh,
            waiting: waiting.clone(),
        },
    )
    .concurrency(8);
    // Data plane changes (a replica started, became ready, crashed) reconcile the bindings they concern at once.
    let triggers = crate::changes::binding_triggers(&drivers, ctrl.cache(), waiting);
    ctrl.triggers(triggers)
}

/// The variable-name prefix of a dependency: upper-cased, `-` and `.` as `_`.
pub fn env_prefix(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            '-' | '.' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// The variables a consumer gets for a dependency served at `addr`: `<NAME>_URL` (`http://host:port/path` for
/// HTTP, `https://`, `ws://` for WebSocket, `http://host:port` for gRPC, `tcp://host:port` otherwise),
/// `<NAME>_HOST` and `<NAME>_PORT`.
pub fn dependency_env(
    name: &str,
    addr: SocketAddr,
    protocol: EndpointProtocol,
    path: &str,
) -> BTreeMap<String, String> {
    let prefix = env_prefix(name);
    let host = addr.ip().to_string();
    let port = addr.port();
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    let url = match protocol {
        EndpointProtocol::Http => format!("http://{host}:{port}{path}"),
        EndpointProtocol::Https => format!("https://{host}:{port}{path}"),
        EndpointProtocol::WebSocket => format!("ws://{host}:{port}{path}"),
        EndpointProtocol::Grpc => format!("http://{host}:{port}"),
        EndpointProtocol::Tcp | EndpointProtocol::Udp => format!("tcp://{host}:{port}"),
    };
    BTreeMap::from([
        (format!("{prefix}_URL"), url),
        (format!("{prefix}_HOST"), host),
        (format!("{prefix}_PORT"), port.to_string()),
    ])
}

/// Whether an endpoint with `visibility` in project `target_project` admits a consumer in `consumer_project`
/// (both in the same organization and environment).
pub fn visible(visibility: Visibility, target_project: &str, consumer_project: &str) -> bool {
    match visibility {
        Visibility::Project => target_project == consumer_project,
        Visibility::Organization | Visibility::Public => true,
    }
}

/// The workload's identity for a binding.
pub fn workload_id(binding: &Resource, spec: &ReleaseBindingSpec) -> WorkloadId {
    WorkloadId {
        organization: binding.metadata.organization.clone().unwrap_or_default(),
        project: binding.metadata.project.clone().unwrap_or_default(),
        environment: spec.environment.clone(),
        component: spec.component.clone(),
    }
}

fn quantity(q: &Option<model::Quantity>) -> Option<f64> {
    q.as_ref().and_then(|q| q.value())
}

/// Renders a release into what the data plane runs.
pub fn render(id: WorkloadId, release_name: &str, release: &ReleaseSpec) -> Workload {
    let snap = &release.snapshot;
    let mut ports: Vec<PortSpec> = snap
        .endpoints
        .iter()
        .map(|e| PortSpec {
            name: e.name.clone(),
            container_port: e.port as u16,
        })
        .collect();
    let mut port_name = |port: u32| -> String {
        if let Some(p) = ports.iter().find(|p| u32::from(p.container_port) == port) {
            return p.name.clone();
        }
        let name = format!("probe-{port}");
        ports.push(PortSpec {
            name: name.clone(),
            container_port: port as u16,
        });
        name
    };
    let mut probe = |p: &Option<Probe>| -> Option<ProbeSpec> {
        let p = p.as_ref()?;
        let probe = match (&p.http_get, &p.tcp_socket) {
            (Some(h), _) => DpProbe::Http {
                port: port_name(h.port),
                path: h.path.clone(),
            },
            (None, Some(t)) => DpProbe::Tcp {
                port: port_name(t.port),
            },
            // Exec probes need a way into the workload; they are treated as absent here.
            (None, None) => return None,
        };
        Some(ProbeSpec {
            probe,
            period_secs: p.period_seconds.max(1),
            failure_threshold: p.failure_threshold.max(1),
            initial_delay_secs: p.initial_delay_seconds,
        })
    };
    let probes = snap.probes.clone().unwrap_or_default();
    let readiness = probe(&probes.readiness);
    let liveness = probe(&probes.liveness);
    let workload = snap.workload.clone().unwrap_or_default();
    let limits = snap
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    let env: BTreeMap<String, String> = workload
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect();
    let mut labels = BTreeMap::new();
    labels.insert("kiln.dev/component".to_owned(), id.component.clone());
    Workload {
        id,
        release: release_name.to_owned(),
        image: snap.artifact.clone().or(workload.image),
        command: workload.command.unwrap_or_default(),
        working_dir: workload.working_dir,
        env,
        replicas: snap.replicas,
        ports,
        memory_limit: quantity(&limits.memory).map(|b| b as u64),
        cpu_limit_millis: quantity(&limits.cpu).map(|c| (c * 1000.0) as u64),
        readiness,
        liveness,
        labels,
    }
}

/// The binding's conditions and status fields from what the data plane reports.
fn observe(
    status: &mut Value,
    ws: Option<&WorkloadStatus>,
    release: &str,
    generation: Option<u64>,
) -> bool {
    // Readiness is judged on the replicas of the bound release only: during a rollout the previous release's
    // replicas may still be ready, but they are not what the binding asks for.
    let (ready, desired) = ws
        .map(|s| {
            let current = s
                .replicas
                .iter()
                .filter(|r| r.release == release && r.ready)
                .count() as u32;
            (current, s.desired)
        })
        .unwrap_or((0, 0));
    let crashed: Vec<String> = ws
        .map(|s| {
            s.replicas
                .iter()
                .filter_map(|r| match &r.state {
                    ReplicaState::Crashed { exit_code, message } => {
                        let code = exit_code
                            .map(|c| format!("exited with {c}"))
                            .unwrap_or_else(|| "stopped".into());
                        let tail = r
                            .last_logs
                            .iter()
                            .rev()
                            .take(3)
                            .rev()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(" | ");
                        Some(format!(
                            "replica {} {code} ({message}; restarts {}): {tail}",
                            r.index, r.restarts
                        ))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let all_ready = ws.is_some() && ready >= desired;
    let (rs, rr, rm) = if all_ready {
        (
            ConditionStatus::True,
            "Ready",
            format!("{ready}/{desired} replicas of {release} ready"),
        )
    } else if !crashed.is_empty() {
        (ConditionStatus::False, "CrashLoop", crashed.join("; "))
    } else {
        (
            ConditionStatus::False,
            "Starting",
            format!("{ready}/{desired} replicas of {release} ready"),
        )
    };
    set_condition(status, new_condition("Ready", rs, rr, rm, generation));
    let progressing = if all_ready {
        ConditionStatus::False
    } else {
        ConditionStatus::True
    };
    set_condition(
        status,
        new_condition(
            "Progressing",
            progressing,
            if all_ready { "Complete" } else { "Rollout" },
            format!("release {release}"),
            generation,
        ),
    );
    let (ds, dr, dm) = if crashed.is_empty() {
        (ConditionStatus::False, "Healthy", String::new())
    } else {
        (ConditionStatus::True, "CrashLoop", crashed.join("; "))
    };
    set_condition(status, new_condition("Degraded", ds, dr, dm, generation));
    let endpoints: BTreeMap<String, Vec<String>> = ws
        .map(|s| {
            let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
            // Traffic goes to the bound release's ready replicas; until one of them is ready (early in a rollout),
            // to whatever replicas are ready.
            let current_ready = s.replicas.iter().any(|r| r.ready && r.release == release);
            for r in s
                .replicas
                .iter()
                .filter(|r| r.ready && (!current_ready || r.release == release))
            {
                for (name, addr) in &r.endpoints {
                    m.entry(name.clone()).or_default().push(addr.to_string());
                }
            }
            m
        })
        .unwrap_or_default();
    if let Value::Object(map) = status {
        map.insert("release".into(), json!(release));
        map.insert("replicas".into(), json!(desired));
        map.insert("readyReplicas".into(), json!(ready));
        map.insert("endpoints".into(), json!(endpoints));
    }
    all_ready
}

/// How many past releases a binding remembers (for `kiln releases` and rollback).
pub const HISTORY_LEN: usize = 20;

/// Records that `release` started deploying: `status.history` lists releases newest first, with when.
fn push_history(status: &mut Value, release: &str) {
    let Value::Object(map) = status else { return };
    let mut history: Vec<Value> = map
        .get("history")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    history.insert(
        0,
        json!({"release": release, "since": jiff::Timestamp::now().to_string()}),
    );
    history.truncate(HISTORY_LEN);
    map.insert("history".into(), Value::Array(history));
}

fn not_ready(status: &mut Value, reason: &str, message: String, generation: Option<u64>) {
    set_condition(
        status,
        new_condition("Ready", ConditionStatus::False, reason, message, generation),
    );
}

/// The `DependenciesReady` condition type.
pub const DEPENDENCIES_READY: &str = "DependenciesReady";

impl BindingController {
    fn forget_dependencies(&self, id: &WorkloadId) {
        if let Some(mesh) = &self.mesh {
            mesh.retain(id, &[]);
        }
    }

    /// Resolves the release's dependencies on components' endpoints: assigns each its mesh address, records the
    /// addresses in `status.dependencies` and the outcome in the `DependenciesReady` condition, and returns the
    /// variables the workload gets.
    async fn dependencies(
        &self,
        id: &WorkloadId,
        release: &ReleaseSpec,
        driver: &dyn DataPlane,
        status: &mut Value,
        generation: Option<u64>,
    ) -> Result<BTreeMap<String, String>, Error> {
        let deps: Vec<&Dependency> = release
            .snapshot
            .dependencies
            .iter()
            .filter(|d| d.type_.is_none() && d.component.is_some() && d.endpoint.is_some())
            .collect();
        let mut env = BTreeMap::new();
        let previous = status.get("dependencies").cloned().unwrap_or(Value::Null);
        if let Value::Object(map) = status {
            map.remove("dependencies");
        }
        let condition = |status: &mut Value, s, reason: &str, message: String| {
            set_condition(
                status,
                new_condition(DEPENDENCIES_READY, s, reason, message, generation),
            );
        };
        if deps.is_empty() {
            self.forget_dependencies(id);
            if condition_status(status, DEPENDENCIES_READY).is_some() {
                condition(
                    status,
                    ConditionStatus::True,
                    "NoDependencies",
                    "the component declares no dependencies on components".into(),
                );
            }
            return Ok(env);
        }
        let mesh = match &self.mesh {
            Some(m) => m.clone(),
            None => {
                condition(
                    status,
                    ConditionStatus::False,
                    "DependenciesUnsupported",
                    "this server routes no dependencies: no variables were injected".into(),
                );
                return Ok(env);
            }
        };
        // Where the replicas reach the server's host (a docker network's gateway); `None`: loopback.
        let host = match driver.host_address(id).await {
            Ok(h) => h,
            Err(e) => {
                condition(
                    status,
                    ConditionStatus::False,
                    "DependencyAddressUnavailable",
                    format!(
                        "{} data plane: the replicas' address of the server is unknown: {e}",
                        driver.name()
                    ),
                );
                return Ok(env);
            }
        };
        let mut problems: Vec<(&'static str, String)> = Vec::new();
        let mut recorded = serde_json::Map::new();
        let mut names = Vec::new();
        for dep in deps {
            let (Some(component), Some(endpoint)) = (&dep.component, &dep.endpoint) else {
                continue;
            };
            let name = dep.name.clone().unwrap_or_else(|| component.clone());
            let project = dep.project.clone().unwrap_or_else(|| id.project.clone());
            let target = MeshTarget {
                organization: id.organization.clone(),
                project: project.clone(),
                environment: id.environment.clone(),
                component: component.clone(),
                endpoint: endpoint.clone(),
            };
            let key = Key {
                kind: Kind::Component,
                organization: Some(id.organization.clone()),
                project: Some(project.clone()),
                name: component.clone(),
            };
            let spec = self
                .get(key)
                .await?
                .and_then(|c| model::typed_spec::<ComponentSpec>(&c).ok());
            let ep = spec
                .as_ref()
                .and_then(|s| s.endpoints.iter().find(|e| &e.name == endpoint));
            let (mut allowed, protocol, path) = match (&spec, ep) {
                (None, _) => {
                    problems.push((
                        "DependencyNotFound",
                        format!(
                            "{name}: component {component} does not exist in project {project}"
                        ),
                    ));
                    (false, EndpointProtocol::Http, "/".to_owned())
                }
                (Some(_), None) => {
                    problems.push((
                        "DependencyNotFound",
                        format!(
                            "{name}: component {component} of project {project} has no endpoint {endpoint}"
                        ),
                    ));
                    (false, EndpointProtocol::Http, "/".to_owned())
                }
                (Some(_), Some(ep)) if !visible(ep.visibility, &project, &id.project) => {
                    problems.push((
                        "DependencyNotVisible",
                        format!(
                            "{name}: endpoint {endpoint} of component {component} in project {project} is visible \
                             to its own project only"
                        ),
                    ));
                    (false, ep.protocol, ep.path.clone())
                }
                (Some(_), Some(ep)) => (true, ep.protocol, ep.path.clone()),
            };
            if allowed && protocol == EndpointProtocol::Udp {
                problems.push((
                    "DependencyUnsupported",
                    format!("{name}: UDP endpoints are not routed yet"),
                ));
                allowed = false;
            }
            let route = MeshRoute {
                consumer: id.clone(),
                dependency: name.clone(),
                target,
                allowed,
                host,
            };
            let preferred = previous
                .get(&name)
                .and_then(|d| d.get("address"))
                .and_then(Value::as_str)
                .and_then(|a| a.parse::<SocketAddr>().ok());
            match mesh.listen(&route, preferred) {
                Ok(addr) => {
                    env.extend(dependency_env(&name, addr, protocol, &path));
                    recorded.insert(
                        name.clone(),
                        json!({
                            "address": addr.to_string(),
                            "target": format!("{project}/{component}/{endpoint}"),
                            "forwarding": allowed,
                        }),
                    );
                }
                Err(e) => problems.push((
                    "DependencyAddressUnavailable",
                    format!("{name}: no address could be assigned: {e}"),
                )),
            }
            names.push(name);
        }
        mesh.retain(id, &names);
        if let Value::Object(map) = status {
            map.insert("dependencies".into(), Value::Object(recorded));
        }
        match problems.first() {
            None => condition(
                status,
                ConditionStatus::True,
                "Resolved",
                format!("{} dependencies routed", names.len()),
            ),
            Some((reason, _)) => {
                let message = problems
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                condition(status, ConditionStatus::False, reason, message)
            }
        }
        Ok(env)
    }

    async fn get(&self, key: Key) -> Result<Option<Resource>, Error> {
        match self.store.get(&key).await {
            Ok(r) => Ok(Some(r)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(source) => Err(Error::Store {
                what: "reading",
                key,
                source,
            }),
        }
    }

    /// The driver of the binding's environment, or the reason there is none.
    async fn driver(
        &self,
        org: &Option<String>,
        env: &str,
    ) -> Result<Result<Arc<dyn DataPlane>, (&'static str, String)>, Error> {
        let env_key = Key {
            kind: Kind::Environment,
            organization: org.clone(),
            project: None,
            name: env.to_owned(),
        };
        let Some(env_obj) = self.get(env_key).await? else {
            return Ok(Err((
                "EnvironmentNotFound",
                format!("environment {env} does not exist"),
            )));
        };
        let env_spec: EnvironmentSpec = match model::typed_spec(&env_obj) {
            Ok(s) => s,
            Err(e) => return Ok(Err(("InvalidEnvironment", e.to_string()))),
        };
        let dp_key = Key {
            kind: Kind::DataPlane,
            organization: org.clone(),
            project: None,
            name: env_spec.data_plane_ref.clone(),
        };
        let Some(dp) = self.get(dp_key).await? else {
            return Ok(Err((
                "DataPlaneNotFound",
                format!("data plane {} does not exist", env_spec.data_plane_ref),
            )));
        };
        let dp_spec: DataPlaneSpec = match model::typed_spec(&dp) {
            Ok(s) => s,
            Err(e) => return Ok(Err(("InvalidDataPlane", e.to_string()))),
        };
        Ok(self.drivers.for_type(dp_spec.type_))
    }

    async fn set_finalizers(&self, key: &Key, obj: &Resource, add: bool) -> Result<bool, Error> {
        let mut next = obj.clone();
        next.metadata.finalizers.retain(|f| f != FINALIZER);
        if add {
            next.metadata.finalizers.push(FINALIZER.to_owned());
        }
        if next.metadata.finalizers == obj.metadata.finalizers {
            return Ok(false);
        }
        match self.store.update(next).await {
            Ok(_) | Err(StoreError::NotFound(_)) | Err(StoreError::Conflict { .. }) => Ok(true),
            Err(source) => Err(Error::Store {
                what: "updating the finalizers of",
                key: key.clone(),
                source,
            }),
        }
    }

    /// Removes the workload from every driver (the environment or its data plane may be gone already).
    async fn remove_everywhere(&self, id: &WorkloadId) -> Result<(), String> {
        for d in self.drivers.all() {
            d.remove(id)
                .await
                .map_err(|e| format!("{}: {e}", d.name()))?;
        }
        Ok(())
    }
}

impl Reconciler for BindingController {
    type Error = Error;

    async fn reconcile(&self, obj: Arc<Resource>, ctx: &Context) -> Result<Action, Error> {
        let generation = obj.metadata.generation;
        let mut status = if obj.status.is_object() {
            obj.status.clone()
        } else {
            json!({})
        };
        let spec: ReleaseBindingSpec = match model::typed_spec(&obj) {
            Ok(s) => s,
            Err(e) => {
                not_ready(&mut status, "InvalidSpec", e.to_string(), generation);
                return Ok(write_status(&self.store, &ctx.key, &obj, status)
                    .await?
                    .action());
            }
        };
        let id = workload_id(&obj, &spec);
        if obj.metadata.deletion_timestamp.is_some() {
            self.forget_dependencies(&id);
            if let Err(e) = self.remove_everywhere(&id).await {
                not_ready(&mut status, "RemoveFailed", e, generation);
                write_status(&self.store, &ctx.key, &obj, status).await?;
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            self.set_finalizers(&ctx.key, &obj, false).await?;
            return Ok(Action::await_change());
        }
        if self.set_finalizers(&ctx.key, &obj, true).await? {
            // The update brings the object back through the watch.
            return Ok(Action::await_change());
        }
        if spec.state == BindingState::Undeployed {
            self.forget_dependencies(&id);
            if let Err(e) = self.remove_everywhere(&id).await {
                not_ready(&mut status, "RemoveFailed", e, generation);
                return Ok(write_status(&self.store, &ctx.key, &obj, status)
                    .await?
                    .action());
            }
            not_ready(
                &mut status,
                "Undeployed",
                "the binding is undeployed: nothing runs".into(),
                generation,
            );
            return Ok(write_status(&self.store, &ctx.key, &obj, status)
                .await?
                .action());
        }
        let release_key = Key {
            kind: Kind::Release,
            organization: obj.metadata.organization.clone(),
            project: obj.metadata.project.clone(),
            name: spec.release.clone(),
        };
        let Some(release_obj) = self.get(release_key).await? else {
            not_ready(
                &mut status,
                "ReleaseNotFound",
                format!("release {} does not exist", spec.release),
                generation,
            );
            return Ok(write_status(&self.store, &ctx.key, &obj, status)
                .await?
                .action());
        };
        let release: ReleaseSpec = match model::typed_spec(&release_obj) {
            Ok(r) => r,
            Err(e) => {
                not_ready(&mut status, "InvalidRelease", e.to_string(), generation);
                return Ok(write_status(&self.store, &ctx.key, &obj, status)
                    .await?
                    .action());
            }
        };
        let driver = match self
            .driver(&obj.metadata.organization, &spec.environment)
            .await?
        {
            Ok(d) => d,
            Err((reason, message)) => {
                not_ready(&mut status, reason, message, generation);
                return Ok(write_status(&self.store, &ctx.key, &obj, status)
                    .await?
                    .action());
            }
        };
        let dependency_env = self
            .dependencies(&id, &release, driver.as_ref(), &mut status, generation)
            .await?;
        if let Ok(mut w) = self.waiting.lock() {
            if condition_status(&status, DEPENDENCIES_READY) == Some(ConditionStatus::False) {
                w.insert(ctx.key.clone());
            } else {
                w.remove(&ctx.key);
            }
        }
        let mut workload = render(id.clone(), &spec.release, &release);
        // A variable the component sets itself wins over the injected one.
        for (k, v) in dependency_env {
            workload.env.entry(k).or_insert(v);
        }
        let before = status
            .get("release")
            .and_then(Value::as_str)
            .map(str::to_owned);
        if release.snapshot.type_ == ComponentType::ScheduledTask {
            if status.get("endpoints").is_some() {
                // It ran replicas before (the component changed type): they stop.
                if let Err(e) = driver.remove(&id).await {
                    tracing::warn!(workload = %id, error = %e, "removing replicas of a scheduled task failed");
                }
            }
            workload.replicas = 1;
            let out = crate::schedule::reconcile(
                &self.store,
                &ctx.key,
                &obj,
                &mut status,
                &release.snapshot,
                &workload,
                driver.as_ref(),
                generation,
            )
            .await;
            if before.as_deref() != Some(spec.release.as_str()) {
                if let Value::Object(map) = &mut status {
                    map.insert("release".into(), json!(spec.release));
                }
                push_history(&mut status, &spec.release);
            }
            let written = write_status(&self.store, &ctx.key, &obj, status).await?;
            return Ok(match written.action().requeue_after() {
                Some(d) => Action::requeue(d),
                None => Action::requeue(out.requeue),
            });
        }
        if let Err(e) = driver.apply(&workload).await {
            not_ready(
                &mut status,
                "ApplyFailed",
                format!("{} data plane: {e}", driver.name()),
                generation,
            );
            write_status(&self.store, &ctx.key, &obj, status).await?;
            return Ok(Action::requeue(Duration::from_secs(5)));
        }
        let ws = match driver.status(&id).await {
            Ok(ws) => ws,
            Err(e) => {
                not_ready(
                    &mut status,
                    "StatusUnavailable",
                    format!("{} data plane: {e}", driver.name()),
                    generation,
                );
                write_status(&self.store, &ctx.key, &obj, status).await?;
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
        };
        let ready = observe(&mut status, ws.as_ref(), &spec.release, generation);
        if before.as_deref() != Some(spec.release.as_str()) {
            push_history(&mut status, &spec.release);
            let message = format!(
                "release {} deploying to environment {} on the {} data plane",
                spec.release,
                spec.environment,
                driver.name()
            );
            record_event(
                &self.store,
                &ctx.key,
                EventType::Normal,
                "Deploying",
                message,
            )
            .await;
        }
        let written = write_status(&self.store, &ctx.key, &obj, status).await?;
        Ok(match written.action().requeue_after() {
            Some(d) => Action::requeue(d),
            None if ready => Action::requeue(READY_RECHECK),
            None => Action::requeue(PROGRESS_RECHECK),
        })
    }
}

#[cfg(test)]
mod tests {

    fn replica(release: &str, ready: bool, port: u16) -> dataplane::ReplicaStatus {
        dataplane::ReplicaStatus {
            index: 0,
            release: release.into(),
            state: ReplicaState::Running,
            ready,
            restarts: 0,
            endpoints: [(
                "http".to_string(),
                std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            )]
            .into(),
            last_logs: vec![],
        }
    }

    #[test]
    fn a_rollout_is_ready_only_when_the_bound_release_is() {
        let mut status = json!({});
        // The old release still serves while the new one starts: not ready, traffic stays on the old.
        let ws = WorkloadStatus {
            desired: 1,
            replicas: vec![replica("old", true, 1001), replica("new", false, 1002)],
        };
        assert!(!observe(&mut status, Some(&ws), "new", Some(1)));
        assert_eq!(status["endpoints"]["http"], json!(["127.0.0.1:1001"]));
        assert_eq!(status["readyReplicas"], 0);
        // Once the new one is ready, it alone takes the traffic.
        let ws = WorkloadStatus {
            desired: 1,
            replicas: vec![replica("old", true, 1001), replica("new", true, 1002)],
        };
        assert!(observe(&mut status, Some(&ws), "new", Some(1)));
        assert_eq!(status["endpoints"]["http"], json!(["127.0.0.1:1002"]));
    }

    use super::*;

    #[test]
    fn dependency_variables() {
        let addr: SocketAddr = "127.0.0.1:4100".parse().unwrap();
        let env = dependency_env("user-api", addr, EndpointProtocol::Http, "/v1");
        assert_eq!(env["USER_API_URL"], "http://127.0.0.1:4100/v1");
        assert_eq!(env["USER_API_HOST"], "127.0.0.1");
        assert_eq!(env["USER_API_PORT"], "4100");
        let env = dependency_env("db", addr, EndpointProtocol::Tcp, "/");
        assert_eq!(env["DB_URL"], "tcp://127.0.0.1:4100");
        let env = dependency_env("ws", addr, EndpointProtocol::WebSocket, "/");
        assert_eq!(env["WS_URL"], "ws://127.0.0.1:4100/");
        assert!(visible(Visibility::Project, "shop", "shop"));
        assert!(!visible(Visibility::Project, "shop", "other"));
        assert!(visible(Visibility::Organization, "shop", "other"));
        assert!(visible(Visibility::Public, "shop", "other"));
    }

    #[test]
    fn render_maps_endpoints_probes_and_limits() {
        let release: ReleaseSpec = serde_json::from_value(json!({
            "component": "web",
            "hash": "0123456789abcdef",
            "snapshot": {
                "type": "service",
                "workload": {"command": ["./web", "--fast"], "workingDir": "srv", "env": [{"name": "MODE", "value": "x"}]},
                "replicas": 3,
                "resources": {"limits": {"cpu": "250m", "memory": "64Mi"}},
                "probes": {
                    "readiness": {"httpGet": {"path": "/healthz", "port": 8080}},
                    "liveness": {"tcpSocket": {"port": 9000}}
                },
                "endpoints": [{"name": "http", "port": 8080}]
            }
        }))
        .unwrap();
        let id = WorkloadId {
            organization: "o".into(),
            project: "p".into(),
            environment: "dev".into(),
            component: "web".into(),
        };
        let w = render(id, "web-0123456789", &release);
        assert_eq!(w.command, ["./web", "--fast"]);
        assert_eq!(w.working_dir.as_deref(), Some("srv"));
        assert_eq!(w.env["MODE"], "x");
        assert_eq!(w.replicas, 3);
        assert_eq!(w.cpu_limit_millis, Some(250));
        assert_eq!(w.memory_limit, Some(64 * 1024 * 1024));
        assert_eq!(
            w.readiness.unwrap().probe,
            DpProbe::Http {
                port: "http".into(),
                path: "/healthz".into()
            }
        );
        // A probe on a port that is no endpoint gets a port of its own.
        assert_eq!(
            w.liveness.unwrap().probe,
            DpProbe::Tcp {
                port: "probe-9000".into()
            }
        );
        assert_eq!(
            w.ports
                .iter()
                .map(|p| (p.name.as_str(), p.container_port))
                .collect::<Vec<_>>(),
            [("http", 8080), ("probe-9000", 9000)]
        );
    }
}
