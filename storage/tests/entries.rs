//! What a replicated log needs of the commit log: appends of encoded
//! records, raw reads, callbacks once durable, truncation of a suffix (also
//! across segments), and the entry index with its reconciliation at open.

use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use halfmq_storage::commitlog::LogOptions;
use halfmq_storage::{
    entry_marker, marker_pos, CommitLog, EntryIndex, EntryKind, EntryPos, Error, FlushMode, Record,
    StateFile,
};

fn opts(dir: &std::path::Path, segment_bytes: u64) -> LogOptions {
    LogOptions {
        dir: dir.join("commitlog"),
        segment_bytes,
        max_record_bytes: 1 << 20,
        flush: FlushMode::Sync,
        min_free_disk_bytes: 0,
        preallocate_bytes: 4096,
        read_cache_bytes: 1 << 20,
    }
}

fn open(dir: &std::path::Path, segment_bytes: u64) -> CommitLog {
    CommitLog::open(opts(dir, segment_bytes), None, &mut |_, _| {})
        .unwrap()
        .0
}

fn rec(body: &str) -> Record {
    Record {
        topic: "t".into(),
        body: Bytes::copy_from_slice(body.as_bytes()),
        ..Record::default()
    }
}

/// An entry: its marker and records, encoded.
fn entry(index: u64, term: u64, bodies: &[&str]) -> Vec<u8> {
    let mut payload = Vec::new();
    for b in bodies {
        rec(b).encode_into(&mut payload).unwrap();
    }
    let marker = entry_marker(EntryKind::Normal, index, term, payload.len(), Bytes::new()).unwrap();
    let mut out = marker.encode().unwrap();
    out.extend_from_slice(&payload);
    out
}

#[test]
fn encoded_appends_are_checked_and_read_back_raw() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 1 << 20);
    let e1 = entry(1, 1, &["a", "bb"]);
    let a = log.append_encoded(&[&e1]).unwrap();
    assert_eq!(a.offsets.len(), 3, "marker and two records");
    assert_eq!(a.end, e1.len() as u64);
    assert_eq!(&log.read_raw(0, e1.len()).unwrap()[..], &e1[..]);
    assert_eq!(&log.read_raw(3, 10).unwrap()[..], &e1[3..13]);
    let marker = log.read(0).unwrap();
    let pos = marker_pos(0, &marker).unwrap();
    assert_eq!((pos.index, pos.term, pos.end()), (1, 1, e1.len() as u64));

    // A flipped bit is refused before anything is written.
    let mut bad = entry(2, 1, &["c"]);
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(matches!(
        log.append_encoded(&[&bad]),
        Err(Error::Corrupt { .. })
    ));
    // So is a cut-off record.
    let cut = entry(2, 1, &["c"]);
    assert!(log.append_encoded(&[&cut[..cut.len() - 1]]).is_err());
    assert_eq!(log.written_offset(), e1.len() as u64);
    // Reads past the end are refused.
    assert!(log.read_raw(0, e1.len() + 1).is_err());
    assert_eq!(log.read_raw(log.written_offset(), 0).unwrap().len(), 0);
}

#[test]
fn durable_callbacks_run_in_order_after_the_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 1 << 20);
    let (tx, rx) = mpsc::channel();
    let mut ends = Vec::new();
    for i in 0..50u64 {
        let a = log.append_encoded(&[&entry(i + 1, 1, &["x"])]).unwrap();
        ends.push(a.end);
        let tx = tx.clone();
        let end = a.end;
        log.on_durable(
            end,
            Box::new(move |r| {
                tx.send((end, r.is_ok())).unwrap();
            }),
        );
    }
    let mut got = Vec::new();
    for _ in 0..50 {
        got.push(rx.recv_timeout(Duration::from_secs(10)).unwrap());
    }
    assert!(got.iter().all(|(_, ok)| *ok));
    let got_ends: Vec<u64> = got.iter().map(|(e, _)| *e).collect();
    assert_eq!(got_ends, ends, "callbacks in order of their end");
    assert!(log.flushed_offset() >= *ends.last().unwrap());
    // Already durable: at once.
    let (tx2, rx2) = mpsc::channel();
    log.on_durable(1, Box::new(move |r| tx2.send(r.is_ok()).unwrap()));
    assert!(rx2.try_recv().unwrap());
    // After close: Closed.
    log.close().unwrap();
    let (tx3, rx3) = mpsc::channel();
    log.on_durable(
        u64::MAX,
        Box::new(move |r| tx3.send(matches!(r, Err(Error::Closed))).unwrap()),
    );
    assert!(rx3.try_recv().unwrap());
}

