//! A damaged metadata store (sled): the broker starts, says what it could
//! not read, rebuilds what is derived from the commit log (consume queues,
//! topics, transaction state), and loses no message. Consumer progress that
//! is lost means redeliveries, never a skipped message.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use halfmq_client::{Admin, Client, Consumer, Message, MessageView, Producer};
use halfmq_tests::{start, test_config};

/// Sends 30 messages to topic "m" (3 queues), acks the first 10 in group
/// "g", leaves one half pending, and shuts down cleanly. Returns the bodies
/// and those acked by "g".
async fn populate(dir: &Path) -> (Vec<String>, HashSet<String>) {
    let b = start(test_config(dir)).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    Admin::new(c.clone()).create_topic("m", 3).await.unwrap();
    let p = Producer::new(c.clone());
    let bodies: Vec<String> = (0..30).map(|i| format!("m{i}")).collect();
    for body in &bodies {
        p.send(Message::new("m", body.clone())).await.unwrap();
    }
    let cons = Consumer::new(c.clone(), "g", "m");
    let mut acked = HashSet::new();
    while acked.len() < 10 {
        let want = 10 - acked.len() as u32;
        for m in cons
            .receive(want, Duration::from_millis(300))
            .await
            .unwrap()
        {
            cons.ack(&m).await.unwrap();
            acked.insert(String::from_utf8(m.body.to_vec()).unwrap());
        }
    }
    let tp = halfmq_client::TransactionProducer::new(c.clone(), "pg", |_m: MessageView| {
        std::future::ready(halfmq_client::TransactionResolution::Unknown)
    });
    tp.send_half(Message::new("m", "half")).await.unwrap();
    drop((p, cons, tp, c));
    b.shutdown().await.unwrap();
    (bodies, acked)
}

async fn drain(c: &Client, group: &str, want: usize) -> HashSet<String> {
    let cons = Consumer::new(c.clone(), group, "m");
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while seen.len() < want && Instant::now() < deadline {
        for m in cons.receive(32, Duration::from_millis(300)).await.unwrap() {
            seen.insert(String::from_utf8(m.body.to_vec()).unwrap());
            cons.ack(&m).await.unwrap();
        }
    }
    seen
}

/// Restarts on `dir` and checks nothing was lost; returns the store's
/// metadata report.
async fn check_restart(
    dir: &Path,
    (bodies, acked): &(Vec<String>, HashSet<String>),
) -> halfmq_storage::MetaReport {
    let b = start(test_config(dir)).await;
    let report = b.broker.store().meta_report().clone();
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let admin = Admin::new(c.clone());
    let topics = admin.list_topics().await.unwrap();
    let m = topics
        .iter()
        .find(|t| t.name == "m")
        .expect("topic m is there");
    assert!(m.queues >= 1 && m.queues <= 3, "{} queues", m.queues);
    // A new group sees every message; group g at least the 20 it never acked.
    static FRESH: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let fresh = format!(
        "fresh{}",
        FRESH.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let all = drain(&c, &fresh, bodies.len()).await;
    assert_eq!(all, bodies.iter().cloned().collect::<HashSet<_>>());
    let g = drain(&c, "g", bodies.len()).await;
    if report.is_clean() {
        assert!(g.is_disjoint(acked), "group g's acks were kept");
    } else {
        // Progress may be lost (redeliveries); a message never acked never is.
        let unacked: HashSet<String> = bodies
            .iter()
            .filter(|b| !acked.contains(*b))
            .cloned()
            .collect();
        assert!(
            g.is_superset(&unacked),
            "group g got {} of its 20 unacked",
            g.len()
        );
    }
    // The pending half is still pending (rebuilt from the log if need be).
    let pending = admin.list_transactions().await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    b.shutdown().await.unwrap();
    report
}

fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    let at = at.min(b.len() - 1);
    b[at] ^= 0x40;
    std::fs::write(path, b).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_metadata_is_set_aside_and_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let history = populate(dir.path()).await;
    flip(&dir.path().join("meta/conf"), 5);
    let report = check_restart(dir.path(), &history).await;
    let (aside, why) = report.set_aside.expect("set aside");
    assert!(aside.exists(), "kept at {}", aside.display());
    assert!(!why.is_empty());
    // A second restart is clean: the new metadata store was saved.
    let report = check_restart(dir.path(), &history).await;
    assert!(report.is_clean(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_that_lost_writes_is_detected_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let history = populate(dir.path()).await;
    let pristine = tempfile::tempdir().unwrap();
    copy_dir(dir.path(), pristine.path());
    let len = std::fs::metadata(dir.path().join("meta/db")).unwrap().len() as usize;
    let mut detected = 0;
    // sled's file layout depends on the run; flip at several places. Where a
    // flip costs sled data, it must be reported; and never may a message be lost.
    for at in [16, len / 20, len / 4, len / 2, len * 3 / 4] {
        std::fs::remove_dir_all(dir.path()).unwrap();
        copy_dir(pristine.path(), dir.path());
        flip(&dir.path().join("meta/db"), at);
        let report = check_restart(dir.path(), &history).await;
        if report.lost_writes.is_some() || report.set_aside.is_some() {
            detected += 1;
        }
    }
    assert!(detected > 0, "no flip was noticed: the test did not test");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}
