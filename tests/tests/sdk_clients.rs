//! The official OpenAI and Anthropic Python SDKs against the real gateway in front of the mock provider:
//! both APIs, streaming and not, usage, error mapping, and a stream cut off at its reservation, as the SDKs
//! parse them (`tests/clients/sdk_check.py`).
//!
//! Ignored by default, since it needs Python and the SDKs:
//!
//! ```text
//! export TOLLGATE_SDK_PYTHON=$(tests/clients/setup.sh | tail -n1)
//! cargo build --bins && cargo test -p tollgate-tests --test sdk_clients -- --ignored
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::path::Path;
use std::process::Command;

use tollgate_tests::*;

#[test]
#[ignore = "needs the openai and anthropic Python SDKs: run tests/clients/setup.sh and set TOLLGATE_SDK_PYTHON"]
fn official_sdks_through_the_gateway() {
    let python = std::env::var_os("TOLLGATE_SDK_PYTHON").unwrap_or_else(|| {
        panic!(
            "TOLLGATE_SDK_PYTHON is not set: run tests/clients/setup.sh and set it to the python it prints"
        )
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .join("tests/clients/sdk_check.py");
    // The SDKs present a service token as their API key; identity is on as in any deployment.
    let token = service_token(&test_store(), "sdk");
    // A budget that cuts streams off at their reservation applies to every request.
    let m = mock(&["--expect-key", MOCK_KEY]);
    let g = gateway(&config_for(
        &format!("http://{}", m.addr),
        "",
        "[[routes]]\nmodel = \"text-embedding-*\"\nprovider = \"openai\"\n\n[[budgets]]\nname = \"sdk\"\namount_usd = \"100\"\nwindow = \"day\"\nscope = \"everyone\"\nstream_cutoff = true\n",
    ));
    let base = g.url("");
    let out = Command::new(&python)
        .arg(&script)
        .arg(&base)
        .arg(&token)
        .env("PYTHONUNBUFFERED", "1")
        .output()
        .unwrap_or_else(|e| panic!("running {python:?} {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "sdk_check.py {base} failed ({}):\n--- stdout\n{stdout}\n--- stderr\n{stderr}\n--- gateway log\n{}",
        out.status,
        g.output()
    );
}
