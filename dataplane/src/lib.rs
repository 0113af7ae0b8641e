//! Tollgate's data plane: a thread-per-core HTTP/1.1 proxy in front of LLM providers.
//!
//! Read [`pipeline`] first: it is the request path, top-down, as named phases. Around it: [`server`] (workers,
//! listeners, shutdown), [`http1`] (parsing and framing), [`sse`] (event framing), [`upstream`] (provider
//! connections and pools), [`snapshot`] (the immutable per-request view of config), [`resolve`] (DNS off the
//! cores), [`accesslog`] (logging that never blocks a core), [`mailbox`] (asking another core, without blocking
//! either) and [`webhook`] (alert POSTs, off the cores).
//!
//! [`Gateway`] wires them together for the binary and for tests.

#![deny(unsafe_code)]

pub mod accesslog;
pub mod budgets;
pub mod bufio;
pub mod error;
pub mod http1;
pub mod identity;
pub mod iovec;
pub mod mailbox;
pub mod pipeline;
pub mod resolve;
pub mod server;
pub mod snapshot;
pub mod sse;
pub mod tokens;
pub mod upstream;
pub mod usage;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tollgate_controlplane::Config;

pub use error::{Error, ErrorKind};
pub use snapshot::{BuildOptions, Snapshot};

/// A running gateway: workers, resolver and log writer.
#[derive(Debug)]
pub struct Gateway {
    pub addrs: Vec<SocketAddr>,
    pub driver: &'static str,
    pub workers: usize,
    shutdown: Arc<AtomicBool>,
    server: server::Workers,
    resolver: Option<std::thread::JoinHandle<()>>,
    identity: Option<std::thread::JoinHandle<()>>,
    webhook_thread: Option<std::thread::JoinHandle<webhook::WebhookTotals>>,
    logger: Option<accesslog::Logger>,
    log_writer: Option<std::thread::JoinHandle<()>>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] snapshot::BuildError),
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Gateway {
    /// Builds the first snapshot, resolves provider hosts once, starts the log writer, resolver and workers,
    /// and logs one `listening` event per address (tests read the bound port from it).
    pub fn start(config: Config, opts: &BuildOptions) -> Result<Gateway, StartError> {
        let config = Arc::new(config);
        let (logger, log_writer) = accesslog::Logger::start()?;
        let snap = Snapshot::build(Arc::clone(&config), opts)?;
        // The estimate path's tokenizer is built here, never on a core.
        if !tokens::warm() {
            logger.event(
                "tokenizer_unavailable",
                &[("fallback", "bytes/4 estimates")],
            );
        }
        for p in &snap.providers {
            resolve::resolve_now(p, &logger);
            if p.is_mock {
                logger.event(
                    "provider_mocked",
                    &[
                        ("provider", &p.name),
                        (
                            "reason",
                            "no API key configured: serving from the bundled mock",
                        ),
                    ],
                );
            }
        }
        let published: snapshot::Published = Arc::new(ArcSwap::from_pointee(snap));
        let shutdown = Arc::new(AtomicBool::new(false));
        let resolver = resolve::spawn(
            Arc::clone(&published),
            config.upstream.dns_refresh,
            logger.clone(),
            Arc::clone(&shutdown),
        )?;
        let (auth, identity) = identity::start(&config, &logger, Arc::clone(&shutdown))?;
        // Alert webhooks go out from their own thread, only when some budget has one.
        let (webhooks, webhook_thread) =
            if config.budgets.budgets().iter().any(|b| b.webhook.is_some()) {
                let (tx, h) = webhook::Webhooks::start(logger.clone())?;
                (Some(tx), Some(h))
            } else {
                (None, None)
            };
        let server = server::start(
            &config,
            Arc::clone(&published),
            auth,
            webhooks,
            &logger,
            Arc::clone(&shutdown),
        )?;
        for a in &server.addrs {
            logger.value(serde_json::json!({
                "ts": accesslog::now_rfc3339(),
                "event": "listening",
                "addr": a.to_string(),
                "workers": server.count,
                "driver": server.driver,
                "pinned": server.pinned,
            }));
        }
        Ok(Gateway {
            addrs: server.addrs.clone(),
            driver: server.driver,
            workers: server.count,
            shutdown,
            server,
            resolver: Some(resolver),
            identity: Some(identity),
            webhook_thread,
            logger: Some(logger),
            log_writer: Some(log_writer),
        })
    }

    /// Starts a graceful shutdown; returns at once.
    pub fn begin_shutdown(&self) {
        self.shutdown.store(true, Ordering::Relaxed);
    }

    /// Shuts down gracefully and waits: workers finish in-flight requests (up to the grace period), then the
    /// resolver stops and the log writer drains.
    pub fn shutdown(mut self) {
        self.begin_shutdown();
        if let Some(l) = &self.logger {
            l.event("shutting_down", &[]);
        }
        let Gateway {
            server,
            resolver,
            identity,
            webhook_thread,
            logger,
            log_writer,
            ..
        } = &mut self;
        let server = std::mem::replace(server, server::Workers::empty());
        server.join();
        if let Some(r) = resolver.take() {
            r.thread().unpark();
            let _ = r.join();
        }
        if let Some(i) = identity.take() {
            let _ = i.join();
        }
        // The workers held the webhook senders; with them gone the thread finishes its queue and ends.
        if let Some(w) = webhook_thread.take() {
            let _ = w.join();
        }
        if let Some(l) = logger.take() {
            l.event("stopped", &[]);
        }
        if let Some(w) = log_writer.take() {
            let _ = w.join();
        }
    }
}
