//! The gateway's forwarding path: HTTP/1.1 requests to a public endpoint, forwarded byte for byte over pooled
//! backend connections (a pool part per listener thread, see [`set_shard`]), in the client connection's own
//! task, with few allocations per request (the forwarded head's buffer is reused; the route lookup makes the
//! backend path).
//!
//! Every connection the server accepts starts here. [`serve`] reads a request head; when it is an ordinary
//! HTTP/1.1 request (see [`h1::parse_request`]) for a route with ready replicas, it rewrites the head (backend
//! path, hop-by-hop headers out, `X-Forwarded-*` in), sends it with the body, and passes the response back,
//! bodies in their transfer coding. Anything else (an API or console request, a WebSocket upgrade, a chunked
//! request body, a gateway URL that answers with an error page) is handed to the general HTTP server with the
//! bytes read so far, and that server keeps the connection from then on ([`super::handle`] serves gateway
//! requests there). So this path decides nothing the general one would decide differently; it only does the
//! common case with fewer steps.
//!
//! Backend failures before the response has begun get the same 502 pages as the general path: a connection
//! that cannot be made moves on to one other ready replica; a pooled connection the backend had closed is
//! replaced by a fresh one when the request can be sent again (its body was read whole with the head).

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use bytes::{Buf as _, BytesMut};
use h1::{Framing, Parse, EMPTY_HEADER, MAX_HEADERS};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::{
    connect_error, connect_failed, exchange_failed, page_text, resolve, target_of, upstream_error,
    Route, CONNECT_TIMEOUT, MAX_IDLE_PER_BACKEND,
};
use crate::auth::SESSION_COOKIE;
use crate::AppState;

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// How a connection left the forwarding path.
pub(crate) enum Outcome {
    /// It is closed (or done with): nothing more to serve.
    Closed,
    /// The general HTTP server takes it over; these bytes were read from it and not yet served.
    Handoff(BytesMut),
}

/// What the head at the start of the client's buffer asks for.
enum Prepared {
    Partial,
    Handoff,
    Forward(Plan),
}

/// A request ready to go: its forwarded head (and the body bytes that came with it) are in the output buffer.
struct Plan {
    route: Arc<Route>,
    /// Bytes of the client's buffer the request took (head and the body bytes read with it).
    consumed: usize,
    /// Body bytes still to read from the client.
    body_left: u64,
    /// A HEAD request (its response has no body).
    head: bool,
    /// The client asked to close after this exchange.
    close: bool,
    /// The client prefers HTML error pages.
    html: bool,
}

/// Serves `client` until it closes, the server stops, or a request needs the general server.
pub(crate) async fn serve(
    state: &AppState,
    client: &mut TcpStream,
    peer: SocketAddr,
    stop: &mut watch::Receiver<bool>,
    header_timeout: Duration,
) -> Outcome {
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut out = Vec::with_capacity(1024);
    let ip = peer.ip().to_string();
    let mut deadline = pin!(tokio::time::sleep(header_timeout));
    loop {
        if *stop.borrow() {
            return Outcome::Closed;
        }
        // A whole head, or the reason to stop.
        deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + header_timeout);
        let plan = loop {
            out.clear();
            match prepare(state, &buf, &ip, &mut out) {
                Prepared::Forward(plan) => break plan,
                Prepared::Handoff => return Outcome::Handoff(buf),
                Prepared::Partial => {}
            }
            buf.reserve(READ_CHUNK);
            tokio::select! {
                biased;
                r = client.read_buf(&mut buf) => match r {
                    Ok(0) | Err(_) => return Outcome::Closed,
                    Ok(_) => {}
                },
                _ = deadline.as_mut() => return Outcome::Closed,
                _ = stop.wait_for(|s| *s), if buf.is_empty() => return Outcome::Closed,
            }
        };
        buf.advance(plan.consumed);
        match exchange(state, client, &mut buf, &mut out, plan).await {
            Next::KeepAlive => {}
            Next::Close => {
                let _ = client.shutdown().await;
                return Outcome::Closed;
            }
        }
    }
}

