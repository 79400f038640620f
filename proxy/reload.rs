//! Every change to the running config goes through [`Shared::apply`], one at a time: the
//! config file (SIGHUP, `POST /reload`, the file watch), the admin pool API, DNS
//! re-resolution and the slow-start ramp. Each change is validated, the next snapshot is
//! built reusing the state of every backend that stays, swapped in whole, and only then are
//! its effects carried out: removed backends drain, health checks follow membership,
//! listeners open and close.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_config::{BackendConfig, Config};
use tokio::task::JoinHandle;

use crate::pool::{Backend, BackendId};
use crate::server::{Drain, Shared};
use crate::snapshot::{self, Resolved, Snapshot};

/// What only the reload path reads and writes (under `Shared::control`).
pub struct Control {
    /// The config file as last loaded: a `dynamic` pool keeps its API membership across a
    /// reload only while its definition in the file is unchanged.
    pub file: Config,
    pub resolved: Resolved,
}

/// One change to the running config.
#[derive(Debug, Clone)]
pub enum Change {
    /// Re-read the config file.
    ReloadFile,
    /// Replace a pool's membership (`PUT /pools/{pool}/backends`).
    SetBackends {
        pool: String,
        backends: Vec<BackendConfig>,
    },
    /// Add one backend (`POST /pools/{pool}/backends`).
    AddBackend {
        pool: String,
        backend: BackendConfig,
    },
    /// Drain and remove one backend, by its address as configured or as resolved.
    RemoveBackend { pool: String, address: String },
    /// Look backend host names up again.
    Resolve,
    /// Rebuild weights for backends in slow start.
    Ramp,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
    #[error("{0}")]
    NotFound(String),
}

