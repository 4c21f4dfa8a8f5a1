//! Triggers: what starts pipeline runs besides `kiln pipeline run`.
//!
//! - Webhooks (`POST /api/v1/hooks/{org}/{pipeline}/{trigger}`, no bearer token): a GitHub, GitLab or Gitea
//!   delivery is verified against the trigger's Secret ([`ci::hooks::verify`], constant time) before its
//!   payload is read; a registry's push notification carries the Secret as a bearer token. A refused delivery
//!   (bad signature, unknown event, malformed payload) gets a 4xx and writes nothing.
//! - Each delivery's id is claimed in the store (`create_blob` of `delivery/<org>/<pipeline>/<trigger>/<id>`)
//!   before its run is created, so a redelivery, or the same delivery reaching two servers, starts one run.
//! - Cron and polling triggers run in [`spawn`]: once a second it reads the pipelines; a cron trigger's due time
//!   and a polled ref's move are claimed the same way, so servers sharing a store start each run once. A cron
//!   trigger seen for the first time starts counting from then; a poll trigger's first read is its baseline.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use ci::hooks::{self, hex, HookError, Parsed};
use controllers::schedule::Plan;
use model::kinds::{glob_match, Event, PipelineSpec, RunTrigger, Trigger};
use model::{Kind, Resource};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use store::{ListQuery, Store, StoreError};
use tokio::process::Command;
use tokio::sync::watch;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::pipelines::{new_run, Start, StartRunRequest};
use crate::rbac::{self, Verb};
use crate::routes::{Api, Op};
use crate::runners::RunQueue;
use crate::workspaces::org_key;
use crate::AppState;

/// How long a poll's `git ls-remote` may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(60);

pub fn register(api: Api) -> Api {
    api.op(
        Op::new(
            Method::POST,
            "/api/v1/hooks/{org}/{pipeline}/{trigger}",
            "deliverWebhook",
            "pipelines",
            "A webhook delivery for a pipeline's trigger: a GitHub, GitLab or Gitea event (signed with the \
             trigger's secret) or a registry's push notification (the secret as a bearer token). Answers the \
             runs it started, or why it started none",
        )
        .public()
        .returns(200, None),
        deliver,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/pipelines/{name}/triggers",
            "pipelineTriggers",
            "pipelines",
            "A pipeline's triggers: each one's type, webhook URL, schedule and next time, poll state, and the \
             last run it started",
        )
        .returns(200, None),
        list_triggers,
    )
}

async fn list_triggers(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    access.check(Verb::Get, Kind::Pipeline, None, &format!("pipeline {name}"))?;
    let obj = state
        .store
        .get(&org_key(Kind::Pipeline, &org, &name))
        .await?;
    let spec: PipelineSpec =
        model::typed_spec(&obj).map_err(|e| ApiError::internal(format!("pipeline {name}: {e}")))?;
    let runs = crate::pipelines::runs_of(&state.store, &org, &name).await?;
    let base = state.public_url();
    let mut out = Vec::new();
    for (i, t) in spec.triggers.iter().enumerate() {
        let mut item = json!({"name": t.name, "type": t.type_name()});
        if !t.branches.is_empty() {
            item["branches"] = json!(t.branches);
        }
        if let Some(w) = &t.webhook {
            item["url"] = json!(hook_url(&base, &org, &name, &t.name));
            item["provider"] = json!(w.provider.as_str());
            item["events"] = json!(w.events);
        }
        if let Some(im) = &t.image {
            item["url"] = json!(hook_url(&base, &org, &name, &t.name));
            item["repository"] = json!(im.repository);
        }
        if let Some(c) = &t.cron {
            item["schedule"] = json!(c.schedule);
            let at = format!("spec.triggers[{i}].cron");
            match Plan::cron(&c.schedule, c.timezone.as_deref(), &at) {
                Ok(plan) => {
                    item["timezone"] = json!(plan.tz_name());
                    if let Some(n) = plan.next_after(jiff::Timestamp::now()) {
                        item["next"] = json!(n.to_string());
                    }
                }
                Err(e) => item["error"] = json!(e),
            }
        }
        if let Some(p) = &t.poll {
            item["interval"] = json!(p.interval);
            let blob = state
                .store
                .get_blob(&format!("poll/{org}/{name}/{}", t.name))
                .await?;
            if let Some(st) = blob.and_then(|b| serde_json::from_slice::<PollState>(&b).ok()) {
                item["polledAt"] = json!(st.polled_at);
                item["refs"] = json!(st.refs.len());
            }
            if let Some(e) =
                blob_text(&state.store, &format!("poll-error/{org}/{name}/{}", t.name)).await
            {
                item["error"] = json!(e);
            }
        }
        let last = runs
            .iter()
            .filter(|r| {
                r.spec.pointer("/trigger/name").and_then(Value::as_str) == Some(t.name.as_str())
            })
            .max_by_key(|r| r.spec.get("number").and_then(Value::as_u64).unwrap_or(0));
        if let Some(r) = last {
            item["lastRun"] = json!({
                "name": r.metadata.name,
                "phase": r.status.get("phase").cloned().unwrap_or(Value::Null),
                "startedBy": r.spec.get("startedBy").cloned().unwrap_or(Value::Null),
            });
        }
        out.push(item);
    }
    Ok(Json(json!({"pipeline": name, "triggers": out})))
}

