//! The embedded default [`Store`]: one SQLite file (SQLite is compiled in, no system library), so a
//! single gateway keeps its ledger durably with nothing else to run, and an operator's CLI can read the
//! same file while the gateway writes.
//!
//! Owns: [`SqliteStore`]. The file holds one table, `kv(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT
//! ROWID`; SQLite compares BLOBs with memcmp, so key order is byte order, as the tuple layout needs. One
//! connection sits behind a mutex and each transaction holds it from `BEGIN IMMEDIATE` to `COMMIT` or
//! rollback: transactions run one at a time (serializable; a writer in another process waits for the lock
//! up to the 5 s busy timeout), they never conflict, and reads see the transaction's own writes. `add` is
//! a read and a write inside the transaction. A thread that begins a second transaction while its first
//! is open gets [`StoreError::Unavailable`] instead of waiting on itself forever.
//!
//! Durability: the journal is a write-ahead log (WAL) with `synchronous=FULL`, so every commit is
//! fsynced before it returns: a committed transaction survives the process being killed and the machine
//! losing power, and an uncommitted one leaves nothing. WAL also lets readers in other processes
//! ([`SqliteStore::open_read_only`]) read the last commit while a writer works.
//!
//! Fails: every SQLite error becomes a [`StoreError`]: a busy lock past the timeout, an I/O error, a
//! failed commit (rolled back), or a write through a read-only handle is `Unavailable`; a damaged file
//! or a value that is not a BLOB is `Corrupt`. Writes cannot return errors (the trait's `set` returns
//! nothing), so the first one is kept and returned by every later read and by `commit`. Dropping a
//! transaction uncommitted rolls it back. Nothing panics.
//!
//! Cost, measured (`store_sqlite_commit_latency`, optimised `ci` profile, a file under /tmp on this
//! machine's virtual disk (ext4), 2 cores, 50 commits after 10 warm-up ones): a transaction of 100 `add`s
//! and one `set` takes a median of 0.60 ms from `begin` to the end of `commit` (p90 0.66 ms, max 0.69 ms),
//! of which the 101 statements are 0.22 ms and `COMMIT` with its fsync the rest; a disk whose fsync
//! really waits for the platter or flash adds that wait to every commit. Building: the bundled SQLite C
//! source is the slowest unit of a clean optimised build (93 s on 2 cores), once.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;
use std::time::Duration;

use rusqlite::{params, Connection, ErrorCode, OpenFlags, OptionalExtension};

use super::{decode_i128, encode_i128, KeyValue, Store, StoreError, Transaction};

/// How long a transaction waits for another connection's write lock before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A store in one SQLite file; see the module docs.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// The thread whose transaction holds `conn`, to refuse a second `begin` on it rather than deadlock.
    holder: Mutex<Option<ThreadId>>,
    read_only: bool,
    path: PathBuf,
}

/// Maps a SQLite error to what a caller can do about it.
fn store_error(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _) => match f.code {
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => {
                StoreError::Corrupt(format!("SQLite: {e}"))
            }
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => StoreError::Unavailable(
                format!("SQLite stayed locked past the {BUSY_TIMEOUT:?} busy timeout: {e}"),
            ),
            ErrorCode::ReadOnly => {
                StoreError::Unavailable(format!("the SQLite store is read-only here: {e}"))
            }
            _ => StoreError::Unavailable(format!("SQLite: {e}")),
        },
        rusqlite::Error::InvalidColumnType(..) | rusqlite::Error::FromSqlConversionFailure(..) => {
            StoreError::Corrupt(format!("SQLite holds a value Tollgate did not write: {e}"))
        }
        _ => StoreError::Unavailable(format!("SQLite: {e}")),
    }
}

