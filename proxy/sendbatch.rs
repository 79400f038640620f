//! Batched sends, per worker thread, over io_uring: the small writes of one event-loop turn
//! (answers to clients, requests to backends) reach the kernel in one `io_uring_enter`
//! instead of one `sendto` each.
//!
//! Why: a send on loopback runs the receiver's TCP input on the sender's thread and wakes the
//! receiver's event loop; returning from each `sendto`, the worker may be preempted by the
//! peer it just woke (on its own core), which handles that one message and sleeps again, to
//! be woken by the next send of the same turn. Sent together, a turn's messages are all
//! there before the worker can be preempted, and each peer wakes once per turn.
//!
//! How: `crate::workers::gather` already holds a turn's writes until its reads are done;
//! each writer then queues its bytes here (copied into the batch's own buffer, so the kernel
//! never reads memory a cancelled future has given back) and wakes the thread's flusher task
//! — queued behind the writers of the turn, it runs after all of them and submits every send
//! at once. Sends carry `MSG_DONTWAIT`: io_uring completes each within the submission (a
//! full socket answers `EAGAIN` instead of waiting), so a flush ends with every completion
//! reaped and nothing of the batch left in the kernel's hands. A writer either waits for the
//! flush ([`Ticket::done`]) or, with nothing to do until its peer answers (a request to a
//! backend, an answer on a keep-alive connection), goes on without waiting and is woken only
//! if its send did not go out whole ([`Ticket::poll_trouble`]); either way it gets back the
//! bytes that did not go and writes them the ordinary way, and it waits for the flush before
//! it writes again or closes. A writer that gives its send up before the flush takes it out
//! of the batch, so a send never reaches a descriptor its connection has closed.
//!
//! Where io_uring cannot be set up (an old kernel, a sandbox that forbids it), nothing is
//! batched: writes go out one by one, as before.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;
use std::task::{Context, Poll, Waker};

use io_uring::{opcode, types, IoUring};
use slab::Slab;

/// Submission-queue size: the most sends one `io_uring_enter` carries.
const RING: u32 = 256;
/// Writes larger than this are not batched (copying them would cost more than a syscall).
const MAX_SEND: usize = 64 * 1024;

/// One queued send.
struct Entry {
    fd: RawFd,
    /// Where its bytes sit in [`Batch::bytes`] (until flushed).
    at: usize,
    len: usize,
    waker: Waker,
    result: Option<io::Result<usize>>,
    /// Sent whole, its writer is not woken (unless it waits for the flush: [`Ticket::done`]).
    quiet: bool,
    /// The bytes that did not go out, kept past the flush for the writer.
    rest: Vec<u8>,
}

struct Batch {
    ring: IoUring,
    entries: Slab<Entry>,
    /// Sends not yet submitted, in the order queued.
    queued: Vec<usize>,
    /// The queued sends' bytes, one after another; emptied by each flush.
    bytes: Vec<u8>,
    /// The flusher task, when it is waiting for sends.
    flusher: Option<Waker>,
    /// A submission failed: nothing more is batched on this thread.
    broken: bool,
    /// Submissions made (`io_uring_enter` calls that carried sends).
    submissions: u64,
}

thread_local! {
    static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
}

/// Sets this thread up to batch its sends, if the kernel lets it; returns whether it does.
/// Called on each per-core worker thread, before its runtime runs (and the flusher task,
/// [`flusher`], must then be spawned on that runtime).
pub fn init() -> bool {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_coop_taskrun()
        .build(RING);
    match ring {
        Ok(ring) => {
            BATCH.with(|b| {
                *b.borrow_mut() = Some(Batch {
                    ring,
                    entries: Slab::with_capacity(RING as usize),
                    queued: Vec::with_capacity(RING as usize),
                    bytes: Vec::with_capacity(64 * 1024),
                    flusher: None,
                    broken: false,
                    submissions: 0,
                })
            });
            true
        }
        Err(e) => {
            tracing::debug!(error = %e, "io_uring unavailable: sends are not batched");
            false
        }
    }
}

/// Does this thread batch its sends?
pub fn active() -> bool {
    BATCH.with(|b| b.borrow().as_ref().is_some_and(|b| !b.broken))
}

