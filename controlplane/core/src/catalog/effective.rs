//! A gateway's effective configuration: the configuration file with the catalog's objects added, checked by
//! the one validator (`Config::try_from`, the same `tollgate check-config` runs), for the gateway at start
//! and at every catalog change, and for the control plane before it writes.
//!
//! Owns: [`Validator`] (the file as read once, the names it owns, and [`Validator::config`], which merges
//! a catalog [`Snapshot`] into the file and validates the whole) and the mapping of the validator's issues
//! (`budgets[3].amount_usd`) back to the object they are about (`budget "ci"`, field `amount_usd`).
//!
//! Order: the file's `[[policies]]`, `[[budgets]]` and `[[pricing.overrides]]` come first, as written; the
//! catalog's follow in name order. Policies apply in that order, so the file's come first.
//!
//! Fails: [`ConfigError`] for the file itself; [`CatalogError::Invalid`] naming the object and field for an
//! object the file and the rest of the catalog do not accept. Cost: one TOML parse and one validation per
//! call (about a millisecond for the quickstart), control side only.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::Timestamp;

use super::object::{CatalogError, FieldIssue, Kind, Snapshot};
use super::tokens::StoredToken;
use crate::auth::identity::RawPolicy;
use crate::auth::service_tokens::{self, ServiceToken};
use crate::budget::RawBudget;
use crate::config::{parse_raw, Located, RawConfig};
use crate::pricing::RawOverride;
use crate::{Config, ConfigError, ConfigIssue};

/// The configuration file as read once, and what it owns.
#[derive(Debug, Clone)]
pub struct Validator {
    path: PathBuf,
    text: String,
    policies: BTreeSet<String>,
    budgets: BTreeSet<String>,
    overrides: BTreeSet<String>,
    /// Names of the tokens in `service-tokens.json` (the CLI's file store).
    tokens: BTreeSet<String>,
}

/// Which catalog object each appended entry came from, per section, by index in the merged lists.
#[derive(Debug, Default)]
struct Origins {
    policies: Vec<(usize, String)>,
    budgets: Vec<(usize, String)>,
    overrides: Vec<(usize, String)>,
}

