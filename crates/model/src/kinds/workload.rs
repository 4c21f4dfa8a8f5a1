//! The run-time parts of a Component: what to run, its environment, resource requests and limits, and probes.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_not_blank, FirstSeen};
use crate::names::{field, index};
use crate::{FieldError, Quantity};

/// What to run. Either `image` (a container image) or `command` (an argv run by the process data plane), not
/// both; with neither, the image built from the component's source is run.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// A container image reference, e.g. `ghcr.io/acme/api:1.2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The program and its arguments, e.g. `["./server", "--port", "8080"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// The directory `command` runs in, relative to the checked-out source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Environment variables, in order.
    #[serde(default)]
    pub env: Vec<EnvVar>,
}

/// One environment variable.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    /// The variable name: letters, digits, `_`, `-` and `.`, not starting with a digit.
    pub name: String,
    /// The value. Default empty.
    #[serde(default)]
    pub value: String,
}

/// Resource requests (reserved) and limits (enforced).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resources {
    /// What the workload is guaranteed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceList>,
    /// What the workload may use at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceList>,
}

/// CPU and memory amounts.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceList {
    /// CPU cores, e.g. `250m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory bytes, e.g. `256Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// Health checks.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probes {
    /// Failing it restarts the workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness: Option<Probe>,
    /// Failing it takes the workload out of its endpoints' rotation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness: Option<Probe>,
}

fn default_period() -> u32 {
    10
}
fn default_timeout() -> u32 {
    1
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_probe_path() -> String {
    "/".into()
}

/// One health check: exactly one of `httpGet`, `tcpSocket` and `exec`, and its timing.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Probe {
    /// Succeeds on an HTTP status 200-399.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_get: Option<HttpGetAction>,
    /// Succeeds when a TCP connection opens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_socket: Option<TcpSocketAction>,
    /// Succeeds when the command exits 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exec: Option<ExecAction>,
    /// Seconds to wait after start before the first check. Default 0.
    #[serde(default)]
    pub initial_delay_seconds: u32,
    /// Seconds between checks. Default 10.
    #[serde(default = "default_period")]
    pub period_seconds: u32,
    /// Seconds after which one check counts as failed. Default 1.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u32,
    /// Consecutive failures that make the probe fail. Default 3.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
}

/// An HTTP GET check.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpGetAction {
    /// Request path. Default `/`.
    #[serde(default = "default_probe_path")]
    pub path: String,
    /// Port, 1-65535.
    pub port: u32,
}

/// A TCP connect check.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpSocketAction {
    /// Port, 1-65535.
    pub port: u32,
}

/// A command check, run inside the workload.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ExecAction {
    /// The program and its arguments.
    pub command: Vec<String>,
}

/// Pushes `must be 1-65535, got N` unless `port` is a valid port.
pub(crate) fn check_port(errors: &mut Vec<FieldError>, path: &str, port: u32) {
    if !(1..=65535).contains(&port) {
        errors.push(FieldError::new(
            path,
            format!("must be 1-65535, got {port}"),
        ));
    }
}

fn check_env_name(errors: &mut Vec<FieldError>, path: &str, name: &str) {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    let msg = if name.is_empty() {
        "must not be empty".to_string()
    } else if name.starts_with(|c: char| c.is_ascii_digit()) || !name.chars().all(ok_char) {
        format!("{name:?} is not a valid variable name (use letters, digits, '_', '-' and '.', not starting with a digit)")
    } else {
        return;
    };
    errors.push(FieldError::new(path, msg));
}

impl Workload {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.image.is_some() && self.command.is_some() {
            errors.push(FieldError::new(
                path,
                "set either image or command, not both",
            ));
        }
        if let Some(image) = &self.image {
            let p = field(path, "image");
            check_not_blank(errors, &p, image);
            if image.chars().any(char::is_whitespace) {
                errors.push(FieldError::new(
                    p,
                    format!("{image:?} must not contain whitespace"),
                ));
            }
        }
        match &self.command {
            Some(cmd) if cmd.first().is_none_or(|c| c.trim().is_empty()) => {
                errors.push(FieldError::new(
                    field(path, "command"),
                    "must name a program as its first element",
                ));
            }
            None if self.working_dir.is_some() => {
                errors.push(FieldError::new(
                    field(path, "workingDir"),
                    "only valid together with command",
                ));
            }
            _ => {}
        }
        let env = field(path, "env");
        let mut seen = FirstSeen::default();
        for (i, var) in self.env.iter().enumerate() {
            let p = field(&index(&env, i), "name");
            check_env_name(errors, &p, &var.name);
            if let Some(first) = seen.check(var.name.as_str(), i) {
                errors.push(FieldError::new(
                    p,
                    format!(
                        "duplicate variable {:?} (also at {})",
                        var.name,
                        index(&env, first)
                    ),
                ));
            }
        }
    }
}

impl Resources {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        for (which, list) in [("requests", &self.requests), ("limits", &self.limits)] {
            let Some(list) = list else { continue };
            for (name, q) in [("cpu", &list.cpu), ("memory", &list.memory)] {
                if let Some(e) = q
                    .as_ref()
                    .and_then(|q| q.validate(&field(&field(path, which), name)).err())
                {
                    errors.push(e);
                }
            }
        }
        let (Some(req), Some(lim)) = (&self.requests, &self.limits) else {
            return;
        };
        for (name, r, l) in [
            ("cpu", &req.cpu, &lim.cpu),
            ("memory", &req.memory, &lim.memory),
        ] {
            let (Some(r), Some(l)) = (r, l) else { continue };
            if let (Some(rv), Some(lv)) = (r.value(), l.value()) {
                if rv > lv {
                    errors.push(FieldError::new(
                        field(&field(path, "requests"), name),
                        format!(
                            "request {r} exceeds the limit {l} at {}",
                            field(&field(path, "limits"), name)
                        ),
                    ));
                }
            }
        }
    }
}

impl Probes {
    pub(crate) fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        for (name, probe) in [("liveness", &self.liveness), ("readiness", &self.readiness)] {
            if let Some(p) = probe {
                p.validate(&field(path, name), errors);
            }
        }
    }
}

impl Probe {
    fn validate(&self, path: &str, errors: &mut Vec<FieldError>) {
        let set = [
            self.http_get.is_some(),
            self.tcp_socket.is_some(),
            self.exec.is_some(),
        ];
        let n = set.iter().filter(|s| **s).count();
        if n != 1 {
            errors.push(FieldError::new(
                path,
                format!("set exactly one of httpGet, tcpSocket and exec, got {n}"),
            ));
        }
        if let Some(h) = &self.http_get {
            check_port(errors, &field(&field(path, "httpGet"), "port"), h.port);
            if !h.path.starts_with('/') {
                errors.push(FieldError::new(
                    field(&field(path, "httpGet"), "path"),
                    "must start with '/'",
                ));
            }
        }
        if let Some(t) = &self.tcp_socket {
            check_port(errors, &field(&field(path, "tcpSocket"), "port"), t.port);
        }
        if let Some(e) = &self.exec {
            if e.command.first().is_none_or(|c| c.trim().is_empty()) {
                errors.push(FieldError::new(
                    field(&field(path, "exec"), "command"),
                    "must name a program as its first element",
                ));
            }
        }
        for (name, v) in [
            ("periodSeconds", self.period_seconds),
            ("timeoutSeconds", self.timeout_seconds),
            ("failureThreshold", self.failure_threshold),
        ] {
            if v == 0 {
                errors.push(FieldError::new(field(path, name), "must be at least 1"));
            }
        }
    }
}
