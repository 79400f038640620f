//! Rate limits per route: GCRA (the token bucket as one timestamp) per key, in a sharded
//! `DashMap` so no global lock is taken; each key's state is one `AtomicU64` updated by
//! compare-and-swap. Idle keys are swept, so memory stays bounded however many clients come.
//!
//! Fleet-wide limits (`scope = "global"`) count in Redis instead: one pipelined
//! `INCR` + `EXPIRE` per request on a fixed window of `burst / per_second` seconds; when
//! Redis does not answer in time, `on_store_error` decides (allow: the local limiter
//! applies; deny: 429).

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use fulcrum_config::{RateLimitConfig, RateLimitKey, RedisConfig};
use http::HeaderMap;

/// What a check decided, with what the `RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The quota (`RateLimit-Limit`).
    pub limit: u32,
    /// Requests left now (`RateLimit-Remaining`).
    pub remaining: u32,
    /// Seconds until the quota is whole again (`RateLimit-Reset`).
    pub reset: u64,
    /// Seconds to wait before retrying (`Retry-After`), when refused.
    pub retry_after: u64,
}

/// The generic cell rate algorithm: `burst` requests at once, refilled at `per_second`.
#[derive(Debug, Clone, Copy)]
pub struct Gcra {
    /// Nanoseconds between two requests at the sustained rate.
    interval: u64,
    /// How far the theoretical arrival time may run ahead of now: `burst * interval`.
    tolerance: u64,
    burst: u32,
}

fn ceil_secs(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

impl Gcra {
    pub fn new(per_second: f64, burst: u32) -> Gcra {
        let interval = (1e9 / per_second).max(1.0) as u64;
        Gcra {
            interval,
            tolerance: interval.saturating_mul(burst as u64),
            burst,
        }
    }

    /// Checks one request at `now` (ns) against the key's theoretical arrival time `tat`.
    pub fn check(&self, tat: &AtomicU64, now: u64) -> Decision {
        let mut current = tat.load(Ordering::Acquire);
        loop {
            let base = current.max(now);
            let next = base + self.interval;
            if next - now > self.tolerance {
                let wait = next - now - self.tolerance;
                return Decision {
                    allowed: false,
                    limit: self.burst,
                    remaining: 0,
                    reset: ceil_secs(base - now),
                    retry_after: ceil_secs(wait).max(1),
                };
            }
            match tat.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    let used = next - now;
                    return Decision {
                        allowed: true,
                        limit: self.burst,
                        remaining: ((self.tolerance - used) / self.interval) as u32,
                        reset: ceil_secs(used),
                        retry_after: 0,
                    };
                }
                Err(actual) => current = actual,
            }
        }
    }
}

/// One route's limiter.
pub struct RateLimiter {
    pub config: RateLimitConfig,
    gcra: Gcra,
    /// Theoretical arrival time per key hash (ns on the process clock).
    keys: DashMap<u64, AtomicU64>,
    hasher: std::collections::hash_map::RandomState,
    /// Distinguishes routes in the shared store.
    pub route_id: u64,
}

/// Bytes one idle key costs at most once swept maps are shrunk: the entry (16 bytes), the
/// table slot and control byte, and headroom for the shard's growth factor.
pub const BYTES_PER_KEY: usize = 48;

impl RateLimiter {
    pub fn new(config: RateLimitConfig, route_id: u64) -> RateLimiter {
        RateLimiter {
            gcra: Gcra::new(config.per_second, config.burst),
            config,
            keys: DashMap::new(),
            hasher: Default::default(),
            route_id,
        }
    }

    /// The key of a request: its client, a header (the client when the header is absent),
    /// or the route as a whole.
    pub fn key(&self, client: IpAddr, headers: &HeaderMap) -> u64 {
        let mut h = self.hasher.build_hasher();
        match &self.config.key {
            RateLimitKey::Route => 0u8.hash(&mut h),
            RateLimitKey::Header(name) => match headers.get(name.as_str()) {
                Some(v) => (1u8, v.as_bytes()).hash(&mut h),
                None => (2u8, client).hash(&mut h),
            },
            RateLimitKey::ClientIp => (2u8, client).hash(&mut h),
        }
        h.finish()
    }

