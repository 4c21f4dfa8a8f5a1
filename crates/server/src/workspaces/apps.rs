//! Workspace apps through the server. An app (a web server inside a workspace, declared by its template) is
//! reached in two forms:
//!
//! - path form, on the server's own host: `/@<owner>/<workspace>/apps/<slug>/…`;
//! - subdomain form: `<slug>--<workspace>--<owner>.apps.<base-domain>`, served at the root of its own origin.
//!
//! `<workspace>` may be `<workspace>.<org>` (path form) and the host label may end in `--<org>` (subdomain form);
//! without it the workspace is looked up among the organizations by owner and name, and a name the owner has in
//! two organizations must say which.
//!
//! Each request is one stream on the agent's tunnel session to the app's address, carrying one HTTP/1.1
//! exchange; a WebSocket upgrade splices the two connections together. The workspace's share level decides who
//! gets through: `owner` (the owner and the organization's administrators), `authenticated` (anyone signed in)
//! or `public` (anyone). Kiln's own credentials never reach the app: the console session cookie, the app
//! session cookie and the `Kiln-Token` header are removed from what is forwarded, and the app may not set
//! either cookie.
//!
//! A subdomain app is another origin, so the console's cookie does not reach it: an unauthenticated browser is
//! sent to `/api/v1/apps/auth` on the server's access URL, which (once signed in) issues an app session and
//! sends the browser back with it in the `kiln_app_token` query parameter; the app host turns that into its own
//! host-only cookie. App sessions are stored as sessions under a hash that differs from a console session's,
//! so one cannot be used as the other.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use agent::proto::TCP_TARGET;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use axum::response::{IntoResponse, Redirect, Response};
use hyper_util::rt::TokioIo;
use jiff::{SignedDuration, Timestamp};
use model::kinds::{App, ShareLevel, TemplateVersionSpec, WorkspaceSpec};
use model::{Kind, Resource};
use serde_json::Value;
use store::{ListQuery, StoreError};

use super::org_key as key;
use crate::auth::{self, MaybePrincipal, Principal, SESSION_COOKIE};
use crate::gateway::{
    forwarded_headers, is_upgrade, page, strip_hop_by_hop, switching_protocols, wants_html,
};
use crate::AppState;

/// The cookie that carries an app session on an app's own host.
pub const APP_COOKIE: &str = "kiln_app_session";
/// The query parameter that brings a new app session to an app's host.
pub const TOKEN_PARAM: &str = "kiln_app_token";
/// A header with an API token, for programs reaching an app (`Authorization` is left to the app).
pub const TOKEN_HEADER: HeaderName = HeaderName::from_static("kiln-token");
/// How long an app session lasts.
const APP_SESSION_HOURS: i64 = 12;
/// How long a resolved (owner, workspace) → organization is trusted before it is looked up again.
const RESOLVE_TTL: Duration = Duration::from_secs(30);

/// The domain under which subdomain apps live.
pub fn apps_domain(base: &str) -> String {
    format!("apps.{base}")
}

/// What a request addresses, when it is for an app.
#[derive(Debug, PartialEq)]
pub(crate) enum Target {
    App(AppRef),
    /// `/@…` that is not a whole app path, or an app host whose label does not parse.
    Bad(String),
}

/// An app, as a URL names it.
#[derive(Debug, PartialEq)]
pub(crate) struct AppRef {
    owner: String,
    workspace: String,
    org: Option<String>,
    slug: String,
    /// Subdomain form (else path form).
    subdomain: bool,
    /// Path form: the length of `/@owner/ws/apps/slug` (what the app does not see).
    prefix_len: usize,
}

/// Whether `req` is for an app: a host under [`apps_domain`] or a path under `/@`.
pub(crate) fn target<B>(base: &str, req: &axum::http::Request<B>) -> Option<Target> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok());
    target_of(base, host, req.uri().path())
}

