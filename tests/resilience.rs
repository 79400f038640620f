//! Routing around failure with real backends: passive and active health, retries, breaker,
//! retry budget, and the immediate 503 when nothing is left.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

async fn backend_status(p: &TestProxy, addr: std::net::SocketAddr) -> serde_json::Value {
    let (_, _, body) = get(&format!("http://{}/status", p.running.admin), &[]).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr.to_string())
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_backend_costs_no_client_an_error_and_comes_back_after_two_checks() {
    let mut backends = Vec::new();
    for n in ["a", "b", "c", "d"] {
        backends.push(backend(n).spawn().await);
    }
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let p = proxy(&one_pool(
        "round_robin",
        &list,
        "health_check = { interval = \"300ms\", timeout = \"200ms\" }",
    ))
    .await;

    // Three clients keep sending GETs for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..3 {
        let (stop, errors, sent, url) = (stop.clone(), errors.clone(), sent.clone(), p.url.clone());
        clients.push(tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::SeqCst) {
                let req = http::Request::get(url.as_str()).body(full("")).unwrap();
                match c.request(req).await {
                    Ok(r) if r.status() == StatusCode::OK => {
                        let _ = http_body_util::BodyExt::collect(r.into_body()).await;
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                }
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = &backends[1];
    let killed_at = Instant::now();
    let sent_at_kill = sent.load(Ordering::SeqCst);
    victim.kill();

    // Passive detection takes it out within a few requests.
    let mut left_after = None;
    while killed_at.elapsed() < Duration::from_secs(5) {
        let s = backend_status(&p, victim.addr).await;
        if s["healthy"] == false {
            left_after = Some((
                killed_at.elapsed(),
                sent.load(Ordering::SeqCst) - sent_at_kill,
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (took, requests) = left_after.expect("the dead backend was never marked unhealthy");
    let failures = backend_status(&p, victim.addr).await["failures"]
        .as_u64()
        .unwrap();
    eprintln!("dead backend left the rotation after {took:?} ({requests} client requests, {failures} failed attempts on it)");
    assert!(
        failures <= 5,
        "{failures} requests went to the dead backend"
    );

    // Restart it on the same address: it must pass two checks (~600 ms) to come back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let revived = backend("b").spawn_at(victim.addr).await;
    let revived_at = Instant::now();
    while backend_status(&p, victim.addr).await["healthy"] == false {
        assert!(
            revived_at.elapsed() < Duration::from_secs(5),
            "never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let back_after = revived_at.elapsed();
    assert!(
        back_after >= Duration::from_millis(250),
        "back after {back_after:?}: fewer than 2 checks?"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    eprintln!(
        "back in rotation {back_after:?} after restart; {} requests, {} client errors",
        sent.load(Ordering::SeqCst),
        errors.load(Ordering::SeqCst)
    );
    assert_eq!(errors.load(Ordering::SeqCst), 0, "clients saw errors");
    assert!(
        revived.hits() > 0,
        "traffic did not return to the revived backend"
    );
}

fn breaker_only(threshold: u32, half_open: u32) -> String {
    format!(
        "health_check = {{ enabled = false }}\nretry = {{ attempts = 0 }}\ncircuit_breaker = {{ failure_threshold = {threshold}, open_duration = \"400ms\", half_open_requests = {half_open} }}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn breaker_opens_rejects_half_opens_and_closes() {
    let b = backend("a")
        .status(500)
        .slow(Duration::from_millis(100))
        .spawn()
        .await;
    let p = proxy(&one_pool(
        "round_robin",
        &[(b.addr, 1)],
        &breaker_only(3, 1),
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&p.url, &[]).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    }
    // Open: rejected by fulcrum itself, the backend is not asked.
    let (status, headers, body) = get(&p.url, &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(headers.contains_key("retry-after"));
    assert_eq!(b.hits(), 3);
    assert_eq!(backend_status(&p, b.addr).await["breaker"], "open");

    // After open_duration: half-open lets exactly one trial through; the others are refused.
    b.set_status(200);
    tokio::time::sleep(Duration::from_millis(450)).await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let url = p.url.clone();
            tokio::spawn(async move { get(&url, &[]).await.0 })
        })
        .collect();
    let mut statuses = Vec::new();
    for c in calls {
        statuses.push(c.await.unwrap());
    }
    statuses.sort();
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::SERVICE_UNAVAILABLE,
            StatusCode::SERVICE_UNAVAILABLE
        ]
    );
    assert_eq!(b.hits(), 4);
    // The trial succeeded: closed again, everything passes.
    assert_eq!(backend_status(&p, b.addr).await["breaker"], "closed");
    for _ in 0..5 {
        assert_eq!(get(&p.url, &[]).await.0, StatusCode::OK);
    }
}

#[tokio::test]
async fn failed_trial_reopens_the_breaker() {
    let b = backend("a").status(500).spawn().await;
    let p = proxy(&one_pool(
        "round_robin",
        &[(b.addr, 1)],
        &breaker_only(2, 1),
    ))
    .await;
    for _ in 0..2 {
        get(&p.url, &[]).await;
    }
    assert_eq!(get(&p.url, &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(get(&p.url, &[]).await.0, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(get(&p.url, &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.hits(), 3);
}

#[tokio::test]
async fn retries_go_to_another_backend_and_stay_within_the_budget() {
    // Two healthy, one answering 503: idempotent requests are retried elsewhere.
    let good = backend("good").spawn().await;
    let good2 = backend("good").spawn().await;
    let bad = backend("bad").status(503).spawn().await;
    let extra = "health_check = { enabled = false }\ncircuit_breaker = { enabled = false }\nretry = { attempts = 2, backoff = \"1ms\", budget_percent = 50 }";
    let p = proxy(&one_pool(
        "round_robin",
        &[(good.addr, 1), (bad.addr, 1), (good2.addr, 1)],
        extra,
    ))
    .await;
    for _ in 0..30 {
        let (status, _, body) = get(&p.url, &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "good"));
    }
    assert!(
        bad.hits() >= 9,
        "the failing backend was not tried: {}",
        bad.hits()
    );
    // A POST is not retried: some of them see the 503.
    let mut post_503 = 0;
    for _ in 0..9 {
        let req = http::Request::post(p.url.as_str()).body(full("x")).unwrap();
        let r = client().request(req).await.unwrap();
        post_503 += (r.status() == StatusCode::SERVICE_UNAVAILABLE) as usize;
    }
    assert!(post_503 > 0);

    // Every backend failing: retries stay within 20% of the requests (+ the small reserve).
    let all_bad = [503, 503, 503];
    let mut bs = Vec::new();
    for s in all_bad {
        bs.push(backend("bad").status(s).spawn().await);
    }
    let extra = "health_check = { enabled = false }\ncircuit_breaker = { enabled = false }\nretry = { attempts = 2, backoff = \"1ms\", budget_percent = 20 }";
    let p = proxy(&one_pool(
        "round_robin",
        &bs.iter().map(|b| (b.addr, 1)).collect::<Vec<_>>(),
        extra,
    ))
    .await;
    for _ in 0..200 {
        assert_eq!(get(&p.url, &[]).await.0, StatusCode::SERVICE_UNAVAILABLE);
    }
    let attempts: usize = bs.iter().map(|b| b.hits()).sum();
    let retries = attempts - 200;
    eprintln!(
        "all backends failing: 200 requests made {retries} retries (budget 20% + reserve 10)"
    );
    assert!(retries <= 40 + 10, "{retries} retries");
    assert!(retries >= 40, "the budget was not used: {retries}");
}

#[tokio::test]
async fn all_backends_down_is_an_immediate_503_with_retry_after() {
    let a = backend("a").spawn().await;
    let b = backend("b").spawn().await;
    let p = proxy(&one_pool(
        "least_connections",
        &[(a.addr, 1), (b.addr, 1)],
        "health_check = { interval = \"1h\", initially = \"unhealthy\" }",
    ))
    .await;
    let mut times = Vec::new();
    for _ in 0..21 {
        let t = Instant::now();
        let (status, headers, body) = get(&p.url, &[]).await;
        times.push(t.elapsed());
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(headers["retry-after"], "1");
        assert!(body.contains("no healthy backend"), "{body}");
        assert!(!body.contains("127.0.0.1"));
    }
    times.sort();
    eprintln!(
        "503 with every backend down: median {:?}, max {:?}",
        times[10], times[20]
    );
    assert!(
        times[10] < Duration::from_millis(10),
        "median {:?}",
        times[10]
    );
    assert_eq!(a.hits() + b.hits(), 0);
}

#[tokio::test]
async fn panic_mode_balances_over_all_when_too_few_are_healthy() {
    let names = ["a", "b", "c", "d"];
    let mut bs = Vec::new();
    for n in names {
        bs.push(backend(n).spawn().await);
    }
    // All start unhealthy (checks far apart); mark one healthy by hand: 25% < 50%.
    let p = proxy(&one_pool(
        "round_robin",
        &bs.iter().map(|b| (b.addr, 1)).collect::<Vec<_>>(),
        "health_check = { interval = \"1h\", initially = \"unhealthy\", healthy_threshold = 1, passive = false }",
    ))
    .await;
    let snap = p.running.shared.snapshot.load();
    let pool = &snap.pools["p"];
    let hc = pool.config.health_check.clone();
    let t = pool.backends[0].state.health.record(true, true, &hc);
    pool.health_transition(&pool.backends[0], t.unwrap(), "test");
    assert!(pool.in_panic());
    for _ in 0..40 {
        assert_eq!(get(&p.url, &[]).await.0, StatusCode::OK);
    }
    for b in &bs {
        assert_eq!(b.hits(), 10, "{} got {}", b.name, b.hits());
    }
}
