//! Real in-process backends and a real proxy for integration tests, all on 127.0.0.1 with
//! ephemeral ports: `backend("a").slow(50ms).spawn()`, `proxy(config_text)`.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub type TestBody = BoxBody<Bytes, std::io::Error>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// What a test backend saw.
#[derive(Default)]
pub struct Seen {
    pub hits: AtomicUsize,
    /// The status ordinary requests get; tests change it to make a backend fail or recover.
    pub status: std::sync::atomic::AtomicU16,
    /// TCP connections accepted.
    pub conns: AtomicUsize,
    /// Requests being answered now, and the most ever at once.
    pub active: AtomicUsize,
    pub max_active: AtomicUsize,
    pub headers: Mutex<Vec<HeaderMap>>,
    /// Set when the backend has received the first chunk of an upload on `/upload-gated`.
    pub first_chunk: Arc<Notify>,
    /// The test notifies this to let `/download-gated` send the rest of its body.
    pub release: Arc<Notify>,
}

pub struct BackendBuilder {
    name: String,
    delay: Duration,
    status: StatusCode,
}

pub fn backend(name: &str) -> BackendBuilder {
    BackendBuilder {
        name: name.to_string(),
        delay: Duration::ZERO,
        status: StatusCode::OK,
    }
}

pub struct TestBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
    dead: tokio::sync::watch::Sender<bool>,
}

impl TestBackend {
    pub fn hits(&self) -> usize {
        self.seen.hits.load(Ordering::SeqCst)
    }
    pub fn last_headers(&self) -> HeaderMap {
        self.seen
            .headers
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("no request seen")
    }
    /// Dies like a crashed process: the listening socket and every open connection close.
    pub fn kill(&self) {
        self.task.abort();
        let _ = self.dead.send(true);
    }
    pub fn set_status(&self, s: u16) {
        self.seen.status.store(s, Ordering::SeqCst);
    }
}

impl BackendBuilder {
    /// Delay every answer by `d`.
    pub fn slow(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }
    /// Answer every request with this status.
    pub fn status(mut self, s: u16) -> Self {
        self.status = StatusCode::from_u16(s).unwrap();
        self
    }

    /// Serves on a fresh port of 127.0.0.1. Paths:
    /// `/stall` never answers; `/upload` answers the byte count of the body it read;
    /// `/upload-gated` signals after its first chunk; `/bytes/N` streams N bytes;
    /// `/download-gated` sends one chunk, waits for `release`, then sends 10 MiB more;
    /// anything else answers the backend's name.
    pub async fn spawn(self) -> TestBackend {
        self.spawn_at("127.0.0.1:0".parse().unwrap()).await
    }

    /// Serves on `addr` (a killed backend's address, to bring it back).
    pub async fn spawn_at(self, addr: SocketAddr) -> TestBackend {
        let socket = TcpListener::bind(addr).await.unwrap();
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        seen.status.store(self.status.as_u16(), Ordering::SeqCst);
        let name: Arc<str> = Arc::from(self.name.as_str());
        let delay = self.delay;
        let (dead, dead_rx) = tokio::sync::watch::channel(false);
        let seen2 = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = socket.accept().await else {
                    continue;
                };
                seen2.conns.fetch_add(1, Ordering::SeqCst);
                let seen = seen2.clone();
                let name = name.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let seen = seen.clone();
                    let name = name.clone();
                    async move {
                        let status =
                            StatusCode::from_u16(seen.status.load(Ordering::SeqCst)).unwrap();
                        Ok::<_, Infallible>(answer(req, &name, &seen, delay, status).await)
                    }
                });
                let mut dead = dead_rx.clone();
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = dead.wait_for(|d| *d) => {}
                    }
                });
            }
        });
        TestBackend {
            name: self.name,
            addr,
            seen,
            task,
            dead,
        }
    }
}

