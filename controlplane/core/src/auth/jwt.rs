//! Credentials: the `[auth]` configuration, OIDC JWT verification against an issuer's published keys, and
//! fetching those keys (discovery document, `jwks_uri`, or a local JWKS file for air-gapped sites).
//!
//! Owns: [`AuthConfig`] / [`IssuerConfig`] (validated from [`RawAuth`]), [`KeySet`] (an issuer's public keys
//! by `kid`, never HMAC secrets), [`peek`] (the unverified header and `iss`, to pick the issuer and key) and
//! [`verify`] (signature, `iss`, `aud`, `exp`, `nbf` with leeway, then claim mapping into an [`Identity`]).
//!
//! Security choices: `alg: none` and every HMAC algorithm are refused before any key is looked at (an HMAC
//! "signature" keyed with a public key is the classic algorithm-confusion forgery); the token's `alg` must
//! be in the issuer's allowed list and match the key's type; `exp` is required; tokens over
//! `auth.max_token_bytes` are refused unparsed. Rejections name the reason (expired, wrong audience, unknown
//! issuer, bad signature...) and never echo the token.
//!
//! Fails: [`Rejection`] per token; [`FetchError`] per key fetch (the caller keeps the previous keys).
//! Cost: a cold RS256 verification is tens of microseconds (bench `token_verify`); the data plane caches
//! results per core until the token expires. Fetches run on the gateway's identity thread, never on a core.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::auth::identity::{Identity, IdentityKind};

/// `[auth]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// Serve requests that carry no credential, attributed to `anonymous`. Off by default: a gateway that
    /// spends money needs to know on whose behalf.
    pub allow_anonymous: Option<bool>,
    /// At first start, when the service-token store holds no token, create one named `demo`, print it
    /// and save it to `<store.dir>/demo-token` (mode 0600). For the quickstart; off by default.
    pub demo_token: Option<bool>,
    /// Tokens longer than this are refused unparsed (default 8192 bytes).
    pub max_token_bytes: Option<usize>,
    /// Verified JWTs cached per core (default 4096); an entry lives until the token's `exp`.
    pub cache_entries: Option<usize>,
    /// How long a request with an unknown `kid` may wait for the issuer's keys to refresh (default 2000).
    pub key_wait_ms: Option<u64>,
    #[serde(default)]
    pub issuers: Vec<RawIssuer>,
}

/// `[[auth.issuers]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIssuer {
    /// A short name for logs and errors, e.g. `okta`.
    pub name: String,
    /// The `iss` claim, exactly as the IdP writes it.
    pub issuer: String,
    /// Accepted `aud` values; at least one.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// The JWKS URL; default: `jwks_uri` from `<issuer>/.well-known/openid-configuration`.
    pub jwks_uri: Option<String>,
    /// A local JWKS file instead of fetching (air-gapped sites); re-read on every refresh.
    pub jwks_file: Option<PathBuf>,
    /// Accepted algorithms (default all of RS256, PS256, ES256, EdDSA). HMAC and `none` are never accepted.
    pub algorithms: Option<Vec<String>>,
    /// Clock skew allowed on `exp` and `nbf`, seconds (default 60).
    pub leeway_s: Option<u64>,
    /// The claim that names the user (default `sub`; `email`, `oid`, `preferred_username` are common).
    pub user_claim: Option<String>,
    /// The claim holding groups or roles, dotted for nested claims (`realm_access.roles`); default `groups`.
    pub groups_claim: Option<String>,
    /// Group ids to names (Entra ID sends object ids); unmapped groups keep their id.
    pub group_map: Option<BTreeMap<String, String>>,
    /// Prepended to every group name (after mapping), to keep several issuers' groups apart.
    pub group_prefix: Option<String>,
    /// How often keys are refreshed, seconds (default 3600).
    pub refresh_s: Option<u64>,
    /// The least time between two refreshes triggered by unknown `kid`s, seconds (default 10).
    pub min_refresh_s: Option<u64>,
    /// Extra CA certificate (PEM) trusted for the discovery and JWKS fetches.
    pub ca_file: Option<PathBuf>,
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    /// `<issuer>/.well-known/openid-configuration`, then its `jwks_uri`.
    Discovery(String),
    Uri(String),
    File(PathBuf),
}

/// One trusted issuer, validated. Equality tells a reload which issuers' keys it may keep.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuerConfig {
    pub name: Arc<str>,
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub user_claim: String,
    pub groups_claim: Vec<String>,
    pub group_map: BTreeMap<String, String>,
    pub group_prefix: String,
    pub refresh: Duration,
    pub min_refresh: Duration,
    pub ca_file: Option<PathBuf>,
    /// The claims request attributes are taken from (`[attributes]` entries with `from = "claim:NAME"`),
    /// kept in [`Identity::attributes`]; no other claim is copied. Set by the config validator.
    pub attribute_claims: Vec<String>,
}

