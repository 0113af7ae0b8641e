//! A request's hold on its budgets: [`CoreBudgets::reserve`] takes it, all or nothing, on the owners of
//! every instance that applies; the [`Reservation`] guard it returns settles exactly once.
//!
//! Owns: [`Reservation`] (settled explicitly with the actual cost, or, when dropped unsettled because the
//! request ended early in any way, by releasing everything it holds: client gone, upstream failed, a later
//! phase refused), [`CoreBudgets::reserve`] (the request side of admission) and [`BudgetError`]. The
//! instances this core owns are reserved first, with a function call on the local ledger; a shared
//! instance owned elsewhere is taken off this core's slice (see [`crate::spend::lending`]); any other
//! owner is asked over its mailbox and answers through this core's own inbox (the request awaits only its
//! core's local oneshot). An owner that refuses ends the admission, and dropping the partial guard releases
//! what the others granted. A reservation held on every owner is journaled before it is returned (so a
//! crash before it settles charges it at its amount at the next start); settling journals first, closing
//! that line ([`crate::spend::journal`]), then tells each owner; releasing journals the close too.
//!
//! Fails: a full or closed mailbox, or an owner that stopped, fails the request closed (503
//! `budget_unavailable`): a budget is never skipped. Settlement and release are fire-and-forget messages;
//! one that cannot be posted is logged (`budget_settle_lost`, `budget_release_lost`), and a core that is
//! gone takes its shard with it. Cost: local reservation ~0.2 us (bench `admission`); a cross-core ask
//! ~15 us (the owner's wake-up).

use std::rc::Rc;

use jiff::Timestamp;
use tollgate_core::budget::owner::{BudgetStatus, Refusal, ReservationId};
use tollgate_core::budget::InstanceKey;
use tollgate_core::Money;

use crate::runtime::inbox::{Answer, Msg};
use crate::spend::shard::{owner, CoreBudgets, Deferred};

/// Why a reservation could not be asked for at all.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("budget state on core {core} is unavailable: {reason}")]
    Unavailable { core: usize, reason: String },
}

/// One request's hold on its budgets. Settle it with [`Reservation::settle`]; dropping it unsettled
/// releases everything it holds (client gone, upstream failed, a later phase refused: no leak).
#[derive(Debug)]
pub struct Reservation {
    budgets: Rc<CoreBudgets>,
    parts: Vec<(usize, ReservationId)>,
    /// Amounts held on this core's slices of shared instances owned elsewhere.
    pub(super) leased: Vec<(InstanceKey, Money)>,
    /// Every instance charged: what the journal records.
    keys: Vec<InstanceKey>,
    /// The journal's id of this reservation (journaled at admission, closed by the settlement or the
    /// release); `None` when nothing was journaled.
    journaled: Option<u64>,
    /// The amount reserved on each instance.
    pub amount: Money,
    /// Messages to other cores this admission waited for (0: admitted on this core alone).
    pub asks: u32,
    /// The standing of every instance after this reservation.
    pub statuses: Vec<BudgetStatus>,
    done: bool,
}

impl Reservation {
    /// Charges `actual` to every instance held and releases the rest of the reservation, journaling the
    /// request's `usage` with the settlement. Exactly once.
    pub fn settle(mut self, actual: Money, usage: Option<Box<crate::spend::records::Metered>>) {
        let now = Timestamp::now();
        // Durable first: the journal has the settlement before anything else learns of it.
        self.budgets
            .journal(&self.keys, actual, now, self.journaled.take(), usage);
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
            if let Some(id) = self.journaled.take() {
                self.budgets.journal_release(id);
            }
            for (core, res) in std::mem::take(&mut self.parts) {
                self.budgets.send_release(core, res);
            }
            for (key, amount) in std::mem::take(&mut self.leased) {
                self.budgets.put_back_leased(key, amount);
            }
        }
    }
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

impl CoreBudgets {
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
            journaled: None,
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
        // Held on every owner: journaled before the request goes anywhere, so a crash from here on is
        // charged at this amount at the next start unless a settlement or release closes it.
        held.journaled = self.journal_reserve(&held.keys, amount, Timestamp::now());
        Ok(Ok(held))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::obs::accesslog::Logger;
    use std::sync::Arc;
    use tollgate_core::budget::BudgetSet;
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
