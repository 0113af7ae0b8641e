//! Gateway configuration: the TOML file an operator writes, and the typed, validated form the gateway runs.
//!
//! Owns: parsing (`Raw*` serde structs with `deny_unknown_fields`) and validation (`TryFrom` into [`Config`]).
//! Fails: with a list of [`ConfigIssue`]s, each naming the file, the field (a dotted path such as
//! `providers[1].base_url`) and the reason, so `tollgate check-config` can print every problem at once.
//! Cost: runs once at start-up and on reload, never on a request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::domain::{ApiKey, ProviderKind};

use crate::issues::{toml_issue, Issues};
pub use crate::issues::{ConfigError, ConfigIssue};

// ---------------------------------------------------------------------------------------------------------
// Raw form: exactly what the file says.
// ---------------------------------------------------------------------------------------------------------

/// The file as written. Every section is optional except providers and routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub providers: Vec<RawProvider>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// `[pricing]`: an optional sheet file, a fallback price, negotiated overrides.
    #[serde(default)]
    pub pricing: crate::pricing::RawPricing,
    /// `[auth]`: who may call, verified how.
    #[serde(default)]
    pub auth: crate::auth::jwt::RawAuth,
    /// `[[policies]]`: which models each user, group and service token may use.
    #[serde(default)]
    pub policies: Vec<crate::auth::identity::RawPolicy>,
    /// `[store]`: where the gateway keeps its state (service tokens).
    #[serde(default)]
    pub store: RawStore,
    /// `[ledger]`: the durable spend ledger.
    #[serde(default)]
    pub ledger: RawLedger,
    /// `[attributes]`: custom request attributes budgets can filter on (key -> header, or a table with a
    /// header or an identity source, `required`, `values`).
    #[serde(default)]
    pub attributes: crate::budget::RawAttributes,
    /// `[[budgets]]`: dollar budgets.
    #[serde(default)]
    pub budgets: Vec<crate::budget::RawBudget>,
    /// `[admin]`: the control plane's REST API (listen address, TLS, which OIDC groups get which role).
    #[serde(default)]
    pub admin: RawAdmin,
}

/// `[admin]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// The admin API's socket address (default `127.0.0.1:8081`; port 0 picks a free one).
    pub listen: Option<String>,
    /// Serve the admin API at all (default true).
    pub enabled: Option<bool>,
    /// PEM certificate chain and private key; both or neither. Required when `listen` is not loopback.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// OIDC groups (as `[auth]` issuers map them) granting each role; `"*"` is any verified identity.
    #[serde(default)]
    pub roles: RawAdminRoles,
    /// A bearer token `GET /metrics` must present; none: `/metrics` is open like `/admin/v1/healthz`.
    pub metrics_token: Option<String>,
}

/// `[admin] roles` as written: one list of groups per role.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdminRoles {
    #[serde(default)]
    pub admin: Vec<String>,
    #[serde(default)]
    pub finance: Vec<String>,
    #[serde(default)]
    pub viewer: Vec<String>,
}

/// `[admin]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub enabled: bool,
    /// `Some` serves HTTPS with this certificate and key (resolved against the config file's directory).
    pub tls: Option<AdminTls>,
    pub roles: AdminRoles,
    /// The bearer token `GET /metrics` requires, if any.
    pub metrics_token: Option<MetricsToken>,
}

impl Default for AdminConfig {
    fn default() -> AdminConfig {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            enabled: true,
            tls: None,
            roles: AdminRoles::default(),
            metrics_token: None,
        }
    }
}

/// `[admin] metrics_token`: a shared secret for Prometheus's scrape (its Debug never shows it).
#[derive(Clone, PartialEq, Eq)]
pub struct MetricsToken(pub String);

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(..)")
    }
}

/// The admin API's certificate and key files (PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Which OIDC groups grant each admin role (`"*"`: any verified identity). Empty: only admin tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminRoles {
    pub admin: Vec<String>,
    pub finance: Vec<String>,
    pub viewer: Vec<String>,
}

/// `[store]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Directory for the embedded store; relative to the config file. Default `$XDG_STATE_HOME/tollgate`
    /// (or `~/.local/state/tollgate`).
    pub dir: Option<PathBuf>,
}

/// `[store]`, resolved.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub dir: PathBuf,
}

/// `[ledger]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLedger {
    /// Directory of the spend store (`ledger.sqlite`) and the journals; relative to the config file.
    /// Default: `ledger` under the store directory.
    pub dir: Option<PathBuf>,
    /// How often settled spend is committed to the store, in one transaction (default 50).
    pub commit_interval_ms: Option<u64>,
    /// How long the store may fail before budgets with `on_store_failure = "closed"` refuse new spend
    /// (default 30000).
    pub fail_closed_after_ms: Option<u64>,
    /// A FoundationDB cluster file: keep spend in that cluster (a fleet) instead of `ledger.sqlite`.
    /// Relative to the config file. Needs a binary built with the `fdb` feature.
    pub cluster_file: Option<PathBuf>,
    /// An SQLite file shared by the gateways of one machine (each keeps its own `dir` for journals):
    /// fleet mode through one embedded store, without FoundationDB. Relative to the config file.
    pub shared_file: Option<PathBuf>,
    /// A PostgreSQL database (`postgres://user:password@host:port/database?sslmode=verify-full`): keep
    /// spend there (a fleet) instead of `ledger.sqlite`. See `store::postgres`.
    pub postgres: Option<String>,
    /// PEM certificates trusted for `ledger.postgres` with `sslmode=verify-full` (or `verify-ca`),
    /// instead of the public web roots. Relative to the config file.
    pub postgres_ca_file: Option<PathBuf>,
    /// The bound on opening a PostgreSQL connection and on each transaction, in ms (default 5000).
    pub postgres_timeout_ms: Option<u64>,
    /// Fleet mode: this node's id in the store's budget leases (default: random per start).
    pub node_id: Option<u64>,
    /// Fleet mode: how many nodes share the store, a hint for lease sizing (default 4).
    pub fleet_nodes: Option<u64>,
    /// Fleet mode: how long a budget lease lives unrenewed, in ms (default 10000).
    pub lease_ttl_ms: Option<u64>,
    /// Fleet mode: the most the nodes' clocks disagree, in ms (default 1000).
    pub max_skew_ms: Option<u64>,
    /// Fleet mode, fault injection for tests: added to this node's wall clock wherever it reads time
    /// for budget leases (ms, may be negative; default 0). Simulates a skewed clock.
    pub clock_offset_ms: Option<i64>,
}

