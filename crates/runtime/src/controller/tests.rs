//! Controller loop tests on tokio's paused clock, against an in-memory [`Source`].
//!
//! With the clock paused, `sleep(d)` in a test lets every task run until all are idle and then jumps the clock
//! forward, so the timings asserted here are exact.

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};
use model::{Kind, ObjectMeta, Resource, API_VERSION};
use serde_json::{json, Value};
use store::{EventType, Key, StoreError, WatchEvent};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;
use tokio::time::{sleep, Instant};

use crate::{
    Action, Backoff, Cache, Context, Controller, EventStream, Listing, Reconciler, Source,
};

const SEC: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------------------------
// An in-memory source: a revisioned map of organizations with an event log that can be compacted.

type Subscriber = mpsc::UnboundedSender<Result<WatchEvent, StoreError>>;

#[derive(Default)]
struct MemState {
    objects: BTreeMap<String, Resource>,
    revision: u64,
    log: Vec<WatchEvent>,
    /// Events up to this revision were compacted away.
    compacted: u64,
    subscribers: Vec<Subscriber>,
    /// While set, events are logged but not delivered to open watches.
    muted: bool,
    /// How many of the next lists fail.
    failing_lists: usize,
    list_times: Vec<Instant>,
    /// The `from_revision` of each watch call.
    watches: Vec<u64>,
}

#[derive(Clone, Default)]
struct MemSource(Arc<Mutex<MemState>>);

fn org(name: &str) -> Resource {
    Resource {
        api_version: API_VERSION.into(),
        kind: Kind::Organization.as_str().into(),
        metadata: ObjectMeta {
            name: name.into(),
            ..ObjectMeta::default()
        },
        spec: Value::Null,
        status: Value::Null,
    }
}

fn key(name: &str) -> Key {
    Key {
        kind: Kind::Organization,
        organization: None,
        project: None,
        name: name.into(),
    }
}

impl MemSource {
    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.0.lock().unwrap()
    }

    /// Creates or replaces an object; returns its new resourceVersion.
    fn put(&self, mut obj: Resource) -> String {
        let mut s = self.state();
        s.revision += 1;
        obj.metadata.resource_version = Some(s.revision.to_string());
        let type_ = if s.objects.contains_key(&obj.metadata.name) {
            EventType::Modified
        } else {
            EventType::Added
        };
        s.objects.insert(obj.metadata.name.clone(), obj.clone());
        let revision = s.revision;
        s.publish(WatchEvent {
            type_,
            revision,
            object: obj,
        });
        revision.to_string()
    }

    fn put_spec(&self, name: &str, spec: Value) -> String {
        self.put(Resource { spec, ..org(name) })
    }

    fn delete(&self, name: &str) {
        let mut s = self.state();
        let Some(object) = s.objects.remove(name) else {
            return;
        };
        s.revision += 1;
        let revision = s.revision;
        s.publish(WatchEvent {
            type_: EventType::Deleted,
            revision,
            object,
        });
    }

    /// Forgets the event log: a watch from any earlier revision is now expired.
    fn compact(&self) {
        let mut s = self.state();
        s.compacted = s.revision;
        s.log.clear();
    }

    /// Ends every open watch with `error`.
    fn break_watches(&self, error: impl Fn() -> StoreError) {
        let mut s = self.state();
        let subscribers: Vec<Subscriber> = s.subscribers.drain(..).collect();
        s.muted = false;
        drop(s);
        for sub in subscribers {
            let _ = sub.send(Err(error()));
        }
    }

    fn expired(&self) -> StoreError {
        let s = self.state();
        StoreError::Expired {
            requested: 0,
            oldest: s.compacted + 1,
        }
    }
}

impl MemState {
    fn publish(&mut self, event: WatchEvent) {
        self.log.push(event.clone());
        if !self.muted {
            self.subscribers
                .retain(|sub| sub.send(Ok(event.clone())).is_ok());
        }
    }
}

