//! Runs of scheduled tasks on the process driver: one process per run, to completion, never restarted.
//!
//! Each run has a directory `state_dir/runs/<slug>/<n>/` holding `output.log` (stdout and stderr, in the order
//! written), `record.json` (pid, `/proc` start time, boot id) while it runs, and `exit` once it has ended (the
//! exit code, or `signal N`). The directory is the run's state: after a server restart a run whose process is
//! still alive is reported running; one that died meanwhile (not our child: its exit is unknown) is reported
//! failed with that reason.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::files::{create_private_dir, write_private};
use super::procfs;
use super::replica::{lock, INHERITED_ENV};
use super::Shared;
use crate::{Error, LogLine, LogOptions, Result, RunState, RunStatus, Workload, WorkloadId};

/// Lines of a finished run's output kept in its status.
const LAST_LINES: usize = 10;

#[derive(Serialize, Deserialize)]
struct RunRecord {
    pid: u32,
    start_time: u64,
    boot_id: String,
}

/// The runs this driver started and still waits on: a sender that stops each.
#[derive(Default)]
pub(crate) struct Runs {
    running: Mutex<HashMap<(WorkloadId, u64), oneshot::Sender<()>>>,
}

fn workload_dir(shared: &Shared, id: &WorkloadId) -> PathBuf {
    shared.state_dir.join("runs").join(id.slug())
}

fn run_dir(shared: &Shared, id: &WorkloadId, run: u64) -> PathBuf {
    workload_dir(shared, id).join(run.to_string())
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Backend(format!("{}: {e}", path.display()))
}

pub(crate) fn start(shared: &std::sync::Arc<Shared>, w: &Workload, run: u64) -> Result<()> {
    let program = w.command.first().ok_or_else(|| {
        Error::Unsupported("a scheduled task needs a command on the process data plane".into())
    })?;
    let dir = run_dir(shared, &w.id, run);
    if dir.exists() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
    }
    create_private_dir(&dir).map_err(|e| io_err(&dir, e))?;
    let log_path = dir.join("output.log");
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| io_err(&log_path, e))?;
    let err = out.try_clone().map_err(|e| io_err(&log_path, e))?;
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&w.command[1..]).env_clear();
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            cmd.env(name, value);
        }
    }
    cmd.envs(&w.env)
        .env("KILN_RUN", run.to_string())
        .env("KILN_RELEASE", &w.release)
        .env("KILN_WORKLOAD", w.id.to_string());
    if let Some(d) = &w.working_dir {
        cmd.current_dir(d);
    }
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .kill_on_drop(false);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let message = format!("cannot start {program:?}: {e}");
            let _ = std::fs::write(&log_path, format!("{message}\n"));
            let _ = write_private(&dir.join("exit"), b"start-failed");
            let _ = shared.changes_tx.send(w.id.clone());
            return Ok(());
        }
    };
    let pid = child.id().unwrap_or(0);
    let record = RunRecord {
        pid,
        start_time: procfs::stat(pid).map(|s| s.start_time).unwrap_or(0),
        boot_id: shared.boot_id.clone(),
    };
    if let Ok(bytes) = serde_json::to_vec(&record) {
        let _ = write_private(&dir.join("record.json"), &bytes);
    }
    let (stop_tx, stop_rx) = oneshot::channel();
    lock(&shared.runs.running).insert((w.id.clone(), run), stop_tx);
    let task_shared = shared.clone();
    let id = w.id.clone();
    tokio::spawn(async move {
        let shared = task_shared;
        let status = tokio::select! {
            s = child.wait() => s,
            _ = stop_rx => {
                let _ = child.start_kill();
                let _ = write_private(&dir.join("stopped"), b"");
                child.wait().await
            }
        };
        let text = match status {
            Ok(s) => match (s.code(), s.signal()) {
                (Some(c), _) => c.to_string(),
                (None, Some(sig)) => format!("signal {sig}"),
                (None, None) => "unknown".into(),
            },
            Err(_) => "unknown".into(),
        };
        let _ = write_private(&dir.join("exit"), text.as_bytes());
        let _ = std::fs::remove_file(dir.join("record.json"));
        lock(&shared.runs.running).remove(&(id.clone(), run));
        let _ = shared.changes_tx.send(id);
    });
    let _ = shared.changes_tx.send(w.id.clone());
    Ok(())
}

