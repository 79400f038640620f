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

use crate::body::Body;
use crate::server::Shared;

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
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if shared.draining.load(Ordering::Relaxed) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        (&Method::GET, "/status") => json(StatusCode::OK, &status(shared)),
        (&Method::POST, "/reload") => match shared.reload().await {
            Ok(generation) => json(
                StatusCode::OK,
                &serde_json::json!({ "result": "applied", "generation": generation }),
            ),
            Err(errors) => json(
                StatusCode::BAD_REQUEST,
                &serde_json::json!({ "result": "rejected", "errors": errors }),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// The status document: every pool with its algorithm and backends.
pub fn status(shared: &Shared) -> serde_json::Value {
    let snap = shared.snapshot.load();
    let mut names: Vec<&String> = snap.pools.keys().collect();
    names.sort();
    let pools: Vec<_> = names
        .into_iter()
        .map(|name| {
            let pool = &snap.pools[name];
            let backends: Vec<_> = pool
                .backends
                .iter()
                .map(|b| {
                    let s = &b.state;
                    serde_json::json!({
                        "id": b.id.to_string(),
                        "address": b.addr.to_string(),
                        "spec": b.spec,
                        "weight": b.weight,
                        "healthy": s.health.is_healthy(),
                        "breaker": s.breaker.state().name(),
                        "draining": s.draining.load(Ordering::Relaxed),
                        "in_flight": s.in_flight.load(Ordering::Relaxed),
                        "requests": s.requests.load(Ordering::Relaxed),
                        "failures": s.failures.load(Ordering::Relaxed),
                    })
                })
                .collect();
            serde_json::json!({
                "name": name,
                "algorithm": pool.algorithm.name(),
                "backends": backends,
            })
        })
        .collect();
    serde_json::json!({
        "generation": snap.generation,
        "draining": shared.draining.load(Ordering::Relaxed),
        "pools": pools,
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
