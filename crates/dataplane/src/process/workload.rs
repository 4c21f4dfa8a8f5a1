//! One workload's state in the driver and its reconciler task, which converges the running replicas on the
//! last applied [`Workload`]: stop extra indexes (highest first), start missing ones, and replace replicas whose
//! spec differs one index at a time (start the new one, wait until it is ready or the rollout timeout passes,
//! stop the old one). Level-triggered: a new apply interrupts a rollout wait and the pass starts over from what
//! is running.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, watch};

use super::capture::{Capture, LogSink};
use super::files::{log_path, parse_log_file, spec_hash, InstanceFiles};
use super::replica::{lock, Replica, Start};
use super::Shared;
use crate::{LogLine, PortSpec, Workload, WorkloadId, WorkloadStatus};

/// What the workload should be: `None` once removal was asked. `generation` counts applies and removals.
#[derive(Debug, Clone, Default)]
pub(crate) struct Desired {
    pub workload: Option<Arc<Workload>>,
    pub generation: u64,
}

pub(crate) struct Entry {
    pub id: WorkloadId,
    /// `state_dir/<slug>`.
    pub dir: PathBuf,
    pub desired_tx: watch::Sender<Desired>,
    /// The last generation the reconciler fully converged on.
    pub converged_tx: watch::Sender<u64>,
    /// Set once a removal finished (the entry left the driver).
    pub removed_tx: watch::Sender<bool>,
    replicas: Mutex<Vec<Arc<Replica>>>,
    sinks: Mutex<BTreeMap<u32, Arc<LogSink>>>,
    pub log_tx: broadcast::Sender<LogLine>,
}

impl Entry {
    pub fn new(id: WorkloadId, dir: PathBuf, workload: Option<Arc<Workload>>) -> Entry {
        Entry {
            id,
            dir,
            desired_tx: watch::channel(Desired {
                workload,
                generation: 0,
            })
            .0,
            converged_tx: watch::channel(0).0,
            removed_tx: watch::channel(false).0,
            replicas: Mutex::new(Vec::new()),
            sinks: Mutex::new(BTreeMap::new()),
            log_tx: broadcast::channel(1024).0,
        }
    }

    pub fn replicas(&self) -> Vec<Arc<Replica>> {
        lock(&self.replicas).clone()
    }

    /// The log of one replica index (shared by all its instances).
    pub fn sink(&self, index: u32, cap: u64) -> Arc<LogSink> {
        lock(&self.sinks)
            .entry(index)
            .or_insert_with(|| {
                Arc::new(LogSink::new(
                    log_path(&self.dir, index),
                    cap,
                    self.log_tx.clone(),
                ))
            })
            .clone()
    }

    /// Every replica index that has a log, running or not.
    pub fn log_indexes(&self) -> BTreeSet<u32> {
        let mut indexes: BTreeSet<u32> = lock(&self.sinks).keys().copied().collect();
        if let Ok(dir) = std::fs::read_dir(&self.dir) {
            indexes.extend(
                dir.flatten()
                    .filter_map(|e| parse_log_file(&e.file_name().to_string_lossy())),
            );
        }
        indexes
    }

    pub fn status(&self) -> WorkloadStatus {
        let desired = self
            .desired_tx
            .borrow()
            .workload
            .as_ref()
            .map_or(0, |w| w.replicas);
        let mut replicas = self.replicas();
        replicas.sort_by_key(|r| (r.index, r.instance));
        WorkloadStatus {
            desired,
            replicas: replicas.iter().map(|r| r.status()).collect(),
        }
    }

    /// Adds a replica and starts its supervisor.
    pub fn add(self: &Arc<Self>, shared: &Arc<Shared>, replica: Arc<Replica>, start: Start) {
        lock(&self.replicas).push(replica.clone());
        replica.supervise(
            shared.clone(),
            self.sink(replica.index, shared.opts.log_cap_bytes),
            start,
        );
        let _ = shared.changes_tx.send(self.id.clone());
    }

    async fn stop(&self, shared: &Shared, replica: &Replica) {
        replica.stop().await;
        lock(&self.replicas).retain(|r| r.instance != replica.instance);
        let _ = shared.changes_tx.send(self.id.clone());
    }
}

/// The reconciler task of one workload. `leftovers` are the files of processes that died while no driver ran:
/// their last output goes to the log before they are removed.
pub(crate) async fn reconcile(
    entry: Arc<Entry>,
    shared: Arc<Shared>,
    leftovers: Vec<(u32, InstanceFiles)>,
) {
    for (index, files) in leftovers {
        let mut capture = Capture::new(index, &files, entry.sink(index, shared.opts.log_cap_bytes));
        capture.poll(true).await;
        files.remove_all();
    }
    let mut desired_rx = entry.desired_tx.subscribe();
    let mut shutdown_rx = shared.shutdown_rx.clone();
    loop {
        if *shutdown_rx.borrow() {
            return;
        }
        let desired = desired_rx.borrow_and_update().clone();
        let done = match &desired.workload {
            Some(w) => converge(&entry, &shared, w, &mut desired_rx, &mut shutdown_rx).await,
            None => {
                for replica in entry.replicas() {
                    entry.stop(&shared, &replica).await;
                }
                true
            }
        };
        if !done {
            // Interrupted by a new apply (or shutdown): start over at once.
            continue;
        }
        if *shutdown_rx.borrow() {
            return;
        }
        if desired.workload.is_none() && finish_removal(&entry, &shared) {
            return;
        }
        entry.converged_tx.send_replace(desired.generation);
        tokio::select! {
            changed = desired_rx.changed() => if changed.is_err() { return },
            _ = shutdown_rx.changed() => return,
        }
    }
}

