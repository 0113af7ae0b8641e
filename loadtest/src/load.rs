//! The HTTP/1.1 load generator behind `tollgate-load` (and the release gate).
//!
//! # What it owns
//!
//! [`run`] drives one target address with `connections` threads, each owning
//! one blocking [`TcpStream`] (`TCP_NODELAY`, keep-alive, one request in
//! flight). Blocking sockets and `std::thread::sleep` with a 1 µs timer slack
//! (Linux) avoid an async runtime's millisecond timer wheel, so sub-millisecond
//! open-loop pacing and tens-of-microseconds latencies stay visible.
//!
//! * **Open loop** ([`Mode::Open`], wrk2 style): the global rate `R` is spread
//!   over `N` connections; connection `i`'s `k`-th request is *intended* at
//!   `t0 + (k·N + i)/R`. Latency is measured from the intended time
//!   (coordinated-omission correction): a busy connection sends late and the
//!   wait is part of the latency. Requests whose intended time falls after the
//!   end are not sent; those intended before it that cannot start before it
//!   (the connection fell behind) are counted as errors of kind `unsent`.
//! * **Closed loop** ([`Mode::Closed`]): each connection sends the next request
//!   as soon as the previous response completed; latency is from the send.
//!
//! Every run is bounded: a measured duration after an optional warm-up (whose
//! samples are discarded), a cap on measured requests (whichever comes first
//! ends the run), a per-request timeout, and the single target address.
//!
//! Each thread records into its own [`Histogram`]s (nanoseconds, 1 ns ..
//! 60 s, 3 significant digits) and error map; they are merged after the join,
//! so the hot path takes no locks: per request it does a few relaxed atomic
//! increments (progress counters), one `write`, and as many `read`s as the
//! response needs.
//!
//! # Failure
//!
//! [`run`] fails ([`LoadError`]) only on a bad configuration, when a thread
//! cannot be spawned, or when a worker panics. Everything the target does
//! wrong is counted, never raised: connect failures (`connect`), timeouts
//! (`timeout`), resets (`reset`), a connection closed before the response
//! completed (`eof`), unparsable responses (`malformed`), other I/O errors
//! (`io`), non-2xx answers (`status_NNN`) and open-loop requests that fell so
//! far behind they could not start before the end (`unsent`). After any of these but a
//! `status_NNN` with a well-framed body, the connection is dropped and the next
//! request reconnects (connect time then counts toward its latency). In
//! closed loop a failed connect is followed by a 10 ms pause, so a dead target
//! is not hammered in a tight loop.
//!
//! # Cost
//!
//! One OS thread and one socket per connection, a 16 KiB read buffer and
//! three histograms (~220 KiB each) per thread; with interval recording, one
//! more histogram per thread per second, handed to the calling thread.
//! The calling thread sleeps, waking every 100 ms to drain intervals and to
//! print the progress line once a second.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::V2Serializer;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

/// Highest recordable value: 60 s in nanoseconds.
const HIGHEST_NS: u64 = 60_000_000_000;
/// Significant digits of every histogram.
const SIGFIG: u8 = 3;
/// Pause after a failed connect in closed loop.
const CONNECT_BACKOFF: Duration = Duration::from_millis(10);
/// How long before `t0` the threads are started (time to spawn and connect).
const START_DELAY: Duration = Duration::from_millis(100);
/// Longest accepted response head or chunk-size line.
const MAX_HEAD: usize = 1 << 20;
/// Initial read buffer per connection.
const BUF_SIZE: usize = 16 * 1024;

/// How requests are paced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    /// A constant global rate (requests per second) spread over all
    /// connections; latency from the intended send time.
    Open {
        /// Requests per second, all connections together.
        rate: f64,
    },
    /// Each connection sends its next request when the previous one completed.
    Closed,
}

/// The request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// An OpenAI chat completion request as the Python SDK sends it (~300 B).
    OpenAi,
    /// The same, streamed, with `stream_options.include_usage`.
    OpenAiStream,
    /// An Anthropic Messages request with `max_tokens`.
    Anthropic,
    /// The same, streamed.
    AnthropicStream,
    /// Any body; `stream` asks for `accept: text/event-stream`.
    Custom {
        /// The bytes sent as the body.
        body: Vec<u8>,
        /// Whether the response is expected to be an event stream.
        stream: bool,
    },
}

