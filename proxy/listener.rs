//! Accepting client connections: one accept loop per listener. A plain connection is served
//! by fulcrum's own HTTP/1.1 side (`http1.rs`, which hands HTTP/2 and upgrades to hyper); a
//! TLS one by hyper (HTTP/1.1, or HTTP/2 by ALPN or prior knowledge). Both are watched for
//! graceful shutdown.

use std::convert::Infallible;
use std::sync::Arc;

use fulcrum_config::ServerConfig;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::net::IpAddr;

use dashmap::DashMap;
use fulcrum_config::ListenerConfig;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

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
    /// Connection slots (`max_connections`); at the cap a connection is answered 503 and closed.
    pub slots: Option<Arc<Semaphore>>,
    /// `max_connections_per_ip`, with the count per client address.
    pub per_ip: Option<(u32, Arc<DashMap<IpAddr, u32>>)>,
    /// What its connections share.
    pub info: Arc<crate::service::ListenerInfo>,
    /// `fulcrum_connections{listener}`.
    pub connections: metrics::Gauge,
    /// TLS termination, when the listener has `tls`.
    pub tls: Option<Arc<crate::tls::TlsState>>,
    /// `fulcrum_tls_handshakes_total{listener, result}`: success, failure.
    handshakes: (metrics::Counter, metrics::Counter),
    /// `proxy_protocol`: connections start with a PROXY header (from `trusted_proxies` only).
    pub proxy_protocol: bool,
}

/// The answer to a connection over a cap, written straight to the socket.
const OVER_CAP: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 46\r\n\r\n503 service unavailable: too many connections\n";

/// Holds a client's place under the per-address cap until its connection ends.
struct IpSlot(IpAddr, Arc<DashMap<IpAddr, u32>>);

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.1.remove_if_mut(&self.0, |_, n| {
            *n -= 1;
            *n == 0
        });
    }
}

impl Listener {
    pub fn new(
        config: &ListenerConfig,
        socket: TcpListener,
        server: &ServerConfig,
        tls: Option<Arc<crate::tls::TlsState>>,
        https_port: u16,
    ) -> Listener {
        let name = config.name.clone();
        let info = Arc::new(crate::service::ListenerInfo {
            name: Arc::from(config.name.as_str()),
            tls: tls.is_some(),
            max_requests: server.max_requests_per_connection,
            hsts: tls.as_ref().and_then(|t| t.hsts.clone()),
            // `redirect_https`: answer 308 to https (with this port; 443 is left out).
            redirect_https: config.redirect_https.then_some(https_port),
            forwarded: config.forwarded_headers,
            request_id: config.request_id,
            trusted: config.trusted_proxies.clone().into(),
            limits: crate::http1::Limits::new(server),
        });
        Listener {
            proxy_protocol: config.proxy_protocol,
            tls,
            handshakes: (
                metrics::counter!(crate::metrics::TLS_HANDSHAKES, "listener" => name.clone(), "result" => "success"),
                metrics::counter!(crate::metrics::TLS_HANDSHAKES, "listener" => name, "result" => "failure"),
            ),
            name: info.name.clone(),
            socket,
            slots: config
                .max_connections
                .map(|n| Arc::new(Semaphore::new(n as usize))),
            per_ip: config
                .max_connections_per_ip
                .map(|n| (n, Arc::new(DashMap::new()))),
            connections: metrics::gauge!(crate::metrics::CONNECTIONS, "listener" => config.name.clone()),
            info,
        }
    }

    /// Takes the connection's places under the caps, or `None` when it is over one.
    fn admit(&self, ip: IpAddr) -> Option<(Option<OwnedSemaphorePermit>, Option<IpSlot>)> {
        let permit = match &self.slots {
            Some(s) => Some(s.clone().try_acquire_owned().ok()?),
            None => None,
        };
        let ip_slot = match &self.per_ip {
            Some((max, counts)) => {
                let mut n = counts.entry(ip).or_insert(0);
                if *n >= *max {
                    return None;
                }
                *n += 1;
                drop(n);
                Some(IpSlot(ip, counts.clone()))
            }
            None => None,
        };
        Some((permit, ip_slot))
    }
}

impl Listener {
    /// Accepts until `shutdown` flips, then drops the socket (no new connections); the
    /// connections already open are left to the graceful watcher.
    pub async fn run(
        self,
        shared: Arc<Shared>,
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
            let trusted_peer = self.info.trusted.iter().any(|c| c.contains(peer.ip()));
            if self.proxy_protocol && !trusted_peer {
                // A PROXY header is believed only from the L4 balancers we were told about.
                tracing::debug!(listener = %self.name, client = %peer, "PROXY protocol from an untrusted peer: closed");
                continue;
            }
            let Some(places) = self.admit(peer.ip()) else {
                tracing::debug!(listener = %self.name, client = %peer, "connection over the cap: refused");
                tokio::spawn(async move {
                    let mut stream = stream;
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(1),
                        stream.write_all(OVER_CAP),
                    )
                    .await;
                    let _ = stream.shutdown().await;
                });
                continue;
            };
            let info = ConnInfo {
                listener: self.info.clone(),
                peer,
                served: std::sync::atomic::AtomicU64::new(0),
            };
            let connections = self.connections.clone();
            connections.increment(1.0);
            // One watcher per connection: the shutdown handle itself stays with the accept loop.
            let (shared, graceful) = (shared.clone(), graceful.watcher());
            // What a connection's task captures it keeps for its whole life, so a plain
            // connection captures little; TLS and PROXY-protocol ones take the boxed path.
            let how = if self.proxy_protocol || self.tls.is_some() {
                Err(Box::new(Wrapped {
                    info,
                    proxy_protocol: self.proxy_protocol,
                    tls: self
                        .tls
                        .as_ref()
                        .map(|t| (t.acceptor(), self.handshakes.clone())),
                }))
            } else {
                Ok(info)
            };
            let std = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(client = %peer, error = %e, "cannot hand the connection over");
                    continue;
                }
            };
            // Per core: the connection moves to the worker with the fewest open connections
            // and stays there; a burst of connects cannot pile onto one core.
            let (worker, assigned) = match crate::workers::get() {
                Some(w) => {
                    let (h, a) = w.assign();
                    (Some(h), Some(a))
                }
                None => (None, None),
            };
            let guards = Guards {
                _places: places,
                _open: Gauged(connections),
                _assigned: assigned,
            };
            match how {
                // The task is the connection's future itself, nothing wrapped around it.
                Ok(info) => spawn_on(worker, move || {
                    crate::http1::serve(std, info, shared, graceful, guards, true)
                }),
                Err(w) => spawn_on(worker, move || {
                    Box::pin(w.serve(std, shared, graceful, guards))
                }),
            }
        }
        tracing::info!(listener = %self.name, "stopped accepting");
    }
}

