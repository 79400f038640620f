//! The `fulcrum` binary as an operator runs it: `check`, graceful shutdown on SIGTERM, and idle
//! connections parked and resumed on the per-core workers (in-process servers have none).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use http_body_util::BodyExt;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_fulcrum");

fn check(path: &std::path::Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_example_config_passes_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, out, err) = check(&path);
            assert_eq!((code, out.trim()), (0, "ok"), "{}: {err}", path.display());
            n += 1;
        }
    }
    assert!(n >= 3, "only {n} examples found");
}

#[test]
fn check_reports_typos_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n\n[[routes]]\npool = \"web\"\n\n[pools.web]\nalgoritm = \"round_robin\"\nbackends = [{ address = \"127.0.0.1:9001\" }]\n",
    )
    .unwrap();
    let (code, out, err) = check(&path);
    assert_eq!(code, 1, "{out}{err}");
    let line = err.lines().next().unwrap();
    assert!(
        line.starts_with(&format!("{}:9:1: ", path.display())),
        "{err}"
    );
    assert!(line.contains("unknown field `algoritm`"), "{err}");

    // Semantic errors: all of them, each with its place.
    std::fs::write(
        &path,
        "[[listeners]]\nname = \"http\"\nlisten = \"127.0.0.1:8080\"\n\n[[routes]]\npool = \"nope\"\n\n[pools.web]\nbackends = [{ address = \"127.0.0.1:9001\", weight = 0 }]\nhealth_check = { timeout = \"5 seconds\" }\n",
    )
    .unwrap();
    let (code, _, err) = check(&path);
    assert_eq!(code, 1);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    let p = path.display().to_string();
    assert!(
        lines[0].starts_with(&format!("{p}:6:8: ")) && lines[0].contains("\"nope\""),
        "{err}"
    );
    assert!(
        lines[1].starts_with(&format!("{p}:9:")) && lines[1].contains("weight"),
        "{err}"
    );
    assert!(
        lines[2].starts_with(&format!("{p}:10:")) && lines[2].contains("5 seconds"),
        "{err}"
    );
}

#[test]
fn run_with_invalid_config_exits_1_with_the_same_messages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[listeners]]\nname = \"http\"\nlisten = \"nowhere\"\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("-c").arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("{}:3:10: listen: invalid address", path.display())),
        "{err}"
    );
}

async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = http::Request::get(url).body(full("")).unwrap();
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(1), client().request(req)).await
        {
            if r.status() == StatusCode::OK {
                return;
            }
        }
        assert!(Instant::now() < deadline, "fulcrum did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn sigterm_lets_a_slow_request_finish_then_exits_0() {
    let slow = backend("slow")
        .slow(Duration::from_millis(1500))
        .spawn()
        .await;
    let cfg = binary_config(|_| "drain_timeout = \"10s\"".into(), slow.addr);
    let (port, admin) = (cfg.port, cfg.admin);
    let mut child = run_binary(&[], &cfg.path);
    wait_ready(&format!("http://127.0.0.1:{admin}/ready")).await;

    let url = format!("http://127.0.0.1:{port}/slow");
    let request = tokio::spawn(async move { get(&url, &[]).await });
    // Let the request reach the backend, then ask fulcrum to stop.
    while slow.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    sigterm(&child);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Draining: /ready says so, and no new connection is accepted.
    let (status, _, _) = get(&format!("http://127.0.0.1:{admin}/ready"), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "still accepting after SIGTERM"
    );

    let (status, _, body) = request.await.unwrap();
    assert_eq!((status, body.as_str()), (StatusCode::OK, "slow"));
    let status = exited(
        &mut child,
        Duration::from_secs(10),
        "fulcrum did not exit after draining",
    )
    .await;
    assert_eq!(status.code(), Some(0));
}