const OPENAI_BODY: &str = concat!(
    r#"{"messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly."},"#,
    r#"{"role":"user","content":"Write a haiku about load testing an AI gateway written in Rust, then explain it in one sentence."}],"#,
    r#""model":"gpt-4o-mini","max_tokens":256,"temperature":0.7}"#
);
const OPENAI_STREAM_BODY: &str = concat!(
    r#"{"messages":[{"role":"system","content":"You are a helpful assistant. Answer briefly."},"#,
    r#"{"role":"user","content":"Write a haiku about load testing an AI gateway written in Rust, then explain it in one sentence."}],"#,
    r#""model":"gpt-4o-mini","max_tokens":256,"stream":true,"stream_options":{"include_usage":true},"temperature":0.7}"#
);
const ANTHROPIC_BODY: &str = concat!(
    r#"{"max_tokens":256,"messages":[{"role":"user","content":"Write a haiku about load testing an AI gateway written in Rust, then explain it in one sentence."}],"#,
    r#""model":"claude-3-5-haiku-latest","system":"You are a helpful assistant. Answer briefly."}"#
);
const ANTHROPIC_STREAM_BODY: &str = concat!(
    r#"{"max_tokens":256,"messages":[{"role":"user","content":"Write a haiku about load testing an AI gateway written in Rust, then explain it in one sentence."}],"#,
    r#""model":"claude-3-5-haiku-latest","stream":true,"system":"You are a helpful assistant. Answer briefly."}"#
);

impl Payload {
    /// The body bytes.
    pub fn body(&self) -> &[u8] {
        match self {
            Payload::OpenAi => OPENAI_BODY.as_bytes(),
            Payload::OpenAiStream => OPENAI_STREAM_BODY.as_bytes(),
            Payload::Anthropic => ANTHROPIC_BODY.as_bytes(),
            Payload::AnthropicStream => ANTHROPIC_STREAM_BODY.as_bytes(),
            Payload::Custom { body, .. } => body,
        }
    }

    /// Whether the response is expected to be an event stream.
    pub fn is_stream(&self) -> bool {
        match self {
            Payload::OpenAiStream | Payload::AnthropicStream => true,
            Payload::OpenAi | Payload::Anthropic => false,
            Payload::Custom { stream, .. } => *stream,
        }
    }

    /// The provider path this payload belongs to.
    pub fn default_path(&self) -> &'static str {
        match self {
            Payload::Anthropic | Payload::AnthropicStream => "/v1/messages",
            _ => "/v1/chat/completions",
        }
    }

    fn is_anthropic(&self) -> bool {
        matches!(self, Payload::Anthropic | Payload::AnthropicStream)
    }
}

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadConfig {
    /// The one address talked to.
    pub target: SocketAddr,
    /// Request path (`/v1/chat/completions` or `/v1/messages` by payload).
    pub path: String,
    /// Request method (`POST`); `GET` and `HEAD` send no body.
    pub method: String,
    /// Extra headers, sent after the defaults they do not replace
    /// (`host`, `user-agent`, `accept`, `content-type`, `anthropic-version`
    /// are only sent when not given here).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub payload: Payload,
    /// Connections, one thread each (16).
    pub connections: usize,
    /// Pacing (closed).
    pub mode: Mode,
    /// Measured duration after the warm-up (10 s).
    pub duration: Duration,
    /// Warm-up whose samples are discarded (0).
    pub warmup: Duration,
    /// Most measured requests, all connections together (10 000 000).
    pub max_requests: u64,
    /// Per-request timeout, from the send to the end of the body (30 s).
    pub timeout: Duration,
    /// Print a progress line on stderr once a second (false).
    pub progress: bool,
    /// Spin instead of sleeping for the last part of an open-loop wait
    /// (50 µs; at most 100 µs is used). Zero never spins.
    pub spin: Duration,
    /// Keep one TTLB histogram per second of the measured run in
    /// [`LoadReport::intervals`] (false).
    pub intervals: bool,
}

impl LoadConfig {
    /// Defaults: 16 connections, closed loop, 10 s, no warm-up, a cap of
    /// 10 000 000 requests, 30 s timeout, the payload's path, `POST`.
    pub fn new(target: SocketAddr, payload: Payload) -> Self {
        Self {
            target,
            path: payload.default_path().to_owned(),
            method: "POST".to_owned(),
            headers: Vec::new(),
            payload,
            connections: 16,
            mode: Mode::Closed,
            duration: Duration::from_secs(10),
            warmup: Duration::ZERO,
            max_requests: 10_000_000,
            timeout: Duration::from_secs(30),
            progress: false,
            spin: Duration::from_micros(50),
            intervals: false,
        }
    }

