//! Following a job's log stream (a pipeline run's), for any number of viewers: each viewer replays what is
//! stored after its resume point, then follows live lines until the job ends. Lines carry their sequence
//! number, so a viewer that reconnects resumes exactly where it was (SSE `Last-Event-ID`, `?after=`), never
//! with a gap or a repeat.
//!
//! Viewers pull from the store at their own pace, so a slow one costs no memory. One that stops taking data
//! for [`STALL`] is dropped (its last id is its resume point); one that stays behind the live end for
//! [`BEHIND`] while the job runs gets a `cutoff` frame naming its resume point, and the stream ends.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use store::{Key, LogLine, Store};
use tokio::sync::{mpsc, watch};

use controllers::jobs;

/// Lines read from the store at once.
const BATCH: usize = 1000;
/// A viewer that takes nothing for this long is dropped.
pub const STALL: Duration = Duration::from_secs(10);
/// A viewer that stays behind the live end this long (while the job runs) is cut off with a resume point.
pub const BEHIND: Duration = Duration::from_secs(30);
/// An idle stream sends a keepalive this often (SSE comment, WebSocket ping), for proxies.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// What a viewer is sent.
#[derive(Debug)]
pub enum Frame {
    Lines(Vec<LogLine>),
    /// The job ended; its phase and error.
    End(Value),
    /// The viewer fell behind; it should reconnect after this line.
    Cutoff {
        after: u64,
        reason: String,
    },
    Keepalive,
}

/// One log line as every format carries it.
pub fn line_json(l: &LogLine) -> Value {
    json!({"seq": l.seq, "time": l.time, "source": l.source, "text": l.text})
}

/// When a viewer counts as too slow.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Taking nothing for this long.
    pub stall: Duration,
    /// Staying behind the live end this long.
    pub behind: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            stall: STALL,
            behind: BEHIND,
        }
    }
}

/// Starts following the log of the job `key` after line `after`; with `follow`, until the job ends.
pub fn follow(
    store: Store,
    key: Key,
    after: u64,
    follow: bool,
    shutdown: watch::Receiver<bool>,
) -> mpsc::Receiver<Frame> {
    follow_with(store, key, after, follow, shutdown, Limits::default())
}

