//! The identity thread: keeps every issuer's signing keys and the service-token set fresh, and publishes
//! them to the cores as one immutable [`AuthState`] (an `ArcSwap`, one atomic load per request).
//!
//! Owns: JWKS fetches (periodic per `refresh_s`, and on demand when a core meets an unknown `kid`, at most
//! once per `min_refresh_s` per issuer), watching the service-token file (every 250 ms; a revocation reaches
//! the cores within a second), creating the quickstart's demo token, and applying a reload's `[auth]` and
//! `[[policies]]` ([`Reload`], sent over [`IdentityControl`]): it republishes at once with the new policies
//! and issuers, keeping the fetched keys of every issuer whose configuration is unchanged, acknowledges, and
//! then fetches keys for the new issuers. Every reload starts a new key generation, so JWT verifications
//! cached under the old issuer settings (claims, group mapping) are verified again.
//!
//! Fails: a failed fetch keeps the previous keys and is logged (`keys_failed`) and retried; a service-token
//! file that cannot be read keeps the previous set (`service_tokens_failed`). Nothing here runs on a core:
//! cores only `try_send` a refresh request and read the published state. Cost: off the hot path.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender};
use tollgate_core::auth::jwt::{self, AuthConfig, KeySet};
use tollgate_core::auth::service_tokens::{self, ServiceToken, ServiceTokenSet, TokenStore};
use tollgate_core::{Config, Identity, PolicySet};

use crate::obs::accesslog::Logger;

/// One issuer's keys as the cores see them.
#[derive(Debug, Clone, Default)]
pub struct IssuerKeys {
    pub keys: Option<Arc<KeySet>>,
    /// Fetch attempts so far (successful or not): a core waiting on an unknown `kid` watches it change.
    pub attempts: u64,
    /// When the last fetch attempt finished.
    pub last_attempt: Option<Instant>,
    /// When a core's unknown `kid` last triggered a fetch; another trigger sooner than `min_refresh` after
    /// it is dropped (a flood of made-up key ids cannot make us hammer the IdP).
    pub last_triggered: Option<Instant>,
}

/// Everything the identify and authorize phases read, frozen.
#[derive(Debug)]
pub struct AuthState {
    pub config: Arc<AuthConfig>,
    pub policies: Arc<PolicySet>,
    /// Indexed like `config.issuers`.
    pub issuers: Vec<IssuerKeys>,
    pub tokens: Arc<ServiceTokenSet>,
    /// Changes whenever any issuer's key set changes: cached JWT verifications from an older generation
    /// are verified again (a key the IdP withdrew stops working at once).
    pub key_generation: u64,
}

pub type AuthPublished = Arc<ArcSwap<AuthState>>;

/// The cores' handle: the published state and the refresh request channel.
#[derive(Debug, Clone)]
pub struct AuthHandle {
    pub state: AuthPublished,
    pub refresh: Sender<usize>,
}

/// A reload's new identity settings, for the identity thread.
#[derive(Debug)]
pub struct Reload {
    pub auth: AuthConfig,
    pub policies: Arc<PolicySet>,
    /// The control plane's data-plane tokens (the catalog's), joined to the file's.
    pub tokens: Arc<Vec<ServiceToken>>,
    /// Answered once the new policies and issuers are published (before new issuers' keys are fetched).
    pub done: Sender<()>,
}

/// The control side's handle on the identity thread.
#[derive(Debug, Clone)]
pub struct IdentityControl {
    pub reload: Sender<Reload>,
}

/// Why identity could not start.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("service tokens in {dir}: {reason}")]
    Store { dir: String, reason: String },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

const TOKEN_POLL: Duration = Duration::from_millis(250);

struct Sync {
    config: Arc<AuthConfig>,
    policies: Arc<PolicySet>,
    agents: Vec<Option<jwt::Agent>>,
    issuers: Vec<IssuerKeys>,
    /// Fingerprint of each issuer's last JWKS (kids and kinds), to tell a rotation from a no-op refresh.
    prints: Vec<String>,
    tokens: Arc<ServiceTokenSet>,
    token_print: Option<(u64, std::time::SystemTime, u64)>,
    /// The catalog's tokens, as the last reload gave them.
    api_tokens: Arc<Vec<ServiceToken>>,
    store_dir: PathBuf,
    key_generation: u64,
    published: AuthPublished,
    logger: Logger,
}