async fn blob_text(store: &Store, name: &str) -> Option<String> {
    let b = store.get_blob(name).await.ok()??;
    Some(String::from_utf8_lossy(&b).into_owned())
}

/// What a poll trigger remembers between reads.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct PollState {
    polled_at: String,
    refs: BTreeMap<String, String>,
}

/// The webhook URL of a pipeline's trigger on a server reachable at `base`.
pub fn hook_url(base: &str, org: &str, pipeline: &str, trigger: &str) -> String {
    format!(
        "{}/api/v1/hooks/{org}/{pipeline}/{trigger}",
        base.trim_end_matches('/')
    )
}

fn hook_error(e: HookError) -> ApiError {
    match e {
        HookError::Unauthorized(m) => ApiError::unauthorized(m),
        HookError::BadRequest(m) => ApiError::bad_request(m),
    }
}

/// The store name claiming one delivery of a trigger. Ids made of safe characters are kept as they are
/// (readable); others are hashed.
fn delivery_claim(org: &str, pipeline: &str, trigger: &str, id: &str) -> String {
    let safe = !id.is_empty()
        && id.len() <= 100
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    let id = if safe {
        id.to_string()
    } else {
        hex(&Sha256::digest(id.as_bytes()))
    };
    format!("delivery/{org}/{pipeline}/{trigger}/{id}")
}

/// Whether this delivery may start a run: claims its id. `Err(run)`: it was claimed before, by the run named
/// (empty while that run is being created).
async fn claim(store: &Store, name: &str) -> Result<(), String> {
    match store.create_blob(name, Vec::new()).await {
        Ok(true) => Ok(()),
        Ok(false) => {
            let run = store
                .get_blob(name)
                .await
                .ok()
                .flatten()
                .unwrap_or_default();
            Err(String::from_utf8_lossy(&run).into_owned())
        }
        Err(e) => Err(format!("the store: {e}")),
    }
}

/// Creates a run for a claimed delivery; on failure the claim is released, so nothing stays behind.
async fn start_claimed(
    store: &Store,
    claim_name: &str,
    org: &str,
    pipeline: &str,
    spec: PipelineSpec,
    start: Start,
) -> ApiResult<Resource> {
    match new_run(store, org, pipeline, spec, start).await {
        Ok(run) => {
            let name = run.metadata.name.clone().into_bytes();
            if let Err(e) = store.put_blob(claim_name, name).await {
                tracing::warn!(error = %e, claim = claim_name, "recording a delivery's run");
            }
            Ok(run)
        }
        Err(e) => {
            let _ = store.delete_blob(claim_name).await;
            Err(e)
        }
    }
}

