//! The agent hub: agents dial `/api/v1/agent/connect` with their build's token and keep a tunnel session
//! open; users reach a workspace through `/api/v1/orgs/{org}/workspaces/{name}/tunnel`, a tunnel session of
//! their own whose streams the hub relays to streams it opens on the agent's session.
//!
//! The hub writes the agent's part of the workspace status (`status.agent`: connected or not, lifecycle,
//! version, metadata values, app health) at most once a second (a lifecycle change at once), and `status.lastActivity` (what the ttl
//! counts from) at most once a minute while streams are opened. An agent's session belongs to the server it
//! dialed: a user tunnel reaches it only through that server.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::proto::{FromAgent, Lifecycle, Manifest, ToAgent};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use controllers::workspace::job_name;
use jiff::Timestamp;
use model::kinds::{TemplateVersionSpec, WorkspaceSpec};
use model::{Kind, Resource};
use serde_json::{json, Map, Value};
use store::{LogLine, StoreError};
use tunnel_io::{Event, Session};

use super::org_key as key;
use super::ws::{AxumWs, MAX_MESSAGE};
use crate::auth::{self, Principal};
use crate::error::{ApiError, ApiResult};
use crate::rbac::{self, Verb};
use crate::AppState;

/// How often the agent's status is written while it changes.
const STATUS_FLUSH: Duration = Duration::from_secs(1);
/// How often activity moves `status.lastActivity`.
const ACTIVITY_FLUSH: Duration = Duration::from_secs(60);

/// The agent log stream of a workspace build.
pub fn agent_log_stream(org: &str, workspace: &str, build: u32) -> String {
    format!("agent/{org}/{workspace}/{build}")
}

type WsId = (String, String);

/// The connected agents of this server.
#[derive(Default)]
pub struct Hub {
    agents: Mutex<HashMap<WsId, AgentConn>>,
    activity: Mutex<HashMap<WsId, Instant>>,
    next_id: AtomicU64,
    /// What the app path looks up (see [`super::apps`]).
    pub(crate) apps: super::apps::AppCache,
}

#[derive(Clone)]
pub(crate) struct AgentConn {
    id: u64,
    pub(crate) session: Session,
    /// The build it belongs to, and the hash of its token: what its direct streams authenticate with.
    build: u32,
    token_hash: String,
    /// Its idle direct streams.
    pub(crate) direct: Arc<Mutex<super::direct::Pool>>,
}

impl Hub {
    /// The session of a workspace's connected agent.
    pub fn agent(&self, org: &str, workspace: &str) -> Option<Session> {
        self.agent_conn(org, workspace).map(|c| c.session)
    }

    /// A workspace's connected agent.
    pub(crate) fn agent_conn(&self, org: &str, workspace: &str) -> Option<AgentConn> {
        let agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents
            .get(&(org.to_string(), workspace.to_string()))
            .filter(|c| c.session.ended().is_none())
            .cloned()
    }

    /// The connected agent an agent token belongs to, if it is that agent's (its build and secret).
    pub(crate) fn agent_by_token(&self, token: &str) -> Option<AgentConn> {
        let (org, ws, build, secret) = parse_token(token)?;
        let conn = self.agent_conn(&org, &ws)?;
        let given = auth::hash_secret(&secret);
        let same = conn.build == build
            && bool::from(subtle::ConstantTimeEq::ct_eq(
                conn.token_hash.as_bytes(),
                given.as_bytes(),
            ));
        same.then_some(conn)
    }

    /// Whether activity of a workspace should be written now (at most once per [`ACTIVITY_FLUSH`]).
    fn activity_due(&self, id: &WsId) -> bool {
        let mut a = self.activity.lock().unwrap_or_else(|p| p.into_inner());
        match a.get(id) {
            Some(at) if at.elapsed() < ACTIVITY_FLUSH => false,
            _ => {
                a.insert(id.clone(), Instant::now());
                true
            }
        }
    }

