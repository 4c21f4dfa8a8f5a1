//! Handlers for the resource kinds: list (and watch), get, create, replace-or-create (apply), merge patch,
//! delete and status writes. Every handler authenticates, resolves the caller's access to the organization,
//! checks the verb, and only then touches the store.

use std::collections::HashMap;
use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::StreamExt;
use model::{Kind, Resource, Scope};
use serde::Deserialize;
use serde_json::{json, Value};
use store::{Deleted, Key, ListQuery, StoreError, WatchQuery};

use crate::auth::{AuditSlot, Principal};
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, OrgAccess, Verb};
use crate::routes::{Api, Op};
use crate::AppState;

/// Label on the built-in roles; they cannot be changed through the API.
pub const BUILTIN_LABEL: &str = "kiln.dev/builtin";

/// The path parameter that names the object itself.
fn name_param(kind: Kind) -> &'static str {
    match kind {
        Kind::Organization => "org",
        Kind::Project => "project",
        _ => "name",
    }
}

/// Collection path of a kind (for project-scoped kinds: within one project).
pub fn collection_path(kind: Kind) -> String {
    match kind.scope() {
        Scope::Cluster => "/api/v1/orgs".to_string(),
        Scope::Organization => format!("/api/v1/orgs/{{org}}/{}", kind.plural()),
        Scope::Project => format!(
            "/api/v1/orgs/{{org}}/projects/{{project}}/{}",
            kind.plural()
        ),
    }
}

pub fn item_path(kind: Kind) -> String {
    format!("{}/{{{}}}", collection_path(kind), name_param(kind))
}

/// Which objects a request addresses, from its path parameters.
#[derive(Debug, Clone)]
struct Target {
    kind: Kind,
    org: Option<String>,
    project: Option<String>,
    name: Option<String>,
}

impl Target {
    fn from_params(kind: Kind, p: &HashMap<String, String>) -> Target {
        let org = if kind == Kind::Organization {
            None
        } else {
            p.get("org").cloned()
        };
        Target {
            kind,
            org,
            project: p
                .get("project")
                .cloned()
                .filter(|_| kind.scope() == Scope::Project),
            name: p.get(name_param(kind)).cloned(),
        }
    }

    fn key(&self) -> Key {
        Key {
            kind: self.kind,
            organization: self.org.clone(),
            project: self.project.clone(),
            name: self.name.clone().unwrap_or_default(),
        }
    }

    /// The organization whose access governs this request.
    fn governing_org(&self) -> Option<&str> {
        if self.kind == Kind::Organization {
            self.name.as_deref()
        } else {
            self.org.as_deref()
        }
    }

    fn describe(&self) -> String {
        self.key().to_string()
    }

    /// Tells the audit layer which object this request addresses.
    fn audit(&self, slot: &AuditSlot) {
        slot.set_target(
            self.kind.as_str(),
            self.governing_org(),
            self.project.as_deref(),
            self.name.as_deref(),
        );
    }

    /// The project access is checked against: the object's project, or for a Project, itself.
    fn rbac_project(&self) -> Option<&str> {
        if self.kind == Kind::Project {
            self.name.as_deref()
        } else {
            self.project.as_deref()
        }
    }
}

/// The project an object belongs to for access checks (a Project belongs to itself).
fn object_project(r: &Resource) -> Option<&str> {
    if r.kind == Kind::Project.as_str() {
        Some(r.metadata.name.as_str())
    } else {
        r.metadata.project.as_deref()
    }
}

