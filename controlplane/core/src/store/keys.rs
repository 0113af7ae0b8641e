//! # Key Schema
//!
//! Every key Tollgate writes to a [`Store`](super::Store), in one place: one function per key and per
//! range of keys, packed with the tuple encoding of [`tuple`](super::tuple) (byte-compatible with
//! FoundationDB's). Nothing else builds a key: [`ledger`](super::ledger), [`fleet`](super::fleet), the
//! [`conformance`](super::conformance) checks, the data plane and the tests all ask here. `docs/store.md`
//! describes the same schema for operators.
//!
//! Schema version [`SCHEMA_VERSION`]. Every key of the ledger and the fleet lies under `("tg",)`:
//!
//! ```text
//! ("tg", "schema")                                      -> the schema version, ASCII decimal ("1")
//! ("tg", "spend", budget, member, slot)                 -> pico-USD spent, i128 16-byte LE, atomic add
//! ("tg", "estimated", budget, member, slot)             -> pico-USD of that spend charged at an estimate, i128 16-byte LE, atomic add
//! ("tg", "applied", source)                             -> last sequence applied, u64 8-byte LE
//! ("tg", "lease", budget, member, window, node)         -> unspent lease, pico-USD, i128 16-byte LE, atomic add
//! ("tg", "lease_exp", budget, member, window, node)     -> lease expiry, Unix ms, i64 8-byte LE
//! ("tg", "catalog", "version")                         -> the catalog's version, i128 16-byte LE
//! ("tg", "catalog", "object", kind, name)               -> one control-plane object, JSON
//! ("tg", "catalog", "audit_seq")                        -> the last audit entry's number, i128 16-byte LE
//! ("tg", "catalog", "audit", seq)                       -> one audit entry, JSON, append-only
//! ("tg", "catalog", "idempotency", key)                 -> a create's answer for its Idempotency-Key, JSON
//! ("tg", "usage", hour, provider, model, identity, groups, service_token, attributes, measure)
//!                                                       -> that measure's count in the hour, i128 16-byte LE, atomic add
//! ("tg", "seen", identity)                              -> the identity as last seen, JSON
//! ("conformance", check, n | name)                      -> scratch values of the store conformance checks
//! ```
//!
//! | key | layout | value | written by |
//! |---|---|---|---|
//! | [`schema`] | `("tg", "schema")` | the schema version, ASCII decimal | `ledger::check_schema`, once, into an empty store |
//! | [`spend`] | `("tg", "spend", budget: str, member: str, slot: int)` | pico-USD spent on the instance in that 15-minute slot, a 16-byte little-endian two's-complement counter written with atomic add; `member` is `source:subject` for a per-identity instance, `""` for a shared one; `slot` = Unix seconds / [`SLOT_SECS`] | `ledger::apply_batch` (add), `ledger::prune_before` (clear); read by `ledger::load_since` and `fleet::committed` |
//! | [`estimated`] | `("tg", "estimated", budget: str, member: str, slot: int)` | the part of the same slot's [`spend`] that was charged at an estimate: reservations a crashed run left open, charged at their reserved amount at the next start; 16-byte counter written with atomic add | `ledger::apply_batch` (add), `ledger::prune_before` (clear); read by `ledger::load_estimated_since` |
//! | [`applied`] | `("tg", "applied", source: str)` | the highest sequence number of `source` (a journal: one core of one process run) applied, 8 bytes little-endian | `ledger::apply_batch` (set), `ledger::forget_source` (clear) |
//! | [`lease`] | `("tg", "lease", budget: str, member: str, window: int, node: int)` | the unspent amount of `node`'s lease, pico-USD, 16-byte counter written with atomic add; `window` is the window's start, Unix seconds | `fleet::acquire` (add, and clear of expired leases), `fleet::commit` (subtract), `fleet::release` and `fleet::release_all` (clear) |
//! | [`lease_expiry`] | `("tg", "lease_exp", budget: str, member: str, window: int, node: int)` | the lease's expiry, Unix milliseconds, 8 bytes little-endian | `fleet::acquire` (set), `fleet::release` and `fleet::release_all` (clear) |
//! | [`catalog_version`] | `("tg", "catalog", "version")` | the catalog's version, 16-byte counter | `catalog::write` (get and set, in every transaction that changes an object); watched by every gateway |
//! | [`catalog_object`] | `("tg", "catalog", "object", kind: str, name: str)` | the object as JSON (`kind`, `name`, `version`, `spec`, ...); `kind` is `policy`, `budget`, `service_token` or `price_override` | `catalog::write`; read by `catalog::objects` |
//! | [`audit_seq`], [`audit_entry`] | `("tg", "catalog", "audit_seq")`, `("tg", "catalog", "audit", seq: int)` | the last entry's number; one entry as JSON, never rewritten | `catalog::audit::append` |
//! | [`idempotency`] | `("tg", "catalog", "idempotency", key: str)` | a create's request digest and answer (secrets removed) | `catalog::write` |
//! | [`usage`] | `("tg", "usage", hour: int, provider: str, model: str, identity: str, groups: str, service_token: str, attributes: str, measure: str)` | one measure of the settled requests with exactly these dimensions in that hour, a 16-byte counter written with atomic add. `hour` = Unix seconds / 3600 (settlement time, UTC); `model` the canonical billed model; `identity` `source:subject` as budget members are written (`""` anonymous); `groups` sorted and comma-joined, `attributes` `k=v;k=v` sorted by key (both escaped by `consumption::escape`; `""` none); `service_token` the token's name or `""`; `measure` one of [`USAGE_MEASURES`] (`cost` and `list_cost` in pico-USD, the rest counts; zero counters are not written, `requests` always is) | `ledger::apply_batch` (add); read by `consumption::query` |
//! | [`seen`] | `("tg", "seen", identity: str)` | the identity (`source:subject`, `""` anonymous) as last seen: JSON `{"identity","kind","subject","source","groups":[..],"service_token","team","first_seen","last_seen"}` (RFC 3339), `first_seen` kept from the stored value | `ledger::apply_batch` (read, then set); read by `consumption::seen` |
//! | [`conformance`] | `("conformance", check: str, n: int \| name: str)` | whatever the check writes; outside `("tg",)` so a live store can be checked | `store::conformance`, cleared before each check |
//!
//! Ranges (half-open `[begin, end)`, as `Transaction::get_range` takes them): [`root`] (every `("tg", ..)`
//! key), [`all_spend`], [`spend_slots`] (one instance's slots in `[from, to)`), [`all_leases`],
//! [`all_lease_expiries`], [`window_leases`], [`window_lease_expiries`] (every node's lease of one instance
//! in one window), [`budget_spend`] (every slot of one budget), [`usage_hours`] (every usage counter of the
//! hours `[from, to)`), [`seen_from`] (identities seen, from a cursor), [`conformance_range`].
//! [`parse_spend`], [`parse_usage`], [`parse_seen`] and [`lease_node`] read keys back.
//!
//! Changing a layout changes the bytes of keys already stored: it needs a new [`SCHEMA_VERSION`] and a
//! migration in `ledger::check_schema`. The test at the end of this module pins the bytes.

