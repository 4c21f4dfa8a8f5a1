//! Component: one deployable unit of a project (a service, web application, scheduled task or worker), where
//! its source is, how it is built, what it exposes and what it depends on.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::workload::{check_port, Probes, Resources, Workload};
use super::{check_name, check_not_blank, check_unique_names, default_true, FirstSeen, KindSpec};
use crate::names::{field, index};
use crate::{cron, FieldError, Kind, ObjectMeta};

/// The most replicas a component may ask for.
pub const MAX_REPLICAS: u32 = 100;

fn default_replicas() -> u32 {
    1
}
fn default_branch() -> String {
    "main".into()
}
fn default_endpoint_path() -> String {
    "/".into()
}

/// The spec of a Component.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ComponentSpec {
    /// What kind of workload this is. Required.
    #[serde(rename = "type")]
    pub type_: ComponentType,
    /// The language or runtime, e.g. `go`; a hint for builds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Where the source lives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    /// How the source is built into an image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<Build>,
    /// What to run and with which environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    /// Instances to run, 0-100. Default 1.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// CPU and memory requests and limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// Liveness and readiness checks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probes: Option<Probes>,
    /// Network endpoints the component serves.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
    /// Services and other components' endpoints this component uses.
    #[serde(default)]
    pub dependencies: Vec<Dependency>,
    /// Deploy each new build to the first environment of the pipeline. Default true.
    #[serde(default = "default_true")]
    pub auto_deploy: bool,
    /// A cron expression; required for, and only valid for, `scheduled-task` components.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The IANA time zone the schedule is read in, e.g. `Europe/Paris`. Default `UTC`. Scheduled tasks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// What happens when a run is due while the previous one still runs: `Allow` (both run), `Forbid` (the new
    /// one is skipped) or `Replace` (the old one is stopped). Default `Allow`. Scheduled tasks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_policy: Option<ConcurrencyPolicy>,
    /// Finished runs kept (their exit and logs), 1-100. Default 10. Scheduled tasks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_history_limit: Option<u32>,
}

/// What a scheduled task does when a run is due while an earlier one is still running.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ConcurrencyPolicy {
    /// Start the new run beside the running one.
    #[default]
    Allow,
    /// Skip the new run.
    Forbid,
    /// Stop the running one, then start the new run.
    Replace,
}

/// The most runs a scheduled task keeps.
pub const MAX_RUN_HISTORY: u32 = 100;
/// Runs a scheduled task keeps by default.
pub const DEFAULT_RUN_HISTORY: u32 = 10;

/// The kind of workload.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentType {
    /// A long-running API or backend.
    Service,
    /// A long-running program serving a web UI.
    WebApplication,
    /// A program run to completion on a cron schedule.
    ScheduledTask,
    /// A long-running program that serves no endpoints of its own (a queue consumer).
    Worker,
}

/// Where a component's source lives.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    /// A Git repository.
    pub git: GitSource,
}

/// A folder of a branch of a Git repository.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GitSource {
    /// Repository URL or `host/owner/name`, e.g. `github.com/company/user-service`.
    pub repository: String,
    /// Branch to build. Default `main`.
    #[serde(default = "default_branch")]
    pub branch: String,
    /// Folder within the repository. Default: the repository root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// How to build the source into an image: buildpacks, or a Dockerfile.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Build {
    /// Build with Cloud Native Buildpacks. Default false.
    #[serde(default)]
    pub buildpacks: bool,
    /// Path of a Dockerfile relative to the source folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
    /// A Pipeline (same organization) whose successful runs on `branch` make this component's releases: the
    /// run's output named `output` is the artifact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<String>,
    /// The branch whose runs are released. Default: `spec.source.git.branch`, else the pipeline's branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// The run output (a step writes `NAME=value` lines to the file `$KILN_OUTPUT`) that holds the artifact:
    /// an image reference (it becomes `workload.image`), or a file path (it becomes the program of
    /// `workload.command`, for the process data plane), either absolute or one of the run's saved artifacts.
    /// Default `artifact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
}

impl Build {
    /// The run output that holds the artifact.
    pub fn output_name(&self) -> &str {
        self.output.as_deref().unwrap_or("artifact")
    }
}

/// A network endpoint the component serves.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoint {
    /// Unique within the component; a DNS-1123 label.
    pub name: String,
    /// The port the workload listens on, 1-65535.
    pub port: u32,
    /// Default `HTTP`.
    #[serde(default)]
    pub protocol: EndpointProtocol,
    /// Base path for HTTP-like protocols. Default `/`.
    #[serde(default = "default_endpoint_path")]
    pub path: String,
    /// Who can reach it. Default `project`.
    #[serde(default)]
    pub visibility: Visibility,
}

