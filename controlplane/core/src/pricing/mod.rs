//! Prices: the shipped list price sheet, an operator's negotiated overrides, and the compiled [`PriceBook`]
//! the data plane asks "what does this request cost?".
//!
//! Owns:
//! - the list price sheet format (`prices/list.toml`, shipped as data: [`RawPriceSheet`] → [`PriceSheet`]),
//!   with price history: several entries for one model with different `effective_from` dates, the one in
//!   effect on a day being the latest `effective_from` on or before it;
//! - the `[pricing]` section of the gateway config ([`RawPricing`] → [`PricingConfig`]): an optional
//!   `fallback` price for models the sheet lacks, and `[[pricing.overrides]]` with negotiated terms;
//! - the compiled, immutable [`PriceBook`] and its two hot-path calls, [`PriceBook::price_at`] and
//!   [`PriceBook::cost`].
//!
//! Billing rules, in one place:
//! - **Exactness.** Prices are integers of pico-USD per token ([`TokenPrice`]), so tokens × price is exact.
//!   A request's list cost is the sum over its five token classes (see [`Usage`]) of tokens × that class's
//!   price. Absolute negotiated prices are exact the same way.
//! - **Rounding (the only one).** A percentage discount is applied once per request, to the request's list
//!   cost: `effective = round_half_up(list × (100 % − discount))` to the pico-USD. Nothing else rounds.
//! - **Long context.** When a model has a `long_context` tier and the request's total input tokens
//!   (uncached + cache reads + cache writes) are strictly above `above_input_tokens`, *every* token of the
//!   request, output included, is priced at the tier's prices. That is how Anthropic bills its 1M-context
//!   models; exactly at the threshold the base prices apply.
//! - **Absent cache prices.** A tier without `cached_input` / `cache_write_5m` / `cache_write_1h` bills
//!   those tokens at its `input` price (no discount offered). Anthropic entries must state all three.
//! - **Negotiated terms.** An override is in effect on days `effective_from <= day < effective_until`
//!   (UTC dates). A model override beats a provider-wide one; among several of the same kind in effect,
//!   the latest `effective_from` wins. Terms are either a percentage discount off the list cost, or
//!   absolute prices that replace the list price. A model override naming an alias applies to the model.
//! - **Unpriced models.** A model not in the sheet on that day is priced at `pricing.fallback` if set
//!   (negotiated terms still apply); else, if a model override with absolute prices is in effect, at
//!   those; else [`PriceBook::price_at`] returns [`Unpriced`], naming the provider and model, and the data
//!   plane refuses the request.
//!
//! Fails: loading returns a [`ConfigError`] listing every problem, each naming the file, the field
//! (`models[3].input`, `pricing.overrides[0].effective_until`) and the reason, with the entry's
//! provider/model in the reason.
//! Cost: loading and compiling run at start-up and on reload. [`PriceBook::price_at`] is two hash
//! lookups by `&str` and a binary search, and [`PriceBook::cost`] is integer arithmetic; neither
//! allocates (only the [`Unpriced`] error does) and no floats are used anywhere.

pub mod money;
pub mod usage;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use jiff::civil::Date;
use serde::{Deserialize, Serialize};

use crate::domain::ProviderKind;
use crate::issues::{toml_issue, ConfigError, ConfigIssue, Issues};
use crate::pricing::money::{Money, Percent, TokenPrice};
use crate::pricing::usage::Usage;

/// The list price sheet shipped with Tollgate.
pub const BUILTIN_SHEET: &str = include_str!("../../prices/list.toml");

/// How the shipped sheet is named in errors.
pub const BUILTIN_SHEET_NAME: &str = "<built-in>/prices/list.toml";

// ---------------------------------------------------------------------------------------------------------
// Raw forms: exactly what the files say. Prices are decimal strings in USD per 1M tokens.
// ---------------------------------------------------------------------------------------------------------

/// A list price sheet file: `[[models]]` entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPriceSheet {
    #[serde(default)]
    pub models: Vec<RawSheetEntry>,
}

/// `[[models]]`: one model's list prices from one date on.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSheetEntry {
    /// `"openai"` or `"anthropic"`.
    pub provider: Option<String>,
    /// The exact model name clients send.
    pub model: Option<String>,
    /// Other exact names billed the same (dated snapshots).
    #[serde(default)]
    pub aliases: Vec<String>,
    /// `"YYYY-MM-DD"` (UTC): the first day these prices apply.
    pub effective_from: Option<String>,
    pub input: Option<String>,
    pub cached_input: Option<String>,
    pub cache_write_5m: Option<String>,
    pub cache_write_1h: Option<String>,
    pub output: Option<String>,
    pub long_context: Option<RawLongContext>,
    /// The model's context window in tokens (input and output together): the most input one request can
    /// make the provider bill, whatever the body shows (the data plane reserves it for input a request only
    /// refers to, e.g. a Responses `previous_response_id`).
    pub context_window: Option<u64>,
    /// Where the prices come from: page title and the date they were checked.
    pub source: Option<String>,
}

/// `long_context = { above_input_tokens = 200000, input = "6", output = "22.50", ... }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RawLongContext {
    pub above_input_tokens: Option<u64>,
    pub input: Option<String>,
    pub cached_input: Option<String>,
    pub cache_write_5m: Option<String>,
    pub cache_write_1h: Option<String>,
    pub output: Option<String>,
}

/// The gateway config's `[pricing]` section. The config loader embeds this and hands it to
/// [`PricingConfig::from_raw`] or [`PriceBook::from_files`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    /// A price sheet file to use instead of the one shipped in the binary (same format as
    /// `controlplane/core/prices/list.toml`), so prices can be updated without a rebuild.
    pub sheet: Option<std::path::PathBuf>,
    /// Prices for models the sheet does not list; absent means such models are refused.
    pub fallback: Option<RawPrices>,
    #[serde(default)]
    pub overrides: Vec<RawOverride>,
}

/// A set of prices without provider, model or dates (`pricing.fallback`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrices {
    pub input: Option<String>,
    pub cached_input: Option<String>,
    pub cache_write_5m: Option<String>,
    pub cache_write_1h: Option<String>,
    pub output: Option<String>,
    pub long_context: Option<RawLongContext>,
}

/// `[[pricing.overrides]]`: negotiated terms for a provider, or for one model of it.
///
/// Exactly one of `discount_percent` or the absolute prices (`input`, `output`, ...) must be given.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RawOverride {
    /// Names the override for the control plane (`/admin/v1/price-overrides/NAME`); optional in the file,
    /// where a named override is owned by the file.
    pub name: Option<String>,
    pub provider: Option<String>,
    /// Absent: the terms apply to every model of the provider.
    pub model: Option<String>,
    /// A discount off the list cost, `"12.5"` meaning 12.5 %, between 0 and 100.
    pub discount_percent: Option<String>,
    pub input: Option<String>,
    pub cached_input: Option<String>,
    pub cache_write_5m: Option<String>,
    pub cache_write_1h: Option<String>,
    pub output: Option<String>,
    pub long_context: Option<RawLongContext>,
    /// `"YYYY-MM-DD"` (UTC), first day in effect.
    pub effective_from: Option<String>,
    /// `"YYYY-MM-DD"` (UTC), first day no longer in effect (exclusive); absent means open-ended.
    pub effective_until: Option<String>,
    /// Free text, e.g. the contract reference.
    pub note: Option<String>,
}

// ---------------------------------------------------------------------------------------------------------
// Typed forms.
// ---------------------------------------------------------------------------------------------------------

/// Per-token prices for each token class of a [`Usage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rates {
    pub input: TokenPrice,
    pub cached_input: TokenPrice,
    pub cache_write_5m: TokenPrice,
    pub cache_write_1h: TokenPrice,
    pub output: TokenPrice,
}

impl Rates {
    /// Exact cost of `usage` at these rates. Cannot overflow: each price is at most
    /// [`crate::pricing::money::MAX_PICO_PER_TOKEN`], so five `u64` products sum to below 1e32.
    pub fn cost(&self, u: &Usage) -> Money {
        Money::from_pico(
            self.input.times(u.input_tokens).pico()
                + self.cached_input.times(u.cached_input_tokens).pico()
                + self.cache_write_5m.times(u.cache_write_5m_tokens).pico()
                + self.cache_write_1h.times(u.cache_write_1h_tokens).pico()
                + self.output.times(u.output_tokens).pico(),
        )
    }
}

