//! The control plane end to end, through real HTTP to real binaries: a token made through the API with a
//! budget works on the data plane at once; a budget lowered through the API refuses the next request on
//! every gateway sharing the store (three processes on one SQLite file); a revoked token is refused;
//! conflicting updates end in one winner and one 412; a control plane in its own process writes what
//! the gateways apply within their poll; spend shows up in the spend query; a restart keeps every object
//! and the audit log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tollgate_tests::*;

/// One admin call: method, path, bearer, optional JSON body and extra header lines.
fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<&Value>,
    extra: &str,
) -> Response {
    let body = body.map(Value::to_string).unwrap_or_default();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    );
    request(addr, raw.as_bytes())
}

fn admin_addr(g: &Proc) -> SocketAddr {
    g.wait_json(&[("event", json!("admin_listening"))])["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

fn chat(g: &Proc, token: &str) -> Response {
    post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
        &format!("Authorization: Bearer {token}\r\n"),
    )
}

/// Waits until the gateway logged `catalog_applied` for `version` or later; how long it took.
fn applied(g: &Proc, version: u64) -> Duration {
    let t = Instant::now();
    g.wait_line(
        |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["event"] == "catalog_applied" && v["version"].as_u64().unwrap_or(0) >= version
            })
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("catalog version {version} never applied:\n{}", g.output()));
    t.elapsed()
}

fn etag(r: &Response) -> String {
    r.header("etag").expect("an ETag").to_owned()
}

/// A gateway config over the mock with identity on, the demo tokens, its control plane on port 0, and
/// `ledger` TOML (each node's own journals; a shared SQLite file for a fleet).
fn config(mock: &Proc, store: &std::path::Path, ledger: &str) -> String {
    config_for(
        &format!("http://{}", mock.addr),
        "",
        &format!(
            "[store]\ndir = \"{}\"\n[auth]\ndemo_token = true\n[admin]\nlisten = \"127.0.0.1:0\"\n{ledger}\n",
            store.display()
        ),
    )
}

