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
    #[serde(default)]
    cpu_ratio_to_best_peer: BTreeMap<String, f64>,
    saturation: Option<RawSaturation>,
    errors: u64,
}

#[derive(Debug, Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields)]
struct RawSaturation {
    cpu_ratio_to_best_peer: f64,
    throughput_ratio_to_best_peer: f64,
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
    /// Per scenario: Tollgate's CPU per request at most this multiple of the better peer's (nginx or
    /// HAProxy) in the same repeat (median over repeats of the paired ratio). Checked when a peer ran.
    pub cpu_ratio_to_best_peer: BTreeMap<String, f64>,
    /// The closed-loop runs ([`SATURATION`]): CPU per request and throughput against the better peer.
    pub saturation: Option<SaturationLimits>,
    pub errors: u64,
}

/// Limits on the saturation runs, as ratios to the better peer of the same repeat.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SaturationLimits {
    pub cpu_ratio_to_best_peer: f64,
    /// Tollgate's requests/s at least this fraction of the better peer's.
    pub throughput_ratio_to_best_peer: f64,
}

/// The scenario name of the closed-loop (saturation) samples; their `rate` is 0.
pub const SATURATION: &str = "saturation";

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
                cpu_ratio_to_best_peer: raw.thresholds.cpu_ratio_to_best_peer,
                saturation: raw.thresholds.saturation.map(|r| SaturationLimits {
                    cpu_ratio_to_best_peer: r.cpu_ratio_to_best_peer,
                    throughput_ratio_to_best_peer: r.throughput_ratio_to_best_peer,
                }),
                errors: raw.thresholds.errors,
            },
        };
        for (name, v) in &cfg.thresholds.cpu_ratio_to_best_peer {
            if !(*v >= 1.0 && *v <= 100.0) {
                return Err(err(
                    &format!("thresholds.cpu_ratio_to_best_peer.{name}"),
                    "must be in [1, 100]",
                ));
            }
        }
        if let Some(l) = cfg.thresholds.saturation {
            if !(l.cpu_ratio_to_best_peer >= 1.0 && l.cpu_ratio_to_best_peer <= 100.0) {
                return Err(err(
                    "thresholds.saturation.cpu_ratio_to_best_peer",
                    "must be in [1, 100]",
                ));
            }
            if !(l.throughput_ratio_to_best_peer > 0.0 && l.throughput_ratio_to_best_peer <= 10.0) {
                return Err(err(
                    "thresholds.saturation.throughput_ratio_to_best_peer",
                    "must be in (0, 10]",
                ));
            }
        }
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
    /// Median over repeats of (this target's CPU per request / the better peer's in the same repeat).
    pub peer_ratio_cpu: Option<f64>,
    /// Median over repeats of (this target's achieved requests/s / the better peer's in the same repeat).
    pub peer_ratio_rate: Option<f64>,
    /// Median achieved requests/s (the saturation runs' throughput).
    pub achieved_rate: f64,
    pub cpu_us_per_request: Option<f64>,
    pub cpu_us_per_event: Option<f64>,
    pub errors: u64,
    pub repeats: usize,
}

