//! Least connections, weighted: the backend with the lowest `(in_flight + 1) / weight`.
//! In-flight counts live in each backend's state (WebSocket sessions included while open),
//! never in the selector, so they survive a rebuild.
//!
//! Up to `EXACT_MAX` backends every eligible one is compared, starting at a rotating offset
//! so that ties are shared round-robin. Above that, an exact scan costs more than the whole
//! rest of a request (about 1 ns per backend), so the pick is power-of-two-choices: two
//! random backends, the less loaded wins (Mitzenmacher; what Envoy and Finagle do).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::random::SplitMix;
use super::{PickCtx, Selector};
use crate::pool::Backend;

pub const EXACT_MAX: usize = 32;

pub struct LeastConnections {
    next: crate::balance::Cursor,
    rng: SplitMix,
}

impl LeastConnections {
    pub fn new(seed: u64) -> Self {
        LeastConnections {
            next: crate::balance::Cursor::new(),
            rng: SplitMix::new(seed),
        }
    }
}

/// Is `a` less loaded than `b`, relative to their weights? Cross-multiplied: no division.
fn less(a: &Backend, b: &Backend) -> bool {
    let la = a.state.in_flight.load(Ordering::Relaxed) + 1;
    let lb = b.state.in_flight.load(Ordering::Relaxed) + 1;
    la * (b.weight as u64) < lb * (a.weight as u64)
}

/// Scans every backend from a rotating start; the first of equal minima wins.
pub(super) fn exact_min(
    backends: &[Arc<Backend>],
    ctx: &PickCtx<'_>,
    start: usize,
    less: impl Fn(&Backend, &Backend) -> bool,
) -> Option<usize> {
    let n = backends.len();
    let mut best: Option<usize> = None;
    for k in 0..n {
        let i = (start + k) % n;
        if !(ctx.eligible)(i) {
            continue;
        }
        if best.is_none_or(|b| less(&backends[i], &backends[b])) {
            best = Some(i);
        }
    }
    best
}

/// Power of two choices: a few draws of two distinct backends; falls back to the exact scan
/// when the draws keep hitting ineligible ones (most of the pool down).
pub(super) fn two_choices(
    backends: &[Arc<Backend>],
    ctx: &PickCtx<'_>,
    rng: &SplitMix,
    less: impl Fn(&Backend, &Backend) -> bool + Copy,
) -> Option<usize> {
    for _ in 0..4 {
        let (a, b) = rng.two(backends.len());
        match ((ctx.eligible)(a), (ctx.eligible)(b)) {
            (true, true) => {
                return Some(if less(&backends[b], &backends[a]) {
                    b
                } else {
                    a
                })
            }
            (true, false) => return Some(a),
            (false, true) => return Some(b),
            (false, false) => continue,
        }
    }
    exact_min(backends, ctx, rng.next() as usize, less)
}

impl Selector for LeastConnections {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickCtx<'_>) -> Option<usize> {
        match backends.len() {
            0 => None,
            n if n <= EXACT_MAX => exact_min(backends, ctx, self.next.next(), less),
            _ => two_choices(backends, ctx, &self.rng, less),
        }
    }
}
