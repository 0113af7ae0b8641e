//! Phase 4, authorize: may this identity send this request. Runs after routing, because a policy is about
//! where the request goes (the requested model, the upstream model an alias renames it to, the canonical
//! price-sheet name of the billed model that the route phase resolved, the provider).
//!
//! Owns: applying the [`PolicySet`](tollgate_core::PolicySet) decision (precedence is documented
//! in `tollgate_core::auth::identity`) and the per-request `max_tokens` cap: a request asking for more
//! than its cap is refused; a request that sets no limit gets the cap written into its body (one splice),
//! so the provider enforces it and the worst-case cost stays bounded.
//!
//! Fails: 403 in the client's API shape naming the policy. Cost: one policy walk (well under a
//! microsecond for tens of policies); a splice of ~30 bytes when a cap is injected.

use tollgate_core::{Decision, Identity, PolicyRequest};

use super::route::{insert_member, Routed};
use crate::error::{Error, Result};
use crate::runtime::credentials::AuthState;

/// Checks `routed` against the policies for `id`; may rewrite the upstream body to carry the cap.
pub fn authorize(state: &AuthState, id: &Identity, routed: &mut Routed) -> Result<()> {
    let req = PolicyRequest {
        model: &routed.model,
        upstream_model: routed.upstream_model.as_deref(),
        canonical_model: routed.canonical_model.as_deref(),
        provider: &routed.provider.name,
    };
    match state.policies.decide(id, &req) {
        Decision::Deny { reason, .. } => Err(Error::policy_denied(reason)),
        Decision::Allow { max_tokens: None } => Ok(()),
        Decision::Allow {
            max_tokens: Some((cap, policy)),
        } => match routed.max_tokens {
            Some(asked) if asked > cap => Err(Error::policy_denied(format!(
                "max_tokens {asked} exceeds the cap of {cap} set by policy `{policy}`"
            ))),
            Some(_) => Ok(()),
            None => {
                // The field is the API's (OpenAI `max_completion_tokens`, Anthropic `max_tokens`).
                let member = routed.provider.api.max_tokens_member(cap);
                routed.body = insert_member(&routed.body, member.as_bytes())
                    .ok_or_else(|| Error::invalid_body("request body is not a JSON object"))?;
                routed.max_tokens = Some(cap);
                Ok(())
            }
        },
    }
}
