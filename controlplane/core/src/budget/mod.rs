//! Dollar budgets: the `[[budgets]]` and `[attributes]` configuration, the windows budgets are counted
//! over, and which budget instances a request is charged against. The spend itself is counted by
//! [`crate::budget::owner::Ledger`].
//!
//! Owns: [`BudgetSet`] (validated budgets and declared attributes), [`Window`] (calendar or rolling) and
//! [`InstanceKey`] (one budget for one member, the unit the ledger counts).
//!
//! ```toml
//! [attributes]
//! # Custom request attributes budgets can filter on (see `attributes`): key -> the header carrying it,
//! project = "x-tollgate-project"
//! # or a table: a header or a source in the caller's identity, whether it is required, allowed values.
//! team = { from = "claim:team", required = true, values = ["apollo", "zeus"] }
//!
//! [[budgets]]
//! name = "engineers-monthly"      # unique, [A-Za-z0-9_.-], 1..64
//! amount_usd = "500"              # decimal string, > 0 (at most 1e12)
//! window = "month"                # "day" | "week" (Monday start) | "month": calendar, in `timezone`;
//!                                 # or rolling "<n>m" | "<n>h" | "<n>d", 1 minute .. 366 days
//! timezone = "Europe/Berlin"      # IANA name, default "UTC"; calendar windows only
//! scope = "each_member"           # each_member | group | user | service_token | each_identity | everyone
//! group = "engineering"           # required for each_member / group
//! # user = "alice@example.com"    # required for scope = "user" (subject or email)
//! # service_token = "ci-bot"      # required for scope = "service_token" (the token's name)
//! models = ["gpt-5*"]             # globs over the model's names: requested, upstream, canonical
//!                                 # (price sheet: "gpt-4o" covers "gpt-4o-2024-08-06"); absent = all
//! providers = ["openai"]          # globs over provider names; absent = all
//! attributes = { project = "apollo" }  # exact matches; keys declared in [attributes]
//! action = "block"                # block (default) | downgrade | alert
//! downgrade_to = "gpt-4o-mini"    # required iff action = "downgrade"
//! on_insufficient = "block"       # block (default) | lower_max_tokens
//! stream_cutoff = false           # end a stream whose visible output reaches what was reserved
//! on_store_failure = "closed"     # closed (default) | open: when spend cannot be made durable
//! alert_at = [50, 80, 100]        # percent thresholds, 1..=1000, each fires once per window
//! webhook = "https://hooks.example.com/x"  # https (http only for loopback)
//! ```
//!
//! Attributes: declared in `[attributes]`, taken from a header or from the caller's identity (a JWT claim,
//! a service token's attribute), optionally required and restricted to listed values; the rules are in
//! [`attributes`]. A budget's `attributes` filter names declared keys, with values among the declared ones.
//!
//! Model filters match the model's names the way policies do (`crate::auth::identity`, "One model
//! identity"): the requested name, the upstream name, or the canonical price-sheet name of the billed
//! model, so `models = ["gpt-4o"]` applies to `gpt-4o-2024-08-06`.
//!
//! Windows: calendar windows start at local midnight (the day), Monday 00:00 (the week) or the 1st 00:00
//! (the month) in the budget's time zone, so a local day can be 23 or 25 hours long across a DST change;
//! where local midnight does not exist the window starts at the day's earliest valid instant. Time zones
//! come from the system's tz database (`/usr/share/zoneinfo`). Rolling windows are counted in 60 buckets
//! of `span / 60` (whole seconds, at least 1 s): a rolling window counts spend from between `span` and
//! `span + bucket` ago: spend leaves the window at most one bucket (1/60 of the span) late, never early,
//! so the budget is never overspent because of rounding.
//!
//! Fails: configuration problems come back as (field, reason) pairs for the config's error list; at run
//! time only window arithmetic at the edge of the representable time range can fail ([`BudgetError`]).
//! Cost: applicability is a walk over the budgets with a few glob matches per request; calendar window
//! boundaries are a few time zone look-ups (well under a microsecond each).

pub mod attributes;
pub mod owner;
pub mod slices;

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde::Deserialize;

use crate::auth::identity::{Identity, IdentityKind, ModelNames};
use crate::pricing::money::{Money, PICO_PER_USD};

/// The largest budget amount, USD 1e12: keeps threshold arithmetic (`amount × 1000 %`) far inside `i128`.
const MAX_AMOUNT_USD: i128 = 1_000_000_000_000;

pub use attributes::{Attributes, RawAttribute, RawAttributes, ATTRIBUTE_HEADER_PREFIX};

/// Runtime errors of budget windows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BudgetError {
    #[error("cannot compute the budget window at {at}: {reason}")]
    Window { at: Timestamp, reason: String },
}

/// `[[budgets]]` as written.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RawBudget {
    /// Named in 429 bodies, headers, alerts and logs.
    pub name: String,
    pub amount_usd: String,
    pub window: String,
    pub timezone: Option<String>,
    pub scope: String,
    pub group: Option<String>,
    pub user: Option<String>,
    pub service_token: Option<String>,
    pub models: Option<Vec<String>>,
    pub providers: Option<Vec<String>>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    pub action: Option<String>,
    pub downgrade_to: Option<String>,
    pub on_insufficient: Option<String>,
    pub stream_cutoff: Option<bool>,
    pub on_store_failure: Option<String>,
    #[serde(default)]
    pub alert_at: Vec<u32>,
    pub webhook: Option<String>,
}

/// Calendar units a window can follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalendarUnit {
    Day,
    /// Monday 00:00 to the next Monday 00:00.
    Week,
    Month,
}

/// What spend a budget counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Window {
    /// The calendar day, week or month containing now, in `tz`.
    Calendar { unit: CalendarUnit, tz: TimeZone },
    /// The last `span`, counted in buckets of `bucket` (see the module docs for the precision).
    Rolling {
        span: SignedDuration,
        bucket: SignedDuration,
    },
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Window::Calendar { unit, tz } => {
                let unit = match unit {
                    CalendarUnit::Day => "day",
                    CalendarUnit::Week => "week",
                    CalendarUnit::Month => "month",
                };
                write!(f, "{unit} ({})", tz.iana_name().unwrap_or("UTC"))
            }
            Window::Rolling { span, .. } => write!(f, "rolling {}s", span.as_secs()),
        }
    }
}

