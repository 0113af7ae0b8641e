//! An in-memory [`Store`] with FoundationDB's transaction semantics and injectable faults, for tests and
//! the fleet simulation: code that passes against it has met the conflicts, retries and unknown commit
//! outcomes it will meet on FoundationDB, deterministically.
//!
//! Owns: [`MemStore`] (cloning shares the same store, across threads) and [`Fault`]. Committed state is
//! versioned. A transaction reads a snapshot as of its start (its read version) plus its own writes
//! (sets, clears, range clears and `add` results, merged into range reads too). At commit it conflicts
//! ([`StoreError::Conflict`], nothing applied) if a key or range it read was written by a transaction that
//! committed after its read version; writes (`set`, `clear`, `add`) add no read conflict, so concurrent
//! `add`s to one key all count. A read-only transaction commits without a check, as on FoundationDB. The
//! written keys and ranges of the last [`LOG_LIMIT`] commits are kept for the check; a transaction that
//! read and is older than that gets `Conflict` (FoundationDB's `transaction_too_old`).
//!
//! Fails: only as injected ([`MemStore::inject`]), with `Conflict` as above, and with
//! [`StoreError::Corrupt`] when `add` meets a value longer than 16 bytes. A poisoned lock is recovered
//! (the state is only ever replaced whole, so a panic elsewhere cannot leave it half written).
//!
//! Cost: a commit applies its writes in place when no open transaction holds the old snapshot, and clones
//! the whole map when one does (O(n): fine for tests, not for production); the conflict check is
//! O(reads x writes of newer commits). Reads are O(log n) plus the transaction's own clears.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{decode_i128, encode_i128, KeyValue, Store, StoreError, Transaction};

/// How many recent commits' written keys are kept for conflict checks.
pub const LOG_LIMIT: usize = 10_000;

/// A failure to inject into a [`MemStore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The next commit returns [`StoreError::Unavailable`] and applies nothing.
    FailCommit,
    /// The next commit returns [`StoreError::CommitUnknown`], having been applied (when it would have
    /// succeeded) or not, as given.
    UnknownCommit { applied: bool },
    /// Every commit sleeps this long first, until [`MemStore::clear_faults`].
    SlowCommits(Duration),
    /// Every `begin`, read and commit returns [`StoreError::Unavailable`] until [`MemStore::clear_faults`].
    Down,
}

/// An in-memory store; see the module docs.
#[derive(Clone, Default)]
pub struct MemStore {
    inner: Arc<Mutex<State>>,
}

/// A `[begin, end)` key range; one key `k` is `[k, k + 0x00)`.
type Span = (Vec<u8>, Vec<u8>);

#[derive(Default)]
struct State {
    /// The version of the latest commit.
    version: u64,
    data: Arc<BTreeMap<Vec<u8>, Vec<u8>>>,
    /// What each recent commit wrote, oldest first.
    log: VecDeque<(u64, Vec<Span>)>,
    /// The newest version dropped from `log`: commits at or below it can no longer be checked.
    forgotten: u64,
    next_fault: Option<Fault>,
    slow: Option<Duration>,
    down: bool,
    commits: u64,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    /// Injects `f` (see [`Fault`] for how long each lasts). A later one-shot fault replaces an earlier
    /// one not yet used.
    pub fn inject(&self, f: Fault) {
        let mut s = self.lock();
        match f {
            Fault::FailCommit | Fault::UnknownCommit { .. } => s.next_fault = Some(f),
            Fault::SlowCommits(d) => s.slow = Some(d),
            Fault::Down => s.down = true,
        }
    }

    /// Removes every injected fault, used or not.
    pub fn clear_faults(&self) {
        let mut s = self.lock();
        s.next_fault = None;
        s.slow = None;
        s.down = false;
    }

    /// How many commits have been applied (read-only commits apply nothing and are not counted).
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }

    /// Every committed key and value, in key order.
    pub fn dump(&self) -> Vec<KeyValue> {
        let data = self.lock().data.clone();
        data.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.inner)
    }
}

/// Locks the state, recovering from a poisoned lock: every change to the state is a whole replacement
/// made after all fallible work, so a panicking holder cannot have left it inconsistent.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn down() -> StoreError {
    StoreError::Unavailable("the in-memory store is down (injected)".to_owned())
}

impl Store for MemStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        let s = self.lock();
        if s.down {
            return Err(down());
        }
        Ok(Box::new(MemTransaction {
            store: self.inner.clone(),
            read_version: s.version,
            snapshot: s.data.clone(),
            writes: BTreeMap::new(),
            cleared: Vec::new(),
            reads: Vec::new(),
            written: Vec::new(),
            deferred: None,
        }))
    }
}

/// A transaction's own write to one key, over its snapshot.
#[derive(Debug, Clone)]
enum Pending {
    /// Set (`Some`) or cleared (`None`).
    Value(Option<Vec<u8>>),
    /// Add this to the value committed when the transaction commits. Never inside a range in `cleared`
    /// (an `add` after a range clear becomes a `Value`, a range clear after an `add` removes it).
    Add(i128),
}

