//! The one body type fulcrum sends both ways: a streamed hyper body (with the backend's
//! in-flight guard riding along until the stream ends), or a small body fulcrum made itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use crate::upstream::UpstreamBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

use crate::pool::InFlight;

/// A client's request body: streamed by hyper (HTTP/2, TLS, chunked or large uploads), or
/// read whole by fulcrum's own HTTP/1.1 server side (`http1.rs`, bodies up to 64 KiB).
pub enum RequestBody {
    Hyper(Incoming),
    Full(Option<Bytes>),
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(Into::into))),
            RequestBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Hyper(b) => b.is_end_stream(),
            RequestBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Hyper(b) => b.size_hint(),
            RequestBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

pub enum Body {
    /// Streamed from the other side, never buffered whole.
    Stream {
        inner: UpstreamBody,
        /// Keeps the backend's in-flight count up until the last byte (or the body is dropped).
        guard: Option<InFlight>,
    },
    /// A body fulcrum wrote (errors, admin answers).
    Full(Option<Bytes>),
    /// Any body, counted for the access log; the line is written when this ends.
    Logged(Box<Body>, Option<crate::accesslog::Entry>),
    /// Bytes already read, then the rest of a streamed body.
    Prefixed(Option<Bytes>, RequestBody),
    /// Compressed on the fly (`compress.rs`).
    Compressed(std::pin::Pin<Box<dyn futures_util::Stream<Item = std::io::Result<Bytes>> + Send>>),
}

impl Body {
    pub fn empty() -> Body {
        Body::Full(None)
    }

    pub fn full(b: impl Into<Bytes>) -> Body {
        let b = b.into();
        Body::Full(if b.is_empty() { None } else { Some(b) })
    }

    /// A client's request body, passed on as it arrives.
    pub fn stream(inner: RequestBody) -> Body {
        match inner {
            RequestBody::Hyper(inner) => Body::Stream {
                inner: UpstreamBody::Hyper(inner),
                guard: None,
            },
            RequestBody::Full(b) => Body::Full(b),
        }
    }

    /// A backend's header lines kept as bytes (`rawfields`), if this answer's body carries
    /// them (through the access log's wrapper).
    pub fn raw_mut(&mut self) -> Option<&mut crate::rawfields::RawFields> {
        match self {
            Body::Stream { inner, .. } => inner.raw_mut(),
            Body::Logged(inner, _) => inner.raw_mut(),
            _ => None,
        }
    }

    /// The kept header lines, taken out (to be written, or put into the map).
    pub fn take_raw(&mut self) -> Option<crate::rawfields::RawFields> {
        match self {
            Body::Stream { inner, .. } => inner.take_raw(),
            Body::Logged(inner, _) => inner.take_raw(),
            _ => None,
        }
    }

    pub fn with_guard(inner: UpstreamBody, guard: InFlight) -> Body {
        Body::Stream {
            inner,
            guard: Some(guard),
        }
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Stream { inner, guard } => {
                let r = Pin::new(inner).poll_frame(cx);
                if let Poll::Ready(None) | Poll::Ready(Some(Err(_))) = r {
                    guard.take();
                }
                r
            }
            Body::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Body::Prefixed(prefix, inner) => match prefix.take() {
                Some(b) if !b.is_empty() => Poll::Ready(Some(Ok(Frame::data(b)))),
                _ => Pin::new(inner).poll_frame(cx),
            },
            Body::Compressed(stream) => match stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(b))) => Poll::Ready(Some(Ok(Frame::data(b)))),
                Poll::Ready(Some(Err(e))) => {
                    // The backend's body failed mid-way: end here (the client sees a cut
                    // stream, which the compression format lets it detect).
                    tracing::debug!(error = %e, "compressed body ended early");
                    Poll::Ready(None)
                }
                Poll::Ready(None) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            },
            Body::Logged(inner, entry) => {
                let r = Pin::new(inner.as_mut()).poll_frame(cx);
                match &r {
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(d), Some(e)) = (f.data_ref(), entry.as_mut()) {
                            e.bytes += d.len() as u64;
                        }
                    }
                    Poll::Ready(None) | Poll::Ready(Some(Err(_))) => {
                        entry.take();
                    }
                    Poll::Pending => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Stream { inner, .. } => inner.is_end_stream(),
            Body::Full(b) => b.is_none(),
            Body::Logged(inner, _) => inner.is_end_stream(),
            Body::Compressed(_) => false,
            Body::Prefixed(prefix, inner) => {
                prefix.as_ref().is_none_or(|b| b.is_empty()) && inner.is_end_stream()
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Stream { inner, .. } => inner.size_hint(),
            Body::Full(None) => SizeHint::with_exact(0),
            Body::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            Body::Logged(inner, _) => inner.size_hint(),
            Body::Compressed(_) | Body::Prefixed(..) => SizeHint::default(),
        }
    }
}
