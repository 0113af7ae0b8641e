//! A deterministic simulation of a fleet sharing budgets through [`super`]'s leases: N nodes, one
//! in-memory store with FoundationDB's semantics, virtual time in milliseconds, and injected faults
//! (commits that fail, commits whose outcome is unknown, applied or not, store outages, node crashes and
//! restarts, clock skew). Seeded and replayable: `TOLLGATE_SIM_SEED=n` runs one seed and prints its trace
//! summary; `TOLLGATE_SIM_SEEDS=n` runs that many (default 2,000).
//!
//! Invariants checked after every seed:
//! 1. fleet spend never exceeds the limit by more than the documented bound (the spend crashed or cut-off
//!    nodes had not committed, and the holds of requests in flight when a lease ran out unrenewed);
//! 2. nothing is counted twice and no settled request goes unbilled: the store's spend equals the sum of
//!    every settled request's actual cost, exactly;
//! 3. once nodes recover and give their leases back, no lease is left and the rest of the budget can be
//!    leased again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use crate::store::fleet::*;
use crate::store::ledger::Batch;
use crate::store::ledger::{self, InstanceName};
use crate::store::mem::{Fault, MemStore};
use crate::store::{transact, RetryPolicy};

const TTL_MS: i64 = 1_000;
const MAX_SKEW_MS: i64 = 200;
const COMMIT_MS: i64 = 50;
const RUN_MS: i64 = 3_000;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, per_million: u64) -> bool {
        self.below(1_000_000) < per_million
    }
}

#[derive(Default)]
struct Lease {
    avail: i128,
    expires_local: i64,
    last_added: i128,
}

struct Flight {
    done_at: i64,
    reserved: i128,
    actual: i128,
}

struct Node {
    id: u64,
    skew: i64,
    alive: bool,
    restart_at: i64,
    run: u32,
    lease: Option<Lease>,
    flights: Vec<Flight>,
    /// Settled, journaled, not yet in a batch: (seq, amount).
    unbatched: Vec<(u64, i128)>,
    /// The journal survives crashes: every settled entry of every run, by source.
    journal: Vec<(String, u64, i128)>,
    /// A batch that was attempted, retried as it is.
    pending: Option<(Batch, i128)>,
    seq: u64,
    next_commit: i64,
    /// The lease ran out unrenewed while this much was uncommitted or in flight (the overshoot bound).
    exposure: i128,
    /// After the store refused a lease, requests are refused here without asking again until then (a
    /// node does not ask the store once per request at the limit).
    refused_until: i64,
}

impl Node {
    fn source(&self) -> String {
        format!("n{}-r{}", self.id, self.run)
    }
}

struct World {
    rng: Rng,
    store: MemStore,
    w: WindowRef,
    nodes: Vec<Node>,
    down_until: i64,
    settled_total: i128,
    allowed_overshoot: i128,
    stats: Stats,
}

