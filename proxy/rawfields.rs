//! Header lines kept as the bytes they came in, for the messages fulcrum's own HTTP/1.1
//! code writes: a backend's answer copied onto the client's connection, a client's request
//! onto the backend's, as they stand, minus the lines fulcrum leaves out (hop-by-hop ones, a
//! length it writes itself), instead of parsed into a `HeaderMap` and written out again name
//! by name. Building, hashing, writing and recycling those maps was about a fifth of the
//! proxy's own instructions a request, for headers nothing in the common path reads.
//!
//! Only heads fulcrum's strict parser took (`h1parse`: token names, printable values, CRLF
//! line ends, no folded lines) are kept this way, so every kept line is one a `HeaderMap`
//! would have held as it is. Whatever needs the headers as a map (compression, gRPC,
//! header-based routing, balancing and limits, forwarding headers, request ids and the
//! access log, hyper's side for HTTP/2 and TLS) turns them into one first
//! ([`RawFields::into_map`]); a header fulcrum sets over the backend's (`X-Request-Id`,
//! `Strict-Transport-Security`) cuts the backend's line ([`RawFields::remove`]). A request's
//! `Host`, `Content-Type` and `Content-Length`, which every request's way reads, go into
//! its map from the start.

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue};

use crate::headers::Span;

/// The most runs of lines left out of one head; a head that needs more takes the map
/// instead.
pub const MAX_CUTS: usize = 6;

/// What a header's name says to the framing and the hop rules (compared once, by length
/// first: most names are none of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Other,
    Date,
    ContentLength,
    TransferEncoding,
    Connection,
    /// `TE`: hop-by-hop, but `TE: trailers` crosses hops (gRPC).
    Te,
    /// `Keep-Alive`, `Proxy-Connection`, `Trailer`.
    HopByHop,
    /// Hop-by-hop too; a request that asks for one is handed to hyper.
    Upgrade,
    /// A request's; handed to hyper (`100-continue`).
    Expect,
    /// The request's fields fulcrum reads on every request's way (routing, gRPC): they go
    /// into its map, the other lines stay as they came.
    Host,
    ContentType,
}

/// Classifies a header name (any case).
#[inline]
pub fn kind(name: &[u8]) -> Kind {
    let is = |n: &[u8]| same_lowercase(name, n);
    match name.len() {
        2 if is(b"te") => Kind::Te,
        4 if is(b"date") => Kind::Date,
        4 if is(b"host") => Kind::Host,
        6 if is(b"expect") => Kind::Expect,
        7 if is(b"trailer") => Kind::HopByHop,
        7 if is(b"upgrade") => Kind::Upgrade,
        10 if is(b"connection") => Kind::Connection,
        10 if is(b"keep-alive") => Kind::HopByHop,
        12 if is(b"content-type") => Kind::ContentType,
        14 if is(b"content-length") => Kind::ContentLength,
        16 if is(b"proxy-connection") => Kind::HopByHop,
        17 if is(b"transfer-encoding") => Kind::TransferEncoding,
        _ => Kind::Other,
    }
}

/// Whether a header name (token characters) is `lower` (lowercase letters and `-`, the
/// same length) in any case, eight bytes at a time: setting bit 5 of every byte lowercases
/// a letter and leaves `-` as it is, and of all the other token characters none becomes a
/// lowercase letter or `-` by it (only CR would become `-`, and no name holds one).
#[inline]
fn same_lowercase(name: &[u8], lower: &[u8]) -> bool {
    const FOLD: u64 = 0x2020_2020_2020_2020;
    let word = |b: &[u8], at: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[at..at + 8]);
        u64::from_le_bytes(w)
    };
    let n = name.len();
    if n != lower.len() {
        return false;
    }
    if n < 8 {
        return name.iter().zip(lower).all(|(&a, &b)| a | 0x20 == b);
    }
    let mut at = 0;
    while at + 8 <= n {
        if word(name, at) | FOLD != word(lower, at) {
            return false;
        }
        at += 8;
    }
    // The last word overlaps the one before it.
    at == n || word(name, n - 8) | FOLD == word(lower, n - 8)
}

