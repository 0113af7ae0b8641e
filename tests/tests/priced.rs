//! The provider runs exactly the request Tollgate priced: end to end against the mock in real-API mode
//! (last duplicate key wins, `n` honoured, a null cap is no cap, usage over all choices), the way a careless
//! or hostile client would try to spend past a reservation.
//!
//! Prices (the shipped sheet): gpt-4o 2,500,000 pico-USD per input token and 10,000,000 per output token;
//! gpt-4o-mini 150,000 and 600,000.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use serde_json::json;
use tollgate_tests::*;

/// A real-API mock, a gateway with `extra` TOML (budgets, policies, routes), its own store and one service
/// token of team `platform`.
fn setup(extra: &str) -> (Proc, Gateway, TempDir, String) {
    let m = mock(&["--expect-key", MOCK_KEY, "--real-api"]);
    let store = TempDir::new("priced-store");
    let token = service_token(&store.0, "platform");
    let extra = format!(
        "[store]\ndir = \"{}\"\n[auth]\n{extra}\n",
        store.0.display()
    );
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", &extra));
    (m, g, store, token)
}

fn auth(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// The gateway's access-log line for a response.
fn logged(g: &Gateway, r: &Response) -> serde_json::Value {
    g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ])
}

/// A chat request from the team's token, asking the mock for far more output than any cap here.
fn send(g: &Gateway, token: &str, body: &str) -> Response {
    post(
        g.addr,
        "/v1/chat/completions",
        body,
        &format!("{}{LONG}", auth(token)),
    )
}

/// The response's status, with the start of its body when it is not the expected one.
fn expect_status(r: &Response, status: u16) {
    assert_eq!(
        r.status,
        status,
        "{}",
        r.text().chars().take(300).collect::<String>()
    );
}

/// The gateway's charge for `r` fits within what it reserved; returns (cost, reserved) in pico-USD.
fn within_reservation(g: &Gateway, r: &Response) -> (i64, i64) {
    let line = logged(g, r);
    let cost = line["cost_pusd"].as_i64().unwrap();
    let reserved = line["reserved_pusd"].as_i64().unwrap();
    assert!(
        cost <= reserved,
        "billed {cost} pico-USD over the reservation {reserved}: {line}"
    );
    (cost, reserved)
}

/// What the mock recorded for its only request.
fn only_request(m: &Proc) -> serde_json::Value {
    let all = mock_requests(m);
    assert_eq!(all.len(), 1, "{all:?}");
    all[0].clone()
}

const TEAM_BUDGET: &str = r#"
[[budgets]]
name = "team"
amount_usd = "0.01"
window = "day"
scope = "group"
group = "platform"
"#;

/// Wants far more output than any cap in these tests, so the cap is what stops the mock.
const LONG: &str = "x-mock-output-tokens: 5000\r\nx-mock-token-delay-ms: 0\r\n";

#[test]
fn n_choices_are_reserved_n_times_and_a_request_that_cannot_fit_never_reaches_the_provider() {
    let (m, g, _s, token) = setup(TEAM_BUDGET);
    // 50 choices of 100 tokens of gpt-4o: $0.05 of output, five times the $0.01 budget.
    let big =
        r#"{"model":"gpt-4o","n":50,"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = send(&g, &token, big);
    expect_status(&r, 429);
    assert!(mock_requests(&m).is_empty(), "the provider was called");

    // 5 choices fit: reserved for 5 x 100 output tokens, billed what the provider generated for all five.
    let five =
        r#"{"model":"gpt-4o","n":5,"max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = send(&g, &token, five);
    expect_status(&r, 200);
    assert_eq!(r.json()["choices"].as_array().unwrap().len(), 5);
    let billed = only_request(&m)["billed"].clone();
    assert_eq!(billed["output_tokens"], 500, "{billed}");
    let line = logged(&g, &r);
    assert_eq!(line["output_tokens"], 500, "{line}");
    let (_, reserved) = within_reservation(&g, &r);
    assert!(reserved >= 500 * 10_000_000, "reserved {reserved}");
}