use super::tuple::{pack, range, unpack, Element};
use super::StoreError;

/// The schema this binary reads and writes.
pub const SCHEMA_VERSION: i64 = 1;

/// Length of a spend slot, seconds: a [`spend`] key's `slot` is Unix seconds / `SLOT_SECS`.
pub const SLOT_SECS: i64 = 900;

/// The first element of every ledger and fleet key.
const ROOT: &str = "tg";
const SCHEMA: &str = "schema";
const SPEND: &str = "spend";
const ESTIMATED: &str = "estimated";
const APPLIED: &str = "applied";
const LEASE: &str = "lease";
const LEASE_EXP: &str = "lease_exp";
const CONFORMANCE: &str = "conformance";
const USAGE: &str = "usage";
const SEEN: &str = "seen";

/// Length of a usage hour, seconds: a [`usage`] key's `hour` is Unix seconds / `HOUR_SECS`.
pub const HOUR_SECS: i64 = 3600;

/// The measures a [`usage`] key can name: effective cost and list cost (pico-USD), requests, and tokens by
/// class (input excludes cached input; output includes reasoning, as the price sheet counts them).
pub const USAGE_MEASURES: [&str; 8] = [
    "cost",
    "list_cost",
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
];

/// The dimensions of one [`usage`] counter, as stored (already canonical: see `consumption::escape`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageDims {
    pub provider: String,
    pub model: String,
    /// `source:subject`, `""` for anonymous.
    pub identity: String,
    /// Sorted, escaped, comma-joined; `""` none.
    pub groups: String,
    /// The service token's name, `""` for a person or anonymous.
    pub service_token: String,
    /// `k=v;k=v` sorted by key, values escaped; `""` none.
    pub attributes: String,
}

