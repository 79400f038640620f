//! The hot path piece by piece: the head parser, the route lookup, the header rewrite, and one whole request
//! through the proxy service (client → fulcrum → backend on loopback, keep-alive both sides)
//! beside the same request sent straight to the backend. A counting allocator reports the
//! heap allocations each costs; the whole-request figure is fulcrum's share (proxied minus
//! direct).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use fulcrum::config::Config;
use fulcrum::snapshot::Snapshot;

#[path = "support/counting.rs"]
mod counting;

/// Allocations per call of `f`, over `n` calls.
fn allocs_per_call(n: usize, mut f: impl FnMut()) -> f64 {
    let before = counting::allocations();
    for _ in 0..n {
        f();
    }
    (counting::allocations() - before) as f64 / n as f64
}

/// 24 routes: exact hosts, wildcard hosts, prefixes, and a catch-all, as a mid-size edge has.
fn router_config() -> String {
    let mut c = String::from(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n",
    );
    c += "[pools.p]\nbackends = [{ address = \"127.0.0.1:9\" }]\n";
    c += "[pools.p.health_check]\nenabled = false\n";
    for i in 0..8 {
        c += &format!("[[routes]]\nhost = \"svc{i}.example.com\"\npath_prefix = \"/api/v{i}\"\npool = \"p\"\n");
        c += &format!("[[routes]]\nhost = \"svc{i}.example.com\"\npool = \"p\"\n");
    }
    for i in 0..7 {
        c += &format!("[[routes]]\nhost = \"*.zone{i}.example.net\"\npool = \"p\"\n");
    }
    c += "[[routes]]\npool = \"p\"\n";
    c
}

fn router(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = Config::parse(&router_config(), "bench.toml").unwrap();
    let snap = rt.block_on(async {
        let resolved = fulcrum::snapshot::resolve(
            &config,
            &fulcrum::snapshot::SystemResolver,
            &Default::default(),
            true,
        )
        .await;
        Snapshot::build(Arc::new(config), &resolved, None, &[])
    });
    let headers = HeaderMap::new();
    let cases = [
        ("exact_host_prefix", "svc5.example.com", "/api/v5/users/42"),
        ("exact_host_mixed_case_port", "SVC5.example.com:8080", "/x"),
        ("wildcard_host", "a.zone3.example.net", "/"),
        ("catch_all", "unknown.example.org", "/index.html"),
    ];
    let mut g = c.benchmark_group("router");
    for (name, host, path) in cases {
        assert!(snap
            .router
            .find("http", Some(host), path, &headers)
            .is_some());
        let a = allocs_per_call(1000, || {
            black_box(snap.router.find("http", Some(host), path, &headers));
        });
        eprintln!("router/{name}: {a:.2} allocations per lookup");
        g.bench_function(name, |b| {
            b.iter(|| {
                black_box(snap.router.find(
                    "http",
                    black_box(Some(host)),
                    black_box(path),
                    &headers,
                ))
            })
        });
    }
    g.finish();
}

/// What a browser sends, plus a proxy hop before us.
fn browser_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("host", "shop.example.com"),
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        ),
        (
            "accept",
            "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
        ),
        ("accept-language", "en-GB,en;q=0.5"),
        ("accept-encoding", "gzip, deflate, br"),
        ("connection", "keep-alive"),
        ("cookie", "session=abc123; theme=dark"),
        ("upgrade-insecure-requests", "1"),
        ("x-forwarded-for", "203.0.113.9"),
    ] {
        h.append(k, HeaderValue::from_static(v));
    }
    h
}

