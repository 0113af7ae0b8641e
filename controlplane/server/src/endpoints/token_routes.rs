//! `/admin/v1/service-tokens`: service tokens made through the API (data-plane tokens, and admin tokens
//! when `role` is given), beside the file's (`service-tokens.json`, listed with `owner: "file"`, read-only
//! here: 409 `owned_by_file`).
//!
//! A create may attach a budget and a policy: they become the catalog objects `token-NAME` (a budget with
//! `scope = "service_token"`, a policy with `service_token = NAME`), written in the same catalog
//! transaction as the token, so all three exist or none. The secret is in the create's and the rotation's
//! answer only; it is never stored (the catalog keeps its SHA-256), never listed, never in the audit log.
//! A create replayed through its `Idempotency-Key` answers without the secret, since none is kept.
//!
//! Fails: `ApiError` (422 naming `budget.FIELD` / `policy.FIELD` for the attached objects). Cost: one
//! catalog write each (with one validation of the configuration); the listing reads the token file once.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{OriginalUri, Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use tollgate_core::auth::identity::RawPolicy;
use tollgate_core::auth::service_tokens::{self, parse_lifetime};
use tollgate_core::budget::RawBudget;
use tollgate_core::catalog::tokens::StoredToken;
use tollgate_core::catalog::{Change, Kind, Object, Precondition, Role, Written};
use utoipa::ToSchema;

use crate::callers::Caller;
use crate::endpoints::shared::{
    blocking, idempotency, path_name, replayed, snapshot, valid_name, write,
};
use crate::problem::{parse_json, read_body, ApiError, FieldError, Problem};
use crate::App;

const BASE: &str = "/admin/v1/service-tokens";

/// A role an admin token carries.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoleName {
    Viewer,
    Finance,
    Admin,
}

impl From<RoleName> for Role {
    fn from(r: RoleName) -> Role {
        match r {
            RoleName::Viewer => Role::Viewer,
            RoleName::Finance => Role::Finance,
            RoleName::Admin => Role::Admin,
        }
    }
}

/// A budget attached to a new token (becomes the budget `token-NAME`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenBudget {
    pub amount_usd: String,
    pub window: String,
    pub timezone: Option<String>,
    pub action: Option<String>,
    pub downgrade_to: Option<String>,
    pub on_insufficient: Option<String>,
    pub stream_cutoff: Option<bool>,
    #[serde(default)]
    pub alert_at: Vec<u32>,
    pub webhook: Option<String>,
    pub models: Option<Vec<String>>,
    pub providers: Option<Vec<String>>,
}

/// A policy attached to a new token (becomes the policy `token-NAME`): `[[policies]]`' fields less the
/// subject (the token is the subject); validated as the policy it becomes.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenPolicy {
    #[serde(default)]
    pub allow_models: Vec<String>,
    #[serde(default)]
    pub deny_models: Vec<String>,
    #[serde(default)]
    pub allow_providers: Vec<String>,
    #[serde(default)]
    pub deny_providers: Vec<String>,
    pub max_tokens: Option<u64>,
    /// `lower` (the default) or `refuse`: what a request above `max_tokens` gets.
    pub on_max_tokens: Option<String>,
}

/// `POST /admin/v1/service-tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateToken {
    pub name: String,
    pub team: String,
    /// A lifetime such as `90d`, `12h`; absent: no expiry.
    pub expires_in: Option<String>,
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Makes an admin token (for this API; refused by the data plane).
    pub role: Option<RoleName>,
    pub budget: Option<TokenBudget>,
    pub policy: Option<TokenPolicy>,
}

/// `POST /admin/v1/service-tokens/{name}/rotate`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotate {
    /// How long the old secret keeps working (`1h`); absent: it stops at once.
    pub overlap: Option<String>,
}

/// A token as the API shows it: never a secret or a hash.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenView {
    pub name: String,
    pub id: String,
    pub team: String,
    /// `active`, `expired` or `revoked`.
    pub status: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub revoked_at: Option<String>,
    pub rotated_at: Option<String>,
    pub previous_valid_until: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub role: Option<String>,
    /// `file` (service-tokens.json, read-only here) or `api`.
    #[serde(default)]
    pub owner: String,
    /// The catalog version that last wrote it; absent for the file's tokens.
    #[serde(default)]
    pub version: Option<u64>,
}

/// A new token and, once, its secret.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenSecret {
    pub token: TokenView,
    /// The token string: shown in this answer only. Absent from a replayed answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

/// One page of tokens (all of them: a deployment has tens).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenList {
    pub items: Vec<TokenView>,
    pub next_cursor: Option<String>,
}

