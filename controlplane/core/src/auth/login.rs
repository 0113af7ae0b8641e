//! `tollgate login` and `tollgate token`: signing a person in at their IdP with the OAuth 2.0 device
//! authorization grant (RFC 8628), storing the tokens, and handing out a fresh access token to scripts.
//!
//! Owns: OIDC discovery, the device-code request and the polling loop, the refresh-token grant, and the
//! credentials file (`$TOLLGATE_CREDENTIALS`, else `$XDG_CONFIG_HOME/tollgate/credentials.json`, else
//! `$HOME/.config/tollgate/credentials.json`): a JSON object keyed by issuer, written atomically (a 0600 temp
//! file in the same 0700 directory, then a rename) so a crash never leaves a half-written or world-readable
//! file.
//! Fails: with one [`LoginError`], whose messages name the URL, the IdP's `error` code and what to do next,
//! and never a token: the token-holding types print `<redacted>` in their `Debug` output.
//! Cost: a few blocking HTTP requests per command, run by a person or a shell script, never on a request
//! through the gateway. Polling sleeps the IdP's `interval` between requests.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The grant type RFC 8628 defines for polling the token endpoint.
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// Poll interval when the IdP does not say (RFC 8628 §3.2).
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// Floor for an `interval` of 0 (test IdPs), so a misbehaving IdP is not hammered in a tight loop.
const MIN_SLEEP: Duration = Duration::from_millis(50);
/// What `slow_down` adds to the interval (RFC 8628 §3.5).
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// A token expiring sooner than this is refreshed first, so the caller's request does not race its expiry.
const REFRESH_MARGIN_S: i64 = 60;
/// Scopes asked for when the user names none: an ID token, the user's profile, and a refresh token.
pub const DEFAULT_SCOPE: &str = "openid profile email offline_access";

/// Everything that can go wrong signing in or handing out a token.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("the issuer {0:?} is not an absolute http(s) URL")]
    InvalidUrl(String),
    #[error(
        "{0:?} must use https:// (plain http is allowed only for 127.0.0.1, ::1 and localhost)"
    )]
    InsecureUrl(String),
    #[error("requesting {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url} answered HTTP {status} without an OAuth error body")]
    Status { url: String, status: u16 },
    #[error("{url} answered with JSON that is not what OAuth expects: {reason}")]
    BadResponse { url: String, reason: String },
    #[error(
        "the IdP at {0} does not offer the device authorization grant (its discovery document has no \
         device_authorization_endpoint); enable the device code flow for this client"
    )]
    NoDeviceEndpoint(String),
    #[error("the sign-in was denied")]
    Denied,
    #[error("the code expired before it was approved; run tollgate login again")]
    Expired,
    #[error("the IdP at {url} refused the request: {error}{}", describe(.description))]
    Idp {
        url: String,
        error: String,
        description: Option<String>,
    },
    #[error("not signed in{}; run `tollgate login --issuer URL --client-id ID` first", for_issuer(.0))]
    NotLoggedIn(Option<String>),
    #[error("the stored token for {issuer} could not be refreshed ({reason}); run `tollgate login` again")]
    RefreshFailed { issuer: String, reason: String },
    #[error("the IdP at {0} issued no ID token (ask for the `openid` scope); run `tollgate login` again")]
    NoIdToken(String),
    #[error(
        "no place for the credentials file: set TOLLGATE_CREDENTIALS, XDG_CONFIG_HOME or HOME"
    )]
    NoCredentialsPath,
    #[error("credentials file {path}: {reason}")]
    Store { path: PathBuf, reason: String },
}

fn describe(d: &Option<String>) -> String {
    d.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
}

fn for_issuer(i: &Option<String>) -> String {
    i.as_deref().map(|i| format!(" at {i}")).unwrap_or_default()
}

/// What `tollgate login` was asked to do. `Debug` redacts the client secret.
#[derive(Clone)]
pub struct LoginOptions {
    pub issuer: String,
    pub client_id: String,
    pub scope: String,
    /// The API audience, for IdPs (Auth0) that only issue JWT access tokens for a named API.
    pub audience: Option<String>,
    /// For IdPs that want one from installed apps too (Google); sent to the token endpoint only.
    pub client_secret: Option<String>,
}

