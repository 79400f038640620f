//! A worker's short spin before it sleeps (`[server] busy_poll`): when its run queue is
//! empty, a per-core worker watches its reactor for a few microseconds before it blocks in
//! `epoll_wait`, and the window adapts to how long the worker actually sleeps.
//!
//! Why: on a virtual machine without a polling idle driver (`cpuidle` driver `none`, as on
//! Firecracker), an idle core halts, and waking it again (an exit to the hypervisor, an
//! interrupt from the waker) costs both sides microseconds that no process is charged for,
//! while the requests of every process on the machine wait. Under load a worker's sleeps are
//! that short. HAProxy's `busy-polling` is the same idea, always on; the window here is sized
//! the way the kernel's `cpuidle-haltpoll` governor sizes its guest halt-polling: it grows
//! (from [`GROW_START`], doubling, up to the configured maximum) while the worker's sleeps end
//! within the maximum but after the window, and halves (to nothing below [`GROW_START`])
//! after a sleep longer than the maximum. A server with gaps between its requests longer than
//! the maximum therefore stops spinning after a few of them; one under load spins just long
//! enough. Between looks the worker gives way to anything else runnable on its core
//! (`sched_yield`): the spin only fills time the core would spend halted.
//!
//! How: tokio does not expose its reactor, so the worker notes the epoll descriptor its
//! runtime created (the new `anon_inode:[eventpoll]` in `/proc/self/fd` across the runtime's
//! construction) and `poll`s it, which reports ready events without taking them:
//! `epoll_wait` right after returns them as usual. Wake-ups from other threads reach the same
//! descriptor (tokio's waker is registered there). If the descriptor cannot be told, the
//! worker never spins.

use std::cell::Cell;
use std::collections::HashSet;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// The window a worker starts from when its sleeps turn short, and below which it stops
/// spinning (`cpuidle-haltpoll`'s `guest_halt_poll_grow_start`).
pub const GROW_START: Duration = Duration::from_micros(10);

/// One worker's spin state.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// The configured maximum.
    max: Duration,
    /// The current window (zero: no spin).
    now: Duration,
}

impl Window {
    pub fn new(max: Duration) -> Window {
        Window {
            max,
            now: Duration::ZERO,
        }
    }

    /// The window for the next sleep.
    pub fn current(&self) -> Duration {
        self.now
    }

    /// Adapts the window to a sleep that lasted `slept` (spin included).
    pub fn record(&mut self, slept: Duration) {
        if slept > self.max {
            self.now /= 2;
            if self.now < GROW_START {
                self.now = Duration::ZERO;
            }
        } else if slept > self.now {
            self.now = (self.now * 2).max(GROW_START).min(self.max);
        }
    }
}

struct Spin {
    fd: RawFd,
    window: Window,
    /// When the current sleep began (set before the spin, taken after the wake-up).
    since: Option<Instant>,
}

thread_local! {
    static SPIN: Cell<Option<Spin>> = const { Cell::new(None) };
}

/// The process's epoll descriptors now.
pub fn epoll_fds() -> HashSet<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return HashSet::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let link = std::fs::read_link(e.path()).ok()?;
        (link.as_os_str() == "anon_inode:[eventpoll]")
            .then(|| e.file_name().to_str()?.parse().ok())
            .flatten()
    })
    .collect()
}

/// Sets this thread to spin for up to `max` before it parks, watching the epoll descriptor
/// that appeared between `before` and `after` (the descriptors around the runtime's
/// construction). tokio keeps a duplicate of its reactor's descriptor (its registry's), so
/// one or two new ones are the same epoll instance; the lowest is the reactor's own.
pub fn arm(before: &HashSet<RawFd>, after: &HashSet<RawFd>, max: Duration) -> bool {
    let new: Vec<RawFd> = after.difference(before).copied().collect();
    match new.iter().min() {
        Some(&fd) if new.len() <= 2 && !max.is_zero() => {
            SPIN.with(|s| {
                s.set(Some(Spin {
                    fd,
                    window: Window::new(max),
                    since: None,
                }))
            });
            true
        }
        _ => false,
    }
}

/// The runtime's `on_thread_park` hook: returns once the reactor has events or the window
/// has passed.
pub fn before_park() {
    let Some(mut spin) = SPIN.with(|s| s.take()) else {
        return;
    };
    let start = Instant::now();
    spin.since = Some(start);
    let window = spin.window.current();
    if !window.is_zero() {
        let end = start + window;
        while !ready(spin.fd) {
            std::thread::yield_now();
            if Instant::now() >= end {
                break;
            }
        }
    }
    SPIN.with(|s| s.set(Some(spin)));
}

