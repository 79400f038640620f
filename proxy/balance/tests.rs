//! The algorithms side by side: each alone over hand-made backends, with explicit in-flight
//! counts, latencies and clocks.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::ewma::{now_ns, DEFAULT_RTT};
use super::*;
use crate::pool::{Backend, BackendState};
use crate::upstream::UpstreamClient;

fn backends(weights: &[u32]) -> Vec<Arc<Backend>> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| backend(i, w))
        .collect()
}

fn backend(i: usize, weight: u32) -> Arc<Backend> {
    let addr: SocketAddr = format!("10.0.{}.{}:8080", i / 250, i % 250 + 1)
        .parse()
        .unwrap();
    let state = Arc::new(BackendState::new(
        UpstreamClient::new(
            Duration::from_secs(1),
            "127.0.0.1:9".parse().unwrap(),
            None,
            fulcrum_config::UpstreamProtocol::Http1,
        ),
        DEFAULT_RTT,
        true,
    ));
    Arc::new(Backend::new("p", addr, addr.to_string(), weight, state))
}

fn pick_with(
    s: &dyn Selector,
    b: &[Arc<Backend>],
    client: IpAddr,
    down: &[usize],
) -> Option<usize> {
    let eligible = |i: usize| !down.contains(&i);
    s.pick(
        b,
        &PickCtx {
            client,
            eligible: &eligible,
        },
    )
}

fn pick(s: &dyn Selector, b: &[Arc<Backend>]) -> usize {
    pick_with(s, b, "127.0.0.1".parse().unwrap(), &[]).unwrap()
}

fn client(i: u32) -> IpAddr {
    IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i * 7919))
}

// ---- round-robin family --------------------------------------------------------------

#[test]
fn every_selector_skips_ineligible_and_reports_none() {
    let b = backends(&[1, 2, 3]);
    let selectors: Vec<Box<dyn Selector>> = vec![
        Box::new(RoundRobin::new()),
        Box::new(WeightedRoundRobin::new(&[1, 2, 3])),
        Box::new(LeastConnections::new(1)),
        Box::new(LeastResponseTime::new(1)),
        Box::new(IpHash::new(
            &b.iter().map(|x| x.id.0).collect::<Vec<_>>(),
            &[1, 2, 3],
            Some(1.25),
        )),
    ];
    for s in &selectors {
        for c in 0..50 {
            let got = pick_with(s.as_ref(), &b, client(c), &[0, 2]);
            assert_eq!(got, Some(1));
        }
        assert_eq!(pick_with(s.as_ref(), &b, client(1), &[0, 1, 2]), None);
        assert_eq!(
            s.pick(
                &[],
                &PickCtx {
                    client: client(1),
                    eligible: &|_| true
                }
            ),
            None
        );
    }
}

// ---- least connections ---------------------------------------------------------------

#[test]
fn least_connections_picks_the_minimum_relative_to_weight() {
    let b = backends(&[1, 1, 1]);
    b[0].state.in_flight.store(5, Ordering::Relaxed);
    b[1].state.in_flight.store(2, Ordering::Relaxed);
    b[2].state.in_flight.store(7, Ordering::Relaxed);
    let lc = LeastConnections::new(3);
    for _ in 0..10 {
        assert_eq!(pick(&lc, &b), 1);
    }
    // Weighted: (5+1)/4 = 1.5 beats (2+1)/1 = 3.
    let b = backends(&[4, 1]);
    b[0].state.in_flight.store(5, Ordering::Relaxed);
    b[1].state.in_flight.store(2, Ordering::Relaxed);
    assert_eq!(pick(&lc, &b), 0);
}

#[test]
fn least_connections_spreads_ties_evenly() {
    let b = backends(&[1, 1, 1, 1]);
    let lc = LeastConnections::new(3);
    let mut count = [0; 4];
    for _ in 0..400 {
        count[pick(&lc, &b)] += 1;
    }
    assert_eq!(count, [100; 4]);
}

