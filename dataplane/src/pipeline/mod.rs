//! The request pipeline: one request context carried through named phases, read top-down in [`run_one`].
//!
//! Phases, one module each:
//! 1. [`parse`]: read the head and body off the client connection (limits, timeouts, smuggling checks).
//! 2. [`identify`]: who is calling (OIDC JWT, service token, or anonymous where allowed); 401 otherwise.
//! 3. [`route`]: endpoint, model, provider, upstream body.
//! 4. [`authorize`]: may this identity send this request there (model policies, `max_tokens` cap); 403.
//! 5. [`admit`]: reserve the maximum cost on every applicable budget (owning cores, all or nothing); 429 /
//!    downgrade / lower `max_tokens` when one cannot cover it.
//! 6. [`forward`]: the upstream exchange, streamed back to the client event by event.
//! 7. [`account`]: usage from the response (or an estimate) priced with the quote taken at the start.
//! 8. [`log`]: one JSON access-log line per request, through the core's buffer.
//!
//! Owns: [`Core`] (everything one worker thread owns: its snapshot handle, upstream pool, log buffer, counters)
//! and [`RequestCtx`]. Fails: every error before the response head is rendered in the client's API shape with
//! the status from [`Error::status`]; after the head, failures end the stream cleanly (see [`forward`]).

pub mod account;
pub mod admit;
pub mod authorize;
pub mod forward;
pub mod identify;
pub mod log;
pub mod parse;
pub mod route;

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use monoio::io::AsyncWriteRentExt;
use tollgate_core::config::{ServerConfig, UpstreamConfig};

use crate::error::{ApiShape, Error};
pub use crate::net::client::ClientIo;
use crate::net::http1::{self, Limits, Method, RequestHead};
use crate::net::upstream::Pool;
use crate::obs::accesslog::CoreLog;
use crate::providers::meter::UsageMeter;
use crate::runtime::credentials::AuthHandle;
use crate::runtime::snapshot::{ProviderRuntime, Published};
use route::Endpoint;
use tollgate_core::pricing::Quote;
use tollgate_core::Identity;

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
    pub jwt_cache: identify::CoreJwtCache,
    /// This core's shard of the budget state, and its links to the other shards.
    pub budgets: std::rc::Rc<crate::spend::shard::CoreBudgets>,
    pub in_flight: Cell<usize>,
    /// Connection handoffs and where budgeted requests were served (see [`crate::net::handoff`]).
    pub handoff: crate::net::handoff::Counters,
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
            requests: Cell::new(0),
            id_prefix: format!("{process_seed:08x}{:02x}", id & 0xff),
        }
    }

    pub fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Relaxed)
    }

    /// A request id unique across cores and restarts: process seed, core, per-core counter.
    fn next_request_id(&self) -> String {
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
    pub api: ApiShape,
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
    /// The prices in effect when the request started (list and negotiated), set by the route phase.
    pub quote: Option<Quote>,
    /// Usage read from the response by the forward phase.
    pub meter: Option<UsageMeter>,
    /// What the forward phase relayed, kept only for estimating usage that never arrived.
    pub relayed: forward::Relayed,
    /// Set by the account phase.
    pub account: Option<account::Settled>,
    /// The admit phase's hold on the budgets; the account phase settles it (dropped unsettled, it releases).
    pub reservation: Option<crate::spend::reservation::Reservation>,
    /// What the admit phase reserved on each applicable budget (pico-USD), for the log.
    pub reserved: Option<tollgate_core::Money>,
    /// The budget that refused the request, for the 429's headers.
    pub refusal: Option<tollgate_core::budget::owner::Refusal>,
    /// The model the client asked for, when a budget downgraded the request to another.
    pub downgraded_from: Option<String>,
    /// The output cap the admit phase lowered the request to, to fit a budget.
    pub max_tokens_lowered: Option<u64>,
    /// For a request that had budgets applied: whether this core owns its caller's budgets.
    pub owner_local: Option<bool>,
    /// Output tokens after which a stream is cut off (a budget with `stream_cutoff` applied): the output
    /// its reservation covers.
    pub cutoff_tokens: Option<u64>,
    /// Cross-core messages the admission waited for (see [`crate::spend::reservation::Reservation::asks`]).
    pub budget_asks: Option<u32>,
}

