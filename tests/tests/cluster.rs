//! A broker group of 3 processes on 127.0.0.1 (own ports and data dirs)
//! under mixed load, its **leader** killed with SIGKILL at random moments and
//! restarted, while clients that know all three addresses go on:
//! - a producer of keyed sends (`n-<k>`, automatic idempotency keys);
//! - a transactional producer (body `tx-<n>`: commit for even n, rollback
//!   for odd); every third "crashes" (sends no end) and a checker of the
//!   group answers check-backs from the same decision table;
//! - two consumers of one group that ack, nack a first delivery now and
//!   then, and let some expire;
//! - a producer of "doomed" messages and a consumer that fails every
//!   delivery (nack or expiry), so each is dead-lettered after
//!   `max_reconsume_times` (2).
//!
//! At the end (every half resolved) it checks: no acknowledged send or
//! committed half is lost; no rolled-back half was delivered; one message id
//! per body (a send retried across a failover is stored once, a transaction
//! has one id); per queue, the queue offsets delivered have no gaps; every
//! exhausted message is in the DLQ exactly once; every replica applied the
//! same log. It reports the failover time (kill → next
//! acknowledged send), p50 and max.
//!
//! `HALFMQ_CLUSTER_KILLS` sets the number of leader kills (default 5).
//!
//! A second test wipes a follower's data directory after retention dropped
//! the start of the log: it catches up from a snapshot and later leads, with
//! every message kept and a transaction id made before.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halfmq_client::{
    Admin, Client, Cluster, Consumer, Message, MessageView, Producer, TransactionProducer,
    TransactionResolution,
};
use halfmq_tests::group::{leader_of, opts, status_of, Group};
use halfmq_tests::{decision, free_port, table_checker, BrokerProcess};
use rand::Rng;

#[derive(Default)]
struct Ledger {
    /// Message ids of acknowledged sends.
    sent: HashSet<String>,
    /// Acknowledged halves: message id -> decision is commit.
    halves: HashMap<String, bool>,
    /// Distinct message ids seen per body.
    ids_per_body: HashMap<String, HashSet<String>>,
    /// Message ids delivered.
    delivered: HashSet<String>,
    /// Message ids whose ack the broker acknowledged.
    acked: HashSet<String>,
    /// Queue offsets delivered per queue id (topic "orders").
    offsets: BTreeMap<u32, BTreeSet<u64>>,
    /// Rolled-back bodies that were delivered (must stay empty).
    rolled_back_delivered: Vec<String>,
    /// When the last send was acknowledged.
    last_ack: Option<Instant>,
    /// Message ids of acknowledged sends to "doomed" (always nacked: each
    /// must end in the DLQ once).
    doomed: HashSet<String>,
}

