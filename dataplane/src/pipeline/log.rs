//! Phase 9, log: one JSON line per request, appended to the core's buffer (see [`crate::obs::accesslog`]).
//!
//! Fields: `ts`, `event` ("request"), `request_id`, `core`, `method`, `path`, `status`, `outcome`, `api`,
//! `provider`, `route`, `model`, `upstream_model`, `stream`, `bytes_in`, `bytes_out`, `upstream_ttfb_us`,
//! `total_us`; the caller's identity (`identity_kind` user|service|anonymous, `subject`, `email` where known,
//! `groups`, `identity_source`: the issuer's name or `service-token`, `token_id` for service tokens); budgets: `reserved_pusd` (what admission held), `owner_local` (whether the core that served it owns the caller's budgets; see [`crate::net::handoff`]), `budget_asks` (cross-core messages its admission waited for: 0 when its budgets' owners or this core's slices of shared budgets covered it), `budget_refused` (on a 429),
//! `downgraded_from`, `max_tokens_lowered`; for requests that reached a provider, `usage` (`reported`, `estimated` or `none`), the token
//! counts (`input_tokens` uncached, `cached_input_tokens`, `cache_write_5m_tokens`, `cache_write_1h_tokens`,
//! `output_tokens` including `reasoning_tokens`), and the cost: `list_cost_pusd` / `cost_pusd` (exact integers
//! in pico-USD, list and negotiated) with `list_cost_usd` / `cost_usd` as decimal strings; and `error` (code
//! and message) when one occurred. Never a header value or a body: those may
//! carry credentials. Fails: never. Cost: ~300 ns of formatting on the core, no syscall.

use super::ctx::{Core, RequestCtx};
use crate::error::Error;
use crate::obs::accesslog::{json_str, now_rfc3339_into};

fn field_str(out: &mut Vec<u8>, name: &str, v: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    json_str(out, v);
}

fn field_num(out: &mut Vec<u8>, name: &str, v: u64) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

fn field_int(out: &mut Vec<u8>, name: &str, v: i128) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// The access-log line for a completed request.
pub fn access(core: &Core, ctx: &RequestCtx) {
    if !core.log.enabled() {
        return;
    }
    let total = quanta::Instant::now().duration_since(ctx.start);
    core.log.line(|out| {
        out.extend_from_slice(b"{\"ts\":");
        let mut ts = [0u8; 24];
        now_rfc3339_into(&mut ts);
        out.push(b'"');
        out.extend_from_slice(&ts);
        out.push(b'"');
        field_str(out, "event", "request");
        field_str(out, "request_id", &ctx.id);
        field_num(out, "core", core.id as u64);
        field_str(out, "method", ctx.head.method_str());
        field_str(out, "path", ctx.head.path());
        field_num(out, "status", u64::from(ctx.status));
        field_str(out, "outcome", ctx.outcome.as_str());
        field_str(out, "api", ctx.api.as_str());
        if let Some(id) = &ctx.identity {
            field_str(out, "identity_kind", id.kind.as_str());
            field_str(out, "subject", &id.subject);
            if let Some(e) = &id.email {
                field_str(out, "email", e);
            }
            out.extend_from_slice(b",\"groups\":[");
            for (i, g) in id.groups.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_str(out, g);
            }
            out.push(b']');
            field_str(out, "identity_source", &id.source);
            if let Some(t) = &id.token_id {
                field_str(out, "token_id", t);
            }
        }
        if let Some(p) = &ctx.provider {
            field_str(out, "provider", &p.name);
        }
        if let Some(m) = &ctx.downgraded_from {
            field_str(out, "downgraded_from", m);
        }
        if let Some((asked, n)) = ctx.max_tokens_lowered {
            field_num(out, "max_tokens_lowered", n);
            field_num(out, "max_tokens_asked", asked);
        }
        if let Some(r) = &ctx.refusal {
            field_str(out, "budget_refused", &r.label);
        }
        if let Some(m) = ctx.reserved {
            out.extend_from_slice(b",\"reserved_pusd\":");
            out.extend_from_slice(m.pico().to_string().as_bytes());
        }
        if let Some(local) = ctx.owner_local {
            out.extend_from_slice(if local {
                b",\"owner_local\":true"
            } else {
                b",\"owner_local\":false"
            });
        }
        if let Some(n) = ctx.budget_asks {
            out.extend_from_slice(b",\"budget_asks\":");
            out.extend_from_slice(n.to_string().as_bytes());
        }
        if let Some(r) = &ctx.route {
            field_str(out, "route", r);
        }
        if let Some(m) = &ctx.model {
            field_str(out, "model", m);
        }
        if let Some(m) = &ctx.upstream_model {
            field_str(out, "upstream_model", m);
        }
        out.extend_from_slice(if ctx.stream {
            b",\"stream\":true"
        } else {
            b",\"stream\":false"
        });
        field_num(out, "bytes_in", ctx.bytes_in);
        field_num(out, "bytes_out", ctx.bytes_out);
        if let Some(t) = ctx.upstream_ttfb {
            field_num(out, "upstream_ttfb_us", t.as_micros() as u64);
        }
        field_num(out, "total_us", total.as_micros() as u64);
        if let Some(a) = &ctx.account {
            let u = &a.usage;
            field_str(out, "usage", a.source.as_str());
            field_num(out, "input_tokens", u.input_tokens);
            field_num(out, "cached_input_tokens", u.cached_input_tokens);
            field_num(out, "cache_write_5m_tokens", u.cache_write_5m_tokens);
            field_num(out, "cache_write_1h_tokens", u.cache_write_1h_tokens);
            field_num(out, "output_tokens", u.output_tokens);
            field_num(out, "reasoning_tokens", u.reasoning_tokens);
            // Money in pico-USD (1e-12 USD) as exact integers, and as USD decimal strings for people.
            field_int(out, "list_cost_pusd", a.cost.list.pico());
            field_int(out, "cost_pusd", a.cost.effective.pico());
            field_str(out, "list_cost_usd", &a.cost.list.usd());
            field_str(out, "cost_usd", &a.cost.effective.usd());
        }
        if let Some(e) = &ctx.error {
            field_str(out, "error_code", e.code());
            field_str(out, "error", &e.message);
        }
        out.push(b'}');
    });
}

