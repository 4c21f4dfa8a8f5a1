//! The `process` driver: each replica is a supervised local process. The embedded default data plane.
//!
//! **Replicas.** A replica runs `workload.command` (argv, no shell) in `working_dir` with `workload.env`, plus
//! `PORT` (its first port), `PORT_<NAME>` per named port (upper-cased, `-` → `_`), `KILN_REPLICA`,
//! `KILN_RELEASE` and `KILN_WORKLOAD`; from the server's environment only `PATH`, `HOME`, `USER`, `LANG`,
//! `LC_ALL`, `TZ` and `TMPDIR` pass. Each replica gets its own free loopback port per named port (the process
//! binds `127.0.0.1` or `0.0.0.0` on it); its endpoints are `127.0.0.1:<port>`. Images, memory and CPU limits are
//! not supported here (an image without a command is refused; limits are ignored).
//!
//! **Supervision.** One task per replica starts the process in its own process group, watches it exit, and
//! restarts it after 1 s, 2 s, 4 s … up to 60 s (back to 1 s after a run of 30 s); meanwhile the replica is
//! `Crashed` with the exit code, the reason, and the last lines it wrote. With a readiness probe a replica is
//! ready once the probe passes (polled every 100 ms until it first does, then every `period_secs`) and unready
//! after `failure_threshold` failures in a row; without one, once its first port accepts connections (at once
//! without ports). A liveness probe failing `failure_threshold` times kills and restarts it. Stopping sends
//! SIGTERM to the pid, then SIGKILL after the grace period. One reconciler task per workload converges on the
//! last applied spec (see `workload.rs`): `apply` returns once the spec is recorded, the rollout goes on in the
//! background ([`ProcessDriver::wait_converged`] waits for it).
//!
//! **Logs.** A process writes stdout and stderr straight into files of its own; the supervisor tails them into
//! `state_dir/<slug>/replica-<n>.log` (JSON lines with the time each line was read, about
//! [`ProcessOptions::log_cap_bytes`] at most) and a broadcast that `logs(follow)` subscribes to (see `capture.rs`).
//!
//! **Restarts of the server.** Dropping the driver stops its tasks but *not* the processes: only `remove` (or
//! applying fewer replicas, or a new release) stops them. Each process has a record (workload, index, release,
//! pid, `/proc` start time, boot id, ports, spec hash) and each workload its last applied spec under
//! `state_dir/<slug>/`. A new driver on the same `state_dir` adopts every recorded process that is still alive
//! and still the same process (same boot, same start time): it watches it by polling `/proc` (it is not its
//! child, so its exit code is unknown), resumes tailing its output files, and restarts it like any replica when
//! it dies. Processes that died meanwhile are restarted; nothing is started twice. A process killed behind the
//! driver's back (e.g. `kill -9`) is restarted the same way.

mod capture;
mod files;
mod probe;
pub mod procfs;
mod replica;
mod runs;
mod workload;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{broadcast, watch};

use self::files::{
    create_private_dir, parse_instance_file, workload_path, write_private, InstanceFiles,
    ReplicaRecord,
};
use self::replica::{lock, Replica, Start};
use self::workload::{reconcile, Entry};
use crate::{
    BoxFuture, DataPlane, Error, LogLine, LogOptions, LogStream, Probe, Result, RunStatus,
    Workload, WorkloadId, WorkloadStatus,
};

/// Knobs of the process driver. The defaults suit production; tests shorten the waits.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// Between SIGTERM and SIGKILL when stopping a replica.
    pub stop_grace: Duration,
    /// How long a rollout waits for a new replica to be ready before stopping the old one anyway.
    pub rollout_timeout: Duration,
    /// The most a replica's captured log may take on disk (two halves of half this size).
    pub log_cap_bytes: u64,
    /// First restart delay after a crash; it doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// A run at least this long resets the restart delay to `backoff_initial`.
    pub backoff_reset_after: Duration,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            stop_grace: Duration::from_secs(10),
            rollout_timeout: Duration::from_secs(30),
            log_cap_bytes: 5 << 20,
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            backoff_reset_after: Duration::from_secs(30),
        }
    }
}

/// What the driver's tasks share.
pub(crate) struct Shared {
    pub opts: ProcessOptions,
    pub state_dir: PathBuf,
    pub boot_id: String,
    pub changes_tx: broadcast::Sender<WorkloadId>,
    /// Becomes true when the driver is dropped: tasks end, processes keep running.
    pub shutdown_rx: watch::Receiver<bool>,
    pub ports_in_use: Mutex<HashSet<u16>>,
    pub next_instance: AtomicU64,
    pub entries: Mutex<HashMap<WorkloadId, Arc<Entry>>>,
    /// Runs of scheduled tasks (see `runs.rs`).
    pub runs: runs::Runs,
}