fn target_of(base: &str, host: Option<&str>, path: &str) -> Option<Target> {
    if let Some(label) = host.and_then(|h| app_label(h, base)) {
        let label = label.to_ascii_lowercase();
        let parts: Vec<&str> = label.split("--").collect();
        return Some(match parts[..] {
            [slug, workspace, owner] | [slug, workspace, owner, _]
                if parts.iter().all(|p| !p.is_empty()) =>
            {
                Target::App(AppRef {
                    owner: owner.into(),
                    workspace: workspace.into(),
                    org: parts.get(3).map(|o| o.to_string()),
                    slug: slug.into(),
                    subdomain: true,
                    prefix_len: 0,
                })
            }
            _ => Target::Bad(format!(
                "{label:?} is not an app host name: write <app>--<workspace>--<owner>[--<organization>].{}",
                apps_domain(base)
            )),
        });
    }
    let tail = path.strip_prefix("/@")?;
    let mut it = tail.splitn(5, '/');
    let (owner, ws, apps, slug) = (it.next()?, it.next(), it.next(), it.next());
    let bad = || {
        Target::Bad(format!(
            "{path} is not an app path: write /@<owner>/<workspace>/apps/<app>/"
        ))
    };
    let (Some(ws), Some("apps"), Some(slug)) = (ws, apps, slug) else {
        return Some(bad());
    };
    if owner.is_empty() || ws.is_empty() || slug.is_empty() {
        return Some(bad());
    }
    let (workspace, org) = match ws.split_once('.') {
        Some((w, o)) => (w, Some(o.to_string())),
        None => (ws, None),
    };
    Some(Target::App(AppRef {
        owner: owner.into(),
        workspace: workspace.into(),
        org,
        slug: slug.into(),
        subdomain: false,
        prefix_len: 2 + owner.len() + 1 + ws.len() + "/apps/".len() + slug.len(),
    }))
}

/// The label of an app host (`slug--ws--owner`) under `apps.<base>`, if `host` is one.
fn app_label<'a>(host: &'a str, base: &str) -> Option<&'a str> {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let domain = apps_domain(base);
    let cut = host.len().checked_sub(domain.len() + 1)?;
    if !host.is_char_boundary(cut) || host.as_bytes()[cut] != b'.' {
        return None;
    }
    if !host[cut + 1..].eq_ignore_ascii_case(&domain) {
        return None;
    }
    let label = &host[..cut];
    (!label.contains('.')).then_some(label)
}

/// Caches of the app path: where an (owner, workspace) lives, and the apps of each template version
/// (immutable, so kept until the server restarts).
#[derive(Default)]
pub struct AppCache {
    orgs: Mutex<HashMap<(String, String), (String, std::time::Instant)>>,
    versions: Mutex<HashMap<String, std::sync::Arc<Vec<App>>>>,
}

