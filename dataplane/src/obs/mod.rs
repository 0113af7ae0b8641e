//! Observability, off the cores: [`accesslog`] (one JSON line per request, written by a background thread)
//! and [`webhook`] (budget alert POSTs, sent by a background thread).

pub mod accesslog;
pub mod webhook;
