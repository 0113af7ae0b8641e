//! The admin API's listener and runtime: the thread [`start`](crate::start) spawns runs a current-thread
//! tokio runtime serving the router over plain HTTP/1.1, or over TLS (tokio-rustls with
//! `tollgate_core::tls::crypto_provider()`) when `[admin]` names a certificate and key.
//!
//! Owns: [`acceptor`] (reads the PEM files once at start), [`run`] (the thread's body), and the TLS
//! listener (handshakes run as their own tasks with a 10 s limit, so a slow client never stalls accepts).
//! Fails: at start with the TLS files' reason; afterwards a failed accept or handshake drops that
//! connection only. Cost: one thread; connections are tasks on it; store calls go to tokio's blocking pool.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::callers::Peer;
use crate::App;

/// The TLS acceptor for the certificate chain and key in these PEM files.
pub fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, String> {
    let read = |p: &Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let cert_pem = read(cert_file)?;
    let key_pem = read(key_file)?;
    let certs = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", cert_file.display()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| format!("{}: {e}", key_file.display()))?
        .ok_or_else(|| format!("{} holds no private key", key_file.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(tollgate_core::tls::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", cert_file.display()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts TCP connections and hands over those whose TLS handshake completed.
struct TlsListener {
    local: SocketAddr,
    rx: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, TlsListener>) -> Peer {
        Peer(*stream.remote_addr())
    }
}

fn tls_listener(tcp: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<TlsListener> {
    let local = tcp.local_addr()?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (sock, peer) = match tcp.accept().await {
                Ok(c) => c,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(Ok(tls)) =
                    tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock)).await
                {
                    let _ = tx.send((tls, peer)).await;
                }
            });
        }
    });
    Ok(TlsListener { local, rx })
}

/// The admin thread's body: a runtime serving `app` on `listener` until `stop` fires.
pub fn run(
    listener: std::net::TcpListener,
    tls: Option<TlsAcceptor>,
    app: Arc<App>,
    stop: tokio::sync::oneshot::Receiver<()>,
) {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
    else {
        return;
    };
    rt.block_on(async move {
        let Ok(tcp) = TcpListener::from_std(listener) else {
            return;
        };
        let router = crate::routing::router(app);
        let (grace_tx, grace_rx) = tokio::sync::watch::channel(false);
        let signal = async move {
            let _ = stop.await;
            let _ = grace_tx.send(true);
        };
        let limit = async move {
            let mut rx = grace_rx;
            let _ = rx.wait_for(|v| *v).await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        };
        let make = router.into_make_service_with_connect_info::<Peer>();
        match tls {
            None => {
                let serve = axum::serve(tcp, make).with_graceful_shutdown(signal);
                tokio::select! {
                    _ = serve => {}
                    _ = limit => {}
                }
            }
            Some(acceptor) => {
                let Ok(l) = tls_listener(tcp, acceptor) else {
                    return;
                };
                let serve = axum::serve(l, make).with_graceful_shutdown(signal);
                tokio::select! {
                    _ = serve => {}
                    _ = limit => {}
                }
            }
        }
    });
}
