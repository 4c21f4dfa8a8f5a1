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

use std::collections::BTreeMap;
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
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use store::StoreError;

use super::builtin;
use crate::auth::{self, Principal};
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, Verb};
use crate::resources::{decode_json, read_body, AuditSlotExt};
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
        create_key,
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
        list_keys,
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
        delete_key,
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

/// A stored provisioner key (the blob `provisioner-key/<org>/<name>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct KeyRecord {
    name: String,
    organization: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    /// SHA-256 of the secret.
    hash: String,
    created_at: String,
    created_by: String,
}

impl KeyRecord {
    fn shown(&self) -> Value {
        json!({
            "name": self.name,
            "tags": self.tags,
            "createdAt": self.created_at,
            "createdBy": self.created_by,
        })
    }
}

fn key_blob(org: &str, name: &str) -> String {
    format!("provisioner-key/{org}/{name}")
}

async fn admin(state: &AppState, principal: &Principal, org: &str) -> ApiResult<()> {
    let access = rbac::org_access(state, principal, org).await?;
    access.check(
        Verb::Create,
        Kind::Template,
        None,
        &format!("provisioner keys of organization {org}"),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
}

async fn create_key(
    State(state): State<AppState>,
    principal: Principal,
    slot: AuditSlotExt,
    Path(org): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    admin(&state, &principal, &org).await?;
    let req: CreateKey = decode_json(&read_body(&state, body).await?)?;
    slot.0
        .set_target("ProvisionerKey", Some(&org), None, Some(&req.name));
    let mut errors = Vec::new();
    if let Err(e) = model::validate_name("name", &req.name) {
        errors.push(e);
    }
    for (k, v) in &req.tags {
        let path = format!("tags.{k}");
        if let Err(e) = model::validate_label_key(&path, k) {
            errors.push(e);
        }
        if let Err(e) = model::validate_label_value(&path, v) {
            errors.push(e);
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid(
            "invalid provisioner key",
            model::Invalid { errors },
        ));
    }
    let blob = key_blob(&org, &req.name);
    if state.store.get_blob(&blob).await?.is_some() {
        return Err(ApiError::conflict(format!(
            "provisioner key {} already exists in organization {org}; delete it first to make a new one",
            req.name
        )));
    }
    let secret = auth::new_secret();
    let record = KeyRecord {
        name: req.name.clone(),
        organization: org.clone(),
        tags: req.tags,
        hash: auth::hash_secret(&secret),
        created_at: jiff::Timestamp::now().to_string(),
        created_by: principal.user.name.clone(),
    };
    let bytes = serde_json::to_vec(&record).map_err(ApiError::internal)?;
    state.store.put_blob(&blob, bytes).await?;
    let mut shown = record.shown();
    shown["key"] = json!(format!("{org}.{}.{secret}", record.name));
    Ok((StatusCode::CREATED, Json(shown)).into_response())
}

async fn read_key(state: &AppState, org: &str, name: &str) -> ApiResult<Option<KeyRecord>> {
    let Some(bytes) = state.store.get_blob(&key_blob(org, name)).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(ApiError::internal)
}

async fn list_keys(
    State(state): State<AppState>,
    principal: Principal,
    Path(org): Path<String>,
) -> ApiResult<Json<Value>> {
    admin(&state, &principal, &org).await?;
    Ok(Json(json!({ "items": keys_of(&state, &org).await? })))
}

/// The organization's keys as shown (no hash).
pub(crate) async fn keys_of(state: &AppState, org: &str) -> ApiResult<Vec<Value>> {
    let mut items = Vec::new();
    for blob in state.store.blob_names(&key_blob(org, "")).await? {
        let name = blob.rsplit('/').next().unwrap_or_default();
        if let Some(k) = read_key(state, org, name).await? {
            items.push(k.shown());
        }
    }
    Ok(items)
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

async fn delete_key(
    State(state): State<AppState>,
    principal: Principal,
    slot: AuditSlotExt,
    Path((org, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    admin(&state, &principal, &org).await?;
    slot.0
        .set_target("ProvisionerKey", Some(&org), None, Some(&name));
    if !state.store.delete_blob(&key_blob(&org, &name)).await? {
        return Err(ApiError::not_found(format!(
            "provisioner key {name} does not exist in organization {org}"
        )));
    }
    for p in state.provisioners.live() {
        if p.name.starts_with(&format!("{org}/{name}/")) {
            state.provisioners.gone(&p.name);
        }
    }
    Ok(StatusCode::NO_CONTENT.into_response())
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

fn bad_key() -> ApiError {
    ApiError::unauthorized(
        "invalid provisioner key: create one with `kiln provisioner keys create NAME` and pass it with --key or KILN_PROVISIONER_KEY",
    )
}

/// The key a provisioner request presents (`Authorization: Bearer <org>.<name>.<secret>`).
async fn authenticate(state: &AppState, headers: &HeaderMap) -> ApiResult<KeyRecord> {
    let token = auth::bearer_token(headers).ok_or_else(bad_key)?;
    let mut parts = token.splitn(3, '.');
    let (Some(org), Some(name), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad_key());
    };
    if model::validate_name("", org).is_err() || model::validate_name("", name).is_err() {
        return Err(bad_key());
    }
    let record = read_key(state, org, name).await?.ok_or_else(bad_key)?;
    let given = auth::hash_secret(secret);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(
        record.hash.as_bytes(),
        given.as_bytes(),
    )) {
        return Err(bad_key());
    }
    Ok(record)
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
    let key = authenticate(&state, &headers).await?;
    let req: AcquireRequest = decode_json(&read_body(&state, body).await?)?;
    let name_ok = !req.name.is_empty()
        && req.name.len() <= 128
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok {
        return Err(ApiError::invalid(
            "invalid provisioner",
            model::Invalid::one(
                "name",
                "1 to 128 letters, digits, '-', '_' or '.' (e.g. the host name)",
            ),
        ));
    }
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
    let key = authenticate(state, headers).await?;
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
