//! Upgraded connections (WebSocket, or another protocol a route allows): once the backend
//! answers `101`, the client's and the backend's connections are spliced and copied both
//! ways until either side closes, the tunnel is idle for `websocket_idle_timeout`, or the
//! backend's drain (or fulcrum's shutdown) runs out of time, in which case both sides get a
//! WebSocket close frame (1001, going away) before the sockets close.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::balance::ewma::now_ns;
use crate::pool::InFlight;

/// Is this request asking to switch protocols? Returns the protocol, lower-cased.
pub fn requested_upgrade(headers: &http::HeaderMap) -> Option<String> {
    if !crate::headers::connection_has(headers, b"upgrade") {
        return None;
    }
    headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase())
}

/// After one side of a tunnel closed, how long the other may still send.
const FIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a tunnel ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Closed,
    Idle,
    Drained,
}

/// Splices the two upgraded connections. `guard` keeps the session counted as in flight on
/// its backend for as long as it lives; `close` (the backend's drain, or shutdown) ends it.
pub async fn tunnel(
    client: OnUpgrade,
    backend: OnUpgrade,
    guard: InFlight,
    idle: Duration,
    mut close: watch::Receiver<bool>,
    mut shutdown: watch::Receiver<bool>,
    open: Arc<AtomicU64>,
) -> End {
    let _open = Counted::new(open);
    let _session = Counted::new_ref(&guard.state().sessions);
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return End::Closed;
        }
    };
    let last = Arc::new(AtomicU64::new(now_ns()));
    let (mut cr, mut cw) = tokio::io::split(Tracked {
        inner: TokioIo::new(client),
        last: last.clone(),
    });
    let (mut br, mut bw) = tokio::io::split(Tracked {
        inner: TokioIo::new(backend),
        last: last.clone(),
    });
    let end = {
        // Each direction passes its end (FIN) on; once one side has closed, the other gets
        // FIN_TIMEOUT to finish (a WebSocket client waits for the server to close first).
        let c2b = async {
            let _ = tokio::io::copy(&mut cr, &mut bw).await;
            let _ = bw.shutdown().await;
        };
        let b2c = async {
            let _ = tokio::io::copy(&mut br, &mut cw).await;
            let _ = cw.shutdown().await;
        };
        let splice = async {
            tokio::pin!(c2b, b2c);
            tokio::select! {
                _ = &mut c2b => { let _ = tokio::time::timeout(FIN_TIMEOUT, b2c).await; }
                _ = &mut b2c => { let _ = tokio::time::timeout(FIN_TIMEOUT, c2b).await; }
            }
        };
        tokio::select! {
            _ = splice => End::Closed,
            _ = idle_for(&last, idle) => End::Idle,
            _ = crate::listener::stopped(&mut close) => End::Drained,
            _ = crate::listener::stopped(&mut shutdown) => End::Drained,
        }
    };
    if end != End::Closed {
        // Going away (1001): unmasked to the client, masked (as a client must) to the backend.
        let _ = cw.write_all(&[0x88, 0x02, 0x03, 0xE9]).await;
        let mask = [0x5a, 0x17, 0x3c, 0x81];
        let _ = bw
            .write_all(&[
                0x88,
                0x82,
                mask[0],
                mask[1],
                mask[2],
                mask[3],
                0x03 ^ mask[0],
                0xE9 ^ mask[1],
            ])
            .await;
        let _ = cw.shutdown().await;
        let _ = bw.shutdown().await;
        tracing::debug!(?end, "tunnel closed by fulcrum");
    }
    end
}

/// Resolves once nothing has been read either way for `idle`.
async fn idle_for(last: &AtomicU64, idle: Duration) {
    loop {
        let since = Duration::from_nanos(now_ns().saturating_sub(last.load(Ordering::Relaxed)));
        if since >= idle {
            return;
        }
        tokio::time::sleep(idle - since).await;
    }
}

/// Adds one to a gauge for its lifetime.
struct Counted<'a>(CountedRef<'a>);
enum CountedRef<'a> {
    Owned(Arc<AtomicU64>),
    Borrowed(&'a AtomicU64),
}

impl<'a> Counted<'a> {
    fn new(c: Arc<AtomicU64>) -> Counted<'a> {
        c.fetch_add(1, Ordering::Relaxed);
        Counted(CountedRef::Owned(c))
    }
    fn new_ref(c: &'a AtomicU64) -> Counted<'a> {
        c.fetch_add(1, Ordering::Relaxed);
        Counted(CountedRef::Borrowed(c))
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        match &self.0 {
            CountedRef::Owned(c) => c.fetch_sub(1, Ordering::Relaxed),
            CountedRef::Borrowed(c) => c.fetch_sub(1, Ordering::Relaxed),
        };
    }
}

/// A stream that stamps `last` whenever it reads something.
struct Tracked<S> {
    inner: S,
    last: Arc<AtomicU64>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.store(now_ns(), Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_upgrade_requests() {
        let mut h = http::HeaderMap::new();
        h.insert("connection", "keep-alive, Upgrade".parse().unwrap());
        h.insert("upgrade", "WebSocket".parse().unwrap());
        assert_eq!(requested_upgrade(&h).as_deref(), Some("websocket"));
        h.insert("connection", "keep-alive".parse().unwrap());
        assert_eq!(requested_upgrade(&h), None);
    }
}
