//! Least response time: the backend with the lowest `peak_ewma_latency * (in_flight + 1) /
//! weight`, as Finagle's and linkerd's P2C+PeakEWMA balancers score it. The estimate lives in
//! the backend's state (`balance::ewma`); failures feed it a penalty latency, so a backend
//! that fails fast never looks fast.
//!
//! Small pools are scanned exactly; above `EXACT_MAX` backends, power of two choices.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::ewma::now_ns;
use super::least_connections::two_choices;
use super::random::SplitMix;
use super::{PickCtx, Selector};
use crate::pool::Backend;

pub const EXACT_MAX: usize = 8;

pub struct LeastResponseTime {
    next: crate::balance::Cursor,
    rng: SplitMix,
    clock: fn() -> u64,
}

impl LeastResponseTime {
    pub fn new(seed: u64) -> Self {
        Self::with_clock(seed, now_ns)
    }

    /// With another clock (nanoseconds), for tests that move time by hand.
    pub fn with_clock(seed: u64, clock: fn() -> u64) -> Self {
        LeastResponseTime {
            next: crate::balance::Cursor::new(),
            rng: SplitMix::new(seed),
            clock,
        }
    }
}

/// The score of one backend at `now` (lower is better).
pub fn score(b: &Backend, now: u64) -> f64 {
    let in_flight = b.state.in_flight.load(Ordering::Relaxed) as f64;
    // +1 ns so that two idle, never-sampled backends still compare by in-flight and weight.
    (b.state.latency.cost(now) + 1.0) * (in_flight + 1.0) / b.weight as f64
}

impl Selector for LeastResponseTime {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickCtx<'_>) -> Option<usize> {
        let now = (self.clock)();
        let n = backends.len();
        if n > EXACT_MAX {
            let less = |a: &Backend, b: &Backend| score(a, now) < score(b, now);
            return two_choices(backends, ctx, &self.rng, less);
        }
        // Exact: each score computed once (it costs an `exp`), from a rotating start so
        // equal scores share the traffic.
        let start = self.next.next();
        let mut best: Option<(usize, f64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !(ctx.eligible)(i) {
                continue;
            }
            let s = score(&backends[i], now);
            if best.is_none_or(|(_, b)| s < b) {
                best = Some((i, s));
            }
        }
        best.map(|(i, _)| i)
    }
}