impl Window {
    /// The shortest and longest rolling spans.
    const MIN_SPAN_SECS: i64 = 60;
    const MAX_SPAN_SECS: i64 = 366 * 86_400;

    /// A rolling window of `span`, with its bucket of `span / 60` rounded up to whole seconds.
    pub fn rolling(span: SignedDuration) -> Window {
        let secs = span.as_secs().max(1);
        let bucket = SignedDuration::from_secs(((secs + 59) / 60).max(1));
        Window::Rolling { span, bucket }
    }

    /// Parses `day` / `week` / `month` (with `tz`) or `<n>m` / `<n>h` / `<n>d`.
    fn parse(s: &str, tz: TimeZone) -> Result<Window, String> {
        let unit = match s {
            "day" => Some(CalendarUnit::Day),
            "week" => Some(CalendarUnit::Week),
            "month" => Some(CalendarUnit::Month),
            _ => None,
        };
        if let Some(unit) = unit {
            return Ok(Window::Calendar { unit, tz });
        }
        let bad = || {
            format!(
                "{s:?} is not a window: write \"day\", \"week\", \"month\" or a rolling span such as \"30m\", \"24h\", \"7d\""
            )
        };
        let (digits, per) = match s.as_bytes().last() {
            Some(b'm') => (&s[..s.len() - 1], 60),
            Some(b'h') => (&s[..s.len() - 1], 3600),
            Some(b'd') => (&s[..s.len() - 1], 86_400),
            _ => return Err(bad()),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) || digits.len() > 9 {
            return Err(bad());
        }
        let n: i64 = digits.parse().map_err(|_| bad())?;
        let secs = n * per;
        if !(Self::MIN_SPAN_SECS..=Self::MAX_SPAN_SECS).contains(&secs) {
            return Err(format!(
                "{s:?} is out of range: a rolling window is 1 minute to 366 days"
            ));
        }
        Ok(Window::rolling(SignedDuration::from_secs(secs)))
    }

    pub fn is_rolling(&self) -> bool {
        matches!(self, Window::Rolling { .. })
    }

    /// The window counting spend at `now`, as `[start, end)`.
    ///
    /// Calendar: the local day, week or month containing `now`. Rolling: from the start of the oldest
    /// bucket still counted to the end of the current bucket.
    pub fn period(&self, now: Timestamp) -> Result<(Timestamp, Timestamp), BudgetError> {
        let err = |e: jiff::Error| BudgetError::Window {
            at: now,
            reason: e.to_string(),
        };
        match self {
            Window::Calendar { unit, tz } => {
                let date = now.to_zoned(tz.clone()).date();
                let (first, next) = match unit {
                    CalendarUnit::Day => (date, date.checked_add(1.day()).map_err(err)?),
                    CalendarUnit::Week => {
                        let back = i64::from(date.weekday().to_monday_zero_offset());
                        let monday = date.checked_sub(back.days()).map_err(err)?;
                        (monday, monday.checked_add(7.days()).map_err(err)?)
                    }
                    CalendarUnit::Month => {
                        let first = date.first_of_month();
                        (first, first.checked_add(1.month()).map_err(err)?)
                    }
                };
                let start = |d: jiff::civil::Date| -> Result<Timestamp, BudgetError> {
                    Ok(d.to_zoned(tz.clone())
                        .and_then(|z| z.start_of_day())
                        .map_err(err)?
                        .timestamp())
                };
                Ok((start(first)?, start(next)?))
            }
            Window::Rolling { bucket, .. } => {
                let (lo, hi) = self.rolling_range(now).ok_or(BudgetError::Window {
                    at: now,
                    reason: "out of range".into(),
                })?;
                let b = bucket.as_secs().max(1);
                let ts = |i: i64| {
                    i.checked_mul(b)
                        .and_then(|s| Timestamp::from_second(s).ok())
                        .ok_or(BudgetError::Window {
                            at: now,
                            reason: "out of range".into(),
                        })
                };
                Ok((ts(lo)?, ts(hi.saturating_add(1))?))
            }
        }
    }

    /// Rolling windows: the bucket length in seconds, or `None` for calendar windows.
    pub(crate) fn bucket_secs(&self) -> Option<i64> {
        match self {
            Window::Rolling { bucket, .. } => Some(bucket.as_secs().max(1)),
            Window::Calendar { .. } => None,
        }
    }

    /// Rolling windows: the indices of the oldest bucket still counted at `now` and of the current one.
    /// Bucket `i` covers `[i × bucket, (i + 1) × bucket)` seconds and is counted while
    /// `(i + 1) × bucket + span > now`.
    pub(crate) fn rolling_range(&self, now: Timestamp) -> Option<(i64, i64)> {
        match self {
            Window::Rolling { span, bucket } => {
                let b = bucket.as_secs().max(1);
                let s = now.as_second();
                Some(((s - span.as_secs()).div_euclid(b), s.div_euclid(b)))
            }
            Window::Calendar { .. } => None,
        }
    }
}

/// Whose spend one budget instance counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One instance per identity in the group.
    EachMember(String),
    /// The group as a whole.
    Group(String),
    /// One user, by subject or email.
    User(String),
    /// One service token, by name.
    ServiceToken(String),
    /// One instance per identity, everyone.
    EachIdentity,
    /// One instance shared by everyone.
    Everyone,
}

/// What happens when a budget cannot cover a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Refuse with 429.
    Block,
    /// Route to this client-facing model instead.
    Downgrade(String),
    /// Only alert; the budget never refuses.
    Alert,
}

/// When the remaining amount cannot cover a request's `max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insufficient {
    Block,
    /// Lower `max_tokens` to what the remaining amount covers.
    LowerMaxTokens,
}

