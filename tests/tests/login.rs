//! `tollgate login` (the device authorization grant) and `tollgate token` against the test IdP, run as the real
//! binary on real sockets, each test with its own credentials file.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use tollgate_tests::idp::{TestIdp, CLIENT_ID};
use tollgate_tests::*;

/// A test's own credentials file (in a fresh directory, which `tollgate login` creates).
struct Creds {
    _dir: TempDir,
    path: PathBuf,
}

impl Creds {
    fn new() -> Creds {
        let dir = TempDir::new("login");
        let path = dir.0.join("cfg").join("credentials.json");
        Creds { _dir: dir, path }
    }

    fn env(&self) -> [(&str, &str); 1] {
        [("TOLLGATE_CREDENTIALS", self.path.to_str().unwrap())]
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&std::fs::read(&self.path).unwrap()).unwrap()
    }

    fn stored(&self, idp: &TestIdp) -> Value {
        self.json()["issuers"][idp.issuer()].clone()
    }

    fn mode(&self) -> u32 {
        std::fs::metadata(&self.path).unwrap().permissions().mode() & 0o777
    }
}

/// An IdP that tells clients to poll without waiting, so the tests take milliseconds.
fn fast_idp() -> TestIdp {
    let idp = TestIdp::start();
    idp.set_interval(0);
    idp
}

fn start_login(idp: &TestIdp, creds: &Creds, extra: &[&str]) -> Proc {
    let issuer = idp.issuer();
    let mut args = vec!["login", "--issuer", &issuer, "--client-id", CLIENT_ID];
    args.extend_from_slice(extra);
    Proc::spawn(&bin("tollgate"), &args, &creds.env())
}

/// Reads the user code from `To sign in, open URL and enter the code CODE`.
fn user_code(login: &Proc) -> String {
    let line = login
        .wait_line(|l| l.starts_with("To sign in, open "), WAIT)
        .unwrap_or_else(|| panic!("no sign-in prompt; output:\n{}", login.output()));
    let (before, code) = line.rsplit_once(" and enter the code ").unwrap();
    assert!(
        before.ends_with("/activate"),
        "verification URI missing: {line}"
    );
    assert_eq!(code.len(), 9, "{code}");
    assert_eq!(&code[4..5], "-", "{code}");
    code.to_owned()
}

fn exit_code(p: &mut Proc) -> i32 {
    p.wait_exit(WAIT)
        .unwrap_or_else(|| panic!("{} did not exit; output:\n{}", p.name, p.output()))
}

/// Signs in as `alice` and waits for `tollgate login` to finish.
fn login_as_alice(idp: &TestIdp, creds: &Creds) {
    let mut login = start_login(idp, creds, &[]);
    let code = user_code(&login);
    idp.approve(&code, "alice", "alice@example.com", &["eng", "ml"]);
    assert_eq!(exit_code(&mut login), 0, "{}", login.output());
}

fn run_token(creds: &Creds, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(bin("tollgate"));
    cmd.arg("token").args(args);
    for (k, v) in creds.env() {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// The claims of a token the IdP signed with `rsa-a`, checked against its public key.
fn verified_claims(token: &str, aud: &str, issuer: &str) -> Value {
    let pem = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/idp/rsa-a.pub.pem"
    ))
    .unwrap();
    let mut v = Validation::new(Algorithm::RS256);
    v.set_audience(&[aud]);
    v.set_issuer(&[issuer]);
    jsonwebtoken::decode::<Value>(token, &DecodingKey::from_rsa_pem(&pem).unwrap(), &v)
        .unwrap()
        .claims
}

#[test]
fn login_then_token_prints_the_approved_users_access_token() {
    let idp = fast_idp();
    let creds = Creds::new();
    let mut login = start_login(&idp, &creds, &[]);
    let code = user_code(&login);
    assert!(
        login
            .wait_line(|l| l.contains(&format!("/activate?user_code={code}")), WAIT)
            .is_some(),
        "verification_uri_complete not shown: {}",
        login.output()
    );
    idp.approve(&code, "alice", "alice@example.com", &["eng", "ml"]);
    assert_eq!(exit_code(&mut login), 0, "{}", login.output());
    login
        .wait_line(|l| l.starts_with("Signed in to "), WAIT)
        .unwrap_or_else(|| panic!("no success line: {}", login.output()));

    assert_eq!(creds.mode(), 0o600, "credentials file readable by others");
    let dir_mode = std::fs::metadata(creds.path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "credentials directory readable by others");
    let stored = creds.stored(&idp);
    let access = stored["access_token"].as_str().unwrap().to_owned();
    assert_eq!(creds.json()["last_used"], idp.issuer());
    assert_eq!(stored["client_id"], CLIENT_ID);
    assert_eq!(stored["token_endpoint"], format!("{}/token", idp.url()));
    assert!(stored["refresh_token"]
        .as_str()
        .is_some_and(|r| !r.is_empty()));
    assert!(stored["expires_at"].as_i64().is_some());
    let out = login.output();
    for secret in ["access_token", "refresh_token", "id_token"] {
        let value = stored[secret].as_str().unwrap();
        assert!(!out.contains(value), "{secret} printed by login: {out}");
    }

    let t = run_token(&creds, &[]);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    assert_eq!(String::from_utf8(t.stdout).unwrap(), format!("{access}\n"));
    let claims = verified_claims(&access, "tollgate", &idp.issuer());
    assert_eq!(claims["sub"], "alice");
    assert_eq!(claims["email"], "alice@example.com");
    assert_eq!(claims["groups"], serde_json::json!(["eng", "ml"]));

    // --id-token hands out the ID token, whose audience is the client.
    let t = run_token(
        &creds,
        &["--id-token", "--issuer", &format!("{}/", idp.url())],
    );
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let id = String::from_utf8(t.stdout).unwrap();
    assert_eq!(id.trim_end(), stored["id_token"].as_str().unwrap());
    assert_eq!(
        verified_claims(id.trim_end(), CLIENT_ID, &idp.issuer())["sub"],
        "alice"
    );
}