impl IssuerConfig {
    /// Whether keys fetched for `self` serve `other` too: the same issuer, fetched the same way (only the
    /// claims kept for attributes may differ, and they do not change the keys).
    pub fn same_keys(&self, other: &IssuerConfig) -> bool {
        let mut a = self.clone();
        a.attribute_claims.clone_from(&other.attribute_claims);
        a == *other
    }
}

/// `[auth]`, validated.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub allow_anonymous: bool,
    pub demo_token: bool,
    pub max_token_bytes: usize,
    pub cache_entries: usize,
    pub key_wait: Duration,
    pub issuers: Vec<Arc<IssuerConfig>>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: false,
            demo_token: false,
            max_token_bytes: 8192,
            cache_entries: 4096,
            key_wait: Duration::from_millis(2000),
            issuers: Vec::new(),
        }
    }
}

const DEFAULT_ALGS: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::PS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

fn parse_alg(s: &str) -> Result<Algorithm, String> {
    match s {
        "RS256" => Ok(Algorithm::RS256),
        "RS384" => Ok(Algorithm::RS384),
        "RS512" => Ok(Algorithm::RS512),
        "PS256" => Ok(Algorithm::PS256),
        "PS384" => Ok(Algorithm::PS384),
        "PS512" => Ok(Algorithm::PS512),
        "ES256" => Ok(Algorithm::ES256),
        "ES384" => Ok(Algorithm::ES384),
        "EdDSA" => Ok(Algorithm::EdDSA),
        "HS256" | "HS384" | "HS512" => Err(format!(
            "{s} is an HMAC algorithm: a shared secret is not an identity provider's public key, and accepting it invites algorithm-confusion forgeries"
        )),
        "none" => Err("`none` means unsigned: never accepted".to_owned()),
        other => Err(format!(
            "{other:?} is not one of RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
        )),
    }
}

/// `https://` anywhere; `http://` only to a loopback host (tests, a local IdP).
pub fn check_url(url: &str) -> Result<(), String> {
    if let Some(rest) = url.strip_prefix("https://") {
        if rest.is_empty() {
            return Err("has no host".to_owned());
        }
        return Ok(());
    }
    if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or("");
        let host = match host.rsplit_once(':') {
            Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        };
        if matches!(host, "127.0.0.1" | "localhost" | "[::1]") {
            return Ok(());
        }
        return Err(
            "must use https:// (plain http is accepted only for a loopback host)".to_owned(),
        );
    }
    Err("must be an https:// URL".to_owned())
}