/// One validated budget.
#[derive(Debug, Clone)]
pub struct Budget {
    pub name: Arc<str>,
    pub amount: Money,
    pub window: Window,
    pub scope: Scope,
    pub models: Vec<glob::Pattern>,
    pub providers: Vec<glob::Pattern>,
    /// (key, value) pairs the request's attributes must all match.
    pub attributes: Vec<(String, String)>,
    pub action: Action,
    pub on_insufficient: Insufficient,
    /// End a stream once its visible output reaches the output tokens its reservation covers (the data
    /// plane's forward phase), so a request without a cap cannot spend past its reservation.
    pub stream_cutoff: bool,
    /// Whether the budget keeps admitting when spend cannot be made durable (the journal cannot be
    /// written, or the store has failed for longer than `ledger.fail_closed_after_ms`).
    pub fail_open: bool,
    /// Percent thresholds, ascending, without duplicates.
    pub alert_at: Vec<u32>,
    pub webhook: Option<String>,
}

impl Budget {
    fn filters_match(&self, r: &BudgetRequest<'_>) -> bool {
        let names = ModelNames {
            requested: r.model,
            upstream: r.upstream_model,
            canonical: r.canonical_model,
        };
        let models = self.models.is_empty() || self.models.iter().any(|p| names.matched_by(p));
        let providers =
            self.providers.is_empty() || self.providers.iter().any(|p| p.matches(r.provider));
        let attributes = self
            .attributes
            .iter()
            .all(|(k, v)| r.attributes.iter().any(|(rk, rv)| rk == k && rv == v));
        models && providers && attributes
    }
}

/// What budget applicability is decided on, besides the identity.
#[derive(Debug, Clone, Copy)]
pub struct BudgetRequest<'a> {
    /// The model name the client asked for.
    pub model: &'a str,
    /// The upstream model the route sends it to, when it renames.
    pub upstream_model: Option<&'a str>,
    /// The canonical price-sheet name of the model the provider will bill, when the sheet lists it.
    pub canonical_model: Option<&'a str>,
    /// The provider's configured name.
    pub provider: &'a str,
    /// (key, value) attributes from the request headers and the identity (see [`Attributes::resolve`]).
    pub attributes: &'a [(String, String)],
}

/// One budget for one member: what the ledger counts. Equal (and hashed) by budget name and member, so a
/// reloaded definition of the same budget keeps counting the same spend.
#[derive(Debug, Clone)]
pub struct InstanceKey {
    pub budget: Arc<Budget>,
    /// `source:subject` for per-identity scopes; `None` for shared instances.
    pub member: Option<Arc<str>>,
}

impl InstanceKey {
    /// `engineers-monthly[okta:alice]`, or the budget name for a shared instance.
    pub fn label(&self) -> String {
        match &self.member {
            Some(m) => format!("{}[{m}]", self.budget.name),
            None => self.budget.name.to_string(),
        }
    }
}

impl PartialEq for InstanceKey {
    fn eq(&self, other: &Self) -> bool {
        self.budget.name == other.budget.name && self.member == other.member
    }
}

impl Eq for InstanceKey {}

impl Hash for InstanceKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.budget.name.hash(state);
        self.member.hash(state);
    }
}

