//! The job queue as provisioners reach it through this server: the operations the provisioner API
//! ([`super::provisioners`]) and the built-in workers share (acquire, logs, renew, complete over
//! `controllers::jobs`, with the build's template version, agent token and Terraform state), and the built-in
//! provisioner, whose workers run [`provision::worker::serve`] on a [`StoreQueue`].

use std::time::Duration;

use controllers::jobs::{self, Claimed, JobError, Outcome, Phase, ProvisionerInfo, Provisioners};
use model::kinds::{ProvisionerType, TemplateVersionSpec, Transition};
use model::Kind;
use provision::worker::{Ending, Line};
use provision::{Acquired, Build, Finished, JobRef, Providers, Queue, QueueError};
use serde_json::Value;
use store::{Key, LogLine, Store, StoreError};
use tokio::sync::watch;

use super::hub::{agent_token, new_agent_secret};
use super::org_key;

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
            let queue = StoreQueue {
                store: store.clone(),
                registry: registry.clone(),
                info: info.clone(),
                holder: ProvisionerInfo {
                    name: format!("built-in-{i}"),
                    ..info.clone()
                },
                agent_url: agent_url.clone(),
            };
            let (providers, shutdown) = (providers.clone(), shutdown.clone());
            tokio::spawn(async move {
                provision::worker::serve(&queue, &providers, shutdown).await;
            })
        })
        .collect()
}

/// The queue in this server's store, as one built-in worker reaches it.
struct StoreQueue {
    store: Store,
    registry: Provisioners,
    /// How the provisioner is listed among the live ones.
    info: ProvisionerInfo,
    /// The worker, as a job's holder.
    holder: ProvisionerInfo,
    agent_url: String,
}

impl Queue for StoreQueue {
    async fn acquire(&self) -> Result<Option<Acquired>, QueueError> {
        self.registry.seen(&self.info);
        match acquire(&self.store, &self.holder, &self.agent_url).await {
            Ok(Some(a)) => Ok(Some(a)),
            Ok(None) => {
                self.registry.wait_queued(Duration::from_secs(2)).await;
                Ok(None)
            }
            Err(e) => Err(QueueError::Unavailable(e.to_string())),
        }
    }

    async fn logs(&self, job: &JobRef, lines: Vec<Line>) -> Result<(), QueueError> {
        let key = job_key(job);
        // The worker holds the job: its lines go in without the epoch check a remote provisioner gets.
        jobs::append_job_logs(&self.store, &key, stamp(lines))
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))
    }

    async fn renew(&self, job: &JobRef, lines: Vec<Line>) -> Result<bool, QueueError> {
        renew(&self.store, job, lines).await.map_err(queue_error)
    }

    async fn complete(
        &self,
        job: &JobRef,
        finished: &Finished,
        lines: Vec<Line>,
    ) -> Result<(), QueueError> {
        complete(&self.store, job, finished, lines)
            .await
            .map_err(queue_error)
    }
}

/// How a refused or failed queue operation reaches a provisioner.
pub(crate) fn queue_error(e: JobError) -> QueueError {
    match e {
        JobError::Store(e) => QueueError::Unavailable(e.to_string()),
        other => QueueError::Lost(other.to_string()),
    }
}

pub(crate) fn job_key(job: &JobRef) -> Key {
    org_key(Kind::ProvisionerJob, &job.organization, &job.name)
}

pub(crate) fn stamp(lines: Vec<Line>) -> Vec<LogLine> {
    lines.into_iter().map(|(s, t)| LogLine::now(s, t)).collect()
}

/// Where a workspace's Terraform state is kept (it holds the agent's token, so it is no resource).
pub(crate) fn state_blob(org: &str, workspace_uid: &str) -> String {
    format!("terraform-state/{org}/{workspace_uid}")
}

/// Claims the oldest job `holder` can run and gathers its build. A job whose build cannot be gathered (its
/// template version gone) is failed with the reason, and the next one is tried.
pub(crate) async fn acquire(
    store: &Store,
    holder: &ProvisionerInfo,
    agent_url: &str,
) -> Result<Option<Acquired>, StoreError> {
    loop {
        let (secret, hash) = new_agent_secret();
        let Some(c) = jobs::claim(store, holder, &hash).await? else {
            return Ok(None);
        };
        let org = c.key.organization.clone().unwrap_or_default();
        let job = JobRef {
            organization: org.clone(),
            name: c.key.name.clone(),
            epoch: c.epoch,
        };
        match build_of(store, &org, &c, agent_url, &secret).await {
            Ok(build) => return Ok(Some(Acquired { job, build })),
            Err(why) => {
                let outcome = Outcome {
                    phase: Phase::Failed,
                    error: Some(why.clone()),
                    outputs: Value::Null,
                };
                let line = vec![LogLine::now("provision", format!("error: {why}"))];
                if let Err(e) = jobs::complete(store, &c.key, c.epoch, outcome, line).await {
                    tracing::warn!(job = %c.key, error = %e, "cannot fail a job whose build is unreadable");
                }
            }
        }
    }
}

/// Renews a held job's lease after appending its lines; whether it was canceled.
pub(crate) async fn renew(store: &Store, job: &JobRef, lines: Vec<Line>) -> Result<bool, JobError> {
    let r = jobs::renew(store, &job_key(job), job.epoch, stamp(lines)).await?;
    Ok(r.cancel)
}

/// Completes a held job: keeps the Terraform state it reports (dropped once a delete succeeded), then
/// records the outcome after its last lines.
pub(crate) async fn complete(
    store: &Store,
    job: &JobRef,
    finished: &Finished,
    lines: Vec<Line>,
) -> Result<(), JobError> {
    let key = job_key(job);
    let held = jobs::held(store, &key, job.epoch).await?;
    if !jobs::phase(&held).is_final() {
        let spec = model::typed_spec::<model::kinds::ProvisionerJobSpec>(&held)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let uid = match store
            .get(&org_key(
                Kind::Workspace,
                &job.organization,
                &spec.workspace,
            ))
            .await
        {
            Ok(w) => w.metadata.uid,
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(uid) = uid {
            let blob = state_blob(&job.organization, &uid);
            let deleted =
                spec.transition == Transition::Delete && finished.phase == Ending::Succeeded;
            if deleted {
                store.delete_blob(&blob).await?;
            } else if let Some(state) = &finished.state {
                store.put_blob(&blob, state.clone().into_bytes()).await?;
            }
        }
    }
    let outcome = Outcome {
        phase: match finished.phase {
            Ending::Succeeded => Phase::Succeeded,
            Ending::Failed => Phase::Failed,
            Ending::Canceled => Phase::Canceled,
        },
        error: finished.error.clone(),
        outputs: finished.outputs.clone(),
    };
    jobs::complete(store, &key, job.epoch, outcome, stamp(lines)).await?;
    Ok(())
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
    let state = if tv.snapshot.provisioner == ProvisionerType::Terraform && !uid.is_empty() {
        let blob = store
            .get_blob(&state_blob(org, &uid))
            .await
            .map_err(|e| format!("reading the workspace's terraform state: {e}"))?;
        blob.map(|b| String::from_utf8_lossy(&b).into_owned())
    } else {
        None
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
        state,
    })
}
