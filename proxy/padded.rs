//! A value alone on its cache lines, and one such value per worker.
//!
//! Per-core workers share some per-backend state: one worker writes a request counter or
//! takes its idle-connection slot's lock while the other reads a health word or takes its
//! own slot's lock beside it. Sharing a cache line, every such write would pull the line
//! away from the other core (false sharing). 128 bytes, not 64: x86's adjacent-line
//! prefetcher fetches lines in pairs.

/// `T` on cache lines of its own; derefs to `T`.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

impl<T> std::ops::Deref for Padded<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.0
    }
}

/// One `T` per worker slot (`workers::slots()` when made), each on lines of its own: what
/// every worker writes per request (a round-robin position, its idle upstream connections,
/// its request counters) without pulling a line from another worker's core. A thread finds
/// its own with [`PerWorker::mine`]; threads outside the workers share slot 0.
pub struct PerWorker<T>(Box<[Padded<T>]>);

impl<T> PerWorker<T> {
    /// `make(slot)` for every slot.
    pub fn new(mut make: impl FnMut(usize) -> T) -> PerWorker<T> {
        PerWorker(
            (0..crate::workers::slots().max(1))
                .map(|i| Padded(make(i)))
                .collect(),
        )
    }

    /// This thread's (`workers::slot`).
    pub fn mine(&self) -> &T {
        &self.0[crate::workers::slot() % self.0.len()]
    }

    /// Every slot's, for sums and sweeps.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|p| &p.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{Padded, PerWorker};

    #[test]
    fn a_thread_outside_the_workers_finds_slot_zero() {
        let set = PerWorker::new(|i| i * 10);
        assert_eq!(*set.mine(), 0);
        assert_eq!(set.iter().count(), crate::workers::slots().max(1));
        assert!(set
            .iter()
            .copied()
            .eq((0..set.iter().count()).map(|i| i * 10)));
    }

    #[test]
    fn neighbours_never_share_a_line() {
        let pair = [Padded(0u8), Padded(1u8)];
        let a = &pair[0] as *const _ as usize;
        let b = &pair[1] as *const _ as usize;
        assert_eq!(a % 128, 0);
        assert!(b - a >= 128);
        assert_eq!(*pair[1], 1);
    }
}
