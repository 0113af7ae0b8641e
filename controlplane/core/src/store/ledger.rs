//! Spend in the store: the key schema, batched and idempotent writes of settled spend, and reading it back
//! to rebuild budget windows. Written once against [`crate::store`], for every implementation.
//!
//! Keys: `("tg", "schema")`, `("tg", "spend", budget, member, slot)`, `("tg", "estimated", budget, member,
//! slot)` (the part of a slot's spend charged at an estimate after a crash) and `("tg", "applied", source)`, all
//! from [`keys`] (the key schema, its layouts and value encodings, and [`SCHEMA_VERSION`]; `docs/store.md`
//! keeps it for operators).
//!
//! Why slots: the ledger keeps each instance's spend in 15-minute slots for 32 days (every calendar
//! window of every time zone starts on a slot boundary), so the same slots rebuild any window after a
//! restart, and a window changed in the config starts from the right spend.
//!
//! Idempotency: a batch carries, per source, the highest sequence number it covers, and is applied in one
//! transaction that first reads `("tg", "applied", source)`: a batch (or the part of it from one source)
//! already applied is skipped, so a retried commit, or a commit whose outcome was unknown, never counts
//! twice. Entries with a sequence at or below the applied one are dropped.
//!
//! Usage: a batch also carries the usage counters of the settlements it covers (per hour and dimensions,
//! [`crate::store::consumption`]) and the identities they came from; they are written in the same transaction,
//! so they are applied exactly when the spend is: once.
//!
//! Fails: store errors pass through ([`StoreError`]); a schema this binary does not know is refused with a
//! message naming both versions. Cost: one transaction per batch: a read per source, an atomic add per
//! (instance, slot), an atomic add per nonzero measure per (hour, dimensions), a read and a write per
//! identity seen.

use std::collections::BTreeMap;

use jiff::Timestamp;

use crate::pricing::money::Money;
use crate::store::consumption::{self, Seen, UsageCounts};
use crate::store::keys::{self, UsageDims, HOUR_SECS};
use crate::store::{decode_i128, Store, StoreError, Transaction};

pub use crate::store::keys::{SCHEMA_VERSION, SLOT_SECS};

/// One budget instance: the budget's name and the member (`source:subject`), empty for shared instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceName {
    pub budget: String,
    pub member: String,
}

/// Spend merged by instance and slot, and the sequence numbers it covers per source.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batch {
    pub spend: BTreeMap<(InstanceName, i64), i128>,
    /// Per source, the highest sequence number included.
    pub upto: BTreeMap<String, u64>,
    /// The part of `spend` charged at an estimate (reservations a crashed run left open), by instance and
    /// slot: also written to `("tg", "estimated", ..)` so `tollgate spend` can say so.
    pub estimated: BTreeMap<(InstanceName, i64), i128>,
    /// Usage counters merged per (hour, dimensions): written to `("tg", "usage", ..)` in the same
    /// transaction as the spend, under the same `upto` (see [`crate::store::consumption`]).
    pub usage: BTreeMap<(i64, UsageDims), UsageCounts>,
    /// Identities seen in the batch, by identity dimension (merged: earliest first, latest last seen).
    pub seen: BTreeMap<String, Seen>,
}

impl Batch {
    /// Adds `amount` spent at `at` on `instance`, from entry `seq` of `source`.
    pub fn add(
        &mut self,
        source: &str,
        seq: u64,
        instance: InstanceName,
        amount: Money,
        at: Timestamp,
    ) {
        let slot = at.as_second().div_euclid(SLOT_SECS);
        let e = self.spend.entry((instance, slot)).or_insert(0);
        *e = e.wrapping_add(amount.pico());
        self.covers(source, seq);
    }

    /// Marks `amount` at `at` on `instance` (already [`Batch::add`]ed) as charged at an estimate.
    pub fn add_estimate(&mut self, instance: InstanceName, amount: Money, at: Timestamp) {
        let slot = at.as_second().div_euclid(SLOT_SECS);
        let e = self.estimated.entry((instance, slot)).or_insert(0);
        *e = e.wrapping_add(amount.pico());
    }

    /// Adds one request's usage `counts`, settled at `at` with `dims`, from entry `seq` of `source`.
    pub fn add_usage(
        &mut self,
        source: &str,
        seq: u64,
        at: Timestamp,
        dims: UsageDims,
        counts: &UsageCounts,
    ) {
        let hour = at.as_second().div_euclid(HOUR_SECS);
        self.usage.entry((hour, dims)).or_default().add(counts);
        self.covers(source, seq);
    }

    /// Records a sighting of an identity (see [`Seen::merge`]).
    pub fn saw(&mut self, seen: Seen) {
        match self.seen.get_mut(&seen.identity) {
            Some(s) => s.merge(&seen),
            None => {
                self.seen.insert(seen.identity.clone(), seen);
            }
        }
    }

