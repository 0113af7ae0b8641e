//! Tollgate's domain library: what the gateway knows, with no server and no thread of its own. The data
//! plane (`dataplane/`) and the control plane link it; it links neither.
//!
//! - [`config`]: the configuration file, raw serde structs validated into typed settings (one validator for
//!   file, fragment and API); [`issues`] is the one list of problems, each naming file, field and reason.
//! - [`pricing`]: the price sheet, negotiated terms and the [`PriceBook`] the data plane prices every request
//!   with ([`PriceBook::price_at`], [`PriceBook::cost`]), in exact integer [`money`](pricing::money) over
//!   token [`usage`](pricing::usage).
//! - [`auth`]: who calls and what they may do: [`identity`](auth::identity) and model policies, OIDC
//!   [`jwt`](auth::jwt) verification and key fetching, hashed [`service_tokens`](auth::service_tokens), and the
//!   device-flow [`login`](auth::login) client behind `tollgate login`.
//! - [`budget`]: budgets (configuration, windows, which apply to a request), the owning core's in-memory
//!   [`owner`](budget::owner) ledger and the [`slices`](budget::slices) it lends other cores.
//! - [`store`]: the FoundationDB-shaped store interface, its implementations (SQLite, memory, FoundationDB),
//!   the key schema ([`keys`](store::keys)), durable spend ([`ledger`](store::ledger)) and fleet budget leases
//!   ([`fleet`](store::fleet)).
//! - [`tls`]: the crypto provider every outbound TLS client uses.

// No unsafe code, except the one call that starts FoundationDB's client network (`store::fdb`, only with
// the `fdb` feature), which the `foundationdb` crate marks unsafe.
#![cfg_attr(not(feature = "fdb"), forbid(unsafe_code))]
#![cfg_attr(feature = "fdb", deny(unsafe_code))]

pub mod auth;
pub mod budget;
pub mod catalog;
pub mod config;
pub mod domain;
pub mod issues;
pub mod pricing;
#[cfg(test)]
mod sim;
pub mod store;
pub mod tls;

pub use auth::identity::{
    Cap, Decision, Identity, IdentityKind, OnMaxTokens, PolicyRequest, PolicySet,
};
pub use config::{Config, ConfigError, ConfigIssue};
pub use domain::{ApiKey, ProviderKind};
pub use pricing::money::{DecimalError, Money, Percent, TokenPrice};
pub use pricing::usage::Usage;
pub use pricing::{
    Cost, ListSource, ModelPrice, PriceBook, PriceSheet, PricingConfig, Quote, RawPricing, Terms,
    Unpriced,
};
