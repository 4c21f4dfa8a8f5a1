//! The console's workspace pages: an organization's workspaces, and one workspace with its state, agent,
//! metadata, apps (with links through the server) and its latest build's build and startup logs, followed
//! live.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use model::{Kind, Resource};
use serde_json::Value;

use super::html::{self, esc, page};
use super::{error_page, org_link, require, visible};
use crate::auth::MaybePrincipal;
use crate::error::ApiError;
use crate::rbac::{self, Verb};
use crate::workspaces::{apps, hub, org_key, provisioners};
use crate::AppState;

/// How many lines of each log stream the page is rendered with.
const LOG_LINES: usize = 1000;

fn text<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_str().unwrap_or("-")
}

fn build_number(ws: &Resource) -> u64 {
    ws.status["build"]["number"].as_u64().unwrap_or(0)
}

pub(super) async fn list_page(
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
        let items = visible(&state, &acc, Kind::Workspace, &org, None).await?;
        let mut body = html::crumbs(
            &[("/", "Organizations"), (&format!("/orgs/{org}"), &org)],
            "Workspaces",
        );
        body.push_str(&format!("<h1>Workspaces of {}</h1>", esc(&org)));
        body.push_str(&html::org_tabs(&org, "workspaces"));
        let rows: Vec<Vec<String>> = items
            .iter()
            .map(|w| {
                let name = &w.metadata.name;
                vec![
                    format!(
                        "<a id=\"workspace-{0}\" href=\"/orgs/{1}/workspaces/{0}\">{0}</a>",
                        esc(name),
                        esc(&org)
                    ),
                    esc(text(&w.spec, &["owner"])),
                    esc(text(&w.spec, &["state"])),
                    format!("<span class=\"phase\">{}</span>", esc(text(&w.status, &["phase"]))),
                    esc(text(&w.status, &["agent", "status"])),
                    esc(text(&w.status, &["agent", "lifecycle"])),
                    esc(text(&w.spec, &["templateVersion"])),
                    esc(text(&w.status, &["lastActivity"])),
                ]
            })
            .collect();
        body.push_str(&html::table(
            &[
                "Name",
                "Owner",
                "Desired",
                "Phase",
                "Agent",
                "Lifecycle",
                "Template version",
                "Last activity",
            ],
            &rows,
        ));
        if items.is_empty() {
            body.push_str(
                "<p class=\"muted\">Create one with <code>kiln workspace create NAME --template TEMPLATE</code>.</p>",
            );
        }
        body.push_str(&provisioners_section(&state, &p, &org).await?);
        Ok(body)
    }
    .await;
    match result {
        Ok(body) => {
            page(&format!("Workspaces of {org}"), Some(&p.user.name), &body).into_response()
        }
        Err(e) => error_page(Some(&p.user.name), e, &[org_link(&org)]),
    }
}

