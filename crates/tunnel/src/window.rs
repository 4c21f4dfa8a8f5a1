//! Per-stream flow control: what a side may still send, and when a receiver grants more.

use std::fmt;

use crate::MAX_WINDOW;

/// A flow-control rule the peer broke; the session ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlowError {
    /// The peer sent more than it was granted.
    Overrun { received: usize, allowed: u64 },
    /// The peer granted so much that the total would pass [`MAX_WINDOW`].
    Overgrant { total: u64 },
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowError::Overrun { received, allowed } => write!(
                f,
                "the peer sent {received} bytes on a stream with {allowed} bytes of window left"
            ),
            FlowError::Overgrant { total } => write!(
                f,
                "the peer granted a window of {total} bytes, over the limit of {MAX_WINDOW}"
            ),
        }
    }
}

impl std::error::Error for FlowError {}

/// How many bytes this side may still send on a stream.
#[derive(Debug, Clone)]
pub struct SendCredit {
    available: u64,
}

impl SendCredit {
    /// Starts with the window the peer granted in its `Open` or `Accept`.
    pub fn new(window: u32) -> SendCredit {
        SendCredit {
            available: u64::from(window),
        }
    }

    pub fn available(&self) -> u64 {
        self.available
    }

    /// Takes up to `want` bytes of credit; returns how many may be sent now (0: wait for `Credit`).
    pub fn take(&mut self, want: usize) -> usize {
        let n = (want as u64).min(self.available);
        self.available -= n;
        n as usize
    }

    /// Adds the peer's `Credit`.
    pub fn grant(&mut self, bytes: u32) -> Result<(), FlowError> {
        let total = self.available + u64::from(bytes);
        if total > u64::from(MAX_WINDOW) {
            return Err(FlowError::Overgrant { total });
        }
        self.available = total;
        Ok(())
    }
}

/// What this side lets the peer send on a stream: the window it granted, the bytes received and not yet
/// consumed by the application, and the credit it owes back once the application has consumed enough.
#[derive(Debug, Clone)]
pub struct RecvWindow {
    size: u32,
    /// Bytes the peer may still send.
    allowed: u64,
    /// Bytes consumed by the application and not yet granted back.
    owed: u32,
}

impl RecvWindow {
    /// A window of `size` bytes (what this side announced in its `Open` or `Accept`).
    pub fn new(size: u32) -> RecvWindow {
        RecvWindow {
            size,
            allowed: u64::from(size),
            owed: 0,
        }
    }

    /// The peer sent `n` bytes.
    pub fn received(&mut self, n: usize) -> Result<(), FlowError> {
        if n as u64 > self.allowed {
            return Err(FlowError::Overrun {
                received: n,
                allowed: self.allowed,
            });
        }
        self.allowed -= n as u64;
        Ok(())
    }

    /// The application consumed `n` bytes. Returns the credit to send the peer, once at least half the
    /// window is owed (so credit goes out in few frames, and the peer never waits while half is left).
    pub fn consumed(&mut self, n: usize) -> Option<u32> {
        self.owed = self.owed.saturating_add(n.min(u32::MAX as usize) as u32);
        if self.owed == 0 || self.owed < self.size / 2 {
            return None;
        }
        let credit = std::mem::take(&mut self.owed);
        self.allowed += u64::from(credit);
        Some(credit)
    }
}
