//! The providers' wire formats: request parsing, JSON bodies, SSE streams.

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::body::{Aborted, Item};
use crate::knobs::{text, token, Plan};

// ---------------------------------------------------------------- requests

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct RawRequest {
    #[serde(default)]
    model: Option<serde_json::Value>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

/// The parts of a chat request the mock uses (both providers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    /// Choices to generate (OpenAI `n`; only read in real-API mode).
    pub choices: u64,
}

/// Parses a request body; the error is a message for the client.
pub(crate) fn parse_request(body: &[u8]) -> Result<ChatRequest, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(
            "We could not parse the JSON body of your request: expected a JSON object.".into(),
        );
    }
    let raw: RawRequest = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
    let model = match raw.model {
        Some(serde_json::Value::String(m)) => m,
        Some(_) => return Err("model: Input should be a valid string".into()),
        None => return Err("you must provide a model parameter".into()),
    };
    Ok(ChatRequest {
        model,
        stream: raw.stream.unwrap_or(false),
        include_usage: raw
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
        max_tokens: raw.max_completion_tokens.or(raw.max_tokens),
        choices: 1,
    })
}

fn json_into<T: Serialize>(buf: &mut Vec<u8>, value: &T) {
    if serde_json::to_writer(&mut *buf, value).is_err() {
        buf.extend_from_slice(b"{}");
    }
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    let mut buf = Vec::with_capacity(512);
    json_into(&mut buf, value);
    buf
}

// ------------------------------------------------------------------ errors

#[derive(Serialize)]
struct OaErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<()>,
    code: Option<&'a str>,
}

#[derive(Serialize)]
struct OaError<'a> {
    error: OaErrorBody<'a>,
}

/// `{"error":{"message":..,"type":..,"param":null,"code":..}}`.
pub(crate) fn openai_error(kind: &str, message: &str, code: Option<&str>) -> Vec<u8> {
    to_json(&OaError {
        error: OaErrorBody {
            message,
            kind,
            param: None,
            code,
        },
    })
}

#[derive(Serialize)]
struct AnErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct AnError<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    error: AnErrorBody<'a>,
}

/// `{"type":"error","error":{"type":..,"message":..}}`.
pub(crate) fn anthropic_error(kind: &str, message: &str) -> Vec<u8> {
    to_json(&AnError {
        kind: "error",
        error: AnErrorBody { kind, message },
    })
}

/// OpenAI error type for a status.
pub(crate) fn openai_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    }
}

/// Anthropic error type for a status.
pub(crate) fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

// ------------------------------------------------------------ stream plumbing

/// The sending side of a streamed body.
pub(crate) struct Events {
    tx: mpsc::Sender<Item>,
}

/// Capacity of a stream's frame channel.
pub(crate) const CHANNEL: usize = 16;

impl Events {
    pub(crate) fn new(tx: mpsc::Sender<Item>) -> Self {
        Self { tx }
    }

    /// Sends one frame; false when the client is gone.
    pub(crate) async fn send(&self, frame: Vec<u8>) -> bool {
        self.tx.send(Ok(Bytes::from(frame))).await.is_ok()
    }

