//! Who may call: the bearer credential of each request, checked once, and the role it carries.
//!
//! Owns: [`Caller`], [`required_role`] (the one table of which role each method and path needs),
//! [`authenticate`] (an admin service token from the catalog, or a JWT verified with the gateway's
//! `[auth]` issuers whose groups map to a role through `[admin] roles`), the per-issuer key cache, and
//! [`guard`], the middleware that refuses a call (401, 403) and records the refusal in the audit log.
//!
//! Anything else, a data-plane service token included, is refused with "not an admin credential": a
//! data-plane token is never accepted here by accident, nor an admin token by the data plane. The
//! presented credential never appears in a response, a log line or the audit log.
//!
//! Fails: [`ApiError::Unauthorized`] / [`ApiError::Forbidden`]; a store that cannot be read while checking
//! a token is [`ApiError::StoreUnavailable`]. Cost: a token check reads the catalog (one range read, tens
//! of objects) and hashes once; a JWT is verified per call (tens of microseconds) with keys cached per
//! issuer for its `refresh_s`; a refusal costs one store write (the audit entry).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jiff::Timestamp;
use tollgate_core::auth::jwt::{self, AuthConfig, KeySet};
use tollgate_core::catalog::{self, audit, effective, Actor, Role};
use tollgate_core::config::AdminRoles;

use crate::problem::ApiError;
use crate::App;

/// The caller's address as the listener saw it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `token:NAME` or `user:SUBJECT`.
    pub principal: String,
    pub role: Role,
    pub from: String,
}

impl Caller {
    pub fn actor(&self) -> Actor {
        Actor {
            principal: self.principal.clone(),
            role: Some(self.role),
            from: self.from.clone(),
        }
    }
}

/// The role a call needs: `None` for the public endpoints (health, the OpenAPI document).
pub fn required_role(method: &Method, path: &str) -> Option<Role> {
    match path {
        "/admin/v1/healthz" | "/admin/v1/openapi.json" | "/metrics" => None,
        "/admin/v1/audit" | "/admin/v1/spend" | "/admin/v1/spend/budgets" => Some(Role::Finance),
        _ if method == Method::GET || method == Method::HEAD => Some(Role::Viewer),
        _ => Some(Role::Admin),
    }
}

/// Issuer keys as last fetched, per issuer index.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: Mutex<HashMap<usize, (Instant, Arc<KeySet>)>>,
}

fn not_admin() -> ApiError {
    ApiError::Unauthorized("not an admin credential".to_owned())
}

fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let v = headers.get(header::AUTHORIZATION).ok_or_else(|| {
        ApiError::Unauthorized(
            "no credential: send an admin token or an OIDC token as `Authorization: Bearer ...`"
                .to_owned(),
        )
    })?;
    let s = v.to_str().map_err(|_| not_admin())?;
    let (scheme, rest) = s.split_once(' ').ok_or_else(not_admin)?;
    if !scheme.eq_ignore_ascii_case("bearer") || rest.trim().is_empty() {
        return Err(not_admin());
    }
    Ok(rest.trim())
}

/// The highest role `groups` are granted by `roles` (`"*"`: any verified identity).
pub fn role_for_groups(roles: &AdminRoles, groups: &[Arc<str>]) -> Option<Role> {
    let grants = |list: &[String]| {
        list.iter()
            .any(|g| g == "*" || groups.iter().any(|h| **h == **g))
    };
    if grants(&roles.admin) {
        Some(Role::Admin)
    } else if grants(&roles.finance) {
        Some(Role::Finance)
    } else if grants(&roles.viewer) {
        Some(Role::Viewer)
    } else {
        None
    }
}

