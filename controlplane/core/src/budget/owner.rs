//! The per-owner budget ledger: what each budget instance has spent in its current window and how much
//! is reserved by requests in flight. Single-threaded by design: the core that owns a budget instance
//! owns its [`Ledger`]; nothing here locks, blocks, allocates per lookup beyond the instance map, or
//! reads a clock (every call takes `now`).
//!
//! The request path: [`Ledger::reserve`] the request's maximum cost on every applicable instance
//! (all-or-nothing), forward, then [`Ledger::settle`] with the actual cost exactly once (or
//! [`Ledger::release`] when nothing was spent). Reserved amounts are not tied to a window: they are in
//! flight and survive a window rollover.
//!
//! Windows: a calendar instance keeps the spend of its current window and rolls to the next window (spend
//! 0, alert thresholds re-armed) on the first call past the window's end. A rolling instance keeps the
//! spend in buckets of 1/60 of its span (see [`crate::budget`] for the precision: spend leaves the window
//! at most one bucket late, never early).
//!
//! Alerts: each threshold of `alert_at` fires once per window per instance, on the settle (or
//! [`Ledger::record`]) that makes the window's spend reach it. For rolling windows a threshold re-arms
//! once the window's spend has dropped back below it.
//!
//! Retention: besides its window state, every instance keeps a compact spend history in 15-minute slots
//! (every calendar boundary of today's time zones falls on one), pruned to the last 32 days and one slot:
//! enough to recompute any calendar window (a month is at most 31 days and an hour). [`Ledger::rekey`]
//! uses it when a budget's window changes on reload, so a window changed from "day" to "week" starts
//! from the week's spend so far. Rolling windows rebuilt from the history count each slot's spend as made
//! at the slot's end (late, never early), and a rolling window longer than 32 days rebuilt this way only
//! sees the last 32 days. The history costs at most ~3,100 entries per instance, and only slots that saw
//! spend are stored.
//!
//! Fails: [`Ledger::reserve`] refuses with a [`Refusal`] naming the budget that cannot cover the request;
//! nothing else fails. A window that cannot be computed (timestamps at the edge of the representable
//! range) counts as never ending, so spend is never forgotten because of it. Negative amounts count as
//! zero. Cost: reserve and settle are a hash look-up and a few integer operations per instance (rolling
//! windows sum at most 61 buckets).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use jiff::Timestamp;

use crate::budget::{Action, Budget, BudgetSet, InstanceKey, Scope, Window};
use crate::pricing::money::Money;

/// History slot length: 15 minutes, a divisor of every current UTC offset.
const SLOT_SECS: i64 = 900;
/// How far back the history reaches: 32 days and one slot.
const RETENTION_SECS: i64 = 32 * 86_400 + SLOT_SECS;

/// Names one reservation; settle or release it exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(u64);

impl ReservationId {
    pub fn get(self) -> u64 {
        self.0
    }
}

/// Why a reservation was refused: the first budget (in the order given) that cannot cover it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub budget: Arc<str>,
    pub label: String,
    pub action: Action,
    pub limit: Money,
    pub spent: Money,
    pub reserved: Money,
    pub resets_at: Timestamp,
}

/// A threshold crossed for the first time in a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertEvent {
    pub budget: Arc<str>,
    pub label: String,
    /// Percent of the budget's amount.
    pub threshold: u32,
    /// The window's spend, including the settlement that crossed the threshold.
    pub spent: Money,
    pub limit: Money,
    pub window_start: Timestamp,
    pub webhook: Option<String>,
}

/// One instance's standing, for response headers and the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BudgetStatus {
    pub budget: Arc<str>,
    pub label: String,
    pub limit: Money,
    pub spent: Money,
    pub reserved: Money,
    /// `limit - spent - reserved`, at least 0.
    pub remaining: Money,
    /// Calendar: the window's end. Rolling: when the oldest spend still counted leaves the window (when
    /// nothing is counted, when spend made now would leave).
    pub resets_at: Timestamp,
}

fn sat_add(a: Money, b: Money) -> Money {
    a.checked_add(b).unwrap_or(Money::from_pico(i128::MAX))
}

fn floor_sub(a: Money, b: Money) -> Money {
    a.checked_sub(b).unwrap_or(Money::ZERO).max(Money::ZERO)
}

/// Whether `spent` reaches `threshold` percent of `limit`, in exact integer arithmetic.
fn crossed(spent: Money, limit: Money, threshold: u32) -> bool {
    spent.pico().saturating_mul(100) >= limit.pico().saturating_mul(i128::from(threshold))
}

fn slot_of(t: Timestamp) -> i64 {
    t.as_second().div_euclid(SLOT_SECS)
}

/// A calendar window's `[start, end)`, or all of time when it cannot be computed.
fn calendar_period(w: &Window, now: Timestamp) -> (Timestamp, Timestamp) {
    w.period(now).unwrap_or((Timestamp::MIN, Timestamp::MAX))
}

fn from_second_or_max(s: Option<i64>) -> Timestamp {
    s.and_then(|s| Timestamp::from_second(s).ok())
        .unwrap_or(Timestamp::MAX)
}

/// What an instance looks like at some `now`, without changing it.
struct View {
    spent: Money,
    start: Timestamp,
    resets_at: Timestamp,
}

