//! Cost of one pick for every algorithm at 4, 64 and 1,024 backends, on one thread and with
//! two threads contending on the same selector; and proof that no pick allocates.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use fulcrum::balance::{self, PickCtx, Selector};
use fulcrum::config::{Algorithm, PoolConfig};
use fulcrum::pool::{Backend, BackendState};
use fulcrum::upstream::UpstreamClient;

#[path = "support/counting.rs"]
mod counting;

const ALGORITHMS: [(&str, Algorithm, Option<f64>); 6] = [
    ("round_robin", Algorithm::RoundRobin, None),
    ("weighted_round_robin", Algorithm::WeightedRoundRobin, None),
    ("least_connections", Algorithm::LeastConnections, None),
    ("least_response_time", Algorithm::LeastResponseTime, None),
    ("ip_hash", Algorithm::IpHash, None),
    ("ip_hash_bounded", Algorithm::IpHash, Some(1.25)),
];

fn pool(
    n: usize,
    algorithm: Algorithm,
    factor: Option<f64>,
) -> (Vec<Arc<Backend>>, Box<dyn Selector>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _enter = rt.enter();
    let load = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let backends: Vec<Arc<Backend>> = (0..n)
        .map(|i| {
            let addr: SocketAddr = format!("10.{}.{}.1:8080", i / 250, i % 250)
                .parse()
                .unwrap();
            let state = Arc::new(
                BackendState::new(
                    UpstreamClient::new(
                        Duration::from_secs(1),
                        addr,
                        None,
                        fulcrum::config::UpstreamProtocol::Http1,
                    ),
                    Duration::from_millis(1 + (i % 7) as u64),
                    true,
                )
                .with_pool_load(load.clone()),
            );
            let in_flight = (i * 7 % 13) as u64;
            state.in_flight.store(in_flight, Ordering::Relaxed);
            load.fetch_add(in_flight, Ordering::Relaxed);
            Arc::new(Backend::new(
                "bench",
                addr,
                addr.to_string(),
                1 + (i % 3) as u32,
                state,
            ))
        })
        .collect();
    let mut config = PoolConfig::new("bench", algorithm, Vec::new());
    config.hash_balance_factor = factor;
    let selector = balance::build(&config, &backends);
    (backends, selector)
}

fn one_pick(selector: &dyn Selector, backends: &[Arc<Backend>], client: IpAddr) -> Option<usize> {
    let eligible = |i: usize| backends[i].state.is_eligible();
    selector.pick(
        backends,
        &PickCtx {
            client,
            eligible: &eligible,
        },
    )
}

fn client(i: u64) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(
        (i as u32).wrapping_mul(2_654_435_761),
    ))
}

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    for (name, algorithm, factor) in ALGORITHMS {
        for n in [4usize, 64, 1024] {
            let (backends, selector) = pool(n, algorithm, factor);
            // No pick allocates.
            let before = counting::allocations();
            for i in 0..10_000 {
                black_box(one_pick(selector.as_ref(), &backends, client(i)));
            }
            let allocs = counting::allocations() - before;
            assert_eq!(
                allocs, 0,
                "{name} at {n} backends allocated {allocs} times in 10,000 picks"
            );

            let mut i = 0u64;
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/1thread"), n),
                &n,
                |b, _| {
                    b.iter(|| {
                        i += 1;
                        black_box(one_pick(selector.as_ref(), &backends, client(i)))
                    })
                },
            );
            let shared = Arc::new((backends, selector));
            group.bench_with_input(
                BenchmarkId::new(format!("{name}/2threads"), n),
                &n,
                |b, _| {
                    // Both threads pick from the same selector; reported: wall time per pick of
                    // one thread (so contention shows as a larger number).
                    b.iter_custom(|iters| {
                        let start = Instant::now();
                        let threads: Vec<_> = (0..2)
                            .map(|t| {
                                let shared = shared.clone();
                                std::thread::spawn(move || {
                                    for i in 0..iters {
                                        black_box(one_pick(
                                            shared.1.as_ref(),
                                            &shared.0,
                                            client(i * 2 + t),
                                        ));
                                    }
                                })
                            })
                            .collect();
                        for t in threads {
                            t.join().unwrap();
                        }
                        start.elapsed()
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
