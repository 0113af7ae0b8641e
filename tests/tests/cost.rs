//! Real-time cost: usage read from every response shape, priced exactly (pico-USD integers) with list and
//! negotiated prices, logged per request; unpriced models refused; aborted streams still charged.
//!
//! Prices used (the shipped sheet, USD per 1M tokens): gpt-4o-mini 0.15 input / 0.075 cached / 0.60 output;
//! claude-haiku-4-5 1 input / 1.25 cache write 5m / 2 cache write 1h / 0.10 cache read / 5 output.
//! One pico-USD per token per "USD 0.000001 per 1M tokens", so 0.15 -> 150,000 pico-USD per token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use serde_json::json;
use tollgate_tests::*;

/// 1000 prompt tokens of which 400 cached, 16 output of which 5 reasoning, on gpt-4o-mini:
/// 600 x 150,000 + 400 x 75,000 + 16 x 600,000 = 129,600,000 pico-USD ($0.0001296).
const OPENAI_HEADERS: &str =
    "x-mock-input-tokens: 1000\r\nx-mock-cached-tokens: 400\r\nx-mock-reasoning-tokens: 5\r\n";
const OPENAI_COST: i64 = 129_600_000;

fn request_line(g: &Gateway, id: &str) -> serde_json::Value {
    g.wait_json(&[("event", json!("request")), ("request_id", json!(id))])
}

#[test]
fn openai_usage_is_priced_exactly_streamed_or_not() {
    let (_m, g) = mock_and_gateway("");
    let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(g.addr, "/v1/chat/completions", body, OPENAI_HEADERS);
    assert_eq!(r.status, 200);
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["usage"], "reported");
    assert_eq!(line["input_tokens"], 600);
    assert_eq!(line["cached_input_tokens"], 400);
    assert_eq!(line["output_tokens"], 16);
    assert_eq!(line["reasoning_tokens"], 5);
    assert_eq!(line["list_cost_pusd"], OPENAI_COST);
    assert_eq!(line["cost_pusd"], OPENAI_COST);
    assert_eq!(line["cost_usd"], "0.0001296");
    // A non-streamed answer carries its cost in the response head, and its body is unchanged JSON.
    assert_eq!(r.header("x-tollgate-cost"), Some("0.0001296"));
    assert_eq!(r.json()["usage"]["prompt_tokens"], 1000);

    let stream = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let r = post(g.addr, "/v1/chat/completions", stream, OPENAI_HEADERS);
    assert!(r.complete);
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["usage"], "reported");
    assert_eq!(line["cost_pusd"], OPENAI_COST);
    // Streams end with their cost as an SSE comment, which SSE parsers ignore.
    assert!(
        r.text()
            .ends_with("data: [DONE]\n\n: tollgate-cost=0.0001296\n\n"),
        "{}",
        r.text()
    );
}

#[test]
fn anthropic_cache_writes_and_reads_are_priced_per_class() {
    let (_m, g) = mock_and_gateway("");
    // 50 input, 1000 5m writes, 2000 1h writes, 7000 reads, 16 output on claude-haiku-4-5:
    // 50 x 1e6 + 1000 x 1.25e6 + 2000 x 2e6 + 7000 x 0.1e6 + 16 x 5e6 = 6,080,000,000 pico-USD.
    let h = "x-mock-input-tokens: 50\r\nx-mock-cache-write-5m-tokens: 1000\r\nx-mock-cache-write-1h-tokens: 2000\r\nx-mock-cache-read-tokens: 7000\r\n";
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"claude-haiku-4-5","max_tokens":100,"stream":{stream},"messages":[]}}"#
        );
        let r = post(g.addr, "/v1/messages", &body, h);
        assert_eq!(r.status, 200);
        let line = request_line(&g, r.header("x-request-id").unwrap());
        assert_eq!(line["usage"], "reported", "stream={stream}");
        assert_eq!(line["cache_write_5m_tokens"], 1000);
        assert_eq!(line["cache_write_1h_tokens"], 2000);
        assert_eq!(line["cached_input_tokens"], 7000);
        assert_eq!(line["cost_pusd"], 6_080_000_000i64, "stream={stream}");
    }
}

#[test]
fn negotiated_discount_applies_only_while_in_effect() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let pricing = r#"
[[pricing.overrides]]
provider = "openai"
discount_percent = "10"
effective_from = "2020-01-01"
note = "contract A"

[[pricing.overrides]]
provider = "anthropic"
discount_percent = "50"
effective_from = "2999-01-01"
note = "not yet"
"#;
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", pricing));
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
        OPENAI_HEADERS,
    );
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["list_cost_pusd"], OPENAI_COST);
    assert_eq!(line["cost_pusd"], OPENAI_COST / 10 * 9);
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-haiku-4-5","max_tokens":100,"messages":[]}"#,
        "x-mock-input-tokens: 100\r\n",
    );
    let line = request_line(&g, r.header("x-request-id").unwrap());
    // 100 x 1e6 + 16 x 5e6; the future discount is not applied.
    assert_eq!(line["list_cost_pusd"], 180_000_000i64);
    assert_eq!(line["cost_pusd"], 180_000_000i64);
}

