//! The whole proxy in process, with real backends and real clients on 127.0.0.1.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;

#[tokio::test]
async fn forwards_with_x_forwarded_headers_and_without_hop_by_hop() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let (status, headers, body) = get(
        &format!("{}/some/path?q=1", p.url),
        &[
            ("host", "shop.example.com"),
            ("x-forwarded-for", "203.0.113.7"),
            ("connection", "x-secret"),
            ("x-secret", "must not pass"),
            ("keep-alive", "timeout=5"),
            ("x-custom", "passes"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, "a");
    let seen = b.last_headers();
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], "shop.example.com");
    assert_eq!(seen["host"], "shop.example.com");
    assert_eq!(seen["x-custom"], "passes");
    assert!(seen.get("x-secret").is_none(), "{seen:?}");
    assert!(seen.get("keep-alive").is_none(), "{seen:?}");
    // And on the way back: the backend's Connection-named header is dropped.
    assert_eq!(headers["x-backend"], "a");
    assert!(headers.get("x-backend-hop").is_none(), "{headers:?}");
}

#[tokio::test]
async fn a_host_named_by_connection_still_reaches_the_backend() {
    // `Connection` may name any header, Host included: it is removed as hop-by-hop like the
    // others, and the backend still gets the host the client asked for.
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let (status, _, body) = get(
        &p.url,
        &[
            ("host", "shop.example.com"),
            ("connection", "host, x-secret"),
            ("x-secret", "must not pass"),
        ],
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "a"));
    let seen = b.last_headers();
    assert_eq!(seen["host"], "shop.example.com", "{seen:?}");
    assert_eq!(seen.get_all("host").iter().count(), 1, "{seen:?}");
    assert!(seen.get("x-secret").is_none(), "{seen:?}");
}

#[tokio::test]
async fn a_listener_can_leave_out_the_forwarded_headers_and_the_request_id() {
    let b = backend("a").spawn().await;
    let config = on_listener(
        &one_pool("round_robin", &[(b.addr, 1)], ""),
        "forwarded_headers = false\nrequest_id = false",
    );
    let p = proxy(&config).await;
    let (status, headers, _) = get(&p.url, &[("x-forwarded-for", "203.0.113.7")]).await;
    assert_eq!(status, StatusCode::OK);
    let seen = b.last_headers();
    // Passed on as the client sent it, nothing added.
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7");
    for name in ["x-forwarded-proto", "x-forwarded-host", "x-request-id"] {
        assert!(seen.get(name).is_none(), "{name}: {seen:?}");
    }
    assert!(headers.get("x-request-id").is_none(), "{headers:?}");
    // A client's own id still reaches the backend (it is just a header then).
    get(&p.url, &[("x-request-id", "req-7")]).await;
    assert_eq!(b.last_headers()["x-request-id"], "req-7");

    // The defaults add them (the same backend, a default listener).
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let (_, headers, _) = get(&p.url, &[]).await;
    let seen = b.last_headers();
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-request-id"], headers["x-request-id"]);
}

#[tokio::test]
async fn ten_mib_upload_and_download_pass_whole() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let ten = 10 * 1024 * 1024;
    let (status, _, body) = get(&format!("{}/bytes/{ten}", p.url), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.len(), ten);
    assert!(body.bytes().all(|c| c == b'x'));

    let req = Request::post(format!("{}/upload", p.url))
        .body(full(vec![7u8; ten]))
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, ten.to_string());
}

/// The proxy must pass the first bytes of an upload on before the client has sent the rest:
/// it never holds a whole body.
#[tokio::test]
async fn upload_streams_before_the_client_finishes() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
    let stream =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    let body = StreamBody::new(stream).boxed();
    let req = Request::post(format!("{}/upload-gated", p.url))
        .body(body)
        .unwrap();
    let call = tokio::spawn(async move { client().request(req).await });
    tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 64 * 1024]))))
        .await
        .unwrap();
    // The backend sees the first chunk while the client still holds back the other 10 MiB.
    tokio::time::timeout(Duration::from_secs(10), b.seen.first_chunk.notified())
        .await
        .expect("first chunk never reached the backend: the proxy buffers uploads");
    for _ in 0..160 {
        tx.send(Ok(Frame::data(Bytes::from(vec![1u8; 64 * 1024]))))
            .await
            .unwrap();
    }
    drop(tx);
    let resp = call.await.unwrap().unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got, (161 * 64 * 1024).to_string());
}

