//! Fleet leases on the owning core: this node's budget lease on each instance the core owns, when the
//! spend store is shared by several gateways (`ledger.cluster_file`, or [`crate::Gateway::start_with_store`]
//! with `fleet`; see `docs/fleet.md`).
//!
//! Owns: [`Fleet`] (per core: the leases, what each reservation holds on them, and the asks in flight to
//! the committer thread). Slices are off in fleet mode, and the owner of each instance whose budget is not
//! alert-only keeps this node's lease on it ([`tollgate_core::store::fleet`]): `avail`, its expiry and
//! window. A reservation is admitted only if the local ledger admits it AND every such lease has
//! `avail >= amount` (all or nothing; the amount is taken off on success). A lease that is missing, short,
//! of an ended window, or in the last quarter of its TTL sends a lease ask to the committer thread
//! ([`crate::spend::records::ToLedger::Lease`]) and the owner ([`crate::spend::shard`]) defers the
//! reservation (as a recall does) until the answer ([`crate::runtime::inbox::Msg::FleetLease`]); it is then
//! decided once, without asking again: still short is a 429 naming the budget. A grant sets
//! `avail = lease - (this node's uncommitted spend + holds + what settled since the ask)`, a conservative
//! count (a settlement may be counted twice until the next grant, never missed). Settling gives
//! `reserved - actual` back to the lease (the actual leaves it in the store when its batch commits),
//! releasing gives `reserved` back. A lease running low (under a quarter of what was last added) or in the
//! last third of its TTL is renewed in the background, without waiting. The response headers' budget view
//! is this node's.
//!
//! Fails closed: a lease ask the committer thread cannot take (its channel full), a store that fails during
//! the ask, or no answer within 5 s ([`FLEET_WAIT_MS`]; sooner once the ledger's commits fail or a store
//! call has stalled for `ledger.fail_closed_after_ms`) refuses the requests the node's leases cannot cover
//! (429), while requests within them keep being admitted until a quarter TTL before their expiry. The
//! exception is a budget with `on_store_failure = "open"`: while the store is out of reach (the last ask
//! failed or went unanswered, or the ledger's commits fail), its requests are admitted on this node's
//! last view of the fleet, without a lease: the fleet's committed spend at the last answer, plus what this
//! node settled and holds since, must stay within the limit (before any answer, the local ledger alone
//! decides). Every node does so on its own view, so the fleet can exceed such a budget by what the other
//! nodes spend meanwhile: the availability an open budget asks for.
//!
//! Time: every lease decision reads the wall clock plus `ledger.clock_offset_ms` ([`Fleet::now_ms`]; 0 but
//! in fault-injection tests, which skew one node's clock with it).
//! Cost: an admission within the lease is the local one plus a few map operations; an ask costs one store
//! transaction on the committer thread (not on the core), at most one per request that finds its lease
//! short.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::Arc;

use jiff::Timestamp;
use tollgate_core::budget::owner::{Refusal, ReservationId};
use tollgate_core::budget::{Action, InstanceKey};
use tollgate_core::Money;

use crate::runtime::inbox::FleetAnswer;
use crate::spend::records::ToLedger;

/// How long a deferred ask waits for the committer thread's lease answer before deciding with what it has.
pub const FLEET_WAIT_MS: i64 = 5_000;

/// This node's lease on one instance this core owns (fleet mode).
#[derive(Debug, Default)]
struct NodeLease {
    /// What new reservations may still take, pico-USD.
    avail: i128,
    expires_ms: i64,
    last_added: i128,
    window_start: i64,
    window_end_ms: i64,
    /// Reserved and not yet settled or released, pico-USD.
    held: i128,
    /// Everything settled on this instance so far (a running total), pico-USD.
    settled: i128,
    /// The last answer's view (for refusals, and for admitting an open budget while the store is out of
    /// reach): the fleet's committed spend in the window, and the limit.
    spent: Money,
    limit: Money,
    /// `settled` when that answer came; whether one came at all (a failed ask tells nothing).
    settled_at_answer: i128,
    answered: bool,
}

