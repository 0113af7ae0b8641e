//! Budget slices: how the owner of a shared budget instance (a group's, everyone's) lends part of its
//! remaining amount to other spenders, so they admit requests locally, with no message per request, and
//! how a borrower spends, reports and gives back its slice.
//!
//! Owns: [`Lender`] (the owner's book of slices lent, kept next to its [`Ledger`]) and [`Lease`] (one
//! borrower's slice of one instance). The data plane lends to its cores; the same protocol is meant for
//! nodes of a fleet, with a store transaction in place of the owner's ledger.
//!
//! The protocol, in the owner's ledger terms: a slice is an open reservation on the instance (so the
//! owner's own admission counts it as reserved, and nothing can be admitted twice). A borrower admits a
//! request when its slice's unused part covers the request's reservation; it settles locally and reports
//! the spend (and optionally gives back unused amount) later, in one message per report interval, which
//! the owner applies with [`Ledger::draw`]. A borrower whose slice falls short asks for `need` (the
//! shortfall): the owner grants `need` plus a new slice of `(remaining - need) / (4 x borrowers)`, so
//! slices shrink as the budget runs out and the slices out never exceed about a quarter of the remaining
//! amount.
//!
//! No false refusal: when a request cannot be covered by the owner's view but borrowers hold slices that
//! may have unused amounts ("fat" loans), the owner does not refuse: it recalls those slices (each
//! borrower reports, gives back everything not held by its requests in flight, and continues "thin":
//! it reports every settlement at once) and decides again once they answered. A recall makes the instance
//! "tight" for [`TIGHT_FOR_SECS`]: grants are thin (exactly `need`), so near the limit every admission is
//! decided by the owner with full knowledge, as if nothing were lent.
//!
//! Overshoot: none. Slices are reservations, so the owner never admits beyond the limit counting them;
//! a borrower never admits beyond its slice. Lag: spend settled on a borrower reaches the owner (its
//! status, headers and alerts) within one report interval.
//!
//! Fails: never; a report for an unknown slice still records its spend on the instance.
//! Cost: a local admission against a slice is a hash look-up and three integer operations.

use std::collections::HashMap;

use jiff::{SignedDuration, Timestamp};

use crate::budget::owner::{AlertEvent, BudgetStatus, Ledger, Refusal, ReservationId};
use crate::budget::{Action, InstanceKey};
use crate::pricing::money::Money;

/// How long an instance stays tight (thin grants only) after a recall.
pub const TIGHT_FOR_SECS: i64 = 1;

/// Who borrows: a core index, or a node id in a fleet.
pub type Borrower = u64;

/// What a borrower tells the owner about its slice: spend settled since the last report (made at `at`,
/// the time of the latest of those settlements), unused amount it gives back, and whether it is thin
/// (keeps nothing unused) as of the owner's grant number `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub spent: Money,
    pub returned: Money,
    pub at: Timestamp,
    pub thin: bool,
    pub seq: u64,
}

/// What the owner grants: the slice's reservation, how much was added to it (at least the `need` asked
/// for), whether the borrower must run thin, and the owner's view of the instance after the grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub res: ReservationId,
    pub added: Money,
    pub thin: bool,
    /// The grant's number on this loan: a thin report clears the loan's "fat" mark only if its borrower
    /// had seen every grant (a fat grant may be crossing the report).
    pub seq: u64,
    pub status: BudgetStatus,
}

/// The owner's answer to an ask for `need`.
#[derive(Debug)]
pub enum Lend {
    Granted(Grant),
    Refused(Box<Refusal>),
    /// Ask these borrowers to give back their unused amounts, then decide again without recalling.
    Recall(Vec<Borrower>),
}

#[derive(Debug)]
struct Loan {
    res: ReservationId,
    /// The borrower may hold unused amount (it is not known to be thin).
    fat: bool,
    /// Grants made on this loan.
    seq: u64,
}

#[derive(Debug, Default)]
struct Loans {
    by: HashMap<Borrower, Loan>,
    tight_until: Option<Timestamp>,
}

