//! The messages an agent and the server exchange on their tunnel session (JSON, one per session message),
//! and the stream targets the server opens on the agent.

use std::collections::BTreeMap;

use model::kinds::AgentSpec;
use serde::{Deserialize, Serialize};

/// Where an agent dials (`ws://` or `wss://` + this path on the server's access URL).
pub const CONNECT_PATH: &str = "/api/v1/agent/connect";
/// Where an agent opens its idle direct streams (`tunnel_io::direct`) for the server to hand out.
pub const STREAM_PATH: &str = "/api/v1/agent/stream";
/// The stream target prefix for a TCP connection from the workspace: `tcp:<host>:<port>`.
pub const TCP_TARGET: &str = "tcp:";
/// The stream target of the agent's SSH server: the stream is one SSH connection.
pub const SSH_TARGET: &str = "ssh";
/// What a stream reaches in the workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    /// The agent's SSH server.
    Ssh,
    /// A TCP address (`host:port`).
    Tcp(&'a str),
}

impl Target<'_> {
    /// Reads a stream target: `tcp:<host>:<port>` or `ssh`.
    pub fn parse(target: &str) -> Result<Target<'_>, String> {
        if target == SSH_TARGET {
            return Ok(Target::Ssh);
        }
        match target.strip_prefix(TCP_TARGET) {
            Some(addr) => Ok(Target::Tcp(addr)),
            None => Err(format!(
                "unknown target {target:?}; a workspace serves {TCP_TARGET}<host>:<port> and {SSH_TARGET}"
            )),
        }
    }
}

/// The most bytes of one log message an agent sends.
pub const MAX_LOG_BATCH: usize = 64 * 1024;

/// An agent's lifecycle.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    /// Started, has not received its manifest.
    Created,
    /// Running its start scripts.
    Starting,
    /// Start scripts done (or none).
    Ready,
    /// A start script failed.
    StartError,
    /// A start script ran past its timeout.
    StartTimeout,
    /// Running its stop scripts.
    ShuttingDown,
}

/// From the server to the agent.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    /// What to run and offer, sent when a session starts.
    Manifest(Box<Manifest>),
    /// Open this many more direct streams now: a user waits for one and none is idle.
    Dial { count: u32 },
}

/// What an agent runs and offers: its template version's `agent` part and the workspace it is in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub organization: String,
    pub workspace: String,
    pub owner: String,
    /// The build the agent belongs to.
    pub build: u32,
    pub agent: AgentSpec,
    /// Variables added to the environment of scripts and shells (`KILN_WORKSPACE_NAME`, …).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// From the agent to the server.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromAgent {
    /// Sent first on every session, then on every change.
    Lifecycle {
        state: Lifecycle,
        /// The agent's version.
        version: String,
        /// Why it is in an error state.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// Lines a script wrote (stdout and stderr interleaved).
    Logs { source: String, lines: Vec<String> },
    /// A metadata value.
    Metadata {
        key: String,
        value: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The health of the apps with health checks.
    Apps { health: BTreeMap<String, AppHealth> },
}

/// An app's health as its check last found it.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AppHealth {
    /// No check configured.
    Disabled,
    /// Not yet checked enough times.
    Initializing,
    Healthy,
    Unhealthy,
}
