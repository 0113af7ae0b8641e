//! The control plane's API fuzzed from its own OpenAPI document with schemathesis (the Python package,
//! installed by `tests/clients/setup.sh`): every operation, its coverage, fuzzing and stateful phases, as
//! the admin of a live gateway. Checks: no 5xx on any input, every status code and content type declared,
//! every response matching its declared schema.
//!
//! Ignored by default, since it needs Python and schemathesis:
//!
//! ```text
//! export TOLLGATE_SDK_PYTHON=$(tests/clients/setup.sh | tail -n1)
//! cargo build --bins && cargo test -p tollgate-tests --test admin_schema -- --ignored
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::path::Path;
use std::process::Command;

use serde_json::json;
use tollgate_tests::*;

#[test]
#[ignore = "needs schemathesis: run tests/clients/setup.sh and set TOLLGATE_SDK_PYTHON"]
fn the_admin_api_answers_as_its_openapi_document_says_under_fuzzing() {
    let python = std::env::var_os("TOLLGATE_SDK_PYTHON").unwrap_or_else(|| {
        panic!("TOLLGATE_SDK_PYTHON is not set: run tests/clients/setup.sh and set it to the python it prints")
    });
    let schemathesis = Path::new(&python).parent().unwrap().join("schemathesis");
    let m = mock(&["--expect-key", MOCK_KEY]);
    let store = TempDir::new("schema-store");
    let mut g = gateway(&config_for(
        &format!("http://{}", m.addr),
        "",
        &format!(
            "[store]\ndir = \"{}\"\n[auth]\ndemo_token = true\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            store.0.display()
        ),
    ));
    let admin = g.wait_json(&[("event", json!("admin_listening"))])["addr"]
        .as_str()
        .unwrap()
        .to_owned();
    let token = std::fs::read_to_string(store.0.join("admin-token")).unwrap();
    let out = Command::new(&schemathesis)
        .current_dir(&store.0)
        .args([
            "run",
            &format!("http://{admin}/admin/v1/openapi.json"),
            "--header",
            &format!("Authorization: Bearer {}", token.trim()),
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "25",
            "--generation-deterministic",
        ])
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
    // The run reached the API: every operation tested, none left out.
    assert!(report.contains("Tested: "), "{report}");
    // And the gateway is still serving.
    assert!(g.child.try_wait().unwrap().is_none(), "{}", g.output());
}
