//! fulcrum: an L7 load balancer and reverse proxy.
//!
//! One request flows `listener` → `service` (one `ArcSwap` snapshot load) → `route` →
//! `pool` (a `balance` selector) → `upstream` → back through `body`. The `server` owns the
//! shared state and applies reloads; `admin` serves the operator's plane.
// Unsafe code is denied everywhere but in `upgrade::adopt` (taking ownership of a socket
// received with SCM_RIGHTS), the one place the standard library leaves no safe way.
#![deny(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod balance;
pub mod body;
pub mod breaker;
pub mod clock;
pub mod compress;
pub mod dashboard;
pub mod demo;
pub mod error;
pub mod grpc;
pub mod h1parse;
pub mod headers;
pub mod health;
pub mod http1;
pub mod listener;
pub mod metrics;
pub mod padded;
pub mod park;
pub mod pool;
pub mod proxy_protocol;
pub mod ratelimit;
pub mod rawfields;
pub mod reload;
pub mod route;
pub mod sendbatch;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod spares;
pub mod spin;
pub mod sticky;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod websocket;
pub mod workers;

pub use fulcrum_config as config;
pub use server::{start, start_inherited, start_with, Running, Shared};
