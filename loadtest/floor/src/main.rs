//! The floor: the least CPU a single-threaded proxy can spend per request on this machine,
//! for `loadtest/floor.sh` to put beside fulcrum and nginx. A byte relay with no HTTP work
//! at all — each client connection paired with one keep-alive backend connection, every
//! read forwarded as it is — which is exactly right for the anchors' load (one small
//! request, then its small answer, on each connection) and nothing else. Two I/O styles:
//!
//! - `epoll`: edge-triggered, a read that leaves room in the buffer counts as draining the
//!   socket (as tokio and nginx do), so four data syscalls per request;
//! - `uring`: io_uring (single issuer, deferred task work), every receive answered by a
//!   send and the next receive queued together, one `io_uring_enter` per loop turn;
//! - `epoll-batch`: `epoll` with fulcrum's two I/O habits and no HTTP work: a loop turn's
//!   sends go out together in one io_uring submission at its end, and an empty turn watches
//!   the epoll descriptor (`sched_yield` between looks) for up to 200 µs before it sleeps.
//!   Beside `uring` it tells what completion-based receives would save fulcrum; beside
//!   fulcrum, what its HTTP work and runtime cost.
//!
//! `--touch BYTES` makes each forwarded message also read and write BYTES of memory that
//! belongs to its connection (a cache line each 64 bytes): what a proxy's own per-request
//! state costs beyond its instructions.
//!
//! `--threads N` (epoll modes) runs N loops, each with its own `SO_REUSEPORT` listener and
//! bound to its own CPU, as fulcrum runs its workers.
//!
//! Usage: floor epoll|epoll-batch|uring LISTEN_PORT BACKEND_PORT[,BACKEND_PORT...]
//! [--touch BYTES] [--threads N]
//! Listens on 127.0.0.1 and connects to 127.0.0.1 only.
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::process::ExitCode;

const BUF: usize = 16 * 1024;

struct Args {
    uring: bool,
    batch: bool,
    port: u16,
    backends: Vec<u16>,
    touch: usize,
    /// epoll modes: this many loops, each with its own `SO_REUSEPORT` listener, bound to
    /// CPU 0, 1, ... as fulcrum's workers are.
    threads: usize,
}

fn args() -> Option<Args> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (uring, batch) = match a.first()?.as_str() {
        "epoll" => (false, false),
        "epoll-batch" => (false, true),
        "uring" => (true, false),
        _ => return None,
    };
    let port = a.get(1)?.parse().ok()?;
    let backends = a
        .get(2)?
        .split(',')
        .map(|p| p.parse().ok())
        .collect::<Option<Vec<u16>>>()?;
    let (mut touch, mut threads) = (0, 1);
    for pair in a[3..].chunks(2) {
        match pair {
            [flag, n] if flag == "--touch" => touch = n.parse().ok()?,
            [flag, n] if flag == "--threads" => threads = n.parse().ok().filter(|&t| t > 0)?,
            _ => return None,
        }
    }
    if threads > 1 && uring {
        return None;
    }
    Some(Args {
        uring,
        batch,
        port,
        backends,
        touch,
        threads,
    })
}

fn main() -> ExitCode {
    let Some(a) = args() else {
        eprintln!("usage: floor epoll|epoll-batch|uring LISTEN_PORT BACKEND_PORT[,...] [--touch BYTES] [--threads N (epoll modes)]");
        return ExitCode::from(2);
    };
    let run = if a.threads > 1 {
        threads(&a)
    } else {
        bind(a.port).and_then(|l| if a.uring { uring(l, &a) } else { epoll(l, &a) })
    };
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floor: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds the port, waiting up to 5 s for it: a ring that served it before (the previous run
/// of this tool) lets go of its listening socket only after that process has exited.
fn bind(port: u16) -> io::Result<TcpListener> {
    let mut tries = 0;
    loop {
        match TcpListener::bind(("127.0.0.1", port)) {
            Err(e) if e.kind() == io::ErrorKind::AddrInUse && tries < 100 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            r => return r,
        }
    }
}

/// `--threads N`: N epoll loops on one port, each bound to its CPU; returns when one fails.
fn threads(a: &Args) -> io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    for cpu in 0..a.threads {
        let l = bind_shared(a.port)?;
        let (tx, a) = (
            tx.clone(),
            Args {
                backends: a.backends.clone(),
                ..*a
            },
        );
        std::thread::spawn(move || {
            // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
            // sched_setaffinity(0, ...) act on this thread only.
            unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            }
            let _ = tx.send(epoll(l, &a));
        });
    }
    rx.recv().unwrap_or(Ok(()))
}

/// A listener on the port with `SO_REUSEPORT`, so that each loop has its own.
fn bind_shared(port: u16) -> io::Result<TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket calls on a descriptor created here and handed to TcpListener.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let l = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) < 0
            || libc::listen(fd, 1024) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(l)
    }
}