impl AuthConfig {
    /// Validates `[auth]`; problems come back as (field, reason) pairs. Relative paths are relative to
    /// `base` (the config file's directory).
    pub fn from_raw(raw: RawAuth, base: &Path) -> Result<AuthConfig, Vec<(String, String)>> {
        let mut is: Vec<(String, String)> = Vec::new();
        let d = AuthConfig::default();
        let max_token_bytes = raw.max_token_bytes.unwrap_or(d.max_token_bytes);
        if !(256..=65536).contains(&max_token_bytes) {
            is.push((
                "auth.max_token_bytes".into(),
                "must be between 256 and 65536".into(),
            ));
        }
        let cache_entries = raw.cache_entries.unwrap_or(d.cache_entries);
        if cache_entries > 1_000_000 {
            is.push((
                "auth.cache_entries".into(),
                "must be at most 1000000".into(),
            ));
        }
        let key_wait_ms = raw.key_wait_ms.unwrap_or(2000);
        if key_wait_ms > 30_000 {
            is.push(("auth.key_wait_ms".into(), "must be at most 30000".into()));
        }
        let mut issuers = Vec::new();
        let mut names = std::collections::HashSet::new();
        for (i, r) in raw.issuers.into_iter().enumerate() {
            let at = |f: &str| format!("auth.issuers[{i}].{f}");
            if r.name.is_empty()
                || r.name.len() > 64
                || !r
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                is.push((at("name"), "must be 1 to 64 of [A-Za-z0-9_-]".into()));
            } else if !names.insert(r.name.clone()) {
                is.push((at("name"), format!("{:?} names another issuer too", r.name)));
            }
            if let Err(e) = check_url(&r.issuer) {
                is.push((at("issuer"), e));
            }
            if r.audiences.is_empty() {
                is.push((
                    at("audiences"),
                    "list at least one accepted audience (the IdP's aud for this gateway)".into(),
                ));
            }
            let jwks = match (r.jwks_uri, r.jwks_file) {
                (Some(_), Some(_)) => {
                    is.push((
                        at("jwks_file"),
                        "set jwks_uri or jwks_file, not both".into(),
                    ));
                    JwksSource::Discovery(String::new())
                }
                (Some(u), None) => {
                    if let Err(e) = check_url(&u) {
                        is.push((at("jwks_uri"), e));
                    }
                    JwksSource::Uri(u)
                }
                (None, Some(f)) => JwksSource::File(if f.is_relative() { base.join(f) } else { f }),
                (None, None) => JwksSource::Discovery(format!(
                    "{}/.well-known/openid-configuration",
                    r.issuer.trim_end_matches('/')
                )),
            };
            let algorithms = match r.algorithms {
                None => DEFAULT_ALGS.to_vec(),
                Some(list) => {
                    let mut out = Vec::new();
                    for (j, a) in list.iter().enumerate() {
                        match parse_alg(a) {
                            Ok(a) => out.push(a),
                            Err(e) => is.push((format!("auth.issuers[{i}].algorithms[{j}]"), e)),
                        }
                    }
                    if list.is_empty() {
                        is.push((at("algorithms"), "list at least one algorithm".into()));
                    }
                    out
                }
            };
            let leeway_s = r.leeway_s.unwrap_or(60);
            if leeway_s > 600 {
                is.push((at("leeway_s"), "must be at most 600 seconds".into()));
            }
            let refresh_s = r.refresh_s.unwrap_or(3600);
            if !(10..=86_400).contains(&refresh_s) {
                is.push((
                    at("refresh_s"),
                    "must be between 10 and 86400 seconds".into(),
                ));
            }
            let min_refresh_s = r.min_refresh_s.unwrap_or(10);
            if min_refresh_s > 3600 {
                is.push((at("min_refresh_s"), "must be at most 3600 seconds".into()));
            }
            let groups_claim = r.groups_claim.unwrap_or_else(|| "groups".to_owned());
            if groups_claim.is_empty() || groups_claim.split('.').any(str::is_empty) {
                is.push((
                    at("groups_claim"),
                    "must be a claim name or a dotted path".into(),
                ));
            }
            let user_claim = r.user_claim.unwrap_or_else(|| "sub".to_owned());
            if user_claim.is_empty() {
                is.push((at("user_claim"), "must name a claim".into()));
            }
            issuers.push(Arc::new(IssuerConfig {
                name: Arc::from(r.name.as_str()),
                issuer: r.issuer,
                audiences: r.audiences,
                jwks,
                algorithms,
                leeway: Duration::from_secs(leeway_s),
                user_claim,
                groups_claim: groups_claim.split('.').map(str::to_owned).collect(),
                group_map: r.group_map.unwrap_or_default(),
                group_prefix: r.group_prefix.unwrap_or_default(),
                refresh: Duration::from_secs(refresh_s),
                min_refresh: Duration::from_secs(min_refresh_s),
                ca_file: r
                    .ca_file
                    .map(|f| if f.is_relative() { base.join(f) } else { f }),
                attribute_claims: Vec::new(),
            }));
        }
        if is.is_empty() {
            Ok(AuthConfig {
                allow_anonymous: raw.allow_anonymous.unwrap_or(false),
                demo_token: raw.demo_token.unwrap_or(false),
                max_token_bytes,
                cache_entries,
                key_wait: Duration::from_millis(key_wait_ms),
                issuers,
            })
        } else {
            Err(is)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// Keys
// ---------------------------------------------------------------------------------------------------------

/// The kind of public key, to refuse a token whose `alg` does not fit the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        use Algorithm::*;
        match self {
            KeyKind::Rsa => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
            KeyKind::EcP256 => alg == ES256,
            KeyKind::EcP384 => alg == ES384,
            KeyKind::Ed25519 => alg == EdDSA,
        }
    }
}

/// One public signing key.
#[derive(Clone)]
pub struct PublicKey {
    pub kid: Option<String>,
    pub kind: KeyKind,
    key: DecodingKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("kid", &self.kid)
            .field("kind", &self.kind)
            .finish()
    }
}

/// An issuer's signing keys, as last fetched.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    pub keys: Vec<PublicKey>,
}

