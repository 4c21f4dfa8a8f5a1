//! A minimal Docker Engine API client: HTTP/1.1 over the daemon's unix socket, one connection per request.
//!
//! Only what the driver needs: JSON requests, collected bodies, and streamed bodies (logs, events).

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

/// The socket used when `DOCKER_HOST` is unset.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";

/// The newest Engine API version this driver speaks; the daemon's own version is used when it is older.
const MAX_API_VERSION: (u32, u32) = (1, 45);

/// How long a non-streaming request may take (a stop with a grace period included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A failed Engine API call.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The daemon could not be reached or the connection broke.
    #[error("Docker Engine at {socket}: {message}")]
    Transport { socket: String, message: String },
    /// The daemon answered with an error status.
    #[error("Docker Engine: {method} {path}: {status}: {message}")]
    Status {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
    },
    /// The daemon answered with a body that is not what the API documents.
    #[error("Docker Engine: {method} {path}: unexpected answer: {message}")]
    Decode {
        method: Method,
        path: String,
        message: String,
    },
}

impl ApiError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ApiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    pub fn is_conflict(&self) -> bool {
        self.status() == Some(StatusCode::CONFLICT)
    }
}

impl From<ApiError> for crate::Error {
    fn from(e: ApiError) -> crate::Error {
        crate::Error::Backend(e.to_string())
    }
}

/// Where the daemon listens and which API version to speak.
#[derive(Debug, Clone)]
pub struct Engine {
    socket: PathBuf,
    /// `/v1.41`-style prefix; empty before negotiation.
    prefix: String,
}

impl Engine {
    /// The daemon named by `DOCKER_HOST` (`unix://` only), or the default socket.
    pub fn from_env() -> Result<Engine, crate::Error> {
        match std::env::var("DOCKER_HOST") {
            Ok(host) if !host.is_empty() => match host.strip_prefix("unix://") {
                Some(path) => Ok(Engine::at(Path::new(path))),
                None => Err(crate::Error::Unsupported(format!(
                    "DOCKER_HOST={host}: the docker data plane talks to the Engine over a unix socket only \
                     (unix:///var/run/docker.sock)"
                ))),
            },
            _ => Ok(Engine::at(Path::new(DEFAULT_SOCKET))),
        }
    }

    pub fn at(socket: &Path) -> Engine {
        Engine {
            socket: socket.to_path_buf(),
            prefix: String::new(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Pings the daemon and settles the API version: the daemon's, capped at the newest this driver knows.
    pub async fn negotiate(&mut self) -> Result<(), ApiError> {
        let resp = self.send(Method::GET, "/_ping", None).await?;
        let status = resp.status();
        let version = resp
            .headers()
            .get("api-version")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_version);
        let body = collect(resp, &self.socket).await?;
        if !status.is_success() {
            return Err(ApiError::Status {
                method: Method::GET,
                path: "/_ping".into(),
                status,
                message: error_message(&body),
            });
        }
        let (major, minor) = version.map_or(MAX_API_VERSION, |v| v.min(MAX_API_VERSION));
        self.prefix = format!("/v{major}.{minor}");
        Ok(())
    }

    /// The negotiated version, e.g. `1.41`.
    pub fn api_version(&self) -> &str {
        self.prefix.trim_start_matches("/v")
    }

    fn transport(&self, message: impl std::fmt::Display) -> ApiError {
        ApiError::Transport {
            socket: self.socket.display().to_string(),
            message: message.to_string(),
        }
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, ApiError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|e| {
                self.transport(format!(
                    "cannot connect: {e} (is the Docker daemon running?)"
                ))
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(e))?;
        tokio::spawn(async move {
            // Ends when the response body is read to the end or dropped.
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.prefix, path))
            .header(HOST, "docker");
        if body.is_some() {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| self.transport(e))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| self.transport(e))
    }

    /// Sends a request and collects the answer; a non-2xx status is an error carrying the daemon's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, ApiError> {
        let body = body.map(|b| b.to_string().into_bytes());
        let work = async {
            let resp = self.send(method.clone(), path, body).await?;
            let status = resp.status();
            let bytes = collect(resp, &self.socket).await?;
            if status.is_success() {
                Ok(bytes)
            } else {
                Err(ApiError::Status {
                    method: method.clone(),
                    path: path.to_string(),
                    status,
                    message: error_message(&bytes),
                })
            }
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(self.transport(format!(
                "{method} {path}: no answer within {REQUEST_TIMEOUT:?}"
            ))),
        }
    }

    /// Like [`Engine::call`], decoding the answer as JSON.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<T, ApiError> {
        let bytes = self.call(method.clone(), path, body).await?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
            method,
            path: path.to_string(),
            message: e.to_string(),
        })
    }

    /// Sends a GET whose answer is a stream (logs, events); the body is read by the caller.
    pub async fn stream(&self, path: &str) -> Result<Incoming, ApiError> {
        let resp = self.send(Method::GET, path, None).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let bytes = collect(resp, &self.socket).await?;
        Err(ApiError::Status {
            method: Method::GET,
            path: path.to_string(),
            status,
            message: error_message(&bytes),
        })
    }
}

async fn collect(resp: hyper::Response<Incoming>, socket: &Path) -> Result<Bytes, ApiError> {
    resp.into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::Transport {
            socket: socket.display().to_string(),
            message: format!("reading the answer: {e}"),
        })
}

/// The next data chunk of a streamed body; `None` at its end.
pub async fn next_chunk(body: &mut Incoming) -> Option<Result<Bytes, hyper::Error>> {
    loop {
        match body.frame().await? {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    return Some(Ok(data));
                }
            }
            Err(e) => return Some(Err(e)),
        }
    }
}

/// The daemon's `{"message": ...}`, or the body as text.
fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Message {
        message: String,
    }
    match serde_json::from_slice::<Message>(body) {
        Ok(m) => m.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    }
}

fn parse_version(s: &str) -> Option<(u32, u32)> {
    let (major, minor) = s.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// Percent-encodes a query value (Engine filters are JSON in the query string).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_escaping() {
        assert_eq!(parse_version("1.41"), Some((1, 41)));
        assert_eq!(parse_version("x"), None);
        assert_eq!(
            query_escape(r#"{"label":["a=b/c"]}"#),
            "%7B%22label%22%3A%5B%22a%3Db%2Fc%22%5D%7D"
        );
        assert_eq!(
            error_message(br#"{"message":"no such container"}"#),
            "no such container"
        );
        assert_eq!(error_message(b"plain\n"), "plain");
    }
}
