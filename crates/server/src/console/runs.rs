//! The console's pipeline run page: the run's trigger, branch and commit, each step's status (with Approve and
//! Reject for a waiting approval step), its artifacts, Cancel and Rerun, and its log, followed live
//! (Server-Sent Events, resumed by line number) while the run is going. The buttons post forms to
//! `/orgs/{org}/pipelineruns/{name}/{approve|reject|cancel|rerun}`, which act with the signed-in user's rights
//! and answer with a redirect; a post from another origin is refused.

use axum::extract::{Form, Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Redirect, Response};
use model::Kind;
use serde_json::Value;

use super::html::{self, esc, page};
use super::{error_page, org_link, require};
use crate::auth::MaybePrincipal;
use crate::error::ApiError;
use crate::rbac::{self, Verb};
use crate::workspaces::org_key;
use crate::AppState;

/// How many of the last log lines the page is rendered with.
const LOG_LINES: usize = 2000;

fn text(v: &Value, field: &str) -> String {
    match v.get(field) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

pub async fn run_page(
    State(state): State<AppState>,
    p: MaybePrincipal,
    Path((org, name)): Path<(String, String)>,
) -> Response {
    let p = match require(p) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let result: Result<String, ApiError> = async {
        let acc = rbac::org_access(&state, &p, &org).await?;
        acc.check(Verb::Get, Kind::PipelineRun, None, &format!("run {name}"))?;
        let key = org_key(Kind::PipelineRun, &org, &name);
        let run = state.store.get(&key).await?;
        let phase = controllers::jobs::phase(&run);
        let stream = controllers::jobs::log_stream_of(&key);
        // Lines are numbered from 1 without gaps: the last LOG_LINES start after this one.
        let mut after = state
            .store
            .last_log_seq(&stream)
            .await?
            .saturating_sub(LOG_LINES as u64);
        let mut lines = Vec::new();
        loop {
            let batch = state.store.read_logs(&stream, after, 1000).await?;
            let Some(last) = batch.last() else { break };
            after = last.seq;
            lines.extend(batch);
        }
        let spec = &run.spec;
        let status = &run.status;
        let pipeline = text(spec, "pipeline");
        let mut body = html::crumbs(
            &[
                ("/", "Organizations"),
                (&format!("/orgs/{org}"), &org),
                (&format!("/orgs/{org}#pipelineruns"), "Pipeline runs"),
            ],
            &name,
        );
        body.push_str(&format!(
            "<h1>Run {} #{}</h1>",
            esc(&pipeline),
            esc(&text(spec, "number"))
        ));
        let mut state_cell = format!(
            "<span id=\"run-phase\">{}</span>",
            esc(&format!("{phase:?}"))
        );
        for extra in ["waiting", "error"] {
            if let Some(w) = status.get(extra).and_then(Value::as_str) {
                state_cell.push_str(&format!("<br><span class=\"muted\">{}</span>", esc(w)));
            }
        }
        let trigger = spec
            .get("trigger")
            .map(|t| text(t, "name"))
            .unwrap_or_else(|| "-".into());
        let rows = vec![
            vec!["Status".into(), state_cell],
            vec!["Event".into(), esc(&text(spec, "event"))],
            vec!["Started by".into(), esc(&text(spec, "startedBy"))],
            vec!["Trigger".into(), esc(&trigger)],
            vec!["Branch".into(), esc(&text(spec, "branch"))],
            vec![
                "Commit".into(),
                format!("<code>{}</code>", esc(&text(status, "commit"))),
            ],
        ];
        body.push_str(&html::table(&["", ""], &rows));
        let live = !phase.is_final();
        body.push_str("<h2>Steps</h2>");
        let steps: Vec<Vec<String>> = status
            .get("steps")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|st| {
                        let duration = st
                            .get("durationMs")
                            .and_then(Value::as_u64)
                            .map(|ms| format!("{:.1}s", ms as f64 / 1000.0))
                            .unwrap_or_else(|| "-".into());
                        let step_phase = text(st, "phase");
                        let mut reason = esc(&text(st, "reason"));
                        if step_phase == "Waiting" && live {
                            let step = text(st, "name");
                            reason.push_str(&format!(
                                "<form method=\"post\" class=\"inline\" action=\"/orgs/{o}/pipelineruns/{n}/approve\">\
                                 <input type=\"hidden\" name=\"step\" value=\"{s}\">\
                                 <button type=\"submit\" class=\"approve\">Approve</button></form>\
                                 <form method=\"post\" class=\"inline\" action=\"/orgs/{o}/pipelineruns/{n}/reject\">\
                                 <input type=\"hidden\" name=\"step\" value=\"{s}\">\
                                 <button type=\"submit\" class=\"reject\">Reject</button></form>",
                                o = esc(&org),
                                n = esc(&name),
                                s = esc(&step),
                            ));
                        }
                        if let Some(by) = st.get("approvedBy").and_then(Value::as_str) {
                            reason.push_str(&format!(" <span class=\"muted\">by {}</span>", esc(by)));
                        }
                        vec![
                            esc(&text(st, "name")),
                            format!(
                                "<span class=\"step {}\">{}</span>",
                                esc(&step_phase.to_lowercase()),
                                esc(&step_phase)
                            ),
                            esc(&text(st, "exitCode")),
                            esc(&text(st, "attempts")),
                            duration,
                            reason,
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        body.push_str(&html::table(
            &["Step", "Phase", "Exit", "Attempts", "Duration", "Reason"],
            &steps,
        ));
        let dir = crate::runners::artifacts_dir(&state.config.data_dir, &org, &name);
        let artifacts = crate::runners::list_artifacts(&dir).await;
        if !artifacts.is_empty() {
            body.push_str("<h2>Artifacts</h2>");
            let rows: Vec<Vec<String>> = artifacts
                .iter()
                .map(|(path, size)| {
                    let href = format!("/api/v1/orgs/{org}/pipelineruns/{name}/artifacts/{path}");
                    vec![
                        format!("<a class=\"artifact\" href=\"{}\">{}</a>", esc(&href), esc(path)),
                        size.to_string(),
                    ]
                })
                .collect();
            body.push_str(&html::table(&["Path", "Bytes"], &rows));
        }
        body.push_str("<p class=\"actions\">");
        if live {
            body.push_str(&format!(
                "<form method=\"post\" class=\"inline\" action=\"/orgs/{o}/pipelineruns/{n}/cancel\">\
                 <button id=\"cancel-run\" type=\"submit\">Cancel</button></form>",
                o = esc(&org),
                n = esc(&name)
            ));
        }
        body.push_str(&format!(
            "<form method=\"post\" class=\"inline\" action=\"/orgs/{o}/pipelineruns/{n}/rerun\">\
             <button id=\"rerun\" type=\"submit\">Rerun</button></form></p>",
            o = esc(&org),
            n = esc(&name)
        ));
        body.push_str(&format!(
            "<h2>Log</h2><p id=\"live-status\" class=\"muted\" data-live=\"{}\">{}</p>",
            if live { "static" } else { "ended" },
            if live {
                "With JavaScript, new lines follow live."
            } else {
                "The run has ended."
            }
        ));
        let src = format!("/api/v1/orgs/{org}/pipelineruns/{name}/logs?follow=true&after={after}");
        body.push_str(&format!(
            "<pre class=\"logs\" id=\"run-logs\" data-src=\"{}\">",
            esc(&src)
        ));
        for l in &lines {
            body.push_str(&format!(
                "<span class=\"line\" data-seq=\"{}\"><span class=\"meta\">[{}]</span> {}\n</span>",
                l.seq,
                esc(&l.source),
                esc(&l.text)
            ));
        }
        body.push_str("</pre>");
        if live {
            body.push_str(RUN_SCRIPT);
        }
        Ok(body)
    }
    .await;
    match result {
        Ok(body) => page(&format!("Run {name}"), Some(&p.user.name), &body).into_response(),
        Err(e) => error_page(Some(&p.user.name), e, &[org_link(&org)]),
    }
}

/// What the run page's buttons post.
#[derive(serde::Deserialize, Default)]
pub struct ActionForm {
    /// The approval step (approve, reject).
    #[serde(default)]
    step: Option<String>,
}

/// Whether a form post comes from this server's own pages: its `Origin` (when the browser sent one) names the
/// host the request was sent to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok()) else {
        return true;
    };
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
    !host.is_empty() && origin_host == host
}

/// `POST /orgs/{org}/pipelineruns/{name}/{approve|reject|cancel|rerun}`: the run page's buttons.
pub async fn run_action(
    State(state): State<AppState>,
    p: MaybePrincipal,
    headers: HeaderMap,
    Path((org, name, action)): Path<(String, String, String)>,
    Form(form): Form<ActionForm>,
) -> Response {
    let p = match require(p) {
        Ok(p) => p,
        Err(r) => return r.into_response(),
    };
    let back = |run: &str| Redirect::to(&format!("/orgs/{org}/pipelineruns/{run}")).into_response();
    if !same_origin(&headers) {
        let e = ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "forbidden",
            "this form was posted from another site",
        );
        return error_page(Some(&p.user.name), e, &[org_link(&org)]);
    }
    let done = match action.as_str() {
        "approve" | "reject" => {
            let req = crate::pipelines::ApproveRequest {
                step: form.step,
                reject: action == "reject",
            };
            crate::pipelines::approve_run(&state, &p, &org, &name, req)
                .await
                .map(|_| name.clone())
        }
        "cancel" => crate::pipelines::cancel(&state, &p, &org, &name)
            .await
            .map(|_| name.clone()),
        "rerun" => crate::pipelines::rerun_run(&state, &p, &org, &name)
            .await
            .map(|r| r.metadata.name),
        other => Err(ApiError::not_found(format!(
            "no run action {other:?}; the actions are approve, reject, cancel and rerun"
        ))),
    };
    match done {
        Ok(run) => back(&run),
        Err(e) => error_page(Some(&p.user.name), e, &[org_link(&org)]),
    }
}

