//! The OpenAI Responses API (`POST /v1/responses`) as the mock serves it: the request read as the real API
//! reads it (lenient JSON: the last duplicate wins; `model` required; `max_output_tokens` at least 16), a
//! whole `response` object or the real event sequence, and a tool-call turn so an agent (Codex CLI) runs a
//! tool: with function tools and a user message last, the answer is a `function_call` item; with a
//! `function_call_output` last, a final message.
//!
//! Stream: `response.created`, `response.in_progress`, a `reasoning` item when reasoning tokens are planned
//! (`output_item.added`/`done`), then the answer item: a message (`output_item.added`,
//! `content_part.added`, one `output_text.delta` per token, `output_text.done`, `content_part.done`,
//! `output_item.done`) or a function call (`output_item.added`, `function_call_arguments.delta` per token,
//! `function_call_arguments.done`, `output_item.done`), and `response.completed` (or `response.incomplete`
//! with `incomplete_details.reason: "max_output_tokens"` when the cap cut the output). Every event has
//! `type` and a `sequence_number` counting from 0. Usage: `input_tokens` (cached in
//! `input_tokens_details.cached_tokens`), `output_tokens` (reasoning in
//! `output_tokens_details.reasoning_tokens`), `total_tokens`; `null` with `x-mock-omit-usage`.

use serde_json::{json, Map, Value};

use crate::knobs::{text, token, Plan};
use crate::wire::{token_events, Events, Flow};

/// The smallest `max_output_tokens` the API accepts.
const MIN_CAP: u64 = 16;

/// What the mock reads of a Responses request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ResponsesRequest {
    pub model: String,
    pub stream: bool,
    pub max_output_tokens: Option<u64>,
    /// The function call to answer with, when this turn calls a tool: (name, arguments JSON).
    pub call: Option<(String, String)>,
}

/// Reads a request body as the real API does; the error is a message for the client.
pub(crate) fn parse(body: &[u8]) -> Result<ResponsesRequest, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("We could not parse the JSON body of your request: {e}"))?;
    let Value::Object(map) = v else {
        return Err("We could not parse the JSON body of your request: expected an object.".into());
    };
    let model = match map.get("model") {
        Some(Value::String(m)) => m.clone(),
        Some(Value::Null) | None => return Err("Missing required parameter: 'model'.".into()),
        Some(_) => return Err("Invalid type for 'model': expected a string.".into()),
    };
    let stream = match map.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("Invalid type for 'stream': expected a boolean.".into()),
    };
    let max_output_tokens = match map.get("max_output_tokens") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n >= MIN_CAP => Some(n),
            Some(n) => {
                return Err(format!(
                "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= {MIN_CAP}, but got {n} instead."
            ))
            }
            None => return Err("Invalid type for 'max_output_tokens': expected an integer.".into()),
        },
    };
    Ok(ResponsesRequest {
        model,
        stream,
        max_output_tokens,
        call: tool_call(&map),
    })
}

/// The function call this turn makes: the request has function tools and its last input item is a user
/// message (or the input is a string); `None` after a `function_call_output` or without function tools.
fn tool_call(map: &Map<String, Value>) -> Option<(String, String)> {
    if let Some(call) = scripted(map) {
        return Some(call);
    }
    let tool = map
        .get("tools")?
        .as_array()?
        .iter()
        .find(|t| t.get("type").and_then(Value::as_str) == Some("function"))?;
    let user_last = match map.get("input")? {
        Value::String(_) => true,
        Value::Array(items) => items.last().is_some_and(|i| {
            i.get("role").and_then(Value::as_str) == Some("user")
                && i.get("type")
                    .and_then(Value::as_str)
                    .is_none_or(|t| t == "message")
        }),
        _ => false,
    };
    if !user_last {
        return None;
    }
    let name = tool.get("name").and_then(Value::as_str)?.to_owned();
    Some((name, arguments(tool.get("parameters"))))
}

