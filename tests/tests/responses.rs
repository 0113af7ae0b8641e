//! The OpenAI Responses API (`POST /v1/responses`) end to end: the real gateway in front of the mock in
//! real-API mode, with the admission, budgets, cost headers and access log chat has. Priced exactly
//! (charge == usage x price, within the reservation), streamed and not; the default cap written into the
//! body so the provider stops at the reservation (the stream ends with `response.incomplete`); stored input
//! reserved at the context window; bad input refused in the API's error shape before the provider is called;
//! a mid-stream failure ended with `response.failed`; a tool-call turn.
//!
//! Prices (the shipped sheet): gpt-4o 2,500,000 pico-USD per input token, 1,250,000 per cached input token,
//! 10,000,000 per output token; context window 128,000 tokens.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use serde_json::{json, Value};
use tollgate_tests::*;

const IN: i64 = 2_500_000;
const CACHED: i64 = 1_250_000;
const OUT: i64 = 10_000_000;

const BUDGET: &str = r#"
[[budgets]]
name = "team"
amount_usd = "100"
window = "day"
scope = "group"
group = "platform"
stream_cutoff = true
"#;

fn setup(extra: &str) -> (Proc, Gateway, TempDir, String) {
    let m = mock(&["--expect-key", MOCK_KEY, "--real-api"]);
    let store = TempDir::new("responses-store");
    let token = service_token(&store.0, "platform");
    let extra = format!(
        "[store]\ndir = \"{}\"\n[auth]\n{extra}\n",
        store.0.display()
    );
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", &extra));
    (m, g, store, token)
}

fn send(g: &Gateway, token: &str, body: &str, headers: &str) -> Response {
    post(
        g.addr,
        "/v1/responses",
        body,
        &format!("Authorization: Bearer {token}\r\nx-mock-token-delay-ms: 0\r\n{headers}"),
    )
}

fn expect_status(r: &Response, status: u16) {
    assert_eq!(
        r.status,
        status,
        "{}",
        r.text().chars().take(400).collect::<String>()
    );
}

fn logged(g: &Gateway, r: &Response) -> Value {
    g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ])
}

/// The `data` of every event, checked to name its own `type` and carry a `sequence_number` (the gateway's
/// own `error` / `response.failed` events excepted).
fn events(r: &Response) -> Vec<Value> {
    sse_events(&r.body)
        .into_iter()
        .map(|(event, data)| {
            let v: Value = serde_json::from_str(&data).unwrap_or_else(|e| panic!("{e}: {data}"));
            assert_eq!(event.as_deref(), v["type"].as_str(), "{data}");
            v
        })
        .collect()
}

#[test]
fn a_response_is_billed_its_usage_at_the_price_within_its_reservation() {
    let (m, g, _s, token) = setup(BUDGET);
    let body = r#"{"model":"gpt-4o","input":[{"role":"user","content":"hi"}],"max_output_tokens":20,"store":false}"#;
    let r = send(
        &g,
        &token,
        body,
        "x-mock-input-tokens: 100\r\nx-mock-cached-tokens: 40\r\nx-mock-output-tokens: 12\r\n",
    );
    expect_status(&r, 200);
    let v = r.json();
    assert_eq!(v["object"], "response");
    assert_eq!(v["status"], "completed");
    assert_eq!(v["usage"]["input_tokens"], 100);
    assert_eq!(v["usage"]["input_tokens_details"]["cached_tokens"], 40);
    assert_eq!(v["usage"]["output_tokens"], 12);
    let want = 60 * IN + 40 * CACHED + 12 * OUT;
    let line = logged(&g, &r);
    assert_eq!(line["api"], "openai_responses", "{line}");
    assert_eq!(line["usage"], "reported", "{line}");
    assert_eq!(line["cost_pusd"], want, "{line}");
    assert!(line["reserved_pusd"].as_i64().unwrap() >= want, "{line}");
    // The cost header is the exact charge; the budget headers are chat's.
    assert_eq!(r.header("x-tollgate-cost"), Some("0.00032"));
    assert!(r.header("x-tollgate-budget-remaining").is_some());
    // The provider got exactly the bytes that were priced.
    let rec = mock_requests(&m);
    assert_eq!(rec.len(), 1);
    assert_eq!(rec[0]["body"], body);
    assert_eq!(rec[0]["path"], "/v1/responses");
}