/// `("tg", kind, rest..)` as tuple elements.
fn under(kind: &str, rest: impl IntoIterator<Item = Element>) -> Vec<Element> {
    let mut t = vec![Element::from(ROOT), Element::from(kind)];
    t.extend(rest);
    t
}

/// `(budget, member)`: the elements that name a budget instance.
fn instance(budget: &str, member: &str) -> [Element; 2] {
    [Element::from(budget), Element::from(member)]
}

/// `("tg", "schema")`.
pub fn schema() -> Vec<u8> {
    pack(&under(SCHEMA, []))
}

/// Every key under `("tg",)`: the whole ledger and fleet.
pub fn root() -> (Vec<u8>, Vec<u8>) {
    range(&[Element::from(ROOT)])
}

/// `("tg", "spend", budget, member, slot)`.
pub fn spend(budget: &str, member: &str, slot: i64) -> Vec<u8> {
    let mut t = under(SPEND, instance(budget, member));
    t.push(Element::Int(slot));
    pack(&t)
}

/// Every spend key.
pub fn all_spend() -> (Vec<u8>, Vec<u8>) {
    range(&under(SPEND, []))
}

/// The spend keys of one instance with `from <= slot < to`.
pub fn spend_slots(budget: &str, member: &str, from: i64, to: i64) -> (Vec<u8>, Vec<u8>) {
    let prefix = under(SPEND, instance(budget, member));
    let (_, end_all) = range(&prefix);
    let bound = |slot: i64| {
        let mut t = prefix.clone();
        t.push(Element::Int(slot));
        pack(&t)
    };
    (bound(from), bound(to).min(end_all))
}

/// Reads a [`spend`] key back: `(budget, member, slot)`.
pub fn parse_spend(key: &[u8]) -> Result<(String, String, i64), StoreError> {
    parse_slot_key(key, SPEND)
}

/// `("tg", "estimated", budget, member, slot)`: how much of that slot's [`spend`] is an estimate.
pub fn estimated(budget: &str, member: &str, slot: i64) -> Vec<u8> {
    let mut t = under(ESTIMATED, instance(budget, member));
    t.push(Element::Int(slot));
    pack(&t)
}

/// Every [`estimated`] key.
pub fn all_estimated() -> (Vec<u8>, Vec<u8>) {
    range(&under(ESTIMATED, []))
}

/// Reads an [`estimated`] key back: `(budget, member, slot)`.
pub fn parse_estimated(key: &[u8]) -> Result<(String, String, i64), StoreError> {
    parse_slot_key(key, ESTIMATED)
}

fn parse_slot_key(key: &[u8], want: &str) -> Result<(String, String, i64), StoreError> {
    match unpack(key)?.as_slice() {
        [Element::Str(root), Element::Str(kind), Element::Str(b), Element::Str(m), Element::Int(s)]
            if root == ROOT && kind == want =>
        {
            Ok((b.clone(), m.clone(), *s))
        }
        _ => Err(StoreError::Corrupt(format!(
            "a {want} key of the wrong shape"
        ))),
    }
}

/// `("tg", "applied", source)`.
pub fn applied(source: &str) -> Vec<u8> {
    pack(&under(APPLIED, [Element::from(source)]))
}

/// `(budget, member, window, node)`: the elements after a lease key's kind.
fn lease_tail(budget: &str, member: &str, window: i64, node: u64) -> [Element; 4] {
    let [b, m] = instance(budget, member);
    // Node ids are kept below 2^63 by the data plane, so the cast keeps them.
    [b, m, Element::Int(window), Element::Int(node as i64)]
}

