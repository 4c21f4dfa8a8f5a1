//! One replica instance and its supervisor task: start (or adopt) the process, capture its output, probe it,
//! restart it with backoff when it exits, and stop it (SIGTERM, then SIGKILL after the grace period) when asked.
//! On driver shutdown the supervisor returns and leaves the process running, for the next driver to adopt.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::capture::{Capture, LogSink};
use super::files::{write_private, InstanceFiles, ReplicaRecord};
use super::{probe, procfs, ProcessOptions, Shared};
use crate::{ProbeSpec, ReplicaState, ReplicaStatus, Workload, WorkloadId};

/// Variables passed from the server's environment to every process; everything else comes from the workload.
pub(crate) const INHERITED_ENV: &[&str] =
    &["PATH", "HOME", "USER", "LANG", "LC_ALL", "TZ", "TMPDIR"];
/// How often readiness is checked before it first passes.
const FIRST_READY_POLL: Duration = Duration::from_millis(100);
/// How often an adopted process (not our child: no exit notification) is looked up in `/proc`.
const ADOPTED_POLL: Duration = Duration::from_millis(500);

/// One replica instance: a slot (index) running one spec. Its supervisor restarts the process in place (same
/// ports, same files); a new release gets a new instance.
pub(crate) struct Replica {
    pub id: WorkloadId,
    pub index: u32,
    pub instance: u64,
    /// What the process runs.
    pub spec: Arc<Workload>,
    pub hash: String,
    pub release: String,
    /// Port name → loopback host port.
    pub ports: BTreeMap<String, u16>,
    pub files: InstanceFiles,
    status: Mutex<ReplicaStatus>,
    pid: AtomicU32,
    version_tx: watch::Sender<u64>,
    stop_tx: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
}

/// How a supervisor begins.
pub(crate) enum Start {
    Spawn,
    /// Watch a process a previous driver started.
    Adopt {
        pid: u32,
        start_time: u64,
    },
}

impl Replica {
    pub fn new(
        spec: Arc<Workload>,
        index: u32,
        instance: u64,
        hash: String,
        release: String,
        ports: BTreeMap<String, u16>,
        files: InstanceFiles,
    ) -> Replica {
        let endpoints = ports
            .iter()
            .map(|(name, &port)| (name.clone(), SocketAddr::from((Ipv4Addr::LOCALHOST, port))))
            .collect();
        Replica {
            id: spec.id.clone(),
            index,
            instance,
            status: Mutex::new(ReplicaStatus {
                index,
                release: release.clone(),
                state: ReplicaState::Starting,
                ready: false,
                restarts: 0,
                endpoints,
                last_logs: Vec::new(),
            }),
            spec,
            hash,
            release,
            ports,
            files,
            pid: AtomicU32::new(0),
            version_tx: watch::channel(0).0,
            stop_tx: watch::channel(false).0,
            task: Mutex::new(None),
        }
    }

    pub fn status(&self) -> ReplicaStatus {
        lock(&self.status).clone()
    }

    /// The live process's pid, if one runs.
    pub fn pid(&self) -> Option<u32> {
        Some(self.pid.load(Ordering::SeqCst)).filter(|&p| p != 0)
    }

    /// Starts the supervisor task.
    pub fn supervise(self: &Arc<Self>, shared: Arc<Shared>, sink: Arc<LogSink>, start: Start) {
        let task = tokio::spawn(supervise(self.clone(), shared, sink, start));
        *lock(&self.task) = Some(task);
    }