/// The thread's flusher: submits the queued sends whenever a writer wakes it. Runs for the
/// life of the worker's runtime.
pub async fn flusher() {
    std::future::poll_fn(|cx| {
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            let Some(batch) = b.as_mut() else {
                return Poll::Ready(());
            };
            if !batch.queued.is_empty() {
                batch.flush();
            }
            batch.flusher = Some(cx.waker().clone());
            Poll::Pending
        })
    })
    .await
}

/// Queues `buf` to go out on `fd` with the rest of this turn's sends. `None` when this
/// thread does not batch (see [`init`]) or `buf` is larger than [`MAX_SEND`]. The writer may
/// go on without waiting for it (a request to a backend, whose writer waits for the answer
/// next; an answer on a keep-alive connection, whose writer waits for the next request): a
/// send that goes out whole does not wake it — one task wake-up and poll less a message; one
/// that does not (an error, a full socket, a short count) does, and hands back what did not
/// go ([`Ticket::poll_trouble`]). Or it waits for the flush ([`Ticket::done`]).
pub fn send_quiet(fd: RawFd, buf: &[u8]) -> Option<Ticket> {
    if buf.len() > MAX_SEND {
        return None;
    }
    let key = BATCH.with(|b| {
        let mut b = b.borrow_mut();
        let batch = b.as_mut().filter(|b| !b.broken)?;
        let at = batch.bytes.len();
        batch.bytes.extend_from_slice(buf);
        let key = batch.entries.insert(Entry {
            fd,
            at,
            len: buf.len(),
            waker: Waker::noop().clone(),
            result: None,
            quiet: true,
            rest: Vec::new(),
        });
        batch.queued.push(key);
        if let Some(w) = batch.flusher.take() {
            w.wake();
        }
        Some(key)
    })?;
    Some(Ticket { key: Some(key) })
}

/// A send queued by [`send_quiet`]. Dropped before the flush, it takes its send out of the
/// batch; so a writer about to close its connection or write again waits for it
/// ([`Ticket::done`]) first.
pub struct Ticket {
    key: Option<usize>,
}