/// Looks at the head at the start of `buf`: not yet whole, not for this path, or forwarded (then `out` holds
/// the head for the backend followed by the body bytes already read).
fn prepare(state: &AppState, buf: &[u8], ip: &str, out: &mut Vec<u8>) -> Prepared {
    let mut storage = [EMPTY_HEADER; MAX_HEADERS];
    let req = match h1::parse_request(buf, &mut storage, SESSION_COOKIE) {
        Parse::Partial => return Prepared::Partial,
        Parse::Fallback(_) => return Prepared::Handoff,
        Parse::Done(r) => r,
    };
    let Some(target) = target_of(
        &state.config.base_domain,
        Some(req.host),
        req.path,
        req.query,
    ) else {
        return Prepared::Handoff;
    };
    let html = req.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("accept") && h.value.windows(9).any(|w| w == b"text/html")
    });
    let Ok(found) = resolve(state, target, req.path, req.query, html) else {
        // An error page: the general path writes it.
        return Prepared::Handoff;
    };
    // A laptop serves this endpoint: requests are routed one by one on the general path.
    if state.connections.any() && state.connections.intercepted(&found.route.key()) {
        return Prepared::Handoff;
    }
    h1::write_request_head(
        out,
        &req,
        &h1::Forward {
            target: &found.backend_path,
            client_ip: ip,
            prefix: found.prefix.as_deref(),
        },
    );
    let in_buf = (buf.len() - req.head_len) as u64;
    let with_head = req.body_len().min(in_buf) as usize;
    out.extend_from_slice(&buf[req.head_len..req.head_len + with_head]);
    Prepared::Forward(Plan {
        route: found.route,
        consumed: req.head_len + with_head,
        body_left: req.body_len() - with_head as u64,
        head: req.method == "HEAD",
        close: req.close,
        html,
    })
}

enum Next {
    KeepAlive,
    Close,
}

/// Why an exchange with a backend stopped before its response began.
enum Failed {
    /// The backend closed or broke a pooled connection before answering; a fresh one may be tried.
    Stale(String),
    /// Anything else: 502.
    Bad(String),
    /// The client went away (or broke its request body): nothing to answer.
    Client,
}

/// Forwards one request (`out` holds its head and first body bytes) and its response.
async fn exchange(
    state: &AppState,
    client: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Vec<u8>,
    plan: Plan,
) -> Next {
    let route = &plan.route;
    let gw = &state.gateway;
    let n = route.backends.len();
    let first = route.next.fetch_add(1, Ordering::Relaxed) % n;
    let mut failures = Vec::new();
    let mut picked = None;
    for i in 0..n.min(2) {
        let addr = route.backends[(first + i) % n];
        if let Some(up) = gw.raw.take(addr) {
            picked = Some((addr, up, true));
            break;
        }
        match connect(addr).await {
            Ok(up) => {
                picked = Some((addr, up, false));
                break;
            }
            Err(e) => failures.push(connect_error(state, addr, &e)),
        }
    }
    let Some((addr, mut up, mut pooled)) = picked else {
        return answer_page(state, client, out, &plan, connect_failed(route, failures)).await;
    };
    let request = std::mem::take(out);
    let result = loop {
        match send(&mut up, client, buf, &request, plan.body_left).await {
            Err(Failed::Stale(e)) if pooled && plan.body_left == 0 => {
                tracing::trace!(backend = %addr, error = %e, "gateway: pooled connection was closed; reconnecting");
                match connect(addr).await {
                    Ok(fresh) => {
                        up = fresh;
                        pooled = false;
                    }
                    Err(e) => break Err(Failed::Bad(e)),
                }
            }
            r => break r,
        }
    };
    *out = request;
    match result {
        Ok(()) => {}
        Err(Failed::Client) => return Next::Close,
        Err(Failed::Stale(e) | Failed::Bad(e)) => {
            upstream_error(state);
            tracing::debug!(backend = %addr, error = %e, "gateway: backend exchange failed");
            return answer_page(state, client, out, &plan, exchange_failed(route, addr, e)).await;
        }
    }
    respond(state, client, out, up, addr, &plan).await
}

