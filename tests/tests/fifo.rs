//! Ordered (FIFO) message groups (issue 17): in a FIFO consumer group each
//! message group is delivered in send order, one message at a time, with
//! retries in place, across consumers and across a SIGKILL of the broker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use halfmq_client::{Admin, Client, Consumer, Message, Producer, ReceivedMessage};
use halfmq_tests::{start, test_config, BrokerProcess};
use rand::Rng;

/// Per message group: how many of its messages (in send order) were acked.
#[derive(Default)]
struct Order {
    acked: HashMap<String, usize>,
}

/// `g:i` -> (g, i).
fn parse(m: &ReceivedMessage) -> (String, usize) {
    let s = std::str::from_utf8(&m.body).unwrap();
    let (g, i) = s.split_once(':').unwrap();
    (g.to_owned(), i.parse().unwrap())
}

/// Receives until every group has `per_group` acked messages, acking most,
/// nacking `nack` of them and leaving `forget` to expire. `exact`: every
/// delivery must be the earliest unacked message of its group (nothing
/// acked comes again); otherwise an acked one may come again (after a
/// crash) but never one past the earliest unacked.
async fn consume_in_order(
    c: Consumer,
    order: Arc<Mutex<Order>>,
    groups: usize,
    per_group: usize,
    (nack, forget): (f64, f64),
    exact: bool,
    until: tokio::time::Instant,
) {
    loop {
        {
            let o = order.lock().unwrap();
            if o.acked.len() == groups && o.acked.values().all(|n| *n == per_group) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < until,
            "not all delivered in time"
        );
        let Ok(msgs) = c.receive(8, Duration::from_millis(500)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        for m in msgs {
            let (g, i) = parse(&m);
            assert_eq!(m.message_group.as_deref(), Some(g.as_str()));
            let r: f64 = rand::thread_rng().gen();
            let ack = {
                let mut o = order.lock().unwrap();
                let acked = o.acked.entry(g.clone()).or_default();
                if exact {
                    assert_eq!(
                        i, *acked,
                        "group {g}: message {i} delivered while {acked} is the earliest unacked"
                    );
                } else {
                    assert!(
                        i <= *acked,
                        "group {g}: message {i} delivered before {acked} was acked"
                    );
                }
                let ack = r >= nack + forget;
                if ack && i == *acked {
                    *acked += 1; // before the ack goes out: the next may come at once
                }
                ack
            };
            if ack {
                c.ack(&m).await.unwrap();
            } else if r < nack {
                c.nack(&m, "test nack", None).await.unwrap();
            } // else forgotten: it expires
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_groups_are_consumed_in_send_order_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(halfmq_broker::BrokerConfig {
        retry_delays: "50ms 100ms 150ms".into(),
        ..test_config(dir.path())
    })
    .await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let admin = Admin::new(c.clone());
    admin.create_topic("orders", 2).await.unwrap();
    admin.create_consumer_group("shipping", true).await.unwrap();
    admin.create_consumer_group("shipping", true).await.unwrap(); // again: no-op
    let e = admin
        .create_consumer_group("shipping", false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(halfmq_client::Code::BadRequest), "{e}");
    assert_eq!(
        admin.list_consumer_groups().await.unwrap(),
        [("shipping".to_owned(), true)]
    );
    let p = Producer::new(c.clone());
    let (groups, per_group) = (3, 200);
    // Batches (stored in order), the groups interleaved.
    let mut queue_of: HashMap<String, u32> = HashMap::new();
    for chunk in 0..per_group / 20 {
        let mut batch = Vec::new();
        for i in chunk * 20..(chunk + 1) * 20 {
            for g in ["a", "b", "c"] {
                batch.push(Message::new("orders", format!("{g}:{i}")).with_message_group(g));
            }
        }
        for (n, r) in p.send_batch(batch).await.unwrap().into_iter().enumerate() {
            let g = ["a", "b", "c"][n % 3].to_owned();
            assert_eq!(
                *queue_of.entry(g).or_insert(r.queue_id),
                r.queue_id,
                "one queue per group"
            );
        }
    }
    let order = Arc::new(Mutex::new(Order::default()));
    let until = tokio::time::Instant::now() + Duration::from_secs(60);
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            let c = Consumer::new(c.clone(), "shipping", "orders")
                .with_invisible_duration(Duration::from_millis(300));
            tokio::spawn(consume_in_order(
                c,
                Arc::clone(&order),
                groups,
                per_group,
                (0.05, 0.05),
                true,
                until,
            ))
        })
        .collect();
    for h in consumers {
        h.await.unwrap();
    }
    // An ordinary group sees the same messages as ordinary ones: all at once.
    let plain = Consumer::new(c.clone(), "audit", "orders");
    let got = plain.receive(64, Duration::from_secs(2)).await.unwrap();
    assert!(got.len() > 3, "not one per message group: {}", got.len());
    b.shutdown().await.unwrap();
}

/// A FIFO message that keeps failing goes to the DLQ after
/// max_reconsume_times, and the next message of its group is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_fifo_message_releases_the_next_of_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(halfmq_broker::BrokerConfig {
        retry_delays: "10ms 20ms".into(),
        max_reconsume_times: 2,
        ..test_config(dir.path())
    })
    .await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let admin = Admin::new(c.clone());
    admin.create_topic("t", 1).await.unwrap();
    admin.create_consumer_group("g", true).await.unwrap();
    let p = Producer::new(c.clone());
    for i in 0..3 {
        p.send(Message::new("t", format!("x:{i}")).with_message_group("x"))
            .await
            .unwrap();
    }
    let cons = Consumer::new(c.clone(), "g", "t");
    // x:0 three times (first delivery + 2 retries), nacked each time; x:1
    // never meanwhile.
    for n in 0..3 {
        let got = cons.receive(8, Duration::from_secs(3)).await.unwrap();
        assert_eq!(got.len(), 1, "one at a time");
        assert_eq!((parse(&got[0]).1, got[0].reconsume_times), (0, n));
        cons.nack(&got[0], "bad", None).await.unwrap();
    }
    let got = cons.receive(8, Duration::from_secs(3)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(
        parse(&got[0]).1,
        1,
        "x:1 released once x:0 is dead-lettered"
    );
    assert_eq!(
        admin.dead_letter_counts().await.unwrap(),
        [("g".to_owned(), 1)]
    );
    b.shutdown().await.unwrap();
}

