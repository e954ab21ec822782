//! Jittered exponential backoff for reconnecting to the control plane.
//!
//! The n-th consecutive failure waits a random time in `[d/2, d]` with
//! `d = min(cap, base * 2^n)`: growing, capped at 30 s by default, and
//! spread out so that a fleet of agents does not reconnect in lockstep
//! after a control-plane restart.

use std::time::Duration;

pub const DEFAULT_BASE: Duration = Duration::from_millis(500);
pub const DEFAULT_CAP: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_BASE, DEFAULT_CAP)
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// Forget past failures (after a session was established).
    pub fn reset(&mut self) {
        self.failures = 0;
    }

    /// The ceiling `d` for the next delay.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Next delay, with `unit` in `[0, 1]` choosing the point in `[d/2, d]`.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Next delay with a random jitter.
    pub fn next_delay(&mut self) -> Duration {
        self.next_with(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_stay_within_bounds() {
        let mut b = Backoff::default();
        let mut last_ceiling = Duration::ZERO;
        for _ in 0..100 {
            let ceiling = b.ceiling();
            assert!(ceiling >= last_ceiling && ceiling <= DEFAULT_CAP);
            last_ceiling = ceiling;
            let d = b.next_delay();
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "{d:?} not in [{:?}, {ceiling:?}]",
                ceiling / 2
            );
            assert!(d <= Duration::from_secs(30));
        }
        assert_eq!(b.ceiling(), DEFAULT_CAP);
    }

    #[test]
    fn jitter_spans_half_to_full() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(30));
        assert_eq!(b.clone().next_with(0.0), Duration::from_secs(1));
        assert_eq!(b.next_with(1.0), Duration::from_secs(2));
        assert_eq!(b.next_with(0.5), Duration::from_secs(3));
    }

    #[test]
    fn reset_starts_over() {
        let mut b = Backoff::default();
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert_eq!(b.ceiling(), DEFAULT_BASE);
    }
}
