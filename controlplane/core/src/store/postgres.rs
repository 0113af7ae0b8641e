//! A fleet's [`Store`] on PostgreSQL, through `tokio-postgres` over rustls, selected in the configuration
//! by `[ledger] postgres = "postgres://..."`. The other fleet store beside FoundationDB (`super::fdb`):
//! every gateway of a fleet commits its spend batches to one database; the key layout is the one in
//! `docs/store.md`, the operator's guide `docs/fleet.md`.
//!
//! Owns: [`PgConfig`] (the parsed `ledger.postgres` URL, its TLS mode and CA file, the timeout; its
//! `Debug` and every message it makes leave the password out), [`PgStore`] (a small pool of connections
//! and the runtime that drives them), the table, the TLS connector, and the mapping of PostgreSQL's errors
//! to [`StoreError`].
//!
//! Table: `tollgate_kv (k bytea PRIMARY KEY, v bytea, n numeric)` ([`CREATE_TABLE`]) in the connection's
//! schema (the first one of its `search_path`), created by [`PgStore::open`] when it is missing (an
//! operator may create it beforehand and grant only `SELECT, INSERT, UPDATE, DELETE`). `bytea` compares
//! bytewise (memcmp, then length), which is FoundationDB's key order, whatever the database's collation.
//! A key written by `set` keeps its bytes in `v`; a counter written by `add` keeps its value in `n`, a
//! signed 128-bit integer as `numeric`, read back as the 16-byte little-endian encoding the trait
//! promises: adding to a `numeric` costs the server far less than decoding and re-encoding 16 bytes in
//! SQL (measured: 36 against 130 us a statement, round trip included), and an operator reads spend in
//! SQL as plain numbers.
//!
//! Threads: none of its own. The store owns a current-thread tokio runtime; each operation runs on the
//! calling thread inside `Runtime::block_on`, which also drives the connections' background tasks (several
//! threads may call at once: one drives, the others wait for their answers). Only the ledger thread, the
//! control thread, the control plane's blocking pool and the CLI call it, never a core. Resolving a host
//! name runs `getaddrinfo` on the runtime's blocking pool, a thread that exits when idle.
//!
//! Semantics: each transaction is `BEGIN ISOLATION LEVEL SERIALIZABLE` (PostgreSQL's serializable
//! snapshot isolation) on one pooled connection. The differences from FoundationDB, which the trait was
//! modelled on, are stated here and checked in [`super::conformance::run_serializable`]:
//! - A transaction conflicts only when no serial order explains what the committed transactions read:
//!   a read that a later commit overwrote does not make the reader conflict if it can be ordered first
//!   (FoundationDB's optimistic check would refuse it). Cycles (write skew, two nodes each reading what
//!   the other writes, as lease grants do) still conflict.
//! - [`Transaction::add`] is an upsert that adds in SQL (exact, wrapping at 128 bits like FoundationDB's
//!   `ADD`), not FoundationDB's conflict-free mutation: two overlapping
//!   transactions that add to one key conflict (`could not serialize access due to concurrent update`),
//!   and [`super::transact`] retries the later one. In a fleet the hot keys are shared budgets' spend
//!   slots; each node commits once per `ledger.commit_interval_ms`, so a retry costs one more commit.
//! - Writes (`set`, `clear`, `clear_range`, `add`) return nothing, so they are buffered and sent, in
//!   order and pipelined with prepared statements, ahead of the transaction's next read or its `COMMIT`:
//!   reads still see the transaction's own writes, a write's error surfaces at that read or at `commit`,
//!   and a ledger batch costs one round trip for its writes. `BEGIN` travels with the first statement.
//!
//! Fails: SQLSTATE 40001 (serialization failure) and 40P01 (deadlock) are [`StoreError::Conflict`]
//! (at `COMMIT` too: the transaction certainly did not commit). The connection closing or the timeout
//! passing while `COMMIT` was in flight is [`StoreError::CommitUnknown`] (the ledger's per-source batch
//! ids make the retry a no-op when the first attempt landed). The timeout elsewhere is
//! [`StoreError::Timeout`]; a statement the server cancelled (57014) too. Everything else (the server
//! unreachable, authentication refused, a TLS failure, the connection lost outside a commit) is
//! [`StoreError::Unavailable`] with PostgreSQL's severity, SQLSTATE and message, never the URL's password.
//! A connection that failed or timed out is dropped (so are the idle ones when it was lost: they likely
//! went the same way) and the next transaction opens a fresh one. Dropping a transaction uncommitted
//! rolls it back (the connection is dropped if that fails). Nothing panics.
//!
//! Timeouts and retries: one timeout, `ledger.postgres_timeout_ms` (default 5 s, FoundationDB's own
//! transaction limit), bounds opening a connection (TCP, TLS, authentication, preparing the statements)
//! and each transaction from `begin` to the end of `commit`; it is enforced on the client, so a server
//! that stops answering while the kernel still acknowledges (a stopped process, a network partition
//! that keeps the socket open) is caught too. The server gets twice that bound as `statement_timeout` and
//! `idle_in_transaction_session_timeout`, so the locks of a client that vanished are released (the client
//! gives up first: only it knows whether `COMMIT` was in flight). Retries
//! are the caller's: [`super::transact`] with its [`super::RetryPolicy`] (the ledger: 10 attempts, 2 ms
//! backoff doubling to 200 ms), each attempt a fresh transaction.
//!
//! TLS (`sslmode` in the URL, libpq's meanings; default `prefer`): `disable`, `prefer` (TLS when the
//! server offers it, unverified), `require` (TLS, unverified), `verify-ca` (the certificate chains to a
//! trusted root), `verify-full` (and names the host). Trusted roots: `ledger.postgres_ca_file` (PEM)
//! when set, else the public web roots bundled in the binary. rustls with aws-lc-rs
//! ([`crate::tls::crypto_provider`]), ALPN `postgresql`. Authentication is PostgreSQL's (SCRAM-SHA-256,
//! md5, trust...); SCRAM runs without channel binding (the server is authenticated by `verify-full`).
//!
//! Cost, measured (see `docs/store.md`): a transaction is one round trip per read plus one for its writes
//! and `COMMIT`; a commit on a local server is dominated by its WAL flush. Sessions run with
//! `enable_seqscan = off` so that every read is an index scan: serializable isolation then locks the keys
//! and ranges read, not the whole table, and conflicts stay between transactions that touch the same keys.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Socket, Statement};

