//! The control plane: Tollgate's admin REST API over the catalog (`tollgate_core::catalog`): policies,
//! budgets, price overrides and service tokens as versioned objects beside the configuration file, the
//! audit log, and a budget's state; with an OpenAPI 3.1 document generated from the handlers.
//!
//! Owns: [`start`] (binds, then serves on one OS thread of its own running a small tokio runtime, off the
//! data plane's cores; returns at once with a [`Handle`]), [`Options`], [`Hooks`] (how the gateway hears of
//! each change) and [`bootstrap_admin_token`] (the first admin token, without the API). The data plane
//! never links this crate, and this crate never links the data plane.
//!
//! Fails: [`StartError`] at start (the address, the TLS files, the thread); afterwards every request's
//! failure is a problem-details response (`problem`), never a panic. Cost: one thread with a current-
//! thread runtime plus tokio's blocking pool for store calls; each write reads the catalog, parses and
//! validates the configuration file once (about a millisecond), control side only.

#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tollgate_core::auth::jwt::AuthConfig;
use tollgate_core::auth::service_tokens::Secret;
use tollgate_core::catalog::{
    self, tokens::StoredToken, Actor, CatalogError, Change, Kind, Precondition, Role, WriteRequest,
};
use tollgate_core::config::AdminConfig;
use tollgate_core::store::Store;

pub mod callers;
pub mod endpoints;
pub mod listener;
pub mod openapi;
pub mod problem;
pub mod routing;

/// What the server needs besides the store.
#[derive(Debug, Clone)]
pub struct Options {
    /// `[admin]`: listen address, TLS, role groups.
    pub admin: AdminConfig,
    /// The gateway's configuration file: read again on every write (so an edited file is seen) to
    /// validate exactly as `tollgate check-config` does.
    pub config_path: PathBuf,
    /// `[auth]`: the issuers whose JWTs may call (with a role from `admin.roles`).
    pub auth: AuthConfig,
}

/// How the gateway hears of the control plane's work.
pub trait Hooks: Send + Sync {
    /// Called after every successful write with the new catalog version (the gateway reloads on it).
    fn changed(&self, version: u64);
    /// The live budget state, keyed by budget name, when the gateway has it.
    fn live_budgets(&self) -> Option<serde_json::Value> {
        None
    }
    /// The process's metrics page for `GET /metrics`: Prometheus text format 0.0.4, or OpenMetrics 1.0
    /// when `openmetrics`; `None` (the default) answers 404. Called on tokio's blocking pool.
    fn metrics(&self, _openmetrics: bool) -> Option<String> {
        None
    }
}

/// Hooks that do nothing (tests, tools).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl Hooks for NoHooks {
    fn changed(&self, _version: u64) {}
}

/// Why [`start`] failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("binding the admin API to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the admin API's TLS setup: {0}")]
    Tls(String),
    #[error("starting the admin API's thread: {0}")]
    Thread(std::io::Error),
}

/// State shared by every handler.
pub struct App {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) hooks: Arc<dyn Hooks>,
    pub(crate) config_path: PathBuf,
    pub(crate) auth: AuthConfig,
    pub(crate) roles: tollgate_core::config::AdminRoles,
    pub(crate) keys: callers::KeyCache,
    /// `[admin] metrics_token`: what `GET /metrics` requires, if anything.
    pub(crate) metrics_token: Option<tollgate_core::config::MetricsToken>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("store", &self.store.kind())
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

/// The running server.
#[derive(Debug)]
pub struct Handle {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Handle {
    /// The bound address (the real port when `listen` asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, lets requests in flight finish (up to 5 s), and joins the thread.
    pub fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Binds `opts.admin.listen` and serves the admin API on a thread of its own; returns at once.
pub fn start(
    opts: Options,
    store: Arc<dyn Store>,
    hooks: Arc<dyn Hooks>,
) -> Result<Handle, StartError> {
    let addr = opts.admin.listen;
    let std_listener =
        std::net::TcpListener::bind(addr).map_err(|source| StartError::Bind { addr, source })?;
    std_listener
        .set_nonblocking(true)
        .map_err(|source| StartError::Bind { addr, source })?;
    let bound = std_listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let tls = match &opts.admin.tls {
        Some(t) => Some(listener::acceptor(&t.cert_file, &t.key_file).map_err(StartError::Tls)?),
        None => None,
    };
    let app = Arc::new(App {
        store,
        hooks,
        config_path: opts.config_path,
        auth: opts.auth,
        roles: opts.admin.roles,
        keys: callers::KeyCache::default(),
        metrics_token: opts.admin.metrics_token,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("tollgate-admin".to_owned())
        .spawn(move || listener::run(std_listener, tls, app, stop_rx))
        .map_err(StartError::Thread)?;
    Ok(Handle {
        addr: bound,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

/// Why [`bootstrap_admin_token`] failed.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error(transparent)]
    Token(#[from] tollgate_core::auth::service_tokens::TokenStoreError),
    #[error("encoding the token: {0}")]
    Encode(String),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
}

/// Creates an admin token named `name` with `role` directly in the catalog (actor `cli`), for the first
/// caller of the API; the secret is returned once and never stored. Fails if the name is taken.
pub fn bootstrap_admin_token(
    store: &dyn Store,
    name: &str,
    role: Role,
) -> Result<Secret, BootstrapError> {
    let (token, secret) = StoredToken::mint(name, "admin", None, Default::default(), Some(role))?;
    let spec = serde_json::to_value(&token).map_err(|e| BootstrapError::Encode(e.to_string()))?;
    let actor = Actor {
        principal: "cli".to_owned(),
        role: Some(Role::Admin),
        from: "local".to_owned(),
    };
    catalog::write(
        store,
        &WriteRequest {
            changes: vec![Change {
                kind: Kind::ServiceToken,
                name: name.to_owned(),
                spec: Some(spec),
                precondition: Precondition::Absent,
            }],
            actor: &actor,
            action: "create",
            idempotency: None,
            answer: &|_| (201, serde_json::Value::Null),
            // An admin token touches no configuration the validator reads.
            validate: &|_| Ok(()),
            file_owned: &|_, _| None,
        },
    )?;
    Ok(secret)
}
