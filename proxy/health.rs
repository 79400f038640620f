//! Backend health: a pure state machine over consecutive successes and failures (fed by
//! active checks and by passive observation of real traffic), and the active check loop.
//!
//! [`step`] is the whole logic; [`Health`] applies it to one `AtomicU64` with a CAS loop.
//! The check loop ([`run`]) is generic over a [`Probe`], so tests drive it with paused time
//! and a probe they control; production uses [`HttpProbe`] or [`TcpProbe`].

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use fulcrum_config::HealthCheckConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    BecameHealthy,
    BecameUnhealthy,
}

/// Health in one word: healthy bit, consecutive successes, consecutive failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Word {
    pub healthy: bool,
    pub successes: u32,
    pub failures: u32,
}

const COUNT_MAX: u32 = (1 << 31) - 1;

impl Word {
    fn pack(self) -> u64 {
        (self.healthy as u64) << 63
            | (self.successes.min(COUNT_MAX) as u64) << 31
            | self.failures.min(COUNT_MAX) as u64
    }
    fn unpack(w: u64) -> Word {
        Word {
            healthy: w >> 63 == 1,
            successes: ((w >> 31) & COUNT_MAX as u64) as u32,
            failures: (w & COUNT_MAX as u64) as u32,
        }
    }
}

/// One observation. `may_eject = false` keeps a healthy backend healthy whatever the
/// failures (passive ejection capped by `max_ejection_percent`).
pub fn step(
    w: Word,
    ok: bool,
    may_eject: bool,
    cfg: &HealthCheckConfig,
) -> (Word, Option<Transition>) {
    if ok {
        let successes = w.successes.saturating_add(1);
        if !w.healthy && successes >= cfg.healthy_threshold {
            (
                Word {
                    healthy: true,
                    successes,
                    failures: 0,
                },
                Some(Transition::BecameHealthy),
            )
        } else {
            (
                Word {
                    successes,
                    failures: 0,
                    ..w
                },
                None,
            )
        }
    } else {
        let failures = w.failures.saturating_add(1);
        if w.healthy && failures >= cfg.unhealthy_threshold && may_eject {
            (
                Word {
                    healthy: false,
                    successes: 0,
                    failures,
                },
                Some(Transition::BecameUnhealthy),
            )
        } else {
            (
                Word {
                    successes: 0,
                    failures,
                    ..w
                },
                None,
            )
        }
    }
}

pub struct Health {
    word: AtomicU64,
}

impl Health {
    pub fn new(healthy: bool) -> Health {
        Health {
            word: AtomicU64::new(
                Word {
                    healthy,
                    successes: 0,
                    failures: 0,
                }
                .pack(),
            ),
        }
    }

    pub fn word(&self) -> Word {
        Word::unpack(self.word.load(Ordering::Acquire))
    }

    pub fn is_healthy(&self) -> bool {
        self.word.load(Ordering::Relaxed) >> 63 == 1
    }

    /// Records one observation; returns the transition, if this one made it.
    pub fn record(&self, ok: bool, may_eject: bool, cfg: &HealthCheckConfig) -> Option<Transition> {
        let mut current = self.word.load(Ordering::Acquire);
        loop {
            let (next, t) = step(Word::unpack(current), ok, may_eject, cfg);
            let next = next.pack();
            if next == current {
                return t;
            }
            match self.word.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return t,
                Err(actual) => current = actual,
            }
        }
    }

    /// The hot path's success: a load, and a write only when there were failures to forget.
    pub fn record_passive_success(&self, cfg: &HealthCheckConfig) -> Option<Transition> {
        let w = self.word();
        if w.healthy && w.failures == 0 {
            return None;
        }
        self.record(true, false, cfg)
    }
}

/// One check of one backend.
pub trait Probe: Send + Sync + 'static {
    fn probe(&self) -> impl Future<Output = bool> + Send;
}

/// `GET path`; 2xx and 3xx are healthy. Goes through the backend's own pooled client.
pub struct HttpProbe {
    pub client: crate::upstream::UpstreamClient,
    pub addr: SocketAddr,
    pub uri: http::Uri,
}

impl HttpProbe {
    pub fn new(
        client: crate::upstream::UpstreamClient,
        backend: &crate::pool::Backend,
        path: &str,
    ) -> HttpProbe {
        let addr = backend.addr;
        let uri = format!("{}://{}{path}", backend.scheme, backend.authority)
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        HttpProbe { client, addr, uri }
    }
}

impl Probe for HttpProbe {
    async fn probe(&self) -> bool {
        let req = http::Request::get(self.uri.clone())
            .header(http::header::USER_AGENT, "fulcrum-health-check")
            .body(crate::body::Body::empty());
        let Ok(req) = req else { return false };
        // The caller bounds the whole check with the configured timeout.
        match self
            .client
            .send(self.addr, req, Duration::from_secs(3600))
            .await
        {
            Ok(resp) => {
                let s = resp.status();
                // Drain the body so the connection goes back to the pool.
                let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                s.is_success() || s.is_redirection()
            }
            Err(_) => false,
        }
    }
}