/// [`follow`] with other limits.
pub fn follow_with(
    store: Store,
    key: Key,
    mut after: u64,
    follow: bool,
    mut shutdown: watch::Receiver<bool>,
    limits: Limits,
) -> mpsc::Receiver<Frame> {
    let (tx, rx) = mpsc::channel(2);
    tokio::spawn(async move {
        let stream = jobs::log_stream_of(&key);
        let mut appends = store.log_appends();
        let mut behind_since: Option<Instant> = None;
        let mut idle_since = Instant::now();
        let send = |tx: &mpsc::Sender<Frame>, f: Frame| {
            let tx = tx.clone();
            async move {
                matches!(
                    tokio::time::timeout(limits.stall, tx.send(f)).await,
                    Ok(Ok(()))
                )
            }
        };
        loop {
            // Read the job's state before the lines: if it had ended, this read sees its last line.
            let end = match store.get(&key).await {
                Ok(r) if jobs::phase(&r).is_final() => Some(json!({
                    "phase": jobs::phase(&r),
                    "error": r.status.get("error").cloned().unwrap_or(Value::Null),
                })),
                Ok(_) => None,
                Err(_) => Some(json!({"phase": "Deleted", "error": "the run is gone"})),
            };
            loop {
                let Ok(batch) = store.read_logs(&stream, after, BATCH).await else {
                    return;
                };
                let full = batch.len() == BATCH;
                if let Some(last) = batch.last() {
                    after = last.seq;
                    idle_since = Instant::now();
                    if !send(&tx, Frame::Lines(batch)).await {
                        return;
                    }
                }
                if !full {
                    behind_since = None;
                    break;
                }
                let since = *behind_since.get_or_insert_with(Instant::now);
                if end.is_none() && follow && since.elapsed() > limits.behind {
                    let reason = format!(
                        "this viewer stayed over {:?} behind the live log; resume after line {after}",
                        limits.behind
                    );
                    let _ = send(&tx, Frame::Cutoff { after, reason }).await;
                    return;
                }
            }
            if !follow {
                return;
            }
            if let Some(end) = end {
                let _ = send(&tx, Frame::End(end)).await;
                return;
            }
            if idle_since.elapsed() >= KEEPALIVE {
                idle_since = Instant::now();
                if !send(&tx, Frame::Keepalive).await {
                    return;
                }
            }
            tokio::select! {
                _ = appends.recv() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.wait_for(|s| *s) => return,
                () = tx.closed() => return,
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::{Kind, Resource};

    async fn running_job(store: &Store) -> Key {
        let run = Resource {
            api_version: model::API_VERSION.into(),
            kind: Kind::PipelineRun.as_str().into(),
            metadata: model::ObjectMeta {
                name: "ci-1".into(),
                organization: Some("acme".into()),
                ..Default::default()
            },
            spec: json!({}),
            status: Value::Null,
        };
        let created = store.create(run).await.unwrap();
        let key = Key::of(&created).unwrap();
        store
            .update_status(&key, json!({"phase": "Running"}), None)
            .await
            .unwrap();
        key
    }

    async fn append(store: &Store, key: &Key, from: u64, to: u64) {
        let lines = (from..=to)
            .map(|i| LogLine::now("step", format!("line {i}")))
            .collect();
        store
            .append_logs(&jobs::log_stream_of(key), lines)
            .await
            .unwrap();
    }

    /// A viewer that stays behind is cut off with the line to resume after, and resuming there gives every
    /// later line once: no gap, no repeat.
    #[tokio::test]
    async fn a_lagging_viewer_is_cut_off_with_a_resume_point_and_loses_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&tmp.path().join("kiln.db"), store::Options::default())
            .await
            .unwrap();
        let key = running_job(&store).await;
        append(&store, &key, 1, 5500).await;
        let (_tx, shutdown) = watch::channel(false);
        let limits = Limits {
            stall: Duration::from_secs(10),
            behind: Duration::from_millis(1),
        };
        let mut frames = follow_with(
            store.clone(),
            key.clone(),
            0,
            true,
            shutdown.clone(),
            limits,
        );
        let mut seen = Vec::new();
        let resume = loop {
            match frames
                .recv()
                .await
                .expect("a cutoff before the stream ends")
            {
                Frame::Lines(lines) => {
                    seen.extend(lines.iter().map(|l| l.seq));
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Frame::Cutoff { after, reason } => {
                    assert!(
                        reason.contains(&format!("resume after line {after}")),
                        "{reason}"
                    );
                    break after;
                }
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(seen.last().copied(), Some(resume));
        assert!(resume < 5500, "cut off only at the end");

        // Resumed with the default limits, then the job ends: the rest, and the end.
        let mut frames = follow(store.clone(), key.clone(), resume, true, shutdown);
        append(&store, &key, 5501, 5600).await;
        store
            .update_status(&key, json!({"phase": "Succeeded"}), None)
            .await
            .unwrap();
        loop {
            match frames.recv().await.expect("an end") {
                Frame::Lines(lines) => seen.extend(lines.iter().map(|l| l.seq)),
                Frame::End(end) => {
                    assert_eq!(end["phase"], "Succeeded");
                    break;
                }
                Frame::Keepalive => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(seen, (1..=5600).collect::<Vec<u64>>());
    }

    /// A viewer that takes nothing is dropped: the follower ends instead of waiting forever.
    #[tokio::test]
    async fn a_stalled_viewer_is_dropped() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&tmp.path().join("kiln.db"), store::Options::default())
            .await
            .unwrap();
        let key = running_job(&store).await;
        append(&store, &key, 1, 5000).await;
        let (_tx, shutdown) = watch::channel(false);
        let limits = Limits {
            stall: Duration::from_millis(50),
            behind: Duration::from_secs(30),
        };
        let mut frames = follow_with(store, key, 0, true, shutdown, limits);
        // Take nothing until the follower gives up; then only what it had queued is left.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut queued = 0;
        while let Some(f) = frames.recv().await {
            assert!(matches!(f, Frame::Lines(_)), "{f:?}");
            queued += 1;
        }
        assert!(queued <= 2, "the follower kept going: {queued} frames");
    }
}
