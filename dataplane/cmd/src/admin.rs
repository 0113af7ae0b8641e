//! The operator's CLI against a running control plane (`--url`): `tollgate budget`, `tollgate policy`,
//! `tollgate apply -f FILE`, and the `--url` forms of `tollgate service-token` and `tollgate spend`.
//! Tables for people, `--json` for scripts.
//!
//! Owns: [`Client`] (blocking HTTP with the caller's credential: `--token`, `TOLLGATE_ADMIN_TOKEN`, or the
//! access token `tollgate login` stored) and the commands' printing. `apply` plans from the file and the
//! API's objects (create, update with `If-Match`, unchanged; `--prune` removes API objects the file no
//! longer has) and applies the plan; objects the file of the gateway owns are never touched (409).
//!
//! Fails: every non-2xx answer is printed with its problem details (status, title, each field) and the
//! command exits non-zero. Cost: one request per object, operator side.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};

/// Where the control plane is and who calls it.
#[derive(clap::Args, Debug, Clone)]
pub struct Target {
    /// The control plane's base URL, e.g. http://127.0.0.1:8081.
    #[arg(long, env = "TOLLGATE_URL")]
    pub url: String,
    /// An admin service token; else `TOLLGATE_ADMIN_TOKEN`; else the access token of `tollgate login`.
    #[arg(long, env = "TOLLGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// A blocking client of the control plane.
pub struct Client {
    base: String,
    bearer: String,
    agent: ureq::Agent,
}

/// One answer: status, ETag, body.
pub struct Answer {
    pub status: u16,
    pub etag: Option<String>,
    pub body: Value,
}

impl Client {
    pub fn new(t: &Target) -> anyhow::Result<Client> {
        let bearer = match &t.token {
            Some(tok) => tok.clone(),
            None => tollgate_core::auth::login::token(&tollgate_core::auth::login::TokenOptions {
                issuer: None,
                id_token: false,
            })
            .map_err(|e| {
                anyhow::anyhow!(
                    "no credential: pass --token or set TOLLGATE_ADMIN_TOKEN, or sign in with `tollgate login` ({e})"
                )
            })?,
        };
        Ok(Client {
            base: t.url.trim_end_matches('/').to_owned(),
            bearer,
            agent: ureq::AgentBuilder::new()
                .timeout(std::time::Duration::from_secs(30))
                .build(),
        })
    }

    /// Sends one request; 4xx and 5xx answers are returned, not errors.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .agent
            .request(method, &url)
            .set("authorization", &format!("Bearer {}", self.bearer))
            .set("accept", "application/json");
        if let Some(m) = if_match {
            req = req.set("if-match", m);
        }
        let sent = match body {
            Some(b) => req
                .set("content-type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        let resp = match sent {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(anyhow::anyhow!("{method} {url}: {e}")),
        };
        let status = resp.status();
        let etag = resp.header("etag").map(str::to_owned);
        let text = resp.into_string().unwrap_or_default();
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        Ok(Answer { status, etag, body })
    }

    /// [`Client::call`], with a non-2xx answer turned into an error that prints its problem details.
    pub fn ok(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let a = self.call(method, path, body, if_match)?;
        if (200..300).contains(&a.status) {
            Ok(a)
        } else {
            Err(anyhow::anyhow!("{}", problem_text(method, path, &a)))
        }
    }

    /// Every item of a paginated list.
    pub fn list(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let sep = if path.contains('?') { '&' } else { '?' };
            let page = match &cursor {
                Some(c) => format!("{path}{sep}limit=100&cursor={}", encode(c)),
                None => format!("{path}{sep}limit=100"),
            };
            let a = self.ok("GET", &page, None, None)?;
            match a.body.get("items").and_then(Value::as_array) {
                Some(items) => out.extend(items.iter().cloned()),
                None => anyhow::bail!("GET {page}: the answer has no items list"),
            }
            cursor = a
                .body
                .get("next_cursor")
                .and_then(Value::as_str)
                .map(str::to_owned);
            if cursor.is_none() {
                return Ok(out);
            }
        }
    }
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A problem-details answer as lines.
pub fn problem_text(method: &str, path: &str, a: &Answer) -> String {
    let title = a
        .body
        .get("title")
        .and_then(Value::as_str)
        .unwrap_or("request failed");
    let mut s = format!("{method} {path}: {} {title}", a.status);
    if let Some(d) = a.body.get("detail").and_then(Value::as_str) {
        s.push_str(&format!(": {d}"));
    }
    if let Some(errs) = a.body.get("errors").and_then(Value::as_array) {
        for e in errs {
            let field = e.get("field").and_then(Value::as_str).unwrap_or("");
            let reason = e.get("reason").and_then(Value::as_str).unwrap_or("");
            s.push_str(&format!("\n  {field}: {reason}"));
        }
    }
    s
}

/// Prints `rows` as an aligned table with `headers`.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = width.get_mut(i) {
                *w = (*w).max(c.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            let w = width.get(i).copied().unwrap_or(0);
            s.push_str(&format!("{c:<w$}  "));
        }
        println!("{}", s.trim_end());
    };
    line(headers.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r.clone());
    }
}

