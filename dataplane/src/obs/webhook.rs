//! Alert webhooks: JSON POSTs sent off the cores by one background thread, retried with backoff.
//!
//! Owns: the `tollgate-webhook` thread, its bounded queue, and [`WebhookSender`], the handle cores use to
//! queue a [`Webhook`] with `try_send` (never a wait). The thread POSTs each body as `application/json`
//! (5 s timeout), retrying transport errors, 5xx and 429 up to [`WebhookConfig::attempts`] times in all, with
//! exponential backoff (200 ms, 400 ms, ... capped at 5 s); other 4xx are the receiver's final word. While a
//! webhook waits for its retry, others are sent: the backoff wait is the queue's `recv_timeout`, not a sleep.
//!
//! Fails: a full queue drops the webhook and counts it; the thread logs `webhook_dropped` with the count.
//! Every delivery ends in one `webhook_sent` or `webhook_failed` event. Dropping every sender ends the
//! thread once queued webhooks and their retries are done (bounded: attempts × (timeout + backoff cap) each).
//! Cost on a core: one `try_send` of the webhook (its URL and JSON body are built by the caller).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use crate::obs::accesslog::{now_rfc3339, Logger};

/// One alert to POST.
#[derive(Debug, Clone, PartialEq)]
pub struct Webhook {
    pub url: String,
    pub body: serde_json::Value,
}

/// Why a webhook was not queued.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("the webhook queue is full: dropped")]
    Full,
    #[error("the webhook thread has stopped")]
    Stopped,
}

/// How the webhook thread sends and retries. Tests shorten the backoff.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Webhooks queued before `try_send` drops.
    pub capacity: usize,
    /// Tries per webhook, the first included.
    pub attempts: u32,
    /// Wait before the first retry; doubled for each next one.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// Per-request timeout (connect, send and response).
    pub timeout: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            capacity: 1024,
            attempts: 5,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(5),
            timeout: Duration::from_secs(5),
        }
    }
}

impl WebhookConfig {
    /// Wait after failed attempt number `attempt` (1-based) before the next.
    fn backoff(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_cap)
    }
}

/// What the thread did, returned when it ends (tests and shutdown read it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WebhookTotals {
    pub sent: u64,
    pub failed: u64,
    pub dropped: u64,
    pub attempts: u64,
}

/// Queues webhooks for the thread. Cheap to clone; usable from any thread, cores included.
#[derive(Debug, Clone)]
pub struct WebhookSender {
    tx: Sender<Webhook>,
    dropped: Arc<AtomicU64>,
    /// Every webhook ever dropped (never reset), for `/metrics`.
    dropped_total: Arc<AtomicU64>,
}

impl WebhookSender {
    /// Queues `hook` without waiting. On a full queue the webhook is dropped and counted (the thread reports
    /// the count in a `webhook_dropped` event).
    pub fn try_send(&self, hook: Webhook) -> Result<(), WebhookError> {
        match self.tx.try_send(hook) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
                Err(WebhookError::Full)
            }
            Err(TrySendError::Disconnected(_)) => Err(WebhookError::Stopped),
        }
    }

    /// The count of webhooks dropped since start because the queue was full (shared, never reset; holding
    /// it does not keep the webhook thread alive, unlike holding a sender).
    pub fn dropped_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.dropped_total)
    }
}

/// The webhook thread.
#[derive(Debug)]
pub struct Webhooks;

impl Webhooks {
    /// Starts the thread with the default settings (1024 queued, 5 tries, 200 ms to 5 s backoff, 5 s timeout).
    pub fn start(
        logger: Logger,
    ) -> std::io::Result<(WebhookSender, std::thread::JoinHandle<WebhookTotals>)> {
        Self::start_with(logger, WebhookConfig::default())
    }