/// A long-context price tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LongContext {
    /// The tier applies when total input tokens are strictly above this.
    pub above_input_tokens: u64,
    pub rates: Rates,
}

/// One model's prices: base rates and an optional long-context tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelPrice {
    pub base: Rates,
    pub long_context: Option<LongContext>,
}

impl ModelPrice {
    /// The rates that apply to `usage`: the long-context tier's when total input is above its threshold.
    pub fn rates_for(&self, usage: &Usage) -> &Rates {
        match &self.long_context {
            Some(lc) if usage.total_input_tokens() > lc.above_input_tokens => &lc.rates,
            _ => &self.base,
        }
    }

    /// Exact cost of `usage` at these prices.
    pub fn cost(&self, usage: &Usage) -> Money {
        self.rates_for(usage).cost(usage)
    }
}

/// One validated `[[models]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SheetEntry {
    pub provider: ProviderKind,
    pub model: String,
    pub aliases: Vec<String>,
    pub effective_from: Date,
    pub price: ModelPrice,
    /// The model's context window in tokens, when the sheet gives it.
    pub context_window: Option<u64>,
    pub source: String,
}

/// A validated list price sheet.
#[derive(Debug, Clone)]
pub struct PriceSheet {
    pub file: PathBuf,
    pub entries: Vec<SheetEntry>,
}

/// Negotiated terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Terms {
    /// A percentage off the request's list cost (rounded half up to the pico-USD, once per request).
    Discount(Percent),
    /// Absolute prices replacing the list prices.
    Prices(ModelPrice),
}

/// One validated `[[pricing.overrides]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Override {
    pub provider: ProviderKind,
    /// `None`: provider-wide.
    pub model: Option<String>,
    pub terms: Terms,
    pub effective_from: Date,
    /// Exclusive.
    pub effective_until: Option<Date>,
    pub note: Option<String>,
}

impl Override {
    /// Whether these terms apply on the UTC day `day`.
    pub fn in_effect(&self, day: Date) -> bool {
        self.effective_from <= day && self.effective_until.is_none_or(|u| day < u)
    }
}

/// The validated `[pricing]` section.
#[derive(Debug, Clone, Default)]
pub struct PricingConfig {
    pub fallback: Option<ModelPrice>,
    pub overrides: Vec<Override>,
}

/// Where a quote's list price came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ListSource {
    /// The price sheet entry in effect since this date.
    Sheet { effective_from: Date },
    /// `pricing.fallback`: the model is not in the sheet.
    Fallback,
    /// The model is not in the sheet and has no fallback; its model override's absolute prices stand in.
    Override,
}

/// The prices for one request: the list price and the negotiated terms in effect, if any.
/// `Copy`, built without allocating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Quote {
    pub list: ModelPrice,
    pub list_source: ListSource,
    /// `None`: the effective price is the list price.
    pub terms: Option<Terms>,
}

impl Quote {
    /// The list and effective (negotiated) cost of `usage`; see the module docs for the rules.
    pub fn cost(&self, usage: &Usage) -> Cost {
        let list = self.list.cost(usage);
        let effective = match self.terms {
            None => list,
            Some(Terms::Discount(d)) => apply_discount(list, d),
            Some(Terms::Prices(p)) => p.cost(usage),
        };
        Cost { list, effective }
    }
}

/// What a request cost, at list price and at the negotiated (effective) price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Cost {
    pub list: Money,
    pub effective: Money,
}

/// `round_half_up(list × (100 % − discount))`, exact for any non-negative `list` (split into a quotient
/// and a remainder of 1e6 so the product cannot overflow).
fn apply_discount(list: Money, discount: Percent) -> Money {
    const WHOLE: i128 = Percent::WHOLE_PPM as i128;
    let keep = WHOLE - i128::from(discount.ppm());
    let l = list.pico();
    let (q, r) = (l.div_euclid(WHOLE), l.rem_euclid(WHOLE));
    Money::from_pico(q * keep + (r * keep + WHOLE / 2) / WHOLE)
}

/// No price for a model on a day, and no fallback.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no price for {provider} model {model:?} on {date}: add it to the price sheet or a [[pricing.overrides]] entry, or set [pricing.fallback]")]
pub struct Unpriced {
    pub provider: ProviderKind,
    pub model: String,
    pub date: Date,
}

// ---------------------------------------------------------------------------------------------------------
// Validation.
// ---------------------------------------------------------------------------------------------------------

fn provider_kind(
    is: &mut Issues<'_>,
    field: String,
    label: &str,
    v: Option<&str>,
) -> Option<ProviderKind> {
    match v {
        Some("openai") => Some(ProviderKind::OpenAi),
        Some("anthropic") => Some(ProviderKind::Anthropic),
        Some(k) => {
            is.push(
                field,
                format!("{label}: {k:?} is not one of \"openai\", \"anthropic\""),
            );
            None
        }
        None => {
            is.push(
                field,
                format!("{label}: is required (\"openai\" or \"anthropic\")"),
            );
            None
        }
    }
}

fn valid_model_name(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 256
        && !m
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"')
}

/// A strict `YYYY-MM-DD` calendar date.
fn date(
    is: &mut Issues<'_>,
    field: String,
    label: &str,
    v: Option<&str>,
    required: bool,
) -> Option<Date> {
    let Some(s) = v else {
        if required {
            is.push(field, format!("{label}: is required (\"YYYY-MM-DD\")"));
        }
        return None;
    };
    let b = s.as_bytes();
    let shape = b.len() == 10
        && b.iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        });
    match s.parse::<Date>() {
        Ok(d) if shape => Some(d),
        _ => {
            is.push(
                field,
                format!("{label}: {s:?} is not a calendar date written YYYY-MM-DD"),
            );
            None
        }
    }
}

fn price(is: &mut Issues<'_>, field: String, label: &str, v: Option<&str>) -> Option<TokenPrice> {
    let s = v?;
    match TokenPrice::parse_per_million(s) {
        Ok(p) => Some(p),
        Err(e) => {
            is.push(field, format!("{label}: USD per 1M tokens {e}"));
            None
        }
    }
}

/// The five prices of a tier. `input` and `output` are required; the cache prices are required for
/// Anthropic and otherwise default to `input`. Returns `None` (with issues pushed) when invalid.
#[allow(clippy::too_many_arguments)]
fn rates(
    is: &mut Issues<'_>,
    at: &dyn Fn(&str) -> String,
    label: &str,
    provider: Option<ProviderKind>,
    input: Option<&str>,
    cached_input: Option<&str>,
    cache_write_5m: Option<&str>,
    cache_write_1h: Option<&str>,
    output: Option<&str>,
) -> Option<Rates> {
    let before = is.list.len();
    for (name, v) in [("input", input), ("output", output)] {
        if v.is_none() {
            is.push(at(name), format!("{label}: is required"));
        }
    }
    if provider == Some(ProviderKind::Anthropic) {
        for (name, v) in [
            ("cached_input", cached_input),
            ("cache_write_5m", cache_write_5m),
            ("cache_write_1h", cache_write_1h),
        ] {
            if v.is_none() {
                is.push(
                    at(name),
                    format!("{label}: is required for Anthropic models (prompt caching is billed separately)"),
                );
            }
        }
    }
    let input = price(is, at("input"), label, input);
    let output = price(is, at("output"), label, output);
    let cached = price(is, at("cached_input"), label, cached_input);
    let w5 = price(is, at("cache_write_5m"), label, cache_write_5m);
    let w1 = price(is, at("cache_write_1h"), label, cache_write_1h);
    if is.list.len() != before {
        return None;
    }
    let input = input?;
    Some(Rates {
        input,
        cached_input: cached.unwrap_or(input),
        cache_write_5m: w5.unwrap_or(input),
        cache_write_1h: w1.unwrap_or(input),
        output: output?,
    })
}

