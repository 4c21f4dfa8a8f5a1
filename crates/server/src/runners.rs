//! Pipeline runners: the built-in runner and `kiln runner` processes, over one queue (PipelineRuns claimed with
//! `controllers::jobs`, the queue workspace builds use too), each running [`ci::worker`]'s loop.
//!
//! - The built-in runner has no labels; it runs container steps and services when the server reaches a
//!   Docker Engine. It works in `<data>/runs`, keeps step caches in `<data>/cache`.
//! - `kiln runner` authenticates with a runner token (`kiln runner tokens create`, one organization) and says
//!   its name, labels, capacity and whether it has a Docker Engine. `POST /api/v1/runner/acquire` waits up to
//!   `wait` seconds for a run it can take (every label the pipeline asks for carried; a Docker Engine when a
//!   step or service needs one) and claims it, answering the run with its secrets; then
//!   `POST /api/v1/runner/runs/{org}/{name}/logs|renew|steps|complete` and
//!   `PUT …/artifacts/{path}` with the claim's `epoch`: a stale epoch, an ended run or another token's run is
//!   refused (`409`/`404`), which tells the runner to stop. Renewals answer cancellation and approvals.
//! - A run's lease lasts [`jobs::RUN_LEASE`]; its runner renews every 2 s. When a runner stops renewing (it
//!   was killed), the run is taken by another runner once the lease expires and its interrupted steps go on
//!   with the attempts they have left; a step with none left fails the run, naming the runner that was lost.
//! - A pending run that no live runner can take says why in `status.waiting`.
//! - Artifacts are kept in `<data>/artifacts/<org>/<run>/<path>` on the server that received them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ci::worker::{Line, QueueError, Renewal};
use ci::{RunEnd, RunJob, StepPhase, StepStatus};
use controllers::jobs::{self, JobError, Outcome, Phase};
use futures_util::StreamExt as _;
use model::kinds::{expand_steps, PipelineRunSpec, PipelineSpec};
use model::{Kind, Resource};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use store::{Key, ListQuery, LogLine, Store, StoreError};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::{watch, Notify};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::keys::{self, KeyRecord, RUNNER_TOKENS};
use crate::rbac::{self, Verb};
use crate::resources::{decode_json, read_body};
use crate::routes::{Api, Op};
use crate::workspaces::org_key;
use crate::AppState;

/// Runs the built-in runner holds at once.
pub const RUNS: usize = 2;
/// Steps one run of the built-in runner runs at once.
pub const CAPACITY: usize = 4;
/// The built-in runner's name.
pub const BUILT_IN: &str = "built-in";
/// How long a runner counts as live after it last asked for work.
const LIVENESS: Duration = Duration::from_secs(30);
/// The longest an acquire waits for a run.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// How long an acquire waits when the request does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(20);
/// The largest artifact file taken.
const MAX_ARTIFACT: usize = 1 << 30;

/// A runner as the queue sees it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunnerInfo {
    /// Unique among live runners: `built-in`, or `<org>/<token>/<name>`.
    pub name: String,
    /// Limits it to one organization's runs (none: any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub organization: Option<String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// It has a Docker Engine (container steps, services).
    #[serde(default)]
    pub docker: bool,
    /// Runs it holds at once.
    #[serde(default)]
    pub capacity: u32,
}

impl RunnerInfo {
    /// Whether it can run a run of this organization and pipeline.
    pub fn can_take(&self, org: &str, spec: &PipelineSpec) -> bool {
        self.organization.as_deref().is_none_or(|o| o == org)
            && spec
                .runner_labels
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v))
            && (self.docker || !ci::needs_docker(spec))
    }
}

/// The run queue's wake-up for waiting runners, and the runners that asked for work lately.
#[derive(Clone, Default)]
pub struct RunQueue {
    inner: Arc<QueueInner>,
}

#[derive(Default)]
struct QueueInner {
    queued: Notify,
    seen: Mutex<HashMap<String, (RunnerInfo, Instant)>>,
}