async fn answer(
    req: Request<Incoming>,
    name: &str,
    seen: &Seen,
    delay: Duration,
    status: StatusCode,
) -> Response<TestBody> {
    seen.hits.fetch_add(1, Ordering::SeqCst);
    seen.headers.lock().unwrap().push(req.headers().clone());
    let now = seen.active.fetch_add(1, Ordering::SeqCst) + 1;
    seen.max_active.fetch_max(now, Ordering::SeqCst);
    let _active = ActiveGuard(seen);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let path = req.uri().path().to_string();
    if req.headers().contains_key("sec-websocket-key") && req.headers().contains_key("upgrade") {
        return websocket_echo(req, name);
    }
    if let Some(n) = path.strip_prefix("/text/") {
        // Compressible text: a repeating sentence, n bytes.
        let text: String = "the quick brown fox jumps over the lazy dog. "
            .chars()
            .cycle()
            .take(n.parse().unwrap())
            .collect();
        let mut r = Response::new(full(text));
        r.headers_mut()
            .insert("content-type", "text/plain; charset=utf-8".parse().unwrap());
        return r;
    }
    if path == "/already-gzip" || path == "/image" {
        let mut r = Response::new(full(vec![0x1fu8; 4096]));
        if path == "/image" {
            r.headers_mut()
                .insert("content-type", "image/png".parse().unwrap());
        } else {
            r.headers_mut()
                .insert("content-type", "text/plain".parse().unwrap());
            r.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
        }
        return r;
    }
    let body = if path == "/stall" {
        std::future::pending::<()>().await;
        unreachable!()
    } else if path == "/upload" || path == "/upload-gated" {
        let mut body = req.into_body();
        let mut n = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(d) = frame.data_ref() {
                if n == 0 && path == "/upload-gated" {
                    seen.first_chunk.notify_one();
                }
                n += d.len();
            }
        }
        full(n.to_string())
    } else if let Some(n) = path.strip_prefix("/bytes/") {
        Repeat::new(n.parse().unwrap(), None).boxed()
    } else if path == "/download-gated" {
        // One chunk now, the rest only after the test releases it.
        Repeat::new(
            64 * 1024 + 10 * 1024 * 1024,
            Some((64 * 1024, seen.release.clone())),
        )
        .boxed()
    } else {
        let mut r = Response::new(full(name.to_string()));
        *r.status_mut() = status;
        r.headers_mut().insert("x-backend", name.parse().unwrap());
        // A hop-by-hop header the proxy must not pass on.
        r.headers_mut()
            .insert("connection", "x-backend-hop".parse().unwrap());
        r.headers_mut()
            .insert("x-backend-hop", "secret".parse().unwrap());
        return r;
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    r
}

static CHUNK: [u8; 65536] = [b'x'; 65536];

/// A body of `n` bytes made on the fly, optionally pausing after `gate.0` bytes until
/// `gate.1` is notified.
type Gate = Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>>;

struct Repeat {
    left: usize,
    sent: usize,
    gate: Option<(usize, Gate)>,
}

impl Repeat {
    fn new(n: usize, gate: Option<(usize, Arc<Notify>)>) -> Repeat {
        Repeat {
            left: n,
            sent: 0,
            gate: gate.map(|(at, notify)| {
                let fut: Gate = Box::pin(async move { notify.notified().await });
                (at, fut)
            }),
        }
    }
}

impl hyper::body::Body for Repeat {
    type Data = Bytes;
    type Error = std::io::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        let sent = self.sent;
        if let Some((at, fut)) = &mut self.gate {
            if sent >= *at {
                match fut.as_mut().poll(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(()) => self.gate = None,
                }
            }
        }
        let n = self.left.min(CHUNK.len());
        self.left -= n;
        self.sent += n;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(&CHUNK[..n])))))
    }
}

/// A plain HTTP/1.1 client with keep-alive.
pub fn client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// An HTTP/2 (prior knowledge) client.
pub fn h2c_client() -> Client<HttpConnector, TestBody> {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new())
}

/// GET `url` with optional headers; returns status, headers and the whole body as text.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client()
        .request(req.body(full("")).unwrap())
        .await
        .expect("request failed");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body failed").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A running in-process fulcrum.
pub struct TestProxy {
    pub running: fulcrum::Running,
    /// `http://127.0.0.1:PORT` of the first listener.
    pub url: String,
}

/// Starts fulcrum with `config` (TOML); its listeners and admin should use port 0.
pub async fn proxy(config: &str) -> TestProxy {
    let config =
        fulcrum::config::Config::parse(config, "test.toml").unwrap_or_else(|e| panic!("{e}"));
    let running = fulcrum::start(config, None)
        .await
        .expect("proxy did not start");
    let url = format!("http://{}", running.listeners[0].1);
    TestProxy { running, url }
}

/// `config` (one listener on port 0 followed by the routes, as [`one_pool`] writes it) with
/// `lines` added to the listener's table.
pub fn on_listener(config: &str, lines: &str) -> String {
    let at = "listen = \"127.0.0.1:0\"\n\n[[routes]]";
    assert!(config.contains(at), "no listener table to add to: {config}");
    config.replace(
        at,
        &format!("listen = \"127.0.0.1:0\"\n{lines}\n\n[[routes]]"),
    )
}

/// A config with one listener, one catch-all route and one pool over `backends`
/// (`(address, weight)`), plus `extra` TOML lines inside the pool table.
pub fn one_pool(algorithm: &str, backends: &[(SocketAddr, u32)], extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{ address = \"{a}\", weight = {w} }}"))
        .collect();
    format!(
        r#"
[admin]
listen = "127.0.0.1:0"

[[listeners]]
name = "http"
listen = "127.0.0.1:0"

[[routes]]
pool = "p"

[pools.p]
algorithm = "{algorithm}"
backends = [{}]
{extra}
"#,
        list.join(", ")
    )
}