impl ChangeError {
    pub fn messages(&self) -> Vec<String> {
        match self {
            ChangeError::Invalid(v) => v.clone(),
            ChangeError::NotFound(m) => vec![m.clone()],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Applied {
    pub generation: u64,
    pub summary: String,
}

impl Shared {
    /// Applies one change (see the module doc). `source` names where it came from in logs.
    pub async fn apply(
        self: &Arc<Self>,
        change: Change,
        source: &str,
    ) -> Result<Applied, ChangeError> {
        let result = self.apply_locked(change.clone(), source).await;
        let quiet = matches!(change, Change::Resolve | Change::Ramp);
        match &result {
            Ok(a) if a.summary == "no change" && quiet => {}
            Ok(a) => {
                self.changes_applied.fetch_add(1, Ordering::Relaxed);
                self.record_history(source, true, a.summary.clone());
                if quiet {
                    tracing::debug!(source, generation = a.generation, "{}", a.summary);
                } else {
                    tracing::info!(source, generation = a.generation, "{}", a.summary);
                }
            }
            Err(e) => {
                self.changes_rejected.fetch_add(1, Ordering::Relaxed);
                self.record_history(source, false, e.to_string());
                for m in e.messages() {
                    tracing::error!(source, error = %m, "change rejected; the running config stays");
                }
            }
        }
        result
    }

    async fn apply_locked(
        self: &Arc<Self>,
        change: Change,
        source: &str,
    ) -> Result<Applied, ChangeError> {
        let mut ctl = self.control.lock().await;
        let current = self.snapshot.load_full();
        let mut next: Config = (*current.config).clone();
        let mut refresh = false;
        let mut new_file = None;
        match &change {
            Change::ReloadFile => {
                let path = self.config_path.as_ref().ok_or_else(|| {
                    ChangeError::Invalid(vec![
                        "no config file to reload (running the embedded demo)".into(),
                    ])
                })?;
                let file = Config::load(path).map_err(|e| {
                    ChangeError::Invalid(e.0.iter().map(|e| e.to_string()).collect())
                })?;
                next = file.clone();
                for (name, pool) in next.pools.iter_mut() {
                    let unchanged = ctl.file.pools.get(name) == file.pools.get(name);
                    if let (true, true, Some(live)) =
                        (pool.dynamic, unchanged, current.config.pools.get(name))
                    {
                        pool.backends = live.backends.clone();
                    }
                }
                if next.admin != current.config.admin {
                    tracing::warn!("[admin] changes take effect at the next restart");
                }
                refresh = true;
                new_file = Some(file);
            }
            Change::SetBackends { pool, backends } => {
                let p = pool_mut(&mut next, pool)?;
                let mut seen = HashSet::new();
                for b in backends {
                    if !seen.insert((b.host.to_ascii_lowercase(), b.port)) {
                        return Err(ChangeError::Invalid(vec![format!(
                            "duplicate backend {:?}",
                            b.address
                        )]));
                    }
                }
                p.backends = backends.clone();
            }
            Change::AddBackend { pool, backend } => {
                let p = pool_mut(&mut next, pool)?;
                if p.backends
                    .iter()
                    .any(|b| b.host.eq_ignore_ascii_case(&backend.host) && b.port == backend.port)
                {
                    return Err(ChangeError::Invalid(vec![format!(
                        "{:?} is already a backend of pool {pool:?}",
                        backend.address
                    )]));
                }
                p.backends.push(backend.clone());
            }
            Change::RemoveBackend { pool, address } => {
                let live = current.pools.get(pool);
                let p = pool_mut(&mut next, pool)?;
                let before = p.backends.len();
                // By the address as configured, or by one it resolved to.
                let resolved_spec = live.and_then(|l| {
                    l.backends
                        .iter()
                        .find(|b| b.addr.to_string() == *address)
                        .map(|b| b.spec.clone())
                });
                p.backends.retain(|b| {
                    b.address != *address && Some(&b.address) != resolved_spec.as_ref()
                });
                if p.backends.len() == before {
                    return Err(ChangeError::NotFound(format!(
                        "pool {pool:?} has no backend {address:?}"
                    )));
                }
            }
            Change::Resolve => {
                if !snapshot::has_names(&next) {
                    return Ok(Applied {
                        generation: current.generation,
                        summary: "no change".into(),
                    });
                }
                refresh = true;
            }
            Change::Ramp => {}
        }

        let new_listeners = match &new_file {
            Some(_) => self
                .prepare_listeners(&next)
                .await
                .map_err(ChangeError::Invalid)?,
            None => Default::default(),
        };
        let resolved = snapshot::resolve(&next, &*self.resolver, &ctl.resolved, refresh).await;
        let revive: Vec<Arc<Backend>> = self
            .drains_lock()
            .iter()
            .map(|d| d.backend.clone())
            .collect();
        let snap = Snapshot::build(Arc::new(next), &resolved, Some(&current), &revive);
        let diff = Diff::between(&current, &snap);
        ctl.resolved = resolved;
        if diff.is_empty() && matches!(change, Change::Resolve) {
            return Ok(Applied {
                generation: current.generation,
                summary: "no change".into(),
            });
        }
        let generation = snap.generation;
        let slow_start: Vec<Duration> = diff
            .added
            .iter()
            .filter_map(|(pool, _)| snap.pools.get(&**pool).and_then(|p| p.config.slow_start))
            .collect();
        let config = snap.config.clone();
        self.snapshot.store(Arc::new(snap));

        // Effects, now that the new snapshot serves.
        let kept: HashSet<BackendId> = self
            .snapshot
            .load()
            .pools
            .values()
            .flat_map(|p| p.backends.iter().map(|b| b.id))
            .collect();
        self.drains_lock().retain(|d| !kept.contains(&d.backend.id));
        for (pool, backend) in &diff.removed {
            self.start_drain(pool.clone(), backend.clone(), config.server.drain_timeout);
        }
        self.sync_health_checks();
        let mut summary = diff.summary(source);
        if let Some(file) = new_file {
            let (opened, closed) = self.commit_listeners(&config, new_listeners).await;
            if opened + closed > 0 {
                summary.push_str(&format!("; listeners +{opened} -{closed}"));
            }
            ctl.file = file;
        }
        if let Some(ramp) = slow_start.into_iter().max() {
            self.schedule_ramp(ramp);
        }
        Ok(Applied {
            generation,
            summary,
        })
    }

    /// Takes a removed backend out of service: it gets no new request (it is in no pool),
    /// `/status` lists it as draining, and once its in-flight requests are done (or
    /// `drain_timeout` passed) its state is dropped, which closes its pooled connections.
    fn start_drain(self: &Arc<Self>, pool: Arc<str>, backend: Arc<Backend>, timeout: Duration) {
        backend.state.draining.store(true, Ordering::Relaxed);
        self.drains_lock().push(Drain {
            pool: pool.clone(),
            backend: backend.clone(),
            since: std::time::Instant::now(),
        });
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let s = &backend.state;
            while s.draining.load(Ordering::Relaxed)
                && s.in_flight.load(Ordering::Relaxed) > 0
                && tokio::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            if !s.draining.load(Ordering::Relaxed) {
                return; // put back in a pool meanwhile
            }
            let left = s.in_flight.load(Ordering::Relaxed);
            // Open WebSocket sessions get a proper close now.
            let _ = s.close_sessions.send(true);
            if left > 0 {
                tracing::warn!(pool = %pool, backend = %backend.addr, left, "drain timeout: backend dropped with requests in flight");
            } else {
                tracing::info!(pool = %pool, backend = %backend.addr, "backend drained");
            }
            if let Some(shared) = weak.upgrade() {
                shared
                    .drains_lock()
                    .retain(|d| !Arc::ptr_eq(&d.backend, &backend));
            }
        });
    }

    /// Rebuilds the weights ten times over a slow-start period.
    fn schedule_ramp(self: &Arc<Self>, ramp: Duration) {
        let weak = Arc::downgrade(self);
        let step = (ramp / 10).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let end = tokio::time::Instant::now() + ramp + step;
            while tokio::time::Instant::now() < end {
                tokio::time::sleep(step).await;
                let Some(shared) = weak.upgrade() else { return };
                let _ = shared.apply(Change::Ramp, "slow start").await;
            }
        });
    }
}

