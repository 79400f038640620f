//! Parked connections: plain HTTP/1.1 keep-alive connections that have been idle for
//! `[server] idle_park_after` leave their task and wait in their worker's set.
//!
//! Why: a connection with a task of its own costs the task (its future, about 500 bytes, and
//! tokio's header), a readiness slot in the reactor and a timer entry — about 1.2 KiB for a
//! client that may stay silent for a minute. A parked one is a socket, its connection info and
//! its guards in a slab entry (about 200 bytes), registered in one `mio::Poll` per worker
//! whose descriptor the worker's reactor watches, plus one deadline in a heap. nginx keeps its
//! idle keep-alive connections in the same shape (a connection struct, no buffers).
//!
//! When a parked socket becomes readable its connection is resumed: a new task serves it on
//! the same worker from the next request on. A socket closed by its client is dropped here
//! without a task. The idle timeout still runs from the end of the last exchange, and
//! shutdown closes every parked connection at once.
//!
//! Parking costs four `epoll_ctl` calls per idle period (leave the reactor, join the set,
//! and back), which is why only connections idle for a while are parked.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use hyper_util::server::graceful::Watcher;
use mio::unix::SourceFd;
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::listener::Guards;
use crate::server::Shared;
use crate::service::ConnInfo;

/// A connection waiting in a set: everything its task held between requests.
pub(crate) struct Parked {
    pub stream: std::net::TcpStream,
    pub info: ConnInfo,
    pub graceful: Watcher,
    pub guards: Guards,
    /// When its idle timeout ends.
    pub due: Instant,
}

/// The sets of one server, one per worker thread (slot), each made on its first use.
pub struct Parking {
    per_worker: Box<[Mutex<Option<Set>>]>,
    /// The control plane's runtime (the accept loops'): asked to release memory too, because
    /// the small task that hands each accepted connection to its worker is allocated there.
    control: Option<tokio::runtime::Handle>,
}

struct Set {
    registry: mio::Registry,
    conns: Slab<Parked>,
    /// Deadlines, earliest first; an entry whose connection has left (or whose slot now holds
    /// a later connection) is skipped when it comes up.
    due: BinaryHeap<Reverse<(Instant, usize)>>,
    /// Tells the set's task that its earliest deadline, or `closed`, changed.
    wake: Arc<Notify>,
    closed: bool,
    /// Connections were parked since the allocator was last asked to release memory.
    dirty: bool,
}

/// How long a set stays without new parked connections before the allocator is asked to
/// return what their tasks freed (see [`set_release`]).
const QUIET: Duration = Duration::from_secs(2);

static RELEASE: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// Sets how freed memory is returned to the system. The binary sets it, because it chose the
/// allocator: mimalloc returns the pages of a burst of finished tasks only lazily, on later
/// allocator activity that an idle server does not have, so the resident size would keep the
/// tasks that parking freed.
pub fn set_release(f: fn()) {
    let _ = RELEASE.set(f);
}

impl Set {
    /// Takes the connection in slot `key` (which must be there) out of the set and its poll.
    fn take(&mut self, key: usize) -> Parked {
        let conn = self.conns.remove(key);
        let fd = conn.stream.as_raw_fd();
        let _ = self.registry.deregister(&mut SourceFd(&fd));
        conn
    }
}

/// Events taken from a set's poll per turn.
const EVENTS: usize = 256;

impl Parking {
    pub fn new() -> Parking {
        Parking {
            per_worker: (0..crate::workers::slots().max(1))
                .map(|_| Mutex::new(None))
                .collect(),
            control: tokio::runtime::Handle::try_current().ok(),
        }
    }

    fn lock(&self, slot: usize) -> MutexGuard<'_, Option<Set>> {
        let m = &self.per_worker[slot.min(self.per_worker.len() - 1)];
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks `conn` in this worker's set (started on first use, with its task on this
    /// runtime). Gives it back if it cannot be parked (the server is closing, or no poll
    /// could be made): the caller keeps serving it.
    // Given back by value: parking is once per idle period, and a box would cost every
    // parked connection an allocation.
    #[allow(clippy::result_large_err)]
    pub(crate) fn park(&self, shared: &Arc<Shared>, conn: Parked) -> Result<(), Parked> {
        let slot = crate::workers::slot();
        let mut g = self.lock(slot);
        if g.is_none() {
            if shared.closing.is_set() {
                return Err(conn);
            }
            match start(Arc::downgrade(shared), slot) {
                Ok(set) => *g = Some(set),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot park idle connections");
                    return Err(conn);
                }
            }
        }
        let Some(set) = g.as_mut().filter(|s| !s.closed) else {
            return Err(conn);
        };
        let entry = set.conns.vacant_entry();
        let key = entry.key();
        let fd = conn.stream.as_raw_fd();
        if let Err(e) =
            set.registry
                .register(&mut SourceFd(&fd), mio::Token(key), mio::Interest::READABLE)
        {
            tracing::debug!(error = %e, "cannot park a connection");
            return Err(conn);
        }
        let due = conn.due;
        entry.insert(conn);
        let earliest = set.due.peek().is_none_or(|Reverse((d, _))| due < *d);
        set.due.push(Reverse((due, key)));
        if earliest || !set.dirty {
            set.dirty = true;
            set.wake.notify_one();
        }
        Ok(())
    }

    /// Closes every parked connection and stops the sets' tasks (shutdown).
    pub fn close(&self) {
        for slot in 0..self.per_worker.len() {
            let taken = {
                let mut g = self.lock(slot);
                let Some(set) = g.as_mut() else { continue };
                set.closed = true;
                set.due.clear();
                set.wake.notify_one();
                std::mem::take(&mut set.conns)
            };
            // Dropped outside the lock: closes the sockets, releases the guards and the
            // graceful watchers.
            drop(taken);
        }
    }

    /// Connections parked now (all workers).
    pub fn count(&self) -> usize {
        (0..self.per_worker.len())
            .map(|s| self.lock(s).as_ref().map_or(0, |set| set.conns.len()))
            .sum()
    }
}

