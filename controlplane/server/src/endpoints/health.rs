//! `/admin/v1/healthz` (no auth): the server answers and the store is readable. Fails: 503 `store_unavailable`
//! when the catalog version cannot be read. Cost: one store read; the document is built per call.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use utoipa::ToSchema;

use crate::endpoints::shared::blocking;
use crate::problem::{ApiError, Problem};
use crate::App;

/// The health answer.
#[derive(Debug, serde::Serialize, serde::Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// The catalog version (0 before the first change).
    pub catalog_version: u64,
}

/// Liveness and the catalog version.
#[utoipa::path(get, path = "/admin/v1/healthz", tag = "meta",
    responses(
        (status = 200, description = "Up", body = Health),
        (status = 503, description = "The store cannot be read", body = Problem, content_type = "application/problem+json")))]
pub async fn healthz(State(app): State<Arc<App>>) -> Result<Json<Health>, ApiError> {
    let v = blocking(move || {
        tollgate_core::catalog::version(app.store.as_ref())
            .map_err(|e| ApiError::StoreUnavailable(e.to_string()))
    })
    .await?;
    Ok(Json(Health {
        status: "ok".to_owned(),
        catalog_version: v,
    }))
}

pub fn routes() -> axum::Router<Arc<App>> {
    axum::Router::new().route("/admin/v1/healthz", axum::routing::get(healthz))
}
