//! The running server: the shared state (the `ArcSwap<Snapshot>` and what the reload path
//! owns), listeners and the admin plane, health-check tasks, and graceful shutdown.
//! Changes to the running config all go through `reload::apply` (see `reload.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use fulcrum_config::{Config, HealthCheckConfig, HealthCheckKind, ListenerConfig};
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::health;
use crate::listener::{self, Listener};
use crate::pool::{Backend, BackendId};
use crate::reload::{self, Control};
use crate::snapshot::{self, Resolver, Snapshot, SystemResolver};
use crate::tls::TlsState;

/// A backend taken out of its pool, finishing its in-flight requests.
pub struct Drain {
    pub pool: Arc<str>,
    pub backend: Arc<Backend>,
    pub since: std::time::Instant,
}

/// One listening socket and its accept loop.
pub struct ListenerHandle {
    pub config: ListenerConfig,
    pub addr: SocketAddr,
    /// The listening socket, for a binary upgrade's hand-over (valid while `task` runs).
    pub fd: std::os::fd::RawFd,
    pub tls: Option<Arc<TlsState>>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// One applied or rejected change, for `/status` and the dashboard.
#[derive(Clone, serde::Serialize)]
pub struct HistoryEntry {
    /// Seconds since the Unix epoch.
    pub at: u64,
    pub source: String,
    pub ok: bool,
    pub summary: String,
}

/// State shared by every listener task, the admin plane and the reload path.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Set when shutdown starts: `/ready` answers 503 from then on.
    pub draining: AtomicBool,
    /// The file reloads read; `None` for the embedded demo config.
    pub config_path: Option<PathBuf>,
    pub resolver: Arc<dyn Resolver>,
    /// What only the reload path touches; its lock makes changes one at a time.
    pub(crate) control: tokio::sync::Mutex<Control>,
    /// The active health check task of every checked backend, with the config it runs.
    checks: Mutex<HashMap<BackendId, (JoinHandle<()>, HealthCheckConfig)>>,
    /// Backends being drained (shown by `/status`).
    pub drains: Mutex<Vec<Drain>>,
    pub(crate) listeners: Mutex<Vec<ListenerHandle>>,
    pub(crate) builder: auto::Builder<TokioExecutor>,
    graceful: Mutex<Option<Arc<GracefulShutdown>>>,
    pub changes_applied: AtomicU64,
    pub changes_rejected: AtomicU64,
    /// Open upgraded sessions (WebSocket), all backends.
    pub sessions: Arc<AtomicU64>,
    /// Set when shutdown's drain time is up: open sessions close.
    pub close_sessions: watch::Sender<bool>,
    /// Set when shutdown closes idle keep-alive connections (fulcrum's own HTTP/1.1 side;
    /// hyper's connections hear it through the graceful watcher).
    pub closing: Closing,
    /// Idle keep-alive connections parked off their tasks, per worker.
    pub parking: crate::park::Parking,
    pub history: Mutex<VecDeque<HistoryEntry>>,
    /// The store of fleet-wide rate limits (`[redis]`), made at start.
    pub redis: Option<crate::ratelimit::RedisStore>,
    /// Rate-limit checks that found the store unavailable.
    pub store_errors: AtomicU64,
    pub access_log: Option<Arc<crate::accesslog::AccessLog>>,
    /// Set when a new binary took the sockets over: this process drains and exits.
    pub upgraded: tokio::sync::Notify,
    admin_fd: std::sync::OnceLock<std::os::fd::RawFd>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Re-reads the config file (SIGHUP, `POST /reload`): the new generation, or every error.
    pub async fn reload(self: &Arc<Self>) -> Result<u64, Vec<String>> {
        self.apply(reload::Change::ReloadFile, "reload")
            .await
            .map(|a| a.generation)
            .map_err(|e| e.messages())
    }

