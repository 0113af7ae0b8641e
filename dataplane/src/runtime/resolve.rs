//! DNS resolution of provider hosts, off the cores.
//!
//! Owns: one `tollgate-dns` thread that resolves every provider host with the system resolver and swaps the
//! result into [`ProviderRuntime::addrs`]; cores only read that list, so a core never blocks on DNS.
//! Fails: a failed lookup keeps the previous addresses (a DNS blip does not take a provider down) and is
//! logged; a provider that never resolved answers 502 "upstream address not resolved" until it does.
//! Cost: one lookup per provider per `upstream.dns_refresh_ms` on its own thread; zero on the request path.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::obs::accesslog::Logger;
use crate::runtime::snapshot::{ProviderRuntime, Published};

/// Resolves one provider now; returns whether it has addresses afterwards.
#[allow(clippy::disallowed_methods)] // Blocking DNS is the point of this thread; cores never call it.
pub fn resolve_now(p: &ProviderRuntime, log: &Logger) -> bool {
    if p.literal_ip().is_some() {
        return true;
    }
    match (p.base.host.as_str(), p.base.port).to_socket_addrs() {
        Ok(it) => {
            let addrs: Vec<SocketAddr> = it.collect();
            if addrs.is_empty() {
                log.event(
                    "dns_empty",
                    &[("provider", &p.name), ("host", &p.base.host)],
                );
            } else if **p.addrs.load() != addrs {
                p.addrs.store(Arc::new(addrs));
            }
        }
        Err(e) => {
            log.event(
                "dns_failed",
                &[
                    ("provider", &p.name),
                    ("host", &p.base.host),
                    ("error", &e.to_string()),
                ],
            );
        }
    }
    !p.addrs.load().is_empty()
}

/// Starts the resolver thread. It re-resolves the current snapshot's providers every `refresh` until `stop`.
pub fn spawn(
    published: Published,
    refresh: Duration,
    log: Logger,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("tollgate-dns".into())
        .spawn(move || {
            // The 100 ms tick only keeps shutdown prompt; lookups happen every second for providers that have
            // never resolved and every `refresh` for the rest.
            let tick = Duration::from_millis(100);
            let retry = Duration::from_secs(1);
            let (mut since_refresh, mut since_retry) = (Duration::ZERO, Duration::ZERO);
            while !stop.load(Ordering::Relaxed) {
                std::thread::park_timeout(tick);
                since_refresh += tick;
                since_retry += tick;
                let refresh_due = since_refresh >= refresh;
                let retry_due = since_retry >= retry;
                if !refresh_due && !retry_due {
                    continue;
                }
                let snap = published.load_full();
                for p in &snap.providers {
                    if refresh_due || p.addrs.load().is_empty() {
                        resolve_now(p, &log);
                    }
                }
                if refresh_due {
                    since_refresh = Duration::ZERO;
                }
                since_retry = Duration::ZERO;
            }
        })
}
