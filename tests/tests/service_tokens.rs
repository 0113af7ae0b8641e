//! `tollgate service-token create|revoke|list`: the real binary against a real store directory.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tollgate_tests::*;

struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn tollgate(args: &[&str]) -> Out {
    let o = Command::new(bin("tollgate")).args(args).output().unwrap();
    Out {
        code: o.status.code(),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

fn st(action: &str, store: &Path, rest: &[&str]) -> Out {
    let mut args = vec!["service-token", action, "--store", store.to_str().unwrap()];
    args.extend_from_slice(rest);
    tollgate(&args)
}

/// Creates a token and returns it, checking stdout is exactly the token line.
fn create(store: &Path, rest: &[&str]) -> String {
    let o = st("create", store, rest);
    assert_eq!(o.code, Some(0), "stderr: {}", o.stderr);
    let lines: Vec<&str> = o.stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout: {:?}", o.stdout);
    let token = lines[0].to_owned();
    assert!(token.starts_with("tg_") && token.len() == 46, "{token}");
    assert!(o.stderr.contains("shown once"), "{}", o.stderr);
    assert!(!o.stderr.contains(&token), "secret on stderr");
    token
}

/// `list --json`, as (name, status) pairs, checking no secret or hash appears.
fn list_json(store: &Path, secrets: &[&str]) -> Vec<(String, String)> {
    let o = st("list", store, &["--json"]);
    assert_eq!(o.code, Some(0), "stderr: {}", o.stderr);
    for s in secrets {
        assert!(
            !o.stdout.contains(s) && !o.stderr.contains(s),
            "secret listed"
        );
    }
    o.stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v.get("hash").is_none(), "hash listed: {l}");
            assert!(v["id"].as_str().unwrap().starts_with("st_"));
            (
                v["name"].as_str().unwrap().to_owned(),
                v["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pair(name: &str, status: &str) -> (String, String) {
    (name.to_owned(), status.to_owned())
}

#[test]
fn create_list_revoke_through_the_cli() {
    let dir = TempDir::new("st-cli");
    let store = dir.0.join("store");
    // Listing a store that does not exist yet is empty and creates nothing.
    assert!(list_json(&store, &[]).is_empty());
    assert!(!store.exists(), "list created the store directory");
    let token = create(&store, &["--name", "ci-bot", "--team", "platform"]);

    let file = store.join("service-tokens.json");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "store file mode");
    let dir_mode = std::fs::metadata(&store).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "store directory mode");
    let on_disk = std::fs::read_to_string(&file).unwrap();
    assert!(!on_disk.contains(&token), "token in the store file");
    assert!(
        !on_disk.contains(&token[3..]),
        "token body in the store file"
    );

    assert_eq!(list_json(&store, &[&token]), vec![pair("ci-bot", "active")]);
    let table = st("list", &store, &[]);
    assert_eq!(table.code, Some(0));
    assert!(!table.stdout.contains(&token));
    let row = table.stdout.lines().find(|l| l.contains("ci-bot")).unwrap();
    assert!(
        row.contains("platform") && row.contains("never") && row.ends_with("active"),
        "{row}"
    );

    // A second active token with the same name is refused.
    let dup = st("create", &store, &["--name", "ci-bot", "--team", "x"]);
    assert_eq!(dup.code, Some(1));
    assert!(dup.stdout.is_empty());
    assert!(dup.stderr.contains("already exists"), "{}", dup.stderr);

    let r = st("revoke", &store, &["ci-bot"]);
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.starts_with("revoked ci-bot (st_"), "{}", r.stderr);
    assert_eq!(
        list_json(&store, &[&token]),
        vec![pair("ci-bot", "revoked")]
    );
    let row = st("list", &store, &[]).stdout;
    assert!(row.lines().any(|l| l.ends_with("revoked")), "{row}");

    let again = st("revoke", &store, &["ci-bot"]);
    assert_eq!(again.code, Some(1));
    assert!(again.stderr.contains("already revoked"), "{}", again.stderr);
    assert_eq!(again.stderr.lines().count(), 1, "{}", again.stderr);

    let unknown = st("revoke", &store, &["nobody"]);
    assert_eq!(unknown.code, Some(1));
    assert!(unknown.stderr.contains("'nobody'"), "{}", unknown.stderr);

    // The name is free again after revocation.
    let second = create(&store, &["--name", "ci-bot", "--team", "platform"]);
    assert_ne!(second, token);
    assert_eq!(
        list_json(&store, &[&token, &second]),
        vec![pair("ci-bot", "revoked"), pair("ci-bot", "active")]
    );
    let on_disk = std::fs::read_to_string(&file).unwrap();
    assert!(!on_disk.contains(&token) && !on_disk.contains(&second));
}

