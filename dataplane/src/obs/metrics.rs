//! Per-core request metrics: each core counts the requests it finishes in plain, core-local state
//! ([`CoreMetrics`]: a `RefCell` and `Cell`s, no atomics, no locks), and every 50 ms, when something changed,
//! publishes a copy of its counts ([`CoreCounts`]) into its own slot (one `ArcSwap` per core, written by that
//! core only). The scrape, on the control plane's thread, loads every core's slot and adds them up
//! ([`merge`]); it never talks to a core and a core never waits for it.
//!
//! Owns: what one request adds ([`Sample`]), the label bounds ([`MAX_MODELS`], [`MAX_GROUPS`],
//! [`MAX_PROVIDERS`]: a core keeps the first that many distinct values it sees and folds the rest into
//! `other`), the histogram buckets, and the merged view ([`Merged`]) that `obs::exposition` encodes.
//!
//! Fails: never; a label beyond its bound is counted under `other`. A scrape sees each core's counts as of
//! its last tick (at most 50 ms old). Cost on a core: one [`CoreMetrics::record`] per request (three small
//! hash-map updates and up to five histogram bucket searches: 0.19 us, measured in
//! `bench/benches/hot_path.rs`, `metrics_record`), plus one copy of its counts per 50 ms tick in which it
//! served a request.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

/// Distinct `model` label values a core keeps (billed models: the price sheet's names); more are `other`.
pub const MAX_MODELS: usize = 64;
/// Distinct `group` label values (a caller's first group) a core keeps; more are `other`.
pub const MAX_GROUPS: usize = 32;
/// Distinct `provider` label values a core keeps (configured providers); more are `other`.
pub const MAX_PROVIDERS: usize = 64;

/// The label value for a request that had none (not routed, anonymous, no group).
pub const NONE: &str = "none";
/// The label value everything past a bound is folded into.
pub const OTHER: &str = "other";

/// Token types, in [`Sample::tokens`] order: the `gen_ai_token_type` label's values.
pub const TOKEN_TYPES: [&str; 5] = ["input", "output", "cached", "cache_write", "reasoning"];

/// Request-duration buckets (total, upstream first byte, time to first token), in microseconds.
pub const DURATION_US: &[u64] = &[
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    120_000_000,
    300_000_000,
];
/// The gateway's own added time, in microseconds (tens of microseconds to 100 ms).
pub const ADDED_US: &[u64] = &[
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000,
];
/// Time per output token, in microseconds (OpenTelemetry's advised buckets, 10 ms to 2.5 s).
pub const PER_TOKEN_US: &[u64] = &[
    1_000, 5_000, 10_000, 20_000, 30_000, 40_000, 60_000, 80_000, 100_000, 150_000, 200_000,
    300_000, 400_000, 500_000, 750_000, 1_000_000, 2_500_000,
];

/// Buckets of one histogram: counts per bound (the last is `+Inf`), their sum in microseconds, and count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hist {
    pub bounds: &'static [u64],
    pub counts: Vec<u64>,
    pub sum_us: u64,
    pub count: u64,
}

impl Hist {
    pub fn new(bounds: &'static [u64]) -> Hist {
        Hist {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum_us: 0,
            count: 0,
        }
    }

    pub fn observe_us(&mut self, us: u64) {
        let i = self.bounds.partition_point(|&b| b < us);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum_us = self.sum_us.saturating_add(us);
        self.count += 1;
    }

    fn add(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(&o.counts) {
            *a += b;
        }
        self.sum_us = self.sum_us.saturating_add(o.sum_us);
        self.count += o.count;
    }
}

/// What one finished request adds. Label values are borrowed; the core interns them.
#[derive(Debug, Clone, Default)]
pub struct Sample<'a> {
    /// The API the client spoke (`none` for a request that could not be parsed).
    pub api: &'static str,
    pub provider: Option<&'a str>,
    /// The billed model (the price sheet's name), once routed.
    pub model: Option<&'a str>,
    /// The caller's first group.
    pub group: Option<&'a str>,
    pub outcome: &'static str,
    pub status: u16,
    pub stream: bool,
    /// From the request's start to its end.
    pub total: Duration,
    /// From the request's start to the upstream request being sent (the gateway's own time before it).
    pub added: Option<Duration>,
    /// From sending the upstream request to its first response byte.
    pub ttfb: Option<Duration>,
    /// Tokens by [`TOKEN_TYPES`], for a settled request.
    pub tokens: Option<[u64; 5]>,
    /// List and effective cost in pico-USD, for a settled request.
    pub cost: Option<(i128, i128)>,
    /// Cross-core messages admission waited for.
    pub budget_asks: u32,
}

