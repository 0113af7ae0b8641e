//! The checks every [`Store`] implementation must pass, run the same way against each (the in-memory
//! store, SQLite, and FoundationDB later), so that code written against the trait means the same on all.
//!
//! Owns: [`run`] (what every store must do, including two threads incrementing one key through
//! [`transact`]), [`run_overlapping`] and [`run_serializable`] (two transactions open at once on one
//! thread: snapshot reads and conflict detection; SQLite's single connection serializes transactions and
//! cannot run these) and [`run_faults`] (the in-memory store's injected faults against the retry loop).
//!
//! Two conflict semantics are checked, each by name. [`run_overlapping`]: FoundationDB's optimistic check
//! (and [`MemStore`]'s): a transaction conflicts when a key or range it read was written by a
//! transaction that committed after it began, and `add` never conflicts. [`run_serializable`]:
//! PostgreSQL's serializable snapshot isolation, which conflicts only when no serial order explains the
//! committed transactions (so a read that a later commit overwrote may commit, ordered first; and it may
//! conflict anyway, since PostgreSQL tracks reads by index page), and under which two overlapping
//! transactions that add to one key conflict, the retry loop counting both. Both sets check what the
//! fleet relies on: write skew (each transaction reads what the other writes, as two nodes' lease grants
//! do) never commits twice. Each check writes only
//! under its own tuple prefix `("conformance", check)`, which it clears first, so a store holding other
//! data can be checked.
//!
//! Fails: returns the first failed check as a message naming the check; never panics, so it can run
//! outside tests (against a live FoundationDB cluster).
//!
//! Cost: a few hundred small transactions per run; milliseconds in memory, well under a second on SQLite
//! on a local disk (each commit is an fsync).

use std::time::{Duration, Instant};

use super::keys::{self, Scratch};
use super::mem::{Fault, MemStore};
use super::{decode_i128, encode_i128, transact, KeyValue, RetryPolicy, Store, StoreError};

type Check = Result<(), String>;

/// A named check of any store.
type StoreCheck<'a> = (&'a str, fn(&dyn Store, &Keys) -> Check);

/// A named check of the in-memory store's faults.
type FaultCheck<'a> = (&'a str, fn(&MemStore, &Keys) -> Check);

/// Runs every check that any store must pass.
pub fn run(store: &dyn Store) -> Check {
    let checks: [StoreCheck; 12] = [
        ("absent", absent),
        ("set_get", set_get),
        ("overwrite", overwrite),
        ("clear", clear),
        ("clear_range", clear_range),
        ("get_range", get_range),
        ("own_writes_in_ranges", own_writes_in_ranges),
        ("dropped", dropped),
        ("add", add),
        ("add_accumulates", add_accumulates),
        ("concurrent_increments", concurrent_increments),
        ("idempotent_batch", idempotent_batch),
    ];
    for (name, check) in checks {
        run_one(store, name, check)?;
    }
    Ok(())
}

/// Runs the checks that hold two transactions open at once on one thread. A store that serializes its
/// transactions (one at a time, as [`super::sqlite::SqliteStore`] does) is trivially serializable and
/// cannot run them: it would wait on itself.
/// These are FoundationDB's optimistic semantics (see the module docs); a store with serializable
/// snapshot isolation runs [`run_serializable`] instead.
pub fn run_overlapping(store: &dyn Store) -> Check {
    let checks: [StoreCheck; 6] = [
        ("snapshot", snapshot),
        ("read_conflict", read_conflict),
        ("range_conflict", range_conflict),
        ("add_no_conflict", add_no_conflict),
        ("write_skew", write_skew),
        ("range_write_skew", range_write_skew),
    ];
    for (name, check) in checks {
        run_one(store, name, check)?;
    }
    Ok(())
}

/// Runs the checks of two transactions open at once for a store with serializable snapshot isolation
/// (PostgreSQL): the differences from [`run_overlapping`] are `stale_read` (a read overwritten by a later
/// commit may commit, if its outcome is the serial order reader first) and `add_conflict` (overlapping
/// adds to one key conflict; [`transact`] retries and both count), in place of `read_conflict`,
/// `range_conflict` and `add_no_conflict`.
pub fn run_serializable(store: &dyn Store) -> Check {
    let checks: [StoreCheck; 5] = [
        ("snapshot", snapshot),
        ("stale_read", stale_read),
        ("add_conflict", add_conflict),
        ("write_skew", write_skew),
        ("range_write_skew", range_write_skew),
    ];
    for (name, check) in checks {
        run_one(store, name, check)?;
    }
    Ok(())
}

