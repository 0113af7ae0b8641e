//! A full upstream TLS 1.3 handshake with Tollgate's crypto provider (X25519MLKEM768 hybrid key exchange,
//! aws-lc-rs) against the same provider offering classic X25519 only: the cost of post-quantum key
//! exchange each time an upstream pool opens a connection.
//!
//! Client and server run in memory (no sockets), so the figure is the CPU of both ends: a real handshake
//! adds one network round trip, and the provider's server side is not ours to pay for.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

struct Pair {
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

fn pair(provider: Arc<CryptoProvider>) -> Pair {
    let cert = rcgen::generate_simple_self_signed(vec!["api.example.test".into()]).unwrap();
    let mut roots = RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key_pair.serialize_der()));
    // The server offers both groups, as the providers' endpoints do; the client's offer decides.
    let server = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    Pair {
        client: Arc::new(client),
        server: Arc::new(server),
    }
}

/// One handshake, start to finish, with a fresh session (no resumption).
fn handshake(p: &Pair) -> Option<rustls::NamedGroup> {
    let name = ServerName::try_from("api.example.test").unwrap();
    let mut c = ClientConnection::new(p.client.clone(), name).unwrap();
    let mut s = ServerConnection::new(p.server.clone()).unwrap();
    let mut buf = Vec::with_capacity(16 * 1024);
    while c.is_handshaking() || s.is_handshaking() {
        buf.clear();
        while c.wants_write() {
            c.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().unwrap();
        }
        buf.clear();
        while s.wants_write() {
            s.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
    }
    c.negotiated_key_exchange_group().map(|g| g.name())
}

fn tls_handshake(c: &mut Criterion) {
    let hybrid = pair(tollgate_core::tls::crypto_provider());
    let classic = pair(tollgate_core::tls::classic_crypto_provider());
    assert_eq!(handshake(&hybrid), Some(rustls::NamedGroup::X25519MLKEM768));
    assert_eq!(handshake(&classic), Some(rustls::NamedGroup::X25519));
    let mut g = c.benchmark_group("tls_handshake");
    g.bench_function("tollgate_x25519mlkem768", |b| b.iter(|| handshake(&hybrid)));
    g.bench_function("baseline_x25519", |b| b.iter(|| handshake(&classic)));
    g.finish();
}

criterion_group!(benches, tls_handshake);
criterion_main!(benches);
