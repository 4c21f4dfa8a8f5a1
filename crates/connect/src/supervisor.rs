//! `kiln supervisor`: keeps a daemon running and the machine clean.
//!
//! It starts the daemon as its child, and when the daemon exits for any reason (a crash, `SIGKILL`, an error
//! at start) undoes what the daemon changed on the system (the journal, see [`crate::system`]) before starting
//! it again after a backoff: 200 ms, doubling to 10 s, back to 200 ms once a daemon has run for 30 s. On its
//! own shutdown it stops the daemon (`SIGTERM`, then `SIGKILL` after 10 s) and undoes what is left.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio::process::Command;

/// How a supervisor runs its daemon.
#[derive(Debug, Clone)]
pub struct Options {
    /// The `kiln` executable.
    pub program: PathBuf,
    /// The daemon's arguments (`daemon run …`).
    pub args: Vec<OsString>,
    /// The daemon's journal of system changes.
    pub journal: PathBuf,
}

const FIRST_WAIT: Duration = Duration::from_millis(200);
const MAX_WAIT: Duration = Duration::from_secs(10);
const STEADY: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(10);

fn restore(journal: &std::path::Path) {
    match crate::system::restore(journal) {
        Ok(done) => {
            for d in done {
                tracing::info!("{d}");
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot undo the daemon's system changes"),
    }
}

/// Runs until `shutdown` resolves.
pub async fn run(
    opts: Options,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(shutdown);
    let mut wait = FIRST_WAIT;
    loop {
        let started = Instant::now();
        let mut child = Command::new(&opts.program)
            .args(&opts.args)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let pid = child.id();
        tracing::info!(pid, "daemon started");
        tokio::select! {
            status = child.wait() => {
                let status = status?;
                tracing::warn!(pid, %status, "the daemon exited; undoing its system changes and starting it again");
                restore(&opts.journal);
                if started.elapsed() >= STEADY {
                    wait = FIRST_WAIT;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut shutdown => return Ok(()),
                }
                wait = (wait * 2).min(MAX_WAIT);
            }
            _ = &mut shutdown => {
                if let Some(p) = pid.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
                }
                if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
                restore(&opts.journal);
                tracing::info!("supervisor stopped");
                return Ok(());
            }
        }
    }
}
