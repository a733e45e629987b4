//! Every limit at its edge, and hostile or malformed input: each gets a clear
//! status, nothing partial is stored, and the broker keeps serving.

use std::time::Duration;

use halfmq_client::{
    Admin, Client, Code, Consumer, Message, MessageView, Producer, TransactionProducer,
};
use halfmq_proto::v1 as pb;
use halfmq_tests::{start, test_config};

async fn client(addr: impl ToString) -> Client {
    Client::connect(&addr.to_string()).await.unwrap()
}

async fn raw_producer(
    addr: std::net::SocketAddr,
) -> pb::producer_client::ProducerClient<tonic::transport::Channel> {
    pb::producer_client::ProducerClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_and_batch_limits_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_batch_messages: 8,
        max_batch_bytes: 100_000,
        ..test_config(dir.path())
    };
    let limit = cfg.max_message_bytes as usize;
    let b = start(cfg).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    // Exactly at the body limit: accepted; one byte over: refused.
    p.send_batch(vec![Message::new("lim", vec![7u8; limit])])
        .await
        .unwrap();
    let e = p
        .send_batch(vec![Message::new("lim", vec![7u8; limit + 1])])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::MessageTooLarge));
    // max_batch_messages: 8 fine, 9 refused, nothing of it stored.
    p.send_batch(
        (0..8)
            .map(|i| Message::new("lim", format!("{i}")))
            .collect(),
    )
    .await
    .unwrap();
    let e = p
        .send_batch(
            (0..9)
                .map(|i| Message::new("lim", format!("{i}")))
                .collect(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BatchTooLarge));
    // max_batch_bytes: two bodies of 60,000 bytes exceed 100,000.
    let e = p
        .send_batch(vec![
            Message::new("lim", vec![1u8; 60_000]),
            Message::new("lim", vec![2u8; 60_000]),
        ])
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BatchTooLarge));
    let topics = Admin::new(c.clone()).list_topics().await.unwrap();
    assert_eq!(
        topics.iter().find(|t| t.name == "lim").unwrap().messages,
        9,
        "1 + 8 stored, no partial batch"
    );
    // Field limits.
    let e = p
        .send(Message::new("lim", "x").with_tag("a||b"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BadRequest));
    let e = p
        .send(Message::new("lim", "x").with_property("halfmq.producer_group", "spoof"))
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(Code::BadRequest),
        "system property names are reserved"
    );
    let mut m = Message::new("lim", "x");
    m.keys = (0..33).map(|i| i.to_string()).collect();
    assert_eq!(p.send(m).await.unwrap_err().code(), Some(Code::BadRequest));
    assert_eq!(
        p.send(Message::new("", "x")).await.unwrap_err().code(),
        Some(Code::InvalidTopic)
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protocol_requests() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let mut raw = raw_producer(b.addr).await;
    // Unknown enum value in EndTransaction.
    let r = raw
        .end_transaction(pb::EndTransactionRequest {
            transaction_id: "0".repeat(48),
            resolution: 99,
            source: 77,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, Code::BadRequest as i32);
    // A half send without a message.
    let r = raw
        .send_half(pb::SendHalfRequest {
            producer_group: "pg".into(),
            message: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, Code::BadRequest as i32);
    // An empty send.
    let r = raw
        .send(pb::SendRequest { messages: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status.unwrap().code, Code::BadRequest as i32);
    // A session whose first message is not a hello gets an error, then ends.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::SessionUp {
        kind: Some(pb::session_up::Kind::Answer(pb::CheckAnswer {
            transaction_id: "x".into(),
            resolution: 1,
        })),
    })
    .await
    .unwrap();
    let mut down = raw
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    match down.message().await.unwrap() {
        Some(pb::SessionDown {
            kind: Some(pb::session_down::Kind::Error(s)),
        }) => assert_eq!(s.code, Code::BadRequest as i32),
        other => panic!("expected an error, got {other:?}"),
    }
    // The broker still serves everyone.
    Producer::new(client(b.addr).await)
        .send(Message::new("ok", "fine"))
        .await
        .unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_refuses_extra_connections_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_connections: 2,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c1 = client(b.addr).await;
    let c2 = client(b.addr).await;
    let (p1, p2) = (Producer::new(c1), Producer::new(c2));
    p1.send(Message::new("c", "1")).await.unwrap();
    p2.send(Message::new("c", "2")).await.unwrap();
    // A third connection is closed at once: its call fails, quickly.
    let opts = halfmq_client::ClientOptions {
        max_attempts: 1,
        ..Default::default()
    };
    let c3 = Client::connect_with(&b.addr.to_string(), opts)
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), Admin::new(c3).list_topics()).await;
    assert!(matches!(r, Ok(Err(_))), "third connection refused: {r:?}");
    // Existing connections keep working; closing one frees a slot.
    p1.send(Message::new("c", "3")).await.unwrap();
    drop(p2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c4 = client(b.addr).await;
    Producer::new(c4)
        .send(Message::new("c", "4"))
        .await
        .unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_halves_limit_and_a_checker_that_never_answers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_pending_halves: 2,
        transaction_timeout_ms: 200,
        check_interval_ms: 200,
        check_reply_timeout_ms: 200,
        check_max: 2,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    // This producer's checker hangs forever: each check must time out and count.
    let p = TransactionProducer::new(c.clone(), "pg", |_m: MessageView| async {
        std::future::pending::<halfmq_client::TransactionResolution>().await
    });
    p.send_half(Message::new("t", "1")).await.unwrap();
    p.send_half(Message::new("t", "2")).await.unwrap();
    let e = p.send_half(Message::new("t", "3")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::TooManyPendingHalves));
    let admin = Admin::new(c.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let l = admin.list_transactions().await.unwrap();
        if l.len() == 2 && l.iter().all(|t| t.given_up && t.check_times == 2) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "unanswered checks never gave up: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Resolving one frees a slot; the broker kept serving throughout.
    let first = admin.list_transactions().await.unwrap().remove(0);
    halfmq_client::end_transaction(
        &c,
        &first.transaction_id,
        halfmq_client::TransactionResolution::Rollback,
        halfmq_client::EndSource::Operator,
    )
    .await
    .unwrap();
    p.send_half(Message::new("t", "3")).await.unwrap();
    let cons = Consumer::new(c, "g", "t");
    assert!(cons
        .receive(1, Duration::from_millis(200))
        .await
        .unwrap()
        .is_empty());
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_queue_and_receive_limits_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_topics: 3,
        max_queues: 4,
        max_receive_messages: 5,
        max_invisible_duration_ms: 30_000,
        max_receive_wait_ms: 300,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    let admin = Admin::new(c.clone());
    // max_queues: 4 fine, 5 refused.
    admin.create_topic("a", 4).await.unwrap();
    let e = admin.create_topic("b", 5).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::BadRequest), "{e}");
    // max_topics: the third is the last, by hand or by auto-create.
    admin.create_topic("b", 1).await.unwrap();
    let p = Producer::new(c.clone());
    p.send(Message::new("c", "auto-created")).await.unwrap();
    let e = admin.create_topic("d", 1).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::TooManyRequests), "{e}");
    let e = p.send(Message::new("e", "x")).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::TooManyRequests), "{e}");
    assert_eq!(admin.list_topics().await.unwrap().len(), 3);
    // max_receive_messages: asking for 100 gets 5.
    for i in 0..10 {
        p.send(Message::new("b", format!("{i}"))).await.unwrap();
    }
    // max_invisible_duration_ms (30 s): 60 s asked is refused, like a
    // delay over max_delay_ms, and delivers nothing.
    let too_long =
        Consumer::new(c.clone(), "g", "b").with_invisible_duration(Duration::from_secs(60));
    let e = too_long.receive(100, Duration::ZERO).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::BadRequest), "{e}");
    assert!(e.to_string().contains("max_invisible_duration_ms"), "{e}");
    let cons = Consumer::new(c.clone(), "g", "b").with_invisible_duration(Duration::from_secs(30));
    let mut got = cons.receive(100, Duration::ZERO).await.unwrap();
    assert_eq!(got.len(), 5);
    let now = halfmq_storage::now_ms();
    for m in &got {
        assert!(
            m.invisible_until_ms <= now + 30_000 + 100,
            "{}",
            m.invisible_until_ms - now
        );
    }
    // Extending a lease past the limit is refused too; the lease stays.
    let e = too_long
        .change_invisible_duration(&mut got[0], Duration::from_secs(60))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BadRequest), "{e}");
    cons.ack(&got[0]).await.unwrap();
    // max_receive_wait_ms: a 10 s long poll on an empty topic ends after 300 ms.
    let empty = Consumer::new(c.clone(), "g", "a");
    let t0 = std::time::Instant::now();
    assert!(empty
        .receive(1, Duration::from_secs(10))
        .await
        .unwrap()
        .is_empty());
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inflight_and_unacked_window_limits_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_inflight_per_queue: 3,
        max_unacked_window: 6,
        default_invisible_duration_ms: 60_000,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    Admin::new(c.clone()).create_topic("w", 1).await.unwrap();
    let p = Producer::new(c.clone());
    for i in 0..10 {
        p.send(Message::new("w", format!("{i}"))).await.unwrap();
    }
    let cons = Consumer::new(c.clone(), "g", "w");
    let recv = || async { cons.receive(10, Duration::ZERO).await.unwrap() };
    // max_inflight_per_queue: 3 out, then nothing until one is acked.
    let first = recv().await;
    assert_eq!(first.len(), 3);
    assert!(recv().await.is_empty());
    // max_unacked_window: offset 0 stays unacked; acking the others lets
    // deliveries go on only up to offset 0 + 6.
    let mut held = None;
    let mut delivered = 3;
    let mut pending: Vec<_> = first;
    loop {
        for m in pending.drain(..) {
            if m.queue_offset == 0 {
                held = Some(m);
            } else {
                cons.ack(&m).await.unwrap();
            }
        }
        let more = recv().await;
        if more.is_empty() {
            break;
        }
        delivered += more.len();
        pending = more;
    }
    assert_eq!(delivered, 6, "offsets 0..6 delivered while 0 is unacked");
    cons.ack(&held.unwrap()).await.unwrap();
    let rest = recv().await;
    assert_eq!(rest.len(), 3, "the window moved on: offsets 6..9");
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_inflight_per_session_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_checks_inflight_per_session: 2,
        transaction_timeout_ms: 100,
        check_interval_ms: 100,
        check_reply_timeout_ms: 10_000,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = std::sync::Arc::clone(&calls);
    // A checker that never answers: its session holds every check it gets.
    let p = TransactionProducer::new(c.clone(), "pg", move |_m: MessageView| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::future::pending::<halfmq_client::TransactionResolution>()
    });
    for i in 0..5 {
        p.send_half(Message::new("t", format!("{i}")))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "2 checks out, 3 wait"
    );
    // The other three are waiting, not dropped: they are still pending, unchecked.
    let l = Admin::new(c).list_transactions().await.unwrap();
    assert_eq!(l.len(), 5);
    assert_eq!(l.iter().filter(|t| t.check_times == 1).count(), 2);
    assert_eq!(l.iter().filter(|t| t.check_times == 0).count(), 3);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_connection_at_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_requests_per_connection: 4,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    Admin::new(c.clone()).create_topic("rq", 1).await.unwrap();
    // Eight 600 ms long polls on one connection: four run, four wait their
    // turn, so the last ends after two rounds, none fails.
    let t0 = std::time::Instant::now();
    let polls: Vec<_> = (0..8)
        .map(|i| {
            let cons = Consumer::new(c.clone(), format!("g{i}"), "rq");
            tokio::spawn(async move { cons.receive(1, Duration::from_millis(600)).await })
        })
        .collect();
    for p in polls {
        assert!(p.await.unwrap().unwrap().is_empty());
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1_150),
        "8 polls ran at once: {took:?}"
    );
    // Four fit at once.
    let t0 = std::time::Instant::now();
    let polls: Vec<_> = (0..4)
        .map(|i| {
            let cons = Consumer::new(c.clone(), format!("g{i}"), "rq");
            tokio::spawn(async move { cons.receive(1, Duration::from_millis(600)).await })
        })
        .collect();
    for p in polls {
        p.await.unwrap().unwrap();
    }
    assert!(
        t0.elapsed() < Duration::from_millis(1_100),
        "{:?}",
        t0.elapsed()
    );
    b.shutdown().await.unwrap();
}