/// The owner's book of slices lent out, per instance.
#[derive(Debug)]
pub struct Lender {
    borrowers: u64,
    keys: HashMap<InstanceKey, Loans>,
}

impl Lender {
    /// A lender to at most `borrowers` borrowers (slice sizes divide by it).
    pub fn new(borrowers: usize) -> Lender {
        Lender {
            borrowers: (borrowers.max(1)) as u64,
            keys: HashMap::new(),
        }
    }

    fn tight(&self, key: &InstanceKey, now: Timestamp) -> bool {
        self.keys
            .get(key)
            .and_then(|l| l.tight_until)
            .is_some_and(|t| now < t)
    }

    /// Marks `key` tight: grants are thin until [`TIGHT_FOR_SECS`] from `now`.
    pub fn tighten(&mut self, key: &InstanceKey, now: Timestamp) {
        let until = now
            .checked_add(SignedDuration::from_secs(TIGHT_FOR_SECS))
            .unwrap_or(Timestamp::MAX);
        self.keys.entry(key.clone()).or_default().tight_until = Some(until);
    }

    /// Borrowers other than `except` whose slices of any of `keys` may hold unused amounts, with the
    /// instance each is recalled for.
    pub fn recall_targets(
        &self,
        keys: &[InstanceKey],
        except: Option<Borrower>,
    ) -> Vec<(Borrower, InstanceKey)> {
        let mut out = Vec::new();
        for k in keys {
            if let Some(loans) = self.keys.get(k) {
                for (b, loan) in &loans.by {
                    if loan.fat && Some(*b) != except {
                        out.push((*b, k.clone()));
                    }
                }
            }
        }
        out
    }

    /// Grants `borrower` `need` more on its slice of `key`, plus a new slice unless the instance is tight.
    /// When `need` does not fit and borrowers (the asker included) hold fat slices, answers [`Lend::Recall`] if
    /// `may_recall` (the caller recalls, then asks again with `may_recall = false`).
    pub fn lend(
        &mut self,
        ledger: &mut Ledger,
        borrower: Borrower,
        key: &InstanceKey,
        need: Money,
        now: Timestamp,
        may_recall: bool,
    ) -> Lend {
        let need = need.max(Money::ZERO);
        if let Some(refusal) = ledger.refusal(std::slice::from_ref(key), need, now) {
            let targets: Vec<Borrower> = self
                .recall_targets(std::slice::from_ref(key), None)
                .into_iter()
                .map(|(b, _)| b)
                .collect();
            if may_recall && !targets.is_empty() {
                self.tighten(key, now);
                return Lend::Recall(targets);
            }
            return Lend::Refused(Box::new(refusal));
        }
        let thin = self.tight(key, now);
        let extra = if thin {
            Money::ZERO
        } else {
            let after = ledger
                .headroom(std::slice::from_ref(key), now)
                .checked_sub(need)
                .unwrap_or(Money::ZERO)
                .max(Money::ZERO);
            // An alert-only budget never refuses (unlimited headroom): slice its amount instead.
            let base = if key.budget.action == Action::Alert {
                key.budget.amount
            } else {
                after
            };
            Money::from_pico(base.pico() / (4 * i128::from(self.borrowers)))
        };
        let amount = need.checked_add(extra).unwrap_or(need);
        let loans = self.keys.entry(key.clone()).or_default();
        let res = match loans.by.get(&borrower) {
            Some(loan) if ledger.held(loan.res).is_some() => {
                match ledger.grow(loan.res, amount, now) {
                    Ok(_) => loan.res,
                    Err(r) => return Lend::Refused(Box::new(r)),
                }
            }
            _ => match ledger.reserve(std::slice::from_ref(key), amount, now) {
                Ok(res) => res,
                Err(r) => return Lend::Refused(Box::new(r)),
            },
        };
        let loan = loans.by.entry(borrower).or_insert(Loan {
            res,
            fat: false,
            seq: 0,
        });
        loan.res = res;
        loan.seq += 1;
        // A borrower that is not thin keeps what its requests settle for less than they held.
        loan.fat |= !thin;
        Lend::Granted(Grant {
            res,
            added: amount,
            thin,
            seq: loan.seq,
            status: self.status(ledger, key, now),
        })
    }