async fn deliver(
    State(state): State<AppState>,
    Path((org, pipeline, trigger)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let missing = || {
        ApiError::not_found(format!(
            "no webhook trigger {trigger} on pipeline {pipeline} in organization {org}"
        ))
    };
    let obj = match state
        .store
        .get(&org_key(Kind::Pipeline, &org, &pipeline))
        .await
    {
        Ok(o) => o,
        Err(StoreError::NotFound(_)) => return Err(missing()),
        Err(e) => return Err(e.into()),
    };
    let spec: PipelineSpec = model::typed_spec(&obj)
        .map_err(|e| ApiError::internal(format!("pipeline {pipeline}: {e}")))?;
    let Some(t) = spec.triggers.iter().find(|t| t.name == trigger).cloned() else {
        return Err(missing());
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let secret_of = |r: &model::kinds::SecretKeyRef| {
        let (store, org, r, name) = (state.store.clone(), org.clone(), r.clone(), t.name.clone());
        let sealer = state.sealer.clone();
        async move {
            crate::secrets::value(&store, &sealer, &org, &r.secret, &r.key)
                .await
                .map_err(|e| ApiError::internal(format!("trigger {name}: {e}")))
        }
    };
    if let Some(w) = &t.webhook {
        let secret = secret_of(&w.secret).await?;
        hooks::verify(w.provider, &secret, header, &body).map_err(hook_error)?;
        let event_header = hooks::event_header(w.provider);
        let Some(event) = header(event_header) else {
            return Err(ApiError::bad_request(format!("{event_header} is missing")));
        };
        let push = match hooks::parse(w.provider, event, &body).map_err(hook_error)? {
            Parsed::Run(p) => p,
            Parsed::Ignore(reason) => return Ok(not_started(reason)),
        };
        if !w.events.contains(&push.event) {
            let events: Vec<&str> = w.events.iter().map(|e| e.as_str()).collect();
            return Ok(not_started(format!(
                "trigger {trigger} starts runs on {}, not {}",
                events.join(", "),
                push.event.as_str()
            )));
        }
        let filtered = match push.event {
            Event::PullRequest => push.target_branch.as_deref(),
            _ => push.branch.as_deref(),
        };
        if let Some(b) = filtered.filter(|b| !t.accepts_branch(b)) {
            return Ok(not_started(format!(
                "branch {b} matches none of trigger {trigger}'s branches ({})",
                t.branches.join(", ")
            )));
        }
        let id = hooks::delivery_headers(w.provider)
            .iter()
            .find_map(|h| header(h))
            .map(str::to_owned)
            .unwrap_or_else(|| hex(&Sha256::digest(&body)));
        let claim_name = delivery_claim(&org, &pipeline, &trigger, &id);
        if let Err(run) = claim(&state.store, &claim_name).await {
            return Ok(duplicate(&id, &run));
        }
        let what = match push.event {
            Event::Tag => format!("tag {}", push.tag.clone().unwrap_or_default()),
            Event::PullRequest => format!("pull request #{}", push.pull_request.unwrap_or(0)),
            _ => format!("a push to {}", push.branch.clone().unwrap_or_default()),
        };
        let start = Start {
            event: push.event,
            request: StartRunRequest {
                branch: Some(push.branch.unwrap_or_else(|| spec.source.branch.clone())),
                commit: Some(push.commit),
                params: BTreeMap::new(),
            },
            started_by: format!("{} webhook {trigger} ({what})", w.provider.as_str()),
            trigger: Some(RunTrigger {
                name: trigger.clone(),
                delivery: Some(id),
                git_ref: Some(push.git_ref),
                before: push.before,
                tag: push.tag,
                pull_request: push.pull_request,
                target_branch: push.target_branch,
                image: None,
            }),
            rerun_of: None,
        };
        let run = start_claimed(&state.store, &claim_name, &org, &pipeline, spec, start).await?;
        state.runs.queued();
        return Ok(started(vec![run.metadata.name]));
    }
    if let Some(im) = &t.image {
        let secret = secret_of(&im.secret).await?;
        let token = header("authorization")
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("Authorization: Bearer is missing"))?;
        if !hooks::secret_eq(token.trim().as_bytes(), &secret) {
            return Err(ApiError::unauthorized(
                "the bearer token does not match the trigger's secret",
            ));
        }
        let pushes = hooks::registry_pushes(&body).map_err(hook_error)?;
        let mut runs = Vec::new();
        let mut skipped = 0;
        for p in pushes {
            let tag_ok = im.tags.is_empty() || im.tags.iter().any(|g| glob_match(g, &p.tag));
            if !glob_match(&im.repository, &p.repository) || !tag_ok {
                skipped += 1;
                continue;
            }
            let claim_name = delivery_claim(&org, &pipeline, &trigger, &p.id);
            if claim(&state.store, &claim_name).await.is_err() {
                skipped += 1;
                continue;
            }
            let start = Start {
                event: Event::Image,
                request: StartRunRequest::default(),
                started_by: format!("image trigger {trigger} ({})", p.image),
                trigger: Some(RunTrigger {
                    name: trigger.clone(),
                    delivery: Some(p.id.clone()),
                    tag: Some(p.tag.clone()),
                    image: Some(p.image.clone()),
                    ..RunTrigger::default()
                }),
                rerun_of: None,
            };
            let run = start_claimed(
                &state.store,
                &claim_name,
                &org,
                &pipeline,
                spec.clone(),
                start,
            )
            .await?;
            runs.push(run.metadata.name);
        }
        if runs.is_empty() {
            return Ok(not_started(format!(
                "no tagged push of a repository matching {} ({skipped} events left out)",
                im.repository
            )));
        }
        state.runs.queued();
        return Ok(started(runs));
    }
    Err(ApiError::not_found(format!(
        "trigger {trigger} of pipeline {pipeline} is a {} trigger; only webhook and image triggers take deliveries",
        t.type_name()
    )))
}

fn started(runs: Vec<String>) -> Response {
    (
        StatusCode::CREATED,
        Json(json!({"started": true, "runs": runs})),
    )
        .into_response()
}

fn not_started(reason: String) -> Response {
    Json(json!({"started": false, "reason": reason})).into_response()
}

fn duplicate(id: &str, run: &str) -> Response {
    let reason = if run.is_empty() {
        format!("delivery {id} was received before")
    } else {
        format!("delivery {id} was received before and started run {run}")
    };
    Json(json!({"started": false, "duplicate": true, "reason": reason, "runs": [run]}))
        .into_response()
}

/// Runs the cron and polling triggers of every pipeline until `shutdown` flips.
pub fn spawn(
    store: Store,
    queue: RunQueue,
    mut shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut next_poll: HashMap<String, Instant> = HashMap::new();
        let polling = std::sync::Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
        loop {
            if let Err(e) = tick(&store, &queue, &mut next_poll, &polling).await {
                tracing::warn!(error = %e, "reading the pipelines' triggers");
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    })
}

async fn tick(
    store: &Store,
    queue: &RunQueue,
    next_poll: &mut HashMap<String, Instant>,
    polling: &std::sync::Arc<std::sync::Mutex<HashSet<String>>>,
) -> Result<(), StoreError> {
    let query = ListQuery {
        kind: Some(Kind::Pipeline),
        ..ListQuery::default()
    };
    let pipelines = store.list(&query).await?.items;
    let mut seen = HashSet::new();
    for obj in pipelines {
        let Ok(spec) = model::typed_spec::<PipelineSpec>(&obj) else {
            continue;
        };
        let org = obj.metadata.organization.clone().unwrap_or_default();
        let pipeline = obj.metadata.name.clone();
        for (i, t) in spec.triggers.iter().enumerate() {
            let id = format!("{org}/{pipeline}/{}", t.name);
            if let Some(c) = &t.cron {
                let at = format!("spec.triggers[{i}].cron");
                match Plan::cron(&c.schedule, c.timezone.as_deref(), &at) {
                    Ok(plan) => {
                        if let Err(e) =
                            cron_due(store, queue, &org, &pipeline, &spec, t, &plan).await
                        {
                            tracing::warn!(error = %e, trigger = %id, "a cron trigger");
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, trigger = %id, "a cron trigger"),
                }
            }
            if let Some(p) = &t.poll {
                seen.insert(id.clone());
                let every = model::kinds::parse_duration(&p.interval)
                    .unwrap_or(60)
                    .max(1);
                let now = Instant::now();
                if next_poll.get(&id).is_some_and(|n| *n > now) {
                    continue;
                }
                next_poll.insert(id.clone(), now + Duration::from_secs(every));
                if !polling
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone())
                {
                    continue; // the previous poll is still going
                }
                let (store, queue, polling) = (store.clone(), queue.clone(), polling.clone());
                let (org, pipeline, spec, t) =
                    (org.clone(), pipeline.clone(), spec.clone(), t.clone());
                tokio::spawn(async move {
                    if let Err(e) = poll(&store, &queue, &org, &pipeline, &spec, &t).await {
                        tracing::warn!(error = %e, trigger = %id, "a poll trigger");
                    }
                    polling
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&id);
                });
            }
        }
    }
    next_poll.retain(|id, _| seen.contains(id));
    Ok(())
}

