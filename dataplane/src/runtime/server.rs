//! Thread-per-core serving: one `monoio` worker per core (pinned when it owns the machine), each with its own SO_REUSEPORT listener.
//!
//! Owns: listener creation (the first socket binds, possibly to port 0, and the others join its actual port
//! with SO_REUSEPORT, so the kernel spreads connections across cores), worker threads and their runtimes
//! (io_uring where the kernel allows, epoll otherwise, as `server.driver` says), each worker's accept loop,
//! connection loop and 50 ms housekeeping ticker, graceful shutdown, and the control side's handle on the
//! cores' budget inboxes ([`Workers::rekey`], for reloads). The connection loop moves a keep-alive connection
//! once to the core that owns its caller's budgets, and serves connections handed to this core
//! ([`crate::net::handoff`]); each core logs its `connection_handoff` counts every 10 s when they changed, and
//! at shutdown.
//!
//! Shutdown: when the shared flag is set, each worker stops accepting, lets in-flight requests finish (their
//! responses carry `connection: close`) until `server.shutdown_grace_ms`, flushes its log buffer and returns;
//! idle keep-alive connections are closed when its runtime drops.
//! Fails: listener or runtime creation errors are returned from [`start`] before any worker serves.
//! Cost: nothing shared between workers on the request path but the snapshot's atomic load.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use monoio::net::{TcpListener, TcpStream};
use socket2::{Domain, Protocol, Socket, Type};
use tollgate_core::budget::BudgetSet;
use tollgate_core::config::{Config, DriverChoice};

use crate::net::client::ClientIo;
use crate::net::handoff::{self, Handoff};
use crate::obs::accesslog::{CoreLog, Logger};
use crate::pipeline::{self, Core};
use crate::runtime::snapshot::Published;

/// A running set of workers.
#[derive(Debug)]
pub struct Workers {
    pub addrs: Vec<SocketAddr>,
    pub driver: &'static str,
    pub count: usize,
    /// Whether each worker is pinned to its own core (`server.pin_workers`).
    pub pinned: bool,
    handles: Vec<std::thread::JoinHandle<()>>,
    /// Posts to every core's budget inbox: how a reload reaches the ledger shards.
    postman: Option<crate::runtime::mailbox::Postman<crate::runtime::inbox::Msg>>,
    /// Where each core publishes its metrics (read at scrape time: [`crate::obs::metrics::merge_slots`]).
    pub metrics: Vec<crate::obs::metrics::Slot>,
}

impl Workers {
    pub(crate) fn empty() -> Workers {
        Workers {
            addrs: Vec::new(),
            driver: "none",
            count: 0,
            pinned: false,
            handles: Vec::new(),
            postman: None,
            metrics: Vec::new(),
        }
    }

    /// Asks every core to rekey its budget ledger to `budgets`; returns the cores the message could not
    /// reach (inbox full or closed) with the reason.
    pub fn rekey(&self, budgets: &Arc<BudgetSet>) -> Vec<(usize, String)> {
        let Some(p) = &self.postman else {
            return Vec::new();
        };
        (0..p.cores())
            .filter_map(|core| {
                p.send(core, crate::runtime::inbox::Msg::Rekey(Arc::clone(budgets)))
                    .err()
                    .map(|e| (core, e.to_string()))
            })
            .collect()
    }

    /// Waits for every worker to return (after the shutdown flag is set).
    pub fn join(self) {
        for h in self.handles {
            let _ = h.join();
        }
    }
}

fn listener_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s)
}

/// Binds one listener per worker per address. Returns the actual addresses and, per worker, its listeners.
fn bind_all(
    listen: &[SocketAddr],
    workers: usize,
) -> std::io::Result<(Vec<SocketAddr>, Vec<Vec<std::net::TcpListener>>)> {
    let mut actual = Vec::new();
    let mut per_worker: Vec<Vec<std::net::TcpListener>> =
        (0..workers).map(|_| Vec::new()).collect();
    for &addr in listen {
        let first = listener_socket(addr)?;
        let bound = first
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("listener has no inet address"))?;
        actual.push(bound);
        for (i, slot) in per_worker.iter_mut().enumerate() {
            let s = if i == 0 {
                first.try_clone()?
            } else {
                listener_socket(bound)?
            };
            slot.push(s.into());
        }
    }
    Ok((actual, per_worker))
}

