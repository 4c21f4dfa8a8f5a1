//! The job queue. A job is a ProvisionerJob (a workspace build, written by the workspace controller) or a
//! PipelineRun (written when a run starts); the queue's operations write its status, each as a conditional
//! write on the resourceVersion read, so two workers racing for a job cannot both win it. Both kinds share
//! every operation but the choice of job in [`claim`] (see [`claim_kind`]).
//!
//! - [`claim`] takes the oldest pending job a provisioner can run (its type offered, every tag of the job
//!   carried), or a running one whose lease expired, and gives it a new `epoch`: only the holder of the
//!   newest epoch may renew or complete the job.
//! - [`renew`] extends the lease and says whether the job was canceled.
//! - [`complete`] records the outcome once; repeating it with the same epoch and outcome answers the same.
//! - Jobs that no live provisioner can take say so in `status.waiting` ([`Provisioners::why_waiting`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use model::kinds::{ProvisionerJobSpec, ProvisionerType, Transition};
use model::{Kind, Resource};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use store::{Key, ListQuery, LogLine, Store, StoreError};
use tokio::sync::Notify;

/// How long a claim or renewal holds a workspace build.
pub const LEASE: Duration = Duration::from_secs(30);
/// How long a claim or renewal holds a pipeline run (its runner renews every 2 s): a run whose runner died is
/// taken by another within this.
pub const RUN_LEASE: Duration = Duration::from_secs(10);

/// How long a claim or renewal holds a job of this kind.
pub fn lease(kind: Kind) -> Duration {
    match kind {
        Kind::PipelineRun => RUN_LEASE,
        _ => LEASE,
    }
}
/// How long a provisioner counts as live after it last asked for work.
pub const PROVISIONER_LIVENESS: Duration = Duration::from_secs(30);
/// The most log lines a workspace build keeps; later lines are dropped with one notice.
pub const MAX_JOB_LOG_LINES: u64 = 20_000;
/// The most log lines a pipeline run keeps (a build's output can be long; tests print a line each).
pub const MAX_RUN_LOG_LINES: u64 = 5_000_000;

/// The most log lines a job of this kind keeps.
pub fn max_log_lines(kind: Kind) -> u64 {
    match kind {
        Kind::PipelineRun => MAX_RUN_LOG_LINES,
        _ => MAX_JOB_LOG_LINES,
    }
}

/// A job's phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for a provisioner.
    Pending,
    /// Held by a provisioner under a lease.
    Running,
    Succeeded,
    Failed,
    /// Canceled before or while it ran.
    Canceled,
}

impl Phase {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed | Phase::Canceled)
    }
}

/// The phase of a job object (pending when it has no status yet).
pub fn phase(job: &Resource) -> Phase {
    job.status
        .get("phase")
        .cloned()
        .and_then(|p| serde_json::from_value(p).ok())
        .unwrap_or(Phase::Pending)
}

/// The epoch of a job object (0 before its first claim).
pub fn epoch(job: &Resource) -> u64 {
    job.status.get("epoch").and_then(Value::as_u64).unwrap_or(0)
}

/// The log stream of a provisioner job.
pub fn log_stream(org: &str, job: &str) -> String {
    format!("job/{org}/{job}")
}

/// The log stream of a pipeline run.
pub fn run_log_stream(org: &str, run: &str) -> String {
    format!("run/{org}/{run}")
}

/// The log stream of any job.
pub fn log_stream_of(key: &Key) -> String {
    let org = key.organization.as_deref().unwrap_or_default();
    match key.kind {
        Kind::PipelineRun => run_log_stream(org, &key.name),
        _ => log_stream(org, &key.name),
    }
}

/// Whether a job's spec asks for it to stop.
fn canceled(job: &Resource) -> bool {
    job.spec.get("cancel").and_then(Value::as_bool) == Some(true)
}

/// A provisioner as the queue sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ProvisionerInfo {
    /// Its name, unique among live provisioners (e.g. `built-in` or a host name).
    pub name: String,
    /// The providers it runs.
    pub types: Vec<ProvisionerType>,
    /// Its tags.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Limits it to the jobs of one organization (none: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
}

impl ProvisionerInfo {
    /// Whether it can run a job of this organization and spec.
    pub fn can_take(&self, org: &str, spec: &ProvisionerJobSpec) -> bool {
        self.organization.as_deref().is_none_or(|o| o == org)
            && self.types.contains(&spec.provisioner)
            && spec.tags.iter().all(|(k, v)| self.tags.get(k) == Some(v))
    }
}

/// The provisioners that asked for work lately, and a wake-up for those waiting when a job is queued.
#[derive(Clone, Default)]
pub struct Provisioners {
    inner: Arc<ProvisionersInner>,
}

