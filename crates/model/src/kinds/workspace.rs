//! Template, TemplateVersion and Workspace: remote development environments. A Template says how a workspace
//! is built (its provisioner, parameters, and what the agent inside runs); each distinct content of a template
//! is kept as an immutable TemplateVersion named by its hash; a Workspace is one user's instance of a version,
//! with parameter values and a desired state.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_name, check_not_blank, check_unique_names, default_true, KindSpec};
use crate::names::{field, index, key};
use crate::{FieldError, Kind, ObjectMeta};

/// Hex digits of the content hash in a template version's name (`<template>-<hash>`).
pub const TEMPLATE_HASH_LEN: usize = 10;
/// The most bytes of files a template may carry.
pub const MAX_TEMPLATE_FILES: usize = 1 << 20;

/// What builds a template's workspaces.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ProvisionerType {
    /// A directory on the server's host with the agent running as a child process.
    #[default]
    Process,
    /// A container from `docker.image` with the agent injected and a volume for the home directory.
    Docker,
    /// The `terraform` binary run on the template's files.
    Terraform,
}

impl ProvisionerType {
    /// The name manifests use: `process`, `docker` or `terraform`.
    pub fn as_str(self) -> &'static str {
        match self {
            ProvisionerType::Process => "process",
            ProvisionerType::Docker => "docker",
            ProvisionerType::Terraform => "terraform",
        }
    }
}

/// The spec of a Template.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateSpec {
    /// What the template is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// What builds workspaces (default `process`).
    #[serde(default)]
    pub provisioner: ProvisionerType,
    /// Tags a provisioner must carry to take this template's jobs (default: none, any provisioner).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provisioner_tags: BTreeMap<String, String>,
    /// For `docker`: the image and the home volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerTemplate>,
    /// The template's files (path → text), e.g. Terraform configuration. `kiln template push DIR` fills this
    /// from the directory.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// What a workspace's owner chooses.
    #[serde(default)]
    pub parameters: Vec<Parameter>,
    /// What the agent inside each workspace runs and offers.
    #[serde(default)]
    pub agent: AgentSpec,
}

/// A docker template's container.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DockerTemplate {
    /// The image (already present on the Docker Engine; nothing is pulled).
    pub image: String,
    /// Keep the home directory in a volume that survives stop (default true).
    #[serde(default = "default_true")]
    pub persistent_home: bool,
    /// CPUs the container may use (a quantity: `2`, `500m`), or `${name}` for a parameter's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<String>,
    /// Memory the container may use (a quantity: `512Mi`, `2Gi`), or `${name}` for a parameter's value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

impl DockerTemplate {
    /// The container's CPU limit in cores and memory limit in bytes, with parameters substituted; an error
    /// names the field and the value.
    pub fn limits(
        &self,
        parameters: &BTreeMap<String, String>,
    ) -> Result<(Option<f64>, Option<u64>), FieldError> {
        let cpus = match &self.cpus {
            Some(c) => Some(resource_value("spec.docker.cpus", c, parameters)?),
            None => None,
        };
        let memory = match &self.memory {
            Some(m) => Some(resource_value("spec.docker.memory", m, parameters)? as u64),
            None => None,
        };
        Ok((cpus, memory))
    }
}

/// The parameter a `${name}` value refers to.
fn parameter_ref(value: &str) -> Option<&str> {
    value.strip_prefix("${")?.strip_suffix('}')
}

/// A positive quantity, given literally or through a `${parameter}`.
fn resource_value(
    path: &str,
    value: &str,
    parameters: &BTreeMap<String, String>,
) -> Result<f64, FieldError> {
    let (text, from) = match parameter_ref(value) {
        Some(name) => match parameters.get(name) {
            Some(v) => (v.as_str(), format!(" (parameter {name})")),
            None => {
                return Err(FieldError::new(
                    path,
                    format!("parameter {name} has no value"),
                ))
            }
        },
        None => (value, String::new()),
    };
    let q = crate::Quantity(text.to_string());
    q.validate(path)
        .map_err(|e| FieldError::new(path, format!("{}{from}", e.message)))?;
    match q.value() {
        Some(v) if v > 0.0 => Ok(v),
        _ => Err(FieldError::new(
            path,
            format!("{text:?}{from} must be more than zero"),
        )),
    }
}

