//! Corruption tests: a torn or bit-flipped tail is cut off and nothing before
//! it is lost; damage in a sealed segment is reported and left in place.

mod common;

use common::{body, last_segment, open, rec};
use halfmq_storage::Error;

/// Writes `n` records (one per append) and returns their physical offsets
/// and the log's end. The last one is written after the last checkpoint and
/// the store is dropped without a clean close, as when the process is
/// killed: a torn tail always lies past the checkpoint, where recovery
/// scans, and the file ends in preallocated zeros.
fn write_records(dir: &std::path::Path, n: usize) -> (Vec<u64>, u64) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = open(dir);
    let mut offs: Vec<u64> = (0..n - 1)
        .map(|i| {
            rt.block_on(store.append_durable(vec![rec("c", 0, &body(i))]))
                .unwrap()
                .offsets[0]
        })
        .collect();
    store.checkpoint().unwrap();
    let last = rt
        .block_on(store.append_durable(vec![rec("c", 0, &body(n - 1))]))
        .unwrap();
    offs.push(last.offsets[0]);
    drop(store);
    (offs, last.end)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), t).unwrap();
        }
    }
}

fn assert_prefix_intact(dir: &std::path::Path, offs: &[u64], keep: usize) {
    let store = open(dir);
    for (i, off) in offs.iter().enumerate().take(keep) {
        let r = store
            .log()
            .read(*off)
            .unwrap_or_else(|e| panic!("record {i} lost: {e}"));
        assert_eq!(&r.body[..], &body(i)[..], "record {i} changed");
        let m = store.read_queue("c", 0, i as u64).unwrap();
        assert_eq!(m.physical_offset, *off);
    }
    // Exactly the intact prefix is left, and the queue agrees.
    assert_eq!(store.log().iter_from(offs[0]).count(), keep);
    assert_eq!(store.max_queue_offset("c", 0), keep as u64);
    assert!(matches!(
        store.read_queue("c", 0, keep as u64),
        Err(Error::QueueOffsetNotFound { .. })
    ));
    // The log is appendable again after recovery.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt
        .block_on(store.append_durable(vec![rec("c", 0, b"after")]))
        .unwrap();
    assert_eq!(r.queue_offsets[0], Some(keep as u64));
    store.close().unwrap();
}

#[test]
fn truncation_at_every_byte_of_the_last_record() {
    let pristine = tempfile::tempdir().unwrap();
    let (offs, end) = write_records(pristine.path(), 12);
    let seg = last_segment(pristine.path());
    let seg_base: u64 = seg.file_name().unwrap().to_str().unwrap().parse().unwrap();
    let last = *offs.last().unwrap();
    assert!(last >= seg_base, "last record must be in the last segment");
    for cut in (last - seg_base)..(end - seg_base) {
        let d = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), d.path());
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(last_segment(d.path()))
            .unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        assert_prefix_intact(d.path(), &offs, offs.len() - 1);
    }
}

#[test]
fn bit_flips_in_the_last_record_drop_only_it() {
    let pristine = tempfile::tempdir().unwrap();
    let (offs, end) = write_records(pristine.path(), 10);
    let seg = last_segment(pristine.path());
    let seg_base: u64 = seg.file_name().unwrap().to_str().unwrap().parse().unwrap();
    let seg_len = std::fs::metadata(&seg).unwrap().len();
    let last = *offs.last().unwrap() - seg_base;
    // Every byte of the record, one bit each (cycling the bit position).
    // The record is followed by preallocated zeros: they go to the
    // quarantine with it.
    for pos in last..(end - seg_base) {
        let d = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), d.path());
        let p = last_segment(d.path());
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[pos as usize] ^= 1 << (pos % 8);
        std::fs::write(&p, &bytes).unwrap();
        assert_prefix_intact(d.path(), &offs, offs.len() - 1);
        // The dropped bytes were kept for an operator, not deleted.
        let q = d.path().join("commitlog/quarantine");
        let kept: u64 = std::fs::read_dir(&q)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(kept, seg_len - last);
    }
}