#[test]
fn a_null_cap_gets_the_policy_cap_in_its_place_and_the_provider_stops_there() {
    let policy = r#"
[[policies]]
name = "capped"
default = true
max_tokens = 64
"#;
    let (m, g, _s, token) = setup(&format!("{TEAM_BUDGET}{policy}"));
    let body = r#"{"model":"gpt-4o-mini","max_completion_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = send(&g, &token, body);
    expect_status(&r, 200);
    let rec = only_request(&m);
    let sent = rec["body"].as_str().unwrap();
    // One cap field, holding the policy's cap: the client's null was replaced, not shadowed.
    assert_eq!(
        sent.matches("\"max_completion_tokens\"").count(),
        1,
        "{sent}"
    );
    assert!(sent.contains("\"max_completion_tokens\":64"), "{sent}");
    assert!(!sent.contains("null"), "{sent}");
    assert_eq!(rec["billed"]["output_tokens"], 64);
    within_reservation(&g, &r);
}

#[test]
fn a_null_cap_gets_the_routes_default_in_its_place() {
    let route = r#"
[[routes]]
model = "gpt-4o"
provider = "openai"
default_max_tokens = 32
"#;
    let (m, g, _s, token) = setup(&format!("{TEAM_BUDGET}{route}"));
    let body =
        r#"{"model":"gpt-4o","max_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = send(&g, &token, body);
    expect_status(&r, 200);
    let rec = only_request(&m);
    let sent = rec["body"].as_str().unwrap();
    assert!(sent.contains("\"max_tokens\":32"), "{sent}");
    assert_eq!(sent.matches("max_").count(), 1, "{sent}");
    assert_eq!(rec["billed"]["output_tokens"], 32);
    within_reservation(&g, &r);
}

#[test]
fn duplicate_keys_invalid_utf8_and_unboundable_fields_are_refused_before_the_provider() {
    let (m, g, _s, token) = setup(TEAM_BUDGET);
    let a = auth(&token);
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","n":1,"max_tokens":10,"messages":[],"n":50}"#,
        &a,
    );
    expect_status(&r, 400);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("duplicate key \"n\""), "{msg}");

    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","max_tokens":10,"messages":[{"role":"user","content":"a","content":"b"}]}"#,
        &a,
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("messages[0].content"), "{}", r.text());

    let body = b"{\"model\":\"gpt-4o\",\"max_tokens\":10,\"messages\":[{\"role\":\"user\",\"content\":\"\xc3\x28\"}]}";
    let mut raw = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{a}\r\n",
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(body);
    let r = request(g.addr, &raw);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("not valid UTF-8"), "{}", r.text());

    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","max_tokens":10,"web_search_options":{},"messages":[]}"#,
        &a,
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "cost_unbounded", "{}", r.text());
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-sonnet-4-5","max_tokens":10,"tools":[{"type":"web_search_20250305","name":"web_search"}],"messages":[]}"#,
        &a,
    );
    expect_status(&r, 400);
    assert!(r.text().contains("server tools"), "{}", r.text());
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-sonnet-4-5","max_tokens":null,"messages":[]}"#,
        &a,
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("max_tokens"), "{}", r.text());

    assert!(
        mock_requests(&m).is_empty(),
        "a refused request reached the provider"
    );
}

#[test]
fn stream_options_null_is_replaced_so_the_stream_is_billed_from_usage() {
    let (m, g, _s, token) = setup(TEAM_BUDGET);
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":null,"max_tokens":20,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = send(&g, &token, body);
    expect_status(&r, 200);
    let sent = only_request(&m)["body"].as_str().unwrap().to_owned();
    assert_eq!(sent.matches("\"stream_options\"").count(), 1, "{sent}");
    assert!(sent.contains("\"include_usage\":true"), "{sent}");
    // The client asked for no usage and gets none; the gateway billed the provider's numbers.
    let events = sse_events(r.text().as_bytes());
    assert!(
        events.iter().all(|(_, d)| !d.contains("\"usage\":{")),
        "{events:?}"
    );
    let line = logged(&g, &r);
    assert_eq!(line["usage"], "reported", "{line}");
    assert_eq!(line["output_tokens"], 20, "{line}");
}