/// Answers the client with a 502 page and closes (the request's body may be unread).
async fn answer_page(
    state: &AppState,
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    plan: &Plan,
    lines: Vec<String>,
) -> Next {
    let status = StatusCode::BAD_GATEWAY;
    let (ctype, body) = page_text(status, "Bad gateway", &lines, plan.html);
    out.clear();
    out.extend_from_slice(
        format!(
            "HTTP/1.1 502 Bad Gateway\r\ncontent-type: {ctype}\r\ncache-control: no-store\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    out.extend_from_slice(body.as_bytes());
    state.metrics.observe_gateway(status.as_u16());
    let _ = client.write_all(out).await;
    Next::Close
}

/// Sends the request (head and buffered body, then the rest of the body from the client) and reads until the
/// backend's buffer holds the start of a response.
async fn send(
    up: &mut RawConn,
    client: &mut TcpStream,
    buf: &mut BytesMut,
    request: &[u8],
    mut body_left: u64,
) -> Result<(), Failed> {
    up.stream
        .write_all(request)
        .await
        .map_err(|e| Failed::Stale(format!("sending the request: {e}")))?;
    while body_left > 0 {
        buf.reserve(READ_CHUNK);
        let want = body_left.min((buf.capacity() - buf.len()) as u64) as usize;
        let mut limited = (&mut *client).take(want as u64);
        match limited.read_buf(buf).await {
            Ok(0) | Err(_) => return Err(Failed::Client),
            Ok(got) => body_left -= got as u64,
        }
        up.stream
            .write_all(buf)
            .await
            .map_err(|e| Failed::Bad(format!("sending the request body: {e}")))?;
        buf.clear();
    }
    // The response's first bytes (whether they make a whole head is for `respond` to see).
    if up.buf.is_empty() {
        up.buf.reserve(READ_CHUNK);
        match up.stream.read_buf(&mut up.buf).await {
            Ok(0) => {
                return Err(Failed::Stale(
                    "the backend closed the connection without answering".into(),
                ))
            }
            Err(e) => return Err(Failed::Stale(format!("reading the response: {e}"))),
            Ok(_) => {}
        }
    }
    Ok(())
}

/// Passes the backend's response to the client: interim responses, the head, the body as framed. The backend
/// connection goes back to the pool when the response ended cleanly and the backend keeps it open.
async fn respond(
    state: &AppState,
    client: &mut TcpStream,
    out: &mut Vec<u8>,
    mut up: RawConn,
    addr: SocketAddr,
    plan: &Plan,
) -> Next {
    let route = &plan.route;
    loop {
        let mut storage = [EMPTY_HEADER; MAX_HEADERS];
        let parsed = match h1::parse_response(&up.buf, &mut storage, plan.head) {
            Ok(Some(r)) if r.status == 101 => {
                Err("the backend switched protocols unasked".to_owned())
            }
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        };
        let resp = match parsed {
            Ok(Some(r)) => r,
            Ok(None) => {
                up.buf.reserve(READ_CHUNK);
                match up.stream.read_buf(&mut up.buf).await {
                    Ok(n) if n > 0 => continue,
                    Ok(_) => {
                        let e =
                            "the backend closed the connection in the middle of a response head";
                        return answer_page(
                            state,
                            client,
                            out,
                            plan,
                            exchange_failed(route, addr, e.into()),
                        )
                        .await;
                    }
                    Err(e) => {
                        let e = format!("reading the response: {e}");
                        return answer_page(
                            state,
                            client,
                            out,
                            plan,
                            exchange_failed(route, addr, e),
                        )
                        .await;
                    }
                }
            }
            Err(e) => {
                upstream_error(state);
                return answer_page(state, client, out, plan, exchange_failed(route, addr, e))
                    .await;
            }
        };
        let interim = resp.is_interim();
        let framing = resp.framing;
        let close = !interim && (plan.close || framing == Framing::UntilClose);
        let reusable = resp.reusable;
        let status = resp.status;
        let head_len = resp.head_len;
        out.clear();
        h1::write_response_head(out, &resp, close, SESSION_COOKIE);
        up.buf.advance(head_len);
        if interim {
            if client.write_all(out).await.is_err() {
                return Next::Close;
            }
            continue;
        }
        state.metrics.observe_gateway(status);
        let mut body = Body::new(framing);
        // The head and the body bytes that came with it go out in one write.
        let take = match body.take(&up.buf) {
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(backend = %addr, error = %e, "gateway: invalid response body");
                return Next::Close;
            }
        };
        out.extend_from_slice(&up.buf[..take]);
        up.buf.advance(take);
        if client.write_all(out).await.is_err() {
            return Next::Close;
        }
        while !body.done {
            up.buf.clear();
            up.buf.reserve(READ_CHUNK);
            match up.stream.read_buf(&mut up.buf).await {
                Ok(0) if framing == Framing::UntilClose => break,
                Ok(0) | Err(_) => {
                    tracing::debug!(backend = %addr, "gateway: the backend ended a response early");
                    return Next::Close;
                }
                Ok(_) => {}
            }
            let take = match body.take(&up.buf) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(backend = %addr, error = %e, "gateway: invalid response body");
                    return Next::Close;
                }
            };
            if client.write_all(&up.buf[..take]).await.is_err() {
                return Next::Close;
            }
            up.buf.advance(take);
        }
        // Bytes after the response's end: the backend is not speaking HTTP/1.1 properly; drop the connection.
        if reusable && up.buf.is_empty() {
            state.gateway.raw.put(addr, up);
        }
        return if close { Next::Close } else { Next::KeepAlive };
    }
}