/// Serves one request on `io`; returns whether the connection stays open.
pub async fn run_one(core: &Core, io: &mut ClientIo) -> bool {
    // 1. parse
    let (head, body) = match parse::read_request(core, io).await {
        Ok(Some(r)) => r,
        Ok(None) => return false,
        Err(e) => {
            // No request context exists for an unparseable request; answer and close.
            let _ = write_simple(
                io,
                e.status(),
                "application/json",
                &e.body(ApiShape::OpenAi),
                false,
                None,
                b"",
            )
            .await;
            log::parse_failure(core, &e);
            return false;
        }
    };
    core.in_flight.set(core.in_flight.get() + 1);
    let mut ctx = RequestCtx {
        id: core.next_request_id(),
        start: quanta::Instant::now(),
        bytes_in: (head.raw.len() + body.len()) as u64,
        keep_alive: head.keep_alive && !core.shutting_down(),
        head,
        body,
        endpoint: None,
        api: ApiShape::OpenAi,
        identity: None,
        model: None,
        upstream_model: None,
        route: None,
        provider: None,
        stream: false,
        status: 0,
        bytes_out: 0,
        upstream_ttfb: None,
        outcome: Outcome::Rejected,
        error: None,
        quote: None,
        meter: None,
        relayed: forward::Relayed::default(),
        account: None,
        reservation: None,
        reserved: None,
        refusal: None,
        downgraded_from: None,
        max_tokens_lowered: None,
        owner_local: None,
        budget_asks: None,
        cutoff_tokens: None,
    };
    handle(core, &mut ctx, io).await;
    note_owner(core, &mut ctx, io);
    // 8. log
    log::access(core, &ctx);
    core.in_flight.set(core.in_flight.get().saturating_sub(1));
    ctx.keep_alive && !core.shutting_down()
}

/// Records whether a budgeted request was served on the core owning its caller's budgets, and, where the
/// connection may still move, which core that is (the connection loop hands it over; see
/// [`crate::net::handoff`]).
fn note_owner(core: &Core, ctx: &mut RequestCtx, io: &mut ClientIo) {
    let may_hand_off = core.server.handoff && !io.handed_off && ctx.keep_alive;
    io.owner = None;
    if ctx.reserved.is_none() && !may_hand_off {
        return;
    }
    let owner = budget_owner(core, ctx);
    if let (Some(o), Some(_)) = (owner, ctx.reserved) {
        let local = o == core.id;
        ctx.owner_local = Some(local);
        crate::net::handoff::bump(if local {
            &core.handoff.owner_local
        } else {
            &core.handoff.owner_remote
        });
    }
    if may_hand_off {
        io.owner = owner;
    }
}

/// The core that owns the budgets of this request's caller, where that can matter: the caller is not
/// anonymous and budgets are configured.
fn budget_owner(core: &Core, ctx: &RequestCtx) -> Option<usize> {
    let id = ctx.identity.as_ref()?;
    if id.kind == tollgate_core::IdentityKind::Anonymous
        || core.snapshot.load().config.budgets.is_empty()
    {
        return None;
    }
    let member = format!("{}:{}", id.source, id.subject);
    Some(crate::spend::shard::owner_of_member(
        &member,
        core.budgets.cores(),
    ))
}

