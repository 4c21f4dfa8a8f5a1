//! Where components run. A [`DataPlane`] turns a rendered [`Workload`] (what one component should run in one
//! environment) into running replicas, reports their health, and streams their logs. Drivers: `process`
//! (supervised local processes, the embedded default), `docker` (the Docker Engine API), and `noop` (accepts
//! everything and reports it ready without running anything; for measuring the control plane alone).
//!
//! Architecture invariants:
//! - `apply` is idempotent and converges: applying the same workload twice changes nothing; applying a new
//!   release replaces the replicas; applying fewer replicas stops the extra ones.
//! - A driver owns only what carries its labels ([`LABEL_WORKLOAD`]); after a restart it adopts what is running
//!   instead of starting duplicates, and removes what no workload claims only when asked (`remove`).
//! - Nothing here knows about the store or the API: controllers render workloads and read status back.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use serde::{Deserialize, Serialize};

pub mod docker;
pub mod noop;
pub mod process;

/// Label naming the workload a process or container belongs to (its [`WorkloadId`] as a string).
pub const LABEL_WORKLOAD: &str = "kiln.dev/workload";
/// Label naming the release a replica runs.
pub const LABEL_RELEASE: &str = "kiln.dev/release";

/// Identifies one component deployed in one environment: `org/project/env/component`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkloadId {
    pub organization: String,
    pub project: String,
    pub environment: String,
    pub component: String,
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}/{}/{}",
            self.organization, self.project, self.environment, self.component
        )
    }
}

impl WorkloadId {
    /// Parses the `org/project/env/component` form.
    pub fn parse(s: &str) -> Option<WorkloadId> {
        let mut it = s.split('/');
        let id = WorkloadId {
            organization: it.next()?.to_string(),
            project: it.next()?.to_string(),
            environment: it.next()?.to_string(),
            component: it.next()?.to_string(),
        };
        it.next().is_none().then_some(id)
    }

    /// A name usable for containers, networks and directories: `org--project--env--component`.
    pub fn slug(&self) -> String {
        format!(
            "{}--{}--{}--{}",
            self.organization, self.project, self.environment, self.component
        )
    }
}

/// How to check a replica's health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Probe {
    /// HTTP GET on the replica's named port; any 2xx/3xx is healthy.
    Http { port: String, path: String },
    /// A TCP connect to the replica's named port.
    Tcp { port: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeSpec {
    pub probe: Probe,
    pub period_secs: u32,
    pub failure_threshold: u32,
    pub initial_delay_secs: u32,
}

/// One port a replica listens on. The process driver assigns each replica its own host port and passes it in
/// the environment (`PORT` for the first port, `PORT_<NAME>` for each); the docker driver publishes
/// `container_port` on a loopback host port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortSpec {
    /// The endpoint name (DNS-1123 label).
    pub name: String,
    pub container_port: u16,
}

/// What to run, rendered from a component's release for one environment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub id: WorkloadId,
    /// The release this workload runs; a change replaces the replicas.
    pub release: String,
    /// A container image (docker driver).
    pub image: Option<String>,
    /// A command and its arguments (process driver; for docker, overrides the image's entrypoint).
    pub command: Vec<String>,
    /// Working directory of the process (process driver) or in the container.
    pub working_dir: Option<String>,
    pub env: BTreeMap<String, String>,
    pub replicas: u32,
    pub ports: Vec<PortSpec>,
    /// Memory limit in bytes, if any.
    pub memory_limit: Option<u64>,
    /// CPU limit in millicores, if any.
    pub cpu_limit_millis: Option<u64>,
    pub readiness: Option<ProbeSpec>,
    pub liveness: Option<ProbeSpec>,
    /// Extra labels for what the driver creates.
    pub labels: BTreeMap<String, String>,
}

/// The state of one replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ReplicaState {
    Starting,
    Running,
    /// Exited and waiting to be restarted (with backoff).
    Crashed {
        exit_code: Option<i32>,
        message: String,
    },
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicaStatus {
    pub index: u32,
    pub release: String,
    pub state: ReplicaState,
    /// Passed its readiness probe (or is running and has none).
    pub ready: bool,
    pub restarts: u32,
    /// Where each named port of this replica is reachable from the server.
    pub endpoints: BTreeMap<String, SocketAddr>,
    /// The last lines the replica wrote, when it is not healthy (for conditions: "exited with 3: ...").
    pub last_logs: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadStatus {
    pub desired: u32,
    pub replicas: Vec<ReplicaStatus>,
}

impl WorkloadStatus {
    pub fn ready(&self) -> u32 {
        self.replicas.iter().filter(|r| r.ready).count() as u32
    }
}

/// Which logs to read.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// Keep streaming new lines.
    pub follow: bool,
    /// Only this replica.
    pub replica: Option<u32>,
    /// Only lines written at or after this time.
    pub since: Option<jiff::Timestamp>,
    /// At most this many lines from the past (per replica).
    pub tail: Option<usize>,
    /// The logs of this run of a scheduled task instead of the replicas'.
    pub run: Option<u64>,
}

