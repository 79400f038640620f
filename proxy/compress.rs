//! Response compression (per route, `compression = true`): gzip or brotli, chosen from the
//! client's `Accept-Encoding`, for compressible content types the backend did not already
//! encode. Streaming: the encoder reads the backend's body as it arrives and each compressed
//! chunk goes out as soon as the encoder yields it; nothing is buffered whole.

use std::pin::Pin;

use bytes::Bytes;
use futures_util::StreamExt;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use crate::body::Body;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Brotli,
    Gzip,
}

/// Bodies this small are sent as they are.
const MIN_SIZE: u64 = 256;

/// The encoding to use, if the response should be compressed.
pub fn choose(method: &Method, request: &HeaderMap, resp: &Response<Body>) -> Option<Encoding> {
    if method == Method::HEAD
        || resp.status() != StatusCode::OK
        || resp.headers().contains_key(header::CONTENT_ENCODING)
        || resp
            .headers()
            .get(header::CACHE_CONTROL)
            .is_some_and(|v| v.as_bytes().windows(12).any(|w| w == b"no-transform"))
        || http_body::Body::size_hint(resp.body())
            .exact()
            .is_some_and(|n| n < MIN_SIZE)
    {
        return None;
    }
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)?
        .to_str()
        .ok()?
        .to_ascii_lowercase();
    let compressible = ct.starts_with("text/")
        || ["json", "javascript", "xml", "svg", "wasm", "csv"]
            .iter()
            .any(|t| ct.contains(t));
    if !compressible {
        return None;
    }
    let accept = request
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",");
    let offers = |name: &str| {
        accept.split(',').any(|item| {
            let mut parts = item.trim().split(';');
            parts
                .next()
                .is_some_and(|n| n.trim().eq_ignore_ascii_case(name))
                && !parts.any(|p| p.trim().replace(' ', "") == "q=0")
        })
    };
    if offers("br") {
        Some(Encoding::Brotli)
    } else if offers("gzip") {
        Some(Encoding::Gzip)
    } else {
        None
    }
}

/// Wraps the response body in the encoder and fixes the headers.
pub fn compress(resp: Response<Body>, encoding: Encoding) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    let data = http_body_util::BodyDataStream::new(body).map(|r| r.map_err(std::io::Error::other));
    let reader = tokio_util::io::StreamReader::new(data);
    let encoder: Pin<Box<dyn tokio::io::AsyncRead + Send>> = match encoding {
        Encoding::Gzip => Box::pin(async_compression::tokio::bufread::GzipEncoder::new(reader)),
        Encoding::Brotli => Box::pin(
            async_compression::tokio::bufread::BrotliEncoder::with_quality(
                reader,
                async_compression::Level::Precise(4),
            ),
        ),
    };
    let stream: Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send>> =
        Box::pin(tokio_util::io::ReaderStream::new(encoder));
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static(match encoding {
            Encoding::Gzip => "gzip",
            Encoding::Brotli => "br",
        }),
    );
    parts
        .headers
        .append(header::VARY, HeaderValue::from_static("accept-encoding"));
    Response::from_parts(parts, Body::Compressed(stream))
}
