//! Phase 4, authorize: may this identity send this request. Runs after routing, because a policy is about
//! where the request goes (the requested model, the upstream model an alias renames it to, the canonical
//! price-sheet name of the billed model that the route phase resolved, the provider).
//!
//! Owns: applying the [`PolicySet`](tollgate_core::PolicySet) decision (precedence is documented
//! in `tollgate_core::auth::identity`) and the per-request `max_tokens` cap: a request asking for more
//! than its cap is refused; a request that sets no limit (or a `null` one) gets the cap written into its
//! body, in place of any cap field it has, so the provider enforces it and the worst-case cost stays bounded.
//!
//! Fails: 403 in the client's API shape naming the policy. Cost: one policy walk (well under a
//! microsecond for tens of policies); a splice of ~30 bytes when a cap is injected.

use tollgate_core::{Decision, Identity, PolicyRequest};

use super::route::Routed;
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
                // Every cap field the body has (a `null` included) now says `cap`, or the API's field is
                // added: the provider applies exactly the cap the request is reserved at.
                routed.body = routed.api.set_cap(&routed.body, cap)?;
                routed.max_tokens = Some(cap);
                Ok(())
            }
        },
    }
}
