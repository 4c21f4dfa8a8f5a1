//! HTML building blocks for the console: escaping, the page frame, tables and condition badges.

use model::{ConditionStatus, Kind, Resource};

pub const CSS: &str = r#"
body{font:15px/1.45 system-ui,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header{background:#2b1d14;color:#fff;padding:.6em 1.2em;display:flex;gap:1em;align-items:center}
header a{color:#ffcf99;text-decoration:none;font-weight:600}
header .who{margin-left:auto}
header form{display:inline}
header button{background:none;border:1px solid #ffcf99;color:#ffcf99;border-radius:4px;cursor:pointer}
main{padding:1em 1.5em;max-width:1100px}
table{border-collapse:collapse;width:100%;background:#fff;margin-bottom:1.5em}
th,td{border-bottom:1px solid #e3e3e3;padding:.4em .6em;text-align:left;vertical-align:top}
th{background:#f1ece8}
.badge{display:inline-block;border-radius:3px;padding:0 .4em;margin:0 .2em .2em 0;font-size:.85em}
.True{background:#d7f5dd;color:#14532d}.False{background:#fde2e1;color:#7f1d1d}.Unknown{background:#eee;color:#444}
.error{color:#b42318}.crumbs{color:#666}.empty{color:#888;font-style:italic}
form.login{max-width:320px;display:grid;gap:.6em}
form.login input{padding:.4em}
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
            "<span class=\"who\">{} <form method=\"post\" action=\"/logout\"><button type=\"submit\">Sign out</button></form></span>",
            esc(u)
        ),
        None => String::new(),
    };
    axum::response::Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · Kiln</title>\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><link rel=\"stylesheet\" href=\"/static/kiln.css\"></head>\
         <body><header><a href=\"/\">Kiln</a>{who}</header><main>{body}</main></body></html>",
        esc(title)
    ))
}

pub fn login_form(error: Option<&str>) -> String {
    let err = error
        .map(|e| format!("<p class=\"error\" id=\"login-error\">{}</p>", esc(e)))
        .unwrap_or_default();
    format!(
        "<h1>Sign in to Kiln</h1>{err}<form class=\"login\" method=\"post\" action=\"/login\">\
         <label>Username <input id=\"username\" name=\"username\" autocomplete=\"username\" required></label>\
         <label>Password <input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required></label>\
         <button id=\"sign-in\" type=\"submit\">Sign in</button></form>"
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

/// Condition badges with reason and message as the tooltip.
pub fn conditions_cell(r: &Resource) -> String {
    let conds = r.conditions();
    if conds.is_empty() {
        return "<span class=\"badge Unknown\">pending</span>".to_string();
    }
    conds
        .iter()
        .map(|c| {
            format!(
                "<span class=\"badge {}\" title=\"{}: {}\">{}={:?}</span>",
                status_class(c.status),
                esc(&c.reason),
                esc(&c.message),
                esc(&c.type_),
                c.status
            )
        })
        .collect()
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
    table(&["Type", "Status", "Reason", "Message", "Since"], &rows)
}

fn s<'a>(r: &'a Resource, field: &str) -> &'a str {
    r.spec.get(field).and_then(|v| v.as_str()).unwrap_or("")
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
            conditions_cell(r),
        ],
        Kind::Environment => vec![
            name,
            esc(s(r, "dataPlaneRef")),
            if r.spec
                .get("isProduction")
                .and_then(|v| v.as_bool())
                .unwrap_or(false)
            {
                "yes".into()
            } else {
                "no".into()
            },
            conditions_cell(r),
        ],
        Kind::Component => {
            let project = esc(r.metadata.project.as_deref().unwrap_or(""));
            vec![
                format!(
                    "<a href=\"/orgs/{}/projects/{project}#components\">{name}</a>",
                    esc(org)
                ),
                project,
                esc(s(r, "type")),
                conditions_cell(r),
            ]
        }
        _ => vec![name, esc(s(r, "type")), conditions_cell(r)],
    }
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
                    format!(
                        "{} :{} {} ({})",
                        esc(e.get("name").and_then(|v| v.as_str()).unwrap_or("")),
                        e.get("port").and_then(|v| v.as_u64()).unwrap_or(0),
                        esc(e.get("path").and_then(|v| v.as_str()).unwrap_or("")),
                        esc(e.get("visibility").and_then(|v| v.as_str()).unwrap_or(""))
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    vec![
        format!("<span class=\"component\">{}</span>", esc(&r.metadata.name)),
        esc(s(r, "type")),
        endpoints.join("<br>"),
        conditions_cell(r),
    ]
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
}
