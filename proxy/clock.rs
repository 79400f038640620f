//! The request path's last clock reading, per thread.
//!
//! An upstream attempt reads the clock where it needs the exact time (its start and its end:
//! latency, EWMA, breaker). Stamps that only need to be right to within the attempt's own
//! duration — the pooled connection's idle stamps, the response-head deadline — reuse the
//! start's reading instead of reading again: each read is a vDSO call (about 40 ns on this
//! virtual machine's clock source), and a request made six of them.

use std::cell::Cell;

use tokio::time::Instant;

thread_local! {
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Reads the clock and keeps the reading for [`last`].
pub fn now() -> Instant {
    let t = Instant::now();
    LAST.with(|l| l.set(Some(t)));
    t
}

/// The last reading of [`now`] on this thread (read now if there is none): behind the true
/// time by however long ago that was, so only for stamps taken right after a [`now`] of the
/// same request, or that may be early by a request's duration.
pub fn last() -> Instant {
    LAST.with(|l| l.get()).unwrap_or_else(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_is_the_latest_reading_of_this_thread() {
        let a = now();
        assert_eq!(last(), a);
        let b = now();
        assert!(b >= a);
        assert_eq!(last(), b);
        // Another thread has its own (none yet: it reads the clock).
        let other = std::thread::spawn(last).join().unwrap();
        assert!(other >= b);
    }
}
