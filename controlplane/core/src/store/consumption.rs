//! Dimensional usage in the store: what every priced, settled request consumed and cost, by hour, provider,
//! model, identity, groups, service token and request attributes; the identities seen; and the queries the
//! control plane answers from them (and from the budgets' spend slots).
//!
//! Owns: the canonical forms of the dimensions ([`identity_dim`], [`groups_dim`], [`attributes_dim`], with
//! [`escape`] and their readers), [`UsageCounts`] (one request's or one bucket's counters), [`Seen`] (an
//! identity as last seen), and the read side: [`query`] ([`UsageQuery`] -> [`UsageRow`]s), [`seen`]
//! (cursor pagination over identities) and [`budget_spend`] (the per-budget spend slots summed into hourly
//! or daily buckets). The write side is [`crate::store::ledger::Batch`]: usage deltas are merged per
//! (hour, dimensions) in the ledger thread and committed by `ledger::apply_batch` in the same transaction,
//! under the same per-source `applied` sequence, as the spend they came with (exactly once).
//!
//! Keys (from [`keys`]): `("tg", "usage", hour, provider, model, identity, groups, service_token,
//! attributes, measure)` -> a 16-byte counter per measure ([`keys::USAGE_MEASURES`]); `("tg", "seen",
//! identity)` -> [`Seen`] as JSON.
//!
//! Grouping by [`Dim::Group`]: a request made by an identity with several groups counts in each group's
//! row (so rows grouped by group can sum to more than the total); a request with no group is in the row
//! whose group is `""`. Filtering on a group keeps the requests whose identity has that group. Grouping by
//! [`Dim::Attribute`] puts requests without that attribute in the row whose value is `""`.
//!
//! Buckets: hours, or UTC days; `from` is rounded down and `to` up to the hour, so `[from, to)` is read
//! whole (a daily query whose `from` is not at midnight has a first bucket holding only the hours read).
//!
//! Fails: store errors pass through ([`StoreError`]); a key or value of the wrong shape is
//! [`StoreError::Corrupt`]. Cost: one read-only transaction; every counter key of the hours in `[from, to)`
//! is read (up to 8 per distinct dimension combination per hour, in pages of 10,000) and aggregated in
//! memory, so a query's time is linear in the combinations the window holds, not in requests.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::pricing::money::Money;
use crate::store::keys::{self, UsageDims, HOUR_SECS, SLOT_SECS};
use crate::store::{decode_i128, transact, RetryPolicy, Store, StoreError, Transaction};

/// Escapes `%`, `,`, `;` and `=` in a dimension value as `%25`, `%2C`, `%3B`, `%3D`, so joined lists read
/// back exactly.
pub fn escape(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.bytes().any(|b| matches!(b, b'%' | b',' | b';' | b'=')) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 6);
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            ',' => out.push_str("%2C"),
            ';' => out.push_str("%3B"),
            '=' => out.push_str("%3D"),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The inverse of [`escape`].
pub fn unescape(s: &str) -> String {
    s.replace("%2C", ",")
        .replace("%3B", ";")
        .replace("%3D", "=")
        .replace("%25", "%")
}

/// An identity as its usage dimension: `source:subject` (as budget members are written); `""` for
/// anonymous callers.
pub fn identity_dim(anonymous: bool, source: &str, subject: &str) -> String {
    if anonymous {
        String::new()
    } else {
        format!("{source}:{subject}")
    }
}

/// Groups as their usage dimension: escaped, sorted, deduplicated, comma-joined; `""` for none.
pub fn groups_dim<S: AsRef<str>>(groups: &[S]) -> String {
    let mut v: Vec<std::borrow::Cow<'_, str>> = groups.iter().map(|g| escape(g.as_ref())).collect();
    v.sort();
    v.dedup();
    v.join(",")
}

/// The groups of a [`groups_dim`] value.
pub fn split_groups(dim: &str) -> Vec<String> {
    if dim.is_empty() {
        return Vec::new();
    }
    dim.split(',').map(unescape).collect()
}

