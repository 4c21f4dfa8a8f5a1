//! The `terraform` provider: runs the real `terraform` binary on the template's files.
//!
//! Each build writes the template's files into a fresh directory with the workspace's last state
//! (`terraform.tfstate`, kept by the queue between builds, not on the provisioner's disk) and the build's
//! variables (`kiln.auto.tfvars.json`), then runs `terraform init` and `terraform apply` (a delete:
//! `terraform apply -destroy`). The state after the run, failed or not, goes back to the queue.
//!
//! Variables a template may declare (undeclared ones are ignored by Terraform with a warning):
//!
//! | variable | value |
//! |---|---|
//! | `kiln_transition` | `start`, `stop` or `delete`: resources with `count = var.kiln_transition == "start" ? 1 : 0` are the ephemeral part |
//! | `kiln_agent_url`, `kiln_agent_token` | where the agent dials and its token (the token is empty except on a start; declare it `sensitive`) |
//! | `kiln_agent_command` | a shell command line that runs the agent (it reads `KILN_AGENT_URL` and `KILN_AGENT_TOKEN`) |
//! | `kiln_data_dir` | a directory on the provisioner's host kept for the workspace until it is deleted |
//! | `kiln_organization`, `kiln_workspace`, `kiln_workspace_uid`, `kiln_owner`, `kiln_build` | who and which build |
//! | each parameter, by its name | its value (numbers, bools and lists typed as such) |
//!
//! Only Terraform's built-in resources work without a provider registry (e.g. `terraform_data` with
//! `local-exec`); `terraform init` runs with no network access to reach.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use model::kinds::{ParameterType, Transition};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

use crate::{Build, BuildError, Done, Logs};

/// How long a canceled run gets after SIGINT (Terraform's graceful stop) before it is killed.
const CANCEL_GRACE: Duration = Duration::from_secs(30);
/// The state file in a build's directory.
const STATE_FILE: &str = "terraform.tfstate";
/// The variables file in a build's directory.
const VARS_FILE: &str = "kiln.auto.tfvars.json";

/// Builds workspaces with `terraform`.
#[derive(Debug, Clone)]
pub struct TerraformProvider {
    root: PathBuf,
    binary: PathBuf,
    agent_command: Vec<String>,
}

impl TerraformProvider {
    /// Workspaces' directories live under `root`; `binary` is the `terraform` program; `agent_command` is what
    /// runs an agent (e.g. `[<path of kiln>, "agent"]`).
    pub fn new(
        root: impl Into<PathBuf>,
        binary: impl Into<PathBuf>,
        agent_command: Vec<String>,
    ) -> TerraformProvider {
        TerraformProvider {
            root: root.into(),
            binary: binary.into(),
            agent_command,
        }
    }

    /// The provider with `terraform` from `KILN_TERRAFORM` or the `PATH`, if it runs; its version otherwise the
    /// reason it is not offered.
    pub async fn detect(
        root: impl Into<PathBuf>,
        agent_command: Vec<String>,
    ) -> Result<(TerraformProvider, String), String> {
        let binary = match std::env::var_os("KILN_TERRAFORM") {
            Some(b) => PathBuf::from(b),
            None => find_in_path("terraform").ok_or("no terraform on the PATH")?,
        };
        let out = tokio::process::Command::new(&binary)
            .args(["version", "-json"])
            .env("CHECKPOINT_DISABLE", "1")
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("running {}: {e}", binary.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} version failed: {}",
                binary.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let version = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.get("terraform_version")?.as_str().map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        Ok((TerraformProvider::new(root, binary, agent_command), version))
    }

    /// The directory kept for a workspace (`kiln_data_dir`) until it is deleted.
    pub fn data_dir(&self, organization: &str, workspace_uid: &str) -> PathBuf {
        self.root.join(organization).join(workspace_uid)
    }

    pub(crate) async fn run(
        &self,
        build: &Build,
        logs: &Logs,
        cancel: watch::Receiver<bool>,
    ) -> Result<Done, BuildError> {
        if build.workspace_uid.is_empty() {
            return Err("the workspace has no uid".into());
        }
        let data = self.data_dir(&build.organization, &build.workspace_uid);
        let dir = data.join("build");
        prepare(&dir, build, &self.variables(build, &data))
            .await
            .map_err(BuildError::from)?;
        let result = self.terraform(build, &dir, logs, cancel).await;
        // The state is what the run left, whatever happened.
        let state = match tokio::fs::read_to_string(dir.join(STATE_FILE)).await {
            Ok(s) => Some(s),
            Err(_) => build.state.clone(),
        };
        let _ = tokio::fs::remove_file(dir.join(VARS_FILE)).await;
        match result {
            Ok(outputs) => {
                if build.transition == Transition::Delete {
                    match tokio::fs::remove_dir_all(&data).await {
                        Ok(()) => logs.line("provision", format!("removed {}", data.display())),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => logs.line(
                            "provision",
                            format!("could not remove {}: {e}", data.display()),
                        ),
                    }
                }
                Ok(Done { outputs, state })
            }
            Err(message) => Err(BuildError { message, state }),
        }
    }

