//! The OpenAPI 3.1 document, generated from the handlers' `#[utoipa::path]` annotations and the body
//! types' schemas: every path, the problem-details schema, the bearer security scheme, and the error
//! answers every protected operation can give (400, 401, 403, 413 on bodies, 503) added here once.
//!
//! Owns: [`ApiDoc`] and [`document`]. Fails: never (serialization of a fixed structure). Cost: built per
//! request of the document (microseconds; it is not on any hot path).

use utoipa::openapi::path::Operation;
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr};
use utoipa::{Modify, OpenApi};

use crate::endpoints::{
    audit_log, budgets, health, policies, price_overrides, scrape, spend_queries, token_routes,
};

/// The document's derive: every handler and schema.
#[derive(OpenApi)]
#[openapi(
    info(title = "Tollgate admin API", description = "The control plane's REST API: policies, budgets, price overrides and service tokens beside the configuration file, and the audit log. Errors are RFC 9457 problem details."),
    paths(
        health::healthz, serve, scrape::metrics,
        policies::list, policies::create, policies::get, policies::replace, policies::delete,
        budgets::list, budgets::create, budgets::get, budgets::replace, budgets::delete, budgets::state,
        price_overrides::list, price_overrides::create, price_overrides::get, price_overrides::replace, price_overrides::delete,
        token_routes::list, token_routes::create, token_routes::get, token_routes::revoke, token_routes::rotate,
        audit_log::list,
        spend_queries::spend, spend_queries::budget_spend, spend_queries::identities,
    ),
    components(schemas(crate::problem::Problem, crate::problem::FieldError)),
    modifiers(&Common)
)]
pub struct ApiDoc;

struct Common;

fn problem(description: &str) -> RefOr<utoipa::openapi::Response> {
    RefOr::T(
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/problem+json",
                ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("Problem")))
                    .build(),
            )
            .build(),
    )
}

fn add_common(op: &mut Operation, protected: bool, has_body: bool) {
    let mut add = |code: &str, d: &str| {
        op.responses
            .responses
            .entry(code.to_owned())
            .or_insert_with(|| problem(d));
    };
    add("503", "The store or the configuration file cannot be read");
    if protected {
        add("400", "A malformed request (body, query, header or path)");
        add("401", "No admin credential (WWW-Authenticate: Bearer)");
        add("403", "The credential's role does not allow this call");
        add("404", "No such object");
    }
    if has_body {
        add("413", "The body is over 64 KiB");
    }
}

impl Modify for Common {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An admin service token (tg_...) or an OIDC token whose groups [admin] roles map to a role",
                    ))
                    .build(),
            ),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            let protected = path != "/admin/v1/healthz"
                && path != "/admin/v1/openapi.json"
                && path != "/metrics";
            if let Some(op) = item.get.as_mut() {
                add_common(op, protected, false);
            }
            if let Some(op) = item.post.as_mut() {
                add_common(op, protected, true);
            }
            if let Some(op) = item.put.as_mut() {
                add_common(op, protected, true);
            }
            if let Some(op) = item.delete.as_mut() {
                add_common(op, protected, false);
            }
        }
    }
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/admin/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document", body = Object)))]
pub async fn serve() -> axum::Json<serde_json::Value> {
    axum::Json(document())
}

/// The document as JSON.
pub fn document() -> serde_json::Value {
    serde_json::to_value(ApiDoc::openapi()).unwrap_or_default()
}