/// Where a response body ends.
struct Body {
    framing: Framing,
    /// Bytes left (`Length`).
    left: u64,
    chunked: h1::Chunked,
    done: bool,
}

impl Body {
    fn new(framing: Framing) -> Body {
        Body {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunked: h1::Chunked::default(),
            done: matches!(framing, Framing::Empty | Framing::Length(0)),
        }
    }

    /// How many of `bytes` (the body's next bytes) belong to it; sets `done` when it has ended.
    fn take(&mut self, bytes: &[u8]) -> Result<usize, h1::ChunkError> {
        if self.done {
            return Ok(0);
        }
        Ok(match self.framing {
            Framing::Empty => 0,
            Framing::Length(_) => {
                let n = self.left.min(bytes.len() as u64);
                self.left -= n;
                self.done = self.left == 0;
                n as usize
            }
            Framing::Chunked => {
                let n = self.chunked.advance(bytes)?;
                self.done = self.chunked.is_done();
                n
            }
            Framing::UntilClose => bytes.len(),
        })
    }
}

async fn connect(addr: SocketAddr) -> Result<RawConn, String> {
    let stream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => {
            return Err(format!(
                "no connection within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))
        }
    };
    let _ = stream.set_nodelay(true);
    Ok(RawConn {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        idle_since: Instant::now(),
    })
}

/// A connection to a backend between exchanges, with the buffer its responses are read into.
pub(crate) struct RawConn {
    stream: TcpStream,
    buf: BytesMut,
    idle_since: Instant,
}

impl RawConn {
    /// Whether the backend has neither closed the connection nor sent anything unasked while it sat idle.
    fn is_quiet(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// How many parts the pool is split into: one per listener thread (modulo this), so that a backend connection
/// is reused by the thread whose runtime registered it, and its readiness never crosses threads.
const SHARDS: usize = 16;

thread_local! {
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread use part `index` of the pool (the listener threads call it at start).
pub(crate) fn set_shard(index: usize) {
    SHARD.with(|s| s.set(index % SHARDS));
}

type Idle = Mutex<HashMap<SocketAddr, Vec<RawConn>>>;

/// Idle forwarding-path connections, by listener thread and backend address.
#[derive(Default)]
pub(crate) struct RawPool {
    shards: [Idle; SHARDS],
}

impl RawPool {
    fn idle(&self) -> &Idle {
        &self.shards[SHARD.with(Cell::get)]
    }

    fn take(&self, addr: SocketAddr) -> Option<RawConn> {
        loop {
            let conn = self.idle().lock().ok()?.get_mut(&addr)?.pop()?;
            if conn.is_quiet() {
                return Some(conn);
            }
        }
    }

    fn put(&self, addr: SocketAddr, mut conn: RawConn) {
        conn.buf.clear();
        conn.idle_since = Instant::now();
        if let Ok(mut idle) = self.idle().lock() {
            let list = idle.entry(addr).or_default();
            if list.len() < MAX_IDLE_PER_BACKEND {
                list.push(conn);
            }
        }
    }

    /// Closes connections idle longer than `max_idle` and those the backend has closed.
    pub(crate) fn sweep(&self, max_idle: Duration) {
        for shard in &self.shards {
            let Ok(mut idle) = shard.lock() else {
                continue;
            };
            idle.retain(|_, list| {
                list.retain(|c| c.idle_since.elapsed() < max_idle && c.is_quiet());
                !list.is_empty()
            });
        }
    }
}