impl Source for MemSource {
    fn list(&self) -> BoxFuture<'_, Result<Listing, StoreError>> {
        Box::pin(async move {
            let mut s = self.state();
            s.list_times.push(Instant::now());
            if s.failing_lists > 0 {
                s.failing_lists -= 1;
                return Err(StoreError::Backend("list failed".into()));
            }
            Ok(Listing {
                items: s.objects.values().cloned().collect(),
                revision: s.revision,
            })
        })
    }

    fn watch(&self, from_revision: u64) -> BoxFuture<'_, Result<EventStream, StoreError>> {
        Box::pin(async move {
            let mut s = self.state();
            s.watches.push(from_revision);
            if from_revision < s.compacted {
                return Err(StoreError::Expired {
                    requested: from_revision,
                    oldest: s.compacted + 1,
                });
            }
            let replay: Vec<_> = s
                .log
                .iter()
                .filter(|e| e.revision > from_revision)
                .cloned()
                .map(Ok)
                .collect();
            let (tx, rx) = mpsc::unbounded_channel();
            s.subscribers.push(tx);
            let live = stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            Ok(stream::iter(replay).chain(live).boxed())
        })
    }
}

// ---------------------------------------------------------------------------------------------------------------
// A probe reconciler: records every call, detects overlap, and answers from a script.

#[derive(Debug, thiserror::Error)]
#[error("scripted failure")]
struct Scripted;

#[derive(Debug, Clone, PartialEq)]
struct Call {
    name: String,
    resource_version: Option<String>,
    deleting: bool,
    at: Instant,
    failures: u32,
}

type Script = Box<dyn Fn(&str, usize) -> Result<Action, Scripted> + Send + Sync>;

struct ProbeState {
    calls: Mutex<Vec<Call>>,
    finished: AtomicUsize,
    active: Mutex<HashSet<String>>,
    overlap: AtomicBool,
    concurrent: AtomicUsize,
    max_concurrent: AtomicUsize,
    /// How long each reconcile takes.
    busy: Duration,
    /// Reconciles of this name wait for the notify first.
    gate: Option<(String, Arc<Notify>)>,
    /// The answer to the n-th call (from 0) for a name.
    script: Script,
}

#[derive(Clone)]
struct Probe(Arc<ProbeState>);

impl Probe {
    fn new(
        script: impl Fn(&str, usize) -> Result<Action, Scripted> + Send + Sync + 'static,
    ) -> Self {
        Self::build(Duration::ZERO, None, script)
    }

    fn build(
        busy: Duration,
        gate: Option<(&str, Arc<Notify>)>,
        script: impl Fn(&str, usize) -> Result<Action, Scripted> + Send + Sync + 'static,
    ) -> Self {
        Probe(Arc::new(ProbeState {
            calls: Mutex::default(),
            finished: AtomicUsize::new(0),
            active: Mutex::default(),
            overlap: AtomicBool::new(false),
            concurrent: AtomicUsize::new(0),
            max_concurrent: AtomicUsize::new(0),
            busy,
            gate: gate.map(|(name, n)| (name.to_owned(), n)),
            script: Box::new(script),
        }))
    }

    fn calls(&self) -> Vec<Call> {
        self.0.calls.lock().unwrap().clone()
    }

    fn calls_for(&self, name: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.name == name)
            .collect()
    }

    fn names(&self) -> Vec<String> {
        self.calls().into_iter().map(|c| c.name).collect()
    }
}

impl Reconciler for Probe {
    type Error = Scripted;