#[test]
fn lower_max_tokens_replaces_a_null_cap_and_the_choices_fit_what_is_left() {
    let budget = r#"
[[budgets]]
name = "tight"
amount_usd = "0.00004"
window = "day"
scope = "group"
group = "platform"
on_insufficient = "lower_max_tokens"
"#;
    let (m, g, _s, token) = setup(budget);
    // gpt-4o-mini: 40,000,000 pico left pays for the input bound and then what fits of 2 choices.
    let body = r#"{"model":"gpt-4o-mini","n":2,"max_tokens":null,"max_completion_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = send(&g, &token, body);
    expect_status(&r, 200);
    let lowered: u64 = r
        .header("x-tollgate-max-tokens-lowered")
        .and_then(|h| h.split_once("->"))
        .unwrap()
        .1
        .parse()
        .unwrap();
    let expect = ((40_000_000 - body.len() as i64 * 150_000) / (2 * 600_000)) as u64;
    assert_eq!(lowered, expect);
    let rec = only_request(&m);
    let sent = rec["body"].as_str().unwrap();
    // Both cap fields say the lowered cap: the provider cannot read the client's null or 1000.
    assert!(
        sent.contains(&format!("\"max_tokens\":{lowered}")),
        "{sent}"
    );
    assert!(
        sent.contains(&format!("\"max_completion_tokens\":{lowered}")),
        "{sent}"
    );
    assert_eq!(rec["billed"]["output_tokens"], 2 * lowered);
    let (cost, _) = within_reservation(&g, &r);
    assert!(cost <= 40_000_000, "spent {cost} of the 40,000,000 left");
}

/// The issue's overshoot measurement: 200 concurrent requests that each try a way past the reservation
/// (`n`, null caps under a policy cap, duplicated keys) against one small budget.
#[test]
fn two_hundred_concurrent_hostile_requests_never_overspend_a_small_budget() {
    let extra = r#"
[[budgets]]
name = "small"
amount_usd = "0.002"
window = "day"
scope = "group"
group = "platform"

[[policies]]
name = "capped"
default = true
max_tokens = 40
"#;
    let (_m, g, _s, token) = setup(extra);
    let bodies = [
        r#"{"model":"gpt-4o-mini","n":3,"max_tokens":40,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o-mini","max_completion_tokens":null,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o-mini","n":2,"max_tokens":null,"max_completion_tokens":null,"stream":true,"stream_options":null,"messages":[{"role":"user","content":"hi"}]}"#,
        r#"{"model":"gpt-4o-mini","n":1,"max_tokens":10,"messages":[{"role":"user","content":"hi"}],"n":8}"#,
    ];
    let addr = g.addr;
    let threads: Vec<_> = (0..200)
        .map(|i| {
            let headers = format!(
                "{}x-mock-output-tokens: 5000\r\nx-mock-token-delay-ms: 2\r\n",
                auth(&token)
            );
            let body = bodies[i % bodies.len()];
            std::thread::spawn(move || {
                let r = post(addr, "/v1/chat/completions", body, &headers);
                (r.status, r.header("x-request-id").map(str::to_owned))
            })
        })
        .collect();
    let results: Vec<(u16, Option<String>)> =
        threads.into_iter().map(|h| h.join().unwrap()).collect();
    let served: Vec<&String> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .filter_map(|(_, id)| id.as_ref())
        .collect();
    let refused = results.iter().filter(|(s, _)| *s == 429).count();
    let invalid = results.iter().filter(|(s, _)| *s == 400).count();
    assert_eq!(served.len() + refused + invalid, 200, "{results:?}");
    assert_eq!(invalid, 50, "every duplicated-key body is refused");
    assert!(refused > 0 && !served.is_empty());
    let total: i64 = served
        .iter()
        .map(|id| {
            g.wait_json(&[("event", json!("request")), ("request_id", json!(id))])["cost_pusd"]
                .as_i64()
                .unwrap()
        })
        .sum();
    let limit = 2_000_000_000i64;
    println!(
        "200 hostile requests: served {} refused {refused} invalid {invalid}; spent {total} of {limit} pico-USD",
        served.len()
    );
    assert!(total <= limit, "overspent: {total} > {limit}");
}
