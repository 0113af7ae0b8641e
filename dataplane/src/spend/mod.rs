//! The spend machinery: what a request may cost, holding it against budgets, and making spend durable.
//!
//! [`max_cost`] (the most a request can cost, before it is sent), [`shard`] (each core's budget state and the
//! reservations on it), [`journal`] (each core's settlement file), [`records`] (what the cores hand the committer), [`committer`] (the thread that commits
//! settlements to the store), [`cutoff`] (ending a stream at its reservation), [`estimate`] (token counts
//! when a provider reports no usage).

pub mod committer;
pub mod cutoff;
pub mod estimate;
pub mod journal;
pub mod max_cost;
pub mod records;
pub mod shard;