/// Starts a run for the latest due time of a cron trigger since the last one handled.
async fn cron_due(
    store: &Store,
    queue: &RunQueue,
    org: &str,
    pipeline: &str,
    spec: &PipelineSpec,
    t: &Trigger,
    plan: &Plan,
) -> Result<(), String> {
    let state_name = format!("cron/{org}/{pipeline}/{}", t.name);
    let now = jiff::Timestamp::now();
    let last = store
        .get_blob(&state_name)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|b| String::from_utf8_lossy(&b).parse::<jiff::Timestamp>().ok());
    let Some(last) = last else {
        // First seen: count from now.
        return store
            .put_blob(&state_name, now.to_string().into_bytes())
            .await
            .map_err(|e| e.to_string());
    };
    let mut due = None;
    let mut from = last;
    for _ in 0..10_000 {
        match plan.next_after(from) {
            Some(n) if n <= now => {
                due = Some(n);
                from = n;
            }
            _ => break,
        }
    }
    let Some(due) = due else {
        return Ok(());
    };
    let claim_name = delivery_claim(org, pipeline, &t.name, &format!("cron-{}", due.as_second()));
    if claim(store, &claim_name).await.is_ok() {
        let branch = t
            .cron
            .as_ref()
            .and_then(|c| c.branch.clone())
            .unwrap_or_else(|| spec.source.branch.clone());
        let start = Start {
            event: Event::Cron,
            request: StartRunRequest {
                branch: Some(branch),
                ..StartRunRequest::default()
            },
            started_by: format!("cron trigger {} ({} {})", t.name, due, plan.tz_name()),
            trigger: Some(RunTrigger {
                name: t.name.clone(),
                delivery: Some(format!("cron-{}", due.as_second())),
                ..RunTrigger::default()
            }),
            rerun_of: None,
        };
        start_claimed(store, &claim_name, org, pipeline, spec.clone(), start)
            .await
            .map_err(|e| e.to_string())?;
        queue.queued();
    }
    store
        .put_blob(&state_name, due.to_string().into_bytes())
        .await
        .map_err(|e| e.to_string())
}