/// Resolves the caller's access for a target (404 when the organization is invisible to them).
async fn access(
    state: &AppState,
    principal: &Principal,
    t: &Target,
) -> ApiResult<Option<OrgAccess>> {
    match t.governing_org() {
        Some(org) => Ok(Some(rbac::org_access(state, principal, org).await?)),
        None => Ok(None),
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct ListParams {
    label_selector: Option<String>,
    limit: Option<usize>,
    #[serde(rename = "continue")]
    continue_token: Option<String>,
    watch: Option<bool>,
    resource_version: Option<u64>,
}

/// Removes what `get` must never return (secret values).
pub fn present(mut r: Resource) -> Resource {
    if r.kind == Kind::Secret.as_str() {
        for field in ["data", "stringData", "sealed"] {
            if let Some(Value::Object(map)) = r.spec.get_mut(field) {
                for v in map.values_mut() {
                    *v = Value::String(String::new());
                }
            }
        }
    }
    r
}

fn list_kind_name(kind: Kind) -> String {
    format!("{}List", kind.as_str())
}

/// Which objects of a list or watch the caller may see, from their access at the time it was resolved.
struct Visibility {
    verb: Verb,
    kind: Kind,
    acc: Option<OrgAccess>,
    /// For organizations listed by a caller who is not a superuser: the ones they are bound in.
    orgs: Option<Vec<String>>,
}

impl Visibility {
    /// Resolves the caller's access for a list or watch of `t` (404/403 as for any request).
    async fn resolve(
        state: &AppState,
        principal: &Principal,
        t: &Target,
        verb: Verb,
    ) -> ApiResult<Visibility> {
        let acc = access(state, principal, t).await?;
        let orgs = match (&acc, t.kind) {
            (None, Kind::Organization) => rbac::visible_orgs(&state.store, principal).await?,
            _ => None,
        };
        if let Some(a) = &acc {
            if (t.kind.scope() != Scope::Project && t.kind != Kind::Project) || t.project.is_some()
            {
                a.check(
                    verb,
                    t.kind,
                    t.project.as_deref(),
                    &format!("{} in {}", t.kind.plural(), t.describe_scope()),
                )?;
            }
        }
        Ok(Visibility {
            verb,
            kind: t.kind,
            acc,
            orgs,
        })
    }

    fn allows(&self, r: &Resource) -> bool {
        if let Some(orgs) = &self.orgs {
            return orgs.contains(&r.metadata.name);
        }
        match &self.acc {
            Some(a) => a.allows(self.verb, self.kind, object_project(r)),
            None => true,
        }
    }
}

async fn list(
    state: AppState,
    principal: Principal,
    headers: HeaderMap,
    t: Target,
    params: ListParams,
) -> ApiResult<Response> {
    let verb = if params.watch == Some(true) {
        Verb::Watch
    } else {
        Verb::List
    };
    let vis = Visibility::resolve(&state, &principal, &t, verb).await?;
    if params.watch == Some(true) {
        let ctx = WatchCtx {
            state: state.clone(),
            principal,
            headers,
            t: t.clone(),
            vis,
            checked: std::time::Instant::now(),
        };
        return watch(ctx, params.resource_version).await;
    }
    let q = ListQuery {
        kind: Some(t.kind),
        organization: t.org.clone(),
        project: t.project.clone(),
        selector: params.label_selector,
        limit: params.limit,
        continue_token: params.continue_token,
    };
    let page = state.store.list(&q).await?;
    let items: Vec<Resource> = page
        .items
        .into_iter()
        .filter(|r| vis.allows(r))
        .map(present)
        .collect();
    let mut meta = json!({"resourceVersion": page.revision.to_string()});
    if let Some(c) = page.continue_token {
        meta["continue"] = Value::String(c);
    }
    Ok(Json(json!({"apiVersion": model::API_VERSION, "kind": list_kind_name(t.kind), "metadata": meta, "items": items})).into_response())
}

impl Target {
    fn describe_scope(&self) -> String {
        match (&self.org, &self.project) {
            (Some(o), Some(p)) => format!("project {o}/{p}"),
            (Some(o), None) => format!("organization {o}"),
            _ => "the server".to_string(),
        }
    }
}

/// How long a watch stream trusts the credentials and access it was opened with before checking them again.
const WATCH_RECHECK: std::time::Duration = std::time::Duration::from_secs(1);

/// What a watch stream needs to check, while it runs, that its caller may still see what it sends.
struct WatchCtx {
    state: AppState,
    principal: Principal,
    headers: HeaderMap,
    t: Target,
    vis: Visibility,
    checked: std::time::Instant,
}

impl WatchCtx {
    /// Re-authenticates the caller and re-resolves their access when the last check is older than
    /// [`WATCH_RECHECK`]; `false` when the credentials were revoked or expired, or the access is gone.
    async fn recheck(&mut self) -> bool {
        if self.checked.elapsed() < WATCH_RECHECK {
            return true;
        }
        let bearer = crate::auth::bearer_token(&self.headers);
        let principal = match crate::auth::authenticate(&self.state, &self.headers, bearer).await {
            Ok(Some(p)) if p.user.id == self.principal.user.id => p,
            _ => return false,
        };
        match Visibility::resolve(&self.state, &principal, &self.t, self.vis.verb).await {
            Ok(vis) => {
                self.vis = vis;
                self.principal = principal;
                self.checked = std::time::Instant::now();
                true
            }
            Err(_) => false,
        }
    }
}

/// Streams watch events as newline-delimited JSON until the client goes away, the server shuts down, or the
/// caller's credentials or access to what is watched go away.
async fn watch(ctx: WatchCtx, from: Option<u64>) -> ApiResult<Response> {
    let q = WatchQuery {
        kind: Some(ctx.t.kind),
        organization: ctx.t.org.clone(),
        project: ctx.t.project.clone(),
        from_revision: from,
    };
    let stream = ctx.state.store.watch(&q).await?;
    let shutdown = ctx.state.shutdown.clone();
    let gauge = WatchGauge::new(ctx.state.clone());
    let body = futures_util::stream::unfold((stream, gauge, ctx), move |(mut s, g, mut ctx)| {
        let mut shutdown = shutdown.clone();
        async move {
            loop {
                tokio::select! {
                    _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return None,
                    ev = s.next() => match ev {
                        None => return None,
                        Some(Err(e)) => {
                            let error = match e {
                                StoreError::Expired { .. } => e.to_string(),
                                e => {
                                    tracing::error!(error = %e, "watch stream failed");
                                    "internal server error; see the server log".to_string()
                                }
                            };
                            let line = json!({"type": "Error", "error": error});
                            return Some((Ok::<_, Infallible>(Bytes::from(format!("{line}\n"))), (s, g, ctx)));
                        }
                        Some(Ok(mut ev)) => {
                            if !ctx.recheck().await { return None; }
                            if !ctx.vis.allows(&ev.object) { continue; }
                            ev.object = present(ev.object);
                            let mut line = serde_json::to_vec(&ev).unwrap_or_default();
                            line.push(b'\n');
                            return Some((Ok(Bytes::from(line)), (s, g, ctx)));
                        }
                    }
                }
            }
        }
    });
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

/// Counts open watch streams in the metrics while alive.
struct WatchGauge(AppState);
impl WatchGauge {
    fn new(state: AppState) -> Self {
        state
            .metrics
            .watch_streams
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        WatchGauge(state)
    }
}
impl Drop for WatchGauge {
    fn drop(&mut self) {
        self.0
            .metrics
            .watch_streams
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn get(state: AppState, principal: Principal, t: Target) -> ApiResult<Response> {
    let acc = access(&state, &principal, &t).await?;
    if let Some(a) = &acc {
        a.check(Verb::Get, t.kind, t.rbac_project(), &t.describe())?;
    }
    let obj = state.store.get(&t.key()).await?;
    Ok(Json(present(obj)).into_response())
}

/// Reads a request body of at most the configured size.
pub async fn read_body(state: &AppState, body: Body) -> ApiResult<Bytes> {
    let limit = state.config.max_body_bytes;
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too-large",
            format!(
                "request body exceeds the limit of {limit} bytes (server flag --max-body-bytes)"
            ),
        )
    })
}

/// Decodes one manifest (JSON or YAML) from a request body.
pub fn decode_one(bytes: &[u8]) -> ApiResult<Resource> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ApiError::bad_request(format!("request body is not UTF-8: {e}")))?;
    let mut docs =
        model::decode_manifests(text).map_err(|e| ApiError::bad_request(e.to_string()))?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        0 => Err(ApiError::bad_request("request body holds no manifest")),
        n => Err(ApiError::bad_request(format!(
            "request body holds {n} manifests; send one per request"
        ))),
    }
}

