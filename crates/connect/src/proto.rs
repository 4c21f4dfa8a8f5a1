//! What a daemon and the server say to each other over the daemon's tunnel session.
//!
//! A daemon dials `/api/v1/orgs/{org}/connect?project=P&environment=E&device=D` with its user's token; one
//! session per connected environment. Session messages are JSON: [`ToServer`] from the daemon, [`ToDaemon`]
//! from the server. Streams carry the traffic:
//!
//! - the daemon opens `svc:<component>/<endpoint>` for each connection a laptop program makes to a service's
//!   local address (consume); the server carries it to the endpoint in the environment, routed as any request
//!   to that endpoint is (so another developer's serve applies);
//! - the server opens `serve:<id>` on the daemon for each connection or request routed to one of its serves;
//!   the daemon carries it to the local port the serve names.

use serde::{Deserialize, Serialize};

/// The stream target prefix of a consumed service: `svc:<component>/<endpoint>`.
pub const SERVICE_TARGET: &str = "svc:";
/// The stream target prefix of a served request: `serve:<id>`.
pub const SERVE_TARGET: &str = "serve:";
/// The request header a serve matches by default; its value is the serving user's name.
pub const DEFAULT_HEADER: &str = "kiln-serve";

/// Longest serve id accepted.
pub const MAX_SERVE_ID: usize = 64;

/// From the daemon to the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ToServer {
    /// Route matching traffic of a component's endpoint to this daemon (answered by [`ToDaemon::Served`]).
    Serve(Serve),
    /// Stop a serve.
    Unserve { id: String },
}

/// One serve, as the daemon asks for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Serve {
    /// Chosen by the daemon; names the serve's streams (`serve:<id>`).
    pub id: String,
    pub component: String,
    /// The endpoint; the component's only one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The laptop port requests go to (the daemon's business; shown to others).
    pub port: u16,
    /// The header a request must carry to be routed here; [`DEFAULT_HEADER`] with the user's name when absent
    /// and `all` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HeaderMatch>,
    /// Every request (and connection) of the endpoint comes here, whatever its headers.
    #[serde(default)]
    pub all: bool,
}

/// A header name and the exact value a request's header must have.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

impl std::fmt::Display for HeaderMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.name, self.value)
    }
}

/// From the server to the daemon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum ToDaemon {
    /// The first message of a session: who the server took the daemon for.
    Welcome { user: String, connection: u64 },
    /// The environment's deployed components and their endpoints, whole, each time they change.
    Services { services: Vec<Service> },
    /// Every laptop connected to the environment (this one included), as the server's orchestrator view shows
    /// them (`user`, `device`, `connectedAt`, `serves`, `consumes`), whole, each time it changes.
    Peers { connections: Vec<serde_json::Value> },
    /// The answer to [`ToServer::Serve`]: the serve as routed (endpoint and header resolved), or why not.
    Served {
        id: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        header: Option<HeaderMatch>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// A component deployed in the connected environment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    pub component: String,
    pub endpoints: Vec<ServiceEndpoint>,
}

/// One endpoint of a deployed component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEndpoint {
    pub name: String,
    /// The port the endpoint declares; the laptop listens on it at the service's address.
    pub port: u16,
    /// `http`, `websocket`, `grpc`, `tcp`, …
    pub protocol: String,
    /// Ready replicas.
    pub ready: u64,
}

impl ServiceEndpoint {
    /// Whether the endpoint speaks HTTP (so it is also offered on port 80 of the service's address).
    pub fn is_http(&self) -> bool {
        matches!(self.protocol.as_str(), "http" | "websocket")
    }
}

/// Whether `id` is a serve id a daemon may choose: 1 to [`MAX_SERVE_ID`] of `[a-z0-9-]`.
pub fn valid_serve_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_SERVE_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Parses `NAME=VALUE` (as `--header` takes it) into a match; the name must be a valid header name (token
/// characters) and the value printable ASCII.
pub fn parse_header(s: &str) -> Result<HeaderMatch, String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("header {s:?}: expected NAME=VALUE"))?;
    let m = HeaderMatch {
        name: name.trim().to_ascii_lowercase(),
        value: value.trim().to_string(),
    };
    check_header(&m)?;
    Ok(m)
}

/// Checks a header match: a token name, a non-empty printable value.
pub fn check_header(m: &HeaderMatch) -> Result<(), String> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if m.name.is_empty() || m.name.len() > 128 || !m.name.bytes().all(token) {
        return Err(format!(
            "header name {:?}: use letters, digits and -_.!#$%&'*+^`|~ (at most 128)",
            m.name
        ));
    }
    if m.value.is_empty()
        || m.value.len() > 256
        || !m.value.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err(format!(
            "header {}: the value must be 1 to 256 printable ASCII characters",
            m.name
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_refuse_unknown_fields() {
        let m = ToServer::Serve(Serve {
            id: "a1".into(),
            component: "api".into(),
            endpoint: None,
            port: 3000,
            header: Some(HeaderMatch {
                name: "kiln-serve".into(),
                value: "alice".into(),
            }),
            all: false,
        });
        let s = serde_json::to_string(&m).unwrap();
        assert_eq!(serde_json::from_str::<ToServer>(&s).unwrap(), m);
        let bad = r#"{"type":"serve","id":"a","component":"api","port":1,"extra":1}"#;
        let e = serde_json::from_str::<ToServer>(bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn headers_are_checked() {
        assert_eq!(
            parse_header("Kiln-Serve=alice").unwrap(),
            HeaderMatch {
                name: "kiln-serve".into(),
                value: "alice".into()
            }
        );
        assert!(parse_header("novalue").unwrap_err().contains("NAME=VALUE"));
        assert!(parse_header("bad name=x").is_err());
        assert!(parse_header("x=").is_err());
        assert!(parse_header("x=a\nb").is_err());
        assert!(valid_serve_id("abc-1"));
        assert!(!valid_serve_id("ABC"));
        assert!(!valid_serve_id(""));
    }
}
