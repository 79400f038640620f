//! fulcrum's own HTTP/1.1 client for plain-http keep-alive backends, the hot path of a
//! proxy: HAProxy, nginx and Pingora all speak HTTP/1 to backends with their own code too.
//!
//! hyper-util's pooled client costs, per request, a pool lock keyed by host, a channel hop
//! to a connection task, a oneshot back, and the wake-ups between those tasks. Here a request
//! takes an idle connection off the backend's LIFO stack (the warmest socket), writes its head
//! and small body in one `write`, reads the answer with `httparse` on the request's own task,
//! and hands the connection back the moment the body has been read — for the small answers
//! that dominate, before the response even leaves `send`. Idle connections expire after the
//! pool's idle timeout: the top when a request finds it expired, the bottom (the oldest) when
//! a connection is handed back, so a burst's extra connections do not outlive it under load.
//!
//! Only requests whose body is already in memory (or absent) and that ask for no upgrade come
//! here; streamed uploads, WebSocket, HTTP/2 and TLS backends stay on hyper-util.

use crate::padded::PerWorker;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::rawfields::{self, Kind, RawFields};

/// A response head larger than this is refused (nginx's `proxy_buffer_size` is 4-8 KiB).
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;
/// Read size: one loopback segment burst; bodies stream in pieces of at most this.
const READ_CHUNK: usize = 16 * 1024;
/// Request bodies up to this size travel in the same `write` as the head.
const COALESCE: usize = 16 * 1024;
/// A chunk-size line longer than this is not HTTP.
const MAX_CHUNK_LINE: usize = 4096;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One keep-alive connection to a backend, with its buffers and its response-head timer
/// (kept across requests).
pub struct Conn {
    stream: TcpStream,
    rbuf: BytesMut,
    wbuf: Vec<u8>,
    /// Armed for each exchange's deadline with [`crate::clock::arm`]: a later deadline than
    /// the last one's (the usual case) leaves it where it stands, to be moved on if it ever
    /// comes due first; a new timer per request took the timer wheel's lock to insert it and
    /// again to remove it.
    timer: Pin<Box<tokio::time::Sleep>>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A backend's idle connections, most recently used on top; one stack per worker thread
/// (`workers::slot`), so a connection is only ever used by the event loop it belongs to.
pub struct H1Pool {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    /// One slot per worker, each on its own lines: a worker taking its slot's lock never
    /// pulls in the line of the slot beside it.
    idle: PerWorker<Mutex<Vec<Idle>>>,
}

/// How the response body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    Close,
}

/// Why an exchange failed: `Stale` means nothing came back on a reused connection (the
/// backend had closed it while idle), so the request may go again on a fresh one.
enum Failure {
    Stale(io::Error),
    Failed(BoxError),
    /// No response head by the deadline.
    Timeout,
}

