//! PostgreSQL as the spend store (`[ledger] postgres`), against real throwaway clusters
//! (`tollgate_tests::postgres::PgCluster`): the store conformance suite with PostgreSQL's serializable
//! semantics; a ledger batch whose commit outcome was unknown applied once; a server that stops answering
//! times out within the configured timeout and the pool reconnects after; a restarted server is
//! reconnected; TLS with `verify-full` against the cluster's own CA, and a clear error with another CA;
//! one `tollgate serve` and one `tollgate controlplane serve` on the database, the spend landing in it.
//! Configuration errors never show the URL's password.
//!
//! The tests that need PostgreSQL are ignored by default; `.ci/run` installs Debian's `postgresql` and
//! runs them with `TOLLGATE_PG_BIN` (`cargo test -p tollgate-tests --test postgres -- --ignored`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::{json, Value};
use tollgate_core::store::ledger::{self, Batch, InstanceName};
use tollgate_core::store::postgres::{PgConfig, PgStore};
use tollgate_core::store::{conformance, transact, RetryPolicy, Store, StoreError};
use tollgate_core::Money;
use tollgate_tests::postgres::{PgCluster, PASSWORD};
use tollgate_tests::*;

fn open(url: &str, ca: Option<PathBuf>, timeout: Duration) -> Result<PgStore, StoreError> {
    PgStore::open(&PgConfig::parse(url, ca, timeout).unwrap())
}

#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn the_store_passes_the_conformance_suite_with_serializable_semantics() {
    let pg = PgCluster::start();
    let store = open(&pg.url(), None, Duration::from_secs(5)).unwrap();
    assert_eq!(store.kind(), "postgres");
    conformance::run(&store).unwrap();
    conformance::run_serializable(&store).unwrap();
    // Keys are bytea, compared bytewise: the table holds what the suite left, in FoundationDB's order.
    let keys = pg.psql("SELECT count(*) FROM tollgate_kv");
    assert!(keys.parse::<u64>().unwrap() > 10, "{keys}");
    // The last handle on the store may go on an async thread (the control plane's): no panic there.
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async move { drop(store) });
}

/// Nodes starting together on an empty database: each creates the table if it is missing, and the ones
/// that lose the race on PostgreSQL's catalog carry on.
#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn several_stores_opening_at_once_on_an_empty_database_all_open() {
    let pg = PgCluster::start();
    let url = pg.url();
    let opened: Vec<Result<PgStore, StoreError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| s.spawn(|| open(&url, None, Duration::from_secs(10))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, o) in opened.iter().enumerate() {
        assert!(o.is_ok(), "store {i}: {:?}", o.as_ref().err());
    }
    assert_eq!(
        pg.psql("SELECT count(*) FROM pg_class WHERE relname = 'tollgate_kv'"),
        "1"
    );
}

/// A write that conflicts is found at the next read; the transaction's commit returns the conflict, and
/// its connection goes back to the pool rolled back: the next transaction on it works at once.
#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn a_write_conflict_found_at_a_read_is_returned_and_leaves_a_clean_connection() {
    let pg = PgCluster::start();
    let store = open(&pg.url(), None, Duration::from_secs(5)).unwrap();
    let mut t1 = store.begin().unwrap();
    assert_eq!(t1.get(b"a").unwrap(), None);
    let mut t2 = store.begin().unwrap();
    t2.add(b"k", 2);
    t2.commit().unwrap();
    // t1's add meets t2's committed row, which its snapshot does not see.
    t1.add(b"k", 1);
    assert_eq!(t1.get(b"b"), Err(StoreError::Conflict));
    assert_eq!(t1.commit(), Err(StoreError::Conflict));
    let once = RetryPolicy {
        max_attempts: 1,
        ..RetryPolicy::default()
    };
    for _ in 0..2 {
        let v = transact(&store, &once, |t| {
            t.add(b"k", 1);
            t.get(b"k")
        })
        .unwrap();
        assert!(v.is_some());
    }
    let mut t = store.begin().unwrap();
    let v = t.get(b"k").unwrap().unwrap();
    t.commit().unwrap();
    assert_eq!(tollgate_core::store::decode_i128(&v).unwrap(), 4);
}