/// Runs workloads as supervised local processes; see the [module documentation](self).
///
/// Dropping it stops supervising but leaves the processes running, for the next driver on the same
/// `state_dir` to adopt. Only [`DataPlane::remove`] stops a workload's processes.
pub struct ProcessDriver {
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
}

impl Drop for ProcessDriver {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
    }
}

impl ProcessDriver {
    /// A driver keeping its state under `state_dir`, adopting the processes a previous driver left there.
    /// Must be called inside a tokio runtime (it starts its tasks there).
    pub fn new(state_dir: PathBuf) -> Result<ProcessDriver> {
        ProcessDriver::with_options(state_dir, ProcessOptions::default())
    }

    pub fn with_options(state_dir: PathBuf, opts: ProcessOptions) -> Result<ProcessDriver> {
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Backend(
                "the process driver must be created inside a tokio runtime".into(),
            ));
        }
        create_private_dir(&state_dir).map_err(|e| io_error(&state_dir, e))?;
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let first_instance = jiff::Timestamp::now().as_microsecond().max(0) as u64;
        let shared = Arc::new(Shared {
            opts,
            state_dir,
            boot_id: procfs::boot_id(),
            changes_tx: broadcast::channel(1024).0,
            shutdown_rx,
            ports_in_use: Mutex::new(HashSet::new()),
            next_instance: AtomicU64::new(first_instance),
            entries: Mutex::new(HashMap::new()),
            runs: runs::Runs::default(),
        });
        adopt(&shared).map_err(|e| io_error(&shared.state_dir, e))?;
        Ok(ProcessDriver {
            shared,
            shutdown_tx,
        })
    }

    /// Waits until the workload runs its last applied spec (rollout finished) or is gone.
    pub async fn wait_converged(&self, id: &WorkloadId) {
        let Some(entry) = self.entry(id) else {
            return;
        };
        let target = entry.desired_tx.borrow().generation;
        let mut converged_rx = entry.converged_tx.subscribe();
        let mut removed_rx = entry.removed_tx.subscribe();
        loop {
            if *converged_rx.borrow_and_update() >= target || *removed_rx.borrow_and_update() {
                return;
            }
            tokio::select! {
                changed = converged_rx.changed() => if changed.is_err() { return },
                changed = removed_rx.changed() => if changed.is_err() { return },
            }
        }
    }

    /// `(replica index, pid)` of each live process of the workload.
    pub fn pids(&self, id: &WorkloadId) -> Vec<(u32, u32)> {
        let Some(entry) = self.entry(id) else {
            return Vec::new();
        };
        let mut pids: Vec<_> = entry
            .replicas()
            .iter()
            .filter_map(|r| r.pid().map(|pid| (r.index, pid)))
            .collect();
        pids.sort_unstable();
        pids
    }

    fn entry(&self, id: &WorkloadId) -> Option<Arc<Entry>> {
        lock(&self.shared.entries).get(id).cloned()
    }

    fn apply_now(&self, w: &Workload) -> Result<()> {
        validate(w)?;
        let shared = &self.shared;
        let mut entries = lock(&shared.entries);
        let entry = match entries.get(&w.id) {
            Some(entry) => entry.clone(),
            None => {
                let dir = shared.state_dir.join(w.id.slug());
                create_private_dir(&dir).map_err(|e| io_error(&dir, e))?;
                let entry = Arc::new(Entry::new(w.id.clone(), dir, None));
                entries.insert(w.id.clone(), entry.clone());
                tokio::spawn(reconcile(entry.clone(), shared.clone(), Vec::new()));
                entry
            }
        };
        if entry.desired_tx.borrow().workload.as_deref() == Some(w) {
            return Ok(());
        }
        let path = workload_path(&entry.dir);
        let json = serde_json::to_vec(w).map_err(|e| Error::Backend(e.to_string()))?;
        write_private(&path, &json).map_err(|e| io_error(&path, e))?;
        entry.desired_tx.send_modify(|d| {
            d.workload = Some(Arc::new(w.clone()));
            d.generation += 1;
        });
        let _ = shared.changes_tx.send(w.id.clone());
        Ok(())
    }

    async fn remove_now(&self, id: &WorkloadId) -> Result<()> {
        runs::remove_all(&self.shared, id).await;
        let Some(entry) = self.entry(id) else {
            return Ok(());
        };
        let mut removed_rx = entry.removed_tx.subscribe();
        let mut desired_rx = entry.desired_tx.subscribe();
        {
            let _entries = lock(&self.shared.entries);
            // Without its spec, a driver starting now stops what is left instead of adopting it.
            let _ = std::fs::remove_file(workload_path(&entry.dir));
            entry.desired_tx.send_modify(|d| {
                d.workload = None;
                d.generation += 1;
            });
        }
        let _ = self.shared.changes_tx.send(id.clone());
        let mut shutdown_rx = self.shared.shutdown_rx.clone();
        loop {
            if *removed_rx.borrow_and_update() || desired_rx.borrow_and_update().workload.is_some()
            {
                // Removed, or applied again meanwhile.
                return Ok(());
            }
            tokio::select! {
                _ = removed_rx.changed() => {}
                _ = desired_rx.changed() => {}
                _ = shutdown_rx.changed() => return Err(Error::Backend("the process driver is shutting down".into())),
            }
        }
    }

    async fn logs_now(&self, id: &WorkloadId, opts: LogOptions) -> Result<LogStream> {
        if let Some(run) = opts.run {
            return runs::logs(&self.shared, id, run, &opts);
        }
        let entry = self.entry(id).ok_or_else(|| Error::NotFound(id.clone()))?;
        let mut indexes = entry.log_indexes();
        if let Some(replica) = opts.replica {
            indexes.retain(|&i| i == replica);
        }
        let sinks: Vec<_> = indexes
            .iter()
            .map(|&i| entry.sink(i, self.shared.opts.log_cap_bytes))
            .collect();
        // Replay and subscribe with every writer held off: no line missed, none twice.
        let mut guards = Vec::with_capacity(sinks.len());
        for sink in &sinks {
            guards.push(sink.lock().await);
        }
        let mut past: Vec<LogLine> = sinks
            .iter()
            .flat_map(|s| capture::replay(s.path(), &opts))
            .collect();
        let follow_rx = opts.follow.then(|| entry.log_tx.subscribe());
        drop(guards);
        past.sort_by_key(|l| l.time);
        let past = futures_util::stream::iter(past.into_iter().map(Ok));
        Ok(match follow_rx {
            None => Box::pin(past),
            Some(rx) => Box::pin(past.chain(follow(rx, opts.replica))),
        })
    }
}