/// Follows a running run's log over Server-Sent Events (the browser resumes from the last line's id after a
/// reconnection); when the run ends, the page reloads once to show the steps' final status.
const RUN_SCRIPT: &str = r#"<script>
(function () {
  var pre = document.getElementById("run-logs"), st = document.getElementById("live-status");
  if (!window.EventSource) return;
  var es = new EventSource(pre.getAttribute("data-src"));
  function span(cls, text) { var s = document.createElement("span"); s.className = cls; s.textContent = text; return s; }
  es.onopen = function () { st.textContent = "Live: new lines appear as the run writes them."; st.setAttribute("data-live", "open"); };
  es.onmessage = function (ev) {
    var l; try { l = JSON.parse(ev.data); } catch (e) { return; }
    var line = span("line", "");
    line.setAttribute("data-seq", l.seq);
    line.appendChild(span("meta", "[" + l.source + "]"));
    line.appendChild(document.createTextNode(" " + l.text + "\n"));
    pre.appendChild(line);
    while (pre.childNodes.length > 5000) pre.removeChild(pre.firstChild);
    window.scrollTo(0, document.body.scrollHeight);
  };
  es.addEventListener("end", function (ev) {
    var end = {}; try { end = JSON.parse(ev.data); } catch (e) {}
    es.close();
    st.textContent = "The run ended: " + (end.phase || "") + (end.error ? " (" + end.error + ")" : "");
    st.setAttribute("data-live", "ended");
    setTimeout(function () { location.reload(); }, 300);
  });
  es.addEventListener("cutoff", function () { st.textContent = "Fell behind; catching up…"; });
  es.addEventListener("error", function () {
    if (st.getAttribute("data-live") !== "ended") { st.textContent = "Disconnected; reconnecting…"; st.setAttribute("data-live", "closed"); }
  });
})();
</script>"#;
