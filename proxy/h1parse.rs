//! A parser for the plain HTTP/1.1 heads that make up nearly all traffic: a request or
//! status line and `name: value` lines of printable ASCII, each ended by CRLF.
//!
//! Why not only `httparse`: it handles every variant the RFCs allow (bare LF, obs-text,
//! leading empty lines) through runtime-dispatched SIMD built for long lines, and on the
//! short lines of real heads spends about 280 instructions a header, an eighth of fulcrum's
//! own work per proxied request (request and answer). Here a line costs a table lookup per
//! name byte and a word-at-a-time scan of the value.
//!
//! It accepts a strict subset of what `httparse` accepts, and for what it accepts gives the
//! same result (a property test checks both). Anything else — a byte it does not expect,
//! a head that is not complete yet, more lines than it keeps — is `None`, and the caller
//! asks `httparse`, which decides: the fast path never accepts what `httparse` would refuse.

use crate::headers::Spans;

/// The most header lines this parser keeps; a head with more goes to `httparse`.
const MAX_FIELDS: usize = 64;

/// `tchar` (RFC 9110 §5.6.2): the bytes of a method or a header name.
static TOKEN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        b += 1;
    }
    t
};

/// A request line's parts, as offsets into the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLine {
    pub method: (usize, usize),
    pub target: (usize, usize),
    /// The minor version: 1 for HTTP/1.1, 0 for HTTP/1.0 (as `httparse` has it).
    pub version: u8,
}

/// A status line's parts (the reason phrase is not kept: fulcrum writes its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusLine {
    pub code: u16,
    pub version: u8,
}

/// Parses a complete request head at the start of `buf`, its header lines into `spans`
/// (which it empties first). Returns the line and the head's length, or `None` for
/// `httparse` to decide.
pub fn request(buf: &[u8], spans: &mut Spans) -> Option<(RequestLine, usize)> {
    let mut i = 0;
    let method = token(buf, &mut i)?;
    if *buf.get(i)? != b' ' {
        return None;
    }
    i += 1;
    let start = i;
    // The request target: visible ASCII (`httparse` takes obs-text here too).
    while (0x21..0x7f).contains(buf.get(i)?) {
        i += 1;
    }
    let target = (start, i - start);
    if target.1 == 0 || buf[i] != b' ' {
        return None;
    }
    i += 1;
    let version = match buf.get(i..i + 10)? {
        b"HTTP/1.1\r\n" => 1,
        b"HTTP/1.0\r\n" => 0,
        _ => return None,
    };
    i += 10;
    let len = fields(buf, i, spans)?;
    Some((
        RequestLine {
            method,
            target,
            version,
        },
        len,
    ))
}

/// Parses a complete response head at the start of `buf`, as [`request`] does.
pub fn response(buf: &[u8], spans: &mut Spans) -> Option<(StatusLine, usize)> {
    let version = match buf.get(..9)? {
        b"HTTP/1.1 " => 1,
        b"HTTP/1.0 " => 0,
        _ => return None,
    };
    let mut code = 0u16;
    for &d in buf.get(9..12)? {
        if !d.is_ascii_digit() {
            return None;
        }
        code = code * 10 + u16::from(d - b'0');
    }
    if *buf.get(12)? != b' ' {
        return None;
    }
    // The reason phrase: tab and printable ASCII, as a value (`httparse` takes obs-text too).
    let i = value_end(buf, 13)?;
    if *buf.get(i + 1)? != b'\n' {
        return None;
    }
    let len = fields(buf, i + 2, spans)?;
    Some((StatusLine { code, version }, len))
}