use super::{encode_i128, KeyValue, Store, StoreError, Transaction};

/// The table every key lives in.
pub const TABLE: &str = "tollgate_kv";

/// The default of `ledger.postgres_timeout_ms`.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// Idle connections kept for the next transactions; more are closed when their transaction ends.
const IDLE_MAX: usize = 8;

/// libpq's `sslmode`, as the `ledger.postgres` URL names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// TLS if the server offers it, unverified; plaintext otherwise (libpq's default).
    Prefer,
    /// TLS, unverified.
    Require,
    /// TLS, the certificate chains to a trusted root (any name).
    VerifyCa,
    /// TLS, the certificate chains to a trusted root and names the host.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// `[ledger] postgres` (with `postgres_ca_file` and `postgres_timeout_ms`), parsed. Holds the password:
/// its `Debug`, [`PgConfig::target`] and every error leave it out.
#[derive(Clone)]
pub struct PgConfig {
    /// The URL as written (compared by a reload; never printed).
    url: String,
    pg: tokio_postgres::Config,
    pub sslmode: SslMode,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
}

impl PartialEq for PgConfig {
    fn eq(&self, other: &PgConfig) -> bool {
        self.url == other.url && self.ca_file == other.ca_file && self.timeout == other.timeout
    }
}

impl Eq for PgConfig {}

impl std::fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgConfig")
            .field("target", &self.target())
            .field("sslmode", &self.sslmode)
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Replaces every occurrence of `secret` (when it is not empty) in `s`.
fn redact(s: String, secrets: &[&str]) -> String {
    secrets
        .iter()
        .filter(|x| !x.is_empty())
        .fold(s, |s, x| s.replace(x, "***"))
}

