//! Helpers for Tollgate's end-to-end tests: start the real binaries on port 0, read their bound address from
//! their log, kill them on drop; plus a raw-socket HTTP/1.1 client for hostile input and stream timing.
//!
//! The binaries are found next to the test executable's directory (`target/<profile>/`), where
//! `cargo test --workspace` builds them (the `dataplane` and `loadtest` packages have integration tests, so
//! cargo builds their binaries before any test runs).

#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod idp;
pub mod multinode;
pub mod postgres;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long to wait for a process to say it is listening, or for an expected log line.
pub const WAIT: Duration = Duration::from_secs(20);

/// Path of a workspace binary built by cargo: next to the running executable (a binary such as the release
/// gate) or one level up (a test executable in `target/<profile>/deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not built next to {}: run `cargo test --workspace` (or `cargo build --bins`) first",
        exe.display()
    )
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("tollgate-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    cv: Condvar,
}

/// A running binary whose stdout and stderr lines are collected.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    out: Arc<Lines>,
    pub name: String,
}

impl Proc {
    /// Starts `path args...` and waits for its `{"event":"listening","addr":...}` line.
    pub fn start(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut p = Proc::spawn(path, args, env);
        let line = p
            .wait_line(|l| l.contains("\"listening\""), WAIT)
            .unwrap_or_else(|| {
                panic!(
                    "{} never logged a listening line; output:\n{}",
                    p.name,
                    p.output()
                )
            });
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        p.addr = v["addr"].as_str().unwrap().parse().unwrap();
        p
    }

    /// Starts `path args...` without waiting for anything (a command such as `tollgate login`); `addr` is unset.
    pub fn spawn(path: &Path, args: &[&str], env: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(path);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", path.display()));
        let out = Arc::new(Lines::default());
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
        ] {
            let out = Arc::clone(&out);
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    out.lines.lock().unwrap().push(line);
                    out.cv.notify_all();
                }
            });
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        Proc {
            child,
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            out,
            name,
        }
    }

    /// Waits for the first line matching `pred` (already seen lines count).
    pub fn wait_line(&self, pred: impl Fn(&str) -> bool, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.out.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self.out.cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Waits for a JSON log line whose fields match all of `fields`.
    pub fn wait_json(&self, fields: &[(&str, serde_json::Value)]) -> serde_json::Value {
        let line = self
            .wait_line(
                |l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .map(|v| fields.iter().all(|(k, want)| &v[*k] == want))
                        .unwrap_or(false)
                },
                WAIT,
            )
            .unwrap_or_else(|| panic!("no log line with {fields:?}; output:\n{}", self.output()));
        serde_json::from_str(&line).unwrap()
    }

    /// Everything printed so far.
    pub fn output(&self) -> String {
        self.out.lines.lock().unwrap().join("\n")
    }

    /// Sends SIGTERM.
    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Sends SIGHUP (a running gateway re-reads its configuration file).
    pub fn sighup(&self) {
        let _ = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status();
    }

    /// Waits until `n` JSON log lines match all of `fields` (e.g. the second `reloaded`); returns the n-th.
    pub fn wait_json_nth(
        &self,
        fields: &[(&str, serde_json::Value)],
        n: usize,
    ) -> serde_json::Value {
        let matches = |l: &String| {
            serde_json::from_str::<serde_json::Value>(l)
                .map(|v| fields.iter().all(|(k, want)| &v[*k] == want))
                .unwrap_or(false)
        };
        let deadline = Instant::now() + WAIT;
        let mut lines = self.out.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().filter(|l| matches(l)).nth(n.saturating_sub(1)) {
                return serde_json::from_str(l).unwrap();
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "fewer than {n} log lines with {fields:?}; output:\n{}",
                    self.output()
                );
            }
            lines = self.out.cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// How many JSON log lines so far match all of `fields`.
    pub fn count_json(&self, fields: &[(&str, serde_json::Value)]) -> usize {
        self.out
            .lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .map(|v| fields.iter().all(|(k, want)| &v[*k] == want))
                    .unwrap_or(false)
            })
            .count()
    }

    /// Waits for exit, returning the status code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tollgate-mock` with extra arguments.
