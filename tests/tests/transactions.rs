//! Transactional messages end to end, with short configured timeouts.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use halfmq_client::{
    Admin, Client, Code, Consumer, EndSource, Message, MessageView, TransactionProducer,
    TransactionResolution,
};
use halfmq_tests::{start, test_config, BrokerProcess};

fn tx_config(dir: &std::path::Path) -> halfmq_broker::BrokerConfig {
    halfmq_broker::BrokerConfig {
        transaction_timeout_ms: 300,
        check_interval_ms: 300,
        check_max: 3,
        check_reply_timeout_ms: 500,
        ..test_config(dir)
    }
}

async fn client(addr: impl ToString) -> Client {
    Client::connect(&addr.to_string()).await.unwrap()
}

/// Every message the group gets within `wait` of quiet, acked.
async fn consume_all(c: &Consumer, wait: Duration) -> Vec<halfmq_client::ReceivedMessage> {
    let mut out = Vec::new();
    loop {
        let msgs = c.receive(64, wait).await.unwrap();
        if msgs.is_empty() {
            return out;
        }
        for m in msgs {
            c.ack(&m).await.unwrap();
            out.push(m);
        }
    }
}

fn answering(
    r: TransactionResolution,
) -> impl Fn(MessageView) -> std::future::Ready<TransactionResolution> + Send + Sync {
    move |_| std::future::ready(r)
}