impl RunQueue {
    /// Wakes the runners waiting for work.
    pub(crate) fn queued(&self) {
        self.inner.queued.notify_waiters();
    }

    /// A wake-up for the next queued run, registered now: a run queued between this call and the wait
    /// still wakes it.
    fn next_queued(&self) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut n = Box::pin(self.inner.queued.notified());
        n.as_mut().enable();
        n
    }

    fn seen(&self, info: &RunnerInfo) {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.insert(info.name.clone(), (info.clone(), Instant::now()));
    }

    /// The live runners.
    pub fn live(&self) -> Vec<RunnerInfo> {
        let mut seen = self.inner.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, (_, at)| at.elapsed() < LIVENESS);
        let mut out: Vec<RunnerInfo> = seen.values().map(|(i, _)| i.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Why a pending run waits, when no live runner can take it.
    pub fn why_waiting(&self, org: &str, spec: &PipelineSpec) -> Option<String> {
        let live = self.live();
        if live.iter().any(|r| r.can_take(org, spec)) {
            return None;
        }
        let labels: Vec<String> = spec
            .runner_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut needs = Vec::new();
        if !labels.is_empty() {
            needs.push(format!("the labels {}", labels.join(",")));
        }
        if ci::needs_docker(spec) {
            needs.push("a Docker Engine (for its container steps or services)".to_string());
        }
        let flags = if labels.is_empty() {
            String::new()
        } else {
            format!(" --labels {}", labels.join(","))
        };
        Some(format!(
            "no connected runner has {}; start one with `kiln runner --token T{flags}`",
            if needs.is_empty() {
                "access to this organization".to_string()
            } else {
                needs.join(" and ")
            }
        ))
    }
}

pub fn register(api: Api) -> Api {
    api.op(
        Op::new(
            Method::POST,
            "/api/v1/orgs/{org}/runnertokens",
            "createRunnerToken",
            "pipelines",
            "Creates a runner token (administrators); the token is shown once",
        )
        .returns(201, None),
        keys::create_handler::<RunnerTokens>,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/runnertokens",
            "listRunnerTokens",
            "pipelines",
            "The organization's runner tokens: name, who made each and when (administrators)",
        )
        .returns(200, None),
        keys::list_handler::<RunnerTokens>,
    )
    .op(
        Op::new(
            Method::DELETE,
            "/api/v1/orgs/{org}/runnertokens/{name}",
            "deleteRunnerToken",
            "pipelines",
            "Deletes a runner token: runners using it are refused from their next request",
        )
        .returns(204, None),
        keys::delete_handler::<RunnerTokens>,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/runners",
            "listRunners",
            "pipelines",
            "The runners that asked this server for the organization's runs lately: built-in and external, with labels, capacity and Docker",
        )
        .returns(200, None),
        list_live,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/runner/acquire",
            "runnerAcquire",
            "pipelines",
            "A runner (authenticated with a runner token) waits for a run it can take and claims it; 204 when none came in time",
        )
        .public()
        .query("wait", "Seconds to wait for a run (default 20, at most 30)")
        .returns(200, None),
        acquire,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/runner/runs/{org}/{name}/{op}",
            "runnerRunOperation",
            "pipelines",
            "An operation on a run the runner holds (epoch of its claim): logs (append lines), renew (extend the \
             lease; answers cancel and approvals), steps (record the steps' status), complete (record the end; \
             idempotent)",
        )
        .public()
        .returns(200, None),
        run_op,
    )
    .op(
        Op::new(
            Method::PUT,
            "/api/v1/runner/runs/{org}/{name}/artifacts/{*path}",
            "runnerArtifact",
            "pipelines",
            "Saves one artifact file of a run the runner holds (?epoch= of its claim); the body is the file",
        )
        .public()
        .query("epoch", "The claim's epoch")
        .query("executable", "true: the file is an executable (kept with mode 0755)")
        .returns(200, None),
        put_artifact,
    )
}

