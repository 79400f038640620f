//! Edge deployment: PROXY protocol, trusted X-Forwarded-For, traffic splitting.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;

use http::StatusCode;
use support::*;

fn edge_config(backends: &[&TestBackend], listener_extra: &str, algorithm: &str) -> String {
    let config = one_pool(
        algorithm,
        &backends.iter().map(|b| (b.addr, 1)).collect::<Vec<_>>(),
        "",
    );
    on_listener(&config, listener_extra)
}

/// Sends `prefix` then a GET over one raw connection; returns what came back.
async fn raw_request(addr: SocketAddr, prefix: &[u8]) -> String {
    raw_exchange(
        addr,
        &[
            prefix,
            b"GET / HTTP/1.1
Host: edge.test
Connection: close

",
        ],
    )
    .await
}

fn body_of(resp: &str) -> &str {
    resp.split("\r\n\r\n").nth(1).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_v1_and_v2_from_a_trusted_peer_set_the_client() {
    let bs = [
        backend("a").spawn().await,
        backend("b").spawn().await,
        backend("c").spawn().await,
    ];
    let refs: Vec<&TestBackend> = bs.iter().collect();
    let p = proxy(&edge_config(
        &refs,
        "proxy_protocol = true\ntrusted_proxies = [\"127.0.0.1/32\"]",
        "ip_hash",
    ))
    .await;
    let addr = p.running.addr("http");
    let dst: SocketAddr = "10.0.0.1:443".parse().unwrap();

    let v1 = raw_request(addr, b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n").await;
    assert!(v1.starts_with("HTTP/1.1 200"), "{v1}");
    let home = body_of(&v1).to_string();
    let backend = bs.iter().find(|b| b.name == home).unwrap();
    assert_eq!(backend.last_headers()["x-forwarded-for"], "203.0.113.7");

    // v2 with the same client: same ip_hash backend; many clients: spread.
    let v2 = raw_request(
        addr,
        &fulcrum::proxy_protocol::v2_header("203.0.113.7:4000".parse().unwrap(), dst),
    )
    .await;
    assert_eq!(body_of(&v2), home);
    let mut used = HashMap::new();
    for i in 1..=30u8 {
        let src: SocketAddr = format!("198.51.100.{i}:5000").parse().unwrap();
        let first =
            body_of(&raw_request(addr, &fulcrum::proxy_protocol::v2_header(src, dst)).await)
                .to_string();
        let again =
            body_of(&raw_request(addr, &fulcrum::proxy_protocol::v2_header(src, dst)).await)
                .to_string();
        assert_eq!(first, again, "client {src} moved");
        *used.entry(first).or_insert(0) += 1;
    }
    assert_eq!(used.len(), 3, "{used:?}");
    let seen = bs
        .iter()
        .flat_map(|b| b.seen.headers.lock().unwrap().clone())
        .collect::<Vec<_>>();
    assert!(seen.iter().any(|h| h["x-forwarded-for"] == "198.51.100.30"));

    // Without a header on a PROXY listener: refused.
    let none = raw_request(addr, b"").await;
    assert!(none.is_empty(), "{none}");
}

#[tokio::test]
async fn proxy_protocol_from_an_untrusted_peer_is_rejected() {
    let b = backend("a").spawn().await;
    let p = proxy(&edge_config(
        &[&b],
        "proxy_protocol = true\ntrusted_proxies = [\"10.0.0.0/8\"]",
        "round_robin",
    ))
    .await;
    let resp = raw_request(
        p.running.addr("http"),
        b"PROXY TCP4 203.0.113.7 10.0.0.1 56324 443\r\n",
    )
    .await;
    assert!(
        resp.is_empty(),
        "an untrusted PROXY header was served: {resp}"
    );
    assert_eq!(b.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_believed_only_from_trusted_proxies() {
    let bs = [
        backend("a").spawn().await,
        backend("b").spawn().await,
        backend("c").spawn().await,
    ];
    let refs: Vec<&TestBackend> = bs.iter().collect();
    let trusted = proxy(&edge_config(
        &refs,
        "trusted_proxies = [\"127.0.0.0/8\"]",
        "ip_hash",
    ))
    .await;
    let untrusted = proxy(&edge_config(&refs, "", "ip_hash")).await;
    let mut spread = HashMap::new();
    let mut same = HashMap::new();
    for i in 1..=30 {
        let xff = format!("192.0.2.{i}, 127.0.0.9");
        let (_, _, a) = get(&trusted.url, &[("x-forwarded-for", &xff)]).await;
        let (_, _, again) = get(&trusted.url, &[("x-forwarded-for", &xff)]).await;
        assert_eq!(a, again);
        *spread.entry(a).or_insert(0) += 1;
        let (_, _, u) = get(&untrusted.url, &[("x-forwarded-for", &xff)]).await;
        *same.entry(u).or_insert(0) += 1;
    }
    assert_eq!(
        spread.len(),
        3,
        "trusted X-Forwarded-For should drive ip_hash: {spread:?}"
    );
    assert_eq!(
        same.len(),
        1,
        "untrusted X-Forwarded-For was believed: {same:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_90_10_split_and_a_header_matched_canary() {
    let v1 = backend("v1").spawn().await;
    let v2 = backend("v2").spawn().await;
    let text = format!(
        r#"
[admin]
listen = "127.0.0.1:0"
[[listeners]]
name = "http"
listen = "127.0.0.1:0"
[[routes]]
pools = [{{ pool = "v1", weight = 90 }}, {{ pool = "v2", weight = 10 }}]
[[routes]]
match_header = {{ name = "x-canary", value = "1" }}
pool = "v2"
[pools.v1]
backends = [{{ address = "{}" }}]
[pools.v2]
backends = [{{ address = "{}" }}]
"#,
        v1.addr, v2.addr
    );
    let p = proxy(&text).await;
    let bodies = load(&p.url, 8, 1000).await;
    let canary = bodies.iter().filter(|b| b.as_str() == "v2").count();
    eprintln!("90/10 split: {canary} of 1000 to the canary");
    assert!((70..=130).contains(&canary), "{canary} of 1000 went to v2");
    for _ in 0..50 {
        let (status, _, body) = get(&p.url, &[("x-canary", "1")]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "v2"));
    }
}
