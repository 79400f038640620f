//! The data plane's threads for `threading = "per_core"`: one single-threaded tokio runtime
//! per worker thread. Each accepted connection is handed to the worker with the fewest open
//! connections and served there from start to end, as HAProxy threads and Envoy workers do.
//! A request never hops threads, so no task wake-up crosses a core, and each worker keeps
//! its own idle upstream connections (its `slot` in the upstream pools).
//!
//! The control plane (admin API, health checks, reloads, signals) stays on the runtime that
//! started the server.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Per-thread pool slots: 0 for every thread outside the workers, 1..=n for the workers.
static SLOTS: AtomicUsize = AtomicUsize::new(1);
static WORKERS: OnceLock<Workers> = OnceLock::new();

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
    /// Requests this thread is carrying now (fulcrum's own HTTP/1.1 side).
    static BUSY: Cell<usize> = const { Cell::new(0) };
}

/// A request counted in its thread's [`gather`] decision while it lives.
pub struct Busy(());

impl Busy {
    pub fn start() -> Busy {
        BUSY.with(|b| b.set(b.get() + 1));
        Busy(())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.with(|b| b.set(b.get().saturating_sub(1)));
    }
}

/// Called just before a write to a peer (a response to a client, a request to a backend).
/// When this thread carries other requests, the write waits for the end of the current
/// event-loop turn, so the writes of one turn go out together, after its reads: on a
/// per-core worker the task wakes itself once, which puts it at the back of the worker's run
/// queue, behind every task the last reactor poll woke (`yield_now` would also wait for
/// another reactor poll, one more `epoll_wait` per turn: measured 12.0 vs 12.7 µs/request
/// at one thread); elsewhere (the work-stealing runtime, where a self-wake would run the
/// task again at once) `yield_now`. A peer woken by the first of them (a
/// client's or a backend's event loop) then finds the next ones already there, instead of
/// waking, handling one message and going back to sleep for each: fewer wake-ups (each one
/// costs the writer the scheduler's work, measured as the top kernel frame) and fewer
/// preemptions of this thread by the peers it wakes. HAProxy gets the same shape from
/// reading every ready socket before it runs its streams. A lone request writes at once, and
/// so does every request on a worker that batches its sends (`crate::sendbatch`), whose
/// batch goes out at the end of the turn anyway, in one submission.
pub async fn gather() {
    if BUSY.with(|b| b.get()) > 1 && !crate::sendbatch::active() {
        if SLOT.with(|s| s.get()) == 0 {
            return tokio::task::yield_now().await;
        }
        let mut queued = false;
        std::future::poll_fn(|cx| {
            if queued {
                return std::task::Poll::Ready(());
            }
            queued = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        })
        .await;
    }
}

/// Tasks a worker runs between two looks at its sockets when it always has work (tokio's
/// default is 61). Every task here is woken by I/O, so looking sooner only splits the turn:
/// at 61 a worker under load made 0.070 `epoll_wait` per request (HAProxy 0.045), at 256
/// 0.053, and spent 1-3 % less CPU per request (one thread, alternating runs).
const EVENT_INTERVAL: u32 = 256;

/// The per-core worker runtimes.
pub struct Workers {
    handles: Vec<tokio::runtime::Handle>,
    /// Open client connections per worker.
    load: Box<[AtomicUsize]>,
}

impl Workers {
    /// The worker a new connection goes to: the one with the fewest open connections (the
    /// accept loop runs on the control thread and hands every connection over, as HAProxy
    /// spreads accepted connections over its threads). Counted until the guard drops.
    pub fn assign(&'static self) -> (&'static tokio::runtime::Handle, Assigned) {
        let i = (0..self.handles.len())
            .min_by_key(|&i| self.load[i].load(Ordering::Relaxed))
            .unwrap_or(0);
        self.load[i].fetch_add(1, Ordering::Relaxed);
        (&self.handles[i], Assigned(&self.load[i]))
    }
}

