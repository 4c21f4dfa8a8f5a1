//! The web console: server-rendered HTML pages (no JavaScript framework) over the same store and access rules as
//! the API. Signed-in state is the session cookie that `/login` sets.

mod connections;
pub(crate) mod html;
mod runs;
mod workspaces;

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use model::{Kind, Resource};
use serde::Deserialize;
use store::{Key, ListQuery};

use crate::auth::{MaybePrincipal, Principal};
use crate::error::ApiError;
use crate::rbac::{self, Verb};
use crate::resources::AuditSlotExt;
use crate::AppState;
use html::{conditions_cell, esc, page};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(home))
        .route("/login", get(login_form).post(login_submit))
        .route("/logout", axum::routing::post(logout))
        .route("/orgs/{org}", get(org_page))
        .route("/orgs/{org}/environments", get(environments_page))
        .route("/orgs/{org}/workspaces", get(workspaces::list_page))
        .route("/orgs/{org}/connections", get(connections::page_handler))
        .route(
            "/orgs/{org}/workspaces/{name}",
            get(workspaces::workspace_page),
        )
        .route("/orgs/{org}/projects/{project}", get(project_page))
        .route("/orgs/{org}/pipelineruns/{name}", get(runs::run_page))
        .route(
            "/orgs/{org}/pipelineruns/{name}/{action}",
            axum::routing::post(runs::run_action),
        )
        .route(
            "/orgs/{org}/projects/{project}/components/{component}/logs",
            get(logs_page),
        )
        .route("/static/kiln.css", get(css))
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        html::CSS,
    )
        .into_response()
}

/// Renders a failure as a friendly page rather than a problem document; `back` are (href, label) links to the
/// nearest pages that still make sense.
fn error_page(user: Option<&str>, e: ApiError, back: &[(String, String)]) -> Response {
    if e.status == StatusCode::UNAUTHORIZED && user.is_none() {
        return Redirect::to("/login").into_response();
    }
    let (title, body) = html::problem(e.status.as_u16(), &e.detail, back);
    (e.status, page(title, user, &body)).into_response()
}

fn org_link(org: &str) -> (String, String) {
    (format!("/orgs/{org}"), format!("Organization {org}"))
}

/// The signed-in principal, or a redirect to the sign-in page.
fn require(p: MaybePrincipal) -> Result<Principal, Redirect> {
    p.0.ok_or_else(|| Redirect::to("/login"))
}

/// Where to go after signing in: `next` when it is a path on this server, else the home page.
fn after_login(next: Option<&str>) -> &str {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n,
        _ => "/",
    }
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

async fn login_form(p: MaybePrincipal, Query(q): Query<Next>) -> Response {
    let next = after_login(q.next.as_deref());
    if p.0.is_some() {
        return Redirect::to(next).into_response();
    }
    page("Sign in", None, &html::login_form(None, "", next)).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    next: Option<String>,
}

async fn login_submit(
    State(state): State<AppState>,
    slot: AuditSlotExt,
    Form(f): Form<LoginForm>,
) -> Response {
    slot.0.set_user(&f.username);
    slot.0.set_target("User", None, None, Some(&f.username));
    let next = after_login(f.next.as_deref());
    let user = match crate::identity_api::login_user(&state, &f.username, &f.password).await {
        Ok(u) => u,
        Err(e) => {
            return (
                StatusCode::UNAUTHORIZED,
                page(
                    "Sign in",
                    None,
                    &html::login_form(Some(&e.detail), &f.username, next),
                ),
            )
                .into_response()
        }
    };
    match crate::identity_api::start_session(&state, &user).await {
        Ok(cookie) => {
            let mut resp = Redirect::to(next).into_response();
            resp.headers_mut().insert(header::SET_COOKIE, cookie);
            resp
        }
        Err(e) => error_page(None, e, &[]),
    }
}

async fn logout(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let _ = crate::identity_api::end_session(&state, &headers).await;
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("kiln_session=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
    );
    resp
}

async fn list(
    state: &AppState,
    kind: Kind,
    org: &str,
    project: Option<&str>,
) -> Result<Vec<Resource>, ApiError> {
    let q = ListQuery {
        kind: Some(kind),
        organization: Some(org.to_string()),
        project: project.map(str::to_string),
        ..Default::default()
    };
    Ok(state.store.list(&q).await?.items)
}

