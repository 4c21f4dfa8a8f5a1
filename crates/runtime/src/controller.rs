//! The controller loop: watchers feed the work queue; the loop hands queued keys to at most `concurrency`
//! reconciles at once, applies their actions (requeue timers, backoff) and stops gracefully on shutdown.

use std::collections::HashMap;
use std::future::pending;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{BoxStream, Stream, StreamExt};
use model::Resource;
use store::Key;
use tokio::sync::{mpsc, watch};
use tokio::task::{self, JoinError, JoinSet};
use tokio::time::Instant;

use crate::queue::WorkQueue;
use crate::watcher::{self, Sink};
use crate::{Action, Backoff, Cache, Context, ControllerStats, ErrorChain, Reconciler, Source};

/// Maps an object of a watched related kind to the keys of the controller's own objects that depend on it. It
/// is given the controller's cache to find them (e.g. "the projects that reference this pipeline").
pub type Mapper = Arc<dyn Fn(&Resource, &Cache) -> Vec<Key> + Send + Sync>;

/// How many keys a watcher may hand over before it waits for the loop to take them.
const TRIGGER_BUFFER: usize = 1024;

/// One controller: a primary [`Source`], optional related sources, and a [`Reconciler`]. Configure it with the
/// builder methods, keep [`Controller::stats`] if you want metrics, then [`Controller::run`] it.
pub struct Controller<R: Reconciler> {
    name: Arc<str>,
    source: Arc<dyn Source>,
    secondaries: Vec<(Arc<dyn Source>, Mapper)>,
    triggers: Vec<BoxStream<'static, Key>>,
    reconciler: Arc<R>,
    concurrency: usize,
    backoff: Backoff,
    watch_backoff: Backoff,
    cache: Cache,
    stats: Arc<ControllerStats>,
}

/// How a reconcile ended.
enum Outcome {
    /// The object was gone from the cache: nothing was reconciled.
    Gone,
    Reconciled(Action),
    /// Failed; the action comes from the error policy.
    Failed(Action),
    /// The reconciler panicked; retried with the controller's backoff.
    Panicked,
}

/// The reconciles in flight, and which key each task works on.
#[derive(Default)]
struct Running {
    tasks: JoinSet<Outcome>,
    keys: HashMap<task::Id, Key>,
}

impl<R: Reconciler> Controller<R> {
    /// A controller named `name` (used in logs and metrics) that reconciles the objects of `source`, one worker,
    /// default backoff.
    pub fn new(name: &str, source: impl Source, reconciler: R) -> Self {
        Self {
            name: name.into(),
            source: Arc::new(source),
            secondaries: Vec::new(),
            triggers: Vec::new(),
            reconciler: Arc::new(reconciler),
            concurrency: 1,
            backoff: Backoff::default(),
            watch_backoff: Backoff {
                base: Duration::from_secs(1),
                cap: Duration::from_secs(30),
            },
            cache: Cache::default(),
            stats: Arc::new(ControllerStats::new(name)),
        }
    }

    /// Reconciles at most `n` objects at once (at least 1).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// The backoff between retries of a failing object.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// The backoff between retries of a failing list or watch.
    pub fn watch_backoff(mut self, backoff: Backoff) -> Self {
        self.watch_backoff = backoff;
        self
    }

    /// Also follows `source`, a related kind: each of its changes (and each object of its listings) queues the
    /// primary keys that `mapper` returns.
    pub fn watches(
        mut self,
        source: impl Source,
        mapper: impl Fn(&Resource, &Cache) -> Vec<Key> + Send + Sync + 'static,
    ) -> Self {
        self.secondaries.push((Arc::new(source), Arc::new(mapper)));
        self
    }

    /// Also queues every key that `keys` yields: changes the store does not see (e.g. a data plane reporting that
    /// a workload's status changed). A triggered key goes through the same queue as a watched change, so it is
    /// de-duplicated, never reconciled twice at once, and reconciled with the newest cached object (a key not in
    /// the cache is skipped). The stream is polled while the controller runs; its end is not an error.
    pub fn triggers(mut self, keys: impl Stream<Item = Key> + Send + 'static) -> Self {
        self.triggers.push(keys.boxed());
        self
    }

    /// The controller's metrics, live while it runs.
    pub fn stats(&self) -> Arc<ControllerStats> {
        self.stats.clone()
    }

    /// The controller's cache of its primary objects.
    pub fn cache(&self) -> Cache {
        self.cache.clone()
    }

    /// Runs until `shutdown` becomes `true` (or its sender is dropped), then stops taking work, waits for the
    /// reconciles in flight and returns.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let (trigger_tx, mut trigger_rx) = mpsc::channel::<Key>(TRIGGER_BUFFER);
        let mut watchers = JoinSet::new();
        let primary = Sink::Primary {
            cache: self.cache.clone(),
        };
        watchers.spawn(watcher::run(
            self.source.clone(),
            primary,
            trigger_tx.clone(),
            self.watch_backoff,
            self.stats.clone(),
            "primary",
        ));
        for (source, mapper) in &self.secondaries {
            let sink = Sink::Secondary {
                mapper: mapper.clone(),
                primary: self.cache.clone(),
            };
            watchers.spawn(watcher::run(
                source.clone(),
                sink,
                trigger_tx.clone(),
                self.watch_backoff,
                self.stats.clone(),
                "secondary",
            ));
        }
        for mut keys in std::mem::take(&mut self.triggers) {
            let tx = trigger_tx.clone();
            watchers.spawn(async move {
                while let Some(key) = keys.next().await {
                    if tx.send(key).await.is_err() {
                        break;
                    }
                }
            });
        }
        drop(trigger_tx);

