//! The endpoints beyond chat, end to end on the real binaries: OpenAI embeddings (reserved from their input
//! before forwarding, billed per input token), Anthropic token counting (authorized, forwarded, never
//! billed), `anthropic-beta` headers (forwarded; the 1M-context beta billed at long-context prices), the
//! paths without `/v1` (aliases forwarded to the `/v1` path), and policy caps that lower a larger request.
//!
//! Prices (the shipped sheet): text-embedding-3-small 20,000 pico-USD per input token, -3-large 130,000;
//! gpt-4o-mini 150,000 in, 600,000 out; claude-sonnet-4-5 3,000,000 in and 15,000,000 out, above 200,000
//! input tokens 6,000,000 and 22,500,000 for every token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use serde_json::json;
use tollgate_tests::*;

const ROUTES_AND_POLICIES: &str = r#"
[[routes]]
model = "text-embedding-*"
provider = "openai"

[[policies]]
name = "team"
group = "platform"
deny_models = ["text-embedding-3-large", "claude-opus-*"]
max_tokens = 4096

[[policies]]
name = "strict"
group = "strict"
max_tokens = 100
on_max_tokens = "refuse"
"#;

/// A real-API mock, a gateway with the routes and policies above plus `extra` (budgets), its own store,
/// and service tokens of teams `platform` and `strict`.
fn setup(extra: &str) -> (Proc, Gateway, TempDir, String, String) {
    let m = mock(&["--expect-key", MOCK_KEY, "--real-api"]);
    let store = TempDir::new("endpoints-store");
    let platform = service_token(&store.0, "platform");
    let strict = service_token(&store.0, "strict");
    let extra = format!(
        "[store]\ndir = \"{}\"\n[auth]\n{ROUTES_AND_POLICIES}\n{extra}\n",
        store.0.display()
    );
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", &extra));
    (m, g, store, platform, strict)
}

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

fn anthropic(token: &str) -> String {
    format!("x-api-key: {token}\r\nanthropic-version: 2023-06-01\r\n")
}

/// The gateway's access-log line for a response.
fn logged(g: &Gateway, r: &Response) -> serde_json::Value {
    g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ])
}

/// Forgets what the mock recorded so far.
fn clear_requests(m: &Proc) {
    let r = request(
        m.addr,
        b"DELETE /_mock/requests HTTP/1.1\r\nHost: m\r\n\r\n",
    );
    assert_eq!(r.status, 204);
}

fn header<'a>(rec: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    rec["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h[0] == name)
        .and_then(|h| h[1].as_str())
}

const DAY_BUDGET: &str = r#"
[[budgets]]
name = "all"
amount_usd = "1"
window = "day"
scope = "everyone"
"#;

