//! The OpenAI Responses API (`POST /v1/responses`): everything it means on the wire that chat completions
//! does not. Served by providers of kind `openai` (same host, key and error shape as [`super::openai`], which
//! `mod.rs` dispatches those items to).
//!
//! Owns: the paths it serves, the strict request view ([`view`]: the members the API documents, their JSON
//! types, the output cap `max_output_tokens` (at least 16, as the API requires), function tools allowed and
//! built-in tools refused, input the body only refers to), the output-cap member, usage extraction (a
//! response's `usage`: top level in a whole body, under `response` in the `response.completed`,
//! `response.incomplete` and `response.failed` events; `input_tokens` with `input_tokens_details.cached_tokens`,
//! `output_tokens` with `output_tokens_details.reasoning_tokens`), the mid-stream error (`event: error` and a
//! terminal `event: response.failed`), the final event of a cut stream (`response.incomplete` with
//! `incomplete_details.reason: "max_output_tokens"`, as the API ends a stream at its cap), and where prompt
//! and generated text live for estimates (`instructions` and `input`; `*.delta` events, a whole response's
//! `output`).
//!
//! Fails: never panics on provider or client bytes. A body member of the wrong type, an unknown member (the
//! API refuses them too) or a cap below 16 is a 400 `invalid_body` naming it; a member whose cost the gateway
//! cannot bound (built-in tools, `background`, a stored `prompt`, file inputs, the priority tier) is a 400
//! `cost_unbounded` naming it. Usage that does not parse is a failed parse (counted by
//! [`super::meter::UsageMeter`]). Cost: the view is a walk over the top-level members the body parse already
//! typed, plus one small parse of `tools`; one small `simd-json` parse per usage-bearing event (the final one);
//! a cut stream tracks its response id and sequence number with one `memmem` per run.

use bytes::Bytes;
use memchr::memmem;
use serde::Deserialize;
use tollgate_core::Usage;

use super::request::{Billing, Body, Kind};
use crate::error::{Error, Result};
use crate::net::sse::split_events;

/// The paths this API is served on; the first is the one named in errors.
pub const PATHS: &[&str] = &["/v1/responses", "/responses"];

/// The field that caps a response's output (reasoning included).
pub const CAP_FIELDS: &[&str] = &["max_output_tokens"];

/// The smallest `max_output_tokens` the API accepts.
pub const MIN_CAP: u64 = 16;

/// Tool types the client runs itself: the provider bills only the tokens of the call and of its output
/// (which comes back as input of the next request, in its body). Every other type (`web_search*`,
/// `file_search`, `code_interpreter`, `image_generation`, `mcp`, `computer_use_preview`, ...) is run or
/// billed by the provider per use, beyond any token bound.
const CLIENT_TOOLS: &[&str] = &["function", "custom", "local_shell"];

/// The documented request members and the JSON types each may have (`null` is accepted for all of them:
/// the API reads it as "not set").
const MEMBERS: &[(&str, &[Kind])] = &[
    ("model", &[Kind::String]),
    ("input", &[Kind::String, Kind::Array]),
    ("instructions", &[Kind::String]),
    ("max_output_tokens", &[Kind::Number]),
    ("tools", &[Kind::Array]),
    ("tool_choice", &[Kind::String, Kind::Object]),
    ("parallel_tool_calls", &[Kind::Bool]),
    ("stream", &[Kind::Bool]),
    ("stream_options", &[Kind::Object]),
    ("reasoning", &[Kind::Object]),
    ("text", &[Kind::Object]),
    ("store", &[Kind::Bool]),
    ("temperature", &[Kind::Number]),
    ("top_p", &[Kind::Number]),
    ("top_logprobs", &[Kind::Number]),
    ("max_tool_calls", &[Kind::Number]),
    ("metadata", &[Kind::Object]),
    ("user", &[Kind::String]),
    ("safety_identifier", &[Kind::String]),
    ("include", &[Kind::Array]),
    ("truncation", &[Kind::String]),
    ("service_tier", &[Kind::String]),
    ("prompt_cache_key", &[Kind::String]),
    ("prompt_cache_retention", &[Kind::String]),
    ("previous_response_id", &[Kind::String]),
    ("conversation", &[Kind::String, Kind::Object]),
    ("background", &[Kind::Bool]),
    ("prompt", &[Kind::Object]),
    // Request metadata clients attach (Codex CLI sends its turn's ids here); it does not change the cost.
    ("client_metadata", &[Kind::Object]),
];