    pub fn drains_lock(&self) -> std::sync::MutexGuard<'_, Vec<Drain>> {
        lock(&self.drains)
    }

    /// Every listening socket with its name (and the admin socket), for a hand-over.
    pub fn handover_fds(&self) -> Vec<(String, std::os::fd::RawFd)> {
        let mut v: Vec<_> = lock(&self.listeners)
            .iter()
            .map(|h| (h.config.name.clone(), h.fd))
            .collect();
        if let Some(fd) = self.admin_fd.get() {
            v.push((crate::upgrade::ADMIN.to_string(), *fd));
        }
        v
    }

    /// `(name, bound address)` of every listener.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        lock(&self.listeners)
            .iter()
            .map(|l| (l.config.name.clone(), l.addr))
            .collect()
    }

    pub(crate) fn record_history(&self, source: &str, ok: bool, summary: String) {
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut h = lock(&self.history);
        if h.len() == 50 {
            h.pop_front();
        }
        h.push_back(HistoryEntry {
            at,
            source: source.to_string(),
            ok,
            summary,
        });
    }

    /// Starts the health checks of backends that joined (or whose check config changed) and
    /// stops those of backends that left, after a snapshot swap.
    pub fn sync_health_checks(self: &Arc<Self>) {
        let snap = self.snapshot.load();
        let mut checks = lock(&self.checks);
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
        for (_, (task, _)) in lock(&self.checks).drain() {
            task.abort();
        }
    }

    /// Prepares the listeners of `config` before anything is swapped: binds the sockets of
    /// listeners that are new or moved, and loads the TLS files of every TLS listener. A
    /// listener that cannot bind, or a certificate that does not load, rejects the change.
    pub(crate) async fn prepare_listeners(
        &self,
        config: &Config,
    ) -> Result<ListenerPlan, Vec<String>> {
        let running: Vec<(String, SocketAddr, Option<Arc<TlsState>>)> = lock(&self.listeners)
            .iter()
            .map(|h| (h.config.name.clone(), h.config.listen, h.tls.clone()))
            .collect();
        let mut plan = ListenerPlan::default();
        let mut errors = Vec::new();
        for l in &config.listeners {
            let kept = running
                .iter()
                .find(|(n, a, _)| *n == l.name && *a == l.listen);
            match (kept, &l.tls) {
                (Some((_, _, Some(state))), Some(tls)) => match crate::tls::server_config(tls) {
                    Ok(c) => plan.tls_swaps.push((state.clone(), c)),
                    Err(e) => errors.push(format!("listener {:?}: {e}", l.name)),
                },
                (Some(_), _) => {}
                (None, _) => {
                    let tls = match l.tls.as_ref().map(TlsState::new).transpose() {
                        Ok(t) => t,
                        Err(e) => {
                            errors.push(format!("listener {:?}: {e}", l.name));
                            continue;
                        }
                    };
                    match TcpListener::bind(l.listen).await {
                        Ok(s) => plan.new.push((l.clone(), s, tls)),
                        Err(e) => errors.push(format!(
                            "listener {:?}: cannot bind {}: {e}",
                            l.name, l.listen
                        )),
                    }
                }
            }
        }
        if errors.is_empty() {
            Ok(plan)
        } else {
            Err(errors)
        }
    }

    /// Starts the listeners `prepare_listeners` bound, swaps in reloaded certificates (new
    /// handshakes use them; open connections keep theirs), then stops the listeners `config`
    /// no longer has (new sockets accept before old ones close; kept ones are untouched).
    pub(crate) async fn commit_listeners(
        self: &Arc<Self>,
        config: &Config,
        plan: ListenerPlan,
    ) -> (usize, usize) {
        for (state, c) in plan.tls_swaps {
            state.config.store(c);
        }
        let added = plan.new.len();
        for (cfg, socket, tls) in plan.new {
            if let Err(e) = self.spawn_listener(cfg, socket, tls, https_port(config)) {
                tracing::error!(error = %e, "listener failed to start");
            }
        }
        let wanted: HashSet<(String, SocketAddr)> = config
            .listeners
            .iter()
            .map(|l| (l.name.clone(), l.listen))
            .collect();
        let stopped: Vec<ListenerHandle> = {
            let mut all = lock(&self.listeners);
            let (keep, stop): (Vec<_>, Vec<_>) = all
                .drain(..)
                .partition(|h| wanted.contains(&(h.config.name.clone(), h.config.listen)));
            *all = keep;
            stop
        };
        let removed = stopped.len();
        for h in stopped {
            let _ = h.stop.send(true);
            let _ = h.task.await;
            tracing::info!(listener = %h.config.name, addr = %h.addr, "listener closed");
        }
        (added, removed)
    }

    fn spawn_listener(
        self: &Arc<Self>,
        config: ListenerConfig,
        socket: TcpListener,
        tls: Option<Arc<TlsState>>,
        https_port: u16,
    ) -> std::io::Result<()> {
        let addr = socket.local_addr()?;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&socket);
        let graceful = lock(&self.graceful)
            .clone()
            .ok_or_else(|| std::io::Error::other("shutting down"))?;
        let (stop, stop_rx) = watch::channel(false);
        let server = self.snapshot.load().config.server.clone();
        tracing::info!(listener = %config.name, %addr, tls = tls.is_some(), "listening");
        // One accept loop per listener, on this (control) runtime; with per-core workers it
        // hands each connection to the least-loaded worker (`workers::assign`).
        let l = Listener::new(&config, socket, &server, tls.clone(), https_port);
        let task = tokio::spawn(l.run(self.clone(), graceful, stop_rx));
        lock(&self.listeners).push(ListenerHandle {
            config,
            addr,
            fd,
            tls,
            stop,
            task,
        });
        Ok(())
    }
}

