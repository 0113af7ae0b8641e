//! The `tollgate` binary's command line: `check-config` reports every problem with file, field and reason.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::process::Command;

fn tollgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
}

#[test]
fn check_config_accepts_the_quickstart() {
    // dataplane/cmd -> the repository root.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
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

/// Every file in `examples/` says in its header, on a `# Check it: tollgate check-config ...` line, the
/// command that checks it; that exact command passes (run from the repository root, as the line reads).
/// A new example without the line, or one that fails its check, fails here.
#[test]
fn every_example_passes_the_check_its_comment_promises() {
    // dataplane/cmd -> the repository root.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .unwrap();
    let mut checked = Vec::new();
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let header = text.lines().take_while(|l| l.starts_with('#'));
        let promised: Vec<_> = header
            .filter_map(|l| l.strip_prefix("# Check it: "))
            .collect();
        let [command] = promised.as_slice() else {
            panic!("examples/{name}: the header needs one `# Check it: tollgate check-config ...` line, found {promised:?}");
        };
        let words: Vec<&str> = command.split_whitespace().collect();
        let Some(["tollgate", "check-config", args @ ..]) = Some(words.as_slice()) else {
            panic!("examples/{name}: {command:?} is not a tollgate check-config command");
        };
        assert_eq!(
            args.last(),
            Some(&format!("examples/{name}").as_str()),
            "examples/{name}: {command:?} checks another file"
        );
        // Everything after `tollgate`, as the header reads.
        let out = tollgate()
            .arg("check-config")
            .args(args)
            .current_dir(root)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "examples/{name}: `{command}` failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(": ok ("),
            "examples/{name}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        checked.push(name);
    }
    // Not vacuous: the quickstart and the IdP fragments were among them.
    assert!(
        checked.iter().any(|n| n == "quickstart.toml")
            && checked.iter().any(|n| n.starts_with("idp-")),
        "{checked:?}"
    );
}

#[test]
fn check_config_fragment_checks_the_sections_present_and_names_file_and_field() {
    let dir = std::env::temp_dir().join(format!("tg-cli-frag-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("idp.toml");
    std::fs::write(
        &good,
        "[[auth.issuers]]\nname = \"okta\"\nissuer = \"https://example.okta.com\"\naudiences = [\"api://x\"]\n\
         [[policies]]\nname = \"all\"\ndefault = true\nallow_models = [\"gpt-*\"]\n",
    )
    .unwrap();
    // As a whole configuration the fragment lacks providers; as a fragment it passes.
    let whole = tollgate().arg("check-config").arg(&good).output().unwrap();
    assert_eq!(whole.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&whole.stderr).contains("idp.toml: providers: at least one"));
    let frag = tollgate()
        .args(["check-config", "--fragment"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(
        frag.status.success(),
        "{}",
        String::from_utf8_lossy(&frag.stderr)
    );
    assert!(String::from_utf8_lossy(&frag.stdout).contains("1 issuers, 1 policies"));
    // A fragment's mistakes are reported like a whole file's: file, field, reason.
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[auth.issuers]]\nname = \"okta\"\nissuer = \"http://example.okta.com\"\naudiences = [\"api://x\"]\n\
         [[routes]]\nmodel = \"\"\nprovider = \"openai\"\n",
    )
    .unwrap();
    let out = tollgate()
        .args(["check-config", "--fragment"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in [
        "bad.toml: auth.issuers[0].issuer: must use https://",
        "bad.toml: routes[0].model: must not be empty",
        "2 problem(s)",
    ] {
        assert!(err.contains(needle), "missing {needle:?} in:\n{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