/// Which driver a worker will actually use.
pub fn resolve_driver(choice: DriverChoice) -> std::io::Result<&'static str> {
    let uring = monoio::utils::detect_uring();
    match choice {
        DriverChoice::Auto if uring => Ok("io_uring"),
        DriverChoice::Auto | DriverChoice::Epoll => Ok("epoll"),
        DriverChoice::IoUring if uring => Ok("io_uring"),
        DriverChoice::IoUring => Err(std::io::Error::other(
            "server.driver = \"io_uring\" but this kernel does not allow io_uring",
        )),
    }
}

/// What the cores need of the spend ledger: the channel to its thread, its health, where to journal, and
/// the stored spend their budgets start from.
#[derive(Debug, Clone)]
pub struct Spend {
    pub tx: crossbeam_channel::Sender<crate::spend::records::ToLedger>,
    pub health: Arc<crate::spend::committer::Health>,
    pub run: String,
    pub journal_dir: std::path::PathBuf,
    pub history: Arc<Vec<tollgate_core::store::ledger::SlotSpend>>,
    pub fail_closed_after: Duration,
    /// Fleet mode: the budget leases' TTL (ms); `None` outside fleet mode.
    pub fleet_ttl_ms: Option<i64>,
    /// Fleet mode: `ledger.clock_offset_ms`, added to the wall clock for lease decisions.
    pub fleet_clock_offset_ms: i64,
    /// The ledger thread, woken when a request waits on a lease answer.
    pub ledger_thread: Option<std::thread::Thread>,
}

/// Starts the workers. They run until `shutdown` is set.
pub fn start(
    config: &Config,
    snapshot: Published,
    auth: crate::runtime::credentials::AuthHandle,
    webhooks: Option<crate::obs::webhook::WebhookSender>,
    logger: &Logger,
    shutdown: Arc<AtomicBool>,
    spend: Spend,
) -> std::io::Result<Workers> {
    let available = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let count = match config.server.workers {
        0 => available,
        n => n,
    };
    let pin = config.server.pin_workers.unwrap_or(count == available);
    let driver = resolve_driver(config.server.driver)?;
    let (addrs, listeners) = bind_all(&config.server.listen, count)?;
    let cores = if pin {
        core_affinity::get_core_ids().unwrap_or_default()
    } else {
        Vec::new()
    };
    let seed = process_seed();
    // Budget shards talk over per-core mailboxes (see crate::spend::shard).
    let (postman, inboxes) =
        crate::runtime::mailbox::mailboxes::<crate::runtime::inbox::Msg>(count, 65_536)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    if spend.fleet_ttl_ms.is_some() {
        // Fleet mode: the ledger thread answers the cores' lease asks through their mailboxes.
        spend
            .tx
            .send(crate::spend::records::ToLedger::Cores(postman.clone()))
            .map_err(|e| std::io::Error::other(format!("the ledger thread is gone: {e}")))?;
    }
    let mut handles = Vec::with_capacity(count);
    let slots: Vec<crate::obs::metrics::Slot> = (0..count).map(|_| Default::default()).collect();
    for (i, (ls, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let slot = Arc::clone(&slots[i]);
        let postman = postman.clone();
        let webhooks = webhooks.clone();
        let spend = spend.clone();
        let budget_set = Arc::clone(&config.budgets);
        let core_id = if cores.is_empty() {
            None
        } else {
            Some(cores[i % cores.len()])
        };
        let snapshot = Arc::clone(&snapshot);
        let auth = auth.clone();
        let logger = logger.clone();
        let shutdown = Arc::clone(&shutdown);
        let server = config.server.clone();
        let upstream = config.upstream.clone();
        let access_log = config.log.access_log;
        let h = std::thread::Builder::new()
            .name(format!("tollgate-w{i}"))
            .spawn(move || {
                if let Some(c) = core_id {
                    core_affinity::set_for_current(c);
                }
                let log = CoreLog::new(logger.clone(), access_log);
                let mut budgets = crate::spend::shard::CoreBudgets::new(
                    i,
                    postman,
                    logger.clone(),
                    webhooks,
                    server.budget_slices,
                );
                budgets.set_spend(
                    crate::spend::journal::Journal::new(
                        &spend.journal_dir,
                        &format!("{}-c{i}", spend.run),
                        spend.tx.clone(),
                    ),
                    Arc::clone(&spend.health),
                    spend.fail_closed_after,
                );
                if let Some(ttl) = spend.fleet_ttl_ms {
                    budgets.set_fleet(
                        spend.tx.clone(),
                        spend.ledger_thread.clone(),
                        ttl,
                        spend.fleet_clock_offset_ms,
                    );
                }
                budgets.preload(&budget_set, &spend.history);
                let budgets = Rc::new(budgets);
                let mut core = Core::new(
                    i,
                    crate::pipeline::Shared {
                        snapshot,
                        auth,
                        shutdown,
                    },
                    log,
                    server,
                    upstream,
                    budgets,
                    seed,
                );
                core.metrics = crate::obs::metrics::CoreMetrics::new(slot);
                let core = Rc::new(core);
                let res = if driver == "io_uring" {
                    uring_runtime()
                        .map(|mut rt| rt.block_on(worker_main(Rc::clone(&core), ls, inbox)))
                } else {
                    monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
                        .enable_timer()
                        .build()
                        .map(|mut rt| rt.block_on(worker_main(Rc::clone(&core), ls, inbox)))
                };
                if let Err(e) = res {
                    logger.event(
                        "worker_failed",
                        &[("worker", &i.to_string()), ("error", &e.to_string())],
                    );
                }
                core.log.flush();
            })?;
        handles.push(h);
    }
    Ok(Workers {
        addrs,
        driver,
        count,
        pinned: !cores.is_empty(),
        handles,
        postman: Some(postman),
        metrics: slots,
    })
}

fn process_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish() as u32
}

