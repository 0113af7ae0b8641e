//! Budget state on the cores: each budget instance is owned by exactly one core, which keeps its
//! [`Ledger`]; a request reserves on the owners of every instance that applies, and settles there once.
//!
//! Owns: [`CoreBudgets`] (this core's ledger shard, its mailbox handles, and the replies it waits for),
//! [`Reservation`] (a guard that settles exactly once: explicitly with the actual cost, or, when dropped
//! unsettled because the request ended early in any way, by releasing), and the message protocol between
//! cores ([`Msg`]). A reload reaches each shard as [`Msg::Rekey`], posted by the control side. A keep-alive
//! connection handed to the core that owns its caller's budgets arrives as [`Msg::Adopt`] (see
//! [`crate::handoff`]).
//!
//! Ownership: an instance scoped to one identity (each member of a group, each identity, one user, one
//! token) is owned by the core the identity hashes to, so all of one identity's budgets live on one core;
//! a shared instance (a group as a whole, everyone) by the core its budget's name hashes to. When the
//! owner is this core, a reservation is a function call on the local ledger (no locks: the ledger is
//! `RefCell`ed on a `!Send` core); otherwise it is an ask over the owner's mailbox, answered through this
//! core's own inbox (the core awaits only its own local oneshot). A request whose instances live on several
//! cores reserves on each in turn and releases what it holds if any refuses, so admission is all-or-nothing.
//!
//! Fails: a full or closed mailbox fails the request closed (503 `budget_unavailable`): a budget is never
//! skipped. Settlement and release are fire-and-forget messages; a core that is gone takes its shard with it.
//! Cost: local reservation ~0.2 us (bench `admission`); a cross-core ask ~15 us (the owner's wake-up).

use std::cell::RefCell;
use std::hash::{Hash, Hasher};
use std::rc::{Rc, Weak};
use std::sync::Arc;

use jiff::Timestamp;
use tollgate_controlplane::budget::{BudgetSet, InstanceKey};
use tollgate_controlplane::ledger::{AlertEvent, BudgetStatus, Ledger, Refusal, ReservationId};
use tollgate_controlplane::Money;

use crate::accesslog::Logger;
use crate::mailbox::{Inbox, MailboxError, PendingReplies, Postman};
use crate::webhook::WebhookSender;

/// What cores send each other about budgets.
#[derive(Debug)]
pub enum Msg {
    Reserve {
        from: usize,
        id: u64,
        keys: Vec<InstanceKey>,
        amount: Money,
        now: Timestamp,
    },
    Settle {
        res: ReservationId,
        actual: Money,
        now: Timestamp,
    },
    Release {
        res: ReservationId,
    },
    Answer {
        id: u64,
        owner: usize,
        result: Answer,
    },
    /// A reload changed `[[budgets]]`: carry this core's instances over to the new definitions
    /// ([`Ledger::rekey`]: spend is kept, a changed window is recomputed from the spend history).
    Rekey(Arc<BudgetSet>),
    /// A keep-alive connection handed over by the core that accepted it, because this core owns its
    /// caller's budgets (see [`crate::handoff`]): serve it here, starting with the bytes already read.
    Adopt {
        stream: std::net::TcpStream,
        buffered: bytes::Bytes,
    },
}

/// What a core does with an adopted connection: spawn its connection loop (set by the worker).
pub type Adopter = Box<dyn Fn(std::net::TcpStream, bytes::Bytes)>;

/// An owner's answer to a reservation: the id and the standing of each instance, or the refusal.
pub type Answer = Result<(ReservationId, Vec<BudgetStatus>), Box<Refusal>>;

/// Why a reservation could not be asked for at all.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("budget state on core {core} is unavailable: {reason}")]
    Unavailable { core: usize, reason: String },
}

/// This core's share of the budget state and its links to the other cores.
pub struct CoreBudgets {
    pub core: usize,
    cores: usize,
    ledger: RefCell<Ledger>,
    postman: Postman<Msg>,
    pending: PendingReplies<Answer>,
    log: Logger,
    webhooks: Option<WebhookSender>,
    adopter: RefCell<Option<Adopter>>,
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
    /// The amount reserved on each instance.
    pub amount: Money,
    /// The standing of every instance after this reservation.
    pub statuses: Vec<BudgetStatus>,
    done: bool,
}