/// The type of a parameter's value.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ParameterType {
    /// Any text.
    #[default]
    #[serde(rename = "string")]
    String,
    /// A decimal number.
    #[serde(rename = "number")]
    Number,
    /// `true` or `false`.
    #[serde(rename = "bool")]
    Bool,
    /// A JSON array of strings.
    #[serde(rename = "list(string)")]
    ListString,
}

/// A parameter the owner of a workspace sets.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Parameter {
    /// The name workspaces use (`-p NAME=VALUE`); letters, digits and `_`.
    pub name: String,
    /// Shown instead of the name.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    /// What the parameter does.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Default `string`.
    #[serde(rename = "type", default)]
    pub type_: ParameterType,
    /// The value when none is given; without one, the parameter is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    /// Whether a workspace may change the value after it was created (default true).
    #[serde(default = "default_true")]
    pub mutable: bool,
    /// When set, the value must be one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<ParameterOption>,
    /// Bounds for numbers, lengths for strings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation: Option<Validation>,
}

/// One value a parameter may take.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParameterOption {
    /// The value.
    pub value: String,
    /// Shown instead of the value.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
}

/// Limits on a parameter's value: `min`/`max` bound a number's value, or a string's length.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Validation {
    /// The smallest number, or the shortest length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    /// The largest number, or the longest length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// Replaces the generated message when the value is out of bounds.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

/// What the agent in a workspace runs and offers.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentSpec {
    /// The directory shells and scripts start in (default: the home directory).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub dir: String,
    /// Environment for scripts, shells and apps.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Seconds the agent may take to connect after the build before the workspace says so (default 120).
    #[serde(default = "default_connection_timeout")]
    pub connection_timeout_seconds: u32,
    /// Scripts run at start (and stop).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scripts: Vec<Script>,
    /// Web applications reached through the server.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apps: Vec<App>,
    /// Values the agent measures on an interval and shows with the workspace.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata: Vec<MetadataItem>,
}

fn default_connection_timeout() -> u32 {
    120
}

impl Default for AgentSpec {
    fn default() -> Self {
        AgentSpec {
            dir: String::new(),
            env: BTreeMap::new(),
            connection_timeout_seconds: default_connection_timeout(),
            scripts: Vec::new(),
            apps: Vec::new(),
            metadata: Vec::new(),
        }
    }
}

fn default_script_timeout() -> u32 {
    300
}

/// A script the agent runs.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Script {
    /// Shown in logs and status.
    pub name: String,
    /// Run with `sh -c`.
    pub script: String,
    /// Run when the agent starts (default true).
    #[serde(default = "default_true")]
    pub run_on_start: bool,
    /// Run when the workspace stops (default false).
    #[serde(default)]
    pub run_on_stop: bool,
    /// Logins wait until this script is done (default false).
    #[serde(default)]
    pub block_login: bool,
    /// Seconds before the script is stopped and the agent reports `start_timeout` (default 300; 0: none).
    #[serde(default = "default_script_timeout")]
    pub timeout_seconds: u32,
}

/// Who may open an app.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ShareLevel {
    /// The workspace's owner only.
    #[default]
    Owner,
    /// Anyone signed in to the server.
    Authenticated,
    /// Anyone.
    Public,
}

/// A web application in the workspace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct App {
    /// Its part of the URL: `/@<owner>/<workspace>/apps/<slug>/`.
    pub slug: String,
    /// Shown instead of the slug.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    /// Where the app listens inside the workspace, e.g. `http://127.0.0.1:3000`.
    pub url: String,
    /// Who may open it (default `owner`).
    #[serde(default)]
    pub share: ShareLevel,
    /// Served at the root of its own host name instead of under a path.
    #[serde(default)]
    pub subdomain: bool,
    /// How the agent tells the app is up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
}

