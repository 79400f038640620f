//! Pools of backends: the runtime `Backend` (rebuilt with each snapshot) and its live
//! `BackendState` (carried from one snapshot to the next for as long as the backend stays).

use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use std::collections::HashMap;
use std::net::IpAddr;

use fulcrum_config::{Algorithm, PoolConfig, StickyBy};
use http::HeaderMap;

use std::time::Duration;

use crate::balance::ewma::{now_ns, PeakEwma, FAILURE_PENALTY};
use crate::balance::{self, PickCtx, Selector};
use crate::breaker::{self, Breaker};
use crate::health::{self, Health};
use crate::padded::Padded;
use crate::sticky;
use crate::upstream::UpstreamClient;

/// A backend's identity: stable for the same pool and address, across reloads and across
/// fulcrum instances with the same config (FNV-1a, not the std hasher, whose keys are random).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendId(pub u64);

impl BackendId {
    pub fn new(pool: &str, addr: SocketAddr) -> BackendId {
        // Hashed byte by byte (not through `Hash`, whose encoding std may change).
        let mut h = Fnv1a::default();
        h.write(pool.as_bytes());
        h.write(&[0xff]);
        match addr.ip() {
            std::net::IpAddr::V4(ip) => h.write(&ip.octets()),
            std::net::IpAddr::V6(ip) => h.write(&ip.octets()),
        }
        h.write(&addr.port().to_be_bytes());
        BackendId(h.finish())
    }
}

