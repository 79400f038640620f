//! fulcrum's own HTTP/1.1 server side, on raw sockets: pipelining, HTTP/1.0, HEAD, framing
//! of answers, small bodies read whole, hand-over to hyper in the middle of a connection,
//! the idle timeout, shutdown closing idle keep-alive connections, and idle connections parked
//! off their tasks (`idle_park_after`) and resumed by their next request.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One response read off `s`: (head, body). Understands lengths, chunks and HEAD.
async fn response(s: &mut TcpStream, pending: &mut Vec<u8>, head_only: bool) -> (String, Vec<u8>) {
    async fn fill(s: &mut TcpStream, pending: &mut Vec<u8>) {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("response timed out")
            .unwrap();
        assert!(
            n > 0,
            "connection closed early: {:?}",
            String::from_utf8_lossy(pending)
        );
        pending.extend_from_slice(&chunk[..n]);
    }
    let end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, pending).await;
    };
    let head = String::from_utf8(pending.drain(..end).collect()).unwrap();
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if head_only {
        return (head, body);
    }
    if let Some(n) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let n: usize = n.trim().parse().unwrap();
        while pending.len() < n {
            fill(s, pending).await;
        }
        body.extend(pending.drain(..n));
    } else if lower.contains("transfer-encoding: chunked") {
        loop {
            let line_end = loop {
                if let Some(i) = pending.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                fill(s, pending).await;
            };
            let size = usize::from_str_radix(
                std::str::from_utf8(&pending[..line_end]).unwrap().trim(),
                16,
            )
            .unwrap();
            pending.drain(..line_end + 2);
            while pending.len() < size + 2 {
                fill(s, pending).await;
            }
            body.extend(pending.drain(..size));
            pending.drain(..2);
            if size == 0 {
                break;
            }
        }
    }
    (head, body)
}

async fn closed(s: &mut TcpStream, within: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(within, s.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// `n` connections that have each made one request and stay open, idle.
async fn kept_alive(p: &TestProxy, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let mut s = TcpStream::connect(p.running.addr("http")).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut pending = Vec::new();
        response(&mut s, &mut pending, false).await;
        conns.push(s);
    }
    conns
}

/// Shuts `p` down: the drain is clean and quick, and every idle connection is closed.
async fn drains_and_closes(p: TestProxy, idle: &mut [TcpStream]) {
    let started = Instant::now();
    assert!(p.running.shutdown().await, "the drain was not clean");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for s in idle {
        assert!(closed(s, Duration::from_secs(1)).await);
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_with_head_framed_right() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let mut s = TcpStream::connect(p.running.addr("http")).await.unwrap();
    s.write_all(
        b"GET /bytes/5 HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let mut pending = Vec::new();
    let (h1, b1) = response(&mut s, &mut pending, false).await;
    assert!(h1.starts_with("HTTP/1.1 200 OK\r\n"), "{h1}");
    assert!(h1.to_ascii_lowercase().contains("\r\ndate: "), "{h1}");
    assert_eq!(b1, b"xxxxx");
    let (h2, _) = response(&mut s, &mut pending, true).await;
    assert!(h2.starts_with("HTTP/1.1 200"), "{h2}");
    assert!(
        h2.contains("content-length: 1"),
        "HEAD keeps the length: {h2}"
    );
    let (h3, b3) = response(&mut s, &mut pending, false).await;
    assert!(h3.contains("x-backend: a"), "{h3}");
    assert_eq!(b3, b"a", "HEAD's answer carried no body bytes");
    let (_, b4) = response(&mut s, &mut pending, false).await;
    assert_eq!(b4, b"xxx");
    assert!(pending.is_empty());
    assert_eq!(b.hits(), 4);
}

#[tokio::test]
async fn http_1_0_clients_get_close_or_keep_alive_as_they_ask() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let addr = p.running.addr("http");

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let mut pending = Vec::new();
    let (head, body) = response(&mut s, &mut pending, false).await;
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body, b"a");
    assert!(closed(&mut s, Duration::from_secs(2)).await);

    let mut s = TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        s.write_all(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = response(&mut s, &mut pending, false).await;
        assert!(head.contains("connection: keep-alive"), "{head}");
        assert_eq!(body, b"a");
    }
}

#[tokio::test]
async fn small_bodies_are_read_whole_and_chunked_uploads_go_to_hyper_mid_connection() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let mut s = TcpStream::connect(p.running.addr("http")).await.unwrap();
    let mut pending = Vec::new();
    // A body with a length, sent in two parts.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(b" world").await.unwrap();
    let (head, body) = response(&mut s, &mut pending, false).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"11");
    // A chunked upload on the same connection: hyper carries it and the rest.
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = response(&mut s, &mut pending, false).await;
    assert_eq!(body, b"8");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (_, body) = response(&mut s, &mut pending, false).await;
    assert_eq!(body, b"a");
    assert_eq!(b.hits(), 3);
}