fn text(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Which collection a kind lives at.
pub fn collection(kind: &str) -> &'static str {
    match kind {
        "budget" => "/admin/v1/budgets",
        "policy" => "/admin/v1/policies",
        "price_override" => "/admin/v1/price-overrides",
        _ => "/admin/v1/service-tokens",
    }
}

/// `tollgate budget|policy list`.
pub fn list(c: &Client, kind: &str, json_out: bool) -> anyhow::Result<()> {
    let items = c.list(collection(kind))?;
    if json_out {
        for i in &items {
            println!("{i}");
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            let spec = i.get("spec").cloned().unwrap_or(Value::Null);
            let what = match kind {
                "budget" => format!(
                    "${} per {} ({})",
                    text(&spec, "amount_usd"),
                    text(&spec, "window"),
                    text(&spec, "scope")
                ),
                _ => format!("allow {}", text(&spec, "allow_models")),
            };
            vec![text(i, "name"), text(i, "owner"), text(i, "version"), what]
        })
        .collect();
    table(&["name", "owner", "version", "definition"], &rows);
    Ok(())
}

/// `tollgate budget|policy get NAME`.
pub fn get(c: &Client, kind: &str, name: &str) -> anyhow::Result<()> {
    let a = c.ok("GET", &format!("{}/{name}", collection(kind)), None, None)?;
    println!("{}", serde_json::to_string_pretty(&a.body)?);
    Ok(())
}

/// `tollgate budget|policy delete NAME`: reads the version first, deletes that version only.
pub fn delete(c: &Client, kind: &str, name: &str) -> anyhow::Result<()> {
    let path = format!("{}/{name}", collection(kind));
    let a = c.ok("GET", &path, None, None)?;
    let etag = a.etag.context("the answer has no ETag")?;
    c.ok("DELETE", &path, None, Some(&etag))?;
    eprintln!("deleted {kind} {name}");
    Ok(())
}

/// `tollgate budget set NAME FIELD=VALUE...`: read, change the fields, write with `If-Match` (a concurrent
/// change makes it fail with 412 rather than be overwritten).
pub fn set(c: &Client, kind: &str, name: &str, fields: &[String]) -> anyhow::Result<()> {
    let path = format!("{}/{name}", collection(kind));
    let a = c.ok("GET", &path, None, None)?;
    let etag = a.etag.context("the answer has no ETag")?;
    let mut spec = a.body.get("spec").cloned().unwrap_or(json!({}));
    for f in fields {
        let (k, v) = f
            .split_once('=')
            .with_context(|| format!("{f:?}: write FIELD=VALUE"))?;
        // A JSON value where the text is one (numbers, arrays, booleans), else a string.
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
        let value = match (k, value) {
            ("amount_usd", Value::Number(n)) => Value::String(n.to_string()),
            (_, v) => v,
        };
        if let Some(o) = spec.as_object_mut() {
            o.insert(k.to_owned(), value);
        }
    }
    let a = c.ok("PUT", &path, Some(&spec), Some(&etag))?;
    eprintln!("{kind} {name} is at version {}", text(&a.body, "version"));
    Ok(())
}

/// `tollgate budget state NAME`.
pub fn state(c: &Client, name: &str, json_out: bool) -> anyhow::Result<()> {
    let a = c.ok(
        "GET",
        &format!("/admin/v1/budgets/{name}/state"),
        None,
        None,
    )?;
    if json_out {
        println!("{}", a.body);
    } else {
        println!("{}", serde_json::to_string_pretty(&a.body)?);
    }
    Ok(())
}

