//! Pipeline runs: starting one (`POST …/pipelines/{name}/runs`), canceling one, following its log, and the
//! built-in runner, which takes runs from the job queue (`controllers::jobs`, kind PipelineRun) and runs
//! them with [`ci::execute`] in `<data dir>/runs/<org>/<run>`.
//!
//! A run is named `<pipeline>-<number>` and labelled `kiln.dev/pipeline`; its spec holds a snapshot of the
//! pipeline, so changing the pipeline later does not change a run. The built-in runner takes runs whose
//! pipeline asks for no runner labels and whose steps are all host processes; a run it cannot take says why
//! in `status.waiting`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use controllers::jobs::{self, JobError, Outcome, Phase};
use model::kinds::{Event, PipelineRunSpec, PipelineSpec, RunTrigger};
use model::{Kind, ObjectMeta, Resource};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use store::{Key, ListQuery, LogLine, Store, StoreError};
use tokio::sync::{watch, Notify};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::logfollow;
use crate::rbac::{self, Verb};
use crate::routes::{Api, Op};
use crate::workspaces::{async_stream, org_key};
use crate::AppState;

/// Label on a run naming its pipeline.
pub const PIPELINE_LABEL: &str = "kiln.dev/pipeline";
/// Runs the built-in runner holds at once.
pub const RUNS: usize = 2;
/// Steps one run of the built-in runner runs at once.
pub const CAPACITY: usize = 4;
/// How often a held run's lease is renewed (and its cancellation looked for).
const RENEW_EVERY: Duration = Duration::from_secs(2);
/// How often a run's log lines are written in a batch.
const LOG_FLUSH: Duration = Duration::from_millis(200);

/// Wakes the built-in runner when a run is queued.
#[derive(Clone, Default)]
pub struct RunQueue(Arc<Notify>);

impl RunQueue {
    pub(crate) fn queued(&self) {
        self.0.notify_waiters();
    }
}

pub fn register(api: Api) -> Api {
    api.op(
        Op::new(
            Method::POST,
            "/api/v1/orgs/{org}/pipelines/{name}/runs",
            "startPipelineRun",
            "pipelines",
            "Start a run of a pipeline (body: {branch, commit, params}, each optional); answers the PipelineRun",
        )
        .body("StartRunRequest")
        .returns(201, Some("Resource")),
        start_run,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/orgs/{org}/pipelineruns/{name}/rerun",
            "rerunPipelineRun",
            "pipelines",
            "Start a new run repeating this one: the same pipeline snapshot, event, branch, commit (the one it \
             checked out) and parameters; answers the new PipelineRun",
        )
        .returns(201, Some("Resource")),
        rerun,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/orgs/{org}/pipelineruns/{name}/cancel",
            "cancelPipelineRun",
            "pipelines",
            "Cancel a run: a queued one ends at once, a running one's steps are stopped",
        )
        .returns(200, Some("Resource")),
        cancel_run,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/pipelineruns/{name}/logs",
            "pipelineRunLogs",
            "pipelines",
            "A run's log: NDJSON (one object per line, with its number, time, source and text), or Server-Sent \
             Events with Accept: text/event-stream (each line's id is its number; Last-Event-ID resumes). \
             Following ends with an end object or event; a viewer that falls behind gets a cutoff with the \
             line to resume after",
        )
        .query("after", "Only lines numbered after this one")
        .query("follow", "true: keep streaming new lines until the run ends")
        .returns_type(200, "application/x-ndjson"),
        run_logs,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/pipelineruns/{name}/logs/ws",
            "pipelineRunLogsWebSocket",
            "pipelines",
            "A run's log over a WebSocket: a JSON text message per line (type line, with seq), then one of \
             type end; resume with ?after=N",
        )
        .query("after", "Only lines numbered after this one")
        .query("follow", "false: only what is stored now (default: follow until the run ends)")
        .returns(101, None),
        run_logs_ws,
    )
}

/// What `POST …/pipelines/{name}/runs` takes.
#[derive(Debug, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StartRunRequest {
    /// The branch to check out (default: the pipeline's `source.branch`).
    #[serde(default)]
    pub branch: Option<String>,
    /// The commit to check out (default: the branch's head when the run starts).
    #[serde(default)]
    pub commit: Option<String>,
    /// Parameter values; each must be one of the pipeline's `params`.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

