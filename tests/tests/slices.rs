//! Slices of shared budgets end to end: four workers, eight callers in one team, each on its own
//! keep-alive connection (so each connection moves to its caller's core), and a team budget owned by one
//! core. With slices the other cores admit against the team budget without asking its owner per request;
//! near the limit the owner recalls the slices, so a request is refused only when the spend really leaves
//! no room for it, and the limit holds.
//!
//! Prices (the shipped sheet): gpt-4o-mini 150,000 pico-USD per input token, 600,000 per output token.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use serde_json::json;
use tollgate_tests::*;

const IN: i128 = 150_000;
const OUT: i128 = 600_000;
const BODY: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#;
const CALLERS: usize = 8;

/// A gateway with four workers, a team budget of `amount_usd`, and eight callers in team `eng`.
fn setup(amount_usd: &str, server_extra: &str) -> (Proc, Gateway, TempDir, Vec<String>) {
    budgeted_gateway(
        &format!("workers = 4\n{server_extra}"),
        &format!("[[budgets]]\nname = \"eng-team\"\namount_usd = \"{amount_usd}\"\nwindow = \"day\"\nscope = \"group\"\ngroup = \"eng\"\n"),
        &["eng"; CALLERS],
    )
}

fn request(token: &str) -> String {
    request_with(token, BODY)
}

fn request_with(token: &str, body: &str) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn logged(g: &Gateway, r: &Response) -> serde_json::Value {
    g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ])
}

/// Runs `rounds` rounds of one request per caller (sequentially, each on its caller's connection) and
/// returns every response with its access-log line.
fn run(g: &Gateway, tokens: &[String], rounds: usize) -> Vec<(Response, serde_json::Value)> {
    let mut conns: Vec<Conn> = (0..tokens.len()).map(|_| Conn::open(g.addr)).collect();
    run_on(g, tokens, &mut conns, rounds)
}

fn run_on(
    g: &Gateway,
    tokens: &[String],
    conns: &mut [Conn],
    rounds: usize,
) -> Vec<(Response, serde_json::Value)> {
    let mut out = Vec::new();
    for _ in 0..rounds {
        for (i, c) in conns.iter_mut().enumerate() {
            c.send(request(&tokens[i]).as_bytes());
            let r = c.read_response();
            let line = logged(g, &r);
            out.push((r, line));
        }
    }
    out
}

/// Requests after each connection's first, admitted with no cross-core message.
fn local_share(lines: &[(Response, serde_json::Value)]) -> (usize, usize) {
    let later: Vec<&serde_json::Value> = lines.iter().skip(CALLERS).map(|(_, l)| l).collect();
    let local = later
        .iter()
        .filter(|l| l["budget_asks"] == json!(0))
        .count();
    (local, later.len())
}

#[test]
fn cores_admit_against_a_team_budget_on_their_slices() {
    let (_m, g, _s, tokens) = setup("100", "");
    let lines = run(&g, &tokens, 10);
    assert!(lines.iter().all(|(r, _)| r.status == 200));
    let (local, n) = local_share(&lines);
    let (_m2, g2, _s2, tokens2) = setup("100", "budget_slices = false");
    let off = run(&g2, &tokens2, 10);
    let (off_local, off_n) = local_share(&off);
    eprintln!(
        "admitted without a cross-core message: slices on {local}/{n}, off {off_local}/{off_n}"
    );
    // Each core borrows once, then its slice (about 1/16 of the remaining $100) covers everything.
    assert!(local >= n - 4, "{local}/{n}");
    // Without slices, requests on cores other than the team budget's owner ask it every time.
    let owner_core_requests = off
        .iter()
        .skip(CALLERS)
        .filter(|(_, l)| l["budget_asks"] == json!(0))
        .map(|(_, l)| l["core"].as_u64().unwrap())
        .collect::<std::collections::HashSet<_>>();
    assert!(owner_core_requests.len() <= 1, "{owner_core_requests:?}");
    assert!(off_local < n, "{off_local}/{off_n}");
}

#[test]
fn near_the_limit_slices_come_back_and_refusals_are_real() {
    // Each request reserves body bytes x IN + 16 x OUT and costs ceil(bytes/4) x IN + 16 x OUT (the
    // mock's count): about 11 requests fit $0.0002.
    let limit = 200_000_000i128;
    let reserve = BODY.len() as i128 * IN + 16 * OUT;
    let (_m, g, _s, tokens) = setup("0.0002", "");
    let lines = run(&g, &tokens, 3);
    let mut spent = 0i128;
    let mut refused = 0;
    for (r, line) in &lines {
        match r.status {
            200 => {
                // Admitted: what was spent before it left room for its whole reservation.
                assert!(
                    spent + reserve <= limit,
                    "admitted past the limit: {spent} + {reserve}"
                );
                spent += line["cost_pusd"].as_i64().unwrap() as i128;
            }
            429 => {
                refused += 1;
                // Refused: the spend (every earlier request has settled: they ran one after another)
                // leaves no room, whichever core it ran on and however the slices were spread.
                assert!(
                    spent + reserve > limit,
                    "false refusal with {spent} spent of {limit}: {}",
                    r.text()
                );
            }
            s => panic!("unexpected status {s}: {}", r.text()),
        }
    }
    eprintln!(
        "served {} refused {refused} spent {spent} of {limit} pico-USD",
        lines.len() - refused
    );
    assert!(refused > 0 && spent <= limit);
}

#[test]
fn a_request_that_needs_what_other_cores_hold_unused_is_admitted() {
    // Small requests on every core first, so every core holds a slice with unused amount; then, from
    // each caller in turn, one request whose reservation is just under what is really left. Admitting it
    // takes the owner's recall of the other cores' slices.
    let limit = 1_000_000_000i128;
    let (_m, g, _s, tokens) = setup("0.001", "");
    let mut conns: Vec<Conn> = (0..tokens.len()).map(|_| Conn::open(g.addr)).collect();
    let warm = run_on(&g, &tokens, &mut conns, 3);
    assert!(warm.iter().all(|(r, _)| r.status == 200));
    let mut spent: i128 = warm
        .iter()
        .map(|(_, l)| l["cost_pusd"].as_i64().unwrap() as i128)
        .sum();
    for (i, c) in conns.iter_mut().enumerate() {
        // max_tokens so that bytes x IN + max_tokens x OUT is just under limit - spent.
        let body_for = |mt: i128| {
            format!(
                r#"{{"model":"gpt-4o-mini","max_tokens":{mt},"messages":[{{"role":"user","content":"hi"}}]}}"#
            )
        };
        let room = limit - spent;
        let mut mt = (room - body_for(1000).len() as i128 * IN) / OUT;
        while body_for(mt).len() as i128 * IN + mt * OUT > room {
            mt -= 1;
        }
        let body = body_for(mt);
        c.send(request_with(&tokens[i], &body).as_bytes());
        let r = c.read_response();
        let line = logged(&g, &r);
        assert_eq!(
            r.status,
            200,
            "caller {i} on core {}: reservation {} of {room} left: {}",
            line["core"],
            body.len() as i128 * IN + mt * OUT,
            r.text()
        );
        spent += line["cost_pusd"].as_i64().unwrap() as i128;
    }
    assert!(spent <= limit);
}