impl Reservation {
    /// Charges `actual` to every instance held and releases the rest of the reservation. Exactly once.
    pub fn settle(mut self, actual: Money) {
        let now = Timestamp::now();
        for (core, res) in std::mem::take(&mut self.parts) {
            self.budgets.send_settle(core, res, actual, now);
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
        }
    }
}

impl CoreBudgets {
    pub fn new(
        core: usize,
        postman: Postman<Msg>,
        log: Logger,
        webhooks: Option<WebhookSender>,
    ) -> CoreBudgets {
        CoreBudgets {
            core,
            cores: postman.cores(),
            ledger: RefCell::new(Ledger::new()),
            postman,
            pending: PendingReplies::new(core),
            log,
            webhooks,
            adopter: RefCell::new(None),
        }
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
                now,
            } => {
                let result = me.reserve_local(&keys, amount, now);
                let held = result.as_ref().ok().map(|(r, _)| *r);
                let delivered = if from == me.core {
                    me.pending.complete(id, result)
                } else {
                    me.postman
                        .send(
                            from,
                            Msg::Answer {
                                id,
                                owner: me.core,
                                result,
                            },
                        )
                        .is_ok()
                };
                if let (false, Some(r)) = (delivered, held) {
                    me.ledger.borrow_mut().release(r);
                }
            }
            Msg::Settle { res, actual, now } => me.settle_local(res, actual, now),
            Msg::Release { res } => {
                me.ledger.borrow_mut().release(res);
            }
            Msg::Answer { id, owner, result } => {
                // The asker may have gone (client disconnected while waiting): give the hold back.
                let held = result.as_ref().ok().map(|(r, _)| *r);
                if let (false, Some(res)) = (me.pending.complete(id, result), held) {
                    me.send_release(owner, res);
                }
            }
            Msg::Rekey(set) => {
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
        let mut ledger = self.ledger.borrow_mut();
        let res = ledger.reserve(keys, amount, now).map_err(Box::new)?;
        let statuses = keys.iter().map(|k| ledger.status(k, now)).collect();
        Ok((res, statuses))
    }

    fn settle_local(&self, res: ReservationId, actual: Money, now: Timestamp) {
        let (_, alerts) = self.ledger.borrow_mut().settle(res, actual, now);
        for a in alerts {
            self.alert(&a);
        }
    }

    fn alert(&self, a: &AlertEvent) {
        let body = serde_json::json!({
            "ts": crate::accesslog::now_rfc3339(),
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
            let _ = w.try_send(crate::webhook::Webhook {
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
            self.ledger.borrow_mut().release(res);
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
        let mut by_owner: Vec<(usize, Vec<InstanceKey>)> = Vec::new();
        for k in keys {
            let o = owner(&k, self.cores);
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
            amount,
            statuses: Vec::new(),
            done: false,
        };
        for (core, keys) in by_owner {
            let answer = if core == self.core {
                self.reserve_local(&keys, amount, now)
            } else {
                let (id, rx) = self.pending.register();
                let ask = Msg::Reserve {
                    from: self.core,
                    id,
                    keys,
                    amount,
                    now,
                };
                if let Err(e) = self.postman.send(core, ask) {
                    self.pending.cancel(id);
                    return Err(BudgetError::Unavailable {
                        core,
                        reason: e.to_string(),
                    });
                }
                match rx.await {
                    Ok(a) => a,
                    Err(_) => {
                        return Err(BudgetError::Unavailable {
                            core,
                            reason: "the owner stopped".to_owned(),
                        })
                    }
                }
            };
            match answer {
                Ok((res, statuses)) => {
                    held.parts.push((core, res));
                    held.statuses.extend(statuses);
                }
                // Dropping `held` releases what was reserved on the other owners.
                Err(refusal) => return Ok(Err(refusal)),
            }
        }
        Ok(Ok(held))
    }

    /// How much every instance in `keys` that this core owns could still take (for lowering max_tokens).
    /// Instances owned elsewhere are not consulted: the lowered request is reserved again anyway.
    pub fn local_headroom(&self, keys: &[InstanceKey]) -> Option<Money> {
        let mine: Vec<InstanceKey> = keys
            .iter()
            .filter(|k| owner(k, self.cores) == self.core)
            .cloned()
            .collect();
        (!mine.is_empty()).then(|| self.ledger.borrow().headroom(&mine, Timestamp::now()))
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