/// An HTTP check of an app.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Healthcheck {
    /// An HTTP URL inside the workspace; 2xx and 3xx are healthy.
    pub url: String,
    /// Default 5.
    #[serde(default = "default_interval")]
    pub interval_seconds: u32,
    /// Failures in a row before the app is unhealthy (default 3).
    #[serde(default = "default_threshold")]
    pub threshold: u32,
}

fn default_interval() -> u32 {
    5
}

fn default_threshold() -> u32 {
    3
}

/// A value the agent measures with a command on an interval.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MetadataItem {
    /// The key the value is shown under.
    pub key: String,
    /// Shown instead of the key.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub display_name: String,
    /// Run with `sh -c`; its trimmed output is the value.
    pub script: String,
    /// Default 10.
    #[serde(default = "default_metadata_interval")]
    pub interval_seconds: u32,
    /// Default 5.
    #[serde(default = "default_metadata_timeout")]
    pub timeout_seconds: u32,
}

fn default_metadata_interval() -> u32 {
    10
}

fn default_metadata_timeout() -> u32 {
    5
}

impl KindSpec for TemplateSpec {
    const KIND: Kind = Kind::Template;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        match (self.provisioner, &self.docker) {
            (ProvisionerType::Docker, None) => errors.push(FieldError::new(
                "spec.docker",
                "required with provisioner docker: the image workspaces run",
            )),
            (ProvisionerType::Docker, Some(d)) => {
                check_not_blank(errors, "spec.docker.image", &d.image);
                for (path, value) in [
                    ("spec.docker.cpus", &d.cpus),
                    ("spec.docker.memory", &d.memory),
                ] {
                    let Some(v) = value else { continue };
                    match parameter_ref(v) {
                        Some(name) if !self.parameters.iter().any(|p| p.name == name) => {
                            errors.push(FieldError::new(
                                path,
                                format!("refers to parameter {name}, which spec.parameters does not declare"),
                            ))
                        }
                        Some(_) => {}
                        None => {
                            if let Err(e) = resource_value(path, v, &BTreeMap::new()) {
                                errors.push(e);
                            }
                        }
                    }
                }
            }
            (p, Some(_)) => errors.push(FieldError::new(
                "spec.docker",
                format!("only for provisioner docker, not {}", p.as_str()),
            )),
            _ => {}
        }
        if self.provisioner == ProvisionerType::Terraform
            && !self.files.keys().any(|k| k.ends_with(".tf"))
        {
            errors.push(FieldError::new(
                "spec.files",
                "provisioner terraform needs at least one .tf file",
            ));
        }
        let mut total = 0;
        for (path, text) in &self.files {
            total += path.len() + text.len();
            if let Err(why) = check_file_path(path) {
                errors.push(FieldError::new(key("spec.files", path), why));
            }
        }
        if total > MAX_TEMPLATE_FILES {
            errors.push(FieldError::new(
                "spec.files",
                format!("{total} bytes of files, over the limit of {MAX_TEMPLATE_FILES}"),
            ));
        }
        check_unique_names(
            errors,
            "spec.parameters",
            self.parameters.iter().map(|p| p.name.as_str()),
        );
        for (i, p) in self.parameters.iter().enumerate() {
            p.check(&index("spec.parameters", i), errors);
        }
        self.agent.check("spec.agent", errors);
    }
}

/// A relative path without `..`, `.` or empty parts.
fn check_file_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') || path.contains('\\') || path.contains('\0') {
        return Err(format!(
            "{path:?} must be a relative path with '/' separators"
        ));
    }
    if path.split('/').any(|part| matches!(part, "" | "." | "..")) {
        return Err(format!(
            "{path:?} must not contain empty, '.' or '..' parts"
        ));
    }
    Ok(())
}

