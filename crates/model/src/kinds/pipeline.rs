//! Pipeline (CI steps run on a source repository) and PipelineRun (one execution of a pipeline, which is also
//! the runner queue's job).

use std::collections::{BTreeMap, HashMap};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{check_name, check_not_blank, check_unique_names, parse_duration, KindSpec};
use crate::names::{field, index, key};
use crate::{FieldError, Kind, ObjectMeta};

/// Label on a PipelineRun naming its pipeline.
pub const PIPELINE_LABEL: &str = "kiln.dev/pipeline";
/// The most steps a pipeline has.
pub const MAX_STEPS: usize = 200;
/// The most attempts a step's retry policy allows.
pub const MAX_ATTEMPTS: u32 = 10;
/// The most steps one step's `matrix` expands into.
pub const MAX_MATRIX: usize = 32;

/// The spec of a Pipeline.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSpec {
    /// The repository each run checks out.
    pub source: PipelineSource,
    /// Parameters a run may set (`kiln pipeline run --param NAME=VALUE`), given to every step as environment
    /// variables.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub params: Vec<PipelineParam>,
    /// Labels a runner must carry to take this pipeline's runs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub runner_labels: BTreeMap<String, String>,
    /// The steps, run as a graph: a step starts when every step it depends on has ended.
    pub steps: Vec<Step>,
    /// What starts runs besides `kiln pipeline run`: webhooks, cron schedules, repository polling, image pushes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
    /// Containers started before the first step and stopped after the last (databases, caches), reachable from
    /// container steps by their name and from host steps at `<NAME>_HOST`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
}

/// A container that runs beside a run's steps.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Its host name for the steps; a DNS-1123 label, unique among the services.
    pub name: String,
    /// The image it runs (present on the runner's Docker Engine).
    pub image: String,
    /// Replaces the image's command (its entrypoint's arguments stay the image's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
}

/// A step that waits for a person's approval (`kiln approve run PIPELINE/NUMBER`) instead of running commands.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Approval {
    /// What the approver is asked, shown in the run's status.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// Directories kept between runs on a runner, keyed by files' contents: restored before the step, saved after
/// it succeeds when nothing was saved under its key yet.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Cache {
    /// Directories (relative to the checkout) to keep.
    pub paths: Vec<String>,
    /// Files (relative to the checkout) whose contents make the key, e.g. `Cargo.lock`: a change of any starts a
    /// new cache entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// Put before the contents' hash in the key. Default: the step's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// Something that starts runs of a pipeline. Exactly one of `webhook`, `cron`, `poll` and `image` is set.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trigger {
    /// Unique within the pipeline; a DNS-1123 label. A webhook's URL ends with it.
    pub name: String,
    /// Branches (globs, `*` for any characters) whose pushes start runs; for pull requests, the branch they
    /// target. Empty: any branch. Tags, cron and image triggers ignore it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branches: Vec<String>,
    /// Started by a Git host's webhook, at `POST /api/v1/hooks/<org>/<pipeline>/<trigger>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookTrigger>,
    /// Started on a cron schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cron: Option<CronTrigger>,
    /// Started when polling the source repository finds a branch (or tag) moved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub poll: Option<PollTrigger>,
    /// Started by a registry's push notification (Docker Registry v2 notification format) at the webhook URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageTrigger>,
}

impl Trigger {
    /// The trigger's type, as manifests name it.
    pub fn type_name(&self) -> &'static str {
        match (&self.webhook, &self.cron, &self.poll, &self.image) {
            (Some(_), ..) => "webhook",
            (_, Some(_), ..) => "cron",
            (_, _, Some(_), _) => "poll",
            (.., Some(_)) => "image",
            _ => "none",
        }
    }

    /// Whether a push to (or a pull request into) `branch` passes the trigger's branch filter.
    pub fn accepts_branch(&self, branch: &str) -> bool {
        self.branches.is_empty() || self.branches.iter().any(|g| glob_match(g, branch))
    }
}