/// Every configured budget, validated, in file order, and the declared attributes.
#[derive(Debug, Clone, Default)]
pub struct BudgetSet {
    budgets: Vec<Arc<Budget>>,
    attributes: Attributes,
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl BudgetSet {
    /// Validates `[[budgets]]` and `[attributes]`; problems come back as (field, reason) pairs.
    pub fn from_raw(
        raw: Vec<RawBudget>,
        attributes: RawAttributes,
    ) -> Result<BudgetSet, Vec<(String, String)>> {
        let mut is: Vec<(String, String)> = Vec::new();
        let attrs = Attributes::from_raw(attributes, &mut is);
        let mut budgets = Vec::with_capacity(raw.len());
        let mut names = std::collections::HashSet::new();
        for (i, b) in raw.into_iter().enumerate() {
            let at = |f: &str| format!("budgets[{i}].{f}");
            if !valid_name(&b.name) {
                is.push((at("name"), "must be 1 to 64 of [A-Za-z0-9_.-]".into()));
            } else if !names.insert(b.name.clone()) {
                is.push((at("name"), format!("{:?} names another budget too", b.name)));
            }
            let amount = match Money::parse_usd(&b.amount_usd) {
                Ok(m) if m.pico() <= 0 => {
                    is.push((at("amount_usd"), "must be more than 0".into()));
                    Money::ZERO
                }
                Ok(m) if m.pico() > MAX_AMOUNT_USD * PICO_PER_USD => {
                    is.push((at("amount_usd"), "must be at most 1000000000000".into()));
                    Money::ZERO
                }
                Ok(m) => m,
                Err(e) => {
                    is.push((at("amount_usd"), e.to_string()));
                    Money::ZERO
                }
            };
            let tz = match &b.timezone {
                None => TimeZone::UTC,
                Some(name) => match jiff::tz::db().get(name) {
                    Ok(tz) => tz,
                    Err(_) => {
                        is.push((
                            at("timezone"),
                            format!("{name:?} is not a known IANA time zone (such as \"Europe/Berlin\")"),
                        ));
                        TimeZone::UTC
                    }
                },
            };
            let window = match Window::parse(&b.window, tz) {
                Ok(w) => {
                    if w.is_rolling() && b.timezone.is_some() {
                        is.push((
                            at("timezone"),
                            "only calendar windows (day, week, month) have a time zone; remove it for a rolling window".into(),
                        ));
                    }
                    w
                }
                Err(e) => {
                    is.push((at("window"), e));
                    Window::rolling(SignedDuration::from_secs(60))
                }
            };
            let needs = |field: &str, v: &Option<String>, is: &mut Vec<(String, String)>| match v {
                Some(s) if !s.is_empty() => s.clone(),
                _ => {
                    is.push((at(field), format!("required for scope = {:?}", b.scope)));
                    String::new()
                }
            };
            let (scope, allowed): (Scope, &[&str]) = match b.scope.as_str() {
                "each_member" => (
                    Scope::EachMember(needs("group", &b.group, &mut is)),
                    &["group"],
                ),
                "group" => (Scope::Group(needs("group", &b.group, &mut is)), &["group"]),
                "user" => (Scope::User(needs("user", &b.user, &mut is)), &["user"]),
                "service_token" => (
                    Scope::ServiceToken(needs("service_token", &b.service_token, &mut is)),
                    &["service_token"],
                ),
                "each_identity" => (Scope::EachIdentity, &[]),
                "everyone" => (Scope::Everyone, &[]),
                other => {
                    is.push((
                        at("scope"),
                        format!("{other:?} is not a scope: write each_member, group, user, service_token, each_identity or everyone"),
                    ));
                    (Scope::Everyone, &["group", "user", "service_token"])
                }
            };
            for (field, v) in [
                ("group", &b.group),
                ("user", &b.user),
                ("service_token", &b.service_token),
            ] {
                if v.is_some() && !allowed.contains(&field) {
                    is.push((
                        at(field),
                        format!("does not apply to scope = {:?}; remove it", b.scope),
                    ));
                }
            }
            let mut globs = |field: &str, v: &Option<Vec<String>>| -> Vec<glob::Pattern> {
                v.iter()
                    .flatten()
                    .enumerate()
                    .filter_map(|(j, g)| match glob::Pattern::new(g) {
                        Ok(p) => Some(p),
                        Err(e) => {
                            is.push((format!("budgets[{i}].{field}[{j}]"), e.to_string()));
                            None
                        }
                    })
                    .collect()
            };
            let models = globs("models", &b.models);
            let providers = globs("providers", &b.providers);
            let mut attributes = Vec::new();
            for (k, v) in &b.attributes {
                match attrs.get(k) {
                    Some(a) if !a.values.is_empty() && !a.values.contains(v) => is.push((
                        at(&format!("attributes.{k}")),
                        format!(
                            "{v:?} is not among the values [attributes] allows for {k:?}: {}",
                            a.values.join(", ")
                        ),
                    )),
                    Some(_) => attributes.push((k.clone(), v.clone())),
                    None => is.push((
                        at(&format!("attributes.{k}")),
                        format!("{k:?} is not declared in [attributes]"),
                    )),
                }
            }
            let action = match (b.action.as_deref().unwrap_or("block"), &b.downgrade_to) {
                ("block", None) => Action::Block,
                ("alert", None) => Action::Alert,
                ("downgrade", Some(m)) if !m.is_empty() => Action::Downgrade(m.clone()),
                ("downgrade", _) => {
                    is.push((
                        at("downgrade_to"),
                        "required with action = \"downgrade\": the model to route to instead"
                            .into(),
                    ));
                    Action::Block
                }
                ("block" | "alert", Some(_)) => {
                    is.push((
                        at("downgrade_to"),
                        "only applies with action = \"downgrade\"".into(),
                    ));
                    Action::Block
                }
                (other, _) => {
                    is.push((
                        at("action"),
                        format!("{other:?} is not an action: write block, downgrade or alert"),
                    ));
                    Action::Block
                }
            };
            let fail_open = match b.on_store_failure.as_deref().unwrap_or("closed") {
                "closed" => false,
                "open" => true,
                other => {
                    is.push((
                        at("on_store_failure"),
                        format!("{other:?} is not allowed: write closed or open"),
                    ));
                    false
                }
            };
            let on_insufficient = match b.on_insufficient.as_deref().unwrap_or("block") {
                "block" => Insufficient::Block,
                "lower_max_tokens" => Insufficient::LowerMaxTokens,
                other => {
                    is.push((
                        at("on_insufficient"),
                        format!("{other:?} is not allowed: write block or lower_max_tokens"),
                    ));
                    Insufficient::Block
                }
            };
            let mut alert_at = b.alert_at.clone();
            for (j, t) in b.alert_at.iter().enumerate() {
                if !(1..=1000).contains(t) {
                    is.push((
                        format!("budgets[{i}].alert_at[{j}]"),
                        "must be a percentage from 1 to 1000".into(),
                    ));
                }
            }
            alert_at.sort_unstable();
            if alert_at.windows(2).any(|w| w[0] == w[1]) {
                is.push((at("alert_at"), "lists a threshold twice".into()));
            }
            if let Some(u) = &b.webhook {
                if let Err(e) = crate::auth::jwt::check_url(u) {
                    is.push((at("webhook"), e));
                }
            }
            budgets.push(Arc::new(Budget {
                name: Arc::from(b.name.as_str()),
                amount,
                window,
                scope,
                models,
                providers,
                attributes,
                action,
                on_insufficient,
                stream_cutoff: b.stream_cutoff.unwrap_or(false),
                fail_open,
                alert_at,
                webhook: b.webhook,
            }));
        }
        if is.is_empty() {
            Ok(BudgetSet {
                budgets,
                attributes: attrs,
            })
        } else {
            Err(is)
        }
    }

    pub fn budgets(&self) -> &[Arc<Budget>] {
        &self.budgets
    }

    pub fn is_empty(&self) -> bool {
        self.budgets.is_empty()
    }

    /// The budget named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Budget>> {
        self.budgets.iter().find(|b| &*b.name == name)
    }

    /// The declared attributes.
    pub fn attributes(&self) -> &Attributes {
        &self.attributes
    }

