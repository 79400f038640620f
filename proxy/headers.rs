//! Header hygiene between client and backend: hop-by-hop headers removed both ways,
//! `X-Forwarded-*` set on the way in. Done in place on the request's own header map; the
//! values fulcrum makes are shared (a worker's recent clients' `X-Forwarded-For`, a request
//! id echoed in the answer), so a clone costs no allocation.

use std::cell::RefCell;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard ones proxies still meet.
fn fixed_hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ]
}

/// Where one header of a parsed head sits in its buffer: name offset, name length, value
/// offset, value length.
pub type Span = (usize, usize, usize, usize);

/// How many [`Span`]s a head keeps on the stack.
const INLINE_SPANS: usize = 16;

/// The [`Span`]s of a parsed head, noted while its header slices still borrow the buffer, so
/// that the `HeaderMap` built once the head is split off can share its bytes (fulcrum's
/// server side and its h1 client both parse this way). The usual few sit on the stack; a
/// head with more spills to the heap — zeroing room for the most a head may have (100 or
/// 128) was a 3-4 KiB memset per head. A span left empty (`(0, 0, 0, 0)`; no header has an
/// empty name) is a header the parser consumed and leaves out of the map.
#[derive(Default)]
pub struct Spans {
    inline: [Span; INLINE_SPANS],
    /// Every span once there are more than the inline ones hold.
    spilled: Vec<Span>,
    len: usize,
}

impl Spans {
    /// None yet: the parsers [`Spans::push`] them.
    pub fn new() -> Spans {
        Spans::default()
    }

    pub fn as_mut_slice(&mut self) -> &mut [Span] {
        match self.len {
            n if n <= INLINE_SPANS => &mut self.inline[..n],
            _ => &mut self.spilled,
        }
    }

    /// Adds one span at the end (spilling to the heap past the inline ones).
    pub fn push(&mut self, span: Span) {
        if self.len < INLINE_SPANS {
            self.inline[self.len] = span;
        } else {
            if self.len == INLINE_SPANS {
                self.spilled.clear();
                self.spilled.extend_from_slice(&self.inline);
            }
            self.spilled.push(span);
        }
        self.len += 1;
    }

