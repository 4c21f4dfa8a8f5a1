//! Delivery actions on a component: promote its release from one environment to the next along the project's
//! pipeline, approve a promotion that waits for approval, roll an environment back, and list the release
//! history. All of them re-point ReleaseBindings; the binding controller does the rest.
//!
//! A promotion into an environment whose path `requiresApproval` records the pending release on the target
//! binding (annotations `kiln.dev/pending-*`) until someone other than the requester who may update bindings
//! approves it.

use std::collections::HashMap;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use model::kinds::{BindingState, DeploymentPipelineSpec, ReleaseBindingSpec};
use model::{Kind, ObjectMeta, Resource};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use store::{Key, ListQuery, StoreError};

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, Verb};
use crate::resources::{decode_json, read_body, AuditSlotExt};
use crate::routes::{Api, Op};
use crate::AppState;

const PENDING_RELEASE: &str = "kiln.dev/pending-release";
const PENDING_BY: &str = "kiln.dev/pending-requested-by";
const PENDING_SINCE: &str = "kiln.dev/pending-since";

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// The environment whose release is promoted.
    pub from: String,
    /// The environment it is promoted to.
    pub to: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApproveRequest {
    /// The environment whose pending promotion is approved.
    pub environment: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    pub environment: String,
    /// The release to go back to; default: the one before the current.
    #[serde(default)]
    pub to: Option<String>,
}

/// What a delivery action did.
#[derive(Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryResult {
    /// `promoted`, `pending-approval`, `approved`, `rolled-back` or `unchanged`.
    pub result: String,
    pub environment: String,
    pub release: String,
    pub message: String,
}

/// The component a request addresses.
struct Target {
    org: String,
    project: String,
    component: String,
}

impl Target {
    fn from(p: &HashMap<String, String>) -> Target {
        let get = |k: &str| p.get(k).cloned().unwrap_or_default();
        Target {
            org: get("org"),
            project: get("project"),
            component: get("name"),
        }
    }

    fn key(&self, kind: Kind, name: &str) -> Key {
        let project = (kind.scope() == model::Scope::Project).then(|| self.project.clone());
        Key {
            kind,
            organization: Some(self.org.clone()),
            project,
            name: name.to_owned(),
        }
    }

    fn binding_key(&self, env: &str) -> Key {
        self.key(
            Kind::ReleaseBinding,
            &ReleaseBindingSpec::name_for(&self.component, env),
        )
    }
}

async fn get_opt(state: &AppState, key: &Key) -> ApiResult<Option<Resource>> {
    match state.store.get(key).await {
        Ok(r) => Ok(Some(r)),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Checks access (404 for invisible, 403 for not allowed) and that the component exists.
async fn authorize(
    state: &AppState,
    p: &Principal,
    t: &Target,
    verb: Verb,
    kind: Kind,
) -> ApiResult<Resource> {
    let acc = rbac::org_access(state, p, &t.org).await?;
    let what = format!("Component {}/{}/{}", t.org, t.project, t.component);
    acc.check(Verb::Get, Kind::Component, Some(&t.project), &what)?;
    acc.check(
        verb,
        kind,
        Some(&t.project),
        &format!("release bindings of {what}"),
    )?;
    state
        .store
        .get(&t.key(Kind::Component, &t.component))
        .await
        .map_err(Into::into)
}

/// The project's pipeline.
async fn pipeline(state: &AppState, t: &Target) -> ApiResult<(String, DeploymentPipelineSpec)> {
    let project = state.store.get(&t.key(Kind::Project, &t.project)).await?;
    let name = project
        .spec
        .get("deploymentPipelineRef")
        .and_then(Value::as_str)
        .unwrap_or(model::kinds::DEFAULT_PIPELINE)
        .to_owned();
    let obj = get_opt(state, &t.key(Kind::DeploymentPipeline, &name))
        .await?
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "project {} uses DeploymentPipeline {name}, which does not exist",
                t.project
            ))
        })?;
    let spec = model::typed_spec(&obj)
        .map_err(|e| ApiError::conflict(format!("DeploymentPipeline {name}: {e}")))?;
    Ok((name, spec))
}

