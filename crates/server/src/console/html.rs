//! HTML building blocks for the console: escaping, the page frame, tables and condition badges.

use model::{Condition, ConditionStatus, Kind, Resource};

pub const CSS: &str = r#"
*{box-sizing:border-box}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d1d1f;background:#f6f4f2}
header{background:#2b1d14;color:#fff;padding:0 1.5em;min-height:2.9em;display:flex;gap:1em;align-items:center}
header a{color:#ffcf99;text-decoration:none;font-weight:600}
header .brand{font-size:1.1em;letter-spacing:.02em}
header .who{margin-left:auto;display:flex;gap:.8em;align-items:center;color:#f3e6da}
header form{display:inline;margin:0}
header button{background:none;border:1px solid #ffcf99;color:#ffcf99;border-radius:4px;cursor:pointer;padding:.2em .7em;font:inherit;font-size:.9em}
header button:hover{background:#ffcf99;color:#2b1d14}
main{padding:1.2em 1.5em 3em;max-width:1100px;margin:0 auto}
h1{font-size:1.6em;margin:.2em 0 .6em}
h2{font-size:1.15em;margin:1.6em 0 .5em}
a{color:#9a3b0c}
table{border-collapse:collapse;width:100%;background:#fff;margin-bottom:1em;border:1px solid #e3ddd8;border-radius:6px;overflow:hidden}
th,td{border-bottom:1px solid #ece7e3;padding:.45em .7em;text-align:left;vertical-align:top}
tbody tr:last-child td{border-bottom:none}
th{background:#f1ece8;font-weight:600;font-size:.9em;color:#4a3b31}
code{font:.9em ui-monospace,SFMono-Regular,Menlo,monospace;background:#f3efec;padding:0 .25em;border-radius:3px}
.badge{display:inline-block;border-radius:3px;padding:0 .4em;margin:0 .2em .2em 0;font-size:.85em;white-space:nowrap}
.True{background:#d7f5dd;color:#14532d}.False{background:#fde2e1;color:#7f1d1d}.Unknown{background:#eee;color:#444}
.ready{display:inline-block;border-radius:999px;padding:.05em .65em;font-size:.85em;font-weight:600;white-space:nowrap}
.ready.True{background:#d7f5dd;color:#14532d}.ready.False{background:#fde2e1;color:#7f1d1d}
.ready.Unknown{background:#fdf1c7;color:#6b4e00}.ready.Pending{background:#eee;color:#555}
.why{display:block;font-size:.85em;color:#7f1d1d;margin-top:.2em}
.muted,.none{color:#888}.crumbs{color:#666;margin:0}.empty{color:#888;font-style:italic}
.error{color:#b42318}
.prod{background:#fde2e1;color:#7f1d1d}.nonprod{background:#eee;color:#444}
.missing{color:#b42318;font-weight:600}
nav.tabs{display:flex;gap:.3em;border-bottom:1px solid #e3ddd8;margin:0 0 1em}
nav.tabs a{padding:.35em .9em;text-decoration:none;color:#4a3b31;border:1px solid transparent;border-bottom:none;border-radius:5px 5px 0 0;margin-bottom:-1px}
nav.tabs a.current{background:#fff;border-color:#e3ddd8;color:#1d1d1f;font-weight:600}
.card{background:#fff;border:1px solid #e3ddd8;border-radius:8px;padding:1.2em 1.5em;max-width:560px}
.card.login{max-width:360px;margin:3em auto}
.card.login h1{margin-top:0}
form.login{display:grid;gap:.8em}
form.inline{display:inline;margin:0 0 0 .4em}
form.inline button{border:1px solid #8a5a2b;background:#fff;color:#8a5a2b;border-radius:4px;cursor:pointer;padding:.15em .7em;font:inherit;font-size:.9em}
form.inline button:hover{background:#8a5a2b;color:#fff}
form.inline button.reject{border-color:#b3261e;color:#b3261e}
p.actions form.inline:first-child{margin-left:0}
form.login label{display:grid;gap:.25em;font-weight:600;font-size:.9em}
form.login input{padding:.5em;font:inherit;font-weight:400;border:1px solid #cfc6bf;border-radius:4px}
form.login button{padding:.55em;font:inherit;font-weight:600;background:#9a3b0c;color:#fff;border:none;border-radius:4px;cursor:pointer}
form.login button:hover{background:#7c2f09}
p.error{background:#fde2e1;border:1px solid #f5b5b1;border-radius:4px;padding:.5em .7em}
.problem .status{font-size:.9em;color:#888;margin:0}
.problem .detail{font-family:ui-monospace,monospace;font-size:.9em}
.url{display:block;white-space:nowrap;font-size:.9em}
pre.logs{background:#1e1a17;color:#f3e6da;padding:.8em 1em;border-radius:6px;overflow-x:auto;min-height:6em;font-size:.85em;line-height:1.4}
pre.logs .stderr{color:#ffb4a8}pre.logs .meta{color:#a08f82}
"#;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The page frame. `user` is the signed-in user, if any.
pub fn page(title: &str, user: Option<&str>, body: &str) -> axum::response::Html<String> {
    let who = match user {
        Some(u) => format!(
            "<span class=\"who\"><span id=\"user\">{}</span><form method=\"post\" action=\"/logout\">\
             <button id=\"sign-out\" type=\"submit\">Sign out</button></form></span>",
            esc(u)
        ),
        None => String::new(),
    };
    axum::response::Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · Kiln</title>\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><link rel=\"stylesheet\" href=\"/static/kiln.css\"></head>\
         <body><header><a class=\"brand\" href=\"/\">Kiln</a>{who}</header><main>{body}</main></body></html>",
        esc(title)
    ))
}

/// The sign-in card; `username` refills the field after a failed attempt.
pub fn login_form(error: Option<&str>, username: &str, next: &str) -> String {
    let err = error
        .map(|e| {
            format!(
                "<p class=\"error\" id=\"login-error\" role=\"alert\">{}</p>",
                esc(e)
            )
        })
        .unwrap_or_default();
    let (user_focus, pass_focus) = if username.is_empty() {
        (" autofocus", "")
    } else {
        ("", " autofocus")
    };
    format!(
        "<div class=\"card login\"><h1>Sign in to Kiln</h1>{err}<form class=\"login\" method=\"post\" action=\"/login\">\
         <label>Username <input id=\"username\" name=\"username\" value=\"{}\" autocomplete=\"username\" required{user_focus}></label>\
         <label>Password <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required{pass_focus}></label>\
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <button id=\"sign-in\" type=\"submit\">Sign in</button></form></div>",
        esc(username),
        esc(next)
    )
}

/// A friendly error page body: a plain-language heading and hint per status, the server's detail (already
/// generic for internal errors) and ways back.
pub fn problem(status: u16, detail: &str, back: &[(String, String)]) -> (&'static str, String) {
    let (title, hint) = match status {
        404 => (
            "Not found",
            "There is nothing here: the name may be misspelled, or the object was deleted.",
        ),
        403 => (
            "No access",
            "You are signed in, but your roles do not allow this. An organization admin can grant you a role.",
        ),
        401 => (
            "Sign-in required",
            "Your session has ended. Sign in again to continue.",
        ),
        400..=499 => (
            "That did not work",
            "The request was not accepted. Check what you entered and try again.",
        ),
        _ => (
            "Something went wrong",
            "Kiln could not show this page. Try again in a moment; if it keeps failing, the server log has the details.",
        ),
    };
    let mut links: Vec<String> = back
        .iter()
        .map(|(href, label)| format!("<a href=\"{}\">{}</a>", esc(href), esc(label)))
        .collect();
    links.push("<a href=\"/\">All organizations</a>".into());
    let body = format!(
        "<div class=\"card problem\" id=\"problem\"><p class=\"status\">Error {status}</p><h1>{title}</h1>\
         <p>{hint}</p><p class=\"detail\">{}</p><p>{}</p></div>",
        esc(detail),
        links.join(" · ")
    );
    (title, body)
}

/// Breadcrumbs: (href, label) links followed by the current page's label.
pub fn crumbs(links: &[(&str, &str)], current: &str) -> String {
    let mut out = String::from("<p class=\"crumbs\">");
    for (href, label) in links {
        out.push_str(&format!("<a href=\"{}\">{}</a> / ", esc(href), esc(label)));
    }
    out.push_str(&esc(current));
    out.push_str("</p>");
    out
}

/// The tabs of an organization's pages; `current` is `"overview"` or `"environments"`.
pub fn org_tabs(org: &str, current: &str) -> String {
    let tab = |id: &str, href: String, label: &str| {
        let class = if id == current {
            " class=\"current\""
        } else {
            ""
        };
        format!(
            "<a id=\"tab-{id}\" href=\"{}\"{class}>{label}</a>",
            esc(&href)
        )
    };
    format!(
        "<nav class=\"tabs\">{}{}{}{}</nav>",
        tab("overview", format!("/orgs/{org}"), "Overview"),
        tab(
            "environments",
            format!("/orgs/{org}/environments"),
            "Environments"
        ),
        tab(
            "workspaces",
            format!("/orgs/{org}/workspaces"),
            "Workspaces"
        ),
        tab(
            "connections",
            format!("/orgs/{org}/connections"),
            "Connected laptops"
        ),
    )
}

/// A table; cells are already-escaped HTML.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return "<p class=\"empty\">None yet.</p>".to_string();
    }
    let mut out = String::from("<table><thead><tr>");
    for h in headers {
        out.push_str(&format!("<th>{}</th>", esc(h)));
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            out.push_str(&format!("<td>{c}</td>"));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

fn status_class(s: ConditionStatus) -> &'static str {
    match s {
        ConditionStatus::True => "True",
        ConditionStatus::False => "False",
        ConditionStatus::Unknown => "Unknown",
    }
}

fn condition_tooltip(c: &Condition) -> String {
    match (c.reason.is_empty(), c.message.is_empty()) {
        (true, true) => String::new(),
        (false, true) => c.reason.clone(),
        (true, false) => c.message.clone(),
        (false, false) => format!("{}: {}", c.reason, c.message),
    }
}

/// Whether a condition was computed from an older generation of the object than the current one.
fn stale(r: &Resource, c: &Condition) -> bool {
    matches!((c.observed_generation, r.metadata.generation), (Some(seen), Some(now)) if seen < now)
}

/// The `Ready` condition as one prominent badge: Ready, Not ready (with its reason), Unknown, or Pending when no
/// controller has reported yet. With `explain`, a failing condition's message follows on its own line (inline
/// markup, so that the cell may sit inside a paragraph).
pub fn ready_cell(r: &Resource, explain: bool) -> String {
    let Some(c) = r.condition("Ready") else {
        return "<span class=\"ready Pending\" data-ready=\"Pending\" title=\"No status reported yet\">Pending</span>"
            .into();
    };
    let class = status_class(c.status);
    let mut label = match c.status {
        ConditionStatus::True => "Ready".to_string(),
        ConditionStatus::False if c.reason.is_empty() => "Not ready".to_string(),
        ConditionStatus::False => format!("Not ready: {}", c.reason),
        ConditionStatus::Unknown => "Unknown".to_string(),
    };
    if stale(r, &c) {
        label.push_str(" (updating)");
    }
    let mut out = format!(
        "<span class=\"ready {class}\" data-ready=\"{class}\" title=\"{}\">{}</span>",
        esc(&condition_tooltip(&c)),
        esc(&label)
    );
    if explain && c.status != ConditionStatus::True && !c.message.is_empty() {
        out.push_str(&format!("<span class=\"why\">{}</span>", esc(&c.message)));
    }
    out
}

/// Condition badges other than `Ready`, with reason and message as the tooltip.
pub fn conditions_cell(r: &Resource) -> String {
    let badges: String = r
        .conditions()
        .iter()
        .filter(|c| c.type_ != "Ready")
        .map(|c| {
            format!(
                "<span class=\"badge {}\" title=\"{}\">{}={:?}</span>",
                status_class(c.status),
                esc(&condition_tooltip(c)),
                esc(&c.type_),
                c.status
            )
        })
        .collect();
    if badges.is_empty() {
        "<span class=\"none\">—</span>".into()
    } else {
        badges
    }
}

/// Conditions with reason and message spelled out.
pub fn conditions_table(r: &Resource) -> String {
    let rows: Vec<Vec<String>> = r
        .conditions()
        .iter()
        .map(|c| {
            vec![
                esc(&c.type_),
                format!(
                    "<span class=\"badge {0}\">{0}</span>",
                    status_class(c.status)
                ),
                esc(&c.reason),
                esc(&c.message),
                esc(&c.last_transition_time),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "<p class=\"empty\">No status reported yet.</p>".into();
    }
    table(&["Type", "Status", "Reason", "Message", "Since"], &rows)
}

fn s<'a>(r: &'a Resource, field: &str) -> &'a str {
    r.spec.get(field).and_then(|v| v.as_str()).unwrap_or("")
}

fn production_badge(r: &Resource) -> String {
    if r.spec
        .get("isProduction")
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
    {
        "<span class=\"badge prod\">production</span>".into()
    } else {
        "<span class=\"badge nonprod\">non-production</span>".into()
    }
}

/// One row of an organization page section.
pub fn row(kind: Kind, org: &str, r: &Resource) -> Vec<String> {
    let name = esc(&r.metadata.name);
    match kind {
        Kind::Project => vec![
            format!("<a href=\"/orgs/{}/projects/{name}\">{name}</a>", esc(org)),
            esc(r
                .spec
                .get("deploymentPipelineRef")
                .and_then(|v| v.as_str())
                .unwrap_or("default")),
            ready_cell(r, false),
            conditions_cell(r),
        ],
        Kind::Environment => vec![
            name,
            esc(s(r, "dataPlaneRef")),
            production_badge(r),
            ready_cell(r, false),
            conditions_cell(r),
        ],
        Kind::Component => {
            let project = esc(r.metadata.project.as_deref().unwrap_or(""));
            vec![
                format!(
                    "<a href=\"/orgs/{}/projects/{project}#component-{name}\">{name}</a>",
                    esc(org)
                ),
                project,
                esc(s(r, "type")),
                ready_cell(r, false),
                conditions_cell(r),
            ]
        }
        Kind::Pipeline => {
            let steps: Vec<String> = r
                .spec
                .get("steps")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .map(|st| esc(st.get("name").and_then(|n| n.as_str()).unwrap_or("?")))
                        .collect()
                })
                .unwrap_or_default();
            vec![
                format!("<span id=\"pipeline-{name}\">{name}</span>"),
                format!(
                    "<code>{}</code>",
                    esc(r
                        .spec
                        .pointer("/source/repository")
                        .and_then(|v| v.as_str())
                        .unwrap_or(""))
                ),
                esc(r
                    .spec
                    .pointer("/source/branch")
                    .and_then(|v| v.as_str())
                    .unwrap_or("")),
                steps.join(", "),
                pipeline_triggers(org, &r.metadata.name, r),
            ]
        }
        Kind::PipelineRun => {
            let steps: Vec<String> = r
                .status
                .get("steps")
                .and_then(|v| v.as_array())
                .map(|a| {
                    a.iter()
                        .map(|st| {
                            let phase = st
                                .get("phase")
                                .and_then(|p| p.as_str())
                                .unwrap_or("Pending");
                            format!(
                                "<span class=\"step {}\" title=\"{}\">{}</span>",
                                esc(&phase.to_lowercase()),
                                esc(st.get("reason").and_then(|p| p.as_str()).unwrap_or(phase)),
                                esc(st.get("name").and_then(|n| n.as_str()).unwrap_or("?"))
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            let phase = r
                .status
                .get("phase")
                .and_then(|p| p.as_str())
                .unwrap_or("Pending");
            let mut status = esc(phase);
            if let Some(w) = r.status.get("waiting").and_then(|w| w.as_str()) {
                status.push_str(&format!("<br><span class=\"muted\">{}</span>", esc(w)));
            }
            if let Some(e) = r.status.get("error").and_then(|w| w.as_str()) {
                status.push_str(&format!("<br><span class=\"muted\">{}</span>", esc(e)));
            }
            let commit: String = r
                .status
                .get("commit")
                .and_then(|c| c.as_str())
                .unwrap_or("")
                .chars()
                .take(10)
                .collect();
            vec![
                format!(
                    "<span id=\"pipelinerun-{name}\"><a href=\"/orgs/{}/pipelineruns/{name}\">{name}</a></span>",
                    esc(org)
                ),
                status,
                format!(
                    "{}<br><span class=\"muted\">{}</span>",
                    esc(s(r, "event")),
                    esc(s(r, "startedBy"))
                ),
                esc(s(r, "branch")),
                format!("<code>{}</code>", esc(&commit)),
                steps.join(" "),
            ]
        }
        _ => vec![
            format!(
                "<span id=\"{}-{name}\">{name}</span>",
                kind.as_str().to_lowercase()
            ),
            esc(s(r, "type")),
            ready_cell(r, false),
            conditions_cell(r),
        ],
    }
}

/// One row of the environments page: the environment and the data plane it runs on (`None` when that data
/// plane does not exist or is not visible to the viewer).
pub fn environment_row(org: &str, env: &Resource, plane: Option<&Resource>) -> Vec<String> {
    let name = esc(&env.metadata.name);
    let display = s(env, "displayName");
    let name_cell = if display.is_empty() {
        format!("<span id=\"environment-{name}\">{name}</span>")
    } else {
        format!(
            "<span id=\"environment-{name}\">{name}</span><br><span class=\"muted\">{}</span>",
            esc(display)
        )
    };
    let plane_ref = s(env, "dataPlaneRef");
    let plane_cell = match plane {
        Some(dp) => format!(
            "<a href=\"/orgs/{}#dataplanes\">{}</a> <span class=\"muted\">{}</span>",
            esc(org),
            esc(plane_ref),
            esc(s(dp, "type"))
        ),
        None => format!(
            "{} <span class=\"missing\" title=\"No data plane of this name in the organization\">missing</span>",
            esc(plane_ref)
        ),
    };
    vec![
        name_cell,
        production_badge(env),
        ready_cell(env, true),
        plane_cell,
        plane.map(|dp| ready_cell(dp, true)).unwrap_or_default(),
    ]
}

/// A component with its endpoints, for the project page.
pub fn component_detail_row(r: &Resource) -> Vec<String> {
    let endpoints: Vec<String> = r
        .spec
        .get("endpoints")
        .and_then(|e| e.as_array())
        .map(|eps| {
            eps.iter()
                .map(|e| {
                    let path = e.get("path").and_then(|v| v.as_str()).unwrap_or("");
                    let visibility = e.get("visibility").and_then(|v| v.as_str()).unwrap_or("");
                    let mut out = format!(
                        "<span class=\"endpoint\"><code>{} :{}</code>",
                        esc(e.get("name").and_then(|v| v.as_str()).unwrap_or("")),
                        e.get("port").and_then(|v| v.as_u64()).unwrap_or(0),
                    );
                    if !path.is_empty() {
                        out.push_str(&format!(" {}", esc(path)));
                    }
                    if !visibility.is_empty() {
                        out.push_str(&format!(
                            " <span class=\"muted\">({})</span>",
                            esc(visibility)
                        ));
                    }
                    out.push_str("</span>");
                    out
                })
                .collect()
        })
        .unwrap_or_default();
    let name = esc(&r.metadata.name);
    vec![
        format!("<span class=\"component\" id=\"component-{name}\">{name}</span>"),
        esc(s(r, "type")),
        if endpoints.is_empty() {
            "<span class=\"none\">—</span>".into()
        } else {
            endpoints.join("<br>")
        },
        ready_cell(r, true),
        conditions_cell(r),
    ]
}

/// What the gateway URLs of a project's endpoints are built from.
pub struct UrlBase<'a> {
    pub org: &'a str,
    pub project: &'a str,
    pub base_domain: &'a str,
    /// The port browsers reach the server on.
    pub port: u16,
}

/// One component in one environment (its ReleaseBinding), for the project page: release, readiness with the
/// reason it is not ready, replicas ready/desired, the gateway URLs of the release's public endpoints, and a link
/// to its logs.
pub fn deployment_row(
    u: &UrlBase<'_>,
    component: &Resource,
    binding: &Resource,
    release: Option<&Resource>,
) -> Vec<String> {
    let comp = component.metadata.name.as_str();
    let env = s(binding, "environment");
    let wanted = s(binding, "release");
    let running = binding
        .status
        .get("release")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let mut release_cell = format!("<code class=\"release\">{}</code>", esc(wanted));
    if !running.is_empty() && running != wanted {
        release_cell.push_str(&format!(
            "<span class=\"muted url\">running {}</span>",
            esc(running)
        ));
    }
    if binding.spec.get("state").and_then(|v| v.as_str()) == Some("undeployed") {
        release_cell.push_str("<span class=\"muted url\">undeployed</span>");
    }
    let count = |field: &str| binding.status.get(field).and_then(|v| v.as_u64());
    let replicas = match (count("readyReplicas"), count("replicas")) {
        (Some(r), Some(d)) => format!("<span class=\"replicas\">{r}/{d}</span>"),
        _ => "<span class=\"none\">—</span>".into(),
    };
    let endpoints = release
        .and_then(|r| r.spec.pointer("/snapshot/endpoints"))
        .and_then(|e| e.as_array())
        .cloned()
        .unwrap_or_default();
    let urls: Vec<String> = endpoints
        .iter()
        .filter(|e| e.get("visibility").and_then(|v| v.as_str()) == Some("public"))
        .filter_map(|e| e.get("name").and_then(|v| v.as_str()))
        .flat_map(|ep| {
            let path = format!("/x/{}/{}/{env}/{comp}/{ep}/", u.org, u.project);
            let host = format!(
                "http://{ep}--{comp}--{}--{env}.{}:{}/",
                u.project, u.base_domain, u.port
            );
            [
                format!("<a class=\"url path-url\" href=\"{0}\">{0}</a>", esc(&path)),
                format!("<a class=\"url host-url\" href=\"{0}\">{0}</a>", esc(&host)),
            ]
        })
        .collect();
    let logs = format!(
        "/orgs/{}/projects/{}/components/{comp}/logs?env={env}",
        u.org, u.project
    );
    let id = esc(&format!("deployment-{comp}-{env}"));
    vec![
        format!("<span class=\"component\" id=\"{id}\">{}</span>", esc(comp)),
        format!("<span class=\"environment\">{}</span>", esc(env)),
        release_cell,
        ready_cell(binding, true),
        replicas,
        if urls.is_empty() {
            "<span class=\"none\">—</span>".into()
        } else {
            urls.join("")
        },
        format!("<a class=\"logs\" href=\"{}\">Logs</a>", esc(&logs)),
    ]
}

/// One log line as the logs page shows it (the script formats live lines the same way).
fn log_line(l: &dataplane::LogLine) -> String {
    format!(
        "<span class=\"line {}\"><span class=\"meta\">{} [{}]</span> {}\n</span>",
        if l.stream == "stderr" {
            "stderr"
        } else {
            "stdout"
        },
        esc(&l.time.to_string()),
        l.replica,
        esc(&l.line)
    )
}

/// Follows the API's Server-Sent Events: each (re)connection replays the recent lines, which replace what is
/// shown, then appends lines as they come.
const LOGS_SCRIPT: &str = r#"<script>
(function () {
  var pre = document.getElementById("logs"), st = document.getElementById("live-status");
  if (!window.EventSource) return;
  var es = new EventSource(pre.getAttribute("data-src")), fresh = true;
  function span(cls, text) { var s = document.createElement("span"); s.className = cls; s.textContent = text; return s; }
  es.onopen = function () { fresh = true; st.textContent = "Live: new lines appear as they are written."; st.setAttribute("data-live", "open"); };
  es.onmessage = function (ev) {
    var l; try { l = JSON.parse(ev.data); } catch (e) { return; }
    if (fresh) { pre.textContent = ""; fresh = false; }
    var line = span("line " + (l.stream === "stderr" ? "stderr" : "stdout"), "");
    line.appendChild(span("meta", l.time + " [" + l.replica + "]"));
    line.appendChild(document.createTextNode(" " + l.line + "\n"));
    pre.appendChild(line);
    while (pre.childNodes.length > 2000) pre.removeChild(pre.firstChild);
    window.scrollTo(0, document.body.scrollHeight);
  };
  es.addEventListener("error", function (ev) {
    var why = ""; try { why = JSON.parse(ev.data).error || ""; } catch (e) {}
    st.textContent = why ? "Stream ended: " + why + " (retrying)" : "Disconnected; reconnecting…";
    st.setAttribute("data-live", "closed");
  });
})();
</script>"#;

/// One line of a workspace's build or agent log as the workspace page shows it (the script formats live
/// lines the same way).
pub fn workspace_log_line(stream: &str, time: &str, source: &str, text: &str) -> String {
    format!(
        "<span class=\"line {}\"><span class=\"meta\">{} [{}]</span> {}\n</span>",
        esc(stream),
        esc(time),
        esc(source),
        esc(text)
    )
}

/// Follows a workspace: its build and agent log lines (the API's NDJSON stream, resumed after the lines the
/// page was rendered with) and, every two seconds, its state, agent and app health.
pub const WORKSPACE_SCRIPT: &str = r#"<script>
(function () {
  var pre = document.getElementById("ws-logs"), st = document.getElementById("live-status");
  var root = document.getElementById("workspace"), api = root.getAttribute("data-api");
  function set(id, v) { var e = document.getElementById(id); if (e && v !== undefined && v !== null) e.textContent = v; }
  function span(cls, text) { var s = document.createElement("span"); s.className = cls; s.textContent = text; return s; }
  function refresh() {
    fetch(api, {credentials: "same-origin"}).then(function (r) { return r.ok ? r.json() : null; }).then(function (w) {
      if (!w) return;
      var s = w.status || {}, a = s.agent || {};
      set("ws-phase", s.phase); set("ws-agent", a.status); set("ws-lifecycle", a.lifecycle);
      set("ws-build", s.build && s.build.number); set("ws-activity", s.lastActivity);
      var apps = a.apps || {};
      Object.keys(apps).forEach(function (k) { set("app-health-" + k, apps[k]); });
    }).catch(function () {});
  }
  setInterval(refresh, 2000);
  if (!window.fetch || !window.TextDecoder || !pre) return;
  var build = pre.getAttribute("data-build"), skip = {build: +pre.getAttribute("data-build-seq"), agent: +pre.getAttribute("data-agent-seq")};
  function follow() {
    fetch(api + "/logs?follow=true&build=" + build, {credentials: "same-origin"}).then(function (r) {
      if (!r.ok || !r.body) throw new Error("HTTP " + r.status);
      st.textContent = "Live: new lines appear as they are written."; st.setAttribute("data-live", "open");
      var reader = r.body.getReader(), dec = new TextDecoder(), buf = "";
      function pump() {
        return reader.read().then(function (x) {
          if (x.done) throw new Error("stream ended");
          buf += dec.decode(x.value, {stream: true});
          var parts = buf.split("\n"); buf = parts.pop();
          parts.forEach(function (t) {
            var l; try { l = JSON.parse(t); } catch (e) { return; }
            if (l.seq <= (skip[l.stream] || 0)) return;
            skip[l.stream] = l.seq;
            var line = span("line " + l.stream, "");
            line.appendChild(span("meta", l.time + " [" + l.source + "]"));
            line.appendChild(document.createTextNode(" " + l.text + "\n"));
            pre.appendChild(line);
          });
          return pump();
        });
      }
      return pump();
    }).catch(function (e) {
      st.textContent = "Disconnected (" + e.message + "); reconnecting…"; st.setAttribute("data-live", "closed");
      setTimeout(follow, 2000);
    });
  }
  follow();
})();
</script>"#;

/// The logs page body: the last lines, rendered here so that the page works without JavaScript, and the
/// script that follows new ones. `problem` says why there are none (e.g. nothing runs yet).
pub fn logs(
    component: &str,
    env: &str,
    src: &str,
    lines: &[dataplane::LogLine],
    problem: Option<&str>,
) -> String {
    let mut out = format!(
        "<h1>Logs of {} in {}</h1><p id=\"live-status\" class=\"muted\" data-live=\"static\">The last {} lines; \
         with JavaScript, new lines follow live.</p>",
        esc(component),
        esc(env),
        lines.len()
    );
    if let Some(p) = problem {
        out.push_str(&format!(
            "<p class=\"empty\" id=\"logs-problem\">{}</p>",
            esc(p)
        ));
    }
    out.push_str(&format!(
        "<pre class=\"logs\" id=\"logs\" data-src=\"{}\">",
        esc(src)
    ));
    for l in lines {
        out.push_str(&log_line(l));
    }
    out.push_str("</pre>");
    out.push_str(LOGS_SCRIPT);
    out
}

/// A pipeline's triggers: name and type, and for those that take deliveries the path to give the Git host or
/// registry (on this server's URL).
fn pipeline_triggers(org: &str, pipeline: &str, r: &Resource) -> String {
    let Some(triggers) = r.spec.get("triggers").and_then(|t| t.as_array()) else {
        return String::new();
    };
    let mut out = Vec::new();
    for t in triggers {
        let name = t.get("name").and_then(|n| n.as_str()).unwrap_or("?");
        let (kind, detail) = if let Some(w) = t.get("webhook") {
            let provider = w.get("provider").and_then(|p| p.as_str()).unwrap_or("");
            (format!("{provider} webhook"), true)
        } else if t.get("image").is_some() {
            ("image push".to_string(), true)
        } else if let Some(c) = t.get("cron") {
            let sched = c.get("schedule").and_then(|p| p.as_str()).unwrap_or("");
            (format!("cron {sched}"), false)
        } else if let Some(p) = t.get("poll") {
            let every = p.get("interval").and_then(|p| p.as_str()).unwrap_or("1m");
            (format!("poll every {every}"), false)
        } else {
            (String::new(), false)
        };
        let mut cell = format!("{}: {}", esc(name), esc(&kind));
        if detail {
            cell.push_str(&format!(
                " <code>/api/v1/hooks/{}/{}/{}</code>",
                esc(org),
                esc(pipeline),
                esc(name)
            ));
        }
        out.push(cell);
    }
    out.join("<br>")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            esc("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }

    fn with_status(status: serde_json::Value) -> Resource {
        let mut r: Resource = serde_json::from_value(serde_json::json!({
            "apiVersion": "kiln.dev/v1",
            "kind": "Component",
            "metadata": {"name": "web", "organization": "default", "project": "p", "generation": 2},
            "spec": {"type": "service"},
        }))
        .unwrap();
        r.status = status;
        r
    }

    #[test]
    fn ready_badge_states() {
        let pending = ready_cell(&with_status(serde_json::json!({})), true);
        assert!(pending.contains("data-ready=\"Pending\""), "{pending}");

        let ready = ready_cell(
            &with_status(serde_json::json!({"conditions": [
                {"type": "Ready", "status": "True", "reason": "Running", "observedGeneration": 2}
            ]})),
            true,
        );
        assert!(
            ready.contains(">Ready<") && !ready.contains("why"),
            "{ready}"
        );

        let failing = ready_cell(
            &with_status(serde_json::json!({"conditions": [
                {"type": "Ready", "status": "False", "reason": "<Crash>", "message": "exit 1 & \"oops\"",
                 "observedGeneration": 1}
            ]})),
            true,
        );
        assert!(
            failing.contains("Not ready: &lt;Crash&gt; (updating)"),
            "{failing}"
        );
        assert!(
            failing.contains("<span class=\"why\">exit 1 &amp; &quot;oops&quot;</span>"),
            "{failing}"
        );
        assert!(!failing.contains("<Crash>"), "{failing}");
    }

    #[test]
    fn other_conditions_exclude_ready() {
        let r = with_status(serde_json::json!({"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "Built", "status": "False", "reason": "NoSource"}
        ]}));
        let cell = conditions_cell(&r);
        assert!(
            cell.contains("Built=False") && !cell.contains("Ready"),
            "{cell}"
        );
        assert_eq!(
            conditions_cell(&with_status(serde_json::json!({}))),
            "<span class=\"none\">—</span>"
        );
    }

    #[test]
    fn problem_pages_escape_detail() {
        let (title, body) = problem(
            404,
            "Project default/<x> not found",
            &[("/orgs/a\"b".into(), "a\"b".into())],
        );
        assert_eq!(title, "Not found");
        assert!(
            body.contains("Project default/&lt;x&gt; not found"),
            "{body}"
        );
        assert!(body.contains("href=\"/orgs/a&quot;b\""), "{body}");
    }
}
