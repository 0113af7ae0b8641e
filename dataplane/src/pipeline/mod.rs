//! The request pipeline: one request context carried through named phases, read top-down in [`run_one`].
//!
//! Phases, one module each:
//! 1. [`parse`]: read the head and body off the client connection (limits, timeouts, smuggling checks).
//! 2. [`identify`]: who is calling (OIDC JWT, service token, or anonymous where allowed); 401 otherwise.
//! 3. [`route`]: endpoint, model, provider, upstream body.
//! 4. [`authorize`]: may this identity send this request there (model policies, `max_tokens` cap); 403.
//! 5. [`price`]: the quote (list and negotiated prices) the request is reserved and billed at; 403 unpriced.
//! 6. [`admit`]: reserve the maximum cost on every applicable budget (owning cores, all or nothing); 429 /
//!    downgrade / lower `max_tokens` when one cannot cover it.
//! 7. [`forward`]: the upstream exchange, streamed back to the client event by event.
//! 8. [`account`]: usage from the response (or an estimate) priced with the quote taken at the start.
//! 9. [`log`]: one JSON access-log line per request, through the core's buffer.
//!
//! The context every phase works on ([`Core`], [`RequestCtx`]) lives in [`ctx`]; this file only runs the
//! phases in order (and answers the few local endpoints: `/healthz`, `/readyz`, `/v1/models`). Anthropic's
//! token counting, which the provider does not bill, skips phases 5 and 6. Fails: every error before the response head is rendered in the client's API shape with
//! the status from [`Error::status`]; after the head, failures end the stream cleanly (see [`forward`]).

pub mod account;
pub mod admit;
pub mod authorize;
pub mod ctx;
pub mod forward;
pub mod identify;
pub mod log;
pub mod parse;
pub mod price;
pub mod route;

use std::sync::Arc;

use monoio::io::AsyncWriteRentExt;

use crate::error::Error;
use crate::net::client::ClientIo;
use crate::net::http1::{self, Method};
use crate::providers::Api;
pub use ctx::{Core, Endpoint, Outcome, RequestCtx, Shared};

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
                &Api::DEFAULT.error_body(&e),
                false,
                None,
                b"",
            )
            .await;
            log::parse_failure(core, &e);
            core.metrics.record(&crate::obs::metrics::Sample {
                api: crate::obs::metrics::NONE,
                outcome: Outcome::Rejected.as_str(),
                status: e.status(),
                ..Default::default()
            });
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
        api: Api::DEFAULT,
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
        relayed: ctx::Relayed::default(),
        account: None,
        reservation: None,
        reserved: None,
        refusal: None,
        downgraded_from: None,
        max_tokens_lowered: None,
        owner_local: None,
        budget_asks: None,
        billed_model: None,
        attributes: Vec::new(),
        cutoff_tokens: None,
        upstream_sent: None,
    };
    handle(core, &mut ctx, io).await;
    note_owner(core, &mut ctx, io);
    // 9. log
    log::access(core, &ctx);
    log::count(core, &ctx);
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
            let allowed = |r: &tollgate_core::PolicyRequest<'_>| auth.policies.permits(&id, r);
            let body = route::models_body(&snap, shape_for_models(ctx), &allowed);
            ctx.identity = Some(id);
            return local(ctx, io, 200, body, head_only).await;
        }
        Endpoint::Chat(_) | Endpoint::CountTokens => {}
    }
    // 2. identify
    match identify::identify(core, ctx).await {
        Ok(id) => ctx.identity = Some(id),
        Err(e) => return fail(ctx, io, e).await,
    }
    // 3-6. route, authorize, price, admit; a budget's downgrade routes the request once more, to its cheaper model.
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
        ctx.billed_model = Some(match &routed.canonical_model {
            Some(c) => Arc::clone(c),
            None => Arc::from(
                routed
                    .upstream_model
                    .as_deref()
                    .unwrap_or(routed.model.as_str()),
            ),
        });
        // 4. authorize
        if let Some(id) = &ctx.identity {
            let auth = core.auth.state.load();
            match authorize::authorize(&auth, id, &mut routed) {
                Ok(lowered) => {
                    ctx.max_tokens_lowered = lowered.zip(routed.max_tokens);
                }
                Err(e) => return fail(ctx, io, e).await,
            }
        }
        // Token counting is free: nothing to price or reserve.
        if !ep.billed() {
            break routed;
        }
        // 5. price
        match price::price(&snap, &routed) {
            Ok(q) => ctx.quote = Some(q),
            Err(e) => return fail(ctx, io, e).await,
        }
        // 6. admit
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
    // 7. forward
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
    // 8. account (settles the reservation exactly once)
    account::settle(core, ctx);
}

/// `GET /v1/models` answers in the shape of the API whose SDK header the caller sent (Anthropic SDKs send
/// `anthropic-version`), OpenAI's otherwise.
fn shape_for_models(ctx: &RequestCtx) -> Api {
    Api::sniff(|h| ctx.head.header(h).is_some())
}

/// Answers with an error in the client's API shape. The connection closes after client-side framing errors.
async fn fail(ctx: &mut RequestCtx, io: &mut ClientIo, e: Error) {
    let body = ctx.api.error_body(&e);
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
