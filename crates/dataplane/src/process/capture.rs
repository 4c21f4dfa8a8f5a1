//! Log capture. A process writes its stdout and stderr straight into two files of its own (so it survives the
//! server going away); a [`Capture`] tails them, stamps each complete line with the time it was read, appends it
//! to the replica's JSON-lines log ([`LogSink`]) and broadcasts it to followers. How far the raw files were read
//! is kept in a `.pos` file, so a driver that adopts the process after a restart carries on where the previous
//! one stopped (lines written while no driver ran are stamped when they are read).
//!
//! Sizes stay bounded: the JSON log is cut in two halves (`.log.1` holds the previous one) and a raw file that
//! was read to its end is truncated once it passes [`RAW_CAP`] (the process appends, so it keeps writing at the new
//! end; a line written between the last read and the truncation would be lost, a window of microseconds once per
//! megabyte).

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::broadcast;

use crate::{LogLine, LogOptions};

/// A raw stdout/stderr file is truncated after being read to its end once it is this large.
pub(crate) const RAW_CAP: u64 = 1 << 20;
/// Lines kept for [`crate::ReplicaStatus::last_logs`].
pub(crate) const LAST_LINES: usize = 20;
/// A line longer than this is cut into pieces.
const MAX_LINE: usize = 16 * 1024;
/// Bytes read from one raw file in one go.
const READ_CHUNK: u64 = 256 * 1024;

/// The JSON-lines log of one replica index (all its processes, across restarts and releases), and the
/// workload's broadcast of new lines. Writing a batch and broadcasting it happen under one lock, which
/// [`LogSink::lock`] hands to readers: replaying the file and subscribing under it yields no gap and no
/// duplicate.
pub(crate) struct LogSink {
    path: PathBuf,
    cap: u64,
    state: tokio::sync::Mutex<SinkFile>,
    tx: broadcast::Sender<LogLine>,
}

#[derive(Default)]
struct SinkFile {
    file: Option<std::fs::File>,
    size: u64,
}

impl LogSink {
    pub fn new(path: PathBuf, cap: u64, tx: broadcast::Sender<LogLine>) -> LogSink {
        LogSink {
            path,
            cap: cap.max(1024),
            state: tokio::sync::Mutex::new(SinkFile::default()),
            tx,
        }
    }

    pub async fn write(&self, lines: &[LogLine]) {
        if lines.is_empty() {
            return;
        }
        let mut state = self.state.lock().await;
        let mut buf = Vec::new();
        for line in lines {
            if serde_json::to_writer(&mut buf, line).is_ok() {
                buf.push(b'\n');
            }
        }
        if let Err(e) = self.append(&mut state, &buf) {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write a replica log");
        }
        for line in lines {
            let _ = self.tx.send(line.clone());
        }
    }

    /// Small appends to a local file: done inline rather than on the blocking pool.
    fn append(&self, state: &mut SinkFile, buf: &[u8]) -> std::io::Result<()> {
        if state.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            state.size = file.metadata()?.len();
            state.file = Some(file);
        }
        if state.size + buf.len() as u64 > self.cap / 2 && state.size > 0 {
            state.file = None;
            std::fs::rename(&self.path, previous_half(&self.path))?;
            state.file = Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
            state.size = 0;
        }
        if let Some(file) = state.file.as_mut() {
            file.write_all(buf)?;
            state.size += buf.len() as u64;
        }
        Ok(())
    }

    /// Holds off writers while a reader replays the file and subscribes.
    pub async fn lock(&self) -> SinkLock<'_> {
        SinkLock(self.state.lock().await)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// See [`LogSink::lock`].
pub(crate) struct SinkLock<'a>(#[allow(dead_code)] tokio::sync::MutexGuard<'a, SinkFile>);

fn previous_half(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".1");
    PathBuf::from(name)
}