/// The Git hosts whose webhooks Kiln reads.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GitProvider {
    /// GitHub: signed with `X-Hub-Signature-256`, event in `X-GitHub-Event`.
    Github,
    /// GitLab: the secret token in `X-Gitlab-Token`, event in `X-Gitlab-Event`.
    Gitlab,
    /// Gitea (and Forgejo): signed with `X-Gitea-Signature`, event in `X-Gitea-Event`.
    Gitea,
}

impl GitProvider {
    /// The name used in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            GitProvider::Github => "github",
            GitProvider::Gitlab => "gitlab",
            GitProvider::Gitea => "gitea",
        }
    }
}

/// A key of a Secret (same organization).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    /// The Secret.
    pub secret: String,
    /// The key within it.
    pub key: String,
}

/// A webhook trigger.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WebhookTrigger {
    /// Which host sends it, which decides how it is signed and what its payloads look like.
    pub provider: GitProvider,
    /// The webhook's secret (GitHub, Gitea: the HMAC key; GitLab: the token).
    pub secret: SecretKeyRef,
    /// The events that start runs: `push`, `tag`, `pull_request`. Default: all three.
    #[serde(default = "default_hook_events")]
    pub events: Vec<Event>,
}

fn default_hook_events() -> Vec<Event> {
    vec![Event::Push, Event::Tag, Event::PullRequest]
}

/// A cron trigger.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CronTrigger {
    /// A five-field cron expression or a macro such as `@daily`.
    pub schedule: String,
    /// The IANA time zone the schedule is read in. Default `UTC`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// The branch a scheduled run checks out. Default: the source's branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
}

/// A repository polling trigger, for repositories that cannot send webhooks.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PollTrigger {
    /// How often the repository's refs are read (`git ls-remote`), e.g. `1m`. Default `1m`.
    #[serde(default = "default_poll_interval")]
    pub interval: String,
    /// `push` (a branch moved) and, with `tag`, a tag created or moved. Default: `push`.
    #[serde(default = "default_poll_events")]
    pub events: Vec<Event>,
}

fn default_poll_interval() -> String {
    "1m".into()
}

fn default_poll_events() -> Vec<Event> {
    vec![Event::Push]
}

/// An image-push trigger.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ImageTrigger {
    /// Repositories (globs, e.g. `shop/*`) whose pushes start runs.
    pub repository: String,
    /// Tags (globs) that start runs. Empty: any tag.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The bearer token the registry sends (its notification endpoint's `Authorization: Bearer` header).
    pub secret: SecretKeyRef,
}

/// Where a pipeline's source lives.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineSource {
    /// What `git clone` takes: a URL or a path on the runner's host.
    pub repository: String,
    /// The branch a run without one checks out. Default `main`.
    #[serde(default = "default_branch")]
    pub branch: String,
}

fn default_branch() -> String {
    "main".into()
}

/// A parameter of a pipeline.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineParam {
    /// An environment variable name.
    pub name: String,
    /// The value when a run does not set it.
    #[serde(default)]
    pub default: String,
}

/// One step of a pipeline.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Step {
    /// Unique within the pipeline; a DNS-1123 label.
    pub name: String,
    /// Run in a container of this image; without one the step runs as a process on the runner's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Shell commands, run in order with `sh -e` in the run's working directory (the checked-out source).
    /// Required, except for an approval step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// Values from Secrets, given as environment variables and masked in the logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretRef>,
    /// Steps that must end before this one starts.
    #[serde(default, alias = "depends_on", skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<String>,
    /// When the step runs; without it, when every step it depends on succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<When>,
    /// How long one attempt may take, e.g. `10m`. Default `1h`.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// How a failed attempt is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    /// What the step's failure does to the run: `fail` (default) or `ignore`.
    #[serde(default)]
    pub failure: Failure,
    /// Runs the step once per combination of these variables' values, each run given them as environment
    /// variables, e.g. `{GO: ["1.22", "1.23"]}` makes `test (GO=1.22)` and `test (GO=1.23)`; steps that
    /// depend on it wait for every one.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub matrix: BTreeMap<String, Vec<String>>,
    /// Makes this an approval step: the run waits here until someone approves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<Approval>,
    /// Directories restored before the step and saved after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<Cache>,
    /// Files or directories (relative to the checkout) saved after the step succeeds, downloadable with
    /// `kiln artifacts get`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<String>,
}

