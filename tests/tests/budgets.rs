//! Dollar budgets end to end: the real gateway (two workers, so budget shards talk across cores), the mock
//! provider's deterministic usage, service tokens as identities.
//!
//! Prices (the shipped sheet): gpt-4o-mini 150,000 pico-USD per input token, 600,000 per output token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use serde_json::json;
use tollgate_tests::*;

const IN: i128 = 150_000;
const OUT: i128 = 600_000;

fn chat(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// A gateway with two workers, `budgets` (TOML), its own store, and a token per team in `teams`.
fn setup(budgets: &str, teams: &[&str]) -> (Proc, Gateway, TempDir, Vec<String>) {
    budgeted_gateway("workers = 2", budgets, teams)
}

fn auth(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// The `cost_pusd` the gateway logged for a response.
fn logged_cost(g: &Gateway, r: &Response) -> i128 {
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ]);
    line["cost_pusd"].as_i64().map(i128::from).unwrap_or(0)
}

fn usd_to_pico(s: &str) -> i128 {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac = format!("{frac:0<12}");
    whole.parse::<i128>().unwrap() * 1_000_000_000_000 + frac[..12].parse::<i128>().unwrap()
}

#[test]
fn a_spent_budget_blocks_with_429_naming_it_in_both_api_shapes() {
    // Each request: body bytes x IN + 16 x OUT reserved; the mock bills ceil(bytes/4) in + 16 out.
    let budgets = r#"
[[budgets]]
name = "team-daily"
amount_usd = "0.0001"
window = "day"
scope = "group"
group = "platform"
"#;
    let (_m, g, _s, tokens) = setup(budgets, &["platform"]);
    let body = chat(16);
    let reserve = body.len() as i128 * IN + 16 * OUT;
    let mut spent = 0i128;
    let limit = 100_000_000i128;
    let mut served = 0;
    loop {
        let r = post(g.addr, "/v1/chat/completions", &body, &auth(&tokens[0]));
        if r.status == 429 {
            let v = r.json();
            assert_eq!(v["error"]["type"], "insufficient_quota", "{}", r.text());
            assert_eq!(v["error"]["code"], "budget_exceeded");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains("team-daily") && msg.contains("limit $0.0001"),
                "{msg}"
            );
            assert_eq!(r.header("x-tollgate-budget"), Some("team-daily"));
            assert!(r.header("x-tollgate-budget-reset").unwrap().ends_with('Z'));
            assert!(r.header("retry-after").is_some());
            // Refused exactly when the next reservation no longer fits.
            assert!(spent + reserve > limit, "refused early: spent {spent}");
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        spent += logged_cost(&g, &r);
        served += 1;
        // The header counts this request's reservation as still held.
        let remaining = usd_to_pico(r.header("x-tollgate-budget-remaining").unwrap());
        assert!(remaining <= limit - spent + reserve, "{remaining}");
        assert!(served < 100, "never blocked");
    }
    assert!(spent <= limit);
    assert!(served >= 5, "{served}");
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-haiku-4-5","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
        &format!(
            "x-api-key: {}\r\nanthropic-version: 2023-06-01\r\n",
            tokens[0]
        ),
    );
    // The same group budget covers Anthropic traffic too.
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
}