impl fmt::Debug for LoginOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginOptions")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("audience", &self.audience)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// What `tollgate token` was asked to do.
#[derive(Debug, Clone, Default)]
pub struct TokenOptions {
    /// Which stored sign-in; the one used last when absent.
    pub issuer: Option<String>,
    /// Hand out the ID token instead, for IdPs whose access tokens are opaque (Google).
    pub id_token: bool,
}

/// One IdP's stored tokens. `Debug` redacts the tokens.
#[derive(Clone, Serialize, Deserialize)]
pub struct StoredToken {
    pub issuer: String,
    pub client_id: String,
    /// Kept for refreshes, for IdPs (Google) whose installed-app clients have a (non-confidential) secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    pub token_endpoint: String,
    pub access_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
    /// Unix seconds; absent when the IdP did not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    #[serde(default)]
    pub token_type: String,
}

impl fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |o: &Option<String>| o.as_ref().map(|_| "<redacted>");
        f.debug_struct("StoredToken")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("client_secret", &redact(&self.client_secret))
            .field("token_endpoint", &self.token_endpoint)
            .field("access_token", &"<redacted>")
            .field("refresh_token", &redact(&self.refresh_token))
            .field("id_token", &redact(&self.id_token))
            .field("expires_at", &self.expires_at)
            .field("token_type", &self.token_type)
            .finish()
    }
}

/// The credentials file: every IdP signed in to, keyed by issuer, and which one `tollgate token` uses by default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Credentials {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
    #[serde(default)]
    pub issuers: BTreeMap<String, StoredToken>,
}

/// Where the credentials live: `$TOLLGATE_CREDENTIALS`, else under `$XDG_CONFIG_HOME`, else `~/.config`.
pub fn credentials_path() -> Result<PathBuf, LoginError> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(p) = env("TOLLGATE_CREDENTIALS") {
        return Ok(PathBuf::from(p));
    }
    let base = match env("XDG_CONFIG_HOME") {
        // The XDG spec says a relative value is invalid and must be ignored.
        Some(x) if Path::new(&x).is_absolute() => PathBuf::from(x),
        _ => PathBuf::from(env("HOME").ok_or(LoginError::NoCredentialsPath)?).join(".config"),
    };
    Ok(base.join("tollgate").join("credentials.json"))
}

impl Credentials {
    /// Reads the file; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Credentials, LoginError> {
        let store_err = |reason: String| LoginError::Store {
            path: path.to_owned(),
            reason,
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| store_err(format!("not valid credentials JSON ({e})"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Credentials::default()),
            Err(e) => Err(store_err(e.to_string())),
        }
    }

    /// Writes the file atomically with mode 0600, creating its directory with mode 0700.
    pub fn save(&self, path: &Path) -> Result<(), LoginError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let store_err = |what: &str, e: std::io::Error| LoginError::Store {
            path: path.to_owned(),
            reason: format!("{what}: {e}"),
        };
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| store_err("creating its directory", e))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| LoginError::Store {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "credentials.json".to_owned());
        let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
        // A temp file left by a crashed run of this same pid would make create_new fail.
        let _ = std::fs::remove_file(&tmp);
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&json)?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            store_err("writing", e)
        })
    }
}

/// The issuer as stored and looked up: without a trailing slash, so `https://x/` and `https://x` are one IdP.
pub fn normalize_issuer(issuer: &str) -> String {
    issuer.trim().trim_end_matches('/').to_owned()
}

/// Accepts `https://` URLs, and `http://` only for loopback hosts, where no one else can read the traffic.
pub fn check_url(url: &str) -> Result<(), LoginError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| LoginError::InvalidUrl(url.to_owned()))?;
    let host = uri
        .host()
        .ok_or_else(|| LoginError::InvalidUrl(url.to_owned()))?;
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") if matches!(host, "127.0.0.1" | "[::1]" | "::1" | "localhost") => Ok(()),
        Some("http") => Err(LoginError::InsecureUrl(url.to_owned())),
        _ => Err(LoginError::InvalidUrl(url.to_owned())),
    }
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout(Duration::from_secs(30))
        .build()
}