/// The objects a file declares, per kind and name, as the API takes them.
fn declared(file: &Path) -> anyhow::Result<BTreeMap<(String, String), Value>> {
    // The file is checked exactly as `tollgate check-config --fragment` checks it first.
    tollgate_core::Config::load_fragment(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    let text = std::fs::read_to_string(file)?;
    let raw: tollgate_core::config::RawConfig =
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let mut out = BTreeMap::new();
    for p in raw.policies {
        out.insert(("policy".into(), p.name.clone()), serde_json::to_value(&p)?);
    }
    for b in raw.budgets {
        out.insert(("budget".into(), b.name.clone()), serde_json::to_value(&b)?);
    }
    for o in raw.pricing.overrides {
        let Some(name) = o.name.clone() else {
            anyhow::bail!(
                "{}: every [[pricing.overrides]] entry applied through the API needs a name",
                file.display()
            );
        };
        out.insert(("price_override".into(), name), serde_json::to_value(&o)?);
    }
    Ok(out)
}

/// Drops nulls, so a spec read back compares equal to the one declared.
fn normal(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| {
                    !v.is_null()
                        && v.as_array().is_none_or(|a| !a.is_empty())
                        && v.as_object().is_none_or(|o| !o.is_empty())
                })
                .map(|(k, v)| (k.clone(), normal(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// `tollgate apply -f FILE`: plan, print, and (unless `dry_run`) apply.
pub fn apply(c: &Client, file: &Path, prune: bool, dry_run: bool) -> anyhow::Result<()> {
    let want = declared(file)?;
    let mut have: BTreeMap<(String, String), Value> = BTreeMap::new();
    for kind in ["policy", "budget", "price_override"] {
        for item in c.list(collection(kind))? {
            let name = text(&item, "name");
            have.insert((kind.to_owned(), name), item);
        }
    }
    enum Step {
        Create(Value),
        Update(Value, String),
        Delete(String),
    }
    let mut plan: Vec<((String, String), Step)> = Vec::new();
    let mut unchanged = 0;
    for (key, spec) in &want {
        match have.get(key) {
            None => plan.push((key.clone(), Step::Create(spec.clone()))),
            Some(item) if text(item, "owner") == "file" => anyhow::bail!(
                "{} {:?} is defined in the gateway's configuration file; it cannot be applied through the API",
                key.0,
                key.1
            ),
            Some(item) => {
                let current = item.get("spec").cloned().unwrap_or(Value::Null);
                if normal(&current) == normal(spec) {
                    unchanged += 1;
                } else {
                    let etag = format!("\"{}\"", text(item, "version"));
                    plan.push((key.clone(), Step::Update(spec.clone(), etag)));
                }
            }
        }
    }
    if prune {
        for (key, item) in &have {
            if text(item, "owner") == "api" && !want.contains_key(key) {
                let etag = format!("\"{}\"", text(item, "version"));
                plan.push((key.clone(), Step::Delete(etag)));
            }
        }
    }
    for ((kind, name), step) in &plan {
        let sign = match step {
            Step::Create(_) => '+',
            Step::Update(..) => '~',
            Step::Delete(_) => '-',
        };
        println!("{sign} {kind} {name}");
    }
    println!(
        "plan: {} to create, {} to update, {} to delete, {unchanged} unchanged",
        plan.iter()
            .filter(|p| matches!(p.1, Step::Create(_)))
            .count(),
        plan.iter()
            .filter(|p| matches!(p.1, Step::Update(..)))
            .count(),
        plan.iter()
            .filter(|p| matches!(p.1, Step::Delete(_)))
            .count(),
    );
    if dry_run {
        return Ok(());
    }
    for ((kind, name), step) in plan {
        let coll = collection(&kind);
        match step {
            Step::Create(spec) => c.ok("POST", coll, Some(&spec), None)?,
            Step::Update(spec, etag) => {
                c.ok("PUT", &format!("{coll}/{name}"), Some(&spec), Some(&etag))?
            }
            Step::Delete(etag) => c.ok("DELETE", &format!("{coll}/{name}"), None, Some(&etag))?,
        };
    }
    println!("applied");
    Ok(())
}

/// `tollgate service-token create --url`: the secret (shown once).
pub fn create_token(
    c: &Client,
    name: &str,
    team: &str,
    expires_in: Option<&str>,
    attributes: &BTreeMap<String, String>,
    budget: Option<(String, String)>,
    allow_models: &[String],
) -> anyhow::Result<String> {
    let mut body = json!({"name": name, "team": team, "attributes": attributes});
    if let Some(e) = expires_in {
        body["expires_in"] = json!(e);
    }
    if let Some((usd, window)) = budget {
        body["budget"] = json!({"amount_usd": usd, "window": window});
    }
    if !allow_models.is_empty() {
        body["policy"] = json!({"allow_models": allow_models});
    }
    let a = c.ok("POST", "/admin/v1/service-tokens", Some(&body), None)?;
    a.body
        .get("secret")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .context("the answer has no secret")
}

/// `tollgate service-token revoke --url`.
pub fn revoke_token(c: &Client, name: &str) -> anyhow::Result<()> {
    c.ok(
        "POST",
        &format!("/admin/v1/service-tokens/{name}/revoke"),
        None,
        None,
    )
    .map(|_| ())
}

/// `tollgate service-token rotate --url`: the new secret (shown once).
pub fn rotate_token(c: &Client, name: &str, overlap: Option<&str>) -> anyhow::Result<String> {
    let body = match overlap {
        Some(o) => json!({"overlap": o}),
        None => json!({}),
    };
    let a = c.ok(
        "POST",
        &format!("/admin/v1/service-tokens/{name}/rotate"),
        Some(&body),
        None,
    )?;
    a.body
        .get("secret")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .context("the answer has no secret")
}

/// `tollgate service-token list --url`: never secrets or hashes (the API has none to give).
pub fn list_tokens(c: &Client, json_out: bool) -> anyhow::Result<()> {
    let items = c.list("/admin/v1/service-tokens")?;
    if json_out {
        for i in &items {
            println!("{i}");
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            let t = i.get("token").unwrap_or(i);
            vec![
                text(t, "name"),
                text(t, "id"),
                text(t, "team"),
                text(t, "status"),
                text(t, "expires_at"),
                text(i, "owner"),
                text(t, "role"),
            ]
        })
        .collect();
    table(
        &["name", "id", "team", "status", "expires", "owner", "role"],
        &rows,
    );
    Ok(())
}

/// What `tollgate spend --url` asks.
pub struct SpendArgs {
    pub group_by: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub granularity: String,
    pub csv: bool,
    pub json: bool,
    pub budget: Option<String>,
}

/// `tollgate spend --url`: spend per budget instance with `--budget`, else grouped usage.
pub fn spend(c: &Client, a: &SpendArgs) -> anyhow::Result<()> {
    let mut q: Vec<(&str, String)> = vec![("granularity", a.granularity.clone())];
    if let Some(f) = &a.from {
        q.push(("from", f.clone()));
    }
    if let Some(t) = &a.to {
        q.push(("to", t.clone()));
    }
    let query = |extra: Vec<(&str, String)>| {
        q.iter()
            .cloned()
            .chain(extra)
            .map(|(k, v)| format!("{k}={}", encode(&v)))
            .collect::<Vec<_>>()
            .join("&")
    };
    if let Some(b) = &a.budget {
        let r = c.ok(
            "GET",
            &format!(
                "/admin/v1/spend/budgets?{}",
                query(vec![("budget", b.clone())])
            ),
            None,
            None,
        )?;
        let rows = r.body["rows"].as_array().cloned().unwrap_or_default();
        if a.json {
            for row in &rows {
                println!("{row}");
            }
            return Ok(());
        }
        let rows: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                vec![
                    text(r, "start"),
                    text(r, "budget"),
                    text(r, "member"),
                    text(&r["spent"], "usd"),
                ]
            })
            .collect();
        table(&["start", "budget", "member", "spent_usd"], &rows);
        return Ok(());
    }
    let mut extra = Vec::new();
    if let Some(g) = &a.group_by {
        extra.push(("group_by", g.clone()));
    }
    if a.csv {
        extra.push(("format", "csv".to_owned()));
    }
    let r = c.ok(
        "GET",
        &format!("/admin/v1/spend?{}", query(extra)),
        None,
        None,
    )?;
    if a.csv {
        print!("{}", r.body.as_str().unwrap_or_default());
        return Ok(());
    }
    let dims: Vec<String> = r.body["group_by"]
        .as_array()
        .map(|d| {
            d.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let rows = r.body["rows"].as_array().cloned().unwrap_or_default();
    if a.json {
        for row in &rows {
            println!("{row}");
        }
        return Ok(());
    }
    let mut headers: Vec<&str> = vec!["start"];
    headers.extend(dims.iter().map(String::as_str));
    headers.extend(["cost_usd", "requests", "input_tokens", "output_tokens"]);
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let mut v = vec![text(r, "start")];
            v.extend(dims.iter().map(|d| text(&r["dims"], d)));
            v.extend([
                text(&r["cost"], "usd"),
                text(r, "requests"),
                text(r, "input_tokens"),
                text(r, "output_tokens"),
            ]);
            v
        })
        .collect();
    table(&headers, &rows);
    Ok(())
}