fn binding(t: &Target, env: &str, release: &str, state: BindingState) -> Resource {
    let spec = ReleaseBindingSpec {
        component: t.component.clone(),
        environment: env.to_owned(),
        release: release.to_owned(),
        state,
    };
    let mut metadata = ObjectMeta {
        name: ReleaseBindingSpec::name_for(&t.component, env),
        organization: Some(t.org.clone()),
        project: Some(t.project.clone()),
        ..Default::default()
    };
    metadata
        .labels
        .insert("kiln.dev/component".into(), t.component.clone());
    Resource {
        api_version: model::API_VERSION.into(),
        kind: Kind::ReleaseBinding.as_str().into(),
        metadata,
        spec: serde_json::to_value(spec).unwrap_or(Value::Null),
        status: Value::Null,
    }
}

/// Points the binding of `env` at `release` (creating it if needed) and clears any pending promotion.
async fn bind(state: &AppState, t: &Target, env: &str, release: &str) -> ApiResult<bool> {
    match get_opt(state, &t.binding_key(env)).await? {
        None => {
            state
                .store
                .create(binding(t, env, release, BindingState::Active))
                .await?;
            Ok(true)
        }
        Some(mut b) => {
            let changed = b.spec.get("release").and_then(Value::as_str) != Some(release)
                || b.spec.get("state").and_then(Value::as_str) != Some("active");
            b.spec["release"] = json!(release);
            b.spec["state"] = json!("active");
            for a in [PENDING_RELEASE, PENDING_BY, PENDING_SINCE] {
                b.metadata.annotations.remove(a);
            }
            state.store.update(b).await?;
            Ok(changed)
        }
    }
}

async fn event(state: &AppState, t: &Target, reason: &str, message: String) {
    let ev = store::Event {
        time: jiff::Timestamp::now(),
        kind: Kind::Component.as_str().into(),
        organization: Some(t.org.clone()),
        project: Some(t.project.clone()),
        name: t.component.clone(),
        type_: "Normal".into(),
        reason: reason.into(),
        message,
    };
    if let Err(e) = state.store.record_event(ev).await {
        tracing::warn!(error = %e, "recording a delivery event failed");
    }
}

fn ok(result: &str, env: &str, release: &str, message: String) -> Response {
    Json(DeliveryResult {
        result: result.into(),
        environment: env.into(),
        release: release.into(),
        message,
    })
    .into_response()
}

/// What every delivery action starts with: the component from the path, named to the audit log, the request
/// body decoded, and the caller allowed to re-point its bindings.
async fn begin<T: serde::de::DeserializeOwned>(
    state: &AppState,
    p: &Principal,
    slot: &AuditSlotExt,
    params: &HashMap<String, String>,
    body: Body,
) -> ApiResult<(Target, T)> {
    let t = Target::from(params);
    slot.0.set_target(
        Kind::Component.as_str(),
        Some(&t.org),
        Some(&t.project),
        Some(&t.component),
    );
    let req: T = decode_json(&read_body(state, body).await?)?;
    authorize(state, p, &t, Verb::Update, Kind::ReleaseBinding).await?;
    Ok((t, req))
}