impl Step {
    /// The steps this one runs as: itself, or one per combination of its matrix's values (named
    /// `name (K=v, …)`, the values added to its environment, the matrix itself cleared).
    pub fn expand(&self) -> Vec<Step> {
        if self.matrix.is_empty() {
            return vec![self.clone()];
        }
        let mut combos: Vec<Vec<(String, String)>> = vec![Vec::new()];
        for (k, values) in &self.matrix {
            combos = combos
                .into_iter()
                .flat_map(|c| {
                    values.iter().map(move |v| {
                        let mut c = c.clone();
                        c.push((k.clone(), v.clone()));
                        c
                    })
                })
                .collect();
        }
        combos
            .into_iter()
            .map(|combo| {
                let mut step = self.clone();
                step.matrix.clear();
                let label: Vec<String> = combo.iter().map(|(k, v)| format!("{k}={v}")).collect();
                step.name = format!("{} ({})", self.name, label.join(", "));
                step.environment.extend(combo);
                step
            })
            .collect()
    }

    /// How many steps its matrix makes.
    pub fn expansions(&self) -> usize {
        self.matrix.values().map(Vec::len).product()
    }
}

/// The pipeline's steps with every matrix expanded, `dependsOn` naming the expansions.
pub fn expand_steps(steps: &[Step]) -> Vec<Step> {
    let names: HashMap<&str, Vec<String>> = steps
        .iter()
        .map(|s| {
            let names = s.expand().into_iter().map(|e| e.name).collect();
            (s.name.as_str(), names)
        })
        .collect();
    steps
        .iter()
        .flat_map(Step::expand)
        .map(|mut s| {
            s.depends_on = s
                .depends_on
                .iter()
                .flat_map(|d| {
                    names
                        .get(d.as_str())
                        .cloned()
                        .unwrap_or_else(|| vec![d.clone()])
                })
                .collect();
            s
        })
        .collect()
}

fn default_timeout() -> String {
    "1h".into()
}

/// A Secret's value given to a step.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretRef {
    /// The Secret (same organization).
    pub secret: String,
    /// The key within it.
    pub key: String,
    /// The environment variable that receives the value (or, with `file`, the file's path).
    pub env: String,
    /// Write the value to a file readable only by the step's user, outside the checkout, and give the step its
    /// path in `env` (for keys, certificates, kubeconfigs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub file: bool,
}

/// Conditions for a step to run; each given one must hold.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct When {
    /// Branches the run is on (`*` matches any characters).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub branch: Vec<String>,
    /// Events that started the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event: Vec<Event>,
    /// What the steps it depends on must have ended as: `success` (default) or `failure` (at least one
    /// failed), or both to run either way.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub status: Vec<StatusCondition>,
    /// Paths (globs, `*` for any characters, `/` included) of which at least one must have changed between the
    /// commit before the push and the run's commit. Runs without a previous commit (manual, cron, a new
    /// branch) do not check it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// What started a run.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// `kiln pipeline run` or the API.
    #[default]
    Manual,
    /// A push to a branch.
    Push,
    /// A tag pushed.
    Tag,
    /// A pull or merge request opened or updated.
    PullRequest,
    /// A cron trigger.
    Cron,
    /// An image pushed to a registry.
    Image,
}

impl Event {
    /// The name used in manifests and in `KILN_EVENT`.
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Manual => "manual",
            Event::Push => "push",
            Event::Tag => "tag",
            Event::PullRequest => "pull_request",
            Event::Cron => "cron",
            Event::Image => "image",
        }
    }
}

/// A step's `when.status` value.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StatusCondition {
    /// Every step depended on succeeded.
    Success,
    /// A step depended on failed.
    Failure,
}

/// A step's retry policy.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Attempts in all, the first included (1-10).
    pub attempts: u32,
    /// Wait before the second attempt, e.g. `5s`. Default `1s`.
    #[serde(default = "default_delay")]
    pub delay: String,
    /// Each later wait is the previous one times this (1-10). Default 2.
    #[serde(default = "default_backoff")]
    pub backoff: f64,
}