impl H1Pool {
    pub fn new(
        addr: SocketAddr,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> H1Pool {
        H1Pool {
            addr,
            connect_timeout,
            idle_timeout,
            max_idle,
            idle: PerWorker::new(|_| Mutex::new(Vec::new())),
        }
    }

    /// Idle connections held now (for tests and status).
    pub fn idle_count(&self) -> usize {
        self.idle
            .iter()
            .map(|s| s.lock().map_or(0, |v| v.len()))
            .sum()
    }

    fn stack(&self) -> &Mutex<Vec<Idle>> {
        self.idle.mine()
    }

    fn checkout(&self) -> Option<Conn> {
        // The attempt's start, a moment ago.
        let now = crate::clock::last().into_std();
        let mut expired = Vec::new();
        let found = {
            let mut idle = self.stack().lock().ok()?;
            match idle.pop() {
                None => None,
                Some(i) if now.saturating_duration_since(i.since) < self.idle_timeout => {
                    Some(i.conn)
                }
                // The top is the newest: anything under an expired one is older still.
                Some(i) => {
                    expired.push(i);
                    expired.append(&mut idle);
                    None
                }
            }
        };
        drop(expired); // closes outside the lock
        found
    }

    /// Lets this worker's idle connections drop their buffers, when the worker goes quiet
    /// after a burst (`crate::park` asks, before the allocator returns freed memory): the
    /// connections a burst opened would otherwise keep 17 KiB each, and pin allocator pages
    /// that the burst's finished requests left all but empty. The next exchange on each takes
    /// fresh buffers. Not done per request: that cost 2 % of the CPU per request.
    pub fn trim(&self) {
        if let Ok(mut idle) = self.stack().lock() {
            for i in idle.iter_mut() {
                // Checked in only with its answer read whole: no unread bytes to lose.
                debug_assert!(i.conn.rbuf.is_empty());
                i.conn.rbuf = BytesMut::new();
                i.conn.wbuf = Vec::new();
                // A fresh timer: the old one holds the waker of the last request's task.
                i.conn.timer = Box::pin(crate::clock::timer());
            }
        }
    }

    fn checkin(&self, conn: Conn) {
        // The attempt's start: early by the exchange's duration at most, which only makes
        // the connection expire that much sooner.
        let now = crate::clock::last().into_std();
        let mut expired = Vec::new();
        {
            let Ok(mut idle) = self.stack().lock() else {
                return;
            };
            // The bottom of the stack is the oldest. Connections a burst opened that steady
            // load never reaches again close at the idle timeout here, instead of lingering
            // until the backend closes them (one comparison when the bottom is fresh).
            let stale = idle
                .iter()
                .take_while(|i| now.saturating_duration_since(i.since) >= self.idle_timeout)
                .count();
            if stale > 0 {
                expired.extend(idle.drain(..stale));
            }
            if idle.len() < self.max_idle {
                idle.push(Idle { conn, since: now });
            }
        }
        drop(expired); // closes outside the lock
    }

    /// A new connection, within the connect timeout and the exchange's `deadline`.
    async fn connect(&self, deadline: Deadline) -> Result<Conn, ProxyError> {
        let connect = |source: BoxError| ProxyError::Connect {
            backend: self.addr,
            source,
        };
        let limit = tokio::time::Instant::now() + self.connect_timeout;
        let stream =
            match tokio::time::timeout_at(limit.min(deadline.at), TcpStream::connect(self.addr))
                .await
            {
                Err(_) if deadline.at < limit => return Err(self.timeout(deadline)),
                Err(_) => return Err(connect("connect timed out".into())),
                Ok(Err(e)) => return Err(connect(Box::new(e))),
                Ok(Ok(s)) => s,
            };
        stream.set_nodelay(true).map_err(|e| connect(Box::new(e)))?;
        Ok(Conn {
            stream,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            wbuf: Vec::new(),
            timer: Box::pin(tokio::time::sleep_until(deadline.at)),
        })
    }

    fn timeout(&self, deadline: Deadline) -> ProxyError {
        ProxyError::Timeout {
            backend: self.addr,
            timeout: deadline.timeout,
        }
    }

    /// Sends one request (head in `parts`, whole body in `body`) and reads the response
    /// head, all within `timeout` of the attempt's start; the body follows as the returned
    /// response's body, with no deadline. `authority` is the `Host` sent when the request
    /// has none. A plain head's header lines come as they arrived (`RawFields`, the map
    /// empty); others in the response's map.
    pub async fn send(
        self: &Arc<Self>,
        parts: &Parts,
        lines: Option<&RawFields>,
        authority: &http::uri::Authority,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<(Response<H1Body>, Option<RawFields>), ProxyError> {
        // From the attempt's start, read a moment ago (`UpstreamClient`).
        let deadline = Deadline {
            at: crate::clock::last() + timeout,
            timeout,
        };
        let head_request = parts.method == Method::HEAD;
        let body_len = body.as_ref().map_or(0, |b| b.len());
        // A reused connection the backend closed while idle: once more on a fresh one (the
        // backend never saw the request). A fresh connection's failure is the answer.
        for reuse in [true, false] {
            let (mut conn, reused) = match reuse.then(|| self.checkout()).flatten() {
                Some(c) if !crate::service::idempotent(&parts.method) && !still_open(&c) => {
                    continue
                }
                Some(c) => (c, true),
                None => (self.connect(deadline).await?, false),
            };
            encode_head(&mut conn.wbuf, parts, lines, authority, body_len);
            match exchange(&mut conn, body.as_ref(), head_request, deadline.at).await {
                Ok((resp, framing, keep_alive, raw)) => {
                    return Ok((self.finish(conn, resp, framing, keep_alive), raw));
                }
                Err(Failure::Stale(e)) if reused => {
                    tracing::debug!(backend = %self.addr, error = %e, "idle connection was closed by the backend; reconnecting");
                }
                Err(Failure::Stale(e)) => return Err(self.upstream(Box::new(e))),
                Err(Failure::Failed(e)) => return Err(self.upstream(e)),
                Err(Failure::Timeout) => return Err(self.timeout(deadline)),
            }
        }
        Err(self.upstream("no connection".into()))
    }

    fn upstream(&self, source: BoxError) -> ProxyError {
        ProxyError::Upstream {
            backend: self.addr,
            source,
        }
    }

    /// The response with its body: read whole already (the connection goes back at once),
    /// or streamed from the connection, which goes back when the body ends.
    fn finish(
        self: &Arc<Self>,
        mut conn: Conn,
        resp: Response<()>,
        framing: Framing,
        keep_alive: bool,
    ) -> Response<H1Body> {
        let body = match framing {
            Framing::Empty => {
                if keep_alive && conn.rbuf.is_empty() {
                    self.checkin(conn);
                }
                H1Body::Full(None)
            }
            Framing::Length(n) if conn.rbuf.len() as u64 >= n => {
                let bytes = conn.rbuf.split_to(n as usize).freeze();
                if keep_alive && conn.rbuf.is_empty() {
                    self.checkin(conn);
                }
                H1Body::Full((!bytes.is_empty()).then_some(bytes))
            }
            _ => H1Body::Stream(Box::new(Streaming {
                conn: Some(conn),
                pool: self.clone(),
                state: match framing {
                    Framing::Length(n) => State::Length(n),
                    Framing::Chunked => State::ChunkSize,
                    _ => State::UntilClose,
                },
                keep_alive: keep_alive && framing != Framing::Close,
            })),
        };
        resp.map(|()| body)
    }
}

/// For requests that must not go twice: is the idle connection still open (no FIN, no
/// stray bytes)? One non-blocking read.
fn still_open(conn: &Conn) -> bool {
    let mut b = [0u8; 1];
    matches!(conn.stream.try_read(&mut b), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Writes the request head: request line, the client's kept lines as they came, the map's
/// headers as they are (hop-by-hop ones were removed by the caller), `Host` if missing, and
/// the body's length.
fn encode_head(
    buf: &mut Vec<u8>,
    parts: &Parts,
    lines: Option<&RawFields>,
    authority: &http::uri::Authority,
    body_len: usize,
) {
    use std::io::Write;
    buf.clear();
    buf.reserve(1024); // a trimmed idle connection holds none (`H1Pool::trim`)
    buf.extend_from_slice(parts.method.as_str().as_bytes());
    buf.push(b' ');
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    buf.extend_from_slice(target.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(lines) = lines {
        lines.write_to(buf);
    }
    let mut has_host = false;
    let mut had_length = false;
    for (name, value) in &parts.headers {
        if name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        has_host |= name == header::HOST;
        crate::headers::write_field(buf, name, value);
    }
    if !has_host {
        buf.extend_from_slice(b"host: ");
        buf.extend_from_slice(authority.as_str().as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    let body_method = matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
    if body_len > 0 || had_length || body_method {
        let _ = write!(buf, "content-length: {body_len}\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

/// The response head's deadline, and the timeout it came from (for the error).
#[derive(Clone, Copy)]
struct Deadline {
    at: tokio::time::Instant,
    timeout: Duration,
}

/// [`talk`] on `conn`, bounded by `deadline` through the connection's own timer.
async fn exchange(
    conn: &mut Conn,
    body: Option<&Bytes>,
    head_request: bool,
    deadline: tokio::time::Instant,
) -> Result<Head, Failure> {
    let Conn {
        stream,
        rbuf,
        wbuf,
        timer,
    } = conn;
    crate::clock::arm(timer.as_mut(), deadline);
    let mut talk = std::pin::pin!(talk(stream, rbuf, wbuf, body, head_request));
    loop {
        tokio::select! {
            biased;
            r = talk.as_mut() => return r,
            () = timer.as_mut() => {
                if !crate::clock::rearm(timer.as_mut(), deadline) {
                    return Err(Failure::Timeout);
                }
            }
        }
    }
}

/// Writes the request and reads the response head (skipping `1xx` interim answers).
async fn talk(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    wbuf: &mut Vec<u8>,
    body: Option<&Bytes>,
    head_request: bool,
) -> Result<Head, Failure> {
    crate::workers::gather().await;
    // The head (and a small body) goes out with the rest of the turn's sends, and this task
    // does not wait for it: the answer is what it waits for next, and a send that goes out
    // whole does not wake it (`sendbatch::send_quiet`: one wake-up and poll less a request).
    let mut ticket = None;
    let wrote = match body {
        Some(b) if b.len() > COALESCE => match crate::http1::write_now(stream, wbuf).await {
            Ok(()) => stream.write_all(b).await,
            Err(e) => Err(e),
        },
        _ => {
            if let Some(b) = body {
                wbuf.extend_from_slice(b);
            }
            ticket = crate::sendbatch::send_quiet(std::os::fd::AsRawFd::as_raw_fd(&*stream), wbuf);
            match ticket {
                Some(_) => Ok(()),
                None => crate::http1::write_now(stream, wbuf).await,
            }
        }
    };
    wrote.map_err(Failure::Stale)?;
    rbuf.clear();
    let mut received = false;
    loop {
        if !rbuf.is_empty() {
            received = true;
            if let Some(mut parsed) = parse_head(rbuf, head_request)? {
                // Answered before the request went out whole (a backend may answer early):
                // the connection is not used again.
                if ticket.take().is_some_and(|t| !t.settle()) {
                    parsed.2 = false;
                }
                return Ok(parsed);
            }
            if rbuf.len() > MAX_HEAD {
                return Err(Failure::Failed("response head too large".into()));
            }
        }
        rbuf.reserve(READ_CHUNK);
        let read = match ticket.as_mut() {
            None => crate::http1::read_drained(stream, rbuf).await,
            Some(t) => {
                let event = {
                    let mut read = std::pin::pin!(crate::http1::read_drained(stream, rbuf));
                    // The answer first: when it wakes the task, the send is not looked
                    // at here (`settle` does, once).
                    std::future::poll_fn(|cx| {
                        if let Poll::Ready(read) = std::future::Future::poll(read.as_mut(), cx) {
                            return Poll::Ready(Ok(read));
                        }
                        t.poll_trouble(cx).map(Err)
                    })
                    .await
                };
                match event {
                    Ok(read) => read,
                    // The send did not go out whole: the rest the ordinary way (a full
                    // socket), or the connection is gone.
                    Err(sent) => {
                        ticket = None;
                        let rest = sent.map_err(Failure::Stale)?;
                        stream.write_all(&rest).await.map_err(Failure::Stale)?;
                        continue;
                    }
                }
            }
        };
        match read {
            Ok(0) if !received => {
                return Err(Failure::Stale(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before the response",
                )))
            }
            Ok(0) => {
                return Err(Failure::Failed(
                    "connection closed in the middle of the response head".into(),
                ))
            }
            Ok(_) => {}
            Err(e) if !received => return Err(Failure::Stale(e)),
            Err(e) => return Err(Failure::Failed(Box::new(e))),
        }
    }
}

/// A response head: without its body yet, how the body is framed, whether the connection
/// may carry another exchange, and the header lines when they were kept as bytes (the map
/// is empty then).
type Head = (Response<()>, Framing, bool, Option<RawFields>);

/// Parses a complete head off the front of `buf`: `None` if more bytes are needed. Interim
/// `1xx` answers are dropped (the loop reads on).
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, Failure> {
    let mut spans = crate::headers::Spans::new();
    loop {
        // Plain heads (nearly all) by fulcrum's own parser; anything else by `httparse`.
        let (line, n, fast) = match crate::h1parse::response(buf, &mut spans) {
            Some((line, n)) => (line, n, true),
            None => match parse_any(buf, &mut spans)? {
                Some((line, n)) => (line, n, false),
                None => return Ok(None),
            },
        };
        let status = StatusCode::from_u16(line.code)
            .map_err(|_| Failure::Failed("bad response status".into()))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(Failure::Failed(
                    "switched protocols without an upgrade request".into(),
                ));
            }
            buf.advance(n);
            if buf.is_empty() {
                return Ok(None);
            }
            continue;
        }
        let version = if line.version == 0 {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Plain heads keep their header lines as they came (`rawfields`), the framing and
        // connection facts gathered in the same pass; others (and a head that would need
        // too many lines cut) build the map as before. On any failure below the connection
        // is dropped, so the head may leave the buffer first.
        let body_less =
            head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let mut head = buf.split_to(n).freeze();
        if fast {
            match raw_fields(head, &spans, body_less) {
                Ok((facts, raw)) => {
                    let framing = framing(&facts, status, head_request)?;
                    let keep_alive = facts.connection.keep_alive(version);
                    let mut resp = Response::new(());
                    *resp.status_mut() = status;
                    *resp.version_mut() = version;
                    return Ok(Some((resp, framing, keep_alive, Some(raw))));
                }
                Err(back) => head = back,
            }
        }
        let count = spans.len();
        let mut facts = HeadFacts::default();
        for span in spans.as_mut_slice() {
            let &mut (no, nl, vo, vl) = span;
            if facts.add(&head[no..no + nl], &head[vo..vo + vl]) {
                // consumed here (keep-alive); left out of the map (an empty span)
                *span = (0, 0, 0, 0);
            }
        }
        let framing = framing(&facts, status, head_request)?;
        // A body's length that its size hint carries exactly (every `Framing::Length`, and an
        // empty body by `Content-Length: 0`) stays out of the map: fulcrum's server side
        // writes it again from the body, as hyper's does. HEAD, 204 and 304 answers keep it.
        let sized = !body_less && facts.chunked.is_none() && facts.length.is_some();
        if sized {
            for span in spans.as_mut_slice() {
                let &mut (no, nl, _, _) = span;
                if head[no..no + nl].eq_ignore_ascii_case(b"content-length") {
                    *span = (0, 0, 0, 0);
                }
            }
        }
        let mut headers = crate::headers::map_with_capacity(count);
        for span @ &(n_at, n_len, v_at, v_len) in spans.as_slice() {
            if crate::headers::Spans::consumed(span) {
                continue;
            }
            let name = crate::headers::name(&head[n_at..n_at + n_len])
                .map_err(|_| Failure::Failed("bad response header name".into()))?;
            let value = HeaderValue::from_maybe_shared(head.slice(v_at..v_at + v_len))
                .map_err(|_| Failure::Failed("bad response header value".into()))?;
            headers.append(name, value);
        }
        let keep_alive = facts.connection.keep_alive(version);
        let mut resp = Response::new(());
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        return Ok(Some((resp, framing, keep_alive, None)));
    }
}

/// A plain head's lines as the client gets them, with its framing and connection facts, in
/// one pass over its spans: the hop-by-hop lines are cut (`TE: trailers` crosses), and a
/// `Content-Length` wherever the answer has a body (the server side writes its own framing).
/// The head back when the map must decide instead: a `Connection` header that names other
/// headers (they go too, by `strip_hop_by_hop`), or more lines to cut than a head may lose.
fn raw_fields(
    head: Bytes,
    spans: &crate::headers::Spans,
    body_less: bool,
) -> Result<(HeadFacts, RawFields), Bytes> {
    let spans = spans.as_slice();
    let mut raw = RawFields::of_head(head, spans)?;
    let mut facts = HeadFacts::default();
    for (i, &(no, nl, vo, vl)) in spans.iter().enumerate() {
        let left_out = {
            let bytes = raw.head();
            let kind = rawfields::kind(&bytes[no..no + nl]);
            let value = &bytes[vo..vo + vl];
            match kind {
                Kind::Other | Kind::Host | Kind::ContentType | Kind::Expect => false,
                Kind::Date => {
                    raw.set_has_date();
                    false
                }
                Kind::ContentLength => {
                    facts.add_kind(kind, value);
                    !body_less
                }
                Kind::Connection => {
                    if !facts.add_kind(kind, value) {
                        return Err(raw.into_head());
                    }
                    true
                }
                Kind::TransferEncoding => {
                    facts.add_kind(kind, value);
                    true
                }
                Kind::Te => !value.eq_ignore_ascii_case(b"trailers"),
                Kind::HopByHop | Kind::Upgrade => true,
            }
        };
        if left_out && !raw.cut_line(spans, i) {
            return Err(raw.into_head());
        }
    }
    Ok((facts, raw))
}

/// A head [`crate::h1parse`] left alone, by `httparse`: every form the RFCs allow; `None`
/// if it is not complete yet.
fn parse_any(
    buf: &[u8],
    spans: &mut crate::headers::Spans,
) -> Result<Option<(crate::h1parse::StatusLine, usize)>, Failure> {
    // Left uninitialised: no 4 KiB memset per response.
    let mut slots = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let parser = httparse::ParserConfig::default();
    let n = match parser.parse_response_with_uninit_headers(&mut parsed, buf, &mut slots) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Failure::Failed(format!("bad response head: {e}").into())),
    };
    // Where each header sits in the head, so the values can share its bytes.
    crate::h1parse::spans_of(buf, parsed.headers, spans);
    let line = crate::h1parse::StatusLine {
        code: parsed.code.unwrap_or(0),
        version: parsed.version.unwrap_or(1),
    };
    Ok(Some((line, n)))
}

/// What a response head's framing and connection headers say, gathered in the one pass
/// over its headers that notes their spans (no map lookups afterwards).
#[derive(Default)]
struct HeadFacts {
    /// Whether the last coding of the last `Transfer-Encoding` is `chunked`.
    chunked: Option<bool>,
    length: Option<u64>,
    bad_length: Option<&'static str>,
    connection: crate::headers::ConnectionTokens,
}

impl HeadFacts {
    /// Notes one header; true if it is a `Connection` header with nothing left to say (see
    /// [`crate::headers::ConnectionTokens::add`]).
    fn add(&mut self, name: &[u8], value: &[u8]) -> bool {
        self.add_kind(rawfields::kind(name), value)
    }

    /// [`HeadFacts::add`] for a name already classified.
    fn add_kind(&mut self, kind: Kind, value: &[u8]) -> bool {
        if kind == Kind::ContentLength {
            match crate::headers::content_length(value) {
                None => self.bad_length = Some("bad content-length"),
                Some(n) if self.length.is_some_and(|l| l != n) => {
                    self.bad_length = Some("conflicting content-length values")
                }
                Some(n) => self.length = Some(n),
            }
        } else if kind == Kind::TransferEncoding {
            let last = value.rsplit(|&b| b == b',').next().unwrap_or(b"");
            self.chunked = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if kind == Kind::Connection {
            return self.connection.add(value);
        }
        false
    }
}

/// RFC 9112 §6.3: no body for HEAD, 204 and 304; chunked when it is the last coding; else the
/// length; else until the connection closes.
fn framing(facts: &HeadFacts, status: StatusCode, head_request: bool) -> Result<Framing, Failure> {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        return Ok(Framing::Empty);
    }
    if let Some(chunked) = facts.chunked {
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    if let Some(why) = facts.bad_length {
        return Err(Failure::Failed(why.into()));
    }
    Ok(match facts.length {
        Some(0) => Framing::Empty,
        Some(n) => Framing::Length(n),
        None => Framing::Close,
    })
}

/// A response body from this client.
pub enum H1Body {
    /// Read whole with the head; the connection is back in the pool already.
    Full(Option<Bytes>),
    /// Still on the wire.
    Stream(Box<Streaming>),
}

pub struct Streaming {
    /// `None` once the body ended (and the connection went back, or was closed).
    conn: Option<Conn>,
    pool: Arc<H1Pool>,
    state: State,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    UntilClose,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers,
    Done,
}

impl Streaming {
    /// The body ended cleanly: the connection is reusable if the backend said so and sent
    /// nothing beyond the body.
    fn end(&mut self) {
        self.state = State::Done;
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && conn.rbuf.is_empty() {
                self.pool.checkin(conn);
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let buf = &mut conn.rbuf;
            match self.state {
                State::Done => return Poll::Ready(None),
                State::Length(0) => {
                    self.end();
                    return Poll::Ready(None);
                }
                State::Length(rem) | State::ChunkData(rem) if !buf.is_empty() => {
                    let n = rem.min(buf.len() as u64);
                    let data = buf.split_to(n as usize).freeze();
                    self.state = match self.state {
                        State::Length(_) => State::Length(rem - n),
                        _ if rem == n => State::ChunkEnd,
                        _ => State::ChunkData(rem - n),
                    };
                    return Poll::Ready(Some(Ok(data)));
                }
                State::UntilClose if !buf.is_empty() => {
                    return Poll::Ready(Some(Ok(buf.split().freeze())));
                }
                State::ChunkSize => {
                    if let Some(line) = take_line(buf)? {
                        let digits = line[..]
                            .split(|&b| b == b';')
                            .next()
                            .unwrap_or(b"")
                            .trim_ascii();
                        let size = std::str::from_utf8(digits)
                            .ok()
                            .and_then(|s| u64::from_str_radix(s, 16).ok())
                            .ok_or("bad chunk size")?;
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                        continue;
                    }
                }
                State::ChunkEnd if buf.len() >= 2 => {
                    if &buf[..2] != b"\r\n" {
                        return Poll::Ready(Some(Err("bad chunk ending".into())));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                    continue;
                }
                State::Trailers => {
                    // Trailers are dropped (HTTP/1 trailers are rare; gRPC goes over h2).
                    if let Some(line) = take_line(buf)? {
                        if line.is_empty() {
                            self.end();
                            return Poll::Ready(None);
                        }
                        continue;
                    }
                }
                _ => {}
            }
            // More bytes needed.
            buf.reserve(READ_CHUNK);
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                buf
            ))?;
            if n == 0 {
                if self.state == State::UntilClose {
                    self.state = State::Done;
                    self.conn = None;
                    return Poll::Ready(None);
                }
                self.conn = None;
                return Poll::Ready(Some(Err(
                    "the backend closed the connection in the middle of the body".into(),
                )));
            }
        }
    }
}

/// One CRLF-terminated line off the front of `buf` (without the CRLF), or `None` if it is
/// not all there yet.
fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, BoxError> {
    match memchr::memchr(b'\n', buf) {
        Some(i) => {
            let mut line = buf.split_to(i + 1);
            line.truncate(i);
            if line.last() == Some(&b'\r') {
                line.truncate(i - 1);
            }
            Ok(Some(line))
        }
        None if buf.len() > MAX_CHUNK_LINE => Err("chunk line too long".into()),
        None => Ok(None),
    }
}

impl http_body::Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            H1Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            H1Body::Stream(s) => s.poll_next(cx).map(|o| o.map(|r| r.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            H1Body::Full(b) => b.is_none(),
            H1Body::Stream(s) => s.state == State::Done,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            H1Body::Full(None) => SizeHint::with_exact(0),
            H1Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            H1Body::Stream(s) => match s.state {
                State::Length(n) => SizeHint::with_exact(n),
                State::Done => SizeHint::with_exact(0),
                _ => SizeHint::default(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A backend that answers each request on a connection with the next canned answer, and
    /// reports every request head it read.
    async fn canned(
        answers: Vec<&'static [u8]>,
    ) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            for a in answers {
                loop {
                    if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        tx.send(String::from_utf8(head).unwrap()).unwrap();
                        break;
                    }
                    let mut chunk = [0u8; 4096];
                    let n = s.read(&mut chunk).await.unwrap();
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                s.write_all(a).await.unwrap();
            }
            // Keep the connection open until the peer closes it.
            let mut rest = [0u8; 64];
            let _ = s.read(&mut rest).await;
        });
        (addr, rx)
    }

    fn get(path: &str) -> Parts {
        let (mut p, ()) = http::Request::get(path)
            .header("host", "example")
            .body(())
            .unwrap()
            .into_parts();
        p.uri = format!("http://backend{path}").parse().unwrap();
        p
    }

    fn pool(addr: SocketAddr) -> Arc<H1Pool> {
        Arc::new(H1Pool::new(
            addr,
            Duration::from_secs(1),
            Duration::from_secs(60),
            8,
        ))
    }

    impl H1Pool {
        async fn send_to(
            self: &Arc<Self>,
            parts: &Parts,
            body: Option<Bytes>,
        ) -> Result<Response<H1Body>, ProxyError> {
            let timeout = Duration::from_secs(30);
            let (mut resp, raw) = self
                .send(parts, None, &"backend".parse().unwrap(), body, timeout)
                .await?;
            if let Some(raw) = raw {
                raw.into_map(resp.headers_mut());
            }
            Ok(resp)
        }
    }

    /// [`parse_head`], the kept lines (if any) put into the map; and whether they were kept.
    fn head_of(buf: &mut BytesMut, head_request: bool) -> Option<(Response<()>, Framing, bool)> {
        let Ok(Some((mut resp, framing, _, raw))) = parse_head(buf, head_request) else {
            return None;
        };
        let kept = raw.is_some();
        if let Some(raw) = raw {
            raw.into_map(resp.headers_mut());
        }
        Some((resp, framing, kept))
    }

    /// The response-head deadline rides on the connection's one timer: a timer that came due
    /// while its connection sat idle is moved on by the next exchange, which succeeds on the
    /// same connection; an answer that does not come in time is a timeout.
    #[tokio::test]
    async fn the_connection_timer_bounds_each_exchange_and_survives_idle_firing() {
        // One connection; two requests answered, the third read and left unanswered.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let (mut buf, mut seen) = (Vec::new(), 0);
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut chunk).await {
                buf.extend_from_slice(&chunk[..n]);
                while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    buf.drain(..end + 4);
                    seen += 1;
                    if seen <= 2 {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        s.write_all(ok).await.unwrap();
                    }
                }
            }
        });
        let p = pool(addr);
        let (req, authority) = (get("/"), "b".parse().unwrap());
        let send = |t: u64| {
            crate::clock::now(); // the attempt's start
            p.send(&req, None, &authority, None, Duration::from_millis(t))
        };
        assert_eq!(text(send(300).await.unwrap().0).await, "ok");
        // The first deadline passes while the connection is idle in the pool.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(p.idle_count(), 1);
        // The backend takes one connection only: this answer proves it was reused.
        assert_eq!(text(send(300).await.unwrap().0).await, "ok");
        // No third answer: a timeout, after the deadline and not long after it.
        let started = std::time::Instant::now();
        let err = send(200).await.err();
        let waited = started.elapsed();
        assert!(matches!(err, Some(ProxyError::Timeout { .. })), "{err:?}");
        assert!(waited >= Duration::from_millis(190), "{waited:?}");
        assert!(waited < Duration::from_secs(2), "{waited:?}");
        assert_eq!(p.idle_count(), 0, "a timed-out connection is not reused");
    }

    async fn text(r: Response<H1Body>) -> String {
        let b = r.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(b.to_vec()).unwrap()
    }

    /// Sets the test's thread up to batch its sends as a worker does (requests then go out
    /// through `sendbatch::send_quiet`); false where io_uring is not allowed.
    fn batched() -> bool {
        crate::sendbatch::init() && {
            tokio::spawn(crate::sendbatch::flusher());
            true
        }
    }

    #[tokio::test]
    async fn keep_alive_lengths_chunks_and_interim_answers_on_one_connection() {
        keep_alive_lengths_chunks_and_interim_answers().await;
    }

    #[tokio::test]
    async fn keep_alive_lengths_chunks_and_interim_answers_on_one_connection_batched() {
        if batched() {
            keep_alive_lengths_chunks_and_interim_answers().await;
        }
    }

    async fn keep_alive_lengths_chunks_and_interim_answers() {
        let (addr, mut heads) = canned(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx-a: 1\r\n\r\nok\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n",
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nlast!",
        ])
        .await;
        let p = pool(addr);
        let r = p.send_to(&get("/a?x=1"), None).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-a"], "1");
        assert_eq!(text(r).await, "ok\n");
        let head = heads.recv().await.unwrap();
        assert!(head.starts_with("GET /a?x=1 HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("host: example\r\n"), "{head}");
        assert!(!head.contains("content-length"), "{head}");
        assert_eq!(
            p.idle_count(),
            1,
            "a whole small body gives the connection back at once"
        );

        let mut post = get("/b");
        post.method = Method::PUT;
        let r = p
            .send_to(&post, Some(Bytes::from_static(b"abc")))
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(p.idle_count(), 0, "lent out while the chunked body streams");
        assert_eq!(text(r).await, "hello world");
        assert_eq!(p.idle_count(), 1, "back after the last chunk");
        let head = heads.recv().await.unwrap();
        assert!(head.starts_with("PUT /b HTTP/1.1\r\n") && head.contains("content-length: 3\r\n"));

        let r = p.send_to(&get("/c"), None).await.unwrap();
        assert_eq!(r.status(), 204);
        assert_eq!(text(r).await, "");
        let r = p.send_to(&get("/d"), None).await.unwrap();
        assert_eq!(text(r).await, "last!");
        for _ in 0..2 {
            heads.recv().await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_transparently() {
        a_connection_closed_while_idle_is_replaced().await;
    }

    #[tokio::test]
    async fn a_connection_closed_while_idle_is_replaced_transparently_batched() {
        if batched() {
            a_connection_closed_while_idle_is_replaced().await;
        }
    }

    async fn a_connection_closed_while_idle_is_replaced() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            // First connection: one answer, then the backend closes it (idle timeout).
            for close_after in [true, false] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await.unwrap();
                s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
                    .await
                    .unwrap();
                if close_after {
                    drop(s);
                } else {
                    let _ = s.read(&mut b).await;
                }
            }
        });
        let p = pool(addr);
        assert_eq!(text(p.send_to(&get("/"), None).await.unwrap()).await, "hi");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(text(p.send_to(&get("/"), None).await.unwrap()).await, "hi");
    }

    #[tokio::test]
    async fn connections_a_burst_left_at_the_bottom_close_at_the_idle_timeout() {
        // A backend answering every request on every connection, and saying when one closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (closed_tx, mut closed) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let closed_tx = closed_tx.clone();
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while matches!(s.read(&mut b).await, Ok(n) if n > 0) {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi";
                        if s.write_all(ok).await.is_err() {
                            break;
                        }
                    }
                    let _ = closed_tx.send(());
                });
            }
        });
        let p = pool(addr);
        // Two at once: two connections, both back in the stack.
        crate::clock::now();
        let (ga, gb) = (get("/"), get("/"));
        let (a, b) = tokio::join!(p.send_to(&ga, None), p.send_to(&gb, None));
        assert_eq!(text(a.unwrap()).await, "hi");
        assert_eq!(text(b.unwrap()).await, "hi");
        assert_eq!(p.idle_count(), 2);

        tokio::time::pause();
        // Steady load on the top connection only: the bottom one ages.
        for _ in 0..2 {
            tokio::time::advance(Duration::from_secs(31)).await;
            crate::clock::now();
            assert_eq!(text(p.send_to(&get("/"), None).await.unwrap()).await, "hi");
        }
        // 62 s after the burst: the bottom one (idle timeout 60 s) was closed at the last
        // check-in; the top one (used 0 s ago) stays.
        assert_eq!(p.idle_count(), 1);
        tokio::time::resume();
        tokio::time::timeout(Duration::from_secs(5), closed.recv())
            .await
            .expect("the backend sees the stale connection close");
    }

    #[tokio::test]
    async fn trimmed_idle_connections_hold_no_buffers_and_still_serve() {
        let (addr, _heads) = canned(vec![
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none",
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\ntwo",
        ])
        .await;
        let p = pool(addr);
        let held = |p: &H1Pool| {
            let idle = p.stack().lock().unwrap();
            idle.iter()
                .map(|i| i.conn.rbuf.capacity() + i.conn.wbuf.capacity())
                .sum::<usize>()
        };
        assert_eq!(text(p.send_to(&get("/"), None).await.unwrap()).await, "one");
        assert_eq!(p.idle_count(), 1);
        assert!(held(&p) >= 1024, "buffers kept between requests under load");
        p.trim();
        assert_eq!((p.idle_count(), held(&p)), (1, 0));
        // The same connection (the canned backend accepts only one) takes fresh buffers.
        assert_eq!(text(p.send_to(&get("/"), None).await.unwrap()).await, "two");
    }

    #[tokio::test]
    async fn bodies_until_close_and_cut_bodies() {
        // Each connection answers once and closes.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for answer in [
                &b"HTTP/1.0 200 OK\r\n\r\nuntil close"[..],
                &b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this"[..],
            ] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut b = [0u8; 1024];
                let _ = s.read(&mut b).await.unwrap();
                s.write_all(answer).await.unwrap();
            }
        });
        let p = pool(addr);
        let r = p.send_to(&get("/"), None).await.unwrap();
        assert_eq!(r.version(), Version::HTTP_10);
        assert_eq!(text(r).await, "until close");
        assert_eq!(
            p.idle_count(),
            0,
            "a close-delimited connection is never reused"
        );
        let r = p.send_to(&get("/"), None).await.unwrap();
        let err = r
            .into_body()
            .collect()
            .await
            .expect_err("cut body is an error");
        assert!(err.to_string().contains("middle of the body"), "{err}");
    }

    #[tokio::test]
    async fn garbage_and_refused_connections_are_errors() {
        let (addr, _h) = canned(vec![b"SMTP ready\r\n\r\n"]).await;
        let e = pool(addr).send_to(&get("/"), None).await.err().unwrap();
        assert!(matches!(e, ProxyError::Upstream { .. }), "{e}");
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let e = pool(addr).send_to(&get("/"), None).await.err().unwrap();
        assert!(matches!(e, ProxyError::Connect { .. }), "{e}");
    }

    #[test]
    fn response_heads_with_few_and_with_the_most_headers_keep_every_one() {
        // Up to 16 spans sit on the stack, more spill to the heap: both sides of that line.
        for n in [0, 16, 17, MAX_HEADERS - 1] {
            let mut text = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n".to_vec();
            for i in 0..n {
                text.extend_from_slice(format!("x-{i}: value-{i}\r\n").as_bytes());
            }
            text.extend_from_slice(b"\r\n");
            let mut buf = BytesMut::from(&text[..]);
            let Some((resp, _, _)) = head_of(&mut buf, false) else {
                panic!("{n} headers: not parsed")
            };
            // Every header but the length, which the body's size hint carries.
            assert_eq!(resp.headers().len(), n);
            assert!(!resp.headers().contains_key("content-length"));
            for i in 0..n {
                assert_eq!(
                    resp.headers()[format!("x-{i}").as_str()],
                    format!("value-{i}")
                );
            }
            assert!(buf.is_empty());
        }
    }

    /// A length stays only where no body carries it: answers to HEAD, 204 and 304. A
    /// chunked answer's goes too when its lines are kept (the server side frames it
    /// itself); the map kept it (and the server side skipped it).
    #[test]
    fn the_length_leaves_the_head_only_when_the_body_carries_it() {
        let kept = |text: &[u8], head_request: bool| {
            let mut buf = BytesMut::from(text);
            let Some((resp, framing, _)) = head_of(&mut buf, head_request) else {
                panic!("not parsed: {}", String::from_utf8_lossy(text))
            };
            (resp.headers().get("content-length").cloned(), framing)
        };
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
        assert_eq!(kept(ok, false), (None, Framing::Length(5)));
        assert_eq!(
            kept(ok, true),
            (Some(HeaderValue::from_static("5")), Framing::Empty)
        );
        let empty = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(kept(empty, false), (None, Framing::Empty));
        let not_modified = b"HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n";
        assert_eq!(
            kept(not_modified, false),
            (Some(HeaderValue::from_static("9")), Framing::Empty)
        );
        let chunked = b"HTTP/1.1 200 OK\r\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(kept(chunked, false), (None, Framing::Chunked));
        // A head only httparse takes (a bare LF) builds the map, which keeps it.
        let chunked_lf =
            b"HTTP/1.1 200 OK\ncontent-length: 9\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(
            kept(chunked_lf, false),
            (Some(HeaderValue::from_static("9")), Framing::Chunked)
        );
    }

    /// A plain head's lines are kept as they came, less the hop-by-hop ones; the framing and
    /// connection facts come from the same pass. Heads that need the map still get it.
    #[test]
    fn plain_heads_keep_their_lines_less_the_hop_by_hop_ones() {
        let text = b"HTTP/1.1 200 OK\r\nServer: origin\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\nTE: trailers\r\nProxy-Connection: x\r\nUpgrade: h2c\r\nTrailer: x-sum\r\nTransfer-Encoding: chunked\r\nX-Case:  Kept As Is \r\n\r\n";
        let mut buf = BytesMut::from(&text[..]);
        let Ok(Some((resp, framing, keep_alive, Some(raw)))) = parse_head(&mut buf, false) else {
            panic!("not kept as lines")
        };
        assert!(resp.headers().is_empty());
        assert_eq!(framing, Framing::Chunked);
        assert!(!keep_alive, "Connection: close was seen");
        assert!(raw.has_date());
        let mut out = Vec::new();
        raw.write_to(&mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Server: origin\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\nTE: trailers\r\nX-Case:  Kept As Is \r\n"
        );
        assert!(buf.is_empty());

        // A Connection header naming another header: the map (and `strip_hop_by_hop`).
        let named =
            b"HTTP/1.1 200 OK\r\nConnection: x-hop\r\nX-Hop: 1\r\ncontent-length: 0\r\n\r\n";
        let Some((resp, _, kept)) = head_of(&mut BytesMut::from(&named[..]), false) else {
            panic!("not parsed")
        };
        assert!(!kept);
        assert!(resp.headers().contains_key("x-hop"));
        assert!(resp.headers().contains_key("connection"));

        // More lines to leave out than a kept head may: the map.
        let mut many = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n".to_vec();
        for i in 0..rawfields::MAX_CUTS + 1 {
            many.extend_from_slice(format!("x-{i}: v\r\nkeep-alive: {i}\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        let Some((resp, _, kept)) = head_of(&mut BytesMut::from(&many[..]), false) else {
            panic!("not parsed")
        };
        assert!(!kept);
        assert_eq!(
            resp.headers().get_all("keep-alive").iter().count(),
            rawfields::MAX_CUTS + 1
        );
        assert_eq!(resp.headers().len(), 2 * (rawfields::MAX_CUTS + 1));

        // Folded lines (obs-fold) are httparse's: the map.
        let folded = b"HTTP/1.1 200 OK\r\nX-A: one\r\n two\r\ncontent-length: 0\r\n\r\n";
        let mut buf = BytesMut::from(&folded[..]);
        if let Ok(Some((_, _, _, raw))) = parse_head(&mut buf, false) {
            assert!(raw.is_none());
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let h = |pairs: &[(&str, &str)]| {
            let mut facts = HeadFacts::default();
            for (k, v) in pairs {
                let consumed = facts.add(k.as_bytes(), v.as_bytes());
                assert_eq!(consumed, k.eq_ignore_ascii_case("connection"));
            }
            facts
        };
        let ok = StatusCode::OK;
        let f = |m: &HeadFacts, s, head| framing(m, s, head).ok();
        assert_eq!(
            f(&h(&[("content-length", "5")]), ok, true),
            Some(Framing::Empty)
        );
        assert_eq!(
            f(&h(&[("content-length", "5")]), ok, false),
            Some(Framing::Length(5))
        );
        assert_eq!(
            f(
                &h(&[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "5")
                ]),
                ok,
                false
            ),
            Some(Framing::Chunked)
        );
        assert_eq!(
            f(&h(&[("transfer-encoding", "gzip")]), ok, false),
            Some(Framing::Close)
        );
        assert_eq!(f(&h(&[]), ok, false), Some(Framing::Close));
        assert_eq!(
            f(&h(&[]), StatusCode::NOT_MODIFIED, false),
            Some(Framing::Empty)
        );
        assert_eq!(
            f(
                &h(&[("content-length", "5"), ("content-length", "6")]),
                ok,
                false
            ),
            None
        );
        let keep_alive = |pairs, v| h(pairs).connection.keep_alive(v);
        assert!(keep_alive(&[], Version::HTTP_11));
        assert!(!keep_alive(&[("connection", "Close")], Version::HTTP_11));
        assert!(!keep_alive(&[], Version::HTTP_10));
        assert!(keep_alive(
            &[("connection", "keep-alive")],
            Version::HTTP_10
        ));
        assert!(!keep_alive(
            &[("connection", "keep-alive, close")],
            Version::HTTP_10
        ));
        assert!(!keep_alive(
            &[("connection", "keep-alive"), ("connection", " close ")],
            Version::HTTP_11
        ));
        // the last Transfer-Encoding decides; a bad length only counts without one
        assert_eq!(
            f(
                &h(&[
                    ("transfer-encoding", "gzip"),
                    ("transfer-encoding", "chunked")
                ]),
                ok,
                false
            ),
            Some(Framing::Chunked)
        );
        assert_eq!(
            f(
                &h(&[("content-length", "x"), ("transfer-encoding", "chunked")]),
                ok,
                false
            ),
            Some(Framing::Chunked)
        );
        assert_eq!(f(&h(&[("content-length", "x")]), ok, false), None);
    }
}
