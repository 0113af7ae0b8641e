//! The fleet as real processes, under faults: three `tollgate serve` processes (two workers each, their
//! own ledger directories, fixed node ids, leases of 2 s) and a `tollgate controlplane serve` on one
//! shared spend store, one mock provider, load from many client threads over plain TCP
//! (`tollgate_tests::multinode`). Scenarios:
//!
//! - a burst of 200 concurrent requests on one budget over the three nodes: every response 200 or 429,
//!   spend within the limit (requests carry `max_tokens`: the bound is 1.0x), and exactly the cost of the
//!   200s, in the store and through the control plane;
//! - `kill -9` of one node under load: its lease expires and is reclaimed, the others carry on, and after
//!   it restarts on the same ledger directory every settled request is counted once, nothing lost;
//! - the store stalled for longer than `fail_closed_after_ms` (SQLite: another process holds its write
//!   lock), then back: the `"closed"` budget refuses, the `"open"` one serves, and all spend is committed
//!   afterwards;
//! - one node's clock skewed (`ledger.clock_offset_ms`) within `max_skew_ms`: still no overshoot.
//!
//! `measure_the_fleet` (ignored, run by hand) prints the overshoot table, lease and commit transactions
//! per second per node, and the latency a 3-node fleet adds over one node (docs/fleet.md has the numbers).
//!
//! Ignored by default like the other environment-dependent tests (they start many processes and take
//! seconds each); `.ci/run` runs them: `cargo test -p tollgate-tests --test fleet_processes -- --ignored`.
//! The store is chosen in one place, [`store`].

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // Test code: a failed step is a failed test.

use std::path::Path;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use tollgate_tests::multinode::*;

/// The scenarios are timed (leases of 1-2 s, a 7 s stall): they run one at a time, whatever the test
/// runner's threads, so that four fleets do not share the machine's cores at once.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The store every scenario runs on: a throwaway PostgreSQL cluster (`tollgate_tests::postgres`; set
/// `TOLLGATE_PG_BIN` where PostgreSQL is not in Debian's place), or with `TOLLGATE_FLEET_STORE=sqlite`
/// one SQLite file shared by the processes.
fn store() -> impl FnOnce(&Path) -> FleetStore {
    match std::env::var("TOLLGATE_FLEET_STORE").as_deref() {
        Ok("sqlite") => FleetStore::sqlite_in,
        _ => FleetStore::postgres,
    }
}

/// A day budget named `name` of `usd` on `scope` lines (`scope = ...`, `group = ...`), plus `extra`.
fn budget(name: &str, usd: &str, scope: &str, extra: &str) -> String {
    format!(
        "\n[[budgets]]\nname = \"{name}\"\namount_usd = \"{usd}\"\nwindow = \"day\"\n{scope}\n{extra}\n"
    )
}

const EVERYONE: &str = "scope = \"everyone\"";

/// pico-USD of a decimal USD string (`"0.000019"`).
fn pico(usd: &str) -> i128 {
    let (whole, frac) = usd.split_once('.').unwrap_or((usd, ""));
    let frac = format!("{frac:0<12}");
    whole.parse::<i128>().unwrap() * 1_000_000_000_000 + frac[..12].parse::<i128>().unwrap()
}

/// The decimal USD string of `pico` pico-USD.
fn usd(pico: i128) -> String {
    format!(
        "{}.{:012}",
        pico / 1_000_000_000_000,
        pico % 1_000_000_000_000
    )
}

/// Every response is a complete 200 or a 429; the store and the control plane both hold exactly the cost
/// of the 200s, and it is within `limit`.
fn check_burst(f: &Fleet, budget: &str, limit: i128, out: &[Outcome]) -> (usize, usize, i128) {
    let ok: Vec<&Outcome> = out.iter().filter(|o| o.status == 200).collect();
    let refused = out.iter().filter(|o| o.status == 429).count();
    assert_eq!(
        ok.len() + refused,
        out.len(),
        "every response is 200 or 429: {:?}",
        out.iter()
            .filter(|o| o.status != 200 && o.status != 429)
            .collect::<Vec<_>>()
    );
    assert!(ok.iter().all(|o| o.complete), "every 200 completed");
    let billed: i128 = ok.iter().map(|o| o.cost()).sum();
    let spent = f.wait_committed(budget, billed, Duration::from_secs(15));
    assert!(spent <= limit, "fleet spend {spent} over the limit {limit}");
    assert_eq!(
        f.cp_budget_spend(budget),
        billed,
        "the control plane's view"
    );
    (ok.len(), refused, spent)
}