fn default_delay() -> String {
    "1s".into()
}

fn default_backoff() -> f64 {
    2.0
}

impl Retry {
    /// The wait before attempt `next` (2 for the first retry), in seconds.
    pub fn delay_before(&self, next: u32) -> f64 {
        let base = parse_duration(&self.delay).unwrap_or(1) as f64;
        base * self.backoff.powi(next.saturating_sub(2) as i32)
    }
}

/// What a step's failure does to its run.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The run fails (steps that do not depend on it still run).
    #[default]
    Fail,
    /// The run goes on as if the step had succeeded.
    Ignore,
}

impl KindSpec for PipelineSpec {
    const KIND: Kind = Kind::Pipeline;

    fn validate(&self, _meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_not_blank(errors, "spec.source.repository", &self.source.repository);
        if self.source.repository.starts_with('-') {
            errors.push(FieldError::new(
                "spec.source.repository",
                "must not start with '-' (it would be read as an option of git)",
            ));
        }
        check_ref_name(errors, "spec.source.branch", &self.source.branch);
        for (i, p) in self.params.iter().enumerate() {
            check_env_name(errors, &field(&index("spec.params", i), "name"), &p.name);
        }
        if self.steps.is_empty() {
            errors.push(FieldError::new(
                "spec.steps",
                "a pipeline needs at least one step",
            ));
        }
        if self.steps.len() > MAX_STEPS {
            errors.push(FieldError::new(
                "spec.steps",
                format!("{} steps; at most {MAX_STEPS}", self.steps.len()),
            ));
        }
        check_unique_names(
            errors,
            "spec.steps",
            self.steps.iter().map(|s| s.name.as_str()),
        );
        let names: HashMap<&str, usize> = self
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        for (i, step) in self.steps.iter().enumerate() {
            let at = index("spec.steps", i);
            if step.approval.is_some() {
                let extra = [
                    ("commands", !step.commands.is_empty()),
                    ("image", step.image.is_some()),
                    ("matrix", !step.matrix.is_empty()),
                    ("cache", step.cache.is_some()),
                    ("artifacts", !step.artifacts.is_empty()),
                    ("secrets", !step.secrets.is_empty()),
                ];
                for (name, set) in extra {
                    if set {
                        errors.push(FieldError::new(
                            field(&at, name),
                            "an approval step runs nothing; remove this or the approval",
                        ));
                    }
                }
            } else if step.commands.is_empty() {
                errors.push(FieldError::new(
                    field(&at, "commands"),
                    "a step needs at least one command (or an approval)",
                ));
            }
            check_matrix(errors, &at, step);
            if let Some(c) = &step.cache {
                let p = field(&at, "cache");
                if c.paths.is_empty() {
                    errors.push(FieldError::new(
                        field(&p, "paths"),
                        "name at least one directory",
                    ));
                }
                for (j, path) in c.paths.iter().enumerate() {
                    check_relative_path(errors, &index(&field(&p, "paths"), j), path);
                }
                for (j, path) in c.files.iter().enumerate() {
                    check_relative_path(errors, &index(&field(&p, "files"), j), path);
                }
                if let Some(prefix) = &c.prefix {
                    check_name(errors, &field(&p, "prefix"), prefix);
                }
            }
            for (j, path) in step.artifacts.iter().enumerate() {
                check_relative_path(errors, &index(&field(&at, "artifacts"), j), path);
            }
            if let Some(image) = &step.image {
                check_not_blank(errors, &field(&at, "image"), image);
            }
            for k in step.environment.keys() {
                check_env_name(errors, &key(&field(&at, "environment"), k), k);
            }
            for (j, s) in step.secrets.iter().enumerate() {
                let p = index(&field(&at, "secrets"), j);
                check_name(errors, &field(&p, "secret"), &s.secret);
                check_not_blank(errors, &field(&p, "key"), &s.key);
                check_env_name(errors, &field(&p, "env"), &s.env);
            }
            for (j, dep) in step.depends_on.iter().enumerate() {
                let p = index(&field(&at, "dependsOn"), j);
                if dep == &step.name {
                    errors.push(FieldError::new(p, "a step cannot depend on itself"));
                } else if !names.contains_key(dep.as_str()) {
                    let known: Vec<&str> = self.steps.iter().map(|s| s.name.as_str()).collect();
                    errors.push(FieldError::new(
                        p,
                        format!("unknown step {dep:?}; the steps are {}", known.join(", ")),
                    ));
                }
            }
            if let Err(e) = parse_duration(&step.timeout) {
                errors.push(FieldError::new(field(&at, "timeout"), e));
            }
            if let Some(r) = &step.retry {
                let p = field(&at, "retry");
                if !(1..=MAX_ATTEMPTS).contains(&r.attempts) {
                    errors.push(FieldError::new(
                        field(&p, "attempts"),
                        format!("must be 1 to {MAX_ATTEMPTS}, got {}", r.attempts),
                    ));
                }
                if let Err(e) = parse_duration(&r.delay) {
                    errors.push(FieldError::new(field(&p, "delay"), e));
                }
                if !(1.0..=10.0).contains(&r.backoff) {
                    errors.push(FieldError::new(
                        field(&p, "backoff"),
                        format!("must be 1 to 10, got {}", r.backoff),
                    ));
                }
            }
        }
        check_unique_names(
            errors,
            "spec.services",
            self.services.iter().map(|s| s.name.as_str()),
        );
        for (i, svc) in self.services.iter().enumerate() {
            let at = index("spec.services", i);
            check_name(errors, &field(&at, "name"), &svc.name);
            check_not_blank(errors, &field(&at, "image"), &svc.image);
            for k in svc.environment.keys() {
                check_env_name(errors, &key(&field(&at, "environment"), k), k);
            }
        }
        check_unique_names(
            errors,
            "spec.triggers",
            self.triggers.iter().map(|t| t.name.as_str()),
        );
        for (i, t) in self.triggers.iter().enumerate() {
            check_trigger(errors, &index("spec.triggers", i), t);
        }
        if let Some(cycle) = find_cycle(&self.steps, &names) {
            let first = names[cycle[0].as_str()];
            errors.push(FieldError::new(
                field(&index("spec.steps", first), "dependsOn"),
                format!(
                    "the steps depend on each other in a cycle: {}",
                    cycle.join(" → ")
                ),
            ));
        }
    }
}