    /// Records activity on a workspace (a stream opened, an app request, an open connection): moves
    /// `status.lastActivity`, which its ttl counts from, at most once per [`ACTIVITY_FLUSH`].
    pub fn touch(&self, state: &AppState, org: &str, ws: &str) {
        if !self.activity_due(&(org.to_string(), ws.to_string())) {
            return;
        }
        let (state, org, ws) = (state.clone(), org.to_string(), ws.to_string());
        tokio::spawn(async move {
            let now = Timestamp::now().to_string();
            update_status(&state, &org, &ws, |s| {
                s.insert("lastActivity".into(), json!(now));
            })
            .await;
        });
    }
}

/// Copies between `a` and `b` until both directions end, recording activity on the workspace while the
/// connection lasts (an hour-long SSH session keeps its workspace up, not only its first minute).
pub(crate) async fn relay<A, B>(state: &AppState, org: &str, ws: &str, a: &mut A, b: &mut B)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    let _ = active(state, org, ws, tunnel_io::relay(a, b)).await;
}

/// Runs `work` (a connection to the workspace), recording activity on the workspace until it ends.
pub(crate) async fn active<F: std::future::Future>(
    state: &AppState,
    org: &str,
    ws: &str,
    work: F,
) -> F::Output {
    tokio::pin!(work);
    let mut tick = tokio::time::interval(ACTIVITY_FLUSH);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tick.tick() => state.hub.touch(state, org, ws),
        }
    }
}

/// An agent token: `<org>.<workspace>.<build>.<secret>`. Only the secret's hash is stored (on the build's job).
pub fn agent_token(org: &str, workspace: &str, build: u32, secret: &str) -> String {
    format!("{org}.{workspace}.{build}.{secret}")
}

fn parse_token(token: &str) -> Option<(String, String, u32, String)> {
    let mut parts = token.splitn(4, '.');
    let org = parts.next()?.to_string();
    let ws = parts.next()?.to_string();
    let build = parts.next()?.parse().ok()?;
    let secret = parts.next()?.to_string();
    Some((org, ws, build, secret))
}

fn unauthorized() -> ApiError {
    ApiError::unauthorized("invalid agent token: an agent authenticates with the token its build gave it (KILN_AGENT_TOKEN)")
}

fn not_websocket(e: WebSocketUpgradeRejection) -> ApiError {
    ApiError::bad_request(format!(
        "this endpoint takes a WebSocket upgrade (the tunnel protocol): {e}"
    ))
}

/// `GET /api/v1/agent/connect`: an agent's WebSocket.
pub async fn agent_connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let token = auth::bearer_token(&headers).ok_or_else(unauthorized)?;
    let (org, ws, build, secret) = parse_token(token).ok_or_else(unauthorized)?;
    let job = match state
        .store
        .get(&key(Kind::ProvisionerJob, &org, &job_name(&ws, build)))
        .await
    {
        Ok(j) => j,
        Err(StoreError::NotFound(_)) => return Err(unauthorized()),
        Err(e) => return Err(e.into()),
    };
    let stored = job
        .status
        .get("agentTokenHash")
        .and_then(Value::as_str)
        .unwrap_or("");
    let given = auth::hash_secret(&secret);
    if stored.is_empty()
        || !bool::from(subtle::ConstantTimeEq::ct_eq(
            stored.as_bytes(),
            given.as_bytes(),
        ))
    {
        return Err(unauthorized());
    }
    let workspace = match state.store.get(&key(Kind::Workspace, &org, &ws)).await {
        Ok(w) => w,
        Err(StoreError::NotFound(_)) => return Err(unauthorized()),
        Err(e) => return Err(e.into()),
    };
    let current = workspace.status.get("build");
    let current_start = current
        .and_then(|b| b.get("number"))
        .and_then(Value::as_u64)
        == Some(u64::from(build))
        && current
            .and_then(|b| b.get("transition"))
            .and_then(Value::as_str)
            == Some("start");
    if !current_start || workspace.metadata.deletion_timestamp.is_some() {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "stale-agent",
            format!("build {build} of workspace {ws} is no longer its running build; this agent should stop"),
        ));
    }
    let manifest = manifest(&state, &workspace, &job, build).await?;
    let upgrade = upgrade.map_err(not_websocket)?;
    let id = state.hub.next_id.fetch_add(1, Ordering::Relaxed);
    let token_hash = stored.to_string();
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            run_agent(state, AxumWs(socket), org, ws, id, token_hash, manifest).await;
        })
        .into_response())
}

