//! The catalog: what the control plane's API defines (policies, budgets, service tokens and price
//! overrides) as versioned objects in the store the ledger uses, beside what the configuration file
//! defines.
//!
//! Owns: [`Kind`], [`Object`] (one versioned object), [`read`] (the whole catalog at one version),
//! [`write()`] (one transaction that checks each change's precondition, runs the one validator over the
//! file plus every object as they would be, writes the objects, raises the catalog version, appends the
//! audit entry and keeps the idempotency answer), [`version`] (the key every gateway watches), and
//! [`Role`]. [`effective`] builds a gateway's configuration from the file and the catalog; [`tokens`] holds
//! service tokens made through the API; [`audit`] is the append-only audit log.
//!
//! Coexistence with the file: a name the file defines (a `[[policies]]`, `[[budgets]]`, a
//! `[[pricing.overrides]]` entry's `name`, a token in `service-tokens.json`) is owned by the file; a write
//! to it is refused with [`CatalogError::OwnedByFile`], never applied beside it. Objects the API made are
//! appended after the file's own, in name order, so the file's entries keep their indexes in messages.
//!
//! Fails: [`CatalogError`], one variant per reason an API caller can act on (a precondition, a missing
//! object, a name the file owns, a validation issue naming the field, the store). Store conflicts are
//! retried by [`transact`]. Cost: a write reads the whole catalog (tens of
//! objects; one range read) and validates the whole configuration once: about a millisecond, control side
//! only; the data plane never reads the catalog on a request.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use crate::store::{decode_i128, encode_i128, keys, transact, RetryPolicy, Store, StoreError};

pub mod audit;
pub mod effective;
pub mod object;
pub mod tokens;

pub use object::{
    Actor, Answer, CatalogError, Change, FieldIssue, Idempotency, Kind, Object, Precondition, Role,
    Snapshot, Written,
};

/// The catalog version in `store` (0 before the first change).
pub fn version(store: &dyn Store) -> Result<u64, StoreError> {
    transact(store, &RetryPolicy::default(), |txn| read_version(txn))
}

fn read_version(txn: &mut dyn crate::store::Transaction) -> Result<u64, StoreError> {
    match txn.get(&keys::catalog_version())? {
        None => Ok(0),
        Some(v) => u64::try_from(decode_i128(&v)?)
            .map_err(|_| StoreError::Corrupt("a negative catalog version".to_owned())),
    }
}

fn read_all(txn: &mut dyn crate::store::Transaction) -> Result<Snapshot, StoreError> {
    let version = read_version(txn)?;
    let (b, e) = keys::catalog_objects();
    let mut objects = BTreeMap::new();
    for (k, v) in txn.get_range(&b, &e, 0)? {
        let (kind, name) = keys::parse_catalog_object(&k)?;
        let o: Object = serde_json::from_slice(&v)
            .map_err(|e| StoreError::Corrupt(format!("catalog object {kind}/{name}: {e}")))?;
        objects.insert((o.kind, name), o);
    }
    Ok(Snapshot { version, objects })
}

/// The whole catalog, consistent as of one version.
pub fn read(store: &dyn Store) -> Result<Snapshot, StoreError> {
    transact(store, &RetryPolicy::default(), |txn| read_all(txn))
}

/// The stored answer for an idempotency key, if any.
fn read_answer(
    txn: &mut dyn crate::store::Transaction,
    key: &str,
) -> Result<Option<Answer>, StoreError> {
    match txn.get(&keys::idempotency(key))? {
        None => Ok(None),
        Some(v) => serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("idempotency answer: {e}"))),
    }
}

/// Builds a create's stored answer (status and body) from the objects it wrote.
pub type AnswerFn = dyn Fn(&[Option<Object>]) -> (u16, serde_json::Value);

/// One write: the changes, who makes them, what the audit entry says, and how to validate.
pub struct WriteRequest<'a> {
    pub changes: Vec<Change>,
    pub actor: &'a Actor,
    /// `create`, `update`, `delete`, `revoke`, `rotate`: for the audit log.
    pub action: &'a str,
    pub idempotency: Option<&'a Idempotency>,
    /// Builds the answer stored for the idempotency key from the written objects (status, body); secrets
    /// must not be in it.
    pub answer: &'a AnswerFn,
    /// The one validator: the file and every object as they would be after the change; issues per
    /// changed object. [`effective::Validator`] is the gateway's.
    pub validate: &'a dyn Fn(&Snapshot) -> Result<(), CatalogError>,
    /// Names the file owns, per kind, with the file's name.
    pub file_owned: &'a dyn Fn(Kind, &str) -> Option<String>,
}

