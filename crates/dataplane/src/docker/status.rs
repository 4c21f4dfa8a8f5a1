//! Reading replicas back: status from container inspect plus the driver's readiness checks, and logs.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use futures_util::StreamExt;
use hyper::Method;

use super::api::{self, ApiError};
use super::engine_types::ContainerInspect;
use super::logs::{parse_line, Demux};
use super::{probe, spec, Inner};
use crate::{
    Error, LogLine, LogOptions, LogStream, Probe, ProbeSpec, ReplicaState, ReplicaStatus, Result,
    WorkloadId, WorkloadStatus, LABEL_RELEASE,
};

/// Lines of output a replica's status carries when it is not healthy.
const LAST_LOG_LINES: usize = 20;

impl Inner {
    /// Inspects a container; `None` if it is gone.
    pub(super) async fn inspect(
        &self,
        container: &str,
    ) -> Result<Option<ContainerInspect>, ApiError> {
        match self
            .engine
            .json(Method::GET, &format!("/containers/{container}/json"), None)
            .await
        {
            Ok(c) => Ok(Some(c)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn status(&self, id: &WorkloadId) -> Result<Option<WorkloadStatus>> {
        let containers = self.containers_of(id).await?;
        let (replicas, _) = Self::replicas_by_index(id, &containers);
        let desired = self.desired.lock().expect("desired lock").get(id).copied();
        if replicas.is_empty() && desired.is_none() {
            return Ok(None);
        }
        let mut out = Vec::with_capacity(replicas.len());
        for (index, c) in &replicas {
            let Some(c) = self.inspect(&c.id).await? else {
                continue;
            };
            out.push(self.replica_status(*index, &c).await);
        }
        Ok(Some(WorkloadStatus {
            desired: desired.unwrap_or(out.len() as u32),
            replicas: out,
        }))
    }

    async fn replica_status(&self, index: u32, c: &ContainerInspect) -> ReplicaStatus {
        let s = &c.state;
        let revived = self
            .revived
            .lock()
            .expect("revived lock")
            .get(&c.id)
            .copied()
            .unwrap_or(0);
        let state = if s.restarting {
            ReplicaState::Crashed {
                exit_code: Some(s.exit_code),
                message: format!("{}; restarting", exit_message(c)),
            }
        } else if s.running {
            ReplicaState::Running
        } else {
            match s.status.as_str() {
                "created" => ReplicaState::Starting,
                "exited" | "dead" => ReplicaState::Crashed {
                    exit_code: Some(s.exit_code),
                    message: exit_message(c),
                },
                _ => ReplicaState::Stopped,
            }
        };
        let ready = self.probe_ready(c).await;
        let changed = self
            .ready
            .lock()
            .expect("ready lock")
            .insert(c.id.clone(), ready)
            .is_some_and(|was| was != ready);
        if changed {
            if let Some(id) = c.label(crate::LABEL_WORKLOAD).and_then(WorkloadId::parse) {
                self.notify(&id);
            }
        }
        let last_logs = if ready {
            Vec::new()
        } else {
            self.last_logs(&c.id, LAST_LOG_LINES).await
        };
        ReplicaStatus {
            index,
            release: c.label(LABEL_RELEASE).unwrap_or_default().to_string(),
            state,
            ready,
            restarts: c.restart_count + revived,
            endpoints: endpoints(c),
            last_logs,
        }
    }

    /// Running, past the probe's initial delay, and passing the readiness probe recorded on the container; with
    /// no probe, the first named port accepts connections (or there is none).
    pub(super) async fn probe_ready(&self, c: &ContainerInspect) -> bool {
        let s = &c.state;
        if !s.running || s.restarting || s.paused {
            return false;
        }
        let endpoints = endpoints(c);
        let readiness: Option<ProbeSpec> = c
            .label(spec::LABEL_READINESS)
            .and_then(|r| serde_json::from_str(r).ok());
        let Some(readiness) = readiness else {
            let first = c
                .label(spec::LABEL_PORTS)
                .map(spec::parse_ports_label)
                .and_then(|p| p.into_iter().next());
            return match first {
                Some((name, _)) => match endpoints.get(&name) {
                    Some(addr) => probe::tcp(*addr).await,
                    None => false,
                },
                None => true,
            };
        };
        if readiness.initial_delay_secs > 0 {
            let started = s.started_at.parse::<jiff::Timestamp>().ok();
            let delay = jiff::SignedDuration::from_secs(i64::from(readiness.initial_delay_secs));
            if started.is_none_or(|t| jiff::Timestamp::now() < t + delay) {
                return false;
            }
        }
        run_probe(&readiness.probe, &endpoints).await
    }

    /// The last `n` lines a container wrote (stdout and stderr, in the order the Engine logged them).
    pub(super) async fn last_logs(&self, container: &str, n: usize) -> Vec<String> {
        let path = format!("/containers/{container}/logs?stdout=1&stderr=1&tail={n}");
        let Ok(bytes) = self.engine.call(Method::GET, &path, None).await else {
            return Vec::new();
        };
        let mut demux = Demux::default();
        let mut lines: Vec<String> = demux.push(&bytes).into_iter().map(|(_, l)| l).collect();
        lines.extend(demux.finish().into_iter().map(|(_, l)| l));
        let skip = lines.len().saturating_sub(n);
        lines.drain(..skip);
        lines
    }

    /// The replicas' logs, or with `opts.run` that run's (as replica 0, like the process driver's).
    pub(super) async fn logs(&self, id: &WorkloadId, opts: LogOptions) -> Result<LogStream> {
        let selected: Vec<(u32, String)> = match opts.run {
            Some(run) => self
                .run_container(id, run)
                .await?
                .map(|c| (0, c.id))
                .into_iter()
                .collect(),
            None => {
                let containers = self.containers_of(id).await?;
                let (replicas, _) = Self::replicas_by_index(id, &containers);
                replicas
                    .iter()
                    .filter(|(i, _)| opts.replica.is_none_or(|r| r == **i))
                    .map(|(i, c)| (*i, c.id.clone()))
                    .collect()
            }
        };
        if selected.is_empty() {
            return Err(Error::NotFound(id.clone()));
        }
        let mut query = format!(
            "stdout=1&stderr=1&timestamps=1&follow={}",
            u8::from(opts.follow)
        );
        match opts.tail {
            Some(n) => query.push_str(&format!("&tail={n}")),
            None => query.push_str("&tail=all"),
        }
        if let Some(since) = opts.since {
            query.push_str(&format!(
                "&since={}.{:09}",
                since.as_second(),
                since.subsec_nanosecond().max(0)
            ));
        }
        let mut streams = Vec::with_capacity(selected.len());
        for (index, container) in selected {
            let body = self
                .engine
                .stream(&format!("/containers/{container}/logs?{query}"))
                .await?;
            streams.push(replica_lines(index, body, opts.since).boxed());
        }
        if opts.follow {
            return Ok(futures_util::stream::select_all(streams).boxed());
        }
        // The past: every replica's lines, merged in time order.
        let mut all: Vec<Result<LogLine>> = Vec::new();
        for s in streams {
            all.extend(s.collect::<Vec<_>>().await);
        }
        all.sort_by_key(|l| l.as_ref().map(|l| l.time).ok());
        Ok(futures_util::stream::iter(all).boxed())
    }
}

/// One replica's log body as lines.
fn replica_lines(
    replica: u32,
    body: hyper::body::Incoming,
    since: Option<jiff::Timestamp>,
) -> impl futures_util::Stream<Item = Result<LogLine>> + Send {
    struct State {
        body: Option<hyper::body::Incoming>,
        demux: Demux,
        pending: std::collections::VecDeque<LogLine>,
    }
    let state = State {
        body: Some(body),
        demux: Demux::default(),
        pending: Default::default(),
    };
    futures_util::stream::unfold(state, move |mut st| async move {
        loop {
            if let Some(line) = st.pending.pop_front() {
                return Some((Ok(line), st));
            }
            let body = st.body.as_mut()?;
            let lines = match api::next_chunk(body).await {
                Some(Ok(chunk)) => st.demux.push(&chunk),
                Some(Err(e)) => {
                    st.body = None;
                    return Some((
                        Err(Error::Backend(format!(
                            "reading logs of replica {replica}: {e}"
                        ))),
                        st,
                    ));
                }
                None => {
                    st.body = None;
                    st.demux.finish()
                }
            };
            st.pending.extend(
                lines
                    .into_iter()
                    .map(|(stream, raw)| parse_line(replica, stream, &raw))
                    .filter(|l| since.is_none_or(|s| l.time >= s)),
            );
        }
    })
}

/// One check of a probe against a replica's endpoints; a port the replica does not publish fails it.
pub(super) async fn run_probe(p: &Probe, endpoints: &BTreeMap<String, SocketAddr>) -> bool {
    match p {
        Probe::Http { port, path } => match endpoints.get(port) {
            Some(addr) => probe::http(*addr, path).await,
            None => false,
        },
        Probe::Tcp { port } => match endpoints.get(port) {
            Some(addr) => probe::tcp(*addr).await,
            None => false,
        },
    }
}

/// `exited with code 3 (out of memory): <Engine error>`.
pub(super) fn exit_message(c: &ContainerInspect) -> String {
    let s = &c.state;
    let mut m = format!("exited with code {}", s.exit_code);
    if s.oom_killed {
        m.push_str(" (out of memory)");
    }
    if !s.error.is_empty() {
        m.push_str(": ");
        m.push_str(&s.error);
    }
    m
}

/// Each named port's published address, from the container's port bindings.
pub(super) fn endpoints(c: &ContainerInspect) -> BTreeMap<String, SocketAddr> {
    let mut out = BTreeMap::new();
    let Some(ports) = c.label(spec::LABEL_PORTS).map(spec::parse_ports_label) else {
        return out;
    };
    let Some(bindings) = &c.network_settings.ports else {
        return out;
    };
    for (name, port) in ports {
        let Some(Some(list)) = bindings.get(&format!("{port}/tcp")) else {
            continue;
        };
        for b in list {
            let Ok(host_port) = b.host_port.parse::<u16>() else {
                continue;
            };
            let ip = match b.host_ip.parse::<IpAddr>() {
                Ok(ip) if !ip.is_unspecified() => ip,
                _ => IpAddr::V4(Ipv4Addr::LOCALHOST),
            };
            out.insert(name.clone(), SocketAddr::new(ip, host_port));
            break;
        }
    }
    out
}