    /// The request bytes, head and body, sent unchanged for every request.
    pub fn request_bytes(&self) -> Vec<u8> {
        let has = |name: &str| {
            self.headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case(name))
        };
        let no_body =
            self.method.eq_ignore_ascii_case("GET") || self.method.eq_ignore_ascii_case("HEAD");
        let body = if no_body {
            &[][..]
        } else {
            self.payload.body()
        };
        let mut head = format!("{} {} HTTP/1.1\r\n", self.method, self.path);
        let mut add = |name: &str, value: &str| {
            head.push_str(name);
            head.push_str(": ");
            head.push_str(value);
            head.push_str("\r\n");
        };
        if !has("host") {
            add("host", &self.target.to_string());
        }
        if !has("user-agent") {
            add("user-agent", "tollgate-load/0.1");
        }
        if !has("accept") {
            add(
                "accept",
                if self.payload.is_stream() {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            );
        }
        if !no_body {
            if !has("content-type") {
                add("content-type", "application/json");
            }
            if self.payload.is_anthropic() && !has("anthropic-version") {
                add("anthropic-version", "2023-06-01");
            }
            if !has("content-length") {
                add("content-length", &body.len().to_string());
            }
        }
        for (name, value) in &self.headers {
            add(name, value);
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(body);
        bytes
    }

    fn validate(&self) -> Result<(), LoadError> {
        let bad = |s: &str| Err(LoadError::Config(s.to_owned()));
        if self.connections == 0 {
            return bad("connections must be at least 1");
        }
        if let Mode::Open { rate } = self.mode {
            if !(rate.is_finite() && rate > 0.0) {
                return bad("the open-loop rate must be a positive number");
            }
        }
        if self.timeout.is_zero() {
            return bad("the timeout must be positive");
        }
        if self.duration > Duration::from_secs(7 * 24 * 3600)
            || self.warmup > Duration::from_secs(7 * 24 * 3600)
        {
            return bad("duration and warm-up must be under a week");
        }
        if self.method.is_empty() || self.method.bytes().any(|b| !b.is_ascii_alphabetic()) {
            return bad("the method must be letters only");
        }
        if !self.path.starts_with('/')
            || self
                .path
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return bad("the path must start with '/' and hold no spaces");
        }
        for (n, v) in &self.headers {
            if n.is_empty()
                || n.bytes()
                    .any(|b| b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
            {
                return bad("a header name is empty or holds ':', spaces or control bytes");
            }
            if v.bytes().any(|b| b == b'\r' || b == b'\n') {
                return bad("a header value holds a line break");
            }
        }
        Ok(())
    }
}

/// Why [`run`] could not run or finish.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The configuration is unusable.
    #[error("bad load configuration: {0}")]
    Config(String),
    /// A worker thread could not be started.
    #[error("spawning a load thread: {0}")]
    Spawn(io::Error),
    /// A worker thread panicked (a bug).
    #[error("a load thread panicked")]
    WorkerPanicked,
    /// A histogram could not be created.
    #[error("creating a histogram: {0}")]
    Histogram(String),
    /// Writing the interval log failed.
    #[error("writing the interval log: {0}")]
    Log(String),
}

/// One second (or the whole run) of TTLB samples.
#[derive(Debug, Clone)]
pub struct IntervalHistogram {
    /// Start, from the start of the measured run.
    pub start: Duration,
    /// Length.
    pub length: Duration,
    /// TTLB samples completed in it, nanoseconds.
    pub ttlb: Histogram<u64>,
}

/// What a run measured. Only measured (post-warm-up) requests count.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Requests answered 2xx with a complete body (the histograms' count).
    pub requests: u64,
    /// Failed requests by kind (`connect`, `timeout`, `status_500`, ...).
    pub errors: BTreeMap<String, u64>,
    /// From the start of measurement to the last measured completion.
    pub elapsed: Duration,
    /// `requests / elapsed`, per second.
    pub achieved_rate: f64,
    /// Time to last byte (body complete), nanoseconds.
    pub ttlb: Histogram<u64>,
    /// Time to first byte (response head complete), nanoseconds.
    pub ttfb: Histogram<u64>,
    /// SSE events received in successful responses (0 for non-stream).
    pub events: u64,
    /// The open-loop rate asked for.
    pub intended_rate: Option<f64>,
    /// How late requests were sent after their intended time (open loop;
    /// the generator's own pacing error plus any queueing on a busy
    /// connection), nanoseconds.
    pub send_lag: Histogram<u64>,
    /// Wall-clock time the measurement started.
    pub start_time: SystemTime,
    /// Per-second TTLB histograms when [`LoadConfig::intervals`] was set.
    pub intervals: Vec<IntervalHistogram>,
}

fn new_hist(template: &Histogram<u64>) -> Histogram<u64> {
    Histogram::new_from(template)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn percentiles(h: &Histogram<u64>) -> Value {
    let us = |ns: u64| ns as f64 / 1000.0;
    if h.is_empty() {
        return json!({"p50":0.0,"p90":0.0,"p99":0.0,"p999":0.0,"max":0.0,"mean":0.0});
    }
    json!({
        "p50": us(h.value_at_quantile(0.50)),
        "p90": us(h.value_at_quantile(0.90)),
        "p99": us(h.value_at_quantile(0.99)),
        "p999": us(h.value_at_quantile(0.999)),
        "max": us(h.max()),
        "mean": h.mean() / 1000.0,
    })
}

/// Formats nanoseconds for people: `850ns`, `42.3us`, `1.25ms`, `2.50s`.
fn human(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.0}ns")
    } else if ns < 1e6 {
        format!("{:.1}us", ns / 1e3)
    } else if ns < 1e9 {
        format!("{:.2}ms", ns / 1e6)
    } else {
        format!("{:.2}s", ns / 1e9)
    }
}