pub fn mock(args: &[&str]) -> Proc {
    let mut all = vec!["--listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    Proc::start(&bin("tollgate-mock"), &all, &[])
}

/// The key tests give the gateway for the mock (the mock checks it).
pub const MOCK_KEY: &str = "sk-test-provider-key-0123456789";

/// The store `config_for` points gateways at unless told otherwise: one per test process.
pub fn test_store() -> PathBuf {
    std::env::temp_dir().join(format!("tollgate-test-store-{}", std::process::id()))
}

/// Creates a service token in `store` with the real CLI and returns it (a fresh name each call).
pub fn service_token(store: &Path, team: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = Command::new(bin("tollgate"))
        .args(["service-token", "create", "--store"])
        .arg(store)
        .args(["--name", &format!("test-{n}"), "--team", team])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// A gateway config with one OpenAI and one Anthropic provider at `base`, plus `extra` TOML appended.
/// Unless `extra` has its own `[auth]`, requests without credentials are served (as `anonymous`), so tests
/// about other phases need no token; unless it has its own `[store]`, state goes to a per-process temp dir.
pub fn config_for(base: &str, server_extra: &str, extra: &str) -> String {
    let workers = if server_extra.contains("workers") {
        ""
    } else {
        "workers = 2"
    };
    let mut extra = extra.to_owned();
    if !extra.contains("[auth") {
        extra.push_str("\n[auth]\nallow_anonymous = true\n");
    }
    if !extra.contains("[store]") {
        extra.push_str(&format!(
            "\n[store]\ndir = \"{}\"\n",
            test_store().display()
        ));
    }
    if !extra.contains("[admin]") {
        // Each gateway's control plane on a port of its own (tests run side by side).
        extra.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !extra.contains("[ledger]") {
        // Each gateway its own spend store, next to its config file (relative paths resolve there).
        extra.push_str("\n[ledger]\ndir = \"ledger\"\n");
    }
    format!(
        r#"
[server]
listen = ["127.0.0.1:0"]
{workers}
{server_extra}

[[providers]]
name = "openai"
kind = "openai"
base_url = "{base}"
api_key_env = "TG_TEST_OPENAI_KEY"

[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "{base}"
api_key_env = "TG_TEST_ANTHROPIC_KEY"

[[routes]]
model = "gpt-*"
provider = "openai"

[[routes]]
model = "claude-*"
provider = "anthropic"

[[routes]]
model = "fast"
provider = "openai"
upstream_model = "gpt-4o-mini"
{extra}
"#
    )
}

/// A gateway started from `toml`, with the test provider keys in its environment.
pub struct Gateway {
    pub proc: Proc,
    _dir: TempDir,
}

impl std::ops::Deref for Gateway {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for Gateway {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

impl Gateway {
    /// The configuration file the gateway was started with.
    pub fn config_path(&self) -> PathBuf {
        self._dir.0.join("tollgate.toml")
    }

    /// Kills the gateway with SIGKILL (no shutdown of any kind) and waits for it to be gone.
    pub fn kill9(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// Starts the gateway again from the same configuration file (after [`Gateway::kill9`] or an exit).
    pub fn restart(&mut self) {
        let cfg = self.config_path();
        self.proc = Proc::start(
            &bin("tollgate"),
            &["serve", "--config", cfg.to_str().unwrap()],
            &[
                ("TG_TEST_OPENAI_KEY", MOCK_KEY),
                ("TG_TEST_ANTHROPIC_KEY", MOCK_KEY),
            ],
        );
    }

    /// `tollgate spend --json` for this gateway's configuration: one JSON object per instance.
    pub fn spend(&self) -> Vec<serde_json::Value> {
        let out = Command::new(bin("tollgate"))
            .args([
                "spend",
                "--json",
                "--config",
                self.config_path().to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tollgate spend failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Replaces the configuration file (apply it with [`Proc::sighup`]).
    pub fn rewrite_config(&self, toml: &str) {
        std::fs::write(self.config_path(), toml).unwrap();
    }
}

pub fn gateway(toml: &str) -> Gateway {
    let dir = TempDir::new("gw");
    let cfg = dir.file("tollgate.toml", toml);
    let proc = Proc::start(
        &bin("tollgate"),
        &["serve", "--config", cfg.to_str().unwrap()],
        &[
            ("TG_TEST_OPENAI_KEY", MOCK_KEY),
            ("TG_TEST_ANTHROPIC_KEY", MOCK_KEY),
        ],
    );
    Gateway { proc, _dir: dir }
}

/// A mock (checking the provider key), a gateway with its own store, `[auth]` (no anonymous callers),
/// the `[[budgets]]` in `budgets` and `server_extra` under `[server]`, and one service token per entry of
/// `teams` (its team). The store directory must outlive the gateway: keep the returned [`TempDir`].
pub fn budgeted_gateway(
    server_extra: &str,
    budgets: &str,
    teams: &[&str],
) -> (Proc, Gateway, TempDir, Vec<String>) {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let store = TempDir::new("budget-store");
    let tokens = teams.iter().map(|t| service_token(&store.0, t)).collect();
    let extra = format!(
        "[store]\ndir = \"{}\"\n[auth]\n{budgets}\n",
        store.0.display()
    );
    let g = gateway(&config_for(
        &format!("http://{}", m.addr),
        server_extra,
        &extra,
    ));
    (m, g, store, tokens)
}

/// A mock that checks the gateway's key, and a gateway in front of it.
pub fn mock_and_gateway(server_extra: &str) -> (Proc, Gateway) {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let g = gateway(&config_for(&format!("http://{}", m.addr), server_extra, ""));
    (m, g)
}

/// A parsed HTTP response read off a raw socket.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// For chunked responses: the decoded chunks, in order, as the gateway framed them.
    pub chunks: Vec<Vec<u8>>,
    /// The response was complete (length reached or terminating chunk seen).
    pub complete: bool,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw client connection.
pub struct Conn {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    fn fill(&mut self) -> usize {
        let mut tmp = [0u8; 16 * 1024];
        match self.stream.read(&mut tmp) {
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                n
            }
            Err(_) => 0,
        }
    }

    /// Reads one response; a response cut short is returned with `complete == false`.
    pub fn read_response(&mut self) -> Response {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut r = httparse::Response::new(&mut headers);
            match r.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    let status = r.code.unwrap();
                    let hs: Vec<(String, String)> = r
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect();
                    self.buf.drain(..n);
                    if status == 100 {
                        continue;
                    }
                    return self.read_body(status, hs);
                }
                Ok(httparse::Status::Partial) => {
                    if self.fill() == 0 {
                        panic!(
                            "connection closed before a response head: {:?}",
                            String::from_utf8_lossy(&self.buf)
                        );
                    }
                }
                Err(e) => panic!(
                    "bad response head: {e}: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    fn read_body(&mut self, status: u16, headers: Vec<(String, String)>) -> Response {
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let mut resp = Response {
            status,
            headers: headers.clone(),
            body: Vec::new(),
            chunks: Vec::new(),
            complete: false,
        };
        // RFC 9112 section 6.3: 204 and 304 responses end at their head.
        if status == 204 || status == 304 {
            resp.complete = true;
            return resp;
        }
        if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let Some(pos) = self.buf.windows(2).position(|w| w == b"\r\n") else {
                    if self.fill() == 0 {
                        return resp;
                    }
                    continue;
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..pos]).unwrap().trim(),
                    16,
                )
                .unwrap();
                while self.buf.len() < pos + 2 + size + 2 {
                    if self.fill() == 0 {
                        return resp;
                    }
                }
                let data = self.buf[pos + 2..pos + 2 + size].to_vec();
                assert_eq!(
                    &self.buf[pos + 2 + size..pos + 4 + size],
                    b"\r\n",
                    "chunk not followed by CRLF"
                );
                self.buf.drain(..pos + 4 + size);
                if size == 0 {
                    resp.complete = true;
                    return resp;
                }
                resp.body.extend_from_slice(&data);
                resp.chunks.push(data);
            }
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                if self.fill() == 0 {
                    resp.body = std::mem::take(&mut self.buf);
                    return resp;
                }
            }
            resp.body = self.buf.drain(..len).collect();
            resp.complete = true;
            resp
        } else {
            while self.fill() > 0 {}
            resp.body = std::mem::take(&mut self.buf);
            resp.complete = true;
            resp
        }
    }

    /// True when the peer has closed the connection (EOF) within the read timeout.
    pub fn closed(&mut self) -> bool {
        self.stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut b = [0u8; 1];
        matches!(self.stream.read(&mut b), Ok(0) | Err(_))
    }
}

/// One request on a fresh connection.
pub fn request(addr: SocketAddr, raw: &[u8]) -> Response {
    let mut c = Conn::open(addr);
    c.send(raw);
    c.read_response()
}

/// A POST with a JSON body and extra header lines (`"name: value\r\n"` each).
pub fn post(addr: SocketAddr, path: &str, body: &str, extra_headers: &str) -> Response {
    request(addr, post_bytes(path, body, extra_headers).as_bytes())
}

pub fn post_bytes(path: &str, body: &str, extra_headers: &str) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra_headers}\r\n{body}",
        body.len()
    )
}

/// Parses an SSE body into `(event, data)` pairs.
pub fn sse_events(body: &[u8]) -> Vec<(Option<String>, String)> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|b| !b.trim().is_empty())
        // A block of only comment lines (`: ...`) dispatches no event, per the SSE spec.
        .filter(|b| b.lines().any(|l| !l.starts_with(':') && !l.is_empty()))
        .map(|block| {
            let mut event = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.trim_start().to_owned());
                }
            }
            (event, data.join("\n"))
        })
        .collect()
}

/// The mock's record of what it received.
pub fn mock_requests(mock: &Proc) -> Vec<serde_json::Value> {
    let r = request(
        mock.addr,
        b"GET /_mock/requests HTTP/1.1\r\nHost: m\r\n\r\n",
    );
    r.json().as_array().unwrap().clone()
}