/// Where the header lines `httparse` parsed out of `buf` sit in it, as `spans` (emptied
/// first): the fallback's answer in the fast path's form, so both feed the same code.
pub fn spans_of(buf: &[u8], headers: &[httparse::Header<'_>], spans: &mut Spans) {
    let base = buf.as_ptr() as usize;
    spans.clear();
    for h in headers {
        let (name, value) = (h.name.as_bytes(), h.value);
        spans.push((
            name.as_ptr() as usize - base,
            name.len(),
            value.as_ptr() as usize - base,
            value.len(),
        ));
    }
}

/// One or more token bytes from `*i`, leaving `*i` past them.
#[inline]
fn token(buf: &[u8], i: &mut usize) -> Option<(usize, usize)> {
    let start = *i;
    while TOKEN[*buf.get(*i)? as usize] {
        *i += 1;
    }
    (*i > start).then_some((start, *i - start))
}

/// The header lines from `i` up to and including the empty line; returns the head's length.
fn fields(buf: &[u8], mut i: usize, spans: &mut Spans) -> Option<usize> {
    spans.clear();
    loop {
        if *buf.get(i)? == b'\r' {
            return (*buf.get(i + 1)? == b'\n').then_some(i + 2);
        }
        let (name_at, name_len) = token(buf, &mut i)?;
        if buf[i] != b':' {
            return None;
        }
        i += 1;
        while matches!(*buf.get(i)?, b' ' | b'\t') {
            i += 1;
        }
        let value_at = i;
        i = value_end(buf, i)?;
        if *buf.get(i + 1)? != b'\n' {
            return None;
        }
        // Trailing whitespace is not part of the value.
        let mut end = i;
        while end > value_at && matches!(buf[end - 1], b' ' | b'\t') {
            end -= 1;
        }
        if spans.len() == MAX_FIELDS {
            return None;
        }
        spans.push((name_at, name_len, value_at, end - value_at));
        i += 2;
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The index of the `\r` that ends the value starting at `i`: every byte before it a tab or
/// printable ASCII. `None` at any other byte, or if the buffer ends first.
#[inline]
fn value_end(buf: &[u8], mut i: usize) -> Option<usize> {
    loop {
        // Eight bytes a step: flags each byte below 0x20, equal to 0x7f, or above it. The
        // lowest flag is exact (borrows only carry upwards), and that is the one used.
        while let Some(word) = buf.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().ok()?);
            let control = w.wrapping_sub(0x20 * ONES) & !w;
            let del = (w ^ (0x7f * ONES)).wrapping_sub(ONES) & !(w ^ (0x7f * ONES));
            let flags = (control | del | w) & HIGH;
            if flags != 0 {
                i += (flags.trailing_zeros() / 8) as usize;
                break;
            }
            i += 8;
        }
        match *buf.get(i)? {
            b'\r' => return Some(i),
            b'\t' | 0x20..=0x7e => i += 1,
            _ => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::Span;

    /// What `httparse` makes of a request head: line, fields (as spans), length.
    fn reference_request(buf: &[u8]) -> Option<(RequestLine, Vec<Span>, usize)> {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut r = httparse::Request::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = r.parse(buf) else {
            return None;
        };
        let at = |s: &[u8]| s.as_ptr() as usize - buf.as_ptr() as usize;
        let (m, p) = (r.method?.as_bytes(), r.path?.as_bytes());
        let line = RequestLine {
            method: (at(m), m.len()),
            target: (at(p), p.len()),
            version: r.version?,
        };
        Some((line, reference_fields(buf, r.headers), n))
    }

    /// httparse's header lines as the fast parser's spans, through the fallback's own
    /// conversion.
    fn reference_fields(buf: &[u8], headers: &[httparse::Header<'_>]) -> Vec<Span> {
        let mut spans = Spans::new();
        spans_of(buf, headers, &mut spans);
        normalised(&spans)
    }

    fn reference_response(buf: &[u8]) -> Option<(StatusLine, Vec<Span>, usize)> {
        let mut headers = [httparse::EMPTY_HEADER; 100];
        let mut r = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(n)) = r.parse(buf) else {
            return None;
        };
        let line = StatusLine {
            code: r.code?,
            version: r.version?,
        };
        Some((line, reference_fields(buf, r.headers), n))
    }

    /// The spans with every empty value's offset zeroed: httparse points an empty value
    /// anywhere in its line, so empty values are compared by length alone.
    fn normalised(spans: &Spans) -> Vec<Span> {
        spans
            .as_slice()
            .iter()
            .map(|&(n, nl, v, vl)| (n, nl, if vl == 0 { 0 } else { v }, vl))
            .collect()
    }

    /// The property: whatever the fast parser accepts, `httparse` accepts with the same
    /// parts; what it declines, it declines whole.
    fn agrees(buf: &[u8]) -> bool {
        let mut spans = Spans::new();
        let fast = request(buf, &mut spans).map(|(l, n)| (l, normalised(&spans), n));
        if let Some(fast) = &fast {
            assert_eq!(
                Some(fast),
                reference_request(buf).as_ref(),
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
        let mut spans = Spans::new();
        let fast_r = response(buf, &mut spans).map(|(l, n)| (l, normalised(&spans), n));
        if let Some(fast_r) = &fast_r {
            assert_eq!(
                Some(fast_r),
                reference_response(buf).as_ref(),
                "{:?}",
                String::from_utf8_lossy(buf)
            );
        }
        fast.is_some() || fast_r.is_some()
    }

    const REQUESTS: &[&[u8]] = &[
        b"GET / HTTP/1.1\r\naccept: */*\r\naccept-encoding: gzip, compress, deflate, br\r\nuser-agent: oha/1.16.0\r\nhost: 127.0.0.1:8080\r\n\r\n",
        b"GET /index.html?a=1&b=%20 HTTP/1.1\r\nHost: localhost:8080\r\n\r\n",
        b"POST /api/v1/items HTTP/1.0\r\nContent-Length: 5\r\nX-Empty:\r\nX-Pad: \t v \t \r\nCookie: a=b; c=d\r\n\r\nhello",
        b"OPTIONS * HTTP/1.1\r\n\r\n",
    ];
    const RESPONSES: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 07:31:07 GMT\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n",
        b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 \r\nx:\t\r\n\r\n",
    ];

    #[test]
    fn plain_heads_parse_as_httparse_parses_them() {
        for &head in REQUESTS.iter().chain(RESPONSES) {
            assert!(agrees(head), "{:?}", String::from_utf8_lossy(head));
        }
        let mut spans = Spans::new();
        let (line, n) = request(REQUESTS[0], &mut spans).unwrap();
        assert_eq!(n, REQUESTS[0].len());
        assert_eq!(line.version, 1);
        assert_eq!(&REQUESTS[0][line.method.0..][..line.method.1], b"GET");
        assert_eq!(spans.len(), 4);
        let (status, n) = response(RESPONSES[0], &mut spans).unwrap();
        assert_eq!((status.code, status.version), (200, 1));
        assert_eq!(n, RESPONSES[0].len() - 3);
        assert_eq!(spans.len(), 5);
    }

    #[test]
    fn anything_unusual_is_left_to_httparse() {
        for head in [
            // incomplete
            &b"GET / HTTP/1.1\r\nHost: x\r\n"[..],
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
            b"GET / HTT",
            // bare LF, obs-fold, obs-text, leading empty line, spaces
            b"GET / HTTP/1.1\nHost: x\n\n",
            b"GET / HTTP/1.1\r\nX-A: 1\r\n  folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: caf\xc3\xa9\r\n\r\n",
            b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\n\r\n",
            b"GET  / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A : 1\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            // refused by httparse too
            b"GET / HTTP/1.1\r\nX-A: a\x01b\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\x7fb\r\n\r\n",
            b"GET / HTTP/1.1\r\nX-A: a\rb\r\n\r\n",
            b"GET / HTTP/1.1\r\n: empty name\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 200\r\n\r\n",
        ] {
            let mut spans = Spans::new();
            assert!(
                request(head, &mut spans).is_none() && response(head, &mut spans).is_none(),
                "{:?}",
                String::from_utf8_lossy(head)
            );
        }
        // More lines than kept: declined (httparse takes up to its slots).
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_FIELDS {
            many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(request(&many, &mut Spans::new()).is_none());
    }

    /// Values of every length around the word size, with a stop byte at every place: the
    /// word scan must find the same end as a byte-by-byte look.
    #[test]
    fn the_word_scan_stops_where_a_byte_scan_would() {
        for len in 0..40 {
            for stop in [b'\r', b'\n', 0x00, 0x1f, 0x7f, 0x80, 0xff, b'\t'] {
                for at in 0..=len {
                    let mut v: Vec<u8> = (0..len).map(|k| b'a' + (k % 26) as u8).collect();
                    v.insert(at, stop);
                    v.extend_from_slice(b"\r\n");
                    let expected = v
                        .iter()
                        .position(|&b| !(b == b'\t' || (0x20..0x7f).contains(&b)))
                        .filter(|&p| v[p] == b'\r');
                    assert_eq!(
                        value_end(&v, 0),
                        expected,
                        "len {len} stop {stop:#x} at {at}"
                    );
                }
            }
        }
    }

    /// Seeded random heads built from plain parts and mutated a byte at a time: the fast
    /// parser either agrees with `httparse` or declines, never disagrees.
    #[test]
    fn random_heads_agree_with_httparse() {
        let rng = crate::balance::random::SplitMix::new(0x5eed_f00d);
        let below = |n: usize| (rng.next() % n as u64) as usize;
        let mut accepted = 0;
        let alphabet: &[u8] = b"aZ09-_:; /\t\r\n\x00\x7f\x80\xff,.=\"%*";
        for round in 0..20_000 {
            let base = if round % 2 == 0 {
                REQUESTS[below(REQUESTS.len())]
            } else {
                RESPONSES[below(RESPONSES.len())]
            };
            let mut head = base.to_vec();
            for _ in 0..below(3) {
                let at = below(head.len());
                let b = alphabet[below(alphabet.len())];
                match below(3) {
                    0 => head[at] = b,
                    1 => head.insert(at, b),
                    _ => {
                        head.remove(at);
                    }
                }
            }
            if agrees(&head) {
                accepted += 1;
            }
        }
        // Most unmutated or harmlessly mutated heads take the fast path.
        assert!(accepted > 5_000, "{accepted}");
    }
}
