//! What the cores hand the committer thread: the settlement [`Record`] (as journaled, and as handed over)
//! and the committer's input message, [`ToLedger`].
//!
//! The one module both sides name: a core's journal ([`crate::spend::journal`]) and its shard
//! ([`crate::spend::shard`]) send these, the committer ([`crate::spend::committer`]) receives them, so
//! dependencies point one way (shard -> journal -> records <- committer; the shard also reads the
//! committer's `Health`) and neither the journal nor the committer imports the shard.
//!
//! Usage: a record also carries what the request consumed and cost, and who made it ([`Metered`]), for the
//! store's dimensional usage counters: every priced request that settles sends one, with or without
//! budgets (a request without budgets has no instances).
//!
//! Fails: nothing here fails. Cost: a record is built once per settled request (its instance names and the
//! boxed [`Metered`] are its allocations; the identity, provider and model in it are shared strings, the
//! attributes are the admit phase's, moved) and moved through the channel, never copied.

use std::sync::Arc;

use jiff::Timestamp;
use tollgate_core::budget::InstanceKey;
use tollgate_core::pricing::Cost;
use tollgate_core::store::ledger::InstanceName;
use tollgate_core::Money;
use tollgate_core::{Identity, Usage};

use crate::runtime::inbox::Msg;
use crate::runtime::mailbox::Postman;

/// One settlement, as journaled and as handed to the committer thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub source: std::sync::Arc<str>,
    pub seq: u64,
    pub at: Timestamp,
    pub amount: Money,
    pub instances: Vec<InstanceName>,
    /// The request's usage and dimensions (`None`: journal lines written before usage was journaled).
    pub usage: Option<Box<Metered>>,
}

/// One settled request's usage, cost and dimensions, turned into usage counters by the ledger thread.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metered {
    pub identity: Identity,
    /// The provider's configured name.
    pub provider: Arc<str>,
    /// The canonical billed model (the price sheet's name; the billed name when the sheet has none).
    pub model: Arc<str>,
    /// The request's attributes as the admit phase resolved them.
    pub attributes: Vec<(String, String)>,
    pub usage: Usage,
    pub cost: Cost,
}

/// What the committer thread receives.
#[derive(Debug)]
pub enum ToLedger {
    Settled(Record),
    /// Fleet mode: core `core` asks for (more of) a budget lease on `key`'s current window: at least
    /// `need` (or nothing), and up to `want` on top. Answered with [`Msg::FleetLease`].
    Lease {
        core: usize,
        id: u64,
        key: InstanceKey,
        need: Money,
        want: Money,
    },
    /// Fleet mode: the cores' mailboxes, for the answers (sent once the workers exist).
    Cores(Postman<Msg>),
}

/// The name of instance `k` in the store.
pub fn instance_name(k: &InstanceKey) -> InstanceName {
    InstanceName {
        budget: k.budget.name.to_string(),
        member: k.member.as_deref().unwrap_or("").to_owned(),
    }
}
