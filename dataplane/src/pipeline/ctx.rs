//! The one context every phase works on: [`Core`] (what a worker owns, for every request it serves) and
//! [`RequestCtx`] (one request's state, filled in phase by phase), with the small types the phases leave in
//! it for the ones after them ([`Endpoint`], [`Relayed`], [`Settled`]).
//!
//! Its own file so that phases depend on it and `pipeline/mod.rs` (which runs the phases) depends on them,
//! with no circle. Fails: never. Cost: one `RequestCtx` per request, built on the worker's stack.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tollgate_core::config::{ServerConfig, UpstreamConfig};
use tollgate_core::pricing::Cost;
use tollgate_core::pricing::Quote;
use tollgate_core::{Identity, Usage};

use crate::error::Error;
use crate::net::http1::{Limits, RequestHead};
use crate::net::upstream::Pool;
use crate::obs::accesslog::CoreLog;
use crate::providers::meter::UsageMeter;
use crate::providers::Api;
use crate::runtime::credentials::{AuthHandle, CoreJwtCache};
use crate::runtime::snapshot::{ProviderRuntime, Published};

/// Everything one worker owns. `!Send`: built on its core and never leaves it.
#[derive(Debug)]
pub struct Core {
    pub id: usize,
    pub snapshot: Published,
    pub pool: Pool,
    pub log: CoreLog,
    pub limits: Limits,
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub shutdown: Arc<AtomicBool>,
    /// Keys, service tokens and policies as the identity thread last published them.
    pub auth: AuthHandle,
    /// Verified JWTs on this core.
    pub jwt_cache: CoreJwtCache,
    /// This core's shard of the budget state, and its links to the other shards.
    pub budgets: std::rc::Rc<crate::spend::shard::CoreBudgets>,
    pub in_flight: Cell<usize>,
    /// Connection handoffs and where budgeted requests were served (see [`crate::net::handoff`]).
    pub handoff: crate::net::handoff::Counters,
    /// This core's request metrics (core-local; published every tick, see [`crate::obs::metrics`]).
    pub metrics: crate::obs::metrics::CoreMetrics,
    requests: Cell<u64>,
    id_prefix: String,
}

/// What every core shares with the control side: the published snapshots and the shutdown flag.
#[derive(Debug, Clone)]
pub struct Shared {
    pub snapshot: Published,
    pub auth: AuthHandle,
    pub shutdown: Arc<AtomicBool>,
}

impl Core {
    pub fn new(
        id: usize,
        shared: Shared,
        log: CoreLog,
        server: ServerConfig,
        upstream: UpstreamConfig,
        budgets: std::rc::Rc<crate::spend::shard::CoreBudgets>,
        process_seed: u32,
    ) -> Core {
        let Shared {
            snapshot,
            auth,
            shutdown,
        } = shared;
        let limits = Limits {
            max_head_bytes: server.max_head_bytes,
            max_headers: server.max_headers,
            max_body_bytes: server.max_body_bytes,
        };
        Core {
            id,
            snapshot,
            pool: Pool::new(
                upstream.pool_max_idle_per_provider,
                upstream.pool_idle_timeout,
            ),
            log,
            limits,
            server,
            upstream,
            shutdown,
            auth,
            jwt_cache: Default::default(),
            budgets,
            in_flight: Cell::new(0),
            handoff: Default::default(),
            // Publishes into a slot of its own until the server gives it the one the scrape reads.
            metrics: crate::obs::metrics::CoreMetrics::new(Default::default()),
            requests: Cell::new(0),
            id_prefix: format!("{process_seed:08x}{:02x}", id & 0xff),
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// A request id unique across cores and restarts: process seed, core, per-core counter.
    pub(crate) fn next_request_id(&self) -> String {
        let n = self.requests.get().wrapping_add(1);
        self.requests.set(n);
        let mut s = String::with_capacity(24);
        s.push_str(&self.id_prefix);
        s.push_str(&format!("{n:014x}"));
        s
    }
}

/// How a request ended, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole response reached the client's socket.
    Complete,
    /// The gateway answered with an error before contacting (or hearing from) the upstream.
    Rejected,
    /// The client went away before the response was complete; the upstream request was cancelled.
    ClientGone,
    /// The upstream failed after the response began; the client's stream was ended cleanly.
    UpstreamFailed,
    /// A budget's `stream_cutoff` ended the stream when its visible output reached the reservation; the
    /// client's stream was ended with its protocol's final events.
    CutOff,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Complete => "complete",
            Outcome::Rejected => "rejected",
            Outcome::ClientGone => "client_gone",
            Outcome::UpstreamFailed => "upstream_failed",
            Outcome::CutOff => "cut_off",
        }
    }
}