impl Validator {
    /// Reads the file at `path` (and the token file of its `[store] dir`, for the token names it owns).
    pub fn new(path: &Path) -> Result<Validator, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            issues: vec![ConfigIssue {
                file: path.to_owned(),
                field: String::new(),
                reason: e.to_string(),
            }],
        })?;
        let raw = parse_raw(path, &text)?;
        let tokens = match Config::parse(path, &text) {
            Ok(c) => service_tokens::load(&c.store.dir)
                .map(|f| f.tokens.into_iter().map(|t| t.name).collect())
                .unwrap_or_default(),
            Err(_) => BTreeSet::new(),
        };
        Ok(Validator {
            path: path.to_owned(),
            policies: raw.policies.iter().map(|p| p.name.clone()).collect(),
            budgets: raw.budgets.iter().map(|b| b.name.clone()).collect(),
            overrides: raw
                .pricing
                .overrides
                .iter()
                .filter_map(|o| o.name.clone())
                .collect(),
            tokens,
            text,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's name if it defines `name` of `kind`.
    pub fn file_owned(&self, kind: Kind, name: &str) -> Option<String> {
        let set = match kind {
            Kind::Policy => &self.policies,
            Kind::Budget => &self.budgets,
            Kind::PriceOverride => &self.overrides,
            Kind::ServiceToken => &self.tokens,
        };
        set.contains(name).then(|| self.path.display().to_string())
    }

    /// The names the file owns of `kind`, for listings.
    pub fn file_names(&self, kind: Kind) -> Vec<String> {
        let set = match kind {
            Kind::Policy => &self.policies,
            Kind::Budget => &self.budgets,
            Kind::PriceOverride => &self.overrides,
            Kind::ServiceToken => &self.tokens,
        };
        set.iter().cloned().collect()
    }

    /// The file's raw form of one object it owns, as JSON (`None` if it does not own `name`).
    pub fn file_spec(&self, kind: Kind, name: &str) -> Option<serde_json::Value> {
        let raw = parse_raw(&self.path, &self.text).ok()?;
        let v = match kind {
            Kind::Policy => raw
                .policies
                .into_iter()
                .find(|p| p.name == name)
                .map(serde_json::to_value),
            Kind::Budget => raw
                .budgets
                .into_iter()
                .find(|b| b.name == name)
                .map(serde_json::to_value),
            Kind::PriceOverride => raw
                .pricing
                .overrides
                .into_iter()
                .find(|o| o.name.as_deref() == Some(name))
                .map(serde_json::to_value),
            Kind::ServiceToken => None,
        };
        v.and_then(Result::ok)
    }

    /// The file with `snap`'s objects added, validated: the configuration a gateway runs.
    pub fn config(&self, snap: &Snapshot) -> Result<Config, CatalogError> {
        let mut raw = parse_raw(&self.path, &self.text).map_err(file_error)?;
        let origins = merge(&mut raw, snap)?;
        let mut config = Config::try_from(Located {
            file: &self.path,
            raw,
        })
        .map_err(|e| attribute(e, &origins))?;
        config.service_tokens = Arc::new(data_plane_tokens(snap)?);
        Ok(config)
    }
}

/// A problem in the file itself, reported as an invalid whole.
fn file_error(e: ConfigError) -> CatalogError {
    CatalogError::Invalid {
        kind: Kind::Policy,
        name: String::new(),
        issues: e
            .issues
            .into_iter()
            .map(|i| FieldIssue {
                field: i.field,
                reason: format!("{}: {}", i.file.display(), i.reason),
            })
            .collect(),
    }
}

/// A spec the catalog holds that its kind's raw form does not read (written by another version).
fn unreadable(kind: Kind, name: &str, e: serde_json::Error) -> CatalogError {
    CatalogError::Invalid {
        kind,
        name: name.to_owned(),
        issues: vec![FieldIssue {
            field: String::new(),
            reason: e.to_string(),
        }],
    }
}

fn merge(raw: &mut RawConfig, snap: &Snapshot) -> Result<Origins, CatalogError> {
    let mut o = Origins::default();
    for obj in snap.of(Kind::Policy) {
        let mut p: RawPolicy = serde_json::from_value(obj.spec.clone())
            .map_err(|e| unreadable(Kind::Policy, &obj.name, e))?;
        p.name = obj.name.clone();
        o.policies.push((raw.policies.len(), obj.name.clone()));
        raw.policies.push(p);
    }
    for obj in snap.of(Kind::Budget) {
        let mut b: RawBudget = serde_json::from_value(obj.spec.clone())
            .map_err(|e| unreadable(Kind::Budget, &obj.name, e))?;
        b.name = obj.name.clone();
        o.budgets.push((raw.budgets.len(), obj.name.clone()));
        raw.budgets.push(b);
    }
    for obj in snap.of(Kind::PriceOverride) {
        let mut p: RawOverride = serde_json::from_value(obj.spec.clone())
            .map_err(|e| unreadable(Kind::PriceOverride, &obj.name, e))?;
        p.name = Some(obj.name.clone());
        o.overrides
            .push((raw.pricing.overrides.len(), obj.name.clone()));
        raw.pricing.overrides.push(p);
    }
    Ok(o)
}

/// Maps the validator's issues onto the catalog objects they are about. Issues about the file's own entries
/// (which only a file edited since the gateway started can have) keep their file field.
fn attribute(e: ConfigError, origins: &Origins) -> CatalogError {
    let mut object: Option<(Kind, String)> = None;
    let mut issues = Vec::new();
    for i in e.issues {
        let mut found = None;
        for (kind, prefix, list) in [
            (Kind::Policy, "policies", &origins.policies),
            (Kind::Budget, "budgets", &origins.budgets),
            (Kind::PriceOverride, "pricing.overrides", &origins.overrides),
        ] {
            for (idx, name) in list {
                let head = format!("{prefix}[{idx}]");
                if let Some(rest) = i.field.strip_prefix(&head) {
                    found = Some((kind, name.clone(), rest.trim_start_matches('.').to_owned()));
                }
            }
        }
        match found {
            Some((kind, name, field)) => {
                object.get_or_insert((kind, name));
                issues.push(FieldIssue {
                    field,
                    reason: i.reason,
                });
            }
            None => issues.push(FieldIssue {
                field: i.field,
                reason: format!("{} (in {})", i.reason, i.file.display()),
            }),
        }
    }
    let (kind, name) = object.unwrap_or((Kind::Policy, String::new()));
    CatalogError::Invalid { kind, name, issues }
}

/// The catalog's data-plane tokens (admin tokens are left out: the data plane never accepts them).
fn data_plane_tokens(snap: &Snapshot) -> Result<Vec<ServiceToken>, CatalogError> {
    let mut out = Vec::new();
    for obj in snap.of(Kind::ServiceToken) {
        let t: StoredToken = serde_json::from_value(obj.spec.clone())
            .map_err(|e| unreadable(Kind::ServiceToken, &obj.name, e))?;
        if t.role.is_none() {
            out.extend(t.records(&obj.name));
        }
    }
    Ok(out)
}

/// The catalog's admin tokens, for the control plane's caller check: `(name, token)`.
pub fn admin_tokens(snap: &Snapshot) -> Vec<(String, StoredToken)> {
    snap.of(Kind::ServiceToken)
        .filter_map(|o| {
            let t: StoredToken = serde_json::from_value(o.spec.clone()).ok()?;
            t.role.is_some().then(|| (o.name.clone(), t))
        })
        .collect()
}

/// Whether `presented` is an admin token in `snap` that works at `now`: its name and role.
pub fn admin_caller(
    snap: &Snapshot,
    presented: &str,
    now: Timestamp,
) -> Option<(String, super::Role)> {
    if !service_tokens::looks_like_service_token(presented) {
        return None;
    }
    let hash = service_tokens::hash_of(presented);
    for (name, t) in admin_tokens(snap) {
        for r in t.records(&name) {
            if r.hash == hash && r.status(now) == service_tokens::TokenStatus::Active {
                return t.role.map(|role| (name, role));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::catalog::Object;

    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                let mut b = [0u8; 8];
                getrandom::getrandom(&mut b).unwrap();
                let p = std::env::temp_dir().join(format!("tg-eff-{:x}", u64::from_le_bytes(b)));
                std::fs::create_dir_all(&p).unwrap();
                Dir(p)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    const BASE: &str = r#"
[[providers]]
name = "openai"
kind = "openai"
api_key_env = "TG_TEST_UNSET_KEY"

[[routes]]
model = "gpt-4o-mini"
provider = "openai"

[[budgets]]
name = "from-file"
amount_usd = "10"
window = "day"
scope = "everyone"
"#;

    fn obj(kind: Kind, name: &str, spec: serde_json::Value) -> Object {
        Object {
            kind,
            name: name.into(),
            version: 1,
            created_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::UNIX_EPOCH,
            updated_by: "cli".into(),
            spec,
        }
    }

    #[test]
    fn catalog_objects_join_the_file_and_issues_name_the_object_and_field() {
        let d = tempdir::Dir::new();
        let p = d.0.join("gateway.toml");
        std::fs::write(&p, format!("[store]\ndir = {:?}\n{BASE}", d.0.join("s"))).unwrap();
        let v = Validator::new(&p).unwrap();
        assert!(v.file_owned(Kind::Budget, "from-file").is_some());
        assert!(v.file_owned(Kind::Budget, "ci").is_none());

        let mut snap = Snapshot::default();
        let ok = serde_json::json!({"name": "ci", "amount_usd": "2.5", "window": "day", "scope": "everyone"});
        snap.objects
            .insert((Kind::Budget, "ci".into()), obj(Kind::Budget, "ci", ok));
        let c = v.config(&snap).unwrap();
        let names: Vec<_> = c
            .budgets
            .budgets()
            .iter()
            .map(|b| b.name.to_string())
            .collect();
        assert_eq!(names, ["from-file", "ci"]);

        let bad = serde_json::json!({"name": "bad", "amount_usd": "ten", "window": "day", "scope": "everyone"});
        snap.objects
            .insert((Kind::Budget, "bad".into()), obj(Kind::Budget, "bad", bad));
        match v.config(&snap) {
            Err(CatalogError::Invalid { kind, name, issues }) => {
                assert_eq!((kind, name.as_str()), (Kind::Budget, "bad"));
                assert_eq!(issues[0].field, "amount_usd", "{issues:?}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_file_that_does_not_parse_is_an_error_naming_it() {
        let d = tempdir::Dir::new();
        let p = d.0.join("gateway.toml");
        std::fs::write(&p, "[server\n").unwrap();
        assert!(Validator::new(&p).is_err());
    }
}