    /// Applies a borrower's report on its slice `res` of `key`: its spend is charged, the returned amount
    /// freed; a thin report that has seen every grant clears the loan's fat mark. `close`: the borrower
    /// dropped the slice (whatever it still held is released). Returns the alerts the spend crossed.
    pub fn report(
        &mut self,
        ledger: &mut Ledger,
        borrower: Borrower,
        key: &InstanceKey,
        res: ReservationId,
        report: &Report,
        close: bool,
    ) -> Vec<AlertEvent> {
        let alerts = ledger.draw(res, key, report.spent, report.returned, report.at);
        if let Some(loans) = self.keys.get_mut(key) {
            let ours = loans.by.get(&borrower).is_some_and(|l| l.res == res);
            if ours && close {
                loans.by.remove(&borrower);
                ledger.release(res);
            } else if ours && report.thin {
                if let Some(l) = loans.by.get_mut(&borrower) {
                    if l.seq == report.seq {
                        l.fat = false;
                    }
                }
            }
        } else if close {
            ledger.release(res);
        }
        alerts
    }

    /// Gives back `amount` of a grant its borrower never received (its message could not be delivered).
    pub fn undeliverable(&mut self, ledger: &mut Ledger, key: &InstanceKey, grant: &Grant) {
        let now = grant.status.resets_at.min(Timestamp::now());
        ledger.draw(grant.res, key, Money::ZERO, grant.added, now);
    }

    /// The owner's view of `key` for response headers: slices lent out count as not yet spent (what
    /// their borrowers' requests hold is theirs to report), so lending does not make the remaining
    /// amount look smaller.
    pub fn status(&self, ledger: &Ledger, key: &InstanceKey, now: Timestamp) -> BudgetStatus {
        let mut s = ledger.status(key, now);
        if let Some(loans) = self.keys.get(key) {
            let lent = loans
                .by
                .values()
                .filter_map(|l| ledger.held(l.res))
                .fold(Money::ZERO, add_sat);
            s.reserved = sub0(s.reserved, lent);
            s.remaining = sub0(sub0(s.limit, s.spent), s.reserved);
        }
        s
    }

    /// Whether `borrower`'s slice of `key` may hold unused amount.
    pub fn is_fat(&self, borrower: Borrower, key: &InstanceKey) -> bool {
        self.keys
            .get(key)
            .and_then(|l| l.by.get(&borrower))
            .is_some_and(|l| l.fat)
    }

    /// How many slices are out (all instances).
    pub fn loans(&self) -> usize {
        self.keys.values().map(|l| l.by.len()).sum()
    }
}

/// One borrower's slice of one instance.
#[derive(Debug, Clone)]
pub struct Lease {
    pub res: ReservationId,
    /// The slice's size at the owner (what the owner's reservation holds for it).
    granted: Money,
    /// Reserved by this borrower's requests in flight.
    held: Money,
    /// Settled here, not yet reported.
    unreported: Money,
    /// When the latest unreported settlement was made.
    unreported_at: Option<Timestamp>,
    /// Report every settlement at once and keep nothing unused (after a recall, or when granted thin).
    pub thin: bool,
    /// The number of the last grant applied.
    seq: u64,
    /// The owner's view at the last grant or report acknowledgement.
    base: BudgetStatus,
    /// Whether anything happened since the last report.
    pub dirty: bool,
    /// The last time a request took from the slice.
    pub last_used: Timestamp,
}

fn sub0(a: Money, b: Money) -> Money {
    a.checked_sub(b).unwrap_or(Money::ZERO).max(Money::ZERO)
}

fn add_sat(a: Money, b: Money) -> Money {
    a.checked_add(b).unwrap_or(Money::from_pico(i128::MAX))
}

impl Lease {
    /// An empty slice, before its first grant is applied.
    pub fn new(grant: &Grant, now: Timestamp) -> Lease {
        Lease {
            res: grant.res,
            granted: Money::ZERO,
            held: Money::ZERO,
            unreported: Money::ZERO,
            unreported_at: None,
            thin: grant.thin,
            seq: 0,
            base: grant.status.clone(),
            dirty: false,
            last_used: now,
        }
    }

