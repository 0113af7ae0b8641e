//! The two coding agents platform teams most want to govern, as real clients: OpenAI's Codex CLI (the
//! Responses API) and Anthropic's Claude Code (messages, with its 32,000-token `max_tokens`), installed
//! from npm at pinned versions (`tests/clients/agents/package.json`), each run non-interactively through
//! the quickstart gateway (its demo token, its demo policy and budget) to the mock provider, each
//! completing a short task that takes a tool-call turn; their spend then appears in `tollgate spend` and
//! in the control plane's spend query, by model.
//!
//! Ignored by default, since it needs node and the agents:
//!
//! ```text
//! export TOLLGATE_AGENTS_BIN=$(tests/clients/agents/setup.sh | tail -n1)
//! cargo build --bins && cargo test -p tollgate-tests --test agents -- --ignored
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use tollgate_tests::*;

fn agents_bin() -> PathBuf {
    PathBuf::from(std::env::var_os("TOLLGATE_AGENTS_BIN").unwrap_or_else(|| {
        panic!("TOLLGATE_AGENTS_BIN is not set: run tests/clients/agents/setup.sh and set it to the directory it prints")
    }))
}

/// The quickstart as a new user runs it, on free ports, its state in `dir`.
fn quickstart(dir: &TempDir) -> Proc {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let text = std::fs::read_to_string(root.join("examples/quickstart.toml"))
        .unwrap()
        .replace("127.0.0.1:8080", "127.0.0.1:0")
        .replace("127.0.0.1:8081", "127.0.0.1:0");
    let path = dir.file("quickstart.toml", &text);
    // No provider keys: the bundled mock answers, as on a new user's machine.
    Proc::start(
        &bin("tollgate"),
        &["serve", "--config", path.to_str().unwrap()],
        &[("OPENAI_API_KEY", ""), ("ANTHROPIC_API_KEY", "")],
    )
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

/// Environment for an agent: its own HOME, no telemetry, no update checks.
fn quiet(cmd: &mut Command, home: &Path) {
    cmd.env("HOME", home)
        .env("DISABLE_TELEMETRY", "1")
        .env("DISABLE_AUTOUPDATER", "1")
        .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
        .env("NO_COLOR", "1")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_API_KEY");
}

#[test]
#[ignore = "needs node and the agents: run tests/clients/agents/setup.sh and set TOLLGATE_AGENTS_BIN"]
fn codex_cli_and_claude_code_complete_a_task_through_the_quickstart_gateway() {
    let agents = agents_bin();
    let dir = TempDir::new("agents");
    let g = quickstart(&dir);
    let token = std::fs::read_to_string(dir.0.join(".tollgate/demo-token")).unwrap();
    let token = token.trim().to_owned();
    let base = format!("http://{}", g.addr);

    // Claude Code: ANTHROPIC_BASE_URL and the token as its key; a task with a tool turn (it writes a file).
    let work = dir.0.join("claude-work");
    std::fs::create_dir_all(&work).unwrap();
    let mut claude = Command::new(agents.join("claude"));
    quiet(&mut claude, &dir.0.join("claude-home"));
    // The mock makes the tool call the prompt scripts (`[[mock-tool ...]]`), as a model would decide to.
    let target = work.join("done.txt");
    let task = format!(
        "Create the file done.txt containing the word done, then say finished. [[mock-tool Write {}]]",
        json!({"file_path": target, "content": "done"})
    );
    claude
        .current_dir(&work)
        .env("ANTHROPIC_BASE_URL", &base)
        .env("ANTHROPIC_API_KEY", &token)
        .stdin(std::process::Stdio::null())
        .args([
            "-p",
            &task,
            "--model",
            "claude-haiku-4-5",
            "--allowedTools",
            "Write",
        ]);
    let said = run(&mut claude, "claude -p");
    assert!(!said.trim().is_empty());
    assert_eq!(
        std::fs::read_to_string(&target)
            .map(|s| s.trim().to_owned())
            .ok()
            .as_deref(),
        Some("done"),
        "Claude Code did not run the tool turn:\n{said}"
    );

    // Codex CLI: a provider entry in its config.toml pointing at the gateway, the token in an env var.
    let codex_home = dir.0.join("codex-home");
    std::fs::create_dir_all(&codex_home).unwrap();
    std::fs::write(
        codex_home.join("config.toml"),
        format!(
            "model = \"gpt-4o-mini\"\nmodel_provider = \"tollgate\"\n# Built-in web search has no bound on its cost: the gateway refuses it (400 cost_unbounded).\nweb_search = \"disabled\"\n\n[model_providers.tollgate]\nname = \"Tollgate\"\nbase_url = \"{base}/v1\"\nenv_key = \"TOLLGATE_TOKEN\"\nwire_api = \"responses\"\n"
        ),
    )
    .unwrap();
    let work = dir.0.join("codex-work");
    std::fs::create_dir_all(&work).unwrap();
    let mut codex = Command::new(agents.join("codex"));
    quiet(&mut codex, &dir.0.join("codex-user-home"));
    codex
        .current_dir(&work)
        .env("CODEX_HOME", &codex_home)
        .env("TOLLGATE_TOKEN", &token)
        .stdin(std::process::Stdio::null())
        .args([
            "exec",
            "--skip-git-repo-check",
            "--sandbox",
            "workspace-write",
            "Create the file done.txt containing the word done, then say finished. \
             [[mock-tool exec_command {\"cmd\":\"echo done > done.txt\"}]]",
        ]);
    let said = run(&mut codex, "codex exec");
    assert!(!said.trim().is_empty());
    assert_eq!(
        std::fs::read_to_string(work.join("done.txt"))
            .map(|s| s.trim().to_owned())
            .ok()
            .as_deref(),
        Some("done"),
        "Codex did not run the tool turn:\n{said}"
    );

    // Both agents' requests went through the gateway, identified as the demo token and priced.
    let log = g.output();
    let requests: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == "request")
        .collect();
    for (api, model) in [("anthropic", "claude-haiku-4-5"), ("openai", "gpt-4o-mini")] {
        let mine: Vec<&Value> = requests
            .iter()
            .filter(|r| r["model"] == model && r["status"] == 200)
            .collect();
        assert!(!mine.is_empty(), "no {api} request for {model} in:\n{log}");
        assert!(mine.iter().all(|r| r["subject"] == "demo"), "{mine:?}");
        assert!(
            mine.iter()
                .any(|r| r["cost_pusd"].as_i64().unwrap_or(0) > 0),
            "{mine:?}"
        );
    }

    // Their spend appears in `tollgate spend` (the demo budget) and, by model, in the control plane.
    let cfg = dir.0.join("quickstart.toml");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = run(
            Command::new(bin("tollgate")).args([
                "spend",
                "--json",
                "--config",
                cfg.to_str().unwrap(),
            ]),
            "tollgate spend",
        );
        let demo = out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|r| r["budget"] == "demo");
        if demo
            .as_ref()
            .and_then(|d| d["spent_usd"].as_str())
            .is_some_and(|s| s.trim_start_matches('$').parse::<f64>().unwrap_or(0.0) > 0.0)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no demo spend: {out}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let admin = g.wait_json(&[("event", json!("admin_listening"))])["addr"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let root = std::fs::read_to_string(dir.0.join(".tollgate/admin-token")).unwrap();
    let r = request(
        admin,
        format!(
            "GET /admin/v1/spend?group_by=model&granularity=hour HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            root.trim()
        )
        .as_bytes(),
    );
    let rows = r.json()["rows"].as_array().cloned().unwrap_or_default();
    for model in ["claude-haiku-4-5", "gpt-4o-mini"] {
        assert!(
            rows.iter().any(|x| x["dims"]["model"] == model),
            "{model} missing from the spend query: {}",
            r.text()
        );
    }
}
