//! Runs one pipeline run: checks its source out with `git` into a fresh directory, then runs its steps as a
//! graph, each step once every step it depends on has ended, as many at once as the runner's capacity.
//!
//! - A step runs `sh -e` on its commands (each echoed as `+ command` first) in the checked-out source, in a
//!   process group of its own, with the run's variables (`CI`, `KILN_*`), the parameters, its environment and
//!   its secrets. Its output goes to the log line by line, secret values masked.
//! - `when` decides whether a ready step runs or is skipped: branch patterns, events, and the status of the
//!   steps it depends on (by default all must have succeeded; a failure with `failure: ignore` counts as
//!   success).
//! - An attempt that exceeds the step's timeout is stopped and fails; a failed attempt is retried as the
//!   step's retry policy says.
//! - Cancellation stops every running step (SIGTERM to its group, SIGKILL 5 s later) and skips the rest.
//!
//! The caller (the server's built-in runner, or a `kiln runner`) holds the run under a lease and carries what
//! this reports: log lines and step status to the queue.

pub mod container;
pub mod hooks;
pub mod worker;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use model::kinds::{
    expand_steps, glob_match, parse_duration, Failure, PipelineRunSpec, StatusCondition, Step,
    StepApproval,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// How long a stopped step's processes get between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// What a secret's value is replaced with in the logs.
pub const MASK: &str = "********";
/// The longest log line kept; the rest of a longer one is cut.
const MAX_LINE: usize = 16 * 1024;
/// The most bytes of a step's outputs file read.
const MAX_OUTPUTS: u64 = 64 * 1024;

/// What a runner offers the runs it executes.
#[derive(Debug, Clone)]
pub struct Runner {
    /// Its name (in logs, and on the Docker objects it makes).
    pub name: String,
    /// Steps run at once within one run.
    pub capacity: usize,
    /// Where step caches are kept (none: `cache` is not restored or saved, with a line saying so).
    pub cache_dir: Option<PathBuf>,
    /// Its Docker Engine, for container steps and services.
    pub docker: Option<container::Docker>,
}

/// What a runner learns about a run while it runs it.
#[derive(Debug, Clone)]
pub struct Signals {
    /// Turns true when the run is canceled.
    pub cancel: watch::Receiver<bool>,
    /// The approvals given so far.
    pub approvals: watch::Receiver<Vec<StepApproval>>,
}

impl Signals {
    /// Signals that never change: neither canceled nor approved.
    pub fn none() -> (
        Signals,
        watch::Sender<bool>,
        watch::Sender<Vec<StepApproval>>,
    ) {
        let (cancel_tx, cancel) = watch::channel(false);
        let (approvals_tx, approvals) = watch::channel(Vec::new());
        (Signals { cancel, approvals }, cancel_tx, approvals_tx)
    }
}

/// Whether a run needs a Docker Engine (a container step or a service).
pub fn needs_docker(spec: &model::kinds::PipelineSpec) -> bool {
    !spec.services.is_empty() || spec.steps.iter().any(|s| s.image.is_some())
}

/// A run as a runner receives it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunJob {
    pub organization: String,
    /// The PipelineRun's name.
    pub name: String,
    pub epoch: u64,
    pub spec: PipelineRunSpec,
    /// Each step's secret values, as environment variable → value.
    #[serde(default)]
    pub secrets: BTreeMap<String, BTreeMap<String, String>>,
    /// Each step's secret files, as environment variable → value: the value is written to a file (mode 0600)
    /// under the run's directory, outside the checkout, and the variable holds its path.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secret_files: BTreeMap<String, BTreeMap<String, String>>,
    /// Attempts of steps already made by a runner that lost the run mid-step (they count against the steps'
    /// retry policies).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attempts_used: BTreeMap<String, u32>,
}

/// A step's phase.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepPhase {
    /// Waiting for the steps it depends on.
    Pending,
    Running,
    Succeeded,
    Failed,
    /// Not run: its `when` did not hold, or the run was canceled first.
    Skipped,
    /// An approval step waiting for its approval.
    Waiting,
    /// Stopped by the run's cancellation.
    Canceled,
}

impl StepPhase {
    /// Whether the step is over.
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            StepPhase::Pending | StepPhase::Running | StepPhase::Waiting
        )
    }
}

/// One step's status, as kept in the run's `status.steps`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StepStatus {
    pub name: String,
    pub phase: StepPhase,
    /// The last attempt's exit code.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Attempts started.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// From the first attempt's start to the step's end, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Why it failed, was skipped or canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// It failed, but with `failure: ignore`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignored: bool,
    /// Who approved (or rejected) an approval step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
}

impl StepStatus {
    fn pending(name: &str) -> StepStatus {
        StepStatus {
            name: name.to_string(),
            phase: StepPhase::Pending,
            exit_code: None,
            attempts: 0,
            started_at: None,
            finished_at: None,
            duration_ms: None,
            reason: None,
            ignored: false,
            approved_by: None,
        }
    }