#[test]
fn each_member_gets_its_own_budget() {
    let budgets = r#"
[[budgets]]
name = "per-agent"
amount_usd = "0.00005"
window = "24h"
scope = "each_member"
group = "ci"
"#;
    let (_m, g, _s, tokens) = setup(budgets, &["ci", "ci"]);
    let body = chat(16);
    let exhaust = |t: &str| {
        for _ in 0..50 {
            let r = post(g.addr, "/v1/chat/completions", &body, &auth(t));
            if r.status == 429 {
                assert!(
                    r.text().contains("per-agent[service-token:"),
                    "{}",
                    r.text()
                );
                return;
            }
            assert_eq!(r.status, 200);
        }
        panic!("never blocked");
    };
    exhaust(&tokens[0]);
    // The second agent's budget is untouched.
    let r = post(g.addr, "/v1/chat/completions", &body, &auth(&tokens[1]));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn downgrade_routes_to_the_cheaper_model_and_says_so() {
    let budgets = r#"
[[budgets]]
name = "premium"
amount_usd = "0.00001"
window = "month"
scope = "everyone"
models = ["gpt-4o"]
action = "downgrade"
downgrade_to = "gpt-4o-mini"
"#;
    let (m, g, _s, tokens) = setup(budgets, &["eng"]);
    // gpt-4o costs more than the whole premium budget for this request: downgraded at once.
    let body = r#"{"model":"gpt-4o","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(g.addr, "/v1/chat/completions", body, &auth(&tokens[0]));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-downgraded-from"), Some("gpt-4o"));
    let sent: serde_json::Value =
        serde_json::from_str(mock_requests(&m).last().unwrap()["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["model"], "gpt-4o-mini");
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ]);
    assert_eq!(line["downgraded_from"], "gpt-4o");
    assert_eq!(line["model"], "gpt-4o-mini");
}

#[test]
fn lower_max_tokens_fits_the_request_into_what_is_left() {
    let budgets = r#"
[[budgets]]
name = "tight"
amount_usd = "0.00004"
window = "day"
scope = "each_identity"
on_insufficient = "lower_max_tokens"
"#;
    let (m, g, _s, tokens) = setup(budgets, &["eng"]);
    // 40,000,000 pico: the input bound (~90 bytes x 150,000 = 13.5M) leaves room for ~44 output tokens.
    let body = chat(1000);
    let r = post(g.addr, "/v1/chat/completions", &body, &auth(&tokens[0]));
    assert_eq!(r.status, 200, "{}", r.text());
    let lowered: u64 = r
        .header("x-tollgate-max-tokens-lowered")
        .and_then(|h| h.split_once("->"))
        .unwrap()
        .1
        .parse()
        .unwrap();
    let expect = ((40_000_000 - body.len() as i128 * IN) / OUT) as u64;
    assert_eq!(lowered, expect);
    let sent: serde_json::Value =
        serde_json::from_str(mock_requests(&m).last().unwrap()["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["max_tokens"], lowered);
}

#[test]
fn attributes_select_budgets_and_undeclared_ones_are_refused() {
    let budgets = r#"
[attributes]
project = "x-tollgate-attr-project"

[[budgets]]
name = "apollo"
amount_usd = "0.000001"
window = "week"
scope = "everyone"
attributes = { project = "apollo" }
"#;
    let (_m, g, _s, tokens) = setup(budgets, &["eng"]);
    let body = chat(16);
    let with = |h: &str| {
        post(
            g.addr,
            "/v1/chat/completions",
            &body,
            &format!("{}{h}", auth(&tokens[0])),
        )
    };
    // Apollo's budget is far too small for any request; other projects are not under it.
    assert_eq!(with("x-tollgate-attr-project: apollo\r\n").status, 429);
    assert_eq!(with("x-tollgate-attr-project: zeus\r\n").status, 200);
    assert_eq!(with("").status, 200);
    let r = with("x-tollgate-attr-team: a\r\n");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("x-tollgate-attr-team"), "{}", r.text());
}

/// Everything the gateway has logged as spent so far.
fn all_logged_costs(g: &Gateway) -> i128 {
    g.output()
        .lines()
        .filter(|l| l.contains("\"event\":\"request\""))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["cost_pusd"].as_i64().map(i128::from).unwrap_or(0))
        .sum()
}

/// With no leaked reservation, a probe's remaining amount is exactly limit - everything spent - the probe's
/// own reservation. Settlements cross cores as messages: retry briefly until the last ones have landed.
fn assert_no_leak(g: &Gateway, token: &str, limit: i128) {
    let body = chat(16);
    let reserve = body.len() as i128 * IN + 16 * OUT;
    let mut seen = Vec::new();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        let spent = all_logged_costs(g);
        let r = post(g.addr, "/v1/chat/completions", &body, &auth(token));
        assert_eq!(r.status, 200, "{}", r.text());
        let remaining = usd_to_pico(r.header("x-tollgate-budget-remaining").unwrap());
        if remaining == limit - spent - reserve {
            return;
        }
        seen.push((remaining, limit - spent - reserve));
    }
    panic!("reservations leaked (remaining, expected): {seen:?}");
}

