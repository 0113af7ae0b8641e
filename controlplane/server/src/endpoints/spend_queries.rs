//! `/admin/v1/spend` (finance and admin): spend over any window by identity, group, service token, model,
//! provider and attribute, hourly or daily, JSON or CSV, exact to the pico-dollar (the store's hourly usage
//! counters, `store::consumption`); `/admin/v1/spend/budgets`: spend per budget instance (the ledger's
//! 15-minute slots summed into hours or days); `/admin/v1/identities` (viewer): the identities seen.
//!
//! Fails: `ApiError` (400 naming the parameter for a bad window, granularity, dimension or filter; 503 when
//! the store cannot be read). Cost: one read-only transaction, linear in the distinct dimension
//! combinations of the window (not in requests); a window is at most 400 days, hourly at most 31.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use jiff::Timestamp;
use serde::Deserialize;
use tollgate_core::store::consumption::{self, Dim, Granularity, UsageQuery};
use utoipa::{IntoParams, ToSchema};

use crate::endpoints::shared::blocking;
use crate::problem::{ApiError, Problem};
use crate::App;

/// The query of a spend report.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SpendQuery {
    /// RFC 3339 start (rounded down to the hour); default seven days before `to`.
    pub from: Option<String>,
    /// RFC 3339 end, exclusive (rounded up to the hour); default now.
    pub to: Option<String>,
    /// `hour` or `day` (UTC); default `day`.
    pub granularity: Option<String>,
    /// Comma-separated dimensions: `identity`, `group`, `service_token`, `model`, `provider`,
    /// `attribute:KEY`. Default: none (one total per bucket).
    pub group_by: Option<String>,
    /// Comma-separated equality filters `DIM=VALUE`, e.g. `model=gpt-4o-mini,group=research`.
    pub filter: Option<String>,
    /// `json` (default) or `csv`.
    pub format: Option<String>,
}

/// The query of a per-budget spend report.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpendQuery {
    /// One budget; default every budget.
    pub budget: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    /// `hour` or `day` (UTC); default `day`.
    pub granularity: Option<String>,
}

/// A spend report.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct SpendReport {
    pub from: String,
    pub to: String,
    pub granularity: String,
    pub group_by: Vec<String>,
    /// One row per bucket and combination of the dimensions: `start`, `dims`, `cost` and `list_cost`
    /// (`{usd, pico}`), `requests` and token counts.
    #[schema(value_type = Vec<Object>)]
    pub rows: Vec<serde_json::Value>,
}

/// A per-budget spend report.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct BudgetSpendReport {
    pub from: String,
    pub to: String,
    pub granularity: String,
    /// `budget`, `member` (`""` for a shared instance), `start`, `spent` (`{usd, pico}`).
    #[schema(value_type = Vec<Object>)]
    pub rows: Vec<serde_json::Value>,
}

/// One page of identities seen.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct IdentityPage {
    /// `identity`, `kind`, `subject`, `source`, `groups`, `service_token`, `team`, `first_seen`,
    /// `last_seen`.
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<serde_json::Value>,
    pub next_cursor: Option<String>,
}

fn bad(param: &str, reason: impl std::fmt::Display) -> ApiError {
    ApiError::InvalidRequest(format!("{param}: {reason}"))
}

/// `from`, `to` and granularity, checked.
fn window(
    from: Option<&str>,
    to: Option<&str>,
    granularity: Option<&str>,
) -> Result<(Timestamp, Timestamp, Granularity), ApiError> {
    let parse = |p: &str, v: &str| {
        v.parse::<Timestamp>()
            .map_err(|e| bad(p, format!("{v:?} is not an RFC 3339 time: {e}")))
    };
    let to = match to {
        Some(v) => parse("to", v)?,
        None => Timestamp::now(),
    };
    let from = match from {
        Some(v) => parse("from", v)?,
        None => to
            .checked_sub(jiff::SignedDuration::from_hours(24 * 7))
            .map_err(|e| bad("to", e))?,
    };
    if from >= to {
        return Err(bad("from", "must be before `to`"));
    }
    let g = match granularity.unwrap_or("day") {
        "hour" => Granularity::Hour,
        "day" => Granularity::Day,
        other => return Err(bad("granularity", format!("{other:?}: write hour or day"))),
    };
    let span = to.as_second() - from.as_second();
    if span > 400 * 86_400 {
        return Err(bad("from", "the window is over 400 days"));
    }
    if g == Granularity::Hour && span > 31 * 86_400 {
        return Err(bad(
            "granularity",
            "hourly rows cover at most 31 days; ask for day",
        ));
    }
    Ok((from, to, g))
}