/// The password as written in a URL's authority (`user:password@`), raw and percent-decoded.
fn url_passwords(url: &str) -> Vec<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return Vec::new();
    };
    let Some((_, raw)) = userinfo.split_once(':') else {
        return Vec::new();
    };
    let mut out = vec![raw.to_owned()];
    if let Some(decoded) = percent_decode(raw) {
        if decoded != raw {
            out.push(decoded);
        }
    }
    out
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl PgConfig {
    /// Parses a `postgres://` (or `postgresql://`) URL: `sslmode` is taken out and read as libpq does
    /// (default `prefer`); `sslrootcert` is refused (the CA file is `ledger.postgres_ca_file`); the rest
    /// goes to `tokio-postgres` (host, port, user, password, database, `options`, `application_name`,
    /// `connect_timeout`, keepalives...). The error never contains the password.
    pub fn parse(
        url: &str,
        ca_file: Option<PathBuf>,
        timeout: Duration,
    ) -> Result<PgConfig, String> {
        let secrets = url_passwords(url);
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        PgConfig::parse_inner(url, ca_file, timeout).map_err(|e| redact(e, &secrets))
    }

    fn parse_inner(
        url: &str,
        ca_file: Option<PathBuf>,
        timeout: Duration,
    ) -> Result<PgConfig, String> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(
                "must be a URL that starts with postgres:// or postgresql:// \
                 (postgres://user:password@host:port/database?sslmode=verify-full)"
                    .to_owned(),
            );
        }
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut sslmode = SslMode::Prefer;
        let mut kept: Vec<&str> = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => {
                    sslmode = SslMode::parse(value).ok_or_else(|| {
                        format!(
                            "sslmode={value:?} is not one of disable, prefer, require, verify-ca, \
                             verify-full"
                        )
                    })?;
                }
                "sslrootcert" | "sslcert" | "sslkey" | "sslcrl" | "sslpassword" => {
                    return Err(format!(
                        "the URL parameter {key} is not read here: name the CA certificates in \
                         ledger.postgres_ca_file (client certificates are not supported)"
                    ))
                }
                _ => kept.push(pair),
            }
        }
        let rebuilt = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        let mut pg = tokio_postgres::Config::from_str(&rebuilt).map_err(|e| describe(&e))?;
        if pg.get_hosts().is_empty() {
            return Err("names no host (postgres://user@host:5432/database)".to_owned());
        }
        if pg.get_user().is_none() {
            return Err("names no user (postgres://user@host:5432/database)".to_owned());
        }
        if ca_file.is_some() && !matches!(sslmode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(format!(
                "ledger.postgres_ca_file is set but sslmode is {}: the CA is used only with \
                 sslmode=verify-full (or verify-ca)",
                sslmode.as_str()
            ));
        }
        pg.ssl_mode(match sslmode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(timeout);
        }
        if pg.get_application_name().is_none() {
            pg.application_name("tollgate");
        }
        Ok(PgConfig {
            url: url.to_owned(),
            pg,
            sslmode,
            ca_file,
            timeout,
        })
    }

    /// Whether `other` was written with the same URL (password and parameters included).
    pub fn same_url(&self, other: &PgConfig) -> bool {
        self.url == other.url
    }

    /// `postgres://user@host:port/database`: the URL without its password and parameters, for messages.
    pub fn target(&self) -> String {
        let hosts: Vec<String> = self
            .pg
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let host = match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                };
                let ports = self.pg.get_ports();
                match ports.get(i).or(ports.first()) {
                    Some(p) => format!("{host}:{p}"),
                    None => format!("{host}:5432"),
                }
            })
            .collect();
        let user = self.pg.get_user().unwrap_or("");
        let db = self.pg.get_dbname().unwrap_or(user);
        format!("postgres://{user}@{}/{db}", hosts.join(","))
    }

    /// The trusted roots for `verify-ca` and `verify-full`: the CA file's certificates, else the public
    /// web roots.
    pub fn roots(&self) -> Result<RootCertStore, String> {
        let mut roots = RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                for cert in read_pem_certs(path)? {
                    roots
                        .add(cert)
                        .map_err(|e| format!("ledger.postgres_ca_file {}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    }
}

/// The certificates of a PEM file; at least one.
fn read_pem_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path)
        .map_err(|e| format!("ledger.postgres_ca_file {}: {e}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("ledger.postgres_ca_file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "ledger.postgres_ca_file {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// A `tokio-postgres` error with its cause (its `Display` alone says only "db error").
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The statements every connection prepares.
struct Statements {
    get: Statement,
    range: Statement,
    set: Statement,
    clear: Statement,
    clear_range: Statement,
    add: Statement,
}

const GET: &str = "SELECT v, n::text FROM tollgate_kv WHERE k = $1";
const RANGE: &str =
    "SELECT k, v, n::text FROM tollgate_kv WHERE k >= $1 AND k < $2 ORDER BY k LIMIT $3";
const SET: &str = "INSERT INTO tollgate_kv (k, v, n) VALUES ($1, $2, NULL) \
                   ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v, n = NULL";
const CLEAR: &str = "DELETE FROM tollgate_kv WHERE k = $1";
const CLEAR_RANGE: &str = "DELETE FROM tollgate_kv WHERE k >= $1 AND k < $2";
/// `$2` is the delta in decimal. A counter keeps its value in `n`; a key last written by `set` is read
/// as its bytes first (little-endian, at most 16, a shorter value zero-extended as FoundationDB does).
/// The sum wraps into the signed 128-bit range (`mod` on `numeric` is exact), as FoundationDB's `ADD`
/// wraps its 16-byte value.
const ADD: &str = "INSERT INTO tollgate_kv AS t (k, v, n) VALUES ($1, NULL, $2::numeric) \
    ON CONFLICT (k) DO UPDATE SET v = NULL, n = ( \
      SELECT mod(mod(s.x + 170141183460469231731687303715884105728, \
                     340282366920938463463374607431768211456) \
                 + 340282366920938463463374607431768211456, \
                 340282366920938463463374607431768211456) \
             - 170141183460469231731687303715884105728 \
      FROM (SELECT round(coalesce(t.n, \
                   (SELECT coalesce(sum(get_byte(t.v, j)::numeric * 256::numeric ^ j), 0) \
                    FROM generate_series(0, least(length(t.v), 16) - 1) AS j))) \
                   + EXCLUDED.n AS x) AS s)";
/// The table, as [`PgStore::open`] creates it when it is missing.
pub const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS tollgate_kv (\
    k bytea PRIMARY KEY, v bytea, n numeric, CHECK ((v IS NULL) <> (n IS NULL)))";

/// One open connection: the client, its prepared statements, and the task that drives its socket.
struct Conn {
    client: Client,
    stmts: Statements,
    task: tokio::task::JoinHandle<()>,
}

impl Conn {
    fn close(self) {
        self.task.abort();
    }
}

/// A PostgreSQL database as a [`Store`]; see the module docs.
pub struct PgStore {
    cfg: PgConfig,
    tls: MakeRustls,
    /// Taken only by `Drop`, which shuts it down without blocking (the last handle on the store may be
    /// dropped on an async thread, where dropping a runtime would panic).
    rt: Option<tokio::runtime::Runtime>,
    idle: Mutex<Vec<Conn>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The connections' tasks end with the runtime, closing their sockets.
        self.idle().clear();
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.cfg.target())
            .finish_non_exhaustive()
    }
}

/// How a failed step ends the transaction and its connection.
enum Failure {
    /// The server answered with an error: the connection is fine.
    Db(tokio_postgres::Error),
    /// The connection failed (closed, I/O, TLS): drop it, and the idle ones.
    Lost(tokio_postgres::Error),
    /// The timeout passed: drop the connection.
    TimedOut,
    /// The transaction has no connection left (an earlier failure dropped it).
    Gone,
}

fn classify(e: tokio_postgres::Error) -> Failure {
    match e.as_db_error() {
        // A FATAL error (the server shutting down, the session terminated) ends the connection too.
        Some(db) if db.severity() != "FATAL" && db.severity() != "PANIC" => Failure::Db(e),
        _ => Failure::Lost(e),
    }
}

/// The store error for a failure outside `COMMIT`.
fn store_error(f: &Failure) -> StoreError {
    match f {
        Failure::TimedOut => StoreError::Timeout,
        Failure::Gone => {
            StoreError::Unavailable("the transaction's connection was already closed".to_owned())
        }
        Failure::Db(e) | Failure::Lost(e) => match e.code() {
            Some(c)
                if *c == SqlState::T_R_SERIALIZATION_FAILURE
                    || *c == SqlState::T_R_DEADLOCK_DETECTED =>
            {
                StoreError::Conflict
            }
            Some(c) if *c == SqlState::QUERY_CANCELED => StoreError::Timeout,
            _ => StoreError::Unavailable(format!("PostgreSQL: {}", describe(e))),
        },
    }
}

impl PgStore {
    /// Connects to the database (within the timeout), creates the table if it is missing, and keeps the
    /// connection for the first transaction. Fails with [`StoreError::Unavailable`] (or `Timeout`) naming
    /// the database without its password.
    pub fn open(cfg: &PgConfig) -> Result<PgStore, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Unavailable(format!("starting the PostgreSQL client: {e}")))?;
        let tls = MakeRustls::new(cfg).map_err(StoreError::Unavailable)?;
        let store = PgStore {
            cfg: cfg.clone(),
            tls,
            rt: Some(rt),
            idle: Mutex::new(Vec::new()),
        };
        let conn = store.connect(true)?;
        store.give_back(conn);
        Ok(store)
    }

    /// The configuration this store was opened with.
    pub fn config(&self) -> &PgConfig {
        &self.cfg
    }

    /// Runs `f` to completion on the calling thread (driving the connections' tasks meanwhile); `None`
    /// only while the store is being dropped.
    fn block_on<F: Future>(&self, f: F) -> Option<F::Output> {
        self.rt.as_ref().map(|rt| rt.block_on(f))
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Conn>> {
        // A panic while the lock was held leaves a list of connections, each whole.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn context(&self, e: StoreError) -> StoreError {
        match e {
            StoreError::Unavailable(m) => {
                StoreError::Unavailable(format!("{}: {m}", self.cfg.target()))
            }
            other => other,
        }
    }

    /// Opens a connection: TCP (or a Unix socket), TLS as `sslmode` says, authentication, the session's
    /// settings and the prepared statements, all within the timeout. With `create`, first creates the
    /// table if it is missing.
    fn connect(&self, create: bool) -> Result<Conn, StoreError> {
        let deadline = Instant::now() + self.cfg.timeout;
        // Twice the client's bound: the client decides (it knows whether COMMIT was in flight); the server
        // only cleans up after a client that is gone.
        let ms = self.cfg.timeout.as_millis().saturating_mul(2);
        let settings = format!(
            "SET statement_timeout = {ms}; SET idle_in_transaction_session_timeout = {ms}; \
             SET enable_seqscan = off"
        );
        let result = self.block_on(async {
            tokio::time::timeout_at(deadline, async {
                let (client, connection) = self
                    .cfg
                    .pg
                    .connect(self.tls.clone())
                    .await
                    .map_err(|e| StoreError::Unavailable(describe(&e)))?;
                let task = tokio::spawn(async move {
                    let _ = connection.await;
                });
                let ready = async {
                    if create {
                        ensure_table(&client).await?;
                    }
                    let (b, i, t) = (Type::BYTEA, Type::INT8, Type::TEXT);
                    let (one, two) = ([b.clone()], [b.clone(), b.clone()]);
                    let (range, add) = ([b.clone(), b.clone(), i], [b, t]);
                    // Pipelined: one round trip for the settings and every statement.
                    let (_, get, range, set, clear, clear_range, add) = tokio::try_join!(
                        client.batch_execute(&settings),
                        client.prepare_typed(GET, &one),
                        client.prepare_typed(RANGE, &range),
                        client.prepare_typed(SET, &two),
                        client.prepare_typed(CLEAR, &one),
                        client.prepare_typed(CLEAR_RANGE, &two),
                        client.prepare_typed(ADD, &add),
                    )
                    .map_err(|e| store_error(&classify(e)))?;
                    Ok(Statements {
                        get,
                        range,
                        set,
                        clear,
                        clear_range,
                        add,
                    })
                };
                match ready.await {
                    Ok(stmts) => Ok(Conn {
                        client,
                        stmts,
                        task,
                    }),
                    Err(e) => {
                        task.abort();
                        Err(e)
                    }
                }
            })
            .await
        });
        match result {
            Some(Ok(r)) => r.map_err(|e| self.context(e)),
            Some(Err(_)) => Err(StoreError::Timeout),
            None => Err(StoreError::Unavailable("the store is closed".to_owned())),
        }
    }

    /// An idle connection that is still open, or a new one.
    fn take(&self) -> Result<Conn, StoreError> {
        // Let the idle connections' tasks read what the server sent meanwhile (a shutdown's FATAL, a
        // closed socket), so a connection the server already dropped is not handed out.
        self.block_on(async {
            tokio::task::yield_now().await;
            tokio::task::yield_now().await;
        });
        loop {
            let next = self.idle().pop();
            match next {
                Some(c) if !c.client.is_closed() => return Ok(c),
                Some(c) => c.close(),
                None => return self.connect(false),
            }
        }
    }

    fn give_back(&self, conn: Conn) {
        let mut idle = self.idle();
        if idle.len() < IDLE_MAX && !conn.client.is_closed() {
            idle.push(conn);
        } else {
            drop(idle);
            conn.close();
        }
    }

    /// Drops every idle connection (one was lost: the others likely were too).
    fn drop_idle(&self) {
        let conns = std::mem::take(&mut *self.idle());
        for c in conns {
            c.close();
        }
    }
}

/// Creates the table unless it exists. Two nodes creating it at once may collide on the catalog's
/// unique index (23505) or the table (42P07): the other one created it, which is what was wanted.
async fn ensure_table(client: &Client) -> Result<(), StoreError> {
    let exists = client
        .query_one("SELECT to_regclass('tollgate_kv') IS NOT NULL", &[])
        .await
        .and_then(|row| row.try_get::<_, bool>(0))
        .map_err(|e| store_error(&classify(e)))?;
    if exists {
        return Ok(());
    }
    match client.batch_execute(CREATE_TABLE).await {
        Ok(()) => Ok(()),
        Err(e)
            if e.code() == Some(&SqlState::UNIQUE_VIOLATION)
                || e.code() == Some(&SqlState::DUPLICATE_TABLE) =>
        {
            Ok(())
        }
        Err(e) => Err(StoreError::Unavailable(format!(
            "creating the table {TABLE} (or create it beforehand: {CREATE_TABLE}): {}",
            describe(&e)
        ))),
    }
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn begin(&self) -> Result<Box<dyn Transaction + '_>, StoreError> {
        let conn = self.take()?;
        Ok(Box::new(PgTransaction {
            store: self,
            conn: Some(conn),
            deadline: Instant::now() + self.cfg.timeout,
            begun: false,
            pending: Vec::new(),
            failed: None,
            done: false,
        }))
    }
}