#[derive(Debug)]
struct InstanceState {
    /// The current definition (replaced by [`Ledger::rekey`]).
    key: InstanceKey,
    reserved: Money,
    /// Calendar: the window `spent` and `fired` belong to; `None` until first used or after a rekey.
    period: Option<(Timestamp, Timestamp)>,
    /// Calendar: spend in `period`.
    spent: Money,
    /// Rolling: spend per bucket index.
    buckets: BTreeMap<i64, Money>,
    /// Thresholds already fired in the current window.
    fired: Vec<u32>,
    /// Recompute `fired` from the spend on the next sync (after a rekey changed the definition).
    refire: bool,
    /// Spend per 15-minute slot, for the last 32 days and a slot.
    history: BTreeMap<i64, Money>,
}

impl InstanceState {
    fn new(key: InstanceKey) -> InstanceState {
        InstanceState {
            key,
            reserved: Money::ZERO,
            period: None,
            spent: Money::ZERO,
            buckets: BTreeMap::new(),
            fired: Vec::new(),
            refire: false,
            history: BTreeMap::new(),
        }
    }

    fn budget(&self) -> &Budget {
        &self.key.budget
    }

    fn history_sum(&self, (start, end): (Timestamp, Timestamp)) -> Money {
        let (lo, hi) = (start.as_second(), end.as_second());
        self.history
            .iter()
            .filter(|(s, _)| {
                let t = s.saturating_mul(SLOT_SECS);
                lo <= t && t < hi
            })
            .fold(Money::ZERO, |acc, (_, m)| sat_add(acc, *m))
    }

    fn view(&self, now: Timestamp) -> View {
        let w = &self.budget().window;
        match (w, w.bucket_secs(), w.rolling_range(now)) {
            (Window::Rolling { span, .. }, Some(b), Some((lo, cur))) => {
                let mut spent = Money::ZERO;
                let mut oldest = None;
                for (&i, &m) in self.buckets.range(lo..) {
                    spent = sat_add(spent, m);
                    if oldest.is_none() && m.pico() > 0 {
                        oldest = Some(i);
                    }
                }
                let leaves = oldest
                    .unwrap_or(cur)
                    .checked_add(1)
                    .and_then(|i| i.checked_mul(b))
                    .and_then(|s| s.checked_add(span.as_secs()));
                View {
                    spent,
                    start: from_second_or_max(lo.checked_mul(b)).min(now),
                    resets_at: from_second_or_max(leaves),
                }
            }
            _ => {
                let p = self.calendar_period(now);
                let spent = if self.period == Some(p) {
                    self.spent
                } else {
                    self.history_sum(p)
                };
                View {
                    spent,
                    start: p.0,
                    resets_at: p.1,
                }
            }
        }
    }

    /// The calendar window containing `now`: the one already held when `now` is inside it (calendar windows
    /// partition time, so it is the same window), computed in the budget's time zone otherwise (a
    /// time-zone conversion, which costs more than the rest of a reservation; it ran several times per
    /// request before).
    fn calendar_period(&self, now: Timestamp) -> (Timestamp, Timestamp) {
        match self.period {
            Some(p) if p.0 <= now && now < p.1 => p,
            _ => calendar_period(&self.key.budget.window, now),
        }
    }

    /// Brings the window state to `now`: rolls a calendar window, drops rolling buckets and history that
    /// have left.
    fn sync(&mut self, now: Timestamp) {
        match self.key.budget.window.rolling_range(now) {
            Some((lo, _)) => {
                while let Some((&i, _)) = self.buckets.first_key_value() {
                    if i >= lo {
                        break;
                    }
                    self.buckets.pop_first();
                }
                if self.refire {
                    let spent = self.view(now).spent;
                    self.rearm(spent);
                }
            }
            None => {
                let p = self.calendar_period(now);
                if self.period != Some(p) || self.refire {
                    self.spent = self.history_sum(p);
                    self.period = Some(p);
                    self.rearm(self.spent);
                }
            }
        }
        self.refire = false;
        self.prune_history(now);
    }

    /// Drops history slots older than the retention.
    fn prune_history(&mut self, now: Timestamp) {
        let min_slot = now
            .as_second()
            .saturating_sub(RETENTION_SECS)
            .div_euclid(SLOT_SECS);
        while let Some((&s, _)) = self.history.first_key_value() {
            if s >= min_slot {
                break;
            }
            self.history.pop_first();
        }
    }

    /// Marks the thresholds `spent` already reaches as fired (a new window, or a new definition: spend
    /// already counted does not alert again).
    fn rearm(&mut self, spent: Money) {
        let b = &self.key.budget;
        self.fired = b
            .alert_at
            .iter()
            .copied()
            .filter(|t| crossed(spent, b.amount, *t))
            .collect();
    }

    /// Adds spend made at `at`: to the history, and to the window state where `at` falls in it.
    fn add(&mut self, amount: Money, at: Timestamp) {
        if amount.pico() <= 0 {
            return;
        }
        let slot = self.history.entry(slot_of(at)).or_insert(Money::ZERO);
        *slot = sat_add(*slot, amount);
        match self.key.budget.window.bucket_secs() {
            Some(b) => {
                let bucket = self
                    .buckets
                    .entry(at.as_second().div_euclid(b))
                    .or_insert(Money::ZERO);
                *bucket = sat_add(*bucket, amount);
            }
            None => {
                if let Some((s, e)) = self.period {
                    if s <= at && at < e {
                        self.spent = sat_add(self.spent, amount);
                    }
                }
            }
        }
    }

