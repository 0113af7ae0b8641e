//! Every core's inbox: the one message type ([`Msg`]) that reaches a core from the other cores, from the
//! committer thread and from the control side.
//!
//! Owns: [`Msg`] (budget asks and answers between owner and asker, settlements and releases, slice
//! lending, the committer's fleet lease answers ([`FleetAnswer`]), a reload's [`Msg::Rekey`], and a
//! keep-alive connection handed over as [`Msg::Adopt`]), [`Answer`] (an owner's answer to a reservation)
//! and [`Adopter`] (what a core does with an adopted connection). The messages travel over
//! [`crate::runtime::mailbox`]; each core's budget shard ([`crate::spend::shard`]) serves its inbox.
//!
//! Fails: nothing here fails; a full or closed mailbox is the sender's to handle (see
//! [`crate::runtime::mailbox`]). Cost: a message is moved into a bounded queue, never boxed again; the
//! largest variants carry their key vectors by value (no copy of an instance's budget: keys hold `Arc`s).

use std::sync::Arc;

use jiff::Timestamp;
use tollgate_core::budget::owner::{BudgetStatus, Refusal, ReservationId};
use tollgate_core::budget::slices::{Grant, Report};
use tollgate_core::budget::{BudgetSet, InstanceKey};
use tollgate_core::store::fleet::LeaseGrant;
use tollgate_core::Money;

/// What reaches a core: about budgets from other cores and the committer thread, a reload, or an adopted
/// connection.
#[derive(Debug)]
pub enum Msg {
    Reserve {
        from: usize,
        id: u64,
        keys: Vec<InstanceKey>,
        amount: Money,
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
    /// A core's slice of a shared instance this core owns fell short of a request by `need`.
    Borrow {
        from: usize,
        id: u64,
        key: InstanceKey,
        need: Money,
    },
    /// The owner's answer to [`Msg::Borrow`].
    Lent {
        id: u64,
        key: InstanceKey,
        need: Money,
        result: Result<Grant, Box<Refusal>>,
    },
    /// The owner of `key` is about to refuse: report, give back everything unused, run thin.
    Recall {
        key: InstanceKey,
    },
    /// A borrower's report on its slice (`res`; `None` when it has none: its spend is still recorded).
    LeaseReport {
        from: usize,
        key: InstanceKey,
        res: Option<ReservationId>,
        report: Report,
        close: bool,
        ack: bool,
    },
    /// The owner's view after a report, for the borrower's response headers.
    LeaseStatus {
        key: InstanceKey,
        status: BudgetStatus,
    },
    /// A reload changed `[[budgets]]`: carry this core's instances over to the new definitions
    /// ([`tollgate_core::budget::owner::Ledger::rekey`]: spend is kept, a changed window is recomputed from
    /// the spend history).
    Rekey(Arc<BudgetSet>),
    /// A keep-alive connection handed over by the core that accepted it, because this core owns its
    /// caller's budgets (see [`crate::net::handoff`]): serve it here, starting with the bytes already read.
    Adopt {
        stream: std::net::TcpStream,
        buffered: bytes::Bytes,
    },
    /// Fleet mode: the committer thread's answer to this core's lease ask `id` on `key`.
    FleetLease {
        id: u64,
        key: InstanceKey,
        answer: FleetAnswer,
    },
}

/// The committer thread's answer to a lease ask ([`crate::spend::records::ToLedger::Lease`]).
#[derive(Debug, Clone, Copy)]
pub struct FleetAnswer {
    /// `None`: the budget cannot cover what was needed (or the store failed: `failed`).
    pub grant: Option<LeaseGrant>,
    /// The ask failed in the store (the other fields tell nothing then).
    pub failed: bool,
    /// ... because the store is out of reach (not merely busy: conflicts with other nodes' grants that
    /// outlasted the retries are not).
    pub out_of_reach: bool,
    /// The fleet's committed spend in the window, and the limit (for a refusal's numbers).
    pub spent: Money,
    pub limit: Money,
    /// This node's spend in the window handed to the committer thread and not yet committed, pico-USD.
    pub uncommitted: i128,
    /// The window, Unix seconds (`[start, end)`).
    pub window_start: i64,
    pub window_end: i64,
}

/// An owner's answer to a reservation: the id and the standing of each instance, or the refusal.
pub type Answer = Result<(ReservationId, Vec<BudgetStatus>), Box<Refusal>>;

/// What a core does with an adopted connection ([`Msg::Adopt`]): spawn its connection loop (set by the
/// worker).
pub type Adopter = Box<dyn Fn(std::net::TcpStream, bytes::Bytes)>;
