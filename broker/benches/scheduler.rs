//! Criterion benches of the check-back scheduler and the retry policy.
//!
//! ```text
//! cargo bench -p halfmq-broker --bench scheduler
//! ```
#![allow(missing_docs)]

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use halfmq_broker::core::retry::{parse_delays, RetryPolicy, DEFAULT_RETRY_DELAYS};
use halfmq_broker::core::txcheck::{CheckConfig, CheckScheduler};

fn cfg() -> CheckConfig {
    CheckConfig {
        transaction_timeout_ms: 6_000,
        check_interval_ms: 30_000,
        check_max: 15,
        check_reply_timeout_ms: 10_000,
    }
}

fn filled(n: u64) -> CheckScheduler {
    let mut s = CheckScheduler::new(cfg());
    for i in 0..n {
        s.add(i * 1100, 0, 0, i);
    }
    s
}

fn scheduler(c: &mut Criterion) {
    let mut g = c.benchmark_group("check_scheduler");
    for n in [1_000u64, 1_000_000] {
        let mut s = filled(n);
        let mut next = n;
        g.bench_function(format!("add_and_resolve_with_{n}_pending"), |b| {
            b.iter(|| {
                let off = next * 1100;
                next += 1;
                s.add(off, 0, 0, next);
                s.remove(off)
            })
        });
    }
    // 100 check cycles (due -> sent -> answered UNKNOWN) over 1,000 due halves.
    g.bench_function("100_check_cycles_of_1000_due_halves", |b| {
        b.iter_batched(
            || filled(1_000),
            |mut s| {
                let now = 1_000_000;
                for _ in 0..100 {
                    if let Some(halfmq_broker::core::txcheck::Due::Check(o)) = s.next_due(now) {
                        s.check_sent(o, now);
                        s.answered_unknown(o, now);
                    }
                }
                s
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
    let p = RetryPolicy {
        delays_ms: parse_delays(DEFAULT_RETRY_DELAYS).unwrap(),
        max_reconsume_times: 16,
    };
    c.bench_function("retry_policy/after_failure", |b| {
        let mut n = 0u32;
        b.iter(|| {
            n = (n + 1) % 20;
            p.after_failure(n, None)
        })
    });
}

criterion_group!(benches, scheduler);
criterion_main!(benches);