/// Request attributes as their usage dimension: `k=v;k=v`, sorted by key, values escaped; `""` for none.
pub fn attributes_dim<K: AsRef<str>, V: AsRef<str>>(attributes: &[(K, V)]) -> String {
    let mut v: Vec<(&str, std::borrow::Cow<'_, str>)> = attributes
        .iter()
        .map(|(k, v)| (k.as_ref(), escape(v.as_ref())))
        .collect();
    v.sort();
    let mut out = String::new();
    for (i, (k, val)) in v.iter().enumerate() {
        if i > 0 {
            out.push(';');
        }
        out.push_str(&escape(k));
        out.push('=');
        out.push_str(val);
    }
    out
}

/// The (key, value) pairs of an [`attributes_dim`] value.
pub fn split_attributes(dim: &str) -> Vec<(String, String)> {
    if dim.is_empty() {
        return Vec::new();
    }
    dim.split(';')
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (unescape(k), unescape(v)),
            None => (unescape(kv), String::new()),
        })
        .collect()
}

/// Counters of one request, or of one bucket. Money in pico-USD.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageCounts {
    /// Effective (negotiated) cost, what budgets are charged.
    pub cost: i128,
    /// Cost at list prices.
    pub list_cost: i128,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    /// Cache writes, 5-minute and 1-hour together.
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

impl UsageCounts {
    /// Adds `o` (wrapping, like the store's atomic add).
    pub fn add(&mut self, o: &UsageCounts) {
        self.cost = self.cost.wrapping_add(o.cost);
        self.list_cost = self.list_cost.wrapping_add(o.list_cost);
        self.requests = self.requests.wrapping_add(o.requests);
        self.input_tokens = self.input_tokens.wrapping_add(o.input_tokens);
        self.cached_input_tokens = self.cached_input_tokens.wrapping_add(o.cached_input_tokens);
        self.cache_write_tokens = self.cache_write_tokens.wrapping_add(o.cache_write_tokens);
        self.output_tokens = self.output_tokens.wrapping_add(o.output_tokens);
        self.reasoning_tokens = self.reasoning_tokens.wrapping_add(o.reasoning_tokens);
    }

    /// The counters as (measure, value), in [`keys::USAGE_MEASURES`] order.
    pub fn measures(&self) -> [(&'static str, i128); 8] {
        let m = keys::USAGE_MEASURES;
        [
            (m[0], self.cost),
            (m[1], self.list_cost),
            (m[2], i128::from(self.requests)),
            (m[3], i128::from(self.input_tokens)),
            (m[4], i128::from(self.cached_input_tokens)),
            (m[5], i128::from(self.cache_write_tokens)),
            (m[6], i128::from(self.output_tokens)),
            (m[7], i128::from(self.reasoning_tokens)),
        ]
    }

    /// Adds `value` to the counter `measure` names; an unknown measure (a newer Tollgate's) is ignored.
    pub fn add_measure(&mut self, measure: &str, value: i128) {
        let n = value as u64;
        match measure {
            "cost" => self.cost = self.cost.wrapping_add(value),
            "list_cost" => self.list_cost = self.list_cost.wrapping_add(value),
            "requests" => self.requests = self.requests.wrapping_add(n),
            "input_tokens" => self.input_tokens = self.input_tokens.wrapping_add(n),
            "cached_input_tokens" => {
                self.cached_input_tokens = self.cached_input_tokens.wrapping_add(n)
            }
            "cache_write_tokens" => {
                self.cache_write_tokens = self.cache_write_tokens.wrapping_add(n)
            }
            "output_tokens" => self.output_tokens = self.output_tokens.wrapping_add(n),
            "reasoning_tokens" => self.reasoning_tokens = self.reasoning_tokens.wrapping_add(n),
            _ => {}
        }
    }
}

/// An identity as last seen (the value of `("tg", "seen", identity)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// `source:subject`, `""` for anonymous: the usage dimension and the pagination cursor.
    pub identity: String,
    /// `user`, `service` or `anonymous`.
    pub kind: String,
    pub subject: String,
    /// The issuer's configured name, `service-token`, or `anonymous`.
    pub source: String,
    pub groups: Vec<String>,
    /// The service token's name, for a service token.
    pub service_token: Option<String>,
    /// The service token's owning team (its group), for a service token.
    pub team: Option<String>,
    pub first_seen: Timestamp,
    pub last_seen: Timestamp,
}