/// Runs the fault checks against the in-memory store's injected faults; clears the faults after.
pub fn run_faults(store: &MemStore) -> Check {
    let checks: [FaultCheck; 5] = [
        ("fail_commit", fail_commit),
        ("unknown_applied", |s, k| unknown_commit(s, k, true)),
        ("unknown_not_applied", |s, k| unknown_commit(s, k, false)),
        ("down", down),
        ("slow", slow),
    ];
    for (name, check) in checks {
        let keys = Keys::new(store, name)?;
        let result = check(store, &keys);
        store.clear_faults();
        result.map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

fn run_one(store: &dyn Store, name: &str, check: fn(&dyn Store, &Keys) -> Check) -> Check {
    let keys = Keys::new(store, name)?;
    check(store, &keys).map_err(|e| format!("{} store, check {name}: {e}", store.kind()))
}

/// The keys of one check, under `("conformance", check)` ([`keys::conformance`]).
struct Keys {
    check: String,
}

impl Keys {
    /// Clears the check's keys and returns them.
    fn new(store: &dyn Store, check: &str) -> Result<Keys, String> {
        let keys = Keys {
            check: check.to_owned(),
        };
        let (begin, end) = keys.all();
        let mut t = store.begin().ctx("begin to clear")?;
        t.clear_range(&begin, &end);
        t.commit().ctx("commit the clear")?;
        Ok(keys)
    }

    /// The key `n` of this check.
    fn k(&self, n: i64) -> Vec<u8> {
        keys::conformance(&self.check, Scratch::Numbered(n))
    }

    /// The named key of this check.
    fn named(&self, name: &str) -> Vec<u8> {
        keys::conformance(&self.check, Scratch::Named(name))
    }

    /// Every key of this check.
    fn all(&self) -> (Vec<u8>, Vec<u8>) {
        keys::conformance_range(&self.check)
    }
}

trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, String>;
}

impl<T> Ctx<T> for Result<T, StoreError> {
    fn ctx(self, what: &str) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: T, want: T) -> Check {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn v(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn set_committed(store: &dyn Store, pairs: &[(&[u8], &[u8])]) -> Check {
    let mut t = store.begin().ctx("begin")?;
    for (k, v) in pairs {
        t.set(k, v);
    }
    t.commit().ctx("commit")
}

fn read(store: &dyn Store, key: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut t = store.begin().ctx("begin")?;
    let value = t.get(key).ctx("get")?;
    t.commit().ctx("commit a read")?;
    Ok(value)
}

fn read_counter(store: &dyn Store, key: &[u8]) -> Result<i128, String> {
    match read(store, key)? {
        Some(v) => decode_i128(&v).ctx("decode"),
        None => Ok(0),
    }
}

fn read_all(store: &dyn Store, keys: &Keys) -> Result<Vec<KeyValue>, String> {
    let (begin, end) = keys.all();
    let mut t = store.begin().ctx("begin")?;
    let kvs = t.get_range(&begin, &end, 0).ctx("get_range")?;
    t.commit().ctx("commit a read")?;
    Ok(kvs)
}

fn absent(store: &dyn Store, keys: &Keys) -> Check {
    expect_eq("get of an absent key", read(store, &keys.k(1))?, None)
}

fn set_get(store: &dyn Store, keys: &Keys) -> Check {
    let mut t = store.begin().ctx("begin")?;
    t.set(&keys.k(1), b"one");
    expect_eq(
        "a transaction reads its own set",
        t.get(&keys.k(1)).ctx("get")?,
        Some(v("one")),
    )?;
    t.commit().ctx("commit")?;
    expect_eq("get after commit", read(store, &keys.k(1))?, Some(v("one")))?;
    set_committed(store, &[(&keys.k(2), b"")])?;
    expect_eq("an empty value", read(store, &keys.k(2))?, Some(vec![]))
}

fn overwrite(store: &dyn Store, keys: &Keys) -> Check {
    set_committed(store, &[(&keys.k(1), b"first")])?;
    set_committed(store, &[(&keys.k(1), b"second")])?;
    expect_eq(
        "a committed overwrite",
        read(store, &keys.k(1))?,
        Some(v("second")),
    )?;
    let mut t = store.begin().ctx("begin")?;
    t.set(&keys.k(1), b"third");
    t.set(&keys.k(1), b"fourth");
    expect_eq(
        "an overwrite in one transaction",
        t.get(&keys.k(1)).ctx("get")?,
        Some(v("fourth")),
    )?;
    t.commit().ctx("commit")?;
    expect_eq(
        "the last write wins",
        read(store, &keys.k(1))?,
        Some(v("fourth")),
    )
}

fn clear(store: &dyn Store, keys: &Keys) -> Check {
    set_committed(store, &[(&keys.k(1), b"x"), (&keys.k(2), b"y")])?;
    let mut t = store.begin().ctx("begin")?;
    t.clear(&keys.k(1));
    expect_eq(
        "a transaction reads its own clear",
        t.get(&keys.k(1)).ctx("get")?,
        None,
    )?;
    t.clear(&keys.k(3));
    t.commit().ctx("commit")?;
    expect_eq(
        "get after a committed clear",
        read(store, &keys.k(1))?,
        None,
    )?;
    expect_eq(
        "a neighbour survives a clear",
        read(store, &keys.k(2))?,
        Some(v("y")),
    )?;
    let mut t = store.begin().ctx("begin")?;
    t.set(&keys.k(4), b"z");
    t.clear(&keys.k(4));
    t.commit().ctx("commit")?;
    expect_eq(
        "a set then cleared in one transaction",
        read(store, &keys.k(4))?,
        None,
    )
}

fn clear_range(store: &dyn Store, keys: &Keys) -> Check {
    let base = keys.named("r");
    let key = |suffix: &[u8]| [base.as_slice(), suffix].concat();
    let all: Vec<Vec<u8>> = [
        &[1u8][..],
        &[2],
        &[2, 0],
        &[2, 0xff, 0xff],
        &[3],
        &[3, 0],
        &[4],
    ]
    .iter()
    .map(|s| key(s))
    .collect();
    let mut t = store.begin().ctx("begin")?;
    for k in &all {
        t.set(k, b"v");
    }
    t.commit().ctx("commit")?;
    let mut t = store.begin().ctx("begin")?;
    t.clear_range(&key(&[2]), &key(&[3]));
    // An empty and a reversed range clear nothing.
    t.clear_range(&key(&[4]), &key(&[4]));
    t.clear_range(&key(&[4]), &key(&[1]));
    t.commit().ctx("commit")?;
    let left: Vec<Vec<u8>> = read_all(store, keys)?.into_iter().map(|(k, _)| k).collect();
    expect_eq(
        "clear_range removes [begin, end) exactly",
        left,
        vec![key(&[1]), key(&[3]), key(&[3, 0]), key(&[4])],
    )
}

fn get_range(store: &dyn Store, keys: &Keys) -> Check {
    let mut t = store.begin().ctx("begin")?;
    for n in [5, -3, 300, 0, 2, -70000, 1] {
        t.set(&keys.k(n), n.to_string().as_bytes());
    }
    t.commit().ctx("commit")?;
    let want: Vec<KeyValue> = [-70000, -3, 0, 1, 2, 5, 300]
        .iter()
        .map(|n| (keys.k(*n), n.to_string().into_bytes()))
        .collect();
    let (begin, end) = keys.all();
    let mut t = store.begin().ctx("begin")?;
    expect_eq(
        "an unlimited range, ascending",
        t.get_range(&begin, &end, 0).ctx("get_range")?,
        want.clone(),
    )?;
    expect_eq(
        "a limit of 3",
        t.get_range(&begin, &end, 3).ctx("get_range")?,
        want[..3].to_vec(),
    )?;
    expect_eq(
        "a limit above the count",
        t.get_range(&begin, &end, 100).ctx("get_range")?,
        want.clone(),
    )?;
    expect_eq(
        "[k(0), k(5)) excludes its end",
        t.get_range(&keys.k(0), &keys.k(5), 0).ctx("get_range")?,
        want[2..5].to_vec(),
    )?;
    expect_eq(
        "an empty range",
        t.get_range(&keys.k(1), &keys.k(1), 0).ctx("get_range")?,
        vec![],
    )?;
    expect_eq(
        "a reversed range",
        t.get_range(&keys.k(5), &keys.k(1), 0).ctx("get_range")?,
        vec![],
    )?;
    t.commit().ctx("commit a read")
}

fn own_writes_in_ranges(store: &dyn Store, keys: &Keys) -> Check {
    set_committed(
        store,
        &[
            (&keys.k(1), b"c1"),
            (&keys.k(3), b"c3"),
            (&keys.k(5), b"c5"),
            (&keys.k(7), b"c7"),
            (&keys.k(8), b"c8"),
        ],
    )?;
    let (begin, end) = keys.all();
    let mut t = store.begin().ctx("begin")?;
    t.set(&keys.k(1), b"t1");
    t.set(&keys.k(2), b"t2");
    t.clear(&keys.k(3));
    t.add(&keys.k(6), 9);
    t.clear_range(&keys.k(7), &keys.k(9));
    t.set(&keys.k(8), b"t8");
    let want = vec![
        (keys.k(1), v("t1")),
        (keys.k(2), v("t2")),
        (keys.k(5), v("c5")),
        (keys.k(6), encode_i128(9).to_vec()),
        (keys.k(8), v("t8")),
    ];
    expect_eq(
        "a range read merges own sets, clears, adds and range clears",
        t.get_range(&begin, &end, 0).ctx("get_range")?,
        want.clone(),
    )?;
    expect_eq(
        "a limited range read counts what the transaction sees",
        t.get_range(&begin, &end, 3).ctx("get_range")?,
        want[..3].to_vec(),
    )?;
    t.commit().ctx("commit")?;
    expect_eq("after commit", read_all(store, keys)?, want)
}

fn dropped(store: &dyn Store, keys: &Keys) -> Check {
    set_committed(store, &[(&keys.k(1), b"kept")])?;
    {
        let mut t = store.begin().ctx("begin")?;
        t.set(&keys.k(1), b"lost");
        t.set(&keys.k(2), b"lost");
        t.add(&keys.k(3), 1);
        let (begin, end) = keys.all();
        t.clear_range(&begin, &end);
    }
    expect_eq(
        "a dropped transaction leaves nothing",
        read_all(store, keys)?,
        vec![(keys.k(1), v("kept"))],
    )
}

fn add(store: &dyn Store, keys: &Keys) -> Check {
    let mut t = store.begin().ctx("begin")?;
    t.add(&keys.k(1), 5);
    expect_eq(
        "add to an absent key reads back",
        t.get(&keys.k(1)).ctx("get")?,
        Some(encode_i128(5).to_vec()),
    )?;
    t.add(&keys.k(1), -8);
    t.set(&keys.k(2), &encode_i128(i128::MAX));
    t.add(&keys.k(2), 1);
    t.set(&keys.k(3), b"x");
    t.clear(&keys.k(3));
    t.add(&keys.k(3), -4);
    t.set(&keys.k(4), &[7]); // a short value counts zero-extended
    t.add(&keys.k(4), 1);
    t.commit().ctx("commit")?;
    expect_eq(
        "add from absent, then a negative delta",
        read_counter(store, &keys.k(1))?,
        -3,
    )?;
    expect_eq(
        "add wraps at i128::MAX",
        read_counter(store, &keys.k(2))?,
        i128::MIN,
    )?;
    expect_eq("add after a clear", read_counter(store, &keys.k(3))?, -4)?;
    expect_eq("add to a short value", read_counter(store, &keys.k(4))?, 8)?;
    expect_eq(
        "add writes 16 bytes",
        read(store, &keys.k(4))?.map(|v| v.len()),
        Some(16),
    )
}

fn add_accumulates(store: &dyn Store, keys: &Keys) -> Check {
    for delta in [2, 3, -10, i128::from(i64::MAX)] {
        let mut t = store.begin().ctx("begin")?;
        t.add(&keys.k(1), delta);
        t.commit().ctx("commit")?;
    }
    expect_eq(
        "adds in four transactions",
        read_counter(store, &keys.k(1))?,
        i128::from(i64::MAX) - 5,
    )
}

/// A retry policy patient enough that contention in a check never exhausts it.
fn patient() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 1000,
        backoff: Duration::from_micros(100),
        max_backoff: Duration::from_millis(10),
    }
}

fn increment(store: &dyn Store, key: &[u8]) -> Result<(), StoreError> {
    transact(store, &patient(), |t| {
        let n = match t.get(key)? {
            Some(v) => decode_i128(&v)?,
            None => 0,
        };
        t.set(key, &encode_i128(n + 1));
        Ok(())
    })
}

fn concurrent_increments(store: &dyn Store, keys: &Keys) -> Check {
    let key = keys.k(1);
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| -> Check {
                    for _ in 0..50 {
                        increment(store, &key).ctx("increment")?;
                    }
                    Ok(())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("a worker panicked".into())))
            .collect()
    });
    for r in results {
        r?;
    }
    expect_eq(
        "two threads' read-modify-write increments, 50 each",
        read_counter(store, &key)?,
        100,
    )
}