/// The other proxies' samples of `s`'s scenario, rate and repeat.
fn peers_of<'a>(samples: &'a [Sample], s: &'a Sample) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |b| {
        b.target != "direct"
            && b.target != s.target
            && b.scenario == s.scenario
            && b.rate == s.rate
            && b.repeat == s.repeat
    })
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
            // The better peer of the same repeat: least CPU per request, most requests/s.
            let mut cpu_ratio: Vec<f64> = mine
                .iter()
                .filter(|_| target != "direct")
                .filter_map(|s| {
                    let best = peers_of(samples, s)
                        .filter_map(|b| b.cpu_us_per_request.filter(|c| *c > 0.0))
                        .min_by(|a, b| a.total_cmp(b))?;
                    Some(s.cpu_us_per_request? / best)
                })
                .collect();
            let mut rate_ratio: Vec<f64> = mine
                .iter()
                .filter(|_| target != "direct")
                .filter_map(|s| {
                    let best = peers_of(samples, s)
                        .map(|b| b.achieved_rate)
                        .filter(|r| *r > 0.0)
                        .max_by(|a, b| a.total_cmp(b))?;
                    Some(s.achieved_rate / best)
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
                peer_ratio_cpu: median(&mut cpu_ratio),
                peer_ratio_rate: median(&mut rate_ratio),
                achieved_rate: col(&|s| s.achieved_rate),
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
        if s.scenario == SATURATION {
            saturation_verdict(s, t, &mut out);
            continue;
        }
        let at = format!("{} at {} req/s", s.scenario, s.rate);
        if let (Some(r), Some(max)) = (s.peer_ratio_cpu, t.cpu_ratio_to_best_peer.get(&s.scenario))
        {
            if r > *max {
                out.push(format!(
                    "{at}: CPU per request is {r:.2}x the better peer's in the same repeat (median over repeats; limit {max}x)"
                ));
            }
        }
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

/// The saturation runs: ratios to the better peer only (a closed loop's latency is its queue, and its
/// absolute throughput is the machine's). Without a peer there is nothing to compare: no verdict.
fn saturation_verdict(s: &Summary, t: &Thresholds, out: &mut Vec<String>) {
    let Some(l) = t.saturation else {
        return;
    };
    if let Some(r) = s.peer_ratio_cpu {
        if r > l.cpu_ratio_to_best_peer {
            out.push(format!(
                "saturation: CPU per request is {r:.2}x the better peer's in the same repeat (median over repeats; limit {}x)",
                l.cpu_ratio_to_best_peer
            ));
        }
    }
    if let Some(r) = s.peer_ratio_rate {
        if r < l.throughput_ratio_to_best_peer {
            out.push(format!(
                "saturation: {:.0} requests/s is {r:.2}x the better peer's in the same repeat (median over repeats; at least {}x)",
                s.achieved_rate, l.throughput_ratio_to_best_peer
            ));
        }
    }
    if s.errors > t.errors {
        out.push(format!(
            "saturation: {} errors (allowed {})",
            s.errors, t.errors
        ));
    }
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
            cpu_ratio_to_best_peer: [("chat".to_owned(), 1.5)].into_iter().collect(),
            saturation: Some(SaturationLimits {
                cpu_ratio_to_best_peer: 1.5,
                throughput_ratio_to_best_peer: 0.8,
            }),
            errors: 0,
        }
    }

    /// CPU and throughput are judged against the better peer of each repeat: a machine that is slow for
    /// everyone passes, a Tollgate 25% costlier than the limit allows fails, and no peer means no verdict.
    #[test]
    fn cpu_and_saturation_are_ratios_to_the_better_peer_of_the_same_repeat() {
        let sat = |target: &str, repeat: usize, cpu: f64, rate: f64| Sample {
            scenario: SATURATION.into(),
            rate: 0.0,
            achieved_rate: rate,
            ..sample(target, repeat, 1000.0, Some(cpu))
        };
        let mut s = Vec::new();
        for r in 0..3 {
            // Every repeat slower than the last, for every target alike.
            let k = 1.0 + r as f64;
            s.push(sat("tollgate", r, 28.0 * k, 20_000.0 / k));
            s.push(sat("nginx", r, 22.0 * k, 30_000.0 / k));
            s.push(sat("haproxy", r, 20.0 * k, 24_000.0 / k));
        }
        let sum = summarise(&s);
        let ours = sum.iter().find(|x| x.target == "tollgate").unwrap();
        assert!((ours.peer_ratio_cpu.unwrap() - 1.4).abs() < 1e-9);
        assert!((ours.peer_ratio_rate.unwrap() - 2.0 / 3.0).abs() < 1e-9);
        let v = verdict(&sum, &thresholds());
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(v[0].contains("0.67x the better peer"), "{v:?}");
        // 25% more CPU per request than 1.4x: 1.75x fails the 1.5x limit.
        let t = Thresholds {
            saturation: Some(SaturationLimits {
                cpu_ratio_to_best_peer: 1.5,
                throughput_ratio_to_best_peer: 0.5,
            }),
            ..thresholds()
        };
        assert!(verdict(&sum, &t).is_empty());
        let costlier: Vec<Sample> = s
            .iter()
            .map(|x| match x.target.as_str() {
                "tollgate" => Sample {
                    cpu_us_per_request: x.cpu_us_per_request.map(|c| c * 1.25),
                    ..x.clone()
                },
                _ => x.clone(),
            })
            .collect();
        let v = verdict(&summarise(&costlier), &t);
        assert!(v[0].contains("1.75x the better peer"), "{v:?}");
        // No peer ran: nothing to compare, nothing fails.
        let alone: Vec<Sample> = costlier
            .into_iter()
            .filter(|x| x.target == "tollgate")
            .collect();
        assert!(verdict(&summarise(&alone), &t).is_empty());
        // The open-loop scenarios' ratio: 2x the better peer's CPU fails chat's 1.5x.
        let s = vec![
            sample("direct", 0, 100.0, None),
            sample("tollgate", 0, 150.0, Some(24.0)),
            sample("haproxy", 0, 150.0, Some(12.0)),
        ];
        let v = verdict(&summarise(&s), &thresholds());
        assert!(v[0].contains("2.00x the better peer"), "{v:?}");
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
