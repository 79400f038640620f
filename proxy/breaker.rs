//! Per-backend circuit breaker: `Closed` → `Open` after `failure_threshold` consecutive
//! failures; after `open_duration` the next request moves it to `HalfOpen`, which lets
//! `half_open_requests` trial requests through; a success closes it, a failure re-opens it.
//!
//! The state machine is pure ([`step`]); [`Breaker`] applies it to one `AtomicU64` with a
//! compare-and-swap loop, so the hot path takes no lock. Time is passed in (milliseconds on
//! any monotonic clock), so tests drive it by hand.

use std::sync::atomic::{AtomicU64, Ordering};

use fulcrum_config::CircuitBreakerConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// A change of state, for the caller to log and count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub from: BreakerState,
    pub to: BreakerState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A request wants to go through (takes a half-open permit when it is let through).
    Acquire,
    Success,
    Failure,
}

/// The whole breaker in one word: state (2 bits), consecutive failures or permits in use
/// (20 bits), and the time it opened in ms (42 bits: 139 years).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Word {
    pub state: BreakerState,
    /// Closed: consecutive failures. HalfOpen: trial requests let through.
    pub count: u32,
    pub opened_at: u64,
}

const COUNT_MAX: u32 = (1 << 20) - 1;

impl Word {
    pub const CLOSED: Word = Word {
        state: BreakerState::Closed,
        count: 0,
        opened_at: 0,
    };

    fn pack(self) -> u64 {
        let s = match self.state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        s | ((self.count.min(COUNT_MAX) as u64) << 2) | (self.opened_at << 22)
    }

    fn unpack(w: u64) -> Word {
        Word {
            state: match w & 3 {
                1 => BreakerState::Open,
                2 => BreakerState::HalfOpen,
                _ => BreakerState::Closed,
            },
            count: ((w >> 2) & COUNT_MAX as u64) as u32,
            opened_at: w >> 22,
        }
    }
}

/// One step of the state machine: the next word, whether the event is allowed (for
/// `Acquire`), and the transition if the state changed.
pub fn step(
    w: Word,
    event: Event,
    now_ms: u64,
    cfg: &CircuitBreakerConfig,
) -> (Word, bool, Option<Transition>) {
    use BreakerState::*;
    use Event::*;
    let open_ms = cfg.open_duration.as_millis() as u64;
    let to = |next: Word, allowed: bool| {
        let t = (next.state != w.state).then_some(Transition {
            from: w.state,
            to: next.state,
        });
        (next, allowed, t)
    };
    match (w.state, event) {
        (Closed, Acquire) => (w, true, None),
        (Closed, Success) => to(Word { count: 0, ..w }, true),
        (Closed, Failure) if w.count + 1 >= cfg.failure_threshold => to(
            Word {
                state: Open,
                count: 0,
                opened_at: now_ms,
            },
            true,
        ),
        (Closed, Failure) => to(
            Word {
                count: w.count + 1,
                ..w
            },
            true,
        ),
        (Open, Acquire) if now_ms >= w.opened_at + open_ms => to(
            Word {
                state: HalfOpen,
                count: 1,
                opened_at: w.opened_at,
            },
            true,
        ),
        (Open, Acquire) => (w, false, None),
        // A late answer of a request let through before the breaker opened: ignored.
        (Open, Success | Failure) => (w, true, None),
        (HalfOpen, Acquire) if w.count < cfg.half_open_requests => to(
            Word {
                count: w.count + 1,
                ..w
            },
            true,
        ),
        (HalfOpen, Acquire) => (w, false, None),
        (HalfOpen, Success) => to(Word::CLOSED, true),
        (HalfOpen, Failure) => to(
            Word {
                state: Open,
                count: 0,
                opened_at: now_ms,
            },
            true,
        ),
    }
}

/// The breaker of one backend, lock-free.
pub struct Breaker {
    word: AtomicU64,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            word: AtomicU64::new(Word::CLOSED.pack()),
        }
    }
}

impl Breaker {
    pub fn word(&self) -> Word {
        Word::unpack(self.word.load(Ordering::Acquire))
    }

    pub fn state(&self) -> BreakerState {
        self.word().state
    }