/// Tells fulcrum's own idle keep-alive connections to close, at shutdown. One `Notify` per
/// worker thread: an idle connection registers with its own worker's, so waiting never
/// takes a lock another core uses (a `watch` channel shares its waiter lists between all
/// threads, and its wait future is twice the size of a `Notified`).
pub struct Closing {
    set: AtomicBool,
    per_worker: Box<[tokio::sync::Notify]>,
}

impl Closing {
    fn new() -> Closing {
        Closing {
            set: AtomicBool::new(false),
            per_worker: (0..crate::workers::slots().max(1))
                .map(|_| tokio::sync::Notify::new())
                .collect(),
        }
    }

    /// This thread's notification (call `enable` on it, then check [`Closing::is_set`]).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        let i = crate::workers::slot().min(self.per_worker.len() - 1);
        self.per_worker[i].notified()
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::SeqCst)
    }

    fn close(&self) {
        self.set.store(true, Ordering::SeqCst);
        for n in self.per_worker.iter() {
            n.notify_waiters();
        }
    }
}

/// How long a draining process keeps answering on open keep-alive connections (with
/// `Connection: close`) before it closes the idle ones.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);

/// What a reload does to listeners, prepared before the swap.
#[derive(Default)]
pub(crate) struct ListenerPlan {
    new: Vec<(ListenerConfig, TcpListener, Option<Arc<TlsState>>)>,
    tls_swaps: Vec<(Arc<TlsState>, Arc<rustls::ServerConfig>)>,
}

/// Where `redirect_https` sends clients: the first TLS listener's port, else 443.
fn https_port(config: &Config) -> u16 {
    config
        .listeners
        .iter()
        .find(|l| l.tls.is_some())
        .map_or(443, |l| l.listen.port())
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
        if let Some(m) = &state.metrics {
            if ok {
                &m.health_checks_ok
            } else {
                &m.health_checks_failed
            }
            .increment(1);
        }
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
            let probe = health::HttpProbe::new(b.state.client.clone(), b, &cfg.path);
            tokio::spawn(health::run(probe, cfg, jitter, on_result))
        }
        HealthCheckKind::Grpc => {
            let probe = crate::grpc::GrpcProbe::new(b.state.client.clone(), b, &cfg.grpc_service);
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
    /// `(name, bound address)` of every listener at start, in config order.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: SocketAddr,
    stop_admin: watch::Sender<bool>,
    background: Vec<JoinHandle<()>>,
}