/// A scripted call (`[[mock-tool NAME {JSON}]]`, see `tool_turns`) in the last input item, a user
/// message, naming a function tool the request offers.
fn scripted(map: &Map<String, Value>) -> Option<(String, String)> {
    let text = match map.get("input")? {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let last = items.last()?;
            if last.get("role").and_then(Value::as_str) != Some("user") {
                return None;
            }
            match last.get("content")? {
                Value::String(s) => s.clone(),
                Value::Array(parts) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n"),
                _ => return None,
            }
        }
        _ => return None,
    };
    let (name, args) = crate::tool_turns::directive(&text)?;
    map.get("tools")?
        .as_array()?
        .iter()
        .any(|t| t.get("name").and_then(Value::as_str) == Some(name.as_str()))
        .then(|| (name, args.to_string()))
}

/// Arguments for a tool's JSON schema: every required property with a value of its type (a command line
/// for strings and string arrays, so a shell tool echoes).
fn arguments(schema: Option<&Value>) -> String {
    let mut args = Map::new();
    let props = schema.and_then(|s| s.get("properties"));
    for name in schema
        .and_then(|s| s.get("required"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        let kind = props
            .and_then(|p| p.get(name))
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("string");
        let value = match kind {
            "array" => json!(["echo", "hello from tollgate-mock"]),
            "number" | "integer" => json!(1000),
            "boolean" => json!(false),
            "object" => json!({}),
            _ => json!("echo hello from tollgate-mock"),
        };
        args.insert(name.to_owned(), value);
    }
    Value::Object(args).to_string()
}

/// The numbers and names one response is built from.
pub(crate) struct Answer {
    pub id: String,
    pub stream: bool,
    pub created: u64,
    pub request: ResponsesRequest,
    pub plan: Plan,
}

impl Answer {
    fn usage(&self) -> Value {
        if self.plan.omit_usage {
            return Value::Null;
        }
        let p = &self.plan;
        json!({
            "input_tokens": p.input,
            "input_tokens_details": {"cached_tokens": p.cached},
            "output_tokens": p.output,
            "output_tokens_details": {"reasoning_tokens": p.reasoning},
            "total_tokens": p.input + p.output,
        })
    }

    fn status(&self) -> &'static str {
        if self.plan.capped {
            "incomplete"
        } else {
            "completed"
        }
    }

    fn reasoning_item(&self) -> Option<Value> {
        (self.plan.reasoning > 0)
            .then(|| json!({"id": format!("rs_{}", self.id), "type": "reasoning", "summary": []}))
    }

    /// The answer item: a message with `text`, or the function call with `arguments`.
    fn item(&self, status: &str, body: &str) -> Value {
        match &self.request.call {
            Some((name, _)) => json!({
                "id": format!("fc_{}", self.id), "type": "function_call", "status": status,
                "arguments": body, "call_id": format!("call_{}", self.id), "name": name,
            }),
            None => json!({
                "id": format!("msg_{}", self.id), "type": "message", "status": status,
                "role": "assistant",
                "content": if status == "in_progress" { json!([]) } else { json!([part(body)]) },
            }),
        }
    }

    /// The generated text: the call's arguments (its JSON, then padding up to the output tokens' worth of
    /// words is not needed: deltas split it), or the words.
    fn body_text(&self) -> String {
        match &self.request.call {
            Some((_, args)) => args.clone(),
            None => text(self.plan.output),
        }
    }

    /// The `response` object in a given state.
    fn response(&self, status: &str, output: Vec<Value>, usage: Value) -> Value {
        json!({
            "id": format!("resp_{}", self.id),
            "object": "response",
            "created_at": self.created,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": if status == "incomplete" { json!({"reason": "max_output_tokens"}) } else { Value::Null },
            "instructions": null,
            "max_output_tokens": self.request.max_output_tokens,
            "model": self.request.model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "service_tier": "default",
            "store": false,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "metadata": {},
        })
    }

    /// The whole response body.
    pub(crate) fn body(&self) -> Vec<u8> {
        let item_status = self.status();
        let output: Vec<Value> = self
            .reasoning_item()
            .into_iter()
            .chain([self.item(item_status, &self.body_text())])
            .collect();
        self.response(self.status(), output, self.usage())
            .to_string()
            .into_bytes()
    }
}

