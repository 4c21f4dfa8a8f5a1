//! The CLI's side of the daemon's control socket: JSON over HTTP/1.1 on a Unix socket.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::UnixStream;

/// The socket a daemon of this user listens on, and the CLI looks for: `$KILN_DAEMON_SOCKET`; else the
/// system daemon's `/run/kiln/daemon.sock` when run as root or when that socket exists; else one under
/// `$XDG_RUNTIME_DIR` (or `/tmp/kiln-<uid>`).
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_DAEMON_SOCKET") {
        return PathBuf::from(p);
    }
    let system = PathBuf::from("/run/kiln/daemon.sock");
    if rustix::process::getuid().is_root() || system.exists() {
        return system;
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("kiln").join("daemon.sock"),
        None => PathBuf::from(format!("/tmp/kiln-{}", rustix::process::getuid().as_raw()))
            .join("daemon.sock"),
    }
}

/// Where a daemon keeps its state: `/var/lib/kiln/daemon` for root, else under `$XDG_STATE_HOME` (or
/// `~/.local/state`).
pub fn default_state_dir() -> PathBuf {
    if rustix::process::getuid().is_root() {
        return PathBuf::from("/var/lib/kiln/daemon");
    }
    std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("/tmp"))
        .join("kiln/daemon")
}

/// Connects to the daemon's socket, and makes sure the daemon is this user's or root's before anything (a
/// token) is sent to it.
async fn dial(socket: &Path) -> Result<UnixStream, CallError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| CallError::NoDaemon(socket.to_path_buf(), e))?;
    let me = rustix::process::getuid().as_raw();
    match stream.peer_cred().map(|c| c.uid()) {
        Ok(uid) if uid == 0 || uid == me => Ok(stream),
        Ok(uid) => Err(CallError::Other(format!(
            "the process on {} runs as uid {uid}, neither root nor this user: not a daemon to trust",
            socket.display()
        ))),
        Err(e) => Err(CallError::Other(format!(
            "cannot tell who answers on {}: {e}",
            socket.display()
        ))),
    }
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// No daemon answers on the socket.
    NoDaemon(PathBuf, std::io::Error),
    /// The daemon answered with an error.
    Refused(u16, String),
    Other(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NoDaemon(p, e) => write!(
                f,
                "no kiln daemon answers on {} ({e}); start one with `sudo kiln daemon install` or `kiln daemon run`",
                p.display()
            ),
            CallError::Refused(_, m) => f.write_str(m),
            CallError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for CallError {}

/// Sends one request to the daemon (`GET` when `body` is `None`, else `POST` with it) and returns its response.
async fn send(
    socket: &Path,
    path: &str,
    body: Option<&Value>,
) -> Result<hyper::Response<hyper::body::Incoming>, CallError> {
    let stream = dial(socket).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| CallError::Other(format!("the daemon's socket: {e}")))?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(if body.is_some() {
            Method::POST
        } else {
            Method::GET
        })
        .uri(path)
        .header(hyper::header::HOST, "kiln-daemon")
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(
            body.map(Value::to_string).unwrap_or_default(),
        )))
        .map_err(|e| CallError::Other(e.to_string()))?;
    send.send_request(req)
        .await
        .map_err(|e| CallError::Other(format!("the daemon did not answer: {e}")))
}

/// Calls the daemon: `GET` when `body` is `None`, else `POST` with it.
pub async fn call(socket: &Path, path: &str, body: Option<&Value>) -> Result<Value, CallError> {
    let resp = send(socket, path, body).await?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| CallError::Other(format!("reading the daemon's answer: {e}")))?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        let msg = v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        return Err(CallError::Refused(status.as_u16(), msg));
    }
    Ok(v)
}

/// Follows a streaming call (`GET` of `path`, NDJSON): `each` gets every line's document until it returns false
/// or the daemon ends the stream.
pub async fn follow(
    socket: &Path,
    path: &str,
    mut each: impl FnMut(Value) -> bool,
) -> Result<(), CallError> {
    let mut body = send(socket, path, None).await?.into_body();
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| CallError::Other(format!("reading the daemon's answer: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(at) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=at).collect();
            if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                if !each(v) {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}
