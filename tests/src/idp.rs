//! A small OpenID Connect identity provider for tests, on a real socket (`127.0.0.1:0`).
//!
//! Owns: discovery (`/.well-known/openid-configuration`), a JWKS (`/jwks`) served from the committed fixture
//! keys in `tests/fixtures/idp/`, the device authorization grant (`/device`, RFC 8628) and the token endpoint
//! (`/token`: device-code and refresh-token grants). It speaks the real wire formats: form-encoded requests,
//! JSON answers, RFC 6749 / RFC 8628 error bodies with HTTP 400. Tests drive the user's side (approve, deny,
//! expire a code) and the key material (which keys `/jwks` serves, signing arbitrary claims) through
//! [`TestIdp`]'s methods.
//! Fails: by panicking, as test code does, when a fixture key is missing or a test names an unknown code.
//! Cost: one thread with a single-threaded tokio runtime per IdP; stopped when the [`TestIdp`] drops.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The client ID the IdP knows; any other gets `invalid_client`.
pub const CLIENT_ID: &str = "tollgate-cli";

/// The fixture keys, by kid.
pub const KIDS: [&str; 4] = ["rsa-a", "rsa-b", "ec-p256", "ed25519"];

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/idp/");

struct Key {
    encoding: EncodingKey,
    /// The public JWK (from `NAME.jwk.json`).
    jwk: Value,
    alg: Algorithm,
}

fn load_key(kid: &str) -> Key {
    let pem = std::fs::read(format!("{FIXTURES}{kid}.pem"))
        .unwrap_or_else(|e| panic!("fixture key {kid}.pem: {e}"));
    let (encoding, alg) = if kid.starts_with("rsa") {
        (EncodingKey::from_rsa_pem(&pem).unwrap(), Algorithm::RS256)
    } else if kid.starts_with("ec") {
        (EncodingKey::from_ec_pem(&pem).unwrap(), Algorithm::ES256)
    } else {
        (EncodingKey::from_ed_pem(&pem).unwrap(), Algorithm::EdDSA)
    };
    let jwks: Value =
        serde_json::from_slice(&std::fs::read(format!("{FIXTURES}{kid}.jwk.json")).unwrap())
            .unwrap();
    Key {
        encoding,
        jwk: jwks["keys"][0].clone(),
        alg,
    }
}

#[derive(Clone)]
struct User {
    sub: String,
    email: String,
    groups: Vec<String>,
}

#[derive(Clone)]
enum DeviceState {
    Pending,
    Approved(User),
    Denied,
    Expired,
    /// Tokens were issued; the device code is spent.
    Used,
}

struct Device {
    user_code: String,
    scope: String,
    /// The `audience` the client asked for (Auth0 style); the access token's `aud` when present.
    audience: Option<String>,
    state: DeviceState,
}

struct State {
    issuer: String,
    keys: BTreeMap<String, Key>,
    jwks: Vec<String>,
    jwks_fetches: usize,
    token_requests: usize,
    interval: u64,
    token_lifetime: i64,
    access_aud: String,
    device_grant: bool,
    devices: HashMap<String, Device>,
    /// Refresh token -> the user, scope and audience it was issued for.
    refresh: HashMap<String, (User, String, Option<String>)>,
    client_secret: Option<String>,
    serial: u64,
}

