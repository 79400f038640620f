//! The admin plane on its own listener: liveness, readiness, status, reload. It reads the
//! snapshot and backend states; it changes nothing except by asking the server to reload.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::balance::ewma::now_ns;
use crate::body::Body;
use crate::pool::{Backend, Pool};
use crate::reload::{Change, ChangeError};
use crate::server::Shared;
use fulcrum_config::BackendConfig;
use http_body_util::BodyExt;

pub async fn run(socket: TcpListener, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            _ = crate::listener::stopped(&mut stop) => break,
            a = socket.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let shared = shared.clone();
        let svc = service_fn(move |req| {
            let shared = shared.clone();
            async move { Ok::<_, Infallible>(route(&shared, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if let Some(token) = &shared.snapshot.load().config.admin.token {
        if !authorized(req.headers(), token) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "401 unauthorized: admin token required\n",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"fulcrum admin\""),
            );
            return r;
        }
    }
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["live"]) => text(StatusCode::OK, "live\n"),
        (Method::GET, ["ready"]) => {
            if shared.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (Method::GET, ["status"]) => json(StatusCode::OK, &status(shared)),
        (Method::GET, ["metrics"]) => {
            let mut r = Response::new(Body::full(crate::metrics::render(shared)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        (Method::GET, [""]) | (Method::GET, ["dashboard"]) => {
            let mut r = Response::new(Body::full(Bytes::from_static(
                crate::dashboard::HTML.as_bytes(),
            )));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            r
        }
        (Method::POST, ["reload"]) => match shared.reload().await {
            Ok(generation) => json(
                StatusCode::OK,
                &serde_json::json!({ "result": "applied", "generation": generation }),
            ),
            Err(errors) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "result": "rejected", "errors": errors }),
            ),
        },
        (Method::GET, ["pools", pool, "backends"]) => {
            let snap = shared.snapshot.load();
            match snap.pools.get(*pool) {
                Some(p) => json(StatusCode::OK, &backends_json(shared, p)),
                None => json_error(StatusCode::NOT_FOUND, format!("no pool named {pool:?}")),
            }
        }
        (Method::PUT, ["pools", pool, "backends"]) => {
            let pool = pool.to_string();
            match read_json::<Vec<ApiBackend>>(req).await.and_then(|list| {
                list.into_iter()
                    .map(ApiBackend::parse)
                    .collect::<Result<Vec<_>, _>>()
            }) {
                Ok(backends) => change(shared, Change::SetBackends { pool, backends }).await,
                Err(e) => json_error(StatusCode::BAD_REQUEST, e),
            }
        }
        (Method::POST, ["pools", pool, "backends"]) => {
            let pool = pool.to_string();
            match read_json::<ApiBackend>(req)
                .await
                .and_then(ApiBackend::parse)
            {
                Ok(backend) => change(shared, Change::AddBackend { pool, backend }).await,
                Err(e) => json_error(StatusCode::BAD_REQUEST, e),
            }
        }
        (Method::DELETE, ["pools", pool, "backends", address]) => {
            let change_ = Change::RemoveBackend {
                pool: pool.to_string(),
                address: percent_decode(address),
            };
            change(shared, change_).await
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A backend as the pool API takes it: `{"address": "10.0.0.1:8080", "weight": 1}`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiBackend {
    address: String,
    #[serde(default = "one")]
    weight: u32,
}

fn one() -> u32 {
    1
}

impl ApiBackend {
    fn parse(self) -> Result<BackendConfig, String> {
        if !(1..=65_535).contains(&self.weight) {
            return Err(format!(
                "{:?}: weight must be between 1 and 65535",
                self.address
            ));
        }
        BackendConfig::parse(&self.address, self.weight)
    }
}

const MAX_ADMIN_BODY: usize = 1024 * 1024;

async fn read_json<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, String> {
    let body = http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY);
    let bytes = body
        .collect()
        .await
        .map_err(|e| format!("cannot read the body: {e}"))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| format!("invalid JSON: {e}"))
}

async fn change(shared: &Arc<Shared>, change: Change) -> Response<Body> {
    match shared.apply(change, "pool api").await {
        Ok(a) => json(
            StatusCode::OK,
            &serde_json::json!({ "result": "applied", "generation": a.generation, "summary": a.summary }),
        ),
        Err(ChangeError::NotFound(m)) => json_error(StatusCode::NOT_FOUND, m),
        Err(e) => json_error(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn backend_json(b: &Backend, draining: bool) -> serde_json::Value {
    let s = &b.state;
    serde_json::json!({
        "id": b.id.to_string(),
        "address": b.addr.to_string(),
        "spec": b.spec,
        "weight": b.configured_weight,
        "effective_weight": b.weight,
        "healthy": s.health.is_healthy(),
        "breaker": s.breaker.state().name(),
        "draining": draining || s.draining.load(Ordering::Relaxed),
        "in_flight": s.in_flight.load(Ordering::Relaxed),
        "sessions": s.sessions.load(Ordering::Relaxed),
        "requests": s.requests.load(Ordering::Relaxed),
        "failures": s.failures.load(Ordering::Relaxed),
        "latency_ewma_ms": s.latency.cost(now_ns()) / 1e6,
        "latency_ms": s.latency_window.percentiles(),
    })
}

/// A pool's backends, then the ones of it still draining.
fn backends_json(shared: &Shared, pool: &Pool) -> serde_json::Value {
    let mut list: Vec<serde_json::Value> = pool
        .backends
        .iter()
        .map(|b| backend_json(b, false))
        .collect();
    for d in shared.drains_lock().iter().filter(|d| d.pool == pool.name) {
        list.push(backend_json(&d.backend, true));
    }
    serde_json::Value::Array(list)
}

/// The status document: every pool with its algorithm and backends (draining ones too),
/// the listeners, and the latest config changes.
pub fn status(shared: &Shared) -> serde_json::Value {
    let snap = shared.snapshot.load();
    let mut names: Vec<&String> = snap.pools.keys().collect();
    names.sort();
    let pools: Vec<_> = names
        .into_iter()
        .map(|name| {
            let pool = &snap.pools[name];
            serde_json::json!({
                "name": name,
                "algorithm": pool.algorithm.name(),
                "panic": pool.in_panic(),
                "backends": backends_json(shared, pool),
            })
        })
        .collect();
    let listeners: Vec<_> = shared
        .listener_addrs()
        .into_iter()
        .map(|(name, addr)| serde_json::json!({ "name": name, "address": addr.to_string() }))
        .collect();
    let history: Vec<_> = shared
        .history
        .lock()
        .map(|h| h.iter().cloned().collect())
        .unwrap_or_default();
    serde_json::json!({
        "generation": snap.generation,
        "draining": shared.draining.load(Ordering::Relaxed),
        "pools": pools,
        "listeners": listeners,
        "parked_connections": shared.parking.count(),
        "changes": { "applied": shared.changes_applied.load(Ordering::Relaxed), "rejected": shared.changes_rejected.load(Ordering::Relaxed) },
        "history": history,
    })
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut r = Response::new(Body::full(serde_json::to_vec_pretty(v).unwrap_or_default()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `Authorization: Bearer TOKEN`, or Basic with TOKEN as the password (so a browser can open
/// the dashboard). Compared in constant time.
fn authorized(headers: &http::HeaderMap, token: &str) -> bool {
    use base64::Engine;
    let Some(value) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if let Some(bearer) = value.strip_prefix("Bearer ") {
        return constant_time_eq(bearer.trim().as_bytes(), token.as_bytes());
    }
    if let Some(basic) = value.strip_prefix("Basic ") {
        if let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(basic.trim()) {
            let password = decoded.splitn(2, |&b| b == b':').nth(1).unwrap_or(&[]);
            return constant_time_eq(password, token.as_bytes());
        }
    }
    false
}

/// Equal bytes, in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn json_error(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    json(status, &serde_json::json!({ "error": message.into() }))
}
