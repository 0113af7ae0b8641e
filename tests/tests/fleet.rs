//! Fleet mode end to end: three complete gateways in this process (each with its own listener, two
//! workers and its own ledger directory) share one in-memory store, so one budget holds across them
//! through budget leases (see `docs/fleet.md`).
//!
//! The gateways log to this test's stdout, so results are counted from the HTTP responses and from the
//! store. Costs are deterministic: the mock bills `x-mock-input-tokens` input tokens and
//! `min(16, max_tokens)` output tokens; gpt-4o-mini is 150,000 pico-USD per input token and 600,000 per
//! output token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tollgate_core::store::fleet::{self, Ask, WindowRef};
use tollgate_core::store::ledger::{self, InstanceName};
use tollgate_core::store::mem::MemStore;
use tollgate_core::store::{transact, RetryPolicy};
use tollgate_core::Config;
use tollgate_dataplane::{BuildOptions, Gateway};
use tollgate_tests::*;

const IN: i128 = 150_000;
const OUT: i128 = 600_000;
const INPUT_TOKENS: i128 = 10;

/// A fleet node's files: its config (and ledger directory) and the provider key.
struct Node {
    gateway: Gateway,
    _dir: TempDir,
}

fn budgets(amount_usd: &str) -> String {
    format!(
        r#"
[[budgets]]
name = "everyone"
amount_usd = "{amount_usd}"
window = "day"
scope = "everyone"
"#
    )
}

/// One node's configuration (in its own directory).
fn node_config(
    mock: &Proc,
    tokens: &TempDir,
    id: u64,
    budgets: &str,
    ledger: &str,
) -> (Config, TempDir) {
    let dir = TempDir::new("fleet-node");
    let key = dir.file("provider.key", MOCK_KEY);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let extra = format!(
        "[store]\ndir = \"{}\"\n[auth]\n{budgets}\n[ledger]\ndir = \"ledger\"\nnode_id = {id}\nfleet_nodes = 3\ncommit_interval_ms = 20\n{ledger}\n",
        tokens.0.display()
    );
    let toml = config_for(&format!("http://{}", mock.addr), "workers = 2", &extra)
        .replace(
            "api_key_env = \"TG_TEST_OPENAI_KEY\"",
            &format!("api_key_file = \"{}\"", key.display()),
        )
        .replace(
            "api_key_env = \"TG_TEST_ANTHROPIC_KEY\"",
            &format!("api_key_file = \"{}\"", key.display()),
        );
    let path = dir.file("tollgate.toml", &toml);
    (Config::load(&path).unwrap(), dir)
}

/// Starts one node of the fleet on `store`.
fn node(
    mock: &Proc,
    tokens: &TempDir,
    store: &MemStore,
    id: u64,
    budgets: &str,
    ledger: &str,
) -> Node {
    let (config, dir) = node_config(mock, tokens, id, budgets, ledger);
    let gateway = Gateway::start_with_store(
        config,
        &BuildOptions::default(),
        Box::new(store.clone()),
        true,
    )
    .unwrap();
    Node { gateway, _dir: dir }
}

/// The `everyone` budget's current window in `config`, as the nodes lease it.
fn window(config: &Config, limit: i128) -> WindowRef {
    let (start, end) = config
        .budgets
        .get("everyone")
        .unwrap()
        .window
        .period(Timestamp::now())
        .unwrap();
    WindowRef {
        instance: InstanceName {
            budget: "everyone".into(),
            member: String::new(),
        },
        start: start.as_second(),
        end: end.as_second(),
        limit,
    }
}

/// The fleet's committed spend on `everyone`, all windows.
fn committed(store: &MemStore) -> i128 {
    let all = transact(store, &RetryPolicy::default(), |txn| {
        ledger::load_since(txn, Timestamp::UNIX_EPOCH)
    })
    .unwrap();
    all.iter()
        .filter(|s| s.instance.budget == "everyone")
        .map(|s| s.amount.pico())
        .sum()
}

/// One streamed request on its own connection: the status, and whether the stream completed.
fn stream(addr: SocketAddr, token: &str, max_tokens: u64) -> (u16, bool) {
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":{max_tokens},"stream":true,"messages":[{{"role":"user","content":"hi"}}]}}"#
    );
    let req = post_bytes(
        "/v1/chat/completions",
        &body,
        &format!(
            "Authorization: Bearer {token}\r\nx-mock-input-tokens: {INPUT_TOKENS}\r\nx-mock-token-delay-ms: 3\r\nConnection: close\r\n"
        ),
    );
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text.contains("[DONE]"))
}

fn cost(max_tokens: u64) -> i128 {
    INPUT_TOKENS * IN + i128::from(max_tokens.min(16)) * OUT
}