/// A running test IdP. Cheap to query from the test thread; every method locks its state briefly.
pub struct TestIdp {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `n` characters from an alphabet without vowels or look-alikes (RFC 8628 §6.1), at random.
fn random_code(alphabet: &[u8], n: usize) -> String {
    let mut bytes = vec![0u8; n];
    getrandom::getrandom(&mut bytes).unwrap();
    bytes
        .iter()
        .map(|b| alphabet[*b as usize % alphabet.len()] as char)
        .collect()
}

impl TestIdp {
    /// Starts an IdP whose JWKS serves the key `rsa-a`, on a port of its own.
    pub fn start() -> TestIdp {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            issuer: format!("http://{addr}"),
            keys: KIDS.iter().map(|k| (k.to_string(), load_key(k))).collect(),
            jwks: vec!["rsa-a".to_owned()],
            jwks_fetches: 0,
            token_requests: 0,
            interval: 1,
            token_lifetime: 3600,
            access_aud: "tollgate".to_owned(),
            device_grant: true,
            devices: HashMap::new(),
            refresh: HashMap::new(),
            client_secret: None,
            serial: 0,
        }));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let st = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("test-idp".to_owned())
            .spawn(move || serve(listener, st, rx))
            .unwrap();
        TestIdp {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The `iss` of every token it signs; the same as [`TestIdp::url`].
    pub fn issuer(&self) -> String {
        self.url()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Which fixture keys `/jwks` serves from now on, e.g. `&["rsa-a", "rsa-b"]` during a rotation.
    pub fn set_jwks(&self, kids: &[&str]) {
        let mut st = self.st();
        for k in kids {
            assert!(st.keys.contains_key(*k), "no fixture key {k}");
        }
        st.jwks = kids.iter().map(|k| k.to_string()).collect();
    }

    /// How many times `/jwks` was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.st().jwks_fetches
    }

    /// Signs `claims` with fixture key `kid`, with the key's own algorithm (RS256, ES256 or EdDSA).
    pub fn sign(&self, claims: &Value, kid: &str) -> String {
        let alg = self
            .st()
            .keys
            .get(kid)
            .unwrap_or_else(|| panic!("no fixture key {kid}"))
            .alg;
        self.sign_with(claims, kid, alg)
    }

    /// Signs `claims` with fixture key `kid` and algorithm `alg` (e.g. PS256 with an RSA key).
    pub fn sign_with(&self, claims: &Value, kid: &str, alg: Algorithm) -> String {
        sign(&self.st(), claims, kid, alg)
    }

    /// The `aud` of access tokens issued from now on (default `tollgate`).
    pub fn access_token_audience(&self, aud: &str) {
        self.st().access_aud = aud.to_owned();
    }

    /// The `interval` the device endpoint tells clients to poll at (default 1 s; 0 keeps tests fast).
    pub fn set_interval(&self, secs: u64) {
        self.st().interval = secs;
    }

    /// The lifetime (`exp - iat`, `expires_in`) of tokens issued from now on (default 3600 s).
    pub fn set_token_lifetime(&self, secs: i64) {
        self.st().token_lifetime = secs;
    }

    /// Requires `client_secret` at the token endpoint from now on, as Google does for installed apps.
    pub fn require_client_secret(&self, secret: &str) {
        self.st().client_secret = Some(secret.to_owned());
    }

    /// Drops the device grant from discovery and the device endpoint, like an IdP where it is not enabled.
    pub fn disable_device_grant(&self) {
        self.st().device_grant = false;
    }

    fn with_device(&self, user_code: &str, f: impl FnOnce(&mut Device)) {
        let mut st = self.st();
        let d = st
            .devices
            .values_mut()
            .find(|d| d.user_code == user_code)
            .unwrap_or_else(|| panic!("no device authorization with user code {user_code:?}"));
        f(d);
    }

    /// The user approves `user_code` as `sub`: the next poll gets tokens with these claims.
    pub fn approve(&self, user_code: &str, sub: &str, email: &str, groups: &[&str]) {
        let user = User {
            sub: sub.to_owned(),
            email: email.to_owned(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        };
        self.with_device(user_code, |d| d.state = DeviceState::Approved(user));
    }

    /// The user refuses `user_code`: the next poll gets `access_denied`.
    pub fn deny(&self, user_code: &str) {
        self.with_device(user_code, |d| d.state = DeviceState::Denied);
    }

    /// `user_code` runs out of time: the next poll gets `expired_token`.
    pub fn expire(&self, user_code: &str) {
        self.with_device(user_code, |d| d.state = DeviceState::Expired);
    }

    /// Requests seen at the token endpoint: polls and refreshes.
    pub fn token_requests(&self) -> usize {
        self.st().token_requests
    }
}

impl Drop for TestIdp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn sign(st: &State, claims: &Value, kid: &str, alg: Algorithm) -> String {
    let key = st
        .keys
        .get(kid)
        .unwrap_or_else(|| panic!("no fixture key {kid}"));
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &key.encoding).unwrap()
}