#[test]
fn expiry_options() {
    let dir = TempDir::new("st-exp");
    let store = dir.0.join("store");

    // Expiry in the past is refused with a clear error, and nothing is stored.
    let past = st(
        "create",
        &store,
        &[
            "--name",
            "old",
            "--team",
            "t",
            "--expires-at",
            "2020-01-01T00:00:00Z",
        ],
    );
    assert_eq!(past.code, Some(1));
    assert!(past.stdout.is_empty());
    assert!(past.stderr.contains("not in the future"), "{}", past.stderr);
    assert_eq!(past.stderr.lines().count(), 1, "{}", past.stderr);

    let bad = st(
        "create",
        &store,
        &["--name", "x", "--team", "t", "--expires-in", "5w"],
    );
    assert_eq!(bad.code, Some(1));
    assert!(bad.stderr.contains("5w"), "{}", bad.stderr);
    let bad = st(
        "create",
        &store,
        &["--name", "x", "--team", "t", "--expires-at", "tomorrow"],
    );
    assert_eq!(bad.code, Some(1));
    assert!(bad.stderr.contains("RFC 3339"), "{}", bad.stderr);
    let bad = st("create", &store, &["--name", "has space", "--team", "t"]);
    assert_eq!(bad.code, Some(1));
    assert!(bad.stderr.contains("invalid name"), "{}", bad.stderr);
    assert!(list_json(&store, &[]).is_empty());

    let later = create(
        &store,
        &[
            "--name",
            "later",
            "--team",
            "t",
            "--expires-at",
            "2999-01-01T00:00:00Z",
        ],
    );
    let month = create(
        &store,
        &["--name", "month", "--team", "t", "--expires-in", "30d"],
    );
    let short = create(
        &store,
        &["--name", "short", "--team", "t", "--expires-in", "1s"],
    );
    let secrets = [later.as_str(), month.as_str(), short.as_str()];
    let table = st("list", &store, &[]).stdout;
    assert!(table.contains("2999-01-01T00:00:00Z"), "{table}");

    // The one-second token lapses; poll rather than assume how long a second takes here.
    std::thread::sleep(Duration::from_millis(1100));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = list_json(&store, &secrets);
        if l.contains(&pair("short", "expired")) {
            assert!(l.contains(&pair("later", "active")), "{l:?}");
            assert!(l.contains(&pair("month", "active")), "{l:?}");
            break;
        }
        assert!(Instant::now() < deadline, "never listed as expired: {l:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let row = st("list", &store, &[]).stdout;
    assert!(
        row.lines()
            .any(|l| l.contains("short") && l.ends_with("expired")),
        "{row}"
    );
}

#[test]
fn a_corrupt_store_is_an_error_not_an_empty_list() {
    let dir = TempDir::new("st-corrupt");
    let file = dir.file("service-tokens.json", "{ not json");
    let o = st("list", &dir.0, &[]);
    assert_eq!(o.code, Some(1));
    assert!(o.stdout.is_empty());
    assert!(
        o.stderr.contains(&file.display().to_string()),
        "{}",
        o.stderr
    );
    let o = st("create", &dir.0, &["--name", "a", "--team", "t"]);
    assert_eq!(o.code, Some(1));
    assert!(o.stdout.is_empty(), "a token was printed but not stored");
    assert_eq!(
        std::fs::read_to_string(&file).unwrap(),
        "{ not json",
        "corrupt file overwritten"
    );
}
