//! `GET /metrics`: Prometheus metrics of the process this server runs in, as the [`crate::Hooks`] render
//! them (the gateway: the data plane's merged per-core counts, the ledger, budgets, build info; the control
//! plane alone: build info and budgets). Prometheus text format 0.0.4, or OpenMetrics 1.0 when the
//! `Accept` header names `application/openmetrics-text`.
//!
//! Credential: none by default, like `/admin/v1/healthz` (the admin listener is loopback unless it has
//! TLS, and the page names no user); with `[admin] metrics_token`, `Authorization: Bearer <token>` is
//! required (compared in constant time). Admin tokens and OIDC tokens are not accepted here: a scraper
//! holds only the scrape secret. Fails: 401 without the token when one is set; 404 when the hooks render
//! no metrics. Cost: the hooks' rendering, on tokio's blocking pool (never on a data-plane core).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};

use crate::endpoints::shared::blocking;
use crate::problem::ApiError;
use crate::App;

/// The OpenMetrics content type this endpoint answers with when asked for it.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format's content type (the default).
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Whether the scraper asked for OpenMetrics (Prometheus does by default, preferring it).
pub fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.to_ascii_lowercase()
                .contains("application/openmetrics-text")
        })
}

fn authorized(app: &App, headers: &HeaderMap) -> bool {
    let Some(token) = &app.metrics_token else {
        return true;
    };
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim())
    else {
        return false;
    };
    // Constant time in the token's content: compare digests.
    use sha2::Digest;
    let a = sha2::Sha256::digest(given.as_bytes());
    let b = sha2::Sha256::digest(token.0.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The process's metrics in the Prometheus text format (or OpenMetrics when `Accept` asks for it).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Metrics in the Prometheus text format 0.0.4 (text/plain; version=0.0.4), or OpenMetrics 1.0 when Accept names application/openmetrics-text; every metric is listed in docs/observability.md", body = String, content_type = "text/plain"),
        (status = 401, description = "[admin] metrics_token is set and the request does not carry it as a bearer token", body = crate::problem::Problem, content_type = "application/problem+json"),
        (status = 404, description = "This process renders no metrics", body = crate::problem::Problem, content_type = "application/problem+json")))]
pub async fn metrics(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !authorized(&app, &headers) {
        return Err(ApiError::Unauthorized(
            "/metrics needs [admin] metrics_token as `Authorization: Bearer ...`".to_owned(),
        ));
    }
    let openmetrics = wants_openmetrics(&headers);
    let hooks = Arc::clone(&app.hooks);
    let text = blocking(move || Ok(hooks.metrics(openmetrics))).await?;
    let Some(text) = text else {
        return Err(ApiError::NotFound(
            "this process renders no metrics".to_owned(),
        ));
    };
    let ct = if openmetrics {
        OPENMETRICS
    } else {
        PROMETHEUS_TEXT
    };
    Ok(([(header::CONTENT_TYPE, HeaderValue::from_static(ct))], text).into_response())
}

pub fn routes() -> axum::Router<Arc<App>> {
    axum::Router::new().route("/metrics", axum::routing::get(metrics))
}