#[test]
fn least_connections_two_choices_on_large_pools_avoid_the_busy() {
    let b = backends(&[1; 100]);
    for (i, x) in b.iter().enumerate() {
        x.state
            .in_flight
            .store(if i < 50 { 100 } else { 0 }, Ordering::Relaxed);
    }
    let lc = LeastConnections::new(9);
    let busy = (0..10_000).filter(|_| pick(&lc, &b) < 50).count();
    // P2C picks a busy one only when both draws are busy: about a quarter of the time.
    assert!(busy < 2_700, "{busy}");
}

// ---- least response time -------------------------------------------------------------

static CLOCK: AtomicU64 = AtomicU64::new(0);
fn test_clock() -> u64 {
    CLOCK.load(Ordering::Relaxed)
}

#[test]
fn least_response_time_prefers_the_fast_and_returns_to_the_recovered() {
    let b = backends(&[1, 1, 1]);
    let t0 = 1_000_000_000_000;
    CLOCK.store(t0, Ordering::Relaxed);
    let lrt = LeastResponseTime::with_clock(5, test_clock);
    b[0].state.latency.set(Duration::from_millis(2), t0);
    b[1].state.latency.set(Duration::from_millis(50), t0);
    b[2].state.latency.set(Duration::from_millis(3), t0);
    let mut count = [0; 3];
    for _ in 0..300 {
        count[pick(&lrt, &b)] += 1;
    }
    assert_eq!(count[1], 0, "{count:?}");
    // Load counts too: the fastest with many in flight loses to the next.
    b[0].state.in_flight.store(10, Ordering::Relaxed);
    assert_eq!(pick(&lrt, &b), 2);
    b[0].state.in_flight.store(0, Ordering::Relaxed);

    // Backend 1 failed (penalty), then recovered; nobody samples it, so its estimate fades
    // and it wins traffic back once it is below the others'.
    b[1].state.latency.set(super::ewma::FAILURE_PENALTY, t0);
    let mut t = t0;
    let mut came_back = None;
    for step in 0..600 {
        t += 100_000_000; // 100 ms
        CLOCK.store(t, Ordering::Relaxed);
        // The others keep being measured at their usual latency.
        b[0].state.latency.observe(Duration::from_millis(2), t);
        b[2].state.latency.observe(Duration::from_millis(3), t);
        if pick(&lrt, &b) == 1 {
            came_back = Some(step);
            break;
        }
    }
    let step = came_back.expect("the recovered backend never got traffic back");
    assert!(step > 50, "came back too soon: {step}");
}

#[test]
fn a_failure_counts_as_slow() {
    let b = backends(&[1, 1]);
    let guard = crate::pool::InFlight::begin(&b[0].state);
    guard.record(Duration::from_micros(100), false); // a fast 500
    drop(guard);
    let guard = crate::pool::InFlight::begin(&b[1].state);
    guard.record(Duration::from_millis(20), true);
    drop(guard);
    let lrt = LeastResponseTime::new(1);
    for _ in 0..20 {
        assert_eq!(pick(&lrt, &b), 1);
    }
}

// ---- ip hash -------------------------------------------------------------------------

fn ip_hash(b: &[Arc<Backend>], factor: Option<f64>) -> IpHash {
    IpHash::new(
        &b.iter().map(|x| x.id.0).collect::<Vec<_>>(),
        &b.iter().map(|x| x.weight).collect::<Vec<_>>(),
        factor,
    )
}

fn mapping(b: &[Arc<Backend>], s: &IpHash, clients: u32) -> Vec<SocketAddr> {
    (0..clients)
        .map(|c| b[pick_with(s, b, client(c), &[]).unwrap()].addr)
        .collect()
}

#[test]
fn ip_hash_is_stable_and_the_same_on_every_instance() {
    let b = backends(&[1; 10]);
    let one = ip_hash(&b, None);
    let two = ip_hash(&backends(&[1; 10]), None); // another "instance"
    assert_eq!(one.table(), two.table());
    for c in 0..100 {
        let first = pick_with(&one, &b, client(c), &[]);
        for _ in 0..5 {
            assert_eq!(pick_with(&one, &b, client(c), &[]), first);
        }
    }
}