/// `[ledger]`, resolved.
#[derive(Debug, Clone)]
pub struct LedgerConfig {
    /// The journals (`journal/`), the lock, and with [`StoreLocation::Embedded`] the SQLite store
    /// (`ledger.sqlite`).
    pub dir: PathBuf,
    pub commit_interval: Duration,
    pub fail_closed_after: Duration,
    /// The spend store: whoever opens the ledger's store picks it from here.
    pub store: StoreLocation,
    /// Fleet mode's budget leases (see `docs/fleet.md`); used only when the store is shared.
    pub fleet: FleetConfig,
}

/// Where spend is kept: `[ledger]`'s `cluster_file`, `shared_file` and `postgres` (at most one of them)
/// resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `ledger.sqlite` in `ledger.dir`: this gateway's alone.
    Embedded,
    /// `ledger.shared_file`: an SQLite file shared with other gateways on the machine (fleet mode).
    SharedFile(PathBuf),
    /// `ledger.cluster_file`: a FoundationDB cluster (`store::fdb::FdbStore::open`, feature `fdb`;
    /// validation refuses it on a binary built without the feature). Fleet mode.
    Foundation(PathBuf),
    /// `ledger.postgres`: a PostgreSQL database ([`crate::store::postgres::PgStore`]). Fleet mode.
    Postgres(Box<crate::store::postgres::PgConfig>),
}

impl StoreLocation {
    /// Whether other gateways share the store: fleet mode, where budget limits hold across them through
    /// leases.
    pub fn is_fleet(&self) -> bool {
        !matches!(self, StoreLocation::Embedded)
    }

    /// The FoundationDB cluster file, if that is the store.
    pub fn cluster_file(&self) -> Option<&Path> {
        match self {
            StoreLocation::Foundation(p) => Some(p),
            _ => None,
        }
    }

    /// The shared SQLite file, if that is the store.
    pub fn shared_file(&self) -> Option<&Path> {
        match self {
            StoreLocation::SharedFile(p) => Some(p),
            _ => None,
        }
    }

    /// The PostgreSQL database, if that is the store.
    pub fn postgres(&self) -> Option<&crate::store::postgres::PgConfig> {
        match self {
            StoreLocation::Postgres(c) => Some(c),
            _ => None,
        }
    }
}

/// `[ledger]`'s fleet settings, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `None`: a random id per start.
    pub node_id: Option<u64>,
    pub nodes: u64,
    pub lease_ttl_ms: i64,
    pub max_skew_ms: i64,
    /// Added to the wall clock wherever this node reads time for leases (fault injection; 0 in
    /// production).
    pub clock_offset_ms: i64,
}

/// The most `ledger.clock_offset_ms` may shift a node's lease clock, either way (one hour).
pub const MAX_CLOCK_OFFSET_MS: i64 = 3_600_000;

impl Default for FleetConfig {
    fn default() -> FleetConfig {
        FleetConfig {
            node_id: None,
            nodes: 4,
            lease_ttl_ms: 10_000,
            max_skew_ms: 1_000,
            clock_offset_ms: 0,
        }
    }
}

fn default_store_dir() -> PathBuf {
    match (std::env::var_os("XDG_STATE_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) if !x.is_empty() => PathBuf::from(x).join("tollgate"),
        (_, Some(h)) => PathBuf::from(h).join(".local/state/tollgate"),
        _ => PathBuf::from("/var/lib/tollgate"),
    }
}

/// `[server]`: the client-facing side.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Socket addresses to listen on; `127.0.0.1:0` picks a free port (tests read it from the log).
    pub listen: Option<Vec<String>>,
    /// Worker threads, one pinned per core; 0 or absent means one per available core.
    pub workers: Option<usize>,
    /// Pin each worker to its own core. Absent means pin only when there is one worker per available
    /// core (the gateway owns the machine); with fewer workers the gateway shares the machine, and a
    /// pinned worker would wait behind a busy core while another sits idle.
    pub pin_workers: Option<bool>,
    /// `auto` (io_uring where the kernel allows it, else epoll), `io_uring` or `epoll`.
    pub driver: Option<String>,
    pub max_head_bytes: Option<usize>,
    pub max_headers: Option<usize>,
    pub max_body_bytes: Option<usize>,
    pub header_timeout_ms: Option<u64>,
    pub body_timeout_ms: Option<u64>,
    pub idle_timeout_ms: Option<u64>,
    pub shutdown_grace_ms: Option<u64>,
    /// Hand a keep-alive connection to the core that owns its identity's budgets (default true).
    pub handoff: Option<bool>,
    /// Lend slices of shared budgets to the cores that spend them (default true).
    pub budget_slices: Option<bool>,
}

/// `[upstream]`: how Tollgate talks to providers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub connect_timeout_ms: Option<u64>,
    pub first_byte_timeout_ms: Option<u64>,
    pub read_timeout_ms: Option<u64>,
    pub pool_idle_timeout_ms: Option<u64>,
    pub pool_max_idle_per_provider: Option<usize>,
    pub dns_refresh_ms: Option<u64>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// Write one JSON line per request to stdout (default true).
    pub access_log: Option<bool>,
}

/// `[[providers]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub base_url: Option<String>,
    pub api_key_env: Option<String>,
    pub api_key_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub mock_when_no_key: bool,
}

/// `[[routes]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// The client-facing model name, or a glob (`gpt-4o*`).
    pub model: Option<String>,
    pub provider: Option<String>,
    /// The model name sent upstream; absent means the client's name unchanged.
    pub upstream_model: Option<String>,
    /// The output cap written into requests on this route that set none, when a budget applies to them: it
    /// makes the budget's reservation a true bound (no overshoot).
    pub default_max_tokens: Option<u64>,
}

