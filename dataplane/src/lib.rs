//! Tollgate's data plane: a thread-per-core HTTP/1.1 proxy in front of LLM providers.
//!
//! Read [`pipeline`] first: it is the request path, top-down, as named phases over one context. Around it,
//! one folder per layer: [`net`] (HTTP/1.1 parsing and framing, SSE, client and upstream connections, moving
//! a connection between cores), [`providers`] (what each provider API means on the wire), [`spend`] (the
//! most a request can cost, budget shards and reservations, slices, fleet leases, the journal and the thread
//! that commits spend to the store), [`runtime`] (workers and listeners, every core's inbox, the published
//! snapshot, DNS and credentials threads, reload rules) and [`obs`] (the access log and alert webhooks, off
//! the cores). [`error`] is the one error type and its status mapping.
//!
//! [`Gateway`] wires them together for the binary and for tests, and applies a changed configuration to a
//! running gateway ([`Gateway::reload`]).

#![deny(unsafe_code)]

pub mod error;
pub mod net;
pub mod obs;
pub mod pipeline;
pub mod providers;
pub mod runtime;
pub mod spend;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tollgate_core::Config;

pub use error::{Error, ErrorKind};
pub use runtime::snapshot::{BuildOptions, Snapshot};

/// A running gateway: workers, resolver and log writer.
#[derive(Debug)]
pub struct Gateway {
    pub addrs: Vec<SocketAddr>,
    pub driver: &'static str,
    pub workers: usize,
    shutdown: Arc<AtomicBool>,
    published: runtime::snapshot::Published,
    identity_ctl: runtime::credentials::IdentityControl,
    server: runtime::server::Workers,
    resolver: Option<std::thread::JoinHandle<()>>,
    identity: Option<std::thread::JoinHandle<()>>,
    webhook_thread: Option<std::thread::JoinHandle<obs::webhook::WebhookTotals>>,
    /// Webhooks dropped because their queue was full (`/metrics`).
    webhooks_dropped: Arc<std::sync::atomic::AtomicU64>,
    ledger: Option<spend::committer::LedgerHandle>,
    logger: Option<obs::accesslog::Logger>,
    log_writer: Option<std::thread::JoinHandle<()>>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] runtime::snapshot::BuildError),
    #[error(transparent)]
    Identity(#[from] runtime::credentials::IdentityError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Ledger(String),
}

/// Why a reload was not applied (the old configuration stays in effect).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Build(#[from] runtime::snapshot::BuildError),
}

/// How long a reload waits for the identity thread to publish the new policies before publishing the new
/// snapshot anyway (it is busy only while fetching an issuer's keys, bounded by the fetch timeouts).
pub const IDENTITY_ACK: std::time::Duration = std::time::Duration::from_secs(5);

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub providers: usize,
    pub routes: usize,
    pub budgets: usize,
    pub policies: usize,
    pub issuers: usize,
    /// Providers whose endpoint is new (resolved during the reload).
    pub resolved: usize,
    /// The identity thread acknowledged the new policies and issuers within [`IDENTITY_ACK`].
    pub identity_published: bool,
    /// Start-only settings that changed in the file and were left as they run.
    pub restart_required: Vec<&'static str>,
    /// Cores whose budget mailbox refused the rekey message, with the reason.
    pub rekey_failed: Vec<(usize, String)>,
}

impl ReloadOutcome {
    fn log(&self, l: &obs::accesslog::Logger) {
        let ts = obs::accesslog::now_rfc3339();
        if !self.restart_required.is_empty() {
            l.value(serde_json::json!({
                "ts": ts,
                "event": "reload_restart_required",
                "fields": self.restart_required,
                "reason": "these settings take effect at start: restart to apply them; the running values are kept",
            }));
        }
        for (core, reason) in &self.rekey_failed {
            l.value(serde_json::json!({
                "ts": ts,
                "event": "budget_rekey_failed",
                "core": core,
                "reason": reason,
            }));
        }
        l.value(serde_json::json!({
            "ts": ts,
            "event": "reloaded",
            "providers": self.providers,
            "routes": self.routes,
            "budgets": self.budgets,
            "policies": self.policies,
            "issuers": self.issuers,
            "resolved": self.resolved,
            "identity_published": self.identity_published,
        }));
    }
}

/// Where a gateway's spend store comes from.
enum StoreChoice {
    /// Opened from `[ledger]` at start.
    Configured,
    /// Already opened (and locked) by the caller.
    Opened(spend::committer::Opened),
    /// Given (tests), shared with other gateways when the flag is set.
    Given(Box<dyn tollgate_core::store::Store>, bool),
}