async fn start_run(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Response> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    access.check(
        Verb::Create,
        Kind::PipelineRun,
        None,
        &format!("a run of pipeline {name}"),
    )?;
    let req: StartRunRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StartRunRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?
    };
    let pipeline = state
        .store
        .get(&org_key(Kind::Pipeline, &org, &name))
        .await?;
    let spec: PipelineSpec = model::typed_spec(&pipeline)
        .map_err(|e| ApiError::internal(format!("pipeline {name}: {e}")))?;
    let start = Start {
        event: Event::Manual,
        request: req,
        started_by: principal.user.name.clone(),
        trigger: None,
        rerun_of: None,
    };
    let run = new_run(&state.store, &org, &name, spec, start).await?;
    state.runs.queued();
    Ok((StatusCode::CREATED, Json(run)).into_response())
}

/// What starts a run: who or what, and what it asks for.
pub struct Start {
    pub event: Event,
    pub request: StartRunRequest,
    /// A user's name, or the trigger's description.
    pub started_by: String,
    pub trigger: Option<RunTrigger>,
    /// The run this one repeats.
    pub rerun_of: Option<String>,
}

/// Creates the next run of a pipeline; the number is one more than the highest so far. The caller wakes the
/// runners ([`RunQueue`]).
pub async fn new_run(
    store: &Store,
    org: &str,
    pipeline: &str,
    spec: PipelineSpec,
    start: Start,
) -> ApiResult<Resource> {
    let Start {
        event,
        request: req,
        started_by,
        trigger,
        rerun_of,
    } = start;
    let declared: HashMap<&str, &str> = spec
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.default.as_str()))
        .collect();
    if let Some(unknown) = req
        .params
        .keys()
        .find(|k| !declared.contains_key(k.as_str()))
    {
        let known: Vec<&str> = spec.params.iter().map(|p| p.name.as_str()).collect();
        return Err(ApiError::bad_request(format!(
            "params.{unknown}: pipeline {pipeline} has no parameter {unknown:?} (its parameters: {})",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )));
    }
    let mut params: BTreeMap<String, String> = declared
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    params.extend(req.params);
    let branch = req.branch.unwrap_or_else(|| spec.source.branch.clone());
    let waiting = why_waiting(&spec);
    let mut number = last_number(store, org, pipeline).await? + 1;
    loop {
        let run_spec = PipelineRunSpec {
            pipeline: pipeline.to_string(),
            number,
            event,
            branch: branch.clone(),
            commit: req.commit.clone(),
            params: params.clone(),
            snapshot: spec.clone(),
            started_by: started_by.clone(),
            cancel: false,
            trigger: trigger.clone(),
            rerun_of: rerun_of.clone(),
        };
        let mut metadata = ObjectMeta {
            name: format!("{pipeline}-{number}"),
            organization: Some(org.to_string()),
            ..Default::default()
        };
        metadata
            .labels
            .insert(PIPELINE_LABEL.into(), pipeline.to_string());
        let run = Resource {
            api_version: model::API_VERSION.into(),
            kind: Kind::PipelineRun.as_str().into(),
            metadata,
            spec: serde_json::to_value(run_spec).map_err(ApiError::internal)?,
            status: Value::Null,
        };
        let run = model::normalize(run).map_err(|e| ApiError::invalid("", e))?;
        match store.create(run).await {
            Ok(created) => {
                let key = Key::of(&created).ok_or_else(|| ApiError::internal("run key"))?;
                let mut status = Map::new();
                status.insert("phase".into(), json!(Phase::Pending));
                if let Some(w) = &waiting {
                    status.insert("waiting".into(), json!(w));
                }
                let line =
                    format!("run #{number} of {pipeline} on {branch} queued by {started_by}");
                store
                    .append_logs(
                        &jobs::log_stream_of(&key),
                        vec![LogLine::now("queue", line)],
                    )
                    .await?;
                return Ok(store
                    .update_status(&key, Value::Object(status), None)
                    .await?);
            }
            // Another start took this number.
            Err(StoreError::AlreadyExists(_)) => number += 1,
            Err(e) => return Err(e.into()),
        }
    }
}

