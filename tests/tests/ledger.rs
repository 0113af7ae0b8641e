//! The durable spend ledger end to end: the real gateway with its embedded store (SQLite) and journals,
//! killed with SIGKILL under streaming load and restarted; a store that fails under a running gateway; a
//! store from a newer schema; `tollgate spend`.
//!
//! Costs are deterministic: the mock bills `x-mock-input-tokens` input tokens and `min(16, max_tokens)`
//! output tokens; gpt-4o-mini is 150,000 pico-USD per input token and 600,000 per output token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tollgate_tests::*;

const IN: i128 = 150_000;
const OUT: i128 = 600_000;
/// One request: 10 input tokens, 16 output tokens.
const COST: i128 = 10 * IN + 16 * OUT;

const STREAM: &str = r#"{"model":"gpt-4o-mini","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const CHAT: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;

fn usd_to_pico(s: &str) -> i128 {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac = format!("{frac:0<12}");
    whole.parse::<i128>().unwrap() * 1_000_000_000_000 + frac[..12].parse::<i128>().unwrap()
}

/// Spent on `instance` according to `tollgate spend`.
fn spent(g: &Gateway, instance: &str) -> i128 {
    g.spend()
        .iter()
        .find(|r| r["instance"] == instance)
        .map(|r| usd_to_pico(r["spent_usd"].as_str().unwrap()))
        .unwrap_or(0)
}

fn headers(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\nx-mock-input-tokens: 10\r\n")
}

/// One streamed request on its own connection; whether the client saw it complete (the last event and the
/// chunked body's end). Never panics: the gateway may die under it.
fn stream_once(addr: SocketAddr, token: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let req = post_bytes(
        "/v1/chat/completions",
        STREAM,
        &format!(
            "{}x-mock-token-delay-ms: 2\r\nConnection: close\r\n",
            headers(token)
        ),
    );
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    text.starts_with("HTTP/1.1 200") && text.contains("data: [DONE]") && text.ends_with("0\r\n\r\n")
}

fn budget_gateway(budgets: &str) -> (Proc, Gateway, TempDir, Vec<String>) {
    budgeted_gateway("workers = 2", budgets, &["eng", "ops"])
}

/// What admission reserved for one request (the access log's `reserved_pusd`): what a request in flight at
/// a crash is charged.
fn reserved(g: &Gateway) -> i128 {
    let line = g
        .wait_line(|l| l.contains("\"reserved_pusd\""), Duration::from_secs(5))
        .expect("an access log line with reserved_pusd");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    i128::from(v["reserved_pusd"].as_i64().unwrap())
}

