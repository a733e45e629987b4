//! Measures the memory the dedup index takes per idempotency key: fills a
//! `DedupIndex` with N stored keys and reports the growth of the resident
//! set (`/proc/self/statm`) divided by N.
//!
//! `cargo run --release -p halfmq-broker --example dedup_memory [N]`
//! (default N = 2,000,000, the default `max_dedup_keys`).

use halfmq_broker::core::dedup::{key_id, DedupIndex, FirstSend};
use halfmq_storage::MessageId;

/// Resident set size in bytes (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let before = rss_bytes();
    let mut d = DedupIndex::new(u64::MAX / 2, n as usize);
    for i in 0..n {
        let k = key_id("orders", &format!("0123456789abcdef-{i}"));
        d.stored(
            k,
            i,
            FirstSend {
                offset: i * 1100,
                end: i * 1100 + 1100,
                message_id: MessageId([7; 16]),
                queue_id: (i % 8) as u32,
                queue_offset: Some(i),
                deliver_at_ms: 0,
            },
        );
    }
    let after = rss_bytes();
    println!(
        "{n} keys: resident set grew by {} bytes, {} bytes per key (index holds {})",
        after - before,
        (after - before) / n,
        d.len()
    );
}