/// A failure of the app path, as the page it answers with.
pub(crate) struct Failure(pub StatusCode, &'static str, Vec<String>);

impl Failure {
    fn new(status: StatusCode, title: &'static str, line: impl Into<String>) -> Failure {
        Failure(status, title, vec![line.into()])
    }
}

/// Serves a request for an app.
pub(crate) async fn handle(
    state: &AppState,
    target: Target,
    req: Request,
    peer: SocketAddr,
) -> Response {
    let html = wants_html(req.headers());
    let app = match target {
        Target::Bad(why) => return page(StatusCode::NOT_FOUND, "Not an app", &[why], html),
        Target::App(a) => a,
    };
    match serve(state, &app, req, peer, html).await {
        Ok(r) => r,
        Err(Failure(status, title, lines)) => page(status, title, &lines, html),
    }
}

async fn serve(
    state: &AppState,
    app: &AppRef,
    req: Request,
    peer: SocketAddr,
    html: bool,
) -> Result<Response, Failure> {
    if app.subdomain {
        if let Some(token) = query_param(req.uri().query(), TOKEN_PARAM) {
            let (path, query) = (
                req.uri().path().to_string(),
                req.uri().query().map(str::to_string),
            );
            return accept_app_token(state, &path, query.as_deref(), &token).await;
        }
    } else if req.uri().path().len() == app.prefix_len {
        let mut to = format!("{}/", req.uri().path());
        if let Some(q) = req.uri().query() {
            to.push('?');
            to.push_str(q);
        }
        return Ok(Redirect::permanent(&to).into_response());
    }
    let ws = resolve(state, app).await?;
    let org = ws.metadata.organization.clone().unwrap_or_default();
    let spec: WorkspaceSpec = model::typed_spec(&ws).map_err(|e| {
        Failure::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Broken workspace",
            e.to_string(),
        )
    })?;
    let def = app_of(state, &ws, &app.slug).await?;
    let principal = caller(state, req.headers(), app.subdomain).await?;
    if def.share != ShareLevel::Public {
        let Some(p) = &principal else {
            return Ok(sign_in(state, &req, app, html));
        };
        if def.share == ShareLevel::Owner
            && p.user.name != spec.owner
            && !super::hub::is_admin(state, p, &org).await
        {
            return Err(Failure::new(
                StatusCode::FORBIDDEN,
                "Not shared with you",
                format!(
                    "app {} of workspace {} is shared with its owner ({}) only",
                    app.slug, ws.metadata.name, spec.owner
                ),
            ));
        }
    }
    let Some(session) = state.hub.agent(&org, &ws.metadata.name) else {
        let phase = ws
            .status
            .get("phase")
            .and_then(Value::as_str)
            .unwrap_or("pending");
        return Err(Failure::new(
            StatusCode::BAD_GATEWAY,
            "Workspace not reachable",
            format!(
                "the agent of workspace {} is not connected (the workspace is {phase})",
                ws.metadata.name
            ),
        ));
    };
    state.hub.touch(state, &org, &ws.metadata.name);
    let (addr, base_path) = split_app_url(&def.url);
    let rest = &req.uri().path()[app.prefix_len..];
    let mut path = format!("{}{}", base_path.trim_end_matches('/'), rest);
    if path.is_empty() {
        path.push('/');
    }
    if let Some(q) = req.uri().query() {
        path.push('?');
        path.push_str(q);
    }
    let prefix = (!app.subdomain).then(|| req.uri().path()[..app.prefix_len].to_string());
    let stream = session
        .open(&format!("{TCP_TARGET}{addr}"))
        .await
        .map_err(|e| {
            Failure::new(
                StatusCode::BAD_GATEWAY,
                "App not reachable",
                format!(
                    "app {} of workspace {} does not answer at {}: {e}",
                    app.slug, ws.metadata.name, def.url
                ),
            )
        })?;
    let activity = (state.clone(), org, ws.metadata.name.clone());
    forward(stream, req, path, prefix, peer, activity).await
}

/// The caller: a console session (path form), an app session (subdomain form), or a `Kiln-Token` header.
async fn caller(
    state: &AppState,
    headers: &HeaderMap,
    subdomain: bool,
) -> Result<Option<Principal>, Failure> {
    let unavailable = |e: crate::error::ApiError| {
        Failure::new(StatusCode::SERVICE_UNAVAILABLE, "Try again", e.detail)
    };
    if let Some(token) = headers.get(&TOKEN_HEADER).and_then(|v| v.to_str().ok()) {
        return auth::authenticate(state, &HeaderMap::new(), Some(token))
            .await
            .map_err(unavailable);
    }
    if subdomain {
        let Some(secret) = auth::cookie(headers, APP_COOKIE) else {
            return Ok(None);
        };
        return app_session_user(state, secret).await.map_err(unavailable);
    }
    // Without a bearer token, only the console's session cookie is looked at (`Authorization` is the app's).
    auth::authenticate(state, headers, None)
        .await
        .map_err(unavailable)
}

fn app_session_hash(secret: &str) -> String {
    auth::hash_secret(&format!("app:{secret}"))
}