impl LoadReport {
    /// Failed requests, all kinds together.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// SSE events per successful request (0 when none).
    pub fn events_per_request(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.events as f64 / self.requests as f64
        }
    }

    /// The report as JSON; latencies in microseconds.
    pub fn to_json(&self) -> Value {
        json!({
            "requests": self.requests,
            "errors": self.errors,
            "error_count": self.error_count(),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "achieved_rate": self.achieved_rate,
            "intended_rate": self.intended_rate,
            "events": self.events,
            "events_per_request": self.events_per_request(),
            "ttlb_us": percentiles(&self.ttlb),
            "ttfb_us": percentiles(&self.ttfb),
            "send_lag_us": percentiles(&self.send_lag),
        })
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let row = |name: &str, h: &Histogram<u64>| {
            if h.is_empty() {
                return format!("{name:<9}{:>10}\n", "-");
            }
            let q = |x: f64| human(h.value_at_quantile(x) as f64);
            format!(
                "{name:<9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}\n",
                q(0.5),
                q(0.9),
                q(0.99),
                q(0.999),
                human(h.max() as f64),
                human(h.mean())
            )
        };
        out.push_str(&format!(
            "{:<9}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}\n",
            "", "p50", "p90", "p99", "p99.9", "max", "mean"
        ));
        out.push_str(&row("TTLB", &self.ttlb));
        out.push_str(&row("TTFB", &self.ttfb));
        if self.intended_rate.is_some() {
            out.push_str(&row("send lag", &self.send_lag));
        }
        out.push_str(&format!(
            "requests {} in {:.2}s: {:.1} req/s",
            self.requests,
            self.elapsed.as_secs_f64(),
            self.achieved_rate
        ));
        if let Some(rate) = self.intended_rate {
            out.push_str(&format!(" (intended {rate:.1} req/s)"));
        }
        out.push('\n');
        if self.events > 0 {
            let per = self.events_per_request();
            out.push_str(&format!("events {} ({per:.1} per request", self.events));
            if per > 1.0 && !self.ttlb.is_empty() {
                let gap = (self.ttlb.mean() - self.ttfb.mean()).max(0.0) / (per - 1.0);
                out.push_str(&format!(
                    ", mean {} between events after the head",
                    human(gap)
                ));
            }
            out.push_str(")\n");
        }
        if self.errors.is_empty() {
            out.push_str("errors 0\n");
        } else {
            out.push_str(&format!("errors {}:", self.error_count()));
            for (kind, n) in &self.errors {
                out.push_str(&format!(" {kind}={n}"));
            }
            out.push('\n');
        }
        out
    }

    /// Writes the TTLB samples as an HdrHistogram interval log (V2 encoding,
    /// values in nanoseconds, max column in milliseconds): one line per
    /// second when intervals were kept, else one line for the whole run.
    pub fn write_interval_log<W: Write>(&self, out: &mut W) -> Result<(), LoadError> {
        let log_err = |e: &dyn std::fmt::Display| LoadError::Log(e.to_string());
        let mut serializer = V2Serializer::new();
        let mut writer = IntervalLogWriterBuilder::new()
            .add_comment("tollgate-load TTLB, values in nanoseconds")
            .with_start_time(self.start_time)
            .with_base_time(self.start_time)
            .with_max_value_divisor(1e6)
            .begin_log_with(out, &mut serializer)
            .map_err(|e| log_err(&e))?;
        let tag = Tag::new("ttlb");
        if self.intervals.is_empty() {
            writer
                .write_histogram(&self.ttlb, Duration::ZERO, self.elapsed, tag)
                .map_err(|e| log_err(&e))?;
        } else {
            for iv in &self.intervals {
                writer
                    .write_histogram(&iv.ttlb, iv.start, iv.length, tag)
                    .map_err(|e| log_err(&e))?;
            }
        }
        Ok(())
    }
}

/// Counters shared by the workers and the progress line.
#[derive(Default)]
struct Shared {
    sent: AtomicU64,
    completed: AtomicU64,
    errors: AtomicU64,
    /// Measured requests started (the cap).
    issued: AtomicU64,
    stop: AtomicBool,
}

/// What one worker hands back.
struct WorkerResult {
    ttlb: Histogram<u64>,
    ttfb: Histogram<u64>,
    lag: Histogram<u64>,
    requests: u64,
    events: u64,
    errors: BTreeMap<String, u64>,
    last_done: Option<Instant>,
}

/// Fixed timing of a run.
#[derive(Clone, Copy)]
struct Plan {
    t0: Instant,
    measure_start: Instant,
    end: Instant,
    connections: u64,
    rate: Option<f64>,
    spin: Duration,
}

impl Plan {
    fn intended(&self, conn: u64, k: u64) -> Option<Instant> {
        let rate = self.rate?;
        let slot = k.saturating_mul(self.connections).saturating_add(conn) as f64;
        let secs = slot / rate;
        if !secs.is_finite() || secs > 1e9 {
            return None;
        }
        Some(self.t0 + Duration::from_secs_f64(secs))
    }
}

