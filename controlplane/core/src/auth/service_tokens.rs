//! Service tokens: the long-lived bearer tokens CI/CD agents present instead of a user login.
//!
//! Owns: the token format (`tg_` + base64url of 32 random bytes), the on-disk store
//! (`<dir>/service-tokens.json`, versioned JSON, written only by `tollgate service-token ...`), and
//! [`ServiceTokenSet`], the lookup the gateway's cores use per request. A token is stored only as the hex
//! SHA-256 of the whole token string; the secret exists once, in the [`Secret`] that [`TokenStore::create`]
//! returns, and `Secret`'s `Debug` redacts it.
//!
//! Fails: with [`TokenStoreError`], naming the file, token name or id involved and never the secret. A corrupt
//! or unsupported file is an error, never read as "no tokens". Request-time verdicts are [`TokenRejection`]s,
//! whose messages are fit for a 401 body.
//!
//! Concurrency: writers take an exclusive lock on `<dir>/service-tokens.lock`, then replace the file
//! atomically (write a 0600 temporary file, fsync, rename, fsync the directory), so a reader (the running
//! gateway) sees either the old file or the new one, never a half-written one. Readers take no lock.
//!
//! Cost: writes are rare CLI operations (a read, a rewrite, two fsyncs). [`ServiceTokenSet::check`] is one
//! SHA-256 of a 46-byte string and one hash-map lookup; strings that do not look like a token are rejected
//! before hashing. The lookup key is the digest of the presented token, so comparing keys reveals nothing
//! useful about any stored token to a timing attacker.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine;
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::auth::identity::{Identity, IdentityKind};

/// Every service token starts with this, so scanners and the gateway can tell it from a provider key.
pub const TOKEN_PREFIX: &str = "tg_";
/// Length of a token: the prefix plus 43 base64url characters (32 bytes, no padding).
pub const TOKEN_LEN: usize = 46;
/// The store file inside the store directory.
pub const FILE_NAME: &str = "service-tokens.json";
/// The lock file writers hold while they read, change and replace the store file.
pub const LOCK_NAME: &str = "service-tokens.lock";
/// The file format version this build reads and writes.
pub const FILE_VERSION: u32 = 1;
/// Longest token name or team name.
pub const MAX_NAME_LEN: usize = 64;

const TMP_NAME: &str = "service-tokens.json.tmp";
const RANDOM_BYTES: usize = 32;

/// Everything that can go wrong reading or changing the token store. Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum TokenStoreError {
    // The cause is in the message (one line for the CLI), so it is deliberately not a `#[source]` too.
    #[error("{op} {}: {cause}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        cause: io::Error,
    },
    #[error("{} is not a valid service token file: {cause}", path.display())]
    Corrupt {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{} has format version {found}; this build reads version {FILE_VERSION}", path.display())]
    UnsupportedVersion { path: PathBuf, found: u32 },
    #[error("{}: token {id}: {reason}", path.display())]
    InvalidRecord {
        path: PathBuf,
        id: String,
        reason: String,
    },
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidName {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error(
        "an active service token named '{0}' already exists; revoke it first or pick another name"
    )]
    DuplicateName(String),
    #[error("no service token with name or id '{0}'")]
    NotFound(String),
    // Someone pasted the secret where a name belongs: say so without echoing it.
    #[error(
        "no service token matches the given token string (not echoed: it looks like a secret)"
    )]
    NotFoundSecret,
    #[error("service token '{name}' ({id}) is already revoked")]
    AlreadyRevoked { name: String, id: String },
    #[error("expiry {0} is not in the future")]
    ExpiryInPast(Timestamp),
    #[error("invalid attribute {key:?}: {reason}")]
    InvalidAttribute { key: String, reason: String },
    #[error("invalid lifetime {spec:?}: {reason}")]
    InvalidLifetime { spec: String, reason: &'static str },
    #[error("the operating system's random number generator failed: {0}")]
    Random(getrandom::Error),
}

type Result<T, E = TokenStoreError> = std::result::Result<T, E>;

