//! Budget state on the cores: each budget instance is owned by exactly one core, which keeps its
//! [`Ledger`]; a request reserves on the owners of every instance that applies, and settles there once.
//!
//! Owns: [`CoreBudgets`] (this core's ledger shard, its mailbox handles, and the replies it waits for),
//! [`Reservation`] (a guard that settles exactly once: explicitly with the actual cost, or, when dropped
//! unsettled because the request ended early in any way, by releasing), and the message protocol between
//! cores ([`Msg`]). A reload reaches each shard as [`Msg::Rekey`], posted by the control side. A keep-alive
//! connection handed to the core that owns its caller's budgets arrives as [`Msg::Adopt`] (see
//! [`crate::net::handoff`]).
//!
//! Ownership: an instance scoped to one identity (each member of a group, each identity, one user, one
//! token) is owned by the core the identity hashes to, so all of one identity's budgets live on one core;
//! a shared instance (a group as a whole, everyone) by the core its budget's name hashes to. When the
//! owner is this core, a reservation is a function call on the local ledger (no locks: the ledger is
//! `RefCell`ed on a `!Send` core); otherwise it is an ask over the owner's mailbox, answered through this
//! core's own inbox (the core awaits only its own local oneshot). A request whose instances live on several
//! cores reserves on each in turn and releases what it holds if any refuses, so admission is all-or-nothing.
//!
//! Slices (`server.budget_slices`, default on): a shared instance's owner lends slices of its remaining
//! amount to the other cores ([`tollgate_core::budget::slices`]), so a core admits requests against a
//! team's or everyone's budget locally, with no message per request: it asks the owner ([`Msg::Borrow`])
//! only when its slice falls short, reports what it settled (and gets the owner's view back) on the
//! housekeeping tick, and gives the slice back after 2 s unused. Before refusing a request the owner
//! recalls fat slices ([`Msg::Recall`]) and decides once they are back, so slices never cause a refusal
//! the budget would not have made.
//!
//! Fleet mode (a spend store shared by several gateways: `ledger.cluster_file`, or
//! [`crate::Gateway::start_with_store`] with `fleet`): slices are off, and the owner of each instance whose
//! budget is not alert-only also keeps this node's budget lease on it ([`tollgate_core::store::fleet`]):
//! `avail`, its expiry and window. A reservation is admitted only if the local ledger admits it AND every
//! such lease has `avail >= amount` (all or nothing; the amount is taken off on success). A lease that is
//! missing, short, of an ended window, or in the last quarter of its TTL sends a lease ask to the ledger
//! thread ([`crate::spend::records::ToLedger::Lease`]) and defers the reservation (as a recall does) until the
//! answer ([`Msg::FleetLease`]); it is then decided once, without asking again: still short is a 429
//! naming the budget. A grant sets `avail = lease - (this node's uncommitted spend + holds + what settled
//! since the ask)`, a conservative count (a settlement may be counted twice until the next grant, never
//! missed). Settling gives `reserved - actual` back to the lease (the actual leaves it in the store when
//! its batch commits), releasing gives `reserved` back. A lease running low (under a quarter of what was
//! last added) or in the last third of its TTL is renewed in the background, without waiting. The
//! response headers' budget view is this node's.
//!
//! Fleet mode fails closed: a lease ask the ledger thread cannot take (its channel full), a store that
//! fails during the ask, or no answer within 5 s refuses the requests the node's leases cannot cover (429),
//! while requests within them keep being admitted until a quarter TTL before their expiry. Cost: an
//! admission within the lease is the local one plus a few map operations; an ask costs one store
//! transaction on the ledger thread (not on the core), at most one per request that finds its lease short.
//!
//! Fails: a full or closed mailbox fails the request closed (503 `budget_unavailable`): a budget is never
//! skipped. Settlement and release are fire-and-forget messages; a core that is gone takes its shard with it.
//! Cost: local reservation ~0.2 us (bench `admission`); a cross-core ask ~15 us (the owner's wake-up).

use std::cell::RefCell;
use std::hash::{Hash, Hasher};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use jiff::Timestamp;
use std::collections::HashMap;

use tollgate_core::budget::owner::{AlertEvent, BudgetStatus, Ledger, Refusal, ReservationId};
use tollgate_core::budget::slices::{Grant, Lease, Lend, Lender, Report};
use tollgate_core::budget::{Action, BudgetSet, InstanceKey};
use tollgate_core::Money;

use crate::obs::accesslog::Logger;
use crate::obs::webhook::WebhookSender;
use crate::runtime::inbox::{Adopter, Answer, FleetAnswer, Msg};
use crate::runtime::mailbox::{Inbox, MailboxError, PendingReplies, Postman};

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
    /// The last answer's view, for refusals.
    spent: Money,
    limit: Money,
}

/// Fleet mode on a core (see the module docs).
#[derive(Debug)]
struct Fleet {
    tx: crossbeam_channel::Sender<crate::spend::records::ToLedger>,
    /// The ledger thread: woken after a lease ask (it otherwise sleeps until its next interval).
    wake: Option<std::thread::Thread>,
    ttl_ms: i64,
    leases: RefCell<HashMap<InstanceKey, NodeLease>>,
    /// Per reservation: the leased instances it holds, and the amount on each.
    held: RefCell<HashMap<ReservationId, (Vec<InstanceKey>, i128)>>,
    /// Asks in flight: the instance, and its settled total when the ask was sent.
    asks: RefCell<HashMap<u64, (InstanceKey, i128)>>,
    next_ask: std::cell::Cell<u64>,
}

/// How long a deferred ask waits for the ledger thread's lease answer before deciding with what it has.
const FLEET_WAIT_MS: i64 = 5_000;

/// Why a reservation could not be asked for at all.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("budget state on core {core} is unavailable: {reason}")]
    Unavailable { core: usize, reason: String },
}

/// An ask the owner answers once the slices it recalled are back.
#[derive(Debug)]
enum Deferred {
    Reserve {
        from: usize,
        id: u64,
        keys: Vec<InstanceKey>,
        amount: Money,
    },
    Borrow {
        from: usize,
        id: u64,
        key: InstanceKey,
        need: Money,
    },
}