#[test]
fn truncation_cuts_a_suffix_across_segments_and_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut ends = Vec::new();
    {
        // Small segments: the entries spread over several files.
        let log = open(dir.path(), 600);
        for i in 0..12u64 {
            let a = log
                .append_encoded(&[&entry(i + 1, 1, &["0123456789abcdef0123456789"])])
                .unwrap();
            ends.push(a.end);
        }
        let files_before = std::fs::read_dir(dir.path().join("commitlog"))
            .unwrap()
            .count();
        assert!(files_before > 3, "{files_before} segment files");
        // Raw reads across segment ends (the cache off, as after a restart).
        let whole: Vec<u8> = (0..12u64)
            .flat_map(|i| entry(i + 1, 1, &["0123456789abcdef0123456789"]))
            .collect();
        drop(log);
        let mut o = opts(dir.path(), 600);
        o.read_cache_bytes = 0;
        let log = CommitLog::open(o, None, &mut |_, _| {}).unwrap().0;
        assert_eq!(&log.read_raw(0, whole.len()).unwrap()[..], &whole[..]);
        assert_eq!(&log.read_raw(100, 900).unwrap()[..], &whole[100..1000]);
        // Cut back to the end of entry 3 (inside an early segment).
        log.truncate(ends[2]).unwrap();
        assert_eq!(log.written_offset(), ends[2]);
        assert!(log.flushed_offset() <= ends[2]);
        assert!(log.read_raw(ends[2], 1).is_err());
        // Cut bytes are gone from the cache too: what is read now is what
        // is appended now.
        let e = entry(4, 2, &["new"]);
        let a = log.append_encoded(&[&e]).unwrap();
        assert_eq!(a.offsets[0], ends[2]);
        assert_eq!(&log.read_raw(ends[2], e.len()).unwrap()[..], &e[..]);
        let m = marker_pos(ends[2], &log.read(ends[2]).unwrap()).unwrap();
        assert_eq!((m.index, m.term), (4, 2));
        ends.truncate(3);
        ends.push(a.end);
        // Out of range.
        assert!(log.truncate(a.end + 1).is_err());
        // A truncation to a segment's base keeps the segment before it.
        let segs = log.segments().unwrap();
        assert!(segs.len() >= 2, "{segs:?}");
        log.truncate(segs[1].base).unwrap();
        let after = log.segments().unwrap();
        assert_eq!(after.len(), 1, "{after:?}");
        assert!(after[0].active);
        assert_eq!(log.written_offset(), segs[1].base);
        log.truncate(ends[0]).unwrap();
        assert_eq!(log.written_offset(), ends[0]);
        ends.truncate(1);
        // Not closed: as after kill -9.
    }
    let mut seen = Vec::new();
    let (log, report) = CommitLog::open(opts(dir.path(), 600), None, &mut |off, r| {
        if let Some(p) = marker_pos(off, r) {
            seen.push(p);
        }
    })
    .unwrap();
    assert_eq!(log.written_offset(), ends[0], "{report:?}");
    assert_eq!(seen.len(), 1);
    assert!(report.truncated.is_none());
}

#[test]
fn truncation_keeps_pending_callbacks_until_the_log_grows_past_them_again() {
    let dir = tempfile::tempdir().unwrap();
    let log = open(dir.path(), 1 << 20);
    let a = log.append_encoded(&[&entry(1, 1, &["a"])]).unwrap();
    // A callback for an end beyond what is written waits...
    let (tx, rx) = mpsc::channel::<bool>();
    let far = a.end + 300;
    log.on_durable(far, Box::new(move |r| tx.send(r.is_ok()).unwrap()));
    std::thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err());
    // ...across a cut below it...
    log.truncate(0).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert!(rx.try_recv().is_err());
    // ...until durable data reaches its end again.
    while log.written_offset() < far {
        log.append_encoded(&[&entry(1, 2, &["bbbbbbbbbbbbbbbbbbbb"])])
            .unwrap();
    }
    assert!(rx.recv_timeout(Duration::from_secs(10)).unwrap());
}