impl KeySet {
    /// Parses a JWKS document. Keys for encryption, symmetric (`oct`) keys and curves we do not verify are
    /// skipped; a document with no usable signing key is an error.
    pub fn from_jwks(json: &[u8]) -> Result<KeySet, FetchError> {
        let set: JwkSet = serde_json::from_slice(json)
            .map_err(|e| FetchError::Invalid(format!("not a JWKS document: {e}")))?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
                continue;
            }
            let kind = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => KeyKind::Rsa,
                AlgorithmParameters::EllipticCurve(p) => match p.curve {
                    EllipticCurve::P256 => KeyKind::EcP256,
                    EllipticCurve::P384 => KeyKind::EcP384,
                    _ => continue,
                },
                AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                    KeyKind::Ed25519
                }
                // Symmetric keys are secrets, never an IdP's published verification keys.
                _ => continue,
            };
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            keys.push(PublicKey {
                kid: jwk.common.key_id.clone(),
                kind,
                key,
            });
        }
        if keys.is_empty() {
            return Err(FetchError::Invalid(
                "the JWKS holds no usable signing key (RSA, EC P-256/P-384 or Ed25519)".to_owned(),
            ));
        }
        Ok(KeySet { keys })
    }

    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// Why a key fetch failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FetchError {
    #[error("fetching {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("reading {path}: {reason}")]
    File { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// The blocking HTTP client used for key fetches.
pub type Agent = ureq::Agent;

/// Builds the HTTP agent for an issuer's fetches (web PKI roots plus the issuer's `ca_file`).
pub fn agent_for(issuer: &IssuerConfig) -> Result<ureq::Agent, FetchError> {
    let mut b = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .redirects(2);
    if let Some(ca) = &issuer.ca_file {
        let pem = std::fs::read(ca).map_err(|e| FetchError::File {
            path: ca.display().to_string(),
            reason: e.to_string(),
        })?;
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| FetchError::File {
                path: ca.display().to_string(),
                reason: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| FetchError::File {
                path: ca.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| FetchError::Invalid(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        b = b.tls_config(Arc::new(tls));
    }
    Ok(b.build())
}

const MAX_DOC_BYTES: u64 = 1024 * 1024;

fn get(agent: &ureq::Agent, url: &str) -> Result<Vec<u8>, FetchError> {
    let err = |reason: String| FetchError::Http {
        url: url.to_owned(),
        reason,
    };
    let resp = agent.get(url).call().map_err(|e| match e {
        ureq::Error::Status(code, _) => err(format!("HTTP {code}")),
        ureq::Error::Transport(t) => err(t.to_string()),
    })?;
    let mut body = Vec::new();
    std::io::Read::read_to_end(
        &mut std::io::Read::take(resp.into_reader(), MAX_DOC_BYTES),
        &mut body,
    )
    .map_err(|e| err(e.to_string()))?;
    Ok(body)
}

/// Fetches an issuer's current keys (blocking: run it off the cores).
pub fn fetch_keys(issuer: &IssuerConfig, agent: &ureq::Agent) -> Result<KeySet, FetchError> {
    let doc = match &issuer.jwks {
        JwksSource::File(p) => std::fs::read(p).map_err(|e| FetchError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        })?,
        JwksSource::Uri(u) => get(agent, u)?,
        JwksSource::Discovery(u) => {
            #[derive(Deserialize)]
            struct Discovery {
                issuer: Option<String>,
                jwks_uri: Option<String>,
            }
            let d: Discovery = serde_json::from_slice(&get(agent, u)?).map_err(|e| {
                FetchError::Invalid(format!("{u}: not an OpenID discovery document: {e}"))
            })?;
            if let Some(iss) = &d.issuer {
                if iss.trim_end_matches('/') != issuer.issuer.trim_end_matches('/') {
                    return Err(FetchError::Invalid(format!(
                        "{u} says its issuer is {iss}, not {}",
                        issuer.issuer
                    )));
                }
            }
            let Some(jwks) = d.jwks_uri else {
                return Err(FetchError::Invalid(format!("{u} has no jwks_uri")));
            };
            check_url(&jwks).map_err(|e| FetchError::Invalid(format!("jwks_uri {jwks} {e}")))?;
            get(agent, &jwks)?
        }
    };
    KeySet::from_jwks(&doc)
}

// ---------------------------------------------------------------------------------------------------------
// Verification
// ---------------------------------------------------------------------------------------------------------

/// Why a credential was refused. The message is safe to return to the client: it never contains the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("no credential: send a token as `Authorization: Bearer ...` or `x-api-key`")]
    Missing,
    #[error("the token is {0} bytes, over the {1}-byte limit")]
    TooLarge(usize, usize),
    #[error("the token is not a JWT or a Tollgate service token")]
    Malformed,
    #[error("the token's algorithm {0} is not accepted")]
    Algorithm(String),
    #[error("the token's issuer {0:?} is not trusted by this gateway")]
    UnknownIssuer(String),
    #[error("the token has no issuer (iss)")]
    NoIssuer,
    #[error("the token's key id {kid:?} is not among issuer {issuer}'s keys")]
    UnknownKey { issuer: String, kid: String },
    #[error("issuer {0}'s keys are not loaded yet")]
    NoKeys(String),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf)")]
    NotYetValid,
    #[error("the token's audience is not one this gateway accepts")]
    WrongAudience,
    #[error("the token has no {0} claim")]
    MissingClaim(String),
    #[error("the token is invalid: {0}")]
    Invalid(String),
    #[error("{0}")]
    ServiceToken(String),
}

/// What [`peek`] reads before any verification: enough to pick the issuer and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub iss: String,
}