    /// Lets hyper write out what it has, then makes it drop the connection.
    pub(crate) async fn abort(self) {
        while self.tx.capacity() < self.tx.max_capacity() {
            if self.tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Give hyper time to flush the frames it took before the abort.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = self.tx.send(Err(Aborted)).await;
    }

    /// Sends the first half of `body`, then aborts.
    pub(crate) async fn truncated(self, body: Vec<u8>) {
        let half = body.len() / 2;
        let mut body = body;
        body.truncate(half);
        if self.send(body).await {
            self.abort().await;
        }
    }
}

/// What the token loop does between the opening and closing events.
pub(crate) enum Flow {
    Continue,
    Stop,
}

/// Sends one event per output token, with delays, garbage and abort as planned.
pub(crate) async fn token_events(
    events: Events,
    plan: &Plan,
    garbage: &[u8],
    mut event: impl FnMut(&str) -> Vec<u8>,
) -> (Option<Events>, Flow) {
    let malformed_at = plan.malformed_at();
    for i in 0..plan.output {
        if plan.disconnect_after == Some(i) {
            events.abort().await;
            return (None, Flow::Stop);
        }
        if malformed_at == Some(i) && !events.send(garbage.to_vec()).await {
            return (None, Flow::Stop);
        }
        if !plan.token_delay.is_zero() {
            tokio::time::sleep(plan.token_delay).await;
        }
        if !events.send(event(token(i))).await {
            return (None, Flow::Stop);
        }
    }
    if plan.output == 0 && malformed_at.is_some() && !events.send(garbage.to_vec()).await {
        return (None, Flow::Stop);
    }
    if plan.disconnect_after.is_some() {
        events.abort().await;
        return (None, Flow::Stop);
    }
    (Some(events), Flow::Continue)
}

// ------------------------------------------------------------------ OpenAI

#[derive(Serialize)]
struct PromptDetails {
    cached_tokens: u64,
    audio_tokens: u64,
}

#[derive(Serialize)]
struct CompletionDetails {
    reasoning_tokens: u64,
    audio_tokens: u64,
    accepted_prediction_tokens: u64,
    rejected_prediction_tokens: u64,
}

#[derive(Serialize)]
struct OaUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

impl OaUsage {
    fn new(plan: &Plan) -> Self {
        Self {
            prompt_tokens: plan.input,
            completion_tokens: plan.total_output(),
            total_tokens: plan.input + plan.total_output(),
            prompt_tokens_details: PromptDetails {
                cached_tokens: plan.cached,
                audio_tokens: 0,
            },
            completion_tokens_details: CompletionDetails {
                reasoning_tokens: plan.reasoning,
                audio_tokens: 0,
                accepted_prediction_tokens: 0,
                rejected_prediction_tokens: 0,
            },
        }
    }
}

/// `plan.choices` as a choice index bound.
fn choice_count(plan: &Plan) -> u32 {
    u32::try_from(plan.choices).unwrap_or(u32::MAX)
}

fn openai_finish(plan: &Plan) -> &'static str {
    if plan.capped {
        "length"
    } else {
        "stop"
    }
}

#[derive(Serialize)]
struct OaMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
    annotations: [(); 0],
}

#[derive(Serialize)]
struct OaChoice<'a> {
    index: u32,
    message: OaMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct OaCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<OaChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<OaUsage>,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

/// A whole `chat.completion` object with `plan.choices` choices.
pub(crate) fn openai_completion(id: &str, created: u64, model: &str, plan: &Plan) -> Vec<u8> {
    let content = text(plan.output);
    to_json(&OaCompletion {
        id,
        object: "chat.completion",
        created,
        model,
        choices: (0..choice_count(plan))
            .map(|index| OaChoice {
                index,
                message: OaMessage {
                    role: "assistant",
                    content: &content,
                    refusal: None,
                    annotations: [],
                },
                logprobs: None,
                finish_reason: openai_finish(plan),
            })
            .collect(),
        usage: (!plan.omit_usage).then(|| OaUsage::new(plan)),
        service_tier: "default",
        system_fingerprint: "fp_mock",
    })
}

#[derive(Serialize, Default)]
struct OaDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<()>>,
}

#[derive(Serialize)]
struct OaChunkChoice<'a> {
    index: u32,
    delta: OaDelta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct OaChunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: &'a [OaChunkChoice<'a>],
    /// Absent: no usage key; `Some(None)`: `"usage":null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<OaUsage>>,
}

/// The OpenAI stream's frames.
struct OaStream<'a> {
    id: &'a str,
    created: u64,
    model: &'a str,
    /// Every chunk carries `"usage":null`.
    usage_null: bool,
}

