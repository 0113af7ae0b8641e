//! The client connection: its write half, its read buffer, and its one outstanding read.
//!
//! Owns: [`ClientIo`]. A connection has at most one read in flight, and that read does two jobs: while the
//! forward phase waits on the upstream it watches for a disconnect (EOF or reset means the client is gone and
//! the upstream request is cancelled), and when the response is done it simply stays pending and becomes the
//! read of the next request's head. So a keep-alive request costs one client read, not a read plus a
//! watch-read plus its cancellation (two io_uring operations and a completion fewer per request; see
//! docs/benchmarks.md).
//!
//! Fails: read errors come back as `Err` from [`ClientIo::read_more`]; a read that ends in EOF or an error
//! while watching turns [`ClientIo::guard`] into [`ClientGone`]. Bytes a client sends early (pipelining) are
//! kept in the buffer for the next request. Cost: one boxed future per read.
//!
//! Handoff: [`ClientIo::detach`] takes the connection apart between requests so it can move to another core
//! (see [`crate::net::handoff`]): the read in flight is cancelled and awaited (its bytes, if it completed first,
//! are kept), so the socket leaves with every byte read but not consumed. Reads are cancelable for this,
//! through one `Canceller` per connection (an `Rc` clone and a set insert per read).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Bytes, BytesMut};
use monoio::buf::IoBufMut;
use monoio::io::{CancelHandle, CancelableAsyncReadRent, Canceller, OwnedReadHalf, OwnedWriteHalf};
use monoio::net::TcpStream;

/// How much spare capacity a client read asks for.
const READ_CHUNK: usize = 16 * 1024;

type ReadFuture = Pin<Box<dyn Future<Output = ReadDone>>>;

struct ReadDone {
    res: std::io::Result<usize>,
    buf: BytesMut,
    rd: OwnedReadHalf<TcpStream>,
}

enum ReadSide {
    /// No read in flight.
    Idle(OwnedReadHalf<TcpStream>),
    /// A read in flight; it owns the read half and the buffer until it completes.
    Reading(ReadFuture),
    /// The read half was lost with a dropped read (only after a timeout, when the connection is closing).
    Gone,
}

/// The client has disconnected (or its socket failed) while the gateway was working for it.
#[derive(Debug)]
pub struct ClientGone;

/// A client connection, split so the gateway can watch for a disconnect while it writes.
pub struct ClientIo {
    rd: ReadSide,
    pub wr: OwnedWriteHalf<TcpStream>,
    /// Bytes read but not yet consumed (a pipelined next request stays here). Empty while a read is in
    /// flight (the read owns the buffer then).
    pub buf: BytesMut,
    /// The last read in flight completed with end-of-stream or an error.
    closed: bool,
    /// Cancels the read in flight when the connection is detached for a handoff.
    canceller: Canceller,
    /// The connection was handed to another core once already (it is never handed again).
    pub handed_off: bool,
    /// The core owning the budgets of the last request's caller, where a handoff could apply.
    pub owner: Option<usize>,
}

/// A connection taken apart by [`ClientIo::detach`].
#[derive(Debug)]
pub enum Detached {
    /// The socket, with the bytes read but not yet consumed.
    Socket(TcpStream, Bytes),
    /// The client closed (or the socket failed) while the read was being cancelled.
    Closed,
}

/// Appends a cancelable read into the spare capacity of `buf`, like [`crate::net::bufio::read_append`].
async fn read_append_cancelable(
    rd: &mut OwnedReadHalf<TcpStream>,
    mut buf: BytesMut,
    min_spare: usize,
    c: CancelHandle,
) -> (std::io::Result<usize>, BytesMut) {
    if buf.capacity() - buf.len() < min_spare.max(1) {
        buf.reserve(min_spare.max(1));
    }
    let (len, cap) = (buf.len(), buf.capacity());
    let (res, slice) = rd.cancelable_read(buf.slice_mut(len..cap), c).await;
    (res, slice.into_inner())
}

impl std::fmt::Debug for ClientIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIo")
            .field("buffered", &self.buf.len())
            .field("reading", &matches!(self.rd, ReadSide::Reading(_)))
            .field("closed", &self.closed)
            .finish()
    }
}

impl ClientIo {
    pub fn new(stream: TcpStream) -> ClientIo {
        ClientIo::with_buffered(stream, &[])
    }

