//! Talking to backends: one pooled keep-alive client per backend (it lives in the backend's
//! `BackendState`, so connections survive reloads), with connect and response timeouts.
//! Plain-http HTTP/1.1 backends take fulcrum's own client (`h1`) for requests whose body
//! is in memory; everything else (streamed uploads, upgrades, HTTP/2, TLS) goes through
//! hyper-util's pooled client.

pub mod h1;

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use std::sync::Arc;

use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::rawfields::RawFields;
use fulcrum_config::UpstreamProtocol;

const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 4 << 20;
use crate::error::ProxyError;

/// How long an idle pooled connection is kept (below nginx's and HAProxy's defaults of
/// 60-120 s for their client side, so the backend rarely closes one we are about to use).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(55);
const POOL_MAX_IDLE: usize = 1024;

/// Resolves every name to the one address this client's backend has: the URI keeps the
/// backend's host name (for TLS SNI and certificate checks) while the connection goes to
/// the address the snapshot resolved.
#[derive(Clone)]
pub struct FixedResolver(SocketAddr);

impl tower_service::Service<Name> for FixedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(vec![self.0].into_iter()))
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<FixedResolver>>;

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<Connector, Body>,
    protocol: UpstreamProtocol,
    /// fulcrum's own HTTP/1.1 client, for plain-http HTTP/1 backends.
    h1: Option<Arc<h1::H1Pool>>,
}

impl UpstreamClient {
    /// This worker's idle HTTP/1.1 connections drop their buffers ([`h1::H1Pool::trim`]).
    pub fn trim(&self) {
        if let Some(h1) = &self.h1 {
            h1.trim();
        }
    }
}

/// A backend's response body, from whichever client carried the request. fulcrum's own
/// client's answers carry their header lines here when it kept them as bytes
/// (`rawfields`): a `Response`'s only other room for them, its extensions, allocates.
pub enum UpstreamBody {
    Hyper(Incoming),
    H1(h1::H1Body, Option<RawFields>),
}

impl UpstreamBody {
    /// The answer's header lines kept as bytes, if they were (taken out).
    pub fn take_raw(&mut self) -> Option<RawFields> {
        match self {
            UpstreamBody::H1(_, raw) => raw.take(),
            UpstreamBody::Hyper(_) => None,
        }
    }

    pub fn raw_mut(&mut self) -> Option<&mut RawFields> {
        match self {
            UpstreamBody::H1(_, raw) => raw.as_mut(),
            UpstreamBody::Hyper(_) => None,
        }
    }
}

/// Puts an answer's kept header lines (if any) into its map, for whatever reads headers
/// as a map (compression, gRPC, hyper's server side).
pub fn materialise<B>(resp: &mut Response<B>, take: impl FnOnce(&mut B) -> Option<RawFields>) {
    if let Some(raw) = take(resp.body_mut()) {
        raw.into_map(resp.headers_mut());
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl http_body::Body for UpstreamBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Hyper(b) => std::pin::Pin::new(b)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(Into::into))),
            UpstreamBody::H1(b, _) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Hyper(b) => b.is_end_stream(),
            UpstreamBody::H1(b, _) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::Hyper(b) => b.size_hint(),
            UpstreamBody::H1(b, _) => b.size_hint(),
        }
    }
}

impl UpstreamClient {
    /// A pooled client for the backend at `addr`; `tls` for `https://` backends.
    pub fn new(
        connect_timeout: Duration,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ClientConfig>>,
        protocol: UpstreamProtocol,
    ) -> UpstreamClient {
        let h1 = (tls.is_none()
            && matches!(protocol, UpstreamProtocol::Http1 | UpstreamProtocol::Auto))
        .then(|| {
            Arc::new(h1::H1Pool::new(
                addr,
                connect_timeout,
                POOL_IDLE_TIMEOUT,
                POOL_MAX_IDLE,
            ))
        });
        let mut http = HttpConnector::new_with_resolver(FixedResolver(addr));
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.enforce_http(false);
        let tls = match tls {
            Some(t) => (*t).clone(),
            // Plain http: the TLS side is never used, but the connector type is one.
            None => rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .map(|b| {
                    b.with_root_certificates(rustls::RootCertStore::empty())
                        .with_no_client_auth()
                })
                .expect("ring supports the default versions"),
        };
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        // ALPN offers what the pool speaks: h2 only, h2 then http/1.1 (auto), or http/1.1.
        let connector = match protocol {
            UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
            UpstreamProtocol::H2 | UpstreamProtocol::H2c => {
                builder.enable_http2().wrap_connector(http)
            }
            UpstreamProtocol::Auto => builder.enable_all_versions().wrap_connector(http),
        };
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .timer(TokioTimer::new());
        if matches!(protocol, UpstreamProtocol::H2 | UpstreamProtocol::H2c) {
            // One connection carries many streams; windows sized for fast links, pings keep
            // idle multiplexed connections honest.
            b.http2_only(true)
                .http2_initial_stream_window_size(H2_STREAM_WINDOW)
                .http2_initial_connection_window_size(H2_CONNECTION_WINDOW)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .http2_keep_alive_while_idle(false);
        }
        let client = b.build(connector);
        UpstreamClient {
            client,
            protocol,
            h1,
        }
    }