async fn home(State(state): State<AppState>, p: MaybePrincipal) -> Response {
    let p = match require(p) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let result: Result<String, ApiError> = async {
        let visible = rbac::visible_orgs(&state.store, &p).await?;
        let orgs = state
            .store
            .list(&ListQuery {
                kind: Some(Kind::Organization),
                ..Default::default()
            })
            .await?
            .items;
        let rows: Vec<Vec<String>> = orgs
            .into_iter()
            .filter(|o| {
                visible
                    .as_ref()
                    .is_none_or(|v| v.contains(&o.metadata.name))
            })
            .map(|o| {
                let name = &o.metadata.name;
                let display = o
                    .spec
                    .get("displayName")
                    .and_then(|v| v.as_str())
                    .unwrap_or("");
                vec![
                    format!("<a href=\"/orgs/{0}\">{0}</a>", esc(name)),
                    esc(display),
                    html::ready_cell(&o, false),
                    conditions_cell(&o),
                ]
            })
            .collect();
        Ok(format!(
            "<h1>Organizations</h1>{}",
            html::table(
                &["Name", "Display name", "Ready", "Other conditions"],
                &rows
            )
        ))
    }
    .await;
    match result {
        Ok(body) => page("Organizations", Some(&p.user.name), &body).into_response(),
        Err(e) => error_page(Some(&p.user.name), e, &[]),
    }
}

async fn org_page(
    State(state): State<AppState>,
    p: MaybePrincipal,
    Path(org): Path<String>,
) -> Response {
    let p = match require(p) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let result: Result<String, ApiError> = async {
        let acc = rbac::org_access(&state, &p, &org).await?;
        let mut body = html::crumbs(&[("/", "Organizations")], &org);
        body.push_str(&format!("<h1>Organization {}</h1>", esc(&org)));
        body.push_str(&html::org_tabs(&org, "overview"));
        let sections: [(Kind, &str, &[&str]); 6] = [
            (
                Kind::Project,
                "Projects",
                &["Name", "Pipeline", "Ready", "Other conditions"],
            ),
            (
                Kind::Environment,
                "Environments",
                &[
                    "Name",
                    "Data plane",
                    "Production",
                    "Ready",
                    "Other conditions",
                ],
            ),
            (
                Kind::Component,
                "Components",
                &["Name", "Project", "Type", "Ready", "Other conditions"],
            ),
            (
                Kind::DataPlane,
                "Data planes",
                &["Name", "Type", "Ready", "Other conditions"],
            ),
            (
                Kind::Pipeline,
                "Pipelines",
                &["Name", "Repository", "Branch", "Steps", "Triggers"],
            ),
            (
                Kind::PipelineRun,
                "Pipeline runs",
                &["Run", "Status", "Started by", "Branch", "Commit", "Steps"],
            ),
        ];
        for (kind, title, headers) in sections {
            let items = visible(&state, &acc, kind, &org, None).await?;
            let rows: Vec<Vec<String>> = items.iter().map(|r| html::row(kind, &org, r)).collect();
            body.push_str(&format!("<h2 id=\"{}\">{title}</h2>", kind.plural()));
            body.push_str(&html::table(headers, &rows));
        }
        if acc.allows(Verb::List, Kind::Pipeline, None) {
            let rows: Vec<Vec<String>> = state
                .runs
                .live()
                .into_iter()
                .filter(|r| r.organization.as_deref().is_none_or(|o| o == org))
                .map(|r| {
                    let labels: Vec<String> =
                        r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    vec![
                        format!("<span class=\"runner\">{}</span>", esc(&r.name)),
                        if r.organization.is_none() {
                            "built-in"
                        } else {
                            "external"
                        }
                        .into(),
                        esc(&labels.join(", ")),
                        if r.docker { "yes" } else { "no" }.into(),
                        r.capacity.to_string(),
                    ]
                })
                .collect();
            body.push_str("<h2 id=\"runners\">Runners</h2>");
            body.push_str(&html::table(
                &["Name", "Kind", "Labels", "Docker", "Runs at once"],
                &rows,
            ));
        }
        Ok(body)
    }
    .await;
    match result {
        Ok(body) => page(&format!("Organization {org}"), Some(&p.user.name), &body).into_response(),
        Err(e) => error_page(Some(&p.user.name), e, &[]),
    }
}