#[test]
fn tokens_and_budgets_made_through_the_api_are_enforced_and_survive_a_restart() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let store = TempDir::new("cp-store");
    let mut g = gateway(&config(&m, &store.0, "[ledger]\ndir = \"ledger\"\n"));
    let a = admin_addr(&g);
    let root = std::fs::read_to_string(store.0.join("admin-token")).unwrap();
    let root = root.trim();

    // No credential, a data-plane token, junk: 401, and the refusals are audited without the credential.
    let demo = std::fs::read_to_string(store.0.join("demo-token")).unwrap();
    let demo = demo.trim();
    assert_eq!(
        admin(a, "GET", "/admin/v1/budgets", "", None, "").status,
        401
    );
    let r = admin(a, "GET", "/admin/v1/budgets", demo, None, "");
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));

    // A CI token with its own budget and policy, in one call; the secret is shown once.
    let r = admin(
        a,
        "POST",
        "/admin/v1/service-tokens",
        root,
        Some(&json!({"name": "ci-bot", "team": "platform",
            "budget": {"amount_usd": "1", "window": "day"},
            "policy": {"allow_models": ["gpt-4o-mini"]}})),
        "Idempotency-Key: create-ci-bot\r\n",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let secret = r.json()["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tg_"));
    // The same key again: the same token, no secret.
    let again = admin(
        a,
        "POST",
        "/admin/v1/service-tokens",
        root,
        Some(&json!({"name": "ci-bot", "team": "platform",
            "budget": {"amount_usd": "1", "window": "day"},
            "policy": {"allow_models": ["gpt-4o-mini"]}})),
        "Idempotency-Key: create-ci-bot\r\n",
    );
    assert_eq!(
        again.header("idempotent-replayed"),
        Some("true"),
        "{}",
        again.text()
    );
    assert!(!again.text().contains(&secret));
    let v = admin(a, "GET", "/admin/v1/healthz", "", None, "").json()["catalog_version"]
        .as_u64()
        .unwrap();
    let took = applied(&g, v);
    eprintln!("create applied on the node that took it {took:?} after the answer");

    let r = chat(&g, &secret);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-tollgate-budget"), Some("token-ci-bot"));
    // The policy made with the token: other models are refused.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o","max_tokens":16,"messages":[]}"#,
        &format!("Authorization: Bearer {secret}\r\n"),
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // A policy attached at creation carries every policy field, `on_max_tokens` included; a bad value is
    // refused naming the field.
    let r = admin(
        a,
        "POST",
        "/admin/v1/service-tokens",
        root,
        Some(&json!({"name": "strict-bot", "team": "platform",
            "policy": {"allow_models": ["gpt-4o-mini"], "max_tokens": 100, "on_max_tokens": "sometimes"}})),
        "",
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("on_max_tokens"), "{}", r.text());
    let r = admin(
        a,
        "POST",
        "/admin/v1/service-tokens",
        root,
        Some(&json!({"name": "strict-bot", "team": "platform",
            "policy": {"allow_models": ["gpt-4o-mini"], "max_tokens": 100, "on_max_tokens": "refuse"}})),
        "",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let strict = r.json()["secret"].as_str().unwrap().to_owned();
    let v = admin(a, "GET", "/admin/v1/healthz", "", None, "").json()["catalog_version"]
        .as_u64()
        .unwrap();
    applied(&g, v);
    let big =
        r#"{"model":"gpt-4o-mini","max_tokens":200,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(
        g.addr,
        "/v1/chat/completions",
        big,
        &format!("Authorization: Bearer {strict}\r\n"),
    );
    assert_eq!(r.status, 403, "{}", r.text());

    // Lower the budget below one request's reservation: the next request is refused.
    let path = "/admin/v1/budgets/token-ci-bot";
    let cur = admin(a, "GET", path, root, None, "");
    assert_eq!(cur.status, 200, "{}", cur.text());
    let tag = etag(&cur);
    let mut spec = cur.json()["spec"].clone();
    spec["amount_usd"] = json!("0.000001");
    let r = admin(
        a,
        "PUT",
        path,
        root,
        Some(&spec),
        &format!("If-Match: {tag}\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json()["version"].as_u64().unwrap();
    applied(&g, v);
    let r = chat(&g, &secret);
    assert_eq!(r.status, 429, "{}", r.text());

    // Two admins with the same version: one wins, the other gets 412 and the winner's change stands.
    let cur = admin(a, "GET", path, root, None, "");
    let tag = etag(&cur);
    let mut one = cur.json()["spec"].clone();
    one["amount_usd"] = json!("5");
    let mut two = one.clone();
    two["amount_usd"] = json!("7");
    let first = admin(
        a,
        "PUT",
        path,
        root,
        Some(&one),
        &format!("If-Match: {tag}\r\n"),
    );
    let second = admin(
        a,
        "PUT",
        path,
        root,
        Some(&two),
        &format!("If-Match: {tag}\r\n"),
    );
    assert_eq!(
        (first.status, second.status),
        (200, 412),
        "{}",
        second.text()
    );
    assert_eq!(
        admin(a, "GET", path, root, None, "").json()["spec"]["amount_usd"],
        "5"
    );
    // Without If-Match: 428. A value the validator refuses: 422 naming the field.
    let r = admin(a, "PUT", path, root, Some(&one), "");
    assert_eq!(r.status, 428, "{}", r.text());
    let mut bad = one.clone();
    bad["amount_usd"] = json!("five");
    let tag = etag(&admin(a, "GET", path, root, None, ""));
    let r = admin(
        a,
        "PUT",
        path,
        root,
        Some(&bad),
        &format!("If-Match: {tag}\r\n"),
    );
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("amount_usd"), "{}", r.text());
    // The file's own budget is the file's.
    let r = admin(
        a,
        "POST",
        "/admin/v1/budgets",
        root,
        Some(
            &json!({"name": "token-ci-bot", "amount_usd": "1", "window": "day", "scope": "everyone"}),
        ),
        "",
    );
    assert_eq!(r.status, 409, "{}", r.text());

    let v = admin(a, "GET", "/admin/v1/healthz", "", None, "").json()["catalog_version"]
        .as_u64()
        .unwrap();
    applied(&g, v);
    let r = chat(&g, &secret);
    assert_eq!(r.status, 200, "{}", r.text());

    // Spend appears in the spend query, attributed to the token and the model, exact.
    let t = Instant::now();
    let row = loop {
        let r = admin(
            a,
            "GET",
            "/admin/v1/spend?group_by=service_token,model&granularity=hour",
            root,
            None,
            "",
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let rows = r.json()["rows"].as_array().unwrap().clone();
        if let Some(row) = rows
            .into_iter()
            .find(|x| x["dims"]["service_token"] == "ci-bot")
        {
            break row;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no spend row for ci-bot"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(row["dims"]["model"], "gpt-4o-mini");
    assert!(row["cost"]["pico"].as_i64().unwrap() > 0, "{row}");
    let csv = admin(
        a,
        "GET",
        "/admin/v1/spend?group_by=model&format=csv",
        root,
        None,
        "",
    );
    assert!(
        csv.text().starts_with("start,model,cost_usd"),
        "{}",
        csv.text()
    );
    let ids = admin(a, "GET", "/admin/v1/identities", root, None, "").json();
    assert!(
        ids["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["subject"] == "ci-bot"),
        "{ids}"
    );

    // Revoked: refused from the next catalog application on.
    let r = admin(
        a,
        "POST",
        "/admin/v1/service-tokens/ci-bot/revoke",
        root,
        None,
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = admin(a, "GET", "/admin/v1/healthz", "", None, "").json()["catalog_version"]
        .as_u64()
        .unwrap();
    let took = applied(&g, v);
    eprintln!("revocation applied {took:?} after the answer");
    assert_eq!(chat(&g, &secret).status, 401);

    // Nothing the API answers or audits holds the secret.
    let audit = admin(a, "GET", "/admin/v1/audit?limit=1000", root, None, "");
    assert_eq!(audit.status, 200);
    assert!(!audit.text().contains(&secret) && !audit.text().contains(demo));
    let entries = audit.json()["items"].as_array().unwrap().len();
    assert!(
        audit.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "denied" && e["outcome"] == 401),
        "{}",
        audit.text()
    );

    // A restart keeps every object, the audit log and the enforcement.
    g.sigterm();
    g.wait_exit(Duration::from_secs(15));
    g.restart();
    let a = admin_addr(&g);
    let r = admin(a, "GET", "/admin/v1/budgets/token-ci-bot", root, None, "");
    assert_eq!(r.json()["spec"]["amount_usd"], "5", "{}", r.text());
    let audit = admin(a, "GET", "/admin/v1/audit?limit=1000", root, None, "");
    assert!(audit.json()["items"].as_array().unwrap().len() >= entries);
    assert_eq!(chat(&g, &secret).status, 401);
}

#[test]
fn a_change_reaches_every_gateway_on_the_store_and_a_separate_control_plane_can_make_it() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let store = TempDir::new("cp-fleet-store");
    let shared = store.0.join("fleet.sqlite");
    let ledger = |n: usize| {
        format!(
            "[ledger]\ndir = \"ledger-{n}\"\nshared_file = \"{}\"\nfleet_nodes = 3\n",
            shared.display()
        )
    };
    let nodes: Vec<Gateway> = (0..3)
        .map(|n| gateway(&config(&m, &store.0, &ledger(n))))
        .collect();
    let a = admin_addr(&nodes[0]);
    let root = std::fs::read_to_string(store.0.join("admin-token")).unwrap();
    let root = root.trim();
    let r = admin(
        a,
        "POST",
        "/admin/v1/service-tokens",
        root,
        Some(&json!({"name": "fleet-bot", "team": "platform",
            "budget": {"amount_usd": "1", "window": "day"}})),
        "",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let secret = r.json()["secret"].as_str().unwrap().to_owned();
    let v = admin(a, "GET", "/admin/v1/healthz", "", None, "").json()["catalog_version"]
        .as_u64()
        .unwrap();
    for g in &nodes {
        applied(g, v);
        assert_eq!(chat(g, &secret).status, 200);
    }

    // Lowered through node 0's API: the next request is refused on every node.
    let path = "/admin/v1/budgets/token-fleet-bot";
    let cur = admin(a, "GET", path, root, None, "");
    let mut spec = cur.json()["spec"].clone();
    spec["amount_usd"] = json!("0.000001");
    let r = admin(
        a,
        "PUT",
        path,
        root,
        Some(&spec),
        &format!("If-Match: {}\r\n", etag(&cur)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json()["version"].as_u64().unwrap();
    for (n, g) in nodes.iter().enumerate() {
        let took = applied(g, v);
        eprintln!("node {n}: lowered budget applied {took:?} after the answer");
        assert!(took < Duration::from_secs(5), "node {n} took {took:?}");
        assert_eq!(chat(g, &secret).status, 429, "node {n}");
    }

    // A control plane in its own process, on the same store: its change reaches the gateways.
    let cfg = nodes[0].config_path();
    let cp = Proc::start(
        &bin("tollgate"),
        &[
            "controlplane",
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    let cur = admin(cp.addr, "GET", path, root, None, "");
    assert_eq!(cur.status, 200, "{}", cur.text());
    let mut spec = cur.json()["spec"].clone();
    spec["amount_usd"] = json!("3");
    let r = admin(
        cp.addr,
        "PUT",
        path,
        root,
        Some(&spec),
        &format!("If-Match: {}\r\n", etag(&cur)),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json()["version"].as_u64().unwrap();
    for (n, g) in nodes.iter().enumerate() {
        let took = applied(g, v);
        eprintln!(
            "node {n}: change from the separate control plane applied {took:?} after the answer"
        );
        assert_eq!(chat(g, &secret).status, 200, "node {n}");
    }
}

/// People call the control plane with their IdP's token: groups map to a role; a verified person whose
/// groups grant none gets 403; a forged or foreign token 401. The CLI works against it too.
#[test]
fn oidc_callers_get_the_role_their_groups_grant_and_the_cli_works_against_the_api() {
    use tollgate_tests::idp::TestIdp;
    let m = mock(&["--expect-key", MOCK_KEY]);
    let idp = TestIdp::start();
    let store = TempDir::new("cp-oidc-store");
    let g = gateway(&config_for(
        &format!("http://{}", m.addr),
        "",
        &format!(
            r#"
[store]
dir = "{store}"

[auth]
demo_token = true
key_wait_ms = 3000

[[auth.issuers]]
name = "testidp"
issuer = "{iss}"
audiences = ["tollgate"]

[admin]
listen = "127.0.0.1:0"
roles = {{ admin = ["platform"], finance = ["finance"] }}
"#,
            store = store.0.display(),
            iss = idp.issuer(),
        ),
    ));
    let a = admin_addr(&g);
    let now = jiff::Timestamp::now().as_second();
    let person = |groups: &[&str]| {
        idp.sign(
            &json!({"iss": idp.issuer(), "aud": "tollgate", "sub": "u-fin", "email": "fin@example.com",
                "groups": groups, "iat": now, "exp": now + 600}),
            "rsa-a",
        )
    };
    let finance = person(&["finance"]);
    assert_eq!(
        admin(a, "GET", "/admin/v1/spend", &finance, None, "").status,
        200
    );
    let r = admin(
        a,
        "POST",
        "/admin/v1/policies",
        &finance,
        Some(&json!({"name": "p", "default": true, "allow_models": ["gpt-*"]})),
        "",
    );
    assert_eq!(r.status, 403, "{}", r.text());
    let nobody = person(&["eng"]);
    assert_eq!(
        admin(a, "GET", "/admin/v1/budgets", &nobody, None, "").status,
        403
    );
    // Signed by another key: not a credential at all.
    let mut forged = finance.clone();
    forged.pop();
    forged.push(if finance.ends_with('A') { 'B' } else { 'A' });
    assert_eq!(
        admin(a, "GET", "/admin/v1/budgets", &forged, None, "").status,
        401
    );
    let platform = person(&["platform"]);
    let r = admin(
        a,
        "POST",
        "/admin/v1/policies",
        &platform,
        Some(&json!({"name": "p", "default": true, "allow_models": ["gpt-*"]})),
        "",
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // The audit log names the person, not their token.
    let audit = admin(a, "GET", "/admin/v1/audit", &platform, None, "").text();
    assert!(
        audit.contains("user:u-fin") && !audit.contains(&platform),
        "{audit}"
    );

    // The CLI against the same control plane, with the admin token: create, list, budget set, spend.
    let root = std::fs::read_to_string(store.0.join("admin-token")).unwrap();
    let url = format!("http://{a}");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin("tollgate"))
            .args(args)
            .env("TOLLGATE_ADMIN_TOKEN", root.trim())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let secret = run(&[
        "service-token",
        "create",
        "--url",
        &url,
        "--name",
        "cli-bot",
        "--team",
        "ops",
        "--budget-usd",
        "2",
        "--allow-model",
        "gpt-4o-mini",
    ]);
    let secret = secret.trim();
    assert!(secret.starts_with("tg_"));
    let listed = run(&["service-token", "list", "--url", &url]);
    assert!(
        listed.contains("cli-bot") && !listed.contains(secret),
        "{listed}"
    );
    run(&[
        "budget",
        "set",
        "token-cli-bot",
        "amount_usd=3",
        "--url",
        &url,
    ]);
    let got = run(&["budget", "get", "token-cli-bot", "--url", &url]);
    assert!(got.contains("\"amount_usd\": \"3\""), "{got}");
    let budgets = run(&["budget", "list", "--url", &url]);
    assert!(
        budgets.contains("token-cli-bot") && budgets.contains("api"),
        "{budgets}"
    );
    run(&["spend", "--url", &url, "--group-by", "model"]);
    // A fragment applied: planned, then applied, then unchanged.
    let frag = store.file(
        "team.toml",
        "[[budgets]]\nname = \"team-ops\"\namount_usd = \"10\"\nwindow = \"month\"\nscope = \"group\"\ngroup = \"ops\"\n",
    );
    let plan = run(&[
        "apply",
        "-f",
        frag.to_str().unwrap(),
        "--url",
        &url,
        "--dry-run",
    ]);
    assert!(plan.contains("+ budget team-ops"), "{plan}");
    run(&["apply", "-f", frag.to_str().unwrap(), "--url", &url]);
    let again = run(&["apply", "-f", frag.to_str().unwrap(), "--url", &url]);
    assert!(
        again.contains("0 to create, 0 to update, 0 to delete, 1 unchanged"),
        "{again}"
    );
}