/// Where a run of a scheduled task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
}

/// One run of a scheduled task, as the driver knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    /// The run's number (chosen by the caller of [`DataPlane::start_run`]).
    pub run: u64,
    pub state: RunState,
    pub exit_code: Option<i32>,
    /// Why it ended, when it has (`exited with code 1`, `killed by signal 9`, `stopped`).
    pub message: String,
    /// The last lines it wrote (finished runs).
    pub last_logs: Vec<String>,
}

/// One line a replica wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogLine {
    pub time: jiff::Timestamp,
    pub replica: u32,
    /// `stdout` or `stderr`.
    pub stream: String,
    pub line: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The workload cannot run on this data plane (e.g. an image on the process driver).
    #[error("{0}")]
    Unsupported(String),
    #[error("{0} is not deployed")]
    NotFound(WorkloadId),
    /// The driver's backend failed (Docker daemon unreachable, spawn failed, ...).
    #[error("{0}")]
    Backend(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The server host's address on a workload's network, and that network's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAddress {
    /// The host's address on the network (where listeners for the workload are bound).
    pub ip: IpAddr,
    /// The network's prefix length: peers within `ip/prefix_len` are on the workload's network.
    pub prefix_len: u8,
}

impl HostAddress {
    /// Whether `peer` is on this network.
    pub fn admits(&self, peer: IpAddr) -> bool {
        match (self.ip, peer) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let bits = u32::from(self.prefix_len.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let bits = u32::from(self.prefix_len.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// A boxed future, so that [`DataPlane`] is object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
/// A stream of log lines.
pub type LogStream = Pin<Box<dyn futures_util::Stream<Item = Result<LogLine>> + Send>>;

/// A place where workloads run.
pub trait DataPlane: Send + Sync {
    /// The driver's name (`process`, `docker`, `noop`).
    fn name(&self) -> &'static str;

    /// Makes the workload run as specified. Idempotent.
    fn apply<'a>(&'a self, workload: &'a Workload) -> BoxFuture<'a, Result<()>>;

    /// Stops and removes everything of the workload. Removing what is not there succeeds.
    fn remove<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<()>>;

    /// The workload's replicas as they are now; `None` if the driver runs nothing for it.
    fn status<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<Option<WorkloadStatus>>>;

    /// Every workload the driver runs (its own, by label), including ones adopted after a restart.
    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkloadId>>>;

    /// The workload's logs.
    fn logs<'a>(&'a self, id: &'a WorkloadId, opts: LogOptions)
        -> BoxFuture<'a, Result<LogStream>>;

    /// A receiver that yields a workload's id whenever its status may have changed (a replica started, became
    /// ready, crashed), so controllers re-read it instead of polling.
    fn changes(&self) -> tokio::sync::broadcast::Receiver<WorkloadId>;

    /// The address at which the workload's replicas reach the server's host, where their dependency addresses
    /// are bound; `None` when that is the host's loopback (replicas run on the host itself). May prepare what
    /// the workload will run in (the docker driver creates the project-environment network to learn its
    /// gateway).
    fn host_address<'a>(
        &'a self,
        id: &'a WorkloadId,
    ) -> BoxFuture<'a, Result<Option<HostAddress>>> {
        let _ = id;
        Box::pin(async { Ok(None) })
    }

    /// Starts run `run` of a scheduled task: one instance of the workload, run to completion, its exit and logs
    /// kept until [`DataPlane::remove_run`] (or `remove`). Starting a run that was started before does nothing.
    fn start_run<'a>(&'a self, workload: &'a Workload, run: u64) -> BoxFuture<'a, Result<()>> {
        let _ = run;
        let name = self.name();
        Box::pin(async move {
            Err(Error::Unsupported(format!(
                "the {name} data plane does not run scheduled tasks ({})",
                workload.id
            )))
        })
    }

    /// The runs of a workload the driver keeps, oldest first.
    fn runs<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<Vec<RunStatus>>> {
        let _ = id;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Stops a running run (it ends `Failed`, "stopped"). Stopping a finished or unknown run does nothing.
    fn stop_run<'a>(&'a self, id: &'a WorkloadId, run: u64) -> BoxFuture<'a, Result<()>> {
        let _ = (id, run);
        Box::pin(async { Ok(()) })
    }

    /// Forgets a run (stopping it first if it still runs): its exit and logs go.
    fn remove_run<'a>(&'a self, id: &'a WorkloadId, run: u64) -> BoxFuture<'a, Result<()>> {
        let _ = (id, run);
        Box::pin(async { Ok(()) })
    }
}
