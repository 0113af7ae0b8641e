//! The `tollgate` binary: `serve` runs a gateway (SIGHUP re-reads and applies its configuration file, see
//! [`Gateway::reload`]; a file with errors is refused with a `reload_failed` event and the running
//! configuration stays), `check-config` validates a configuration file, `service-token` creates, revokes and
//! lists the tokens CI/CD agents present, `login` signs a person in at their IdP and `token` prints a fresh
//! access token for scripts.

#![forbid(unsafe_code)]

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tollgate_core::Config;

/// mimalloc instead of glibc's malloc: the data plane allocates and frees small buffers on every request,
/// often freed on another thread (the ledger and log threads free what a core sent them), where glibc's
/// arenas take a lock and consolidate; measured in docs/benchmarks.md ("Allocator").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod metrics_page;
mod serve;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("TOLLGATE_GIT_COMMIT"), ")"),
    about = "An AI gateway with real-time cost, identity and dollar budgets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a gateway until SIGTERM or SIGINT; SIGHUP re-reads the configuration file and applies it.
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
        /// The file is a fragment to merge into a configuration (an identity provider's issuer and
        /// policies, say): check the sections it has by the same rules, require none of the others.
        #[arg(long)]
        fragment: bool,
    },
    /// Print current spend and the remaining amount per budget and per identity, from the spend store
    /// (read-only: safe while a gateway runs) and journal entries not yet in it.
    Spend {
        /// The gateway's configuration file (its budgets and `[ledger] dir`).
        #[arg(long, short, required_unless_present = "url", conflicts_with = "url")]
        config: Option<PathBuf>,
        /// Only this budget.
        #[arg(long)]
        budget: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// A running control plane instead: spend over a window, grouped (`--group-by`).
        #[arg(long)]
        url: Option<String>,
        /// With --url: an admin token with the finance role (else `TOLLGATE_ADMIN_TOKEN`).
        #[arg(
            long,
            env = "TOLLGATE_ADMIN_TOKEN",
            hide_env_values = true,
            requires = "url"
        )]
        token: Option<String>,
        /// With --url: dimensions, comma-separated: identity, group, service_token, model, provider,
        /// attribute:KEY.
        #[arg(long, requires = "url")]
        group_by: Option<String>,
        /// With --url: RFC 3339 start (default: seven days ago).
        #[arg(long, requires = "url")]
        from: Option<String>,
        /// With --url: RFC 3339 end (default: now).
        #[arg(long, requires = "url")]
        to: Option<String>,
        /// With --url: hour or day.
        #[arg(long, default_value = "day")]
        granularity: String,
        /// With --url: CSV on stdout.
        #[arg(long, requires = "url")]
        csv: bool,
    },
    /// Create, revoke or list service tokens (for CI/CD agents) in a token store directory.
    ServiceToken {
        #[command(subcommand)]
        action: ServiceTokenAction,
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
        #[arg(long, default_value = tollgate_core::auth::login::DEFAULT_SCOPE)]
        scope: String,
        /// The API audience, for IdPs that need one to issue JWT access tokens (Auth0).
        #[arg(long)]
        audience: Option<String>,
        /// The client secret, for IdPs that give installed apps one (Google); stored for refreshes.
        #[arg(long)]
        client_secret: Option<String>,
    },
    /// The control plane on its own, for fleets: the same API as a gateway's `[admin]` listener, on the
    /// store the gateways share; they apply its changes within their catalog poll (500 ms).
    Controlplane {
        #[command(subcommand)]
        action: ControlplaneAction,
    },
    /// Budgets in a running control plane (`--url`): list, get, set FIELD=VALUE, delete, live state.
    Budget {
        #[command(subcommand)]
        action: ObjectAction,
    },
    /// Model policies in a running control plane (`--url`): list, get, set FIELD=VALUE, delete.
    Policy {
        #[command(subcommand)]
        action: ObjectAction,
    },
    /// Make the control plane's policies, budgets and price overrides match a file: prints the plan
    /// (create, update, unchanged; with --prune, delete), then applies it with If-Match.
    Apply {
        #[command(flatten)]
        target: admin::Target,
        /// A configuration fragment: `[[policies]]`, `[[budgets]]`, `[[pricing.overrides]]` (named).
        #[arg(long, short)]
        file: PathBuf,
        /// Also delete the control plane's objects the file does not declare.
        #[arg(long)]
        prune: bool,
        /// Print the plan only.
        #[arg(long)]
        dry_run: bool,
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

#[derive(Subcommand)]
enum ControlplaneAction {
    /// Serve the control plane until SIGTERM or SIGINT.
    Serve {
        /// The gateways' configuration file (its `[admin]`, `[auth]`, `[ledger]` and objects).
        #[arg(long, short)]
        config: PathBuf,
        /// Override `admin.listen`, e.g. `127.0.0.1:0`.
        #[arg(long)]
        listen: Option<String>,
    },
}

/// What `tollgate budget` and `tollgate policy` do.
#[derive(Subcommand)]
enum ObjectAction {
    /// Every object, the file's (owner "file", read-only here) and the API's.
    List {
        #[command(flatten)]
        target: admin::Target,
        #[arg(long)]
        json: bool,
    },
    /// One object with its version.
    Get {
        #[command(flatten)]
        target: admin::Target,
        name: String,
    },
    /// Change fields of an API-owned object (read, change, write with If-Match), e.g. amount_usd=2.50.
    Set {
        #[command(flatten)]
        target: admin::Target,
        name: String,
        #[arg(value_name = "FIELD=VALUE", required = true)]
        fields: Vec<String>,
    },
    /// Delete an API-owned object (the version read is the version deleted).
    Delete {
        #[command(flatten)]
        target: admin::Target,
        name: String,
    },
    /// Live state of a budget: limit, spent, reserved in flight, remaining, reset, per instance.
    State {
        #[command(flatten)]
        target: admin::Target,
        name: String,
        #[arg(long)]
        json: bool,
    },
}

fn object_command(kind: &str, action: ObjectAction) -> anyhow::Result<()> {
    match action {
        ObjectAction::List { target, json } => {
            admin::list(&admin::Client::new(&target)?, kind, json)
        }
        ObjectAction::Get { target, name } => {
            admin::get(&admin::Client::new(&target)?, kind, &name)
        }
        ObjectAction::Set {
            target,
            name,
            fields,
        } => admin::set(&admin::Client::new(&target)?, kind, &name, &fields),
        ObjectAction::Delete { target, name } => {
            admin::delete(&admin::Client::new(&target)?, kind, &name)
        }
        ObjectAction::State { target, name, json } => {
            if kind != "budget" {
                anyhow::bail!("only budgets have live state");
            }
            admin::state(&admin::Client::new(&target)?, &name, json)
        }
    }
}

/// Where the tokens are: a token store directory, the `store.dir` of a gateway config, or a running
/// control plane (`--url`, whose tokens live in the store the gateways share).
#[derive(clap::Args)]
struct StoreArg {
    /// The token store directory (created with mode 0700 if missing).
    #[arg(long, required_unless_present_any = ["config", "url"], conflicts_with_all = ["config", "url"])]
    store: Option<PathBuf>,
    /// A gateway config file: its `[store] dir` is used.
    #[arg(long, short, conflicts_with = "url")]
    config: Option<PathBuf>,
    /// A running control plane, e.g. http://127.0.0.1:8081, instead of a local store.
    #[arg(long)]
    url: Option<String>,
    /// With --url: an admin token (else `TOLLGATE_ADMIN_TOKEN`, else `tollgate login`'s access token).
    #[arg(
        long,
        env = "TOLLGATE_ADMIN_TOKEN",
        hide_env_values = true,
        requires = "url"
    )]
    token: Option<String>,
}

