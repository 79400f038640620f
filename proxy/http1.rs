//! fulcrum's own HTTP/1.1 server side, for plain-TCP client connections.
//!
//! Why not hyper's: hyper keeps an 8 KiB read buffer (and its write buffer and dispatcher
//! state) for the whole life of a connection, so 10,000 idle keep-alive clients cost about
//! 30 KiB each. Here an idle connection holds no buffer at all, as nginx's do: it waits for
//! the socket to become readable, and only then allocates one, parses the head with
//! `httparse` into a `HeaderMap` whose values share that buffer, and frees it once the
//! exchange is over. The head and the first part of the body go out in one write.
//!
//! What this side does not carry (chunked or large uploads, `Expect: 100-continue`,
//! upgrades such as WebSocket, `CONNECT`, and HTTP/2 by prior knowledge) is handed to hyper
//! with the bytes already read put back in front, and hyper serves the connection from that
//! request on. TLS connections are served by hyper throughout.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::{Body as _, Frame};
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::body::{Body, RequestBody};
use crate::listener::Guards;
use crate::rawfields::{Kind, RawFields};
use crate::server::Shared;
use crate::service::{self, ConnInfo};
use crate::spares;

/// Request bodies up to this size (with a `Content-Length`) are read whole before the
/// request goes on, as nginx buffers request bodies; longer ones are streamed by hyper.
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// The most header lines a request may have (hyper's limit too).
const MAX_HEADERS: usize = 100;
/// The first allocation for a request; grown up to `max_request_header_bytes`.
const INITIAL_BUFFER: usize = 4096;
/// Body parts up to this size are copied next to the head (one write); larger ones are
/// written on their own.
const COALESCE: usize = 16 * 1024;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The timeouts and limits a connection applies, from `[server]`.
#[derive(Clone, Copy)]
pub struct Limits {
    /// From the first byte of a request (or the accept, for the first one) to its whole head.
    pub header_timeout: Duration,
    /// How long a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// How long a keep-alive connection waits on its own task before it is parked.
    pub park_after: Duration,
    pub max_head: usize,
}

impl Limits {
    pub fn new(cfg: &fulcrum_config::ServerConfig) -> Limits {
        Limits {
            header_timeout: cfg.request_header_timeout,
            idle_timeout: cfg.idle_timeout,
            park_after: cfg.idle_park_after,
            max_head: cfg.max_request_header_bytes,
        }
    }
}

/// A head parsed, or why not. Not boxed: it lives a moment on the request's own (already
/// boxed) future, and a box would be one more allocation per request.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    /// More bytes are needed.
    Partial,
    Request(Head),
    /// Something this side does not carry: hyper takes the connection over.
    Handover,
    Refuse(&'static [u8]),
}

struct Head {
    /// Boxed, with its body to come: the request then moves down the layers (exchange,
    /// service, proxy) as a pointer, not as 264 bytes copied into each layer's future.
    req: Box<Request<RequestBody>>,
    length: u64,
    keep_alive: bool,
}

const BAD_REQUEST: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 16\r\nconnection: close\r\n\r\n400 bad request\n";
const TOO_LARGE: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 36\r\nconnection: close\r\n\r\n431 request header fields too large\n";
const TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 20\r\nconnection: close\r\n\r\n408 request timeout\n";

