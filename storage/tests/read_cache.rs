//! The commit log's in-memory tail: reads near the end are served from
//! memory, older ones from the segment file, and a cache of 0 reads only
//! the file. Damage written behind the store's back tells the two apart.

mod common;

use std::os::unix::fs::FileExt;

use common::{last_segment, rec, small_config};
use halfmq_storage::{Error, Store};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Appends `n` records of 600-byte bodies, one per append, and returns
/// their (physical offset, size).
fn fill(store: &Store, n: usize) -> Vec<(u64, u32)> {
    let rt = runtime();
    (0..n)
        .map(|i| {
            let a = rt
                .block_on(store.append_durable(vec![rec("c", 0, &[i as u8; 600])]))
                .unwrap();
            (a.offsets[0], a.sizes[0])
        })
        .collect()
}

/// Overwrites the last 8 bytes of every record in the file, as a disk
/// going bad would, without the store knowing.
fn damage_all(dir: &std::path::Path, recs: &[(u64, u32)]) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(last_segment(dir))
        .unwrap();
    for &(off, size) in recs {
        f.write_all_at(&[0xA5; 8], off + u64::from(size) - 8)
            .unwrap();
    }
    f.sync_all().unwrap();
}

fn open(dir: &std::path::Path, read_cache_bytes: u64) -> Store {
    let mut cfg = small_config(dir);
    cfg.segment_bytes = 1 << 20; // one segment: file position = physical offset
    cfg.read_cache_bytes = read_cache_bytes;
    Store::open(cfg).unwrap()
}

#[test]
fn the_newest_records_are_read_from_memory_older_ones_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 4096);
    let recs = fill(&store, 8);
    // Which appends the cache still holds: the newest whose sizes add up to
    // at most 4096 bytes.
    let mut held = 0u64;
    let cached = recs
        .iter()
        .rev()
        .take_while(|(_, s)| {
            held += u64::from(*s);
            held <= 4096
        })
        .count();
    assert!(
        (1..recs.len()).contains(&cached),
        "{cached} cached of {}",
        recs.len()
    );
    damage_all(dir.path(), &recs);
    for (i, &(off, size)) in recs.iter().enumerate() {
        let from_memory = i >= recs.len() - cached;
        for r in [store.log().read(off), store.log().read_sized(off, size)] {
            match r {
                Ok(rec) if from_memory => assert_eq!(&rec.body[..], &[i as u8; 600][..]),
                Err(Error::Corrupt { offset, .. }) if !from_memory => assert_eq!(offset, off),
                other => panic!("record {i} (from memory: {from_memory}): {other:?}"),
            }
        }
    }
}

#[test]
fn with_no_cache_every_read_goes_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 0);
    let recs = fill(&store, 3);
    damage_all(dir.path(), &recs);
    for &(off, size) in &recs {
        assert!(matches!(store.log().read(off), Err(Error::Corrupt { .. })));
        assert!(matches!(
            store.log().read_sized(off, size),
            Err(Error::Corrupt { .. })
        ));
    }
}

#[test]
fn reads_of_part_of_a_cached_record_fail_as_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 20);
    let recs = fill(&store, 2);
    let (off, size) = recs[1];
    // Past the end of what was written: out of range, not a cache hit.
    assert!(matches!(
        store.log().read_sized(off, size + 1),
        Err(Error::OffsetOutOfRange { .. })
    ));
    // Inside a record: what a damaged consume-queue entry would ask for.
    assert!(matches!(
        store.log().read(off + 10),
        Err(Error::Corrupt { .. })
    ));
    // A size that stops short of the record's end.
    assert!(store.log().read_sized(recs[0].0, recs[0].1 - 1).is_err());
    assert_eq!(&store.log().read(off).unwrap().body[..], &[1u8; 600][..]);
}