/// The ledger's idempotency pattern: apply batch `batch` (add `amount`) unless the last batch applied is
/// already it. Running it twice, or retrying after an unknown commit, counts once.
fn apply_batch(
    store: &dyn Store,
    policy: &RetryPolicy,
    keys: &Keys,
    batch: &str,
    amount: i128,
) -> Result<bool, StoreError> {
    let (last, total) = (keys.named("last_batch"), keys.named("total"));
    transact(store, policy, |t| {
        if t.get(&last)?.as_deref() == Some(batch.as_bytes()) {
            return Ok(false);
        }
        t.add(&total, amount);
        t.set(&last, batch.as_bytes());
        Ok(true)
    })
}

fn idempotent_batch(store: &dyn Store, keys: &Keys) -> Check {
    let policy = RetryPolicy::default();
    let first = apply_batch(store, &policy, keys, "b1", 7).ctx("first")?;
    let again = apply_batch(store, &policy, keys, "b1", 7).ctx("again")?;
    expect_eq("the first application applies", first, true)?;
    expect_eq("the second application skips", again, false)?;
    apply_batch(store, &policy, keys, "b2", 5).ctx("next batch")?;
    expect_eq(
        "counted once each",
        read_counter(store, &keys.named("total"))?,
        12,
    )
}

