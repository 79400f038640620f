//! The operator's view: /metrics, /status, the dashboard in a real browser, the access log,
//! request ids and the admin token.

mod support;

use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

/// A metric sample: name, labels, value.
type Sample = (String, Vec<(String, String)>, f64);

/// A strict reading of the Prometheus text format: every line is a comment (`# HELP`,
/// `# TYPE` with a known type) or `name{label="value",...} number`. Returns the samples.
fn parse_prometheus(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap();
            assert!(
                kind == "HELP" || kind == "TYPE",
                "line {n}: bad comment {line:?}"
            );
            if kind == "TYPE" {
                let t = parts.nth(1).unwrap_or("");
                assert!(
                    ["counter", "gauge", "histogram", "summary", "untyped"].contains(&t),
                    "line {n}: {line:?}"
                );
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("line {n}: no value: {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("line {n}: bad value {line:?}")),
        };
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), Vec::new()),
            Some((name, rest)) => {
                let body = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("line {n}: unclosed labels {line:?}"));
                let mut labels = Vec::new();
                for pair in body.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair
                        .split_once("=\"")
                        .unwrap_or_else(|| panic!("line {n}: bad label {pair:?}"));
                    labels.push((k.to_string(), v.trim_end_matches('"').to_string()));
                }
                (name.to_string(), labels)
            }
        };
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "line {n}: bad metric name {name:?}"
        );
        out.push((name, labels, value));
    }
    out
}

fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(n, l, _)| {
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| *v)
        .sum()
}

