//! The store interface every durable part of Tollgate is written against, modelled on FoundationDB:
//! ordered byte keys (laid out with the tuple encoding in [`tuple`](mod@tuple); every key comes from
//! [`keys`], the key schema, also described in `docs/store.md`), serializable read-write transactions with read-your-writes, range reads, atomic add,
//! and a retry loop ([`transact`]) for conflicts and commits whose outcome is unknown.
//!
//! Owns: [`Store`] and [`Transaction`] (the interface), [`StoreError`] (what can go wrong, and which of it
//! a retry can fix), [`transact`] (FoundationDB's `run` loop: retry with capped backoff up to a limit).
//! Implementations: [`sqlite::SqliteStore`] (the embedded default: one file, crash-safe, readable by other
//! processes while the gateway writes) and [`mem::MemStore`] (in memory with FoundationDB's conflict
//! semantics and injectable faults, for tests and the fleet simulation), [`postgres::PgStore`] (a PostgreSQL
//! database, for a fleet) and, with the `fdb` cargo feature, `fdb::FdbStore` (a FoundationDB cluster, for a
//! fleet). [`conformance`] runs the same checks against any implementation.
//!
//! Values written by [`Transaction::add`] are 16-byte little-endian two's-complement integers (pico-USD
//! amounts are `i128`); [`decode_i128`] reads them.
//!
//! Fails: every operation returns [`StoreError`]; nothing panics. Cost: see each implementation.

use std::time::Duration;

pub mod conformance;
#[cfg(feature = "fdb")]
pub mod fdb;
pub mod fleet;
pub mod keys;
pub mod ledger;
pub mod mem;

pub mod consumption;
pub mod postgres;
pub mod sqlite;
pub mod tuple;

/// A key and its value, as range reads return them.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// What a store operation can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// Another transaction wrote what this one read: run it again.
    #[error("the transaction conflicted with another one")]
    Conflict,
    /// The commit may or may not have been applied (FoundationDB's `commit_unknown_result`): run it again
    /// only if running it twice is harmless (the ledger's batch ids make it so).
    #[error("the commit's outcome is unknown")]
    CommitUnknown,
    /// The store cannot be reached or written now (I/O error, lock held too long, injected outage).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The transaction ran past its time limit.
    #[error("the transaction timed out")]
    Timeout,
    /// Data in the store is not what this version of Tollgate wrote (a bad value, a wrong schema).
    #[error("the store holds data this version cannot read: {0}")]
    Corrupt(String),
    /// [`transact`] gave up after this many attempts; the last error is kept.
    #[error("gave up after {attempts} attempts: {last}")]
    RetryLimit {
        attempts: u32,
        last: Box<StoreError>,
    },
}

impl StoreError {
    /// Whether running the transaction again can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            StoreError::Conflict
                | StoreError::CommitUnknown
                | StoreError::Unavailable(_)
                | StoreError::Timeout
        )
    }
}

/// One serializable transaction. Reads see the store as of the transaction's start plus its own writes;
/// writes are applied at [`Transaction::commit`], all or none. Dropping it uncommitted discards it.
pub trait Transaction {
    /// The value of `key`, if any.
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;

    /// The keys in `[begin, end)` in ascending byte order with their values, at most `limit` of them
    /// (`0`: no limit).
    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError>;

    fn set(&mut self, key: &[u8], value: &[u8]);

    fn clear(&mut self, key: &[u8]);

    /// Clears every key in `[begin, end)`.
    fn clear_range(&mut self, begin: &[u8], end: &[u8]);

    /// Adds `delta` to the 16-byte little-endian integer at `key` (absent counts as 0), wrapping like
    /// FoundationDB's atomic ADD. On FoundationDB (and [`mem::MemStore`]) it does not make the transaction
    /// conflict with other writers of `key`; on PostgreSQL ([`postgres`]) two overlapping transactions
    /// that add to one key conflict, and [`transact`] retries one of them.
    fn add(&mut self, key: &[u8], delta: i128);

    /// Applies the writes, all or none.
    fn commit(self: Box<Self>) -> Result<(), StoreError>;
}

/// An ordered key-value store with transactions.
pub trait Store: Send + Sync {
    /// `sqlite`, `memory`, `foundationdb`, `postgres`: for logs and errors.
    fn kind(&self) -> &'static str;

    /// Starts a transaction.
    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError>;
}

/// A shared store is a store: the gateway's ledger thread, its control plane and its catalog watcher hold
/// one store (one SQLite connection, one FoundationDB client) together.
impl<S: Store + ?Sized> Store for std::sync::Arc<S> {
    fn kind(&self) -> &'static str {
        (**self).kind()
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        (**self).begin()
    }
}

/// How [`transact`] retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The wait before the second attempt; doubled each time up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            backoff: Duration::from_millis(2),
            max_backoff: Duration::from_millis(200),
        }
    }
}

/// Runs `body` in a fresh transaction and commits it, running it again on retryable errors (from the body
/// or the commit) with capped exponential backoff, up to `policy.max_attempts`. The body must be safe to
/// run more than once, and, when a commit's outcome can be unknown, its writes must be idempotent.
/// Blocks the calling thread while it waits: call it from a store thread, never from a core.
pub fn transact<T>(
    store: &dyn Store,
    policy: &RetryPolicy,
    mut body: impl FnMut(&mut dyn Transaction) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let mut wait = policy.backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = store.begin().and_then(|mut txn| {
            let value = body(txn.as_mut())?;
            txn.commit()?;
            Ok(value)
        });
        match result {
            Ok(v) => return Ok(v),
            Err(e) if e.is_retryable() && attempt < policy.max_attempts.max(1) => {
                std::thread::sleep(wait);
                wait = (wait * 2).min(policy.max_backoff);
            }
            Err(e) if e.is_retryable() => {
                return Err(StoreError::RetryLimit {
                    attempts: attempt,
                    last: Box::new(e),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads a value written by [`Transaction::add`] (shorter values are zero-extended, as FoundationDB does).
pub fn decode_i128(value: &[u8]) -> Result<i128, StoreError> {
    if value.len() > 16 {
        return Err(StoreError::Corrupt(format!(
            "a counter of {} bytes (at most 16)",
            value.len()
        )));
    }
    let mut buf = [0u8; 16];
    buf[..value.len()].copy_from_slice(value);
    Ok(i128::from_le_bytes(buf))
}

/// The encoding [`Transaction::add`] writes.
pub fn encode_i128(v: i128) -> [u8; 16] {
    v.to_le_bytes()
}
