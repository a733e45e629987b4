//! Exactly-once publish (issue 17, first part): a repeated idempotency key
//! stores nothing and returns the first send's receipt, also after a restart.

use std::time::Duration;

use halfmq_client::{Admin, Client, Code, Message, Producer};
use halfmq_tests::{start, stored, test_config};

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