/// The caller behind `headers`: its principal and role.
pub async fn authenticate(
    app: &Arc<App>,
    headers: &HeaderMap,
    from: String,
) -> Result<Caller, ApiError> {
    let presented = bearer(headers)?.to_owned();
    if tollgate_core::auth::service_tokens::looks_like_service_token(&presented) {
        let store = Arc::clone(&app.store);
        let snap = tokio::task::spawn_blocking(move || catalog::read(store.as_ref()))
            .await
            .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?
            .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?;
        return match effective::admin_caller(&snap, &presented, Timestamp::now()) {
            Some((name, role)) => Ok(Caller {
                principal: format!("token:{name}"),
                role,
                from,
            }),
            None => Err(not_admin()),
        };
    }
    if !jwt::looks_like_jwt(&presented) {
        return Err(not_admin());
    }
    let auth: &AuthConfig = &app.auth;
    let pk = jwt::peek(&presented, auth.max_token_bytes)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    let Some((idx, issuer)) = jwt::issuer_for(&auth.issuers, &pk.iss) else {
        return Err(not_admin());
    };
    let keys = keys_for(app, idx, issuer, pk.kid.as_deref()).await?;
    let verified = jwt::verify(&presented, &pk, issuer, &keys)
        .map_err(|e| ApiError::Unauthorized(e.to_string()))?;
    // Verified, but no group of theirs grants a role: who they are is known, so 403, not 401.
    let role = role_for_groups(&app.roles, &verified.identity.groups).ok_or_else(|| {
        ApiError::Forbidden(format!(
            "{} is signed in, but none of their groups is granted a role in [admin] roles",
            verified.identity.subject
        ))
    })?;
    Ok(Caller {
        principal: format!("user:{}", verified.identity.subject),
        role,
        from,
    })
}

/// The issuer's keys: cached for its `refresh_s`, fetched again (off the runtime) when stale, or when the
/// token names a key id the cache lacks and the last fetch is older than `min_refresh_s`.
async fn keys_for(
    app: &Arc<App>,
    idx: usize,
    issuer: &jwt::IssuerConfig,
    kid: Option<&str>,
) -> Result<Arc<KeySet>, ApiError> {
    let cached = app.keys.keys.lock().ok().and_then(|m| m.get(&idx).cloned());
    if let Some((at, keys)) = &cached {
        let fresh = at.elapsed() < issuer.refresh;
        let has = kid.is_none_or(|k| keys.has_kid(k));
        if fresh && (has || at.elapsed() < issuer.min_refresh) {
            return Ok(Arc::clone(keys));
        }
    }
    let owned = issuer.clone();
    let fetched = tokio::task::spawn_blocking(move || {
        let agent = jwt::agent_for(&owned)?;
        jwt::fetch_keys(&owned, &agent)
    })
    .await
    .map_err(|e| ApiError::Unauthorized(format!("the issuer's keys could not be fetched: {e}")))?;
    match fetched {
        Ok(k) => {
            let k = Arc::new(k);
            if let Ok(mut m) = app.keys.keys.lock() {
                m.insert(idx, (Instant::now(), Arc::clone(&k)));
            }
            Ok(k)
        }
        // Keep using the previous keys when a refresh fails.
        Err(e) => match cached {
            Some((_, k)) => Ok(k),
            None => Err(ApiError::Unauthorized(format!(
                "issuer {}'s keys are not available: {e}",
                issuer.name
            ))),
        },
    }
}

/// The middleware on every protected route: authenticate, check the role, record refusals.
pub async fn guard(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned());
    let Some(need) = required_role(&method, &path) else {
        return next.run(req).await;
    };
    let from = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0 .0.to_string())
        .unwrap_or_default();
    let outcome = match authenticate(&app, req.headers(), from.clone()).await {
        Ok(c) if c.role >= need => Ok(c),
        Ok(c) => Err((
            ApiError::Forbidden(format!(
                "this call needs the {} role; the credential has {}",
                need.as_str(),
                c.role.as_str()
            )),
            Some(c),
        )),
        Err(e) => Err((e, None)),
    };
    match outcome {
        Ok(c) => {
            req.extensions_mut().insert(c);
            next.run(req).await
        }
        Err((e, caller)) => {
            if matches!(e, ApiError::Unauthorized(_) | ApiError::Forbidden(_)) {
                let entry = audit::Entry {
                    seq: 0,
                    at: Timestamp::now(),
                    actor: Actor {
                        principal: caller
                            .as_ref()
                            .map_or_else(|| "unauthenticated".to_owned(), |c| c.principal.clone()),
                        role: caller.as_ref().map(|c| c.role),
                        from,
                    },
                    action: "denied".to_owned(),
                    kind: None,
                    name: None,
                    outcome: e.status().as_u16(),
                    version: None,
                    before: None,
                    after: None,
                    detail: Some(format!(
                        "{method} {}: {e}",
                        req.uri().path().chars().take(256).collect::<String>()
                    )),
                };
                let store = Arc::clone(&app.store);
                // A refusal is answered even when the audit log cannot be written.
                let _ = tokio::task::spawn_blocking(move || audit::record(store.as_ref(), &entry))
                    .await;
            }
            e.into_response()
        }
    }
}
