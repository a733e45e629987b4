//! Delayed delivery of ordinary sends: invisible until due, then delivered
//! once to every group; durable across SIGKILL, with due ones firing at
//! start-up; limits.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use halfmq_client::{Admin, Client, Code, Consumer, Message, MessageView, Producer};
use halfmq_tests::{start, test_config, BrokerProcess};

/// Receives and acks for `for_how_long`; the bodies, in arrival order.
async fn collect(c: &Consumer, for_how_long: Duration) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = Instant::now() + for_how_long;
    while Instant::now() < deadline {
        for m in c.receive(32, Duration::from_millis(100)).await.unwrap() {
            out.push(String::from_utf8(m.body.to_vec()).unwrap());
            c.ack(&m).await.unwrap();
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_is_invisible_until_due_then_delivered_once() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    Admin::new(c.clone())
        .create_topic("later", 2)
        .await
        .unwrap();
    let p = Producer::new(c.clone());
    let sent_at = halfmq_storage::now_ms();
    let t0 = Instant::now();
    // One batch, all or nothing: one delayed, one not.
    let r = p
        .send_batch(vec![
            Message::new("later", "in 800 ms").with_delay(Duration::from_millis(800)),
            Message::new("later", "now"),
        ])
        .await
        .unwrap();
    assert!(r[0].deliver_at_ms >= sent_at + 800, "{r:?}");
    assert_eq!(r[1].deliver_at_ms, 0);
    let g1 = Consumer::new(c.clone(), "g1", "later");
    let g2 = Consumer::new(c.clone(), "g2", "later");
    assert_eq!(collect(&g1, Duration::from_millis(400)).await, vec!["now"]);
    // Not a transaction anyone can see or end; counted apart.
    assert!(Admin::new(c.clone())
        .list_transactions()
        .await
        .unwrap()
        .is_empty());
    let s = Admin::new(c.clone()).stats().await.unwrap();
    assert_eq!((s.pending_halves, s.delayed_messages), (0, 1));
    assert_eq!(s.messages_in, 2, "a delayed send is a message in");
    assert!(
        r[0].queue_offset.is_none(),
        "no queue offset until it is due"
    );
    // Due: delivered once to each group, not before its time.
    let mut got = Vec::new();
    while got.is_empty() {
        got = g1.receive(8, Duration::from_secs(2)).await.unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5), "never delivered");
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(780),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"in 800 ms");
    assert_eq!(got[0].message_id, r[0].message_id);
    g1.ack(&got[0]).await.unwrap();
    assert!(collect(&g1, Duration::from_millis(500)).await.is_empty());
    let g2_got = collect(&g2, Duration::from_millis(500)).await;
    assert_eq!(g2_got.len(), 2, "{g2_got:?}");
    assert_eq!(
        g2_got.iter().collect::<HashSet<_>>(),
        ["now", "in 800 ms"]
            .iter()
            .map(|s| s.to_string())
            .collect::<HashSet<_>>()
            .iter()
            .collect()
    );
    // A delayed message is no transaction in the counters.
    let s = Admin::new(c.clone()).stats().await.unwrap();
    assert_eq!(
        (s.halves_in, s.transactions_committed, s.delayed_messages),
        (0, 0, 0)
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_over_the_limit_and_on_halves_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_delay_ms: 1_000,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let p = Producer::new(c.clone());
    p.send(Message::new("lim", "ok").with_delay(Duration::from_millis(1_000)))
        .await
        .unwrap();
    let e = p
        .send(Message::new("lim", "too late").with_delay(Duration::from_millis(1_001)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BadRequest), "{e}");
    let tp = halfmq_client::TransactionProducer::new(c.clone(), "pg", |_m: MessageView| {
        std::future::ready(halfmq_client::TransactionResolution::Unknown)
    });
    let e = tp
        .send_half(Message::new("lim", "half").with_delay(Duration::from_millis(10)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BadRequest), "{e}");
    b.shutdown().await.unwrap();
}

#[test]
fn delayed_messages_survive_sigkill_and_due_ones_fire_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let rt = halfmq_tests::runtime();
    let broker = BrokerProcess::start(dir.path(), &[]);
    let t0 = Instant::now();
    rt.block_on(async {
        let c = Client::connect(&broker.addr).await.unwrap();
        let p = Producer::new(c);
        for i in 0..10 {
            p.send(Message::new("dur", format!("soon-{i}")).with_delay(Duration::from_millis(500)))
                .await
                .unwrap();
            p.send(
                Message::new("dur", format!("late-{i}")).with_delay(Duration::from_millis(4_000)),
            )
            .await
            .unwrap();
        }
    });
    broker.kill9();
    // The "soon" ones fall due while the broker is down.
    std::thread::sleep(Duration::from_millis(1_000));
    let broker = BrokerProcess::start(dir.path(), &[]);
    rt.block_on(async {
        let c = Client::connect(&broker.addr).await.unwrap();
        let cons = Consumer::new(c, "g", "dur");
        let mut first = collect(&cons, Duration::from_millis(1_500)).await;
        assert!(
            t0.elapsed() < Duration::from_millis(3_900),
            "test too slow to tell"
        );
        first.sort();
        let soon: Vec<String> = {
            let mut v: Vec<String> = (0..10).map(|i| format!("soon-{i}")).collect();
            v.sort();
            v
        };
        assert_eq!(first, soon, "due ones fire at start-up, late ones wait");
        let mut rest = collect(&cons, t0 + Duration::from_secs(6) - Instant::now()).await;
        rest.sort();
        let late: Vec<String> = {
            let mut v: Vec<String> = (0..10).map(|i| format!("late-{i}")).collect();
            v.sort();
            v
        };
        assert_eq!(rest, late);
    });
    broker.kill9();
}
