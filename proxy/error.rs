//! The proxy's one error type. Each error knows which side caused it, whether another
//! backend may be tried, and the response fulcrum sends for it (never naming a backend).

use http::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for this host and path")]
    NoRoute,
    #[error("no healthy backend in pool {pool}")]
    NoBackend { pool: std::sync::Arc<str> },
    #[error("connect to backend {backend} failed: {source}")]
    Connect {
        backend: std::net::SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("backend {backend} did not answer within {timeout:?}")]
    Timeout {
        backend: std::net::SocketAddr,
        timeout: std::time::Duration,
    },
    #[error("backend {backend} failed: {source}")]
    Upstream {
        backend: std::net::SocketAddr,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("rate limited")]
    RateLimited(crate::ratelimit::Decision),
    #[error("pool {pool}: every backend slot taken and the queue is full")]
    QueueFull { pool: std::sync::Arc<str> },
    #[error("pool {pool}: no backend slot within the queue timeout")]
    QueueTimeout { pool: std::sync::Arc<str> },
}

/// Who is to blame, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
    Internal,
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            ProxyError::BadRequest(_) | ProxyError::NoRoute | ProxyError::RateLimited(_) => {
                Side::Client
            }
            ProxyError::QueueFull { .. } | ProxyError::QueueTimeout { .. } => Side::Internal,
            ProxyError::Connect { .. }
            | ProxyError::Timeout { .. }
            | ProxyError::Upstream { .. } => Side::Upstream,
            ProxyError::NoBackend { .. } => Side::Internal,
        }
    }

    /// May the request be tried again on another backend (if it is idempotent)?
    /// A connect error never reached the backend; other failures may have.
    pub fn retryable(&self) -> bool {
        matches!(self, ProxyError::Connect { .. })
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::QueueFull { .. } | ProxyError::QueueTimeout { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The short plain-text body sent to the client: says what went wrong, never where.
    pub fn public_message(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "404 not found: no route for this host and path\n",
            ProxyError::NoBackend { .. } => "503 service unavailable: no healthy backend\n",
            ProxyError::Connect { .. } => "502 bad gateway: could not connect to the backend\n",
            ProxyError::Upstream { .. } => "502 bad gateway: the backend failed\n",
            ProxyError::Timeout { .. } => {
                "504 gateway timeout: the backend did not answer in time\n"
            }
            ProxyError::BadRequest(_) => "400 bad request\n",
            ProxyError::RateLimited(_) => "429 too many requests\n",
            ProxyError::QueueFull { .. } | ProxyError::QueueTimeout { .. } => {
                "503 service unavailable: the backends are at capacity\n"
            }
        }
    }
}