/// ~150 concurrent streams spread over three nodes: each is admitted or refused with 429, the fleet
/// never spends past the limit, and the store holds exactly the cost of the admitted ones.
#[test]
fn a_fleet_holds_one_budget_across_its_nodes() {
    let mock = mock(&["--expect-key", MOCK_KEY]);
    let tokens = TempDir::new("fleet-tokens");
    let token = service_token(&tokens.0, "platform");
    let store = MemStore::new();
    let limit: i128 = 500_000_000; // $0.0005
    let b = budgets("0.0005");
    let (config, _d) = node_config(&mock, &tokens, 9, &b, "");
    let w = window(&config, limit);
    let nodes: Vec<Node> = (1..=3)
        .map(|id| node(&mock, &tokens, &store, id, &b, ""))
        .collect();
    let addrs: Vec<SocketAddr> = nodes.iter().map(|n| n.gateway.addrs[0]).collect();
    let results: Vec<(u64, u16, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..150u64)
            .map(|i| {
                let addr = addrs[(i % 3) as usize];
                let token = token.clone();
                s.spawn(move || {
                    let max_tokens = 4 + i % 20;
                    let (status, done) = stream(addr, &token, max_tokens);
                    (max_tokens, status, done)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for n in nodes {
        n.gateway.shutdown();
    }
    let ok: Vec<&(u64, u16, bool)> = results.iter().filter(|r| r.1 == 200).collect();
    let refused = results.iter().filter(|r| r.1 == 429).count();
    assert_eq!(
        ok.len() + refused,
        results.len(),
        "every response is 200 or 429: {results:?}"
    );
    assert!(!ok.is_empty() && refused > 0, "some of each: {results:?}");
    assert!(ok.iter().all(|r| r.2), "every admitted stream completed");
    let billed: i128 = ok.iter().map(|r| cost(r.0)).sum();
    let spent = committed(&store);
    assert!(spent <= limit, "fleet spend {spent} over the limit {limit}");
    assert_eq!(spent, billed, "nothing lost, nothing twice");
    // Every node gave its leases back.
    let left = transact(&store, &RetryPolicy::default(), |txn| {
        fleet::leases(txn, &w)
    })
    .unwrap();
    assert!(left.iter().all(|l| l.1 <= 0), "leases left: {left:?}");
}

/// A node that holds the whole budget and never comes back (an `acquire` made for it in the store)
/// blocks the others only until its lease expired by more than `max_skew_ms`.
#[test]
fn a_dead_nodes_lease_comes_back_after_its_ttl_and_the_skew() {
    let mock = mock(&["--expect-key", MOCK_KEY]);
    let tokens = TempDir::new("fleet-tokens");
    let token = service_token(&tokens.0, "platform");
    let store = MemStore::new();
    let limit: i128 = 100_000_000; // $0.0001
    let (ttl, skew) = (1_500i64, 300i64);
    let b = budgets("0.0001");
    let ledger = format!("lease_ttl_ms = {ttl}\nmax_skew_ms = {skew}");
    let (config, _d) = node_config(&mock, &tokens, 9, &b, &ledger);
    let w = window(&config, limit);
    // The nodes start (and set up the store's schema), then the dead node takes everything.
    let nodes: Vec<Node> = (1..=2)
        .map(|id| node(&mock, &tokens, &store, id, &b, &ledger))
        .collect();
    let grant = transact(&store, &RetryPolicy::default(), |txn| {
        fleet::acquire(
            txn,
            &w,
            &Ask {
                node: 999,
                need: limit,
                want: 0,
                nodes: 3,
                now_ms: Timestamp::now().as_millisecond(),
                ttl_ms: ttl,
                max_skew_ms: skew,
            },
        )
    })
    .unwrap()
    .unwrap();
    assert_eq!(grant.total, limit);
    let held_until = Instant::now() + Duration::from_millis((ttl + skew) as u64);
    let addr = |i: usize| nodes[i].gateway.addrs[0];
    // The dead node holds everything: refused while its lease lives (and for the skew after).
    let (status, _) = stream(addr(0), &token, 8);
    assert_eq!(status, 429);
    assert!(
        Instant::now() < held_until,
        "the test ran too slowly to check the refusal"
    );
    while Instant::now() < held_until + Duration::from_millis(100) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (a, done_a) = stream(addr(0), &token, 8);
    let (b2, done_b) = stream(addr(1), &token, 8);
    assert_eq!((a, b2), (200, 200));
    assert!(done_a && done_b);
    for n in nodes {
        n.gateway.shutdown();
    }
    assert_eq!(committed(&store), 2 * cost(8));
}