fn serve(
    listener: std::net::TcpListener,
    state: Arc<Mutex<State>>,
    mut shutdown: tokio::sync::oneshot::Receiver<()>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let stream = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            let state = Arc::clone(&state);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = Arc::clone(&state);
                    async move { Ok::<_, Infallible>(handle(req, &state).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// An RFC 6749 §5.2 error answer.
fn oauth_error(error: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        StatusCode::BAD_REQUEST,
        &json!({"error": error, "error_description": description}),
    )
}

async fn handle(req: Request<Incoming>, state: &Mutex<State>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let is_form = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return oauth_error("invalid_request", "unreadable body"),
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&body).into_owned().collect();
    let mut st = state.lock().unwrap();
    match (method, path.as_str()) {
        (Method::GET, "/.well-known/openid-configuration") => {
            let iss = st.issuer.clone();
            let mut doc = json!({
                "issuer": iss,
                "jwks_uri": format!("{iss}/jwks"),
                "authorization_endpoint": format!("{iss}/authorize"),
                "token_endpoint": format!("{iss}/token"),
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256", "PS256", "ES256", "EdDSA"],
                "grant_types_supported": ["refresh_token"],
                "token_endpoint_auth_methods_supported": ["none"],
                "scopes_supported": ["openid", "profile", "email", "offline_access"],
            });
            if st.device_grant {
                doc["device_authorization_endpoint"] = json!(format!("{iss}/device"));
                doc["grant_types_supported"] = json!([
                    "refresh_token",
                    "urn:ietf:params:oauth:grant-type:device_code"
                ]);
            }
            json_response(StatusCode::OK, &doc)
        }
        (Method::GET, "/jwks") => {
            st.jwks_fetches += 1;
            let keys: Vec<Value> = st.jwks.iter().map(|k| st.keys[k].jwk.clone()).collect();
            json_response(StatusCode::OK, &json!({ "keys": keys }))
        }
        (Method::POST, "/device") if st.device_grant => {
            if !is_form {
                return oauth_error("invalid_request", "expected a form-encoded body");
            }
            if form.get("client_id").map(String::as_str) != Some(CLIENT_ID) {
                return oauth_error("invalid_client", "unknown client_id");
            }
            let device_code = random_code(b"abcdefghijklmnopqrstuvwxyz0123456789", 40);
            let alphabet = b"BCDFGHJKLMNPQRSTVWXZ";
            let user_code = format!("{}-{}", random_code(alphabet, 4), random_code(alphabet, 4));
            let scope = form.get("scope").cloned().unwrap_or_default();
            let audience = form.get("audience").cloned();
            st.devices.insert(
                device_code.clone(),
                Device {
                    user_code: user_code.clone(),
                    scope,
                    audience,
                    state: DeviceState::Pending,
                },
            );
            let iss = &st.issuer;
            json_response(
                StatusCode::OK,
                &json!({
                    "device_code": device_code,
                    "user_code": user_code,
                    "verification_uri": format!("{iss}/activate"),
                    "verification_uri_complete": format!("{iss}/activate?user_code={user_code}"),
                    "expires_in": 600,
                    "interval": st.interval,
                }),
            )
        }
        (Method::POST, "/token") => {
            st.token_requests += 1;
            if !is_form {
                return oauth_error("invalid_request", "expected a form-encoded body");
            }
            let client_id = form.get("client_id").map(String::as_str).unwrap_or("");
            if client_id != CLIENT_ID {
                return oauth_error("invalid_client", "unknown client_id");
            }
            if st.client_secret.is_some() && form.get("client_secret") != st.client_secret.as_ref()
            {
                return oauth_error("invalid_client", "wrong or missing client_secret");
            }
            let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
            match get("grant_type") {
                "urn:ietf:params:oauth:grant-type:device_code" => {
                    let Some(d) = st.devices.get_mut(get("device_code")) else {
                        return oauth_error("invalid_grant", "unknown device_code");
                    };
                    match d.state.clone() {
                        DeviceState::Pending => {
                            oauth_error("authorization_pending", "the user has not approved yet")
                        }
                        DeviceState::Denied => oauth_error("access_denied", "the user said no"),
                        DeviceState::Expired => {
                            oauth_error("expired_token", "the device code expired")
                        }
                        DeviceState::Used => {
                            oauth_error("invalid_grant", "device code already used")
                        }
                        DeviceState::Approved(user) => {
                            d.state = DeviceState::Used;
                            let (scope, audience) = (d.scope.clone(), d.audience.clone());
                            issue(&mut st, &user, &scope, audience)
                        }
                    }
                }
                "refresh_token" => match st.refresh.remove(get("refresh_token")) {
                    Some((user, scope, audience)) => issue(&mut st, &user, &scope, audience),
                    None => oauth_error("invalid_grant", "unknown or used refresh token"),
                },
                other => oauth_error(
                    "unsupported_grant_type",
                    &format!("grant_type {other:?} is not supported"),
                ),
            }
        }
        _ => json_response(StatusCode::NOT_FOUND, &json!({"error": "not_found"})),
    }
}

/// A token response: a signed access token, an ID token, and a fresh (rotated) refresh token.
fn issue(
    st: &mut State,
    user: &User,
    scope: &str,
    audience: Option<String>,
) -> Response<Full<Bytes>> {
    st.serial += 1;
    let iat = now();
    let exp = iat + st.token_lifetime;
    let access = json!({
        "iss": st.issuer,
        "aud": audience.clone().unwrap_or_else(|| st.access_aud.clone()),
        "sub": user.sub,
        "email": user.email,
        "groups": user.groups,
        "client_id": CLIENT_ID,
        "scope": scope,
        "iat": iat,
        "nbf": iat,
        "exp": exp,
        "jti": format!("at-{}", st.serial),
    });
    let id = json!({
        "iss": st.issuer,
        "aud": CLIENT_ID,
        "sub": user.sub,
        "email": user.email,
        "groups": user.groups,
        "iat": iat,
        "exp": exp,
    });
    let access_token = sign(st, &access, "rsa-a", Algorithm::RS256);
    let id_token = sign(st, &id, "rsa-a", Algorithm::RS256);
    let refresh_token = random_code(b"abcdefghijklmnopqrstuvwxyz0123456789", 40);
    st.refresh.insert(
        refresh_token.clone(),
        (user.clone(), scope.to_owned(), audience),
    );
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": access_token,
            "token_type": "Bearer",
            "expires_in": st.token_lifetime,
            "refresh_token": refresh_token,
            "id_token": id_token,
            "scope": scope,
        }),
    )
}
