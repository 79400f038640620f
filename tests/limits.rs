//! Rate limits and connection limits through the real proxy: local, per key, per backend
//! with a queue, slow clients, and fleet-wide through a real Redis.

mod support;

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn with_route_limit(backend: std::net::SocketAddr, limit: &str) -> String {
    one_pool("round_robin", &[(backend, 1)], "").replace(
        "[[routes]]\npool = \"p\"",
        &format!("[[routes]]\npool = \"p\"\nrate_limit = {{ {limit} }}"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_over_the_limit_gets_429_with_ratelimit_headers() {
    let b = backend("a").spawn().await;
    let p = proxy(&with_route_limit(b.addr, "per_second = 100, burst = 200")).await;
    // 300 requests as fast as 8 connections go: 200 pass, plus the few tokens that refill
    // (at 100/s) while they are sent.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = p.url.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..300 / 8 + 1 {
                out.push(get(&url, &[]).await);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    // Every allowed request reached the backend, the refused ones none (counted over all
    // 304 sent; the limit is checked on the first 300).
    let ok_sent = all.iter().filter(|r| r.0 == StatusCode::OK).count();
    all.truncate(300);
    let took = started.elapsed();
    let ok = all.iter().filter(|r| r.0 == StatusCode::OK).count();
    let refill = (took.as_secs_f64() * 100.0).ceil() as usize;
    eprintln!("300 requests in {took:?}: {ok} allowed");
    assert!(ok >= 200 && ok <= 200 + refill, "{ok} allowed in {took:?}");
    for (status, headers, body) in all.iter().filter(|r| r.0 != StatusCode::OK) {
        assert_eq!(*status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body, "429 too many requests\n");
        assert_eq!(headers["ratelimit-limit"], "200");
        assert_eq!(headers["ratelimit-remaining"], "0");
        assert!(
            headers["retry-after"]
                .to_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
                >= 1
        );
        assert!(headers.contains_key("ratelimit-reset"));
    }
    assert_eq!(b.hits(), ok_sent, "a refused request reached the backend");
}

#[tokio::test]
async fn clients_and_header_keys_are_limited_independently() {
    let b = backend("a").spawn().await;
    let p = proxy(&with_route_limit(b.addr, "per_second = 0.1, burst = 3")).await;
    let one: IpAddr = "127.0.0.2".parse().unwrap();
    let two: IpAddr = "127.0.0.3".parse().unwrap();
    for _ in 0..3 {
        assert_eq!(get_from(one, &p.url).await.0, StatusCode::OK);
    }
    assert_eq!(get_from(one, &p.url).await.0, StatusCode::TOO_MANY_REQUESTS);
    for _ in 0..3 {
        assert_eq!(get_from(two, &p.url).await.0, StatusCode::OK);
    }
    assert_eq!(get_from(two, &p.url).await.0, StatusCode::TOO_MANY_REQUESTS);

    let p = proxy(&with_route_limit(
        b.addr,
        "per_second = 0.1, burst = 2, key = \"header:X-Api-Key\"",
    ))
    .await;
    for key in ["alpha", "beta"] {
        for _ in 0..2 {
            assert_eq!(get(&p.url, &[("x-api-key", key)]).await.0, StatusCode::OK);
        }
        assert_eq!(
            get(&p.url, &[("x-api-key", key)]).await.0,
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_backend_takes_two_queues_five_and_refuses_the_rest() {
    let b = backend("a").slow(Duration::from_millis(400)).spawn().await;
    let p = proxy(&one_pool(
        "round_robin",
        &[(b.addr, 1)],
        "max_connections_per_backend = 2\nmax_pending = 5\nqueue_timeout = \"5s\"\nretry = { attempts = 0 }\nhealth_check = { enabled = false }",
    ))
    .await;
    let calls: Vec<_> = (0..20)
        .map(|_| {
            let url = p.url.clone();
            tokio::spawn(async move {
                let t = Instant::now();
                let (status, _, body) = get(&url, &[]).await;
                (status, body, t.elapsed())
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    let ok: Vec<_> = results.iter().filter(|r| r.0 == StatusCode::OK).collect();
    let refused: Vec<_> = results
        .iter()
        .filter(|r| r.0 == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    assert_eq!((ok.len(), refused.len()), (7, 13), "{results:?}");
    assert!(refused
        .iter()
        .all(|r| r.1.contains("capacity") && r.2 < Duration::from_millis(300)));
    assert_eq!(
        b.seen.max_active.load(Ordering::SeqCst),
        2,
        "the backend saw more than its cap"
    );
    assert_eq!(b.hits(), 7);
    // The queued ones waited their turn: the slowest took about four rounds.
    let slowest = ok.iter().map(|r| r.2).max().unwrap();
    assert!(slowest >= Duration::from_millis(1500), "{slowest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowloris_client_is_cut_off_while_others_are_served() {
    let b = backend("a").spawn().await;
    let text = format!(
        "[server]\nrequest_header_timeout = \"1s\"\n{}",
        one_pool("round_robin", &[(b.addr, 1)], "")
    );
    let p = proxy(&text).await;
    let addr = p.running.addr("http");
    let slow = tokio::spawn(async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = Instant::now();
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
        for byte in head.iter() {
            if s.write_all(&[*byte]).await.is_err() {
                break;
            }
            // Closed by the proxy? Stop when a read says so.
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return started.elapsed(),
                Ok(Ok(_)) => return started.elapsed(),
                Err(_) => {}
            }
        }
        panic!("the slow client was never cut off");
    });
    // Meanwhile ordinary clients are served.
    for _ in 0..10 {
        assert_eq!(get(&p.url, &[]).await.2, "a");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let cut_after = slow.await.unwrap();
    eprintln!("slowloris client cut off after {cut_after:?}");
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(4),
        "{cut_after:?}"
    );
    assert_eq!(b.hits(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_connection_caps_answer_503_and_requests_per_connection_are_capped() {
    let b = backend("a").spawn().await;
    let text = on_listener(
        &one_pool("round_robin", &[(b.addr, 1)], ""),
        "max_connections = 2",
    );
    let p = proxy(&text).await;
    let addr = p.running.addr("http");
    let _one = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _two = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut three = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut answer = String::new();
    three.read_to_string(&mut answer).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    drop(_one);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        get(&p.url, &[]).await.0,
        StatusCode::OK,
        "a freed slot is usable again"
    );

    let text = format!(
        "[server]\nmax_requests_per_connection = 3\n{}",
        one_pool("round_robin", &[(b.addr, 1)], "")
    );
    // 2, not 1: the client reconnects before the closed connection's task has given its
    // place back.
    let text = on_listener(&text, "max_connections_per_ip = 2");
    let p = proxy(&text).await;
    let addr = p.running.addr("http");
    // One connection at a time, by hand (a pooled client may open a second one while the
    // first is still being returned), a new one after each `Connection: close`.
    let mut closes = Vec::new();
    let mut sender = None;
    for _ in 0..6 {
        if sender.is_none() {
            let io = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (s, conn) = hyper::client::conn::http1::handshake::<_, TestBody>(
                hyper_util::rt::TokioIo::new(io),
            )
            .await
            .unwrap();
            tokio::spawn(conn);
            sender = Some(s);
        }
        let s = sender.as_mut().unwrap();
        s.ready().await.unwrap();
        let req = http::Request::get("/")
            .header("host", "limits")
            .body(full(""))
            .unwrap();
        let r = s.send_request(req).await.unwrap();
        let close = r.headers().get("connection").is_some_and(|v| v == "close");
        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
        if close {
            sender = None;
        }
        closes.push(close);
    }
    assert_eq!(closes, [false, false, true, false, false, true]);
}

struct Redis(Child, u16);

impl Redis {
    fn start() -> Redis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server not installed (bash .ci/run installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Redis(child, port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_global_limit_through_redis_and_survive_its_loss() {
    let redis = Redis::start();
    let b = backend("a").spawn().await;
    let text = format!(
        "[redis]\nurl = \"redis://127.0.0.1:{}\"\ntimeout = \"200ms\"\n{}",
        redis.1,
        with_route_limit(
            b.addr,
            "per_second = 1, burst = 10, key = \"route\", scope = \"global\""
        )
    );
    let one = proxy(&text).await;
    let two = proxy(&text).await;
    // Stay inside one 10 s window.
    let into_window = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        % 10.0;
    if into_window > 7.0 {
        tokio::time::sleep(Duration::from_secs_f64(10.0 - into_window + 0.1)).await;
    }
    let mut ok = 0;
    for i in 0..16 {
        let url = if i % 2 == 0 { &one.url } else { &two.url };
        let (status, headers, _) = get(url, &[]).await;
        if status == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(headers["ratelimit-limit"], "10");
        }
    }
    assert_eq!(ok, 10, "the two instances did not share the limit");

    // Redis goes away: the fallback (allow: each instance's local limiter) applies.
    drop(redis);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut statuses = Vec::new();
    for i in 0..10 {
        let url = if i % 2 == 0 { &one.url } else { &two.url };
        statuses.push(get(url, &[]).await.0);
    }
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::OK || *s == StatusCode::TOO_MANY_REQUESTS),
        "{statuses:?}"
    );
    assert!(
        statuses.contains(&StatusCode::OK),
        "fallback = allow should let requests through: {statuses:?}"
    );
    assert!(one.running.shared.store_errors.load(Ordering::Relaxed) > 0);
}