#[test]
fn leader_kills_lose_nothing_acknowledged() {
    let kills: usize = std::env::var("HALFMQ_CLUSTER_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mut g = Group::start_all();
    let all = g.addrs.join(",");
    let rt = halfmq_tests::runtime();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let producing = Arc::new(AtomicBool::new(true));
    let consuming = Arc::new(AtomicBool::new(true));
    let tasks = rt.block_on(async {
        let mut tasks = Vec::new();
        {
            let p = Producer::new(Client::connect_with(&all, opts()).await.unwrap());
            let (ledger, producing) = (ledger.clone(), producing.clone());
            tasks.push(tokio::spawn(async move {
                let mut k = 0u64;
                while producing.load(Ordering::Relaxed) {
                    let body = format!("n-{k}");
                    if let Ok(r) = p.send(Message::new("orders", body)).await {
                        let mut l = ledger.lock().unwrap();
                        l.sent.insert(r.message_id);
                        l.last_ack = Some(Instant::now());
                        k += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }));
        }
        {
            // Batches of 4 to one queue: consecutive queue offsets in one entry.
            let p = Producer::new(Client::connect_with(&all, opts()).await.unwrap());
            let (ledger, producing) = (ledger.clone(), producing.clone());
            tasks.push(tokio::spawn(async move {
                let mut b = 0u64;
                while producing.load(Ordering::Relaxed) {
                    let msgs: Vec<Message> = (0..4)
                        .map(|j| {
                            Message::new("orders", format!("b-{b}-{j}"))
                                .with_queue_id((b % 4) as u32)
                        })
                        .collect();
                    if let Ok(rs) = p.send_batch(msgs).await {
                        let mut l = ledger.lock().unwrap();
                        for r in rs {
                            l.sent.insert(r.message_id);
                        }
                        b += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }));
        }
        {
            let tp = TransactionProducer::new(
                Client::connect_with(&all, opts()).await.unwrap(),
                "cluster-pg",
                table_checker,
            );
            let (ledger, producing) = (ledger.clone(), producing.clone());
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while producing.load(Ordering::Relaxed) {
                    let body = format!("tx-{n}");
                    let commit = n.is_multiple_of(2);
                    if let Ok(tx) = tp.send_half(Message::new("orders", body)).await {
                        ledger
                            .lock()
                            .unwrap()
                            .halves
                            .insert(tx.message_id.clone(), commit);
                        if !n.is_multiple_of(3) {
                            let _ = if commit {
                                tx.commit().await
                            } else {
                                tx.rollback().await
                            };
                        }
                        n += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        {
            let p = Producer::new(Client::connect_with(&all, opts()).await.unwrap());
            let (ledger, producing) = (ledger.clone(), producing.clone());
            tasks.push(tokio::spawn(async move {
                let mut k = 0u64;
                while producing.load(Ordering::Relaxed) {
                    if let Ok(r) = p.send(Message::new("doomed", format!("d-{k}"))).await {
                        ledger.lock().unwrap().doomed.insert(r.message_id);
                        k += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }));
        }
        {
            // Every delivery of "doomed" fails: nacked, or left to expire.
            let c = Consumer::new(
                Client::connect_with(&all, opts()).await.unwrap(),
                "doomers",
                "doomed",
            )
            .with_invisible_duration(Duration::from_millis(300));
            let consuming = consuming.clone();
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while consuming.load(Ordering::Relaxed) {
                    let Ok(msgs) = c.receive(32, Duration::from_millis(300)).await else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    for m in msgs {
                        n += 1;
                        if !n.is_multiple_of(5) {
                            let _ = c.nack(&m, "always fails", None).await;
                        }
                    }
                }
            }));
        }
        let checker = TransactionProducer::new(
            Client::connect_with(&all, opts()).await.unwrap(),
            "cluster-pg",
            table_checker,
        );
        for _ in 0..2 {
            let c = Consumer::new(
                Client::connect_with(&all, opts()).await.unwrap(),
                "billing",
                "orders",
            )
            .with_invisible_duration(Duration::from_millis(500));
            let (ledger, consuming) = (ledger.clone(), consuming.clone());
            tasks.push(tokio::spawn(async move {
                while consuming.load(Ordering::Relaxed) {
                    let msgs = match c.receive(32, Duration::from_millis(300)).await {
                        Ok(m) => m,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    for m in msgs {
                        let body = String::from_utf8_lossy(&m.body).into_owned();
                        {
                            let mut l = ledger.lock().unwrap();
                            l.delivered.insert(m.message_id.clone());
                            l.ids_per_body
                                .entry(body.clone())
                                .or_default()
                                .insert(m.message_id.clone());
                            // A retry names its place in the topic too: a
                            // first delivery lost with a killed leader comes
                            // back only as a retry.
                            let place = if m.retry {
                                m.original_queue_offset
                            } else {
                                Some(m.queue_offset)
                            };
                            if let Some(o) = place {
                                l.offsets.entry(m.queue_id).or_default().insert(o);
                            }
                            if decision(&body) == Some(false) {
                                l.rolled_back_delivered.push(body.clone());
                            }
                        }
                        let k: u64 = body
                            .rsplit('-')
                            .next()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        if m.reconsume_times == 0 && k % 7 == 1 {
                            let _ = c.nack(&m, "first try fails", None).await;
                        } else if m.reconsume_times == 0 && k % 7 == 2 {
                            // left to expire
                        } else if c.ack(&m).await.is_ok() {
                            ledger.lock().unwrap().acked.insert(m.message_id.clone());
                        }
                    }
                }
            }));
        }
        tasks.push(tokio::spawn(async move {
            std::future::pending::<()>().await;
            drop(checker);
        }));
        tasks
    });

    // Halves left open across the failovers, ended afterwards by their
    // transaction ids (which every member must take: the group shares the
    // key they are made with).
    let mut late = Some(rt.block_on(async {
        let tp = TransactionProducer::new(
            Client::connect_with(&all, opts()).await.unwrap(),
            "late-pg",
            |_m: MessageView| std::future::ready(TransactionResolution::Unknown),
        );
        let mut v = Vec::new();
        for i in 0..5 {
            v.push(
                tp.send_half(Message::new("orders", format!("late-{i}")))
                    .await
                    .unwrap(),
            );
        }
        v
    }));
    // Kill the leader `kills` times; each time measure how long until the
    // next send is acknowledged.
    let mut rng = rand::thread_rng();
    let mut failovers = Vec::new();
    std::thread::sleep(Duration::from_millis(1500));
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.gen_range(300..900)));
        let leader = rt.block_on(async {
            let c = Cluster::new(Client::connect(&all).await.unwrap());
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (nodes, _) = c.status().await;
                if let Some(n) = nodes.iter().find(|n| n.role == "leader") {
                    return n.node_id as usize - 1;
                }
                assert!(Instant::now() < deadline, "no leader");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let killed_at = Instant::now();
        if let Some(p) = g.procs[leader].take() {
            p.kill9();
        }
        let deadline = killed_at + Duration::from_secs(30);
        loop {
            let last = ledger.lock().unwrap().last_ack;
            if last.is_some_and(|t| t > killed_at) {
                failovers.push(last.unwrap_or(killed_at) - killed_at);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no send acknowledged 30 s after the leader was killed"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(late) = late.take() {
            // The leader that stored them is down now: another member ends
            // them.
            rt.block_on(async {
                for tx in late {
                    let id = tx.message_id.clone();
                    tx.commit()
                        .await
                        .expect("a half stored before a failover commits after it");
                    ledger.lock().unwrap().halves.insert(id, true);
                }
            });
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(100..500)));
        g.start(leader);
    }
    std::thread::sleep(Duration::from_millis(500));
    producing.store(false, Ordering::Relaxed);

    // Drain: every acknowledged send and committed half delivered, every
    // half resolved.
    rt.block_on(async {
        let admin = Admin::new(Client::connect_with(&all, opts()).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let missing = {
                let l = ledger.lock().unwrap();
                l.sent
                    .iter()
                    .chain(l.halves.iter().filter(|(_, c)| **c).map(|(id, _)| id))
                    .filter(|id| !l.acked.contains(*id))
                    .count()
            };
            let pending = admin
                .list_transactions()
                .await
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            let dead: HashSet<String> = admin
                .list_dead_letters("doomers")
                .await
                .map(|v| v.into_iter().map(|d| d.message_id).collect())
                .unwrap_or_default();
            let undead = {
                let l = ledger.lock().unwrap();
                l.doomed.iter().filter(|id| !dead.contains(*id)).count()
            };
            if missing == 0 && pending == 0 && undead == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "after 60 s: {missing} acknowledged messages not delivered and acked, \
                 {pending} halves pending, {undead} exhausted messages not in the DLQ"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    consuming.store(false, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            t.abort();
        }
    });

    let l = ledger.lock().unwrap();
    assert!(
        l.rolled_back_delivered.is_empty(),
        "rolled-back halves delivered: {:?}",
        l.rolled_back_delivered
    );
    let twice: Vec<_> = l
        .ids_per_body
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .collect();
    assert!(
        twice.is_empty(),
        "bodies stored under two message ids: {twice:?}"
    );
    for (q, offs) in &l.offsets {
        let max = offs.iter().next_back().copied().unwrap_or(0);
        let gaps: Vec<u64> = (0..=max).filter(|o| !offs.contains(o)).collect();
        assert!(
            gaps.is_empty(),
            "queue {q}: offsets never delivered: {gaps:?}"
        );
    }
    // Every exhausted message is in the DLQ exactly once, and nothing else.
    let dead = rt.block_on(async {
        Admin::new(Client::connect_with(&all, opts()).await.unwrap())
            .list_dead_letters("doomers")
            .await
            .unwrap()
    });
    let twice: Vec<_> = dead.iter().filter(|d| d.copies != 1).collect();
    assert!(twice.is_empty(), "dead-lettered more than once: {twice:?}");
    assert_eq!(dead.len(), l.doomed.len(), "DLQ holds other messages");
    // Every replica applied the same log.
    let applied = rt.block_on(async {
        let c = Cluster::new(Client::connect(&all).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (nodes, failed) = c.status().await;
            let applied: BTreeSet<u64> = nodes.iter().map(|n| n.last_applied).collect();
            if failed.is_empty() && nodes.len() == 3 && applied.len() == 1 {
                return applied;
            }
            assert!(
                Instant::now() < deadline,
                "replicas did not converge: {nodes:?}, unreachable {}",
                failed.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    failovers.sort();
    eprintln!(
        "{kills} leader kills: {} sends and {} halves acknowledged, {} delivered, {} acked, {} dead-lettered once; \
         failover (kill -> next acknowledged send) p50 {:?}, max {:?}; every replica applied index {:?}",
        l.sent.len(),
        l.halves.len(),
        l.delivered.len(),
        l.acked.len(),
        dead.len(),
        failovers[failovers.len() / 2],
        failovers.last().copied().unwrap_or_default(),
        applied
    );
}

/// Physical offset of the first commit-log segment in a member's data
/// directory (segment files are named by their base offset).
fn first_segment_base(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir.join("commitlog"))
        .map(|rd| {
            rd.filter_map(|e| {
                let name = e.ok()?.file_name().to_string_lossy().into_owned();
                name.split('.').next()?.parse::<u64>().ok()
            })
            .min()
            .unwrap_or(0)
        })
        .unwrap_or(0)
}

/// A follower killed and restarted with its data directory wiped catches
/// up from a snapshot (the group key, topics and progress included) and
/// later serves as the leader, every message there.
#[test]
fn a_wiped_follower_catches_up_and_leads() {
    // Small segments and a small retention budget: retention drops the
    // start of the log (a topic nobody reads), so the wiped member can only
    // catch up from a snapshot.
    let mut g = Group::start_all_with(&[
        "--segment-bytes",
        "128KiB",
        "--max-message-bytes",
        "16KiB",
        "--retention-bytes",
        "384KiB",
        "--retention-check-interval",
        "200ms",
    ]);
    let all = g.addrs.join(",");
    let rt = halfmq_tests::runtime();
    let status = |rt: &tokio::runtime::Runtime| status_of(rt, &all);
    let send = |rt: &tokio::runtime::Runtime, from: u64, n: u64| -> Vec<String> {
        rt.block_on(async {
            let p = Producer::new(Client::connect_with(&all, opts()).await.unwrap());
            let mut ids = Vec::new();
            for k in from..from + n {
                ids.push(
                    p.send(Message::new("wiped", format!("w-{k}")))
                        .await
                        .unwrap()
                        .message_id,
                );
            }
            ids
        })
    };
    // 600 KiB nobody reads, then what the test reads back.
    rt.block_on(async {
        let p = Producer::new(Client::connect_with(&all, opts()).await.unwrap());
        for k in 0..300 {
            let body = format!("{k:02048}");
            p.send(Message::new("filler", body)).await.unwrap();
        }
    });
    let mut ids = send(&rt, 0, 200);
    let tx_id = rt.block_on(async {
        let tp = TransactionProducer::new(
            Client::connect_with(&all, opts()).await.unwrap(),
            "wiped-pg",
            |_m: MessageView| std::future::ready(TransactionResolution::Unknown),
        );
        tp.send_half(Message::new("wiped", "late")).await.unwrap()
    });

    // Retention drops the first segments on every member.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (0..3).any(|i| first_segment_base(g.dirs[i].path()) == 0) {
        assert!(
            Instant::now() < deadline,
            "retention never deleted the first segments"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Wipe a follower.
    let leader = leader_of(&rt, &all);
    let wiped = (leader + 1) % 3;
    if let Some(p) = g.procs[wiped].take() {
        p.kill9();
    }
    ids.extend(send(&rt, 200, 100));
    g.dirs[wiped] = tempfile::tempdir().unwrap();
    g.start(wiped);
    // It catches up: the same applied index as the others.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = status(&rt);
        let applied: BTreeSet<u64> = nodes.iter().map(|n| n.last_applied).collect();
        if nodes.len() == 3 && applied.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the wiped member did not catch up: {nodes:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // From a snapshot: its log starts where the leader's kept log did.
    assert!(first_segment_base(g.dirs[wiped].path()) > 0);
    // Kill leaders (restarting them) until the wiped member leads.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = leader_of(&rt, &all);
        if l == wiped {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the wiped member never became the leader: {:?}",
            status(&rt)
        );
        if let Some(p) = g.procs[l].take() {
            p.kill9();
        }
        let _ = leader_of(&rt, &all);
        g.start(l);
        std::thread::sleep(Duration::from_millis(500));
    }
    // Everything is there, served by it; a transaction id made before the
    // wipe (with the group's key) ends on it.
    rt.block_on(async {
        let c = Consumer::new(
            Client::connect(&g.addrs[wiped]).await.unwrap(),
            "wiped-readers",
            "wiped",
        );
        let mut seen = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < ids.len() {
            assert!(
                Instant::now() < deadline,
                "{} of {} delivered",
                seen.len(),
                ids.len()
            );
            for m in c.receive(64, Duration::from_millis(500)).await.unwrap() {
                seen.insert(m.message_id.clone());
                c.ack(&m).await.unwrap();
            }
        }
        for id in &ids {
            assert!(seen.contains(id), "{id} not delivered");
        }
        tx_id
            .commit()
            .await
            .expect("a half stored before the wipe commits on the wiped member");
    });
}

/// Membership changes with the CLI: a fourth broker started with `--join`
/// is added as a learner, catches up, is promoted to voter; a member is
/// removed and killed, and the group of the other three goes on, the new
/// member holding everything.
#[test]
fn members_are_added_promoted_and_removed() {
    let mut g = Group::start_all();
    let rt = halfmq_tests::runtime();
    let send = |rt: &tokio::runtime::Runtime, addrs: &str, from: u64, n: u64| -> Vec<String> {
        rt.block_on(async {
            let p = Producer::new(Client::connect_with(addrs, opts()).await.unwrap());
            let mut ids = Vec::new();
            for k in from..from + n {
                ids.push(
                    p.send(Message::new("members", format!("m-{k}")))
                        .await
                        .unwrap()
                        .message_id,
                );
            }
            ids
        })
    };
    let wait = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let all = g.addrs.join(",");
    let mut ids = send(&rt, &all, 0, 100);

    // A fourth broker joins: it proposes nothing and waits to be added.
    let addr4 = format!("127.0.0.1:{}", free_port());
    let dir4 = tempfile::tempdir().unwrap();
    let peers4 = format!("{},4={addr4}", g.peers);
    let p4 = BrokerProcess::start(
        dir4.path(),
        &[
            "--listen",
            &addr4,
            "--node-id",
            "4",
            "--peers",
            &peers4,
            "--join",
            "--raft-heartbeat-interval",
            "50ms",
            "--raft-election-timeout-min",
            "300ms",
            "--raft-election-timeout-max",
            "600ms",
        ],
    );
    let cli = |args: &[&str]| {
        let (ok, out, err) = g.procs[0].as_ref().unwrap().cli(args);
        assert!(ok, "halfmq {args:?}: {out} {err}");
    };
    cli(&["cluster", "add-learner", "4", &addr4]);
    let with4 = format!("{all},{addr4}");
    wait("the learner catches up", &|| {
        let nodes = status_of(&rt, &with4);
        let applied: BTreeSet<u64> = nodes.iter().map(|n| n.last_applied).collect();
        nodes.len() == 4
            && applied.len() == 1
            && nodes.iter().any(|n| n.node_id == 4 && n.role == "learner")
    });
    cli(&["cluster", "promote", "4"]);
    wait("the learner becomes a voter", &|| {
        status_of(&rt, &with4)
            .iter()
            .all(|n| n.voters.contains_key(&4) && n.voters.len() == 4)
    });
    ids.extend(send(&rt, &with4, 100, 50));

    // Member 1 leaves (the leader, if it is: the others elect another).
    let (ok, out, err) = halfmq_tests::cli(&with4, &["cluster", "remove", "1"]);
    assert!(ok, "cluster remove 1: {out} {err}");
    let rest = format!("{},{},{addr4}", g.addrs[1], g.addrs[2]);
    wait("member 1 is out", &|| {
        let nodes = status_of(&rt, &rest);
        nodes.len() == 3
            && nodes
                .iter()
                .all(|n| !n.voters.contains_key(&1) && !n.learners.contains_key(&1))
    });
    if let Some(p) = g.procs[0].take() {
        p.kill9();
    }
    ids.extend(send(&rt, &rest, 150, 50));
    // Everything is there, also through the new member.
    rt.block_on(async {
        let c = Consumer::new(
            Client::connect_with(&rest, opts()).await.unwrap(),
            "member-readers",
            "members",
        );
        let mut seen = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < ids.len() {
            assert!(
                Instant::now() < deadline,
                "{} of {} delivered",
                seen.len(),
                ids.len()
            );
            for m in c.receive(64, Duration::from_millis(500)).await.unwrap() {
                seen.insert(m.message_id.clone());
                c.ack(&m).await.unwrap();
            }
        }
        for id in &ids {
            assert!(seen.contains(id), "{id} not delivered");
        }
    });
    let nodes = status_of(&rt, &addr4);
    let me = nodes.iter().find(|n| n.node_id == 4).unwrap();
    assert!(me.voters.contains_key(&4));
    drop(p4);
}

/// Operators' changes go through the log: a DLQ redrive and purge, an
/// offset reset and a topic deletion made on one leader hold on the next
/// one, after the first is killed.
#[test]
fn operators_changes_hold_after_a_failover() {
    let mut g = Group::start_all();
    let all = g.addrs.join(",");
    let rt = halfmq_tests::runtime();
    let (redriven, reset_ids) = rt.block_on(async {
        let c = || async { Client::connect_with(&all, opts()).await.unwrap() };
        let p = Producer::new(c().await);
        let admin = Admin::new(c().await);
        // 10 messages of "ops" dead-lettered by a group that nacks them all.
        for k in 0..10 {
            p.send(Message::new("ops", format!("ops-{k}")))
                .await
                .unwrap();
        }
        let failing = Consumer::new(c().await, "ops-group", "ops");
        let deadline = Instant::now() + Duration::from_secs(30);
        while admin.list_dead_letters("ops-group").await.unwrap().len() < 10 {
            assert!(Instant::now() < deadline, "dead letters never came");
            for m in failing
                .receive(32, Duration::from_millis(200))
                .await
                .unwrap()
            {
                let _ = failing.nack(&m, "no", None).await;
            }
        }
        // Redrive one, purge the rest.
        let dead = admin.list_dead_letters("ops-group").await.unwrap();
        let one = dead[0].message_id.clone();
        assert_eq!(
            admin
                .redrive_dead_letters("ops-group", Some(&one))
                .await
                .unwrap(),
            1
        );
        assert_eq!(admin.purge_dead_letters("ops-group").await.unwrap(), 9);
        // "replay": consumed and acked, then reset to the earliest offsets.
        let mut ids = HashSet::new();
        for k in 0..20 {
            ids.insert(
                p.send(Message::new("replay", format!("r-{k}")))
                    .await
                    .unwrap()
                    .message_id,
            );
        }
        let readers = Consumer::new(c().await, "replayers", "replay");
        let mut seen = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < ids.len() {
            assert!(Instant::now() < deadline, "replay not consumed");
            for m in readers
                .receive(32, Duration::from_millis(200))
                .await
                .unwrap()
            {
                seen.insert(m.message_id.clone());
                readers.ack(&m).await.unwrap();
            }
        }
        admin
            .reset_offset("replayers", "replay", halfmq_client::ResetTo::Earliest)
            .await
            .unwrap();
        // "gone": deleted.
        p.send(Message::new("gone", "soon gone")).await.unwrap();
        admin.delete_topic("gone").await.unwrap();
        (one, ids)
    });

    // The leader that made the changes dies.
    let l = leader_of(&rt, &all);
    if let Some(p) = g.procs[l].take() {
        p.kill9();
    }
    let rest: Vec<String> = (0..3)
        .filter(|i| *i != l)
        .map(|i| g.addrs[i].clone())
        .collect();
    let rest = rest.join(",");
    rt.block_on(async {
        let c = || async { Client::connect_with(&rest, opts()).await.unwrap() };
        let admin = Admin::new(c().await);
        // The DLQ stays empty; the redriven message comes back to its group.
        assert!(admin
            .list_dead_letters("ops-group")
            .await
            .unwrap()
            .is_empty());
        let again = Consumer::new(c().await, "ops-group", "ops");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut got = Vec::new();
        while got.is_empty() {
            assert!(
                Instant::now() < deadline,
                "the redriven message never came back"
            );
            for m in again.receive(32, Duration::from_millis(300)).await.unwrap() {
                got.push(m.message_id.clone());
                again.ack(&m).await.unwrap();
            }
        }
        assert_eq!(got, vec![redriven.clone()]);
        // The reset holds: "replay" is delivered again from the start.
        let readers = Consumer::new(c().await, "replayers", "replay");
        let mut seen = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while seen.len() < reset_ids.len() {
            assert!(
                Instant::now() < deadline,
                "{} of {} replayed",
                seen.len(),
                reset_ids.len()
            );
            for m in readers
                .receive(32, Duration::from_millis(200))
                .await
                .unwrap()
            {
                seen.insert(m.message_id.clone());
                readers.ack(&m).await.unwrap();
            }
        }
        // The deleted topic is gone.
        let topics = admin.list_topics().await.unwrap();
        assert!(topics.iter().all(|t| t.name != "gone"), "{topics:?}");
    });
}

/// Check counts carry over a failover: a half whose producer answers
/// UNKNOWN is given up after `check_max` checks in all, not `check_max`
/// more on each new leader.
#[test]
fn check_counts_carry_over_a_failover() {
    const CHECK_MAX: u32 = 6;
    let mut g = Group::start_all_with(&["--check-max", "6"]);
    let all = g.addrs.join(",");
    let rt = halfmq_tests::runtime();
    let seen: Arc<Mutex<Vec<u32>>> = Arc::default();
    let s2 = seen.clone();
    let tp = rt.block_on(async {
        let tp = TransactionProducer::new(
            Client::connect_with(&all, opts()).await.unwrap(),
            "counted-pg",
            move |m: MessageView| {
                s2.lock().unwrap().push(m.check_times);
                std::future::ready(TransactionResolution::Unknown)
            },
        );
        tp.send_half(Message::new("counted", "undecided"))
            .await
            .unwrap();
        tp
    });
    let wait = |what: &str, secs: u64, f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting: {what}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait("3 checks", 20, &|| seen.lock().unwrap().len() >= 3);
    // One checkpoint interval: the counts are in the log.
    std::thread::sleep(Duration::from_millis(400));
    let before = seen.lock().unwrap().len();
    let l = rt.block_on(async {
        let nodes = Cluster::new(Client::connect(&all).await.unwrap())
            .status()
            .await
            .0;
        nodes
            .iter()
            .find(|n| n.role == "leader")
            .map(|n| n.node_id as usize - 1)
            .unwrap()
    });
    if let Some(p) = g.procs[l].take() {
        p.kill9();
    }
    let given_up = || {
        rt.block_on(async {
            let Ok(c) = Client::connect_with(&all, opts()).await else {
                return false;
            };
            Admin::new(c)
                .list_transactions()
                .await
                .is_ok_and(|v| v.iter().any(|t| t.given_up))
        })
    };
    wait("the half given up on the new leader", 30, &given_up);
    let seen = seen.lock().unwrap().clone();
    eprintln!("checks seen: {seen:?} ({before} before the kill)");
    assert!(
        seen.len() as u32 <= CHECK_MAX + 1,
        "{} checks for check_max {CHECK_MAX}: {seen:?}",
        seen.len()
    );
    drop(tp);
}