/// Serves one plain client connection until it closes, times out, is told to close
/// (shutdown), is parked (idle for `park_after`: `crate::park`, which starts a new task
/// when the next request comes), or is handed to hyper. `fresh`: just accepted (the first
/// request is due within the header timeout; an HTTP/2 preface is looked for).
///
/// Not an `async fn`: those store every argument twice (once as passed, once as moved into
/// the body), and this future is what each idle connection costs.
#[allow(clippy::manual_async_fn)]
pub(crate) fn serve(
    std: std::net::TcpStream,
    info: ConnInfo,
    shared: Arc<Shared>,
    graceful: Watcher,
    guards: Guards,
    fresh: bool,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        // What the connection holds until it ends (its places under the caps, gauges).
        let (mut info, mut graceful, mut guards) = (info, graceful, guards);
        // Registered with the reactor of the runtime (worker) that serves it.
        let mut stream = match TcpStream::from_std(std) {
            Ok(s) => s,
            Err(e) => return tracing::warn!(error = %e, "cannot serve the connection"),
        };
        let mut buf = BytesMut::new();
        // The first request's head is due within the header timeout of the accept.
        let mut first = fresh.then(|| Instant::now() + info.listener.limits.header_timeout);
        let mut parkable = true;
        // One timer for every wait between requests, armed lazily (`clock::arm`: a later
        // deadline leaves it where it stands until it comes due) rather than made anew, where
        // a new timer per request took the wheel's lock twice and, when it was the earliest,
        // woke the worker's event loop through its eventfd.
        let mut timer = std::pin::pin!(crate::clock::timer());
        // The last answer, sent quietly (`exchange`): settled before the connection writes
        // again, closes or changes hands.
        let mut ticket: Option<crate::sendbatch::Ticket> = None;
        loop {
            if buf.is_empty() {
                // Idle: hold no buffer while waiting for the next request (this thread's
                // spares keep it for the next request read, if nothing else still shares it).
                spare_reads::give(std::mem::take(&mut buf));
                let limits = &info.listener.limits;
                let (wait, park) = match first {
                    Some(due) => (due, None),
                    None => {
                        let now = Instant::now();
                        let park = (parkable && limits.park_after < limits.idle_timeout)
                            .then(|| now + limits.park_after);
                        (now + limits.idle_timeout, park)
                    }
                };
                // A wait that ends in parking notices a shutdown then (a closing server parks
                // nothing: the connection comes back and closes); any other wait listens for it.
                // Not listening saves a lock of the worker's `Notify` twice per request.
                let mut closed = std::pin::pin!(park.is_none().then(|| shared.closing.notified()));
                // Registered before the flag is read, so a shutdown in between is not missed.
                if let Some(n) = closed.as_mut().as_pin_mut() {
                    n.enable();
                }
                if shared.closing.is_set() {
                    settle(&mut stream, &mut ticket).await;
                    return;
                }
                let due = park.unwrap_or(wait);
                crate::clock::arm(timer.as_mut(), due);
                let woke = loop {
                    tokio::select! {
                        biased;
                        // Polled in place: no waiter is stored for it (`readable()` would add
                        // 152 bytes to every idle connection).
                        r = std::future::poll_fn(|cx| stream.poll_read_ready(cx)) => {
                            break if r.is_ok() { Woke::Readable } else { Woke::Failed };
                        }
                        _ = timer.as_mut() => {
                            if !crate::clock::rearm(timer.as_mut(), due) {
                                break Woke::Due;
                            }
                        }
                        _ = async {
                            match closed.as_mut().as_pin_mut() {
                                Some(n) => n.await,
                                None => std::future::pending().await,
                            }
                        } => break Woke::Closing,
                        // The last answer did not go out whole (rare: a full socket). Last:
                        // when the next request wakes the task, it is not looked at again
                        // here (`settle` does, once).
                        sent = std::future::poll_fn(|cx| match ticket.as_mut() {
                            Some(t) => t.poll_trouble(cx),
                            None => Poll::Pending,
                        }) => break Woke::Trouble(sent),
                    }
                };
                let woke_due = match woke {
                    Woke::Readable => false,
                    Woke::Trouble(sent) => {
                        ticket = None;
                        match sent {
                            Ok(rest) if stream.write_all(&rest).await.is_ok() => continue,
                            _ => return,
                        }
                    }
                    Woke::Closing => {
                        settle(&mut stream, &mut ticket).await;
                        return;
                    }
                    Woke::Failed => {
                        settle(&mut stream, &mut ticket).await;
                        return;
                    }
                    Woke::Due => {
                        if !settle(&mut stream, &mut ticket).await {
                            return;
                        }
                        true
                    }
                };
                if woke_due {
                    // The idle timeout: closed; the time to park: parked.
                    if park.is_none() {
                        return;
                    }
                    let Ok(std) = stream.into_std() else { return };
                    let conn = crate::park::Parked {
                        stream: std,
                        info,
                        graceful,
                        guards,
                        due: wait,
                    };
                    match shared.parking.park(&shared, conn) {
                        Ok(()) => return,
                        Err(conn) => {
                            // Not parked (closing, or no poll): wait on this task.
                            parkable = false;
                            (info, graceful, guards) = (conn.info, conn.graceful, conn.guards);
                            stream = match TcpStream::from_std(conn.stream) {
                                Ok(s) => s,
                                Err(_) => return,
                            };
                            continue;
                        }
                    }
                }
                buf = spare_reads::take();
                match try_read_drained(&stream, &mut buf) {
                    Ok(n) if n > 0 => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    // The client is done sending (it may close its side right after its
                    // request, in the same turn as its answer was queued) or the socket
                    // failed: the answer still goes out first.
                    _ => {
                        settle(&mut stream, &mut ticket).await;
                        return;
                    }
                }
            }
            // Everything a request needs lives in this boxed future, so that the connection's
            // own task (what an idle connection costs) stays a few hundred bytes.
            // The last answer goes out before anything else does (pipelined requests).
            if ticket.is_some() && !settle(&mut stream, &mut ticket).await {
                return;
            }
            let next = Box::pin(request(
                &mut stream,
                &mut buf,
                &shared,
                &info,
                first,
                &mut ticket,
            ))
            .await;
            match next {
                Next::KeepAlive => first = None,
                Next::Close => return,
                Next::Handover => {
                    let io = Rewind {
                        prefix: buf.freeze(),
                        inner: stream,
                    };
                    return Box::pin(crate::listener::serve_hyper(
                        io,
                        Arc::new(info),
                        shared,
                        graceful,
                    ))
                    .await;
                }
            }
        }
    }
}

/// How a wait between requests ended.
enum Woke {
    Readable,
    /// The last answer, sent quietly, did not go out whole: what is left, or the error.
    Trouble(io::Result<Vec<u8>>),
    /// The server is shutting down.
    Closing,
    /// Its deadline came: the time to park, or the idle timeout.
    Due,
    /// The socket failed.
    Failed,
}

/// What the connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// hyper serves the rest, from the bytes in the buffer on.
    Handover,
}

/// Waits for an answer sent quietly to go out whole (before the connection writes again,
/// closes or changes hands), sending what is left of it; false if the connection failed.
async fn settle(stream: &mut TcpStream, ticket: &mut Option<crate::sendbatch::Ticket>) -> bool {
    let Some(mut t) = ticket.take() else {
        return true;
    };
    finish(stream, &mut t).await.is_ok()
}

