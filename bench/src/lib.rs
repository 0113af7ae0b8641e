//! Micro-benchmarks of Tollgate's hot path live in `benches/`; each has a baseline beside it (the naive
//! alternative), so a reader sees what the hand-written path buys. Run: `cargo bench -p tollgate-bench`.
//! Results are recorded in `docs/benchmarks.md`.

#![forbid(unsafe_code)]
