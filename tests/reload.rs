//! Hot reload and dynamic membership: the pool API, config reloads, DNS, draining, under load.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

/// Clients that keep sending GETs until stopped; they count failures.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, sent, failed, url) =
                    (stop.clone(), sent.clone(), failed.clone(), url.to_string());
                tokio::spawn(async move {
                    let c = client();
                    while !stop.load(Ordering::SeqCst) {
                        let req = http::Request::get(url.as_str()).body(full("")).unwrap();
                        let ok = match c.request(req).await {
                            Ok(r) => {
                                let ok = r.status() == StatusCode::OK;
                                ok & http_body_util::BodyExt::collect(r.into_body())
                                    .await
                                    .is_ok()
                            }
                            Err(_) => false,
                        };
                        sent.fetch_add(1, Ordering::SeqCst);
                        if !ok {
                            failed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        (
            self.sent.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

fn list_json(backends: &[(SocketAddr, u32)]) -> String {
    let items: Vec<String> = backends
        .iter()
        .map(|(a, w)| format!("{{\"address\": \"{a}\", \"weight\": {w}}}"))
        .collect();
    format!("[{}]", items.join(","))
}

async fn members(p: &TestProxy) -> HashSet<String> {
    let (status, body) = call("GET", &p.admin("/pools/p/backends"), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|b| b["draining"] == false)
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_membership_changes_under_load_fail_no_request() {
    let mut bs = Vec::new();
    for i in 0..6 {
        bs.push(backend(&format!("b{i}")).spawn().await);
    }
    let name_of: HashMap<SocketAddr, String> =
        bs.iter().map(|b| (b.addr, b.name.clone())).collect();
    let p = proxy(&one_pool(
        "round_robin",
        &[(bs[0].addr, 1), (bs[1].addr, 1)],
        "dynamic = true",
    ))
    .await;
    let load = Load::start(&p.url, 4);
    let mut current: Vec<SocketAddr> = vec![bs[0].addr, bs[1].addr];
    let mut seed = 12345u64;
    let mut rand = move |n: usize| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) as usize % n
    };
    for change in 0..100 {
        let (status, body) = match change % 4 {
            // Replace all, with new weights.
            0 => {
                let k = 1 + rand(4);
                let mut set: Vec<SocketAddr> = Vec::new();
                while set.len() < k {
                    let a = bs[rand(6)].addr;
                    if !set.contains(&a) {
                        set.push(a);
                    }
                }
                current = set.clone();
                let list: Vec<_> = set.iter().map(|a| (*a, 1 + rand(5) as u32)).collect();
                call("PUT", &p.admin("/pools/p/backends"), &list_json(&list)).await
            }
            // Add one that is not there.
            1 => match bs.iter().map(|b| b.addr).find(|a| !current.contains(a)) {
                Some(a) => {
                    current.push(a);
                    call(
                        "POST",
                        &p.admin("/pools/p/backends"),
                        &format!("{{\"address\": \"{a}\", \"weight\": 2}}"),
                    )
                    .await
                }
                None => (StatusCode::OK, String::new()),
            },
            // Remove one, keeping at least one.
            2 if current.len() > 1 => {
                let a = current.remove(rand(current.len()));
                call("DELETE", &p.admin(&format!("/pools/p/backends/{a}")), "").await
            }
            // One backend only: the very next request must land on it.
            _ => {
                let a = bs[rand(6)].addr;
                current = vec![a];
                let r = call("PUT", &p.admin("/pools/p/backends"), &list_json(&[(a, 1)])).await;
                let (status, _, body) = get(&p.url, &[]).await;
                assert_eq!(
                    (status, body.as_str()),
                    (StatusCode::OK, name_of[&a].as_str()),
                    "change {change}"
                );
                r
            }
        };
        assert_eq!(status, StatusCode::OK, "change {change}: {body}");
        let want: HashSet<String> = current.iter().map(|a| a.to_string()).collect();
        assert_eq!(members(&p).await, want, "change {change}");
        // The next request lands in the new membership.
        let (status, _, body) = get(&p.url, &[]).await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            current.iter().any(|a| name_of[a] == body),
            "change {change}: {body} not in {current:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (sent, failed) = load.finish().await;
    eprintln!("100 membership changes under load: {sent} requests, {failed} failed");
    assert!(sent > 500, "too little load: {sent}");
    assert_eq!(failed, 0);
    // Bad payloads are refused with a JSON error and change nothing.
    let before = members(&p).await;
    for (method, path, body) in [
        ("PUT", "/pools/p/backends", "[{\"address\": \"nohost\"}]"),
        ("PUT", "/pools/p/backends", "{not json"),
        (
            "POST",
            "/pools/p/backends",
            "{\"address\": \"127.0.0.1:1\", \"weight\": 0}",
        ),
        ("PUT", "/pools/nope/backends", "[]"),
        ("DELETE", "/pools/p/backends/127.0.0.1:1", ""),
    ] {
        let (status, body) = call(method, &p.admin(path), body).await;
        assert!(
            status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND,
            "{method} {path}: {status}"
        );
        assert!(
            serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"].is_string(),
            "{body}"
        );
    }
    assert_eq!(members(&p).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_removed_mid_request_finishes_it_and_gets_no_more() {
    let slow = backend("slow")
        .slow(Duration::from_millis(600))
        .spawn()
        .await;
    let other = backend("other").spawn().await;
    let p = proxy(&one_pool(
        "round_robin",
        &[(slow.addr, 1), (other.addr, 1)],
        "health_check = { enabled = false }",
    ))
    .await;
    // Find a request that goes to the slow one.
    let url = p.url.clone();
    let pending = tokio::spawn(async move { get(&url, &[]).await });
    while slow.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, body) = call(
        "DELETE",
        &p.admin(&format!("/pools/p/backends/{}", slow.addr)),
        "",
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("+0 -1"), "{body}");
    // It shows as draining while its request runs.
    let listed: serde_json::Value =
        serde_json::from_str(&call("GET", &p.admin("/pools/p/backends"), "").await.1).unwrap();
    let entry = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == slow.addr.to_string())
        .cloned()
        .unwrap();
    assert_eq!(entry["draining"], true);
    assert_eq!(entry["in_flight"], 1);
    for _ in 0..20 {
        assert_eq!(get(&p.url, &[]).await.2, "other");
    }
    let (status, _, body) = pending.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
    assert_eq!(slow.hits(), 1);
    // Drained: gone from the listing.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!members(&p).await.contains(&slow.addr.to_string()));
    let all: serde_json::Value =
        serde_json::from_str(&call("GET", &p.admin("/pools/p/backends"), "").await.1).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1);
}

fn file_config(admin_port: u16, backends: &[SocketAddr], extra_pool: &str, extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{extra}\n[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n\n[[routes]]\npool = \"p\"\n\n[pools.p]\nbackends = [{}]\n{extra_pool}\n",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_state_of_unchanged_backends_and_rejects_a_broken_file() {
    let a = backend("a").spawn().await;
    let b = backend("b").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.toml");
    // a fails its health checks (every 100 ms): it will be unhealthy before the reload.
    std::fs::write(
        &path,
        file_config(
            0,
            &[a.addr],
            "health_check = { interval = \"100ms\", path = \"/stall\", timeout = \"50ms\" }",
            "",
        ),
    )
    .unwrap();
    let p = proxy_from_file(&path).await;
    let before = p.status().await;
    let a_before = before["pools"][0]["backends"][0].clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while p.status().await["pools"][0]["backends"][0]["healthy"] == true {
        assert!(Instant::now() < deadline, "a never became unhealthy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let requests_before = p.status().await["pools"][0]["backends"][0]["requests"]
        .as_u64()
        .unwrap();

    // Add b: a keeps its id, its counters and its (bad) health.
    std::fs::write(
        &path,
        file_config(
            0,
            &[a.addr, b.addr],
            "health_check = { interval = \"100ms\", path = \"/stall\", timeout = \"50ms\" }",
            "",
        ),
    )
    .unwrap();
    let (status, body) = call("POST", &p.admin("/reload"), "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let after = p.status().await;
    let backends = after["pools"][0]["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    let a_after = backends
        .iter()
        .find(|x| x["address"] == a.addr.to_string())
        .unwrap();
    assert_eq!(a_after["id"], a_before["id"]);
    assert_eq!(a_after["healthy"], false, "health was reset by the reload");
    assert!(a_after["requests"].as_u64().unwrap() >= requests_before);
    assert!(after["generation"].as_u64() > before["generation"].as_u64());

    // A broken file is rejected with file:line:col, and the running config stays.
    std::fs::write(&path, "[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:9\" }]\nalgoritm = \"x\"\n").unwrap();
    let (status, body) = call("POST", &p.admin("/reload"), "").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let errors = serde_json::from_str::<serde_json::Value>(&body).unwrap()["errors"].clone();
    let first = errors[0].as_str().unwrap();
    assert!(
        first.starts_with(&format!("{}:6:1: ", path.display())) && first.contains("algoritm"),
        "{first}"
    );
    assert_eq!(p.status().await["generation"], after["generation"]);
    // b is still served (a is unhealthy).
    assert_eq!(get(&p.url, &[]).await.2, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_pools_keep_api_membership_across_a_reload_of_an_unchanged_pool() {
    let a = backend("a").spawn().await;
    let b = backend("b").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.toml");
    for (dynamic, expect_kept) in [(true, true), (false, false)] {
        let extra_pool = if dynamic { "dynamic = true" } else { "" };
        std::fs::write(&path, file_config(0, &[a.addr], extra_pool, "")).unwrap();
        let p = proxy_from_file(&path).await;
        let (status, _) = call(
            "POST",
            &p.admin("/pools/p/backends"),
            &format!("{{\"address\": \"{}\"}}", b.addr),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(members(&p).await.len(), 2);
        // Reload with the pool unchanged in the file (another section changed).
        std::fs::write(
            &path,
            file_config(0, &[a.addr], extra_pool, "[server]\ndrain_timeout = \"7s\""),
        )
        .unwrap();
        assert_eq!(
            call("POST", &p.admin("/reload"), "").await.0,
            StatusCode::OK
        );
        assert_eq!(
            members(&p).await.contains(&b.addr.to_string()),
            expect_kept,
            "dynamic = {dynamic}"
        );
        p.running.shutdown().await;
    }
}

/// A resolver the test controls: `app.internal` resolves to whatever the test says.
#[derive(Default)]
struct FakeDns(Mutex<HashMap<String, Vec<SocketAddr>>>);

impl fulcrum::snapshot::Resolver for FakeDns {
    fn lookup<'a>(
        &'a self,
        host: &'a str,
        _port: u16,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + 'a>,
    > {
        let r = self.0.lock().unwrap().get(host).cloned();
        Box::pin(async move { r.ok_or_else(|| std::io::Error::other("NXDOMAIN")) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_follows_dns() {
    let bs = [
        backend("x").spawn().await,
        backend("y").spawn().await,
        backend("z").spawn().await,
    ];
    let dns = Arc::new(FakeDns::default());
    dns.0
        .lock()
        .unwrap()
        .insert("app.internal".into(), vec![bs[0].addr, bs[1].addr]);
    let text = format!(
        "[server]\nresolve_interval = \"50ms\"\n{}",
        one_pool("round_robin", &[], "").replace(
            "backends = []",
            "backends = [{ address = \"app.internal:80\" }]"
        )
    );
    let config = fulcrum::config::Config::parse(&text, "t.toml").unwrap();
    let running = fulcrum::start_with(config, None, dns.clone())
        .await
        .unwrap();
    let p = TestProxy {
        url: format!("http://{}", running.listeners[0].1),
        running,
    };
    let expect = |set: &[&TestBackend]| {
        set.iter()
            .map(|b| b.addr.to_string())
            .collect::<HashSet<_>>()
    };
    assert_eq!(members(&p).await, expect(&[&bs[0], &bs[1]]));

    dns.0
        .lock()
        .unwrap()
        .insert("app.internal".into(), vec![bs[1].addr, bs[2].addr]);
    let t = Instant::now();
    while members(&p).await != expect(&[&bs[1], &bs[2]]) {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "membership did not follow DNS"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A failed lookup keeps the last known addresses.
    dns.0.lock().unwrap().clear();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(members(&p).await, expect(&[&bs[1], &bs[2]]));
    let bodies = load(&p.url, 2, 20).await;
    assert!(bodies.iter().all(|b| b == "y" || b == "z"), "{bodies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_watch_reloads_and_listeners_follow_the_file() {
    let a = backend("a").spawn().await;
    let b = backend("b").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.toml");
    std::fs::write(
        &path,
        file_config(0, &[a.addr], "", "[server]\nwatch_config = true"),
    )
    .unwrap();
    let p = proxy_from_file(&path).await;
    let generation = p.status().await["generation"].as_u64().unwrap();
    // Change the pool and add a second listener, by editing the file only.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = file_config(0, &[b.addr], "", "[server]\nwatch_config = true").replace(
        "[[routes]]",
        &format!("[[listeners]]\nname = \"second\"\nlisten = \"127.0.0.1:{port}\"\n\n[[routes]]"),
    );
    std::fs::write(&path, text).unwrap();
    let t = Instant::now();
    while p.status().await["generation"].as_u64().unwrap() == generation {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the file watch did not reload"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&p.url, &[]).await.2,
        "b",
        "the first listener kept serving, with the new pool"
    );
    assert_eq!(get(&format!("http://127.0.0.1:{port}/"), &[]).await.2, "b");
    // Remove the second listener again: its port closes, the first stays.
    std::fs::write(
        &path,
        file_config(0, &[b.addr], "", "[server]\nwatch_config = true"),
    )
    .unwrap();
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the removed listener still accepts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&p.url, &[]).await.2, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_backends_weight() {
    let a = backend("a").spawn().await;
    let b = backend("b").spawn().await;
    let p = proxy(&one_pool(
        "weighted_round_robin",
        &[(a.addr, 10)],
        "slow_start = \"1s\"",
    ))
    .await;
    let (status, _) = call(
        "POST",
        &p.admin("/pools/p/backends"),
        &format!("{{\"address\": \"{}\", \"weight\": 10}}", b.addr),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let weight = |v: serde_json::Value| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|x| x["address"] == b.addr.to_string())
            .unwrap()["effective_weight"]
            .as_u64()
            .unwrap()
    };
    let early = weight(
        serde_json::from_str(&call("GET", &p.admin("/pools/p/backends"), "").await.1).unwrap(),
    );
    assert!(early < 5, "starts low: {early}");
    tokio::time::sleep(Duration::from_millis(1400)).await;
    let late = weight(
        serde_json::from_str(&call("GET", &p.admin("/pools/p/backends"), "").await.1).unwrap(),
    );
    assert_eq!(late, 10);
}
