//! The console's pipeline run page: the run's trigger, branch and commit, each step's status, and its log,
//! followed live (Server-Sent Events, resumed by line number) while the run is going.

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
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
                            esc(&text(st, "reason")),
                        ]
                    })
                    .collect()
            })
            .unwrap_or_default();
        body.push_str(&html::table(
            &["Step", "Phase", "Exit", "Attempts", "Duration", "Reason"],
            &steps,
        ));
        let live = !phase.is_final();
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
