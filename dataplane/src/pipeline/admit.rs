//! Phase 6, admit: hold the request's maximum cost against every budget that applies, before forwarding.
//!
//! Owns: picking the budgets (`BudgetSet::applicable`: scope, model/provider globs over the model's names
//! including its canonical price-sheet name, declared attributes from the request's headers or the
//! caller's identity, checked for `required` and `values`), the amount (the input-token bound and the output cap, priced at the request's
//! quote: [`crate::spend::max_cost`]), the reservation on the owning cores ([`crate::spend::reservation`]), and what happens
//! when a budget cannot cover it: `block` (429 naming the budget, its limit, spend and reset),
//! `downgrade` (the caller routes the request again to the budget's cheaper model, once), or, when the
//! budget says `on_insufficient = "lower_max_tokens"` and the remaining amount pays for the input and at
//! least one output token, lower the request's output cap to what the remaining amount pays for.
//!
//! The output cap: the request's `max_tokens`/`max_completion_tokens`; else the route's
//! `default_max_tokens`, written into the body so the provider enforces it (the reservation is then a true
//! bound); else [`crate::spend::max_cost::DEFAULT_OUTPUT_TOKENS`] reserved without changing the request (a response
//! longer than that can overshoot by its excess: the documented overshoot bound).
//!
//! Fails: 400 for an undeclared `x-tollgate-attr-*` header, a missing required attribute or a value
//! outside an attribute's `values`, 429 `budget_exceeded`, 503
//! `budget_unavailable` when a budget's owner cannot be asked (never skipped), or when spend cannot be
//! made durable and a budget that applies has `on_store_failure = "closed"` (see [`crate::spend::committer`]). Cost: see `bench/admission`.

use tollgate_core::budget::owner::Refusal;
use tollgate_core::budget::{Action, BudgetRequest, Insufficient};
use tollgate_core::Money;

use super::ctx::{Core, RequestCtx};
use super::route::Routed;
use crate::error::{Error, Result};
use crate::runtime::snapshot::Snapshot;
use crate::spend::max_cost::{input_token_bound, max_cost, DEFAULT_OUTPUT_TOKENS};

/// What the admit phase decided.
#[derive(Debug)]
pub enum Admitted {
    /// Go ahead (with or without a reservation in `ctx.reservation`).
    Yes,
    /// Route the request again to this model (a budget's `downgrade_to`), then admit it again.
    Downgrade(String),
}

/// Admits `routed` for `ctx.identity`; on success the reservation is in `ctx.reservation`.
pub async fn admit(
    core: &Core,
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    routed: &mut Routed,
) -> Result<Admitted> {
    let budgets = &snap.config.budgets;
    let Some(id) = ctx.identity.as_ref() else {
        return Ok(Admitted::Yes);
    };
    // Declared attributes are checked on every request (required ones, allowed values), budgets or not.
    // Kept in the context: the usage counters are by attribute, budgets or not.
    ctx.attributes = budgets
        .attributes()
        .resolve(id, ctx.head.headers())
        .map_err(Error::bad_request)?;
    let attributes = &ctx.attributes;
    // Input the body only refers to (a previous response, a conversation) is at most the model's context
    // window; a model without one in the price sheet is refused, budgets or not.
    let stored = match routed.stored_input {
        true => Some(stored_input_bound(snap, routed)?),
        false => None,
    };
    if budgets.is_empty() {
        return Ok(Admitted::Yes);
    }
    let Some(quote) = ctx.quote else {
        return Ok(Admitted::Yes);
    };
    let keys = budgets.applicable(
        id,
        &BudgetRequest {
            model: &routed.model,
            upstream_model: routed.upstream_model.as_deref(),
            canonical_model: routed.canonical_model.as_deref(),
            provider: &routed.provider.name,
            attributes,
        },
    );
    if keys.is_empty() {
        return Ok(Admitted::Yes);
    }
    if let Some(k) = keys.iter().find(|k| !k.budget.fail_open) {
        if core.budgets.store_closed() {
            return Err(Error::budget_unavailable(format!(
                "spend cannot be made durable right now (the spend store keeps failing, or this node's journal cannot be written), and budget `{}` refuses new spend until it can (on_store_failure = \"closed\")",
                k.label()
            )));
        }
    }
    let output = match (routed.max_tokens, routed.default_max_tokens) {
        (Some(m), _) => m,
        (None, Some(cap)) => {
            routed.set_max_tokens(cap)?;
            cap
        }
        // Sent with the cap it is reserved at, where the API's reasoning cannot be cut off by counting.
        (None, None) if routed.api.enforces_default_cap() => {
            routed.set_max_tokens(DEFAULT_OUTPUT_TOKENS)?;
            DEFAULT_OUTPUT_TOKENS
        }
        (None, None) => DEFAULT_OUTPUT_TOKENS,
    };
    let mut input = routed
        .input_tokens
        .unwrap_or_else(|| input_token_bound(&routed.body));
    if let Some(window) = stored {
        input = input.max(window);
    }
    // Every choice can use the whole cap: `n` choices are `n` times the output.
    let choices = routed.choices.max(1);
    let amount = max_cost(&quote, input, output.saturating_mul(choices));
    // Only a reservation the provider does not enforce needs cutting off: one whose output part is the
    // gateway's default because neither the request nor its route set a cap.
    let cutoff = routed.max_tokens.is_none()
        && routed.default_max_tokens.is_none()
        && keys.iter().any(|k| k.budget.stream_cutoff);
    let refusal = match core.budgets.reserve(keys.clone(), amount).await {
        Ok(Ok(r)) => {
            ctx.reserved = Some(r.amount);
            ctx.budget_asks = Some(r.asks);
            ctx.reservation = Some(r);
            ctx.cutoff_tokens = cutoff.then_some(output.saturating_mul(choices));
            // The reservation's journal line is written before the provider sees the request.
            core.budgets.journal_durable().await;
            return Ok(Admitted::Yes);
        }
        Ok(Err(refusal)) => refusal,
        Err(e) => return Err(Error::budget_unavailable(e.to_string())),
    };
    if let Action::Downgrade(model) = &refusal.action {
        if ctx.downgraded_from.is_none() {
            return Ok(Admitted::Downgrade(model.clone()));
        }
    }
    let lower = budgets
        .get(&refusal.budget)
        .is_some_and(|b| b.on_insufficient == Insufficient::LowerMaxTokens);
    if lower {
        // What is left on the refusing instance pays for the input first, then as many output tokens as fit.
        let left = refusal
            .limit
            .checked_sub(refusal.spent)
            .and_then(|m| m.checked_sub(refusal.reserved))
            .unwrap_or(Money::ZERO);
        let input_cost = max_cost(&quote, input, 0);
        let per_output = max_cost(&quote, 0, choices).pico();
        let affordable = left
            .checked_sub(input_cost)
            .filter(|m| !m.is_negative())
            .map(|m| {
                if per_output > 0 {
                    m.pico() / per_output
                } else {
                    0
                }
            })
            .unwrap_or(0);
        let affordable = u64::try_from(affordable)
            .unwrap_or(0)
            .min(output.saturating_sub(1));
        if affordable >= routed.api.min_cap() {
            routed.set_max_tokens(affordable)?;
            let amount = max_cost(&quote, input, affordable.saturating_mul(choices));
            match core.budgets.reserve(keys, amount).await {
                Ok(Ok(r)) => {
                    ctx.reserved = Some(r.amount);
                    ctx.budget_asks = Some(r.asks);
                    ctx.reservation = Some(r);
                    // What the client asked for, before a policy lowered it too.
                    let asked = ctx.max_tokens_lowered.map_or(output, |(asked, _)| asked);
                    ctx.max_tokens_lowered = Some((asked, affordable));
                    core.budgets.journal_durable().await;
                    return Ok(Admitted::Yes);
                }
                Ok(Err(again)) => return Err(exceeded(&again)),
                Err(e) => return Err(Error::budget_unavailable(e.to_string())),
            }
        }
    }
    let e = exceeded(&refusal);
    ctx.refusal = Some(*refusal);
    Err(e)
}

