//! The admin API's resources, one file each (`shared.rs` holds what their handlers share). Adding one
//! (`/admin/v1/spend`, say) is a file here plus one `.merge(...)` line in `routing.rs` (and its handlers
//! listed in `openapi.rs`). Fails: with `ApiError` only. Cost: see each handler; store calls run on
//! tokio's blocking pool.

pub mod audit_log;
pub mod budgets;
pub mod health;
pub mod objects;
pub mod policies;
pub mod price_overrides;
pub mod scrape;
pub mod shared;
pub mod spend_queries;
pub mod token_routes;
