//! `GET /metrics` on the admin listener: requests sent through a gateway (two cores) are counted exactly
//! once each, the cost counter equals the sum of the access log's `cost_pusd` to the pico-USD, OpenMetrics
//! is served when asked for, the data-plane port does not serve it, and `[admin] metrics_token` guards it.
//! The official Python parser reads the page in `python_parser_reads_the_page` (ignored: it needs the
//! venv from `tests/clients/setup.sh`, as `sdk_clients.rs`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use serde_json::json;
use tollgate_tests::*;

fn admin_addr(g: &Proc) -> SocketAddr {
    g.wait_json(&[("event", json!("admin_listening"))])["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn scrape(addr: SocketAddr, extra: &str) -> Response {
    request(
        addr,
        format!("GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n").as_bytes(),
    )
}

/// `(name, labels, value)` of every sample line (a test's reading, not a parser: values here never hold
/// spaces and label values never hold `}`).
fn samples(page: &str) -> Vec<(String, String, f64)> {
    page.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (name.to_owned(), labels.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn sum(page: &str, name: &str, label: &str) -> f64 {
    samples(page)
        .iter()
        .filter(|(n, l, _)| n == name && l.contains(label))
        .map(|(_, _, v)| v)
        .sum()
}

/// Sends a mix of requests: chat (streamed and not), messages, an unknown model, bad JSON and an
/// unparseable head. Returns how many were sent.
fn send_mix(addr: SocketAddr) -> usize {
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let stream = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let messages = r#"{"model":"claude-haiku-4-5","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}"#;
    let mut sent = 0;
    for i in 0..4 {
        let headers = format!("x-mock-input-tokens: {}\r\n", 100 + i * 37);
        assert_eq!(
            post(addr, "/v1/chat/completions", chat, &headers).status,
            200
        );
        assert!(post(addr, "/v1/chat/completions", stream, &headers).complete);
        assert_eq!(post(addr, "/v1/messages", messages, "").status, 200);
        sent += 3;
    }
    let unknown = r#"{"model":"nope-1","messages":[]}"#;
    assert_eq!(post(addr, "/v1/chat/completions", unknown, "").status, 404);
    assert_eq!(post(addr, "/v1/chat/completions", "{", "").status, 400);
    let bad = request(
        addr,
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\nHost: t\r\n\r\n",
    );
    assert_eq!(bad.status, 400);
    sent + 3
}

/// Polls the page until `tollgate_requests_total` adds up to `n` (cores publish every 50 ms).
fn page_with(addr: SocketAddr, n: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = scrape(addr, "");
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.text();
        if sum(&page, "tollgate_requests_total", "") as usize >= n || Instant::now() > deadline {
            return page;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn requests_and_cost_match_the_access_log_exactly() {
    let (_m, g) = mock_and_gateway("");
    let admin = admin_addr(&g);
    let sent = send_mix(g.addr);
    let page = page_with(admin, sent);

    // Every request counted once, across both cores.
    assert_eq!(
        sum(&page, "tollgate_requests_total", "") as usize,
        sent,
        "{page}"
    );
    assert_eq!(
        sum(&page, "tollgate_requests_total", "outcome=\"complete\"") as usize,
        12,
        "{page}"
    );
    assert_eq!(
        sum(&page, "tollgate_requests_total", "status_class=\"4xx\"") as usize,
        3,
        "{page}"
    );
    assert_eq!(sum(&page, "tollgate_workers", ""), 2.0);

    // The cost counters equal the access log's sums, to the pico-USD.
    let lines: Vec<serde_json::Value> = g
        .output()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "request")
        .collect();
    assert_eq!(lines.len(), sent - 1, "one request was unparseable");
    let log_sum = |field: &str| -> u64 { lines.iter().filter_map(|l| l[field].as_u64()).sum() };
    let (effective, list) = (log_sum("cost_pusd"), log_sum("list_cost_pusd"));
    assert!(effective > 0);
    let pusd = |price: &str| -> u64 {
        samples(&page)
            .iter()
            .filter(|(n, l, _)| {
                n == "tollgate_cost_pusd_total" && l.contains(&format!("price=\"{price}\""))
            })
            .map(|(_, _, v)| *v as u64)
            .sum()
    };
    assert_eq!(pusd("effective"), effective, "{page}");
    assert_eq!(pusd("list"), list, "{page}");
    let usd = sum(&page, "tollgate_cost_usd_total", "price=\"effective\"");
    assert!((usd - effective as f64 / 1e12).abs() < 1e-9, "{usd}");

    // Tokens by type, the latency histograms and the rest of the families are there.
    let input: u64 = lines
        .iter()
        .filter_map(|l| l["input_tokens"].as_u64())
        .sum();
    assert_eq!(
        sum(
            &page,
            "gen_ai_client_token_usage_total",
            "gen_ai_token_type=\"input\""
        ) as u64,
        input
    );
    assert_eq!(
        sum(&page, "gen_ai_server_request_duration_seconds_count", "") as usize,
        12
    );
    assert_eq!(
        sum(&page, "gen_ai_server_time_to_first_token_seconds_count", "") as usize,
        4
    );
    for family in [
        "tollgate_build_info",
        "tollgate_gateway_added_seconds_bucket",
        "tollgate_upstream_ttfb_seconds_count",
        "tollgate_ledger_store_failing",
        "tollgate_ledger_commits_total",
        "tollgate_access_log_dropped_batches_total",
        "tollgate_webhooks_dropped_total",
        "tollgate_connection_handoffs_total",
        "tollgate_budget_state_up",
    ] {
        assert!(
            samples(&page).iter().any(|(n, _, _)| n == family),
            "{family} missing:\n{page}"
        );
    }
    // No per-user label anywhere.
    assert!(
        !page.contains("subject=") && !page.contains("anonymous"),
        "{page}"
    );

    // OpenMetrics when asked for.
    let om = scrape(
        admin,
        "Accept: application/openmetrics-text; version=1.0.0\r\n",
    );
    assert_eq!(om.status, 200);
    assert!(om
        .header("content-type")
        .unwrap()
        .starts_with("application/openmetrics-text"));
    assert!(om.text().ends_with("# EOF\n"));
    let plain = scrape(admin, "");
    assert!(plain
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));

    // The data plane's port does not serve it.
    assert_eq!(scrape(g.addr, "").status, 404);
}

#[test]
fn budgets_are_gauges_and_the_metrics_token_guards_the_page() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let token = "scrape-secret-0123456789";
    let g = gateway(&config_for(
        &format!("http://{}", m.addr),
        "",
        &format!(
            "[[budgets]]\nname = \"org\"\namount_usd = \"25\"\nwindow = \"day\"\nscope = \"everyone\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\nmetrics_token = \"{token}\"\n"
        ),
    ));
    let admin = admin_addr(&g);
    assert_eq!(scrape(admin, "").status, 401);
    assert_eq!(
        scrape(admin, "Authorization: Bearer wrong-token-0123456789\r\n").status,
        401
    );
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(post(g.addr, "/v1/chat/completions", chat, "").status, 200);
    let auth = format!("Authorization: Bearer {token}\r\n");
    let r = scrape(admin, &auth);
    assert_eq!(r.status, 200, "{}", r.text());
    let page = r.text();
    assert_eq!(sum(&page, "tollgate_budget_state_up", ""), 1.0, "{page}");
    assert_eq!(
        sum(&page, "tollgate_budget_limit_usd", "budget=\"org\""),
        25.0,
        "{page}"
    );
    let reset = sum(&page, "tollgate_budget_reset_seconds", "budget=\"org\"");
    assert!(reset > 0.0 && reset <= 86_400.0, "{page}");
    // Spent plus remaining is the limit, whatever has been committed yet.
    let spent = sum(&page, "tollgate_budget_spent_usd", "budget=\"org\"");
    let remaining = sum(&page, "tollgate_budget_remaining_usd", "budget=\"org\"");
    assert!((spent + remaining - 25.0).abs() < 1e-9, "{page}");
}

#[test]
#[ignore = "needs the prometheus_client Python package: run tests/clients/setup.sh and set TOLLGATE_SDK_PYTHON"]
fn python_parser_reads_the_page() {
    let python = std::env::var_os("TOLLGATE_SDK_PYTHON").unwrap_or_else(|| {
        panic!(
            "TOLLGATE_SDK_PYTHON is not set: run tests/clients/setup.sh and set it to the python it prints"
        )
    });
    let (_m, g) = mock_and_gateway("");
    let admin = admin_addr(&g);
    let sent = send_mix(g.addr);
    let page = page_with(admin, sent);
    let dir = TempDir::new("metrics-page");
    let file = dir.file("metrics.txt", &page);
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("tests/clients/parse_metrics.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&file)
        .arg(sent.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "parse_metrics.py failed:\n{stdout}\n{stderr}\n--- page\n{page}"
    );
}