/// The binary's default threading is per core, which in-process servers do not have: an
/// idle connection is parked in its worker's set and resumed there, and its client's close
/// releases it; shutdown with parked connections exits 0 promptly.
#[tokio::test]
async fn per_core_workers_park_and_resume_idle_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = backend("a").spawn().await;
    let cfg = binary_config(
        |_| "worker_threads = 2\nidle_park_after = \"100ms\"".into(),
        b.addr,
    );
    let (port, admin) = (cfg.port, cfg.admin);
    let mut child = run_binary(&[], &cfg.path);
    wait_ready(&format!("http://127.0.0.1:{admin}/ready")).await;
    let parked = |n: u64| {
        let url = format!("http://127.0.0.1:{admin}/status");
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let (_, _, body) = get(&url, &[]).await;
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                if v["parked_connections"].as_u64() == Some(n) {
                    return true;
                }
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // One answer of a known length ("a"), read whole.
    async fn exchange(s: &mut tokio::net::TcpStream) -> String {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.ends_with(b"\r\n\r\na") {
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("no answer")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        assert!(exchange(&mut s).await.starts_with("HTTP/1.1 200"));
        conns.push(s);
    }
    assert!(parked(4).await, "the idle connections were not parked");
    for s in &mut conns {
        assert!(exchange(s).await.starts_with("HTTP/1.1 200"));
    }
    assert!(
        parked(4).await,
        "not parked again after their second requests"
    );
    drop(conns.pop());
    assert!(parked(3).await, "a closed connection stayed parked");
    assert_eq!(b.hits(), 8);

    sigterm(&child);
    let status = exited(&mut child, Duration::from_secs(10), "fulcrum did not exit").await;
    assert_eq!(status.code(), Some(0));
    for s in &mut conns {
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await;
        assert!(
            matches!(n, Ok(Ok(0)) | Ok(Err(_))),
            "a parked connection was left open"
        );
    }
}

/// The binary with `server` in its `[server]` table, in front of one backend answering "a",
/// ready: the backend, the config (its directory lives as long as it does), the process and
/// the base URL (`http://127.0.0.1:PORT`).
async fn binary_with(server: String) -> (TestBackend, BinaryConfig, std::process::Child, String) {
    binary_before("a", server).await
}

/// [`binary_with`], its backend named (and answering) `name`.
async fn binary_before(
    name: &str,
    server: String,
) -> (TestBackend, BinaryConfig, std::process::Child, String) {
    let b = backend(name).spawn().await;
    let cfg = binary_config(|_| server, b.addr);
    let child = run_binary(&[], &cfg.path);
    wait_ready(&format!("http://127.0.0.1:{}/ready", cfg.admin)).await;
    let base = format!("http://127.0.0.1:{}", cfg.port);
    (b, cfg, child, base)
}

/// SIGTERM, then a clean exit within ten seconds.
async fn stop_binary(mut child: std::process::Child) {
    sigterm(&child);
    let status = exited(&mut child, Duration::from_secs(10), "fulcrum did not exit").await;
    assert_eq!(status.code(), Some(0));
}

/// The binary's per-core workers send a turn's answers and backend requests in one io_uring
/// submission (`batch_sends`, on by default; one `sendto` each where the kernel refuses
/// io_uring, or with it off): with many clients at once, every answer still reaches its own
/// client whole, and every request its backend, both ways.
#[tokio::test]
async fn per_core_workers_answer_every_client_with_sends_batched_or_not() {
    for batch in [true, false] {
        let (b, _cfg, child, base) =
            binary_with(format!("worker_threads = 2\nbatch_sends = {batch}")).await;
        let bodies = load(&format!("{base}/"), 32, 2000).await;
        assert_eq!(bodies.len(), 2000, "batch_sends = {batch}");
        assert!(
            bodies.iter().all(|body| body == "a"),
            "batch_sends = {batch}"
        );
        assert_eq!(b.hits(), 2000, "batch_sends = {batch}");
        stop_binary(child).await;
    }
}

/// Through the binary's per-core workers (sends batched, the default): messages larger than
/// one read or one batched send arrive whole, both ways: answers of 200,000 bytes, uploads of
/// 100 KiB, request heads of 20 KiB, from eight clients at once over keep-alive connections,
/// each client's requests in turn.
#[tokio::test]
async fn per_core_workers_carry_messages_larger_than_one_read() {
    let (b, _cfg, child, base) = binary_with("worker_threads = 2".to_string()).await;
    let filler = "f".repeat(20 * 1024);
    let mut clients = Vec::new();
    for c in 0..8 {
        let (base, filler) = (base.clone(), filler.clone());
        clients.push(tokio::spawn(async move {
            let client = client();
            for round in 0..5 {
                let what = format!("client {c}, round {round}");
                let get = http::Request::get(format!("{base}/bytes/200000"))
                    .body(full(""))
                    .unwrap();
                let body = answer_ok(&client, get, &what).await;
                assert_eq!(body.len(), 200_000, "{what}");
                let up = http::Request::post(format!("{base}/upload"))
                    .body(full(vec![b'u'; 100 * 1024]))
                    .unwrap();
                assert_eq!(
                    &answer_ok(&client, up, &what).await[..],
                    b"102400",
                    "{what}"
                );
                let big_head = http::Request::get(format!("{base}/"))
                    .header("x-filler", filler.as_str())
                    .body(full(""))
                    .unwrap();
                assert_eq!(
                    &answer_ok(&client, big_head, &what).await[..],
                    b"a",
                    "{what}"
                );
            }
        }));
    }
    for c in clients {
        tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("a client waited a minute for its answers")
            .unwrap();
    }
    assert_eq!(b.hits(), 8 * 5 * 3);
    stop_binary(child).await;
}

/// Through the binary's per-core workers (sends batched): a client that pipelines 1,000
/// requests for 12,000-byte answers (12 MB, more than its sockets hold) in one write and
/// reads nothing for a while fills its sockets, so an answer sent quietly with the turn's
/// batch (head and body in one write) can go out in part or not at all, the rest then
/// following the ordinary way (how often varies from run to run; `sendbatch`'s unit test
/// forces it); each answer must go out before the next request's: all 1,000 arrive, whole
/// and in order.
#[tokio::test]
async fn per_core_workers_answer_a_pipelining_client_that_reads_late_in_order() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let name = "n".repeat(12_000);
    let (b, _cfg, child, base) = binary_before(&name, "worker_threads = 2".to_string()).await;
    let port = base.rsplit(':').next().unwrap();
    let mut s = tokio::net::TcpStream::connect(format!("127.0.0.1:{port}"))
        .await
        .unwrap();
    let mut requests = Vec::new();
    for i in 0..1000 {
        requests.extend_from_slice(format!("GET /?n={i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    }
    s.write_all(&requests).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut answers, mut at) = (0, 0);
    while answers < 1000 {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("the answers stopped")
            .unwrap();
        assert!(n > 0, "closed after {answers} answers");
        got.extend_from_slice(&buf[..n]);
        // Every whole answer in what has arrived: a 200 with the backend's name.
        while let Some((len, body)) = whole_answer(&got[at..]) {
            assert_eq!(body, name.len(), "answer {answers}");
            assert!(got[at + len - body..at + len].iter().all(|&c| c == b'n'));
            at += len;
            answers += 1;
        }
    }
    assert_eq!(at, got.len(), "bytes after the last answer");
    assert_eq!(b.hits(), 1000);
    stop_binary(child).await;
}

/// Through the binary's per-core workers (sends batched): clients that send a request and
/// close their sending side at once (the end of the stream arrives with the request, so the
/// connection sees it in the same turn as its answer is queued) still get the whole answer
/// before the connection closes; one connection at a time and sixteen at once.
#[tokio::test]
async fn per_core_workers_answer_clients_that_close_their_side_after_the_request() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (b, _cfg, child, base) = binary_with("worker_threads = 2".to_string()).await;
    let port: u16 = base.rsplit(':').next().unwrap().parse().unwrap();
    let ask = move || async move {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("the connection was not closed")
            .unwrap();
        String::from_utf8_lossy(&got).into_owned()
    };
    for round in 0..50 {
        let answer = ask().await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "round {round}: {answer:?}"
        );
        assert!(answer.ends_with("\r\n\r\na"), "round {round}: {answer:?}");
    }
    let many: Vec<_> = (0..16).map(|_| tokio::spawn(ask())).collect();
    for (i, t) in many.into_iter().enumerate() {
        let answer = t.await.unwrap();
        assert!(answer.ends_with("\r\n\r\na"), "client {i}: {answer:?}");
    }
    assert_eq!(b.hits(), 66);
    stop_binary(child).await;
}