/// Runner tokens' routes.
pub(crate) struct RunnerTokens;

impl keys::Keys for RunnerTokens {
    const KIND: &'static keys::KeyKind = &RUNNER_TOKENS;
}

async fn list_live(
    State(state): State<AppState>,
    principal: Principal,
    Path(org): Path<String>,
) -> ApiResult<Json<Value>> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    access.check(
        Verb::List,
        Kind::Pipeline,
        None,
        &format!("runners of organization {org}"),
    )?;
    let items: Vec<Value> = state
        .runs
        .live()
        .into_iter()
        .filter(|r| r.organization.as_deref().is_none_or(|o| o == org))
        .map(|r| {
            json!({
                "name": r.name,
                "builtIn": r.organization.is_none(),
                "labels": r.labels,
                "docker": r.docker,
                "capacity": r.capacity,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

/// Fails the runs whose runner stopped renewing while a step with no attempts left ran (they cannot be
/// retried elsewhere), and leaves the others to be taken again.
async fn fail_lost_runs(store: &Store) -> Result<(), StoreError> {
    let query = ListQuery {
        kind: Some(Kind::PipelineRun),
        ..ListQuery::default()
    };
    let now = jiff::Timestamp::now();
    for run in store.list(&query).await?.items {
        if jobs::phase(&run) != Phase::Running {
            continue;
        }
        let expired = jobs::lease_expired(&run, now);
        let Some(key) = Key::of(&run) else { continue };
        let Ok(spec) = model::typed_spec::<PipelineRunSpec>(&run) else {
            continue;
        };
        if !expired || spec.cancel {
            continue;
        }
        let holder = run.status["holder"].as_str().unwrap_or("?").to_string();
        let mut steps: Vec<StepStatus> =
            serde_json::from_value(run.status["steps"].clone()).unwrap_or_default();
        let expanded = expand_steps(&spec.snapshot.steps);
        let mut exhausted = None;
        for st in steps.iter_mut().filter(|s| s.phase == StepPhase::Running) {
            let allowed = expanded
                .iter()
                .find(|s| s.name == st.name)
                .and_then(|s| s.retry.as_ref())
                .map_or(1, |r| r.attempts.max(1));
            if st.attempts >= allowed {
                let why = format!(
                    "runner {holder} was lost while the step ran (its lease expired) and its retry policy \
                     allows no other attempt ({} of {allowed} made)",
                    st.attempts
                );
                st.phase = StepPhase::Failed;
                st.reason = Some(why.clone());
                exhausted.get_or_insert(format!("step {} failed: {why}", st.name));
            }
        }
        let Some(error) = exhausted else { continue };
        let epoch = jobs::epoch(&run);
        let mut fields = Map::new();
        fields.insert("steps".into(), json!(steps));
        if jobs::update_held(store, &key, epoch, fields).await.is_err() {
            continue;
        }
        let outcome = Outcome {
            phase: Phase::Failed,
            error: Some(error.clone()),
            outputs: Value::Null,
        };
        let line = LogLine::now("queue", format!("the run ended as Failed: {error}"));
        let _ = jobs::complete(store, &key, epoch, outcome, vec![line]).await;
    }
    Ok(())
}

/// Keeps each pending run's `status.waiting` saying why no live runner can take it (or nothing).
async fn refresh_waiting(store: &Store, queue: &RunQueue) -> Result<(), StoreError> {
    let query = ListQuery {
        kind: Some(Kind::PipelineRun),
        ..ListQuery::default()
    };
    for run in store.list(&query).await?.items {
        if jobs::phase(&run) != Phase::Pending {
            continue;
        }
        let (Some(key), Ok(spec)) = (Key::of(&run), model::typed_spec::<PipelineRunSpec>(&run))
        else {
            continue;
        };
        let org = key.organization.clone().unwrap_or_default();
        let why = queue.why_waiting(&org, &spec.snapshot);
        if run.status.get("waiting").and_then(Value::as_str) == why.as_deref() {
            continue;
        }
        let mut status = run.status.as_object().cloned().unwrap_or_default();
        match why {
            Some(w) => status.insert("waiting".into(), json!(w)),
            None => status.remove("waiting"),
        };
        let rv = run.metadata.resource_version.as_deref();
        match store.update_status(&key, Value::Object(status), rv).await {
            Ok(_) | Err(StoreError::Conflict { .. } | StoreError::NotFound(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Claims the oldest run `who` can take and makes its job (secrets resolved, attempts already made).
async fn claim(
    store: &Store,
    sealer: &crate::secrets::Sealer,
    who: &RunnerInfo,
) -> Result<Option<RunJob>, StoreError> {
    fail_lost_runs(store).await?;
    let fits = |org: &str, run: &Resource| {
        let spec: PipelineRunSpec = model::typed_spec(run).ok()?;
        who.can_take(org, &spec.snapshot).then(Map::new)
    };
    let claimed = jobs::claim_kind(
        store,
        Kind::PipelineRun,
        who.organization.clone(),
        "runner",
        &who.name,
        fits,
    )
    .await?;
    let Some((key, run, epoch)) = claimed else {
        return Ok(None);
    };
    let org = key.organization.clone().unwrap_or_default();
    let spec: PipelineRunSpec = match model::typed_spec(&run) {
        Ok(s) => s,
        Err(e) => {
            fail_claimed(store, &key, epoch, format!("the run's spec: {e}")).await;
            return Ok(None);
        }
    };
    let (secrets, secret_files) = match resolve_secrets(store, sealer, &org, &spec.snapshot).await {
        Ok(s) => s,
        Err(e) => {
            fail_claimed(store, &key, epoch, e).await;
            return Ok(None);
        }
    };
    // Steps that were running when an earlier holder was lost keep the attempts it made.
    let before: Vec<StepStatus> =
        serde_json::from_value(run.status["steps"].clone()).unwrap_or_default();
    let attempts_used = before
        .iter()
        .filter(|s| s.phase == StepPhase::Running && s.attempts > 0)
        .map(|s| (s.name.clone(), s.attempts))
        .collect();
    Ok(Some(RunJob {
        organization: org,
        name: key.name.clone(),
        epoch,
        spec,
        secrets,
        secret_files,
        attempts_used,
    }))
}

async fn fail_claimed(store: &Store, key: &Key, epoch: u64, error: String) {
    let end = RunEnd {
        outcome: ci::Outcome::Failed,
        error: Some(error),
        commit: None,
        steps: Vec::new(),
        outputs: BTreeMap::new(),
    };
    if let Err(e) = complete(store, FsPath::new(""), key, epoch, &end, Vec::new()).await {
        tracing::warn!(error = %e, run = %key.name, "failing a run");
    }
}

/// Step → environment variable → value.
type StepSecrets = BTreeMap<String, BTreeMap<String, String>>;

/// Each step's secrets given as variables and as files (step → variable → value), read from the organization's
/// Secrets.
async fn resolve_secrets(
    store: &Store,
    sealer: &crate::secrets::Sealer,
    org: &str,
    spec: &PipelineSpec,
) -> Result<(StepSecrets, StepSecrets), String> {
    let (mut vars, mut files) = (StepSecrets::new(), StepSecrets::new());
    for step in &spec.steps {
        for r in &step.secrets {
            let value = crate::secrets::value(store, sealer, org, &r.secret, &r.key)
                .await
                .map_err(|e| format!("step {}: {e}", step.name))?;
            let out = if r.file { &mut files } else { &mut vars };
            out.entry(step.name.clone())
                .or_default()
                .insert(r.env.clone(), String::from_utf8_lossy(&value).into_owned());
        }
    }
    Ok((vars, files))
}

fn stamp(lines: Vec<Line>) -> Vec<LogLine> {
    lines
        .into_iter()
        .map(|(source, text)| LogLine::now(source, text))
        .collect()
}

fn run_key(org: &str, name: &str) -> Key {
    org_key(Kind::PipelineRun, org, name)
}

/// Extends a held run's lease after appending its lines; answers cancellation and the approvals so far.
async fn renew(
    store: &Store,
    key: &Key,
    epoch: u64,
    lines: Vec<Line>,
) -> Result<Renewal, JobError> {
    let r = jobs::renew(store, key, epoch, stamp(lines)).await?;
    let approvals = r
        .job
        .and_then(|j| model::typed_spec::<PipelineRunSpec>(&j).ok())
        .map(|s| s.approvals)
        .unwrap_or_default();
    Ok(Renewal {
        cancel: r.cancel,
        approvals,
    })
}

/// Records a held run's steps (and the commit checked out).
async fn record_steps(
    store: &Store,
    key: &Key,
    epoch: u64,
    steps: &[StepStatus],
    commit: Option<&str>,
) -> Result<(), JobError> {
    let mut fields = Map::new();
    fields.insert("steps".into(), json!(steps));
    if let Some(c) = commit {
        fields.insert("commit".into(), json!(c));
    }
    jobs::update_held(store, key, epoch, fields)
        .await
        .map(|_| ())
}

/// Records how a held run ended: its steps, commit, outputs and saved artifacts (`status.artifacts`, their
/// directory in `status.artifactsDir`), then its outcome after its last lines.
async fn complete(
    store: &Store,
    data_dir: &FsPath,
    key: &Key,
    epoch: u64,
    end: &RunEnd,
    lines: Vec<Line>,
) -> Result<(), JobError> {
    if !end.steps.is_empty() {
        // A repeated completion finds the run ended; the outcome below answers for it.
        let _ = record_steps(store, key, epoch, &end.steps, end.commit.as_deref()).await;
    }
    let dir = artifacts_dir(
        data_dir,
        key.organization.as_deref().unwrap_or_default(),
        &key.name,
    );
    let saved = list_artifacts(&dir).await;
    if !saved.is_empty() {
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        let mut fields = Map::new();
        let paths: Vec<&str> = saved.iter().map(|(p, _)| p.as_str()).collect();
        fields.insert("artifacts".into(), json!(paths));
        fields.insert("artifactsDir".into(), json!(dir.to_string_lossy()));
        let _ = jobs::update_held(store, key, epoch, fields).await;
    }
    let outcome = Outcome {
        phase: match end.outcome {
            ci::Outcome::Succeeded => Phase::Succeeded,
            ci::Outcome::Failed => Phase::Failed,
            ci::Outcome::Canceled => Phase::Canceled,
        },
        error: end.error.clone(),
        outputs: if end.outputs.is_empty() {
            Value::Null
        } else {
            json!(end.outputs)
        },
    };
    jobs::complete(store, key, epoch, outcome, stamp(lines))
        .await
        .map(|_| ())
}

/// Where a run's artifacts are kept.
pub fn artifacts_dir(data_dir: &FsPath, org: &str, run: &str) -> PathBuf {
    data_dir.join("artifacts").join(org).join(run)
}

/// The artifact files under `dir` (path relative to it, size), sorted; at most 10,000. Files being written
/// (`.<name>.part`) are left out.
pub(crate) async fn list_artifacts(dir: &FsPath) -> Vec<(String, u64)> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        ci::files_under(&dir)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
            })
            .take(10_000)
            .filter_map(|p| {
                let size = std::fs::metadata(&p).ok()?.len();
                let rel = p.strip_prefix(&dir).ok()?.to_string_lossy().into_owned();
                Some((rel, size))
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

/// Checks an artifact's path: relative, inside the run's directory, at most 1024 bytes.
pub fn check_artifact_path(path: &str) -> Result<(), String> {
    let ok = !path.is_empty()
        && path.len() <= 1024
        && !path.starts_with('/')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
        && !path.contains('\0');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "artifact path {path:?} must be relative, without empty, '.' or '..' parts"
        ))
    }
}

/// Writes an artifact from a stream of chunks (to a temporary file first, so a reader never sees half), with
/// mode 0755 when it is an executable, else 0644.
async fn write_artifact<S, E>(
    dir: &FsPath,
    path: &str,
    executable: bool,
    mut body: S,
) -> Result<u64, String>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Display,
{
    check_artifact_path(path)?;
    let target = dir.join(path);
    let parent = target.parent().unwrap_or(dir).to_path_buf();
    tokio::fs::create_dir_all(&parent)
        .await
        .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    let tmp = parent.join(format!(
        ".{}.part",
        target.file_name().unwrap_or_default().to_string_lossy()
    ));
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let mut size = 0u64;
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| format!("reading the artifact: {e}"))?;
        size += chunk.len() as u64;
        if size > MAX_ARTIFACT as u64 {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(format!(
                "artifact {path} is larger than {MAX_ARTIFACT} bytes"
            ));
        }
        f.write_all(&chunk)
            .await
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
    }
    f.flush().await.map_err(|e| e.to_string())?;
    let mode = if executable { 0o755 } else { 0o644 };
    use std::os::unix::fs::PermissionsExt as _;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| format!("setting the mode of {}: {e}", tmp.display()))?;
    drop(f);
    tokio::fs::rename(&tmp, &target)
        .await
        .map_err(|e| format!("saving {}: {e}", target.display()))?;
    Ok(size)
}

/// The queue as the built-in runner reaches it: the store itself.
struct StoreQueue {
    store: Store,
    sealer: Arc<crate::secrets::Sealer>,
    queue: RunQueue,
    info: RunnerInfo,
    data_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
}

fn lost(e: JobError) -> QueueError {
    match e {
        JobError::Store(e) => QueueError::Unavailable(e.to_string()),
        e => QueueError::Lost(e.to_string()),
    }
}

impl ci::worker::Queue for StoreQueue {
    async fn acquire(&self) -> Result<Option<RunJob>, QueueError> {
        self.queue.seen(&self.info);
        let queued = self.queue.next_queued();
        let claimed = claim(&self.store, &self.sealer, &self.info)
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        if claimed.is_some() {
            return Ok(claimed);
        }
        if let Err(e) = refresh_waiting(&self.store, &self.queue).await {
            tracing::debug!(error = %e, "refreshing why runs wait");
        }
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            () = queued => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
        }
        Ok(None)
    }

    async fn logs(&self, job: &RunJob, lines: Vec<Line>) -> Result<(), QueueError> {
        let key = run_key(&job.organization, &job.name);
        jobs::append_held_logs(&self.store, &key, job.epoch, stamp(lines))
            .await
            .map_err(lost)
    }

    async fn renew(&self, job: &RunJob, lines: Vec<Line>) -> Result<Renewal, QueueError> {
        let key = run_key(&job.organization, &job.name);
        renew(&self.store, &key, job.epoch, lines)
            .await
            .map_err(lost)
    }

    async fn steps(
        &self,
        job: &RunJob,
        steps: &[StepStatus],
        commit: Option<&str>,
    ) -> Result<(), QueueError> {
        let key = run_key(&job.organization, &job.name);
        record_steps(&self.store, &key, job.epoch, steps, commit)
            .await
            .map_err(lost)
    }

    async fn artifact(&self, job: &RunJob, path: &str, file: &FsPath) -> Result<(), QueueError> {
        let dir = artifacts_dir(&self.data_dir, &job.organization, &job.name);
        let f = tokio::fs::File::open(file)
            .await
            .map_err(|e| QueueError::Unavailable(format!("reading {}: {e}", file.display())))?;
        let executable = ci::worker::is_executable(&f).await;
        write_artifact(&dir, path, executable, ci::worker::file_chunks(f))
            .await
            .map(|_| ())
            .map_err(QueueError::Unavailable)
    }

    async fn complete(
        &self,
        job: &RunJob,
        end: &RunEnd,
        lines: Vec<Line>,
    ) -> Result<(), QueueError> {
        let key = run_key(&job.organization, &job.name);
        complete(&self.store, &self.data_dir, &key, job.epoch, end, lines)
            .await
            .map_err(lost)
    }

    fn log_flush(&self) -> Duration {
        Duration::from_millis(200)
    }
}

/// Starts the built-in runner; it stops taking runs when `shutdown` flips, and ends once the runs under way
/// are canceled (their steps stopped), or after 15 s.
pub fn spawn_builtin(
    store: Store,
    sealer: Arc<crate::secrets::Sealer>,
    queue: RunQueue,
    data_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let docker = match ci::container::Docker::connect().await {
            Ok(d) => {
                d.remove_leftovers(BUILT_IN).await;
                Some(d)
            }
            Err(e) => {
                tracing::info!(error = %e, "the built-in runner runs no container steps: no Docker Engine");
                None
            }
        };
        let info = RunnerInfo {
            name: BUILT_IN.into(),
            organization: None,
            labels: BTreeMap::new(),
            docker: docker.is_some(),
            capacity: RUNS as u32,
        };
        let runner = ci::Runner {
            name: BUILT_IN.into(),
            capacity: CAPACITY,
            cache_dir: Some(data_dir.join("cache")),
            docker,
        };
        let q = Arc::new(StoreQueue {
            store,
            sealer,
            queue,
            info,
            data_dir: data_dir.clone(),
            shutdown: shutdown.clone(),
        });
        let work = ci::worker::serve(
            q,
            Arc::new(runner),
            data_dir.join("runs"),
            RUNS,
            shutdown.clone(),
            shutdown.clone(),
        );
        tokio::pin!(work);
        let mut stop = shutdown.clone();
        tokio::select! {
            () = &mut work => {}
            () = async { let _ = stop.wait_for(|s| *s).await; } => {
                let _ = tokio::time::timeout(Duration::from_secs(15), work).await;
            }
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcquireRequest {
    /// The runner's name (e.g. its host name).
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    docker: bool,
    #[serde(default)]
    capacity: u32,
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
}

async fn acquire(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<WaitQuery>,
    body: Body,
) -> ApiResult<Response> {
    let token = RUNNER_TOKENS.authenticate(&state, &headers).await?;
    let req: AcquireRequest = decode_json(&read_body(&state, body).await?)?;
    keys::check_worker_name("runner", &req.name)?;
    let errors = keys::check_labels("labels", &req.labels);
    if !errors.is_empty() {
        return Err(ApiError::invalid(
            "invalid runner",
            model::Invalid { errors },
        ));
    }
    let info = RunnerInfo {
        name: format!("{}/{}/{}", token.organization, token.name, req.name),
        organization: Some(token.organization.clone()),
        labels: req.labels,
        docker: req.docker,
        capacity: req.capacity,
    };
    let wait = q
        .wait
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WAIT)
        .min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let mut shutdown = state.shutdown.clone();
    loop {
        state.runs.seen(&info);
        let queued = state.runs.next_queued();
        if let Some(job) = claim(&state.store, &state.sealer, &info).await? {
            return Ok(Json(job).into_response());
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || *shutdown.borrow() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        tokio::select! {
            () = queued => {}
            () = tokio::time::sleep(left.min(Duration::from_secs(2))) => {}
            _ = shutdown.changed() => {}
        }
    }
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::Store(e) => e.into(),
        JobError::NotFound(job) => ApiError::not_found(format!("run {job} does not exist")),
        JobError::NotAnEnd(_) => ApiError::bad_request(e.to_string()),
        JobError::Stale { .. } | JobError::AlreadyEnded { .. } => {
            ApiError::new(StatusCode::CONFLICT, "run-lost", e.to_string())
        }
    }
}

/// Checks that the run exists in the token's organization and was claimed through this token.
async fn check_holder(
    state: &AppState,
    token: &KeyRecord,
    org: &str,
    name: &str,
) -> ApiResult<Key> {
    let not_found =
        || ApiError::not_found(format!("run {name} does not exist in organization {org}"));
    if org != token.organization {
        return Err(not_found());
    }
    let key = run_key(org, name);
    let run = match state.store.get(&key).await {
        Ok(r) => r,
        Err(StoreError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    let holder = run.status["holder"].as_str().unwrap_or_default();
    if !holder.starts_with(&format!("{org}/{}/", token.name)) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "run-lost",
            format!(
                "run {name} is held by runner {holder:?}, not by one using token {}",
                token.name
            ),
        ));
    }
    Ok(key)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineIn {
    source: String,
    text: String,
}

/// The body of a runner's operation on a run it holds.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OpRequest {
    epoch: u64,
    #[serde(default)]
    lines: Vec<LineIn>,
    /// `steps`: the steps' status.
    #[serde(default)]
    steps: Option<Vec<StepStatus>>,
    /// `steps`: the commit checked out.
    #[serde(default)]
    commit: Option<String>,
    /// `complete`: how the run ended.
    #[serde(default)]
    end: Option<RunEnd>,
}

async fn run_op(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, name, op)): Path<(String, String, String)>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let token = RUNNER_TOKENS.authenticate(&state, &headers).await?;
    let req: OpRequest = decode_json(&read_body(&state, body).await?)?;
    let key = check_holder(&state, &token, &org, &name).await?;
    let lines: Vec<Line> = req.lines.into_iter().map(|l| (l.source, l.text)).collect();
    let store = &state.store;
    match op.as_str() {
        "logs" => {
            jobs::append_held_logs(store, &key, req.epoch, stamp(lines))
                .await
                .map_err(job_error)?;
            Ok(Json(json!({})))
        }
        "renew" => {
            let r = renew(store, &key, req.epoch, lines)
                .await
                .map_err(job_error)?;
            Ok(Json(serde_json::to_value(r).map_err(ApiError::internal)?))
        }
        "steps" => {
            let steps = req
                .steps
                .ok_or_else(|| ApiError::bad_request("steps: the steps' status is required"))?;
            if let Some(c) = &req.commit {
                let mut errors = Vec::new();
                model::kinds::check_commit(&mut errors, "commit", c);
                if !errors.is_empty() {
                    return Err(ApiError::invalid(
                        "invalid commit",
                        model::Invalid { errors },
                    ));
                }
            }
            jobs::append_held_logs(store, &key, req.epoch, stamp(lines))
                .await
                .map_err(job_error)?;
            record_steps(store, &key, req.epoch, &steps, req.commit.as_deref())
                .await
                .map_err(job_error)?;
            Ok(Json(json!({})))
        }
        "complete" => {
            let end = req
                .end
                .ok_or_else(|| ApiError::bad_request("end: how the run ended is required"))?;
            complete(store, &state.config.data_dir, &key, req.epoch, &end, lines)
                .await
                .map_err(job_error)?;
            Ok(Json(json!({})))
        }
        other => Err(ApiError::not_found(format!(
            "no runner operation {other:?}; the operations are logs, renew, steps and complete"
        ))),
    }
}

#[derive(Debug, Deserialize)]
struct ArtifactQuery {
    epoch: u64,
    /// The file is an executable (mode 0755).
    #[serde(default)]
    executable: bool,
}

async fn put_artifact(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, name, path)): Path<(String, String, String)>,
    Query(q): Query<ArtifactQuery>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let token = RUNNER_TOKENS.authenticate(&state, &headers).await?;
    let key = check_holder(&state, &token, &org, &name).await?;
    check_artifact_path(&path).map_err(ApiError::bad_request)?;
    // Only the holder of the newest epoch, while the run runs.
    jobs::append_held_logs(&state.store, &key, q.epoch, Vec::new())
        .await
        .map_err(job_error)?;
    let dir = artifacts_dir(&state.config.data_dir, &org, &name);
    let size = write_artifact(&dir, &path, q.executable, body.into_data_stream())
        .await
        .map_err(ApiError::bad_request)?;
    Ok(Json(json!({"path": path, "size": size})))
}
