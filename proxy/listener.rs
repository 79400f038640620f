//! Accepting client connections: one accept loop per listener, each connection served by
//! hyper (HTTP/1.1, or HTTP/2 by prior knowledge) and watched for graceful shutdown.

use std::convert::Infallible;
use std::sync::Arc;

use fulcrum_config::ServerConfig;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::server::Shared;
use crate::service::{self, ConnInfo};

/// The hyper connection builder all listeners share, with fulcrum's limits.
pub fn http_builder(cfg: &ServerConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.request_header_timeout)
        .max_buf_size(cfg.max_request_header_bytes)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(cfg.max_request_header_bytes as u32);
    b
}

pub struct Listener {
    pub name: Arc<str>,
    pub socket: TcpListener,
}

impl Listener {
    /// Accepts until `shutdown` flips, then drops the socket (no new connections); the
    /// connections already open are left to the graceful watcher.
    pub async fn run(
        self,
        shared: Arc<Shared>,
        builder: auto::Builder<TokioExecutor>,
        graceful: Arc<GracefulShutdown>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let accepted = tokio::select! {
                _ = stopped(&mut shutdown) => break,
                a = self.socket.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = %self.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let info = Arc::new(ConnInfo {
                listener: self.name.clone(),
                peer,
                tls: false,
            });
            let shared = shared.clone();
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                let info = info.clone();
                async move { Ok::<_, Infallible>(service::handle(&shared, &info, req).await) }
            });
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .into_owned();
            let conn = graceful.watch(conn);
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
                }
            });
        }
        tracing::info!(listener = %self.name, "stopped accepting");
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.is_ok();
}