fn check_matrix(errors: &mut Vec<FieldError>, at: &str, step: &Step) {
    let p = field(at, "matrix");
    for (k, values) in &step.matrix {
        let kp = key(&p, k);
        check_env_name(errors, &kp, k);
        if values.is_empty() {
            errors.push(FieldError::new(&kp, "name at least one value"));
        }
        let mut seen = std::collections::HashSet::new();
        for (j, v) in values.iter().enumerate() {
            if !seen.insert(v) {
                errors.push(FieldError::new(
                    index(&kp, j),
                    format!("{v:?} is listed twice"),
                ));
            }
        }
    }
    if step.expansions() > MAX_MATRIX {
        errors.push(FieldError::new(
            p,
            format!("{} combinations; at most {MAX_MATRIX}", step.expansions()),
        ));
    }
}

/// A path inside the checkout: relative, with no `..`.
fn check_relative_path(errors: &mut Vec<FieldError>, path: &str, value: &str) {
    let bad = if value.trim().is_empty() {
        Some("must not be empty")
    } else if value.starts_with('/') {
        Some("must be relative to the checkout (no leading '/')")
    } else if value.split('/').any(|c| c == "..") {
        Some("must stay inside the checkout (no '..')")
    } else {
        None
    };
    if let Some(why) = bad {
        errors.push(FieldError::new(path, format!("{value:?} {why}")));
    }
}

