//! The Workspace controller: turns a workspace's desired state into builds (ProvisionerJobs) and its status
//! into the lifecycle `pending → starting → running → stopping → stopped → deleting → deleted`, or `failed`
//! with the reason.
//!
//! - One build at a time: a new build is queued only after the last one ended. A start build is queued when
//!   the workspace should run and the last build was not a start of the same template version and
//!   parameters; a stop build when it should stop after a start; a delete build when it is deleted after any
//!   build (finalizer `kiln.dev/workspace`). A failed build is not retried on its own: a change of the spec or
//!   of the annotation `kiln.dev/build-requested` (what `kiln workspace start` sets) queues the next one.
//! - Deleting a workspace whose build is still running cancels that build first.
//! - `spec.ttl` stops a running workspace that long after its last activity (or its start); `spec.autostart`
//!   starts a stopped one at the schedule's next time after it stopped. Both write `spec.state`, with the
//!   annotation `kiln.dev/state-changed-by` saying which did.
//! - The agent's part of the status (`status.agent`, `status.lastActivity`) is written by the server's agent
//!   hub; this controller keeps it as it found it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use model::kinds::{
    DesiredState, ProvisionerJobSpec, TemplateVersionSpec, Transition, WorkspaceSpec,
};
use model::{Kind, ObjectMeta, Resource};
use runtime::{Action, Cache, Context, Controller, Reconciler, StoreSource};
use serde_json::{json, Map, Value};
use store::{Key, ListQuery, Store, StoreError};

use crate::cleanup::{list_all, set_finalizer};
use crate::jobs::{self, Phase, Provisioners};
use crate::schedule::Plan;
use crate::status::{record_event, write_status, EventType, Written};
use crate::Error;

/// Finalizer that holds a deleted workspace until its delete build removed what it had.
pub const FINALIZER: &str = "kiln.dev/workspace";
/// Annotation whose change asks for a new build (e.g. to retry a failed one).
pub const BUILD_REQUESTED: &str = "kiln.dev/build-requested";
/// Annotation saying what last changed `spec.state` on its own (`ttl` or `autostart`).
pub const STATE_CHANGED_BY: &str = "kiln.dev/state-changed-by";
/// Builds kept per workspace (older jobs and their logs are deleted).
pub const BUILDS_KEPT: usize = 10;
/// How often a pending build re-checks whether a provisioner can take it.
const WAITING_RECHECK: Duration = Duration::from_secs(5);
/// Status field: why a due autostart waits (the organization's quota of running workspaces is full).
const AUTOSTART_HELD: &str = "autostartHeld";
/// How often a due autostart held back by the quota checks again.
const QUOTA_RECHECK: Duration = Duration::from_secs(60);
/// The longest a reconcile sleeps before re-checking its timers.
const MAX_TIMER: Duration = Duration::from_secs(3600);

/// Reconciles Workspaces.
pub struct WorkspaceController {
    store: Store,
    provisioners: Provisioners,
}

/// The controller, ready to run: Workspaces, re-checked when one of their jobs changes.
pub fn controller(store: Store, provisioners: Provisioners) -> Controller<WorkspaceController> {
    let workspaces = StoreSource::new(store.clone(), Kind::Workspace);
    let jobs = StoreSource::new(store.clone(), Kind::ProvisionerJob);
    Controller::new(
        "workspaces",
        workspaces,
        WorkspaceController {
            store,
            provisioners,
        },
    )
    .concurrency(4)
    .watches(jobs, workspace_of_job)
}

fn workspace_of_job(job: &Resource, _workspaces: &Cache) -> Vec<Key> {
    match job.spec.get("workspace").and_then(Value::as_str) {
        Some(ws) => vec![Key {
            kind: Kind::Workspace,
            organization: job.metadata.organization.clone(),
            project: None,
            name: ws.to_string(),
        }],
        None => Vec::new(),
    }
}

/// The name of a workspace's job for build `n`.
pub fn job_name(workspace: &str, n: u32) -> String {
    format!("{workspace}-build-{n}")
}