#[test]
fn corruption_inside_a_sealed_segment_is_reported_and_the_rest_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (offs, _) = write_records(dir.path(), 40);
    // Flip a body byte of record 3 (in the first, sealed segment).
    let first = dir.path().join("commitlog").join(format!("{:020}", 0));
    let mut bytes = std::fs::read(&first).unwrap();
    let target = (offs[3] + 70) as usize;
    assert!(target < bytes.len());
    bytes[target] ^= 0xFF;
    std::fs::write(&first, &bytes).unwrap();
    // Force a full scan: remove the checkpoint store.
    std::fs::remove_dir_all(dir.path().join("meta")).unwrap();
    let store = open(dir.path());
    let rep = store.recovery_report().clone();
    assert_eq!(rep.truncated, None);
    assert_eq!(rep.corrupt.len(), 1, "{rep:?}");
    assert_eq!(rep.corrupt[0].start, offs[3]);
    assert_eq!(rep.corrupt[0].end, offs[4]);
    // The corrupt record is never served; every other one is.
    assert!(matches!(
        store.log().read(offs[3]),
        Err(Error::Corrupt { .. })
    ));
    assert!(store.read_queue("c", 0, 3).is_err());
    for (i, off) in offs.iter().enumerate().filter(|(i, _)| *i != 3) {
        assert_eq!(&store.log().read(*off).unwrap().body[..], &body(i)[..]);
        assert_eq!(
            store.read_queue("c", 0, i as u64).unwrap().physical_offset,
            *off
        );
    }
}

#[test]
fn preallocated_zeros_after_a_kill_are_not_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::small_config(dir.path());
    cfg.segment_bytes = 1 << 20;
    cfg.preallocate_bytes = 64 * 1024;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = halfmq_storage::Store::open(cfg.clone()).unwrap();
    let mut offs = Vec::new();
    let mut end = 0;
    for i in 0..20 {
        let r = rt
            .block_on(store.append_durable(vec![rec("c", 0, &body(i))]))
            .unwrap();
        offs.push(r.offsets[0]);
        end = r.end;
    }
    drop(store); // killed: no clean close
    let seg = last_segment(dir.path());
    let file_len = std::fs::metadata(&seg).unwrap().len();
    assert!(
        file_len > end,
        "the file holds zeros past the log's end ({file_len} <= {end})"
    );

    let store = halfmq_storage::Store::open(cfg.clone()).unwrap();
    let rep = store.recovery_report().clone();
    assert_eq!(rep.truncated, None, "{rep:?}");
    assert!(rep.corrupt.is_empty(), "{rep:?}");
    assert_eq!(rep.preallocated_bytes, file_len - end);
    assert!(!dir.path().join("commitlog/quarantine").exists());
    assert_eq!(store.log().written_offset(), end);
    for (i, off) in offs.iter().enumerate() {
        assert_eq!(&store.log().read(*off).unwrap().body[..], &body(i)[..]);
    }
    // The next record goes right after the last one, over the zeros.
    let r = rt
        .block_on(store.append_durable(vec![rec("c", 0, &body(20))]))
        .unwrap();
    assert_eq!(r.offsets[0], end);
    assert_eq!(store.read_queue("c", 0, 20).unwrap().physical_offset, end);
    // A clean close leaves the file exactly as long as the log.
    store.close().unwrap();
    drop(store);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), r.end);
    let store = halfmq_storage::Store::open(cfg).unwrap();
    assert_eq!(store.recovery_report().preallocated_bytes, 0);
    assert_eq!(store.log().written_offset(), r.end);
}

#[test]
fn sealed_segments_keep_no_preallocated_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = open(dir.path()); // 4 KiB segments
    for i in 0..60 {
        rt.block_on(store.append_durable(vec![rec("c", 0, &body(i))]))
            .unwrap();
    }
    let segs = store.log().segments().unwrap();
    assert!(segs.len() > 3, "{segs:?}");
    for s in segs.iter().filter(|s| !s.active) {
        let len = std::fs::metadata(
            dir.path()
                .join("commitlog")
                .join(halfmq_storage::commitlog::segment_file_name(s.base)),
        )
        .unwrap()
        .len();
        assert_eq!(
            s.base + len,
            s.end,
            "sealed segment {} has a zero tail",
            s.base
        );
    }
    drop(store);
    // Even after a kill, reopening finds every sealed segment whole.
    let store = open(dir.path());
    assert!(store.recovery_report().corrupt.is_empty());
}