async fn wait_until<F: FnMut() -> Fut, Fut: std::future::Future<Output = bool>>(
    mut f: F,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_is_visible_once_even_when_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = TransactionProducer::new(c.clone(), "pg", answering(TransactionResolution::Unknown));
    let tx = p
        .send_half(Message::new("orders", "o1").with_tag("created"))
        .await
        .unwrap();
    let cons = Consumer::new(c.clone(), "g", "orders");
    assert!(
        cons.receive(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty(),
        "half is invisible"
    );
    tx.commit().await.unwrap();
    tx.commit().await.unwrap();
    halfmq_client::end_transaction(
        &c,
        &tx.transaction_id,
        TransactionResolution::Commit,
        EndSource::Operator,
    )
    .await
    .unwrap();
    let got = consume_all(&cons, Duration::from_millis(300)).await;
    assert_eq!(got.len(), 1, "exactly one visible copy");
    assert_eq!(got[0].message_id, tx.message_id, "original message id");
    assert_eq!(got[0].tag, "created");
    assert!(
        got[0].properties.is_empty(),
        "system properties are not shown: {:?}",
        got[0].properties
    );
    // A conflicting end changes nothing.
    let e = tx.rollback().await.unwrap_err();
    assert_eq!(e.code(), Some(Code::TransactionConflict));
    assert!(Admin::new(c.clone())
        .list_transactions()
        .await
        .unwrap()
        .is_empty());
    // Counted once, however often it was ended.
    let s = Admin::new(c).stats().await.unwrap();
    assert_eq!(
        (
            s.halves_in,
            s.transactions_committed,
            s.transactions_rolled_back
        ),
        (1, 1, 0)
    );
    assert!(
        s.commit_log_fsyncs >= 2,
        "sync flush: {}",
        s.commit_log_fsyncs
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_is_invisible_and_final() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = TransactionProducer::new(c.clone(), "pg", answering(TransactionResolution::Commit));
    let tx = p.send_half(Message::new("orders", "o1")).await.unwrap();
    tx.rollback().await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(
        tx.commit().await.unwrap_err().code(),
        Some(Code::TransactionConflict)
    );
    let s = Admin::new(c.clone()).stats().await.unwrap();
    assert_eq!(
        (
            s.halves_in,
            s.transactions_committed,
            s.transactions_rolled_back
        ),
        (1, 0, 1)
    );
    // Even a checker answering COMMIT never sees it: it is resolved.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let cons = Consumer::new(c.clone(), "g", "orders");
    assert!(consume_all(&cons, Duration::from_millis(300))
        .await
        .is_empty());
    // Unknown and malformed ids.
    // Well formed (offset, message id, tag), but not one the broker made.
    let fake = format!("{:016X}{}{}", 999_999u64, "AB".repeat(16), "CD".repeat(16));
    let e = halfmq_client::end_transaction(
        &c,
        &fake,
        TransactionResolution::Commit,
        EndSource::Operator,
    )
    .await;
    assert_eq!(e.unwrap_err().code(), Some(Code::TransactionNotFound));
    let e = halfmq_client::end_transaction(
        &c,
        "nonsense",
        TransactionResolution::Commit,
        EndSource::Operator,
    )
    .await;
    assert_eq!(e.unwrap_err().code(), Some(Code::InvalidTransactionId));
    b.shutdown().await.unwrap();
}

/// With a replay window of 4 KiB, halves that fall out of it are saved in
/// sled at a checkpoint: a restart finds them without replaying that far.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn halves_older_than_the_replay_window_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || halfmq_broker::BrokerConfig {
        transaction_replay_bytes: 4096,
        transaction_timeout_ms: 60_000, // never checked: only age saves them
        ..tx_config(dir.path())
    };
    let b = start(cfg()).await;
    let c = client(b.addr).await;
    let p = TransactionProducer::new(c.clone(), "pg", answering(TransactionResolution::Unknown));
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            p.send_half(Message::new("orders", format!("h{i}")))
                .await
                .unwrap(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // a checkpoint: not saved yet
    let normal = halfmq_client::Producer::new(c.clone());
    for i in 0..64 {
        normal
            .send(Message::new("other", vec![i as u8; 1024]))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // aged out: saved
    drop((p, normal, c));
    b.shutdown().await.unwrap();
    let b = start(cfg()).await;
    let c = client(b.addr).await;
    let pending = Admin::new(c.clone()).list_transactions().await.unwrap();
    let got: std::collections::HashSet<&str> =
        pending.iter().map(|t| t.transaction_id.as_str()).collect();
    let want: std::collections::HashSet<&str> =
        ids.iter().map(|t| t.transaction_id.as_str()).collect();
    assert_eq!(got, want);
    halfmq_client::end_transaction(
        &c,
        &ids[0].transaction_id,
        TransactionResolution::Commit,
        EndSource::Producer,
    )
    .await
    .unwrap();
    let got = consume_all(&Consumer::new(c, "g", "orders"), Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1);
    b.shutdown().await.unwrap();
}

/// After a restart the in-memory resolutions are gone: a repeated end is
/// answered from the log (the end record after the half).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_ends_after_a_restart_are_answered_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = TransactionProducer::new(c.clone(), "pg", answering(TransactionResolution::Unknown));
    let committed = p.send_half(Message::new("orders", "c")).await.unwrap();
    let rolled_back = p.send_half(Message::new("orders", "r")).await.unwrap();
    // Traffic between the halves and their ends, so the scans have work.
    let normal = halfmq_client::Producer::new(c.clone());
    for i in 0..200 {
        normal
            .send(Message::new("other", format!("{i}")))
            .await
            .unwrap();
    }
    committed.commit().await.unwrap();
    rolled_back.rollback().await.unwrap();
    drop((p, normal, c));
    b.shutdown().await.unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    let end = |tid: String, r: TransactionResolution| {
        let c = c.clone();
        async move { halfmq_client::end_transaction(&c, &tid, r, EndSource::Producer).await }
    };
    end(
        committed.transaction_id.clone(),
        TransactionResolution::Commit,
    )
    .await
    .unwrap();
    let e = end(
        committed.transaction_id.clone(),
        TransactionResolution::Rollback,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::TransactionConflict));
    end(
        rolled_back.transaction_id.clone(),
        TransactionResolution::Rollback,
    )
    .await
    .unwrap();
    let e = end(
        rolled_back.transaction_id.clone(),
        TransactionResolution::Commit,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Some(Code::TransactionConflict));
    // Still delivered exactly once.
    let cons = Consumer::new(c.clone(), "g", "orders");
    let got = consume_all(&cons, Duration::from_millis(500)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].body[..], b"c");
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_producer_is_resolved_by_another_instance_of_its_group() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    // The sender "crashes": it sends halves and never ends them, and its own
    // checker is gone with it.
    let ids: Vec<String> = {
        let crashed = TransactionProducer::new(
            client(b.addr).await,
            "orders-pg",
            answering(TransactionResolution::Unknown),
        );
        let mut v = Vec::new();
        for i in 0..3 {
            v.push(
                crashed
                    .send_half(Message::new("orders", format!("o{i}")))
                    .await
                    .unwrap()
                    .message_id,
            );
        }
        v
    };
    let checks = Arc::new(AtomicU32::new(0));
    let seen = checks.clone();
    let other = TransactionProducer::new(c.clone(), "orders-pg", move |v: MessageView| {
        seen.fetch_add(1, Ordering::SeqCst);
        assert_eq!(v.topic, "orders");
        std::future::ready(TransactionResolution::Commit)
    });
    assert!(other.wait_session(Duration::from_secs(5)).await);
    let cons = Consumer::new(c.clone(), "g", "orders");
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < 3 && Instant::now() < deadline {
        got.extend(consume_all(&cons, Duration::from_millis(300)).await);
    }
    let got_ids: Vec<String> = got.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(
        got_ids.iter().cloned().collect::<HashSet<_>>(),
        ids.into_iter().collect::<HashSet<_>>()
    );
    assert_eq!(got_ids.len(), 3, "each consumed once");
    assert!(checks.load(Ordering::SeqCst) >= 3);
    assert!(
        consume_all(&cons, Duration::from_millis(500))
            .await
            .is_empty(),
        "no late duplicate"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checker_rollback_means_never_consumed() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = TransactionProducer::new(c.clone(), "pg", answering(TransactionResolution::Rollback));
    p.send_half(Message::new("orders", "o1")).await.unwrap();
    let admin = Admin::new(c.clone());
    wait_until(
        || async { admin.list_transactions().await.unwrap().is_empty() },
        "rollback by check",
    )
    .await;
    let cons = Consumer::new(c, "g", "orders");
    assert!(consume_all(&cons, Duration::from_millis(300))
        .await
        .is_empty());
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_until_check_max_then_given_up_then_resolved_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    let checks = Arc::new(AtomicU32::new(0));
    let seen = checks.clone();
    let p = TransactionProducer::new(c.clone(), "pg", move |_v: MessageView| {
        seen.fetch_add(1, Ordering::SeqCst);
        std::future::ready(TransactionResolution::Unknown)
    });
    let tx = p.send_half(Message::new("orders", "o1")).await.unwrap();
    let admin = Admin::new(c.clone());
    wait_until(
        || async {
            admin
                .list_transactions()
                .await
                .unwrap()
                .first()
                .is_some_and(|t| t.given_up)
        },
        "given up",
    )
    .await;
    let listed = admin.list_transactions().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].transaction_id, tx.transaction_id);
    assert_eq!(listed[0].check_times, 3, "check_max attempts");
    assert_eq!(listed[0].producer_group, "pg");
    // No more checks once given up.
    let n = checks.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(checks.load(Ordering::SeqCst), n);
    let cons = Consumer::new(c.clone(), "g", "orders");
    assert!(
        consume_all(&cons, Duration::from_millis(200))
            .await
            .is_empty(),
        "given up is never delivered"
    );
    halfmq_client::end_transaction(
        &c,
        &tx.transaction_id,
        TransactionResolution::Commit,
        EndSource::Operator,
    )
    .await
    .unwrap();
    let got = consume_all(&cons, Duration::from_millis(300)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id, tx.message_id);
    assert!(admin.list_transactions().await.unwrap().is_empty());
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_live_session_is_not_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    // Sent by a producer of another group's session... none of "lonely".
    let sender = TransactionProducer::new(
        c.clone(),
        "lonely",
        answering(TransactionResolution::Unknown),
    );
    let tx = sender
        .send_half(Message::new("orders", "o1"))
        .await
        .unwrap();
    drop(sender);
    let admin = Admin::new(c.clone());
    // Many check intervals pass with no session of the group.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = admin.list_transactions().await.unwrap().remove(0);
    assert_eq!(t.check_times, 0, "no attempt counted without a session");
    assert!(!t.given_up);
    assert!(t.note.contains("no live session"), "{}", t.note);
    // A session appears: the check is delivered and resolves it.
    let _p = TransactionProducer::new(
        c.clone(),
        "lonely",
        answering(TransactionResolution::Commit),
    );
    wait_until(
        || async { admin.list_transactions().await.unwrap().is_empty() },
        "commit by check",
    )
    .await;
    let got = consume_all(&Consumer::new(c, "g", "orders"), Duration::from_millis(300)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message_id, tx.message_id);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_in_transaction_follows_the_local_result() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    // The checker commits whatever is left to it.
    let p = TransactionProducer::new(c.clone(), "pg", answering(TransactionResolution::Commit));
    let ok = p
        .send_in_transaction(Message::new("t", "commit-me"), |_tx| async {
            Ok::<_, String>(TransactionResolution::Commit)
        })
        .await
        .unwrap();
    assert_eq!(ok.resolution, TransactionResolution::Commit);
    let rb = p
        .send_in_transaction(Message::new("t", "roll-me"), |_tx| async {
            Ok::<_, String>(TransactionResolution::Rollback)
        })
        .await
        .unwrap();
    assert_eq!(rb.resolution, TransactionResolution::Rollback);
    let err = p
        .send_in_transaction(Message::new("t", "failed-local"), |_tx| async {
            Err::<TransactionResolution, _>("db down")
        })
        .await
        .unwrap();
    assert_eq!(err.resolution, TransactionResolution::Unknown);
    let panicked = p
        .send_in_transaction(Message::new("t", "panicked-local"), |_tx| async {
            if true {
                panic!("local transaction panicked");
            }
            Ok::<_, String>(TransactionResolution::Commit)
        })
        .await
        .unwrap();
    assert_eq!(panicked.resolution, TransactionResolution::Unknown);
    let admin = Admin::new(c.clone());
    wait_until(
        || async { admin.list_transactions().await.unwrap().is_empty() },
        "check-backs",
    )
    .await;
    let mut bodies: Vec<String> =
        consume_all(&Consumer::new(c, "g", "t"), Duration::from_millis(300))
            .await
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
    bodies.sort();
    assert_eq!(bodies, vec!["commit-me", "failed-local", "panicked-local"]);
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checks_are_spread_across_instances() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    let sender = TransactionProducer::new(
        c.clone(),
        "spread",
        answering(TransactionResolution::Unknown),
    );
    for i in 0..20 {
        sender
            .send_half(Message::new("orders", format!("{i}")))
            .await
            .unwrap();
    }
    drop(sender);
    let (a, bb) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (a2, b2) = (a.clone(), bb.clone());
    let p1 = TransactionProducer::new(client(b.addr).await, "spread", move |_v: MessageView| {
        a2.fetch_add(1, Ordering::SeqCst);
        std::future::ready(TransactionResolution::Commit)
    });
    let p2 = TransactionProducer::new(client(b.addr).await, "spread", move |_v: MessageView| {
        b2.fetch_add(1, Ordering::SeqCst);
        std::future::ready(TransactionResolution::Commit)
    });
    assert!(
        p1.wait_session(Duration::from_secs(5)).await
            && p2.wait_session(Duration::from_secs(5)).await
    );
    let admin = Admin::new(c.clone());
    wait_until(
        || async { admin.list_transactions().await.unwrap().is_empty() },
        "all committed",
    )
    .await;
    let (x, y) = (a.load(Ordering::SeqCst), bb.load(Ordering::SeqCst));
    assert!(x > 0 && y > 0, "both instances answered checks: {x} / {y}");
    assert_eq!(
        consume_all(&Consumer::new(c, "g", "orders"), Duration::from_millis(300))
            .await
            .len(),
        20
    );
    b.shutdown().await.unwrap();
}