    pub fn start_with(
        logger: Logger,
        config: WebhookConfig,
    ) -> std::io::Result<(WebhookSender, std::thread::JoinHandle<WebhookTotals>)> {
        let (tx, rx) = bounded(config.capacity.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let agent = ureq::AgentBuilder::new()
            .timeout(config.timeout)
            .redirects(0)
            .build();
        let worker = Worker {
            rx,
            dropped: Arc::clone(&dropped),
            logger,
            agent,
            config,
            due: BinaryHeap::new(),
            seq: 0,
            totals: WebhookTotals::default(),
        };
        let handle = std::thread::Builder::new()
            .name("tollgate-webhook".into())
            .spawn(move || worker.run())?;
        Ok((
            WebhookSender {
                tx,
                dropped,
                dropped_total: Arc::new(AtomicU64::new(0)),
            },
            handle,
        ))
    }
}

/// A webhook waiting for its next try.
struct Due {
    at: Instant,
    /// Arrival order: equal times go first come, first served.
    seq: u64,
    attempt: u32,
    hook: Webhook,
}

impl PartialEq for Due {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Due {}
impl PartialOrd for Due {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Due {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

enum Outcome {
    Sent(u16),
    Retry(String),
    Final(String),
}

/// How often an idle thread checks the drop counter.
const DROP_REPORT: Duration = Duration::from_secs(1);

struct Worker {
    rx: Receiver<Webhook>,
    dropped: Arc<AtomicU64>,
    logger: Logger,
    agent: ureq::Agent,
    config: WebhookConfig,
    due: BinaryHeap<Reverse<Due>>,
    seq: u64,
    totals: WebhookTotals,
}

impl Worker {
    fn run(mut self) -> WebhookTotals {
        let mut open = true;
        loop {
            self.report_drops();
            let now = Instant::now();
            let next = self.due.peek().map(|Reverse(d)| d.at);
            if next.is_some_and(|at| at <= now) {
                if let Some(Reverse(d)) = self.due.pop() {
                    self.attempt(d);
                }
                // Pick up whatever arrived meanwhile, without waiting.
                while let Ok(hook) = self.rx.try_recv() {
                    self.push(hook, 1, Instant::now());
                }
                continue;
            }
            if !open {
                match next {
                    // Closed and nothing left: done.
                    None => break,
                    // Closed, a retry pending: the backoff is the only wait left.
                    Some(at) => {
                        wait_until(at);
                        continue;
                    }
                }
            }
            let wait = next.map_or(DROP_REPORT, |at| at.saturating_duration_since(now));
            match self.rx.recv_timeout(wait.min(DROP_REPORT)) {
                Ok(hook) => self.push(hook, 1, Instant::now()),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => open = false,
            }
        }
        self.report_drops();
        self.totals
    }

    fn push(&mut self, hook: Webhook, attempt: u32, at: Instant) {
        self.seq += 1;
        self.due.push(Reverse(Due {
            at,
            seq: self.seq,
            attempt,
            hook,
        }));
    }

    fn report_drops(&mut self) {
        let n = self.dropped.swap(0, Ordering::Relaxed);
        if n > 0 {
            self.totals.dropped += n;
            self.logger.value(serde_json::json!({
                "ts": now_rfc3339(),
                "event": "webhook_dropped",
                "dropped": n,
                "reason": "queue full",
            }));
        }
    }

    fn attempt(&mut self, d: Due) {
        self.totals.attempts += 1;
        match self.post(&d.hook) {
            Outcome::Sent(status) => {
                self.totals.sent += 1;
                self.logger.value(serde_json::json!({
                    "ts": now_rfc3339(),
                    "event": "webhook_sent",
                    "url": redact(&d.hook.url),
                    "status": status,
                    "attempts": d.attempt,
                }));
            }
            Outcome::Retry(_) if d.attempt < self.config.attempts => {
                let at = Instant::now() + self.config.backoff(d.attempt);
                self.push(d.hook, d.attempt + 1, at);
            }
            Outcome::Retry(reason) | Outcome::Final(reason) => {
                self.totals.failed += 1;
                self.logger.value(serde_json::json!({
                    "ts": now_rfc3339(),
                    "event": "webhook_failed",
                    "url": redact(&d.hook.url),
                    "error": reason,
                    "attempts": d.attempt,
                }));
            }
        }
    }