fn check_trigger(errors: &mut Vec<FieldError>, at: &str, t: &Trigger) {
    check_name(errors, &field(at, "name"), &t.name);
    for (j, b) in t.branches.iter().enumerate() {
        check_not_blank(errors, &index(&field(at, "branches"), j), b);
    }
    let set = [
        t.webhook.is_some(),
        t.cron.is_some(),
        t.poll.is_some(),
        t.image.is_some(),
    ];
    if set.iter().filter(|s| **s).count() != 1 {
        errors.push(FieldError::new(
            at,
            "set exactly one of webhook, cron, poll and image",
        ));
    }
    let check_secret = |errors: &mut Vec<FieldError>, p: &str, s: &SecretKeyRef| {
        check_name(errors, &field(p, "secret"), &s.secret);
        check_not_blank(errors, &field(p, "key"), &s.key);
    };
    let check_events =
        |errors: &mut Vec<FieldError>, p: &str, events: &[Event], allowed: &[Event]| {
            if events.is_empty() {
                errors.push(FieldError::new(p, "name at least one event"));
            }
            for (j, e) in events.iter().enumerate() {
                if !allowed.contains(e) {
                    let names: Vec<&str> = allowed.iter().map(|a| a.as_str()).collect();
                    errors.push(FieldError::new(
                        index(p, j),
                        format!(
                            "{} is not an event of this trigger (its events: {})",
                            e.as_str(),
                            names.join(", ")
                        ),
                    ));
                }
            }
        };
    if let Some(w) = &t.webhook {
        let p = field(at, "webhook");
        check_secret(errors, &field(&p, "secret"), &w.secret);
        check_events(
            errors,
            &field(&p, "events"),
            &w.events,
            &[Event::Push, Event::Tag, Event::PullRequest],
        );
    }
    if let Some(c) = &t.cron {
        let p = field(at, "cron");
        if let Err(e) = crate::cron::check(&c.schedule) {
            errors.push(FieldError::new(field(&p, "schedule"), e));
        }
        if let Some(tz) = &c.timezone {
            super::check_timezone(errors, &field(&p, "timezone"), tz);
        }
        if let Some(b) = &c.branch {
            check_ref_name(errors, &field(&p, "branch"), b);
        }
    }
    if let Some(poll) = &t.poll {
        let p = field(at, "poll");
        match parse_duration(&poll.interval) {
            Ok(0) => errors.push(FieldError::new(
                field(&p, "interval"),
                "must be at least 1s",
            )),
            Ok(_) => {}
            Err(e) => errors.push(FieldError::new(field(&p, "interval"), e)),
        }
        check_events(
            errors,
            &field(&p, "events"),
            &poll.events,
            &[Event::Push, Event::Tag],
        );
    }
    if let Some(image) = &t.image {
        let p = field(at, "image");
        check_not_blank(errors, &field(&p, "repository"), &image.repository);
        check_secret(errors, &field(&p, "secret"), &image.secret);
    }
}

