//! Metrics: every name in one place, the Prometheus recorder, and the handles the hot path
//! uses. Handles are registered once (a backend's when it joins, a route's when the
//! snapshot is built), so recording a request is an atomic add, never a label allocation.
//! Gauges that mirror live state (in-flight, health, breaker, sessions) are set at scrape
//! time from the snapshot instead of on every request.

use std::sync::atomic::Ordering;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram as Hdr;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::server::Shared;

pub const REQUESTS_TOTAL: &str = "fulcrum_requests_total";
pub const ROUTE_REQUESTS_TOTAL: &str = "fulcrum_route_requests_total";
pub const REQUEST_DURATION: &str = "fulcrum_request_duration_seconds";
pub const BACKEND_UP: &str = "fulcrum_backend_up";
pub const BACKEND_INFLIGHT: &str = "fulcrum_backend_inflight";
pub const BACKEND_DRAINING: &str = "fulcrum_backend_draining";
pub const BREAKER_STATE: &str = "fulcrum_breaker_state";
pub const WEBSOCKET_SESSIONS: &str = "fulcrum_websocket_sessions";
pub const HEALTH_CHECKS: &str = "fulcrum_health_check_total";
pub const HEALTH_TRANSITIONS: &str = "fulcrum_health_transitions_total";
pub const BREAKER_TRANSITIONS: &str = "fulcrum_breaker_transitions_total";
pub const RATELIMITED: &str = "fulcrum_ratelimited_total";
pub const RATELIMIT_STORE_ERRORS: &str = "fulcrum_ratelimit_store_errors_total";
pub const CONNECTIONS: &str = "fulcrum_connections";
/// Of those, idle keep-alive connections parked off their tasks (`[server] idle_park_after`).
pub const CONNECTIONS_PARKED: &str = "fulcrum_connections_parked";
pub const CONFIG_RELOADS: &str = "fulcrum_config_reloads_total";
pub const TLS_HANDSHAKES: &str = "fulcrum_tls_handshakes_total";
pub const POOL_PANIC: &str = "fulcrum_pool_panic";
pub const ACCESS_LOG_DROPPED: &str = "fulcrum_access_log_dropped_total";

/// Upper bounds of the request-duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process); handles made before it would be
/// no-ops, so the server calls this first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), &DURATION_BUCKETS)
                .ok()?
                // Gauges of backends that left stop being set at scrape time: drop them.
                .idle_timeout(metrics_util::MetricKindMask::GAUGE, Some(Duration::from_secs(120)))
                .build_recorder();
            let handle = recorder.handle();
            match metrics::set_global_recorder(recorder) {
                Ok(()) => Some(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "a metrics recorder was already installed: /metrics will be empty");
                    None
                }
            }
        })
        .as_ref()
}

/// Histograms keep every sample until they are summarised, which a scrape does: without
/// a scraper they would grow by 8 bytes a request for ever. Summarises every 5 s.
pub fn spawn_upkeep() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(h) = install() {
                h.run_upkeep();
            }
        }
    })
}

