//! Budget state on the cores, the owner's side: each budget instance is owned by exactly one core, which
//! keeps its [`Ledger`] and answers every other core about it.
//!
//! Owns: [`CoreBudgets`] (this core's ledger shard, its mailbox handles, and the replies it waits for),
//! who owns what ([`owner`], [`owner_of_member`]), and this core's inbox loop ([`CoreBudgets::serve`]):
//! asks for the instances it owns are decided here, at once or, when slices must be recalled
//! ([`crate::spend::lending`]) or fleet leases asked for ([`crate::spend::leases`]), deferred and decided
//! once. A reload reaches each shard as [`Msg::Rekey`], posted by the control side. A keep-alive connection
//! handed to the core that owns its caller's budgets arrives as [`Msg::Adopt`] (see [`crate::net::handoff`]).
//! The message types are every core's inbox ([`crate::runtime::inbox`]); the request side, reserving and
//! settling, is [`crate::spend::reservation`]; alerts are [`crate::spend::alerts`].
//!
//! Ownership: an instance scoped to one identity (each member of a group, each identity, one user, one
//! token) is owned by the core the identity hashes to, so all of one identity's budgets live on one core;
//! a shared instance (a group as a whole, everyone) by the core its budget's name hashes to. When the
//! owner is this core, a reservation is a function call on the local ledger (no locks: the ledger is
//! `RefCell`ed on a `!Send` core); otherwise it is an ask over the owner's mailbox, answered through this
//! core's own inbox (the core awaits only its own local oneshot). A request whose instances live on several
//! cores reserves on each in turn and releases what it holds if any refuses, so admission is all-or-nothing.
//!
//! Fails: an answer that cannot be delivered (the asker's mailbox full, or the asker gone) is released at
//! once, so nothing stays held; a deferred ask whose recalled slices (200 ms, `RECALL_WAIT_MS`) or lease
//! answer (5 s, or until the store is seen failing) do not come back is decided with what this core has. A core that is gone takes its shard
//! with it. Cost: local reservation ~0.2 us (bench `admission`); a cross-core ask ~15 us (the owner's
//! wake-up).

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use jiff::Timestamp;
use tollgate_core::budget::owner::{AlertEvent, Ledger, Refusal, ReservationId};
use tollgate_core::budget::slices::{Lease, Lend, Lender};
use tollgate_core::budget::{BudgetSet, InstanceKey};
use tollgate_core::Money;

use crate::obs::accesslog::Logger;
use crate::obs::webhook::WebhookSender;
use crate::runtime::inbox::{Adopter, Answer, FleetAnswer, Msg};
use crate::runtime::mailbox::{Inbox, MailboxError, PendingReplies, Postman};
use crate::spend::alerts;
use crate::spend::leases::{Fleet, FLEET_WAIT_MS};

/// An ask for instances this core owns (a reservation, or a borrow on a slice): decided at once, or once
/// the slices it recalled, or the fleet leases it asked for, are back.
#[derive(Debug)]
pub(super) enum Deferred {
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

/// This core's share of the budget state and its links to the other cores.
pub struct CoreBudgets {
    pub core: usize,
    pub(super) cores: usize,
    pub(super) ledger: RefCell<Ledger>,
    /// Lend slices of the shared instances this core owns, and borrow those owned elsewhere.
    pub(super) slices: bool,
    pub(super) lender: RefCell<Lender>,
    pub(super) leases: RefCell<HashMap<InstanceKey, Lease>>,
    waiting: RefCell<Vec<Waiting>>,
    /// Where settlements go to become durable (see [`crate::spend::journal`]); `None` only in unit tests.
    journal: Option<crate::spend::journal::Journal>,
    health: Option<Arc<crate::spend::committer::Health>>,
    fail_closed_after: std::time::Duration,
    pub(super) postman: Postman<Msg>,
    pub(super) pending: PendingReplies<Answer>,
    pub(super) pending_lent: PendingReplies<Result<(), Box<Refusal>>>,
    pub(super) log: Logger,
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

/// The borrower id of an ask's asker.
fn key_borrower(ask: &Deferred) -> u64 {
    match ask {
        Deferred::Reserve { from, .. } | Deferred::Borrow { from, .. } => *from as u64,
    }
}

/// Which core owns the budgets of the identity with this member key (`source:subject`).
pub fn owner_of_member(member: &str, cores: usize) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    member.hash(&mut h);
    (h.finish() % cores.max(1) as u64) as usize
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
        clock_offset_ms: i64,
    ) {
        self.slices = false;
        self.fleet = Some(Fleet::new(tx, wake, ttl_ms, clock_offset_ms));
    }