fn pool_mut<'a>(
    config: &'a mut Config,
    pool: &str,
) -> Result<&'a mut fulcrum_config::PoolConfig, ChangeError> {
    config
        .pools
        .get_mut(pool)
        .ok_or_else(|| ChangeError::NotFound(format!("no pool named {pool:?}")))
}

/// Which backends joined and left, per pool.
struct Diff {
    added: Vec<(Arc<str>, Arc<Backend>)>,
    removed: Vec<(Arc<str>, Arc<Backend>)>,
    pools_added: Vec<String>,
    pools_removed: Vec<String>,
}

impl Diff {
    fn between(old: &Snapshot, new: &Snapshot) -> Diff {
        let mut d = Diff {
            added: Vec::new(),
            removed: Vec::new(),
            pools_added: Vec::new(),
            pools_removed: Vec::new(),
        };
        let ids = |s: &Snapshot, name: &str| -> HashSet<BackendId> {
            s.pools
                .get(name)
                .map(|p| p.backends.iter().map(|b| b.id).collect())
                .unwrap_or_default()
        };
        for (name, pool) in &new.pools {
            if !old.pools.contains_key(name) {
                d.pools_added.push(name.clone());
            }
            let before = ids(old, name);
            for b in &pool.backends {
                if !before.contains(&b.id) {
                    d.added.push((pool.name.clone(), b.clone()));
                }
            }
        }
        for (name, pool) in &old.pools {
            if !new.pools.contains_key(name) {
                d.pools_removed.push(name.clone());
            }
            let after = ids(new, name);
            for b in &pool.backends {
                if !after.contains(&b.id) {
                    d.removed.push((pool.name.clone(), b.clone()));
                }
            }
        }
        d
    }

    fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.pools_added.is_empty()
            && self.pools_removed.is_empty()
    }

    /// `pool api: +2 -1 backends; pool web: +1 -0 backends`
    fn summary(&self, source: &str) -> String {
        let mut per_pool: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for (p, _) in &self.added {
            per_pool.entry(p).or_default().0 += 1;
        }
        for (p, _) in &self.removed {
            per_pool.entry(p).or_default().1 += 1;
        }
        let mut parts: Vec<String> = per_pool
            .iter()
            .map(|(p, (a, r))| format!("pool {p}: +{a} -{r} backends"))
            .collect();
        if !self.pools_added.is_empty() {
            parts.push(format!("pools added: {}", self.pools_added.join(", ")));
        }
        if !self.pools_removed.is_empty() {
            parts.push(format!("pools removed: {}", self.pools_removed.join(", ")));
        }
        if parts.is_empty() {
            format!("{source}: applied, membership unchanged")
        } else {
            format!("{source}: {}", parts.join("; "))
        }
    }
}

/// Re-resolves backend host names every `resolve_interval` (read from the live config at
/// each turn), so DNS-driven membership follows the records.
pub fn spawn_resolve_loop(shared: &Arc<Shared>) -> JoinHandle<()> {
    let weak = Arc::downgrade(shared);
    tokio::spawn(async move {
        loop {
            let interval = match weak.upgrade() {
                Some(s) => s.snapshot.load().config.server.resolve_interval,
                None => return,
            };
            tokio::time::sleep(interval.max(Duration::from_millis(10))).await;
            let Some(shared) = weak.upgrade() else { return };
            let _ = shared.apply(Change::Resolve, "dns").await;
        }
    })
}

/// Watches the config file (its directory, since editors and config managers replace the
/// file) and reloads once writes have been quiet for 200 ms.
pub fn spawn_file_watch(shared: &Arc<Shared>, path: PathBuf) -> notify::Result<JoinHandle<()>> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let _ = tx.send(ev);
        }
    })?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .to_path_buf();
    watcher.watch(&dir, notify::RecursiveMode::NonRecursive)?;
    let name = path.file_name().map(|n| n.to_os_string());
    let weak = Arc::downgrade(shared);
    Ok(tokio::spawn(async move {
        let _watcher = watcher; // dropped with the task
        while let Some(ev) = rx.recv().await {
            if !ev
                .paths
                .iter()
                .any(|p| p.file_name().map(|n| n.to_os_string()) == name)
            {
                continue;
            }
            // Debounce: a save is often several events.
            loop {
                match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let Some(shared) = weak.upgrade() else { return };
            let _ = shared.apply(Change::ReloadFile, "file watch").await;
        }
    }))
}
