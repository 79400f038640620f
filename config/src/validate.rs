//! From the raw file to a typed [`Config`]: defaults filled in, every rule checked, every
//! violation reported with its place in the file.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use toml::Spanned;

use crate::raw::*;
use crate::*;

struct Validator<'a> {
    path: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl<'a> Validator<'a> {
    fn err<T>(&mut self, span: &Spanned<T>, message: impl Into<String>) {
        self.err_at(span.span().start, message);
    }

    fn err_at(&mut self, at: usize, message: impl Into<String>) {
        self.errors
            .push(ConfigError::at(self.path, self.text, at, message));
    }

    fn duration(&mut self, v: &Option<Spanned<String>>, key: &str, default: Duration) -> Duration {
        match v {
            None => default,
            Some(s) => match parse_duration(s.get_ref()) {
                Ok(d) => d,
                Err(m) => {
                    self.err(s, format!("{key}: {m}"));
                    default
                }
            },
        }
    }

    /// An integer in `min..=max`.
    fn int(
        &mut self,
        v: &Option<Spanned<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: i64,
    ) -> i64 {
        match v {
            None => default,
            Some(s) => {
                let n = *s.get_ref();
                if n < min || n > max {
                    self.err(s, format!("{key} must be between {min} and {max}, got {n}"));
                    default
                } else {
                    n
                }
            }
        }
    }

    fn opt_int(&mut self, v: &Option<Spanned<i64>>, key: &str, min: i64, max: i64) -> Option<i64> {
        v.as_ref().map(|_| self.int(v, key, min, max, min))
    }

    fn socket_addr(&mut self, s: &Spanned<String>, key: &str) -> Option<SocketAddr> {
        let text = s.get_ref();
        let parsed = if let Some(port) = text.strip_prefix("localhost:") {
            format!("127.0.0.1:{port}").parse()
        } else {
            text.parse()
        };
        match parsed {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(
                    s,
                    format!("{key}: invalid address {text:?}: expected ip:port such as \"0.0.0.0:8080\""),
                );
                None
            }
        }
    }
}