#[derive(Default, Debug, Clone, Copy)]
struct Stats {
    admitted: u64,
    refused: u64,
    acquires: u64,
    commits: u64,
    crashes: u64,
    outages: u64,
    unknown: u64,
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        backoff: std::time::Duration::ZERO,
        max_backoff: std::time::Duration::ZERO,
    }
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let n = 2 + rng.below(5);
        let nodes = (0..n)
            .map(|id| Node {
                id,
                skew: rng.below(MAX_SKEW_MS as u64) as i64 - MAX_SKEW_MS / 2,
                alive: true,
                restart_at: 0,
                run: 0,
                lease: None,
                flights: Vec::new(),
                unbatched: Vec::new(),
                journal: Vec::new(),
                pending: None,
                seq: 0,
                next_commit: COMMIT_MS + id as i64,
                exposure: 0,
                refused_until: 0,
            })
            .collect();
        World {
            rng,
            store: MemStore::new(),
            w: WindowRef {
                instance: InstanceName {
                    budget: "team".into(),
                    member: String::new(),
                },
                start: 0,
                end: 1_000_000_000,
                limit: 2_000_000 + 200_000 * n as i128,
            },
            nodes,
            down_until: -1,
            settled_total: 0,
            allowed_overshoot: 0,
            stats: Stats::default(),
        }
    }

    /// Maybe arms a fault for the next transaction.
    fn arm_fault(&mut self, t: i64) {
        if t < self.down_until {
            self.store.inject(Fault::Down);
            return;
        }
        self.store.clear_faults();
        match self.rng.below(100) {
            0..=4 => self.store.inject(Fault::FailCommit),
            5..=7 => {
                self.stats.unknown += 1;
                self.store.inject(Fault::UnknownCommit { applied: true })
            }
            8..=10 => {
                self.stats.unknown += 1;
                self.store.inject(Fault::UnknownCommit { applied: false })
            }
            _ => {}
        }
    }

    fn acquire(&mut self, i: usize, t: i64, need: i128) -> Option<LeaseGrant> {
        self.arm_fault(t);
        self.stats.acquires += 1;
        let node = &self.nodes[i];
        let local = t + node.skew;
        let want = 100_000;
        let ask = Ask {
            node: node.id,
            need,
            want,
            nodes: self.nodes.len() as u64,
            now_ms: local,
            ttl_ms: TTL_MS,
            max_skew_ms: MAX_SKEW_MS,
        };
        let w = self.w.clone();
        let got = transact(&self.store, &policy(), |txn| acquire(txn, &w, &ask)).ok()??;
        let n = &mut self.nodes[i];
        // The store's lease is the unspent amount: what is left for new requests is that, less what
        // requests in flight hold and what is settled but not yet committed (an expired lease that was
        // reclaimed meanwhile comes back smaller than the node remembers).
        let usage = n.flights.iter().map(|f| f.reserved).sum::<i128>()
            + n.unbatched.iter().map(|(_, a)| a).sum::<i128>()
            + n.pending.as_ref().map_or(0, |(_, d)| *d);
        let lease = n.lease.get_or_insert_with(Lease::default);
        lease.avail = got.total - usage;
        lease.last_added = got.added;
        // The node keeps its own view of the expiry; it stops admitting a quarter TTL before it.
        lease.expires_local = got.expires_ms;
        Some(got)
    }

    fn step(&mut self, t: i64, arrivals: bool) {
        // Store outages.
        if arrivals && t >= self.down_until && self.rng.chance(300) {
            self.down_until = t + 100 + self.rng.below(1_500) as i64;
            self.stats.outages += 1;
        }
        for i in 0..self.nodes.len() {
            // Crash and restart.
            if !self.nodes[i].alive {
                if t >= self.nodes[i].restart_at {
                    self.restart(i, t);
                }
                continue;
            }
            if arrivals && self.rng.chance(150) {
                self.crash(i, t);
                continue;
            }
            let local = t + self.nodes[i].skew;
            // Requests finishing.
            let mut k = 0;
            while k < self.nodes[i].flights.len() {
                if self.nodes[i].flights[k].done_at <= t {
                    let f = self.nodes[i].flights.swap_remove(k);
                    let n = &mut self.nodes[i];
                    if let Some(l) = n.lease.as_mut() {
                        l.avail += f.reserved - f.actual;
                    }
                    // (Unbatched spend is still in the lease: it leaves it when its batch commits.)
                    n.seq += 1;
                    let source = n.source();
                    n.unbatched.push((n.seq, f.actual));
                    n.journal.push((source, n.seq, f.actual));
                    self.settled_total += f.actual;
                } else {
                    k += 1;
                }
            }
            // The lease running out unrenewed: what is uncommitted or in flight is exposed.
            let expired_now = self.nodes[i]
                .lease
                .as_ref()
                .is_some_and(|l| local >= l.expires_local);
            if expired_now {
                let n = &mut self.nodes[i];
                let exposure = n.flights.iter().map(|f| f.reserved).sum::<i128>()
                    + n.unbatched.iter().map(|(_, a)| a).sum::<i128>()
                    + n.pending.as_ref().map_or(0, |(_, d)| *d);
                n.exposure = n.exposure.max(exposure);
            }
            // Renew before it runs out (by amount or by time).
            let renew = self.nodes[i].lease.as_ref().is_some_and(|l| {
                l.avail < l.last_added / 4 || local > l.expires_local - TTL_MS / 3
            });
            if renew && t % COMMIT_MS == 0 && self.acquire(i, t, 0).is_some() {
                let n = &mut self.nodes[i];
                self.allowed_overshoot += std::mem::take(&mut n.exposure);
            }
            // A new request.
            if arrivals && self.rng.chance(60_000) {
                let reserved = 1_000 + self.rng.below(40_000) as i128;
                let actual = reserved * (30 + self.rng.below(71) as i128) / 100;
                let done_at = t + 5 + self.rng.below(120) as i64;
                let usable = self.nodes[i]
                    .lease
                    .as_ref()
                    .is_some_and(|l| local < l.expires_local - TTL_MS / 4 && l.avail >= reserved);
                let admitted = usable
                    || (t >= self.nodes[i].refused_until && {
                        let avail = self.nodes[i].lease.as_ref().map_or(0, |l| l.avail.max(0));
                        let fresh = self.nodes[i]
                            .lease
                            .as_ref()
                            .is_some_and(|l| local < l.expires_local - TTL_MS / 4);
                        let need = if fresh { reserved - avail } else { reserved };
                        let granted = self.acquire(i, t, need).is_some();
                        if !granted {
                            self.nodes[i].refused_until = t + COMMIT_MS;
                        }
                        granted
                            && self.nodes[i]
                                .lease
                                .as_ref()
                                .is_some_and(|l| l.avail >= reserved)
                    });
                if admitted {
                    self.stats.admitted += 1;
                    let n = &mut self.nodes[i];
                    if let Some(l) = n.lease.as_mut() {
                        l.avail -= reserved;
                    }
                    n.flights.push(Flight {
                        done_at,
                        reserved,
                        actual,
                    });
                } else {
                    self.stats.refused += 1;
                }
            }
            // The ledger batch.
            if t >= self.nodes[i].next_commit {
                self.nodes[i].next_commit = t + COMMIT_MS;
                self.commit(i, t);
            }
        }
    }

    fn commit(&mut self, i: usize, t: i64) {
        let n = &mut self.nodes[i];
        if n.pending.is_none() && !n.unbatched.is_empty() {
            let mut b = Batch::default();
            let mut total = 0;
            let source = n.source();
            for (seq, a) in n.unbatched.drain(..) {
                b.add(
                    &source,
                    seq,
                    self.w.instance.clone(),
                    crate::pricing::money::Money::from_pico(a),
                    jiff::Timestamp::from_second(t / 1000 + 1).unwrap(),
                );
                total += a;
            }
            n.pending = Some((b, total));
        }
        let Some((batch, total)) = self.nodes[i].pending.clone() else {
            return;
        };
        self.arm_fault(t);
        let w = self.w.clone();
        let node = self.nodes[i].id;
        let from = [(w, total)];
        if transact(&self.store, &policy(), |txn| {
            commit(txn, &batch, node, &from)
        })
        .is_ok()
        {
            self.nodes[i].pending = None;
            self.stats.commits += 1;
        }
    }

    fn crash(&mut self, i: usize, t: i64) {
        self.stats.crashes += 1;
        let n = &mut self.nodes[i];
        // Requests in flight die unbilled (never settled: no client saw them complete).
        n.flights.clear();
        // What was settled but not committed is in the journal; if the lease expires and is reclaimed
        // before the restart replays it, it lands on top of the limit.
        let uncommitted = n.unbatched.iter().map(|(_, a)| a).sum::<i128>()
            + n.pending.as_ref().map_or(0, |(_, d)| *d);
        self.allowed_overshoot += uncommitted.max(n.exposure);
        n.exposure = 0;
        n.unbatched.clear();
        n.pending = None;
        n.lease = None;
        n.alive = false;
        n.restart_at = t + 50 + self.rng.below(2_000) as i64;
    }

    /// Replays the journal entries the store has not applied and gives back what is left of the old
    /// lease, in one transaction, until it commits; then starts a new run.
    fn restart(&mut self, i: usize, t: i64) {
        if t < self.down_until {
            return;
        }
        self.arm_fault(t);
        let w = self.w.clone();
        let node = self.nodes[i].id;
        let journal = self.nodes[i].journal.clone();
        let result = transact(&self.store, &policy(), |txn| {
            release(txn, &w, node)?;
            let mut sources: Vec<&String> = journal.iter().map(|(s, _, _)| s).collect();
            sources.dedup();
            for s in sources {
                let applied = ledger::applied(txn, s)?;
                let mut b = Batch::default();
                for (_, seq, a) in journal.iter().filter(|(js, q, _)| js == s && *q > applied) {
                    b.add(
                        s,
                        *seq,
                        w.instance.clone(),
                        crate::pricing::money::Money::from_pico(*a),
                        jiff::Timestamp::from_second(t / 1000 + 1).unwrap(),
                    );
                }
                if !b.is_empty() {
                    ledger::apply_batch(txn, &b)?;
                }
            }
            Ok(())
        });
        if result.is_ok() {
            let n = &mut self.nodes[i];
            n.alive = true;
            n.run += 1;
            n.seq = 0;
            n.next_commit = t + COMMIT_MS;
        }
    }

    fn run(&mut self) {
        for t in 0..RUN_MS {
            self.step(t, true);
        }
        // Recovery: faults end, every node comes back, requests finish, batches commit.
        self.down_until = -1;
        let mut t = RUN_MS;
        while self.nodes.iter().any(|n| {
            !n.alive || !n.flights.is_empty() || !n.unbatched.is_empty() || n.pending.is_some()
        }) {
            self.step(t, false);
            t += 1;
            assert!(t < RUN_MS + 60_000, "the fleet never settled");
        }
        self.store.clear_faults();
        // Exposures of leases that ran out and were never renewed count towards the bound.
        for n in &mut self.nodes {
            self.allowed_overshoot += std::mem::take(&mut n.exposure);
        }
        // Every node gives its lease back.
        for i in 0..self.nodes.len() {
            let (w, node) = (self.w.clone(), self.nodes[i].id);
            transact(&self.store, &policy(), |txn| release(txn, &w, node)).unwrap();
        }
    }

    fn check(&self, seed: u64) -> i128 {
        let w = self.w.clone();
        let spent = transact(&self.store, &policy(), |txn| committed(txn, &w)).unwrap();
        assert_eq!(
            spent, self.settled_total,
            "seed {seed}: the store holds {spent}, settled requests cost {} ({:?})",
            self.settled_total, self.stats
        );
        let overshoot = (spent - w.limit).max(0);
        assert!(
            overshoot <= self.allowed_overshoot,
            "seed {seed}: spent {spent} of {} (overshoot {overshoot} > bound {}) {:?}",
            w.limit,
            self.allowed_overshoot,
            self.stats
        );
        let left = transact(&self.store, &policy(), |txn| leases(txn, &w)).unwrap();
        assert!(
            left.iter().all(|(_, a, _)| *a == 0),
            "seed {seed}: leases left after recovery: {left:?}"
        );
        // The budget is usable again: what is left can be leased.
        let rest = w.limit - spent;
        if rest > 0 {
            let ask = Ask {
                node: 999,
                need: rest,
                want: 0,
                nodes: 1,
                now_ms: RUN_MS + 120_000,
                ttl_ms: TTL_MS,
                max_skew_ms: MAX_SKEW_MS,
            };
            let g = transact(&self.store, &policy(), |txn| acquire(txn, &w, &ask)).unwrap();
            assert_eq!(g.map(|g| g.added), Some(rest), "seed {seed}");
        }
        overshoot
    }
}