async fn last_number(store: &Store, org: &str, pipeline: &str) -> ApiResult<u64> {
    let runs = runs_of(store, org, pipeline).await?;
    Ok(runs
        .iter()
        .filter_map(|r| r.spec.get("number").and_then(Value::as_u64))
        .max()
        .unwrap_or(0))
}

/// The runs of a pipeline.
pub async fn runs_of(
    store: &Store,
    org: &str,
    pipeline: &str,
) -> Result<Vec<Resource>, StoreError> {
    let query = ListQuery {
        kind: Some(Kind::PipelineRun),
        organization: Some(org.to_string()),
        selector: Some(format!("{PIPELINE_LABEL}={pipeline}")),
        ..ListQuery::default()
    };
    Ok(store.list(&query).await?.items)
}

/// Why no runner of this server can take runs of `spec`.
fn why_waiting(spec: &PipelineSpec) -> Option<String> {
    if !spec.runner_labels.is_empty() {
        let labels: Vec<String> = spec
            .runner_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return Some(format!(
            "no connected runner has the labels {}; the built-in runner has none",
            labels.join(",")
        ));
    }
    if let Some(step) = spec.steps.iter().find(|s| s.image.is_some()) {
        return Some(format!(
            "step {} runs in a container image; no connected runner runs container steps",
            step.name
        ));
    }
    None
}

async fn rerun(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    access.check(
        Verb::Create,
        Kind::PipelineRun,
        None,
        &format!("a rerun of {name}"),
    )?;
    let old = state
        .store
        .get(&org_key(Kind::PipelineRun, &org, &name))
        .await?;
    let spec: PipelineRunSpec =
        model::typed_spec(&old).map_err(|e| ApiError::internal(format!("run {name}: {e}")))?;
    // The commit it checked out, so that a rerun of a branch run builds the same source.
    let commit = old
        .status
        .get("commit")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or(spec.commit.clone());
    let start = Start {
        event: spec.event,
        request: StartRunRequest {
            branch: Some(spec.branch.clone()),
            commit,
            params: spec.params.clone(),
        },
        started_by: principal.user.name.clone(),
        trigger: spec.trigger.clone(),
        rerun_of: Some(name.clone()),
    };
    let run = new_run(&state.store, &org, &spec.pipeline, spec.snapshot, start).await?;
    state.runs.queued();
    Ok((StatusCode::CREATED, Json(run)).into_response())
}

