//! The parts of the Engine API's JSON answers that the driver reads.

use std::collections::HashMap;

use serde::Deserialize;

/// An item of `GET /containers/json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerSummary {
    pub id: String,
    #[serde(default)]
    pub names: Vec<String>,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    /// `created`, `running`, `restarting`, `exited`, `paused`, `removing`, `dead`.
    #[serde(default)]
    pub state: String,
}

impl ContainerSummary {
    pub fn name(&self) -> &str {
        self.names
            .first()
            .map(|n| n.trim_start_matches('/'))
            .unwrap_or("")
    }

    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.get(key).map(String::as_str)
    }
}

/// `GET /containers/{id}/json`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerInspect {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub restart_count: u32,
    pub state: ContainerState,
    pub config: ContainerConfig,
    #[serde(default)]
    pub network_settings: NetworkSettings,
}

impl ContainerInspect {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.config.labels.get(key).map(String::as_str)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerState {
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub running: bool,
    #[serde(default)]
    pub restarting: bool,
    #[serde(default)]
    pub paused: bool,
    #[serde(rename = "OOMKilled", default)]
    pub oom_killed: bool,
    #[serde(default)]
    pub exit_code: i32,
    #[serde(default)]
    pub error: String,
    #[serde(default)]
    pub started_at: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub labels: HashMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NetworkSettings {
    /// `"8080/tcp"` → its bindings; `null` while the container is not running.
    #[serde(default)]
    pub ports: Option<HashMap<String, Option<Vec<PortBinding>>>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PortBinding {
    #[serde(default)]
    pub host_ip: String,
    #[serde(default)]
    pub host_port: String,
}

/// A network as `GET /networks` and `GET /networks/{id}` describe it.
#[derive(Debug, Clone, Deserialize)]
pub struct NetworkInspect {
    #[serde(rename = "Id")]
    pub id: String,
    #[serde(rename = "Name")]
    pub name: String,
    /// RFC 3339 with nanoseconds, so ordering the strings orders the times (same zone).
    #[serde(rename = "Created", default)]
    pub created: String,
    #[serde(rename = "IPAM", default)]
    pub ipam: Ipam,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Ipam {
    #[serde(default)]
    pub config: Vec<IpamConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct IpamConfig {
    #[serde(default)]
    pub gateway: Option<String>,
    /// `172.18.0.0/16`.
    #[serde(default)]
    pub subnet: Option<String>,
}

/// A line of `GET /events`.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    #[serde(rename = "Type", default)]
    pub kind: String,
    #[serde(rename = "Action", default)]
    pub action: String,
    #[serde(rename = "Actor", default)]
    pub actor: Actor,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Actor {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Attributes", default)]
    pub attributes: HashMap<String, String>,
}