async fn app_session_user(
    state: &AppState,
    secret: &str,
) -> Result<Option<Principal>, crate::error::ApiError> {
    let Some(session) = state
        .store
        .session_by_hash(&app_session_hash(secret))
        .await?
    else {
        return Ok(None);
    };
    if session.expires_at <= Timestamp::now() {
        return Ok(None);
    }
    let Some(user) = state.store.user_by_id(&session.user_id).await? else {
        return Ok(None);
    };
    Ok(Some(Principal {
        user,
        credential: auth::Credential::Session,
    }))
}

/// Where to send a caller who must sign in first: the console's sign-in page (path form), or the server's app
/// sign-in, which comes back with an app session (subdomain form). Programs get 401.
fn sign_in(state: &AppState, req: &Request, app: &AppRef, html: bool) -> Response {
    if !html || req.method() != axum::http::Method::GET {
        return page(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            &[format!(
                "app {} of workspace {} is not public: sign in to the console, or send an API token in the Kiln-Token header",
                app.slug, app.workspace
            )],
            html,
        );
    }
    let here = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if !app.subdomain {
        return Redirect::to(&format!("/login?next={}", encode(&here))).into_response();
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let back = format!("http://{host}{here}");
    Redirect::to(&format!(
        "{}/api/v1/apps/auth?redirect={}",
        state.public_url(),
        encode(&back)
    ))
    .into_response()
}

/// `GET /api/v1/apps/auth?redirect=URL`: signs a browser in to a subdomain app. The caller must be signed in
/// to the console (else it is sent to sign in first); `URL` must be on an app host of this server.
pub async fn app_auth(
    State(state): State<AppState>,
    p: MaybePrincipal,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let html = true;
    let Some(redirect) = q.get("redirect") else {
        return page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            &["the redirect parameter (the app URL to return to) is missing".into()],
            html,
        );
    };
    let host = redirect
        .strip_prefix("http://")
        .or_else(|| redirect.strip_prefix("https://"))
        .map(|r| r.split(['/', '?', '#']).next().unwrap_or_default());
    let is_app = host.is_some_and(|h| {
        matches!(
            target_of(&state.config.base_domain, Some(h), "/"),
            Some(Target::App(_))
        )
    });
    if !is_app {
        return page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            &[format!(
                "redirect={redirect:?} is not an app URL of this server (<app>--<workspace>--<owner>.{})",
                apps_domain(&state.config.base_domain)
            )],
            html,
        );
    }
    let Some(p) = p.0 else {
        let here = format!("/api/v1/apps/auth?redirect={}", encode(redirect));
        return Redirect::to(&format!("/login?next={}", encode(&here))).into_response();
    };
    let secret = auth::new_secret();
    let expires = Timestamp::now() + SignedDuration::from_hours(APP_SESSION_HOURS);
    if let Err(e) = state
        .store
        .create_session(&p.user.id, &app_session_hash(&secret), expires)
        .await
    {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again",
            &[format!("cannot start an app session: {e}")],
            html,
        );
    }
    let sep = if redirect.contains('?') { '&' } else { '?' };
    Redirect::to(&format!("{redirect}{sep}{TOKEN_PARAM}={secret}")).into_response()
}

/// `GET /api/v1/orgs/{org}/workspaces/{name}/apps`: the workspace's apps with their URLs, share levels and
/// health.
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    axum::extract::Path((org, name)): axum::extract::Path<(String, String)>,
) -> crate::error::ApiResult<axum::Json<Value>> {
    let access = crate::rbac::org_access(&state, &principal, &org).await?;
    access.check(
        crate::rbac::Verb::Get,
        Kind::Workspace,
        None,
        &format!("workspace {name}"),
    )?;
    let ws = state.store.get(&key(Kind::Workspace, &org, &name)).await?;
    let apps = apps_of(&state, &ws).await.unwrap_or_default();
    let owner = ws
        .spec
        .get("owner")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let health = ws.status.get("agent").and_then(|a| a.get("apps"));
    let items: Vec<Value> = apps
        .iter()
        .map(|a| {
            serde_json::json!({
                "slug": a.slug,
                "displayName": if a.display_name.is_empty() { &a.slug } else { &a.display_name },
                "share": a.share,
                "health": health.and_then(|h| h.get(&a.slug)).cloned().unwrap_or(Value::Null),
                "url": app_url(&state, a, owner, &name, &org),
            })
        })
        .collect();
    Ok(axum::Json(serde_json::json!({ "items": items })))
}

