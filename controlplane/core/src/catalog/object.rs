//! The catalog's vocabulary: the kinds of object, roles, one versioned [`Object`], a [`Snapshot`] of the
//! whole catalog, a [`Change`] and its [`Precondition`], who makes it ([`Actor`]), idempotency, and
//! [`CatalogError`]. Shared by the catalog's writer (`catalog/mod.rs`), its audit log, its effective
//! configuration and its tokens, so none of them imports another for a type.
//!
//! Fails: nothing here fails. Cost: plain data.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

/// The kinds of object the catalog holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Policy,
    Budget,
    ServiceToken,
    PriceOverride,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Policy,
        Kind::Budget,
        Kind::ServiceToken,
        Kind::PriceOverride,
    ];

    /// As stored in keys and shown in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Policy => "policy",
            Kind::Budget => "budget",
            Kind::ServiceToken => "service_token",
            Kind::PriceOverride => "price_override",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller of the control plane may do, each role including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads objects, live budget state and identities seen.
    Viewer,
    /// And spend queries and the audit log.
    Finance,
    /// And every change.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Finance => "finance",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        [Role::Viewer, Role::Finance, Role::Admin]
            .into_iter()
            .find(|r| r.as_str() == s)
    }
}

/// One object as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Object {
    pub kind: Kind,
    pub name: String,
    /// The catalog version of the transaction that last wrote it: the object's ETag.
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// Who last wrote it (`token:NAME`, `user:SUBJECT`, `cli`).
    pub updated_by: String,
    /// As the configuration file would write it (a `[[budgets]]` entry, say), or for a service token its
    /// [`StoredToken`](super::tokens::StoredToken) (a hash, never the secret).
    pub spec: serde_json::Value,
}

/// The whole catalog as of one version.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub version: u64,
    pub objects: BTreeMap<(Kind, String), Object>,
}

impl Snapshot {
    /// The objects of one kind, in name order.
    pub fn of(&self, kind: Kind) -> impl Iterator<Item = &Object> {
        self.objects
            .range((kind, String::new())..)
            .take_while(move |((k, _), _)| *k == kind)
            .map(|(_, o)| o)
    }
}

/// Who makes a change, for `updated_by` and the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// `token:NAME`, `user:SUBJECT` or `cli`.
    pub principal: String,
    /// The role the call was made with, if it got that far.
    pub role: Option<Role>,
    /// The caller's address, as the server saw it.
    pub from: String,
}

/// What must hold for a change to apply (the API's `If-Match`, or a create's "must not exist").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    None,
    /// The object exists at exactly this version.
    Version(u64),
    /// The object does not exist.
    Absent,
    /// The object exists, at any version.
    Exists,
}

/// One object written or removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub kind: Kind,
    pub name: String,
    /// The new spec, or `None` to remove the object.
    pub spec: Option<serde_json::Value>,
    pub precondition: Precondition,
}

/// A create's `Idempotency-Key` and a digest of its request: a second request with the same key and
/// digest gets the first one's answer; with another digest, [`CatalogError::IdempotencyMismatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    pub digest: String,
}

/// A stored answer to an idempotent create.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub digest: String,
    pub status: u16,
    pub body: serde_json::Value,
}

/// One field's problem, as a problem-details `errors` entry names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldIssue {
    /// Dotted path inside the object (`amount_usd`, `allow_models[1]`); empty for the whole object.
    pub field: String,
    pub reason: String,
}

/// Why a catalog operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CatalogError {
    #[error("no {kind} named {name:?}")]
    NotFound { kind: Kind, name: String },
    #[error("a {kind} named {name:?} already exists")]
    Exists { kind: Kind, name: String },
    #[error("{kind} {name:?} is at version {current}, not {expected}: read it again and retry")]
    VersionMismatch {
        kind: Kind,
        name: String,
        expected: u64,
        current: u64,
    },
    #[error("{kind} {name:?} is defined in {file}; change it there (the API does not edit the file's objects)")]
    OwnedByFile {
        kind: Kind,
        name: String,
        file: String,
    },
    #[error("{kind} {name:?} is invalid")]
    Invalid {
        kind: Kind,
        name: String,
        issues: Vec<FieldIssue>,
    },
    #[error("the Idempotency-Key was used before for a different request")]
    IdempotencyMismatch,
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// What [`write`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// The changes applied at this catalog version; the objects as written (`None` for a removal).
    Applied {
        version: u64,
        objects: Vec<Option<Object>>,
    },
    /// An earlier request with the same idempotency key and digest: its answer.
    Replayed(Answer),
}