/// What a start build was made from; a start is rebuilt when these change.
fn start_inputs(spec: &WorkspaceSpec) -> Value {
    json!({"templateVersion": spec.template_version, "parameters": spec.parameters})
}

fn transition_phase(t: Transition) -> &'static str {
    match t {
        Transition::Start => "starting",
        Transition::Stop => "stopping",
        Transition::Delete => "deleting",
    }
}

fn ts(v: Option<&Value>) -> Option<Timestamp> {
    v.and_then(Value::as_str).and_then(|s| s.parse().ok())
}

fn store_err<'a>(what: &'static str, key: &'a Key) -> impl FnOnce(StoreError) -> Error + 'a {
    move |source| Error::Store {
        what,
        key: key.clone(),
        source,
    }
}

/// The last build as the status records it.
struct LastBuild {
    number: u32,
    transition: Transition,
    job: Option<Resource>,
    inputs: Value,
    requested: Value,
}

impl LastBuild {
    fn of(status: &Value) -> Option<LastBuild> {
        let b = status.get("build")?;
        Some(LastBuild {
            number: b.get("number")?.as_u64()? as u32,
            transition: serde_json::from_value(b.get("transition")?.clone()).ok()?,
            job: None,
            inputs: b.get("inputs").cloned().unwrap_or(Value::Null),
            requested: b.get("requested").cloned().unwrap_or(Value::Null),
        })
    }

    fn phase(&self) -> Phase {
        // A job that vanished (deleted by hand) counts as failed, so a new build can follow.
        self.job.as_ref().map(jobs::phase).unwrap_or(Phase::Failed)
    }

    fn error(&self) -> String {
        match &self.job {
            None => format!("the job of build {} is gone", self.number),
            Some(j) => match jobs::phase(j) {
                Phase::Canceled => format!("build {} was canceled", self.number),
                _ => j
                    .status
                    .get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the build failed")
                    .to_string(),
            },
        }
    }
}

