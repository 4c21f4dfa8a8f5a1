//! The ReleaseBinding controller: runs a binding's release in its environment. It renders the release into a
//! data-plane [`Workload`], applies it with the driver of the environment's DataPlane, and reads the replicas'
//! health back into the binding's conditions: `Ready` (all replicas ready), `Progressing` (still converging) and
//! `Degraded` (a replica crashed, saying why: exit code and last lines). A finalizer removes the workload before
//! the binding goes; an `undeployed` binding runs nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use dataplane::{
    DataPlane, PortSpec, Probe as DpProbe, ProbeSpec, ReplicaState, Workload, WorkloadId,
    WorkloadStatus,
};
use model::kinds::{
    BindingState, DataPlaneSpec, DataPlaneType, EnvironmentSpec, Probe, ReleaseBindingSpec,
    ReleaseSpec,
};
use model::{ConditionStatus, Kind, Resource};
use runtime::conditions::{new_condition, set_condition};
use runtime::{Action, Context, Controller, Reconciler, StoreSource};
use serde_json::{json, Value};
use store::{Key, Store, StoreError};

use crate::status::{record_event, write_status, EventType};
use crate::Error;

/// Finalizer that holds a binding until its workload is removed from the data plane.
pub const FINALIZER: &str = "kiln.dev/workload";
/// How often a binding is re-checked while it converges, and once it is ready.
const PROGRESS_RECHECK: Duration = Duration::from_millis(500);
const READY_RECHECK: Duration = Duration::from_secs(15);

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

/// Reconciles ReleaseBindings.
pub struct BindingController {
    store: Store,
    drivers: Drivers,
}

pub(crate) fn controller(store: Store, drivers: Drivers) -> Controller<BindingController> {
    let bindings = StoreSource::new(store.clone(), Kind::ReleaseBinding);
    Controller::new(
        "releasebindings",
        bindings,
        BindingController { store, drivers },
    )
    .concurrency(8)
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
    let (ready, desired) = ws.map(|s| (s.ready(), s.desired)).unwrap_or((0, 0));
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
    let all_ready = ws.is_some()
        && ready == desired
        && ws.is_some_and(|s| {
            s.replicas.iter().filter(|r| r.release == release).count() as u32 >= desired
        });
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
            for r in s.replicas.iter().filter(|r| r.ready) {
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

impl BindingController {
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
        let workload = render(id.clone(), &spec.release, &release);
        let before = status
            .get("release")
            .and_then(Value::as_str)
            .map(str::to_owned);
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
    use super::*;

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
