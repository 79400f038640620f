//! WebSocket load tool for loadtest/websocket.sh (built as `cargo run --example ws_load`):
//!   ws_load backend --listen 127.0.0.1:9501          an echo server
//!   ws_load hold --url ws://... --sessions N --seconds S   open N sessions and hold them
//!   ws_load rtt --url ws://... --count N             echo round trips on one session
//! Loopback only; every mode ends by itself (the backend when killed by the script).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

#[tokio::main]
async fn main() {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("backend") => backend(&arg(&args, "--listen", "127.0.0.1:9501")).await,
        Some("hold") => {
            hold(
                &arg(&args, "--url", "ws://127.0.0.1:9510/"),
                arg(&args, "--sessions", "10000").parse().unwrap(),
                arg(&args, "--seconds", "10").parse().unwrap(),
            )
            .await
        }
        Some("rtt") => {
            rtt(
                &arg(&args, "--url", "ws://127.0.0.1:9510/"),
                arg(&args, "--count", "10000").parse().unwrap(),
            )
            .await
        }
        _ => eprintln!("usage: ws_load backend|hold|rtt [--listen A] [--url U] [--sessions N] [--seconds S] [--count N]"),
    }
}

async fn backend(listen: &str) {
    let socket = tokio::net::TcpListener::bind(listen).await.expect("bind");
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                if matches!(msg, Message::Text(_) | Message::Binary(_))
                    && ws.send(msg).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

async fn hold(url: &str, sessions: usize, seconds: u64) {
    let started = Instant::now();
    let mut open = Vec::with_capacity(sessions);
    let mut failed = 0;
    for chunk in (0..sessions).collect::<Vec<_>>().chunks(200) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|_| {
                let url = url.to_string();
                tokio::spawn(async move { tokio_tungstenite::connect_async(url).await })
            })
            .collect();
        for t in tasks {
            match t.await {
                Ok(Ok((ws, _))) => open.push(ws),
                _ => failed += 1,
            }
        }
    }
    println!(
        "open {} failed {} in {:?}",
        open.len(),
        failed,
        started.elapsed()
    );
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    // Every held session still answers.
    let mut alive = 0;
    for ws in open.iter_mut().step_by(100) {
        if ws.send(Message::text("ping")).await.is_ok() {
            if let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
                alive += 1;
            }
        }
    }
    println!("alive {alive} of {} sampled", open.len().div_ceil(100));
}

async fn rtt(url: &str, count: usize) {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        let t = Instant::now();
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_))) => break,
                Some(Ok(_)) => continue,
                other => panic!("{other:?}"),
            }
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    println!(
        "rtt p50_us {} p99_us {} max_us {}",
        p(0.50).as_micros(),
        p(0.99).as_micros(),
        samples[samples.len() - 1].as_micros()
    );
}