    /// The thresholds the window's spend at `now` reaches for the first time.
    fn alerts(&mut self, now: Timestamp) -> Vec<AlertEvent> {
        let v = self.view(now);
        let b = Arc::clone(&self.key.budget);
        if b.window.is_rolling() {
            self.fired.retain(|t| crossed(v.spent, b.amount, *t));
        }
        let mut out = Vec::new();
        for &t in &b.alert_at {
            if crossed(v.spent, b.amount, t) && !self.fired.contains(&t) {
                self.fired.push(t);
                out.push(AlertEvent {
                    budget: Arc::clone(&b.name),
                    label: self.key.label(),
                    threshold: t,
                    spent: v.spent,
                    limit: b.amount,
                    window_start: v.start,
                    webhook: b.webhook.clone(),
                });
            }
        }
        out
    }

    /// Rebuilds rolling buckets from the history, each slot's spend counted at the slot's last second.
    fn rebuild_buckets(&mut self) {
        self.buckets.clear();
        if let Some(b) = self.key.budget.window.bucket_secs() {
            for (&slot, &m) in &self.history {
                let t = slot.saturating_mul(SLOT_SECS).saturating_add(SLOT_SECS - 1);
                let bucket = self.buckets.entry(t.div_euclid(b)).or_insert(Money::ZERO);
                *bucket = sat_add(*bucket, m);
            }
        }
    }
}

/// Spend and reservations of the budget instances one core owns.
#[derive(Debug, Default)]
pub struct Ledger {
    instances: HashMap<InstanceKey, InstanceState>,
    reservations: HashMap<u64, Vec<(InstanceKey, Money)>>,
    next_id: u64,
}

impl Ledger {
    pub fn new() -> Ledger {
        Ledger::default()
    }

    fn state_mut(&mut self, key: &InstanceKey, now: Timestamp) -> &mut InstanceState {
        let st = self
            .instances
            .entry(key.clone())
            .or_insert_with(|| InstanceState::new(key.clone()));
        st.sync(now);
        st
    }

    /// The budget, view and reserved amount of `key` at `now` (a fresh instance if unseen).
    fn look(&self, key: &InstanceKey, now: Timestamp) -> (Arc<Budget>, View, Money) {
        match self.instances.get(key) {
            Some(st) => (Arc::clone(&st.key.budget), st.view(now), st.reserved),
            None => (
                Arc::clone(&key.budget),
                InstanceState::new(key.clone()).view(now),
                Money::ZERO,
            ),
        }
    }

    /// All-or-nothing: reserves `amount` on every instance in `keys` or on none.
    ///
    /// Refuses when for some instance spent in the window + reserved + `amount` exceeds the budget's
    /// amount, except budgets whose action is alert: they never refuse (and still track). The refusal
    /// names the first such instance in `keys` order. An instance listed twice is reserved once.
    // The refusal is returned by value: it is the rare path and carries everything a 429 needs, so
    // boxing it would only add an allocation where the caller builds the response anyway.
    #[allow(clippy::result_large_err)]
    pub fn reserve(
        &mut self,
        keys: &[InstanceKey],
        amount: Money,
        now: Timestamp,
    ) -> Result<ReservationId, Refusal> {
        let amount = amount.max(Money::ZERO);
        let mut unique: Vec<&InstanceKey> = Vec::with_capacity(keys.len());
        for k in keys {
            if !unique.contains(&k) {
                unique.push(k);
            }
        }
        if let Some(r) = self.refusal_among(unique.iter().copied(), amount, now) {
            return Err(r);
        }
        let mut held = Vec::with_capacity(unique.len());
        for key in unique {
            let st = self.state_mut(key, now);
            st.reserved = sat_add(st.reserved, amount);
            held.push((key.clone(), amount));
        }
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.reservations.insert(id, held);
        Ok(ReservationId(id))
    }

    /// Exactly once per reservation: adds `actual` to each instance's spend in the window current at
    /// `now`, releases the reservation, and returns the alerts this crossed. Settling an unknown or
    /// already-settled id is a no-op returning `false`, so a retry never double counts.
    pub fn settle(
        &mut self,
        id: ReservationId,
        actual: Money,
        now: Timestamp,
    ) -> (bool, Vec<AlertEvent>) {
        let Some(held) = self.reservations.remove(&id.0) else {
            return (false, Vec::new());
        };
        let mut alerts = Vec::new();
        for (key, amount) in held {
            // An instance whose budget was removed by a reload is gone; its share is dropped with it.
            if let Some(st) = self.instances.get_mut(&key) {
                st.reserved = floor_sub(st.reserved, amount);
                st.sync(now);
                st.add(actual, now);
                alerts.extend(st.alerts(now));
            }
        }
        (true, alerts)
    }

    /// Same as [`Ledger::settle`] with zero spend.
    pub fn release(&mut self, id: ReservationId) -> bool {
        let Some(held) = self.reservations.remove(&id.0) else {
            return false;
        };
        for (key, amount) in held {
            if let Some(st) = self.instances.get_mut(&key) {
                st.reserved = floor_sub(st.reserved, amount);
            }
        }
        true
    }