fn view_of(o: &Object, now: Timestamp) -> Result<TokenView, ApiError> {
    let t: StoredToken = serde_json::from_value(o.spec.clone())
        .map_err(|e| ApiError::StoreUnavailable(format!("token {:?}: {e}", o.name)))?;
    let mut v: TokenView = serde_json::from_value(t.public(&o.name, now))
        .map_err(|e| ApiError::StoreUnavailable(format!("token {:?}: {e}", o.name)))?;
    v.owner = "api".to_owned();
    v.version = Some(o.version);
    Ok(v)
}

fn file_tokens(app: &App, now: Timestamp) -> Vec<TokenView> {
    let Ok(c) = tollgate_core::Config::load(&app.config_path) else {
        return Vec::new();
    };
    let Ok(f) = service_tokens::load(&c.store.dir) else {
        return Vec::new();
    };
    f.tokens
        .into_iter()
        .map(|t| TokenView {
            status: t.status(now).as_str().to_owned(),
            name: t.name,
            id: t.id,
            team: t.team,
            created_at: t.created_at.to_string(),
            expires_at: t.expires_at.map(|x| x.to_string()),
            revoked_at: t.revoked_at.map(|x| x.to_string()),
            rotated_at: None,
            previous_valid_until: None,
            attributes: t.attributes,
            role: None,
            owner: "file".to_owned(),
            version: None,
        })
        .collect()
}

fn token_error(e: service_tokens::TokenStoreError, field: &str) -> ApiError {
    ApiError::Validation {
        detail: e.to_string(),
        errors: vec![FieldError {
            field: field.to_owned(),
            reason: e.to_string(),
        }],
    }
}