/// Reads the repository's refs and starts a run for each branch (or tag) that moved since the last read.
async fn poll(
    store: &Store,
    queue: &RunQueue,
    org: &str,
    pipeline: &str,
    spec: &PipelineSpec,
    t: &Trigger,
) -> Result<(), String> {
    let Some(p) = &t.poll else { return Ok(()) };
    let tags = p.events.contains(&Event::Tag);
    let error_name = format!("poll-error/{org}/{pipeline}/{}", t.name);
    let refs = match ls_remote(&spec.source.repository, tags).await {
        Ok(r) => {
            if let Ok(Some(_)) = store.get_blob(&error_name).await {
                let _ = store.delete_blob(&error_name).await;
            }
            r
        }
        Err(e) => {
            // Kept for `GET …/triggers`, until a read succeeds.
            let _ = store.put_blob(&error_name, e.clone().into_bytes()).await;
            return Err(e);
        }
    };
    let state_name = format!("poll/{org}/{pipeline}/{}", t.name);
    let before: Option<BTreeMap<String, String>> = store
        .get_blob(&state_name)
        .await
        .map_err(|e| e.to_string())?
        .and_then(|b| serde_json::from_slice::<PollState>(&b).ok())
        .map(|s| s.refs);
    if let Some(before) = &before {
        for (git_ref, sha) in &refs {
            let old = before.get(git_ref);
            if old == Some(sha) {
                continue;
            }
            let (event, branch, tag) = if let Some(b) = git_ref.strip_prefix("refs/heads/") {
                if !p.events.contains(&Event::Push) || !t.accepts_branch(b) {
                    continue;
                }
                (Event::Push, b.to_string(), None)
            } else if let Some(tag) = git_ref.strip_prefix("refs/tags/") {
                (
                    Event::Tag,
                    spec.source.branch.clone(),
                    Some(tag.to_string()),
                )
            } else {
                continue;
            };
            let id = format!(
                "poll-{}-{}",
                &hex(&Sha256::digest(git_ref.as_bytes()))[..16],
                sha
            );
            let claim_name = delivery_claim(org, pipeline, &t.name, &id);
            if claim(store, &claim_name).await.is_err() {
                continue;
            }
            let start = Start {
                event,
                request: StartRunRequest {
                    branch: Some(branch),
                    commit: Some(sha.clone()),
                    params: BTreeMap::new(),
                },
                started_by: format!("poll trigger {} ({git_ref} moved)", t.name),
                trigger: Some(RunTrigger {
                    name: t.name.clone(),
                    delivery: Some(id),
                    git_ref: Some(git_ref.clone()),
                    before: old.cloned().filter(|_| event == Event::Push),
                    tag,
                    ..RunTrigger::default()
                }),
                rerun_of: None,
            };
            if let Err(e) =
                start_claimed(store, &claim_name, org, pipeline, spec.clone(), start).await
            {
                tracing::warn!(error = %e, pipeline, "starting a polled run");
                continue;
            }
            queue.queued();
        }
    }
    let state = PollState {
        polled_at: jiff::Timestamp::now().to_string(),
        refs,
    };
    let state = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
    store
        .put_blob(&state_name, state)
        .await
        .map_err(|e| e.to_string())
}

