//! The `tollgate` binary's command line: `check-config` reports every problem with file, field and reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

#[test]
fn check_config_accepts_the_quickstart() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap();
    let out = tollgate()
        .args(["check-config"])
        .arg(root.join("examples/quickstart.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok (2 providers"));
}

#[test]
fn check_config_lists_every_problem() {
    let dir = std::env::temp_dir().join(format!("tg-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(
        &f,
        "[server]\nlisten = [\"x\"]\n[[providers]]\nname = \"p\"\nkind = \"gemini\"\n[[routes]]\nmodel = \"m\"\nprovider = \"q\"\n",
    )
    .unwrap();
    let out = tollgate().arg("check-config").arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "bad.toml: server.listen[0]",
        "bad.toml: providers[0].kind",
        "bad.toml: routes[0].provider",
        "3 problem(s)",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serve_refuses_a_bad_config_with_the_reason() {
    let out = tollgate()
        .args(["serve", "--config", "/nonexistent/tollgate.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tollgate.toml"));
}

#[test]
fn version_names_the_release_and_the_commit() {
    let out = tollgate().arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("tollgate {} (commit ", env!("CARGO_PKG_VERSION"));
    assert!(text.starts_with(&want), "{text}");
    // Built from this checkout: the commit is a 12-digit hash (or "unknown" from a tarball).
    let commit = text.trim().trim_start_matches(&want).trim_end_matches(')');
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "{text}"
    );
}