/// A write waiting for the transaction's next round trip.
enum Write {
    Set(Vec<u8>, Vec<u8>),
    Clear(Vec<u8>),
    ClearRange(Vec<u8>, Vec<u8>),
    Add(Vec<u8>, i128),
}

/// What a round trip ends with after the buffered writes.
enum Last<'a> {
    Get(&'a [u8]),
    Range(&'a [u8], &'a [u8], Option<i64>),
    Commit,
    Rollback,
}

type StepOutput = Result<Option<Vec<Row>>, tokio_postgres::Error>;
type Step<'f> = Pin<Box<dyn Future<Output = StepOutput> + 'f>>;

/// Polls `steps` in order (each sends its request on its first poll, so they go out in this order, in
/// one flush) and returns their outputs, or the index and error of the first that failed.
async fn in_order(
    mut steps: Vec<Step<'_>>,
) -> Result<Vec<Option<Vec<Row>>>, (usize, tokio_postgres::Error)> {
    let mut out: Vec<Option<Option<Vec<Row>>>> = (0..steps.len()).map(|_| None).collect();
    std::future::poll_fn(move |cx| {
        let mut all = true;
        for (i, (step, slot)) in steps.iter_mut().zip(out.iter_mut()).enumerate() {
            if slot.is_some() {
                continue;
            }
            match step.as_mut().poll(cx) {
                Poll::Ready(Ok(v)) => *slot = Some(v),
                Poll::Ready(Err(e)) => return Poll::Ready(Err((i, e))),
                Poll::Pending => all = false,
            }
        }
        if all {
            Poll::Ready(Ok(out.iter_mut().map(|o| o.take().flatten()).collect()))
        } else {
            Poll::Pending
        }
    })
    .await
}