/// The objects of one kind in an organization (or project) that the viewer may list or read.
async fn visible(
    state: &AppState,
    acc: &rbac::OrgAccess,
    kind: Kind,
    org: &str,
    project: Option<&str>,
) -> Result<Vec<Resource>, ApiError> {
    Ok(list(state, kind, org, project)
        .await?
        .into_iter()
        .filter(|r| {
            acc.allows(Verb::List, kind, r.metadata.project.as_deref())
                || acc.allows(Verb::Get, kind, r.metadata.project.as_deref())
        })
        .collect())
}

async fn environments_page(
    State(state): State<AppState>,
    p: MaybePrincipal,
    Path(org): Path<String>,
) -> Response {
    let p = match require(p) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let result: Result<String, ApiError> = async {
        let acc = rbac::org_access(&state, &p, &org).await?;
        let envs = visible(&state, &acc, Kind::Environment, &org, None).await?;
        let planes = visible(&state, &acc, Kind::DataPlane, &org, None).await?;
        let mut body = html::crumbs(
            &[("/", "Organizations"), (&format!("/orgs/{org}"), &org)],
            "Environments",
        );
        body.push_str(&format!("<h1>Environments of {}</h1>", esc(&org)));
        body.push_str(&html::org_tabs(&org, "environments"));
        let rows: Vec<Vec<String>> = envs
            .iter()
            .map(|env| {
                let plane_ref = env.spec.get("dataPlaneRef").and_then(|v| v.as_str());
                let plane = planes
                    .iter()
                    .find(|dp| Some(dp.metadata.name.as_str()) == plane_ref);
                html::environment_row(&org, env, plane)
            })
            .collect();
        body.push_str(&html::table(
            &[
                "Environment",
                "Production",
                "Ready",
                "Data plane",
                "Data plane ready",
            ],
            &rows,
        ));
        Ok(body)
    }
    .await;
    match result {
        Ok(body) => {
            page(&format!("Environments of {org}"), Some(&p.user.name), &body).into_response()
        }
        Err(e) => error_page(Some(&p.user.name), e, &[]),
    }
}

async fn project_page(
    State(state): State<AppState>,
    p: MaybePrincipal,
    headers: HeaderMap,
    Path((org, project)): Path<(String, String)>,
) -> Response {
    let p = match require(p) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    // Past this point the organization exists and is visible, so error pages may link back to it.
    let acc = match rbac::org_access(&state, &p, &org).await {
        Ok(acc) => acc,
        Err(e) => return error_page(Some(&p.user.name), e, &[]),
    };
    let result: Result<String, ApiError> = async {
        acc.check(
            Verb::Get,
            Kind::Project,
            Some(&project),
            &format!("Project {org}/{project}"),
        )?;
        let proj = state
            .store
            .get(&Key {
                kind: Kind::Project,
                organization: Some(org.clone()),
                project: None,
                name: project.clone(),
            })
            .await?;
        let mut body = html::crumbs(
            &[("/", "Organizations"), (&format!("/orgs/{org}"), &org)],
            &project,
        );
        body.push_str(&format!("<h1>Project {}</h1>", esc(&project)));
        if let Some(d) = proj.spec.get("description").and_then(|v| v.as_str()) {
            body.push_str(&format!("<p class=\"description\">{}</p>", esc(d)));
        }
        body.push_str(&format!("<p>Status: {}</p>", html::ready_cell(&proj, true)));
        let comps = visible(&state, &acc, Kind::Component, &org, Some(&project)).await?;
        let rows: Vec<Vec<String>> = comps.iter().map(html::component_detail_row).collect();
        body.push_str("<h2 id=\"components\">Components</h2>");
        body.push_str(&html::table(
            &["Name", "Type", "Endpoints", "Ready", "Other conditions"],
            &rows,
        ));
        let bindings = visible(&state, &acc, Kind::ReleaseBinding, &org, Some(&project)).await?;
        let releases = visible(&state, &acc, Kind::Release, &org, Some(&project)).await?;
        let urls = html::UrlBase {
            org: &org,
            project: &project,
            base_domain: &state.config.base_domain,
            port: request_port(&headers).unwrap_or(state.config.listen.port()),
        };
        let mut rows = Vec::new();
        for c in &comps {
            let mut mine: Vec<&Resource> = bindings
                .iter()
                .filter(|b| {
                    b.spec.get("component").and_then(|v| v.as_str()) == Some(&c.metadata.name)
                })
                .collect();
            mine.sort_by_key(|b| {
                b.spec
                    .get("environment")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            });
            for b in mine {
                let release = b.spec.get("release").and_then(|v| v.as_str()).unwrap_or("");
                let rel = releases.iter().find(|r| r.metadata.name == release);
                rows.push(html::deployment_row(&urls, c, b, rel));
            }
        }
        body.push_str("<h2 id=\"deployments\">Deployments</h2>");
        body.push_str(&html::table(
            &[
                "Component",
                "Environment",
                "Release",
                "Ready",
                "Replicas",
                "URLs",
                "",
            ],
            &rows,
        ));
        body.push_str("<h2 id=\"conditions\">Conditions</h2>");
        body.push_str(&html::conditions_table(&proj));
        Ok(body)
    }
    .await;
    match result {
        Ok(body) => page(&format!("Project {project}"), Some(&p.user.name), &body).into_response(),
        Err(e) => error_page(Some(&p.user.name), e, &[org_link(&org)]),
    }
}

