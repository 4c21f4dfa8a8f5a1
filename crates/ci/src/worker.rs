//! The loop every pipeline runner runs, the same for the server's built-in runner and for `kiln runner`:
//! acquire a run from a [`Queue`], execute it in a fresh directory, send its log lines in batches and its
//! steps' status as they change, renew its lease (learning of cancellation and approvals), save its artifacts,
//! and complete it with its outcome.
//!
//! A [`Queue`] is the run queue as one runner reaches it: the store itself for the built-in runner, the runner
//! API over HTTP for `kiln runner`. An operation refused as [`QueueError::Lost`] (a stale epoch: the lease
//! expired and another runner took the run; or the run is gone or over) stops the run at once, and it is not
//! completed; an [`QueueError::Unavailable`] one is retried at the next turn.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use model::kinds::StepApproval;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{execute, Report, RunEnd, RunJob, Runner, Signals, StepStatus};

/// How often a held run's lease is renewed (the lease lasts several times this).
pub const RENEW_EVERY: Duration = Duration::from_secs(2);

/// A log line as a runner sends it: (source, text).
pub type Line = (String, String);

/// What a renewal answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Renewal {
    /// Stop the run: it was canceled.
    pub cancel: bool,
    /// The approvals given to the run's approval steps so far.
    #[serde(default)]
    pub approvals: Vec<StepApproval>,
}

/// Why the queue refused or failed an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// The run is no longer this runner's (stale epoch, over, or deleted): stop working on it.
    Lost(String),
    /// The queue could not be reached or failed; worth retrying.
    Unavailable(String),
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueError::Lost(why) | QueueError::Unavailable(why) => f.write_str(why),
        }
    }
}

/// The run queue as one runner reaches it.
pub trait Queue: Send + Sync {
    /// Waits a while for a run this runner can take and claims it; `None` when none came in that time.
    fn acquire(&self) -> impl Future<Output = Result<Option<RunJob>, QueueError>> + Send;
    /// Appends log lines of a held run.
    fn logs(
        &self,
        job: &RunJob,
        lines: Vec<Line>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// Extends the lease of a held run after appending `lines`.
    fn renew(
        &self,
        job: &RunJob,
        lines: Vec<Line>,
    ) -> impl Future<Output = Result<Renewal, QueueError>> + Send;
    /// Records the steps' status (and the commit checked out) of a held run.
    fn steps(
        &self,
        job: &RunJob,
        steps: &[StepStatus],
        commit: Option<&str>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// Saves `file` as the held run's artifact `path`.
    fn artifact(
        &self,
        job: &RunJob,
        path: &str,
        file: &Path,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// Records how a held run ended, after its last lines. Idempotent for the same outcome.
    fn complete(
        &self,
        job: &RunJob,
        end: &RunEnd,
        lines: Vec<Line>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// How often the lines of a running run are sent between renewals.
    fn log_flush(&self) -> Duration {
        Duration::from_millis(250)
    }
}

/// Acquires and runs runs, at most `slots` at once (each in a task of its own), until `stop` flips; then waits
/// for the runs under way (which `cancel` stops when it flips).
pub async fn serve<Q: Queue + 'static>(
    queue: Arc<Q>,
    runner: Arc<Runner>,
    dir: PathBuf,
    slots: usize,
    mut stop: watch::Receiver<bool>,
    cancel: watch::Receiver<bool>,
) {
    let permits = Arc::new(tokio::sync::Semaphore::new(slots.max(1)));
    let mut under_way = tokio::task::JoinSet::new();
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = stop.changed() => break,
        };
        // Runs that ended are reaped; a panic in one is logged, never the end of the runner.
        while let Some(done) = under_way.try_join_next() {
            if let Err(e) = done {
                tracing::error!(error = %e, "a run's task failed");
            }
        }
        let acquired = tokio::select! {
            r = queue.acquire() => r,
            _ = stop.changed() => break,
        };
        match acquired {
            Ok(Some(job)) => {
                failures = 0;
                let (queue, runner, dir, cancel) =
                    (queue.clone(), runner.clone(), dir.clone(), cancel.clone());
                under_way.spawn(async move {
                    hold(queue.as_ref(), &runner, &dir, job, cancel).await;
                    drop(permit);
                });
            }
            Ok(None) => failures = 0,
            Err(e) => {
                drop(permit);
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(500 * u64::from(failures.min(10)));
                tracing::warn!(error = %e, retry_in = ?wait, "cannot acquire a run");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => break,
                }
            }
        }
    }
    while under_way.join_next().await.is_some() {}
}

/// Carries a run's progress to the queue: log lines in batches, step status as it changes, artifacts.
struct QueueReport<'a, Q> {
    queue: &'a Q,
    job: &'a RunJob,
    lines: Mutex<Vec<Line>>,
    /// Set when the queue said the run is no longer this runner's.
    lost: watch::Sender<Option<String>>,
}