        let stop = async move {
            // An error means the sender is gone: nobody can ask us to stop any more, so stop now.
            let _ = shutdown.wait_for(|stop| *stop).await;
        };
        tokio::pin!(stop);

        let mut queue = WorkQueue::default();
        let mut failures: HashMap<Key, u32> = HashMap::new();
        let mut running = Running::default();
        tracing::info!(controller = %self.name, concurrency = self.concurrency, "controller started");
        loop {
            while running.tasks.len() < self.concurrency {
                let Some(key) = queue.pop() else { break };
                self.start(&mut running, key, &failures);
            }
            self.publish_gauges(&queue);
            let deadline = queue.next_deadline();
            tokio::select! {
                biased;
                () = &mut stop => break,
                Some(done) = running.tasks.join_next_with_id() => {
                    self.finish(done, &mut running, &mut queue, &mut failures);
                }
                () = sleep_until(deadline) => queue.fire_due(Instant::now()),
                Some(key) = trigger_rx.recv() => queue.trigger(key),
            }
        }

        tracing::info!(controller = %self.name, in_flight = running.tasks.len(), "controller stopping");
        watchers.shutdown().await;
        while let Some(done) = running.tasks.join_next_with_id().await {
            self.finish(done, &mut running, &mut queue, &mut failures);
            self.publish_gauges(&queue);
        }
        tracing::info!(controller = %self.name, "controller stopped");
    }

    /// Spawns the reconcile of `key` with its newest cached object.
    fn start(&self, running: &mut Running, key: Key, failures: &HashMap<Key, u32>) {
        let obj = self.cache.get(&key);
        let ctx = Context {
            controller: self.name.clone(),
            failures: failures.get(&key).copied().unwrap_or(0),
            backoff: self.backoff,
            cache: self.cache.clone(),
            key: key.clone(),
        };
        let reconciler = self.reconciler.clone();
        let task = running.tasks.spawn(async move {
            let Some(obj) = obj else { return Outcome::Gone };
            match reconciler.reconcile(obj.clone(), &ctx).await {
                Ok(action) => Outcome::Reconciled(action),
                Err(e) => {
                    let action = reconciler.error_policy(&obj, &e, &ctx);
                    tracing::warn!(
                        controller = %ctx.controller, key = %ctx.key, failures = ctx.failures + 1,
                        retry_in = ?action.requeue_after(), error = %ErrorChain(&e), "reconcile failed"
                    );
                    Outcome::Failed(action)
                }
            }
        });
        running.keys.insert(task.id(), key);
    }

    /// Books a finished reconcile: stats, failure count, requeue.
    fn finish(
        &self,
        done: Result<(task::Id, Outcome), JoinError>,
        running: &mut Running,
        queue: &mut WorkQueue,
        failures: &mut HashMap<Key, u32>,
    ) {
        // Reconcile tasks are never aborted, so a join error is a panic.
        let (id, outcome) = done.unwrap_or_else(|e| (e.id(), Outcome::Panicked));
        let Some(key) = running.keys.remove(&id) else {
            return;
        };
        let requeue_after = match outcome {
            Outcome::Gone => {
                failures.remove(&key);
                None
            }
            Outcome::Reconciled(action) => {
                ControllerStats::incr(&self.stats.reconciles_total);
                failures.remove(&key);
                action.requeue_after()
            }
            Outcome::Failed(action) => {
                ControllerStats::incr(&self.stats.reconciles_total);
                ControllerStats::incr(&self.stats.errors_total);
                *failures.entry(key.clone()).or_default() += 1;
                action.requeue_after()
            }
            Outcome::Panicked => {
                ControllerStats::incr(&self.stats.reconciles_total);
                ControllerStats::incr(&self.stats.errors_total);
                let failed = failures.entry(key.clone()).or_default();
                let delay = self.backoff.delay(*failed);
                *failed += 1;
                tracing::error!(controller = %self.name, %key, retry_in = ?delay, "reconcile panicked");
                Some(delay)
            }
        };
        queue.finish(&key, requeue_after.map(|d| Instant::now() + d));
    }

    fn publish_gauges(&self, queue: &WorkQueue) {
        ControllerStats::set(&self.stats.queue_depth, queue.ready_len());
        ControllerStats::set(&self.stats.in_flight, queue.running_len());
        ControllerStats::set(&self.stats.scheduled, queue.scheduled_len());
    }
}

/// Sleeps until `deadline`, forever if there is none.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => pending().await,
    }
}

#[cfg(test)]
mod tests;
