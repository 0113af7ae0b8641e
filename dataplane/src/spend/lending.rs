//! Slice lending between cores (`server.budget_slices`, default on): a shared instance's owner lends slices
//! of its remaining amount to the other cores ([`tollgate_core::budget::slices`]), so a core admits
//! requests against a team's or everyone's budget locally, with no message per request.
//!
//! Owns: both sides of a slice, as methods of the core's shard ([`CoreBudgets`]). The borrower holds a
//! request's amount on its slice (`CoreBudgets::reserve_leased`), asks the owner
//! ([`crate::runtime::inbox::Msg::Borrow`]) only when its slice falls short, reports what it settled (and
//! gets the owner's view back) on the housekeeping tick, and gives the slice back after 2 s unused
//! ([`LEASE_IDLE_MS`]). The owner lends, charges what borrowers report, and, before refusing a request,
//! recalls fat slices ([`crate::runtime::inbox::Msg::Recall`]) and decides once they are back (the
//! deferral itself is the shard's), so slices never cause a refusal the budget would not have made.
//!
//! Fails: a borrow ask that cannot be posted, or an owner that stopped, fails the request closed (503
//! `budget_unavailable`); a grant that cannot be delivered is taken back by the owner; a report that
//! cannot be posted is logged (`budget_settle_lost`). Cost: a request within its slice takes it off locally
//! (a map lookup, no message); a borrow is one cross-core ask (~15 us, as a remote reservation).

use std::sync::Arc;

use jiff::Timestamp;
use tollgate_core::budget::owner::{BudgetStatus, Refusal, ReservationId};
use tollgate_core::budget::slices::{Grant, Lease, Lend, Report};
use tollgate_core::budget::InstanceKey;
use tollgate_core::Money;

use crate::runtime::inbox::Msg;
use crate::spend::reservation::{BudgetError, Reservation};
use crate::spend::shard::{owner, CoreBudgets, Deferred};

/// A slice unused this long goes back to its owner.
pub const LEASE_IDLE_MS: i64 = 2_000;

/// A refusal for an instance the owner could not describe (only if its own state changed under it).
fn unavailable_refusal(key: &InstanceKey) -> Refusal {
    Refusal {
        budget: Arc::clone(&key.budget.name),
        label: key.label(),
        action: key.budget.action.clone(),
        limit: key.budget.amount,
        spent: key.budget.amount,
        reserved: Money::ZERO,
        resets_at: Timestamp::now(),
    }
}

impl CoreBudgets {
    // The borrower's side.

    /// Holds `amount` on this core's slice of the shared instance `key`, asking its owner for the
    /// shortfall when the slice cannot cover it.
    pub(super) async fn reserve_leased(
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

    /// A request held `amount` on this core's slice of `key` and spent `actual`.
    pub(super) fn settle_leased(
        &self,
        key: InstanceKey,
        amount: Money,
        actual: Money,
        now: Timestamp,
    ) {
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
    pub(super) fn put_back_leased(&self, key: InstanceKey, amount: Money) {
        let report = self
            .leases
            .borrow_mut()
            .get_mut(&key)
            .and_then(|l| l.put_back(amount).map(|r| (l.res, r)));
        if let Some((res, r)) = report {
            self.send_lease_report(key, Some(res), r, false, false);
        }
    }

    /// The owner's answer to this core's [`Msg::Borrow`]: the grant goes on the slice, and `need` of it is
    /// held for the request that asked (given back if that request is gone).
    pub(super) fn lent(
        &self,
        id: u64,
        key: InstanceKey,
        need: Money,
        result: Result<Grant, Box<Refusal>>,
    ) {
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

    /// The owner recalls this core's slice of `key`.
    pub(super) fn recalled(&self, key: InstanceKey) {
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

    /// The owner's view of `key` after this core's report ([`Msg::LeaseStatus`]), for response headers.
    pub(super) fn refresh_slice(&self, key: &InstanceKey, status: BudgetStatus) {
        if let Some(l) = self.leases.borrow_mut().get_mut(key) {
            l.refresh(status);
        }
    }

    /// A reload: every slice goes back (and runs thin) so new grants carry the new definitions.
    pub(super) fn return_slices(&self) {
        let reports: Vec<(InstanceKey, ReservationId, Report)> = self
            .leases
            .borrow_mut()
            .iter_mut()
            .map(|(k, l)| (k.clone(), l.res, l.recall()))
            .collect();
        for (key, res, report) in reports {
            self.send_lease_report(key, Some(res), report, false, false);
        }
    }

    /// Housekeeping for this core's slices, on the core's tick: report the spend settled on them (and take
    /// the owner's view back), and give back slices unused for [`LEASE_IDLE_MS`].
    pub(super) fn tick_slices(&self) {
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

    // The owner's side.

    /// Sends a borrower the owner's decision; a grant that cannot be delivered is taken back.
    pub(super) fn deliver_lend(&self, ask: &Deferred, lend: Lend) {
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
    pub(super) fn lease_report(
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
}
