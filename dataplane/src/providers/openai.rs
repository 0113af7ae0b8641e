//! The OpenAI chat completions API (`POST /v1/chat/completions`): everything it means on the wire.
//!
//! Owns: the paths it serves, the upstream credential (`authorization: Bearer`), the output-cap field
//! (`max_completion_tokens`), asking for stream usage on the client's behalf (`stream_options.include_usage`)
//! and taking it back out of the client's stream, usage extraction (`usage.prompt_tokens` including
//! `prompt_tokens_details.cached_tokens`, `usage.completion_tokens` including
//! `completion_tokens_details.reasoning_tokens`), the error body (`{"error":{"message","type","param","code"}}`)
//! and its mid-stream form (a `data:` event), the `/v1/models` list shape, the final events of a cut stream
//! (a chunk with `finish_reason: "length"`, then `data: [DONE]`), and where prompt and generated text live
//! for estimates (`messages[].content`; `choices[].delta.content` / `choices[].message.content`).
//!
//! Fails: never panics on provider or client bytes. Usage that does not parse is reported as a failed parse
//! (counted by [`super::meter::UsageMeter`]); a body that cannot take the `stream_options` member is a 400.
//! Cost: the same as before this module existed: one small `simd-json` parse per usage chunk, one splice to
//! request stream usage, one `memmem` per relayed run to strip it; everything else is on error or estimate
//! paths.

use bytes::Bytes;
use memchr::memmem;
use serde::Deserialize;
use tollgate_core::Usage;

use super::json::mentions_usage;
use super::request::{Billing, Body};
use crate::error::{Error, ErrorKind, Result};
use crate::net::sse::split_events;

/// The paths this API is served on; the first is the one named in errors.
pub const PATHS: &[&str] = &["/v1/chat/completions", "/chat/completions"];

/// `authorization: Bearer KEY\r\n`.
pub fn auth_lines(key: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(b"authorization: Bearer ");
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Headers sent upstream when the client sent none of that name: none.
pub const DEFAULT_HEADERS: &[(&str, &str)] = &[];

/// The fields that cap a choice's output; the provider applies `max_completion_tokens` when it is a number,
/// else `max_tokens`.
pub const CAP_FIELDS: &[&str] = &["max_completion_tokens", "max_tokens"];

/// The most choices one request may ask for (`n`), as the API allows.
pub const MAX_CHOICES: u64 = 128;

/// What a chat completions request makes the provider generate and bill. Refused (400), because no price
/// the gateway holds bounds them: audio in or out (priced per audio token), predicted outputs (rejected
/// prediction tokens are billed on top of the cap), web search (a fee per call), file parts (a PDF's tokens
/// are not bounded by its bytes) and the priority tier (not in the price sheet). `flex` costs less than the
/// standard prices it is reserved and billed at.
pub fn view(body: &Body<'_>) -> Result<Billing> {
    let cap = match (
        body.count("max_completion_tokens")?,
        body.count("max_tokens")?,
    ) {
        (Some(c), _) => Some(c),
        (None, m) => m,
    };
    let choices = body.count("n")?.unwrap_or(1);
    if choices == 0 || choices > MAX_CHOICES {
        return Err(Error::invalid_body(format!(
            "`n` must be between 1 and {MAX_CHOICES}, not {choices}"
        )));
    }
    let unbounded = |field: &str, why: &str| {
        Err(Error::unbounded_cost(format!(
            "`{field}`: {why}; Tollgate cannot reserve its cost before forwarding, so the request is refused"
        )))
    };
    if body.get("audio").is_some_and(|m| !m.is_null())
        || body
            .get("modalities")
            .is_some_and(|m| m.raw.contains("\"audio\""))
    {
        return unbounded(
            "audio",
            "audio output is billed per audio token, which the price sheet does not carry",
        );
    }
    if body.get("prediction").is_some_and(|m| !m.is_null()) {
        return unbounded(
            "prediction",
            "rejected prediction tokens are billed on top of the output cap",
        );
    }
    if body.get("web_search_options").is_some_and(|m| !m.is_null()) {
        return unbounded("web_search_options", "web search is billed per call");
    }
    if let Some(tier) = body.string("service_tier")? {
        if !matches!(tier.as_ref(), "auto" | "default" | "flex") {
            return unbounded(
                "service_tier",
                "only the standard and flex tiers are priced",
            );
        }
    }
    {
        // Parts anywhere in the body (messages); a key's quotes are never escaped, so no text matches.
        let raw = body.bytes;
        if super::json::key_count(raw, b"\"input_audio\"") > 0 {
            return unbounded(
                "messages[].input_audio",
                "audio input is billed per audio token, which the price sheet does not carry",
            );
        }
        if super::json::type_count(raw, b"\"file\"") > 0 {
            return unbounded(
                "messages[].file",
                "a file's tokens are not bounded by its size",
            );
        }
    }
    let stream = body.flag("stream")?;
    let client_usage = match body.get("stream_options") {
        Some(m) if !m.is_null() => {
            #[derive(Deserialize)]
            struct Options {
                #[serde(default)]
                include_usage: Option<bool>,
            }
            serde_json::from_str::<Options>(m.raw)
                .map_err(|_| {
                    Error::invalid_body(
                        "`stream_options` must be an object with a boolean `include_usage`",
                    )
                })?
                .include_usage
                == Some(true)
        }
        _ => false,
    };
    Ok(Billing {
        cap,
        choices,
        stream,
        client_usage,
        stored_input: false,
        input_tokens: None,
    })
}

/// The output cap as a member to splice into the body: OpenAI's current name for the limit.
pub fn max_tokens_member(n: u64) -> String {
    format!("\"max_completion_tokens\":{n},")
}

/// An OpenAI stream carries usage only when asked (`stream_options.include_usage`): the body that asks
/// for it on the client's behalf, `None` when the client asked itself. `has_options`: the body has a
/// `stream_options` member (an object or `null`): it is rewritten in place, never sent twice.
pub fn request_stream_usage(
    body: &Bytes,
    client_asked: bool,
    has_options: bool,
) -> Result<Option<Bytes>> {
    if client_asked {
        return Ok(None);
    }
    request_usage(body, has_options).map(Some)
}

/// Adds `"stream_options":{"include_usage":true}` to a JSON object body: one splice after the opening brace
/// when the client sent no `stream_options`, a re-encode (rare) when it sent some without `include_usage`.
fn request_usage(body: &Bytes, has_options: bool) -> Result<Bytes> {
    const MEMBER: &[u8] = br#""stream_options":{"include_usage":true},"#;
    if !has_options {
        if let Some(out) = super::json::insert_member(body, MEMBER) {
            return Ok(out);
        }
    }
    let mut v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| Error::invalid_body(format!("invalid JSON: {e}")))?;
    if let Some(obj) = v.as_object_mut() {
        let opts = obj
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        // `"stream_options": null` reads as no options: it becomes the object that asks for usage.
        if opts.is_null() {
            *opts = serde_json::json!({});
        }
        match opts.as_object_mut() {
            Some(o) => {
                o.insert("include_usage".into(), serde_json::Value::Bool(true));
            }
            None => return Err(Error::invalid_body("`stream_options` must be an object")),
        }
    }
    serde_json::to_vec(&v)
        .map(Bytes::from)
        .map_err(|_| Error::internal("could not re-encode the request body"))
}

