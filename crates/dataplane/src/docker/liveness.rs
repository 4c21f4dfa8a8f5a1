//! Liveness checks: the driver probes every running replica that has a liveness probe (recorded on the
//! container), each at its period, and restarts one that fails `failure_threshold` checks in a row. The Engine's
//! own health checks cannot do this: they run a command inside the container, and images built `FROM scratch`
//! have none to run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hyper::Method;
use tokio::time::Instant;

use super::{spec, status, Inner};
use crate::{ProbeSpec, WorkloadId, LABEL_WORKLOAD};

/// How often the containers with a liveness probe are looked at.
const TICK: Duration = Duration::from_secs(1);

struct Tracked {
    last_check: Instant,
    failures: u32,
}

/// Runs until the driver is dropped (which aborts it).
pub(super) async fn check(inner: Arc<Inner>) {
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    loop {
        tokio::time::sleep(TICK).await;
        let containers = match inner.containers(spec::LABEL_LIVENESS).await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "liveness: cannot list containers");
                continue;
            }
        };
        tracked.retain(|id, _| containers.iter().any(|c| &c.id == id));
        for c in containers {
            if !c
                .label(LABEL_WORKLOAD)
                .and_then(WorkloadId::parse)
                .is_some_and(|id| inner.in_scope(&id))
            {
                continue;
            }
            if c.state != "running" || spec::is_retiring(c.name()) {
                tracked.remove(&c.id);
                continue;
            }
            let Some(probe) = c
                .label(spec::LABEL_LIVENESS)
                .and_then(|p| serde_json::from_str::<ProbeSpec>(p).ok())
            else {
                continue;
            };
            let now = Instant::now();
            let period = Duration::from_secs(u64::from(probe.period_secs.max(1)));
            let t = tracked.entry(c.id.clone()).or_insert(Tracked {
                // Due at once (the initial delay is counted from the container's start below).
                last_check: now.checked_sub(period).unwrap_or(now),
                failures: 0,
            });
            if now.duration_since(t.last_check) < period {
                continue;
            }
            t.last_check = now;
            let Ok(Some(inspect)) = inner.inspect(&c.id).await else {
                continue;
            };
            if !inspect.state.running || inspect.state.restarting {
                continue;
            }
            if probe.initial_delay_secs > 0 {
                let started = inspect.state.started_at.parse::<jiff::Timestamp>().ok();
                let delay = jiff::SignedDuration::from_secs(i64::from(probe.initial_delay_secs));
                if started.is_none_or(|s| jiff::Timestamp::now() < s + delay) {
                    continue;
                }
            }
            let endpoints = status::endpoints(&inspect);
            if status::run_probe(&probe.probe, &endpoints).await {
                t.failures = 0;
                continue;
            }
            t.failures += 1;
            if t.failures < probe.failure_threshold.max(1) {
                continue;
            }
            t.failures = 0;
            let id = c.label(LABEL_WORKLOAD).and_then(WorkloadId::parse);
            let secs = inner.config.stop_timeout_secs;
            match inner
                .engine
                .call(
                    Method::POST,
                    &format!("/containers/{}/restart?t={secs}", c.id),
                    None,
                )
                .await
            {
                Ok(_) => {
                    tracing::info!(container = %c.name(), "liveness probe failed {} times; restarted the replica",
                        probe.failure_threshold.max(1));
                    *inner
                        .revived
                        .lock()
                        .expect("revived lock")
                        .entry(c.id.clone())
                        .or_default() += 1;
                    if let Some(id) = id {
                        inner.notify(&id);
                    }
                }
                Err(e) => {
                    tracing::warn!(container = %c.name(), error = %e, "liveness: restart failed")
                }
            }
        }
    }
}