impl Gateway {
    /// Builds the first snapshot, resolves provider hosts once, starts the log writer, resolver and workers,
    /// and logs one `listening` event per address (tests read the bound port from it).
    pub fn start(config: Config, opts: &BuildOptions) -> Result<Gateway, StartError> {
        Gateway::start_inner(config, opts, StoreChoice::Configured)
    }

    /// [`Gateway::start`] with the spend store given instead of opened from `[ledger]` (tests; a
    /// [`tollgate_core::store::mem::MemStore`] clone is the same store). With `fleet`, the store
    /// is shared with other gateways: fleet mode, where budget limits hold across all of them through
    /// budget leases (see [`spend::leases`] and `docs/fleet.md`).
    pub fn start_with_store(
        config: Config,
        opts: &BuildOptions,
        store: Box<dyn tollgate_core::store::Store>,
        fleet: bool,
    ) -> Result<Gateway, StartError> {
        Gateway::start_inner(config, opts, StoreChoice::Given(store, fleet))
    }

    /// [`Gateway::start`] on the store [`spend::committer::open`] opened (the binary opens it first, to
    /// read the control plane's catalog before it builds the configuration).
    pub fn start_opened(
        config: Config,
        opts: &BuildOptions,
        opened: spend::committer::Opened,
    ) -> Result<Gateway, StartError> {
        Gateway::start_inner(config, opts, StoreChoice::Opened(opened))
    }

    fn start_inner(
        config: Config,
        opts: &BuildOptions,
        store: StoreChoice,
    ) -> Result<Gateway, StartError> {
        let fleet = config.ledger.store.is_fleet() || matches!(store, StoreChoice::Given(_, true));
        if fleet {
            // Leases are per calendar window; a rolling window has no fixed start to lease against.
            if let Some(b) = config.budgets.budgets().iter().find(|b| {
                b.window.is_rolling() && !matches!(b.action, tollgate_core::budget::Action::Alert)
            }) {
                return Err(StartError::Ledger(format!(
                    "budgets.{}: window \"{}\" is rolling, and fleet mode (a shared spend store) leases \
                     calendar windows only: use a day, week or month window, or action = \"alert\"",
                    b.name, b.window
                )));
            }
        }
        let config = Arc::new(config);
        let (logger, log_writer) = obs::accesslog::Logger::start()?;
        let snap = Snapshot::build(Arc::clone(&config), opts)?;
        // The estimate path's tokenizer is built here, never on a core.
        if !spend::estimate::warm() {
            logger.event(
                "tokenizer_unavailable",
                &[("fallback", "bytes/4 estimates")],
            );
        }
        for p in &snap.providers {
            runtime::resolve::resolve_now(p, &logger);
            if p.is_mock {
                logger.event(
                    "provider_mocked",
                    &[
                        ("provider", &p.name),
                        (
                            "reason",
                            "no API key configured: serving from the bundled mock",
                        ),
                    ],
                );
            }
        }
        let published: runtime::snapshot::Published = Arc::new(ArcSwap::from_pointee(snap));
        let shutdown = Arc::new(AtomicBool::new(false));
        let resolver = runtime::resolve::spawn(
            Arc::clone(&published),
            config.upstream.dns_refresh,
            logger.clone(),
            Arc::clone(&shutdown),
        )?;
        let (auth, identity_ctl, identity) =
            runtime::credentials::start(&config, &logger, Arc::clone(&shutdown))?;
        // Alert webhooks go out from their own thread (idle on its queue until a budget with a webhook
        // alerts; always there, so a reload can add webhooks).
        let (webhooks, webhook_thread) = obs::webhook::Webhooks::start(logger.clone())?;
        let webhooks_dropped = webhooks.dropped_counter();
        // Spend: the store, earlier runs' journals replayed, and the history the budgets start from.
        let ledger = match store {
            StoreChoice::Configured => spend::committer::start(&config.ledger, &logger),
            StoreChoice::Opened(o) => spend::committer::start_opened(o, &config.ledger, &logger),
            StoreChoice::Given(store, fleet) => std::fs::create_dir_all(&config.ledger.dir)
                .map_err(|e| format!("ledger.dir {}: {e}", config.ledger.dir.display()))
                .and_then(|()| {
                    spend::committer::start_fleet(store, &config.ledger, &logger, fleet)
                }),
        }
        .map_err(StartError::Ledger)?;
        let server = runtime::server::start(
            &config,
            Arc::clone(&published),
            auth,
            Some(webhooks),
            &logger,
            Arc::clone(&shutdown),
            runtime::server::Spend {
                tx: ledger.handle.tx.clone(),
                health: Arc::clone(&ledger.handle.health),
                run: ledger.handle.run.clone(),
                journal_dir: ledger.handle.journal_dir.clone(),
                history: Arc::new(ledger.history),
                fail_closed_after: config.ledger.fail_closed_after,
                fleet_ttl_ms: fleet.then_some(config.ledger.fleet.lease_ttl_ms),
                fleet_clock_offset_ms: config.ledger.fleet.clock_offset_ms,
                ledger_thread: ledger.handle.waker(),
            },
        )?;
        for a in &server.addrs {
            logger.value(serde_json::json!({
                "ts": obs::accesslog::now_rfc3339(),
                "event": "listening",
                "addr": a.to_string(),
                "workers": server.count,
                "driver": server.driver,
                "pinned": server.pinned,
            }));
        }
        Ok(Gateway {
            addrs: server.addrs.clone(),
            driver: server.driver,
            workers: server.count,
            shutdown,
            published,
            identity_ctl,
            server,
            resolver: Some(resolver),
            identity: Some(identity),
            webhook_thread: Some(webhook_thread),
            webhooks_dropped,
            ledger: Some(ledger.handle),
            logger: Some(logger),
            log_writer: Some(log_writer),
        })
    }