async fn promote(
    State(state): State<AppState>,
    p: Principal,
    slot: AuditSlotExt,
    Path(params): Path<HashMap<String, String>>,
    body: Body,
) -> ApiResult<Response> {
    let (t, req): (Target, PromoteRequest) = begin(&state, &p, &slot, &params, body).await?;
    let (pipeline_name, pipeline) = pipeline(&state, &t).await?;
    let allowed: Vec<&str> = pipeline
        .promotion_paths
        .iter()
        .filter(|path| path.source_environment_ref == req.from)
        .flat_map(|path| path.target_environment_refs.iter().map(|x| x.name.as_str()))
        .collect();
    let Some(target) = pipeline
        .promotion_paths
        .iter()
        .filter(|path| path.source_environment_ref == req.from)
        .flat_map(|path| path.target_environment_refs.iter())
        .find(|x| x.name == req.to)
    else {
        let from_here = if allowed.is_empty() {
            "none".to_owned()
        } else {
            allowed.join(", ")
        };
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "no-promotion-path",
            format!("DeploymentPipeline {pipeline_name} has no promotion path {} → {}; allowed from {}: {from_here}", req.from, req.to, req.from),
        ));
    };
    let source = get_opt(&state, &t.binding_key(&req.from))
        .await?
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "{} has no release in environment {} to promote",
                t.component, req.from
            ))
        })?;
    let release = source
        .spec
        .get("release")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if target.requires_approval {
        let mut b = match get_opt(&state, &t.binding_key(&req.to)).await? {
            Some(b) => b,
            None => binding(&t, &req.to, &release, BindingState::Undeployed),
        };
        b.metadata
            .annotations
            .insert(PENDING_RELEASE.into(), release.clone());
        b.metadata
            .annotations
            .insert(PENDING_BY.into(), p.user.name.clone());
        b.metadata
            .annotations
            .insert(PENDING_SINCE.into(), jiff::Timestamp::now().to_string());
        if b.metadata.resource_version.is_some() {
            state.store.update(b).await?;
        } else {
            state.store.create(b).await?;
        }
        let message = format!(
            "promotion of {release} from {} to {} waits for approval (kiln approve {} --env {})",
            req.from, req.to, t.component, req.to
        );
        event(&state, &t, "PromotionRequested", message.clone()).await;
        return Ok((
            StatusCode::ACCEPTED,
            ok("pending-approval", &req.to, &release, message),
        )
            .into_response());
    }
    let changed = bind(&state, &t, &req.to, &release).await?;
    let message = format!("release {release} promoted from {} to {}", req.from, req.to);
    if changed {
        event(&state, &t, "Promoted", message.clone()).await;
    }
    Ok(ok(
        if changed { "promoted" } else { "unchanged" },
        &req.to,
        &release,
        message,
    ))
}

async fn approve(
    State(state): State<AppState>,
    p: Principal,
    slot: AuditSlotExt,
    Path(params): Path<HashMap<String, String>>,
    body: Body,
) -> ApiResult<Response> {
    let (t, req): (Target, ApproveRequest) = begin(&state, &p, &slot, &params, body).await?;
    let b = get_opt(&state, &t.binding_key(&req.environment)).await?;
    let pending = b
        .as_ref()
        .and_then(|b| b.metadata.annotations.get(PENDING_RELEASE).cloned());
    let Some(release) = pending else {
        return Err(ApiError::conflict(format!(
            "no promotion of {} to {} is waiting for approval",
            t.component, req.environment
        )));
    };
    let requester = b
        .as_ref()
        .and_then(|b| b.metadata.annotations.get(PENDING_BY).cloned())
        .unwrap_or_default();
    if requester == p.user.name && !p.user.superuser {
        return Err(ApiError::forbidden(format!(
            "{requester} requested this promotion; someone else must approve it"
        )));
    }
    bind(&state, &t, &req.environment, &release).await?;
    let message = format!(
        "promotion of {release} to {} approved by {} (requested by {requester})",
        req.environment, p.user.name
    );
    event(&state, &t, "PromotionApproved", message.clone()).await;
    Ok(ok("approved", &req.environment, &release, message))
}