impl OaStream<'_> {
    fn event(&self, choices: &[OaChunkChoice<'_>], usage: Option<OaUsage>) -> Vec<u8> {
        let mut buf = Vec::with_capacity(320);
        buf.extend_from_slice(b"data: ");
        let usage = match usage {
            Some(u) => Some(Some(u)),
            None if self.usage_null => Some(None),
            None => None,
        };
        json_into(
            &mut buf,
            &OaChunk {
                id: self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: self.model,
                service_tier: "default",
                system_fingerprint: "fp_mock",
                choices,
                usage,
            },
        );
        buf.extend_from_slice(b"\n\n");
        buf
    }

    /// One chunk per choice, `0..choices`, each carrying `delta()` and its index.
    fn deltas<'d>(
        &self,
        choices: u32,
        delta: impl Fn() -> OaDelta<'d>,
        finish_reason: Option<&'static str>,
    ) -> Vec<u8> {
        let chunk = |index| {
            self.event(
                &[OaChunkChoice {
                    index,
                    delta: delta(),
                    logprobs: None,
                    finish_reason,
                }],
                None,
            )
        };
        // One choice (every default-mode stream): no second buffer.
        let mut buf = chunk(0);
        for index in 1..choices {
            buf.extend_from_slice(&chunk(index));
        }
        buf
    }
}

/// Generates an OpenAI `chat.completion.chunk` stream into `events`.
pub(crate) async fn openai_stream(
    events: Events,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    plan: Plan,
) {
    let s = OaStream {
        id: &id,
        created,
        model: &model,
        usage_null: include_usage && !plan.omit_usage,
    };
    let choices = choice_count(&plan);
    let first = s.deltas(
        choices,
        || OaDelta {
            role: Some("assistant"),
            content: Some(""),
            refusal: Some(None),
        },
        None,
    );
    if !events.send(first).await {
        return;
    }
    let (events, flow) = token_events(events, &plan, b"data: {\"id\":\n\n", |t| {
        s.deltas(
            choices,
            || OaDelta {
                content: Some(t),
                ..OaDelta::default()
            },
            None,
        )
    })
    .await;
    let (Some(events), Flow::Continue) = (events, flow) else {
        return;
    };
    if !events
        .send(s.deltas(choices, OaDelta::default, Some(openai_finish(&plan))))
        .await
    {
        return;
    }
    if s.usage_null && !events.send(s.event(&[], Some(OaUsage::new(&plan)))).await {
        return;
    }
    let _ = events.send(b"data: [DONE]\n\n".to_vec()).await;
}

// --------------------------------------------------------------- Anthropic

#[derive(Serialize)]
struct CacheCreation {
    ephemeral_5m_input_tokens: u64,
    ephemeral_1h_input_tokens: u64,
}

#[derive(Serialize)]
struct AnUsage {
    input_tokens: u64,
    cache_creation_input_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation: CacheCreation,
    output_tokens: u64,
    service_tier: &'static str,
}

impl AnUsage {
    fn new(plan: &Plan, output_tokens: u64) -> Self {
        Self {
            input_tokens: plan.input,
            cache_creation_input_tokens: plan.cache_write_5m + plan.cache_write_1h,
            cache_read_input_tokens: plan.cache_read,
            cache_creation: CacheCreation {
                ephemeral_5m_input_tokens: plan.cache_write_5m,
                ephemeral_1h_input_tokens: plan.cache_write_1h,
            },
            output_tokens,
            service_tier: "standard",
        }
    }
}

fn anthropic_stop(plan: &Plan) -> &'static str {
    if plan.capped {
        "max_tokens"
    } else {
        "end_turn"
    }
}

#[derive(Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct AnMessage<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: &'a [TextBlock<'a>],
    stop_reason: Option<&'static str>,
    stop_sequence: Option<()>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<AnUsage>,
}

/// A whole Anthropic `message` object.
pub(crate) fn anthropic_message(id: &str, model: &str, plan: &Plan) -> Vec<u8> {
    let content = text(plan.output);
    to_json(&AnMessage {
        id,
        kind: "message",
        role: "assistant",
        model,
        content: &[TextBlock {
            kind: "text",
            text: &content,
        }],
        stop_reason: Some(anthropic_stop(plan)),
        stop_sequence: None,
        usage: (!plan.omit_usage).then(|| AnUsage::new(plan, plan.output)),
    })
}

