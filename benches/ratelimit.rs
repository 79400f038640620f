//! Cost of one rate-limit check: uncontended (many keys, one thread) and with two threads
//! hammering one hot key.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use fulcrum::config::{RateLimitConfig, RateLimitKey};
use fulcrum::ratelimit::RateLimiter;

fn limiter() -> RateLimiter {
    RateLimiter::new(
        RateLimitConfig {
            per_second: 1e9,
            burst: u32::MAX / 2,
            key: RateLimitKey::ClientIp,
            global: false,
            deny_on_store_error: false,
        },
        1,
    )
}

fn checks(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit");
    g.warm_up_time(Duration::from_millis(300));
    g.measurement_time(Duration::from_secs(2));
    let l = limiter();
    let headers = http::HeaderMap::new();
    let mut i = 0u32;
    g.bench_function("check/1thread/10k_keys", |b| {
        b.iter(|| {
            i = i.wrapping_add(1);
            let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::from(i % 10_000));
            let key = l.key(ip, &headers);
            black_box(l.check_local(key, fulcrum::balance::ewma::now_ns()))
        })
    });
    let shared = Arc::new(limiter());
    g.bench_function("check/2threads/one_hot_key", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            let threads: Vec<_> = (0..2)
                .map(|_| {
                    let l = shared.clone();
                    std::thread::spawn(move || {
                        for _ in 0..iters {
                            black_box(l.check_local(42, fulcrum::balance::ewma::now_ns()));
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
            start.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, checks);
criterion_main!(benches);