/// Where a browser opens an app: its subdomain form when it has one, else its path form (with the
/// organization named, so the URL stays unambiguous).
pub fn app_url(state: &AppState, app: &App, owner: &str, ws: &str, org: &str) -> String {
    let public = state.public_url();
    if app.subdomain {
        let port = public
            .rsplit_once(':')
            .filter(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
            .map(|(_, p)| format!(":{p}"))
            .unwrap_or_default();
        let scheme = public.split("://").next().unwrap_or("http");
        return format!(
            "{scheme}://{}--{ws}--{owner}--{org}.{}{port}/",
            app.slug,
            apps_domain(&state.config.base_domain)
        );
    }
    format!("{public}/@{owner}/{ws}.{org}/apps/{}/", app.slug)
}

/// On an app host: turns `?kiln_app_token=` into the host's app cookie and sends the browser on without it.
async fn accept_app_token(
    state: &AppState,
    path: &str,
    query: Option<&str>,
    token: &str,
) -> Result<Response, Failure> {
    let valid = app_session_user(state, token)
        .await
        .map_err(|e| Failure::new(StatusCode::SERVICE_UNAVAILABLE, "Try again", e.detail))?;
    if valid.is_none() {
        return Err(Failure::new(
            StatusCode::UNAUTHORIZED,
            "Sign in",
            "the app session in the link is unknown or expired; open the app again",
        ));
    }
    let kept: Vec<String> = query
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty() && kv.split('=').next() != Some(TOKEN_PARAM))
        .map(str::to_string)
        .collect();
    let mut to = path.to_string();
    if !kept.is_empty() {
        to.push('?');
        to.push_str(&kept.join("&"));
    }
    let mut resp = Redirect::to(&to).into_response();
    let cookie = format!(
        "{APP_COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax; Max-Age={}",
        APP_SESSION_HOURS * 3600
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    Ok(resp)
}

/// The workspace an app URL names.
async fn resolve(state: &AppState, app: &AppRef) -> Result<Resource, Failure> {
    let not_found = || {
        Failure::new(
            StatusCode::NOT_FOUND,
            "Not found",
            format!("{} has no workspace named {}", app.owner, app.workspace),
        )
    };
    let get = |org: String| async move {
        match state
            .store
            .get(&key(Kind::Workspace, &org, &app.workspace))
            .await
        {
            Ok(w) if w.spec.get("owner").and_then(Value::as_str) == Some(&app.owner) => Ok(Some(w)),
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(Failure::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "Try again",
                e.to_string(),
            )),
        }
    };
    if let Some(org) = &app.org {
        return get(org.clone()).await?.ok_or_else(not_found);
    }
    let id = (app.owner.clone(), app.workspace.clone());
    let cached = {
        let orgs = state
            .hub
            .apps
            .orgs
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        orgs.get(&id)
            .filter(|(_, at)| at.elapsed() < RESOLVE_TTL)
            .map(|(o, _)| o.clone())
    };
    if let Some(org) = cached {
        if let Some(w) = get(org).await? {
            return Ok(w);
        }
    }
    let orgs = state
        .store
        .list(&ListQuery {
            kind: Some(Kind::Organization),
            ..Default::default()
        })
        .await
        .map_err(|e| Failure::new(StatusCode::SERVICE_UNAVAILABLE, "Try again", e.to_string()))?;
    let mut found = Vec::new();
    for o in orgs.items {
        if let Some(w) = get(o.metadata.name.clone()).await? {
            found.push(w);
        }
    }
    match found.len() {
        0 => Err(not_found()),
        1 => {
            let w = found.remove(0);
            let org = w.metadata.organization.clone().unwrap_or_default();
            let mut orgs = state
                .hub
                .apps
                .orgs
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            orgs.insert(id, (org, std::time::Instant::now()));
            Ok(w)
        }
        _ => {
            let names: Vec<String> = found
                .iter()
                .filter_map(|w| w.metadata.organization.clone())
                .collect();
            Err(Failure::new(
                StatusCode::CONFLICT,
                "Which organization?",
                format!(
                    "{} has a workspace named {} in several organizations ({}); name one: /@{}/{}.<organization>/apps/{}/ or {}--{}--{}--<organization>.apps.<domain>",
                    app.owner, app.workspace, names.join(", "), app.owner, app.workspace, app.slug,
                    app.slug, app.workspace, app.owner
                ),
            ))
        }
    }
}

