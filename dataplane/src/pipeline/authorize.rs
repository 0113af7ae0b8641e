//! Phase 4, authorize: may this identity send this request. Runs after routing, because a policy is about
//! where the request goes (the requested model, the upstream model an alias renames it to, the canonical
//! price-sheet name of the billed model that the route phase resolved, the provider).
//!
//! Owns: applying the [`PolicySet`](tollgate_core::PolicySet) decision (precedence is documented
//! in `tollgate_core::auth::identity`) and the per-request `max_tokens` cap: a request asking for more
//! than its cap is lowered to it (the capping policy's `on_max_tokens = "lower"`, the default) or refused
//! (`"refuse"`); a request that sets no limit (or a `null` one) gets the cap written into its body. Either
//! way the body's cap fields are rewritten in place ([`Routed::set_max_tokens`], the machinery the admit
//! phase lowers caps for budgets with), so the provider enforces the cap the request is reserved and billed
//! at.
//!
//! Fails: 403 in the client's API shape naming the policy; 400 when a lowered Anthropic request's extended
//! thinking cannot fit below the cap. Cost: one policy walk (well under a microsecond for tens of
//! policies); a splice of ~30 bytes when a cap is injected or lowered.

use tollgate_core::{Decision, Identity, OnMaxTokens, PolicyRequest};

use super::route::Routed;
use crate::error::{Error, Result};
use crate::runtime::credentials::AuthState;

/// Checks `routed` against the policies for `id`; may rewrite the upstream body to carry the cap. `Ok(Some(n))`
/// when the request asked for `n` output tokens and was lowered to its policy's cap (`routed.max_tokens`).
pub fn authorize(state: &AuthState, id: &Identity, routed: &mut Routed) -> Result<Option<u64>> {
    let req = PolicyRequest {
        model: &routed.model,
        upstream_model: routed.upstream_model.as_deref(),
        canonical_model: routed.canonical_model.as_deref(),
        provider: &routed.provider.name,
    };
    match state.policies.decide(id, &req) {
        Decision::Deny { reason, .. } => Err(Error::policy_denied(reason)),
        Decision::Allow { max_tokens: None } => Ok(None),
        Decision::Allow {
            max_tokens: Some(cap),
        } => match routed.max_tokens {
            Some(asked) if asked > cap.tokens => match cap.on_over {
                OnMaxTokens::Refuse => Err(Error::policy_denied(format!(
                    "max_tokens {asked} exceeds the cap of {} set by policy `{}`",
                    cap.tokens, cap.policy
                ))),
                OnMaxTokens::Lower => {
                    routed.set_max_tokens(cap.tokens)?;
                    Ok(Some(asked))
                }
            },
            Some(_) => Ok(None),
            None => {
                // Every cap field the body has (a `null` included) now says `cap`, or the API's field is
                // added: the provider applies exactly the cap the request is reserved at.
                routed.set_max_tokens(cap.tokens)?;
                Ok(None)
            }
        },
    }
}