/// The header lines of one head (`head[start..end]`, each ending in CRLF), with the lines
/// left out as byte ranges inside them, in order.
#[derive(Debug, Clone)]
pub struct RawFields {
    head: Bytes,
    start: u32,
    end: u32,
    cuts: [(u32, u32); MAX_CUTS],
    n_cuts: u8,
    has_date: bool,
}

impl RawFields {
    /// The lines `head[start..end]`, all kept for now. The head back if those are not lines
    /// of it or cannot be indexed with 32 bits (never, under the client's head limit).
    pub fn new(head: Bytes, start: usize, end: usize) -> Result<RawFields, Bytes> {
        let (Ok(start32), Ok(end32)) = (u32::try_from(start), u32::try_from(end)) else {
            return Err(head);
        };
        if start > end || end > head.len() {
            return Err(head);
        }
        Ok(RawFields {
            head,
            start: start32,
            end: end32,
            cuts: [(0, 0); MAX_CUTS],
            n_cuts: 0,
            has_date: false,
        })
    }

    /// The header lines of a whole head (ending in its empty line) whose lines the parser
    /// gave as `spans`, all kept for now: from the first name to the empty line's CRLF.
    #[inline]
    pub fn of_head(head: Bytes, spans: &[Span]) -> Result<RawFields, Bytes> {
        let end = head.len().saturating_sub(2);
        let start = spans.first().map_or(end, |s| s.0);
        RawFields::new(head, start, end)
    }

    /// Leaves out the line of `spans[i]` (the spans [`RawFields::of_head`] was given): it
    /// runs from its name to the next line's (the last, to the end of the lines). False, as
    /// [`RawFields::cut`], if no more lines can be left out.
    #[inline]
    pub fn cut_line(&mut self, spans: &[Span], i: usize) -> bool {
        let to = spans.get(i + 1).map_or(self.end as usize, |s| s.0);
        self.cut(spans[i].0, to)
    }

    /// The whole head the lines are part of.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The whole head, given back (for the map, when the lines cannot be kept).
    pub fn into_head(self) -> Bytes {
        self.head
    }

    /// Leaves out the line `head[from..to]` (lines are cut in order by the parser, anywhere
    /// by [`RawFields::remove`]). False if no more lines can be left out.
    pub fn cut(&mut self, from: usize, to: usize) -> bool {
        let n = self.n_cuts as usize;
        let (from, to) = (from as u32, to as u32);
        // Adjacent cuts merge, so a run of left-out lines costs one.
        if n > 0 && self.cuts[n - 1].1 == from {
            self.cuts[n - 1].1 = to;
            return true;
        }
        if n == MAX_CUTS {
            return false;
        }
        let at = self.cuts[..n].partition_point(|c| c.0 < from);
        self.cuts.copy_within(at..n, at + 1);
        self.cuts[at] = (from, to);
        self.n_cuts += 1;
        true
    }

    /// The backend sent a `Date` (fulcrum then adds none).
    pub fn set_has_date(&mut self) {
        self.has_date = true;
    }

    pub fn has_date(&self) -> bool {
        self.has_date
    }

    fn cuts(&self) -> &[(u32, u32)] {
        &self.cuts[..self.n_cuts as usize]
    }