/// The app `slug` of the template version the workspace's current build runs.
async fn app_of(state: &AppState, ws: &Resource, slug: &str) -> Result<App, Failure> {
    let apps = apps_of(state, ws).await?;
    apps.iter()
        .find(|a| a.slug == slug)
        .cloned()
        .ok_or_else(|| {
            let known: Vec<&str> = apps.iter().map(|a| a.slug.as_str()).collect();
            Failure::new(
                StatusCode::NOT_FOUND,
                "Not found",
                format!(
                    "workspace {} has no app {slug:?} (its apps: {})",
                    ws.metadata.name,
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            )
        })
}

/// The apps of the template version the workspace's current build runs.
pub(crate) async fn apps_of(
    state: &AppState,
    ws: &Resource,
) -> Result<std::sync::Arc<Vec<App>>, Failure> {
    let version = ws
        .status
        .get("build")
        .and_then(|b| b.get("templateVersion"))
        .and_then(Value::as_str)
        .or_else(|| ws.spec.get("templateVersion").and_then(Value::as_str))
        .unwrap_or_default()
        .to_string();
    let cached = {
        let v = state
            .hub
            .apps
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        v.get(&version).cloned()
    };
    let apps = match cached {
        Some(a) => a,
        None => {
            let org = ws.metadata.organization.clone().unwrap_or_default();
            let tv = state
                .store
                .get(&key(Kind::TemplateVersion, &org, &version))
                .await
                .map_err(|e| {
                    Failure::new(
                        StatusCode::NOT_FOUND,
                        "Not found",
                        format!(
                            "template version {version:?} of workspace {}: {e}",
                            ws.metadata.name
                        ),
                    )
                })?;
            let tv: TemplateVersionSpec = model::typed_spec(&tv).map_err(|e| {
                Failure::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Broken template",
                    e.to_string(),
                )
            })?;
            let apps = std::sync::Arc::new(tv.snapshot.agent.apps);
            let mut v = state
                .hub
                .apps
                .versions
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            v.insert(version, apps.clone());
            apps
        }
    };
    Ok(apps)
}

