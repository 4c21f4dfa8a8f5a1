//! Reconnect delays: exponential, capped, with jitter so that many agents cut off at once do not all come
//! back in the same instant.

use std::time::Duration;

/// Delays between reconnect attempts: attempt `n` waits between half and all of `min(max, base × 2ⁿ)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    /// The delay before the next attempt; `jitter` is a random number in `[0, 1)` (the caller's randomness,
    /// so this stays a pure function).
    pub fn next_delay(&mut self, jitter: f64) -> Duration {
        let cap = self
            .base
            .saturating_mul(1u32.checked_shl(self.attempt).unwrap_or(u32::MAX))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1).min(31);
        let half = cap / 2;
        half + half.mul_f64(jitter.clamp(0.0, 1.0))
    }

    /// Attempts made since the last [`Backoff::reset`].
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Called once a connection has held: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}