#[derive(Debug)]
struct Waiting {
    ask: Deferred,
    /// Recalled borrowers (and the instance) not yet known to be thin.
    on: Vec<(usize, InstanceKey)>,
    /// Fleet mode: lease asks to the ledger thread not yet answered.
    fleet_on: Vec<u64>,
    since: Timestamp,
}

/// How long an owner waits for recalled slices before deciding with what it has.
const RECALL_WAIT_MS: i64 = 200;
/// A slice unused this long goes back to its owner.
const LEASE_IDLE_MS: i64 = 2_000;

/// This core's share of the budget state and its links to the other cores.
pub struct CoreBudgets {
    pub core: usize,
    cores: usize,
    ledger: RefCell<Ledger>,
    /// Lend slices of the shared instances this core owns, and borrow those owned elsewhere.
    slices: bool,
    lender: RefCell<Lender>,
    leases: RefCell<HashMap<InstanceKey, Lease>>,
    waiting: RefCell<Vec<Waiting>>,
    /// Where settlements go to become durable (see [`crate::spend::journal`]); `None` only in unit tests.
    journal: Option<crate::spend::journal::Journal>,
    health: Option<Arc<crate::spend::committer::Health>>,
    fail_closed_after: std::time::Duration,
    postman: Postman<Msg>,
    pending: PendingReplies<Answer>,
    pending_lent: PendingReplies<Result<(), Box<Refusal>>>,
    log: Logger,
    webhooks: Option<WebhookSender>,
    adopter: RefCell<Option<Adopter>>,
    fleet: Option<Fleet>,
}

impl std::fmt::Debug for CoreBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoreBudgets")
            .field("core", &self.core)
            .field("cores", &self.cores)
            .finish()
    }
}

/// The core that owns `key`.
pub fn owner(key: &InstanceKey, cores: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    match &key.member {
        Some(m) => m.hash(&mut h),
        None => key.budget.name.hash(&mut h),
    }
    (h.finish() % cores.max(1) as u64) as usize
}

/// Awaits an owner's answer on this core's own oneshot; an owner that stopped fails closed.
async fn await_answer(
    rx: local_sync::oneshot::Receiver<Answer>,
    core: usize,
) -> Result<Answer, BudgetError> {
    rx.await.map_err(|_| BudgetError::Unavailable {
        core,
        reason: "the owner stopped".to_owned(),
    })
}

/// The borrower id of an ask's asker.
fn key_borrower(ask: &Deferred) -> u64 {
    match ask {
        Deferred::Reserve { from, .. } | Deferred::Borrow { from, .. } => *from as u64,
    }
}

/// A refusal for an instance the owner could not describe (only if its own state changed under it).
fn unavailable_refusal(key: &InstanceKey) -> Refusal {
    Refusal {
        budget: std::sync::Arc::clone(&key.budget.name),
        label: key.label(),
        action: key.budget.action.clone(),
        limit: key.budget.amount,
        spent: key.budget.amount,
        reserved: Money::ZERO,
        resets_at: Timestamp::now(),
    }
}

/// Which core owns the budgets of the identity with this member key (`source:subject`).
pub fn owner_of_member(member: &str, cores: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    member.hash(&mut h);
    (h.finish() % cores.max(1) as u64) as usize
}

/// One request's hold on its budgets. Settle it with [`Reservation::settle`]; dropping it unsettled
/// releases everything it holds (client gone, upstream failed, a later phase refused: no leak).
#[derive(Debug)]
pub struct Reservation {
    budgets: Rc<CoreBudgets>,
    parts: Vec<(usize, ReservationId)>,
    /// Amounts held on this core's slices of shared instances owned elsewhere.
    leased: Vec<(InstanceKey, Money)>,
    /// Every instance charged: what the journal records.
    keys: Vec<InstanceKey>,
    /// The amount reserved on each instance.
    pub amount: Money,
    /// Messages to other cores this admission waited for (0: admitted on this core alone).
    pub asks: u32,
    /// The standing of every instance after this reservation.
    pub statuses: Vec<BudgetStatus>,
    done: bool,
}

impl Reservation {
    /// Charges `actual` to every instance held and releases the rest of the reservation. Exactly once.
    pub fn settle(mut self, actual: Money) {
        let now = Timestamp::now();
        // Durable first: the journal has the settlement before anything else learns of it.
        self.budgets.journal(&self.keys, actual, now);
        for (core, res) in std::mem::take(&mut self.parts) {
            self.budgets.send_settle(core, res, actual, now);
        }
        for (key, amount) in std::mem::take(&mut self.leased) {
            self.budgets.settle_leased(key, amount, actual, now);
        }
        self.done = true;
    }

    /// The tightest instance: the least remaining.
    pub fn tightest(&self) -> Option<&BudgetStatus> {
        self.statuses.iter().min_by_key(|s| s.remaining)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.done {
            for (core, res) in std::mem::take(&mut self.parts) {
                self.budgets.send_release(core, res);
            }
            for (key, amount) in std::mem::take(&mut self.leased) {
                self.budgets.put_back_leased(key, amount);
            }
        }
    }
}

impl CoreBudgets {
    pub fn new(
        core: usize,
        postman: Postman<Msg>,
        log: Logger,
        webhooks: Option<WebhookSender>,
        slices: bool,
    ) -> CoreBudgets {
        let cores = postman.cores();
        CoreBudgets {
            core,
            cores,
            ledger: RefCell::new(Ledger::new()),
            slices: slices && cores > 1,
            lender: RefCell::new(Lender::new(cores)),
            leases: RefCell::new(HashMap::new()),
            waiting: RefCell::new(Vec::new()),
            journal: None,
            health: None,
            fail_closed_after: std::time::Duration::from_secs(30),
            postman,
            pending: PendingReplies::new(core),
            pending_lent: PendingReplies::new(core),
            log,
            webhooks,
            adopter: RefCell::new(None),
            fleet: None,
        }
    }