/// What a ledger commit costs on a local cluster (fsync on): a transaction of 100 adds and one set, as
/// `store_sqlite_commit_latency` measures SQLite, 50 commits after 10 warm-up ones.
#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn a_ledger_sized_commit_takes_milliseconds() {
    let pg = PgCluster::start();
    let store = open(&pg.url(), None, Duration::from_secs(5)).unwrap();
    let mut times = Vec::new();
    for round in 0..60 {
        let started = Instant::now();
        let mut t = store.begin().unwrap();
        // The ledger reads its source's applied number first (that round trip carries BEGIN).
        t.get(b"bench/applied").unwrap();
        for k in 0..100u32 {
            t.add(format!("bench/spend/{k:03}").as_bytes(), 1);
        }
        t.set(b"bench/applied", &(round as u64).to_le_bytes());
        t.commit().unwrap();
        if round >= 10 {
            times.push(started.elapsed());
        }
    }
    times.sort();
    let (median, p90, max) = (times[25], times[45], times[49]);
    eprintln!(
        "postgres ledger commit (1 read, 100 adds, 1 set): median {median:?}, p90 {p90:?}, max {max:?}"
    );
    let mut t = store.begin().unwrap();
    let v = t.get(b"bench/spend/042").unwrap().unwrap();
    t.commit().unwrap();
    assert_eq!(tollgate_core::store::decode_i128(&v).unwrap(), 60);
    assert!(median < Duration::from_millis(100), "median {median:?}");

    // Small transactions one after another: a read-only one (a point read and COMMIT) and a write
    // (one add and COMMIT, a WAL flush each).
    for (what, write) in [("read (1 get)", false), ("write (1 add)", true)] {
        let started = Instant::now();
        let n = 300;
        for _ in 0..n {
            let mut t = store.begin().unwrap();
            if write {
                t.add(b"bench/one", 1);
            } else {
                t.get(b"bench/applied").unwrap();
            }
            t.commit().unwrap();
        }
        let took = started.elapsed();
        eprintln!(
            "postgres {what} transactions, one at a time: {:.0}/s ({:?} each)",
            f64::from(n) / took.as_secs_f64(),
            took / n
        );
    }
}

fn team() -> InstanceName {
    InstanceName {
        budget: "team".into(),
        member: String::new(),
    }
}

fn batch(seq: u64, pico: i128) -> Batch {
    let mut b = Batch::default();
    b.add(
        "node-a-c0",
        seq,
        team(),
        Money::from_pico(pico),
        Timestamp::now(),
    );
    b
}

fn stored_spend(store: &dyn Store) -> i128 {
    let since = Timestamp::now()
        .checked_sub(jiff::SignedDuration::from_hours(1))
        .unwrap();
    transact(store, &RetryPolicy::default(), |t| {
        ledger::load_since(t, since)
    })
    .unwrap()
    .iter()
    .map(|s| s.amount.pico())
    .sum()
}

#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn a_ledger_batch_whose_commit_outcome_was_unknown_is_applied_once() {
    let pg = PgCluster::start();
    let timeout = Duration::from_millis(1000);
    let store = open(&pg.url(), None, timeout).unwrap();
    let p = RetryPolicy::default();
    ledger::check_schema(&store, &p).unwrap();
    transact(&store, &p, |t| ledger::apply_batch(t, &batch(1, 5))).unwrap();

    // 1. Applied, answer lost: a synchronous standby that does not exist holds COMMIT after the commit
    // record is written; the client gives up at its timeout. Releasing the wait makes it visible.
    pg.psql("ALTER SYSTEM SET synchronous_standby_names = 'nobody'");
    pg.psql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(300));
    let b2 = batch(2, 7);
    let mut t = store.begin().unwrap();
    assert!(ledger::apply_batch(t.as_mut(), &b2).unwrap());
    let started = Instant::now();
    assert_eq!(t.commit(), Err(StoreError::CommitUnknown));
    let took = started.elapsed();
    assert!(
        took >= timeout - Duration::from_millis(100) && took < timeout * 3,
        "{took:?}"
    );
    pg.psql("ALTER SYSTEM RESET synchronous_standby_names");
    pg.psql("SELECT pg_reload_conf()");
    // The ledger retries the same batch as it is: the store already has it (a retry that meets the
    // held commit waits for it, then conflicts and runs again), so nothing is added.
    let applied = transact(&store, &p, |t| ledger::apply_batch(t, &b2)).unwrap();
    assert!(!applied, "the retried batch was applied a second time");
    assert_eq!(stored_spend(&store), 12);

    // 2. Outcome unknown the other way: the server stops answering while COMMIT is on its way. When it
    // wakes up it may still run what was sent; the retries (and the batch ids) count the batch once.
    let b3 = batch(3, 11);
    let mut t = store.begin().unwrap();
    assert!(ledger::apply_batch(t.as_mut(), &b3).unwrap());
    pg.pause();
    let outcome = t.commit();
    pg.resume();
    assert_eq!(outcome, Err(StoreError::CommitUnknown));
    let patient = RetryPolicy {
        max_attempts: 50,
        backoff: Duration::from_millis(20),
        max_backoff: Duration::from_millis(200),
    };
    transact(&store, &patient, |t| ledger::apply_batch(t, &b3)).unwrap();
    assert!(!transact(&store, &patient, |t| ledger::apply_batch(t, &b3)).unwrap());
    assert_eq!(stored_spend(&store), 23);
}