// ---------------------------------------------------------------------------------------------------------
// Typed form: what the gateway runs.
// ---------------------------------------------------------------------------------------------------------

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub log: LogConfig,
    pub providers: Vec<ProviderConfig>,
    pub routes: Vec<RouteConfig>,
    /// List prices (the shipped sheet or `pricing.sheet`) with the negotiated terms, compiled for lookups.
    pub prices: std::sync::Arc<crate::pricing::PriceBook>,
    pub auth: crate::auth::jwt::AuthConfig,
    pub policies: std::sync::Arc<crate::auth::identity::PolicySet>,
    pub store: StoreConfig,
    pub ledger: LedgerConfig,
    pub budgets: std::sync::Arc<crate::budget::BudgetSet>,
    /// Data-plane service tokens the control plane made (not the file's: those are read from
    /// `service-tokens.json` by the gateway's identity thread); set by [`crate::catalog::effective`].
    pub service_tokens: std::sync::Arc<Vec<crate::auth::service_tokens::ServiceToken>>,
    /// `[admin]`: the control plane's REST API.
    pub admin: AdminConfig,
}

/// Which I/O driver the workers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverChoice {
    Auto,
    IoUring,
    Epoll,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    /// 0 = one per core, resolved at start-up.
    pub workers: usize,
    /// `None` = decide at start-up (pin when workers == available cores).
    pub pin_workers: Option<bool>,
    pub driver: DriverChoice,
    pub max_head_bytes: usize,
    pub max_headers: usize,
    pub max_body_bytes: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Hand a keep-alive connection, once, to the core that owns its caller's budgets.
    pub handoff: bool,
    /// Shared budget instances lend slices to the other cores (see `tollgate_core::budget::slices`).
    pub budget_slices: bool,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub read_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_provider: usize,
    pub dns_refresh: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub access_log: bool,
}

/// Where a provider's API key comes from. The key itself is read at start-up by [`ProviderConfig::load_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Env(String),
    File(PathBuf),
    None,
}

/// A provider's base URL, split once so the data plane never parses it again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash (`""` for most providers); request paths are appended.
    pub path_prefix: String,
}

impl BaseUrl {
    /// The `Host` header value: the port is left out when it is the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            self.host.clone()
        } else if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: BaseUrl,
    pub key: KeySource,
    /// Extra PEM CA certificate(s) trusted for this provider, on top of the web PKI roots.
    pub ca_file: Option<PathBuf>,
    /// When no key is configured or the variable is unset, serve this provider from the bundled mock.
    pub mock_when_no_key: bool,
}

/// Why a provider's key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("environment variable {0} is not set")]
    EnvUnset(String),
    #[error("cannot read key file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("key file {0} is empty")]
    EmptyFile(PathBuf),
    #[error("no api_key_env or api_key_file configured")]
    NotConfigured,
}

impl ProviderConfig {
    /// Reads the key from its source. The key never appears in the error.
    pub fn load_key(&self) -> Result<ApiKey, KeyError> {
        match &self.key {
            KeySource::Env(var) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(ApiKey::new(v.trim().to_owned())),
                _ => Err(KeyError::EnvUnset(var.clone())),
            },
            KeySource::File(path) => match std::fs::read_to_string(path) {
                Ok(v) if !v.trim().is_empty() => Ok(ApiKey::new(v.trim().to_owned())),
                Ok(_) => Err(KeyError::EmptyFile(path.clone())),
                Err(e) => Err(KeyError::File {
                    path: path.clone(),
                    reason: e.to_string(),
                }),
            },
            KeySource::None => Err(KeyError::NotConfigured),
        }
    }
}

/// A client-facing model name or glob.
#[derive(Debug, Clone)]
pub enum ModelPattern {
    Exact(String),
    Glob(glob::Pattern),
}

impl ModelPattern {
    pub fn matches(&self, model: &str) -> bool {
        match self {
            ModelPattern::Exact(m) => m == model,
            ModelPattern::Glob(p) => p.matches(model),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            ModelPattern::Exact(m) => m,
            ModelPattern::Glob(p) => p.as_str(),
        }
    }

    pub fn is_glob(&self) -> bool {
        matches!(self, ModelPattern::Glob(_))
    }
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub pattern: ModelPattern,
    /// Index into [`Config::providers`].
    pub provider: usize,
    pub upstream_model: Option<String>,
    pub default_max_tokens: Option<u64>,
}

impl Config {
    /// Reads, parses and validates a file; every problem is reported, not just the first.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::parse(path, &read(path)?)
    }

    /// Parses and validates `text`, naming `path` in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let raw = parse_raw(path, text)?;
        Config::try_from(Located { file: path, raw })
    }

    /// Reads and checks the configuration fragment at `path` (see [`Scope::Fragment`]).
    pub fn load_fragment(path: &Path) -> Result<Fragment, ConfigError> {
        Config::parse_fragment(path, &read(path)?)
    }

    /// Parses and checks `text` as a fragment (see [`Scope::Fragment`]), naming `path` in errors: the same
    /// parsing and the same validation as [`Config::parse`], without requiring what a fragment leaves out.
    pub fn parse_fragment(path: &Path, text: &str) -> Result<Fragment, ConfigError> {
        let raw = parse_raw(path, text)?;
        let c = Config::validate(path, raw, Scope::Fragment)?;
        Ok(Fragment {
            providers: c.providers.len(),
            routes: c.routes.len(),
            issuers: c.auth.issuers.len(),
            policies: c.policies.len(),
            budgets: c.budgets.budgets().len(),
        })
    }

    /// The first route whose pattern matches `model`: exact names are tried before globs, then file order.
    pub fn route_for(&self, model: &str) -> Option<&RouteConfig> {
        self.routes
            .iter()
            .find(|r| !r.pattern.is_glob() && r.pattern.matches(model))
            .or_else(|| {
                self.routes
                    .iter()
                    .find(|r| r.pattern.is_glob() && r.pattern.matches(model))
            })
    }
}

/// The text of the file at `path`, or the issue naming why it cannot be read.
fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        issues: vec![ConfigIssue {
            file: path.to_owned(),
            field: String::new(),
            reason: e.to_string(),
        }],
    })
}

/// `text` as written (unknown fields refused), or its TOML error naming `path` and the line.
pub(crate) fn parse_raw(path: &Path, text: &str) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError {
        issues: vec![toml_issue(path, text, &e)],
    })
}

/// What a file is checked as. Both run the one validator ([`Config::try_from`] is [`Scope::Whole`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A gateway's whole configuration: `[[providers]]` and `[[routes]]` required, every reference
    /// resolved.
    Whole,
    /// A piece meant to be merged into a configuration (an identity provider's `[[auth.issuers]]` and its
    /// `[[policies]]`, say): every section present is checked by the same rules, no section is required,
    /// and a reference into a section the fragment leaves out (a route's provider, a budget's
    /// `downgrade_to` route) is left to the configuration it is merged into.
    Fragment,
}