impl SqliteStore {
    /// Opens (creating it if needed) the store at `path` for reading and writing.
    pub fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let conn = Connection::open(path).map_err(store_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(store_error)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .map_err(store_error)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Unavailable(format!(
                "SQLite kept journal mode {mode} for {}, not WAL",
                path.display()
            )));
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS kv(k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;",
        )
        .map_err(store_error)?;
        Ok(SqliteStore::new(conn, false, path))
    }

    /// Opens the existing store at `path` for reading only, while another process may write it. Its
    /// transactions see the last commit as of their first read; one that writes fails at commit.
    pub fn open_read_only(path: &Path) -> Result<SqliteStore, StoreError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
            | OpenFlags::SQLITE_OPEN_URI
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags).map_err(store_error)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(store_error)?;
        // Fails now, not at the first read, when the file is not a Tollgate store.
        conn.prepare("SELECT k, v FROM kv LIMIT 0")
            .map_err(|e| match store_error(e) {
                StoreError::Unavailable(m) => {
                    StoreError::Corrupt(format!("{} is not a Tollgate store: {m}", path.display()))
                }
                other => other,
            })?;
        Ok(SqliteStore::new(conn, true, path))
    }

    fn new(conn: Connection, read_only: bool, path: &Path) -> SqliteStore {
        SqliteStore {
            conn: Mutex::new(conn),
            holder: Mutex::new(None),
            read_only,
            path: path.to_path_buf(),
        }
    }

    /// The file this store was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Reads or replaces the holder, whatever a panicking thread left (a thread id is never half written).
fn holder(m: &Mutex<Option<ThreadId>>) -> MutexGuard<'_, Option<ThreadId>> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        let me = std::thread::current().id();
        if *holder(&self.holder) == Some(me) {
            return Err(StoreError::Unavailable(
                "this thread already has a transaction open on this SQLite store, which runs one at a \
                 time: it would wait on itself"
                    .to_owned(),
            ));
        }
        // A panic while the lock was held leaves the connection usable; a transaction it left open is
        // rolled back below.
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        *holder(&self.holder) = Some(me);
        let mut txn = SqliteTransaction {
            conn,
            holder: &self.holder,
            open: false,
            deferred: None,
        };
        if !txn.conn.is_autocommit() {
            txn.conn.execute_batch("ROLLBACK").map_err(store_error)?;
        }
        // A writer takes the write lock now, so its reads and writes are never interleaved with another
        // connection's; a reader's snapshot starts at its first read.
        let sql = if self.read_only {
            "BEGIN DEFERRED"
        } else {
            "BEGIN IMMEDIATE"
        };
        txn.conn.execute_batch(sql).map_err(store_error)?;
        txn.open = true;
        Ok(Box::new(txn))
    }
}

struct SqliteTransaction<'a> {
    conn: MutexGuard<'a, Connection>,
    holder: &'a Mutex<Option<ThreadId>>,
    /// `BEGIN` ran and neither `COMMIT` nor `ROLLBACK` has.
    open: bool,
    /// The first error a write met: every later read and the commit return it.
    deferred: Option<StoreError>,
}