impl Sync {
    fn publish(&self) {
        self.published.store(Arc::new(AuthState {
            config: Arc::clone(&self.config),
            policies: Arc::clone(&self.policies),
            issuers: self.issuers.clone(),
            tokens: Arc::clone(&self.tokens),
            key_generation: self.key_generation,
        }));
    }

    /// Fetches issuer `i`'s keys (blocking, bounded by the agent's timeouts).
    fn fetch(&mut self, i: usize) {
        let Some(issuer) = self.config.issuers.get(i).cloned() else {
            return;
        };
        let result = match self.agents.get(i) {
            Some(Some(agent)) => jwt::fetch_keys(&issuer, agent),
            _ => jwt::agent_for(&issuer).and_then(|a| {
                let r = jwt::fetch_keys(&issuer, &a);
                if let Some(slot) = self.agents.get_mut(i) {
                    *slot = Some(a);
                }
                r
            }),
        };
        let Some(slot) = self.issuers.get_mut(i) else {
            return;
        };
        slot.attempts += 1;
        slot.last_attempt = Some(Instant::now());
        match result {
            Ok(keys) => {
                let mut kids: Vec<String> = keys
                    .keys
                    .iter()
                    .map(|k| format!("{}:{:?}", k.kid.as_deref().unwrap_or("-"), k.kind))
                    .collect();
                kids.sort();
                let print = kids.join(",");
                if self.prints.get(i) != Some(&print) {
                    self.key_generation += 1;
                    self.logger.value(serde_json::json!({
                        "ts": crate::obs::accesslog::now_rfc3339(),
                        "event": "keys_loaded",
                        "issuer": &*issuer.name,
                        "keys": keys.keys.iter().map(|k| k.kid.clone()).collect::<Vec<_>>(),
                    }));
                    if let Some(p) = self.prints.get_mut(i) {
                        *p = print;
                    }
                }
                slot.keys = Some(Arc::new(keys));
            }
            Err(e) => {
                self.logger.value(serde_json::json!({
                    "ts": crate::obs::accesslog::now_rfc3339(),
                    "event": "keys_failed",
                    "issuer": &*issuer.name,
                    "error": e.to_string(),
                    "keeping_previous": slot.keys.is_some(),
                }));
            }
        }
    }

    /// Switches to a reload's settings; returns the indexes of the issuers whose keys must be fetched.
    fn apply(&mut self, auth: AuthConfig, policies: Arc<PolicySet>) -> Vec<usize> {
        let n = auth.issuers.len();
        let mut agents = Vec::with_capacity(n);
        let mut issuers = Vec::with_capacity(n);
        let mut prints = Vec::with_capacity(n);
        let mut fetch = Vec::new();
        for (i, c) in auth.issuers.iter().enumerate() {
            match self.config.issuers.iter().position(|o| o.same_keys(c)) {
                Some(j) => {
                    agents.push(self.agents.get_mut(j).and_then(Option::take));
                    issuers.push(self.issuers.get(j).cloned().unwrap_or_default());
                    prints.push(self.prints.get(j).cloned().unwrap_or_default());
                }
                None => {
                    agents.push(None);
                    issuers.push(IssuerKeys::default());
                    prints.push(String::new());
                    fetch.push(i);
                }
            }
        }
        self.config = Arc::new(auth);
        self.policies = policies;
        self.agents = agents;
        self.issuers = issuers;
        self.prints = prints;
        self.key_generation += 1;
        fetch
    }

    /// When each issuer's keys are next due: a full period after keys, seconds after a failure.
    fn due_times(&self) -> Vec<Instant> {
        self.config
            .issuers
            .iter()
            .zip(&self.issuers)
            .map(|(c, k)| {
                // An issuer whose first fetch failed is retried within seconds, not after a full period.
                Instant::now()
                    + if k.keys.is_some() {
                        c.refresh
                    } else {
                        c.refresh.min(Duration::from_secs(10))
                    }
            })
            .collect()
    }

    /// Reloads the service-token file when it changed (or `force`, when the catalog's tokens did); returns
    /// whether anything was published.
    fn poll_tokens(&mut self, force: bool) -> bool {
        let print = service_tokens::fingerprint(&self.store_dir);
        if print == self.token_print && !force {
            return false;
        }
        match load_tokens(&self.store_dir, &self.api_tokens) {
            Ok(set) => {
                self.token_print = print;
                self.logger.value(serde_json::json!({
                    "ts": crate::obs::accesslog::now_rfc3339(),
                    "event": "service_tokens_loaded",
                    "tokens": set.len(),
                }));
                self.tokens = Arc::new(set);
                true
            }
            Err(e) => {
                // Retry on the next poll only when the file changes again.
                self.token_print = print;
                self.logger.value(serde_json::json!({
                    "ts": crate::obs::accesslog::now_rfc3339(),
                    "event": "service_tokens_failed",
                    "error": e,
                    "keeping_previous": true,
                }));
                false
            }
        }
    }
}