async fn rollback(
    State(state): State<AppState>,
    p: Principal,
    slot: AuditSlotExt,
    Path(params): Path<HashMap<String, String>>,
    body: Body,
) -> ApiResult<Response> {
    let (t, req): (Target, RollbackRequest) = begin(&state, &p, &slot, &params, body).await?;
    let b = get_opt(&state, &t.binding_key(&req.environment))
        .await?
        .ok_or_else(|| {
            ApiError::conflict(format!(
                "{} is not deployed in environment {}",
                t.component, req.environment
            ))
        })?;
    let current = b
        .spec
        .get("release")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let to = match req.to {
        Some(r) => {
            if get_opt(&state, &t.key(Kind::Release, &r)).await?.is_none()
                || !r.starts_with(&format!("{}-", t.component))
            {
                return Err(ApiError::invalid(
                    "",
                    model::Invalid::one("to", format!("{r} is not a release of {}", t.component)),
                ));
            }
            r
        }
        None => b.status["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h.get("release").and_then(Value::as_str))
            .find(|r| *r != current)
            .map(str::to_owned)
            .ok_or_else(|| {
                ApiError::conflict(format!(
                    "environment {} has run no release of {} before {current}",
                    req.environment, t.component
                ))
            })?,
    };
    bind(&state, &t, &req.environment, &to).await?;
    let message = format!(
        "environment {} rolled back from {current} to {to}",
        req.environment
    );
    event(&state, &t, "RolledBack", message.clone()).await;
    Ok(ok("rolled-back", &req.environment, &to, message))
}

async fn releases(
    State(state): State<AppState>,
    p: Principal,
    Path(params): Path<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let t = Target::from(&params);
    authorize(&state, &p, &t, Verb::List, Kind::ReleaseBinding).await?;
    let selector = Some(format!("kiln.dev/component={}", t.component));
    let q = |kind| ListQuery {
        kind: Some(kind),
        organization: Some(t.org.clone()),
        project: Some(t.project.clone()),
        selector: selector.clone(),
        ..Default::default()
    };
    let mut releases: Vec<Value> = state
        .store
        .list(&q(Kind::Release))
        .await?
        .items
        .into_iter()
        .map(|r| json!({"name": r.metadata.name, "created": r.metadata.creation_timestamp, "componentGeneration": r.spec.get("componentGeneration")}))
        .collect();
    releases.sort_by(|a, b| b["created"].as_str().cmp(&a["created"].as_str()));
    let environments: Vec<Value> = state
        .store
        .list(&q(Kind::ReleaseBinding))
        .await?
        .items
        .into_iter()
        .filter(|b| b.spec.get("component").and_then(Value::as_str) == Some(&t.component))
        .map(|b| {
            json!({
                "environment": b.spec.get("environment"),
                "release": b.spec.get("release"),
                "state": b.spec.get("state"),
                "ready": b.condition("Ready").map(|c| c.status == model::ConditionStatus::True).unwrap_or(false),
                "pending": b.metadata.annotations.get(PENDING_RELEASE),
                "history": b.status.get("history").cloned().unwrap_or(json!([])),
            })
        })
        .collect();
    Ok(Json(
        json!({"releases": releases, "environments": environments}),
    ))
}

/// Registers the delivery routes.
pub fn register(api: Api) -> Api {
    let base = "/api/v1/orgs/{org}/projects/{project}/components/{name}";
    api.op(
        Op::new(
            Method::POST,
            format!("{base}/promote"),
            "promoteComponent",
            "delivery",
            "Promote the release running in one environment to the next",
        )
        .body("PromoteRequest")
        .returns(200, Some("DeliveryResult")),
        promote,
    )
    .op(
        Op::new(
            Method::POST,
            format!("{base}/approve"),
            "approvePromotion",
            "delivery",
            "Approve a promotion waiting for approval",
        )
        .body("ApproveRequest")
        .returns(200, Some("DeliveryResult")),
        approve,
    )
    .op(
        Op::new(
            Method::POST,
            format!("{base}/rollback"),
            "rollbackComponent",
            "delivery",
            "Point an environment back at an earlier release",
        )
        .body("RollbackRequest")
        .returns(200, Some("DeliveryResult")),
        rollback,
    )
    .op(
        Op::new(
            Method::GET,
            format!("{base}/releases"),
            "listComponentReleases",
            "delivery",
            "Releases of a component and what runs in each environment",
        )
        .returns(200, Some("ItemList")),
        releases,
    )
}
