//! Runs of scheduled tasks on the docker driver: one container per run, made from the workload like a replica
//! (image, command, environment, limits, init) and on the same project-environment network, run to completion
//! and never restarted (restart policy `no`; the event watcher leaves it stopped).
//!
//! Run `n` is the container `<slug>--run-<n>`, labelled with its workload and `kiln.dev/run=<n>`: the container
//! is the run's record. The Engine keeps its exit code, OOM flag, start error and output until `remove_run` (or
//! `remove`) deletes it, so a driver started after a server restart lists the runs as they are. A run the driver
//! stops is first renamed `<name>--stopped`, so that it reports `stopped` rather than the exit code the signal
//! gave it, to this driver and to the next.
//!
//! Removing a run leaves the project-environment network: other workloads of the environment may be on it, and
//! the task's dependency addresses are bound to its gateway. `remove` takes the network with the last container.

use super::api::ApiError;
use super::engine_types::{ContainerInspect, ContainerSummary};
use super::{create_error, spec, status, workload_image, Inner, LABEL_RUN};
use crate::{Result, RunState, RunStatus, Workload, WorkloadId};

/// Lines of a finished run's output kept in its status (as many as the process driver keeps).
const LAST_LINES: usize = 10;

/// The run number a container carries.
fn run_number(c: &ContainerSummary) -> Option<u64> {
    c.label(LABEL_RUN)?.parse().ok()
}

impl Inner {
    /// The workload's runs, stopped and finished ones included.
    async fn run_containers(&self, id: &WorkloadId) -> Result<Vec<ContainerSummary>, ApiError> {
        let mut containers = self.all_containers_of(id).await?;
        containers.retain(|c| run_number(c).is_some());
        Ok(containers)
    }

    /// The container(s) of run `run`: one, unless someone made another by hand.
    async fn containers_of_run(
        &self,
        id: &WorkloadId,
        run: u64,
    ) -> Result<Vec<ContainerSummary>, ApiError> {
        let mut containers = self.run_containers(id).await?;
        containers.retain(|c| run_number(c) == Some(run));
        Ok(containers)
    }

    /// The container whose output `logs` reads for run `run`.
    pub(super) async fn run_container(
        &self,
        id: &WorkloadId,
        run: u64,
    ) -> Result<Option<ContainerSummary>, ApiError> {
        Ok(self.containers_of_run(id, run).await?.into_iter().next())
    }

    pub(super) async fn start_run(&self, w: &Workload, run: u64) -> Result<()> {
        let image = workload_image(w)?;
        if let Some(c) = self.run_container(&w.id, run).await? {
            // Started before. One created but never started (the server stopped in between) starts now.
            if c.state == "created" && !spec::is_stopped_run(c.name()) {
                if let Some(inspect) = self.inspect(&c.id).await? {
                    if inspect.state.error.is_empty() {
                        return self.start_run_container(&w.id, &c.id).await;
                    }
                }
            }
            return Ok(());
        }
        self.check_image(image).await?;
        self.ensure_network(&w.id).await?;
        let name = spec::run_container_name(&w.id, run);
        let body = spec::run_body(w, run, image, &self.host_options());
        let container = match self.create_container(&name, &body).await {
            Ok(container) => container,
            // A concurrent call for the same run made it first; it starts it.
            Err(e) if e.is_conflict() => return Ok(()),
            Err(e) => return Err(create_error(&name, image, e)),
        };
        tracing::info!(workload = %w.id, run, container = %name, "starting a run");
        self.start_run_container(&w.id, &container).await
    }

    /// Starts a run's container. A command the Engine cannot start is the run's failure (its status says why),
    /// not the caller's: the run exists.
    async fn start_run_container(&self, id: &WorkloadId, container: &str) -> Result<()> {
        let started = self.start(container).await;
        self.notify(id);
        let Err(e) = started else {
            return Ok(());
        };
        match self.inspect(container).await {
            Ok(Some(c)) if !c.state.error.is_empty() => {
                tracing::info!(workload = %id, container, error = %c.state.error, "a run could not be started");
                Ok(())
            }
            _ => Err(e),
        }
    }

    pub(super) async fn runs(&self, id: &WorkloadId) -> Result<Vec<RunStatus>> {
        let containers = self.run_containers(id).await?;
        let mut out = Vec::with_capacity(containers.len());
        for c in &containers {
            let Some(run) = run_number(c) else { continue };
            if c.state == "removing" {
                continue;
            }
            let known = self
                .finished_runs
                .lock()
                .expect("finished runs lock")
                .get(&c.id)
                .cloned();
            if let Some(status) = known {
                out.push(status);
                continue;
            }
            let Some(inspect) = self.inspect(&c.id).await? else {
                // Removed meanwhile.
                continue;
            };
            let mut status = run_status(run, &inspect);
            if status.state != RunState::Running {
                status.last_logs = self.last_logs(&c.id, LAST_LINES).await;
                // The Engine may still be writing the last lines the moment the run ends: an empty output is
                // read again next time.
                if !status.last_logs.is_empty() {
                    self.finished_runs
                        .lock()
                        .expect("finished runs lock")
                        .insert(c.id.clone(), status.clone());
                }
            }
            out.push(status);
        }
        out.sort_by_key(|r| r.run);
        out.dedup_by_key(|r| r.run);
        Ok(out)
    }

