//! Tollgate's performance instruments.
//!
//! - `benches/hot_path.rs`: micro-benchmarks of hot-path steps, each beside a baseline (the naive
//!   alternative), so a reader sees what the hand-written path buys. `cargo bench -p tollgate-bench`.
//! - [`gate`] and the `tollgate-gate` binary: the tail-latency release gate (see `bench/gate.toml`).
//!
//! Results are recorded in `docs/benchmarks.md`.

#![forbid(unsafe_code)]

pub mod gate;