/// The first answer in `buf`, if it is all there: its length on the wire and its body's
/// (a 200, with a `content-length` or chunked).
fn whole_answer(buf: &[u8]) -> Option<(usize, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    if let Some(l) = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let n: usize = l.trim().parse().unwrap();
        return (buf.len() >= end + n).then_some((end + n, n));
    }
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let (mut at, mut body) = (end, 0);
    loop {
        let line = buf[at..].windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&buf[at..at + line]).unwrap(), 16).unwrap();
        at += line + 2;
        if size == 0 {
            return (buf.len() >= at + 2).then(|| {
                assert_eq!(&buf[at..at + 2], b"\r\n");
                (at + 2, body)
            });
        }
        if buf.len() < at + size + 2 {
            return None;
        }
        at += size + 2;
        body += size;
    }
}

/// Sends `req` on `client` (keep-alive), asserts a 200 and returns the whole body.
async fn answer_ok(
    client: &hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        TestBody,
    >,
    req: http::Request<TestBody>,
    what: &str,
) -> bytes::Bytes {
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{what}");
    resp.into_body().collect().await.unwrap().to_bytes()
}

/// The CPUs in a `/proc/.../status` `Cpus_allowed_list` line ("0-3,6").
fn cpu_list(status: &str) -> Vec<usize> {
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("no Cpus_allowed_list");
    let mut cpus = Vec::new();
    for part in line.trim().split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

/// The CPUs each of `pid`'s per-core worker threads may run on, in worker order.
fn worker_cpus(pid: u32) -> Vec<Vec<usize>> {
    let mut workers = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        // The kernel keeps 15 bytes of a thread's name: "fulcrum-worker-".
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.starts_with("fulcrum-worke") {
            let tid: u32 = dir.file_name().unwrap().to_str().unwrap().parse().unwrap();
            let status = std::fs::read_to_string(dir.join("status")).unwrap();
            workers.push((tid, cpu_list(&status)));
        }
    }
    // Workers are spawned in order, so their thread ids rise with their index.
    workers.sort();
    workers.into_iter().map(|(_, cpus)| cpus).collect()
}