/// The client gets the first bytes of a download before the backend has produced the rest.
#[tokio::test]
async fn download_streams_before_the_backend_finishes() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let resp = client()
        .request(
            Request::get(format!("{}/download-gated", p.url))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("no first chunk while the backend held the rest: the proxy buffers downloads")
        .unwrap()
        .unwrap();
    let mut n = first.data_ref().map_or(0, |d| d.len());
    assert!(n > 0 && n <= 64 * 1024);
    b.seen.release.notify_one();
    while let Some(f) = body.frame().await {
        n += f.unwrap().data_ref().map_or(0, |d| d.len());
    }
    assert_eq!(n, 64 * 1024 + 10 * 1024 * 1024);
}

#[tokio::test]
async fn weighted_round_robin_is_exact_and_interleaved() {
    let a = backend("a").spawn().await;
    let b = backend("b").spawn().await;
    let c = backend("c").spawn().await;
    let p = proxy(&one_pool(
        "weighted_round_robin",
        &[(a.addr, 3), (b.addr, 1), (c.addr, 1)],
        "",
    ))
    .await;
    let mut order = String::new();
    for _ in 0..500 {
        let (status, _, body) = get(&p.url, &[]).await;
        assert_eq!(status, StatusCode::OK);
        order.push_str(&body);
    }
    assert_eq!((a.hits(), b.hits(), c.hits()), (300, 100, 100));
    // Smooth: every window of 5 holds a 3, b 1, c 1 (`abaca` repeated), never `aaabc`.
    for w in order.as_bytes().chunks(5) {
        let mut w = w.to_vec();
        w.sort();
        assert_eq!(w, b"aaabc");
    }
    assert!(!order.contains("aaa"), "not interleaved: {}", &order[..20]);
    assert!(order.starts_with("abacaabaca"), "{}", &order[..20]);
}

#[tokio::test]
async fn routes_by_host_and_path_and_404s_unknown_hosts() {
    let api = backend("api").spawn().await;
    let v2 = backend("v2").spawn().await;
    let web = backend("web").spawn().await;
    let config = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[[listeners]]
name = "http"
listen = "127.0.0.1:0"
[[routes]]
host = "api.example.com"
pool = "api"
[[routes]]
host = "api.example.com"
path_prefix = "/v2"
pool = "v2"
[[routes]]
host = "*.example.com"
pool = "web"
[pools.api]
backends = [{{ address = "{}" }}]
[pools.v2]
backends = [{{ address = "{}" }}]
[pools.web]
backends = [{{ address = "{}" }}]
"#,
        api.addr, v2.addr, web.addr
    );
    let p = proxy(&config).await;
    let body = |host: &'static str, path: &'static str| {
        let url = format!("{}{path}", p.url);
        async move { get(&url, &[("host", host)]).await }
    };
    assert_eq!(body("api.example.com", "/users").await.2, "api");
    assert_eq!(body("api.example.com", "/v2/users").await.2, "v2");
    assert_eq!(body("www.example.com", "/v2/users").await.2, "web");
    let (status, _, text) = body("unknown.org", "/").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(text.contains("no route"), "{text}");
}

#[tokio::test]
async fn refused_backend_is_502_and_stalled_backend_is_504() {
    // A port that was just closed refuses connections.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let p = proxy(&one_pool("round_robin", &[(dead, 1)], "")).await;
    let (status, _, text) = get(&p.url, &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert!(
        !text.contains("127.0.0.1"),
        "leaks the backend address: {text}"
    );
    assert!(text.starts_with("502"), "{text}");

    let slow = backend("slow").spawn().await;
    let p = proxy(&one_pool(
        "round_robin",
        &[(slow.addr, 1)],
        "timeout = \"300ms\"",
    ))
    .await;
    let started = std::time::Instant::now();
    let (status, _, text) = get(&format!("{}/stall", p.url), &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
    assert!(!text.contains(&slow.addr.to_string()), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // The proxy keeps serving after both.
    assert_eq!(get(&p.url, &[]).await.2, "slow");
}

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused_and_the_proxy_keeps_serving() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let addr = p.running.addr("http");

    let answer = raw_exchange(addr, &[b"GARBAGE\x01 / NOT-HTTP\r\n\r\n"]).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let mut big = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    for i in 0..2000 {
        big.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "v".repeat(40)).as_bytes());
    }
    big.extend_from_slice(b"\r\n");
    let answer = raw_exchange(addr, &[&big]).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    assert_eq!(b.hits(), 0, "a bad request reached the backend");
    let (status, _, body) = get(&p.url, &[]).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "a"));
}

#[tokio::test]
async fn h2c_prior_knowledge_is_served() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let resp = h2c_client()
        .request(
            Request::get(format!("{}/h2", p.url))
                .body(full(""))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "a");
    // The backend got an HTTP/1.1 request with the client's authority as Host.
    assert!(b.last_headers().get("host").is_some());
}