    /// Whether steps that depend on it see it as a success.
    fn counts_as_success(&self) -> bool {
        match self.phase {
            StepPhase::Succeeded => true,
            StepPhase::Failed => self.ignored,
            _ => false,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunEnd {
    /// The phase: `Succeeded`, `Failed` or `Canceled`.
    pub outcome: Outcome,
    /// Why it failed.
    pub error: Option<String>,
    /// The commit checked out, once known.
    pub commit: Option<String>,
    #[serde(default)]
    pub steps: Vec<StepStatus>,
    /// What the steps wrote to `$KILN_OUTPUT` (`NAME=value` lines; a later step's value wins).
    #[serde(default)]
    pub outputs: BTreeMap<String, String>,
}

/// A run's outcome.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    Failed,
    Canceled,
}

/// Where a run's progress goes.
pub trait Report: Send + Sync {
    /// One log line (already masked) written by `source` (`checkout`, a step's name, `runner`).
    fn line(&self, source: &str, text: String);
    /// The steps' status changed (and the commit, once checked out).
    fn steps(&self, steps: &[StepStatus], commit: Option<&str>) -> impl Future<Output = ()> + Send;
    /// Saves `file` as the run's artifact `path` (relative to the checkout), for `step`.
    fn artifact(
        &self,
        step: &str,
        path: &str,
        file: &Path,
    ) -> impl Future<Output = Result<(), String>> + Send;
}

/// Runs `job` in `dir` (created; it should not exist) on `runner`, until it ends or is canceled.
pub async fn execute<R: Report>(
    job: &RunJob,
    dir: &Path,
    runner: &Runner,
    report: &R,
    signals: Signals,
) -> RunEnd {
    let Signals {
        mut cancel,
        mut approvals,
    } = signals;
    let spec = &job.spec;
    // A step of a matrix is known by its own name; its secrets by the name of the step it expands.
    let origin: Vec<String> = spec
        .snapshot
        .steps
        .iter()
        .flat_map(|s| std::iter::repeat_n(s.name.clone(), s.expansions().max(1)))
        .collect();
    let steps = &expand_steps(&spec.snapshot.steps);
    let mut status: Vec<StepStatus> = steps.iter().map(|s| StepStatus::pending(&s.name)).collect();
    let masker = Masker::new(
        job.secrets
            .values()
            .chain(job.secret_files.values())
            .flat_map(|m| m.values().cloned()),
    );
    let end = |status: Vec<StepStatus>, outcome, error, commit| RunEnd {
        outcome,
        error,
        commit,
        steps: status,
        outputs: BTreeMap::new(),
    };
    let skip_all = |status: &mut Vec<StepStatus>, why: &str| {
        for s in status.iter_mut() {
            s.phase = StepPhase::Skipped;
            s.reason = Some(why.to_string());
        }
    };
    if needs_docker(&spec.snapshot) && runner.docker.is_none() {
        skip_all(&mut status, "the runner has no Docker Engine");
        report.steps(&status, None).await;
        let error = format!(
            "runner {} has no Docker Engine, and the pipeline has container steps or services",
            runner.name
        );
        return end(status, Outcome::Failed, Some(error), None);
    }
    let src = dir.join("src");
    let checkout = tokio::select! {
        r = checkout(spec, &src, report, &masker) => r,
        () = cancellation(&mut cancel) => Err("canceled before the checkout ended".to_string()),
    };
    let commit = match checkout {
        Ok(c) => c,
        Err(e) => {
            let canceled = *cancel.borrow();
            let (why, outcome) = if canceled {
                ("the run was canceled", Outcome::Canceled)
            } else {
                ("the checkout failed", Outcome::Failed)
            };
            skip_all(&mut status, why);
            report.steps(&status, None).await;
            return end(status, outcome, Some(e), None);
        }
    };
    report.steps(&status, Some(&commit)).await;
    let changed_files = if steps
        .iter()
        .any(|s| s.when.as_ref().is_some_and(|w| !w.paths.is_empty()))
    {
        changed_paths(spec, &src, &commit).await
    } else {
        None
    };

    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(usize, StepStatus)>();
    let (line_tx, mut line_rx) = mpsc::unbounded_channel::<(String, String)>();
    let mut base_env = base_env(job, &commit);
    let outputs_dir = dir.join("outputs");
    if let Err(e) = tokio::fs::create_dir_all(&outputs_dir).await {
        skip_all(&mut status, "the run's directory could not be made");
        report.steps(&status, Some(&commit)).await;
        let error = format!("creating {}: {e}", outputs_dir.display());
        return end(status, Outcome::Failed, Some(error), Some(commit));
    }
    // The run's network and services, for container steps and services.
    let mut network = None;
    if let (true, Some(docker)) = (needs_docker(&spec.snapshot), &runner.docker) {
        let made = start_services(job, runner, docker, &masker, &line_tx, report).await;
        while let Ok((source, text)) = line_rx.try_recv() {
            report.line(&source, text);
        }
        match made {
            Ok((net, hosts)) => {
                base_env.extend(hosts);
                network = Some(net);
            }
            Err((net, e)) => {
                if let Some(net) = net {
                    net.remove().await;
                }
                skip_all(&mut status, "the run's services did not start");
                report.steps(&status, Some(&commit)).await;
                return end(status, Outcome::Failed, Some(e), Some(commit));
            }
        }
    }
    let step_network = network.as_ref().map(container::RunNetwork::for_steps);
    let mut outputs = BTreeMap::new();
    let mut running = JoinSet::new();
    let mut active = 0usize;
    // Approval steps waiting, with when they give up.
    let mut waiting: BTreeMap<usize, tokio::time::Instant> = BTreeMap::new();
    let mut canceled = false;
    let mut approvals_closed = false;
    loop {
        // Start what is ready, skip what will not run.
        let mut changed = false;
        if !canceled {
            for i in 0..steps.len() {
                if status[i].phase != StepPhase::Pending || active >= runner.capacity.max(1) {
                    continue;
                }
                let step = &steps[i];
                let deps: Vec<&StepStatus> = step
                    .depends_on
                    .iter()
                    .filter_map(|d| status.iter().find(|s| &s.name == d))
                    .collect();
                if deps.iter().any(|d| !d.phase.is_final()) {
                    continue;
                }
                if let Some(why) = skip_reason(step, spec, &deps, changed_files.as_deref()) {
                    status[i].phase = StepPhase::Skipped;
                    status[i].reason = Some(why);
                    changed = true;
                    continue;
                }
                status[i].started_at = Some(jiff::Timestamp::now().to_string());
                changed = true;
                if let Some(approval) = &step.approval {
                    status[i].phase = StepPhase::Waiting;
                    status[i].reason = Some(if approval.message.is_empty() {
                        "waiting for approval".to_string()
                    } else {
                        format!("waiting for approval: {}", approval.message)
                    });
                    report.line(
                        &step.name,
                        format!(
                            "waiting for approval (kiln approve run {}/{} --step {:?})",
                            spec.pipeline, spec.number, step.name
                        ),
                    );
                    let limit = Duration::from_secs(parse_duration(&step.timeout).unwrap_or(3600));
                    waiting.insert(i, tokio::time::Instant::now() + limit);
                    continue;
                }
                status[i].phase = StepPhase::Running;
                let used = job.attempts_used.get(&step.name).copied().unwrap_or(0);
                if used > 0 {
                    report.line(
                        &step.name,
                        format!("{used} attempt(s) were made by a runner that lost the run; the step runs again"),
                    );
                }
                // The step's task counts its attempts from those made before; what is reported now counts the
                // one starting (so that a runner lost meanwhile leaves the attempts it made on record).
                let mut start = status[i].clone();
                start.attempts = used;
                status[i].attempts = used + 1;
                active += 1;
                let mut env = base_env.clone();
                env.push(("KILN_STEP".into(), step.name.clone()));
                env.extend(step.environment.iter().map(|(k, v)| (k.clone(), v.clone())));
                if let Some(sec) = job.secrets.get(&origin[i]) {
                    env.extend(sec.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
                let files = job
                    .secret_files
                    .get(&origin[i])
                    .map(|f| (dir.join("secrets").join(&origin[i]), f.clone()));
                let ctx = StepCtx {
                    index: i,
                    step: step.clone(),
                    env,
                    dir: src.clone(),
                    outputs: outputs_dir.clone(),
                    masker: masker.clone(),
                    cancel: cancel.clone(),
                    status: start,
                    lines: line_tx.clone(),
                    files,
                    network: step_network.clone(),
                    cache: runner
                        .cache_dir
                        .as_ref()
                        .map(|d| d.join(&job.organization).join(&spec.pipeline)),
                };
                let tx = done_tx.clone();
                running.spawn(async move {
                    let out = run_step(ctx).await;
                    let _ = tx.send((i, out));
                });
            }
        }
        // Approvals given before (or while) steps became ready.
        let given = approvals.borrow_and_update().clone();
        if decide_approvals(&mut status, &mut waiting, &given, report) {
            report.steps(&status, Some(&commit)).await;
            continue;
        }
        if changed {
            report.steps(&status, Some(&commit)).await;
        }
        if active == 0 && waiting.is_empty() {
            break;
        }
        let next_deadline = waiting.values().min().copied();
        tokio::select! {
            biased;
            Some((source, text)) = line_rx.recv() => report.line(&source, text),
            Some((i, mut st)) = done_rx.recv() => {
                // The step's last lines were sent before its end.
                while let Ok((source, text)) = line_rx.try_recv() {
                    report.line(&source, text);
                }
                active -= 1;
                if st.phase == StepPhase::Succeeded {
                    read_outputs(&outputs_dir.join(i.to_string()), &steps[i].name, &masker, &mut outputs, report).await;
                    if let Err(e) = save_artifacts(&steps[i], &src, report).await {
                        st.phase = StepPhase::Failed;
                        st.ignored = steps[i].failure == Failure::Ignore;
                        st.reason = Some(e);
                    }
                }
                status[i] = st;
                report.steps(&status, Some(&commit)).await;
            }
            r = approvals.changed(), if !waiting.is_empty() && !approvals_closed => {
                // A closed channel: no approval comes any more; the waits run out.
                approvals_closed = r.is_err();
            }
            () = async {
                if let Some(d) = next_deadline { tokio::time::sleep_until(d).await }
            }, if next_deadline.is_some() => {
                let now = tokio::time::Instant::now();
                let late: Vec<usize> = waiting.iter().filter(|(_, d)| **d <= now).map(|(i, _)| *i).collect();
                for i in late {
                    waiting.remove(&i);
                    let st = &mut status[i];
                    st.phase = StepPhase::Failed;
                    st.ignored = steps[i].failure == Failure::Ignore;
                    st.reason = Some(format!("no approval within {}", steps[i].timeout));
                    st.finished_at = Some(jiff::Timestamp::now().to_string());
                }
                report.steps(&status, Some(&commit)).await;
            }
            () = cancellation(&mut cancel), if !canceled => {
                canceled = true;
                report.line("runner", "the run was canceled; stopping its steps".into());
            }
        }
        if canceled && !waiting.is_empty() {
            for (i, _) in std::mem::take(&mut waiting) {
                status[i].phase = StepPhase::Canceled;
                status[i].reason = Some("the run was canceled".into());
            }
        }
    }
    while running.join_next().await.is_some() {}
    if let Some(net) = network {
        net.remove().await;
    }
    while let Ok((source, text)) = line_rx.try_recv() {
        report.line(&source, text);
    }
    if canceled || *cancel.borrow() {
        for s in status.iter_mut().filter(|s| s.phase == StepPhase::Pending) {
            s.phase = StepPhase::Skipped;
            s.reason = Some("the run was canceled".into());
        }
        report.steps(&status, Some(&commit)).await;
        return end(status, Outcome::Canceled, None, Some(commit));
    }
    let failed: Vec<&StepStatus> = status
        .iter()
        .filter(|s| s.phase == StepPhase::Failed && !s.ignored)
        .collect();
    let error = failed.first().map(|s| {
        format!(
            "step {} failed: {}",
            s.name,
            s.reason.as_deref().unwrap_or("it failed")
        )
    });
    let outcome = if failed.is_empty() {
        Outcome::Succeeded
    } else {
        Outcome::Failed
    };
    let mut run_end = end(status, outcome, error, Some(commit));
    run_end.outputs = outputs;
    run_end
}

/// Settles the waiting approval steps that `given` approves or rejects; answers whether any changed.
fn decide_approvals<R: Report>(
    status: &mut [StepStatus],
    waiting: &mut BTreeMap<usize, tokio::time::Instant>,
    given: &[StepApproval],
    report: &R,
) -> bool {
    let mut any = false;
    for i in waiting.keys().copied().collect::<Vec<_>>() {
        let Some(a) = given.iter().find(|a| a.step == status[i].name) else {
            continue;
        };
        waiting.remove(&i);
        any = true;
        let st = &mut status[i];
        st.approved_by = Some(a.by.clone());
        st.finished_at = Some(jiff::Timestamp::now().to_string());
        if a.rejected {
            st.phase = StepPhase::Failed;
            st.reason = Some(format!("rejected by {}", a.by));
            report.line(&st.name, format!("rejected by {}", a.by));
        } else {
            st.phase = StepPhase::Succeeded;
            st.reason = None;
            report.line(&st.name, format!("approved by {}", a.by));
        }
    }
    any
}

/// Makes the run's network and starts its services; answers the network and the services' `<NAME>_HOST`
/// variables (their addresses, for host steps).
async fn start_services<R: Report>(
    job: &RunJob,
    runner: &Runner,
    docker: &container::Docker,
    masker: &Masker,
    lines: &mpsc::UnboundedSender<(String, String)>,
    report: &R,
) -> Result<(container::RunNetwork, Vec<(String, String)>), (Option<container::RunNetwork>, String)>
{
    let mut net = container::RunNetwork::create(
        docker,
        &runner.name,
        &job.organization,
        &job.name,
        job.epoch,
    )
    .await
    .map_err(|e| (None, e))?;
    let mut hosts = Vec::new();
    for svc in &job.spec.snapshot.services {
        report.line(
            "runner",
            format!("starting service {} ({})", svc.name, svc.image),
        );
        match net.start_service(svc, masker, lines).await {
            Ok(ip) => hosts.push((service_host_var(&svc.name), ip)),
            Err(e) => return Err((Some(net), e)),
        }
    }
    Ok((net, hosts))
}

/// The variable that holds a service's address: `db` → `DB_HOST`, `redis-cache` → `REDIS_CACHE_HOST`.
pub fn service_host_var(name: &str) -> String {
    format!("{}_HOST", name.to_ascii_uppercase().replace('-', "_"))
}

/// Adds the `NAME=value` lines of a step's outputs file to `outputs`.
async fn read_outputs<R: Report>(
    file: &Path,
    step: &str,
    masker: &Masker,
    outputs: &mut BTreeMap<String, String>,
    report: &R,
) {
    use tokio::io::AsyncReadExt as _;
    let Ok(f) = tokio::fs::File::open(file).await else {
        return;
    };
    let mut text = String::new();
    if f.take(MAX_OUTPUTS).read_to_string(&mut text).await.is_err() {
        report.line(
            step,
            "$KILN_OUTPUT is not UTF-8 text; its outputs are ignored".into(),
        );
        return;
    }
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let ok = line.split_once('=').filter(|(k, _)| {
            !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        });
        match ok {
            Some((k, v)) => {
                report.line(step, format!("output {k}={}", masker.mask(v)));
                outputs.insert(k.to_string(), v.to_string());
            }
            None => report.line(
                step,
                format!(
                    "$KILN_OUTPUT: {:?} is not NAME=value; ignored",
                    masker.mask(line)
                ),
            ),
        }
    }
}

/// Saves a succeeded step's artifacts (every file under each path); a path that does not exist fails the step.
async fn save_artifacts<R: Report>(step: &Step, src: &Path, report: &R) -> Result<(), String> {
    for path in &step.artifacts {
        let root = src.join(path);
        let meta = tokio::fs::symlink_metadata(&root)
            .await
            .map_err(|_| format!("artifact {path} does not exist after the step"))?;
        let files = if meta.is_dir() {
            let root2 = root.clone();
            tokio::task::spawn_blocking(move || files_under(&root2))
                .await
                .map_err(|e| e.to_string())?
        } else if meta.is_file() {
            vec![root.clone()]
        } else {
            return Err(format!("artifact {path} is neither a file nor a directory"));
        };
        for f in &files {
            let rel = f
                .strip_prefix(src)
                .map_err(|_| format!("artifact {} is outside the checkout", f.display()))?
                .to_string_lossy()
                .into_owned();
            report
                .artifact(&step.name, &rel, f)
                .await
                .map_err(|e| format!("saving artifact {rel}: {e}"))?;
        }
        report.line(
            &step.name,
            format!(
                "artifact {path} saved ({} file{})",
                files.len(),
                if files.len() == 1 { "" } else { "s" }
            ),
        );
    }
    Ok(())
}

/// The regular files under `dir` (symbolic links are not followed), sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => todo.push(e.path()),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

/// Writes a step's secret files (mode 0600, in a directory only the runner's user can enter); answers the
/// variables that name them.
fn write_secret_files(
    dir: &Path,
    files: &BTreeMap<String, String>,
) -> Result<Vec<(String, String)>, String> {
    use std::io::Write as _;
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut out = Vec::new();
    for (env, value) in files {
        let path = dir.join(env);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(value.as_bytes()).map(|()| f))
            .map_err(|e| format!("writing the secret file for {env}: {e}"))?;
        let _ = f.flush();
        out.push((env.clone(), path.to_string_lossy().into_owned()));
    }
    Ok(out)
}

/// Waits until `cancel` turns true (or its sender is gone).
async fn cancellation(cancel: &mut watch::Receiver<bool>) {
    let _ = cancel.wait_for(|c| *c).await;
}

/// The run-wide environment of every step.
fn base_env(job: &RunJob, commit: &str) -> Vec<(String, String)> {
    let spec = &job.spec;
    let mut env = vec![
        ("CI".to_string(), "true".to_string()),
        ("KILN".into(), "true".into()),
        ("KILN_PIPELINE".into(), spec.pipeline.clone()),
        ("KILN_RUN".into(), spec.number.to_string()),
        ("KILN_BRANCH".into(), spec.branch.clone()),
        ("KILN_COMMIT".into(), commit.to_string()),
        ("KILN_EVENT".into(), spec.event.as_str().to_string()),
        (
            "KILN_REPOSITORY".into(),
            spec.snapshot.source.repository.clone(),
        ),
    ];
    if let Some(t) = &spec.trigger {
        env.push(("KILN_TRIGGER".into(), t.name.clone()));
        let optional = [
            ("KILN_TAG", t.tag.clone()),
            ("KILN_PULL_REQUEST", t.pull_request.map(|n| n.to_string())),
            ("KILN_TARGET_BRANCH", t.target_branch.clone()),
            ("KILN_IMAGE", t.image.clone()),
            ("KILN_PREVIOUS_COMMIT", t.before.clone()),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                env.push((k.into(), v));
            }
        }
    }
    env.extend(spec.params.iter().map(|(k, v)| (k.clone(), v.clone())));
    env
}

/// The files changed between the commit before the push and `commit`, when the run knows that commit and the
/// checkout has it; `None` means unknown (a manual or scheduled run, a new branch), which `when.paths` lets
/// through.
async fn changed_paths(spec: &PipelineRunSpec, src: &Path, commit: &str) -> Option<Vec<String>> {
    let before = spec.trigger.as_ref()?.before.as_deref()?;
    if before.is_empty() || before.bytes().all(|b| b == b'0') {
        return None;
    }
    let out = Command::new("git")
        .args(["diff", "--name-only", "--no-renames", before, commit, "--"])
        .current_dir(src)
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

/// Why a ready step does not run, if it does not.
fn skip_reason(
    step: &Step,
    spec: &PipelineRunSpec,
    deps: &[&StepStatus],
    changed: Option<&[String]>,
) -> Option<String> {
    let when = step.when.clone().unwrap_or_default();
    if let (false, Some(changed)) = (when.paths.is_empty(), changed) {
        let hit = changed
            .iter()
            .any(|f| when.paths.iter().any(|g| glob_match(g, f)));
        if !hit {
            return Some(format!(
                "when.paths ({}) matches none of the {} changed files",
                when.paths.join(", "),
                changed.len()
            ));
        }
    }
    if !when.branch.is_empty() && !when.branch.iter().any(|b| glob_match(b, &spec.branch)) {
        return Some(format!(
            "when.branch ({}) does not match branch {}",
            when.branch.join(", "),
            spec.branch
        ));
    }
    if !when.event.is_empty() && !when.event.contains(&spec.event) {
        let events: Vec<&str> = when.event.iter().map(|e| e.as_str()).collect();
        return Some(format!(
            "when.event ({}) does not include {}",
            events.join(", "),
            spec.event.as_str()
        ));
    }
    let all_ok = deps.iter().all(|d| d.counts_as_success());
    let want = if when.status.is_empty() {
        vec![StatusCondition::Success]
    } else {
        when.status.clone()
    };
    let ok = (all_ok && want.contains(&StatusCondition::Success))
        || (!all_ok && want.contains(&StatusCondition::Failure));
    if ok {
        return None;
    }
    Some(if all_ok {
        "when.status is failure, and every step it depends on succeeded".to_string()
    } else {
        let bad: Vec<&str> = deps
            .iter()
            .filter(|d| !d.counts_as_success())
            .map(|d| d.name.as_str())
            .collect();
        format!("{} did not succeed", bad.join(", "))
    })
}

/// Clones the source and checks out the run's commit (or its branch's head); answers the commit.
async fn checkout<R: Report>(
    spec: &PipelineRunSpec,
    src: &Path,
    report: &R,
    masker: &Masker,
) -> Result<String, String> {
    let repo = &spec.snapshot.source.repository;
    if let Some(parent) = src.parent() {
        tokio::fs::create_dir_all(parent)
            .await
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
    }
    let target = spec
        .commit
        .clone()
        .unwrap_or_else(|| format!("origin/{}", spec.branch));
    report.line("checkout", format!("+ git clone {repo}"));
    git(
        &[
            "clone",
            "--quiet",
            "--no-checkout",
            "--",
            repo,
            &src.to_string_lossy(),
        ],
        None,
        report,
        masker,
    )
    .await?;
    if let (Some(commit), Some(git_ref)) = (
        &spec.commit,
        spec.trigger.as_ref().and_then(|t| t.git_ref.as_deref()),
    ) {
        // A commit on no branch (a pull request from a fork): fetch the ref that has it.
        let has = Command::new("git")
            .args(["cat-file", "-e", &format!("{commit}^{{commit}}")])
            .current_dir(src)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .await
            .is_ok_and(|s| s.success());
        if !has && !git_ref.starts_with('-') {
            report.line("checkout", format!("+ git fetch origin {git_ref}"));
            git(
                &["fetch", "--quiet", "origin", git_ref],
                Some(src),
                report,
                masker,
            )
            .await?;
        }
    }
    report.line("checkout", format!("+ git checkout {target}"));
    git(
        &["checkout", "--quiet", "--detach", &target],
        Some(src),
        report,
        masker,
    )
    .await?;
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(src)
        .output()
        .await
        .map_err(|e| format!("running git: {e}"))?;
    let commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || commit.is_empty() {
        return Err("git rev-parse HEAD found no commit".into());
    }
    report.line("checkout", format!("at commit {commit}"));
    Ok(commit)
}

async fn git<R: Report>(
    args: &[&str],
    dir: Option<&Path>,
    report: &R,
    masker: &Masker,
) -> Result<(), String> {
    let mut cmd = Command::new("git");
    cmd.args(args)
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let out = cmd
        .output()
        .await
        .map_err(|e| format!("running git: {e} (is git installed on the runner's host?)"))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stderr.lines().filter(|l| !l.trim().is_empty()) {
        report.line("checkout", masker.mask(l));
    }
    if out.status.success() {
        Ok(())
    } else {
        let last = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        Err(format!(
            "git {} failed: {}",
            args[0],
            masker.mask(last.trim())
        ))
    }
}

/// What a step task needs.
struct StepCtx {
    /// The step's place in the run (its outputs file and container names use it).
    index: usize,
    step: Step,
    env: Vec<(String, String)>,
    /// The checkout.
    dir: PathBuf,
    /// The run's outputs directory.
    outputs: PathBuf,
    masker: Masker,
    cancel: watch::Receiver<bool>,
    status: StepStatus,
    lines: mpsc::UnboundedSender<(String, String)>,
    /// Secret files to write before the first attempt: their directory, and variable → value.
    files: Option<(PathBuf, BTreeMap<String, String>)>,
    /// The run's network, for a container step.
    network: Option<container::StepNetwork>,
    /// The pipeline's cache directory on this runner.
    cache: Option<PathBuf>,
}

/// Runs a step's attempts; answers its final status.
async fn run_step(mut ctx: StepCtx) -> StepStatus {
    let started = Instant::now();
    let attempts = ctx.step.retry.as_ref().map_or(1, |r| r.attempts.max(1));
    let timeout = Duration::from_secs(parse_duration(&ctx.step.timeout).unwrap_or(3600));
    let name = ctx.step.name.clone();
    let say = |text: String| {
        let _ = ctx.lines.send((name.clone(), text));
    };
    let mut st = ctx.status.clone();
    let outputs_file = ctx.outputs.join(ctx.index.to_string());
    let mut secrets_dir = None;
    if ctx.step.image.is_some() {
        let inside = format!("{}/{}", container::OUTPUTS, ctx.index);
        ctx.env.push(("KILN_OUTPUT".into(), inside));
        ctx.env
            .push(("KILN_WORKSPACE".into(), container::SRC.into()));
    } else {
        let host = outputs_file.to_string_lossy().into_owned();
        ctx.env.push(("KILN_OUTPUT".into(), host));
        let ws = ctx.dir.to_string_lossy().into_owned();
        ctx.env.push(("KILN_WORKSPACE".into(), ws));
    }
    if let Some((dir, files)) = ctx.files.take() {
        match write_secret_files(&dir, &files) {
            Ok(paths) if ctx.step.image.is_some() => {
                // In the container, the directory is mounted at SECRETS.
                ctx.env.extend(
                    paths
                        .into_iter()
                        .map(|(k, _)| (k.clone(), format!("{}/{k}", container::SECRETS))),
                );
                secrets_dir = Some(dir);
            }
            Ok(paths) => ctx.env.extend(paths),
            Err(e) => {
                st.phase = StepPhase::Failed;
                st.ignored = ctx.step.failure == Failure::Ignore;
                st.reason = Some(e);
                st.finished_at = Some(jiff::Timestamp::now().to_string());
                return st;
            }
        }
    }
    let cache_key = match (&ctx.step.cache, &ctx.cache) {
        (Some(c), Some(root)) => {
            let key = cache_key(&ctx.step.name, c, &ctx.dir).await;
            say(restore_cache(c, &root.join(&key), &ctx.dir, &key).await);
            Some(key)
        }
        (Some(_), None) => {
            say("cache: this runner keeps no caches (no cache directory); nothing restored".into());
            None
        }
        _ => None,
    };
    loop {
        st.attempts += 1;
        // Each attempt starts with an empty outputs file.
        let _ = tokio::fs::write(&outputs_file, b"").await;
        let attempt = match (&ctx.network, &ctx.step.image) {
            (Some(net), Some(image)) => {
                container_attempt(
                    &ctx,
                    net,
                    image,
                    st.attempts,
                    secrets_dir.as_deref(),
                    timeout,
                )
                .await
            }
            (None, Some(image)) => Attempt {
                end: AttemptEnd::Failed(format!(
                    "step runs in image {image}, and the run has no container network"
                )),
                code: None,
            },
            _ => attempt(&ctx, timeout).await,
        };
        st.exit_code = attempt.code;
        match attempt.end {
            AttemptEnd::Succeeded => {
                st.phase = StepPhase::Succeeded;
                st.reason = None;
                if let (Some(c), Some(root), Some(key)) = (&ctx.step.cache, &ctx.cache, &cache_key)
                {
                    say(save_cache(c, root, key, &ctx.dir).await);
                }
                break;
            }
            AttemptEnd::Canceled => {
                st.phase = StepPhase::Canceled;
                st.reason = Some("the run was canceled".into());
                break;
            }
            AttemptEnd::Failed(why) => {
                st.reason = Some(why.clone());
                if st.attempts >= attempts {
                    st.phase = StepPhase::Failed;
                    st.ignored = ctx.step.failure == Failure::Ignore;
                    if st.ignored {
                        say(format!("{why}; the failure is ignored (failure: ignore)"));
                    }
                    break;
                }
                let wait = ctx
                    .step
                    .retry
                    .as_ref()
                    .map_or(1.0, |r| r.delay_before(st.attempts + 1));
                say(format!(
                    "attempt {} of {attempts} failed ({why}); retrying in {wait:.1} s",
                    st.attempts
                ));
                let canceled = tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs_f64(wait)) => false,
                    () = cancellation(&mut ctx.cancel) => true,
                };
                if canceled {
                    st.phase = StepPhase::Canceled;
                    st.reason = Some("the run was canceled".into());
                    break;
                }
            }
        }
    }
    st.finished_at = Some(jiff::Timestamp::now().to_string());
    st.duration_ms = Some(started.elapsed().as_millis() as u64);
    st
}