impl std::fmt::Debug for WriteRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteRequest")
            .field("changes", &self.changes)
            .field("action", &self.action)
            .finish_non_exhaustive()
    }
}

/// Applies `req` in one serializable transaction: every precondition holds and the result validates, or
/// nothing is written. Blocks on the store: call it off the data-plane cores.
pub fn write(store: &dyn Store, req: &WriteRequest<'_>) -> Result<Written, CatalogError> {
    for c in &req.changes {
        if let Some(file) = (req.file_owned)(c.kind, &c.name) {
            return Err(CatalogError::OwnedByFile {
                kind: c.kind,
                name: c.name.clone(),
                file,
            });
        }
    }
    let now = Timestamp::now();
    // The body's own errors travel out through this slot: `transact` retries only store errors.
    let mut refused: Option<CatalogError> = None;
    let out = transact(store, &RetryPolicy::default(), |txn| {
        refused = None;
        if let Some(idem) = req.idempotency {
            if let Some(a) = read_answer(txn, &idem.key)? {
                if a.digest != idem.digest {
                    refused = Some(CatalogError::IdempotencyMismatch);
                    return Ok(None);
                }
                return Ok(Some(Written::Replayed(a)));
            }
        }
        let mut snap = read_all(txn)?;
        let next = snap.version + 1;
        let mut written = Vec::with_capacity(req.changes.len());
        for c in &req.changes {
            let key = (c.kind, c.name.clone());
            let current = snap.objects.get(&key);
            let failed = match (c.precondition, current) {
                (Precondition::Version(v), Some(o)) if o.version != v => {
                    Some(CatalogError::VersionMismatch {
                        kind: c.kind,
                        name: c.name.clone(),
                        expected: v,
                        current: o.version,
                    })
                }
                (Precondition::Version(_) | Precondition::Exists, None) => {
                    Some(CatalogError::NotFound {
                        kind: c.kind,
                        name: c.name.clone(),
                    })
                }
                (Precondition::Absent, Some(_)) => Some(CatalogError::Exists {
                    kind: c.kind,
                    name: c.name.clone(),
                }),
                (Precondition::None, None) if c.spec.is_none() => Some(CatalogError::NotFound {
                    kind: c.kind,
                    name: c.name.clone(),
                }),
                _ => None,
            };
            if let Some(e) = failed {
                refused = Some(e);
                return Ok(None);
            }
            let before = current.cloned();
            let after = c.spec.as_ref().map(|spec| Object {
                kind: c.kind,
                name: c.name.clone(),
                version: next,
                created_at: before.as_ref().map_or(now, |b| b.created_at),
                updated_at: now,
                updated_by: req.actor.principal.clone(),
                spec: spec.clone(),
            });
            match &after {
                Some(o) => snap.objects.insert(key, o.clone()),
                None => snap.objects.remove(&key),
            };
            written.push((before, after));
        }
        snap.version = next;
        if let Err(e) = (req.validate)(&snap) {
            refused = Some(e);
            return Ok(None);
        }
        for (before, after) in &written {
            match (before, after) {
                (_, Some(o)) => txn.set(
                    &keys::catalog_object(o.kind.as_str(), &o.name),
                    &json_bytes(o)?,
                ),
                (Some(b), None) => txn.clear(&keys::catalog_object(b.kind.as_str(), &b.name)),
                (None, None) => {}
            }
        }
        txn.set(&keys::catalog_version(), &encode_i128(i128::from(next)));
        let objects: Vec<Option<Object>> = written.iter().map(|(_, a)| a.clone()).collect();
        for (before, after) in &written {
            let (kind, name) = match (before, after) {
                (_, Some(o)) | (Some(o), None) => (o.kind, o.name.clone()),
                (None, None) => continue,
            };
            audit::append(
                txn,
                &audit::Entry {
                    seq: 0,
                    at: now,
                    actor: req.actor.clone(),
                    action: req.action.to_owned(),
                    kind: Some(kind),
                    name: Some(name),
                    outcome: 200,
                    version: Some(next),
                    before: before.as_ref().map(audit::redacted),
                    after: after.as_ref().map(audit::redacted),
                    detail: None,
                },
            )?;
        }
        if let Some(idem) = req.idempotency {
            let (status, body) = (req.answer)(&objects);
            let a = Answer {
                digest: idem.digest.clone(),
                status,
                body,
            };
            txn.set(&keys::idempotency(&idem.key), &json_bytes(&a)?);
        }
        Ok(Some(Written::Applied {
            version: next,
            objects,
        }))
    })?;
    match (out, refused) {
        (Some(w), _) => Ok(w),
        (None, Some(e)) => Err(e),
        (None, None) => Err(CatalogError::Store(StoreError::Corrupt(
            "a catalog write ended without an outcome".to_owned(),
        ))),
    }
}

