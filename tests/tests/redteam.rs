//! The hostile tester's findings 3-10 (issue 24; 1-2 are in damage.rs):
//! sockets that never speak, unbounded responses and client objects, an
//! oversized nack reason, forged receipt handles and transaction ids, a
//! delayed message cancelled by probing, silent check-back sessions, leases
//! renewed forever. Each test fails on the code before the fixes.

use std::time::{Duration, Instant};

use halfmq_client::{
    end_transaction, Admin, Client, ClientOptions, Code, Consumer, EndSource, Message, MessageView,
    Producer, TransactionProducer, TransactionResolution,
};
use halfmq_proto::v1 as pb;
use halfmq_tests::{start, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn client(addr: impl ToString) -> Client {
    Client::connect(&addr.to_string()).await.unwrap()
}

/// One attempt per call: a refusal shows instead of being retried away.
async fn one_shot_client(addr: impl ToString) -> Client {
    let opts = ClientOptions {
        max_attempts: 1,
        ..Default::default()
    };
    Client::connect_with(&addr.to_string(), opts).await.unwrap()
}

/// Whether the broker closed `s` within `within` (EOF or a reset).
async fn closed_by_broker(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            // The server's SETTINGS or a ping: keep reading.
            Ok(Ok(_)) => {}
        }
    }
}

/// 3. Sockets that send nothing, or half an HTTP/2 preface, take no
/// connection slot and are closed; a connection that goes quiet after its
/// handshake is closed after `idle_timeout_ms`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_half_open_sockets_do_not_lock_clients_out() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_connections: 4,
        max_handshaking_connections: 16,
        handshake_timeout_ms: 500,
        idle_timeout_ms: 1_000,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let mut idle = Vec::new();
    for i in 0..64 {
        let mut s = TcpStream::connect(b.addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        }
        idle.push(s);
    }
    // A real client gets in at once, more than max_connections times over.
    for i in 0..6 {
        let c = one_shot_client(b.addr).await;
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            Producer::new(c).send(Message::new("t", format!("{i}"))),
        )
        .await;
        assert!(matches!(r, Ok(Ok(_))), "client {i} refused: {r:?}");
    }
    // The last sockets opened (still within their handshake time) are
    // closed once it passes; none of them was counted as a connection.
    let last = idle.last_mut().unwrap();
    assert!(closed_by_broker(last, Duration::from_secs(3)).await);
    let admin = Admin::new(client(b.addr).await);
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin.stats().await.unwrap().connections != 1 {
        assert!(
            Instant::now() < deadline,
            "idle sockets counted as connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A socket that completes the preface and then sends nothing (no
    // SETTINGS, no ping answers) is closed after the idle timeout, long
    // before h2's own 20 s keep-alive timeout.
    let mut quiet = TcpStream::connect(b.addr).await.unwrap();
    quiet
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let t0 = Instant::now();
    assert!(closed_by_broker(&mut quiet, Duration::from_secs(5)).await);
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t0.elapsed()
    );
    // A live client that is quiet for longer stays connected: it answers
    // the broker's pings.
    let c = client(b.addr).await;
    let p = Producer::new(c);
    p.send(Message::new("t", "before")).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let before = admin.stats().await.unwrap().connections;
    assert_eq!(before, 2, "the quiet live client was disconnected");
    p.send(Message::new("t", "after")).await.unwrap();
    b.shutdown().await.unwrap();
}

/// 5. The broker tells HTTP/2 clients how many streams a connection may
/// open (SETTINGS_MAX_CONCURRENT_STREAMS = max_requests_per_connection).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_streams_is_advertised() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_requests_per_connection: 7,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let tcp = TcpStream::connect(b.addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    // The server's SETTINGS arrive with the handshake; one request makes
    // sure they have been applied.
    let req = http::Request::post("/halfmq.v1.Admin/Stats")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (resp, mut body) = send.send_request(req, false).unwrap();
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let _ = resp.await.unwrap();
    assert_eq!(send.current_max_send_streams(), 7);
    b.shutdown().await.unwrap();
}