/// Reads a replica's past lines from its log files, oldest first, keeping those at or after `opts.since` and
/// at most the last `opts.tail`.
pub(crate) fn replay(path: &Path, opts: &LogOptions) -> Vec<LogLine> {
    let mut kept: VecDeque<LogLine> = VecDeque::new();
    for file in [previous_half(path), path.to_path_buf()] {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines() {
            let Ok(line) = serde_json::from_str::<LogLine>(line) else {
                continue;
            };
            if opts.since.is_some_and(|since| line.time < since) {
                continue;
            }
            kept.push_back(line);
            if opts.tail.is_some_and(|tail| kept.len() > tail) {
                kept.pop_front();
            }
        }
    }
    kept.into()
}

/// Follows one raw output file of a process.
struct RawTail {
    path: PathBuf,
    stream: &'static str,
    pos: u64,
    partial: Vec<u8>,
}

impl RawTail {
    /// Reads what was appended since the last call, pushing complete lines (all of it when `last`).
    fn read(&mut self, last: bool, out: &mut Vec<(&'static str, String)>) -> std::io::Result<()> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let mut len = file.metadata()?.len();
        if len < self.pos {
            // Truncated behind our back: start over.
            self.pos = 0;
        }
        while len > self.pos {
            file.seek(SeekFrom::Start(self.pos))?;
            let mut buf = Vec::new();
            let n = (&mut file).take(READ_CHUNK).read_to_end(&mut buf)?;
            if n == 0 {
                break;
            }
            self.pos += n as u64;
            self.split(&buf, out);
            if self.pos >= RAW_CAP {
                len = file.metadata()?.len();
                if len == self.pos {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&self.path)?
                        .set_len(0)?;
                    self.pos = 0;
                    len = 0;
                }
            }
        }
        if last && !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            out.push((self.stream, String::from_utf8_lossy(&rest).into_owned()));
        }
        Ok(())
    }

    fn resume_at(&self) -> u64 {
        self.pos.saturating_sub(self.partial.len() as u64)
    }

    fn split(&mut self, buf: &[u8], out: &mut Vec<(&'static str, String)>) {
        for &b in buf {
            if b == b'\n' || self.partial.len() >= MAX_LINE {
                let mut line = std::mem::take(&mut self.partial);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                out.push((self.stream, String::from_utf8_lossy(&line).into_owned()));
                if b == b'\n' {
                    continue;
                }
            }
            self.partial.push(b);
        }
    }
}

/// Tails one process's stdout and stderr files into its replica's [`LogSink`].
pub(crate) struct Capture {
    index: u32,
    stdout: RawTail,
    stderr: RawTail,
    pos_path: PathBuf,
    saved_pos: (u64, u64),
    sink: std::sync::Arc<LogSink>,
    /// The last lines of the current process, for `last_logs`.
    pub last: VecDeque<String>,
    idle: Duration,
}

impl Capture {
    /// Starts (or, for an adopted process, resumes from the `.pos` file) following the raw files.
    pub fn new(
        index: u32,
        files: &super::files::InstanceFiles,
        sink: std::sync::Arc<LogSink>,
    ) -> Capture {
        let saved = std::fs::read_to_string(&files.pos)
            .ok()
            .and_then(|s| {
                let mut it = s.split_whitespace().map(|n| n.parse::<u64>().ok());
                Some((it.next()??, it.next()??))
            })
            .unwrap_or((0, 0));
        Capture {
            index,
            stdout: RawTail {
                path: files.stdout.clone(),
                stream: "stdout",
                pos: saved.0,
                partial: Vec::new(),
            },
            stderr: RawTail {
                path: files.stderr.clone(),
                stream: "stderr",
                pos: saved.1,
                partial: Vec::new(),
            },
            pos_path: files.pos.clone(),
            saved_pos: saved,
            sink,
            last: VecDeque::new(),
            idle: MIN_IDLE,
        }
    }

