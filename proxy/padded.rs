//! A value alone on its cache lines.
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

#[cfg(test)]
mod tests {
    use super::Padded;

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
