//! Send, consume, ack, redelivery and restart against an in-process broker.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use halfmq_client::{Admin, Client, Code, ConsumeResult, Consumer, Message, Producer};
use halfmq_tests::{start, test_config};

const WAIT: Duration = Duration::from_secs(2);

async fn client(addr: std::net::SocketAddr) -> Client {
    Client::connect(&addr.to_string()).await.unwrap()
}

/// Receives and acks until `n` messages arrived or 5 s passed.
async fn drain(c: &Consumer, n: usize) -> Vec<halfmq_client::ReceivedMessage> {
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.len() < n && Instant::now() < deadline {
        let want = (n - out.len()).min(64) as u32;
        for m in c.receive(want, Duration::from_millis(300)).await.unwrap() {
            c.ack(&m).await.unwrap();
            out.push(m);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_with_all_fields() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    let r = p
        .send(
            Message::new("rt", "hello")
                .with_tag("t1")
                .with_key("k1")
                .with_property("p", "v"),
        )
        .await
        .unwrap();
    assert_eq!(r.message_id.len(), 32);
    let cons = Consumer::new(c, "g", "rt");
    let got = drain(&cons, 1).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.message_id, r.message_id);
    assert_eq!(
        (m.queue_id, Some(m.queue_offset)),
        (r.queue_id, r.queue_offset)
    );
    assert_eq!(&m.body[..], b"hello");
    assert_eq!(m.tag, "t1");
    assert_eq!(m.keys, vec!["k1".to_string()]);
    assert_eq!(m.properties.get("p").map(String::as_str), Some("v"));
    assert_eq!(m.reconsume_times, 0);
    // Acked: nothing more comes.
    assert!(cons
        .receive(10, Duration::from_millis(200))
        .await
        .unwrap()
        .is_empty());
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_group_gets_every_message() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    let mut ids = HashSet::new();
    for i in 0..40 {
        ids.insert(
            p.send(Message::new("fan", format!("m{i}")))
                .await
                .unwrap()
                .message_id,
        );
    }
    for g in ["a", "b"] {
        let got: HashSet<String> = drain(&Consumer::new(c.clone(), g, "fan"), 40)
            .await
            .into_iter()
            .map(|m| m.message_id)
            .collect();
        assert_eq!(got, ids, "group {g}");
    }
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_of_one_group_split_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    let n = 200;
    let sends: Vec<_> = (0..n)
        .map(|i| p.send(Message::new("split", format!("m{i}"))))
        .collect();
    let mut ids = HashSet::new();
    for s in sends {
        ids.insert(s.await.unwrap().message_id);
    }
    let c1 = Consumer::new(c.clone(), "g", "split");
    let c2 = Consumer::new(client(b.addr).await, "g", "split");
    let (a, bb) = tokio::join!(drain(&c1, n), drain(&c2, n));
    let all: Vec<String> = a
        .iter()
        .chain(bb.iter())
        .map(|m| m.message_id.clone())
        .collect();
    let uniq: HashSet<String> = all.iter().cloned().collect();
    assert_eq!(all.len(), n, "no duplicates: {} deliveries", all.len());
    assert_eq!(uniq, ids);
    assert!(
        !a.is_empty() && !bb.is_empty(),
        "both consumers got work: {} / {}",
        a.len(),
        bb.len()
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_message_comes_back_after_its_invisible_duration() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let id = Producer::new(c.clone())
        .send(Message::new("inv", "x"))
        .await
        .unwrap()
        .message_id;
    let cons =
        Consumer::new(c.clone(), "g", "inv").with_invisible_duration(Duration::from_millis(300));
    let first = cons.receive(1, WAIT).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].reconsume_times, 0);
    let t0 = Instant::now();
    // Invisible meanwhile, to this and any other consumer of the group.
    let other = Consumer::new(c, "g", "inv");
    assert!(other
        .receive(1, Duration::from_millis(100))
        .await
        .unwrap()
        .is_empty());
    let again = cons.receive(1, WAIT).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(150),
        "came back too early"
    );
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].message_id, id);
    assert_eq!(again[0].reconsume_times, 1);
    // The first receipt is stale now.
    let err = cons.ack(&first[0]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ReceiptNotFound));
    cons.ack(&again[0]).await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_and_change_invisible_duration() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    Producer::new(c.clone())
        .send(Message::new("nk", "x"))
        .await
        .unwrap();
    let cons = Consumer::new(c, "g", "nk").with_invisible_duration(Duration::from_millis(200));
    let mut m = cons.receive(1, WAIT).await.unwrap().remove(0);
    cons.change_invisible_duration(&mut m, Duration::from_secs(30))
        .await
        .unwrap();
    // Extended: not back after the original 200 ms.
    assert!(cons
        .receive(1, Duration::from_millis(500))
        .await
        .unwrap()
        .is_empty());
    cons.nack(&m, "db down", Some(Duration::ZERO))
        .await
        .unwrap();
    let again = cons.receive(1, WAIT).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].reconsume_times, 1);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_unconsumed_messages_and_group_progress() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let b = start(cfg.clone()).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    for i in 0..20 {
        p.send(Message::new("rs", format!("m{i}")).with_queue_id(0))
            .await
            .unwrap();
    }
    let cons = Consumer::new(c, "g", "rs");
    let mut first = Vec::new();
    while first.len() < 8 {
        for m in cons.receive(8 - first.len() as u32, WAIT).await.unwrap() {
            cons.ack(&m).await.unwrap();
            first.push(m.message_id);
        }
    }
    // Leave 4 more in flight (received, not acked) when stopping; their
    // leases survive the restart and expire after 500 ms.
    let short = cons
        .clone()
        .with_invisible_duration(Duration::from_millis(500));
    let inflight = short.receive(4, WAIT).await.unwrap();
    assert!(!inflight.is_empty());
    b.shutdown().await.unwrap();

    let b = start(cfg).await;
    let c = client(b.addr).await;
    let cons = Consumer::new(c, "g", "rs").with_invisible_duration(Duration::from_secs(30));
    let rest = drain(&cons, 20 - first.len()).await;
    let rest_ids: HashSet<String> = rest.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(rest.len(), 20 - first.len(), "every unacked message, once");
    for id in &first {
        assert!(
            !rest_ids.contains(id),
            "acked message {id} redelivered after a clean restart"
        );
    }
    for m in &inflight {
        assert!(rest_ids.contains(&m.message_id), "in-flight message lost");
        let again = rest.iter().find(|r| r.message_id == m.message_id).unwrap();
        assert_eq!(
            again.reconsume_times, 1,
            "an expired lease counts as a failed delivery"
        );
    }
    b.shutdown().await.unwrap();
}

