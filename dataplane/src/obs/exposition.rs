//! The data plane's metrics as one scrape sees them: [`GatewayMetrics`] (the cores' counts merged by
//! `obs::metrics`, the ledger thread's numbers, the log writer's and the webhook thread's drops), encoded
//! through `prometheus-client` as a [`Collector`] (Prometheus text or OpenMetrics: the registry's encoder
//! decides, never this file). Every name and label is listed in `docs/observability.md`.
//!
//! Owns: the metric names, help texts and label names of the data plane, and `Family`, a small helper
//! that writes one family of constant samples. Fails: only if writing into a `String` fails (never).
//! Cost: at scrape time only, off the cores: a merge of every core's published counts and one pass over
//! the series (a few hundred microseconds for hundreds of series).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::obs::metrics::{Hist, Merged, TOKEN_TYPES};
use crate::spend::committer::{BATCH_ENTRIES, COMMIT_US};

/// Picounits of a dollar in a dollar.
const PUSD_PER_USD: f64 = 1e12;

/// The ledger thread's numbers at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LedgerView {
    pub commits: u64,
    pub settlements: u64,
    pub failures: u64,
    pub recovered: u64,
    pub pending_entries: u64,
    pub store_failing: bool,
    /// Fleet mode's lease transactions: granted, refused (the budget could not cover the need), failed.
    pub lease_transactions: [u64; 3],
    /// Commit time: per [`COMMIT_US`] bucket then `+Inf`, sum in microseconds.
    pub commit_us: Vec<u64>,
    pub commit_us_sum: u64,
    /// Entries per commit: per [`BATCH_ENTRIES`] bucket then `+Inf`, and their sum.
    pub batch: Vec<u64>,
    pub batch_sum: u64,
}

/// Everything the data plane exposes, read once per scrape.
#[derive(Debug, Clone, Default)]
pub struct GatewayMetrics {
    pub merged: Merged,
    pub workers: usize,
    pub ledger: Option<LedgerView>,
    pub access_log_dropped: u64,
    pub webhooks_dropped: u64,
}

/// One metric family being written: its descriptor, then samples with their labels.
struct Family<'a, 'e> {
    enc: &'a mut DescriptorEncoder<'e>,
}

