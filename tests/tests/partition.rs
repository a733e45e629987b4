//! A partitioned leader cannot commit.
//!
//! Three broker processes listen on 127.0.0.2, .3 and .4 (Linux routes all
//! of 127/8 to the loopback device); each is known to the others through a
//! TCP proxy in this test (`--peers` names the proxies), and its connections
//! to peers leave from its own listen address (`ClusterConfig::local_ip`),
//! so a proxy can tell who is calling. Partitioning a member makes every
//! proxy cut and refuse the connections between it and the others; clients
//! (from 127.0.0.1) still reach it directly.
//!
//! With the leader partitioned under load: its clients get errors and no
//! acknowledgement, the majority elects a new leader and acknowledges sends;
//! after healing, the old leader follows, every member applies the same
//! log, every acknowledged send is consumed at the queue offset its
//! acknowledgement gave, and no queue offset holds two messages.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use halfmq_client::{Client, ClientOptions, Cluster, Consumer, Message, Producer};
use halfmq_tests::BrokerProcess;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// IP addresses whose connections a proxy cuts and refuses.
type Blocked = watch::Receiver<HashSet<IpAddr>>;

/// Forwards connections to `target`, except from blocked addresses.
async fn proxy(listener: TcpListener, target: SocketAddr, blocked: Blocked) {
    loop {
        let Ok((inbound, from)) = listener.accept().await else {
            return;
        };
        let mut blocked = blocked.clone();
        if blocked.borrow().contains(&from.ip()) {
            continue; // dropped: refused
        }
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(target).await else {
                return;
            };
            let mut inbound = inbound;
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = async {
                    loop {
                        if blocked.borrow_and_update().contains(&from.ip()) {
                            return;
                        }
                        if blocked.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                } => {}
            }
        });
    }
}

/// A free port on `ip`.
fn free_port_on(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .expect("bind a free port")
        .local_addr()
        .expect("its address")
        .port()
}

#[derive(Default)]
struct Acks {
    /// (queue id, queue offset) -> message id, of every acknowledged send.
    at: HashMap<(u32, u64), String>,
    /// Two acknowledgements naming one queue offset (must stay empty).
    clashes: Vec<(u32, u64, String, String)>,
}

impl Acks {
    fn record(&mut self, q: u32, o: u64, id: String) {
        if let Some(prev) = self.at.get(&(q, o)) {
            if *prev != id {
                self.clashes.push((q, o, prev.clone(), id));
            }
            return;
        }
        self.at.insert((q, o), id);
    }
}