fn b64_json<T: for<'de> Deserialize<'de>>(seg: &str) -> Result<T, Rejection> {
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seg.trim_end_matches('='))
        .map_err(|_| Rejection::Malformed)?;
    serde_json::from_slice(&raw).map_err(|_| Rejection::Malformed)
}

/// Whether `token` has the JWS compact shape (three base64url segments).
pub fn looks_like_jwt(token: &str) -> bool {
    let mut n = 0;
    for seg in token.split('.') {
        n += 1;
        if n > 3
            || !seg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'=')
        {
            return false;
        }
    }
    n == 3
}

/// Reads the unverified header (`alg`, `kid`) and the `iss` claim. Refuses `none` and HMAC here, before any
/// issuer or key is consulted.
pub fn peek(token: &str, max_bytes: usize) -> Result<Peek, Rejection> {
    if token.len() > max_bytes {
        return Err(Rejection::TooLarge(token.len(), max_bytes));
    }
    if !looks_like_jwt(token) {
        return Err(Rejection::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p)) = (parts.next(), parts.next()) else {
        return Err(Rejection::Malformed);
    };
    #[derive(Deserialize)]
    struct Header {
        alg: Option<String>,
        kid: Option<String>,
    }
    #[derive(Deserialize)]
    struct Iss {
        iss: Option<serde_json::Value>,
    }
    let header: Header = b64_json(h)?;
    let alg_name = header.alg.unwrap_or_default();
    let alg = parse_alg(&alg_name).map_err(|_| {
        Rejection::Algorithm(if alg_name.is_empty() {
            "(none given)".to_owned()
        } else {
            alg_name.chars().take(16).collect()
        })
    })?;
    let claims: Iss = b64_json(p)?;
    let iss = match claims.iss {
        Some(serde_json::Value::String(s)) => s,
        _ => return Err(Rejection::NoIssuer),
    };
    Ok(Peek {
        alg,
        kid: header.kid,
        iss,
    })
}

/// A verified token: who it is and when it stops being valid (unix seconds).
#[derive(Debug, Clone)]
pub struct Verified {
    pub identity: Identity,
    pub expires_at: i64,
}