impl Parameter {
    fn check(&self, path: &str, errors: &mut Vec<FieldError>) {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
            || self.name.starts_with(|c: char| c.is_ascii_digit())
        {
            errors.push(FieldError::new(
                field(path, "name"),
                format!(
                    "{:?} is not a parameter name: use letters, digits and '_', not starting with a digit",
                    self.name
                ),
            ));
        }
        if let Some(v) = &self.validation {
            if let (Some(min), Some(max)) = (v.min, v.max) {
                if min > max {
                    errors.push(FieldError::new(
                        field(path, "validation"),
                        format!("min {min} is greater than max {max}"),
                    ));
                }
            }
            if matches!(self.type_, ParameterType::Bool | ParameterType::ListString)
                && (v.min.is_some() || v.max.is_some())
            {
                errors.push(FieldError::new(
                    field(path, "validation"),
                    "min and max apply to numbers and strings only",
                ));
            }
        }
        for (i, o) in self.options.iter().enumerate() {
            if let Err(why) = self.check_type(&o.value) {
                errors.push(FieldError::new(
                    field(&index(&field(path, "options"), i), "value"),
                    why,
                ));
            }
        }
        if let Some(d) = &self.default {
            if let Err(why) = self.check_value(d) {
                errors.push(FieldError::new(
                    field(path, "default"),
                    format!("default {why}"),
                ));
            }
        }
    }

    fn check_type(&self, value: &str) -> Result<(), String> {
        match self.type_ {
            ParameterType::String => Ok(()),
            ParameterType::Number => value
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .map(|_| ())
                .ok_or_else(|| format!("{value:?} is not a number")),
            ParameterType::Bool => match value {
                "true" | "false" => Ok(()),
                _ => Err(format!("{value:?} is not true or false")),
            },
            ParameterType::ListString => serde_json::from_str::<Vec<String>>(value)
                .map(|_| ())
                .map_err(|_| {
                    format!("{value:?} is not a JSON list of strings, e.g. [\"a\",\"b\"]")
                }),
        }
    }

    /// Checks a value against the type, the options and the bounds; the error says what is wrong.
    pub fn check_value(&self, value: &str) -> Result<(), String> {
        self.check_type(value)?;
        if !self.options.is_empty() && !self.options.iter().any(|o| o.value == value) {
            let list: Vec<&str> = self.options.iter().map(|o| o.value.as_str()).collect();
            return Err(format!(
                "{value:?} is not one of the options: {}",
                list.join(", ")
            ));
        }
        let Some(v) = &self.validation else {
            return Ok(());
        };
        let (measure, what) = match self.type_ {
            ParameterType::Number => (value.trim().parse::<f64>().unwrap_or(f64::NAN), "value"),
            ParameterType::String => (value.chars().count() as f64, "length"),
            _ => return Ok(()),
        };
        let low = v.min.is_some_and(|min| measure < min);
        let high = v.max.is_some_and(|max| measure > max);
        if !(low || high) {
            return Ok(());
        }
        if !v.error.is_empty() {
            return Err(v.error.clone());
        }
        let bound = match (v.min, v.max) {
            (Some(a), Some(b)) => format!("between {a} and {b}"),
            (Some(a), None) => format!("at least {a}"),
            (None, Some(b)) => format!("at most {b}"),
            (None, None) => unreachable!("out of bounds without bounds"),
        };
        Err(format!("{value:?}: the {what} must be {bound}"))
    }
}

impl AgentSpec {
    fn check(&self, path: &str, errors: &mut Vec<FieldError>) {
        check_unique_names(
            errors,
            &field(path, "scripts"),
            self.scripts.iter().map(|s| s.name.as_str()),
        );
        for (i, s) in self.scripts.iter().enumerate() {
            let p = index(&field(path, "scripts"), i);
            check_not_blank(errors, &field(&p, "script"), &s.script);
            if !s.run_on_start && !s.run_on_stop {
                errors.push(FieldError::new(
                    p,
                    "runs neither on start nor on stop; set runOnStart or runOnStop",
                ));
            }
        }
        let mut slugs: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, a) in self.apps.iter().enumerate() {
            let p = index(&field(path, "apps"), i);
            check_name(errors, &field(&p, "slug"), &a.slug);
            if let Some(first) = slugs.insert(&a.slug, i) {
                errors.push(FieldError::new(
                    field(&p, "slug"),
                    format!(
                        "duplicate slug {:?} (also at {}.apps[{first}])",
                        a.slug, path
                    ),
                ));
            }
            if let Err(why) = check_http_url(&a.url) {
                errors.push(FieldError::new(field(&p, "url"), why));
            }
            if let Some(h) = &a.healthcheck {
                if let Err(why) = check_http_url(&h.url) {
                    errors.push(FieldError::new(
                        field(&field(&p, "healthcheck"), "url"),
                        why,
                    ));
                }
                if h.interval_seconds == 0 {
                    errors.push(FieldError::new(
                        field(&field(&p, "healthcheck"), "intervalSeconds"),
                        "must be at least 1",
                    ));
                }
            }
        }
        check_unique_names(
            errors,
            &field(path, "metadata"),
            self.metadata.iter().map(|m| m.key.as_str()),
        );
        for (i, m) in self.metadata.iter().enumerate() {
            let p = index(&field(path, "metadata"), i);
            check_not_blank(errors, &field(&p, "script"), &m.script);
            if m.interval_seconds == 0 {
                errors.push(FieldError::new(
                    field(&p, "intervalSeconds"),
                    "must be at least 1",
                ));
            }
        }
    }
}