    /// Adds `extra` to an open reservation on every instance it holds (a budget slice lent to another core
    /// growing), all or nothing, under the same rule as [`Ledger::reserve`]. An unknown id refuses nothing
    /// and grows nothing (`Ok(false)`).
    #[allow(clippy::result_large_err)]
    pub fn grow(
        &mut self,
        id: ReservationId,
        extra: Money,
        now: Timestamp,
    ) -> Result<bool, Refusal> {
        let extra = extra.max(Money::ZERO);
        let Some(keys) = self
            .reservations
            .get(&id.0)
            .map(|held| held.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
        else {
            return Ok(false);
        };
        if let Some(r) = self.refusal(&keys, extra, now) {
            return Err(r);
        }
        for k in &keys {
            let st = self.state_mut(k, now);
            st.reserved = sat_add(st.reserved, extra);
        }
        if let Some(held) = self.reservations.get_mut(&id.0) {
            for (_, amount) in held.iter_mut() {
                *amount = sat_add(*amount, extra);
            }
        }
        Ok(true)
    }

    /// Charges `spent` (made at `at`) to an open reservation's instances and shrinks it by `spent +
    /// returned`, keeping it open: how a lent slice reports what its borrower settled and gives back what
    /// it no longer needs. Spend reported against an unknown id (a reservation dropped by a reload) is
    /// still recorded on `key`: spend is never lost. Returns the alerts the spend crossed.
    pub fn draw(
        &mut self,
        id: ReservationId,
        key: &InstanceKey,
        spent: Money,
        returned: Money,
        at: Timestamp,
    ) -> Vec<AlertEvent> {
        let spent = spent.max(Money::ZERO);
        let shrink = sat_add(spent, returned.max(Money::ZERO));
        let cuts: Vec<(InstanceKey, Money)> = match self.reservations.get_mut(&id.0) {
            Some(held) => held
                .iter_mut()
                .map(|(k, amount)| {
                    let cut = shrink.min(*amount);
                    *amount = floor_sub(*amount, cut);
                    (k.clone(), cut)
                })
                .collect(),
            None => vec![(key.clone(), Money::ZERO)],
        };
        let mut alerts = Vec::new();
        for (k, cut) in cuts {
            if let Some(st) = self.instances.get_mut(&k) {
                st.reserved = floor_sub(st.reserved, cut);
            }
            if spent.pico() > 0 {
                alerts.extend(self.record(&k, spent, at));
            }
        }
        alerts
    }

    /// What an open reservation still holds (on each of its instances), or `None` when it is closed.
    pub fn held(&self, id: ReservationId) -> Option<Money> {
        self.reservations
            .get(&id.0)
            .map(|h| h.first().map_or(Money::ZERO, |(_, m)| *m))
    }

    /// The refusal [`Ledger::reserve`] would give for `amount` on `keys` at `now`, or `None` if it fits.
    pub fn refusal(&self, keys: &[InstanceKey], amount: Money, now: Timestamp) -> Option<Refusal> {
        self.refusal_among(keys.iter(), amount, now)
    }

    fn refusal_among<'k>(
        &self,
        mut keys: impl Iterator<Item = &'k InstanceKey>,
        amount: Money,
        now: Timestamp,
    ) -> Option<Refusal> {
        keys.find_map(|key| {
            let (budget, v, reserved) = self.look(key, now);
            if budget.action == Action::Alert {
                return None;
            }
            let fits = v
                .spent
                .checked_add(reserved)
                .and_then(|m| m.checked_add(amount))
                .is_some_and(|total| total <= budget.amount);
            (!fits).then(|| Refusal {
                budget: Arc::clone(&budget.name),
                label: key.label(),
                action: budget.action.clone(),
                limit: budget.amount,
                spent: v.spent,
                reserved,
                resets_at: v.resets_at,
            })
        })
    }

    /// Limit, spend, reserved, remaining and reset time of `key` at `now`, for response headers.
    pub fn status(&self, key: &InstanceKey, now: Timestamp) -> BudgetStatus {
        let (budget, v, reserved) = self.look(key, now);
        BudgetStatus {
            budget: Arc::clone(&budget.name),
            label: key.label(),
            limit: budget.amount,
            spent: v.spent,
            reserved,
            remaining: floor_sub(floor_sub(budget.amount, v.spent), reserved),
            resets_at: v.resets_at,
        }
    }

    /// How much could still be reserved on all `keys` right now: the smallest remaining among the
    /// budgets that can refuse (used to lower `max_tokens`). Unlimited (`i128::MAX` pico-USD) when none
    /// can.
    pub fn headroom(&self, keys: &[InstanceKey], now: Timestamp) -> Money {
        keys.iter()
            .filter_map(|k| {
                let s = self.status(k, now);
                let refuses = self
                    .instances
                    .get(k)
                    .map_or(k.budget.action != Action::Alert, |st| {
                        st.key.budget.action != Action::Alert
                    });
                refuses.then_some(s.remaining)
            })
            .min()
            .unwrap_or(Money::from_pico(i128::MAX))
    }

    /// The sum of everything reserved and not yet settled or released.
    pub fn reserved_total(&self) -> Money {
        self.instances
            .values()
            .fold(Money::ZERO, |acc, st| sat_add(acc, st.reserved))
    }

    /// Spend counted in `key`'s window at `now`.
    pub fn spent(&self, key: &InstanceKey, now: Timestamp) -> Money {
        self.look(key, now).1.spent
    }

    /// Adds already-settled spend made at `at` (replayed from a durable store, or settled on another
    /// core) and returns the alerts it crossed. Spend older than the instance's current calendar window
    /// only enters the history.
    pub fn record(&mut self, key: &InstanceKey, amount: Money, at: Timestamp) -> Vec<AlertEvent> {
        let st = self
            .instances
            .entry(key.clone())
            .or_insert_with(|| InstanceState::new(key.clone()));
        let rolling = st.key.budget.window.is_rolling();
        let moves_forward = match st.period {
            None => true,
            Some((_, end)) => at >= end,
        };
        if rolling || moves_forward || st.refire {
            st.sync(at);
        } else {
            st.prune_history(at);
        }
        st.add(amount, at);
        let counted = rolling || st.period.is_some_and(|(s, e)| s <= at && at < e);
        if counted {
            st.alerts(at)
        } else {
            Vec::new()
        }
    }

