//! Crash test: a child process appends with sync flush and prints every
//! acknowledged physical offset; the parent SIGKILLs it at a random moment,
//! reopens the store and checks that every acknowledged record is intact.
//!
//! The child is this same test binary, re-run with `HALFMQ_CRASH_CHILD` set.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{body, rec};
use halfmq_storage::{FlushMode, Store, StoreConfig};
use rand::Rng;

const CHILD_ENV: &str = "HALFMQ_CRASH_CHILD";

fn config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_bytes = 256 * 1024; // several rolls per run
    c.max_record_bytes = 64 * 1024;
    c.flush = FlushMode::Sync;
    c
}

/// The child: 8 concurrent appenders, each printing "<i> <offset>" once its
/// append is durable. Runs until killed.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let store = std::sync::Arc::new(Store::open(config(std::path::Path::new(&dir))).unwrap());
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let store = store.clone();
            let next = next.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let r = store
                        .append_durable(vec![rec("crash", (i % 3) as u32, &body(i))])
                        .await
                        .unwrap();
                    println!("{i} {}", r.offsets[0]);
                    if i.is_multiple_of(500) {
                        store.checkpoint().unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn sigkill_loses_no_acknowledged_record() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut acked: Vec<(usize, u64)> = Vec::new();
    for round in 0..6 {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let kill_after = Duration::from_millis(rng.gen_range(50..600));
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut it = line.split_whitespace();
                if let (Some(i), Some(o)) = (it.next(), it.next()) {
                    if let (Ok(i), Ok(o)) = (i.parse::<usize>(), o.parse::<u64>()) {
                        got.push((i, o));
                    }
                }
            }
            got
        });
        let start = Instant::now();
        while start.elapsed() < kill_after {
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let got = reader.join().unwrap();
        // Record indexes restart at 0 in each round: key them by round.
        acked.extend(got.into_iter().map(|(i, o)| (round * 1_000_000 + i, o)));

        let store = Store::open(config(dir.path())).unwrap();
        for (i, off) in &acked {
            let r = store
                .log()
                .read(*off)
                .unwrap_or_else(|e| panic!("acked record {i} at {off} lost: {e}"));
            assert_eq!(
                &r.body[..],
                &body(i % 1_000_000)[..],
                "record {i} corrupted"
            );
            let qo = r.queue_offset.expect("normal records have a queue offset");
            let m = store.read_queue("crash", r.queue_id, qo).unwrap();
            assert_eq!(
                m.physical_offset, *off,
                "consume queue entry of record {i} is wrong"
            );
        }
        store.close().unwrap();
    }
    assert!(
        acked.len() > 100,
        "the child acknowledged only {} records",
        acked.len()
    );
}