/// `("tg", "lease", budget, member, window, node)`.
pub fn lease(budget: &str, member: &str, window: i64, node: u64) -> Vec<u8> {
    pack(&under(LEASE, lease_tail(budget, member, window, node)))
}

/// `("tg", "lease_exp", budget, member, window, node)`.
pub fn lease_expiry(budget: &str, member: &str, window: i64, node: u64) -> Vec<u8> {
    pack(&under(LEASE_EXP, lease_tail(budget, member, window, node)))
}

/// `(budget, member, window)`: the elements after a lease key's kind that one window's leases share.
fn window_tail(budget: &str, member: &str, window: i64) -> [Element; 3] {
    let [b, m] = instance(budget, member);
    [b, m, Element::Int(window)]
}

/// Every node's [`lease`] key of one instance in one window.
pub fn window_leases(budget: &str, member: &str, window: i64) -> (Vec<u8>, Vec<u8>) {
    range(&under(LEASE, window_tail(budget, member, window)))
}

/// Every node's [`lease_expiry`] key of one instance in one window.
pub fn window_lease_expiries(budget: &str, member: &str, window: i64) -> (Vec<u8>, Vec<u8>) {
    range(&under(LEASE_EXP, window_tail(budget, member, window)))
}

/// Every [`lease`] key of the fleet.
pub fn all_leases() -> (Vec<u8>, Vec<u8>) {
    range(&under(LEASE, []))
}

/// Every [`lease_expiry`] key of the fleet.
pub fn all_lease_expiries() -> (Vec<u8>, Vec<u8>) {
    range(&under(LEASE_EXP, []))
}

/// The node of a [`lease`] or [`lease_expiry`] key (its last element); `None` if the key does not end in
/// an integer.
pub fn lease_node(key: &[u8]) -> Result<Option<u64>, StoreError> {
    match unpack(key)?.last() {
        Some(Element::Int(n)) => Ok(Some(*n as u64)),
        _ => Ok(None),
    }
}

/// What follows `("conformance", check)` in a conformance key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scratch<'a> {
    Numbered(i64),
    Named(&'a str),
}

/// `("conformance", check, n)` or `("conformance", check, name)`.
pub fn conformance(check: &str, which: Scratch<'_>) -> Vec<u8> {
    let last = match which {
        Scratch::Numbered(n) => Element::Int(n),
        Scratch::Named(name) => Element::from(name),
    };
    pack(&[Element::from(CONFORMANCE), Element::from(check), last])
}

/// `("tg", "usage", hour, provider, model, identity, groups, service_token, attributes, measure)`.
pub fn usage(hour: i64, dims: &UsageDims, measure: &str) -> Vec<u8> {
    pack(&under(
        USAGE,
        [
            Element::Int(hour),
            Element::from(dims.provider.as_str()),
            Element::from(dims.model.as_str()),
            Element::from(dims.identity.as_str()),
            Element::from(dims.groups.as_str()),
            Element::from(dims.service_token.as_str()),
            Element::from(dims.attributes.as_str()),
            Element::from(measure),
        ],
    ))
}

/// Every [`usage`] key with `from <= hour < to`.
pub fn usage_hours(from: i64, to: i64) -> (Vec<u8>, Vec<u8>) {
    let (_, end_all) = range(&under(USAGE, []));
    let bound = |hour: i64| pack(&under(USAGE, [Element::Int(hour)]));
    (bound(from), bound(to).min(end_all))
}

/// Reads a [`usage`] key back: `(hour, dims, measure)`.
pub fn parse_usage(key: &[u8]) -> Result<(i64, UsageDims, String), StoreError> {
    match unpack(key)?.as_mut_slice() {
        [Element::Str(root), Element::Str(kind), Element::Int(hour), Element::Str(provider), Element::Str(model), Element::Str(identity), Element::Str(groups), Element::Str(service_token), Element::Str(attributes), Element::Str(measure)]
            if root == ROOT && kind == USAGE =>
        {
            Ok((
                *hour,
                UsageDims {
                    provider: std::mem::take(provider),
                    model: std::mem::take(model),
                    identity: std::mem::take(identity),
                    groups: std::mem::take(groups),
                    service_token: std::mem::take(service_token),
                    attributes: std::mem::take(attributes),
                },
                std::mem::take(measure),
            ))
        }
        _ => Err(StoreError::Corrupt("a usage key of the wrong shape".into())),
    }
}

