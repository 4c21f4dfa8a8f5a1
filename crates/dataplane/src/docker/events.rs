//! The event watcher: the Engine's `/events` stream for containers carrying the workload label feeds
//! `changes()`, restarts replicas stopped behind the driver's back, and announces replicas becoming ready. Runs
//! of scheduled tasks are only announced: they end for good.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use super::api::{self, query_escape};
use super::engine_types::Event;
use super::{spec, Inner};
use crate::{WorkloadId, LABEL_WORKLOAD};

/// How long after a container dies the watcher looks at it: the Engine's restart policy acts first, and a
/// removal by a driver completes.
const DIE_GRACE: Duration = Duration::from_millis(800);
/// How often a starting replica's readiness is checked, and for how long.
const READY_POLL: Duration = Duration::from_millis(250);
const READY_WATCH_FOR: Duration = Duration::from_secs(120);
/// Pause before reconnecting to a dropped event stream.
const RECONNECT: Duration = Duration::from_secs(1);

/// Runs until the driver is dropped (which aborts it).
pub(super) async fn watch(inner: Arc<Inner>) {
    let filters = json!({ "type": ["container"], "label": [LABEL_WORKLOAD] }).to_string();
    let path = format!("/events?filters={}", query_escape(&filters));
    loop {
        match inner.engine.stream(&path).await {
            Ok(mut body) => {
                // Events from here on are seen; what happened while nobody watched is caught by a sweep.
                sweep(&inner).await;
                let mut buf: Vec<u8> = Vec::new();
                while let Some(chunk) = api::next_chunk(&mut body).await {
                    let Ok(chunk) = chunk else { break };
                    buf.extend_from_slice(&chunk);
                    while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=nl).collect();
                        match serde_json::from_slice::<Event>(&line) {
                            Ok(event) => handle(&inner, event),
                            Err(e) => tracing::debug!(error = %e, "unreadable Docker event"),
                        }
                    }
                }
                tracing::warn!("Docker event stream ended; reconnecting");
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch Docker events; retrying"),
        }
        tokio::time::sleep(RECONNECT).await;
    }
}

fn handle(inner: &Arc<Inner>, event: Event) {
    if event.kind != "container" || event.action.starts_with("exec_") {
        return;
    }
    let attrs = &event.actor.attributes;
    let Some(id) = attrs.get(LABEL_WORKLOAD).and_then(|s| WorkloadId::parse(s)) else {
        return;
    };
    if !inner.in_scope(&id) {
        return;
    }
    let name = attrs.get("name").cloned().unwrap_or_default();
    inner.notify(&id);
    // (The attributes carry the container's labels.)
    if spec::is_retiring(&name) || attrs.contains_key(spec::LABEL_RUN) {
        return;
    }
    let container = event.actor.id.clone();
    match event.action.as_str() {
        "die" => {
            tokio::spawn(revive_if_stopped(inner.clone(), container, id));
        }
        "start" => {
            tokio::spawn(announce_ready(inner.clone(), container, id));
        }
        _ => {}
    }
}

/// Starts a replica again if it stays stopped: the Engine does not restart a container that was stopped or
/// killed by hand (`docker kill`), whatever its restart policy.
async fn revive_if_stopped(inner: Arc<Inner>, container: String, id: WorkloadId) {
    tokio::time::sleep(DIE_GRACE).await;
    let c = match inner.inspect(&container).await {
        Ok(Some(c)) => c,
        _ => return,
    };
    if spec::is_retiring(&c.name)
        || c.label(spec::LABEL_RUN).is_some()
        || c.state.running
        || c.state.restarting
        || c.state.status != "exited"
    {
        return;
    }
    match inner.revive(&container).await {
        Ok(()) => {
            tracing::info!(workload = %id, container = %c.name.trim_start_matches('/'), exit_code = c.state.exit_code,
                "replica was stopped outside Kiln; started it again");
            inner.notify(&id);
        }
        Err(e) => {
            tracing::warn!(workload = %id, error = %e, "cannot start a stopped replica again")
        }
    }
}

/// Polls a started replica until it is ready (or stops), then announces the change.
async fn announce_ready(inner: Arc<Inner>, container: String, id: WorkloadId) {
    let deadline = tokio::time::Instant::now() + READY_WATCH_FOR;
    while tokio::time::Instant::now() < deadline {
        let c = match inner.inspect(&container).await {
            Ok(Some(c)) if c.state.running && !c.state.restarting => c,
            _ => return,
        };
        if inner.probe_ready(&c).await {
            let was = inner
                .ready
                .lock()
                .expect("ready lock")
                .insert(container.clone(), true);
            if was != Some(true) {
                inner.notify(&id);
            }
            return;
        }
        tokio::time::sleep(READY_POLL).await;
    }
}

/// Starts every replica of ours found stopped (runs stay as they ended), and announces every workload (events
/// may have been missed).
async fn sweep(inner: &Arc<Inner>) {
    let containers = match inner.containers(LABEL_WORKLOAD).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "cannot list containers to catch up on missed events");
            return;
        }
    };
    for c in &containers {
        let Some(id) = c.label(LABEL_WORKLOAD).and_then(WorkloadId::parse) else {
            continue;
        };
        if !inner.in_scope(&id) {
            continue;
        }
        if c.state == "exited" && !spec::is_retiring(c.name()) && c.label(spec::LABEL_RUN).is_none()
        {
            tokio::spawn(revive_if_stopped(inner.clone(), c.id.clone(), id.clone()));
        }
        inner.notify(&id);
    }
}
