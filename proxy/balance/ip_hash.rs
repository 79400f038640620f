//! Consistent hashing of the client address with a Maglev lookup table (Eisenbud et al.,
//! NSDI 2016), weighted, with optional bounded load.
//!
//! The table (a prime number of slots, about 100 per backend or more) is built at snapshot
//! time from each backend's stable id, so every fulcrum with the same config builds the
//! same table and a fleet agrees on where a client goes. Adding or removing one backend of N
//! remaps about 1/N of the slots. A pick hashes the client (a fixed mix, no per-process
//! seed) and reads one slot; if that backend is ineligible, or above the bounded-load cap,
//! the walk continues to the following slots, which spreads its clients over the others in
//! proportion, and they come back when it does.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::random::mix64;
use super::{PickCtx, Selector};
use crate::pool::Backend;

/// Table sizes (primes); the first with at least `SLOTS_PER_BACKEND` slots per backend.
/// The size must not change with every backend added (a new size remaps every client), so
/// the smallest is large enough for 655 backends: 128 KiB of `u16` per pool.
const PRIMES: [usize; 4] = [65537, 131071, 262147, 524287];
const SLOTS_PER_BACKEND: usize = 100;
const EMPTY: u16 = u16::MAX;

pub struct IpHash {
    table: Box<[u16]>,
    /// `hash_balance_factor`: no backend above `factor * mean in-flight` (rounded up).
    factor: Option<f64>,
    /// The pool's total in-flight (shared with its backends' states), so the mean costs
    /// one load, not a scan.
    load: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl IpHash {
    /// `keys[i]` is backend i's stable id, `weights[i]` its weight.
    pub fn new(keys: &[u64], weights: &[u32], factor: Option<f64>) -> IpHash {
        IpHash {
            table: maglev_table(keys, weights).into_boxed_slice(),
            factor,
            load: Default::default(),
        }
    }

    /// Uses `load` as the pool's total in-flight count (for bounded load).
    pub fn with_load(mut self, load: std::sync::Arc<std::sync::atomic::AtomicU64>) -> Self {
        self.load = load;
        self
    }

    pub fn table(&self) -> &[u16] {
        &self.table
    }
}

/// The Maglev population: each backend walks its own permutation of the slots and claims
/// the next free one, `weight / max_weight` turns per round.
pub fn maglev_table(keys: &[u64], weights: &[u32]) -> Vec<u16> {
    let n = keys.len().min(EMPTY as usize - 1);
    if n == 0 {
        return Vec::new();
    }
    let m = PRIMES
        .iter()
        .copied()
        .find(|&p| p >= n * SLOTS_PER_BACKEND)
        .unwrap_or(PRIMES[PRIMES.len() - 1]);
    let offset: Vec<usize> = keys[..n]
        .iter()
        .map(|&k| (mix64(k) % m as u64) as usize)
        .collect();
    let skip: Vec<usize> = keys[..n]
        .iter()
        .map(|&k| (mix64(k ^ 0x5851_f42d_4c95_7f2d) % (m as u64 - 1) + 1) as usize)
        .collect();
    let max_w = weights[..n].iter().copied().max().unwrap_or(1).max(1) as f64;
    let mut next = vec![0usize; n];
    let mut credit = vec![0f64; n];
    let mut table = vec![EMPTY; m];
    let mut filled = 0;
    while filled < m {
        for i in 0..n {
            credit[i] += weights[i].max(1) as f64 / max_w;
            while credit[i] >= 1.0 && filled < m {
                credit[i] -= 1.0;
                loop {
                    let c = (offset[i] + next[i] * skip[i]) % m;
                    next[i] += 1;
                    if table[c] == EMPTY {
                        table[c] = i as u16;
                        filled += 1;
                        break;
                    }
                }
            }
            if filled == m {
                break;
            }
        }
    }
    table
}

/// A fixed hash of a client address: the same on every machine and every run.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => mix64(u32::from(v4) as u64 ^ 0x0004_0000_0000_0000),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => hash_ip(IpAddr::V4(v4)),
            None => {
                let x = u128::from(v6);
                mix64((x as u64) ^ mix64((x >> 64) as u64))
            }
        },
    }
}

impl Selector for IpHash {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &PickCtx<'_>) -> Option<usize> {
        self.pick_key(hash_ip(ctx.client), backends, ctx)
    }
}

impl IpHash {
    /// The consistent pick for any 64-bit key (a client address, a session header's hash).
    pub fn pick_key(
        &self,
        key: u64,
        backends: &[Arc<Backend>],
        ctx: &PickCtx<'_>,
    ) -> Option<usize> {
        let m = self.table.len();
        if m == 0 || backends.is_empty() {
            return None;
        }
        // Bounded load (Mirrokni et al.): cap = ceil(c * (total + 1) / backends). The mean is
        // over every backend, so with some down the cap is stricter, never looser.
        let cap = self.factor.map(|c| {
            let total = self.load.load(Ordering::Relaxed);
            (c * (total + 1) as f64 / backends.len() as f64).ceil() as u64
        });
        let start = (key % m as u64) as usize;
        let Some(cap) = cap else {
            // Plain consistent hashing: the first eligible backend from the client's slot.
            return (0..m)
                .map(|k| self.table[(start + k) % m] as usize)
                .find(|&i| i < backends.len() && (ctx.eligible)(i));
        };
        // Walk on past backends at the cap; if every eligible one is (the counts moved under
        // us), the first eligible one seen takes the request rather than nobody.
        let mut first = None;
        let walk = m.min(8 * backends.len() + 64);
        for k in 0..walk {
            let i = self.table[(start + k) % m] as usize;
            if i >= backends.len() || !(ctx.eligible)(i) {
                continue;
            }
            if backends[i].state.in_flight.load(Ordering::Relaxed) < cap {
                return Some(i);
            }
            first.get_or_insert(i);
        }
        first.or_else(|| {
            (0..m)
                .map(|k| self.table[(start + k) % m] as usize)
                .find(|&i| i < backends.len() && (ctx.eligible)(i))
        })
    }
}