#[test]
fn entry_index_appends_truncates_purges_and_reconciles() {
    let dir = tempfile::tempdir().unwrap();
    let raft = dir.path().join("raft");
    let pos = |index: u64, offset: u64| EntryPos {
        index,
        term: 1 + index / 5,
        offset,
        size: 100,
    };
    {
        let mut idx = EntryIndex::open(&raft).unwrap();
        assert!(idx.is_empty());
        for i in 1..=10 {
            idx.append(pos(i, (i - 1) * 100)).unwrap();
        }
        // Gaps and overlaps are refused.
        assert!(idx.append(pos(12, 1000)).is_err());
        assert!(idx.append(pos(11, 950)).is_err());
        assert!(idx.append(pos(11, 1050)).is_err());
        assert_eq!(idx.end(), 1000);
        assert_eq!(idx.get(3), Some(pos(3, 200)));
        assert_eq!(idx.range(4, 7).len(), 3);
        idx.truncate_from(9).unwrap();
        assert_eq!(idx.last(), Some(pos(8, 700)));
        idx.purge(3, pos(3, 0).term, 0).unwrap();
        assert_eq!(idx.first(), Some(pos(4, 300)));
        assert_eq!(idx.purged(), Some((3, 1)));
        assert_eq!(idx.get(3), None);
    }
    // Reopen: the same rows; a torn last row is dropped.
    {
        let f = raft.join("index");
        let len = std::fs::metadata(&f).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        file.set_len(len - 5).unwrap();
    }
    let mut idx = EntryIndex::open(&raft).unwrap();
    assert_eq!(idx.purged(), Some((3, 1)));
    assert_eq!(idx.first(), Some(pos(4, 300)));
    assert_eq!(idx.last(), Some(pos(7, 600)), "the torn row 8 is gone");
    // The log kept more than the index: markers rebuild the rows; a row past
    // the log's end is cut.
    let markers: Vec<EntryPos> = (7..=9).map(|i| pos(i, (i - 1) * 100)).collect();
    assert_eq!(idx.reconcile(0, 900, &markers).unwrap(), (0, 2));
    assert_eq!(idx.last(), Some(pos(9, 800)));
    assert_eq!(idx.reconcile(0, 750, &[]).unwrap(), (2, 0));
    assert_eq!(idx.last(), Some(pos(7, 600)));
    // After a purge with no rows left, the next row must follow the purge.
    idx.purge(7, 2, 0).unwrap();
    assert_eq!(idx.end(), 700, "the purged entry's end, from its row");
    assert!(idx.is_empty());
    assert!(idx.append(pos(9, 800)).is_err());
    idx.append(pos(8, 700)).unwrap();
    drop(idx);
    // A damaged header is an error, not a guess.
    let f = raft.join("index");
    let mut data = std::fs::read(&f).unwrap();
    data[9] ^= 0xff;
    // (byte 9 is inside the purged index)
    std::fs::write(&f, data).unwrap();
    assert!(matches!(
        EntryIndex::open(&raft),
        Err(Error::Corrupt { .. })
    ));
}

#[test]
fn state_files_are_replaced_whole_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let f = StateFile::new(dir.path().join("vote"));
    assert_eq!(f.load().unwrap(), None);
    f.save(b"term 3").unwrap();
    f.save(b"term 4, voted 2").unwrap();
    assert_eq!(f.load().unwrap().as_deref(), Some(&b"term 4, voted 2"[..]));
    let mut data = std::fs::read(dir.path().join("vote")).unwrap();
    data[6] ^= 1;
    std::fs::write(dir.path().join("vote"), data).unwrap();
    assert!(matches!(f.load(), Err(Error::Corrupt { .. })));
}

mod replicated_store {
    use super::*;
    use halfmq_storage::{Store, StoreConfig};

    fn cfg(dir: &std::path::Path) -> StoreConfig {
        let mut c = StoreConfig::new(dir);
        c.replicated = true;
        c.segment_bytes = 4096;
        c.max_record_bytes = 2048;
        c
    }

    fn msg(topic: &str, qo: u64, body: &str) -> Record {
        Record {
            topic: topic.into(),
            queue_offset: Some(qo),
            body: Bytes::copy_from_slice(body.as_bytes()),
            store_timestamp_ms: 1,
            ..Record::default()
        }
    }

    /// Entry `index` holding `records`: its marker and its records, encoded.
    fn encode_entry(index: u64, term: u64, records: &[Record]) -> (Vec<u8>, Vec<u8>) {
        let mut payload = Vec::new();
        for r in records {
            r.encode_into(&mut payload).unwrap();
        }
        let m = entry_marker(EntryKind::Normal, index, term, payload.len(), Bytes::new()).unwrap();
        (m.encode().unwrap(), payload)
    }

    /// Applies entry `index` (read back from the log) as a state machine would.
    fn apply(store: &Store, index: u64) {
        let p = store.entries().unwrap().lock().unwrap().get(index).unwrap();
        let mut at = p.offset;
        let mut recs = Vec::new();
        while at < p.end() {
            let r = store.log().read(at).unwrap();
            let n = r.encoded_len() as u64;
            recs.push((at, r));
            at += n;
        }
        let refs: Vec<(u64, &Record)> = recs.iter().map(|(o, r)| (*o, r)).collect();
        store
            .dispatch_applied(&refs, p.end(), format!("applied {index}").into_bytes())
            .unwrap();
    }

