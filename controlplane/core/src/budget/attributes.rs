//! Request attributes: the `[attributes]` configuration (what budgets can filter on besides identity and
//! model) and, per request, the attribute values a request carries.
//!
//! Owns: [`Attributes`] (validated declarations) and [`Attributes::resolve`] (one request's values, checked).
//!
//! ```toml
//! [attributes]
//! # The short form: key -> the request header carrying it (optional, any value).
//! project = "x-tollgate-project"
//! # The table form: a header, or a source in the caller's identity, and what a request must send.
//! env  = { header = "x-tollgate-attr-env", required = true, values = ["dev", "prod"] }
//! team = { from = "claim:team", required = true }     # a claim of the caller's verified JWT
//! cost_center = { from = "token:cost_center" }         # a service token's attribute
//! ```
//!
//! Rules, per declared attribute: its value is the header's (header form), or the identity's (`from`:
//! `claim:NAME` is the top-level claim NAME of a person's JWT, a string, number or boolean; `token:NAME`
//! is the attribute NAME stored with a service token). A source of the other kind of caller (a claim for a
//! service token, a token attribute for a person, either for anonymous) gives no value. `required = true`:
//! a request without a value is refused (400 naming the attribute and where it comes from). `values`: a
//! value outside the list is refused (400 naming the allowed values). A header can never set an attribute
//! taken from the identity: such an attribute has no header, and `x-tollgate-attr-<key>` naming it is
//! ignored (so clients that still send it keep working, and cannot change the value). A header starting
//! with `x-tollgate-attr-` that names no declared attribute is refused (400), so a typo never silently
//! escapes a budget; an attribute header given twice is refused too.
//!
//! Fails: configuration problems come back as (field, reason) pairs; a request's problem as the 400 message.
//! Cost: one pass over the request's header names (byte compares) and a short list walk per declared
//! attribute; the values kept are copied into the request's attribute list, as header values always were.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::auth::identity::{Identity, IdentityKind};

/// Headers with this prefix are meant as attributes; an undeclared one is an error.
pub const ATTRIBUTE_HEADER_PREFIX: &str = "x-tollgate-attr-";

/// The longest attribute value kept from a request (longer ones are refused).
pub const MAX_VALUE_LEN: usize = 256;

/// `[attributes]` as written: attribute key -> its declaration.
pub type RawAttributes = BTreeMap<String, RawAttribute>;

/// One `[attributes]` entry as written: a header name, or a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawAttribute {
    /// `key = "x-header"`: the header carrying it; optional, any value.
    Header(String),
    Table(RawAttributeTable),
}

/// `key = { ... }` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAttributeTable {
    /// The request header carrying the attribute. Exactly one of `header` and `from`.
    pub header: Option<String>,
    /// `claim:NAME` (a claim of the caller's JWT) or `token:NAME` (a service token's attribute).
    pub from: Option<String>,
    /// A request without a value is refused with 400.
    pub required: Option<bool>,
    /// The only values allowed; any other is refused with 400.
    pub values: Option<Vec<String>>,
}

impl<'de> Deserialize<'de> for RawAttribute {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<RawAttribute, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAttribute;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a header name, or a table with header or from, required, values")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawAttribute, E> {
                Ok(RawAttribute::Header(v.to_owned()))
            }
            fn visit_map<M: MapAccess<'de>>(self, m: M) -> Result<RawAttribute, M::Error> {
                RawAttributeTable::deserialize(de::value::MapAccessDeserializer::new(m))
                    .map(RawAttribute::Table)
            }
        }
        d.deserialize_any(V)
    }
}

/// Where an attribute's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A request header (lowercased name).
    Header(String),
    /// A top-level claim of a person's verified JWT.
    Claim(String),
    /// An attribute stored with a service token.
    Token(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Header(h) => write!(f, "the header {h}"),
            Source::Claim(c) => write!(f, "the claim {c:?} of the caller's identity token"),
            Source::Token(t) => write!(f, "the service token's attribute {t:?}"),
        }
    }
}

