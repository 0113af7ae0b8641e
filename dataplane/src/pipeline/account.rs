//! Phase 8, account: what the request consumed and what it cost.
//!
//! Owns: [`settle`], run exactly once per request after the forward phase, whatever happened there (complete,
//! client gone, upstream failed). Usage comes from the provider's own numbers when they arrived
//! ([`crate::providers::meter::UsageMeter`]); when they did not (client disconnect or upstream failure mid-stream, a
//! provider that omits usage) the request is still charged with an estimate, marked `estimated`, so nothing
//! settles at $0 for want of a usage event. A provider error response (non-2xx) without usage is not billed:
//! providers do not charge for refused requests.
//!
//! The estimate: input tokens from the provider's `message_start` when it came, else the prompt's text
//! counted with the embedded tokenizer ([`crate::spend::estimate`]); output tokens from the last cumulative count
//! when one came, else the count of a stream cut off at its reservation ([`crate::spend::cutoff`]), else the
//! generated text relayed so far, counted the same way (relayed bytes past the keep cap count at the kept
//! part's tokens per byte, or bytes/4 when nothing readable was kept, which errs towards charging).
//!
//! Budgets: the admit phase's reservation is settled here with the effective cost; a request that ends
//! with nothing to settle (never reached a provider) drops its reservation, which releases it.
//!
//! Usage: every request settled here, budgets or not, journals its usage, cost and dimensions
//! ([`crate::spend::records::Metered`]) for the store's usage counters: with the reservation's settlement
//! when it has one, else on its own line (`CoreBudgets::journal_usage`), both before the last bytes reach
//! the client when the forward phase settles (it does for every response it relays whole).
//!
//! Cost: the quote was taken when the request started (its price date is the request's); pricing a usage is
//! a handful of integer multiplications. Fails: never.

use tollgate_core::Usage;

use super::ctx::{Core, RequestCtx, Settled, UsageSource};
use crate::spend::records::Metered;

/// Settles the request once. Requests that never reached a provider (rejected, unpriced, unreachable) have
/// nothing to settle.
pub fn settle(core: &Core, ctx: &mut RequestCtx) {
    if ctx.account.is_some() {
        return;
    }
    let Some(quote) = ctx.quote else { return };
    if ctx.upstream_ttfb.is_none() {
        return;
    }
    let meter = ctx.meter.take();
    let reported = meter.as_ref().and_then(|m| m.usage());
    let (usage, source) = match reported {
        Some(u) => (u, UsageSource::Reported),
        None if !(200..300).contains(&ctx.status) => (Usage::default(), UsageSource::None),
        None => {
            let (input, output) = meter.as_ref().map(|m| m.partial()).unwrap_or((None, None));
            let input = input
                .or_else(|| crate::spend::estimate::prompt_tokens(ctx.api, &ctx.body))
                .unwrap_or_else(|| (ctx.body.len() as u64).div_ceil(4));
            let relayed = std::mem::take(&mut ctx.relayed);
            let output = output.or(relayed.counted_output).unwrap_or_else(|| {
                let kept = crate::spend::estimate::completion_tokens(ctx.api, &relayed.kept);
                // Past the keep cap, at the kept part's tokens per byte (bytes/4 if nothing was kept).
                let kept_bytes: u64 = relayed.kept.iter().map(|b| b.len() as u64).sum();
                let dropped = if kept_bytes > 0 && kept > 0 {
                    (u128::from(relayed.dropped_bytes) * u128::from(kept))
                        .div_ceil(u128::from(kept_bytes)) as u64
                } else {
                    relayed.dropped_bytes.div_ceil(4)
                };
                kept.saturating_add(dropped)
            });
            let mut u = Usage {
                input_tokens: input,
                output_tokens: output,
                ..Usage::default()
            };
            u.estimated = true;
            (u, UsageSource::Estimated)
        }
    };
    let cost = quote.cost(&usage);
    let metered = match (&ctx.identity, &ctx.provider, &ctx.billed_model) {
        (Some(identity), Some(provider), Some(model)) => Some(Box::new(Metered {
            identity: identity.clone(),
            provider: std::sync::Arc::clone(&provider.label),
            model: std::sync::Arc::clone(model),
            attributes: std::mem::take(&mut ctx.attributes),
            usage,
            cost,
        })),
        _ => None,
    };
    // The budgets are charged the negotiated cost, once; the rest of the reservation goes back.
    match (ctx.reservation.take(), metered) {
        (Some(r), metered) => r.settle(cost.effective, metered),
        (None, Some(m)) => core.budgets.journal_usage(m),
        (None, None) => {}
    }
    ctx.account = Some(Settled {
        usage,
        source,
        cost,
    });
}