    /// Forgets every span (keeping any heap room).
    pub fn clear(&mut self) {
        self.len = 0;
        self.spilled.clear();
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every span, the consumed ones included: the parsers skip those with
    /// [`Spans::consumed`]. (A filtering iterator here cost ~115 instructions a request: the
    /// compiler then left `HeaderValue::from_shared` out of line in the request parser.)
    pub fn as_slice(&self) -> &[Span] {
        match self.len {
            n if n <= INLINE_SPANS => &self.inline[..n],
            _ => &self.spilled,
        }
    }

    /// Was this header consumed by the parser (an empty span, left out of the map)?
    #[inline]
    pub fn consumed(span: &Span) -> bool {
        span.1 == 0
    }
}

/// The longest raw name [`name`] remembers.
const CACHED_NAME: usize = 32;
/// How many names each thread remembers (a power of two).
const NAME_SLOTS: usize = 64;

/// One remembered name: its raw bytes (zero-padded), their length, the name they parse to.
type NameSlot = ([u8; CACHED_NAME], u8, Option<HeaderName>);

thread_local! {
    /// Header names as they last arrived, raw bytes and parsed name, one per slot: a client
    /// or backend sends the same few names, spelled the same way, in every message.
    static NAMES: std::cell::RefCell<[NameSlot; NAME_SLOTS]> =
        const { std::cell::RefCell::new([const { ([0; CACHED_NAME], 0, None) }; NAME_SLOTS]) };
}

/// `HeaderName::from_bytes` for the names of a parsed head, remembered per thread by their
/// exact bytes. Why: `from_bytes` matches the name against http's list of standard names
/// after folding its case, about 130 instructions a name and a sixth of fulcrum's header
/// work; a hit here compares the bytes with those the slot last saw and clones the name.
/// The same bytes always give the same name, so a hit answers as `from_bytes` would.
pub fn name(raw: &[u8]) -> Result<HeaderName, header::InvalidHeaderName> {
    let len = raw.len();
    if len == 0 || len > CACHED_NAME {
        return HeaderName::from_bytes(raw);
    }
    let slot =
        (len ^ (raw[0] as usize) << 1 ^ (raw[len - 1] as usize) << 2 ^ (raw[len / 2] as usize))
            & (NAME_SLOTS - 1);
    NAMES.with(|names| {
        let mut names = names.borrow_mut();
        let entry = &mut names[slot];
        if entry.1 as usize == len && same(&entry.0, raw) {
            if let Some(name) = &entry.2 {
                return Ok(name.clone());
            }
        }
        let name = HeaderName::from_bytes(raw)?;
        entry.0[..len].copy_from_slice(raw);
        entry.1 = len as u8;
        entry.2 = Some(name.clone());
        Ok(name)
    })
}

/// How many emptied header maps a thread keeps for the next heads it parses: as many as it
/// may have messages in flight at once without most of them being new.
const SPARE_MAPS: usize = 64;
/// A map grown past this many headers (an unusual head) goes back to the allocator, so a
/// thread's spares stay small.
const SPARE_MAP_CAPACITY: usize = 48;

thread_local! {
    static SPARES: crate::spares::Stack<HeaderMap> =
        const { crate::spares::Stack::new(Vec::new()) };
}

/// An empty map with room for `n` headers: an emptied one from this thread's spares when it
/// has one. Why: a map is two allocations (its index table and its entries) and two frees,
/// and every proxied request made two maps (its own and its answer's), four of the nine
/// allocations a request took; a spare is reused as it stands.
pub fn map_with_capacity(n: usize) -> HeaderMap {
    match crate::spares::take(&SPARES) {
        Some(mut map) => {
            // Never fails: a parsed head has at most a few hundred headers.
            let _ = map.try_reserve(n);
            map
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Gives a map whose message is done back to this thread's spares, emptied: its names and
/// values (which may share a connection's read buffer) are dropped now, its room kept.
pub fn recycle(mut map: HeaderMap) {
    if map.capacity() == 0 || map.capacity() > SPARE_MAP_CAPACITY {
        return;
    }
    map.clear();
    crate::spares::keep(&SPARES, map, SPARE_MAPS);
}

/// A `Content-Length` value (RFC 9110 §8.6: `1*DIGIT`, optional whitespace around it), or
/// `None` if it is not one. Stricter than `str::parse` (which takes a leading `+`) and
/// without its UTF-8 check and Unicode trimming: ~200 instructions a response less.
/// Lengths of 20 digits or more (past 10^19 bytes) are refused rather than checked for
/// overflow digit by digit.
pub fn content_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n: u64 = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u64::from(b - b'0');
    }
    Some(n)
}

/// `kept[..raw.len()] == raw` for 1 to [`CACHED_NAME`] bytes, in a few word compares
/// (overlapping when the length is not a multiple) rather than a call to `memcmp`.
#[inline]
fn same(kept: &[u8; CACHED_NAME], raw: &[u8]) -> bool {
    let len = raw.len();
    // In range for every length matched below; a word out of range would read as `None`.
    let w8 = |b: &[u8], at: usize| {
        b.get(at..)
            .and_then(|b| b.first_chunk::<8>())
            .map(|w| u64::from_ne_bytes(*w))
    };
    let w4 = |b: &[u8], at: usize| {
        b.get(at..)
            .and_then(|b| b.first_chunk::<4>())
            .map(|w| u32::from_ne_bytes(*w))
    };
    match len {
        16..=CACHED_NAME => {
            let mid = len - 16;
            w8(kept, 0) == w8(raw, 0)
                && w8(kept, 8) == w8(raw, 8)
                && w8(kept, mid) == w8(raw, mid)
                && w8(kept, mid + 8) == w8(raw, mid + 8)
        }
        8..16 => w8(kept, 0) == w8(raw, 0) && w8(kept, len - 8) == w8(raw, len - 8),
        4..8 => w4(kept, 0) == w4(raw, 0) && w4(kept, len - 4) == w4(raw, len - 4),
        _ => kept[..len] == *raw,
    }
}

/// One header line, `name: value\r\n`, as HTTP/1.1 puts it on the wire (fulcrum's own
/// server side writing an answer, its upstream client writing a request).
#[inline]
pub fn write_field(out: &mut Vec<u8>, name: &HeaderName, value: &HeaderValue) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The comma-separated tokens of one `Connection` value, trimmed (empty ones included).
fn tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii)
}

/// Does a `Connection` header carry `token` (case-insensitive, among comma-separated ones)?
pub fn connection_has(headers: &HeaderMap, token: &[u8]) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(token)))
}