/// 5. Producer sessions, waiting receives and (consumer group, topic) pairs
/// are bounded in total; past a limit the newcomer is refused (or, for a
/// long poll, answered at once) and everyone else keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_long_polls_and_consumer_groups_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_producer_sessions: 2,
        max_long_polls: 2,
        max_consumer_groups: 2,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    let admin = Admin::new(c.clone());
    admin.create_topic("t", 2).await.unwrap();
    // Sessions: two open, the third gets TOO_MANY_REQUESTS.
    let commit = |_m: MessageView| std::future::ready(TransactionResolution::Commit);
    let p1 = TransactionProducer::new(c.clone(), "pg", commit);
    let p2 = TransactionProducer::new(c.clone(), "pg", commit);
    assert!(p1.wait_session(Duration::from_secs(5)).await);
    assert!(p2.wait_session(Duration::from_secs(5)).await);
    let mut raw = pb::producer_client::ProducerClient::connect(format!("http://{}", b.addr))
        .await
        .unwrap();
    let hello = pb::SessionUp {
        kind: Some(pb::session_up::Kind::Hello(pb::Hello {
            producer_group: "pg".into(),
            topics: vec![],
        })),
    };
    let mut down = raw
        .session(tokio_stream::iter(vec![hello]))
        .await
        .unwrap()
        .into_inner();
    match down.message().await.unwrap().and_then(|m| m.kind) {
        Some(pb::session_down::Kind::Error(s)) => {
            assert_eq!(s.code, Code::TooManyRequests as i32, "{s:?}");
            assert!(s.message.contains("max_producer_sessions"), "{s:?}");
        }
        other => panic!("third session not refused: {other:?}"),
    }
    assert_eq!(admin.stats().await.unwrap().producer_sessions, 2);

    // Long polls: two wait, the third answers at once with nothing.
    let g1 = Consumer::new(c.clone(), "g1", "t");
    let g2 = Consumer::new(c.clone(), "g2", "t");
    let (w1, w2) = (g1.clone(), g2.clone());
    let waiting = [
        tokio::spawn(async move { w1.receive(1, Duration::from_secs(3)).await }),
        tokio::spawn(async move { w2.receive(1, Duration::from_secs(3)).await }),
    ];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = Instant::now();
    let got = g1.receive(1, Duration::from_secs(3)).await.unwrap();
    assert!(got.is_empty());
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "the third long poll waited {:?}",
        t0.elapsed()
    );
    for w in waiting {
        assert!(w.await.unwrap().unwrap().is_empty());
    }
    // Consumer groups: g1 and g2 consume t; g3 cannot start, the others go on.
    let g3 = Consumer::new(c.clone(), "g3", "t");
    let e = g3.receive(1, Duration::ZERO).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::TooManyRequests), "{e}");
    Producer::new(c.clone())
        .send(Message::new("t", "x"))
        .await
        .unwrap();
    let m = g2.receive(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!(m.len(), 1);
    g2.ack(&m[0]).await.unwrap();
    b.shutdown().await.unwrap();
}

/// 4. A receive response stops at `max_receive_bytes` of bodies (at least
/// one message); the rest come with the next receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_response_is_capped_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_message_bytes: 64 * 1024,
        max_receive_bytes: 150 * 1024,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    Admin::new(c.clone()).create_topic("big", 1).await.unwrap();
    let p = Producer::new(c.clone());
    for i in 0..10u8 {
        p.send(Message::new("big", vec![i; 60 * 1024]))
            .await
            .unwrap();
    }
    let cons = Consumer::new(c, "g", "big");
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < 10 && Instant::now() < deadline {
        let got = cons.receive(32, Duration::from_millis(500)).await.unwrap();
        let bytes: usize = got.iter().map(|m| m.body.len()).sum();
        assert!(got.len() <= 2, "{} messages, {bytes} bytes", got.len());
        for m in got {
            seen.push(m.body[0]);
            cons.ack(&m).await.unwrap();
        }
    }
    assert_eq!(seen, (0..10).collect::<Vec<u8>>());
    b.shutdown().await.unwrap();
}

