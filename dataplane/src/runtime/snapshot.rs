//! The immutable view of configuration that every core reads on every request.
//!
//! Owns: [`Snapshot`], built once from a validated [`Config`] by the control side (keys loaded, TLS client
//! configs built, Host headers and auth headers pre-rendered, each in its API's header: [`Api::auth_lines`]),
//! and [`Published`], the `ArcSwap` the control side swaps to publish a new one. Cores load the current snapshot per request (one atomic load); nothing in a
//! snapshot is mutated after publication except the resolved addresses, which the resolver thread swaps.
//! Connection pools are keyed by [`ProviderRuntime::pool_key`], not by index, so they survive a swap.
//!
//! Fails: building fails with a [`BuildError`] naming the provider (unreadable CA file, missing key without a
//! mock fallback). Cost: building is start-up work; a load is ~2 ns.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::ServerName;
use tollgate_core::config::{BaseUrl, Config, KeyError};
use tollgate_core::{ApiKey, ProviderKind};

use crate::providers::Api;

/// Everything a core needs to route and forward, frozen.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Arc<Config>,
    pub providers: Vec<Arc<ProviderRuntime>>,
}

/// A provider ready for the hot path.
#[derive(Debug)]
pub struct ProviderRuntime {
    pub name: String,
    /// The same name, shared: what usage records carry (no copy per request).
    pub label: Arc<str>,
    pub kind: ProviderKind,
    /// The wire API it speaks (what `kind` means on the wire).
    pub api: Api,
    pub base: BaseUrl,
    /// `host: ...\r\n`, rendered once.
    pub host_line: Vec<u8>,
    /// The credential header line(s) Tollgate injects, rendered once. Contains the key: never log it.
    auth_lines: Vec<u8>,
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// Resolved addresses, swapped by the resolver thread; empty until the first successful resolution.
    pub addrs: ArcSwap<Vec<SocketAddr>>,
    /// Identity of the upstream endpoint for connection pooling across snapshot swaps.
    pub pool_key: Arc<str>,
    /// True when this provider is being served by the bundled mock because no key was configured.
    pub is_mock: bool,
}

impl ProviderRuntime {
    /// The credential header lines for an upstream request.
    pub fn auth_lines(&self) -> &[u8] {
        &self.auth_lines
    }

    /// The literal IP of the base URL, when it is one (no DNS needed).
    pub fn literal_ip(&self) -> Option<IpAddr> {
        self.base.host.parse().ok()
    }
}

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("provider {provider}: {reason}")]
    Provider { provider: String, reason: String },
}

/// The key Tollgate sends to the bundled mock (the mock checks it, as a provider would).
pub const MOCK_KEY: &str = "tollgate-bundled-mock";

/// The currently published snapshot.
pub type Published = Arc<ArcSwap<Snapshot>>;

/// How to get each provider's key and where the bundled mock listens, decided by the binary.
#[derive(Debug, Default, Clone)]
pub struct BuildOptions {
    /// Base URL of the bundled mock, used for providers with `mock_when_no_key` and no key.
    pub mock_base: Option<BaseUrl>,
}

impl Snapshot {
    /// Builds a snapshot: loads keys, reads CA files, pre-renders headers.
    pub fn build(config: Arc<Config>, opts: &BuildOptions) -> Result<Snapshot, BuildError> {
        let mut providers = Vec::with_capacity(config.providers.len());
        for p in &config.providers {
            let err = |reason: String| BuildError::Provider {
                provider: p.name.clone(),
                reason,
            };
            let (key, base, is_mock) = match p.load_key() {
                Ok(k) => (Some(k), p.base_url.clone(), false),
                Err(e) if p.mock_when_no_key => match &opts.mock_base {
                    Some(mock) => (Some(ApiKey::new(MOCK_KEY.to_owned())), mock.clone(), true),
                    None => return Err(err(format!("{e}, and the bundled mock is not running"))),
                },
                Err(KeyError::NotConfigured) => (None, p.base_url.clone(), false),
                Err(e) => return Err(err(e.to_string())),
            };
            let tls = if base.tls {
                let cfg = client_tls(p.ca_file.as_deref()).map_err(&err)?;
                let name = ServerName::try_from(base.host.clone())
                    .map_err(|_| err(format!("{:?} is not a valid TLS server name", base.host)))?;
                Some((cfg, name))
            } else {
                None
            };
            let mut auth_lines = Vec::new();
            if let Some(k) = &key {
                if k.expose().bytes().any(|b| b < 0x20 || b == 0x7f) {
                    return Err(err("the API key contains control characters".to_owned()));
                }
                Api::of(p.kind).auth_lines(k.expose(), &mut auth_lines);
            }
            let host_line = format!("host: {}\r\n", base.host_header()).into_bytes();
            let pool_key: Arc<str> =
                format!("{}|{}|{}|{}", p.name, base.host, base.port, base.tls).into();
            let initial = match base.host.parse::<IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, base.port)],
                Err(_) => Vec::new(),
            };
            providers.push(Arc::new(ProviderRuntime {
                name: p.name.clone(),
                label: Arc::from(p.name.as_str()),
                kind: p.kind,
                api: Api::of(p.kind),
                base,
                host_line,
                auth_lines,
                tls,
                addrs: ArcSwap::from_pointee(initial),
                pool_key,
                is_mock,
            }));
        }
        Ok(Snapshot { config, providers })
    }
}

/// A rustls client config trusting the web PKI roots plus the PEM certificates in `ca_file`.
fn client_tls(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("ca_file {} is not PEM: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!("ca_file {} holds no certificate", path.display()));
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(tollgate_core::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