    async fn reconcile(&self, obj: Arc<Resource>, ctx: &Context) -> Result<Action, Scripted> {
        let p = &self.0;
        let name = obj.metadata.name.clone();
        assert_eq!(
            ctx.key,
            key(&name),
            "the context names the reconciled object"
        );
        let n = {
            let mut calls = p.calls.lock().unwrap();
            calls.push(Call {
                name: name.clone(),
                resource_version: obj.metadata.resource_version.clone(),
                deleting: obj.metadata.deletion_timestamp.is_some(),
                at: Instant::now(),
                failures: ctx.failures,
            });
            calls.iter().filter(|c| c.name == name).count() - 1
        };
        if !p.active.lock().unwrap().insert(name.clone()) {
            p.overlap.store(true, Ordering::SeqCst);
        }
        let now = p.concurrent.fetch_add(1, Ordering::SeqCst) + 1;
        p.max_concurrent.fetch_max(now, Ordering::SeqCst);

        if let Some((gated, notify)) = &p.gate {
            if *gated == name {
                notify.notified().await;
            }
        }
        sleep(p.busy).await;

        p.concurrent.fetch_sub(1, Ordering::SeqCst);
        p.active.lock().unwrap().remove(&name);
        p.finished.fetch_add(1, Ordering::SeqCst);
        (p.script)(&name, n)
    }
}

fn start<R: Reconciler>(ctrl: Controller<R>) -> (watch::Sender<bool>, JoinHandle<()>) {
    let (stop_tx, stop_rx) = watch::channel(false);
    (stop_tx, tokio::spawn(ctrl.run(stop_rx)))
}

fn ok_await(_: &str, _: usize) -> Result<Action, Scripted> {
    Ok(Action::await_change())
}

// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn ten_events_for_a_queued_object_give_one_reconcile_of_the_latest_version() {
    let source = MemSource::default();
    source.put(org("blocker"));
    let gate = Arc::new(Notify::new());
    let probe = Probe::build(Duration::ZERO, Some(("blocker", gate.clone())), ok_await);
    let ctrl = Controller::new("orgs", source.clone(), probe.clone()).concurrency(1);
    let stats = ctrl.stats();
    let (_stop, _task) = start(ctrl);
    sleep(SEC).await;
    assert_eq!(
        probe.names(),
        ["blocker"],
        "the only worker is busy with the blocker"
    );

    let mut last = String::new();
    for i in 0..10 {
        last = source.put_spec("a", json!({ "i": i }));
    }
    sleep(SEC).await;
    assert_eq!(
        stats.snapshot().queue_depth,
        1,
        "ten events, one queued key"
    );

    gate.notify_one();
    sleep(SEC).await;
    let calls = probe.calls_for("a");
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        calls[0].resource_version.as_deref(),
        Some(last.as_str()),
        "level-triggered: the newest object"
    );
    assert_eq!(stats.snapshot().queue_depth, 0);
    assert_eq!(stats.snapshot().reconciles_total, 2);
}

#[tokio::test(start_paused = true)]
async fn an_object_is_never_reconciled_twice_at_once_and_a_change_meanwhile_runs_after() {
    let source = MemSource::default();
    source.put(org("a"));
    let probe = Probe::build(10 * SEC, None, ok_await);
    let (_stop, _task) =
        start(Controller::new("orgs", source.clone(), probe.clone()).concurrency(4));
    sleep(SEC).await;
    let mut last = String::new();
    for i in 0..5 {
        last = source.put_spec("a", json!({ "i": i }));
        sleep(SEC).await;
    }
    sleep(30 * SEC).await;

    assert!(
        !probe.0.overlap.load(Ordering::SeqCst),
        "two reconciles of one object overlapped"
    );
    let calls = probe.calls_for("a");
    assert_eq!(
        calls.len(),
        2,
        "one reconcile, then one for all changes made during it: {calls:?}"
    );
    assert_eq!(
        calls[1].at - calls[0].at,
        10 * SEC,
        "the second starts when the first ends"
    );
    assert_eq!(calls[1].resource_version.as_deref(), Some(last.as_str()));
}