/// 6. A nack reason is capped like a property value; a batch refused for
/// one bad message leaves no auto-created topic behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_nack_reason_is_refused_and_a_refused_batch_creates_no_topic() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    p.send(Message::new("t", "x")).await.unwrap();
    let cons = Consumer::new(c.clone(), "g", "t");
    let m = cons.receive(1, Duration::from_secs(2)).await.unwrap();
    let before = Admin::new(c.clone())
        .stats()
        .await
        .unwrap()
        .commit_log_bytes;
    let e = cons
        .nack(&m[0], &"r".repeat(32 * 1024), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BadRequest), "{e}");
    assert_eq!(
        Admin::new(c.clone())
            .stats()
            .await
            .unwrap()
            .commit_log_bytes,
        before
    );
    // The delivery is still leased to us: a short reason goes through.
    cons.nack(&m[0], &"r".repeat(100), None).await.unwrap();

    let batch = vec![
        Message::new("brand-new", "fine"),
        Message::new("brand-new", vec![0u8; 1 << 20]),
    ];
    let e = p.send_batch(batch).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::MessageTooLarge), "{e}");
    let topics = Admin::new(c).list_topics().await.unwrap();
    assert!(topics.iter().all(|t| t.name != "brand-new"), "{topics:?}");
    b.shutdown().await.unwrap();
}

/// 7. A receipt handle works only for the group it was given to, and one
/// made up from what a consumer can see (queue, offsets, topic) is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipt_handles_are_bound_to_their_group_and_cannot_be_forged() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    Admin::new(c.clone()).create_topic("t", 1).await.unwrap();
    let p = Producer::new(c.clone());
    p.send(Message::new("t", "one")).await.unwrap();
    p.send(Message::new("t", "two")).await.unwrap();
    let a = Consumer::new(c.clone(), "a", "t");
    let bc = Consumer::new(c.clone(), "b", "t");
    let ma = a.receive(1, Duration::from_secs(2)).await.unwrap();
    let mb = bc.receive(1, Duration::from_secs(2)).await.unwrap();
    assert_eq!((ma.len(), mb.len()), (1, 1));
    // Group b acking with group a's handle: refused, a's delivery untouched.
    let e = bc.ack_handle(&ma[0].receipt_handle).await.unwrap_err();
    assert_eq!(e.code(), Some(Code::InvalidReceiptHandle), "{e}");
    // The old handle form (queue.offset.seq.topic) and guesses of the
    // neighbouring lease numbers and offsets are refused too.
    for guess in [
        "0.0.1.t".to_owned(),
        "0.1.1.t".to_owned(),
        // b's own tag on a neighbouring offset and lease number.
        format!("{}0.1.2.t", &mb[0].receipt_handle[..33]),
    ] {
        let e = bc.ack_handle(&guess).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::InvalidReceiptHandle), "{guess}: {e}");
    }
    a.ack(&ma[0]).await.unwrap();
    bc.ack(&mb[0]).await.unwrap();
    // Each group still gets "two" next: nothing was acked for it by others.
    for g in [&a, &bc] {
        let m = g.receive(1, Duration::from_secs(2)).await.unwrap();
        assert_eq!(&m[0].body[..], b"two");
    }
    b.shutdown().await.unwrap();
}

/// 8. A delayed message cannot be cancelled with EndTransaction by probing
/// physical offsets with its message id; every probe is a client error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_cannot_be_cancelled_by_probing() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let c = client(b.addr).await;
    Admin::new(c.clone()).create_topic("t", 1).await.unwrap();
    let p = Producer::new(c.clone());
    let r = p
        .send(Message::new("t", "later").with_delay(Duration::from_millis(1_500)))
        .await
        .unwrap();
    // In a new data directory the delayed message is the first record:
    // physical offset 0. Probe around it, in the old id form and the new.
    for offset in 0..64u64 {
        for id in [
            format!("{offset:016X}{}", r.message_id),
            format!("{offset:016X}{}{}", r.message_id, "0".repeat(32)),
        ] {
            let e = end_transaction(
                &c,
                &id,
                TransactionResolution::Rollback,
                EndSource::Operator,
            )
            .await
            .unwrap_err();
            assert!(
                matches!(
                    e.code(),
                    Some(Code::InvalidTransactionId) | Some(Code::TransactionNotFound)
                ),
                "{id}: {e}"
            );
        }
    }
    let s = Admin::new(c.clone()).stats().await.unwrap();
    assert_eq!((s.delayed_messages, s.transactions_rolled_back), (1, 0));
    let cons = Consumer::new(c, "g", "t");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_empty() && Instant::now() < deadline {
        got = cons.receive(1, Duration::from_millis(500)).await.unwrap();
    }
    assert_eq!(got.len(), 1, "the delayed message was cancelled");
    assert_eq!(&got[0].body[..], b"later");
    b.shutdown().await.unwrap();
}

