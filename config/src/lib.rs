//! `fulcrum-config`: the configuration file of fulcrum, from TOML text to a validated, typed
//! [`Config`]. Every value the proxy uses at run time is parsed here once (durations,
//! addresses, enums), so nothing on the hot path interprets a string.
//!
//! Errors always read `PATH:LINE:COL: message` and validation reports every problem it
//! finds, not only the first. No tokio, no I/O beyond reading the file.
#![forbid(unsafe_code)]

mod duration;
mod error;
mod raw;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

pub use duration::parse_duration;
pub use error::{ConfigError, ConfigErrors};

/// The embedded default used by `fulcrum demo` is built by the proxy; this is the one every
/// example and test starts from.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// A whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: AdminConfig,
    pub listeners: Vec<ListenerConfig>,
    pub routes: Vec<RouteConfig>,
    pub pools: BTreeMap<String, PoolConfig>,
    pub access_log: Option<AccessLogConfig>,
    /// The store fleet-wide (`scope = "global"`) rate limits share.
    pub redis: Option<RedisConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    /// How long a limit check may wait for Redis before the fallback applies.
    pub timeout: Duration,
}

/// `[server] threading`: how the data plane uses its `worker_threads`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threading {
    /// One single-threaded event loop per thread, each accepting and serving its own
    /// connections with its own upstream connections (nginx workers, HAProxy threads,
    /// Envoy workers). No task ever moves between threads.
    PerCore,
    /// One work-stealing tokio runtime for everything.
    WorkStealing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    pub drain_timeout: Duration,
    pub worker_threads: Option<usize>,
    /// How worker threads share the work.
    pub threading: Threading,
    pub request_header_timeout: Duration,
    pub idle_timeout: Duration,
    /// A plain HTTP/1.1 keep-alive connection idle this long leaves its task and waits in its
    /// worker's set of parked connections (a few hundred bytes instead of about 1 KiB);
    /// `idle_timeout` still applies. At or above `idle_timeout`: never parked.
    pub idle_park_after: Duration,
    pub max_request_header_bytes: usize,
    pub max_requests_per_connection: Option<u64>,
    /// Per-core workers send the small writes of an event-loop turn (answers, requests to
    /// backends) in one io_uring submission instead of one `sendto` each, where the kernel
    /// allows io_uring (otherwise, and when off, one by one). Read at start.
    pub batch_sends: bool,
    /// Per-core worker `i` runs only on the `i`-th CPU this process may use (nginx's
    /// `worker_cpu_affinity auto`, HAProxy's `cpu-map`), when there are exactly as many
    /// workers as such CPUs; otherwise no worker is pinned. Read at start.
    pub pin_workers: bool,
    /// The longest a per-core worker with nothing to run watches its sockets before it
    /// sleeps (HAProxy's `busy-polling`, bounded and adaptive: see `fulcrum::spin`); zero:
    /// never. Read at start.
    pub busy_poll: Duration,
    pub watch_config: bool,
    pub resolve_interval: Duration,
    pub websocket_idle_timeout: Duration,
    /// Unix socket on which a running fulcrum hands its listening sockets to `fulcrum
    /// upgrade` (zero-downtime binary upgrade); none: upgrades are off.
    pub upgrade_socket: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            drain_timeout: Duration::from_secs(30),
            worker_threads: None,
            threading: Threading::PerCore,
            request_header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            idle_park_after: Duration::from_secs(1),
            max_request_header_bytes: 32 * 1024,
            max_requests_per_connection: None,
            batch_sends: true,
            pin_workers: true,
            busy_poll: Duration::from_micros(200),
            watch_config: false,
            resolve_interval: Duration::from_secs(5),
            websocket_idle_timeout: Duration::from_secs(3600),
            upgrade_socket: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConfig {
    pub path: String,
    pub format: AccessLogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Json,
    Combined,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerConfig {
    pub name: String,
    pub listen: SocketAddr,
    pub proxy_protocol: bool,
    pub trusted_proxies: Vec<Cidr>,
    pub redirect_https: bool,
    pub tls: Option<TlsConfig>,
    pub max_connections: Option<u32>,
    pub max_connections_per_ip: Option<u32>,
    /// Add `X-Forwarded-For`/`-Proto`/`-Host` to requests (HAProxy's `option forwardfor`).
    pub forwarded_headers: bool,
    /// Give every request an `X-Request-Id` (kept when the client sent one) and echo it in
    /// the answer (Envoy's `generate_request_id`).
    pub request_id: bool,
}

/// An IP network such as `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: std::net::IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr::*;
        match (self.addr, ip) {
            (V4(net), V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (V6(net), V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            (V6(_), V4(ip)) => self.contains(std::net::IpAddr::V6(ip.to_ipv6_mapped())),
            (V4(_), V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(std::net::IpAddr::V4(v4))),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateConfig>,
    pub client_ca: Option<String>,
    pub hsts: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CertificateConfig {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub listener: Option<String>,
    pub host: Option<HostMatch>,
    pub path_prefix: String,
    pub target: RouteTarget,
    pub match_header: Option<MatchHeader>,
    pub rate_limit: Option<RateLimitConfig>,
    pub compression: bool,
    /// Upgrade protocols passed through (lower-case); default `["websocket"]`.
    pub upgrades: Vec<String>,
}

/// Which host names a route answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    /// `api.example.com`, lower-cased.
    Exact(String),
    /// `*.example.com`: stored as the suffix `.example.com`, lower-cased.
    Suffix(String),
}

#[derive(Debug, Clone, PartialEq)]
pub enum RouteTarget {
    Pool(String),
    Split(Vec<(String, u32)>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct MatchHeader {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub per_second: f64,
    pub burst: u32,
    pub key: RateLimitKey,
    pub global: bool,
    pub deny_on_store_error: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateLimitKey {
    ClientIp,
    Header(String),
    Route,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    IpHash,
    LeastResponseTime,
}

impl Algorithm {
    pub const ALL: [(&'static str, Algorithm); 5] = [
        ("round_robin", Algorithm::RoundRobin),
        ("weighted_round_robin", Algorithm::WeightedRoundRobin),
        ("least_connections", Algorithm::LeastConnections),
        ("ip_hash", Algorithm::IpHash),
        ("least_response_time", Algorithm::LeastResponseTime),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .unwrap_or("unknown")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendConfig {
    /// As written in the file, without the scheme (`10.0.0.1:8080`, `api.internal:8080`).
    pub address: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub weight: u32,
}

impl BackendConfig {
    /// Parses `host:port`, `[v6]:port`, optionally prefixed with `http://` or `https://`.
    pub fn parse(text: &str, weight: u32) -> Result<BackendConfig, String> {
        let (scheme, rest) = if let Some(r) = text.strip_prefix("https://") {
            (Scheme::Https, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (Scheme::Http, r)
        } else {
            (Scheme::Http, text)
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let bad = || format!("invalid backend address {text:?}: expected host:port");
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, p) = v6.split_once("]:").ok_or_else(bad)?;
            h.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            (h, p)
        } else {
            rest.rsplit_once(':').ok_or_else(bad)?
        };
        if host.is_empty()
            || host.contains('/')
            || !host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'))
        {
            return Err(bad());
        }
        let port: u16 = port.parse().map_err(|_| bad())?;
        if port == 0 {
            return Err(format!("invalid backend address {text:?}: port 0"));
        }
        Ok(BackendConfig {
            address: rest.to_string(),
            scheme,
            host: host.to_string(),
            port,
            weight,
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct StickyConfig {
    pub by: StickyBy,
    pub ttl: Option<Duration>,
    pub secure: bool,
    pub http_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StickyBy {
    Cookie(String),
    Header(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheckKind {
    Http,
    Tcp,
    Grpc,
}

/// How fulcrum speaks to a pool's backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 over TLS (`https://` backends).
    H2,
    /// HTTP/2 over cleartext, prior knowledge.
    H2c,
    /// ALPN on TLS backends (h2 preferred), HTTP/1.1 otherwise.
    Auto,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HealthCheckConfig {
    pub enabled: bool,
    pub kind: HealthCheckKind,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_threshold: u32,
    pub healthy_threshold: u32,
    pub initially_healthy: bool,
    /// Passive detection: real traffic's failures feed the same state.
    pub passive: bool,
    /// `type = "grpc"`: the service asked about.
    pub grpc_service: String,
    /// Passive detection never marks more than this share of the pool unhealthy.
    pub max_ejection_percent: u32,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            enabled: true,
            kind: HealthCheckKind::Http,
            path: "/health/ready".into(),
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            unhealthy_threshold: 3,
            healthy_threshold: 2,
            initially_healthy: true,
            passive: true,
            grpc_service: String::new(),
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct CircuitBreakerConfig {
    pub enabled: bool,
    pub failure_threshold: u32,
    pub open_duration: Duration,
    pub half_open_requests: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            enabled: true,
            failure_threshold: 5,
            open_duration: Duration::from_secs(30),
            half_open_requests: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetryConfig {
    pub attempts: u32,
    pub backoff: Duration,
    pub budget_percent: u32,
    /// gRPC status codes after which a gRPC call is retried on another backend
    /// (`retry_on = ["unavailable"]`); gRPC calls are not retried otherwise.
    pub grpc_retry_on: Vec<u8>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 2,
            backoff: Duration::from_millis(25),
            budget_percent: 20,
            grpc_retry_on: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub algorithm: Algorithm,
    pub backends: Vec<BackendConfig>,
    pub sticky: Option<StickyConfig>,
    pub max_connections_per_backend: Option<u32>,
    pub max_pending: Option<u32>,
    pub queue_timeout: Duration,
    pub connect_timeout: Duration,
    /// Time allowed for the backend to start answering (response head).
    pub timeout: Duration,
    pub hash_balance_factor: Option<f64>,
    pub dynamic: bool,
    pub slow_start: Option<Duration>,
    /// Upstream TLS: extra CA to trust, and a client certificate (mTLS to backends).
    pub ca: Option<String>,
    pub client_cert: Option<CertificateConfig>,
    /// Below this share of healthy backends (and above zero), balance over all of them.
    pub panic_threshold: u32,
    pub protocol: UpstreamProtocol,
    /// HTTP/2 upstreams: streams per connection before another connection is opened.
    pub max_concurrent_streams: u32,
    pub health_check: HealthCheckConfig,
    pub circuit_breaker: CircuitBreakerConfig,
    pub retry: RetryConfig,
}

impl PoolConfig {
    /// A pool with every default, for code that builds configs (the demo, tests).
    pub fn new(name: &str, algorithm: Algorithm, backends: Vec<BackendConfig>) -> PoolConfig {
        PoolConfig {
            name: name.to_string(),
            algorithm,
            backends,
            sticky: None,
            max_connections_per_backend: None,
            max_pending: None,
            queue_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(60),
            hash_balance_factor: None,
            dynamic: false,
            slow_start: None,
            ca: None,
            client_cert: None,
            panic_threshold: 50,
            protocol: UpstreamProtocol::Http1,
            max_concurrent_streams: 100,
            health_check: HealthCheckConfig::default(),
            circuit_breaker: CircuitBreakerConfig::default(),
            retry: RetryConfig::default(),
        }
    }
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::Io {
                path: label.clone(),
                message: e.to_string(),
            }])
        })?;
        Config::parse(&text, &label)
    }

    /// Parses and validates `text`; `label` names it in errors (usually the file path).
    pub fn parse(text: &str, label: &str) -> Result<Config, ConfigErrors> {
        let raw: raw::RawConfig = toml::from_str(text)
            .map_err(|e| ConfigErrors(vec![ConfigError::from_toml(label, text, &e)]))?;
        validate::validate(raw, label, text)
    }
}