/// Takes out of a run of stream events what the client did not ask for when Tollgate requested usage
/// for it: the final usage chunk (`"choices":[]` with a `"usage":{...}`) and the `"usage":null` member of
/// every other chunk. Returns the run unchanged (no copy) when there is nothing to remove, `None` when nothing
/// is left.
pub fn strip_stream_usage(run: Bytes) -> Option<Bytes> {
    if !mentions_usage(&run) {
        return Some(run);
    }
    let mut out = Vec::with_capacity(run.len());
    for event in split_events(&run) {
        if !mentions_usage(event) {
            out.extend_from_slice(event);
            continue;
        }
        let is_usage_chunk = memmem::find(event, b"\"choices\":[]").is_some()
            && memmem::find(event, b"\"usage\":{").is_some();
        if is_usage_chunk {
            continue;
        }
        let mut rest = event;
        while let Some(i) = memmem::find(rest, b",\"usage\":null") {
            out.extend_from_slice(&rest[..i]);
            rest = &rest[i + b",\"usage\":null".len()..];
        }
        out.extend_from_slice(rest);
    }
    if out.is_empty() {
        None
    } else {
        Some(Bytes::from(out))
    }
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
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    prompt_tokens_details: Option<DetailsIn>,
    completion_tokens_details: Option<DetailsOut>,
}

#[derive(Deserialize)]
struct Envelope {
    usage: Option<UsageIn>,
}

/// Usage reported so far in one response.
#[derive(Debug, Default)]
pub struct Meter {
    prompt: Option<u64>,
    cached: u64,
    completion: Option<u64>,
    reasoning: u64,
}

