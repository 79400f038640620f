//! The running server: binds listeners and the admin plane, holds the shared state
//! (the `ArcSwap<Snapshot>`), applies reloads, and shuts down gracefully.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use fulcrum_config::{Config, HealthCheckConfig, HealthCheckKind};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{watch, Mutex};
use tokio::task::JoinHandle;

use crate::health;
use crate::listener::{self, Listener};
use crate::pool::{Backend, BackendId};
use crate::snapshot::{self, Snapshot};

/// State shared by every listener task, the admin plane and the reload path.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Set when shutdown starts: `/ready` answers 503 from then on.
    pub draining: AtomicBool,
    /// The file reloads read; `None` for the embedded demo config.
    pub config_path: Option<PathBuf>,
    /// One reload at a time.
    reload_lock: Mutex<()>,
    /// The active health check task of every checked backend, with the config it runs.
    checks: std::sync::Mutex<HashMap<BackendId, (JoinHandle<()>, HealthCheckConfig)>>,
}

impl Shared {
    /// Re-reads the config file and swaps in a new snapshot that keeps the state of every
    /// backend that stays. A config that fails validation is rejected; the running one stays.
    pub async fn reload(self: &Arc<Self>) -> Result<u64, Vec<String>> {
        let _one = self.reload_lock.lock().await;
        let Some(path) = &self.config_path else {
            return Err(vec![
                "no config file to reload (running the embedded demo)".into()
            ]);
        };
        let config = match Config::load(path) {
            Ok(c) => c,
            Err(errors) => {
                let errors: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
                for e in &errors {
                    tracing::error!(error = %e, "reload rejected");
                }
                return Err(errors);
            }
        };
        let previous = self.snapshot.load_full();
        if config.listeners != previous.config.listeners || config.admin != previous.config.admin {
            tracing::warn!("listener and admin changes take effect at the next restart");
        }
        let resolved = snapshot::resolve(&config).await;
        let next = Snapshot::build(Arc::new(config), &resolved, Some(&previous));
        let generation = next.generation;
        self.snapshot.store(Arc::new(next));
        self.sync_health_checks();
        tracing::info!(generation, "config reloaded");
        Ok(generation)
    }

    /// Starts the health checks of backends that joined (or whose check config changed) and
    /// stops those of backends that left, after a snapshot swap.
    pub fn sync_health_checks(self: &Arc<Self>) {
        let snap = self.snapshot.load();
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        let mut keep = HashSet::new();
        for pool in snap.pools.values() {
            // Health may have changed between the build and the swap: count again.
            pool.recount_healthy();
            let hc = &pool.config.health_check;
            if !hc.enabled {
                continue;
            }
            for b in &pool.backends {
                keep.insert(b.id);
                if checks.get(&b.id).is_some_and(|(_, c)| c == hc) {
                    continue;
                }
                if let Some((old, _)) = checks.remove(&b.id) {
                    old.abort();
                }
                let task = spawn_check(Arc::downgrade(self), pool.name.clone(), b, hc.clone());
                checks.insert(b.id, (task, hc.clone()));
            }
        }
        checks.retain(|id, (task, _)| {
            let k = keep.contains(id);
            if !k {
                task.abort();
            }
            k
        });
    }

    fn stop_health_checks(&self) {
        let mut checks = self.checks.lock().unwrap_or_else(|e| e.into_inner());
        for (_, (task, _)) in checks.drain() {
            task.abort();
        }
    }
}