/// An app URL (`http://host:port/path`, checked at admission) as its address and base path.
fn split_app_url(url: &str) -> (&str, &str) {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    }
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Sends the request over `stream` and passes the response back; a `101 Switching Protocols` splices the
/// client's connection and the stream. Activity is recorded while an upgraded connection lasts.
async fn forward(
    stream: tunnel_io::TunnelStream,
    mut req: Request,
    path: String,
    prefix: Option<String>,
    peer: SocketAddr,
    activity: (AppState, String, String),
) -> Result<Response, Failure> {
    let upgrade = is_upgrade(req.headers());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
    let (parts, body) = req.into_parts();
    let mut headers = forwarded_headers(
        parts.headers,
        upgrade,
        peer,
        prefix.and_then(|p| HeaderValue::from_str(&p).ok()),
        &[SESSION_COOKIE, APP_COOKIE],
    );
    headers.remove(&TOKEN_HEADER);
    let failed = |what: &str, e: &dyn std::fmt::Display| {
        Failure::new(
            StatusCode::BAD_GATEWAY,
            "Bad gateway",
            format!("{what}: {e}"),
        )
    };
    let mut out = axum::http::Request::builder()
        .method(parts.method)
        .uri(path)
        .version(Version::HTTP_11)
        .body(body)
        .map_err(|e| Failure::new(StatusCode::BAD_REQUEST, "Bad request", e.to_string()))?;
    *out.headers_mut() = headers;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| failed("the app connection failed", &e))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let resp = sender
        .send_request(out)
        .await
        .map_err(|e| failed("the app failed while answering", &e))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (state, org, ws) = activity;
        return Ok(switching_protocols(
            resp,
            client_upgrade,
            |mut client, mut app| async move {
                super::hub::relay(&state, &org, &ws, &mut client, &mut app).await;
            },
        ));
    }
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    crate::gateway::strip_set_cookies(&mut parts.headers, &[SESSION_COOKIE, APP_COOKIE]);
    Ok(Response::from_parts(parts, Body::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app(
        owner: &str,
        ws: &str,
        org: Option<&str>,
        slug: &str,
        sub: bool,
        len: usize,
    ) -> Option<Target> {
        Some(Target::App(AppRef {
            owner: owner.into(),
            workspace: ws.into(),
            org: org.map(Into::into),
            slug: slug.into(),
            subdomain: sub,
            prefix_len: len,
        }))
    }

    #[test]
    fn app_urls_parse() {
        let t = |host: &str, path: &str| target_of("localhost", Some(host), path);
        assert_eq!(t("127.0.0.1:7080", "/api/v1/orgs"), None);
        assert_eq!(
            t("127.0.0.1:7080", "/@ann/dev/apps/code/x"),
            app("ann", "dev", None, "code", false, 19)
        );
        assert_eq!(
            t("127.0.0.1:7080", "/@ann/dev/apps/code"),
            app("ann", "dev", None, "code", false, 19)
        );
        assert_eq!(
            t("127.0.0.1", "/@ann/dev.acme/apps/code/"),
            app("ann", "dev", Some("acme"), "code", false, 24)
        );
        assert!(matches!(t("127.0.0.1", "/@ann/dev"), Some(Target::Bad(_))));
        assert!(matches!(
            t("127.0.0.1", "/@ann/dev/files/x"),
            Some(Target::Bad(_))
        ));
        assert!(matches!(
            t("127.0.0.1", "/@/dev/apps/x"),
            Some(Target::Bad(_))
        ));
        assert_eq!(
            t("code--dev--ann.apps.localhost:7080", "/"),
            app("ann", "dev", None, "code", true, 0)
        );
        assert_eq!(
            t("Code--Dev--Ann--Acme.apps.localhost.", "/x"),
            app("ann", "dev", Some("acme"), "code", true, 0)
        );
        assert!(matches!(
            t("code--dev.apps.localhost", "/"),
            Some(Target::Bad(_))
        ));
        assert!(matches!(
            t("a--b--c--d--e.apps.localhost", "/"),
            Some(Target::Bad(_))
        ));
        // Not app hosts: the gateway's, another domain, a deeper name.
        assert_eq!(t("ep--c--p--e.localhost", "/"), None);
        assert_eq!(t("code--dev--ann.apps.example.com", "/"), None);
        assert_eq!(t("x.code--dev--ann.apps.localhost", "/"), None);
    }

    #[test]
    fn app_url_splits() {
        assert_eq!(
            split_app_url("http://127.0.0.1:3000"),
            ("127.0.0.1:3000", "")
        );
        assert_eq!(
            split_app_url("http://localhost:8080/ide/"),
            ("localhost:8080", "/ide/")
        );
        assert_eq!(
            query_param(Some("a=1&kiln_app_token=x%2By"), TOKEN_PARAM).as_deref(),
            Some("x+y")
        );
        assert_eq!(encode("/a b?c=d&e"), "%2Fa+b%3Fc%3Dd%26e");
    }
}