/// Requests in flight charged at their reservation by the start that followed a crash (the
/// `reservation_charged_after_crash` events).
fn charged_after_crash(g: &Gateway) -> i128 {
    let started = g.wait_json(&[("event", json!("ledger_started"))]);
    started["charged_after_crash"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn spend_survives_kill_9_under_streaming_load() {
    let (_m, mut g, _s, tokens) = budget_gateway(
        "[[budgets]]\nname = \"total\"\namount_usd = \"1000\"\nwindow = \"month\"\nscope = \"everyone\"\n",
    );
    let (mut completed, mut attempted, mut orphans) = (0i128, 0i128, 0i128);
    let mut last = 0;
    let mut held = None;
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..8)
            .map(|i| {
                let (stop, addr, token) = (Arc::clone(&stop), g.addr, tokens[i % 2].clone());
                std::thread::spawn(move || {
                    let (mut ok, mut tried) = (0i128, 0i128);
                    while !stop.load(Ordering::Relaxed) {
                        tried += 1;
                        if stream_once(addr, &token) {
                            ok += 1;
                        } else {
                            break;
                        }
                    }
                    (ok, tried)
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(800));
        let r = *held.get_or_insert_with(|| reserved(&g));
        g.kill9();
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            let (ok, tried) = c.join().unwrap();
            completed += ok;
            attempted += tried;
        }
        g.restart();
        orphans += charged_after_crash(&g);
        let s = spent(&g, "total");
        let settled = s - orphans * r;
        eprintln!(
            "round {round}: {completed} completed, {attempted} attempted, stored {} settled requests and {orphans} in flight at a kill, at {r} each",
            settled / COST
        );
        assert_eq!(settled % COST, 0, "a partial request's spend: {s}");
        // Every request a client saw complete is counted, once; the ones in flight at the kill are
        // counted at their cost (journaled before their last bytes, which never arrived) or at their
        // reservation (admitted, not settled): never fewer than were settled, never more than attempted.
        assert!(
            completed * COST <= settled && settled / COST + orphans <= attempted,
            "stored {s}, completed {completed}, attempted {attempted}, orphans {orphans}"
        );
        assert!(completed > 0);
        last = s;
    }
    // A restart with nothing new counts nothing again.
    g.kill9();
    g.restart();
    assert_eq!(charged_after_crash(&g), 0);
    assert_eq!(spent(&g, "total"), last);
}

/// Streams mid-flight when the gateway is killed with SIGKILL: the provider bills them, so the next start
/// charges each at its reservation (the most it could cost), marked as an estimate in the log and in
/// `tollgate spend`; the completed requests count exactly; further restarts change nothing; a clean
/// shutdown leaves nothing to charge.
#[test]
fn requests_in_flight_at_a_kill_9_are_charged_at_their_reservation() {
    let (_m, mut g, _s, tokens) = budget_gateway(
        "[[budgets]]\nname = \"total\"\namount_usd = \"1000\"\nwindow = \"month\"\nscope = \"everyone\"\n",
    );
    const DONE: i128 = 3;
    const IN_FLIGHT: usize = 4;
    // Completed streams, the same request as the ones in flight below: what each reserves.
    for _ in 0..DONE {
        assert!(stream_once(g.addr, &tokens[0]));
    }
    let r = reserved(&g);
    assert!(r > COST, "the reservation bounds the cost: {r}");
    // Streams that will take 16 s: each client reads until its first token arrived, then holds on.
    let (tx, rx) = std::sync::mpsc::channel();
    let clients: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let (addr, token, tx) = (g.addr, tokens[i % 2].clone(), tx.clone());
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let req = post_bytes(
                    "/v1/chat/completions",
                    STREAM,
                    &format!(
                        "{}x-mock-token-delay-ms: 1000\r\nConnection: close\r\n",
                        headers(&token)
                    ),
                );
                s.write_all(req.as_bytes()).unwrap();
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !String::from_utf8_lossy(&buf).contains("data: ") {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                tx.send(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"))
                    .unwrap();
                // Held open until the gateway dies under it.
                let _ = s.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).contains("data: [DONE]")
            })
        })
        .collect();
    for _ in 0..IN_FLIGHT {
        assert!(
            rx.recv_timeout(Duration::from_secs(10)).unwrap(),
            "a stream started"
        );
    }
    g.kill9();
    for c in clients {
        assert!(!c.join().unwrap(), "no stream completed");
    }
    let want = DONE * COST + IN_FLIGHT as i128 * r;
    let estimate = |g: &Gateway| {
        g.spend()
            .iter()
            .find(|row| row["instance"] == "total")
            .map(|row| usd_to_pico(row["crash_estimated_usd"].as_str().unwrap()))
            .unwrap()
    };
    // No gateway running: `tollgate spend` already counts what the next start will charge.
    assert_eq!(spent(&g, "total"), want);
    assert_eq!(estimate(&g), IN_FLIGHT as i128 * r);

    g.restart();
    assert_eq!(charged_after_crash(&g), IN_FLIGHT as i128);
    // One event per journal (core) that left reservations open, with their count and amount per budget.
    let (mut count, mut usd) = (0, 0);
    for line in g.output().lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if event["event"] == "reservation_charged_after_crash" {
            count += event["count"].as_str().unwrap().parse::<usize>().unwrap();
            let total = event["usd"]
                .as_str()
                .unwrap()
                .strip_prefix("total=")
                .unwrap();
            usd += usd_to_pico(total);
        }
    }
    assert_eq!((count, usd), (IN_FLIGHT, IN_FLIGHT as i128 * r));
    assert_eq!(spent(&g, "total"), want);
    assert_eq!(estimate(&g), IN_FLIGHT as i128 * r);

    // Idempotent: another crash and start charge nothing again.
    g.kill9();
    g.restart();
    assert_eq!(charged_after_crash(&g), 0);
    assert_eq!(spent(&g, "total"), want);
    assert_eq!(estimate(&g), IN_FLIGHT as i128 * r);

    // A clean shutdown (nothing in flight) leaves no reservation open.
    let r = post(g.addr, "/v1/chat/completions", CHAT, &headers(&tokens[1]));
    assert_eq!(r.status, 200, "{}", r.text());
    g.sigterm();
    assert_eq!(g.wait_exit(Duration::from_secs(10)), Some(0));
    g.restart();
    assert_eq!(charged_after_crash(&g), 0);
    assert_eq!(spent(&g, "total"), want + COST);
}

