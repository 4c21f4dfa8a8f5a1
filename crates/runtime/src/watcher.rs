//! The list-then-watch loop behind every controller input: lists, watches from the list's revision, re-lists
//! when the watch expires, and retries other failures with backoff. What it sees goes to a [`Sink`].

use std::sync::Arc;

use futures_util::StreamExt;
use model::Resource;
use store::{Key, StoreError, WatchEvent};
use tokio::sync::mpsc;

use crate::controller::Mapper;
use crate::{Backoff, Cache, ControllerStats, ErrorChain, Source};

/// What a watcher does with what it sees.
pub(crate) enum Sink {
    /// The controller's own kind: keep the cache and queue every changed key.
    Primary { cache: Cache },
    /// A related kind: queue the primary keys the mapper names.
    Secondary { mapper: Mapper, primary: Cache },
}

impl Sink {
    fn keys_of_listing(&self, items: Vec<Resource>) -> Vec<Key> {
        match self {
            Sink::Primary { cache } => cache.replace(items),
            Sink::Secondary { mapper, primary } => {
                items.iter().flat_map(|r| mapper(r, primary)).collect()
            }
        }
    }

    fn keys_of_event(&self, event: WatchEvent) -> Vec<Key> {
        match self {
            Sink::Primary { cache } => cache.apply(event).into_iter().collect(),
            Sink::Secondary { mapper, primary } => mapper(&event.object, primary),
        }
    }
}

/// Runs until the queue side hangs up (the controller stopped).
pub(crate) async fn run(
    source: Arc<dyn Source>,
    sink: Sink,
    trigger_tx: mpsc::Sender<Key>,
    backoff: Backoff,
    stats: Arc<ControllerStats>,
    input: &'static str,
) {
    let controller = stats.name.clone();
    let mut failures = 0u32;
    let mut listed_once = false;
    let mut relist = true;
    let mut revision = 0;
    loop {
        if failures > 0 {
            tokio::time::sleep(backoff.delay(failures - 1)).await;
        }
        if relist {
            if listed_once {
                ControllerStats::incr(&stats.relists_total);
            }
            listed_once = true;
            match source.list().await {
                Ok(listing) => {
                    tracing::debug!(%controller, input, revision = listing.revision, items = listing.items.len(), "listed");
                    revision = listing.revision;
                    relist = false;
                    for key in sink.keys_of_listing(listing.items) {
                        if trigger_tx.send(key).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(%controller, input, error = %ErrorChain(&e), "list failed");
                    ControllerStats::incr(&stats.watch_errors_total);
                    failures += 1;
                    continue;
                }
            }
        }
        let mut events = match source.watch(revision).await {
            Ok(events) => {
                failures = 0;
                events
            }
            Err(e) => {
                tracing::warn!(%controller, input, revision, error = %ErrorChain(&e), "watch failed");
                ControllerStats::incr(&stats.watch_errors_total);
                relist = matches!(e, StoreError::Expired { .. });
                failures += 1;
                continue;
            }
        };
        loop {
            match events.next().await {
                Some(Ok(event)) => {
                    revision = event.revision;
                    for key in sink.keys_of_event(event) {
                        if trigger_tx.send(key).await.is_err() {
                            return;
                        }
                    }
                }
                Some(Err(e @ StoreError::Expired { .. })) => {
                    // The usual way a long quiet watch ends; re-list at once.
                    tracing::info!(%controller, input, revision, error = %e, "watch expired, re-listing");
                    relist = true;
                    break;
                }
                Some(Err(e)) => {
                    tracing::warn!(%controller, input, revision, error = %ErrorChain(&e), "watch broke");
                    ControllerStats::incr(&stats.watch_errors_total);
                    failures += 1;
                    break;
                }
                None => {
                    tracing::debug!(%controller, input, revision, "watch ended");
                    ControllerStats::incr(&stats.watch_errors_total);
                    failures += 1;
                    break;
                }
            }
        }
    }
}