    /// Applies a new, validated configuration to the running gateway; in-flight requests finish on the
    /// snapshot they loaded, nothing is dropped.
    ///
    /// In order: settings that only take effect at start (see [`runtime::reload::RESTART_REQUIRED`]) are kept as running and
    /// named in the outcome; the new snapshot is built (keys, TLS configs, headers) and its providers get
    /// their addresses (carried over where the endpoint is unchanged, resolved once here otherwise); the
    /// identity thread publishes the new `[auth]` issuers and `[[policies]]` (waited for, up to
    /// [`IDENTITY_ACK`]), so a new route never serves before its policies; the snapshot is published with one
    /// store; then every core rekeys its budget ledger. Connection pools are keyed by endpoint and survive.
    ///
    /// Fails: a snapshot that cannot be built returns the error and changes nothing. Logs `reloaded`
    /// (and `reload_restart_required` when start-only settings changed) on success. Cost: control-side
    /// work (key and CA files, DNS for new hosts); the cores see one atomic swap and one mailbox message each.
    pub fn reload(
        &self,
        config: Config,
        opts: &BuildOptions,
    ) -> Result<ReloadOutcome, ReloadError> {
        let old = self.published.load_full();
        let mut config = config;
        let restart_required = runtime::reload::restart_required(&old.config, &config);
        // Start-only settings stay as they run, so the published config says what is in effect.
        config.server = old.config.server.clone();
        config.upstream = old.config.upstream.clone();
        config.log = old.config.log.clone();
        config.store = old.config.store.clone();
        config.ledger = old.config.ledger.clone();
        config.auth.demo_token = old.config.auth.demo_token;
        let config = Arc::new(config);
        let snap = Snapshot::build(Arc::clone(&config), opts)?;
        let log = self.logger.as_ref();
        let mut resolved = 0;
        for p in &snap.providers {
            let kept = old
                .providers
                .iter()
                .find(|o| o.pool_key == p.pool_key)
                .map(|o| o.addrs.load_full())
                .filter(|a| !a.is_empty());
            match (kept, log) {
                (Some(addrs), _) => p.addrs.store(addrs),
                (None, Some(l)) => {
                    runtime::resolve::resolve_now(p, l);
                    resolved += 1;
                }
                (None, None) => {}
            }
            let was_mock = old.providers.iter().any(|o| o.name == p.name && o.is_mock);
            if let (true, false, Some(l)) = (p.is_mock, was_mock, log) {
                l.event(
                    "provider_mocked",
                    &[
                        ("provider", &p.name),
                        (
                            "reason",
                            "no API key configured: serving from the bundled mock",
                        ),
                    ],
                );
            }
        }
        let (done_tx, done_rx) = crossbeam_channel::bounded(1);
        let sent = self
            .identity_ctl
            .reload
            .try_send(runtime::credentials::Reload {
                auth: config.auth.clone(),
                policies: Arc::clone(&config.policies),
                tokens: Arc::clone(&config.service_tokens),
                done: done_tx,
            });
        let identity_published = sent.is_ok() && done_rx.recv_timeout(IDENTITY_ACK).is_ok();
        let outcome = ReloadOutcome {
            providers: snap.providers.len(),
            routes: config.routes.len(),
            budgets: config.budgets.budgets().len(),
            policies: config.policies.len(),
            issuers: config.auth.issuers.len(),
            resolved,
            identity_published,
            restart_required,
            rekey_failed: Vec::new(),
        };
        self.published.store(Arc::new(snap));
        let outcome = ReloadOutcome {
            rekey_failed: self.server.rekey(&config.budgets),
            ..outcome
        };
        if let Some(l) = log {
            outcome.log(l);
        }
        Ok(outcome)
    }