struct PgTransaction<'s> {
    store: &'s PgStore,
    /// `None` once the connection was dropped (lost, timed out) or handed back.
    conn: Option<Conn>,
    deadline: Instant,
    /// `BEGIN` was sent.
    begun: bool,
    pending: Vec<Write>,
    /// The first error: every later read and the commit return it.
    failed: Option<StoreError>,
    /// `COMMIT` was sent: the server ends the transaction, whatever it answers.
    done: bool,
}

impl PgTransaction<'_> {
    /// One round trip: `BEGIN` if not yet sent, the buffered writes, then `last`. Returns `last`'s rows.
    fn round_trip(&mut self, last: Last<'_>) -> Result<Vec<Row>, (Failure, bool)> {
        let Some(conn) = self.conn.as_ref() else {
            return Err((Failure::Gone, false));
        };
        let client = &conn.client;
        let st = &conn.stmts;
        let mut steps: Vec<Step<'_>> = Vec::with_capacity(self.pending.len() + 2);
        if !self.begun {
            steps.push(Box::pin(async move {
                client
                    .batch_execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                    .await
                    .map(|()| None)
            }));
        }
        for w in &self.pending {
            steps.push(match w {
                Write::Set(k, v) => Box::pin(async move {
                    let p: [&(dyn ToSql + Sync); 2] = [k, v];
                    client.execute(&st.set, &p).await.map(|_| None)
                }),
                Write::Clear(k) => Box::pin(async move {
                    let p: [&(dyn ToSql + Sync); 1] = [k];
                    client.execute(&st.clear, &p).await.map(|_| None)
                }),
                Write::ClearRange(b, e) => Box::pin(async move {
                    let p: [&(dyn ToSql + Sync); 2] = [b, e];
                    client.execute(&st.clear_range, &p).await.map(|_| None)
                }),
                Write::Add(k, delta) => {
                    let delta = delta.to_string();
                    Box::pin(async move {
                        let p: [&(dyn ToSql + Sync); 2] = [k, &delta];
                        client.execute(&st.add, &p).await.map(|_| None)
                    })
                }
            });
        }
        let committing = matches!(last, Last::Commit);
        match last {
            Last::Get(k) => steps.push(Box::pin(async move {
                let p: [&(dyn ToSql + Sync); 1] = [&k];
                client.query(&st.get, &p).await.map(Some)
            })),
            Last::Range(b, e, limit) => steps.push(Box::pin(async move {
                let p: [&(dyn ToSql + Sync); 3] = [&b, &e, &limit];
                client.query(&st.range, &p).await.map(Some)
            })),
            Last::Commit => steps.push(Box::pin(async move {
                client.batch_execute("COMMIT").await.map(|()| None)
            })),
            Last::Rollback => steps.push(Box::pin(async move {
                client.batch_execute("ROLLBACK").await.map(|()| None)
            })),
        }
        let n = steps.len();
        let deadline = self.deadline;
        let result = self
            .store
            .block_on(async move { tokio::time::timeout_at(deadline, in_order(steps)).await });
        self.begun = true;
        self.pending.clear();
        match result {
            Some(Ok(Ok(mut out))) => Ok(out.pop().flatten().unwrap_or_default()),
            Some(Ok(Err((i, e)))) => Err((classify(e), committing && i + 1 == n)),
            Some(Err(_)) => Err((Failure::TimedOut, committing)),
            None => Err((Failure::Gone, committing)),
        }
    }

    /// Ends the connection's part in a failure: a lost or timed-out connection is dropped (and, when lost,
    /// the idle ones).
    fn settle(&mut self, f: &Failure) {
        match f {
            Failure::Db(_) | Failure::Gone => {}
            Failure::Lost(_) => {
                if let Some(c) = self.conn.take() {
                    c.close();
                }
                self.store.drop_idle();
            }
            Failure::TimedOut => {
                if let Some(c) = self.conn.take() {
                    c.close();
                }
            }
        }
    }

    fn read(&mut self, last: Last<'_>) -> Result<Vec<Row>, StoreError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.round_trip(last) {
            Ok(rows) => Ok(rows),
            Err((f, _)) => {
                let e = self.store.context(store_error(&f));
                self.settle(&f);
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }
}