fn load_tokens(dir: &Path, api: &[ServiceToken]) -> Result<ServiceTokenSet, String> {
    // Read-only: the gateway never takes the writers' lock, it reads whole files (writers rename).
    let file = service_tokens::load(dir).map_err(|e| e.to_string())?;
    ServiceTokenSet::from_file(file)
        .and_then(|s| s.with(api))
        .map_err(|e| e.to_string())
}

/// Creates the quickstart's demo token when asked and the store holds none; says where it is.
fn demo_token(config: &Config, logger: &Logger) -> Result<(), IdentityError> {
    let dir = &config.store.dir;
    let err = |reason: String| IdentityError::Store {
        dir: dir.display().to_string(),
        reason,
    };
    let store = TokenStore::open(dir).map_err(|e| err(e.to_string()))?;
    let path = dir.join("demo-token");
    let existing = store.list().map_err(|e| err(e.to_string()))?;
    if existing.is_empty() {
        let (token, secret) = store
            .create("demo", "demo", None)
            .map_err(|e| err(e.to_string()))?;
        write_private(&path, format!("{}\n", secret.expose()).as_bytes())
            .map_err(|e| err(format!("{}: {e}", path.display())))?;
        // Shown once, on the operator's terminal (stderr), never in the JSON log.
        eprintln!(
            "tollgate: created the demo service token {} (team demo); it is saved in {}:\n\n    {}\n",
            token.id,
            path.display(),
            secret.expose()
        );
        logger.value(serde_json::json!({
            "ts": crate::obs::accesslog::now_rfc3339(),
            "event": "demo_token_created",
            "token_id": token.id,
            "saved_to": path.display().to_string(),
        }));
    } else if path.exists() {
        eprintln!(
            "tollgate: the demo service token is in {} (revoke it with `tollgate service-token revoke demo`)",
            path.display()
        );
    }
    Ok(())
}

/// Writes `bytes` to `path`, readable by its owner only (mode 0600): where a secret is saved for its owner.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// Loads keys and tokens once (so the gateway starts ready), publishes them, and starts the thread.
pub fn start(
    config: &Config,
    logger: &Logger,
    shutdown: Arc<AtomicBool>,
) -> Result<(AuthHandle, IdentityControl, std::thread::JoinHandle<()>), IdentityError> {
    if config.auth.demo_token {
        demo_token(config, logger)?;
    }
    let auth = Arc::new(config.auth.clone());
    let n = auth.issuers.len();
    let tokens = load_tokens(&config.store.dir, &config.service_tokens).map_err(|reason| {
        IdentityError::Store {
            dir: config.store.dir.display().to_string(),
            reason,
        }
    })?;
    let published: AuthPublished = Arc::new(ArcSwap::from_pointee(AuthState {
        config: Arc::clone(&auth),
        policies: Arc::clone(&config.policies),
        issuers: vec![IssuerKeys::default(); n],
        tokens: Arc::new(ServiceTokenSet::default()),
        key_generation: 0,
    }));
    let mut sync = Sync {
        config: auth,
        policies: Arc::clone(&config.policies),
        agents: (0..n).map(|_| None).collect(),
        issuers: vec![IssuerKeys::default(); n],
        prints: vec![String::new(); n],
        token_print: service_tokens::fingerprint(&config.store.dir),
        tokens: Arc::new(tokens),
        api_tokens: Arc::clone(&config.service_tokens),
        store_dir: config.store.dir.clone(),
        key_generation: 0,
        published: Arc::clone(&published),
        logger: logger.clone(),
    };
    for i in 0..n {
        sync.fetch(i);
    }
    sync.publish();
    let (tx, rx) = crossbeam_channel::bounded::<usize>(64);
    let (ctl_tx, ctl_rx) = crossbeam_channel::bounded::<Reload>(4);
    let handle = std::thread::Builder::new()
        .name("tollgate-identity".into())
        .spawn(move || run(sync, rx, ctl_rx, shutdown))?;
    Ok((
        AuthHandle {
            state: published,
            refresh: tx,
        },
        IdentityControl { reload: ctl_tx },
        handle,
    ))
}