async fn cancel_run(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    access.check(
        Verb::Update,
        Kind::PipelineRun,
        None,
        &format!("run {name}"),
    )?;
    let key = org_key(Kind::PipelineRun, &org, &name);
    loop {
        let mut run = state.store.get(&key).await?;
        let phase = jobs::phase(&run);
        if phase.is_final() {
            return Ok(Json(run).into_response());
        }
        if run.spec.get("cancel").and_then(Value::as_bool) != Some(true) {
            run.spec["cancel"] = json!(true);
            match state.store.update(run).await {
                Ok(_) => {}
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
            run = state.store.get(&key).await?;
        }
        let line = format!("canceled by {}", principal.user.name);
        state
            .store
            .append_logs(
                &jobs::log_stream_of(&key),
                vec![LogLine::now("queue", line)],
            )
            .await?;
        if phase == Phase::Pending {
            // Nobody holds it: it ends here.
            let mut status = run.status.as_object().cloned().unwrap_or_default();
            status.insert("phase".into(), json!(Phase::Canceled));
            status.insert(
                "finishedAt".into(),
                json!(jiff::Timestamp::now().to_string()),
            );
            status.remove("waiting");
            let rv = run.metadata.resource_version.clone();
            match state
                .store
                .update_status(&key, Value::Object(status), rv.as_deref())
                .await
            {
                Ok(r) => return Ok(Json(r).into_response()),
                // A runner claimed it meanwhile: it sees the cancel at its next renewal.
                Err(StoreError::Conflict { .. }) => run = state.store.get(&key).await?,
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(Json(run).into_response());
    }
}

/// Where a viewer resumes: `Last-Event-ID` (an SSE reconnection) or `?after=`.
fn resume_point(headers: &HeaderMap, q: &HashMap<String, String>) -> ApiResult<u64> {
    let from_header = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(|v| ("Last-Event-ID", v.trim().to_string()));
    let from_query = q.get("after").map(|v| ("after", v.clone()));
    match from_header.or(from_query) {
        None => Ok(0),
        Some((what, v)) => v
            .parse()
            .map_err(|_| ApiError::bad_request(format!("{what}={v:?}: expected a line number"))),
    }
}

/// Checks access to a run's log and that the run exists; answers its key.
async fn run_log_key(
    state: &AppState,
    principal: &Principal,
    org: &str,
    name: &str,
) -> ApiResult<Key> {
    let access = rbac::org_access(state, principal, org).await?;
    access.check(Verb::Get, Kind::PipelineRun, None, &format!("run {name}"))?;
    let key = org_key(Kind::PipelineRun, org, name);
    state.store.get(&key).await?;
    Ok(key)
}

async fn run_logs(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let key = run_log_key(&state, &principal, &org, &name).await?;
    let follow = crate::logs::parse_bool(&q, "follow")?;
    let after = resume_point(&headers, &q)?;
    let sse = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    let mut frames = logfollow::follow(
        state.store.clone(),
        key,
        after,
        follow,
        state.shutdown.clone(),
    );
    let body = async_stream(move |tx| async move {
        while let Some(frame) = frames.recv().await {
            let out = if sse {
                sse_frame(&frame)
            } else {
                ndjson_frame(&frame)
            };
            if !out.is_empty() && tx.send(out.into()).await.is_err() {
                return;
            }
        }
    });
    let content_type = if sse {
        "text/event-stream"
    } else {
        "application/x-ndjson"
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .map_err(ApiError::internal)
}

/// A frame as NDJSON: one object per line; the end and a cutoff as objects with `end` or `cutoff` set.
fn ndjson_frame(frame: &logfollow::Frame) -> Vec<u8> {
    let mut out = Vec::new();
    let mut push = |v: Value| {
        out.extend_from_slice(v.to_string().as_bytes());
        out.push(b'\n');
    };
    match frame {
        logfollow::Frame::Lines(lines) => lines.iter().for_each(|l| push(logfollow::line_json(l))),
        logfollow::Frame::End(end) => push(json!({"end": end})),
        logfollow::Frame::Cutoff { after, reason } => {
            push(json!({"cutoff": {"after": after, "reason": reason}}))
        }
        logfollow::Frame::Keepalive => {}
    }
    out
}

/// A frame as Server-Sent Events: each line an event whose id is its number (what `Last-Event-ID` resumes
/// from), `end` and `cutoff` as named events.
fn sse_frame(frame: &logfollow::Frame) -> Vec<u8> {
    let mut out = String::new();
    match frame {
        logfollow::Frame::Lines(lines) => {
            for l in lines {
                out.push_str(&format!(
                    "id: {}\ndata: {}\n\n",
                    l.seq,
                    logfollow::line_json(l)
                ));
            }
        }
        logfollow::Frame::End(end) => out.push_str(&format!("event: end\ndata: {end}\n\n")),
        logfollow::Frame::Cutoff { after, reason } => out.push_str(&format!(
            "event: cutoff\ndata: {}\n\n",
            json!({"after": after, "reason": reason})
        )),
        logfollow::Frame::Keepalive => out.push_str(": keepalive\n\n"),
    }
    out.into_bytes()
}

/// `GET …/pipelineruns/{name}/logs/ws`: the same frames over a WebSocket, one JSON text message each
/// (`{"type": "line", …}`, `{"type": "end", …}`, `{"type": "cutoff", "after": N}`).
async fn run_logs_ws(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let key = run_log_key(&state, &principal, &org, &name).await?;
    let after = resume_point(&headers, &q)?;
    let follow = !matches!(q.get("follow").map(String::as_str), Some("false"));
    let upgrade = upgrade.map_err(|e| {
        ApiError::bad_request(format!("this endpoint takes a WebSocket upgrade: {e}"))
    })?;
    let mut frames = logfollow::follow(
        state.store.clone(),
        key,
        after,
        follow,
        state.shutdown.clone(),
    );
    Ok(upgrade.on_upgrade(move |mut socket| async move {
        use axum::extract::ws::Message;
        async fn send(socket: &mut axum::extract::ws::WebSocket, m: Message) -> bool {
            matches!(
                tokio::time::timeout(logfollow::STALL, socket.send(m)).await,
                Ok(Ok(()))
            )
        }
        while let Some(frame) = frames.recv().await {
            let messages: Vec<Message> = match &frame {
                logfollow::Frame::Lines(lines) => lines
                    .iter()
                    .map(|l| {
                        let mut v = logfollow::line_json(l);
                        v["type"] = json!("line");
                        Message::Text(v.to_string().into())
                    })
                    .collect(),
                logfollow::Frame::End(end) => {
                    let mut v = end.clone();
                    v["type"] = json!("end");
                    vec![Message::Text(v.to_string().into())]
                }
                logfollow::Frame::Cutoff { after, reason } => vec![Message::Text(
                    json!({"type": "cutoff", "after": after, "reason": reason})
                        .to_string()
                        .into(),
                )],
                logfollow::Frame::Keepalive => vec![Message::Ping(Vec::new().into())],
            };
            for m in messages {
                if !send(&mut socket, m).await {
                    return;
                }
            }
        }
        let _ = send(&mut socket, Message::Close(None)).await;
    }))
}

/// Starts the built-in runner; it stops taking runs when `shutdown` flips, and ends once the runs under way
/// are canceled (their steps stopped), or after 15 s.
pub fn spawn_runner(
    store: Store,
    sealer: Arc<crate::secrets::Sealer>,
    queue: RunQueue,
    data_dir: PathBuf,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(tokio::sync::Semaphore::new(RUNS));
        let mut stop = shutdown.clone();
        let drained = |slots: Arc<tokio::sync::Semaphore>| async move {
            let all = slots.acquire_many(RUNS as u32);
            let _ = tokio::time::timeout(Duration::from_secs(15), all).await;
        };
        loop {
            if *stop.borrow() {
                return drained(slots).await;
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let fits = |_: &str, run: &Resource| {
                let spec: PipelineRunSpec = model::typed_spec(run).ok()?;
                why_waiting(&spec.snapshot).is_none().then(Map::new)
            };
            let claimed =
                jobs::claim_kind(&store, Kind::PipelineRun, None, "runner", "built-in", fits).await;
            match claimed {
                Ok(Some((key, run, epoch))) => {
                    let (store, sealer, dir, shutdown) = (
                        store.clone(),
                        sealer.clone(),
                        data_dir.clone(),
                        shutdown.clone(),
                    );
                    tokio::spawn(async move {
                        hold(&store, &sealer, key, run, epoch, &dir, shutdown).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "the built-in runner cannot read the queue"),
            }
            drop(permit);
            tokio::select! {
                () = queue.0.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => {}
            }
        }
    })
}

/// Runs a claimed run to its end: renews the lease, carries its logs and step status, completes it.
async fn hold(
    store: &Store,
    sealer: &crate::secrets::Sealer,
    key: Key,
    run: Resource,
    epoch: u64,
    data_dir: &std::path::Path,
    mut shutdown: watch::Receiver<bool>,
) {
    let org = key.organization.clone().unwrap_or_default();
    let spec: PipelineRunSpec = match model::typed_spec(&run) {
        Ok(s) => s,
        Err(e) => {
            finish(store, &key, epoch, failed(format!("the run's spec: {e}"))).await;
            return;
        }
    };
    let (secrets, secret_files) = match resolve_secrets(store, sealer, &org, &spec.snapshot).await {
        Ok(s) => s,
        Err(e) => {
            finish(store, &key, epoch, failed(e)).await;
            return;
        }
    };
    let job = ci::RunJob {
        organization: org.clone(),
        name: key.name.clone(),
        epoch,
        spec,
        secrets,
        secret_files,
    };
    let dir = data_dir.join("runs").join(&org).join(&key.name);
    let _ = tokio::fs::remove_dir_all(&dir).await;
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let report = StoreReport {
        store: store.clone(),
        key: key.clone(),
        epoch,
        lines: Mutex::new(Vec::new()),
    };
    let renewals = async {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RENEW_EVERY) => {}
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    ci::Report::line(&report, "runner", "the server is stopping; the run is canceled".into());
                    cancel_tx.send_replace(true);
                    return;
                }
            }
            match jobs::renew(store, &key, epoch, report.take()).await {
                Ok(r) if r.cancel => {
                    cancel_tx.send_replace(true);
                }
                Ok(_) => {}
                Err(JobError::Store(e)) => {
                    tracing::warn!(error = %e, run = %key.name, "renewing a run")
                }
                Err(e) => {
                    // Lost: the lease went to another runner, or the run is gone.
                    tracing::warn!(error = %e, run = %key.name, "the built-in runner lost a run");
                    cancel_tx.send_replace(true);
                    return;
                }
            }
        }
    };
    let flusher = async {
        loop {
            tokio::time::sleep(LOG_FLUSH).await;
            report.flush().await;
        }
    };
    let end = tokio::select! {
        end = ci::execute(&job, &dir, CAPACITY, &report, cancel_rx) => end,
        () = async { tokio::join!(renewals, flusher); } => unreachable!("the renewal and flush loops do not end both"),
    };
    let _ = tokio::fs::remove_dir_all(&dir).await;
    report.flush().await;
    let mut fields = Map::new();
    fields.insert("steps".into(), json!(end.steps));
    if let Some(c) = &end.commit {
        fields.insert("commit".into(), json!(c));
    }
    let _ = jobs::update_held(store, &key, epoch, fields).await;
    let outcome = Outcome {
        phase: match end.outcome {
            ci::Outcome::Succeeded => Phase::Succeeded,
            ci::Outcome::Failed => Phase::Failed,
            ci::Outcome::Canceled => Phase::Canceled,
        },
        error: end.error,
        outputs: Value::Null,
    };
    finish(store, &key, epoch, outcome).await;
}

async fn finish(store: &Store, key: &Key, epoch: u64, outcome: Outcome) {
    let line = match (&outcome.phase, &outcome.error) {
        (Phase::Succeeded, _) => "the run succeeded".to_string(),
        (p, Some(e)) => format!("the run ended as {p:?}: {e}"),
        (p, None) => format!("the run ended as {p:?}"),
    };
    let logs = vec![LogLine::now("runner", line)];
    if let Err(e) = jobs::complete(store, key, epoch, outcome, logs).await {
        tracing::warn!(error = %e, run = %key.name, "completing a run");
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

fn failed(error: String) -> Outcome {
    Outcome {
        phase: Phase::Failed,
        error: Some(error),
        outputs: Value::Null,
    }
}

/// Carries a run's progress to the store: log lines in batches, step status as it changes.
struct StoreReport {
    store: Store,
    key: Key,
    epoch: u64,
    lines: Mutex<Vec<LogLine>>,
}

impl StoreReport {
    fn take(&self) -> Vec<LogLine> {
        std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()))
    }

    async fn flush(&self) {
        let lines = self.take();
        if !lines.is_empty() {
            if let Err(e) = jobs::append_job_logs(&self.store, &self.key, lines).await {
                tracing::warn!(error = %e, run = %self.key.name, "writing a run's log");
            }
        }
    }
}

impl ci::Report for StoreReport {
    fn line(&self, source: &str, text: String) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(LogLine::now(source, text));
    }

    async fn steps(&self, steps: &[ci::StepStatus], commit: Option<&str>) {
        // Lines written before a step's change come first in the log.
        self.flush().await;
        let mut fields = Map::new();
        fields.insert("steps".into(), json!(steps));
        if let Some(c) = commit {
            fields.insert("commit".into(), json!(c));
        }
        if let Err(e) = jobs::update_held(&self.store, &self.key, self.epoch, fields).await {
            tracing::debug!(error = %e, run = %self.key.name, "recording a run's steps");
        }
    }
}
