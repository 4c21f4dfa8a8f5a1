//! The `process` provider: a workspace is a directory on the provisioner's host and an agent child process.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use dataplane::process::procfs;
use model::kinds::Transition;
use serde_json::json;
use tokio::sync::watch;

use crate::{Build, Logs};

/// How long a stop waits for the agent's process group to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// Builds workspaces as directories under `root`, each running `agent_command` as its agent.
#[derive(Debug, Clone)]
pub struct ProcessProvider {
    root: PathBuf,
    agent_command: Vec<String>,
}

/// The pid of a started agent and its start time (field 22 of `/proc/<pid>/stat`), so a pid reused by
/// another process is never signalled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Recorded {
    pid: u32,
    start: u64,
}

fn start_time(pid: u32) -> Option<u64> {
    procfs::stat(pid).map(|s| s.start_time)
}

/// Whether the recorded process still runs (a zombie waiting to be reaped does not).
fn alive(r: Recorded) -> bool {
    procfs::is_alive(r.pid, r.start)
}

impl ProcessProvider {
    /// Workspaces live under `root`; `agent_command` is the program and arguments that run an agent (e.g.
    /// `[<path of kiln>, "agent"]`), given `KILN_AGENT_URL` and `KILN_AGENT_TOKEN` in its environment.
    pub fn new(root: impl Into<PathBuf>, agent_command: Vec<String>) -> ProcessProvider {
        ProcessProvider {
            root: root.into(),
            agent_command,
        }
    }

    /// The directory of a workspace.
    pub fn directory(&self, organization: &str, workspace: &str) -> PathBuf {
        self.root.join(organization).join(workspace)
    }

    fn pid_file(dir: &Path) -> PathBuf {
        dir.join("agent.pid")
    }

    fn recorded(dir: &Path) -> Option<Recorded> {
        let text = std::fs::read_to_string(Self::pid_file(dir)).ok()?;
        let mut parts = text.split_whitespace();
        let pid = parts.next()?.parse().ok()?;
        let start = parts.next()?.parse().ok()?;
        Some(Recorded { pid, start })
    }

    pub(crate) async fn run(
        &self,
        build: &Build,
        logs: &Logs,
        cancel: watch::Receiver<bool>,
    ) -> Result<serde_json::Value, String> {
        let dir = self.directory(&build.organization, &build.workspace);
        match build.transition {
            Transition::Start => self.start(build, &dir, logs, cancel).await,
            Transition::Stop => {
                stop_agent(&dir, logs).await?;
                logs.line(
                    "provision",
                    format!("kept {} (the persistent home)", dir.join("home").display()),
                );
                Ok(json!({"directory": dir}))
            }
            Transition::Delete => {
                stop_agent(&dir, logs).await?;
                match tokio::fs::remove_dir_all(&dir).await {
                    Ok(()) => logs.line("provision", format!("removed {}", dir.display())),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(format!("removing {}: {e}", dir.display())),
                }
                Ok(json!({}))
            }
        }
    }

    async fn start(
        &self,
        build: &Build,
        dir: &Path,
        logs: &Logs,
        cancel: watch::Receiver<bool>,
    ) -> Result<serde_json::Value, String> {
        stop_agent(dir, logs).await?;
        let home = dir.join("home");
        tokio::fs::create_dir_all(&home)
            .await
            .map_err(|e| format!("creating {}: {e}", home.display()))?;
        logs.line(
            "provision",
            format!("workspace directory {}", dir.display()),
        );
        if *cancel.borrow() {
            return Err("canceled".into());
        }
        let token = build
            .agent_token
            .as_deref()
            .ok_or("a start build needs an agent token")?;
        let (program, args) = self
            .agent_command
            .split_first()
            .ok_or("no agent command is configured")?;
        let log_path = dir.join("agent.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            .current_dir(&home)
            .env("HOME", &home)
            .env("KILN_AGENT_URL", &build.agent_url)
            .env("KILN_AGENT_TOKEN", token)
            .env("KILN_WORKSPACE_NAME", &build.workspace)
            .env("KILN_WORKSPACE_OWNER", &build.owner)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting the agent ({program}): {e}"))?;
        let pid = child.id().ok_or("the agent exited at once")?;
        // The agent outlives this build (and the provisioner): the child is not waited on here.
        drop(child);
        let start = start_time(pid).ok_or("the agent exited at once")?;
        std::fs::write(Self::pid_file(dir), format!("{pid} {start}\n"))
            .map_err(|e| format!("writing the pid file: {e}"))?;
        logs.line(
            "provision",
            format!(
                "agent started (pid {pid}), dialing {}; its output goes to {}",
                build.agent_url,
                log_path.display()
            ),
        );
        Ok(json!({"directory": dir, "pid": pid}))
    }
}

/// Stops the workspace's agent (its whole process group), if one runs.
async fn stop_agent(dir: &Path, logs: &Logs) -> Result<(), String> {
    let Some(r) = ProcessProvider::recorded(dir) else {
        return Ok(());
    };
    if alive(r) {
        signal_group(r.pid, "TERM");
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        while alive(r) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if alive(r) {
            signal_group(r.pid, "KILL");
            logs.line(
                "provision",
                format!(
                    "agent (pid {}) killed after {}s",
                    r.pid,
                    STOP_GRACE.as_secs()
                ),
            );
        } else {
            logs.line("provision", format!("agent (pid {}) stopped", r.pid));
        }
    }
    match std::fs::remove_file(ProcessProvider::pid_file(dir)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("removing the pid file: {e}")),
    }
}

/// Sends a signal to the process group led by `pid` (the agent and everything it started).
fn signal_group(pid: u32, signal: &str) {
    crate::signal(signal, &format!("-{pid}"));
}
