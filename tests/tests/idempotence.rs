//! Exactly-once publish (issue 17): a repeated idempotency key stores
//! nothing and returns the first send's receipt, also after a restart or
//! SIGKILL; lost replies are retried by the client and stored once.

use std::time::Duration;

use halfmq_client::{
    Admin, Client, Code, Message, MessageView, Producer, ProducerOptions, TransactionProducer,
    TransactionResolution,
};
use halfmq_tests::{start, stored, test_config, BrokerProcess};

async fn count(c: &Client, topic: &str) -> u64 {
    stored(&Admin::new(c.clone()), topic).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_key_is_stored_once_and_gets_the_first_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        dedup_window_ms: 1_000,
        ..test_config(dir.path())
    };
    let b = start(cfg.clone()).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    Admin::new(c.clone()).create_topic("t", 2).await.unwrap();
    let p = Producer::new(c.clone());
    let first = p
        .send(Message::new("t", "a").with_idempotency_key("k1"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    // Same key, another body: still a duplicate (the key is the identity).
    let again = p
        .send(Message::new("t", "b").with_idempotency_key("k1"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (&again.message_id, again.queue_id, again.queue_offset),
        (&first.message_id, first.queue_id, first.queue_offset)
    );
    // A batch with a stored key and a repeat inside it: only k2 is stored.
    let rs = p
        .send_batch(vec![
            Message::new("t", "c").with_idempotency_key("k2"),
            Message::new("t", "d").with_idempotency_key("k1"),
            Message::new("t", "e").with_idempotency_key("k2"),
        ])
        .await
        .unwrap();
    assert_eq!(
        rs.iter().map(|r| r.duplicate).collect::<Vec<_>>(),
        [false, true, true]
    );
    assert_eq!(rs[2].message_id, rs[0].message_id);
    assert_eq!(count(&c, "t").await, 2);
    // Automatic keys: distinct sends are all stored.
    for i in 0..5 {
        assert!(
            !p.send(Message::new("t", format!("{i}")))
                .await
                .unwrap()
                .duplicate
        );
    }
    assert_eq!(count(&c, "t").await, 7);
    // Bad keys.
    for k in [String::new(), "x".repeat(129)] {
        let e = p
            .send(Message::new("t", "z").with_idempotency_key(k))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::BadRequest), "{e}");
    }
    // Across a restart (the index is rebuilt from the log).
    let k3 = p
        .send(Message::new("t", "f").with_idempotency_key("k3"))
        .await
        .unwrap();
    drop((p, c));
    b.shutdown().await.unwrap();
    let b = start(cfg).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let p = Producer::new(c.clone());
    let r = p
        .send(Message::new("t", "f").with_idempotency_key("k3"))
        .await
        .unwrap();
    assert!(r.duplicate);
    assert_eq!(r.message_id, k3.message_id);
    assert_eq!(count(&c, "t").await, 8);
    // After the window, the key is stored again.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let r = p
        .send(Message::new("t", "f").with_idempotency_key("k3"))
        .await
        .unwrap();
    assert!(!r.duplicate);
    assert_eq!(count(&c, "t").await, 9);
    b.shutdown().await.unwrap();
}

/// Reads one HTTP/2 frame: (9-byte header, payload), or `None` at the end.
async fn frame(r: &mut (impl tokio::io::AsyncRead + Unpin)) -> Option<([u8; 9], Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).await.ok()?;
    Some((head, payload))
}

/// The stream id of a frame header.
fn stream_of(head: &[u8; 9]) -> u32 {
    u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & !(1 << 31)
}

