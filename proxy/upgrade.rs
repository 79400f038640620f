//! Zero-downtime binary upgrade, as HAProxy and Pingora do it: the running fulcrum serves a
//! Unix socket (`[server] upgrade_socket`); `fulcrum upgrade -c PATH` (the new binary)
//! connects, receives every listening socket (and the admin socket) with SCM_RIGHTS, starts
//! serving on them, and answers `ready`; the old process then stops accepting, drains its
//! connections up to `drain_timeout` and exits. The sockets never close in between, so no
//! connection attempt is refused: connections queued on them are accepted by whichever
//! process calls accept first.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use sendfd::{RecvWithFd, SendWithFd};

use crate::server::Shared;

const MAX_FDS: usize = 64;
/// The admin socket's name in a hand-over.
pub const ADMIN: &str = "__admin";

/// Old side: serves hand-over requests on `path` from a thread of its own (it blocks).
pub fn serve(path: &Path, shared: &Arc<Shared>) -> std::io::Result<()> {
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    let weak = Arc::downgrade(shared);
    std::thread::Builder::new()
        .name("fulcrum-upgrade".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let Some(shared) = weak.upgrade() else { return };
                let (names, fds): (Vec<String>, Vec<RawFd>) =
                    shared.handover_fds().into_iter().unzip();
                let msg = serde_json::to_vec(&names).unwrap_or_default();
                if let Err(e) = stream.send_with_fd(&msg, &fds) {
                    tracing::error!(error = %e, "upgrade: could not hand the sockets over");
                    continue;
                }
                tracing::info!(
                    sockets = fds.len(),
                    "upgrade: sockets handed to the new process"
                );
                let mut answer = [0u8; 16];
                match stream.read(&mut answer) {
                    Ok(n) if answer[..n].starts_with(b"ready") => {
                        tracing::info!("upgrade: the new process serves; draining and exiting");
                        shared.upgraded.notify_one();
                        return;
                    }
                    _ => tracing::warn!("upgrade: the new process did not confirm; still serving"),
                }
            }
        })?;
    Ok(())
}

/// New side: the running fulcrum's sockets, by name, and the stream to confirm on.
pub fn receive(
    path: &Path,
) -> std::io::Result<(UnixStream, HashMap<String, std::net::TcpListener>)> {
    let stream = UnixStream::connect(path)?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut fds = [0 as RawFd; MAX_FDS];
    let (n, nfds) = stream.recv_with_fd(&mut buf, &mut fds)?;
    let names: Vec<String> = serde_json::from_slice(&buf[..n]).map_err(std::io::Error::other)?;
    if names.len() != nfds {
        return Err(std::io::Error::other(format!(
            "{} names for {nfds} sockets",
            names.len()
        )));
    }
    let mut out = HashMap::new();
    for (name, fd) in names.into_iter().zip(fds) {
        let listener = adopt(fd);
        listener.set_nonblocking(true)?;
        out.insert(name, listener);
    }
    Ok((stream, out))
}

/// Takes ownership of a listening socket received over SCM_RIGHTS.
#[allow(unsafe_code)]
fn adopt(fd: RawFd) -> std::net::TcpListener {
    // SAFETY: `fd` was just created in this process by recvmsg(SCM_RIGHTS); nothing else
    // owns or closes it, and it is a listening TCP socket (the sender only sends those).
    unsafe { std::net::TcpListener::from_raw_fd(fd) }
}

/// Tells the old process that the new one serves.
pub fn confirm(mut stream: UnixStream) -> std::io::Result<()> {
    stream.write_all(b"ready\n")
}