#[test]
fn a_failing_store_closes_closed_budgets_and_open_ones_keep_serving_without_losing_spend() {
    let (_m, g, _s, tokens) = budget_gateway(
        r#"
[[budgets]]
name = "hard"
amount_usd = "100"
window = "month"
scope = "group"
group = "eng"

[[budgets]]
name = "soft"
amount_usd = "100"
window = "month"
scope = "group"
group = "ops"
on_store_failure = "open"

[ledger]
dir = "ledger"
commit_interval_ms = 20
fail_closed_after_ms = 300
"#,
    );
    let (eng, ops) = (&tokens[0], &tokens[1]);
    let ok = |t: &str| post(g.addr, "/v1/chat/completions", CHAT, &headers(t));
    let (mut hard, mut soft) = (0i128, 0i128);
    for _ in 0..2 {
        assert_eq!(ok(eng).status, 200);
        hard += 1;
        assert_eq!(ok(ops).status, 200);
        soft += 1;
    }
    // Another process takes the store's write lock and keeps it: every commit of the gateway fails.
    let db = g
        .config_path()
        .parent()
        .unwrap()
        .join("ledger/ledger.sqlite");
    let blocker = tollgate_core::store::sqlite::SqliteStore::open(&db).unwrap();
    let held = {
        use tollgate_core::store::Store;
        blocker.begin().unwrap()
    };
    assert_eq!(ok(eng).status, 200);
    hard += 1;
    g.wait_json(&[("event", json!("ledger_store_failing"))]);
    std::thread::sleep(Duration::from_millis(400));
    // Past ledger.fail_closed_after_ms: the closed budget refuses new spend, the open one serves.
    let r = ok(eng);
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "budget_unavailable");
    assert!(r.text().contains("hard"), "{}", r.text());
    for _ in 0..3 {
        assert_eq!(ok(ops).status, 200);
        soft += 1;
    }
    // The store comes back: the closed budget serves again, and nothing spent meanwhile was lost.
    drop(held);
    g.wait_json(&[("event", json!("ledger_store_recovered"))]);
    assert_eq!(ok(eng).status, 200);
    hard += 1;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (h, s) = (spent(&g, "hard"), spent(&g, "soft"));
        if (h, s) == (hard * COST, soft * COST) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stored hard {h} soft {s}, served hard {hard} soft {soft}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_store_written_by_a_newer_tollgate_is_refused_with_both_versions() {
    use tollgate_core::store::Store;
    let m = mock(&["--expect-key", MOCK_KEY]);
    let dir = TempDir::new("newer-schema");
    std::fs::create_dir_all(dir.0.join("ledger")).unwrap();
    let store =
        tollgate_core::store::sqlite::SqliteStore::open(&dir.0.join("ledger/ledger.sqlite"))
            .unwrap();
    let mut txn = store.begin().unwrap();
    txn.set(&tollgate_core::store::keys::schema(), b"2");
    txn.commit().unwrap();
    drop(store);
    let cfg = dir.file(
        "tollgate.toml",
        &config_for(
            &format!("http://{}", m.addr),
            "",
            &format!("[ledger]\ndir = \"{}\"\n", dir.0.join("ledger").display()),
        ),
    );
    let mut p = Proc::spawn(
        &bin("tollgate"),
        &["serve", "--config", cfg.to_str().unwrap()],
        &[
            ("TG_TEST_OPENAI_KEY", MOCK_KEY),
            ("TG_TEST_ANTHROPIC_KEY", MOCK_KEY),
        ],
    );
    let code = p.wait_exit(Duration::from_secs(10));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}: {}",
        p.output()
    );
    let out = p.output();
    assert!(
        out.contains("newer Tollgate (schema 2; this binary reads schema 1)"),
        "{out}"
    );
}

