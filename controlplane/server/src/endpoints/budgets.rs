//! `/admin/v1/budgets`: dollar budgets (`[[budgets]]` entries) made through the API, beside the file's
//! (the shared versioned-object implementation, `objects.rs`), and `/admin/v1/budgets/{name}/state`: the
//! gateway's live numbers when its hooks give them, else the limit from the effective configuration with
//! `"spent": null` and `"source": "config"`.
//!
//! Fails: `ApiError` (404 for a budget neither the file nor the catalog defines). Cost: the state reads
//! the catalog and validates the configuration once.

use tollgate_core::budget::RawBudget;
use utoipa::ToSchema;

use crate::endpoints::shared::{blocking, path_name, snapshot, validator};

crate::object_routes!(
    RawBudget,
    "/admin/v1/budgets",
    "/admin/v1/budgets/{name}",
    "budgets"
);

/// A budget's state.
#[derive(Debug, serde::Serialize, serde::Deserialize, ToSchema)]
pub struct BudgetState {
    pub name: String,
    /// `live`: the gateway's own numbers; `config`: the configured limit only.
    pub source: String,
    /// The limit, as `$12.5`.
    pub limit_usd: String,
    /// The window, as configured (`day in UTC`, `rolling 7d`...).
    pub window: String,
    /// Spent in the current window, as `$1.25`; null when only the configuration was read.
    pub spent_usd: Option<String>,
    /// The gateway's live state of this budget, as its hooks report it.
    #[schema(value_type = Option<Object>)]
    pub live: Option<serde_json::Value>,
}

/// A budget's current state.
#[utoipa::path(get, path = "/admin/v1/budgets/{name}/state", tag = "budgets",
    params(("name" = String, Path)),
    responses(
        (status = 200, description = "The state", body = BudgetState),
        (status = 404, description = "No such budget", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn state(
    State(app): State<std::sync::Arc<App>>,
    Path(name): Path<String>,
) -> Result<Json<BudgetState>, ApiError> {
    use tollgate_core::catalog::Kind;
    path_name(Kind::Budget, &name)?;
    let live = app.hooks.live_budgets().and_then(|v| v.get(&name).cloned());
    let st = blocking(move || {
        let v = validator(&app)?;
        let snap = snapshot(&app)?;
        let config = v.config(&snap).map_err(|e| {
            ApiError::ConfigUnavailable(format!(
                "the effective configuration does not validate: {e}"
            ))
        })?;
        let b = config
            .budgets
            .budgets()
            .iter()
            .find(|b| *b.name == *name)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no budget named {name:?}")))?;
        let spent = live
            .as_ref()
            .and_then(|l| l.get("spent_usd"))
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        Ok(BudgetState {
            name,
            source: if live.is_some() { "live" } else { "config" }.to_owned(),
            limit_usd: b.amount.to_string(),
            window: b.window.to_string(),
            spent_usd: spent,
            live,
        })
    })
    .await?;
    Ok(Json(st))
}

pub fn routes() -> axum::Router<std::sync::Arc<App>> {
    object_router().route("/admin/v1/budgets/{name}/state", axum::routing::get(state))
}
