//! `fulcrum demo`: three small backends on loopback that answer with their own name, and the
//! embedded config that balances them, so `curl 127.0.0.1:8080/` shows balancing at once.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::body::Body;

/// The embedded default config: weighted round-robin 3:1:1 over the three demo backends.
pub const DEMO_CONFIG: &str = r#"# fulcrum demo: the embedded default config
[server]
drain_timeout = "5s"

[admin]
listen = "127.0.0.1:9090"

[[listeners]]
name = "http"
listen = "127.0.0.1:8080"

[[routes]]
pool = "demo"

[pools.demo]
algorithm = "weighted_round_robin"
backends = [
  { address = "127.0.0.1:9201", weight = 3 },
  { address = "127.0.0.1:9202" },
  { address = "127.0.0.1:9203" },
]
"#;

pub const DEMO_BACKENDS: [(&str, &str); 3] = [
    ("demo-backend-1", "127.0.0.1:9201"),
    ("demo-backend-2", "127.0.0.1:9202"),
    ("demo-backend-3", "127.0.0.1:9203"),
];

/// Starts the demo backends; each answers `hello from NAME` (and 200 on its health path).
pub async fn spawn_backends() -> anyhow::Result<()> {
    for (name, addr) in DEMO_BACKENDS {
        let addr: SocketAddr = addr.parse()?;
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("demo backend {name}: cannot bind {addr}: {e}"))?;
        tokio::spawn(serve(name, socket));
    }
    Ok(())
}

/// Serves `hello from NAME` on `socket` forever (the demo backends, and `fulcrum backend`
/// for load tests).
pub async fn serve(name: &'static str, socket: TcpListener) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            continue;
        };
        let svc = service_fn(move |req: Request<Incoming>| async move {
            let body = format!("hello from {name} (path {})\n", req.uri().path());
            Ok::<_, Infallible>(Response::new(Body::full(Bytes::from(body))))
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
