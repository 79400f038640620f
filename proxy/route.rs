//! Routing: host (exact, then `*.suffix`, then any) and longest path prefix, plus an
//! optional header match. The tables are built with the snapshot; a lookup does no string
//! work beyond normalising the host.

use std::collections::HashMap;
use std::sync::Arc;

use fulcrum_config::{HostMatch, MatchHeader, RateLimitKey, RouteConfig, RouteTarget};
use http::HeaderMap;

use crate::balance::smooth_sequence;
use crate::pool::Pool;
use crate::ratelimit::RateLimiter;

pub enum Target {
    Pool(Arc<Pool>),
    /// Weighted split between pools (canaries): a precomputed smooth sequence, so the
    /// shares are exact over every cycle of total weight.
    Split {
        pools: Vec<Arc<Pool>>,
        sequence: Box<[u32]>,
        next: crate::balance::Cursor,
    },
}

pub struct Route {
    /// Position in the config, for logs and metrics.
    pub index: usize,
    pub listener: Option<Arc<str>>,
    pub path_prefix: Box<str>,
    pub match_header: Option<MatchHeader>,
    pub target: Target,
    pub config: RouteConfig,
    pub limiter: Option<Arc<RateLimiter>>,
    pub metrics: Arc<crate::metrics::RouteMetrics>,
}

impl Route {
    pub fn new(
        index: usize,
        config: RouteConfig,
        pools: &HashMap<String, Arc<Pool>>,
    ) -> Option<Route> {
        let target = match &config.target {
            RouteTarget::Pool(p) => Target::Pool(pools.get(p)?.clone()),
            RouteTarget::Split(split) => {
                let mut list = Vec::new();
                for (p, _) in split {
                    list.push(pools.get(p)?.clone());
                }
                let weights: Vec<u32> = split.iter().map(|(_, w)| *w).collect();
                Target::Split {
                    pools: list,
                    sequence: smooth_sequence(&weights).into_boxed_slice(),
                    next: crate::balance::Cursor::new(),
                }
            }
        };
        // The same route gets the same id on every instance (it keys the shared store).
        let route_id = crate::sticky::hash_value(
            format!(
                "{index}|{:?}|{}|{:?}",
                config.host, config.path_prefix, config.listener
            )
            .as_bytes(),
        );
        let label = format!(
            "{}{}",
            match &config.host {
                Some(HostMatch::Exact(h)) => h.clone(),
                Some(HostMatch::Suffix(s)) => format!("*{s}"),
                None => "*".to_string(),
            },
            config.path_prefix
        );
        Some(Route {
            metrics: Arc::new(crate::metrics::RouteMetrics::new(&label)),
            limiter: config
                .rate_limit
                .clone()
                .map(|rl| Arc::new(RateLimiter::new(rl, route_id))),
            index,
            listener: config.listener.as_deref().map(Arc::from),
            path_prefix: config.path_prefix.clone().into_boxed_str(),
            match_header: config.match_header.clone(),
            target,
            config,
        })
    }

    /// Whether this route reads request headers other than Host and Content-Type.
    fn reads_headers(&self) -> bool {
        let sticky = match &self.target {
            Target::Pool(p) => p.config.sticky.is_some(),
            Target::Split { pools, .. } => pools.iter().any(|p| p.config.sticky.is_some()),
        };
        let keyed = self
            .limiter
            .as_ref()
            .is_some_and(|l| matches!(l.config.key, RateLimitKey::Header(_)));
        sticky || keyed || self.match_header.is_some() || self.config.compression
    }

    /// The pool this request goes to.
    pub fn pool(&self) -> &Arc<Pool> {
        match &self.target {
            Target::Pool(p) => p,
            Target::Split {
                pools,
                sequence,
                next,
            } => {
                let i = next.next() % sequence.len().max(1);
                &pools[sequence.get(i).copied().unwrap_or(0) as usize]
            }
        }
    }

