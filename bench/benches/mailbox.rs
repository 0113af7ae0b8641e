//! Cross-core ask/answer through `tollgate_dataplane::runtime::mailbox`, against the same call made on one core.
//!
//! - `baseline_same_core_call`: the owner's handler called directly (what a request does when its budget
//!   lives on its own core).
//! - `cross_core_{epoll,io_uring}`: one core asks another and awaits the answer, one ask at a time: post,
//!   doorbell, the owner wakes and answers, doorbell, the asker wakes and completes its oneshot.
//! - `cross_core_{epoll,io_uring}_16_in_flight`: 16 asks outstanding at once (per ask), as under load, where
//!   wake-ups are shared.
//!
//! Two threads, each a monoio runtime (not pinned); the bench thread drives the asking core through its
//! inbox and waits for the elapsed time on a std channel (it is not a core).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::cell::RefCell;
use std::future::Future;
use std::rc::Rc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use tollgate_dataplane::runtime::mailbox::{mailboxes, PendingReplies, Postman, Reply};

enum Msg {
    Ask {
        reply: Reply<u64>,
        x: u64,
    },
    Answer {
        id: u64,
        value: u64,
    },
    /// To the asking core: make `n` asks, `in_flight` at a time, and send back the elapsed time.
    Run {
        n: u64,
        in_flight: u64,
        done: mpsc::Sender<Duration>,
    },
}

/// The owner's work: stands for a budget reserve (a few arithmetic steps on owned state).
#[inline(never)]
fn owner_answer(state: &mut u64, x: u64) -> u64 {
    *state = state.wrapping_add(x);
    *state ^ (x >> 3)
}

fn block_on<F: Future>(uring: bool, f: F) -> F::Output {
    if uring {
        monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(256)
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    } else {
        monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap()
            .block_on(f)
    }
}

struct Pair {
    postman: Postman<Msg>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Core 0 asks, core 1 owns.
fn pair(uring: bool) -> Pair {
    let (postman, inboxes) = mailboxes::<Msg>(2, 4096).unwrap();
    let mut threads = Vec::new();
    for inbox in inboxes {
        let postman = postman.clone();
        threads.push(std::thread::spawn(move || {
            block_on(uring, async move {
                let me = inbox.core();
                let pending = Rc::new(PendingReplies::<u64>::new(me));
                let state = RefCell::new(0u64);
                let p = postman.clone();
                inbox
                    .run(move |m| match m {
                        Msg::Ask { reply, x } => {
                            let v = owner_answer(&mut state.borrow_mut(), x);
                            reply
                                .answer(&p, v, |id, value| Msg::Answer { id, value })
                                .unwrap();
                        }
                        Msg::Answer { id, value } => {
                            pending.complete(id, value);
                        }
                        Msg::Run { n, in_flight, done } => {
                            let pending = Rc::clone(&pending);
                            let p = p.clone();
                            monoio::spawn(asker(pending, p, n, in_flight, done));
                        }
                    })
                    .await
                    .unwrap();
            })
        }));
    }
    Pair { postman, threads }
}

async fn asker(
    pending: Rc<PendingReplies<u64>>,
    postman: Postman<Msg>,
    n: u64,
    in_flight: u64,
    done: mpsc::Sender<Duration>,
) {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let pending = Rc::clone(&pending);
        let postman = postman.clone();
        tasks.push(monoio::spawn(async move {
            for i in 0..n {
                let x = t * n + i;
                let v = pending
                    .ask(&postman, 1, |reply| Msg::Ask { reply, x })
                    .await
                    .unwrap();
                black_box(v);
            }
        }));
    }
    for t in tasks {
        t.await;
    }
    let _ = done.send(start.elapsed());
}

impl Pair {
    fn run(&self, n: u64, in_flight: u64) -> Duration {
        let (tx, rx) = mpsc::channel();
        self.postman
            .send(
                0,
                Msg::Run {
                    n,
                    in_flight,
                    done: tx,
                },
            )
            .unwrap();
        rx.recv().unwrap()
    }

    fn stop(self) {
        self.postman.close();
        drop(self.postman);
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

fn round_trip(c: &mut Criterion) {
    let mut g = c.benchmark_group("mailbox_round_trip");
    g.bench_function("baseline_same_core_call", |b| {
        let mut state = 0u64;
        let mut x = 0u64;
        b.iter(|| {
            x += 1;
            black_box(owner_answer(&mut state, black_box(x)))
        })
    });
    let mut drivers = vec![("epoll", false)];
    if monoio::utils::detect_uring() {
        drivers.push(("io_uring", true));
    }
    for (name, uring) in drivers {
        let p = pair(uring);
        g.throughput(Throughput::Elements(1));
        g.bench_function(format!("cross_core_{name}"), |b| {
            b.iter_custom(|iters| p.run(iters, 1))
        });
        // Each iteration is 16 asks in flight together; the time reported is per ask.
        g.bench_function(format!("cross_core_{name}_16_in_flight"), |b| {
            b.iter_custom(|iters| p.run(iters, 16) / 16)
        });
        p.stop();
    }
    g.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
