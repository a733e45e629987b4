//! Damaged bytes found at start-up: one flipped bit in an old commit-log
//! record must not make the broker forget the pending transactions and
//! delayed messages after it, and a zeroed consume-queue entry must not
//! drop an acked message. Both were found by a hostile tester (#24).

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use halfmq_client::{
    Admin, Client, Consumer, Message, MessageView, Producer, TransactionProducer,
    TransactionResolution,
};
use halfmq_tests::{start, test_config};

fn flip(path: &Path, at: u64, bits: u8) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ bits], at).unwrap();
    f.sync_all().unwrap();
}

/// The first record of the log is a 1 KiB message to topic "early"; then 5
/// halves (producer group "pg") and 3 messages delayed by an hour. Returns
/// the halves' transaction ids.
async fn populate(dir: &Path) -> Vec<String> {
    let b = start(test_config(dir)).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    Producer::new(c.clone())
        .send(Message::new("early", vec![b'e'; 1024]))
        .await
        .unwrap();
    let tp = TransactionProducer::new(c.clone(), "pg", |_m: MessageView| async {
        TransactionResolution::Unknown
    });
    let mut txs = Vec::new();
    for i in 0..5 {
        let t = tp
            .send_half(Message::new("orders", format!("half {i}")))
            .await
            .unwrap();
        txs.push(t.transaction_id);
    }
    let p = Producer::new(c.clone());
    for i in 0..3 {
        p.send(Message::new("later", format!("delayed {i}")).with_delay(Duration::from_secs(3600)))
            .await
            .unwrap();
    }
    drop((tp, p, c));
    b.shutdown().await.unwrap();
    txs
}

async fn pending_after_damage(damage: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let txs = populate(dir.path()).await;
    damage(&dir.path().join("commitlog/00000000000000000000"));
    let b = start(test_config(dir.path())).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let s = Admin::new(c.clone()).stats().await.unwrap();
    assert_eq!(
        (s.pending_halves, s.delayed_messages),
        (5, 3),
        "every readable half and delayed message is kept"
    );
    // The producer's own commit still finds its half.
    halfmq_client::end_transaction(
        &c,
        &txs[2],
        TransactionResolution::Commit,
        halfmq_client::EndSource::Producer,
    )
    .await
    .unwrap();
    let cons = Consumer::new(c.clone(), "g", "orders");
    let got = cons.receive(8, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"half 2");
    // The damaged message itself is never served.
    let early = Consumer::new(c, "g", "early");
    assert!(early
        .receive(8, Duration::from_millis(300))
        .await
        .unwrap()
        .is_empty());
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_body_bit_before_pending_halves_loses_none_of_them() {
    // A bit in the first message's body (its length field intact).
    pending_after_damage(|seg| flip(seg, 600, 0x10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_length_bit_before_pending_halves_loses_none_of_them() {
    // A bit in the first record's length: the replay must find the next
    // record by its frame.
    pending_after_damage(|seg| flip(seg, 1, 0x01)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zeroed_consume_queue_entry_loses_no_acked_message() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    Admin::new(c.clone()).create_topic("cq", 1).await.unwrap();
    let p = Producer::new(c.clone());
    for i in 0..300 {
        p.send(Message::new("cq", format!("m{i}"))).await.unwrap();
    }
    // Group g has consumed (and acked) the first 150.
    let g = Consumer::new(c.clone(), "g", "cq");
    let mut n = 0;
    while n < 150 {
        for m in g.receive(150 - n, Duration::from_secs(1)).await.unwrap() {
            g.ack(&m).await.unwrap();
            n += 1;
        }
    }
    drop((p, g, c));
    b.shutdown().await.unwrap();
    // Bytes 8..12 (the size) of entry 200 zeroed while stopped.
    let cq = dir.path().join("consumequeue/cq/0/00000000000000000000");
    let f = std::fs::OpenOptions::new().write(true).open(&cq).unwrap();
    f.write_all_at(&[0u8; 4], 200 * 20 + 8).unwrap();
    drop(f);
    for restart in 0..2 {
        let b = start(test_config(dir.path())).await;
        let c = Client::connect(&b.addr.to_string()).await.unwrap();
        let group = if restart == 0 { "g" } else { "fresh" };
        let want = if restart == 0 { 150 } else { 300 };
        let cons = Consumer::new(c.clone(), group, "cq");
        let mut seen = HashSet::new();
        loop {
            let got = cons.receive(64, Duration::from_millis(500)).await.unwrap();
            if got.is_empty() {
                break;
            }
            for m in got {
                cons.ack(&m).await.unwrap();
                seen.insert(String::from_utf8(m.body.to_vec()).unwrap());
            }
        }
        assert!(seen.contains("m200"), "restart {restart}: m200 delivered");
        assert_eq!(seen.len(), want, "restart {restart}");
        drop((cons, c));
        b.shutdown().await.unwrap();
    }
}
