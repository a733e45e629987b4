//! Store behaviour: consume-queue rebuild, transaction commits that point at
//! the half, limits, group commit, retention.

mod common;

use common::{body, open, rec, small_config};
use halfmq_storage::{Error, FlushMode, Record, RecordKind, Store};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn recovery_rebuilds_deleted_consume_queues() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut offs = Vec::new();
    {
        let store = open(dir.path());
        for i in 0..60 {
            let r = rt
                .block_on(store.append_durable(vec![rec("rb", (i % 2) as u32, &body(i))]))
                .unwrap();
            offs.push(r.offsets[0]);
        }
        store.close().unwrap();
    }
    std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
    let store = open(dir.path());
    assert_eq!(store.max_queue_offset("rb", 0), 30);
    assert_eq!(store.max_queue_offset("rb", 1), 30);
    for (i, off) in offs.iter().enumerate() {
        let m = store
            .read_queue("rb", (i % 2) as u32, (i / 2) as u64)
            .unwrap();
        assert_eq!(m.physical_offset, *off);
        assert_eq!(&m.record.body[..], &body(i)[..]);
    }
}

#[test]
fn redispatch_after_crash_without_checkpoint_of_the_tail() {
    // Records appended after the last checkpoint, then the store is dropped
    // without close (as after kill -9): the queue is rebuilt from the log.
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    {
        let store = open(dir.path());
        rt.block_on(store.append_durable(vec![rec("x", 0, b"a")]))
            .unwrap();
        store.checkpoint().unwrap();
        rt.block_on(store.append_durable(vec![rec("x", 0, b"b"), rec("x", 0, b"c")]))
            .unwrap();
        // Lose the consume queue's tail to simulate unsynced entries.
        drop(store);
    }
    let qfile = dir
        .path()
        .join("consumequeue/x/0")
        .join(format!("{:020}", 0));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&qfile)
        .unwrap();
    f.set_len(20).unwrap();
    let store = open(dir.path());
    assert_eq!(store.max_queue_offset("x", 0), 3);
    assert_eq!(&store.read_queue("x", 0, 2).unwrap().record.body[..], b"c");
}

#[test]
fn commit_points_at_the_half_without_copying_its_body() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = open(dir.path());
    let half = Record {
        kind: RecordKind::Half,
        ..rec("tx", 1, &[9u8; 1000])
    };
    let h = rt.block_on(store.append_durable(vec![half])).unwrap();
    assert_eq!(h.queue_offsets, vec![None], "a half gets no queue offset");
    assert_eq!(store.max_queue_offset("tx", 1), 0, "a half is invisible");
    let commit = Record {
        kind: RecordKind::TxCommit,
        ref_offset: Some(h.offsets[0]),
        ref_size: h.sizes[0],
        body: Default::default(),
        ..rec("tx", 1, b"")
    };
    let c = rt.block_on(store.append_durable(vec![commit])).unwrap();
    assert!(
        c.sizes[0] < 200,
        "commit record is small: {} bytes",
        c.sizes[0]
    );
    assert_eq!(c.queue_offsets, vec![Some(0)]);
    let m = store.read_queue("tx", 1, 0).unwrap();
    assert_eq!(m.physical_offset, h.offsets[0]);
    assert_eq!(m.record.body.len(), 1000);
    store.close().unwrap();
    drop(store);
    // And after a rebuild from the log.
    std::fs::remove_dir_all(dir.path().join("consumequeue")).unwrap();
    let store = open(dir.path());
    assert_eq!(
        store.read_queue("tx", 1, 0).unwrap().physical_offset,
        h.offsets[0]
    );
}

