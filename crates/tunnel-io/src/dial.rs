//! Dialing a server's tunnel endpoint, and the waits between attempts when it cannot be reached.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher as _, Hasher as _};
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{header, HeaderValue};
use tokio_tungstenite::tungstenite::{self};
use tunnel::Backoff;

use crate::session::{dial, Config, Error, Event, Session};
use crate::transport::WsTransport;

/// Why [`connect`] failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The URL or token cannot make a request.
    Request(String),
    /// The server answered the upgrade with an HTTP error (status and body).
    Status(u16, String),
    /// The server could not be reached, or the WebSocket broke.
    Transport(String),
    /// The tunnel handshake failed.
    Session(Error),
}

impl ConnectError {
    /// Whether trying again later may succeed (an unreachable server, a restart); an invalid token or an
    /// incompatible version will not fix itself.
    pub fn is_transient(&self) -> bool {
        match self {
            ConnectError::Request(_) => false,
            ConnectError::Status(code, _) => !matches!(code, 400 | 401 | 403 | 404 | 426),
            ConnectError::Transport(_) => true,
            ConnectError::Session(e) => !matches!(
                e,
                Error::Incompatible(_) | Error::Refused(_) | Error::Protocol(_)
            ),
        }
    }
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Request(e) => write!(f, "cannot build the tunnel request: {e}"),
            ConnectError::Status(code, body) if body.is_empty() => {
                write!(f, "the server answered {code}")
            }
            ConnectError::Status(code, body) => write!(f, "the server answered {code}: {body}"),
            ConnectError::Transport(e) => e.fmt(f),
            ConnectError::Session(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ConnectError {}

/// Opens a WebSocket to `url` (`ws://` or `wss://`… as the server is configured) with `token` as a bearer
/// token, and a tunnel session on it.
pub async fn connect(
    url: &str,
    token: &str,
    config: Config,
) -> Result<(Session, mpsc::UnboundedReceiver<Event>), ConnectError> {
    let mut request = url
        .into_client_request()
        .map_err(|e| ConnectError::Request(format!("{url}: {e}")))?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
        .map_err(|_| ConnectError::Request("the token is not a valid header value".into()))?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    let ws_config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(2 * tunnel::MAX_PAYLOAD + 64 * 1024));
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(ws_config), true)
        .await
        .map_err(|e| match e {
            tungstenite::Error::Http(resp) => {
                let body = resp
                    .body()
                    .as_deref()
                    .map(|b| String::from_utf8_lossy(b).trim().to_owned())
                    .unwrap_or_default();
                ConnectError::Status(resp.status().as_u16(), body)
            }
            e => ConnectError::Transport(format!("connecting to {url}: {e}")),
        })?;
    dial(WsTransport::new(ws), config)
        .await
        .map_err(ConnectError::Session)
}

/// A number in `[0, 1)` that differs between calls and processes (for backoff jitter; not for secrets).
pub fn jitter() -> f64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The waits of a reconnect loop: jittered exponential backoff from 250 ms to 10 s, back to the start once a
/// connection held.
#[derive(Debug, Clone)]
pub struct Redial {
    backoff: Backoff,
}

impl Default for Redial {
    fn default() -> Self {
        Redial::new(Duration::from_millis(250), Duration::from_secs(10))
    }
}

impl Redial {
    pub fn new(base: Duration, max: Duration) -> Redial {
        Redial {
            backoff: Backoff::new(base, max),
        }
    }

    /// Sleeps before the next attempt; returns how long it slept.
    pub async fn wait(&mut self) -> Duration {
        let d = self.backoff.next_delay(jitter());
        tokio::time::sleep(d).await;
        d
    }

    /// A connection was made.
    pub fn connected(&mut self) {
        self.backoff.reset();
    }

    /// Attempts since the last connection.
    pub fn attempts(&self) -> u32 {
        self.backoff.attempts()
    }
}