/// An `http://host:port[/path]` URL inside the workspace.
fn check_http_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "{url:?} must start with http:// (the agent reaches the app inside the workspace)"
        ));
    };
    let hostport = rest.split('/').next().unwrap_or("");
    let port = hostport.rsplit_once(':').map(|(_, p)| p);
    match port.map(str::parse::<u16>) {
        Some(Ok(p)) if p > 0 => Ok(()),
        _ => Err(format!(
            "{url:?} must name a port, e.g. http://127.0.0.1:3000"
        )),
    }
}

/// The spec of a TemplateVersion: an immutable snapshot of a template's spec, named
/// `<template>-<first 10 hex digits of the hash>`. Written by the server when a template changes.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TemplateVersionSpec {
    /// The template this is a version of.
    pub template: String,
    /// Hex SHA-256 of the canonical JSON of `snapshot`.
    pub hash: String,
    /// Its content.
    pub snapshot: TemplateSpec,
}

impl KindSpec for TemplateVersionSpec {
    const KIND: Kind = Kind::TemplateVersion;

    fn validate(&self, meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_name(errors, "spec.template", &self.template);
        if self.hash.len() < TEMPLATE_HASH_LEN || !self.hash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            errors.push(FieldError::new(
                "spec.hash",
                format!("must be at least {TEMPLATE_HASH_LEN} hexadecimal digits"),
            ));
        } else {
            let expected = format!("{}-{}", self.template, &self.hash[..TEMPLATE_HASH_LEN]);
            if meta.name != expected {
                errors.push(FieldError::new(
                    "metadata.name",
                    format!(
                        "a version of template {} must be named {expected}",
                        self.template
                    ),
                ));
            }
        }
        let mut inner = Vec::new();
        self.snapshot.validate(meta, &mut inner);
        errors.extend(
            inner
                .into_iter()
                .map(|e| FieldError::new(e.path.replacen("spec.", "spec.snapshot.", 1), e.message)),
        );
    }
}

/// What the owner wants a workspace to be.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum DesiredState {
    /// Built and running, the agent connected.
    #[default]
    Running,
    /// Stopped: ephemeral resources gone, persistent ones kept.
    Stopped,
}

/// Start a stopped workspace on a schedule.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Autostart {
    /// Five-field cron, e.g. `0 9 * * 1-5`.
    pub schedule: String,
    /// IANA time zone (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
}

/// The spec of a Workspace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkspaceSpec {
    /// The template (same organization).
    pub template: String,
    /// The template version it is built from; the server sets the newest at creation, and a change is an
    /// update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_version: Option<String>,
    /// The user it belongs to; the server sets the creator.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub owner: String,
    /// Parameter values (missing ones take the template's defaults; the server fills them in).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Default `running`.
    #[serde(default)]
    pub state: DesiredState,
    /// Start the stopped workspace on a schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autostart: Option<Autostart>,
    /// Stop after this long without activity (SSH sessions, port forwards, app traffic), e.g. `8h`, `90m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