/// Waits for a ticket's flush and sends, the ordinary way, whatever of it did not go out.
async fn finish(stream: &mut TcpStream, t: &mut crate::sendbatch::Ticket) -> io::Result<()> {
    let rest = t.done().await?;
    if !rest.is_empty() {
        stream.write_all(&rest).await?;
    }
    Ok(())
}

/// Reads one request's head (and small body) from `buf` and the socket, runs the exchange.
async fn request(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    shared: &Shared,
    info: &ConnInfo,
    first: Option<Instant>,
    ticket: &mut Option<crate::sendbatch::Ticket>,
) -> Next {
    let limits = &info.listener.limits;
    // The head is due within the header timeout of its first byte (of the accept, for the
    // first request); the clock is read only if the head needs another read.
    let mut deadline = first;
    let first = first.is_some();
    // The head's header lines, when they are kept as they came: here, where the layers
    // below borrow them, rather than moved (96 bytes) into each layer's future.
    let mut raw: Option<RawFields> = None;
    let head = loop {
        if first && H2_PREFACE.starts_with(&buf[..buf.len().min(H2_PREFACE.len())]) {
            if buf.len() >= H2_PREFACE.len() {
                return Next::Handover;
            }
        } else {
            match parse(buf, limits.max_head, &mut raw) {
                Parsed::Request(h) => break h,
                Parsed::Partial if buf.len() >= limits.max_head => {
                    return refuse(stream, TOO_LARGE).await;
                }
                Parsed::Partial => {}
                Parsed::Handover => return Next::Handover,
                Parsed::Refuse(answer) => return refuse(stream, answer).await,
            }
        }
        let due = *deadline.get_or_insert_with(|| Instant::now() + limits.header_timeout);
        match tokio::time::timeout_at(due, read_some(stream, buf, limits.max_head)).await {
            Ok(true) => {}
            Ok(false) => return Next::Close,
            Err(_) => return refuse(stream, TIMEOUT).await,
        }
    };
    let Head {
        mut req,
        length,
        keep_alive,
    } = head;
    // A small body with a length: read it whole (as nginx buffers request bodies), each
    // read due within the header timeout.
    let body = if length == 0 {
        None
    } else {
        let length = length as usize;
        while buf.len() < length {
            let due = Instant::now() + limits.header_timeout;
            match tokio::time::timeout_at(due, read_some(stream, buf, length)).await {
                Ok(true) => {}
                Ok(false) => return Next::Close,
                Err(_) => return refuse(stream, TIMEOUT).await,
            }
        }
        Some(buf.split_to(length).freeze())
    };
    *req.body_mut() = RequestBody::Full(body);
    let _busy = crate::workers::Busy::start();
    if exchange(stream, shared, info, req, &mut raw, keep_alive, ticket).await {
        Next::KeepAlive
    } else {
        Next::Close
    }
}

/// `write_all` for a small message (an answer, a request to a backend). On a worker that
/// batches its sends, the message goes out with the rest of the turn's in one io_uring
/// submission (`crate::sendbatch`), waited for; elsewhere a socket that is writable (the
/// usual case on a keep-alive connection) takes one `try_write`, without the `WriteAll`
/// future, its poll and the scheduler's budget check around it. Either way the rest of a
/// short write, or all of it when the socket had no room, goes through `write_all`.
pub(crate) async fn write_now(stream: &mut TcpStream, buf: &[u8]) -> io::Result<()> {
    if let Some(mut t) =
        crate::sendbatch::send_quiet(std::os::fd::AsRawFd::as_raw_fd(&*stream), buf)
    {
        return finish(stream, &mut t).await;
    }
    match stream.try_write(buf) {
        Ok(n) if n == buf.len() => Ok(()),
        Ok(n) => stream.write_all(&buf[n..]).await,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => stream.write_all(buf).await,
        Err(e) => Err(e),
    }
}

async fn read_some(stream: &mut TcpStream, buf: &mut BytesMut, want: usize) -> bool {
    if buf.capacity() - buf.len() < 1024 {
        buf.reserve(
            want.saturating_sub(buf.len())
                .clamp(1024, INITIAL_BUFFER * 4),
        );
    }
    matches!(stream.read_buf(buf).await, Ok(n) if n > 0)
}

