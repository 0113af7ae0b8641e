//! Dimensional usage end to end: priced requests from two service tokens (one team with a budget, one
//! without any) through a real gateway, then the gateway's own ledger file opened read-only beside it and
//! queried with `tollgate_core::store::consumption`: the usage rows' cost is exactly the sum of the costs
//! the gateway logged per request, per model and per identity, and a request no budget applies to is
//! counted too.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_core::store::consumption::{self, Dim, Granularity, UsageQuery, UsageRow};
use tollgate_core::store::sqlite::SqliteStore;
use tollgate_tests::*;

const PLATFORM_BUDGET: &str = r#"
[[budgets]]
name = "platform"
amount_usd = "100"
window = "day"
scope = "group"
group = "platform"
"#;

/// Sends a chat for `model`; returns (the billed model, the caller's subject, the logged cost).
fn chat(g: &Gateway, token: &str, model: &str, billed: &str) -> (String, String, i128) {
    let body = format!(
        r#"{{"model":"{model}","max_tokens":20,"messages":[{{"role":"user","content":"hello there"}}]}}"#
    );
    let r = post(
        g.addr,
        "/v1/chat/completions",
        &body,
        &format!("Authorization: Bearer {token}\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ]);
    let cost = i128::from(line["cost_pusd"].as_i64().unwrap());
    assert!(cost > 0, "{line}");
    let subject = line["subject"].as_str().unwrap().to_owned();
    (billed.to_owned(), subject, cost)
}

fn query(store: &SqliteStore, group_by: Vec<Dim>) -> Vec<UsageRow> {
    let now = jiff::Timestamp::now();
    consumption::query(
        store,
        &UsageQuery {
            from: now - jiff::SignedDuration::from_hours(2),
            to: now + jiff::SignedDuration::from_hours(1),
            granularity: Granularity::Day,
            group_by,
            filters: Vec::new(),
        },
    )
    .unwrap()
}

/// Sums by the `dim` column of `rows`: value -> (cost, requests).
fn by(rows: &[UsageRow], dim: &str) -> BTreeMap<String, (i128, u64)> {
    let mut out: BTreeMap<String, (i128, u64)> = BTreeMap::new();
    for r in rows {
        let e = out.entry(r.dims[dim].clone()).or_default();
        e.0 += r.cost.0.pico();
        e.1 += r.requests;
    }
    out
}

#[test]
fn usage_rows_equal_the_logged_charges_per_model_and_identity_budget_or_not() {
    let (_m, g, _store_dir, tokens) =
        budgeted_gateway("", PLATFORM_BUDGET, &["platform", "research"]);
    let (platform, research) = (&tokens[0], &tokens[1]);
    let mut sent = Vec::new();
    // `fast` routes to gpt-4o-mini: usage is by the billed model.
    for (token, model, billed) in [
        (platform, "gpt-4o", "gpt-4o"),
        (platform, "gpt-4o", "gpt-4o"),
        (platform, "fast", "gpt-4o-mini"),
        (research, "gpt-4o", "gpt-4o"),
        (research, "gpt-4o-mini", "gpt-4o-mini"),
    ] {
        sent.push(chat(&g, token, model, billed));
    }
    let db = g
        .config_path()
        .parent()
        .unwrap()
        .join("ledger/ledger.sqlite");
    let store = SqliteStore::open_read_only(&db).unwrap();
    // The ledger commits every 50 ms: wait until every request is in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let total: u64 = query(&store, vec![]).iter().map(|r| r.requests).sum();
        if total >= sent.len() as u64 {
            assert_eq!(total, sent.len() as u64);
            break;
        }
        assert!(Instant::now() < deadline, "only {total} requests in usage");
        std::thread::sleep(Duration::from_millis(50));
    }

    let mut want_model: BTreeMap<String, (i128, u64)> = BTreeMap::new();
    let mut want_token: BTreeMap<String, (i128, u64)> = BTreeMap::new();
    for (model, subject, cost) in &sent {
        let e = want_model.entry(model.clone()).or_default();
        e.0 += cost;
        e.1 += 1;
        let e = want_token.entry(subject.clone()).or_default();
        e.0 += cost;
        e.1 += 1;
    }
    let got_model = by(&query(&store, vec![Dim::Model]), "model");
    assert_eq!(
        got_model.keys().collect::<Vec<_>>(),
        want_model.keys().collect::<Vec<_>>()
    );
    assert_eq!(got_model, want_model);
    let got_token = by(&query(&store, vec![Dim::ServiceToken]), "service_token");
    assert_eq!(got_token, want_token);
    let got_identity = by(&query(&store, vec![Dim::Identity]), "identity");
    let want_identity: BTreeMap<String, (i128, u64)> = want_token
        .iter()
        .map(|(s, v)| (format!("service-token:{s}"), *v))
        .collect();
    assert_eq!(got_identity, want_identity);

    // The team without a budget is counted like the one with.
    let got_group = by(&query(&store, vec![Dim::Group]), "group");
    let research_subject = &sent[3].1;
    assert_eq!(got_group["research"], want_token[research_subject]);
    assert_eq!(got_group.len(), 2, "{got_group:?}");

    // Its spend, only the budgeted team's, matches the usage of that team.
    let now = jiff::Timestamp::now();
    let spend = consumption::budget_spend(
        &store,
        Some("platform"),
        now - jiff::SignedDuration::from_hours(2),
        now + jiff::SignedDuration::from_hours(1),
        Granularity::Day,
    )
    .unwrap();
    let spent: i128 = spend.iter().map(|r| r.spent.0.pico()).sum();
    assert_eq!(spent, got_group["platform"].0);

    // Both tokens were seen, with their team.
    let seen = consumption::seen(&store, None, 0).unwrap();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert_eq!(s.kind, "service");
        assert_eq!(s.service_token.as_deref(), Some(s.subject.as_str()));
        assert!(
            matches!(s.team.as_deref(), Some("platform" | "research")),
            "{s:?}"
        );
        assert!(s.first_seen <= s.last_seen);
    }
}