    /// Logs one JSON event line (e.g. `reload_failed` from the binary).
    pub fn log_value(&self, v: serde_json::Value) {
        if let Some(l) = &self.logger {
            l.value(v);
        }
    }

    /// The data plane's metrics as of now: every core's last published counts merged, the ledger thread's
    /// numbers and the drop counts (see [`obs::exposition`]). Off the cores; never waits on one.
    pub fn metrics(&self) -> obs::exposition::GatewayMetrics {
        use std::sync::atomic::Ordering::Relaxed;
        let ledger = self.ledger.as_ref().map(|l| {
            let h = &l.health;
            let m = &h.metrics;
            obs::exposition::LedgerView {
                commits: h.commits.load(Relaxed),
                settlements: m.settlements.load(Relaxed),
                failures: m.failures.load(Relaxed),
                recovered: m.recovered.load(Relaxed),
                pending_entries: m.pending_entries.load(Relaxed),
                store_failing: h.failing(),
                lease_transactions: [
                    m.lease_granted.load(Relaxed),
                    m.lease_refused.load(Relaxed),
                    m.lease_failed.load(Relaxed),
                ],
                commit_us: m.commit_us.iter().map(|c| c.load(Relaxed)).collect(),
                commit_us_sum: m.commit_us_sum.load(Relaxed),
                batch: m.batch.iter().map(|c| c.load(Relaxed)).collect(),
                batch_sum: m.batch_sum.load(Relaxed),
            }
        });
        obs::exposition::GatewayMetrics {
            merged: obs::metrics::merge_slots(&self.server.metrics),
            workers: self.workers,
            ledger,
            access_log_dropped: self.logger.as_ref().map_or(0, |l| l.dropped_total()),
            webhooks_dropped: self.webhooks_dropped.load(Relaxed),
        }
    }

    /// The configuration in effect (the published snapshot's).
    pub fn config(&self) -> Arc<Config> {
        Arc::clone(&self.published.load().config)
    }

    /// Starts a graceful shutdown; returns at once.
    pub fn begin_shutdown(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }

    /// Shuts down gracefully and waits: workers finish in-flight requests (up to the grace period), then the
    /// resolver stops and the log writer drains.
    pub fn shutdown(mut self) {
        self.begin_shutdown();
        if let Some(l) = &self.logger {
            l.event("shutting_down", &[]);
        }
        let Gateway {
            server,
            resolver,
            identity,
            webhook_thread,
            ledger,
            logger,
            log_writer,
            ..
        } = &mut self;
        let server = std::mem::replace(server, runtime::server::Workers::empty());
        server.join();
        // Every request has settled: commit what is pending and sync the journals.
        if let Some(mut l) = ledger.take() {
            l.shutdown(std::time::Duration::from_secs(5));
        }
        // FoundationDB's client network must be stopped before the process exits (after the last commit).
        #[cfg(feature = "fdb")]
        tollgate_core::store::fdb::stop_network();
        if let Some(r) = resolver.take() {
            r.thread().unpark();
            let _ = r.join();
        }
        if let Some(i) = identity.take() {
            let _ = i.join();
        }
        // The workers held the webhook senders; with them gone the thread finishes its queue and ends. A
        // task its runtime never dropped (an idle keep-alive connection's) may still hold a sender, so the
        // wait is bounded: webhooks still being retried after it are abandoned with the process.
        if let Some(w) = webhook_thread.take() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !w.is_finished() && std::time::Instant::now() < deadline {
                std::thread::park_timeout(std::time::Duration::from_millis(20));
            }
            if w.is_finished() {
                let _ = w.join();
            }
        }
        if let Some(l) = logger.take() {
            l.event("stopped", &[]);
            // The same goes for log handles: tell the writer to finish instead of waiting for every clone.
            l.close();
        }
        if let Some(w) = log_writer.take() {
            let _ = w.join();
        }
    }
}
