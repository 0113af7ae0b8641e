//! Budget leases in the store: how the nodes of a fleet share one budget without a store round trip per
//! request. The same shape as the per-core slices of [`crate::budget::slices`], with a store transaction as the
//! owner.
//!
//! Owns: the lease keys and the three transactions a node runs against them: [`acquire`] (take or grow a
//! lease on one budget instance's current window), [`commit`] (a node's ledger batch: spend added, and
//! the same amount taken off the node's lease, in one transaction, idempotent by batch), and [`release`]
//! (give back what is left). The fleet simulation in this module's tests runs them under faults.
//!
//! Keys (from [`keys`], which documents them): `("tg", "lease", budget, member, window, node)` holds the
//! lease's unspent amount (pico-USD, 16-byte counter, atomic add) and `("tg", "lease_exp", budget, member,
//! window, node)` its expiry (Unix ms, 8 bytes LE). `window` is the window's start (Unix seconds), so
//! leases never carry over a window's end.
//!
//! The invariant: for every instance and window, committed spend + every live lease <= the limit. An
//! [`acquire`] grants only what fits next to the spend and the other nodes' unexpired leases; a node
//! admits requests only against its own lease (locally, no store round trip) and stops at its lease's
//! expiry; [`commit`] moves an amount from the node's lease to spend, which leaves the sum unchanged.
//!
//! Expiry and clocks: a lease is renewed before it runs out (by amount or time); a node that dies holds
//! its lease only until it expires. Other nodes reclaim an expired lease only `max_skew_ms` after its
//! expiry by their own clock, so clocks that disagree by less than that cannot make two nodes spend the
//! same amount.
//!
//! Overshoot bound: zero while nodes live. A node that crashes with settled spend not yet committed (at
//! most one commit interval's worth, and never more than its lease) replays it from its journal when it
//! restarts; if its lease expired and was reclaimed meanwhile, that spend lands on top of what others
//! were granted: fleet spend <= limit + the spend crashed nodes had not committed, which is bounded by
//! their leases (each at most (remaining / (2 x nodes)) + one request near the limit).
//!
//! Fails: store errors pass through; callers retry with [`crate::store::transact`]. Cost: [`acquire`]
//! reads the window's spend slots and the instance's leases (a few hundred keys at most); [`commit`] is
//! the ledger batch plus one atomic add per lease touched.

use crate::store::keys::{self, SLOT_SECS};
use crate::store::ledger::{self, Batch, InstanceName};
use crate::store::{decode_i128, StoreError, Transaction};

/// One budget instance in one window, as the fleet sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WindowRef {
    pub instance: InstanceName,
    /// The window's start and end, Unix seconds (`[start, end)`).
    pub start: i64,
    pub end: i64,
    /// The budget's amount, pico-USD.
    pub limit: i128,
}

/// How a node asks for a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub node: u64,
    /// What a request waiting now needs (granted in full or not at all).
    pub need: i128,
    /// What the node would like on top, from its recent spend rate (shrunk near the limit).
    pub want: i128,
    /// Nodes in the fleet (a lease is at most what is available / (2 x nodes), or `need`).
    pub nodes: u64,
    pub now_ms: i64,
    pub ttl_ms: i64,
    pub max_skew_ms: i64,
}

/// A granted lease: its unspent amount after the grant, what was added, and its new expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub total: i128,
    pub added: i128,
    pub expires_ms: i64,
}

/// The [`keys::lease`] key of `node` on `w`.
fn lease_key(w: &WindowRef, node: u64) -> Vec<u8> {
    keys::lease(&w.instance.budget, &w.instance.member, w.start, node)
}

/// The [`keys::lease_expiry`] key of `node` on `w`.
fn exp_key(w: &WindowRef, node: u64) -> Vec<u8> {
    keys::lease_expiry(&w.instance.budget, &w.instance.member, w.start, node)
}

fn i64_le(v: &[u8]) -> Result<i64, StoreError> {
    let b: [u8; 8] = v
        .try_into()
        .map_err(|_| StoreError::Corrupt("a lease expiry is not 8 bytes".into()))?;
    Ok(i64::from_le_bytes(b))
}

/// Spend committed to the instance in the window, pico-USD.
pub fn committed(txn: &mut dyn Transaction, w: &WindowRef) -> Result<i128, StoreError> {
    let (b, e) = keys::spend_slots(
        &w.instance.budget,
        &w.instance.member,
        w.start.div_euclid(SLOT_SECS),
        w.end.div_euclid(SLOT_SECS),
    );
    let mut total: i128 = 0;
    for (_, v) in txn.get_range(&b, &e, 0)? {
        total = total.wrapping_add(decode_i128(&v)?);
    }
    Ok(total)
}

