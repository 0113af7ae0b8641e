//! Phase 2, identify: who is calling. Reads the credential where the SDKs put an API key, checks it, and
//! yields the [`Identity`] every later phase and the log line use.
//!
//! Credentials, first found wins: `Cf-Access-Jwt-Assertion` (set by Cloudflare Access in front of us),
//! `Authorization: Bearer` (OpenAI SDK), `x-api-key` (Anthropic SDK). A `tg_...` value is a service token
//! (SHA-256, one map lookup in the published set); anything shaped like a JWT is verified against the
//! issuer its `iss` names, with the keys the identity thread published.
//!
//! Owns: the per-core verification cache ([`JwtCache`](crate::runtime::credentials::JwtCache): token -> identity until the token's `exp`, bounded,
//! dropped wholesale when an issuer's keys change and on every reload). An unknown `kid` asks the identity
//! thread for one refresh (rate-limited there) and waits for it on this core's own timer, polling the
//! published state (a reload meanwhile makes it look the issuer up again in the new state);
//! the core never blocks and never awaits another thread.
//!
//! Fails: 401 in the client's API shape naming the reason (missing, malformed, expired, wrong audience,
//! unknown issuer or key, bad signature, revoked or expired service token); the token is never echoed or
//! logged. Cost: a cache hit is a hash of the token and a map lookup (~100 ns for a 1 KB token); a service
//! token is a SHA-256 (~0.3 us); a cold RS256 verification tens of microseconds (bench `token_verify`).

use std::sync::Arc;
use std::time::Duration;

use tollgate_core::auth::jwt::{self, Rejection};
use tollgate_core::Identity;

use super::ctx::{Core, RequestCtx};
use crate::error::{Error, Result};
use crate::runtime::credentials::AuthState;

/// The credential a request carries, if any.
fn credential(ctx: &RequestCtx) -> Option<&[u8]> {
    if let Some(v) = ctx.head.header("cf-access-jwt-assertion") {
        return Some(v);
    }
    if let Some(v) = ctx.head.header("authorization") {
        let v = v.trim_ascii();
        return Some(match v.get(..7) {
            Some(p) if p.eq_ignore_ascii_case(b"bearer ") => v[7..].trim_ascii(),
            // Not a bearer credential: refused below as malformed, never passed on.
            _ => v,
        });
    }
    ctx.head.header("x-api-key").map(<[u8]>::trim_ascii)
}

fn unauthenticated(r: &Rejection) -> Error {
    Error::unauthenticated(format!("authentication failed: {r}"))
}

/// Identifies the caller of `ctx`.
pub async fn identify(core: &Core, ctx: &RequestCtx) -> Result<Identity> {
    let state = core.auth.state.load_full();
    let Some(raw) = credential(ctx) else {
        return if state.config.allow_anonymous {
            Ok(Identity::anonymous())
        } else {
            Err(unauthenticated(&Rejection::Missing))
        };
    };
    let Ok(token) = std::str::from_utf8(raw) else {
        return Err(unauthenticated(&Rejection::Malformed));
    };
    if token.len() > state.config.max_token_bytes {
        return Err(unauthenticated(&Rejection::TooLarge(
            token.len(),
            state.config.max_token_bytes,
        )));
    }
    if token.starts_with(tollgate_core::auth::service_tokens::TOKEN_PREFIX) {
        return match state.tokens.identify(token, jiff::Timestamp::now()) {
            Ok(id) => Ok(id),
            Err(r) => Err(unauthenticated(&Rejection::ServiceToken(r.to_string()))),
        };
    }
    let now = jiff::Timestamp::now().as_second();
    if let Some(id) = core
        .jwt_cache
        .borrow_mut()
        .get(token, state.key_generation, now)
    {
        return Ok(id);
    }
    verify_jwt(core, state, token, now).await
}

async fn verify_jwt(
    core: &Core,
    mut state: Arc<AuthState>,
    token: &str,
    now: i64,
) -> Result<Identity> {
    let pk = jwt::peek(token, state.config.max_token_bytes).map_err(|r| unauthenticated(&r))?;
    let Some((index, _)) = jwt::issuer_for(&state.config.issuers, &pk.iss) else {
        return Err(unauthenticated(&Rejection::UnknownIssuer(
            pk.iss.chars().take(128).collect(),
        )));
    };
    // An unknown kid may be a key the IdP has just rotated in: ask for one refresh and wait for it.
    let needs_refresh = |s: &AuthState| match (&pk.kid, s.issuers.get(index)) {
        (_, Some(k)) if k.keys.is_none() => true,
        (Some(kid), Some(k)) => !k.keys.as_ref().is_some_and(|ks| ks.has_kid(kid)),
        _ => false,
    };
    if needs_refresh(&state) {
        let min = state
            .config
            .issuers
            .get(index)
            .map(|c| c.min_refresh)
            .unwrap_or_default();
        let before = state.issuers.get(index).map(|k| k.attempts).unwrap_or(0);
        let recent = state
            .issuers
            .get(index)
            .and_then(|k| k.last_triggered)
            .is_some_and(|t| t.elapsed() < min);
        if !recent && core.auth.refresh.try_send(index).is_ok() {
            let deadline = quanta::Instant::now() + state.config.key_wait;
            while quanta::Instant::now() < deadline {
                monoio::time::sleep(Duration::from_millis(10)).await;
                let s = core.auth.state.load_full();
                // A reload (a new key generation) may have moved or removed the issuer: look again below.
                if s.key_generation != state.key_generation
                    || s.issuers.get(index).map(|k| k.attempts).unwrap_or(0) != before
                {
                    state = s;
                    break;
                }
            }
        }
    }
    let Some((index, _)) = jwt::issuer_for(&state.config.issuers, &pk.iss) else {
        return Err(unauthenticated(&Rejection::UnknownIssuer(
            pk.iss.chars().take(128).collect(),
        )));
    };
    let Some(issuer) = state.config.issuers.get(index) else {
        return Err(Error::internal("issuer index out of range"));
    };
    let Some(keys) = state.issuers.get(index).and_then(|k| k.keys.clone()) else {
        return Err(unauthenticated(&Rejection::NoKeys(issuer.name.to_string())));
    };
    let v = jwt::verify(token, &pk, issuer, &keys).map_err(|r| unauthenticated(&r))?;
    core.jwt_cache.borrow_mut().put(
        token,
        v.identity.clone(),
        v.expires_at,
        state.config.cache_entries,
        now,
    );
    Ok(v.identity)
}