#[test]
fn spend_reports_every_budget_and_survives_a_clean_restart() {
    let (_m, mut g, _s, tokens) = budget_gateway(
        r#"
[[budgets]]
name = "per-caller"
amount_usd = "5"
window = "day"
scope = "each_identity"

[[budgets]]
name = "team"
amount_usd = "50"
window = "week"
scope = "group"
group = "eng"
"#,
    );
    for _ in 0..3 {
        assert_eq!(
            post(g.addr, "/v1/chat/completions", CHAT, &headers(&tokens[0])).status,
            200
        );
    }
    g.sigterm();
    assert_eq!(g.wait_exit(Duration::from_secs(10)), Some(0));
    let rows = g.spend();
    let team = rows.iter().find(|r| r["instance"] == "team").unwrap();
    assert_eq!(usd_to_pico(team["spent_usd"].as_str().unwrap()), 3 * COST);
    assert_eq!(team["limit_usd"], "50");
    let me = rows
        .iter()
        .find(|r| r["budget"] == "per-caller")
        .unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(usd_to_pico(me["spent_usd"].as_str().unwrap()), 3 * COST);
    // After a restart the budgets start from the stored spend: the header's remaining amount shows it.
    g.restart();
    let r = post(g.addr, "/v1/chat/completions", CHAT, &headers(&tokens[0]));
    assert_eq!(r.status, 200);
    let remaining = usd_to_pico(r.header("x-tollgate-budget-remaining").unwrap());
    let reserve = CHAT.len() as i128 * IN + 16 * OUT;
    // The tightest is per-caller ($5): 5 - 3 requests - this one's reservation.
    assert_eq!(remaining, 5_000_000_000_000 - 3 * COST - reserve);
}

#[test]
fn a_second_gateway_on_the_same_ledger_dir_is_refused_and_spend_without_a_store_says_so() {
    let (_m, g, _s, tokens) = budget_gateway(
        "[[budgets]]\nname = \"total\"\namount_usd = \"1\"\nwindow = \"day\"\nscope = \"everyone\"\n",
    );
    // The same config file (so the same ledger dir) started again while the first gateway runs.
    let mut second = Proc::spawn(
        &bin("tollgate"),
        &["serve", "--config", g.config_path().to_str().unwrap()],
        &[
            ("TG_TEST_OPENAI_KEY", MOCK_KEY),
            ("TG_TEST_ANTHROPIC_KEY", MOCK_KEY),
        ],
    );
    let code = second.wait_exit(Duration::from_secs(10));
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}: {}",
        second.output()
    );
    assert!(
        second
            .output()
            .contains("another tollgate is running with ledger.dir"),
        "{}",
        second.output()
    );
    // The first one still serves.
    assert_eq!(
        post(g.addr, "/v1/chat/completions", CHAT, &headers(&tokens[0])).status,
        200
    );

    // `tollgate spend` for a config whose ledger has never run: an error naming the missing store.
    let dir = TempDir::new("no-ledger");
    let cfg = dir.file(
        "tollgate.toml",
        &config_for("http://127.0.0.1:9", "", "[ledger]\ndir = \"never-ran\"\n"),
    );
    let out = std::process::Command::new(bin("tollgate"))
        .args(["spend", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no spend store at") && err.contains("never-ran"),
        "{err}"
    );
}
