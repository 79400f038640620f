//! The immutable picture the hot path reads: routes, pools, prebuilt selectors. Built from a
//! validated config, swapped whole through `ArcSwap`; every backend that stays keeps its
//! `BackendState` (counters, health, connections) from the previous snapshot.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fulcrum_config::{Config, Scheme, UpstreamProtocol};

/// HTTP/2 backends: connections opened beyond the first as streams pass the cap.
const H2_EXTRA_CONNECTIONS: usize = 15;

use crate::balance::ewma::{now_ns, DEFAULT_RTT};
use crate::pool::{Backend, BackendId, BackendState, Pool};
use crate::route::{Route, Router};
use crate::upstream::UpstreamClient;

pub struct Snapshot {
    pub generation: u64,
    pub router: Router,
    pub pools: HashMap<String, Arc<Pool>>,
    pub config: Arc<Config>,
}

/// Addresses of every backend host name, as the resolver last saw them.
pub type Resolved = HashMap<(String, u16), Vec<SocketAddr>>;

/// Where backend host names are looked up: the system resolver in production; tests plug in
/// their own to change a name's addresses at will (DNS-driven membership without DNS).
pub trait Resolver: Send + Sync + 'static {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>>;
}

/// `getaddrinfo` through tokio.
pub struct SystemResolver;

