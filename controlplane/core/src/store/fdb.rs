//! The fleet's [`Store`]: a FoundationDB cluster, through the `foundationdb` crate (cargo feature `fdb`),
//! selected in the configuration by `[ledger] cluster_file`. Every gateway of a fleet commits its spend
//! batches to the same cluster; the key layout is the one in `docs/store.md`, the operator's guide is
//! `docs/fleet.md`.
//!
//! Owns: [`FdbStore`] (one database handle), [`FdbOptions`] (the per-transaction timeout and retry limit),
//! the process's FoundationDB client network ([`stop_network`]), and the mapping of FoundationDB's error
//! codes to [`StoreError`].
//!
//! Threads: FoundationDB's client runs its own network thread, started once per process by the first
//! [`FdbStore::open`] and kept until [`stop_network`]. A binary that opens an `FdbStore` must call
//! [`stop_network`] on every orderly exit, after the ledger thread's last commit and before returning from
//! `main` or calling `process::exit`: the FoundationDB client requires its network to be stopped before
//! the process exits (an abort is fine), and it cannot be started again afterwards. Every operation here blocks the calling thread on a
//! FoundationDB future (`futures::executor::block_on`), which FoundationDB's network thread completes:
//! only the ledger thread (or the CLI) may call this store, never a core, which must not block and whose
//! runtime does not drive these futures anyway.
//!
//! Semantics: FoundationDB's own, which the trait was modelled on: serializable transactions with
//! read-your-writes; [`Transaction::add`] is the atomic `ADD` mutation on the 16-byte little-endian
//! encoding, so concurrent nodes adding to the same spend counter never conflict; `set`, `clear` and
//! `add` only buffer in the client (their errors, such as a key over FoundationDB's 10 kB limit, surface
//! at commit). Each transaction carries the [`FdbOptions`] timeout (FoundationDB transactions cannot live
//! past 5 s anyway) and retry limit. FoundationDB counts its retry limit in `on_error` calls, which this
//! store never makes: each attempt of [`super::transact`] is a fresh transaction, so the limit that binds
//! is the caller's [`super::RetryPolicy`]; [`FdbStore::retry_policy`] is the one these options imply.
//!
//! Fails: FoundationDB errors map to [`StoreError`]: `not_committed` (1020) and `transaction_too_old`
//! (1007) are [`StoreError::Conflict`]; `commit_unknown_result` (1021) and any other error FoundationDB
//! says may have committed are [`StoreError::CommitUnknown`] (the ledger's per-source applied sequence
//! numbers make a retried batch a no-op); `transaction_timed_out` (1031) is [`StoreError::Timeout`], or
//! `CommitUnknown` when it cuts a commit short (the commit may have landed); everything else (the cluster
//! unreachable, a bad cluster file, the client library too old for the API version, a key too large) is
//! [`StoreError::Unavailable`] with FoundationDB's code and message: none of it means the stored data is
//! damaged. Nothing panics.
//!
//! Cost (FoundationDB's documented typical latencies below 75 % load, not measured here): a read is one
//! round trip to a storage server (under a millisecond to about one); a commit is a round trip to the
//! proxies plus the transaction logs' fsync (a few milliseconds); a range read fetches its range in as
//! few round trips as FoundationDB's `WANT_ALL` streaming mode allows. Each operation also costs a
//! thread wake-up, as the network thread completes the future the caller blocks on. Building
//! it needs libclang (bindgen, against the API headers embedded in the crate); linking needs the client
//! library `libfdb_c`, which is why CI lints this module without linking it.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use foundationdb::api::{FdbApiBuilder, NetworkAutoStop};
use foundationdb::options::{MutationType, StreamingMode, TransactionOption};
use foundationdb::{Database, FdbError, RangeOption};
use futures::executor::block_on;

use super::{encode_i128, KeyValue, RetryPolicy, Store, StoreError, Transaction};

/// The FoundationDB API version this build selects (the `fdb-7_3` feature of the `foundationdb` crate):
/// every gateway host needs a client library `libfdb_c` of this version or newer.
pub const API_VERSION: i32 = 730;

/// Per-transaction limits, set as transaction options on every transaction [`FdbStore::begin`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbOptions {
    /// How long one transaction may run, from `begin` to the end of `commit` (FoundationDB's `timeout`
    /// option); past it, operations fail with [`StoreError::Timeout`]. Default 5 s.
    pub timeout: Duration,
    /// FoundationDB's `retry_limit` option, and the retries [`FdbStore::retry_policy`] allows. Default 5.
    pub retry_limit: u32,
}

impl Default for FdbOptions {
    fn default() -> Self {
        FdbOptions {
            timeout: Duration::from_secs(5),
            retry_limit: 5,
        }
    }
}

