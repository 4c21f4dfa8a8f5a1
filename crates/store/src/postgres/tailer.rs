//! Publishing committed events to this process's watchers, in revision order, whoever committed them.
//!
//! Local commits hand their events to the tailer directly; commits of other processes on the same database
//! announce themselves with `NOTIFY kiln_events, '<revision>'`, which a dedicated LISTEN connection turns into
//! a wake-up. The tailer publishes every contiguous run of revisions it holds and reads whatever is missing from
//! the event log. Because revisions are allocated under a row lock held until commit, once revision N is
//! visible every revision below it is too, so reading "everything after the last published" never skips.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::poll_fn;
use tokio::sync::{broadcast, mpsc, oneshot, Notify};
use tokio_postgres::{AsyncMessage, Config, NoTls};

use super::pool::{pg_err, Pool};
use super::row_event;
use crate::watch::Batch;
use crate::{Result, WatchEvent};

/// The LISTEN/NOTIFY channel.
pub(crate) const CHANNEL: &str = "kiln_events";
/// Events read from the log per query.
const READ_BATCH: i64 = 1000;
/// A safety net: look at the log this often even without a wake-up.
const POLL: Duration = Duration::from_secs(5);

/// The newest revision another process announced (or a request to look anyway), plus a wake-up.
#[derive(Default)]
struct Wake {
    announced: AtomicU64,
    look: AtomicBool,
    notify: Notify,
}

impl Wake {
    fn announce(&self, rev: Option<u64>) {
        match rev {
            Some(rev) => {
                self.announced.fetch_max(rev, Ordering::SeqCst);
            }
            None => self.look.store(true, Ordering::SeqCst),
        }
        self.notify.notify_one();
    }
}

/// Starts the tailer and its listener; both stop when `local_rx`'s sender is dropped.
pub(crate) fn spawn(
    pool: Arc<Pool>,
    published: u64,
    local_rx: mpsc::UnboundedReceiver<Vec<WatchEvent>>,
    events_tx: broadcast::Sender<Batch>,
) {
    let wake = Arc::new(Wake::default());
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    tokio::spawn(listen(pool.config.clone(), wake.clone(), stop_rx));
    tokio::spawn(async move {
        tail(pool, published, local_rx, wake, events_tx).await;
        drop(stop_tx);
    });
}

async fn tail(
    pool: Arc<Pool>,
    mut last: u64,
    mut local_rx: mpsc::UnboundedReceiver<Vec<WatchEvent>>,
    wake: Arc<Wake>,
    events_tx: broadcast::Sender<Batch>,
) {
    let mut pending: BTreeMap<u64, WatchEvent> = BTreeMap::new();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut query = false;
        tokio::select! {
            local = local_rx.recv() => match local {
                Some(evs) => pending.extend(evs.into_iter().map(|e| (e.revision, e))),
                None => return,
            },
            _ = wake.notify.notified() => {}
            _ = poll.tick() => query = true,
        }
        while let Ok(evs) = local_rx.try_recv() {
            pending.extend(evs.into_iter().map(|e| (e.revision, e)));
        }
        if wake.look.swap(false, Ordering::SeqCst) || wake.announced.load(Ordering::SeqCst) > last {
            query = true;
        }
        let mut batch = Vec::new();
        take_contiguous(&mut pending, &mut last, &mut batch);
        if query || !pending.is_empty() {
            match read_after(&pool, last).await {
                Ok(events) => {
                    for e in events {
                        if e.revision > last {
                            last = e.revision;
                            batch.push(e);
                        }
                    }
                    take_contiguous(&mut pending, &mut last, &mut batch);
                }
                // The poll tick retries; watchers wait rather than see a gap.
                Err(e) => tracing::warn!(error = %e, "reading the event log failed"),
            }
        }
        if !batch.is_empty() {
            let _ = events_tx.send(Arc::new(batch));
        }
    }
}

/// Moves the run of revisions `last + 1, last + 2, ...` from `pending` into `batch`, dropping stale ones.
fn take_contiguous(
    pending: &mut BTreeMap<u64, WatchEvent>,
    last: &mut u64,
    batch: &mut Vec<WatchEvent>,
) {
    while let Some(entry) = pending.first_entry() {
        let rev = *entry.key();
        if rev <= *last {
            entry.remove();
        } else if rev == *last + 1 {
            batch.push(entry.remove());
            *last = rev;
        } else {
            break;
        }
    }
}

/// Every event after `last`, in revision order.
async fn read_after(pool: &Pool, mut last: u64) -> Result<Vec<WatchEvent>> {
    let c = pool.get().await?;
    let mut out = Vec::new();
    loop {
        let after = i64::try_from(last).unwrap_or(i64::MAX);
        let rows = c
            .query(
                "SELECT rev, type, body FROM kiln_events WHERE rev > $1 ORDER BY rev LIMIT $2",
                &[&after, &READ_BATCH],
            )
            .await
            .map_err(pg_err)?;
        let n = rows.len();
        for r in rows {
            let ev = row_event(&r)?;
            last = ev.revision;
            out.push(ev);
        }
        if (n as i64) < READ_BATCH {
            return Ok(out);
        }
    }
}

/// Holds a LISTEN connection open (reconnecting after failures) and turns notifications into wake-ups.
async fn listen(config: Config, wake: Arc<Wake>, mut stop_rx: oneshot::Receiver<()>) {
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let w = wake.clone();
                let mut driver = tokio::spawn(async move {
                    loop {
                        match poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                w.announce(n.payload().parse().ok());
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "postgres LISTEN connection failed");
                                return;
                            }
                            None => return,
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        // Anything committed while we were not listening is read now.
                        wake.announce(None);
                        tokio::select! {
                            _ = &mut driver => {}
                            _ = &mut stop_rx => {
                                driver.abort();
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %pg_err(e), "postgres LISTEN failed");
                        driver.abort();
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %pg_err(e), "cannot open the postgres LISTEN connection")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = &mut stop_rx => return,
        }
    }
}