/// Binds every listener and the admin plane and starts serving `config`.
pub async fn start(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Running> {
    start_with(config, config_path, Arc::new(SystemResolver)).await
}

/// [`start`] with another resolver for backend host names.
pub async fn start_with(
    config: Config,
    config_path: Option<PathBuf>,
    resolver: Arc<dyn Resolver>,
) -> anyhow::Result<Running> {
    start_inherited(config, config_path, resolver, HashMap::new()).await
}

/// [`start`] on sockets handed over by a running fulcrum (binary upgrade): a listener whose
/// name is in `inherited` (and whose port matches) serves on that socket instead of binding.
pub async fn start_inherited(
    config: Config,
    config_path: Option<PathBuf>,
    resolver: Arc<dyn Resolver>,
    mut inherited: HashMap<String, std::net::TcpListener>,
) -> anyhow::Result<Running> {
    let mut take = |name: &str, want: SocketAddr| -> Option<TcpListener> {
        let l = inherited.remove(name)?;
        let addr = l.local_addr().ok()?;
        let fits = (want.port() == 0 || want.port() == addr.port())
            && (want.ip().is_unspecified() || want.ip() == addr.ip());
        if fits {
            TcpListener::from_std(l).ok()
        } else {
            None
        }
    };
    crate::metrics::install();
    let access_log = match &config.access_log {
        Some(cfg) => Some(
            crate::accesslog::AccessLog::start(cfg)
                .with_context(|| format!("access_log: cannot open {}", cfg.path))?,
        ),
        None => None,
    };
    let resolved = snapshot::resolve(&config, &*resolver, &Default::default(), true).await;
    let mut sockets = Vec::new();
    for l in &config.listeners {
        let socket = match take(&l.name, l.listen) {
            Some(s) => s,
            None => TcpListener::bind(l.listen)
                .await
                .with_context(|| format!("listener {:?}: cannot bind {}", l.name, l.listen))?,
        };
        let tls = l
            .tls
            .as_ref()
            .map(TlsState::new)
            .transpose()
            .map_err(|e| anyhow::anyhow!("listener {:?}: {e}", l.name))?;
        sockets.push((l.clone(), socket, tls));
    }
    let admin_socket = match take(crate::upgrade::ADMIN, config.admin.listen) {
        Some(s) => s,
        None => TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("admin: cannot bind {}", config.admin.listen))?,
    };
    let admin = admin_socket.local_addr()?;

    let builder = listener::http_builder(&config.server);
    let watch_config = config.server.watch_config;
    let redis = config.redis.clone();
    let upgrade_socket = config.server.upgrade_socket.clone();
    let control = Control {
        file: config.clone(),
        resolved: resolved.clone(),
    };
    let snapshot = Snapshot::build(Arc::new(config), &resolved, None, &[]);
    let shared = Arc::new(Shared {
        snapshot: ArcSwap::from_pointee(snapshot),
        draining: AtomicBool::new(false),
        config_path: config_path.clone(),
        resolver,
        control: tokio::sync::Mutex::new(control),
        checks: Mutex::new(HashMap::new()),
        drains: Mutex::new(Vec::new()),
        listeners: Mutex::new(Vec::new()),
        builder,
        graceful: Mutex::new(Some(Arc::new(GracefulShutdown::new()))),
        changes_applied: AtomicU64::new(0),
        changes_rejected: AtomicU64::new(0),
        sessions: Arc::new(AtomicU64::new(0)),
        close_sessions: watch::channel(false).0,
        closing: Closing::new(),
        parking: crate::park::Parking::new(),
        history: Mutex::new(VecDeque::new()),
        redis: redis.as_ref().map(crate::ratelimit::RedisStore::new),
        store_errors: AtomicU64::new(0),
        access_log,
        upgraded: tokio::sync::Notify::new(),
        admin_fd: std::sync::OnceLock::new(),
    });
    let _ = shared
        .admin_fd
        .set(std::os::fd::AsRawFd::as_raw_fd(&admin_socket));
    shared.sync_health_checks();
    let port = https_port(&shared.snapshot.load().config);
    for (cfg, socket, tls) in sockets {
        shared.spawn_listener(cfg, socket, tls, port)?;
    }
    let (stop_admin, admin_rx) = watch::channel(false);
    tracing::info!(%admin, "admin listening");
    let mut background = vec![tokio::spawn(crate::admin::run(
        admin_socket,
        shared.clone(),
        admin_rx,
    ))];
    background.push(reload::spawn_resolve_loop(&shared));
    background.push(crate::ratelimit::spawn_sweeper(&shared));
    if let Some(path) = &upgrade_socket {
        crate::upgrade::serve(std::path::Path::new(path), &shared)
            .with_context(|| format!("upgrade_socket: cannot listen on {path}"))?;
    }
    if let (true, Some(path)) = (watch_config, &config_path) {
        match reload::spawn_file_watch(&shared, path.clone()) {
            Ok(task) => background.push(task),
            Err(e) => {
                tracing::error!(error = %e, path = %path.display(), "cannot watch the config file")
            }
        }
    }
    Ok(Running {
        listeners: shared.listener_addrs(),
        shared,
        admin,
        stop_admin,
        background,
    })
}