/// The answer to a request: the status and the JSON body, if it had one. 4xx answers are not errors here,
/// since OAuth reports its errors (`authorization_pending`...) as 400 with a JSON body.
fn send(
    req: ureq::Request,
    form: Option<&[(&str, &str)]>,
) -> Result<(u16, Option<serde_json::Value>), LoginError> {
    let url = req.url().to_owned();
    let req = req.set("Accept", "application/json");
    let result = match form {
        Some(f) => req.send_form(f),
        None => req.call(),
    };
    let resp = match result {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => {
            return Err(LoginError::Http {
                url,
                reason: t.to_string(),
            })
        }
    };
    let status = resp.status();
    let body = resp
        .into_string()
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    Ok((status, body))
}

/// An OAuth error body (RFC 6749 §5.2), when the response is one.
fn oauth_error(body: &Option<serde_json::Value>) -> Option<(String, Option<String>)> {
    let b = body.as_ref()?;
    let error = b.get("error")?.as_str()?.to_owned();
    let description = b
        .get("error_description")
        .and_then(|d| d.as_str())
        .map(str::to_owned);
    Some((error, description))
}

/// Parses a successful response as `T`, or turns an error response into [`LoginError::Idp`].
fn expect_json<T: serde::de::DeserializeOwned>(
    url: &str,
    status: u16,
    body: Option<serde_json::Value>,
) -> Result<T, LoginError> {
    if !(200..300).contains(&status) {
        return Err(match oauth_error(&body) {
            Some((error, description)) => LoginError::Idp {
                url: url.to_owned(),
                error,
                description,
            },
            None => LoginError::Status {
                url: url.to_owned(),
                status,
            },
        });
    }
    let body = body.ok_or_else(|| LoginError::BadResponse {
        url: url.to_owned(),
        reason: "the body is not JSON".to_owned(),
    })?;
    // serde_json's messages name the field and position, never the value, so no token leaks here.
    serde_json::from_value(body).map_err(|e| LoginError::BadResponse {
        url: url.to_owned(),
        reason: e.to_string(),
    })
}

#[derive(Deserialize)]
struct Discovery {
    token_endpoint: String,
    #[serde(default)]
    device_authorization_endpoint: Option<String>,
}

#[derive(Deserialize)]
struct DeviceAuthorization {
    device_code: String,
    user_code: String,
    /// Google spells it `verification_url`.
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    expires_in: u64,
    #[serde(default)]
    interval: Option<u64>,
}

impl fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("device_code", &"<redacted>")
            .field("user_code", &self.user_code)
            .field("verification_uri", &self.verification_uri)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
    #[serde(default)]
    refresh_token: Option<String>,
    #[serde(default)]
    id_token: Option<String>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("token_type", &self.token_type)
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

fn now_s() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Runs the device flow: tells the user (on `prompt`, stderr in the binary) where to enter the code, waits for
/// approval, and stores the tokens. Returns the credentials file's path.
pub fn login(opts: &LoginOptions, prompt: &mut dyn Write) -> Result<PathBuf, LoginError> {
    let issuer = normalize_issuer(&opts.issuer);
    check_url(&issuer)?;
    let path = credentials_path()?;
    let agent = agent();

    let discovery_url = format!("{issuer}/.well-known/openid-configuration");
    let (status, body) = send(agent.get(&discovery_url), None)?;
    let discovery: Discovery = expect_json(&discovery_url, status, body)?;
    let device_url = discovery
        .device_authorization_endpoint
        .ok_or_else(|| LoginError::NoDeviceEndpoint(issuer.clone()))?;
    check_url(&device_url)?;
    check_url(&discovery.token_endpoint)?;

    let mut form = vec![
        ("client_id", opts.client_id.as_str()),
        ("scope", opts.scope.as_str()),
    ];
    if let Some(a) = &opts.audience {
        form.push(("audience", a.as_str()));
    }
    let (status, body) = send(agent.post(&device_url), Some(&form))?;
    let device: DeviceAuthorization = expect_json(&device_url, status, body)?;

    // Prompt lines are best-effort: a closed stderr must not stop the sign-in.
    let _ = writeln!(
        prompt,
        "To sign in, open {} and enter the code {}",
        device.verification_uri, device.user_code
    );
    if let Some(c) = &device.verification_uri_complete {
        let _ = writeln!(prompt, "Or open {c} (the code is filled in)");
    }
    let _ = writeln!(prompt, "Waiting for approval...");

    let client = Client {
        id: opts.client_id.clone(),
        secret: opts.client_secret.clone(),
    };
    let tokens = poll(&agent, &discovery.token_endpoint, &client, &device)?;
    let stored = stored_token(&issuer, &client, &discovery.token_endpoint, tokens, None);
    let mut creds = Credentials::load(&path)?;
    creds.issuers.insert(issuer.clone(), stored);
    creds.last_used = Some(issuer.clone());
    creds.save(&path)?;
    let _ = writeln!(
        prompt,
        "Signed in to {issuer}; credentials saved to {}",
        path.display()
    );
    Ok(path)
}

