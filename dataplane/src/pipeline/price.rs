//! Phase 5, price: the prices the request is billed at, taken once, as of its start.
//!
//! Owns: the quote ([`Quote`]: list and negotiated prices of the model the provider will bill, looked up in
//! the snapshot's [`PriceBook`](tollgate_core::PriceBook) by the upstream model name, so an alias is priced
//! as the model it renames to). The admit phase reserves against this quote and the account phase settles
//! with it, so a price change mid-request never splits one request across two prices.
//!
//! Fails: a model with no price on the request's date (and no `pricing.fallback`) is refused with 403
//! `model_unpriced` before the provider is contacted: nothing is ever served for free.
//! Cost: one hash lookup and a binary search in the model's price history (well under a microsecond).

use tollgate_core::pricing::Quote;

use super::route::Routed;
use crate::error::{Error, Result};
use crate::runtime::snapshot::Snapshot;

/// The quote for a routed request, as of now.
pub fn price(snap: &Snapshot, routed: &Routed) -> Result<Quote> {
    let billed_model = routed
        .upstream_model
        .as_deref()
        .unwrap_or(routed.model.as_str());
    snap.config
        .prices
        .price_at_timestamp(routed.provider.kind, billed_model, jiff::Timestamp::now())
        .map_err(|unpriced| {
            Error::unpriced(format!(
                "the model `{}` of provider {} has no price on {}: add it to the price sheet or set pricing.fallback",
                unpriced.model, routed.provider.name, unpriced.date
            ))
        })
}
