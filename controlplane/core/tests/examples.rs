//! The shipped example configurations stay valid: the quickstart alone, and each identity-provider example
//! both checked as the fragment it is (issuers and policies, no providers: `Config::load_fragment`, what
//! `tollgate check-config --fragment` runs) and merged into the quickstart. `dataplane/tests/cli.rs` runs
//! every example through the exact command its header promises.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::path::Path;

use tollgate_core::Config;

fn examples() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

#[test]
fn every_idp_example_merges_into_the_quickstart() {
    let qs_path = examples().join("quickstart.toml");
    let quickstart = std::fs::read_to_string(&qs_path).unwrap();
    let qs = Config::parse(&qs_path, &quickstart).unwrap();
    assert!(qs.auth.demo_token);
    assert!(!qs.auth.allow_anonymous);
    let mut seen = 0;
    for entry in std::fs::read_dir(examples()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.starts_with("idp-") {
            continue;
        }
        let fragment =
            Config::load_fragment(&path).unwrap_or_else(|e| panic!("{name} as a fragment:\n{e}"));
        assert_eq!((fragment.issuers, fragment.providers), (1, 0), "{name}");
        let text = format!("{quickstart}\n{}", std::fs::read_to_string(&path).unwrap());
        let c = Config::parse(&path, &text).unwrap_or_else(|e| panic!("{name}:\n{e}"));
        assert_eq!(c.auth.issuers.len(), 1, "{name}");
        assert!(c.policies.len() >= 2, "{name}");
        seen += 1;
    }
    assert_eq!(
        seen, 5,
        "Okta, Entra ID, Google, Keycloak, Cloudflare Access"
    );
}
