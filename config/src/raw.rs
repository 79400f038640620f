//! The file as serde sees it: every key of the contract, unknown keys refused, values kept
//! as written (with their spans) so that validation can say where a value is wrong.

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

pub type S<T> = Spanned<T>;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub listeners: Vec<S<RawListener>>,
    #[serde(default)]
    pub routes: Vec<S<RawRoute>>,
    #[serde(default)]
    pub pools: BTreeMap<S<String>, S<RawPool>>,
    pub access_log: Option<RawAccessLog>,
    pub redis: Option<RawRedis>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    pub url: S<String>,
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub drain_timeout: Option<S<String>>,
    pub worker_threads: Option<S<i64>>,
    pub threading: Option<S<String>>,
    pub request_header_timeout: Option<S<String>>,
    pub idle_timeout: Option<S<String>>,
    pub idle_park_after: Option<S<String>>,
    pub max_request_header_bytes: Option<S<i64>>,
    pub max_requests_per_connection: Option<S<i64>>,
    pub batch_sends: Option<bool>,
    pub pin_workers: Option<bool>,
    pub busy_poll: Option<S<String>>,
    pub watch_config: Option<bool>,
    pub resolve_interval: Option<S<String>>,
    pub websocket_idle_timeout: Option<S<String>>,
    pub upgrade_socket: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Option<S<String>>,
    pub token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    pub path: S<String>,
    pub format: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub name: S<String>,
    pub listen: S<String>,
    #[serde(default)]
    pub proxy_protocol: bool,
    #[serde(default)]
    pub trusted_proxies: Vec<S<String>>,
    #[serde(default)]
    pub redirect_https: bool,
    pub tls: Option<S<RawTls>>,
    pub max_connections: Option<S<i64>>,
    pub max_connections_per_ip: Option<S<i64>>,
    #[serde(default = "yes")]
    pub forwarded_headers: bool,
    #[serde(default = "yes")]
    pub request_id: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub certificates: Vec<S<RawCertificate>>,
    pub client_ca: Option<S<String>>,
    pub hsts: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: S<String>,
    pub key: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub listener: Option<S<String>>,
    pub host: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub pool: Option<S<String>>,
    pub pools: Option<S<Vec<S<RawWeightedPool>>>>,
    pub match_header: Option<S<RawMatchHeader>>,
    pub rate_limit: Option<S<RawRateLimit>>,
    pub compression: Option<bool>,
    pub upgrades: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWeightedPool {
    pub pool: S<String>,
    pub weight: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMatchHeader {
    pub name: S<String>,
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_second: S<f64>,
    pub burst: Option<S<i64>>,
    pub key: Option<S<String>>,
    pub scope: Option<S<String>>,
    pub on_store_error: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPool {
    pub algorithm: Option<S<String>>,
    #[serde(default)]
    pub backends: Vec<S<RawBackend>>,
    pub sticky: Option<S<RawSticky>>,
    pub max_connections_per_backend: Option<S<i64>>,
    pub max_pending: Option<S<i64>>,
    pub queue_timeout: Option<S<String>>,
    pub connect_timeout: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub hash_balance_factor: Option<S<f64>>,
    #[serde(default)]
    pub dynamic: bool,
    pub slow_start: Option<S<String>>,
    /// For `https://` backends: a CA file to trust (besides the system roots), and a client
    /// certificate for mTLS to backends.
    pub ca: Option<S<String>>,
    pub client_cert: Option<S<String>>,
    pub client_key: Option<S<String>>,
    pub panic_threshold: Option<S<i64>>,
    pub protocol: Option<S<String>>,
    pub max_concurrent_streams: Option<S<i64>>,
    pub health_check: Option<RawHealthCheck>,
    pub circuit_breaker: Option<RawBreaker>,
    pub retry: Option<RawRetry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: S<String>,
    pub weight: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub cookie: Option<S<String>>,
    pub header: Option<S<String>>,
    pub ttl: Option<S<String>>,
    #[serde(default)]
    pub secure: bool,
    #[serde(default = "yes")]
    pub http_only: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub enabled: Option<bool>,
    #[serde(rename = "type")]
    pub kind: Option<S<String>>,
    pub path: Option<S<String>>,
    pub interval: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub unhealthy_threshold: Option<S<i64>>,
    pub healthy_threshold: Option<S<i64>>,
    pub initially: Option<S<String>>,
    pub max_ejection_percent: Option<S<i64>>,
    pub passive: Option<bool>,
    /// For `type = "grpc"`: the service name asked about (empty: the server as a whole).
    pub service: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    pub enabled: Option<bool>,
    pub failure_threshold: Option<S<i64>>,
    pub open_duration: Option<S<String>>,
    pub half_open_requests: Option<S<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub attempts: Option<S<i64>>,
    pub backoff: Option<S<String>>,
    pub budget_percent: Option<S<i64>>,
    pub retry_on: Option<Vec<S<String>>>,
}
