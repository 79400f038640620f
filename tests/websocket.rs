//! WebSocket through fulcrum with a real client (tokio-tungstenite), and sticky sessions.

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use http::StatusCode;
use support::*;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

fn ws_url(p: &TestProxy, path: &str) -> String {
    format!("{}{path}", p.url.replacen("http://", "ws://", 1))
}

/// Opens a WebSocket through the proxy (with an optional cookie); returns it and the name of
/// the backend that took it (its first message).
async fn open(url: &str, cookie: Option<&str>) -> (Ws, String, Option<String>) {
    let mut req = url.into_client_request().unwrap();
    if let Some(c) = cookie {
        req.headers_mut().insert("cookie", c.parse().unwrap());
    }
    let (mut ws, resp) = tokio_tungstenite::connect_async(req)
        .await
        .expect("websocket handshake failed");
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string());
    let name = match ws.next().await {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("expected the backend's name, got {other:?}"),
    };
    (ws, name, set_cookie)
}

async fn next_data(ws: &mut Ws) -> Message {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("timed out")
        {
            Some(Ok(
                m @ (Message::Text(_) | Message::Binary(_) | Message::Pong(_) | Message::Close(_)),
            )) => return m,
            Some(Ok(_)) => continue,
            other => panic!("stream ended: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_binary_ping_a_large_message_and_close_pass_through() {
    let b = backend("echo").spawn().await;
    let p = proxy(&one_pool("round_robin", &[(b.addr, 1)], "")).await;
    let (mut ws, name, _) = open(&ws_url(&p, "/chat"), None).await;
    assert_eq!(name, "echo");
    // The backend saw an upgrade request with the forwarded headers.
    let h = b.last_headers();
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::binary(vec![0u8, 1, 2, 255])
    );
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    assert_eq!(
        next_data(&mut ws).await,
        Message::Pong(b"are you there".to_vec().into())
    );
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::binary(big));

    let status = p.status().await;
    assert_eq!(status["pools"][0]["backends"][0]["sessions"], 1);
    assert_eq!(
        status["pools"][0]["backends"][0]["in_flight"], 1,
        "an open session counts as in flight"
    );

    ws.close(None).await.unwrap();
    match next_data(&mut ws).await {
        Message::Close(_) => {}
        other => panic!("expected the close answer, got {other:?}"),
    }
    // The backend closes its socket after the handshake; the session ends at once, or at
    // the latest when fulcrum's fin timeout (1 s) runs out for the client side.
    let t = Instant::now();
    while p.status().await["pools"][0]["backends"][0]["sessions"] != 0 {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the session outlived its close"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_sessions_spread_by_the_pools_algorithm() {
    many_files();
    let bs = [
        backend("a").spawn().await,
        backend("b").spawn().await,
        backend("c").spawn().await,
    ];
    let p = proxy(&one_pool(
        "least_connections",
        &bs.iter().map(|b| (b.addr, 1)).collect::<Vec<_>>(),
        "",
    ))
    .await;
    let url = ws_url(&p, "/");
    let mut open_sessions = Vec::new();
    let mut count: HashMap<String, usize> = HashMap::new();
    for chunk in 0..10 {
        let opens: Vec<_> = (0..100)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { open(&url, None).await })
            })
            .collect();
        for o in opens {
            let (ws, name, _) = o.await.unwrap();
            *count.entry(name).or_default() += 1;
            open_sessions.push(ws);
        }
        let _ = chunk;
    }
    eprintln!("1,000 sessions under least_connections: {count:?}");
    // Sessions hold their backend's in-flight count, so least-connections keeps them even.
    for b in &bs {
        let n = count[&b.name];
        assert!((300..=367).contains(&n), "{}: {n} of 1000", b.name);
    }
    assert_eq!(
        p.running
            .shared
            .sessions
            .load(std::sync::atomic::Ordering::Relaxed),
        1000
    );
    // All of them still work.
    for ws in open_sessions.iter_mut().step_by(50) {
        ws.send(Message::text("ping")).await.unwrap();
        assert_eq!(next_data(ws).await, Message::text("ping"));
    }
}