/// One service token as stored. Holds no secret: `hash` is the hex SHA-256 of the token string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceToken {
    /// Public, non-secret handle (`st_` + 8 hex characters), safe to log and to show in listings.
    pub id: String,
    /// Unique among non-revoked tokens; what operators type to revoke it.
    pub name: String,
    /// The team the token's spend is attributed to.
    pub team: String,
    /// Lowercase hex SHA-256 of the whole token string.
    pub hash: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    /// Request attributes the token carries (`[attributes]` entries with `from = "token:NAME"` take their
    /// value from here, and the caller cannot override it). Keys 1 to 64 of `[a-z0-9_]`, values 1 to 256
    /// bytes without control characters. Absent from the file when empty, so files without attributes
    /// stay readable by older builds.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// Where a token stands at a given moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenStatus {
    Active,
    Revoked,
    Expired,
}

impl TokenStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Active => "active",
            TokenStatus::Revoked => "revoked",
            TokenStatus::Expired => "expired",
        }
    }
}

impl fmt::Display for TokenStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl ServiceToken {
    /// Revocation wins over expiry: an operator who revoked a token wants to see that, not "expired".
    pub fn status(&self, now: Timestamp) -> TokenStatus {
        if self.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if self.expires_at.is_some_and(|e| e <= now) {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }
}

/// The whole store file: `{"version":1,"tokens":[...]}`. Versioned so later fields (budgets) can be added
/// without silently accepting unknown ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub version: u32,
    pub tokens: Vec<ServiceToken>,
}

impl Default for TokenFile {
    fn default() -> Self {
        TokenFile {
            version: FILE_VERSION,
            tokens: Vec::new(),
        }
    }
}

/// A freshly minted token string. `Debug` redacts it; [`Secret::expose`] is the one explicit way out, so
/// printing it is always a visible decision at the call site.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// True when `s` has the shape of a service token (prefix, length, base64url alphabet). Does not hash, so
/// the gateway can route `Authorization` values cheaply and reject junk before any work.
pub fn looks_like_service_token(s: &str) -> bool {
    s.len() == TOKEN_LEN
        && s.starts_with(TOKEN_PREFIX)
        && s.as_bytes()[TOKEN_PREFIX.len()..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses a lifetime such as `30d`, `12h`, `90m` or `45s` (a positive whole number and one unit).
pub fn parse_lifetime(spec: &str) -> Result<SignedDuration> {
    let bad = |reason| TokenStoreError::InvalidLifetime {
        spec: spec.to_owned(),
        reason,
    };
    let split = spec
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| bad("missing unit: use s, m, h or d, e.g. 30d"))?;
    let (digits, unit) = spec.split_at(split);
    let n: i64 = digits
        .parse()
        .map_err(|_| bad("expected a whole number followed by s, m, h or d, e.g. 30d"))?;
    if n == 0 {
        return Err(bad("must be positive"));
    }
    let per_unit: i64 = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad("unit must be one of s, m, h, d")),
    };
    // Ten years is far past any sane token lifetime and far inside jiff's range.
    let secs = n
        .checked_mul(per_unit)
        .filter(|s| *s <= 10 * 366 * 86_400)
        .ok_or_else(|| bad("longer than ten years"))?;
    Ok(SignedDuration::from_secs(secs))
}

/// A fresh token string and the lowercase hex SHA-256 the stores keep of it.
pub fn mint_secret() -> Result<(Secret, String)> {
    let mut raw = [0u8; RANDOM_BYTES];
    getrandom::getrandom(&mut raw).map_err(TokenStoreError::Random)?;
    let secret = Secret(format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
    ));
    let hash = to_hex(&Sha256::digest(secret.expose().as_bytes()));
    Ok((secret, hash))
}

/// A fresh public token id, `st_` and 8 hex characters.
pub fn new_id() -> Result<String> {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).map_err(TokenStoreError::Random)?;
    Ok(format!("st_{}", to_hex(&b)))
}

/// The hex SHA-256 of a presented token string, as stored.
pub fn hash_of(presented: &str) -> String {
    to_hex(&Sha256::digest(presented.as_bytes()))
}

/// The checks every token's name, team and attributes pass, wherever it is made (CLI file or API).
pub fn check_fields(name: &str, team: &str, attributes: &BTreeMap<String, String>) -> Result<()> {
    check_name("name", name)?;
    check_name("team", team)?;
    check_attributes(attributes)
}

