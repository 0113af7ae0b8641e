//! Admission: what a request pays before it is forwarded when budgets apply, beside the naive ways.
//!
//! - `input_bound/{1kb,64kb}`: the byte-count bound on prompt tokens vs. tokenizing the prompt (the "real
//!   count" the issue asks about: exact for OpenAI's vocabulary, milliseconds for long prompts).
//! - `reserve_settle/local_3_budgets`: reserving on three budget instances in one core's ledger and settling,
//!   the common path when an identity's budgets live on the core serving it. The cross-core path is the
//!   mailbox round trip (`cargo bench --bench mailbox`).
//! - `reserve_settle/slice_shared_budget`: holding and settling on a core's slice of a shared budget
//!   (`tollgate_core::budget::slices`), what a core does instead of asking the budget's owner; with a
//!   report to the owner (applied to its ledger) every 1,000 requests, as a busy core's 50 ms tick would.
//! - `settle/journal_append_3_budgets`: what a settlement adds for durability: one JSON line appended to
//!   the core's journal file (a `write(2)` into the page cache) and a `try_send` to the ledger thread;
//!   beside `settle/baseline_fsync_each`, the naive way (an fsync per settlement).
//! - `settle/journal_reserve_then_settle_3_budgets`: the same settlement with its reservation journaled at
//!   admission first (what makes a `kill -9` charge requests in flight): the difference to
//!   `journal_append_3_budgets` is the admission's price, one more line and `write(2)`.
//!   `settle/journal_reserve_then_release_3_budgets`: a request that never reached a provider.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use tollgate_core::budget::owner::Ledger;
use tollgate_core::budget::slices::{Lend, Lender};
use tollgate_core::budget::{BudgetRequest, BudgetSet, RawBudget};
use tollgate_core::{Identity, IdentityKind, Money};
use tollgate_dataplane::spend::max_cost::input_token_bound;

fn body(bytes: usize) -> Vec<u8> {
    let sentence =
        "The quick brown fox jumps over the lazy dog while the platform team watches the budget. ";
    let text: String = sentence.repeat(bytes / sentence.len() + 1)[..bytes].to_owned();
    serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini", "max_tokens": 256,
        "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": text}]
    }))
    .unwrap()
}

fn input_bound(c: &mut Criterion) {
    tollgate_dataplane::spend::estimate::warm();
    let mut g = c.benchmark_group("input_bound");
    for (name, n) in [("1kb", 1024), ("64kb", 64 * 1024)] {
        let b = body(n);
        g.bench_function(format!("{name}_byte_bound"), |x| {
            x.iter(|| black_box(input_token_bound(black_box(&b))))
        });
        g.bench_function(format!("{name}_baseline_tokenize"), |x| {
            x.iter(|| {
                black_box(tollgate_dataplane::spend::estimate::prompt_tokens(
                    tollgate_dataplane::providers::Api::OpenAi,
                    black_box(&b),
                ))
            })
        });
    }
    g.finish();
}

