//! A fleet of real processes for the fleet tests and measurements: N `tollgate serve` processes (each
//! with its own ledger directory, a fixed `node_id`, the same budgets and short lease and fail-closed
//! timings, so faults play out in seconds), one `tollgate controlplane serve` on the same spend store, and
//! one mock provider they all call. Nodes can be killed with SIGKILL and restarted on the same ledger
//! directory (their journals replay), and the test reads the shared store directly and through the
//! control plane's spend endpoints.
//!
//! The spend store is a parameter ([`FleetStore`]): a throwaway PostgreSQL cluster
//! ([`crate::postgres::PgCluster`], `[ledger] postgres`), or the SQLite file the gateways of one machine
//! share (`[ledger] shared_file`). [`FleetStore::stall`] makes either stop answering for a while (SIGSTOP
//! of every PostgreSQL process; SQLite's write lock held by this process).
//!
//! Costs are deterministic: the mock bills `x-mock-input-tokens` input tokens and `min(16, max_tokens)`
//! output tokens, and gpt-4o-mini is 150,000 pico-USD per input token and 600,000 per output token
//! ([`cost`]).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tollgate_core::store::consumption::{self, Granularity, UsageQuery};
use tollgate_core::store::ledger;
use tollgate_core::store::{transact, RetryPolicy, Store};

use crate::{bin, config_for, mock, request, service_token, Proc, TempDir, MOCK_KEY};

/// gpt-4o-mini, pico-USD per input and per output token.
pub const IN_PUSD: i128 = 150_000;
pub const OUT_PUSD: i128 = 600_000;

/// What the mock bills for a gpt-4o-mini request with `input` input tokens (`x-mock-input-tokens`) and
/// `max_tokens`: the output is `min(16, max_tokens)` tokens.
pub fn cost(input: u64, max_tokens: u64) -> i128 {
    i128::from(input) * IN_PUSD + i128::from(max_tokens.min(16)) * OUT_PUSD
}

/// The spend store the fleet shares.
#[derive(Clone)]
pub enum FleetStore {
    /// A throwaway PostgreSQL cluster (`[ledger] postgres`), stopped when the last clone goes.
    Postgres(std::sync::Arc<crate::postgres::PgCluster>),
    /// One SQLite file, shared by every process on this machine (`[ledger] shared_file`).
    SharedSqlite(PathBuf),
}

/// `ledger.postgres_timeout_ms` of the fleet's nodes and of the test's own connections.
pub const PG_TIMEOUT: Duration = Duration::from_secs(5);

impl FleetStore {
    /// A new throwaway PostgreSQL cluster (the fleet's directory is not used).
    pub fn postgres(_dir: &Path) -> FleetStore {
        FleetStore::Postgres(std::sync::Arc::new(crate::postgres::PgCluster::start()))
    }

    /// A new shared SQLite file in `dir`.
    pub fn sqlite_in(dir: &Path) -> FleetStore {
        FleetStore::SharedSqlite(dir.join("fleet.sqlite"))
    }

    /// The `[ledger]` lines that point a process at this store.
    pub fn ledger_line(&self) -> String {
        match self {
            FleetStore::Postgres(pg) => format!(
                "postgres = \"{}\"\npostgres_timeout_ms = {}",
                pg.url(),
                PG_TIMEOUT.as_millis()
            ),
            FleetStore::SharedSqlite(p) => format!("shared_file = \"{}\"", p.display()),
        }
    }

    /// The store, opened by the test for reading beside the running processes (for SQLite a read-only
    /// connection: it never takes the write lock the nodes commit under).
    pub fn open(&self) -> Box<dyn Store> {
        use tollgate_core::store::postgres::{PgConfig, PgStore};
        match self {
            FleetStore::Postgres(pg) => Box::new(
                PgStore::open(&PgConfig::parse(&pg.url(), None, PG_TIMEOUT).unwrap()).unwrap(),
            ),
            FleetStore::SharedSqlite(p) => {
                Box::new(tollgate_core::store::sqlite::SqliteStore::open_read_only(p).unwrap())
            }
        }
    }