#[tokio::test]
async fn keep_alive_connections_to_backends_are_reused() {
    let b = backend("a").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    for _ in 0..20 {
        assert_eq!(get(&p.url, &[]).await.2, "a");
    }
    let conns = b.seen.conns.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        conns <= 2,
        "{conns} backend connections for 20 sequential requests"
    );
}

/// A backend that answers every request with the same hand-written head (mixed-case names,
/// hop-by-hop headers, its own `Date` and `X-Request-Id`) and body; it records the
/// `x-request-id` of each request it reads.
async fn handwritten_backend(
    head: &'static str,
) -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let ids = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut chunk).await {
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        ids.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&buf[..end]).into_owned());
                        buf.drain(..end + 4);
                        if s.write_all(head.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// The `X-Request-Id` a request head carries (any case), or "".
fn request_id_of(head: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.split_once(':')
                .filter(|(n, _)| n.eq_ignore_ascii_case("x-request-id"))
        })
        .map_or(String::new(), |(_, v)| v.trim().to_string())
}

/// The values of header `name` (any case) in a head's lines, trimmed, in order.
fn values_of<'a>(lines: &[&'a str], name: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

/// A client's head reaches the backend as it came, less what is hop-by-hop: kept as its
/// lines (names in their own case, values untouched) on a listener where nothing reads
/// them, as a map where something does (forwarding headers, the default); with more
/// hop-by-hop lines between kept ones than a kept head may lose, or a `Connection` that
/// names a header, through the map too. Either way the same headers, in the same order
/// within a name, and the backend's answer whole.
#[tokio::test]
async fn a_clients_head_reaches_the_backend_less_its_hop_by_hop_headers() {
    const ANSWER: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    const REQUEST: &str = "GET /p?q=1 HTTP/1.1\r\nX-Mixed-Case:  Kept As Sent\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nHost: example.test\r\nTE: trailers\r\nX-Dup: 1\r\nProxy-Connection: keep-alive\r\nTE: deflate\r\nX-Dup: 2\r\nTrailer: x-sum\r\nContent-Type: text/plain\r\nUser-Agent: test/1\r\n\r\n";
    // Seven runs of hop-by-hop lines between kept ones: one more than a kept head may lose.
    let mut many = String::from("GET /p?q=1 HTTP/1.1\r\nHost: example.test\r\n");
    for i in 0..7 {
        many.push_str(&format!("X-Dup: {i}\r\nKeep-Alive: timeout={i}\r\n"));
    }
    many.push_str("\r\n");
    const NAMING: &str = "GET /p?q=1 HTTP/1.1\r\nHost: example.test\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Dup: 1\r\n\r\n";

    let (addr, heads) = handwritten_backend(ANSWER).await;
    let plain = on_listener(
        &one_pool("round_robin", &[(addr, 1)], ""),
        "forwarded_headers = false\nrequest_id = false",
    );
    let default = one_pool("round_robin", &[(addr, 1)], "");
    for (config, kept) in [(plain, true), (default, false)] {
        let p = proxy(&config).await;
        let proxy_addr: std::net::SocketAddr = p.url.trim_start_matches("http://").parse().unwrap();
        let close = "GET /last HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n";
        let answer = raw_exchange(
            proxy_addr,
            &[
                REQUEST.as_bytes(),
                many.as_bytes(),
                NAMING.as_bytes(),
                close.as_bytes(),
            ],
        )
        .await;
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 4, "{answer}");
        let seen: Vec<String> = heads.lock().unwrap().drain(..).collect();
        assert_eq!(seen.len(), 4, "{seen:?}");

        let first: Vec<&str> = seen[0].lines().collect();
        assert_eq!(first[0], "GET /p?q=1 HTTP/1.1");
        if kept {
            assert!(first.contains(&"X-Mixed-Case:  Kept As Sent"), "{first:?}");
            assert!(first.contains(&"User-Agent: test/1"), "{first:?}");
        }
        assert_eq!(
            values_of(&first, "x-mixed-case"),
            ["Kept As Sent"],
            "{first:?}"
        );
        assert_eq!(values_of(&first, "x-dup"), ["1", "2"], "{first:?}");
        assert_eq!(values_of(&first, "te"), ["trailers"], "{first:?}");
        assert_eq!(values_of(&first, "host"), ["example.test"], "{first:?}");
        assert_eq!(
            values_of(&first, "content-type"),
            ["text/plain"],
            "{first:?}"
        );
        assert_eq!(values_of(&first, "user-agent"), ["test/1"], "{first:?}");
        for hop in ["connection", "keep-alive", "proxy-connection", "trailer"] {
            assert!(values_of(&first, hop).is_empty(), "{hop} passed: {first:?}");
        }
        assert_eq!(
            values_of(&first, "x-forwarded-for"),
            if kept { vec![] } else { vec!["127.0.0.1"] },
            "{first:?}"
        );

        let second: Vec<&str> = seen[1].lines().collect();
        assert_eq!(
            values_of(&second, "x-dup"),
            ["0", "1", "2", "3", "4", "5", "6"],
            "{second:?}"
        );
        assert!(values_of(&second, "keep-alive").is_empty(), "{second:?}");
        assert_eq!(values_of(&second, "host"), ["example.test"], "{second:?}");

        let third: Vec<&str> = seen[2].lines().collect();
        assert!(values_of(&third, "x-secret").is_empty(), "{third:?}");
        assert!(values_of(&third, "connection").is_empty(), "{third:?}");
        assert_eq!(values_of(&third, "x-dup"), ["1"], "{third:?}");
        assert_eq!(seen[3].lines().next(), Some("GET /last HTTP/1.1"));
    }
}