/// The commit log's end as of the last checkpoint (a stopped broker's).
fn checkpoint_log_offset(dir: &std::path::Path) -> u64 {
    let meta = halfmq_storage::Meta::open(&dir.join("meta")).unwrap();
    meta.checkpoint().unwrap().unwrap().log_offset
}

/// Consumer progress saved ahead of a commit log that lost its tail: the
/// queue offsets past the recovered end are taken again by new messages,
/// which must be delivered, not skipped as already acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_ahead_of_a_cut_log_does_not_skip_new_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = test_config(dir.path());
    let send = |c: Client, from: usize| async move {
        let p = Producer::new(c);
        for i in from..from + 5 {
            p.send(Message::new("cut", format!("m{i}")).with_queue_id(0))
                .await
                .unwrap();
        }
    };
    let b = start(cfg.clone()).await;
    send(client(b.addr).await, 0).await;
    b.shutdown().await.unwrap();
    let five = checkpoint_log_offset(dir.path());

    let b = start(cfg.clone()).await;
    let c = client(b.addr).await;
    send(c.clone(), 5).await;
    let all = drain(&Consumer::new(c, "g", "cut"), 10).await;
    assert_eq!(all.len(), 10);
    b.shutdown().await.unwrap();
    // The group acked 10; the log keeps the first 5.
    halfmq_tests::cut_commit_log(dir.path(), five);

    let b = start(cfg).await;
    let c = client(b.addr).await;
    send(c.clone(), 100).await;
    let got = drain(&Consumer::new(c, "g", "cut"), 5).await;
    let bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    assert_eq!(bodies, ["m100", "m101", "m102", "m103", "m104"]);
    assert_eq!(got[0].queue_offset, 5, "queue offsets 5.. are taken again");
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    let big = vec![0u8; 64 * 1024 + 1];
    let e = p.send(Message::new("bad", big.clone())).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::MessageTooLarge), "{e}");
    // A batch with one oversized message stores nothing at all.
    let e = p
        .send_batch(vec![Message::new("bad", "ok"), Message::new("bad", big)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::MessageTooLarge));
    assert_eq!(
        p.send(Message::new("bad-name!", "x"))
            .await
            .unwrap_err()
            .code(),
        Some(Code::InvalidTopic)
    );
    assert_eq!(
        p.send(Message::new("%SYS", "x")).await.unwrap_err().code(),
        Some(Code::ReservedName)
    );
    assert_eq!(
        p.send(Message::new("t".repeat(128), "x"))
            .await
            .unwrap_err()
            .code(),
        Some(Code::InvalidTopic)
    );
    let cons = Consumer::new(c.clone(), "bad group", "bad");
    assert_eq!(
        cons.receive(1, Duration::ZERO).await.unwrap_err().code(),
        Some(Code::InvalidGroup)
    );
    let cons = Consumer::new(c.clone(), "g", "nope");
    assert_eq!(
        cons.receive(1, Duration::ZERO).await.unwrap_err().code(),
        Some(Code::TopicNotFound)
    );
    let e = cons.ack_handle("garbage").await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidReceiptHandle));
    let admin = Admin::new(c.clone());
    admin.create_topic("made", 2).await.unwrap();
    assert_eq!(
        admin.create_topic("made", 2).await.unwrap_err().code(),
        Some(Code::TopicExists)
    );
    let e = p
        .send(Message::new("made", "x").with_queue_id(2))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidQueueId));
    // Nothing of the refused sends was stored: the topic "bad" never got a message.
    let topics = admin.list_topics().await.unwrap();
    assert!(
        topics.iter().all(|t| t.name != "bad" || t.messages == 0),
        "{topics:?}"
    );
    // And the broker still serves.
    p.send(Message::new("made", "fine")).await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_filtering() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    for (i, tag) in ["a", "b", "c", "a", ""].iter().enumerate() {
        p.send(Message::new("tags", format!("{i}")).with_tag(*tag))
            .await
            .unwrap();
    }
    let ab = drain(
        &Consumer::new(c.clone(), "g1", "tags").with_tag_expression("a||b"),
        3,
    )
    .await;
    let mut tags: Vec<String> = ab.iter().map(|m| m.tag.clone()).collect();
    tags.sort();
    assert_eq!(tags, vec!["a", "a", "b"]);
    let all = drain(
        &Consumer::new(c.clone(), "g2", "tags").with_tag_expression("*"),
        5,
    )
    .await;
    assert_eq!(all.len(), 5);
    let e = Consumer::new(c, "g3", "tags")
        .with_tag_expression("a||")
        .receive(1, Duration::ZERO)
        .await;
    assert_eq!(e.unwrap_err().code(), Some(Code::InvalidTagExpression));
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_api_acks_successes_and_retries_failures() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    for i in 0..10 {
        p.send(Message::new("h", format!("{i}"))).await.unwrap();
    }
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, u32)>::new()));
    let s2 = seen.clone();
    let cons = Consumer::new(c.clone(), "g", "h");
    let stop = async {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if seen.lock().unwrap().len() >= 11 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    cons.run(
        4,
        move |m| {
            let s2 = s2.clone();
            async move {
                s2.lock().unwrap().push((
                    String::from_utf8_lossy(&m.body).into_owned(),
                    m.reconsume_times,
                ));
                // Message "3" fails on its first delivery.
                if &m.body[..] == b"3" && m.reconsume_times == 0 {
                    ConsumeResult::Retry {
                        delay: None,
                        reason: "first try fails".into(),
                    }
                } else {
                    ConsumeResult::Success
                }
            }
        },
        stop,
    )
    .await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 11, "{seen:?}");
    assert!(
        seen.contains(&("3".into(), 1)),
        "message 3 retried with reconsume_times 1: {seen:?}"
    );
    let stats = Admin::new(c).stats().await.unwrap();
    let g = stats.groups.iter().find(|g| g.group == "g").unwrap();
    assert_eq!((g.lag, g.inflight, g.acked), (0, 0, 10));
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_batched_concurrent_sends_each_get_their_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    let mut hs = Vec::new();
    for i in 0..300 {
        let p = p.clone();
        hs.push(tokio::spawn(async move {
            p.send(Message::new("ab", format!("{i}"))).await
        }));
    }
    let mut ids = HashSet::new();
    for h in hs {
        ids.insert(h.await.unwrap().unwrap().message_id);
    }
    assert_eq!(ids.len(), 300);
    // One bad message among concurrent good ones fails alone.
    let bad = p.send(Message::new("ab", vec![0u8; 70_000]));
    let good = p.send(Message::new("ab", "fine"));
    let (bad, good) = tokio::join!(bad, good);
    assert_eq!(bad.unwrap_err().code(), Some(Code::MessageTooLarge));
    good.unwrap();
    let got = drain(&Consumer::new(c, "g", "ab"), 301).await;
    assert_eq!(got.len(), 301);
    b.shutdown().await.unwrap();
}

