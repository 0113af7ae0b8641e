//! The release gate's configuration, statistics and verdict (the process orchestration is in
//! `src/bin/tollgate-gate.rs`).
//!
//! Owns: `bench/gate.toml` parsing (raw serde with `deny_unknown_fields`, validated into [`GateConfig`]),
//! the per-run [`Sample`]s, the medians over repeats of each figure and of its difference from the direct run
//! of the same repeat, and [`verdict`], which lists every threshold exceeded.
//! Fails: configuration errors name the field; statistics never fail (an empty sample set is "no data",
//! which the verdict reports as a violation rather than a pass).
//! Cost: negligible next to the load runs.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGate {
    run: RawRun,
    quick: Option<RawRun>,
    scenario: Vec<RawScenario>,
    thresholds: RawThresholds,
}

#[derive(Debug, Deserialize, Clone, Default)]
#[serde(deny_unknown_fields)]
struct RawRun {
    connections: Option<usize>,
    duration_s: Option<f64>,
    warmup_s: Option<f64>,
    repeats: Option<usize>,
    gateway_workers: Option<usize>,
    ceiling_s: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    payload: String,
    rates: Vec<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThresholds {
    added_p99_us: f64,
    peer_ratio_p99: Option<f64>,
    added_p50_us: f64,
    cpu_us_per_request: BTreeMap<String, f64>,
    errors: u64,
}

/// What to run and what to enforce.
#[derive(Debug, Clone)]
pub struct GateConfig {
    pub connections: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub repeats: usize,
    pub gateway_workers: usize,
    pub ceiling_s: f64,
    pub scenarios: Vec<Scenario>,
    pub thresholds: Thresholds,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    /// `openai`, `openai-stream`, `anthropic`, `anthropic-stream`.
    pub payload: String,
    pub rates: Vec<f64>,
}

#[derive(Debug, Clone)]
pub struct Thresholds {
    pub added_p99_us: f64,
    /// Added p99 within this multiple of the best peer's (same scenario, rate and run) also passes: the
    /// peers run on the same noisy machine at the same moment, so a slow machine moves them too.
    pub peer_ratio_p99: Option<f64>,
    pub added_p50_us: f64,
    pub cpu_us_per_request: BTreeMap<String, f64>,
    pub errors: u64,
}

impl GateConfig {
    /// Loads `path`; with `quick`, the `[quick]` section overrides `[run]`.
    pub fn load(path: &Path, quick: bool) -> Result<GateConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let raw: RawGate =
            toml::from_str(&text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
        let mut run = raw.run.clone();
        if quick {
            let q = raw.quick.clone().unwrap_or_default();
            run.duration_s = q.duration_s.or(run.duration_s);
            run.warmup_s = q.warmup_s.or(run.warmup_s);
            run.repeats = q.repeats.or(run.repeats);
            run.ceiling_s = q.ceiling_s.or(run.ceiling_s);
            run.connections = q.connections.or(run.connections);
        }
        let err = |field: &str, why: &str| format!("{}: {field}: {why}", path.display());
        let cfg = GateConfig {
            connections: run.connections.unwrap_or(16),
            duration_s: run.duration_s.unwrap_or(5.0),
            warmup_s: run.warmup_s.unwrap_or(1.0),
            repeats: run.repeats.unwrap_or(3),
            gateway_workers: run.gateway_workers.unwrap_or(1),
            ceiling_s: run.ceiling_s.unwrap_or(5.0),
            scenarios: raw
                .scenario
                .into_iter()
                .map(|s| Scenario {
                    name: s.name,
                    payload: s.payload,
                    rates: s.rates,
                })
                .collect(),
            thresholds: Thresholds {
                added_p99_us: raw.thresholds.added_p99_us,
                peer_ratio_p99: raw.thresholds.peer_ratio_p99,
                added_p50_us: raw.thresholds.added_p50_us,
                cpu_us_per_request: raw.thresholds.cpu_us_per_request,
                errors: raw.thresholds.errors,
            },
        };
        if cfg.connections == 0 || cfg.connections > 4096 {
            return Err(err("run.connections", "must be between 1 and 4096"));
        }
        if !(cfg.duration_s > 0.0 && cfg.duration_s <= 600.0) {
            return Err(err("run.duration_s", "must be in (0, 600]"));
        }
        if cfg.repeats == 0 || cfg.repeats > 50 {
            return Err(err("run.repeats", "must be between 1 and 50"));
        }
        if cfg.scenarios.is_empty() {
            return Err(err("scenario", "at least one [[scenario]] is required"));
        }
        for (i, s) in cfg.scenarios.iter().enumerate() {
            if !["openai", "openai-stream", "anthropic", "anthropic-stream"]
                .contains(&s.payload.as_str())
            {
                return Err(err(
                    &format!("scenario[{i}].payload"),
                    "must be openai, openai-stream, anthropic or anthropic-stream",
                ));
            }
            if s.rates.is_empty() || s.rates.iter().any(|r| !(*r > 0.0 && *r <= 1_000_000.0)) {
                return Err(err(
                    &format!("scenario[{i}].rates"),
                    "needs rates in (0, 1000000]",
                ));
            }
            if !cfg.thresholds.cpu_us_per_request.contains_key(&s.name) {
                return Err(err(
                    &format!("thresholds.cpu_us_per_request.{}", s.name),
                    "is missing for this scenario",
                ));
            }
        }
        Ok(cfg)
    }
}

/// One load run against one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub scenario: String,
    pub rate: f64,
    pub repeat: usize,
    pub target: String,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub ttfb_p50_us: f64,
    pub achieved_rate: f64,
    pub requests: u64,
    pub errors: u64,
    pub events: u64,
    /// Target process CPU time per request, where the target is a process we started.
    pub cpu_us_per_request: Option<f64>,
}