/// Forgets the workload once everything stopped, unless it was applied again meanwhile.
fn finish_removal(entry: &Arc<Entry>, shared: &Shared) -> bool {
    let mut entries = lock(&shared.entries);
    if entry.desired_tx.borrow().workload.is_some() {
        return false;
    }
    if entries
        .get(&entry.id)
        .is_some_and(|e| Arc::ptr_eq(e, entry))
    {
        entries.remove(&entry.id);
    }
    // Under the lock, so that an apply arriving now finds no entry and creates the directory afresh.
    if let Err(e) = std::fs::remove_dir_all(&entry.dir) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(dir = %entry.dir.display(), error = %e, "cannot remove a workload's directory");
        }
    }
    entry.removed_tx.send_replace(true);
    let _ = shared.changes_tx.send(entry.id.clone());
    true
}

/// One pass towards `w`; false if interrupted (a new apply, or shutdown).
async fn converge(
    entry: &Arc<Entry>,
    shared: &Arc<Shared>,
    w: &Arc<Workload>,
    desired_rx: &mut watch::Receiver<Desired>,
    shutdown_rx: &mut watch::Receiver<bool>,
) -> bool {
    let hash = spec_hash(w);
    let at = |index: u32| -> Vec<Arc<Replica>> {
        entry
            .replicas()
            .into_iter()
            .filter(|r| r.index == index)
            .collect()
    };

    // Fewer replicas: stop the extra indexes, highest first.
    let mut extra: Vec<_> = entry
        .replicas()
        .into_iter()
        .filter(|r| r.index >= w.replicas)
        .collect();
    extra.sort_by_key(|r| Reverse((r.index, r.instance)));
    for replica in extra {
        entry.stop(shared, &replica).await;
    }

    for index in 0..w.replicas {
        let current = at(index);
        if current.is_empty() {
            start(entry, shared, w, &hash, index);
            continue;
        }
        // Two replicas of the wanted spec at one index (an interrupted pass): keep the older.
        for duplicate in current.iter().filter(|r| r.hash == hash).skip(1) {
            entry.stop(shared, duplicate).await;
        }
    }

    // Replace replicas running another spec, one index at a time.
    for index in 0..w.replicas {
        let current = at(index);
        let old: Vec<_> = current.iter().filter(|r| r.hash != hash).cloned().collect();
        if old.is_empty() {
            continue;
        }
        let new = match current.iter().find(|r| r.hash == hash) {
            Some(r) => Some(r.clone()),
            None => start(entry, shared, w, &hash, index),
        };
        if let Some(new) = new {
            tokio::select! {
                _ = new.wait_ready(shared.opts.rollout_timeout) => {}
                _ = desired_rx.changed() => return false,
                _ = shutdown_rx.changed() => return false,
            }
        }
        for replica in old {
            entry.stop(shared, &replica).await;
        }
    }
    true
}

fn start(
    entry: &Arc<Entry>,
    shared: &Arc<Shared>,
    w: &Arc<Workload>,
    hash: &str,
    index: u32,
) -> Option<Arc<Replica>> {
    let ports = match allocate_ports(shared, &w.ports) {
        Ok(ports) => ports,
        Err(e) => {
            tracing::error!(workload = %w.id, replica = index, error = %e, "cannot allocate ports");
            return None;
        }
    };
    let instance = shared.next_instance.fetch_add(1, Ordering::SeqCst);
    let replica = Arc::new(Replica::new(
        w.clone(),
        index,
        instance,
        hash.to_string(),
        w.release.clone(),
        ports,
        InstanceFiles::new(&entry.dir, index, instance),
    ));
    entry.add(shared, replica.clone(), Start::Spawn);
    Some(replica)
}

/// A free loopback port per named port, distinct from every port this driver has handed out.
fn allocate_ports(shared: &Shared, ports: &[PortSpec]) -> std::io::Result<BTreeMap<String, u16>> {
    let mut in_use = lock(&shared.ports_in_use);
    let mut out = BTreeMap::new();
    for spec in ports {
        if out.contains_key(&spec.name) {
            continue;
        }
        let mut tries = 0;
        let port = loop {
            let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
            let port = listener.local_addr()?.port();
            if in_use.insert(port) {
                break port;
            }
            tries += 1;
            if tries > 1000 {
                return Err(std::io::Error::other("no free loopback port"));
            }
        };
        out.insert(spec.name.clone(), port);
    }
    Ok(out)
}