/// Polls the token endpoint until the user approves, denies, or the code expires (RFC 8628 §3.4-3.5).
fn poll(
    agent: &ureq::Agent,
    token_url: &str,
    client: &Client,
    device: &DeviceAuthorization,
) -> Result<TokenResponse, LoginError> {
    let deadline = Instant::now() + Duration::from_secs(device.expires_in);
    let mut interval = device
        .interval
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_INTERVAL);
    loop {
        std::thread::sleep(interval.max(MIN_SLEEP));
        if Instant::now() >= deadline {
            return Err(LoginError::Expired);
        }
        let mut form = vec![
            ("grant_type", DEVICE_GRANT),
            ("device_code", device.device_code.as_str()),
        ];
        client.add_to(&mut form);
        let (status, body) = send(agent.post(token_url), Some(&form))?;
        if !(200..300).contains(&status) {
            match oauth_error(&body) {
                Some((e, _)) if e == "authorization_pending" => continue,
                Some((e, _)) if e == "slow_down" => {
                    interval += SLOW_DOWN_STEP;
                    continue;
                }
                Some((e, _)) if e == "access_denied" => return Err(LoginError::Denied),
                Some((e, _)) if e == "expired_token" => return Err(LoginError::Expired),
                _ => {}
            }
        }
        return expect_json(token_url, status, body);
    }
}

/// The OAuth client Tollgate signs in as.
struct Client {
    id: String,
    secret: Option<String>,
}

impl Client {
    fn add_to<'a>(&'a self, form: &mut Vec<(&str, &'a str)>) {
        form.push(("client_id", &self.id));
        if let Some(s) = &self.secret {
            form.push(("client_secret", s));
        }
    }
}

fn stored_token(
    issuer: &str,
    client: &Client,
    token_endpoint: &str,
    t: TokenResponse,
    previous: Option<&StoredToken>,
) -> StoredToken {
    StoredToken {
        issuer: issuer.to_owned(),
        client_id: client.id.clone(),
        client_secret: client.secret.clone(),
        token_endpoint: token_endpoint.to_owned(),
        access_token: t.access_token,
        // RFC 6749 §6: the IdP may keep the old refresh token; and an ID token is optional on refresh.
        refresh_token: t
            .refresh_token
            .or_else(|| previous.and_then(|p| p.refresh_token.clone())),
        id_token: t
            .id_token
            .or_else(|| previous.and_then(|p| p.id_token.clone())),
        expires_at: t.expires_in.map(|s| now_s().saturating_add(s)),
        token_type: t.token_type.unwrap_or_else(|| "Bearer".to_owned()),
    }
}

/// The `exp` claim of a JWT, read without verifying it: only to decide whether to refresh our own token.
fn jwt_expiry(token: &str) -> Option<i64> {
    let mut v = jsonwebtoken::Validation::default();
    v.insecure_disable_signature_validation();
    v.validate_exp = false;
    v.validate_aud = false;
    v.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<serde_json::Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(&[]),
        &v,
    )
    .ok()?;
    data.claims.get("exp")?.as_i64()
}