/// The store file's path inside `dir`.
pub fn file_path(dir: &Path) -> PathBuf {
    dir.join(FILE_NAME)
}

/// Reads the store in `dir` for a reader such as the gateway. A missing file means no tokens yet; a file
/// that exists but does not parse, has another version or holds a malformed record is an error.
pub fn load(dir: &Path) -> Result<TokenFile> {
    let path = file_path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TokenFile::default()),
        Err(cause) => {
            return Err(TokenStoreError::Io {
                op: "reading",
                path,
                cause,
            })
        }
    };
    // Check the version first so a future file fails as "unsupported version", not "unknown field".
    #[derive(Deserialize)]
    struct Version {
        version: u32,
    }
    let version: Version =
        serde_json::from_slice(&bytes).map_err(|cause| TokenStoreError::Corrupt {
            path: path.clone(),
            cause,
        })?;
    if version.version != FILE_VERSION {
        return Err(TokenStoreError::UnsupportedVersion {
            path,
            found: version.version,
        });
    }
    let file: TokenFile =
        serde_json::from_slice(&bytes).map_err(|cause| TokenStoreError::Corrupt {
            path: path.clone(),
            cause,
        })?;
    for t in &file.tokens {
        let reason = if decode_hash(&t.hash).is_none() {
            Some("hash is not 64 lowercase hex characters".to_owned())
        } else {
            check_name("name", &t.name)
                .and_then(|()| check_name("team", &t.team))
                .and_then(|()| check_attributes(&t.attributes))
                .err()
                .map(|e| e.to_string())
        };
        if let Some(reason) = reason {
            return Err(TokenStoreError::InvalidRecord {
                path,
                id: t.id.clone(),
                reason,
            });
        }
    }
    Ok(file)
}

/// A cheap change detector for a watcher: `(length, mtime, inode)` of the store file, or `None` when it is
/// absent or unreadable. Every write renames a new file into place, so the inode changes even when length
/// and mtime (coarse on some filesystems) do not.
pub fn fingerprint(dir: &Path) -> Option<(u64, SystemTime, u64)> {
    let meta = std::fs::metadata(file_path(dir)).ok()?;
    Some((meta.len(), meta.modified().ok()?, meta.ino()))
}

/// The writer's handle on a store directory. Holds no open files: each operation locks, reads, writes and
/// unlocks, so several processes (or threads) can use the same directory safely.
#[derive(Debug, Clone)]
pub struct TokenStore {
    dir: PathBuf,
}

