//! Direct streams through the hub (`tunnel_io::direct`): a connection per stream instead of a stream of a
//! session, so the hub relays it with `splice(2)` and never reads its bytes.
//!
//! Each connected agent keeps a few connections open to `GET /api/v1/agent/stream` (authenticated with its
//! token), which wait here, idle, in its [`Pool`]. A user's `GET …/workspaces/{name}/stream?target=…` takes
//! one, writes the target to the agent, and answers `101` only once the agent answered `ok`, so every failure
//! is an HTTP error. When none is idle the hub asks the agent for more and waits a little; an agent that never
//! opened one (an older agent) gets the stream on its session instead, as `…/tunnel` does.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use agent::proto::ToAgent;
use axum::body::Body;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use model::Kind;
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tunnel_io::direct::{self, UPGRADE};

use super::hub::{self, AgentConn};
use super::org_key as key;
use crate::auth::{self, Principal};
use crate::error::{ApiError, ApiResult};
use crate::AppState;

/// The most idle connections kept per agent (the oldest goes first).
const MAX_IDLE: usize = 16;
/// How long a user's stream waits for the agent to open a connection when none is idle.
const WAIT_IDLE: Duration = Duration::from_secs(2);
/// How long the agent may take to answer a target (connecting inside the workspace).
const WAIT_ANSWER: Duration = Duration::from_secs(15);

/// An agent's idle direct streams, and the users' streams waiting for one.
#[derive(Default)]
pub(crate) struct Pool {
    idle: VecDeque<std::net::TcpStream>,
    waiting: VecDeque<oneshot::Sender<std::net::TcpStream>>,
    /// The agent has opened direct streams (an older agent never does).
    seen: bool,
}

impl Pool {
    /// The newest idle connection still open; those found closed on the way are dropped.
    fn take_idle(&mut self) -> Option<std::net::TcpStream> {
        while let Some(conn) = self.idle.pop_back() {
            if usable(&conn) {
                return Some(conn);
            }
        }
        None
    }
}

fn lock(pool: &Mutex<Pool>) -> std::sync::MutexGuard<'_, Pool> {
    pool.lock().unwrap_or_else(|p| p.into_inner())
}

/// Adds an agent's connection: to the first user waiting, else to the idle ones (dropping those the agent
/// has closed meanwhile, as it does with one idle for long).
fn put(pool: &Mutex<Pool>, mut conn: std::net::TcpStream) {
    let mut p = lock(pool);
    p.seen = true;
    p.idle.retain(usable);
    while let Some(waiter) = p.waiting.pop_front() {
        match waiter.send(conn) {
            Ok(()) => return,
            Err(back) => conn = back,
        }
    }
    p.idle.push_back(conn);
    if p.idle.len() > MAX_IDLE {
        p.idle.pop_front();
    }
}

/// Whether an idle connection is still open: the agent sends nothing on one until it gets a target, so
/// anything readable (its end, or bytes) means it is not usable.
fn usable(conn: &std::net::TcpStream) -> bool {
    matches!(conn.peek(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// An idle connection of the agent's, waiting for one (and asking the agent for it) when none is; `None`
/// when the agent does not open direct streams or none came in time.
async fn take(agent: &AgentConn) -> Option<TcpStream> {
    let rx = {
        let mut p = lock(&agent.direct);
        if let Some(conn) = p.take_idle() {
            return TcpStream::from_std(conn).ok();
        }
        if !p.seen {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        p.waiting.retain(|w| !w.is_closed());
        p.waiting.push_back(tx);
        rx
    };
    if let Ok(msg) = serde_json::to_vec(&ToAgent::Dial { count: 1 }) {
        let _ = agent.session.send_message(Bytes::from(msg));
    }
    let conn = tokio::time::timeout(WAIT_IDLE, rx).await.ok()?.ok()?;
    TcpStream::from_std(conn).ok()
}

/// Hands `target` to one of the agent's direct streams and waits for its answer: the stream once the agent
/// said `ok`, `None` when no direct stream can be had (the session's then), the agent's reason when it
/// refused. A stream that breaks before answering (its agent went away without a word) makes way for the
/// next one.
async fn ask(agent: &AgentConn, target: &str) -> Result<Option<TcpStream>, String> {
    for _ in 0..3 {
        // Set up (keepalive) when the agent opened it.
        let Some(mut conn) = take(agent).await else {
            return Ok(None);
        };
        let answer = async {
            direct::write_line(&mut conn, target).await?;
            direct::read_line(&mut conn).await
        };
        match tokio::time::timeout(WAIT_ANSWER, answer).await {
            Ok(Ok(line)) if line == "ok" => return Ok(Some(conn)),
            Ok(Ok(line)) => return Err(line.strip_prefix("error ").unwrap_or(&line).to_string()),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "an idle direct stream broke; taking another")
            }
            Err(_) => {
                return Err(format!(
                    "the agent did not answer within {} s",
                    WAIT_ANSWER.as_secs()
                ))
            }
        }
    }
    Ok(None)
}

/// A request to switch to a direct stream: `Connection: Upgrade` and `Upgrade: kiln-stream`.
pub(crate) struct DirectUpgrade(OnUpgrade);

impl<S: Send + Sync> FromRequestParts<S> for DirectUpgrade {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let asked = parts
            .headers
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case(UPGRADE));
        if !asked {
            return Err(ApiError::bad_request(format!(
                "this endpoint takes `Connection: Upgrade` with `Upgrade: {UPGRADE}` (a direct stream)"
            )));
        }
        parts
            .extensions
            .remove::<OnUpgrade>()
            .map(DirectUpgrade)
            .ok_or_else(|| ApiError::bad_request("this connection cannot switch protocols"))
    }
}

