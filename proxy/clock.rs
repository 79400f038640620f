//! The request path's last clock reading, per thread, and the lazy arming of the timers its
//! waits reuse.
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

/// A timer for waits armed with [`arm`]: a day off, so the first [`arm`] moves it.
pub fn timer() -> tokio::time::Sleep {
    tokio::time::sleep_until(Instant::now() + std::time::Duration::from_secs(24 * 3600))
}

/// Arms a timer that is reused from wait to wait for `due`, lazily: it is moved only when
/// `due` is earlier than where it stands. A later `due` (each request's deadline is later
/// than the last one's) leaves it in place, and the wait calls [`rearm`] if it comes due
/// first. Why: moving a registered timer on costs about 110 instructions a time, twice a
/// request (the client connection's idle wait, the backend's response-head deadline); a
/// timer that comes due early is rare (once per timeout per connection at most).
pub fn arm(timer: std::pin::Pin<&mut tokio::time::Sleep>, due: Instant) {
    if due < timer.deadline() {
        timer.reset(due);
    }
}

/// The timer of a wait armed with [`arm`] came due: returns `true` (and moves it on to
/// `due`) if it came early and the wait goes on, `false` if `due` has come.
pub fn rearm(timer: std::pin::Pin<&mut tokio::time::Sleep>, due: Instant) -> bool {
    if now() < due {
        timer.reset(due);
        true
    } else {
        false
    }
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

    #[tokio::test(start_paused = true)]
    async fn a_lazily_armed_timer_never_ends_a_wait_early_or_late() {
        use std::time::Duration;
        let t0 = Instant::now();
        let mut timer = std::pin::pin!(timer());
        // The first arm moves it; a later deadline leaves it where it stands.
        arm(timer.as_mut(), t0 + Duration::from_secs(10));
        assert_eq!(timer.deadline(), t0 + Duration::from_secs(10));
        let due = t0 + Duration::from_secs(25);
        arm(timer.as_mut(), due);
        assert_eq!(timer.deadline(), t0 + Duration::from_secs(10));
        // The wait: the timer comes due at 10 s, early, and is moved on; the wait ends at 25 s.
        let mut early = 0;
        loop {
            timer.as_mut().await;
            if !rearm(timer.as_mut(), due) {
                break;
            }
            early += 1;
            assert_eq!(timer.deadline(), due);
        }
        assert_eq!(early, 1);
        assert_eq!(Instant::now(), due);
        // An earlier deadline than where it stands moves it back.
        timer.as_mut().reset(due + Duration::from_secs(60));
        let sooner = Instant::now() + Duration::from_secs(5);
        arm(timer.as_mut(), sooner);
        assert_eq!(timer.deadline(), sooner);
    }
}