/// The provisioners serving the organization and, for its administrators, its provisioner keys.
async fn provisioners_section(
    state: &AppState,
    p: &crate::auth::Principal,
    org: &str,
) -> Result<String, ApiError> {
    let tags = |t: &std::collections::BTreeMap<String, String>| {
        t.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut out = String::from("<section id=\"provisioners\"><h2>Provisioners</h2>");
    let rows: Vec<Vec<String>> = provisioners::live_for(state, org)
        .iter()
        .map(|i| {
            let types: Vec<&str> = i.types.iter().map(|t| t.as_str()).collect();
            vec![
                esc(&i.name),
                if i.organization.is_none() {
                    "built-in"
                } else {
                    "external"
                }
                .to_string(),
                esc(&types.join(", ")),
                esc(&tags(&i.tags)),
            ]
        })
        .collect();
    out.push_str(&html::table(&["Name", "Kind", "Types", "Tags"], &rows));
    if hub::is_admin(state, p, org).await {
        out.push_str("<h3>Provisioner keys</h3>");
        let keys = crate::keys::PROVISIONER_KEYS.list(state, org).await?;
        let rows: Vec<Vec<String>> = keys
            .iter()
            .map(|k| {
                let t: std::collections::BTreeMap<String, String> =
                    serde_json::from_value(k["tags"].clone()).unwrap_or_default();
                vec![
                    esc(text(k, &["name"])),
                    esc(&tags(&t)),
                    esc(text(k, &["createdBy"])),
                    esc(text(k, &["createdAt"])),
                ]
            })
            .collect();
        out.push_str(&html::table(
            &["Name", "Tags", "Created by", "Created"],
            &rows,
        ));
        out.push_str(
            "<p class=\"muted\">Run a provisioner on another host: <code>kiln provisioner keys create NAME --tag KEY=VALUE</code>, then <code>KILN_PROVISIONER_KEY=… kiln provisioner start --url URL</code>. Templates with <code>provisionerTags</code> go to provisioners whose key carries every tag.</p>",
        );
    }
    out.push_str("</section>");
    Ok(out)
}

pub(super) async fn workspace_page(
    State(state): State<AppState>,
    p: MaybePrincipal,
    Path((org, name)): Path<(String, String)>,
) -> Response {
    let p = match require(p) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let back = [
        org_link(&org),
        (format!("/orgs/{org}/workspaces"), "Workspaces".to_string()),
    ];
    let result: Result<String, ApiError> = async {
        let acc = rbac::org_access(&state, &p, &org).await?;
        acc.check(Verb::Get, Kind::Workspace, None, &format!("workspace {name}"))?;
        let ws = state.store.get(&org_key(Kind::Workspace, &org, &name)).await?;
        let owner = text(&ws.spec, &["owner"]).to_string();
        let mut body = html::crumbs(
            &[
                ("/", "Organizations"),
                (&format!("/orgs/{org}"), &org),
                (&format!("/orgs/{org}/workspaces"), "Workspaces"),
            ],
            &name,
        );
        body.push_str(&format!(
            "<div id=\"workspace\" data-api=\"/api/v1/orgs/{}/workspaces/{}\"><h1>Workspace {}</h1>",
            esc(&org),
            esc(&name),
            esc(&name)
        ));
        let field = |label: &str, id: &str, value: &str| {
            format!(
                "<tr><th>{}</th><td id=\"{id}\">{}</td></tr>",
                esc(label),
                esc(value)
            )
        };
        let mut facts = String::from("<table class=\"facts\">");
        facts.push_str(&field("Owner", "ws-owner", &owner));
        facts.push_str(&field(
            "Template",
            "ws-template",
            &format!(
                "{} ({})",
                text(&ws.spec, &["template"]),
                text(&ws.spec, &["templateVersion"])
            ),
        ));
        facts.push_str(&field("Desired state", "ws-state", text(&ws.spec, &["state"])));
        facts.push_str(&field("Phase", "ws-phase", text(&ws.status, &["phase"])));
        if let Some(r) = ws.status["reason"].as_str() {
            facts.push_str(&field("Reason", "ws-reason", r));
        }
        if let Some(w) = ws.status["waiting"].as_str() {
            facts.push_str(&field("Waiting", "ws-waiting", w));
        }
        facts.push_str(&field("Build", "ws-build", &build_number(&ws).to_string()));
        facts.push_str(&field("Agent", "ws-agent", text(&ws.status, &["agent", "status"])));
        facts.push_str(&field(
            "Lifecycle",
            "ws-lifecycle",
            text(&ws.status, &["agent", "lifecycle"]),
        ));
        facts.push_str(&field(
            "Agent version",
            "ws-agent-version",
            text(&ws.status, &["agent", "version"]),
        ));
        facts.push_str(&field("Stops after idle", "ws-ttl", text(&ws.spec, &["ttl"])));
        facts.push_str(&field(
            "Last activity",
            "ws-activity",
            text(&ws.status, &["lastActivity"]),
        ));
        facts.push_str("</table>");
        body.push_str(&facts);

        body.push_str(&format!(
            "<p class=\"muted\">Connect: <code>kiln ssh {0}</code> · <code>kiln port-forward {0} --tcp LOCAL:REMOTE</code></p>",
            esc(&name)
        ));

        let defs = apps::apps_of(&state, &ws).await.unwrap_or_default();
        let health = &ws.status["agent"]["apps"];
        let rows: Vec<Vec<String>> = defs
            .iter()
            .map(|a| {
                let label = if a.display_name.is_empty() {
                    &a.slug
                } else {
                    &a.display_name
                };
                let url = apps::app_url(&state, a, &owner, &name, &org);
                vec![
                    format!(
                        "<a class=\"app\" id=\"app-{}\" href=\"{}\">{}</a>",
                        esc(&a.slug),
                        esc(&url),
                        esc(label)
                    ),
                    esc(&format!("{:?}", a.share).to_lowercase()),
                    format!(
                        "<span id=\"app-health-{}\">{}</span>",
                        esc(&a.slug),
                        esc(health[&a.slug].as_str().unwrap_or("-"))
                    ),
                ]
            })
            .collect();
        body.push_str("<h2 id=\"apps\">Apps</h2>");
        body.push_str(&html::table(&["App", "Shared with", "Health"], &rows));

        if let Some(m) = ws.status["agent"]["metadata"].as_object() {
            let rows: Vec<Vec<String>> = m
                .iter()
                .map(|(k, v)| {
                    vec![
                        esc(k),
                        esc(v["value"].as_str().unwrap_or("")),
                        esc(v["error"].as_str().unwrap_or("")),
                    ]
                })
                .collect();
            body.push_str("<h2 id=\"metadata\">Metadata</h2>");
            body.push_str(&html::table(&["Key", "Value", "Error"], &rows));
        }

        let build = build_number(&ws) as u32;
        let mut lines = String::new();
        let mut last = [0u64; 2];
        for (i, (label, stream)) in crate::workspaces::streams(&org, &name, build)
            .iter()
            .enumerate()
        {
            for l in state.store.read_logs(stream, 0, LOG_LINES).await? {
                last[i] = l.seq;
                lines.push_str(&html::workspace_log_line(
                    label,
                    &l.time.to_string(),
                    &l.source,
                    &l.text,
                ));
            }
        }
        body.push_str(&format!(
            "<h2 id=\"logs\">Build {build}: build and startup logs</h2>\
             <p id=\"live-status\" class=\"muted\" data-live=\"static\">With JavaScript, new lines follow live.</p>\
             <pre class=\"logs\" id=\"ws-logs\" data-build=\"{build}\" data-build-seq=\"{}\" data-agent-seq=\"{}\">{lines}</pre></div>",
            last[0], last[1]
        ));
        body.push_str(html::WORKSPACE_SCRIPT);
        Ok(body)
    }
    .await;
    match result {
        Ok(body) => page(&format!("Workspace {name}"), Some(&p.user.name), &body).into_response(),
        Err(e) => error_page(Some(&p.user.name), e, &back),
    }
}