/// A cycle of `dependsOn` among the steps, as step names from the first back to itself.
fn find_cycle(steps: &[Step], names: &HashMap<&str, usize>) -> Option<Vec<String>> {
    // 0: not seen, 1: on the current path, 2: done.
    let mut mark = vec![0u8; steps.len()];
    let mut path: Vec<usize> = Vec::new();
    fn visit(
        i: usize,
        steps: &[Step],
        names: &HashMap<&str, usize>,
        mark: &mut [u8],
        path: &mut Vec<usize>,
    ) -> Option<Vec<String>> {
        mark[i] = 1;
        path.push(i);
        for dep in &steps[i].depends_on {
            let Some(&j) = names.get(dep.as_str()) else {
                continue;
            };
            if j == i {
                continue;
            }
            if mark[j] == 1 {
                let from = path.iter().position(|&p| p == j).unwrap_or(0);
                let mut cycle: Vec<String> = path[from..]
                    .iter()
                    .map(|&p| steps[p].name.clone())
                    .collect();
                cycle.push(steps[j].name.clone());
                return Some(cycle);
            }
            if mark[j] == 0 {
                if let Some(c) = visit(j, steps, names, mark, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        mark[i] = 2;
        None
    }
    (0..steps.len()).find_map(|i| {
        if mark[i] == 0 {
            visit(i, steps, names, &mut mark, &mut path)
        } else {
            None
        }
    })
}

fn check_env_name(errors: &mut Vec<FieldError>, path: &str, name: &str) {
    let ok = !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok {
        errors.push(FieldError::new(
            path,
            format!("{name:?} is not an environment variable name (letters, digits and '_', not starting with a digit)"),
        ));
    }
}

/// Checks a branch or ref name the way `git check-ref-format` would, so that it can be handed to `git` as an
/// argument.
pub fn check_ref_name(errors: &mut Vec<FieldError>, path: &str, name: &str) {
    let bad = name.is_empty()
        || name.len() > 255
        || name.starts_with('-')
        || name.starts_with('/')
        || name.ends_with('/')
        || name.ends_with('.')
        || name.ends_with(".lock")
        || name.contains("..")
        || name.contains("@{")
        || name.contains("//")
        || name
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || "~^:?*[\\".contains(c));
    if bad {
        errors.push(FieldError::new(
            path,
            format!("{name:?} is not a valid Git branch or ref name"),
        ));
    }
}

/// Checks a commit id: 4 to 64 hexadecimal digits.
pub fn check_commit(errors: &mut Vec<FieldError>, path: &str, commit: &str) {
    if !(4..=64).contains(&commit.len()) || !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        errors.push(FieldError::new(
            path,
            format!("{commit:?} is not a commit id (4 to 64 hexadecimal digits)"),
        ));
    }
}

/// Whether `pattern` (with `*` for any run of characters) matches `value`.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let (p, v) = (pattern.as_bytes(), value.as_bytes());
    let (mut pi, mut vi) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while vi < v.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some(pi);
            mark = vi;
            pi += 1;
        } else if pi < p.len() && p[pi] == v[vi] {
            pi += 1;
            vi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            vi = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The spec of a PipelineRun: what to run. Written by the server when a run is started; only `cancel` and
/// `approvals` change afterwards. Its status is the runner queue's record (phase, lease, epoch) and each step's outcome.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PipelineRunSpec {
    /// The pipeline (same organization).
    pub pipeline: String,
    /// The run's number, counting from 1 per pipeline.
    pub number: u64,
    /// What started it.
    #[serde(default)]
    pub event: Event,
    /// The branch checked out.
    pub branch: String,
    /// The commit checked out; without one, the branch's head when the run starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Parameter values (the pipeline's defaults filled in).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, String>,
    /// The pipeline's spec when the run started (a later change of the pipeline does not change the run).
    pub snapshot: PipelineSpec,
    /// Who or what started it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub started_by: String,
    /// Set to stop the run: a queued run is canceled at once, a running one's steps are stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
    /// The trigger that started it, and what it reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger: Option<RunTrigger>,
    /// The run this one repeats (`kiln pipeline rerun`): the same pipeline snapshot, commit and parameters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun_of: Option<String>,
    /// Approvals given to its approval steps (`kiln approve run`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub approvals: Vec<StepApproval>,
}

/// An approval of one approval step of a run.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepApproval {
    /// The approval step.
    pub step: String,
    /// Who approved it.
    pub by: String,
    /// When (RFC 3339).
    pub at: String,
    /// Rejected instead: the step fails.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rejected: bool,
}