#[test]
fn oversized_record_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let store = open(dir.path());
    let before = store.log().written_offset();
    let batch = vec![rec("big", 0, b"ok"), rec("big", 0, &[0u8; 5000])];
    let err = rt.block_on(store.append_durable(batch)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RecordTooLarge {
                limit_bytes: 4096,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(store.log().written_offset(), before);
    assert_eq!(store.max_queue_offset("big", 0), 0);
    // The next append gets queue offset 0: nothing was consumed by the failure.
    let r = rt
        .block_on(store.append_durable(vec![rec("big", 0, b"ok")]))
        .unwrap();
    assert_eq!(r.queue_offsets, vec![Some(0)]);
}

#[test]
fn concurrent_sync_appends_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut cfg = small_config(dir.path());
    cfg.segment_bytes = 64 << 20;
    let store = std::sync::Arc::new(Store::open(cfg).unwrap());
    let n_tasks = 64;
    let per_task = 50;
    rt.block_on(async {
        let mut hs = Vec::new();
        for t in 0..n_tasks {
            let s = store.clone();
            hs.push(tokio::spawn(async move {
                for i in 0..per_task {
                    s.append_durable(vec![rec("g", 0, &body(t * per_task + i))])
                        .await
                        .unwrap();
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
    });
    let fsyncs = store.log().fsync_count();
    let total = (n_tasks * per_task) as u64;
    assert_eq!(store.max_queue_offset("g", 0), total);
    assert!(store.log().flushed_offset() >= store.log().written_offset());
    assert!(
        fsyncs < total,
        "group commit: {fsyncs} fsyncs for {total} appends"
    );
}

#[test]
fn async_mode_makes_entries_visible_before_any_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_config(dir.path());
    cfg.flush = FlushMode::Async {
        interval_ms: 60_000,
    };
    let store = Store::open(cfg).unwrap();
    store.append(vec![rec("a", 0, b"x")]).unwrap();
    // Async: visible at once although no fsync has happened.
    assert_eq!(store.max_queue_offset("a", 0), 1);
    assert_eq!(store.log().fsync_count(), 0);
    store.close().unwrap();
}

#[test]
fn retention_deletes_old_segments_but_respects_the_guard() {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let mut cfg = small_config(dir.path());
    cfg.retention_ms = 1;
    let store = Store::open(cfg).unwrap();
    let mut offs = Vec::new();
    for i in 0..80 {
        offs.push(
            rt.block_on(store.append_durable(vec![rec("r", 0, &body(i))]))
                .unwrap()
                .offsets[0],
        );
    }
    let segs = store.log().segments().unwrap();
    assert!(segs.len() >= 4, "{} segments", segs.len());
    let protected = segs[2].base;
    let future = halfmq_storage::now_ms() + 10_000;
    let deleted = store
        .apply_retention(future, &|s| s.base < protected)
        .unwrap();
    assert_eq!(deleted, vec![segs[0].base, segs[1].base]);
    assert_eq!(store.log().min_offset(), protected);
    assert!(matches!(
        store.log().read(offs[0]),
        Err(Error::OffsetOutOfRange { .. })
    ));
    // Messages in kept segments are still readable through the queue.
    let last = offs.len() - 1;
    assert_eq!(
        store
            .read_queue("r", 0, last as u64)
            .unwrap()
            .physical_offset,
        offs[last]
    );
    // Everything but the active segment goes when nothing is protected.
    let deleted = store.apply_retention(future, &|_| true).unwrap();
    assert_eq!(deleted.len(), segs.len() - 3);
    store.close().unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(
        store
            .read_queue("r", 0, last as u64)
            .unwrap()
            .physical_offset,
        offs[last]
    );
}

#[test]
fn invalid_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = small_config(dir.path());
    cfg.max_record_bytes = 1 << 20;
    match Store::open(cfg) {
        Err(Error::Config { key, .. }) => assert_eq!(key, "max_record_bytes"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// Writes 40 records over two queues of topic "cq" (20 each), plus a
/// committed half in queue 0 at queue offset 20; closes the store. Returns
/// each queue's bodies in queue order.
fn write_two_queues(dir: &std::path::Path) -> [Vec<Vec<u8>>; 2] {
    let rt = rt();
    let store = open(dir);
    let mut bodies: [Vec<Vec<u8>>; 2] = [Vec::new(), Vec::new()];
    for i in 0..40 {
        let q = i % 2;
        rt.block_on(store.append_durable(vec![rec("cq", q as u32, &body(i))]))
            .unwrap();
        bodies[q].push(body(i));
    }
    let half = Record {
        kind: RecordKind::Half,
        ..rec("cq", 0, b"the half")
    };
    let h = rt.block_on(store.append_durable(vec![half])).unwrap();
    let commit = Record {
        kind: RecordKind::TxCommit,
        ref_offset: Some(h.offsets[0]),
        ref_size: h.sizes[0],
        ..rec("cq", 0, b"")
    };
    rt.block_on(store.append_durable(vec![commit])).unwrap();
    bodies[0].push(b"the half".to_vec());
    store.close().unwrap();
    bodies
}

fn cq_file(dir: &std::path::Path, queue: u32, base: u64) -> std::path::PathBuf {
    dir.join("consumequeue/cq")
        .join(queue.to_string())
        .join(format!("{base:020}"))
}

fn assert_queues(store: &Store, bodies: &[Vec<Vec<u8>>; 2]) {
    for (q, want) in bodies.iter().enumerate() {
        assert_eq!(store.max_queue_offset("cq", q as u32), want.len() as u64);
        for (qo, b) in want.iter().enumerate() {
            let m = store.read_queue("cq", q as u32, qo as u64).unwrap();
            assert_eq!(&m.record.body[..], &b[..], "cq/{q} at {qo}");
        }
    }
}

#[test]
fn a_consume_queue_entry_flipped_out_of_range_is_repaired_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let bodies = write_two_queues(dir.path());
    // small_config: 16 entries per file. Entry 3 of queue 1: the high byte
    // of its physical offset, and entry 5: its size.
    let p = cq_file(dir.path(), 1, 0);
    let good = std::fs::read(&p).unwrap();
    let mut b = good.clone();
    b[3 * 20 + 7] ^= 0x10;
    b[5 * 20 + 9] ^= 0x40;
    std::fs::write(&p, b).unwrap();
    let store = open(dir.path());
    // Repaired by the start-up check, before anything was read.
    assert_eq!(std::fs::read(&p).unwrap(), good);
    assert_queues(&store, &bodies);
}

#[test]
fn a_consume_queue_entry_pointing_at_another_record_is_caught_when_read() {
    let dir = tempfile::tempdir().unwrap();
    let bodies = write_two_queues(dir.path());
    // Plausible but wrong: entry 2 of queue 0 gets entry 7's bytes, entry 1
    // of queue 1 gets entry 2 of queue 0's, and the commit's entry (queue 0,
    // offset 20, second file) points at entry 0's record.
    let p0 = cq_file(dir.path(), 0, 0);
    let p1 = cq_file(dir.path(), 0, 16);
    let p2 = cq_file(dir.path(), 1, 0);
    let mut q0 = std::fs::read(&p0).unwrap();
    let mut q0b = std::fs::read(&p1).unwrap();
    let mut q1 = std::fs::read(&p2).unwrap();
    let e = |b: &[u8], i: usize| b[i * 20..i * 20 + 20].to_vec();
    let (e7, e2, e0) = (e(&q0, 7), e(&q0, 2), e(&q0, 0));
    q0[2 * 20..3 * 20].copy_from_slice(&e7);
    q1[20..40].copy_from_slice(&e2);
    q0b[4 * 20..5 * 20].copy_from_slice(&e0);
    std::fs::write(&p0, q0).unwrap();
    std::fs::write(&p1, q0b).unwrap();
    std::fs::write(&p2, q1).unwrap();
    let store = open(dir.path());
    // Never the wrong message: each read is checked, the queue repaired.
    assert_queues(&store, &bodies);
    drop(store);
    let store = open(dir.path());
    assert_queues(&store, &bodies);
}