    /// A stable key for the shared store (the same on every instance): FNV of the key's text.
    pub fn store_key(&self, client: IpAddr, headers: &HeaderMap) -> String {
        match &self.config.key {
            RateLimitKey::Route => format!("fulcrum:rl:{:x}:route", self.route_id),
            RateLimitKey::Header(name) => match headers.get(name.as_str()) {
                Some(v) => format!(
                    "fulcrum:rl:{:x}:h:{:x}",
                    self.route_id,
                    crate::sticky::hash_value(v.as_bytes())
                ),
                None => format!("fulcrum:rl:{:x}:ip:{client}", self.route_id),
            },
            RateLimitKey::ClientIp => format!("fulcrum:rl:{:x}:ip:{client}", self.route_id),
        }
    }

    pub fn check_local(&self, key: u64, now: u64) -> Decision {
        if let Some(tat) = self.keys.get(&key) {
            return self.gcra.check(&tat, now);
        }
        let entry = self.keys.entry(key).or_insert_with(|| AtomicU64::new(0));
        self.gcra.check(&entry, now)
    }

    /// Drops every key whose bucket is full again (it is the same as no entry) and returns
    /// how many remain. Maps are shrunk, so memory follows the live keys down.
    pub fn sweep(&self, now: u64) -> usize {
        self.keys.retain(|_, tat| tat.load(Ordering::Relaxed) > now);
        self.keys.shrink_to_fit();
        self.keys.len()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Bytes the key table holds (capacity, not just entries).
    pub fn memory(&self) -> usize {
        self.keys.capacity() * BYTES_PER_KEY
    }

    /// A fleet-wide check in the shared store (fixed window of `burst / per_second`).
    pub async fn check_global(&self, store: &RedisStore, key: &str) -> Result<Decision, String> {
        let window = (self.config.burst as f64 / self.config.per_second)
            .ceil()
            .max(1.0) as u64;
        let now_s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let slot = now_s / window;
        let reset = (slot + 1) * window - now_s;
        let count = store.incr(&format!("{key}:{slot}"), window * 2).await?;
        let limit = self.config.burst;
        Ok(Decision {
            allowed: count <= limit as u64,
            limit,
            remaining: (limit as u64).saturating_sub(count) as u32,
            reset,
            retry_after: reset.max(1),
        })
    }
}

/// The shared store for global limits: one multiplexed Redis connection, made on first
/// use and made again (at most once a second) after it fails.
pub struct RedisStore {
    client: Option<redis::Client>,
    conn: tokio::sync::Mutex<Option<redis::aio::ConnectionManager>>,
    last_failure: AtomicU64,
    pub timeout: Duration,
}

impl RedisStore {
    pub fn new(config: &RedisConfig) -> RedisStore {
        let client = match redis::Client::open(config.url.as_str()) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "redis url not usable; global limits use their fallback");
                None
            }
        };
        RedisStore {
            client,
            conn: tokio::sync::Mutex::new(None),
            last_failure: AtomicU64::new(0),
            timeout: config.timeout,
        }
    }

    async fn connection(&self) -> Result<redis::aio::ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let now = crate::balance::ewma::now_ns();
        let last = self.last_failure.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < 1_000_000_000 {
            return Err("redis unreachable (retrying in a moment)".into());
        }
        let client = self.client.clone().ok_or("no redis client")?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout.max(Duration::from_millis(100)))
            .set_response_timeout(self.timeout)
            .set_number_of_retries(0);
        match tokio::time::timeout(
            self.timeout.max(Duration::from_millis(200)),
            redis::aio::ConnectionManager::new_with_config(client, config),
        )
        .await
        {
            Ok(Ok(c)) => {
                *slot = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => {
                self.last_failure.store(now.max(1), Ordering::Relaxed);
                Err(e.to_string())
            }
            Err(_) => {
                self.last_failure.store(now.max(1), Ordering::Relaxed);
                Err("redis connect timed out".into())
            }
        }
    }

    /// `INCR key` and `EXPIRE key ttl` in one round trip; returns the count.
    pub async fn incr(&self, key: &str, ttl: u64) -> Result<u64, String> {
        let mut conn = self.connection().await?;
        let mut pipe = redis::pipe();
        pipe.incr(key, 1u64).expire(key, ttl as i64).ignore();
        match tokio::time::timeout(self.timeout, pipe.query_async::<(u64,)>(&mut conn)).await {
            Ok(Ok((n,))) => Ok(n),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("redis did not answer in time".into()),
        }
    }
}