/// `("tg", "seen", identity)`.
pub fn seen(identity: &str) -> Vec<u8> {
    pack(&under(SEEN, [Element::from(identity)]))
}

/// The [`seen`] keys after `after` (every one when `None`), in identity order.
pub fn seen_from(after: Option<&str>) -> (Vec<u8>, Vec<u8>) {
    let (begin, end) = range(&under(SEEN, []));
    match after {
        Some(a) => {
            let mut k = seen(a);
            k.push(0);
            (k, end)
        }
        None => (begin, end),
    }
}

/// Reads a [`seen`] key back: the identity.
pub fn parse_seen(key: &[u8]) -> Result<String, StoreError> {
    match unpack(key)?.as_mut_slice() {
        [Element::Str(root), Element::Str(kind), Element::Str(identity)]
            if root == ROOT && kind == SEEN =>
        {
            Ok(std::mem::take(identity))
        }
        _ => Err(StoreError::Corrupt("a seen key of the wrong shape".into())),
    }
}

/// Every [`spend`] key of one budget (all its instances and slots).
pub fn budget_spend(budget: &str) -> (Vec<u8>, Vec<u8>) {
    range(&under(SPEND, [Element::from(budget)]))
}

/// Every key of one conformance check.
pub fn conformance_range(check: &str) -> (Vec<u8>, Vec<u8>) {
    range(&[Element::from(CONFORMANCE), Element::from(check)])
}

// ---------------------------------------------------------------------------------------------------------
// The control plane's catalog: policies, budgets, service tokens and price overrides as versioned objects.
// ---------------------------------------------------------------------------------------------------------

const CATALOG: &str = "catalog";

/// `("tg", "catalog", "version")`: the catalog's version, raised by one in every transaction that changes
/// an object; the key every gateway watches.
pub fn catalog_version() -> Vec<u8> {
    pack(&under(CATALOG, [Element::from("version")]))
}

/// `("tg", "catalog", "object", kind, name)`: one object as JSON.
pub fn catalog_object(kind: &str, name: &str) -> Vec<u8> {
    pack(&under(
        CATALOG,
        [
            Element::from("object"),
            Element::from(kind),
            Element::from(name),
        ],
    ))
}

/// Every object of the catalog, all kinds.
pub fn catalog_objects() -> (Vec<u8>, Vec<u8>) {
    range(&under(CATALOG, [Element::from("object")]))
}

/// Every object of one kind, in name order.
pub fn catalog_kind(kind: &str) -> (Vec<u8>, Vec<u8>) {
    range(&under(
        CATALOG,
        [Element::from("object"), Element::from(kind)],
    ))
}

/// Reads a [`catalog_object`] key back: `(kind, name)`.
pub fn parse_catalog_object(key: &[u8]) -> Result<(String, String), StoreError> {
    match unpack(key)?.as_slice() {
        [Element::Str(root), Element::Str(c), Element::Str(o), Element::Str(kind), Element::Str(name)]
            if root == ROOT && c == CATALOG && o == "object" =>
        {
            Ok((kind.clone(), name.clone()))
        }
        _ => Err(StoreError::Corrupt(
            "a catalog key of the wrong shape".to_owned(),
        )),
    }
}

/// `("tg", "catalog", "audit_seq")`: the last audit entry's number.
pub fn audit_seq() -> Vec<u8> {
    pack(&under(CATALOG, [Element::from("audit_seq")]))
}

/// `("tg", "catalog", "audit", seq)`: one audit entry as JSON, never changed once written.
pub fn audit_entry(seq: i64) -> Vec<u8> {
    pack(&under(CATALOG, [Element::from("audit"), Element::Int(seq)]))
}

/// Audit entries with `from <= seq < to`.
pub fn audit_entries(from: i64, to: i64) -> (Vec<u8>, Vec<u8>) {
    (audit_entry(from), audit_entry(to))
}

