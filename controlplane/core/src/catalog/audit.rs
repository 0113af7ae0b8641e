//! The audit log: one entry per change (who, what, when, from where, before and after) and per refused
//! call, in the store beside the catalog, numbered from 1 and never rewritten.
//!
//! Owns: [`Entry`], [`append`] (inside a catalog write's transaction, so a change and its entry commit
//! together or not at all), [`record`] (its own transaction, for refused calls), [`list`] (by number, for
//! cursor pagination) and [`redacted`] (what of an object the log may keep: service tokens lose their
//! hashes; no secret ever reaches the catalog). Fails: with [`StoreError`]. Cost: one read and two writes
//! per entry.

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::object::{Actor, Kind, Object};
use crate::store::{
    decode_i128, encode_i128, keys, transact, RetryPolicy, Store, StoreError, Transaction,
};

/// One audit entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Its number, from 1 (set by [`append`]).
    pub seq: i64,
    pub at: Timestamp,
    pub actor: Actor,
    /// `create`, `update`, `delete`, `revoke`, `rotate`, or `denied`.
    pub action: String,
    pub kind: Option<Kind>,
    pub name: Option<String>,
    /// The HTTP status the call was answered with.
    pub outcome: u16,
    /// The catalog version the change made.
    pub version: Option<u64>,
    pub before: Option<serde_json::Value>,
    pub after: Option<serde_json::Value>,
    /// For a refused call: the method and path, and why.
    pub detail: Option<String>,
}

/// `o` as the audit log keeps it: a service token without its hashes.
pub fn redacted(o: &Object) -> serde_json::Value {
    let mut v = serde_json::to_value(o).unwrap_or(serde_json::Value::Null);
    if o.kind == Kind::ServiceToken {
        if let Some(spec) = v.get_mut("spec").and_then(|s| s.as_object_mut()) {
            spec.remove("hash");
            if let Some(p) = spec.get_mut("previous").and_then(|p| p.as_object_mut()) {
                p.remove("hash");
            }
        }
    }
    v
}

/// Appends `entry` (its `seq` is assigned) inside `txn`.
pub fn append(txn: &mut dyn Transaction, entry: &Entry) -> Result<i64, StoreError> {
    let last = match txn.get(&keys::audit_seq())? {
        None => 0,
        Some(v) => i64::try_from(decode_i128(&v)?)
            .map_err(|_| StoreError::Corrupt("an audit number out of range".to_owned()))?,
    };
    let seq = last + 1;
    let mut e = entry.clone();
    e.seq = seq;
    let bytes =
        serde_json::to_vec(&e).map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))?;
    txn.set(&keys::audit_entry(seq), &bytes);
    txn.set(&keys::audit_seq(), &encode_i128(i128::from(seq)));
    Ok(seq)
}

/// Appends `entry` in its own transaction (a refused call, which changes nothing else).
pub fn record(store: &dyn Store, entry: &Entry) -> Result<i64, StoreError> {
    transact(store, &RetryPolicy::default(), |txn| append(txn, entry))
}

/// Up to `limit` entries numbered above `after`, oldest first.
pub fn list(store: &dyn Store, after: i64, limit: usize) -> Result<Vec<Entry>, StoreError> {
    transact(store, &RetryPolicy::default(), |txn| {
        let (b, e) = keys::audit_entries(after.saturating_add(1), i64::MAX);
        txn.get_range(&b, &e, limit)?
            .into_iter()
            .map(|(_, v)| {
                serde_json::from_slice(&v)
                    .map_err(|e| StoreError::Corrupt(format!("audit entry: {e}")))
            })
            .collect()
    })
}
