//! Many clients and clients that vanish: thousands of connections and of
//! streams, a long poll whose client goes away, a producer session that
//! closes while a check is out. Each is refused clearly or cleaned up, and
//! the broker keeps serving everyone else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq_client::{
    Admin, Client, ClientOptions, Consumer, Message, MessageView, Producer, TransactionProducer,
    TransactionResolution,
};
use halfmq_tests::{start, test_config};

/// Raises the soft open-file limit to the hard one (a test process with a
/// thousand clients and the broker's thousand sockets needs more than 1024).
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    let _ = setrlimit(Resource::Nofile, l);
}

async fn client(addr: impl ToString) -> Client {
    Client::connect(&addr.to_string()).await.unwrap()
}

async fn wait_for(what: &str, timeout: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connections_at_the_limit() {
    raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        max_connections: 1001, // the thousand below and the admin's
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let admin = Admin::new(client(b.addr).await);
    admin.create_topic("many", 4).await.unwrap();
    // A thousand connections, each sending at the same time.
    let mut clients = Vec::new();
    for _ in 0..1000 {
        clients.push(client(b.addr).await);
    }
    let sends: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let p = Producer::new(c.clone());
            tokio::spawn(async move { p.send(Message::new("many", format!("{i}"))).await })
        })
        .collect();
    for s in sends {
        s.await.unwrap().unwrap();
    }
    assert_eq!(admin.stats().await.unwrap().connections, 1001);
    // One more is refused at once, and the others keep working.
    let opts = ClientOptions {
        max_attempts: 1,
        ..Default::default()
    };
    let extra = Client::connect_with(&b.addr.to_string(), opts)
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), Admin::new(extra).stats()).await;
    assert!(matches!(r, Ok(Err(_))), "connection 1002 refused: {r:?}");
    Producer::new(clients[999].clone())
        .send(Message::new("many", "still"))
        .await
        .unwrap();
    // Closing half frees their slots: the count follows, new clients get in.
    clients.truncate(500);
    wait_for(
        "connections to close",
        Duration::from_secs(10),
        async || admin.stats().await.unwrap().connections == 501,
    )
    .await;
    let late = client(b.addr).await;
    Producer::new(late)
        .send(Message::new("many", "late"))
        .await
        .unwrap();
    let topics = admin.list_topics().await.unwrap();
    assert_eq!(
        topics.iter().find(|t| t.name == "many").unwrap().messages,
        1002
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_streams_on_one_connection() {
    raise_nofile();
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        transaction_timeout_ms: 100,
        check_interval_ms: 100,
        ..test_config(dir.path())
    };
    let max_requests = cfg.max_requests_per_connection as usize;
    let b = start(cfg).await;
    let c = client(b.addr).await;
    Admin::new(c.clone())
        .create_topic("streams", 4)
        .await
        .unwrap();
    // Twice max_requests_per_connection long polls on one connection: the
    // excess waits its turn; none fails.
    let polls: Vec<_> = (0..2 * max_requests)
        .map(|i| {
            let cons = Consumer::new(c.clone(), format!("g{}", i % 50), "streams");
            tokio::spawn(async move { cons.receive(1, Duration::from_millis(500)).await })
        })
        .collect();
    // Meanwhile another connection is served promptly.
    let other = client(b.addr).await;
    let t0 = Instant::now();
    Producer::new(other.clone())
        .send(Message::new("streams", "x"))
        .await
        .unwrap();
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    for p in polls {
        p.await.unwrap().unwrap();
    }
    // A thousand producer sessions (bidi streams) on one connection: a
    // check-back reaches one of them; when they go, the broker lets go too.
    let admin = Admin::new(other.clone());
    let producers: Vec<TransactionProducer> = (0..1000)
        .map(|_| {
            TransactionProducer::new(c.clone(), "pg", |_m: MessageView| {
                std::future::ready(TransactionResolution::Commit)
            })
        })
        .collect();
    wait_for("1000 sessions", Duration::from_secs(20), async || {
        admin.stats().await.unwrap().producer_sessions == 1000
    })
    .await;
    // A half of group "pg" left unresolved: only a check-back can end it.
    let _tx = producers[0]
        .send_half(Message::new("streams", "committed by check"))
        .await
        .unwrap();
    let cons = Consumer::new(other.clone(), "tx-reader", "streams");
    wait_for("the checked half", Duration::from_secs(10), async || {
        cons.receive(8, Duration::from_millis(100))
            .await
            .unwrap()
            .iter()
            .any(|m| &m.body[..] == b"committed by check")
    })
    .await;
    drop(producers);
    wait_for("sessions to close", Duration::from_secs(10), async || {
        admin.stats().await.unwrap().producer_sessions == 0
    })
    .await;
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_whose_client_went_away_takes_no_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        default_invisible_duration_ms: 60_000,
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    Admin::new(c.clone()).create_topic("gone", 1).await.unwrap();
    // Several long polls (5 s) whose callers give up after 200 ms.
    for _ in 0..5 {
        let cons = Consumer::new(client(b.addr).await, "g", "gone");
        let poll = tokio::spawn(async move { cons.receive(1, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(200)).await;
        poll.abort();
        let _ = poll.await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Producer::new(c.clone())
        .send(Message::new("gone", "for the live one"))
        .await
        .unwrap();
    // A live consumer gets it now, not after the 60 s invisible duration a
    // dead poll would have leased it for.
    let live = Consumer::new(c, "g", "gone");
    let t0 = Instant::now();
    let got = live.receive(1, Duration::from_secs(3)).await.unwrap();
    assert_eq!(got.len(), 1, "the message went to a poll nobody reads");
    assert!(t0.elapsed() < Duration::from_secs(3));
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_closing_with_a_check_out_hands_it_to_another_instance() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = halfmq_broker::BrokerConfig {
        transaction_timeout_ms: 100,
        check_interval_ms: 60_000, // a rescheduled check would come too late
        check_reply_timeout_ms: 60_000, // and so would a timed-out one
        ..test_config(dir.path())
    };
    let b = start(cfg).await;
    let c = client(b.addr).await;
    Admin::new(c.clone())
        .create_topic("handoff", 1)
        .await
        .unwrap();
    // The only instance at first: it takes the check and never answers.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::channel::<()>(4);
    let seen_tx = Arc::new(seen_tx);
    let hanging = TransactionProducer::new(client(b.addr).await, "pg", move |_m: MessageView| {
        let seen = Arc::clone(&seen_tx);
        async move {
            let _ = seen.send(()).await;
            std::future::pending::<TransactionResolution>().await
        }
    });
    assert!(hanging.wait_session(Duration::from_secs(5)).await);
    let _tx = hanging
        .send_half(Message::new("handoff", "resolved by the second"))
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(5), seen_rx.recv())
        .await
        .expect("the first instance got the check");
    // It dies with the check out; a second instance comes up.
    drop(hanging);
    let second = TransactionProducer::new(client(b.addr).await, "pg", |_m: MessageView| {
        std::future::ready(TransactionResolution::Commit)
    });
    assert!(second.wait_session(Duration::from_secs(5)).await);
    let cons = Consumer::new(c.clone(), "g", "handoff");
    let got = cons.receive(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(got.len(), 1, "the check was handed over");
    assert_eq!(&got[0].body[..], b"resolved by the second");
    let pending = Admin::new(c).list_transactions().await.unwrap();
    assert!(pending.is_empty(), "{pending:?}");
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_opened_during_shutdown_is_refused_and_does_not_hold_it_up() {
    use halfmq_proto::v1 as pb;
    let dir = tempfile::tempdir().unwrap();
    let b = start(test_config(dir.path())).await;
    let mut raw = pb::producer_client::ProducerClient::connect(format!("http://{}", b.addr))
        .await
        .unwrap();
    b.broker.begin_shutdown();
    let hello = pb::SessionUp {
        kind: Some(pb::session_up::Kind::Hello(pb::Hello {
            producer_group: "pg".into(),
            topics: Vec::new(),
        })),
    };
    // The upstream stays open, as a live producer's would.
    let (up_tx, up_rx) = tokio::sync::mpsc::channel(1);
    up_tx.send(hello).await.unwrap();
    let mut down = raw
        .session(tokio_stream::wrappers::ReceiverStream::new(up_rx))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), down.message())
        .await
        .expect("an answer")
        .unwrap();
    match first.and_then(|d| d.kind) {
        Some(pb::session_down::Kind::Error(s)) => {
            assert_eq!(s.code, pb::Code::ShuttingDown as i32, "{s:?}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    tokio::time::timeout(Duration::from_secs(10), b.shutdown())
        .await
        .expect("shutdown finishes")
        .unwrap();
    drop(up_tx);
}