fn header_rewrite(c: &mut Criterion) {
    let template = browser_headers();
    let host = HeaderValue::from_static("shop.example.com");
    let peer: std::net::IpAddr = "10.1.2.3".parse().unwrap();
    let rewrite = |h: &mut HeaderMap| {
        fulcrum::headers::strip_hop_by_hop(h);
        fulcrum::headers::add_forwarded(h, peer, true, Some(&host));
    };
    let mut probe = template.clone();
    rewrite(&mut probe);
    assert!(!probe.contains_key("connection"));
    assert_eq!(probe["x-forwarded-for"], "203.0.113.9, 10.1.2.3");
    // Allocations of one rewrite, beyond those of copying the request's headers.
    let rewrite_allocs = |request: &HeaderMap| {
        allocs_per_call(1000, || {
            let mut h = request.clone();
            rewrite(&mut h);
            black_box(h);
        }) - allocs_per_call(1000, || {
            black_box(request.clone());
        })
    };
    let a = rewrite_allocs(&template);
    eprintln!("headers/rewrite: {a:.2} allocations per request (9 browser headers)");
    // The same request from a client that sent no X-Forwarded-For: its value is the
    // worker's shared one for that address, not a new one.
    let mut direct = template.clone();
    direct.remove("x-forwarded-for");
    let a = rewrite_allocs(&direct);
    eprintln!("headers/rewrite: {a:.2} allocations per request (8, no X-Forwarded-For)");
    let mut g = c.benchmark_group("headers");
    g.bench_function("rewrite_browser_request", |b| {
        b.iter_batched_ref(
            || template.clone(),
            |h| rewrite(h),
            criterion::BatchSize::SmallInput,
        )
    });
    let mut response = HeaderMap::new();
    for (k, v) in [
        ("content-type", "text/html; charset=utf-8"),
        ("content-length", "5120"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
        ("cache-control", "no-cache"),
        ("date", "Fri, 27 Nov 2026 02:00:00 GMT"),
    ] {
        response.append(k, HeaderValue::from_static(v));
    }
    g.bench_function("strip_response", |b| {
        b.iter_batched_ref(
            || response.clone(),
            fulcrum::headers::strip_hop_by_hop,
            criterion::BatchSize::SmallInput,
        )
    });
    g.finish();
}

/// What oha sends and what the anchors' nginx backend answers: the heads every proxied request
/// of the load tests parses.
const OHA_REQUEST: &[u8] = b"GET / HTTP/1.1\r\naccept: */*\r\naccept-encoding: gzip, compress, deflate, br\r\nuser-agent: oha/1.16.0\r\nhost: 127.0.0.1:8080\r\n\r\n";
const NGINX_RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 07:31:07 GMT\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: keep-alive\r\n\r\nok\n";

/// fulcrum's parser for plain heads beside `httparse`, which it falls back to.
fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.bench_function("request_h1parse", |b| {
        b.iter(|| {
            let mut spans = fulcrum::headers::Spans::new();
            black_box(fulcrum::h1parse::request(
                black_box(OHA_REQUEST),
                &mut spans,
            ));
            black_box(spans.len())
        })
    });
    g.bench_function("request_httparse", |b| {
        b.iter(|| {
            // As fulcrum calls it: slots left uninitialised.
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; 100];
            let mut r = httparse::Request::new(&mut []);
            black_box(
                r.parse_with_uninit_headers(black_box(OHA_REQUEST), &mut headers)
                    .is_ok(),
            );
            black_box(r.headers.len())
        })
    });
    g.bench_function("response_h1parse", |b| {
        b.iter(|| {
            let mut spans = fulcrum::headers::Spans::new();
            black_box(fulcrum::h1parse::response(
                black_box(NGINX_RESPONSE),
                &mut spans,
            ));
            black_box(spans.len())
        })
    });
    g.bench_function("response_httparse", |b| {
        b.iter(|| {
            let mut headers = [const { std::mem::MaybeUninit::uninit() }; 128];
            let mut r = httparse::Response::new(&mut []);
            black_box(
                httparse::ParserConfig::default()
                    .parse_response_with_uninit_headers(
                        &mut r,
                        black_box(NGINX_RESPONSE),
                        &mut headers,
                    )
                    .is_ok(),
            );
            black_box(r.headers.len())
        })
    });
    g.finish();
}

async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok\n"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    addr
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

async fn one(send: &mut Sender) {
    let req = Request::get("/")
        .header("host", "bench")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok\n");
}

fn request(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (mut direct, mut proxied, _running) = rt.block_on(async {
        let b = backend().await;
        let config = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:0\"\n\
             [[routes]]\npool = \"p\"\n[pools.p]\nbackends = [{{ address = \"{b}\" }}]\n\
             [pools.p.health_check]\nenabled = false\n"
        );
        let running = fulcrum::start(Config::parse(&config, "bench.toml").unwrap(), None)
            .await
            .unwrap();
        let direct = connect(b).await;
        let proxied = connect(running.listeners[0].1).await;
        (direct, proxied, running)
    });
    rt.block_on(async {
        for _ in 0..100 {
            one(&mut proxied).await;
        }
    });
    let d = allocs_per_call(2000, || rt.block_on(one(&mut direct)));
    let p = allocs_per_call(2000, || rt.block_on(one(&mut proxied)));
    eprintln!(
        "request: {p:.1} allocations proxied, {d:.1} direct: fulcrum's share {:.1} per request",
        p - d
    );
    let mut g = c.benchmark_group("request");
    g.bench_function("direct", |b| b.iter(|| rt.block_on(one(&mut direct))));
    g.bench_function("through_fulcrum", |b| {
        b.iter(|| rt.block_on(one(&mut proxied)))
    });
    g.finish();
}

criterion_group!(benches, parse, router, header_rewrite, request);
criterion_main!(benches);