#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn a_server_that_stops_answering_times_out_and_the_pool_reconnects_when_it_is_back() {
    let pg = PgCluster::start();
    let timeout = Duration::from_millis(800);
    let store = open(&pg.url(), None, timeout).unwrap();
    let p = RetryPolicy::default();
    transact(&store, &p, |t| {
        t.set(b"k", b"before");
        Ok(())
    })
    .unwrap();

    pg.pause();
    // A transaction on a pooled connection: its read waits for an answer that never comes.
    let mut t = store.begin().unwrap();
    let started = Instant::now();
    assert_eq!(t.get(b"k"), Err(StoreError::Timeout));
    let took = started.elapsed();
    assert!(took < timeout + Duration::from_millis(500), "{took:?}");
    drop(t);
    // A new connection: the kernel accepts it, nobody answers the startup message.
    let started = Instant::now();
    let e = store.begin().err().unwrap();
    let took = started.elapsed();
    assert_eq!(e, StoreError::Timeout);
    assert!(took < timeout + Duration::from_millis(500), "{took:?}");
    pg.resume();

    // Back: the next transaction works on a fresh connection.
    let got = transact(&store, &p, |t| {
        let v = t.get(b"k")?;
        t.set(b"k", b"after");
        Ok(v)
    })
    .unwrap();
    assert_eq!(got.as_deref(), Some(&b"before"[..]));
}

#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn a_restarted_server_is_reconnected_and_an_outage_is_unavailable_without_the_password() {
    let pg = PgCluster::start();
    let store = open(&pg.url(), None, Duration::from_secs(2)).unwrap();
    let p = RetryPolicy::default();
    transact(&store, &p, |t| {
        t.set(b"k", b"kept");
        Ok(())
    })
    .unwrap();

    pg.stop();
    let quick = RetryPolicy {
        max_attempts: 2,
        backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(1),
    };
    let e = transact(&store, &quick, |t| t.get(b"k")).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(&e, StoreError::RetryLimit { last, .. } if matches!(**last, StoreError::Unavailable(_))),
        "{e:?}"
    );
    assert!(msg.contains(&format!("127.0.0.1:{}", pg.port())), "{msg}");
    assert!(!msg.contains(PASSWORD), "{msg}");

    pg.start_again();
    let got = transact(&store, &p, |t| t.get(b"k")).unwrap();
    assert_eq!(got.as_deref(), Some(&b"kept"[..]));

    // A restart while connections sit idle in the pool: the next transaction does not fail on them.
    let a = store.begin().unwrap();
    let b = store.begin().unwrap();
    drop((a, b));
    pg.stop();
    pg.start_again();
    let got = transact(&store, &p, |t| t.get(b"k")).unwrap();
    assert_eq!(got.as_deref(), Some(&b"kept"[..]));
}

