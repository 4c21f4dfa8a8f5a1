//! Exponential backoff: `base`, doubling per failure, capped.

use std::time::Duration;

/// Exponential backoff with factor 2: the delay after the `n`-th consecutive failure (counting from 0) is
/// `base * 2^n`, at most `cap`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    /// The delay after `failures` earlier consecutive failures: `base * 2^failures`, at most `cap`.
    pub fn delay(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.cap, |d| d.min(self.cap))
    }
}

impl Default for Backoff {
    /// 1s, 2s, 4s, … up to 5 minutes.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_then_caps() {
        let b = Backoff {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(5),
        };
        let delays: Vec<_> = (0..7).map(|n| b.delay(n).as_millis()).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000, 5000]);
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let b = Backoff::default();
        assert_eq!(b.delay(31), b.cap);
        assert_eq!(b.delay(32), b.cap);
        assert_eq!(b.delay(u32::MAX), b.cap);
    }
}