fn snapshot(store: &dyn Store, keys: &Keys) -> Check {
    set_committed(store, &[(&keys.k(1), b"old")])?;
    let mut reader = store.begin().ctx("begin the reader")?;
    expect_eq("before", reader.get(&keys.k(1)).ctx("get")?, Some(v("old")))?;
    let mut writer = store.begin().ctx("begin the writer")?;
    writer.set(&keys.k(1), b"new");
    writer.set(&keys.k(2), b"new");
    writer.commit().ctx("commit the writer")?;
    expect_eq(
        "a transaction does not see a later commit",
        reader.get(&keys.k(1)).ctx("get")?,
        Some(v("old")),
    )?;
    let (begin, end) = keys.all();
    expect_eq(
        "nor in a range read",
        reader.get_range(&begin, &end, 0).ctx("get_range")?,
        vec![(keys.k(1), v("old"))],
    )?;
    reader.commit().ctx("commit the read-only reader")?;
    expect_eq(
        "a new transaction sees it",
        read(store, &keys.k(1))?,
        Some(v("new")),
    )
}

fn read_conflict(store: &dyn Store, keys: &Keys) -> Check {
    let mut t1 = store.begin().ctx("begin t1")?;
    t1.get(&keys.k(1)).ctx("t1 get")?;
    set_committed(store, &[(&keys.k(1), b"t2")])?;
    t1.set(&keys.k(2), b"t1");
    expect_eq(
        "writing after reading a key another transaction since wrote",
        t1.commit(),
        Err(StoreError::Conflict),
    )?;
    expect_eq(
        "a conflicted commit applies nothing",
        read(store, &keys.k(2))?,
        None,
    )
}