#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn tls_verify_full_trusts_the_ca_file_and_another_ca_is_a_clear_error() {
    let pg = PgCluster::start_tls();
    let tls = pg.tls.as_ref().unwrap();
    let five = Duration::from_secs(5);
    let store = open(&pg.url(), Some(tls.ca_file.clone()), five).unwrap();
    transact(&store, &RetryPolicy::default(), |t| {
        t.set(b"tls", b"yes");
        Ok(())
    })
    .unwrap();
    let encrypted = pg.psql(
        "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
         WHERE application_name = 'tollgate' AND ssl",
    );
    assert_ne!(encrypted, "0");
    // verify-ca and require connect too (require trusts any certificate).
    open(
        &pg.url_with("sslmode=verify-ca"),
        Some(tls.ca_file.clone()),
        five,
    )
    .unwrap();
    open(&pg.url_with("sslmode=require"), None, five).unwrap();

    let e = open(&pg.url(), Some(tls.wrong_ca_file.clone()), five).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
    assert!(
        msg.contains("TLS") && msg.contains("UnknownIssuer"),
        "not a clear error: {msg}"
    );
    assert!(!msg.contains(PASSWORD), "{msg}");
    // The public web roots (no CA file) do not trust a private CA either.
    let e = open(&pg.url(), None, five).unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
}

/// `ledger.postgres_ca_file` changed alone is reported by its own name (a reload keeps the running
/// store); its check needs a CA file that parses, which this crate can make.
#[test]
fn a_changed_postgres_ca_file_is_reported_as_needing_a_restart() {
    let dir = TempDir::new("pg-reload");
    let ca = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        dir.file(name, &params.self_signed(&key).unwrap().pem())
    };
    let (a, b) = (ca("a.pem"), ca("b.pem"));
    let config = |ca: &PathBuf| {
        let text = format!(
            "{}\n[ledger]\npostgres = \"postgres://tg:pw@db/x?sslmode=verify-full\"\npostgres_ca_file = \"{}\"\n",
            BASE,
            ca.display()
        );
        tollgate_core::Config::parse(&dir.0.join("t.toml"), &text).unwrap()
    };
    assert_eq!(
        tollgate_dataplane::runtime::reload::restart_required(&config(&a), &config(&b)),
        vec!["ledger.postgres_ca_file"]
    );
}

const BASE: &str = r#"
[[providers]]
name = "openai"
kind = "openai"
base_url = "http://127.0.0.1:9"
api_key_env = "TOLLGATE_TEST_NO_SUCH_KEY"

[[routes]]
model = "gpt-*"
provider = "openai"
"#;

/// `tollgate check-config` names `ledger.postgres` for a bad URL and for a second store, and never
/// prints the password.
#[test]
fn configuration_errors_name_ledger_postgres_and_never_show_the_password() {
    let dir = TempDir::new("pg-config");
    for ledger in [
        "postgres = \"postgres://tg:hunter2-secret@db:notaport/x\"",
        "postgres = \"postgres://tg:hunter2-secret@db/x?sslmode=sometimes\"",
        "postgres = \"mysql://tg:hunter2-secret@db/x\"",
        "postgres = \"postgres://tg:hunter2-secret@db/x\"\ncluster_file = \"fdb.cluster\"",
        "postgres = \"postgres://tg:hunter2-secret@db/x\"\nshared_file = \"s.sqlite\"",
    ] {
        let cfg = dir.file("t.toml", &format!("{BASE}\n[ledger]\n{ledger}\n"));
        let out = Command::new(bin("tollgate"))
            .args(["check-config"])
            .arg(&cfg)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{ledger}: {text}");
        assert!(text.contains("ledger.postgres"), "{ledger}: {text}");
        assert!(!text.contains("hunter2"), "{ledger}: {text}");
    }
}

fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    bearer: &str,
    body: Option<&Value>,
) -> Response {
    let body = body.map(Value::to_string).unwrap_or_default();
    let raw = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {bearer}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    request(addr, raw.as_bytes())
}

fn chat(addr: SocketAddr, token: &str) -> Response {
    post(
        addr,
        "/v1/chat/completions",
        r#"{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"hi"}]}"#,
        &format!("Authorization: Bearer {token}\r\n"),
    )
}