/// One backend's active check task. Results go to the backend's `Health`; a transition is
/// logged and recounted by the backend's pool in the current snapshot.
fn spawn_check(
    shared: Weak<Shared>,
    pool: Arc<str>,
    b: &Backend,
    cfg: HealthCheckConfig,
) -> JoinHandle<()> {
    let state = b.state.clone();
    let id = b.id;
    let jitter = health::jitter_for(id.0, cfg.interval);
    let record_cfg = cfg.clone();
    let on_result = move |ok: bool| {
        let Some(t) = state.health.record(ok, true, &record_cfg) else {
            return;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let snap = shared.snapshot.load();
        if let Some(pool) = snap.pools.get(&*pool) {
            if let Some(b) = pool.backends.iter().find(|b| b.id == id) {
                pool.health_transition(b, t, "active check");
            }
        }
    };
    match cfg.kind {
        HealthCheckKind::Http => {
            let probe = health::HttpProbe::new(b.state.client.clone(), b.addr, &cfg.path);
            tokio::spawn(health::run(probe, cfg, jitter, on_result))
        }
        HealthCheckKind::Tcp => tokio::spawn(health::run(
            health::TcpProbe(b.addr),
            cfg,
            jitter,
            on_result,
        )),
    }
}

/// A started server. Dropping it does not stop it; call [`Running::shutdown`].
pub struct Running {
    pub shared: Arc<Shared>,
    /// `(name, bound address)` of every listener, in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    stop_accepting: watch::Sender<bool>,
    stop_admin: watch::Sender<bool>,
    graceful: Arc<GracefulShutdown>,
    tasks: Vec<JoinHandle<()>>,
    drain_timeout: Duration,
}

/// Binds every listener and the admin plane and starts serving `config`.
pub async fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Running> {
    let resolved = snapshot::resolve(&config).await;
    let drain_timeout = config.server.drain_timeout;
    let builder = listener::http_builder(&config.server);
    let mut sockets = Vec::new();
    for l in &config.listeners {
        let socket = TcpListener::bind(l.listen)
            .await
            .with_context(|| format!("listener {:?}: cannot bind {}", l.name, l.listen))?;
        sockets.push((l.name.clone(), socket));
    }
    let admin_socket = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("admin: cannot bind {}", config.admin.listen))?;
    let admin = admin_socket.local_addr()?;

    let snapshot = Snapshot::build(Arc::new(config), &resolved, None);
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        draining: AtomicBool::new(false),
        config_path,
        reload_lock: Mutex::new(()),
        checks: std::sync::Mutex::new(HashMap::new()),
    });
    shared.sync_health_checks();

    let (stop_accepting, accepting_rx) = watch::channel(false);
    let (stop_admin, admin_rx) = watch::channel(false);
    let graceful = Arc::new(GracefulShutdown::new());
    let mut tasks = Vec::new();
    let mut listeners = Vec::new();
    for (name, socket) in sockets {
        let addr = socket.local_addr()?;
        tracing::info!(listener = %name, %addr, "listening");
        listeners.push((name.clone(), addr));
        let l = Listener {
            name: Arc::from(name.as_str()),
            socket,
        };
        tasks.push(tokio::spawn(l.run(
            shared.clone(),
            builder.clone(),
            graceful.clone(),
            accepting_rx.clone(),
        )));
    }
    tracing::info!(%admin, "admin listening");
    tokio::spawn(crate::admin::run(admin_socket, shared.clone(), admin_rx));

    Ok(Running {
        shared,
        listeners,
        admin,
        stop_accepting,
        stop_admin,
        graceful,
        tasks,
        drain_timeout,
    })
}

impl Running {
    /// The bound address of the listener called `name`.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no listener named {name:?}"))
    }

    /// Graceful shutdown: `/ready` turns 503, listeners stop accepting, in-flight requests
    /// finish (up to `drain_timeout`). Returns whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        self.shared.draining.store(true, Ordering::SeqCst);
        tracing::info!(drain_timeout = ?self.drain_timeout, "shutting down: draining connections");
        let _ = self.stop_accepting.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        // Every accept loop has ended and dropped its handle, so this is the last one.
        let clean = match Arc::try_unwrap(self.graceful) {
            Ok(graceful) => tokio::time::timeout(self.drain_timeout, graceful.shutdown())
                .await
                .is_ok(),
            Err(_) => false,
        };
        if clean {
            tracing::info!("all connections drained");
        } else {
            tracing::warn!("drain timeout reached: closing the remaining connections");
        }
        let _ = self.stop_admin.send(true);
        self.shared.stop_health_checks();
        clean
    }
}