enum AttemptEnd {
    Succeeded,
    Failed(String),
    Canceled,
}

struct Attempt {
    end: AttemptEnd,
    code: Option<i32>,
}

/// One attempt of a container step.
async fn container_attempt(
    ctx: &StepCtx,
    net: &container::StepNetwork,
    image: &str,
    attempt: u32,
    secrets: Option<&Path>,
    timeout: Duration,
) -> Attempt {
    let run = container::ContainerAttempt {
        network: net,
        name: net.container_name(ctx.index, attempt),
        image,
        script: script(&ctx.step.commands),
        env: ctx.env.clone(),
        src: &ctx.dir,
        outputs: &ctx.outputs,
        secrets,
        source: ctx.step.name.clone(),
        masker: &ctx.masker,
        lines: &ctx.lines,
    };
    match run.run(timeout, ctx.cancel.clone()).await {
        container::ContainerEnd::Exited(0) => Attempt {
            end: AttemptEnd::Succeeded,
            code: Some(0),
        },
        container::ContainerEnd::Exited(c) => Attempt {
            end: AttemptEnd::Failed(format!("exit code {c}")),
            code: Some(c),
        },
        container::ContainerEnd::TimedOut => Attempt {
            end: AttemptEnd::Failed(format!("timed out after {}", ctx.step.timeout)),
            code: None,
        },
        container::ContainerEnd::Canceled => Attempt {
            end: AttemptEnd::Canceled,
            code: None,
        },
        container::ContainerEnd::Error(e) => Attempt {
            end: AttemptEnd::Failed(e),
            code: None,
        },
    }
}

