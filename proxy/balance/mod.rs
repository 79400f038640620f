//! Load-balancing algorithms behind one trait, one algorithm per file.
//!
//! A [`Selector`] is built with the snapshot (weight tables are computed then, never per
//! request) and picks one index among a pool's backends. It knows nothing about health,
//! breakers or draining: the pool hands it an eligibility predicate and the selector only
//! skips what the predicate refuses. Live per-backend counters (in-flight) are read from the
//! backends themselves, so a rebuilt selector keeps them.

pub mod ewma;
mod ip_hash;
mod least_connections;
mod least_response_time;
pub mod random;
mod round_robin;
mod weighted_round_robin;

#[cfg(test)]
mod tests;

use std::net::IpAddr;
use std::sync::Arc;

use fulcrum_config::{Algorithm, PoolConfig};

use crate::padded::PerWorker;
use crate::pool::Backend;

pub use ip_hash::{hash_ip, maglev_table, IpHash};
pub use least_connections::LeastConnections;
pub use least_response_time::LeastResponseTime;
pub use round_robin::RoundRobin;
pub use weighted_round_robin::{smooth_sequence, WeightedRoundRobin};

/// What a selector may look at for one request.
pub struct PickCtx<'a> {
    /// The client address (the real one, after trusted proxies are unwrapped).
    pub client: IpAddr,
    /// Whether the backend at an index may take this request (healthy, breaker not open,
    /// not draining). Selectors must not pick an index for which this is false.
    pub eligible: &'a dyn Fn(usize) -> bool,
}

/// One balancing algorithm.
pub trait Selector: Send + Sync {
    /// Picks the index of a backend in `backends`, or `None` when no eligible backend exists.
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickCtx<'_>) -> Option<usize>;
}

/// Builds the selector for a pool over `backends` (in the pool's order).
pub fn build(config: &PoolConfig, backends: &[Arc<Backend>]) -> Box<dyn Selector> {
    // Seeded from the pool name: deterministic, yet pools do not move in lockstep.
    let seed = random::mix64(
        config
            .name
            .bytes()
            .fold(0u64, |h, b| h.rotate_left(5) ^ b as u64),
    );
    let weights = || backends.iter().map(|b| b.weight).collect::<Vec<_>>();
    match config.algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::new()),
        Algorithm::WeightedRoundRobin => Box::new(WeightedRoundRobin::new(&weights())),
        Algorithm::LeastConnections => Box::new(LeastConnections::new(seed)),
        Algorithm::LeastResponseTime => Box::new(LeastResponseTime::new(seed)),
        Algorithm::IpHash => Box::new(
            IpHash::new(
                &backends.iter().map(|b| b.id.0).collect::<Vec<_>>(),
                &weights(),
                config.hash_balance_factor,
            )
            .with_load(
                backends
                    .first()
                    .map(|b| b.state.pool_load.clone())
                    .unwrap_or_default(),
            ),
        ),
    }
}

/// A rotating position for round-robin style choices, one per worker thread
/// (`workers::slot`), each on its own cache line: workers picking at the same moment never
/// bounce a shared counter between cores, and each walks the whole sequence, so every worker
/// keeps the exact shares on its own. Outside the workers (tests, the control thread) there
/// is one position.
pub struct Cursor(PerWorker<std::sync::atomic::AtomicUsize>);

impl Cursor {
    pub fn new() -> Cursor {
        // Workers start at different places, so they do not all begin on backend 0.
        Cursor(PerWorker::new(|i| {
            std::sync::atomic::AtomicUsize::new(i.wrapping_mul(7919))
        }))
    }

    /// The next position (callers reduce it modulo their length).
    pub fn next(&self) -> usize {
        self.0
            .mine()
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

impl Default for Cursor {
    fn default() -> Self {
        Cursor::new()
    }
}