#[tokio::test(start_paused = true)]
async fn at_most_n_reconciles_run_at_once() {
    let source = MemSource::default();
    for i in 0..10 {
        source.put(org(&format!("o{i}")));
    }
    let probe = Probe::build(10 * SEC, None, ok_await);
    let (_stop, _task) =
        start(Controller::new("orgs", source.clone(), probe.clone()).concurrency(3));
    sleep(100 * SEC).await;

    let calls = probe.calls();
    assert_eq!(calls.len(), 10);
    assert_eq!(probe.0.max_concurrent.load(Ordering::SeqCst), 3);
    let first = calls[0].at;
    let mut offsets: Vec<u64> = calls.iter().map(|c| (c.at - first).as_secs()).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, [0, 0, 0, 10, 10, 10, 20, 20, 20, 30]);
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_up_to_the_cap_and_a_success_resets_it() {
    let source = MemSource::default();
    source.put(org("a"));
    let probe = Probe::new(|_, n| match n {
        0..=5 | 7 | 8 => Err(Scripted),
        6 => Ok(Action::requeue(100 * SEC)),
        _ => Ok(Action::await_change()),
    });
    let ctrl = Controller::new("orgs", source.clone(), probe.clone()).backoff(Backoff {
        base: SEC,
        cap: 8 * SEC,
    });
    let stats = ctrl.stats();
    let (_stop, _task) = start(ctrl);
    sleep(1000 * SEC).await;

    let calls = probe.calls();
    let gaps: Vec<u64> = calls
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_millis() as u64)
        .collect();
    assert_eq!(
        gaps,
        [1000, 2000, 4000, 8000, 8000, 8000, 100_000, 1000, 2000]
    );
    let failures: Vec<u32> = calls.iter().map(|c| c.failures).collect();
    assert_eq!(failures, [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]);
    let s = stats.snapshot();
    assert_eq!(
        (s.reconciles_total, s.errors_total, s.scheduled),
        (10, 8, 0)
    );
}

#[tokio::test(start_paused = true)]
async fn requeue_after_reconciles_again_on_time() {
    let source = MemSource::default();
    source.put(org("a"));
    let probe = Probe::new(|_, _| Ok(Action::requeue(30 * SEC)));
    let ctrl = Controller::new("orgs", source.clone(), probe.clone());
    let stats = ctrl.stats();
    let (_stop, _task) = start(ctrl);
    sleep(95 * SEC).await;

    let calls = probe.calls();
    let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert_eq!(gaps, [30 * SEC, 30 * SEC, 30 * SEC]);
    assert_eq!(stats.snapshot().scheduled, 1);

    // A change does not wait for the timer.
    source.put_spec("a", json!({ "x": 1 }));
    sleep(SEC).await;
    assert_eq!(probe.calls().len(), 5);
    assert_eq!(probe.calls()[4].at - calls[3].at, 5 * SEC);
}

#[tokio::test(start_paused = true)]
async fn await_change_waits_for_a_change() {
    let source = MemSource::default();
    source.put(org("a"));
    let probe = Probe::new(ok_await);
    let (_stop, _task) = start(Controller::new("orgs", source.clone(), probe.clone()));
    sleep(3600 * SEC).await;
    assert_eq!(probe.names(), ["a"]);

    source.put_spec("a", json!({ "x": 1 }));
    sleep(SEC).await;
    assert_eq!(probe.names(), ["a", "a"]);
}

#[tokio::test(start_paused = true)]
async fn deleted_objects_are_not_reconciled_but_finalizing_ones_are() {
    let source = MemSource::default();
    source.put(org("blocker"));
    let gate = Arc::new(Notify::new());
    let probe = Probe::build(Duration::ZERO, Some(("blocker", gate.clone())), ok_await);
    let (_stop, _task) = start(Controller::new("orgs", source.clone(), probe.clone()));
    sleep(SEC).await;

    source.put(org("gone"));
    let mut finalizing = org("finalizing");
    finalizing.metadata.finalizers = vec!["kiln.dev/x".into()];
    finalizing.metadata.deletion_timestamp = Some("2024-01-01T00:00:00Z".into());
    source.put(finalizing);
    sleep(SEC).await;
    source.delete("gone");
    sleep(SEC).await;
    gate.notify_one();
    sleep(SEC).await;

    assert_eq!(probe.names(), ["blocker", "finalizing"]);
    assert!(probe.calls()[1].deleting);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_reconcile_is_retried_with_backoff() {
    let source = MemSource::default();
    source.put(org("a"));
    let probe = Probe::new(|_, n| {
        if n == 0 {
            panic!("reconciler bug")
        } else {
            Ok(Action::await_change())
        }
    });
    let ctrl = Controller::new("orgs", source.clone(), probe.clone()).backoff(Backoff {
        base: 3 * SEC,
        cap: 60 * SEC,
    });
    let stats = ctrl.stats();
    let (_stop, task) = start(ctrl);
    sleep(10 * SEC).await;

    let calls = probe.calls();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[1].at - calls[0].at, 3 * SEC);
    assert_eq!(calls[1].failures, 1);
    assert_eq!(stats.snapshot().errors_total, 1);
    assert!(!task.is_finished());
}