/// A request series' key: api, provider id, model id.
type SeriesKey = (&'static str, u16, u16);

/// Latency and tokens of one (api, provider, model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Series {
    pub tokens: [u64; 5],
    pub duration: Hist,
    pub added: Hist,
    pub ttfb: Hist,
    pub ttft: Hist,
    pub per_token: Hist,
}

impl Default for Series {
    fn default() -> Series {
        Series {
            tokens: [0; 5],
            duration: Hist::new(DURATION_US),
            added: Hist::new(ADDED_US),
            ttfb: Hist::new(DURATION_US),
            ttft: Hist::new(DURATION_US),
            per_token: Hist::new(PER_TOKEN_US),
        }
    }
}

impl Series {
    fn add(&mut self, o: &Series) {
        for (a, b) in self.tokens.iter_mut().zip(o.tokens) {
            *a += b;
        }
        self.duration.add(&o.duration);
        self.added.add(&o.added);
        self.ttfb.add(&o.ttfb);
        self.ttft.add(&o.ttft);
        self.per_token.add(&o.per_token);
    }
}

/// Label values interned to small ids, up to a bound; id 0 is `none`, id 1 is `other`.
#[derive(Debug, Clone)]
struct Interner {
    ids: HashMap<Arc<str>, u16>,
    names: Vec<Arc<str>>,
    cap: usize,
}

impl Interner {
    fn new(cap: usize) -> Interner {
        Interner {
            ids: HashMap::new(),
            names: vec![Arc::from(NONE), Arc::from(OTHER)],
            cap,
        }
    }

    fn id(&mut self, v: Option<&str>) -> u16 {
        let Some(v) = v else { return 0 };
        if let Some(&id) = self.ids.get(v) {
            return id;
        }
        if self.ids.len() >= self.cap {
            return 1;
        }
        let id = u16::try_from(self.names.len()).unwrap_or(1);
        let name: Arc<str> = Arc::from(v);
        self.names.push(Arc::clone(&name));
        self.ids.insert(name, id);
        id
    }

    fn name(&self, id: u16) -> &str {
        self.names.get(usize::from(id)).map_or(OTHER, |n| n)
    }
}

/// The status class label: `2xx` .. `5xx`.
pub fn status_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        _ => "5xx",
    }
}

