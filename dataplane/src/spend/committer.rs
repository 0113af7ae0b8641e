//! The ledger thread: the one place spend meets the store. Cores never wait on it.
//!
//! Owns: start-up ([`start`]: open the store, check its schema, replay the journals of earlier runs, prune
//! and load the spend history the cores' budgets start from) and the thread that, every
//! `ledger.commit_interval_ms` (50 ms), merges the settlements the cores handed over
//! ([`crate::spend::records::ToLedger`], a crossbeam channel) per (budget instance, 15-minute slot) and commits
//! them in one transaction ([`tollgate_core::store::ledger::apply_batch`]), with the highest journal
//! sequence number per source recorded in the same transaction: a retried commit, or one whose outcome was
//! unknown, is never counted twice. A batch that was attempted is retried as it is (never merged with
//! later spend) until it commits. Once a second (`JOURNAL_SYNC`) it `fsync`s this run's journal files
//! and deletes those wholly committed. Between intervals the thread sleeps: handing it a settlement never
//! wakes it (only a fleet lease ask does).
//!
//! Failure: while the store fails, settlements keep arriving and merge into the next batch (one entry
//! per instance and slot, so the buffer grows by at most one entry per budget instance per 15 minutes);
//! the journals hold every settlement regardless. [`Health`] tells the cores since when the store has
//! been failing: budgets with `on_store_failure = "closed"` (the default) refuse new spend once that is
//! longer than `ledger.fail_closed_after_ms`, or at once on a core whose journal cannot be written;
//! `"open"` budgets keep admitting. A settlement whose hand-off found the channel full is read back from
//! its journal file when the gap in its source's sequence numbers shows.
//!
//! Fleet mode ([`start_fleet`] with `fleet`: the store is shared with other gateways, see
//! `docs/fleet.md`): the thread also answers the cores' lease asks ([`ToLedger::Lease`]) with
//! [`tollgate_core::store::fleet::acquire`] on the instance's current calendar window (one transaction,
//! up to eight quick attempts on conflicts with other nodes' grants, three on other errors; a failure
//! grants nothing) and replies on the asking core's mailbox
//! ([`crate::runtime::inbox::Msg::FleetLease`], with this node's spend in that window not yet committed), commits
//! its batches with [`tollgate_core::store::fleet::commit`] (the spend also leaves this node's lease of the
//! window it falls in, in the same transaction, recomputed per attempt), and at shutdown, after the last
//! commits, releases every lease it was granted. At start it releases the leases a previous run with the
//! same `ledger.node_id` left, after replaying that run's journals. Rolling windows are not leased (fleet
//! mode refuses to start with a rolling budget that is not alert-only; one added by a reload is refused
//! at admission). Cost: one store transaction per lease ask, reading the window's spend slots and the
//! instance's leases.
//!
//! Cost to the hot path: the journal append (see [`crate::spend::journal`]) and one `try_send`; nothing waits.
//! The thread's own numbers (commits, batch sizes, commit time) are logged as `ledger_stats` every 10 s.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use jiff::Timestamp;
use tollgate_core::budget::InstanceKey;
use tollgate_core::config::{FleetConfig, LedgerConfig, StoreLocation};
use tollgate_core::store::consumption::{self as usage, Seen, UsageCounts};
use tollgate_core::store::fleet::{self, Ask, WindowRef};
use tollgate_core::store::keys::UsageDims;
use tollgate_core::store::ledger::{self, Batch, InstanceName, SlotSpend, SLOT_SECS};
use tollgate_core::store::{transact, RetryPolicy, Store, StoreError};
use tollgate_core::{IdentityKind, Money};

use crate::obs::accesslog::Logger;
use crate::runtime::inbox::{FleetAnswer, Msg};
use crate::runtime::mailbox::Postman;
use crate::spend::journal;
use crate::spend::records::{self, Metered, Record, ToLedger};

/// How far back spend is kept and loaded: the ledger's 32 days and a slot.
const HISTORY: Duration = Duration::from_secs(32 * 86_400 + 900);

/// Settlements in flight between the cores and the ledger thread.
const CHANNEL: usize = 65_536;

/// How often this run's journal files are `fsync`ed: what a machine crash or power loss can lose at most
/// (a process crash loses nothing: appends are in the page cache once `write(2)` returns). Each fsync
/// also stalls appends to the page being written back, so it is not done every commit interval.
const JOURNAL_SYNC: Duration = Duration::from_secs(1);

/// What the cores read about the store's health.
#[derive(Debug, Default)]
pub struct Health {
    /// Unix milliseconds since which commits have been failing; 0 while they succeed.
    failing_since_ms: AtomicI64,
    /// Unix milliseconds since which the ledger thread has been inside one store call (a commit or a
    /// lease transaction); 0 between calls. A store that stalls (stopped, or locked by another process)
    /// counts as failing from then, not only once its own timeouts and retries have run out.
    busy_since_ms: AtomicI64,
    pub commits: AtomicU64,
    /// The ledger thread's numbers for `/metrics` (on the heap, apart from what the cores read).
    pub metrics: Box<LedgerMetrics>,
}

/// Commit-time buckets (microseconds) of `tollgate_ledger_commit_seconds`.
pub const COMMIT_US: [u64; 10] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];
/// Entries-per-commit buckets of `tollgate_ledger_commit_entries`.
pub const BATCH_ENTRIES: [u64; 9] = [1, 4, 16, 64, 256, 1_024, 4_096, 16_384, 65_536];

/// What the ledger thread counts for `/metrics`: written by that thread only, read by the scrape.
#[derive(Debug, Default)]
pub struct LedgerMetrics {
    /// Settlements received from the cores (and recovered from journals).
    pub settlements: AtomicU64,
    /// Commits that failed (each retried on the next interval).
    pub failures: AtomicU64,
    /// Settlements recovered from earlier runs' journals.
    pub recovered: AtomicU64,
    /// Fleet mode: lease transactions ([`fleet::acquire`]) that granted, that found the budget could
    /// not cover the need, and that failed in the store.
    pub lease_granted: AtomicU64,
    pub lease_refused: AtomicU64,
    pub lease_failed: AtomicU64,
    /// Spend entries waiting for the next commit (the journal's lead over the store).
    pub pending_entries: AtomicU64,
    /// Per [`COMMIT_US`] bucket, then `+Inf`; with the sum in microseconds.
    pub commit_us: [AtomicU64; 11],
    pub commit_us_sum: AtomicU64,
    /// Per [`BATCH_ENTRIES`] bucket, then `+Inf`; with the sum of entries.
    pub batch: [AtomicU64; 10],
    pub batch_sum: AtomicU64,
}