    /// Moves every instance to the current definition of its budget (by name) after a reload. Instances
    /// of removed budgets, or whose scope no longer has (or now has) members, are dropped; reservations on
    /// them settle as no-ops. Where the window changed, the window's spend is recomputed from the history
    /// (see the module docs); where the window, amount or thresholds changed, thresholds the spend already
    /// reaches count as fired.
    pub fn rekey(&mut self, budgets: &BudgetSet) {
        let old = std::mem::take(&mut self.instances);
        for (_, mut st) in old {
            let Some(nb) = budgets.get(&st.key.budget.name) else {
                continue;
            };
            let per_member = matches!(nb.scope, Scope::EachMember(_) | Scope::EachIdentity);
            if per_member != st.key.member.is_some() {
                continue;
            }
            let ob = Arc::clone(&st.key.budget);
            st.key = InstanceKey {
                budget: Arc::clone(nb),
                member: st.key.member.clone(),
            };
            if ob.window != nb.window {
                st.period = None;
                st.spent = Money::ZERO;
                st.rebuild_buckets();
                st.refire = true;
            } else if ob.amount != nb.amount || ob.alert_at != nb.alert_at {
                st.refire = true;
            }
            self.instances.insert(st.key.clone(), st);
        }
    }

    /// How many instances this ledger holds.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::{Identity, IdentityKind};
    use crate::budget::{BudgetRequest, RawAttributes, RawBudget};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn usd(s: &str) -> Money {
        Money::parse_usd(s).unwrap()
    }

    fn set(toml_text: &str) -> BudgetSet {
        #[derive(serde::Deserialize)]
        struct F {
            #[serde(default)]
            attributes: RawAttributes,
            budgets: Vec<RawBudget>,
        }
        let f: F = toml::from_str(toml_text).unwrap();
        BudgetSet::from_raw(f.budgets, f.attributes).unwrap()
    }

    /// One shared instance of a single budget.
    fn one(window: &str, amount: &str, extra: &str) -> InstanceKey {
        let s = set(&format!(
            "[[budgets]]\nname = \"b\"\namount_usd = \"{amount}\"\nwindow = \"{window}\"\nscope = \"everyone\"\n{extra}"
        ));
        InstanceKey {
            budget: Arc::clone(&s.budgets()[0]),
            member: None,
        }
    }

    fn bob() -> Identity {
        Identity {
            kind: IdentityKind::User,
            subject: Arc::from("bob"),
            email: None,
            groups: Arc::from(vec![Arc::from("eng")]),
            source: Arc::from("okta"),
            token_id: None,
            attributes: Arc::from(Vec::new()),
        }
    }

    const THREE: &str = r#"
        [[budgets]]
        name = "mine"
        amount_usd = "10"
        window = "day"
        scope = "each_member"
        group = "eng"

        [[budgets]]
        name = "team"
        amount_usd = "15"
        window = "month"
        scope = "group"
        group = "eng"

        [[budgets]]
        name = "watch"
        amount_usd = "1"
        window = "week"
        scope = "everyone"
        action = "alert"
        alert_at = [100, 500]
    "#;

    fn three() -> (BudgetSet, Vec<InstanceKey>) {
        let s = set(THREE);
        let keys = s.applicable(
            &bob(),
            &BudgetRequest {
                model: "m",
                upstream_model: None,
                canonical_model: None,
                provider: "p",
                attributes: &[],
            },
        );
        assert_eq!(keys.len(), 3);
        (s, keys)
    }

    #[test]
    fn reserve_is_all_or_nothing_across_instances() {
        let (_, keys) = three();
        let mut l = Ledger::new();
        let now = ts("2026-01-10T12:00:00Z");
        // Spend 8 on "mine" only (another request) so "mine" is the tightest.
        l.record(&keys[0], usd("8"), now);
        let r = l.reserve(&keys, usd("3"), now).unwrap_err();
        assert_eq!(&*r.budget, "mine");
        assert_eq!(r.label, "mine[okta:bob]");
        assert_eq!(r.action, Action::Block);
        assert_eq!(
            (r.limit, r.spent, r.reserved),
            (usd("10"), usd("8"), Money::ZERO)
        );
        assert_eq!(r.resets_at, ts("2026-01-11T00:00:00Z"));
        // Nothing was reserved anywhere, not even on the instances that could cover it.
        assert_eq!(l.reserved_total(), Money::ZERO);
        for k in &keys {
            assert_eq!(l.status(k, now).reserved, Money::ZERO);
        }
        // A request that fits is reserved on all three.
        let id = l.reserve(&keys, usd("2"), now).unwrap();
        for k in &keys {
            assert_eq!(l.status(k, now).reserved, usd("2"));
        }
        assert_eq!(l.reserved_total(), usd("6"));
        // Reserved counts: a second 0.5 no longer fits "mine" (8 + 2 + 0.5 > 10).
        let r = l.reserve(&keys, usd("0.5"), now).unwrap_err();
        assert_eq!((r.spent, r.reserved), (usd("8"), usd("2")));
        assert_eq!(l.reserved_total(), usd("6"));
        assert!(l.release(id));
        assert_eq!(l.reserved_total(), Money::ZERO);
    }

    #[test]
    fn the_first_refusing_budget_in_order_is_named() {
        let (_, keys) = three();
        let mut l = Ledger::new();
        let now = ts("2026-01-10T12:00:00Z");
        // 16 exceeds both "mine" (10) and "team" (15): "mine" comes first.
        assert_eq!(
            &*l.reserve(&keys, usd("16"), now).unwrap_err().budget,
            "mine"
        );
        let rev: Vec<InstanceKey> = keys.iter().rev().cloned().collect();
        assert_eq!(
            &*l.reserve(&rev, usd("16"), now).unwrap_err().budget,
            "team"
        );
        assert_eq!(l.reserved_total(), Money::ZERO);
    }

