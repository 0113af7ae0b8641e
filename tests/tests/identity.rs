//! Identity and policy end to end: the real gateway, a real test IdP serving its JWKS over HTTP, tokens
//! signed with real keys, service tokens created and revoked with the real CLI.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_tests::idp::TestIdp;
use tollgate_tests::*;

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
const MSG: &str =
    r#"{"model":"claude-haiku-4-5","max_tokens":50,"messages":[{"role":"user","content":"hi"}]}"#;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn claims(idp: &TestIdp) -> serde_json::Value {
    json!({
        "iss": idp.issuer(), "aud": "tollgate", "sub": "u-alice", "email": "alice@example.com",
        "groups": ["ml", "eng"], "iat": now(), "exp": now() + 600
    })
}

fn bearer(t: &str) -> String {
    format!("Authorization: Bearer {t}\r\n")
}

const POLICIES: &str = r#"
[[policies]]
name = "everyone"
default = true
allow_models = ["gpt-4o-mini", "claude-*"]
max_tokens = 500
on_max_tokens = "refuse"

[[policies]]
name = "ml"
group = "ml"
allow_models = ["gpt-4o"]
deny_models = ["gpt-4.5*"]

[[policies]]
name = "ci-only-haiku"
service_token = "ci-bot"
deny_models = ["gpt-*"]
"#;

/// A mock, a test IdP, and a gateway trusting the IdP, with `POLICIES` and a fresh store.
fn setup(extra_auth: &str) -> (Proc, TestIdp, Gateway, TempDir) {
    let m = mock(&["--expect-key", MOCK_KEY]);
    let idp = TestIdp::start();
    let store = TempDir::new("store");
    let extra = format!(
        r#"
[store]
dir = "{store}"

[auth]
key_wait_ms = 3000
{extra_auth}

[[auth.issuers]]
name = "testidp"
issuer = "{iss}"
audiences = ["tollgate"]
min_refresh_s = 60
{POLICIES}
"#,
        store = store.0.display(),
        iss = idp.issuer(),
    );
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", &extra));
    (m, idp, g, store)
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(bin("tollgate")).args(args).output().unwrap()
}

