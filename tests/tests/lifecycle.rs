//! Process-level behaviour: graceful shutdown, TLS to upstreams, the quickstart with its bundled mock.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::time::Duration;

use serde_json::json;
use tollgate_tests::*;

#[test]
fn sigterm_finishes_in_flight_streams_then_exits_zero() {
    let (_m, mut g) = mock_and_gateway("shutdown_grace_ms = 10000");
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let mut c = Conn::open(g.addr);
    // 20 tokens at 50 ms: about a second of streaming.
    c.send(
        post_bytes(
            "/v1/chat/completions",
            body,
            "x-mock-output-tokens: 20\r\nx-mock-token-delay-ms: 50\r\n",
        )
        .as_bytes(),
    );
    std::thread::sleep(Duration::from_millis(200));
    g.sigterm();
    let r = c.read_response();
    assert_eq!(r.status, 200);
    assert!(r.complete, "in-flight stream cut off by shutdown");
    assert_eq!(sse_events(&r.body).last().unwrap().1, "[DONE]");
    assert!(c.closed(), "connection kept open after shutdown began");
    assert_eq!(
        g.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        g.output()
    );
    g.wait_json(&[("event", json!("stopped"))]);
    // (No connect-after-exit check: with SO_REUSEPORT, a gateway another test starts on port 0 may be
    // given the same port, so a successful connect would not mean this one still listens. The exit
    // status above already proves the listeners are gone.)
}