/// The record of a run still going (or that was going when the server stopped).
fn read_record(dir: &Path) -> Option<RunRecord> {
    let bytes = std::fs::read(dir.join("record.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn last_lines(path: &Path) -> Vec<String> {
    let Ok(f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let mut lines: std::collections::VecDeque<String> = std::collections::VecDeque::new();
    for line in BufReader::new(f).lines().map_while(std::result::Result::ok) {
        if lines.len() == LAST_LINES {
            lines.pop_front();
        }
        lines.push_back(line);
    }
    lines.into()
}

fn status_of(shared: &Shared, id: &WorkloadId, run: u64, dir: &Path) -> RunStatus {
    let finished = |state, exit_code, message: String| RunStatus {
        run,
        state,
        exit_code,
        message,
        last_logs: last_lines(&dir.join("output.log")),
    };
    if let Ok(exit) = std::fs::read_to_string(dir.join("exit")) {
        let exit = exit.trim();
        if dir.join("stopped").exists() {
            return finished(RunState::Failed, None, "stopped".into());
        }
        return match exit.parse::<i32>() {
            Ok(0) => finished(RunState::Succeeded, Some(0), "exited with code 0".into()),
            Ok(c) => finished(RunState::Failed, Some(c), format!("exited with code {c}")),
            Err(_) if exit == "start-failed" => finished(
                RunState::Failed,
                None,
                "the command could not be started".into(),
            ),
            Err(_) => finished(RunState::Failed, None, format!("killed by {exit}")),
        };
    }
    let running = RunStatus {
        run,
        state: RunState::Running,
        exit_code: None,
        message: String::new(),
        last_logs: Vec::new(),
    };
    if lock(&shared.runs.running).contains_key(&(id.clone(), run)) {
        return running;
    }
    // Started by an earlier driver: alive, or gone with its exit unknown.
    match read_record(dir) {
        Some(r) if r.boot_id == shared.boot_id && procfs::is_alive(r.pid, r.start_time) => running,
        _ => finished(
            RunState::Failed,
            None,
            "ended while the server was down; its exit is unknown".into(),
        ),
    }
}

pub(crate) fn list(shared: &Shared, id: &WorkloadId) -> Vec<RunStatus> {
    let dir = workload_dir(shared, id);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut runs: Vec<u64> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    runs.sort_unstable();
    runs.into_iter()
        .map(|n| status_of(shared, id, n, &dir.join(n.to_string())))
        .collect()
}

pub(crate) async fn stop(shared: &Shared, id: &WorkloadId, run: u64) {
    let tx = lock(&shared.runs.running).remove(&(id.clone(), run));
    let dir = run_dir(shared, id, run);
    match tx {
        Some(tx) => {
            let _ = tx.send(());
            // The waiter writes `exit` once the process is gone.
            for _ in 0..100 {
                if dir.join("exit").exists() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
        None => {
            if let Some(r) = read_record(&dir) {
                if r.boot_id == shared.boot_id && procfs::is_alive(r.pid, r.start_time) {
                    let _ = write_private(&dir.join("stopped"), b"");
                    procfs::signal(r.pid, "KILL").await;
                    let _ = write_private(&dir.join("exit"), b"signal 9");
                }
            }
        }
    }
}

pub(crate) async fn remove(shared: &Shared, id: &WorkloadId, run: u64) {
    stop(shared, id, run).await;
    let _ = std::fs::remove_dir_all(run_dir(shared, id, run));
}

/// Stops and forgets every run of the workload.
pub(crate) async fn remove_all(shared: &Shared, id: &WorkloadId) {
    for r in list(shared, id) {
        if r.state == RunState::Running {
            stop(shared, id, r.run).await;
        }
    }
    let _ = std::fs::remove_dir_all(workload_dir(shared, id));
}

/// The run's output as log lines (all on `stdout`: the two streams share one file to keep their order). With
/// `follow`, new lines until the run ends.
pub(crate) fn logs(
    shared: &std::sync::Arc<Shared>,
    id: &WorkloadId,
    run: u64,
    opts: &LogOptions,
) -> Result<crate::LogStream> {
    let dir = run_dir(shared, id, run);
    if !dir.exists() {
        return Err(Error::NotFound(id.clone()));
    }
    let follow = opts.follow;
    let tail = opts.tail;
    let since = opts.since;
    let state = futures_util::stream::unfold(
        (0u64, String::new(), false, tail, true),
        move |(mut offset, mut partial, mut done, tail, first)| {
            let dir = dir.clone();
            async move {
                use std::io::{Read, Seek, SeekFrom};
                loop {
                    if done {
                        return None;
                    }
                    let ended = dir.join("exit").exists();
                    let mut buf = Vec::new();
                    if let Ok(mut f) = std::fs::File::open(dir.join("output.log")) {
                        if f.seek(SeekFrom::Start(offset)).is_ok() {
                            let _ = f.read_to_end(&mut buf);
                        }
                    }
                    offset += buf.len() as u64;
                    partial.push_str(&String::from_utf8_lossy(&buf));
                    let mut lines: Vec<String> = Vec::new();
                    while let Some(i) = partial.find('\n') {
                        lines.push(partial[..i].to_string());
                        partial.drain(..=i);
                    }
                    if ended || !follow {
                        if !partial.is_empty() {
                            lines.push(std::mem::take(&mut partial));
                        }
                        done = true;
                    }
                    if first {
                        if let Some(t) = tail {
                            let skip = lines.len().saturating_sub(t);
                            lines.drain(..skip);
                        }
                    }
                    if !lines.is_empty() || done {
                        let now = jiff::Timestamp::now();
                        let out: Vec<Result<LogLine>> = lines
                            .into_iter()
                            .map(|line| {
                                Ok(LogLine {
                                    time: now,
                                    replica: 0,
                                    stream: "stdout".into(),
                                    line,
                                })
                            })
                            .filter(|l| match (&since, l) {
                                (Some(s), Ok(l)) => l.time >= *s,
                                _ => true,
                            })
                            .collect();
                        return Some((
                            futures_util::stream::iter(out),
                            (offset, partial, done, tail, false),
                        ));
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        },
    );
    Ok(Box::pin(futures_util::StreamExt::flatten(state)))
}