/// What a fragment that passed its check holds, for `tollgate check-config --fragment` to report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    pub providers: usize,
    pub routes: usize,
    pub issuers: usize,
    pub policies: usize,
    pub budgets: usize,
}

/// A raw config together with the file it came from, so validation errors can name it.
#[derive(Debug)]
pub struct Located<'a> {
    pub file: &'a Path,
    pub raw: RawConfig,
}

const MAX_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

fn ms(issues: &mut Issues<'_>, field: &str, v: Option<u64>, default: u64) -> Duration {
    let v = v.unwrap_or(default);
    if v == 0 || v > MAX_TIMEOUT_MS {
        issues.push(
            field,
            format!("must be between 1 and {MAX_TIMEOUT_MS} milliseconds, got {v}"),
        );
    }
    Duration::from_millis(v)
}

impl TryFrom<Located<'_>> for Config {
    type Error = ConfigError;

    fn try_from(located: Located<'_>) -> Result<Config, ConfigError> {
        Config::validate(located.file, located.raw, Scope::Whole)
    }
}

impl Config {
    /// The validator: every problem of `raw` (read from `file`) as an issue naming the field, or the config.
    /// With [`Scope::Fragment`] the config is only a witness that the fragment passed: a route whose provider
    /// the fragment leaves out points at provider 0.
    fn validate(file: &Path, raw: RawConfig, scope: Scope) -> Result<Config, ConfigError> {
        let whole = scope == Scope::Whole;
        let (has_providers, has_routes) = (!raw.providers.is_empty(), !raw.routes.is_empty());
        let mut is = Issues {
            file,
            list: Vec::new(),
        };

        // [server]
        let s = raw.server;
        let mut listen = Vec::new();
        for (i, a) in s
            .listen
            .unwrap_or_else(|| vec!["127.0.0.1:8080".to_owned()])
            .iter()
            .enumerate()
        {
            match a.parse::<SocketAddr>() {
                Ok(addr) => listen.push(addr),
                Err(_) => is.push(
                    format!("server.listen[{i}]"),
                    format!("{a:?} is not an IP:port socket address"),
                ),
            }
        }
        if listen.is_empty() && is.list.is_empty() {
            is.push("server.listen", "needs at least one address");
        }
        let driver = match s.driver.as_deref().unwrap_or("auto") {
            "auto" => DriverChoice::Auto,
            "io_uring" => DriverChoice::IoUring,
            "epoll" => DriverChoice::Epoll,
            other => {
                is.push(
                    "server.driver",
                    format!("{other:?} is not one of \"auto\", \"io_uring\", \"epoll\""),
                );
                DriverChoice::Auto
            }
        };
        let workers = s.workers.unwrap_or(0);
        if workers > 1024 {
            is.push(
                "server.workers",
                format!("{workers} workers is more than the 1024 supported"),
            );
        }
        let max_head_bytes = s.max_head_bytes.unwrap_or(16 * 1024);
        if !(1024..=1024 * 1024).contains(&max_head_bytes) {
            is.push("server.max_head_bytes", "must be between 1024 and 1048576");
        }
        let max_headers = s.max_headers.unwrap_or(100);
        if !(8..=128).contains(&max_headers) {
            is.push("server.max_headers", "must be between 8 and 128");
        }
        let max_body_bytes = s.max_body_bytes.unwrap_or(32 * 1024 * 1024);
        if max_body_bytes == 0 || max_body_bytes > 1024 * 1024 * 1024 {
            is.push("server.max_body_bytes", "must be between 1 and 1073741824");
        }
        let server = ServerConfig {
            listen,
            workers,
            pin_workers: s.pin_workers,
            handoff: s.handoff.unwrap_or(true),
            budget_slices: s.budget_slices.unwrap_or(true),
            driver,
            max_head_bytes,
            max_headers,
            max_body_bytes,
            header_timeout: ms(
                &mut is,
                "server.header_timeout_ms",
                s.header_timeout_ms,
                10_000,
            ),
            body_timeout: ms(&mut is, "server.body_timeout_ms", s.body_timeout_ms, 30_000),
            idle_timeout: ms(&mut is, "server.idle_timeout_ms", s.idle_timeout_ms, 60_000),
            shutdown_grace: ms(
                &mut is,
                "server.shutdown_grace_ms",
                s.shutdown_grace_ms,
                10_000,
            ),
        };

        // [upstream]
        let u = raw.upstream;
        let pool_max_idle_per_provider = u.pool_max_idle_per_provider.unwrap_or(256);
        let upstream = UpstreamConfig {
            connect_timeout: ms(
                &mut is,
                "upstream.connect_timeout_ms",
                u.connect_timeout_ms,
                5_000,
            ),
            first_byte_timeout: ms(
                &mut is,
                "upstream.first_byte_timeout_ms",
                u.first_byte_timeout_ms,
                300_000,
            ),
            read_timeout: ms(
                &mut is,
                "upstream.read_timeout_ms",
                u.read_timeout_ms,
                300_000,
            ),
            pool_idle_timeout: ms(
                &mut is,
                "upstream.pool_idle_timeout_ms",
                u.pool_idle_timeout_ms,
                60_000,
            ),
            pool_max_idle_per_provider,
            dns_refresh: ms(&mut is, "upstream.dns_refresh_ms", u.dns_refresh_ms, 30_000),
        };

        let log = LogConfig {
            access_log: raw.log.access_log.unwrap_or(true),
        };

        // [[providers]]
        let mut providers: Vec<ProviderConfig> = Vec::new();
        for (i, p) in raw.providers.into_iter().enumerate() {
            let at = |f: &str| format!("providers[{i}].{f}");
            let name = match p.name {
                Some(n) if valid_name(&n) => n,
                Some(n) => {
                    is.push(
                        at("name"),
                        format!("{n:?} must be 1-64 characters of a-z, 0-9, '-' or '_'"),
                    );
                    continue;
                }
                None => {
                    is.push(at("name"), "is required");
                    continue;
                }
            };
            if providers.iter().any(|q| q.name == name) {
                is.push(at("name"), format!("provider {name:?} is defined twice"));
            }
            let kind = match p.kind.as_deref() {
                Some("openai") => ProviderKind::OpenAi,
                Some("anthropic") => ProviderKind::Anthropic,
                Some(k) => {
                    is.push(
                        at("kind"),
                        format!("{k:?} is not one of \"openai\", \"anthropic\""),
                    );
                    ProviderKind::OpenAi
                }
                None => {
                    is.push(at("kind"), "is required (\"openai\" or \"anthropic\")");
                    ProviderKind::OpenAi
                }
            };
            let base_url = match p.base_url.as_deref().map(parse_base_url) {
                Some(Ok(b)) => b,
                Some(Err(reason)) => {
                    is.push(at("base_url"), reason);
                    continue;
                }
                None => match kind {
                    ProviderKind::OpenAi => default_base("api.openai.com"),
                    ProviderKind::Anthropic => default_base("api.anthropic.com"),
                },
            };
            let key = match (p.api_key_env, p.api_key_file) {
                (Some(_), Some(_)) => {
                    is.push(
                        at("api_key_env"),
                        "set either api_key_env or api_key_file, not both",
                    );
                    KeySource::None
                }
                (Some(v), None) if v.is_empty() => {
                    is.push(at("api_key_env"), "must name an environment variable");
                    KeySource::None
                }
                (Some(v), None) => KeySource::Env(v),
                (None, Some(f)) => KeySource::File(f),
                (None, None) => KeySource::None,
            };
            if let Some(ca) = &p.ca_file {
                if !ca.exists() {
                    is.push(at("ca_file"), format!("{} does not exist", ca.display()));
                }
            }
            providers.push(ProviderConfig {
                name,
                kind,
                base_url,
                key,
                ca_file: p.ca_file,
                mock_when_no_key: p.mock_when_no_key,
            });
        }
        if whole && providers.is_empty() && is.list.is_empty() {
            is.push("providers", "at least one [[providers]] entry is required");
        }

        // [[routes]]
        let mut routes = Vec::new();
        for (i, r) in raw.routes.into_iter().enumerate() {
            let at = |f: &str| format!("routes[{i}].{f}");
            let pattern = match r.model {
                Some(m) if m.is_empty() => {
                    is.push(at("model"), "must not be empty");
                    continue;
                }
                Some(m) if m.contains(['*', '?', '[']) => match glob::Pattern::new(&m) {
                    Ok(p) => ModelPattern::Glob(p),
                    Err(e) => {
                        is.push(at("model"), format!("{m:?} is not a valid glob: {e}"));
                        continue;
                    }
                },
                Some(m) => ModelPattern::Exact(m),
                None => {
                    is.push(at("model"), "is required");
                    continue;
                }
            };
            let provider = match r.provider {
                Some(name) => match providers.iter().position(|p| p.name == name) {
                    Some(idx) => idx,
                    // Defined in the configuration the fragment is merged into.
                    None if !whole && !has_providers => 0,
                    None => {
                        is.push(
                            at("provider"),
                            format!("no provider named {name:?} is defined"),
                        );
                        continue;
                    }
                },
                None => {
                    is.push(at("provider"), "is required");
                    continue;
                }
            };
            if let Some(um) = &r.upstream_model {
                if um.is_empty() || um.contains(['"', '\\']) || um.chars().any(char::is_control) {
                    is.push(
                        at("upstream_model"),
                        "must be a non-empty model name without quotes or backslashes",
                    );
                    continue;
                }
            }
            if r.default_max_tokens == Some(0) {
                is.push(
                    format!("routes[{i}].default_max_tokens"),
                    "must be at least 1",
                );
            }
            routes.push(RouteConfig {
                pattern,
                provider,
                upstream_model: r.upstream_model,
                default_max_tokens: r.default_max_tokens,
            });
        }
        if whole && routes.is_empty() && is.list.is_empty() {
            is.push("routes", "at least one [[routes]] entry is required");
        }

        let mut raw_pricing = raw.pricing;
        let prices = match raw_pricing.sheet.take() {
            Some(sheet) => {
                // A relative sheet path is relative to the config file.
                let sheet = match file.parent() {
                    Some(dir) if sheet.is_relative() => dir.join(sheet),
                    _ => sheet,
                };
                crate::pricing::PriceBook::from_files(&sheet, file, raw_pricing)
            }
            None => crate::pricing::PriceBook::builtin_with(file, raw_pricing),
        };
        let prices = match prices {
            Ok(p) => Some(std::sync::Arc::new(p)),
            Err(e) => {
                is.list.extend(e.issues);
                None
            }
        };
        let base = file.parent().unwrap_or(Path::new("."));
        let auth = match crate::auth::jwt::AuthConfig::from_raw(raw.auth, base) {
            Ok(a) => a,
            Err(list) => {
                for (f, r) in list {
                    is.push(f, r);
                }
                crate::auth::jwt::AuthConfig::default()
            }
        };
        let policies = match crate::auth::identity::PolicySet::from_raw(raw.policies) {
            Ok(p) => p,
            Err(list) => {
                for (f, r) in list {
                    is.push(f, r);
                }
                crate::auth::identity::PolicySet::default()
            }
        };
        let budgets = match crate::budget::BudgetSet::from_raw(raw.budgets, raw.attributes) {
            Ok(b) => b,
            Err(list) => {
                for (f, r) in list {
                    is.push(f, r);
                }
                crate::budget::BudgetSet::default()
            }
        };
        // Issuers keep exactly the claims attributes are taken from.
        let claims = budgets.attributes().claim_names();
        let mut auth = auth;
        for issuer in &mut auth.issuers {
            std::sync::Arc::make_mut(issuer)
                .attribute_claims
                .clone_from(&claims);
        }
        // A downgrade target must be a model this gateway routes.
        for (i, b) in budgets.budgets().iter().enumerate() {
            if let crate::budget::Action::Downgrade(m) = &b.action {
                let routed = routes.iter().any(|r| r.pattern.matches(m));
                if !routed && (whole || has_routes) {
                    is.push(
                        format!("budgets[{i}].downgrade_to"),
                        format!("no route serves the model {m:?}"),
                    );
                }
            }
        }
        let store = StoreConfig {
            dir: match raw.store.dir {
                Some(d) if d.is_relative() => base.join(d),
                Some(d) => d,
                None => default_store_dir(),
            },
        };
        let commit_interval_ms = raw.ledger.commit_interval_ms.unwrap_or(50);
        if !(1..=60_000).contains(&commit_interval_ms) {
            is.push(
                "ledger.commit_interval_ms",
                format!("{commit_interval_ms} is outside 1..=60000"),
            );
        }
        if raw.ledger.cluster_file.is_some() && !cfg!(feature = "fdb") {
            is.push(
                "ledger.cluster_file",
                "selects FoundationDB, but this binary was built without FoundationDB support \
                 (cargo feature `fdb`); remove ledger.cluster_file to use the embedded store, or \
                 run a build with `--features fdb`",
            );
        }
        if raw.ledger.cluster_file.is_some() && raw.ledger.shared_file.is_some() {
            is.push(
                "ledger.shared_file",
                "cannot be combined with ledger.cluster_file: the spend store is one or the other",
            );
        }
        for (other, set) in [
            ("ledger.cluster_file", raw.ledger.cluster_file.is_some()),
            ("ledger.shared_file", raw.ledger.shared_file.is_some()),
        ] {
            if set && raw.ledger.postgres.is_some() {
                is.push(
                    "ledger.postgres",
                    format!("cannot be combined with {other}: the spend store is one or the other"),
                );
            }
        }
        let postgres_timeout_ms = raw.ledger.postgres_timeout_ms.unwrap_or(5_000);
        if !(100..=600_000).contains(&postgres_timeout_ms) {
            is.push(
                "ledger.postgres_timeout_ms",
                format!("{postgres_timeout_ms} is outside 100..=600000"),
            );
        }
        let postgres_ca_file =
            raw.ledger
                .postgres_ca_file
                .map(|f| if f.is_relative() { base.join(f) } else { f });
        if raw.ledger.postgres.is_none() {
            for (field, set) in [
                ("ledger.postgres_ca_file", postgres_ca_file.is_some()),
                (
                    "ledger.postgres_timeout_ms",
                    raw.ledger.postgres_timeout_ms.is_some(),
                ),
            ] {
                if set {
                    is.push(field, "is used only with ledger.postgres, which is not set");
                }
            }
        }
        let postgres = raw.ledger.postgres.as_deref().and_then(|url| {
            let parsed = crate::store::postgres::PgConfig::parse(
                url,
                postgres_ca_file.clone(),
                Duration::from_millis(postgres_timeout_ms),
            );
            let checked = parsed.and_then(|c| c.roots().map(|_| c).map_err(|e| e.to_string()));
            match checked {
                Ok(c) => Some(c),
                Err(e) if e.starts_with("ledger.postgres_ca_file") => {
                    let reason = e
                        .trim_start_matches("ledger.postgres_ca_file")
                        .trim_start()
                        .to_owned();
                    is.push("ledger.postgres_ca_file", reason);
                    None
                }
                Err(e) => {
                    is.push("ledger.postgres", e);
                    None
                }
            }
        });
        if raw.ledger.node_id.is_some_and(|n| n > i64::MAX as u64) {
            is.push(
                "ledger.node_id",
                format!("must be below 2^63 (it is {:?})", raw.ledger.node_id),
            );
        }
        let fleet_nodes = raw.ledger.fleet_nodes.unwrap_or(4);
        if !(1..=10_000).contains(&fleet_nodes) {
            is.push(
                "ledger.fleet_nodes",
                format!("{fleet_nodes} is outside 1..=10000"),
            );
        }
        let lease_ttl_ms = raw.ledger.lease_ttl_ms.unwrap_or(10_000);
        if !(100..=3_600_000).contains(&lease_ttl_ms) {
            is.push(
                "ledger.lease_ttl_ms",
                format!("{lease_ttl_ms} is outside 100..=3600000"),
            );
        }
        let max_skew_ms = raw.ledger.max_skew_ms.unwrap_or(1_000);
        if max_skew_ms > 3_600_000 {
            is.push(
                "ledger.max_skew_ms",
                format!("{max_skew_ms} is outside 0..=3600000"),
            );
        }
        let clock_offset_ms = raw.ledger.clock_offset_ms.unwrap_or(0);
        if !(-MAX_CLOCK_OFFSET_MS..=MAX_CLOCK_OFFSET_MS).contains(&clock_offset_ms) {
            is.push(
                "ledger.clock_offset_ms",
                format!(
                    "{clock_offset_ms} is outside -{MAX_CLOCK_OFFSET_MS}..={MAX_CLOCK_OFFSET_MS} \
                     (a fault-injection setting for tests: leave it unset in production)"
                ),
            );
        }
        let ledger = LedgerConfig {
            fleet: FleetConfig {
                node_id: raw.ledger.node_id,
                nodes: fleet_nodes,
                lease_ttl_ms: lease_ttl_ms.min(3_600_000) as i64,
                max_skew_ms: max_skew_ms.min(3_600_000) as i64,
                clock_offset_ms: clock_offset_ms.clamp(-MAX_CLOCK_OFFSET_MS, MAX_CLOCK_OFFSET_MS),
            },
            store: {
                let resolve = |f: PathBuf| if f.is_relative() { base.join(f) } else { f };
                match (raw.ledger.cluster_file, raw.ledger.shared_file, postgres) {
                    (Some(f), _, _) => StoreLocation::Foundation(resolve(f)),
                    (None, Some(f), _) => StoreLocation::SharedFile(resolve(f)),
                    (None, None, Some(c)) => StoreLocation::Postgres(Box::new(c)),
                    (None, None, None) => StoreLocation::Embedded,
                }
            },
            dir: match raw.ledger.dir {
                Some(d) if d.is_relative() => base.join(d),
                Some(d) => d,
                None => store.dir.join("ledger"),
            },
            commit_interval: Duration::from_millis(commit_interval_ms),
            fail_closed_after: Duration::from_millis(
                raw.ledger.fail_closed_after_ms.unwrap_or(30_000),
            ),
        };
        let admin = admin_config(&mut is, raw.admin, base);
        match prices {
            Some(prices) if is.list.is_empty() => Ok(Config {
                server,
                upstream,
                log,
                providers,
                routes,
                prices,
                auth,
                policies: std::sync::Arc::new(policies),
                store,
                ledger,
                budgets: std::sync::Arc::new(budgets),
                service_tokens: std::sync::Arc::new(Vec::new()),
                admin,
            }),
            _ => Err(ConfigError { issues: is.list }),
        }
    }
}

