//! Workspace providers: what a provisioner does for one build of a workspace. A build gets a [`Build`] (the
//! workspace, its template version's snapshot, the transition, and for a start the agent's URL and token),
//! writes its progress to a [`Logs`] sink, watches a cancel signal, and ends with outputs or an error.
//!
//! - `process` (the embedded default): a directory per workspace under the provider's root, whose `home/` is
//!   the persistent part; a start runs `kiln agent` in it as a child process in its own process group
//!   (surviving a restart of the provisioner), a stop kills that group, a delete also removes the directory.
//! - `docker`: a container from the template's image with the agent injected by read-only bind mounts, and a
//!   named volume for the home (see [`docker`]).
//! - `terraform`: the real `terraform` binary applied to the template's files, with the agent's URL and token
//!   as variables and the state kept by the queue between builds (see [`terraform`]).
//!
//! [`worker`] is the loop every provisioner runs, built in or external: acquire a build from a [`Queue`], run
//! it, renew its lease with its log lines, complete it.

pub mod docker;
mod process;
pub mod terraform;
pub mod worker;

use std::collections::BTreeMap;

use model::kinds::{ProvisionerType, TemplateSpec, Transition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

pub use docker::DockerProvider;
pub use process::ProcessProvider;
pub use terraform::TerraformProvider;
pub use worker::{Acquired, Finished, JobRef, Queue, QueueError};

/// One build, as a provider sees it (and as the provisioner API sends it to an external provisioner).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
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
    /// For `terraform`: the state the previous build left (none before the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
}

/// What a build made: outputs recorded on its job, and (for `terraform`) the state to keep for the next.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Done {
    pub outputs: serde_json::Value,
    pub state: Option<String>,
}

/// Why a build failed, and the state it left (a failed `terraform apply` may have made resources).
#[derive(Debug, Clone, PartialEq)]
pub struct BuildError {
    pub message: String,
    pub state: Option<String>,
}

impl From<String> for BuildError {
    fn from(message: String) -> Self {
        BuildError {
            message,
            state: None,
        }
    }
}

impl From<&str> for BuildError {
    fn from(message: &str) -> Self {
        message.to_string().into()
    }
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
    pub terraform: Option<TerraformProvider>,
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
        if self.terraform.is_some() {
            out.push(ProvisionerType::Terraform);
        }
        out
    }

    /// Runs a build; `cancel` turning true asks it to stop.
    pub async fn run(
        &self,
        build: &Build,
        logs: &Logs,
        cancel: watch::Receiver<bool>,
    ) -> Result<Done, BuildError> {
        let outputs = |r: Result<serde_json::Value, String>| {
            r.map(|outputs| Done {
                outputs,
                state: None,
            })
            .map_err(BuildError::from)
        };
        match build.template.provisioner {
            ProvisionerType::Process => match &self.process {
                Some(p) => outputs(p.run(build, logs, cancel).await),
                None => Err("this provisioner does not run process builds".into()),
            },
            ProvisionerType::Docker => match &self.docker {
                Some(p) => outputs(p.run(build, logs, cancel).await),
                None => {
                    Err("this provisioner does not run docker builds (no Docker Engine)".into())
                }
            },
            ProvisionerType::Terraform => match &self.terraform {
                Some(p) => p.run(build, logs, cancel).await,
                None => Err(
                    "this provisioner does not run terraform builds (no terraform binary)".into(),
                ),
            },
        }
    }
}

impl Providers {
    /// Every provider this host can run: `process` always, `docker` when an Engine answers, `terraform` when the
    /// binary runs. Workspaces' directories go under `data` (`workspaces/` for process, `terraform/` for
    /// terraform); `exe` is the kiln binary injected into containers; `agent_command` runs an agent on this
    /// host (e.g. `[exe, "agent"]`).
    pub async fn detect(
        data: &std::path::Path,
        exe: &std::path::Path,
        agent_command: Vec<String>,
    ) -> Providers {
        let docker = match DockerProvider::connect(exe).await {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::info!(error = %e, "docker workspaces are unavailable");
                None
            }
        };
        let terraform =
            match TerraformProvider::detect(data.join("terraform"), agent_command.clone()).await {
                Ok((t, version)) => {
                    tracing::info!(%version, "terraform workspaces are available");
                    Some(t)
                }
                Err(e) => {
                    tracing::info!(error = %e, "terraform workspaces are unavailable");
                    None
                }
            };
        Providers {
            process: Some(ProcessProvider::new(data.join("workspaces"), agent_command)),
            docker,
            terraform,
        }
    }
}

/// Sends `signal` (e.g. `TERM`) to `target`: a pid, or `-<pgid>` for a process group.
fn signal(signal: &str, target: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(target)
        .stderr(std::process::Stdio::null())
        .status();
}