impl Seen {
    /// Merges a later sighting into `self`: the earliest `first_seen`, the latest `last_seen` and the
    /// description that goes with it.
    pub fn merge(&mut self, later: &Seen) {
        let first = self.first_seen.min(later.first_seen);
        if later.last_seen >= self.last_seen {
            *self = later.clone();
        }
        self.first_seen = first;
    }
}

/// Writes `seen` (merged with what is stored: the stored `first_seen` is kept if earlier).
pub fn write_seen(txn: &mut dyn Transaction, seen: &Seen) -> Result<(), StoreError> {
    let key = keys::seen(&seen.identity);
    let mut merged = seen.clone();
    if let Some(v) = txn.get(&key)? {
        if let Ok(old) = serde_json::from_slice::<Seen>(&v) {
            let mut o = old;
            o.merge(seen);
            merged = o;
        }
    }
    let v = serde_json::to_vec(&merged).map_err(|e| StoreError::Corrupt(e.to_string()))?;
    txn.set(&key, &v);
    Ok(())
}

/// Money as JSON: the exact USD decimal (trailing zeros trimmed) and the integer pico-USD count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Amount(pub Money);

impl Serialize for Amount {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Amount", 2)?;
        st.serialize_field("usd", &self.0.usd())?;
        st.serialize_field("pico", &self.0.pico())?;
        st.end()
    }
}

/// Bucket length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    Hour,
    /// A UTC day.
    Day,
}

impl Granularity {
    fn secs(self) -> i64 {
        match self {
            Granularity::Hour => HOUR_SECS,
            Granularity::Day => 86_400,
        }
    }

    /// The start of the bucket holding Unix second `s`.
    fn bucket(self, s: i64) -> i64 {
        s.div_euclid(self.secs()) * self.secs()
    }
}

/// A usage dimension to group or filter by. Budgets are not a usage dimension: see [`budget_spend`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dim {
    /// `source:subject`, `""` anonymous.
    Identity,
    /// One group of the identity (see the module docs: a request counts in each of its groups).
    Group,
    ServiceToken,
    /// The canonical billed model.
    Model,
    Provider,
    /// The value of request attribute `key` (`""` when the request has none).
    Attribute(String),
}

impl Dim {
    /// The name rows use for it: `identity`, `group`, `service_token`, `model`, `provider`,
    /// `attribute:KEY`.
    pub fn name(&self) -> String {
        match self {
            Dim::Identity => "identity".into(),
            Dim::Group => "group".into(),
            Dim::ServiceToken => "service_token".into(),
            Dim::Model => "model".into(),
            Dim::Provider => "provider".into(),
            Dim::Attribute(k) => format!("attribute:{k}"),
        }
    }

    /// Reads a [`Dim::name`] back (for query strings).
    pub fn parse(s: &str) -> Option<Dim> {
        Some(match s {
            "identity" => Dim::Identity,
            "group" => Dim::Group,
            "service_token" => Dim::ServiceToken,
            "model" => Dim::Model,
            "provider" => Dim::Provider,
            _ => Dim::Attribute(s.strip_prefix("attribute:")?.to_owned()),
        })
    }

    /// The values of this dimension for a counter's dims (several only for [`Dim::Group`]).
    fn values(&self, d: &UsageDims) -> Vec<String> {
        match self {
            Dim::Identity => vec![d.identity.clone()],
            Dim::Group => {
                let g = split_groups(&d.groups);
                if g.is_empty() {
                    vec![String::new()]
                } else {
                    g
                }
            }
            Dim::ServiceToken => vec![d.service_token.clone()],
            Dim::Model => vec![d.model.clone()],
            Dim::Provider => vec![d.provider.clone()],
            Dim::Attribute(k) => vec![split_attributes(&d.attributes)
                .into_iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v)
                .unwrap_or_default()],
        }
    }
}

