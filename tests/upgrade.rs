//! Zero-downtime binary upgrade with the real binary: a new `fulcrum upgrade` takes the
//! sockets of the running one under load; no request fails and the old process exits.

mod support;

use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_under_load_fails_no_request_and_the_old_process_exits() {
    let b = backend("app").spawn().await;
    let cfg = binary_config(
        |dir| {
            format!(
                "drain_timeout = \"5s\"\nupgrade_socket = \"{}\"",
                dir.join("upgrade.sock").display()
            )
        },
        b.addr,
    );
    let port = cfg.port;
    let spawn = |args: &[&str]| run_binary(args, &cfg.path);
    let mut old = spawn(&[]);
    let url = format!("http://127.0.0.1:{port}/");
    let t = Instant::now();
    while get_status(&url).await != Some(StatusCode::OK) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "fulcrum did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Load: two keep-alive clients and two that open a new connection per request.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (stop, sent, failed, url) = (stop.clone(), sent.clone(), failed.clone(), url.clone());
        clients.push(tokio::spawn(async move {
            let mut c = client();
            while !stop.load(Ordering::SeqCst) {
                if i >= 2 {
                    c = client(); // a fresh pool: a new connection every time
                }
                let req = http::Request::get(url.as_str()).body(full("")).unwrap();
                let ok = match c.request(req).await {
                    Ok(r) => {
                        r.status() == StatusCode::OK
                            && http_body_util::BodyExt::collect(r.into_body())
                                .await
                                .is_ok()
                    }
                    Err(_) => false,
                };
                sent.fetch_add(1, Ordering::SeqCst);
                if !ok {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let upgrade_at = Instant::now();
    let mut new = spawn(&["upgrade"]);
    let exit = exited(
        &mut old,
        Duration::from_secs(15),
        "the old process did not exit",
    )
    .await;
    let took = upgrade_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    let (sent, failed) = (sent.load(Ordering::SeqCst), failed.load(Ordering::SeqCst));
    eprintln!("upgrade under load: {sent} requests, {failed} failed; old process exited {took:?} after `fulcrum upgrade`");
    assert_eq!(exit.code(), Some(0));
    assert_eq!(failed, 0);
    assert!(sent > 200);
    // The new process serves alone now.
    assert_eq!(get_status(&url).await, Some(StatusCode::OK));
    let _ = Command::new("kill")
        .args(["-TERM", &new.id().to_string()])
        .status();
    let _ = new.wait();
}

async fn get_status(url: &str) -> Option<StatusCode> {
    let req = http::Request::get(url).body(full("")).unwrap();
    tokio::time::timeout(Duration::from_secs(2), client().request(req))
        .await
        .ok()?
        .ok()
        .map(|r| r.status())
}
