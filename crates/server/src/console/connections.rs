//! The console's page of connected laptops: who is connected to which environment from which device, what
//! each serves (component, endpoint, the header that routes to it) and consumes, kept live by the API's
//! Server-Sent Events (`/api/v1/orgs/{org}/connections?watch=true`).

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use model::Kind;

use super::html::{self, esc, page};
use super::{error_page, org_link, require};
use crate::auth::MaybePrincipal;
use crate::connections::ConnInfo;
use crate::error::ApiError;
use crate::rbac::{self, Verb};
use crate::AppState;

const HEADERS: [&str; 6] = [
    "Environment",
    "User",
    "Device",
    "Since",
    "Serves",
    "Consumes",
];

/// One connection's cells (escaped); the page's script renders live rows the same way.
fn row(c: &ConnInfo) -> Vec<String> {
    let serves: Vec<String> = c
        .serves
        .iter()
        .map(|s| {
            let how = match &s.header {
                Some(h) => h.to_string(),
                None => "every request".into(),
            };
            esc(&format!(
                "{}/{} → :{} ({how})",
                s.component, s.endpoint, s.port
            ))
        })
        .collect();
    let consumes: Vec<String> = c
        .consumes
        .iter()
        .map(|(k, v)| esc(&format!("{k} ({} open, {} total)", v.open, v.total)))
        .collect();
    let or_dash = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join("<br>")
        }
    };
    vec![
        esc(&format!("{}/{}", c.project, c.environment)),
        esc(&c.user),
        esc(&c.device),
        esc(&c.connected_at),
        or_dash(serves),
        or_dash(consumes),
    ]
}

pub(super) async fn page_handler(
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
        let items: Vec<ConnInfo> = state
            .connections
            .list()
            .into_iter()
            .filter(|c| {
                c.organization == org && acc.allows(Verb::Get, Kind::Component, Some(&c.project))
            })
            .collect();
        let mut body = html::crumbs(
            &[("/", "Organizations"), (&format!("/orgs/{org}"), &org)],
            "Connected laptops",
        );
        body.push_str(&format!("<h1>Laptops connected to {}</h1>", esc(&org)));
        body.push_str(&html::org_tabs(&org, "connections"));
        body.push_str(
            "<p class=\"muted\">A laptop joins an environment with <code>kiln connect PROJECT/ENV</code>; \
             <code>kiln serve COMPONENT --port P</code> routes the requests that carry its header to it.</p>",
        );
        let rows: Vec<Vec<String>> = items.iter().map(row).collect();
        body.push_str(&format!(
            "<div id=\"connections\" data-src=\"/api/v1/orgs/{}/connections?watch=true\">{}</div>\
             <p id=\"live-status\" class=\"muted\">Connecting to live updates…</p>",
            esc(&org),
            html::table(&HEADERS, &rows)
        ));
        body.push_str(SCRIPT);
        Ok(body)
    }
    .await;
    match result {
        Ok(body) => page(
            &format!("Laptops connected to {org}"),
            Some(&p.user.name),
            &body,
        )
        .into_response(),
        Err(e) => error_page(Some(&p.user.name), e, &[org_link(&org)]),
    }
}

/// Re-renders the table from each `connections` event.
const SCRIPT: &str = r#"<script>
(function () {
  var box = document.getElementById("connections"), st = document.getElementById("live-status");
  if (!window.EventSource) return;
  var es = new EventSource(box.getAttribute("data-src"));
  var heads = ["Environment", "User", "Device", "Since", "Serves", "Consumes"];
  function cell(tr, lines) {
    var td = document.createElement("td");
    if (!lines.length) lines = ["-"];
    lines.forEach(function (l, i) { if (i) td.appendChild(document.createElement("br")); td.appendChild(document.createTextNode(l)); });
    tr.appendChild(td);
  }
  es.onopen = function () { st.textContent = "Live: changes appear as laptops connect, serve and leave."; st.setAttribute("data-live", "open"); };
  es.addEventListener("connections", function (ev) {
    var d; try { d = JSON.parse(ev.data); } catch (e) { return; }
    var items = d.items || [];
    box.textContent = "";
    if (!items.length) { var p = document.createElement("p"); p.className = "empty"; p.textContent = "None yet."; box.appendChild(p); return; }
    var t = document.createElement("table"), head = document.createElement("thead"), body = document.createElement("tbody"), hr = document.createElement("tr");
    heads.forEach(function (h) { var th = document.createElement("th"); th.textContent = h; hr.appendChild(th); });
    head.appendChild(hr); t.appendChild(head); t.appendChild(body);
    items.forEach(function (c) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-user", c.user);
      cell(tr, [c.project + "/" + c.environment]); cell(tr, [c.user]); cell(tr, [c.device]); cell(tr, [c.connectedAt]);
      cell(tr, (c.serves || []).map(function (s) {
        return s.component + "/" + s.endpoint + " \u2192 :" + s.port + " (" + (s.header ? s.header.name + ": " + s.header.value : "every request") + ")";
      }));
      cell(tr, Object.keys(c.consumes || {}).map(function (k) { var v = c.consumes[k]; return k + " (" + v.open + " open, " + v.total + " total)"; }));
      body.appendChild(tr);
    });
    box.appendChild(t);
  });
  es.onerror = function () { st.textContent = "Disconnected; reconnecting…"; st.setAttribute("data-live", "closed"); };
})();
</script>"#;
