//! The admin API through real HTTP on port 0, over the memory store and a temporary configuration file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tollgate_controlplane::{bootstrap_admin_token, start, Handle, Hooks, Options};
use tollgate_core::catalog::Role;
use tollgate_core::config::AdminConfig;
use tollgate_core::store::mem::MemStore;
use tollgate_core::store::Store;

#[derive(Default)]
struct Seen(Mutex<Vec<u64>>);

impl Hooks for Seen {
    fn changed(&self, version: u64) {
        self.0.lock().unwrap().push(version);
    }
}

struct Server {
    handle: Option<Handle>,
    store: Arc<MemStore>,
    seen: Arc<Seen>,
    admin: String,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const BASE: &str = r#"
[[providers]]
name = "openai"
kind = "openai"
api_key_env = "TG_TEST_UNSET_KEY"

[[routes]]
model = "gpt-4o-mini"
provider = "openai"

[[budgets]]
name = "from-file"
amount_usd = "10"
window = "day"
scope = "everyone"
"#;

fn server() -> Server {
    let mut b = [0u8; 8];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (std::process::id() as u8).wrapping_add(i as u8);
    }
    let dir = std::env::temp_dir().join(format!(
        "tg-cp-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(&path, format!("[store]\ndir = {:?}\n{BASE}", dir.join("s"))).unwrap();
    let store = Arc::new(MemStore::new());
    let admin = bootstrap_admin_token(store.as_ref(), "root", Role::Admin).unwrap();
    let seen = Arc::new(Seen::default());
    let opts = Options {
        admin: AdminConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..AdminConfig::default()
        },
        config_path: path,
        auth: Default::default(),
    };
    let handle = start(
        opts,
        Arc::clone(&store) as Arc<dyn Store>,
        Arc::clone(&seen) as Arc<dyn Hooks>,
    )
    .unwrap();
    Server {
        handle: Some(handle),
        store,
        seen,
        admin: admin.expose().to_owned(),
        dir,
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

impl Server {
    fn addr(&self) -> SocketAddr {
        self.handle.as_ref().unwrap().addr()
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Resp {
        let mut s = TcpStream::connect(self.addr()).unwrap();
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
        if let Some(t) = token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if !body.is_empty() || method != "GET" {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body);
        s.write_all(req.as_bytes()).unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).unwrap();
        let text = String::from_utf8_lossy(&out).into_owned();
        let (head, rest) = text.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_owned()
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    fn admin(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
        self.call(method, path, Some(&self.admin.clone()), headers, body)
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

const BUDGET: &str = r#"{"name":"ci","amount_usd":"2.5","window":"day","scope":"everyone"}"#;

#[test]
fn budgets_etags_preconditions_and_validation() {
    let s = server();
    let r = s.admin("POST", "/admin/v1/budgets", &[], BUDGET);
    assert_eq!(r.status, 201, "{}", r.body);
    let etag = r.header("etag").unwrap().to_owned();
    assert_eq!(r.header("location"), Some("/admin/v1/budgets/ci"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v1 = r.json()["version"].as_u64().unwrap();
    assert_eq!(etag, format!("\"{v1}\""));
    assert_eq!(*s.seen.0.lock().unwrap(), vec![v1]);

    let g = s.admin("GET", "/admin/v1/budgets/ci", &[], "");
    assert_eq!(g.status, 200);
    assert_eq!(g.header("etag"), Some(etag.as_str()));
    assert_eq!(g.json()["spec"]["amount_usd"], "2.5");

    let list = s.admin("GET", "/admin/v1/budgets", &[], "");
    let items = list.json()["items"].as_array().unwrap().clone();
    assert_eq!(items[0]["owner"], "file");
    assert_eq!(items[0]["name"], "from-file");
    assert_eq!(items[1]["owner"], "api");
    let page = s.admin("GET", "/admin/v1/budgets?limit=1", &[], "");
    let cursor = page.json()["next_cursor"].as_str().unwrap().to_owned();
    let page2 = s.admin(
        "GET",
        &format!("/admin/v1/budgets?limit=1&cursor={cursor}"),
        &[],
        "",
    );
    assert_eq!(page2.json()["items"][0]["name"], "ci", "{}", page2.body);
    assert!(page2.json()["next_cursor"].is_null());

    let new = BUDGET.replace("2.5", "3");
    let no_if = s.admin("PUT", "/admin/v1/budgets/ci", &[], &new);
    assert_eq!(no_if.status, 428, "{}", no_if.body);
    assert_eq!(
        no_if.header("content-type"),
        Some("application/problem+json")
    );
    let a = s.admin("PUT", "/admin/v1/budgets/ci", &[("If-Match", &etag)], &new);
    let b = s.admin("PUT", "/admin/v1/budgets/ci", &[("If-Match", &etag)], &new);
    let mut codes = [a.status, b.status];
    codes.sort_unstable();
    assert_eq!(codes, [200, 412], "{} / {}", a.body, b.body);
    assert_eq!(s.seen.0.lock().unwrap().len(), 2);

    let bad = s.admin(
        "POST",
        "/admin/v1/budgets",
        &[],
        &BUDGET.replace("2.5", "ten").replace("\"ci\"", "\"ci2\""),
    );
    assert_eq!(bad.status, 422, "{}", bad.body);
    assert_eq!(
        bad.json()["errors"][0]["field"],
        "amount_usd",
        "{}",
        bad.body
    );
    assert_eq!(
        bad.json()["type"],
        "https://tollgate.dev/problems/validation_failed"
    );

    let unknown = s.admin(
        "POST",
        "/admin/v1/budgets",
        &[],
        r#"{"name":"x","amount_usd":"1","window":"day","scope":"everyone","colour":"red"}"#,
    );
    assert!(
        unknown.status == 400 || unknown.status == 422,
        "{}",
        unknown.body
    );
    assert_eq!(
        unknown.json()["errors"][0]["field"],
        "colour",
        "{}",
        unknown.body
    );

    let file = s.admin(
        "POST",
        "/admin/v1/budgets",
        &[],
        &BUDGET.replace("\"ci\"", "\"from-file\""),
    );
    assert_eq!(file.status, 409, "{}", file.body);
    assert_eq!(
        file.json()["type"],
        "https://tollgate.dev/problems/owned_by_file"
    );

    let dup = s.admin("POST", "/admin/v1/budgets", &[], BUDGET);
    assert_eq!(dup.status, 409);

    let st = s.admin("GET", "/admin/v1/budgets/ci/state", &[], "");
    assert_eq!(st.status, 200, "{}", st.body);
    assert_eq!(st.json()["source"], "config");
    assert!(st.json()["spent_usd"].is_null());

    let cur = s.admin("GET", "/admin/v1/budgets/ci", &[], "");
    let del = s.admin(
        "DELETE",
        "/admin/v1/budgets/ci",
        &[("If-Match", cur.header("etag").unwrap())],
        "",
    );
    assert_eq!(del.status, 204, "{}", del.body);
    assert_eq!(s.admin("GET", "/admin/v1/budgets/ci", &[], "").status, 404);

    // Junk is a 4xx problem, never a 5xx.
    for (m, p, b) in [
        ("POST", "/admin/v1/budgets", "{"),
        ("POST", "/admin/v1/budgets", "[]"),
        ("GET", "/admin/v1/budgets/a%20b", ""),
        ("GET", "/admin/v1/nope", ""),
        ("PATCH", "/admin/v1/budgets", "{}"),
        ("GET", "/admin/v1/budgets?limit=0", ""),
        ("GET", "/admin/v1/budgets?cursor=zz", ""),
    ] {
        let r = s.admin(m, p, &[], b);
        assert!(
            (400..500).contains(&r.status),
            "{m} {p}: {} {}",
            r.status,
            r.body
        );
        assert_eq!(
            r.header("content-type"),
            Some("application/problem+json"),
            "{m} {p}"
        );
    }
    let big = format!("{{\"name\":\"{}\"}}", "a".repeat(70_000));
    assert_eq!(s.admin("POST", "/admin/v1/budgets", &[], &big).status, 413);
}

#[test]
fn service_tokens_show_their_secret_once() {
    let s = server();
    let body = json!({
        "name": "ci-bot", "team": "platform", "expires_in": "90d",
        "budget": {"amount_usd": "5", "window": "day"},
        "policy": {"allow_models": ["gpt-*"]}
    })
    .to_string();
    let r = s.admin("POST", "/admin/v1/service-tokens", &[], &body);
    assert_eq!(r.status, 201, "{}", r.body);
    let secret = r.json()["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("tg_"));
    let hash = tollgate_core::auth::service_tokens::hash_of(&secret);
    let snap = tollgate_core::catalog::read(s.store.as_ref()).unwrap();
    let b = &snap.objects[&(
        tollgate_core::catalog::Kind::Budget,
        "token-ci-bot".to_owned(),
    )];
    assert_eq!(b.spec["scope"], "service_token");
    assert_eq!(b.spec["service_token"], "ci-bot");
    assert!(snap.objects.contains_key(&(
        tollgate_core::catalog::Kind::Policy,
        "token-ci-bot".to_owned()
    )));
    assert_eq!(snap.version, 2, "token, budget and policy in one write");

    for path in [
        "/admin/v1/service-tokens",
        "/admin/v1/service-tokens/ci-bot",
        "/admin/v1/audit",
    ] {
        let r = s.admin("GET", path, &[], "");
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        assert!(
            !r.body.contains(&secret) && !r.body.contains(&hash),
            "{path} leaks: {}",
            r.body
        );
    }

    // A data-plane token is not an admin credential.
    let dp = s.call("GET", "/admin/v1/budgets", Some(&secret), &[], "");
    assert_eq!(dp.status, 401);
    assert_eq!(dp.json()["detail"], "not an admin credential");

    let rot = s.admin(
        "POST",
        "/admin/v1/service-tokens/ci-bot/rotate",
        &[],
        r#"{"overlap":"1h"}"#,
    );
    assert_eq!(rot.status, 200, "{}", rot.body);
    let new = rot.json()["secret"].as_str().unwrap().to_owned();
    assert!(new.starts_with("tg_") && new != secret);
    let rev = s.admin("POST", "/admin/v1/service-tokens/ci-bot/revoke", &[], "");
    assert_eq!(rev.status, 200, "{}", rev.body);
    assert_eq!(rev.json()["status"], "revoked");
    assert!(!rev.body.contains(&new));
    assert_eq!(
        s.admin("POST", "/admin/v1/service-tokens/nope/revoke", &[], "")
            .status,
        404
    );
}

#[test]
fn idempotency_keys_replay_and_refuse_another_body() {
    let s = server();
    let k = [("Idempotency-Key", "abc-1")];
    let a = s.admin("POST", "/admin/v1/budgets", &k, BUDGET);
    assert_eq!(a.status, 201);
    let b = s.admin("POST", "/admin/v1/budgets", &k, BUDGET);
    assert_eq!(b.status, 201, "{}", b.body);
    assert_eq!(b.header("idempotent-replayed"), Some("true"));
    assert_eq!(a.json()["version"], b.json()["version"]);
    assert_eq!(a.json()["name"], b.json()["name"]);
    let c = s.admin("POST", "/admin/v1/budgets", &k, &BUDGET.replace("2.5", "3"));
    assert_eq!(c.status, 422);
    assert_eq!(
        c.json()["type"],
        "https://tollgate.dev/problems/idempotency_key_reused"
    );

    let t = json!({"name": "t1", "team": "x"}).to_string();
    let k2 = [("Idempotency-Key", "tok-1")];
    let first = s.admin("POST", "/admin/v1/service-tokens", &k2, &t);
    let again = s.admin("POST", "/admin/v1/service-tokens", &k2, &t);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(first.json()["token"]["id"], again.json()["token"]["id"]);
    assert!(again.json().get("secret").is_none());
    assert_eq!(s.seen.0.lock().unwrap().len(), 2);
}

#[test]
fn callers_need_a_role_and_refusals_are_audited() {
    let s = server();
    let none = s.call("GET", "/admin/v1/budgets", None, &[], "");
    assert_eq!(none.status, 401);
    assert!(none
        .header("www-authenticate")
        .unwrap()
        .starts_with("Bearer"));
    let junk = s.call("GET", "/admin/v1/budgets", Some("nonsense"), &[], "");
    assert_eq!(junk.status, 401);

    let viewer = s.admin(
        "POST",
        "/admin/v1/service-tokens",
        &[],
        &json!({"name": "look", "team": "ops", "role": "viewer"}).to_string(),
    );
    assert_eq!(viewer.status, 201, "{}", viewer.body);
    let vt = viewer.json()["secret"].as_str().unwrap().to_owned();
    assert_eq!(
        s.call("GET", "/admin/v1/budgets", Some(&vt), &[], "")
            .status,
        200
    );
    let denied = s.call("POST", "/admin/v1/budgets", Some(&vt), &[], BUDGET);
    assert_eq!(denied.status, 403, "{}", denied.body);
    assert_eq!(
        s.call("GET", "/admin/v1/audit", Some(&vt), &[], "").status,
        403
    );

    let audit = s.admin("GET", "/admin/v1/audit?limit=1000", &[], "");
    let items = audit.json()["items"].as_array().unwrap().clone();
    let denials: Vec<&Value> = items.iter().filter(|e| e["action"] == "denied").collect();
    assert_eq!(denials.len(), 4, "{}", audit.body);
    assert!(denials.iter().any(|e| e["outcome"] == 403
        && e["detail"]
            .as_str()
            .unwrap()
            .starts_with("POST /admin/v1/budgets")));
    assert!(!audit.body.contains(&vt) && !audit.body.contains("nonsense"));

    let h = s.call("GET", "/admin/v1/healthz", None, &[], "");
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "ok");
    assert!(h.json()["catalog_version"].as_u64().unwrap() >= 1);
}

#[test]
fn the_openapi_document_is_3_1_and_lists_every_path() {
    let s = server();
    let r = s.call("GET", "/admin/v1/openapi.json", None, &[], "");
    assert_eq!(r.status, 200);
    let doc = r.json();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1"),
        "{}",
        doc["openapi"]
    );
    for p in [
        "/admin/v1/healthz",
        "/admin/v1/openapi.json",
        "/admin/v1/policies",
        "/admin/v1/policies/{name}",
        "/admin/v1/budgets",
        "/admin/v1/budgets/{name}",
        "/admin/v1/budgets/{name}/state",
        "/admin/v1/price-overrides",
        "/admin/v1/price-overrides/{name}",
        "/admin/v1/service-tokens",
        "/admin/v1/service-tokens/{name}",
        "/admin/v1/service-tokens/{name}/revoke",
        "/admin/v1/service-tokens/{name}/rotate",
        "/admin/v1/audit",
    ] {
        assert!(doc["paths"].get(p).is_some(), "{p} missing");
    }
    assert!(doc["components"]["schemas"].get("Problem").is_some());
    assert!(doc["components"]["securitySchemes"].get("bearer").is_some());
}