    /// Makes the store stop answering for `d`, then lets it go on (returns after): PostgreSQL's
    /// processes are SIGSTOPped (connections stay open, nothing answers), SQLite's write lock is held by
    /// this process (every commit and lease transaction of the nodes waits on it).
    pub fn stall(&self, d: Duration) {
        match self {
            FleetStore::Postgres(pg) => {
                pg.pause();
                std::thread::sleep(d);
                pg.resume();
            }
            FleetStore::SharedSqlite(p) => {
                let blocker = tollgate_core::store::sqlite::SqliteStore::open(p).unwrap();
                let _txn = Store::begin(&blocker).unwrap();
                std::thread::sleep(d);
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            FleetStore::Postgres(_) => "PostgreSQL",
            FleetStore::SharedSqlite(_) => "SQLite (shared file)",
        }
    }
}

/// How to start a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub nodes: usize,
    /// Worker cores per node.
    pub workers: usize,
    /// `[[budgets]]` TOML, the same on every node.
    pub budgets: String,
    pub lease_ttl_ms: u64,
    pub max_skew_ms: u64,
    pub fail_closed_after_ms: u64,
    pub commit_interval_ms: u64,
    /// Per node (by index): its `ledger.clock_offset_ms`.
    pub clock_offsets_ms: Vec<i64>,
    /// Start a control plane process on the store too.
    pub control_plane: bool,
    /// One service token per team, made before the nodes start ([`Fleet::tokens`]).
    pub teams: Vec<String>,
}

impl Default for FleetOptions {
    fn default() -> FleetOptions {
        FleetOptions {
            nodes: 3,
            workers: 2,
            budgets: String::new(),
            lease_ttl_ms: 2_000,
            max_skew_ms: 500,
            fail_closed_after_ms: 1_000,
            commit_interval_ms: 50,
            clock_offsets_ms: Vec::new(),
            control_plane: true,
            teams: vec!["platform".to_owned()],
        }
    }
}

/// One `tollgate serve` process of the fleet.
pub struct Node {
    pub proc: Proc,
    pub config: PathBuf,
    /// Its control plane listener (`/metrics`, the admin API).
    pub admin: SocketAddr,
    _dir: TempDir,
}