/// When the token `tollgate token` would print expires, if known.
fn expiry(t: &StoredToken, id_token: bool) -> Option<i64> {
    if id_token {
        t.id_token.as_deref().and_then(jwt_expiry).or(t.expires_at)
    } else {
        t.expires_at
    }
}

/// Returns a token valid for at least another minute, refreshing (and storing) it first when needed.
pub fn token(opts: &TokenOptions) -> Result<String, LoginError> {
    let path = credentials_path()?;
    let mut creds = Credentials::load(&path)?;
    let issuer = match &opts.issuer {
        Some(i) => normalize_issuer(i),
        None => creds
            .last_used
            .clone()
            .ok_or(LoginError::NotLoggedIn(None))?,
    };
    let stored = creds
        .issuers
        .get(&issuer)
        .ok_or_else(|| LoginError::NotLoggedIn(Some(issuer.clone())))?;
    let fresh = expiry(stored, opts.id_token).is_none_or(|e| e - now_s() > REFRESH_MARGIN_S);
    let current = if fresh {
        stored.clone()
    } else {
        let refreshed = refresh(stored)?;
        creds.issuers.insert(issuer.clone(), refreshed.clone());
        creds.save(&path)?;
        refreshed
    };
    if opts.id_token {
        current.id_token.ok_or(LoginError::NoIdToken(issuer))
    } else {
        Ok(current.access_token)
    }
}

/// The refresh-token grant (RFC 6749 §6). Any failure asks the user to sign in again.
fn refresh(stored: &StoredToken) -> Result<StoredToken, LoginError> {
    let failed = |reason: String| LoginError::RefreshFailed {
        issuer: stored.issuer.clone(),
        reason,
    };
    let refresh_token = stored.refresh_token.as_deref().ok_or_else(|| {
        failed("the token expired and the IdP issued no refresh token".to_owned())
    })?;
    check_url(&stored.token_endpoint).map_err(|e| failed(e.to_string()))?;
    let client = Client {
        id: stored.client_id.clone(),
        secret: stored.client_secret.clone(),
    };
    let mut form = vec![
        ("grant_type", "refresh_token"),
        ("refresh_token", refresh_token),
    ];
    client.add_to(&mut form);
    let url = &stored.token_endpoint;
    let (status, body) = send(agent().post(url), Some(&form)).map_err(|e| failed(e.to_string()))?;
    let t: TokenResponse = expect_json(url, status, body).map_err(|e| failed(e.to_string()))?;
    Ok(stored_token(&stored.issuer, &client, url, t, Some(stored)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://idp.example.com").is_ok());
        assert!(check_url("http://127.0.0.1:8080").is_ok());
        assert!(check_url("http://localhost:1/x").is_ok());
        assert!(check_url("http://[::1]:1").is_ok());
        assert!(matches!(
            check_url("http://idp.example.com"),
            Err(LoginError::InsecureUrl(_))
        ));
        assert!(matches!(
            check_url("http://127.0.0.1.evil.example"),
            Err(LoginError::InsecureUrl(_))
        ));
        assert!(matches!(
            check_url("ftp://x"),
            Err(LoginError::InvalidUrl(_))
        ));
        assert!(matches!(
            check_url("idp.example.com"),
            Err(LoginError::InvalidUrl(_))
        ));
    }

    #[test]
    fn debug_redacts_tokens() {
        let t = StoredToken {
            issuer: "https://i".into(),
            client_id: "c".into(),
            client_secret: Some("secret-client".into()),
            token_endpoint: "https://i/token".into(),
            access_token: "secret-access".into(),
            refresh_token: Some("secret-refresh".into()),
            id_token: Some("secret-id".into()),
            expires_at: Some(1),
            token_type: "Bearer".into(),
        };
        let d = format!("{t:?}");
        assert!(!d.contains("secret-"), "{d}");
    }

    #[test]
    fn issuer_normalization() {
        assert_eq!(normalize_issuer("https://x.example/"), "https://x.example");
        assert_eq!(normalize_issuer("https://x.example"), "https://x.example");
    }
}