    /// fulcrum's own client, when it can carry a request: a plain-http HTTP/1 backend, the
    /// body already in memory (its bytes returned), no upgrade asked for.
    fn h1_for(
        &self,
        headers: &http::HeaderMap,
        body: &Body,
    ) -> Option<(&Arc<h1::H1Pool>, Option<bytes::Bytes>)> {
        match (&self.h1, body) {
            (Some(h1), Body::Full(bytes)) if !headers.contains_key(http::header::UPGRADE) => {
                Some((h1, bytes.clone()))
            }
            _ => None,
        }
    }

    /// Forwards a client's request to `backend`: `parts` is its rewritten head (the URI as
    /// the client sent it) and `lines` its header lines kept as they came, if they were
    /// (`rawfields`; fulcrum's h1 client writes them before the map's, hyper gets them in
    /// the map), `body` this attempt's body. fulcrum's h1 client only borrows the
    /// head; hyper's needs its own, cloned unless `last` (no attempt after this one) lets it
    /// take the original.
    pub async fn forward(
        &self,
        backend: &crate::pool::Backend,
        parts: &mut http::request::Parts,
        lines: &mut Option<RawFields>,
        body: Body,
        timeout: Duration,
        last: bool,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        if let Some((h1, bytes)) = self.h1_for(&parts.headers, &body) {
            let sent = h1
                .send(parts, lines.as_ref(), &backend.authority, bytes, timeout)
                .await;
            return sent.map(|(r, raw)| r.map(|b| UpstreamBody::H1(b, raw)));
        }
        // hyper sends the map alone.
        crate::service::materialise(&mut parts.headers, lines);
        let mut uri = http::uri::Parts::default();
        uri.scheme = Some(backend.scheme.clone());
        uri.authority = Some(backend.authority.clone());
        uri.path_and_query = Some(
            parts
                .uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
        );
        let uri = http::Uri::from_parts(uri)
            .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = match self.protocol {
            UpstreamProtocol::H2 | UpstreamProtocol::H2c => http::Version::HTTP_2,
            _ => http::Version::HTTP_11,
        };
        *req.headers_mut() = if last {
            std::mem::take(&mut parts.headers)
        } else {
            parts.headers.clone()
        };
        // Boxed: the slow path's future is four times the fast path's, and would otherwise
        // be part of every request's.
        Box::pin(self.send(backend.addr, req, timeout)).await
    }

    /// Sends `req` (its URI already absolute, pointing at `backend`) and waits at most
    /// `timeout` for the response head. The body then streams without a deadline.
    pub async fn send(
        &self,
        backend: SocketAddr,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        // The deadline and the pool's stamps below take this reading (health checks come
        // here without one of their own).
        crate::clock::now();
        if let (Some(authority), Some((h1, bytes))) = (
            req.uri().authority().cloned(),
            self.h1_for(req.headers(), req.body()),
        ) {
            let (parts, _) = req.into_parts();
            // Health checks and gRPC probes read headers as a map.
            let sent = h1.send(&parts, None, &authority, bytes, timeout).await;
            return sent.map(|(r, raw)| {
                let mut r = r.map(|b| UpstreamBody::H1(b, raw));
                materialise(&mut r, UpstreamBody::take_raw);
                r
            });
        }
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyError::Timeout { backend, timeout }),
            Ok(Ok(resp)) => Ok(resp.map(UpstreamBody::Hyper)),
            Ok(Err(e)) if e.is_connect() => Err(ProxyError::Connect {
                backend,
                source: Box::new(e),
            }),
            Ok(Err(e)) => Err(ProxyError::Upstream {
                backend,
                source: Box::new(e),
            }),
        }
    }
}