/// An endpoint's protocol.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EndpointProtocol {
    #[default]
    #[serde(rename = "HTTP")]
    /// HTTP/1.1 or HTTP/2.
    Http,
    #[serde(rename = "HTTPS")]
    /// HTTP over TLS terminated by the workload.
    Https,
    #[serde(rename = "TCP")]
    /// Raw TCP.
    Tcp,
    #[serde(rename = "UDP")]
    /// Raw UDP.
    Udp,
    #[serde(rename = "gRPC")]
    /// gRPC over HTTP/2.
    Grpc,
    #[serde(rename = "WebSocket")]
    /// WebSocket.
    WebSocket,
}

impl EndpointProtocol {
    /// Whether requests carry a path (everything but TCP and UDP).
    pub fn has_path(self) -> bool {
        !matches!(self, Self::Tcp | Self::Udp)
    }
}

/// Who can reach an endpoint.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Visibility {
    /// Other components of the same project and environment.
    #[default]
    Project,
    /// Components of any project of the organization, same environment.
    Organization,
    /// Anyone, through the gateway.
    Public,
}

/// Something the component uses. Either a service by type (`{name: database, type: postgres}`), or another
/// component's endpoint (`{component: user-service, endpoint: api, project: shop}`, `project` defaulting to the
/// component's own and `name` to the target component's name).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Dependency {
    /// Unique within the component; names the injected variables (`<NAME>_URL`, `_HOST`, `_PORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A service type such as `postgres` or `redis`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// The component whose endpoint is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// The endpoint of `component`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// The project of `component`, when not this component's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project: Option<String>,
}

impl KindSpec for ComponentSpec {
    const KIND: Kind = Kind::Component;

    fn apply_defaults(&mut self, _meta: &ObjectMeta) {
        for dep in &mut self.dependencies {
            if dep.name.is_none() && dep.type_.is_none() {
                dep.name = dep.component.clone();
            }
        }
    }

    fn validate(&self, meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        let scheduled = self.type_ == ComponentType::ScheduledTask;
        match (&self.schedule, scheduled) {
            (None, true) => errors.push(FieldError::new(
                "spec.schedule",
                "required for scheduled-task components (a cron expression such as \"0 3 * * *\")",
            )),
            (Some(_), false) => errors.push(FieldError::new(
                "spec.schedule",
                "only valid for scheduled-task components",
            )),
            (Some(s), true) => {
                if let Err(why) = cron::check(s) {
                    errors.push(FieldError::new(
                        "spec.schedule",
                        format!("{s:?} is not a valid cron schedule: {why}"),
                    ));
                }
            }
            (None, false) => {}
        }
        if !scheduled {
            for (set, path) in [
                (self.timezone.is_some(), "spec.timezone"),
                (self.concurrency_policy.is_some(), "spec.concurrencyPolicy"),
                (self.run_history_limit.is_some(), "spec.runHistoryLimit"),
            ] {
                if set {
                    errors.push(FieldError::new(
                        path,
                        "only valid for scheduled-task components",
                    ));
                }
            }
        }
        if let Some(tz) = &self.timezone {
            super::check_timezone(errors, "spec.timezone", tz);
        }
        if let Some(n) = self.run_history_limit {
            if n == 0 || n > MAX_RUN_HISTORY {
                errors.push(FieldError::new(
                    "spec.runHistoryLimit",
                    format!("must be 1-{MAX_RUN_HISTORY}, got {n}"),
                ));
            }
        }
        if scheduled && !self.endpoints.is_empty() {
            errors.push(FieldError::new(
                "spec.endpoints",
                "not valid for scheduled-task components",
            ));
        }
        if self.replicas > MAX_REPLICAS {
            errors.push(FieldError::new(
                "spec.replicas",
                format!("must be 0-{MAX_REPLICAS}, got {}", self.replicas),
            ));
        }
        if let Some(src) = &self.source {
            let git = "spec.source.git";
            check_not_blank(errors, &field(git, "repository"), &src.git.repository);
            if src.git.repository.chars().any(char::is_whitespace) {
                errors.push(FieldError::new(
                    field(git, "repository"),
                    "must not contain whitespace",
                ));
            }
            check_not_blank(errors, &field(git, "branch"), &src.git.branch);
            if let Some(p) = &src.git.path {
                if p.starts_with('/') || p.split('/').any(|seg| seg == "..") {
                    errors.push(FieldError::new(
                        field(git, "path"),
                        format!("{p:?} must be a relative path inside the repository"),
                    ));
                }
            }
        }
        if let Some(build) = &self.build {
            if build.buildpacks && build.dockerfile.is_some() {
                errors.push(FieldError::new(
                    "spec.build",
                    "set either buildpacks or dockerfile, not both",
                ));
            }
            if let Some(p) = &build.pipeline {
                check_name(errors, "spec.build.pipeline", p);
            }
            if let Some(b) = &build.branch {
                super::pipeline::check_ref_name(errors, "spec.build.branch", b);
            }
            if let Some(o) = &build.output {
                check_not_blank(errors, "spec.build.output", o);
            }
            if self.source.is_none() && build.pipeline.is_none() {
                errors.push(FieldError::new(
                    "spec.build",
                    "requires spec.source or spec.build.pipeline (there is nothing to build)",
                ));
            }
        }
        let runs_something = self.source.is_some()
            || self.build.as_ref().is_some_and(|b| b.pipeline.is_some())
            || self
                .workload
                .as_ref()
                .is_some_and(|w| w.image.is_some() || w.command.is_some());
        if !runs_something {
            errors.push(FieldError::new(
                "spec",
                "nothing to run: set spec.source (built into an image), spec.build.pipeline, spec.workload.image or spec.workload.command",
            ));
        }
        if let Some(w) = &self.workload {
            w.validate("spec.workload", errors);
        }
        if let Some(r) = &self.resources {
            r.validate("spec.resources", errors);
        }
        if let Some(p) = &self.probes {
            p.validate("spec.probes", errors);
        }
        check_unique_names(
            errors,
            "spec.endpoints",
            self.endpoints.iter().map(|e| e.name.as_str()),
        );
        for (i, ep) in self.endpoints.iter().enumerate() {
            let p = index("spec.endpoints", i);
            check_port(errors, &field(&p, "port"), ep.port);
            if !ep.path.starts_with('/') {
                errors.push(FieldError::new(
                    field(&p, "path"),
                    format!("{:?} must start with '/'", ep.path),
                ));
            } else if !ep.protocol.has_path() && ep.path != "/" {
                errors.push(FieldError::new(
                    field(&p, "path"),
                    "only valid for HTTP, HTTPS, gRPC and WebSocket endpoints",
                ));
            }
        }
        self.validate_dependencies(meta, errors);
    }
}