fn range_conflict(store: &dyn Store, keys: &Keys) -> Check {
    let mut t1 = store.begin().ctx("begin t1")?;
    t1.get_range(&keys.k(10), &keys.k(20), 0)
        .ctx("t1 get_range")?;
    set_committed(store, &[(&keys.k(20), b"outside")])?;
    t1.set(&keys.k(1), b"t1");
    t1.commit()
        .ctx("a write outside the range read does not conflict")?;
    let mut t1 = store.begin().ctx("begin t1")?;
    t1.get_range(&keys.k(10), &keys.k(20), 0)
        .ctx("t1 get_range")?;
    set_committed(store, &[(&keys.k(15), b"inside")])?;
    t1.set(&keys.k(2), b"t1");
    expect_eq(
        "a key inserted into a range read",
        t1.commit(),
        Err(StoreError::Conflict),
    )
}

fn add_no_conflict(store: &dyn Store, keys: &Keys) -> Check {
    let mut t1 = store.begin().ctx("begin t1")?;
    t1.add(&keys.k(1), 1);
    let mut t2 = store.begin().ctx("begin t2")?;
    t2.add(&keys.k(1), 2);
    t2.commit().ctx("commit t2")?;
    t1.commit().ctx("add does not conflict with another add")?;
    expect_eq("both adds count", read_counter(store, &keys.k(1))?, 3)
}

