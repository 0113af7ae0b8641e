//! Connections to providers: connect (plain or rustls TLS with SNI), and a per-core keep-alive pool.
//!
//! Owns: [`UpConn`] (a plain or TLS stream with the read/write calls the forward phase needs) and [`Pool`],
//! one per core, keyed by [`ProviderRuntime::pool_key`] so pools survive snapshot swaps.
//! Fails: connect and TLS errors become 502 `upstream_unreachable`, timeouts 504; an idle pooled connection
//! the provider has closed is detected by the forward phase (no response byte) and retried once on a fresh one.
//! Cost: a pooled request costs no connect; a fresh TLS connection costs one handshake (~1 RTT with TLS 1.3).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use monoio::buf::{IoBuf, IoVecBuf};
use monoio::io::{AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use monoio::BufResult;

use crate::error::{Error, Result};
use crate::net::bufio::read_append;
use crate::runtime::snapshot::ProviderRuntime;

/// An upstream connection.
pub enum UpConn {
    Plain(TcpStream),
    Tls(Box<monoio_rustls::ClientTlsStream<TcpStream>>),
}

impl std::fmt::Debug for UpConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpConn::Plain(_) => "UpConn::Plain",
            UpConn::Tls(_) => "UpConn::Tls",
        })
    }
}

impl UpConn {
    /// Reads into the spare capacity of `buf`, appending; `Ok(0)` is end of stream.
    pub async fn read_append(
        &mut self,
        buf: BytesMut,
        min_spare: usize,
    ) -> (std::io::Result<usize>, BytesMut) {
        match self {
            UpConn::Plain(s) => read_append(s, buf, min_spare).await,
            UpConn::Tls(s) => read_append(s.as_mut(), buf, min_spare).await,
        }
    }

    pub async fn write_all<B: IoBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            UpConn::Plain(s) => s.write_all(buf).await,
            UpConn::Tls(s) => s.write_all(buf).await,
        }
    }

    pub async fn write_vectored_all<B: IoVecBuf>(&mut self, buf: B) -> BufResult<usize, B> {
        match self {
            UpConn::Plain(s) => s.write_vectored_all(buf).await,
            UpConn::Tls(s) => s.write_vectored_all(buf).await,
        }
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            UpConn::Plain(_) => Ok(()),
            UpConn::Tls(s) => s.flush().await,
        }
    }
}

/// Opens a connection to `provider`, trying its resolved addresses in turn (starting at `start`).
pub async fn connect(
    provider: &ProviderRuntime,
    start: usize,
    timeout: Duration,
) -> Result<UpConn> {
    let addrs = provider.addrs.load_full();
    if addrs.is_empty() {
        return Err(Error::upstream_unreachable(format!(
            "provider {}: upstream address {} not resolved",
            provider.name, provider.base.host
        )));
    }
    let mut last_err = String::new();
    for i in 0..addrs.len() {
        let addr: SocketAddr = addrs[(start + i) % addrs.len()];
        match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
            Ok(Ok(tcp)) => {
                let _ = tcp.set_nodelay(true);
                return match &provider.tls {
                    None => Ok(UpConn::Plain(tcp)),
                    Some((cfg, name)) => {
                        let connector = monoio_rustls::TlsConnector::from(Arc::clone(cfg));
                        match monoio::time::timeout(timeout, connector.connect(name.clone(), tcp))
                            .await
                        {
                            Ok(Ok(tls)) => Ok(UpConn::Tls(Box::new(tls))),
                            Ok(Err(e)) => Err(Error::upstream_unreachable(format!(
                                "provider {}: TLS handshake with {} failed: {e}",
                                provider.name, provider.base.host
                            ))),
                            Err(_) => Err(Error::upstream_timeout(format!(
                                "provider {}: TLS handshake timed out",
                                provider.name
                            ))),
                        }
                    }
                };
            }
            Ok(Err(e)) => last_err = format!("connect to {addr} failed: {e}"),
            Err(_) => last_err = format!("connect to {addr} timed out"),
        }
    }
    Err(Error::upstream_unreachable(format!(
        "provider {}: {last_err}",
        provider.name
    )))
}

type IdleList = Vec<(UpConn, quanta::Instant)>;

/// A core's idle upstream connections.
#[derive(Debug)]
pub struct Pool {
    idle: RefCell<HashMap<Arc<str>, IdleList>>,
    max_idle: usize,
    idle_timeout: Duration,
    /// Round-robin start for address selection.
    rr: Cell<usize>,
}

impl Pool {
    pub fn new(max_idle: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: RefCell::new(HashMap::new()),
            max_idle,
            idle_timeout,
            rr: Cell::new(0),
        }
    }

    /// A pooled connection for `key`, newest first; connections idle past the timeout are dropped.
    pub fn take(&self, key: &Arc<str>) -> Option<UpConn> {
        let mut idle = self.idle.borrow_mut();
        let list = idle.get_mut(key)?;
        let now = quanta::Instant::now();
        while let Some((conn, since)) = list.pop() {
            if now.duration_since(since) < self.idle_timeout {
                return Some(conn);
            }
        }
        None
    }

    /// Returns a connection whose last response was read completely and which the upstream keeps open.
    pub fn put(&self, key: &Arc<str>, conn: UpConn) {
        let mut idle = self.idle.borrow_mut();
        let list = idle.entry(Arc::clone(key)).or_default();
        if list.len() >= self.max_idle {
            list.remove(0);
        }
        list.push((conn, quanta::Instant::now()));
    }

    pub fn next_rr(&self) -> usize {
        let v = self.rr.get();
        self.rr.set(v.wrapping_add(1));
        v
    }

    /// Drops connections idle past the timeout; called by the core's ticker.
    pub fn sweep(&self) {
        let now = quanta::Instant::now();
        let mut idle = self.idle.borrow_mut();
        for list in idle.values_mut() {
            list.retain(|(_, since)| now.duration_since(*since) < self.idle_timeout);
        }
    }

    pub fn idle_count(&self) -> usize {
        self.idle.borrow().values().map(Vec::len).sum()
    }
}