/// Lists the file's tokens, then the API's, each in name order, a page at a time.
#[utoipa::path(get, path = "/admin/v1/service-tokens", tag = "service-tokens",
    params(crate::endpoints::shared::PageQuery),
    responses(
        (status = 200, description = "One page of tokens, without secrets or hashes", body = TokenList),
        (status = 400, description = "A bad limit or cursor", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<Arc<App>>,
    q: Result<
        axum::extract::Query<crate::endpoints::shared::PageQuery>,
        axum::extract::rejection::QueryRejection,
    >,
) -> Result<Json<TokenList>, ApiError> {
    let (limit, after) = crate::endpoints::shared::page(q)?;
    let mut items = blocking(move || {
        let now = Timestamp::now();
        let mut file = file_tokens(&app, now);
        file.sort_by(|a, b| a.name.cmp(&b.name));
        // A position that orders the file's tokens before the API's: `0:NAME`, `1:NAME`.
        let mut items: Vec<(String, TokenView)> = file
            .into_iter()
            .map(|t| (format!("0:{}", t.name), t))
            .collect();
        let snap = snapshot(&app)?;
        for o in snap.of(Kind::ServiceToken) {
            items.push((format!("1:{}", o.name), view_of(o, now)?));
        }
        Ok(items)
    })
    .await?;
    if let Some(a) = &after {
        items.retain(|(pos, _)| pos > a);
    }
    let next_cursor = (items.len() > limit)
        .then(|| {
            items
                .get(limit - 1)
                .map(|(p, _)| crate::endpoints::shared::encode_cursor(p))
        })
        .flatten();
    items.truncate(limit);
    Ok(Json(TokenList {
        items: items.into_iter().map(|(_, t)| t).collect(),
        next_cursor,
    }))
}

/// Reads one token.
#[utoipa::path(get, path = "/admin/v1/service-tokens/{name}", tag = "service-tokens",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "The token", body = TokenView),
        (status = 404, description = "No such token", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn get(
    State(app): State<Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    path_name(Kind::ServiceToken, &name)?;
    let v = blocking(move || {
        let now = Timestamp::now();
        let snap = snapshot(&app)?;
        if let Some(o) = snap.objects.get(&(Kind::ServiceToken, name.clone())) {
            return view_of(o, now);
        }
        file_tokens(&app, now)
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| ApiError::NotFound(format!("no service_token named {name:?}")))
    })
    .await?;
    Ok(Json(v))
}

/// Creates a token (with its budget and policy, in one transaction); the secret is in this answer only.
#[utoipa::path(post, path = "/admin/v1/service-tokens", tag = "service-tokens", request_body = CreateToken,
    params(("Idempotency-Key" = Option<String>, Header, description = "1-255 printable ASCII characters; a repeat gets the first answer, without the secret")),
    responses(
        (status = 201, description = "Created; the secret is shown once", body = TokenSecret, headers(("Location" = String))),
        (status = 409, description = "Exists, or the file owns the name", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Validation failed, or the Idempotency-Key was used for another request", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn create(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let bytes = read_body(body)?;
    let idem = idempotency(&headers, &Method::POST, uri.path(), &bytes)?;
    let req: CreateToken = parse_json(&bytes)?;
    if req.role.is_some() && (req.budget.is_some() || req.policy.is_some()) {
        return Err(ApiError::Validation {
            detail: "an admin token (role) calls this API only: it takes no budget or policy"
                .to_owned(),
            errors: vec![FieldError {
                field: "role".to_owned(),
                reason: "cannot be combined with budget or policy".to_owned(),
            }],
        });
    }
    if !valid_name(&req.name) {
        return Err(ApiError::Validation {
            detail: "the token's name is not valid".to_owned(),
            errors: vec![FieldError {
                field: "name".to_owned(),
                reason: "must be 1-128 characters of A-Z, a-z, 0-9, '.', '_', '-'".to_owned(),
            }],
        });
    }
    let expires_at = match &req.expires_in {
        None => None,
        Some(s) => {
            let d = parse_lifetime(s).map_err(|e| token_error(e, "expires_in"))?;
            Some(
                Timestamp::now()
                    .checked_add(d)
                    .map_err(|e| ApiError::Validation {
                        detail: e.to_string(),
                        errors: vec![FieldError {
                            field: "expires_in".to_owned(),
                            reason: e.to_string(),
                        }],
                    })?,
            )
        }
    };
    let (token, secret) = StoredToken::mint(
        &req.name,
        &req.team,
        expires_at,
        req.attributes.clone(),
        req.role.map(Role::from),
    )
    .map_err(|e| token_error(e, ""))?;
    let name = req.name.clone();
    let attached = format!("token-{name}");
    let mut changes = vec![Change {
        kind: Kind::ServiceToken,
        name: name.clone(),
        spec: Some(
            serde_json::to_value(&token).map_err(|e| ApiError::StoreUnavailable(e.to_string()))?,
        ),
        precondition: Precondition::Absent,
    }];
    if let Some(b) = req.budget {
        let raw = RawBudget {
            name: attached.clone(),
            amount_usd: b.amount_usd,
            window: b.window,
            timezone: b.timezone,
            scope: "service_token".to_owned(),
            service_token: Some(name.clone()),
            models: b.models,
            providers: b.providers,
            action: b.action,
            downgrade_to: b.downgrade_to,
            on_insufficient: b.on_insufficient,
            stream_cutoff: b.stream_cutoff,
            alert_at: b.alert_at,
            webhook: b.webhook,
            ..RawBudget::default()
        };
        changes.push(Change {
            kind: Kind::Budget,
            name: attached.clone(),
            spec: Some(
                serde_json::to_value(&raw)
                    .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?,
            ),
            precondition: Precondition::Absent,
        });
    }
    if let Some(p) = req.policy {
        let raw = RawPolicy {
            name: attached.clone(),
            service_token: Some(name.clone()),
            allow_models: p.allow_models,
            deny_models: p.deny_models,
            allow_providers: p.allow_providers,
            deny_providers: p.deny_providers,
            max_tokens: p.max_tokens,
            on_max_tokens: p.on_max_tokens,
            ..RawPolicy::default()
        };
        changes.push(Change {
            kind: Kind::Policy,
            name: attached.clone(),
            spec: Some(
                serde_json::to_value(&raw)
                    .map_err(|e| ApiError::StoreUnavailable(e.to_string()))?,
            ),
            precondition: Precondition::Absent,
        });
    }
    let w = blocking(move || {
        write(
            &app,
            &caller,
            "create",
            changes,
            idem.as_ref(),
            &|objs| {
                let now = Timestamp::now();
                let token = objs
                    .first()
                    .cloned()
                    .flatten()
                    .and_then(|o| view_of(&o, now).ok())
                    .and_then(|v| serde_json::to_value(v).ok())
                    .unwrap_or_default();
                // Secrets are never stored: a replay answers without it.
                (201, serde_json::json!({ "token": token }))
            },
            &|kind, obj| {
                if obj == attached {
                    match kind {
                        Kind::Budget => "budget".to_owned(),
                        Kind::Policy => "policy".to_owned(),
                        _ => String::new(),
                    }
                } else {
                    String::new()
                }
            },
        )
    })
    .await?;
    let location = HeaderValue::from_str(&format!("{BASE}/{name}")).ok();
    match w {
        Written::Replayed(a) => {
            let extra: Vec<_> = location
                .into_iter()
                .map(|l| (header::LOCATION, l))
                .collect();
            Ok(replayed(a.status, a.body, &extra))
        }
        Written::Applied { objects, .. } => {
            let o = objects.into_iter().next().flatten().ok_or_else(|| {
                ApiError::StoreUnavailable("the write reported no token".to_owned())
            })?;
            let body = TokenSecret {
                token: view_of(&o, Timestamp::now())?,
                secret: Some(secret.expose().to_owned()),
            };
            let mut r = (StatusCode::CREATED, Json(body)).into_response();
            if let Some(l) = location {
                r.headers_mut().insert(header::LOCATION, l);
            }
            Ok(r)
        }
    }
}

/// Changes one catalog token from its current version: `f` gives the new spec and maybe a secret.
async fn change_token(
    app: Arc<App>,
    caller: Caller,
    name: String,
    action: &'static str,
    f: impl Fn(&StoredToken) -> Result<(StoredToken, Option<String>), ApiError> + Send + 'static,
) -> Result<TokenSecret, ApiError> {
    path_name(Kind::ServiceToken, &name)?;
    blocking(move || {
        let snap = snapshot(&app)?;
        let Some(o) = snap.objects.get(&(Kind::ServiceToken, name.clone())) else {
            if file_tokens(&app, Timestamp::now()).iter().any(|t| t.name == name) {
                return Err(ApiError::OwnedByFile(format!(
                    "service_token {name:?} is in service-tokens.json; change it with `tollgate service-token`"
                )));
            }
            return Err(ApiError::NotFound(format!("no service_token named {name:?}")));
        };
        let current: StoredToken = serde_json::from_value(o.spec.clone())
            .map_err(|e| ApiError::StoreUnavailable(format!("token {name:?}: {e}")))?;
        let (next, secret) = f(&current)?;
        let spec = serde_json::to_value(&next).map_err(|e| ApiError::StoreUnavailable(e.to_string()))?;
        let w = write(
            &app,
            &caller,
            action,
            vec![Change {
                kind: Kind::ServiceToken,
                name: name.clone(),
                spec: Some(spec),
                precondition: Precondition::Version(o.version),
            }],
            None,
            &|_| (200, serde_json::Value::Null),
            &|_, _| String::new(),
        )?;
        let Written::Applied { objects, .. } = w else {
            return Err(ApiError::StoreUnavailable("a replay without a key".to_owned()));
        };
        let o = objects
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| ApiError::StoreUnavailable("the write reported no token".to_owned()))?;
        Ok(TokenSecret {
            token: view_of(&o, Timestamp::now())?,
            secret,
        })
    })
    .await
}

/// Revokes a token at once.
#[utoipa::path(post, path = "/admin/v1/service-tokens/{name}/revoke", tag = "service-tokens",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "Revoked", body = TokenView),
        (status = 404, description = "No such token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The file owns the token", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "The token changed meanwhile: retry", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Validation failed", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn revoke(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<TokenView>, ApiError> {
    let out = change_token(app, caller, name, "revoke", |t| {
        let mut n = t.clone();
        n.revoked_at.get_or_insert(Timestamp::now());
        Ok((n, None))
    })
    .await?;
    Ok(Json(out.token))
}

/// A new secret for a token; the old one works for `overlap`.
#[utoipa::path(post, path = "/admin/v1/service-tokens/{name}/rotate", tag = "service-tokens",
    params(("name" = String, Path)), request_body(content = Option<Rotate>, content_type = "application/json"),
    responses(
        (status = 200, description = "Rotated; the new secret is shown once", body = TokenSecret),
        (status = 404, description = "No such token", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The file owns the token", body = Problem, content_type = "application/problem+json"),
        (status = 412, description = "The token changed meanwhile: retry", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Validation failed", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn rotate(
    State(app): State<Arc<App>>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenSecret>, ApiError> {
    let bytes = read_body(body)?;
    let r: Rotate = if bytes.iter().all(u8::is_ascii_whitespace) {
        Rotate::default()
    } else {
        parse_json(&bytes)?
    };
    let overlap = match &r.overlap {
        None => SignedDuration::ZERO,
        Some(s) => parse_lifetime(s).map_err(|e| token_error(e, "overlap"))?,
    };
    let out = change_token(app, caller, name, "rotate", move |t| {
        if t.revoked_at.is_some() {
            return Err(ApiError::Validation {
                detail: "a revoked token cannot be rotated".to_owned(),
                errors: Vec::new(),
            });
        }
        let (n, s) = t.rotate(overlap).map_err(|e| token_error(e, ""))?;
        Ok((n, Some(s.expose().to_owned())))
    })
    .await?;
    Ok(Json(out))
}

pub fn routes() -> axum::Router<Arc<App>> {
    axum::Router::new()
        .route(BASE, axum::routing::get(list).post(create))
        .route("/admin/v1/service-tokens/{name}", axum::routing::get(get))
        .route(
            "/admin/v1/service-tokens/{name}/revoke",
            axum::routing::post(revoke),
        )
        .route(
            "/admin/v1/service-tokens/{name}/rotate",
            axum::routing::post(rotate),
        )
}
