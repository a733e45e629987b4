//! Consumer retries with delay levels and dead-letter queues, with short
//! configured delays.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use halfmq_client::{Admin, Client, Consumer, Message, Producer};
use halfmq_tests::{start, test_config, BrokerProcess};

fn retry_config(dir: &std::path::Path) -> halfmq_broker::BrokerConfig {
    halfmq_broker::BrokerConfig {
        retry_delays: "100ms 200ms 300ms".into(),
        max_reconsume_times: 2,
        ..test_config(dir)
    }
}

async fn client(addr: impl ToString) -> Client {
    Client::connect(&addr.to_string()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_redelivers_after_the_level_delay_with_reconsume_times_plus_one() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(retry_config(dir.path())).await;
    let c = client(b.addr).await;
    let id = Producer::new(c.clone())
        .send(Message::new("r", "x"))
        .await
        .unwrap()
        .message_id;
    let cons = Consumer::new(c, "g", "r");
    let m = cons
        .receive(1, Duration::from_secs(2))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(m.reconsume_times, 0);
    let t0 = Instant::now();
    cons.nack(&m, "db down", None).await.unwrap();
    // First failure: level n + 2 = 3rd level here (300 ms).
    assert!(
        cons.receive(1, Duration::from_millis(150))
            .await
            .unwrap()
            .is_empty(),
        "too early"
    );
    let again = cons
        .receive(1, Duration::from_secs(3))
        .await
        .unwrap()
        .remove(0);
    assert!(
        t0.elapsed() >= Duration::from_millis(280),
        "after the delay: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        (again.message_id.as_str(), again.reconsume_times),
        (id.as_str(), 1)
    );
    assert_eq!(&again.body[..], b"x");
    assert_eq!(again.topic, "r");
    // A nack's own delay rounds up to a level: 50 ms -> 100 ms.
    cons.nack(&again, "still down", Some(Duration::from_millis(50)))
        .await
        .unwrap();
    let third = cons
        .receive(1, Duration::from_secs(3))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(third.reconsume_times, 2);
    cons.ack(&third).await.unwrap();
    assert!(
        cons.receive(1, Duration::from_millis(700))
            .await
            .unwrap()
            .is_empty(),
        "acked: gone"
    );
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_invisible_duration_counts_as_a_failure_and_other_groups_are_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(retry_config(dir.path())).await;
    let c = client(b.addr).await;
    Producer::new(c.clone())
        .send(Message::new("r", "x"))
        .await
        .unwrap();
    let a = Consumer::new(c.clone(), "a", "r").with_invisible_duration(Duration::from_millis(200));
    let first = a
        .receive(1, Duration::from_secs(2))
        .await
        .unwrap()
        .remove(0);
    // Not acked: expires, then comes back through the retry queue.
    let again = a
        .receive(1, Duration::from_secs(3))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(again.message_id, first.message_id);
    assert_eq!(again.reconsume_times, 1);
    a.ack(&again).await.unwrap();
    // Group b sees the message once, fresh.
    let bb = Consumer::new(c, "b", "r");
    let got = bb.receive(10, Duration::from_secs(2)).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].reconsume_times, 0);
    bb.ack(&got[0]).await.unwrap();
    assert!(bb
        .receive(10, Duration::from_millis(600))
        .await
        .unwrap()
        .is_empty());
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_retries_go_to_the_dlq_then_redrive_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let b = start(retry_config(dir.path())).await;
    let c = client(b.addr).await;
    let p = Producer::new(c.clone());
    let poison = p
        .send(Message::new("r", "poison").with_tag("t"))
        .await
        .unwrap()
        .message_id;
    let other = p
        .send(Message::new("r", "poison-2"))
        .await
        .unwrap()
        .message_id;
    let cons = Consumer::new(c.clone(), "g", "r");
    let before = halfmq_storage_now_ms();
    // max_reconsume_times = 2: deliveries 0, 1, 2 fail; the third failure dead-letters.
    let mut deliveries = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while deliveries < 6 && Instant::now() < deadline {
        for m in cons.receive(10, Duration::from_millis(500)).await.unwrap() {
            deliveries += 1;
            cons.nack(
                &m,
                &format!("cannot parse (attempt {})", m.reconsume_times),
                None,
            )
            .await
            .unwrap();
        }
    }
    assert_eq!(deliveries, 6, "3 deliveries each for 2 messages");
    assert!(
        cons.receive(10, Duration::from_millis(800))
            .await
            .unwrap()
            .is_empty(),
        "never redelivered by itself"
    );
    let admin = Admin::new(c.clone());
    let dlq = admin.list_dead_letters("g").await.unwrap();
    assert_eq!(dlq.len(), 2);
    let d = dlq.iter().find(|d| d.message_id == poison).unwrap();
    assert_eq!(d.topic, "r");
    assert_eq!(d.reconsume_times, 3);
    assert_eq!(d.reason, "cannot parse (attempt 2)");
    assert!(
        d.first_delivery_ms >= before && d.last_delivery_ms >= d.first_delivery_ms,
        "{d:?}"
    );
    assert_eq!(
        admin.dead_letter_counts().await.unwrap(),
        vec![("g".to_string(), 2)]
    );
    // Other groups have no DLQ entries.
    assert!(admin.list_dead_letters("other").await.unwrap().is_empty());

    // Redrive one: delivered again, fresh.
    assert_eq!(
        admin
            .redrive_dead_letters("g", Some(&poison))
            .await
            .unwrap(),
        1
    );
    let back = cons.receive(10, Duration::from_secs(3)).await.unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(
        (back[0].message_id.as_str(), back[0].reconsume_times),
        (poison.as_str(), 0)
    );
    assert_eq!(back[0].tag, "t");
    cons.ack(&back[0]).await.unwrap();
    let left: Vec<String> = admin
        .list_dead_letters("g")
        .await
        .unwrap()
        .into_iter()
        .map(|d| d.message_id)
        .collect();
    assert_eq!(left, vec![other.clone()]);
    // Purge the rest.
    assert_eq!(admin.purge_dead_letters("g").await.unwrap(), 1);
    assert!(admin.list_dead_letters("g").await.unwrap().is_empty());
    assert_eq!(admin.redrive_dead_letters("g", None).await.unwrap(), 0);
    b.shutdown().await.unwrap();

    // DLQ state survives a restart.
    let b = start(retry_config(dir.path())).await;
    let admin = Admin::new(client(b.addr).await);
    assert!(admin.list_dead_letters("g").await.unwrap().is_empty());
    b.shutdown().await.unwrap();
}