impl Default for Parking {
    fn default() -> Self {
        Parking::new()
    }
}

/// Makes a set and spawns its task on the current runtime.
fn start(shared: Weak<Shared>, slot: usize) -> std::io::Result<Set> {
    let poll = mio::Poll::new()?;
    let registry = poll.registry().try_clone()?;
    // tokio deprecated its safe constructors because a type whose `AsRawFd` does not own the
    // descriptor could close it while it is registered (its `register` is `unsafe` instead,
    // and this crate forbids `unsafe`). Sound here: `mio::Poll` owns its epoll descriptor,
    // and `AsyncFd` deregisters it before dropping the poll that closes it.
    #[allow(deprecated)]
    let poll = AsyncFd::with_interest(poll, tokio::io::Interest::READABLE)?;
    let wake = Arc::new(Notify::new());
    tokio::spawn(run(shared, slot, poll, wake.clone()));
    Ok(Set {
        registry,
        conns: Slab::new(),
        due: BinaryHeap::new(),
        wake,
        closed: false,
        dirty: false,
    })
}

/// A set's task: resumes connections whose sockets became readable, drops those whose
/// clients closed or whose idle timeout ended. Holds the server weakly, so a server dropped
/// without a shutdown does not stay alive through it.
async fn run(shared: Weak<Shared>, slot: usize, mut poll: AsyncFd<mio::Poll>, wake: Arc<Notify>) {
    let mut events = mio::Events::with_capacity(EVENTS);
    loop {
        let (next, dirty) = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let g = shared.parking.lock(slot);
            match g.as_ref() {
                Some(set) if !set.closed => (set.due.peek().map(|Reverse((d, _))| *d), set.dirty),
                _ => return,
            }
        };
        tokio::select! {
            biased;
            ready = poll.readable_mut() => {
                let Ok(mut ready) = ready else { return };
                events.clear();
                if ready.get_inner_mut().poll(&mut events, Some(Duration::ZERO)).is_err() {
                    continue;
                }
                if events.iter().count() < EVENTS {
                    // Drained: wait for the next edge (one that came in meanwhile is kept).
                    ready.clear_ready();
                }
                let Some(shared) = shared.upgrade() else { return };
                for ev in events.iter() {
                    resume(&shared, slot, ev.token().0);
                }
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep(QUIET), if dirty => {
                let Some(shared) = shared.upgrade() else { return };
                quiet(&shared, slot);
            }
            _ = sleep_until(next), if next.is_some() => {
                let Some(shared) = shared.upgrade() else { return };
                expire(&shared, slot);
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at).await
    }
}

/// A parked socket became readable: a request (resume the connection on a new task on this
/// worker), the client's close (drop it), or nothing after all (keep it parked).
fn resume(shared: &Arc<Shared>, slot: usize, key: usize) {
    let (conn, request) = {
        let mut g = shared.parking.lock(slot);
        let Some(set) = g.as_mut() else { return };
        let Some(conn) = set.conns.get(key) else {
            return;
        };
        let mut byte = [0u8; 1];
        let request = match conn.stream.peek(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            peeked => matches!(peeked, Ok(n) if n > 0),
        };
        let conn = set.take(key);
        compact(set);
        (conn, request)
    };
    if request {
        let Parked {
            stream,
            info,
            graceful,
            guards,
            ..
        } = conn;
        tokio::spawn(crate::http1::serve(
            stream,
            info,
            shared.clone(),
            graceful,
            guards,
            false,
        ));
    }
    // Otherwise the client closed (or the socket failed): dropping the connection closes it.
}

/// The set has parked no connection for [`QUIET`]: this worker's idle upstream connections let
/// go of their buffers, then the allocator releases memory per thread: this worker's, and the
/// accept thread's (it allocated the hand-over tasks freed here, whose blocks wait for that
/// thread to collect them).
fn quiet(shared: &Shared, slot: usize) {
    if let Some(set) = shared.parking.lock(slot).as_mut() {
        set.dirty = false;
    }
    for pool in shared.snapshot.load().pools.values() {
        for b in &pool.backends {
            b.state.client.trim();
        }
    }
    if let Some(release) = RELEASE.get() {
        release();
        if let Some(control) = &shared.parking.control {
            drop(control.spawn(async { release() }));
        }
    }
}

/// Closes the connections whose idle timeout has ended.
fn expire(shared: &Shared, slot: usize) {
    let now = Instant::now();
    let mut gone = Vec::new();
    {
        let mut g = shared.parking.lock(slot);
        let Some(set) = g.as_mut() else { return };
        while let Some(&Reverse((due, key))) = set.due.peek() {
            if due > now {
                break;
            }
            set.due.pop();
            if set.conns.get(key).is_some_and(|c| c.due == due) {
                gone.push(set.take(key));
            }
        }
    }
    drop(gone);
}

/// Drops the deadlines of resumed connections once they outnumber the parked ones, so a
/// churn of short idle periods under a long idle timeout does not grow the heap.
fn compact(set: &mut Set) {
    if set.due.len() > 2 * set.conns.len() + 64 {
        let conns = &set.conns;
        set.due
            .retain(|Reverse((d, k))| conns.get(*k).is_some_and(|c| c.due == *d));
    }
}