/// Every lease on the instance in the window: (node, unspent amount, expiry ms).
pub fn leases(
    txn: &mut dyn Transaction,
    w: &WindowRef,
) -> Result<Vec<(u64, i128, i64)>, StoreError> {
    let (budget, member) = (&w.instance.budget, &w.instance.member);
    let node_of = |k: &[u8]| -> Result<u64, StoreError> {
        keys::lease_node(k)?.ok_or_else(|| StoreError::Corrupt("a lease key without a node".into()))
    };
    let (b, e) = keys::window_leases(budget, member, w.start);
    let amounts = txn.get_range(&b, &e, 0)?;
    let (b, e) = keys::window_lease_expiries(budget, member, w.start);
    let exps = txn.get_range(&b, &e, 0)?;
    let mut out = Vec::with_capacity(amounts.len());
    for (k, v) in &amounts {
        let node = node_of(k)?;
        let mut exp = i64::MIN;
        for (ek, ev) in &exps {
            if node_of(ek)? == node {
                exp = i64_le(ev)?;
            }
        }
        out.push((node, decode_i128(v)?, exp));
    }
    Ok(out)
}

/// Grants `ask.node` at least `ask.need` (or nothing) plus up to `ask.want` on its lease of `w`, renewing
/// its expiry, if that fits next to the committed spend and the other nodes' live leases; reclaims leases
/// expired for longer than `max_skew_ms`. `Ok(None)`: the budget cannot cover `need`.
pub fn acquire(
    txn: &mut dyn Transaction,
    w: &WindowRef,
    ask: &Ask,
) -> Result<Option<LeaseGrant>, StoreError> {
    let spent = committed(txn, w)?;
    let mut held_by_others: i128 = 0;
    let mut mine: i128 = 0;
    for (node, amount, exp) in leases(txn, w)? {
        if node == ask.node {
            mine = amount;
        } else if exp.saturating_add(ask.max_skew_ms) < ask.now_ms {
            // Expired, by more than clocks can disagree: the amount goes back to the budget.
            txn.clear(&lease_key(w, node));
            txn.clear(&exp_key(w, node));
        } else {
            held_by_others = held_by_others.saturating_add(amount.max(0));
        }
    }
    let available = w
        .limit
        .saturating_sub(spent)
        .saturating_sub(held_by_others)
        .saturating_sub(mine.max(0));
    let need = ask.need.max(0);
    if need > available {
        return Ok(None);
    }
    let cap = available / (2 * i128::from(ask.nodes.max(1)));
    let extra = ask.want.max(0).min(cap).min(available - need);
    let added = need + extra;
    let expires_ms = ask.now_ms.saturating_add(ask.ttl_ms);
    // A lease below zero (this node committed more than it held: spend admitted while the store was out
    // of reach on an `on_store_failure = "open"` budget, or settled after its lease was reclaimed) starts
    // again from zero: that spend is in `spent` already, so carrying the debt would count it twice.
    txn.add(&lease_key(w, ask.node), added.saturating_sub(mine.min(0)));
    txn.set(&exp_key(w, ask.node), &expires_ms.to_le_bytes());
    Ok(Some(LeaseGrant {
        total: mine.max(0).saturating_add(added),
        added,
        expires_ms,
    }))
}

/// A node's ledger batch: its spend (idempotent by the batch's sequence numbers, see
/// [`ledger::apply_batch`]) and, only if the batch was new, each amount taken off the node's lease of its
/// window. Returns whether the batch was new.
pub fn commit(
    txn: &mut dyn Transaction,
    batch: &Batch,
    node: u64,
    from_leases: &[(WindowRef, i128)],
) -> Result<bool, StoreError> {
    if !ledger::apply_batch(txn, batch)? {
        return Ok(false);
    }
    for (w, amount) in from_leases {
        txn.add(&lease_key(w, node), amount.saturating_neg());
    }
    Ok(true)
}

/// Gives back `node`'s lease of `w` (what is left of it is unspent): the amount returns to the budget.
/// Returns what was left.
pub fn release(txn: &mut dyn Transaction, w: &WindowRef, node: u64) -> Result<i128, StoreError> {
    let left = match txn.get(&lease_key(w, node))? {
        Some(v) => decode_i128(&v)?,
        None => 0,
    };
    txn.clear(&lease_key(w, node));
    txn.clear(&exp_key(w, node));
    Ok(left)
}

/// Gives back every lease `node` holds, on any instance and window (a node that restarts with the same
/// id, after replaying its journal: its old leases counted spend that is now committed). Reads every
/// lease key of the fleet. Returns how many leases were cleared.
pub fn release_all(txn: &mut dyn Transaction, node: u64) -> Result<usize, StoreError> {
    let mut cleared = 0;
    for (is_amount, (b, e)) in [
        (true, keys::all_leases()),
        (false, keys::all_lease_expiries()),
    ] {
        for (k, _) in txn.get_range(&b, &e, 0)? {
            if keys::lease_node(&k)? == Some(node) {
                txn.clear(&k);
                cleared += usize::from(is_amount);
            }
        }
    }
    Ok(cleared)
}
