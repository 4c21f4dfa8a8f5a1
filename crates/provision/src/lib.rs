//! Workspace providers: what a provisioner does for one build of a workspace. A build gets a [`Build`] (the
//! workspace, its template version's snapshot, the transition, and for a start the agent's URL and token),
//! writes its progress to a [`Logs`] sink, watches a cancel signal, and ends with outputs or an error.
//!
//! - `process` (the embedded default): a directory per workspace under the provider's root, whose `home/` is
//!   the persistent part; a start runs `kiln agent` in it as a child process in its own process group
//!   (surviving a restart of the provisioner), a stop kills that group, a delete also removes the directory.
//! - `docker`: a container from the template's image with the agent injected by read-only bind mounts, and a
//!   named volume for the home (see [`docker`]).

pub mod docker;
mod process;

use std::collections::BTreeMap;

use model::kinds::{ProvisionerType, TemplateSpec, Transition};
use tokio::sync::{mpsc, watch};

pub use docker::DockerProvider;
pub use process::ProcessProvider;

/// One build, as a provider sees it.
#[derive(Debug, Clone)]
pub struct Build {
    pub organization: String,
    pub workspace: String,
    /// The workspace's uid (stable across builds).
    pub workspace_uid: String,
    pub owner: String,
    pub number: u32,
    pub transition: Transition,
    pub template: TemplateSpec,
    pub parameters: BTreeMap<String, String>,
    /// For a start: where the agent dials (the server's access URL).
    pub agent_url: String,
    /// For a start: the agent's token.
    pub agent_token: Option<String>,
}

/// Where a build writes its log lines (source, text).
#[derive(Debug, Clone)]
pub struct Logs(mpsc::UnboundedSender<(String, String)>);

impl Logs {
    /// A sink and the receiver that collects its lines.
    pub fn channel() -> (Logs, mpsc::UnboundedReceiver<(String, String)>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Logs(tx), rx)
    }

    /// Writes a line under `source` (e.g. `provision`, `terraform`).
    pub fn line(&self, source: &str, text: impl Into<String>) {
        let _ = self.0.send((source.to_string(), text.into()));
    }
}

/// The providers a provisioner offers.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    pub process: Option<ProcessProvider>,
    pub docker: Option<DockerProvider>,
}

impl Providers {
    /// The provider types offered.
    pub fn types(&self) -> Vec<ProvisionerType> {
        let mut out = Vec::new();
        if self.process.is_some() {
            out.push(ProvisionerType::Process);
        }
        if self.docker.is_some() {
            out.push(ProvisionerType::Docker);
        }
        out
    }

    /// Runs a build; `cancel` turning true asks it to stop. Outputs are a JSON object recorded on the job.
    pub async fn run(
        &self,
        build: &Build,
        logs: &Logs,
        cancel: watch::Receiver<bool>,
    ) -> Result<serde_json::Value, String> {
        match build.template.provisioner {
            ProvisionerType::Process => match &self.process {
                Some(p) => p.run(build, logs, cancel).await,
                None => Err("this provisioner does not run process builds".into()),
            },
            ProvisionerType::Docker => match &self.docker {
                Some(p) => p.run(build, logs, cancel).await,
                None => {
                    Err("this provisioner does not run docker builds (no Docker Engine)".into())
                }
            },
            other => Err(format!("this provisioner does not run {other:?} builds")),
        }
    }
}