/// `sync_wait_spin_us` changes how a sync send waits, not what its ack
/// means: every acknowledged send and end is covered by an fdatasync, both
/// when the spin outlasts the fdatasync (5 ms) and when it gives up first
/// (1 µs) and sleeps. Sequential calls and no other writer, so the log's
/// whole written end must be flushed when each call returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_wait_spin_acks_only_what_an_fdatasync_covered() {
    for spin_us in [1, 5_000] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = test_config(dir.path());
        cfg.sync_wait_spin_us = spin_us;
        let b = start(cfg).await;
        let log = || {
            let l = b.broker.store().log();
            (l.flushed_offset(), l.written_offset())
        };
        let c = client(b.addr).await;
        let p = Producer::new(c.clone());
        for i in 0..20 {
            p.send(Message::new("spin", format!("m{i}"))).await.unwrap();
            let (flushed, written) = log();
            assert!(
                flushed >= written,
                "spin {spin_us} us: send {i} acked at {flushed} < {written}"
            );
        }
        let tp = halfmq_client::TransactionProducer::new(
            c.clone(),
            "spin-pg",
            |_m: halfmq_client::MessageView| async {
                halfmq_client::TransactionResolution::Unknown
            },
        );
        for i in 0..10 {
            let tx = tp
                .send_half(Message::new("spin", format!("t{i}")))
                .await
                .unwrap();
            let (flushed, written) = log();
            assert!(
                flushed >= written,
                "spin {spin_us} us: half {i} acked at {flushed} < {written}"
            );
            tx.commit().await.unwrap();
            let (flushed, written) = log();
            assert!(
                flushed >= written,
                "spin {spin_us} us: end {i} acked at {flushed} < {written}"
            );
        }
        let consumer = Consumer::new(c, "g", "spin");
        assert_eq!(drain(&consumer, 30).await.len(), 30);
        b.shutdown().await.unwrap();
    }
}

/// A delivery whose invisible duration is cut to 0 is redelivered to a
/// consumer already long-polling, at once: the poll planned to look again
/// only at the old deadline (RocketMQ push consumers fail a message so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shortening_an_invisible_duration_wakes_a_waiting_long_poll() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    Producer::new(c.clone())
        .send(Message::new("cut", "m"))
        .await
        .unwrap();
    let first =
        Consumer::new(c.clone(), "g", "cut").with_invisible_duration(Duration::from_secs(30));
    let mut got = first.receive(1, WAIT).await.unwrap();
    assert_eq!(got.len(), 1);
    let waiting = Consumer::new(c.clone(), "g", "cut");
    let poll = tokio::spawn(async move {
        let t0 = Instant::now();
        let m = waiting.receive(1, Duration::from_secs(10)).await.unwrap();
        (m.len(), t0.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    first
        .change_invisible_duration(&mut got[0], Duration::ZERO)
        .await
        .unwrap();
    let (n, waited) = poll.await.unwrap();
    assert_eq!(n, 1, "the message came back to the waiting poll");
    assert!(waited < Duration::from_secs(3), "it took {waited:?}");
}