    /// Fleet mode: admissions also need this node's budget leases, asked of the ledger thread over `tx`
    /// (see the module docs). Turns slices off.
    pub fn set_fleet(
        &mut self,
        tx: crossbeam_channel::Sender<crate::spend::records::ToLedger>,
        wake: Option<std::thread::Thread>,
        ttl_ms: i64,
    ) {
        self.slices = false;
        self.fleet = Some(Fleet {
            tx,
            wake,
            ttl_ms: ttl_ms.max(1),
            leases: RefCell::new(HashMap::new()),
            held: RefCell::new(HashMap::new()),
            asks: RefCell::new(HashMap::new()),
            next_ask: std::cell::Cell::new(1),
        });
    }

    /// Connects this core to the spend ledger: its journal, the store's health, and how long a failing
    /// store is tolerated before `on_store_failure = "closed"` budgets refuse.
    pub fn set_spend(
        &mut self,
        journal: crate::spend::journal::Journal,
        health: Arc<crate::spend::committer::Health>,
        fail_closed_after: std::time::Duration,
    ) {
        self.journal = Some(journal);
        self.health = Some(health);
        self.fail_closed_after = fail_closed_after;
    }

    /// Loads stored spend into the instances this core owns (at start, before serving). Each slot's
    /// spend counts as made at the slot's last second (or now, for the current slot): late, never early.
    pub fn preload(&self, set: &BudgetSet, history: &[tollgate_core::store::ledger::SlotSpend]) {
        let now = Timestamp::now();
        let mut ledger = self.ledger.borrow_mut();
        let mut loaded = 0usize;
        for h in history {
            let Some(key) = crate::spend::committer::instance_key(set, &h.instance) else {
                continue;
            };
            if owner(&key, self.cores) != self.core {
                continue;
            }
            let at = crate::spend::committer::slot_time(h.slot_start, now);
            // Alerts already fired for this spend before the restart: the ledger re-arms from it.
            let _ = ledger.record(&key, h.amount, at);
            loaded += 1;
        }
        if loaded > 0 {
            self.log.event(
                "budgets_loaded",
                &[
                    ("core", &self.core.to_string()),
                    ("slots", &loaded.to_string()),
                ],
            );
        }
    }

    /// Journals a settlement and hands it to the ledger thread.
    fn journal(&self, keys: &[InstanceKey], actual: Money, now: Timestamp) {
        if let Some(j) = &self.journal {
            let was_failing = j.failed();
            match j.record(keys, actual, now) {
                // One event when appends start failing and one when they work again, not one per request.
                Err(e) if !was_failing => self.log.event(
                    "journal_failed",
                    &[("core", &self.core.to_string()), ("error", &e.to_string())],
                ),
                Ok(()) if was_failing => self
                    .log
                    .event("journal_recovered", &[("core", &self.core.to_string())]),
                _ => {}
            }
        }
    }