/// Runs the load and returns what was measured. Blocks for the warm-up plus
/// the duration (less when the cap is reached first; more by at most the
/// timeout of a request in flight at the end).
pub fn run(cfg: &LoadConfig) -> Result<LoadReport, LoadError> {
    cfg.validate()?;
    let request = cfg.request_bytes();
    let template = Histogram::<u64>::new_with_bounds(1, HIGHEST_NS, SIGFIG)
        .map_err(|e| LoadError::Histogram(format!("{e:?}")))?;
    let template = &template;
    let head_only = cfg.method.eq_ignore_ascii_case("HEAD");
    let shared = Shared::default();
    let t0 = Instant::now() + START_DELAY;
    let measure_start = t0 + cfg.warmup;
    let plan = Plan {
        t0,
        measure_start,
        end: measure_start + cfg.duration,
        connections: cfg.connections as u64,
        rate: match cfg.mode {
            Mode::Open { rate } => Some(rate),
            Mode::Closed => None,
        },
        spin: cfg.spin.min(Duration::from_micros(100)),
    };
    let start_time = SystemTime::now() + START_DELAY + cfg.warmup;
    let (iv_tx, iv_rx) = crossbeam_channel::unbounded::<(u64, Histogram<u64>)>();
    let mut intervals: BTreeMap<u64, Histogram<u64>> = BTreeMap::new();
    let drain = |intervals: &mut BTreeMap<u64, Histogram<u64>>| {
        for (idx, h) in iv_rx.try_iter() {
            let slot = intervals.entry(idx).or_insert_with(|| new_hist(template));
            let _ = slot.add(&h);
        }
    };

    let results = std::thread::scope(|scope| -> Result<Vec<WorkerResult>, LoadError> {
        let mut handles = Vec::with_capacity(cfg.connections);
        for i in 0..cfg.connections {
            let worker = Worker {
                id: i as u64,
                cfg,
                plan,
                shared: &shared,
                request: &request,
                head_only,
                intervals: cfg.intervals.then(|| iv_tx.clone()),
                template,
            };
            let spawned = std::thread::Builder::new()
                .name(format!("tollgate-load-{i}"))
                .spawn_scoped(scope, move || worker.run());
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    shared.stop.store(true, Ordering::Relaxed);
                    for h in handles {
                        let _ = h.join();
                    }
                    return Err(LoadError::Spawn(e));
                }
            }
        }
        let mut last_print = Instant::now();
        let mut last_completed = 0u64;
        while !handles.iter().all(|h| h.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            drain(&mut intervals);
            if cfg.progress && last_print.elapsed() >= Duration::from_secs(1) {
                let now = Instant::now();
                let completed = shared.completed.load(Ordering::Relaxed);
                let rate = (completed - last_completed) as f64
                    / now.duration_since(last_print).as_secs_f64();
                let elapsed = now.saturating_duration_since(t0).as_secs_f64();
                let phase = if now < measure_start {
                    " (warm-up)"
                } else {
                    ""
                };
                eprintln!(
                    "[{elapsed:6.1}s] sent {} completed {completed} errors {} rate {rate:.0}/s{phase}",
                    shared.sent.load(Ordering::Relaxed),
                    shared.errors.load(Ordering::Relaxed),
                );
                last_print = now;
                last_completed = completed;
            }
        }
        let mut results = Vec::with_capacity(handles.len());
        let mut panicked = false;
        for h in handles {
            match h.join() {
                Ok(r) => results.push(r),
                Err(_) => panicked = true,
            }
        }
        if panicked {
            return Err(LoadError::WorkerPanicked);
        }
        Ok(results)
    })?;
    drop(iv_tx);
    drain(&mut intervals);

    let mut ttlb = new_hist(template);
    let mut ttfb = new_hist(template);
    let mut send_lag = new_hist(template);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut requests = 0;
    let mut events = 0;
    let mut last_done: Option<Instant> = None;
    for r in results {
        let _ = ttlb.add(&r.ttlb);
        let _ = ttfb.add(&r.ttfb);
        let _ = send_lag.add(&r.lag);
        requests += r.requests;
        events += r.events;
        for (k, n) in r.errors {
            *errors.entry(k).or_default() += n;
        }
        last_done = last_done.max(r.last_done);
    }
    let finish = last_done.unwrap_or_else(Instant::now);
    let elapsed = finish.saturating_duration_since(measure_start);
    let achieved_rate = if elapsed.is_zero() {
        0.0
    } else {
        requests as f64 / elapsed.as_secs_f64()
    };
    let intervals = intervals
        .into_iter()
        .map(|(idx, ttlb)| IntervalHistogram {
            start: Duration::from_secs(idx),
            length: Duration::from_secs(1),
            ttlb,
        })
        .collect();
    Ok(LoadReport {
        requests,
        errors,
        elapsed,
        achieved_rate,
        ttlb,
        ttfb,
        events,
        intended_rate: plan.rate,
        send_lag,
        start_time,
        intervals,
    })
}

