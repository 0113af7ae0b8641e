//! Logging that never blocks a core: JSON lines to stdout through a background writer thread.
//!
//! Owns: the `tollgate-log` writer thread, the [`Logger`] handle used off the hot path (start-up, resolver,
//! shutdown events), and [`CoreLog`], the per-core buffer the request path appends access-log lines to.
//! A core formats its line into its own buffer and hands a full buffer (or, every 50 ms, a non-empty one) to
//! the writer over a bounded crossbeam channel with `try_send`.
//!
//! Fails: if the writer falls behind and the channel is full, the batch is dropped and counted; the count is
//! reported in the next line that gets through (`"dropped_log_batches"`), so loss is visible, never silent.
//! A core never waits for stdout. Cost: formatting one access line is ~300 ns; a channel send per batch.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};

/// Handle to the log writer. Cheap to clone; usable from any thread.
#[derive(Debug, Clone)]
pub struct Logger {
    tx: Sender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    /// Every batch ever dropped (never reset): `/metrics`' `tollgate_access_log_dropped_batches_total`.
    dropped_total: Arc<AtomicU64>,
    /// Set by [`Logger::close`]: the writer drains what is queued and exits even if some clone is still alive
    /// (a task a runtime never dropped, e.g. an idle keep-alive connection's, holds one).
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Flush a core's buffer once it holds this many bytes.
const CORE_BUFFER_FLUSH: usize = 32 * 1024;

impl Logger {
    /// Starts the writer thread; it exits when every `Logger` and `CoreLog` is dropped, after writing all.
    pub fn start() -> std::io::Result<(Logger, std::thread::JoinHandle<()>)> {
        let (tx, rx) = bounded::<Vec<u8>>(1024);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_w = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("tollgate-log".into())
            .spawn(move || writer(rx, stop_w))?;
        Ok((
            Logger {
                tx,
                dropped: Arc::new(AtomicU64::new(0)),
                dropped_total: Arc::new(AtomicU64::new(0)),
                stop,
            },
            handle,
        ))
    }

    /// Asks the writer to finish: it writes everything queued so far and exits.
    pub fn close(&self) {
        self.stop.store(true, Ordering::Release);
        // Wake it if it is waiting (an empty batch writes nothing).
        let _ = self.tx.try_send(Vec::new());
    }

    /// Batches of log lines dropped since start because the writer fell behind.
    pub fn dropped_total(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }

    /// Writes one event line: `{"ts":..,"event":name, k: v, ...}`. For start-up and background events.
    pub fn event(&self, name: &str, fields: &[(&str, &str)]) {
        let mut map = serde_json::Map::new();
        map.insert("ts".into(), serde_json::Value::String(now_rfc3339()));
        map.insert("event".into(), serde_json::Value::String(name.to_owned()));
        for (k, v) in fields {
            map.insert((*k).to_owned(), serde_json::Value::String((*v).to_owned()));
        }
        self.value(serde_json::Value::Object(map));
    }

    /// Writes one JSON value as a line.
    pub fn value(&self, v: serde_json::Value) {
        let mut line = serde_json::to_vec(&v).unwrap_or_default();
        line.push(b'\n');
        self.send(line);
    }

    fn send(&self, mut batch: Vec<u8>) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            batch.extend_from_slice(
                format!("{{\"event\":\"log_dropped\",\"dropped_log_batches\":{dropped}}}\n")
                    .as_bytes(),
            );
        }
        match self.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1 + dropped, Ordering::Relaxed);
                self.dropped_total.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn writer(rx: Receiver<Vec<u8>>, stop: Arc<std::sync::atomic::AtomicBool>) {
    let stdout = std::io::stdout();
    loop {
        let first = match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(b) => b,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if stop.load(Ordering::Acquire) {
                    return;
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let mut out = stdout.lock();
        let _ = out.write_all(&first);
        // Drain whatever else is queued before one flush.
        while let Ok(more) = rx.try_recv() {
            let _ = out.write_all(&more);
        }
        let _ = out.flush();
        if stop.load(Ordering::Acquire) && rx.is_empty() {
            return;
        }
    }
}

/// A core's access-log buffer. `!Send`: lives on its core.
#[derive(Debug)]
pub struct CoreLog {
    logger: Logger,
    buf: RefCell<Vec<u8>>,
    enabled: Cell<bool>,
}

impl CoreLog {
    pub fn new(logger: Logger, enabled: bool) -> Self {
        CoreLog {
            logger,
            buf: RefCell::new(Vec::with_capacity(CORE_BUFFER_FLUSH + 1024)),
            enabled: Cell::new(enabled),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.get()
    }

    pub fn logger(&self) -> &Logger {
        &self.logger
    }

    /// Appends one line, built by `f` into the core's buffer (which adds the newline).
    pub fn line(&self, f: impl FnOnce(&mut Vec<u8>)) {
        let mut buf = self.buf.borrow_mut();
        f(&mut buf);
        buf.push(b'\n');
        if buf.len() >= CORE_BUFFER_FLUSH {
            let batch = std::mem::replace(&mut *buf, Vec::with_capacity(CORE_BUFFER_FLUSH + 1024));
            drop(buf);
            self.logger.send(batch);
        }
    }

    /// Hands any buffered lines to the writer; called by the core's 50 ms ticker and at shutdown.
    pub fn flush(&self) {
        let mut buf = self.buf.borrow_mut();
        if !buf.is_empty() {
            let batch = std::mem::replace(&mut *buf, Vec::with_capacity(4096));
            drop(buf);
            self.logger.send(batch);
        }
    }
}

/// Current UTC time as RFC 3339 with milliseconds, from the system clock (log lines only).
pub fn now_rfc3339() -> String {
    let mut b = [0u8; 24];
    now_rfc3339_into(&mut b);
    // ASCII digits and separators only.
    String::from_utf8_lossy(&b).into_owned()
}

/// [`now_rfc3339`] written into a fixed buffer: the access log calls it for every request, and the
/// formatter's width and padding machinery cost more than the clock read.
pub fn now_rfc3339_into(out: &mut [u8; 24]) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let ms = now.subsec_millis();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y.clamp(0, 9999) as u64);
    put(5, 2, u64::from(m));
    put(8, 2, u64::from(d));
    put(11, 2, (rem / 3600) as u64);
    put(14, 2, ((rem % 3600) / 60) as u64);
    put(17, 2, (rem % 60) as u64);
    put(20, 3, u64::from(ms));
    for (i, c) in [
        (4, b'-'),
        (7, b'-'),
        (10, b'T'),
        (13, b':'),
        (16, b':'),
        (19, b'.'),
        (23, b'Z'),
    ] {
        out[i] = c;
    }
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Appends `s` as a JSON string literal (with quotes).
pub fn json_str(out: &mut Vec<u8>, s: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }

    #[test]
    fn timestamps_are_rfc3339_with_milliseconds_and_now() {
        let before = jiff::Timestamp::now();
        let ts = now_rfc3339();
        let after = jiff::Timestamp::now();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T', "{ts}");
        let parsed: jiff::Timestamp = ts.parse().unwrap();
        // Millisecond precision: truncated, never ahead of the clock.
        assert!(
            parsed >= before - jiff::SignedDuration::from_millis(1) && parsed <= after,
            "{ts}"
        );
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut v = Vec::new();
        json_str(&mut v, "a\"b\\c\n\u{1}é");
        let back: String = serde_json::from_slice(&v).unwrap();
        assert_eq!(back, "a\"b\\c\n\u{1}é");
    }
}