fn json_bytes<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt(format!("encoding JSON: {e}")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::store::mem::MemStore;

    fn actor() -> Actor {
        Actor {
            principal: "token:admin".into(),
            role: Some(Role::Admin),
            from: "127.0.0.1".into(),
        }
    }

    fn put(
        store: &dyn Store,
        name: &str,
        spec: serde_json::Value,
        pre: Precondition,
        idem: Option<&Idempotency>,
    ) -> Result<Written, CatalogError> {
        let a = actor();
        write(
            store,
            &WriteRequest {
                changes: vec![Change {
                    kind: Kind::Policy,
                    name: name.into(),
                    spec: Some(spec),
                    precondition: pre,
                }],
                actor: &a,
                action: "create",
                idempotency: idem,
                answer: &|objs| (201, serde_json::to_value(&objs[0]).unwrap()),
                validate: &|_| Ok(()),
                file_owned: &|_, n| (n == "from-file").then(|| "gateway.toml".to_owned()),
            },
        )
    }

    #[test]
    fn versions_rise_and_if_match_picks_one_winner() {
        let store = MemStore::new();
        assert_eq!(version(&store).unwrap(), 0);
        let Written::Applied { version: v1, .. } = put(
            &store,
            "p",
            serde_json::json!({"a": 1}),
            Precondition::Absent,
            None,
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(v1, 1);
        assert!(matches!(
            put(
                &store,
                "p",
                serde_json::json!({}),
                Precondition::Absent,
                None
            ),
            Err(CatalogError::Exists { .. })
        ));
        // Two writers that both read version 1: the first wins, the second is told the version moved.
        put(
            &store,
            "p",
            serde_json::json!({"a": 2}),
            Precondition::Version(1),
            None,
        )
        .unwrap();
        let lost = put(
            &store,
            "p",
            serde_json::json!({"a": 3}),
            Precondition::Version(1),
            None,
        );
        assert!(
            matches!(lost, Err(CatalogError::VersionMismatch { current: 2, .. })),
            "{lost:?}"
        );
        let snap = read(&store).unwrap();
        assert_eq!(snap.version, 2);
        assert_eq!(snap.of(Kind::Policy).next().unwrap().spec["a"], 2);
        assert_eq!(audit::list(&store, 0, 10).unwrap().len(), 2);
    }

    #[test]
    fn the_file_owns_its_names() {
        let store = MemStore::new();
        let r = put(
            &store,
            "from-file",
            serde_json::json!({}),
            Precondition::None,
            None,
        );
        assert!(matches!(r, Err(CatalogError::OwnedByFile { .. })), "{r:?}");
        assert_eq!(version(&store).unwrap(), 0);
    }

    #[test]
    fn an_idempotency_key_replays_its_answer_and_refuses_another_request() {
        let store = MemStore::new();
        let k = Idempotency {
            key: "k1".into(),
            digest: "d1".into(),
        };
        put(
            &store,
            "p",
            serde_json::json!({}),
            Precondition::Absent,
            Some(&k),
        )
        .unwrap();
        let again = put(
            &store,
            "p",
            serde_json::json!({}),
            Precondition::Absent,
            Some(&k),
        )
        .unwrap();
        assert!(
            matches!(again, Written::Replayed(Answer { status: 201, .. })),
            "{again:?}"
        );
        let other = Idempotency {
            key: "k1".into(),
            digest: "d2".into(),
        };
        assert!(matches!(
            put(
                &store,
                "q",
                serde_json::json!({}),
                Precondition::Absent,
                Some(&other)
            ),
            Err(CatalogError::IdempotencyMismatch)
        ));
        assert_eq!(version(&store).unwrap(), 1);
    }

    #[test]
    fn a_failed_validation_writes_nothing() {
        let store = MemStore::new();
        let a = actor();
        let r = write(
            &store,
            &WriteRequest {
                changes: vec![Change {
                    kind: Kind::Budget,
                    name: "b".into(),
                    spec: Some(serde_json::json!({})),
                    precondition: Precondition::None,
                }],
                actor: &a,
                action: "create",
                idempotency: None,
                answer: &|_| (201, serde_json::Value::Null),
                validate: &|_| {
                    Err(CatalogError::Invalid {
                        kind: Kind::Budget,
                        name: "b".into(),
                        issues: vec![],
                    })
                },
                file_owned: &|_, _| None,
            },
        );
        assert!(matches!(r, Err(CatalogError::Invalid { .. })));
        assert_eq!(read(&store).unwrap(), Snapshot::default());
        assert!(audit::list(&store, 0, 10).unwrap().is_empty());
    }
}