/// Sweeps every route's limiter of the current snapshot every few seconds.
pub fn spawn_sweeper(shared: &Arc<crate::Shared>) -> tokio::task::JoinHandle<()> {
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let Some(shared) = weak.upgrade() else { return };
            let now = crate::balance::ewma::now_ns();
            for route in shared.snapshot.load().router.routes() {
                if let Some(l) = &route.limiter {
                    l.sweep(now);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn limiter(per_second: f64, burst: u32, key: RateLimitKey) -> RateLimiter {
        RateLimiter::new(
            RateLimitConfig {
                per_second,
                burst,
                key,
                global: false,
                deny_on_store_error: false,
            },
            1,
        )
    }

    #[test]
    fn burst_of_300_at_100_per_second_burst_200_is_200_then_100_refused() {
        let l = limiter(100.0, 200, RateLimitKey::ClientIp);
        let t0 = 10 * S;
        let results: Vec<Decision> = (0..300).map(|_| l.check_local(7, t0)).collect();
        assert_eq!(results.iter().filter(|d| d.allowed).count(), 200);
        assert!(results[..200].iter().all(|d| d.allowed));
        let refused = &results[200];
        assert!(!refused.allowed);
        assert_eq!(
            (refused.limit, refused.remaining, refused.retry_after),
            (200, 0, 1)
        );
        assert_eq!(refused.reset, 2, "the whole burst refills in 2 s");
        assert_eq!(results[0].remaining, 199);

        // Tokens come back at 100/s: after 50 ms, 5 more.
        let later: Vec<bool> = (0..10)
            .map(|_| l.check_local(7, t0 + S / 20).allowed)
            .collect();
        assert_eq!(later.iter().filter(|a| **a).count(), 5);
        // After 2 s the bucket is whole again.
        let whole = (0..250)
            .filter(|_| l.check_local(7, t0 + 3 * S).allowed)
            .count();
        assert_eq!(whole, 200);
    }

    #[test]
    fn keys_are_independent() {
        let l = limiter(1.0, 2, RateLimitKey::ClientIp);
        let h = HeaderMap::new();
        let a = l.key("10.0.0.1".parse().unwrap(), &h);
        let b = l.key("10.0.0.2".parse().unwrap(), &h);
        assert_ne!(a, b);
        assert!(l.check_local(a, S).allowed && l.check_local(a, S).allowed);
        assert!(!l.check_local(a, S).allowed);
        assert!(l.check_local(b, S).allowed);

        let l = limiter(1.0, 1, RateLimitKey::Header("x-api-key".into()));
        let mut h1 = HeaderMap::new();
        h1.insert("x-api-key", "one".parse().unwrap());
        let mut h2 = HeaderMap::new();
        h2.insert("x-api-key", "two".parse().unwrap());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_ne!(l.key(ip, &h1), l.key(ip, &h2));
        assert_eq!(l.key(ip, &h1), l.key("10.9.9.9".parse().unwrap(), &h1));
    }

    #[test]
    fn a_million_keys_are_swept_back_to_nothing() {
        let l = limiter(10.0, 20, RateLimitKey::ClientIp);
        for k in 0..1_000_000u64 {
            assert!(l.check_local(k, S).allowed);
        }
        assert_eq!(l.len(), 1_000_000);
        let full = l.memory();
        eprintln!(
            "1,000,000 live keys: {:.1} MiB of key table",
            full as f64 / 1048576.0
        );
        assert!(full <= 1_000_000 * BYTES_PER_KEY * 2, "{full} bytes");
        // Every bucket is whole again 2 s later: the sweep drops them all.
        assert_eq!(l.sweep(3 * S), 0);
        assert!(
            l.memory() <= 64 * 1024 * BYTES_PER_KEY,
            "{} bytes after the sweep",
            l.memory()
        );
    }

    #[test]
    fn concurrent_checks_never_exceed_the_burst() {
        let l = Arc::new(limiter(1.0, 1000, RateLimitKey::Route));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    (0..1000).filter(|_| l.check_local(0, S).allowed).count()
                })
            })
            .collect();
        let total: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(total, 1000);
    }
}