fn halfmq_storage_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[test]
fn sigkill_with_scheduled_retries_pending_fires_them_all_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--retry-delays", "1s 1s 1s", "--max-reconsume-times", "5"];
    let rt = halfmq_tests::runtime();
    let b = BrokerProcess::start(dir.path(), &flags);
    let addr = b.addr.clone();
    let nacked: HashSet<String> = rt.block_on(async move {
        let c = client(&addr).await;
        let p = Producer::new(c.clone());
        for i in 0..20 {
            p.send(Message::new("k", format!("{i}"))).await.unwrap();
        }
        let cons = Consumer::new(c, "g", "k");
        let mut nacked = HashSet::new();
        while nacked.len() < 20 {
            for m in cons.receive(20, Duration::from_secs(2)).await.unwrap() {
                cons.nack(&m, "later", None).await.unwrap();
                nacked.insert(m.message_id);
            }
        }
        nacked
    });
    // Every retry is scheduled (durable) and none is due yet: kill now.
    b.kill9();
    let b = BrokerProcess::start(dir.path(), &flags);
    let addr = b.addr.clone();
    rt.block_on(async move {
        let cons = Consumer::new(client(&addr).await, "g", "k");
        let mut got = Vec::new();
        let mut retried = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while retried.len() < 20 && Instant::now() < deadline {
            for m in cons.receive(20, Duration::from_millis(500)).await.unwrap() {
                cons.ack(&m).await.unwrap();
                if m.reconsume_times >= 1 {
                    retried.insert(m.message_id.clone());
                }
                got.push((m.message_id, m.reconsume_times));
            }
        }
        assert_eq!(
            retried, nacked,
            "every scheduled retry fired after the restart"
        );
        // The acks of the failed first deliveries were taken after the last
        // checkpoint, so kill -9 may deliver those originals once more
        // (at-least-once): at most one extra delivery per message.
        let fresh = got.iter().filter(|(_, r)| *r == 0).count();
        assert!(fresh <= 20, "{fresh} fresh redeliveries");
        assert_eq!(got.len(), 20 + fresh, "each retry fired exactly once");
    });
    b.kill9();
}