/// Exactly one of two commits conflicted, and the other applied.
fn one_of_two(first: Result<(), StoreError>, second: Result<(), StoreError>) -> Check {
    match (&first, &second) {
        (Ok(()), Err(StoreError::Conflict)) | (Err(StoreError::Conflict), Ok(())) => Ok(()),
        _ => Err(format!(
            "exactly one of the two commits must conflict: got {first:?} then {second:?}"
        )),
    }
}

/// Write skew: each transaction reads the key the other writes. Both committing would leave both keys
/// off, which no serial order gives (each would have seen the other's write).
fn write_skew(store: &dyn Store, keys: &Keys) -> Check {
    set_committed(store, &[(&keys.k(1), b"on"), (&keys.k(2), b"on")])?;
    let mut t1 = store.begin().ctx("begin t1")?;
    let mut t2 = store.begin().ctx("begin t2")?;
    expect_eq(
        "t1 reads k2",
        t1.get(&keys.k(2)).ctx("t1 get")?,
        Some(v("on")),
    )?;
    expect_eq(
        "t2 reads k1",
        t2.get(&keys.k(1)).ctx("t2 get")?,
        Some(v("on")),
    )?;
    t1.set(&keys.k(1), b"off");
    t2.set(&keys.k(2), b"off");
    let (first, second) = (t1.commit(), t2.commit());
    one_of_two(first, second)?;
    let offs = read_all(store, keys)?
        .iter()
        .filter(|(_, value)| value == b"off")
        .count();
    expect_eq("keys turned off", offs, 1)
}

/// Two transactions read one range and each inserts a key into it (two nodes granting leases on one
/// budget, each counting the other's lease as absent): the second to commit conflicts.
fn range_write_skew(store: &dyn Store, keys: &Keys) -> Check {
    let mut t1 = store.begin().ctx("begin t1")?;
    let mut t2 = store.begin().ctx("begin t2")?;
    expect_eq(
        "t1 reads an empty range",
        t1.get_range(&keys.k(10), &keys.k(20), 0)
            .ctx("t1 get_range")?,
        vec![],
    )?;
    expect_eq(
        "t2 reads an empty range",
        t2.get_range(&keys.k(10), &keys.k(20), 0)
            .ctx("t2 get_range")?,
        vec![],
    )?;
    t1.set(&keys.k(11), b"t1");
    t2.set(&keys.k(12), b"t2");
    let (first, second) = (t1.commit(), t2.commit());
    one_of_two(first, second)?;
    expect_eq("one insert applied", read_all(store, keys)?.len(), 1)
}

/// Serializable snapshot isolation: t1 reads k1, t2 writes k1 and commits, t1 writes k2. t1 may commit
/// (ordered before t2: it read k1 as it was before t2) or conflict; either way the outcome is serial.
fn stale_read(store: &dyn Store, keys: &Keys) -> Check {
    let mut t1 = store.begin().ctx("begin t1")?;
    expect_eq("t1 reads k1", t1.get(&keys.k(1)).ctx("t1 get")?, None)?;
    set_committed(store, &[(&keys.k(1), b"t2")])?;
    t1.set(&keys.k(2), b"t1");
    match t1.commit() {
        Ok(()) => expect_eq(
            "t1 committed, ordered before t2",
            read_all(store, keys)?,
            vec![(keys.k(1), v("t2")), (keys.k(2), v("t1"))],
        ),
        Err(StoreError::Conflict) => expect_eq(
            "a conflicted commit applies nothing",
            read(store, &keys.k(2))?,
            None,
        ),
        Err(e) => Err(format!("t1's commit: {e}")),
    }
}

