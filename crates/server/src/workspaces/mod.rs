//! Workspaces on the server: admission of Templates and Workspaces ([`admit`]), the built-in provisioner
//! ([`builtin`]) and the API of external ones ([`provisioners`]), the agent hub and user tunnels ([`hub`]), workspace apps through the server ([`apps`]), and
//! build and agent logs.

pub mod admit;
pub mod apps;
pub mod builtin;
pub mod direct;
pub mod hub;
pub mod provisioners;
pub(crate) mod ws;

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{header, Method};
use axum::response::Response;
use futures_util::StreamExt;
use model::{Kind, Resource};
use serde_json::{json, Value};
use store::Key;

use crate::auth::Principal;
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, Verb};
use crate::routes::{Api, Op};
use crate::AppState;

pub use hub::Hub;

/// The key of an organization-scoped object.
pub(crate) fn org_key(kind: Kind, org: &str, name: &str) -> Key {
    Key {
        kind,
        organization: Some(org.to_string()),
        project: None,
        name: name.to_string(),
    }
}

pub fn register(api: Api) -> Api {
    provisioners::register(api)
    .op(
        Op::new(
            Method::GET,
            agent::proto::CONNECT_PATH,
            "agentConnect",
            "workspaces",
            "A workspace agent's tunnel (WebSocket; authenticated with the agent token of its build)",
        )
        .public()
        .returns(101, None),
        hub::agent_connect,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/workspaces/{name}/tunnel",
            "workspaceTunnel",
            "workspaces",
            "A tunnel to a workspace's agent (WebSocket) for port forwarding and SSH; its owner and administrators only",
        )
        .returns(101, None),
        hub::workspace_tunnel,
    )
    .op(
        Op::new(
            Method::GET,
            agent::proto::STREAM_PATH,
            "agentStream",
            "workspaces",
            "An idle direct stream of a workspace's connected agent (`Upgrade: kiln-stream`; authenticated with the agent token of its running build), kept until a user's stream takes it",
        )
        .public()
        .returns(101, None),
        direct::agent_stream,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/workspaces/{name}/stream",
            "workspaceStream",
            "workspaces",
            "A direct stream to `target` (`tcp:<host>:<port>` or `ssh`) in a workspace (`Upgrade: kiln-stream`): one connection carrying one stream's bytes, relayed without framing; its owner and administrators only",
        )
        .returns(101, None),
        direct::workspace_stream,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/workspaces/{name}/apps",
            "workspaceApps",
            "workspaces",
            "A workspace's apps: slug, display name, share level, health and the URL to open each at",
        )
        .returns(200, None),
        apps::list,
    )    .op(
        Op::new(
            Method::GET,
            "/api/v1/apps/auth",
            "appsAuth",
            "workspaces",
            "Signs a browser in to a subdomain workspace app: sends it to sign in to the console if needed, then back to the app URL with an app session",
        )
        .public()
        .query("redirect", "The app URL to return to (on an app host of this server)")
        .returns(303, None),
        apps::app_auth,
    )
    .op(
        Op::new(
            Method::GET,
            "/api/v1/orgs/{org}/workspaces/{name}/logs",
            "workspaceLogs",
            "workspaces",
            "Build and agent logs of a workspace (NDJSON: one line per log line, with its stream, number, time, source and text)",
        )
        .query("build", "The build (default: the latest)")
        .query("follow", "true: keep streaming new lines")
        .returns_type(200, "application/x-ndjson"),
        logs,
    )
}

/// The streams of a build: its job's log, and (for a start) its agent's scripts.
pub(crate) fn streams(org: &str, ws: &str, build: u32) -> [(&'static str, String); 2] {
    [
        (
            "build",
            controllers::jobs::log_stream(org, &controllers::workspace::job_name(ws, build)),
        ),
        ("agent", hub::agent_log_stream(org, ws, build)),
    ]
}

async fn logs(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    let access = rbac::org_access(&state, &principal, &org).await?;
    access.check(
        Verb::Get,
        Kind::Workspace,
        None,
        &format!("workspace {name}"),
    )?;
    let ws: Resource = state
        .store
        .get(&org_key(Kind::Workspace, &org, &name))
        .await?;
    let latest = ws
        .status
        .get("build")
        .and_then(|b| b.get("number"))
        .and_then(Value::as_u64)
        .unwrap_or(0) as u32;
    let build = match q.get("build") {
        None => latest,
        Some(b) => b
            .parse()
            .map_err(|_| ApiError::bad_request(format!("build={b:?}: expected a build number")))?,
    };
    let follow = crate::logs::parse_bool(&q, "follow")?;
    let store = state.store.clone();
    let mut shutdown = state.shutdown.clone();
    let streams = streams(&org, &name, build);
    let body = async_stream(move |tx| async move {
        let mut after = [0u64; 2];
        let mut appends = store.log_appends();
        loop {
            for (i, (label, stream)) in streams.iter().enumerate() {
                loop {
                    let Ok(batch) = store.read_logs(stream, after[i], 1000).await else {
                        return;
                    };
                    if batch.is_empty() {
                        break;
                    }
                    let mut out = Vec::new();
                    for l in batch {
                        after[i] = l.seq;
                        let line = json!({"stream": label, "seq": l.seq, "time": l.time, "source": l.source, "text": l.text});
                        out.extend_from_slice(line.to_string().as_bytes());
                        out.push(b'\n');
                    }
                    if tx.send(Bytes::from(out)).await.is_err() {
                        return;
                    }
                }
            }
            if !follow {
                return;
            }
            tokio::select! {
                _ = appends.recv() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .body(body)
        .map_err(ApiError::internal)
}

/// A streaming body fed by a task through a channel.
pub(crate) fn async_stream<F, Fut>(f: F) -> Body
where
    F: FnOnce(tokio::sync::mpsc::Sender<Bytes>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
    tokio::spawn(f(tx));
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>);
    Body::from_stream(stream)
}