fn granularity_name(g: Granularity) -> &'static str {
    match g {
        Granularity::Hour => "hour",
        Granularity::Day => "day",
    }
}

fn dims(list: Option<&str>) -> Result<Vec<Dim>, ApiError> {
    list.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            Dim::parse(s).ok_or_else(|| {
                bad(
                    "group_by",
                    format!("{s:?} is not a dimension: write identity, group, service_token, model, provider or attribute:KEY"),
                )
            })
        })
        .collect()
}

fn filters(list: Option<&str>) -> Result<Vec<(Dim, String)>, ApiError> {
    list.unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|f| {
            let (d, v) = f
                .split_once('=')
                .ok_or_else(|| bad("filter", format!("{f:?}: write DIM=VALUE")))?;
            let dim = Dim::parse(d.trim())
                .ok_or_else(|| bad("filter", format!("{d:?} is not a dimension")))?;
            Ok((dim, v.to_owned()))
        })
        .collect()
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|q| q.0)
        .map_err(|e| ApiError::InvalidRequest(format!("the query is not valid: {}", e.body_text())))
}

/// A CSV field, quoted when it needs to be.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

const MEASURES: [&str; 7] = [
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "list_cost",
];

fn csv(group_by: &[String], rows: &[serde_json::Value]) -> String {
    let mut out = String::from("start");
    for d in group_by {
        out.push(',');
        out.push_str(&csv_field(d));
    }
    out.push_str(",cost_usd,cost_pico");
    for m in MEASURES {
        out.push(',');
        out.push_str(if m == "list_cost" { "list_cost_usd" } else { m });
    }
    out.push('\n');
    for r in rows {
        let s = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        out.push_str(&csv_field(&s(&r["start"])));
        for d in group_by {
            out.push(',');
            out.push_str(&csv_field(&s(&r["dims"][d])));
        }
        out.push_str(&format!(
            ",{},{}",
            s(&r["cost"]["usd"]),
            s(&r["cost"]["pico"])
        ));
        for m in MEASURES {
            out.push(',');
            if m == "list_cost" {
                out.push_str(&s(&r["list_cost"]["usd"]));
            } else {
                out.push_str(&s(&r[m]));
            }
        }
        out.push('\n');
    }
    out
}

/// Spend over a window, grouped.
#[utoipa::path(get, path = "/admin/v1/spend", tag = "spend", params(SpendQuery),
    responses(
        (status = 200, description = "The report (JSON; CSV with format=csv)", body = SpendReport,
            content_type = "application/json"),
        (status = 400, description = "A bad parameter, named", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn spend(
    State(app): State<Arc<App>>,
    q: Result<Query<SpendQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let q = query(q)?;
    let (from, to, granularity) =
        window(q.from.as_deref(), q.to.as_deref(), q.granularity.as_deref())?;
    let group_by = dims(q.group_by.as_deref())?;
    let filters = filters(q.filter.as_deref())?;
    let as_csv = match q.format.as_deref().unwrap_or("json") {
        "json" => false,
        "csv" => true,
        other => return Err(bad("format", format!("{other:?}: write json or csv"))),
    };
    let names: Vec<String> = group_by.iter().map(Dim::name).collect();
    let uq = UsageQuery {
        from,
        to,
        granularity,
        group_by,
        filters,
    };
    let rows = blocking(move || {
        consumption::query(app.store.as_ref(), &uq)
            .map_err(|e| ApiError::StoreUnavailable(e.to_string()))
    })
    .await?;
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    if as_csv {
        return Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            csv(&names, &rows),
        )
            .into_response());
    }
    Ok(Json(SpendReport {
        from: from.to_string(),
        to: to.to_string(),
        granularity: granularity_name(granularity).to_owned(),
        group_by: names,
        rows,
    })
    .into_response())
}