impl LedgerMetrics {
    fn committed(&self, us: u64, entries: u64) {
        let i = COMMIT_US.partition_point(|&b| b < us);
        if let Some(c) = self.commit_us.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.commit_us_sum.fetch_add(us, Ordering::Relaxed);
        let i = BATCH_ENTRIES.partition_point(|&b| b < entries);
        if let Some(c) = self.batch.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.batch_sum.fetch_add(entries, Ordering::Relaxed);
    }
}

impl Health {
    /// Whether the store's last commit failed (it is failing now).
    pub fn failing(&self) -> bool {
        self.failing_since_ms.load(Ordering::Relaxed) != 0
    }

    /// Whether the store has been failing, or one store call has been running, for longer than `after`.
    pub fn failing_longer_than(&self, after: Duration) -> bool {
        let since = [
            self.failing_since_ms.load(Ordering::Relaxed),
            self.busy_since_ms.load(Ordering::Relaxed),
        ]
        .into_iter()
        .filter(|t| *t != 0)
        .min();
        since.is_some_and(|since| {
            Timestamp::now().as_millisecond().saturating_sub(since)
                > i64::try_from(after.as_millis()).unwrap_or(i64::MAX)
        })
    }

    /// Marks the start (`true`) or end of a store call on the ledger thread.
    fn busy(&self, on: bool) {
        let v = if on {
            Timestamp::now().as_millisecond()
        } else {
            0
        };
        self.busy_since_ms.store(v, Ordering::Relaxed);
    }
}

/// A running ledger thread.
#[derive(Debug)]
pub struct LedgerHandle {
    pub tx: Sender<ToLedger>,
    pub health: Arc<Health>,
    /// This run's name: journal sources are `{run}-c{core}`.
    pub run: String,
    pub journal_dir: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Held for the process's life: the ledger directory's lock.
    lock: Option<std::fs::File>,
}

impl LedgerHandle {
    /// The ledger thread, for cores to wake it when a request waits on a lease answer (settlements never
    /// wake it: they wait for its next interval).
    pub fn waker(&self) -> Option<std::thread::Thread> {
        self.thread.as_ref().map(|t| t.thread().clone())
    }

    /// Commits what is pending (a few attempts) and stops the thread; waits at most `wait`.
    pub fn shutdown(&mut self, wait: Duration) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let deadline = Instant::now() + wait;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::park_timeout(Duration::from_millis(5));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// What [`start`] hands the gateway: the thread, and the spend the cores' budgets start from.
#[derive(Debug)]
pub struct Started {
    pub handle: LedgerHandle,
    pub history: Vec<SlotSpend>,
    /// Journal entries of earlier runs replayed into the store at start.
    pub replayed: usize,
}

/// The configured store, opened, with the ledger directory's lock held: what [`start_opened`] runs on.
/// The gateway's control plane and catalog watcher share `store`.
pub struct Opened {
    pub store: std::sync::Arc<dyn Store>,
    lock: std::fs::File,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("store", &self.store.kind())
            .finish_non_exhaustive()
    }
}

/// Opens the embedded store under `cfg.dir`, checks its schema, replays earlier runs' journals, loads the
/// spend history, and starts the ledger thread.
pub fn start(cfg: &LedgerConfig, logger: &Logger) -> Result<Started, String> {
    start_opened(open(cfg)?, cfg, logger)
}

/// [`start`] on a store [`open`] opened.
pub fn start_opened(
    opened: Opened,
    cfg: &LedgerConfig,
    logger: &Logger,
) -> Result<Started, String> {
    // A shared store (FoundationDB, PostgreSQL, a shared SQLite file) is fleet mode: budget limits hold
    // across the nodes through leases.
    let mut started = start_fleet(Box::new(opened.store), cfg, logger, cfg.store.is_fleet())?;
    started.handle.lock = Some(opened.lock);
    Ok(started)
}