async fn manifest(
    state: &AppState,
    workspace: &Resource,
    job: &Resource,
    build: u32,
) -> ApiResult<Manifest> {
    let org = workspace.metadata.organization.clone().unwrap_or_default();
    let spec: WorkspaceSpec = model::typed_spec(workspace)
        .map_err(|e| ApiError::invalid("", model::Invalid { errors: vec![e] }))?;
    let version = job
        .spec
        .get("templateVersion")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let tv = state
        .store
        .get(&key(Kind::TemplateVersion, &org, version))
        .await?;
    let tv: TemplateVersionSpec = model::typed_spec(&tv)
        .map_err(|e| ApiError::invalid("", model::Invalid { errors: vec![e] }))?;
    let mut env = BTreeMap::new();
    env.insert(
        "KILN_WORKSPACE_NAME".to_string(),
        workspace.metadata.name.clone(),
    );
    env.insert("KILN_WORKSPACE_OWNER".to_string(), spec.owner.clone());
    env.insert("KILN_ORGANIZATION".to_string(), org.clone());
    for (k, v) in &spec.parameters {
        env.insert(format!("KILN_PARAM_{}", k.to_ascii_uppercase()), v.clone());
    }
    Ok(Manifest {
        organization: org,
        workspace: workspace.metadata.name.clone(),
        owner: spec.owner,
        build,
        agent: tv.snapshot.agent,
        env,
    })
}

/// What the hub knows of an agent, as written to `status.agent`.
struct View {
    fields: Map<String, Value>,
    metadata: Map<String, Value>,
    dirty: bool,
}

