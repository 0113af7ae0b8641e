//! The TLS crypto provider every Tollgate client connection uses (providers upstream, IdP key fetches).
//!
//! Chosen on purpose: rustls' aws-lc-rs provider, whose default key exchange offers the X25519MLKEM768
//! hybrid (post-quantum) group first and X25519 after it. Prompts and completions cross the connection to
//! the provider; a hybrid exchange keeps a recording of today's traffic from being decrypted by a future
//! quantum computer, and OpenAI's and Anthropic's endpoints accept it. ring (the previous choice) has no
//! post-quantum group and its provider is deprecated in rustls 0.23.
//!
//! Cost, measured (`cargo bench -p tollgate-bench --bench hot_path -- tls_handshake`, docs/benchmarks.md): a
//! full TLS 1.3 handshake in memory (both ends) costs 230 us with the hybrid group against 169 us with X25519
//! alone; upstream connections are pooled, so a request pays it only when a pool opens a connection.
//! Building aws-lc (C) adds about 20 s to a cold build on two cores. Fails: never (the provider is static).

use std::sync::Arc;

use rustls::crypto::CryptoProvider;

/// The provider for every outbound TLS client Tollgate builds.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The same provider offering only classic X25519: the baseline the handshake benchmark compares with.
pub fn classic_crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
        ..rustls::crypto::aws_lc_rs::default_provider()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hybrid_post_quantum_group_is_offered_first() {
        let p = crypto_provider();
        assert_eq!(
            p.kx_groups.first().map(|g| g.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
        assert!(p
            .kx_groups
            .iter()
            .any(|g| g.name() == rustls::NamedGroup::X25519));
    }
}
