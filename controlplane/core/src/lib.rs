//! Tollgate's control plane: the source of truth for configuration and the domain types the data plane uses.
//!
//! The data plane depends on this crate, never the reverse. Prices live in [`pricing`] (with [`money`] and
//! [`usage`]): the data plane builds a [`PriceBook`] once and calls [`PriceBook::price_at`] and
//! [`PriceBook::cost`] per request. [`login`] signs people in at their IdP for `tollgate login` and
//! `tollgate token`. Who calls and what they may do: [`auth`] (OIDC JWT verification and key fetching),
//! [`service_tokens`] (hashed tokens for CI/CD agents) and [`identity`] (identities and model policies).
//! Dollar budgets: [`budget`] (configuration, windows, which budgets apply) and [`ledger`] (the
//! single-threaded per-owner spend ledger). A later issue adds a REST API.

// No unsafe code, except the one call that starts FoundationDB's client network (`store::fdb`, only with
// the `fdb` feature), which the `foundationdb` crate marks unsafe.
#![cfg_attr(not(feature = "fdb"), forbid(unsafe_code))]
#![cfg_attr(feature = "fdb", deny(unsafe_code))]

pub mod auth;
pub mod budget;
pub mod config;
pub mod domain;
pub mod issues;
pub mod pricing;
#[cfg(test)]
mod sim;
pub mod store;
pub mod tls;

pub use auth::identity::{Decision, Identity, IdentityKind, PolicyRequest, PolicySet};
pub use config::{Config, ConfigError, ConfigIssue};
pub use domain::{ApiKey, ProviderKind};
pub use pricing::money::{DecimalError, Money, Percent, TokenPrice};
pub use pricing::usage::Usage;
pub use pricing::{
    Cost, ListSource, ModelPrice, PriceBook, PriceSheet, PricingConfig, Quote, RawPricing, Terms,
    Unpriced,
};
