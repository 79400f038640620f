//! The `fulcrum` command: run, check, demo.
#![deny(unsafe_code)]

use fulcrum_config::Threading;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc: measured faster than the system allocator on the proxy's many small,
/// short-lived allocations (see loadtest/RESULTS.md).
#[global_allocator]
static GLOBAL: MiMalloc = MiMalloc;

/// mimalloc as the global allocator, asked for alignment only when a type needs more than
/// the 16 bytes every mimalloc block has. The `mimalloc` crate passes every request through
/// `mi_malloc_aligned`, whose fast path ends at 1 KiB: each larger block (a request's
/// buffer, its boxed future, a header map's entries: 2.4 a request) took the generic
/// aligned path, 192 instructions where `mi_malloc` takes a few dozen (callgrind,
/// loadtest/RESULTS.md).
struct MiMalloc;

/// What `mi_malloc` guarantees (MI_MAX_ALIGN_SIZE on 64-bit targets) for blocks of at least
/// that size; a smaller block is aligned to its size class, so the alignment must also not
/// exceed the size (the rule std's own system allocator applies).
const MI_MIN_ALIGN: usize = 16;

#[inline]
fn plain(align: usize, size: usize) -> bool {
    align <= MI_MIN_ALIGN && align <= size
}

/// `mi_malloc` or `mi_zalloc` (`plain`), or their `_aligned` forms, as the layout needs.
#[allow(unsafe_code)]
#[inline]
unsafe fn mi_alloc(
    layout: std::alloc::Layout,
    plain_alloc: unsafe extern "C" fn(usize) -> *mut std::ffi::c_void,
    aligned_alloc: unsafe extern "C" fn(usize, usize) -> *mut std::ffi::c_void,
) -> *mut u8 {
    if plain(layout.align(), layout.size()) {
        plain_alloc(layout.size()).cast()
    } else {
        aligned_alloc(layout.size(), layout.align()).cast()
    }
}

#[allow(unsafe_code)]
// SAFETY: every block comes from mimalloc with at least the layout's alignment (mi_malloc's
// own 16 bytes, or mi_*_aligned above that) and goes back through `mi_free`, which takes
// blocks of either kind; sizes are passed through as the caller gave them.
unsafe impl std::alloc::GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        mi_alloc(
            layout,
            libmimalloc_sys::mi_malloc,
            libmimalloc_sys::mi_malloc_aligned,
        )
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        mi_alloc(
            layout,
            libmimalloc_sys::mi_zalloc,
            libmimalloc_sys::mi_zalloc_aligned,
        )
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: std::alloc::Layout) {
        libmimalloc_sys::mi_free(ptr.cast());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        use libmimalloc_sys as mi;
        if plain(layout.align(), new) {
            mi::mi_realloc(ptr.cast(), new).cast()
        } else {
            mi::mi_realloc_aligned(ptr.cast(), new, layout.align()).cast()
        }
    }
}

use fulcrum::config::Config;

/// Returns the memory this thread's heap and mimalloc's arenas hold free to the system
/// (after a burst of idle connections was parked: `fulcrum::park`).
#[allow(unsafe_code)]
fn release_memory() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// mimalloc v3's `mi_option_arena_eager_commit` (its `mi_option_e`; the sys crate names only
/// the v2 options).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Memory is committed as mimalloc hands it out, not for its whole arena at once, so what it
/// purges (`release_memory`, after a burst) is decommitted and leaves the resident size.
/// With the default on Linux (eager commit), 10,000 idle connections measured 0.31-1.31 KiB
/// each, two-moded from run to run; on demand 0.16-0.26 (loadtest/RESULTS.md, idle.sh).
/// Set by the loader, before any code of the program runs: the Rust runtime allocates before
/// `main`, and the first allocation reserves the arena (set first thing in `main`, the
/// option came too late: measured, no change). Nothing on the allocation path checks it.
#[allow(unsafe_code)]
#[used]
#[link_section = ".init_array"]
static COMMIT_ON_DEMAND: extern "C" fn() = commit_on_demand;

#[allow(unsafe_code)]
extern "C" fn commit_on_demand() {
    // SAFETY: sets one integer option; mimalloc reads options at any time, and one set
    // before its own start-up keeps the value (only options never set are read from the
    // environment).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) }
}