impl WorkspaceController {
    async fn job(&self, org: &Option<String>, name: &str) -> Result<Option<Resource>, Error> {
        let key = Key {
            kind: Kind::ProvisionerJob,
            organization: org.clone(),
            project: None,
            name: name.to_string(),
        };
        match self.store.get(&key).await {
            Ok(j) => Ok(Some(j)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(source) => Err(Error::Store {
                what: "reading",
                key,
                source,
            }),
        }
    }

    /// Queues build `number` of the workspace; the error message (a missing template version) becomes the
    /// workspace's failure.
    async fn queue(
        &self,
        ws: &Resource,
        spec: &WorkspaceSpec,
        number: u32,
        transition: Transition,
        key: &Key,
    ) -> Result<Result<Resource, String>, Error> {
        let Some(version) = spec.template_version.clone() else {
            return Ok(Err("spec.templateVersion is not set".into()));
        };
        let vkey = Key {
            kind: Kind::TemplateVersion,
            organization: ws.metadata.organization.clone(),
            project: None,
            name: version.clone(),
        };
        let tv = match self.store.get(&vkey).await {
            Ok(v) => v,
            Err(StoreError::NotFound(_)) => {
                return Ok(Err(format!("template version {version} does not exist")))
            }
            Err(source) => {
                return Err(Error::Store {
                    what: "reading",
                    key: vkey,
                    source,
                })
            }
        };
        let tv = match model::typed_spec::<TemplateVersionSpec>(&tv) {
            Ok(s) => s,
            Err(e) => return Ok(Err(format!("template version {version}: {e}"))),
        };
        let job_spec = ProvisionerJobSpec {
            workspace: ws.metadata.name.clone(),
            build: number,
            transition,
            template_version: version,
            provisioner: tv.snapshot.provisioner,
            tags: tv.snapshot.provisioner_tags.clone(),
            owner: spec.owner.clone(),
            parameters: spec.parameters.clone(),
            cancel: false,
        };
        let mut labels = BTreeMap::new();
        labels.insert("kiln.dev/workspace".to_string(), ws.metadata.name.clone());
        let job = Resource {
            api_version: model::API_VERSION.to_string(),
            kind: Kind::ProvisionerJob.as_str().to_string(),
            metadata: ObjectMeta {
                name: job_name(&ws.metadata.name, number),
                organization: ws.metadata.organization.clone(),
                labels,
                ..ObjectMeta::default()
            },
            spec: serde_json::to_value(&job_spec).unwrap_or(Value::Null),
            status: Value::Null,
        };
        let created = match self.store.create(job).await {
            Ok(j) => j,
            // Queued by an earlier reconcile whose status write was lost: use it.
            Err(StoreError::AlreadyExists(jkey)) => self
                .store
                .get(&jkey)
                .await
                .map_err(store_err("reading", key))?,
            Err(source) => {
                return Err(Error::Store {
                    what: "queueing a build of",
                    key: key.clone(),
                    source,
                })
            }
        };
        self.provisioners.notify_queued();
        Ok(Ok(created))
    }

    /// Asks the provisioner running a job to stop.
    async fn cancel(&self, job: &Resource, key: &Key) -> Result<(), Error> {
        if job.spec.get("cancel").and_then(Value::as_bool) == Some(true) {
            return Ok(());
        }
        let Some(jkey) = Key::of(job) else {
            return Ok(());
        };
        let patch = json!({"spec": {"cancel": true}});
        match self.store.patch(&jkey, &patch, Ok).await {
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(()),
            Err(source) => Err(Error::Store {
                what: "canceling the build of",
                key: key.clone(),
                source,
            }),
        }
    }

    /// Deletes jobs (and their logs) beyond the newest [`BUILDS_KEPT`], or all of them.
    async fn prune(&self, ws: &Resource, key: &Key, keep: usize) -> Result<(), Error> {
        let query = ListQuery {
            kind: Some(Kind::ProvisionerJob),
            organization: ws.metadata.organization.clone(),
            selector: Some(format!("kiln.dev/workspace={}", ws.metadata.name)),
            ..ListQuery::default()
        };
        let mut items = list_all(&self.store, query, key).await?;
        if items.len() <= keep {
            return Ok(());
        }
        items.sort_by_key(|j| j.spec.get("build").and_then(Value::as_u64).unwrap_or(0));
        let extra = items.len() - keep;
        let org = ws.metadata.organization.clone().unwrap_or_default();
        for job in &items[..extra] {
            let Some(jkey) = Key::of(job) else { continue };
            match self.store.delete(&jkey, None).await {
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(source) => {
                    return Err(Error::Store {
                        what: "deleting an old build of",
                        key: key.clone(),
                        source,
                    })
                }
            }
            let stream = jobs::log_stream(&org, &jkey.name);
            self.store
                .delete_logs(&stream)
                .await
                .map_err(store_err("deleting build logs of", key))?;
        }
        Ok(())
    }

    /// Writes `spec.state` on behalf of the ttl or the autostart schedule.
    async fn set_state(
        &self,
        key: &Key,
        ws: &Resource,
        state: DesiredState,
        by: &str,
        message: String,
    ) -> Result<Action, Error> {
        let mut next = ws.clone();
        next.metadata
            .annotations
            .insert(STATE_CHANGED_BY.to_string(), by.to_string());
        next.spec["state"] = json!(state);
        match self.store.update(next).await {
            Ok(_) => {
                record_event(&self.store, key, EventType::Normal, by, message).await;
                Ok(Action::await_change())
            }
            Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {
                Ok(Action::requeue(crate::status::CONFLICT_RETRY))
            }
            Err(source) => Err(Error::Store {
                what: "changing the state of",
                key: key.clone(),
                source,
            }),
        }
    }

    /// Why an autostart must wait: the organization already runs as many workspaces as
    /// `spec.resourceQuotas.runningWorkspaces` allows (the quota a user's start is held to by the API).
    async fn quota_full(&self, key: &Key) -> Result<Option<String>, Error> {
        let Some(org) = key.organization.as_deref() else {
            return Ok(None);
        };
        let org_key = Key {
            kind: Kind::Organization,
            organization: None,
            project: None,
            name: org.to_string(),
        };
        let limit = match self.store.get(&org_key).await {
            Ok(o) => model::typed_spec::<model::kinds::OrganizationSpec>(&o)
                .ok()
                .and_then(|s| s.resource_quotas)
                .and_then(|q| q.running_workspaces),
            Err(_) => None,
        };
        let Some(limit) = limit else { return Ok(None) };
        let query = ListQuery {
            kind: Some(Kind::Workspace),
            organization: Some(org.to_string()),
            ..ListQuery::default()
        };
        let running = list_all(&self.store, query, key)
            .await?
            .iter()
            .filter(|w| w.metadata.name != key.name && w.metadata.deletion_timestamp.is_none())
            .filter(|w| w.spec.get("state").and_then(Value::as_str) == Some("running"))
            .count();
        Ok((running as u64 >= u64::from(limit)).then(|| {
            format!(
                "autostart is due, but organization {org} runs {running} of the {limit} workspace(s) spec.resourceQuotas.runningWorkspaces allows; it starts when one stops"
            )
        }))
    }

    /// The ttl and autostart timers of a settled workspace: `Some` when one fired (its action), or the time
    /// of the next check.
    async fn timers(
        &self,
        key: &Key,
        ws: &Resource,
        spec: &WorkspaceSpec,
        status: &Map<String, Value>,
        phase: &str,
        now: Timestamp,
    ) -> Result<Result<Action, Option<Duration>>, Error> {
        let finished = ts(status.get("build").and_then(|b| b.get("finishedAt")));
        if phase == "running" && spec.state == DesiredState::Running {
            if let Some(ttl) = spec
                .ttl
                .as_deref()
                .and_then(|t| model::kinds::parse_duration(t).ok())
            {
                let since = [finished, ts(status.get("lastActivity"))]
                    .into_iter()
                    .flatten()
                    .max()
                    .unwrap_or(now);
                let deadline = since + Duration::from_secs(ttl);
                if deadline <= now {
                    let message = format!(
                        "stopped after {} without activity (spec.ttl)",
                        spec.ttl.as_deref().unwrap_or("")
                    );
                    return self
                        .set_state(key, ws, DesiredState::Stopped, "ttl", message)
                        .await
                        .map(Ok);
                }
                return Ok(Err(Some(deadline.duration_since(now).unsigned_abs())));
            }
        }
        if phase == "stopped" && spec.state == DesiredState::Stopped {
            if let (Some(a), Some(stopped)) = (&spec.autostart, finished) {
                let Ok(plan) = Plan::cron(&a.schedule, a.timezone.as_deref(), "spec.autostart")
                else {
                    return Ok(Err(None));
                };
                if let Some(due) = plan.next_after(stopped) {
                    if due <= now {
                        if let Some(full) = self.quota_full(key).await? {
                            // The quota is checked again a minute later; the start happens once there is room.
                            if ws.status.get(AUTOSTART_HELD).and_then(Value::as_str) != Some(&full)
                            {
                                let mut status = ws.status.as_object().cloned().unwrap_or_default();
                                status.insert(AUTOSTART_HELD.into(), json!(full));
                                write_status(&self.store, key, ws, Value::Object(status)).await?;
                                record_event(
                                    &self.store,
                                    key,
                                    EventType::Warning,
                                    "autostart",
                                    full,
                                )
                                .await;
                            }
                            return Ok(Err(Some(QUOTA_RECHECK)));
                        }
                        let message = format!(
                            "started by spec.autostart ({} {})",
                            a.schedule,
                            plan.tz_name()
                        );
                        return self
                            .set_state(key, ws, DesiredState::Running, "autostart", message)
                            .await
                            .map(Ok);
                    }
                    return Ok(Err(Some(due.duration_since(now).unsigned_abs())));
                }
            }
        }
        Ok(Err(None))
    }
}

impl Reconciler for WorkspaceController {
    type Error = Error;

