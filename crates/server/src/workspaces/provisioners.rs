//! External provisioners: provisioner keys, the provisioner queue API, and the list of live provisioners.
//!
//! An organization's administrators create provisioner keys (`<org>.<name>.<secret>`, shown once; only the
//! secret's SHA-256 is kept). A key carries tags: a `kiln provisioner start` authenticated with it takes the
//! jobs of that organization whose template asks for those tags (every tag the template names must be on the
//! key), and nothing else. The queue API is the same claim / renew / complete the built-in workers run on
//! (`super::builtin`), over HTTP:
//!
//! - `POST /api/v1/provisioner/acquire` waits up to `wait` seconds for a job and claims it (`204` when none
//!   came), answering the build: template snapshot, parameters, agent URL and token, Terraform state;
//! - `POST /api/v1/provisioner/jobs/{org}/{name}/logs|renew|complete` with the claim's `epoch`: a stale epoch,
//!   an ended job or another provisioner's job is refused (`409`/`404`), which tells the provisioner to stop.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use controllers::jobs::{self, JobError, ProvisionerInfo};
use model::kinds::ProvisionerType;
use model::Kind;
use provision::worker::Line;
use provision::{Finished, JobRef};
use serde::Deserialize;
use serde_json::{json, Value};
use store::StoreError;

use super::builtin;
use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::keys::{self, KeyRecord, PROVISIONER_KEYS};
use crate::rbac::{self, Verb};
use crate::resources::{decode_json, read_body};
use crate::routes::{Api, Op};
use crate::AppState;

/// The longest an acquire waits for a job.
const MAX_WAIT: Duration = Duration::from_secs(30);
/// How long an acquire waits when the request does not say.
const DEFAULT_WAIT: Duration = Duration::from_secs(20);

pub fn register(api: Api) -> Api {
    api.op(
        Op::new(
            Method::POST,
            "/api/v1/orgs/{org}/provisionerkeys",
            "createProvisionerKey",
            "workspaces",
            "Creates a provisioner key with tags (administrators); the key is shown once",
        )
        .returns(201, None),
        keys::create_handler::<ProvisionerKeys>,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/provisionerkeys",
            "listProvisionerKeys",
            "workspaces",
            "The organization's provisioner keys: name, tags, who made each and when (administrators)",
        )
        .returns(200, None),
        keys::list_handler::<ProvisionerKeys>,
    )
    .op(
        Op::new(
            Method::DELETE,
            "/api/v1/orgs/{org}/provisionerkeys/{name}",
            "deleteProvisionerKey",
            "workspaces",
            "Deletes a provisioner key: provisioners using it are refused from their next request",
        )
        .returns(204, None),
        keys::delete_handler::<ProvisionerKeys>,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/provisioners",
            "listProvisioners",
            "workspaces",
            "The provisioners that asked this server for the organization's jobs lately: built-in and external, with their types and tags",
        )
        .returns(200, None),
        list_live,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/provisioner/acquire",
            "provisionerAcquire",
            "workspaces",
            "A provisioner (authenticated with a provisioner key) waits for a job it can run and claims it; 204 when none came in time",
        )
        .public()
        .query("wait", "Seconds to wait for a job (default 20, at most 30)")
        .returns(200, None),
        acquire,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/provisioner/jobs/{org}/{name}/logs",
            "provisionerJobLogs",
            "workspaces",
            "Appends log lines of a job the provisioner holds (epoch of its claim)",
        )
        .public()
        .returns(200, None),
        job_logs,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/provisioner/jobs/{org}/{name}/renew",
            "provisionerJobRenew",
            "workspaces",
            "Extends the lease of a held job after appending its log lines; answers whether it was canceled",
        )
        .public()
        .returns(200, None),
        job_renew,
    )
    .op(
        Op::new(
            Method::POST,
            "/api/v1/provisioner/jobs/{org}/{name}/complete",
            "provisionerJobComplete",
            "workspaces",
            "Records how a held job ended (idempotent), with its last log lines and its Terraform state",
        )
        .public()
        .returns(200, None),
        job_complete,
    )
}

/// Provisioner keys' routes.
pub(crate) struct ProvisionerKeys;

impl crate::keys::Keys for ProvisionerKeys {
    const KIND: &'static crate::keys::KeyKind = &PROVISIONER_KEYS;

    fn deleted(state: &AppState, org: &str, name: &str) {
        for p in state.provisioners.live() {
            if p.name.starts_with(&format!("{org}/{name}/")) {
                state.provisioners.gone(&p.name);
            }
        }
    }
}

/// The live provisioners that serve an organization (built-in ones serve every organization).
pub(crate) fn live_for(state: &AppState, org: &str) -> Vec<ProvisionerInfo> {
    state
        .provisioners
        .live()
        .into_iter()
        .filter(|p| p.organization.as_deref().is_none_or(|o| o == org))
        .collect()
}

