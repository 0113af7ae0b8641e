//! The `tollgate` binary: `serve` runs a gateway, `check-config` validates a configuration file, `login` signs
//! a person in at their IdP and `token` prints a fresh access token for scripts.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use signal_hook::consts::{SIGINT, SIGTERM};
use tollgate_controlplane::config::{parse_base_url, KeySource};
use tollgate_controlplane::Config;
use tollgate_dataplane::snapshot::MOCK_KEY;
use tollgate_dataplane::{BuildOptions, Gateway};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An AI gateway with real-time cost, identity and dollar budgets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway until SIGTERM or SIGINT.
    Serve {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Override `server.listen` (repeatable), e.g. `127.0.0.1:0`.
        #[arg(long)]
        listen: Vec<String>,
        /// Override `server.workers`.
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a configuration file and print every problem with its file, field and reason.
    CheckConfig {
        /// The TOML configuration file.
        file: PathBuf,
    },
    /// Sign in at your identity provider (OAuth 2.0 device authorization grant) and store the tokens.
    Login {
        /// The IdP's issuer URL (https://, or http:// on loopback only).
        #[arg(long)]
        issuer: String,
        /// The OAuth client ID registered at the IdP for Tollgate.
        #[arg(long)]
        client_id: String,
        /// Scopes to ask for.
        #[arg(long, default_value = tollgate_controlplane::login::DEFAULT_SCOPE)]
        scope: String,
        /// The API audience, for IdPs that need one to issue JWT access tokens (Auth0).
        #[arg(long)]
        audience: Option<String>,
        /// The client secret, for IdPs that give installed apps one (Google); stored for refreshes.
        #[arg(long)]
        client_secret: Option<String>,
    },
    /// Print a fresh access token (refreshed when it is about to expire), e.g. `OPENAI_API_KEY=$(tollgate token)`.
    Token {
        /// Which stored sign-in to use; the last one signed in to when absent.
        #[arg(long)]
        issuer: Option<String>,
        /// Print the ID token instead, for IdPs whose access tokens are opaque (Google).
        #[arg(long)]
        id_token: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => check_config(&file),
        Command::Login {
            issuer,
            client_id,
            scope,
            audience,
            client_secret,
        } => {
            let opts = tollgate_controlplane::login::LoginOptions {
                issuer,
                client_id,
                scope,
                audience,
                client_secret,
            };
            match tollgate_controlplane::login::login(&opts, &mut std::io::stderr()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate login: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token { issuer, id_token } => {
            let opts = tollgate_controlplane::login::TokenOptions { issuer, id_token };
            match tollgate_controlplane::login::token(&opts) {
                // Only the token goes to stdout, so `$(tollgate token)` captures exactly it.
                Ok(t) => match writeln!(std::io::stdout(), "{t}") {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(_) => ExitCode::FAILURE,
                },
                Err(e) => {
                    eprintln!("tollgate token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve {
            config,
            listen,
            workers,
        } => match serve(&config, listen, workers) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn check_config(file: &std::path::Path) -> ExitCode {
    match Config::load(file) {
        Ok(c) => {
            println!(
                "{}: ok ({} providers, {} routes, listening on {})",
                file.display(),
                c.providers.len(),
                c.routes.len(),
                c.server
                    .listen
                    .iter()
                    .map(|a| a.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            for p in &c.providers {
                if let Err(e) = p.load_key() {
                    let fallback = if p.mock_when_no_key {
                        " (the bundled mock will serve it)"
                    } else {
                        ""
                    };
                    println!(
                        "{}: providers.{}: warning: {e}{fallback}",
                        file.display(),
                        p.name
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            for issue in &e.issues {
                eprintln!("{issue}");
            }
            eprintln!("{}: {} problem(s)", file.display(), e.issues.len());
            ExitCode::from(2)
        }
    }
}

fn serve(
    path: &std::path::Path,
    listen: Vec<String>,
    workers: Option<usize>,
) -> anyhow::Result<()> {
    let mut config =
        Config::load(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    if !listen.is_empty() {
        config.server.listen = listen
            .iter()
            .map(|a| {
                a.parse()
                    .with_context(|| format!("--listen {a:?} is not an IP:port address"))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    if let Some(w) = workers {
        config.server.workers = w;
    }

    // The bundled mock serves providers that allow it and have no key, so the quickstart runs offline.
    let needs_mock = config
        .providers
        .iter()
        .any(|p| p.mock_when_no_key && (p.key == KeySource::None || p.load_key().is_err()));
    let mock = if needs_mock {
        let cfg = tollgate_loadtest::MockConfig {
            defaults: tollgate_loadtest::MockDefaults {
                expected_key: Some(MOCK_KEY.to_owned()),
                ..Default::default()
            },
            threads: 1,
            ..Default::default()
        };
        Some(tollgate_loadtest::spawn(cfg).context("starting the bundled mock provider")?)
    } else {
        None
    };
    let mut opts = BuildOptions::default();
    if let Some(m) = &mock {
        opts.mock_base =
            Some(parse_base_url(&format!("http://{}", m.addr())).map_err(anyhow::Error::msg)?);
    }

    // Block the signals before any thread starts so only the waiting thread sees them.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    let gateway = Gateway::start(config, &opts).context("starting the gateway")?;
    if let Some(sig) = signals.forever().next() {
        let _ = sig;
    }
    gateway.shutdown();
    if let Some(m) = mock {
        m.shutdown();
    }
    Ok(())
}
