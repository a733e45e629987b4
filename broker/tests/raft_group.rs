//! Three replicas in one process, each with its own replicated store and its
//! `halfmq.raft.v1` service on its own port: they form a group, replicate
//! entries into every replica's consume queues, elect a new leader when the
//! leader stops, and a replica that lost its data catches up from the log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use halfmq_broker::cluster::network::RaftService;
use halfmq_broker::cluster::types::Write;
use halfmq_broker::cluster::{ClusterConfig, NodeHandle, ProposeError};
use halfmq_storage::{Record, Store, StoreConfig};

struct Replica {
    node: NodeHandle,
    store: Arc<Store>,
    server: tokio::task::JoinHandle<()>,
}

async fn start_replica(
    id: u64,
    peers: &BTreeMap<u64, String>,
    listener: tokio::net::TcpListener,
    dir: &std::path::Path,
) -> Replica {
    let mut cfg = StoreConfig::new(dir);
    cfg.replicated = true;
    let store = Arc::new(Store::open(cfg).unwrap());
    let mut c = ClusterConfig::new(id, peers.clone());
    c.heartbeat_interval_ms = 50;
    c.election_timeout_min_ms = 300;
    c.election_timeout_max_ms = 600;
    let node = NodeHandle::start(c, Arc::clone(&store), None)
        .await
        .unwrap();
    let svc = RaftService::new(node.clone()).into_server();
    let server = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    });
    Replica {
        node,
        store,
        server,
    }
}

/// A write of `n` messages to topic `t` queue 0, queue offsets from `first`.
fn write(first: u64, n: u64, tag: &str) -> Write {
    let mut buf = Vec::new();
    for i in 0..n {
        Record {
            topic: "t".into(),
            queue_offset: Some(first + i),
            store_timestamp_ms: 1,
            body: Bytes::from(format!("{tag}-{}", first + i)),
            ..Record::default()
        }
        .encode_into(&mut buf)
        .unwrap();
    }
    Write(Bytes::from(buf))
}

async fn leader_of(replicas: &[Option<Replica>]) -> usize {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for (i, r) in replicas.iter().enumerate() {
            if let Some(r) = r {
                if r.node.is_leader() {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Proposes `w` through whichever replica leads, again while none does (a
/// refused proposal was not stored): the test runs beside others on a
/// loaded machine, where an election can come at any time.
async fn propose(replicas: &[Option<Replica>], w: Write) -> halfmq_broker::cluster::types::Applied {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let l = leader_of(replicas).await;
        match replicas[l].as_ref().unwrap().node.propose(w.clone()).await {
            Ok(a) => return a,
            Err(e) => {
                assert!(Instant::now() < deadline, "no proposal accepted: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn wait_queue_len(store: &Store, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while store.max_queue_offset("t", 0) < n {
        assert!(
            Instant::now() < deadline,
            "queue stuck at {} of {n}",
            store.max_queue_offset("t", 0)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn bodies(store: &Store, n: u64) -> Vec<Bytes> {
    (0..n)
        .map(|qo| store.read_queue("t", 0, qo).unwrap().record.body)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replicates_elects_and_catches_up() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, l.local_addr().unwrap().to_string());
        listeners.push(l);
    }
    let mut replicas: Vec<Option<Replica>> = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        replicas.push(Some(
            start_replica(i as u64 + 1, &peers, l, dirs[i].path()).await,
        ));
    }
    let l = leader_of(&replicas).await;
    // A follower refuses, naming the leader (once its first heartbeat told
    // it who that is).
    let f = (l + 1) % 3;
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas[f].as_ref().unwrap().node.leader().is_none() {
        assert!(
            Instant::now() < deadline,
            "the follower never learned the leader"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let err = replicas[f]
        .as_ref()
        .unwrap()
        .node
        .propose(write(0, 1, "x"))
        .await
        .unwrap_err();
    match err {
        // The leader's address (one of the members': an election may have
        // moved it since `l` was found).
        ProposeError::NotLeader { leader: Some(a) } => {
            assert!(peers.values().any(|p| *p == a), "{a}");
        }
        other => panic!("{other:?}"),
    }
    // 50 writes of 4 messages through the leader.
    let mut next = 0;
    for _ in 0..50 {
        let a = propose(&replicas, write(next, 4, "a")).await;
        assert_eq!(a.offsets.len(), 4);
        next += 4;
    }
    for r in replicas.iter().flatten() {
        wait_queue_len(&r.store, next).await;
    }
    let l = leader_of(&replicas).await;
    let expect = bodies(&replicas[l].as_ref().unwrap().store, next);
    for r in replicas.iter().flatten() {
        assert_eq!(bodies(&r.store, next), expect);
    }
    // The same bytes at the same physical offsets on every replica (once
    // each has every entry).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ends: std::collections::BTreeSet<u64> = replicas
            .iter()
            .flatten()
            .map(|r| r.store.log().written_offset())
            .collect();
        if ends.len() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "logs differ in length: {ends:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The leader stops: the other two elect a new one and go on.
    let Replica {
        node,
        store,
        server,
    } = replicas[l].take().unwrap();
    node.shutdown().await;
    server.abort();
    let _ = server.await;
    drop((node, store));
    let t0 = Instant::now();
    let l2 = leader_of(&replicas).await;
    assert_ne!(l2, l);
    let mut failover = None;
    for _ in 0..20 {
        let r = replicas[l2]
            .as_ref()
            .unwrap()
            .node
            .propose(write(next, 4, "b"))
            .await;
        if r.is_ok() {
            failover.get_or_insert(t0.elapsed());
            next += 4;
        }
    }
    eprintln!("failover: next write acknowledged {failover:?} after the leader stopped");
    for r in replicas.iter().flatten() {
        wait_queue_len(&r.store, next).await;
    }

    // The stopped replica comes back with its data lost: it catches up from
    // the log.
    let wiped = tempfile::tempdir().unwrap();
    let listener = loop {
        match tokio::net::TcpListener::bind(&peers[&(l as u64 + 1)]).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    replicas[l] = Some(start_replica(l as u64 + 1, &peers, listener, wiped.path()).await);
    let back = replicas[l].as_ref().unwrap();
    wait_queue_len(&back.store, next).await;
    assert_eq!(
        bodies(&back.store, next),
        bodies(&replicas[l2].as_ref().unwrap().store, next)
    );
    for r in replicas.iter().flatten() {
        r.node.shutdown().await;
        r.server.abort();
    }
}
