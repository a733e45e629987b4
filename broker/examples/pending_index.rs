//! Measures the in-memory pending-half index at scale: resident memory per
//! pending half and the cost of add / resolve / next-due with 1,000,000
//! pending halves (the scheduler plus the per-half dirty set the broker keeps
//! until its next checkpoint).
//!
//! ```text
//! cargo run --release -p halfmq-broker --example pending_index -- [COUNT]
//! ```

use std::collections::HashSet;
use std::time::Instant;

use halfmq_broker::core::txcheck::{CheckConfig, CheckScheduler};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let cfg = CheckConfig {
        transaction_timeout_ms: 6_000,
        check_interval_ms: 30_000,
        check_max: 15,
        check_reply_timeout_ms: 10_000,
    };
    let before = rss_bytes();
    let mut sched = CheckScheduler::new(cfg);
    let mut dirty = HashSet::new();
    let t = Instant::now();
    for i in 0..n {
        // Offsets 1,100 bytes apart, stored 1 ms apart: realistic ordering.
        sched.add(i * 1100, (i % 8) as u32, (i % 16) as u32, i);
        dirty.insert(i * 1100);
    }
    let add_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let after = rss_bytes();
    println!(
        "{n} pending halves: {:.1} MiB resident, {:.0} bytes per half (scheduler + dirty set)",
        (after - before) as f64 / (1 << 20) as f64,
        (after - before) as f64 / n as f64
    );
    println!("add: {add_ns:.0} ns per half");
    // With the index full: a send (add) and an end (remove) each.
    let t = Instant::now();
    let k = 100_000u64;
    for i in 0..k {
        let off = (n + i) * 1100;
        sched.add(off, 0, 0, n + i);
        sched.remove(off);
    }
    println!(
        "add + resolve with {n} pending: {:.0} ns per transaction",
        t.elapsed().as_nanos() as f64 / k as f64
    );
    let t = Instant::now();
    let m = sched.min_offset();
    println!(
        "min_offset with {n} pending: {:.3} ms ({m:?})",
        t.elapsed().as_secs_f64() * 1e3
    );
    // Realistic churn: 64 in flight, the oldest of them resolved per new one.
    let t = Instant::now();
    for i in 0..k {
        let off = (n + k + i) * 1100;
        sched.add(off, 0, 0, n + k + i);
        if i >= 64 {
            sched.remove((n + k + i - 64) * 1100);
        }
    }
    println!(
        "add + resolve, 64 in flight, with {n} pending: {:.0} ns per transaction",
        t.elapsed().as_nanos() as f64 / k as f64
    );
    let t = Instant::now();
    let mut due = 0;
    for _ in 0..k {
        if sched.next_due(0).is_some() {
            due += 1;
        }
    }
    println!(
        "next_due with {n} pending: {:.0} ns per call ({due} due)",
        t.elapsed().as_nanos() as f64 / k as f64
    );
}