    /// Adds a grant and holds `hold` of it for the request that asked. A grant on another reservation
    /// (the owner lost the old one) replaces the slice's accounting except what is held and unreported
    /// here. A thin grant gives back at once whatever the slice had unused: the report to send.
    pub fn apply(&mut self, grant: &Grant, hold: Money) -> Option<Report> {
        if grant.res != self.res {
            self.res = grant.res;
            self.granted = add_sat(self.held, self.unreported);
        }
        self.granted = add_sat(self.granted, grant.added);
        self.held = add_sat(self.held, hold.max(Money::ZERO));
        self.thin = grant.thin;
        self.seq = self.seq.max(grant.seq);
        self.base = grant.status.clone();
        (self.thin && !(self.available().is_zero() && self.unreported.is_zero()))
            .then(|| self.report(true))
    }

    /// What requests here could still take.
    pub fn available(&self) -> Money {
        sub0(sub0(self.granted, self.held), self.unreported)
    }

    /// Takes up to `amount` for a request; returns what it took.
    pub fn take(&mut self, amount: Money, now: Timestamp) -> Money {
        let took = amount.max(Money::ZERO).min(self.available());
        self.held = add_sat(self.held, took);
        self.last_used = now;
        self.dirty = true;
        took
    }

    /// A request's hold comes back unspent.
    pub fn put_back(&mut self, amount: Money) -> Option<Report> {
        self.held = sub0(self.held, amount);
        self.dirty = true;
        self.thin.then(|| self.report(true))
    }

    /// A request held `amount` and spent `actual` at `now`. Returns a report to send: before adding this
    /// spend when the unreported spend belongs to a window that has ended (so it lands in its window),
    /// or after it when the slice is thin.
    pub fn settle(&mut self, amount: Money, actual: Money, now: Timestamp) -> Option<Report> {
        let early = (!self.unreported.is_zero()
            && self.base.resets_at <= now
            && self.unreported_at.is_some_and(|t| t < self.base.resets_at))
        .then(|| self.report(false));
        self.held = sub0(self.held, amount);
        self.unreported = add_sat(self.unreported, actual.max(Money::ZERO));
        self.unreported_at = Some(now);
        self.dirty = true;
        if self.thin {
            return Some(self.report(true));
        }
        early
    }

    /// Drains the unreported spend (and, when `give_back`, the unused amount) into a report; the slice
    /// shrinks by both.
    pub fn report(&mut self, give_back: bool) -> Report {
        let returned = if give_back {
            self.available()
        } else {
            Money::ZERO
        };
        let r = Report {
            spent: self.unreported,
            returned,
            at: self.unreported_at.unwrap_or_else(Timestamp::now),
            thin: self.thin && give_back,
            seq: self.seq,
        };
        self.granted = sub0(self.granted, add_sat(r.spent, returned));
        self.base.spent = add_sat(self.base.spent, r.spent);
        self.unreported = Money::ZERO;
        self.unreported_at = None;
        self.dirty = false;
        r
    }

    /// A recall: report everything, give back everything unused, and run thin.
    pub fn recall(&mut self) -> Report {
        self.thin = true;
        self.report(true)
    }

    /// Takes the owner's view from a report's acknowledgement.
    pub fn refresh(&mut self, status: BudgetStatus) {
        self.base = status;
    }

    /// Nothing is held by requests in flight here.
    pub fn is_idle(&self) -> bool {
        self.held.is_zero()
    }