    /// Is it closed? A closed breaker lets every request through, whatever the time (`step`:
    /// `(Closed, Acquire)` takes no permit and needs no clock), so a caller may skip reading
    /// the clock for [`Breaker::would_allow`] and [`Breaker::apply`] then.
    pub fn is_closed(&self) -> bool {
        self.state() == BreakerState::Closed
    }

    /// Would a request be let through now? (No permit taken: for filtering candidates.)
    pub fn would_allow(&self, now_ms: u64, cfg: &CircuitBreakerConfig) -> bool {
        !cfg.enabled || step(self.word(), Event::Acquire, now_ms, cfg).1
    }

    /// Applies `event`; returns whether it was allowed and the transition, if any.
    pub fn apply(
        &self,
        event: Event,
        now_ms: u64,
        cfg: &CircuitBreakerConfig,
    ) -> (bool, Option<Transition>) {
        if !cfg.enabled {
            return (true, None);
        }
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            let (next, allowed, t) = step(Word::unpack(current), event, now_ms, cfg);
            let next = next.pack();
            if next == current {
                return (allowed, t);
            }
            match self.word.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return (allowed, t),
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn cfg(threshold: u32, half_open: u32) -> CircuitBreakerConfig {
        CircuitBreakerConfig {
            enabled: true,
            failure_threshold: threshold,
            open_duration: Duration::from_secs(30),
            half_open_requests: half_open,
        }
    }

    #[test]
    fn opens_after_the_threshold_and_rejects_while_open() {
        let c = cfg(5, 1);
        let b = Breaker::default();
        for i in 0..4 {
            assert_eq!(b.apply(Event::Failure, i, &c).1, None);
        }
        // A success in between resets the count.
        b.apply(Event::Success, 4, &c);
        for i in 0..4 {
            assert_eq!(b.apply(Event::Failure, 5 + i, &c).1, None);
        }
        let (_, t) = b.apply(Event::Failure, 1_000, &c);
        assert_eq!(
            t,
            Some(Transition {
                from: BreakerState::Closed,
                to: BreakerState::Open
            })
        );
        assert!(!b.apply(Event::Acquire, 1_000, &c).0);
        assert!(!b.apply(Event::Acquire, 30_999, &c).0);
        assert!(!b.would_allow(30_999, &c));
        assert!(b.would_allow(31_000, &c));
    }

    #[test]
    fn half_open_lets_exactly_the_trial_requests_through_then_closes_on_success() {
        let c = cfg(1, 3);
        let b = Breaker::default();
        b.apply(Event::Failure, 0, &c);
        assert_eq!(b.state(), BreakerState::Open);
        let allowed: Vec<bool> = (0..5)
            .map(|_| b.apply(Event::Acquire, 30_000, &c).0)
            .collect();
        assert_eq!(allowed, [true, true, true, false, false]);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        let (_, t) = b.apply(Event::Success, 30_001, &c);
        assert_eq!(t.map(|t| t.to), Some(BreakerState::Closed));
        assert!(b.apply(Event::Acquire, 30_002, &c).0);
    }

    #[test]
    fn a_failed_trial_reopens_for_another_period() {
        let c = cfg(1, 1);
        let b = Breaker::default();
        b.apply(Event::Failure, 0, &c);
        assert!(b.apply(Event::Acquire, 30_000, &c).0);
        let (_, t) = b.apply(Event::Failure, 30_010, &c);
        assert_eq!(t.map(|t| t.to), Some(BreakerState::Open));
        assert!(!b.would_allow(60_009, &c));
        assert!(b.would_allow(60_010, &c));
    }

    #[test]
    fn disabled_breaker_always_allows() {
        let mut c = cfg(1, 1);
        c.enabled = false;
        let b = Breaker::default();
        for i in 0..10 {
            b.apply(Event::Failure, i, &c);
        }
        assert!(b.apply(Event::Acquire, 10, &c).0);
    }

    #[test]
    fn concurrent_acquires_never_exceed_the_permits() {
        let c = cfg(1, 4);
        let b = std::sync::Arc::new(Breaker::default());
        b.apply(Event::Failure, 0, &c);
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (b, c) = (b.clone(), c.clone());
                std::thread::spawn(move || {
                    (0..1000)
                        .filter(|_| b.apply(Event::Acquire, 30_000, &c).0)
                        .count()
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 4);
    }
}