#[test]
fn a_streamed_response_is_billed_from_response_completed() {
    let (_m, g, _s, token) = setup(BUDGET);
    let body = r#"{"model":"gpt-4o","instructions":"be brief","input":"hi","max_output_tokens":32,"stream":true}"#;
    let r = send(
        &g,
        &token,
        body,
        "x-mock-input-tokens: 50\r\nx-mock-reasoning-tokens: 4\r\nx-mock-output-tokens: 10\r\n",
    );
    expect_status(&r, 200);
    let all = events(&r);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e["sequence_number"], i as u64, "{e}");
    }
    let kinds: Vec<&str> = all.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds.first(), Some(&"response.created"));
    assert_eq!(kinds.last(), Some(&"response.completed"));
    for k in [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ] {
        assert!(kinds.contains(&k), "{k} missing: {kinds:?}");
    }
    let usage = &all.last().unwrap()["response"]["usage"];
    assert_eq!(usage["output_tokens"], 10);
    assert_eq!(usage["output_tokens_details"]["reasoning_tokens"], 4);
    let line = logged(&g, &r);
    assert_eq!(line["usage"], "reported", "{line}");
    assert_eq!(line["reasoning_tokens"], 4, "{line}");
    assert_eq!(line["cost_pusd"], 50 * IN + 10 * OUT, "{line}");
    assert!(line["reserved_pusd"].as_i64().unwrap() >= 50 * IN + 10 * OUT);
    // The stream's cost, as chat streams carry it: an SSE comment after the last event.
    assert!(
        r.text().contains(": tollgate-cost=0.000225"),
        "{}",
        r.text()
    );
}

/// Without a cap of its own a request is reserved at the gateway's default (4,096 output tokens) and sent
/// with that cap, so the provider stops there (reasoning included, which a stream cut-off could not count):
/// the stream ends as the API ends one at its cap, `response.incomplete` with reason `max_output_tokens`,
/// and is billed within its reservation.
#[test]
fn a_response_without_a_cap_stops_at_its_reservation() {
    let (m, g, _s, token) = setup(BUDGET);
    let body = r#"{"model":"gpt-4o","input":"write a lot","stream":true}"#;
    let r = send(&g, &token, body, "x-mock-output-tokens: 6000\r\n");
    expect_status(&r, 200);
    let sent = mock_requests(&m)[0]["body"].as_str().unwrap().to_owned();
    assert!(sent.contains("\"max_output_tokens\":4096"), "{sent}");
    let all = events(&r);
    let last = all.last().unwrap();
    assert_eq!(last["type"], "response.incomplete", "{last}");
    assert_eq!(
        last["response"]["incomplete_details"]["reason"],
        "max_output_tokens"
    );
    assert_eq!(last["response"]["usage"]["output_tokens"], 4096);
    let line = logged(&g, &r);
    assert_eq!(line["output_tokens"], 4096, "{line}");
    let cost = line["cost_pusd"].as_i64().unwrap();
    assert!(cost <= line["reserved_pusd"].as_i64().unwrap(), "{line}");
    // Without a budget nothing is reserved and the request goes as sent.
    let (m, g, _s, token) = setup("");
    let r = send(&g, &token, body, "x-mock-output-tokens: 20\r\n");
    expect_status(&r, 200);
    assert_eq!(mock_requests(&m)[0]["body"], body);
}

#[test]
fn input_the_body_only_refers_to_is_reserved_at_the_context_window() {
    let (m, g, _s, token) = setup(BUDGET);
    let body = r#"{"model":"gpt-4o","previous_response_id":"resp_123","input":"and then?","max_output_tokens":16}"#;
    let r = send(&g, &token, body, "x-mock-output-tokens: 5\r\n");
    expect_status(&r, 200);
    let line = logged(&g, &r);
    let reserved = line["reserved_pusd"].as_i64().unwrap();
    assert!(reserved >= 128_000 * IN + 16 * OUT, "{line}");
    assert_eq!(mock_requests(&m)[0]["body"], body);
    // The same without a budget is forwarded too (the bound is the sheet's, known for the model).
    let (m, g, _s, token) = setup("");
    let r = send(&g, &token, body, "");
    expect_status(&r, 200);
    assert_eq!(mock_requests(&m).len(), 1);
}