async fn handle(core: &Core, ctx: &mut RequestCtx, io: &mut ClientIo) {
    let ep = match route::endpoint(&ctx.head) {
        Ok(ep) => ep,
        Err((e, shape)) => {
            ctx.api = shape;
            return fail(ctx, io, e).await;
        }
    };
    ctx.endpoint = Some(ep);
    ctx.api = ep.api();
    let snap = core.snapshot.load_full();
    let head_only = ctx.head.method == Method::Head;
    match ep {
        Endpoint::Healthz => {
            return local(ctx, io, 200, br#"{"status":"ok"}"#.to_vec(), head_only).await
        }
        Endpoint::Readyz => {
            let unresolved: Vec<&str> = snap
                .providers
                .iter()
                .filter(|p| p.addrs.load().is_empty())
                .map(|p| p.name.as_str())
                .collect();
            let (status, body) = if core.shutting_down() {
                (503, serde_json::json!({"status": "shutting_down"}))
            } else if !unresolved.is_empty() {
                (
                    503,
                    serde_json::json!({"status": "not_ready", "unresolved_providers": unresolved}),
                )
            } else {
                (200, serde_json::json!({"status": "ready"}))
            };
            return local(
                ctx,
                io,
                status,
                serde_json::to_vec(&body).unwrap_or_default(),
                head_only,
            )
            .await;
        }
        Endpoint::Models => {
            // Listing models is authenticated like using them, and lists only what the caller may use.
            let id = match identify::identify(core, ctx).await {
                Ok(id) => id,
                Err(e) => return fail(ctx, io, e).await,
            };
            let auth = core.auth.state.load();
            let allowed = |model: &str, upstream: Option<&str>, provider: &str| {
                auth.policies.permits(
                    &id,
                    &tollgate_core::PolicyRequest {
                        model,
                        upstream_model: upstream,
                        provider,
                    },
                )
            };
            let body = route::models_body(&snap, shape_for_models(ctx), &allowed);
            ctx.identity = Some(id);
            return local(ctx, io, 200, body, head_only).await;
        }
        Endpoint::ChatCompletions | Endpoint::Messages => {}
    }
    // 2. identify
    match identify::identify(core, ctx).await {
        Ok(id) => ctx.identity = Some(id),
        Err(e) => return fail(ctx, io, e).await,
    }
    // 3-5. route, authorize, admit; a budget's downgrade routes the request once more, to its cheaper model.
    let mut body = ctx.body.clone();
    let routed = loop {
        // 3. route
        let mut routed = match route::route(&snap, ep, &body) {
            Ok(r) => r,
            Err(e) => return fail(ctx, io, e).await,
        };
        ctx.model = Some(routed.model.clone());
        ctx.stream = routed.stream;
        ctx.route = Some(routed.route.clone());
        ctx.upstream_model = routed.upstream_model.clone();
        ctx.provider = Some(Arc::clone(&routed.provider));
        // 4. authorize
        if let Some(id) = &ctx.identity {
            let auth = core.auth.state.load();
            if let Err(e) = authorize::authorize(&auth, id, &mut routed) {
                return fail(ctx, io, e).await;
            }
        }
        // Price the request as of its start; a model without a price is never served for free.
        let billed_model = routed
            .upstream_model
            .as_deref()
            .unwrap_or(routed.model.as_str());
        match snap.config.prices.price_at_timestamp(
            routed.provider.kind,
            billed_model,
            jiff::Timestamp::now(),
        ) {
            Ok(q) => ctx.quote = Some(q),
            Err(unpriced) => {
                let e = Error::unpriced(format!(
                    "the model `{}` of provider {} has no price on {}: add it to the price sheet or set pricing.fallback",
                    unpriced.model, routed.provider.name, unpriced.date
                ));
                return fail(ctx, io, e).await;
            }
        }
        // 5. admit
        match admit::admit(core, ctx, &snap, &mut routed).await {
            Ok(admit::Admitted::Yes) => break routed,
            Ok(admit::Admitted::Downgrade(model)) => {
                match route::with_model(&body, &model) {
                    Ok(b) => body = b,
                    Err(e) => return fail(ctx, io, e).await,
                }
                ctx.downgraded_from = ctx.model.clone();
            }
            Err(e) => return fail(ctx, io, e).await,
        }
    };
    // 6. forward
    if let Err(e) = forward::forward(
        core,
        ctx,
        io,
        &routed.provider,
        routed.body,
        routed.strip_usage,
    )
    .await
    {
        fail(ctx, io, e).await;
    }
    // 7. account
    account::settle(ctx);
}

/// `GET /v1/models` answers in Anthropic's shape for Anthropic SDK callers (they send `anthropic-version`).
fn shape_for_models(ctx: &RequestCtx) -> ApiShape {
    if ctx.head.header("anthropic-version").is_some() {
        ApiShape::Anthropic
    } else {
        ApiShape::OpenAi
    }
}

/// Answers with an error in the client's API shape. The connection closes after client-side framing errors.
async fn fail(ctx: &mut RequestCtx, io: &mut ClientIo, e: Error) {
    let body = e.body(ctx.api);
    ctx.status = e.status();
    ctx.outcome = Outcome::Rejected;
    let extra = admit::header_lines(ctx);
    match write_simple(
        io,
        ctx.status,
        "application/json",
        &body,
        ctx.keep_alive,
        Some(&ctx.id),
        &extra,
    )
    .await
    {
        Ok(n) => ctx.bytes_out += n as u64,
        Err(_) => {
            ctx.keep_alive = false;
            ctx.outcome = Outcome::ClientGone;
        }
    }
    ctx.error = Some(e);
}

async fn local(
    ctx: &mut RequestCtx,
    io: &mut ClientIo,
    status: u16,
    body: Vec<u8>,
    head_only: bool,
) {
    ctx.status = status;
    let body = if head_only { Vec::new() } else { body };
    match write_simple(
        io,
        status,
        "application/json",
        &body,
        ctx.keep_alive,
        Some(&ctx.id),
        b"",
    )
    .await
    {
        Ok(n) => {
            ctx.bytes_out += n as u64;
            ctx.outcome = Outcome::Complete;
        }
        Err(_) => {
            ctx.keep_alive = false;
            ctx.outcome = Outcome::ClientGone;
        }
    }
}

/// Writes a complete response with a Content-Length body in one write.
pub async fn write_simple(
    io: &mut ClientIo,
    status: u16,
    content_type: &str,
    body: &[u8],
    keep_alive: bool,
    request_id: Option<&str>,
    extra_headers: &[u8],
) -> std::io::Result<usize> {
    let mut out = Vec::with_capacity(256 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", http1::reason(status)).as_bytes());
    out.extend_from_slice(b"content-type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(format!("\r\ncontent-length: {}\r\n", body.len()).as_bytes());
    if let Some(id) = request_id {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(extra_headers);
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    let (r, out) = io.wr.write_all(out).await;
    r.map(|_| out.len())
}