    /// A connection whose first bytes were read already (by the core that handed it over).
    pub fn with_buffered(stream: TcpStream, buffered: &[u8]) -> ClientIo {
        use monoio::io::Splitable;
        let (rd, wr) = stream.into_split();
        let mut buf = BytesMut::with_capacity(READ_CHUNK.max(buffered.len()));
        buf.extend_from_slice(buffered);
        ClientIo {
            rd: ReadSide::Idle(rd),
            wr,
            buf,
            closed: false,
            canceller: Canceller::new(),
            handed_off: false,
            owner: None,
        }
    }

    /// Takes the connection apart between requests: cancels the read in flight and waits for it to end
    /// (bytes it read before the cancellation took are kept), then reunites the socket's halves.
    pub async fn detach(mut self) -> Detached {
        if let ReadSide::Reading(_) = self.rd {
            let ReadSide::Reading(fut) = std::mem::replace(&mut self.rd, ReadSide::Gone) else {
                return Detached::Closed;
            };
            self.canceller = std::mem::take(&mut self.canceller).cancel();
            let done = fut.await;
            self.rd = ReadSide::Idle(done.rd);
            self.buf = done.buf;
            match done.res {
                Ok(0) => return Detached::Closed,
                Ok(_) => {}
                Err(e) if is_cancelled(&e) => {}
                Err(_) => return Detached::Closed,
            }
        }
        if self.closed {
            return Detached::Closed;
        }
        let ReadSide::Idle(rd) = std::mem::replace(&mut self.rd, ReadSide::Gone) else {
            return Detached::Closed;
        };
        match rd.reunite(self.wr) {
            Ok(stream) => Detached::Socket(stream, self.buf.freeze()),
            Err(_) => Detached::Closed,
        }
    }

    /// Starts a read into the buffer unless one is in flight already.
    fn start_read(&mut self) {
        if let ReadSide::Idle(_) = self.rd {
            let ReadSide::Idle(mut rd) = std::mem::replace(&mut self.rd, ReadSide::Gone) else {
                return;
            };
            let buf = std::mem::take(&mut self.buf);
            let cancel = self.canceller.handle();
            self.rd = ReadSide::Reading(Box::pin(async move {
                let (res, buf) = read_append_cancelable(&mut rd, buf, READ_CHUNK, cancel).await;
                ReadDone { res, buf, rd }
            }));
        }
    }

    /// Takes a completed read's result back into the connection.
    fn land(&mut self, done: ReadDone) -> std::io::Result<usize> {
        self.rd = ReadSide::Idle(done.rd);
        self.buf = done.buf;
        if !matches!(done.res, Ok(n) if n > 0) {
            self.closed = true;
        }
        done.res
    }

    /// Reads more bytes into `buf` (continuing a read already in flight). `Ok(0)` is end of stream. The read
    /// is not cancelled when the caller's timeout drops this future: it stays in flight.
    pub async fn read_more(&mut self) -> std::io::Result<usize> {
        self.start_read();
        let done = match &mut self.rd {
            ReadSide::Reading(fut) => fut.as_mut().await,
            ReadSide::Idle(_) | ReadSide::Gone => return Ok(0),
        };
        self.land(done)
    }

    /// Starts watching the client for a disconnect: a read goes in flight unless the client already sent
    /// more bytes (then it is alive, and its bytes stay for the next request).
    pub fn watch(&mut self) {
        if self.buf.is_empty() && !self.closed {
            self.start_read();
        }
    }

    /// Runs `f` to completion unless the client disconnects first. Bytes that arrive meanwhile are kept.
    pub async fn guard<T>(&mut self, f: impl Future<Output = T>) -> Result<T, ClientGone> {
        if self.closed {
            return Err(ClientGone);
        }
        let mut f = std::pin::pin!(f);
        let ReadSide::Reading(read) = &mut self.rd else {
            return Ok(f.await);
        };
        let first = std::future::poll_fn(|cx| {
            if let Poll::Ready(v) = f.as_mut().poll(cx) {
                return Poll::Ready(Ok(v));
            }
            if let Poll::Ready(done) = read.as_mut().poll(cx) {
                return Poll::Ready(Err(done));
            }
            Poll::Pending
        })
        .await;
        match first {
            Ok(v) => Ok(v),
            Err(done) => match self.land(done) {
                Ok(n) if n > 0 => Ok(f.await),
                _ => Err(ClientGone),
            },
        }
    }
}

/// Whether a read ended because it was cancelled: `ECANCELED` from io_uring, and from monoio itself when the
/// cancellation came first or on the epoll driver; `EINTR` leaves the socket as good as a cancellation does.
fn is_cancelled(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ECANCELED) || e.kind() == std::io::ErrorKind::Interrupted
}