impl Running {
    /// The bound address of the listener called `name` (as it is now, after reloads).
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.shared
            .listener_addrs()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| a)
            .unwrap_or_else(|| panic!("no listener named {name:?}"))
    }

    /// Graceful shutdown: `/ready` turns 503, listeners stop accepting, in-flight requests
    /// finish (up to `drain_timeout`). Returns whether everything finished in time.
    pub async fn shutdown(self) -> bool {
        let shared = &self.shared;
        shared.draining.store(true, Ordering::SeqCst);
        let drain_timeout: Duration = shared.snapshot.load().config.server.drain_timeout;
        tracing::info!(?drain_timeout, "shutting down: draining connections");
        let handles: Vec<ListenerHandle> = lock(&shared.listeners).drain(..).collect();
        for h in &handles {
            let _ = h.stop.send(true);
        }
        for h in handles {
            let _ = h.task.await;
        }
        // Every accept loop has ended and dropped its handle, so this is the last one.
        let deadline = tokio::time::Instant::now() + drain_timeout;
        // A short grace first: busy keep-alive connections get `Connection: close` on their
        // next answer and leave cleanly; only the idle rest is closed by the shutdown below.
        tokio::time::sleep(SHUTDOWN_GRACE.min(drain_timeout)).await;
        let graceful = lock(&shared.graceful).take();
        shared.closing.close();
        shared.parking.close();
        let mut clean = match graceful.map(Arc::try_unwrap) {
            Some(Ok(graceful)) => tokio::time::timeout_at(deadline, graceful.shutdown())
                .await
                .is_ok(),
            _ => false,
        };
        // Upgraded sessions left hyper's connections: wait for them too, then close them.
        while shared.sessions.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        if shared.sessions.load(Ordering::Relaxed) > 0 {
            clean = false;
            let _ = shared.close_sessions.send(true);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if clean {
            tracing::info!("all connections drained");
        } else {
            tracing::warn!("drain timeout reached: closing the remaining connections");
        }
        let _ = self.stop_admin.send(true);
        for t in self.background {
            t.abort();
        }
        shared.stop_health_checks();
        clean
    }
}