#[test]
fn a_partitioned_leader_cannot_commit() {
    let ips = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];
    let real: Vec<String> = ips
        .iter()
        .map(|ip| format!("{ip}:{}", free_port_on(ip)))
        .collect();
    let proxied: Vec<String> = ips
        .iter()
        .map(|ip| format!("{ip}:{}", free_port_on(ip)))
        .collect();
    let peers = proxied
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let rt = halfmq_tests::runtime();
    // Per member's proxy: the addresses it refuses.
    let (txs, rxs): (Vec<_>, Vec<_>) = (0..3).map(|_| watch::channel(HashSet::new())).unzip();
    for (i, rx) in rxs.into_iter().enumerate() {
        let l = rt.block_on(TcpListener::bind(&proxied[i])).unwrap();
        let target: SocketAddr = real[i].parse().unwrap();
        rt.spawn(proxy(l, target, rx));
    }
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut procs: Vec<BrokerProcess> = (0..3)
        .map(|i| {
            BrokerProcess::start(
                dirs[i].path(),
                &[
                    "--listen",
                    &real[i],
                    "--node-id",
                    &(i + 1).to_string(),
                    "--peers",
                    &peers,
                    "--raft-heartbeat-interval",
                    "50ms",
                    "--raft-election-timeout-min",
                    "300ms",
                    "--raft-election-timeout-max",
                    "600ms",
                    "--checkpoint-interval",
                    "200ms",
                ],
            )
        })
        .collect();
    let all = real.join(",");
    let opts = || ClientOptions {
        request_timeout: Duration::from_secs(2),
        failover_timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    let leader = |rt: &tokio::runtime::Runtime, among: &[usize]| -> usize {
        let addrs: Vec<String> = among.iter().map(|i| real[*i].clone()).collect();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let nodes = rt.block_on(async {
                match Client::connect(&addrs.join(",")).await {
                    Ok(c) => Cluster::new(c).status().await.0,
                    Err(_) => Vec::new(),
                }
            });
            // A leader the asked members agree on.
            let views: BTreeSet<Option<u64>> = nodes
                .iter()
                .filter(|n| among.contains(&(n.node_id as usize - 1)))
                .map(|n| n.leader_id)
                .collect();
            if let (1, Some(Some(l))) = (views.len(), views.iter().next()) {
                if among.contains(&(*l as usize - 1)) {
                    return *l as usize - 1;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader among {among:?}: {nodes:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let old = leader(&rt, &[0, 1, 2]);
    let others: Vec<usize> = (0..3).filter(|i| *i != old).collect();

    let acks = Arc::new(Mutex::new(Acks::default()));
    let running = Arc::new(AtomicBool::new(true));
    let partitioned = Arc::new(AtomicBool::new(false));
    // (sends to the old leader alone acknowledged while it was cut off,
    // errors it gave meanwhile)
    let cut_off = Arc::new(Mutex::new((0u64, 0u64)));
    let tasks = rt.block_on(async {
        let mut tasks = Vec::new();
        // A producer that knows every member and follows the leader.
        let p = Producer::new(Client::connect_with(&all, opts()).await.unwrap());
        let (a, r) = (acks.clone(), running.clone());
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while r.load(Ordering::Relaxed) {
                if let Ok(s) = p.send(Message::new("orders", format!("g-{k}"))).await {
                    if let Some(o) = s.queue_offset {
                        a.lock().unwrap().record(s.queue_id, o, s.message_id);
                    }
                    k += 1;
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
        // A producer that knows only the old leader.
        let p = Producer::new(Client::connect_with(&real[old], opts()).await.unwrap());
        let (a, r, part, cut) = (
            acks.clone(),
            running.clone(),
            partitioned.clone(),
            cut_off.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut k = 0u64;
            while r.load(Ordering::Relaxed) {
                let started_cut_off = part.load(Ordering::Acquire);
                let res = p.send(Message::new("orders", format!("o-{k}"))).await;
                let still = part.load(Ordering::Acquire);
                match res {
                    Ok(s) => {
                        if started_cut_off && still {
                            cut.lock().unwrap().0 += 1;
                        }
                        if let Some(o) = s.queue_offset {
                            a.lock().unwrap().record(s.queue_id, o, s.message_id);
                        }
                    }
                    Err(_) => {
                        if started_cut_off && still {
                            cut.lock().unwrap().1 += 1;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                k += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }));
        tasks
    });
    std::thread::sleep(Duration::from_millis(1000));

    // Cut the old leader off from the others (both directions).
    let old_ip: IpAddr = ips[old].parse().unwrap();
    let other_ips: HashSet<IpAddr> = others.iter().map(|i| ips[*i].parse().unwrap()).collect();
    partitioned.store(true, Ordering::Release);
    let cut_at = Instant::now();
    for (i, tx) in txs.iter().enumerate() {
        let set = if i == old {
            other_ips.clone()
        } else {
            [old_ip].into()
        };
        tx.send_replace(set);
    }
    let new = leader(&rt, &others);
    let elected = cut_at.elapsed();
    let acked_before = acks.lock().unwrap().at.len();
    std::thread::sleep(Duration::from_secs(3));
    let acked_during = acks.lock().unwrap().at.len() - acked_before;
    // Heal.
    partitioned.store(false, Ordering::Release);
    for tx in &txs {
        tx.send_replace(HashSet::new());
    }
    std::thread::sleep(Duration::from_millis(1000));
    running.store(false, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
        }
    });
    let (cut_acked, cut_errors) = *cut_off.lock().unwrap();
    assert_eq!(
        cut_acked, 0,
        "the partitioned leader acknowledged {cut_acked} sends"
    );
    assert!(
        cut_errors > 0,
        "the partitioned leader's client saw no errors"
    );
    assert!(
        acked_during > 0,
        "the majority's new leader acknowledged nothing"
    );

    // Every member applies the same log; the old leader follows.
    rt.block_on(async {
        let c = Cluster::new(Client::connect(&all).await.unwrap());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (nodes, failed) = c.status().await;
            let applied: BTreeSet<u64> = nodes.iter().map(|n| n.last_applied).collect();
            let leaders: BTreeSet<Option<u64>> = nodes.iter().map(|n| n.leader_id).collect();
            if failed.is_empty() && nodes.len() == 3 && applied.len() == 1 && leaders.len() == 1 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "members did not converge after healing: {nodes:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    // Everything acknowledged is there, at the offset its ack named; no
    // offset holds two messages.
    let a = acks.lock().unwrap();
    assert!(
        a.clashes.is_empty(),
        "one queue offset acknowledged for two messages: {:?}",
        a.clashes
    );
    let consumed: HashMap<(u32, u64), String> = rt.block_on(async {
        let c = Consumer::new(
            Client::connect_with(&all, opts()).await.unwrap(),
            "partition-check",
            "orders",
        );
        let mut seen: HashMap<(u32, u64), String> = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.at.keys().any(|k| !seen.contains_key(k)) {
            assert!(
                Instant::now() < deadline,
                "{} of {} acknowledged sends consumed",
                a.at.keys().filter(|k| seen.contains_key(k)).count(),
                a.at.len()
            );
            for m in c
                .receive(64, Duration::from_millis(300))
                .await
                .unwrap_or_default()
            {
                if let Some(prev) = seen.insert((m.queue_id, m.queue_offset), m.message_id.clone())
                {
                    assert_eq!(
                        prev, m.message_id,
                        "queue {} offset {} holds two messages",
                        m.queue_id, m.queue_offset
                    );
                }
                let _ = c.ack(&m).await;
            }
        }
        seen
    });
    for (k, id) in &a.at {
        assert_eq!(consumed.get(k), Some(id), "queue offset {k:?}");
    }
    eprintln!(
        "partitioned leader {}: new leader {} elected after {elected:?}; {} acknowledged by the majority \
         meanwhile, 0 by the cut-off leader ({cut_errors} errors); {} sends checked",
        old + 1,
        new + 1,
        acked_during,
        a.at.len()
    );
    for p in procs.drain(..) {
        p.kill9();
    }
}