impl Resolver for SystemResolver {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// Does any backend of `config` have a host name (not an IP literal)?
pub fn has_names(config: &Config) -> bool {
    config
        .pools
        .values()
        .flat_map(|p| &p.backends)
        .any(|b| b.host.parse::<std::net::IpAddr>().is_err())
}

/// Resolves the backend hosts of `config`: every name again when `refresh`, else only those
/// not in `known` (IP literals need no lookup). A name that fails to resolve keeps its last
/// known addresses (or none), and the error is logged: one bad lookup does not empty a pool.
pub async fn resolve(
    config: &Config,
    resolver: &dyn Resolver,
    known: &Resolved,
    refresh: bool,
) -> Resolved {
    let mut out = Resolved::new();
    for pool in config.pools.values() {
        for b in &pool.backends {
            let key = (b.host.clone(), b.port);
            if out.contains_key(&key) {
                continue;
            }
            let addrs = if let Ok(ip) = b.host.parse::<std::net::IpAddr>() {
                vec![SocketAddr::new(ip, b.port)]
            } else if let (false, Some(k)) = (refresh, known.get(&key)) {
                k.clone()
            } else {
                match resolver.lookup(&b.host, b.port).await {
                    Ok(mut v) => {
                        v.sort();
                        v.dedup();
                        v
                    }
                    Err(e) => {
                        tracing::warn!(backend = %b.address, error = %e, "backend host name does not resolve");
                        known.get(&key).cloned().unwrap_or_default()
                    }
                }
            };
            out.insert(key, addrs);
        }
    }
    out
}

impl Snapshot {
    /// Builds the snapshot for `config`, reusing the live state of `previous`'s backends and
    /// of backends still draining (`revive`: a backend put back before its drain ended keeps
    /// its state and stops draining).
    pub fn build(
        config: Arc<Config>,
        resolved: &Resolved,
        previous: Option<&Snapshot>,
        revive: &[Arc<Backend>],
    ) -> Snapshot {
        let now_instant = Instant::now();
        let mut states: HashMap<BackendId, Arc<BackendState>> = HashMap::new();
        for b in revive {
            states.insert(b.id, b.state.clone());
        }
        if let Some(prev) = previous {
            for pool in prev.pools.values() {
                for b in &pool.backends {
                    states.insert(b.id, b.state.clone());
                }
            }
        }
        let mut pools = HashMap::new();
        for (name, pc) in &config.pools {
            let load = previous
                .and_then(|p| p.pools.get(name))
                .map(|p| p.load.clone())
                .unwrap_or_default();
            let mut backends: Vec<Arc<Backend>> = Vec::new();
            // One TLS client config per pool with https:// backends.
            let upstream_tls = if pc.backends.iter().any(|b| b.scheme == Scheme::Https) {
                match crate::tls::upstream_client_config(pc.ca.as_deref(), pc.client_cert.as_ref())
                {
                    Ok(c) => Some(Arc::new(c)),
                    Err(e) => {
                        tracing::error!(pool = %name, error = %e, "upstream TLS config unusable; using the system roots only");
                        crate::tls::upstream_client_config(None, None)
                            .ok()
                            .map(Arc::new)
                    }
                }
            } else {
                None
            };
            let mut fresh = Vec::new();
            for bc in &pc.backends {
                let addrs = resolved
                    .get(&(bc.host.clone(), bc.port))
                    .map(Vec::as_slice)
                    .unwrap_or(&[]);
                for &addr in addrs {
                    let id = BackendId::new(name, addr);
                    if backends.iter().any(|b| b.id == id) {
                        continue;
                    }
                    let state = match states.get(&id) {
                        Some(s) => {
                            s.draining
                                .store(false, std::sync::atomic::Ordering::Relaxed);
                            s.clone()
                        }
                        None => {
                            fresh.push(backends.len());
                            // Each call is a client of its own (its own connections).
                            let client = || {
                                UpstreamClient::new(
                                    pc.connect_timeout,
                                    addr,
                                    (bc.scheme == Scheme::Https)
                                        .then(|| upstream_tls.clone())
                                        .flatten(),
                                    pc.protocol,
                                )
                            };
                            Arc::new(
                                BackendState::new(
                                    client(),
                                    DEFAULT_RTT,
                                    pc.health_check.initially_healthy || !pc.health_check.enabled,
                                )
                                .with_pool_load(load.clone())
                                .with_slots(pc.max_connections_per_backend)
                                .with_metrics(name, &addr.to_string())
                                .with_h2_connections(
                                    match pc.protocol {
                                        UpstreamProtocol::H2 | UpstreamProtocol::H2c => {
                                            (0..H2_EXTRA_CONNECTIONS).map(|_| client()).collect()
                                        }
                                        _ => Vec::new(),
                                    },
                                    pc.max_concurrent_streams,
                                ),
                            )
                        }
                    };
                    // Slow start: a backend that joined a running pool ramps its weight up from
                    // 10% over `slow_start` (the reload path rebuilds as the ramp advances).
                    let weight = match (pc.slow_start, previous) {
                        (Some(ramp), Some(_)) if !ramp.is_zero() => {
                            let f = now_instant
                                .saturating_duration_since(state.joined)
                                .as_secs_f64()
                                / ramp.as_secs_f64();
                            ((bc.weight as f64 * f.clamp(0.1, 1.0)).ceil() as u32).max(1)
                        }
                        _ => bc.weight,
                    };
                    let mut backend = Backend::new(name, addr, bc.address.clone(), weight, state);
                    backend.configured_weight = bc.weight;
                    if bc.scheme == Scheme::Https {
                        // The host name stays in the URI: SNI and the certificate check use it.
                        if let Ok(a) = http::uri::Authority::try_from(
                            format!("{}:{}", bc.host, bc.port).as_str(),
                        ) {
                            backend.authority = a;
                        }
                        backend.scheme = http::uri::Scheme::HTTPS;
                    }
                    backends.push(Arc::new(backend));
                }
            }
            // A new backend starts at its peers' mean latency, not at zero: no stampede onto it.
            let now = now_ns();
            let peers: Vec<f64> = (0..backends.len())
                .filter(|i| !fresh.contains(i))
                .map(|i| backends[i].state.latency.cost(now))
                .collect();
            if !peers.is_empty() && !fresh.is_empty() {
                let mean = peers.iter().sum::<f64>() / peers.len() as f64;
                for &i in &fresh {
                    backends[i]
                        .state
                        .latency
                        .set(Duration::from_nanos(mean as u64), now);
                }
            }
            pools.insert(
                name.clone(),
                Arc::new(Pool::new(pc.clone(), backends, load)),
            );
        }
        let routes = config
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, rc)| Route::new(i, rc.clone(), &pools))
            .collect();
        Snapshot {
            generation: previous.map_or(1, |p| p.generation + 1),
            router: Router::new(routes),
            pools,
            config,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn snapshot(text: &str) -> Snapshot {
        let config = Arc::new(Config::parse(text, "t.toml").unwrap());
        let mut resolved = Resolved::new();
        for p in config.pools.values() {
            for b in &p.backends {
                resolved.insert(
                    (b.host.clone(), b.port),
                    vec![SocketAddr::new(b.host.parse().unwrap(), b.port)],
                );
            }
        }
        Snapshot::build(config, &resolved, None, &[])
    }

    const ROUTES: &str = r#"
[[listeners]]
name = "http"
listen = "127.0.0.1:0"
[[listeners]]
name = "other"
listen = "127.0.0.1:0"

[[routes]]
pool = "default"
[[routes]]
host = "api.example.com"
path_prefix = "/v1"
pool = "api_v1"
[[routes]]
host = "api.example.com"
pool = "api"
[[routes]]
host = "*.example.com"
pool = "wild"
[[routes]]
path_prefix = "/static"
pool = "static"
[[routes]]
listener = "other"
path_prefix = "/only-other"
pool = "static"
[[routes]]
host = "api.example.com"
path_prefix = "/v1"
match_header = { name = "x-canary", value = "1" }
pool = "canary"

[pools.default]
backends = [{ address = "127.0.0.1:1" }]
[pools.api]
backends = [{ address = "127.0.0.1:2" }]
[pools.api_v1]
backends = [{ address = "127.0.0.1:3" }]
[pools.wild]
backends = [{ address = "127.0.0.1:4" }]
[pools.static]
backends = [{ address = "127.0.0.1:5" }]
[pools.canary]
backends = [{ address = "127.0.0.1:6" }]
"#;

    #[test]
    fn host_then_longest_prefix() {
        let s = snapshot(ROUTES);
        let h = HeaderMap::new();
        let pool = |l: &str, host: Option<&str>, path: &str| {
            s.router
                .find(l, host, path, &h)
                .map(|r| r.pool().name.to_string())
        };
        assert_eq!(
            pool("http", Some("api.example.com"), "/v1/users").as_deref(),
            Some("api_v1")
        );
        assert_eq!(
            pool("http", Some("API.example.com:8080"), "/v2").as_deref(),
            Some("api")
        );
        assert_eq!(
            pool("http", Some("www.example.com"), "/static/x").as_deref(),
            Some("wild")
        );
        assert_eq!(
            pool("http", Some("example.com"), "/static/x").as_deref(),
            Some("static")
        );
        assert_eq!(
            pool("http", Some("other.org"), "/").as_deref(),
            Some("default")
        );
        assert_eq!(pool("http", None, "/x").as_deref(), Some("default"));
        assert_eq!(
            pool("http", None, "/only-other").as_deref(),
            Some("default")
        );
        assert_eq!(
            pool("other", None, "/only-other").as_deref(),
            Some("static")
        );
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "1".parse().unwrap());
        let r = s
            .router
            .find("http", Some("api.example.com"), "/v1/a", &canary)
            .unwrap();
        assert_eq!(&*r.pool().name, "canary");
    }

    #[test]
    fn no_catch_all_means_no_route() {
        let text = ROUTES.replacen("[[routes]]\npool = \"default\"\n", "", 1);
        let s = snapshot(&text);
        assert!(s
            .router
            .find("http", Some("nothing.org"), "/", &HeaderMap::new())
            .is_none());
    }

    #[test]
    fn rebuild_keeps_backend_state() {
        let a = snapshot(ROUTES);
        let before = a.pools["api"].backends[0].state.clone();
        before
            .requests
            .fetch_add(7, std::sync::atomic::Ordering::Relaxed);
        let config = a.config.clone();
        let mut resolved = Resolved::new();
        for p in config.pools.values() {
            for b in &p.backends {
                resolved.insert(
                    (b.host.clone(), b.port),
                    vec![SocketAddr::new(b.host.parse().unwrap(), b.port)],
                );
            }
        }
        let b = Snapshot::build(config, &resolved, Some(&a), &[]);
        assert!(Arc::ptr_eq(&before, &b.pools["api"].backends[0].state));
        assert_eq!(b.generation, a.generation + 1);
    }
}