/// Fleet mode on a core (see the module docs).
#[derive(Debug)]
pub struct Fleet {
    tx: crossbeam_channel::Sender<ToLedger>,
    /// The committer thread: woken after a lease ask (it otherwise sleeps until its next interval).
    wake: Option<std::thread::Thread>,
    ttl_ms: i64,
    /// Added to the wall clock for every lease decision (`ledger.clock_offset_ms`).
    clock_offset_ms: i64,
    /// The last lease ask failed in the store, could not be handed over, or went unanswered for
    /// [`FLEET_WAIT_MS`]; cleared by the next answer the store gave.
    unreachable: Cell<bool>,
    leases: RefCell<HashMap<InstanceKey, NodeLease>>,
    /// Per reservation: the leased instances it holds, and the amount on each.
    held: RefCell<HashMap<ReservationId, (Vec<InstanceKey>, i128)>>,
    /// Asks in flight: the instance, and its settled total when the ask was sent.
    asks: RefCell<HashMap<u64, (InstanceKey, i128)>>,
    next_ask: Cell<u64>,
}

/// Whether an open budget's instance may take `amount` without a lease while the store is out of reach:
/// the fleet's committed spend at the last answer, plus what this node settled since and holds, plus
/// `amount`, within the limit. Before any answer the local ledger alone decides (true here).
fn open_room(l: &NodeLease, amount: i128, limit: i128) -> bool {
    if !l.answered {
        return true;
    }
    l.spent
        .pico()
        .saturating_add(l.settled.saturating_sub(l.settled_at_answer).max(0))
        .saturating_add(l.held.max(0))
        .saturating_add(amount)
        <= limit
}

