//! Metrics: every name in one place, the Prometheus recorder, and the handles the hot path
//! uses. Handles are registered once (a backend's when it joins, a route's when the
//! snapshot is built), so recording a request is an atomic add, never a label allocation.
//! Gauges that mirror live state (in-flight, health, breaker, sessions) are set at scrape
//! time from the snapshot instead of on every request.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram as Hdr;
use metrics::Counter;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::padded::PerWorker;
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

/// Upper bounds of the request-duration histogram: in nanoseconds, and as the `le` label
/// that says it in seconds.
const DURATION_BUCKETS: [(u64, &str); 14] = [
    (500_000, "0.0005"),
    (1_000_000, "0.001"),
    (2_500_000, "0.0025"),
    (5_000_000, "0.005"),
    (10_000_000, "0.01"),
    (25_000_000, "0.025"),
    (50_000_000, "0.05"),
    (100_000_000, "0.1"),
    (250_000_000, "0.25"),
    (500_000_000, "0.5"),
    (1_000_000_000, "1"),
    (2_500_000_000, "2.5"),
    (5_000_000_000, "5"),
    (10_000_000_000, "10"),
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder (once per process); handles made before it would be
/// no-ops, so the server calls this first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
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

/// `N` request counters kept per worker, each worker's on cache lines of its own, so two
/// workers counting at once never pull a line from each other's core (Envoy's per-worker
/// stats, HAProxy's per-thread counters); added into the exporter's counters when /metrics
/// is rendered ([`render`]) and when the set is dropped (a route replaced by a reload, a
/// backend gone), so no count is lost. Measured under two workers: the exporter's shared
/// counter was 0.8 % of fulcrum's samples, most of it the line moving between cores.
pub struct Tally<const N: usize> {
    shards: PerWorker<[AtomicU64; N]>,
    counters: [Counter; N],
}

impl<const N: usize> Tally<N> {
    pub fn new(counters: [Counter; N]) -> Tally<N> {
        Tally {
            shards: PerWorker::new(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            counters,
        }
    }

    /// One more on counter `i`, in this worker's shard.
    pub fn add(&self, i: usize) {
        self.shards.mine()[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Moves every shard's counts into the exporter's counters.
    pub fn drain(&self) {
        for (i, counter) in self.counters.iter().enumerate() {
            let n: u64 = self
                .shards
                .iter()
                .map(|s| s[i].swap(0, Ordering::Relaxed))
                .sum();
            if n > 0 {
                counter.increment(n);
            }
        }
    }
}

impl<const N: usize> Drop for Tally<N> {
    fn drop(&mut self) {
        self.drain();
    }
}

/// `fulcrum_request_duration_seconds` of one backend: a count per bucket and the sum, as
/// relaxed atomics in per-worker shards (as [`Tally`]), summed when rendered by [`render`].
/// The exporter's own histograms keep every sample (8 bytes, in blocks it allocates) until
/// an upkeep task sums them into buckets; here a request costs a bucket search and two
/// adds on its worker's own lines, and there is nothing to sum up later.
pub struct DurationHistogram {
    shards: PerWorker<DurationShard>,
}

struct DurationShard {
    /// Not cumulative: `[i]` counts samples in `(bound[i-1], bound[i]]`; the last, above all.
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl Default for DurationHistogram {
    fn default() -> Self {
        DurationHistogram {
            shards: PerWorker::new(|_| DurationShard {
                buckets: std::array::from_fn(|_| AtomicU64::new(0)),
                sum_ns: AtomicU64::new(0),
            }),
        }
    }
}

impl DurationHistogram {
    pub fn record(&self, latency: Duration) {
        let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        let i = DURATION_BUCKETS.partition_point(|&(bound, _)| bound < ns);
        let shard = self.shards.mine();
        shard.buckets[i].fetch_add(1, Ordering::Relaxed);
        shard.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Appends this histogram's Prometheus lines (buckets cumulative, `+Inf`, sum, count).
    fn render(&self, out: &mut String, labels: &str) {
        let mut cumulative = 0;
        let les = DURATION_BUCKETS.iter().map(|&(_, le)| le).chain(["+Inf"]);
        for (i, le) in les.enumerate() {
            cumulative += self
                .shards
                .iter()
                .map(|s| s.buckets[i].load(Ordering::Relaxed))
                .sum::<u64>();
            let _ = writeln!(
                out,
                "{REQUEST_DURATION}_bucket{{{labels},le=\"{le}\"}} {cumulative}"
            );
        }
        let sum_ns: u64 = self
            .shards
            .iter()
            .map(|s| s.sum_ns.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add);
        let sum = sum_ns as f64 / 1e9;
        let _ = writeln!(out, "{REQUEST_DURATION}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{REQUEST_DURATION}_count{{{labels}}} {cumulative}");
    }
}

/// A label value as the exposition format wants it: `\`, `"` and newlines escaped.
fn label_value(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
        .into()
}

/// `1xx`..`5xx` as an index 0..=4.
pub fn code_class(status: u16) -> usize {
    ((status / 100).clamp(1, 5) - 1) as usize
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// A backend's handles, made when it joins its pool.
pub struct BackendMetrics {
    pub by_class: Tally<5>,
    duration: DurationHistogram,
    pub health_checks_ok: Counter,
    pub health_checks_failed: Counter,
    pub health_transitions: Counter,
    pub breaker_transitions: Counter,
}

impl BackendMetrics {
    pub fn new(pool: &str, backend: &str) -> BackendMetrics {
        let (pool, backend) = (pool.to_string(), backend.to_string());
        BackendMetrics {
            by_class: Tally::new(CLASSES.map(|c| {
                metrics::counter!(REQUESTS_TOTAL, "pool" => pool.clone(), "backend" => backend.clone(), "code_class" => c)
            })),
            duration: DurationHistogram::default(),
            health_checks_ok: metrics::counter!(HEALTH_CHECKS, "pool" => pool.clone(), "backend" => backend.clone(), "result" => "success"),
            health_checks_failed: metrics::counter!(HEALTH_CHECKS, "pool" => pool.clone(), "backend" => backend.clone(), "result" => "failure"),
            health_transitions: metrics::counter!(HEALTH_TRANSITIONS, "pool" => pool.clone(), "backend" => backend.clone()),
            breaker_transitions: metrics::counter!(BREAKER_TRANSITIONS, "pool" => pool, "backend" => backend),
        }
    }

    /// One answer from this backend (or fulcrum's own 502/504 for it).
    pub fn observe(&self, status: u16, latency: Duration) {
        self.by_class.add(code_class(status));
        self.duration.record(latency);
    }
}

/// A route's handles.
pub struct RouteMetrics {
    pub by_class: Tally<5>,
    pub ratelimited: Counter,
}

impl RouteMetrics {
    pub fn new(route: &str) -> RouteMetrics {
        let route = route.to_string();
        RouteMetrics {
            by_class: Tally::new(CLASSES.map(|c| metrics::counter!(ROUTE_REQUESTS_TOTAL, "route" => route.clone(), "code_class" => c))),
            ratelimited: metrics::counter!(RATELIMITED, "route" => route),
        }
    }

    pub fn observe(&self, status: u16) {
        self.by_class.add(code_class(status));
    }
}

/// A backend's latency over a sliding window (the last 10 to 20 seconds): two HDR
/// histograms, the current one and the one before, rotated every `WINDOW`.
pub struct LatencyWindow {
    /// The current histogram, the one before, and when the current one's window ends.
    inner: Mutex<(Hdr<u64>, Hdr<u64>, Instant)>,
}

const WINDOW: Duration = Duration::from_secs(10);

impl Default for LatencyWindow {
    fn default() -> Self {
        let h = || Hdr::new_with_bounds(1, 60_000_000, 2).expect("constant bounds are valid");
        LatencyWindow {
            inner: Mutex::new((h(), h(), Instant::now() + WINDOW)),
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
        // The window's end is kept, not its start: a comparison per sample, not a subtraction.
        let (cur, prev, until) = &mut *g;
        if now >= *until {
            std::mem::swap(cur, prev);
            cur.reset();
            *until = now + WINDOW;
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

/// The `/metrics` text: live gauges refreshed from the snapshot, then everything rendered,
/// then the request-duration histograms of the backends in service or draining.
pub fn render(shared: &Shared) -> String {
    let Some(handle) = install() else {
        return String::new();
    };
    let snap = shared.snapshot.load();
    let mut durations = format!("# TYPE {REQUEST_DURATION} histogram\n");
    let mut duration = |pool: &str, b: &crate::pool::Backend| {
        if let Some(m) = &b.state.metrics {
            let labels = format!(
                "pool=\"{}\",backend=\"{}\"",
                label_value(pool),
                label_value(&b.addr.to_string())
            );
            m.duration.render(&mut durations, &labels);
            m.by_class.drain();
        }
    };
    for route in snap.router.routes() {
        route.metrics.by_class.drain();
    }
    for pool in snap.pools.values() {
        let p = pool.name.to_string();
        metrics::gauge!(POOL_PANIC, "pool" => p.clone()).set(pool.in_panic() as u8 as f64);
        for b in &pool.backends {
            backend_gauges(&p, b, false);
            duration(&p, b);
        }
    }
    for d in shared.drains_lock().iter() {
        backend_gauges(&d.pool, &d.backend, true);
        duration(&d.pool, &d.backend);
    }
    for (result, n) in [
        ("applied", shared.changes_applied.load(Ordering::Relaxed)),
        ("rejected", shared.changes_rejected.load(Ordering::Relaxed)),
    ] {
        metrics::counter!(CONFIG_RELOADS, "result" => result).absolute(n);
    }
    metrics::counter!(RATELIMIT_STORE_ERRORS).absolute(shared.store_errors.load(Ordering::Relaxed));
    metrics::gauge!(CONNECTIONS_PARKED).set(shared.parking.count() as f64);
    let mut text = handle.render();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&durations);
    text
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
    fn a_tally_loses_no_count_to_drains_or_drop() {
        use std::sync::Arc;
        let totals: [Arc<AtomicU64>; 2] = std::array::from_fn(|_| Arc::new(AtomicU64::new(0)));
        let tally = Arc::new(Tally::new(totals.clone().map(Counter::from_arc)));
        let threads: Vec<_> = (0..4)
            .map(|k| {
                let tally = tally.clone();
                std::thread::spawn(move || {
                    for n in 0..1000 {
                        tally.add((n + k) % 2);
                        if n % 97 == 0 {
                            tally.drain();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        tally.drain();
        let total = |i: usize| totals[i].load(Ordering::Relaxed);
        assert_eq!((total(0), total(1)), (2000, 2000));
        tally.add(1);
        tally.add(1);
        assert_eq!(total(1), 2000, "counted before a drain");
        drop(Arc::into_inner(tally));
        assert_eq!(total(1), 2002, "a dropped tally keeps its last counts");
    }

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
    fn duration_buckets_are_upper_bounds_and_render_cumulative() {
        let h = DurationHistogram::default();
        for us in [100, 500, 501, 3_000, 20_000_000] {
            h.record(Duration::from_micros(us));
        }
        let mut out = String::new();
        h.render(&mut out, "pool=\"p\",backend=\"b\"");
        let value = |series: &str| -> f64 {
            let line = out.lines().find(|l| l.starts_with(series)).expect(series);
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let bucket = |le: &str| {
            value(&format!(
                "{REQUEST_DURATION}_bucket{{pool=\"p\",backend=\"b\",le=\"{le}\"}}"
            ))
        };
        // 0.5 ms is in the 0.5 ms bucket (`le` is inclusive), 0.501 ms is not.
        assert_eq!(bucket("0.0005"), 2.0);
        assert_eq!(bucket("0.001"), 3.0);
        assert_eq!(bucket("0.005"), 4.0);
        assert_eq!(bucket("10"), 4.0);
        assert_eq!(bucket("+Inf"), 5.0);
        assert_eq!(value(&format!("{REQUEST_DURATION}_count")), 5.0);
        let sum = value(&format!("{REQUEST_DURATION}_sum"));
        assert!((sum - 20.004101).abs() < 1e-9, "{sum}");
        assert_eq!(out.lines().count(), 17);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
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