fn corrupt(what: String) -> StoreError {
    StoreError::Corrupt(format!(
        "{TABLE} holds a value Tollgate did not write: {what}"
    ))
}

fn key(row: &Row, i: usize) -> Result<Vec<u8>, StoreError> {
    row.try_get::<_, Vec<u8>>(i)
        .map_err(|e| corrupt(describe(&e)))
}

/// A row's value (columns `v` and `n` from `at`): its bytes, or a counter's 16-byte encoding.
fn value(row: &Row, at: usize) -> Result<Vec<u8>, StoreError> {
    let bytes = row
        .try_get::<_, Option<Vec<u8>>>(at)
        .map_err(|e| corrupt(describe(&e)))?;
    let counter = row
        .try_get::<_, Option<String>>(at + 1)
        .map_err(|e| corrupt(describe(&e)))?;
    match (bytes, counter) {
        (Some(b), None) => Ok(b),
        (None, Some(n)) => n
            .parse::<i128>()
            .map(|n| encode_i128(n).to_vec())
            .map_err(|_| corrupt(format!("the counter {n:?} is not a 128-bit integer"))),
        _ => Err(corrupt("a row with both or neither of v and n".to_owned())),
    }
}

impl Transaction for PgTransaction<'_> {
    fn get(&mut self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let rows = self.read(Last::Get(key))?;
        rows.first().map(|r| value(r, 0)).transpose()
    }

    fn get_range(
        &mut self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StoreError> {
        if begin >= end {
            return match &self.failed {
                Some(e) => Err(e.clone()),
                None => Ok(Vec::new()),
            };
        }
        let limit = if limit == 0 {
            None
        } else {
            Some(i64::try_from(limit).unwrap_or(i64::MAX))
        };
        let rows = self.read(Last::Range(begin, end, limit))?;
        rows.iter()
            .map(|r| Ok((key(r, 0)?, value(r, 1)?)))
            .collect()
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.pending.push(Write::Set(key.to_vec(), value.to_vec()));
    }

    fn clear(&mut self, key: &[u8]) {
        self.pending.push(Write::Clear(key.to_vec()));
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin < end {
            self.pending
                .push(Write::ClearRange(begin.to_vec(), end.to_vec()));
        }
    }

    fn add(&mut self, key: &[u8], delta: i128) {
        self.pending.push(Write::Add(key.to_vec(), delta));
    }

    fn commit(mut self: Box<Self>) -> Result<(), StoreError> {
        if let Some(e) = self.failed.take() {
            // Not done: dropping the transaction rolls back what the server still holds open.
            return Err(e);
        }
        if !self.begun && self.pending.is_empty() {
            // Nothing was sent: there is nothing to commit.
            return Ok(());
        }
        // Sent with the writes: the server ends the transaction whatever happens to them (a failed one
        // turns COMMIT into a rollback).
        self.done = true;
        match self.round_trip(Last::Commit) {
            Ok(_) => Ok(()),
            Err((f, at_commit)) => {
                let e = match (&f, at_commit) {
                    // The answer to COMMIT itself: a serialization failure there means it did not commit.
                    (Failure::Db(_), _) => store_error(&f),
                    // The connection went, or the time ran out, with COMMIT sent: it may have landed.
                    (Failure::Lost(_) | Failure::TimedOut, true) => StoreError::CommitUnknown,
                    (Failure::Lost(_) | Failure::TimedOut, false) | (Failure::Gone, _) => {
                        store_error(&f)
                    }
                };
                self.settle(&f);
                Err(self.store.context(e))
            }
        }
    }
}