impl StoreArg {
    /// The control plane to call, when `--url` was given.
    fn remote(&self) -> anyhow::Result<Option<admin::Client>> {
        match &self.url {
            None => Ok(None),
            Some(url) => admin::Client::new(&admin::Target {
                url: url.clone(),
                token: self.token.clone(),
            })
            .map(Some),
        }
    }

    fn dir(self) -> anyhow::Result<PathBuf> {
        match (self.store, self.config) {
            (Some(d), _) => Ok(d),
            (None, Some(c)) => Ok(Config::load(&c)
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .store
                .dir),
            (None, None) => anyhow::bail!("give --store DIR or --config FILE"),
        }
    }
}

#[derive(Subcommand)]
enum ServiceTokenAction {
    /// Mint a token: the token alone goes to stdout (shown once), a summary to stderr.
    Create {
        #[command(flatten)]
        store: StoreArg,
        /// Unique among active tokens: 1 to 64 of A-Z a-z 0-9 . _ -
        #[arg(long)]
        name: String,
        /// The team the token's spend is attributed to (same characters as the name).
        #[arg(long)]
        team: String,
        /// Lifetime from now, e.g. 30d, 12h, 90m, 45s.
        #[arg(long, conflicts_with = "expires_at")]
        expires_in: Option<String>,
        /// Absolute expiry, RFC 3339, e.g. 2026-01-31T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// A request attribute the token carries, KEY=VALUE (repeatable): `[attributes]` entries with
        /// `from = "token:KEY"` take their value from it, and the caller cannot override it.
        #[arg(long = "attribute", value_name = "KEY=VALUE")]
        attributes: Vec<String>,
        /// With --url: a budget of its own, in USD (the budget `token-NAME`, scope service_token).
        #[arg(long, requires = "url")]
        budget_usd: Option<String>,
        /// With --budget-usd: its window (day, week, month, or rolling like 1h).
        #[arg(long, default_value = "day", requires = "budget_usd")]
        budget_window: String,
        /// With --url: the models it may use (repeatable; a policy `token-NAME`).
        #[arg(long = "allow-model", requires = "url")]
        allow_models: Vec<String>,
    },
    /// With --url: a new secret for a token; the old one keeps working for --overlap.
    Rotate {
        #[command(flatten)]
        store: StoreArg,
        name: String,
        /// How long the old secret keeps working, e.g. 1h (default: it stops at once).
        #[arg(long)]
        overlap: Option<String>,
    },
    /// Revoke a token by name or id; the gateway refuses it from then on.
    Revoke {
        #[command(flatten)]
        store: StoreArg,
        /// The token's name or id (st_...).
        name_or_id: String,
    },
    /// List tokens (never their secrets or hashes).
    List {
        #[command(flatten)]
        store: StoreArg,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file, fragment } => check_config(&file, fragment),
        Command::Spend {
            url: Some(url),
            token,
            group_by,
            from,
            to,
            granularity,
            csv,
            json,
            budget,
            ..
        } => exit(
            "tollgate spend",
            admin::Client::new(&admin::Target { url, token }).and_then(|c| {
                admin::spend(
                    &c,
                    &admin::SpendArgs {
                        group_by,
                        from,
                        to,
                        granularity,
                        csv,
                        json,
                        budget,
                    },
                )
            }),
        ),
        Command::Spend {
            config,
            budget,
            json,
            ..
        } => match config
            .context("give --config FILE or --url URL")
            .and_then(|c| spend(&c, budget.as_deref(), json))
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate spend: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::ServiceToken { action } => match service_token(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Login {
            issuer,
            client_id,
            scope,
            audience,
            client_secret,
        } => {
            let opts = tollgate_core::auth::login::LoginOptions {
                issuer,
                client_id,
                scope,
                audience,
                client_secret,
            };
            match tollgate_core::auth::login::login(&opts, &mut std::io::stderr()) {
                Ok(_) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tollgate login: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token { issuer, id_token } => {
            let opts = tollgate_core::auth::login::TokenOptions { issuer, id_token };
            match tollgate_core::auth::login::token(&opts) {
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
        Command::Controlplane {
            action: ControlplaneAction::Serve { config, listen },
        } => exit(
            "tollgate controlplane",
            serve::controlplane(&config, listen),
        ),
        Command::Budget { action } => exit("tollgate budget", object_command("budget", action)),
        Command::Policy { action } => exit("tollgate policy", object_command("policy", action)),
        Command::Apply {
            target,
            file,
            prune,
            dry_run,
        } => exit(
            "tollgate apply",
            admin::Client::new(&target).and_then(|c| admin::apply(&c, &file, prune, dry_run)),
        ),
        Command::Serve {
            config,
            listen,
            workers,
        } => match serve::serve(&config, listen, workers) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tollgate: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn exit(what: &str, r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{what}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(file: &std::path::Path, fragment: bool) -> ExitCode {
    let checked = if fragment {
        Config::load_fragment(file).map(|f| {
            println!(
                "{}: ok (fragment: {} providers, {} routes, {} issuers, {} policies, {} budgets)",
                file.display(),
                f.providers,
                f.routes,
                f.issuers,
                f.policies,
                f.budgets
            );
        })
    } else {
        Config::load(file).map(|c| {
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
        })
    };
    match checked {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            for issue in &e.issues {
                eprintln!("{issue}");
            }
            eprintln!("{}: {} problem(s)", file.display(), e.issues.len());
            ExitCode::from(2)
        }
    }
}

fn spend(config: &std::path::Path, budget: Option<&str>, json: bool) -> anyhow::Result<()> {
    let config = Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let rows: Vec<_> = tollgate_dataplane::spend::committer::report(&config)
        .map_err(|e| anyhow::anyhow!(e))?
        .into_iter()
        .filter(|r| budget.is_none_or(|b| r.budget == b))
        .collect();
    let mut out = std::io::stdout().lock();
    if json {
        for r in &rows {
            writeln!(out, "{}", serde_json::to_string(r)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<28} {:<18} {:>14} {:>14} {:>14}  RESETS",
        "INSTANCE", "WINDOW", "SPENT_USD", "LIMIT_USD", "REMAINING_USD"
    )?;
    for r in &rows {
        writeln!(
            out,
            "{:<28} {:<18} {:>14} {:>14} {:>14}  {}",
            r.instance, r.window, r.spent_usd, r.limit_usd, r.remaining_usd, r.resets_at
        )?;
    }
    for r in &rows {
        if r.crash_estimated_usd
            .chars()
            .any(|c| c.is_ascii_digit() && c != '0')
        {
            writeln!(
                out,
                "note: {} includes ${} charged at the reserved amount of requests in flight when a gateway crashed",
                r.instance, r.crash_estimated_usd
            )?;
        }
    }
    Ok(())
}

fn service_token(action: ServiceTokenAction) -> anyhow::Result<()> {
    use tollgate_core::auth::service_tokens::{self, parse_lifetime, TokenStore};
    let when = |t: Option<jiff::Timestamp>| {
        t.map_or_else(
            || "never".to_owned(),
            |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
    };
    match action {
        ServiceTokenAction::Rotate {
            store,
            name,
            overlap,
        } => {
            let c = store
                .remote()?
                .context("rotation needs a control plane: give --url")?;
            let secret = admin::rotate_token(&c, &name, overlap.as_deref())?;
            println!("{secret}");
            eprintln!(
                "rotated {name}; the new token above is shown once{}",
                overlap.map_or(String::new(), |o| format!(
                    ", the old one works for {o} more"
                ))
            );
        }
        ServiceTokenAction::Create {
            store,
            name,
            team,
            expires_in,
            expires_at,
            attributes,
            budget_usd,
            budget_window,
            allow_models,
        } => {
            let mut attrs = std::collections::BTreeMap::new();
            for a in &attributes {
                let (k, v) = a
                    .split_once('=')
                    .with_context(|| format!("--attribute {a:?} is not KEY=VALUE"))?;
                if attrs.insert(k.to_owned(), v.to_owned()).is_some() {
                    anyhow::bail!("--attribute {k:?} is given more than once");
                }
            }
            if let Some(c) = store.remote()? {
                if expires_at.is_some() {
                    anyhow::bail!("with --url, give the lifetime as --expires-in");
                }
                let budget = budget_usd.map(|usd| (usd, budget_window));
                let secret = admin::create_token(
                    &c,
                    &name,
                    &team,
                    expires_in.as_deref(),
                    &attrs,
                    budget,
                    &allow_models,
                )?;
                println!("{secret}");
                eprintln!(
                    "created service token {name} for team {team} through the control plane\n\
                     the token above is shown once: store it now"
                );
                return Ok(());
            }
            let expires_at = match (expires_in, expires_at) {
                (Some(spec), _) => Some(
                    jiff::Timestamp::now()
                        .checked_add(parse_lifetime(&spec)?)
                        .with_context(|| format!("--expires-in {spec:?} is too far ahead"))?,
                ),
                (None, Some(at)) => Some(
                    at.parse::<jiff::Timestamp>()
                        .with_context(|| format!("--expires-at {at:?} is not an RFC 3339 time"))?,
                ),
                (None, None) => None,
            };
            let (token, secret) =
                TokenStore::open(&store.dir()?)?.create_with(&name, &team, expires_at, attrs)?;
            println!("{}", secret.expose());
            eprintln!(
                "created service token {} ({}) for team {}, expires {}\n\
                 the token above is shown once: store it now",
                token.name,
                token.id,
                token.team,
                when(token.expires_at)
            );
        }
        ServiceTokenAction::Revoke { store, name_or_id } if store.url.is_some() => {
            let c = store.remote()?.context("--url")?;
            admin::revoke_token(&c, &name_or_id)?;
            eprintln!("revoked {name_or_id}");
        }
        ServiceTokenAction::List { store, json } if store.url.is_some() => {
            let c = store.remote()?.context("--url")?;
            admin::list_tokens(&c, json)?;
        }
        ServiceTokenAction::Revoke { store, name_or_id } => {
            let token = TokenStore::open(&store.dir()?)?.revoke(&name_or_id)?;
            eprintln!("revoked {} ({})", token.name, token.id);
        }
        ServiceTokenAction::List { store, json } => {
            // Read-only: listing never creates the store directory.
            let tokens = service_tokens::load(&store.dir()?)?.tokens;
            let now = jiff::Timestamp::now();
            if json {
                for t in &tokens {
                    let line = serde_json::json!({
                        "id": t.id,
                        "name": t.name,
                        "team": t.team,
                        "created_at": t.created_at,
                        "expires_at": t.expires_at,
                        "revoked_at": t.revoked_at,
                        "attributes": t.attributes,
                        "status": t.status(now).as_str(),
                    });
                    println!("{line}");
                }
            } else {
                let mut rows = vec![[
                    "ID".to_owned(),
                    "NAME".to_owned(),
                    "TEAM".to_owned(),
                    "CREATED".to_owned(),
                    "EXPIRES".to_owned(),
                    "STATUS".to_owned(),
                ]];
                rows.extend(tokens.iter().map(|t| {
                    [
                        t.id.clone(),
                        t.name.clone(),
                        t.team.clone(),
                        when(Some(t.created_at)),
                        when(t.expires_at),
                        t.status(now).to_string(),
                    ]
                }));
                let mut widths = [0usize; 6];
                for r in &rows {
                    for (w, c) in widths.iter_mut().zip(r) {
                        *w = (*w).max(c.len());
                    }
                }
                for r in &rows {
                    let cells: Vec<String> = r
                        .iter()
                        .zip(widths)
                        .map(|(c, w)| format!("{c:<w$}"))
                        .collect();
                    println!("{}", cells.join("  ").trim_end());
                }
            }
        }
    }
    Ok(())
}
