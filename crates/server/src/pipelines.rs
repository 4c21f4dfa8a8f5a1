//! Pipeline runs: starting one (`POST …/pipelines/{name}/runs`), re-running, canceling and approving one,
//! following its log, and reading its artifacts. Runners take runs from the job queue (see [`crate::runners`]).
//!
//! A run is named `<pipeline>-<number>` and labelled `kiln.dev/pipeline`; its spec holds a snapshot of the
//! pipeline, so changing the pipeline later does not change a run; only `cancel` and `approvals` change
//! afterwards.

use std::collections::{BTreeMap, HashMap};

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use controllers::jobs::{self, Phase};
use model::kinds::{Event, PipelineRunSpec, PipelineSpec, RunTrigger};
use model::{Kind, ObjectMeta, Resource};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use store::{Key, ListQuery, LogLine, Store, StoreError};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::logfollow;
use crate::rbac::{self, Verb};
use crate::routes::{Api, Op};
use crate::workspaces::{async_stream, org_key};
use crate::AppState;

pub use model::kinds::PIPELINE_LABEL;

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
            Method::POST,
            "/api/v1/orgs/{org}/pipelineruns/{name}/approve",
            "approvePipelineRun",
            "pipelines",
            "Approve (or with reject: true, reject) an approval step of a run (body: {step, reject}; step may be \
             left out when exactly one approval step waits)",
        )
        .returns(200, Some("Resource")),
        approve,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/pipelineruns/{name}/artifacts",
            "listPipelineRunArtifacts",
            "pipelines",
            "The files a run's steps saved as artifacts: path and size",
        )
        .returns(200, None),
        list_artifacts,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/pipelineruns/{name}/artifacts/{*path}",
            "getPipelineRunArtifact",
            "pipelines",
            "One artifact file of a run",
        )
        .returns_type(200, "application/octet-stream"),
        get_artifact,
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
            approvals: Vec::new(),
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
                let line =
                    format!("run #{number} of {pipeline} on {branch} queued by {started_by}");
                store
                    .append_logs(
                        &jobs::log_stream_of(&key),
                        vec![LogLine::now("queue", line)],
                    )
                    .await?;
                // Conditional: a runner may have claimed the run already, and its claim must stand (an
                // unconditional write would make the run pending again, to be claimed a second time).
                let rv = created.metadata.resource_version.as_deref();
                return match store.update_status(&key, Value::Object(status), rv).await {
                    Ok(written) => Ok(written),
                    Err(StoreError::Conflict { .. }) => Ok(store.get(&key).await?),
                    Err(e) => Err(e.into()),
                };
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

async fn rerun(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let run = rerun_run(&state, &principal, &org, &name).await?;
    Ok((StatusCode::CREATED, Json(run)).into_response())
}

/// Starts a new run repeating run `name`; answers it.
pub(crate) async fn rerun_run(
    state: &AppState,
    principal: &Principal,
    org: &str,
    name: &str,
) -> ApiResult<Resource> {
    let (org, name) = (org.to_string(), name.to_string());
    let access = rbac::org_access(state, principal, &org).await?;
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
    Ok(run)
}

async fn cancel_run(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    Ok(Json(cancel(&state, &principal, &org, &name).await?).into_response())
}

/// Checks that the caller may act on run `name` (cancel, approve).
async fn may_update(
    state: &AppState,
    principal: &Principal,
    org: &str,
    name: &str,
) -> ApiResult<()> {
    rbac::org_access(state, principal, org).await?.check(
        Verb::Update,
        Kind::PipelineRun,
        None,
        &format!("run {name}"),
    )
}

/// Cancels run `name` (a queued one ends at once); answers it.
pub(crate) async fn cancel(
    state: &AppState,
    principal: &Principal,
    org: &str,
    name: &str,
) -> ApiResult<Resource> {
    may_update(state, principal, org, name).await?;
    let key = org_key(Kind::PipelineRun, org, name);
    loop {
        let mut run = state.store.get(&key).await?;
        let phase = jobs::phase(&run);
        if phase.is_final() {
            return Ok(run);
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
                Ok(r) => return Ok(r),
                // A runner claimed it meanwhile: it sees the cancel at its next renewal.
                Err(StoreError::Conflict { .. }) => run = state.store.get(&key).await?,
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(run);
    }
}

/// What `POST …/pipelineruns/{name}/approve` takes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApproveRequest {
    /// The approval step (default: the one that waits).
    #[serde(default)]
    pub step: Option<String>,
    /// Reject instead: the step fails.
    #[serde(default)]
    pub reject: bool,
}