/// The `close` and `keep-alive` tokens of a message's `Connection` headers, gathered in the
/// pass over a parsed head that notes its header spans, so that neither fulcrum's server
/// side nor its h1 client looks `Connection` up in the map afterwards.
#[derive(Debug, Default, Clone, Copy)]
pub struct ConnectionTokens {
    close: bool,
    keep_alive: bool,
}

impl ConnectionTokens {
    /// One `Connection` header's value (comma-separated, case-insensitive tokens). Returns
    /// whether it names nothing but `close` and `keep-alive`: such a header has said all it
    /// has to say here and, being hop-by-hop, need not enter the message's map at all (one
    /// that names other headers does, so that [`strip_hop_by_hop`] removes them too).
    pub fn add(&mut self, value: &[u8]) -> bool {
        // The one token nearly every such header carries, without the split and trims.
        if value.eq_ignore_ascii_case(b"keep-alive") {
            self.keep_alive = true;
            return true;
        }
        let mut only_these = true;
        for t in tokens(value) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !t.is_empty() {
                only_these = false;
            }
        }
        only_these
    }

    /// Did a `close` token come?
    pub fn close(self) -> bool {
        self.close
    }

    /// May the connection carry another message after this one (RFC 9112 §9.3)? Never
    /// with `close`; otherwise HTTP/1.1 by default, HTTP/1.0 only with `keep-alive`. The
    /// same rule for a client's request and a backend's answer.
    pub fn keep_alive(self, version: http::Version) -> bool {
        !self.close && (version != http::Version::HTTP_10 || self.keep_alive)
    }
}

/// Removes hop-by-hop headers, including every header the `Connection` header names.
/// Most messages carry none or only `Connection`, so one pass over the names (compared as
/// known-header tags, no hashing) decides whether there is anything to do. Returns whether
/// `Connection` named headers that were removed (any header, `Host` included, may be named).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    let fixed = fixed_hop_by_hop();
    let mut found = [false; 7];
    let mut any = false;
    for name in headers.keys() {
        // Only names of these lengths can be one of them: most skip the seven comparisons.
        if !matches!(name.as_str().len(), 2 | 7 | 10 | 16 | 17) {
            continue;
        }
        if let Some(i) = fixed.iter().position(|f| *f == name) {
            found[i] = true;
            any = true;
        }
    }
    if !any {
        return false;
    }
    let mut named_removed = false;
    if let (true, Some(conn)) = (found[0], headers.get(header::CONNECTION)) {
        if conn.as_bytes() != b"keep-alive" && conn.as_bytes() != b"close" {
            let named: Vec<HeaderName> = headers
                .get_all(header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| tokens(v.as_bytes()))
                .filter_map(|t| HeaderName::from_bytes(t).ok())
                .collect();
            for name in named {
                named_removed |= headers.remove(name).is_some();
            }
        }
    }
    // `TE: trailers` is the one TE value that crosses hops (gRPC needs it).
    let te_trailers = found[3]
        && headers
            .get(&header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for (name, present) in fixed.into_iter().zip(found) {
        if present {
            headers.remove(name);
        }
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    named_removed
}

/// Sets the `X-Forwarded-*` headers: appends the client to `X-Forwarded-For`, and says which
/// scheme and host the client used.
pub fn add_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    tls: bool,
    host: Option<&HeaderValue>,
) {
    let xff = if headers.contains_key(&X_FORWARDED_FOR) {
        let mut ip_buf = [0u8; 64];
        let ip = format_ip(client, &mut ip_buf);
        let mut joined = Vec::with_capacity(64);
        for v in headers.get_all(&X_FORWARDED_FOR) {
            if !joined.is_empty() {
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(v.as_bytes());
        }
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(ip);
        HeaderValue::from_bytes(&joined).ok()
    } else {
        client_value(client)
    };
    if let Some(xff) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), xff);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST.clone(), h.clone());
    }
}

/// How many client addresses each worker keeps as ready `X-Forwarded-For` values.
const RECENT_CLIENTS: usize = 8;

/// The last few clients' values on one worker, replaced in turn: a keep-alive connection's
/// requests, or those of a load balancer or CDN in front, share one value instead of each
/// formatting and allocating its own.
struct RecentClients {
    next: usize,
    slots: [Option<(IpAddr, HeaderValue)>; RECENT_CLIENTS],
}

