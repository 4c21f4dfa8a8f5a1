//! The `noop` driver: it runs nothing. It records what was applied and reports every replica `Running` and
//! ready, so that the control plane (controllers, store, API) can be measured alone, without the cost of
//! starting processes or containers. Never use it to serve anything.

use std::collections::BTreeMap;
use std::sync::Mutex;

use tokio::sync::broadcast;

use crate::{
    BoxFuture, DataPlane, Error, LogOptions, LogStream, ReplicaState, ReplicaStatus, Result,
    Workload, WorkloadId, WorkloadStatus,
};

/// A data plane that runs nothing: applied workloads are kept in memory and reported as running and ready,
/// with no endpoints and no logs. For benchmarking the control plane alone.
pub struct NoopDriver {
    workloads: Mutex<BTreeMap<WorkloadId, Workload>>,
    changes_tx: broadcast::Sender<WorkloadId>,
}

impl NoopDriver {
    pub fn new() -> NoopDriver {
        NoopDriver {
            workloads: Mutex::new(BTreeMap::new()),
            changes_tx: broadcast::channel(1024).0,
        }
    }

    fn workloads(&self) -> std::sync::MutexGuard<'_, BTreeMap<WorkloadId, Workload>> {
        // The map is never left half-updated, so a poisoned lock still holds consistent data.
        self.workloads.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for NoopDriver {
    fn default() -> Self {
        NoopDriver::new()
    }
}

impl DataPlane for NoopDriver {
    fn name(&self) -> &'static str {
        "noop"
    }

    fn apply<'a>(&'a self, workload: &'a Workload) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let changed = self
                .workloads()
                .insert(workload.id.clone(), workload.clone())
                .as_ref()
                != Some(workload);
            if changed {
                let _ = self.changes_tx.send(workload.id.clone());
            }
            Ok(())
        })
    }

    fn remove<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            if self.workloads().remove(id).is_some() {
                let _ = self.changes_tx.send(id.clone());
            }
            Ok(())
        })
    }

    fn status<'a>(&'a self, id: &'a WorkloadId) -> BoxFuture<'a, Result<Option<WorkloadStatus>>> {
        Box::pin(async move {
            Ok(self.workloads().get(id).map(|w| WorkloadStatus {
                desired: w.replicas,
                replicas: (0..w.replicas)
                    .map(|index| ReplicaStatus {
                        index,
                        release: w.release.clone(),
                        state: ReplicaState::Running,
                        ready: true,
                        restarts: 0,
                        endpoints: BTreeMap::new(),
                        last_logs: Vec::new(),
                    })
                    .collect(),
            }))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<WorkloadId>>> {
        Box::pin(async move { Ok(self.workloads().keys().cloned().collect()) })
    }

    fn logs<'a>(
        &'a self,
        id: &'a WorkloadId,
        _opts: LogOptions,
    ) -> BoxFuture<'a, Result<LogStream>> {
        Box::pin(async move {
            if !self.workloads().contains_key(id) {
                return Err(Error::NotFound(id.clone()));
            }
            let empty: LogStream = Box::pin(futures_util::stream::empty());
            Ok(empty)
        })
    }

    fn changes(&self) -> broadcast::Receiver<WorkloadId> {
        self.changes_tx.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn workload(replicas: u32) -> Workload {
        Workload {
            id: WorkloadId::parse("o/p/dev/api").unwrap(),
            release: "r1".into(),
            image: None,
            command: vec!["true".into()],
            working_dir: None,
            env: BTreeMap::new(),
            replicas,
            ports: Vec::new(),
            memory_limit: None,
            cpu_limit_millis: None,
            readiness: None,
            liveness: None,
            labels: BTreeMap::new(),
        }
    }

    #[tokio::test]
    async fn records_reports_ready_and_forgets() {
        let driver = NoopDriver::new();
        let mut changes = driver.changes();
        let w = workload(3);
        driver.apply(&w).await.unwrap();
        assert_eq!(changes.recv().await.unwrap(), w.id);
        let status = driver.status(&w.id).await.unwrap().unwrap();
        assert_eq!((status.desired, status.ready()), (3, 3));
        assert!(status
            .replicas
            .iter()
            .all(|r| r.state == ReplicaState::Running && r.endpoints.is_empty()));
        assert_eq!(driver.list().await.unwrap(), vec![w.id.clone()]);
        let lines: Vec<_> = driver
            .logs(&w.id, LogOptions::default())
            .await
            .unwrap()
            .collect()
            .await;
        assert!(lines.is_empty());

        // The same workload again changes nothing.
        driver.apply(&w).await.unwrap();
        assert!(changes.try_recv().is_err());

        driver.remove(&w.id).await.unwrap();
        assert_eq!(changes.recv().await.unwrap(), w.id);
        assert!(driver.status(&w.id).await.unwrap().is_none());
        assert!(driver.list().await.unwrap().is_empty());
        driver.remove(&w.id).await.unwrap();
    }
}