#[test]
fn bad_input_is_refused_in_the_apis_error_shape_before_the_provider_is_called() {
    let (m, g, _s, token) = setup(BUDGET);
    for (body, status, code, says) in [
        ("not json", 400, "invalid_body", "not valid JSON"),
        (r#"{"input":"hi"}"#, 400, "invalid_body", "\"model\""),
        (
            r#"{"model":5,"input":"hi"}"#,
            400,
            "invalid_body",
            "`model`",
        ),
        (
            r#"{"model":"gpt-4o","input":5}"#,
            400,
            "invalid_body",
            "`input`",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","stream":"yes"}"#,
            400,
            "invalid_body",
            "`stream`",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","tools":"none"}"#,
            400,
            "invalid_body",
            "`tools`",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","max_output_tokens":15}"#,
            400,
            "invalid_body",
            "at least 16",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","max_output_tokens":-5}"#,
            400,
            "invalid_body",
            "`max_output_tokens`",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","max_output_tokens":1.5}"#,
            400,
            "invalid_body",
            "`max_output_tokens`",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","max_tokens":100}"#,
            400,
            "invalid_body",
            "unknown parameter `max_tokens`",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","input":"again"}"#,
            400,
            "invalid_body",
            "duplicate key",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","tools":[{"type":"web_search"}]}"#,
            400,
            "cost_unbounded",
            "`tools[0]`",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","tools":[{"type":"function","name":"f"},{"type":"file_search","vector_store_ids":["v"]}]}"#,
            400,
            "cost_unbounded",
            "`tools[1]`",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","tools":[{"type":"code_interpreter","container":{"type":"auto"}}]}"#,
            400,
            "cost_unbounded",
            "code_interpreter",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","service_tier":"priority"}"#,
            400,
            "cost_unbounded",
            "service_tier",
        ),
        (
            r#"{"model":"gpt-4o","input":"hi","background":true}"#,
            400,
            "cost_unbounded",
            "background",
        ),
        (
            r#"{"model":"gpt-4o","previous_response_id":5}"#,
            400,
            "invalid_body",
            "`previous_response_id`",
        ),
        (
            r#"{"model":"gpt-4o","previous_response_id":""}"#,
            400,
            "invalid_body",
            "`previous_response_id`",
        ),
        (
            r#"{"model":"claude-haiku-4-5","input":"hi"}"#,
            400,
            "bad_request",
            "/v1/messages",
        ),
        (
            r#"{"model":"nope-1","input":"hi"}"#,
            404,
            "model_not_found",
            "nope-1",
        ),
    ] {
        let r = send(&g, &token, body, "");
        assert_eq!(r.status, status, "{body}: {}", r.text());
        let v = r.json();
        let e = &v["error"];
        assert_eq!(e["code"], code, "{body}: {v}");
        assert!(e["message"].as_str().unwrap().contains(says), "{body}: {v}");
        assert!(
            e["type"].is_string() && e.get("param").is_some(),
            "{body}: {v}"
        );
    }
    assert!(mock_requests(&m).is_empty(), "the provider was called");
    // GET is not the method.
    let r = request(
        g.addr,
        format!("GET /v1/responses HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].is_string());
}

#[test]
fn a_provider_failing_mid_stream_ends_it_with_response_failed() {
    let (_m, g, _s, token) = setup(BUDGET);
    let body = r#"{"model":"gpt-4o","input":"hi","max_output_tokens":64,"stream":true}"#;
    let r = send(
        &g,
        &token,
        body,
        "x-mock-output-tokens: 30\r\nx-mock-disconnect-after: 5\r\n",
    );
    expect_status(&r, 200);
    let all = events(&r);
    let n = all.len();
    assert_eq!(all[n - 2]["type"], "error", "{all:?}");
    assert_eq!(all[n - 1]["type"], "response.failed");
    assert_eq!(all[n - 1]["response"]["status"], "failed");
    let line = logged(&g, &r);
    assert_eq!(line["outcome"], "upstream_failed", "{line}");
    assert_eq!(line["usage"], "estimated", "{line}");
    assert!(line["cost_pusd"].as_i64().unwrap() > 0, "{line}");
}

#[test]
fn a_tool_call_turn_then_a_final_answer() {
    let (_m, g, _s, token) = setup("");
    let tools = r#"[{"type":"function","name":"shell","parameters":{"type":"object","properties":{"command":{"type":"array","items":{"type":"string"}}},"required":["command"]}}]"#;
    let first = format!(
        r#"{{"model":"gpt-4o","tools":{tools},"input":[{{"type":"message","role":"user","content":[{{"type":"input_text","text":"list files"}}]}}],"stream":true}}"#
    );
    let r = send(&g, &token, &first, "x-mock-output-tokens: 8\r\n");
    expect_status(&r, 200);
    let all = events(&r);
    let done = all.last().unwrap();
    assert_eq!(done["type"], "response.completed");
    let call = &done["response"]["output"][0];
    assert_eq!(call["type"], "function_call", "{done}");
    assert_eq!(call["name"], "shell");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["command"].is_array(), "{args}");
    let second = format!(
        r#"{{"model":"gpt-4o","tools":{tools},"input":[{{"type":"message","role":"user","content":"list files"}},{call},{{"type":"function_call_output","call_id":{},"output":"a.txt"}}]}}"#,
        call["call_id"]
    );
    let r = send(&g, &token, &second, "x-mock-output-tokens: 3\r\n");
    expect_status(&r, 200);
    let v = r.json();
    assert_eq!(v["output"][0]["type"], "message", "{v}");
    assert!(v["output"][0]["content"][0]["text"].is_string());
}