    /// This borrower's best view of the instance: the owner's last view ([`Lender::status`]: slices
    /// not counted) plus the spend settled here not yet reported and what requests here hold.
    pub fn status(&self) -> BudgetStatus {
        let mut s = self.base.clone();
        s.spent = add_sat(s.spent, self.unreported);
        s.reserved = add_sat(s.reserved, self.held);
        s.remaining = sub0(sub0(s.limit, s.spent), s.reserved);
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::budget::{BudgetSet, RawAttributes, RawBudget};

    fn key(amount: &str, action: &str) -> InstanceKey {
        #[derive(serde::Deserialize)]
        struct F {
            budgets: Vec<RawBudget>,
        }
        let toml = format!(
            "[[budgets]]\nname = \"team\"\namount_usd = \"{amount}\"\nwindow = \"month\"\nscope = \"everyone\"\naction = \"{action}\"\n"
        );
        let f: F = toml::from_str(&toml).unwrap();
        let set = BudgetSet::from_raw(f.budgets, RawAttributes::default()).unwrap();
        let b = set.get("team").unwrap();
        InstanceKey {
            budget: std::sync::Arc::clone(b),
            member: None,
        }
    }

    fn usd(s: &str) -> Money {
        Money::parse_usd(s).unwrap()
    }

    fn now() -> Timestamp {
        "2026-11-28T12:00:00Z".parse().unwrap()
    }

    fn granted(l: Lend) -> Grant {
        match l {
            Lend::Granted(g) => g,
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[test]
    fn a_grant_adds_a_slice_that_shrinks_with_the_remaining_amount() {
        let k = key("100", "block");
        let mut ledger = Ledger::new();
        let mut lender = Lender::new(4);
        let g = granted(lender.lend(&mut ledger, 1, &k, usd("1"), now(), true));
        // need 1 + (100 - 1) / 16.
        assert_eq!(g.added, usd("7.1875"));
        assert!(!g.thin);
        assert_eq!(ledger.status(&k, now()).reserved, usd("7.1875"));
        // Spend most of the budget on the owner; the next slice is smaller.
        let r = ledger
            .reserve(std::slice::from_ref(&k), usd("80"), now())
            .unwrap();
        ledger.settle(r, usd("80"), now());
        let g2 = granted(lender.lend(&mut ledger, 2, &k, usd("1"), now(), true));
        let left = usd("100").pico() - usd("80").pico() - usd("7.1875").pico() - usd("1").pico();
        assert_eq!(g2.added.pico(), usd("1").pico() + left / 16);
    }

    #[test]
    fn a_borrower_spends_reports_and_the_owner_counts_it_once() {
        let k = key("10", "block");
        let mut ledger = Ledger::new();
        let mut lender = Lender::new(2);
        let g = granted(lender.lend(&mut ledger, 1, &k, usd("1"), now(), true));
        let mut lease = Lease::new(&g, now());
        assert!(lease.apply(&g, Money::ZERO).is_none());
        assert_eq!(lease.take(usd("1"), now()), usd("1"));
        assert!(lease.settle(usd("1"), usd("0.25"), now()).is_none());
        let rep = lease.report(false);
        assert_eq!(rep.spent, usd("0.25"));
        lender.report(&mut ledger, 1, &k, g.res, &rep, false);
        assert_eq!(ledger.spent(&k, now()), usd("0.25"));
        // An empty report changes nothing; the slice is still reserved at the owner.
        let rep = lease.report(false);
        lender.report(&mut ledger, 1, &k, g.res, &rep, false);
        assert_eq!(ledger.spent(&k, now()), usd("0.25"));
        assert_eq!(ledger.status(&k, now()).reserved, lease.available());
        // Closing gives everything back.
        let rep = lease.report(true);
        lender.report(&mut ledger, 1, &k, g.res, &rep, true);
        assert_eq!(ledger.reserved_total(), Money::ZERO);
        assert_eq!(lender.loans(), 0);
    }

    #[test]
    fn the_owner_recalls_fat_slices_before_refusing() {
        let k = key("1", "block");
        let mut ledger = Ledger::new();
        let mut lender = Lender::new(2);
        // Borrower 1 takes a fat slice; borrower 2 then needs almost everything.
        let g1 = granted(lender.lend(&mut ledger, 1, &k, usd("0.1"), now(), true));
        let mut l1 = Lease::new(&g1, now());
        l1.apply(&g1, Money::ZERO);
        assert!(g1.added > usd("0.1"));
        let need = usd("0.85");
        let recall = match lender.lend(&mut ledger, 2, &k, need, now(), true) {
            Lend::Recall(who) => who,
            other => panic!("expected a recall, got {other:?}"),
        };
        assert_eq!(recall, vec![1]);
        // Borrower 1 gives back its unused part and runs thin.
        let rep = l1.recall();
        lender.report(&mut ledger, 1, &k, l1.res, &rep, false);
        assert!(l1.thin);
        let g2 = granted(lender.lend(&mut ledger, 2, &k, need, now(), false));
        assert!(g2.thin, "tight after a recall");
        assert_eq!(g2.added, need);
        // Nothing fat is left to recall: a request that does not fit is refused for real.
        match lender.lend(&mut ledger, 2, &k, usd("0.2"), now(), true) {
            Lend::Refused(r) => assert_eq!(r.limit, usd("1")),
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn spend_that_crosses_a_window_end_is_reported_in_its_own_window() {
        let k = key("10", "block");
        let mut ledger = Ledger::new();
        let mut lender = Lender::new(2);
        let before: Timestamp = "2026-11-30T23:59:59Z".parse().unwrap();
        let after: Timestamp = "2026-12-01T00:00:01Z".parse().unwrap();
        let g = granted(lender.lend(&mut ledger, 1, &k, usd("1"), before, true));
        let mut lease = Lease::new(&g, before);
        lease.apply(&g, Money::ZERO);
        lease.take(usd("0.5"), before);
        assert!(lease.settle(usd("0.5"), usd("0.5"), before).is_none());
        lease.take(usd("0.5"), after);
        let early = lease
            .settle(usd("0.5"), usd("0.25"), after)
            .expect("reported early");
        assert_eq!(early.spent, usd("0.5"));
        lender.report(&mut ledger, 1, &k, g.res, &early, false);
        let rest = lease.report(false);
        lender.report(&mut ledger, 1, &k, g.res, &rest, false);
        assert_eq!(ledger.spent(&k, before), usd("0.5"));
        assert_eq!(ledger.spent(&k, after), usd("0.25"));
    }

    #[test]
    fn alert_only_budgets_lend_slices_of_their_amount() {
        let k = key("8", "alert");
        let mut ledger = Ledger::new();
        let mut lender = Lender::new(2);
        let g = granted(lender.lend(&mut ledger, 1, &k, usd("1"), now(), true));
        assert_eq!(g.added, usd("2"));
    }

    /// A deterministic run of several borrowers and the owner, messages delivered in random order across
    /// links (FIFO within a link, as the mailboxes are): the limit holds, and a request is refused only
    /// when what is spent plus what requests in flight hold leaves no room for it.
    #[test]
    fn random_interleavings_never_overspend_or_refuse_falsely() {
        #[derive(Debug)]
        enum ToOwner {
            /// Borrower, shortfall asked for, the request's whole amount, the part taken locally.
            Need(usize, Money, Money, Money),
            Report(usize, ReservationId, Report),
        }
        fn sum<'a>(it: impl Iterator<Item = &'a Money>) -> Money {
            it.fold(Money::ZERO, |a, m| a.checked_add(*m).unwrap())
        }
        let mut grants = 0;
        let mut refusals = 0;
        for seed in 0..300u64 {
            let mut rng = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n.max(1)
            };
            let k = key("1", "block");
            let limit = usd("1");
            let n = 4usize;
            let mut ledger = Ledger::new();
            let mut lender = Lender::new(n);
            let mut leases: Vec<Option<Lease>> = vec![None; n];
            let mut flights: Vec<Vec<Money>> = vec![Vec::new(); n];
            let mut links: Vec<std::collections::VecDeque<ToOwner>> =
                (0..n).map(|_| Default::default()).collect();
            let mut spent_total = Money::ZERO;
            for _ in 0..500 {
                let b = next(n as u64) as usize;
                match next(4) {
                    0 | 1 => {
                        let amount = Money::from_pico((next(60) as i128 + 1) * 1_000_000_000);
                        let took = leases[b]
                            .as_mut()
                            .map_or(Money::ZERO, |l| l.take(amount, now()));
                        if took == amount {
                            flights[b].push(amount);
                        } else {
                            let need = amount.checked_sub(took).unwrap();
                            links[b].push_back(ToOwner::Need(b, need, amount, took));
                        }
                    }
                    2 => {
                        if let (Some(amount), Some(l)) = (flights[b].pop(), leases[b].as_mut()) {
                            let actual = Money::from_pico(amount.pico() * next(101) as i128 / 100);
                            spent_total = spent_total.checked_add(actual).unwrap();
                            if let Some(rep) = l.settle(amount, actual, now()) {
                                links[b].push_back(ToOwner::Report(b, l.res, rep));
                            }
                        }
                    }
                    _ => match links[b].pop_front() {
                        None => {}
                        Some(ToOwner::Report(who, res, rep)) => {
                            lender.report(&mut ledger, who as u64, &k, res, &rep, false);
                        }
                        Some(ToOwner::Need(who, need, amount, took)) => {
                            let mut answer =
                                lender.lend(&mut ledger, who as u64, &k, need, now(), true);
                            if let Lend::Recall(targets) = &answer {
                                for &t in targets {
                                    let t = t as usize;
                                    // What the recalled borrower sent before its answer lands first.
                                    let queued: Vec<ToOwner> = links[t].drain(..).collect();
                                    for m in queued {
                                        match m {
                                            ToOwner::Report(w, res, rep) => {
                                                lender.report(
                                                    &mut ledger,
                                                    w as u64,
                                                    &k,
                                                    res,
                                                    &rep,
                                                    false,
                                                );
                                            }
                                            other => links[t].push_back(other),
                                        }
                                    }
                                    let l = leases[t].as_mut().unwrap();
                                    let rep = l.recall();
                                    lender.report(&mut ledger, t as u64, &k, l.res, &rep, false);
                                }
                                answer =
                                    lender.lend(&mut ledger, who as u64, &k, need, now(), false);
                            }
                            match answer {
                                Lend::Granted(g) => {
                                    grants += 1;
                                    let l =
                                        leases[who].get_or_insert_with(|| Lease::new(&g, now()));
                                    if let Some(rep) = l.apply(&g, need) {
                                        links[who].push_back(ToOwner::Report(who, l.res, rep));
                                    }
                                    flights[who].push(amount);
                                }
                                Lend::Refused(_) => {
                                    refusals += 1;
                                    if let Some(rep) =
                                        leases[who].as_mut().and_then(|l| l.put_back(took))
                                    {
                                        let res = leases[who].as_ref().unwrap().res;
                                        links[who].push_back(ToOwner::Report(who, res, rep));
                                    }
                                    let in_flight = sum(flights.iter().flatten());
                                    let unreported =
                                        sum(leases.iter().flatten().map(|l| &l.unreported));
                                    let queued: Vec<Money> = links
                                        .iter()
                                        .flatten()
                                        .filter_map(|m| match m {
                                            // Spend and give-backs still on their way to the owner (a
                                            // message's latency: the one window where a refusal can be
                                            // early, within a few requests of the limit).
                                            ToOwner::Report(_, _, r) => {
                                                r.spent.checked_add(r.returned)
                                            }
                                            // Another request's partial hold, waiting for its own answer.
                                            ToOwner::Need(_, _, _, took) => Some(*took),
                                        })
                                        .collect();
                                    let committed = sum([
                                        ledger.spent(&k, now()),
                                        unreported,
                                        in_flight,
                                        sum(queued.iter()),
                                    ]
                                    .iter());
                                    assert!(
                                        committed.checked_add(amount).unwrap() > limit,
                                        "seed {seed}: false refusal of {amount:?} with {committed:?} committed"
                                    );
                                }
                                Lend::Recall(_) => panic!("recalled twice"),
                            }
                        }
                    },
                }
                assert!(
                    spent_total <= limit,
                    "seed {seed}: overspent {spent_total:?}"
                );
            }
        }
        assert!(
            grants > 1000 && refusals > 100,
            "{grants} grants, {refusals} refusals"
        );
    }
}
