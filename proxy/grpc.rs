//! gRPC awareness: requests with `content-type: application/grpc*` that fulcrum itself
//! fails get HTTP 200 with `grpc-status`/`grpc-message` (a "Trailers-Only" answer), so gRPC
//! clients see proper statuses; `grpc-timeout` caps the backend timeout; and the standard
//! `grpc.health.v1.Health/Check` health check, its tiny messages encoded by hand.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;

use crate::body::Body;
use crate::error::ProxyError;

pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// gRPC status codes fulcrum answers with.
pub mod code {
    pub const DEADLINE_EXCEEDED: u8 = 4;
    pub const RESOURCE_EXHAUSTED: u8 = 8;
    pub const INVALID_ARGUMENT: u8 = 3;
    pub const UNIMPLEMENTED: u8 = 12;
    pub const UNAVAILABLE: u8 = 14;
}

pub fn status_of(e: &ProxyError) -> u8 {
    match e {
        ProxyError::Timeout { .. } => code::DEADLINE_EXCEEDED,
        ProxyError::RateLimited(_)
        | ProxyError::QueueFull { .. }
        | ProxyError::QueueTimeout { .. } => code::RESOURCE_EXHAUSTED,
        ProxyError::NoRoute => code::UNIMPLEMENTED,
        ProxyError::BadRequest(_) => code::INVALID_ARGUMENT,
        ProxyError::NoBackend { .. } | ProxyError::Connect { .. } | ProxyError::Upstream { .. } => {
            code::UNAVAILABLE
        }
    }
}

/// A Trailers-Only answer: status 200, the gRPC status in the headers, no body.
pub fn error_response(e: &ProxyError) -> Response<Body> {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(status_of(e) as u16));
    let message = e.public_message().trim_end().replace(' ', "%20");
    if let Ok(v) = HeaderValue::from_str(&message) {
        h.insert("grpc-message", v);
    }
    resp
}

static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `grpc-timeout: 250m` → 250 ms (units H, M, S, m, u, n; at most 8 digits).
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    // A `HeaderName`, not a `&str`: a string key is parsed into a name on every lookup.
    let v = headers.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (n, unit) = v.split_at(v.len() - 1);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// `grpc.health.v1.Health/Check` for `service`: healthy when the answer is SERVING (1).
pub struct GrpcProbe {
    client: crate::upstream::UpstreamClient,
    addr: SocketAddr,
    uri: http::Uri,
    request: Bytes,
}

impl GrpcProbe {
    pub fn new(
        client: crate::upstream::UpstreamClient,
        backend: &crate::pool::Backend,
        service: &str,
    ) -> GrpcProbe {
        let uri = format!(
            "{}://{}/grpc.health.v1.Health/Check",
            backend.scheme, backend.authority
        )
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"));
        // HealthCheckRequest { string service = 1; } in a gRPC frame (uncompressed, length).
        let mut msg = Vec::new();
        if !service.is_empty() {
            msg.push(0x0a);
            msg.push(service.len() as u8);
            msg.extend_from_slice(service.as_bytes());
        }
        let mut frame = vec![0u8];
        frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        frame.extend_from_slice(&msg);
        GrpcProbe {
            client,
            addr: backend.addr,
            uri,
            request: Bytes::from(frame),
        }
    }
}

/// The `status` of a HealthCheckResponse frame (field 1, varint); 0 when absent.
pub fn serving_status(frame: &[u8]) -> Option<u64> {
    let msg = frame.get(5..)?;
    // An empty message is every field at its default: status 0 (UNKNOWN).
    let Some((&key, rest)) = msg.split_first() else {
        return Some(0);
    };
    if key != 0x08 {
        return None;
    }
    let mut v = 0u64;
    for (k, &b) in rest.iter().enumerate().take(10) {
        v |= ((b & 0x7f) as u64) << (7 * k);
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

impl crate::health::Probe for GrpcProbe {
    async fn probe(&self) -> bool {
        let req = Request::post(self.uri.clone())
            .version(http::Version::HTTP_2)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header(header::TE, "trailers")
            .body(Body::full(self.request.clone()));
        let Ok(req) = req else { return false };
        let Ok(resp) = self
            .client
            .send(self.addr, req, Duration::from_secs(3600))
            .await
        else {
            return false;
        };
        if resp.status() != StatusCode::OK {
            return false;
        }
        let headers_status = resp.headers().get("grpc-status").cloned();
        let Ok(collected) = resp.into_body().collect().await else {
            return false;
        };
        let trailers_status = collected
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned());
        let ok_status = headers_status.or(trailers_status).is_some_and(|s| s == "0");
        ok_status && serving_status(&collected.to_bytes()) == Some(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        let mut h = HeaderMap::new();
        for (v, d) in [
            ("250m", Duration::from_millis(250)),
            ("2S", Duration::from_secs(2)),
            ("1H", Duration::from_secs(3600)),
        ] {
            h.insert("grpc-timeout", v.parse().unwrap());
            assert_eq!(timeout(&h), Some(d));
        }
        h.insert("grpc-timeout", "12x".parse().unwrap());
        assert_eq!(timeout(&h), None);
    }

    #[test]
    fn health_response_status() {
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x01]), Some(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 0x02]), Some(2));
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
    }
}