#[test]
fn reservations_return_to_zero_however_requests_end() {
    let budgets = r#"
[[budgets]]
name = "leakcheck"
amount_usd = "10"
window = "month"
scope = "everyone"
"#;
    let (_m, g, _s, tokens) = setup(budgets, &["eng"]);
    let t = &tokens[0];
    let limit = 10 * 1_000_000_000_000i128;
    let stream = r#"{"model":"gpt-4o-mini","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    // 1. Completed, streamed and not.
    for b in [chat(16), stream.to_owned()] {
        let r = post(g.addr, "/v1/chat/completions", &b, &auth(t));
        assert_eq!(r.status, 200);
    }
    // 2. Upstream error before any token: not billed, released.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        &chat(16),
        &format!("{}x-mock-status: 500\r\n", auth(t)),
    );
    assert_eq!(r.status, 500);
    // 3. Upstream dies mid-stream: billed an estimate, the rest released.
    let _ = post(
        g.addr,
        "/v1/chat/completions",
        stream,
        &format!("{}x-mock-disconnect-after: 3\r\n", auth(t)),
    );
    // 4. Client disconnects while the upstream is still thinking, and mid-stream.
    for (hdr, after) in [
        ("x-mock-first-byte-delay-ms: 300\r\n", 0usize),
        ("x-mock-token-delay-ms: 30\r\n", 200usize),
    ] {
        let mut c = Conn::open(g.addr);
        c.send(post_bytes("/v1/chat/completions", stream, &format!("{}{hdr}", auth(t))).as_bytes());
        if after > 0 {
            let mut buf = vec![0u8; after];
            let _ = c.stream.read_exact(&mut buf);
        }
        drop(c);
    }
    // 5. Refused after admission would have started: malformed, policy-free but unpriced model.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-unpriced-x","max_tokens":16,"messages":[]}"#,
        &auth(t),
    );
    assert_eq!(r.status, 403);
    // Both aborted requests were logged (and charged their estimates).
    g.wait_line(
        |l| l.matches("client_gone").count() >= 1 && l.contains("\"outcome\":\"client_gone\""),
        Duration::from_secs(5),
    );
    assert_no_leak(&g, t, limit);
}

#[test]
fn hundreds_of_concurrent_streams_never_overspend_a_small_budget() {
    // Every request carries max_tokens, so the stated overshoot bound is zero.
    let budgets = r#"
[[budgets]]
name = "small"
amount_usd = "0.001"
window = "day"
scope = "everyone"
"#;
    let (_m, g, _s, tokens) = setup(budgets, &["eng"]);
    let body = r#"{"model":"gpt-4o-mini","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let addr = g.addr;
    let threads: Vec<_> = (0..300)
        .map(|_| {
            let t = tokens[0].clone();
            std::thread::spawn(move || {
                let r = post(
                    addr,
                    "/v1/chat/completions",
                    body,
                    &format!("{}x-mock-token-delay-ms: 5\r\n", auth(&t)),
                );
                (r.status, r.header("x-request-id").map(str::to_owned))
            })
        })
        .collect();
    let results: Vec<(u16, Option<String>)> =
        threads.into_iter().map(|h| h.join().unwrap()).collect();
    let ok: Vec<&String> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .filter_map(|(_, id)| id.as_ref())
        .collect();
    let refused = results.iter().filter(|(s, _)| *s == 429).count();
    assert_eq!(ok.len() + refused, 300, "only 200s and 429s");
    assert!(refused > 0 && !ok.is_empty());
    let total: i128 = ok
        .iter()
        .map(|id| {
            g.wait_json(&[("event", json!("request")), ("request_id", json!(id))])["cost_pusd"]
                .as_i64()
                .unwrap() as i128
        })
        .sum();
    let limit = 1_000_000_000i128;
    println!(
        "served {} refused {refused} spent {total} of {limit} pico-USD",
        ok.len()
    );
    assert!(total <= limit, "overspent: {total} > {limit}");
}