pub(crate) fn validate(raw: RawConfig, path: &str, text: &str) -> Result<Config, ConfigErrors> {
    let mut v = Validator {
        path,
        text,
        errors: Vec::new(),
    };

    let server = server(&mut v, &raw.server);

    let admin = match &raw.admin {
        None => AdminConfig {
            listen: DEFAULT_ADMIN_LISTEN.parse().expect("constant address"),
            token: None,
        },
        Some(a) => AdminConfig {
            listen: a
                .listen
                .as_ref()
                .and_then(|l| v.socket_addr(l, "admin.listen"))
                .unwrap_or_else(|| DEFAULT_ADMIN_LISTEN.parse().expect("constant address")),
            token: a.token.clone().filter(|t| !t.is_empty()),
        },
    };

    let access_log = raw.access_log.as_ref().map(|a| AccessLogConfig {
        path: a.path.get_ref().clone(),
        format: match a.format.as_ref().map(|f| f.get_ref().as_str()) {
            None | Some("json") => AccessLogFormat::Json,
            Some("combined") => AccessLogFormat::Combined,
            Some(other) => {
                let f = a.format.as_ref().expect("matched Some");
                v.err(f, format!("access_log.format: unknown format {other:?}: expected \"json\" or \"combined\""));
                AccessLogFormat::Json
            }
        },
    });

    // Listeners.
    if raw.listeners.is_empty() {
        v.err_at(0, "no [[listeners]]: at least one listener is needed");
    }
    let mut listeners = Vec::new();
    let mut names = HashSet::new();
    let mut addrs: HashMap<SocketAddr, String> = HashMap::new();
    for l in &raw.listeners {
        let l = l.get_ref();
        let name = l.name.get_ref().clone();
        if name.is_empty() {
            v.err(&l.name, "listener name must not be empty");
        } else if !names.insert(name.clone()) {
            v.err(&l.name, format!("duplicate listener name {name:?}"));
        }
        let listen = v.socket_addr(&l.listen, "listen");
        if let Some(a) = listen {
            if a.port() != 0 {
                if let Some(other) = addrs.insert(a, name.clone()) {
                    v.err(
                        &l.listen,
                        format!(
                            "listener {name:?} listens on {a}, already used by listener {other:?}"
                        ),
                    );
                }
                if a == admin.listen {
                    v.err(
                        &l.listen,
                        format!("listener {name:?} listens on {a}, already used by [admin]"),
                    );
                }
            }
        }
        let mut trusted = Vec::new();
        for t in &l.trusted_proxies {
            match parse_cidr(t.get_ref()) {
                Ok(c) => trusted.push(c),
                Err(m) => v.err(t, format!("trusted_proxies: {m}")),
            }
        }
        let tls = l.tls.as_ref().map(|t| tls(&mut v, t));
        let max_connections = v
            .opt_int(&l.max_connections, "max_connections", 1, u32::MAX as i64)
            .map(|n| n as u32);
        let max_connections_per_ip = v
            .opt_int(
                &l.max_connections_per_ip,
                "max_connections_per_ip",
                1,
                u32::MAX as i64,
            )
            .map(|n| n as u32);
        if let Some(listen) = listen {
            listeners.push(ListenerConfig {
                name,
                listen,
                proxy_protocol: l.proxy_protocol,
                trusted_proxies: trusted,
                redirect_https: l.redirect_https,
                tls,
                max_connections,
                max_connections_per_ip,
                forwarded_headers: l.forwarded_headers,
                request_id: l.request_id,
            });
        }
    }

    // Pools.
    let mut pools = BTreeMap::new();
    for (name, p) in &raw.pools {
        if let Some(pool) = pool(&mut v, name, p) {
            pools.insert(name.get_ref().clone(), pool);
        }
    }

    // Routes.
    let mut routes = Vec::new();
    for r in &raw.routes {
        if let Some(route) = route(&mut v, r, &names, &raw.pools) {
            routes.push(route);
        }
    }

    let redis = raw.redis.as_ref().and_then(|r| {
        let url = r.url.get_ref();
        if !(url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("unix://"))
        {
            v.err(
                &r.url,
                format!("redis.url: expected redis://host:port, got {url:?}"),
            );
            return None;
        }
        Some(RedisConfig {
            url: url.clone(),
            timeout: v.duration(&r.timeout, "redis.timeout", Duration::from_millis(50)),
        })
    });
    if redis.is_none() && raw.redis.is_none() {
        for r in &raw.routes {
            if let Some(scope) = r
                .get_ref()
                .rate_limit
                .as_ref()
                .and_then(|rl| rl.get_ref().scope.as_ref())
            {
                if scope.get_ref() == "global" {
                    v.err(scope, "rate_limit.scope = \"global\" needs a [redis] table with the shared store's url");
                }
            }
        }
    }

    if v.errors.is_empty() {
        Ok(Config {
            server,
            admin,
            listeners,
            routes,
            pools,
            access_log,
            redis,
        })
    } else {
        v.errors.sort_by_key(|e| e.position());
        Err(ConfigErrors(v.errors))
    }
}

fn server(v: &mut Validator, s: &RawServer) -> ServerConfig {
    let d = ServerConfig::default();
    ServerConfig {
        drain_timeout: v.duration(&s.drain_timeout, "drain_timeout", d.drain_timeout),
        worker_threads: v
            .opt_int(&s.worker_threads, "worker_threads", 1, 1024)
            .map(|n| n as usize),
        threading: match s.threading.as_ref() {
            None => d.threading,
            Some(t) => match t.get_ref().as_str() {
                "per_core" => Threading::PerCore,
                "work_stealing" => Threading::WorkStealing,
                other => {
                    v.err(
                        t,
                        format!(
                            "threading: expected \"per_core\" or \"work_stealing\", got {other:?}"
                        ),
                    );
                    d.threading
                }
            },
        },
        request_header_timeout: v.duration(
            &s.request_header_timeout,
            "request_header_timeout",
            d.request_header_timeout,
        ),
        idle_timeout: v.duration(&s.idle_timeout, "idle_timeout", d.idle_timeout),
        idle_park_after: v.duration(&s.idle_park_after, "idle_park_after", d.idle_park_after),
        max_request_header_bytes: v.int(
            &s.max_request_header_bytes,
            "max_request_header_bytes",
            8192,
            16 * 1024 * 1024,
            d.max_request_header_bytes as i64,
        ) as usize,
        max_requests_per_connection: v
            .opt_int(
                &s.max_requests_per_connection,
                "max_requests_per_connection",
                1,
                i64::MAX,
            )
            .map(|n| n as u64),
        batch_sends: s.batch_sends.unwrap_or(d.batch_sends),
        pin_workers: s.pin_workers.unwrap_or(d.pin_workers),
        busy_poll: v.duration(&s.busy_poll, "busy_poll", d.busy_poll),
        watch_config: s.watch_config.unwrap_or(d.watch_config),
        resolve_interval: v.duration(&s.resolve_interval, "resolve_interval", d.resolve_interval),
        upgrade_socket: s.upgrade_socket.as_ref().map(|p| p.get_ref().clone()),
        websocket_idle_timeout: v.duration(
            &s.websocket_idle_timeout,
            "websocket_idle_timeout",
            d.websocket_idle_timeout,
        ),
    }
}