#[test]
fn ip_hash_moves_few_clients_when_one_backend_joins_or_leaves() {
    let all = backends(&[1; 11]);
    let ten = all[..10].to_vec();
    let before = mapping(&ten, &ip_hash(&ten, None), 10_000);
    let added = mapping(&all, &ip_hash(&all, None), 10_000);
    let moved = before.iter().zip(&added).filter(|(a, b)| a != b).count();
    assert!(moved <= 1_500, "adding one of 11 moved {moved} of 10,000");
    let nine: Vec<_> = ten
        .iter()
        .filter(|x| x.addr != ten[4].addr)
        .cloned()
        .collect();
    let removed = mapping(&nine, &ip_hash(&nine, None), 10_000);
    let moved = before.iter().zip(&removed).filter(|(a, b)| a != b).count();
    // The removed backend's clients (about a tenth) must move; few others may.
    assert!(moved <= 1_500, "removing one of 10 moved {moved} of 10,000");
}

#[test]
fn ip_hash_honours_weights() {
    let b = backends(&[1, 2, 3, 4]);
    let s = ip_hash(&b, None);
    let mut count: HashMap<SocketAddr, usize> = HashMap::new();
    for a in mapping(&b, &s, 100_000) {
        *count.entry(a).or_default() += 1;
    }
    for (i, x) in b.iter().enumerate() {
        let share = count[&x.addr] as f64 / 100_000.0;
        let want = (i + 1) as f64 / 10.0;
        assert!(
            (share - want).abs() / want < 0.05,
            "backend {i}: {share} vs {want}"
        );
    }
}

#[test]
fn ip_hash_moves_an_unhealthy_backends_clients_and_brings_them_back() {
    let b = backends(&[1; 5]);
    let s = ip_hash(&b, None);
    let home: Vec<usize> = (0..1000)
        .map(|c| pick_with(&s, &b, client(c), &[]).unwrap())
        .collect();
    let during: Vec<usize> = (0..1000)
        .map(|c| pick_with(&s, &b, client(c), &[2]).unwrap())
        .collect();
    for c in 0..1000 {
        if home[c] == 2 {
            assert_ne!(during[c], 2);
        } else {
            assert_eq!(during[c], home[c], "a client of a healthy backend moved");
        }
    }
    let after: Vec<usize> = (0..1000)
        .map(|c| pick_with(&s, &b, client(c), &[]).unwrap())
        .collect();
    assert_eq!(after, home);
}

#[test]
fn ip_hash_bounded_load_caps_a_hot_backend() {
    let b = backends(&[1; 4]);
    let load = Arc::new(AtomicU64::new(0));
    let s = ip_hash(&b, Some(1.25)).with_load(load.clone());
    let hot = client(1);
    let home = pick_with(&s, &b, hot, &[]).unwrap();
    // The hot client's backend holds all 10 requests of the pool, far above the mean
    // (cap = ceil(1.25 * 11 / 4) = 4): its requests overflow to the next.
    b[home].state.in_flight.store(10, Ordering::Relaxed);
    load.store(10, Ordering::Relaxed);
    let overflow = pick_with(&s, &b, hot, &[]).unwrap();
    assert_ne!(overflow, home);
    // Without the factor it stays home.
    let plain = ip_hash(&b, None);
    assert_eq!(pick_with(&plain, &b, hot, &[]).unwrap(), home);
}

// ---- state belongs to the backend ----------------------------------------------------

#[test]
fn rebuilt_selectors_see_the_same_live_counters() {
    let b = backends(&[1, 1]);
    b[0].state.in_flight.store(3, Ordering::Relaxed);
    let now = now_ns();
    b[1].state.latency.set(Duration::from_millis(40), now);
    b[0].state.latency.set(Duration::from_millis(1), now);
    // A "reload": new Backend values (new weights even) over the same states.
    let rebuilt: Vec<Arc<Backend>> = b
        .iter()
        .map(|x| {
            Arc::new(Backend::new(
                "p",
                x.addr,
                x.spec.clone(),
                1,
                x.state.clone(),
            ))
        })
        .collect();
    assert_eq!(pick(&LeastConnections::new(1), &rebuilt), 1);
    b[0].state.in_flight.store(0, Ordering::Relaxed);
    assert_eq!(pick(&LeastResponseTime::new(1), &rebuilt), 0);
}