#[tokio::test(start_paused = true)]
async fn an_expired_watch_relists_and_watches_from_the_new_revision() {
    let source = MemSource::default();
    source.put(org("a"));
    source.put(org("b"));
    let probe = Probe::new(ok_await);
    let ctrl = Controller::new("orgs", source.clone(), probe.clone());
    let (stats, cache) = (ctrl.stats(), ctrl.cache());
    let (_stop, _task) = start(ctrl);
    sleep(SEC).await;
    assert_eq!(probe.names(), ["a", "b"]);

    // Changes the watch never delivers, then the log is compacted and the watch expires.
    source.state().muted = true;
    source.put(org("c"));
    source.delete("a");
    source.compact();
    let relist_revision = source.state().revision;
    source.break_watches(|| source.expired());
    sleep(SEC).await;

    {
        let s = source.state();
        assert_eq!(s.list_times.len(), 2, "re-listed once");
        assert_eq!(
            s.watches,
            [2, relist_revision],
            "watched from the new list's revision"
        );
    }
    // A re-list queues every listed object (b again, and the missed c); the missed deletion of a is not reconciled.
    assert_eq!(probe.names(), ["a", "b", "b", "c"]);
    assert!(
        cache.get(&key("a")).is_none(),
        "the missed deletion left the cache"
    );
    assert_eq!(stats.snapshot().relists_total, 1);

    source.put(org("d"));
    sleep(SEC).await;
    assert_eq!(
        probe.names(),
        ["a", "b", "b", "c", "d"],
        "the new watch delivers"
    );
}

#[tokio::test(start_paused = true)]
async fn other_watch_errors_rewatch_from_the_last_revision_after_backoff() {
    let source = MemSource::default();
    source.put(org("a"));
    source.state().failing_lists = 2;
    let probe = Probe::new(ok_await);
    let ctrl = Controller::new("orgs", source.clone(), probe.clone()).watch_backoff(Backoff {
        base: 2 * SEC,
        cap: 60 * SEC,
    });
    let stats = ctrl.stats();
    let (_stop, _task) = start(ctrl);
    sleep(10 * SEC).await;
    {
        let s = source.state();
        let gaps: Vec<Duration> = s.list_times.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            gaps,
            [2 * SEC, 4 * SEC],
            "failed lists are retried with backoff"
        );
    }
    source.put(org("b"));
    sleep(SEC).await;
    let last_revision = source.state().revision;

    source.break_watches(|| StoreError::Backend("connection reset".into()));
    sleep(SEC).await;
    source.put(org("late"));
    assert_eq!(
        source.state().watches,
        [1],
        "not yet re-watched: backing off"
    );
    sleep(2 * SEC).await;

    let s = source.state();
    assert_eq!(s.list_times.len(), 3, "no re-list for a broken stream");
    assert_eq!(s.watches, [1, last_revision]);
    assert_eq!(
        probe.names(),
        ["a", "b", "late"],
        "the change made while disconnected is replayed"
    );
    assert_eq!(stats.snapshot().watch_errors_total, 3);
}