impl KindSpec for WorkspaceSpec {
    const KIND: Kind = Kind::Workspace;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_name(errors, "spec.template", &self.template);
        if let Some(v) = &self.template_version {
            check_name(errors, "spec.templateVersion", v);
        }
        if let Some(a) = &self.autostart {
            if let Err(why) = crate::cron::check(&a.schedule) {
                errors.push(FieldError::new("spec.autostart.schedule", why));
            }
            if let Some(tz) = &a.timezone {
                check_not_blank(errors, "spec.autostart.timezone", tz);
            }
        }
        if let Some(ttl) = &self.ttl {
            match parse_duration(ttl) {
                Ok(d) if d >= 60 => {}
                Ok(_) => errors.push(FieldError::new("spec.ttl", "must be at least 1m")),
                Err(why) => errors.push(FieldError::new("spec.ttl", why)),
            }
        }
    }
}

/// Seconds in a duration written like `8h`, `90m`, `1h30m`, `45s`.
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a duration; write e.g. 8h, 90m, 1h30m");
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n: u64 = digits.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(bad)?;
        digits.clear();
    }
    if !digits.is_empty() || total == 0 && s.trim().is_empty() {
        return Err(bad());
    }
    Ok(total)
}

/// A workspace's parameter values checked against its template: every value known and valid, defaults
/// filled in, required ones present, and, when the workspace existed (`previous`), no immutable one changed.
/// Errors are under `spec.parameters.<name>`.
pub fn resolve_parameters(
    template: &TemplateSpec,
    given: &BTreeMap<String, String>,
    previous: Option<&BTreeMap<String, String>>,
) -> Result<BTreeMap<String, String>, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut out = BTreeMap::new();
    for name in given.keys() {
        if !template.parameters.iter().any(|p| &p.name == name) {
            let known: Vec<&str> = template
                .parameters
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            errors.push(FieldError::new(
                key("spec.parameters", name),
                if known.is_empty() {
                    "the template has no parameters".to_owned()
                } else {
                    format!(
                        "the template has no such parameter (it has: {})",
                        known.join(", ")
                    )
                },
            ));
        }
    }
    for p in &template.parameters {
        let path = key("spec.parameters", &p.name);
        let before = previous.and_then(|prev| prev.get(&p.name));
        let value = given.get(&p.name).or(before).or(p.default.as_ref());
        let Some(value) = value else {
            errors.push(FieldError::new(
                path,
                "required: the template gives no default",
            ));
            continue;
        };
        if let Err(why) = p.check_value(value) {
            errors.push(FieldError::new(path, why));
            continue;
        }
        if let Some(before) = before {
            if !p.mutable && before != value {
                errors.push(FieldError::new(
                    path,
                    format!("immutable parameter: it was {before:?} and cannot become {value:?}; create a new workspace instead"),
                ));
                continue;
            }
        }
        out.insert(p.name.clone(), value.clone());
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> TemplateSpec {
        let yaml = r#"
parameters:
  - {name: region, options: [{value: eu}, {value: us}], mutable: false, default: eu}
  - {name: cpus, type: number, default: "2", validation: {min: 1, max: 8}}
  - {name: repo}
  - {name: tools, type: "list(string)", default: "[]"}
  - {name: motd, validation: {max: 5, error: "keep it short"}, default: hi}
"#;
        serde_yaml::from_str(yaml).expect("a template")
    }

    fn values(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn messages(r: Result<BTreeMap<String, String>, Vec<FieldError>>) -> Vec<String> {
        r.expect_err("refused")
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn parameters_take_defaults_and_refuse_what_breaks_the_template() {
        let t = template();
        let ok = resolve_parameters(&t, &values(&[("repo", "shop")]), None).unwrap();
        assert_eq!(
            ok,
            values(&[
                ("region", "eu"),
                ("cpus", "2"),
                ("repo", "shop"),
                ("tools", "[]"),
                ("motd", "hi")
            ])
        );
        assert_eq!(
            messages(resolve_parameters(
                &t,
                &values(&[("cpus", "9"), ("region", "asia"), ("tools", "x"), ("gpu", "1"), ("motd", "too long")]),
                None
            )),
            [
                "spec.parameters.gpu: the template has no such parameter (it has: region, cpus, repo, tools, motd)",
                "spec.parameters.region: \"asia\" is not one of the options: eu, us",
                "spec.parameters.cpus: \"9\": the value must be between 1 and 8",
                "spec.parameters.repo: required: the template gives no default",
                "spec.parameters.tools: \"x\" is not a JSON list of strings, e.g. [\"a\",\"b\"]",
                "spec.parameters.motd: keep it short",
            ]
        );
    }

    #[test]
    fn an_immutable_parameter_keeps_its_value_and_a_mutable_one_may_change() {
        let t = template();
        let before =
            resolve_parameters(&t, &values(&[("repo", "shop"), ("region", "us")]), None).unwrap();
        // Unchanged values carry over when an update leaves them out.
        let same = resolve_parameters(&t, &values(&[("cpus", "4")]), Some(&before)).unwrap();
        assert_eq!(same["region"], "us");
        assert_eq!(same["cpus"], "4");
        assert_eq!(
            messages(resolve_parameters(&t, &values(&[("region", "eu")]), Some(&before))),
            ["spec.parameters.region: immutable parameter: it was \"us\" and cannot become \"eu\"; create a new workspace instead"]
        );
    }

    #[test]
    fn docker_limits_come_from_literals_or_declared_parameters() {
        let mut t = template();
        t.provisioner = ProvisionerType::Docker;
        t.docker = Some(DockerTemplate {
            image: "dev".into(),
            persistent_home: true,
            cpus: Some("${cpus}".into()),
            memory: Some("512Mi".into()),
        });
        let meta = ObjectMeta::default();
        let mut errors = Vec::new();
        t.validate(&meta, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        let d = t.docker.clone().unwrap();
        assert_eq!(
            d.limits(&values(&[("cpus", "1.5")])).unwrap(),
            (Some(1.5), Some(512 * 1024 * 1024))
        );
        assert_eq!(
            d.limits(&values(&[("cpus", "0")])).unwrap_err().to_string(),
            "spec.docker.cpus: \"0\" (parameter cpus) must be more than zero"
        );

        t.docker = Some(DockerTemplate {
            cpus: Some("${gpus}".into()),
            memory: Some("lots".into()),
            ..d
        });
        let mut errors = Vec::new();
        t.validate(&meta, &mut errors);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                "spec.docker.cpus: refers to parameter gpus, which spec.parameters does not declare",
                "spec.docker.memory: \"lots\" is not a valid quantity: it must start with a non-negative number (examples: 500m, 2, 512Mi, 1Ti)",
            ]
        );
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("8h"), Ok(8 * 3600));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert_eq!(parse_duration("45s"), Ok(45));
        for bad in ["", "8", "h", "8x", "1h 30m", "99999999999999999999d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}

/// What a build does to a workspace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Transition {
    /// Make the workspace's resources and start its agent.
    #[default]
    Start,
    /// Remove its ephemeral resources; persistent ones (the home directory) stay.
    Stop,
    /// Remove everything.
    Delete,
}

impl Transition {
    /// The lower-case name, as in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::Start => "start",
            Transition::Stop => "stop",
            Transition::Delete => "delete",
        }
    }
}

/// The spec of a ProvisionerJob: one build of a workspace, queued for a provisioner. Written by the server's
/// workspace controller, never by users; its status is the queue's record (phase, lease, epoch).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProvisionerJobSpec {
    /// The workspace it builds (same organization).
    pub workspace: String,
    /// The build number, counting from 1 per workspace.
    pub build: u32,
    /// What the build does.
    pub transition: Transition,
    /// The template version it builds from.
    pub template_version: String,
    /// The provider that runs it.
    pub provisioner: ProvisionerType,
    /// Tags a provisioner must carry to take it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// The workspace's owner.
    pub owner: String,
    /// The workspace's parameter values.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// Set to ask the provisioner running it to stop; a queued job is canceled at once.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

impl KindSpec for ProvisionerJobSpec {
    const KIND: Kind = Kind::ProvisionerJob;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_name(errors, "spec.workspace", &self.workspace);
        check_name(errors, "spec.templateVersion", &self.template_version);
        if self.build == 0 {
            errors.push(FieldError::new("spec.build", "must be at least 1"));
        }
    }
}