    /// Notes that the batch covers entry `seq` of `source`.
    pub fn covers(&mut self, source: &str, seq: u64) {
        match self.upto.get_mut(source) {
            Some(u) => *u = (*u).max(seq),
            None => {
                self.upto.insert(source.to_owned(), seq);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.spend.is_empty() && self.upto.is_empty() && self.usage.is_empty()
    }
}

/// Checks the store's schema version, writing it into an empty store. Refuses a store written by a newer
/// Tollgate, or one that has data but no version.
pub fn check_schema(
    store: &dyn Store,
    policy: &crate::store::RetryPolicy,
) -> Result<(), StoreError> {
    crate::store::transact(store, policy, |txn| {
        match txn.get(&keys::schema())? {
            Some(v) => {
                let version: i64 = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| {
                        StoreError::Corrupt("the schema version is not a number".into())
                    })?;
                match version.cmp(&SCHEMA_VERSION) {
                    std::cmp::Ordering::Equal => Ok(()),
                    std::cmp::Ordering::Greater => Err(StoreError::Corrupt(format!(
                        "the store was written by a newer Tollgate (schema {version}; this binary reads schema {SCHEMA_VERSION}): upgrade Tollgate, or point [ledger] at another store"
                    ))),
                    // No older schema was ever released: there is nothing to migrate from.
                    std::cmp::Ordering::Less => Err(StoreError::Corrupt(format!(
                        "the store has schema {version}, which no released Tollgate wrote and this binary cannot migrate (it reads schema {SCHEMA_VERSION})"
                    ))),
                }
            }
            None => {
                let (b, e) = keys::root();
                if !txn.get_range(&b, &e, 1)?.is_empty() {
                    return Err(StoreError::Corrupt(
                        "the store has Tollgate data but no schema version".into(),
                    ));
                }
                txn.set(&keys::schema(), SCHEMA_VERSION.to_string().as_bytes());
                Ok(())
            }
        }
    })
}

/// Writes `batch` in `txn`: per source, only if its `upto` is above what was applied; then every spend
/// entry of the sources not yet applied. Returns whether anything was written. Entries cannot be split by
/// source once merged, so a batch is all or nothing: it is skipped only when every source in it was
/// already applied up to its `upto` (a retry of the same batch), and written otherwise.
pub fn apply_batch(txn: &mut dyn Transaction, batch: &Batch) -> Result<bool, StoreError> {
    let mut fresh = false;
    for (source, upto) in &batch.upto {
        let applied = applied(txn, source)?;
        if *upto > applied {
            fresh = true;
            txn.set(&keys::applied(source), &upto.to_le_bytes());
        }
    }
    if !fresh && !batch.upto.is_empty() {
        return Ok(false);
    }
    for ((instance, slot), amount) in &batch.spend {
        txn.add(
            &keys::spend(&instance.budget, &instance.member, *slot),
            *amount,
        );
    }
    for ((instance, slot), amount) in &batch.estimated {
        txn.add(
            &keys::estimated(&instance.budget, &instance.member, *slot),
            *amount,
        );
    }
    for ((hour, dims), counts) in &batch.usage {
        for (measure, value) in counts.measures() {
            if value != 0 {
                txn.add(&keys::usage(*hour, dims, measure), value);
            }
        }
    }
    for seen in batch.seen.values() {
        consumption::write_seen(txn, seen)?;
    }
    Ok(true)
}

/// The last sequence applied from `source` (0 if none).
pub fn applied(txn: &mut dyn Transaction, source: &str) -> Result<u64, StoreError> {
    match txn.get(&keys::applied(source))? {
        Some(v) if v.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v);
            Ok(u64::from_le_bytes(b))
        }
        Some(_) => Err(StoreError::Corrupt(format!(
            "the applied sequence of {source} is malformed"
        ))),
        None => Ok(0),
    }
}

/// Forgets `source` (its journal was replayed and removed).
pub fn forget_source(txn: &mut dyn Transaction, source: &str) {
    txn.clear(&keys::applied(source));
}

/// One stored slot of spend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSpend {
    pub instance: InstanceName,
    /// The slot's start.
    pub slot_start: Timestamp,
    pub amount: Money,
}

/// Every slot of spend at or after `since`, in key order. Reads in pages of 10,000 keys.
pub fn load_since(
    txn: &mut dyn Transaction,
    since: Timestamp,
) -> Result<Vec<SlotSpend>, StoreError> {
    load_slots(txn, since, keys::all_spend(), keys::parse_spend)
}

/// Every slot's spend charged at an estimate (see [`Batch::estimated`]) at or after `since`.
pub fn load_estimated_since(
    txn: &mut dyn Transaction,
    since: Timestamp,
) -> Result<Vec<SlotSpend>, StoreError> {
    load_slots(txn, since, keys::all_estimated(), keys::parse_estimated)
}

type ParseSlot = fn(&[u8]) -> Result<(String, String, i64), StoreError>;