/// The repository's branches (and tags) with their commits, as `git ls-remote` reads them; an annotated tag
/// counts as the commit it points at.
async fn ls_remote(repository: &str, tags: bool) -> Result<BTreeMap<String, String>, String> {
    let mut cmd = Command::new("git");
    cmd.args(["ls-remote", "--heads"]);
    if tags {
        cmd.arg("--tags");
    }
    cmd.args(["--", repository])
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(POLL_TIMEOUT, cmd.output())
        .await
        .map_err(|_| format!("git ls-remote {repository} took over {POLL_TIMEOUT:?}"))?
        .map_err(|e| format!("running git: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "git ls-remote {repository}: {}",
            err.lines().last().unwrap_or("failed").trim()
        ));
    }
    let mut refs = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some((sha, name)) = line.split_once('\t') else {
            continue;
        };
        match name.strip_suffix("^{}") {
            Some(tag) => {
                refs.insert(tag.to_string(), sha.to_string());
            }
            None => {
                refs.entry(name.to_string())
                    .or_insert_with(|| sha.to_string());
            }
        }
    }
    Ok(refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_ids_are_kept_when_safe_and_hashed_otherwise() {
        assert_eq!(
            delivery_claim("o", "p", "t", "72d3162e-cc78-11e3-81ab-4c9367dc956b"),
            "delivery/o/p/t/72d3162e-cc78-11e3-81ab-4c9367dc956b"
        );
        let odd = delivery_claim("o", "p", "t", "../../x y");
        assert!(
            odd.starts_with("delivery/o/p/t/") && !odd.contains(".."),
            "{odd}"
        );
        assert_eq!(odd.len(), "delivery/o/p/t/".len() + 64);
    }

    /// A cron trigger on a real store: the first sight starts the count, a due time starts one run, and a
    /// second server with a stale view of the count (the same due time again) starts none.
    #[tokio::test]
    async fn a_cron_trigger_starts_one_run_per_due_time() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&tmp.path().join("kiln.db"), store::Options::default())
            .await
            .unwrap();
        let spec: PipelineSpec = serde_json::from_value(json!({
            "source": {"repository": "/nowhere.git", "branch": "main"},
            "steps": [{"name": "a", "commands": ["true"]}],
            "triggers": [{"name": "nightly", "cron": {"schedule": "* * * * *", "timezone": "Europe/Paris", "branch": "release"}}],
        }))
        .unwrap();
        let t = &spec.triggers[0];
        let c = t.cron.as_ref().unwrap();
        let plan = Plan::cron(&c.schedule, c.timezone.as_deref(), "cron").unwrap();
        let queue = RunQueue::default();
        let due = || cron_due(&store, &queue, "acme", "ci", &spec, t, &plan);
        let runs = || crate::pipelines::runs_of(&store, "acme", "ci");

        due().await.unwrap();
        assert!(
            runs().await.unwrap().is_empty(),
            "the first sight starts no run"
        );

        let state = "cron/acme/ci/nightly";
        let earlier = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(150);
        store
            .put_blob(state, earlier.to_string().into_bytes())
            .await
            .unwrap();
        due().await.unwrap();
        let list = runs().await.unwrap();
        assert_eq!(list.len(), 1, "one run for the latest due time");
        let run: model::kinds::PipelineRunSpec = model::typed_spec(&list[0]).unwrap();
        assert_eq!((run.event, run.branch.as_str()), (Event::Cron, "release"));
        assert_eq!(run.trigger.as_ref().unwrap().name, "nightly");
        assert!(
            run.started_by.contains("Europe/Paris"),
            "{}",
            run.started_by
        );

        due().await.unwrap();
        store
            .put_blob(state, earlier.to_string().into_bytes())
            .await
            .unwrap();
        due().await.unwrap();
        assert_eq!(runs().await.unwrap().len(), 1, "a due time starts one run");
    }

    #[test]
    fn hook_urls() {
        assert_eq!(
            hook_url("http://k:7080/", "acme", "ci", "gh"),
            "http://k:7080/api/v1/hooks/acme/ci/gh"
        );
    }
}
