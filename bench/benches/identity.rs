//! Identifying a caller, cold and cached, against the naive alternative of verifying every request.
//!
//! - `token_verify/{rs256,ps256,es256,eddsa}_cold`: what a core pays the first time it sees a JWT (unverified
//!   peek for `iss`/`kid`/`alg`, then signature, `iss`, `aud`, `exp`/`nbf`, claim mapping). This is also the
//!   baseline: a gateway without a cache pays it on every request.
//! - `token_verify/cached`: the per-core cache hit Tollgate pays on every later request with that token.
//! - `service_token/check`: SHA-256 of a `tg_` token and a map lookup, against a set of 10,000 tokens.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use tollgate_core::auth::jwt::{self, AuthConfig, KeySet, RawAuth, RawIssuer};
use tollgate_core::auth::service_tokens::{ServiceTokenSet, TokenStore};
use tollgate_dataplane::runtime::credentials::JwtCache;

const ISS: &str = "https://idp.example.com";

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/idp")
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn token(key: &str, alg: Algorithm) -> String {
    let pem = std::fs::read(fixtures().join(format!("{key}.pem"))).unwrap();
    let ek = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
        _ => EncodingKey::from_rsa_pem(&pem),
    }
    .unwrap();
    let mut h = Header::new(alg);
    h.kid = Some(key.to_owned());
    // A realistic access token: a dozen claims and a few groups (~900 bytes signed with RS256).
    let claims = serde_json::json!({
        "iss": ISS, "aud": "tollgate", "sub": "00u1abcd2EFGH3ijk4x7", "email": "alice@example.com",
        "groups": ["Everyone", "Engineering", "ml-platform", "oncall"], "scp": ["openid", "profile", "email"],
        "cid": "0oa1b2c3d4e5f6g7h8i9", "uid": "00u1abcd2EFGH3ijk4x7", "ver": 1, "jti": "AT.abcdefghijklmnop",
        "iat": now(), "exp": now() + 3600
    });
    encode(&h, &claims, &ek).unwrap()
}

fn token_verify(c: &mut Criterion) {
    let auth = AuthConfig::from_raw(
        RawAuth {
            issuers: vec![RawIssuer {
                name: "idp".into(),
                issuer: ISS.into(),
                audiences: vec!["tollgate".into()],
                jwks_file: Some("unused".into()),
                ..RawIssuer::default()
            }],
            ..RawAuth::default()
        },
        Path::new("/"),
    )
    .unwrap();
    let issuer = auth.issuers[0].clone();
    let keys =
        KeySet::from_jwks(&std::fs::read(fixtures().join("jwks-all.json")).unwrap()).unwrap();
    let mut g = c.benchmark_group("token_verify");
    for (name, key, alg) in [
        ("rs256_cold", "rsa-a", Algorithm::RS256),
        ("ps256_cold", "rsa-b", Algorithm::PS256),
        ("es256_cold", "ec-p256", Algorithm::ES256),
        ("eddsa_cold", "ed25519", Algorithm::EdDSA),
    ] {
        let t = token(key, alg);
        g.bench_function(name, |b| {
            b.iter(|| {
                let pk = jwt::peek(black_box(&t), 8192).unwrap();
                black_box(jwt::verify(&t, &pk, &issuer, &keys).unwrap());
            })
        });
    }
    let t = token("rsa-a", Algorithm::RS256);
    let pk = jwt::peek(&t, 8192).unwrap();
    let v = jwt::verify(&t, &pk, &issuer, &keys).unwrap();
    let mut cache = JwtCache::default();
    let n = now();
    cache.get(&t, 1, n);
    cache.put(&t, v.identity, v.expires_at, 4096, n);
    // Fill the cache as a busy core would.
    for i in 0..4000 {
        let other = format!("{t}{i}");
        let (id, exp) = (cache.get(&t, 1, n).unwrap(), v.expires_at);
        cache.put(&other, id, exp, 4096, n);
    }
    g.bench_function("cached", |b| {
        b.iter(|| black_box(cache.get(black_box(&t), 1, n).unwrap()))
    });
    g.finish();
}

fn service_token(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("tollgate-bench-tokens-{}", std::process::id()));
    let store = TokenStore::open(&dir).unwrap();
    let (_, secret) = store.create("bench", "bench", None).unwrap();
    let mut file = tollgate_core::auth::service_tokens::load(&dir).unwrap();
    // 10,000 tokens in the set (synthetic records; only the hash matters for the lookup).
    let template = file.tokens[0].clone();
    for i in 0..10_000u32 {
        let mut t = template.clone();
        t.id = format!("st_{i:08x}");
        t.name = format!("t{i}");
        t.hash = format!("{:064x}", u128::from(i) + 1);
        file.tokens.push(t);
    }
    let set = ServiceTokenSet::from_file(file).unwrap();
    let now = jiff::Timestamp::now();
    let mut g = c.benchmark_group("service_token");
    g.bench_function("check", |b| {
        b.iter(|| black_box(set.check(black_box(secret.expose()), now).unwrap()))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, token_verify, service_token);
criterion_main!(benches);
