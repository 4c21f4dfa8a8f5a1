//! The loop a provisioner runs, the same for the server's built-in workers and for an external
//! `kiln provisioner`: acquire a build from a [`Queue`], run it with the [`Providers`] offered, send its log
//! lines while it runs, renew its lease (learning of cancellation), and complete it with its outcome.
//!
//! A [`Queue`] is the job queue as one provisioner reaches it: the store itself for the built-in workers, the
//! provisioner API over HTTP for an external one. A renewal or completion the queue refuses as [`QueueError::Lost`]
//! (a stale epoch: the lease expired and another provisioner took the job; or the job is gone) stops the build
//! at once and is not retried; an [`QueueError::Unavailable`] one is retried.

use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::{Build, Logs, Providers};

/// How often a running job's lease is renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(5);

/// A job held by this provisioner: its name and the epoch of the claim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    pub organization: String,
    pub name: String,
    pub epoch: u64,
}

/// A job won from the queue, with what its provider needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Acquired {
    pub job: JobRef,
    pub build: Build,
}

/// How a build ended.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    Succeeded,
    Failed,
    Canceled,
}

/// A build's outcome as the provisioner reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Finished {
    pub phase: Ending,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub outputs: serde_json::Value,
    /// For `terraform`: the state to keep for the workspace's next build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// Why the queue refused or failed an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// The job is no longer this provisioner's (stale epoch, ended, or deleted): stop working on it.
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

/// A log line as a provisioner sends it: (source, text).
pub type Line = (String, String);

/// The job queue as one provisioner reaches it.
pub trait Queue: Send + Sync {
    /// Waits a while for a job this provisioner can run and claims it; `None` when none came in that time.
    fn acquire(&self) -> impl Future<Output = Result<Option<Acquired>, QueueError>> + Send;
    /// Appends log lines of a held job.
    fn logs(
        &self,
        job: &JobRef,
        lines: Vec<Line>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// Extends the lease of a held job after appending `lines`; answers whether the job was canceled.
    fn renew(
        &self,
        job: &JobRef,
        lines: Vec<Line>,
    ) -> impl Future<Output = Result<bool, QueueError>> + Send;
    /// Records how a held job ended, after its last lines. Idempotent for the same outcome.
    fn complete(
        &self,
        job: &JobRef,
        finished: &Finished,
        lines: Vec<Line>,
    ) -> impl Future<Output = Result<(), QueueError>> + Send;
    /// How often the lines of a running build are sent between renewals.
    fn log_flush(&self) -> Duration {
        Duration::from_millis(250)
    }
}

/// Acquires and runs builds until `shutdown` flips (a build under way is finished first).
pub async fn serve<Q: Queue>(
    queue: &Q,
    providers: &Providers,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut failures = 0u32;
    while !*shutdown.borrow() {
        let acquired = tokio::select! {
            r = queue.acquire() => r,
            _ = shutdown.changed() => break,
        };
        match acquired {
            Ok(Some(job)) => {
                failures = 0;
                run_job(queue, providers, job).await;
            }
            Ok(None) => failures = 0,
            Err(e) => {
                failures = failures.saturating_add(1);
                let wait = Duration::from_millis(500 * u64::from(failures.min(10)));
                tracing::warn!(error = %e, retry_in = ?wait, "cannot acquire a job");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
    }
}

fn drain(rx: &mut mpsc::UnboundedReceiver<Line>, into: &mut Vec<Line>) {
    while let Ok(l) = rx.try_recv() {
        into.push(l);
    }
}

/// Runs one acquired job to its end and completes it.
pub async fn run_job<Q: Queue>(queue: &Q, providers: &Providers, acquired: Acquired) {
    let Acquired { job, build } = acquired;
    let (logs, mut rx) = Logs::channel();
    logs.line(
        "provision",
        format!(
            "build {} ({}) of workspace {}",
            build.number,
            build.transition.as_str(),
            build.workspace
        ),
    );
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let work = providers.run(&build, &logs, cancel_rx);
    tokio::pin!(work);
    let mut renew = tokio::time::interval(RENEW_EVERY);
    renew.tick().await;
    let mut flush = tokio::time::interval(queue.log_flush());
    let mut pending: Vec<Line> = Vec::new();
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = flush.tick() => {
                drain(&mut rx, &mut pending);
                if !pending.is_empty() {
                    match queue.logs(&job, std::mem::take(&mut pending)).await {
                        Ok(()) => {}
                        Err(QueueError::Lost(why)) => {
                            tracing::warn!(job = %job.name, %why, "abandoning the job");
                            let _ = cancel_tx.send(true);
                            return;
                        }
                        Err(e) => tracing::warn!(job = %job.name, error = %e, "cannot send log lines"),
                    }
                }
            }
            _ = renew.tick() => {
                drain(&mut rx, &mut pending);
                match queue.renew(&job, std::mem::take(&mut pending)).await {
                    Ok(true) => { let _ = cancel_tx.send(true); }
                    Ok(false) => {}
                    Err(QueueError::Lost(why)) => {
                        // Taken over or gone: this provisioner no longer owns the job.
                        tracing::warn!(job = %job.name, %why, "abandoning the job");
                        let _ = cancel_tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!(job = %job.name, error = %e, "cannot renew the lease"),
                }
            }
        }
    };
    drain(&mut rx, &mut pending);
    let canceled = *cancel_tx.borrow();
    let finished = match result {
        Ok(done) => Finished {
            phase: Ending::Succeeded,
            error: None,
            outputs: done.outputs,
            state: done.state,
        },
        Err(e) => Finished {
            phase: if canceled {
                Ending::Canceled
            } else {
                Ending::Failed
            },
            error: Some(if canceled {
                "canceled".into()
            } else {
                e.message
            }),
            outputs: serde_json::Value::Null,
            state: e.state,
        },
    };
    if let Some(e) = &finished.error {
        pending.push(("provision".into(), format!("error: {e}")));
    }
    let mut lines = Some(pending);
    for attempt in 0..10u64 {
        match queue
            .complete(&job, &finished, lines.take().unwrap_or_default())
            .await
        {
            Ok(()) => return,
            Err(QueueError::Lost(why)) => {
                tracing::warn!(job = %job.name, %why, "the job's completion was refused");
                return;
            }
            Err(e) => {
                tracing::warn!(job = %job.name, attempt, error = %e, "cannot complete the job; retrying");
                tokio::time::sleep(Duration::from_millis(500 * (attempt + 1))).await;
            }
        }
    }
}