/// The median of `v` (mean of the middle two for an even count); `None` when empty.
pub fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Medians over repeats for one (scenario, rate, target).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub scenario: String,
    pub rate: f64,
    pub target: String,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub ttfb_p50_us: f64,
    /// Median over repeats of (this target's figure - direct's figure in the same repeat).
    pub added_p50_us: Option<f64>,
    pub added_p99_us: Option<f64>,
    pub added_p999_us: Option<f64>,
    pub added_ttfb_p50_us: Option<f64>,
    /// Median over repeats of (this target's p99 / the best other proxy's p99 in the same repeat): paired
    /// within a repeat, so a stall that hits the whole machine for one repeat moves both sides of the ratio.
    pub peer_ratio_p99: Option<f64>,
    pub cpu_us_per_request: Option<f64>,
    pub cpu_us_per_event: Option<f64>,
    pub errors: u64,
    pub repeats: usize,
}

/// Summarises samples per (scenario, rate, target), in first-seen order.
pub fn summarise(samples: &[Sample]) -> Vec<Summary> {
    let mut keys: Vec<(String, u64, String)> = Vec::new();
    for s in samples {
        let k = (s.scenario.clone(), s.rate.to_bits(), s.target.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(scenario, rate_bits, target)| {
            let rate = f64::from_bits(rate_bits);
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.scenario == scenario && s.rate == rate && s.target == target)
                .collect();
            let col = |f: &dyn Fn(&Sample) -> f64| {
                median(&mut mine.iter().map(|s| f(s)).collect::<Vec<_>>()).unwrap_or(f64::NAN)
            };
            let added = |f: &dyn Fn(&Sample) -> f64| {
                let mut d: Vec<f64> = mine
                    .iter()
                    .filter_map(|s| {
                        samples
                            .iter()
                            .find(|b| {
                                b.target == "direct"
                                    && b.scenario == s.scenario
                                    && b.rate == s.rate
                                    && b.repeat == s.repeat
                            })
                            .map(|b| f(s) - f(b))
                    })
                    .collect();
                if target == "direct" {
                    None
                } else {
                    median(&mut d)
                }
            };
            let mut peer_ratio: Vec<f64> = mine
                .iter()
                .filter(|_| target != "direct")
                .filter_map(|s| {
                    samples
                        .iter()
                        .filter(|b| {
                            b.target != "direct"
                                && b.target != s.target
                                && b.scenario == s.scenario
                                && b.rate == s.rate
                                && b.repeat == s.repeat
                                && b.p99_us > 0.0
                        })
                        .map(|b| b.p99_us)
                        .min_by(|a, b| a.total_cmp(b))
                        .map(|best| s.p99_us / best)
                })
                .collect();
            let mut cpu: Vec<f64> = mine.iter().filter_map(|s| s.cpu_us_per_request).collect();
            let mut cpu_ev: Vec<f64> = mine
                .iter()
                .filter_map(|s| {
                    s.cpu_us_per_request
                        .filter(|_| s.events > 0 && s.requests > 0)
                        .map(|c| c * s.requests as f64 / s.events as f64)
                })
                .collect();
            Summary {
                p50_us: col(&|s| s.p50_us),
                p99_us: col(&|s| s.p99_us),
                p999_us: col(&|s| s.p999_us),
                ttfb_p50_us: col(&|s| s.ttfb_p50_us),
                added_p50_us: added(&|s| s.p50_us),
                added_p99_us: added(&|s| s.p99_us),
                added_p999_us: added(&|s| s.p999_us),
                added_ttfb_p50_us: added(&|s| s.ttfb_p50_us),
                peer_ratio_p99: median(&mut peer_ratio),
                cpu_us_per_request: median(&mut cpu),
                cpu_us_per_event: median(&mut cpu_ev),
                errors: mine.iter().map(|s| s.errors).sum(),
                repeats: mine.len(),
                scenario,
                rate,
                target,
            }
        })
        .collect()
}

