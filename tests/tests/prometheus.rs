//! A real Prometheus (Debian's package) scrapes a gateway's `/metrics` on its admin listener while the
//! gateway serves a short load; then Prometheus's HTTP API is asked what it saw: the request count equals
//! the access log's, and the team's spend equals what `tollgate spend` reports, to the pico-dollar.
//!
//! Ignored by default, since it needs the `prometheus` binary:
//!
//! ```text
//! apt-get install --no-install-recommends prometheus
//! cargo build --bins && PROMETHEUS_BIN=/usr/bin/prometheus cargo test -p tollgate-tests --test prometheus -- --ignored
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_tests::*;

/// A port nobody listens on now (for Prometheus's own web listener).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One instant query against Prometheus's HTTP API: the single sample's value, if there is one.
fn query(prom: SocketAddr, q: &str) -> Option<f64> {
    let enc: String = form_urlencoded::byte_serialize(q.as_bytes()).collect();
    let r = request(
        prom,
        format!("GET /api/v1/query?query={enc} HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    if r.status != 200 {
        return None;
    }
    let v = r.json();
    let sample = v["data"]["result"].as_array()?.first()?.clone();
    sample["value"][1].as_str()?.parse().ok()
}

/// `"0.0001234"` (dollars, as `tollgate spend` prints them) in pico-dollars, exactly.
fn pico(usd: &str) -> i128 {
    let usd = usd.trim_start_matches('$');
    let (whole, frac) = usd.split_once('.').unwrap_or((usd, ""));
    let mut frac = frac.to_owned();
    assert!(frac.len() <= 12, "{usd}");
    while frac.len() < 12 {
        frac.push('0');
    }
    whole.parse::<i128>().unwrap() * 1_000_000_000_000 + frac.parse::<i128>().unwrap()
}

#[test]
#[ignore = "needs Prometheus: apt-get install prometheus and set PROMETHEUS_BIN"]
fn prometheus_sees_every_request_and_the_teams_spend_to_the_pico_dollar() {
    let prom_bin = std::env::var_os("PROMETHEUS_BIN")
        .unwrap_or_else(|| panic!("PROMETHEUS_BIN is not set (e.g. /usr/bin/prometheus)"));
    let (m, g, _store, tokens) = budgeted_gateway(
        "",
        "[admin]\nlisten = \"127.0.0.1:0\"\n[[budgets]]\nname = \"team-eng\"\namount_usd = \"100\"\nwindow = \"day\"\nscope = \"group\"\ngroup = \"eng\"\n",
        &["eng", "ops"],
    );
    // The mock must outlive the load.
    let _mock = m;
    let admin: SocketAddr = g.wait_json(&[("event", json!("admin_listening"))])["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // Prometheus scrapes the admin listener every second.
    let dir = TempDir::new("prom");
    let cfg = dir.file(
        "prometheus.yml",
        &format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\nscrape_configs:\n  - job_name: tollgate\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{admin}']\n",
            rules = Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .unwrap()
                .join("docs/grafana/tollgate-alerts.yml")
                .display()
        ),
    );
    let port = free_port();
    let prom_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let prom = std::process::Command::new(&prom_bin)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.0.join("data").display()
        ))
        .arg(format!("--web.listen-address={prom_addr}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prom = Kill(prom);

    // A short load: both teams, both APIs, streamed and not.
    let mut sent = 0;
    for i in 0..30 {
        let token = &tokens[i % 2];
        let stream = if i % 3 == 0 { ",\"stream\":true" } else { "" };
        let r = post(
            g.addr,
            "/v1/chat/completions",
            &format!(
                r#"{{"model":"gpt-4o-mini","max_tokens":16{stream},"messages":[{{"role":"user","content":"hi {i}"}}]}}"#
            ),
            &format!("Authorization: Bearer {token}\r\n"),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        sent += 1;
        let r = post(
            g.addr,
            "/v1/messages",
            &format!(
                r#"{{"model":"claude-haiku-4-5","max_tokens":16{stream},"messages":[{{"role":"user","content":"hi {i}"}}]}}"#
            ),
            &format!("x-api-key: {token}\r\n"),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        sent += 1;
    }

    // What the access log says, and what `tollgate spend` says the team spent.
    // The log writer is a thread of its own: wait for every line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let logged = loop {
        let n = g.count_json(&[("event", json!("request"))]);
        if n >= sent || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(logged, sent);
    let deadline = Instant::now() + Duration::from_secs(20);
    let team_pico = loop {
        let row = g.spend().into_iter().find(|r| r["budget"] == "team-eng");
        let spent = row
            .as_ref()
            .and_then(|r| r["spent_usd"].as_str())
            .map(pico)
            .unwrap_or(0);
        if spent > 0
            && row
                .as_ref()
                .is_some_and(|r| r["unreplayed_usd"].as_str().is_none_or(|u| pico(u) == 0))
        {
            break spent;
        }
        assert!(
            Instant::now() < deadline,
            "the team's spend never reached the store: {row:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };

    // Prometheus's view, once a scrape after the load has landed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let requests = query(prom_addr, "sum(tollgate_requests_total)");
        let cost = query(
            prom_addr,
            "sum(tollgate_cost_pusd_total{group=\"eng\",price=\"effective\"})",
        );
        if let (Some(r), Some(c)) = (requests, cost) {
            if r as usize == sent && c as i128 == team_pico {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus saw requests {requests:?} (log: {logged}) and eng cost {cost:?} pico (tollgate spend: {team_pico})"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Scrapes succeeded throughout (`up` is 1).
    assert_eq!(query(prom_addr, "up{job=\"tollgate\"}"), Some(1.0));
    // The shipped alert rules load and evaluate against these metrics without errors.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = request(
            prom_addr,
            b"GET /api/v1/rules HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        );
        let rules: Vec<serde_json::Value> = r.json()["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert!(!rules.is_empty(), "no rules loaded: {}", r.text());
        if rules.iter().all(|x| x["health"] == "ok") {
            break;
        }
        assert!(
            rules.iter().all(|x| x["health"] != "err"),
            "a rule failed: {}",
            r.text()
        );
        assert!(
            Instant::now() < deadline,
            "rules never evaluated: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