/// A one-shot, core-local signal that many tasks can wait on.
#[derive(Default)]
struct LocalSignal {
    fired: Cell<bool>,
    wakers: RefCell<Vec<Waker>>,
}

impl LocalSignal {
    fn fire(&self) {
        self.fired.set(true);
        for w in self.wakers.borrow_mut().drain(..) {
            w.wake();
        }
    }

    async fn wait(&self) {
        std::future::poll_fn(|cx| {
            if self.fired.get() {
                return Poll::Ready(());
            }
            let mut ws = self.wakers.borrow_mut();
            if !ws.iter().any(|w| w.will_wake(cx.waker())) {
                ws.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

async fn worker_main(
    core: Rc<Core>,
    listeners: Vec<std::net::TcpListener>,
    inbox: crate::runtime::mailbox::Inbox<crate::runtime::inbox::Msg>,
) {
    let stop = Rc::new(LocalSignal::default());
    core.budgets.set_adopter(adopter(&core));
    let shard = Rc::downgrade(&core.budgets);
    monoio::spawn(async move {
        if let Err(e) = crate::spend::shard::CoreBudgets::serve(shard.clone(), inbox).await {
            if let Some(b) = shard.upgrade() {
                b.log_error("budget_inbox_failed", &e.to_string());
            }
        }
    });
    let mut accepting = Vec::new();
    for l in listeners {
        match TcpListener::from_std(l) {
            Ok(l) => accepting.push(monoio::spawn(accept_loop(
                Rc::clone(&core),
                l,
                Rc::clone(&stop),
            ))),
            Err(e) => core
                .log
                .logger()
                .event("listener_failed", &[("error", &e.to_string())]),
        }
    }
    // Housekeeping: flush the log buffer, sweep idle upstream connections, watch the shutdown flag.
    let mut ticks = 0u64;
    while !core.shutting_down() {
        monoio::time::sleep(Duration::from_millis(50)).await;
        core.log.flush();
        core.budgets.tick();
        core.metrics.publish(core.handoff.snapshot(), false);
        ticks += 1;
        if ticks.is_multiple_of(20) {
            core.pool.sweep();
        }
        if ticks.is_multiple_of(200) {
            core.handoff.log(core.log.logger(), core.id, false);
        }
    }
    stop.fire();
    for a in accepting {
        a.await;
    }
    let deadline = quanta::Instant::now() + core.server.shutdown_grace;
    while core.in_flight.get() > 0 && quanta::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    core.handoff.log(core.log.logger(), core.id, true);
    core.metrics.publish(core.handoff.snapshot(), true);
    core.log.flush();
}

async fn accept_loop(core: Rc<Core>, listener: TcpListener, stop: Rc<LocalSignal>) {
    loop {
        let mut accept = std::pin::pin!(listener.accept());
        let mut stopped = std::pin::pin!(stop.wait());
        let next = std::future::poll_fn(|cx| {
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
            accept.as_mut().poll(cx).map(Some)
        })
        .await;
        match next {
            None => return,
            Some(Ok((stream, _peer))) => {
                monoio::spawn(serve_conn(Rc::clone(&core), stream, Bytes::new(), false));
            }
            Some(Err(e)) => {
                // EMFILE and friends: back off briefly instead of spinning.
                core.log
                    .logger()
                    .event("accept_failed", &[("error", &e.to_string())]);
                monoio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Serves one client connection until it closes or moves to another core. `buffered`: bytes already read
/// off it (by the core that handed it over); `handed_off`: it moved once already and never moves again.
async fn serve_conn(core: Rc<Core>, stream: TcpStream, buffered: Bytes, handed_off: bool) {
    let _ = stream.set_nodelay(true);
    let mut io = ClientIo::with_buffered(stream, &buffered);
    drop(buffered);
    io.handed_off = handed_off;
    while pipeline::run_one(&core, &mut io).await {
        // Between requests: nothing is being written, and a next request read early stays in `io.buf`.
        let Some(owner) = io.owner.filter(|&o| o != core.id) else {
            continue;
        };
        match handoff::hand_off(
            io,
            core.id,
            owner,
            &core.handoff,
            core.log.logger(),
            |stream, buffered| core.budgets.post_adopt(owner, stream, buffered),
        )
        .await
        {
            Handoff::Handed | Handoff::Closed => return,
            Handoff::Kept(kept) => io = kept,
        }
    }
}

/// What this core does with a connection another core hands it: serve it here, never to move again.
fn adopter(core: &Rc<Core>) -> crate::runtime::inbox::Adopter {
    let weak = Rc::downgrade(core);
    Box::new(move |stream: std::net::TcpStream, buffered: Bytes| {
        let Some(core) = weak.upgrade() else {
            return;
        };
        match TcpStream::from_std(stream) {
            Ok(s) => {
                handoff::bump(&core.handoff.adopted);
                monoio::spawn(serve_conn(core, s, buffered, true));
            }
            Err(e) => {
                handoff::bump(&core.handoff.failed);
                core.log.logger().event(
                    "handoff_failed",
                    &[("core", &core.id.to_string()), ("error", &e.to_string())],
                );
            }
        }
    })
}

/// A core's io_uring runtime. Cooperative task running (`IORING_SETUP_COOP_TASKRUN`, Linux 5.19): a
/// completion that arrives while the core is busy waits for the core's next entry into the kernel (it
/// enters on every turn of its loop) instead of interrupting it with an inter-processor interrupt; the
/// profile in docs/benchmarks.md showed those interrupts and their reschedules at ~3% of a core.
/// Older kernels refuse the flag: the ring is then built without it.
fn uring_runtime(
) -> std::io::Result<monoio::Runtime<monoio::time::TimeDriver<monoio::IoUringDriver>>> {
    let mut urb = io_uring::IoUring::builder();
    urb.setup_coop_taskrun().setup_taskrun_flag();
    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
        .uring_builder(urb)
        .with_entries(1024)
        .enable_timer()
        .build()
        .or_else(|_| {
            monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .with_entries(1024)
                .enable_timer()
                .build()
        })
}