    #[test]
    fn settle_counts_exactly_once() {
        let (_, keys) = three();
        let mut l = Ledger::new();
        let now = ts("2026-01-10T12:00:00Z");
        let id = l.reserve(&keys, usd("5"), now).unwrap();
        let (ok, _) = l.settle(id, usd("1.25"), now);
        assert!(ok);
        assert_eq!(l.spent(&keys[0], now), usd("1.25"));
        assert_eq!(l.spent(&keys[1], now), usd("1.25"));
        assert_eq!(l.reserved_total(), Money::ZERO);
        // A second settle, or a release after settle, changes nothing.
        assert_eq!(l.settle(id, usd("1.25"), now), (false, Vec::new()));
        assert!(!l.release(id));
        assert!(!l.release(ReservationId(999)));
        assert_eq!(l.spent(&keys[0], now), usd("1.25"));
        assert_eq!(l.reserved_total(), Money::ZERO);
        let s = l.status(&keys[0], now);
        assert_eq!(s.remaining, usd("8.75"));
        assert_eq!(s.limit, usd("10"));
        assert_eq!(&*s.budget, "mine");
        assert_eq!(s.label, "mine[okta:bob]");
    }

    #[test]
    fn released_reservations_leave_no_trace() {
        let (_, keys) = three();
        let mut l = Ledger::new();
        let now = ts("2026-01-10T12:00:00Z");
        let ids: Vec<_> = (0..5)
            .map(|_| l.reserve(&keys, usd("2"), now).unwrap())
            .collect();
        assert_eq!(l.reserved_total(), usd("30"));
        assert!(l.reserve(&keys, usd("0.01"), now).is_err());
        for id in ids {
            assert!(l.release(id));
        }
        assert_eq!(l.reserved_total(), Money::ZERO);
        assert_eq!(l.spent(&keys[0], now), Money::ZERO);
        assert!(l.reserve(&keys, usd("10"), now).is_ok());
    }

    #[test]
    fn reservations_survive_a_window_rollover() {
        let k = one("day", "10", "");
        let mut l = Ledger::new();
        let id = l
            .reserve(
                std::slice::from_ref(&k),
                usd("4"),
                ts("2026-01-10T23:59:00Z"),
            )
            .unwrap();
        let next = ts("2026-01-11T00:01:00Z");
        assert_eq!(l.status(&k, next).reserved, usd("4"));
        // Settled after midnight: counted in the new day's window.
        l.settle(id, usd("3"), next);
        assert_eq!(l.spent(&k, next), usd("3"));
        assert_eq!(l.spent(&k, ts("2026-01-10T23:59:30Z")), Money::ZERO);
        assert_eq!(l.reserved_total(), Money::ZERO);
    }

    #[test]
    fn calendar_windows_roll_over() {
        let k = one("week", "10", "timezone = \"America/New_York\"");
        let mut l = Ledger::new();
        // Sunday evening in New York (Monday 03:00 UTC).
        let sun = ts("2026-03-02T03:00:00Z");
        l.record(&k, usd("9"), sun);
        assert!(l.reserve(std::slice::from_ref(&k), usd("2"), sun).is_err());
        assert_eq!(l.status(&k, sun).resets_at, ts("2026-03-02T05:00:00Z"));
        // Monday 00:00 in New York: a new week.
        let mon = ts("2026-03-02T05:00:00Z");
        assert_eq!(l.spent(&k, mon), Money::ZERO);
        let id = l.reserve(std::slice::from_ref(&k), usd("2"), mon).unwrap();
        l.settle(id, usd("2"), mon);
        assert_eq!(l.spent(&k, mon), usd("2"));
        // (A fresh ledger: instances are keyed by budget name, and both test budgets are named "b".)
        let mut l = Ledger::new();
        let m = one("month", "10", "timezone = \"Asia/Tokyo\"");
        l.record(&m, usd("5"), ts("2026-01-31T14:59:59Z"));
        assert_eq!(l.spent(&m, ts("2026-01-31T14:59:59Z")), usd("5"));
        assert_eq!(l.spent(&m, ts("2026-01-31T15:00:00Z")), Money::ZERO);
    }

    #[test]
    fn calendar_day_across_dst_in_berlin() {
        let k = one("day", "10", "timezone = \"Europe/Berlin\"");
        let mut l = Ledger::new();
        // 2026-10-25 is 25 hours long in Berlin: 22:00 UTC on the 24th to 23:00 UTC on the 25th.
        l.record(&k, usd("1"), ts("2026-10-24T22:00:00Z"));
        l.record(&k, usd("2"), ts("2026-10-25T22:59:59Z"));
        assert_eq!(l.spent(&k, ts("2026-10-25T22:59:59Z")), usd("3"));
        assert_eq!(
            l.status(&k, ts("2026-10-25T12:00:00Z")).resets_at,
            ts("2026-10-25T23:00:00Z")
        );
        assert_eq!(l.spent(&k, ts("2026-10-25T23:00:00Z")), Money::ZERO);
        // 2026-03-29 is 23 hours long: it ends at 22:00 UTC.
        l.record(&k, usd("4"), ts("2026-03-29T21:59:59Z"));
        assert_eq!(l.spent(&k, ts("2026-03-29T21:59:59Z")), usd("4"));
        assert_eq!(l.spent(&k, ts("2026-03-29T22:00:00Z")), Money::ZERO);
    }