/// `try_read_buf`, and when the read left room in the buffer (the kernel had no more)
/// the socket's readability is forgotten. tokio forgets it only when a read fails with
/// `EAGAIN`, so the next read would be a syscall returning just that: about one wasted
/// `recvfrom` per request per side, measured. The read runs inside `try_io`, which
/// forgets only the readiness seen before the read: bytes arriving meanwhile (a new edge,
/// possibly noticed by another thread's reactor) keep the socket readable.
pub(crate) fn try_read_drained(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let mut got = None;
    let read = stream.try_io(tokio::io::Interest::READABLE, || {
        let n = stream.try_read_buf(buf)?;
        got = Some(n);
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match (read, got) {
        (Err(e), Some(n)) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
        (r, _) => r,
    }
}

/// Waits until the socket is readable, then [`try_read_drained`]. The wait keeps the task's
/// waker in the socket's one reader slot (`poll_read_ready`), where `readable()` would add a
/// waiter to a list under a lock, and the wake-up walk it: one reader per socket here.
pub(crate) async fn read_drained(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        std::future::poll_fn(|cx| stream.poll_read_ready(cx)).await?;
        match try_read_drained(stream, buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Writes a canned answer and closes.
async fn refuse(stream: &mut TcpStream, answer: &[u8]) -> Next {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
    let _ = stream.shutdown().await;
    Next::Close
}

/// Parses the head at the start of `buf`. On success the head's bytes leave `buf` (the
/// header values keep sharing them); otherwise `buf` is left as it was.
/// A head whose header lines are kept as they came (`rawfields`) leaves them in `lines`; its
/// map then holds only Host, Content-Type and Content-Length.
fn parse(buf: &mut BytesMut, max_head: usize, lines: &mut Option<RawFields>) -> Parsed {
    let mut spans = crate::headers::Spans::new();
    // Plain heads (nearly all) by fulcrum's own parser; anything else by `httparse`.
    let ((line, len), fast) = match crate::h1parse::request(buf, &mut spans) {
        Some(parsed) => (parsed, true),
        None => match parse_any(buf, &mut spans) {
            Ok(parsed) => (parsed, false),
            Err(other) => return other,
        },
    };
    if len > max_head {
        return Parsed::Refuse(TOO_LARGE);
    }
    let version = match line.version {
        1 => Version::HTTP_11,
        _ => Version::HTTP_10,
    };
    let (mo, ml) = line.method;
    let Ok(method) = Method::from_bytes(&buf[mo..mo + ml]) else {
        return Parsed::Refuse(BAD_REQUEST);
    };
    if method == Method::CONNECT {
        return Parsed::Handover;
    }
    let path_range = line.target;
    let mut length: Option<u64> = None;
    let mut connection = crate::headers::ConnectionTokens::default();
    // One pass over the names: the framing, what hands the request to hyper, and where
    // each line goes. A plain head (the strict parser's, at most 64 lines) keeps its lines
    // as they came (`rawfields`) but for those marked: `to_map` (Host, Content-Type,
    // Content-Length: read on every request's way) and `cut` (hop-by-hop). A `Connection`
    // header that names other headers sends the whole head into the map instead, so that
    // `strip_hop_by_hop` removes them.
    let (mut to_map, mut cut, mut named) = (0u64, 0u64, false);
    for (i, span) in spans.as_mut_slice().iter_mut().enumerate() {
        let &mut (no, nl, vo, vl) = span;
        let (name, value) = (&buf[no..no + nl], &buf[vo..vo + vl]);
        let bit = line_bit(i);
        match crate::rawfields::kind(name) {
            Kind::ContentLength => {
                let Some(n) = crate::headers::content_length(value) else {
                    return Parsed::Refuse(BAD_REQUEST);
                };
                if length.is_some_and(|l| l != n) {
                    return Parsed::Refuse(BAD_REQUEST);
                }
                length = Some(n);
                to_map |= bit;
            }
            Kind::TransferEncoding | Kind::Upgrade | Kind::Expect => return Parsed::Handover,
            Kind::Connection => {
                if connection.add(value) {
                    // Consumed here (keep-alive, close): left out (past the 64th line, where
                    // no bit marks it, by an empty span).
                    cut |= bit;
                    if bit == 0 {
                        *span = (0, 0, 0, 0);
                    }
                } else {
                    named = true;
                }
            }
            Kind::Te if !value.eq_ignore_ascii_case(b"trailers") => cut |= bit,
            Kind::HopByHop => cut |= bit,
            Kind::Host | Kind::ContentType => to_map |= bit,
            Kind::Te | Kind::Date | Kind::Other => {}
        }
    }
    let length = length.unwrap_or(0);
    if length > MAX_BUFFERED_BODY {
        return Parsed::Handover;
    }
    let head = buf.split_to(len).freeze();
    let uri = match Uri::from_maybe_shared(head.slice(path_range.0..path_range.0 + path_range.1)) {
        Ok(u) => u,
        Err(_) => return Parsed::Refuse(BAD_REQUEST),
    };
    // The lines kept, or the whole map: a `Connection` naming headers, a head only
    // httparse took, or more runs of lines to leave out than a kept head may lose.
    let spans = spans.as_slice();
    let raw = (fast && !named)
        .then(|| kept_lines(&head, spans, to_map | cut))
        .flatten();
    let mut map = crate::headers::map_with_capacity(match raw {
        Some(_) => to_map.count_ones() as usize,
        None => spans.len(),
    });
    for (i, span @ &(no, nl, vo, vl)) in spans.iter().enumerate() {
        // Beside kept lines, the map holds the three every request's way reads; without
        // them, every line but the hop-by-hop ones (`strip_hop_by_hop` would remove them).
        let wanted = match raw {
            Some(_) => to_map & line_bit(i) != 0,
            None => cut & line_bit(i) == 0 && !crate::headers::Spans::consumed(span),
        };
        if !wanted {
            continue;
        }
        let Some((name, value)) = field(&head, no, nl, vo, vl) else {
            return Parsed::Refuse(BAD_REQUEST);
        };
        map.append(name, value);
    }
    let keep_alive = connection.keep_alive(version);
    let mut req = Box::new(Request::new(RequestBody::Full(None)));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = version;
    *req.headers_mut() = map;
    *lines = raw;
    Parsed::Request(Head {
        req,
        length,
        keep_alive,
    })
}

/// Line `i`'s bit in a head's masks of lines (none past the 64th: such heads are
/// httparse's and build the map).
fn line_bit(i: usize) -> u64 {
    1u64.checked_shl(i as u32).unwrap_or(0)
}

/// A plain head's header lines kept as they came, less those in `out` (a mask by
/// [`line_bit`]); `None` if that leaves more runs of lines out than a kept head may lose.
/// Inlined into `parse`, its one caller: out of line, returning the lines by value cost
/// 50 more instructions a request (callgrind).
#[inline(always)]
fn kept_lines(head: &Bytes, spans: &[crate::headers::Span], out: u64) -> Option<RawFields> {
    let mut lines = RawFields::of_head(head.clone(), spans).ok()?;
    // The marked lines in order, lowest bit first.
    let mut left = out;
    while left != 0 {
        if !lines.cut_line(spans, left.trailing_zeros() as usize) {
            return None;
        }
        left &= left - 1;
    }
    Some(lines)
}

/// A header line's name and value as map entries; the value shares the head's bytes (the
/// parser has checked them: no control characters but tab).
fn field(
    head: &Bytes,
    no: usize,
    nl: usize,
    vo: usize,
    vl: usize,
) -> Option<(HeaderName, HeaderValue)> {
    let name = crate::headers::name(&head[no..no + nl]).ok()?;
    let value = HeaderValue::from_maybe_shared(head.slice(vo..vo + vl)).ok()?;
    Some((name, value))
}

/// A head [`crate::h1parse`] left alone, by `httparse`: every form the RFCs allow, or the
/// answer for one that is not a request (or not complete yet).
fn parse_any(
    buf: &[u8],
    spans: &mut crate::headers::Spans,
) -> Result<(crate::h1parse::RequestLine, usize), Parsed> {
    // Left uninitialised: zeroing 100 slots of 32 bytes was a 3 KiB memset per request.
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut []);
    let len = match r.parse_with_uninit_headers(buf, &mut headers) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(Parsed::Partial),
        Err(httparse::Error::TooManyHeaders) => return Err(Parsed::Refuse(TOO_LARGE)),
        Err(_) => return Err(Parsed::Refuse(BAD_REQUEST)),
    };
    crate::h1parse::spans_of(buf, r.headers, spans);
    let at = |s: &[u8]| (s.as_ptr() as usize - buf.as_ptr() as usize, s.len());
    let line = crate::h1parse::RequestLine {
        method: at(r.method.unwrap_or("").as_bytes()),
        target: at(r.path.unwrap_or("").as_bytes()),
        version: r.version.unwrap_or(0),
    };
    Ok((line, len))
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Polls the body once: its next frame if it is ready now, else `Pending` (the waker is
/// registered, so awaiting `frame()` afterwards is correct).
fn frame_now(
    body: &mut Body,
) -> impl std::future::Future<Output = Poll<Option<Result<Frame<Bytes>, BoxError>>>> + '_ {
    std::future::poll_fn(move |cx| Poll::Ready(Pin::new(&mut *body).poll_frame(cx)))
}

/// One request through the service and its answer onto the wire. Returns whether the
/// connection stays open for another request.
async fn exchange(
    stream: &mut TcpStream,
    shared: &Shared,
    info: &ConnInfo,
    req: Box<Request<RequestBody>>,
    raw: &mut Option<RawFields>,
    keep_alive: bool,
    ticket: &mut Option<crate::sendbatch::Ticket>,
) -> bool {
    let head_only = req.method() == Method::HEAD;
    let version = req.version();
    // The answer stays in its box (head and body): read in place, not moved out.
    let mut resp: Box<Response<Body>> = service::handle(shared, info, req, raw).await;
    let status = resp.status().as_u16();
    let no_body = head_only || status < 200 || status == 204 || status == 304;
    // Whether the connection stays open: as the request asked, unless the answer's framing
    // or its `Connection: close` (seen as the head is written) ends it.
    let mut keep = keep_alive;
    enum Framing {
        Length(u64),
        Chunked,
        Close,
    }
    let framing = if no_body {
        Framing::Length(0)
    } else if let Some(n) = resp.body().size_hint().exact() {
        Framing::Length(n)
    } else if version == Version::HTTP_11 {
        Framing::Chunked
    } else {
        keep = false;
        Framing::Close
    };

    let mut out = OutBuf::take();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(resp.status().as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(resp.status().canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let (mut has_connection, mut has_date) = (false, false);
    // A backend's lines as they came (the hop-by-hop ones and its length already left
    // out), then the map: fulcrum's own headers, or all of them when they were parsed.
    // Taken out so their bytes (the backend connection's read buffer) go with the head.
    if let Some(raw) = resp.body_mut().take_raw() {
        raw.write_to(&mut out);
        has_date = raw.has_date();
    }
    for (name, value) in resp.headers() {
        if !no_body && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING) {
            continue;
        }
        if name == header::CONNECTION {
            has_connection = true;
            let mut tokens = crate::headers::ConnectionTokens::default();
            tokens.add(value.as_bytes());
            keep &= !tokens.close();
        }
        has_date |= name == header::DATE;
        crate::headers::write_field(&mut out, name, value);
    }
    if !has_date {
        out.extend_from_slice(b"date: ");
        date::append(&mut out);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) if !no_body => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(digits(n, 10, &mut [0u8; 20]));
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if !has_connection {
        if !keep {
            out.extend_from_slice(b"connection: close\r\n");
        } else if version == Version::HTTP_10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    // The head's values may share the backend connection's read buffer: let go of them now
    // (the emptied map is kept for the next head this thread parses).
    crate::headers::recycle(std::mem::take(resp.headers_mut()));

    crate::workers::gather().await;
    if no_body {
        drop(resp);
        return write_last(stream, &out, keep, ticket).await && keep;
    }
    let mut sent: u64 = 0;
    loop {
        // Take what the body has ready now; write when it would wait (or at the end).
        let frame = match frame_now(resp.body_mut()).await {
            Poll::Ready(f) => f,
            Poll::Pending => {
                if !out.is_empty() {
                    if stream.write_all(&out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
                http_body_util::BodyExt::frame(resp.body_mut()).await
            }
        };
        match frame {
            None => break,
            Some(Err(e)) => {
                // The backend's body failed mid-way: the client sees a cut response (an
                // unfinished length or chunked body), never a complete-looking one.
                tracing::debug!(client = %info.peer, error = %e, "response body ended early");
                let _ = stream.write_all(&out).await;
                return false;
            }
            Some(Ok(f)) => {
                let Ok(data) = f.into_data() else { continue };
                if data.is_empty() {
                    continue;
                }
                sent += data.len() as u64;
                if matches!(framing, Framing::Chunked) {
                    out.extend_from_slice(digits(data.len() as u64, 16, &mut [0u8; 20]));
                    out.extend_from_slice(b"\r\n");
                }
                if data.len() <= COALESCE {
                    out.extend_from_slice(&data);
                } else {
                    if !out.is_empty() {
                        if stream.write_all(&out).await.is_err() {
                            return false;
                        }
                        out.clear();
                    }
                    if stream.write_all(&data).await.is_err() {
                        return false;
                    }
                }
                if matches!(framing, Framing::Chunked) {
                    out.extend_from_slice(b"\r\n");
                }
                if out.len() > COALESCE {
                    if stream.write_all(&out).await.is_err() {
                        return false;
                    }
                    out.clear();
                }
            }
        }
    }
    let complete = match framing {
        Framing::Length(n) => sent == n,
        Framing::Chunked => {
            out.extend_from_slice(b"0\r\n\r\n");
            true
        }
        Framing::Close => true,
    };
    if !out.is_empty() && !write_last(stream, &out, complete && keep, ticket).await {
        return false;
    }
    if !complete {
        tracing::debug!(client = %info.peer, "response body shorter than its length");
    }
    complete && keep
}

/// An answer's last bytes. On a connection that stays open they go out quietly with the
/// turn's other sends, and the task goes back to waiting for the next request without
/// waiting for them (`sendbatch::send_quiet`: one wake-up and poll less a request; `serve`
/// settles the ticket); otherwise written and waited for.
async fn write_last(
    stream: &mut TcpStream,
    out: &[u8],
    keep: bool,
    ticket: &mut Option<crate::sendbatch::Ticket>,
) -> bool {
    if keep {
        if let Some(t) =
            crate::sendbatch::send_quiet(std::os::fd::AsRawFd::as_raw_fd(&*stream), out)
        {
            *ticket = Some(t);
            return true;
        }
    }
    write_now(stream, out).await.is_ok()
}

/// An answer's write buffer, taken from this thread's spares and given back when the answer
/// is written (several answers wait in `gather` at once, so a few are kept).
struct OutBuf(Vec<u8>);

thread_local! {
    static SPARES: spares::Stack<Vec<u8>> = const { spares::Stack::new(Vec::new()) };
}

impl OutBuf {
    fn take() -> OutBuf {
        OutBuf(spares::take(&SPARES).unwrap_or_else(|| Vec::with_capacity(512)))
    }
}

impl Drop for OutBuf {
    fn drop(&mut self) {
        // Kept only while small and few: a large answer's buffer goes back to the allocator.
        if self.0.capacity() <= 2 * COALESCE {
            let mut v = std::mem::take(&mut self.0);
            v.clear();
            spares::keep(&SPARES, v, 256);
        }
    }
}

impl std::ops::Deref for OutBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for OutBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

/// Read buffers of connections gone idle, kept per thread for the next request's read.
/// Why: an idle connection holds no buffer (so 10,000 of them cost little), and a buffer
/// made for each request was two allocations (its memory, and the shared header the head's
/// split off it needs) and two frees. A buffer given back once its request's head and values
/// are gone is whole again and is reused as it stands, header included.
mod spare_reads {
    use super::INITIAL_BUFFER;
    use crate::spares;
    use bytes::BytesMut;

    /// As many as a thread may have requests being read at once without most being new.
    const KEPT: usize = 32;

    thread_local! {
        static SPARES: spares::Stack<BytesMut> = const { spares::Stack::new(Vec::new()) };
    }

    #[cfg(test)]
    pub fn clear() {
        spares::clear(&SPARES)
    }

    /// An empty buffer with room for a head.
    pub fn take() -> BytesMut {
        spares::take(&SPARES).unwrap_or_else(|| BytesMut::with_capacity(INITIAL_BUFFER))
    }

    /// Keeps `buf` if it is empty, nothing else shares its memory (the last request's head
    /// and values were dropped: `try_reclaim` then has its whole room back without
    /// allocating), and it did not grow past the usual size for a body.
    pub fn give(mut buf: BytesMut) {
        if !buf.is_empty() || !buf.try_reclaim(INITIAL_BUFFER) || buf.capacity() > INITIAL_BUFFER {
            return;
        }
        spares::keep(&SPARES, buf, KEPT);
    }
}

/// `n` in `radix` (10 or 16, lower-case), written at the end of `buf`.
fn digits(mut n: u64, radix: u64, buf: &mut [u8; 20]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(n % radix) as usize];
        n /= radix;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// The `Date` header, formatted once a second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((0, [0; 29])) };
    }

    pub fn append(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let text = httpdate::fmt_http_date(now);
                if text.len() == 29 {
                    c.1.copy_from_slice(text.as_bytes());
                    c.0 = secs;
                }
            }
            out.extend_from_slice(&c.1);
        });
    }
}

/// The bytes already read, then the socket: how hyper takes a connection over.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(out.remaining());
            let part = self.prefix.split_to(n);
            out.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A read that drained the socket forgets its readability, and bytes sent afterwards
    /// still wake the reader (on both runtimes: the multi-thread one's reactor runs on
    /// other threads, which is where a lost wake-up would hide).
    async fn drained_reads_still_see_later_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut buf = BytesMut::with_capacity(4096);
        for round in 0..200u32 {
            let msg = round.to_string();
            client.write_all(msg.as_bytes()).await.unwrap();
            buf.clear();
            while buf.len() < msg.len() {
                let n =
                    tokio::time::timeout(Duration::from_secs(5), read_drained(&server, &mut buf))
                        .await
                        .expect("bytes sent after a drained read never woke the reader")
                        .unwrap();
                assert!(n > 0);
            }
            assert_eq!(&buf[..], msg.as_bytes());
            // Nothing left: the next try finds nothing, without waiting.
            assert_eq!(
                try_read_drained(&server, &mut buf).map_err(|e| e.kind()),
                Err(io::ErrorKind::WouldBlock)
            );
        }
    }

    #[tokio::test]
    async fn drained_reads_still_see_later_bytes_current_thread() {
        drained_reads_still_see_later_bytes().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drained_reads_still_see_later_bytes_multi_thread() {
        drained_reads_still_see_later_bytes().await;
    }

    /// The parse, and the kept lines if the head's were kept.
    fn parsed_lines(text: &[u8]) -> (Parsed, BytesMut, Option<RawFields>) {
        let mut buf = BytesMut::from(text);
        let mut lines = None;
        let p = parse(&mut buf, 32 * 1024, &mut lines);
        (p, buf, lines)
    }

    /// The parse with every header in the request's map (kept lines put there).
    fn parsed(text: &[u8]) -> (Parsed, BytesMut) {
        let (mut p, buf, mut lines) = parsed_lines(text);
        if let Parsed::Request(h) = &mut p {
            crate::service::materialise(h.req.headers_mut(), &mut lines);
        }
        (p, buf)
    }

    /// The request a parse gave (a test's head is meant to be one).
    fn request_of(p: Parsed) -> Head {
        match p {
            Parsed::Request(h) => h,
            _ => panic!("not parsed"),
        }
    }

    #[test]
    fn plain_request_heads_keep_their_lines_less_the_hop_by_hop_ones() {
        let (p, _, lines) = parsed_lines(
            b"GET / HTTP/1.1\r\nX-A:  1 \r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nHost: x\r\nTE: trailers\r\nProxy-Connection: a\r\nTE: gzip\r\nTrailer: t\r\nX-A: 2\r\nContent-Type: text/plain\r\nContent-Length: 0\r\nDate: d\r\n\r\n",
        );
        let h = request_of(p);
        let lines = lines.expect("lines kept");
        // Everything but the hop-by-hop lines and the three the map holds, as sent.
        assert_eq!(
            lines.written(),
            "X-A:  1 \r\nTE: trailers\r\nX-A: 2\r\nDate: d\r\n"
        );
        let map = h.req.headers();
        assert_eq!(map.len(), 3, "{map:?}");
        assert_eq!(map["host"], "x");
        assert_eq!(map["content-type"], "text/plain");
        assert_eq!(map["content-length"], "0");
        assert!(h.keep_alive);

        // No header lines: nothing kept, nothing in the map.
        let (p, _, lines) = parsed_lines(b"GET / HTTP/1.0\r\n\r\n");
        let h = request_of(p);
        assert_eq!(lines.expect("lines kept").written(), "");
        assert!(h.req.headers().is_empty());
    }

    #[test]
    fn heads_the_map_must_decide_keep_no_lines_and_lose_the_hop_by_hop_ones() {
        // A `Connection` naming a header (`strip_hop_by_hop` removes it from the map later).
        let (p, _, lines) = parsed_lines(
            b"GET / HTTP/1.1\r\nConnection: x-secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n\r\n",
        );
        let h = request_of(p);
        assert!(lines.is_none());
        assert_eq!(h.req.headers()["connection"], "x-secret");
        assert_eq!(h.req.headers()["x-secret"], "1");
        assert!(h.req.headers().get("keep-alive").is_none());

        // Seven runs of lines to leave out, one more than a kept head may lose; six do.
        for (runs, kept) in [(6, true), (7, false)] {
            let mut text = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..runs {
                text.extend_from_slice(format!("X-{i}: v\r\nKeep-Alive: {i}\r\n").as_bytes());
            }
            text.extend_from_slice(b"\r\n");
            let (p, _, lines) = parsed_lines(&text);
            let h = request_of(p);
            assert_eq!(lines.is_some(), kept, "{runs} runs");
            let mut all = h.req.headers().clone();
            crate::service::materialise(&mut all, &mut lines.clone());
            assert_eq!(all.len(), runs, "{runs} runs: {all:?}");
            assert!(all.get("keep-alive").is_none());
        }

        // A head only `httparse` takes (a bare LF): the map.
        let (p, _, lines) = parsed_lines(b"GET / HTTP/1.1\nHost: x\nX-A: 1\n\n");
        let h = request_of(p);
        assert!(lines.is_none());
        assert_eq!(h.req.headers().len(), 2);
    }

    #[test]
    fn a_head_is_parsed_with_values_sharing_the_buffer_and_the_rest_left() {
        let (p, rest) =
            parsed(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nX-A: 2\r\n\r\nGET /next");
        let Parsed::Request(h) = p else {
            panic!("not parsed")
        };
        assert_eq!(h.req.method(), Method::GET);
        assert_eq!(h.req.uri(), "/a?b=1");
        assert_eq!(h.req.version(), Version::HTTP_11);
        assert_eq!(h.req.headers()["host"], "x");
        let all: Vec<_> = h.req.headers().get_all("x-a").iter().collect();
        assert_eq!(all, ["1", "2"]);
        assert!(h.keep_alive);
        assert_eq!(h.length, 0);
        assert_eq!(&rest[..], b"GET /next");
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_tokens() {
        let ka = |t: &[u8]| match parsed(t).0 {
            Parsed::Request(h) => h.keep_alive,
            _ => panic!("not parsed"),
        };
        assert!(!ka(b"GET / HTTP/1.1\r\nConnection: foo, Close\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.0\r\nConnection: close, keep-alive\r\n\r\n"
        ));
    }

    #[test]
    fn what_this_side_does_not_carry_goes_to_hyper_untouched() {
        for text in [
            &b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"GET /ws HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
            b"CONNECT x:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n",
        ] {
            let (p, rest) = parsed(text);
            assert!(
                matches!(p, Parsed::Handover),
                "{}",
                String::from_utf8_lossy(text)
            );
            assert_eq!(&rest[..], text, "the bytes stay for hyper");
        }
    }

    #[test]
    fn malformed_heads_and_conflicting_lengths_are_refused() {
        for text in [
            &b"GARBAGE\x01 / NOT-HTTP\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        ] {
            assert!(
                matches!(parsed(text).0, Parsed::Refuse(BAD_REQUEST)),
                "{}",
                String::from_utf8_lossy(text)
            );
        }
        assert!(matches!(
            parsed(b"GET / HTTP/1.1\r\nHost: x\r\n").0,
            Parsed::Partial
        ));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(matches!(parsed(&many).0, Parsed::Refuse(TOO_LARGE)));
    }

    #[test]
    fn heads_with_few_and_with_the_most_headers_keep_every_one() {
        // Up to 16 spans sit on the stack, more spill to the heap: both sides of that line.
        for n in [0, 1, 16, 17, MAX_HEADERS] {
            let mut text = b"GET / HTTP/1.1\r\n".to_vec();
            for i in 0..n {
                text.extend_from_slice(format!("x-{i}: value-{i}\r\n").as_bytes());
            }
            text.extend_from_slice(b"\r\n");
            let Parsed::Request(h) = parsed(&text).0 else {
                panic!("{n} headers: not parsed")
            };
            assert_eq!(h.req.headers().len(), n);
            for i in 0..n {
                assert_eq!(
                    h.req.headers()[format!("x-{i}").as_str()],
                    format!("value-{i}")
                );
            }
        }
    }

    #[test]
    fn canned_answers_have_the_lengths_they_declare() {
        for answer in [BAD_REQUEST, TOO_LARGE, TIMEOUT] {
            let text = std::str::from_utf8(answer).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            let declared: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(declared, body.len(), "{head}");
        }
    }

    #[test]
    fn numbers_are_written_in_decimal_and_hex() {
        assert_eq!(digits(0, 10, &mut [0; 20]), b"0");
        assert_eq!(digits(1234567890, 10, &mut [0; 20]), b"1234567890");
        assert_eq!(
            digits(u64::MAX, 10, &mut [0; 20]),
            u64::MAX.to_string().as_bytes()
        );
        assert_eq!(digits(0, 16, &mut [0; 20]), b"0");
        assert_eq!(digits(0x1f40, 16, &mut [0; 20]), b"1f40");
        assert_eq!(digits(u64::MAX, 16, &mut [0; 20]), b"ffffffffffffffff");
    }

    #[test]
    fn a_read_buffer_is_reused_only_once_nothing_shares_it() {
        // What another test on this thread may have left.
        spare_reads::clear();
        let text = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        // The head split off as `parse` does and still held (as a request's values hold
        // it): the buffer is not kept.
        let mut buf = spare_reads::take();
        let first = buf.as_ptr();
        buf.extend_from_slice(text);
        let head = buf.split_to(text.len()).freeze();
        spare_reads::give(buf);
        let other = spare_reads::take();
        assert_ne!(other.as_ptr(), first, "a buffer still shared was kept");
        drop(head);
        // Once the head is gone the buffer is whole again: kept, and the next take has it.
        let mut buf = other;
        let second = buf.as_ptr();
        buf.extend_from_slice(text);
        drop(buf.split_to(text.len()).freeze());
        spare_reads::give(buf);
        let again = spare_reads::take();
        assert_eq!(again.as_ptr(), second);
        assert!(again.is_empty() && again.capacity() >= INITIAL_BUFFER);
        // A buffer grown for a body, or one holding bytes, is not kept.
        spare_reads::give(BytesMut::with_capacity(4 * INITIAL_BUFFER));
        let mut pending = again;
        pending.extend_from_slice(b"G");
        spare_reads::give(pending);
        let fresh = spare_reads::take();
        assert!(fresh.is_empty() && fresh.capacity() == INITIAL_BUFFER);
    }
}