    /// Whether spend cannot be made durable now: this core's journal failed, or the store has been failing
    /// for longer than `ledger.fail_closed_after_ms`. Budgets with `on_store_failure = "closed"` then
    /// refuse new spend.
    pub fn store_closed(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| j.failed())
            || self
                .health
                .as_ref()
                .is_some_and(|h| h.failing_longer_than(self.fail_closed_after))
    }

    /// Posts a connection to `owner` ([`Msg::Adopt`]). A connection that was not queued comes back with
    /// the error, so the caller can keep serving it.
    pub fn post_adopt(
        &self,
        owner: usize,
        stream: std::net::TcpStream,
        buffered: bytes::Bytes,
    ) -> Result<(), (MailboxError, Option<(std::net::TcpStream, bytes::Bytes)>)> {
        self.postman
            .post(owner, Msg::Adopt { stream, buffered })
            .map_err(|(e, m)| match m {
                Some(Msg::Adopt { stream, buffered }) => (e, Some((stream, buffered))),
                _ => (e, None),
            })
    }

    /// Sets what this core does with connections handed to it ([`Msg::Adopt`]).
    pub fn set_adopter(&self, adopter: Adopter) {
        *self.adopter.borrow_mut() = Some(adopter);
    }

    pub fn cores(&self) -> usize {
        self.cores
    }

    /// Runs this core's inbox: answers asks for the instances it owns, applies settlements, and completes
    /// its own pending asks. Spawned once per core.
    /// Holds only a weak reference: the task may outlive its runtime (monoio does not drop pending tasks
    /// at shutdown), and must not keep the core's state, its log handle or its mailboxes alive.
    pub async fn serve(this: Weak<Self>, inbox: Inbox<Msg>) -> Result<(), MailboxError> {
        inbox
            .run(move |m| {
                let Some(me) = this.upgrade() else { return };
                me.handle(m)
            })
            .await
    }

    fn handle(self: &Rc<Self>, m: Msg) {
        let me = self;
        match m {
            Msg::Reserve {
                from,
                id,
                keys,
                amount,
            } => me.owned_reserve(Deferred::Reserve {
                from,
                id,
                keys,
                amount,
            }),
            Msg::Borrow {
                from,
                id,
                key,
                need,
            } => me.owned_reserve(Deferred::Borrow {
                from,
                id,
                key,
                need,
            }),
            Msg::Lent {
                id,
                key,
                need,
                result,
            } => me.lent(id, key, need, result),
            Msg::Recall { key } => me.recalled(key),
            Msg::LeaseReport {
                from,
                key,
                res,
                report,
                close,
                ack,
            } => me.lease_report(from, key, res, report, close, ack),
            Msg::LeaseStatus { key, status } => {
                if let Some(l) = me.leases.borrow_mut().get_mut(&key) {
                    l.refresh(status);
                }
            }
            Msg::Settle { res, actual, now } => me.settle_local(res, actual, now),
            Msg::Release { res } => me.release_local(res),
            Msg::FleetLease { id, key, answer } => me.fleet_answer(id, key, answer),
            Msg::Answer { id, owner, result } => {
                // The asker may have gone (client disconnected while waiting): give the hold back.
                let held = result.as_ref().ok().map(|(r, _)| *r);
                if let (false, Some(res)) = (me.pending.complete(id, result), held) {
                    me.send_release(owner, res);
                }
            }
            Msg::Rekey(set) => {
                // Slices go back (and run thin) so new grants carry the new definitions.
                let reports: Vec<(InstanceKey, ReservationId, Report)> = me
                    .leases
                    .borrow_mut()
                    .iter_mut()
                    .map(|(k, l)| (k.clone(), l.res, l.recall()))
                    .collect();
                for (key, res, report) in reports {
                    me.send_lease_report(key, Some(res), report, false, false);
                }
                let mut ledger = me.ledger.borrow_mut();
                ledger.rekey(&set);
                me.log.event(
                    "budgets_rekeyed",
                    &[
                        ("core", &me.core.to_string()),
                        ("instances", &ledger.len().to_string()),
                    ],
                );
            }
            Msg::Adopt { stream, buffered } => match me.adopter.borrow().as_ref() {
                Some(adopt) => adopt(stream, buffered),
                // Only before the worker has set its adopter: the connection closes (the client retries).
                None => me.log.event(
                    "handoff_dropped",
                    &[("core", &me.core.to_string()), ("reason", "no adopter")],
                ),
            },
        }
    }

    fn reserve_local(&self, keys: &[InstanceKey], amount: Money, now: Timestamp) -> Answer {
        let leased = amount.max(Money::ZERO).pico();
        if let Some(f) = &self.fleet {
            // Fleet mode: this node's leases must cover the amount too (the local ledger's refusal,
            // when it refuses as well, carries better numbers).
            if let Some(k) = self
                .fleet_short(f, keys, leased, now.as_millisecond())
                .first()
            {
                let local = self.ledger.borrow().refusal(keys, amount, now);
                return Err(Box::new(
                    local.unwrap_or_else(|| self.fleet_refusal(f, k, now)),
                ));
            }
        }
        let mut ledger = self.ledger.borrow_mut();
        let res = ledger.reserve(keys, amount, now).map_err(Box::new)?;
        let lender = self.lender.borrow();
        let statuses = keys
            .iter()
            .map(|k| lender.status(&ledger, k, now))
            .collect();
        drop(lender);
        drop(ledger);
        if let Some(f) = &self.fleet {
            self.fleet_consume(f, res, keys, leased, now.as_millisecond());
        }
        Ok((res, statuses))
    }

    /// Releases a reservation on this core's ledger (and, in fleet mode, its hold on the leases).
    fn release_local(&self, res: ReservationId) {
        self.ledger.borrow_mut().release(res);
        self.fleet_settled(res, None);
    }

    /// Fleet mode: the instances among `keys` that need a lease (all but alert-only ones), once each.
    fn leased_keys(keys: &[InstanceKey]) -> Vec<&InstanceKey> {
        let mut out: Vec<&InstanceKey> = Vec::with_capacity(keys.len());
        for k in keys {
            if !matches!(k.budget.action, Action::Alert) && !out.contains(&k) {
                out.push(k);
            }
        }
        out
    }

    /// Fleet mode: the leased instances among `keys` whose lease cannot take `amount` now (none yet, in
    /// its last quarter TTL, of an earlier window, or short).
    fn fleet_short(
        &self,
        f: &Fleet,
        keys: &[InstanceKey],
        amount: i128,
        now_ms: i64,
    ) -> Vec<InstanceKey> {
        let leases = f.leases.borrow();
        Self::leased_keys(keys)
            .into_iter()
            .filter(|k| match leases.get(*k) {
                Some(l) => {
                    !(now_ms < l.expires_ms.saturating_sub(f.ttl_ms / 4)
                        && now_ms < l.window_end_ms
                        && l.avail >= amount)
                }
                None => true,
            })
            .cloned()
            .collect()
    }

    /// Fleet mode: asks the ledger thread for `need` more (and some to spare) on this node's lease of
    /// `key`. The ask's id, or `None` when it could not be handed over.
    fn fleet_ask(&self, f: &Fleet, key: &InstanceKey, need: i128, amount: i128) -> Option<u64> {
        let id = f.next_ask.get();
        f.next_ask.set(id.wrapping_add(1));
        let (settled, want) = {
            let leases = f.leases.borrow();
            let l = leases.get(key);
            (
                l.map_or(0, |l| l.settled),
                l.map_or(0, |l| l.last_added)
                    .saturating_mul(2)
                    .max(amount.saturating_mul(16)),
            )
        };
        f.asks.borrow_mut().insert(id, (key.clone(), settled));
        let msg = crate::spend::records::ToLedger::Lease {
            core: self.core,
            id,
            key: key.clone(),
            need: Money::from_pico(need.max(0)),
            want: Money::from_pico(want.max(0)),
        };
        if f.tx.try_send(msg).is_err() {
            f.asks.borrow_mut().remove(&id);
            return None;
        }
        if let Some(t) = &f.wake {
            t.unpark();
        }
        Some(id)
    }

    /// Fleet mode, an ask for instances this core owns: answered now when the leases cover it (or the
    /// local ledger refuses anyway), else deferred until the ledger thread answers the lease asks it
    /// sends, then decided once, without asking again.
    fn fleet_reserve(&self, ask: Deferred) {
        let (Some(f), Deferred::Reserve { keys, amount, .. }) = (&self.fleet, &ask) else {
            self.answer(ask);
            return;
        };
        let now = Timestamp::now();
        let now_ms = now.as_millisecond();
        let amount_p = (*amount).max(Money::ZERO).pico();
        let short = self.fleet_short(f, keys, amount_p, now_ms);
        if short.is_empty() || self.ledger.borrow().refusal(keys, *amount, now).is_some() {
            self.answer(ask);
            return;
        }
        let mut on = Vec::with_capacity(short.len());
        for k in &short {
            let need = match f.leases.borrow().get(k) {
                Some(l) if now_ms < l.window_end_ms && now_ms < l.expires_ms => {
                    amount_p.saturating_sub(l.avail.max(0)).max(0)
                }
                _ => amount_p,
            };
            if let Some(id) = self.fleet_ask(f, k, need, amount_p) {
                on.push(id);
            }
        }
        if on.is_empty() {
            self.answer(ask);
        } else {
            self.waiting.borrow_mut().push(Waiting {
                ask,
                on: Vec::new(),
                fleet_on: on,
                since: now,
            });
        }
    }

    /// Fleet mode: a reservation `res` took `amount` off the leases of its leased instances; renews in
    /// the background a lease that runs low (under a quarter of what was last added) or nears its expiry
    /// (its last third TTL).
    fn fleet_consume(
        &self,
        f: &Fleet,
        res: ReservationId,
        keys: &[InstanceKey],
        amount: i128,
        now_ms: i64,
    ) {
        let leased: Vec<InstanceKey> = Self::leased_keys(keys).into_iter().cloned().collect();
        if leased.is_empty() {
            return;
        }
        let mut renew = Vec::new();
        {
            let mut leases = f.leases.borrow_mut();
            for k in &leased {
                if let Some(l) = leases.get_mut(k) {
                    l.avail = l.avail.saturating_sub(amount);
                    l.held = l.held.saturating_add(amount);
                    if l.avail < l.last_added / 4
                        || now_ms > l.expires_ms.saturating_sub(f.ttl_ms / 3)
                    {
                        renew.push(k.clone());
                    }
                }
            }
        }
        f.held.borrow_mut().insert(res, (leased, amount));
        for k in renew {
            let asking = f.asks.borrow().values().any(|(a, _)| *a == k);
            if !asking {
                let _ = self.fleet_ask(f, &k, 0, amount);
            }
        }
    }

    /// Fleet mode: reservation `res` settled for `actual` (or was released: `None`); its holds go back to
    /// the leases, less the actual (which leaves the lease in the store when its batch commits).
    fn fleet_settled(&self, res: ReservationId, actual: Option<Money>) {
        let Some(f) = &self.fleet else {
            return;
        };
        let Some((keys, amount)) = f.held.borrow_mut().remove(&res) else {
            return;
        };
        let actual = actual.map_or(0, |a| a.max(Money::ZERO).pico());
        let mut leases = f.leases.borrow_mut();
        for k in keys {
            if let Some(l) = leases.get_mut(&k) {
                l.held = l.held.saturating_sub(amount);
                l.avail = l.avail.saturating_add(amount.saturating_sub(actual));
                l.settled = l.settled.saturating_add(actual);
            }
        }
    }

    /// Fleet mode: the ledger thread answered lease ask `id`. A grant sets the lease to what is left of
    /// it for new reservations: the store's unspent amount, less this node's spend not yet committed, its
    /// holds, and what settled since the ask (counted at most twice, never missed). Then the asks that
    /// waited on it are decided.
    fn fleet_answer(&self, id: u64, key: InstanceKey, a: FleetAnswer) {
        let Some(f) = &self.fleet else {
            return;
        };
        let sent = f.asks.borrow_mut().remove(&id).map_or(0, |(_, s)| s);
        {
            let mut leases = f.leases.borrow_mut();
            let l = leases.entry(key).or_default();
            l.spent = a.spent;
            l.limit = a.limit;
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
        let ready: Vec<Deferred> = {
            let mut waiting = self.waiting.borrow_mut();
            for w in waiting.iter_mut() {
                w.fleet_on.retain(|x| *x != id);
            }
            let (ready, keep): (Vec<Waiting>, Vec<Waiting>) = std::mem::take(&mut *waiting)
                .into_iter()
                .partition(|w| w.on.is_empty() && w.fleet_on.is_empty());
            *waiting = keep;
            ready.into_iter().map(|w| w.ask).collect()
        };
        for ask in ready {
            self.answer(ask);
        }
    }

    /// Fleet mode: the refusal for an instance this node's lease cannot cover (the fleet's committed
    /// spend as last seen; the rest of the limit is held by leases or in flight).
    fn fleet_refusal(&self, f: &Fleet, key: &InstanceKey, now: Timestamp) -> Refusal {
        let limit = key.budget.amount;
        let spent = f
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

    /// Answers an ask for instances this core owns (a reservation, or a slice), or, when it would be
    /// refused while other cores hold slices with unused amounts, recalls them and answers later.
    fn owned_reserve(&self, ask: Deferred) {
        if self.fleet.is_some() {
            self.fleet_reserve(ask);
            return;
        }
        let now = Timestamp::now();
        let keys: Vec<InstanceKey> = match &ask {
            Deferred::Reserve { keys, .. } => keys.clone(),
            Deferred::Borrow { key, .. } => vec![key.clone()],
        };
        let targets = match &ask {
            Deferred::Reserve { keys, amount, .. } => {
                if self.ledger.borrow().refusal(keys, *amount, now).is_some() {
                    self.lender.borrow().recall_targets(keys, None)
                } else {
                    Vec::new()
                }
            }
            Deferred::Borrow { key, need, .. } => {
                let lend = self.lender.borrow_mut().lend(
                    &mut self.ledger.borrow_mut(),
                    key_borrower(&ask),
                    key,
                    *need,
                    now,
                    true,
                );
                match lend {
                    Lend::Recall(_) => self.lender.borrow().recall_targets(&keys, None),
                    other => {
                        self.deliver_lend(&ask, other);
                        return;
                    }
                }
            }
        };
        if targets.is_empty() {
            self.answer(ask);
            return;
        }
        let mut on = Vec::new();
        for (b, key) in targets {
            let b = b as usize;
            self.lender.borrow_mut().tighten(&key, now);
            if b != self.core
                && self
                    .postman
                    .send(b, Msg::Recall { key: key.clone() })
                    .is_ok()
            {
                on.push((b, key));
            }
        }
        if on.is_empty() {
            self.answer(ask);
        } else {
            self.waiting.borrow_mut().push(Waiting {
                ask,
                on,
                fleet_on: Vec::new(),
                since: now,
            });
        }
    }

    /// Decides an ask with what this core knows now, without recalling.
    fn answer(&self, ask: Deferred) {
        let now = Timestamp::now();
        match ask {
            Deferred::Reserve {
                from,
                id,
                keys,
                amount,
            } => {
                let result = self.reserve_local(&keys, amount, now);
                let held = result.as_ref().ok().map(|(r, _)| *r);
                let delivered = if from == self.core {
                    self.pending.complete(id, result)
                } else {
                    self.postman
                        .send(
                            from,
                            Msg::Answer {
                                id,
                                owner: self.core,
                                result,
                            },
                        )
                        .is_ok()
                };
                if let (false, Some(r)) = (delivered, held) {
                    self.release_local(r);
                }
            }
            Deferred::Borrow { .. } => {
                let lend = match &ask {
                    Deferred::Borrow { key, need, .. } => self.lender.borrow_mut().lend(
                        &mut self.ledger.borrow_mut(),
                        key_borrower(&ask),
                        key,
                        *need,
                        now,
                        false,
                    ),
                    Deferred::Reserve { .. } => return,
                };
                self.deliver_lend(&ask, lend);
            }
        }
    }

    /// Sends a borrower the owner's decision; a grant that cannot be delivered is taken back.
    fn deliver_lend(&self, ask: &Deferred, lend: Lend) {
        let Deferred::Borrow {
            from,
            id,
            key,
            need,
        } = ask
        else {
            return;
        };
        let result = match lend {
            Lend::Granted(g) => Ok(g),
            Lend::Refused(r) => Err(r),
            // Not asked to recall here: refuse with the owner's view.
            Lend::Recall(_) => Err(Box::new(
                self.ledger
                    .borrow()
                    .refusal(std::slice::from_ref(key), *need, Timestamp::now())
                    .unwrap_or_else(|| unavailable_refusal(key)),
            )),
        };
        let grant = result.as_ref().ok().cloned();
        let sent = self.postman.send(
            *from,
            Msg::Lent {
                id: *id,
                key: key.clone(),
                need: *need,
                result,
            },
        );
        if let (Err(_), Some(g)) = (sent, grant) {
            self.lender
                .borrow_mut()
                .undeliverable(&mut self.ledger.borrow_mut(), key, &g);
        }
    }

    /// A borrower's report: charge the spend, free what came back, answer asks waiting on it.
    fn lease_report(
        &self,
        from: usize,
        key: InstanceKey,
        res: Option<ReservationId>,
        report: Report,
        close: bool,
        ack: bool,
    ) {
        let alerts = match res {
            Some(res) => self.lender.borrow_mut().report(
                &mut self.ledger.borrow_mut(),
                from as u64,
                &key,
                res,
                &report,
                close,
            ),
            None => self
                .ledger
                .borrow_mut()
                .record(&key, report.spent, report.at),
        };
        for a in &alerts {
            self.alert(a);
        }
        if ack && !close {
            let status = self
                .lender
                .borrow()
                .status(&self.ledger.borrow(), &key, Timestamp::now());
            let _ = self.postman.send(from, Msg::LeaseStatus { key, status });
        }
        self.wake_waiting(false);
    }

    /// Answers the deferred asks whose recalled slices are all back (or, with `timeout`, that waited
    /// longer than [`RECALL_WAIT_MS`]).
    fn wake_waiting(&self, timeout: bool) {
        let now = Timestamp::now();
        let ready: Vec<Deferred> = {
            let lender = self.lender.borrow();
            let mut waiting = self.waiting.borrow_mut();
            if waiting.is_empty() {
                return;
            }
            for w in waiting.iter_mut() {
                w.on.retain(|(b, k)| lender.is_fat(*b as u64, k));
            }
            let (ready, keep): (Vec<Waiting>, Vec<Waiting>) =
                std::mem::take(&mut *waiting).into_iter().partition(|w| {
                    let wait = if w.fleet_on.is_empty() {
                        RECALL_WAIT_MS
                    } else {
                        FLEET_WAIT_MS
                    };
                    (w.on.is_empty() && w.fleet_on.is_empty())
                        || (timeout && now.duration_since(w.since).as_millis() >= i128::from(wait))
                });
            *waiting = keep;
            ready.into_iter().map(|w| w.ask).collect()
        };
        for ask in ready {
            self.answer(ask);
        }
    }

    /// The owner recalls this core's slice of `key`.
    fn recalled(&self, key: InstanceKey) {
        let (res, report) = match self.leases.borrow_mut().get_mut(&key) {
            Some(l) => (Some(l.res), l.recall()),
            None => (
                None,
                Report {
                    spent: Money::ZERO,
                    returned: Money::ZERO,
                    at: Timestamp::now(),
                    thin: true,
                    seq: 0,
                },
            ),
        };
        self.send_lease_report(key, res, report, false, false);
    }

    /// The owner's answer to this core's [`Msg::Borrow`]: the grant goes on the slice, and `need` of it is
    /// held for the request that asked (given back if that request is gone).
    fn lent(&self, id: u64, key: InstanceKey, need: Money, result: Result<Grant, Box<Refusal>>) {
        match result {
            Ok(g) => {
                let report = {
                    let mut leases = self.leases.borrow_mut();
                    let l = leases
                        .entry(key.clone())
                        .or_insert_with(|| Lease::new(&g, Timestamp::now()));
                    l.apply(&g, need).map(|r| (l.res, r))
                };
                if let Some((res, r)) = report {
                    self.send_lease_report(key.clone(), Some(res), r, false, false);
                }
                if !self.pending_lent.complete(id, Ok(())) {
                    self.put_back_leased(key, need);
                }
            }
            Err(r) => {
                self.pending_lent.complete(id, Err(r));
            }
        }
    }

    fn send_lease_report(
        &self,
        key: InstanceKey,
        res: Option<ReservationId>,
        report: Report,
        close: bool,
        ack: bool,
    ) {
        let to = owner(&key, self.cores);
        let msg = Msg::LeaseReport {
            from: self.core,
            key,
            res,
            report,
            close,
            ack,
        };
        if self.postman.send(to, msg).is_err() {
            self.log.event(
                "budget_settle_lost",
                &[
                    ("core", &to.to_string()),
                    ("reason", "owner mailbox full or closed"),
                ],
            );
        }
    }

    /// A request held `amount` on this core's slice of `key` and spent `actual`.
    fn settle_leased(&self, key: InstanceKey, amount: Money, actual: Money, now: Timestamp) {
        let report = match self.leases.borrow_mut().get_mut(&key) {
            Some(l) => l.settle(amount, actual, now).map(|r| (Some(l.res), r)),
            // The slice is gone (a reload): the spend still goes to the owner.
            None => Some((
                None,
                Report {
                    spent: actual,
                    returned: Money::ZERO,
                    at: now,
                    thin: true,
                    seq: 0,
                },
            )),
        };
        if let Some((res, r)) = report {
            self.send_lease_report(key, res, r, false, false);
        }
    }

    /// A request's hold on this core's slice of `key` comes back unspent.
    fn put_back_leased(&self, key: InstanceKey, amount: Money) {
        let report = self
            .leases
            .borrow_mut()
            .get_mut(&key)
            .and_then(|l| l.put_back(amount).map(|r| (l.res, r)));
        if let Some((res, r)) = report {
            self.send_lease_report(key, Some(res), r, false, false);
        }
    }

    /// Housekeeping, on the core's tick: report the spend settled on slices (and take the owner's view
    /// back), give back slices unused for [`LEASE_IDLE_MS`], and stop waiting for recalls that take too
    /// long.
    pub fn tick(&self) {
        if !self.slices {
            if self.fleet.is_some() {
                // Asks whose lease answer is late are decided with what this core has.
                self.wake_waiting(true);
            }
            return;
        }
        let now = Timestamp::now();
        let mut out = Vec::new();
        self.leases.borrow_mut().retain(|key, l| {
            let idle = l.is_idle()
                && now.duration_since(l.last_used).as_millis() >= i128::from(LEASE_IDLE_MS);
            if idle {
                out.push((key.clone(), l.res, l.report(true), true));
                return false;
            }
            if l.dirty {
                out.push((key.clone(), l.res, l.report(l.thin), false));
            }
            true
        });
        for (key, res, report, close) in out {
            self.send_lease_report(key, Some(res), report, close, !close);
        }
        self.wake_waiting(true);
    }

    fn settle_local(&self, res: ReservationId, actual: Money, now: Timestamp) {
        self.fleet_settled(res, Some(actual));
        let (_, alerts) = self.ledger.borrow_mut().settle(res, actual, now);
        for a in alerts {
            self.alert(&a);
        }
    }

    fn alert(&self, a: &AlertEvent) {
        let body = serde_json::json!({
            "ts": crate::obs::accesslog::now_rfc3339(),
            "event": "budget_alert",
            "budget": &*a.budget,
            "instance": a.label,
            "threshold_percent": a.threshold,
            "spent_usd": a.spent.usd(),
            "limit_usd": a.limit.usd(),
            "window_start": a.window_start.to_string(),
        });
        self.log.value(body.clone());
        if let (Some(url), Some(w)) = (&a.webhook, &self.webhooks) {
            // A full queue drops the call; the webhook thread counts and reports drops.
            let _ = w.try_send(crate::obs::webhook::Webhook {
                url: url.clone(),
                body,
            });
        }
    }

    fn send_settle(&self, core: usize, res: ReservationId, actual: Money, now: Timestamp) {
        if core == self.core {
            self.settle_local(res, actual, now);
        } else if self
            .postman
            .send(core, Msg::Settle { res, actual, now })
            .is_err()
        {
            self.log.event(
                "budget_settle_lost",
                &[
                    ("core", &core.to_string()),
                    ("reason", "owner mailbox full or closed"),
                ],
            );
        }
    }

    fn send_release(&self, core: usize, res: ReservationId) {
        if core == self.core {
            self.release_local(res);
        } else if self.postman.send(core, Msg::Release { res }).is_err() {
            self.log.event(
                "budget_release_lost",
                &[
                    ("core", &core.to_string()),
                    ("reason", "owner mailbox full or closed"),
                ],
            );
        }
    }

    /// Reserves `amount` on every instance in `keys`, all or nothing, on their owners.
    pub async fn reserve(
        self: &Rc<Self>,
        keys: Vec<InstanceKey>,
        amount: Money,
    ) -> Result<Result<Reservation, Box<Refusal>>, BudgetError> {
        let now = Timestamp::now();
        let all_keys = keys.clone();
        let mut by_owner: Vec<(usize, Vec<InstanceKey>)> = Vec::new();
        let mut lendable: Vec<(usize, InstanceKey)> = Vec::new();
        for k in keys {
            let o = owner(&k, self.cores);
            if self.slices && o != self.core && k.member.is_none() {
                lendable.push((o, k));
                continue;
            }
            match by_owner.iter_mut().find(|(c, _)| *c == o) {
                Some((_, v)) => v.push(k),
                None => by_owner.push((o, vec![k])),
            }
        }
        // Local first: the common case (an identity's own budgets on its own core) never leaves the core.
        by_owner.sort_by_key(|(c, _)| *c != self.core);
        let mut held = Reservation {
            budgets: Rc::clone(self),
            parts: Vec::with_capacity(by_owner.len()),
            leased: Vec::with_capacity(lendable.len()),
            keys: Vec::new(),
            amount,
            asks: 0,
            statuses: Vec::new(),
            done: false,
        };
        held.keys = all_keys;
        let mut first = true;
        for (core, keys) in by_owner {
            let answer = if core == self.core {
                match self.reserve_local_now(&keys, amount, now) {
                    Some(answer) => answer,
                    // Fleet leases to ask for, or slices to recall first: decided by the owner path.
                    None => {
                        let (id, rx) = self.pending.register();
                        self.owned_reserve(Deferred::Reserve {
                            from: self.core,
                            id,
                            keys,
                            amount,
                        });
                        await_answer(rx, core).await?
                    }
                }
            } else {
                held.asks += 1;
                let (id, rx) = self.pending.register();
                let ask = Msg::Reserve {
                    from: self.core,
                    id,
                    keys,
                    amount,
                };
                if let Err(e) = self.postman.send(core, ask) {
                    self.pending.cancel(id);
                    return Err(BudgetError::Unavailable {
                        core,
                        reason: e.to_string(),
                    });
                }
                await_answer(rx, core).await?
            };
            match answer {
                Ok((res, statuses)) => {
                    held.parts.push((core, res));
                    held.statuses.extend(statuses);
                }
                // Dropping `held` releases what was reserved on the other owners.
                Err(refusal) => return Ok(Err(refusal)),
            }
            if first {
                first = false;
                // Shared instances next: on this core's slices, usually without leaving the core.
                for (owner_core, key) in std::mem::take(&mut lendable) {
                    if let Err(e) = self
                        .reserve_leased(&mut held, owner_core, key, amount)
                        .await?
                    {
                        return Ok(Err(e));
                    }
                }
            }
        }
        for (owner_core, key) in lendable {
            if let Err(e) = self
                .reserve_leased(&mut held, owner_core, key, amount)
                .await?
            {
                return Ok(Err(e));
            }
        }
        Ok(Ok(held))
    }

    /// This core's own instances, decided at once when nothing needs waiting for: `None` in fleet mode
    /// (leases may have to be asked for) or when a refusal might be lifted by recalling slices.
    fn reserve_local_now(
        &self,
        keys: &[InstanceKey],
        amount: Money,
        now: Timestamp,
    ) -> Option<Answer> {
        if self.fleet.is_some() {
            return None;
        }
        match self.reserve_local(keys, amount, now) {
            Err(_) if !self.lender.borrow().recall_targets(keys, None).is_empty() => None,
            answer => Some(answer),
        }
    }

    /// Holds `amount` on this core's slice of the shared instance `key`, asking its owner for the
    /// shortfall when the slice cannot cover it.
    async fn reserve_leased(
        &self,
        held: &mut Reservation,
        owner_core: usize,
        key: InstanceKey,
        amount: Money,
    ) -> Result<Result<(), Box<Refusal>>, BudgetError> {
        let now = Timestamp::now();
        let took = self
            .leases
            .borrow_mut()
            .get_mut(&key)
            .map_or(Money::ZERO, |l| l.take(amount, now));
        let at = held.leased.len();
        held.leased.push((key.clone(), took));
        if took < amount {
            held.asks += 1;
            let need = amount.checked_sub(took).unwrap_or(amount);
            let (id, rx) = self.pending_lent.register();
            let ask = Msg::Borrow {
                from: self.core,
                id,
                key: key.clone(),
                need,
            };
            if let Err(e) = self.postman.send(owner_core, ask) {
                self.pending_lent.cancel(id);
                return Err(BudgetError::Unavailable {
                    core: owner_core,
                    reason: e.to_string(),
                });
            }
            match rx.await {
                Ok(Ok(())) => {
                    if let Some(part) = held.leased.get_mut(at) {
                        part.1 = amount;
                    }
                }
                Ok(Err(refusal)) => return Ok(Err(refusal)),
                Err(_) => {
                    return Err(BudgetError::Unavailable {
                        core: owner_core,
                        reason: "the owner stopped".to_owned(),
                    })
                }
            }
        }
        if let Some(l) = self.leases.borrow().get(&key) {
            held.statuses.push(l.status());
        }
        Ok(Ok(()))
    }

    /// Logs a failure of this shard's machinery.
    pub fn log_error(&self, event: &str, error: &str) {
        self.log
            .event(event, &[("core", &self.core.to_string()), ("error", error)]);
    }

    /// Everything reserved on this core's shard (tests and the leak check).
    pub fn reserved_total(&self) -> Money {
        self.ledger.borrow().reserved_total()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use tollgate_core::budget::RawBudget;

    fn per_identity_key(member: &str) -> InstanceKey {
        let raw: Vec<RawBudget> = toml::from_str::<toml::Table>(
            "[[budgets]]\nname = \"me\"\namount_usd = \"10\"\nwindow = \"day\"\nscope = \"each_identity\"\n",
        )
        .unwrap()["budgets"]
            .clone()
            .try_into()
            .unwrap();
        let set = BudgetSet::from_raw(raw, Default::default()).unwrap();
        InstanceKey {
            budget: Arc::clone(set.get("me").unwrap()),
            member: Some(Arc::from(member)),
        }
    }

    /// An owner whose mailbox is full fails the ask closed: the request gets 503 `budget_unavailable`,
    /// never an admission that skipped the budget.
    #[test]
    fn a_full_owner_mailbox_fails_the_reservation_closed() {
        let (log, writer) = Logger::start().unwrap();
        let (postman, _inboxes) = crate::runtime::mailbox::mailboxes::<Msg>(2, 1).unwrap();
        let me = Rc::new(CoreBudgets::new(
            0,
            postman.clone(),
            log.clone(),
            None,
            true,
        ));
        // A key core 1 owns; core 1's inbox is never served, and one message fills it.
        let key = (0..)
            .map(|i| per_identity_key(&format!("okta:user{i}")))
            .find(|k| owner(k, 2) == 1)
            .unwrap();
        postman
            .send(1, Msg::Rekey(Arc::new(BudgetSet::default())))
            .unwrap();
        let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build();
        let result = rt
            .unwrap()
            .block_on(me.reserve(vec![key], Money::from_pico(1)));
        match result {
            Err(BudgetError::Unavailable { core, .. }) => assert_eq!(core, 1),
            other => panic!("expected unavailable, got {other:?}"),
        }
        assert_eq!(me.reserved_total(), Money::ZERO);
        drop(me);
        log.close();
        drop(log);
        let _ = writer.join();
    }
}