impl Serialize for Dim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// A usage query: the counters of `[from, to)` (rounded out to hours), in `granularity` buckets, grouped
/// by `group_by` (none: one row per bucket), of the requests matching every filter (equality; a
/// [`Dim::Group`] filter matches a request with that group among its groups).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub from: Timestamp,
    pub to: Timestamp,
    pub granularity: Granularity,
    pub group_by: Vec<Dim>,
    pub filters: Vec<(Dim, String)>,
}

/// One row of a [`query`]: a bucket and a combination of the grouped dimensions' values.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRow {
    /// The bucket's start (an hour, or midnight UTC).
    pub start: Timestamp,
    /// The grouped dimensions' values, by [`Dim::name`].
    pub dims: BTreeMap<String, String>,
    /// Effective cost, exact.
    pub cost: Amount,
    pub list_cost: Amount,
    pub requests: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
}

const PAGE: usize = 10_000;

/// Reads every key of `[begin, end)` in pages, calling `each` on each.
fn scan(
    txn: &mut dyn Transaction,
    (mut begin, end): (Vec<u8>, Vec<u8>),
    limit: usize,
    mut each: impl FnMut(&[u8], &[u8]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let page_len = if limit > 0 { limit.min(PAGE) } else { PAGE };
    loop {
        let page = txn.get_range(&begin, &end, page_len)?;
        let Some((last, _)) = page.last() else {
            return Ok(());
        };
        let mut next = last.clone();
        next.push(0);
        for (k, v) in &page {
            if !each(k, v)? {
                return Ok(());
            }
        }
        if page.len() < page_len {
            return Ok(());
        }
        begin = next;
    }
}

fn timestamp(s: i64) -> Result<Timestamp, StoreError> {
    Timestamp::from_second(s).map_err(|e| StoreError::Corrupt(format!("second {s}: {e}")))
}

/// Answers `q` (see [`UsageQuery`]); rows in order of bucket, then dimension values.
pub fn query(store: &dyn Store, q: &UsageQuery) -> Result<Vec<UsageRow>, StoreError> {
    let from_hour = q.from.as_second().div_euclid(HOUR_SECS);
    let to_hour = (q.to.as_second() + HOUR_SECS - 1).div_euclid(HOUR_SECS);
    let mut rows: BTreeMap<(i64, Vec<String>), UsageCounts> = BTreeMap::new();
    transact(store, &RetryPolicy::default(), |txn| {
        rows.clear();
        // Consecutive keys usually share their dimensions (one key per measure): decide once per run.
        let mut last: Option<(i64, UsageDims, Vec<Vec<String>>)> = None;
        scan(txn, keys::usage_hours(from_hour, to_hour), 0, |k, v| {
            let (hour, dims, measure) = keys::parse_usage(k)?;
            let value = decode_i128(v)?;
            let same = last
                .as_ref()
                .is_some_and(|(h, d, _)| *h == hour && *d == dims);
            if !same {
                let matches = q
                    .filters
                    .iter()
                    .all(|(dim, want)| dim.values(&dims).iter().any(|v| v == want));
                let combos = if matches {
                    let mut combos: Vec<Vec<String>> = vec![Vec::new()];
                    for dim in &q.group_by {
                        let vals = dim.values(&dims);
                        combos = combos
                            .into_iter()
                            .flat_map(|c| {
                                vals.iter().map(move |v| {
                                    let mut c = c.clone();
                                    c.push(v.clone());
                                    c
                                })
                            })
                            .collect();
                    }
                    combos
                } else {
                    Vec::new()
                };
                last = Some((hour, dims, combos));
            }
            if let Some((_, _, combos)) = &last {
                let bucket = q.granularity.bucket(hour.saturating_mul(HOUR_SECS));
                for c in combos {
                    rows.entry((bucket, c.clone()))
                        .or_default()
                        .add_measure(&measure, value);
                }
            }
            Ok(true)
        })
    })?;
    let names: Vec<String> = q.group_by.iter().map(Dim::name).collect();
    rows.into_iter()
        .map(|((bucket, values), c)| {
            Ok(UsageRow {
                start: timestamp(bucket)?,
                dims: names.iter().cloned().zip(values).collect(),
                cost: Amount(Money::from_pico(c.cost)),
                list_cost: Amount(Money::from_pico(c.list_cost)),
                requests: c.requests,
                input_tokens: c.input_tokens,
                cached_input_tokens: c.cached_input_tokens,
                cache_write_tokens: c.cache_write_tokens,
                output_tokens: c.output_tokens,
                reasoning_tokens: c.reasoning_tokens,
            })
        })
        .collect()
}

/// Identities seen, in identity order, after the cursor `after` (the last [`Seen::identity`] of the
/// previous page; `None` for the first page), at most `limit` (0: no limit).
pub fn seen(store: &dyn Store, after: Option<&str>, limit: usize) -> Result<Vec<Seen>, StoreError> {
    transact(store, &RetryPolicy::default(), |txn| {
        let mut out = Vec::new();
        scan(txn, keys::seen_from(after), limit, |k, v| {
            keys::parse_seen(k)?;
            let s: Seen = serde_json::from_slice(v)
                .map_err(|e| StoreError::Corrupt(format!("a seen value: {e}")))?;
            out.push(s);
            Ok(limit == 0 || out.len() < limit)
        })?;
        Ok(out)
    })
}

/// One bucket of one budget instance's spend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetSpendRow {
    pub budget: String,
    /// `source:subject` for a per-identity instance, `""` for a shared one.
    pub member: String,
    /// The bucket's start.
    pub start: Timestamp,
    pub spent: Amount,
}