impl Ticket {
    /// Ready if the send did not go out whole, with the bytes left to send (a full socket:
    /// the writer sends them the ordinary way) or the connection's error; pending while it
    /// waits for the flush, and for good once it went out whole (nothing to wake for).
    pub fn poll_trouble(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Vec<u8>>> {
        self.poll(cx, false)
    }

    /// Waits for the flush: the bytes left to send (none when it went out whole), or the
    /// connection's error.
    pub async fn done(&mut self) -> io::Result<Vec<u8>> {
        std::future::poll_fn(|cx| self.poll(cx, true)).await
    }

    /// Did the send go out whole? `false` if it did not or has not gone out yet (and then
    /// it never will: the ticket is given up, taking the send out of the batch).
    pub fn settle(mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        match self.poll(&mut cx, false) {
            Poll::Ready(_) => false,
            Poll::Pending => self.key.is_none(),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>, wait: bool) -> Poll<io::Result<Vec<u8>>> {
        let Some(key) = self.key else {
            return if wait {
                Poll::Ready(Ok(Vec::new()))
            } else {
                Poll::Pending
            };
        };
        BATCH.with(|b| {
            let mut b = b.borrow_mut();
            let Some(batch) = b.as_mut() else {
                self.key = None;
                return Poll::Ready(Err(io::ErrorKind::Other.into()));
            };
            let Some(entry) = batch.entries.get_mut(key) else {
                self.key = None;
                return Poll::Ready(Err(io::ErrorKind::Other.into()));
            };
            let Some(r) = entry.result.take() else {
                entry.waker.clone_from(cx.waker());
                // A writer waiting for the flush is woken by it, whatever its result.
                entry.quiet &= !wait;
                return Poll::Pending;
            };
            let whole = matches!(r, Ok(n) if n == entry.len);
            let rest = std::mem::take(&mut entry.rest);
            batch.entries.remove(key);
            self.key = None;
            match r {
                _ if whole && !wait => Poll::Pending,
                _ if whole => Poll::Ready(Ok(Vec::new())),
                Ok(_) => Poll::Ready(Ok(rest)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Ready(Ok(rest)),
                Err(e) => Poll::Ready(Err(e)),
            }
        })
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(key) = self.key {
            withdraw(key);
        }
    }
}

/// A writer gave up its send: taken out of the batch if not flushed yet, forgotten if it was.
fn withdraw(key: usize) {
    BATCH.with(|b| {
        let Ok(mut b) = b.try_borrow_mut() else {
            return;
        };
        let Some(batch) = b.as_mut() else { return };
        // Not flushed yet: out of the batch (its bytes stay, unsent, until the flush).
        if let Some(i) = batch.queued.iter().position(|&k| k == key) {
            batch.queued.remove(i);
        }
        batch.entries.try_remove(key);
    });
}

impl Batch {
    /// Submits every queued send and reaps every completion.
    fn flush(&mut self) {
        let mut start = 0;
        while start < self.queued.len() {
            let end = self.queued.len().min(start + RING as usize);
            // How many went into the submission queue (all of them: see below).
            let mut n = 0;
            {
                let mut sq = self.ring.submission();
                for &key in &self.queued[start..end] {
                    let e = &self.entries[key];
                    let sqe = opcode::Send::new(
                        types::Fd(e.fd),
                        self.bytes[e.at..].as_ptr(),
                        e.len as u32,
                    )
                    .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                    .build()
                    .user_data(key as u64);
                    // SAFETY: the entry points into `self.bytes`, which is neither freed nor
                    // grown until every completion of this submission has been reaped below
                    // (and leaked if that ever fails), and `MSG_DONTWAIT` makes io_uring
                    // complete each send within the submission.
                    #[allow(unsafe_code)]
                    let pushed = unsafe { sq.push(&sqe) };
                    if pushed.is_ok() {
                        n += 1;
                    } else if let Some(entry) = self.entries.get_mut(key) {
                        // Cannot happen (at most `RING` entries, and each chunk's are reaped
                        // before the next is pushed); if it did, this send fails rather than
                        // leaving its writer, or the wait below, waiting for a completion.
                        entry.result =
                            Some(Err(io::Error::other("io_uring submission queue full")));
                        entry.waker.wake_by_ref();
                    }
                }
            }
            let mut reaped = 0;
            self.submissions += 1;
            while reaped < n {
                match self.ring.submit_and_wait(n - reaped) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                    Err(e) => {
                        // The sends' bytes may still be in the kernel's hands: keep them
                        // forever, and stop batching on this thread.
                        tracing::error!(error = %e, "io_uring submission failed: sends are no longer batched");
                        std::mem::forget(std::mem::take(&mut self.bytes));
                        self.broken = true;
                        for &key in &self.queued[start..] {
                            if let Some(entry) = self.entries.get_mut(key) {
                                entry.result =
                                    Some(Err(io::Error::new(e.kind(), "batched send failed")));
                                entry.waker.wake_by_ref();
                            }
                        }
                        self.queued.clear();
                        return;
                    }
                }
                for cqe in self.ring.completion() {
                    reaped += 1;
                    let r = cqe.result();
                    if let Some(entry) = self.entries.get_mut(cqe.user_data() as usize) {
                        let whole = r >= 0 && r as usize == entry.len;
                        if !whole && (r >= 0 || r == -libc::EAGAIN) {
                            let sent = r.max(0) as usize;
                            entry.rest = self.bytes[entry.at + sent..entry.at + entry.len].to_vec();
                        }
                        entry.result = Some(if r >= 0 {
                            Ok(r as usize)
                        } else {
                            Err(io::Error::from_raw_os_error(-r))
                        });
                        if !(whole && entry.quiet) {
                            entry.waker.wake_by_ref();
                        }
                    }
                }
            }
            start = end;
        }
        self.queued.clear();
        self.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    fn submissions() -> u64 {
        BATCH.with(|b| b.borrow().as_ref().map_or(0, |b| b.submissions))
    }

    /// Sets the test's thread up; false (and nothing batched) where io_uring is not allowed.
    fn setup() -> bool {
        if init() {
            tokio::spawn(flusher());
            true
        } else {
            // The fallback: nothing is queued, writes go out one by one.
            let (r, w) = std::os::unix::net::UnixStream::pair().unwrap();
            assert!(send_quiet(w.as_raw_fd(), b"x").is_none());
            drop(r);
            false
        }
    }

    #[tokio::test]
    async fn the_sends_of_one_turn_go_out_in_one_submission_each_with_its_result() {
        if !setup() {
            return;
        }
        let mut pairs = Vec::new();
        for _ in 0..8 {
            pairs.push(pair().await);
        }
        let before = submissions();
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for (i, (mut a, b)) in (0..8u8).zip(pairs) {
            readers.push(b);
            let msg = vec![b'a' + i; 100 + i as usize];
            writers.push(tokio::spawn(async move {
                crate::http1::write_now(&mut a, &msg).await.map(|()| a)
            }));
        }
        let mut kept = Vec::new();
        for w in writers {
            kept.push(w.await.unwrap().unwrap());
        }
        // Eight writers woken in one turn: one submission carried all eight.
        assert_eq!(submissions() - before, 1);
        for (i, mut r) in readers.into_iter().enumerate() {
            let mut got = vec![0u8; 100 + i];
            r.read_exact(&mut got).await.unwrap();
            assert!(got.iter().all(|&c| c == b'a' + i as u8), "{i}");
        }
    }

    #[tokio::test]
    async fn a_send_dropped_before_the_flush_never_reaches_the_socket() {
        if !setup() {
            return;
        }
        let (mut a, mut b) = pair().await;
        let lost = send_quiet(a.as_raw_fd(), b"lost").unwrap();
        drop(lost);
        crate::http1::write_now(&mut a, b"kept").await.unwrap();
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"kept");
    }

    #[tokio::test]
    async fn a_full_socket_takes_the_rest_the_ordinary_way() {
        if !setup() {
            return;
        }
        // The socket is filled first (the reader reads nothing yet); a batched send then
        // finds no room (or room for part) and the writer waits for the reader for the rest,
        // which arrives after what filled the socket, whole and in order.
        let (mut a, mut b) = pair().await;
        let mut filler = Vec::new();
        let chunk = [0xA5u8; 64 * 1024];
        loop {
            match a.try_write(&chunk) {
                Ok(n) => filler.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        let msg: Vec<u8> = (0..60 * 1024u32).map(|i| (i % 251) as u8).collect();
        let want = msg.clone();
        let before = submissions();
        let writer = tokio::spawn(async move { crate::http1::write_now(&mut a, &msg).await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(submissions() - before, 1, "the send went through the batch");
        assert!(!writer.is_finished(), "the writer waits for room");
        let mut got = vec![0u8; filler.len() + want.len()];
        b.read_exact(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        assert!(got[..filler.len()] == filler[..], "filler differs");
        assert!(got[filler.len()..] == want[..], "message differs");
    }

    /// Counts its wake-ups.
    struct Counter(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_quiet_send_wakes_its_writer_only_when_it_did_not_go_out_whole() {
        if !setup() {
            return;
        }
        let counter = std::sync::Arc::new(Counter(0.into()));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || counter.0.load(std::sync::atomic::Ordering::SeqCst);
        // Whole: never woken, and settled as sent.
        let (a, mut b) = pair().await;
        let mut t = send_quiet(a.as_raw_fd(), b"hello").unwrap();
        assert!(t.poll_trouble(&mut cx).is_pending());
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert!(t.poll_trouble(&mut cx).is_pending());
        assert_eq!(woken(), 0, "a send that went out whole woke its writer");
        assert!(t.settle());
        // A full socket: woken, with what went (a short count, or none).
        let (a, _b) = pair().await;
        let chunk = [0u8; 64 * 1024];
        while a.try_write(&chunk).is_ok() {}
        let msg = vec![7u8; 60 * 1024];
        let mut t = send_quiet(a.as_raw_fd(), &msg).unwrap();
        assert!(t.poll_trouble(&mut cx).is_pending());
        for _ in 0..100 {
            if woken() > 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(woken(), 1);
        match t.poll_trouble(&mut cx) {
            // What did not go is handed back: the end of the message.
            Poll::Ready(Ok(rest)) => {
                assert!(!rest.is_empty() && rest.len() <= msg.len());
                assert!(rest.iter().all(|&c| c == 7));
            }
            Poll::Ready(Err(e)) => panic!("{e}"),
            Poll::Pending => panic!("no trouble reported"),
        }
        // One not flushed yet is taken back by `settle`, and never sent.
        let (a, mut b) = pair().await;
        assert!(!send_quiet(a.as_raw_fd(), b"lost").unwrap().settle());
        crate::http1::write_now(&mut { a }, b"kept").await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"kept");
    }

    #[tokio::test]
    async fn large_writes_are_not_batched() {
        if !setup() {
            return;
        }
        let (a, _b) = pair().await;
        assert!(send_quiet(a.as_raw_fd(), &vec![0u8; MAX_SEND + 1]).is_none());
        assert!(send_quiet(a.as_raw_fd(), &vec![0u8; MAX_SEND]).is_some());
    }
}