/// `[admin]`: every issue names `admin.FIELD`.
fn admin_config(is: &mut Issues<'_>, raw: RawAdmin, base: &Path) -> AdminConfig {
    let mut c = AdminConfig::default();
    if let Some(l) = &raw.listen {
        match l.parse::<SocketAddr>() {
            Ok(a) => c.listen = a,
            Err(_) => is.push(
                "admin.listen",
                format!("{l:?} is not an IP:port socket address"),
            ),
        }
    }
    c.enabled = raw.enabled.unwrap_or(true);
    let resolve = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
    match (raw.tls_cert_file, raw.tls_key_file) {
        (Some(cert), Some(key)) => {
            let (cert_file, key_file) = (resolve(cert), resolve(key));
            for (field, f) in [
                ("admin.tls_cert_file", &cert_file),
                ("admin.tls_key_file", &key_file),
            ] {
                if !f.exists() {
                    is.push(field, format!("{} does not exist", f.display()));
                }
            }
            c.tls = Some(AdminTls {
                cert_file,
                key_file,
            });
        }
        (Some(_), None) => is.push(
            "admin.tls_key_file",
            "is required with admin.tls_cert_file (set both or neither)",
        ),
        (None, Some(_)) => is.push(
            "admin.tls_cert_file",
            "is required with admin.tls_key_file (set both or neither)",
        ),
        (None, None) => {
            if c.enabled && !c.listen.ip().is_loopback() {
                is.push(
                    "admin.tls_cert_file",
                    format!(
                        "is required (with admin.tls_key_file) when admin.listen ({}) is not a loopback \
                         address: admin credentials must not cross the network in clear text",
                        c.listen
                    ),
                );
            }
        }
    }
    for (role, groups) in [
        ("admin", &raw.roles.admin),
        ("finance", &raw.roles.finance),
        ("viewer", &raw.roles.viewer),
    ] {
        for (i, g) in groups.iter().enumerate() {
            if g.is_empty() || g.len() > 256 || g.chars().any(char::is_control) {
                is.push(
                    format!("admin.roles.{role}[{i}]"),
                    "must be a group name of 1-256 characters (or \"*\" for any verified identity)",
                );
            }
        }
    }
    if let Some(t) = raw.metrics_token {
        if t.len() < 16 || t.len() > 256 || !t.bytes().all(|b| b.is_ascii_graphic()) {
            is.push(
                "admin.metrics_token",
                "must be 16-256 printable ASCII characters without spaces",
            );
        }
        c.metrics_token = Some(MetricsToken(t));
    }
    c.roles = AdminRoles {
        admin: raw.roles.admin,
        finance: raw.roles.finance,
        viewer: raw.roles.viewer,
    };
    c
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn default_base(host: &str) -> BaseUrl {
    BaseUrl {
        tls: true,
        host: host.to_owned(),
        port: 443,
        path_prefix: String::new(),
    }
}

/// Splits `http[s]://host[:port][/prefix]`. The prefix must not end in `/v1`: Tollgate appends the client's
/// `/v1/...` path, and a doubled `/v1/v1` is the most common misconfiguration.
pub fn parse_base_url(s: &str) -> Result<BaseUrl, String> {
    let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(format!("{s:?} must start with http:// or https://")),
    };
    let host = uri.host().ok_or_else(|| format!("{s:?} has no host"))?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if uri.query().is_some() {
        return Err(format!("{s:?} must not have a query string"));
    }
    let path_prefix = uri.path().trim_end_matches('/').to_owned();
    if path_prefix.ends_with("/v1") {
        return Err(format!(
            "{s:?} ends in /v1: give the URL without the API version (Tollgate appends the client's /v1/... path)"
        ));
    }
    Ok(BaseUrl {
        tls,
        host,
        port,
        path_prefix,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    const MIN: &str = r#"
        [[providers]]
        name = "openai"
        kind = "openai"
        base_url = "http://127.0.0.1:9000"
        [[routes]]
        model = "gpt-*"
        provider = "openai"
    "#;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.server.max_head_bytes, 16 * 1024);
        assert_eq!(
            c.server.listen,
            vec!["127.0.0.1:8080".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(c.providers[0].base_url.port, 9000);
        assert!(!c.providers[0].base_url.tls);
        assert!(c.route_for("gpt-4o").is_some());
        assert!(c.route_for("claude-3").is_none());
    }

    #[test]
    fn ledger_cluster_file_selects_foundationdb_only_when_built_with_it() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.ledger.store, StoreLocation::Embedded);
        assert!(!c.ledger.store.is_fleet());
        let text = format!("{MIN}\n[ledger]\ncluster_file = \"fdb.cluster\"\n");
        let got = Config::parse(Path::new("/etc/tollgate/t.toml"), &text);
        if cfg!(feature = "fdb") {
            assert_eq!(
                got.unwrap().ledger.store.cluster_file(),
                Some(Path::new("/etc/tollgate/fdb.cluster"))
            );
        } else {
            let err = got.unwrap_err();
            assert_eq!(err.issues.len(), 1, "{err}");
            assert_eq!(err.issues[0].field, "ledger.cluster_file");
            let msg = err.to_string();
            assert!(msg.contains("built without FoundationDB support"), "{msg}");
        }
    }

    #[test]
    fn ledger_fleet_settings_default_and_are_validated_by_name() {
        let c = parse(MIN).unwrap();
        assert_eq!(c.ledger.fleet, FleetConfig::default());
        let c = parse(&format!(
            "{MIN}\n[ledger]\nnode_id = 7\nfleet_nodes = 3\nlease_ttl_ms = 2000\nmax_skew_ms = 0\nclock_offset_ms = -250\n"
        ))
        .unwrap();
        assert_eq!(
            c.ledger.fleet,
            FleetConfig {
                node_id: Some(7),
                nodes: 3,
                lease_ttl_ms: 2000,
                max_skew_ms: 0,
                clock_offset_ms: -250,
            }
        );
        let err = parse(&format!(
            "{MIN}\n[ledger]\nfleet_nodes = 0\nlease_ttl_ms = 5\nmax_skew_ms = 4000000\nclock_offset_ms = -3600001\n"
        ))
        .unwrap_err();
        let fields: Vec<&str> = err.issues.iter().map(|i| i.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "ledger.fleet_nodes",
                "ledger.lease_ttl_ms",
                "ledger.max_skew_ms",
                "ledger.clock_offset_ms"
            ],
            "{err}"
        );
    }

    #[test]
    fn ledger_postgres_selects_postgresql_and_is_validated_by_name_without_the_password() {
        let c = parse(&format!(
            "{MIN}\n[ledger]\npostgres = \"postgres://tg:s3cret@db:5433/spend?sslmode=require\"\n\
             postgres_timeout_ms = 1500\n"
        ))
        .unwrap();
        let pg = c.ledger.store.postgres().unwrap();
        assert!(c.ledger.store.is_fleet());
        assert_eq!(pg.target(), "postgres://tg@db:5433/spend");
        assert_eq!(pg.timeout, Duration::from_millis(1500));
        assert!(!format!("{:?}", c.ledger).contains("s3cret"));
        let c = parse(&format!(
            "{MIN}\n[ledger]\npostgres = \"postgres://tg@db/spend\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.ledger.store.postgres().unwrap().timeout,
            Duration::from_secs(5)
        );
        let cases = [
            (
                "postgres = \"mysql://tg:s3cret@db/x\"",
                vec!["ledger.postgres"],
            ),
            (
                "postgres = \"postgres://tg:s3cret@db:port/x\"",
                vec!["ledger.postgres"],
            ),
            (
                "postgres = \"postgres://tg:s3cret@db/x\"\nshared_file = \"s.sqlite\"",
                vec!["ledger.postgres"],
            ),
            (
                "postgres = \"postgres://tg:s3cret@db/x?sslmode=verify-full\"\n\
                 postgres_ca_file = \"/nonexistent/ca.pem\"",
                vec!["ledger.postgres_ca_file"],
            ),
            (
                "postgres = \"postgres://tg:s3cret@db/x\"\npostgres_timeout_ms = 5",
                vec!["ledger.postgres_timeout_ms"],
            ),
            (
                "postgres_ca_file = \"ca.pem\"\npostgres_timeout_ms = 100",
                vec!["ledger.postgres_ca_file", "ledger.postgres_timeout_ms"],
            ),
        ];
        for (text, want) in cases {
            let err = parse(&format!("{MIN}\n[ledger]\n{text}\n")).unwrap_err();
            let fields: Vec<&str> = err.issues.iter().map(|i| i.field.as_str()).collect();
            assert_eq!(fields, want, "{text}: {err}");
            assert!(!err.to_string().contains("s3cret"), "{text}: {err}");
        }
        // With a cluster file too: named, whether or not this build has FoundationDB.
        let err = parse(&format!(
            "{MIN}\n[ledger]\npostgres = \"postgres://tg:s3cret@db/x\"\ncluster_file = \"f\"\n"
        ))
        .unwrap_err();
        assert!(
            err.issues
                .iter()
                .any(|i| i.field == "ledger.postgres" && i.reason.contains("ledger.cluster_file")),
            "{err}"
        );
        assert!(!err.to_string().contains("s3cret"), "{err}");
    }

    #[test]
    fn a_commit_interval_outside_its_range_is_named() {
        for bad in [0, 60_001] {
            let err = parse(&format!("{MIN}\n[ledger]\ncommit_interval_ms = {bad}\n")).unwrap_err();
            let fields: Vec<&str> = err.issues.iter().map(|i| i.field.as_str()).collect();
            assert_eq!(fields, ["ledger.commit_interval_ms"], "{err}");
        }
    }

    #[test]
    fn unknown_field_names_file_and_line() {
        let err = parse("[server]\nlisten = [\"127.0.0.1:0\"]\nlisen = 1\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("t.toml"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("lisen"), "{msg}");
    }

    #[test]
    fn every_problem_is_reported() {
        let err = parse(
            r#"
            [server]
            listen = ["nope"]
            driver = "kqueue"
            [[providers]]
            name = "Bad Name"
            [[providers]]
            name = "a"
            kind = "azure"
            base_url = "https://api.openai.com/v1"
            [[routes]]
            model = "x"
            provider = "missing"
        "#,
        )
        .unwrap_err();
        let fields: Vec<&str> = err.issues.iter().map(|i| i.field.as_str()).collect();
        assert!(fields.contains(&"server.listen[0]"), "{fields:?}");
        assert!(fields.contains(&"server.driver"), "{fields:?}");
        assert!(fields.contains(&"providers[0].name"), "{fields:?}");
        assert!(fields.contains(&"providers[1].kind"), "{fields:?}");
        assert!(fields.contains(&"providers[1].base_url"), "{fields:?}");
        assert!(fields.contains(&"routes[0].provider"), "{fields:?}");
        assert!(err.issues.iter().all(|i| i.file == Path::new("t.toml")));
    }

    #[test]
    fn exact_routes_win_over_globs() {
        let c = parse(
            r#"
            [[providers]]
            name = "a"
            kind = "openai"
            [[providers]]
            name = "b"
            kind = "anthropic"
            [[routes]]
            model = "*"
            provider = "a"
            [[routes]]
            model = "special"
            provider = "b"
            upstream_model = "claude-x"
        "#,
        )
        .unwrap();
        assert_eq!(c.route_for("special").unwrap().provider, 1);
        assert_eq!(c.route_for("other").unwrap().provider, 0);
    }

    #[test]
    fn base_url_forms() {
        let b = parse_base_url("https://example.com/proxy/").unwrap();
        assert_eq!(
            (b.tls, b.port, b.path_prefix.as_str()),
            (true, 443, "/proxy")
        );
        assert_eq!(b.host_header(), "example.com");
        let b = parse_base_url("http://[::1]:8080").unwrap();
        assert_eq!(b.host, "::1");
        assert_eq!(b.host_header(), "[::1]:8080");
        assert!(parse_base_url("ftp://x").is_err());
        assert!(parse_base_url("https://x/v1").is_err());
    }

    #[test]
    fn key_sources_never_leak_the_key() {
        let dir = std::env::temp_dir().join(format!("tg-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("k");
        std::fs::write(&f, "sk-secret-value\n").unwrap();
        let p = ProviderConfig {
            name: "p".into(),
            kind: ProviderKind::OpenAi,
            base_url: default_base("x"),
            key: KeySource::File(f),
            ca_file: None,
            mock_when_no_key: false,
        };
        let k = p.load_key().unwrap();
        assert_eq!(k.expose(), "sk-secret-value");
        assert!(!format!("{k:?}").contains("secret"));
        let p = ProviderConfig {
            key: KeySource::Env("TG_TEST_SURELY_UNSET_VAR".into()),
            ..p
        };
        assert_eq!(
            p.load_key().unwrap_err(),
            KeyError::EnvUnset("TG_TEST_SURELY_UNSET_VAR".into())
        );
    }
}
