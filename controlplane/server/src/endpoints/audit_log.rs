//! `/admin/v1/audit` (finance and admin): the audit log, oldest first, with cursor pagination by entry
//! number. Entries never hold a secret or a token hash (the catalog redacts them when it appends).
//! Fails: `ApiError`. Cost: one range read of `limit + 1` entries.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::Json;
use tollgate_core::catalog::audit;
use utoipa::ToSchema;

use crate::endpoints::shared::{blocking, page_query, PageQuery};
use crate::problem::{ApiError, Problem};
use crate::App;

/// One audit entry.
#[derive(Debug, serde::Serialize, serde::Deserialize, ToSchema)]
pub struct AuditEntry {
    pub seq: i64,
    pub at: String,
    /// `{principal, role, from}`.
    #[schema(value_type = Object)]
    pub actor: serde_json::Value,
    /// `create`, `update`, `delete`, `revoke`, `rotate`, `denied`.
    pub action: String,
    pub kind: Option<String>,
    pub name: Option<String>,
    /// The HTTP status the call was answered with.
    pub outcome: u16,
    pub version: Option<u64>,
    #[schema(value_type = Option<Object>)]
    pub before: Option<serde_json::Value>,
    #[schema(value_type = Option<Object>)]
    pub after: Option<serde_json::Value>,
    pub detail: Option<String>,
}

/// One page of the audit log.
#[derive(Debug, serde::Serialize, serde::Deserialize, ToSchema)]
pub struct AuditPage {
    pub items: Vec<AuditEntry>,
    pub next_cursor: Option<String>,
}

/// The audit log.
#[utoipa::path(get, path = "/admin/v1/audit", tag = "audit", params(PageQuery),
    responses(
        (status = 200, description = "One page, oldest first", body = AuditPage),
        (status = 400, description = "A bad limit or cursor", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn list(
    State(app): State<Arc<App>>,
    q: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    let q = page_query(q)?;
    let limit = q.limit()?;
    let after = match q.cursor.as_deref() {
        None => 0,
        Some(c) => c.parse::<i64>().ok().filter(|n| *n >= 0).ok_or_else(|| {
            ApiError::InvalidRequest("cursor is not one this API gave out".to_owned())
        })?,
    };
    let entries = blocking(move || {
        audit::list(app.store.as_ref(), after, limit + 1)
            .map_err(|e| ApiError::StoreUnavailable(e.to_string()))
    })
    .await?;
    let more = entries.len() > limit;
    let items: Vec<AuditEntry> = entries
        .into_iter()
        .take(limit)
        .map(|e| AuditEntry {
            seq: e.seq,
            at: e.at.to_string(),
            actor: serde_json::to_value(&e.actor).unwrap_or_default(),
            action: e.action,
            kind: e.kind.map(|k| k.as_str().to_owned()),
            name: e.name,
            outcome: e.outcome,
            version: e.version,
            before: e.before,
            after: e.after,
            detail: e.detail,
        })
        .collect();
    let next_cursor = if more {
        items.last().map(|e| e.seq.to_string())
    } else {
        None
    };
    Ok(Json(AuditPage { items, next_cursor }))
}

pub fn routes() -> axum::Router<Arc<App>> {
    axum::Router::new().route("/admin/v1/audit", axum::routing::get(list))
}