/// The instances among `keys` that need a lease (all but alert-only ones), once each.
fn leased_keys(keys: &[InstanceKey]) -> Vec<&InstanceKey> {
    let mut out: Vec<&InstanceKey> = Vec::with_capacity(keys.len());
    for k in keys {
        if !matches!(k.budget.action, Action::Alert) && !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

impl Fleet {
    /// Lease asks go to the committer thread over `tx` (and wake it, `wake`); leases last `ttl_ms`; the
    /// lease clock is the wall clock plus `clock_offset_ms`.
    pub fn new(
        tx: crossbeam_channel::Sender<ToLedger>,
        wake: Option<std::thread::Thread>,
        ttl_ms: i64,
        clock_offset_ms: i64,
    ) -> Fleet {
        Fleet {
            tx,
            wake,
            ttl_ms: ttl_ms.max(1),
            clock_offset_ms,
            unreachable: Cell::new(false),
            leases: RefCell::new(HashMap::new()),
            held: RefCell::new(HashMap::new()),
            asks: RefCell::new(HashMap::new()),
            next_ask: Cell::new(1),
        }
    }

    /// This node's lease clock: `now` plus `ledger.clock_offset_ms`, Unix ms.
    pub fn now_ms(&self, now: Timestamp) -> i64 {
        now.as_millisecond().saturating_add(self.clock_offset_ms)
    }

    /// Whether the store is out of reach as far as lease asks tell (see [`Fleet::short`]).
    pub fn unreachable(&self) -> bool {
        self.unreachable.get()
    }

    /// A lease ask went unanswered for [`FLEET_WAIT_MS`].
    pub fn mark_unreachable(&self) {
        self.unreachable.set(true);
    }

    /// The leased instances among `keys` whose lease cannot take `amount` now (none yet, in its last
    /// quarter TTL, of an earlier window, or short). With `store_down` (the store is out of reach), an
    /// instance of an `on_store_failure = "open"` budget is not short while this node's last view of the
    /// fleet leaves room for `amount` (see the module docs).
    pub fn short(
        &self,
        keys: &[InstanceKey],
        amount: i128,
        now_ms: i64,
        store_down: bool,
    ) -> Vec<InstanceKey> {
        let leases = self.leases.borrow();
        leased_keys(keys)
            .into_iter()
            .filter(|k| match leases.get(*k) {
                Some(l) => {
                    let covered = now_ms < l.expires_ms.saturating_sub(self.ttl_ms / 4)
                        && now_ms < l.window_end_ms
                        && l.avail >= amount;
                    let open = store_down
                        && k.budget.fail_open
                        && open_room(l, amount, k.budget.amount.pico());
                    !(covered || open)
                }
                None => !(store_down && k.budget.fail_open),
            })
            .cloned()
            .collect()
    }

    /// Whether a lease ask on `key` is in flight.
    pub fn asking(&self, key: &InstanceKey) -> bool {
        self.asks.borrow().values().any(|(a, _)| a == key)
    }

    /// What a lease ask for `amount` on `key` must get at least: the shortfall of a current lease, or
    /// all of it.
    pub fn need(&self, key: &InstanceKey, amount: i128, now_ms: i64) -> i128 {
        match self.leases.borrow().get(key) {
            Some(l) if now_ms < l.window_end_ms && now_ms < l.expires_ms => {
                amount.saturating_sub(l.avail.max(0)).max(0)
            }
            _ => amount,
        }
    }

    /// Asks the committer thread, for core `core`, for `need` more (and some to spare) on this node's
    /// lease of `key`. The ask's id, or `None` when it could not be handed over.
    pub fn ask(&self, core: usize, key: &InstanceKey, need: i128, amount: i128) -> Option<u64> {
        let id = self.next_ask.get();
        self.next_ask.set(id.wrapping_add(1));
        let (settled, want) = {
            let leases = self.leases.borrow();
            let l = leases.get(key);
            (
                l.map_or(0, |l| l.settled),
                l.map_or(0, |l| l.last_added)
                    .saturating_mul(2)
                    .max(amount.saturating_mul(16)),
            )
        };
        self.asks.borrow_mut().insert(id, (key.clone(), settled));
        let msg = ToLedger::Lease {
            core,
            id,
            key: key.clone(),
            need: Money::from_pico(need.max(0)),
            want: Money::from_pico(want.max(0)),
        };
        if self.tx.try_send(msg).is_err() {
            self.asks.borrow_mut().remove(&id);
            self.unreachable.set(true);
            return None;
        }
        if let Some(t) = &self.wake {
            t.unpark();
        }
        Some(id)
    }

    /// A reservation `res` took `amount` off the leases of its leased instances; renews in the background
    /// (asking for core `core`) a lease that runs low (under a quarter of what was last added) or nears
    /// its expiry (its last third TTL).
    pub fn consume(
        &self,
        core: usize,
        res: ReservationId,
        keys: &[InstanceKey],
        amount: i128,
        now_ms: i64,
    ) {
        let leased: Vec<InstanceKey> = leased_keys(keys).into_iter().cloned().collect();
        if leased.is_empty() {
            return;
        }
        let mut renew = Vec::new();
        {
            let mut leases = self.leases.borrow_mut();
            for k in &leased {
                if let Some(l) = leases.get_mut(k) {
                    l.avail = l.avail.saturating_sub(amount);
                    l.held = l.held.saturating_add(amount);
                    if l.avail < l.last_added / 4
                        || now_ms > l.expires_ms.saturating_sub(self.ttl_ms / 3)
                    {
                        renew.push(k.clone());
                    }
                }
            }
        }
        self.held.borrow_mut().insert(res, (leased, amount));
        for k in renew {
            if !self.asking(&k) {
                let _ = self.ask(core, &k, 0, amount);
            }
        }
    }

    /// Reservation `res` settled for `actual` (or was released: `None`); its holds go back to the leases,
    /// less the actual (which leaves the lease in the store when its batch commits).
    pub fn settled(&self, res: ReservationId, actual: Option<Money>) {
        let Some((keys, amount)) = self.held.borrow_mut().remove(&res) else {
            return;
        };
        let actual = actual.map_or(0, |a| a.max(Money::ZERO).pico());
        let mut leases = self.leases.borrow_mut();
        for k in keys {
            if let Some(l) = leases.get_mut(&k) {
                l.held = l.held.saturating_sub(amount);
                l.avail = l.avail.saturating_add(amount.saturating_sub(actual));
                l.settled = l.settled.saturating_add(actual);
            }
        }
    }

    /// The committer thread answered lease ask `id`. A grant sets the lease to what is left of it for new
    /// reservations: the store's unspent amount, less this node's spend not yet committed, its holds, and
    /// what settled since the ask (counted at most twice, never missed).
    pub fn answered(&self, id: u64, key: InstanceKey, a: FleetAnswer) {
        let sent = self.asks.borrow_mut().remove(&id).map_or(0, |(_, s)| s);
        self.unreachable.set(a.failed && a.out_of_reach);
        let mut leases = self.leases.borrow_mut();
        let l = leases.entry(key).or_default();
        if a.failed {
            // The store did not answer: the last view stands.
            return;
        }
        l.spent = a.spent;
        l.limit = a.limit;
        l.settled_at_answer = l.settled;
        l.answered = true;
        if let Some(g) = a.grant {
            let since = l.settled.saturating_sub(sent).max(0);
            l.avail = g
                .total
                .saturating_sub(a.uncommitted)
                .saturating_sub(l.held)
                .saturating_sub(since);
            l.expires_ms = g.expires_ms;
            l.last_added = g.added;
            l.window_start = a.window_start;
            l.window_end_ms = a.window_end.saturating_mul(1000);
        }
    }

    /// The refusal for an instance this node's lease cannot cover (the fleet's committed spend as last
    /// seen; the rest of the limit is held by leases or in flight).
    pub fn refusal(&self, key: &InstanceKey, now: Timestamp) -> Refusal {
        let limit = key.budget.amount;
        let spent = self
            .leases
            .borrow()
            .get(key)
            .map_or(Money::ZERO, |l| l.spent)
            .min(limit);
        Refusal {
            budget: Arc::clone(&key.budget.name),
            label: key.label(),
            action: key.budget.action.clone(),
            limit,
            spent,
            reserved: limit.checked_sub(spent).unwrap_or(Money::ZERO),
            resets_at: key.budget.window.period(now).map_or(now, |(_, end)| end),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tollgate_core::budget::BudgetSet;
    use tollgate_core::store::fleet::LeaseGrant;

    /// A shared $1 budget (1e12 pico-USD) with `on_store_failure = fail`.
    fn key(fail: &str) -> InstanceKey {
        let set = BudgetSet::from_raw(
            toml::from_str::<toml::Table>(&format!(
                "[[budgets]]\nname = \"team\"\namount_usd = \"1\"\nwindow = \"day\"\nscope = \"everyone\"\non_store_failure = \"{fail}\"\n"
            ))
            .unwrap()["budgets"]
                .clone()
                .try_into()
                .unwrap(),
            Default::default(),
        )
        .unwrap();
        InstanceKey {
            budget: Arc::clone(set.get("team").unwrap()),
            member: None,
        }
    }

    /// A node whose lease on `k` was granted `total`, expiring at `expires_ms`, with the fleet's
    /// committed spend `spent`.
    fn granted(
        k: &InstanceKey,
        offset: i64,
        total: i128,
        expires_ms: i64,
        spent: i128,
    ) -> (Fleet, crossbeam_channel::Receiver<ToLedger>) {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let f = Fleet::new(tx, None, 2_000, offset);
        let id = f.ask(0, k, 1, 1).unwrap();
        f.answered(
            id,
            k.clone(),
            FleetAnswer {
                grant: Some(LeaseGrant {
                    total,
                    added: total,
                    expires_ms,
                }),
                failed: false,
                out_of_reach: false,
                spent: Money::from_pico(spent),
                limit: k.budget.amount,
                uncommitted: 0,
                window_start: 0,
                window_end: i64::MAX / 2_000,
            },
        );
        (f, rx)
    }

    /// The offset moves the lease clock: a node whose clock runs ahead stops admitting on a lease
    /// (a quarter TTL before its expiry) that much earlier by the wall clock.
    #[test]
    fn the_clock_offset_moves_every_lease_decision() {
        let k = key("closed");
        let now = Timestamp::from_millisecond(1_000_000).unwrap();
        for (offset, covered) in [(0, true), (-400, true), (400, false)] {
            // Expires 2,000 ms after `now`: admissions stop at 1,500 ms (a quarter of the TTL before).
            let (f, _rx) = granted(&k, offset, 100, 1_002_000, 0);
            let t = f.now_ms(now) + 1_200;
            assert_eq!(t, 1_001_200 + offset);
            let short = f.short(std::slice::from_ref(&k), 10, t, false);
            assert_eq!(short.is_empty(), covered, "offset {offset}");
        }
    }

    /// With the store out of reach, an open budget is admitted past its lease while this node's last
    /// view of the fleet leaves room; a closed one is not.
    #[test]
    fn an_open_budget_is_admitted_on_the_last_view_while_the_store_is_out_of_reach() {
        let limit = 1_000_000_000_000i128;
        let now = Timestamp::from_millisecond(1_000_000).unwrap();
        for fail in ["open", "closed"] {
            let k = key(fail);
            let (f, _rx) = granted(&k, 0, 100, 1_002_000, limit - 1_000);
            let t = f.now_ms(now);
            let keys = std::slice::from_ref(&k);
            // Beyond the lease: short while the store answers, whatever the budget says.
            assert_eq!(f.short(keys, 500, t, false).len(), 1);
            let open = fail == "open";
            assert_eq!(f.short(keys, 500, t, true).is_empty(), open, "{fail}");
            // Past the limit as last seen (spent + 1,001 > limit): short either way.
            assert_eq!(f.short(keys, 1_001, t, true).len(), 1, "{fail}");
            // After the lease expired, too.
            let late = t + 10_000;
            assert_eq!(f.short(keys, 500, late, true).is_empty(), open, "{fail}");
        }
        // A failed answer keeps the last view and marks the store out of reach; the next real answer
        // clears it.
        let k = key("open");
        let (f, _rx) = granted(&k, 0, 100, 1_002_000, limit - 1_000);
        assert!(!f.unreachable());
        let id = f.ask(0, &k, 1, 1).unwrap();
        f.answered(
            id,
            k.clone(),
            FleetAnswer {
                grant: None,
                failed: true,
                out_of_reach: true,
                spent: k.budget.amount,
                limit: k.budget.amount,
                uncommitted: 0,
                window_start: 0,
                window_end: 0,
            },
        );
        assert!(f.unreachable());
        assert!(f
            .short(std::slice::from_ref(&k), 500, f.now_ms(now), true)
            .is_empty());
        // An ask that lost to other nodes' grants (conflicts past its retries) found the store busy, not
        // out of reach.
        let (f, _rx) = granted(&k, 0, 100, 1_002_000, limit - 1_000);
        let id = f.ask(0, &k, 1, 1).unwrap();
        f.answered(
            id,
            k.clone(),
            FleetAnswer {
                grant: None,
                failed: true,
                out_of_reach: false,
                spent: k.budget.amount,
                limit: k.budget.amount,
                uncommitted: 0,
                window_start: 0,
                window_end: 0,
            },
        );
        assert!(!f.unreachable());
    }
}