const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A connection that starts with a PROXY header or a TLS handshake.
struct Wrapped {
    info: ConnInfo,
    proxy_protocol: bool,
    tls: Option<(
        tokio_rustls::TlsAcceptor,
        (metrics::Counter, metrics::Counter),
    )>,
}

impl Wrapped {
    async fn serve(
        self,
        std: std::net::TcpStream,
        shared: Arc<Shared>,
        graceful: hyper_util::server::graceful::Watcher,
        guards: Guards,
    ) {
        let mut stream = match tokio::net::TcpStream::from_std(std) {
            Ok(s) => s,
            Err(e) => return tracing::warn!(error = %e, "worker cannot take the connection"),
        };
        let Wrapped {
            mut info,
            proxy_protocol,
            tls,
        } = self;
        let peer = info.peer;
        if proxy_protocol {
            match tokio::time::timeout(
                HANDSHAKE_TIMEOUT,
                crate::proxy_protocol::read_header(&mut stream),
            )
            .await
            {
                Ok(Ok(Some(client))) => info.peer = client,
                Ok(Ok(None)) => {}
                Ok(Err(e)) => {
                    tracing::debug!(client = %peer, error = %e, "PROXY protocol header refused");
                    return;
                }
                Err(_) => return,
            }
        }
        let Some((acceptor, (ok, failed))) = tls else {
            return match stream.into_std() {
                Ok(std) => crate::http1::serve(std, info, shared, graceful, guards, true).await,
                Err(e) => tracing::warn!(error = %e, "cannot serve the connection"),
            };
        };
        let _guards = guards;
        // Bounded like a request head: a client that stalls the handshake goes.
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls_stream)) => {
                ok.increment(1);
                serve_hyper(tls_stream, Arc::new(info), shared, graceful).await
            }
            Ok(Err(e)) => {
                failed.increment(1);
                tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
            }
            Err(_) => {
                failed.increment(1);
                tracing::debug!(client = %peer, "TLS handshake timed out");
            }
        }
    }
}

/// Serves one client connection with hyper (TLS, or what `http1` hands over) until it ends
/// or shutdown drains it.
pub(crate) async fn serve_hyper<I>(
    io: I,
    info: Arc<ConnInfo>,
    shared: Arc<Shared>,
    graceful: hyper_util::server::graceful::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let builder = shared.builder.clone();
    // The request future is boxed: hyper keeps one slot of the service future's size per
    // connection for its whole life, and an idle keep-alive connection should not hold 4 KB.
    // One per-connection Arc cloned per request: the process-wide `Shared` count is not
    // touched per request (its cache line would bounce between the worker cores).
    let both = Arc::new((shared, info));
    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let both = both.clone();
        Box::pin(async move {
            let (shared, info) = &*both;
            let mut resp = *service::handle(
                shared,
                info,
                Box::new(req.map(crate::body::RequestBody::Hyper)),
                &mut None,
            )
            .await;
            // hyper writes the map alone: a backend's kept lines go into it.
            crate::upstream::materialise(&mut resp, crate::body::Body::take_raw);
            Ok::<_, Infallible>(resp)
        })
    });
    let conn = builder
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .into_owned();
    if let Err(e) = graceful.watch(conn).await {
        tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
    }
}

/// What a connection holds until it ends: its places under the caps, its count in the
/// `fulcrum_connections` gauge and in its worker's load.
pub(crate) struct Guards {
    _places: (Option<OwnedSemaphorePermit>, Option<IpSlot>),
    _open: Gauged,
    _assigned: Option<crate::workers::Assigned>,
}

/// Spawns the connection's task on its worker. The task is made there, by a small task that
/// carries only the arguments: a task spawned from this (the accept) thread would be allocated
/// from this thread's heap and freed by the worker's, which leaves the allocator pages that
/// the worker cannot give back (`crate::park` returns the memory of idle connections).
fn spawn_on<M, F>(worker: Option<&'static tokio::runtime::Handle>, make: M)
where
    M: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    match worker {
        Some(h) => drop(h.spawn(async move { drop(tokio::spawn(make())) })),
        None => drop(tokio::spawn(make())),
    }
}

/// Decrements a gauge when the connection's task ends, however it ends.
pub(crate) struct Gauged(metrics::Gauge);

impl Drop for Gauged {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// Resolves once the stop flag is set (or its sender is gone).
pub async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await.is_ok();
}