impl TokenStore {
    /// Opens the store in `dir`, creating the directory (mode 0700) if it is missing. Does not read the file.
    pub fn open(dir: &Path) -> Result<TokenStore> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|cause| TokenStoreError::Io {
                op: "creating directory",
                path: dir.to_owned(),
                cause,
            })?;
        Ok(TokenStore {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Mints a token for `name` in `team`. The returned [`Secret`] is the only copy of the token string.
    pub fn create(
        &self,
        name: &str,
        team: &str,
        expires_at: Option<Timestamp>,
    ) -> Result<(ServiceToken, Secret)> {
        self.create_with(name, team, expires_at, BTreeMap::new())
    }

    /// [`TokenStore::create`] with request attributes the token carries (see [`ServiceToken::attributes`]).
    pub fn create_with(
        &self,
        name: &str,
        team: &str,
        expires_at: Option<Timestamp>,
        attributes: BTreeMap<String, String>,
    ) -> Result<(ServiceToken, Secret)> {
        check_fields(name, team, &attributes)?;
        let now = Timestamp::now();
        if let Some(e) = expires_at {
            if e <= now {
                return Err(TokenStoreError::ExpiryInPast(e));
            }
        }
        let (secret, hash) = mint_secret()?;

        let _lock = self.lock()?;
        let mut file = load(&self.dir)?;
        if file
            .tokens
            .iter()
            .any(|t| t.revoked_at.is_none() && t.name == name)
        {
            return Err(TokenStoreError::DuplicateName(name.to_owned()));
        }
        let id = loop {
            let id = new_id()?;
            if !file.tokens.iter().any(|t| t.id == id) {
                break id;
            }
        };
        let token = ServiceToken {
            id,
            name: name.to_owned(),
            team: team.to_owned(),
            hash,
            created_at: now,
            expires_at,
            revoked_at: None,
            attributes,
        };
        file.tokens.push(token.clone());
        self.write(&file)?;
        Ok((token, secret))
    }

    /// Revokes the active token with this name, or the token with this id (or, if the operator pasted the
    /// token itself, that token). The record stays, so the gateway can answer "revoked" rather than "unknown".
    pub fn revoke(&self, name_or_id: &str) -> Result<ServiceToken> {
        let _lock = self.lock()?;
        let mut file = load(&self.dir)?;
        let is_secret = looks_like_service_token(name_or_id);
        let hash = is_secret.then(|| to_hex(&Sha256::digest(name_or_id.as_bytes())));
        let matches = |t: &ServiceToken| match &hash {
            Some(h) => &t.hash == h,
            None => t.id == name_or_id || t.name == name_or_id,
        };
        // Prefer an active match; otherwise report the revoked one so the error says "already revoked".
        let idx = file
            .tokens
            .iter()
            .position(|t| matches(t) && t.revoked_at.is_none())
            .or_else(|| file.tokens.iter().position(matches));
        let Some(idx) = idx else {
            return Err(if is_secret {
                TokenStoreError::NotFoundSecret
            } else {
                TokenStoreError::NotFound(name_or_id.to_owned())
            });
        };
        let Some(token) = file.tokens.get_mut(idx) else {
            return Err(TokenStoreError::NotFound(name_or_id.to_owned()));
        };
        if token.revoked_at.is_some() {
            return Err(TokenStoreError::AlreadyRevoked {
                name: token.name.clone(),
                id: token.id.clone(),
            });
        }
        token.revoked_at = Some(Timestamp::now());
        let revoked = token.clone();
        self.write(&file)?;
        Ok(revoked)
    }

    /// Every record, revoked and expired included, in creation order.
    pub fn list(&self) -> Result<Vec<ServiceToken>> {
        Ok(load(&self.dir)?.tokens)
    }

    /// The exclusive writer lock; released when the returned file is dropped (closed).
    fn lock(&self) -> Result<File> {
        let path = self.dir.join(LOCK_NAME);
        let io_err = |op, cause| TokenStoreError::Io {
            op,
            path: path.clone(),
            cause,
        };
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io_err("opening lock file", e))?;
        f.lock().map_err(|e| io_err("locking", e))?;
        Ok(f)
    }

    /// Replaces the store file atomically; the caller holds the lock.
    fn write(&self, file: &TokenFile) -> Result<()> {
        let tmp = self.dir.join(TMP_NAME);
        let dest = file_path(&self.dir);
        let io_err = |op, path: &Path, cause| TokenStoreError::Io {
            op,
            path: path.to_owned(),
            cause,
        };
        let mut json =
            serde_json::to_vec_pretty(file).map_err(|cause| TokenStoreError::Corrupt {
                path: dest.clone(),
                cause,
            })?;
        json.push(b'\n');
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io_err("creating", &tmp, e))?;
        // A leftover temporary file keeps its old mode; force 0600 before any secret-adjacent data lands.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| io_err("setting permissions on", &tmp, e))?;
        f.write_all(&json).map_err(|e| io_err("writing", &tmp, e))?;
        f.sync_all().map_err(|e| io_err("syncing", &tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, &dest).map_err(|e| io_err("renaming into", &dest, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("syncing directory", &self.dir, e))
    }
}

/// Why a presented token was refused. Messages are fit for a 401 body and never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("unknown service token")]
    Unknown,
    #[error("service token '{name}' was revoked")]
    Revoked { name: String },
    #[error("service token '{name}' expired")]
    Expired { name: String },
}

/// The gateway's per-request lookup: every record (revoked ones too) keyed by the raw SHA-256 of its token.
/// Built once per store change and shared read-only by the cores.
#[derive(Debug, Clone, Default)]
pub struct ServiceTokenSet {
    by_hash: HashMap<[u8; 32], (Arc<ServiceToken>, Identity)>,
}