struct MemTransaction {
    store: Arc<Mutex<State>>,
    read_version: u64,
    snapshot: Arc<BTreeMap<Vec<u8>, Vec<u8>>>,
    writes: BTreeMap<Vec<u8>, Pending>,
    /// Ranges this transaction cleared; applied before `writes` at commit.
    cleared: Vec<Span>,
    /// Read conflict ranges.
    reads: Vec<Span>,
    /// Write conflict ranges.
    written: Vec<Span>,
    /// An error found by a write, which cannot return one: every later read and the commit return it.
    deferred: Option<StoreError>,
}

fn point(key: &[u8]) -> Span {
    let mut end = Vec::with_capacity(key.len() + 1);
    end.extend_from_slice(key);
    end.push(0);
    (key.to_vec(), end)
}

fn overlaps(a: &Span, b: &Span) -> bool {
    a.0 < b.1 && b.0 < a.1
}

/// Removes the keys in `[begin, end)` from `map` (requires `begin < end`).
fn remove_range<V>(map: &mut BTreeMap<Vec<u8>, V>, begin: &[u8], end: &[u8]) {
    let mut tail = map.split_off(begin);
    let mut rest = tail.split_off(end);
    map.append(&mut rest);
}

impl MemTransaction {
    fn check_readable(&self) -> Result<(), StoreError> {
        if let Some(e) = &self.deferred {
            return Err(e.clone());
        }
        if lock(&self.store).down {
            return Err(down());
        }
        Ok(())
    }

    fn in_cleared(&self, key: &[u8]) -> bool {
        self.cleared
            .iter()
            .any(|(b, e)| b.as_slice() <= key && key < e.as_slice())
    }

    /// The value of a key this transaction wrote, as it reads.
    fn resolve(&self, key: &[u8], p: &Pending) -> Result<Option<Vec<u8>>, StoreError> {
        match p {
            Pending::Value(v) => Ok(v.clone()),
            Pending::Add(delta) => {
                let base = match self.snapshot.get(key) {
                    Some(v) => decode_i128(v)?,
                    None => 0,
                };
                Ok(Some(encode_i128(base.wrapping_add(*delta)).to_vec()))
            }
        }
    }

    /// Applies the writes to `state`, or changes nothing and returns why not.
    fn apply(&self, state: &mut State) -> Result<(), StoreError> {
        // Every fallible step first: resolve adds against the latest committed values.
        let mut puts = Vec::with_capacity(self.writes.len());
        for (k, p) in &self.writes {
            let v = match p {
                Pending::Value(v) => v.clone(),
                Pending::Add(delta) => {
                    let base = match state.data.get(k) {
                        Some(v) => decode_i128(v)?,
                        None => 0,
                    };
                    Some(encode_i128(base.wrapping_add(*delta)).to_vec())
                }
            };
            puts.push((k.clone(), v));
        }
        // Clones the map only when an open transaction still reads the old one.
        let data = Arc::make_mut(&mut state.data);
        for (b, e) in &self.cleared {
            remove_range(data, b, e);
        }
        for (k, v) in puts {
            match v {
                Some(v) => data.insert(k, v),
                None => data.remove(&k),
            };
        }
        state.version += 1;
        state.commits += 1;
        state.log.push_back((state.version, self.written.clone()));
        while state.log.len() > LOG_LIMIT {
            if let Some((v, _)) = state.log.pop_front() {
                state.forgotten = v;
            }
        }
        Ok(())
    }

    /// Whether a commit after this transaction's read version wrote what it read.
    fn conflicts(&self, state: &State) -> bool {
        if self.reads.is_empty() {
            return false;
        }
        if self.read_version < state.forgotten {
            return true;
        }
        state
            .log
            .iter()
            .filter(|(v, _)| *v > self.read_version)
            .any(|(_, spans)| {
                spans
                    .iter()
                    .any(|w| self.reads.iter().any(|r| overlaps(w, r)))
            })
    }

    fn commit_now(&self, state: &mut State) -> Result<(), StoreError> {
        if self.writes.is_empty() && self.cleared.is_empty() {
            return Ok(());
        }
        if self.conflicts(state) {
            return Err(StoreError::Conflict);
        }
        self.apply(state)
    }
}