fn run(mut sync: Sync, rx: Receiver<usize>, ctl: Receiver<Reload>, shutdown: Arc<AtomicBool>) {
    let mut next_refresh = sync.due_times();
    // Once the control side has gone, stop listening to it (a closed channel is always ready).
    let mut ctl = ctl;
    while !shutdown.load(Ordering::Relaxed) {
        let mut changed = false;
        let mut asked: Vec<usize> = Vec::new();
        let mut reloads: Vec<Reload> = Vec::new();
        let mut ctl_closed = false;
        crossbeam_channel::select! {
            recv(rx) -> m => match m {
                Ok(i) => asked.push(i),
                Err(_) => break,
            },
            recv(ctl) -> m => match m {
                Ok(r) => reloads.push(r),
                Err(_) => ctl_closed = true,
            },
            default(TOKEN_POLL) => {}
        }
        if ctl_closed {
            ctl = crossbeam_channel::never();
        }
        while let Ok(j) = rx.try_recv() {
            asked.push(j);
        }
        while let Ok(r) = ctl.try_recv() {
            reloads.push(r);
        }
        // A reload: publish the new policies and issuers at once (keys kept where the issuer is unchanged),
        // acknowledge, then fetch keys for the new issuers. Refresh asks from before it may name issuers
        // by their old positions: they are dropped.
        if !reloads.is_empty() {
            asked.clear();
        }
        for r in reloads {
            let fetch = sync.apply(r.auth, r.policies);
            if sync.api_tokens != r.tokens {
                sync.api_tokens = r.tokens;
                sync.poll_tokens(true);
            }
            sync.publish();
            let _ = r.done.send(());
            for i in fetch {
                sync.fetch(i);
                changed = true;
            }
            next_refresh = sync.due_times();
        }
        asked.sort_unstable();
        asked.dedup();
        for i in asked {
            let min = sync
                .config
                .issuers
                .get(i)
                .map(|c| c.min_refresh)
                .unwrap_or(Duration::MAX);
            let recent = sync
                .issuers
                .get(i)
                .and_then(|k| k.last_triggered)
                .is_some_and(|t| t.elapsed() < min);
            if !recent {
                sync.fetch(i);
                if let Some(k) = sync.issuers.get_mut(i) {
                    k.last_triggered = k.last_attempt;
                }
                changed = true;
            }
        }
        let now = Instant::now();
        for (i, due) in next_refresh.iter_mut().enumerate() {
            if now >= *due {
                sync.fetch(i);
                changed = true;
                // After a failure retry sooner than the full period.
                let ok = sync.issuers.get(i).is_some_and(|k| k.keys.is_some());
                let period = sync
                    .config
                    .issuers
                    .get(i)
                    .map(|c| c.refresh)
                    .unwrap_or(Duration::from_secs(3600));
                *due = now
                    + if ok {
                        period
                    } else {
                        period.min(Duration::from_secs(10))
                    };
            }
        }
        changed |= sync.poll_tokens(false);
        if changed {
            sync.publish();
        }
    }
}

/// Verified JWTs on one core.
#[derive(Debug, Default)]
pub struct JwtCache {
    entries: HashMap<Box<str>, (Identity, i64)>,
    generation: u64,
}

impl JwtCache {
    pub fn get(&mut self, token: &str, generation: u64, now: i64) -> Option<Identity> {
        if generation != self.generation {
            self.entries.clear();
            self.generation = generation;
            return None;
        }
        match self.entries.get(token) {
            Some((id, exp)) if *exp > now => Some(id.clone()),
            Some(_) => {
                self.entries.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn put(&mut self, token: &str, id: Identity, exp: i64, cap: usize, now: i64) {
        if cap == 0 {
            return;
        }
        if self.entries.len() >= cap {
            // Drop what has expired; if the cache is still full, start over (bounded memory beats LRU
            // bookkeeping on the hot path; a full cache means a flood of distinct tokens anyway).
            self.entries.retain(|_, (_, exp)| *exp > now);
            if self.entries.len() >= cap {
                self.entries.clear();
            }
        }
        self.entries.insert(Box::from(token), (id, exp));
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A core's verification cache, borrowed by the identify phase.
pub type CoreJwtCache = std::cell::RefCell<JwtCache>;
