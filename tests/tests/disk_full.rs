//! A full disk: sends, halves and nacks get `STORAGE_FULL`, nothing already
//! acknowledged is damaged, and the broker serves again as soon as space
//! returns, without a restart.
//!
//! The data directory is a small tmpfs mounted for the test, then grown with
//! `mount -o remount,size=...`. Mounting needs root (CI runs as root); where
//! it is refused the test says so on stderr and checks nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use halfmq_client::{Client, Code, Consumer, Message, Producer, TransactionProducer};
use halfmq_tests::{start, test_config, Tmpfs};

/// Receives and acks until `want` distinct bodies arrived or 10 s passed;
/// body → times received.
async fn drain(c: &Consumer, want: usize) -> HashMap<Vec<u8>, u32> {
    let mut seen: HashMap<Vec<u8>, u32> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < want && Instant::now() < deadline {
        for m in c.receive(64, Duration::from_millis(300)).await.unwrap() {
            *seen.entry(m.body.to_vec()).or_default() += 1;
            c.ack(&m).await.unwrap();
        }
    }
    seen
}

fn body(i: u32) -> Vec<u8> {
    let mut b = format!("{i:08}:").into_bytes();
    b.resize(4096, b'a' + (i % 26) as u8);
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_refuses_cleanly_and_recovers_when_space_returns() {
    let Some(fs) = Tmpfs::mount("6m") else {
        eprintln!("disk_full: skipped, cannot mount a tmpfs here (needs root)");
        return;
    };
    let data: PathBuf = fs.path().join("data");
    let cfg = halfmq_broker::BrokerConfig {
        segment_bytes: 1 << 20,
        checkpoint_interval_ms: 100,
        ..test_config(&data)
    };
    let b = start(cfg.clone()).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let p = Producer::new(c.clone());

    // Fill the disk: every send before the first refusal is acknowledged.
    let mut acked = 0u32;
    let err = loop {
        match p.send(Message::new("full", body(acked))).await {
            Ok(_) => acked += 1,
            Err(e) => break e,
        }
        assert!(acked < 10_000, "the 6 MiB disk never filled");
    };
    assert_eq!(err.code(), Some(Code::StorageFull), "{err}");
    assert!(acked > 100, "only {acked} sends fit");
    // Further writes of every kind are refused the same way, and store nothing.
    for i in 0..5 {
        let e = p
            .send(Message::new("full", body(1_000_000 + i)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::StorageFull), "{e}");
    }
    let tp = TransactionProducer::new(c.clone(), "pg-full", |_m: halfmq_client::MessageView| {
        std::future::ready(halfmq_client::TransactionResolution::Unknown)
    });
    let e = tp
        .send_half(Message::new("full", body(2_000_000)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::StorageFull), "{e}");
    // A refused send, half or delayed send to a topic that did not exist
    // leaves no topic behind.
    let e = p.send(Message::new("fresh", "x")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::StorageFull), "{e}");
    let e = tp
        .send_half(Message::new("fresh-half", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::StorageFull), "{e}");
    let e = p
        .send(Message::new("fresh-delayed", "x").with_delay(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::StorageFull), "{e}");
    let names: Vec<String> = halfmq_client::Admin::new(c.clone())
        .list_topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["full".to_owned()], "topics after refused sends");

    // Reads and acks still work: every acknowledged message, intact, once.
    let cons = Consumer::new(c.clone(), "g1", "full");
    let seen = drain(&cons, acked as usize).await;
    assert_eq!(seen.len(), acked as usize);
    for i in 0..acked {
        assert_eq!(seen.get(&body(i)), Some(&1), "message {i}");
    }

    // Space returns: the same broker takes writes again.
    fs.resize("64m");
    for i in 0..50 {
        p.send(Message::new("full", body(acked + i))).await.unwrap();
    }
    let more = drain(&cons, 50).await;
    assert_eq!(more.len(), 50);
    assert!((acked..acked + 50).all(|i| more.contains_key(&body(i))));
    tokio::time::sleep(Duration::from_millis(300)).await; // a checkpoint

    // And after a restart, a new group reads everything acknowledged, nothing else.
    drop((p, tp, cons, c));
    b.shutdown().await.unwrap();
    let b = start(cfg).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let all = drain(&Consumer::new(c, "g2", "full"), acked as usize + 50).await;
    assert_eq!(all.len(), acked as usize + 50);
    assert!(all.values().all(|&n| n == 1));
    assert!((0..acked + 50).all(|i| all.contains_key(&body(i))));
    b.shutdown().await.unwrap();
}

/// With no free-space floor the disk really fills (`ENOSPC`). The worst
/// moment: the record still fits in the log's last page but its consume-queue
/// entry needs a new file. The space for that file is allocated before the
/// log append, so the append is refused whole, nothing is poisoned, and the
/// store takes appends again once space returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_refuses_whole_appends_on_enospc() {
    use halfmq_storage::{Record, RecordKind, Store, StoreConfig};
    use std::io::Write;
    let Some(fs) = Tmpfs::mount("4m") else {
        eprintln!("disk_full: skipped, cannot mount a tmpfs here (needs root)");
        return;
    };
    let mut cfg = StoreConfig::new(fs.path().join("data"));
    cfg.segment_bytes = 1 << 20;
    cfg.max_record_bytes = 64 << 10;
    cfg.cq_entries_per_file = 16; // entry 16 needs a new consume-queue file
    cfg.min_free_disk_bytes = 0;
    let rec = |i: usize, len: usize| Record {
        topic: "x".into(),
        body: bytes::Bytes::from(vec![b'a' + (i % 26) as u8; len]),
        ..Record::default()
    };
    let store = Store::open(cfg.clone()).unwrap();
    let mut end = 0;
    for i in 0..16 {
        let r = store.append(vec![rec(i, 100)]).unwrap();
        store.wait_durable(r.end).await.unwrap();
        end = r.end;
    }
    // Pad the log (with a kind that has no consume-queue entry) so that its
    // last page has room for one more small record.
    while 4096 - end % 4096 < 400 || 4096 - end % 4096 > 3000 {
        let pad = Record {
            kind: RecordKind::Half,
            ..rec(0, 200)
        };
        end = store.append(vec![pad]).unwrap().end;
    }
    // Fill every free page of the filesystem.
    let mut filler = std::fs::File::create(fs.path().join("filler")).unwrap();
    while filler.write_all(&[0u8; 4096]).is_ok() {}
    let e = store.append(vec![rec(16, 100)]).unwrap_err();
    assert!(e.is_storage_full(), "{e}");
    drop(filler);
    std::fs::remove_file(fs.path().join("filler")).unwrap();
    for i in 16..40 {
        let r = store.append(vec![rec(i, 100)]).unwrap();
        store.wait_durable(r.end).await.unwrap();
    }
    store.close().unwrap();
    drop(store);
    let store = Store::open(cfg).unwrap();
    assert_eq!(store.max_queue_offset("x", 0), 40);
    for i in 0..40 {
        let m = store.read_queue("x", 0, i as u64).unwrap();
        assert_eq!(m.record.body, rec(i, 100).body, "entry {i}");
    }
}
