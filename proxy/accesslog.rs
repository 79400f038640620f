//! The access log: off by default. A line (JSON or Apache "combined") is made when a
//! response ends (so it knows the bytes sent and the whole duration) and handed to a writer
//! task over a bounded channel; the hot path never touches the file. When the writer falls
//! behind, lines are dropped and counted, never waited for.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fulcrum_config::{AccessLogConfig, AccessLogFormat};
use tokio::sync::mpsc;

const QUEUE: usize = 65_536;

pub struct AccessLog {
    tx: mpsc::Sender<String>,
    format: AccessLogFormat,
    dropped: metrics::Counter,
}

impl AccessLog {
    /// Opens the destination (a file, appended to, or `stdout`) and starts the writer task.
    pub fn start(cfg: &AccessLogConfig) -> std::io::Result<Arc<AccessLog>> {
        let mut out: Box<dyn Write + Send> = if cfg.path == "stdout" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&cfg.path)?,
            )
        };
        let (tx, mut rx) = mpsc::channel::<String>(QUEUE);
        // A plain thread: file writes block, and they must not block a runtime worker.
        std::thread::Builder::new()
            .name("fulcrum-access-log".into())
            .spawn(move || {
                let mut buf = std::io::BufWriter::with_capacity(64 * 1024, &mut out);
                while let Some(line) = rx.blocking_recv() {
                    let _ = buf.write_all(line.as_bytes());
                    while let Ok(more) = rx.try_recv() {
                        let _ = buf.write_all(more.as_bytes());
                    }
                    let _ = buf.flush();
                }
            })?;
        Ok(Arc::new(AccessLog {
            tx,
            format: cfg.format,
            dropped: metrics::counter!(crate::metrics::ACCESS_LOG_DROPPED),
        }))
    }
}

/// One request's line, written when it is dropped (the response body ended or was dropped).
pub struct Entry {
    pub log: Arc<AccessLog>,
    pub started: Instant,
    pub client: std::net::IpAddr,
    pub listener: Arc<str>,
    pub method: http::Method,
    pub path: String,
    pub version: http::Version,
    pub status: u16,
    pub bytes: u64,
    pub pool: Option<Arc<str>>,
    pub backend: Option<String>,
    pub upstream: Option<Duration>,
    pub request_id: String,
    pub user_agent: Option<String>,
    pub referer: Option<String>,
}

impl Entry {
    fn line(&self) -> String {
        let duration = self.started.elapsed();
        match self.log.format {
            AccessLogFormat::Json => {
                let mut s = serde_json::json!({
                    "time": unix_seconds(),
                    "client": self.client.to_string(),
                    "listener": &*self.listener,
                    "method": self.method.as_str(),
                    "path": self.path,
                    "status": self.status,
                    "bytes": self.bytes,
                    "duration_ms": duration.as_secs_f64() * 1e3,
                    "pool": self.pool.as_deref(),
                    "backend": self.backend,
                    "upstream_ms": self.upstream.map(|d| d.as_secs_f64() * 1e3),
                    "request_id": self.request_id,
                    "user_agent": self.user_agent,
                })
                .to_string();
                s.push('\n');
                s
            }
            AccessLogFormat::Combined => format!(
                "{} - - [{}] \"{} {} {:?}\" {} {} \"{}\" \"{}\"\n",
                self.client,
                clf_time(),
                self.method,
                self.path,
                self.version,
                self.status,
                self.bytes,
                self.referer.as_deref().unwrap_or("-"),
                self.user_agent.as_deref().unwrap_or("-"),
            ),
        }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.log.tx.try_send(self.line()).is_err() {
            self.log.dropped.increment(1);
        }
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// `10/Oct/2000:13:55:36 +0000`, from the Unix clock (UTC), without a date library.
fn clf_time() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn clf_time_has_the_apache_shape() {
        let t = super::clf_time();
        assert_eq!(t.len(), 26, "{t}");
        assert!(t.ends_with(" +0000") && t.as_bytes()[2] == b'/', "{t}");
    }
}