    /// Fleet mode: whether the store is out of reach (a lease ask failed or went unanswered, the
    /// ledger's commits are failing, or one store call has stalled for `ledger.fail_closed_after_ms`):
    /// `on_store_failure = "open"` budgets are then admitted without a lease (see
    /// [`crate::spend::leases`]), as `"closed"` ones are refused.
    fn store_down(&self) -> bool {
        self.fleet.as_ref().is_some_and(Fleet::unreachable) || self.store_failing()
    }

    /// The ledger's commits are failing, or one store call has stalled for `ledger.fail_closed_after_ms`.
    fn store_failing(&self) -> bool {
        self.health
            .as_ref()
            .is_some_and(|h| h.failing() || h.failing_longer_than(self.fail_closed_after))
    }

    /// Connects this core to the spend ledger: its journal, the store's health, and how long a failing
    /// store is tolerated before `on_store_failure = "closed"` budgets refuse.
    pub fn set_spend(
        &mut self,
        journal: crate::spend::journal::Journal,
        health: Arc<crate::spend::committer::Health>,
        fail_closed_after: std::time::Duration,
    ) {
        // Group commit: the requests of one scheduler tick share a write(2) (see `Journal::durable`).
        journal.set_batched(true);
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

    /// Journals a settlement (closing reservation `closes`, with the request's usage) and hands it to the
    /// ledger thread.
    pub(super) fn journal(
        &self,
        keys: &[InstanceKey],
        actual: Money,
        now: Timestamp,
        closes: Option<u64>,
        usage: Option<Box<crate::spend::records::Metered>>,
    ) {
        if let Some(j) = &self.journal {
            let _ = j.record(keys, actual, now, closes, usage);
            self.report_journal();
        }
    }

    /// Journals the usage of a settled request that held no reservation (no budget applied) and hands it
    /// to the ledger thread, for the usage counters.
    pub fn journal_usage(&self, usage: Box<crate::spend::records::Metered>) {
        self.journal(&[], Money::ZERO, Timestamp::now(), None, Some(usage));
    }

    /// Journals a reservation at admission (see [`crate::spend::journal::Journal::reserve`]); its id, when
    /// one was written, for the settlement or release that closes it.
    pub(super) fn journal_reserve(
        &self,
        keys: &[InstanceKey],
        amount: Money,
        now: Timestamp,
    ) -> Option<u64> {
        let j = self.journal.as_ref()?;
        let id = j.reserve(keys, amount, now).ok().flatten();
        self.report_journal();
        id
    }

    /// Journals that reservation `id` was released unsettled.
    pub(super) fn journal_release(&self, id: u64) {
        if let Some(j) = &self.journal {
            let _ = j.release(id);
            self.report_journal();
        }
    }

    /// Waits until this core's journal lines so far are written (group commit: see
    /// [`crate::spend::journal::Journal::durable`]): before a request is forwarded (its reservation) and
    /// before a response's last bytes (its settlement).
    /// `alone`: no other request is in flight on this core, so no other line can join the batch: it is
    /// written at once, without the flush task and the extra turn of the loop that batching costs (at
    /// moderate rates most requests are alone; measured in docs/benchmarks.md).
    pub async fn journal_durable(self: &Rc<Self>, alone: bool) {
        if let Some(j) = &self.journal {
            if alone {
                self.flush_journal();
                return;
            }
            if j.schedule_flush() {
                // Queued behind the tasks ready now (a task waking itself would run again first).
                let me = Rc::clone(self);
                monoio::spawn(async move { me.flush_journal() });
            }
            j.durable().await;
            self.report_journal();
        }
    }

    /// Writes the journal lines nobody awaits (the core's tick).
    pub fn flush_journal(&self) {
        if let Some(j) = &self.journal {
            let _ = j.flush();
            self.report_journal();
        }
    }

    /// One event when appends start failing and one when they work again, not one per request.
    fn report_journal(&self) {
        match self.journal.as_ref().and_then(|j| j.take_transition()) {
            Some(Err(e)) => self.log.event(
                "journal_failed",
                &[("core", &self.core.to_string()), ("error", &e)],
            ),
            Some(Ok(())) => self
                .log
                .event("journal_recovered", &[("core", &self.core.to_string())]),
            None => {}
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
            Msg::LeaseStatus { key, status } => me.refresh_slice(&key, status),
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
                me.return_slices();
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
            let down = self.store_down();
            if let Some(k) = f.short(keys, leased, f.now_ms(now), down).first() {
                let local = self.ledger.borrow().refusal(keys, amount, now);
                return Err(Box::new(local.unwrap_or_else(|| f.refusal(k, now))));
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
            f.consume(self.core, res, keys, leased, f.now_ms(now));
        }
        Ok((res, statuses))
    }

    /// Releases a reservation on this core's ledger (and, in fleet mode, its hold on the leases).
    fn release_local(&self, res: ReservationId) {
        self.ledger.borrow_mut().release(res);
        if let Some(f) = &self.fleet {
            f.settled(res, None);
        }
    }

    /// This core's own instances, decided at once when nothing needs waiting for: `None` in fleet mode
    /// (leases may have to be asked for) or when a refusal might be lifted by recalling slices.
    pub(super) fn reserve_local_now(
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

    /// Fleet mode, an ask for instances this core owns: answered now when the leases cover it (or the
    /// local ledger refuses anyway), else deferred until the committer thread answers the lease asks it
    /// sends, then decided once, without asking again.
    fn fleet_reserve(&self, ask: Deferred) {
        let (Some(f), Deferred::Reserve { keys, amount, .. }) = (&self.fleet, &ask) else {
            self.answer(ask);
            return;
        };
        let now = Timestamp::now();
        let now_ms = f.now_ms(now);
        let amount_p = (*amount).max(Money::ZERO).pico();
        let short = f.short(keys, amount_p, now_ms, self.store_down());
        if short.is_empty() || self.ledger.borrow().refusal(keys, *amount, now).is_some() {
            self.answer(ask);
            return;
        }
        let mut on = Vec::with_capacity(short.len());
        for k in &short {
            let need = f.need(k, amount_p, now_ms);
            if let Some(id) = f.ask(self.core, k, need, amount_p) {
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

    /// Fleet mode: the committer thread answered lease ask `id` ([`Fleet::answered`]); then the asks that
    /// waited on it are decided.
    fn fleet_answer(&self, id: u64, key: InstanceKey, a: FleetAnswer) {
        let Some(f) = &self.fleet else {
            return;
        };
        f.answered(id, key, a);
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

    /// Answers an ask for instances this core owns (a reservation, or a slice), or, when it would be
    /// refused while other cores hold slices with unused amounts, recalls them and answers later.
    pub(super) fn owned_reserve(&self, ask: Deferred) {
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

    /// Answers the deferred asks whose recalled slices are all back (or, with `timeout`, that waited
    /// longer than [`RECALL_WAIT_MS`]).
    pub(super) fn wake_waiting(&self, timeout: bool) {
        let now = Timestamp::now();
        // Fleet mode: once the store is known to be out of reach, asks waiting on lease answers are
        // decided now (open budgets admitted on the last view, closed ones refused) rather than after
        // the full wait.
        let down = timeout && self.fleet.is_some() && self.store_failing();
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
                        || (down && !w.fleet_on.is_empty())
                });
            *waiting = keep;
            if let Some(f) = &self.fleet {
                if !down && ready.iter().any(|w| !w.fleet_on.is_empty()) {
                    // A lease answer is late: the store is out of reach until one comes.
                    f.mark_unreachable();
                }
            }
            ready.into_iter().map(|w| w.ask).collect()
        };
        for ask in ready {
            self.answer(ask);
        }
    }

    /// Housekeeping, on the core's tick: report the spend settled on slices (and take the owner's view
    /// back), give back slices unused for [`crate::spend::lending::LEASE_IDLE_MS`], and stop waiting for
    /// recalls (or, in fleet mode, lease answers) that take too long.
    pub fn tick(&self) {
        self.flush_journal();
        if !self.slices {
            if self.fleet.is_some() {
                // Asks whose lease answer is late are decided with what this core has.
                self.wake_waiting(true);
            }
            return;
        }
        self.tick_slices();
        self.wake_waiting(true);
    }

    fn settle_local(&self, res: ReservationId, actual: Money, now: Timestamp) {
        if let Some(f) = &self.fleet {
            f.settled(res, Some(actual));
        }
        let (_, alerts) = self.ledger.borrow_mut().settle(res, actual, now);
        for a in alerts {
            self.alert(&a);
        }
    }

    pub(super) fn alert(&self, a: &AlertEvent) {
        alerts::fire(&self.log, self.webhooks.as_ref(), a);
    }

    pub(super) fn send_settle(
        &self,
        core: usize,
        res: ReservationId,
        actual: Money,
        now: Timestamp,
    ) {
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

    pub(super) fn send_release(&self, core: usize, res: ReservationId) {
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