/// The state of this process's FoundationDB client network.
enum Network {
    NotStarted,
    Running(NetworkAutoStop),
    /// Stopped by [`stop_network`]; FoundationDB cannot start it again in this process.
    Stopped,
    /// Starting failed; FoundationDB allows selecting the API version once per process, so it stays so.
    Failed(String),
}

static NETWORK: Mutex<Network> = Mutex::new(Network::NotStarted);

/// Starts the client network if it is not running: selects the API version and starts FoundationDB's
/// network thread, once per process.
fn ensure_network() -> Result<(), StoreError> {
    let mut network = NETWORK.lock().unwrap_or_else(PoisonError::into_inner);
    match &*network {
        Network::Running(_) => return Ok(()),
        Network::Stopped => {
            return Err(StoreError::Unavailable(
                "the FoundationDB client network was stopped and cannot be started again in this \
                 process"
                    .into(),
            ))
        }
        Network::Failed(why) => return Err(StoreError::Unavailable(why.clone())),
        Network::NotStarted => {}
    }
    let started = FdbApiBuilder::default().build().and_then(|builder| {
        // SAFETY: `boot`'s contract is that the returned guard is dropped (stopping the network thread)
        // before the process exits; an abort (a panic in the release profile, SIGKILL) is allowed. The
        // guard lives in `NETWORK` until `stop_network` drops it, and a binary that opens an `FdbStore`
        // must call `stop_network` before it returns from `main` or calls `process::exit` (the module
        // docs say so). `FdbApiBuilder::build` panics if called twice; `NETWORK` makes it run at most
        // once. This is the crate's only unsafe code, and only with the `fdb` feature.
        #[allow(unsafe_code)]
        unsafe {
            builder.boot()
        }
    });
    match started {
        Ok(guard) => {
            *network = Network::Running(guard);
            Ok(())
        }
        Err(e) => {
            let why = format!(
                "could not start the FoundationDB client (API version {API_VERSION}; is libfdb_c \
                 {API_VERSION} or newer installed?): {}",
                describe(e)
            );
            *network = Network::Failed(why.clone());
            Err(StoreError::Unavailable(why))
        }
    }
}

/// Stops this process's FoundationDB client network and waits for its thread, if it was started. Call it
/// once on an orderly exit, after the last transaction (every [`FdbStore`] is unusable afterwards, and the
/// network cannot be started again in this process).
pub fn stop_network() {
    let guard = {
        let mut network = NETWORK.lock().unwrap_or_else(PoisonError::into_inner);
        match std::mem::replace(&mut *network, Network::Stopped) {
            Network::Running(guard) => Some(guard),
            other => {
                *network = other;
                None
            }
        }
    };
    // Dropping the guard stops the network and joins its thread (outside the lock).
    drop(guard);
}

/// `code: message`, as FoundationDB names its errors.
fn describe(e: FdbError) -> String {
    format!("FoundationDB error {}: {}", e.code(), e.message())
}

/// Maps a FoundationDB error from a read or from `commit` (`committing`) to what a caller can do.
fn store_error(e: FdbError, committing: bool) -> StoreError {
    match e.code() {
        // not_committed, transaction_too_old
        1020 | 1007 => StoreError::Conflict,
        // transaction_timed_out: a commit it cut short may still have landed.
        1031 if committing => StoreError::CommitUnknown,
        1031 => StoreError::Timeout,
        // commit_unknown_result, and whatever else FoundationDB says may have committed.
        1021 => StoreError::CommitUnknown,
        _ if committing && e.is_maybe_committed() => StoreError::CommitUnknown,
        _ => StoreError::Unavailable(describe(e)),
    }
}

/// A FoundationDB cluster as a [`Store`]; see the module docs.
pub struct FdbStore {
    db: Database,
    opts: FdbOptions,
    cluster_file: PathBuf,
}

impl FdbStore {
    /// Opens the cluster that `cluster_file` names, starting the client network first if this process has
    /// not. Does not contact the cluster: an unreachable one shows as [`StoreError::Timeout`] or
    /// [`StoreError::Unavailable`] on the first transaction.
    pub fn open(cluster_file: &Path, opts: FdbOptions) -> Result<FdbStore, StoreError> {
        let path = cluster_file.to_str().ok_or_else(|| {
            StoreError::Unavailable(format!(
                "the FoundationDB cluster file path {} is not UTF-8",
                cluster_file.display()
            ))
        })?;
        ensure_network()?;
        let db = Database::from_path(path).map_err(|e| {
            StoreError::Unavailable(format!(
                "FoundationDB cluster file {}: {}",
                cluster_file.display(),
                describe(e)
            ))
        })?;
        Ok(FdbStore {
            db,
            opts,
            cluster_file: cluster_file.to_path_buf(),
        })
    }

