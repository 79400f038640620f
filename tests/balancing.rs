//! The balancing algorithms through the real proxy, with real (slow, failing) backends.

mod support;

use std::time::Duration;

use http::StatusCode;
use support::*;

fn share(bodies: &[String], name: &str) -> f64 {
    bodies.iter().filter(|b| b.as_str() == name).count() as f64 / bodies.len() as f64
}

async fn slow_backend_share(algorithm: &str) -> f64 {
    let a = backend("fast-a").spawn().await;
    let b = backend("fast-b").spawn().await;
    let slow = backend("slow")
        .slow(Duration::from_millis(50))
        .spawn()
        .await;
    let p = proxy(&one_pool(
        algorithm,
        &[(a.addr, 1), (b.addr, 1), (slow.addr, 1)],
        "",
    ))
    .await;
    let bodies = load(&p.url, 12, 900).await;
    assert_eq!(bodies.len(), 900);
    let s = share(&bodies, "slow");
    eprintln!(
        "{algorithm}: slow backend (+50 ms) got {:.1}% of 900 requests",
        s * 100.0
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_response_time_starves_a_slow_backend() {
    let s = slow_backend_share("least_response_time").await;
    assert!(s < 0.20, "slow backend got {:.1}%", s * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_starves_a_slow_backend() {
    let s = slow_backend_share("least_connections").await;
    assert!(s < 0.20, "slow backend got {:.1}%", s * 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_does_not_starve_it_which_is_why_the_others_exist() {
    let s = slow_backend_share("round_robin").await;
    assert!(
        (0.30..0.37).contains(&s),
        "round robin gave the slow backend {:.1}%",
        s * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_response_time_avoids_a_backend_that_fails_fast() {
    let a = backend("ok-a").spawn().await;
    let b = backend("ok-b").slow(Duration::from_millis(5)).spawn().await;
    let broken = backend("broken").status(500).spawn().await;
    let p = proxy(&one_pool(
        "least_response_time",
        &[(a.addr, 1), (b.addr, 1), (broken.addr, 1)],
        "",
    ))
    .await;
    let bodies = load(&p.url, 8, 600).await;
    let s = share(&bodies, "broken");
    eprintln!(
        "least_response_time: backend answering 500 at once got {:.1}% of 600",
        s * 100.0
    );
    assert!(s < 0.20, "the fast-failing backend got {:.1}%", s * 100.0);
}

#[tokio::test]
async fn ip_hash_keeps_each_client_on_one_backend() {
    let names = ["a", "b", "c", "d"];
    let mut backends = Vec::new();
    for n in names {
        backends.push(backend(n).spawn().await);
    }
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let p = proxy(&one_pool("ip_hash", &list, "")).await;
    // One client, 100 requests on fresh connections: always the same backend.
    let from: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let (status, first) = get_from(from, &p.url).await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..99 {
        assert_eq!(get_from(from, &p.url).await.1, first);
    }
    // Many clients (source addresses 127.0.0.2..=127.0.0.61): each sticks, and together
    // they use every backend.
    let mut used = std::collections::HashSet::new();
    for i in 2..62u8 {
        let from = std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i));
        let home = get_from(from, &p.url).await.1;
        for _ in 0..3 {
            assert_eq!(
                get_from(from, &p.url).await.1,
                home,
                "client 127.0.0.{i} moved"
            );
        }
        used.insert(home);
    }
    assert_eq!(used.len(), names.len(), "{used:?}");
}
