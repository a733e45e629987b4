//! Message and batch sizes at the documented limits: the broker reads
//! requests up to `max_batch_bytes` plus headroom, so every size refusal is
//! its own `MESSAGE_TOO_LARGE` / `BATCH_TOO_LARGE` (never the transport's
//! 4 MiB cut), nothing of a refused request is stored, and raising the limits
//! raises them.

use std::time::Duration;

use halfmq_broker::BrokerConfig;
use halfmq_client::{
    Admin, Client, Code, Consumer, Message, MessageView, Producer, TransactionProducer,
    TransactionResolution,
};
use halfmq_tests::{start, stored, test_config};

const MIB: usize = 1 << 20;

/// The defaults of every size limit (`test_config` shrinks them), with
/// segments large enough for a 16 MiB batch.
fn default_sizes(dir: &std::path::Path) -> BrokerConfig {
    let d = BrokerConfig::default();
    BrokerConfig {
        segment_bytes: 64 << 20,
        max_message_bytes: d.max_message_bytes,
        max_batch_bytes: d.max_batch_bytes,
        ..test_config(dir)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_at_and_past_the_default_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = default_sizes(dir.path());
    assert_eq!(cfg.max_message_bytes as usize, 4 * MIB, "README's default");
    assert_eq!(cfg.max_batch_bytes as usize, 16 * MIB, "README's default");
    let b = start(cfg).await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let admin = Admin::new(c.clone());
    admin.create_topic("big", 1).await.unwrap();
    let p = Producer::new(c.clone());

    // Exactly max_message_bytes: stored, and delivered whole.
    let at_limit = p
        .send(Message::new("big", vec![1u8; 4 * MIB]))
        .await
        .unwrap();
    // One byte over, and 10 MiB: the broker's own refusal.
    for size in [4 * MIB + 1, 10 * MIB] {
        let e = p
            .send(Message::new("big", vec![2u8; size]))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(Code::MessageTooLarge), "{size}: {e}");
        assert!(e.to_string().contains("max_message_bytes"), "{e}");
    }
    // Past what the transport reads at all (max_batch_bytes + 4 MiB): still
    // MESSAGE_TOO_LARGE for one message, BATCH_TOO_LARGE for several.
    let e = p
        .send_batch(vec![Message::new("big", vec![3u8; 30 * MIB])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::MessageTooLarge), "{e}");
    let e = p
        .send_batch(
            (0..6)
                .map(|_| Message::new("big", vec![4u8; 4 * MIB]))
                .collect(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BatchTooLarge), "{e}");
    assert_eq!(stored(&admin, "big").await, 1, "nothing refused was stored");

    // A batch of exactly max_batch_bytes (4 x 4 MiB): stored whole; one
    // byte more is the broker's BATCH_TOO_LARGE.
    let r = p
        .send_batch(
            (0..4)
                .map(|_| Message::new("big", vec![5u8; 4 * MIB]))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(r.len(), 4);
    let mut over: Vec<Message> = (0..4)
        .map(|_| Message::new("big", vec![6u8; 4 * MIB]))
        .collect();
    over.push(Message::new("big", vec![7u8; 1]));
    let e = p.send_batch(over).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::BatchTooLarge), "{e}");
    assert_eq!(stored(&admin, "big").await, 5);

    // Halves have the same limits.
    let tx = TransactionProducer::new(c.clone(), "pg", |_m: MessageView| async {
        TransactionResolution::Commit
    });
    let h = tx
        .send_half(Message::new("big", vec![8u8; 4 * MIB]))
        .await
        .unwrap();
    h.commit().await.unwrap();
    let e = tx
        .send_half(Message::new("big", vec![9u8; 10 * MIB]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::MessageTooLarge), "{e}");

    // Everything stored comes back whole (responses above 4 MiB too).
    let cons = Consumer::new(c, "g", "big");
    let mut sizes = Vec::new();
    while sizes.len() < 6 {
        let got = cons.receive(4, Duration::from_secs(2)).await.unwrap();
        assert!(!got.is_empty(), "only {} of 6 delivered", sizes.len());
        for m in got {
            cons.ack(&m).await.unwrap();
            if m.message_id == at_limit.message_id {
                assert!(m.body.iter().all(|b| *b == 1));
            }
            sizes.push(m.body.len());
        }
    }
    assert!(sizes.iter().all(|s| *s == 4 * MIB), "{sizes:?}");
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raised_limits_are_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(BrokerConfig {
        max_message_bytes: 12 << 20,
        max_batch_bytes: 24 << 20,
        ..default_sizes(dir.path())
    })
    .await;
    let c = Client::connect(&b.addr.to_string()).await.unwrap();
    let p = Producer::new(c.clone());
    p.send(Message::new("raised", vec![1u8; 10 * MIB]))
        .await
        .unwrap();
    p.send_batch(vec![
        Message::new("raised", vec![2u8; 12 * MIB]),
        Message::new("raised", vec![3u8; 12 * MIB]),
    ])
    .await
    .unwrap();
    let e = p
        .send(Message::new("raised", vec![4u8; 12 * MIB + 1]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::MessageTooLarge), "{e}");
    b.shutdown().await.unwrap();
}
