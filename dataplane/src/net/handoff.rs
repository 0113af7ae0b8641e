//! Handing a keep-alive connection to the core that owns its caller's budgets.
//!
//! Owns: the move of a client connection between cores, and the per-core [`Counters`] of it. After a request
//! on a keep-alive connection whose caller is not anonymous, when budgets are configured and the core that
//! owns the caller's budgets ([`crate::spend::shard::owner_of_member`]) is another one, the connection loop
//! (`server::serve_conn`) detaches the connection ([`ClientIo::detach`]: the read in flight is cancelled and
//! awaited, so bytes already read, a pipelined next request included, stay with it), turns the socket into a
//! `std::net::TcpStream` and posts it with those bytes to the owner as [`crate::runtime::inbox::Msg::Adopt`]; the
//! owner spawns the connection loop for it. From then on the caller's reservations and settlements are
//! function calls on the owner's ledger instead of cross-core asks. A connection moves at most once (a
//! connection shared by several callers does not ping-pong); `server.handoff = false` turns it off.
//!
//! Unsafe: this module's one `unsafe` block, `std::net::TcpStream::from_raw_fd`. monoio's `TcpStream` has
//! a safe `from_std` but no `into_std`, no `OwnedFd` conversion, only `IntoRawFd`; std's `TcpStream` (which
//! is `Send`, unlike monoio's) can be made from a raw descriptor only unsafely. The crate root denies
//! `unsafe_code`; `into_std` alone allows it, as the `IoVecBuf` impl in [`crate::net::iovec`] does.
//!
//! Fails: a full or closed mailbox gives the connection back, and it is served where it is (and may try
//! again after its next request); a client that closes while the read is cancelled ends the connection; an
//! owner that cannot register the socket (or has no adopter yet) logs `handoff_failed` / `handoff_dropped`
//! and closes it (the client sees a closed keep-alive connection and reconnects).
//! Cost: once per connection, one read cancellation (an io_uring cancel op), a deregistration and
//! registration of the descriptor, and one mailbox message (~18 us to wake the owner, see
//! [`crate::runtime::mailbox`]); against ~15 us saved on every later budgeted request (a cross-core ask becomes a
//! local call; see docs/benchmarks.md for the measured share of requests served on their owner).

use std::cell::Cell;
use std::os::fd::{FromRawFd, IntoRawFd};

use monoio::net::TcpStream;

use crate::net::client::{ClientIo, Detached};
use crate::obs::accesslog::Logger;

/// What became of a connection the loop tried to hand off.
#[derive(Debug)]
pub enum Handoff {
    /// The owner has it now.
    Handed,
    /// The client closed (or the socket failed) meanwhile.
    Closed,
    /// The owner could not take it (mailbox full or closed): keep serving it here.
    Kept(ClientIo),
}

/// Per-core counts, logged as the `connection_handoff` event.
#[derive(Debug, Default)]
pub struct Counters {
    /// Budgeted requests served on the core that owns their caller's budgets.
    pub owner_local: Cell<u64>,
    /// Budgeted requests served on another core (their reservations were cross-core asks).
    pub owner_remote: Cell<u64>,
    /// Connections this core handed to their owner.
    pub handed_off: Cell<u64>,
    /// Connections this core adopted from another.
    pub adopted: Cell<u64>,
    /// Handoffs that did not happen (mailbox full or closed, or the socket could not be moved).
    pub failed: Cell<u64>,
    /// The sum of the counts when they were last logged.
    logged: Cell<u64>,
}

/// Adds one to a counter.
pub fn bump(c: &Cell<u64>) {
    c.set(c.get().wrapping_add(1));
}

impl Counters {
    /// owner_local, owner_remote, handed_off, adopted, failed: what `/metrics` exposes.
    pub fn snapshot(&self) -> [u64; 5] {
        [
            self.owner_local.get(),
            self.owner_remote.get(),
            self.handed_off.get(),
            self.adopted.get(),
            self.failed.get(),
        ]
    }

    fn total(&self) -> u64 {
        [
            &self.owner_local,
            &self.owner_remote,
            &self.handed_off,
            &self.adopted,
            &self.failed,
        ]
        .iter()
        .map(|c| c.get())
        .fold(0u64, u64::wrapping_add)
    }

    /// Logs the `connection_handoff` event with this core's counts; unless `force`, only when they changed.
    pub fn log(&self, logger: &Logger, core: usize, force: bool) {
        let total = self.total();
        if !force && total == self.logged.get() {
            return;
        }
        self.logged.set(total);
        logger.event(
            "connection_handoff",
            &[
                ("core", &core.to_string()),
                ("connection_handoff", &self.handed_off.get().to_string()),
                ("adopted", &self.adopted.get().to_string()),
                ("handoff_failed", &self.failed.get().to_string()),
                ("owner_local", &self.owner_local.get().to_string()),
                ("owner_remote", &self.owner_remote.get().to_string()),
            ],
        );
    }
}

/// A connection on its way to another core, as the owner's inbox carries it: the socket and the bytes
/// already read from it.
pub type Moving = (std::net::TcpStream, bytes::Bytes);

/// Moves `io` to core `owner` through `post` (which puts it in the owner's inbox, or gives it back with the
/// reason). Call only between requests (nothing half-written; a half-read next request is fine: its bytes
/// travel). `core` is this core's id, for the log.
pub async fn hand_off<E: std::fmt::Display>(
    io: ClientIo,
    core: usize,
    owner: usize,
    counters: &Counters,
    logger: &Logger,
    post: impl FnOnce(std::net::TcpStream, bytes::Bytes) -> Result<(), (E, Option<Moving>)>,
) -> Handoff {
    let (stream, buffered) = match io.detach().await {
        Detached::Socket(s, b) => (s, b),
        Detached::Closed => return Handoff::Closed,
    };
    let stream = into_std(stream);
    match post(stream, buffered) {
        Ok(()) => {
            bump(&counters.handed_off);
            Handoff::Handed
        }
        Err((e, back)) => {
            bump(&counters.failed);
            logger.event(
                "handoff_failed",
                &[
                    ("core", &core.to_string()),
                    ("owner", &owner.to_string()),
                    ("error", &e.to_string()),
                ],
            );
            let Some((stream, buffered)) = back else {
                return Handoff::Closed;
            };
            match TcpStream::from_std(stream) {
                Ok(s) => {
                    let mut io = ClientIo::with_buffered(s, &buffered);
                    io.handed_off = false;
                    Handoff::Kept(io)
                }
                Err(_) => Handoff::Closed,
            }
        }
    }
}

/// Takes the descriptor out of monoio (deregistering it from the epoll driver where it was registered) and
/// gives it to a std stream, which is `Send` and closes it when dropped.
#[allow(unsafe_code)]
fn into_std(stream: TcpStream) -> std::net::TcpStream {
    // Precondition of monoio's `into_raw_fd` (it panics otherwise): no other handle on the descriptor. Met:
    // the halves were reunited and `ClientIo::detach` awaited the last read, so no operation holds it.
    let fd = stream.into_raw_fd();
    // SAFETY: `fd` is an open TCP socket that `into_raw_fd` released: monoio no longer owns, closes or
    // polls it, and nothing else refers to it, so the std stream becomes its one owner and closes it once.
    unsafe { std::net::TcpStream::from_raw_fd(fd) }
}
