//! Three replicas in one process, each with its own replicated store and its
//! `halfmq.raft.v1` service on its own port: they form a group, replicate
//! entries into every replica's consume queues, elect a new leader when the
//! leader stops, and a replica that lost its data catches up from the log,
//! or, once retention dropped the log's start, from a snapshot.

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
    /// Closes the server's connections (a stopped process's would break).
    close: tokio::sync::oneshot::Sender<()>,
}

async fn start_replica(
    id: u64,
    peers: &BTreeMap<u64, String>,
    listener: tokio::net::TcpListener,
    dir: &std::path::Path,
) -> Replica {
    start_replica_with(id, peers, listener, dir, None).await
}

async fn start_replica_with(
    id: u64,
    peers: &BTreeMap<u64, String>,
    listener: tokio::net::TcpListener,
    dir: &std::path::Path,
    segment_bytes: Option<u64>,
) -> Replica {
    let mut cfg = StoreConfig::new(dir);
    cfg.replicated = true;
    if let Some(b) = segment_bytes {
        cfg.segment_bytes = b;
        cfg.max_record_bytes = b as usize / 2;
        cfg.preallocate_bytes = 0;
    }
    let store = Arc::new(Store::open(cfg).unwrap());
    let mut c = ClusterConfig::new(id, peers.clone());
    c.heartbeat_interval_ms = 50;
    c.election_timeout_min_ms = 300;
    c.election_timeout_max_ms = 600;
    let node = NodeHandle::start(c, Arc::clone(&store), None)
        .await
        .unwrap();
    let svc = RaftService::new(node.clone()).into_server();
    let (close, closed) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = closed.await;
            })
            .await;
    });
    Replica {
        node,
        store,
        server,
        close,
    }
}

/// Three replicas on ports of their own, each in a temporary directory.
async fn start_group(
    segment_bytes: Option<u64>,
) -> (
    Vec<tempfile::TempDir>,
    BTreeMap<u64, String>,
    Vec<Option<Replica>>,
) {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut listeners = Vec::new();
    let mut peers = BTreeMap::new();
    for id in 1..=3u64 {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        peers.insert(id, l.local_addr().unwrap().to_string());
        listeners.push(l);
    }
    let mut replicas = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        replicas.push(Some(
            start_replica_with(i as u64 + 1, &peers, l, dirs[i].path(), segment_bytes).await,
        ));
    }
    (dirs, peers, replicas)
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
    let (_dirs, peers, mut replicas) = start_group(None).await;
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
        ..
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

async fn bind(addr: &str) -> tokio::net::TcpListener {
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => break l,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn stop(r: Replica) {
    r.node.shutdown().await;
    let _ = r.close.send(());
    if tokio::time::timeout(Duration::from_secs(2), r.server)
        .await
        .is_err()
    {
        eprintln!("a stopped replica's server did not close in time");
    }
}

/// Retention agreed on (`compact_before`) makes every replica take a
/// snapshot, purge its log and delete its old segments; a replica that
/// comes back with its data lost then installs a snapshot (the entries
/// from the leader's first kept one, its consume queue starting there) and
/// takes part again, as leader when it comes to that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_purges_and_a_wiped_replica_installs_a_snapshot() {
    const SEGMENT: u64 = 16 * 1024;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
    let (_dirs, peers, mut replicas) = start_group(Some(SEGMENT)).await;
    // About 120 KiB of entries: several segments.
    let mut next = 0;
    for _ in 0..100 {
        propose(&replicas, write(next, 10, &"p".repeat(100))).await;
        next += 10;
    }
    for r in replicas.iter().flatten() {
        wait_queue_len(&r.store, next).await;
    }
    let l = leader_of(&replicas).await;
    let segs = replicas[l]
        .as_ref()
        .unwrap()
        .store
        .log()
        .segments()
        .unwrap();
    assert!(segs.len() >= 5, "{} segments", segs.len());
    let before = segs[segs.len() - 3].end;
    for r in replicas.iter().flatten() {
        r.node.compact_before(before);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    for r in replicas.iter().flatten() {
        while r.store.log().min_offset() == 0 {
            assert!(Instant::now() < deadline, "segments never deleted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(r.store.log().min_offset() <= before);
        let purged = r.store.entries().unwrap().lock().unwrap().purged();
        assert!(purged.is_some(), "nothing purged");
    }
    let leader_store = Arc::clone(&replicas[l].as_ref().unwrap().store);
    let first_kept = leader_store.log().min_offset();
    // The early messages are gone, the later ones readable.
    assert!(leader_store.read_queue("t", 0, 0).is_err());
    assert!(leader_store.read_queue("t", 0, next - 1).is_ok());

    // A follower loses its data and comes back: it gets a snapshot.
    let f = (l + 1) % 3;
    stop(replicas[f].take().unwrap()).await;
    let wiped = tempfile::tempdir().unwrap();
    let listener = bind(&peers[&(f as u64 + 1)]).await;
    replicas[f] =
        Some(start_replica_with(f as u64 + 1, &peers, listener, wiped.path(), Some(SEGMENT)).await);
    for _ in 0..5 {
        propose(&replicas, write(next, 10, "after")).await;
        next += 10;
    }
    let back = Arc::clone(&replicas[f].as_ref().unwrap().store);
    wait_queue_len(&back, next).await;
    // Its log starts where the leader's first kept entry did, not at 0.
    assert!(back.log().min_offset() > 0);
    assert!(back.log().min_offset() >= first_kept);
    let purged_end = back.entries().unwrap().lock().unwrap().end_of_purged();
    assert!(purged_end > 0);
    // Every message the leader still holds, the new replica holds alike.
    let lowest = (0..next)
        .find(|qo| leader_store.read_queue("t", 0, *qo).is_ok())
        .unwrap();
    let mut shared = 0;
    for qo in lowest..next {
        if let Ok(m) = back.read_queue("t", 0, qo) {
            assert_eq!(
                m.record.body,
                leader_store.read_queue("t", 0, qo).unwrap().record.body
            );
            shared += 1;
        }
    }
    assert!(shared >= 50, "{shared} messages on the installed replica");
    assert!(std::fs::read_dir(wiped.path().join("raft"))
        .unwrap()
        .all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".incoming")));
    assert!(!wiped.path().join("raft").join("installing").exists());

    // The leader stops: the replica that installed the snapshot and the
    // other one go on, and their logs agree.
    stop(replicas[l].take().unwrap()).await;
    for _ in 0..5 {
        propose(&replicas, write(next, 10, "later")).await;
        next += 10;
    }
    for r in replicas.iter().flatten() {
        wait_queue_len(&r.store, next).await;
    }
    let stores: Vec<Arc<Store>> = replicas
        .iter()
        .flatten()
        .map(|r| Arc::clone(&r.store))
        .collect();
    for qo in next - 50..next {
        assert_eq!(
            stores[0].read_queue("t", 0, qo).unwrap().record.body,
            stores[1].read_queue("t", 0, qo).unwrap().record.body
        );
    }
    for r in replicas.into_iter().flatten() {
        stop(r).await;
    }
}