/// A cache's key: its prefix (default: the step's name, made safe for a file name) and a hash of its files'
/// names and contents (a missing file counts as such).
async fn cache_key(step: &str, cache: &model::kinds::Cache, src: &Path) -> String {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    for f in &cache.files {
        h.update(f.as_bytes());
        h.update([0]);
        match tokio::fs::read(src.join(f)).await {
            Ok(bytes) => {
                h.update((bytes.len() as u64).to_le_bytes());
                h.update(&bytes);
            }
            Err(_) => h.update(b"\xffmissing"),
        }
    }
    let prefix = cache.prefix.clone().unwrap_or_else(|| {
        step.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    });
    format!("{prefix}-{}", &hooks::hex(&h.finalize())[..16])
}

/// Copies `from`'s contents into `to` (made if missing) with `cp -a`.
async fn copy_tree(from: &Path, to: &Path) -> Result<(), String> {
    tokio::fs::create_dir_all(to)
        .await
        .map_err(|e| format!("creating {}: {e}", to.display()))?;
    let out = Command::new("cp")
        .arg("-a")
        .arg("--")
        .arg(from.join("."))
        .arg(to)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running cp: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

/// Restores a cache entry's directories into the checkout; answers the line that says what happened.
async fn restore_cache(cache: &model::kinds::Cache, entry: &Path, src: &Path, key: &str) -> String {
    if tokio::fs::metadata(entry).await.is_err() {
        return format!("cache: no entry for key {key} yet");
    }
    for (i, p) in cache.paths.iter().enumerate() {
        let saved = entry.join(i.to_string());
        if tokio::fs::metadata(&saved).await.is_err() {
            continue;
        }
        if let Err(e) = copy_tree(&saved, &src.join(p)).await {
            return format!("cache: restoring {p} from key {key} failed: {e}");
        }
    }
    format!("cache: restored {} from key {key}", cache.paths.join(", "))
}

/// Saves the step's cache directories under `key` unless an entry exists; answers what happened.
async fn save_cache(cache: &model::kinds::Cache, root: &Path, key: &str, src: &Path) -> String {
    let entry = root.join(key);
    if tokio::fs::metadata(&entry).await.is_ok() {
        return format!("cache: key {key} is already saved");
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let tmp = root.join(format!(".{key}.{}.{nanos}", std::process::id()));
    for (i, p) in cache.paths.iter().enumerate() {
        let from = src.join(p);
        if tokio::fs::metadata(&from).await.is_err() {
            continue;
        }
        if let Err(e) = copy_tree(&from, &tmp.join(i.to_string())).await {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return format!("cache: saving {p} failed: {e}");
        }
    }
    let _ = tokio::fs::create_dir_all(&tmp).await;
    // The rename is atomic: of two runs saving one key, one wins and the other's copy goes.
    match tokio::fs::rename(&tmp, &entry).await {
        Ok(()) => format!("cache: saved {} under key {key}", cache.paths.join(", ")),
        Err(_) => {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            format!("cache: key {key} was saved meanwhile")
        }
    }
}

/// The shell script of a step: each command echoed, then run; `sh -e` stops at the first failure.
fn script(commands: &[String]) -> String {
    let mut out = String::new();
    for c in commands {
        out.push_str("printf '+ %s\\n' '");
        out.push_str(&c.replace('\'', "'\\''"));
        out.push_str("'\n");
        out.push_str(c);
        out.push('\n');
    }
    out
}

async fn attempt(ctx: &StepCtx, timeout: Duration) -> Attempt {
    let mut cmd = Command::new("sh");
    cmd.arg("-e")
        .arg("-c")
        .arg(script(&ctx.step.commands))
        .current_dir(&ctx.dir)
        .envs(ctx.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Attempt {
                end: AttemptEnd::Failed(format!("starting sh: {e}")),
                code: None,
            }
        }
    };
    let pgid = child.id().map(|p| p as i32);
    let name = ctx.step.name.clone();
    let mut readers = JoinSet::new();
    if let Some(out) = child.stdout.take() {
        readers.spawn(forward(
            out,
            name.clone(),
            ctx.masker.clone(),
            ctx.lines.clone(),
        ));
    }
    if let Some(err) = child.stderr.take() {
        readers.spawn(forward(
            err,
            name.clone(),
            ctx.masker.clone(),
            ctx.lines.clone(),
        ));
    }
    let mut cancel = ctx.cancel.clone();
    enum Stop {
        Exited(std::io::Result<std::process::ExitStatus>),
        Timeout,
        Cancel,
    }
    let stop = tokio::select! {
        r = child.wait() => Stop::Exited(r),
        () = tokio::time::sleep(timeout) => Stop::Timeout,
        () = cancellation(&mut cancel) => Stop::Cancel,
    };
    let end = match stop {
        Stop::Exited(Ok(st)) if st.success() => Attempt {
            end: AttemptEnd::Succeeded,
            code: Some(0),
        },
        Stop::Exited(Ok(st)) => Attempt {
            end: AttemptEnd::Failed(match st.code() {
                Some(c) => format!("exit code {c}"),
                None => "killed by a signal".to_string(),
            }),
            code: st.code(),
        },
        Stop::Exited(Err(e)) => Attempt {
            end: AttemptEnd::Failed(format!("waiting for the step: {e}")),
            code: None,
        },
        Stop::Timeout | Stop::Cancel => {
            stop_group(pgid, &mut child).await;
            let timed_out = matches!(stop, Stop::Timeout);
            Attempt {
                end: if timed_out {
                    AttemptEnd::Failed(format!("timed out after {}", ctx.step.timeout))
                } else {
                    AttemptEnd::Canceled
                },
                code: None,
            }
        }
    };
    // The group may have left processes holding the pipes: stop it before waiting for the output's end.
    if let Some(p) = pgid {
        signal("KILL", p);
    }
    while readers.join_next().await.is_some() {}
    end
}

/// SIGTERM to the step's process group, SIGKILL after [`STOP_GRACE`].
async fn stop_group(pgid: Option<i32>, child: &mut tokio::process::Child) {
    let Some(p) = pgid else {
        let _ = child.kill().await;
        return;
    };
    signal("TERM", p);
    if tokio::time::timeout(STOP_GRACE, child.wait())
        .await
        .is_err()
    {
        signal("KILL", p);
        let _ = child.wait().await;
    }
}

fn signal(signal: &str, pgid: i32) {
    // Never a signal for "every process" (-1) or this process's own group (0).
    if pgid <= 1 {
        return;
    }
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stderr(Stdio::null())
        .status();
}

/// Sends each line of `from` (masked, cut at [`MAX_LINE`]) as a log line of `source`.
async fn forward(
    from: impl AsyncRead + Unpin,
    source: String,
    masker: Masker,
    to: mpsc::UnboundedSender<(String, String)>,
) {
    let mut reader = BufReader::new(from);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        while buf.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            buf.pop();
        }
        buf.truncate(MAX_LINE);
        let line = masker.mask(&String::from_utf8_lossy(&buf));
        if to.send((source.clone(), line)).is_err() {
            return;
        }
    }
}

/// Replaces secret values in log lines.
#[derive(Clone, Default)]
pub struct Masker {
    /// Longest first, so a value that contains another is masked whole.
    values: std::sync::Arc<Vec<String>>,
}

impl Masker {
    /// A masker for these values (empty ones are ignored).
    pub fn new(values: impl IntoIterator<Item = String>) -> Masker {
        let mut v: Vec<String> = values.into_iter().filter(|v| !v.is_empty()).collect();
        // A multi-line value is masked line by line, since logs are cut into lines.
        let lines: Vec<String> = v
            .iter()
            .flat_map(|s| s.lines().map(str::to_string).collect::<Vec<_>>())
            .filter(|l| !l.trim().is_empty())
            .collect();
        v.extend(lines);
        v.sort_by(|a, b| b.len().cmp(&a.len()).then(a.cmp(b)));
        v.dedup();
        Masker {
            values: std::sync::Arc::new(v),
        }
    }

    /// `line` with every secret value replaced by [`MASK`].
    pub fn mask(&self, line: &str) -> String {
        let mut out = line.to_string();
        for v in self.values.iter() {
            if out.contains(v.as_str()) {
                out = out.replace(v.as_str(), MASK);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests;
