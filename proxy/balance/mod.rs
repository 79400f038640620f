//! Load-balancing algorithms behind one trait, one algorithm per file.
//!
//! A [`Selector`] is built with the snapshot (weight tables are computed then, never per
//! request) and picks one index among a pool's backends. It knows nothing about health,
//! breakers or draining: the pool hands it an eligibility predicate and the selector only
//! skips what the predicate refuses. Live per-backend counters (in-flight) are read from the
//! backends themselves, so a rebuilt selector keeps them.

mod round_robin;
mod weighted_round_robin;

use std::net::IpAddr;
use std::sync::Arc;

use fulcrum_config::Algorithm;

use crate::pool::Backend;

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

/// Builds the selector for `algorithm` over `backends` (in the pool's order).
pub fn build(algorithm: Algorithm, backends: &[Arc<Backend>]) -> Box<dyn Selector> {
    match algorithm {
        Algorithm::RoundRobin => Box::new(RoundRobin::new()),
        // The algorithms of later issues fall back on weighted round-robin until they land.
        Algorithm::WeightedRoundRobin
        | Algorithm::LeastConnections
        | Algorithm::IpHash
        | Algorithm::LeastResponseTime => Box::new(WeightedRoundRobin::new(
            &backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
        )),
    }
}