#[test]
fn sigkill_with_pending_and_committed_halves() {
    let dir = tempfile::tempdir().unwrap();
    let flags = [
        "--transaction-timeout",
        "300ms",
        "--check-interval",
        "300ms",
        "--check-max",
        "50",
    ];
    let rt = halfmq_tests::runtime();
    let b = BrokerProcess::start(dir.path(), &flags);
    let addr = b.addr.clone();
    let (committed, pending, rolled_back) = rt.block_on(async move {
        let c = client(&addr).await;
        let p = TransactionProducer::new(
            c.clone(),
            "kill-pg",
            answering(TransactionResolution::Unknown),
        );
        let (mut committed, mut pending, mut rolled_back) =
            (HashSet::new(), HashSet::new(), HashSet::new());
        for i in 0..30 {
            let tx = p
                .send_half(Message::new("orders", format!("{i}")))
                .await
                .unwrap();
            match i % 3 {
                0 => {
                    tx.commit().await.unwrap();
                    committed.insert(tx.message_id);
                }
                1 => {
                    tx.rollback().await.unwrap();
                    rolled_back.insert(tx.message_id);
                }
                _ => {
                    pending.insert(tx.message_id);
                }
            }
        }
        (committed, pending, rolled_back)
    });
    b.kill9();

    let b = BrokerProcess::start(dir.path(), &flags);
    let addr = b.addr.clone();
    rt.block_on(async move {
        let c = client(&addr).await;
        let admin = Admin::new(c.clone());
        let listed: HashSet<String> = admin
            .list_transactions()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.message_id)
            .collect();
        assert_eq!(
            listed, pending,
            "pending halves survive kill -9 and nothing else is pending"
        );
        // Committed ones are delivered once; pending ones get checked again and commit.
        let _checker = TransactionProducer::new(
            c.clone(),
            "kill-pg",
            answering(TransactionResolution::Commit),
        );
        wait_until(
            || async { admin.list_transactions().await.unwrap().is_empty() },
            "pending resolved after restart",
        )
        .await;
        let got = consume_all(&Consumer::new(c, "g", "orders"), Duration::from_millis(500)).await;
        let ids: Vec<String> = got.into_iter().map(|m| m.message_id).collect();
        let set: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(ids.len(), set.len(), "no duplicates");
        let expected: HashSet<String> = committed.union(&pending).cloned().collect();
        assert_eq!(set, expected);
        assert!(set.is_disjoint(&rolled_back));
    });
    b.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batched_ends_stay_exactly_once_and_first_wins() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(tx_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = TransactionProducer::new(c.clone(), "pg", answering(TransactionResolution::Unknown));
    // 120 halves sent concurrently: coalesced into batch requests.
    let hs: Vec<_> = (0..120)
        .map(|i| {
            let p = p.clone();
            tokio::spawn(async move {
                p.send_half(Message::new("b", format!("{i}")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut txs = Vec::new();
    for h in hs {
        txs.push(h.await.unwrap());
    }
    // 100 of them: two concurrent commits each (both succeed, one copy).
    // 20 of them: a commit racing a rollback (exactly one wins).
    let mut expect_visible = HashSet::new();
    let mut races = Vec::new();
    for (i, tx) in txs.iter().enumerate() {
        let (t1, t2) = (tx.clone(), tx.clone());
        if i < 100 {
            let (a, bb) = tokio::join!(t1.commit(), t2.commit());
            a.unwrap();
            bb.unwrap();
            expect_visible.insert(tx.message_id.clone());
        } else {
            races.push(tokio::spawn(async move {
                let (a, bb) = tokio::join!(t1.commit(), t2.rollback());
                (t1.message_id.clone(), a, bb)
            }));
        }
    }
    for r in races {
        let (id, commit, rollback) = r.await.unwrap();
        match (commit, rollback) {
            (Ok(()), Err(e)) => {
                assert_eq!(e.code(), Some(Code::TransactionConflict));
                expect_visible.insert(id);
            }
            (Err(e), Ok(())) => assert_eq!(e.code(), Some(Code::TransactionConflict)),
            other => panic!("exactly one of commit/rollback must win: {other:?}"),
        }
    }
    let got = consume_all(&Consumer::new(c, "g", "b"), Duration::from_millis(300)).await;
    let ids: Vec<String> = got.into_iter().map(|m| m.message_id).collect();
    let set: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(ids.len(), set.len(), "no duplicates");
    assert_eq!(set, expect_visible);
    b.shutdown().await.unwrap();
}

/// `TransactionBatch` at the wire: halves stored all or nothing, each end
/// alone, a refusal of one part leaves the other done, and too many ends are
/// refused whole with nothing ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_batch_stores_halves_and_ends_each_on_its_own_terms() {
    use halfmq_proto::v1 as pb;
    let dir = tempfile::tempdir().unwrap();
    let b = start(halfmq_broker::BrokerConfig {
        max_batch_messages: 4,
        ..tx_config(dir.path())
    })
    .await;
    let mut raw = pb::producer_client::ProducerClient::connect(format!("http://{}", b.addr))
        .await
        .unwrap();
    let half = |body: &str| pb::Message {
        topic: "tb".into(),
        body: body.as_bytes().to_vec().into(),
        ..Default::default()
    };
    let end = |tid: &str, r: pb::Resolution| pb::EndTransactionRequest {
        transaction_id: tid.into(),
        resolution: r as i32,
        source: pb::EndSource::Producer as i32,
    };
    let batch = |halves: Vec<pb::Message>, ends: Vec<pb::EndTransactionRequest>| {
        pb::TransactionBatchRequest {
            producer_group: "pg".into(),
            halves,
            ends,
        }
    };
    let code = |s: &pb::Status| pb::Code::try_from(s.code).unwrap();
    // Halves only.
    let r = raw
        .transaction_batch(batch(vec![half("h0"), half("h1")], vec![]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(r.halves_status.as_ref().unwrap()), pb::Code::Ok);
    assert_eq!(r.receipts.len(), 2);
    assert!(r.end_results.is_empty());
    let (t0, t1) = (
        r.receipts[0].transaction_id.clone(),
        r.receipts[1].transaction_id.clone(),
    );
    // A new half with ends: commit h0, roll back h1, then commit h1 in the
    // same request (the rollback came first: conflict), and a malformed id.
    let r = raw
        .transaction_batch(batch(
            vec![half("h2")],
            vec![
                end(&t0, pb::Resolution::Commit),
                end(&t1, pb::Resolution::Rollback),
                end(&t1, pb::Resolution::Commit),
                end("not-an-id", pb::Resolution::Commit),
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(code(r.halves_status.as_ref().unwrap()), pb::Code::Ok);
    let t2 = r.receipts[0].transaction_id.clone();
    let codes: Vec<pb::Code> = r.end_results.iter().map(code).collect();
    assert_eq!(
        codes[..3],
        [pb::Code::Ok, pb::Code::Ok, pb::Code::TransactionConflict]
    );
    assert_ne!(
        codes[3],
        pb::Code::Ok,
        "a malformed transaction id is refused"
    );
    // Refused halves (a reserved topic name) do not stop the ends.
    let r = raw
        .transaction_batch(batch(
            vec![pb::Message {
                topic: "%bad".into(),
                ..half("x")
            }],
            vec![end(&t2, pb::Resolution::Commit)],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(code(r.halves_status.as_ref().unwrap()), pb::Code::Ok);
    assert!(r.receipts.is_empty());
    assert_eq!(
        r.end_results.iter().map(code).collect::<Vec<_>>(),
        [pb::Code::Ok]
    );
    // More ends than max_batch_messages (4): all refused, none applied.
    let r = raw
        .transaction_batch(batch(
            vec![half("h3")],
            (0..5).map(|_| end(&t1, pb::Resolution::Commit)).collect(),
        ))
        .await
        .unwrap()
        .into_inner();
    let t3 = r.receipts[0].transaction_id.clone();
    assert!(r
        .end_results
        .iter()
        .all(|s| code(s) == pb::Code::BadRequest));
    assert_eq!(r.end_results.len(), 5);
    let r = raw
        .transaction_batch(batch(
            vec![],
            (0..5).map(|_| end(&t3, pb::Resolution::Commit)).collect(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(r
        .end_results
        .iter()
        .all(|s| code(s) == pb::Code::BadRequest));
    assert_eq!(
        code(r.halves_status.as_ref().unwrap()),
        pb::Code::Ok,
        "no halves: OK"
    );
    let c = client(b.addr).await;
    let pending: Vec<String> = Admin::new(c.clone())
        .list_transactions()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.transaction_id)
        .collect();
    assert_eq!(pending, vec![t3.clone()], "h3 is still pending");
    // Committed: h0 and h2, once each; h1 (rolled back) and h3 (pending) never.
    let got = consume_all(&Consumer::new(c, "g", "tb"), Duration::from_millis(300)).await;
    let mut bodies: Vec<String> = got
        .iter()
        .map(|m| String::from_utf8_lossy(&m.body).into_owned())
        .collect();
    bodies.sort();
    assert_eq!(bodies, ["h0", "h2"]);
    b.shutdown().await.unwrap();
}