/// The configured store for a process that is not a gateway (`tollgate controlplane serve`): no ledger
/// lock, no journals; SQLite lets several processes share one file, FoundationDB and PostgreSQL several
/// clients.
pub fn open_shared(cfg: &LedgerConfig) -> Result<std::sync::Arc<dyn Store>, String> {
    let file = match &cfg.store {
        StoreLocation::Embedded => Some(cfg.dir.join("ledger.sqlite")),
        StoreLocation::SharedFile(f) => Some(f.clone()),
        StoreLocation::Foundation(_) | StoreLocation::Postgres(_) => None,
    };
    if let Some(parent) = file.as_deref().and_then(Path::parent) {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let store = open_store(cfg, false)?;
    ledger::check_schema(store.as_ref(), &RetryPolicy::default())
        .map_err(|e| format!("the spend store: {e}"))?;
    Ok(std::sync::Arc::from(store))
}

/// A reader of the configured store that never waits on its writers: for SQLite a second, read-only
/// connection (WAL readers take no lock, so a poll never holds up the ledger thread's commits nor waits
/// behind another process's write lock); for FoundationDB and PostgreSQL `shared` itself (their
/// transactions run side by side; PostgreSQL's on their own pooled connections).
pub fn open_reader(
    cfg: &LedgerConfig,
    shared: &std::sync::Arc<dyn Store>,
) -> Result<std::sync::Arc<dyn Store>, String> {
    match &cfg.store {
        StoreLocation::Foundation(_) | StoreLocation::Postgres(_) => {
            Ok(std::sync::Arc::clone(shared))
        }
        StoreLocation::Embedded | StoreLocation::SharedFile(_) => {
            open_store(cfg, true).map(std::sync::Arc::from)
        }
    }
}

/// Takes the ledger directory's lock (one gateway per directory) and opens the configured store.
pub fn open(cfg: &LedgerConfig) -> Result<Opened, String> {
    std::fs::create_dir_all(&cfg.dir)
        .map_err(|e| format!("ledger.dir {}: {e}", cfg.dir.display()))?;
    // One gateway per ledger directory: another one's journals are not ours to replay.
    let lock_path = cfg.dir.join("lock");
    let lock = std::fs::File::create(&lock_path)
        .map_err(|e| format!("ledger.dir {}: {e}", cfg.dir.display()))?;
    if lock.try_lock().is_err() {
        return Err(format!(
            "another tollgate is running with ledger.dir {} (it holds {}): give each gateway its own store directory",
            cfg.dir.display(),
            lock_path.display()
        ));
    }
    let store = open_store(cfg, false)?;
    // The schema first: the catalog may be written before the ledger thread starts.
    ledger::check_schema(store.as_ref(), &RetryPolicy::default())
        .map_err(|e| format!("the spend store in {}: {e}", cfg.dir.display()))?;
    Ok(Opened {
        store: std::sync::Arc::from(store),
        lock,
    })
}

/// The configured spend store: FoundationDB when `ledger.cluster_file` is set (binaries built with the
/// `fdb` feature; config loading refuses the field otherwise), PostgreSQL when `ledger.postgres` is, else
/// SQLite (`ledger.shared_file`, or `ledger.sqlite` in `ledger.dir`). `read_only` opens SQLite read-only;
/// the other stores have no such mode (their callers only read).
fn open_store(cfg: &LedgerConfig, read_only: bool) -> Result<Box<dyn Store>, String> {
    let path = match &cfg.store {
        StoreLocation::Foundation(cluster_file) => {
            #[cfg(feature = "fdb")]
            {
                use tollgate_core::store::fdb::{FdbOptions, FdbStore};
                return FdbStore::open(cluster_file, FdbOptions::default())
                    .map(|s| Box::new(s) as Box<dyn Store>)
                    .map_err(|e| {
                        format!("the FoundationDB cluster {}: {e}", cluster_file.display())
                    });
            }
            #[cfg(not(feature = "fdb"))]
            return Err(format!(
                "ledger.cluster_file {}: this binary was built without FoundationDB support (build with --features fdb)",
                cluster_file.display()
            ));
        }
        StoreLocation::Postgres(pg) => {
            return tollgate_core::store::postgres::PgStore::open(pg)
                .map(|s| Box::new(s) as Box<dyn Store>)
                .map_err(|e| format!("the PostgreSQL spend store {}: {e}", pg.target()));
        }
        StoreLocation::SharedFile(f) => f.clone(),
        StoreLocation::Embedded => cfg.dir.join("ledger.sqlite"),
    };
    let opened = if read_only {
        if !path.exists() {
            return Err(format!(
                "no spend store at {} (no gateway has run with this ledger.dir yet)",
                path.display()
            ));
        }
        tollgate_core::store::sqlite::SqliteStore::open_read_only(&path)
    } else {
        tollgate_core::store::sqlite::SqliteStore::open(&path)
    };
    opened
        .map(|s| Box::new(s) as Box<dyn Store>)
        .map_err(|e| format!("the spend store {}: {e}", path.display()))
}

/// [`start`] on any store (tests use the in-memory one).
pub fn start_with(
    store: Box<dyn Store>,
    cfg: &LedgerConfig,
    logger: &Logger,
) -> Result<Started, String> {
    start_fleet(store, cfg, logger, false)
}

/// [`start_with`], in fleet mode when `fleet` (the store is shared with other nodes: the thread also
/// grants the cores budget leases and releases them at shutdown; see [`crate::spend::shard`]).
pub fn start_fleet(
    store: Box<dyn Store>,
    cfg: &LedgerConfig,
    logger: &Logger,
    fleet: bool,
) -> Result<Started, String> {
    let policy = RetryPolicy::default();
    let journal_dir = cfg.dir.join("journal");
    ledger::check_schema(store.as_ref(), &policy)
        .map_err(|e| format!("the spend store in {}: {e}", cfg.dir.display()))?;
    let replayed = replay(store.as_ref(), &journal_dir, &policy)
        .map_err(|e| format!("replaying the journals in {}: {e}", journal_dir.display()))?;
    for (source, count, per) in &replayed.charged {
        logger.event(
            "reservation_charged_after_crash",
            &[
                ("source", source),
                ("count", &count.to_string()),
                ("estimate", "reserved amount"),
                ("usd", &per_instance(per)),
            ],
        );
    }
    let charged: usize = replayed.charged.iter().map(|(_, n, _)| n).sum();
    let replayed = replayed.entries;
    let now = Timestamp::now();
    let since = now
        .checked_sub(jiff::SignedDuration::try_from(HISTORY).unwrap_or_default())
        .unwrap_or(now);
    let pruned = transact(store.as_ref(), &policy, |txn| {
        ledger::prune_before(txn, since)
    })
    .map_err(|e| format!("pruning old spend: {e}"))?;
    let history = transact(store.as_ref(), &policy, |txn| {
        ledger::load_since(txn, since)
    })
    .map_err(|e| format!("loading spend: {e}"))?;
    // Unique per run, also across containers that all run as pid 1: time, pid and 32 random bits.
    let nonce = {
        use std::hash::{BuildHasher, Hasher};
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u32
    };
    let run = format!(
        "{}-{}-{nonce:08x}",
        now.as_millisecond(),
        std::process::id()
    );
    logger.event(
        "ledger_started",
        &[
            ("store", store.kind()),
            ("dir", &cfg.dir.display().to_string()),
            ("replayed", &replayed.to_string()),
            ("charged_after_crash", &charged.to_string()),
            ("pruned_slots", &pruned.to_string()),
            ("loaded_slots", &history.len().to_string()),
        ],
    );
    let fleet = fleet.then(|| FleetWorker {
        node: cfg.fleet.node_id.unwrap_or_else(random_node_id),
        cfg: cfg.fleet.clone(),
        cores: None,
        leases: HashMap::new(),
    });
    if let Some(f) = &fleet {
        // A restart with the same node id: the old leases counted spend the replay just committed.
        let released = transact(store.as_ref(), &policy, |txn| {
            fleet::release_all(txn, f.node)
        })
        .map_err(|e| format!("releasing this node's old leases: {e}"))?;
        if released > 0 {
            logger.event(
                "fleet_leases_released",
                &[
                    ("node", &f.node.to_string()),
                    ("leases", &released.to_string()),
                ],
            );
        }
        logger.event(
            "ledger_fleet",
            &[
                ("node", &f.node.to_string()),
                ("lease_ttl_ms", &f.cfg.lease_ttl_ms.to_string()),
                ("max_skew_ms", &f.cfg.max_skew_ms.to_string()),
                ("clock_offset_ms", &f.cfg.clock_offset_ms.to_string()),
            ],
        );
    }
    let (tx, rx) = crossbeam_channel::bounded(CHANNEL);
    let health = Arc::new(Health::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut worker = Worker {
        store,
        rx,
        interval: cfg.commit_interval,
        health: Arc::clone(&health),
        stop: Arc::clone(&stop),
        logger: logger.clone(),
        journal_dir: journal_dir.clone(),
        run: run.clone(),
        pending: Batch::default(),
        inflight: None,
        seen: HashMap::new(),
        committed: BTreeMap::new(),
        stats: Stats::default(),
        fleet,
    };
    let thread = std::thread::Builder::new()
        .name("tollgate-ledger".into())
        .spawn(move || worker.run())
        .map_err(|e| format!("starting the ledger thread: {e}"))?;
    Ok(Started {
        handle: LedgerHandle {
            tx,
            health,
            run,
            journal_dir,
            stop,
            thread: Some(thread),
            lock: None,
        },
        history,
        replayed,
    })
}

/// What [`replay`] did.
#[derive(Debug, Default)]
struct Replayed {
    /// Settlements committed.
    entries: usize,
    /// Per source, the reservations it left open (a crash) and charged at their reserved amount: their
    /// count and the total per instance.
    charged: Vec<(String, usize, BTreeMap<InstanceName, i128>)>,
}

/// Applies every journal entry of earlier runs the store does not have, charges every reservation those
/// runs left open (a crash: the provider may bill the request; the reservation is the most it can cost) at
/// its reserved amount, in the same transaction, then removes those journals.
fn replay(store: &dyn Store, dir: &Path, policy: &RetryPolicy) -> Result<Replayed, StoreError> {
    let sources = journal::list(dir).map_err(|e| StoreError::Unavailable(e.to_string()))?;
    let mut out = Replayed::default();
    for (source, files) in sources {
        let applied = transact(store, policy, |txn| ledger::applied(txn, &source))?;
        let mut batch = Batch::default();
        let mut entries = Vec::new();
        for (_, path) in &files {
            entries.extend(
                journal::read_entries(path).map_err(|e| StoreError::Unavailable(e.to_string()))?,
            );
        }
        for e in &entries {
            if let journal::Entry::Settled { record, .. } = e {
                if record.seq > applied {
                    out.entries += 1;
                    add_record(&mut batch, record);
                }
            }
        }
        let last_first = files.last().map_or(0, |(f, _)| *f);
        let open = journal::unsettled(&entries, last_first);
        // Committed under one sequence number past the source's settlements: a replay interrupted after
        // this commit (before the journals are removed) finds it applied and charges nothing twice.
        if !open.orphans.is_empty() && open.seq > applied {
            let mut per: BTreeMap<InstanceName, i128> = BTreeMap::new();
            for (at, amount, instances) in &open.orphans {
                for i in instances {
                    batch.add(&source, open.seq, i.clone(), *amount, *at);
                    batch.add_estimate(i.clone(), *amount, *at);
                    *per.entry(i.clone()).or_insert(0) += amount.pico();
                }
            }
            out.charged.push((source.clone(), open.orphans.len(), per));
        }
        if !batch.is_empty() {
            transact(store, policy, |txn| ledger::apply_batch(txn, &batch))?;
        }
        for (_, path) in &files {
            let _ = std::fs::remove_file(path);
        }
        transact(store, policy, |txn| {
            ledger::forget_source(txn, &source);
            Ok(())
        })?;
    }
    Ok(out)
}

/// `budget=usd` per instance (`budget/member=usd` for per-identity ones), for the log.
fn per_instance(per: &BTreeMap<InstanceName, i128>) -> String {
    per.iter()
        .map(|(i, a)| {
            let usd = Money::from_pico(*a).usd();
            if i.member.is_empty() {
                format!("{}={usd}", i.budget)
            } else {
                format!("{}/{}={usd}", i.budget, i.member)
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Per lease this node holds, the batch's spend in that lease's window (alert-only budgets hold none).
fn lease_decrements(
    batch: &Batch,
    leases: &HashMap<(InstanceName, i64), WindowRef>,
) -> Vec<(WindowRef, i128)> {
    let mut out: Vec<(WindowRef, i128)> = Vec::new();
    for ((instance, slot), amount) in &batch.spend {
        let at = slot.saturating_mul(SLOT_SECS);
        let found = leases
            .iter()
            .find(|((i, _), w)| i == instance && w.start <= at && at < w.end);
        let Some((_, w)) = found else {
            continue;
        };
        match out.iter_mut().find(|(o, _)| o == w) {
            Some((_, a)) => *a = a.saturating_add(*amount),
            None => out.push((w.clone(), *amount)),
        }
    }
    out
}

fn add_record(batch: &mut Batch, r: &Record) {
    for i in &r.instances {
        batch.add(&r.source, r.seq, i.clone(), r.amount, r.at);
    }
    batch.covers(&r.source, r.seq);
    if let Some(m) = &r.usage {
        let (dims, counts, seen) = usage_of(m, r.at);
        batch.add_usage(&r.source, r.seq, r.at, dims, &counts);
        batch.saw(seen);
    }
}

/// A settled request's usage as the store counts it: its dimensions (canonical), its counters, and its
/// identity as seen at `at`. Runs on the ledger thread (the string work stays off the cores).
fn usage_of(m: &Metered, at: Timestamp) -> (UsageDims, UsageCounts, Seen) {
    let id = &m.identity;
    let anonymous = id.kind == IdentityKind::Anonymous;
    let token = (id.kind == IdentityKind::Service).then(|| id.subject.to_string());
    let identity = usage::identity_dim(anonymous, &id.source, &id.subject);
    let dims = UsageDims {
        provider: m.provider.to_string(),
        model: m.model.to_string(),
        identity: identity.clone(),
        groups: usage::groups_dim(&id.groups),
        service_token: token.clone().unwrap_or_default(),
        attributes: usage::attributes_dim(&m.attributes),
    };
    let u = &m.usage;
    let counts = UsageCounts {
        cost: m.cost.effective.pico(),
        list_cost: m.cost.list.pico(),
        requests: 1,
        input_tokens: u.input_tokens,
        cached_input_tokens: u.cached_input_tokens,
        cache_write_tokens: u
            .cache_write_5m_tokens
            .saturating_add(u.cache_write_1h_tokens),
        output_tokens: u.output_tokens,
        reasoning_tokens: u.reasoning_tokens,
    };
    let seen = Seen {
        identity,
        kind: id.kind.as_str().to_owned(),
        subject: id.subject.to_string(),
        source: id.source.to_string(),
        groups: id.groups.iter().map(|g| g.to_string()).collect(),
        team: token
            .as_ref()
            .and_then(|_| id.groups.first().map(|g| g.to_string())),
        service_token: token,
        first_seen: at,
        last_seen: at,
    };
    (dims, counts, seen)
}

#[derive(Debug, Default)]
struct Stats {
    commits: u64,
    settlements: u64,
    entries: u64,
    max_entries: u64,
    commit_us_total: u64,
    commit_us_max: u64,
    failures: u64,
    recovered: u64,
}

/// How many times a lease transaction that conflicted with other nodes' is run before the ask fails.
const LEASE_CONFLICT_ATTEMPTS: u32 = 8;

/// Whether a store error is a conflict with another transaction (after [`transact`]'s retries too).
fn conflict(e: &StoreError) -> bool {
    match e {
        StoreError::RetryLimit { last, .. } => conflict(last),
        other => matches!(other, StoreError::Conflict),
    }
}

/// A random node id: this start's, when `ledger.node_id` is not set.
fn random_node_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Timestamp::now().as_nanosecond().unsigned_abs());
    h.write_u32(std::process::id());
    // Non-negative as an i64: the store's lease keys hold node ids as tuple integers.
    h.finish() >> 1
}

/// The ledger thread's side of fleet mode: this node's leases in the store.
struct FleetWorker {
    node: u64,
    cfg: FleetConfig,
    /// The cores' mailboxes, for the answers.
    cores: Option<Postman<Msg>>,
    /// Every lease this node was granted in this run, by instance and window start.
    leases: HashMap<(InstanceName, i64), WindowRef>,
}

struct Worker {
    fleet: Option<FleetWorker>,
    store: Box<dyn Store>,
    rx: Receiver<ToLedger>,
    interval: Duration,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
    logger: Logger,
    journal_dir: PathBuf,
    run: String,
    /// Settlements not yet in a batch that was attempted.
    pending: Batch,
    /// The batch being committed: retried as it is until it commits.
    inflight: Option<Batch>,
    /// The last sequence number received per source.
    seen: HashMap<Arc<str>, u64>,
    /// The last sequence number committed per source.
    committed: BTreeMap<String, u64>,
    stats: Stats,
}

impl Worker {
    /// Sleeps until the next interval (or until a core wakes it for a lease ask, or shutdown), then
    /// drains the channel and commits. Settlements never wake the thread: a per-message wake-up costs the
    /// sending core a futex call and this thread a context switch per request (measured: 28 us of CPU per
    /// settlement at 2,000 requests/s when it woke per message, against under 1 us now).
    fn run(&mut self) {
        let mut next = Instant::now() + self.interval;
        let mut next_sync = Instant::now() + JOURNAL_SYNC;
        let mut next_stats = Instant::now() + Duration::from_secs(10);
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            let mut disconnected = false;
            loop {
                match self.rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if stopping || disconnected {
                for _ in 0..3 {
                    self.commit();
                    if self.inflight.is_none() && self.pending.is_empty() {
                        break;
                    }
                }
                self.sync_journals();
                self.release_leases();
                self.log_stats();
                return;
            }
            let now = Instant::now();
            if now >= next {
                self.commit();
                next = now + self.interval;
            }
            if now >= next_sync {
                self.sync_journals();
                next_sync = now + JOURNAL_SYNC;
            }
            if now >= next_stats {
                self.log_stats();
                next_stats = now + Duration::from_secs(10);
            }
            std::thread::park_timeout(next.saturating_duration_since(Instant::now()));
        }
    }

    fn handle(&mut self, m: ToLedger) {
        match m {
            ToLedger::Settled(r) => self.take(r),
            ToLedger::Lease {
                core,
                id,
                key,
                need,
                want,
            } => self.lease(core, id, key, need, want),
            ToLedger::Cores(p) => {
                if let Some(f) = &mut self.fleet {
                    f.cores = Some(p);
                }
            }
        }
    }

    /// Adds a settlement; a gap in its source's sequence numbers is filled from the journal.
    fn take(&mut self, r: Record) {
        let last = self.seen.get(&r.source).copied().unwrap_or(0);
        if r.seq > last + 1 {
            self.recover(&r.source, last + 1, r.seq);
        }
        if r.seq > last {
            self.seen.insert(std::sync::Arc::clone(&r.source), r.seq);
            self.stats.settlements += 1;
            self.health
                .metrics
                .settlements
                .fetch_add(1, Ordering::Relaxed);
            add_record(&mut self.pending, &r);
        }
    }

    /// Reads entries `from..to` of `source` back from its journal files.
    fn recover(&mut self, source: &str, from: u64, to: u64) {
        let files = journal::list(&self.journal_dir).unwrap_or_default();
        for (_, path) in files.get(source).into_iter().flatten() {
            for r in journal::read_file(path).unwrap_or_default() {
                if (from..to).contains(&r.seq) {
                    self.stats.recovered += 1;
                    self.stats.settlements += 1;
                    let m = &self.health.metrics;
                    m.recovered.fetch_add(1, Ordering::Relaxed);
                    m.settlements.fetch_add(1, Ordering::Relaxed);
                    add_record(&mut self.pending, &r);
                }
            }
        }
    }

    fn commit(&mut self) {
        if self.inflight.is_none() && !self.pending.is_empty() {
            self.inflight = Some(std::mem::take(&mut self.pending));
        }
        let Some(batch) = self.inflight.as_ref() else {
            return;
        };
        let started = Instant::now();
        let started_ms = Timestamp::now().as_millisecond();
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        // Fleet mode: the batch's spend also leaves this node's leases of the windows it falls in
        // (computed per attempt: a lease granted since the last attempt counted this spend as
        // uncommitted, so its commit must take it off that lease).
        let from_leases = self
            .fleet
            .as_ref()
            .map(|f| lease_decrements(batch, &f.leases));
        let node = self.fleet.as_ref().map_or(0, |f| f.node);
        self.health.busy(true);
        let result = transact(self.store.as_ref(), &policy, |txn| match &from_leases {
            Some(from) => fleet::commit(txn, batch, node, from),
            None => ledger::apply_batch(txn, batch),
        });
        self.health.busy(false);
        match result {
            Ok(_) => {
                let us = started.elapsed().as_micros() as u64;
                let entries = batch.spend.len() as u64;
                self.stats.commits += 1;
                self.stats.entries += entries;
                self.stats.max_entries = self.stats.max_entries.max(entries);
                self.stats.commit_us_total += us;
                self.stats.commit_us_max = self.stats.commit_us_max.max(us);
                self.health.metrics.committed(us, entries);
                for (s, q) in &batch.upto {
                    let c = self.committed.entry(s.clone()).or_insert(0);
                    *c = (*c).max(*q);
                }
                self.inflight = None;
                self.health.commits.fetch_add(1, Ordering::Relaxed);
                if self.health.failing_since_ms.swap(0, Ordering::Relaxed) != 0 {
                    self.logger.event("ledger_store_recovered", &[]);
                }
            }
            Err(e) => {
                self.stats.failures += 1;
                self.health.metrics.failures.fetch_add(1, Ordering::Relaxed);
                // Failing since this call began (it stalled, then gave up), not since it gave up.
                if self
                    .health
                    .failing_since_ms
                    .compare_exchange(0, started_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    self.logger.event(
                        "ledger_store_failing",
                        &[("error", &e.to_string()), ("kind", self.store.kind())],
                    );
                }
            }
        }
        let behind = self.pending.spend.len() + self.inflight.as_ref().map_or(0, |b| b.spend.len());
        self.health
            .metrics
            .pending_entries
            .store(behind as u64, Ordering::Relaxed);
    }

    /// Spend settled on this node and not yet committed, on `w`: the pending and in-flight batches.
    fn uncommitted(&self, w: &WindowRef) -> i128 {
        let (from, to) = (w.start.div_euclid(SLOT_SECS), w.end.div_euclid(SLOT_SECS));
        self.inflight
            .iter()
            .chain(std::iter::once(&self.pending))
            .flat_map(|b| b.spend.iter())
            .filter(|((i, slot), _)| *i == w.instance && (from..to).contains(slot))
            .fold(0i128, |a, (_, v)| a.saturating_add(*v))
    }

    /// Fleet mode: a core asks for a lease on `key`'s current window. Runs [`fleet::acquire`] and answers
    /// with [`Msg::FleetLease`]; a store that fails (after a few quick attempts) grants nothing, so
    /// requests beyond the node's current leases are refused until it answers again.
    fn lease(&mut self, core: usize, id: u64, key: InstanceKey, need: Money, want: Money) {
        let Some(f) = &self.fleet else {
            return;
        };
        // The lease clock: the wall clock plus `ledger.clock_offset_ms` (fault injection; 0 otherwise).
        let now = Timestamp::now()
            .checked_add(jiff::SignedDuration::from_millis(f.cfg.clock_offset_ms))
            .unwrap_or_else(|_| Timestamp::now());
        let limit = key.budget.amount;
        let window = if key.budget.window.is_rolling() {
            None
        } else {
            key.budget.window.period(now).ok()
        };
        let mut answer = FleetAnswer {
            grant: None,
            failed: false,
            out_of_reach: false,
            spent: limit,
            limit,
            uncommitted: 0,
            window_start: now.as_second(),
            window_end: now.as_second(),
        };
        if let Some((start, end)) = window {
            let w = WindowRef {
                instance: records::instance_name(&key),
                start: start.as_second(),
                end: end.as_second(),
                limit: limit.pico(),
            };
            let ask = Ask {
                node: f.node,
                need: need.pico(),
                want: want.pico(),
                nodes: f.cfg.nodes,
                now_ms: now.as_millisecond(),
                ttl_ms: f.cfg.lease_ttl_ms,
                max_skew_ms: f.cfg.max_skew_ms,
            };
            // Other nodes' grants on the same instance conflict with this one (serializable stores):
            // those are retried up to LEASE_CONFLICT_ATTEMPTS times, quickly; any other error (the store
            // out of reach) up to 3, so that a down store holds the thread for few timeouts.
            let once = RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            };
            let mut wait = Duration::from_millis(2);
            let mut attempt = 0;
            self.health.busy(true);
            let result = loop {
                attempt += 1;
                let r = transact(self.store.as_ref(), &once, |txn| {
                    let grant = fleet::acquire(txn, &w, &ask)?;
                    Ok((grant, fleet::committed(txn, &w)?))
                });
                match &r {
                    Err(e) if conflict(e) && attempt < LEASE_CONFLICT_ATTEMPTS => {}
                    Err(e) if !conflict(e) && e.is_retryable() && attempt < 3 => {}
                    _ => break r,
                }
                // The backoff (a core's wake-up only shortens it).
                std::thread::park_timeout(wait);
                wait = (wait * 2).min(Duration::from_millis(20));
            };
            self.health.busy(false);
            let m = &self.health.metrics;
            match result {
                Ok((grant, spent)) => {
                    match grant {
                        Some(_) => m.lease_granted.fetch_add(1, Ordering::Relaxed),
                        None => m.lease_refused.fetch_add(1, Ordering::Relaxed),
                    };
                    answer.grant = grant;
                    answer.spent = Money::from_pico(spent);
                    answer.uncommitted = self.uncommitted(&w);
                    answer.window_start = w.start;
                    answer.window_end = w.end;
                    if grant.is_some() {
                        if let Some(f) = &mut self.fleet {
                            f.leases.insert((w.instance.clone(), w.start), w);
                        }
                    }
                }
                Err(e) => {
                    m.lease_failed.fetch_add(1, Ordering::Relaxed);
                    // Conflicts with other nodes' grants (its retries spent) tell of a busy store, not
                    // of one out of reach: nothing is granted, and open budgets stay on leases.
                    answer.failed = true;
                    answer.out_of_reach = !conflict(&e);
                    self.logger.event(
                        "fleet_lease_failed",
                        &[("budget", &key.budget.name), ("error", &e.to_string())],
                    );
                }
            }
        }
        let Some(cores) = self.fleet.as_ref().and_then(|f| f.cores.as_ref()) else {
            return;
        };
        // An answer that cannot be delivered leaves the grant unused on the lease: it goes back at
        // release or expiry.
        let _ = cores.send(core, Msg::FleetLease { id, key, answer });
    }

    /// Fleet mode, at shutdown (after the last commits): gives back every lease this node holds.
    fn release_leases(&mut self) {
        let Some(f) = &mut self.fleet else {
            return;
        };
        let node = f.node;
        let policy = RetryPolicy {
            max_attempts: 3,
            ..RetryPolicy::default()
        };
        for (_, w) in std::mem::take(&mut f.leases) {
            if let Err(e) = transact(self.store.as_ref(), &policy, |txn| {
                fleet::release(txn, &w, node)
            }) {
                self.logger.event(
                    "fleet_release_failed",
                    &[
                        ("budget", &w.instance.budget),
                        ("error", &e.to_string()),
                        ("expires", "at the lease's expiry"),
                    ],
                );
            }
        }
    }

    /// `fsync`s this run's journal files (a machine crash then loses at most [`JOURNAL_SYNC`]) and deletes
    /// the files whose every entry is committed (all but the newest of a source, once the next file's
    /// first sequence number is committed).
    fn sync_journals(&mut self) {
        let Ok(files) = journal::list(&self.journal_dir) else {
            return;
        };
        for (source, files) in files {
            if !source.starts_with(&self.run) {
                continue;
            }
            let committed = self.committed.get(&source).copied().unwrap_or(0);
            for (i, (_, path)) in files.iter().enumerate() {
                let next_first = files.get(i + 1).map(|(f, _)| *f);
                match next_first {
                    Some(f) if f.saturating_sub(1) <= committed => {
                        let _ = std::fs::remove_file(path);
                    }
                    _ => {
                        if let Ok(f) = std::fs::File::open(path) {
                            let _ = f.sync_data();
                        }
                    }
                }
            }
        }
    }

    fn log_stats(&mut self) {
        let s = &self.stats;
        if s.commits == 0 && s.failures == 0 {
            return;
        }
        self.logger.event(
            "ledger_stats",
            &[
                ("commits", &s.commits.to_string()),
                ("settlements", &s.settlements.to_string()),
                ("entries", &s.entries.to_string()),
                ("max_entries_per_commit", &s.max_entries.to_string()),
                (
                    "mean_commit_us",
                    &(s.commit_us_total / s.commits.max(1)).to_string(),
                ),
                ("max_commit_us", &s.commit_us_max.to_string()),
                ("failures", &s.failures.to_string()),
                ("recovered_from_journal", &s.recovered.to_string()),
                ("pending_entries", &self.pending.spend.len().to_string()),
            ],
        );
        self.stats = Stats::default();
    }
}

/// The budget instance a stored name stands for under the current budgets, if it still exists with the
/// same kind of scope (per member, or shared).
pub fn instance_key(
    set: &tollgate_core::budget::BudgetSet,
    name: &ledger::InstanceName,
) -> Option<tollgate_core::budget::InstanceKey> {
    use tollgate_core::budget::Scope;
    let budget = set.get(&name.budget)?;
    let per_member = matches!(budget.scope, Scope::EachMember(_) | Scope::EachIdentity);
    if per_member == name.member.is_empty() {
        return None;
    }
    Some(tollgate_core::budget::InstanceKey {
        budget: Arc::clone(budget),
        member: (!name.member.is_empty()).then(|| Arc::from(name.member.as_str())),
    })
}

/// When a stored slot's spend counts as made: its last second, or now for the current slot (late, never
/// early: a rolling window never drops spend before it is due).
pub fn slot_time(slot_start: Timestamp, now: Timestamp) -> Timestamp {
    slot_start
        .checked_add(jiff::SignedDuration::from_secs(ledger::SLOT_SECS - 1))
        .unwrap_or(slot_start)
        .min(now)
}

/// Whether a gateway holds the ledger directory's lock (see [`start`]).
fn gateway_running(dir: &Path) -> bool {
    match std::fs::File::open(dir.join("lock")) {
        // Released at once: a gateway starting meanwhile would find it held only for this instant.
        Ok(f) => f.try_lock_shared().is_err(),
        Err(_) => false,
    }
}

/// One row of `tollgate spend`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SpendRow {
    pub budget: String,
    pub instance: String,
    pub window: String,
    pub spent_usd: String,
    pub limit_usd: String,
    pub remaining_usd: String,
    pub resets_at: String,
    /// Spend read from journals not yet in the store (a run that is still going, or one that crashed and
    /// has not been replayed).
    pub unreplayed_usd: String,
    /// The part of `spent_usd` charged at an estimate: requests in flight when a gateway crashed, charged
    /// at their reservation (the most they could cost) because the provider may bill them. Includes a
    /// crashed run's open reservations not yet replayed (when no gateway is running).
    pub crash_estimated_usd: String,
    /// A shared instance (one for everyone in its scope), not a per-member one.
    #[serde(skip)]
    pub shared: bool,
}

/// Current spend per budget instance, from the store (read-only, while a gateway may be writing) plus
/// journal entries the store has not applied yet. Shared instances of every budget are listed, spent or
/// not; per-member instances once they have spend.
pub fn report(config: &tollgate_core::Config) -> Result<Vec<SpendRow>, String> {
    let store = open_store(&config.ledger, true)?;
    report_on(config, store.as_ref())
}

/// [`report`] on a store already open (a running process's reader: the metrics page and the control
/// plane's live budgets read through it instead of opening the store, a PostgreSQL connection, per call).
pub fn report_on(
    config: &tollgate_core::Config,
    store: &dyn Store,
) -> Result<Vec<SpendRow>, String> {
    use tollgate_core::budget::owner::Ledger;
    use tollgate_core::budget::InstanceKey;
    let path = config.ledger.dir.display();
    let policy = RetryPolicy::default();
    let now = Timestamp::now();
    let since = now
        .checked_sub(jiff::SignedDuration::try_from(HISTORY).unwrap_or_default())
        .unwrap_or(now);
    let stored = transact(store, &policy, |txn| ledger::load_since(txn, since))
        .map_err(|e| format!("{path}: {e}"))?;
    let set = &config.budgets;
    let mut ledger = Ledger::new();
    let mut keys: Vec<InstanceKey> = Vec::new();
    let note = |k: &InstanceKey, keys: &mut Vec<InstanceKey>| {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    };
    for b in set.budgets() {
        if !matches!(
            b.scope,
            tollgate_core::budget::Scope::EachMember(_)
                | tollgate_core::budget::Scope::EachIdentity
        ) {
            note(
                &InstanceKey {
                    budget: Arc::clone(b),
                    member: None,
                },
                &mut keys,
            );
        }
    }
    for h in &stored {
        if let Some(k) = instance_key(set, &h.instance) {
            ledger.record(&k, h.amount, slot_time(h.slot_start, now));
            note(&k, &mut keys);
        }
    }
    let mut estimated = Ledger::new();
    let stored_estimates = transact(store, &policy, |txn| {
        ledger::load_estimated_since(txn, since)
    })
    .map_err(|e| format!("{path}: {e}"))?;
    for h in &stored_estimates {
        if let Some(k) = instance_key(set, &h.instance) {
            estimated.record(&k, h.amount, slot_time(h.slot_start, now));
        }
    }
    // While a gateway runs, the journals are its own: their open reservations are requests in flight,
    // not a crash's. With none running, they are what the next start will charge.
    let running = gateway_running(&config.ledger.dir);
    let mut unreplayed: HashMap<InstanceKey, i128> = HashMap::new();
    let journal_dir = config.ledger.dir.join("journal");
    for (source, files) in journal::list(&journal_dir).map_err(|e| e.to_string())? {
        let applied = transact(store, &policy, |txn| ledger::applied(txn, &source))
            .map_err(|e| e.to_string())?;
        let last_first = files.last().map_or(0, |(f, _)| *f);
        let mut entries = Vec::new();
        for (_, file) in files {
            entries.extend(journal::read_entries(&file).unwrap_or_default());
        }
        let mut charges: Vec<(Timestamp, Money, Vec<InstanceName>, bool)> = Vec::new();
        for e in &entries {
            if let journal::Entry::Settled { record: r, .. } = e {
                if r.seq > applied {
                    charges.push((r.at, r.amount, r.instances.clone(), false));
                }
            }
        }
        if !running {
            let open = journal::unsettled(&entries, last_first);
            if open.seq > applied {
                charges.extend(open.orphans.into_iter().map(|(at, a, i)| (at, a, i, true)));
            }
        }
        for (at, amount, instances, is_estimate) in charges {
            for i in &instances {
                if let Some(k) = instance_key(set, i) {
                    ledger.record(&k, amount, at);
                    if is_estimate {
                        estimated.record(&k, amount, at);
                    }
                    *unreplayed.entry(k.clone()).or_insert(0) += amount.pico();
                    note(&k, &mut keys);
                }
            }
        }
    }
    Ok(keys
        .iter()
        .map(|k| {
            let s = ledger.status(k, now);
            SpendRow {
                budget: k.budget.name.to_string(),
                instance: s.label.clone(),
                window: k.budget.window.to_string(),
                spent_usd: s.spent.usd(),
                limit_usd: s.limit.usd(),
                remaining_usd: s.remaining.usd(),
                resets_at: s.resets_at.to_string(),
                unreplayed_usd: tollgate_core::Money::from_pico(
                    unreplayed.get(k).copied().unwrap_or(0),
                )
                .usd(),
                crash_estimated_usd: estimated.status(k, now).spent.usd(),
                shared: k.member.is_none(),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tollgate_core::store::ledger::InstanceName;
    use tollgate_core::store::mem::MemStore;
    use tollgate_core::Money;

    /// Settlements whose hand-off was dropped (channel full) are read back from the journal when the next
    /// one shows the gap; every one is committed once.
    #[test]
    fn a_gap_in_the_hand_offs_is_filled_from_the_journal() {
        let dir = std::env::temp_dir().join(format!("tg-ledger-gap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = LedgerConfig {
            dir: dir.clone(),
            commit_interval: Duration::from_millis(10),
            fail_closed_after: Duration::from_secs(30),
            store: StoreLocation::Embedded,
            fleet: Default::default(),
        };
        let (log, writer) = Logger::start().unwrap();
        let store = MemStore::new();
        let mut started = start_with(Box::new(store.clone()), &cfg, &log).unwrap();
        let source = format!("{}-c0", started.handle.run);
        let at = Timestamp::now();
        let team = InstanceName {
            budget: "team".into(),
            member: String::new(),
        };
        // Entries 1..=3 reached only the journal; entry 4 is handed over.
        std::fs::create_dir_all(&started.handle.journal_dir).unwrap();
        let mut lines = String::new();
        for q in 1..=3 {
            lines.push_str(&format!(
                "{{\"q\":{q},\"t\":{},\"a\":\"{}\",\"k\":[[\"team\",\"\"]]}}\n",
                at.as_millisecond(),
                q * 100
            ));
        }
        std::fs::write(
            started.handle.journal_dir.join(format!("{source}.1.log")),
            lines,
        )
        .unwrap();
        started
            .handle
            .tx
            .send(ToLedger::Settled(Record {
                source: Arc::from(source.as_str()),
                seq: 4,
                at,
                amount: Money::from_pico(400),
                instances: vec![team.clone()],
                usage: None,
            }))
            .unwrap();
        started.handle.shutdown(Duration::from_secs(5));
        let got = transact(&store, &RetryPolicy::default(), |txn| {
            ledger::load_since(txn, Timestamp::UNIX_EPOCH)
        })
        .unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].instance, team);
        assert_eq!(got[0].amount, Money::from_pico(100 + 200 + 300 + 400));
        log.close();
        drop(log);
        let _ = writer.join();
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A crashed run's open reservations are charged at their reserved amount at the next start, marked
    /// as estimates; a replay interrupted after its commit (journals still there) charges nothing twice.
    #[test]
    fn a_crashed_runs_open_reservations_are_charged_once_at_their_reservation() {
        let dir = std::env::temp_dir().join(format!("tg-ledger-orphans-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let journal_dir = dir.join("journal");
        let source = "1-2-00000000-c0";
        let team = InstanceName {
            budget: "team".into(),
            member: String::new(),
        };
        let at = Timestamp::now();
        let t = at.as_millisecond();
        // Settled 100 (closing reservation 1), released 2, left 3 (500) and 4 (700) open.
        let lines = format!(
            "{{\"r\":1,\"t\":{t},\"a\":\"400\",\"k\":[[\"team\",\"\"]]}}\n\
             {{\"r\":2,\"t\":{t},\"a\":\"400\",\"k\":[[\"team\",\"\"]]}}\n\
             {{\"r\":3,\"t\":{t},\"a\":\"500\",\"k\":[[\"team\",\"\"]]}}\n\
             {{\"q\":1,\"c\":1,\"t\":{t},\"a\":\"100\",\"k\":[[\"team\",\"\"]]}}\n\
             {{\"c\":2}}\n\
             {{\"r\":4,\"t\":{t},\"a\":\"700\",\"k\":[[\"team\",\"\"]]}}\n"
        );
        let write = || {
            std::fs::create_dir_all(&journal_dir).unwrap();
            std::fs::write(journal_dir.join(format!("{source}.1.log")), &lines).unwrap();
        };
        write();
        let store = MemStore::new();
        let p = RetryPolicy::default();
        let got = replay(&store, &journal_dir, &p).unwrap();
        assert_eq!(got.entries, 1);
        assert_eq!(got.charged.len(), 1);
        assert_eq!(got.charged[0].1, 2);
        assert_eq!(got.charged[0].2[&team], 1200);
        assert_eq!(per_instance(&got.charged[0].2), "team=0.0000000012");
        let spent = |store: &MemStore| {
            transact(store, &p, |txn| {
                Ok((
                    ledger::load_since(txn, Timestamp::UNIX_EPOCH)?,
                    ledger::load_estimated_since(txn, Timestamp::UNIX_EPOCH)?,
                ))
            })
            .unwrap()
        };
        let (s, e) = spent(&store);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].amount, Money::from_pico(100 + 500 + 700));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].amount, Money::from_pico(500 + 700));
        assert!(journal::list(&journal_dir).unwrap().is_empty());
        // Interrupted after the commit: the journal is back and `applied` still says what was committed.
        write();
        transact(&store, &p, |txn| {
            txn.set(
                &tollgate_core::store::keys::applied(source),
                &2u64.to_le_bytes(),
            );
            Ok(())
        })
        .unwrap();
        let again = replay(&store, &journal_dir, &p).unwrap();
        assert_eq!((again.entries, again.charged.len()), (0, 0));
        assert_eq!(spent(&store).0[0].amount, Money::from_pico(1300));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
