//! The admin API's router: every resource's routes (one `.merge(...)` line each), the auth guard on the
//! protected ones, the OpenAPI document, the 64 KiB body limit and the problem layer on all. Fails:
//! never (unknown paths answer a 404 problem). Cost: built once at start.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::Router;

use crate::endpoints::{
    audit_log, budgets, health, policies, price_overrides, scrape, spend_queries, token_routes,
};
use crate::problem::{ApiError, MAX_BODY_BYTES};
use crate::App;

/// Every route, the auth guard on the protected ones, the problem layer on all.
pub fn router(app: Arc<App>) -> Router {
    let protected = Router::new()
        .merge(policies::routes())
        .merge(budgets::routes())
        .merge(price_overrides::routes())
        .merge(token_routes::routes())
        .merge(audit_log::routes())
        .merge(spend_queries::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&app),
            crate::callers::guard,
        ));
    Router::new()
        .merge(health::routes())
        .merge(scrape::routes())
        .route(
            "/admin/v1/openapi.json",
            axum::routing::get(crate::openapi::serve),
        )
        .merge(protected)
        .fallback(|| async { ApiError::NotFound("no such resource".to_owned()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(crate::problem::problemize))
        .with_state(app)
}