impl std::fmt::Display for BackendId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[derive(Clone, Copy)]
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv1a {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Everything live about one backend. Shared by every snapshot that contains the backend.
pub struct BackendState {
    // Written per request by whichever worker carries it: each on lines of its own, apart
    // from the health and breaker words every pick reads (`crate::padded`).
    pub in_flight: Padded<AtomicU64>,
    pub requests: Padded<AtomicU64>,
    pub failures: AtomicU64,
    pub health: Health,
    pub breaker: Breaker,
    pub draining: AtomicBool,
    /// Open upgraded sessions (WebSocket) on this backend.
    pub sessions: AtomicU64,
    /// Set when this backend's drain times out: its open sessions close.
    pub close_sessions: tokio::sync::watch::Sender<bool>,
    /// In-flight requests of the whole pool (shared by its backends), for bounded-load
    /// hashing without a scan.
    pub pool_load: Arc<AtomicU64>,
    /// Request slots when the pool caps requests per backend.
    pub slots: Option<Arc<tokio::sync::Semaphore>>,
    /// When this backend first joined its pool (slow start ramps from here).
    pub joined: std::time::Instant,
    /// Prometheus handles (none for backends made outside a snapshot, as in benches).
    pub metrics: Option<crate::metrics::BackendMetrics>,
    /// Latency percentiles over the last seconds, for status and the dashboard.
    pub latency_window: Padded<crate::metrics::LatencyWindow>,
    /// Peak-EWMA latency, for least_response_time and status.
    pub latency: Padded<PeakEwma>,
    /// Keep-alive connections to this backend.
    pub client: UpstreamClient,
    /// HTTP/2 upstreams: more clients (each its own connection), used in turn as the
    /// streams in flight pass multiples of the per-connection cap.
    pub more_clients: Vec<UpstreamClient>,
    pub streams_per_connection: u64,
}

impl BackendState {
    /// A new backend, assumed to answer in `initial_rtt` until it has been measured.
    pub fn new(client: UpstreamClient, initial_rtt: Duration, healthy: bool) -> BackendState {
        BackendState {
            latency: Padded(PeakEwma::new(initial_rtt, now_ns())),
            joined: std::time::Instant::now(),
            metrics: None,
            latency_window: Default::default(),
            in_flight: Padded(AtomicU64::new(0)),
            requests: Padded(AtomicU64::new(0)),
            failures: AtomicU64::new(0),
            health: Health::new(healthy),
            breaker: Breaker::default(),
            sessions: AtomicU64::new(0),
            close_sessions: tokio::sync::watch::channel(false).0,
            pool_load: Arc::new(AtomicU64::new(0)),
            slots: None,
            more_clients: Vec::new(),
            streams_per_connection: u64::MAX,
            draining: AtomicBool::new(false),
            client,
        }
    }

    /// Registers the backend's metric handles.
    pub fn with_metrics(mut self, pool: &str, backend: &str) -> BackendState {
        self.metrics = Some(crate::metrics::BackendMetrics::new(pool, backend));
        self
    }

    /// HTTP/2: up to `connections` connections of `streams` streams each.
    pub fn with_h2_connections(mut self, more: Vec<UpstreamClient>, streams: u32) -> BackendState {
        self.more_clients = more;
        self.streams_per_connection = streams.max(1) as u64;
        self
    }

    /// The client (so the connection) a new request goes on: the first until its streams
    /// reach the cap, then the next, and so on (the last takes the overflow).
    pub fn client_for_next(&self) -> &UpstreamClient {
        if self.more_clients.is_empty() {
            return &self.client;
        }
        let n = (self.in_flight.load(Ordering::Relaxed).saturating_sub(1)
            / self.streams_per_connection) as usize;
        match n {
            0 => &self.client,
            n => &self.more_clients[(n - 1).min(self.more_clients.len() - 1)],
        }
    }

    /// Caps this backend at `n` requests at once (`max_connections_per_backend`).
    pub fn with_slots(mut self, n: Option<u32>) -> BackendState {
        self.slots = n.map(|n| Arc::new(tokio::sync::Semaphore::new(n as usize)));
        self
    }

    /// Counts this backend's requests into the pool-wide counter `load`.
    pub fn with_pool_load(mut self, load: Arc<AtomicU64>) -> BackendState {
        self.pool_load = load;
        self
    }

    /// Healthy and not draining (the breaker is asked separately, with the pool's config).
    pub fn is_eligible(&self) -> bool {
        self.health.is_healthy() && !self.draining.load(Ordering::Relaxed)
    }
}

impl Backend {
    pub fn new(
        pool: &str,
        addr: SocketAddr,
        spec: String,
        weight: u32,
        state: Arc<BackendState>,
    ) -> Backend {
        Backend {
            id: BackendId::new(pool, addr),
            addr,
            spec,
            weight,
            configured_weight: weight,
            scheme: http::uri::Scheme::HTTP,
            authority: http::uri::Authority::try_from(addr.to_string().as_str())
                .expect("a socket address is a valid authority"),
            state,
        }
    }
}

/// One backend as the current snapshot sees it.
pub struct Backend {
    pub id: BackendId,
    /// The resolved socket address requests go to.
    pub addr: SocketAddr,
    /// As written in the config (`api.internal:8080`); equals `addr` for IP literals.
    pub spec: String,
    /// The weight balancing uses now (below `configured_weight` during slow start).
    pub weight: u32,
    pub configured_weight: u32,
    /// `addr` (or `host:port` for https backends), prebuilt so a request only swaps in its
    /// path.
    pub authority: http::uri::Authority,
    pub scheme: http::uri::Scheme,
    pub state: Arc<BackendState>,
}

/// Counts a request in flight on a backend for as long as it lives (the response body
/// included), so least-connections and draining see streaming responses too.
pub struct InFlight(Arc<BackendState>, Option<tokio::sync::OwnedSemaphorePermit>);

impl InFlight {
    pub fn begin(state: &Arc<BackendState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.pool_load.fetch_add(1, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone(), None)
    }

    /// Holds the backend connection slot (`max_connections_per_backend`) until the end.
    pub fn hold(&mut self, permit: Option<tokio::sync::OwnedSemaphorePermit>) {
        self.1 = permit;
    }

    pub fn state(&self) -> &BackendState {
        &self.0
    }

    /// Records how the request went: the latency to the response head, or a failure
    /// (which counts as `FAILURE_PENALTY`, so a backend that fails fast never looks fast).
    pub fn record(&self, latency: Duration, ok: bool) {
        self.record_at(latency, ok, now_ns());
    }

    /// [`InFlight::record`] at `now` (`ewma::now_ns` scale).
    pub fn record_at(&self, latency: Duration, ok: bool, now: u64) {
        let s = &self.0;
        if ok {
            s.latency.observe(latency, now);
        } else {
            s.failures.fetch_add(1, Ordering::Relaxed);
            s.latency.observe(latency.max(FAILURE_PENALTY), now);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.pool_load.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pool {
    pub name: Arc<str>,
    pub algorithm: Algorithm,
    pub backends: Vec<Arc<Backend>>,
    pub selector: Box<dyn Selector>,
    pub config: PoolConfig,
    /// Healthy backends, recounted on every health transition (rare), read per request to
    /// decide panic mode without a scan.
    healthy: AtomicUsize,
    panic: AtomicBool,
    pub retry_budget: RetryBudget,
    pub rng: balance::random::SplitMix,
    /// Requests in flight on the whole pool; carried across reloads with the pool.
    pub load: Arc<AtomicU64>,
    /// Requests waiting for a backend slot.
    pub pending: std::sync::atomic::AtomicU32,
    /// Backend index by id, for sticky cookies.
    pub by_id: HashMap<BackendId, usize>,
    /// The consistent-hash table for `sticky = { header = ... }`.
    sticky_table: Option<balance::IpHash>,
}

/// The backend chosen for a request, and whether the response must (re)issue the sticky
/// cookie.
pub struct Picked<'a> {
    pub backend: &'a Arc<Backend>,
    pub set_cookie: bool,
}

impl<'a> Picked<'a> {
    fn plain(backend: &'a Arc<Backend>) -> Picked<'a> {
        Picked {
            backend,
            set_cookie: false,
        }
    }
}

/// Milliseconds on the process clock, for breaker timers.
pub fn now_ms() -> u64 {
    now_ns() / 1_000_000
}

impl Pool {
    /// `load` must be the counter every backend's state points at (`with_pool_load`).
    pub fn new(config: PoolConfig, backends: Vec<Arc<Backend>>, load: Arc<AtomicU64>) -> Pool {
        let sticky_table = match config.sticky.as_ref().map(|s| &s.by) {
            Some(StickyBy::Header(_)) => Some(balance::IpHash::new(
                &backends.iter().map(|b| b.id.0).collect::<Vec<_>>(),
                &backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
                None,
            )),
            _ => None,
        };
        let pool = Pool {
            pending: std::sync::atomic::AtomicU32::new(0),
            by_id: backends
                .iter()
                .enumerate()
                .map(|(i, b)| (b.id, i))
                .collect(),
            sticky_table,
            load,
            name: Arc::from(config.name.as_str()),
            algorithm: config.algorithm,
            selector: balance::build(&config, &backends),
            healthy: AtomicUsize::new(0),
            panic: AtomicBool::new(false),
            retry_budget: RetryBudget::new(config.retry.budget_percent),
            rng: balance::random::SplitMix::new(now_ns()),
            backends,
            config,
        };
        pool.recount_healthy();
        pool
    }

    /// Panic mode (Envoy's panic threshold): some, but fewer than `panic_threshold` percent,
    /// of the backends are healthy; then health is ignored rather than crushing the few left.
    pub fn in_panic(&self) -> bool {
        let healthy = self.healthy.load(Ordering::Relaxed);
        healthy > 0 && healthy * 100 < self.config.panic_threshold as usize * self.backends.len()
    }

    /// Recounts healthy backends after a health transition; logs entering and leaving panic.
    pub fn recount_healthy(&self) -> usize {
        let healthy = self
            .backends
            .iter()
            .filter(|b| b.state.health.is_healthy())
            .count();
        self.healthy.store(healthy, Ordering::Relaxed);
        let panic = self.in_panic();
        if self.panic.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(pool = %self.name, healthy, total = self.backends.len(), "panic mode: balancing over all backends, healthy or not");
            } else {
                tracing::info!(pool = %self.name, healthy, total = self.backends.len(), "panic mode over");
            }
        }
        healthy
    }

    /// Picks a backend for one request: the sticky backend when the request names one that
    /// may take it, else the selector over backends that are healthy (or any, in panic
    /// mode), not draining, whose breaker lets a request through, and not in `exclude`
    /// (backends a retry already tried). Takes the breaker's permit.
    pub fn pick(
        &self,
        client: IpAddr,
        headers: &HeaderMap,
        exclude: &[BackendId],
    ) -> Option<Picked<'_>> {
        let Some(sticky) = &self.config.sticky else {
            return self
                .choose(client, exclude, |ctx| {
                    self.selector.pick(&self.backends, ctx)
                })
                .map(Picked::plain);
        };
        match &sticky.by {
            StickyBy::Cookie(name) => {
                if let Some(&i) =
                    sticky::cookie_backend(headers, name).and_then(|id| self.by_id.get(&id))
                {
                    if let Some(b) =
                        self.choose(client, exclude, |ctx| (ctx.eligible)(i).then_some(i))
                    {
                        return Some(Picked::plain(b));
                    }
                }
                // No cookie, or its backend is gone or unavailable: balance, and (re)issue it.
                self.choose(client, exclude, |ctx| {
                    self.selector.pick(&self.backends, ctx)
                })
                .map(|backend| Picked {
                    backend,
                    set_cookie: true,
                })
            }
            StickyBy::Header(name) => {
                let key = headers
                    .get(name.as_str())
                    .map(|v| sticky::hash_value(v.as_bytes()));
                match (key, &self.sticky_table) {
                    (Some(key), Some(table)) => self.choose(client, exclude, |ctx| {
                        table.pick_key(key, &self.backends, ctx)
                    }),
                    _ => self.choose(client, exclude, |ctx| {
                        self.selector.pick(&self.backends, ctx)
                    }),
                }
                .map(Picked::plain)
            }
        }
    }

    /// Runs `select` with the eligibility predicate, then takes the chosen backend's breaker
    /// permit; a half-open breaker that ran out of permits since the check sends us on.
    fn choose(
        &self,
        client: IpAddr,
        exclude: &[BackendId],
        select: impl Fn(&PickCtx<'_>) -> Option<usize>,
    ) -> Option<&Arc<Backend>> {
        let backends = &self.backends;
        let panic = self.in_panic();
        // The clock is read only if a breaker met is not closed (`Breaker::is_closed`): a read
        // is a vDSO call (~40 ns here).
        let clock = std::cell::OnceCell::new();
        let now = || *clock.get_or_init(now_ms);
        let cb = &self.config.circuit_breaker;
        let mut refused = [BackendId(0); 4];
        for n_refused in 0..refused.len() {
            let eligible = |i: usize| {
                let b = &backends[i];
                let s = &b.state;
                (panic || s.health.is_healthy())
                    && !s.draining.load(Ordering::Relaxed)
                    && (s.breaker.is_closed() || s.breaker.would_allow(now(), cb))
                    && !exclude.contains(&b.id)
                    && !refused[..n_refused].contains(&b.id)
            };
            let ctx = PickCtx {
                client,
                eligible: &eligible,
            };
            let b = &backends[select(&ctx)?];
            let (allowed, t) = if b.state.breaker.is_closed() {
                (true, None)
            } else {
                b.state.breaker.apply(breaker::Event::Acquire, now(), cb)
            };
            if let Some(t) = t {
                log_breaker(&self.name, b, t);
            }
            if allowed {
                return Some(b);
            }
            refused[n_refused] = b.id;
        }
        None
    }

    /// Records how a request to `backend` went in its breaker and, when passive detection is
    /// on, its health (never ejecting more than `max_ejection_percent` of the pool).
    pub fn observe(&self, backend: &Backend, ok: bool) {
        self.observe_at(backend, ok, now_ns());
    }

    /// [`Pool::observe`] at `now` (`ewma::now_ns` scale).
    pub fn observe_at(&self, backend: &Backend, ok: bool, now: u64) {
        let s = &backend.state;
        let event = if ok {
            breaker::Event::Success
        } else {
            breaker::Event::Failure
        };
        if let (_, Some(t)) = s
            .breaker
            .apply(event, now / 1_000_000, &self.config.circuit_breaker)
        {
            log_breaker(&self.name, backend, t);
        }
        let hc = &self.config.health_check;
        if !(hc.enabled && hc.passive) {
            return;
        }
        let t = if ok {
            s.health.record_passive_success(hc)
        } else {
            s.health.record(false, self.may_eject(), hc)
        };
        if let Some(t) = t {
            self.health_transition(backend, t, "passive");
        }
    }

    /// Passive ejection is allowed while fewer than `max_ejection_percent` are unhealthy.
    fn may_eject(&self) -> bool {
        let n = self.backends.len();
        let unhealthy = n - self.healthy.load(Ordering::Relaxed).min(n);
        (unhealthy + 1) * 100 <= self.config.health_check.max_ejection_percent as usize * n
    }

    /// Logs a health change once and recounts the pool.
    pub fn health_transition(&self, backend: &Backend, t: health::Transition, source: &str) {
        match t {
            health::Transition::BecameUnhealthy => {
                tracing::warn!(pool = %self.name, backend = %backend.addr, source, "backend marked unhealthy")
            }
            health::Transition::BecameHealthy => {
                tracing::info!(pool = %self.name, backend = %backend.addr, source, "backend healthy again")
            }
        }
        if let Some(m) = &backend.state.metrics {
            m.health_transitions.increment(1);
        }
        self.recount_healthy();
    }
}

fn log_breaker(pool: &str, b: &Backend, t: breaker::Transition) {
    if let Some(m) = &b.state.metrics {
        m.breaker_transitions.increment(1);
    }
    tracing::warn!(pool, backend = %b.addr, from = t.from.name(), to = t.to.name(), "circuit breaker");
}

/// Retries may add at most `percent` of the requests (Finagle's retry budget): every
/// request deposits `percent / 100` of a token, every retry withdraws one. A small reserve
/// lets the first retries of a quiet pool through; the cap keeps a long calm period from
/// saving up a retry storm.
pub struct RetryBudget {
    /// Milli-tokens.
    tokens: AtomicI64,
    percent: i64,
}

pub const RETRY_RESERVE: i64 = 10;

impl RetryBudget {
    pub fn new(percent: u32) -> RetryBudget {
        RetryBudget {
            tokens: AtomicI64::new(RETRY_RESERVE * 1000),
            percent: percent as i64,
        }
    }

    pub fn deposit(&self) {
        let cap = RETRY_RESERVE * 1000;
        if self.tokens.load(Ordering::Relaxed) < cap {
            self.tokens.fetch_add(self.percent * 10, Ordering::Relaxed);
        }
    }

    pub fn try_withdraw(&self) -> bool {
        let mut current = self.tokens.load(Ordering::Relaxed);
        while current >= 1000 {
            match self.tokens.compare_exchange_weak(
                current,
                current - 1000,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_id_is_stable_and_distinct() {
        let a: SocketAddr = "10.0.0.1:80".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(BackendId::new("api", a), BackendId::new("api", a));
        assert_ne!(BackendId::new("api", a), BackendId::new("api", b));
        assert_ne!(BackendId::new("api", a), BackendId::new("web", a));
        // Fixed across builds and machines (a fleet agrees on sticky ids): the FNV-1a of
        // "api", 0xff, the address octets and the port, computed once by hand.
        assert_eq!(BackendId::new("api", a).to_string(), "7a4affa24570ff6d");
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn retry_budget_allows_the_reserve_then_the_share() {
        let b = RetryBudget::new(20);
        let mut retries = 0;
        for _ in 0..1000 {
            b.deposit();
            // Every request wants two retries (everything is failing).
            for _ in 0..2 {
                retries += b.try_withdraw() as usize;
            }
        }
        assert!(retries <= 200 + RETRY_RESERVE as usize, "{retries}");
        assert!(retries >= 200, "{retries}");
    }
}
