//! Log streams: append-only, numbered lines kept under a stream name (a provisioner job's build output, a
//! workspace agent's script output). Numbers count from 1 per stream and follow commit order, so a reader
//! that remembers the last number it saw can follow a stream without missing or repeating a line.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

/// One line of a log stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// Its number in the stream, from 1; set by the store (ignored on append).
    #[serde(default)]
    pub seq: u64,
    /// When it was written, to the microsecond.
    pub time: Timestamp,
    /// What wrote it, e.g. `provision` or `script:install`.
    #[serde(default)]
    pub source: String,
    /// The line, without its newline.
    pub text: String,
}

impl LogLine {
    /// A line written now.
    pub fn now(source: impl Into<String>, text: impl Into<String>) -> LogLine {
        LogLine {
            seq: 0,
            time: crate::identity::now(),
            source: source.into(),
            text: text.into(),
        }
    }
}

/// The most lines one read returns.
pub const MAX_LOG_READ: usize = 10_000;