/// The most input tokens a request that refers to stored input can be billed for: its model's context
/// window from the price sheet; 400 `cost_unbounded` when the sheet gives none.
fn stored_input_bound(snap: &Snapshot, routed: &Routed) -> Result<u64> {
    let billed = routed
        .upstream_model
        .as_deref()
        .unwrap_or(routed.model.as_str());
    snap.config
        .prices
        .context_window(routed.provider.kind, billed)
        .ok_or_else(|| {
            Error::unbounded_cost(format!(
                "`previous_response_id` / `conversation`: the request makes the provider read input it does not show, which Tollgate bounds by the model's context window, and the price sheet gives none for `{billed}`; send the whole input instead"
            ))
        })
}

/// The 429 for a budget that cannot cover the request.
fn exceeded(r: &Refusal) -> Error {
    Error::budget_exceeded(format!(
        "budget `{}` cannot cover this request: limit ${}, spent ${}, reserved by requests in flight ${}; it resets at {}",
        r.label,
        r.limit.usd(),
        r.spent.usd(),
        r.reserved.usd(),
        r.resets_at
    ))
}

/// Response header lines about budgets: the tightest budget's name, limit, remaining amount (USD) and reset
/// time (RFC 3339) after this request's reservation, or the refusing budget's on a 429 (with
/// `retry-after` in seconds); plus what the authorize and admit phases changed
/// (`x-tollgate-max-tokens-lowered: ASKED->CAP`, `x-tollgate-downgraded-from`).
pub fn header_lines(ctx: &RequestCtx) -> Vec<u8> {
    let mut out = Vec::new();
    let mut line = |name: &str, value: &str| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    if let Some(t) = ctx.reservation.as_ref().and_then(|r| r.tightest()) {
        line("x-tollgate-budget", &t.label);
        line("x-tollgate-budget-limit", &t.limit.usd());
        line("x-tollgate-budget-remaining", &t.remaining.usd());
        line("x-tollgate-budget-reset", &t.resets_at.to_string());
    } else if let Some(r) = &ctx.refusal {
        let left = r
            .limit
            .checked_sub(r.spent)
            .and_then(|m| m.checked_sub(r.reserved))
            .filter(|m| !m.is_negative())
            .unwrap_or(Money::ZERO);
        line("x-tollgate-budget", &r.label);
        line("x-tollgate-budget-limit", &r.limit.usd());
        line("x-tollgate-budget-remaining", &left.usd());
        line("x-tollgate-budget-reset", &r.resets_at.to_string());
        let wait = r.resets_at.as_second() - jiff::Timestamp::now().as_second();
        line("retry-after", &wait.max(1).to_string());
    }
    if let Some((asked, n)) = ctx.max_tokens_lowered {
        line("x-tollgate-max-tokens-lowered", &format!("{asked}->{n}"));
    }
    if let Some(m) = &ctx.downgraded_from {
        line("x-tollgate-downgraded-from", m);
    }
    out
}