/// Every threshold Tollgate exceeds, in words; empty means the gate passes.
pub fn verdict(summaries: &[Summary], t: &Thresholds) -> Vec<String> {
    let mut out = Vec::new();
    let ours: Vec<&Summary> = summaries
        .iter()
        .filter(|s| s.target == "tollgate")
        .collect();
    if ours.is_empty() {
        out.push("no measurements through Tollgate".to_owned());
    }
    for s in ours {
        let at = format!("{} at {} req/s", s.scenario, s.rate);
        match s.added_p99_us {
            Some(v) if v <= t.added_p99_us => {}
            Some(v) => match (s.peer_ratio_p99, t.peer_ratio_p99) {
                (Some(r), Some(ratio)) if r <= ratio => {}
                (Some(r), Some(ratio)) => out.push(format!(
                    "{at}: added p99 {v:.0} us exceeds {:.0} us, and p99 is {r:.2}x the best peer's in the same repeat (median over repeats; limit {ratio}x)",
                    t.added_p99_us
                )),
                _ => out.push(format!("{at}: added p99 {v:.0} us exceeds {:.0} us", t.added_p99_us)),
            },
            None => out.push(format!("{at}: no direct run to compare p99 with")),
        }
        if let Some(v) = s.added_p50_us {
            if v > t.added_p50_us {
                out.push(format!(
                    "{at}: added p50 {v:.0} us exceeds {:.0} us",
                    t.added_p50_us
                ));
            }
        }
        if let (Some(v), Some(max)) = (s.cpu_us_per_request, t.cpu_us_per_request.get(&s.scenario))
        {
            if v > *max {
                out.push(format!("{at}: CPU {v:.1} us/request exceeds {max:.1}"));
            }
        }
        if s.errors > t.errors {
            out.push(format!("{at}: {} errors (allowed {})", s.errors, t.errors));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(target: &str, repeat: usize, p99: f64, cpu: Option<f64>) -> Sample {
        Sample {
            scenario: "chat".into(),
            rate: 2000.0,
            repeat,
            target: target.into(),
            p50_us: p99 / 2.0,
            p99_us: p99,
            p999_us: p99 * 2.0,
            ttfb_p50_us: p99 / 3.0,
            achieved_rate: 2000.0,
            requests: 1000,
            errors: 0,
            events: 0,
            cpu_us_per_request: cpu,
        }
    }

    fn thresholds() -> Thresholds {
        Thresholds {
            added_p99_us: 100.0,
            peer_ratio_p99: Some(1.5),
            added_p50_us: 1000.0,
            cpu_us_per_request: [("chat".to_owned(), 30.0)].into_iter().collect(),
            errors: 0,
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn added_latency_pairs_each_repeat_with_its_own_direct_run() {
        // Direct gets noisier each repeat; the gateway adds exactly 50 us each time.
        let s = vec![
            sample("direct", 0, 100.0, None),
            sample("tollgate", 0, 150.0, Some(20.0)),
            sample("direct", 1, 500.0, None),
            sample("tollgate", 1, 550.0, Some(25.0)),
            sample("direct", 2, 900.0, None),
            sample("tollgate", 2, 950.0, Some(22.0)),
        ];
        let sum = summarise(&s);
        let ours = sum.iter().find(|x| x.target == "tollgate").unwrap();
        assert_eq!(ours.added_p99_us, Some(50.0));
        assert_eq!(ours.cpu_us_per_request, Some(22.0));
        assert!(verdict(&sum, &thresholds()).is_empty());
    }

    #[test]
    fn a_regression_fails_with_reasons() {
        let s = vec![
            sample("direct", 0, 100.0, None),
            sample("tollgate", 0, 400.0, Some(45.0)),
        ];
        let v = verdict(&summarise(&s), &thresholds());
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v[0].contains("added p99 300"));
        assert!(v[1].contains("CPU 45.0"));
        assert!(
            !verdict(&[], &thresholds()).is_empty(),
            "no data must not pass"
        );
    }

    #[test]
    fn a_noisy_machine_is_judged_against_the_peers_of_the_same_run() {
        let nginx = sample("nginx", 0, 600.0, Some(20.0));
        let s = vec![
            sample("direct", 0, 100.0, None),
            sample("tollgate", 0, 700.0, Some(20.0)),
            nginx.clone(),
        ];
        // +600 us is over the 100 us limit, but a p99 of 700 us is within 1.5x the peer's 600 us.
        assert!(verdict(&summarise(&s), &thresholds()).is_empty());
        let s = vec![
            sample("direct", 0, 100.0, None),
            sample("tollgate", 0, 950.0, Some(20.0)),
            nginx,
        ];
        let v = verdict(&summarise(&s), &thresholds());
        assert!(v[0].contains("1.58x the best peer"), "{v:?}");
    }

    #[test]
    fn the_peer_comparison_pairs_each_repeat_so_one_stall_does_not_decide() {
        // CI's failing run (stream, 2000/s): the peers' quiet repeats and Tollgate's quiet repeats fell in
        // different moments, so comparing medians of whole p99s said 2.1x; paired within each repeat,
        // Tollgate was within 1.5x of the best peer in 3 of the 5.
        let (tg, ng, ha) = (
            [6590.0, 6369.0, 1034.0, 3856.0, 4866.0],
            [4923.0, 2930.0, 1730.0, 5648.0, 3477.0],
            [5242.0, 882.0, 912.0, 7962.0, 2293.0],
        );
        // (The helper's p50 is half its p99; only the p99 rule is under test.)
        let t = Thresholds {
            added_p50_us: f64::MAX,
            ..thresholds()
        };
        let mut s = Vec::new();
        for r in 0..5 {
            s.push(sample("direct", r, 500.0, None));
            s.push(sample("tollgate", r, tg[r], Some(20.0)));
            s.push(sample("nginx", r, ng[r], Some(20.0)));
            s.push(sample("haproxy", r, ha[r], Some(20.0)));
        }
        let sum = summarise(&s);
        let ours = sum.iter().find(|x| x.target == "tollgate").unwrap();
        let r = ours.peer_ratio_p99.unwrap();
        assert!(
            (r - 6590.0 / 4923.0).abs() < 1e-9,
            "median paired ratio {r}"
        );
        assert!(verdict(&sum, &t).is_empty());
        // Slower than the best peer by 2x in every repeat fails, whatever the noise.
        let mut s = Vec::new();
        for (r, h) in ha.iter().enumerate() {
            s.push(sample("direct", r, 500.0, None));
            s.push(sample("tollgate", r, 2.0 * h, Some(20.0)));
            s.push(sample("haproxy", r, *h, Some(20.0)));
        }
        let v = verdict(&summarise(&s), &t);
        assert!(v[0].contains("2.00x the best peer"), "{v:?}");
    }

    #[test]
    fn the_checked_in_gate_file_is_valid() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("gate.toml");
        let full = GateConfig::load(&p, false).unwrap();
        let quick = GateConfig::load(&p, true).unwrap();
        assert!(quick.duration_s <= full.duration_s);
        assert!(full
            .scenarios
            .iter()
            .any(|s| s.payload.ends_with("-stream")));
    }
}