/// Checks that the manifest matches the URL it was sent to, fills in scope from the URL, and validates it.
fn prepare(t: &Target, mut obj: Resource) -> ApiResult<Resource> {
    if obj.kind != t.kind.as_str() {
        let known = obj.kind().is_some();
        let msg = if known {
            format!("kind: this endpoint takes {}, got {}", t.kind, obj.kind)
        } else {
            format!(
                "kind: unknown kind {:?}; known kinds: {}",
                obj.kind,
                Kind::ALL
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(ApiError::invalid(
            "",
            model::Invalid::one("kind", msg.trim_start_matches("kind: ")),
        ));
    }
    if let Some(name) = &t.name {
        if obj.metadata.name.is_empty() {
            obj.metadata.name = name.clone();
        } else if obj.metadata.name != *name {
            return Err(ApiError::invalid(
                "",
                model::Invalid::one(
                    "metadata.name",
                    format!("is {:?} but the URL names {name:?}", obj.metadata.name),
                ),
            ));
        }
    }
    for (field, from_url, value) in [
        (
            "metadata.organization",
            &t.org,
            &mut obj.metadata.organization,
        ),
        ("metadata.project", &t.project, &mut obj.metadata.project),
    ] {
        match (from_url, value.as_deref()) {
            (Some(u), Some(v)) if u != v => {
                return Err(ApiError::invalid(
                    "",
                    model::Invalid::one(field, format!("is {v:?} but the URL names {u:?}")),
                ));
            }
            (Some(u), _) => *value = Some(u.clone()),
            (None, _) => {}
        }
    }
    // Fields only the store sets are ignored on input, as is status (written only through /status).
    obj.metadata.uid = None;
    obj.metadata.generation = None;
    obj.metadata.creation_timestamp = None;
    obj.metadata.deletion_timestamp = None;
    obj.status = Value::Null;
    model::normalize(obj).map_err(|inv| ApiError::invalid("", inv))
}

/// Refuses a write whose required references (or parent project) do not exist.
async fn check_references(state: &AppState, obj: &Resource) -> ApiResult<()> {
    let org = obj.metadata.organization.clone();
    let mut errors = Vec::new();
    if let (Some(o), Some(p)) = (&org, &obj.metadata.project) {
        let key = Key {
            kind: Kind::Project,
            organization: Some(o.clone()),
            project: None,
            name: p.clone(),
        };
        if let Err(StoreError::NotFound(_)) = state.store.get(&key).await {
            errors.push(model::FieldError::new(
                "metadata.project",
                format!("Project {p} does not exist in organization {o}"),
            ));
        }
    }
    for r in model::references(obj).into_iter().filter(|r| r.required) {
        let project = if r.kind.scope() == Scope::Project {
            r.project.clone().or_else(|| obj.metadata.project.clone())
        } else {
            None
        };
        let key = Key {
            kind: r.kind,
            organization: org.clone(),
            project,
            name: r.name.clone(),
        };
        match state.store.get(&key).await {
            Ok(_) => {}
            Err(StoreError::NotFound(_)) => errors.push(model::FieldError::new(
                r.path.clone(),
                format!(
                    "{} {} does not exist in organization {}",
                    r.kind,
                    r.name,
                    org.as_deref().unwrap_or("-")
                ),
            )),
            Err(e) => return Err(e.into()),
        }
    }
    for (path, tz) in time_zones(obj) {
        if let Err(e) = jiff::tz::TimeZone::get(&tz) {
            errors.push(model::FieldError::new(
                path,
                format!("unknown time zone {tz:?}: {e}"),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("", model::Invalid { errors }))
    }
}

/// The time zones an object names, with their field paths (checked against the time-zone database here; the
/// model checks only their syntax).
fn time_zones(obj: &Resource) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if obj.kind == Kind::Component.as_str() {
        if let Some(tz) = obj.spec.get("timezone").and_then(Value::as_str) {
            out.push(("spec.timezone".to_string(), tz.to_string()));
        }
    }
    if obj.kind == Kind::Workspace.as_str() {
        if let Some(tz) = obj
            .spec
            .pointer("/autostart/timezone")
            .and_then(Value::as_str)
        {
            out.push(("spec.autostart.timezone".to_string(), tz.to_string()));
        }
    }
    if obj.kind == Kind::Pipeline.as_str() {
        let triggers = obj.spec.get("triggers").and_then(Value::as_array);
        for (i, t) in triggers.into_iter().flatten().enumerate() {
            if let Some(tz) = t.pointer("/cron/timezone").and_then(Value::as_str) {
                out.push((format!("spec.triggers[{i}].cron.timezone"), tz.to_string()));
            }
        }
    }
    out
}

fn is_builtin(r: &Resource) -> bool {
    r.metadata
        .labels
        .get(BUILTIN_LABEL)
        .is_some_and(|v| v == "true")
}

/// A Release's or a TemplateVersion's spec never changes once created.
fn refuse_release_change(existing: &Resource, incoming: &Resource) -> Result<(), model::Invalid> {
    if existing.spec == incoming.spec {
        return Ok(());
    }
    let message = if existing.kind == Kind::Release.as_str() {
        "a Release is immutable; change the Component to make a new release"
    } else if existing.kind == Kind::TemplateVersion.as_str() {
        "a TemplateVersion is immutable; change the Template to make a new version"
    } else {
        return Ok(());
    };
    Err(model::Invalid::one("spec", message))
}

fn refuse_builtin(
    t: &Target,
    existing: Option<&Resource>,
    incoming: Option<&Resource>,
) -> ApiResult<()> {
    if t.kind == Kind::Role
        && (existing.is_some_and(is_builtin) || incoming.is_some_and(is_builtin))
    {
        return Err(ApiError::forbidden(format!(
            "{} is a built-in role and cannot be created, changed or deleted; define a Role of your own instead",
            t.describe()
        )));
    }
    Ok(())
}

/// Refuses a Role or RoleBinding that would grant more than the caller holds in the organization (see
/// [`OrgAccess::missing_for_grant`]). `acc` is `None` only where no organization governs the write.
async fn refuse_escalation(
    state: &AppState,
    acc: Option<&OrgAccess>,
    obj: &Resource,
) -> ApiResult<()> {
    let Some(acc) = acc else {
        return Ok(());
    };
    let (role_spec, project, what) = match obj.kind() {
        Some(Kind::Role) => (
            obj.spec.clone(),
            None,
            format!("Role {}", obj.metadata.name),
        ),
        Some(Kind::RoleBinding) => {
            let Some(role_name) = obj.spec.get("roleRef").and_then(Value::as_str) else {
                return Ok(());
            };
            let key = Key {
                kind: Kind::Role,
                organization: obj.metadata.organization.clone(),
                project: None,
                name: role_name.to_string(),
            };
            let role = match state.store.get(&key).await {
                Ok(r) => r,
                // A missing role is refused by the reference check; it grants nothing meanwhile.
                Err(StoreError::NotFound(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            let project = obj
                .spec
                .get("project")
                .and_then(Value::as_str)
                .map(str::to_string);
            (
                role.spec,
                project,
                format!("RoleBinding {} (role {role_name})", obj.metadata.name),
            )
        }
        _ => return Ok(()),
    };
    match acc.missing_for_grant(&role_spec, project.as_deref()) {
        None => Ok(()),
        Some((verb, kind)) => Err(ApiError::forbidden(format!(
            "{what} would grant {verb} on {} in organization {}, which you do not hold; a Role or RoleBinding may grant only what its author holds",
            kind.plural(),
            acc.organization
        ))),
    }
}

fn created(obj: Resource, status: StatusCode, result: &'static str) -> Response {
    let mut resp = (status, Json(present(obj))).into_response();
    resp.headers_mut()
        .insert("kiln-apply-result", HeaderValue::from_static(result));
    resp
}

/// Checks `verb` on the target with the caller's already-resolved access (`None`: no organization governs it).
fn authorize(
    principal: &Principal,
    t: &Target,
    verb: Verb,
    acc: Option<&OrgAccess>,
) -> ApiResult<()> {
    if t.kind == Kind::Organization && verb == Verb::Create {
        if !principal.user.superuser {
            return Err(ApiError::forbidden(
                "only server administrators (superusers) may create organizations",
            ));
        }
        return Ok(());
    }
    if let Some(a) = acc {
        a.check(verb, t.kind, t.rbac_project(), &t.describe())?;
    }
    Ok(())
}

/// Resolves the caller's access and checks `verb` on the target; returns the access.
async fn authorize_write(
    state: &AppState,
    principal: &Principal,
    t: &Target,
    verb: Verb,
) -> ApiResult<Option<OrgAccess>> {
    if t.kind == Kind::Organization && verb == Verb::Create {
        authorize(principal, t, verb, None)?;
        return Ok(None);
    }
    let acc = access(state, principal, t).await?;
    authorize(principal, t, verb, acc.as_ref())?;
    Ok(acc)
}

async fn create(
    state: AppState,
    principal: Principal,
    slot: AuditSlot,
    mut t: Target,
    body: Body,
) -> ApiResult<Response> {
    let obj = decode_one(&read_body(&state, body).await?)?;
    if t.name.is_none() {
        t.name = Some(obj.metadata.name.clone());
    }
    t.audit(&slot);
    let acc = authorize_write(&state, &principal, &t, Verb::Create).await?;
    let obj = prepare(&t, obj)?;
    let obj = crate::workspaces::admit::admit(&state, &principal, acc.as_ref(), None, obj).await?;
    let obj = crate::secrets::seal_object(&state.sealer, None, obj)?;
    refuse_builtin(&t, None, Some(&obj))?;
    check_references(&state, &obj).await?;
    refuse_escalation(&state, acc.as_ref(), &obj).await?;
    crate::quota::check(&state, None, &obj).await?;
    let obj = state.store.create(obj).await?;
    crate::bootstrap::after_create(&state, &principal, &obj).await?;
    crate::workspaces::admit::after_write(&state, &obj).await?;
    Ok(created(obj, StatusCode::CREATED, "created"))
}

/// PUT: replace the object, or create it if it does not exist (what `kiln apply` sends).
async fn apply(
    state: AppState,
    principal: Principal,
    slot: AuditSlot,
    t: Target,
    body: Body,
) -> ApiResult<Response> {
    t.audit(&slot);
    let obj = decode_one(&read_body(&state, body).await?)?;
    // Access is resolved before the object is read, so that whether it exists is not revealed to callers who
    // cannot see its organization. Superusers see every organization, existing or not.
    let acc = if t.kind == Kind::Organization && principal.user.superuser {
        None
    } else {
        access(&state, &principal, &t).await?
    };
    let existing = match state.store.get(&t.key()).await {
        Ok(o) => Some(o),
        Err(StoreError::NotFound(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let verb = if existing.is_some() {
        Verb::Update
    } else {
        Verb::Create
    };
    authorize(&principal, &t, verb, acc.as_ref())?;
    let obj = prepare(&t, obj)?;
    let obj =
        crate::workspaces::admit::admit(&state, &principal, acc.as_ref(), existing.as_ref(), obj)
            .await?;
    let obj = crate::secrets::seal_object(&state.sealer, existing.as_ref(), obj)?;
    refuse_builtin(&t, existing.as_ref(), Some(&obj))?;
    check_references(&state, &obj).await?;
    refuse_escalation(&state, acc.as_ref(), &obj).await?;
    crate::quota::check(&state, existing.as_ref(), &obj).await?;
    match existing {
        None => {
            let obj = state.store.create(obj).await?;
            crate::bootstrap::after_create(&state, &principal, &obj).await?;
            crate::workspaces::admit::after_write(&state, &obj).await?;
            Ok(created(obj, StatusCode::CREATED, "created"))
        }
        Some(old) => {
            refuse_release_change(&old, &obj).map_err(|e| ApiError::invalid("", e))?;
            let mut obj = obj;
            obj.metadata.finalizers = keep_controller_finalizers(&old, obj.metadata.finalizers);
            let before = old.metadata.resource_version.clone();
            let obj = state.store.update(obj).await?;
            crate::workspaces::admit::after_write(&state, &obj).await?;
            let result = if obj.metadata.resource_version == before {
                "unchanged"
            } else {
                "configured"
            };
            Ok(created(obj, StatusCode::OK, result))
        }
    }
}

/// The finalizers of a replaced object: the `kiln.dev/` ones Kiln's controllers hold stay whatever the manifest
/// says (so applying a manifest neither reports a change nor lets a deletion skip its clean-up); others follow
/// the manifest. The current order is kept.
fn keep_controller_finalizers(old: &Resource, wanted: Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = old
        .metadata
        .finalizers
        .iter()
        .filter(|f| f.starts_with("kiln.dev/") || wanted.contains(f))
        .cloned()
        .collect();
    for f in wanted {
        if !out.contains(&f) {
            out.push(f);
        }
    }
    out
}

async fn patch(
    state: AppState,
    principal: Principal,
    slot: AuditSlot,
    t: Target,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    t.audit(&slot);
    let acc = authorize_write(&state, &principal, &t, Verb::Patch).await?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/merge-patch+json") && !ct.starts_with("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            format!("PATCH takes a JSON merge patch (Content-Type: application/merge-patch+json), got {ct:?}"),
        ));
    }
    let bytes = read_body(&state, body).await?;
    let patch: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("merge patch is not valid JSON: {e}")))?;
    if !patch.is_object() {
        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
    }
    // The merged object is checked in full (references, built-in roles, escalation) before it is written, and
    // written only over the version it was merged from; a concurrent change starts over.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let current = state.store.get(&t.key()).await?;
        refuse_builtin(&t, Some(&current), None)?;
        let mut doc = serde_json::to_value(&current).map_err(ApiError::internal)?;
        store::merge_patch(&mut doc, &patch);
        let patched: Resource = serde_json::from_value(doc).map_err(|e| {
            ApiError::invalid(
                "",
                model::Invalid::one("", format!("the patched object is malformed: {e}")),
            )
        })?;
        let mut next = current.clone();
        next.spec = patched.spec;
        next.metadata.labels = patched.metadata.labels;
        next.metadata.annotations = patched.metadata.annotations;
        next.metadata.finalizers = patched.metadata.finalizers;
        let next = prepare(&t, next)?;
        let next =
            crate::workspaces::admit::admit(&state, &principal, acc.as_ref(), Some(&current), next)
                .await?;
        let next = crate::secrets::seal_object(&state.sealer, Some(&current), next)?;
        refuse_release_change(&current, &next).map_err(|e| ApiError::invalid("", e))?;
        refuse_builtin(&t, None, Some(&next))?;
        check_references(&state, &next).await?;
        refuse_escalation(&state, acc.as_ref(), &next).await?;
        crate::quota::check(&state, Some(&current), &next).await?;
        match state.store.update(next).await {
            Err(StoreError::Conflict { .. }) if attempt < PATCH_ATTEMPTS => continue,
            Err(e) => return Err(e.into()),
            Ok(obj) => {
                crate::workspaces::admit::after_write(&state, &obj).await?;
                return Ok(Json(present(obj)).into_response());
            }
        }
    }
}

/// How often a merge patch is re-applied when the object changes under it.
const PATCH_ATTEMPTS: u32 = 5;

async fn delete(
    state: AppState,
    principal: Principal,
    slot: AuditSlot,
    t: Target,
) -> ApiResult<Response> {
    t.audit(&slot);
    authorize_write(&state, &principal, &t, Verb::Delete).await?;
    let existing = state.store.get(&t.key()).await?;
    refuse_builtin(&t, Some(&existing), None)?;
    crate::bootstrap::before_delete(&state, &existing).await?;
    match state.store.delete(&t.key(), None).await? {
        Deleted::Gone(obj) => Ok((StatusCode::OK, Json(present(obj))).into_response()),
        Deleted::Pending(obj) => Ok((StatusCode::ACCEPTED, Json(present(obj))).into_response()),
    }
}

async fn put_status(
    state: AppState,
    principal: Principal,
    slot: AuditSlot,
    t: Target,
    body: Body,
) -> ApiResult<Response> {
    t.audit(&slot);
    authorize_write(&state, &principal, &t, Verb::Update).await?;
    let bytes = read_body(&state, body).await?;
    let obj: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))?;
    let status = obj
        .get("status")
        .cloned()
        .ok_or_else(|| ApiError::invalid("", model::Invalid::one("status", "is required")))?;
    if !status.is_object() {
        return Err(ApiError::invalid(
            "",
            model::Invalid::one("status", "must be an object"),
        ));
    }
    let rv = obj
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .map(str::to_string);
    let obj = state
        .store
        .update_status(&t.key(), status, rv.as_deref())
        .await?;
    Ok(Json(present(obj)).into_response())
}

type P = Path<HashMap<String, String>>;

/// Registers every kind's routes.
pub fn register(mut api: Api) -> Api {
    for &kind in Kind::ALL {
        let coll = collection_path(kind);
        let item = item_path(kind);
        let k = kind.as_str();
        let plural = kind.plural();
        let list_op = |path: &str, id: String, summary: String| {
            Op::new(Method::GET, path, id, "resources", summary)
                .query("labelSelector", "label selector, e.g. `app=web,tier!=db`")
                .query("limit", "page size")
                .query("continue", "continue token from the previous page")
                .query(
                    "watch",
                    "`true` to stream changes as newline-delimited JSON",
                )
                .query(
                    "resourceVersion",
                    "with watch: stream changes after this revision",
                )
                .returns(200, Some("ResourceList"))
        };
        api = api
            .op(list_op(&coll, format!("list{k}"), format!("List {plural}")), move |State(s): State<AppState>, pr: Principal, headers: HeaderMap, Path(p): P, Query(q): Query<ListParams>| async move {
                list(s, pr, headers, Target::from_params(kind, &p), q).await
            })
            .op(
                Op::new(Method::POST, &coll, format!("create{k}"), "resources", format!("Create a {k}")).body("Resource").returns(201, Some("Resource")),
                move |State(s): State<AppState>, pr: Principal, slot: AuditSlotExt, Path(p): P, body: Body| async move {
                    create(s, pr, slot.0, Target::from_params(kind, &p), body).await
                },
            )
            .op(Op::new(Method::GET, &item, format!("get{k}"), "resources", format!("Read a {k}")).returns(200, Some("Resource")), move |State(s): State<AppState>, pr: Principal, Path(p): P| async move {
                get(s, pr, Target::from_params(kind, &p)).await
            })
            .op(
                Op::new(Method::PUT, &item, format!("apply{k}"), "resources", format!("Replace a {k}, creating it if absent")).body("Resource").returns(200, Some("Resource")),
                move |State(s): State<AppState>, pr: Principal, slot: AuditSlotExt, Path(p): P, body: Body| async move {
                    apply(s, pr, slot.0, Target::from_params(kind, &p), body).await
                },
            )
            .op(
                Op::new(Method::PATCH, &item, format!("patch{k}"), "resources", format!("Merge-patch a {k} (RFC 7396)")).body("MergePatch").returns(200, Some("Resource")),
                move |State(s): State<AppState>, pr: Principal, slot: AuditSlotExt, Path(p): P, headers: HeaderMap, body: Body| async move {
                    patch(s, pr, slot.0, Target::from_params(kind, &p), headers, body).await
                },
            )
            .op(
                Op::new(Method::DELETE, &item, format!("delete{k}"), "resources", format!("Delete a {k} (202 while finalizers remain)")).returns(200, Some("Resource")),
                move |State(s): State<AppState>, pr: Principal, slot: AuditSlotExt, Path(p): P| async move { delete(s, pr, slot.0, Target::from_params(kind, &p)).await },
            )
            .op(
                Op::new(Method::PUT, format!("{item}/status"), format!("replace{k}Status"), "resources", format!("Replace a {k}'s status")).body("StatusUpdate").returns(200, Some("Resource")),
                move |State(s): State<AppState>, pr: Principal, slot: AuditSlotExt, Path(p): P, body: Body| async move {
                    put_status(s, pr, slot.0, Target::from_params(kind, &p), body).await
                },
            );
        if kind.scope() == Scope::Project {
            let across = format!("/api/v1/orgs/{{org}}/{plural}");
            api = api.op(
                list_op(
                    &across,
                    format!("list{k}AllProjects"),
                    format!("List {plural} in every project of an organization"),
                ),
                move |State(s): State<AppState>,
                      pr: Principal,
                      headers: HeaderMap,
                      Path(p): P,
                      Query(q): Query<ListParams>| async move {
                    list(s, pr, headers, Target::from_params(kind, &p), q).await
                },
            );
        }
    }
    api
}

/// The audit slot of the request (present whenever the audit layer runs; a fresh one otherwise).
pub struct AuditSlotExt(pub AuditSlot);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for AuditSlotExt {
    type Rejection = Infallible;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        Ok(AuditSlotExt(
            parts
                .extensions
                .get::<AuditSlot>()
                .cloned()
                .unwrap_or_default(),
        ))
    }
}

/// Decodes a JSON request body into `T`, naming the offending field on failure.
pub fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            ApiError::bad_request(format!("body is not valid JSON: {inner}"))
        } else {
            let path = if path == "." { String::new() } else { path };
            ApiError::invalid("", model::Invalid::one(path, inner.to_string()))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replace_keeps_the_controllers_finalizers_and_follows_the_manifest_for_others() {
        let mut old: Resource = serde_json::from_value(serde_json::json!({
            "apiVersion": "kiln.dev/v1", "kind": "Project",
            "metadata": {"name": "shop", "organization": "acme"}, "spec": {}
        }))
        .unwrap();
        old.metadata.finalizers = vec!["example.com/a".into(), "kiln.dev/project".into()];
        let keep = |wanted: &[&str]| {
            keep_controller_finalizers(&old, wanted.iter().map(|f| f.to_string()).collect())
        };
        assert_eq!(keep(&[]), ["kiln.dev/project"]);
        assert_eq!(
            keep(&["kiln.dev/project", "example.com/a"]),
            ["example.com/a", "kiln.dev/project"],
            "an unchanged set keeps its order"
        );
        assert_eq!(
            keep(&["example.com/b"]),
            ["kiln.dev/project", "example.com/b"]
        );
    }
}
