//! The server's built-in provisioner: workers that claim jobs from the queue in the store, run them with the
//! providers this server offers, renew their leases (carrying the build's log lines and learning of
//! cancellation) and complete them.

use std::time::Duration;

use controllers::jobs::{self, Claimed, JobError, Outcome, Phase, ProvisionerInfo, Provisioners};
use model::kinds::{TemplateVersionSpec, Transition};
use model::Kind;
use provision::{Build, Logs, Providers};
use serde_json::Value;
use store::{LogLine, Store};
use tokio::sync::{mpsc, watch};

use super::hub::{agent_token, new_agent_secret};
use super::org_key;

/// How often a running job's lease is renewed (and its log lines sent).
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// How often log lines are stored while a job runs (between renewals).
const LOG_FLUSH: Duration = Duration::from_millis(250);
/// Builds the built-in provisioner runs at once.
pub const WORKERS: usize = 4;

/// Starts the built-in provisioner's workers; they stop when `shutdown` flips.
pub fn spawn(
    store: Store,
    registry: Provisioners,
    providers: Providers,
    agent_url: String,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let info = ProvisionerInfo {
        name: "built-in".into(),
        types: providers.types(),
        tags: Default::default(),
        organization: None,
    };
    (0..WORKERS)
        .map(|i| {
            let (store, registry, providers, info) =
                (store.clone(), registry.clone(), providers.clone(), info.clone());
            let (agent_url, mut shutdown) = (agent_url.clone(), shutdown.clone());
            tokio::spawn(async move {
                let holder = ProvisionerInfo {
                    name: format!("built-in-{i}"),
                    ..info.clone()
                };
                while !*shutdown.borrow() {
                    registry.seen(&info);
                    let (secret, hash) = new_agent_secret();
                    match jobs::claim(&store, &holder, &hash).await {
                        Ok(Some(c)) => run(&store, &providers, &agent_url, c, &secret).await,
                        Ok(None) => {
                            tokio::select! {
                                () = registry.wait_queued(Duration::from_secs(2)) => {}
                                _ = shutdown.changed() => {}
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "the built-in provisioner cannot read the job queue");
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                }
            })
        })
        .collect()
}

fn lines(batch: Vec<(String, String)>) -> Vec<LogLine> {
    batch.into_iter().map(|(s, t)| LogLine::now(s, t)).collect()
}

/// Runs one claimed job to its end.
async fn run(store: &Store, providers: &Providers, agent_url: &str, c: Claimed, secret: &str) {
    let org = c.key.organization.clone().unwrap_or_default();
    let (logs, mut rx) = Logs::channel();
    let build = match build_of(store, &org, &c, agent_url, secret).await {
        Ok(b) => b,
        Err(why) => {
            finish(
                store,
                &c,
                Outcome {
                    phase: Phase::Failed,
                    error: Some(why),
                    outputs: Value::Null,
                },
                vec![],
            )
            .await;
            return;
        }
    };
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
    let mut flush = tokio::time::interval(LOG_FLUSH);
    let mut pending: Vec<(String, String)> = Vec::new();
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = flush.tick() => {
                drain(&mut rx, &mut pending);
                if !pending.is_empty() {
                    let _ = jobs::append_job_logs(store, &c.key, lines(std::mem::take(&mut pending))).await;
                }
            }
            _ = renew.tick() => {
                drain(&mut rx, &mut pending);
                match jobs::renew(store, &c.key, c.epoch, lines(std::mem::take(&mut pending))).await {
                    Ok(r) if r.cancel => { let _ = cancel_tx.send(true); }
                    Ok(_) => {}
                    Err(JobError::Store(e)) => tracing::warn!(job = %c.key, error = %e, "cannot renew the lease"),
                    Err(e) => {
                        // Taken over or gone: this worker no longer owns the job.
                        tracing::warn!(job = %c.key, error = %e, "abandoning the job");
                        let _ = cancel_tx.send(true);
                        return;
                    }
                }
            }
        }
    };
    drain(&mut rx, &mut pending);
    let canceled = *cancel_tx.borrow();
    let outcome = match result {
        Ok(outputs) => Outcome {
            phase: Phase::Succeeded,
            error: None,
            outputs,
        },
        Err(_) if canceled => Outcome {
            phase: Phase::Canceled,
            error: Some("canceled".into()),
            outputs: Value::Null,
        },
        Err(e) => Outcome {
            phase: Phase::Failed,
            error: Some(e),
            outputs: Value::Null,
        },
    };
    if let Some(e) = &outcome.error {
        pending.push(("provision".into(), format!("error: {e}")));
    }
    finish(store, &c, outcome, lines(pending)).await;
}

fn drain(rx: &mut mpsc::UnboundedReceiver<(String, String)>, into: &mut Vec<(String, String)>) {
    while let Ok(l) = rx.try_recv() {
        into.push(l);
    }
}

/// Completes a job, retrying a few times when the store fails (completion is idempotent).
async fn finish(store: &Store, c: &Claimed, outcome: Outcome, logs: Vec<LogLine>) {
    let mut logs = Some(logs);
    for attempt in 0..5 {
        match jobs::complete(
            store,
            &c.key,
            c.epoch,
            outcome.clone(),
            logs.take().unwrap_or_default(),
        )
        .await
        {
            Ok(_) => return,
            Err(JobError::Store(e)) => {
                tracing::warn!(job = %c.key, attempt, error = %e, "cannot complete the job; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => {
                tracing::warn!(job = %c.key, error = %e, "the job's completion was refused");
                return;
            }
        }
    }
}

/// What the provider needs of a claimed job.
async fn build_of(
    store: &Store,
    org: &str,
    c: &Claimed,
    agent_url: &str,
    secret: &str,
) -> Result<Build, String> {
    let s = &c.spec;
    let vkey = org_key(Kind::TemplateVersion, org, &s.template_version);
    let tv = store
        .get(&vkey)
        .await
        .map_err(|e| format!("reading template version {}: {e}", s.template_version))?;
    let tv: TemplateVersionSpec = model::typed_spec(&tv).map_err(|e| e.to_string())?;
    let uid = match store
        .get(&org_key(Kind::Workspace, org, &s.workspace))
        .await
    {
        Ok(w) => w.metadata.uid.unwrap_or_default(),
        Err(_) => String::new(),
    };
    Ok(Build {
        organization: org.to_string(),
        workspace: s.workspace.clone(),
        workspace_uid: uid,
        owner: s.owner.clone(),
        number: s.build,
        transition: s.transition,
        template: tv.snapshot,
        parameters: s.parameters.clone(),
        agent_url: agent_url.to_string(),
        agent_token: (s.transition == Transition::Start)
            .then(|| agent_token(org, &s.workspace, s.build, secret)),
    })
}