    /// Reads new output; `last` after the process exited (flushes an unfinished last line). Returns whether
    /// anything came.
    pub async fn poll(&mut self, last: bool) -> bool {
        let mut out = Vec::new();
        for tail in [&mut self.stdout, &mut self.stderr] {
            if let Err(e) = tail.read(last, &mut out) {
                tracing::warn!(path = %tail.path.display(), error = %e, "cannot read replica output");
            }
        }
        let time = jiff::Timestamp::now();
        let lines: Vec<LogLine> = out
            .into_iter()
            .map(|(stream, line)| LogLine {
                time,
                replica: self.index,
                stream: stream.to_string(),
                line,
            })
            .collect();
        for line in &lines {
            if self.last.len() == LAST_LINES {
                self.last.pop_front();
            }
            self.last.push_back(line.line.clone());
        }
        self.sink.write(&lines).await;
        // Resume at the start of an unfinished line, which is only in memory.
        let pos = (self.stdout.resume_at(), self.stderr.resume_at());
        if pos != self.saved_pos {
            // Not atomic: a torn file reads as (0, 0) and replays what is left in the raw files, never loses it.
            if std::fs::write(&self.pos_path, format!("{} {}", pos.0, pos.1)).is_ok() {
                self.saved_pos = pos;
            }
        }
        self.idle = if lines.is_empty() {
            (self.idle * 2).min(MAX_IDLE)
        } else {
            MIN_IDLE
        };
        !lines.is_empty()
    }

    /// How long to wait before the next [`Capture::poll`]: short while output flows, up to a second when idle.
    pub fn next_poll(&self) -> Duration {
        self.idle
    }

    /// Starts a new process's run: forget the previous run's last lines.
    pub fn new_run(&mut self) {
        self.last.clear();
    }
}

const MIN_IDLE: Duration = Duration::from_millis(50);
const MAX_IDLE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_lines_resumes_and_replays() {
        let dir = tempfile::tempdir().unwrap();
        let files = super::super::files::InstanceFiles::new(dir.path(), 0, 1);
        let (tx, mut rx) = broadcast::channel(16);
        let sink = std::sync::Arc::new(LogSink::new(dir.path().join("replica-0.log"), 1 << 20, tx));
        std::fs::write(&files.stdout, "one\r\ntwo\nthr").unwrap();
        std::fs::write(&files.stderr, "oops\n").unwrap();

        let mut capture = Capture::new(0, &files, sink.clone());
        assert!(capture.poll(false).await);
        let got: Vec<_> = capture.last.iter().cloned().collect();
        assert_eq!(got, ["one", "two", "oops"]);
        assert_eq!(rx.recv().await.unwrap().line, "one");

        // A new capture on the same files (an adopting driver) resumes where this one stopped.
        let mut std_out = std::fs::OpenOptions::new()
            .append(true)
            .open(&files.stdout)
            .unwrap();
        std_out.write_all(b"ee\nfour").unwrap();
        let mut resumed = Capture::new(0, &files, sink.clone());
        assert!(resumed.poll(true).await);
        let got: Vec<_> = resumed.last.iter().cloned().collect();
        assert_eq!(got, ["three", "four"]);

        let all = replay(sink.path(), &LogOptions::default());
        let lines: Vec<_> = all.iter().map(|l| l.line.as_str()).collect();
        assert_eq!(lines, ["one", "two", "oops", "three", "four"]);
        assert_eq!(all[2].stream, "stderr");
        let tail = replay(
            sink.path(),
            &LogOptions {
                tail: Some(2),
                ..LogOptions::default()
            },
        );
        assert_eq!(tail.len(), 2);
        assert_eq!(tail[1].line, "four");
    }

    #[tokio::test]
    async fn log_is_cut_in_halves() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = broadcast::channel(16);
        let sink = LogSink::new(dir.path().join("replica-0.log"), 4096, tx);
        for i in 0..200 {
            let line = LogLine {
                time: jiff::Timestamp::now(),
                replica: 0,
                stream: "stdout".into(),
                line: format!("line {i}"),
            };
            sink.write(&[line]).await;
        }
        let size = |p: PathBuf| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        assert!(size(sink.path().to_path_buf()) <= 2048);
        assert!(size(previous_half(sink.path())) <= 2048);
        let last = replay(sink.path(), &LogOptions::default());
        assert_eq!(last.last().unwrap().line, "line 199");
    }
}