fn part(text: &str) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
}

/// Numbers the events of one stream.
struct Seq(u64);

impl Seq {
    fn event(&mut self, mut data: Value) -> Vec<u8> {
        let kind = data
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        data["sequence_number"] = json!(self.0);
        self.0 += 1;
        format!("event: {kind}\ndata: {data}\n\n").into_bytes()
    }
}

/// Streams the answer as the real API does.
pub(crate) async fn stream(events: Events, a: Answer) {
    let mut seq = Seq(0);
    let started = a.response("in_progress", vec![], Value::Null);
    for kind in ["response.created", "response.in_progress"] {
        if !events
            .send(seq.event(json!({"type": kind, "response": started})))
            .await
        {
            return;
        }
    }
    let mut output = Vec::new();
    if let Some(r) = a.reasoning_item() {
        let frames = [
            json!({"type": "response.output_item.added", "output_index": 0, "item": r}),
            json!({"type": "response.output_item.done", "output_index": 0, "item": r}),
        ];
        for f in frames {
            if !events.send(seq.event(f)).await {
                return;
            }
        }
        output.push(r);
    }
    let index = output.len();
    let item_id = match &a.request.call {
        Some(_) => format!("fc_{}", a.id),
        None => format!("msg_{}", a.id),
    };
    let mut opening = vec![
        json!({"type": "response.output_item.added", "output_index": index, "item": a.item("in_progress", "")}),
    ];
    if a.request.call.is_none() {
        opening.push(json!({"type": "response.content_part.added", "item_id": item_id, "output_index": index, "content_index": 0, "part": part("")}));
    }
    for f in opening {
        if !events.send(seq.event(f)).await {
            return;
        }
    }
    let body = a.body_text();
    // One delta per planned output token: the words, or the call's arguments cut into as many pieces.
    let pieces: Vec<String> = match &a.request.call {
        None => (0..a.plan.output).map(|i| token(i).to_owned()).collect(),
        Some(_) => split(&body, a.plan.output),
    };
    let mut i = 0;
    let delta_kind = match &a.request.call {
        Some(_) => "response.function_call_arguments.delta",
        None => "response.output_text.delta",
    };
    let (events, flow) = token_events(events, &a.plan, b"event: response.output_text.delta\ndata: {\"type\":\n\n", |_| {
        let delta = pieces.get(i).cloned().unwrap_or_default();
        i += 1;
        let mut e = json!({"type": delta_kind, "item_id": item_id, "output_index": index, "delta": delta});
        if a.request.call.is_none() {
            e["content_index"] = json!(0);
            e["logprobs"] = json!([]);
        }
        seq.event(e)
    })
    .await;
    let (Some(events), Flow::Continue) = (events, flow) else {
        return;
    };
    let status = a.status();
    let mut closing = Vec::new();
    match &a.request.call {
        Some(_) => closing.push(json!({"type": "response.function_call_arguments.done", "item_id": item_id, "output_index": index, "arguments": body})),
        None => {
            closing.push(json!({"type": "response.output_text.done", "item_id": item_id, "output_index": index, "content_index": 0, "text": body, "logprobs": []}));
            closing.push(json!({"type": "response.content_part.done", "item_id": item_id, "output_index": index, "content_index": 0, "part": part(&body)}));
        }
    }
    let item = a.item(status, &body);
    closing.push(json!({"type": "response.output_item.done", "output_index": index, "item": item}));
    output.push(item);
    let last = if a.plan.capped {
        "response.incomplete"
    } else {
        "response.completed"
    };
    closing.push(json!({"type": last, "response": a.response(status, output, a.usage())}));
    for f in closing {
        if !events.send(seq.event(f)).await {
            return;
        }
    }
}