/// A TCP proxy in front of `broker` that loses replies: the first time a
/// request stream carries one of `markers` in a DATA frame, the first
/// response frame on that stream (HTTP/2 HEADERS or DATA) is dropped and
/// the connection closed. Everything else passes through.
async fn reply_losing_proxy(
    broker: std::net::SocketAddr,
    markers: &'static [&'static [u8]],
) -> std::net::SocketAddr {
    use std::sync::{Arc, Mutex};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // Markers whose reply is still to be lost.
    let left = Arc::new(Mutex::new(markers.to_vec()));
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = l.accept().await else {
                return;
            };
            let left = Arc::clone(&left);
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(broker).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                // (stream, marker) of requests that carried a marker.
                let marked = Arc::new(Mutex::new(Vec::<(u32, &'static [u8])>::new()));
                let m = Arc::clone(&marked);
                let up = tokio::spawn(async move {
                    let mut preface = [0u8; 24];
                    if cr.read_exact(&mut preface).await.is_err()
                        || sw.write_all(&preface).await.is_err()
                    {
                        return;
                    }
                    while let Some((head, payload)) = frame(&mut cr).await {
                        for &k in markers {
                            if head[3] == 0 && payload.windows(k.len()).any(|w| w == k) {
                                m.lock().unwrap().push((stream_of(&head), k));
                            }
                        }
                        if sw.write_all(&head).await.is_err()
                            || sw.write_all(&payload).await.is_err()
                        {
                            return;
                        }
                    }
                });
                while let Some((head, payload)) = frame(&mut sr).await {
                    let stream = stream_of(&head);
                    let reply = head[3] == 0 || head[3] == 1;
                    let lost = reply && {
                        let mut left = left.lock().unwrap();
                        let hit = marked.lock().unwrap().iter().find_map(|(s, k)| {
                            (*s == stream)
                                .then(|| left.iter().position(|l| l == k))
                                .flatten()
                        });
                        hit.map(|i| left.remove(i)).is_some()
                    };
                    if lost {
                        break; // the reply is lost with the connection
                    }
                    if cw.write_all(&head).await.is_err() || cw.write_all(&payload).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_or_half_whose_reply_is_lost_is_retried_and_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let direct = Client::connect(&b.addr.to_string()).await.unwrap();
    let admin = Admin::new(direct.clone());
    admin.create_topic("t", 1).await.unwrap();
    let proxy = reply_losing_proxy(b.addr, &[b"LOSE-SEND", b"LOSE-HALF"]).await;
    let c = Client::connect(&proxy.to_string()).await.unwrap();

    // A plain send with an automatic key.
    let p = Producer::new(c.clone());
    let r = p.send(Message::new("t", "LOSE-SEND")).await.unwrap();
    assert!(
        r.duplicate,
        "the retry found the first send's record: {r:?}"
    );
    assert_eq!(stored(&admin, "t").await, 1);

    // A half: one transaction, committed once.
    let tp = TransactionProducer::new(c.clone(), "pg", |_v: MessageView| async {
        TransactionResolution::Unknown
    });
    let tx = tp.send_half(Message::new("t", "LOSE-HALF")).await.unwrap();
    assert!(tx.duplicate, "{tx:?}");
    let pending = admin.list_transactions().await.unwrap();
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].transaction_id, tx.transaction_id);
    tx.commit().await.unwrap();
    assert_eq!(stored(&admin, "t").await, 2);

    // Without keys a lost reply is not retried: the outcome is unknown.
    let proxy2 = reply_losing_proxy(b.addr, &[b"LOSE-RAW"]).await;
    let raw_c = Client::connect(&proxy2.to_string()).await.unwrap();
    let raw2 = Producer::with_options(
        raw_c,
        ProducerOptions {
            auto_idempotency_keys: false,
            ..ProducerOptions::default()
        },
    );
    let e = raw2.send(Message::new("t", "LOSE-RAW")).await.unwrap_err();
    assert!(matches!(e, halfmq_client::ClientError::Transport(_)), "{e}");
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_half_is_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let admin = Admin::new(c.clone());
    admin.create_topic("t", 2).await.unwrap();
    let tp = TransactionProducer::new(c.clone(), "pg", |_v: MessageView| async {
        TransactionResolution::Unknown
    });
    let first = tp
        .send_half(Message::new("t", "a").with_idempotency_key("order-1"))
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = tp
        .send_half(Message::new("t", "b").with_idempotency_key("order-1"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (&again.transaction_id, &again.message_id, again.queue_id),
        (&first.transaction_id, &first.message_id, first.queue_id)
    );
    assert_eq!(admin.list_transactions().await.unwrap().len(), 1);
    again.commit().await.unwrap();
    first.commit().await.unwrap(); // idempotent
                                   // Repeated after its commit: still the same transaction, nothing new.
    let later = tp
        .send_half(Message::new("t", "c").with_idempotency_key("order-1"))
        .await
        .unwrap();
    assert!(later.duplicate);
    assert_eq!(later.transaction_id, first.transaction_id);
    assert!(admin.list_transactions().await.unwrap().is_empty());
    let e = later.rollback().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::TransactionConflict), "{e}");
    let cons = halfmq_client::Consumer::new(c.clone(), "g", "t");
    let got = cons.receive(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"a");
    assert_eq!(got[0].message_id, first.message_id);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_dedup_keys_bounds_the_index_and_says_what_it_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(halfmq_broker::BrokerConfig {
        max_dedup_keys: 3,
        ..test_config(dir.path())
    })
    .await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let admin = Admin::new(c.clone());
    admin.create_topic("t", 1).await.unwrap();
    let p = Producer::new(c.clone());
    for i in 0..5 {
        p.send(Message::new("t", "x").with_idempotency_key(format!("k{i}")))
            .await
            .unwrap();
    }
    let s = admin.stats().await.unwrap();
    assert_eq!((s.dedup_keys, s.dedup_evicted), (3, 2));
    // The oldest keys were dropped: k0 is stored again, k4 is not.
    let r0 = p
        .send(Message::new("t", "x").with_idempotency_key("k0"))
        .await
        .unwrap();
    assert!(!r0.duplicate);
    let r4 = p
        .send(Message::new("t", "x").with_idempotency_key("k4"))
        .await
        .unwrap();
    assert!(r4.duplicate);
    let s = admin.stats().await.unwrap();
    assert_eq!((s.dedup_keys, s.duplicates), (3, 1));
    assert_eq!(stored(&admin, "t").await, 6);
    b.shutdown().await.unwrap();
}

/// The CLI's keys (K, K-0 .. K-(N-1)) and `duplicate` in its JSON lines;
/// the index survives SIGKILL.
#[test]
fn cli_keys_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let lines = |out: &str| -> Vec<serde_json::Value> {
        out.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let b = BrokerProcess::start(dir.path(), &["--dedup-window", "5m"]);
    assert!(b.cli(&["topic", "create", "t", "--queues", "2"]).0);
    let send = |b: &BrokerProcess| {
        let (ok, out, err) = b.cli(&[
            "send",
            "t",
            "hi",
            "--count",
            "3",
            "--idempotency-key",
            "K",
            "--json",
        ]);
        assert!(ok, "{err}");
        lines(&out)
    };
    let first = send(&b);
    assert!(first.iter().all(|v| v["duplicate"] == false), "{first:?}");
    let half = |b: &BrokerProcess| {
        let (ok, out, err) = b.cli(&[
            "tx",
            "send",
            "t",
            "h",
            "--group",
            "pg",
            "--idempotency-key",
            "H",
            "--json",
        ]);
        assert!(ok, "{err}");
        lines(&out).remove(0)
    };
    let h1 = half(&b);
    assert_eq!(h1["duplicate"], false);
    b.kill9();
    let b = BrokerProcess::start(dir.path(), &["--dedup-window", "5m"]);
    let again = send(&b);
    for (a, f) in again.iter().zip(&first) {
        assert_eq!(a["duplicate"], true, "{a}");
        assert_eq!(
            (&a["message_id"], &a["queue_id"], &a["queue_offset"]),
            (&f["message_id"], &f["queue_id"], &f["queue_offset"])
        );
    }
    let h2 = half(&b);
    assert_eq!(h2["duplicate"], true);
    assert_eq!(h2["transaction_id"], h1["transaction_id"]);
    // Text output says it on stderr.
    let (ok, out, err) = b.cli(&["send", "t", "hi", "--idempotency-key", "K-1"]);
    assert!(ok);
    assert_eq!(out.trim(), first[1]["message_id"].as_str().unwrap());
    assert!(err.contains("nothing stored"), "{err}");
    let (ok, out, _) = b.cli(&["stats", "--json"]);
    assert!(ok);
    let s: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(s["duplicates"], 5, "{s}");
    // 3 sends + 1 committed half.
    let (ok, out, _) = b.cli(&["consume", "t", "--group", "g", "--timeout", "1s", "--json"]);
    assert!(ok);
    assert_eq!(out.lines().count(), 4, "{out}");
    b.terminate();
}