fn load_slots(
    txn: &mut dyn Transaction,
    since: Timestamp,
    (mut begin, end): (Vec<u8>, Vec<u8>),
    parse: ParseSlot,
) -> Result<Vec<SlotSpend>, StoreError> {
    let min_slot = since.as_second().div_euclid(SLOT_SECS);
    let mut out = Vec::new();
    loop {
        let page = txn.get_range(&begin, &end, 10_000)?;
        let Some((last, _)) = page.last() else { break };
        let mut next = last.clone();
        next.push(0);
        for (k, v) in &page {
            let (budget, member, slot) = parse(k)?;
            if slot < min_slot {
                continue;
            }
            let amount = decode_i128(v)?;
            if amount == 0 {
                continue;
            }
            out.push(SlotSpend {
                instance: InstanceName { budget, member },
                slot_start: Timestamp::from_second(slot.saturating_mul(SLOT_SECS))
                    .map_err(|e| StoreError::Corrupt(format!("slot {slot}: {e}")))?,
                amount: Money::from_pico(amount),
            });
        }
        if page.len() < 10_000 {
            break;
        }
        begin = next;
    }
    Ok(out)
}

/// Clears spend slots (and their estimate marks) older than `before` (retention: the ledger never reads
/// them again). Returns the spend slots cleared.
pub fn prune_before(txn: &mut dyn Transaction, before: Timestamp) -> Result<usize, StoreError> {
    let min_slot = before.as_second().div_euclid(SLOT_SECS);
    let mut cleared = 0;
    let (begin, end) = keys::all_spend();
    for (k, _) in txn.get_range(&begin, &end, 0)? {
        if let Ok((_, _, s)) = keys::parse_spend(&k) {
            if s < min_slot {
                txn.clear(&k);
                cleared += 1;
            }
        }
    }
    let (begin, end) = keys::all_estimated();
    for (k, _) in txn.get_range(&begin, &end, 0)? {
        if let Ok((_, _, s)) = keys::parse_estimated(&k) {
            if s < min_slot {
                txn.clear(&k);
            }
        }
    }
    Ok(cleared)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::store::mem::{Fault, MemStore};
    use crate::store::{transact, RetryPolicy};

    fn name(b: &str, m: &str) -> InstanceName {
        InstanceName {
            budget: b.into(),
            member: m.into(),
        }
    }

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn batches_apply_once_even_when_the_commit_outcome_is_unknown() {
        let store = MemStore::new();
        let p = RetryPolicy::default();
        check_schema(&store, &p).unwrap();
        let mut b = Batch::default();
        b.add(
            "run1-c0",
            1,
            name("team", ""),
            Money::from_pico(5),
            t("2026-11-28T12:00:00Z"),
        );
        b.add(
            "run1-c0",
            2,
            name("team", ""),
            Money::from_pico(7),
            t("2026-11-28T12:01:00Z"),
        );
        b.add(
            "run1-c1",
            1,
            name("me", "okta:alice"),
            Money::from_pico(3),
            t("2026-11-28T12:20:00Z"),
        );
        store.inject(Fault::UnknownCommit { applied: true });
        transact(&store, &p, |txn| apply_batch(txn, &b)).unwrap();
        // The same batch again (a retry after a crash between commit and acknowledgement): skipped.
        assert!(!transact(&store, &p, |txn| apply_batch(txn, &b)).unwrap());
        let got = transact(&store, &p, |txn| load_since(txn, t("2026-11-01T00:00:00Z"))).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].instance, name("me", "okta:alice"));
        assert_eq!(got[0].amount, Money::from_pico(3));
        assert_eq!(got[1].amount, Money::from_pico(12));
        assert_eq!(got[1].slot_start, t("2026-11-28T12:00:00Z"));
    }

    #[test]
    fn a_newer_or_unknown_schema_is_refused_with_both_versions() {
        let store = MemStore::new();
        let p = RetryPolicy::default();
        transact(&store, &p, |txn| {
            txn.set(&keys::schema(), b"7");
            Ok(())
        })
        .unwrap();
        let e = check_schema(&store, &p).unwrap_err().to_string();
        assert!(
            e.contains("schema 7") && e.contains("schema 1") && e.contains("newer"),
            "{e}"
        );
        let store = MemStore::new();
        transact(&store, &p, |txn| {
            txn.set(&keys::spend("x", "", 1), &[1]);
            Ok(())
        })
        .unwrap();
        let e = check_schema(&store, &p).unwrap_err().to_string();
        assert!(e.contains("no schema version"), "{e}");
    }

    #[test]
    fn old_slots_are_pruned_and_not_loaded() {
        let store = MemStore::new();
        let p = RetryPolicy::default();
        let mut b = Batch::default();
        b.add(
            "s",
            1,
            name("team", ""),
            Money::from_pico(5),
            t("2026-10-01T00:00:00Z"),
        );
        b.add(
            "s",
            2,
            name("team", ""),
            Money::from_pico(6),
            t("2026-11-28T00:00:00Z"),
        );
        transact(&store, &p, |txn| apply_batch(txn, &b)).unwrap();
        let since = t("2026-10-27T00:00:00Z");
        assert_eq!(
            transact(&store, &p, |txn| load_since(txn, since))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            transact(&store, &p, |txn| prune_before(txn, since)).unwrap(),
            1
        );
        let all = transact(&store, &p, |txn| load_since(txn, t("2000-01-01T00:00:00Z"))).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
    }
}
