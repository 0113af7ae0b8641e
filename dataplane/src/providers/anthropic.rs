//! The Anthropic messages API (`POST /v1/messages`): everything it means on the wire.
//!
//! Owns: the path it serves and the header its SDK callers send (`anthropic-version`, which also picks this
//! API's shape for errors and `/v1/models` on paths that are not its own), the upstream credential
//! (`x-api-key`) and version header (`anthropic-version: 2023-06-01` when the client sent none), the output-cap
//! field (`max_tokens`), usage extraction (`message_start.message.usage`: `input_tokens`,
//! `cache_creation_input_tokens` with its `cache_creation.ephemeral_5m/1h_input_tokens` split,
//! `cache_read_input_tokens`; the cumulative `message_delta.usage.output_tokens`; a whole message's top-level
//! `usage`), the error body (`{"type":"error","error":{"type","message"}}`) and its mid-stream form (an
//! `event: error`), the `/v1/models` list shape, the final events of a cut stream (`content_block_stop` when
//! a block is open, `message_delta` with `stop_reason: "max_tokens"` and the counted output,
//! `message_stop`), and where prompt and generated text live for estimates (`system` and
//! `messages[].content`; `delta.text` in streams, `content[].text` in whole messages).
//!
//! Fails: never panics on provider or client bytes; usage that does not parse is reported as a failed parse.
//! Stream usage needs no request: Anthropic always streams it. Cost: one small `simd-json` parse per usage
//! event (`message_start`, `message_delta`); a cut stream tracks its open block with one `memmem` per run.

use bytes::Bytes;
use memchr::memmem;
use serde::Deserialize;
use tollgate_core::Usage;

use super::request::{Billing, Body};
use crate::error::{Error, Result};
use crate::net::sse::split_events;

/// The paths this API is served on; the first is the one named in errors and forwarded upstream.
pub const PATHS: &[&str] = &["/v1/messages", "/messages"];

/// The token-counting endpoint's paths (free: identified and authorized, never priced nor budgeted); the
/// first is forwarded upstream.
pub const COUNT_TOKENS_PATHS: &[&str] = &["/v1/messages/count_tokens", "/messages/count_tokens"];

/// The smallest `thinking.budget_tokens` the API accepts.
pub const MIN_THINKING_BUDGET: u64 = 1024;

/// The request header this API's SDKs always send.
pub const SDK_HEADER: &str = "anthropic-version";

/// `x-api-key: KEY\r\n`.
pub fn auth_lines(key: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"x-api-key: ");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Headers sent upstream when the client sent none of that name: the API version Tollgate speaks.
pub const DEFAULT_HEADERS: &[(&str, &str)] = &[("anthropic-version", "2023-06-01")];

/// The field that caps the output (extended thinking counts within it: `budget_tokens` must be below it).
pub const CAP_FIELDS: &[&str] = &["max_tokens"];

/// Server tools the provider runs and bills per use or per fetched page, which no price the gateway holds
/// bounds (tool `type` prefixes).
const SERVER_TOOLS: &[&str] = &["web_search_", "web_fetch_", "code_execution_"];

/// What a messages request makes the provider generate and bill. `max_tokens` is required (absent or
/// `null`: 400, as the API answers). Refused (400), because no price the gateway holds bounds them: server
/// tools (web search, web fetch, code execution), MCP servers and containers (tools run by the provider),
/// and document parts (a PDF's tokens are not bounded by its bytes).
pub fn view(body: &Body<'_>) -> Result<Billing> {
    let Some(cap) = body.count("max_tokens")? else {
        return Err(Error::invalid_body(
            "`max_tokens` is required and must be a number (the messages API refuses a request without it)",
        ));
    };
    let unbounded = |field: &str, why: &str| {
        Err(Error::unbounded_cost(format!(
            "`{field}`: {why}; Tollgate cannot reserve its cost before forwarding, so the request is refused"
        )))
    };
    if let Some(tools) = body.get("tools") {
        for prefix in SERVER_TOOLS {
            let needle = format!("\"{prefix}");
            if tools.raw.contains(&needle) {
                return unbounded("tools", "server tools are billed per use by the provider");
            }
        }
    }
    for field in ["mcp_servers", "container"] {
        if body.get(field).is_some_and(|m| !m.is_null()) {
            return unbounded(field, "tools run by the provider are billed per use");
        }
    }
    if super::json::type_count(body.bytes, b"\"document\"") > 0 {
        return unbounded(
            "messages[].document",
            "a document's tokens are not bounded by its size",
        );
    }
    Ok(Billing {
        cap: Some(cap),
        choices: 1,
        stream: body.flag("stream")?,
        client_usage: false,
        stored_input: false,
        input_tokens: None,
    })
}