#[tokio::test]
async fn an_answer_of_unknown_length_is_chunked_and_errors_have_text_bodies() {
    let b = backend("a").spawn().await;
    let config = one_pool("round_robin", &[(b.addr, 1)], "").replace(
        "[[routes]]\npool = \"p\"",
        "[[routes]]\npool = \"p\"\ncompression = true",
    );
    let p = proxy(&config).await;
    let addr = p.running.addr("http");
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /text/5000 HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        .await
        .unwrap();
    let mut pending = Vec::new();
    let (head, body) = response(&mut s, &mut pending, false).await;
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let mut text = String::new();
    gunzip(&body, &mut text).await;
    assert_eq!(text.len(), 5000);

    let answer = raw_exchange(addr, &[b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n"]).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.ends_with("400 bad request\n"), "{answer}");
}

async fn gunzip(gz: &[u8], out: &mut String) {
    use tokio::io::AsyncReadExt as _;
    let mut d = async_compression::tokio::bufread::GzipDecoder::new(gz);
    d.read_to_string(out).await.unwrap();
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_backend("idle_timeout = \"300ms\"", b.addr)).await;
    let mut s = kept_alive(&p, 1).await.remove(0);
    let idle_from = Instant::now();
    assert!(closed(&mut s, Duration::from_secs(3)).await, "still open");
    let waited = idle_from.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
}

/// The wait between requests reuses one timer, moved on at each request: the timeout counts
/// from the last request, and a connection used more often than its timeout stays open.
#[tokio::test]
async fn the_idle_timeout_counts_from_the_last_request() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_backend("idle_timeout = \"400ms\"", b.addr)).await;
    let mut s = kept_alive(&p, 1).await.remove(0);
    let mut pending = Vec::new();
    // Five more requests 250 ms apart: 1.25 s in all, three timeouts' worth.
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = response(&mut s, &mut pending, false).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"a");
    }
    let idle_from = Instant::now();
    assert!(closed(&mut s, Duration::from_secs(3)).await, "still open");
    let waited = idle_from.elapsed();
    assert!(waited >= Duration::from_millis(350), "{waited:?}");
}

#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections_and_drains_clean() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_backend("drain_timeout = \"10s\"", b.addr)).await;
    let mut idle = kept_alive(&p, 3).await;
    drains_and_closes(p, &mut idle).await;
}