/// 200 concurrent streams on one budget over three nodes: within the limit (1.0x: every request carries
/// `max_tokens`), exactly the cost of the 200s, the same in the store and through the control plane.
#[test]
#[ignore = "starts a fleet of processes (run by .ci/run, or with --ignored)"]
fn a_burst_of_200_over_three_processes_stays_within_the_budget() {
    let _serial = one_at_a_time();
    let limit = pico("0.0005");
    let f = Fleet::start(
        store(),
        &FleetOptions {
            budgets: budget("everyone", "0.0005", EVERYONE, ""),
            ..FleetOptions::default()
        },
    );
    let out = burst(&f.addrs(), &f.token, 200, true, 10, 8);
    let (ok, refused, spent) = check_burst(&f, "everyone", limit, &out);
    assert!(ok > 0 && refused > 0, "{ok} admitted, {refused} refused");
    // Where the budget went (a burst's first lease grants decide it: whichever node's ledger thread
    // reaches the store first leases the most).
    for n in 0..3 {
        eprintln!(
            "node {n}: {} admitted, {} refused; lease transactions {}",
            out.iter()
                .filter(|o| o.node == n && o.status == 200)
                .count(),
            out.iter()
                .filter(|o| o.node == n && o.status == 429)
                .count(),
            f.metrics(n)
                .lines()
                .filter(|l| l.starts_with("tollgate_fleet_lease"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    let (requests, cost) = f.cp_usage();
    assert_eq!((requests, cost), (ok as u64, spent));
    assert_eq!(f.usage(), (ok as u64, spent));
    eprintln!(
        "burst of 200 over 3 nodes: {ok} admitted, {refused} refused, spend {spent} of {limit} ({:.3}x)",
        spent as f64 / limit as f64
    );
}

/// `kill -9` of one node while all three serve: its lease expires and is reclaimed by the others, which
/// keep serving; restarted on its ledger directory it replays its journal. Then every request the
/// provider saw is billed once: settled ones at their cost (every complete response among them), the
/// ones the crash cut off at their reserved amount; nothing twice.
#[test]
#[ignore = "starts a fleet of processes (run by .ci/run, or with --ignored)"]
fn a_node_killed_under_load_loses_nothing_and_counts_nothing_twice() {
    let _serial = one_at_a_time();
    let (ttl, skew) = (2_000u64, 500u64);
    let mut f = Fleet::start(
        store(),
        &FleetOptions {
            budgets: budget("everyone", "10", EVERYONE, ""),
            lease_ttl_ms: ttl,
            max_skew_ms: skew,
            ..FleetOptions::default()
        },
    );
    let (input, max_tokens) = (10u64, 8u64);
    let addrs = RwLock::new(f.addrs());
    let victim = 1usize;
    let kill_at = Duration::from_millis(1_500);
    let (restart_at, stop_at) = (Duration::from_millis(6_500), Duration::from_millis(9_500));
    let began = Instant::now();
    let stop = |at: Duration| at >= stop_at;
    let token = f.token.clone();
    let (out, restarted_log) = std::thread::scope(|s| {
        let clients = s.spawn(|| {
            load(
                &addrs,
                &token,
                6,
                Duration::from_millis(10),
                true,
                |_| (input, max_tokens),
                &stop,
            )
        });
        std::thread::sleep(kill_at.saturating_sub(began.elapsed()));
        f.kill9(victim);
        let killed = Instant::now();
        // The victim's lease expires (TTL), is reclaimable a skew later, and the others, renewing
        // under load, reclaim it: never before its expiry plus the skew.
        let deadline = killed + Duration::from_millis(2 * ttl + skew + 2_000);
        let mut last_exp = i64::MIN;
        loop {
            let held = f.leases_of(victim as u64 + 1);
            let now_ms = jiff::Timestamp::now().as_millisecond();
            if held.is_empty() {
                assert!(
                    now_ms >= last_exp + skew as i64,
                    "reclaimed {} ms before its expiry plus the skew",
                    last_exp + skew as i64 - now_ms
                );
                break;
            }
            last_exp = held.iter().map(|(_, e)| *e).max().unwrap_or(i64::MIN);
            assert!(
                Instant::now() < deadline,
                "the dead node's lease was never reclaimed: {held:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let reclaimed = killed.elapsed();
        std::thread::sleep(restart_at.saturating_sub(began.elapsed()));
        f.restart(victim);
        addrs.write().unwrap()[victim] = f.addr(victim);
        let log = f.nodes[victim].proc.output();
        eprintln!("the dead node's lease was reclaimed {reclaimed:?} after the kill");
        (clients.join().unwrap(), log)
    });
    f.stop_nodes();

    // The others carried on: every request to them completed.
    let others: Vec<&Outcome> = out.iter().filter(|o| o.node != victim).collect();
    assert!(
        others.iter().all(|o| o.complete),
        "{:?}\n{}",
        others.iter().filter(|o| !o.complete).collect::<Vec<_>>(),
        [
            "fleet_lease_failed",
            "ledger_store_failing",
            "ledger_store_recovered"
        ]
        .iter()
        .flat_map(|e| f.events(e))
        .take(30)
        .collect::<Vec<_>>()
        .join("\n")
    );
    assert!(
        others
            .iter()
            .filter(|o| o.at > kill_at && o.at < restart_at)
            .count()
            > 20,
        "the others served while the node was down"
    );
    let mine: Vec<&Outcome> = out.iter().filter(|o| o.node == victim).collect();
    assert!(
        mine.iter().any(|o| o.complete && o.at > restart_at),
        "the restarted node serves again"
    );

    // The books.
    let c = cost(input, max_tokens);
    let complete = out.iter().filter(|o| o.complete).count() as u64;
    let cut = mine.iter().filter(|o| o.sent && !o.complete).count() as u64;
    let provider = f.provider_requests();
    let (settled, usage_cost) = f.usage();
    let spent = f.committed("everyone");
    let estimated = f.estimated("everyone");
    let mut charged = (0u64, 0i128);
    for l in restarted_log.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        if v["event"] == "reservation_charged_after_crash" {
            charged.0 += v["count"].as_str().unwrap().parse::<u64>().unwrap();
            for part in v["usd"].as_str().unwrap().split(',') {
                charged.1 += pico(part.split_once('=').unwrap().1);
            }
        }
    }
    eprintln!(
        "kill -9: {complete} complete responses, {cut} cut off by the kill, {provider} requests at the provider, \
         {settled} settled, {} charged at their reservation after the crash; spend {spent} = usage {usage_cost} + estimated {estimated}",
        charged.0
    );
    assert_eq!(
        usage_cost,
        i128::from(settled) * c,
        "each settled once, at its cost"
    );
    assert!(
        settled >= complete,
        "every complete response is billed: {settled} settled, {complete} complete"
    );
    assert!(
        settled - complete <= cut,
        "settled beyond the complete ones only among those the crash cut: {settled} - {complete} > {cut}"
    );
    assert!(
        settled <= provider,
        "nothing counted twice: {settled} settled, {provider} reached the provider"
    );
    assert!(
        settled + charged.0 >= provider,
        "every request the provider saw is billed: {settled} + {} < {provider}",
        charged.0
    );
    assert_eq!(estimated, charged.1, "the crash's estimates, as logged");
    assert_eq!(spent, usage_cost + estimated);
    assert_eq!(f.cp_budget_spend("everyone"), spent);
    assert_eq!(f.cp_usage(), (settled, usage_cost));
    // Every node gave its leases back at shutdown.
    for n in 1..=3u64 {
        assert!(
            f.leases_of(n).iter().all(|(a, _)| *a <= 0),
            "node {n}: {:?}",
            f.leases_of(n)
        );
    }
}

/// The store stalls for longer than `fail_closed_after_ms` (another process holds SQLite's write lock),
/// then comes back: meanwhile the `"closed"` budget refuses (503 `budget_unavailable`, or 429 where a
/// lease ran out) and the `"open"` one keeps serving on each node's last view; afterwards both serve and
/// every settled request is committed.
#[test]
#[ignore = "starts a fleet of processes (run by .ci/run, or with --ignored)"]
fn a_stalled_store_closes_closed_budgets_and_open_ones_keep_serving() {
    let _serial = one_at_a_time();
    let f = Fleet::start(
        store(),
        &FleetOptions {
            budgets: budget("closed", "10", "scope = \"group\"\ngroup = \"closed\"", "")
                + &budget(
                    "open",
                    "10",
                    "scope = \"group\"\ngroup = \"open\"",
                    "on_store_failure = \"open\"",
                ),
            teams: vec!["closed".into(), "open".into()],
            fail_closed_after_ms: 1_000,
            ..FleetOptions::default()
        },
    );
    let (stall_at, stall_for, stop_at) = (
        Duration::from_millis(1_500),
        Duration::from_millis(7_000),
        Duration::from_millis(12_000),
    );
    let resume_at = stall_at + stall_for;
    let addrs = RwLock::new(f.addrs());
    let began = Instant::now();
    let stop = |at: Duration| at >= stop_at;
    let run = |token: &str| {
        load(
            &addrs,
            token,
            3,
            Duration::from_millis(50),
            false,
            |_| (10, 8),
            &stop,
        )
    };
    let (closed, open) = std::thread::scope(|s| {
        let closed = s.spawn(|| run(&f.tokens[0]));
        let open = s.spawn(|| run(&f.tokens[1]));
        std::thread::sleep(stall_at.saturating_sub(began.elapsed()));
        // Every commit and lease transaction of the nodes waits on the store meanwhile.
        f.store.stall(resume_at.saturating_sub(began.elapsed()));
        (closed.join().unwrap(), open.join().unwrap())
    });
    // What the nodes logged about the store, for a failure's message.
    let diag = || {
        let mut lines = f.events("ledger_store_failing");
        lines.extend(f.events("ledger_store_recovered"));
        lines.extend(f.events("fleet_lease_failed").into_iter().take(20));
        lines.join("\n")
    };
    let during = |o: &&Outcome| {
        o.at > stall_at + Duration::from_millis(1_500) && o.at + o.latency < resume_at
    };
    let after = |o: &&Outcome| o.at > resume_at + Duration::from_millis(1_500);
    let before = |o: &&Outcome| o.at + o.latency < stall_at;
    for (name, out) in [("closed", &closed), ("open", &open)] {
        assert!(
            out.iter().filter(before).all(|o| o.complete),
            "{name}: before the stall every request is served: {:?}\n{}",
            out.iter()
                .filter(before)
                .filter(|o| !o.complete)
                .collect::<Vec<_>>(),
            diag()
        );
        let n = out.iter().filter(after).count();
        assert!(
            n > 5 && out.iter().filter(after).all(|o| o.complete),
            "{name}: after the stall every request is served again: {:?}\n{}",
            out.iter()
                .filter(after)
                .filter(|o| !o.complete)
                .collect::<Vec<_>>(),
            diag()
        );
    }
    let closed_during: Vec<&Outcome> = closed.iter().filter(during).collect();
    assert!(closed_during.len() > 5);
    assert!(
        closed_during
            .iter()
            .all(|o| o.status == 503 || o.status == 429),
        "the closed budget refuses while the store is stalled: {:?}\n{}",
        closed_during
            .iter()
            .filter(|o| o.status != 503 && o.status != 429)
            .collect::<Vec<_>>(),
        diag()
    );
    let open_during: Vec<&Outcome> = open.iter().filter(during).collect();
    assert!(open_during.len() > 5);
    assert!(
        open_during.iter().all(|o| o.complete),
        "the open budget serves while the store is stalled: {:?}\n{}",
        open_during
            .iter()
            .filter(|o| !o.complete)
            .collect::<Vec<_>>(),
        diag()
    );
    // Everything settled reaches the store.
    for (name, out) in [("closed", &closed), ("open", &open)] {
        assert!(out.iter().all(|o| o.complete || o.status != 200));
        let billed: i128 = out.iter().filter(|o| o.complete).map(|o| o.cost()).sum();
        f.wait_committed(name, billed, Duration::from_secs(20));
    }
    let first_refusal = closed
        .iter()
        .filter(|o| o.at > stall_at && o.status != 200)
        .map(|o| o.at + o.latency - stall_at)
        .min();
    let slowest_open = open
        .iter()
        .filter(|o| o.at > stall_at && o.at < resume_at)
        .map(|o| o.latency)
        .max();
    eprintln!(
        "stalled store ({stall_for:?}): closed budget {} refused of {} (503: {}, 429: {}) while stalled, the first {first_refusal:?} into the stall; \
         open budget {} served of {} (slowest {slowest_open:?}); all {} + {} served requests committed",
        closed_during.iter().filter(|o| o.status != 200).count(),
        closed_during.len(),
        closed_during.iter().filter(|o| o.status == 503).count(),
        closed_during.iter().filter(|o| o.status == 429).count(),
        open_during.iter().filter(|o| o.complete).count(),
        open_during.len(),
        closed.iter().filter(|o| o.complete).count(),
        open.iter().filter(|o| o.complete).count(),
    );
}

/// One node's lease clock runs `offset` ms off the others' (ahead, then behind; within `max_skew_ms`).
/// The skewed node takes leases alone, then all three nodes burst as its leases near their expiry, and
/// again once every lease has expired and become reclaimable (across the skewed clocks): the limit holds
/// exactly, and the store holds exactly the cost of the 200s.
#[test]
#[ignore = "starts a fleet of processes (run by .ci/run, or with --ignored)"]
fn a_skewed_clock_within_max_skew_does_not_overshoot() {
    let _serial = one_at_a_time();
    let (ttl, skew) = (1_000u64, 500u64);
    for offset in [450i64, -450] {
        let limit = pico("0.0003");
        let f = Fleet::start(
            store(),
            &FleetOptions {
                budgets: budget("everyone", "0.0003", EVERYONE, ""),
                lease_ttl_ms: ttl,
                max_skew_ms: skew,
                clock_offsets_ms: vec![0, offset, 0],
                control_plane: false,
                ..FleetOptions::default()
            },
        );
        assert!(f.nodes[1]
            .proc
            .output()
            .contains(&format!("\"clock_offset_ms\":\"{offset}\"")));
        let mut out = burst(&[f.addr(1)], &f.token, 20, true, 10, 8);
        let alone = out.iter().filter(|o| o.status == 200).count();
        std::thread::sleep(Duration::from_millis(ttl * 3 / 4));
        let near = burst(&f.addrs(), &f.token, 60, true, 10, 8);
        // Every lease expired and reclaimable by every clock (the skewed node's expiries are written
        // by its clock).
        std::thread::sleep(Duration::from_millis(
            ttl + skew + offset.unsigned_abs() + 300,
        ));
        let after = burst(&f.addrs(), &f.token, 90, true, 10, 8);
        let admitted = |v: &[Outcome]| v.iter().filter(|o| o.status == 200).count();
        eprintln!(
            "clock offset {offset} ms on node 2: admitted {alone} on it alone, {} near its leases' expiry, {} after every lease expired",
            admitted(&near),
            admitted(&after)
        );
        out.extend(near);
        out.extend(after);
        let ok: Vec<&Outcome> = out.iter().filter(|o| o.status == 200).collect();
        assert!(out.iter().all(|o| o.status == 200 || o.status == 429));
        assert!(ok.iter().all(|o| o.complete));
        let billed: i128 = ok.iter().map(|o| o.cost()).sum();
        let spent = f.wait_committed("everyone", billed, Duration::from_secs(15));
        assert!(
            spent <= limit,
            "offset {offset}: spend {spent} over {limit}"
        );
        assert!(
            out.iter().any(|o| o.status == 429),
            "offset {offset}: the bursts reach the limit"
        );
        eprintln!(
            "clock offset {offset} ms on node 2: {} admitted in all, spend {spent} of {limit} ({:.3}x)",
            ok.len(),
            spent as f64 / limit as f64
        );
    }
}

/// The measurements of docs/fleet.md, printed as tables: budget overshoot (1 and 3 nodes; bursts of 50
/// and 200; JSON and streams; every request with `max_tokens`), lease and commit transactions per second
/// per node, and the latency at a fixed modest rate with 3 nodes against 1.
#[test]
#[ignore = "a measurement (minutes): cargo test -p tollgate-tests --test fleet_processes -- --ignored measure --nocapture"]
fn measure_the_fleet() {
    let _serial = one_at_a_time();
    let (input, max_tokens) = (10u64, 8u64);
    let c = cost(input, max_tokens);
    let cells: Vec<(usize, bool)> = vec![(50, false), (50, true), (200, false), (200, true)];
    let name = |burst: usize, stream: bool| format!("b{burst}{}", if stream { "s" } else { "j" });
    let mut rows = Vec::new();
    let mut kind = "";
    for nodes in [1usize, 3] {
        // One budget per cell (scope: its team), each affording half its burst at the actual cost.
        let budgets: String = cells
            .iter()
            .map(|(b, s)| {
                let usd = usd(c * *b as i128 / 2);
                budget(
                    &name(*b, *s),
                    &usd,
                    &format!("scope = \"group\"\ngroup = \"{}\"", name(*b, *s)),
                    "",
                )
            })
            .collect();
        let f = Fleet::start(
            store(),
            &FleetOptions {
                nodes,
                budgets,
                teams: cells.iter().map(|(b, s)| name(*b, *s)).collect(),
                control_plane: false,
                ..FleetOptions::default()
            },
        );
        kind = f.store.kind();
        for (i, (b, s)) in cells.iter().enumerate() {
            let limit = c * *b as i128 / 2;
            let out = burst(&f.addrs(), &f.tokens[i], *b, *s, input, max_tokens);
            let (ok, refused, spent) = check_burst_quiet(&f, &name(*b, *s), &out);
            rows.push((nodes, *b, *s, ok, refused, spent, limit));
        }
    }
    println!("\nBudget overshoot (store: {}; every request with max_tokens; limit = half the burst at its actual cost):\n", kind);
    println!("| nodes | burst | body | admitted | refused | spend / limit | overshoot |");
    println!("|---|---|---|---|---|---|---|");
    for (nodes, b, s, ok, refused, spent, limit) in &rows {
        println!(
            "| {nodes} | {b} | {} | {ok} | {refused} | {:.3}x | {} |",
            if *s { "stream" } else { "JSON" },
            *spent as f64 / *limit as f64,
            (spent - limit).max(0)
        );
    }

    // Transactions and latency at a fixed modest rate: 6 clients, each a request every 100 ms (60/s).
    let mut lat = Vec::new();
    for nodes in [1usize, 3] {
        let f = Fleet::start(
            store(),
            &FleetOptions {
                nodes,
                budgets: budget("everyone", "100", EVERYONE, ""),
                control_plane: false,
                ..FleetOptions::default()
            },
        );
        let addrs = RwLock::new(f.addrs());
        // Warm up (leases granted, connections to the mock open).
        let _ = load(
            &addrs,
            &f.token,
            6,
            Duration::from_millis(100),
            false,
            |_| (input, max_tokens),
            &|at| at >= Duration::from_secs(1),
        );
        let before: Vec<String> = (0..nodes).map(|i| f.metrics(i)).collect();
        let secs = 10.0;
        let out = load(
            &addrs,
            &f.token,
            6,
            Duration::from_millis(100),
            false,
            |_| (input, max_tokens),
            &|at| at >= Duration::from_secs_f64(secs),
        );
        assert!(out.iter().all(|o| o.complete));
        let after: Vec<String> = (0..nodes).map(|i| f.metrics(i)).collect();
        let d = |i: usize, name: &str, labels: &str| {
            (metric(&after[i], name, labels) - metric(&before[i], name, labels)) / secs
        };
        let per_node: Vec<(f64, f64, f64)> = (0..nodes)
            .map(|i| {
                (
                    d(i, "tollgate_fleet_lease_transactions_total", ""),
                    d(i, "tollgate_ledger_commits_total", ""),
                    d(i, "tollgate_requests_total", ""),
                )
            })
            .collect();
        let ms: Vec<Duration> = out.iter().map(|o| o.latency).collect();
        lat.push((
            nodes,
            out.len() as f64 / secs,
            quantile_ms(&ms, 0.5),
            quantile_ms(&ms, 0.99),
            per_node,
        ));
    }
    println!("\nTransactions and latency at a fixed rate (6 clients x 10 requests/s, JSON, gpt-4o-mini, max_tokens 8):\n");
    println!(
        "| nodes | requests/s | p50 ms | p99 ms | per node: lease tx/s, commit tx/s, requests/s |"
    );
    println!("|---|---|---|---|---|");
    for (nodes, rate, p50, p99, per) in &lat {
        let per: Vec<String> = per
            .iter()
            .map(|(l, c, r)| format!("{l:.1}, {c:.1}, {r:.1}"))
            .collect();
        println!(
            "| {nodes} | {rate:.1} | {p50:.2} | {p99:.2} | {} |",
            per.join(" / ")
        );
    }
    if let [(_, _, a50, a99, _), (_, _, b50, b99, _)] = lat.as_slice() {
        println!(
            "\nAdded by 3 nodes over 1: p50 {:+.2} ms, p99 {:+.2} ms",
            b50 - a50,
            b99 - a99
        );
    }
}

/// [`check_burst`] without the control plane (the measurement starts none): the store's view only.
fn check_burst_quiet(f: &Fleet, budget: &str, out: &[Outcome]) -> (usize, usize, i128) {
    let ok: Vec<&Outcome> = out.iter().filter(|o| o.status == 200).collect();
    let refused = out.iter().filter(|o| o.status == 429).count();
    assert_eq!(ok.len() + refused, out.len());
    assert!(ok.iter().all(|o| o.complete));
    let billed: i128 = ok.iter().map(|o| o.cost()).sum();
    let spent = f.wait_committed(budget, billed, Duration::from_secs(15));
    (ok.len(), refused, spent)
}