/// Waits until `deadline`: sleeps, then spins for at most `spin` at the end.
fn wait_until(deadline: Instant, spin: Duration) {
    loop {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        let left = deadline - now;
        if left > spin {
            std::thread::sleep(left - spin);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Lowers the calling thread's timer slack to 1 µs so sleeps end on time;
/// best effort.
fn precise_timers() {
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_timerslack(1000);
    }
}

/// Why one request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fail {
    Connect,
    Timeout,
    Reset,
    Eof,
    Malformed,
    Io,
}

impl Fail {
    fn kind(self) -> &'static str {
        match self {
            Fail::Connect => "connect",
            Fail::Timeout => "timeout",
            Fail::Reset => "reset",
            Fail::Eof => "eof",
            Fail::Malformed => "malformed",
            Fail::Io => "io",
        }
    }

    fn from_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Fail::Timeout,
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Fail::Reset,
            io::ErrorKind::UnexpectedEof => Fail::Eof,
            _ => Fail::Io,
        }
    }
}

/// One response, read completely.
struct Response {
    status: u16,
    head_done: Instant,
    events: u64,
    keep_alive: bool,
}

/// Counts blank-line-separated SSE events across reads.
#[derive(Default)]
struct SseCounter {
    after_lf: bool,
    events: u64,
}

impl SseCounter {
    fn feed(&mut self, data: &[u8]) {
        for &b in data {
            match b {
                b'\n' if self.after_lf => {
                    self.events += 1;
                    self.after_lf = false;
                }
                b'\n' => self.after_lf = true,
                b'\r' => {}
                _ => self.after_lf = false,
            }
        }
    }
}

/// One keep-alive connection and its read buffer.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Conn {
    fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, Fail> {
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|_| Fail::Connect)?;
        let setup = stream
            .set_nodelay(true)
            .and_then(|()| stream.set_read_timeout(Some(timeout)))
            .and_then(|()| stream.set_write_timeout(Some(timeout)));
        setup.map_err(|_| Fail::Connect)?;
        Ok(Self {
            stream,
            buf: vec![0; BUF_SIZE],
            start: 0,
            end: 0,
        })
    }

    fn available(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Reads more bytes; `Ok(0)` at EOF.
    fn fill(&mut self, deadline: Instant) -> Result<usize, Fail> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else if self.buf.len() < MAX_HEAD {
                self.buf.resize(self.buf.len() * 2, 0);
            } else {
                return Err(Fail::Malformed);
            }
        }
        let n = loop {
            match self.stream.read(&mut self.buf[self.end..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Fail::from_io(&e)),
            }
        };
        if Instant::now() > deadline {
            return Err(Fail::Timeout);
        }
        self.end += n;
        Ok(n)
    }

    /// Reads until `pred` finds a line end in the available bytes; returns its index.
    fn find_lf(&mut self, deadline: Instant) -> Result<usize, Fail> {
        let mut searched = 0;
        loop {
            if let Some(p) = self.available()[searched..]
                .iter()
                .position(|&b| b == b'\n')
            {
                return Ok(searched + p);
            }
            searched = self.available().len();
            if searched > 4096 {
                return Err(Fail::Malformed);
            }
            if self.fill(deadline)? == 0 {
                return Err(Fail::Eof);
            }
        }
    }

    /// Reads `len` body bytes, feeding them to `sse`.
    fn body_bytes(
        &mut self,
        mut len: u64,
        sse: &mut Option<SseCounter>,
        deadline: Instant,
    ) -> Result<(), Fail> {
        while len > 0 {
            if self.available().is_empty() && self.fill(deadline)? == 0 {
                return Err(Fail::Eof);
            }
            let take = self
                .available()
                .len()
                .min(usize::try_from(len).unwrap_or(usize::MAX));
            if let Some(sse) = sse {
                sse.feed(&self.available()[..take]);
            }
            self.consume(take);
            len -= take as u64;
        }
        Ok(())
    }

    /// Sends `request` and reads one whole response.
    fn exchange(
        &mut self,
        request: &[u8],
        head_only: bool,
        timeout: Duration,
    ) -> Result<Response, Fail> {
        let deadline = Instant::now() + timeout;
        self.stream
            .write_all(request)
            .map_err(|e| Fail::from_io(&e))?;

        // Head.
        let (status, framing, keep_alive, stream_body, head_done) = loop {
            let parsed = {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(self.available()) {
                    Ok(httparse::Status::Complete(n)) => Some((n, Head::of(&resp)?)),
                    Ok(httparse::Status::Partial) => None,
                    Err(_) => return Err(Fail::Malformed),
                }
            };
            match parsed {
                Some((n, head)) => {
                    self.consume(n);
                    if (100..200).contains(&head.status) && head.status != 101 {
                        continue; // interim response; the real one follows
                    }
                    break (
                        head.status,
                        head.framing,
                        head.keep_alive,
                        head.event_stream,
                        Instant::now(),
                    );
                }
                None => {
                    if self.fill(deadline)? == 0 {
                        return Err(Fail::Eof);
                    }
                }
            }
        };

        // Body.
        let mut sse = stream_body.then(SseCounter::default);
        let no_body = head_only || status == 204 || status == 304 || (100..200).contains(&status);
        let mut keep_alive = keep_alive;
        if !no_body {
            match framing {
                Framing::Length(len) => self.body_bytes(len, &mut sse, deadline)?,
                Framing::Chunked => loop {
                    let lf = self.find_lf(deadline)?;
                    let size = parse_chunk_size(&self.available()[..lf])?;
                    self.consume(lf + 1);
                    if size == 0 {
                        // Trailers, up to an empty line.
                        loop {
                            let lf = self.find_lf(deadline)?;
                            let blank = self.available()[..lf].iter().all(|&b| b == b'\r');
                            self.consume(lf + 1);
                            if blank {
                                break;
                            }
                        }
                        break;
                    }
                    self.body_bytes(size, &mut sse, deadline)?;
                    let lf = self.find_lf(deadline)?;
                    if !self.available()[..lf].iter().all(|&b| b == b'\r') {
                        return Err(Fail::Malformed);
                    }
                    self.consume(lf + 1);
                },
                Framing::Close => {
                    keep_alive = false;
                    loop {
                        if let Some(sse) = &mut sse {
                            sse.feed(self.available());
                        }
                        self.consume(self.available().len());
                        if self.fill(deadline)? == 0 {
                            break;
                        }
                    }
                }
            }
        }
        Ok(Response {
            status,
            head_done,
            events: sse.map_or(0, |s| s.events),
            keep_alive,
        })
    }
}