impl Transaction for MemTransaction {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.check_readable()?;
        self.reads.push(point(key));
        match self.writes.get(key) {
            Some(p) => self.resolve(key, p),
            None if self.in_cleared(key) => Ok(None),
            None => Ok(self.snapshot.get(key).cloned()),
        }
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        self.check_readable()?;
        if begin >= end {
            return Ok(Vec::new());
        }
        let bounds = (Bound::Included(begin), Bound::Excluded(end));
        let mut committed = self
            .snapshot
            .range::<[u8], _>(bounds)
            .filter(|(k, _)| !self.in_cleared(k))
            .peekable();
        let mut own = self.writes.range::<[u8], _>(bounds).peekable();
        let mut out: Vec<KeyValue> = Vec::new();
        while limit == 0 || out.len() < limit {
            let take_own = match (committed.peek(), own.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some((ck, _)), Some((ok, _))) => ok <= ck,
            };
            if take_own {
                if let Some((k, p)) = own.next() {
                    if committed.peek().is_some_and(|(ck, _)| *ck == k) {
                        committed.next();
                    }
                    if let Some(v) = self.resolve(k, p)? {
                        out.push((k.clone(), v));
                    }
                }
            } else if let Some((k, v)) = committed.next() {
                out.push((k.clone(), v.clone()));
            }
        }
        // A read cut short by the limit depends only on the keys up to the last one returned.
        let read_end = match out.last() {
            Some((k, _)) if limit != 0 && out.len() == limit => point(k).1,
            _ => end.to_vec(),
        };
        self.reads.push((begin.to_vec(), read_end));
        Ok(out)
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.writes
            .insert(key.to_vec(), Pending::Value(Some(value.to_vec())));
        self.written.push(point(key));
    }

    fn clear(&mut self, key: &[u8]) {
        self.writes.insert(key.to_vec(), Pending::Value(None));
        self.written.push(point(key));
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin >= end {
            return;
        }
        remove_range(&mut self.writes, begin, end);
        self.cleared.push((begin.to_vec(), end.to_vec()));
        self.written.push((begin.to_vec(), end.to_vec()));
    }

    fn add(&mut self, key: &[u8], delta: i128) {
        let next = match self.writes.get(key) {
            Some(Pending::Value(Some(v))) => match decode_i128(v) {
                Ok(n) => Pending::Value(Some(encode_i128(n.wrapping_add(delta)).to_vec())),
                Err(e) => {
                    self.deferred.get_or_insert(e);
                    return;
                }
            },
            Some(Pending::Value(None)) => Pending::Value(Some(encode_i128(delta).to_vec())),
            Some(Pending::Add(d)) => Pending::Add(d.wrapping_add(delta)),
            None if self.in_cleared(key) => Pending::Value(Some(encode_i128(delta).to_vec())),
            None => Pending::Add(delta),
        };
        self.writes.insert(key.to_vec(), next);
        self.written.push(point(key));
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        if let Some(e) = &self.deferred {
            return Err(e.clone());
        }
        // Let go of the snapshot, so that applying the writes does not copy the map for it.
        self.snapshot = Arc::default();
        let slow = {
            let s = lock(&self.store);
            if s.down {
                return Err(down());
            }
            s.slow
        };
        if let Some(d) = slow {
            std::thread::sleep(d);
        }
        let mut s = lock(&self.store);
        if s.down {
            return Err(down());
        }
        match s.next_fault.take() {
            Some(Fault::FailCommit) => Err(StoreError::Unavailable(
                "the commit failed (injected)".to_owned(),
            )),
            Some(Fault::UnknownCommit { applied }) => {
                if applied {
                    // Whether it applied or conflicted, the caller cannot tell.
                    let _ = self.commit_now(&mut s);
                }
                Err(StoreError::CommitUnknown)
            }
            _ => self.commit_now(&mut s),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::store::conformance;

    #[test]
    fn store_mem_passes_conformance() {
        conformance::run(&MemStore::new()).unwrap();
    }

    #[test]
    fn store_mem_passes_overlapping_conformance() {
        conformance::run_overlapping(&MemStore::new()).unwrap();
    }

    #[test]
    fn store_mem_passes_fault_conformance() {
        conformance::run_faults(&MemStore::new()).unwrap();
    }

    #[test]
    fn store_mem_old_transaction_that_read_conflicts_once_the_log_moved_on() {
        let store = MemStore::new();
        let mut old = store.begin().unwrap();
        old.get(b"x").unwrap();
        for i in 0..=LOG_LIMIT as u64 {
            let mut t = store.begin().unwrap();
            t.set(format!("k{i}").as_bytes(), b"v");
            t.commit().unwrap();
        }
        old.set(b"y", b"1");
        assert_eq!(old.commit(), Err(StoreError::Conflict));
        // A blind write of the same age has nothing to conflict with.
        let mut blind = store.begin().unwrap();
        blind.set(b"y", b"1");
        blind.commit().unwrap();
        assert_eq!(store.commits(), LOG_LIMIT as u64 + 2);
    }

    #[test]
    fn store_mem_clones_share_one_store() {
        let a = MemStore::new();
        let b = a.clone();
        let mut t = a.begin().unwrap();
        t.set(b"k", b"v");
        t.commit().unwrap();
        assert_eq!(b.dump(), vec![(b"k".to_vec(), b"v".to_vec())]);
    }

    #[test]
    fn store_mem_add_over_a_long_value_is_corrupt_and_applies_nothing() {
        let store = MemStore::new();
        let mut t = store.begin().unwrap();
        t.set(b"k", &[1u8; 17]);
        t.commit().unwrap();
        let mut t = store.begin().unwrap();
        t.add(b"k", 1);
        t.set(b"other", b"v");
        assert!(matches!(t.get(b"k"), Err(StoreError::Corrupt(_))));
        assert!(matches!(t.commit(), Err(StoreError::Corrupt(_))));
        assert_eq!(store.dump().len(), 1);
    }
}