fn tls(v: &mut Validator, t: &Spanned<RawTls>) -> TlsConfig {
    let r = t.get_ref();
    if r.certificates.is_empty() {
        v.err(t, "tls: at least one certificate is needed");
    }
    let hsts = r
        .hsts
        .as_ref()
        .map(|_| v.duration(&r.hsts, "tls.hsts", Duration::ZERO));
    TlsConfig {
        certificates: r
            .certificates
            .iter()
            .map(|c| CertificateConfig {
                cert: c.get_ref().cert.get_ref().clone(),
                key: c.get_ref().key.get_ref().clone(),
            })
            .collect(),
        client_ca: r.client_ca.as_ref().map(|c| c.get_ref().clone()),
        hsts,
    }
}

fn parse_cidr(text: &str) -> Result<Cidr, String> {
    let bad = || {
        format!("invalid network {text:?}: expected an address or address/prefix such as \"10.0.0.0/8\"")
    };
    let (addr, prefix) = match text.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (text, None),
    };
    let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p.parse::<u8>().map_err(|_| bad())?,
    };
    if prefix > max {
        return Err(bad());
    }
    Ok(Cidr { addr, prefix })
}

fn pool(v: &mut Validator, name: &Spanned<String>, p: &Spanned<RawPool>) -> Option<PoolConfig> {
    let r = p.get_ref();
    let pname = name.get_ref();
    let mut pool = PoolConfig::new(pname, Algorithm::RoundRobin, Vec::new());
    if let Some(a) = &r.algorithm {
        match Algorithm::ALL.iter().find(|(n, _)| n == a.get_ref()) {
            Some((_, alg)) => pool.algorithm = *alg,
            None => {
                let known: Vec<_> = Algorithm::ALL.iter().map(|(n, _)| *n).collect();
                v.err(
                    a,
                    format!(
                        "pool {pname:?}: unknown algorithm {:?}: expected one of {}",
                        a.get_ref(),
                        known.join(", ")
                    ),
                );
            }
        }
    }
    if r.backends.is_empty() && !r.dynamic {
        v.err(p, format!("pool {pname:?} has no backends (set `dynamic = true` for a pool filled by the admin API)"));
    }
    let mut seen = HashSet::new();
    for b in &r.backends {
        let rb = b.get_ref();
        let weight = v.int(&rb.weight, "weight", 1, 65_535, 1) as u32;
        match BackendConfig::parse(rb.address.get_ref(), weight) {
            Ok(bc) => {
                if !seen.insert((bc.host.to_ascii_lowercase(), bc.port)) {
                    v.err(
                        &rb.address,
                        format!(
                            "pool {pname:?}: duplicate backend {:?}",
                            rb.address.get_ref()
                        ),
                    );
                }
                pool.backends.push(bc);
            }
            Err(m) => v.err(&rb.address, m),
        }
    }
    if let Some(s) = &r.sticky {
        let rs = s.get_ref();
        let by = match (&rs.cookie, &rs.header) {
            (Some(c), None) if valid_token(c.get_ref()) => {
                Some(StickyBy::Cookie(c.get_ref().clone()))
            }
            (None, Some(h)) if valid_token(h.get_ref()) => {
                Some(StickyBy::Header(h.get_ref().to_ascii_lowercase()))
            }
            (Some(c), None) => {
                v.err(
                    c,
                    format!("sticky.cookie: invalid cookie name {:?}", c.get_ref()),
                );
                None
            }
            (None, Some(h)) => {
                v.err(
                    h,
                    format!("sticky.header: invalid header name {:?}", h.get_ref()),
                );
                None
            }
            _ => {
                v.err(s, "sticky: set exactly one of `cookie` or `header`");
                None
            }
        };
        let ttl = rs
            .ttl
            .as_ref()
            .map(|_| v.duration(&rs.ttl, "sticky.ttl", Duration::ZERO));
        if let Some(by) = by {
            pool.sticky = Some(StickyConfig {
                by,
                ttl,
                secure: rs.secure,
                http_only: rs.http_only,
            });
        }
    }
    pool.max_connections_per_backend = v
        .opt_int(
            &r.max_connections_per_backend,
            "max_connections_per_backend",
            1,
            u32::MAX as i64,
        )
        .map(|n| n as u32);
    pool.max_pending = v
        .opt_int(&r.max_pending, "max_pending", 0, u32::MAX as i64)
        .map(|n| n as u32);
    pool.queue_timeout = v.duration(&r.queue_timeout, "queue_timeout", pool.queue_timeout);
    pool.connect_timeout = v.duration(&r.connect_timeout, "connect_timeout", pool.connect_timeout);
    pool.timeout = v.duration(&r.timeout, "timeout", pool.timeout);
    if let Some(f) = &r.hash_balance_factor {
        if *f.get_ref() < 1.0 || !f.get_ref().is_finite() {
            v.err(
                f,
                format!(
                    "hash_balance_factor must be at least 1.0, got {}",
                    f.get_ref()
                ),
            );
        } else {
            pool.hash_balance_factor = Some(*f.get_ref());
        }
    }
    pool.dynamic = r.dynamic;
    pool.slow_start = r
        .slow_start
        .as_ref()
        .map(|_| v.duration(&r.slow_start, "slow_start", Duration::ZERO));

    pool.ca = r.ca.as_ref().map(|c| c.get_ref().clone());
    pool.client_cert = match (&r.client_cert, &r.client_key) {
        (Some(c), Some(k)) => Some(CertificateConfig {
            cert: c.get_ref().clone(),
            key: k.get_ref().clone(),
        }),
        (None, None) => None,
        (Some(c), None) => {
            v.err(c, "client_cert needs client_key too");
            None
        }
        (None, Some(k)) => {
            v.err(k, "client_key needs client_cert too");
            None
        }
    };
    if let Some(p) = &r.protocol {
        pool.protocol = match p.get_ref().as_str() {
            "http1" => UpstreamProtocol::Http1,
            "h2" => UpstreamProtocol::H2,
            "h2c" => UpstreamProtocol::H2c,
            "auto" => UpstreamProtocol::Auto,
            other => {
                v.err(
                    p,
                    format!(
                        "protocol: expected \"http1\", \"h2\", \"h2c\" or \"auto\", got {other:?}"
                    ),
                );
                UpstreamProtocol::Http1
            }
        };
    }
    pool.max_concurrent_streams = v.int(
        &r.max_concurrent_streams,
        "max_concurrent_streams",
        1,
        1_000_000,
        100,
    ) as u32;
    pool.panic_threshold = v.int(&r.panic_threshold, "panic_threshold", 0, 100, 50) as u32;
    if let Some(h) = &r.health_check {
        let d = HealthCheckConfig::default();
        let hc = &mut pool.health_check;
        hc.enabled = h.enabled.unwrap_or(true);
        if let Some(k) = &h.kind {
            match k.get_ref().as_str() {
                "http" => hc.kind = HealthCheckKind::Http,
                "tcp" => hc.kind = HealthCheckKind::Tcp,
                "grpc" => hc.kind = HealthCheckKind::Grpc,
                other => v.err(
                    k,
                    format!("health_check.type: unknown type {other:?}: expected \"http\", \"tcp\" or \"grpc\""),
                ),
            }
        }
        if let Some(p) = &h.path {
            if p.get_ref().starts_with('/') {
                hc.path = p.get_ref().clone();
            } else {
                v.err(
                    p,
                    format!(
                        "health_check.path must start with '/', got {:?}",
                        p.get_ref()
                    ),
                );
            }
        }
        hc.interval = v.duration(&h.interval, "health_check.interval", d.interval);
        hc.timeout = v.duration(&h.timeout, "health_check.timeout", d.timeout);
        if hc.interval.is_zero() {
            if let Some(i) = &h.interval {
                v.err(i, "health_check.interval must be more than zero");
            }
        }
        hc.unhealthy_threshold =
            v.int(&h.unhealthy_threshold, "unhealthy_threshold", 1, 1000, 3) as u32;
        hc.healthy_threshold = v.int(&h.healthy_threshold, "healthy_threshold", 1, 1000, 2) as u32;
        hc.passive = h.passive.unwrap_or(true);
        hc.grpc_service = h
            .service
            .as_ref()
            .map(|s| s.get_ref().clone())
            .unwrap_or_default();
        hc.max_ejection_percent =
            v.int(&h.max_ejection_percent, "max_ejection_percent", 0, 100, 50) as u32;
        if let Some(i) = &h.initially {
            match i.get_ref().as_str() {
                "healthy" => hc.initially_healthy = true,
                "unhealthy" => hc.initially_healthy = false,
                other => v.err(i, format!("health_check.initially: expected \"healthy\" or \"unhealthy\", got {other:?}")),
            }
        }
    }
    if let Some(b) = &r.circuit_breaker {
        let d = CircuitBreakerConfig::default();
        pool.circuit_breaker = CircuitBreakerConfig {
            enabled: b.enabled.unwrap_or(true),
            failure_threshold: v.int(&b.failure_threshold, "failure_threshold", 1, 100_000, 5)
                as u32,
            open_duration: v.duration(
                &b.open_duration,
                "circuit_breaker.open_duration",
                d.open_duration,
            ),
            half_open_requests: v.int(&b.half_open_requests, "half_open_requests", 1, 100_000, 1)
                as u32,
        };
    }
    if let Some(rt) = &r.retry {
        let d = RetryConfig::default();
        pool.retry = RetryConfig {
            attempts: v.int(&rt.attempts, "retry.attempts", 0, 10, 2) as u32,
            backoff: v.duration(&rt.backoff, "retry.backoff", d.backoff),
            budget_percent: v.int(&rt.budget_percent, "retry.budget_percent", 0, 100, 20) as u32,
            grpc_retry_on: rt
                .retry_on
                .iter()
                .flatten()
                .filter_map(|c| match c.get_ref().as_str() {
                    "cancelled" => Some(1),
                    "deadline_exceeded" => Some(4),
                    "resource_exhausted" => Some(8),
                    "internal" => Some(13),
                    "unavailable" => Some(14),
                    other => {
                        v.err(c, format!("retry.retry_on: unknown gRPC status {other:?}: expected cancelled, deadline_exceeded, resource_exhausted, internal or unavailable"));
                        None
                    }
                })
                .collect(),
        };
    }
    Some(pool)
}