#[allow(clippy::too_many_arguments)]
fn model_price(
    is: &mut Issues<'_>,
    at: &dyn Fn(&str) -> String,
    label: &str,
    provider: Option<ProviderKind>,
    input: Option<&str>,
    cached_input: Option<&str>,
    cache_write_5m: Option<&str>,
    cache_write_1h: Option<&str>,
    output: Option<&str>,
    long_context: Option<&RawLongContext>,
) -> Option<ModelPrice> {
    let base = rates(
        is,
        at,
        label,
        provider,
        input,
        cached_input,
        cache_write_5m,
        cache_write_1h,
        output,
    );
    let long_context = match long_context {
        None => Some(None),
        Some(lc) => {
            let lat = |f: &str| at(&format!("long_context.{f}"));
            let above = match lc.above_input_tokens {
                Some(n) if n > 0 => Some(n),
                Some(_) => {
                    is.push(
                        lat("above_input_tokens"),
                        format!("{label}: must be more than 0"),
                    );
                    None
                }
                None => {
                    is.push(lat("above_input_tokens"), format!("{label}: is required"));
                    None
                }
            };
            let r = rates(
                is,
                &lat,
                label,
                provider,
                lc.input.as_deref(),
                lc.cached_input.as_deref(),
                lc.cache_write_5m.as_deref(),
                lc.cache_write_1h.as_deref(),
                lc.output.as_deref(),
            );
            match (above, r) {
                (Some(above_input_tokens), Some(rates)) => Some(Some(LongContext {
                    above_input_tokens,
                    rates,
                })),
                _ => None,
            }
        }
    };
    Some(ModelPrice {
        base: base?,
        long_context: long_context?,
    })
}

impl PriceSheet {
    /// Reads, parses and validates a sheet file.
    pub fn load(path: &Path) -> Result<PriceSheet, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            issues: vec![ConfigIssue {
                file: path.to_owned(),
                field: String::new(),
                reason: e.to_string(),
            }],
        })?;
        PriceSheet::parse(path, &text)
    }

    /// The sheet shipped with Tollgate.
    pub fn builtin() -> Result<PriceSheet, ConfigError> {
        PriceSheet::parse(Path::new(BUILTIN_SHEET_NAME), BUILTIN_SHEET)
    }

    /// Parses and validates `text`, naming `path` in errors; every problem is reported.
    pub fn parse(path: &Path, text: &str) -> Result<PriceSheet, ConfigError> {
        let raw: RawPriceSheet = toml::from_str(text).map_err(|e| ConfigError {
            issues: vec![toml_issue(path, text, &e)],
        })?;
        PriceSheet::validate(path, raw)
    }

    /// Validates a parsed sheet.
    pub fn validate(path: &Path, raw: RawPriceSheet) -> Result<PriceSheet, ConfigError> {
        let mut is = Issues {
            file: path,
            list: Vec::new(),
        };
        let mut entries: Vec<SheetEntry> = Vec::new();
        // The `models[i]` index of each accepted entry, for messages.
        let mut raw_index: Vec<usize> = Vec::new();
        for (i, e) in raw.models.into_iter().enumerate() {
            let at = |f: &str| format!("models[{i}].{f}");
            let label = format!(
                "{}/{}",
                e.provider.as_deref().unwrap_or("?"),
                e.model.as_deref().unwrap_or("?")
            );
            let label = label.as_str();
            let provider = provider_kind(&mut is, at("provider"), label, e.provider.as_deref());
            let model = match e.model {
                Some(m) if valid_model_name(&m) => Some(m),
                Some(m) => {
                    is.push(
                        at("model"),
                        format!("{label}: {m:?} must be a non-empty model name without spaces or quotes"),
                    );
                    None
                }
                None => {
                    is.push(at("model"), format!("{label}: is required"));
                    None
                }
            };
            for (j, a) in e.aliases.iter().enumerate() {
                if !valid_model_name(a) {
                    is.push(
                        at(&format!("aliases[{j}]")),
                        format!("{label}: {a:?} must be a non-empty model name without spaces or quotes"),
                    );
                } else if model.as_deref() == Some(a.as_str()) || e.aliases[..j].contains(a) {
                    is.push(
                        at(&format!("aliases[{j}]")),
                        format!("{label}: {a:?} is listed twice"),
                    );
                }
            }
            let from = date(
                &mut is,
                at("effective_from"),
                label,
                e.effective_from.as_deref(),
                true,
            );
            let source = match e.source {
                Some(s) if !s.trim().is_empty() => Some(s),
                _ => {
                    is.push(
                        at("source"),
                        format!("{label}: is required: the page the prices come from and the date checked"),
                    );
                    None
                }
            };
            let price = model_price(
                &mut is,
                &at,
                label,
                provider,
                e.input.as_deref(),
                e.cached_input.as_deref(),
                e.cache_write_5m.as_deref(),
                e.cache_write_1h.as_deref(),
                e.output.as_deref(),
                e.long_context.as_ref(),
            );
            let (Some(provider), Some(model), Some(effective_from), Some(source), Some(price)) =
                (provider, model, from, source, price)
            else {
                continue;
            };
            if let Some(j) = entries.iter().position(|o| {
                o.provider == provider && o.model == model && o.effective_from == effective_from
            }) {
                let j = raw_index.get(j).copied().unwrap_or(j);
                is.push(
                    at("effective_from"),
                    format!("{label}: models[{j}] already gives a price from {effective_from}"),
                );
                continue;
            }
            if e.context_window == Some(0) {
                is.push(
                    at("context_window"),
                    format!("{label}: must be a positive number of tokens"),
                );
                continue;
            }
            raw_index.push(i);
            entries.push(SheetEntry {
                provider,
                model,
                aliases: e.aliases,
                effective_from,
                price,
                context_window: e.context_window,
                source,
            });
        }

        // Names must resolve to one model: an alias may not be another model's name or alias.
        let mut owner: HashMap<(ProviderKind, &str), &str> = HashMap::new();
        for e in &entries {
            owner.insert((e.provider, e.model.as_str()), e.model.as_str());
        }
        for (e, i) in entries.iter().zip(&raw_index) {
            for a in &e.aliases {
                match owner.get(&(e.provider, a.as_str())) {
                    Some(m) if *m != e.model => is.push(
                        format!("models[{i}].aliases"),
                        format!(
                            "{}/{}: alias {a:?} already names {}/{m}",
                            e.provider, e.model, e.provider
                        ),
                    ),
                    _ => {
                        owner.insert((e.provider, a.as_str()), e.model.as_str());
                    }
                }
            }
        }

        if is.list.is_empty() {
            Ok(PriceSheet {
                file: path.to_owned(),
                entries,
            })
        } else {
            Err(ConfigError { issues: is.list })
        }
    }
}