    #[test]
    fn entries_are_dispatched_only_when_applied_and_survive_a_kill() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(cfg(dir.path())).unwrap();
            let mut qo = 0;
            for i in 1..=20u64 {
                let recs: Vec<Record> = (0..3)
                    .map(|k| {
                        qo += 1;
                        msg("t", qo - 1, &format!("m{i}-{k}"))
                    })
                    .collect();
                let (m, p) = encode_entry(i, 1, &recs);
                store.append_entries(&[(i, 1, &m, &p)]).unwrap();
            }
            // A gap, a wrong term or an entry without its marker are refused.
            let (m, p) = encode_entry(22, 1, &[msg("t", 60, "x")]);
            assert!(store.append_entries(&[(22, 1, &m, &p)]).is_err());
            assert!(store.append_entries(&[(21, 2, &m, &p)]).is_err());
            let (m21, _) = encode_entry(21, 1, &[msg("t", 60, "x")]);
            assert!(
                store.append_entries(&[(21, 1, &m21, &p[1..])]).is_err(),
                "size mismatch"
            );
            // Nothing is visible before it is applied.
            assert_eq!(store.max_queue_offset("t", 0), 0);
            for i in 1..=10 {
                apply(&store, i);
            }
            assert_eq!(store.max_queue_offset("t", 0), 30);
            let m = store.read_queue("t", 0, 29).unwrap();
            assert_eq!(&m.record.body[..], b"m10-2");
            store.checkpoint().unwrap();
            apply(&store, 11);
            // Cutting applied entries is refused; unapplied ones go.
            assert!(store.truncate_entries_after(Some(5)).is_err());
            store.truncate_entries_after(Some(15)).unwrap();
            assert_eq!(
                store
                    .entries()
                    .unwrap()
                    .lock()
                    .unwrap()
                    .last()
                    .unwrap()
                    .index,
                15
            );
            // Dropped without close: as after kill -9.
        }
        let store = Store::open(cfg(dir.path())).unwrap();
        // Applied up to the checkpoint (entry 10); entry 11 is applied again
        // by the replication layer.
        assert_eq!(store.applied_note(), b"applied 10");
        assert_eq!(store.max_queue_offset("t", 0), 30);
        let idx = store.entries().unwrap().lock().unwrap().last().unwrap();
        assert_eq!(idx.index, 15);
        assert_eq!(
            store.dispatched_end(),
            store
                .entries()
                .unwrap()
                .lock()
                .unwrap()
                .get(10)
                .unwrap()
                .end()
        );
        assert_eq!(store.log().written_offset(), idx.end());
        for i in 11..=15 {
            apply(&store, i);
        }
        assert_eq!(store.max_queue_offset("t", 0), 45);
        assert_eq!(
            &store.read_queue("t", 0, 44).unwrap().record.body[..],
            b"m15-2"
        );
    }

    #[test]
    fn a_lost_index_is_rebuilt_and_a_torn_last_entry_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let full_end;
        {
            let store = Store::open(cfg(dir.path())).unwrap();
            for i in 1..=8u64 {
                let (m, p) = encode_entry(i, 1, &[msg("t", i - 1, "0123456789")]);
                store.append_entries(&[(i, 1, &m, &p)]).unwrap();
            }
            full_end = store.log().written_offset();
            store.checkpoint().unwrap();
        }
        // The index file is lost, and the last entry's last bytes are torn.
        std::fs::remove_file(dir.path().join("raft/index")).unwrap();
        let seg = std::fs::read_dir(dir.path().join("commitlog"))
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().unwrap().is_file())
            .map(|e| e.path())
            .max()
            .unwrap();
        let base: u64 = seg.file_name().unwrap().to_str().unwrap().parse().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(full_end - base - 3)
            .unwrap();
        let store = Store::open(cfg(dir.path())).unwrap();
        let idx = store.entries().unwrap().lock().unwrap();
        assert_eq!(idx.last().unwrap().index, 7, "the torn entry 8 is gone");
        assert!(store.log().written_offset() < full_end);
        assert_eq!(store.log().written_offset(), idx.end());
    }

    #[test]
    fn a_single_brokers_log_is_not_taken_for_a_replicas() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(StoreConfig::new(dir.path())).unwrap();
            store.append(vec![msg("t", 0, "x")]).unwrap();
            store.close().unwrap();
        }
        let err = Store::open(cfg(dir.path())).unwrap_err();
        assert!(err.to_string().contains("own data directory"), "{err}");
    }
}
