//! The spend machinery: what a request may cost, holding it against budgets, and making spend durable.
//!
//! Before the request: [`max_cost`] (the most a request can cost, before it is sent). Holding it, on the
//! cores: [`reservation`] (a request's hold on its budgets, settled exactly once), [`shard`] (each core's
//! budget state, owner side: answering the other cores), [`lending`] (slices of shared budgets lent between
//! cores), [`leases`] (fleet mode: this node's budget leases), [`alerts`] (threshold alerts). Making it
//! durable: [`journal`] (each core's settlement file), [`records`] (what the cores hand the committer),
//! [`committer`] (the thread that commits settlements to the store). While streaming: [`cutoff`] (ending a
//! stream at its reservation), [`estimate`] (token counts when a provider reports no usage).
//!
//! Dependencies point one way: reservation and lending -> shard -> leases, alerts, journal, committer;
//! journal and committer -> records; none of them imports the shard back. Every core's message type is
//! [`crate::runtime::inbox`].

pub mod alerts;
pub mod committer;
pub mod cutoff;
pub mod estimate;
pub mod journal;
pub mod leases;
pub mod lending;
pub mod max_cost;
pub mod records;
pub mod reservation;
pub mod shard;