#[test]
fn https_upstream_with_an_extra_ca() {
    let dir = TempDir::new("tls");
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = dir.file("cert.pem", &ck.cert.pem());
    let key = dir.file("key.pem", &ck.key_pair.serialize_pem());
    let m = mock(&[
        "--expect-key",
        MOCK_KEY,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let base = format!("https://localhost:{}", m.addr.port());
    let with_ca = config_for(&base, "", "").replace(
        "api_key_env = \"TG_TEST_OPENAI_KEY\"",
        &format!(
            "api_key_env = \"TG_TEST_OPENAI_KEY\"\nca_file = \"{}\"",
            cert.display()
        ),
    );
    let g = gateway(&with_ca);
    let body = r#"{"model":"gpt-4o","stream":true,"messages":[]}"#;
    let r = post(g.addr, "/v1/chat/completions", body, "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(sse_events(&r.body).last().unwrap().1, "[DONE]");
    // Several requests reuse the pooled TLS connection.
    for _ in 0..3 {
        assert_eq!(post(g.addr, "/v1/chat/completions", body, "").status, 200);
    }
    // Without the extra CA the certificate is refused: 502, with the reason.
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-haiku-4-5","max_tokens":1,"messages":[]}"#,
        "",
    );
    assert_eq!(r.status, 502);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("TLS"),
        "{}",
        r.text()
    );
}

#[test]
fn quickstart_runs_offline_on_the_bundled_mock() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let cfg = root.join("examples/quickstart.toml");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8081", "127.0.0.1:0");
    let dir = TempDir::new("qs");
    let path = dir.file("quickstart.toml", &text);
    let g = Proc::start(
        &bin("tollgate"),
        &["serve", "--config", path.to_str().unwrap()],
        &[],
    );
    g.wait_json(&[
        ("event", json!("provider_mocked")),
        ("provider", json!("openai")),
    ]);
    // Identity is on: the first start created a demo token, printed it once, saved it next to the config.
    g.wait_json(&[("event", json!("demo_token_created"))]);
    let token = std::fs::read_to_string(dir.0.join(".tollgate/demo-token")).unwrap();
    let token = token.trim();
    assert!(token.starts_with("tg_"));
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(post(g.addr, "/v1/chat/completions", chat, "").status, 401);
    let r = post(
        g.addr,
        "/v1/chat/completions",
        chat,
        &format!("Authorization: Bearer {token}\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["role"], "assistant");
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-sonnet-4-5","max_tokens":8,"messages":[]}"#,
        &format!("x-api-key: {token}\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The demo team's policy: a model outside its list is refused by name.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"o3","messages":[]}"#,
        &format!("Authorization: Bearer {token}\r\n"),
    );
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.text().contains("`demo`"), "{}", r.text());
    // The model list tells the truth: the exact routes and the priced models the glob routes serve, that
    // the demo policy allows (gpt-4o-mini, fast, claude-*), in both APIs' shapes; nothing it denies.
    let book = tollgate_core::pricing::PriceBook::builtin().unwrap();
    let mut want: Vec<String> = ["fast", "gpt-4o-mini"].map(String::from).to_vec();
    want.extend(
        book.models(tollgate_core::ProviderKind::Anthropic)
            .into_iter()
            .map(|m| m.to_string()),
    );
    want.sort();
    for (headers, shape) in [
        (format!("Authorization: Bearer {token}\r\n"), "openai"),
        (
            format!("x-api-key: {token}\r\nanthropic-version: 2023-06-01\r\n"),
            "anthropic",
        ),
    ] {
        let r = request(
            g.addr,
            format!("GET /v1/models HTTP/1.1\r\nHost: t\r\n{headers}\r\n").as_bytes(),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        let mut ids: Vec<String> = v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        ids.sort();
        assert_eq!(ids, want, "{shape}");
        assert_eq!(v["has_more"].is_boolean(), shape == "anthropic", "{v}");
        // Every model listed is one the caller can use.
        for id in ids.iter().filter(|m| m.starts_with("claude-")).take(3) {
            let body = format!(r#"{{"model":"{id}","max_tokens":4,"messages":[]}}"#);
            let r = post(g.addr, "/v1/messages", &body, &headers);
            assert_eq!(r.status, 200, "{id}: {}", r.text());
        }
    }
    // Claude Code asks for 32,000 output tokens (thinking within them); the demo policy caps at 4,096 and
    // lowers the request instead of refusing it, thinking budget included.
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-sonnet-4-5","max_tokens":32000,"thinking":{"type":"enabled","budget_tokens":31999},"messages":[{"role":"user","content":"hi"}]}"#,
        &format!("x-api-key: {token}\r\nanthropic-version: 2023-06-01\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.header("x-tollgate-max-tokens-lowered"),
        Some("32000->4096")
    );
    // The CLI finds the store through the same config; revoking the demo token applies within a second.
    let cli = |args: &[&str]| {
        std::process::Command::new(bin("tollgate"))
            .args(args)
            .args(["--config", path.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let list = cli(&["service-token", "list"]);
    assert!(
        list.status.success(),
        "{}",
        String::from_utf8_lossy(&list.stderr)
    );
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("demo") && listed.contains("active"),
        "{listed}"
    );
    assert!(!listed.contains(token));
    assert!(cli(&["service-token", "revoke", "demo"]).status.success());
    let t0 = std::time::Instant::now();
    while post(
        g.addr,
        "/v1/chat/completions",
        chat,
        &format!("Authorization: Bearer {token}\r\n"),
    )
    .status
        != 401
    {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(5),
            "revocation not applied"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The token itself went to the terminal (stderr) once, never into the JSON log on stdout.
    let out = g.output();
    assert!(
        out.contains(token),
        "the demo token is printed at first start"
    );
    assert!(!out
        .lines()
        .filter(|l| l.starts_with('{'))
        .any(|l| l.contains(token)));
}

#[test]
fn an_idle_keep_alive_connection_does_not_hold_up_shutdown() {
    let (_m, mut g) = mock_and_gateway("shutdown_grace_ms = 500");
    // One request, then the connection stays open and idle (keep-alive), as SDK pools leave them.
    let mut c = Conn::open(g.addr);
    c.send(
        post_bytes(
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#,
            "",
        )
        .as_bytes(),
    );
    assert_eq!(c.read_response().status, 200);
    g.sigterm();
    assert_eq!(
        g.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        g.output()
    );
    g.wait_json(&[("event", json!("stopped"))]);
    drop(c);
}
