//! SIGHUP: the running gateway re-reads its configuration file and applies it without dropping requests;
//! a file with errors is refused with every issue named, and the old configuration keeps serving.
//!
//! Prices (the shipped sheet): gpt-4o-mini 150,000 pico-USD per input token, 600,000 per output token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::io::Read;

use serde_json::json;
use tollgate_tests::*;

fn chat(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","max_tokens":16,"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

/// Sends SIGHUP and waits for the `n`-th `reloaded` line (and, with `cores`, for every core's rekey).
fn reload(g: &Gateway, n: usize, cores: usize) -> serde_json::Value {
    g.sighup();
    let line = g.wait_json_nth(&[("event", json!("reloaded"))], n);
    for c in 0..cores {
        g.wait_json_nth(
            &[
                ("event", json!("budgets_rekeyed")),
                ("core", json!(c.to_string())),
            ],
            n,
        );
    }
    line
}

fn usd_to_pico(s: &str) -> i128 {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac = format!("{frac:0<12}");
    whole.parse::<i128>().unwrap() * 1_000_000_000_000 + frac[..12].parse::<i128>().unwrap()
}

const ADDED: &str = r#"
[[routes]]
model = "reloaded-model"
provider = "openai"
upstream_model = "gpt-4o-mini"

[[policies]]
name = "no-4o"
default = true
deny_models = ["gpt-4o"]

[[budgets]]
name = "everyone-daily"
amount_usd = "10"
window = "day"
scope = "everyone"
"#;

#[test]
fn sighup_adds_a_route_a_policy_and_a_budget() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let base = format!("http://{}", m.addr);
    let g = gateway(&config_for(&base, "", ""));

    // Before: no such route, gpt-4o is allowed, no budget headers.
    let r = post(g.addr, "/v1/chat/completions", &chat("reloaded-model"), "");
    assert_eq!(r.status, 404, "{}", r.text());
    let r = post(g.addr, "/v1/chat/completions", &chat("gpt-4o"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-budget"), None);

    g.rewrite_config(&config_for(&base, "", ADDED));
    let line = reload(&g, 1, 2);
    assert_eq!(line["routes"], 4, "{line}");
    assert_eq!(line["policies"], 1, "{line}");
    assert_eq!(line["budgets"], 1, "{line}");
    assert_eq!(line["providers"], 2, "{line}");
    assert_eq!(line["issuers"], 0, "{line}");
    assert_eq!(
        g.count_json(&[("event", json!("reload_restart_required"))]),
        0,
        "{}",
        g.output()
    );

    // The new route serves, with the new budget's headers.
    let r = post(g.addr, "/v1/chat/completions", &chat("reloaded-model"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-budget"), Some("everyone-daily"));
    assert!(r.header("x-tollgate-budget-remaining").is_some());
    // The new policy denies gpt-4o.
    let r = post(g.addr, "/v1/chat/completions", &chat("gpt-4o"), "");
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("gpt-4o"), "{}", r.text());
    // The upstream saw the new route's upstream model.
    let seen = mock_requests(&m);
    assert!(
        seen.iter().any(|v| v.to_string().contains("gpt-4o-mini")),
        "{seen:?}"
    );
}

#[test]
fn a_stream_in_flight_across_sighup_completes() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let base = format!("http://{}", m.addr);
    let g = gateway(&config_for(&base, "", ""));
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let mut c = Conn::open(g.addr);
    c.send(
        post_bytes(
            "/v1/chat/completions",
            body,
            "connection: close\r\nx-mock-output-tokens: 40\r\nx-mock-token-delay-ms: 50\r\n",
        )
        .as_bytes(),
    );
    // Wait until the stream has started, so it is in flight when the signal comes.
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("data:") {
        let n = c.stream.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the first event");
        got.extend_from_slice(&buf[..n]);
    }
    // The new file drops every gpt-* route: new requests for gpt-4o are no longer routed.
    let without_gpt = config_for(&base, "", "")
        .replace("[[routes]]\nmodel = \"gpt-*\"\nprovider = \"openai\"\n", "");
    assert_ne!(without_gpt, config_for(&base, "", ""));
    g.rewrite_config(&without_gpt);
    let line = reload(&g, 1, 2);
    assert_eq!(line["routes"], 2, "{line}");
    assert_eq!(
        post(g.addr, "/v1/chat/completions", &chat("gpt-4o"), "").status,
        404
    );
    // The stream that started before goes on to its end, on the snapshot it loaded.
    c.stream.read_to_end(&mut got).unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("data: [DONE]"), "stream cut off: {text}");
    assert!(
        text.ends_with("0\r\n\r\n"),
        "unterminated chunked body: {text}"
    );
}

#[test]
fn a_config_with_errors_is_refused_and_the_old_one_keeps_serving() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let base = format!("http://{}", m.addr);
    let g = gateway(&config_for(&base, "", ""));
    let broken = config_for(
        &base,
        "",
        r#"
[[routes]]
model = "nowhere"
provider = "no-such-provider"

[[budgets]]
name = "bad-window"
amount_usd = "10"
window = "fortnight"
scope = "everyone"
"#,
    );
    g.rewrite_config(&broken);
    g.sighup();
    let line = g.wait_json(&[("event", json!("reload_failed"))]);
    let issues = line["issues"].as_array().unwrap();
    assert!(issues.len() >= 2, "{line}");
    let fields: Vec<&str> = issues
        .iter()
        .map(|i| i["field"].as_str().unwrap())
        .collect();
    assert!(
        fields.iter().any(|f| f.contains("routes")),
        "no routes issue: {line}"
    );
    assert!(
        fields.iter().any(|f| f.contains("window")),
        "no window issue: {line}"
    );
    for i in issues {
        assert!(
            i["file"].as_str().unwrap().ends_with("tollgate.toml"),
            "{line}"
        );
        assert!(!i["reason"].as_str().unwrap().is_empty(), "{line}");
    }
    assert_eq!(g.count_json(&[("event", json!("reloaded"))]), 0);
    // The old configuration serves.
    let r = post(g.addr, "/v1/chat/completions", &chat("gpt-4o"), "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-budget"), None);

    // A start-only setting that changed is kept and named; the rest applies.
    let moved = config_for(&base, "max_body_bytes = 4096", ADDED);
    g.rewrite_config(&moved);
    reload(&g, 1, 2);
    let line = g.wait_json(&[("event", json!("reload_restart_required"))]);
    assert_eq!(line["fields"], json!(["server.max_body_bytes"]), "{line}");
    let r = post(g.addr, "/v1/chat/completions", &chat("reloaded-model"), "");
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_budget_window_changed_from_day_to_week_keeps_the_spend() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let base = format!("http://{}", m.addr);
    let budget = |window: &str| {
        format!(
            r#"
[[budgets]]
name = "shared"
amount_usd = "1"
window = "{window}"
scope = "everyone"
"#
        )
    };
    let g = gateway(&config_for(&base, "", &budget("day")));
    let limit = usd_to_pico("1");
    let body = chat("gpt-4o-mini");
    let mut spent = 0i128;
    let mut before = limit;
    for _ in 0..4 {
        let r = post(g.addr, "/v1/chat/completions", &body, "");
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-tollgate-budget"), Some("shared"));
        before = usd_to_pico(r.header("x-tollgate-budget-remaining").unwrap());
        let line = g.wait_json(&[
            ("event", json!("request")),
            ("request_id", json!(r.header("x-request-id").unwrap())),
        ]);
        spent += i128::from(line["cost_pusd"].as_i64().unwrap());
    }
    assert!(spent > 0);

    g.rewrite_config(&config_for(&base, "", &budget("week")));
    reload(&g, 1, 2);
    let r = post(g.addr, "/v1/chat/completions", &body, "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-budget"), Some("shared"));
    let remaining = usd_to_pico(r.header("x-tollgate-budget-remaining").unwrap());
    // The week's window starts from the spend made under the day's: a fresh window would show more.
    assert!(
        remaining <= limit - spent,
        "remaining {remaining} forgets the {spent} already spent"
    );
    // And less than before the reload: the last request's spend was added, nothing was forgotten.
    assert!(remaining < before, "{remaining} >= {before}");
    assert!(remaining > 0, "{remaining}");
}