impl SqliteTransaction<'_> {
    fn check(&self) -> Result<(), StoreError> {
        match &self.deferred {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }

    fn read(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn
            .prepare_cached("SELECT v FROM kv WHERE k = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(store_error)
    }

    /// Runs a write statement, keeping its error for later.
    fn write(&mut self, sql: &str, args: &[&dyn rusqlite::ToSql]) {
        if self.deferred.is_some() {
            return;
        }
        let result = self
            .conn
            .prepare_cached(sql)
            .and_then(|mut s| s.execute(args));
        if let Err(e) = result {
            self.deferred = Some(store_error(e));
        }
    }
}

impl Transaction for SqliteTransaction<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.check()?;
        self.read(key)
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.check()?;
        if begin >= end {
            return Ok(Vec::new());
        }
        // SQLite reads a negative LIMIT as none.
        let limit = if limit == 0 {
            -1
        } else {
            i64::try_from(limit).unwrap_or(-1)
        };
        self.conn
            .prepare_cached("SELECT k, v FROM kv WHERE k >= ?1 AND k < ?2 ORDER BY k LIMIT ?3")
            .and_then(|mut s| {
                s.query_map(params![begin, end, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            })
            .map_err(store_error)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.write(
            "INSERT OR REPLACE INTO kv(k, v) VALUES (?1, ?2)",
            &[&key, &value],
        );
    }

    fn clear(&mut self, key: &[u8]) {
        self.write("DELETE FROM kv WHERE k = ?1", &[&key]);
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin < end {
            self.write("DELETE FROM kv WHERE k >= ?1 AND k < ?2", &[&begin, &end]);
        }
    }

    fn add(&mut self, key: &[u8], delta: i128) {
        if self.deferred.is_some() {
            return;
        }
        let current = self
            .read(key)
            .and_then(|v| v.map_or(Ok(0), |v| decode_i128(&v)));
        match current {
            Ok(n) => self.set(key, &encode_i128(n.wrapping_add(delta))),
            Err(e) => self.deferred = Some(e),
        }
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        self.check()?;
        self.conn.execute_batch("COMMIT").map_err(store_error)?;
        self.open = false;
        Ok(())
    }
}

impl Drop for SqliteTransaction<'_> {
    fn drop(&mut self) {
        // Uncommitted (dropped, or its commit failed): roll back. If even that fails, the next `begin`
        // rolls back before it starts.
        if self.open && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        *holder(self.holder) = None;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::store::{conformance, decode_i128, transact, RetryPolicy};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    /// A fresh database path under the temp dir, removed (with its WAL files) when dropped.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new() -> TempDb {
            static N: AtomicU32 = AtomicU32::new(0);
            let name = format!(
                "tollgate-store-test-{}-{}-{}.db",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            );
            TempDb(std::env::temp_dir().join(name))
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm", "-journal"] {
                let mut p = self.0.clone().into_os_string();
                p.push(suffix);
                let _ = std::fs::remove_file(p);
            }
        }
    }

    fn put(store: &SqliteStore, key: &[u8], value: &[u8]) {
        let mut t = store.begin().unwrap();
        t.set(key, value);
        t.commit().unwrap();
    }

    fn get(store: &SqliteStore, key: &[u8]) -> Option<Vec<u8>> {
        let mut t = store.begin().unwrap();
        t.get(key).unwrap()
    }

    #[test]
    fn store_sqlite_passes_conformance() {
        let db = TempDb::new();
        let store = SqliteStore::open(&db.0).unwrap();
        conformance::run(&store).unwrap();
    }

    #[test]
    fn store_sqlite_data_survives_close_and_reopen() {
        let db = TempDb::new();
        {
            let store = SqliteStore::open(&db.0).unwrap();
            put(&store, b"k", b"v");
            let mut t = store.begin().unwrap();
            t.add(b"n", 42);
            t.commit().unwrap();
            let mut t = store.begin().unwrap();
            t.set(b"uncommitted", b"x");
        }
        let store = SqliteStore::open(&db.0).unwrap();
        {
            let conn = store.conn.lock().unwrap();
            let pragma = |name: &str| -> String {
                conn.query_row(&format!("PRAGMA {name}"), [], |r| {
                    r.get::<_, rusqlite::types::Value>(0)
                })
                .map(|v| format!("{v:?}"))
                .unwrap()
            };
            // Every commit fsynced, in a write-ahead log.
            assert_eq!(pragma("journal_mode"), r#"Text("wal")"#);
            assert_eq!(pragma("synchronous"), "Integer(2)");
        }
        assert_eq!(get(&store, b"k"), Some(b"v".to_vec()));
        assert_eq!(decode_i128(&get(&store, b"n").unwrap()).unwrap(), 42);
        assert_eq!(get(&store, b"uncommitted"), None);
    }

    #[test]
    fn store_sqlite_read_only_reads_what_another_handle_committed() {
        let db = TempDb::new();
        let writer = SqliteStore::open(&db.0).unwrap();
        put(&writer, b"k", b"one");
        let reader = SqliteStore::open_read_only(&db.0).unwrap();
        assert_eq!(get(&reader, b"k"), Some(b"one".to_vec()));
        put(&writer, b"k", b"two");
        assert_eq!(get(&reader, b"k"), Some(b"two".to_vec()));
        // A reader's open transaction does not block the writer (WAL).
        let mut open_read = reader.begin().unwrap();
        assert_eq!(open_read.get(b"k").unwrap(), Some(b"two".to_vec()));
        put(&writer, b"k", b"three");
        assert_eq!(open_read.get(b"k").unwrap(), Some(b"two".to_vec()));
        drop(open_read);
        // Writing through the read-only handle fails at the latest at commit, and applies nothing.
        let mut t = reader.begin().unwrap();
        t.set(b"k", b"from the reader");
        assert!(matches!(t.commit(), Err(StoreError::Unavailable(_))));
        assert_eq!(get(&writer, b"k"), Some(b"three".to_vec()));
    }

    #[test]
    fn store_sqlite_read_only_opens_a_closed_store() {
        let db = TempDb::new();
        put(&SqliteStore::open(&db.0).unwrap(), b"k", b"v");
        let reader = SqliteStore::open_read_only(&db.0).unwrap();
        assert_eq!(get(&reader, b"k"), Some(b"v".to_vec()));
    }

    #[test]
    fn store_sqlite_read_only_refuses_a_missing_or_foreign_file() {
        let db = TempDb::new();
        assert!(SqliteStore::open_read_only(&db.0).is_err());
        std::fs::write(
            &db.0,
            b"not a database, just some bytes that are long enough....",
        )
        .unwrap();
        assert!(matches!(
            SqliteStore::open_read_only(&db.0),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn store_sqlite_second_begin_on_one_thread_fails_instead_of_deadlocking() {
        let db = TempDb::new();
        let store = SqliteStore::open(&db.0).unwrap();
        let first = store.begin().unwrap();
        assert!(matches!(store.begin(), Err(StoreError::Unavailable(_))));
        drop(first);
        store.begin().unwrap();
    }

    #[test]
    fn store_sqlite_two_handles_on_one_file_serialize_increments() {
        let db = TempDb::new();
        let a = SqliteStore::open(&db.0).unwrap();
        let b = SqliteStore::open(&db.0).unwrap();
        std::thread::scope(|s| {
            for store in [&a, &b] {
                s.spawn(move || {
                    for _ in 0..25 {
                        transact(store, &RetryPolicy::default(), |t| {
                            let n = t.get(b"n")?.map_or(Ok(0), |v| decode_i128(&v))?;
                            t.set(b"n", &crate::store::encode_i128(n + 1));
                            Ok(())
                        })
                        .unwrap();
                    }
                });
            }
        });
        assert_eq!(decode_i128(&get(&a, b"n").unwrap()).unwrap(), 50);
    }

    #[test]
    fn store_sqlite_non_blob_value_is_corrupt() {
        let db = TempDb::new();
        let store = SqliteStore::open(&db.0).unwrap();
        store
            .conn
            .lock()
            .unwrap()
            .execute("INSERT INTO kv(k, v) VALUES (x'01', 'text')", [])
            .unwrap();
        let mut t = store.begin().unwrap();
        assert!(matches!(t.get(b"\x01"), Err(StoreError::Corrupt(_))));
    }

    /// Prints the commit latency the module docs quote. Run with `cargo test -p tollgate-core
    /// --profile ci --lib store_sqlite_commit_latency -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn store_sqlite_commit_latency() {
        let db = TempDb::new();
        let store = SqliteStore::open(&db.0).unwrap();
        let keys: Vec<Vec<u8>> = (0..100i64)
            .map(|i| crate::store::keys::spend("bench", "", i))
            .collect();
        let (mut commits, mut statements) = (Vec::new(), Vec::new());
        for round in 0..60u64 {
            let started = Instant::now();
            let mut t = store.begin().unwrap();
            for k in &keys {
                t.add(k, 1_000_000);
            }
            t.set(&crate::store::keys::applied("bench"), &round.to_le_bytes());
            let written = Instant::now();
            t.commit().unwrap();
            let done = Instant::now();
            if round >= 10 {
                statements.push(written - started);
                commits.push(done - started);
            }
        }
        commits.sort();
        statements.sort();
        let n = commits.len();
        println!(
            "sqlite: {n} commits of 100 adds + 1 set at {}: median {:?}, p90 {:?}, max {:?}; \
             statements alone median {:?}",
            db.0.display(),
            commits[n / 2],
            commits[n * 9 / 10],
            commits[n - 1],
            statements[n / 2]
        );
    }
}