/// GET over a fresh connection whose source address is `from` (any 127.0.0.0/8 address), so
/// tests can be many clients.
pub async fn get_from(from: std::net::IpAddr, url: &str) -> (StatusCode, String) {
    let uri: http::Uri = url.parse().unwrap();
    let port = uri.port_u16().unwrap_or(80);
    let host = uri.host().unwrap().to_string();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(from, 0)).unwrap();
    let stream = socket
        .connect(SocketAddr::new(host.parse().unwrap(), port))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get(uri.path())
        .header("host", host)
        .body(full(""))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Sends `total` GETs to `url` from `concurrency` concurrent clients; returns the bodies.
pub async fn load(url: &str, concurrency: usize, total: usize) -> Vec<String> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, url) = (next.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let c = client();
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total {
                let resp = c
                    .request(Request::get(url.as_str()).body(full("")).unwrap())
                    .await
                    .unwrap();
                let body = resp.into_body().collect().await.unwrap().to_bytes();
                out.push(String::from_utf8_lossy(&body).into_owned());
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// An admin API call: `(status, body)`.
pub async fn call(method: &str, url: &str, body: &str) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(full(body.to_string()))
        .unwrap();
    let resp = client().request(req).await.expect("admin call failed");
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Starts fulcrum from a config file (so reloads re-read it).
pub async fn proxy_from_file(path: &std::path::Path) -> TestProxy {
    let config = fulcrum::config::Config::load(path).unwrap_or_else(|e| panic!("{e}"));
    let running = fulcrum::start(config, Some(path.to_path_buf()))
        .await
        .expect("proxy did not start");
    let url = format!("http://{}", running.listeners[0].1);
    TestProxy { running, url }
}

impl TestProxy {
    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{path}", self.running.admin)
    }

    /// `/status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let (_, body) = call("GET", &self.admin("/status"), "").await;
        serde_json::from_str(&body).unwrap()
    }
}

/// Accepts a WebSocket upgrade, then sends the backend's name and echoes every message
/// (tungstenite answers pings itself).
fn websocket_echo(mut req: Request<Incoming>, name: &str) -> Response<TestBody> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{handshake::derive_accept_key, protocol::Role, Message};
    let key = req.headers()["sec-websocket-key"].as_bytes().to_vec();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let name = name.to_string();
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        if ws.send(Message::text(name)).await.is_err() {
            return;
        }
        // Pings and closes are answered by tungstenite itself (the close answer is sent on
        // the next poll, which then ends the stream).
        while let Some(Ok(msg)) = ws.next().await {
            let data = matches!(msg, Message::Text(_) | Message::Binary(_));
            if data && ws.send(msg).await.is_err() {
                return;
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-accept", derive_accept_key(&key))
        .body(full(""))
        .unwrap()
}

/// Raises this process's open-file limit (tests hold thousands of sockets).
pub fn many_files() {
    let _ = rlimit::increase_nofile_limit(65_536);
}

struct ActiveGuard<'a>(&'a Seen);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A port that was free a moment ago (for the binary, which binds its own).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes `chunks` to a fresh connection to `addr` (stopping at the first the peer refuses)
/// and returns everything read back until it closes (at most 5 s).
pub async fn raw_exchange(addr: SocketAddr, chunks: &[&[u8]]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    for chunk in chunks {
        if s.write_all(chunk).await.is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The `fulcrum` binary run by a test: its config file (in a directory removed on drop),
/// listener and admin ports.
pub struct BinaryConfig {
    pub dir: tempfile::TempDir,
    pub path: std::path::PathBuf,
    pub port: u16,
    pub admin: u16,
}

/// A config for the binary: `server` (the `[server]` lines, given the config's directory)
/// and one listener routing everything to `backend`, on free ports.
pub fn binary_config(
    server: impl FnOnce(&std::path::Path) -> String,
    backend: SocketAddr,
) -> BinaryConfig {
    let (port, admin) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\n{}\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n[[routes]]\npool = \"p\"\n[pools.p]\nbackends = [{{ address = \"{backend}\" }}]\n",
            server(dir.path())
        ),
    )
    .unwrap();
    BinaryConfig {
        dir,
        path,
        port,
        admin,
    }
}

/// Starts `fulcrum ARGS -c PATH`, its output discarded.
pub fn run_binary(args: &[&str], path: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(args)
        .arg("-c")
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Sends `SIGTERM` to `child`.
pub fn sigterm(child: &std::process::Child) {
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success(), "kill -TERM {} failed", child.id());
}

/// `child`'s exit status, polled for up to `limit`; fails the test with `what` if it is
/// still running then.
pub async fn exited(
    child: &mut std::process::Child,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