/// New lines from the workload's broadcast. A reader too slow for the broadcast gets an error and the end of
/// the stream, never a silent gap.
fn follow(
    rx: broadcast::Receiver<LogLine>,
    replica: Option<u32>,
) -> impl futures_util::Stream<Item = Result<LogLine>> + Send {
    futures_util::stream::unfold(Some(rx), move |rx| async move {
        let mut rx = rx?;
        loop {
            match rx.recv().await {
                Ok(line) if replica.is_none_or(|r| r == line.replica) => {
                    return Some((Ok(line), Some(rx)))
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let message =
                        format!("log stream fell behind by {n} lines; read again with `since`");
                    return Some((Err(Error::Backend(message)), None));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

fn io_error(path: &Path, e: std::io::Error) -> Error {
    Error::Backend(format!("{}: {e}", path.display()))
}

fn validate(w: &Workload) -> Result<()> {
    if w.command.is_empty() {
        return Err(Error::Unsupported(match &w.image {
            Some(image) => format!(
                "workload.command: the process driver runs commands, not images ({image:?}); give a command, \
                 or deploy to a docker data plane"
            ),
            None => "workload.command: empty; the process driver needs a command to run".to_string(),
        }));
    }
    for (field, spec) in [("readiness", &w.readiness), ("liveness", &w.liveness)] {
        let Some(spec) = spec else { continue };
        let (Probe::Http { port, .. } | Probe::Tcp { port }) = &spec.probe;
        if !w.ports.iter().any(|p| &p.name == port) {
            return Err(Error::Unsupported(format!(
                "workload.{field}.probe.port: the workload has no port named {port:?}"
            )));
        }
    }
    Ok(())
}

/// Loads what a previous driver left in the state directory: adopts live processes, starts a reconciler per
/// workload, and stops the processes of workloads whose removal was under way.
fn adopt(shared: &Arc<Shared>) -> std::io::Result<()> {
    for dir in std::fs::read_dir(&shared.state_dir)? {
        let dir = dir?.path();
        if !dir.is_dir() {
            continue;
        }
        // Every instance that left files: record (if any) by (index, instance).
        let mut instances: HashMap<(u32, u64), Option<ReplicaRecord>> = HashMap::new();
        for file in std::fs::read_dir(&dir)?.flatten() {
            let name = file.file_name().to_string_lossy().into_owned();
            if let Some((index, instance, ext)) = parse_instance_file(&name) {
                let record = (ext == "json")
                    .then(|| std::fs::read(file.path()).ok())
                    .flatten()
                    .and_then(|bytes| serde_json::from_slice::<ReplicaRecord>(&bytes).ok());
                let slot = instances.entry((index, instance)).or_default();
                if record.is_some() {
                    *slot = record;
                }
            }
        }
        let alive = |r: &ReplicaRecord| {
            r.boot_id == shared.boot_id && procfs::is_alive(r.pid, r.start_time)
        };

        let spec = match std::fs::read(workload_path(&dir)) {
            Ok(bytes) => match serde_json::from_slice::<Workload>(&bytes) {
                Ok(spec) => spec,
                Err(e) => {
                    // Not ours to judge (a newer format?): leave its processes alone rather than kill them.
                    tracing::warn!(dir = %dir.display(), error = %e, "unreadable workload spec; not adopting");
                    continue;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // No spec: `remove` deletes it first, so a removal was under way. Finish it.
                let live: Vec<_> = instances
                    .values()
                    .flatten()
                    .filter(|r| alive(r))
                    .cloned()
                    .collect();
                if !instances.is_empty() {
                    tokio::spawn(stop_leftovers(dir, live, shared.opts.stop_grace));
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        let spec = Arc::new(spec);
        let entry = Arc::new(Entry::new(spec.id.clone(), dir.clone(), Some(spec.clone())));
        let mut leftovers = Vec::new();
        for ((index, instance), record) in instances {
            let files = InstanceFiles::new(&dir, index, instance);
            match record.filter(|r| alive(r) && r.workload == spec.id.to_string()) {
                Some(r) => {
                    lock(&shared.ports_in_use).extend(r.ports.values().copied());
                    tracing::info!(workload = %spec.id, replica = index, pid = r.pid, "adopting a running replica");
                    let replica = Replica::new(
                        spec.clone(),
                        index,
                        instance,
                        r.spec_hash,
                        r.release,
                        r.ports,
                        files,
                    );
                    entry.add(
                        shared,
                        Arc::new(replica),
                        Start::Adopt {
                            pid: r.pid,
                            start_time: r.start_time,
                        },
                    );
                }
                None => leftovers.push((index, files)),
            }
        }
        lock(&shared.entries).insert(spec.id.clone(), entry.clone());
        tokio::spawn(reconcile(entry, shared.clone(), leftovers));
    }
    Ok(())
}

/// Stops processes of a workload whose removal a previous driver did not finish, then removes its directory.
async fn stop_leftovers(dir: PathBuf, records: Vec<ReplicaRecord>, grace: Duration) {
    for r in &records {
        procfs::signal(r.pid, "TERM").await;
    }
    let deadline = tokio::time::Instant::now() + grace;
    while records
        .iter()
        .any(|r| procfs::is_alive(r.pid, r.start_time))
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for r in &records {
        if procfs::is_alive(r.pid, r.start_time) {
            procfs::signal(r.pid, "KILL").await;
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

impl DataPlane for ProcessDriver {
    fn name(&self) -> &'static str {
        "process"
    }

    fn apply<'a>(&'a self, workload: &'a Workload) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.apply_now(workload) })
    }

    fn remove<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.remove_now(id))
    }

    fn status<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<Option<WorkloadStatus>>> {
        Box::pin(async move { Ok(self.entry(id).map(|e| e.status())) })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkloadId>>> {
        Box::pin(async move {
            let mut ids: Vec<_> = lock(&self.shared.entries).keys().cloned().collect();
            ids.sort();
            Ok(ids)
        })
    }

    fn logs<'a>(
        &'a self,
        id: &'a WorkloadId,
        opts: LogOptions,
    ) -> BoxFuture<'a, Result<LogStream>> {
        Box::pin(self.logs_now(id, opts))
    }

    fn start_run<'a>(&'a self, workload: &'a Workload, run: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { runs::start(&self.shared, workload, run) })
    }

    fn runs<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<Vec<RunStatus>>> {
        Box::pin(async move { Ok(runs::list(&self.shared, id)) })
    }

    fn stop_run<'a>(&'a self, id: &'a WorkloadId, run: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            runs::stop(&self.shared, id, run).await;
            Ok(())
        })
    }

    fn remove_run<'a>(&'a self, id: &'a WorkloadId, run: u64) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            runs::remove(&self.shared, id, run).await;
            Ok(())
        })
    }

    fn changes(&self) -> broadcast::Receiver<WorkloadId> {
        self.shared.changes_tx.subscribe()
    }
}