    fn post(&self, hook: &Webhook) -> Outcome {
        let body = match serde_json::to_string(&hook.body) {
            Ok(b) => b,
            Err(e) => return Outcome::Final(e.to_string()),
        };
        match self
            .agent
            .post(&hook.url)
            .set("content-type", "application/json")
            .send_string(&body)
        {
            Ok(resp) if (200..300).contains(&resp.status()) => Outcome::Sent(resp.status()),
            // Redirects are not followed: a webhook URL that moved needs fixing in the config.
            Ok(resp) => Outcome::Final(format!("HTTP {}", resp.status())),
            Err(ureq::Error::Status(code, _)) if code >= 500 || code == 429 => {
                Outcome::Retry(format!("HTTP {code}"))
            }
            Err(ureq::Error::Status(code, _)) => Outcome::Final(format!("HTTP {code}")),
            Err(ureq::Error::Transport(t)) => match t.kind() {
                // A URL that can never work is not worth retrying.
                ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme => {
                    Outcome::Final(t.to_string())
                }
                _ => Outcome::Retry(t.to_string()),
            },
        }
    }
}

/// The URL as logged: scheme and host only, since webhook paths often carry a secret token.
fn redact(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    match url[start..].find(['/', '?', '#']) {
        Some(end) => format!("{}/…", &url[..start + end]),
        None => url.to_owned(),
    }
}

/// Waits until `at` on a closed queue: `recv_timeout` on a disconnected channel returns at once, so wait on
/// a private channel that never receives (this thread is not a core, but the sleep ban still applies).
fn wait_until(at: Instant) {
    let (_keep, never) = bounded::<()>(0);
    let _ = never.recv_timeout(at.saturating_duration_since(Instant::now()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::AtomicBool;

    /// One request the test receiver saw.
    #[derive(Debug)]
    struct Seen {
        content_type: Option<String>,
        body: serde_json::Value,
    }

    /// A tiny HTTP receiver: answers the i-th request with `statuses[i]` (the last one repeats).
    struct Sink {
        addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<Vec<Seen>>,
    }

    impl Sink {
        fn start(statuses: Vec<u16>) -> Sink {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let s = Arc::clone(&stop);
            let thread = std::thread::spawn(move || {
                let mut seen = Vec::new();
                for conn in listener.incoming() {
                    if s.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let status = statuses[seen.len().min(statuses.len() - 1)];
                    if let Some(req) = serve(conn, status) {
                        seen.push(req);
                    }
                }
                seen
            });
            Sink { addr, stop, thread }
        }

        fn url(&self) -> String {
            format!("http://{}/hook", self.addr)
        }

        fn finish(self) -> Vec<Seen> {
            self.stop.store(true, Ordering::Release);
            let _ = TcpStream::connect(self.addr);
            self.thread.join().unwrap()
        }
    }

    fn serve(conn: TcpStream, status: u16) -> Option<Seen> {
        let mut r = BufReader::new(conn.try_clone().ok()?);
        let mut len = 0usize;
        let mut content_type = None;
        let mut line = String::new();
        r.read_line(&mut line).ok()?;
        if !line.starts_with("POST ") {
            return None;
        }
        loop {
            line.clear();
            r.read_line(&mut line).ok()?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                match k.trim().to_ascii_lowercase().as_str() {
                    "content-length" => len = v.trim().parse().ok()?,
                    "content-type" => content_type = Some(v.trim().to_owned()),
                    _ => {}
                }
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).ok()?;
        let mut w = conn;
        let _ = write!(
            w,
            "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        Some(Seen {
            content_type,
            body: serde_json::from_slice(&body).ok()?,
        })
    }

    fn fast() -> WebhookConfig {
        WebhookConfig {
            capacity: 16,
            attempts: 5,
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(4),
            timeout: Duration::from_secs(5),
        }
    }

    fn logger() -> Logger {
        Logger::start().unwrap().0
    }

    #[test]
    fn retries_503_then_delivers_once() {
        let rx = Sink::start(vec![503, 503, 200]);
        let (tx, thread) = Webhooks::start_with(logger(), fast()).unwrap();
        let body =
            serde_json::json!({"alert": "budget_exhausted", "budget": "team-a", "spent": 12.5});
        tx.try_send(Webhook {
            url: rx.url(),
            body: body.clone(),
        })
        .unwrap();
        drop(tx);
        let totals = thread.join().unwrap();
        let seen = rx.finish();
        assert_eq!(
            totals,
            WebhookTotals {
                sent: 1,
                failed: 0,
                dropped: 0,
                attempts: 3
            }
        );
        assert_eq!(seen.len(), 3);
        for s in &seen {
            assert_eq!(s.body, body);
            assert_eq!(s.content_type.as_deref(), Some("application/json"));
        }
    }

    #[test]
    fn a_400_is_not_retried() {
        let rx = Sink::start(vec![400]);
        let (tx, thread) = Webhooks::start_with(logger(), fast()).unwrap();
        tx.try_send(Webhook {
            url: rx.url(),
            body: serde_json::json!({"a": 1}),
        })
        .unwrap();
        drop(tx);
        let totals = thread.join().unwrap();
        assert_eq!(rx.finish().len(), 1);
        assert_eq!((totals.sent, totals.failed, totals.attempts), (0, 1, 1));
    }

    #[test]
    fn a_429_is_retried() {
        let rx = Sink::start(vec![429, 204]);
        let (tx, thread) = Webhooks::start_with(logger(), fast()).unwrap();
        tx.try_send(Webhook {
            url: rx.url(),
            body: serde_json::json!({"a": 1}),
        })
        .unwrap();
        drop(tx);
        let totals = thread.join().unwrap();
        assert_eq!(rx.finish().len(), 2);
        assert_eq!((totals.sent, totals.failed, totals.attempts), (1, 0, 2));
    }

    #[test]
    fn an_unreachable_url_gives_up_after_the_retries() {
        // A port that was just free: connections are refused.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (tx, thread) = Webhooks::start_with(logger(), fast()).unwrap();
        tx.try_send(Webhook {
            url: format!("http://{addr}/hook"),
            body: serde_json::json!({"a": 1}),
        })
        .unwrap();
        drop(tx);
        let totals = thread.join().unwrap();
        assert_eq!((totals.sent, totals.failed, totals.attempts), (0, 1, 5));
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        // One slot, and the thread held up by a receiver that answers slowly: it reads nothing until told.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (release_tx, release_rx) = crossbeam_channel::bounded::<()>(0);
        let server = std::thread::spawn(move || {
            let (conn, _) = listener.accept().unwrap();
            let _ = release_rx.recv();
            serve(conn, 200)
        });
        let cfg = WebhookConfig {
            capacity: 1,
            ..fast()
        };
        let (tx, thread) = Webhooks::start_with(logger(), cfg).unwrap();
        let hook = Webhook {
            url: format!("http://{addr}/hook"),
            body: serde_json::json!({"n": 0}),
        };
        // The first is taken by the thread (it then blocks on the held receiver); then the queue fills.
        tx.try_send(hook.clone()).unwrap();
        let mut full = 0;
        let mut queued = 0;
        for _ in 0..1000 {
            match tx.try_send(Webhook {
                url: "http://127.0.0.1:1/never".into(),
                body: serde_json::json!({}),
            }) {
                Ok(()) => queued += 1,
                Err(WebhookError::Full) => full += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(full > 0);
        release_tx.send(()).unwrap();
        drop(tx);
        let totals = thread.join().unwrap();
        assert!(server.join().unwrap().is_some());
        assert_eq!(totals.dropped, full);
        assert_eq!(totals.sent + totals.failed, 1 + queued);
    }

    #[test]
    fn logged_urls_keep_only_scheme_and_host() {
        assert_eq!(
            redact("https://hooks.example.test/services/T0/B0/secret"),
            "https://hooks.example.test/…"
        );
        assert_eq!(redact("http://h:8080?token=x"), "http://h:8080/…");
        assert_eq!(redact("http://h:8080"), "http://h:8080");
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let c = WebhookConfig::default();
        let ms = |n| c.backoff(n).as_millis();
        assert_eq!(
            (ms(1), ms(2), ms(3), ms(4), ms(5), ms(6)),
            (200, 400, 800, 1600, 3200, 5000)
        );
        assert_eq!(c.backoff(80), Duration::from_secs(5));
    }
}