fn cookie_pool(backends: &[&TestBackend]) -> String {
    one_pool(
        "round_robin",
        &backends.iter().map(|b| (b.addr, 1)).collect::<Vec<_>>(),
        "sticky = { cookie = \"fulcrum_sticky\" }\nhealth_check = { enabled = false }\ndynamic = true",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_cookie_keeps_pages_and_websockets_on_one_backend_and_moves_once() {
    let bs = [
        backend("a").spawn().await,
        backend("b").spawn().await,
        backend("c").spawn().await,
    ];
    let p = proxy(&cookie_pool(&bs.iter().collect::<Vec<_>>())).await;
    let mut clients: Vec<(String, String)> = Vec::new(); // (cookie, backend)
    for _ in 0..50 {
        let (status, headers, first) = get(&p.url, &[]).await;
        assert_eq!(status, StatusCode::OK);
        let set = headers["set-cookie"].to_str().unwrap();
        assert!(set.contains("HttpOnly") && set.contains("Path=/"), "{set}");
        let cookie = set.split(';').next().unwrap().to_string();
        assert!(
            !cookie.contains("127.0.0.1"),
            "the cookie names an address: {cookie}"
        );
        for _ in 0..19 {
            let (_, headers, body) = get(&p.url, &[("cookie", &cookie)]).await;
            assert_eq!(body, first, "a client moved");
            assert!(
                headers.get("set-cookie").is_none(),
                "cookie re-issued while valid"
            );
        }
        let (_, name, set) = open(&ws_url(&p, "/ws"), Some(&cookie)).await;
        assert_eq!(name, first, "the WebSocket landed elsewhere than the page");
        assert!(set.is_none());
        clients.push((cookie, first));
    }
    // The 50 clients were spread (round-robin for new ones).
    for b in &bs {
        let n = clients.iter().filter(|(_, name)| *name == b.name).count();
        assert!((15..=18).contains(&n), "{}: {n}", b.name);
    }
    // Tampered and unknown cookies are ignored, never an error.
    for bad in ["fulcrum_sticky=garbage", "fulcrum_sticky=ffffffffffffffff"] {
        let (status, headers, _) = get(&p.url, &[("cookie", bad)]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(headers.contains_key("set-cookie"));
    }
    // Remove b: its clients move once, get a new cookie, and stick to the new backend.
    let (status, _) = call(
        "DELETE",
        &p.admin(&format!("/pools/p/backends/{}", bs[1].addr)),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for (cookie, home) in &clients {
        let (_, headers, now) = get(&p.url, &[("cookie", cookie)]).await;
        if home == "b" {
            assert_ne!(now, "b");
            let new_cookie = headers["set-cookie"]
                .to_str()
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .to_string();
            for _ in 0..5 {
                let (_, h, again) = get(&p.url, &[("cookie", &new_cookie)]).await;
                assert_eq!(again, now, "moved twice");
                assert!(h.get("set-cookie").is_none());
            }
        } else {
            assert_eq!(&now, home, "a client whose backend stayed moved");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sticky_header_hashes_the_session_consistently() {
    let bs = [
        backend("a").spawn().await,
        backend("b").spawn().await,
        backend("c").spawn().await,
    ];
    let p = proxy(&one_pool(
        "round_robin",
        &bs.iter().map(|b| (b.addr, 1)).collect::<Vec<_>>(),
        "sticky = { header = \"X-Session\" }",
    ))
    .await;
    let mut used = std::collections::HashSet::new();
    for s in 0..30 {
        let session = format!("user-{s}");
        let first = get(&p.url, &[("x-session", &session)]).await.2;
        for _ in 0..5 {
            assert_eq!(get(&p.url, &[("x-session", &session)]).await.2, first);
        }
        used.insert(first);
    }
    assert_eq!(used.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_keeps_open_websockets_until_the_drain_timeout_then_closes_them() {
    let a = backend("a").spawn().await;
    let b = backend("b").spawn().await;
    let config = format!(
        "[server]\ndrain_timeout = \"1s\"\n{}",
        one_pool(
            "round_robin",
            &[(a.addr, 1), (b.addr, 1)],
            "health_check = { enabled = false }"
        )
    );
    let p = proxy(&config).await;
    let (mut ws, name, _) = open(&ws_url(&p, "/"), None).await;
    let victim = if name == "a" { &a } else { &b };
    let removed_at = Instant::now();
    let (status, _) = call(
        "DELETE",
        &p.admin(&format!("/pools/p/backends/{}", victim.addr)),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    // Still alive while draining.
    tokio::time::sleep(Duration::from_millis(500)).await;
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next_data(&mut ws).await, Message::text("still here"));
    // New sessions go to the other backend.
    let (_, other, _) = open(&ws_url(&p, "/"), None).await;
    assert_ne!(other, name);
    // At the drain timeout fulcrum closes it with 1001 (going away).
    match next_data(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    let closed_after = removed_at.elapsed();
    assert!(
        closed_after >= Duration::from_millis(950),
        "closed early: {closed_after:?}"
    );
    assert!(
        closed_after < Duration::from_secs(3),
        "closed late: {closed_after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_websocket_is_closed_after_the_idle_timeout() {
    let a = backend("a").spawn().await;
    let config = format!(
        "[server]\nwebsocket_idle_timeout = \"400ms\"\n{}",
        one_pool("round_robin", &[(a.addr, 1)], "")
    );
    let p = proxy(&config).await;
    let (mut ws, _, _) = open(&ws_url(&p, "/"), None).await;
    // Traffic keeps it open...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        ws.send(Message::text("x")).await.unwrap();
        assert_eq!(next_data(&mut ws).await, Message::text("x"));
    }
    // ...silence closes it.
    let t = Instant::now();
    match next_data(&mut ws).await {
        Message::Close(Some(frame)) => assert_eq!(u16::from(frame.code), 1001),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert!(t.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn upgrades_a_route_does_not_allow_are_plain_requests() {
    let a = backend("a").spawn().await;
    let text = one_pool("round_robin", &[(a.addr, 1)], "").replace(
        "[[routes]]\npool = \"p\"",
        "[[routes]]\npool = \"p\"\nupgrades = []",
    );
    let p = proxy(&text).await;
    let err = tokio_tungstenite::connect_async(ws_url(&p, "/")).await;
    assert!(
        err.is_err(),
        "upgrade passed although the route allows none"
    );
    assert!(a.last_headers().get("upgrade").is_none());
}