#[derive(Default)]
struct ProvisionersInner {
    seen: Mutex<HashMap<String, (ProvisionerInfo, Instant)>>,
    queued: Notify,
}

impl Provisioners {
    /// Records that a provisioner is alive and asking for work.
    pub fn seen(&self, info: &ProvisionerInfo) {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(info.name.clone(), (info.clone(), Instant::now()));
    }

    /// Forgets a provisioner that stopped.
    pub fn gone(&self, name: &str) {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.remove(name);
    }

    /// The live provisioners.
    pub fn live(&self) -> Vec<ProvisionerInfo> {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, (_, at)| at.elapsed() < PROVISIONER_LIVENESS);
        let mut out: Vec<ProvisionerInfo> = seen.values().map(|(i, _)| i.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Why a pending job waits, when no live provisioner can take it.
    pub fn why_waiting(&self, org: &str, spec: &ProvisionerJobSpec) -> Option<String> {
        if self.live().iter().any(|p| p.can_take(org, spec)) {
            return None;
        }
        let (tags, key) = if spec.tags.is_empty() {
            (String::new(), String::new())
        } else {
            let t: Vec<String> = spec.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let t = t.join(",");
            (
                format!(" with tags {t}"),
                format!(" with a provisioner key tagged {t}"),
            )
        };
        let kind = spec.provisioner.as_str();
        Some(format!(
            "no connected provisioner runs {kind} jobs{tags} for organization {org}; start one with `kiln provisioner start`{key}"
        ))
    }

    /// Wakes provisioners waiting for work.
    pub fn notify_queued(&self) {
        self.inner.queued.notify_waiters();
    }

    /// Waits until a job is queued or `timeout` passes.
    pub async fn wait_queued(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.inner.queued.notified()).await;
    }
}

/// A job won by a claim.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub key: Key,
    /// The job object as written by the claim.
    pub job: Resource,
    pub spec: ProvisionerJobSpec,
    pub epoch: u64,
}

/// Why a renewal or completion was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("job {0} does not exist")]
    NotFound(String),
    #[error("job {job}: epoch {given} is stale (the job is at epoch {current}, phase {phase:?}); another claim took it over")]
    Stale {
        job: String,
        given: u64,
        current: u64,
        phase: Phase,
    },
    #[error("job {job} already ended as {phase:?}")]
    AlreadyEnded { job: String, phase: Phase },
    #[error("a job cannot complete as {0:?}: an outcome is Succeeded, Failed or Canceled")]
    NotAnEnd(Phase),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn stamp(t: Timestamp) -> String {
    t.to_string()
}

/// Whether a job's lease ran out by `now` (a job without a readable lease counts as expired).
pub fn lease_expired(job: &Resource, now: Timestamp) -> bool {
    job.status
        .get("leaseExpires")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Timestamp>().ok())
        .is_none_or(|t| t <= now)
}

fn status_object(job: &Resource) -> serde_json::Map<String, Value> {
    job.status.as_object().cloned().unwrap_or_default()
}

/// Takes the oldest job `who` can run: a pending one, or a running one whose lease expired (re-queued with a
/// line in its log). `None` when there is none. A start build records `agent_token_hash` (the hash of the
/// token its agent will present) in `status.agentTokenHash`.
pub async fn claim(
    store: &Store,
    who: &ProvisionerInfo,
    agent_token_hash: &str,
) -> Result<Option<Claimed>, StoreError> {
    let claimed = claim_kind(
        store,
        Kind::ProvisionerJob,
        who.organization.clone(),
        "provisioner",
        &who.name,
        |org, job| {
            let spec = model::typed_spec::<ProvisionerJobSpec>(job).ok()?;
            if !who.can_take(org, &spec) {
                return None;
            }
            let mut extra = serde_json::Map::new();
            if spec.transition == Transition::Start {
                extra.insert("agentTokenHash".into(), json!(agent_token_hash));
            }
            Some(extra)
        },
    )
    .await?;
    Ok(claimed.and_then(|(key, job, epoch)| {
        let spec = model::typed_spec::<ProvisionerJobSpec>(&job).ok()?;
        Some(Claimed {
            key,
            job,
            spec,
            epoch,
        })
    }))
}