/// One declared attribute, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attribute {
    pub key: String,
    pub source: Source,
    pub required: bool,
    /// The allowed values; empty: any.
    pub values: Vec<String>,
}

/// Every declared attribute, in key order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attributes {
    list: Vec<Attribute>,
}

/// `[a-z0-9_]`, 1 to 64: attribute keys, and the names of service-token attributes.
pub fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 64
        && k.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// 1 to [`MAX_VALUE_LEN`] bytes, no control characters: attribute values anywhere.
pub fn valid_value(v: &str) -> bool {
    !v.is_empty() && v.len() <= MAX_VALUE_LEN && !v.chars().any(char::is_control)
}

impl Attributes {
    /// Validates `[attributes]`; problems are pushed onto `is` as (field, reason) pairs.
    pub fn from_raw(raw: RawAttributes, is: &mut Vec<(String, String)>) -> Attributes {
        let mut list: Vec<Attribute> = Vec::new();
        for (key, a) in raw {
            let at = |f: &str| {
                if f.is_empty() {
                    format!("attributes.{key}")
                } else {
                    format!("attributes.{key}.{f}")
                }
            };
            if !valid_key(&key) {
                is.push((at(""), "attribute keys must be 1 to 64 of [a-z0-9_]".into()));
                continue;
            }
            let (header, from, required, values, header_field) = match a {
                RawAttribute::Header(h) => (Some(h), None, false, None, ""),
                RawAttribute::Table(t) => (
                    t.header,
                    t.from,
                    t.required.unwrap_or(false),
                    t.values,
                    "header",
                ),
            };
            let values_given_empty = values.as_ref().is_some_and(Vec::is_empty);
            let values = values.unwrap_or_default();
            let source = match (header, from) {
                (Some(_), Some(_)) => {
                    is.push((
                        at("from"),
                        "set header or from, not both: a header the caller sends, or a source in the caller's identity".into(),
                    ));
                    continue;
                }
                (None, None) => {
                    is.push((
                        at("header"),
                        "set header = \"x-...\" (a request header) or from = \"claim:NAME\" / \"token:NAME\" (the caller's identity)".into(),
                    ));
                    continue;
                }
                (Some(h), None) => {
                    let h = h.to_ascii_lowercase();
                    if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                        is.push((
                            at(header_field),
                            format!("{h:?} is not a valid header name"),
                        ));
                        continue;
                    }
                    if let Some(other) = list
                        .iter()
                        .find(|o| matches!(&o.source, Source::Header(x) if *x == h))
                    {
                        is.push((
                            at(header_field),
                            format!("the header {h:?} already carries attribute {:?}", other.key),
                        ));
                        continue;
                    }
                    Source::Header(h)
                }
                (None, Some(f)) => match f.split_once(':') {
                    Some(("claim", c)) if !c.is_empty() && c.len() <= 128 => {
                        Source::Claim(c.to_owned())
                    }
                    Some(("token", t)) if valid_key(t) => Source::Token(t.to_owned()),
                    Some(("token", _)) => {
                        is.push((
                            at("from"),
                            "a service token's attribute names are 1 to 64 of [a-z0-9_]".into(),
                        ));
                        continue;
                    }
                    _ => {
                        is.push((
                            at("from"),
                            format!("{f:?} is not a source: write \"claim:NAME\" (a claim of the caller's JWT) or \"token:NAME\" (a service token's attribute)"),
                        ));
                        continue;
                    }
                },
            };
            let mut seen = std::collections::HashSet::new();
            for (j, v) in values.iter().enumerate() {
                if !valid_value(v) {
                    is.push((
                        format!("attributes.{key}.values[{j}]"),
                        format!("must be 1 to {MAX_VALUE_LEN} bytes without control characters"),
                    ));
                } else if !seen.insert(v.as_str()) {
                    is.push((
                        format!("attributes.{key}.values[{j}]"),
                        format!("{v:?} is listed twice"),
                    ));
                }
            }
            if values_given_empty {
                // `values = []` would refuse every request that has the attribute: say so, don't guess.
                is.push((
                    at("values"),
                    "list at least one allowed value, or remove values to allow any".into(),
                ));
            }
            list.push(Attribute {
                key,
                source,
                required,
                values,
            });
        }
        Attributes { list }
    }

    pub fn list(&self) -> &[Attribute] {
        &self.list
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The attribute `key`.
    pub fn get(&self, key: &str) -> Option<&Attribute> {
        self.list.iter().find(|a| a.key == key)
    }

    /// The JWT claims attributes are taken from: what identity verification keeps.
    pub fn claim_names(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .list
            .iter()
            .filter_map(|a| match &a.source {
                Source::Claim(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// One request's attributes as (key, value), from its `headers` (name, value) and its caller `id`,
    /// checked against the declarations (see the module docs); `Err` is the 400 message.
    pub fn resolve<'h>(
        &self,
        id: &Identity,
        headers: impl Iterator<Item = (&'h [u8], &'h [u8])>,
    ) -> Result<Vec<(String, String)>, String> {
        let mut out: Vec<(String, String)> = Vec::new();
        let prefix = ATTRIBUTE_HEADER_PREFIX.as_bytes();
        for (name, value) in headers {
            let declared = self.list.iter().find(|a| {
                matches!(&a.source, Source::Header(h) if h.as_bytes().eq_ignore_ascii_case(name))
            });
            let shown = || String::from_utf8_lossy(name).to_ascii_lowercase();
            match declared {
                Some(a) => {
                    if out.iter().any(|(k, _)| *k == a.key) {
                        return Err(format!(
                            "the attribute header {} is given more than once",
                            shown()
                        ));
                    }
                    let v = std::str::from_utf8(value)
                        .ok()
                        .map(str::trim)
                        .filter(|v| valid_value(v))
                        .ok_or_else(|| {
                            format!(
                                "the attribute {:?} (header {}) must be 1 to {MAX_VALUE_LEN} bytes of text",
                                a.key,
                                shown()
                            )
                        })?;
                    out.push((a.key.clone(), v.to_owned()));
                }
                None => {
                    if name.len() > prefix.len()
                        && name[..prefix.len()].eq_ignore_ascii_case(prefix)
                    {
                        // `x-tollgate-attr-<key>` for an attribute taken from the identity: ignored.
                        let rest = &name[prefix.len()..];
                        let from_identity = self.list.iter().any(|a| {
                            !matches!(a.source, Source::Header(_))
                                && a.key.as_bytes().eq_ignore_ascii_case(rest)
                        });
                        if !from_identity {
                            return Err(format!(
                                "the header {} is not a declared attribute (see [attributes] in the configuration)",
                                shown()
                            ));
                        }
                    }
                }
            }
        }
        for a in &self.list {
            let from_id = match &a.source {
                Source::Header(_) => None,
                Source::Claim(c) if id.kind == IdentityKind::User => Some(id.attribute(c)),
                Source::Token(t) if id.kind == IdentityKind::Service => Some(id.attribute(t)),
                Source::Claim(_) | Source::Token(_) => Some(None),
            };
            if let Some(Some(v)) = from_id {
                out.push((a.key.clone(), v.to_owned()));
            }
            let value = out.iter().find(|(k, _)| *k == a.key).map(|(_, v)| v);
            match value {
                None if a.required => {
                    return Err(format!(
                    "the attribute {:?} is required: it comes from {}, and this request has none",
                    a.key, a.source
                ))
                }
                Some(v) if !a.values.is_empty() && !a.values.contains(v) => {
                    let shown: String = v.chars().take(64).collect();
                    return Err(format!(
                        "the attribute {:?} (from {}) is {shown:?}; allowed values: {}",
                        a.key,
                        a.source,
                        a.values.join(", ")
                    ));
                }
                _ => {}
            }
        }
        Ok(out)
    }
}