/// One request's state, passed through every phase.
#[derive(Debug)]
pub struct RequestCtx {
    pub id: String,
    pub start: quanta::Instant,
    pub head: RequestHead,
    pub body: Bytes,
    pub endpoint: Option<Endpoint>,
    /// The API the client speaks: its errors come back in this API's shape.
    pub api: Api,
    /// Who is calling, set by the identify phase.
    pub identity: Option<Identity>,
    pub model: Option<String>,
    pub upstream_model: Option<String>,
    pub route: Option<String>,
    pub provider: Option<Arc<ProviderRuntime>>,
    pub stream: bool,
    pub status: u16,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub upstream_ttfb: Option<Duration>,
    pub outcome: Outcome,
    pub error: Option<Error>,
    /// Whether the client connection can serve another request afterwards.
    pub keep_alive: bool,
    /// The prices in effect when the request started (list and negotiated), set by the price phase.
    pub quote: Option<Quote>,
    /// Usage read from the response by the forward phase.
    pub meter: Option<UsageMeter>,
    /// What the forward phase relayed, kept only for estimating usage that never arrived.
    pub relayed: Relayed,
    /// Set by the account phase.
    pub account: Option<Settled>,
    /// The admit phase's hold on the budgets; the account phase settles it (dropped unsettled, it releases).
    pub reservation: Option<crate::spend::reservation::Reservation>,
    /// What the admit phase reserved on each applicable budget (pico-USD), for the log.
    pub reserved: Option<tollgate_core::Money>,
    /// The budget that refused the request, for the 429's headers.
    pub refusal: Option<tollgate_core::budget::owner::Refusal>,
    /// The model the client asked for, when a budget downgraded the request to another.
    pub downgraded_from: Option<String>,
    /// The output cap the request asked for and the one it was lowered to (its policy's cap, in the
    /// authorize phase; what a budget's remaining amount pays for, in the admit phase).
    pub max_tokens_lowered: Option<(u64, u64)>,
    /// For a request that had budgets applied: whether this core owns its caller's budgets.
    pub owner_local: Option<bool>,
    /// Output tokens after which a stream is cut off (a budget with `stream_cutoff` applied): the output
    /// its reservation covers.
    pub cutoff_tokens: Option<u64>,
    /// The canonical billed model (the price sheet's name, or the billed name when it has none), set after
    /// routing: the usage counters' model.
    pub billed_model: Option<Arc<str>>,
    /// The request's attributes as the admit phase resolved them (for the usage counters).
    pub attributes: Vec<(String, String)>,
    /// Cross-core messages the admission waited for (see [`crate::spend::reservation::Reservation::asks`]).
    pub budget_asks: Option<u32>,
    /// From `start` to the upstream request being sent: the gateway's own time before the provider.
    pub upstream_sent: Option<Duration>,
}

/// What the client asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// A billed endpoint of a wire API (`/v1/chat/completions`, `/v1/messages`, `/v1/embeddings`:
    /// [`Api::paths`]).
    Chat(Api),
    /// Anthropic's token counting (`/v1/messages/count_tokens`): identified, routed and authorized like
    /// messages, forwarded, never priced nor budgeted (the provider does not bill it).
    CountTokens,
    Models,
    Healthz,
    Readyz,
}

impl Endpoint {
    /// The API whose error shape the client gets: its endpoint's, or the default.
    pub fn api(self) -> Api {
        match self {
            Endpoint::Chat(api) => api,
            Endpoint::CountTokens => Api::Anthropic,
            _ => Api::DEFAULT,
        }
    }

    /// The API a provider must speak ([`Api::of`] its kind) to serve this endpoint.
    pub fn provider_api(self) -> Option<Api> {
        match self {
            Endpoint::Chat(api) => Some(api.family()),
            Endpoint::CountTokens => Some(Api::Anthropic),
            _ => None,
        }
    }

    /// The path the request is forwarded to (after the provider's base path): the endpoint's `/v1` path,
    /// whichever of its paths the client called.
    pub fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::Chat(api) => api.paths()[0],
            Endpoint::CountTokens => crate::providers::anthropic::COUNT_TOKENS_PATHS[0],
            Endpoint::Models | Endpoint::Healthz | Endpoint::Readyz => "/",
        }
    }

    /// Whether the provider bills it: priced and reserved on the budgets before forwarding, settled after.
    pub fn billed(self) -> bool {
        !matches!(self, Endpoint::CountTokens)
    }
}

/// Where the usage of a settled request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageSource {
    /// The provider's usage numbers.
    Reported,
    /// Counted by the gateway because the provider's numbers never arrived.
    Estimated,
    /// Nothing was generated (a provider error response): nothing is billed.
    None,
}

impl UsageSource {
    pub fn as_str(self) -> &'static str {
        match self {
            UsageSource::Reported => "reported",
            UsageSource::Estimated => "estimated",
            UsageSource::None => "none",
        }
    }
}

/// A settled request.
#[derive(Debug, Clone, Copy)]
pub struct Settled {
    pub usage: Usage,
    pub source: UsageSource,
    pub cost: Cost,
}

/// What the tap hands the account phase.
#[derive(Debug, Default)]
pub struct Relayed {
    /// Relayed body pieces (SSE runs, or the JSON body), for counting generated text.
    pub kept: Vec<Bytes>,
    /// Relayed bytes beyond the keep cap (counted at bytes/4 when estimating).
    pub dropped_bytes: u64,
    /// Output tokens counted by a stream cut-off that ended the stream.
    pub counted_output: Option<u64>,
}
