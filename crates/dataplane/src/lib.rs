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
use std::net::SocketAddr;
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
}