/// A backend's head reaches the client as it came, less what is hop-by-hop: lines kept as
/// bytes by fulcrum's HTTP/1.1 sides (names in their own case), or as a map by hyper's
/// (HTTP/2 clients); either way one `Date` (the backend's), one `X-Request-Id` (fulcrum's,
/// the one the backend was sent), one length.
#[tokio::test]
async fn a_backends_head_passes_less_its_hop_by_hop_headers_on_either_server_side() {
    const HEAD: &str = "HTTP/1.1 200 OK\r\nServer: Origin/1.0\r\nKeep-Alive: timeout=5\r\nX-Request-Id: from-backend\r\nDate: Sun, 29 Nov 2026 10:00:00 GMT\r\nProxy-Connection: keep-alive\r\nUpgrade: h2c\r\nContent-Length: 5\r\nConnection: keep-alive\r\nX-Mixed-Case:  Kept As Sent\r\nTrailer: x-sum\r\n\r\nhello";
    let (addr, ids) = handwritten_backend(HEAD).await;
    let p = proxy(&one_pool("round_robin", &[(addr, 1)], "")).await;
    let proxy_addr: std::net::SocketAddr = p.url.trim_start_matches("http://").parse().unwrap();

    // fulcrum's own HTTP/1.1 server side: the bytes on the wire.
    let answer = raw_exchange(
        proxy_addr,
        &[b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"],
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("no head");
    assert_eq!(body, "hello");
    let lines: Vec<&str> = head.lines().collect();
    assert_eq!(lines[0], "HTTP/1.1 200 OK");
    assert!(lines.contains(&"Server: Origin/1.0"), "{head}");
    assert!(lines.contains(&"X-Mixed-Case:  Kept As Sent"), "{head}");
    assert!(
        lines.contains(&"Date: Sun, 29 Nov 2026 10:00:00 GMT"),
        "{head}"
    );
    let named = |name: &str| {
        lines
            .iter()
            .filter(|l| {
                l.split_once(':')
                    .is_some_and(|(n, _)| n.eq_ignore_ascii_case(name))
            })
            .map(|l| l.split_once(':').map_or("", |(_, v)| v.trim()))
            .collect::<Vec<_>>()
    };
    for hop in ["keep-alive", "proxy-connection", "upgrade", "trailer"] {
        assert!(named(hop).is_empty(), "{hop} passed: {head}");
    }
    assert_eq!(named("connection"), ["close"], "{head}");
    assert_eq!(named("date").len(), 1, "{head}");
    assert_eq!(named("content-length"), ["5"], "{head}");
    let sent_id = request_id_of(&ids.lock().unwrap().last().cloned().unwrap());
    assert!(!sent_id.is_empty());
    assert_eq!(named("x-request-id"), [sent_id.as_str()], "{head}");

    // hyper's server side (HTTP/2): the same headers, from a map.
    let resp = h2c_client()
        .request(Request::get(&p.url).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers().clone();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        "hello"
    );
    assert_eq!(h["server"], "Origin/1.0");
    assert_eq!(h["x-mixed-case"], "Kept As Sent");
    assert_eq!(h.get_all("date").iter().count(), 1);
    assert_eq!(h["date"], "Sun, 29 Nov 2026 10:00:00 GMT");
    let sent_id = request_id_of(&ids.lock().unwrap().last().cloned().unwrap());
    let echoed: Vec<_> = h.get_all("x-request-id").iter().collect();
    assert_eq!(echoed, [sent_id.as_str()]);
    for hop in [
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "trailer",
        "connection",
    ] {
        assert!(h.get(hop).is_none(), "{hop} passed: {h:?}");
    }
}