    fn variables(&self, build: &Build, data: &Path) -> Map<String, Value> {
        let mut vars = Map::new();
        for p in &build.template.parameters {
            let Some(v) = build.parameters.get(&p.name) else {
                continue;
            };
            let typed = match p.type_ {
                ParameterType::Number => v.parse::<f64>().ok().map(|n| json!(n)),
                ParameterType::Bool => v.parse::<bool>().ok().map(Value::Bool),
                ParameterType::ListString => serde_json::from_str::<Vec<String>>(v)
                    .ok()
                    .map(|l| json!(l)),
                ParameterType::String => None,
            };
            vars.insert(p.name.clone(), typed.unwrap_or_else(|| json!(v)));
        }
        let command: Vec<String> = self.agent_command.iter().map(|a| shell_quote(a)).collect();
        for (k, v) in [
            ("kiln_transition", build.transition.as_str().to_string()),
            ("kiln_agent_url", build.agent_url.clone()),
            (
                "kiln_agent_token",
                build.agent_token.clone().unwrap_or_default(),
            ),
            ("kiln_agent_command", command.join(" ")),
            ("kiln_data_dir", data.display().to_string()),
            ("kiln_organization", build.organization.clone()),
            ("kiln_workspace", build.workspace.clone()),
            ("kiln_workspace_uid", build.workspace_uid.clone()),
            ("kiln_owner", build.owner.clone()),
            ("kiln_build", build.number.to_string()),
        ] {
            vars.insert(k.into(), json!(v));
        }
        vars
    }

    /// `terraform init`, then `apply` (or `apply -destroy`); the outputs on success.
    async fn terraform(
        &self,
        build: &Build,
        dir: &Path,
        logs: &Logs,
        mut cancel: watch::Receiver<bool>,
    ) -> Result<Value, String> {
        let common = ["-input=false", "-no-color"];
        self.step(dir, &["init"], &common, logs, &mut cancel)
            .await?;
        let apply: &[&str] = if build.transition == Transition::Delete {
            &["apply", "-destroy", "-auto-approve", "-compact-warnings"]
        } else {
            &["apply", "-auto-approve", "-compact-warnings"]
        };
        self.step(dir, apply, &common, logs, &mut cancel).await?;
        let out = self
            .command(dir)
            .args(["output", "-json", "-no-color"])
            .output()
            .await
            .map_err(|e| format!("running terraform output: {e}"))?;
        let all: Map<String, Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        // Sensitive outputs stay in the state; the job shows only the others.
        let outputs: Map<String, Value> = all
            .into_iter()
            .filter(|(_, o)| o.get("sensitive") != Some(&Value::Bool(true)))
            .filter_map(|(k, o)| Some((k, o.get("value")?.clone())))
            .collect();
        Ok(Value::Object(outputs))
    }

    /// `terraform` in a build's directory, without prompts or update checks.
    fn command(&self, dir: &Path) -> tokio::process::Command {
        let mut c = tokio::process::Command::new(&self.binary);
        c.current_dir(dir).envs(ENV).stdin(Stdio::null());
        c
    }

    /// Runs one terraform command, its output streamed as log lines; SIGINT on cancel, SIGKILL after a grace.
    async fn step(
        &self,
        dir: &Path,
        args: &[&str],
        common: &[&str],
        logs: &Logs,
        cancel: &mut watch::Receiver<bool>,
    ) -> Result<(), String> {
        let shown = format!("terraform {}", args.join(" "));
        logs.line("provision", format!("$ {shown}"));
        let mut child = self
            .command(dir)
            .args(args)
            .args(common)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("running {}: {e}", self.binary.display()))?;
        let out = child.stdout.take().map(|o| pump(o, logs.clone()));
        let err = child.stderr.take().map(|e| pump(e, logs.clone()));
        let pid = child.id();
        let mut interrupted = false;
        let status = loop {
            tokio::select! {
                s = child.wait() => break s.map_err(|e| format!("waiting for {shown}: {e}"))?,
                r = cancel.changed(), if !interrupted => {
                    if r.is_err() || *cancel.borrow() {
                        interrupted = true;
                        logs.line("provision", "canceling: interrupting terraform");
                        if let Some(pid) = pid {
                            crate::signal("INT", &pid.to_string());
                        }
                    }
                }
                () = tokio::time::sleep(CANCEL_GRACE), if interrupted => {
                    logs.line("provision", format!("terraform did not stop within {}s; killing it", CANCEL_GRACE.as_secs()));
                    let _ = child.kill().await;
                }
            }
        };
        for task in [out, err].into_iter().flatten() {
            let _ = task.await;
        }
        if interrupted {
            return Err("canceled".into());
        }
        if !status.success() {
            return Err(format!("{shown} failed ({status})"));
        }
        Ok(())
    }
}

/// The environment of every terraform command: no prompts, no update checks.
const ENV: [(&str, &str); 3] = [
    ("TF_IN_AUTOMATION", "1"),
    ("TF_INPUT", "0"),
    ("CHECKPOINT_DISABLE", "1"),
];

/// Lays out a build's directory: the template's files, the state, the variables (mode 0600: they hold the
/// agent's token).
async fn prepare(dir: &Path, build: &Build, vars: &Map<String, Value>) -> Result<(), String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("clearing {}: {e}", dir.display())),
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    if let Some(parent) = dir.parent() {
        let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o700));
    }
    for (rel, text) in &build.template.files {
        // Paths were checked when the template was written: relative, no `..`.
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        tokio::fs::write(&path, text)
            .await
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let private = |path: PathBuf, bytes: &[u8]| -> Result<(), String> {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        f.write_all(bytes)
            .map_err(|e| format!("writing {}: {e}", path.display()))
    };
    if let Some(state) = &build.state {
        private(dir.join(STATE_FILE), state.as_bytes())?;
    }
    let vars = serde_json::to_vec_pretty(vars).map_err(|e| e.to_string())?;
    private(dir.join(VARS_FILE), &vars)
}

/// Streams a pipe's lines into the build's log.
fn pump(pipe: impl AsyncRead + Unpin + Send + 'static, logs: Logs) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(pipe).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            logs.line("terraform", line);
        }
    })
}

/// Quotes a word for a POSIX shell.
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-=:,@+".contains(&b))
    {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn find_in_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote("/usr/bin/kiln"), "/usr/bin/kiln");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