/// A backend that answers every request with `head` plus part of its body, then hangs up.
async fn cutting_backend(answer: &'static [u8]) -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut b = [0u8; 1024];
                while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => seen.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s.write_all(answer).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_backend_that_dies_mid_response_leaves_the_client_a_visibly_cut_answer() {
    for (answer, cut) in [
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789"[..],
            "content-length: 100",
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            "transfer-encoding: chunked",
        ),
    ] {
        let dying = cutting_backend(answer).await;
        let config = one_pool("round_robin", &[(dying, 1)], "retry = { attempts = 0 }");
        let p = proxy(&config).await;
        let mut s = TcpStream::connect(p.running.addr("http")).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        let text = String::from_utf8_lossy(&got).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains(cut), "{text}");
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        // Never a complete-looking answer: fewer bytes than the length, or no last chunk.
        if cut.starts_with("content-length") {
            assert_eq!(body, "0123456789", "{text}");
        } else {
            assert!(body.starts_with("5\r\nhello\r\n"), "{text}");
            assert!(
                !body.contains("0\r\n\r\n"),
                "the cut chunked body was ended: {text}"
            );
        }
        // The proxy itself is fine: a new connection still gets an answer (a 502 now that
        // the backend answers nothing usable is fine too; what matters is an answer).
        let answer = raw_exchange(
            p.running.addr("http"),
            &[b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    }
}

/// Polls the status until `parked_connections` is `n` (or gives up after 3 s).
async fn parked(p: &TestProxy, n: u64) -> bool {
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        if p.status().await["parked_connections"].as_u64() == Some(n) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A config with `server` lines in `[server]` and one round-robin pool of backend `b`.
fn one_backend(server: &str, b: std::net::SocketAddr) -> String {
    format!(
        "[server]\n{server}\n{}",
        one_pool("round_robin", &[(b, 1)], "")
    )
}

fn parking(extra: &str, b: std::net::SocketAddr) -> String {
    one_backend(&format!("idle_park_after = \"50ms\"\n{extra}"), b)
}

#[tokio::test]
async fn an_idle_connection_is_parked_and_its_next_requests_resume_it() {
    parked_and_resumed().await;
}

/// (In-process servers have no per-core workers: connections run on the test's runtime, so
/// this is the `work_stealing` shape, every thread sharing one set.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parking_works_on_a_multi_thread_runtime_too() {
    parked_and_resumed().await;
}

/// An idle connection parked, resumed by pipelined requests, parked and resumed again.
async fn parked_and_resumed() {
    let b = backend("a").spawn().await;
    let p = proxy(&parking("idle_timeout = \"10s\"", b.addr)).await;
    let mut s = TcpStream::connect(p.running.addr("http")).await.unwrap();
    let mut pending = Vec::new();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (h, body) = response(&mut s, &mut pending, false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(body, b"a");
    assert!(parked(&p, 1).await, "the idle connection was not parked");
    // Two pipelined requests wake it: both are answered, in order, on the same connection.
    s.write_all(
        b"GET /bytes/2 HTTP/1.1\r\nHost: x\r\n\r\nGET /bytes/3 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await
    .unwrap();
    let (h, body) = response(&mut s, &mut pending, false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(body, b"xx");
    let (_, body) = response(&mut s, &mut pending, false).await;
    assert_eq!(body, b"xxx");
    // Parked again once idle, and resumed again.
    assert!(parked(&p, 1).await, "not parked a second time");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (h, _) = response(&mut s, &mut pending, false).await;
    assert!(h.starts_with("HTTP/1.1 200"), "{h}");
    assert_eq!(b.hits(), 4);
}

#[tokio::test]
async fn a_parked_connection_still_closes_at_the_idle_timeout() {
    let b = backend("a").spawn().await;
    let p = proxy(&parking("idle_timeout = \"500ms\"", b.addr)).await;
    let mut s = kept_alive(&p, 1).await.remove(0);
    let idle_from = Instant::now();
    assert!(parked(&p, 1).await, "the idle connection was not parked");
    assert!(closed(&mut s, Duration::from_secs(3)).await, "still open");
    let waited = idle_from.elapsed();
    assert!(waited >= Duration::from_millis(450), "{waited:?}");
    assert!(parked(&p, 0).await, "the closed connection stayed parked");
}

#[tokio::test]
async fn a_client_closing_a_parked_connection_releases_it() {
    let b = backend("a").spawn().await;
    let p = proxy(&parking("", b.addr)).await;
    let mut conns = kept_alive(&p, 3).await;
    assert!(parked(&p, 3).await);
    conns.pop();
    assert!(parked(&p, 2).await, "a closed connection stayed parked");
    // (The value is not checked: the metrics recorder is shared by the tests of this binary.)
    let (_, _, text) = get(&p.admin("/metrics"), &[]).await;
    assert!(text.contains("fulcrum_connections_parked "), "{text}");
}

#[tokio::test]
async fn shutdown_closes_parked_connections_and_drains_clean() {
    let b = backend("a").spawn().await;
    let p = proxy(&parking("drain_timeout = \"10s\"", b.addr)).await;
    let mut idle = kept_alive(&p, 3).await;
    assert!(parked(&p, 3).await);
    drains_and_closes(p, &mut idle).await;
}