impl<'e> Family<'_, 'e> {
    fn counter<L: AsRef<[(&'static str, String)]>>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> Result<(), std::fmt::Error> {
        self.samples(name, help, MetricType::Counter, samples, true)
    }

    fn counter_u64<L: AsRef<[(&'static str, String)]>>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, u64)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, v) in samples {
            let labels: Vec<(&str, &str)> = labels
                .as_ref()
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
        }
        Ok(())
    }

    fn gauge<L: AsRef<[(&'static str, String)]>>(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (L, f64)>,
    ) -> Result<(), std::fmt::Error> {
        self.samples(name, help, MetricType::Gauge, samples, false)
    }

    fn samples<L: AsRef<[(&'static str, String)]>>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl IntoIterator<Item = (L, f64)>,
        counter: bool,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self.enc.encode_descriptor(name, help, None, kind)?;
        for (labels, v) in samples {
            let labels: Vec<(&str, &str)> = labels
                .as_ref()
                .iter()
                .map(|(k, v)| (*k, v.as_str()))
                .collect();
            let e = m.encode_family(&labels)?;
            if counter {
                ConstCounter::new(v).encode(e)?;
            } else {
                ConstGauge::new(v).encode(e)?;
            }
        }
        Ok(())
    }

    /// A histogram family from per-bucket counts (bounds in `unit`s of the stored integers).
    fn histogram<'h>(
        &mut self,
        name: &str,
        help: &str,
        scale: f64,
        samples: impl IntoIterator<Item = (Vec<(&'static str, String)>, &'h Hist)>,
    ) -> Result<(), std::fmt::Error> {
        let mut m = self
            .enc
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        for (labels, h) in samples {
            let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let buckets = buckets(h.bounds, &h.counts, scale);
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                h.sum_us as f64 / scale,
                h.count,
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

/// `(upper bound, count)` pairs for the encoder: each bound scaled, then `+Inf`.
fn buckets(bounds: &[u64], counts: &[u64], scale: f64) -> Vec<(f64, u64)> {
    bounds
        .iter()
        .map(|&b| b as f64 / scale)
        .chain(std::iter::once(f64::INFINITY))
        .zip(counts.iter().copied())
        .collect()
}

fn pusd_u64(p: i128) -> u64 {
    u64::try_from(p.max(0)).unwrap_or(u64::MAX)
}

impl Collector for GatewayMetrics {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut f = Family { enc: &mut enc };
        let m = &self.merged;
        f.counter_u64(
            "tollgate_requests",
            "Requests finished, by the API the client spoke, provider, billed model, outcome and status class",
            m.requests.iter().map(|((api, p, model, outcome, class), n)| {
                (
                    vec![
                        ("api", api.clone()),
                        ("provider", p.clone()),
                        ("model", model.clone()),
                        ("outcome", (*outcome).to_owned()),
                        ("status_class", (*class).to_owned()),
                    ],
                    *n,
                )
            }),
        )?;
        f.counter_u64(
            "gen_ai_client_token_usage",
            "Tokens of settled requests by type (input uncached, output including reasoning, cached input read, cache writes, reasoning)",
            m.series.iter().flat_map(|((api, p, model), s)| {
                TOKEN_TYPES.iter().zip(s.tokens).map(move |(t, n)| {
                    (
                        vec![
                            ("api", api.clone()),
                            ("provider", p.clone()),
                            ("model", model.clone()),
                            ("gen_ai_token_type", (*t).to_owned()),
                        ],
                        n,
                    )
                })
            }),
        )?;
        let cost_labels = |(p, model, group): &(String, String, String), price: &str| {
            vec![
                ("provider", p.clone()),
                ("model", model.clone()),
                ("group", group.clone()),
                ("price", price.to_owned()),
            ]
        };
        f.counter(
            "tollgate_cost_usd",
            "Cost of settled requests in USD (float; price=list: the price sheet's, price=effective: after negotiated terms)",
            m.cost.iter().flat_map(|(k, &(list, eff))| {
                [
                    (cost_labels(k, "list"), list as f64 / PUSD_PER_USD),
                    (cost_labels(k, "effective"), eff as f64 / PUSD_PER_USD),
                ]
            }),
        )?;
        f.counter_u64(
            "tollgate_cost_pusd",
            "Cost of settled requests in pico-USD (1e-12 USD), exact: the sum of the access log's list_cost_pusd / cost_pusd",
            m.cost.iter().flat_map(|(k, &(list, eff))| {
                [
                    (cost_labels(k, "list"), pusd_u64(list)),
                    (cost_labels(k, "effective"), pusd_u64(eff)),
                ]
            }),
        )?;
        let series_labels = |(api, p, model): &(String, String, String)| {
            vec![
                ("api", api.clone()),
                ("provider", p.clone()),
                ("model", model.clone()),
            ]
        };
        f.histogram(
            "gen_ai_server_request_duration_seconds",
            "Requests that reached a provider: from the request read to its last byte written",
            1e6,
            m.series
                .iter()
                .map(|(k, s)| (series_labels(k), &s.duration)),
        )?;
        f.histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streamed requests: from sending the upstream request to the provider's first response byte",
            1e6,
            m.series
                .iter()
                .filter(|(_, s)| s.ttft.count > 0)
                .map(|(k, s)| (series_labels(k), &s.ttft)),
        )?;
        f.histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Streamed requests with more than one output token: time after the first byte per output token after the first",
            1e6,
            m.series
                .iter()
                .filter(|(_, s)| s.per_token.count > 0)
                .map(|(k, s)| (series_labels(k), &s.per_token)),
        )?;
        f.histogram(
            "tollgate_upstream_ttfb_seconds",
            "From starting the upstream exchange (connect or pooled connection, send) to the provider's first response byte",
            1e6,
            m.series.iter().map(|(k, s)| (series_labels(k), &s.ttfb)),
        )?;
        f.histogram(
            "tollgate_gateway_added_seconds",
            "The gateway's own time before the provider: from the request read to the upstream exchange starting (identify, route, authorize, price, admit); connecting is upstream time",
            1e6,
            m.series.iter().map(|(k, s)| (series_labels(k), &s.added)),
        )?;
        f.counter_u64(
            "tollgate_budget_asks",
            "Cross-core messages budget admissions waited for (0 per request when the owning core or a slice covered it)",
            [(Vec::new(), m.budget_asks)],
        )?;
        let [local, remote, handed, adopted, failed] = m.handoff;
        f.counter_u64(
            "tollgate_budgeted_requests",
            "Budgeted requests by where they were served: on the core owning the caller's budgets (local) or not (remote)",
            [
                (vec![("owner", "local".to_owned())], local),
                (vec![("owner", "remote".to_owned())], remote),
            ],
        )?;
        f.counter_u64(
            "tollgate_connection_handoffs",
            "Keep-alive connections moved to the core owning their caller's budgets: handed_off (sent), adopted (received), failed",
            [
                (vec![("result", "handed_off".to_owned())], handed),
                (vec![("result", "adopted".to_owned())], adopted),
                (vec![("result", "failed".to_owned())], failed),
            ],
        )?;
        f.gauge(
            "tollgate_workers",
            "Worker cores serving requests",
            [(Vec::new(), self.workers as f64)],
        )?;
        f.gauge(
            "tollgate_metrics_cores_reporting",
            "Cores whose counts this scrape includes (a core publishes after its first request, every 50 ms)",
            [(Vec::new(), m.cores_reporting as f64)],
        )?;
        f.counter_u64(
            "tollgate_access_log_dropped_batches",
            "Batches of access-log lines dropped because the log writer fell behind",
            [(Vec::new(), self.access_log_dropped)],
        )?;
        f.counter_u64(
            "tollgate_webhooks_dropped",
            "Budget alert webhooks dropped because the webhook queue was full",
            [(Vec::new(), self.webhooks_dropped)],
        )?;
        if let Some(l) = &self.ledger {
            let none: Vec<(&'static str, String)> = Vec::new();
            f.counter_u64(
                "tollgate_ledger_commits",
                "Spend batches committed to the store",
                [(none.clone(), l.commits)],
            )?;
            f.counter_u64(
                "tollgate_ledger_commit_failures",
                "Commits that failed (the batch is retried)",
                [(none.clone(), l.failures)],
            )?;
            f.counter_u64(
                "tollgate_ledger_settlements",
                "Settlements the ledger thread received from the cores (and recovered from journals)",
                [(none.clone(), l.settlements)],
            )?;
            f.counter_u64(
                "tollgate_ledger_recovered",
                "Settlements read back from journal files (a gap in a core's sequence, or an earlier run's)",
                [(none.clone(), l.recovered)],
            )?;
            f.counter_u64(
                "tollgate_fleet_lease_transactions",
                "Fleet mode: budget lease transactions this node ran against the shared store, by result: granted, refused (the budget could not cover the need), failed (the store failed); 0 outside fleet mode",
                [
                    (vec![("result", "granted".to_owned())], l.lease_transactions[0]),
                    (vec![("result", "refused".to_owned())], l.lease_transactions[1]),
                    (vec![("result", "failed".to_owned())], l.lease_transactions[2]),
                ],
            )?;
            f.gauge(
                "tollgate_ledger_store_failing",
                "1 while the spend store's commits are failing, else 0",
                [(none.clone(), if l.store_failing { 1.0 } else { 0.0 })],
            )?;
            f.gauge(
                "tollgate_ledger_pending_entries",
                "Spend entries journaled but not yet committed to the store",
                [(none.clone(), l.pending_entries as f64)],
            )?;
            let commit = Hist {
                bounds: &COMMIT_US,
                counts: l.commit_us.clone(),
                sum_us: l.commit_us_sum,
                count: l.commit_us.iter().sum(),
            };
            f.histogram(
                "tollgate_ledger_commit_seconds",
                "Time to commit one batch of spend to the store",
                1e6,
                [(none.clone(), &commit)],
            )?;
            let batch = Hist {
                bounds: &BATCH_ENTRIES,
                counts: l.batch.clone(),
                sum_us: l.batch_sum,
                count: l.batch.iter().sum(),
            };
            f.histogram(
                "tollgate_ledger_commit_entries",
                "Spend entries (instance, slot) per committed batch",
                1.0,
                [(none, &batch)],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use std::time::Duration;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::obs::metrics::{merge, CoreCounts, Sample};

    fn page(g: GatewayMetrics, openmetrics: bool) -> String {
        let mut r = Registry::default();
        r.register_collector(Box::new(g));
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        }
        out
    }

    #[test]
    fn the_page_names_every_family_and_exact_costs() {
        let mut c = CoreCounts::default();
        c.record(&Sample {
            api: "openai",
            provider: Some("openai"),
            model: Some("gpt-4o"),
            group: Some("eng"),
            outcome: "complete",
            status: 200,
            stream: true,
            total: Duration::from_millis(30),
            added: Some(Duration::from_micros(60)),
            ttfb: Some(Duration::from_millis(10)),
            tokens: Some([5, 7, 0, 0, 0]),
            cost: Some((123_456_789, 100_000_001)),
            budget_asks: 0,
        });
        let g = GatewayMetrics {
            merged: merge([&c]),
            workers: 2,
            ledger: Some(LedgerView {
                commit_us: vec![0; COMMIT_US.len() + 1],
                batch: vec![0; BATCH_ENTRIES.len() + 1],
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = page(g.clone(), false);
        assert!(text.contains(
            "tollgate_requests_total{api=\"openai\",provider=\"openai\",model=\"gpt-4o\",outcome=\"complete\",status_class=\"2xx\"} 1"
        ), "{text}");
        assert!(text.contains(
            "tollgate_cost_pusd_total{provider=\"openai\",model=\"gpt-4o\",group=\"eng\",price=\"effective\"} 100000001"
        ), "{text}");
        assert!(text.contains("gen_ai_client_token_usage_total{api=\"openai\",provider=\"openai\",model=\"gpt-4o\",gen_ai_token_type=\"output\"} 7"), "{text}");
        assert!(text.contains("gen_ai_server_request_duration_seconds_count{api=\"openai\",provider=\"openai\",model=\"gpt-4o\"} 1"), "{text}");
        assert!(text.contains("tollgate_ledger_store_failing 0"), "{text}");
        assert!(!text.contains("# EOF"));
        let om = page(g, true);
        assert!(om.ends_with("# EOF\n"), "{om}");
    }
}