impl<Q: Queue> QueueReport<'_, Q> {
    fn take(&self) -> Vec<Line> {
        std::mem::take(&mut *self.lines.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn check(&self, r: Result<(), QueueError>, what: &str) {
        match r {
            Ok(()) => {}
            Err(QueueError::Lost(why)) => {
                self.lost.send_replace(Some(why));
            }
            Err(e) => tracing::warn!(run = %self.job.name, error = %e, "{what}"),
        }
    }

    async fn flush(&self) {
        let lines = self.take();
        if !lines.is_empty() {
            let r = self.queue.logs(self.job, lines).await;
            self.check(r, "sending a run's log lines");
        }
    }
}

impl<Q: Queue> Report for QueueReport<'_, Q> {
    fn line(&self, source: &str, text: String) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((source.to_string(), text));
    }

    async fn steps(&self, steps: &[StepStatus], commit: Option<&str>) {
        // Lines written before a step's change come first in the log.
        self.flush().await;
        let r = self.queue.steps(self.job, steps, commit).await;
        self.check(r, "recording a run's steps");
    }

    async fn artifact(&self, _step: &str, path: &str, file: &Path) -> Result<(), String> {
        self.queue
            .artifact(self.job, path, file)
            .await
            .map_err(|e| e.to_string())
    }
}

/// Runs one acquired run to its end in `<dir>/<org>/<run>` and completes it; `stop` flipping cancels it.
pub async fn hold<Q: Queue>(
    queue: &Q,
    runner: &Runner,
    dir: &Path,
    job: RunJob,
    mut stop: watch::Receiver<bool>,
) {
    let run_dir = dir.join(&job.organization).join(&job.name);
    let _ = tokio::fs::remove_dir_all(&run_dir).await;
    let (lost_tx, mut lost_rx) = watch::channel(None);
    let report = QueueReport {
        queue,
        job: &job,
        lines: Mutex::new(Vec::new()),
        lost: lost_tx,
    };
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let (approvals_tx, approvals_rx) = watch::channel(job.spec.approvals.clone());
    let renewals = async {
        loop {
            tokio::select! {
                () = tokio::time::sleep(RENEW_EVERY) => {}
                () = async { let _ = stop.wait_for(|s| *s).await; } => {
                    report.line("runner", format!("runner {} is stopping; the run is canceled", runner.name));
                    cancel_tx.send_replace(true);
                    std::future::pending::<()>().await;
                }
                () = async { let _ = lost_rx.wait_for(Option::is_some).await; } => {
                    cancel_tx.send_replace(true);
                    std::future::pending::<()>().await;
                }
            }
            match queue.renew(&job, report.take()).await {
                Ok(r) => {
                    if r.cancel {
                        cancel_tx.send_replace(true);
                    }
                    approvals_tx.send_if_modified(|a| {
                        let changed = *a != r.approvals;
                        *a = r.approvals;
                        changed
                    });
                }
                Err(QueueError::Lost(why)) => {
                    report.lost.send_replace(Some(why));
                }
                Err(e) => tracing::warn!(run = %job.name, error = %e, "renewing a run's lease"),
            }
        }
    };
    let flusher = async {
        loop {
            tokio::time::sleep(queue.log_flush()).await;
            report.flush().await;
        }
    };
    let signals = Signals {
        cancel: cancel_rx,
        approvals: approvals_rx,
    };
    let end = tokio::select! {
        end = execute(&job, &run_dir, runner, &report, signals) => end,
        () = async { tokio::join!(renewals, flusher); } => unreachable!("the renewal and flush loops do not end"),
    };
    let _ = tokio::fs::remove_dir_all(&run_dir).await;
    let lost = report.lost.borrow().clone();
    if let Some(why) = lost {
        // Another runner holds it now, or it is gone: its record is not this runner's to write.
        tracing::warn!(run = %job.name, %why, "the run was lost");
        return;
    }
    let mut last = report.take();
    last.push(("runner".into(), ending_line(&end)));
    for attempt in 0..5u64 {
        match queue.complete(&job, &end, last.clone()).await {
            Ok(()) => return,
            Err(QueueError::Lost(why)) => {
                tracing::warn!(run = %job.name, %why, "completing a run");
                return;
            }
            Err(e) => {
                tracing::warn!(run = %job.name, error = %e, "completing a run; retrying");
                tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await;
            }
        }
    }
}

/// The run's last log line.
fn ending_line(end: &RunEnd) -> String {
    match (&end.outcome, &end.error) {
        (crate::Outcome::Succeeded, _) => "the run succeeded".to_string(),
        (o, Some(e)) => format!("the run ended as {o:?}: {e}"),
        (o, None) => format!("the run ended as {o:?}"),
    }
}

/// A file's bytes as a stream of chunks (an artifact on its way to the server or to disk).
pub fn file_chunks(
    f: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + Unpin + 'static
{
    use tokio::io::AsyncReadExt as _;
    Box::pin(futures_util::stream::unfold(Some(f), |f| async move {
        let mut f = f?;
        let mut buf = vec![0u8; 256 * 1024];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), Some(f)))
            }
            Err(e) => Some((Err(e), None)),
        }
    }))
}

/// Whether a file is executable by its owner (an artifact keeps that).
pub async fn is_executable(f: &tokio::fs::File) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    f.metadata()
        .await
        .is_ok_and(|m| m.permissions().mode() & 0o100 != 0)
}