async fn run_agent(
    state: AppState,
    socket: AxumWs,
    org: String,
    ws: String,
    id: u64,
    token_hash: String,
    manifest: Manifest,
) {
    let config = tunnel_io::Config::new(format!("kiln-server {}", env!("CARGO_PKG_VERSION")));
    let (session, mut events) = match tunnel_io::accept(socket, config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(org, workspace = ws, error = %e, "agent tunnel handshake failed");
            return;
        }
    };
    let wsid = (org.clone(), ws.clone());
    let previous = {
        let mut agents = state.hub.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.insert(
            wsid.clone(),
            AgentConn {
                id,
                session: session.clone(),
                build: manifest.build,
                token_hash,
                direct: Arc::default(),
            },
        )
    };
    if let Some(p) = previous {
        p.session
            .close("another connection of this workspace's agent replaced this one");
    }
    let build = manifest.build;
    if let Ok(m) = serde_json::to_vec(&ToAgent::Manifest(Box::new(manifest))) {
        let _ = session.send_message(Bytes::from(m));
    }
    let mut view = View {
        fields: Map::new(),
        metadata: Map::new(),
        dirty: true,
    };
    view.fields.insert("status".into(), json!("connected"));
    view.fields.insert("build".into(), json!(build));
    view.fields
        .insert("connectedAt".into(), json!(Timestamp::now().to_string()));
    view.fields
        .insert("lifecycle".into(), json!(Lifecycle::Created));
    let stream = agent_log_stream(&org, &ws, build);
    let mut flush = tokio::time::interval(STATUS_FLUSH);
    loop {
        tokio::select! {
            ev = events.recv() => match ev {
                None => break,
                Some(Event::Stream(incoming)) => incoming.refuse("the server does not serve streams to agents"),
                Some(Event::Message(bytes)) => match serde_json::from_slice::<FromAgent>(&bytes) {
                    Ok(msg) => {
                        // A lifecycle change is written at once (users wait for `ready`); the rest of the
                        // status at most once per flush.
                        let before = view.fields.get("lifecycle").cloned();
                        on_message(&state, &stream, &mut view, msg).await;
                        if view.dirty && view.fields.get("lifecycle") != before.as_ref() {
                            view.dirty = !write_agent_status(&state, &org, &ws, &view).await;
                        }
                    }
                    Err(e) => tracing::warn!(org, workspace = ws, error = %e, "ignoring a malformed agent message"),
                },
            },
            _ = flush.tick() => {
                if view.dirty {
                    view.dirty = !write_agent_status(&state, &org, &ws, &view).await;
                }
            }
        }
    }
    let reason = session.closed().await;
    let still_current = {
        let mut agents = state.hub.agents.lock().unwrap_or_else(|p| p.into_inner());
        let current = agents.get(&wsid).is_some_and(|c| c.id == id);
        if current {
            agents.remove(&wsid);
        }
        current
    };
    if still_current {
        tracing::info!(org, workspace = ws, reason, "agent disconnected");
        view.fields.insert("status".into(), json!("disconnected"));
        view.fields
            .insert("disconnectedAt".into(), json!(Timestamp::now().to_string()));
        view.fields.insert("disconnectReason".into(), json!(reason));
        for _ in 0..5 {
            if write_agent_status(&state, &org, &ws, &view).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

async fn on_message(state: &AppState, stream: &str, view: &mut View, msg: FromAgent) {
    match msg {
        FromAgent::Lifecycle {
            state: l,
            version,
            detail,
        } => {
            view.fields.insert("lifecycle".into(), json!(l));
            view.fields.insert("version".into(), json!(version));
            match detail {
                Some(d) => view.fields.insert("detail".into(), json!(d)),
                None => view.fields.remove("detail"),
            };
            if l == Lifecycle::Ready {
                view.fields
                    .insert("readyAt".into(), json!(Timestamp::now().to_string()));
            }
            view.dirty = true;
        }
        FromAgent::Logs { source, lines } => {
            let lines = lines
                .into_iter()
                .map(|t| LogLine::now(source.clone(), t))
                .collect();
            if let Err(e) = state.store.append_logs(stream, lines).await {
                tracing::warn!(stream, error = %e, "cannot store agent logs");
            }
        }
        FromAgent::Metadata { key, value, error } => {
            let entry = json!({"value": value, "error": error, "collectedAt": Timestamp::now().to_string()});
            if view.metadata.get(&key).and_then(|m| m.get("value")) != entry.get("value")
                || view.metadata.get(&key).and_then(|m| m.get("error")) != entry.get("error")
            {
                view.dirty = true;
            }
            view.metadata.insert(key, entry);
        }
        FromAgent::Apps { health } => {
            view.fields.insert("apps".into(), json!(health));
            view.dirty = true;
        }
    }
}

/// Writes `status.agent` from the view; false when the write failed (it is tried again).
async fn write_agent_status(state: &AppState, org: &str, ws: &str, view: &View) -> bool {
    let mut agent = view.fields.clone();
    if !view.metadata.is_empty() {
        agent.insert("metadata".into(), Value::Object(view.metadata.clone()));
    }
    update_status(state, org, ws, |status| {
        status.insert("agent".into(), Value::Object(agent.clone()));
    })
    .await
}

/// Applies `change` to a workspace's status, re-reading on conflicts.
async fn update_status(
    state: &AppState,
    org: &str,
    ws: &str,
    change: impl Fn(&mut Map<String, Value>),
) -> bool {
    let k = key(Kind::Workspace, org, ws);
    for _ in 0..5 {
        let current = match state.store.get(&k).await {
            Ok(c) => c,
            Err(_) => return false,
        };
        let mut status = current.status.as_object().cloned().unwrap_or_default();
        change(&mut status);
        if Value::Object(status.clone()) == current.status {
            return true;
        }
        let rv = current.metadata.resource_version.as_deref();
        match state
            .store
            .update_status(&k, Value::Object(status), rv)
            .await
        {
            Ok(_) => return true,
            Err(StoreError::Conflict { .. }) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// Whether the caller may connect to a workspace: its owner, or an administrator of its organization.
pub(crate) async fn may_connect(
    state: &AppState,
    principal: &Principal,
    org: &str,
    ws: &Resource,
) -> ApiResult<()> {
    let access = rbac::org_access(state, principal, org).await?;
    access.check(
        Verb::Get,
        Kind::Workspace,
        None,
        &format!("workspace {}", ws.metadata.name),
    )?;
    let owner = ws
        .spec
        .get("owner")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if owner == principal.user.name || is_admin(state, principal, org).await {
        return Ok(());
    }
    Err(ApiError::forbidden(format!(
        "workspace {} belongs to {owner}; only its owner and administrators connect to it",
        ws.metadata.name
    )))
}

/// Whether the caller administers the workspaces of an organization (may create templates there), or is a
/// superuser.
pub(crate) async fn is_admin(state: &AppState, principal: &Principal, org: &str) -> bool {
    principal.user.superuser
        || rbac::org_access(state, principal, org)
            .await
            .is_ok_and(|a| a.allows(Verb::Create, Kind::Template, None))
}

/// The answer when a workspace's agent is not connected to this server.
pub(crate) fn not_connected(ws: &Resource) -> ApiError {
    let name = &ws.metadata.name;
    let phase = ws
        .status
        .get("phase")
        .and_then(Value::as_str)
        .unwrap_or("pending");
    ApiError::new(
        axum::http::StatusCode::CONFLICT,
        "agent-not-connected",
        format!("the agent of workspace {name} is not connected to this server (the workspace is {phase}); start it with `kiln workspace start {name}`"),
    )
}

/// `GET /api/v1/orgs/{org}/workspaces/{name}/tunnel`: a user's WebSocket to a workspace (port forwarding,
/// SSH). Each stream the user opens (`tcp:<host>:<port>`, `ssh`) is opened on the agent's session and relayed.
pub async fn workspace_tunnel(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let ws = state.store.get(&key(Kind::Workspace, &org, &name)).await?;
    may_connect(&state, &principal, &org, &ws).await?;
    let upgrade = upgrade.map_err(not_websocket)?;
    let agent = state
        .hub
        .agent(&org, &name)
        .ok_or_else(|| not_connected(&ws))?;
    Ok(upgrade
        .max_message_size(MAX_MESSAGE)
        .on_upgrade(move |socket| async move {
            let config =
                tunnel_io::Config::new(format!("kiln-server {}", env!("CARGO_PKG_VERSION")));
            let Ok((session, mut events)) = tunnel_io::accept(AxumWs(socket), config).await else {
                return;
            };
            loop {
                tokio::select! {
                    ev = events.recv() => match ev {
                        None => break,
                        Some(Event::Message(_)) => {}
                        Some(Event::Stream(incoming)) => {
                            let target = incoming.target().to_string();
                            if let Err(why) = agent::proto::Target::parse(&target) {
                                incoming.refuse(&why);
                                continue;
                            }
                            state.hub.touch(&state, &org, &name);
                            let agent = agent.clone();
                            let (state, org, name) = (state.clone(), org.clone(), name.clone());
                            tokio::spawn(async move {
                                match agent.open(&target).await {
                                    Ok(mut there) => {
                                        if let Ok(mut here) = incoming.accept() {
                                            relay(&state, &org, &name, &mut here, &mut there).await;
                                        }
                                    }
                                    Err(e) => incoming.refuse(&e.to_string()),
                                }
                            });
                        }
                    },
                    reason = agent.closed() => {
                        session.close(format!("the workspace's agent disconnected: {reason}"));
                        break;
                    }
                }
            }
        })
        .into_response())
}

/// The agent token for a claimed start build, its hash recorded on the job.
pub fn new_agent_secret() -> (String, String) {
    let secret = auth::new_secret();
    let hash = auth::hash_secret(&secret);
    (secret, hash)
}