    async fn reconcile(&self, obj: Arc<Resource>, ctx: &Context) -> Result<Action, Error> {
        let key = &ctx.key;
        let deleting = obj.metadata.deletion_timestamp.is_some();
        if deleting && !obj.metadata.finalizers.iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        if !deleting {
            if let Some(action) = set_finalizer(&self.store, key, &obj, FINALIZER, true).await? {
                return Ok(action);
            }
        }
        let mut status: Map<String, Value> = obj.status.as_object().cloned().unwrap_or_default();
        let spec = match model::typed_spec::<WorkspaceSpec>(&obj) {
            Ok(s) => s,
            Err(e) => {
                if deleting {
                    return Ok(set_finalizer(&self.store, key, &obj, FINALIZER, false)
                        .await?
                        .unwrap_or_else(Action::await_change));
                }
                status.insert("phase".into(), json!("failed"));
                status.insert("reason".into(), json!(format!("invalid spec: {e}")));
                let written = write_status(&self.store, key, &obj, Value::Object(status)).await?;
                return Ok(written.action());
            }
        };
        let want = if deleting {
            Transition::Delete
        } else {
            match spec.state {
                DesiredState::Running => Transition::Start,
                DesiredState::Stopped => Transition::Stop,
            }
        };
        let requested = obj
            .metadata
            .annotations
            .get(BUILD_REQUESTED)
            .map(|v| json!(v))
            .unwrap_or(Value::Null);
        let mut last = LastBuild::of(&obj.status);
        if let Some(b) = last.as_mut() {
            b.job = self
                .job(
                    &obj.metadata.organization,
                    &job_name(&obj.metadata.name, b.number),
                )
                .await?;
        }
        let now = Timestamp::now();
        let mut action = Action::await_change();

        // A build in progress: wait for it (canceling it when the workspace is deleted meanwhile).
        if let Some(b) = last.as_ref().filter(|b| !b.phase().is_final()) {
            let job = b.job.as_ref().expect("a job in progress exists");
            if deleting && b.transition != Transition::Delete {
                self.cancel(job, key).await?;
            }
            status.insert("phase".into(), json!(transition_phase(b.transition)));
            status.remove("reason");
            if jobs::phase(job) == Phase::Pending {
                let org = obj.metadata.organization.as_deref().unwrap_or_default();
                let waiting = model::typed_spec::<ProvisionerJobSpec>(job)
                    .ok()
                    .and_then(|s| self.provisioners.why_waiting(org, &s));
                match waiting {
                    Some(w) => status.insert("waiting".into(), json!(w)),
                    None => status.remove("waiting"),
                };
                action = Action::requeue(WAITING_RECHECK);
            } else {
                status.remove("waiting");
            }
            let written = write_status(&self.store, key, &obj, Value::Object(status)).await?;
            return Ok(if written == Written::Stale {
                written.action()
            } else {
                action
            });
        }
        status.remove("waiting");
        if let Some(b) = &last {
            if let Some(job) = &b.job {
                if let Some(build) = status.get_mut("build").and_then(Value::as_object_mut) {
                    build.insert("phase".into(), json!(jobs::phase(job)));
                    if let Some(t) = job.status.get("finishedAt") {
                        build.insert("finishedAt".into(), t.clone());
                    }
                }
            }
        }

        // The last build ended (or there is none): is another one needed?
        let settled = match &last {
            None => want != Transition::Start,
            Some(b) => {
                let same_request = b.requested == requested;
                let ok = b.phase() == Phase::Succeeded;
                match want {
                    Transition::Start => {
                        b.transition == Transition::Start
                            && b.inputs == start_inputs(&spec)
                            && (ok || same_request)
                    }
                    Transition::Stop => {
                        b.transition == Transition::Stop && (ok || same_request)
                            || b.transition == Transition::Delete && ok
                    }
                    Transition::Delete => {
                        b.transition == Transition::Delete && (ok || same_request)
                    }
                }
            }
        };
        if settled {
            let (phase, reason) = match &last {
                None if deleting => ("deleted", None),
                None => ("stopped", None),
                Some(b) => match (b.phase(), b.transition) {
                    (Phase::Succeeded, Transition::Start) => ("running", None),
                    (Phase::Succeeded, Transition::Stop) => ("stopped", None),
                    (Phase::Succeeded, Transition::Delete) => ("deleted", None),
                    (_, t) => (
                        "failed",
                        Some(format!("{} failed: {}", t.as_str(), b.error())),
                    ),
                },
            };
            if deleting && phase == "deleted" {
                self.prune(&obj, key, 0).await?;
                return Ok(set_finalizer(&self.store, key, &obj, FINALIZER, false)
                    .await?
                    .unwrap_or_else(Action::await_change));
            }
            let was = obj
                .status
                .get("phase")
                .and_then(Value::as_str)
                .map(str::to_string);
            status.insert("phase".into(), json!(phase));
            if phase != "stopped" {
                status.remove(AUTOSTART_HELD);
            }
            match &reason {
                Some(r) => status.insert("reason".into(), json!(r)),
                None => status.remove("reason"),
            };
            let written =
                write_status(&self.store, key, &obj, Value::Object(status.clone())).await?;
            if written == Written::Stale {
                return Ok(written.action());
            }
            if written == Written::Updated && was.as_deref() != Some(phase) {
                let (t, message) = match &reason {
                    Some(r) => (EventType::Warning, r.clone()),
                    None => (EventType::Normal, format!("workspace is {phase}")),
                };
                record_event(&self.store, key, t, phase, message).await;
            }
            if !deleting {
                match self.timers(key, &obj, &spec, &status, phase, now).await? {
                    Ok(action) => return Ok(action),
                    Err(Some(next)) => return Ok(Action::requeue(next.min(MAX_TIMER))),
                    Err(None) => {}
                }
            }
            return Ok(Action::await_change());
        }

        // Queue the next build.
        let number = last.as_ref().map_or(1, |b| b.number + 1);
        match self.queue(&obj, &spec, number, want, key).await? {
            Ok(job) => {
                status.insert(
                    "build".into(),
                    json!({
                        "number": number,
                        "transition": want,
                        "job": job.metadata.name,
                        "templateVersion": spec.template_version,
                        "inputs": if want == Transition::Start { start_inputs(&spec) } else {
                            last.as_ref().map(|b| b.inputs.clone()).unwrap_or(Value::Null)
                        },
                        "requested": requested,
                        "phase": Phase::Pending,
                    }),
                );
                status.insert("phase".into(), json!(transition_phase(want)));
                status.remove("reason");
                let written = write_status(&self.store, key, &obj, Value::Object(status)).await?;
                record_event(
                    &self.store,
                    key,
                    EventType::Normal,
                    "BuildQueued",
                    format!(
                        "build {number} ({}) queued as job {}",
                        want.as_str(),
                        job.metadata.name
                    ),
                )
                .await;
                self.prune(&obj, key, BUILDS_KEPT).await?;
                Ok(if written == Written::Stale {
                    written.action()
                } else {
                    Action::requeue(WAITING_RECHECK)
                })
            }
            Err(why) => {
                if deleting {
                    // Nothing can build the deletion: let the workspace go, saying what may be left.
                    let message = format!(
                        "deleted without a delete build ({why}); what its builds made may remain"
                    );
                    record_event(
                        &self.store,
                        key,
                        EventType::Warning,
                        "DeletedWithoutBuild",
                        message,
                    )
                    .await;
                    self.prune(&obj, key, 0).await?;
                    return Ok(set_finalizer(&self.store, key, &obj, FINALIZER, false)
                        .await?
                        .unwrap_or_else(Action::await_change));
                }
                status.insert("phase".into(), json!("failed"));
                status.insert("reason".into(), json!(why));
                let written = write_status(&self.store, key, &obj, Value::Object(status)).await?;
                Ok(written.action())
            }
        }
    }
}