/// A connection's place in its worker's count.
pub struct Assigned(&'static AtomicUsize);

impl Drop for Assigned {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The CPU each of `n` workers runs on when workers are pinned (`[server] pin_workers`):
/// worker `i` on the `i`-th of the CPUs this process may use (`allowed`, in order), when
/// there are exactly as many workers as such CPUs (the default `worker_threads`); otherwise
/// none is pinned.
///
/// Why, measured on two cores shared with wrk and the backend (loadtest/RESULTS.md): with a
/// worker per core, the scheduler's wake-up placement now and then stacks both workers on
/// one core while the other runs the peers; bound, each keeps its core and its caches
/// (104,556 vs 97,923 req/s, 8.91 vs 9.44 µs of CPU a request, six alternating pairs). With
/// fewer workers than cores, a bound worker cannot leave a core its peers are using for an
/// idle one: one worker on two cores spent less CPU a request bound (7.99 vs 8.64 µs) but
/// the machine sat idle more and moved fewer requests (87,056 vs 90,118 req/s, five pairs).
/// With more workers than cores, two bound to one core could never be moved apart.
pub fn placement(n: usize, allowed: &[usize]) -> Option<Vec<usize>> {
    (n > 0 && n == allowed.len()).then(|| allowed.to_vec())
}

/// The CPUs this thread may run on (its affinity mask, which a cpuset or `taskset` narrows).
fn allowed_cpus() -> Vec<usize> {
    core_affinity::get_core_ids()
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.id)
        .collect()
}

/// Starts `n` worker threads, once per process, before the server starts (upstream pools
/// size their per-worker slots from it), each batching its sends if `batch_sends`
/// (`sendbatch`) and bound to its CPU if `pin_workers` ([`placement`]). Later calls return
/// the first set.
pub fn start(n: usize, server: &fulcrum_config::ServerConfig) -> std::io::Result<&'static Workers> {
    if let Some(w) = WORKERS.get() {
        return Ok(w);
    }
    let n = n.max(1);
    let batch_sends = server.batch_sends;
    let busy_poll = server.busy_poll;
    let cpus = if server.pin_workers {
        let allowed = allowed_cpus();
        let cpus = placement(n, &allowed);
        match &cpus {
            Some(cpus) => tracing::info!(?cpus, "each worker pinned to its CPU"),
            None => tracing::info!(
                workers = n,
                cpus = allowed.len(),
                "workers not pinned: not one worker per CPU"
            ),
        }
        cpus
    } else {
        None
    };
    SLOTS.store(n + 1, Ordering::Relaxed);
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        let (tx, rx) = std::sync::mpsc::channel();
        let cpu = cpus.as_ref().map(|c| c[i]);
        std::thread::Builder::new()
            .name(format!("fulcrum-worker-{i}"))
            .spawn(move || {
                SLOT.with(|s| s.set(i + 1));
                if let Some(cpu) = cpu {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id: cpu }) {
                        tracing::warn!(worker = i, cpu, "cannot pin the worker; it runs unpinned");
                    }
                }
                let mut builder = tokio::runtime::Builder::new_current_thread();
                builder.enable_all().event_interval(EVENT_INTERVAL);
                // With busy_poll off, neither the descriptor scan nor the park hooks.
                let spin = !busy_poll.is_zero();
                let before = if spin {
                    builder
                        .on_thread_park(crate::spin::before_park)
                        .on_thread_unpark(crate::spin::after_unpark);
                    crate::spin::epoll_fds()
                } else {
                    Default::default()
                };
                let rt = match builder.build() {
                    Ok(rt) => {
                        if spin && !crate::spin::arm(&before, &crate::spin::epoll_fds(), busy_poll)
                        {
                            tracing::info!(
                                worker = i,
                                "cannot tell the reactor's descriptor: no busy poll"
                            );
                        }
                        rt
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(rt.handle().clone()));
                // Serves until the process exits (the main thread decides when: after the
                // drain, exiting ends these threads with it). The future `block_on` polls is
                // this thread's send flusher: the scheduler polls it only between rounds of
                // tasks, when those it ran have queued their sends (`sendbatch`).
                rt.block_on(async {
                    if batch_sends && crate::sendbatch::init() {
                        crate::sendbatch::flusher().await;
                    }
                    std::future::pending::<()>().await
                });
            })?;
        handles.push(rx.recv().map_err(std::io::Error::other)??);
    }
    let load = (0..n).map(|_| AtomicUsize::new(0)).collect();
    Ok(WORKERS.get_or_init(|| Workers { handles, load }))
}

/// The worker runtimes, if `start` was called.
pub fn get() -> Option<&'static Workers> {
    WORKERS.get()
}

/// How many per-thread slots an upstream pool keeps.
pub fn slots() -> usize {
    SLOTS.load(Ordering::Relaxed)
}

/// This thread's slot.
pub fn slot() -> usize {
    SLOT.with(|s| s.get())
}

#[cfg(test)]
mod tests {
    use super::placement;

    #[test]
    fn one_worker_per_allowed_cpu_in_order_or_none_pinned() {
        assert_eq!(placement(2, &[0, 1]), Some(vec![0, 1]));
        // A cpuset or taskset leaves gaps: the workers take what is allowed, in order.
        assert_eq!(placement(3, &[2, 5, 7]), Some(vec![2, 5, 7]));
        assert_eq!(placement(1, &[0, 1]), None);
        assert_eq!(placement(3, &[0, 1]), None);
        assert_eq!(placement(1, &[]), None);
        assert_eq!(placement(0, &[0]), None);
    }
}