#[test]
fn fleet_simulation_holds_the_limit_under_faults() {
    let seeds: u64 = std::env::var("TOLLGATE_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000);
    let one: Option<u64> = std::env::var("TOLLGATE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok());
    let mut total = Stats::default();
    let (mut max_overshoot, mut max_bound, mut at_limit) = (0i128, 0i128, 0u64);
    for seed in one.map_or(0..seeds, |s| s..s + 1) {
        let mut world = World::new(seed);
        world.run();
        let overshoot = world.check(seed);
        let s = world.stats;
        if one.is_some() {
            eprintln!(
                "seed {seed}: {} nodes, limit {}, settled {}, overshoot {overshoot}, bound {}, {s:?}",
                world.nodes.len(),
                world.w.limit,
                world.settled_total,
                world.allowed_overshoot
            );
        }
        max_overshoot = max_overshoot.max(overshoot);
        max_bound = max_bound.max(world.allowed_overshoot);
        if world.settled_total * 10 >= world.w.limit * 9 {
            at_limit += 1;
        }
        total.admitted += s.admitted;
        total.refused += s.refused;
        total.acquires += s.acquires;
        total.commits += s.commits;
        total.crashes += s.crashes;
        total.outages += s.outages;
        total.unknown += s.unknown;
    }
    eprintln!(
        "fleet simulation: {seeds} seeds, {total:?}; {at_limit} seeds spent >= 90% of the limit; largest overshoot {max_overshoot} pico-USD (largest bound {max_bound})"
    );
    // The runs must exercise what they claim to: refusals at the limit, crashes, outages, unknown commits.
    if one.is_none() {
        assert!(total.refused > 0 && total.crashes > 0 && total.outages > 0 && total.unknown > 0);
        assert!(
            at_limit * 2 > seeds,
            "most seeds should reach the limit: {at_limit}/{seeds}"
        );
    }
}

/// Leases and store transactions one node needs at 10,000 requests/s on one budget, with its `want`
/// sized from its spend rate (one second of spend) and leases renewed when a quarter is left or two
/// thirds of the TTL have passed. Virtual time; no faults. Prints the rates (see docs/fleet.md).
#[test]
fn lease_and_transaction_rates_of_a_node_at_10k_requests_per_second() {
    let store = MemStore::new();
    let w = WindowRef {
        instance: InstanceName {
            budget: "org".into(),
            member: String::new(),
        },
        start: 0,
        end: 1_000_000_000,
        limit: i128::MAX / 4,
    };
    let (per_ms, seconds) = (10i64, 20i64);
    let reserved: i128 = 20_000;
    let actual: i128 = 12_000;
    let mut avail: i128 = 0;
    let (mut expires, mut last_added) = (0i64, 0i128);
    let (mut acquires, mut commits, mut seq) = (0u64, 0u64, 0u64);
    let mut unbatched: i128 = 0;
    let mut settled_total: i128 = 0;
    let mut batch = Batch::default();
    for t in 0..seconds * 1_000 {
        let rate_per_s = i128::from(per_ms) * 1_000 * reserved;
        let renew = avail < last_added / 4 || t > expires - TTL_MS / 3;
        if renew {
            let ask = Ask {
                node: 1,
                need: 0,
                want: rate_per_s,
                nodes: 1,
                now_ms: t,
                ttl_ms: TTL_MS,
                max_skew_ms: MAX_SKEW_MS,
            };
            let g = transact(&store, &policy(), |txn| acquire(txn, &w, &ask))
                .unwrap()
                .unwrap();
            acquires += 1;
            avail = g.total - unbatched;
            last_added = g.added;
            expires = g.expires_ms;
        }
        for _ in 0..per_ms {
            assert!(avail >= reserved, "ran dry at {t} ms");
            // Admitted (holding `reserved`) and settled at `actual` in the same millisecond.
            avail -= actual;
            unbatched += actual;
            settled_total += actual;
            seq += 1;
            batch.add(
                "n1",
                seq,
                w.instance.clone(),
                crate::pricing::money::Money::from_pico(actual),
                jiff::Timestamp::from_second(t / 1000 + 1).unwrap(),
            );
        }
        if t % COMMIT_MS == 0 {
            let b = std::mem::take(&mut batch);
            let from = [(w.clone(), unbatched)];
            transact(&store, &policy(), |txn| commit(txn, &b, 1, &from)).unwrap();
            commits += 1;
            unbatched = 0;
        }
    }
    let secs = seconds as f64;
    eprintln!(
        "one node at {} requests/s: {:.1} lease transactions/s, {:.1} commit transactions/s, {:.1} store transactions/s in all",
        per_ms * 1_000,
        acquires as f64 / secs,
        commits as f64 / secs,
        (acquires + commits) as f64 / secs
    );
    // A lease lasts about its TTL's two thirds or three quarters of a second of spend: at most a few
    // per second, whatever the request rate.
    assert!(
        acquires as f64 / secs <= 3.0,
        "{acquires} leases in {seconds} s"
    );
    let spent = transact(&store, &policy(), |txn| committed(txn, &w)).unwrap();
    assert_eq!(spent + unbatched, settled_total);
}

/// A lease below zero (its node committed more than it held: an open budget's spend while the store was
/// out of reach, or spend settled after the lease was reclaimed) starts again from zero at the node's
/// next grant: that spend is already in the committed total, so nothing is counted twice and the
/// rest of the budget stays leasable.
#[test]
fn a_lease_below_zero_starts_again_from_zero() {
    let store = MemStore::new();
    let w = WindowRef {
        instance: InstanceName {
            budget: "org".into(),
            member: String::new(),
        },
        start: 0,
        end: 1_000_000_000,
        limit: 1_000,
    };
    let ask = |node: u64, need: i128| Ask {
        node,
        need,
        want: 0,
        nodes: 2,
        now_ms: 1_000,
        ttl_ms: TTL_MS,
        max_skew_ms: MAX_SKEW_MS,
    };
    let g = transact(&store, &policy(), |txn| acquire(txn, &w, &ask(1, 100)))
        .unwrap()
        .unwrap();
    assert_eq!(g.total, 100);
    let mut batch = Batch::default();
    batch.add(
        "n1",
        1,
        w.instance.clone(),
        crate::pricing::money::Money::from_pico(300),
        jiff::Timestamp::from_second(1).unwrap(),
    );
    let from = [(w.clone(), 300)];
    transact(&store, &policy(), |txn| commit(txn, &batch, 1, &from)).unwrap();
    let left = transact(&store, &policy(), |txn| leases(txn, &w)).unwrap();
    assert_eq!(left[0].1, -200);
    let g = transact(&store, &policy(), |txn| acquire(txn, &w, &ask(1, 50)))
        .unwrap()
        .unwrap();
    assert_eq!((g.total, g.added), (50, 50));
    let left = transact(&store, &policy(), |txn| leases(txn, &w)).unwrap();
    assert_eq!(left[0].1, 50);
    // The rest: 1,000 - 300 spent - 50 leased.
    let g = transact(&store, &policy(), |txn| acquire(txn, &w, &ask(2, 650))).unwrap();
    assert_eq!(g.map(|g| g.total), Some(650));
    let none = transact(&store, &policy(), |txn| acquire(txn, &w, &ask(2, 1))).unwrap();
    assert_eq!(none, None);
}
