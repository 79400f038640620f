//! The immutable picture the hot path reads: routes, pools, prebuilt selectors. Built from a
//! validated config, swapped whole through `ArcSwap`; every backend that stays keeps its
//! `BackendState` (counters, health, connections) from the previous snapshot.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_config::{BackendConfig, Config};

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

/// Resolves every backend host of `config` (IP literals need no lookup). A name that does
/// not resolve yields no backend for now; the error is logged and the pool keeps its others.
pub async fn resolve(config: &Config) -> Resolved {
    let mut out = Resolved::new();
    for pool in config.pools.values() {
        for b in &pool.backends {
            let key = (b.host.clone(), b.port);
            if out.contains_key(&key) {
                continue;
            }
            let addrs = resolve_one(b).await;
            out.insert(key, addrs);
        }
    }
    out
}

async fn resolve_one(b: &BackendConfig) -> Vec<SocketAddr> {
    if let Ok(ip) = b.host.parse::<std::net::IpAddr>() {
        return vec![SocketAddr::new(ip, b.port)];
    }
    match tokio::net::lookup_host((b.host.as_str(), b.port)).await {
        Ok(addrs) => {
            let mut v: Vec<_> = addrs.collect();
            v.sort();
            v.dedup();
            v
        }
        Err(e) => {
            tracing::warn!(backend = %b.address, error = %e, "backend host name does not resolve");
            Vec::new()
        }
    }
}

impl Snapshot {
    /// Builds the snapshot for `config`, reusing the live state of `previous`'s backends.
    pub fn build(
        config: Arc<Config>,
        resolved: &Resolved,
        previous: Option<&Snapshot>,
    ) -> Snapshot {
        let mut states: HashMap<BackendId, Arc<BackendState>> = HashMap::new();
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
                        Some(s) => s.clone(),
                        None => {
                            fresh.push(backends.len());
                            Arc::new(
                                BackendState::new(
                                    UpstreamClient::new(pc.connect_timeout),
                                    DEFAULT_RTT,
                                    pc.health_check.initially_healthy || !pc.health_check.enabled,
                                )
                                .with_pool_load(load.clone()),
                            )
                        }
                    };
                    backends.push(Arc::new(Backend::new(
                        name,
                        addr,
                        bc.address.clone(),
                        bc.weight,
                        state,
                    )));
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
        Snapshot::build(config, &resolved, None)
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
        let b = Snapshot::build(config, &resolved, Some(&a));
        assert!(Arc::ptr_eq(&before, &b.pools["api"].backends[0].state));
        assert_eq!(b.generation, a.generation + 1);
    }
}