/// What a token-counting request bills: nothing. It takes a messages body without `max_tokens` (the API
/// refuses one: it generates nothing), so nothing is read but what the route phase reads (`model`); the
/// provider answers anything else it refuses in its own shape. The cap is 0 tokens: no policy cap is ever
/// written into it.
pub fn count_tokens_view(_body: &Body<'_>) -> Result<Billing> {
    Ok(Billing {
        cap: Some(0),
        choices: 1,
        stream: false,
        client_usage: false,
        input_tokens: Some(0),
        stored_input: false,
    })
}

/// When the output cap is lowered to `cap` and the request thinks (`thinking.type: "enabled"`) with a
/// `budget_tokens` the cap no longer leaves room for, the `thinking` member rewritten with the budget just
/// below the cap (the API requires `budget_tokens < max_tokens`); `None` when nothing needs changing.
/// Fails (400) when the fitted budget would be below the API's minimum of [`MIN_THINKING_BUDGET`].
pub fn fit_thinking(body: &Body<'_>, cap: u64) -> Result<Option<String>> {
    let Some(m) = body.get("thinking").filter(|m| !m.is_null()) else {
        return Ok(None);
    };
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(m.raw) else {
        return Ok(None);
    };
    if v.get("type").and_then(|t| t.as_str()) != Some("enabled") {
        return Ok(None);
    }
    let Some(budget) = v.get("budget_tokens").and_then(|b| b.as_u64()) else {
        return Ok(None);
    };
    if budget < cap {
        return Ok(None);
    }
    let fitted = cap.saturating_sub(1);
    if fitted < MIN_THINKING_BUDGET {
        return Err(Error::bad_request(format!(
            "`max_tokens` is lowered to {cap}, which leaves no room for `thinking.budget_tokens` ({budget}): it must stay below `max_tokens` and be at least {MIN_THINKING_BUDGET}; ask for less thinking or turn it off"
        )));
    }
    v["budget_tokens"] = serde_json::Value::from(fitted);
    Ok(Some(v.to_string()))
}

/// The output cap as a member to splice into the body (Anthropic requires `max_tokens` anyway).
pub fn max_tokens_member(n: u64) -> String {
    format!("\"max_tokens\":{n},")
}

#[derive(Deserialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: Option<u64>,
    ephemeral_1h_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct UsageIn {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation: Option<CacheCreation>,
}

#[derive(Deserialize)]
struct Message {
    usage: Option<UsageIn>,
}

/// A non-streamed message, `message_start` (usage under `message`) or `message_delta` (usage at the top).
#[derive(Deserialize)]
struct Envelope {
    message: Option<Message>,
    usage: Option<UsageIn>,
}

/// Usage reported so far in one response.
#[derive(Debug, Default)]
pub struct Meter {
    input: Option<u64>,
    cache_creation: u64,
    cache_5m: Option<u64>,
    cache_1h: Option<u64>,
    cache_read: u64,
    output: Option<u64>,
}

impl Meter {
    /// Parses one JSON document (an event's data or a whole body; parsed in place). `false` when it is not
    /// JSON of the expected shape.
    pub fn observe(&mut self, json: &mut [u8]) -> bool {
        match simd_json::serde::from_slice::<Envelope>(json) {
            Ok(env) => {
                // message_start's `output_tokens` is a placeholder (1); the count comes from
                // message_delta (cumulative) or a non-streamed message's top-level usage.
                if let Some(u) = env.message.and_then(|m| m.usage) {
                    self.merge(u, false);
                }
                if let Some(u) = env.usage {
                    self.merge(u, true);
                }
                true
            }
            Err(_) => false,
        }
    }

    fn merge(&mut self, u: UsageIn, final_output: bool) {
        if let Some(v) = u.input_tokens {
            self.input = Some(v);
        }
        // output_tokens is cumulative in message_delta: the latest value is the total.
        if let Some(v) = u.output_tokens.filter(|_| final_output) {
            self.output = Some(v);
        }
        if let Some(v) = u.cache_creation_input_tokens {
            self.cache_creation = v;
        }
        if let Some(v) = u.cache_read_input_tokens {
            self.cache_read = v;
        }
        if let Some(c) = u.cache_creation {
            if c.ephemeral_5m_input_tokens.is_some() {
                self.cache_5m = c.ephemeral_5m_input_tokens;
            }
            if c.ephemeral_1h_input_tokens.is_some() {
                self.cache_1h = c.ephemeral_1h_input_tokens;
            }
        }
    }

    /// Input (message_start) together with output (message_delta or the message itself), once both arrived.
    pub fn usage(&self) -> Option<Usage> {
        Some(Usage::from_anthropic(
            self.input?,
            self.cache_creation,
            self.cache_5m,
            self.cache_1h,
            self.cache_read,
            self.output?,
        ))
    }

    /// Reported input and output so far.
    pub fn partial(&self) -> (Option<u64>, Option<u64>) {
        (self.input, self.output)
    }
}

