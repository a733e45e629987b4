//! Helpers shared by the storage integration tests.
#![allow(dead_code, missing_docs)]

use bytes::Bytes;
use halfmq_storage::{FlushMode, Record, Store, StoreConfig};

pub fn rec(topic: &str, queue_id: u32, body: &[u8]) -> Record {
    Record {
        topic: topic.into(),
        queue_id,
        tag: "t".into(),
        keys: vec!["k".into()],
        body: Bytes::copy_from_slice(body),
        ..Record::default()
    }
}

pub fn small_config(dir: &std::path::Path) -> StoreConfig {
    let mut c = StoreConfig::new(dir);
    c.segment_bytes = 4096;
    c.max_record_bytes = 4096;
    c.cq_entries_per_file = 16;
    c.flush = FlushMode::Sync;
    c
}

pub fn open(dir: &std::path::Path) -> Store {
    Store::open(small_config(dir)).expect("open store")
}

/// Body of the i-th test record: deterministic, varied length.
pub fn body(i: usize) -> Vec<u8> {
    let len = 1 + (i * 37) % 700;
    (0..len).map(|j| (i + j) as u8).collect()
}

pub fn last_segment(dir: &std::path::Path) -> std::path::PathBuf {
    let mut v: Vec<_> = std::fs::read_dir(dir.join("commitlog"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v.pop().unwrap()
}