#[test]
fn an_unpriced_model_is_refused_before_reaching_the_provider() {
    let (m, g) = mock_and_gateway("");
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-unreleased-9","messages":[]}"#,
        "",
    );
    assert_eq!(r.status, 403);
    let v = r.json();
    assert_eq!(v["error"]["code"], "model_unpriced");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("gpt-unreleased-9"));
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-unreleased","max_tokens":1,"messages":[]}"#,
        "",
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["type"], "permission_error");
    assert!(
        mock_requests(&m).is_empty(),
        "an unpriced request reached the provider"
    );

    // With a fallback price it is served and charged at that price.
    let fallback = "[pricing.fallback]\ninput = \"1\"\noutput = \"2\"\n";
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", fallback));
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-unreleased-9","messages":[]}"#,
        "x-mock-input-tokens: 10\r\n",
    );
    assert_eq!(r.status, 200);
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["cost_pusd"], 10 * 1_000_000 + 16 * 2_000_000);
}

#[test]
fn aborted_and_failed_streams_are_still_charged_and_errors_are_not() {
    let (_m, g) = mock_and_gateway("");
    // Upstream dies after 3 tokens: no usage chunk ever comes; the request is charged an estimate.
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let r = post(
        g.addr,
        "/v1/chat/completions",
        body,
        "x-mock-disconnect-after: 3\r\n",
    );
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["outcome"], "upstream_failed");
    assert_eq!(line["usage"], "estimated");
    assert!(line["cost_pusd"].as_i64().unwrap() > 0, "{line}");

    // Anthropic reports input in message_start: the estimate keeps the provider's input count.
    let body = r#"{"model":"claude-haiku-4-5","max_tokens":100,"stream":true,"messages":[]}"#;
    let r = post(
        g.addr,
        "/v1/messages",
        body,
        "x-mock-input-tokens: 77\r\nx-mock-disconnect-after: 2\r\n",
    );
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["usage"], "estimated");
    assert_eq!(line["input_tokens"], 77);

    // A provider error is not billed.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
        "x-mock-status: 429\r\n",
    );
    assert_eq!(r.status, 429);
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["usage"], "none");
    assert_eq!(line["cost_pusd"], 0);
}

#[test]
fn openai_streams_are_metered_even_when_the_client_did_not_ask_for_usage() {
    let (m, g) = mock_and_gateway("");
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(g.addr, "/v1/chat/completions", body, OPENAI_HEADERS);
    assert_eq!(r.status, 200);
    assert!(r.complete);
    // The client sees exactly the stream it asked for: no usage chunk, no "usage":null members.
    assert!(
        !r.text().contains("usage"),
        "usage leaked into the client's stream:\n{}",
        r.text()
    );
    let events = sse_events(&r.body);
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let text: String = events[..events.len() - 1]
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text.split_whitespace().count(), 16);
    // ... while the provider was asked for usage, and the request is priced from it.
    let sent: serde_json::Value =
        serde_json::from_str(mock_requests(&m).last().unwrap()["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["usage"], "reported");
    assert_eq!(line["cost_pusd"], OPENAI_COST);

    // A client that asked gets the usage chunk untouched.
    let asked = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let r = post(g.addr, "/v1/chat/completions", asked, OPENAI_HEADERS);
    assert!(r.text().contains("\"prompt_tokens\":1000"));
}

#[test]
fn a_client_abort_before_the_usage_event_is_still_charged() {
    let (_m, g) = mock_and_gateway("");
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#;
    let mut c = Conn::open(g.addr);
    c.send(
        post_bytes(
            "/v1/chat/completions",
            body,
            "x-mock-output-tokens: 200\r\nx-mock-token-delay-ms: 20\r\n",
        )
        .as_bytes(),
    );
    let mut first = [0u8; 64];
    assert!(std::io::Read::read(&mut c.stream, &mut first).unwrap() > 0);
    drop(c);
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("outcome", json!("client_gone")),
    ]);
    assert_eq!(line["usage"], "estimated");
    assert!(line["cost_pusd"].as_i64().unwrap() > 0, "{line}");
}

#[test]
fn missing_usage_is_estimated_with_the_tokenizer() {
    let (_m, g) = mock_and_gateway("");
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Count these words please"}]}"#;
    let r = post(
        g.addr,
        "/v1/chat/completions",
        body,
        "x-mock-omit-usage: 1\r\n",
    );
    assert!(r.complete);
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["usage"], "estimated");
    let bpe = tiktoken_rs::o200k_base().unwrap();
    // The mock's 16 words, as streamed.
    let generated = "Hello from the Tollgate mock provider this is a deterministic stream of words for load tests ";
    assert_eq!(line["output_tokens"], bpe.encode_ordinary(generated).len());
    // The prompt's text plus the chat format's overhead (3 per message, 3 to prime the reply).
    assert_eq!(
        line["input_tokens"],
        bpe.encode_ordinary("Count these words please\n").len() + 3 + 3
    );
    // 0.15 and 0.60 USD per 1M tokens on gpt-4o-mini.
    let want = line["input_tokens"].as_i64().unwrap() * 150_000
        + line["output_tokens"].as_i64().unwrap() * 600_000;
    assert_eq!(line["cost_pusd"], want);

    // Non-streamed, no usage in the body: the message text is counted.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
        "x-mock-omit-usage: 1\r\n",
    );
    let line = request_line(&g, r.header("x-request-id").unwrap());
    assert_eq!(line["usage"], "estimated");
    assert_eq!(line["output_tokens"], bpe.encode_ordinary(generated).len());
}
