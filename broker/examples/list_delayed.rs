//! How long sends and ends wait while `halfmq tx pending` lists halves behind
//! 1,000,000 delayed messages (they share the offset-ordered pending index).
//!
//! `cargo run --release -p halfmq-broker --example list_delayed -- [GAP_MS|none]`
//!
//! A thread lists pending transactions in a loop, `GAP_MS` (default 50; 0 =
//! back to back) apart, or not at all with `none`, while a task sends a half
//! and commits it, over and over, for 3 s (async flush). Prints the listings'
//! average walk, how many half + end pairs completed and the slowest one.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq_broker::config::FlushSetting;
use halfmq_broker::core::transactions::{EndSource, Resolution};
use halfmq_broker::core::{OutgoingMessage, QueueChoice, SystemClock};
use halfmq_broker::{Broker, BrokerConfig};

fn message(delay_ms: u64) -> OutgoingMessage {
    OutgoingMessage {
        topic: "t".into(),
        queue: QueueChoice::RoundRobin,
        tag: String::new(),
        keys: Vec::new(),
        properties: Vec::new(),
        body: bytes::Bytes::from_static(b"x"),
        delay_ms,
        idempotency_key: None,
        message_group: None,
        origin: None,
    }
}

#[tokio::main]
async fn main() {
    let arg = std::env::args().nth(1).unwrap_or_else(|| "50".into());
    let gap = match arg.as_str() {
        "none" => None,
        ms => Some(Duration::from_millis(ms.parse().expect("GAP_MS or none"))),
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let cfg = BrokerConfig {
        data_dir: dir.path().to_path_buf(),
        flush: FlushSetting::Async,
        ..BrokerConfig::default()
    };
    let b = Broker::open(cfg, Arc::new(SystemClock)).expect("open the broker");
    for _ in 0..1_000 {
        let delayed = (0..1_000).map(|_| message(3_600_000)).collect();
        b.send(delayed).await.expect("send delayed messages");
    }
    b.send_half("pg", message(0)).await.expect("send a half");

    let stop = Arc::new(AtomicBool::new(false));
    let lister = {
        let (b, stop) = (Arc::clone(&b), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut walks = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let Some(gap) = gap else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let t = Instant::now();
                assert!(!b.list_transactions(10_000).is_empty());
                walks.push(t.elapsed());
                std::thread::sleep(gap);
            }
            walks
        })
    };
    let (mut done, mut slowest) = (0u64, Duration::ZERO);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let t = Instant::now();
        let h = b.send_half("pg", message(0)).await.expect("send a half");
        b.end_transaction(&h.transaction_id, Resolution::Commit, EndSource::Producer)
            .await
            .expect("commit");
        slowest = slowest.max(t.elapsed());
        done += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let walks = lister.join().expect("lister thread");
    let avg = walks.iter().sum::<Duration>() / walks.len().max(1) as u32;
    println!(
        "listings {} (average walk {avg:?}); half + end: {done} done, slowest {slowest:?}",
        walks.len()
    );
    b.shutdown().await.expect("shut down");
}