fn parse_chunk_size(line: &[u8]) -> Result<u64, Fail> {
    let digits = line
        .iter()
        .take_while(|&&b| b != b';' && b != b'\r' && b != b' ' && b != b'\t')
        .copied()
        .collect::<Vec<u8>>();
    if digits.is_empty() || digits.len() > 15 {
        return Err(Fail::Malformed);
    }
    let text = std::str::from_utf8(&digits).map_err(|_| Fail::Malformed)?;
    u64::from_str_radix(text, 16).map_err(|_| Fail::Malformed)
}

#[derive(Clone, Copy)]
enum Framing {
    Length(u64),
    Chunked,
    Close,
}

struct Head {
    status: u16,
    framing: Framing,
    keep_alive: bool,
    event_stream: bool,
}

impl Head {
    fn of(resp: &httparse::Response<'_, '_>) -> Result<Self, Fail> {
        let status = resp.code.ok_or(Fail::Malformed)?;
        let mut keep_alive = resp.version != Some(0);
        let mut length = None;
        let mut chunked = false;
        let mut event_stream = false;
        for h in resp.headers.iter() {
            let value = std::str::from_utf8(h.value)
                .map_err(|_| Fail::Malformed)?
                .trim();
            if h.name.eq_ignore_ascii_case("content-length") {
                let n: u64 = value.parse().map_err(|_| Fail::Malformed)?;
                if length.is_some_and(|l| l != n) {
                    return Err(Fail::Malformed);
                }
                length = Some(n);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value
                    .rsplit(',')
                    .next()
                    .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                for token in value.split(',') {
                    let token = token.trim();
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            } else if h.name.eq_ignore_ascii_case("content-type") {
                event_stream =
                    value.len() >= 17 && value[..17].eq_ignore_ascii_case("text/event-stream");
            }
        }
        let framing = if chunked {
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::Close
        };
        Ok(Self {
            status,
            framing,
            keep_alive,
            event_stream,
        })
    }
}

/// One connection's thread.
struct Worker<'a> {
    id: u64,
    cfg: &'a LoadConfig,
    plan: Plan,
    shared: &'a Shared,
    request: &'a [u8],
    head_only: bool,
    intervals: Option<crossbeam_channel::Sender<(u64, Histogram<u64>)>>,
    template: &'a Histogram<u64>,
}