impl Drop for PgTransaction<'_> {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.done || !self.begun {
            // Committed (or COMMIT ended it on the server), or nothing was sent: the connection is idle.
            self.store.give_back(conn);
            return;
        }
        // Roll back what was sent; the buffered writes are simply forgotten.
        self.pending.clear();
        self.conn = Some(conn);
        self.deadline = self.deadline.max(Instant::now() + Duration::from_secs(1));
        match self.round_trip(Last::Rollback) {
            Ok(_) => {
                if let Some(conn) = self.conn.take() {
                    self.store.give_back(conn);
                }
            }
            Err((f, _)) => {
                self.settle(&f);
                if let Some(conn) = self.conn.take() {
                    conn.close();
                }
            }
        }
    }
}

/// Makes rustls connections for `tokio-postgres`, verifying as `sslmode` says.
#[derive(Clone)]
struct MakeRustls {
    config: Arc<ClientConfig>,
}

impl MakeRustls {
    fn new(cfg: &PgConfig) -> Result<MakeRustls, String> {
        let provider = crate::tls::crypto_provider();
        let inner = match cfg.sslmode {
            SslMode::VerifyCa | SslMode::VerifyFull => Some(
                WebPkiServerVerifier::builder_with_provider(
                    Arc::new(cfg.roots()?),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|e| format!("the PostgreSQL TLS roots: {e}"))?,
            ),
            SslMode::Disable | SslMode::Prefer | SslMode::Require => None,
        };
        let verifier = Verifier {
            inner,
            check_name: cfg.sslmode == SslMode::VerifyFull,
            provider: Arc::clone(&provider),
        };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("the PostgreSQL TLS configuration: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeRustls {
            config: Arc::new(config),
        })
    }
}