/// Zeroes the size field (bytes 8..12) of consume-queue entry `qo` of
/// `c/0`, as a disk or a careless hand would.
fn zero_entry_size(dir: &std::path::Path, qo: u64, per_file: u64) {
    use std::os::unix::fs::FileExt;
    let base = qo - qo % per_file;
    let path = dir.join(format!("consumequeue/c/0/{base:020}"));
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&[0u8; 4], (qo - base) * 20 + 8).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn a_zeroed_consume_queue_entry_is_repaired_not_skipped() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (qo, where_) in [
        (2u64, "an old file, caught when read"),
        (95, "a last file, caught at open"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path());
        for i in 0..100 {
            rt.block_on(store.append_durable(vec![rec("c", 0, &body(i))]))
                .unwrap();
        }
        store.close().unwrap();
        drop(store);
        zero_entry_size(dir.path(), qo, 16);
        for round in 0..2 {
            let store = open(dir.path());
            let m = store
                .read_queue("c", 0, qo)
                .unwrap_or_else(|e| panic!("{where_}, round {round}: {e}"));
            assert_eq!(&m.record.body[..], &body(qo as usize)[..], "{where_}");
            for i in 0..100u64 {
                assert_eq!(store.read_queue("c", 0, i).unwrap().queue_offset, i);
            }
            store.close().unwrap();
        }
    }
}

#[test]
fn an_entry_whose_record_is_gone_becomes_a_known_hole() {
    use std::os::unix::fs::FileExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut offs = Vec::new();
    for i in 0..40 {
        offs.push(
            rt.block_on(store.append_durable(vec![rec("c", 0, &body(i + 50))]))
                .unwrap()
                .offsets[0],
        );
    }
    store.close().unwrap();
    drop(store);
    // Entry 3's record is damaged in the log as well as its entry zeroed:
    // nothing can bring it back. The repair marks it a hole; the rest reads.
    zero_entry_size(dir.path(), 3, 16);
    let seg = dir.path().join("commitlog/00000000000000000000");
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    f.write_all_at(&[0x5A], offs[3] + 70).unwrap();
    drop(f);
    let store = open(dir.path());
    assert!(matches!(
        store.read_queue("c", 0, 3),
        Err(Error::QueueOffsetNotFound { .. })
    ));
    assert!(store.read_queue("c", 0, 4).is_ok());
    assert_eq!(
        store.queue("c", 0).unwrap().slot(3).unwrap(),
        Some(halfmq_storage::Slot::Hole)
    );
    store.close().unwrap();
}

#[test]
fn a_scan_steps_over_damage_and_reports_it() {
    use halfmq_storage::ScanItem;
    use std::os::unix::fs::FileExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let big = |c: &mut halfmq_storage::StoreConfig| {
        c.segment_bytes = 1 << 20;
        c.max_record_bytes = 64 << 10;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::small_config(dir.path());
    big(&mut cfg);
    let store = halfmq_storage::Store::open(cfg.clone()).unwrap();
    let mut offs = Vec::new();
    for i in 0..20 {
        offs.push(
            rt.block_on(store.append_durable(vec![rec("c", 0, &body(i + 1))]))
                .unwrap()
                .offsets[0],
        );
    }
    store.close().unwrap();
    drop(store);
    let seg = dir.path().join("commitlog/00000000000000000000");
    let f = std::fs::OpenOptions::new().write(true).open(&seg).unwrap();
    // A flipped body bit in record 3 (its length still right) and a wrong
    // length in record 10 (the scan must search for record 11).
    f.write_all_at(&[0xA5], offs[3] + (offs[4] - offs[3]) - 1)
        .unwrap();
    f.write_all_at(&7_000u32.to_le_bytes(), offs[10]).unwrap();
    drop(f);
    let store = halfmq_storage::Store::open(cfg).unwrap();
    let mut got = Vec::new();
    let mut skipped = Vec::new();
    for item in store.log().scan_from(0) {
        match item.unwrap() {
            ScanItem::Record(o, _) => got.push(o),
            ScanItem::Skipped(r) => skipped.push((r.start, r.end)),
        }
    }
    let want: Vec<u64> = offs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 10)
        .map(|(_, o)| *o)
        .collect();
    assert_eq!(got, want);
    assert_eq!(skipped, vec![(offs[3], offs[4]), (offs[10], offs[11])]);
    // iter_from still stops at the first damage.
    assert_eq!(store.log().iter_from(0).filter(|r| r.is_ok()).count(), 3);
    store.close().unwrap();
}