async fn list_live(
    State(state): State<AppState>,
    principal: Principal,
    Path(org): Path<String>,
) -> ApiResult<Json<Value>> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    access.check(
        Verb::List,
        Kind::Template,
        None,
        &format!("provisioners of organization {org}"),
    )?;
    let items: Vec<Value> = live_for(&state, &org)
        .into_iter()
        .map(|p| {
            json!({
                "name": p.name,
                "builtIn": p.organization.is_none(),
                "types": p.types,
                "tags": p.tags,
            })
        })
        .collect();
    Ok(Json(json!({ "items": items })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AcquireRequest {
    /// The provisioner's name (e.g. its host name).
    name: String,
    /// The providers it runs.
    types: Vec<ProvisionerType>,
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    wait: Option<u64>,
}

fn info_of(key: &KeyRecord, req: &AcquireRequest) -> ProvisionerInfo {
    ProvisionerInfo {
        name: format!("{}/{}/{}", key.organization, key.name, req.name),
        types: req.types.clone(),
        tags: key.tags.clone(),
        organization: Some(key.organization.clone()),
    }
}

async fn acquire(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<WaitQuery>,
    body: Body,
) -> ApiResult<Response> {
    let key = PROVISIONER_KEYS.authenticate(&state, &headers).await?;
    let req: AcquireRequest = decode_json(&read_body(&state, body).await?)?;
    keys::check_worker_name("provisioner", &req.name)?;
    if req.types.is_empty() {
        return Err(ApiError::invalid(
            "invalid provisioner",
            model::Invalid::one("types", "name at least one provider type it runs"),
        ));
    }
    let info = info_of(&key, &req);
    let wait = q
        .wait
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WAIT)
        .min(MAX_WAIT);
    let deadline = tokio::time::Instant::now() + wait;
    let agent_url = state.public_url();
    let mut shutdown = state.shutdown.clone();
    loop {
        state.provisioners.seen(&info);
        if let Some(acquired) = builtin::acquire(&state.store, &info, &agent_url).await? {
            return Ok(Json(acquired).into_response());
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() || *shutdown.borrow() {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        tokio::select! {
            () = state.provisioners.wait_queued(left.min(Duration::from_secs(2))) => {}
            _ = shutdown.changed() => {}
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogLineIn {
    source: String,
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HeldRequest {
    epoch: u64,
    #[serde(default)]
    lines: Vec<LogLineIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CompleteRequest {
    epoch: u64,
    #[serde(default)]
    lines: Vec<LogLineIn>,
    #[serde(flatten)]
    finished: Finished,
}

fn lines(given: Vec<LogLineIn>) -> Vec<Line> {
    given.into_iter().map(|l| (l.source, l.text)).collect()
}

fn job_error(e: JobError) -> ApiError {
    match e {
        JobError::Store(e) => e.into(),
        JobError::NotFound(job) => ApiError::not_found(format!("job {job} does not exist")),
        JobError::NotAnEnd(_) => ApiError::bad_request(e.to_string()),
        JobError::Stale { .. } | JobError::AlreadyEnded { .. } => {
            ApiError::new(StatusCode::CONFLICT, "job-lost", e.to_string())
        }
    }
}

/// Checks that the job exists in the key's organization and was claimed through this key.
async fn check_holder(
    state: &AppState,
    key: &KeyRecord,
    org: &str,
    name: &str,
    epoch: u64,
) -> ApiResult<JobRef> {
    let not_found =
        || ApiError::not_found(format!("job {name} does not exist in organization {org}"));
    if org != key.organization {
        return Err(not_found());
    }
    let job = JobRef {
        organization: org.to_string(),
        name: name.to_string(),
        epoch,
    };
    let obj = match state.store.get(&builtin::job_key(&job)).await {
        Ok(o) => o,
        Err(StoreError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(e.into()),
    };
    let holder = obj
        .status
        .get("holder")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !holder.starts_with(&format!("{org}/{}/", key.name)) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job-lost",
            format!(
                "job {name} is held by provisioner {holder:?}, not by one using key {}",
                key.name
            ),
        ));
    }
    Ok(job)
}

/// A provisioner's request about a job it holds: the key, the body, and the job checked to be this key's.
async fn held_request<T: serde::de::DeserializeOwned + HasEpoch>(
    state: &AppState,
    headers: &HeaderMap,
    org: &str,
    name: &str,
    body: Body,
) -> ApiResult<(JobRef, T)> {
    let key = PROVISIONER_KEYS.authenticate(state, headers).await?;
    let req: T = decode_json(&read_body(state, body).await?)?;
    let job = check_holder(state, &key, org, name, req.epoch()).await?;
    Ok((job, req))
}

trait HasEpoch {
    fn epoch(&self) -> u64;
}

impl HasEpoch for HeldRequest {
    fn epoch(&self) -> u64 {
        self.epoch
    }
}

impl HasEpoch for CompleteRequest {
    fn epoch(&self) -> u64 {
        self.epoch
    }
}

async fn job_logs(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let (job, req) = held_request::<HeldRequest>(&state, &headers, &org, &name, body).await?;
    jobs::append_held_logs(
        &state.store,
        &builtin::job_key(&job),
        job.epoch,
        builtin::stamp(lines(req.lines)),
    )
    .await
    .map_err(job_error)?;
    Ok(Json(json!({})))
}

async fn job_renew(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let (job, req) = held_request::<HeldRequest>(&state, &headers, &org, &name, body).await?;
    let cancel = builtin::renew(&state.store, &job, lines(req.lines))
        .await
        .map_err(job_error)?;
    Ok(Json(json!({ "cancel": cancel })))
}

async fn job_complete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((org, name)): Path<(String, String)>,
    body: Body,
) -> ApiResult<Json<Value>> {
    let (job, req) = held_request::<CompleteRequest>(&state, &headers, &org, &name, body).await?;
    builtin::complete(&state.store, &job, &req.finished, lines(req.lines))
        .await
        .map_err(job_error)?;
    Ok(Json(json!({})))
}