/// Serializable snapshot isolation: overlapping adds to one key conflict (unlike FoundationDB's `ADD`,
/// see [`add_no_conflict`]); the retry loop runs the later one again and both count.
fn add_conflict(store: &dyn Store, keys: &Keys) -> Check {
    let mut t1 = store.begin().ctx("begin t1")?;
    // A read starts t1's snapshot before t2 commits.
    t1.get(&keys.k(2)).ctx("t1 get")?;
    t1.add(&keys.k(1), 1);
    let mut t2 = store.begin().ctx("begin t2")?;
    t2.add(&keys.k(1), 2);
    t2.commit().ctx("commit t2")?;
    expect_eq(
        "an add overlapping another add to the same key",
        t1.commit(),
        Err(StoreError::Conflict),
    )?;
    transact(store, &patient(), |t| {
        t.get(&keys.k(2))?;
        t.add(&keys.k(1), 1);
        Ok(())
    })
    .ctx("transact retries the add")?;
    expect_eq("both adds count", read_counter(store, &keys.k(1))?, 3)
}

fn fail_commit(store: &MemStore, keys: &Keys) -> Check {
    let before = store.commits();
    store.inject(Fault::FailCommit);
    let mut t = store.begin().ctx("begin")?;
    t.set(&keys.k(1), b"x");
    match t.commit() {
        Err(StoreError::Unavailable(_)) => {}
        other => return Err(format!("the failed commit returned {other:?}")),
    }
    expect_eq(
        "a failed commit applies nothing",
        read(store, &keys.k(1))?,
        None,
    )?;
    store.inject(Fault::FailCommit);
    transact(store, &RetryPolicy::default(), |t| {
        t.set(&keys.k(1), b"y");
        Ok(())
    })
    .ctx("transact through a failed commit")?;
    expect_eq("the retry applies", read(store, &keys.k(1))?, Some(v("y")))?;
    expect_eq("commits applied", store.commits() - before, 1)
}

fn unknown_commit(store: &MemStore, keys: &Keys, applied: bool) -> Check {
    let policy = RetryPolicy::default();
    apply_batch(store, &policy, keys, "b1", 7).ctx("batch 1")?;
    store.inject(Fault::UnknownCommit { applied });
    let did = apply_batch(store, &policy, keys, "b2", 5).ctx("batch 2")?;
    // Applied: the retry finds its own batch id and skips; not applied: the retry applies it.
    expect_eq("the retry applied the batch", did, !applied)?;
    expect_eq(
        "a batch retried after an unknown commit counts once",
        read_counter(store, &keys.named("total"))?,
        12,
    )
}

fn down(store: &MemStore, keys: &Keys) -> Check {
    store.inject(Fault::Down);
    let policy = RetryPolicy {
        max_attempts: 3,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
    };
    let result = transact(store, &policy, |t| {
        t.set(&keys.k(1), b"x");
        Ok(())
    });
    match result {
        Err(StoreError::RetryLimit { attempts: 3, last })
            if matches!(*last, StoreError::Unavailable(_)) => {}
        other => return Err(format!("transact against a down store returned {other:?}")),
    }
    store.clear_faults();
    transact(store, &policy, |t| {
        t.set(&keys.k(1), b"y");
        Ok(())
    })
    .ctx("transact after recovery")?;
    expect_eq("after recovery", read(store, &keys.k(1))?, Some(v("y")))
}

fn slow(store: &MemStore, keys: &Keys) -> Check {
    let delay = Duration::from_millis(20);
    store.inject(Fault::SlowCommits(delay));
    let started = Instant::now();
    set_committed(store, &[(&keys.k(1), b"x")])?;
    let took = started.elapsed();
    if took < delay {
        return Err(format!("a slowed commit took {took:?}, under {delay:?}"));
    }
    expect_eq(
        "a slow commit applies",
        read(store, &keys.k(1))?,
        Some(v("x")),
    )
}