    /// Stops a run that is going: renamed as stopped, then SIGTERM and, after the grace period, SIGKILL (as
    /// replicas are taken down). A finished or unknown run is left as it is.
    pub(super) async fn stop_run(&self, id: &WorkloadId, run: u64) -> Result<()> {
        for c in self.containers_of_run(id, run).await? {
            let Some(inspect) = self.inspect(&c.id).await? else {
                continue;
            };
            if !going(&inspect) {
                continue;
            }
            if !spec::is_stopped_run(c.name()) {
                let name = format!("{}{}", c.name(), spec::STOPPED);
                match self.rename(&c.id, &name).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            match self.stop(&c.id).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
            tracing::info!(workload = %id, run, "stopped a run");
        }
        self.notify(id);
        Ok(())
    }

    /// Deletes a run's container (stopping it first if it still runs): its exit and output go with it.
    pub(super) async fn remove_run(&self, id: &WorkloadId, run: u64) -> Result<()> {
        for c in self.containers_of_run(id, run).await? {
            self.stop_and_delete(&c.id).await?;
        }
        self.notify(id);
        Ok(())
    }
}

/// Whether a run is still going (or about to: created, not yet started, and not failed to start).
fn going(c: &ContainerInspect) -> bool {
    let s = &c.state;
    s.running || s.restarting || s.paused || (s.status == "created" && s.error.is_empty())
}

/// A run's state from its container (its last lines are read separately).
fn run_status(run: u64, c: &ContainerInspect) -> RunStatus {
    let s = &c.state;
    let (state, exit_code, message) = if s.status == "created" && !s.error.is_empty() {
        (
            RunState::Failed,
            None,
            format!("the command could not be started: {}", s.error),
        )
    } else if going(c) {
        (RunState::Running, None, String::new())
    } else if spec::is_stopped_run(&c.name) {
        (RunState::Failed, None, "stopped".to_string())
    } else if s.exit_code == 0 && !s.oom_killed {
        (
            RunState::Succeeded,
            Some(0),
            "exited with code 0".to_string(),
        )
    } else {
        (RunState::Failed, Some(s.exit_code), status::exit_message(c))
    };
    RunStatus {
        run,
        state,
        exit_code,
        message,
        last_logs: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(name: &str, state: serde_json::Value) -> ContainerInspect {
        serde_json::from_value(serde_json::json!({
            "Id": "c1",
            "Name": name,
            "State": state,
            "Config": { "Labels": { "kiln.dev/run": "4" } },
        }))
        .unwrap()
    }

    fn status_of(name: &str, state: serde_json::Value) -> (RunState, Option<i32>, String) {
        let s = run_status(4, &container(name, state));
        assert_eq!(s.run, 4);
        (s.state, s.exit_code, s.message)
    }

    #[test]
    fn a_run_reports_what_its_container_did() {
        let name = "/o--p--e--c--run-4";
        let stopped = "/o--p--e--c--run-4--stopped";
        use RunState::*;
        let exited = |code: i32| serde_json::json!({ "Status": "exited", "ExitCode": code });
        assert_eq!(
            status_of(
                name,
                serde_json::json!({ "Status": "running", "Running": true })
            ),
            (Running, None, String::new())
        );
        assert_eq!(
            status_of(name, serde_json::json!({ "Status": "created" })),
            (Running, None, String::new()),
            "created, about to start"
        );
        assert_eq!(
            status_of(name, exited(0)),
            (Succeeded, Some(0), "exited with code 0".into())
        );
        assert_eq!(
            status_of(name, exited(3)),
            (Failed, Some(3), "exited with code 3".into())
        );
        assert_eq!(
            status_of(stopped, exited(143)),
            (Failed, None, "stopped".into())
        );
        // Stopping is asked for by renaming first: until it has ended, it runs.
        assert_eq!(
            status_of(
                stopped,
                serde_json::json!({ "Status": "running", "Running": true })
            )
            .0,
            Running
        );
        assert_eq!(
            status_of(
                name,
                serde_json::json!({ "Status": "exited", "ExitCode": 137, "OOMKilled": true })
            ),
            (
                Failed,
                Some(137),
                "exited with code 137 (out of memory)".into()
            )
        );
        let (state, code, message) = status_of(
            name,
            serde_json::json!({ "Status": "created", "ExitCode": 127,
                "Error": "exec: \"/nope\": stat /nope: no such file or directory" }),
        );
        assert_eq!((state, code), (Failed, None));
        assert_eq!(
            message,
            "the command could not be started: exec: \"/nope\": stat /nope: no such file or directory"
        );
    }
}