/// A service token's identity: its name is the subject, its owning team its one group, its attributes
/// its identity attributes. Built once per store change, so a request clones shared strings only.
fn identity_of(t: &ServiceToken) -> Identity {
    Identity {
        kind: IdentityKind::Service,
        subject: Arc::from(t.name.as_str()),
        email: None,
        groups: Arc::from(vec![Arc::from(t.team.as_str())]),
        source: Arc::from("service-token"),
        token_id: Some(Arc::from(t.id.as_str())),
        attributes: t
            .attributes
            .iter()
            .map(|(k, v)| (Arc::from(k.as_str()), Arc::from(v.as_str())))
            .collect(),
    }
}

impl ServiceTokenSet {
    /// Builds the set from a loaded file; a malformed hash (a hand-edited file) is an error naming the id.
    pub fn from_file(file: TokenFile) -> Result<ServiceTokenSet> {
        let mut by_hash = HashMap::with_capacity(file.tokens.len());
        for t in file.tokens {
            let Some(digest) = decode_hash(&t.hash) else {
                return Err(TokenStoreError::InvalidRecord {
                    path: PathBuf::from(FILE_NAME),
                    id: t.id,
                    reason: "hash is not 64 lowercase hex characters".to_owned(),
                });
            };
            let id = identity_of(&t);
            by_hash.insert(digest, (Arc::new(t), id));
        }
        Ok(ServiceTokenSet { by_hash })
    }

