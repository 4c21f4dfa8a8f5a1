//! The work queue: de-duplicates keys, remembers which keys are being reconciled, and holds requeue timers.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

use store::Key;
use tokio::time::Instant;

/// Keys waiting to be reconciled. A key is in at most one of three places: `ready` (waiting for a worker),
/// `running` (being reconciled; a change meanwhile marks it `dirty`), or `timers` (waiting for its time).
#[derive(Debug, Default)]
pub(crate) struct WorkQueue {
    ready: VecDeque<Key>,
    queued: HashSet<Key>,
    running: HashSet<Key>,
    dirty: HashSet<Key>,
    timers: BTreeMap<(Instant, u64), Key>,
    scheduled: HashMap<Key, (Instant, u64)>,
    seq: u64,
}

impl WorkQueue {
    /// Asks for `key` to be reconciled as soon as possible. A key already waiting is not queued twice; a key
    /// being reconciled is queued again once that reconcile finished; a pending timer is superseded.
    pub(crate) fn trigger(&mut self, key: Key) {
        if self.running.contains(&key) {
            self.dirty.insert(key);
            return;
        }
        self.unschedule(&key);
        if self.queued.insert(key.clone()) {
            self.ready.push_back(key);
        }
    }

    /// Takes the next key to reconcile and marks it running.
    pub(crate) fn pop(&mut self) -> Option<Key> {
        let key = self.ready.pop_front()?;
        self.queued.remove(&key);
        self.running.insert(key.clone());
        Some(key)
    }

    /// Marks a reconcile of `key` finished. If the key changed meanwhile it is queued at once; otherwise it
    /// waits for `requeue_at`, if given.
    pub(crate) fn finish(&mut self, key: &Key, requeue_at: Option<Instant>) {
        self.running.remove(key);
        if self.dirty.remove(key) {
            self.trigger(key.clone());
        } else if let Some(at) = requeue_at {
            self.unschedule(key);
            self.seq += 1;
            self.timers.insert((at, self.seq), key.clone());
            self.scheduled.insert(key.clone(), (at, self.seq));
        }
    }

    /// When the earliest timer is due.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    /// Queues every key whose timer is due at `now`.
    pub(crate) fn fire_due(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            self.scheduled.remove(&key);
            self.trigger(key);
        }
    }

    /// Keys waiting for a worker.
    pub(crate) fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Keys being reconciled.
    pub(crate) fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Keys waiting for a timer.
    pub(crate) fn scheduled_len(&self) -> usize {
        self.scheduled.len()
    }

    fn unschedule(&mut self, key: &Key) {
        if let Some(slot) = self.scheduled.remove(key) {
            self.timers.remove(&slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use model::Kind;

    use super::*;

    fn key(name: &str) -> Key {
        Key {
            kind: Kind::Organization,
            organization: None,
            project: None,
            name: name.into(),
        }
    }

    #[test]
    fn a_queued_key_is_queued_once() {
        let mut q = WorkQueue::default();
        for _ in 0..10 {
            q.trigger(key("a"));
        }
        q.trigger(key("b"));
        assert_eq!(q.ready_len(), 2);
        assert_eq!(q.pop(), Some(key("a")));
        assert_eq!(q.pop(), Some(key("b")));
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_running_key_is_requeued_only_after_it_finishes() {
        let mut q = WorkQueue::default();
        q.trigger(key("a"));
        let a = q.pop().unwrap();
        q.trigger(key("a"));
        q.trigger(key("a"));
        assert_eq!(q.pop(), None, "must not hand out a key that is running");
        q.finish(&a, None);
        assert_eq!(q.pop(), Some(key("a")));
        q.finish(&a, None);
        assert_eq!(q.pop(), None);
    }

    #[test]
    fn a_change_during_the_reconcile_beats_its_requeue_timer() {
        let mut q = WorkQueue::default();
        let now = Instant::now();
        q.trigger(key("a"));
        let a = q.pop().unwrap();
        q.trigger(key("a"));
        q.finish(&a, Some(now + Duration::from_secs(60)));
        assert_eq!(q.next_deadline(), None);
        assert_eq!(q.pop(), Some(key("a")));
    }

    #[test]
    fn timers_fire_in_order_and_a_trigger_supersedes_them() {
        let mut q = WorkQueue::default();
        let now = Instant::now();
        for (name, secs) in [("a", 3), ("b", 1), ("c", 2)] {
            q.trigger(key(name));
            let k = q.pop().unwrap();
            q.finish(&k, Some(now + Duration::from_secs(secs)));
        }
        assert_eq!(q.scheduled_len(), 3);
        assert_eq!(q.next_deadline(), Some(now + Duration::from_secs(1)));
        q.trigger(key("c"));
        assert_eq!(q.scheduled_len(), 2);
        assert_eq!(q.pop(), Some(key("c")));
        q.fire_due(now + Duration::from_secs(1));
        assert_eq!(q.pop(), Some(key("b")));
        assert_eq!(q.pop(), None);
        q.fire_due(now + Duration::from_secs(5));
        assert_eq!(q.pop(), Some(key("a")));
        assert_eq!(q.next_deadline(), None);
    }
}