/// The error `type` Anthropic's SDK expects for this error's status.
pub fn error_type(e: &Error) -> &'static str {
    match e.status() {
        401 => "authentication_error",
        404 => "not_found_error",
        403 => "permission_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        503 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

/// `{"type":"error","error":{"type":...,"message":...}}`
pub fn error_json(e: &Error) -> serde_json::Value {
    serde_json::json!({
        "type": "error",
        "error": { "type": error_type(e), "message": e.message }
    })
}

/// A mid-stream error: an `event: error` holding the error body.
pub fn stream_error_event(body: &str) -> Vec<u8> {
    format!("event: error\ndata: {body}\n\n").into_bytes()
}

/// `GET /v1/models` in Anthropic's list shape; `names` are (model, owning provider).
pub fn models_list(names: &[(&str, &str)]) -> serde_json::Value {
    serde_json::json!({
        "data": names.iter().map(|(id, _)| serde_json::json!({
            "type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"
        })).collect::<Vec<_>>(),
        "has_more": false,
        "first_id": names.first().map(|n| n.0),
        "last_id": names.last().map(|n| n.0),
    })
}

/// Appends the prompt text of a request body (`system`, then `messages[].content`) and returns the number
/// of messages.
pub fn prompt_text(obj: &serde_json::Map<String, serde_json::Value>, out: &mut String) -> u64 {
    if let Some(system) = obj.get("system") {
        super::json::push_text(system, out, true);
    }
    super::json::push_messages(obj, out)
}

/// Appends the generated text of one event's or body's JSON: `delta.text` (`content_block_delta`) and
/// `content[].text` (whole messages).
pub fn generated_text(v: &serde_json::Value, out: &mut String) {
    if let Some(t) = v.get("delta").and_then(|d| d.get("text")) {
        super::json::push_text(t, out, false);
    }
    if let Some(content) = v.get("content") {
        super::json::push_text(content, out, false);
    }
}

/// What the final events of a cut stream need: the index of the content block open (started, not
/// stopped), if any.
#[derive(Debug, Clone, Default)]
pub struct StreamEnd {
    open_block: Option<u64>,
}

impl StreamEnd {
    /// One `memmem` over the run; the events are walked only when a block starts or stops in it.
    pub fn track(&mut self, run: &Bytes) {
        if memmem::find(run, b"content_block_st").is_some() {
            for event in split_events(run) {
                if event.starts_with(b"event: content_block_start") {
                    self.open_block = Some(block_index(event).unwrap_or(0));
                } else if event.starts_with(b"event: content_block_stop") {
                    self.open_block = None;
                }
            }
        }
    }

    /// `content_block_stop` (when a block is open), `message_delta` with `stop_reason: "max_tokens"` and
    /// `output_tokens` counted, `message_stop`.
    pub fn tail(&self, output_tokens: u64) -> Vec<u8> {
        let mut out = String::new();
        if let Some(i) = self.open_block {
            out.push_str(&format!(
                "event: content_block_stop\ndata: {{\"type\":\"content_block_stop\",\"index\":{i}}}\n\n"
            ));
        }
        out.push_str(&format!(
            "event: message_delta\ndata: {{\"type\":\"message_delta\",\"delta\":{{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null}},\"usage\":{{\"output_tokens\":{output_tokens}}}}}\n\n"
        ));
        out.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        out.into_bytes()
    }
}

/// An event's `"index"`.
fn block_index(event: &[u8]) -> Option<u64> {
    super::json::data_json(event)?.get("index")?.as_u64()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn fit(body: &str, cap: u64) -> Result<Option<String>> {
        fit_thinking(&Body::parse(body.as_bytes()).unwrap(), cap)
    }

    #[test]
    fn thinking_is_fitted_below_a_lowered_cap_or_refused_when_it_cannot_be() {
        let b = r#"{"max_tokens":32000,"thinking":{"type":"enabled","budget_tokens":31999}}"#;
        let t: serde_json::Value = serde_json::from_str(&fit(b, 4096).unwrap().unwrap()).unwrap();
        assert_eq!(
            t,
            serde_json::json!({"type": "enabled", "budget_tokens": 4095})
        );
        // Room enough, no thinking, another type: nothing to change.
        assert_eq!(fit(b, 32000).unwrap(), None);
        assert_eq!(fit(r#"{"max_tokens":9}"#, 5).unwrap(), None);
        assert_eq!(fit(r#"{"thinking":{"type":"disabled"}}"#, 5).unwrap(), None);
        let e = fit(b, 1024).unwrap_err();
        assert_eq!(e.status(), 400);
        assert!(
            e.message.contains("thinking.budget_tokens"),
            "{}",
            e.message
        );
        assert_eq!(
            fit(b, 1025).unwrap().unwrap(),
            r#"{"budget_tokens":1024,"type":"enabled"}"#
        );
    }
}