/// `("tg", "catalog", "idempotency", key)`: what a create with that `Idempotency-Key` answered.
pub fn idempotency(key: &str) -> Vec<u8> {
    pack(&under(
        CATALOG,
        [Element::from("idempotency"), Element::from(key)],
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    /// The bytes of keys already in stores: a change here breaks every existing ledger.
    #[test]
    fn keys_are_pinned_to_their_bytes() {
        assert_eq!(schema(), b"\x02tg\x00\x02schema\x00");
        assert_eq!(
            spend("team", "", 1),
            b"\x02tg\x00\x02spend\x00\x02team\x00\x02\x00\x15\x01"
        );
        assert_eq!(
            spend("me", "okta:alice", 1_960_000),
            b"\x02tg\x00\x02spend\x00\x02me\x00\x02okta:alice\x00\x17\x1d\xe8\x40"
        );
        assert_eq!(
            estimated("team", "", 1),
            b"\x02tg\x00\x02estimated\x00\x02team\x00\x02\x00\x15\x01"
        );
        assert_eq!(
            parse_estimated(&estimated("me", "okta:a", 7)).unwrap(),
            ("me".to_owned(), "okta:a".to_owned(), 7)
        );
        assert!(parse_spend(&estimated("me", "", 7)).is_err());
        assert_eq!(
            applied("run1-c0"),
            b"\x02tg\x00\x02applied\x00\x02run1-c0\x00"
        );
        assert_eq!(
            lease("b", "m", 1800, 3),
            b"\x02tg\x00\x02lease\x00\x02b\x00\x02m\x00\x16\x07\x08\x15\x03"
        );
        assert_eq!(
            lease_expiry("b", "", 0, 0),
            b"\x02tg\x00\x02lease_exp\x00\x02b\x00\x02\x00\x14\x14"
        );
        assert_eq!(
            conformance("add", Scratch::Numbered(1)),
            b"\x02conformance\x00\x02add\x00\x15\x01"
        );
        assert_eq!(
            conformance("add", Scratch::Named("x")),
            b"\x02conformance\x00\x02add\x00\x02x\x00"
        );
        assert_eq!(
            root(),
            (b"\x02tg\x00\x00".to_vec(), b"\x02tg\x00\xff".to_vec())
        );
        assert_eq!(
            catalog_version(),
            b"\x02tg\x00\x02catalog\x00\x02version\x00"
        );
        assert_eq!(
            catalog_object("budget", "team"),
            b"\x02tg\x00\x02catalog\x00\x02object\x00\x02budget\x00\x02team\x00"
        );
        assert_eq!(
            parse_catalog_object(&catalog_object("policy", "p")).unwrap(),
            ("policy".to_owned(), "p".to_owned())
        );
        assert_eq!(
            audit_entry(1),
            b"\x02tg\x00\x02catalog\x00\x02audit\x00\x15\x01"
        );
        assert_eq!(
            all_spend(),
            (
                b"\x02tg\x00\x02spend\x00\x00".to_vec(),
                b"\x02tg\x00\x02spend\x00\xff".to_vec()
            )
        );
        assert_eq!(
            window_leases("b", "m", 1800),
            (
                b"\x02tg\x00\x02lease\x00\x02b\x00\x02m\x00\x16\x07\x08\x00".to_vec(),
                b"\x02tg\x00\x02lease\x00\x02b\x00\x02m\x00\x16\x07\x08\xff".to_vec()
            )
        );
    }

    fn dims() -> UsageDims {
        UsageDims {
            provider: "openai".into(),
            model: "gpt-4o".into(),
            identity: "okta:alice".into(),
            groups: "eng,ops".into(),
            service_token: String::new(),
            attributes: "team=x".into(),
        }
    }

    /// Usage and seen keys: pinned like the others, read back, and their ranges hold them.
    #[test]
    fn usage_and_seen_keys_are_pinned_and_read_back() {
        assert_eq!(
            usage(1, &dims(), "cost"),
            b"\x02tg\x00\x02usage\x00\x15\x01\x02openai\x00\x02gpt-4o\x00\x02okta:alice\x00\x02eng,ops\x00\x02\x00\x02team=x\x00\x02cost\x00"
        );
        assert_eq!(
            usage(0, &UsageDims::default(), "requests"),
            b"\x02tg\x00\x02usage\x00\x14\x02\x00\x02\x00\x02\x00\x02\x00\x02\x00\x02\x00\x02requests\x00"
        );
        assert_eq!(
            seen("okta:alice"),
            b"\x02tg\x00\x02seen\x00\x02okta:alice\x00"
        );
        assert_eq!(seen(""), b"\x02tg\x00\x02seen\x00\x02\x00");
        let k = usage(493_000, &dims(), "output_tokens");
        assert_eq!(
            parse_usage(&k).unwrap(),
            (493_000, dims(), "output_tokens".to_owned())
        );
        assert!(parse_usage(&seen("a")).is_err());
        assert!(parse_usage(&spend("a", "", 1)).is_err());
        assert_eq!(parse_seen(&seen("okta:bob")).unwrap(), "okta:bob");
        assert!(parse_seen(&usage(1, &dims(), "cost")).is_err());
        let inside = |(b, e): &(Vec<u8>, Vec<u8>), k: &[u8]| b.as_slice() <= k && k < e.as_slice();
        let hours = usage_hours(10, 12);
        assert!(!inside(&hours, &usage(9, &dims(), "cost")));
        assert!(inside(&hours, &usage(10, &dims(), "cost")));
        assert!(inside(
            &hours,
            &usage(11, &UsageDims::default(), "requests")
        ));
        assert!(!inside(&hours, &usage(12, &dims(), "cost")));
        assert!(!inside(&hours, &seen("")));
        assert!(inside(&seen_from(None), &seen("")));
        assert!(!inside(&seen_from(Some("a")), &seen("a")));
        assert!(inside(&seen_from(Some("a")), &seen("a\u{0}")));
        assert!(inside(&seen_from(Some("a")), &seen("b")));
        assert!(!inside(&seen_from(None), &usage(1, &dims(), "cost")));
        assert!(inside(&budget_spend("team"), &spend("team", "m", 5)));
        assert!(!inside(&budget_spend("team"), &spend("team2", "", 5)));
        assert!(inside(&root(), &usage(1, &dims(), "cost")));
        assert_eq!(USAGE_MEASURES.len(), 8);
    }

    #[test]
    fn ranges_hold_their_keys_and_no_others() {
        let inside = |(b, e): &(Vec<u8>, Vec<u8>), k: &[u8]| b.as_slice() <= k && k < e.as_slice();
        let slots = spend_slots("team", "", 10, 12);
        assert!(!inside(&slots, &spend("team", "", 9)));
        assert!(inside(&slots, &spend("team", "", 10)));
        assert!(inside(&slots, &spend("team", "", 11)));
        assert!(!inside(&slots, &spend("team", "", 12)));
        assert!(!inside(&slots, &spend("team2", "", 11)));
        // Leases and their expiries are apart, though "lease" is a prefix of "lease_exp".
        assert!(inside(&all_leases(), &lease("b", "", 0, 1)));
        assert!(!inside(&all_leases(), &lease_expiry("b", "", 0, 1)));
        assert!(inside(&all_lease_expiries(), &lease_expiry("b", "", 0, 1)));
        assert!(inside(&window_leases("b", "", 0), &lease("b", "", 0, 7)));
        assert!(!inside(&window_leases("b", "", 0), &lease("b", "", 900, 7)));
        assert!(inside(
            &window_lease_expiries("b", "", 0),
            &lease_expiry("b", "", 0, 7)
        ));
        for k in [
            schema(),
            spend("a", "b", 1),
            applied("s"),
            lease("a", "", 0, 1),
        ] {
            assert!(inside(&root(), &k));
        }
        assert!(!inside(&root(), &conformance("add", Scratch::Numbered(1))));
        assert!(inside(
            &conformance_range("add"),
            &conformance("add", Scratch::Named("x"))
        ));
    }

    #[test]
    fn keys_read_back() {
        assert_eq!(
            parse_spend(&spend("me", "okta:alice", -3)).unwrap(),
            ("me".into(), "okta:alice".into(), -3)
        );
        assert!(matches!(
            parse_spend(&applied("s")),
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(lease_node(&lease("b", "m", 900, 42)).unwrap(), Some(42));
        assert_eq!(
            lease_node(&lease_expiry("b", "m", 900, 0)).unwrap(),
            Some(0)
        );
        assert_eq!(lease_node(&applied("s")).unwrap(), None);
    }
}