impl PricingConfig {
    /// Validates the `[pricing]` section of the config file `path`; fields are named `pricing.…`.
    pub fn from_raw(path: &Path, raw: RawPricing) -> Result<PricingConfig, ConfigError> {
        let mut is = Issues {
            file: path,
            list: Vec::new(),
        };
        let fallback = raw.fallback.as_ref().and_then(|f| {
            let at = |n: &str| format!("pricing.fallback.{n}");
            model_price(
                &mut is,
                &at,
                "fallback",
                None,
                f.input.as_deref(),
                f.cached_input.as_deref(),
                f.cache_write_5m.as_deref(),
                f.cache_write_1h.as_deref(),
                f.output.as_deref(),
                f.long_context.as_ref(),
            )
        });
        let mut overrides: Vec<Override> = Vec::new();
        // The `pricing.overrides[i]` index of each accepted override, for messages.
        let mut raw_index: Vec<usize> = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, o) in raw.overrides.into_iter().enumerate() {
            let at = |f: &str| format!("pricing.overrides[{i}].{f}");
            if let Some(n) = &o.name {
                if n.is_empty() || n.len() > 128 || n.chars().any(|c| c.is_control()) {
                    is.push(
                        at("name"),
                        "must be 1 to 128 characters without control characters",
                    );
                } else if !names.insert(n.clone()) {
                    is.push(at("name"), format!("{n:?} names another override too"));
                }
            }
            let label = format!(
                "{}/{}",
                o.provider.as_deref().unwrap_or("?"),
                o.model.as_deref().unwrap_or("*")
            );
            let label = label.as_str();
            let provider = provider_kind(&mut is, at("provider"), label, o.provider.as_deref());
            if let Some(m) = &o.model {
                if !valid_model_name(m) {
                    is.push(
                        at("model"),
                        format!("{label}: {m:?} must be a non-empty model name without spaces or quotes"),
                    );
                }
            }
            let has_prices = o.input.is_some()
                || o.cached_input.is_some()
                || o.cache_write_5m.is_some()
                || o.cache_write_1h.is_some()
                || o.output.is_some()
                || o.long_context.is_some();
            let terms = match (&o.discount_percent, has_prices) {
                (Some(_), true) => {
                    is.push(
                        at("discount_percent"),
                        format!(
                            "{label}: give either discount_percent or absolute prices, not both"
                        ),
                    );
                    None
                }
                (None, false) => {
                    is.push(
                        at("discount_percent"),
                        format!("{label}: give either discount_percent or absolute prices (input, output, ...)"),
                    );
                    None
                }
                (Some(d), false) => match Percent::parse(d) {
                    Ok(p) => Some(Terms::Discount(p)),
                    Err(e) => {
                        is.push(at("discount_percent"), format!("{label}: percentage {e}"));
                        None
                    }
                },
                (None, true) => {
                    if o.model.is_none() {
                        is.push(
                            at("model"),
                            format!("{label}: absolute prices need a model; a provider-wide override takes discount_percent"),
                        );
                    }
                    model_price(
                        &mut is,
                        &at,
                        label,
                        provider,
                        o.input.as_deref(),
                        o.cached_input.as_deref(),
                        o.cache_write_5m.as_deref(),
                        o.cache_write_1h.as_deref(),
                        o.output.as_deref(),
                        o.long_context.as_ref(),
                    )
                    .map(Terms::Prices)
                }
            };
            let from = date(
                &mut is,
                at("effective_from"),
                label,
                o.effective_from.as_deref(),
                true,
            );
            let until = date(
                &mut is,
                at("effective_until"),
                label,
                o.effective_until.as_deref(),
                false,
            );
            if let (Some(f), Some(u)) = (from, until) {
                if u <= f {
                    is.push(
                        at("effective_until"),
                        format!("{label}: {u} is not after effective_from {f} (effective_until is exclusive)"),
                    );
                    continue;
                }
            }
            if o.effective_until.is_some() && until.is_none() {
                continue;
            }
            let (Some(provider), Some(terms), Some(effective_from)) = (provider, terms, from)
            else {
                continue;
            };
            if let Some(j) = overrides.iter().position(|x| {
                x.provider == provider && x.model == o.model && x.effective_from == effective_from
            }) {
                let j = raw_index.get(j).copied().unwrap_or(j);
                is.push(
                    at("effective_from"),
                    format!("{label}: pricing.overrides[{j}] already starts on {effective_from} for the same provider and model"),
                );
                continue;
            }
            raw_index.push(i);
            overrides.push(Override {
                provider,
                model: o.model,
                terms,
                effective_from,
                effective_until: until,
                note: o.note,
            });
        }
        if is.list.is_empty() {
            Ok(PricingConfig {
                fallback,
                overrides,
            })
        } else {
            Err(ConfigError { issues: is.list })
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// The compiled price book.
// ---------------------------------------------------------------------------------------------------------

/// One model's list price history, sorted by `effective_from`.
#[derive(Debug)]
struct History {
    /// The canonical name (the sheet entry's `model`); shared, so a request can keep it without copying.
    model: Arc<str>,
    entries: Vec<(Date, ModelPrice)>,
    /// The largest context window any of its entries gives.
    context_window: Option<u64>,
}

/// Overrides of one key (a provider, or a provider's model), sorted by `effective_from`.
type OverrideList = Vec<(Date, Option<Date>, Terms)>;

/// The immutable, compiled form of a sheet and the pricing config. Build once per (re)load and share
/// (e.g. behind an `Arc`/`ArcSwap`); every method takes `&self`.
#[derive(Debug)]
pub struct PriceBook {
    /// Per provider (indexed by [`provider_index`]): model name or alias → index into `histories`.
    names: [HashMap<Box<str>, usize>; 2],
    histories: Vec<History>,
    /// Per provider: canonical model name → its overrides.
    model_overrides: [HashMap<Box<str>, OverrideList>; 2],
    /// Per provider: provider-wide overrides.
    provider_overrides: [OverrideList; 2],
    fallback: Option<ModelPrice>,
}

fn provider_index(p: ProviderKind) -> usize {
    match p {
        ProviderKind::OpenAi => 0,
        ProviderKind::Anthropic => 1,
    }
}

/// The latest-starting override in effect on `day`.
fn in_effect(list: &OverrideList, day: Date) -> Option<Terms> {
    list.iter()
        .rev()
        .find(|(from, until, _)| *from <= day && until.is_none_or(|u| day < u))
        .map(|(_, _, t)| *t)
}

impl PriceBook {
    /// Compiles a validated sheet and pricing config. Override model names given as aliases are resolved
    /// to their model, so the terms apply under every name of it.
    pub fn new(sheet: &PriceSheet, pricing: &PricingConfig) -> PriceBook {
        let mut names: [HashMap<Box<str>, usize>; 2] = [HashMap::new(), HashMap::new()];
        let mut histories: Vec<History> = Vec::new();
        for e in &sheet.entries {
            let p = provider_index(e.provider);
            let h = match names[p].get(e.model.as_str()) {
                Some(&h) => h,
                None => {
                    histories.push(History {
                        model: e.model.as_str().into(),
                        entries: Vec::new(),
                        context_window: None,
                    });
                    names[p].insert(e.model.as_str().into(), histories.len() - 1);
                    histories.len() - 1
                }
            };
            if let Some(hist) = histories.get_mut(h) {
                hist.entries.push((e.effective_from, e.price));
                hist.context_window = hist.context_window.max(e.context_window);
            }
            for a in &e.aliases {
                names[p].entry(a.as_str().into()).or_insert(h);
            }
        }
        for h in &mut histories {
            h.entries.sort_by_key(|(d, _)| *d);
        }

        let mut model_overrides: [HashMap<Box<str>, OverrideList>; 2] =
            [HashMap::new(), HashMap::new()];
        let mut provider_overrides: [OverrideList; 2] = [Vec::new(), Vec::new()];
        for o in &pricing.overrides {
            let p = provider_index(o.provider);
            let item = (o.effective_from, o.effective_until, o.terms);
            match &o.model {
                None => provider_overrides[p].push(item),
                Some(m) => {
                    let canonical: Box<str> =
                        match names[p].get(m.as_str()).and_then(|&h| histories.get(h)) {
                            Some(h) => (*h.model).into(),
                            None => m.as_str().into(),
                        };
                    model_overrides[p].entry(canonical).or_default().push(item);
                }
            }
        }
        for list in provider_overrides
            .iter_mut()
            .chain(model_overrides.iter_mut().flat_map(|m| m.values_mut()))
        {
            list.sort_by_key(|(d, _, _)| *d);
        }

        PriceBook {
            names,
            histories,
            model_overrides,
            provider_overrides,
            fallback: pricing.fallback,
        }
    }

    /// The shipped sheet with no overrides and no fallback.
    pub fn builtin() -> Result<PriceBook, ConfigError> {
        Ok(PriceBook::new(
            &PriceSheet::builtin()?,
            &PricingConfig::default(),
        ))
    }

    /// The shipped sheet with the `[pricing]` section of the config file `config_path`.
    pub fn builtin_with(config_path: &Path, pricing: RawPricing) -> Result<PriceBook, ConfigError> {
        let sheet = PriceSheet::builtin();
        let pricing = PricingConfig::from_raw(config_path, pricing);
        combine(sheet, pricing)
    }

    /// A sheet read from `list_path` with the `[pricing]` section of the config file `config_path`.
    /// Problems in both are reported together.
    pub fn from_files(
        list_path: &Path,
        config_path: &Path,
        pricing: RawPricing,
    ) -> Result<PriceBook, ConfigError> {
        let sheet = PriceSheet::load(list_path);
        let pricing = PricingConfig::from_raw(config_path, pricing);
        combine(sheet, pricing)
    }

    /// The canonical name of `provider`'s model `model`: the sheet entry's `model` when `model` is it or
    /// one of its aliases (dated snapshots), `None` when the sheet does not list the name. One hash
    /// lookup; the name is shared, so keeping it is a reference count, not a copy.
    pub fn canonical(&self, provider: ProviderKind, model: &str) -> Option<&Arc<str>> {
        self.names[provider_index(provider)]
            .get(model)
            .and_then(|&h| self.histories.get(h))
            .map(|h| &h.model)
    }

    /// The context window (tokens) of `provider`'s model `model` (a name or an alias), when the sheet gives
    /// it: the most input one request to it can be billed for. One hash lookup.
    pub fn context_window(&self, provider: ProviderKind, model: &str) -> Option<u64> {
        self.names[provider_index(provider)]
            .get(model)
            .and_then(|&h| self.histories.get(h))
            .and_then(|h| h.context_window)
    }

    /// The canonical names of `provider`'s models in the sheet (every entry's `model`, not its aliases),
    /// sorted: what a glob route can serve, for `GET /v1/models`. Allocates the list; not on the hot path.
    pub fn models(&self, provider: ProviderKind) -> Vec<&Arc<str>> {
        let mut out: Vec<&Arc<str>> = self.names[provider_index(provider)]
            .iter()
            .filter_map(|(name, &h)| {
                self.histories
                    .get(h)
                    .filter(|h| *h.model == **name)
                    .map(|h| &h.model)
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The prices for a request to `provider`'s `model` on the UTC day `day`. Allocation-free except for
    /// the error.
    pub fn price_at(
        &self,
        provider: ProviderKind,
        model: &str,
        day: Date,
    ) -> Result<Quote, Unpriced> {
        let p = provider_index(provider);
        let history = self.names[p]
            .get(model)
            .and_then(|&h| self.histories.get(h));
        let canonical = history.map_or(model, |h| &*h.model);
        let listed = history.and_then(|h| {
            let n = h.entries.partition_point(|(from, _)| *from <= day);
            n.checked_sub(1).and_then(|i| h.entries.get(i))
        });
        let model_terms = self.model_overrides[p]
            .get(canonical)
            .and_then(|l| in_effect(l, day));
        let terms = model_terms.or_else(|| in_effect(&self.provider_overrides[p], day));
        let (list, list_source) = match (listed, self.fallback, model_terms) {
            (Some((from, price)), _, _) => (
                *price,
                ListSource::Sheet {
                    effective_from: *from,
                },
            ),
            (None, Some(fb), _) => (fb, ListSource::Fallback),
            (None, None, Some(Terms::Prices(p))) => (p, ListSource::Override),
            (None, None, _) => {
                return Err(Unpriced {
                    provider,
                    model: model.to_owned(),
                    date: day,
                })
            }
        };
        Ok(Quote {
            list,
            list_source,
            terms,
        })
    }

    /// [`PriceBook::price_at`] on the UTC date of `at`.
    pub fn price_at_timestamp(
        &self,
        provider: ProviderKind,
        model: &str,
        at: jiff::Timestamp,
    ) -> Result<Quote, Unpriced> {
        self.price_at(
            provider,
            model,
            jiff::tz::Offset::UTC.to_datetime(at).date(),
        )
    }

    /// The list and effective cost of `usage` under `quote`. Same as [`Quote::cost`].
    pub fn cost(&self, quote: &Quote, usage: &Usage) -> Cost {
        quote.cost(usage)
    }
}

fn combine(
    sheet: Result<PriceSheet, ConfigError>,
    pricing: Result<PricingConfig, ConfigError>,
) -> Result<PriceBook, ConfigError> {
    match (sheet, pricing) {
        (Ok(s), Ok(p)) => Ok(PriceBook::new(&s, &p)),
        (s, p) => {
            let mut issues = Vec::new();
            if let Err(e) = s {
                issues.extend(e.issues);
            }
            if let Err(e) = p {
                issues.extend(e.issues);
            }
            Err(ConfigError { issues })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::civil::date;

    const PICO: i128 = 1;
    const MICRO_USD: i128 = 1_000_000 * PICO;

    fn book(sheet: &str, pricing: &str) -> PriceBook {
        let sheet = PriceSheet::parse(Path::new("list.toml"), sheet).unwrap();
        let raw: RawPricing = toml::from_str(pricing).unwrap();
        let pricing = PricingConfig::from_raw(Path::new("tollgate.toml"), raw).unwrap();
        PriceBook::new(&sheet, &pricing)
    }

    fn builtin() -> PriceBook {
        PriceBook::builtin().unwrap()
    }

    fn builtin_with(pricing: &str) -> PriceBook {
        let raw: RawPricing = toml::from_str(pricing).unwrap();
        PriceBook::builtin_with(Path::new("tollgate.toml"), raw).unwrap()
    }

    fn sheet_errors(text: &str) -> Vec<ConfigIssue> {
        PriceSheet::parse(Path::new("list.toml"), text)
            .unwrap_err()
            .issues
    }

    fn pricing_errors(text: &str) -> Vec<ConfigIssue> {
        let raw: RawPricing = toml::from_str(text).unwrap();
        PricingConfig::from_raw(Path::new("tollgate.toml"), raw)
            .unwrap_err()
            .issues
    }

    const OAI: ProviderKind = ProviderKind::OpenAi;
    const ANT: ProviderKind = ProviderKind::Anthropic;

    #[test]
    fn shipped_sheet_loads_and_validates() {
        let sheet = PriceSheet::parse(Path::new("prices/list.toml"), BUILTIN_SHEET)
            .unwrap_or_else(|e| panic!("shipped sheet is invalid:\n{e}"));
        assert!(sheet.entries.len() >= 15);
        let b = builtin();
        let day = date(2026, 1, 15);
        for (p, m) in [
            (OAI, "gpt-4o"),
            (OAI, "gpt-4o-mini"),
            (OAI, "gpt-4.1"),
            (OAI, "gpt-4.1-mini"),
            (OAI, "gpt-4.1-nano"),
            (OAI, "o3"),
            (OAI, "o4-mini"),
            (OAI, "gpt-5"),
            (OAI, "gpt-5-mini"),
            (OAI, "gpt-5-nano"),
            (ANT, "claude-opus-4-1"),
            (ANT, "claude-opus-4-0"),
            (ANT, "claude-sonnet-4-5"),
            (ANT, "claude-sonnet-4-0"),
            (ANT, "claude-haiku-4-5"),
            (ANT, "claude-3-5-haiku-latest"),
            // Dated snapshots resolve through aliases.
            (OAI, "gpt-4o-mini-2024-07-18"),
            (ANT, "claude-sonnet-4-5-20250929"),
        ] {
            let q = b.price_at(p, m, day).unwrap_or_else(|e| panic!("{e}"));
            assert!(matches!(q.list_source, ListSource::Sheet { .. }), "{m}");
            assert_eq!(q.terms, None);
        }
        // The provider matters: an OpenAI name is not an Anthropic model.
        assert!(b.price_at(ANT, "gpt-4o", day).is_err());
        // The superseded gpt-4o snapshot is deliberately not an alias.
        assert!(b.price_at(OAI, "gpt-4o-2024-05-13", day).is_err());
    }

    #[test]
    fn canonical_names_resolve_aliases_per_provider() {
        let b = PriceBook::builtin().unwrap();
        let c = |p, m| b.canonical(p, m).map(|s| s.to_string());
        assert_eq!(c(OAI, "gpt-4o-2024-08-06").as_deref(), Some("gpt-4o"));
        assert_eq!(c(OAI, "gpt-4o").as_deref(), Some("gpt-4o"));
        assert_eq!(
            c(OAI, "gpt-4o-mini-2024-07-18").as_deref(),
            Some("gpt-4o-mini")
        );
        assert_eq!(c(OAI, "gpt-4o-2024-05-13"), None);
        assert_eq!(c(ANT, "gpt-4o"), None);
        assert_eq!(c(OAI, "no-such-model"), None);
        // The model list holds canonical names only, each once, per provider.
        let oai: Vec<&str> = b.models(OAI).into_iter().map(|m| &**m).collect();
        assert!(oai.contains(&"gpt-4o") && oai.contains(&"text-embedding-3-small"));
        assert!(!oai.contains(&"gpt-4o-2024-08-06"));
        assert!(oai.windows(2).all(|w| w[0] < w[1]), "{oai:?}");
        assert!(b.models(ANT).iter().all(|m| m.starts_with("claude-")));
    }

    #[test]
    fn openai_cost_with_cached_and_reasoning_tokens_is_exact() {
        let b = builtin();
        // gpt-4o-mini: input $0.15, cached $0.075, output $0.60 per 1M tokens
        //   = 150_000, 75_000, 600_000 pico-USD per token.
        // prompt 10_000 of which 4_000 cached; completion 2_000 of which 500 reasoning:
        //   6_000 × 150_000 = 900_000_000
        //   4_000 ×  75_000 = 300_000_000
        //   2_000 × 600_000 = 1_200_000_000 (reasoning is inside the 2_000, not billed again)
        //   total 2_400_000_000 pico = $0.0024
        let q = b.price_at(OAI, "gpt-4o-mini", date(2026, 1, 1)).unwrap();
        let u = Usage::from_openai(10_000, 4_000, 2_000, 500);
        let c = b.cost(&q, &u);
        assert_eq!(c.list, Money::from_pico(2_400_000_000));
        assert_eq!(c.effective, c.list);
        assert_eq!(c.list.to_string(), "$0.0024");

        // o4-mini, reasoning-heavy: 1_000 prompt, 5_000 completion incl. 4_000 reasoning.
        //   1_000 × 1_100_000 + 5_000 × 4_400_000 = 1_100_000_000 + 22_000_000_000 = $0.0231
        let q = b.price_at(OAI, "o4-mini", date(2026, 1, 1)).unwrap();
        let c = q.cost(&Usage::from_openai(1_000, 0, 5_000, 4_000));
        assert_eq!(c.list, Money::from_pico(23_100_000_000));
        assert_eq!(c.list.to_string(), "$0.0231");
    }

    #[test]
    fn anthropic_cost_with_5m_and_1h_writes_and_reads_is_exact() {
        let b = builtin();
        // claude-sonnet-4-5: input $3, 5m write $3.75, 1h write $6, cache hit $0.30, output $15 per 1M.
        //   input       1_000 ×  3_000_000 =  3_000_000_000
        //   5m writes   1_000 ×  3_750_000 =  3_750_000_000
        //   1h writes   2_000 ×  6_000_000 = 12_000_000_000
        //   reads      20_000 ×    300_000 =  6_000_000_000
        //   output        500 × 15_000_000 =  7_500_000_000
        //   total 32_250_000_000 pico = $0.03225 (total input 24_000: base tier)
        let q = b
            .price_at(ANT, "claude-sonnet-4-5", date(2026, 1, 1))
            .unwrap();
        let u = Usage::from_anthropic(1_000, 3_000, Some(1_000), Some(2_000), 20_000, 500);
        let c = q.cost(&u);
        assert_eq!(c.list, Money::from_pico(32_250_000_000));
        assert_eq!(c.list.to_string(), "$0.03225");

        // Without the split, all 3_000 writes are 5m: 3_000 × 3_750_000 = 11_250_000_000 replaces
        // 15_750_000_000, so the total is 27_750_000_000.
        let u = Usage::from_anthropic(1_000, 3_000, None, None, 20_000, 500);
        assert_eq!(q.cost(&u).list, Money::from_pico(27_750_000_000));
    }

    #[test]
    fn the_sheet_gives_context_windows_under_every_name() {
        let book = PriceBook::builtin().unwrap();
        assert_eq!(
            book.context_window(ProviderKind::OpenAi, "gpt-4o"),
            Some(128_000)
        );
        assert_eq!(
            book.context_window(ProviderKind::OpenAi, "gpt-5-2025-08-07"),
            Some(400_000)
        );
        assert_eq!(book.context_window(ProviderKind::OpenAi, "unknown"), None);
    }

    #[test]
    fn long_context_tier_applies_strictly_above_the_threshold_to_every_token() {
        let b = builtin();
        let q = b
            .price_at(ANT, "claude-sonnet-4-5", date(2026, 1, 1))
            .unwrap();
        // Exactly 200_000 input tokens: base prices.
        //   200_000 × 3_000_000 + 1_000 × 15_000_000 = 600_000_000_000 + 15_000_000_000 = $0.615
        let at = Usage::from_anthropic(200_000, 0, None, None, 0, 1_000);
        assert_eq!(q.cost(&at).list, Money::from_pico(615_000_000_000));
        // One above: everything, output included, at the tier ($6 / $22.50).
        //   200_001 × 6_000_000 + 1_000 × 22_500_000 = 1_200_006_000_000 + 22_500_000_000 = $1.222506
        let above = Usage::from_anthropic(200_001, 0, None, None, 0, 1_000);
        assert_eq!(q.cost(&above).list, Money::from_pico(1_222_506_000_000));
        assert_eq!(q.cost(&above).list.to_string(), "$1.222506");
        // Cache reads and writes count toward the threshold and are billed at the tier's cache prices.
        //   100 × 6_000_000 + 150_000 × 600_000 + 49_901 × 7_500_000 + 10 × 22_500_000
        //   = 600_000_000 + 90_000_000_000 + 374_257_500_000 + 225_000_000 = 465_082_500_000
        let mixed = Usage::from_anthropic(100, 49_901, None, None, 150_000, 10);
        assert_eq!(mixed.total_input_tokens(), 200_001);
        assert_eq!(q.cost(&mixed).list, Money::from_pico(465_082_500_000));
        // Haiku 4.5 has no tier: 300_000 tokens stay at $1.
        let h = b
            .price_at(ANT, "claude-haiku-4-5", date(2026, 1, 1))
            .unwrap();
        let big = Usage::from_anthropic(300_000, 0, None, None, 0, 0);
        assert_eq!(h.cost(&big).list, Money::from_pico(300_000 * MICRO_USD));
    }

    #[test]
    fn list_price_changes_over_time() {
        let b = builtin();
        let u = Usage::from_openai(1_000_000, 0, 1_000_000, 0);
        let cost_on = |d| b.price_at(OAI, "o3", d).map(|q| q.cost(&u).list);
        // Before o3 existed: unpriced.
        assert!(cost_on(date(2025, 4, 15)).is_err());
        // 1M in + 1M out: $10 + $40 at launch, $2 + $8 from 2025-06-10 on.
        assert_eq!(cost_on(date(2025, 4, 16)).unwrap().to_string(), "$50");
        assert_eq!(cost_on(date(2025, 6, 9)).unwrap().to_string(), "$50");
        assert_eq!(cost_on(date(2025, 6, 10)).unwrap().to_string(), "$10");
        assert_eq!(cost_on(date(2025, 6, 11)).unwrap().to_string(), "$10");
        let q = b.price_at(OAI, "o3-2025-04-16", date(2025, 6, 10)).unwrap();
        assert_eq!(
            q.list_source,
            ListSource::Sheet {
                effective_from: date(2025, 6, 10)
            }
        );
        // Timestamps are taken at their UTC date.
        let ts = |s: &str| s.parse::<jiff::Timestamp>().unwrap();
        let at = |s| {
            b.price_at_timestamp(OAI, "o3", ts(s))
                .unwrap()
                .cost(&u)
                .list
        };
        assert_eq!(at("2025-06-09T23:59:59Z").to_string(), "$50");
        assert_eq!(at("2025-06-10T00:00:00Z").to_string(), "$10");
        // 2025-06-10T01:00 in New York is 05:00 UTC the same day.
        assert_eq!(at("2025-06-10T01:00:00-04:00").to_string(), "$10");
    }

    const TINY: &str = r#"
        [[models]]
        provider = "openai"
        model = "tiny"
        aliases = ["tiny-2026-01-01"]
        effective_from = "2026-01-01"
        input = "0.000001"
        output = "0.000002"
        source = "test"

        [[models]]
        provider = "openai"
        model = "other"
        effective_from = "2026-01-01"
        input = "1"
        output = "1"
        source = "test"
    "#;

    #[test]
    fn discount_rounds_half_up_once_per_request() {
        let b = book(
            TINY,
            r#"
            [[overrides]]
            provider = "openai"
            discount_percent = "12.5"
            effective_from = "2026-01-01"
            "#,
        );
        let q = b.price_at(OAI, "tiny", date(2026, 2, 1)).unwrap();
        assert_eq!(
            q.terms,
            Some(Terms::Discount(Percent::parse("12.5").unwrap()))
        );
        // tiny: 1 pico per input token. 87.5 % of the list cost:
        let eff = |n| q.cost(&Usage::from_openai(n, 0, 0, 0));
        assert_eq!(eff(4).effective.pico(), 4); //  3.5   -> 4 (half up)
        assert_eq!(eff(3).effective.pico(), 3); //  2.625 -> 3
        assert_eq!(eff(5).effective.pico(), 4); //  4.375 -> 4
        assert_eq!(eff(12).effective.pico(), 11); // 10.5 -> 11
        assert_eq!(eff(12).list.pico(), 12);
        // Applied to the request total, not per token class: 4 input (1 each) + 2 output (2 each) = 8
        // list, 7 effective; per class it would be round(3.5) + round(3.5) = 8.
        let c = q.cost(&Usage::from_openai(4, 0, 2, 0));
        assert_eq!((c.list.pico(), c.effective.pico()), (8, 7));
        // Large amounts stay exact: $1,000,000 at 12.5 % off is $875,000.
        let big = apply_discount(
            Money::from_pico(1_000_000 * crate::pricing::money::PICO_PER_USD),
            Percent::parse("12.5").unwrap(),
        );
        assert_eq!(big.to_string(), "$875000");
        assert_eq!(
            apply_discount(Money::from_pico(7), Percent::parse("100").unwrap()),
            Money::ZERO
        );
        assert_eq!(
            apply_discount(Money::from_pico(7), Percent::parse("0").unwrap()),
            Money::from_pico(7)
        );
    }

    #[test]
    fn provider_discount_boundaries() {
        let b = book(
            TINY,
            r#"
            [[overrides]]
            provider = "openai"
            discount_percent = "50"
            effective_from = "2026-03-01"
            effective_until = "2026-04-01"
            "#,
        );
        let u = Usage::from_openai(10, 0, 0, 0);
        let eff = |d| {
            b.price_at(OAI, "tiny", d)
                .unwrap()
                .cost(&u)
                .effective
                .pico()
        };
        assert_eq!(eff(date(2026, 2, 28)), 10); // day before effective_from
        assert_eq!(eff(date(2026, 3, 1)), 5); // day of
        assert_eq!(eff(date(2026, 3, 2)), 5); // day after
        assert_eq!(eff(date(2026, 3, 31)), 5); // day before effective_until
        assert_eq!(eff(date(2026, 4, 1)), 10); // day of (exclusive)
        assert_eq!(eff(date(2026, 4, 2)), 10); // day after
                                               // The discount is per provider: Anthropic is untouched.
        let ant = builtin_with(
            r#"
            [[overrides]]
            provider = "openai"
            discount_percent = "50"
            effective_from = "2026-03-01"
            "#,
        );
        let q = ant
            .price_at(ANT, "claude-haiku-4-5", date(2026, 3, 5))
            .unwrap();
        assert_eq!(q.terms, None);
    }

    #[test]
    fn model_override_beats_provider_discount_with_boundaries() {
        let b = book(
            TINY,
            r#"
            [[overrides]]
            provider = "openai"
            discount_percent = "10"
            effective_from = "2026-01-01"

            [[overrides]]
            provider = "openai"
            model = "tiny-2026-01-01"   # an alias: applies to the model under every name
            input = "0.000003"
            output = "0.000003"
            effective_from = "2026-05-10"
            effective_until = "2026-05-20"
            note = "contract 42"
            "#,
        );
        // 10 input tokens: list 10 pico; 10 % off = 9; override 3 pico/token = 30.
        let u = Usage::from_openai(10, 0, 0, 0);
        let c = |m, d| b.price_at(OAI, m, d).unwrap().cost(&u);
        assert_eq!(c("tiny", date(2026, 5, 9)).effective.pico(), 9);
        assert_eq!(c("tiny", date(2026, 5, 10)).effective.pico(), 30);
        assert_eq!(c("tiny", date(2026, 5, 11)).effective.pico(), 30);
        assert_eq!(c("tiny-2026-01-01", date(2026, 5, 11)).effective.pico(), 30);
        assert_eq!(c("tiny", date(2026, 5, 19)).effective.pico(), 30);
        assert_eq!(c("tiny", date(2026, 5, 20)).effective.pico(), 9);
        assert_eq!(c("tiny", date(2026, 5, 21)).effective.pico(), 9);
        // The list cost is unchanged by any override.
        assert_eq!(c("tiny", date(2026, 5, 11)).list.pico(), 10);
        // Other models keep the provider discount.
        assert_eq!(
            c("other", date(2026, 5, 11)).effective.pico(),
            9 * MICRO_USD
        );
    }

    #[test]
    fn latest_effective_from_wins_among_overrides_in_effect() {
        let b = book(
            TINY,
            r#"
            [[overrides]]
            provider = "openai"
            discount_percent = "20"
            effective_from = "2026-06-01"

            [[overrides]]
            provider = "openai"
            discount_percent = "10"
            effective_from = "2026-01-01"

            [[overrides]]
            provider = "openai"
            discount_percent = "30"
            effective_from = "2026-07-01"
            effective_until = "2026-08-01"
            "#,
        );
        let u = Usage::from_openai(100, 0, 0, 0);
        let eff = |d| {
            b.price_at(OAI, "tiny", d)
                .unwrap()
                .cost(&u)
                .effective
                .pico()
        };
        assert!(b.price_at(OAI, "tiny", date(2025, 12, 31)).is_err());
        assert_eq!(eff(date(2026, 1, 1)), 90);
        assert_eq!(eff(date(2026, 6, 1)), 80);
        assert_eq!(eff(date(2026, 7, 15)), 70);
        // When the latest one ends, the next latest in effect applies again.
        assert_eq!(eff(date(2026, 8, 1)), 80);
    }

    #[test]
    fn unpriced_model_with_and_without_fallback() {
        let day = date(2026, 1, 1);
        let b = builtin();
        let e = b.price_at(OAI, "gpt-imaginary", day).unwrap_err();
        assert_eq!(e.provider, OAI);
        assert_eq!(e.model, "gpt-imaginary");
        let msg = e.to_string();
        assert!(
            msg.contains("openai") && msg.contains("gpt-imaginary"),
            "{msg}"
        );

        let b = builtin_with(
            r#"
            [fallback]
            input = "10"
            output = "30"

            [[overrides]]
            provider = "anthropic"
            discount_percent = "50"
            effective_from = "2025-01-01"
            "#,
        );
        let q = b.price_at(OAI, "gpt-imaginary", day).unwrap();
        assert_eq!(q.list_source, ListSource::Fallback);
        // 1_000 in × 10_000_000 + 1_000 out × 30_000_000 = $0.04; cached input defaults to the input price.
        let c = q.cost(&Usage::from_openai(1_000, 500, 1_000, 0));
        assert_eq!(c.list.to_string(), "$0.04");
        // Provider terms still apply to fallback-priced models.
        let q = b.price_at(ANT, "claude-imaginary", day).unwrap();
        assert_eq!(
            q.cost(&Usage::from_openai(1_000, 0, 1_000, 0))
                .effective
                .to_string(),
            "$0.02"
        );
        // Listed models are unaffected by the fallback.
        let q = b.price_at(OAI, "gpt-4o-mini", day).unwrap();
        assert!(matches!(q.list_source, ListSource::Sheet { .. }));
    }

    #[test]
    fn unlisted_model_priced_by_its_override() {
        let b = builtin_with(
            r#"
            [[overrides]]
            provider = "openai"
            model = "ft:gpt-4o-mini:acme"
            input = "0.30"
            cached_input = "0.15"
            output = "1.20"
            effective_from = "2026-01-01"
            "#,
        );
        let q = b
            .price_at(OAI, "ft:gpt-4o-mini:acme", date(2026, 1, 1))
            .unwrap();
        assert_eq!(q.list_source, ListSource::Override);
        let c = q.cost(&Usage::from_openai(1_000_000, 0, 0, 0));
        assert_eq!(
            (c.list.to_string(), c.effective.to_string()),
            ("$0.3".into(), "$0.3".into())
        );
        assert!(b
            .price_at(OAI, "ft:gpt-4o-mini:acme", date(2025, 12, 31))
            .is_err());
    }

    #[test]
    fn sheet_errors_name_file_entry_field_and_reason() {
        let issues = sheet_errors(
            r#"
            [[models]]
            provider = "openai"
            model = "a"
            effective_from = "2026-01-01"
            input = "1.0000001"
            output = "-2"
            source = "x"

            [[models]]
            provider = "azure"
            model = "b"
            effective_from = "2026-13-01"
            input = "1"
            output = "1"

            [[models]]
            provider = "anthropic"
            model = "c"
            effective_from = "2026-01-01"
            input = "3"
            output = "15"
            long_context = { input = "6", output = "x" }
            source = "x"

            [[models]]
            provider = "openai"
            model = "d"
            aliases = ["a"]
            effective_from = "2026-01-01"
            input = "1"
            output = "1"
            source = "x"

            [[models]]
            provider = "openai"
            model = "d"
            effective_from = "2026-01-01"
            input = "2"
            output = "2"
            source = "x"

            [[models]]
            provider = "openai"
            model = "e"
            effective_from = "2026/01/01"
            input = "1"
            output = "1"
            source = "x"

            [[models]]
            provider = "openai"
            model = "g"
            aliases = ["d"]
            effective_from = "2026-01-01"
            input = "1"
            output = "1"
            source = "x"
            "#,
        );
        let has = |field: &str, words: &[&str]| {
            issues.iter().any(|i| {
                i.file == Path::new("list.toml")
                    && i.field == field
                    && words.iter().all(|w| i.reason.contains(w))
            })
        };
        let all = issues
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(has("models[0].input", &["openai/a", "6 decimals"]), "{all}");
        assert!(has("models[0].output", &["openai/a", "negative"]), "{all}");
        assert!(has("models[1].provider", &["azure/b", "azure"]), "{all}");
        assert!(has("models[1].effective_from", &["2026-13-01"]), "{all}");
        assert!(has("models[1].source", &["required"]), "{all}");
        assert!(
            has("models[2].cache_write_5m", &["anthropic/c", "Anthropic"]),
            "{all}"
        );
        assert!(
            has("models[2].long_context.above_input_tokens", &["required"]),
            "{all}"
        );
        assert!(has("models[2].long_context.output", &["\"x\""]), "{all}");
        assert!(has("models[6].aliases", &["\"d\"", "openai/d"]), "{all}");
        assert!(
            has(
                "models[4].effective_from",
                &["openai/d", "models[3]", "2026-01-01"]
            ),
            "{all}"
        );
        assert!(
            has("models[5].effective_from", &["2026/01/01", "YYYY-MM-DD"]),
            "{all}"
        );
        assert!(
            all.contains("list.toml: models[0].input: openai/a:"),
            "{all}"
        );
    }

    #[test]
    fn sheet_syntax_errors_name_the_line() {
        let issues = sheet_errors("[[models]]\nprovider = \"openai\"\nprize = \"1\"\n");
        assert_eq!(issues.len(), 1);
        assert!(issues[0].reason.contains("line 3"), "{:?}", issues[0]);
        assert!(issues[0].reason.contains("prize"), "{:?}", issues[0]);
    }

    #[test]
    fn override_errors() {
        let issues = pricing_errors(
            r#"
            [fallback]
            input = "1"

            [[overrides]]
            provider = "openai"
            discount_percent = "10"
            input = "1"
            effective_from = "2026-01-01"

            [[overrides]]
            provider = "openai"
            effective_from = "2026-01-01"

            [[overrides]]
            provider = "openai"
            discount_percent = "100.5"
            effective_from = "2026-01-01"

            [[overrides]]
            provider = "anthropic"
            discount_percent = "5"
            effective_from = "2026-02-01"
            effective_until = "2026-02-01"

            [[overrides]]
            provider = "openai"
            input = "1"
            output = "1"
            effective_from = "2026-01-01"

            [[overrides]]
            provider = "anthropic"
            model = "claude-x"
            discount_percent = "5"

            [[overrides]]
            provider = "openai"
            discount_percent = "5"
            effective_from = "2027-01-01"

            [[overrides]]
            provider = "openai"
            discount_percent = "6"
            effective_from = "2027-01-01"
            "#,
        );
        let has = |field: &str, words: &[&str]| {
            issues.iter().any(|i| {
                i.file == Path::new("tollgate.toml")
                    && i.field == field
                    && words.iter().all(|w| i.reason.contains(w))
            })
        };
        let all = issues
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(has("pricing.fallback.output", &["required"]), "{all}");
        assert!(
            has("pricing.overrides[0].discount_percent", &["not both"]),
            "{all}"
        );
        assert!(
            has("pricing.overrides[1].discount_percent", &["either"]),
            "{all}"
        );
        assert!(
            has("pricing.overrides[2].discount_percent", &["100.5", "100"]),
            "{all}"
        );
        assert!(
            has("pricing.overrides[3].effective_until", &["exclusive"]),
            "{all}"
        );
        assert!(
            has("pricing.overrides[4].model", &["need a model"]),
            "{all}"
        );
        assert!(
            has(
                "pricing.overrides[5].effective_from",
                &["anthropic/claude-x", "required"]
            ),
            "{all}"
        );
        assert!(
            has(
                "pricing.overrides[7].effective_from",
                &["pricing.overrides[6]"]
            ),
            "{all}"
        );
    }

    #[test]
    fn from_files_reports_sheet_and_config_problems_together() {
        let dir = std::env::temp_dir().join(format!("tg-prices-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let list = dir.join("list.toml");
        std::fs::write(&list, "[[models]]\nprovider = \"openai\"\n").unwrap();
        let raw: RawPricing = toml::from_str("[fallback]\noutput = \"1\"\n").unwrap();
        let err = PriceBook::from_files(&list, Path::new("tollgate.toml"), raw).unwrap_err();
        assert!(err
            .issues
            .iter()
            .any(|i| i.file == list && i.field == "models[0].model"));
        assert!(err
            .issues
            .iter()
            .any(|i| i.file == Path::new("tollgate.toml") && i.field == "pricing.fallback.input"));
        std::fs::write(&list, BUILTIN_SHEET).unwrap();
        let ok = PriceBook::from_files(&list, Path::new("tollgate.toml"), RawPricing::default());
        assert!(ok.is_ok());
        let missing = PriceBook::from_files(
            &dir.join("nope.toml"),
            Path::new("tollgate.toml"),
            RawPricing::default(),
        )
        .unwrap_err();
        assert_eq!(missing.issues[0].file, dir.join("nope.toml"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shipped_prices_spot_checks() {
        let b = builtin();
        let day = date(2026, 1, 1);
        let per_m = |p, m| {
            let q = b.price_at(p, m, day).unwrap();
            let one = |f: fn(&mut Usage)| {
                let mut u = Usage::default();
                f(&mut u);
                q.cost(&u).list.to_string()
            };
            [
                one(|u| u.input_tokens = 1_000_000),
                one(|u| u.cached_input_tokens = 1_000_000),
                one(|u| u.cache_write_5m_tokens = 1_000_000),
                one(|u| u.cache_write_1h_tokens = 1_000_000),
                one(|u| u.output_tokens = 1_000_000),
            ]
        };
        assert_eq!(
            per_m(OAI, "gpt-4o"),
            ["$2.5", "$1.25", "$2.5", "$2.5", "$10"]
        );
        assert_eq!(
            per_m(OAI, "gpt-5-nano"),
            ["$0.05", "$0.005", "$0.05", "$0.05", "$0.4"]
        );
        assert_eq!(
            per_m(ANT, "claude-opus-4-1"),
            ["$15", "$1.5", "$18.75", "$30", "$75"]
        );
        assert_eq!(
            per_m(ANT, "claude-3-5-haiku-latest"),
            ["$0.8", "$0.08", "$1", "$1.6", "$4"]
        );
    }
}