#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(rename = "type", borrow)]
    kind: Option<std::borrow::Cow<'a, str>>,
    /// A `namespace` tool groups other tools (Codex CLI sends its sub-agent functions so); each is checked.
    #[serde(default, borrow)]
    tools: Vec<Tool<'a>>,
}

/// The first tool in `list` (nested namespaces included) the client does not run itself: its path and type.
fn provider_run<'t>(list: &'t [Tool<'t>], at: &str) -> Option<(String, &'t str)> {
    for (i, t) in list.iter().enumerate() {
        let kind = t.kind.as_deref().unwrap_or("");
        let here = format!("{at}[{i}]");
        if kind == "namespace" {
            if let Some(found) = provider_run(&t.tools, &format!("{here}.tools")) {
                return Some(found);
            }
        } else if !CLIENT_TOOLS.contains(&kind) {
            return Some((here, kind));
        }
    }
    None
}

/// What a Responses request makes the provider generate and bill.
///
/// The cap is `max_output_tokens` (visible output and reasoning together). Input the body does not show
/// (`previous_response_id`, `conversation`, `item_reference` input items) is marked
/// [`Billing::stored_input`]: the admit phase bounds it by the model's context window. Refused (400
/// `cost_unbounded`), because no price the gateway holds bounds them: built-in tools (billed per call or
/// per stored gigabyte), `background` (the usage is only in a later poll the gateway never sees), a stored
/// `prompt` (its text, tools and settings are not in the body), file inputs (a PDF's tokens are not bounded
/// by its bytes) and the priority tier.
pub fn view(body: &Body<'_>) -> Result<Billing> {
    for key in body.keys() {
        let Some((_, kinds)) = MEMBERS.iter().find(|(name, _)| *name == key) else {
            return Err(Error::invalid_body(format!(
                "unknown parameter `{}`: the Responses API does not accept it",
                truncate(key, 64)
            )));
        };
        match body.kind(key) {
            Some(Kind::Null) | None => {}
            Some(k) if kinds.contains(&k) => {}
            Some(k) => {
                let want: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
                return Err(Error::invalid_body(format!(
                    "`{key}` must be {} or null, not {}",
                    want.join(" or "),
                    k.as_str()
                )));
            }
        }
    }
    let cap = body.count("max_output_tokens")?;
    if let Some(c) = cap.filter(|c| *c < MIN_CAP) {
        return Err(Error::invalid_body(format!(
            "`max_output_tokens` must be at least {MIN_CAP}, not {c}"
        )));
    }
    let unbounded = |field: &str, why: &str| {
        Err(Error::unbounded_cost(format!(
            "`{field}`: {why}; Tollgate cannot reserve its cost before forwarding, so the request is refused"
        )))
    };
    if let Some(tools) = body.get("tools").filter(|m| !m.is_null()) {
        let list: Vec<Tool<'_>> = serde_json::from_str(tools.raw)
            .map_err(|_| Error::invalid_body("`tools` must be an array of tool objects"))?;
        if let Some((at, kind)) = provider_run(&list, "tools") {
            return unbounded(
                &at,
                &format!(
                    "the built-in tool `{}` is run and billed per use by the provider",
                    truncate(kind, 64)
                ),
            );
        }
    }
    if body.flag("background")? {
        return unbounded(
            "background",
            "a background response's usage is only known to a later poll, which the gateway does not see",
        );
    }
    if body.get("prompt").is_some_and(|m| !m.is_null()) {
        return unbounded(
            "prompt",
            "a stored prompt's text, tools and settings are not in the request",
        );
    }
    if let Some(tier) = body.string("service_tier")? {
        if !matches!(tier.as_ref(), "auto" | "default" | "flex") {
            return unbounded(
                "service_tier",
                "only the standard and flex tiers are priced",
            );
        }
    }
    if let Some(t) = body.string("truncation")? {
        if !matches!(t.as_ref(), "auto" | "disabled") {
            return Err(Error::invalid_body(
                "`truncation` must be \"auto\" or \"disabled\"",
            ));
        }
    }
    let raw = body.bytes;
    // Parts anywhere in the input; a key's quotes are never escaped, so no text matches.
    if super::json::type_count(raw, b"\"input_file\"") > 0 {
        return unbounded(
            "input[].input_file",
            "a file's tokens are not bounded by its size",
        );
    }
    if body
        .string("previous_response_id")?
        .is_some_and(|s| s.is_empty())
    {
        return Err(Error::invalid_body(
            "`previous_response_id` must not be empty",
        ));
    }
    let stored_input = body
        .get("previous_response_id")
        .is_some_and(|m| !m.is_null())
        || body.get("conversation").is_some_and(|m| !m.is_null())
        || super::json::type_count(raw, b"\"item_reference\"") > 0;
    Ok(Billing {
        cap,
        choices: 1,
        stream: body.flag("stream")?,
        client_usage: false,
        stored_input,
        input_tokens: None,
    })
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// The output cap as a member to splice into the body.
pub fn max_tokens_member(n: u64) -> String {
    format!("\"max_output_tokens\":{n},")
}

#[derive(Deserialize)]
struct DetailsIn {
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct DetailsOut {
    reasoning_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct UsageIn {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    input_tokens_details: Option<DetailsIn>,
    output_tokens_details: Option<DetailsOut>,
}

#[derive(Deserialize)]
struct Response {
    usage: Option<UsageIn>,
}

/// A whole response (usage at the top) or a stream event (usage under `response`).
#[derive(Deserialize)]
struct Envelope {
    usage: Option<UsageIn>,
    response: Option<Response>,
}

/// Usage reported so far in one response.
#[derive(Debug, Default)]
pub struct Meter {
    input: Option<u64>,
    cached: u64,
    output: Option<u64>,
    reasoning: u64,
}

impl Meter {
    /// Parses one JSON document (an event's data or a whole body; parsed in place). `false` when it is not
    /// JSON of the expected shape.
    pub fn observe(&mut self, json: &mut [u8]) -> bool {
        match simd_json::serde::from_slice::<Envelope>(json) {
            Ok(env) => {
                for u in [env.usage, env.response.and_then(|r| r.usage)]
                    .into_iter()
                    .flatten()
                {
                    self.input = u.input_tokens.or(self.input);
                    self.output = u.output_tokens.or(self.output);
                    if let Some(c) = u.input_tokens_details.and_then(|d| d.cached_tokens) {
                        self.cached = c;
                    }
                    if let Some(r) = u.output_tokens_details.and_then(|d| d.reasoning_tokens) {
                        self.reasoning = r;
                    }
                }
                true
            }
            Err(_) => false,
        }
    }

    /// The usage, once both counts arrived. `input_tokens` includes the cached ones and `output_tokens` the
    /// reasoning ones, as in chat completions.
    pub fn usage(&self) -> Option<Usage> {
        Some(Usage::from_openai(
            self.input?,
            self.cached,
            self.output?,
            self.reasoning,
        ))
    }

    /// Reported input and output so far.
    pub fn partial(&self) -> (Option<u64>, Option<u64>) {
        (self.input, self.output)
    }
}

/// A mid-stream error, as the API ends a failed stream: an `error` event (`type`, `code`, `message`,
/// `param`), then the terminal `response.failed` whose `response.error` holds the code and message (what
/// clients that wait for the response's final state, such as Codex, read).
pub fn stream_error_event(e: &Error) -> Vec<u8> {
    let error = serde_json::json!({
        "type": "error",
        "code": e.code(),
        "message": e.message,
        "param": null,
    });
    let failed = serde_json::json!({
        "type": "response.failed",
        "response": {
            "object": "response",
            "status": "failed",
            "error": {"code": e.code(), "message": e.message},
            "incomplete_details": null,
            "output": [],
            "usage": null,
        },
    });
    format!("event: error\ndata: {error}\n\nevent: response.failed\ndata: {failed}\n\n")
        .into_bytes()
}

/// Appends the prompt text of a request body (`instructions`, then `input`: a string, or items whose
/// `content`, `arguments` or `output` hold text) and returns the number of input items.
pub fn prompt_text(obj: &serde_json::Map<String, serde_json::Value>, out: &mut String) -> u64 {
    if let Some(i) = obj.get("instructions") {
        super::json::push_text(i, out, true);
    }
    match obj.get("input") {
        Some(serde_json::Value::String(s)) => {
            out.push_str(s);
            out.push('\n');
            1
        }
        Some(serde_json::Value::Array(items)) => {
            for item in items {
                for key in ["content", "arguments", "output", "input"] {
                    if let Some(t) = item.get(key) {
                        super::json::push_text(t, out, true);
                    }
                }
            }
            items.len() as u64
        }
        _ => 0,
    }
}

/// Appends the generated text of one event's or body's JSON: the `delta` of `*.delta` events (output text,
/// function-call arguments, reasoning summaries) in streams; a whole response's `output[]` (message
/// `content[].text`, function-call `arguments`). The `*.done` and `response.completed` events repeat what
/// the deltas said and are not counted.
pub fn generated_text(v: &serde_json::Value, out: &mut String) {
    if let Some(kind) = v.get("type").and_then(|t| t.as_str()) {
        if kind.ends_with(".delta") {
            if let Some(serde_json::Value::String(d)) = v.get("delta") {
                out.push_str(d);
            }
        }
        return;
    }
    for item in v
        .get("output")
        .and_then(|o| o.as_array())
        .into_iter()
        .flatten()
    {
        if let Some(c) = item.get("content") {
            super::json::push_text(c, out, false);
        }
        if let Some(serde_json::Value::String(a)) = item.get("arguments") {
            out.push_str(a);
        }
    }
}

/// What the final event of a cut stream needs: the response as `response.created` announced it (id,
/// model, creation time) and the last `sequence_number` relayed.
#[derive(Debug, Clone, Default)]
pub struct StreamEnd {
    response: Option<serde_json::Value>,
    sequence: Option<u64>,
}

impl StreamEnd {
    /// One `memmem` per run for the sequence number; `response.created` is parsed once.
    pub fn track(&mut self, run: &Bytes) {
        if self.response.is_none() && memmem::find(run, b"response.created").is_some() {
            for event in split_events(run) {
                if let Some(v) = super::json::data_json(event) {
                    if v.get("type").and_then(|t| t.as_str()) == Some("response.created") {
                        self.response = v.get("response").cloned();
                    }
                }
            }
        }
        if let Some(at) = memmem::rfind(run, b"\"sequence_number\":") {
            let digits = &run[at + b"\"sequence_number\":".len()..];
            let digits = &digits[..digits
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(digits.len())];
            if let Some(n) = std::str::from_utf8(digits)
                .ok()
                .and_then(|d| d.parse::<u64>().ok())
            {
                self.sequence = Some(n);
            }
        }
    }

    /// `response.incomplete` with `incomplete_details.reason: "max_output_tokens"` (what the API sends when
    /// a response reaches its cap), the response's id, model and creation time, and the output tokens
    /// counted; the next sequence number.
    pub fn tail(&self, output_tokens: u64) -> Vec<u8> {
        let mut response = self
            .response
            .clone()
            .filter(|r| r.is_object())
            .unwrap_or_else(|| serde_json::json!({"object": "response"}));
        response["status"] = "incomplete".into();
        response["incomplete_details"] = serde_json::json!({"reason": "max_output_tokens"});
        response["usage"] = serde_json::json!({
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
        });
        let event = serde_json::json!({
            "type": "response.incomplete",
            "sequence_number": self.sequence.map_or(0, |n| n + 1),
            "response": response,
        });
        format!("event: response.incomplete\ndata: {event}\n\n").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::error::ErrorKind;

    fn view_of(body: &str) -> Result<Billing> {
        view(&Body::parse(body.as_bytes()).unwrap())
    }

    #[test]
    fn a_codex_request_is_read_as_the_api_reads_it() {
        let b = view_of(
            r#"{"model":"gpt-5","instructions":"be brief","input":[{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]},{"type":"function_call","call_id":"c","name":"shell","arguments":"{}"},{"type":"function_call_output","call_id":"c","output":"ok"},{"type":"reasoning","summary":[],"encrypted_content":"xyz"}],"tools":[{"type":"function","name":"shell","parameters":{}},{"type":"custom","name":"apply_patch"},{"type":"local_shell"}],"tool_choice":"auto","parallel_tool_calls":false,"reasoning":{"effort":"medium","summary":"auto"},"store":false,"stream":true,"include":["reasoning.encrypted_content"],"prompt_cache_key":"k","text":{"verbosity":"low"}}"#,
        )
        .unwrap();
        assert_eq!(
            (b.cap, b.choices, b.stream, b.stored_input),
            (None, 1, true, false)
        );
        let b = view_of(r#"{"model":"m","input":"hi","max_output_tokens":16}"#).unwrap();
        assert_eq!(b.cap, Some(16));
        let b = view_of(r#"{"model":"m","input":"hi","previous_response_id":"resp_1"}"#).unwrap();
        assert!(b.stored_input);
        let b = view_of(r#"{"model":"m","conversation":{"id":"conv_1"}}"#).unwrap();
        assert!(b.stored_input);
        let b =
            view_of(r#"{"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}"#).unwrap();
        assert!(b.stored_input);
    }

    /// What Codex CLI 0.171 sends besides the documented members: `client_metadata`, and a `namespace`
    /// tool of functions (its sub-agents). A namespace hiding a built-in tool is still refused, by path.
    #[test]
    fn codex_metadata_and_namespaces_of_functions_are_read_and_a_hidden_builtin_is_not() {
        let ok = view_of(
            r#"{"model":"gpt-5","input":"hi","client_metadata":{"x-codex-turn-metadata":"{}"},"tools":[{"type":"namespace","name":"multi_agent_v1","description":"d","tools":[{"type":"function","name":"close_agent","parameters":{}}]}]}"#,
        );
        assert!(ok.is_ok(), "{ok:?}");
        let hidden = view_of(
            r#"{"model":"gpt-5","input":"hi","tools":[{"type":"namespace","name":"n","tools":[{"type":"function","name":"f"},{"type":"web_search"}]}]}"#,
        )
        .unwrap_err();
        assert!(hidden.to_string().contains("tools[0].tools[1]"), "{hidden}");
    }

    #[test]
    fn bad_input_is_refused_naming_the_field() {
        for (body, kind, field) in [
            (
                r#"{"model":"m","max_output_tokens":15}"#,
                ErrorKind::InvalidBody,
                "`max_output_tokens` must be at least 16",
            ),
            (
                r#"{"model":"m","max_output_tokens":-1}"#,
                ErrorKind::InvalidBody,
                "`max_output_tokens`",
            ),
            (
                r#"{"model":"m","max_output_tokens":"100"}"#,
                ErrorKind::InvalidBody,
                "`max_output_tokens`",
            ),
            (
                r#"{"model":"m","input":5}"#,
                ErrorKind::InvalidBody,
                "`input` must be a string or an array",
            ),
            (
                r#"{"model":"m","stream":"yes"}"#,
                ErrorKind::InvalidBody,
                "`stream`",
            ),
            (
                r#"{"model":"m","tools":{}}"#,
                ErrorKind::InvalidBody,
                "`tools`",
            ),
            (
                r#"{"model":"m","max_tokens":100}"#,
                ErrorKind::InvalidBody,
                "unknown parameter `max_tokens`",
            ),
            (
                r#"{"model":"m","truncation":"sometimes"}"#,
                ErrorKind::InvalidBody,
                "`truncation`",
            ),
            (
                r#"{"model":"m","tools":[{"type":"function","name":"f"},{"type":"web_search"}]}"#,
                ErrorKind::UnboundedCost,
                "`tools[1]`",
            ),
            (
                r#"{"model":"m","tools":[{"type":"file_search","vector_store_ids":["v"]}]}"#,
                ErrorKind::UnboundedCost,
                "file_search",
            ),
            (
                r#"{"model":"m","tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}"#,
                ErrorKind::UnboundedCost,
                "code_interpreter",
            ),
            (
                r#"{"model":"m","service_tier":"priority"}"#,
                ErrorKind::UnboundedCost,
                "service_tier",
            ),
            (
                r#"{"model":"m","background":true}"#,
                ErrorKind::UnboundedCost,
                "background",
            ),
            (
                r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#,
                ErrorKind::UnboundedCost,
                "prompt",
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_file","file_id":"f"}]}]}"#,
                ErrorKind::UnboundedCost,
                "input_file",
            ),
        ] {
            let e = match view_of(body) {
                Ok(b) => panic!("{body} was accepted as {b:?}"),
                Err(e) => e,
            };
            assert_eq!(e.kind, kind, "{body}: {}", e.message);
            assert!(e.message.contains(field), "{body}: {}", e.message);
        }
        // Nulls are "not set", as the API reads them.
        let b = view_of(
            r#"{"model":"m","max_output_tokens":null,"tools":null,"previous_response_id":null}"#,
        )
        .unwrap();
        assert_eq!((b.cap, b.stored_input), (None, false));
    }

    const STREAM: &[u8] = b"event: response.created\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"created_at\":7,\"status\":\"in_progress\",\"model\":\"gpt-5\",\"output\":[],\"usage\":null}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"sequence_number\":4,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"delta\":\"Hello usage\"}\n\n\
event: response.output_text.done\ndata: {\"type\":\"response.output_text.done\",\"sequence_number\":5,\"item_id\":\"msg_1\",\"output_index\":0,\"content_index\":0,\"text\":\"Hello usage\"}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"sequence_number\":8,\"response\":{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"output\":[{\"type\":\"message\",\"content\":[{\"type\":\"output_text\",\"text\":\"Hello usage\"}]}],\"usage\":{\"input_tokens\":1200,\"input_tokens_details\":{\"cached_tokens\":1000},\"output_tokens\":300,\"output_tokens_details\":{\"reasoning_tokens\":120},\"total_tokens\":1500}}}\n\n";

    #[test]
    fn usage_from_a_stream_and_a_body() {
        let mut m = super::super::meter::UsageMeter::new(super::super::Api::OpenAiResponses);
        m.observe_events(STREAM);
        let u = m.usage().unwrap();
        assert_eq!(
            (
                u.input_tokens,
                u.cached_input_tokens,
                u.output_tokens,
                u.reasoning_tokens
            ),
            (200, 1000, 300, 120)
        );
        assert_eq!(m.parse_failures(), 0);
        let mut m = super::super::meter::UsageMeter::new(super::super::Api::OpenAiResponses);
        m.observe_json(br#"{"id":"resp_1","object":"response","status":"completed","output":[],"usage":{"input_tokens":10,"input_tokens_details":{"cached_tokens":0},"output_tokens":5,"output_tokens_details":{"reasoning_tokens":0},"total_tokens":15}}"#);
        let u = m.usage().unwrap();
        assert_eq!((u.input_tokens, u.output_tokens), (10, 5));
        // Every split of the stream gives the same usage.
        for size in 1..STREAM.len() {
            let mut framer = crate::net::sse::SseFramer::new();
            let mut m = super::super::meter::UsageMeter::new(super::super::Api::OpenAiResponses);
            for piece in STREAM.chunks(size) {
                if let Some(run) = framer.push(Bytes::copy_from_slice(piece)) {
                    m.observe_events(&run);
                }
            }
            assert_eq!(
                m.usage().map(|u| u.output_tokens),
                Some(300),
                "split {size}"
            );
        }
        // Garbage and truncation never panic nor invent usage.
        for i in 0..STREAM.len() {
            let mut v = STREAM.to_vec();
            v[i] = b'{';
            let mut m = super::super::meter::UsageMeter::new(super::super::Api::OpenAiResponses);
            m.observe_events(&v);
        }
        let mut m = super::super::meter::UsageMeter::new(super::super::Api::OpenAiResponses);
        m.observe_events(&STREAM[..STREAM.len() - 40]);
        assert_eq!(m.usage(), None);
    }

    #[test]
    fn generated_text_counts_deltas_once() {
        let mut text = String::new();
        for event in split_events(STREAM) {
            if let Some(v) = super::super::json::data_json(event) {
                generated_text(&v, &mut text);
            }
        }
        assert_eq!(text, "Hello usage");
        let mut text = String::new();
        let body: serde_json::Value = serde_json::from_str(r#"{"object":"response","output":[{"type":"message","content":[{"type":"output_text","text":"Hi"}]},{"type":"function_call","arguments":"{\"a\":1}"}]}"#).unwrap();
        generated_text(&body, &mut text);
        assert_eq!(text, "Hi{\"a\":1}");
    }

    #[test]
    fn the_cut_tail_is_a_well_formed_incomplete_response() {
        let mut end = StreamEnd::default();
        let upto = memmem::find(STREAM, b"event: response.output_text.done").unwrap();
        end.track(&Bytes::copy_from_slice(&STREAM[..upto]));
        let tail = end.tail(42);
        let events: Vec<&[u8]> = split_events(&tail).collect();
        assert_eq!(events.len(), 1);
        assert!(events[0].starts_with(b"event: response.incomplete\n"));
        let v = super::super::json::data_json(events[0]).unwrap();
        assert_eq!(v["type"], "response.incomplete");
        assert_eq!(v["sequence_number"], 5);
        assert_eq!(v["response"]["id"], "resp_1");
        assert_eq!(v["response"]["model"], "gpt-5");
        assert_eq!(v["response"]["status"], "incomplete");
        assert_eq!(
            v["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(v["response"]["usage"]["output_tokens"], 42);
    }

    #[test]
    fn a_mid_stream_error_ends_the_stream_as_the_api_does() {
        let e = Error::upstream_protocol("the provider closed the connection mid-response");
        let out = stream_error_event(&e);
        let events: Vec<&[u8]> = split_events(&out).collect();
        assert_eq!(events.len(), 2);
        let error = super::super::json::data_json(events[0]).unwrap();
        assert_eq!(error["type"], "error");
        assert!(error["message"].as_str().unwrap().contains("mid-response"));
        let failed = super::super::json::data_json(events[1]).unwrap();
        assert_eq!(failed["type"], "response.failed");
        assert_eq!(failed["response"]["status"], "failed");
        assert_eq!(failed["response"]["error"]["code"], error["code"]);
    }
}
