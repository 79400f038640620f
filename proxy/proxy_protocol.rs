//! The PROXY protocol (v1 text and v2 binary, as HAProxy defines it): an L4 balancer in
//! front of fulcrum prefixes each connection with the real client's address. A listener
//! with `proxy_protocol = true` reads it before anything else, and only from peers in its
//! `trusted_proxies`; from anyone else, or without a valid header, the connection is closed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_MAX: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    #[error("no PROXY protocol header")]
    Missing,
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(&'static str),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Reads the header off `stream`, consuming exactly its bytes. Returns the client address
/// it names, or `None` for a `LOCAL`/`UNKNOWN` header (health checks from the balancer).
pub async fn read_header(stream: &mut TcpStream) -> Result<Option<SocketAddr>, HeaderError> {
    let mut peek = [0u8; 16];
    let n = peek_at_least(stream, &mut peek, 8).await?;
    if n >= 12 && peek[..12] == V2_SIGNATURE {
        let n = peek_at_least(stream, &mut peek, 16).await?;
        if n < 16 {
            return Err(HeaderError::Malformed("v2 header cut short"));
        }
        let len = u16::from_be_bytes([peek[14], peek[15]]) as usize;
        let mut buf = vec![0u8; 16 + len];
        stream.read_exact(&mut buf).await?;
        return parse_v2(&buf);
    }
    if &peek[..6] != b"PROXY " {
        return Err(HeaderError::Missing);
    }
    // v1: read up to the CRLF, byte by byte (at most 107), so nothing after it is taken.
    let mut line = Vec::with_capacity(V1_MAX);
    loop {
        let b = stream.read_u8().await?;
        line.push(b);
        if line.ends_with(b"\r\n") {
            break;
        }
        if line.len() >= V1_MAX {
            return Err(HeaderError::Malformed("v1 header longer than 107 bytes"));
        }
    }
    parse_v1(&line)
}

async fn peek_at_least(stream: &TcpStream, buf: &mut [u8], want: usize) -> std::io::Result<usize> {
    for _ in 0..50 {
        let n = stream.peek(buf).await?;
        if n >= want || n == 0 {
            return Ok(n);
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    stream.peek(buf).await
}

pub fn parse_v1(line: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    let text = std::str::from_utf8(line).map_err(|_| HeaderError::Malformed("v1 not text"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or(HeaderError::Malformed("v1 without CRLF"))?;
    let parts: Vec<&str> = text.split(' ').collect();
    match parts.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src
                .parse()
                .map_err(|_| HeaderError::Malformed("v1 source address"))?;
            if (*proto == "TCP4") != ip.is_ipv4() {
                return Err(HeaderError::Malformed("v1 address family"));
            }
            let port: u16 = sport
                .parse()
                .map_err(|_| HeaderError::Malformed("v1 source port"))?;
            Ok(Some(SocketAddr::new(ip, port)))
        }
        _ => Err(HeaderError::Malformed("v1 fields")),
    }
}

pub fn parse_v2(buf: &[u8]) -> Result<Option<SocketAddr>, HeaderError> {
    if buf.len() < 16 || buf[..12] != V2_SIGNATURE {
        return Err(HeaderError::Malformed("v2 signature"));
    }
    if buf[12] >> 4 != 2 {
        return Err(HeaderError::Malformed("v2 version"));
    }
    let command = buf[12] & 0x0f;
    let body = &buf[16..];
    if command == 0 {
        return Ok(None); // LOCAL: the balancer itself
    }
    if command != 1 {
        return Err(HeaderError::Malformed("v2 command"));
    }
    match buf[13] {
        0x11 if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Ok(Some(SocketAddr::new(IpAddr::V4(ip), port)))
        }
        0x21 if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port)))
        }
        0x00 => Ok(None), // UNSPEC
        _ => Err(HeaderError::Malformed("v2 address family or length")),
    }
}

/// A v2 header for `src` → `dst` (used by tests and by anyone forwarding to fulcrum).
pub fn v2_header(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21);
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            h.push(0x11);
            h.extend_from_slice(&12u16.to_be_bytes());
            h.extend_from_slice(&s.ip().octets());
            h.extend_from_slice(&d.ip().octets());
            h.extend_from_slice(&s.port().to_be_bytes());
            h.extend_from_slice(&d.port().to_be_bytes());
        }
        _ => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            h.push(0x21);
            h.extend_from_slice(&36u16.to_be_bytes());
            h.extend_from_slice(&v6(src).octets());
            h.extend_from_slice(&v6(dst).octets());
            h.extend_from_slice(&src.port().to_be_bytes());
            h.extend_from_slice(&dst.port().to_be_bytes());
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_lines() {
        let a = parse_v1(b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n").unwrap();
        assert_eq!(a, Some("203.0.113.7:56324".parse().unwrap()));
        let a = parse_v1(b"PROXY TCP6 2001:db8::1 ::1 4000 443\r\n").unwrap();
        assert_eq!(a, Some("[2001:db8::1]:4000".parse().unwrap()));
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n").unwrap(), None);
        for bad in [
            &b"PROXY TCP4 nope 1.1.1.1 1 2\r\n"[..],
            b"PROXY TCP4 ::1 ::1 1 2\r\n",
            b"PROXY TCP4 1.1.1.1\r\n",
        ] {
            assert!(parse_v1(bad).is_err());
        }
    }

    #[test]
    fn v2_round_trip() {
        let src: SocketAddr = "198.51.100.9:1234".parse().unwrap();
        let dst: SocketAddr = "10.0.0.1:80".parse().unwrap();
        assert_eq!(parse_v2(&v2_header(src, dst)).unwrap(), Some(src));
        let src6: SocketAddr = "[2001:db8::9]:1234".parse().unwrap();
        assert_eq!(
            parse_v2(&v2_header(src6, "[::1]:80".parse().unwrap())).unwrap(),
            Some(src6)
        );
        let mut local = v2_header(src, dst);
        local[12] = 0x20;
        assert_eq!(parse_v2(&local).unwrap(), None);
    }
}