    fn matches(&self, listener: &str, path: &str, headers: &HeaderMap) -> bool {
        if let Some(l) = &self.listener {
            if &**l != listener {
                return false;
            }
        }
        if !path.starts_with(&*self.path_prefix) {
            return false;
        }
        match &self.match_header {
            None => true,
            Some(m) => headers
                .get_all(m.name.as_str())
                .iter()
                .any(|v| v.as_bytes() == m.value.as_bytes()),
        }
    }
}

#[derive(Default)]
pub struct Router {
    routes: Vec<Route>,
    /// Route indexes per exact host, longest prefix first.
    exact: HashMap<Box<str>, Vec<usize>>,
    /// `(".example.com", routes)`, longest suffix first.
    suffix: Vec<(Box<str>, Vec<usize>)>,
    /// Routes without a host, longest prefix first.
    any: Vec<usize>,
    /// Whether any route reads a request's headers beyond Host and Content-Type: a header
    /// match, compression (`Accept-Encoding`), a limit keyed by a header, a sticky pool.
    reads_headers: bool,
}

impl Router {
    pub fn new(routes: Vec<Route>) -> Router {
        let mut r = Router {
            routes,
            ..Default::default()
        };
        for (i, route) in r.routes.iter().enumerate() {
            match &route.config.host {
                Some(HostMatch::Exact(h)) => r.exact.entry(h.as_str().into()).or_default().push(i),
                Some(HostMatch::Suffix(s)) => match r.suffix.iter_mut().find(|(x, _)| &**x == s) {
                    Some((_, v)) => v.push(i),
                    None => r.suffix.push((s.as_str().into(), vec![i])),
                },
                None => r.any.push(i),
            }
        }
        let routes = &r.routes;
        // Longest prefix first; a route with a header match before one without, so a
        // canary rule is tried before the catch-all on the same prefix; else config order.
        let order = |v: &mut Vec<usize>| {
            v.sort_by_key(|&i| {
                (
                    std::cmp::Reverse(routes[i].path_prefix.len()),
                    routes[i].match_header.is_none(),
                    i,
                )
            })
        };
        r.exact.values_mut().for_each(order);
        r.suffix.iter_mut().for_each(|(_, v)| order(v));
        r.suffix.sort_by_key(|(s, _)| std::cmp::Reverse(s.len()));
        order(&mut r.any);
        r.reads_headers = r.routes.iter().any(Route::reads_headers);
        r
    }

    /// See [`Router::reads_headers`]: a request's kept lines must become its map first.
    pub fn reads_request_headers(&self) -> bool {
        self.reads_headers
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Finds the route for a request on `listener`. `host` is the Host header or
    /// `:authority`, as sent.
    pub fn find(
        &self,
        listener: &str,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> Option<&Route> {
        let first = |list: &[usize]| {
            list.iter()
                .map(|&i| &self.routes[i])
                .find(|r| r.matches(listener, path, headers))
        };
        if let Some(host) = host.and_then(normalize_host) {
            let host: &str = &host;
            if let Some(r) = self.exact.get(host).and_then(|l| first(l)) {
                return Some(r);
            }
            for (suffix, list) in &self.suffix {
                if host.len() > suffix.len() && host.ends_with(&**suffix) {
                    if let Some(r) = first(list) {
                        return Some(r);
                    }
                }
            }
        }
        first(&self.any)
    }
}

/// `Example.COM:8080.` → `example.com`; borrows unless the host needs lower-casing.
fn normalize_host(host: &str) -> Option<std::borrow::Cow<'_, str>> {
    let h = if let Some(rest) = host.strip_prefix('[') {
        // IPv6 literal: keep it whole, brackets off.
        rest.split(']').next().unwrap_or(rest)
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    let h = h.strip_suffix('.').unwrap_or(h);
    if h.is_empty() {
        return None;
    }
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(std::borrow::Cow::Owned(h.to_ascii_lowercase()))
    } else {
        Some(std::borrow::Cow::Borrowed(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_normalisation() {
        assert_eq!(normalize_host("Example.COM:8080").unwrap(), "example.com");
        assert_eq!(normalize_host("example.com.").unwrap(), "example.com");
        assert_eq!(normalize_host("[::1]:80").unwrap(), "::1");
        assert!(normalize_host(":80").is_none());
    }
}