/// The backend connection for the `n`th client connection (round-robin over the ports).
fn backend(a: &Args, n: usize) -> io::Result<RawFd> {
    let b = TcpStream::connect(("127.0.0.1", a.backends[n % a.backends.len()]))?;
    b.set_nodelay(true)?;
    b.set_nonblocking(true)?;
    Ok(b.into_raw_fd())
}

/// Per-connection memory touched once per forwarded message (`--touch`).
struct Touch {
    bytes: usize,
    state: Vec<Vec<u8>>,
    sink: u64,
}

impl Touch {
    fn new(bytes: usize) -> Touch {
        Touch {
            bytes,
            state: Vec::new(),
            sink: 0,
        }
    }

    fn touch(&mut self, conn: usize) {
        if self.bytes == 0 {
            return;
        }
        if self.state.len() <= conn {
            self.state.resize_with(conn + 1, Vec::new);
        }
        let s = &mut self.state[conn];
        if s.is_empty() {
            s.resize(self.bytes, 1);
        }
        for i in (0..s.len()).step_by(64) {
            self.sink = self.sink.wrapping_add(u64::from(s[i]));
            s[i] = self.sink as u8;
        }
        std::hint::black_box(self.sink);
    }
}

fn epoll(l: TcpListener, a: &Args) -> io::Result<()> {
    l.set_nonblocking(true)?;
    // SAFETY: plain syscalls on descriptors this function owns; buffers outlive each call.
    let ep = unsafe { libc::epoll_create1(0) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    let add = |fd: RawFd, data: u64, flags: u32| -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: flags,
            u64: data,
        };
        // SAFETY: as above.
        match unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) } {
            0 => Ok(()),
            _ => Err(io::Error::last_os_error()),
        }
    };
    const LISTENER: u64 = u64::MAX;
    add(l.as_raw_fd(), LISTENER, libc::EPOLLIN as u32)?;
    // peer[fd]: the other side's descriptor; conn[fd]: the pair's number.
    let mut peer: Vec<RawFd> = Vec::new();
    let mut conn: Vec<usize> = Vec::new();
    let mut touch = Touch::new(a.touch);
    let mut buf = vec![0u8; BUF];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut pairs = 0usize;
    // epoll-batch: each connection's outgoing message, sent at the end of the turn.
    let mut ring = if a.batch {
        Some(io_uring::IoUring::new(1024)?)
    } else {
        None
    };
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut pending: Vec<RawFd> = Vec::new();
    loop {
        let mut k = 0;
        if a.batch {
            let end = std::time::Instant::now() + std::time::Duration::from_micros(200);
            loop {
                // SAFETY: as above.
                k = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 0) };
                if k != 0 || std::time::Instant::now() >= end {
                    break;
                }
                std::thread::yield_now();
            }
        }
        if k == 0 {
            // SAFETY: as above.
            k = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        }
        if k < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        for e in &events[..k as usize] {
            if e.u64 == LISTENER {
                while let Ok((c, _)) = l.accept() {
                    c.set_nodelay(true)?;
                    c.set_nonblocking(true)?;
                    let c = c.into_raw_fd();
                    let b = backend(a, pairs)?;
                    let top = c.max(b) as usize + 1;
                    if peer.len() < top {
                        peer.resize(top, -1);
                        conn.resize(top, 0);
                    }
                    (peer[c as usize], peer[b as usize]) = (b, c);
                    (conn[c as usize], conn[b as usize]) = (pairs, pairs);
                    pairs += 1;
                    let flags = (libc::EPOLLIN | libc::EPOLLET) as u32;
                    add(c, c as u64, flags)?;
                    add(b, b as u64, flags)?;
                }
                continue;
            }
            let fd = e.u64 as RawFd;
            let to = peer[fd as usize];
            loop {
                // SAFETY: as above.
                let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), BUF, 0) };
                if n == 0
                    || (n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::WouldBlock)
                {
                    // SAFETY: as above. Both ends of the pair close here; an event still
                    // queued for the other end is not handled, as this experiment's
                    // connections live for the whole run.
                    unsafe {
                        libc::close(fd);
                        libc::close(to);
                    }
                    break;
                }
                if n < 0 {
                    break;
                }
                touch.touch(conn[fd as usize]);
                let n = n as usize;
                if a.batch {
                    if out.len() <= to as usize {
                        out.resize_with(to as usize + 1, Vec::new);
                    }
                    // A connection is queued once a turn, however many reads fill it.
                    if out[to as usize].is_empty() {
                        pending.push(to);
                    }
                    out[to as usize].extend_from_slice(&buf[..n]);
                    if n < BUF {
                        break;
                    }
                    continue;
                }
                let mut off = 0;
                while off < n {
                    // SAFETY: as above.
                    let w = unsafe {
                        libc::send(to, buf[off..n].as_ptr().cast(), n - off, libc::MSG_NOSIGNAL)
                    };
                    if w <= 0 {
                        break;
                    }
                    off += w as usize;
                }
                if n < BUF {
                    break;
                }
            }
        }
        if let Some(ring) = ring.as_mut() {
            // One submission for the turn's sends (a short send of a message this small
            // does not happen on loopback; the experiment does not handle it).
            for &to in &pending {
                let m = &out[to as usize];
                let e = io_uring::opcode::Send::new(
                    io_uring::types::Fd(to),
                    m.as_ptr(),
                    m.len() as u32,
                )
                .flags(libc::MSG_NOSIGNAL)
                .build();
                // SAFETY: the message stays in `out` until the submission below has run; a
                // send the kernel could not finish inline would read it later (the kernel's
                // copy of user memory, so never unsound, at worst wrong bytes: see above).
                while unsafe { ring.submission().push(&e) }.is_err() {
                    ring.submit()?;
                }
            }
            if !pending.is_empty() {
                ring.submit()?;
                ring.completion().for_each(drop);
            }
            for to in pending.drain(..) {
                out[to as usize].clear();
            }
        }
    }
}