fn create_token(store: &Path, name: &str, team: &str) -> String {
    let out = cli(&[
        "service-token",
        "create",
        "--store",
        store.to_str().unwrap(),
        "--name",
        name,
        "--team",
        team,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn assert_401(r: &Response, needle: &str) {
    assert_eq!(r.status, 401, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
}

#[test]
fn no_credential_is_401_in_each_api_shape() {
    let (_m, _idp, g, _s) = setup("");
    let r = post(g.addr, "/v1/chat/completions", CHAT, "");
    assert_401(&r, "no credential");
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = post(
        g.addr,
        "/v1/messages",
        MSG,
        "anthropic-version: 2023-06-01\r\n",
    );
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    // Listing models is authenticated too.
    let r = request(g.addr, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 401);
    // A credential that is neither a JWT nor a service token.
    assert_401(
        &post(g.addr, "/v1/chat/completions", CHAT, &bearer("sk-not-ours")),
        "not a JWT",
    );
}

#[test]
fn a_valid_jwt_is_attributed_in_the_log_and_never_echoed() {
    let (_m, idp, g, _s) = setup("");
    let token = idp.sign(&claims(&idp), "rsa-a");
    let r = post(g.addr, "/v1/chat/completions", CHAT, &bearer(&token));
    assert_eq!(r.status, 200, "{}", r.text());
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(r.header("x-request-id").unwrap())),
    ]);
    assert_eq!(line["identity_kind"], "user");
    assert_eq!(line["subject"], "u-alice");
    assert_eq!(line["email"], "alice@example.com");
    assert_eq!(line["groups"], json!(["ml", "eng"]));
    assert_eq!(line["identity_source"], "testidp");
    // The other algorithms (their keys are published from the start of the next fetch).
    idp.set_jwks(&["rsa-a", "ec-p256", "ed25519"]);
    for kid in ["ec-p256", "ed25519"] {
        let t = idp.sign(&claims(&idp), kid);
        let r = post(g.addr, "/v1/chat/completions", CHAT, &bearer(&t));
        assert_eq!(r.status, 200, "{kid}: {}", r.text());
    }
    // Cached verification: the same token again, through the Anthropic SDK's header.
    let r = post(
        g.addr,
        "/v1/messages",
        MSG,
        &format!("x-api-key: {token}\r\nanthropic-version: 2023-06-01\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // Cloudflare Access's header.
    let r = post(
        g.addr,
        "/v1/chat/completions",
        CHAT,
        &format!("Cf-Access-Jwt-Assertion: {token}\r\n"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The token never reaches the provider, the client or the log.
    assert!(!g.output().contains(&token));
}

#[test]
fn bad_tokens_are_refused_with_the_reason() {
    let (_m, idp, g, _s) = setup("");
    let send = |t: &str| post(g.addr, "/v1/chat/completions", CHAT, &bearer(t));
    // Forged: signed by rsa-b, claiming rsa-a's key id.
    idp.set_jwks(&["rsa-a"]);
    let forged = sign_as(
        &claims(&idp),
        "rsa-b",
        "rsa-a",
        jsonwebtoken::Algorithm::RS256,
    );
    assert_401(&send(&forged), "signature does not verify");
    let mut c = claims(&idp);
    c["exp"] = json!(now() - 600);
    assert_401(&send(&idp.sign(&c, "rsa-a")), "expired");
    let mut c = claims(&idp);
    c["nbf"] = json!(now() + 3600);
    assert_401(&send(&idp.sign(&c, "rsa-a")), "not valid yet");
    let mut c = claims(&idp);
    c["aud"] = json!("another-app");
    assert_401(&send(&idp.sign(&c, "rsa-a")), "audience");
    let mut c = claims(&idp);
    c["iss"] = json!("https://evil.example.com");
    assert_401(&send(&idp.sign(&c, "rsa-a")), "not trusted");
    // alg: none, with and without a signature segment.
    let b64 = |v: &serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(&idp))
    );
    assert_401(&send(&none), "algorithm none");
    // Algorithm confusion: HS256 keyed with the IdP's public RSA key.
    let pem = std::fs::read(fixture("rsa-a.pub.pem")).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    h.kid = Some("rsa-a".into());
    let confused = jsonwebtoken::encode(
        &h,
        &claims(&idp),
        &jsonwebtoken::EncodingKey::from_secret(&pem),
    )
    .unwrap();
    assert_401(&send(&confused), "algorithm HS256");
    // Oversized.
    let mut c = claims(&idp);
    c["pad"] = json!("x".repeat(9000));
    assert_401(&send(&idp.sign(&c, "rsa-a")), "limit");
    // None of them got through to the provider, and no token was echoed.
    let out = g.output();
    assert!(!out.contains(&forged) && !out.contains(&confused));
}

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/idp")
        .join(name)
}

/// Signs `claims` with fixture key `key` but names `kid` in the header (a forgery attempt).
fn sign_as(
    claims: &serde_json::Value,
    key: &str,
    kid: &str,
    alg: jsonwebtoken::Algorithm,
) -> String {
    let pem = std::fs::read(fixture(&format!("{key}.pem"))).unwrap();
    let mut h = jsonwebtoken::Header::new(alg);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(
        &h,
        claims,
        &jsonwebtoken::EncodingKey::from_rsa_pem(&pem).unwrap(),
    )
    .unwrap()
}

#[test]
fn a_rotated_key_is_fetched_once_and_unknown_kids_are_rate_limited() {
    let (_m, idp, g, _s) = setup("");
    idp.set_jwks(&["rsa-a"]);
    let ok = idp.sign(&claims(&idp), "rsa-a");
    assert_eq!(
        post(g.addr, "/v1/chat/completions", CHAT, &bearer(&ok)).status,
        200
    );
    let fetches = idp.jwks_fetches();
    // The IdP rotates in rsa-b and starts signing with it: the first request triggers one refresh.
    idp.set_jwks(&["rsa-a", "rsa-b"]);
    let rotated = idp.sign(&claims(&idp), "rsa-b");
    let r = post(g.addr, "/v1/chat/completions", CHAT, &bearer(&rotated));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(idp.jwks_fetches(), fetches + 1);
    // A token naming a key the IdP never published: refused, and no second fetch within min_refresh_s.
    let bogus = sign_as(
        &claims(&idp),
        "rsa-b",
        "never-published",
        jsonwebtoken::Algorithm::RS256,
    );
    assert_401(
        &post(g.addr, "/v1/chat/completions", CHAT, &bearer(&bogus)),
        "key id",
    );
    assert_401(
        &post(g.addr, "/v1/chat/completions", CHAT, &bearer(&bogus)),
        "key id",
    );
    assert_eq!(idp.jwks_fetches(), fetches + 1);
}

#[test]
fn service_tokens_work_and_revocation_applies_within_a_second() {
    let (_m, _idp, g, store) = setup("");
    let token = create_token(&store.0, "ci-bot", "platform");
    assert!(token.starts_with("tg_"));
    // Picked up by the running gateway (file watch), via either SDK's header.
    let deadline = Instant::now() + Duration::from_secs(5);
    let msg = loop {
        let r = post(
            g.addr,
            "/v1/messages",
            MSG,
            &format!("x-api-key: {token}\r\nanthropic-version: 2023-06-01\r\n"),
        );
        if r.status == 200 || Instant::now() > deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(msg.status, 200, "{}", msg.text());
    let line = g.wait_json(&[
        ("event", json!("request")),
        ("request_id", json!(msg.header("x-request-id").unwrap())),
    ]);
    assert_eq!(line["identity_kind"], "service");
    assert_eq!(line["subject"], "ci-bot");
    assert_eq!(line["groups"], json!(["platform"]));
    assert_eq!(line["identity_source"], "service-token");
    assert!(line["token_id"].as_str().unwrap().starts_with("st_"));
    // Its own policy denies gpt-*.
    let r = post(g.addr, "/v1/chat/completions", CHAT, &bearer(&token));
    assert_eq!(r.status, 403);
    assert!(r.text().contains("ci-only-haiku"), "{}", r.text());

    let out = cli(&[
        "service-token",
        "revoke",
        "--store",
        store.0.to_str().unwrap(),
        "ci-bot",
    ]);
    assert!(out.status.success());
    let revoked_at = Instant::now();
    let r = loop {
        let r = post(
            g.addr,
            "/v1/messages",
            MSG,
            &format!("x-api-key: {token}\r\nanthropic-version: 2023-06-01\r\n"),
        );
        if r.status == 401 || revoked_at.elapsed() > Duration::from_secs(5) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(r.status, 401, "revocation never applied");
    assert!(r.text().contains("revoked"), "{}", r.text());
    assert!(!g.output().contains(&token));
    // An unknown token of the right shape.
    let fake = format!("tg_{}", "A".repeat(43));
    assert_401(
        &post(g.addr, "/v1/chat/completions", CHAT, &bearer(&fake)),
        "unknown service token",
    );
}

#[test]
fn policies_deny_by_name_and_cap_max_tokens() {
    let (m, idp, g, _s) = setup("");
    let send = |c: &serde_json::Value, body: &str| {
        post(
            g.addr,
            "/v1/chat/completions",
            body,
            &bearer(&idp.sign(c, "rsa-a")),
        )
    };
    let mut nobody = claims(&idp);
    nobody["groups"] = json!([]);
    let big = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    // Not in the default list: refused, naming the policy, in the OpenAI shape.
    let r = send(&nobody, big);
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["code"], "policy_denied");
    assert!(r.text().contains("everyone"), "{}", r.text());
    // The ml group extends it.
    assert_eq!(send(&claims(&idp), big).status, 200);
    // ...but its deny beats any allow at its level.
    let r = send(
        &claims(&idp),
        r#"{"model":"gpt-4.5-preview","messages":[]}"#,
    );
    assert_eq!(r.status, 403);
    assert!(r.text().contains("`ml`"), "{}", r.text());
    // A missing groups claim means no groups: only the default policy applies.
    let mut no_groups = claims(&idp);
    no_groups.as_object_mut().unwrap().remove("groups");
    assert_eq!(send(&no_groups, big).status, 403);
    assert_eq!(send(&no_groups, CHAT).status, 200);
    // The cap: over it is refused; absent, it is written into the request.
    let r = send(
        &nobody,
        r#"{"model":"gpt-4o-mini","max_tokens":501,"messages":[]}"#,
    );
    assert_eq!(r.status, 403);
    assert!(r.text().contains("cap of 500"), "{}", r.text());
    assert_eq!(send(&nobody, CHAT).status, 200);
    let sent = mock_requests(&m);
    let last = sent.last().unwrap();
    let body: serde_json::Value = serde_json::from_str(last["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["max_completion_tokens"], 500);
    // Anthropic errors come in Anthropic's shape.
    let r = post(
        g.addr,
        "/v1/messages",
        r#"{"model":"claude-haiku-4-5","max_tokens":9000,"messages":[]}"#,
        &format!(
            "x-api-key: {}\r\nanthropic-version: 2023-06-01\r\n",
            idp.sign(&nobody, "rsa-a")
        ),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"]["type"], "permission_error");
    // /v1/models lists only what the caller may use.
    let t = idp.sign(&nobody, "rsa-a");
    let r = request(
        g.addr,
        format!("GET /v1/models HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {t}\r\n\r\n")
            .as_bytes(),
    );
    assert_eq!(r.status, 200);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    // `fast` is an alias of gpt-4o-mini, which the default policy allows; gpt-4o-mini and the claude
    // models are priced models the glob routes serve; gpt-4o (its own policy's) is not listed.
    assert_eq!(ids[..2], ["fast", "gpt-4o-mini"]);
    assert!(ids.len() > 3, "{ids:?}");
    assert!(ids[2..].iter().all(|m| m.starts_with("claude-")), "{ids:?}");
}

#[test]
fn an_expired_service_token_is_refused_as_expired() {
    let (_m, _idp, g, store) = setup("");
    let out = cli(&[
        "service-token",
        "create",
        "--store",
        store.0.to_str().unwrap(),
        "--name",
        "short-lived",
        "--team",
        "platform",
        "--expires-in",
        "1s",
    ]);
    assert!(out.status.success());
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    // Wait out its second; the gateway picks the file up within 250 ms either way.
    std::thread::sleep(Duration::from_millis(1300));
    assert_401(
        &post(
            g.addr,
            "/v1/messages",
            MSG,
            &format!("x-api-key: {token}\r\n"),
        ),
        "service token 'short-lived' expired",
    );
}

#[test]
fn an_air_gapped_issuer_reads_its_keys_from_a_file() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    // The issuer URL is never contacted: keys come from the JWKS file.
    let extra = format!(
        r#"
[auth]

[[auth.issuers]]
name = "offline"
issuer = "https://idp.internal.example"
audiences = ["tollgate"]
jwks_file = "{}"
"#,
        fixture("ec-p256.jwk.json").display()
    );
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", &extra));
    g.wait_json(&[
        ("event", json!("keys_loaded")),
        ("issuer", json!("offline")),
    ]);
    let pem = std::fs::read(fixture("ec-p256.pem")).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some("ec-p256".into());
    let claims = json!({"iss": "https://idp.internal.example", "aud": "tollgate", "sub": "bob", "exp": now() + 60});
    let t = jsonwebtoken::encode(
        &h,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap(),
    )
    .unwrap();
    let r = post(g.addr, "/v1/chat/completions", CHAT, &bearer(&t));
    assert_eq!(r.status, 200, "{}", r.text());
    // Without the [auth] default of the test harness, a request without a credential is refused.
    assert_eq!(post(g.addr, "/v1/chat/completions", CHAT, "").status, 401);
}

fn chat_for(model: &str) -> String {
    format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#)
}

#[test]
fn a_deny_on_a_model_covers_its_dated_snapshots_and_aliases_to_them() {
    let m = mock(&["--expect-key", MOCK_KEY]);
    // Anonymous callers (no [auth]): the default policy is theirs.
    let extra = r#"
[[routes]]
model = "gpt-4o-2024-08-06"
provider = "openai"

[[routes]]
model = "smart"
provider = "openai"
upstream_model = "gpt-4o-2024-11-20"

[[policies]]
name = "no-4o"
default = true
deny_models = ["gpt-4o"]
"#;
    let g = gateway(&config_for(&format!("http://{}", m.addr), "", extra));
    let send = |model: &str| post(g.addr, "/v1/chat/completions", &chat_for(model), "");
    // The dated snapshot is gpt-4o on the price sheet; so is the model the alias `smart` sends.
    for model in ["gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-2024-11-20", "smart"] {
        let r = send(model);
        assert_eq!(r.status, 403, "{model}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "policy_denied");
        assert!(r.text().contains("no-4o"), "{}", r.text());
    }
    // Another model (whose name starts the same) is not gpt-4o.
    assert_eq!(send("gpt-4o-mini").status, 200);
    assert_eq!(send("fast").status, 200);
    // Nothing denied reached the provider.
    for sent in mock_requests(&m) {
        let body: serde_json::Value = serde_json::from_str(sent["body"].as_str().unwrap()).unwrap();
        assert_eq!(body["model"], "gpt-4o-mini", "{body}");
    }
    // /v1/models agrees with the decision: neither the snapshot route nor the alias to one is listed.
    let r = request(g.addr, b"GET /v1/models HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(r.status, 200);
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    // The priced models the glob routes serve are listed too, gpt-4o (the denied model) not among them.
    assert_eq!(ids[0], "fast");
    assert!(ids.contains(&"gpt-4o-mini".to_owned()), "{ids:?}");
    for denied in ["gpt-4o", "gpt-4o-2024-08-06", "smart"] {
        assert!(!ids.contains(&denied.to_owned()), "{denied} in {ids:?}");
    }
}

#[test]
fn an_attribute_from_a_jwt_claim_applies_its_budget_whatever_header_is_sent() {
    // The budget is far too small for any request: where it applies, the request gets 429.
    let (_m, idp, g, _s) = setup(
        r#"
[attributes]
project = { from = "claim:project", required = true }

[[budgets]]
name = "apollo"
amount_usd = "0.000001"
window = "week"
scope = "everyone"
attributes = { project = "apollo" }
"#,
    );
    let send = |project: Option<&str>, headers: &str| {
        let mut c = claims(&idp);
        if let Some(p) = project {
            c["project"] = json!(p);
        }
        post(
            g.addr,
            "/v1/chat/completions",
            CHAT,
            &format!("{}{headers}", bearer(&idp.sign(&c, "rsa-a"))),
        )
    };
    // The claim says apollo: the budget applies, whatever the client's headers say.
    let r = send(Some("apollo"), "");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-tollgate-budget"), Some("apollo"));
    let r = send(Some("apollo"), "x-tollgate-attr-project: zeus\r\n");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-tollgate-budget"), Some("apollo"));
    // Another project's caller is not under it, even claiming apollo in a header.
    let r = send(Some("zeus"), "x-tollgate-attr-project: apollo\r\n");
    assert_eq!(r.status, 200, "{}", r.text());
    // A caller whose token lacks the required claim is refused, naming the attribute and the claim.
    let r = send(None, "x-tollgate-attr-project: zeus\r\n");
    assert_eq!(r.status, 400, "{}", r.text());
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        msg.contains("\"project\"") && msg.contains("claim"),
        "{msg}"
    );
}