/// An HTTP token (header and cookie names).
fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn route(
    v: &mut Validator,
    r: &Spanned<RawRoute>,
    listeners: &HashSet<String>,
    pools: &BTreeMap<Spanned<String>, Spanned<RawPool>>,
) -> Option<RouteConfig> {
    let rr = r.get_ref();
    let pool_exists = |name: &str| pools.keys().any(|k| k.get_ref() == name);
    if let Some(l) = &rr.listener {
        if !listeners.contains(l.get_ref()) {
            v.err(
                l,
                format!(
                    "route names listener {:?}, which is not defined",
                    l.get_ref()
                ),
            );
        }
    }
    let host = rr.host.as_ref().and_then(|h| {
        let text = h.get_ref().to_ascii_lowercase();
        let ok_chars = |s: &str| {
            !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        };
        if let Some(suffix) = text.strip_prefix("*.") {
            if ok_chars(suffix) {
                return Some(HostMatch::Suffix(format!(".{suffix}")));
            }
        } else if ok_chars(&text) && !text.contains('*') {
            return Some(HostMatch::Exact(text));
        }
        v.err(h, format!("host: invalid host {:?}: expected a name such as \"api.example.com\" or \"*.example.com\"", h.get_ref()));
        None
    });
    let path_prefix = match &rr.path_prefix {
        None => "/".to_string(),
        Some(p) if p.get_ref().starts_with('/') => p.get_ref().clone(),
        Some(p) => {
            v.err(
                p,
                format!("path_prefix must start with '/', got {:?}", p.get_ref()),
            );
            "/".to_string()
        }
    };
    let target = match (&rr.pool, &rr.pools) {
        (Some(p), None) => {
            if !pool_exists(p.get_ref()) {
                v.err(
                    p,
                    format!("route names pool {:?}, which is not defined", p.get_ref()),
                );
            }
            Some(RouteTarget::Pool(p.get_ref().clone()))
        }
        (None, Some(split)) => {
            if split.get_ref().is_empty() {
                v.err(split, "pools: the split needs at least one pool");
            }
            let mut out = Vec::new();
            for wp in split.get_ref() {
                let w = wp.get_ref();
                if !pool_exists(w.pool.get_ref()) {
                    v.err(
                        &w.pool,
                        format!(
                            "route names pool {:?}, which is not defined",
                            w.pool.get_ref()
                        ),
                    );
                }
                let weight = v.int(&w.weight, "weight", 0, 1_000_000, 1) as u32;
                out.push((w.pool.get_ref().clone(), weight));
            }
            if !out.is_empty() && out.iter().all(|(_, w)| *w == 0) {
                v.err(split, "pools: at least one weight must be above zero");
            }
            Some(RouteTarget::Split(out))
        }
        (Some(p), Some(_)) => {
            v.err(p, "a route takes `pool` or `pools`, not both");
            None
        }
        (None, None) => {
            v.err(r, "route has no `pool` (or `pools`)");
            None
        }
    };
    let match_header = rr.match_header.as_ref().and_then(|m| {
        let name = m.get_ref().name.get_ref();
        if valid_token(name) {
            Some(MatchHeader {
                name: name.to_ascii_lowercase(),
                value: m.get_ref().value.clone(),
            })
        } else {
            v.err(
                &m.get_ref().name,
                format!("match_header.name: invalid header name {name:?}"),
            );
            None
        }
    });
    let rate_limit = rr.rate_limit.as_ref().map(|rl| {
        let x = rl.get_ref();
        let per_second = *x.per_second.get_ref();
        if !(per_second > 0.0 && per_second.is_finite()) {
            v.err(
                &x.per_second,
                format!("rate_limit.per_second must be above zero, got {per_second}"),
            );
        }
        let default_burst = per_second.ceil().clamp(1.0, u32::MAX as f64) as i64;
        let burst = v.int(
            &x.burst,
            "rate_limit.burst",
            1,
            u32::MAX as i64,
            default_burst,
        ) as u32;
        let key = match x.key.as_ref().map(|k| k.get_ref().as_str()) {
            None | Some("client_ip") => RateLimitKey::ClientIp,
            Some("route") => RateLimitKey::Route,
            Some(k) if k.starts_with("header:") && valid_token(&k[7..]) => {
                RateLimitKey::Header(k[7..].to_ascii_lowercase())
            }
            Some(k) => {
                let span = x.key.as_ref().expect("matched Some");
                v.err(
                    span,
                    format!("rate_limit.key: expected client_ip, route or header:NAME, got {k:?}"),
                );
                RateLimitKey::ClientIp
            }
        };
        let global = match x.scope.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("local") => false,
            Some("global") => true,
            Some(s) => {
                let span = x.scope.as_ref().expect("matched Some");
                v.err(
                    span,
                    format!("rate_limit.scope: expected \"local\" or \"global\", got {s:?}"),
                );
                false
            }
        };
        let deny_on_store_error = match x.on_store_error.as_ref().map(|s| s.get_ref().as_str()) {
            None | Some("allow") => false,
            Some("deny") => true,
            Some(s) => {
                let span = x.on_store_error.as_ref().expect("matched Some");
                v.err(
                    span,
                    format!("rate_limit.on_store_error: expected \"allow\" or \"deny\", got {s:?}"),
                );
                false
            }
        };
        RateLimitConfig {
            per_second,
            burst,
            key,
            global,
            deny_on_store_error,
        }
    });
    Some(RouteConfig {
        listener: rr.listener.as_ref().map(|l| l.get_ref().clone()),
        host,
        path_prefix,
        target: target?,
        match_header,
        rate_limit,
        compression: rr.compression.unwrap_or(false),
        upgrades: match &rr.upgrades {
            None => vec!["websocket".to_string()],
            Some(list) => list
                .iter()
                .filter_map(|u| {
                    if valid_token(u.get_ref()) {
                        Some(u.get_ref().to_ascii_lowercase())
                    } else {
                        v.err(
                            u,
                            format!("upgrades: invalid protocol name {:?}", u.get_ref()),
                        );
                        None
                    }
                })
                .collect(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        match Config::parse(text, "f.toml") {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const MIN: &str = r#"
[[listeners]]
name = "http"
listen = "127.0.0.1:8080"

[[routes]]
pool = "web"

[pools.web]
backends = [{ address = "127.0.0.1:9001" }]
"#;

    #[test]
    fn minimal_config_has_contract_defaults() {
        let c = Config::parse(MIN, "f.toml").unwrap();
        let p = &c.pools["web"];
        assert_eq!(p.algorithm, Algorithm::RoundRobin);
        assert_eq!(p.backends[0].weight, 1);
        assert_eq!(p.health_check.path, "/health/ready");
        assert_eq!(p.health_check.interval, Duration::from_secs(30));
        assert_eq!(p.health_check.timeout, Duration::from_secs(5));
        assert_eq!(p.health_check.unhealthy_threshold, 3);
        assert_eq!(p.health_check.healthy_threshold, 2);
        assert_eq!(p.circuit_breaker.failure_threshold, 5);
        assert_eq!(p.retry.attempts, 2);
        assert_eq!(c.server.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.admin.listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.routes[0].path_prefix, "/");
        assert!(c.listeners[0].forwarded_headers && c.listeners[0].request_id);
    }

    #[test]
    fn listener_header_switches_parse_and_refuse_non_booleans() {
        let off = MIN.replace(
            "listen = \"127.0.0.1:8080\"\n",
            "listen = \"127.0.0.1:8080\"\nforwarded_headers = false\nrequest_id = false\n",
        );
        let c = Config::parse(&off, "f.toml").unwrap();
        assert!(!c.listeners[0].forwarded_headers && !c.listeners[0].request_id);
        let bad = MIN.replace(
            "listen = \"127.0.0.1:8080\"\n",
            "listen = \"127.0.0.1:8080\"\nrequest_id = \"no\"\n",
        );
        let e = errors(&bad);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("f.toml:5:"), "{}", e[0]);
    }

    #[test]
    fn worker_switches_default_on_and_refuse_non_booleans() {
        let d = Config::parse(MIN, "f.toml").unwrap().server;
        assert!(d.pin_workers && d.batch_sends);
        let off = format!("[server]\npin_workers = false\nbatch_sends = false\n{MIN}");
        let s = Config::parse(&off, "f.toml").unwrap().server;
        assert!(!s.pin_workers && !s.batch_sends);
        let e = errors(&format!("[server]\npin_workers = \"auto\"\n{MIN}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("f.toml:2:"), "{}", e[0]);
    }

    #[test]
    fn busy_poll_is_a_duration_zero_turns_it_off() {
        let d = Config::parse(MIN, "f.toml").unwrap().server;
        assert_eq!(d.busy_poll, Duration::from_micros(200));
        let s = Config::parse(&format!("[server]\nbusy_poll = \"50us\"\n{MIN}"), "f.toml")
            .unwrap()
            .server;
        assert_eq!(s.busy_poll, Duration::from_micros(50));
        let s = Config::parse(&format!("[server]\nbusy_poll = \"0s\"\n{MIN}"), "f.toml")
            .unwrap()
            .server;
        assert!(s.busy_poll.is_zero());
        let e = errors(&format!("[server]\nbusy_poll = \"fast\"\n{MIN}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("f.toml:2:"), "{}", e[0]);
    }

    #[test]
    fn threading_defaults_to_per_core_and_refuses_unknown_models() {
        assert_eq!(
            Config::parse(MIN, "f.toml").unwrap().server.threading,
            Threading::PerCore
        );
        let ws = format!("[server]\nthreading = \"work_stealing\"\n{MIN}");
        assert_eq!(
            Config::parse(&ws, "f.toml").unwrap().server.threading,
            Threading::WorkStealing
        );
        let e = errors(&format!("[server]\nthreading = \"per-core\"\n{MIN}"));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("f.toml:2:13: threading: expected"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn unknown_key_is_named_with_its_place() {
        let text = MIN.replace("[pools.web]\n", "[pools.web]\nalgoritm = \"ip_hash\"\n");
        let e = errors(&text);
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("f.toml:10:1: "), "{}", e[0]);
        assert!(e[0].contains("algoritm"), "{}", e[0]);
    }

    #[test]
    fn every_semantic_error_is_reported() {
        let text = r#"
[[listeners]]
name = "a"
listen = "127.0.0.1:8080"
[[listeners]]
name = "a"
listen = "127.0.0.1:8080"

[[routes]]
listener = "nope"
pool = "missing"

[pools.web]
algorithm = "fastest"
backends = [{ address = "127.0.0.1:9001", weight = 0 }, { address = "nohost" }]

[pools.empty]
backends = []

[pools.web2]
backends = [{ address = "127.0.0.1:9001" }]
health_check = { interval = "5 sec" }
"#;
        let e = errors(text);
        let want = [
            ("f.toml:6:8:", "duplicate listener name \"a\""),
            ("f.toml:7:10:", "already used by listener \"a\""),
            ("f.toml:10:12:", "listener \"nope\""),
            ("f.toml:11:8:", "pool \"missing\""),
            ("f.toml:14:13:", "unknown algorithm \"fastest\""),
            ("f.toml:15:", "weight must be between 1"),
            ("f.toml:15:", "invalid backend address \"nohost\""),
            ("f.toml:17:1:", "has no backends"),
            ("f.toml:22:", "invalid duration \"5 sec\""),
        ];
        assert_eq!(e.len(), want.len(), "{e:#?}");
        for (place, msg) in want {
            assert!(
                e.iter().any(|x| x.starts_with(place) && x.contains(msg)),
                "missing {place} {msg} in {e:#?}"
            );
        }
    }

    #[test]
    fn syntax_error_has_line_and_column() {
        let text = MIN.replace("pool = \"web\"", "pool = \"web");
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("f.toml:7:"), "{}", e[0]);
    }

    #[test]
    fn wrong_type_is_reported() {
        let text = MIN.replace(
            "address = \"127.0.0.1:9001\"",
            "address = \"127.0.0.1:9001\", weight = \"3\"",
        );
        let e = errors(&text);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("f.toml:10:"), "{}", e[0]);
    }

    #[test]
    fn hosts_routes_and_backends_parse() {
        let text = r#"
[[listeners]]
name = "http"
listen = "127.0.0.1:0"
[[listeners]]
name = "http2"
listen = "127.0.0.1:0"

[[routes]]
host = "*.Example.com"
path_prefix = "/api"
pools = [{ pool = "web", weight = 90 }, { pool = "web", weight = 10 }]
match_header = { name = "X-Canary", value = "1" }
rate_limit = { per_second = 100, burst = 200, key = "header:X-Api-Key" }

[pools.web]
algorithm = "weighted_round_robin"
backends = [{ address = "https://[::1]:8443", weight = 3 }, { address = "api.internal:80" }]
sticky = { cookie = "fulcrum_sticky" }
"#;
        let c = Config::parse(text, "f.toml").unwrap();
        let r = &c.routes[0];
        assert_eq!(r.host, Some(HostMatch::Suffix(".example.com".into())));
        assert_eq!(
            r.target,
            RouteTarget::Split(vec![("web".into(), 90), ("web".into(), 10)])
        );
        assert_eq!(
            r.rate_limit.as_ref().unwrap().key,
            RateLimitKey::Header("x-api-key".into())
        );
        let b = &c.pools["web"].backends;
        assert_eq!(
            (b[0].scheme, b[0].host.as_str(), b[0].port, b[0].weight),
            (Scheme::Https, "::1", 8443, 3)
        );
        assert_eq!((b[1].host.as_str(), b[1].port), ("api.internal", 80));
    }

    #[test]
    fn cidr_contains() {
        let c = parse_cidr("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_err());
        let all = parse_cidr("0.0.0.0/0").unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
    }
}