fn sse<T: Serialize>(name: &str, data: &T) -> Vec<u8> {
    let mut buf = Vec::with_capacity(160);
    buf.extend_from_slice(b"event: ");
    buf.extend_from_slice(name.as_bytes());
    buf.extend_from_slice(b"\ndata: ");
    json_into(&mut buf, data);
    buf.extend_from_slice(b"\n\n");
    buf
}

#[derive(Serialize)]
struct MessageStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: AnMessage<'a>,
}

#[derive(Serialize)]
struct BlockStart<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    content_block: TextBlock<'a>,
}

#[derive(Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Serialize)]
struct BlockDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
    delta: TextDelta<'a>,
}

#[derive(Serialize)]
struct BlockStop {
    #[serde(rename = "type")]
    kind: &'static str,
    index: u32,
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<()>,
}

#[derive(Serialize)]
struct OutputUsage {
    output_tokens: u64,
}

#[derive(Serialize)]
struct MessageDelta {
    #[serde(rename = "type")]
    kind: &'static str,
    delta: StopDelta,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<OutputUsage>,
}

#[derive(Serialize)]
struct Bare {
    #[serde(rename = "type")]
    kind: &'static str,
}

/// Generates an Anthropic Messages event stream into `events`.
pub(crate) async fn anthropic_stream(events: Events, id: String, model: String, plan: Plan) {
    let start = sse(
        "message_start",
        &MessageStart {
            kind: "message_start",
            message: AnMessage {
                id: &id,
                kind: "message",
                role: "assistant",
                model: &model,
                content: &[],
                stop_reason: None,
                stop_sequence: None,
                usage: Some(AnUsage::new(&plan, 1)),
            },
        },
    );
    if !events.send(start).await {
        return;
    }
    let block_start = sse(
        "content_block_start",
        &BlockStart {
            kind: "content_block_start",
            index: 0,
            content_block: TextBlock {
                kind: "text",
                text: "",
            },
        },
    );
    if !events.send(block_start).await {
        return;
    }
    if !events
        .send(b"event: ping\ndata: {\"type\": \"ping\"}\n\n".to_vec())
        .await
    {
        return;
    }
    let garbage =
        b"event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":\n\n";
    let (events, flow) = token_events(events, &plan, garbage, |t| {
        sse(
            "content_block_delta",
            &BlockDelta {
                kind: "content_block_delta",
                index: 0,
                delta: TextDelta {
                    kind: "text_delta",
                    text: t,
                },
            },
        )
    })
    .await;
    let (Some(events), Flow::Continue) = (events, flow) else {
        return;
    };
    let tail = [
        sse(
            "content_block_stop",
            &BlockStop {
                kind: "content_block_stop",
                index: 0,
            },
        ),
        sse(
            "message_delta",
            &MessageDelta {
                kind: "message_delta",
                delta: StopDelta {
                    stop_reason: anthropic_stop(&plan),
                    stop_sequence: None,
                },
                usage: (!plan.omit_usage).then_some(OutputUsage {
                    output_tokens: plan.output,
                }),
            },
        ),
        sse(
            "message_stop",
            &Bare {
                kind: "message_stop",
            },
        ),
    ];
    for frame in tail {
        if !events.send(frame).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::knobs::Knobs;
    use crate::MockDefaults;

    fn plan(output: u64) -> Plan {
        let k = Knobs {
            output_tokens: Some(output),
            ..Knobs::default()
        };
        Plan::new(&MockDefaults::default(), &k, 40, None)
    }

    #[test]
    fn parses_requests() {
        let r = parse_request(
            br#"{"model":"gpt-x","messages":[],"stream":true,"stream_options":{"include_usage":true},"max_tokens":7,"max_completion_tokens":3}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            ChatRequest {
                model: "gpt-x".into(),
                stream: true,
                include_usage: true,
                max_tokens: Some(3),
                choices: 1,
            }
        );
        let r = parse_request(br#"{"model":"m","stream":null,"max_tokens":null}"#).unwrap();
        assert!(!r.stream && !r.include_usage && r.max_tokens.is_none());
        assert!(parse_request(b"{\"model\":").is_err());
        assert!(parse_request(b"[1,2]").is_err());
        assert!(parse_request(b"{\"messages\":[]}").is_err());
        assert!(parse_request(b"{\"model\":3}").is_err());
    }

    #[test]
    fn openai_completion_is_byte_exact() {
        let body = openai_completion("chatcmpl-mock-1", 7, "m\"x", &plan(2));
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"id":"chatcmpl-mock-1","object":"chat.completion","created":7,"model":"m\"x","choices":[{"index":0,"message":{"role":"assistant","content":"Hello from ","refusal":null,"annotations":[]},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12,"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}},"service_tier":"default","system_fingerprint":"fp_mock"}"#
        );
    }

    #[test]
    fn anthropic_message_is_byte_exact() {
        let body = anthropic_message("msg_mock_1", "claude", &plan(1));
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"id":"msg_mock_1","type":"message","role":"assistant","model":"claude","content":[{"type":"text","text":"Hello "}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":10,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"cache_creation":{"ephemeral_5m_input_tokens":0,"ephemeral_1h_input_tokens":0},"output_tokens":1,"service_tier":"standard"}}"#
        );
    }

    async fn collect(mut rx: mpsc::Receiver<Item>) -> (String, bool) {
        let mut out = Vec::new();
        while let Some(item) = rx.recv().await {
            match item {
                Ok(b) => out.extend_from_slice(&b),
                Err(_) => return (String::from_utf8(out).unwrap(), true),
            }
        }
        (String::from_utf8(out).unwrap(), false)
    }

    #[tokio::test]
    async fn openai_stream_frames() {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let task = tokio::spawn(openai_stream(
            Events::new(tx),
            "c".into(),
            1,
            "m".into(),
            true,
            plan(2),
        ));
        let (out, aborted) = collect(rx).await;
        task.await.unwrap();
        assert!(!aborted);
        let head = r#"data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m","service_tier":"default","system_fingerprint":"fp_mock","choices":"#;
        let expected = [
            format!(
                r#"{head}[{{"index":0,"delta":{{"role":"assistant","content":"","refusal":null}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            ),
            format!(
                r#"{head}[{{"index":0,"delta":{{"content":"Hello "}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            ),
            format!(
                r#"{head}[{{"index":0,"delta":{{"content":"from "}},"logprobs":null,"finish_reason":null}}],"usage":null}}"#
            ),
            format!(
                r#"{head}[{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"stop"}}],"usage":null}}"#
            ),
            format!(
                r#"{head}[],"usage":{{"prompt_tokens":10,"completion_tokens":2,"total_tokens":12,"prompt_tokens_details":{{"cached_tokens":0,"audio_tokens":0}},"completion_tokens_details":{{"reasoning_tokens":0,"audio_tokens":0,"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}}}}"#
            ),
            "data: [DONE]".to_string(),
        ];
        let got: Vec<&str> = out.split_terminator("\n\n").collect();
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn anthropic_stream_malformed_and_disconnect() {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let mut p = plan(4);
        p.malformed_sse = true;
        p.disconnect_after = Some(3);
        let task = tokio::spawn(anthropic_stream(Events::new(tx), "i".into(), "m".into(), p));
        let (out, aborted) = collect(rx).await;
        task.await.unwrap();
        assert!(aborted);
        let names: Vec<&str> = out
            .split_terminator("\n\n")
            .map(|e| e.lines().next().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "event: message_start",
                "event: content_block_start",
                "event: ping",
                "event: content_block_delta",
                "event: content_block_delta",
                "event: content_block_delta",
                "event: content_block_delta",
            ]
        );
        assert!(out.contains("data: {\"type\":\"content_block_delta\",\"index\":\n\n"));
        assert!(!out.contains("message_stop"));
    }
}