thread_local! {
    static RECENT: RefCell<RecentClients> = const {
        RefCell::new(RecentClients { next: 0, slots: [const { None }; RECENT_CLIENTS] })
    };
}

/// `client` as an `X-Forwarded-For` value, shared with this worker's earlier requests from
/// the same address when it has one of those at hand.
fn client_value(client: IpAddr) -> Option<HeaderValue> {
    RECENT.with(|r| {
        let mut r = r.borrow_mut();
        if let Some((_, v)) = r.slots.iter().flatten().find(|(ip, _)| *ip == client) {
            return Some(v.clone());
        }
        let mut buf = [0u8; 64];
        let len = format_ip(client, &mut buf).len();
        let v = shared_value(Text { buf, len })?;
        let next = r.next;
        r.slots[next] = Some((client, v.clone()));
        r.next = (next + 1) % RECENT_CLIENTS;
        Some(v)
    })
}

/// An address's text (as `format_ip` writes it) kept where its header value points.
struct Text {
    buf: [u8; 64],
    len: usize,
}

impl AsRef<[u8]> for Text {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A header value whose clones share it: one allocation, where a value made from a slice
/// takes one more on its first clone (`Bytes` moves a copied slice to shared storage then).
pub fn shared_value<T: AsRef<[u8]> + Send + 'static>(text: T) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(text)).ok()
}

fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    use std::io::Write;
    if let IpAddr::V4(v4) = ip {
        // A new client's value writes one: by hand, without the formatting machinery.
        let mut n = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[n] = b'.';
                n += 1;
            }
            if octet >= 100 {
                buf[n] = b'0' + octet / 100;
                n += 1;
            }
            if octet >= 10 {
                buf[n] = b'0' + octet / 10 % 10;
                n += 1;
            }
            buf[n] = b'0' + octet % 10;
            n += 1;
        }
        return &buf[..n];
    }
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ = write!(cursor, "{ip}");
    let n = cursor.position() as usize;
    &buf[..n]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_lengths_are_digits_only() {
        for (v, want) in [
            (&b"0"[..], Some(0)),
            (b"13", Some(13)),
            (b" 42\t", Some(42)),
            (b"0001", Some(1)),
            (b"9999999999999999999", Some(9_999_999_999_999_999_999)),
            (b"99999999999999999999", None),
            (b"18446744073709551616", None),
            (b"", None),
            (b"  ", None),
            (b"+5", None),
            (b"-5", None),
            (b"5 5", None),
            (b"0x10", None),
            (b"1,1", None),
            (b"\xd9\xa3", None),
        ] {
            assert_eq!(content_length(v), want, "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn remembered_names_answer_as_from_bytes_does() {
        // Lengths 1 to 40 (past what is remembered), names that share a slot's hash inputs
        // (first, middle and last byte, length), mixed case, and invalid names; each asked
        // three times, so the second and third come from the cache where they can.
        let mut names: Vec<Vec<u8>> = (1..=40)
            .map(|n| (0..n).map(|i| b"abcdefghij-klmnop"[i % 17]).collect())
            .collect();
        for n in [
            "Host",
            "host",
            "HOST",
            "accept",
            "Accept",
            "user-agent",
            "User-Agent",
            "content-length",
            "Content-Length",
            "content-type",
            "x-request-id",
            "x-a-b-id",
            "x-aab-id",
            "date",
            "dote",
            "server",
            "transfer-encoding",
            "x-forwarded-for",
            "bad name",
            "bad:name",
            "caf\u{e9}",
            "",
        ] {
            names.push(n.as_bytes().to_vec());
        }
        for _ in 0..3 {
            for raw in &names {
                let want = HeaderName::from_bytes(raw).ok();
                assert_eq!(name(raw).ok(), want, "{:?}", String::from_utf8_lossy(raw));
            }
        }
        // A name that evicts another from its slot, then the first again.
        for raw in [&b"x-aab-id"[..], b"x-abb-id", b"x-aab-id"] {
            assert_eq!(name(raw).ok(), HeaderName::from_bytes(raw).ok());
        }
    }

    #[test]
    fn addresses_are_written_as_std_writes_them() {
        let mut buf = [0u8; 64];
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.100.255",
            "199.9.90.109",
            "::1",
            "2001:db8::8a2e:370:7334",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(format_ip(ip, &mut buf), ip.to_string().as_bytes());
        }
    }

    #[test]
    fn connection_tokens_decide_keep_alive_and_whether_the_header_is_consumed() {
        let mut t = ConnectionTokens::default();
        assert!(t.add(b"keep-alive"));
        assert!(t.keep_alive(http::Version::HTTP_10));
        // a header that names another one stays in the map, to be stripped with it
        assert!(!t.add(b"Keep-Alive, X-Trace"));
        assert!(!ConnectionTokens::default().add(b"upgrade"));
        assert!(t.add(b" CLOSE ,"));
        assert!(!t.keep_alive(http::Version::HTTP_11));
        assert!(ConnectionTokens::default().keep_alive(http::Version::HTTP_11));
        assert!(!ConnectionTokens::default().keep_alive(http::Version::HTTP_10));
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert("connection", "X-Secret, keep-alive".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("upgrade", "h2c".parse().unwrap());
        h.insert("te", "gzip".parse().unwrap());
        h.insert("trailer", "x-sum".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn appends_forwarded_for() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "1.1.1.1".parse().unwrap());
        h.append("x-forwarded-for", "2.2.2.2".parse().unwrap());
        let host = HeaderValue::from_static("example.com");
        add_forwarded(&mut h, "10.0.0.9".parse().unwrap(), true, Some(&host));
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "example.com");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, "::1".parse().unwrap(), false, None);
        assert_eq!(h["x-forwarded-for"], "::1");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn a_recent_client_shares_its_value_and_only_the_last_few_are_kept() {
        // What another test on this thread may have left.
        RECENT.with(|r| r.borrow_mut().slots = [const { None }; RECENT_CLIENTS]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let first = client_value(ip("10.0.0.1")).unwrap();
        assert_eq!(first, "10.0.0.1");
        let again = client_value(ip("10.0.0.1")).unwrap();
        assert_eq!(again.as_bytes().as_ptr(), first.as_bytes().as_ptr());
        let v6 = client_value(ip("2001:db8::7")).unwrap();
        assert_eq!(v6, "2001:db8::7");
        assert_ne!(v6.as_bytes().as_ptr(), first.as_bytes().as_ptr());
        // Enough other clients to push 10.0.0.1 out: its next value is made afresh.
        for i in 0..RECENT_CLIENTS as u8 {
            assert_eq!(
                client_value(ip(&format!("192.0.2.{i}"))).unwrap(),
                format!("192.0.2.{i}").as_str()
            );
        }
        let later = client_value(ip("10.0.0.1")).unwrap();
        assert_eq!(later, "10.0.0.1");
        assert_ne!(later.as_bytes().as_ptr(), first.as_bytes().as_ptr());
        RECENT.with(|r| assert_eq!(r.borrow().slots.iter().flatten().count(), RECENT_CLIENTS));
    }

    #[test]
    fn recycled_maps_come_back_empty_with_their_room_and_large_ones_are_not_kept() {
        // What another test on this thread may have left.
        crate::spares::clear(&SPARES);
        let mut m = map_with_capacity(9);
        let room = m.capacity();
        m.append("x-a", HeaderValue::from_static("1"));
        m.append("x-a", HeaderValue::from_static("2")); // an extra value
        m.append("host", HeaderValue::from_static("h"));
        assert_eq!(m.len(), 3);
        recycle(m);
        let again = map_with_capacity(4);
        assert!(again.is_empty(), "{again:?}");
        assert_eq!(again.keys_len(), 0);
        assert!(again.get("x-a").is_none() && again.get("host").is_none());
        assert_eq!(again.capacity(), room, "the spare's room is reused");
        // Asked for more than the spare holds: it grows to fit.
        recycle(again);
        let grown = map_with_capacity(40);
        assert!(grown.capacity() >= 40);
        // A map grown past the cap goes back to the allocator, not to the spares.
        let mut big = map_with_capacity(0);
        for i in 0..SPARE_MAP_CAPACITY + 1 {
            big.append(
                HeaderName::from_bytes(format!("x-{i}").as_bytes()).unwrap(),
                HeaderValue::from_static("v"),
            );
        }
        assert!(big.capacity() > SPARE_MAP_CAPACITY);
        recycle(big);
        recycle(grown);
        let fresh = map_with_capacity(1);
        assert!(fresh.capacity() <= SPARE_MAP_CAPACITY && fresh.is_empty());
        // An empty map holds nothing worth keeping.
        recycle(HeaderMap::new());
        assert_eq!(crate::spares::count(&SPARES), 0);
    }
}