/// One core's counts. The core writes its own; a copy is what it publishes.
#[derive(Debug, Clone)]
pub struct CoreCounts {
    providers: Interner,
    models: Interner,
    groups: Interner,
    /// (api, provider, model, outcome, status class) -> requests.
    requests: HashMap<(&'static str, u16, u16, &'static str, &'static str), u64>,
    series: HashMap<SeriesKey, Series>,
    /// (provider, model, group) -> (list, effective) pico-USD.
    cost: HashMap<(u16, u16, u16), (i128, i128)>,
    /// Cross-core messages admissions waited for.
    pub budget_asks: u64,
    /// Connection handoffs as the core counted them: owner_local, owner_remote, handed_off, adopted, failed.
    pub handoff: [u64; 5],
}

impl Default for CoreCounts {
    fn default() -> CoreCounts {
        CoreCounts {
            providers: Interner::new(MAX_PROVIDERS),
            models: Interner::new(MAX_MODELS),
            groups: Interner::new(MAX_GROUPS),
            requests: HashMap::new(),
            series: HashMap::new(),
            cost: HashMap::new(),
            budget_asks: 0,
            handoff: [0; 5],
        }
    }
}

impl CoreCounts {
    /// Adds one finished request.
    pub fn record(&mut self, s: &Sample<'_>) {
        let p = self.providers.id(s.provider);
        let m = self.models.id(s.model);
        *self
            .requests
            .entry((s.api, p, m, s.outcome, status_class(s.status)))
            .or_insert(0) += 1;
        self.budget_asks += u64::from(s.budget_asks);
        if s.provider.is_none() {
            // Never reached a provider: counted, with no latency or usage series.
            return;
        }
        let series = self.series.entry((s.api, p, m)).or_default();
        let total = micros(s.total);
        series.duration.observe_us(total);
        if let Some(a) = s.added {
            series.added.observe_us(micros(a));
        }
        if let Some(t) = s.ttfb {
            let t = micros(t);
            series.ttfb.observe_us(t);
            if s.stream {
                series.ttft.observe_us(t);
            }
        }
        if let Some(tokens) = s.tokens {
            for (a, b) in series.tokens.iter_mut().zip(tokens) {
                *a += b;
            }
            // Time per output token after the first (OpenTelemetry's definition), streams only.
            let output = tokens[1];
            if let (true, Some(t), true) = (s.stream, s.ttfb, output > 1) {
                let after = total.saturating_sub(micros(t));
                series.per_token.observe_us(after / (output - 1));
            }
        }
        if let Some((list, effective)) = s.cost {
            let g = self.groups.id(s.group);
            let c = self.cost.entry((p, m, g)).or_insert((0, 0));
            c.0 += list;
            c.1 += effective;
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Where a core publishes its counts and the scrape reads them.
pub type Slot = Arc<ArcSwapOption<CoreCounts>>;

/// A core's metrics: its counts (core-local) and its publication slot.
#[derive(Debug)]
pub struct CoreMetrics {
    counts: RefCell<CoreCounts>,
    dirty: Cell<bool>,
    slot: Slot,
}

impl CoreMetrics {
    pub fn new(slot: Slot) -> CoreMetrics {
        CoreMetrics {
            counts: RefCell::new(CoreCounts::default()),
            dirty: Cell::new(false),
            slot,
        }
    }

    /// Adds one finished request (the core's own state; nothing shared).
    pub fn record(&self, s: &Sample<'_>) {
        self.counts.borrow_mut().record(s);
        self.dirty.set(true);
    }

    /// Publishes a copy of the counts when something changed since the last one (the core's 50 ms tick),
    /// with the handoff counts as they are now; `force` publishes anyway (at shutdown).
    pub fn publish(&self, handoff: [u64; 5], force: bool) {
        let mut c = self.counts.borrow_mut();
        if c.handoff != handoff {
            c.handoff = handoff;
            self.dirty.set(true);
        }
        if !self.dirty.get() && !force {
            return;
        }
        self.dirty.set(false);
        self.slot.store(Some(Arc::new(c.clone())));
    }
}

/// Request counts keyed by (api, provider, model, outcome, status class).
pub type RequestKey = (String, String, String, &'static str, &'static str);

/// Every core's counts added up, keyed by label values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    pub requests: BTreeMap<RequestKey, u64>,
    /// (api, provider, model) -> latency and tokens.
    pub series: BTreeMap<(String, String, String), Series>,
    /// (provider, model, group) -> (list, effective) pico-USD.
    pub cost: BTreeMap<(String, String, String), (i128, i128)>,
    pub budget_asks: u64,
    pub handoff: [u64; 5],
    /// How many cores had published counts.
    pub cores_reporting: usize,
}

/// Adds up the cores' published counts (the scrape's side; never on a core).
pub fn merge<'a>(cores: impl IntoIterator<Item = &'a CoreCounts>) -> Merged {
    let mut out = Merged::default();
    for c in cores {
        out.cores_reporting += 1;
        for (&(api, p, m, outcome, class), n) in &c.requests {
            let k = (
                api.to_owned(),
                c.providers.name(p).to_owned(),
                c.models.name(m).to_owned(),
                outcome,
                class,
            );
            *out.requests.entry(k).or_insert(0) += n;
        }
        for (&(api, p, m), s) in &c.series {
            let k = (
                api.to_owned(),
                c.providers.name(p).to_owned(),
                c.models.name(m).to_owned(),
            );
            out.series.entry(k).or_default().add(s);
        }
        for (&(p, m, g), &(list, eff)) in &c.cost {
            let k = (
                c.providers.name(p).to_owned(),
                c.models.name(m).to_owned(),
                c.groups.name(g).to_owned(),
            );
            let e = out.cost.entry(k).or_insert((0, 0));
            e.0 += list;
            e.1 += eff;
        }
        out.budget_asks += c.budget_asks;
        for (a, b) in out.handoff.iter_mut().zip(c.handoff) {
            *a += b;
        }
    }
    out
}

/// Loads every slot and merges what the cores published.
pub fn merge_slots(slots: &[Slot]) -> Merged {
    let loaded: Vec<Arc<CoreCounts>> = slots.iter().filter_map(|s| s.load_full()).collect();
    merge(loaded.iter().map(|c| c.as_ref()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn sample<'a>(provider: &'a str, model: &'a str, group: Option<&'a str>) -> Sample<'a> {
        Sample {
            api: "openai",
            provider: Some(provider),
            model: Some(model),
            group,
            outcome: "complete",
            status: 200,
            stream: true,
            total: Duration::from_millis(1_200),
            added: Some(Duration::from_micros(80)),
            ttfb: Some(Duration::from_millis(200)),
            tokens: Some([10, 11, 2, 0, 3]),
            cost: Some((1_000, 900)),
            budget_asks: 1,
        }
    }

    #[test]
    fn cores_add_up_under_their_own_ids() {
        let mut a = CoreCounts::default();
        let mut b = CoreCounts::default();
        // Different first-seen orders give different ids on each core; the merge is by name.
        a.record(&sample("openai", "gpt-4o", Some("eng")));
        a.record(&sample("anthropic", "claude", None));
        b.record(&sample("anthropic", "claude", Some("eng")));
        b.record(&sample("openai", "gpt-4o", Some("eng")));
        b.record(&Sample {
            api: "none",
            outcome: "rejected",
            status: 400,
            ..Default::default()
        });
        b.handoff = [1, 2, 3, 4, 5];
        let m = merge([&a, &b]);
        assert_eq!(m.cores_reporting, 2);
        let k = |api: &str, p: &str, model: &str, o: &'static str, c: &'static str| {
            (api.to_owned(), p.to_owned(), model.to_owned(), o, c)
        };
        assert_eq!(
            m.requests[&k("openai", "openai", "gpt-4o", "complete", "2xx")],
            2
        );
        assert_eq!(
            m.requests[&k("openai", "anthropic", "claude", "complete", "2xx")],
            2
        );
        assert_eq!(m.requests[&k("none", "none", "none", "rejected", "4xx")], 1);
        assert_eq!(m.requests.values().sum::<u64>(), 5);
        let s = &m.series[&("openai".into(), "openai".into(), "gpt-4o".into())];
        assert_eq!(s.tokens, [20, 22, 4, 0, 6]);
        assert_eq!(s.duration.count, 2);
        assert_eq!(s.duration.sum_us, 2_400_000);
        assert_eq!(s.ttft.count, 2);
        // (1.2 s - 0.2 s) over 10 tokens after the first: 100 ms each.
        assert_eq!(s.per_token.sum_us, 200_000);
        assert_eq!(
            m.cost[&("openai".into(), "gpt-4o".into(), "eng".into())],
            (2_000, 1_800)
        );
        assert_eq!(
            m.cost[&("anthropic".into(), "claude".into(), "none".into())],
            (1_000, 900)
        );
        assert_eq!(m.budget_asks, 4);
        assert_eq!(m.handoff, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn labels_past_the_bound_fold_into_other() {
        let mut c = CoreCounts::default();
        let names: Vec<String> = (0..MAX_MODELS + 10).map(|i| format!("m{i}")).collect();
        for n in &names {
            c.record(&sample("p", n, None));
        }
        let m = merge([&c]);
        let models: std::collections::BTreeSet<&str> =
            m.requests.keys().map(|k| k.2.as_str()).collect();
        assert_eq!(models.len(), MAX_MODELS + 1);
        assert!(models.contains(OTHER));
        let other = (
            "openai".to_owned(),
            "p".to_owned(),
            OTHER.to_owned(),
            "complete",
            "2xx",
        );
        assert_eq!(m.requests[&other], 10);
        // Nothing is lost: every request and every pico-USD is still counted.
        assert_eq!(m.requests.values().sum::<u64>(), names.len() as u64);
        let cost: i128 = m.cost.values().map(|c| c.1).sum();
        assert_eq!(cost, 900 * names.len() as i128);
    }

    #[test]
    fn histogram_buckets_hold_each_observation_once() {
        let mut h = Hist::new(ADDED_US);
        for us in [1, 25, 26, 100_000, 100_001, u64::MAX] {
            h.observe_us(us);
        }
        assert_eq!(h.count, 6);
        assert_eq!(h.counts.iter().sum::<u64>(), 6);
        assert_eq!(h.counts[0], 2); // <= 25
        assert_eq!(h.counts[1], 1); // <= 50
        assert_eq!(h.counts[ADDED_US.len() - 1], 1); // <= 100 ms
        assert_eq!(h.counts[ADDED_US.len()], 2); // +Inf
    }

    #[test]
    fn a_core_publishes_only_what_changed_and_the_scrape_merges_slots() {
        let slots: Vec<Slot> = (0..2).map(|_| Slot::default()).collect();
        let cores: Vec<CoreMetrics> = slots
            .iter()
            .map(|s| CoreMetrics::new(Arc::clone(s)))
            .collect();
        assert_eq!(merge_slots(&slots).cores_reporting, 0);
        cores[0].record(&sample("openai", "gpt-4o", None));
        cores[0].publish([0; 5], false);
        cores[1].publish([0; 5], false); // nothing changed: nothing published
        let m = merge_slots(&slots);
        assert_eq!(m.cores_reporting, 1);
        assert_eq!(m.requests.values().sum::<u64>(), 1);
        cores[1].record(&sample("openai", "gpt-4o", None));
        cores[1].publish([0, 0, 1, 0, 0], false);
        let m = merge_slots(&slots);
        assert_eq!(m.requests.values().sum::<u64>(), 2);
        assert_eq!(m.handoff, [0, 0, 1, 0, 0]);
    }
}
