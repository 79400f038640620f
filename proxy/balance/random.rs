//! A lock-free, seeded pseudo-random sequence for power-of-two-choices: a shared counter fed
//! through splitmix64. Deterministic for a seed, so tests can replay it.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct SplitMix(AtomicU64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(AtomicU64::new(seed))
    }

    pub fn next(&self) -> u64 {
        let x = self.0.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed);
        mix64(x.wrapping_add(0x9e37_79b9_7f4a_7c15))
    }

    /// Two distinct indexes below `n` (n >= 2).
    pub fn two(&self, n: usize) -> (usize, usize) {
        let r = self.next();
        let a = ((r as u32 as u64 * n as u64) >> 32) as usize;
        let b = (((r >> 32) * (n as u64 - 1)) >> 32) as usize;
        (a, if b >= a { b + 1 } else { b })
    }
}

/// splitmix64's finaliser: a good, fixed 64-bit mix (the same on every machine).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_are_distinct_and_cover_the_range() {
        let r = SplitMix::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..10_000 {
            let (a, b) = r.two(5);
            assert!(a < 5 && b < 5 && a != b);
            seen[a] += 1;
            seen[b] += 1;
        }
        for s in seen {
            assert!((3500..4500).contains(&s), "{seen:?}");
        }
    }
}