/// `s` cut into `n` pieces (at char boundaries; the last ones empty when `s` is short).
fn split(s: &str, n: u64) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let n = n.max(1) as usize;
    let per = chars.len().div_ceil(n).max(1);
    (0..n)
        .map(|i| chars.iter().skip(i * per).take(per).collect::<String>())
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use crate::body::Item;
    use tokio::sync::mpsc;

    fn plan(output: u64, capped: bool) -> Plan {
        let mut p = Plan::new(
            &crate::MockDefaults::default(),
            &crate::knobs::Knobs::default(),
            40,
            None,
        );
        p.output = output;
        p.capped = capped;
        p.token_delay = std::time::Duration::ZERO;
        p
    }

    async fn events_of(a: Answer) -> Vec<Value> {
        let (tx, mut rx) = mpsc::channel::<Item>(1024);
        stream(Events::new(tx), a).await;
        let mut all = Vec::new();
        while let Ok(Ok(b)) = rx.try_recv() {
            all.extend_from_slice(&b);
        }
        let text = String::from_utf8(all).unwrap();
        text.split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (head, data) = e.split_once("\ndata: ").unwrap();
                let v: Value = serde_json::from_str(data).unwrap();
                assert_eq!(head, format!("event: {}", v["type"].as_str().unwrap()));
                v
            })
            .collect()
    }

    #[test]
    fn requests_are_read_as_the_api_reads_them() {
        let r = parse(br#"{"model":"a","model":"gpt-5","input":"hi","stream":true}"#).unwrap();
        assert_eq!((r.model.as_str(), r.stream, r.call), ("gpt-5", true, None));
        assert!(parse(br#"{"input":"hi"}"#).unwrap_err().contains("'model'"));
        assert!(parse(br#"{"model":"m","max_output_tokens":15}"#)
            .unwrap_err()
            .contains(">= 16"));
        let tools = r#""tools":[{"type":"function","name":"shell","parameters":{"type":"object","properties":{"command":{"type":"array"},"workdir":{"type":"string"}},"required":["command"]}}]"#;
        let r = parse(format!(r#"{{"model":"m",{tools},"input":[{{"type":"message","role":"user","content":"ls"}}]}}"#).as_bytes()).unwrap();
        let (name, args) = r.call.unwrap();
        assert_eq!(name, "shell");
        assert_eq!(
            serde_json::from_str::<Value>(&args).unwrap(),
            json!({"command": ["echo", "hello from tollgate-mock"]})
        );
        let r = parse(format!(r#"{{"model":"m",{tools},"input":[{{"type":"message","role":"user","content":"ls"}},{{"type":"function_call","call_id":"c","name":"shell","arguments":"{{}}"}},{{"type":"function_call_output","call_id":"c","output":"ok"}}]}}"#).as_bytes()).unwrap();
        assert_eq!(r.call, None);
    }

    #[tokio::test]
    async fn a_message_stream_is_the_real_event_sequence() {
        let a = Answer {
            id: "1".into(),
            stream: true,
            created: 7,
            request: parse(br#"{"model":"gpt-5","input":"hi"}"#).unwrap(),
            plan: plan(3, false),
        };
        let events = events_of(a).await;
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.completed"
            ]
        );
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i as u64);
        }
        let last = &events[10]["response"];
        assert_eq!(last["usage"]["output_tokens"], 3);
        assert_eq!(last["output"][0]["content"][0]["text"], text(3));
    }

    #[tokio::test]
    async fn a_capped_tool_call_stream_ends_incomplete() {
        let a = Answer {
            id: "2".into(),
            stream: true,
            created: 7,
            request: parse(br#"{"model":"gpt-5","input":"hi","max_output_tokens":16,"tools":[{"type":"function","name":"f","parameters":{}}]}"#).unwrap(),
            plan: plan(16, true),
        };
        let events = events_of(a).await;
        let last = events.last().unwrap();
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(last["response"]["output"][0]["type"], "function_call");
        assert_eq!(last["response"]["output"][0]["name"], "f");
        let args: String = events
            .iter()
            .filter(|e| e["type"] == "response.function_call_arguments.delta")
            .map(|e| e["delta"].as_str().unwrap())
            .collect();
        assert_eq!(args, "{}");
    }
}