    /// The set with `extra` tokens added (the control plane's, say); a malformed hash is an error naming
    /// the id. A hash already present keeps its first record.
    pub fn with(mut self, extra: &[ServiceToken]) -> Result<ServiceTokenSet> {
        for t in extra {
            let Some(digest) = decode_hash(&t.hash) else {
                return Err(TokenStoreError::InvalidRecord {
                    path: PathBuf::from("the control plane's catalog"),
                    id: t.id.clone(),
                    reason: "hash is not 64 lowercase hex characters".to_owned(),
                });
            };
            let id = identity_of(t);
            self.by_hash
                .entry(digest)
                .or_insert_with(|| (Arc::new(t.clone()), id));
        }
        Ok(self)
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    /// The token `presented` names, if it is known, not revoked and not expired at `now`.
    pub fn check(
        &self,
        presented: &str,
        now: Timestamp,
    ) -> Result<Arc<ServiceToken>, TokenRejection> {
        self.lookup(presented, now).map(|(t, _)| Arc::clone(t))
    }

    /// The identity of the token `presented` names, if it is known, not revoked and not expired at `now`:
    /// [`ServiceTokenSet::check`] without building anything (the identity was built with the set).
    pub fn identify(&self, presented: &str, now: Timestamp) -> Result<Identity, TokenRejection> {
        self.lookup(presented, now).map(|(_, id)| id.clone())
    }

    fn lookup(
        &self,
        presented: &str,
        now: Timestamp,
    ) -> Result<&(Arc<ServiceToken>, Identity), TokenRejection> {
        if !looks_like_service_token(presented) {
            return Err(TokenRejection::Unknown);
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let entry = self.by_hash.get(&digest).ok_or(TokenRejection::Unknown)?;
        let token = &entry.0;
        match token.status(now) {
            TokenStatus::Active => Ok(entry),
            TokenStatus::Revoked => Err(TokenRejection::Revoked {
                name: token.name.clone(),
            }),
            TokenStatus::Expired => Err(TokenRejection::Expired {
                name: token.name.clone(),
            }),
        }
    }
}

/// A token's attributes: keys and values as `[attributes]` accepts them.
fn check_attributes(attributes: &BTreeMap<String, String>) -> Result<()> {
    use crate::budget::attributes::{valid_key, valid_value, MAX_VALUE_LEN};
    for (k, v) in attributes {
        let reason = if !valid_key(k) {
            "keys are 1 to 64 of [a-z0-9_]".to_owned()
        } else if !valid_value(v) {
            format!("values are 1 to {MAX_VALUE_LEN} bytes without control characters")
        } else {
            continue;
        };
        return Err(TokenStoreError::InvalidAttribute {
            key: k.clone(),
            reason,
        });
    }
    Ok(())
}

/// Names and teams end up in listings, logs and 401 bodies: keep them short and shell- and log-safe.
fn check_name(field: &'static str, value: &str) -> Result<()> {
    let bad = |reason| TokenStoreError::InvalidName {
        field,
        value: value.to_owned(),
        reason,
    };
    if value.is_empty() || value.len() > MAX_NAME_LEN {
        return Err(bad("must be 1 to 64 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
    }
    // A name shaped like a token would make `revoke NAME` ambiguous and look like a leaked secret.
    if looks_like_service_token(value) {
        return Err(bad("must not look like a service token"));
    }
    Ok(())
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn decode_hash(hex: &str) -> Option<[u8; 32]> {
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let bytes = hex.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(bytes.chunks_exact(2)) {
        *o = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let p =
                std::env::temp_dir().join(format!("tollgate-st-{tag}-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn set(dir: &Path) -> ServiceTokenSet {
        ServiceTokenSet::from_file(load(dir).unwrap()).unwrap()
    }

    #[test]
    fn token_shape() {
        let d = Dir::new("shape");
        let store = TokenStore::open(&d.0).unwrap();
        let (_, s) = store.create("ci", "platform", None).unwrap();
        assert_eq!(s.expose().len(), TOKEN_LEN);
        assert!(s.expose().starts_with(TOKEN_PREFIX));
        assert!(looks_like_service_token(s.expose()));
        assert!(!looks_like_service_token(&s.expose()[1..]));
        assert!(!looks_like_service_token(&format!(
            "{}=",
            &s.expose()[..45]
        )));
        assert!(!looks_like_service_token(&s.expose().replace("tg_", "sk_")));
        assert!(!looks_like_service_token(""));
    }

    #[test]
    fn create_list_revoke_round_trip() {
        let d = Dir::new("rt");
        let store = TokenStore::open(&d.0).unwrap();
        let mode = std::fs::metadata(&d.0).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(store.list().unwrap().is_empty());

        let (t, secret) = store.create("ci-bot", "platform", None).unwrap();
        assert!(t.id.starts_with("st_") && t.id.len() == 11, "{}", t.id);
        let listed = store.list().unwrap();
        assert_eq!(listed, vec![t.clone()]);
        let now = Timestamp::now();
        assert_eq!(listed[0].status(now), TokenStatus::Active);
        assert_eq!(set(&d.0).check(secret.expose(), now).unwrap().id, t.id);

        let mode = std::fs::metadata(file_path(&d.0))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);

        let r = store.revoke("ci-bot").unwrap();
        assert_eq!(r.id, t.id);
        assert!(r.revoked_at.is_some());
        assert_eq!(store.list().unwrap()[0].status(now), TokenStatus::Revoked);

        // Revoking again, by name or id, names the token; unknown names are named too.
        let e = store.revoke("ci-bot").unwrap_err().to_string();
        assert!(e.contains("ci-bot") && e.contains("already revoked"), "{e}");
        let e = store.revoke(&t.id).unwrap_err().to_string();
        assert!(e.contains("already revoked"), "{e}");
        let e = store.revoke("nobody").unwrap_err().to_string();
        assert!(e.contains("'nobody'"), "{e}");

        // The name is free again once revoked, and both records stay.
        let (t2, _) = store.create("ci-bot", "platform", None).unwrap();
        assert_ne!(t2.id, t.id);
        assert_eq!(store.list().unwrap().len(), 2);
        // Revoking by id works and picks exactly that record.
        assert_eq!(store.revoke(&t2.id).unwrap().id, t2.id);
    }

    #[test]
    fn revoke_by_pasted_secret_never_echoes_it() {
        let d = Dir::new("paste");
        let store = TokenStore::open(&d.0).unwrap();
        let (t, secret) = store.create("deploy", "ops", None).unwrap();
        assert_eq!(store.revoke(secret.expose()).unwrap().id, t.id);
        let e = store.revoke(secret.expose()).unwrap_err().to_string();
        assert!(!e.contains(secret.expose()), "{e}");
        let other = format!("tg_{}", "A".repeat(43));
        let e = store.revoke(&other).unwrap_err().to_string();
        assert!(!e.contains(&other), "{e}");
    }

    #[test]
    fn secret_is_not_in_the_file_nor_in_debug_output() {
        let d = Dir::new("secret");
        let store = TokenStore::open(&d.0).unwrap();
        let (t, secret) = store.create("ci", "platform", None).unwrap();
        let on_disk = std::fs::read_to_string(file_path(&d.0)).unwrap();
        assert!(!on_disk.contains(secret.expose()));
        assert!(!on_disk.contains(&secret.expose()[TOKEN_PREFIX.len()..]));
        assert!(on_disk.contains(&t.hash));
        for dbg in [
            format!("{secret:?}"),
            format!("{t:?}"),
            format!("{:?}", (t.clone(), secret.clone())),
            format!("{:?}", set(&d.0)),
        ] {
            assert!(
                !dbg.contains(&secret.expose()[TOKEN_PREFIX.len()..]),
                "{dbg}"
            );
        }
        let file: serde_json::Value = serde_json::from_str(&on_disk).unwrap();
        assert_eq!(file["version"], 1);
        assert_eq!(file["tokens"][0]["hash"].as_str().unwrap().len(), 64);
    }

    #[test]
    fn names_are_unique_among_active_tokens_and_validated() {
        let d = Dir::new("names");
        let store = TokenStore::open(&d.0).unwrap();
        store.create("ci", "a", None).unwrap();
        let e = store.create("ci", "b", None).unwrap_err();
        assert!(
            matches!(e, TokenStoreError::DuplicateName(ref n) if n == "ci"),
            "{e}"
        );
        store.create("ci.2_x-Y", "a", None).unwrap();
        for bad in ["", "has space", "slash/", &"x".repeat(65), "naïve"] {
            assert!(
                matches!(
                    store.create(bad, "a", None),
                    Err(TokenStoreError::InvalidName { field: "name", .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            store.create("ok", "bad team", None),
            Err(TokenStoreError::InvalidName { field: "team", .. })
        ));
        store.create(&"x".repeat(64), "a", None).unwrap();
        assert_eq!(store.list().unwrap().len(), 3);
    }

    #[test]
    fn attributes_are_stored_validated_and_carried_by_the_identity() {
        let dir = Dir::new("attrs");
        let store = TokenStore::open(&dir.0).unwrap();
        let attrs: BTreeMap<String, String> =
            [("cost_center".to_owned(), "cc-7".to_owned())].into();
        let (t, secret) = store
            .create_with("ci", "platform", None, attrs.clone())
            .unwrap();
        assert_eq!(t.attributes, attrs);
        let file = load(&dir.0).unwrap();
        assert_eq!(file.tokens[0].attributes, attrs);
        let id = set(&dir.0)
            .identify(secret.expose(), Timestamp::now())
            .unwrap();
        assert_eq!(id.attribute("cost_center"), Some("cc-7"));
        assert_eq!(&*id.subject, "ci");
        // A token without attributes is written exactly as before (no `attributes` member).
        store.create("plain", "platform", None).unwrap();
        let text = std::fs::read_to_string(file_path(&dir.0)).unwrap();
        assert_eq!(text.matches("attributes").count(), 1, "{text}");
        for bad in [("Bad-Key", "v"), ("k", ""), ("k", "a\nb")] {
            let attrs: BTreeMap<String, String> = [(bad.0.to_owned(), bad.1.to_owned())].into();
            assert!(matches!(
                store.create_with("x", "t", None, attrs),
                Err(TokenStoreError::InvalidAttribute { .. })
            ));
        }
    }

    #[test]
    fn rejections_say_unknown_revoked_or_expired() {
        let d = Dir::new("reject");
        let store = TokenStore::open(&d.0).unwrap();
        let now = Timestamp::now();
        let soon = now + SignedDuration::from_secs(3600);
        let (_, a) = store.create("ci-bot", "platform", Some(soon)).unwrap();
        let (_, b) = store.create("old", "platform", None).unwrap();
        store.revoke("old").unwrap();
        let s = set(&d.0);
        assert_eq!(s.len(), 2);

        assert!(s.check(a.expose(), now).is_ok());
        let later = soon + SignedDuration::from_secs(1);
        let e = s.check(a.expose(), later).unwrap_err();
        assert_eq!(
            e,
            TokenRejection::Expired {
                name: "ci-bot".into()
            }
        );
        assert_eq!(e.to_string(), "service token 'ci-bot' expired");
        // Expiry is inclusive: at the instant itself the token is no longer valid.
        assert!(s.check(a.expose(), soon).is_err());

        let e = s.check(b.expose(), now).unwrap_err();
        assert_eq!(e.to_string(), "service token 'old' was revoked");

        let unknown = format!("tg_{}", "A".repeat(43));
        let e = s.check(&unknown, now).unwrap_err();
        assert_eq!(e, TokenRejection::Unknown);
        assert_eq!(e.to_string(), "unknown service token");
        assert_eq!(s.check("Bearer junk", now), Err(TokenRejection::Unknown));
        assert_eq!(
            ServiceTokenSet::default().check(a.expose(), now),
            Err(TokenRejection::Unknown)
        );
    }

    #[test]
    fn past_expiry_is_refused_at_create() {
        let d = Dir::new("past");
        let store = TokenStore::open(&d.0).unwrap();
        let past = Timestamp::now() - SignedDuration::from_secs(60);
        let e = store.create("ci", "a", Some(past)).unwrap_err();
        assert!(e.to_string().contains("not in the future"), "{e}");
        assert!(store.list().unwrap().is_empty());
    }

    #[test]
    fn corrupt_or_foreign_files_are_errors_naming_the_file() {
        let d = Dir::new("corrupt");
        let store = TokenStore::open(&d.0).unwrap();
        let path = file_path(&d.0);
        std::fs::write(&path, "{\"version\":1,\"tokens\":[").unwrap();
        let e = store.list().unwrap_err();
        assert!(matches!(e, TokenStoreError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        assert!(e.to_string().contains("EOF"), "{e}");
        // Writers refuse too, rather than overwrite what they cannot read.
        assert!(store.create("ci", "a", None).is_err());

        std::fs::write(&path, r#"{"version":1,"tokens":[],"extra":true}"#).unwrap();
        let e = store.list().unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");

        std::fs::write(&path, r#"{"version":2,"tokens":[]}"#).unwrap();
        let e = store.list().unwrap_err();
        assert!(
            matches!(e, TokenStoreError::UnsupportedVersion { found: 2, .. }),
            "{e}"
        );

        let rec = r#"{"version":1,"tokens":[{"id":"st_1","name":"n","team":"t","hash":"zz",
            "created_at":"2025-01-01T00:00:00Z","expires_at":null,"revoked_at":null}]}"#;
        std::fs::write(&path, rec).unwrap();
        let e = store.list().unwrap_err().to_string();
        assert!(e.contains("st_1") && e.contains("hash"), "{e}");
    }

    #[test]
    fn concurrent_writers_lose_no_token() {
        let d = Dir::new("concurrent");
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let dir = d.0.clone();
                std::thread::spawn(move || {
                    let store = TokenStore::open(&dir).unwrap();
                    for j in 0..5 {
                        store.create(&format!("t{i}-{j}"), "team", None).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all = TokenStore::open(&d.0).unwrap().list().unwrap();
        assert_eq!(all.len(), 40);
        let mut ids: Vec<_> = all.iter().map(|t| t.id.clone()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 40);
    }

    #[test]
    fn fingerprint_changes_on_every_write() {
        let d = Dir::new("fp");
        let store = TokenStore::open(&d.0).unwrap();
        assert_eq!(fingerprint(&d.0), None);
        store.create("a", "t", None).unwrap();
        let one = fingerprint(&d.0).unwrap();
        store.create("b", "t", None).unwrap();
        let two = fingerprint(&d.0).unwrap();
        assert_ne!(one, two);
    }

    #[test]
    fn lifetimes_parse() {
        assert_eq!(
            parse_lifetime("30d").unwrap(),
            SignedDuration::from_hours(720)
        );
        assert_eq!(
            parse_lifetime("12h").unwrap(),
            SignedDuration::from_hours(12)
        );
        assert_eq!(
            parse_lifetime("90m").unwrap(),
            SignedDuration::from_mins(90)
        );
        assert_eq!(parse_lifetime("1s").unwrap(), SignedDuration::from_secs(1));
        for bad in ["", "d", "0d", "10", "5w", "-1d", "1.5h", "99999999999d"] {
            assert!(parse_lifetime(bad).is_err(), "{bad:?}");
        }
    }
}