/// Spend per budget instance.
#[utoipa::path(get, path = "/admin/v1/spend/budgets", tag = "spend", params(BudgetSpendQuery),
    responses(
        (status = 200, description = "The report", body = BudgetSpendReport),
        (status = 400, description = "A bad parameter, named", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn budget_spend(
    State(app): State<Arc<App>>,
    q: Result<Query<BudgetSpendQuery>, QueryRejection>,
) -> Result<Json<BudgetSpendReport>, ApiError> {
    let q = query(q)?;
    let (from, to, granularity) =
        window(q.from.as_deref(), q.to.as_deref(), q.granularity.as_deref())?;
    let budget = q.budget.clone();
    let rows = blocking(move || {
        consumption::budget_spend(app.store.as_ref(), budget.as_deref(), from, to, granularity)
            .map_err(|e| ApiError::StoreUnavailable(e.to_string()))
    })
    .await?;
    Ok(Json(BudgetSpendReport {
        from: from.to_string(),
        to: to.to_string(),
        granularity: granularity_name(granularity).to_owned(),
        rows: rows
            .iter()
            .filter_map(|r| serde_json::to_value(r).ok())
            .collect(),
    }))
}

/// The identities that came through (JWT subjects and service tokens), with groups and when.
#[utoipa::path(get, path = "/admin/v1/identities", tag = "identities",
    params(crate::endpoints::shared::PageQuery),
    responses(
        (status = 200, description = "One page, by identity", body = IdentityPage),
        (status = 400, description = "A bad limit or cursor", body = Problem, content_type = "application/problem+json")),
    security(("bearer" = [])))]
pub async fn identities(
    State(app): State<Arc<App>>,
    q: Result<Query<crate::endpoints::shared::PageQuery>, QueryRejection>,
) -> Result<Json<IdentityPage>, ApiError> {
    let (limit, after) = crate::endpoints::shared::page(q)?;
    let seen = blocking(move || {
        consumption::seen(app.store.as_ref(), after.as_deref(), limit + 1)
            .map_err(|e| ApiError::StoreUnavailable(e.to_string()))
    })
    .await?;
    let more = seen.len() > limit;
    let items: Vec<_> = seen.into_iter().take(limit).collect();
    let next_cursor = if more {
        items
            .last()
            .map(|s| crate::endpoints::shared::encode_cursor(&s.identity))
    } else {
        None
    };
    Ok(Json(IdentityPage {
        items: items
            .iter()
            .filter_map(|s| serde_json::to_value(s).ok())
            .collect(),
        next_cursor,
    }))
}

pub fn routes() -> axum::Router<Arc<App>> {
    axum::Router::new()
        .route("/admin/v1/spend", axum::routing::get(spend))
        .route("/admin/v1/spend/budgets", axum::routing::get(budget_spend))
        .route("/admin/v1/identities", axum::routing::get(identities))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn bad_parameters_are_named() {
        assert!(window(Some("yesterday"), None, None)
            .unwrap_err()
            .to_string()
            .starts_with("from:"));
        assert!(window(None, None, Some("week"))
            .unwrap_err()
            .to_string()
            .starts_with("granularity:"));
        assert!(dims(Some("model,colour"))
            .unwrap_err()
            .to_string()
            .contains("colour"));
        assert!(filters(Some("model"))
            .unwrap_err()
            .to_string()
            .contains("DIM=VALUE"));
        assert_eq!(dims(Some("model, attribute:env")).unwrap().len(), 2);
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("plain"), "plain");
    }
}
