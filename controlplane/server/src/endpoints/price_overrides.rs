//! `/admin/v1/price-overrides`: negotiated prices (`[[pricing.overrides]]` entries, `name` required here)
//! made through the API, beside the file's. Everything is the shared versioned-object implementation
//! (`objects.rs`). Fails: `ApiError`. Cost: see `objects.rs`.

use tollgate_core::pricing::RawOverride;

crate::object_routes!(
    RawOverride,
    "/admin/v1/price-overrides",
    "/admin/v1/price-overrides/{name}",
    "price-overrides"
);

pub fn routes() -> axum::Router<std::sync::Arc<App>> {
    object_router()
}
