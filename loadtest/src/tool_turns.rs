//! Scripted tool-call turns: a test (or a person) puts `[[mock-tool NAME {JSON}]]` in the last user
//! message, and the mock answers that turn with a call of tool NAME with those arguments, as a model
//! deciding to use a tool would; the next turn (the tool's result last) gets a final text answer. This is
//! how an agent (Claude Code, Codex CLI) is driven through one real tool turn against the mock: the
//! directive rides in the prompt, so the mock needs no knowledge of any client and the gateway forwards
//! the prompt untouched.
//!
//! Owns: [`directive`] (finding the directive in text), [`anthropic_call`] (a Messages request's scripted
//! call, when its last message is the user's and the tool is offered), and the Anthropic `tool_use`
//! answer, whole ([`anthropic_tool_message`]) and streamed ([`anthropic_tool_stream`]). The Responses
//! API's turn is in `responses_api` (it uses [`directive`] too).
//!
//! Fails: a directive whose JSON does not parse, or that names a tool the request does not offer, is
//! ignored (the turn is answered with text). Cost: one JSON parse of the request when it has `tools`.

use serde_json::{json, Value};

use crate::knobs::Plan;
use crate::wire::{to_json, Events};

const OPEN: &str = "[[mock-tool ";
const CLOSE: &str = "]]";

/// The first `[[mock-tool NAME {JSON}]]` in `text`: the tool's name and its arguments.
pub(crate) fn directive(text: &str) -> Option<(String, Value)> {
    let start = text.find(OPEN)? + OPEN.len();
    let rest = text.get(start..)?;
    let end = rest.rfind(CLOSE)?;
    let inner = rest.get(..end)?.trim();
    let (name, args) = inner.split_once(char::is_whitespace)?;
    let args: Value = serde_json::from_str(args.trim()).ok()?;
    args.is_object().then(|| (name.to_owned(), args))
}

/// Every text of a message's `content` (a string, or blocks with `text`), joined.
fn texts(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Whether `content` carries a tool's result (the turn after a call).
fn has_tool_result(content: &Value) -> bool {
    content.as_array().is_some_and(|blocks| {
        blocks
            .iter()
            .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
    })
}

/// A Messages request's scripted call: the last message is the user's text (not a tool result) with a
/// directive naming a tool the request offers.
pub(crate) fn anthropic_call(body: &[u8]) -> Option<(String, Value)> {
    let req: Value = serde_json::from_slice(body).ok()?;
    let tools = req.get("tools")?.as_array()?;
    let last = req.get("messages")?.as_array()?.last()?;
    if last.get("role").and_then(Value::as_str) != Some("user") {
        return None;
    }
    let content = last.get("content")?;
    if has_tool_result(content) {
        return None;
    }
    let (name, args) = directive(&texts(content))?;
    tools
        .iter()
        .any(|t| t.get("name").and_then(Value::as_str) == Some(name.as_str()))
        .then_some((name, args))
}

fn usage(plan: &Plan) -> Value {
    json!({"input_tokens": plan.input, "output_tokens": plan.output,
        "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0})
}

/// A whole Anthropic message whose content is the call.
pub(crate) fn anthropic_tool_message(
    id: &str,
    model: &str,
    plan: &Plan,
    call: &(String, Value),
) -> Vec<u8> {
    to_json(&json!({
        "id": id, "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "tool_use", "id": format!("toolu_{id}"), "name": call.0, "input": call.1}],
        "stop_reason": "tool_use", "stop_sequence": null, "usage": usage(plan),
    }))
}

fn sse(name: &str, data: &Value) -> Vec<u8> {
    format!("event: {name}\ndata: {data}\n\n").into_bytes()
}

/// The same call as an event stream: `message_start`, a `tool_use` block whose input arrives as
/// `input_json_delta` parts, `message_delta` with `stop_reason: "tool_use"`, `message_stop`.
pub(crate) async fn anthropic_tool_stream(
    events: Events,
    id: String,
    model: String,
    plan: Plan,
    call: (String, Value),
) {
    let args = call.1.to_string();
    let mut parts: Vec<String> = Vec::new();
    let chars: Vec<char> = args.chars().collect();
    for chunk in chars.chunks(16) {
        parts.push(chunk.iter().collect());
    }
    let mut frames = vec![
        sse(
            "message_start",
            &json!({"type": "message_start", "message": {"id": id, "type": "message", "role": "assistant",
                "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": plan.input, "output_tokens": 1}}}),
        ),
        sse(
            "content_block_start",
            &json!({"type": "content_block_start", "index": 0, "content_block":
                {"type": "tool_use", "id": format!("toolu_{id}"), "name": call.0, "input": {}}}),
        ),
    ];
    for p in parts {
        frames.push(sse(
            "content_block_delta",
            &json!({"type": "content_block_delta", "index": 0,
                "delta": {"type": "input_json_delta", "partial_json": p}}),
        ));
    }
    frames.push(sse(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    frames.push(sse(
        "message_delta",
        &json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null},
            "usage": {"output_tokens": plan.output}}),
    ));
    frames.push(sse("message_stop", &json!({"type": "message_stop"})));
    for f in frames {
        if !events.send(f).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_directive_is_found_in_text_and_junk_is_ignored() {
        let (n, a) =
            directive("please [[mock-tool Write {\"file_path\":\"/x\",\"content\":\"]]\"}]] now")
                .unwrap();
        assert_eq!(n, "Write");
        assert_eq!(a["content"], "]]");
        assert!(directive("[[mock-tool Write not-json]]").is_none());
        assert!(directive("no directive here").is_none());
    }

    #[test]
    fn only_an_offered_tool_after_the_users_text_is_called() {
        let body = |last: &str| {
            format!(
                r#"{{"model":"m","tools":[{{"name":"Write","input_schema":{{}}}}],"messages":[{last}]}}"#
            )
        };
        let user = r#"{"role":"user","content":[{"type":"text","text":"[[mock-tool Write {\"file_path\":\"/t\"}]]"}]}"#;
        assert_eq!(anthropic_call(body(user).as_bytes()).unwrap().0, "Write");
        let other = r#"{"role":"user","content":"[[mock-tool Bash {\"command\":\"ls\"}]]"}"#;
        assert!(anthropic_call(body(other).as_bytes()).is_none());
        let result = r#"{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"ok"},{"type":"text","text":"[[mock-tool Write {}]]"}]}"#;
        assert!(anthropic_call(body(result).as_bytes()).is_none());
    }
}
