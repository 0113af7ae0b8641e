//! The `/metrics` page of a `tollgate` process, where the two planes meet: build info, the budgets' shared
//! instances (limit, spent, remaining, seconds to reset: what `tollgate spend` reads from the store and the
//! journals) and, in a gateway, the data plane's own families (`tollgate_dataplane::obs::exposition`).
//!
//! Owns: `tollgate_build_info`, the `tollgate_budget_*` gauges and the encoding of the whole page through
//! `prometheus-client` (Prometheus text 0.0.4, or OpenMetrics 1.0). Fails: a store or configuration that
//! cannot be read leaves the budget gauges out and sets `tollgate_budget_state_up` to 0; the rest of the
//! page is still served. Cost: one read of the spend store and the journals per scrape (as `tollgate
//! spend`), on the admin server's blocking pool; the data plane's part is a merge of published counts.

use std::path::Path;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tollgate_core::catalog::{self, effective::Validator};
use tollgate_core::store::Store;
use tollgate_dataplane::spend::committer::SpendRow;

/// Build info and budget gauges (what both `tollgate serve` and `tollgate controlplane serve` expose).
#[derive(Debug)]
struct Process {
    /// `None`: the budgets could not be read.
    budgets: Option<Vec<SpendRow>>,
}

/// Shared budget instances at most, on the page (a configuration with more lists the first ones).
pub const MAX_BUDGET_INSTANCES: usize = 256;

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Vec<(&str, &str)>, f64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for Process {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        gauge(
            &mut enc,
            "tollgate_build_info",
            "Always 1: the running binary's version and git commit",
            &[(
                vec![
                    ("version", env!("CARGO_PKG_VERSION")),
                    ("commit", env!("TOLLGATE_GIT_COMMIT")),
                ],
                1.0,
            )],
        )?;
        gauge(
            &mut enc,
            "tollgate_budget_state_up",
            "1 when this scrape read the budgets' state from the spend store and journals, else 0",
            &[(Vec::new(), if self.budgets.is_some() { 1.0 } else { 0.0 })],
        )?;
        let Some(rows) = &self.budgets else {
            return Ok(());
        };
        let now = jiff::Timestamp::now();
        let usd = |s: &str| s.parse::<f64>().unwrap_or(0.0);
        let shared: Vec<&SpendRow> = rows
            .iter()
            .filter(|r| r.shared)
            .take(MAX_BUDGET_INSTANCES)
            .collect();
        type Pick = fn(&SpendRow) -> &str;
        let families: [(&str, &str, Pick); 4] = [
            (
                "tollgate_budget_limit_usd",
                "A shared budget instance's limit in USD for its current window",
                |r| &r.limit_usd,
            ),
            (
                "tollgate_budget_spent_usd",
                "A shared budget instance's spend in its current window (store plus journals not yet committed)",
                |r| &r.spent_usd,
            ),
            (
                "tollgate_budget_remaining_usd",
                "A shared budget instance's limit less its spend",
                |r| &r.remaining_usd,
            ),
            (
                "tollgate_budget_uncommitted_usd",
                "The part of the spend read from journals, not yet committed to the store",
                |r| &r.unreplayed_usd,
            ),
        ];
        for (name, help, pick) in families {
            let samples: Vec<(Vec<(&str, &str)>, f64)> = shared
                .iter()
                .map(|r| {
                    (
                        vec![("budget", r.budget.as_str()), ("window", r.window.as_str())],
                        usd(pick(r)),
                    )
                })
                .collect();
            gauge(&mut enc, name, help, &samples)?;
        }
        let resets: Vec<(Vec<(&str, &str)>, f64)> = shared
            .iter()
            .filter_map(|r| {
                let at = r.resets_at.parse::<jiff::Timestamp>().ok()?;
                let secs = at.duration_since(now).as_secs_f64().max(0.0);
                Some((
                    vec![("budget", r.budget.as_str()), ("window", r.window.as_str())],
                    secs,
                ))
            })
            .collect();
        gauge(
            &mut enc,
            "tollgate_budget_reset_seconds",
            "Seconds until a shared budget instance's window resets (calendar windows only)",
            &resets,
        )
    }
}

/// The budgets' state as `tollgate spend` reads it: the file plus the catalog, the store and the journals.
fn budget_rows(path: &Path, store: &dyn Store) -> Option<Vec<SpendRow>> {
    let snap = catalog::read(store).ok()?;
    let config = Validator::new(path).ok()?.config(&snap).ok()?;
    tollgate_dataplane::spend::committer::report_on(&config, store).ok()
}

/// The whole page: build info, budgets, and the data plane's families when `gateway` is given.
pub fn render(
    path: &Path,
    store: &dyn Store,
    gateway: Option<&tollgate_dataplane::Gateway>,
    openmetrics: bool,
) -> Option<String> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Process {
        budgets: budget_rows(path, store),
    }));
    if let Some(g) = gateway {
        registry.register_collector(Box::new(g.metrics()));
    }
    let mut out = String::new();
    let encoded = if openmetrics {
        prometheus_client::encoding::text::encode(&mut out, &registry)
    } else {
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
    };
    encoded.ok().map(|()| out)
}