#[derive(Parser)]
#[command(
    name = "fulcrum",
    version,
    about = "An L7 load balancer and reverse proxy"
)]
struct Cli {
    /// Config file (TOML) to run with.
    #[arg(short, long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run with the config file given by -c (the default command).
    Run,
    /// Validate the config file given by -c: prints `ok`, or every error as PATH:LINE:COL: message.
    Check,
    /// Zero-downtime upgrade: take the listening sockets of the fulcrum running with the same
    /// config (over its `[server] upgrade_socket`), serve, and let the old one drain and exit.
    Upgrade,
    /// Run the embedded demo: three backends on loopback, the proxy on 127.0.0.1:8080,
    /// the admin API on 127.0.0.1:9090.
    Demo,
    /// A tiny HTTP backend answering `hello from NAME` (for load tests and experiments).
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9001")]
        listen: std::net::SocketAddr,
        /// Name it answers with.
        #[arg(long, default_value = "backend")]
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    fulcrum::park::set_release(release_memory);
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            let Some(path) = cli.config else {
                eprintln!("fulcrum check: give the config file with -c PATH");
                return ExitCode::from(2);
            };
            match Config::load(&path) {
                Ok(_) => {
                    println!("ok");
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Upgrade => {
            let Some(path) = cli.config else {
                eprintln!("fulcrum upgrade: give the config file with -c PATH");
                return ExitCode::from(2);
            };
            match Config::load(&path) {
                Ok(config) => run(config, Some(&path), Mode::Upgrade),
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run => {
            let Some(path) = cli.config else {
                eprintln!("fulcrum: give the config file with -c PATH (or try `fulcrum demo`)");
                return ExitCode::from(2);
            };
            match Config::load(&path) {
                Ok(config) => run(config, Some(&path), Mode::Run),
                Err(errors) => {
                    eprintln!("{errors}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Backend { listen, name } => {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("fulcrum backend: {e}");
                    return ExitCode::from(1);
                }
            };
            rt.block_on(async move {
                match tokio::net::TcpListener::bind(listen).await {
                    Ok(socket) => {
                        let name: &'static str = Box::leak(name.into_boxed_str());
                        fulcrum::demo::serve(name, socket).await;
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("fulcrum backend: cannot bind {listen}: {e}");
                        ExitCode::from(1)
                    }
                }
            })
        }
        Command::Demo => match Config::parse(fulcrum::demo::DEMO_CONFIG, "<demo>") {
            Ok(config) => run(config, None, Mode::Demo),
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::from(1)
            }
        },
    }
}

#[derive(PartialEq)]
enum Mode {
    Run,
    Demo,
    Upgrade,
}

fn run(config: Config, path: Option<&Path>, mode: Mode) -> ExitCode {
    let demo = mode == Mode::Demo;
    init_logging();
    raise_open_file_limit();
    let threads = config.server.worker_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let rt = match config.server.threading {
        // The data plane on its own threads; this thread runs the control plane.
        Threading::PerCore => match fulcrum::workers::start(threads, &config.server) {
            Ok(_) => tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build(),
            Err(e) => Err(e),
        },
        Threading::WorkStealing => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .worker_threads(threads)
            .build(),
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fulcrum: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(async move {
        if demo {
            if let Err(e) = fulcrum::demo::spawn_backends().await {
                tracing::error!("{e:#}");
                return ExitCode::from(1);
            }
        }
        // An upgrade takes the running process's sockets instead of binding its own.
        let mut handover = None;
        let mut inherited = std::collections::HashMap::new();
        if mode == Mode::Upgrade {
            let Some(socket) = config.server.upgrade_socket.clone() else {
                tracing::error!("fulcrum upgrade needs [server] upgrade_socket in the config");
                return ExitCode::from(1);
            };
            match fulcrum::upgrade::receive(Path::new(&socket)) {
                Ok((stream, sockets)) => {
                    tracing::info!(sockets = sockets.len(), "upgrade: took over the running process's sockets");
                    handover = Some(stream);
                    inherited = sockets;
                }
                Err(e) => {
                    tracing::error!(error = %e, socket, "upgrade: cannot reach the running fulcrum");
                    return ExitCode::from(1);
                }
            }
        }
        let resolver = std::sync::Arc::new(fulcrum::snapshot::SystemResolver);
        let running = match fulcrum::start_inherited(config, path.map(Path::to_path_buf), resolver, inherited).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("{e:#}");
                return ExitCode::from(1);
            }
        };
        if demo {
            tracing::info!(
                "demo ready: try `curl http://{}/` and `curl http://{}/status`",
                running.addr("http"),
                running.admin
            );
        }
        if let Some(stream) = handover {
            if let Err(e) = fulcrum::upgrade::confirm(stream) {
                tracing::warn!(error = %e, "upgrade: could not confirm to the old process");
            }
        }
        wait_for_signals(&running).await;
        running.shutdown().await;
        ExitCode::SUCCESS
    })
}

/// Serves until SIGTERM or SIGINT; SIGHUP reloads the config file.
async fn wait_for_signals(running: &fulcrum::Running) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM received"); return; }
            _ = running.shared.upgraded.notified() => { return; }
            _ = int.recv() => { tracing::info!("SIGINT received"); return; }
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading");
                let _ = running.shared.reload().await;
            }
        }
    }
}

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

/// Every client and backend connection is a file descriptor: raise the soft limit to the
/// hard one, and say so when that is still low.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 65_536 => tracing::warn!(
            limit = n,
            "open-file limit is low; raise it (LimitNOFILE=) for many connections"
        ),
        Ok(n) => tracing::debug!(limit = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}