impl ComponentSpec {
    fn validate_dependencies(&self, meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        for (i, dep) in self.dependencies.iter().enumerate() {
            let p = index("spec.dependencies", i);
            let by_component = dep.component.is_some() || dep.endpoint.is_some();
            match (&dep.type_, by_component) {
                (Some(_), true) => errors.push(FieldError::new(
                    &p,
                    "set either type (a service such as postgres) or component and endpoint, not both",
                )),
                (None, false) => errors.push(FieldError::new(
                    &p,
                    "set either type (a service such as postgres, with a name) or component and endpoint",
                )),
                (Some(t), false) => {
                    check_name(errors, &field(&p, "type"), t);
                    if dep.name.is_none() {
                        errors.push(FieldError::new(field(&p, "name"), "required when type is set"));
                    }
                    if dep.project.is_some() {
                        errors.push(FieldError::new(field(&p, "project"), "only valid together with component"));
                    }
                }
                (None, true) => {
                    for (f, v) in [("component", &dep.component), ("endpoint", &dep.endpoint)] {
                        match v {
                            Some(v) => check_name(errors, &field(&p, f), v),
                            None => errors.push(FieldError::new(
                                field(&p, f),
                                "required when depending on a component's endpoint",
                            )),
                        }
                    }
                    if let Some(proj) = &dep.project {
                        check_name(errors, &field(&p, "project"), proj);
                    }
                    let same_project = dep.project.is_none() || dep.project == meta.project;
                    if same_project && dep.component.as_deref() == Some(meta.name.as_str()) {
                        errors.push(FieldError::new(field(&p, "component"), "a component cannot depend on itself"));
                    }
                }
            }
        }
        let named: Vec<(usize, &Dependency, &str)> = self
            .dependencies
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.name.as_deref().map(|n| (i, d, n)))
            .collect();
        let mut seen = FirstSeen::default();
        for &(i, dep, name) in &named {
            let p = field(&index("spec.dependencies", i), "name");
            // A name derived from `component` was already checked there.
            if dep.component.as_deref() != Some(name) {
                check_name(errors, &p, name);
            }
            if let Some(first) = seen.check(name, i) {
                errors.push(FieldError::new(
                    p,
                    format!(
                        "duplicate name {name:?} (also at {}); set name to tell them apart",
                        index("spec.dependencies", first)
                    ),
                ));
            }
        }
    }
}