/// Verifies `token` (already [`peek`]ed as `pk`) against `issuer` and its `keys`, and maps its claims.
pub fn verify(
    token: &str,
    pk: &Peek,
    issuer: &IssuerConfig,
    keys: &KeySet,
) -> Result<Verified, Rejection> {
    if !issuer.algorithms.contains(&pk.alg) {
        return Err(Rejection::Algorithm(format!("{:?}", pk.alg)));
    }
    let candidates: Vec<&PublicKey> = match &pk.kid {
        Some(kid) => {
            let k: Vec<&PublicKey> = keys
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect();
            if k.is_empty() {
                return Err(Rejection::UnknownKey {
                    issuer: issuer.name.to_string(),
                    kid: kid.chars().take(64).collect(),
                });
            }
            k
        }
        None => keys.keys.iter().filter(|k| k.kind.fits(pk.alg)).collect(),
    };
    let mut v = Validation::new(pk.alg);
    v.algorithms = vec![pk.alg];
    v.leeway = issuer.leeway.as_secs();
    v.validate_nbf = true;
    v.set_issuer(&[&issuer.issuer]);
    v.set_audience(&issuer.audiences);
    v.set_required_spec_claims(&["exp", "iss", "aud"]);
    let mut last = Rejection::BadSignature;
    for k in candidates {
        // A key of the wrong type for the alg never verifies anything (no RSA key as an HMAC secret).
        if !k.kind.fits(pk.alg) {
            last = Rejection::Algorithm(format!("{:?} with a {:?} key", pk.alg, k.kind));
            continue;
        }
        match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &k.key, &v)
        {
            Ok(data) => return map_claims(&data.claims, issuer),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind as K;
                last = match e.kind() {
                    K::InvalidSignature => Rejection::BadSignature,
                    K::ExpiredSignature => Rejection::Expired,
                    K::ImmatureSignature => Rejection::NotYetValid,
                    K::InvalidAudience => Rejection::WrongAudience,
                    K::InvalidIssuer => {
                        Rejection::UnknownIssuer(pk.iss.chars().take(128).collect())
                    }
                    K::MissingRequiredClaim(c) => Rejection::MissingClaim(c.clone()),
                    K::InvalidAlgorithm => Rejection::Algorithm(format!("{:?}", pk.alg)),
                    K::Json(_) | K::Base64(_) | K::Utf8(_) | K::InvalidToken => {
                        Rejection::Malformed
                    }
                    other => Rejection::Invalid(format!("{other:?}")),
                };
                // Only a bad signature is worth trying the next key for.
                if last != Rejection::BadSignature {
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

fn claim_str(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn map_claims(
    claims: &serde_json::Map<String, serde_json::Value>,
    issuer: &IssuerConfig,
) -> Result<Verified, Rejection> {
    let subject = claims
        .get(&issuer.user_claim)
        .and_then(claim_str)
        .ok_or_else(|| Rejection::MissingClaim(issuer.user_claim.clone()))?;
    let expires_at = claims
        .get("exp")
        .and_then(serde_json::Value::as_i64)
        .ok_or_else(|| Rejection::MissingClaim("exp".to_owned()))?;
    let email = claims.get("email").and_then(claim_str);
    let mut node = claims.get(&issuer.groups_claim[0]);
    for seg in &issuer.groups_claim[1..] {
        node = node.and_then(|n| n.get(seg));
    }
    let raw_groups: Vec<String> = match node {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(claim_str).collect(),
        Some(serde_json::Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        _ => Vec::new(),
    };
    let groups: Vec<Arc<str>> = raw_groups
        .into_iter()
        .take(256)
        .map(|g| {
            let name = issuer.group_map.get(&g).cloned().unwrap_or(g);
            Arc::from(format!("{}{}", issuer.group_prefix, name).as_str())
        })
        .collect();
    // Only the claims `[attributes]` takes values from; a value that is no attribute value counts as absent.
    let attributes: Vec<(Arc<str>, Arc<str>)> = issuer
        .attribute_claims
        .iter()
        .filter_map(|name| {
            let v = match claims.get(name)? {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                _ => return None,
            };
            crate::budget::attributes::valid_value(&v)
                .then(|| (Arc::from(name.as_str()), Arc::from(v.as_str())))
        })
        .collect();
    Ok(Verified {
        identity: Identity {
            attributes: Arc::from(attributes),
            kind: IdentityKind::User,
            subject: Arc::from(subject.as_str()),
            email: email.map(|e| Arc::from(e.as_str())),
            groups: Arc::from(groups),
            source: Arc::clone(&issuer.name),
            token_id: None,
        },
        expires_at,
    })
}

/// Finds the issuer a token names; `None` when it is not trusted.
pub fn issuer_for<'a>(
    issuers: &'a [Arc<IssuerConfig>],
    iss: &str,
) -> Option<(usize, &'a IssuerConfig)> {
    issuers
        .iter()
        .enumerate()
        .find(|(_, i)| i.issuer == iss)
        .map(|(n, i)| (n, i.as_ref()))
}

/// Keys per issuer index, as the identity thread last published them.
pub type KeyTable = HashMap<usize, Arc<KeySet>>;

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/idp")
            .join(name);
        std::fs::read(p).unwrap()
    }

    fn issuer() -> IssuerConfig {
        let raw = RawAuth {
            issuers: vec![RawIssuer {
                name: "test".into(),
                issuer: "https://idp.example.com".into(),
                audiences: vec!["tollgate".into()],
                jwks_file: Some("unused.json".into()),
                groups_claim: Some("realm_access.roles".into()),
                group_map: Some([("0b1c-guid".to_owned(), "ml".to_owned())].into()),
                group_prefix: Some("kc:".into()),
                ..RawIssuer::default()
            }],
            ..RawAuth::default()
        };
        let a = AuthConfig::from_raw(raw, Path::new("/etc")).unwrap();
        (*a.issuers[0]).clone()
    }

    fn now() -> i64 {
        jiff::Timestamp::now().as_second()
    }

    fn claims() -> serde_json::Value {
        json!({
            "iss": "https://idp.example.com", "aud": "tollgate", "sub": "u-1", "email": "a@example.com",
            "exp": now() + 600, "iat": now(), "realm_access": {"roles": ["0b1c-guid", "eng"]}
        })
    }

    fn sign(claims: &serde_json::Value, key: &str, alg: Algorithm, kid: Option<&str>) -> String {
        let pem = fixture(&format!("{key}.pem"));
        let ek = match alg {
            Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            _ => EncodingKey::from_rsa_pem(&pem),
        }
        .unwrap();
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        encode(&h, claims, &ek).unwrap()
    }

    fn check(token: &str) -> Result<Verified, Rejection> {
        let keys = KeySet::from_jwks(&fixture("jwks-all.json")).unwrap();
        let pk = peek(token, 8192)?;
        let iss = issuer();
        if pk.iss != iss.issuer {
            return Err(Rejection::UnknownIssuer(pk.iss));
        }
        verify(token, &pk, &iss, &keys)
    }

    #[test]
    fn every_supported_algorithm_verifies_and_claims_map() {
        for (key, alg) in [
            ("rsa-a", Algorithm::RS256),
            ("rsa-b", Algorithm::PS256),
            ("ec-p256", Algorithm::ES256),
            ("ed25519", Algorithm::EdDSA),
        ] {
            let v = check(&sign(&claims(), key, alg, Some(key))).unwrap();
            assert_eq!(&*v.identity.subject, "u-1", "{key}");
            assert_eq!(v.identity.email.as_deref(), Some("a@example.com"));
            let groups: Vec<&str> = v.identity.groups.iter().map(|g| &**g).collect();
            assert_eq!(groups, ["kc:ml", "kc:eng"]);
            assert_eq!(&*v.identity.source, "test");
        }
        // No kid: the keys of the right type are tried.
        assert!(check(&sign(&claims(), "rsa-b", Algorithm::RS256, None)).is_ok());
    }

    #[test]
    fn forged_expired_early_and_misaddressed_tokens_are_refused_by_name() {
        // Signed by rsa-b but claiming rsa-a's kid.
        assert_eq!(
            check(&sign(&claims(), "rsa-b", Algorithm::RS256, Some("rsa-a"))).unwrap_err(),
            Rejection::BadSignature
        );
        let mut c = claims();
        c["exp"] = json!(now() - 3600);
        assert_eq!(
            check(&sign(&c, "rsa-a", Algorithm::RS256, Some("rsa-a"))).unwrap_err(),
            Rejection::Expired
        );
        let mut c = claims();
        c["nbf"] = json!(now() + 3600);
        assert_eq!(
            check(&sign(&c, "rsa-a", Algorithm::RS256, Some("rsa-a"))).unwrap_err(),
            Rejection::NotYetValid
        );
        let mut c = claims();
        c["aud"] = json!("someone-else");
        assert_eq!(
            check(&sign(&c, "rsa-a", Algorithm::RS256, Some("rsa-a"))).unwrap_err(),
            Rejection::WrongAudience
        );
        let mut c = claims();
        c["iss"] = json!("https://evil.example.com");
        assert!(matches!(
            check(&sign(&c, "rsa-a", Algorithm::RS256, Some("rsa-a"))).unwrap_err(),
            Rejection::UnknownIssuer(_)
        ));
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            check(&sign(&c, "rsa-a", Algorithm::RS256, Some("rsa-a"))).unwrap_err(),
            Rejection::MissingClaim("exp".into())
        );
        let mut c = claims();
        c.as_object_mut().unwrap().remove("sub");
        assert_eq!(
            check(&sign(&c, "rsa-a", Algorithm::RS256, Some("rsa-a"))).unwrap_err(),
            Rejection::MissingClaim("sub".into())
        );
        assert!(matches!(
            check(&sign(
                &claims(),
                "rsa-a",
                Algorithm::RS256,
                Some("rotated-away")
            ))
            .unwrap_err(),
            Rejection::UnknownKey { .. }
        ));
    }

    #[test]
    fn only_the_claims_attributes_name_are_kept() {
        let mut c = claims();
        c["project"] = json!("apollo");
        c["level"] = json!(3);
        c["nested"] = json!({"a": 1});
        c["unused"] = json!("x");
        let token = sign(&c, "rsa-a", Algorithm::RS256, Some("rsa-a"));
        let keys = KeySet::from_jwks(&fixture("jwks-all.json")).unwrap();
        let pk = peek(&token, 8192).unwrap();
        let mut iss = issuer();
        iss.attribute_claims = vec![
            "level".into(),
            "missing".into(),
            "nested".into(),
            "project".into(),
        ];
        let v = verify(&token, &pk, &iss, &keys).unwrap();
        let kept: Vec<(&str, &str)> = v
            .identity
            .attributes
            .iter()
            .map(|(k, v)| (&**k, &**v))
            .collect();
        assert_eq!(kept, [("level", "3"), ("project", "apollo")]);
        // None named: nothing kept.
        assert!(check(&token).unwrap().identity.attributes.is_empty());
        // The kept claims do not change which keys an issuer needs.
        assert!(iss.same_keys(&issuer()));
    }

    #[test]
    fn a_missing_groups_claim_means_no_groups() {
        let mut c = claims();
        c.as_object_mut().unwrap().remove("realm_access");
        let v = check(&sign(&c, "rsa-a", Algorithm::RS256, Some("rsa-a"))).unwrap();
        assert!(v.identity.groups.is_empty());
    }

    fn b64(v: &serde_json::Value) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn alg_none_and_hmac_confusion_are_refused() {
        let body = b64(&claims());
        let none = format!("{}.{body}.", b64(&json!({"alg": "none", "kid": "rsa-a"})));
        assert_eq!(
            check(&none).unwrap_err(),
            Rejection::Algorithm("none".into())
        );
        let none = format!("{}.{body}.AA", b64(&json!({"alg": "none", "kid": "rsa-a"})));
        assert_eq!(
            check(&none).unwrap_err(),
            Rejection::Algorithm("none".into())
        );
        // HS256 "signed" with rsa-a's public key PEM as the HMAC secret.
        let secret = fixture("rsa-a.pub.pem");
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-a".into());
        let forged = encode(&h, &claims(), &EncodingKey::from_secret(&secret)).unwrap();
        assert_eq!(
            check(&forged).unwrap_err(),
            Rejection::Algorithm("HS256".into())
        );
        // ES256 header over an RSA key id.
        let t = sign(&claims(), "ec-p256", Algorithm::ES256, Some("rsa-a"));
        assert!(matches!(check(&t).unwrap_err(), Rejection::Algorithm(_)));
    }

    #[test]
    fn oversized_and_garbage_tokens_are_refused_unparsed() {
        let big = format!("{}.{}.{}", "a".repeat(5000), "b".repeat(5000), "c");
        assert!(matches!(
            peek(&big, 8192),
            Err(Rejection::TooLarge(_, 8192))
        ));
        for junk in ["", "abc", "a.b", "a.b.c.d", "eyJ.eyJ.x", "é.é.é", "a.b.c"] {
            assert!(peek(junk, 8192).is_err(), "{junk:?}");
        }
        let no_iss = format!(
            "{}.{}.sig",
            b64(&json!({"alg": "RS256"})),
            b64(&json!({"sub": "x"}))
        );
        assert_eq!(peek(&no_iss, 8192).unwrap_err(), Rejection::NoIssuer);
    }

    #[test]
    fn jwks_parsing_skips_symmetric_and_encryption_keys() {
        let doc = json!({"keys": [
            {"kty": "oct", "kid": "s", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "sXch", "e": "AQAB"}
        ]});
        assert!(KeySet::from_jwks(&serde_json::to_vec(&doc).unwrap()).is_err());
        let all = KeySet::from_jwks(&fixture("jwks-all.json")).unwrap();
        assert_eq!(all.keys.len(), 4);
        assert!(all.has_kid("ed25519"));
        assert!(KeySet::from_jwks(b"{not json").is_err());
    }

    #[test]
    fn config_refuses_hmac_none_and_plain_http() {
        let raw = RawAuth {
            issuers: vec![RawIssuer {
                name: "x".into(),
                issuer: "http://idp.example.com".into(),
                algorithms: Some(vec!["HS256".into(), "none".into()]),
                ..RawIssuer::default()
            }],
            ..RawAuth::default()
        };
        let e = AuthConfig::from_raw(raw, Path::new("/")).unwrap_err();
        let fields: Vec<&str> = e.iter().map(|(f, _)| f.as_str()).collect();
        assert!(fields.contains(&"auth.issuers[0].issuer"), "{e:?}");
        assert!(fields.contains(&"auth.issuers[0].audiences"), "{e:?}");
        assert!(fields.contains(&"auth.issuers[0].algorithms[0]"), "{e:?}");
        assert!(fields.contains(&"auth.issuers[0].algorithms[1]"), "{e:?}");
        assert!(check_url("http://127.0.0.1:9000/x").is_ok());
        assert!(check_url("http://localhost/x").is_ok());
        assert!(check_url("http://127.0.0.1.evil.com/x").is_err());
    }
}