/// `verify-full`: rustls' WebPKI verifier; `verify-ca`: the same, a name mismatch forgiven; `prefer` and
/// `require`: any certificate (the handshake's signatures are still checked, so the session is encrypted
/// to whoever holds the certificate's key).
#[derive(Debug)]
struct Verifier {
    inner: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(inner) = &self.inner else {
            return Ok(ServerCertVerified::assertion());
        };
        match inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, io::Error> {
        // A Unix socket has no domain; TLS is not used there, so a bad name fails only if it is.
        Ok(RustlsConnect {
            config: Arc::clone(&self.config),
            name: ServerName::try_from(domain.to_owned()).ok(),
        })
    }
}

struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: Option<ServerName<'static>>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let name = self.name.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "TLS needs a host name or an IP address to verify",
                )
            })?;
            let tls = tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await?;
            Ok(RustlsStream(tls))
        })
    }
}

/// A TLS connection to the server.
struct RustlsStream(tokio_rustls::client::TlsStream<Socket>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

impl tokio_postgres::tls::TlsStream for RustlsStream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn parse(url: &str) -> Result<PgConfig, String> {
        PgConfig::parse(url, None, DEFAULT_TIMEOUT)
    }

    #[test]
    fn a_url_parses_with_libpq_sslmodes_and_prints_without_its_password() {
        let c = parse("postgres://tg:s3cret@db.example:6432/spend?sslmode=verify-full").unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(c.target(), "postgres://tg@db.example:6432/spend");
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        let c = parse("postgresql://tg@localhost/spend").unwrap();
        assert_eq!(c.sslmode, SslMode::Prefer);
        assert_eq!(c.target(), "postgres://tg@localhost:5432/spend");
        for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            let c = parse(&format!(
                "postgres://tg@h/d?application_name=x&sslmode={mode}"
            ))
            .unwrap();
            assert_eq!(c.sslmode.as_str(), mode);
        }
        // The same URL with another password is another configuration (a reload sees the change).
        assert_ne!(
            parse("postgres://tg:a@h/d").unwrap(),
            parse("postgres://tg:b@h/d").unwrap()
        );
    }

    #[test]
    fn bad_urls_are_refused_without_echoing_the_password() {
        for (url, want) in [
            ("mysql://tg:s3cret@h/d", "postgres://"),
            ("postgres://tg:s3cret@h/d?sslmode=verify", "sslmode"),
            ("postgres://tg:s3cret@h:notaport/d", "port"),
            (
                "postgres://tg:s3cret@h/d?sslrootcert=/ca.pem",
                "ledger.postgres_ca_file",
            ),
            ("postgres://tg:s3cret@h/d?nosuchoption=1", "nosuchoption"),
            ("postgres://tg:s3cr%65t@h:x/d", "port"),
            ("postgres://h/d", "no user"),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains(want), "{url}: {e}");
            assert!(
                !e.contains("s3cret") && !e.contains("s3cr%65t"),
                "{url}: {e}"
            );
        }
        let e = PgConfig::parse(
            "postgres://tg@h/d?sslmode=require",
            Some(PathBuf::from("/ca.pem")),
            DEFAULT_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.contains("verify-full"), "{e}");
    }

    #[test]
    fn passwords_are_found_raw_and_decoded() {
        assert_eq!(
            url_passwords("postgres://u:p%40ss@h/d"),
            vec!["p%40ss".to_owned(), "p@ss".to_owned()]
        );
        assert!(url_passwords("postgres://u@h/d").is_empty());
        assert_eq!(redact("a p@ss b".into(), &["p@ss", ""]), "a *** b");
    }

    #[test]
    fn an_unreachable_server_is_unavailable_and_named_without_the_password() {
        // A port nothing listens on (bound, then closed).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cfg = PgConfig::parse(
            &format!("postgres://tg:s3cret@127.0.0.1:{port}/d?sslmode=disable"),
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        let e = PgStore::open(&cfg).unwrap_err();
        let msg = e.to_string();
        assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
        assert!(!msg.contains("s3cret"), "{msg}");
    }
}