fn switching() -> Response {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, UPGRADE)
        .body(Body::empty())
        .unwrap_or_default()
}

/// `GET /api/v1/agent/stream`: an agent's idle direct stream, authenticated with its token; kept until a
/// user's stream takes it.
pub(crate) async fn agent_stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<DirectUpgrade, ApiError>,
) -> ApiResult<Response> {
    let agent = auth::bearer_token(&headers)
        .and_then(|t| state.hub.agent_by_token(t))
        .ok_or_else(|| {
            ApiError::unauthorized("direct streams are for the connected agent of a workspace, with the token of its running build")
        })?;
    let DirectUpgrade(upgrade) = upgrade?;
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        // An idle connection waits outside any runtime, so whichever thread serves the user takes it.
        match crate::listen::into_tcp(upgraded) {
            Ok((conn, early)) if early.is_empty() => {
                direct::prepare(&conn);
                if let Ok(conn) = conn.into_std() {
                    put(&agent.direct, conn);
                }
            }
            _ => tracing::debug!("dropping a direct stream that is not a plain TCP connection"),
        }
    });
    Ok(switching())
}

/// The workspace end of a user's stream.
enum There {
    /// An agent's direct stream.
    Direct(TcpStream),
    /// A stream of the agent's session.
    Session(tunnel_io::TunnelStream),
}

/// `GET /api/v1/orgs/{org}/workspaces/{name}/stream?target=…`: a user's direct stream to `tcp:<host>:<port>`
/// or `ssh` in a workspace; its owner and administrators only.
pub(crate) async fn workspace_stream(
    State(state): State<AppState>,
    principal: Principal,
    Path((org, name)): Path<(String, String)>,
    Query(query): Query<HashMap<String, String>>,
    upgrade: Result<DirectUpgrade, ApiError>,
) -> ApiResult<Response> {
    let ws = state.store.get(&key(Kind::Workspace, &org, &name)).await?;
    hub::may_connect(&state, &principal, &org, &ws).await?;
    let target = query.get("target").map(String::as_str).unwrap_or_default();
    agent::proto::Target::parse(target)
        .map_err(|why| ApiError::bad_request(format!("target: {why}")))?;
    if target.len() >= direct::MAX_LINE {
        return Err(ApiError::bad_request(format!(
            "target: longer than {} bytes",
            direct::MAX_LINE - 1
        )));
    }
    let DirectUpgrade(upgrade) = upgrade?;
    let agent = state
        .hub
        .agent_conn(&org, &name)
        .ok_or_else(|| hub::not_connected(&ws))?;
    state.hub.touch(&state, &org, &name);
    let refused = |why: String| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "stream-refused",
            format!("workspace {name}: {why}"),
        )
    };
    let there = match ask(&agent, target).await {
        Ok(Some(conn)) => There::Direct(conn),
        Ok(None) => There::Session(
            agent
                .session
                .open(target)
                .await
                .map_err(|e| refused(e.to_string()))?,
        ),
        Err(why) => return Err(refused(why)),
    };
    let counter = match there {
        There::Direct(_) => &state.metrics.workspace_streams_direct,
        There::Session(_) => &state.metrics.workspace_streams_session,
    };
    counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else {
            return;
        };
        match (crate::listen::into_tcp(upgraded), there) {
            (Ok((mut here, early)), There::Direct(mut conn)) => {
                direct::prepare(&here);
                if conn.write_all(&early).await.is_ok() {
                    let relay = direct::relay_tcp(&mut here, &mut conn);
                    let _ = hub::active(&state, &org, &name, relay).await;
                }
            }
            (here, there) => {
                let (mut here, early_here): (Box<dyn Io>, Vec<u8>) = match here {
                    Ok((tcp, early)) => (Box::new(tcp), early),
                    Err(upgraded) => (Box::new(TokioIo::new(upgraded)), Vec::new()),
                };
                let mut there: Box<dyn Io> = match there {
                    There::Direct(conn) => Box::new(conn),
                    There::Session(stream) => Box::new(stream),
                };
                if there.write_all(&early_here).await.is_ok() {
                    hub::relay(&state, &org, &name, &mut here, &mut there).await;
                }
            }
        }
    });
    Ok(switching())
}

/// Either end of a relayed connection.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_goes_to_the_first_user_waiting_and_dead_idle_ones_are_skipped() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let pool = Mutex::new(Pool::default());
        // An idle connection whose agent end closed, then a live one.
        let dead = std::net::TcpStream::connect(addr).unwrap();
        drop(l.accept().unwrap().0);
        let live = std::net::TcpStream::connect(addr).unwrap();
        let (_agent_end, _) = l.accept().unwrap();
        for c in [&dead, &live] {
            c.set_nonblocking(true).unwrap();
        }
        let live_port = live.local_addr().unwrap().port();
        std::thread::sleep(Duration::from_millis(50));
        put(&pool, dead);
        put(&pool, live);
        assert!(lock(&pool).seen);
        let got = lock(&pool).take_idle().unwrap();
        assert_eq!(got.local_addr().unwrap().port(), live_port);
        assert!(
            lock(&pool).take_idle().is_none(),
            "the closed one is not handed out"
        );
        assert!(lock(&pool).idle.is_empty(), "and it is gone");
        let (tx, rx) = oneshot::channel();
        lock(&pool).waiting.push_back(tx);
        let third = std::net::TcpStream::connect(addr).unwrap();
        let port = third.local_addr().unwrap().port();
        put(&pool, third);
        assert_eq!(rx.await.unwrap().local_addr().unwrap().port(), port);
        assert!(lock(&pool).idle.is_empty());
    }
}