/// 9. Twenty sessions of a producer group that never answer, beside one
/// that does: with check_max 3, no half is given up; the answering session
/// commits them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_sessions_do_not_get_halves_given_up() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        transaction_timeout_ms: 100,
        check_interval_ms: 200,
        check_reply_timeout_ms: 200,
        check_max: 3,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    let admin = Admin::new(c.clone());
    admin.create_topic("t", 1).await.unwrap();
    let mut silent = Vec::new();
    for _ in 0..20 {
        let p = TransactionProducer::new(client(b.addr).await, "pg", |_m: MessageView| async {
            std::future::pending::<TransactionResolution>().await
        });
        assert!(p.wait_session(Duration::from_secs(5)).await);
        silent.push(p);
    }
    let good = TransactionProducer::new(c.clone(), "pg", |_m: MessageView| {
        std::future::ready(TransactionResolution::Commit)
    });
    assert!(good.wait_session(Duration::from_secs(5)).await);
    // Twenty halves whose producer "crashed" before ending them.
    for i in 0..20 {
        drop(
            good.send_half(Message::new("t", format!("{i}")))
                .await
                .unwrap(),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pending = admin.list_transactions().await.unwrap();
        let given_up = pending.iter().filter(|t| t.given_up).count();
        assert_eq!(given_up, 0, "halves given up: {pending:?}");
        if pending.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still pending: {pending:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(admin.stats().await.unwrap().transactions_committed, 20);
    b.shutdown().await.unwrap();
}

/// The system clock plus an offset a test moves forward.
struct SkewClock(std::sync::atomic::AtomicU64);

impl halfmq_broker::Clock for SkewClock {
    fn now_ms(&self) -> u64 {
        halfmq_storage::now_ms() + self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// 10. A delivery can be extended, but never held past
/// `max_lease_total_ms` after it was delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_cannot_be_renewed_past_max_lease_total() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_invisible_duration_ms: 30_000,
        max_lease_total_ms: 60_000,
        ..test_config(dir.path())
    };
    let clock = std::sync::Arc::new(SkewClock(Default::default()));
    let b = halfmq_broker::start_with_clock(cfg, clock.clone())
        .await
        .unwrap();
    let advance = |ms: u64| {
        clock.0.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    };
    let c = client(b.addr).await;
    Producer::new(c.clone())
        .send(Message::new("t", "held"))
        .await
        .unwrap();
    let cons = Consumer::new(c, "g", "t").with_invisible_duration(Duration::from_secs(30));
    let mut m = cons
        .receive(1, Duration::from_secs(2))
        .await
        .unwrap()
        .remove(0);
    // 20 s later, 30 s more: 50 s in all, within the cap.
    advance(20_000);
    cons.change_invisible_duration(&mut m, Duration::from_secs(30))
        .await
        .unwrap();
    // 40 s after delivery, 30 s more would be 70 s: refused, the lease stands.
    advance(20_000);
    let e = cons
        .change_invisible_duration(&mut m, Duration::from_secs(30))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(Code::BadRequest), "{e}");
    assert!(e.to_string().contains("max_lease_total_ms"), "{e}");
    cons.change_invisible_duration(&mut m, Duration::from_secs(15))
        .await
        .unwrap();
    cons.ack(&m).await.unwrap();
    b.shutdown().await.unwrap();
}