impl Worker<'_> {
    fn run(self) -> WorkerResult {
        precise_timers();
        let plan = self.plan;
        let mut out = WorkerResult {
            ttlb: new_hist(self.template),
            ttfb: new_hist(self.template),
            lag: new_hist(self.template),
            requests: 0,
            events: 0,
            errors: BTreeMap::new(),
            last_done: None,
        };
        let mut interval: Option<(u64, Histogram<u64>)> = None;
        // Connect ahead of time; a failure here is retried, and counted, at
        // the first request.
        let mut conn = Conn::connect(self.cfg.target, self.cfg.timeout).ok();
        wait_until(plan.t0, plan.spin);
        let mut k: u64 = 0;
        loop {
            if self.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            let intended = match plan.intended(self.id, k) {
                Some(at) => {
                    if at >= plan.end {
                        break;
                    }
                    wait_until(at, plan.spin);
                    at
                }
                None if plan.rate.is_some() => break,
                None => Instant::now(),
            };
            k += 1;
            let now = Instant::now();
            if self.shared.stop.load(Ordering::Relaxed) {
                break;
            }
            if now >= plan.end {
                // Open loop running behind: what was intended before the end
                // but cannot start before it is counted, not silently dropped.
                let mut unsent = 0;
                let mut at = Some(intended);
                let mut next = k;
                while let Some(t) = at.filter(|&t| t < plan.end) {
                    if t >= plan.measure_start {
                        unsent += 1;
                    }
                    at = plan.intended(self.id, next);
                    next += 1;
                }
                if unsent > 0 {
                    *out.errors.entry("unsent".to_owned()).or_default() += unsent;
                }
                break;
            }
            let measured = intended >= plan.measure_start;
            if measured
                && self.shared.issued.fetch_add(1, Ordering::Relaxed) >= self.cfg.max_requests
            {
                self.shared.stop.store(true, Ordering::Relaxed);
                break;
            }
            self.shared.sent.fetch_add(1, Ordering::Relaxed);
            if measured && plan.rate.is_some() {
                out.lag
                    .saturating_record(nanos(now.saturating_duration_since(intended)).max(1));
            }

            let result = match conn.as_mut() {
                Some(c) => c.exchange(self.request, self.head_only, self.cfg.timeout),
                None => match Conn::connect(self.cfg.target, self.cfg.timeout) {
                    Ok(c) => {
                        conn.insert(c)
                            .exchange(self.request, self.head_only, self.cfg.timeout)
                    }
                    Err(f) => Err(f),
                },
            };
            let done = Instant::now();
            let ok = match result {
                Ok(resp) => {
                    if !resp.keep_alive {
                        conn = None;
                    }
                    if (200..300).contains(&resp.status) {
                        if measured {
                            let ttlb = nanos(done.saturating_duration_since(intended)).max(1);
                            out.ttlb.saturating_record(ttlb);
                            out.ttfb.saturating_record(
                                nanos(resp.head_done.saturating_duration_since(intended)).max(1),
                            );
                            out.requests += 1;
                            out.events += resp.events;
                            if let Some(tx) = &self.intervals {
                                let idx =
                                    done.saturating_duration_since(plan.measure_start).as_secs();
                                let slot = match &mut interval {
                                    Some((i, h)) if *i == idx => h,
                                    _ => {
                                        if let Some(old) = interval.take() {
                                            let _ = tx.send(old);
                                        }
                                        &mut interval.insert((idx, new_hist(self.template))).1
                                    }
                                };
                                slot.saturating_record(ttlb);
                            }
                        }
                        true
                    } else {
                        if measured {
                            *out.errors
                                .entry(format!("status_{}", resp.status))
                                .or_default() += 1;
                        }
                        false
                    }
                }
                Err(fail) => {
                    conn = None;
                    if measured {
                        *out.errors.entry(fail.kind().to_owned()).or_default() += 1;
                    }
                    if fail == Fail::Connect && plan.rate.is_none() {
                        std::thread::sleep(CONNECT_BACKOFF);
                    }
                    false
                }
            };
            if measured {
                out.last_done = Some(done);
            }
            if ok {
                self.shared.completed.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let (Some(tx), Some(old)) = (&self.intervals, interval.take()) {
            let _ = tx.send(old);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_counter_spans_reads_and_crlf() {
        let mut c = SseCounter::default();
        c.feed(b"data: a\n");
        c.feed(b"\ndata: b\r\n\r");
        c.feed(b"\nevent: x\ndata: y\n\n");
        assert_eq!(c.events, 3);
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(parse_chunk_size(b"1a\r"), Ok(26));
        assert_eq!(parse_chunk_size(b"0;ext=1\r"), Ok(0));
        assert_eq!(parse_chunk_size(b"\r"), Err(Fail::Malformed));
        assert_eq!(parse_chunk_size(b"zz\r"), Err(Fail::Malformed));
    }

    #[test]
    fn open_loop_schedule_interleaves_connections() {
        let t0 = Instant::now();
        let plan = Plan {
            t0,
            measure_start: t0,
            end: t0 + Duration::from_secs(1),
            connections: 4,
            rate: Some(1000.0),
            spin: Duration::ZERO,
        };
        let at = |i, k| plan.intended(i, k).map(|t| t.duration_since(t0));
        assert_eq!(at(0, 0), Some(Duration::ZERO));
        assert_eq!(at(1, 0), Some(Duration::from_millis(1)));
        assert_eq!(at(0, 1), Some(Duration::from_millis(4)));
        assert_eq!(at(3, 2), Some(Duration::from_millis(11)));
    }

    #[test]
    fn request_bytes_have_framing_and_custom_headers() {
        let mut cfg = LoadConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 9)),
            Payload::AnthropicStream,
        );
        cfg.headers.push(("x-api-key".into(), "k".into()));
        let bytes = cfg.request_bytes();
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("POST /v1/messages HTTP/1.1\r\n"));
        assert!(text.contains("anthropic-version: 2023-06-01\r\n"));
        assert!(text.contains("accept: text/event-stream\r\n"));
        assert!(text.contains("x-api-key: k\r\n"));
        let body = ANTHROPIC_STREAM_BODY;
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())));
        assert!(text.ends_with(body));
        assert!(serde_json::from_str::<Value>(body).is_ok());
        for b in [OPENAI_BODY, OPENAI_STREAM_BODY, ANTHROPIC_BODY] {
            assert!(serde_json::from_str::<Value>(b).is_ok());
        }
    }
}