struct Pair {
    client: RawFd,
    backend: RawFd,
    up: Box<[u8]>,
    down: Box<[u8]>,
}

fn uring(l: TcpListener, a: &Args) -> io::Result<()> {
    use io_uring::{opcode, squeue, types, IoUring};
    const ACCEPT: u64 = 0;
    const RECV_CLIENT: u64 = 1;
    const SEND_BACKEND: u64 = 2;
    const RECV_BACKEND: u64 = 3;
    const SEND_CLIENT: u64 = 4;
    let mut ring: IoUring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)?;
    let mut pairs: Vec<Pair> = Vec::new();
    let mut touch = Touch::new(a.touch);
    let recv = |fd: RawFd, buf: &mut [u8], data: u64| {
        opcode::Recv::new(types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
            .build()
            .user_data(data)
    };
    let send = |fd: RawFd, buf: &[u8], n: usize, data: u64| {
        opcode::Send::new(types::Fd(fd), buf.as_ptr(), n as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(data)
    };
    let mut queued: Vec<squeue::Entry> = vec![opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
        .build()
        .user_data(ACCEPT)];
    let mut done: Vec<(u64, i32)> = Vec::new();
    loop {
        for e in queued.drain(..) {
            // SAFETY: every buffer an entry points into is a pair's boxed slice, and pairs
            // are never removed while the ring runs.
            while unsafe { ring.submission().push(&e) }.is_err() {
                ring.submit()?;
            }
        }
        ring.submit_and_wait(1)?;
        done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (data, res) in done.drain(..) {
            let (kind, i) = (data & 7, (data >> 3) as usize);
            match kind {
                ACCEPT if res >= 0 => {
                    let c = res;
                    let one: libc::c_int = 1;
                    // SAFETY: setsockopt on a descriptor just accepted, with a valid int.
                    unsafe {
                        libc::setsockopt(
                            c,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            (&one as *const libc::c_int).cast(),
                            std::mem::size_of::<libc::c_int>() as u32,
                        )
                    };
                    let i = pairs.len();
                    pairs.push(Pair {
                        client: c,
                        backend: backend(a, i)?,
                        up: vec![0u8; BUF].into_boxed_slice(),
                        down: vec![0u8; BUF].into_boxed_slice(),
                    });
                    let p = &mut pairs[i];
                    queued.push(recv(p.client, &mut p.up, (i as u64) << 3 | RECV_CLIENT));
                }
                RECV_CLIENT | RECV_BACKEND => {
                    let p = &mut pairs[i];
                    if res <= 0 {
                        // SAFETY: closing the pair's own descriptors, once.
                        unsafe {
                            libc::close(p.client);
                            libc::close(p.backend);
                        }
                        continue;
                    }
                    touch.touch(i);
                    let n = res as usize;
                    let tag = (i as u64) << 3;
                    // The answer's receive is queued with the send: it waits in the kernel
                    // for the bytes, and the next turn's single enter submits both.
                    if kind == RECV_CLIENT {
                        queued.push(send(p.backend, &p.up, n, tag | SEND_BACKEND));
                        queued.push(recv(p.backend, &mut p.down, tag | RECV_BACKEND));
                    } else {
                        queued.push(send(p.client, &p.down, n, tag | SEND_CLIENT));
                        queued.push(recv(p.client, &mut p.up, tag | RECV_CLIENT));
                    }
                }
                SEND_BACKEND | SEND_CLIENT if res < 0 => {
                    eprintln!("floor: send failed: {}", io::Error::from_raw_os_error(-res));
                }
                // A short send of a message this small does not happen on loopback; the
                // experiment does not handle it.
                _ => {}
            }
        }
    }
}