/// What a trigger reported when it started a run.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunTrigger {
    /// The pipeline's trigger.
    pub name: String,
    /// The delivery's id (webhooks), the due time (cron) or the ref's move (polling): a second delivery with
    /// the same id starts no second run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery: Option<String>,
    /// The Git ref pushed or proposed, e.g. `refs/heads/main`, `refs/tags/v1`, `refs/pull/7/head`; the runner
    /// fetches it when the commit is not on a branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
    /// The commit the ref pointed at before the push, for `when.paths`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<String>,
    /// The tag pushed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The pull (merge) request's number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_request: Option<u64>,
    /// The branch a pull request targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_branch: Option<String>,
    /// The image pushed, as `host/repository:tag@digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl KindSpec for PipelineRunSpec {
    const KIND: Kind = Kind::PipelineRun;

    fn validate(&self, meta: &ObjectMeta, errors: &mut Vec<FieldError>) {
        check_name(errors, "spec.pipeline", &self.pipeline);
        if self.number == 0 {
            errors.push(FieldError::new("spec.number", "must be at least 1"));
        }
        check_ref_name(errors, "spec.branch", &self.branch);
        if let Some(c) = &self.commit {
            check_commit(errors, "spec.commit", c);
        }
        if let Some(t) = &self.trigger {
            check_name(errors, "spec.trigger.name", &t.name);
            if let Some(r) = &t.git_ref {
                check_ref_name(errors, "spec.trigger.gitRef", r);
            }
            if let Some(b) = &t.before {
                check_commit(errors, "spec.trigger.before", b);
            }
            if let Some(b) = &t.target_branch {
                check_ref_name(errors, "spec.trigger.targetBranch", b);
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(spec: serde_json::Value) -> Vec<String> {
        let spec: PipelineSpec = serde_json::from_value(spec).expect("decodes");
        let mut errors = Vec::new();
        spec.validate(&ObjectMeta::default(), &mut errors);
        errors.iter().map(|e| e.to_string()).collect()
    }

    fn step(name: &str, deps: &[&str]) -> serde_json::Value {
        json!({"name": name, "commands": ["true"], "dependsOn": deps})
    }

    #[test]
    fn a_cycle_is_named_with_its_steps() {
        let e = errors(json!({
            "source": {"repository": "/r.git"},
            "steps": [step("a", &["c"]), step("b", &["a"]), step("c", &["b"]), step("d", &[])],
        }));
        assert_eq!(
            e,
            ["spec.steps[0].dependsOn: the steps depend on each other in a cycle: a → c → b → a"]
        );
    }

    #[test]
    fn unknown_and_self_dependencies_name_the_field() {
        let e = errors(json!({
            "source": {"repository": "/r.git"},
            "steps": [step("a", &["a"]), step("b", &["a", "zz"])],
        }));
        assert_eq!(
            e,
            [
                "spec.steps[0].dependsOn[0]: a step cannot depend on itself",
                "spec.steps[1].dependsOn[1]: unknown step \"zz\"; the steps are a, b",
            ]
        );
    }

    #[test]
    fn depends_on_is_also_accepted_in_snake_case() {
        let spec: PipelineSpec = serde_json::from_value(json!({
            "source": {"repository": "/r.git"},
            "steps": [{"name": "a", "commands": ["true"]}, {"name": "b", "commands": ["true"], "depends_on": ["a"]}],
        }))
        .expect("decodes");
        assert_eq!(spec.steps[1].depends_on, ["a"]);
    }

    #[test]
    fn bad_fields_are_each_reported() {
        let e = errors(json!({
            "source": {"repository": " "},
            "params": [{"name": "1X"}],
            "steps": [{
                "name": "a", "commands": [], "timeout": "soon",
                "environment": {"A-B": "x"},
                "secrets": [{"secret": "Bad_Name", "key": "", "env": "OK"}],
                "retry": {"attempts": 0, "delay": "x", "backoff": 0.5},
            }],
        }));
        assert_eq!(e.len(), 10, "{e:#?}");
        assert!(e
            .iter()
            .any(|m| m.starts_with("spec.steps[0].retry.attempts: must be 1 to 10")));
        assert!(
            e.iter()
                .any(|m| m.starts_with("spec.steps[0].environment[\"A-B\"]")
                    || m.starts_with("spec.steps[0].environment.A-B")),
            "{e:#?}"
        );
    }

    #[test]
    fn globs_match_branches() {
        assert!(glob_match("main", "main"));
        assert!(glob_match("release/*", "release/1.2"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("release/*", "main"));
        assert!(glob_match("a*b*c", "aXXbYc"));
        assert!(!glob_match("a*b*c", "aXXbY"));
    }

    #[test]
    fn retry_delays_grow_by_the_backoff() {
        let r = Retry {
            attempts: 4,
            delay: "2s".into(),
            backoff: 3.0,
        };
        assert_eq!(
            [r.delay_before(2), r.delay_before(3), r.delay_before(4)],
            [2.0, 6.0, 18.0]
        );
    }
}