#[test]
fn alert_thresholds_fire_once_each_and_call_the_webhook() {
    let hook = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook_addr = hook.local_addr().unwrap();
    let received = std::thread::spawn(move || {
        let mut bodies = Vec::new();
        hook.set_nonblocking(false).unwrap();
        for _ in 0..2 {
            let (mut s, _) = hook.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = vec![0u8; 65536];
            let mut n = 0;
            loop {
                let k = s.read(&mut buf[n..]).unwrap();
                n += k;
                let text = String::from_utf8_lossy(&buf[..n]).to_string();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap())
                        })
                        .unwrap_or(0);
                    if body.len() >= len {
                        bodies.push(body.to_owned());
                        break;
                    }
                }
                if k == 0 {
                    break;
                }
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                .unwrap();
        }
        bodies
    });
    let budgets = format!(
        r#"
[[budgets]]
name = "watched"
amount_usd = "0.0001"
window = "month"
scope = "everyone"
action = "alert"
alert_at = [20, 40]
webhook = "http://{hook_addr}/hook"
"#
    );
    let (_m, g, _s, tokens) = setup(&budgets, &["eng"]);
    // Alert-only: never refuses. Spend past 40% of $0.0001 (~3 requests of ~13.35M pico).
    for _ in 0..5 {
        let r = post(g.addr, "/v1/chat/completions", &chat(16), &auth(&tokens[0]));
        assert_eq!(r.status, 200);
    }
    g.wait_json(&[
        ("event", json!("budget_alert")),
        ("threshold_percent", json!(20)),
    ]);
    g.wait_json(&[
        ("event", json!("budget_alert")),
        ("threshold_percent", json!(40)),
    ]);
    let alerts = g
        .output()
        .lines()
        .filter(|l| l.contains("\"budget_alert\""))
        .count();
    assert_eq!(alerts, 2, "one event per threshold per window");
    let bodies = received.join().unwrap();
    assert_eq!(bodies.len(), 2);
    assert!(
        bodies
            .iter()
            .any(|b| b.contains("\"threshold_percent\":20")),
        "{bodies:?}"
    );
}

#[test]
fn a_stream_without_a_cap_is_cut_off_at_its_reservation() {
    // No max_tokens and no route default: 4,096 output tokens are reserved. The provider streams 6,000.
    let budgets = |cutoff: bool| {
        format!(
            r#"
[[budgets]]
name = "capped"
amount_usd = "10"
window = "day"
scope = "everyone"
stream_cutoff = {cutoff}
"#
        )
    };
    let body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let hdr = |t: &str| {
        format!(
            "{}x-mock-output-tokens: 6000\r\nx-mock-token-delay-ms: 0\r\n",
            auth(t)
        )
    };

    let (_m, g, _s, tokens) = setup(&budgets(true), &["eng"]);
    let r = post(g.addr, "/v1/chat/completions", body, &hdr(&tokens[0]));
    assert_eq!(r.status, 200);
    let text = r.text();
    // A well-formed end: the last chunk says "length", then [DONE]; nothing after.
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| e.starts_with("data: "))
        .collect();
    assert_eq!(
        *events.last().unwrap(),
        "data: [DONE]",
        "{}",
        &text[text.len() - 300..]
    );
    let last: serde_json::Value =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(last["object"], "chat.completion.chunk");
    assert!(
        last["id"].as_str().unwrap().starts_with("chatcmpl"),
        "{last}"
    );
    let content_events = events.len() - 2;
    assert!(content_events < 6000, "{content_events} events relayed");
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ]);
    assert_eq!(line["outcome"], "cut_off", "{line}");
    assert_eq!(line["usage"], "estimated", "{line}");
    let out = line["output_tokens"].as_u64().unwrap();
    eprintln!("cut off after {content_events} events, {out} output tokens: {line}");
    assert!((1..=4096).contains(&out), "{line}");
    let cost = line["cost_pusd"].as_i64().unwrap();
    assert!(
        cost > 0 && cost <= line["reserved_pusd"].as_i64().unwrap(),
        "{line}"
    );
    // The connection stays usable: the response ended with its last chunk.
    drop(g);

    // Without the cut-off the same stream runs to the end and costs more than was reserved.
    let (_m, g, _s, tokens) = setup(&budgets(false), &["eng"]);
    let r = post(g.addr, "/v1/chat/completions", body, &hdr(&tokens[0]));
    assert_eq!(r.status, 200);
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ]);
    assert_eq!(line["outcome"], "complete", "{line}");
    assert_eq!(line["output_tokens"], 6000, "{line}");
    assert!(
        line["cost_pusd"].as_i64().unwrap() > line["reserved_pusd"].as_i64().unwrap(),
        "{line}"
    );
}

