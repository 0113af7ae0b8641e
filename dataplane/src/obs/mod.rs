//! Observability, off the cores: [`accesslog`] (one JSON line per request, written by a background thread),
//! [`webhook`] (budget alert POSTs, sent by a background thread), [`metrics`] (per-core counts, published by
//! each core and merged at scrape time) and [`exposition`] (those counts as Prometheus metric families).

pub mod accesslog;
pub mod exposition;
pub mod metrics;
pub mod webhook;