/// Connect only.
pub struct TcpProbe(pub SocketAddr);

impl Probe for TcpProbe {
    async fn probe(&self) -> bool {
        tokio::net::TcpStream::connect(self.0).await.is_ok()
    }
}

/// Checks every `interval` (the first after `interval + jitter`), each bounded by
/// `timeout` (a timeout is a failure), and hands every result to `on_result`, which records
/// it. Runs until aborted (the backend left its pool).
pub async fn run<P: Probe>(
    probe: P,
    cfg: HealthCheckConfig,
    jitter: Duration,
    mut on_result: impl FnMut(bool) + Send,
) {
    let start = tokio::time::Instant::now() + cfg.interval + jitter;
    let mut ticks = tokio::time::interval_at(start, cfg.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let ok = tokio::time::timeout(cfg.timeout, probe.probe())
            .await
            .unwrap_or(false);
        on_result(ok);
    }
}

/// A small, stable jitter for a backend: up to 5% of the interval, so a fleet's checks do
/// not pulse together, and never so much that three failed checks take much past 3 intervals.
pub fn jitter_for(id: u64, interval: Duration) -> Duration {
    let max = interval.as_millis() as u64 / 20;
    if max == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(crate::balance::random::mix64(id) % max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn cfg() -> HealthCheckConfig {
        HealthCheckConfig::default()
    }

    #[test]
    fn thresholds() {
        let h = Health::new(true);
        let c = cfg();
        assert_eq!(h.record(false, true, &c), None);
        assert_eq!(h.record(false, true, &c), None);
        assert_eq!(h.record(false, true, &c), Some(Transition::BecameUnhealthy));
        assert!(!h.is_healthy());
        assert_eq!(h.record(true, true, &c), None);
        assert_eq!(h.record(false, true, &c), None);
        assert_eq!(h.record(true, true, &c), None);
        assert_eq!(h.record(true, true, &c), Some(Transition::BecameHealthy));
        assert!(h.is_healthy());
    }

    #[test]
    fn passive_ejection_can_be_refused() {
        let h = Health::new(true);
        for _ in 0..10 {
            assert_eq!(h.record(false, false, &cfg()), None);
        }
        assert!(h.is_healthy());
        assert_eq!(
            h.record(false, true, &cfg()),
            Some(Transition::BecameUnhealthy)
        );
    }

    /// A probe the test flips between healthy, failing and stalling (past the timeout).
    #[derive(Clone, Default)]
    struct Switch {
        fail: Arc<AtomicBool>,
        stall: Arc<AtomicBool>,
    }

    impl Probe for Switch {
        async fn probe(&self) -> bool {
            if self.stall.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
            !self.fail.load(Ordering::SeqCst)
        }
    }

    async fn at(t0: tokio::time::Instant, secs: f64) {
        tokio::time::sleep_until(t0 + Duration::from_secs_f64(secs)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn three_failed_checks_at_30s_mark_unhealthy_at_90s_not_before() {
        let probe = Switch::default();
        probe.fail.store(true, Ordering::SeqCst);
        let health = Arc::new(Health::new(true));
        let transitions = Arc::new(std::sync::Mutex::new(Vec::new()));
        let t0 = tokio::time::Instant::now();
        let (log, h) = (transitions.clone(), health.clone());
        let task = tokio::spawn(run(probe.clone(), cfg(), Duration::ZERO, move |ok| {
            if let Some(t) = h.record(ok, true, &cfg()) {
                log.lock().unwrap().push((t, t0.elapsed()))
            }
        }));
        at(t0, 89.9).await;
        assert!(health.is_healthy(), "unhealthy before the third check");
        at(t0, 90.1).await;
        assert!(!health.is_healthy());
        assert_eq!(
            transitions.lock().unwrap()[0].0,
            Transition::BecameUnhealthy
        );
        assert_eq!(transitions.lock().unwrap()[0].1, Duration::from_secs(90));

        // Two successes (at 120 s and 150 s) bring it back.
        probe.fail.store(false, Ordering::SeqCst);
        at(t0, 120.1).await;
        assert!(!health.is_healthy());
        at(t0, 150.1).await;
        assert!(health.is_healthy());

        // A check that outlives its 5 s timeout is a failure.
        probe.stall.store(true, Ordering::SeqCst);
        at(t0, 240.0 + 4.9).await;
        assert!(health.is_healthy());
        at(t0, 240.0 + 5.1).await;
        assert!(
            !health.is_healthy(),
            "three timed-out checks should mark it unhealthy"
        );
        task.abort();
    }

    #[test]
    fn jitter_is_small_and_stable() {
        let i = Duration::from_secs(30);
        assert_eq!(jitter_for(42, i), jitter_for(42, i));
        assert!(jitter_for(42, i) < Duration::from_millis(1500));
    }
}
