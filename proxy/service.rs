//! One request end to end: snapshot → route → pool → backend → upstream → response.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;

use crate::body::Body;
use crate::error::ProxyError;
use crate::headers;
use crate::pool::InFlight;
use crate::server::Shared;

/// What a request knows about the connection it came on.
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: SocketAddr,
    pub tls: bool,
}

/// Serves one request; never fails (errors become fulcrum's own responses).
pub async fn handle(shared: &Shared, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    match proxy(shared, conn, req).await {
        Ok(resp) => resp,
        Err(e) => {
            match e.side() {
                crate::error::Side::Upstream => {
                    tracing::warn!(error = %e, client = %conn.peer, "upstream error")
                }
                _ => tracing::debug!(error = %e, client = %conn.peer, "request refused"),
            }
            error_response(&e)
        }
    }
}

async fn proxy(
    shared: &Shared,
    conn: &ConnInfo,
    req: Request<Incoming>,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    // The host the client asked for: Host for HTTP/1.1, :authority for HTTP/2.
    let host: Option<HeaderValue> = match parts.headers.get(header::HOST) {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };

    // One snapshot load; everything needed after the await is cloned out of it.
    let (backend, timeout) = {
        let snap = shared.snapshot.load();
        let route = snap
            .router
            .find(
                &conn.listener,
                host.as_ref().and_then(|h| h.to_str().ok()),
                parts.uri.path(),
                &parts.headers,
            )
            .ok_or(ProxyError::NoRoute)?;
        let pool = route.pool();
        let backend = pool
            .pick(conn.peer.ip())
            .ok_or_else(|| ProxyError::NoBackend {
                pool: pool.name.clone(),
            })?
            .clone();
        (backend, pool.config.timeout)
    };

    headers::strip_hop_by_hop(&mut parts.headers);
    headers::add_forwarded(&mut parts.headers, conn.peer.ip(), conn.tls, host.as_ref());
    if let (false, Some(h)) = (parts.headers.contains_key(header::HOST), &host) {
        parts.headers.insert(header::HOST, h.clone());
    }
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(http::uri::Scheme::HTTP);
    uri.authority = Some(backend.authority.clone());
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri =
        Uri::from_parts(uri).map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    parts.version = Version::HTTP_11;

    let guard = InFlight::begin(&backend.state);
    let upstream_req = Request::from_parts(parts, Body::stream(body));
    let started = std::time::Instant::now();
    match backend
        .state
        .client
        .send(backend.addr, upstream_req, timeout)
        .await
    {
        Ok(resp) => {
            guard.record(started.elapsed(), !resp.status().is_server_error());
            let (mut parts, body) = resp.into_parts();
            headers::strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, Body::with_guard(body, guard)))
        }
        Err(e) => {
            guard.record(started.elapsed(), false);
            Err(e)
        }
    }
}

/// fulcrum's own answer for an error: short plain text, no internal address.
pub fn error_response(e: &ProxyError) -> Response<Body> {
    let mut resp = Response::new(Body::full(Bytes::from_static(
        e.public_message().as_bytes(),
    )));
    *resp.status_mut() = e.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if e.status() == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}