/// `1xx`..`5xx` as an index 0..=4.
pub fn code_class(status: u16) -> usize {
    ((status / 100).clamp(1, 5) - 1) as usize
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A backend's handles, made when it joins its pool.
pub struct BackendMetrics {
    by_class: [Counter; 5],
    duration: Histogram,
    pub health_checks_ok: Counter,
    pub health_checks_failed: Counter,
    pub health_transitions: Counter,
    pub breaker_transitions: Counter,
}

impl BackendMetrics {
    pub fn new(pool: &str, backend: &str) -> BackendMetrics {
        let (pool, backend) = (pool.to_string(), backend.to_string());
        BackendMetrics {
            by_class: CLASSES.map(|c| {
                metrics::counter!(REQUESTS_TOTAL, "pool" => pool.clone(), "backend" => backend.clone(), "code_class" => c)
            }),
            duration: metrics::histogram!(REQUEST_DURATION, "pool" => pool.clone(), "backend" => backend.clone()),
            health_checks_ok: metrics::counter!(HEALTH_CHECKS, "pool" => pool.clone(), "backend" => backend.clone(), "result" => "success"),
            health_checks_failed: metrics::counter!(HEALTH_CHECKS, "pool" => pool.clone(), "backend" => backend.clone(), "result" => "failure"),
            health_transitions: metrics::counter!(HEALTH_TRANSITIONS, "pool" => pool.clone(), "backend" => backend.clone()),
            breaker_transitions: metrics::counter!(BREAKER_TRANSITIONS, "pool" => pool, "backend" => backend),
        }
    }

    /// One answer from this backend (or fulcrum's own 502/504 for it).
    pub fn observe(&self, status: u16, latency: Duration) {
        self.by_class[code_class(status)].increment(1);
        self.duration.record(latency.as_secs_f64());
    }
}

/// A route's handles.
pub struct RouteMetrics {
    by_class: [Counter; 5],
    pub ratelimited: Counter,
}

impl RouteMetrics {
    pub fn new(route: &str) -> RouteMetrics {
        let route = route.to_string();
        RouteMetrics {
            by_class: CLASSES.map(|c| metrics::counter!(ROUTE_REQUESTS_TOTAL, "route" => route.clone(), "code_class" => c)),
            ratelimited: metrics::counter!(RATELIMITED, "route" => route),
        }
    }

    pub fn observe(&self, status: u16) {
        self.by_class[code_class(status)].increment(1);
    }
}

/// A backend's latency over a sliding window (the last 10 to 20 seconds): two HDR
/// histograms, the current one and the one before, rotated every `WINDOW`.
pub struct LatencyWindow {
    inner: Mutex<(Hdr<u64>, Hdr<u64>, Instant)>,
}

const WINDOW: Duration = Duration::from_secs(10);

impl Default for LatencyWindow {
    fn default() -> Self {
        let h = || Hdr::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid");
        LatencyWindow {
            inner: Mutex::new((h(), h(), Instant::now())),
        }
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub count: u64,
}

impl LatencyWindow {
    pub fn record(&self, latency: Duration) {
        self.record_at(latency, Instant::now());
    }

    /// [`LatencyWindow::record`] with the clock already read. A sample that finds the window
    /// in use (another worker recording, or `/status` reading it) is left out rather than
    /// waited for: a worker never blocks on another thread here, and the percentiles of a
    /// window lose nothing that matters when a few of its thousands of samples are missing.
    pub fn record_at(&self, latency: Duration, now: Instant) {
        let Ok(mut g) = self.inner.try_lock() else {
            return;
        };
        let (cur, prev, since) = &mut *g;
        if now.saturating_duration_since(*since) >= WINDOW {
            std::mem::swap(cur, prev);
            cur.reset();
            *since = now;
        }
        let _ = cur.record((latency.as_micros() as u64).clamp(1, 60_000_000));
    }

    pub fn percentiles(&self) -> Percentiles {
        let Ok(g) = self.inner.lock() else {
            return Percentiles::default();
        };
        let mut all = g.0.clone();
        let _ = all.add(&g.1);
        let ms = |q: f64| all.value_at_quantile(q) as f64 / 1000.0;
        Percentiles {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            count: all.len(),
        }
    }
}

/// The `/metrics` text: live gauges refreshed from the snapshot, then everything rendered.
pub fn render(shared: &Shared) -> String {
    let Some(handle) = install() else {
        return String::new();
    };
    let snap = shared.snapshot.load();
    for pool in snap.pools.values() {
        let p = pool.name.to_string();
        metrics::gauge!(POOL_PANIC, "pool" => p.clone()).set(pool.in_panic() as u8 as f64);
        for b in &pool.backends {
            backend_gauges(&p, b, false);
        }
    }
    for d in shared.drains_lock().iter() {
        backend_gauges(&d.pool, &d.backend, true);
    }
    for (result, n) in [
        ("applied", shared.changes_applied.load(Ordering::Relaxed)),
        ("rejected", shared.changes_rejected.load(Ordering::Relaxed)),
    ] {
        metrics::counter!(CONFIG_RELOADS, "result" => result).absolute(n);
    }
    metrics::counter!(RATELIMIT_STORE_ERRORS).absolute(shared.store_errors.load(Ordering::Relaxed));
    metrics::gauge!(CONNECTIONS_PARKED).set(shared.parking.count() as f64);
    handle.render()
}

fn backend_gauges(pool: &str, b: &crate::pool::Backend, draining: bool) {
    let s = &b.state;
    let labels = [("pool", pool.to_string()), ("backend", b.addr.to_string())];
    metrics::gauge!(BACKEND_UP, &labels).set(s.health.is_healthy() as u8 as f64);
    metrics::gauge!(BACKEND_INFLIGHT, &labels).set(s.in_flight.load(Ordering::Relaxed) as f64);
    metrics::gauge!(BACKEND_DRAINING, &labels)
        .set((draining || s.draining.load(Ordering::Relaxed)) as u8 as f64);
    metrics::gauge!(WEBSOCKET_SESSIONS, &labels).set(s.sessions.load(Ordering::Relaxed) as f64);
    let breaker = match s.breaker.state() {
        crate::breaker::BreakerState::Closed => 0.0,
        crate::breaker::BreakerState::HalfOpen => 1.0,
        crate::breaker::BreakerState::Open => 2.0,
    };
    metrics::gauge!(BREAKER_STATE, &labels).set(breaker);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latency_window_never_waits_for_a_held_window() {
        let w = LatencyWindow::default();
        let t0 = Instant::now();
        w.record_at(Duration::from_millis(3), t0);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            // Held elsewhere (another worker, a status read): the sample is dropped at once.
            // (Held inside the scope, so a failing wait releases it before the join.)
            let held = w.inner.lock().unwrap();
            s.spawn(|| {
                w.record_at(Duration::from_millis(5), t0);
                tx.send(()).unwrap();
            });
            rx.recv_timeout(Duration::from_secs(5))
                .expect("record_at returned while the window was held");
            drop(held);
        });
        assert_eq!(w.percentiles().count, 1);
        w.record_at(Duration::from_millis(5), t0);
        assert_eq!(w.percentiles().count, 2, "recorded again once free");
    }

    #[test]
    fn classes() {
        assert_eq!(code_class(200), 1);
        assert_eq!(code_class(101), 0);
        assert_eq!(code_class(503), 4);
        assert_eq!(code_class(99), 0);
        assert_eq!(code_class(999), 4);
    }

    #[test]
    fn latency_window_percentiles() {
        let w = LatencyWindow::default();
        for ms in 1..=100 {
            w.record(Duration::from_millis(ms));
        }
        let p = w.percentiles();
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.0).abs() < 1.0, "{p:?}");
        assert!((p.p99 - 99.0).abs() < 1.5, "{p:?}");
    }
}