fn chat_model(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":16,"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

#[test]
fn a_model_filter_covers_the_models_dated_snapshots() {
    let budgets = r#"
[[budgets]]
name = "gpt4o"
amount_usd = "0.000001"
window = "week"
scope = "everyone"
models = ["gpt-4o"]
"#;
    let (_m, g, _s, tokens) = setup(budgets, &["eng"]);
    let send = |model: &str| {
        post(
            g.addr,
            "/v1/chat/completions",
            &chat_model(model),
            &auth(&tokens[0]),
        )
    };
    // gpt-4o-2024-08-06 is gpt-4o on the price sheet: the budget applies (and is far too small).
    for model in ["gpt-4o", "gpt-4o-2024-08-06"] {
        let r = send(model);
        assert_eq!(r.status, 429, "{model}: {}", r.text());
        assert_eq!(r.header("x-tollgate-budget"), Some("gpt4o"));
    }
    assert_eq!(send("gpt-4o-mini").status, 200);
}

#[test]
fn required_attributes_and_allowed_values_are_enforced() {
    let budgets = r#"
[attributes]
project = { header = "x-tollgate-attr-project", required = true, values = ["apollo", "zeus"] }

[[budgets]]
name = "apollo"
amount_usd = "0.000001"
window = "week"
scope = "everyone"
attributes = { project = "apollo" }
"#;
    let (_m, g, _s, tokens) = setup(budgets, &["eng"]);
    let body = chat(16);
    let with = |h: &str| {
        post(
            g.addr,
            "/v1/chat/completions",
            &body,
            &format!("{}{h}", auth(&tokens[0])),
        )
    };
    // Omitting the header no longer escapes the budget: 400 naming the attribute and the header.
    let r = with("");
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("\"project\"") && msg.contains("x-tollgate-attr-project"),
        "{msg}"
    );
    // Nor does another value: 400 naming the allowed ones.
    let r = with("x-tollgate-attr-project: mars\r\n");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("apollo, zeus"), "{}", r.text());
    assert_eq!(with("x-tollgate-attr-project: apollo\r\n").status, 429);
    assert_eq!(with("x-tollgate-attr-project: zeus\r\n").status, 200);
}

#[test]
fn an_attribute_from_a_service_token_cannot_be_overridden_by_a_header() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let store = TempDir::new("token-attr-store");
    let create = |name: &str, attrs: &[&str]| {
        let mut cmd = std::process::Command::new(bin("tollgate"));
        cmd.args(["service-token", "create", "--store"])
            .arg(&store.0)
            .args(["--name", name, "--team", "eng"]);
        for a in attrs {
            cmd.args(["--attribute", a]);
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let cc7 = create("billing-bot", &["cost_center=cc-7"]);
    let other = create("plain-bot", &[]);
    let extra = format!(
        r#"[store]
dir = "{}"
[auth]

[attributes]
cost_center = {{ from = "token:cost_center" }}

[[budgets]]
name = "cc7"
amount_usd = "0.000001"
window = "week"
scope = "everyone"
attributes = {{ cost_center = "cc-7" }}
"#,
        store.0.display()
    );
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", &extra));
    let send = |token: &str, h: &str| {
        post(
            g.addr,
            "/v1/chat/completions",
            &chat(16),
            &format!("{}{h}", auth(token)),
        )
    };
    let r = send(&cc7, "x-tollgate-attr-cost_center: cc-1\r\n");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-tollgate-budget"), Some("cc7"));
    // A token without the attribute is not under the budget, whatever header it sends.
    assert_eq!(
        send(&other, "x-tollgate-attr-cost_center: cc-7\r\n").status,
        200
    );
    // The listing shows the token's attributes.
    let out = std::process::Command::new(bin("tollgate"))
        .args(["service-token", "list", "--json", "--store"])
        .arg(&store.0)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(r#""cost_center":"cc-7""#), "{text}");
}