    /// The cluster file this store was opened with.
    pub fn cluster_file(&self) -> &Path {
        &self.cluster_file
    }

    /// The options every transaction gets.
    pub fn options(&self) -> FdbOptions {
        self.opts
    }

    /// The [`RetryPolicy`] that enforces [`FdbOptions::retry_limit`] in [`super::transact`]: the first
    /// attempt and `retry_limit` retries, with the default backoff.
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy {
            max_attempts: self.opts.retry_limit.saturating_add(1),
            ..RetryPolicy::default()
        }
    }
}

/// Milliseconds as FoundationDB's options take them (at least 1, at most `i32::MAX`).
fn option_millis(d: Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX).max(1)
}

impl Store for FdbStore {
    fn kind(&self) -> &'static str {
        "foundationdb"
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        let txn = self
            .db
            .create_trx()
            .map_err(|e| StoreError::Unavailable(describe(e)))?;
        txn.set_option(TransactionOption::Timeout(option_millis(self.opts.timeout)))
            .map_err(|e| StoreError::Unavailable(describe(e)))?;
        txn.set_option(TransactionOption::RetryLimit(
            i32::try_from(self.opts.retry_limit).unwrap_or(i32::MAX),
        ))
        .map_err(|e| StoreError::Unavailable(describe(e)))?;
        Ok(Box::new(FdbTransaction { txn }))
    }
}

/// One FoundationDB transaction; dropping it uncommitted cancels it.
struct FdbTransaction {
    txn: foundationdb::Transaction,
}

impl Transaction for FdbTransaction {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let value = block_on(self.txn.get(key, false)).map_err(|e| store_error(e, false))?;
        Ok(value.map(|v| v.to_vec()))
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        let mut out = Vec::new();
        if begin >= end {
            return Ok(out);
        }
        let mut opt = Some(RangeOption {
            limit: (limit > 0).then_some(limit),
            mode: StreamingMode::WantAll,
            ..RangeOption::from((begin, end))
        });
        let mut iteration = 1;
        while let Some(page_opt) = opt {
            let page = block_on(self.txn.get_range(&page_opt, iteration, false))
                .map_err(|e| store_error(e, false))?;
            out.extend(
                page.iter()
                    .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
            );
            // `next_range` is None once the range is exhausted or the limit reached.
            opt = page_opt.next_range(&page);
            iteration += 1;
        }
        if limit > 0 {
            out.truncate(limit);
        }
        Ok(out)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.txn.set(key, value);
    }

    fn clear(&mut self, key: &[u8]) {
        self.txn.clear(key);
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        // FoundationDB fails the commit of an inverted range; an empty one clears nothing either way.
        if begin < end {
            self.txn.clear_range(begin, end);
        }
    }

    fn add(&mut self, key: &[u8], delta: i128) {
        self.txn
            .atomic_op(key, &encode_i128(delta), MutationType::Add);
    }

    fn commit(self: Box<Self>) -> Result<(), StoreError> {
        match block_on(self.txn.commit()) {
            Ok(_) => Ok(()),
            Err(e) => Err(store_error(FdbError::from(e), true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;

    /// The conformance suite against a real cluster, when `FDB_CLUSTER_FILE` names one (every check
    /// writes only under its own `("conformance", check)` prefix, which it clears first, so a shared
    /// cluster is fine). Skipped otherwise: no build machine of ours has FoundationDB.
    #[test]
    fn conformance_against_a_cluster() {
        let Some(path) = std::env::var_os("FDB_CLUSTER_FILE").filter(|p| !p.is_empty()) else {
            eprintln!("skipped: FDB_CLUSTER_FILE is not set (no FoundationDB cluster to check)");
            return;
        };
        let store = FdbStore::open(Path::new(&path), FdbOptions::default()).unwrap();
        assert_eq!(store.kind(), "foundationdb");
        let result = conformance::run(&store).and_then(|()| conformance::run_overlapping(&store));
        drop(store);
        stop_network();
        result.unwrap();
    }

    #[test]
    fn defaults_and_api_version() {
        assert_eq!(FdbApiBuilder::default().runtime_version(), API_VERSION);
        let opts = FdbOptions::default();
        assert_eq!(opts.timeout, Duration::from_secs(5));
        assert_eq!(opts.retry_limit, 5);
        assert_eq!(option_millis(Duration::from_secs(5)), 5000);
        assert_eq!(option_millis(Duration::ZERO), 1);
        assert_eq!(option_millis(Duration::from_secs(u64::MAX)), i32::MAX);
    }
}