/// The runtime's `on_thread_unpark` hook: sizes the next window from this sleep.
pub fn after_unpark() {
    SPIN.with(|s| {
        if let Some(mut spin) = s.take() {
            if let Some(since) = spin.since.take() {
                spin.window.record(since.elapsed());
            }
            s.set(Some(spin));
        }
    });
}

fn ready(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, count 1, no timeout; `poll` writes only its `revents`.
    #[allow(unsafe_code)]
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn grows_while_sleeps_are_short_and_shrinks_to_nothing_after_long_ones() {
        let mut w = Window::new(200 * US);
        assert_eq!(w.current(), Duration::ZERO);
        // Sleeps of 60 µs: the window grows from GROW_START by doubling until it covers them.
        let mut seen = vec![];
        for _ in 0..4 {
            w.record(60 * US);
            seen.push(w.current());
        }
        assert_eq!(seen, [10 * US, 20 * US, 40 * US, 80 * US]);
        // Caught within the window: it stays.
        w.record(60 * US);
        assert_eq!(w.current(), 80 * US);
        // Never past the maximum.
        for _ in 0..10 {
            w.record(190 * US);
        }
        assert_eq!(w.current(), 200 * US);
        // Long sleeps halve it, and below GROW_START it is gone.
        let mut seen = vec![];
        for _ in 0..5 {
            w.record(5 * 1000 * US);
            seen.push(w.current());
        }
        assert_eq!(
            seen,
            [
                100 * US,
                50 * US,
                25 * US,
                12500 * US / 1000,
                Duration::ZERO
            ]
        );
    }

    #[test]
    fn a_zero_maximum_never_spins() {
        let mut w = Window::new(Duration::ZERO);
        for slept in [US, 50 * US, 10_000 * US] {
            w.record(slept);
            assert_eq!(w.current(), Duration::ZERO);
        }
    }

    /// Arms this thread on `poll`'s descriptor with a window of `window` already grown.
    fn armed_on(poll: &mio::Poll, window: Duration) {
        use std::os::fd::AsRawFd;
        SPIN.with(|s| {
            s.set(Some(Spin {
                fd: poll.as_raw_fd(),
                window: Window {
                    max: window,
                    now: window,
                },
                since: None,
            }))
        });
    }

    #[test]
    fn spins_until_the_reactor_has_an_event_or_the_window_ends() {
        let mut poll = mio::Poll::new().unwrap();
        let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), mio::Token(0)).unwrap());
        // An event already there: back at once (the window is two seconds).
        armed_on(&poll, Duration::from_secs(2));
        waker.wake().unwrap();
        let t = Instant::now();
        before_park();
        after_unpark();
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
        // The event is left for epoll_wait to take.
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
        assert_eq!(events.iter().count(), 1);
        // An event from another thread during the spin ends it.
        armed_on(&poll, Duration::from_secs(2));
        let w = waker.clone();
        let other = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            w.wake().unwrap();
        });
        let t = Instant::now();
        before_park();
        let spun = t.elapsed();
        other.join().unwrap();
        assert!(
            spun >= Duration::from_millis(20) && spun < Duration::from_secs(1),
            "{spun:?}"
        );
        poll.poll(&mut events, Some(Duration::ZERO)).unwrap();
        // No event: the whole window, then the sleep.
        armed_on(&poll, Duration::from_millis(30));
        let t = Instant::now();
        before_park();
        assert!(
            t.elapsed() >= Duration::from_millis(30),
            "{:?}",
            t.elapsed()
        );
        SPIN.with(|s| s.take());
    }

    #[test]
    fn arms_only_on_one_new_epoll_instance() {
        let before: HashSet<RawFd> = [3].into();
        let max = 50 * US;
        assert!(!arm(&before, &before, max), "nothing new");
        assert!(
            !arm(&before, &[3, 7, 9, 11].into(), max),
            "three new: unknown"
        );
        assert!(!arm(&before, &[3, 7].into(), Duration::ZERO), "turned off");
        assert!(arm(&before, &[3, 9, 7].into(), max));
        SPIN.with(|s| {
            let spin = s.take().expect("armed");
            assert_eq!(spin.fd, 7);
        });
    }
}