fn reserve_settle(c: &mut Criterion) {
    let raw: Vec<RawBudget> = toml::from_str::<toml::Table>(
        r#"
        [[budgets]]
        name = "me"
        amount_usd = "1000000"
        window = "month"
        scope = "each_identity"
        [[budgets]]
        name = "team"
        amount_usd = "1000000"
        window = "day"
        scope = "group"
        group = "eng"
        [[budgets]]
        name = "all"
        amount_usd = "1000000"
        window = "7d"
        scope = "everyone"
        "#,
    )
    .unwrap()["budgets"]
        .clone()
        .try_into()
        .unwrap();
    let set = BudgetSet::from_raw(raw, Default::default()).unwrap();
    let id = Identity {
        kind: IdentityKind::User,
        subject: Arc::from("alice"),
        email: None,
        groups: Arc::from(vec![Arc::from("eng")]),
        source: Arc::from("okta"),
        token_id: None,
        attributes: std::sync::Arc::from(Vec::new()),
    };
    let keys = set.applicable(
        &id,
        &BudgetRequest {
            model: "gpt-4o-mini",
            upstream_model: None,
            canonical_model: None,
            provider: "openai",
            attributes: &[],
        },
    );
    assert_eq!(keys.len(), 3);
    let mut ledger = Ledger::new();
    let now = jiff::Timestamp::now();
    c.bench_function("reserve_settle/local_3_budgets", |b| {
        b.iter(|| {
            let r = ledger
                .reserve(black_box(&keys), Money::from_pico(24_600_000), now)
                .unwrap();
            black_box(ledger.settle(r, Money::from_pico(13_350_000), now));
        })
    });
    let shared = keys[2].clone();
    let mut owner = Ledger::new();
    let mut lender = Lender::new(16);
    let Lend::Granted(g) = lender.lend(
        &mut owner,
        1,
        &shared,
        Money::from_pico(24_600_000),
        now,
        true,
    ) else {
        panic!("no grant");
    };
    let mut lease = tollgate_core::budget::slices::Lease::new(&g, now);
    lease.apply(&g, Money::ZERO);
    let mut n = 0u32;
    c.bench_function("reserve_settle/slice_shared_budget", |b| {
        b.iter(|| {
            let amount = Money::from_pico(24_600_000);
            let took = lease.take(black_box(amount), now);
            assert_eq!(took, amount);
            black_box(lease.settle(took, Money::from_pico(13_350_000), now));
            n += 1;
            if n.is_multiple_of(1000) {
                let r = lease.report(false);
                lender.report(&mut owner, 1, &shared, lease.res, &r, false);
                // Top the slice up as a borrower would when it runs low.
                if lease.available() < Money::from_pico(1_000_000_000) {
                    if let Lend::Granted(g) = lender.lend(
                        &mut owner,
                        1,
                        &shared,
                        Money::from_pico(24_600_000),
                        now,
                        true,
                    ) {
                        lease.apply(&g, Money::ZERO);
                    }
                }
            }
        })
    });
    c.bench_function("reserve_settle/applicable_3_budgets", |b| {
        b.iter(|| {
            black_box(set.applicable(
                black_box(&id),
                &BudgetRequest {
                    model: "gpt-4o-mini",
                    upstream_model: None,
                    canonical_model: None,
                    provider: "openai",
                    attributes: &[],
                },
            ))
        })
    });
}

fn journal(c: &mut Criterion) {
    let set = BudgetSet::from_raw(
        toml::from_str::<toml::Table>(
            "[[budgets]]\nname = \"me\"\namount_usd = \"1\"\nwindow = \"day\"\nscope = \"each_identity\"\n[[budgets]]\nname = \"team\"\namount_usd = \"1\"\nwindow = \"day\"\nscope = \"everyone\"\n[[budgets]]\nname = \"all\"\namount_usd = \"1\"\nwindow = \"7d\"\nscope = \"everyone\"\n",
        )
        .unwrap()["budgets"]
            .clone()
            .try_into()
            .unwrap(),
        Default::default(),
    )
    .unwrap();
    let keys: Vec<_> = ["me", "team", "all"]
        .iter()
        .map(|n| tollgate_core::budget::InstanceKey {
            budget: Arc::clone(set.get(n).unwrap()),
            member: (*n == "me").then(|| Arc::from("okta:alice")),
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("tg-bench-journal-{}", std::process::id()));
    let (tx, rx) = crossbeam_channel::bounded(1 << 20);
    let j = tollgate_dataplane::spend::journal::Journal::new(&dir, "bench-c0", tx);
    let now = jiff::Timestamp::now();
    c.bench_function("settle/journal_append_3_budgets", |b| {
        b.iter(|| {
            j.record(
                black_box(&keys),
                Money::from_pico(13_350_000),
                now,
                None,
                None,
            )
            .unwrap();
            if rx.len() > 100_000 {
                while rx.try_recv().is_ok() {}
            }
        })
    });
    // What a crash-safe request adds at admission: its reservation journaled (one more line, one more
    // write(2)), closed by the settlement line (which then carries the reservation's id). The difference
    // to `settle/journal_append_3_budgets` is the admission's price.
    c.bench_function("settle/journal_reserve_then_settle_3_budgets", |b| {
        b.iter(|| {
            let id = j
                .reserve(black_box(&keys), Money::from_pico(40_000_000), now)
                .unwrap();
            j.record(
                black_box(&keys),
                Money::from_pico(13_350_000),
                now,
                id,
                None,
            )
            .unwrap();
            if rx.len() > 100_000 {
                while rx.try_recv().is_ok() {}
            }
        })
    });
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("fsync.log"))
        .unwrap();
    // A request that never reached a provider: reservation line, then a release line.
    c.bench_function("settle/journal_reserve_then_release_3_budgets", |b| {
        b.iter(|| {
            let id = j
                .reserve(black_box(&keys), Money::from_pico(40_000_000), now)
                .unwrap();
            j.release(id.unwrap()).unwrap();
        })
    });
    c.bench_function("settle/baseline_fsync_each", |b| {
        b.iter(|| {
            use std::io::Write;
            (&f).write_all(b"{\"q\":1}\n").unwrap();
            f.sync_data().unwrap();
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, input_bound, reserve_settle, journal);
criterion_main!(benches);