    /// Appends the kept lines, each with its CRLF: one copy per run between cuts.
    #[inline]
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let mut at = self.start;
        for &(from, to) in self.cuts() {
            out.extend_from_slice(&self.head[at as usize..from as usize]);
            at = to;
        }
        out.extend_from_slice(&self.head[at as usize..self.end as usize]);
    }

    /// The kept lines as text (tests).
    #[cfg(test)]
    pub(crate) fn written(&self) -> String {
        let mut out = Vec::new();
        self.write_to(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// The kept lines as `(line start, line end past its CRLF, name, value start, value
    /// end)`, the value trimmed.
    fn lines(&self) -> impl Iterator<Item = (usize, usize, &[u8], usize, usize)> + '_ {
        let head = &self.head[..self.end as usize];
        let mut at = self.start as usize;
        let mut cuts = self.cuts().iter().peekable();
        std::iter::from_fn(move || loop {
            if at >= head.len() {
                return None;
            }
            if let Some(&&(from, to)) = cuts.peek() {
                if at == from as usize {
                    at = to as usize;
                    cuts.next();
                    continue;
                }
            }
            let line_start = at;
            let rest = &head[at..];
            // Every kept line ends in CRLF (the strict parser took no other line end).
            let len = memchr::memchr(b'\n', rest)?.checked_sub(1)?;
            at += len + 2;
            let line = &rest[..len];
            let colon = memchr::memchr(b':', line)?;
            let value = &line[colon + 1..];
            let lead = value
                .iter()
                .take_while(|&&b| b == b' ' || b == b'\t')
                .count();
            let trail = value[lead..]
                .iter()
                .rev()
                .take_while(|&&b| b == b' ' || b == b'\t')
                .count();
            let v_start = line_start + colon + 1 + lead;
            return Some((
                line_start,
                at,
                &line[..colon],
                v_start,
                line_start + len - trail,
            ));
        })
    }

    /// Leaves out every line of header `name` (any case). False if that needed more cuts
    /// than a head may have: then nothing was left out, and the caller takes the map.
    pub fn remove(&mut self, name: &[u8]) -> bool {
        let free = MAX_CUTS - self.n_cuts as usize;
        let mut found = [(0usize, 0usize); MAX_CUTS];
        let mut n = 0;
        for (start, end, line_name, _, _) in self.lines() {
            if line_name.eq_ignore_ascii_case(name) {
                if n == free {
                    return false;
                }
                found[n] = (start, end);
                n += 1;
            }
        }
        for &(from, to) in &found[..n] {
            self.cut(from, to);
        }
        true
    }

    /// The kept lines as map entries, before those already in `map` (fulcrum's own, such
    /// as a sticky cookie): the map an answer would have had from the start. The values
    /// share the head's bytes.
    pub fn into_map(self, map: &mut HeaderMap) {
        let added = std::mem::replace(map, crate::headers::map_with_capacity(8));
        for (_, _, name, v_start, v_end) in self.lines() {
            let (Ok(name), Ok(value)) = (
                crate::headers::name(name),
                HeaderValue::from_maybe_shared(self.head.slice(v_start..v_end)),
            ) else {
                // Never for a head the strict parser took; left out rather than failed.
                continue;
            };
            map.append(name, value);
        }
        let mut last = None;
        for (name, value) in added {
            if let Some(n) = name {
                last = Some(n);
            }
            if let Some(n) = &last {
                map.append(n.clone(), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-Id:  a b \t\r\n\r\n";

    /// The head's header lines, each as `(start, end)` with its CRLF.
    fn line_ranges(head: &[u8]) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let mut at = head.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
        while &head[at..at + 2] != b"\r\n" {
            let len = head[at..].windows(2).position(|w| w == b"\r\n").unwrap();
            out.push((at, at + len + 2));
            at += len + 2;
        }
        out
    }

    fn fields(cut: &[usize]) -> RawFields {
        let lines = line_ranges(HEAD);
        let mut raw = RawFields::new(
            Bytes::from_static(HEAD),
            lines[0].0,
            lines.last().unwrap().1,
        )
        .unwrap();
        for &i in cut {
            assert!(raw.cut(lines[i].0, lines[i].1));
        }
        raw
    }

    #[test]
    fn names_are_classified_in_any_case() {
        for (name, k) in [
            (&b"TE"[..], Kind::Te),
            (b"date", Kind::Date),
            (b"Trailer", Kind::HopByHop),
            (b"UPGRADE", Kind::Upgrade),
            (b"Host", Kind::Host),
            (b"hosts", Kind::Other),
            (b"Expect", Kind::Expect),
            (b"Connection", Kind::Connection),
            (b"Keep-Alive", Kind::HopByHop),
            (b"content-length", Kind::ContentLength),
            (b"Proxy-Connection", Kind::HopByHop),
            (b"Transfer-Encoding", Kind::TransferEncoding),
            (b"Content-Type", Kind::ContentType),
            (b"Content-Typo", Kind::Other),
            (b"dates", Kind::Other),
            (b"tf", Kind::Other),
            (b"", Kind::Other),
            (b"Content-Lengtx", Kind::Other),
            (b"xontent-length", Kind::Other),
            (b"transfer-encodin_", Kind::Other),
            (b"c\ronnection", Kind::Other),
            (b"Date", Kind::Date),
            (b"DATE", Kind::Date),
            (b"d@te", Kind::Other),
        ] {
            assert_eq!(kind(name), k, "{}", String::from_utf8_lossy(name));
        }
    }

    /// The word compare agrees with a byte-by-byte case-insensitive compare for every
    /// token-character name of the lengths that matter, against each name it looks for.
    #[test]
    fn the_word_compare_is_exact_for_token_names() {
        const TOKEN: &[u8] =
            b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
        let targets: [&[u8]; 12] = [
            b"te",
            b"date",
            b"host",
            b"expect",
            b"content-type",
            b"trailer",
            b"upgrade",
            b"connection",
            b"keep-alive",
            b"content-length",
            b"proxy-connection",
            b"transfer-encoding",
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for target in targets {
            // Every single-byte change of the target, and seeded random near-misses.
            for at in 0..target.len() {
                for &c in TOKEN {
                    let mut name = target.to_vec();
                    name[at] = c;
                    assert_eq!(
                        same_lowercase(&name, target),
                        name.eq_ignore_ascii_case(target)
                    );
                }
            }
            for _ in 0..2000 {
                let mut name = target.to_vec();
                for b in name.iter_mut() {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    match seed >> 62 {
                        0 => *b = TOKEN[(seed >> 33) as usize % TOKEN.len()],
                        1 => *b = b.to_ascii_uppercase(),
                        _ => {}
                    }
                }
                assert_eq!(
                    same_lowercase(&name, target),
                    name.eq_ignore_ascii_case(target)
                );
            }
        }
    }

    #[test]
    fn kept_lines_are_written_as_they_came_and_cut_lines_are_not() {
        assert_eq!(
            fields(&[]).written(),
            "Server: nginx\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\nContent-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-Id:  a b \t\r\n"
        );
        // Adjacent cuts merge into one.
        let raw = fields(&[3, 4]);
        assert_eq!(raw.cuts().len(), 1);
        assert_eq!(
            raw.written(),
            "Server: nginx\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\nContent-Type: text/plain\r\nX-Id:  a b \t\r\n"
        );
        assert_eq!(
            fields(&[0, 2, 5]).written(),
            "Date: Sun, 29 Nov 2026 10:00:00 GMT\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
        );
        assert_eq!(fields(&[0, 1, 2, 3, 4, 5]).written(), "");
    }

    #[test]
    fn removing_a_header_cuts_its_lines_wherever_they_are() {
        let mut raw = fields(&[4]);
        assert!(raw.remove(b"content-TYPE"));
        assert!(raw.remove(b"server"));
        assert!(raw.remove(b"absent"));
        assert_eq!(
            raw.written(),
            "Date: Sun, 29 Nov 2026 10:00:00 GMT\r\nContent-Length: 5\r\nX-Id:  a b \t\r\n"
        );
        // Cuts stay in order, so the map sees what was written.
        let mut map = HeaderMap::new();
        raw.into_map(&mut map);
        let names: Vec<&str> = map.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["date", "content-length", "x-id"]);
    }

    #[test]
    fn a_head_needing_too_many_cuts_says_so_and_keeps_its_lines() {
        let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
        for i in 0..8 {
            head.extend_from_slice(format!("X-A: {i}\r\nX-B: {i}\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let end = head.len() - 2;
        let mut raw = RawFields::new(Bytes::from(head), 17, end).unwrap();
        let before = raw.written();
        assert!(!raw.remove(b"x-a"));
        assert_eq!(raw.written(), before);
        let mut map = HeaderMap::new();
        raw.into_map(&mut map);
        assert_eq!(map.get_all("x-a").iter().count(), 8);
    }

    #[test]
    fn the_map_holds_the_kept_lines_trimmed_then_the_added_headers() {
        let raw = fields(&[3, 4]);
        let mut map = HeaderMap::new();
        map.append("set-cookie", HeaderValue::from_static("a=1"));
        map.append("set-cookie", HeaderValue::from_static("b=2"));
        map.append("server", HeaderValue::from_static("fulcrum"));
        raw.into_map(&mut map);
        let pairs: Vec<(String, String)> = map
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("server", "nginx"),
                ("server", "fulcrum"),
                ("date", "Sun, 29 Nov 2026 10:00:00 GMT"),
                ("content-type", "text/plain"),
                ("x-id", "a b"),
                ("set-cookie", "a=1"),
                ("set-cookie", "b=2"),
            ]
            .map(|(n, v)| (n.to_string(), v.to_string()))
        );
    }
}
