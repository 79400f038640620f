//! Talking to backends: one pooled keep-alive client per backend (it lives in the backend's
//! `BackendState`, so connections survive reloads), with connect and response timeouts.

use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::error::ProxyError;

/// How long an idle pooled connection is kept (below nginx's and HAProxy's defaults of
/// 60-120 s for their client side, so the backend rarely closes one we are about to use).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(55);
const POOL_MAX_IDLE: usize = 1024;

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpConnector, Body>,
}

impl UpstreamClient {
    pub fn new(connect_timeout: Duration) -> UpstreamClient {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .build(connector);
        UpstreamClient { client }
    }

    /// Sends `req` (its URI already absolute, pointing at `backend`) and waits at most
    /// `timeout` for the response head. The body then streams without a deadline.
    pub async fn send(
        &self,
        backend: SocketAddr,
        req: Request<Body>,
        timeout: Duration,
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(timeout, self.client.request(req)).await {
            Err(_) => Err(ProxyError::Timeout { backend, timeout }),
            Ok(Ok(resp)) => Ok(resp),
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