    #[test]
    fn rolling_24h_window_leaves_late_never_early() {
        let k = one("24h", "10", "");
        let mut l = Ledger::new();
        // Buckets are 1440 s (24 min). Spend at 12:05 is in the bucket [12:00, 12:24).
        let t = ts("2026-01-01T12:05:00Z");
        let id = l.reserve(std::slice::from_ref(&k), usd("6"), t).unwrap();
        l.settle(id, usd("6"), t);
        // Still counted exactly 24 h later and up to the bucket's end + 24 h.
        assert_eq!(l.spent(&k, ts("2026-01-02T12:05:00Z")), usd("6"));
        assert_eq!(l.spent(&k, ts("2026-01-02T12:23:59Z")), usd("6"));
        assert!(l
            .reserve(
                std::slice::from_ref(&k),
                usd("5"),
                ts("2026-01-02T12:23:59Z")
            )
            .is_err());
        assert_eq!(
            l.status(&k, ts("2026-01-02T12:00:00Z")).resets_at,
            ts("2026-01-02T12:24:00Z")
        );
        // Gone at most one bucket (24 min) after 24 h.
        let later = ts("2026-01-02T12:24:00Z");
        assert_eq!(l.spent(&k, later), Money::ZERO);
        assert!(l
            .reserve(std::slice::from_ref(&k), usd("10"), later)
            .is_ok());
        // Every second in between: counted for at least 24 h, at most 24 h + 24 min.
        let mut l = Ledger::new();
        let t0 = ts("2026-01-01T00:00:00Z");
        for step in 0..200i64 {
            let at = t0 + secs(step * 37);
            l.record(&k, usd("0.01"), at);
            let day = at + secs(86_400);
            assert!(l.spent(&k, day) >= usd("0.01"), "left early at {at}");
            let late = at + secs(86_400 + 1440);
            let alone = {
                let mut solo = Ledger::new();
                solo.record(&k, usd("0.01"), at);
                solo.spent(&k, late)
            };
            assert_eq!(alone, Money::ZERO, "left more than a bucket late at {at}");
        }
    }

    fn secs(s: i64) -> jiff::SignedDuration {
        jiff::SignedDuration::from_secs(s)
    }

    #[test]
    fn rolling_7d_window() {
        let k = one("7d", "100", "");
        let mut l = Ledger::new();
        // Buckets are 10080 s (2 h 48 min).
        let t = ts("2026-01-05T10:00:00Z");
        l.record(&k, usd("40"), t);
        l.record(&k, usd("50"), ts("2026-01-08T10:00:00Z"));
        assert_eq!(l.spent(&k, ts("2026-01-12T09:59:59Z")), usd("90"));
        assert_eq!(
            l.headroom(std::slice::from_ref(&k), ts("2026-01-12T09:59:59Z")),
            usd("10")
        );
        // Exactly 7 days later still counted; 7 days + one bucket later gone.
        assert_eq!(l.spent(&k, ts("2026-01-12T10:00:00Z")), usd("90"));
        assert_eq!(l.spent(&k, t + secs(7 * 86_400 + 10_080)), usd("50"));
        let rs = l.status(&k, ts("2026-01-12T10:00:00Z")).resets_at;
        assert!(rs > t + secs(7 * 86_400));
        assert!(rs <= t + secs(7 * 86_400 + 10_080));
        assert_eq!(l.spent(&k, ts("2026-01-16T00:00:00Z")), Money::ZERO);
    }