    /// Stops the process (if any) and waits for the supervisor to finish.
    pub async fn stop(&self) {
        self.stop_tx.send_replace(true);
        let task = lock(&self.task).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Waits until the replica is ready, up to `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut version_rx = self.version_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if lock(&self.status).ready {
                return true;
            }
            tokio::select! {
                _ = version_rx.changed() => {}
                _ = tokio::time::sleep_until(deadline) => return lock(&self.status).ready,
            }
        }
    }

    fn update(&self, shared: &Shared, f: impl FnOnce(&mut ReplicaStatus)) {
        let changed = {
            let mut status = lock(&self.status);
            let before = status.clone();
            f(&mut status);
            *status != before
        };
        if changed {
            self.version_tx.send_modify(|v| *v += 1);
            let _ = shared.changes_tx.send(self.id.clone());
        }
    }

    fn set_ready(&self, shared: &Shared, ready: bool) {
        self.update(shared, |s| {
            s.ready = ready;
            if ready {
                if s.state == ReplicaState::Starting {
                    s.state = ReplicaState::Running;
                }
                s.last_logs.clear();
            }
        });
    }

    fn record(&self, pid: u32, start_time: u64, boot_id: &str) -> ReplicaRecord {
        ReplicaRecord {
            workload: self.id.to_string(),
            index: self.index,
            instance: self.instance,
            release: self.release.clone(),
            spec_hash: self.hash.clone(),
            pid,
            start_time,
            boot_id: boot_id.to_string(),
            ports: self.ports.clone(),
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves the data consistent, so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `PORT_<NAME>`: upper-cased, `-` → `_`.
pub(crate) fn port_env_name(name: &str) -> String {
    format!("PORT_{}", name.to_ascii_uppercase().replace('-', "_"))
}

/// Restart delays: `initial`, doubling up to `max`; back to `initial` after a run that lasted `reset_after`.
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(opts: &ProcessOptions) -> Backoff {
        Backoff {
            initial: opts.backoff_initial,
            max: opts.backoff_max,
            reset_after: opts.backoff_reset_after,
            next: opts.backoff_initial,
        }
    }

    /// The delay before restarting a process that ran for `ran`.
    pub fn delay(&mut self, ran: Duration) -> Duration {
        if ran >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
struct Exit {
    code: Option<i32>,
    signal: Option<i32>,
}

impl Exit {
    const UNKNOWN: Exit = Exit {
        code: None,
        signal: None,
    };

    fn describe(&self) -> String {
        match (self.code, self.signal) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            // Not our child (adopted after a restart): its exit status went to its new parent.
            (None, None) => "exited (exit status unknown: adopted process)".to_string(),
        }
    }
}

enum Running {
    Child {
        child: tokio::process::Child,
        pid: u32,
    },
    Adopted {
        pid: u32,
        start_time: u64,
    },
}

impl Running {
    fn pid(&self) -> u32 {
        match self {
            Running::Child { pid, .. } | Running::Adopted { pid, .. } => *pid,
        }
    }

    /// Waits for the process to end. Cancel-safe.
    async fn wait(&mut self) -> Exit {
        match self {
            Running::Child { child, .. } => match child.wait().await {
                Ok(status) => Exit {
                    code: status.code(),
                    signal: status.signal(),
                },
                Err(_) => Exit::UNKNOWN,
            },
            Running::Adopted { pid, start_time } => loop {
                if !procfs::is_alive(*pid, *start_time) {
                    return Exit::UNKNOWN;
                }
                tokio::time::sleep(ADOPTED_POLL).await;
            },
        }
    }

    /// SIGTERM, then SIGKILL after `grace`; returns how it ended.
    async fn terminate(&mut self, grace: Duration) -> Exit {
        match self {
            Running::Child { child, pid } => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Exit {
                        code: status.code(),
                        signal: status.signal(),
                    };
                }
                // Not reaped yet, so the pid is still this process.
                procfs::signal(*pid, "TERM").await;
            }
            Running::Adopted { pid, start_time } => {
                if !procfs::is_alive(*pid, *start_time) {
                    return Exit::UNKNOWN;
                }
                procfs::signal(*pid, "TERM").await;
            }
        }
        if let Ok(exit) = tokio::time::timeout(grace, self.wait()).await {
            return exit;
        }
        match self {
            Running::Child { child, .. } => {
                let _ = child.start_kill();
            }
            Running::Adopted { pid, start_time } => {
                if procfs::is_alive(*pid, *start_time) {
                    procfs::signal(*pid, "KILL").await;
                }
            }
        }
        tokio::time::timeout(Duration::from_secs(5), self.wait())
            .await
            .unwrap_or(Exit::UNKNOWN)
    }
}

fn spawn(rep: &Replica) -> std::io::Result<Running> {
    let w = &rep.spec;
    let open = |path: &std::path::Path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    };
    let stdout = open(&rep.files.stdout)?;
    let stderr = open(&rep.files.stderr)?;
    let program = w
        .command
        .first()
        .ok_or_else(|| std::io::Error::other("empty command"))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&w.command[1..]).env_clear();
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.envs(&w.env);
    for (i, port) in w.ports.iter().enumerate() {
        if let Some(host) = rep.ports.get(&port.name) {
            if i == 0 {
                cmd.env("PORT", host.to_string());
            }
            cmd.env(port_env_name(&port.name), host.to_string());
        }
    }
    cmd.env("KILN_REPLICA", rep.index.to_string())
        .env("KILN_RELEASE", &rep.release)
        .env("KILN_WORKLOAD", rep.id.to_string());
    if let Some(dir) = &w.working_dir {
        cmd.current_dir(dir);
    }
    // Its own process group, so a Ctrl-C meant for the server does not reach it; no kill on drop, so it
    // outlives the driver (to be adopted).
    cmd.stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false);
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .ok_or_else(|| std::io::Error::other("no pid for a new child"))?;
    Ok(Running::Child { child, pid })
}

enum Outcome {
    Exited(Exit),
    Liveness(u32),
    Stop,
    Shutdown,
}

async fn supervise(rep: Arc<Replica>, shared: Arc<Shared>, sink: Arc<LogSink>, start: Start) {
    let mut stop_rx = rep.stop_tx.subscribe();
    let mut shutdown_rx = shared.shutdown_rx.clone();
    let mut capture = Capture::new(rep.index, &rep.files, sink);
    let mut backoff = Backoff::new(&shared.opts);
    let mut start = Some(start);
    loop {
        if *stop_rx.borrow_and_update() {
            return finish(&rep, &shared, &mut capture).await;
        }
        let started = Instant::now();
        let spawned = match start.take().unwrap_or(Start::Spawn) {
            Start::Adopt { pid, start_time } => Ok(Running::Adopted { pid, start_time }),
            Start::Spawn => spawn(&rep),
        };
        let (exit_code, message) = match spawned {
            Err(e) => (None, format!("cannot start {:?}: {e}", rep.spec.command[0])),
            Ok(mut running) => {
                let pid = running.pid();
                rep.pid.store(pid, Ordering::SeqCst);
                capture.new_run();
                rep.update(&shared, |s| {
                    s.state = ReplicaState::Starting;
                    s.ready = false;
                });
                let start_time = procfs::stat(pid).map(|s| s.start_time).unwrap_or(0);
                let record = rep.record(pid, start_time, &shared.boot_id);
                if let Err(e) = serde_json::to_vec(&record)
                    .map_err(std::io::Error::other)
                    .and_then(|bytes| write_private(&rep.files.record, &bytes))
                {
                    tracing::warn!(workload = %rep.id, error = %e, "cannot write a replica record");
                }
                let (live_tx, mut live_rx) = mpsc::channel(1);
                let probes = tokio::spawn(probe(rep.clone(), shared.clone(), live_tx));
                let outcome = loop {
                    tokio::select! {
                        exit = running.wait() => break Outcome::Exited(exit),
                        _ = stop_rx.changed() => break Outcome::Stop,
                        _ = shutdown_rx.changed() => break Outcome::Shutdown,
                        Some(failures) = live_rx.recv() => break Outcome::Liveness(failures),
                        _ = tokio::time::sleep(capture.next_poll()) => {
                            capture.poll(false).await;
                        }
                    }
                };
                probes.abort();
                let exit = match outcome {
                    Outcome::Shutdown => {
                        // Leave the process running; the next driver adopts it.
                        capture.poll(false).await;
                        return;
                    }
                    Outcome::Stop => {
                        running.terminate(shared.opts.stop_grace).await;
                        return finish(&rep, &shared, &mut capture).await;
                    }
                    Outcome::Exited(exit) => (exit.code, exit.describe()),
                    Outcome::Liveness(failures) => {
                        let exit = running.terminate(shared.opts.stop_grace).await;
                        (
                            exit.code,
                            format!("liveness probe failed {failures} times in a row; killed"),
                        )
                    }
                };
                rep.pid.store(0, Ordering::SeqCst);
                let _ = std::fs::remove_file(&rep.files.record);
                capture.poll(true).await;
                exit
            }
        };
        let delay = backoff.delay(started.elapsed());
        tracing::info!(workload = %rep.id, replica = rep.index, %message, ?delay, "replica exited");
        rep.update(&shared, |s| {
            s.state = ReplicaState::Crashed {
                exit_code,
                message: format!("{message}; restarting in {}s", delay.as_secs()),
            };
            s.ready = false;
            s.restarts += 1;
            s.last_logs = capture.last.iter().cloned().collect();
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop_rx.changed() => {}
            _ = shutdown_rx.changed() => return,
        }
    }
}

/// After a stop: drain the output, remove the instance's files, give its ports back.
async fn finish(rep: &Replica, shared: &Shared, capture: &mut Capture) {
    capture.poll(true).await;
    rep.pid.store(0, Ordering::SeqCst);
    rep.files.remove_all();
    {
        let mut in_use = lock(&shared.ports_in_use);
        for port in rep.ports.values() {
            in_use.remove(port);
        }
    }
    rep.update(shared, |s| {
        s.state = ReplicaState::Stopped;
        s.ready = false;
    });
}

/// Readiness and liveness of one process run; reports liveness failures on `live_tx`.
async fn probe(rep: Arc<Replica>, shared: Arc<Shared>, live_tx: mpsc::Sender<u32>) {
    let readiness = readiness(&rep, &shared);
    let liveness = async {
        if let Some(spec) = &rep.spec.liveness {
            liveness(spec, &rep.ports, &live_tx).await;
        }
    };
    tokio::join!(readiness, liveness);
}

fn period(spec: &ProbeSpec) -> Duration {
    Duration::from_secs(u64::from(spec.period_secs.max(1)))
}

async fn readiness(rep: &Replica, shared: &Shared) {
    let Some(spec) = &rep.spec.readiness else {
        // No probe: ready once the first port accepts connections (at once without ports).
        let first = rep.spec.ports.first().and_then(|p| rep.ports.get(&p.name));
        if let Some(&port) = first {
            while !probe::tcp(port).await {
                tokio::time::sleep(FIRST_READY_POLL).await;
            }
        }
        rep.set_ready(shared, true);
        return;
    };
    tokio::time::sleep(Duration::from_secs(u64::from(spec.initial_delay_secs))).await;
    let threshold = spec.failure_threshold.max(1);
    let (mut failures, mut passed_once) = (0, false);
    loop {
        if probe::check(&spec.probe, &rep.ports).await {
            failures = 0;
            passed_once = true;
            rep.set_ready(shared, true);
        } else {
            failures += 1;
            if failures >= threshold {
                rep.set_ready(shared, false);
            }
        }
        // Until it first passes, poll quickly so that a new replica is ready as soon as it can be.
        let next = if passed_once {
            period(spec)
        } else {
            period(spec).min(FIRST_READY_POLL)
        };
        tokio::time::sleep(next).await;
    }
}

async fn liveness(spec: &ProbeSpec, ports: &BTreeMap<String, u16>, live_tx: &mpsc::Sender<u32>) {
    tokio::time::sleep(Duration::from_secs(u64::from(spec.initial_delay_secs))).await;
    let threshold = spec.failure_threshold.max(1);
    let mut failures = 0;
    loop {
        if probe::check(&spec.probe, ports).await {
            failures = 0;
        } else {
            failures += 1;
            if failures >= threshold {
                let _ = live_tx.send(failures).await;
                return;
            }
        }
        tokio::time::sleep(period(spec)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_resets() {
        let mut b = Backoff::new(&ProcessOptions::default());
        let quick = Duration::from_millis(300);
        let secs: Vec<u64> = (0..8).map(|_| b.delay(quick).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(Duration::from_secs(30)), Duration::from_secs(1));
        assert_eq!(b.delay(quick), Duration::from_secs(2));
    }

    #[test]
    fn port_names() {
        assert_eq!(port_env_name("http"), "PORT_HTTP");
        assert_eq!(port_env_name("admin-api"), "PORT_ADMIN_API");
    }
}