#[test]
fn reloaded_issuers_keep_unchanged_keys_fetch_new_ones_and_drop_removed_ones() {
    use tollgate_tests::idp::TestIdp;
    let m = mock(&["--expect-key", MOCK_KEY]);
    let base = format!("http://{}", m.addr);
    let (a, b) = (TestIdp::start(), TestIdp::start());
    let issuer = |name: &str, idp: &TestIdp| {
        format!(
            "\n[[auth.issuers]]\nname = \"{name}\"\nissuer = \"{}\"\naudiences = [\"tollgate\"]\n",
            idp.issuer()
        )
    };
    let config = |issuers: &str| config_for(&base, "", &format!("[auth]\n{issuers}"));
    let g = gateway(&config(&issuer("idp-a", &a)));
    let token = |idp: &TestIdp| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let claims = json!({
            "iss": idp.issuer(), "aud": "tollgate", "sub": "u-alice", "iat": now, "exp": now + 600
        });
        format!("Authorization: Bearer {}\r\n", idp.sign(&claims, "rsa-a"))
    };
    let send = |idp: &TestIdp| post(g.addr, "/v1/chat/completions", &chat("gpt-4o"), &token(idp));
    assert_eq!(send(&a).status, 200);
    assert_eq!(send(&b).status, 401);
    let a_fetches = a.jwks_fetches();

    // Add issuer B, A unchanged: B's keys are fetched, A's kept.
    g.rewrite_config(&config(&format!(
        "{}{}",
        issuer("idp-a", &a),
        issuer("idp-b", &b)
    )));
    let line = reload(&g, 1, 2);
    assert_eq!(line["issuers"], 2, "{line}");
    g.wait_json(&[("event", json!("keys_loaded")), ("issuer", json!("idp-b"))]);
    let r = send(&b);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(send(&a).status, 200);
    assert_eq!(a.jwks_fetches(), a_fetches, "A's keys were fetched again");

    // Remove A: its tokens stop working at once, cached verifications included.
    g.rewrite_config(&config(&issuer("idp-b", &b)));
    reload(&g, 2, 2);
    let r = send(&a);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(send(&b).status, 200);
}