#[tokio::test(start_paused = true)]
async fn a_related_kind_queues_the_objects_its_mapper_names() {
    let primary = MemSource::default();
    primary.put(org("a"));
    primary.put(org("b"));
    let related = MemSource::default();
    let probe = Probe::new(ok_await);
    let ctrl = Controller::new("orgs", primary.clone(), probe.clone()).watches(
        related.clone(),
        |obj, cache: &Cache| {
            let target = obj.spec.get("target").and_then(Value::as_str).map(key);
            target
                .into_iter()
                .filter(|k| cache.get(k).is_some())
                .collect()
        },
    );
    let (_stop, _task) = start(ctrl);
    sleep(SEC).await;
    assert_eq!(probe.names(), ["a", "b"]);

    related.put_spec("x", json!({ "target": "b" }));
    related.put_spec("y", json!({ "target": "nobody" }));
    sleep(SEC).await;
    assert_eq!(probe.names(), ["a", "b", "b"]);
    related.delete("x");
    sleep(SEC).await;
    assert_eq!(
        probe.names(),
        ["a", "b", "b", "b"],
        "a deletion of a related object counts too"
    );
}

#[tokio::test(start_paused = true)]
async fn triggered_keys_are_queued_like_changes() {
    let source = MemSource::default();
    source.put(org("a"));
    source.put(org("b"));
    let gate = Arc::new(Notify::new());
    let probe = Probe::build(Duration::ZERO, Some(("a", gate.clone())), ok_await);
    let (tx, rx) = mpsc::unbounded_channel::<Key>();
    let keys = stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|k| (k, rx)) });
    let ctrl = Controller::new("orgs", source.clone(), probe.clone())
        .concurrency(2)
        .triggers(keys);
    let (_stop, _task) = start(ctrl);
    sleep(SEC).await;
    assert_eq!(probe.names(), ["a", "b"], "a is still running, gated");

    // A trigger for an idle object reconciles it at once, with no store change.
    tx.send(key("b")).unwrap();
    sleep(SEC).await;
    assert_eq!(probe.calls_for("b").len(), 2);

    // Triggers for a running object wait for its reconcile, then give one more (never two at once).
    for _ in 0..5 {
        tx.send(key("a")).unwrap();
    }
    sleep(SEC).await;
    assert_eq!(probe.calls_for("a").len(), 1);
    gate.notify_one();
    sleep(SEC).await;
    assert!(!probe.0.overlap.load(Ordering::SeqCst));
    assert_eq!(
        probe.calls_for("a").len(),
        2,
        "five triggers meanwhile, one reconcile after"
    );
    gate.notify_one();

    // A key that is not in the cache is not reconciled; a deleted object neither.
    tx.send(key("nobody")).unwrap();
    source.delete("b");
    sleep(SEC).await;
    tx.send(key("b")).unwrap();
    sleep(SEC).await;
    assert_eq!(probe.names().len(), 4, "{:?}", probe.names());

    // The end of the stream is not the end of the controller.
    drop(tx);
    sleep(SEC).await;
    source.put_spec("a", json!({ "i": 1 }));
    sleep(SEC).await;
    assert_eq!(probe.calls_for("a").len(), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_taking_work_and_waits_for_reconciles_in_flight() {
    let source = MemSource::default();
    source.put(org("a"));
    let probe = Probe::build(5 * SEC, None, ok_await);
    let (stop, task) = start(Controller::new("orgs", source.clone(), probe.clone()).concurrency(2));
    sleep(SEC).await;
    assert_eq!(probe.0.concurrent.load(Ordering::SeqCst), 1);

    let asked = Instant::now();
    stop.send(true).unwrap();
    source.put(org("b"));
    task.await.unwrap();
    assert_eq!(
        asked.elapsed(),
        4 * SEC,
        "returned when the reconcile in flight ended"
    );
    assert_eq!(
        probe.0.finished.load(Ordering::SeqCst),
        1,
        "the reconcile in flight completed"
    );
    assert_eq!(probe.names(), ["a"], "no new work after shutdown");
}