/// `pin_workers` (on by default): with one worker per CPU the process may use, worker `i`
/// runs only on the `i`-th; off, or with fewer or more workers than CPUs, every worker may
/// run anywhere the process may.
#[tokio::test]
async fn per_core_workers_are_pinned_to_their_cpus_when_one_per_cpu() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let allowed = cpu_list(&status);
    let n = allowed.len();
    let mut cases = vec![
        (String::new(), n, allowed.iter().map(|&c| vec![c]).collect()),
        (
            "pin_workers = false".to_string(),
            n,
            vec![allowed.clone(); n],
        ),
        (String::new(), n + 1, vec![allowed.clone(); n + 1]),
    ];
    if n > 1 {
        cases.push((String::new(), n - 1, vec![allowed.clone(); n - 1]));
    }
    for (line, threads, expected) in cases {
        let (_b, _cfg, child, base) =
            binary_with(format!("worker_threads = {threads}\n{line}")).await;
        let url = format!("{base}/");
        assert_eq!(load(&url, 4, 40).await.len(), 40, "{line:?} x{threads}");
        assert_eq!(worker_cpus(child.id()), expected, "{line:?} x{threads}");
        stop_binary(child).await;
    }
}

/// CPU time a process has used, in clock ticks (user + system, from /proc).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// `busy_poll` (200 µs by default): the per-core workers' spin before they sleep adapts to
/// how long they sleep, so once the load stops a worker stops spinning: an idle server uses
/// next to no CPU (a worker that kept spinning would use a whole core), with the spin on or
/// off, and answers again when asked.
#[tokio::test]
async fn per_core_workers_stop_spinning_when_the_load_stops() {
    for line in ["busy_poll = \"200us\"", "busy_poll = \"0s\""] {
        let (_b, _cfg, child, base) = binary_with(format!("worker_threads = 2\n{line}")).await;
        let url = format!("{base}/");
        assert_eq!(load(&url, 16, 3000).await.len(), 3000, "{line}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Ten per cent of one core over two seconds, in USER_HZ (100 on Linux) ticks.
        let limit = 2 * 100 / 10;
        let t0 = cpu_ticks(child.id());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let used = cpu_ticks(child.id()) - t0;
        assert!(
            used < limit,
            "{line}: {used} ticks of CPU in 2 s idle (limit {limit})"
        );
        assert_eq!(load(&url, 2, 10).await, vec!["a"; 10], "{line}");
        stop_binary(child).await;
    }
}