/// A broker crash loses the acks taken since the last checkpoint; the leases
/// restored from it then expire. That must not count as a failed delivery:
/// with `max_reconsume_times` 0 any counted failure dead-letters at once.
/// Also: receipt handles stay valid across restarts.
#[test]
fn sigkill_does_not_count_against_max_reconsume_times() {
    let dir = tempfile::tempdir().unwrap();
    // No periodic checkpoint in the test's lifetime: what a run saves, it
    // saves at a clean shutdown. One runtime thread (tokio's current-thread
    // scheduler): SIGTERM must still stop it cleanly.
    let flags = [
        "--worker-threads",
        "1",
        "--max-reconsume-times",
        "0",
        "--retry-delays",
        "100ms",
        "--checkpoint-interval",
        "1h",
    ];
    let rt = halfmq_tests::runtime();
    let invisible = Duration::from_secs(3);

    // Run 1: three messages received, none acked; clean stop.
    let b = BrokerProcess::start(dir.path(), &flags);
    let addr = b.addr.clone();
    let held = rt.block_on(async move {
        let c = client(&addr).await;
        let p = Producer::new(c.clone());
        for i in 0..3 {
            p.send(Message::new("c", format!("m{i}")).with_queue_id(0))
                .await
                .unwrap();
        }
        let cons = Consumer::new(c, "g", "c").with_invisible_duration(invisible);
        let mut held = Vec::new();
        while held.len() < 3 {
            held.extend(cons.receive(3, Duration::from_secs(2)).await.unwrap());
        }
        held.sort_by_key(|m| m.queue_offset);
        held
    });
    let leased_at = Instant::now();
    assert!(b.terminate().success());

    // A new broker run that acks `m` with its handle from run 1.
    let ack_in_new_run = |m: &halfmq_client::ReceivedMessage| {
        let b = BrokerProcess::start(dir.path(), &flags);
        let (addr, m) = (b.addr.clone(), m.clone());
        rt.block_on(async move {
            let cons = Consumer::new(client(&addr).await, "g", "c");
            cons.ack(&m)
                .await
                .expect("a receipt handle survives restarts");
        });
        b
    };
    // Run 2: m0 acked; clean stop.
    assert!(ack_in_new_run(&held[0]).terminate().success());
    // Run 3: m1 acked, then kill -9: the ack is lost with the crash.
    ack_in_new_run(&held[1]).kill9();
    assert!(
        leased_at.elapsed() < invisible,
        "the machine was too slow for this test's invisible duration"
    );

    // Run 4: m1 and m2's leases expire. Neither is a failure: both come back
    // in place with reconsume times 0, none is dead-lettered.
    let b = BrokerProcess::start(dir.path(), &flags);
    let addr = b.addr.clone();
    let ids: Vec<String> = held.iter().map(|m| m.message_id.clone()).collect();
    rt.block_on(async move {
        let c = client(&addr).await;
        let cons =
            Consumer::new(c.clone(), "g", "c").with_invisible_duration(Duration::from_millis(300));
        let mut again = Vec::new();
        let deadline = Instant::now() + invisible + Duration::from_secs(5);
        while again.len() < 2 && Instant::now() < deadline {
            again.extend(cons.receive(3, Duration::from_millis(500)).await.unwrap());
        }
        let got: Vec<(&str, u64, u32)> = again
            .iter()
            .map(|m| (m.message_id.as_str(), m.queue_offset, m.reconsume_times))
            .collect();
        assert_eq!(
            got,
            vec![
                (ids[1].as_str(), held[1].queue_offset, 0),
                (ids[2].as_str(), held[2].queue_offset, 0)
            ],
            "the two unacked messages, again, in their own queue, not counted"
        );
        let admin = Admin::new(c);
        assert!(admin.list_dead_letters("g").await.unwrap().is_empty());
        // These deliveries belong to this run: m2 is acked, m1's expiry now
        // counts and (max_reconsume_times 0) dead-letters it.
        cons.ack(&again[1]).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut dlq = Vec::new();
        while dlq.is_empty() && Instant::now() < deadline {
            assert!(cons
                .receive(3, Duration::from_millis(500))
                .await
                .unwrap()
                .is_empty());
            dlq = admin.list_dead_letters("g").await.unwrap();
        }
        let dead: Vec<&str> = dlq.iter().map(|d| d.message_id.as_str()).collect();
        assert_eq!(dead, vec![ids[1].as_str()]);
    });
    b.kill9();
}

#[test]
fn cli_dlq_list_and_redrive() {
    let dir = tempfile::tempdir().unwrap();
    let b = BrokerProcess::start(
        dir.path(),
        &["--retry-delays", "100ms", "--max-reconsume-times", "0"],
    );
    let cli = |args: &[&str]| b.cli(args);
    let (ok, sent, err) = cli(&["send", "cli", "bad", "--json"]);
    assert!(ok, "{err}");
    let id = serde_json::from_str::<serde_json::Value>(sent.trim()).unwrap()["message_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (ok, _, err) = cli(&[
        "consume",
        "cli",
        "--group",
        "g",
        "--count",
        "1",
        "--nack",
        "--reason",
        "bad input",
        "--timeout",
        "2s",
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["dlq", "list", "g", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["message_id"], id);
    assert_eq!(v["topic"], "cli");
    assert_eq!(v["reconsume_times"], 1);
    assert_eq!(v["reason"], "bad input");
    let (ok, _, err) = cli(&[
        "dlq",
        "redrive",
        "g",
        "--id",
        "00000000000000000000000000000000",
    ]);
    assert!(!ok && err.contains("no dead letter"), "{err}");
    let (ok, out, _) = cli(&["dlq", "redrive", "g", "--id", &id]);
    assert!(ok && out.contains("redrove 1"), "{out}");
    let (ok, out, err) = cli(&[
        "consume",
        "cli",
        "--group",
        "g",
        "--count",
        "1",
        "--timeout",
        "3s",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(
        (
            v["message_id"].as_str().unwrap(),
            v["reconsume_times"].as_u64().unwrap()
        ),
        (id.as_str(), 0)
    );
    let (ok, out, _) = cli(&["dlq", "purge", "g"]);
    assert!(ok && out.contains("purged 0"), "{out}");
}