    #[test]
    fn alerts_fire_once_per_window_and_again_in_the_next() {
        let k = one(
            "day",
            "10",
            "alert_at = [50, 80, 100]\nwebhook = \"https://hooks.example.com/x\"",
        );
        let mut l = Ledger::new();
        let day1 = ts("2026-01-10T08:00:00Z");
        let settle = |l: &mut Ledger, amt: &str, now: Timestamp| -> Vec<u32> {
            let id = l.reserve(std::slice::from_ref(&k), usd(amt), now).unwrap();
            let (ok, ev) = l.settle(id, usd(amt), now);
            assert!(ok);
            ev.iter().map(|e| e.threshold).collect()
        };
        assert_eq!(settle(&mut l, "4.99", day1), Vec::<u32>::new());
        assert_eq!(settle(&mut l, "0.01", day1), vec![50]);
        assert_eq!(settle(&mut l, "1", day1), Vec::<u32>::new());
        // One settle crossing two thresholds emits both, each once.
        let id = l.reserve(std::slice::from_ref(&k), usd("4"), day1).unwrap();
        let (_, ev) = l.settle(id, usd("4"), day1);
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[0].threshold, ev[1].threshold), (80, 100));
        assert_eq!(ev[1].spent, usd("10"));
        assert_eq!(ev[1].limit, usd("10"));
        assert_eq!(ev[1].window_start, ts("2026-01-10T00:00:00Z"));
        assert_eq!(
            ev[1].webhook.as_deref(),
            Some("https://hooks.example.com/x")
        );
        assert_eq!(&*ev[1].budget, "b");
        // The next day re-arms them.
        let day2 = ts("2026-01-11T08:00:00Z");
        assert_eq!(settle(&mut l, "5", day2), vec![50]);
        // record() alerts too.
        let ev = l.record(&k, usd("3"), day2);
        assert_eq!(ev.iter().map(|e| e.threshold).collect::<Vec<_>>(), vec![80]);
        assert_eq!(l.reserved_total(), Money::ZERO);
    }

    #[test]
    fn alert_only_budgets_never_refuse_but_track() {
        let (_, keys) = three();
        let watch = &keys[2];
        let mut l = Ledger::new();
        let now = ts("2026-01-10T12:00:00Z");
        // "watch" is 1 USD, alert-only: reserving 5 on it alone is fine.
        let id = l
            .reserve(std::slice::from_ref(watch), usd("5"), now)
            .unwrap();
        let (_, ev) = l.settle(id, usd("5"), now);
        assert_eq!(
            ev.iter().map(|e| e.threshold).collect::<Vec<_>>(),
            vec![100, 500]
        );
        assert_eq!(l.spent(watch, now), usd("5"));
        assert_eq!(l.status(watch, now).remaining, Money::ZERO);
        assert!(l
            .reserve(std::slice::from_ref(watch), usd("100"), now)
            .is_ok());
        // Headroom ignores it: only "mine" (10) and "team" (15) limit.
        assert_eq!(l.headroom(&keys, now), usd("10"));
        assert_eq!(
            l.headroom(std::slice::from_ref(watch), now),
            Money::from_pico(i128::MAX)
        );
    }

    #[test]
    fn headroom_is_the_smallest_remaining() {
        let (_, keys) = three();
        let mut l = Ledger::new();
        let now = ts("2026-01-10T12:00:00Z");
        assert_eq!(l.headroom(&keys, now), usd("10"));
        l.record(&keys[1], usd("12"), now);
        assert_eq!(l.headroom(&keys, now), usd("3"));
        let _held = l.reserve(&keys, usd("1"), now).unwrap();
        assert_eq!(l.headroom(&keys, now), usd("2"));
        l.record(&keys[1], usd("5"), now);
        assert_eq!(l.headroom(&keys, now), Money::ZERO);
    }

    #[test]
    fn rekey_from_day_to_week_keeps_the_weeks_spend() {
        let day = "[[budgets]]\nname = \"b\"\namount_usd = \"100\"\nwindow = \"day\"\nscope = \"everyone\"\nalert_at = [10]";
        let s1 = set(day);
        let k1 = InstanceKey {
            budget: Arc::clone(&s1.budgets()[0]),
            member: None,
        };
        let mut l = Ledger::new();
        // Week of Monday 2026-01-05: spend Mon, Tue, Wed; and the Sunday before (previous week).
        l.record(&k1, usd("7"), ts("2026-01-04T23:59:59Z"));
        l.record(&k1, usd("3"), ts("2026-01-05T00:00:00Z"));
        l.record(&k1, usd("4"), ts("2026-01-06T13:00:00Z"));
        let wed = ts("2026-01-07T09:00:00Z");
        let id = l.reserve(std::slice::from_ref(&k1), usd("5"), wed).unwrap();
        l.settle(id, usd("5"), wed);
        let held = l.reserve(std::slice::from_ref(&k1), usd("1"), wed).unwrap();
        assert_eq!(l.spent(&k1, wed), usd("5"));
        let s2 = set(&day.replace("\"day\"", "\"week\""));
        l.rekey(&s2);
        let k2 = InstanceKey {
            budget: Arc::clone(&s2.budgets()[0]),
            member: None,
        };
        assert_eq!(l.spent(&k2, wed), usd("12"));
        assert_eq!(l.status(&k2, wed).resets_at, ts("2026-01-12T00:00:00Z"));
        // The reservation survived the reload and settles against the new definition.
        assert_eq!(l.reserved_total(), usd("1"));
        // 12 already passed the 10 % threshold: the reload does not alert for it again.
        let (ok, ev) = l.settle(held, usd("1"), wed);
        assert!(ok);
        assert!(ev.is_empty(), "{ev:?}");
        assert_eq!(l.spent(&k2, wed), usd("13"));
        assert_eq!(l.reserved_total(), Money::ZERO);
        // And to a rolling 48h window: Tuesday and Wednesday spend, counted late rather than early.
        let s3 = set(&day.replace("\"day\"", "\"48h\""));
        l.rekey(&s3);
        assert_eq!(l.spent(&k2, wed), usd("10"));
        // A new amount takes effect; a removed budget's instances are dropped.
        let s4 = set(&day
            .replace("\"100\"", "\"11\"")
            .replace("\"day\"", "\"48h\""));
        l.rekey(&s4);
        assert_eq!(l.status(&k2, wed).limit, usd("11"));
        assert!(l.reserve(std::slice::from_ref(&k2), usd("2"), wed).is_err());
        l.rekey(&BudgetSet::default());
        assert!(l.is_empty());
    }

    #[test]
    fn history_is_pruned_to_32_days() {
        let k = one("month", "1000", "");
        let mut l = Ledger::new();
        let start = ts("2026-01-01T00:00:00Z");
        for d in 0..90i64 {
            l.record(&k, usd("1"), start + secs(d * 86_400));
        }
        let st = l.instances.get(&k).unwrap();
        assert!(st.history.len() <= 33, "{}", st.history.len());
        // March 1 .. March 31 recorded: the month has 31 days... of spend recorded so far.
        assert_eq!(l.spent(&k, ts("2026-03-31T12:00:00Z")), usd("31"));
    }

    #[test]
    fn negative_amounts_count_as_zero() {
        let k = one("day", "10", "");
        let mut l = Ledger::new();
        let now = ts("2026-01-10T12:00:00Z");
        let id = l
            .reserve(std::slice::from_ref(&k), Money::from_pico(-5), now)
            .unwrap();
        l.settle(id, Money::from_pico(-7), now);
        assert_eq!(l.spent(&k, now), Money::ZERO);
        assert_eq!(l.reserved_total(), Money::ZERO);
    }
}