/// SIGKILL in the middle: after the restart no later message of a group is
/// delivered before an earlier unacked one, and all arrive.
#[test]
fn fifo_order_survives_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let rt = halfmq_tests::runtime();
    let args = ["--retry-delays", "50ms 100ms"];
    let b = BrokerProcess::start(dir.path(), &args);
    assert!(b.cli(&["topic", "create", "t", "--queues", "2"]).0);
    let (ok, out, err) = b.cli(&["group", "create", "g", "--fifo"]);
    assert!(ok, "{err}");
    assert!(out.contains("FIFO"));
    for g in ["a", "b", "c"] {
        for i in 0..40 {
            let (ok, _, err) = b.cli(&["send", "t", &format!("{g}:{i}"), "--message-group", g]);
            assert!(ok, "{err}");
        }
    }
    let (ok, out, _) = b.cli(&["group", "list", "--json"]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(
        (&v["group"], &v["fifo"]),
        (&"g".into(), &true.into()),
        "{v}"
    );
    // --no-ack: the head of each group, and nothing behind it.
    let (ok, out, _) = b.cli(&[
        "consume",
        "t",
        "--group",
        "g",
        "--no-ack",
        "--timeout",
        "1s",
        "--json",
        "--invisible",
        "3s",
    ]);
    assert!(ok);
    let heads: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["body"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let mut sorted = heads.clone();
    sorted.sort();
    assert_eq!(sorted, ["a:0", "b:0", "c:0"], "{heads:?}");
    let order = Arc::new(Mutex::new(Order::default()));
    let addr = b.addr.clone();
    // Consume part of it, then kill -9 mid-way.
    rt.block_on(async {
        let c = Client::connect(&addr).await.unwrap();
        let cons = Consumer::new(c, "g", "t").with_invisible_duration(Duration::from_millis(500));
        let until = tokio::time::Instant::now() + Duration::from_secs(30);
        let _ = tokio::time::timeout(
            Duration::from_millis(1_500),
            consume_in_order(cons, Arc::clone(&order), 3, 40, (0.1, 0.1), false, until),
        )
        .await;
    });
    b.kill9();
    let b = BrokerProcess::start(dir.path(), &args);
    let addr = b.addr.clone();
    rt.block_on(async {
        let c = Client::connect(&addr).await.unwrap();
        let until = tokio::time::Instant::now() + Duration::from_secs(60);
        let hs: Vec<_> = (0..2)
            .map(|_| {
                let cons = Consumer::new(c.clone(), "g", "t")
                    .with_invisible_duration(Duration::from_millis(500));
                tokio::spawn(consume_in_order(
                    cons,
                    Arc::clone(&order),
                    3,
                    40,
                    (0.05, 0.05),
                    false,
                    until,
                ))
            })
            .collect();
        for h in hs {
            h.await.unwrap();
        }
    });
    b.terminate();
}