/// A request that failed before it had a context (unparseable head, oversize, timeout).
pub fn parse_failure(core: &Core, e: &Error) {
    if !core.log.enabled() {
        return;
    }
    core.log.line(|out| {
        out.extend_from_slice(b"{\"ts\":");
        let mut ts = [0u8; 24];
        now_rfc3339_into(&mut ts);
        out.push(b'"');
        out.extend_from_slice(&ts);
        out.push(b'"');
        field_str(out, "event", "request_rejected");
        field_num(out, "core", core.id as u64);
        field_num(out, "status", u64::from(e.status()));
        field_str(out, "error_code", e.code());
        field_str(out, "error", &e.message);
        out.push(b'}');
    });
}

/// Adds the request to the core's metrics (core-local counters; see [`crate::obs::metrics`]), beside its
/// access-log line and whether or not the access log is on.
pub fn count(core: &Core, ctx: &RequestCtx) {
    let settled = ctx.account.as_ref();
    core.metrics.record(&crate::obs::metrics::Sample {
        api: ctx.api.as_str(),
        provider: ctx.provider.as_deref().map(|p| &*p.label),
        model: ctx.billed_model.as_deref(),
        group: ctx
            .identity
            .as_ref()
            .and_then(|i| i.groups.first())
            .map(|g| &**g),
        outcome: ctx.outcome.as_str(),
        status: ctx.status,
        stream: ctx.stream,
        total: quanta::Instant::now().duration_since(ctx.start),
        added: ctx.upstream_sent,
        ttfb: ctx.upstream_ttfb,
        tokens: settled.map(|a| {
            let u = &a.usage;
            [
                u.input_tokens,
                u.output_tokens,
                u.cached_input_tokens,
                u.cache_write_5m_tokens + u.cache_write_1h_tokens,
                u.reasoning_tokens,
            ]
        }),
        cost: settled.map(|a| (a.cost.list.pico(), a.cost.effective.pico())),
        budget_asks: ctx.budget_asks.unwrap_or(0),
    });
}