fn two_pools(ok: &TestBackend, failing: &TestBackend, extra_top: &str) -> String {
    format!(
        r#"{extra_top}
[admin]
listen = "127.0.0.1:0"
[[listeners]]
name = "http"
listen = "127.0.0.1:0"
[[routes]]
pool = "good"
[[routes]]
path_prefix = "/bad"
pool = "bad"
[pools.good]
backends = [{{ address = "{}" }}]
[pools.bad]
backends = [{{ address = "{}" }}]
circuit_breaker = {{ failure_threshold = 1000 }}
"#,
        ok.addr, failing.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_count_exactly_the_requests_sent() {
    let good = backend("good").spawn().await;
    let bad = backend("bad").status(500).spawn().await;
    let p = proxy(&two_pools(&good, &bad, "")).await;
    for _ in 0..7 {
        assert_eq!(get(&p.url, &[]).await.0, StatusCode::OK);
    }
    for _ in 0..3 {
        assert_eq!(
            get(&format!("{}/bad/x", p.url), &[]).await.0,
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
    let (status, text) = call("GET", &p.admin("/metrics"), "").await;
    assert_eq!(status, StatusCode::OK);
    let samples = parse_prometheus(&text);
    let g = good.addr.to_string();
    let b = bad.addr.to_string();
    assert_eq!(
        sample(
            &samples,
            "fulcrum_requests_total",
            &[("backend", &g), ("code_class", "2xx")]
        ),
        7.0
    );
    assert_eq!(
        sample(
            &samples,
            "fulcrum_requests_total",
            &[("backend", &g), ("code_class", "5xx")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &samples,
            "fulcrum_requests_total",
            &[("pool", "bad"), ("backend", &b), ("code_class", "5xx")]
        ),
        3.0
    );
    assert_eq!(
        sample(
            &samples,
            "fulcrum_request_duration_seconds_count",
            &[("backend", &g)]
        ),
        7.0
    );
    assert_eq!(
        sample(
            &samples,
            "fulcrum_route_requests_total",
            &[("route", "*/bad"), ("code_class", "5xx")]
        ),
        3.0
    );
    assert_eq!(
        sample(&samples, "fulcrum_backend_up", &[("backend", &g)]),
        1.0
    );
    assert_eq!(
        sample(&samples, "fulcrum_backend_inflight", &[("backend", &g)]),
        0.0
    );
    assert!(samples.iter().any(|(n, _, _)| n == "fulcrum_connections"));
    // Moving exactly: 4 more.
    for _ in 0..4 {
        get(&p.url, &[]).await;
    }
    let samples = parse_prometheus(&call("GET", &p.admin("/metrics"), "").await.1);
    assert_eq!(
        sample(
            &samples,
            "fulcrum_requests_total",
            &[("backend", &g), ("code_class", "2xx")]
        ),
        11.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reflects_health_breaker_and_draining() {
    let slow = backend("slow")
        .slow(Duration::from_millis(700))
        .spawn()
        .await;
    let sick = backend("sick").status(500).spawn().await;
    let p = proxy(&one_pool(
        "round_robin",
        &[(slow.addr, 1), (sick.addr, 1)],
        "health_check = { interval = \"1h\", unhealthy_threshold = 1 }\ncircuit_breaker = { failure_threshold = 1, open_duration = \"1h\" }\nretry = { attempts = 0 }",
    ))
    .await;
    let entry = |s: &serde_json::Value, addr: std::net::SocketAddr| {
        s["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == addr.to_string())
            .cloned()
            .unwrap()
    };
    let s = p.status().await;
    assert_eq!(entry(&s, sick.addr)["healthy"], true);
    assert_eq!(entry(&s, sick.addr)["breaker"], "closed");
    // Two requests, one to each: the 500 opens sick's breaker (threshold 1) and passive
    // detection marks it unhealthy (threshold 1); the other stays in flight on slow.
    let url = p.url.clone();
    let pending = tokio::spawn(async move { tokio::join!(get(&url, &[]), get(&url, &[])) });
    let t = Instant::now();
    loop {
        let s = p.status().await;
        if entry(&s, sick.addr)["breaker"] == "open"
            && entry(&s, sick.addr)["healthy"] == false
            && entry(&s, slow.addr)["in_flight"] == 1
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    call(
        "DELETE",
        &p.admin(&format!("/pools/p/backends/{}", slow.addr)),
        "",
    )
    .await;
    let s = p.status().await;
    assert_eq!(entry(&s, slow.addr)["draining"], true);
    assert_eq!(entry(&s, slow.addr)["in_flight"], 1);
    let _ = pending.await;
    // Drained: gone.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        p.status().await["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

async fn chromium_dom(url: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", dir.path().display()))
        .arg(url)
        .output()
        .await
        .expect("chromium is not installed (bash .ci/run installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_pool_and_backend_in_a_real_browser() {
    let good = backend("good").spawn().await;
    let bad = backend("bad").status(500).spawn().await;
    let p = proxy(&two_pools(&good, &bad, "")).await;
    for _ in 0..5 {
        get(&p.url, &[]).await;
    }
    let dom = chromium_dom(&p.admin("/")).await;
    assert!(dom.contains("fulcrum"), "{dom}");
    for needle in [
        "good",
        "bad",
        &good.addr.to_string(),
        &bad.addr.to_string(),
        "round robin",
    ] {
        assert!(
            dom.contains(needle),
            "the dashboard does not show {needle:?}:\n{dom}"
        );
    }
    assert!(
        dom.contains("<span id=\"err\"></span>"),
        "the page reports an error: {dom}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_required_and_the_admin_api_is_not_on_proxy_listeners() {
    let good = backend("good").spawn().await;
    let bad = backend("bad").spawn().await;
    let text = two_pools(&good, &bad, "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"s3cret\"",
    );
    let p = proxy(&text).await;
    for path in ["/status", "/metrics", "/", "/pools/good/backends", "/live"] {
        let (status, _) = call("GET", &p.admin(path), "").await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{path}");
    }
    let (status, _, _) = get(&p.admin("/status"), &[("authorization", "Bearer wrong")]).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, body) = get(&p.admin("/status"), &[("authorization", "Bearer s3cret")]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // Basic auth with the token as password, as a browser sends it (admin:s3cret).
    let (status, _, body) = get(
        &p.admin("/"),
        &[("authorization", "Basic YWRtaW46czNjcmV0")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("<title>fulcrum</title>"));
    // The proxy listener routes /status and /metrics to backends, never to the admin plane.
    for path in ["/status", "/metrics", "/pools/good/backends"] {
        let (_, _, body) = get(&format!("{}{path}", p.url), &[]).await;
        assert_eq!(
            body, "good",
            "{path} reached the admin plane through a proxy listener"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_with_every_field_and_request_ids_travel() {
    let good = backend("good").spawn().await;
    let bad = backend("bad").spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let top = format!(
        "[access_log]\npath = \"{}\"\nformat = \"json\"",
        log.display()
    );
    let p = proxy(&two_pools(&good, &bad, &top)).await;
    let (_, headers, _) = get(
        &format!("{}/a?b=1", p.url),
        &[
            ("x-request-id", "req-42"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
    )
    .await;
    assert_eq!(headers["x-request-id"], "req-42");
    let seen = good.last_headers();
    assert_eq!(seen["x-request-id"], "req-42");
    assert_eq!(
        seen["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    );
    let (_, headers, _) = get(&format!("{}/bytes/1000", p.url), &[]).await;
    let generated = headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(generated.len(), 32);
    assert_eq!(good.last_headers()["x-request-id"], generated.as_str());
    get(&format!("{}/bad/x", p.url), &[]).await;

    let t = Instant::now();
    let lines = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= 3 {
            break lines;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "access log has {} lines",
            lines.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let entries: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("not JSON"))
        .collect();
    for e in &entries {
        for field in [
            "time",
            "client",
            "method",
            "path",
            "status",
            "bytes",
            "duration_ms",
            "pool",
            "backend",
            "upstream_ms",
            "request_id",
        ] {
            assert!(e.get(field).is_some(), "missing {field}: {e}");
        }
    }
    assert_eq!(entries[0]["path"], "/a?b=1");
    assert_eq!(entries[0]["request_id"], "req-42");
    assert_eq!(entries[0]["client"], "127.0.0.1");
    assert_eq!(entries[0]["status"], 200);
    assert_eq!(entries[0]["pool"], "good");
    assert_eq!(entries[1]["bytes"], 1000);
    assert_eq!(entries[1]["request_id"], generated.as_str());
    assert_eq!(entries[2]["pool"], "bad");
}
