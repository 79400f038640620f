//! Peak-EWMA latency estimate of one backend (Finagle's and linkerd's cost model), kept in
//! the backend's state so it survives reloads. Pure arithmetic over explicit timestamps, so
//! tests drive time by hand.
//!
//! - A sample above the estimate replaces it at once (peak: slowness is noticed at once).
//! - A sample below it blends in with weight `1 - exp(-elapsed / DECAY)`.
//! - Read, the estimate decays toward zero with the time since the last sample, so a backend
//!   that was shunned (and so gets no samples) is tried again and can win traffic back.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// How fast old samples lose weight, and how fast an unsampled estimate fades.
pub const DECAY: Duration = Duration::from_secs(5);
/// What a new backend is assumed to cost before its first sample, when the pool has no
/// better guess (the mean of its peers).
pub const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// The latency a failure (connect error, timeout, 5xx) counts as: a backend that fails fast
/// must not look fast.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Nanoseconds since the first call in this process: a cheap monotonic clock for stamps.
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// [`now_ns`] for an instant the caller already read (one clock read serves a request's
/// every stamp).
pub fn ns_at(t: Instant) -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    t.saturating_duration_since(*START.get_or_init(Instant::now))
        .as_nanos() as u64
}

pub struct PeakEwma {
    /// Estimate in nanoseconds, as `f64` bits.
    cost: AtomicU64,
    /// `now_ns()` of the last sample.
    stamp: AtomicU64,
}

fn decay_factor(elapsed_ns: u64) -> f64 {
    (-(elapsed_ns as f64) / DECAY.as_nanos() as f64).exp()
}

impl PeakEwma {
    pub fn new(initial: Duration, now: u64) -> PeakEwma {
        PeakEwma {
            cost: AtomicU64::new((initial.as_nanos() as f64).to_bits()),
            stamp: AtomicU64::new(now),
        }
    }

    /// Replaces the estimate (a new backend's starting guess).
    pub fn set(&self, estimate: Duration, now: u64) {
        self.cost
            .store((estimate.as_nanos() as f64).to_bits(), Ordering::Relaxed);
        self.stamp.store(now, Ordering::Relaxed);
    }

    /// The estimate at `now`, in nanoseconds.
    pub fn cost(&self, now: u64) -> f64 {
        let cost = f64::from_bits(self.cost.load(Ordering::Relaxed));
        let stamp = self.stamp.load(Ordering::Relaxed);
        cost * decay_factor(now.saturating_sub(stamp))
    }

    /// Records one observed latency. Racing updates may lose a sample; an estimate can live
    /// with that, a lock on the hot path cannot.
    pub fn observe(&self, rtt: Duration, now: u64) {
        let rtt = rtt.as_nanos() as f64;
        let stamp = self.stamp.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(stamp);
        let current = f64::from_bits(self.cost.load(Ordering::Relaxed)) * decay_factor(elapsed);
        let next = if rtt > current {
            rtt
        } else {
            // Weight of the new sample grows with the time it stands for, floored so that a
            // burst of fast answers still pulls the estimate down.
            let w = (1.0 - decay_factor(elapsed)).max(0.05);
            current + (rtt - current) * w
        };
        self.cost.store(next.to_bits(), Ordering::Relaxed);
        self.stamp.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn peak_is_taken_at_once_and_fast_samples_pull_down() {
        let e = PeakEwma::new(Duration::from_millis(5), 0);
        e.observe(Duration::from_millis(100), MS);
        assert!((e.cost(MS) - 100.0 * MS as f64).abs() < 1.0);
        let mut t = MS;
        for _ in 0..200 {
            t += MS;
            e.observe(Duration::from_millis(2), t);
        }
        assert!(e.cost(t) < 3.0 * MS as f64, "{}", e.cost(t));
    }

    #[test]
    fn unsampled_estimate_decays_toward_zero() {
        let e = PeakEwma::new(Duration::from_secs(1), 0);
        let later = 30 * DECAY.as_nanos() as u64 / 10; // 3 decay periods
        assert!(e.cost(later) < 0.06 * 1e9);
        assert!(e.cost(later) > 0.0);
    }
}