/// The port the browser reached this server on (from `Host`), for the gateway's subdomain URLs.
fn request_port(headers: &HeaderMap) -> Option<u16> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let (_, port) = host.rsplit_once(':')?;
    port.parse().ok()
}

#[derive(Deserialize)]
struct LogsQuery {
    env: Option<String>,
}

/// How many past lines the logs page shows (rendered on the server; live lines follow through EventSource).
const LOG_LINES: usize = 200;

/// A component's logs in one environment: the last lines rendered on the server, then followed live by a few
/// lines of script over the API's Server-Sent Events (`…/components/{name}/logs?env=ENV&follow=true`).
async fn logs_page(
    State(state): State<AppState>,
    p: MaybePrincipal,
    Path((org, project, component)): Path<(String, String, String)>,
    Query(q): Query<LogsQuery>,
) -> Response {
    let p = match require(p) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let back = [
        org_link(&org),
        (
            format!("/orgs/{org}/projects/{project}"),
            format!("Project {project}"),
        ),
    ];
    let result: Result<String, ApiError> = async {
        let acc = rbac::org_access(&state, &p, &org).await?;
        acc.check(
            Verb::Get,
            Kind::Component,
            Some(&project),
            &format!("Component {org}/{project}/{component}"),
        )?;
        let env = q.env.filter(|e| !e.is_empty()).ok_or_else(|| {
            ApiError::bad_request("choose an environment: add ?env=ENV to the address")
        })?;
        let opts = dataplane::LogOptions {
            tail: Some(LOG_LINES),
            ..Default::default()
        };
        let (lines, problem) =
            match crate::logs::open(&state, &org, &project, &component, &env, opts).await {
                Ok(stream) => {
                    let mut lines: Vec<dataplane::LogLine> = stream
                        .take_while(|l| std::future::ready(l.is_ok()))
                        .filter_map(|l| std::future::ready(l.ok()))
                        .collect()
                        .await;
                    lines.sort_by_key(|l| l.time);
                    let skip = lines.len().saturating_sub(LOG_LINES);
                    (lines.split_off(skip), None)
                }
                // Not running (yet): say so, and let the live stream pick the lines up when it starts.
                Err(e) if e.status == StatusCode::NOT_FOUND => (Vec::new(), Some(e.detail)),
                Err(e) => return Err(e),
            };
        let src = format!(
            "/api/v1/orgs/{org}/projects/{project}/components/{component}/logs?env={env}&follow=true&tail={LOG_LINES}"
        );
        let mut body = html::crumbs(
            &[
                ("/", "Organizations"),
                (&format!("/orgs/{org}"), &org),
                (&format!("/orgs/{org}/projects/{project}"), &project),
            ],
            &format!("{component} logs"),
        );
        body.push_str(&html::logs(&component, &env, &src, &lines, problem.as_deref()));
        Ok(body)
    }
    .await;
    match result {
        Ok(body) => {
            page(&format!("Logs of {component}"), Some(&p.user.name), &body).into_response()
        }
        Err(e) => error_page(Some(&p.user.name), e, &back),
    }
}