/// The spend of `budget` (every budget when `None`), per instance, in `granularity` buckets over `[from,
/// to)` rounded out to hours: sums of the ledger's 15-minute slots, so exact. Rows in order of budget,
/// member, bucket. Only what the ledger keeps (32 days and a slot) can be answered.
pub fn budget_spend(
    store: &dyn Store,
    budget: Option<&str>,
    from: Timestamp,
    to: Timestamp,
    granularity: Granularity,
) -> Result<Vec<BudgetSpendRow>, StoreError> {
    let from_slot = from.as_second().div_euclid(HOUR_SECS) * (HOUR_SECS / SLOT_SECS);
    let to_slot = (to.as_second() + HOUR_SECS - 1).div_euclid(HOUR_SECS) * (HOUR_SECS / SLOT_SECS);
    let range = match budget {
        Some(b) => keys::budget_spend(b),
        None => keys::all_spend(),
    };
    let mut rows: BTreeMap<(String, String, i64), i128> = BTreeMap::new();
    transact(store, &RetryPolicy::default(), |txn| {
        rows.clear();
        scan(txn, range.clone(), 0, |k, v| {
            let (b, m, slot) = keys::parse_spend(k)?;
            if (from_slot..to_slot).contains(&slot) {
                let bucket = granularity.bucket(slot.saturating_mul(SLOT_SECS));
                let e = rows.entry((b, m, bucket)).or_insert(0);
                *e = e.wrapping_add(decode_i128(v)?);
            }
            Ok(true)
        })
    })?;
    rows.into_iter()
        .map(|((budget, member, bucket), pico)| {
            Ok(BudgetSpendRow {
                budget,
                member,
                start: timestamp(bucket)?,
                spent: Amount(Money::from_pico(pico)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::store::ledger::{apply_batch, Batch, InstanceName};
    use crate::store::mem::{Fault, MemStore};

    fn t(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn dims(
        model: &str,
        identity: &str,
        groups: &[&str],
        token: &str,
        attrs: &[(&str, &str)],
    ) -> UsageDims {
        UsageDims {
            provider: if model.starts_with("claude") {
                "anthropic"
            } else {
                "openai"
            }
            .into(),
            model: model.into(),
            identity: identity.into(),
            groups: groups_dim(groups),
            service_token: token.into(),
            attributes: attributes_dim(attrs),
        }
    }

    fn counts(cost: i128, input: u64, output: u64) -> UsageCounts {
        UsageCounts {
            cost,
            list_cost: cost * 2,
            requests: 1,
            input_tokens: input,
            output_tokens: output,
            ..UsageCounts::default()
        }
    }

    fn seen_at(identity: &str, at: &str) -> Seen {
        Seen {
            identity: identity.into(),
            kind: "user".into(),
            subject: identity.split(':').nth(1).unwrap_or("").into(),
            source: "okta".into(),
            groups: vec!["eng".into()],
            service_token: None,
            team: None,
            first_seen: t(at),
            last_seen: t(at),
        }
    }

    /// Three requests by alice (groups eng, ops), one by a service token, across two hours and two days.
    fn store() -> MemStore {
        let store = MemStore::new();
        let mut b = Batch::default();
        let alice = |m| dims(m, "okta:alice", &["ops", "eng"], "", &[("team", "x;y=z")]);
        b.add_usage(
            "s",
            1,
            t("2026-11-28T10:05:00Z"),
            alice("gpt-4o"),
            &counts(5, 10, 20),
        );
        b.add_usage(
            "s",
            2,
            t("2026-11-28T10:59:59Z"),
            alice("gpt-4o"),
            &counts(7, 1, 2),
        );
        b.add_usage(
            "s",
            3,
            t("2026-11-28T11:00:00Z"),
            alice("claude-sonnet-4"),
            &counts(11, 3, 4),
        );
        b.add_usage(
            "s",
            4,
            t("2026-11-29T00:30:00Z"),
            dims("gpt-4o", "service-token:ci", &["platform"], "ci", &[]),
            &counts(1_000_000_000_001, 100, 200),
        );
        b.saw(seen_at("okta:alice", "2026-11-28T10:05:00Z"));
        b.saw(seen_at("okta:alice", "2026-11-28T11:00:00Z"));
        b.saw(seen_at("service-token:ci", "2026-11-29T00:30:00Z"));
        b.saw(seen_at("", "2026-11-29T00:30:00Z"));
        transact(&store, &RetryPolicy::default(), |txn| apply_batch(txn, &b)).unwrap();
        store
    }

    fn q(g: Granularity, group_by: Vec<Dim>, filters: Vec<(Dim, &str)>) -> UsageQuery {
        UsageQuery {
            from: t("2026-11-28T00:00:00Z"),
            to: t("2026-11-30T00:00:00Z"),
            granularity: g,
            group_by,
            filters: filters
                .into_iter()
                .map(|(d, v)| (d, v.to_owned()))
                .collect(),
        }
    }

    #[test]
    fn dimensions_escape_and_read_back() {
        assert_eq!(groups_dim(&["b", "a,1", "b"]), "a%2C1,b");
        assert_eq!(split_groups("a%2C1,b"), vec!["a,1", "b"]);
        assert_eq!(split_groups(""), Vec::<String>::new());
        let a = attributes_dim(&[("team", "x;y=z%"), ("env", "prod")]);
        assert_eq!(a, "env=prod;team=x%3By%3Dz%25");
        assert_eq!(
            split_attributes(&a),
            vec![
                ("env".to_owned(), "prod".to_owned()),
                ("team".to_owned(), "x;y=z%".to_owned())
            ]
        );
        assert_eq!(identity_dim(true, "anonymous", "anonymous"), "");
        assert_eq!(identity_dim(false, "okta", "alice"), "okta:alice");
    }

    #[test]
    fn hourly_rows_grouped_by_model_are_exact() {
        let rows = query(&store(), &q(Granularity::Hour, vec![Dim::Model], vec![])).unwrap();
        let got: Vec<(String, String, i128, u64)> = rows
            .iter()
            .map(|r| {
                (
                    r.start.to_string(),
                    r.dims["model"].clone(),
                    r.cost.0.pico(),
                    r.requests,
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("2026-11-28T10:00:00Z".into(), "gpt-4o".into(), 12, 2),
                (
                    "2026-11-28T11:00:00Z".into(),
                    "claude-sonnet-4".into(),
                    11,
                    1
                ),
                (
                    "2026-11-29T00:00:00Z".into(),
                    "gpt-4o".into(),
                    1_000_000_000_001,
                    1
                ),
            ]
        );
        assert_eq!(rows[0].list_cost.0.pico(), 24);
        assert_eq!((rows[0].input_tokens, rows[0].output_tokens), (11, 22));
    }

    #[test]
    fn daily_rows_filters_and_groups() {
        let s = store();
        // Daily, no grouping: one row per UTC day.
        let rows = query(&s, &q(Granularity::Day, vec![], vec![])).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].start, t("2026-11-28T00:00:00Z"));
        assert_eq!((rows[0].cost.0.pico(), rows[0].requests), (23, 3));
        assert_eq!(rows[1].cost.0.pico(), 1_000_000_000_001);
        // A request counts in each of its groups.
        let rows = query(&s, &q(Granularity::Day, vec![Dim::Group], vec![])).unwrap();
        let got: Vec<(String, i128)> = rows
            .iter()
            .map(|r| (r.dims["group"].clone(), r.cost.0.pico()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("eng".into(), 23),
                ("ops".into(), 23),
                ("platform".into(), 1_000_000_000_001)
            ]
        );
        // Filters: group membership, attribute value, service token, provider.
        let one = |filters| {
            let r = query(&s, &q(Granularity::Day, vec![], filters)).unwrap();
            r.iter().map(|r| r.cost.0.pico()).sum::<i128>()
        };
        assert_eq!(one(vec![(Dim::Group, "ops")]), 23);
        assert_eq!(one(vec![(Dim::Attribute("team".into()), "x;y=z")]), 23);
        assert_eq!(one(vec![(Dim::ServiceToken, "ci")]), 1_000_000_000_001);
        assert_eq!(one(vec![(Dim::ServiceToken, "")]), 23);
        assert_eq!(
            one(vec![(Dim::Provider, "anthropic"), (Dim::Group, "eng")]),
            11
        );
        assert_eq!(one(vec![(Dim::Identity, "okta:bob")]), 0);
        // Two dimensions, an attribute among them ("" where a request has none).
        let rows = query(
            &s,
            &q(
                Granularity::Day,
                vec![Dim::Identity, Dim::Attribute("team".into())],
                vec![],
            ),
        )
        .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].dims["identity"], "okta:alice");
        assert_eq!(rows[0].dims["attribute:team"], "x;y=z");
        assert_eq!(rows[1].dims["attribute:team"], "");
        // The window: [from, to) rounded out to hours.
        let mut only = q(Granularity::Hour, vec![], vec![]);
        only.from = t("2026-11-28T10:30:00Z");
        only.to = t("2026-11-28T10:31:00Z");
        let rows = query(&s, &only).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].cost.0.pico(), 12);
    }

    #[test]
    fn rows_serialize_money_exactly() {
        let rows = query(&store(), &q(Granularity::Day, vec![Dim::Model], vec![])).unwrap();
        let j = serde_json::to_value(&rows).unwrap();
        let last = &j[2];
        assert_eq!(last["cost"]["usd"], "1.000000000001");
        assert_eq!(last["cost"]["pico"], 1_000_000_000_001i64);
        assert_eq!(last["start"], "2026-11-29T00:00:00Z");
        assert_eq!(last["dims"]["model"], "gpt-4o");
    }

    #[test]
    fn seen_keeps_first_seen_and_pages() {
        let s = store();
        let all = seen(&s, None, 0).unwrap();
        let ids: Vec<&str> = all.iter().map(|x| x.identity.as_str()).collect();
        assert_eq!(ids, vec!["", "okta:alice", "service-token:ci"]);
        assert_eq!(all[1].first_seen, t("2026-11-28T10:05:00Z"));
        assert_eq!(all[1].last_seen, t("2026-11-28T11:00:00Z"));
        // A later batch moves last_seen and keeps the stored first_seen.
        let mut b = Batch::default();
        b.saw(seen_at("okta:alice", "2026-12-01T00:00:00Z"));
        transact(&s, &RetryPolicy::default(), |txn| apply_batch(txn, &b)).unwrap();
        let page = seen(&s, Some(""), 1).unwrap();
        assert_eq!(page.len(), 1);
        assert_eq!(page[0].identity, "okta:alice");
        assert_eq!(page[0].first_seen, t("2026-11-28T10:05:00Z"));
        assert_eq!(page[0].last_seen, t("2026-12-01T00:00:00Z"));
        let next = seen(&s, Some("okta:alice"), 1).unwrap();
        assert_eq!(next[0].identity, "service-token:ci");
        assert!(seen(&s, Some("service-token:ci"), 1).unwrap().is_empty());
    }

    /// Usage is applied exactly once with its batch: a retry after an unknown commit outcome adds nothing.
    #[test]
    fn usage_is_applied_once_with_its_batch() {
        let s = MemStore::new();
        let mut b = Batch::default();
        b.add_usage(
            "run-c0",
            1,
            t("2026-11-28T10:00:00Z"),
            dims("gpt-4o", "", &[], "", &[]),
            &counts(9, 1, 1),
        );
        s.inject(Fault::UnknownCommit { applied: true });
        transact(&s, &RetryPolicy::default(), |txn| apply_batch(txn, &b)).unwrap();
        assert!(!transact(&s, &RetryPolicy::default(), |txn| apply_batch(txn, &b)).unwrap());
        let rows = query(&s, &q(Granularity::Hour, vec![Dim::Identity], vec![])).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].cost.0.pico(), rows[0].requests), (9, 1));
        assert_eq!(rows[0].dims["identity"], "");
    }

    #[test]
    fn budget_spend_sums_slots_into_buckets() {
        let s = MemStore::new();
        let mut b = Batch::default();
        let name = |b: &str, m: &str| InstanceName {
            budget: b.into(),
            member: m.into(),
        };
        for (i, at) in [
            "2026-11-28T10:00:00Z",
            "2026-11-28T10:45:00Z",
            "2026-11-28T11:15:00Z",
            "2026-11-29T01:00:00Z",
        ]
        .iter()
        .enumerate()
        {
            b.add(
                "s",
                i as u64 + 1,
                name("team", ""),
                Money::from_pico(10 + i as i128),
                t(at),
            );
        }
        b.add(
            "s",
            9,
            name("me", "okta:a"),
            Money::from_pico(3),
            t("2026-11-28T10:00:00Z"),
        );
        transact(&s, &RetryPolicy::default(), |txn| apply_batch(txn, &b)).unwrap();
        let from = t("2026-11-28T00:00:00Z");
        let to = t("2026-11-30T00:00:00Z");
        let rows = budget_spend(&s, Some("team"), from, to, Granularity::Hour).unwrap();
        let got: Vec<(String, i128)> = rows
            .iter()
            .map(|r| (r.start.to_string(), r.spent.0.pico()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("2026-11-28T10:00:00Z".into(), 21),
                ("2026-11-28T11:00:00Z".into(), 12),
                ("2026-11-29T01:00:00Z".into(), 13)
            ]
        );
        let rows = budget_spend(&s, None, from, to, Granularity::Day).unwrap();
        let got: Vec<(String, String, String, i128)> = rows
            .iter()
            .map(|r| {
                (
                    r.budget.clone(),
                    r.member.clone(),
                    r.start.to_string(),
                    r.spent.0.pico(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    "me".into(),
                    "okta:a".into(),
                    "2026-11-28T00:00:00Z".into(),
                    3
                ),
                ("team".into(), "".into(), "2026-11-28T00:00:00Z".into(), 33),
                ("team".into(), "".into(), "2026-11-29T00:00:00Z".into(), 13)
            ]
        );
        // The window cuts at hours.
        let rows = budget_spend(
            &s,
            Some("team"),
            t("2026-11-28T11:00:00Z"),
            t("2026-11-28T12:00:00Z"),
            Granularity::Day,
        )
        .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].spent.0.pico(), 12);
    }
}