/// Takes the oldest job of `kind` (in `organization`, or any) that `fits` accepts: a pending one, or a running
/// one whose lease expired (re-queued with a line in its log saying so). `fits` answers the status fields to
/// add to the claim, or `None` to pass the job by. `worker` says what kind of worker takes it (`provisioner`,
/// `runner`) in the job's log, `holder` names it there and in `status.holder`. Answers the job's key, the job as written by the claim, and its new epoch.
pub async fn claim_kind(
    store: &Store,
    kind: Kind,
    organization: Option<String>,
    worker: &str,
    holder: &str,
    fits: impl Fn(&str, &Resource) -> Option<serde_json::Map<String, Value>>,
) -> Result<Option<(Key, Resource, u64)>, StoreError> {
    let query = ListQuery {
        kind: Some(kind),
        organization,
        ..ListQuery::default()
    };
    let mut jobs = store.list(&query).await?.items;
    jobs.sort_by(|a, b| {
        a.metadata
            .creation_timestamp
            .cmp(&b.metadata.creation_timestamp)
    });
    let now = Timestamp::now();
    for job in jobs {
        let Some(key) = Key::of(&job) else { continue };
        let org = key.organization.clone().unwrap_or_default();
        let p = phase(&job);
        let expired = p == Phase::Running && lease_expired(&job, now);
        if canceled(&job) || !(p == Phase::Pending || expired) {
            continue;
        }
        if job.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(extra) = fits(&org, &job) else {
            continue;
        };
        let next_epoch = epoch(&job) + 1;
        let mut status = status_object(&job);
        status.insert("phase".into(), json!(Phase::Running));
        status.insert("epoch".into(), json!(next_epoch));
        status.insert("holder".into(), json!(holder));
        status.insert("leaseExpires".into(), json!(stamp(now + lease(kind))));
        status.insert("startedAt".into(), json!(stamp(now)));
        status.remove("waiting");
        status.extend(extra);
        let rv = job.metadata.resource_version.as_deref();
        match store.update_status(&key, Value::Object(status), rv).await {
            Ok(written) => {
                let line = if expired {
                    let was = job
                        .status
                        .get("holder")
                        .and_then(Value::as_str)
                        .unwrap_or("?");
                    format!("the lease of {worker} {was} expired; re-queued and taken by {holder}")
                } else {
                    format!("taken by {worker} {holder}")
                };
                store
                    .append_logs(&log_stream_of(&key), vec![LogLine::now("queue", line)])
                    .await?;
                return Ok(Some((key, written, next_epoch)));
            }
            // Another worker won it, or it changed: try the next.
            Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// The job, checked to be held at `epoch` (a stale epoch is refused).
pub async fn held(store: &Store, key: &Key, epoch_given: u64) -> Result<Resource, JobError> {
    let job = match store.get(key).await {
        Ok(j) => j,
        Err(StoreError::NotFound(_)) => return Err(JobError::NotFound(key.name.clone())),
        Err(e) => return Err(e.into()),
    };
    let (current, p) = (epoch(&job), phase(&job));
    if current != epoch_given {
        return Err(JobError::Stale {
            job: key.name.clone(),
            given: epoch_given,
            current,
            phase: p,
        });
    }
    Ok(job)
}

/// What a renewal answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Renewed {
    /// Stop the job: it was canceled.
    pub cancel: bool,
    /// The job as the renewal wrote it.
    #[serde(skip)]
    pub job: Option<Resource>,
}

/// Appends a job's log lines, up to [`max_log_lines`] of its kind.
pub async fn append_job_logs(
    store: &Store,
    key: &Key,
    lines: Vec<LogLine>,
) -> Result<(), StoreError> {
    if lines.is_empty() {
        return Ok(());
    }
    let stream = log_stream_of(key);
    let have = store.last_log_seq(&stream).await?;
    let max = max_log_lines(key.kind);
    if have >= max {
        return Ok(());
    }
    let room = (max - have) as usize;
    let mut lines = lines;
    if lines.len() > room {
        lines.truncate(room.saturating_sub(1));
        lines.push(LogLine::now(
            "queue",
            format!("log limit of {max} lines reached; later lines are dropped"),
        ));
    }
    store.append_logs(&stream, lines).await?;
    Ok(())
}

/// Appends log lines of a job that is still held at `epoch` and running.
pub async fn append_held_logs(
    store: &Store,
    key: &Key,
    epoch_given: u64,
    lines: Vec<LogLine>,
) -> Result<(), JobError> {
    held_running(store, key, epoch_given).await?;
    append_job_logs(store, key, lines).await?;
    Ok(())
}

/// The job, checked to be held at `epoch` and not ended.
async fn held_running(store: &Store, key: &Key, epoch_given: u64) -> Result<Resource, JobError> {
    let job = held(store, key, epoch_given).await?;
    let p = phase(&job);
    if p.is_final() {
        return Err(ended(key, p));
    }
    Ok(job)
}

fn ended(key: &Key, phase: Phase) -> JobError {
    JobError::AlreadyEnded {
        job: key.name.clone(),
        phase,
    }
}

/// What an [`edit_held`] does with the job it read.
enum Edit {
    /// Write this status.
    Write(serde_json::Map<String, Value>),
    /// Leave the job as it is.
    Keep,
    /// Refuse: the job already ended as this.
    Ended(Phase),
}

/// Writes the job's status as `f` changes it, unless the job already ended.
fn unless_ended(job: &Resource, f: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Edit {
    let p = phase(job);
    if p.is_final() {
        return Edit::Ended(p);
    }
    let mut status = status_object(job);
    f(&mut status);
    Edit::Write(status)
}

/// Writes the status `edit` makes of the job held at `epoch` (read again after a conflicting write);
/// answers the job as written (or as read, for [`Edit::Keep`]).
async fn edit_held(
    store: &Store,
    key: &Key,
    epoch_given: u64,
    edit: impl Fn(&Resource) -> Edit,
) -> Result<Resource, JobError> {
    loop {
        let job = held(store, key, epoch_given).await?;
        let status = match edit(&job) {
            Edit::Write(s) => s,
            Edit::Keep => return Ok(job),
            Edit::Ended(p) => return Err(ended(key, p)),
        };
        let rv = job.metadata.resource_version.as_deref();
        match store.update_status(key, Value::Object(status), rv).await {
            Ok(written) => return Ok(written),
            Err(StoreError::Conflict { .. }) => continue,
            Err(StoreError::NotFound(_)) => return Err(JobError::NotFound(key.name.clone())),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Extends the lease of a job held at `epoch`, after appending its new log lines; answers whether it was
/// canceled. A stale epoch or an ended job is refused.
pub async fn renew(
    store: &Store,
    key: &Key,
    epoch_given: u64,
    logs: Vec<LogLine>,
) -> Result<Renewed, JobError> {
    let written = edit_held(store, key, epoch_given, |job| {
        unless_ended(job, |status| {
            status.insert(
                "leaseExpires".into(),
                json!(stamp(Timestamp::now() + lease(key.kind))),
            );
        })
    })
    .await?;
    append_job_logs(store, key, logs).await?;
    Ok(Renewed {
        cancel: canceled(&written),
        job: Some(written),
    })
}

/// Sets status fields of a job held at `epoch` and still running (a pipeline run's steps as they progress);
/// the queue's own fields (phase, epoch, holder, lease) cannot be set this way.
pub async fn update_held(
    store: &Store,
    key: &Key,
    epoch_given: u64,
    fields: serde_json::Map<String, Value>,
) -> Result<Resource, JobError> {
    edit_held(store, key, epoch_given, |job| {
        unless_ended(job, |status| {
            for (k, v) in &fields {
                if !QUEUE_FIELDS.contains(&k.as_str()) {
                    status.insert(k.clone(), v.clone());
                }
            }
        })
    })
    .await
}

/// The status fields only the queue writes.
const QUEUE_FIELDS: &[&str] = &[
    "phase",
    "epoch",
    "holder",
    "leaseExpires",
    "startedAt",
    "finishedAt",
];

/// How a job ended, as its provisioner reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// `Succeeded`, `Failed` or `Canceled`.
    pub phase: Phase,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// What the build made (e.g. a container id), kept on the job.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub outputs: Value,
}

/// Records how a job held at `epoch` ended, after its last log lines. Idempotent: the same outcome reported
/// again (a retry after a lost answer) succeeds without writing; a different one is refused.
pub async fn complete(
    store: &Store,
    key: &Key,
    epoch_given: u64,
    outcome: Outcome,
    logs: Vec<LogLine>,
) -> Result<Resource, JobError> {
    if !outcome.phase.is_final() {
        return Err(JobError::NotAnEnd(outcome.phase));
    }
    append_job_logs(store, key, logs).await?;
    edit_held(store, key, epoch_given, |job| {
        let p = phase(job);
        if p.is_final() {
            let same = p == outcome.phase
                && job.status.get("error").and_then(Value::as_str) == outcome.error.as_deref();
            return if same { Edit::Keep } else { Edit::Ended(p) };
        }
        unless_ended(job, |status| {
            status.insert("phase".into(), json!(outcome.phase));
            status.insert("finishedAt".into(), json!(stamp(Timestamp::now())));
            status.remove("leaseExpires");
            match &outcome.error {
                Some(e) => status.insert("error".into(), json!(e)),
                None => status.remove("error"),
            };
            if !outcome.outputs.is_null() {
                status.insert("outputs".into(), outcome.outputs.clone());
            }
        })
    })
    .await
}
