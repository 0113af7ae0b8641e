//! `tollgate serve`: one gateway process. Opens the spend store, builds the configuration from the file and
//! the control plane's catalog, starts the data plane (and the bundled mock when a provider has no key),
//! and keeps the configuration current from one control thread.
//!
//! Owns: the control thread, the only place a running gateway's configuration changes. It applies a new
//! configuration on SIGHUP (the file changed), when this process's control plane wrote the catalog (at
//! once), and when the catalog version in the store moved (another node's control plane wrote it: polled
//! every [`CATALOG_POLL`], so a change made anywhere is applied here within that period plus one reload).
//!
//! Fails: at start with the reason (invalid file, a catalog object the file no longer accepts, a store that
//! cannot be opened); while running, a configuration that does not validate or a store that cannot be read
//! is logged (`reload_failed`, `catalog_unreadable`) and the running configuration is kept. Cost: one
//! store read of one key per poll, off the cores; a reload as today.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tollgate_core::catalog::{self, effective::Validator, CatalogError};
use tollgate_core::config::parse_base_url;
use tollgate_core::store::Store;
use tollgate_core::Config;
use tollgate_dataplane::{BuildOptions, Gateway};

/// How often every gateway reads the catalog version: the bound on how late a change made through another
/// node's control plane is applied here (plus one reload, milliseconds).
pub const CATALOG_POLL: Duration = Duration::from_millis(500);

/// What wakes the control thread.
#[derive(Debug)]
pub enum Trigger {
    /// SIGHUP: the file changed.
    File,
    /// This process's control plane wrote the catalog.
    Catalog,
    /// SIGTERM or SIGINT.
    Stop,
}

/// What the control thread needs to rebuild the configuration.
struct Control {
    path: PathBuf,
    listen: Vec<String>,
    workers: Option<usize>,
    store: Arc<dyn Store>,
    opts: BuildOptions,
    mock: Option<tollgate_loadtest::MockHandle>,
    /// The catalog version the running configuration includes.
    applied: u64,
}

/// Applies the command line's `--listen` and `--workers` over the file's `[server]`.
fn apply_overrides(
    config: &mut Config,
    listen: &[String],
    workers: Option<usize>,
) -> anyhow::Result<()> {
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
    Ok(())
}

/// Whether some provider will be served by the bundled mock (it allows it and has no key).
fn needs_mock(config: &Config) -> bool {
    config.providers.iter().any(|p| {
        p.mock_when_no_key
            && (p.key == tollgate_core::config::KeySource::None || p.load_key().is_err())
    })
}

/// Starts the bundled mock provider and points `opts` at it.
fn start_mock(opts: &mut BuildOptions) -> anyhow::Result<tollgate_loadtest::MockHandle> {
    let cfg = tollgate_loadtest::MockConfig {
        defaults: tollgate_loadtest::MockDefaults {
            expected_key: Some(tollgate_dataplane::runtime::snapshot::MOCK_KEY.to_owned()),
            ..Default::default()
        },
        threads: 1,
        ..Default::default()
    };
    let m = tollgate_loadtest::spawn(cfg).context("starting the bundled mock provider")?;
    opts.mock_base =
        Some(parse_base_url(&format!("http://{}", m.addr())).map_err(anyhow::Error::msg)?);
    Ok(m)
}

/// The quickstart's first admin credential: with `[auth] demo_token` and no admin token in the catalog,
/// mints `demo-admin` (role admin), prints it once on stderr and saves it to `<store.dir>/admin-token`
/// (mode 0600), so a new user's first control-plane calls work without another step.
fn demo_admin_token(store: &dyn Store, dir: &Path) -> anyhow::Result<()> {
    use catalog::tokens::StoredToken;
    let snap = catalog::read(store).context("reading the control plane's catalog")?;
    let path = dir.join("admin-token");
    if !catalog::effective::admin_tokens(&snap).is_empty() {
        if path.exists() {
            eprintln!(
                "tollgate: the demo admin token (control plane) is in {}",
                path.display()
            );
        }
        return Ok(());
    }
    let (token, secret) = StoredToken::mint(
        "demo-admin",
        "demo",
        None,
        Default::default(),
        Some(catalog::Role::Admin),
    )?;
    let actor = catalog::Actor {
        principal: "cli".into(),
        role: Some(catalog::Role::Admin),
        from: "local".into(),
    };
    let spec = serde_json::to_value(&token)?;
    catalog::write(
        store,
        &catalog::WriteRequest {
            changes: vec![catalog::Change {
                kind: catalog::Kind::ServiceToken,
                name: "demo-admin".into(),
                spec: Some(spec),
                precondition: catalog::Precondition::Absent,
            }],
            actor: &actor,
            action: "create",
            idempotency: None,
            answer: &|_| (201, serde_json::Value::Null),
            validate: &|_| Ok(()),
            file_owned: &|_, _| None,
        },
    )
    .map_err(|e| anyhow::anyhow!("creating the demo admin token: {}", describe(&e)))?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    tollgate_dataplane::runtime::credentials::write_private(
        &path,
        format!("{}\n", secret.expose()).as_bytes(),
    )
    .with_context(|| format!("saving {}", path.display()))?;
    eprintln!(
        "tollgate: created the demo admin token {} (control plane, role admin); it is saved in {}",
        token.id,
        path.display()
    );
    Ok(())
}