    /// The budget instances request `r` by `id` is charged against, in file order.
    pub fn applicable(&self, id: &Identity, r: &BudgetRequest<'_>) -> Vec<InstanceKey> {
        let in_group = |g: &str| id.groups.iter().any(|x| **x == *g);
        let member = || Some(Arc::from(format!("{}:{}", id.source, id.subject).as_str()));
        self.budgets
            .iter()
            .filter(|b| b.filters_match(r))
            .filter_map(|b| {
                let member = match &b.scope {
                    Scope::EachMember(g) if in_group(g) => member(),
                    Scope::Group(g) if in_group(g) => None,
                    Scope::User(u)
                        if id.kind == IdentityKind::User
                            && (**u == *id.subject || id.email.as_deref() == Some(u.as_str())) =>
                    {
                        None
                    }
                    Scope::ServiceToken(n)
                        if id.kind == IdentityKind::Service && **n == *id.subject =>
                    {
                        None
                    }
                    Scope::EachIdentity => member(),
                    Scope::Everyone => None,
                    _ => return None,
                };
                Some(InstanceKey {
                    budget: Arc::clone(b),
                    member,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn set(toml_text: &str) -> BudgetSet {
        try_set(toml_text).unwrap()
    }

    fn try_set(toml_text: &str) -> Result<BudgetSet, Vec<(String, String)>> {
        #[derive(Deserialize)]
        struct F {
            #[serde(default)]
            attributes: RawAttributes,
            #[serde(default)]
            budgets: Vec<RawBudget>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        BudgetSet::from_raw(f.budgets, f.attributes)
    }

    use crate::auth::identity::testing::{service, user};

    fn req<'a>(model: &'a str, attributes: &'a [(String, String)]) -> BudgetRequest<'a> {
        BudgetRequest {
            model,
            upstream_model: None,
            canonical_model: None,
            provider: "openai",
            attributes,
        }
    }

    fn labels(keys: &[InstanceKey]) -> Vec<String> {
        keys.iter().map(InstanceKey::label).collect()
    }

    const BUDGETS: &str = r#"
        [attributes]
        project = "X-Tollgate-Project"

        [[budgets]]
        name = "eng-each"
        amount_usd = "500"
        window = "month"
        timezone = "Europe/Berlin"
        scope = "each_member"
        group = "engineering"
        alert_at = [100, 50, 80]
        webhook = "https://hooks.example.com/x"

        [[budgets]]
        name = "eng-total"
        amount_usd = "5000"
        window = "month"
        scope = "group"
        group = "engineering"

        [[budgets]]
        name = "alice"
        amount_usd = "10"
        window = "day"
        scope = "user"
        user = "alice@example.com"

        [[budgets]]
        name = "ci"
        amount_usd = "20"
        window = "24h"
        scope = "service_token"
        service_token = "ci-bot"

        [[budgets]]
        name = "gpt5-each"
        amount_usd = "1.5"
        window = "7d"
        scope = "each_identity"
        models = ["gpt-5*"]
        action = "downgrade"
        downgrade_to = "gpt-4o-mini"
        on_insufficient = "lower_max_tokens"

        [[budgets]]
        name = "anthropic-all"
        amount_usd = "100"
        window = "week"
        scope = "everyone"
        providers = ["anthropic"]
        action = "alert"

        [[budgets]]
        name = "apollo"
        amount_usd = "50"
        window = "month"
        scope = "everyone"
        attributes = { project = "apollo" }
    "#;

    #[test]
    fn a_full_budget_set_validates() {
        let s = set(BUDGETS);
        assert_eq!(s.budgets().len(), 7);
        assert_eq!(
            s.attributes().list(),
            &[attributes::Attribute {
                key: "project".to_owned(),
                source: attributes::Source::Header("x-tollgate-project".to_owned()),
                required: false,
                values: Vec::new(),
            }]
        );
        let b = s.get("eng-each").unwrap();
        assert_eq!(b.amount, Money::parse_usd("500").unwrap());
        assert_eq!(b.alert_at, vec![50, 80, 100]);
        assert_eq!(b.scope, Scope::EachMember("engineering".into()));
        assert!(matches!(
            &b.window,
            Window::Calendar { unit: CalendarUnit::Month, tz } if tz.iana_name() == Some("Europe/Berlin")
        ));
        let g = s.get("gpt5-each").unwrap();
        assert_eq!(g.action, Action::Downgrade("gpt-4o-mini".into()));
        assert_eq!(g.on_insufficient, Insufficient::LowerMaxTokens);
        assert_eq!(
            g.window,
            Window::Rolling {
                span: SignedDuration::from_hours(168),
                bucket: SignedDuration::from_secs(10_080)
            }
        );
        assert_eq!(
            s.get("ci").unwrap().window,
            Window::Rolling {
                span: SignedDuration::from_hours(24),
                bucket: SignedDuration::from_secs(1440)
            }
        );
        assert_eq!(s.get("anthropic-all").unwrap().action, Action::Alert);
    }

    #[test]
    fn rolling_spans_parse_with_their_buckets() {
        let w = |s: &str| Window::parse(s, TimeZone::UTC);
        assert_eq!(
            w("1m").unwrap(),
            Window::Rolling {
                span: SignedDuration::from_secs(60),
                bucket: SignedDuration::from_secs(1)
            }
        );
        // 90 min / 60 = 90 s; 7 min / 60 = 7 s; 61 s would round up, spans are whole minutes.
        assert_eq!(
            w("90m").unwrap(),
            Window::rolling(SignedDuration::from_secs(5400))
        );
        assert!(
            matches!(w("30d").unwrap(), Window::Rolling { bucket, .. } if bucket == SignedDuration::from_hours(12))
        );
        assert!(w("366d").is_ok());
        for bad in [
            "0m",
            "367d",
            "24",
            "h",
            "-1h",
            "1.5h",
            "1w",
            "Day",
            "",
            "10000000000d",
        ] {
            assert!(w(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_budgets_are_reported_by_field() {
        let e = try_set(
            r#"
            [attributes]
            project = "x-tollgate-project"
            "Bad Key" = "x-tollgate-bad"
            other = "not a header"

            [[budgets]]
            name = "a"
            amount_usd = "0"
            window = "fortnight"
            scope = "each_member"
            action = "downgrade"
            alert_at = [0, 50, 50]
            webhook = "http://hooks.example.com/x"

            [[budgets]]
            name = "a"
            amount_usd = "-5"
            window = "24h"
            timezone = "Europe/Berlin"
            scope = "user"
            group = "eng"
            models = ["["]
            providers = ["[x"]
            attributes = { team = "x" }
            action = "block"
            downgrade_to = "m"

            [[budgets]]
            name = "bad name!"
            amount_usd = "abc"
            window = "day"
            timezone = "Mars/Olympus"
            scope = "planet"
            action = "explode"
            on_insufficient = "shrug"
            on_store_failure = "maybe"
            alert_at = [1001]

            [[budgets]]
            name = "svc"
            amount_usd = "1"
            window = "day"
            scope = "service_token"
            "#,
        )
        .unwrap_err();
        let fields: Vec<&str> = e.iter().map(|(f, _)| f.as_str()).collect();
        for want in [
            "attributes.Bad Key",
            "attributes.other",
            "budgets[0].amount_usd",
            "budgets[0].window",
            "budgets[0].group",
            "budgets[0].downgrade_to",
            "budgets[0].alert_at[0]",
            "budgets[0].alert_at",
            "budgets[0].webhook",
            "budgets[1].name",
            "budgets[1].amount_usd",
            "budgets[1].timezone",
            "budgets[1].user",
            "budgets[1].group",
            "budgets[1].models[0]",
            "budgets[1].providers[0]",
            "budgets[1].attributes.team",
            "budgets[1].downgrade_to",
            "budgets[2].name",
            "budgets[2].amount_usd",
            "budgets[2].timezone",
            "budgets[2].scope",
            "budgets[2].action",
            "budgets[2].on_insufficient",
            "budgets[2].on_store_failure",
            "budgets[2].alert_at[0]",
            "budgets[3].service_token",
        ] {
            assert!(fields.contains(&want), "missing {want}: {e:?}");
        }
        // A reason says what to do.
        let reason = |f: &str| &e.iter().find(|(x, _)| x == f).unwrap().1;
        assert!(reason("budgets[1].timezone").contains("rolling"));
        assert!(reason("budgets[1].name").contains("another budget"));
        assert!(reason("budgets[0].group").contains("each_member"));
        // Unknown fields are refused by serde.
        let bad: Result<RawBudget, _> = toml::from_str("name = \"x\"\namount = \"1\"");
        assert!(bad.is_err());
    }

    #[test]
    fn loopback_http_webhooks_are_allowed() {
        let s = set(r#"
            [[budgets]]
            name = "x"
            amount_usd = "1"
            window = "day"
            scope = "everyone"
            webhook = "http://127.0.0.1:9000/hook"
        "#);
        assert_eq!(
            s.budgets()[0].webhook.as_deref(),
            Some("http://127.0.0.1:9000/hook")
        );
    }

    #[test]
    fn applicability_for_every_scope() {
        let s = set(BUDGETS);
        let none: Vec<(String, String)> = Vec::new();
        // An engineer: each_member + group + each_identity (gpt-5 only).
        assert_eq!(
            labels(&s.applicable(&user("bob", &["engineering"]), &req("gpt-4o", &none))),
            vec!["eng-each[okta:bob]", "eng-total"]
        );
        assert_eq!(
            labels(&s.applicable(&user("bob", &["engineering"]), &req("gpt-5-mini", &none))),
            vec!["eng-each[okta:bob]", "eng-total", "gpt5-each[okta:bob]"]
        );
        // alice matched by email.
        assert_eq!(
            labels(&s.applicable(&user("alice", &[]), &req("gpt-4o", &none))),
            vec!["alice"]
        );
        // The service token by name; its team counts as a group.
        assert_eq!(
            labels(&s.applicable(&service("ci-bot", "engineering"), &req("gpt-4o", &none))),
            vec!["eng-each[service-token:ci-bot]", "eng-total", "ci"]
        );
        // A user named like the token is not the token, and a token named like a user is not the user.
        assert!(s
            .applicable(&user("ci-bot", &[]), &req("gpt-4o", &none))
            .is_empty());
        assert!(s
            .applicable(&service("alice", "x"), &req("gpt-4o", &none))
            .is_empty());
        // A user and a token with the same name never share a per-identity instance.
        let a = s.applicable(&user("ci-bot", &[]), &req("gpt-5", &none));
        let b = s.applicable(&service("ci-bot", "x"), &req("gpt-5", &none));
        assert_eq!(labels(&a), vec!["gpt5-each[okta:ci-bot]"]);
        assert_ne!(a, b);
        // Anonymous gets the each_identity instance too.
        assert_eq!(
            labels(&s.applicable(&Identity::anonymous(), &req("gpt-5", &none))),
            vec!["gpt5-each[anonymous:anonymous]"]
        );
    }

    #[test]
    fn filters_match_upstream_models_providers_and_attributes() {
        let s = set(BUDGETS);
        let none: Vec<(String, String)> = Vec::new();
        let carol = user("carol", &[]);
        // An alias routing to gpt-5 is charged to the gpt-5 budget.
        let r = BudgetRequest {
            model: "fast",
            upstream_model: Some("gpt-5-2025"),
            canonical_model: None,
            provider: "openai",
            attributes: &none,
        };
        assert_eq!(
            labels(&s.applicable(&carol, &r)),
            vec!["gpt5-each[okta:carol]"]
        );
        let r = BudgetRequest {
            model: "claude-sonnet",
            upstream_model: None,
            canonical_model: None,
            provider: "anthropic",
            attributes: &none,
        };
        assert_eq!(labels(&s.applicable(&carol, &r)), vec!["anthropic-all"]);
        let apollo = vec![("project".to_owned(), "apollo".to_owned())];
        let gemini = vec![("project".to_owned(), "gemini".to_owned())];
        assert_eq!(
            labels(&s.applicable(&carol, &req("gpt-4o", &apollo))),
            vec!["apollo"]
        );
        assert!(s.applicable(&carol, &req("gpt-4o", &gemini)).is_empty());
    }

    #[test]
    fn a_model_filter_covers_dated_snapshots_through_the_canonical_name() {
        let s = set(r#"
            [[budgets]]
            name = "gpt4o"
            amount_usd = "1"
            window = "day"
            scope = "everyone"
            models = ["gpt-4o"]
        "#);
        let none: Vec<(String, String)> = Vec::new();
        let carol = user("carol", &[]);
        let dated = BudgetRequest {
            model: "gpt-4o-2024-08-06",
            upstream_model: None,
            canonical_model: Some("gpt-4o"),
            provider: "openai",
            attributes: &none,
        };
        assert_eq!(labels(&s.applicable(&carol, &dated)), vec!["gpt4o"]);
        // An alias route to a snapshot is charged too.
        let alias = BudgetRequest {
            model: "fast",
            upstream_model: Some("gpt-4o-2024-11-20"),
            ..dated
        };
        assert_eq!(labels(&s.applicable(&carol, &alias)), vec!["gpt4o"]);
        // Without the canonical name the snapshot escaped (the bug this closes); another model still does.
        let bare = BudgetRequest {
            canonical_model: None,
            ..dated
        };
        assert!(s.applicable(&carol, &bare).is_empty());
        let mini = BudgetRequest {
            model: "gpt-4o-mini",
            canonical_model: Some("gpt-4o-mini"),
            ..dated
        };
        assert!(s.applicable(&carol, &mini).is_empty());
    }

    fn headers<'a>(v: &'a [(&'a str, &'a str)]) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
        v.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes()))
    }

    fn pairs(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect()
    }

    #[test]
    fn attribute_headers_are_checked() {
        let s = set(BUDGETS);
        let a = s.attributes();
        let anon = Identity::anonymous();
        assert_eq!(
            a.resolve(
                &anon,
                headers(&[
                    ("X-Tollgate-Project", "apollo"),
                    ("x-tollgate-request-id", "r1"),
                    ("content-type", "application/json")
                ])
            )
            .unwrap(),
            pairs(&[("project", "apollo")])
        );
        let e = a
            .resolve(&anon, headers(&[("x-tollgate-attr-projetc", "apollo")]))
            .unwrap_err();
        assert!(e.contains("x-tollgate-attr-projetc"), "{e}");
        assert!(a
            .resolve(
                &anon,
                headers(&[("x-tollgate-project", "a"), ("x-tollgate-project", "b")])
            )
            .is_err());
        // A declared header need not start with x-tollgate-.
        let s = set(r#"
            [attributes]
            project = "x-project"
        "#);
        assert_eq!(
            s.attributes()
                .resolve(&anon, headers(&[("x-project", "apollo")]))
                .unwrap(),
            pairs(&[("project", "apollo")])
        );
    }

    const REQUIRED: &str = r#"
        [attributes]
        project = { header = "x-tollgate-attr-project", required = true, values = ["apollo", "zeus"] }
        team = { from = "claim:team", required = true }
        cost_center = { from = "token:cost_center" }
        note = "x-tollgate-note"

        [[budgets]]
        name = "apollo"
        amount_usd = "1"
        window = "day"
        scope = "everyone"
        attributes = { project = "apollo", team = "red" }
    "#;

    fn with_attrs(mut id: Identity, attrs: &[(&str, &str)]) -> Identity {
        id.attributes = attrs
            .iter()
            .map(|(k, v)| (Arc::from(*k), Arc::from(*v)))
            .collect();
        id
    }

    #[test]
    fn required_attributes_and_allowed_values_are_enforced() {
        let s = set(REQUIRED);
        let a = s.attributes();
        let alice = with_attrs(user("alice", &[]), &[("team", "red")]);
        // Missing: 400 naming the attribute and its header.
        let e = a.resolve(&alice, headers(&[])).unwrap_err();
        assert!(
            e.contains("\"project\"") && e.contains("x-tollgate-attr-project"),
            "{e}"
        );
        // A value outside the list: 400 naming the allowed values.
        let e = a
            .resolve(&alice, headers(&[("x-tollgate-attr-project", "mars")]))
            .unwrap_err();
        assert!(e.contains("apollo, zeus"), "{e}");
        // Allowed: the claim's value joins the header's.
        let got = a
            .resolve(&alice, headers(&[("x-tollgate-attr-project", "apollo")]))
            .unwrap();
        assert_eq!(got, pairs(&[("project", "apollo"), ("team", "red")]));
        // A required claim the caller's token lacks: 400 naming the claim.
        let e = a
            .resolve(
                &user("bob", &[]),
                headers(&[("x-tollgate-attr-project", "apollo")]),
            )
            .unwrap_err();
        assert!(e.contains("\"team\"") && e.contains("claim"), "{e}");
        // A service token has no claims: the required claim attribute refuses it.
        assert!(a
            .resolve(
                &with_attrs(service("ci", "x"), &[("team", "red")]),
                headers(&[("x-tollgate-attr-project", "apollo")])
            )
            .is_err());
    }

    #[test]
    fn a_header_cannot_set_an_attribute_taken_from_the_identity() {
        let s = set(REQUIRED);
        let a = s.attributes();
        let alice = with_attrs(user("alice", &[]), &[("team", "red")]);
        // x-tollgate-attr-team names an identity attribute: ignored, the claim wins.
        let got = a
            .resolve(
                &alice,
                headers(&[
                    ("x-tollgate-attr-project", "apollo"),
                    ("x-tollgate-attr-team", "blue"),
                ]),
            )
            .unwrap();
        assert_eq!(got, pairs(&[("project", "apollo"), ("team", "red")]));
        let r = BudgetRequest {
            model: "gpt-4o",
            upstream_model: None,
            canonical_model: None,
            provider: "openai",
            attributes: &got,
        };
        assert_eq!(labels(&s.applicable(&alice, &r)), vec!["apollo"]);
        // A service token's attribute comes from the token; a person has none.
        let ci = with_attrs(service("ci", "x"), &[("cost_center", "cc-7")]);
        let s2 = set(&REQUIRED.replace(", required = true }", " }"));
        let got = s2
            .attributes()
            .resolve(
                &ci,
                headers(&[
                    ("x-tollgate-attr-project", "zeus"),
                    ("x-tollgate-attr-cost_center", "other"),
                ]),
            )
            .unwrap();
        assert_eq!(got, pairs(&[("project", "zeus"), ("cost_center", "cc-7")]));
        assert_eq!(s2.attributes().claim_names(), vec!["team".to_owned()]);
    }

    #[test]
    fn attribute_declarations_are_validated_by_field() {
        let e = try_set(
            r#"
            [attributes]
            both = { header = "x-a", from = "claim:a" }
            neither = { required = true }
            bad_from = { from = "cookie:a" }
            bad_token = { from = "token:Not-Ok" }
            empty = { header = "x-e", values = [] }
            dup = { header = "x-d", values = ["a", "a", ""] }
            same = "x-d"

            [[budgets]]
            name = "b"
            amount_usd = "1"
            window = "day"
            scope = "everyone"
            attributes = { dup = "zzz" }
            "#,
        )
        .unwrap_err();
        let fields: Vec<&str> = e.iter().map(|(f, _)| f.as_str()).collect();
        for want in [
            "attributes.both.from",
            "attributes.neither.header",
            "attributes.bad_from.from",
            "attributes.bad_token.from",
            "attributes.empty.values",
            "attributes.dup.values[1]",
            "attributes.dup.values[2]",
            "attributes.same",
            "budgets[0].attributes.dup",
        ] {
            assert!(fields.contains(&want), "missing {want}: {e:?}");
        }
        // Unknown fields in the table form are refused by serde, naming the field.
        let bad: Result<BTreeMap<String, RawAttribute>, _> =
            toml::from_str("a = { header = \"x-a\", requird = true }");
        let msg = bad.unwrap_err().to_string();
        assert!(msg.contains("requird"), "{msg}");
    }

    #[test]
    fn instance_keys_compare_by_name_and_member() {
        let s = set(BUDGETS);
        let none: Vec<(String, String)> = Vec::new();
        let a = s.applicable(&user("bob", &["engineering"]), &req("x", &none));
        let s2 = set(&BUDGETS.replace("\"500\"", "\"900\""));
        let b = s2.applicable(&user("bob", &["engineering"]), &req("x", &none));
        assert_eq!(a, b);
        let set_a: std::collections::HashSet<_> = a.into_iter().collect();
        assert!(set_a.contains(&b[0]));
    }

    fn period(window: &str, tz: &str, now: &str) -> (Timestamp, Timestamp) {
        let tz = jiff::tz::db().get(tz).unwrap();
        Window::parse(window, tz).unwrap().period(ts(now)).unwrap()
    }

    #[test]
    fn calendar_windows_in_utc() {
        assert_eq!(
            period("day", "UTC", "2026-01-15T23:59:59Z"),
            (ts("2026-01-15T00:00:00Z"), ts("2026-01-16T00:00:00Z"))
        );
        assert_eq!(
            period("day", "UTC", "2026-01-16T00:00:00Z"),
            (ts("2026-01-16T00:00:00Z"), ts("2026-01-17T00:00:00Z"))
        );
        // 2026-03-01 is a Sunday: still the week that began Monday 2026-02-23.
        assert_eq!(
            period("week", "UTC", "2026-03-01T23:59:59Z"),
            (ts("2026-02-23T00:00:00Z"), ts("2026-03-02T00:00:00Z"))
        );
        assert_eq!(
            period("week", "UTC", "2026-03-02T00:00:00Z"),
            (ts("2026-03-02T00:00:00Z"), ts("2026-03-09T00:00:00Z"))
        );
        assert_eq!(
            period("month", "UTC", "2026-02-28T23:59:59Z"),
            (ts("2026-02-01T00:00:00Z"), ts("2026-03-01T00:00:00Z"))
        );
        assert_eq!(
            period("month", "UTC", "2026-12-31T12:00:00Z"),
            (ts("2026-12-01T00:00:00Z"), ts("2027-01-01T00:00:00Z"))
        );
    }

    #[test]
    fn calendar_windows_in_other_zones() {
        // Berlin is UTC+1 in winter: 23:30 UTC on the 15th is already the 16th there.
        assert_eq!(
            period("day", "Europe/Berlin", "2026-01-15T23:30:00Z"),
            (ts("2026-01-15T23:00:00Z"), ts("2026-01-16T23:00:00Z"))
        );
        // New York (UTC-5 in winter): 03:00 UTC Monday is still Sunday evening there.
        assert_eq!(
            period("week", "America/New_York", "2026-03-02T03:00:00Z"),
            (ts("2026-02-23T05:00:00Z"), ts("2026-03-02T05:00:00Z"))
        );
        assert_eq!(
            period("week", "America/New_York", "2026-03-02T05:00:00Z"),
            // The week spans New York's DST start (2026-03-08): 7 days minus an hour.
            (ts("2026-03-02T05:00:00Z"), ts("2026-03-09T04:00:00Z"))
        );
        // Tokyo (UTC+9, no DST): the month starts at 15:00 UTC the day before.
        assert_eq!(
            period("month", "Asia/Tokyo", "2026-01-31T15:00:00Z"),
            (ts("2026-01-31T15:00:00Z"), ts("2026-02-28T15:00:00Z"))
        );
        assert_eq!(
            period("month", "Asia/Tokyo", "2026-01-31T14:59:59Z"),
            (ts("2025-12-31T15:00:00Z"), ts("2026-01-31T15:00:00Z"))
        );
        assert_eq!(
            period("day", "Asia/Tokyo", "2026-06-01T00:00:00Z"),
            (ts("2026-05-31T15:00:00Z"), ts("2026-06-01T15:00:00Z"))
        );
    }

    #[test]
    fn calendar_days_across_dst_changes_are_23_and_25_hours() {
        // Europe/Berlin springs forward on 2026-03-29 (02:00 -> 03:00) and falls back on 2026-10-25.
        let (s, e) = period("day", "Europe/Berlin", "2026-03-29T12:00:00Z");
        assert_eq!(
            (s, e),
            (ts("2026-03-28T23:00:00Z"), ts("2026-03-29T22:00:00Z"))
        );
        assert_eq!(e.duration_since(s), SignedDuration::from_hours(23));
        let (s, e) = period("day", "Europe/Berlin", "2026-10-25T12:00:00Z");
        assert_eq!(
            (s, e),
            (ts("2026-10-24T22:00:00Z"), ts("2026-10-25T23:00:00Z"))
        );
        assert_eq!(e.duration_since(s), SignedDuration::from_hours(25));
        // The month of March 2026 in Berlin starts at UTC+1 and ends at UTC+2.
        assert_eq!(
            period("month", "Europe/Berlin", "2026-03-31T21:59:59Z"),
            (ts("2026-02-28T23:00:00Z"), ts("2026-03-31T22:00:00Z"))
        );
        // Where local midnight does not exist (America/Santiago springs forward at 00:00 on
        // 2026-09-06), the day starts at the earliest valid instant, 01:00 local.
        let (s, _) = period("day", "America/Santiago", "2026-09-06T12:00:00Z");
        assert_eq!(s, ts("2026-09-06T04:00:00Z"));
    }

    #[test]
    fn rolling_period_is_bucket_aligned() {
        let w = Window::parse("24h", TimeZone::UTC).unwrap();
        // Buckets of 1440 s; at 12:00:00 the oldest counted bucket started between 24 h and 24 h + 24 min ago.
        let (s, e) = w.period(ts("2026-01-02T12:00:00Z")).unwrap();
        assert_eq!(s, ts("2026-01-01T12:00:00Z"));
        assert_eq!(e, ts("2026-01-02T12:24:00Z"));
        let (s, _) = w.period(ts("2026-01-02T12:10:00Z")).unwrap();
        assert_eq!(s, ts("2026-01-01T12:00:00Z"));
        let (s, _) = w.period(ts("2026-01-02T12:24:00Z")).unwrap();
        assert_eq!(s, ts("2026-01-01T12:24:00Z"));
    }
}
