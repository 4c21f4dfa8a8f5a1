//! Watch streams. A watcher subscribes to the in-process broadcast of committed events first, then replays the
//! event log from its start revision, then follows the broadcast, skipping revisions it already delivered.
//! Every revision is accounted for: a gap in the broadcast (the watcher lagged, or a batch arrived out of
//! reach) is re-read from the event log, and if that part of the log was compacted the stream ends with
//! [`StoreError::Expired`].

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt};
use model::Kind;
use tokio::sync::broadcast;

use crate::{Result, Store, StoreError, WatchEvent, WatchQuery};

/// Events read from the log per catch-up step.
const CATCH_UP_BATCH: usize = 500;

/// Which events a watcher wants.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    pub kind: Option<Kind>,
    pub organization: Option<String>,
    pub project: Option<String>,
}

impl Filter {
    pub fn of(q: &WatchQuery) -> Filter {
        Filter {
            kind: q.kind,
            organization: q.organization.clone(),
            project: q.project.clone(),
        }
    }

    pub fn matches(&self, ev: &WatchEvent) -> bool {
        let m = &ev.object.metadata;
        self.kind.is_none_or(|k| ev.object.kind == k.as_str())
            && self
                .organization
                .as_ref()
                .is_none_or(|o| m.organization.as_ref() == Some(o))
            && self
                .project
                .as_ref()
                .is_none_or(|p| m.project.as_ref() == Some(p))
    }
}

/// One read of the event log: the matching events after a revision, and how far the read got.
#[derive(Debug)]
pub(crate) struct EventPage {
    pub events: Vec<WatchEvent>,
    /// Every revision up to this one has been considered.
    pub through: u64,
    /// True when `through` is the revision current at the time of the read.
    pub complete: bool,
}

/// The events committed together, as published to in-process watchers.
pub(crate) type Batch = Arc<Vec<WatchEvent>>;

struct State {
    store: Store,
    filter: Filter,
    rx: broadcast::Receiver<Batch>,
    /// Every revision up to `seen` has been delivered (if it matched) or skipped.
    seen: u64,
    buf: VecDeque<WatchEvent>,
    catching_up: bool,
    done: bool,
}

impl State {
    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.buf.pop_front() {
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            if self.catching_up {
                match self
                    .store
                    .read_events(self.seen, &self.filter, CATCH_UP_BATCH)
                    .await
                {
                    Ok(page) => {
                        self.buf.extend(page.events);
                        self.seen = self.seen.max(page.through);
                        self.catching_up = !page.complete;
                    }
                    Err(e) => {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                continue;
            }
            match self.rx.recv().await {
                Ok(batch) => {
                    for ev in batch.iter() {
                        if ev.revision <= self.seen {
                            continue;
                        }
                        if ev.revision > self.seen + 1 {
                            // Revisions between `seen` and this one never reached us: read them from the log
                            // (which also covers the rest of this batch).
                            self.catching_up = true;
                            break;
                        }
                        self.seen = ev.revision;
                        if self.filter.matches(ev) {
                            self.buf.push_back(ev.clone());
                        }
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => {
                    self.done = true;
                    return Some(Err(StoreError::Backend("the store shut down".into())));
                }
            }
        }
    }
}

/// A stream of [`WatchEvent`]s in revision order. Ends only after yielding an error (e.g. `Expired` when it
/// fell so far behind that the events it missed were compacted).
pub struct Watch {
    inner: BoxStream<'static, Result<WatchEvent>>,
}

impl Watch {
    /// The next event, or `None` after the stream ended.
    pub async fn next_event(&mut self) -> Option<Result<WatchEvent>> {
        self.inner.next().await
    }
}

impl Stream for Watch {
    type Item = Result<WatchEvent>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watch")
    }
}

/// Starts a watch: subscribe, then check the start revision against the compacted log.
pub(crate) async fn start(store: &Store, q: &WatchQuery) -> Result<Watch> {
    let rx = store.subscribe();
    let (seen, catching_up) = match q.from_revision {
        Some(from) => {
            let compacted = store.compacted_through().await?;
            if from < compacted {
                return Err(StoreError::Expired {
                    requested: from,
                    oldest: compacted + 1,
                });
            }
            (from, true)
        }
        None => (store.revision().await?, false),
    };
    let state = State {
        store: store.clone(),
        filter: Filter::of(q),
        rx,
        seen,
        buf: VecDeque::new(),
        catching_up,
        done: false,
    };
    let inner =
        futures_util::stream::unfold(
            state,
            |mut st| async move { st.next().await.map(|ev| (ev, st)) },
        )
        .boxed();
    Ok(Watch { inner })
}