/// One gateway with `[ledger] postgres` (TLS, verify-full) serves requests against a budget made through
/// its control plane, the spend lands in the database, `tollgate spend` reads it back, and a control
/// plane in its own process on the same database changes what the gateway enforces.
#[test]
#[ignore = "needs PostgreSQL: run by .ci/run with TOLLGATE_PG_BIN"]
fn a_gateway_and_a_control_plane_serve_from_postgres() {
    let pg = PgCluster::start_tls();
    let ca = pg.tls.as_ref().unwrap().ca_file.clone();
    let m = mock(&["--expect-key", MOCK_KEY]);
    let store = TempDir::new("pg-gw-store");
    let cfg = config_for(
        &format!("http://{}", m.addr),
        "",
        &format!(
            "[store]\ndir = \"{}\"\n[auth]\ndemo_token = true\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [ledger]\ndir = \"ledger\"\npostgres = \"{}\"\npostgres_ca_file = \"{}\"\n\
             [[budgets]]\nname = \"total\"\namount_usd = \"1000\"\nwindow = \"month\"\nscope = \"everyone\"\n",
            store.0.display(),
            pg.url(),
            ca.display()
        ),
    );
    let g = gateway(&cfg);
    assert!(!g.output().contains(PASSWORD));
    g.wait_json(&[
        ("event", json!("ledger_started")),
        ("store", json!("postgres")),
    ]);
    let a: SocketAddr = g.wait_json(&[("event", json!("admin_listening"))])["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let root = std::fs::read_to_string(store.0.join("admin-token")).unwrap();
    let root = root.trim();
    let r = admin(
        a,
        "POST",
        "/admin/v1/service-tokens",
        root,
        Some(&json!({"name": "pg-bot", "team": "platform",
            "budget": {"amount_usd": "1", "window": "day"}})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let secret = r.json()["secret"].as_str().unwrap().to_owned();
    let version = admin(a, "GET", "/admin/v1/healthz", "", None).json()["catalog_version"]
        .as_u64()
        .unwrap();
    g.wait_line(
        |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["event"] == "catalog_applied" && v["version"].as_u64().unwrap_or(0) >= version
            })
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("the token never applied:\n{}", g.output()));
    for _ in 0..3 {
        let r = chat(g.addr, &secret);
        assert_eq!(r.status, 200, "{}", r.text());
    }

    // The spend reaches the database within a few commit intervals.
    let deadline = Instant::now() + Duration::from_secs(10);
    // The query docs/fleet.md gives operators: the keys under ("tg", "spend"), counters in `n`.
    let spend_keys = "SELECT count(*) FROM tollgate_kv \
                      WHERE k >= '\\x02746700027370656e6400' AND k < '\\x02746700027370656e6401' \
                      AND n > 0 AND position('token-pg-bot'::bytea in k) > 0";
    while pg.psql(spend_keys) == "0" {
        assert!(Instant::now() < deadline, "no spend in the database");
        std::thread::sleep(Duration::from_millis(50));
    }
    // `tollgate spend` (its own process, reading the database) sees it under the file's budget.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let rows = g.spend();
        let row = rows
            .iter()
            .find(|r| r["budget"] == "total")
            .unwrap_or_else(|| panic!("{rows:?}"));
        let spent: f64 = row["spent_usd"].as_str().unwrap().parse().unwrap();
        if spent > 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "{row}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // A control plane in its own process on the same database: its change reaches the gateway.
    let cp = Proc::start(
        &bin("tollgate"),
        &[
            "controlplane",
            "serve",
            "--config",
            g.config_path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[],
    );
    // Its usage query reads the same database.
    let r = admin(
        cp.addr,
        "GET",
        "/admin/v1/spend?group_by=service_token",
        root,
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rows = r.json()["rows"].as_array().unwrap().clone();
    assert!(
        rows.iter().any(|x| x["dims"]["service_token"] == "pg-bot"),
        "{rows:?}"
    );
    let path = "/admin/v1/budgets/token-pg-bot";
    let cur = admin(cp.addr, "GET", path, root, None);
    assert_eq!(cur.status, 200, "{}", cur.text());
    let mut spec = cur.json()["spec"].clone();
    spec["amount_usd"] = json!("0.000001");
    let etag = cur.header("etag").unwrap().to_owned();
    let body = spec.to_string();
    let raw = format!(
        "PUT {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {root}\r\nContent-Type: application/json\r\nIf-Match: {etag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let r = request(cp.addr, raw.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    let version = r.json()["version"].as_u64().unwrap();
    g.wait_line(
        |l| {
            serde_json::from_str::<Value>(l).is_ok_and(|v| {
                v["event"] == "catalog_applied" && v["version"].as_u64().unwrap_or(0) >= version
            })
        },
        Duration::from_secs(10),
    )
    .unwrap_or_else(|| panic!("the lowered budget never applied:\n{}", g.output()));
    assert_eq!(chat(g.addr, &secret).status, 429);
    assert!(!g.output().contains(PASSWORD));
    assert!(!cp.output().contains(PASSWORD));
}
