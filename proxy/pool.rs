//! Pools of backends: the runtime `Backend` (rebuilt with each snapshot) and its live
//! `BackendState` (carried from one snapshot to the next for as long as the backend stays).

use std::hash::Hasher;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use fulcrum_config::{Algorithm, PoolConfig};

use std::time::Duration;

use crate::balance::ewma::{now_ns, PeakEwma, FAILURE_PENALTY};
use crate::balance::{self, PickCtx, Selector};
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
    pub in_flight: AtomicU64,
    pub requests: AtomicU64,
    pub failures: AtomicU64,
    pub healthy: AtomicBool,
    pub draining: AtomicBool,
    /// Peak-EWMA latency, for least_response_time and status.
    pub latency: PeakEwma,
    /// Keep-alive connections to this backend.
    pub client: UpstreamClient,
}

impl BackendState {
    /// A new backend, assumed to answer in `initial_rtt` until it has been measured.
    pub fn new(client: UpstreamClient, initial_rtt: Duration) -> BackendState {
        BackendState {
            latency: PeakEwma::new(initial_rtt, now_ns()),
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            client,
        }
    }

    /// May new requests go here?
    pub fn is_eligible(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.draining.load(Ordering::Relaxed)
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
    pub weight: u32,
    /// `http://addr`, prebuilt so a request only swaps in its path.
    pub authority: http::uri::Authority,
    pub state: Arc<BackendState>,
}

/// Counts a request in flight on a backend for as long as it lives (the response body
/// included), so least-connections and draining see streaming responses too.
pub struct InFlight(Arc<BackendState>);

impl InFlight {
    pub fn begin(state: &Arc<BackendState>) -> InFlight {
        state.in_flight.fetch_add(1, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(state.clone())
    }

    pub fn state(&self) -> &BackendState {
        &self.0
    }

    /// Records how the request went: the latency to the response head, or a failure
    /// (which counts as `FAILURE_PENALTY`, so a backend that fails fast never looks fast).
    pub fn record(&self, latency: Duration, ok: bool) {
        let s = &self.0;
        if ok {
            s.latency.observe(latency, now_ns());
        } else {
            s.failures.fetch_add(1, Ordering::Relaxed);
            s.latency.observe(latency.max(FAILURE_PENALTY), now_ns());
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pool {
    pub name: Arc<str>,
    pub algorithm: Algorithm,
    pub backends: Vec<Arc<Backend>>,
    pub selector: Box<dyn Selector>,
    pub config: PoolConfig,
}

impl Pool {
    pub fn new(config: PoolConfig, backends: Vec<Arc<Backend>>) -> Pool {
        Pool {
            name: Arc::from(config.name.as_str()),
            algorithm: config.algorithm,
            selector: balance::build(&config, &backends),
            backends,
            config,
        }
    }

    /// Picks a backend for one request, skipping ineligible ones.
    pub fn pick(&self, client: std::net::IpAddr) -> Option<&Arc<Backend>> {
        let backends = &self.backends;
        let eligible = |i: usize| backends[i].state.is_eligible();
        let ctx = PickCtx {
            client,
            eligible: &eligible,
        };
        self.selector.pick(backends, &ctx).map(|i| &backends[i])
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
        // Fixed across builds and machines: a fleet agrees on sticky ids.
        assert_eq!(
            BackendId::new("api", a).to_string(),
            format!("{:016x}", BackendId::new("api", a).0)
        );
        let mut h = Fnv1a::default();
        h.write(b"api\xff");
        h.write(&[10, 0, 0, 1, 0, 80]);
        assert_eq!(BackendId::new("api", a).0, h.finish());
    }
}