impl Meter {
    /// Parses one JSON document (a chunk's data or a whole body; parsed in place). `false` when it is not
    /// JSON of the expected shape.
    pub fn observe(&mut self, json: &mut [u8]) -> bool {
        match simd_json::serde::from_slice::<Envelope>(json) {
            Ok(Envelope { usage: Some(u) }) => {
                self.prompt = u.prompt_tokens.or(self.prompt);
                self.completion = u.completion_tokens.or(self.completion);
                if let Some(c) = u.prompt_tokens_details.and_then(|d| d.cached_tokens) {
                    self.cached = c;
                }
                if let Some(r) = u.completion_tokens_details.and_then(|d| d.reasoning_tokens) {
                    self.reasoning = r;
                }
                true
            }
            Ok(Envelope { usage: None }) => true,
            Err(_) => false,
        }
    }

    /// The usage object, once both counts arrived.
    pub fn usage(&self) -> Option<Usage> {
        Some(Usage::from_openai(
            self.prompt?,
            self.cached,
            self.completion?,
            self.reasoning,
        ))
    }

    /// Reported input and output so far.
    pub fn partial(&self) -> (Option<u64>, Option<u64>) {
        (self.prompt, self.completion)
    }
}

/// The error `type` OpenAI's SDK expects for this error's status.
pub fn error_type(e: &Error) -> &'static str {
    match e.status() {
        404 if e.kind == ErrorKind::UnknownModel => "invalid_request_error",
        // OpenAI's own type for a spent quota, which its SDK maps to RateLimitError.
        429 => "insufficient_quota",
        400..=499 => "invalid_request_error",
        _ => "server_error",
    }
}

/// `{"error":{"message":...,"type":...,"param":null,"code":...}}`
pub fn error_json(e: &Error) -> serde_json::Value {
    serde_json::json!({
        "error": {
            "message": e.message,
            "type": error_type(e),
            "param": serde_json::Value::Null,
            "code": e.code(),
        }
    })
}

/// A mid-stream error: a plain `data:` event holding the error body.
pub fn stream_error_event(body: &str) -> Vec<u8> {
    format!("data: {body}\n\n").into_bytes()
}

/// `GET /v1/models` in OpenAI's list shape; `names` are (model, owning provider).
pub fn models_list(names: &[(&str, &str)]) -> serde_json::Value {
    serde_json::json!({
        "object": "list",
        "data": names.iter().map(|(id, owner)| serde_json::json!({
            "id": id, "object": "model", "created": 0, "owned_by": owner
        })).collect::<Vec<_>>(),
    })
}

/// Appends the prompt text of a request body (`messages[].content`; the system prompt is a message) and
/// returns the number of messages.
pub fn prompt_text(obj: &serde_json::Map<String, serde_json::Value>, out: &mut String) -> u64 {
    super::json::push_messages(obj, out)
}

/// Appends the generated text of one event's or body's JSON: `choices[].delta.content` (streams) and
/// `choices[].message.content` (whole bodies).
pub fn generated_text(v: &serde_json::Value, out: &mut String) {
    for c in v
        .get("choices")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
    {
        for key in ["delta", "message"] {
            if let Some(t) = c.get(key).and_then(|d| d.get("content")) {
                super::json::push_text(t, out, false);
            }
        }
    }
}

/// What the final events of a cut stream need: the last run relayed (its last chunk gives the final
/// chunk's `id`, `created`, `model` and `system_fingerprint`). A refcount per run.
#[derive(Debug, Clone, Default)]
pub struct StreamEnd {
    last_run: Option<Bytes>,
}

impl StreamEnd {
    pub fn track(&mut self, run: &Bytes) {
        self.last_run = Some(run.clone());
    }

    /// The last chunk relayed.
    fn last_chunk(&self) -> Option<serde_json::Value> {
        let run = self.last_run.as_ref()?;
        split_events(run)
            .filter(|e| memmem::find(e, b"\"chat.completion.chunk\"").is_some())
            .last()
            .and_then(super::json::data_json)
    }

    /// A final chunk with `finish_reason: "length"`, then `data: [DONE]`.
    pub fn tail(&self) -> Vec<u8> {
        let mut chunk = serde_json::json!({
            "id": "",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "",
            "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "length"}],
        });
        if let Some(last) = self.last_chunk() {
            for key in ["id", "created", "model", "system_fingerprint"] {
                if let Some(v) = last.get(key) {
                    chunk[key] = v.clone();
                }
            }
        }
        format!("data: {chunk}\n\ndata: [DONE]\n\n").into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_requested_with_one_splice() {
        let body = Bytes::from_static(br#" {"model":"m","stream":true}"#);
        let out = request_usage(&body, false).unwrap();
        assert_eq!(
            &out[..],
            br#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#,
        );
        let v: serde_json::Value =
            serde_json::from_slice(&request_usage(&body, true).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        let bad = Bytes::from_static(br#"{"model":"m","stream_options":3}"#);
        assert_eq!(request_usage(&bad, true).unwrap_err().status(), 400);
    }
}
