//! One request end to end: snapshot → route → pool → backend → upstream → response, with
//! retries on another backend for requests that are safe to repeat.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::body::RequestBody;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;

use crate::body::Body;
use crate::error::ProxyError;
use crate::headers;
use crate::pool::{BackendId, InFlight, Pool};
use crate::rawfields::RawFields;
use crate::server::Shared;
use crate::sticky;
use crate::websocket;

/// Bodies up to this size of idempotent requests are kept so the request can be retried;
/// larger ones stream through once.
const REPLAY_LIMIT: u64 = 64 * 1024;
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What a request knows about the connection it came on (kept small: an idle client
/// connection holds one).
pub struct ConnInfo {
    pub listener: Arc<ListenerInfo>,
    pub peer: SocketAddr,
    /// Requests served on this connection (against `max_requests_per_connection`).
    pub served: std::sync::atomic::AtomicU64,
}

/// What every connection of one listener shares.
pub struct ListenerInfo {
    pub name: Arc<str>,
    pub tls: bool,
    /// `max_requests_per_connection`.
    pub max_requests: Option<u64>,
    /// `Strict-Transport-Security` for TLS listeners that set `hsts`.
    pub hsts: Option<HeaderValue>,
    /// `redirect_https`: the https port to send clients to.
    pub redirect_https: Option<u16>,
    /// `forwarded_headers`: add `X-Forwarded-*` on the way in.
    pub forwarded: bool,
    /// `request_id`: give each request an `X-Request-Id` and echo it in the answer.
    pub request_id: bool,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted: Arc<[fulcrum_config::Cidr]>,
    /// Timeouts and head size for fulcrum's own HTTP/1.1 side.
    pub limits: crate::http1::Limits,
}

impl ConnInfo {
    /// The client a request is from: the peer, or, when the peer is a trusted proxy, the
    /// nearest `X-Forwarded-For` hop that is not itself trusted. It drives ip_hash, rate
    /// limits and the access log.
    pub fn client_ip(&self, headers: &http::HeaderMap) -> std::net::IpAddr {
        let trusted = |ip: std::net::IpAddr| self.listener.trusted.iter().any(|c| c.contains(ip));
        let mut client = self.peer.ip();
        if !trusted(client) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all(&headers::X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.iter().rev() {
            match hop.trim().parse::<std::net::IpAddr>() {
                Ok(ip) => {
                    client = ip;
                    if !trusted(ip) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        client
    }
}

/// Serves one request; never fails (errors become fulcrum's own responses).
/// What the proxy learned about a request, for metrics and the access log.
#[derive(Default)]
pub struct RequestCtx {
    pub route: Option<Arc<crate::metrics::RouteMetrics>>,
    pub pool: Option<Arc<str>>,
    pub backend: Option<BackendId>,
    pub upstream: Option<Duration>,
    pub client: Option<std::net::IpAddr>,
}

static X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// A request id when the client sent none: 128 random-looking bits as hex.
fn new_request_id() -> HeaderValue {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(crate::balance::random::mix64(
            crate::balance::ewma::now_ns() ^ (&STATE as *const _ as u64),
        ));
    }
    let (a, b) = STATE.with(|s| {
        let x = s.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        s.set(x);
        (
            crate::balance::random::mix64(x),
            crate::balance::random::mix64(!x),
        )
    });
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 32];
    for (i, byte) in a
        .to_be_bytes()
        .into_iter()
        .chain(b.to_be_bytes())
        .enumerate()
    {
        text[2 * i] = HEX[(byte >> 4) as usize];
        text[2 * i + 1] = HEX[(byte & 15) as usize];
    }
    // Shared from the start: the answer echoes a clone, which costs no allocation then.
    headers::shared_value(text).unwrap_or(HeaderValue::from_static("0"))
}

/// One request through routing, the balancer and a backend (or an error answer). Requests
/// and answers travel boxed: each layer's future then holds a pointer, where a `Request` or
/// `Response` moved by value was copied (224-360 bytes) into every layer on its way.
pub async fn handle(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Box<Request<RequestBody>>,
    raw: &mut Option<RawFields>,
) -> Box<Response<Body>> {
    // Every request carries an id to the backend and back (generated when absent). With
    // ids off and no access log, nobody reads it: not even looked up.
    let wanted = conn.listener.request_id || shared.access_log.is_some();
    if wanted {
        materialise(req.headers_mut(), raw);
    }
    let request_id = if !wanted {
        None
    } else if let Some(id) = req.headers().get(&X_REQUEST_ID) {
        Some(id.clone())
    } else if conn.listener.request_id {
        let id = new_request_id();
        req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
        Some(id)
    } else {
        None
    };
    let log_fields = shared.access_log.as_ref().map(|log| {
        let h = req.headers();
        let text = |n: http::header::HeaderName| {
            h.get(n).and_then(|v| v.to_str().ok()).map(str::to_string)
        };
        (
            log.clone(),
            std::time::Instant::now(),
            req.method().clone(),
            req.uri()
                .path_and_query()
                .map_or("/".to_string(), |p| p.to_string()),
            req.version(),
            text(header::USER_AGENT),
            text(header::REFERER),
        )
    });
    let mut ctx = RequestCtx::default();
    let mut resp = match conn.listener.redirect_https {
        Some(port) => Box::new(redirect_to_https(&req, port)),
        None => respond(shared, conn, req, raw, &mut ctx).await,
    };
    // Draining (shutdown or upgrade): every answer closes its connection, so keep-alive
    // clients leave cleanly instead of racing the close of an idle connection.
    if shared.draining.load(std::sync::atomic::Ordering::Relaxed) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(hsts) = &conn.listener.hsts {
        set_header(&mut resp, &header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
    let status = resp.status().as_u16();
    if let Some(route) = &ctx.route {
        route.observe(status);
    }
    if let (true, Some(id)) = (conn.listener.request_id, &request_id) {
        set_header(&mut resp, &X_REQUEST_ID, id.clone());
    }
    if let Some((log, started, method, path, version, user_agent, referer)) = log_fields {
        let entry = crate::accesslog::Entry {
            log,
            started,
            client: ctx.client.unwrap_or(conn.peer.ip()),
            listener: conn.listener.name.clone(),
            method,
            path,
            version,
            status,
            bytes: 0,
            pool: ctx.pool.clone(),
            backend: ctx.backend.map(|b| b.to_string()),
            upstream: ctx.upstream,
            request_id: request_id
                .as_ref()
                .and_then(|id| id.to_str().ok())
                .unwrap_or("")
                .to_string(),
            user_agent,
            referer,
        };
        let body = std::mem::replace(resp.body_mut(), Body::empty());
        *resp.body_mut() = Body::Logged(Box::new(body), Some(entry));
    }
    if let Some(max) = conn.listener.max_requests {
        // The last request a connection may carry: tell the client; the connection (fulcrum's
        // HTTP/1.1 side or hyper's) closes after this answer.
        if conn
            .served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
            >= max
        {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
    resp
}

/// A request's kept lines (`rawfields`) into its map, for what reads the map; they then go
/// to the backend from there.
pub(crate) fn materialise(headers: &mut http::HeaderMap, raw: &mut Option<RawFields>) {
    if let Some(raw) = raw.take() {
        raw.into_map(headers);
    }
}

/// Sets `name` on an answer, over any the backend sent: its kept line cut (`rawfields`; or,
/// when a head cannot lose more lines, its lines put into the map first, where `insert`
/// replaces them). `Connection` needs none of this: a backend's never stays.
fn set_header(resp: &mut Response<Body>, name: &http::HeaderName, value: HeaderValue) {
    if let Some(raw) = resp.body_mut().raw_mut() {
        if !raw.remove(name.as_str().as_bytes()) {
            crate::upstream::materialise(resp, Body::take_raw);
        }
    }
    resp.headers_mut().insert(name.clone(), value);
}

/// `308 Permanent Redirect` to the same URL over https.
fn redirect_to_https(req: &Request<RequestBody>, port: u16) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(req.uri().host())
        .unwrap_or("localhost");
    let host = if host.starts_with('[') {
        host.rsplit_once("]:")
            .map_or(host.to_string(), |(h, _)| format!("{h}]"))
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h).to_string()
    };
    let port = if port == 443 {
        String::new()
    } else {
        format!(":{port}")
    };
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let mut resp = Response::new(Body::full(Bytes::from_static(
        b"308 permanent redirect to https\n",
    )));
    *resp.status_mut() = StatusCode::PERMANENT_REDIRECT;
    if let Ok(v) = HeaderValue::from_str(&format!("https://{host}{port}{path}")) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    resp
}

async fn respond(
    shared: &Shared,
    conn: &ConnInfo,
    req: Box<Request<RequestBody>>,
    raw: &mut Option<RawFields>,
    ctx: &mut RequestCtx,
) -> Box<Response<Body>> {
    let grpc = crate::grpc::is_grpc(req.headers());
    match proxy(shared, conn, req, raw, grpc, ctx).await {
        Ok(resp) => resp,
        Err(e) => {
            match e.side() {
                crate::error::Side::Upstream => {
                    tracing::warn!(error = %e, client = %conn.peer, "upstream error")
                }
                _ => tracing::debug!(error = %e, client = %conn.peer, "request refused"),
            }
            Box::new(if grpc {
                crate::grpc::error_response(&e)
            } else {
                error_response(&e)
            })
        }
    }
}

/// GET, HEAD, OPTIONS, PUT, DELETE (and TRACE): repeating them changes nothing more.
pub(crate) fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

async fn proxy(
    shared: &Shared,
    conn: &ConnInfo,
    mut req: Box<Request<RequestBody>>,
    raw: &mut Option<RawFields>,
    grpc: bool,
    ctx: &mut RequestCtx,
) -> Result<Box<Response<Body>>, ProxyError> {
    // An upgrade (WebSocket) keeps the client's connection to splice it after the 101.
    let upgrade = websocket::requested_upgrade(req.headers());
    let client_upgrade = upgrade.as_ref().map(|_| hyper::upgrade::on(&mut *req));
    let (mut parts, body) = (*req).into_parts();
    // The host the client asked for: Host for HTTP/1.1, :authority for HTTP/2.
    let host_header = parts.headers.get(header::HOST);
    let host_in_headers = host_header.is_some();
    let host: Option<HeaderValue> = match host_header {
        Some(h) => Some(h.clone()),
        None => parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok()),
    };

    // One snapshot load; the pool is cloned out so nothing borrows the snapshot across an
    // await (a reload may swap it meanwhile; this request finishes on the pool it chose).
    let (mut pool, upgrade_allowed, idle_timeout, limiter, compress_route): (
        Arc<Pool>,
        bool,
        Duration,
        _,
        bool,
    ) = {
        let snap = shared.snapshot.load();
        // Kept lines stay lines only while nothing reads them: gRPC, forwarding headers and
        // trusted proxies' `X-Forwarded-For` read the map, and so do header matches, sticky
        // sessions, header-keyed limits and compression (the routes', as of this snapshot).
        if grpc
            || conn.listener.forwarded
            || !conn.listener.trusted.is_empty()
            || snap.router.reads_request_headers()
        {
            materialise(&mut parts.headers, raw);
        }
        let route = snap
            .router
            .find(
                &conn.listener.name,
                host.as_ref().and_then(|h| h.to_str().ok()),
                parts.uri.path(),
                &parts.headers,
            )
            .ok_or(ProxyError::NoRoute)?;
        let allowed = upgrade
            .as_ref()
            .is_some_and(|u| route.config.upgrades.iter().any(|a| a == u));
        ctx.route = Some(route.metrics.clone());
        (
            route.pool().clone(),
            allowed,
            snap.config.server.websocket_idle_timeout,
            route.limiter.clone(),
            route.config.compression,
        )
    };
    // What compression needs from the request, kept before the headers go to the backend.
    let compression = {
        compress_route.then(|| {
            let mut h = http::HeaderMap::new();
            for v in parts.headers.get_all(header::ACCEPT_ENCODING) {
                h.append(header::ACCEPT_ENCODING, v.clone());
            }
            (parts.method.clone(), h)
        })
    };
    if shared.access_log.is_some() {
        ctx.pool = Some(pool.name.clone());
    }
    let client = conn.client_ip(&parts.headers);
    ctx.client = Some(client);

    // Rate limit before anything touches a backend.
    if let Some(l) = &limiter {
        let ip = client;
        let local = || l.check_local(l.key(ip, &parts.headers), crate::balance::ewma::now_ns());
        let decision = match (&shared.redis, l.config.global) {
            // Boxed: rare, and its future would otherwise sit inside every request's.
            (Some(store), true) => {
                match Box::pin(l.check_global(store, &l.store_key(ip, &parts.headers))).await {
                    Ok(d) => d,
                    Err(e) => {
                        shared
                            .store_errors
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tracing::debug!(error = %e, "rate-limit store unavailable: fallback applies");
                        if l.config.deny_on_store_error {
                            crate::ratelimit::Decision {
                                allowed: false,
                                limit: l.config.burst,
                                remaining: 0,
                                reset: 1,
                                retry_after: 1,
                            }
                        } else {
                            local()
                        }
                    }
                }
            }
            _ => local(),
        };
        if !decision.allowed {
            if let Some(r) = &ctx.route {
                r.ratelimited.increment(1);
            }
            return Err(ProxyError::RateLimited(decision));
        }
    }

    // Kept lines lost their hop-by-hop ones as they were parsed, and the map beside them
    // holds none.
    let named_removed = raw.is_none() && headers::strip_hop_by_hop(&mut parts.headers);
    if conn.listener.forwarded {
        headers::add_forwarded(
            &mut parts.headers,
            conn.peer.ip(),
            conn.listener.tls,
            host.as_ref(),
        );
    }
    // The backend gets a Host: the :authority of an HTTP/2 request, or the client's Host
    // again if its `Connection` named it (looked up only then).
    if let Some(h) = &host {
        if !host_in_headers || (named_removed && !parts.headers.contains_key(header::HOST)) {
            parts.headers.insert(header::HOST, h.clone());
        }
    }
    // An allowed upgrade is the one hop-by-hop exchange passed on, as asked.
    let client_upgrade = match (upgrade_allowed, client_upgrade, &upgrade) {
        (true, Some(on), Some(proto)) => {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Ok(v) = HeaderValue::from_str(proto) {
                parts.headers.insert(header::UPGRADE, v);
            }
            Some(on)
        }
        _ => None,
    };
    parts.version = Version::HTTP_11;
    // gRPC's own deadline caps the backend timeout.
    let timeout = grpc
        .then(|| crate::grpc::timeout(&parts.headers))
        .flatten()
        .map_or(pool.config.timeout, |t| t.min(pool.config.timeout));

    // Can this request be sent twice? Idempotent, and its body (if any) small enough to keep.
    // gRPC calls (POSTs) are retried only on the statuses the pool lists in `retry_on`.
    let grpc_retry = grpc && !pool.config.retry.grpc_retry_on.is_empty();
    let retries = if idempotent(&parts.method) || grpc_retry {
        pool.config.retry.attempts
    } else {
        0
    };
    let mut stream_body: Option<Body> = None;
    let mut replay: Option<Bytes> = None;
    if retries == 0 {
        stream_body = Some(Body::stream(body));
    } else if http_body::Body::is_end_stream(&body) {
        replay = Some(Bytes::new());
    } else if http_body::Body::size_hint(&body)
        .exact()
        .is_some_and(|n| n <= REPLAY_LIMIT)
    {
        let bytes = Box::pin(body.collect())
            .await
            .map_err(|_| ProxyError::BadRequest("request body ended early"))?
            .to_bytes();
        replay = Some(bytes);
    } else if grpc_retry {
        // gRPC clients rarely send a length: read up to the limit; a call that ends within
        // it can be replayed, a longer one streams on with what was read in front.
        let mut body = body;
        let mut buf = bytes::BytesMut::new();
        let mut complete = false;
        while buf.len() <= REPLAY_LIMIT as usize {
            match Box::pin(body.frame()).await {
                None => {
                    complete = true;
                    break;
                }
                Some(Ok(f)) => {
                    if let Ok(d) = f.into_data() {
                        buf.extend_from_slice(&d);
                    }
                }
                Some(Err(_)) => return Err(ProxyError::BadRequest("request body ended early")),
            }
        }
        if complete {
            replay = Some(buf.freeze());
        } else {
            stream_body = Some(Body::Prefixed(Some(buf.freeze()), body));
        }
    } else {
        stream_body = Some(Body::stream(body));
    }
    let max_attempts = if replay.is_some() { 1 + retries } else { 1 };
    pool.retry_budget.deposit();

    let mut client_upgrade = client_upgrade;
    let mut tried = [BackendId(0); 11];
    let mut last: Option<Result<Box<Response<Body>>, ProxyError>> = None;
    for attempt in 0..max_attempts as usize {
        if attempt > 0 {
            if !pool.retry_budget.try_withdraw() {
                break;
            }
            Box::pin(tokio::time::sleep(backoff(&pool, attempt))).await;
        }
        let mut picked = pool
            .pick(client, &parts.headers, &tried[..attempt])
            .map(|p| (p.backend, p.set_cookie));
        if picked.is_none() {
            // A reload may have replaced this pool's members while the request was on its
            // way (they are draining now): take the pool's current version and pick again.
            let current = shared.snapshot.load().pools.get(&*pool.name).cloned();
            if let Some(current) = current.filter(|c| !Arc::ptr_eq(c, &pool)) {
                pool = current;
                // A sticky pool now (the reload changed it): it reads the cookie.
                if pool.config.sticky.is_some() {
                    materialise(&mut parts.headers, raw);
                }
                picked = pool
                    .pick(client, &parts.headers, &tried[..attempt])
                    .map(|p| (p.backend, p.set_cookie));
            }
        }
        let Some((backend, set_cookie)) = picked else {
            break;
        };
        tried[attempt] = backend.id;
        ctx.backend = Some(backend.id);

        let is_last = attempt + 1 == max_attempts as usize;
        let body = match (&replay, stream_body.take()) {
            (Some(b), _) => Body::full(b.clone()),
            (None, Some(b)) => b,
            (None, None) => Body::empty(),
        };

        // A capped backend: wait for a slot in the pool's bounded queue.
        let permit = match &backend.state.slots {
            None => None,
            Some(slots) => Some(Box::pin(acquire_slot(&pool, slots)).await?),
        };
        let mut guard = InFlight::begin(&backend.state);
        guard.hold(permit);
        let started = crate::clock::now().into_std();
        let result = backend
            .state
            .client_for_next()
            .forward(backend, &mut parts, raw, body, timeout, is_last)
            .await;
        // One clock read stamps everything this attempt records.
        let done = crate::clock::now().into_std();
        let now = crate::balance::ewma::ns_at(done);
        let elapsed = done.saturating_duration_since(started);
        ctx.upstream = Some(elapsed);
        backend.state.latency_window.record_at(elapsed, done);
        match result {
            Ok(mut resp) => {
                // gRPC retries read the answer's status header; compression its type and
                // coding: as a map.
                if grpc_retry || compression.is_some() {
                    crate::upstream::materialise(
                        &mut resp,
                        crate::upstream::UpstreamBody::take_raw,
                    );
                }
                let ok = !resp.status().is_server_error();
                if let Some(m) = &backend.state.metrics {
                    m.observe(resp.status().as_u16(), elapsed);
                }
                guard.record_at(elapsed, ok, now);
                pool.observe_at(backend, ok, now);
                let grpc_failed = grpc_retry
                    && resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok()?.parse::<u8>().ok())
                        .is_some_and(|c| pool.config.retry.grpc_retry_on.contains(&c));
                let retry = (matches!(
                    resp.status(),
                    StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE
                ) || grpc_failed)
                    && !is_last;
                let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                if switching && client_upgrade.is_none() {
                    // A 101 nobody asked for (or the route does not allow): refuse it.
                    return Err(ProxyError::Upstream {
                        backend: backend.addr,
                        source: "switched protocols without an allowed upgrade request".into(),
                    });
                }
                let backend_upgrade = switching.then(|| hyper::upgrade::on(&mut resp));
                let (mut rparts, rbody) = resp.into_parts();
                if switching {
                    // Keep the backend's Upgrade/Connection answer for the client.
                    let keep_conn = rparts.headers.remove(header::CONNECTION);
                    let keep_up = rparts.headers.remove(header::UPGRADE);
                    headers::strip_hop_by_hop(&mut rparts.headers);
                    if let (Some(c), Some(u)) = (keep_conn, keep_up) {
                        rparts.headers.insert(header::CONNECTION, c);
                        rparts.headers.insert(header::UPGRADE, u);
                    }
                } else {
                    headers::strip_hop_by_hop(&mut rparts.headers);
                }
                if let (true, Some(st)) = (set_cookie, &pool.config.sticky) {
                    if let fulcrum_config::StickyBy::Cookie(name) = &st.by {
                        if let Some(v) = sticky::set_cookie(name, backend.id, st) {
                            rparts.headers.append(header::SET_COOKIE, v);
                        }
                    }
                }
                if let (Some(client_up), Some(backend_up)) =
                    (client_upgrade.take(), backend_upgrade)
                {
                    tokio::spawn(websocket::tunnel(
                        client_up,
                        backend_up,
                        guard,
                        idle_timeout,
                        backend.state.close_sessions.subscribe(),
                        shared.close_sessions.subscribe(),
                        shared.sessions.clone(),
                    ));
                    return Ok(Box::new(Response::from_parts(rparts, Body::empty())));
                }
                let resp = Box::new(Response::from_parts(rparts, Body::with_guard(rbody, guard)));
                if !retry {
                    // The request's head has gone out: its map is kept for the next head
                    // this thread parses.
                    headers::recycle(std::mem::take(&mut parts.headers));
                    if let Some((method, accept)) = &compression {
                        if let Some(enc) = crate::compress::choose(method, accept, &resp) {
                            return Ok(Box::new(crate::compress::compress(*resp, enc)));
                        }
                    }
                    return Ok(resp);
                }
                tracing::debug!(pool = %pool.name, backend = %backend.addr, attempt, "retrying after a 502/503");
                last = Some(Ok(resp));
            }
            Err(e) => {
                guard.record_at(elapsed, false, now);
                if let Some(m) = &backend.state.metrics {
                    m.observe(e.status().as_u16(), elapsed);
                }
                pool.observe_at(backend, false, now);
                // Every request that gets here twice is idempotent and replayable, so a
                // connection lost before the answer may be retried too; a timeout is not
                // (the backend may still be working on it).
                let retry = e.retryable() || matches!(e, ProxyError::Upstream { .. });
                tracing::debug!(pool = %pool.name, error = %e, attempt, retry, "attempt failed");
                last = Some(Err(e));
                if !retry {
                    break;
                }
            }
        }
    }
    match last {
        Some(result) => result,
        None => Err(ProxyError::NoBackend {
            pool: pool.name.clone(),
        }),
    }
}

/// A slot on a capped backend, queueing (HAProxy's `maxconn` + `queue`) when all are taken:
/// at most `max_pending` wait, each at most `queue_timeout`; the rest get 503 at once.
async fn acquire_slot(
    pool: &Pool,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Result<tokio::sync::OwnedSemaphorePermit, ProxyError> {
    use std::sync::atomic::Ordering;
    if let Ok(p) = slots.clone().try_acquire_owned() {
        return Ok(p);
    }
    let max = pool.config.max_pending.unwrap_or(u32::MAX);
    let queued = pool.pending.fetch_add(1, Ordering::AcqRel);
    if queued >= max {
        pool.pending.fetch_sub(1, Ordering::AcqRel);
        return Err(ProxyError::QueueFull {
            pool: pool.name.clone(),
        });
    }
    let got = tokio::time::timeout(pool.config.queue_timeout, slots.clone().acquire_owned()).await;
    pool.pending.fetch_sub(1, Ordering::AcqRel);
    match got {
        Ok(Ok(p)) => Ok(p),
        _ => Err(ProxyError::QueueTimeout {
            pool: pool.name.clone(),
        }),
    }
}

/// Exponential backoff with "equal jitter": half the step fixed, half random.
fn backoff(pool: &Pool, attempt: usize) -> Duration {
    let step = pool
        .config
        .retry
        .backoff
        .saturating_mul(1 << (attempt - 1).min(16))
        .min(MAX_BACKOFF);
    let half = step / 2;
    let jitter = pool.rng.next() % (half.as_micros() as u64 + 1);
    half + Duration::from_micros(jitter)
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
    if let ProxyError::RateLimited(d) = e {
        h.insert(header::RETRY_AFTER, HeaderValue::from(d.retry_after));
        h.insert("ratelimit-limit", HeaderValue::from(d.limit));
        h.insert("ratelimit-remaining", HeaderValue::from(d.remaining));
        h.insert("ratelimit-reset", HeaderValue::from(d.reset));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_request_ids_are_32_hex_digits_and_distinct() {
        let ids: Vec<HeaderValue> = (0..1000).map(|_| new_request_id()).collect();
        for id in &ids {
            let text = id.to_str().unwrap();
            assert_eq!(text.len(), 32, "{text}");
            assert!(text
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
        let distinct: std::collections::HashSet<&HeaderValue> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
    }
}
