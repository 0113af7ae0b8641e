//! `/admin/v1/policies`: model policies (`[[policies]]` entries) made through the API, beside the file's.
//! Everything is the shared versioned-object implementation (`objects.rs`). Fails: `ApiError`. Cost: see
//! `objects.rs`.

use tollgate_core::auth::identity::RawPolicy;

crate::object_routes!(
    RawPolicy,
    "/admin/v1/policies",
    "/admin/v1/policies/{name}",
    "policies"
);

pub fn routes() -> axum::Router<std::sync::Arc<App>> {
    object_router()
}