#[test]
fn embeddings_are_reserved_from_their_input_and_billed_per_input_token() {
    let (m, g, _s, token, _) = setup(DAY_BUDGET);
    // Token ids count exactly: 5 tokens reserved, 5 billed, at 20,000 pico each.
    let body =
        r#"{"model":"text-embedding-3-small","input":[[1,2,3],[4,5]],"dimensions":4,"user":"u-1"}"#;
    let r = post(g.addr, "/v1/embeddings", body, &bearer(&token));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(v["data"][1]["embedding"].as_array().unwrap().len(), 4);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    assert_eq!(r.header("x-tollgate-cost"), Some("0.0000001"));
    assert!(r.header("x-tollgate-budget").is_some());
    let line = logged(&g, &r);
    assert_eq!(line["api"], "embeddings");
    assert_eq!(line["reserved_pusd"], 100_000);
    assert_eq!(line["cost_pusd"], 100_000);
    assert_eq!(
        (
            line["input_tokens"].as_u64(),
            line["output_tokens"].as_u64()
        ),
        (Some(5), Some(0))
    );
    assert_eq!(line["usage"], "reported");
    let rec = mock_requests(&m).pop().unwrap();
    assert_eq!(rec["path"], "/v1/embeddings");
    assert_eq!(
        header(&rec, "authorization"),
        Some(format!("Bearer {MOCK_KEY}").as_str())
    );
    // Exactly the request priced: no output cap was written into it (a policy's cap does not apply).
    assert_eq!(rec["body"], body);
    assert_eq!(rec["billed"]["input_tokens"], 5);
    // A string is bounded by its bytes (11 reserved); the provider bills its tokens (3 here).
    let r = post(
        g.addr,
        "/embeddings",
        r#"{"model":"text-embedding-3-small","input":"hello world","encoding_format":"base64"}"#,
        &bearer(&token),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["data"][0]["embedding"].is_string());
    let line = logged(&g, &r);
    assert_eq!(line["reserved_pusd"], 11 * 20_000);
    assert_eq!(line["cost_pusd"], 3 * 20_000);
    assert_eq!(mock_requests(&m).pop().unwrap()["path"], "/v1/embeddings");
    // The reported usage is billed even when it exceeds the bound (a provider counting differently).
    let r = post(
        g.addr,
        "/v1/embeddings",
        r#"{"model":"text-embedding-ada-002","input":["a","b"]}"#,
        &format!("{}x-mock-input-tokens: 1000\r\n", bearer(&token)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(logged(&g, &r)["cost_pusd"], 1000 * 100_000);
}

#[test]
fn embeddings_bad_input_is_refused_in_openai_shape_before_the_provider() {
    let (m, g, _s, token, _) = setup(DAY_BUDGET);
    let cases: &[(&str, u16, &str, &str)] = &[
        ("not json", 400, "invalid_body", "not valid JSON"),
        ("", 400, "invalid_body", "empty"),
        (r#"{"input":"x"}"#, 400, "invalid_body", "model"),
        (
            r#"{"model":"nope","input":"x"}"#,
            404,
            "model_not_found",
            "nope",
        ),
        (
            r#"{"model":"claude-sonnet-4-5","input":"x"}"#,
            400,
            "bad_request",
            "/v1/messages",
        ),
        (
            r#"{"model":"gpt-4o-mini","input":"x","input":[1]}"#,
            400,
            "invalid_body",
            "duplicate key",
        ),
        (
            r#"{"model":"text-embedding-3-small"}"#,
            400,
            "invalid_body",
            "`input` is required",
        ),
        (
            r#"{"model":"text-embedding-3-small","input":[]}"#,
            400,
            "invalid_body",
            "empty array",
        ),
        (
            r#"{"model":"text-embedding-3-small","input":["a",1]}"#,
            400,
            "invalid_body",
            "`input[1]`",
        ),
        (
            r#"{"model":"text-embedding-3-small","input":[[1],[-1]]}"#,
            400,
            "invalid_body",
            "`input[1][0]`",
        ),
        (
            r#"{"model":"text-embedding-3-small","input":{"text":"a"}}"#,
            400,
            "invalid_body",
            "`input`",
        ),
        (
            r#"{"model":"text-embedding-3-small","input":"a","dimensions":0}"#,
            400,
            "invalid_body",
            "`dimensions`",
        ),
        (
            r#"{"model":"text-embedding-3-small","input":"a","encoding_format":"int8"}"#,
            400,
            "invalid_body",
            "`encoding_format`",
        ),
        (
            r#"{"model":"text-embedding-4-tiny","input":"a"}"#,
            403,
            "model_unpriced",
            "text-embedding-4-tiny",
        ),
        (
            r#"{"model":"text-embedding-3-large","input":"a"}"#,
            403,
            "policy_denied",
            "`team`",
        ),
    ];
    for (body, status, code, says) in cases {
        let r = post(g.addr, "/v1/embeddings", body, &bearer(&token));
        assert_eq!(r.status, *status, "{body}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], *code, "{body}: {v}");
        assert!(v["error"]["type"].is_string(), "{v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{body}: {msg}");
    }
    // Without a credential, and with the wrong method.
    let r = post(
        g.addr,
        "/v1/embeddings",
        r#"{"model":"text-embedding-3-small","input":"a"}"#,
        "",
    );
    assert_eq!(r.status, 401);
    let r = request(
        g.addr,
        format!(
            "GET /v1/embeddings HTTP/1.1\r\nHost: t\r\n{}\r\n",
            bearer(&token)
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");
    assert!(mock_requests(&m).is_empty(), "{:?}", mock_requests(&m));
}

#[test]
fn count_tokens_is_authorized_and_forwarded_with_its_betas_but_never_budgeted() {
    // A budget far too small for any messages request.
    let (m, g, _s, token, _) = setup(
        r#"
[[budgets]]
name = "tiny"
amount_usd = "0.000001"
window = "day"
scope = "everyone"
"#,
    );
    let body = r#"{"model":"claude-sonnet-4-5","messages":[{"role":"user","content":"hi"}]}"#;
    let headers = format!(
        "{}anthropic-beta: token-counting-2024-11-01,context-1m-2025-08-07\r\nx-mock-input-tokens: 1234\r\n",
        anthropic(&token)
    );
    for path in ["/v1/messages/count_tokens", "/messages/count_tokens"] {
        let r = post(g.addr, path, body, &headers);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json(), json!({"input_tokens": 1234}));
        assert!(r.header("x-tollgate-budget").is_none());
        assert!(r.header("x-tollgate-cost").is_none());
        let line = logged(&g, &r);
        assert!(line.get("reserved_pusd").is_none(), "{line}");
        assert!(line.get("cost_pusd").is_none(), "{line}");
        assert_eq!(line["status"], 200);
        let rec = mock_requests(&m).pop().unwrap();
        assert_eq!(rec["path"], "/v1/messages/count_tokens");
        assert_eq!(header(&rec, "x-api-key"), Some(MOCK_KEY));
        assert_eq!(
            header(&rec, "anthropic-beta"),
            Some("token-counting-2024-11-01,context-1m-2025-08-07")
        );
        assert_eq!(rec["body"], body);
    }
    // The same body as a messages request is budgeted (and this budget cannot cover it).
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-sonnet-4-5","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
        &anthropic(&token),
    );
    assert_eq!(r.status, 429, "{}", r.text());
    // Bad input, in Anthropic's shape, before the provider.
    clear_requests(&m);
    let cases: &[(&str, u16, &str, &str)] = &[
        ("{", 400, "invalid_request_error", "not valid JSON"),
        (r#"{"messages":[]}"#, 400, "invalid_request_error", "model"),
        (
            r#"{"model":"nope","messages":[]}"#,
            404,
            "not_found_error",
            "nope",
        ),
        (
            r#"{"model":"gpt-4o","messages":[]}"#,
            400,
            "invalid_request_error",
            "/v1/chat/completions",
        ),
        (
            r#"{"model":"claude-opus-4-1","messages":[]}"#,
            403,
            "permission_error",
            "`team`",
        ),
        (
            r#"{"model":"claude-sonnet-4-5","model":"claude-opus-4-1","messages":[]}"#,
            400,
            "invalid_request_error",
            "duplicate key",
        ),
    ];
    for (body, status, kind, says) in cases {
        let r = post(
            g.addr,
            "/v1/messages/count_tokens",
            body,
            &anthropic(&token),
        );
        assert_eq!(r.status, *status, "{body}: {}", r.text());
        let v = r.json();
        assert_eq!(v["type"], "error", "{v}");
        assert_eq!(v["error"]["type"], *kind, "{body}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(says),
            "{body}: {v}"
        );
    }
    assert!(mock_requests(&m).is_empty());
    let r = post(
        g.addr,
        "/v1/messages/count_tokens",
        body,
        "anthropic-version: 2023-06-01\r\n",
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = request(
        g.addr,
        format!(
            "GET /v1/messages/count_tokens HTTP/1.1\r\nHost: t\r\n{}\r\n",
            anthropic(&token)
        )
        .as_bytes(),
    );
    assert_eq!(r.status, 405);
    // What the provider refuses (no `messages`) comes back as the provider said it, never billed.
    let r = post(
        g.addr,
        "/v1/messages/count_tokens",
        r#"{"model":"claude-sonnet-4-5"}"#,
        &anthropic(&token),
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
}

#[test]
fn betas_are_forwarded_and_the_1m_context_is_billed_at_long_context_prices() {
    let (m, g, _s, token, _) = setup("");
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let send = |input: u64| {
        post(
            g.addr,
            "/v1/messages",
            body,
            &format!(
                "{}anthropic-beta: context-1m-2025-08-07\r\nx-mock-input-tokens: {input}\r\nx-mock-output-tokens: 10\r\n",
                anthropic(&token)
            ),
        )
    };
    // Above 200,000 input tokens every token is billed at the long-context tier...
    let r = send(300_000);
    assert_eq!(r.status, 200, "{}", r.text());
    let cost: i128 = 300_000 * 6_000_000 + 10 * 22_500_000;
    assert_eq!(logged(&g, &r)["cost_pusd"], json!(cost));
    let rec = mock_requests(&m).pop().unwrap();
    assert_eq!(
        header(&rec, "anthropic-beta"),
        Some("context-1m-2025-08-07")
    );
    assert_eq!(header(&rec, "anthropic-version"), Some("2023-06-01"));
    // ...and at it, the base prices.
    let r = send(200_000);
    let cost: i128 = 200_000 * 3_000_000 + 10 * 15_000_000;
    assert_eq!(logged(&g, &r)["cost_pusd"], json!(cost));
}

#[test]
fn paths_without_v1_are_aliases_forwarded_to_the_v1_path() {
    let (m, g, _s, token, _) = setup("");
    for (path, body, headers, upstream) in [
        (
            "/chat/completions",
            r#"{"model":"gpt-4o-mini","max_tokens":5,"messages":[]}"#,
            bearer(&token),
            "/v1/chat/completions",
        ),
        (
            "/messages",
            r#"{"model":"claude-sonnet-4-5","max_tokens":5,"messages":[]}"#,
            anthropic(&token),
            "/v1/messages",
        ),
        (
            "/embeddings",
            r#"{"model":"text-embedding-3-small","input":"x"}"#,
            bearer(&token),
            "/v1/embeddings",
        ),
        (
            "/messages/count_tokens",
            r#"{"model":"claude-sonnet-4-5","messages":[]}"#,
            anthropic(&token),
            "/v1/messages/count_tokens",
        ),
    ] {
        let r = post(g.addr, path, body, &headers);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(mock_requests(&m).pop().unwrap()["path"], upstream, "{path}");
        assert_eq!(logged(&g, &r)["path"], path);
    }
    // `/models` is `/v1/models`, answered by the gateway itself.
    let list = |path: &str| {
        request(
            g.addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n{}\r\n", bearer(&token)).as_bytes(),
        )
    };
    let (a, b) = (list("/models"), list("/v1/models"));
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(a.json(), b.json());
    // `/responses` is `/v1/responses`, forwarded upstream to the `/v1` path.
    clear_requests(&m);
    let r = post(
        g.addr,
        "/responses",
        r#"{"model":"gpt-4o-mini","input":"x"}"#,
        &bearer(&token),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock_requests(&m)[0]["path"], "/v1/responses");
    // Nothing else is an endpoint: not another version, not a doubled prefix.
    clear_requests(&m);
    for path in ["/v2/chat/completions", "/v1/v1/messages"] {
        let r = post(
            g.addr,
            path,
            r#"{"model":"gpt-4o-mini","input":"x"}"#,
            &bearer(&token),
        );
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json()["error"]["code"], "not_found", "{path}");
    }
    assert!(mock_requests(&m).is_empty());
}

#[test]
fn a_policy_cap_lowers_a_larger_request_or_refuses_it_as_its_policy_says() {
    let (m, g, _s, platform, strict) = setup(DAY_BUDGET);
    // Lowered (the default): the body says the cap, reserved and billed at it, and the client is told.
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":32000,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        g.addr,
        "/v1/chat/completions",
        body,
        &format!("{}x-mock-output-tokens: 50000\r\n", bearer(&platform)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-tollgate-max-tokens-lowered"),
        Some("32000->4096")
    );
    let rec = mock_requests(&m).pop().unwrap();
    let sent: serde_json::Value = serde_json::from_str(rec["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["max_tokens"], 4096);
    assert!(sent.get("max_completion_tokens").is_none());
    assert_eq!(rec["billed"]["output_tokens"], 4096);
    let line = logged(&g, &r);
    let input_bound = rec["body"].as_str().unwrap().len() as i64;
    assert_eq!(
        line["reserved_pusd"],
        json!(input_bound * 150_000 + 4096 * 600_000)
    );
    assert_eq!(
        (
            line["max_tokens_asked"].as_u64(),
            line["max_tokens_lowered"].as_u64()
        ),
        (Some(32000), Some(4096))
    );
    assert!(line["cost_pusd"].as_i64().unwrap() <= line["reserved_pusd"].as_i64().unwrap());
    // Anthropic with extended thinking: its budget is fitted below the cap, as the API requires.
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-sonnet-4-5","max_tokens":32000,"thinking":{"type":"enabled","budget_tokens":31999},"messages":[{"role":"user","content":"hi"}]}"#,
        &anthropic(&platform),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-tollgate-max-tokens-lowered"),
        Some("32000->4096")
    );
    let sent: serde_json::Value =
        serde_json::from_str(mock_requests(&m).pop().unwrap()["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["max_tokens"], 4096);
    assert_eq!(
        sent["thinking"],
        json!({"type": "enabled", "budget_tokens": 4095})
    );
    // At or under the cap: untouched.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","max_completion_tokens":4096,"messages":[]}"#,
        &bearer(&platform),
    );
    assert_eq!(r.status, 200);
    assert!(r.header("x-tollgate-max-tokens-lowered").is_none());
    // Refused where the policy says so, naming it, in each API's shape.
    clear_requests(&m);
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","max_tokens":101,"messages":[]}"#,
        &bearer(&strict),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "policy_denied");
    assert!(
        r.text().contains("cap of 100") && r.text().contains("`strict`"),
        "{}",
        r.text()
    );
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-sonnet-4-5","max_tokens":32000,"messages":[]}"#,
        &anthropic(&strict),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["type"], "permission_error");
    assert!(mock_requests(&m).is_empty());
}