async fn approve(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
    body: axum::body::Body,
) -> ApiResult<Response> {
    // Access first: a caller who may not approve learns nothing from the body's errors.
    may_update(&state, &principal, &org, &name).await?;
    let bytes = crate::resources::read_body(&state, body).await?;
    let req: ApproveRequest = if bytes.is_empty() {
        ApproveRequest::default()
    } else {
        crate::resources::decode_json(&bytes)?
    };
    Ok(Json(approve_run(&state, &principal, &org, &name, req).await?).into_response())
}

/// Approves (or rejects) an approval step of run `name`; answers the run as written.
pub(crate) async fn approve_run(
    state: &AppState,
    principal: &Principal,
    org: &str,
    name: &str,
    req: ApproveRequest,
) -> ApiResult<Resource> {
    may_update(state, principal, org, name).await?;
    let key = org_key(Kind::PipelineRun, org, name);
    loop {
        let mut run = state.store.get(&key).await?;
        let phase = jobs::phase(&run);
        if phase.is_final() {
            return Err(ApiError::conflict(format!(
                "run {name} already ended as {phase:?}; there is nothing to approve"
            )));
        }
        let mut spec: PipelineRunSpec =
            model::typed_spec(&run).map_err(|e| ApiError::internal(format!("run {name}: {e}")))?;
        let gates: Vec<String> = model::kinds::expand_steps(&spec.snapshot.steps)
            .into_iter()
            .filter(|s| s.approval.is_some())
            .map(|s| s.name)
            .collect();
        let waiting: Vec<String> = run.status["steps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["phase"] == "Waiting")
            .filter_map(|s| s["name"].as_str().map(str::to_owned))
            .collect();
        let step = match &req.step {
            Some(s) if gates.contains(s) => s.clone(),
            Some(s) => {
                return Err(ApiError::bad_request(format!(
                    "step: run {name} has no approval step {s:?} (its approval steps: {})",
                    if gates.is_empty() { "none".to_string() } else { gates.join(", ") }
                )))
            }
            None => match waiting.as_slice() {
                [one] => one.clone(),
                [] => {
                    return Err(ApiError::conflict(format!(
                        "no approval step of run {name} waits now (its approval steps: {}); name one with step",
                        if gates.is_empty() { "none".to_string() } else { gates.join(", ") }
                    )))
                }
                many => {
                    return Err(ApiError::bad_request(format!(
                        "step: several approval steps wait ({}); name one",
                        many.join(", ")
                    )))
                }
            },
        };
        if let Some(given) = spec.approvals.iter().find(|a| a.step == step) {
            let what = if given.rejected {
                "rejected"
            } else {
                "approved"
            };
            return Err(ApiError::conflict(format!(
                "step {step} of run {name} was already {what} by {}",
                given.by
            )));
        }
        spec.approvals.push(model::kinds::StepApproval {
            step: step.clone(),
            by: principal.user.name.clone(),
            at: jiff::Timestamp::now().to_string(),
            rejected: req.reject,
        });
        run.spec = serde_json::to_value(&spec).map_err(ApiError::internal)?;
        match state.store.update(run).await {
            Ok(written) => {
                let verb = if req.reject { "rejected" } else { "approved" };
                let line = format!("step {step} {verb} by {}", principal.user.name);
                state
                    .store
                    .append_logs(
                        &jobs::log_stream_of(&key),
                        vec![LogLine::now("queue", line)],
                    )
                    .await?;
                return Ok(written);
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Checks read access to a run and that it exists; answers where its artifacts are.
async fn artifacts_of(
    state: &AppState,
    principal: &Principal,
    org: &str,
    name: &str,
) -> ApiResult<std::path::PathBuf> {
    run_log_key(state, principal, org, name).await?;
    Ok(crate::runners::artifacts_dir(
        &state.config.data_dir,
        org,
        name,
    ))
}

async fn list_artifacts(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let dir = artifacts_of(&state, &principal, &org, &name).await?;
    let items: Vec<Value> = crate::runners::list_artifacts(&dir)
        .await
        .into_iter()
        .map(|(path, size)| json!({"path": path, "size": size}))
        .collect();
    Ok(Json(json!({ "items": items })))
}

async fn get_artifact(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name, path)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let dir = artifacts_of(&state, &principal, &org, &name).await?;
    crate::runners::check_artifact_path(&path).map_err(ApiError::bad_request)?;
    let file = match tokio::fs::File::open(dir.join(&path)).await {
        Ok(f) => f,
        Err(_) => {
            return Err(ApiError::not_found(format!(
                "run {name} has no artifact {path}"
            )))
        }
    };
    let len = file.metadata().await.map(|m| m.len()).unwrap_or(0);
    let stream = ci::worker::file_chunks(file);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
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