#[test]
fn a_denied_code_fails_login() {
    let idp = fast_idp();
    let creds = Creds::new();
    let mut login = start_login(&idp, &creds, &[]);
    let code = user_code(&login);
    idp.deny(&code);
    assert_ne!(exit_code(&mut login), 0);
    assert!(
        login
            .wait_line(|l| l.contains("the sign-in was denied"), WAIT)
            .is_some(),
        "{}",
        login.output()
    );
    assert!(!creds.path.exists(), "credentials stored after a denial");
}

#[test]
fn an_expired_code_fails_login_and_says_to_run_it_again() {
    let idp = fast_idp();
    let creds = Creds::new();
    let mut login = start_login(&idp, &creds, &[]);
    let code = user_code(&login);
    idp.expire(&code);
    assert_ne!(exit_code(&mut login), 0);
    assert!(
        login
            .wait_line(
                |l| l.contains("the code expired before it was approved; run tollgate login again"),
                WAIT
            )
            .is_some(),
        "{}",
        login.output()
    );
}

#[test]
fn login_keeps_polling_while_the_approval_is_pending() {
    let idp = fast_idp();
    let creds = Creds::new();
    let mut login = start_login(&idp, &creds, &[]);
    let code = user_code(&login);
    // Wait until the client has been told `authorization_pending` a few times, then approve.
    while idp.token_requests() < 3 {
        assert!(
            login.child.try_wait().unwrap().is_none(),
            "{}",
            login.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    idp.approve(&code, "bob", "bob@example.com", &[]);
    assert_eq!(exit_code(&mut login), 0, "{}", login.output());
    assert!(creds.stored(&idp)["access_token"].is_string());
}

#[test]
fn token_refreshes_a_token_about_to_expire() {
    let idp = fast_idp();
    // Shorter than the minute of margin `tollgate token` wants: every call refreshes.
    idp.set_token_lifetime(30);
    let creds = Creds::new();
    login_as_alice(&idp, &creds);
    let first = creds.stored(&idp);
    let before = idp.token_requests();

    let t = run_token(&creds, &[]);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let printed = String::from_utf8(t.stdout).unwrap();
    let printed = printed.strip_suffix('\n').unwrap();
    assert_eq!(idp.token_requests(), before + 1, "no refresh request");
    assert_ne!(printed, first["access_token"].as_str().unwrap());
    assert!(!String::from_utf8_lossy(&t.stderr).contains(printed));
    let second = creds.stored(&idp);
    assert_eq!(second["access_token"].as_str().unwrap(), printed);
    assert_ne!(second["refresh_token"], first["refresh_token"]);
    assert_eq!(creds.mode(), 0o600);
    assert_eq!(
        verified_claims(printed, "tollgate", &idp.issuer())["sub"],
        "alice"
    );

    // The rotated refresh token works too.
    let t = run_token(&creds, &[]);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    assert_eq!(idp.token_requests(), before + 2);

    // A token with plenty of life left is printed as stored, without asking the IdP.
    idp.set_token_lifetime(3600);
    let t = run_token(&creds, &[]);
    assert!(t.status.success());
    let third = creds.stored(&idp);
    let t = run_token(&creds, &[]);
    assert!(t.status.success());
    assert_eq!(
        String::from_utf8(t.stdout).unwrap().trim_end(),
        third["access_token"].as_str().unwrap()
    );
    assert_eq!(idp.token_requests(), before + 3);
}

#[test]
fn audience_and_client_secret_reach_the_idp() {
    let idp = fast_idp();
    idp.set_token_lifetime(30);
    idp.require_client_secret("installed-app-secret");
    let creds = Creds::new();
    let mut login = start_login(
        &idp,
        &creds,
        &[
            "--audience",
            "https://api.example.com",
            "--client-secret",
            "installed-app-secret",
        ],
    );
    let code = user_code(&login);
    idp.approve(&code, "carol", "carol@example.com", &[]);
    assert_eq!(exit_code(&mut login), 0, "{}", login.output());
    let stored = creds.stored(&idp);
    let claims = verified_claims(
        stored["access_token"].as_str().unwrap(),
        "https://api.example.com",
        &idp.issuer(),
    );
    assert_eq!(claims["sub"], "carol");
    // The refresh sends the stored secret too.
    let t = run_token(&creds, &[]);
    assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
    let tok = String::from_utf8(t.stdout).unwrap();
    assert_ne!(tok.trim_end(), stored["access_token"].as_str().unwrap());
    verified_claims(tok.trim_end(), "https://api.example.com", &idp.issuer());
}

#[test]
fn a_failed_refresh_says_to_log_in_again() {
    let idp = fast_idp();
    idp.set_token_lifetime(30);
    let creds = Creds::new();
    login_as_alice(&idp, &creds);
    // A refresh token the IdP no longer knows.
    let mut json = creds.json();
    json["issuers"][idp.issuer()]["refresh_token"] = "revoked".into();
    std::fs::write(&creds.path, json.to_string()).unwrap();
    let t = run_token(&creds, &[]);
    assert!(!t.status.success());
    assert!(t.stdout.is_empty());
    let err = String::from_utf8(t.stderr).unwrap();
    assert!(err.contains("tollgate login"), "{err}");
    assert!(err.contains("invalid_grant"), "{err}");
    assert!(
        !err.contains("revoked"),
        "refresh token in the message: {err}"
    );
}

#[test]
fn token_without_login_says_to_log_in() {
    let creds = Creds::new();
    let t = run_token(&creds, &[]);
    assert!(!t.status.success());
    assert!(t.stdout.is_empty());
    let err = String::from_utf8(t.stderr).unwrap();
    assert!(err.contains("tollgate login"), "{err}");

    // Signed in elsewhere, but not at the issuer asked for.
    let idp = fast_idp();
    login_as_alice(&idp, &creds);
    let t = run_token(&creds, &["--issuer", "https://other.example.com"]);
    assert!(!t.status.success());
    let err = String::from_utf8(t.stderr).unwrap();
    assert!(err.contains("https://other.example.com"), "{err}");
    assert!(err.contains("tollgate login"), "{err}");
}

#[test]
fn an_http_issuer_off_loopback_is_rejected() {
    let creds = Creds::new();
    let mut login = Proc::spawn(
        &bin("tollgate"),
        &[
            "login",
            "--issuer",
            "http://idp.example.com",
            "--client-id",
            CLIENT_ID,
        ],
        &creds.env(),
    );
    assert_ne!(exit_code(&mut login), 0);
    assert!(
        login.wait_line(|l| l.contains("https://"), WAIT).is_some(),
        "{}",
        login.output()
    );
    assert!(!creds.path.exists());
}

#[test]
fn an_idp_without_the_device_grant_is_named() {
    let idp = fast_idp();
    idp.disable_device_grant();
    let creds = Creds::new();
    let mut login = start_login(&idp, &creds, &[]);
    assert_ne!(exit_code(&mut login), 0);
    assert!(
        login
            .wait_line(|l| l.contains("device_authorization_endpoint"), WAIT)
            .is_some(),
        "{}",
        login.output()
    );
}

#[test]
fn an_unknown_client_gets_the_idps_error() {
    let idp = fast_idp();
    let creds = Creds::new();
    let issuer = idp.issuer();
    let mut login = Proc::spawn(
        &bin("tollgate"),
        &["login", "--issuer", &issuer, "--client-id", "nobody"],
        &creds.env(),
    );
    assert_ne!(exit_code(&mut login), 0);
    assert!(
        login
            .wait_line(|l| l.contains("invalid_client"), WAIT)
            .is_some(),
        "{}",
        login.output()
    );
}

#[test]
fn two_idps_are_stored_side_by_side() {
    let (a, b) = (fast_idp(), fast_idp());
    let creds = Creds::new();
    login_as_alice(&a, &creds);
    login_as_alice(&b, &creds);
    assert_eq!(creds.json()["last_used"], b.issuer());
    for idp in [&a, &b] {
        let t = run_token(&creds, &["--issuer", &idp.issuer()]);
        assert!(t.status.success(), "{}", String::from_utf8_lossy(&t.stderr));
        let tok = String::from_utf8(t.stdout).unwrap();
        assert_eq!(
            verified_claims(tok.trim_end(), "tollgate", &idp.issuer())["iss"],
            idp.issuer()
        );
    }
}