/// A catalog error as lines an operator can act on.
pub fn describe(e: &CatalogError) -> String {
    match e {
        CatalogError::Invalid { kind, name, issues } => {
            let mut s = if name.is_empty() {
                "the configuration is invalid:".to_owned()
            } else {
                format!("the control plane's {kind} {name:?} is invalid:")
            };
            for i in issues {
                s.push_str(&format!("\n  {}: {}", i.field, i.reason));
            }
            s
        }
        other => other.to_string(),
    }
}

/// The file plus the catalog as of `snap`, with the command line's overrides.
fn effective(
    path: &Path,
    snap: &catalog::Snapshot,
    listen: &[String],
    workers: Option<usize>,
) -> anyhow::Result<Config> {
    let v = Validator::new(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let mut config = v
        .config(snap)
        .map_err(|e| anyhow::anyhow!("{}", describe(&e)))?;
    apply_overrides(&mut config, listen, workers)?;
    Ok(config)
}

pub fn serve(path: &Path, listen: Vec<String>, workers: Option<usize>) -> anyhow::Result<()> {
    let file = Config::load(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let opened = tollgate_dataplane::spend::committer::open(&file.ledger)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let store = Arc::clone(&opened.store);
    // The control thread reads the catalog through its own reader, so a poll never waits on a write lock.
    let reader = tollgate_dataplane::spend::committer::open_reader(&file.ledger, &store)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    if file.auth.demo_token {
        demo_admin_token(store.as_ref(), &file.store.dir)?;
    }
    let snap = catalog::read(store.as_ref())
        .with_context(|| "reading the control plane's catalog from the store")?;
    let config = effective(path, &snap, &listen, workers)?;

    // The bundled mock serves providers that allow it and have no key, so the quickstart runs offline.
    let mut opts = BuildOptions::default();
    let mock = if needs_mock(&config) {
        Some(start_mock(&mut opts)?)
    } else {
        None
    };

    // Block the signals before any thread starts so only the waiting thread sees them.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("installing signal handlers")?;
    let gateway =
        Arc::new(Gateway::start_opened(config, &opts, opened).context("starting the gateway")?);
    let (tx, rx) = crossbeam_channel::unbounded::<Trigger>();
    let control = Control {
        path: path.to_owned(),
        listen,
        workers,
        store: reader,
        opts,
        mock,
        applied: snap.version,
    };
    // The control plane, on its own listener and thread: its writes wake the control thread at once.
    let admin = if gateway.config().admin.enabled {
        let hooks = Arc::new(GatewayHooks {
            tx: tx.clone(),
            path: path.to_owned(),
            store: Arc::clone(&control.store),
            gateway: Some(Arc::clone(&gateway)),
        });
        let h = tollgate_controlplane::start(
            tollgate_controlplane::Options {
                admin: gateway.config().admin.clone(),
                config_path: path.to_owned(),
                auth: gateway.config().auth.clone(),
            },
            Arc::clone(&store),
            hooks,
        )
        .context("starting the control plane ([admin])")?;
        gateway.log_value(serde_json::json!({
            "ts": tollgate_dataplane::obs::accesslog::now_rfc3339(),
            "event": "admin_listening",
            "addr": h.addr().to_string(),
        }));
        Some(h)
    } else {
        None
    };
    let thread = {
        let gateway = Arc::clone(&gateway);
        std::thread::Builder::new()
            .name("tollgate-control".into())
            .spawn(move || control.run(&gateway, &rx))
            .context("starting the control thread")?
    };
    for sig in signals.forever() {
        let t = if sig == SIGHUP {
            Trigger::File
        } else {
            Trigger::Stop
        };
        let stop = matches!(t, Trigger::Stop);
        if tx.send(t).is_err() || stop {
            break;
        }
    }
    let _ = tx.send(Trigger::Stop);
    if let Some(h) = admin {
        h.shutdown();
    }
    let mock = thread.join().ok().flatten();
    match Arc::try_unwrap(gateway) {
        Ok(g) => g.shutdown(),
        Err(g) => g.begin_shutdown(),
    }
    if let Some(m) = mock {
        m.shutdown();
    }
    Ok(())
}

/// What the control plane asks of the gateway it runs in.
pub struct GatewayHooks {
    pub tx: crossbeam_channel::Sender<Trigger>,
    pub path: PathBuf,
    /// Read only (the live budgets, the metrics page): `committer::open_reader`'s store.
    pub store: Arc<dyn Store>,
    /// The gateway whose data plane `/metrics` reads; `None` for the control plane alone.
    pub gateway: Option<Arc<Gateway>>,
}

impl tollgate_controlplane::Hooks for GatewayHooks {
    fn changed(&self, _version: u64) {
        let _ = self.tx.send(Trigger::Catalog);
    }

    fn live_budgets(&self) -> Option<serde_json::Value> {
        live_budgets(&self.path, self.store.as_ref())
    }

    fn metrics(&self, openmetrics: bool) -> Option<String> {
        crate::metrics_page::render(
            &self.path,
            self.store.as_ref(),
            self.gateway.as_deref(),
            openmetrics,
        )
    }
}

/// Every budget's instances as the spend store and the journals have them now (what `tollgate spend`
/// prints), keyed by budget name; `spent_usd` at the top when the budget has one instance (a shared one).
pub fn live_budgets(path: &Path, store: &dyn Store) -> Option<serde_json::Value> {
    let snap = catalog::read(store).ok()?;
    let config = Validator::new(path).ok()?.config(&snap).ok()?;
    let rows = tollgate_dataplane::spend::committer::report_on(&config, store).ok()?;
    let mut out = serde_json::Map::new();
    for b in config.budgets.budgets() {
        let mine: Vec<_> = rows.iter().filter(|r| r.budget == *b.name).collect();
        let mut v = serde_json::json!({
            "instances": mine.iter().map(|r| serde_json::json!({
                "instance": r.instance,
                "window": r.window,
                "spent_usd": r.spent_usd,
                "limit_usd": r.limit_usd,
                "remaining_usd": r.remaining_usd,
                "resets_at": r.resets_at,
                "not_yet_committed_usd": r.unreplayed_usd,
            })).collect::<Vec<_>>(),
        });
        if let ([one], Some(o)) = (mine.as_slice(), v.as_object_mut()) {
            o.insert("spent_usd".into(), one.spent_usd.clone().into());
            o.insert("remaining_usd".into(), one.remaining_usd.clone().into());
            o.insert("resets_at".into(), one.resets_at.clone().into());
        }
        out.insert(b.name.to_string(), v);
    }
    Some(serde_json::Value::Object(out))
}

/// `tollgate controlplane serve`: the control plane alone, on the store the gateways use; they apply its
/// changes when they next read the catalog version.
pub fn controlplane(path: &Path, listen: Option<String>) -> anyhow::Result<()> {
    let file = Config::load(path).map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    let store = tollgate_dataplane::spend::committer::open_shared(&file.ledger)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut admin = file.admin.clone();
    if let Some(l) = listen {
        admin.listen = l
            .parse()
            .with_context(|| format!("--listen {l:?} is not an IP:port address"))?;
    }
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    let (tx, _rx) = crossbeam_channel::unbounded::<Trigger>();
    // The live budgets and the metrics page only read: for SQLite through a read-only connection, which
    // takes no write lock from the gateways; for PostgreSQL and FoundationDB the store itself.
    let reader = tollgate_dataplane::spend::committer::open_reader(&file.ledger, &store)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let hooks = Arc::new(GatewayHooks {
        tx,
        path: path.to_owned(),
        store: reader,
        gateway: None,
    });
    let h = tollgate_controlplane::start(
        tollgate_controlplane::Options {
            admin,
            config_path: path.to_owned(),
            auth: file.auth.clone(),
        },
        store,
        hooks,
    )
    .context("starting the control plane")?;
    println!(
        "{}",
        serde_json::json!({
            "ts": tollgate_dataplane::obs::accesslog::now_rfc3339(),
            "event": "listening",
            "addr": h.addr().to_string(),
            "what": "control plane",
        })
    );
    let _ = signals.forever().next();
    h.shutdown();
    Ok(())
}

impl Control {
    /// Runs until [`Trigger::Stop`]; returns the mock for the caller to stop after the gateway.
    fn run(
        mut self,
        gateway: &Gateway,
        rx: &crossbeam_channel::Receiver<Trigger>,
    ) -> Option<tollgate_loadtest::MockHandle> {
        loop {
            let forced = match rx.recv_timeout(CATALOG_POLL) {
                Ok(Trigger::Stop) | Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return self.mock.take()
                }
                Ok(Trigger::File) => true,
                Ok(Trigger::Catalog) => false,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => false,
            };
            match catalog::version(self.store.as_ref()) {
                Ok(v) if v == self.applied && !forced => {}
                Ok(_) => self.reload(gateway),
                Err(e) => gateway.log_value(serde_json::json!({
                    "ts": tollgate_dataplane::obs::accesslog::now_rfc3339(),
                    "event": "catalog_unreadable",
                    "error": e.to_string(),
                    "keeping": "the running configuration",
                })),
            }
        }
    }

    /// Re-reads the file and the catalog and applies them; on any error logs `reload_failed` with every
    /// issue and keeps the running configuration.
    fn reload(&mut self, gateway: &Gateway) {
        let started = std::time::Instant::now();
        let file = self.path.display().to_string();
        let failed = |issues: Vec<serde_json::Value>| {
            gateway.log_value(serde_json::json!({
                "ts": tollgate_dataplane::obs::accesslog::now_rfc3339(),
                "event": "reload_failed",
                "file": file,
                "issues": issues,
                "keeping": "the running configuration",
            }));
        };
        let issue = |field: &str, reason: String| serde_json::json!({ "file": file, "field": field, "reason": reason });
        let snap = match catalog::read(self.store.as_ref()) {
            Ok(s) => s,
            Err(e) => return failed(vec![issue("", format!("reading the catalog: {e}"))]),
        };
        let validator = match Validator::new(&self.path) {
            Ok(v) => v,
            Err(e) => {
                return failed(
                    e.issues
                        .iter()
                        .map(|i| {
                            serde_json::json!({
                                "file": i.file.display().to_string(),
                                "field": i.field,
                                "reason": i.reason,
                            })
                        })
                        .collect(),
                )
            }
        };
        let mut config = match validator.config(&snap) {
            Ok(c) => c,
            Err(CatalogError::Invalid { kind, name, issues }) => {
                return failed(
                    issues
                        .into_iter()
                        .map(|i| {
                            let field = if name.is_empty() {
                                i.field
                            } else {
                                format!("catalog.{kind}.{name}.{}", i.field)
                            };
                            issue(&field, i.reason)
                        })
                        .collect(),
                )
            }
            Err(e) => return failed(vec![issue("", describe(&e))]),
        };
        if let Err(e) = apply_overrides(&mut config, &self.listen, self.workers) {
            return failed(vec![issue("server", format!("{e:#}"))]);
        }
        if self.mock.is_none() && needs_mock(&config) {
            match start_mock(&mut self.opts) {
                Ok(m) => self.mock = Some(m),
                Err(e) => return failed(vec![issue("providers", format!("{e:#}"))]),
            }
        }
        if let Err(e) = gateway.reload(config, &self.opts) {
            let tollgate_dataplane::ReloadError::Build(
                tollgate_dataplane::runtime::snapshot::BuildError::Provider { provider, reason },
            ) = e;
            return failed(vec![issue(&format!("providers.{provider}"), reason)]);
        }
        if snap.version != self.applied {
            gateway.log_value(serde_json::json!({
                "ts": tollgate_dataplane::obs::accesslog::now_rfc3339(),
                "event": "catalog_applied",
                "version": snap.version,
                "previous": self.applied,
                // Reading the catalog, validating file plus catalog, building and publishing the snapshot.
                "took_us": u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            }));
        }
        self.applied = snap.version;
    }
}