fn admin_addr(p: &Proc) -> SocketAddr {
    p.wait_json(&[("event", serde_json::json!("admin_listening"))])["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn start_serve(config: &Path) -> Proc {
    Proc::start(
        &bin("tollgate"),
        &["serve", "--config", config.to_str().unwrap()],
        &[
            ("TG_TEST_OPENAI_KEY", MOCK_KEY),
            ("TG_TEST_ANTHROPIC_KEY", MOCK_KEY),
        ],
    )
}

/// A running fleet; every process is killed on drop.
pub struct Fleet {
    pub mock: Proc,
    pub nodes: Vec<Node>,
    pub control: Option<Proc>,
    /// A service token of the first team every node accepts.
    pub token: String,
    /// One service token per team of [`FleetOptions::teams`], in order.
    pub tokens: Vec<String>,
    /// The control plane's admin token (role admin).
    pub admin_token: String,
    _dir: TempDir,
    /// Last: dropped after every process is gone.
    pub store: FleetStore,
}

impl Fleet {
    /// Starts the mock, `o.nodes` gateways one after another, and the control plane. `store` makes the
    /// store in the fleet's directory (e.g. [`FleetStore::sqlite_in`]).
    pub fn start(store: impl FnOnce(&Path) -> FleetStore, o: &FleetOptions) -> Fleet {
        let dir = TempDir::new("fleet-procs");
        let store = store(&dir.0);
        let tokens = dir.0.join("store");
        std::fs::create_dir_all(&tokens).unwrap();
        let team_tokens: Vec<String> = o.teams.iter().map(|t| service_token(&tokens, t)).collect();
        let token = team_tokens.first().cloned().unwrap_or_default();
        let mock = mock(&["--expect-key", MOCK_KEY, "--threads", "2"]);
        let mut nodes = Vec::with_capacity(o.nodes);
        for i in 0..o.nodes {
            let node_dir = TempDir::new("fleet-node");
            let offset = o.clock_offsets_ms.get(i).copied().unwrap_or(0);
            let extra = format!(
                "[store]\ndir = \"{}\"\n[auth]\ndemo_token = true\n[admin]\nlisten = \"127.0.0.1:0\"\n\
                 [ledger]\ndir = \"ledger\"\n{}\nnode_id = {}\nfleet_nodes = {}\nlease_ttl_ms = {}\n\
                 max_skew_ms = {}\nfail_closed_after_ms = {}\ncommit_interval_ms = {}\nclock_offset_ms = {offset}\n{}\n",
                tokens.display(),
                store.ledger_line(),
                i + 1,
                o.nodes,
                o.lease_ttl_ms,
                o.max_skew_ms,
                o.fail_closed_after_ms,
                o.commit_interval_ms,
                o.budgets,
            );
            let toml = config_for(
                &format!("http://{}", mock.addr),
                &format!("workers = {}", o.workers),
                &extra,
            );
            let config = node_dir.file("tollgate.toml", &toml);
            let proc = start_serve(&config);
            let admin = admin_addr(&proc);
            nodes.push(Node {
                proc,
                config,
                admin,
                _dir: node_dir,
            });
        }
        let admin_token = std::fs::read_to_string(tokens.join("admin-token"))
            .unwrap()
            .trim()
            .to_owned();
        let control = o.control_plane.then(|| {
            Proc::start(
                &bin("tollgate"),
                &[
                    "controlplane",
                    "serve",
                    "--config",
                    nodes[0].config.to_str().unwrap(),
                    "--listen",
                    "127.0.0.1:0",
                ],
                &[],
            )
        });
        Fleet {
            store,
            mock,
            nodes,
            control,
            token,
            tokens: team_tokens,
            admin_token,
            _dir: dir,
        }
    }

    /// Node `i`'s data-plane address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].proc.addr
    }

    /// Every node's data-plane address, in order.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        self.nodes.iter().map(|n| n.proc.addr).collect()
    }

    /// SIGKILL to node `i` (no shutdown of any kind); waits until it is gone.
    pub fn kill9(&mut self, i: usize) {
        let p = &mut self.nodes[i].proc;
        let _ = p.child.kill();
        let _ = p.child.wait();
    }

    /// Starts node `i` again from its configuration and ledger directory (its journals replay).
    pub fn restart(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.proc = start_serve(&n.config);
        n.admin = admin_addr(&n.proc);
    }

    /// SIGTERM to every node, and waits for each to exit (each commits and gives its leases back).
    pub fn stop_nodes(&mut self) {
        for n in &self.nodes {
            n.proc.sigterm();
        }
        for n in &mut self.nodes {
            assert!(
                n.proc.wait_exit(Duration::from_secs(20)).is_some(),
                "a node did not stop:\n{}",
                n.proc.output()
            );
        }
    }

    /// Every node's log lines of the JSON event `event` (for a failure's message).
    pub fn events(&self, event: &str) -> Vec<String> {
        let tag = format!("\"event\":\"{event}\"");
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                n.proc
                    .output()
                    .lines()
                    .filter(|l| l.contains(&tag))
                    .map(|l| format!("node {i}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Node `i`'s `/metrics` page.
    pub fn metrics(&self, i: usize) -> String {
        request(
            self.nodes[i].admin,
            b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        )
        .text()
    }

    /// The fleet's committed spend on `budget` (all windows, estimates included), read from the store.
    pub fn committed(&self, budget: &str) -> i128 {
        let store = self.store.open();
        let all = transact(store.as_ref(), &RetryPolicy::default(), |txn| {
            ledger::load_since(txn, jiff::Timestamp::UNIX_EPOCH)
        })
        .unwrap();
        all.iter()
            .filter(|s| s.instance.budget == budget)
            .map(|s| s.amount.pico())
            .sum()
    }

    /// The part of `budget`'s committed spend charged at reserved amounts after a crash.
    pub fn estimated(&self, budget: &str) -> i128 {
        let store = self.store.open();
        let all = transact(store.as_ref(), &RetryPolicy::default(), |txn| {
            ledger::load_estimated_since(txn, jiff::Timestamp::UNIX_EPOCH)
        })
        .unwrap();
        all.iter()
            .filter(|s| s.instance.budget == budget)
            .map(|s| s.amount.pico())
            .sum()
    }

    /// Every lease `node` holds in the store, on any budget and window: (unspent amount, expiry ms).
    pub fn leases_of(&self, node: u64) -> Vec<(i128, i64)> {
        use tollgate_core::store::keys;
        let store = self.store.open();
        let (amounts, exps) = transact(store.as_ref(), &RetryPolicy::default(), |txn| {
            let (b, e) = keys::all_leases();
            let a = txn.get_range(&b, &e, 0)?;
            let (b, e) = keys::all_lease_expiries();
            Ok((a, txn.get_range(&b, &e, 0)?))
        })
        .unwrap();
        let mine = |k: &[u8]| keys::lease_node(k).unwrap() == Some(node);
        let exps: Vec<i64> = exps
            .iter()
            .filter(|(k, _)| mine(k))
            .map(|(_, v)| i64::from_le_bytes(v.as_slice().try_into().unwrap()))
            .collect();
        amounts
            .iter()
            .filter(|(k, _)| mine(k))
            .enumerate()
            .map(|(i, (_, v))| {
                (
                    tollgate_core::store::decode_i128(v).unwrap(),
                    exps.get(i).copied().unwrap_or(i64::MIN),
                )
            })
            .collect()
    }

    /// The usage counters of every settled request, read from the store: (requests, cost in pico-USD).
    pub fn usage(&self) -> (u64, i128) {
        let store = self.store.open();
        let now = jiff::Timestamp::now();
        let rows = consumption::query(
            store.as_ref(),
            &UsageQuery {
                from: now - jiff::SignedDuration::from_hours(48),
                to: now + jiff::SignedDuration::from_hours(2),
                granularity: Granularity::Day,
                group_by: Vec::new(),
                filters: Vec::new(),
            },
        )
        .unwrap();
        rows.iter()
            .fold((0, 0), |(n, c), r| (n + r.requests, c + r.cost.0.pico()))
    }

    /// Waits until the store's committed spend on `budget` equals `want` (the ledgers commit every
    /// interval); returns the last value read. Panics at the deadline.
    pub fn wait_committed(&self, budget: &str, want: i128, within: Duration) -> i128 {
        let deadline = Instant::now() + within;
        loop {
            let got = self.committed(budget);
            if got == want {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "committed spend on {budget} is {got}, expected {want}, after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A GET on the control plane's API (its process, else node 0's listener) with the admin token.
    pub fn admin_get(&self, path: &str) -> serde_json::Value {
        let addr = self
            .control
            .as_ref()
            .map_or(self.nodes[0].admin, |c| c.addr);
        let r = request(
            addr,
            format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
                self.admin_token
            )
            .as_bytes(),
        );
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }

    /// `budget`'s spend as the control plane's `/admin/v1/spend/budgets` reports it, pico-USD.
    pub fn cp_budget_spend(&self, budget: &str) -> i128 {
        let v = self.admin_get(&format!("/admin/v1/spend/budgets?budget={budget}"));
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| i128::from(r["spent"]["pico"].as_i64().unwrap()))
            .sum()
    }

    /// The usage as the control plane's `/admin/v1/spend` reports it: (requests, cost in pico-USD).
    pub fn cp_usage(&self) -> (u64, i128) {
        let v = self.admin_get("/admin/v1/spend");
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .fold((0, 0), |(n, c), r| {
                (
                    n + r["requests"].as_u64().unwrap(),
                    c + i128::from(r["cost"]["pico"].as_i64().unwrap()),
                )
            })
    }

    /// How many requests the mock provider received (its `x-mock-recorded-total`).
    pub fn provider_requests(&self) -> u64 {
        let r = request(
            self.mock.addr,
            b"GET /_mock/requests HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n",
        );
        r.header("x-mock-recorded-total").unwrap().parse().unwrap()
    }
}

/// A sample of a counter family on a metrics page: the sum of its series whose labels contain `labels`.
pub fn metric(page: &str, name: &str, labels: &str) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && rest.contains(labels)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// One chat request's outcome, as a client saw it.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// 0 when no response head came (connection refused, or cut before the head).
    pub status: u16,
    /// A 200 whose body completed (a stream's `[DONE]`, a JSON body with its usage).
    pub complete: bool,
    /// The request was written to an open connection (false: the node was not there).
    pub sent: bool,
    pub latency: Duration,
    pub input: u64,
    pub max_tokens: u64,
    /// When it started, since the load began.
    pub at: Duration,
    pub node: usize,
}

impl Outcome {
    /// What the provider billed for it, when it completed.
    pub fn cost(&self) -> i128 {
        cost(self.input, self.max_tokens)
    }
}

/// One gpt-4o-mini chat request on its own connection to `addr`, streamed or not, carrying `max_tokens`
/// and billed `input` input tokens by the mock.
pub fn chat(addr: SocketAddr, token: &str, stream: bool, input: u64, max_tokens: u64) -> Outcome {
    let t = Instant::now();
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let req = crate::post_bytes(
        "/v1/chat/completions",
        &body,
        &format!(
            "Authorization: Bearer {token}\r\nx-mock-input-tokens: {input}\r\nx-mock-token-delay-ms: 3\r\nConnection: close\r\n"
        ),
    );
    let mut out = Vec::new();
    let mut sent = false;
    if let Ok(mut s) = TcpStream::connect(addr) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        if s.write_all(req.as_bytes()).is_ok() {
            sent = true;
            let _ = s.read_to_end(&mut out);
        }
    }
    let text = String::from_utf8_lossy(&out);
    let status = if text.starts_with("HTTP/1.1 ") {
        text.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    } else {
        0
    };
    let complete = status == 200
        && if stream {
            text.contains("[DONE]") && text.ends_with("0\r\n\r\n")
        } else {
            text.contains("\"usage\"") && text.trim_end().ends_with('}')
        };
    Outcome {
        status,
        complete,
        sent,
        latency: t.elapsed(),
        input,
        max_tokens,
        at: Duration::ZERO,
        node: usize::MAX,
    }
}

/// `n` requests at once (one thread each, released together), request `i` to `addrs[i % len]`.
pub fn burst(
    addrs: &[SocketAddr],
    token: &str,
    n: usize,
    stream: bool,
    input: u64,
    max_tokens: u64,
) -> Vec<Outcome> {
    let gate = std::sync::Barrier::new(n);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let addr = addrs[i % addrs.len()];
                let gate = &gate;
                std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || {
                        gate.wait();
                        let mut o = chat(addr, token, stream, input, max_tokens);
                        o.node = i % addrs.len();
                        o
                    })
                    .unwrap()
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Closed-loop load: `clients` threads, each sending to node `c % nodes` one request after another
/// (`pace` apart at least) until `stop` says so, reading the node's current address from `addrs` for
/// every request (so a restarted node is found again). Returns every outcome, in no order.
pub fn load(
    addrs: &std::sync::RwLock<Vec<SocketAddr>>,
    token: &str,
    clients: usize,
    pace: Duration,
    stream: bool,
    shape: impl Fn(u64) -> (u64, u64) + Sync,
    stop: &(dyn Fn(Duration) -> bool + Sync),
) -> Vec<Outcome> {
    let began = Instant::now();
    let seq = std::sync::atomic::AtomicU64::new(0);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (seq, shape) = (&seq, &shape);
                s.spawn(move || {
                    let mut out = Vec::new();
                    loop {
                        let at = began.elapsed();
                        if stop(at) {
                            return out;
                        }
                        let node = c % addrs.read().unwrap().len();
                        let addr = addrs.read().unwrap()[node];
                        let i = seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let (input, max_tokens) = shape(i);
                        let mut o = chat(addr, token, stream, input, max_tokens);
                        o.at = at;
                        o.node = node;
                        // A node that is down refuses at once: try again a little later.
                        let pace = if o.sent {
                            pace
                        } else {
                            pace.max(Duration::from_millis(50))
                        };
                        let rest = pace.saturating_sub(o.latency);
                        out.push(o);
                        std::thread::sleep(rest);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// The `q` quantile (0..=1) of `xs`, in milliseconds.
pub fn quantile_ms(xs: &[Duration], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v: Vec<f64> = xs.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)]
}
