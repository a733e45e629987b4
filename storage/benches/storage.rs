#![allow(missing_docs)]
//! Criterion benches of the storage hot paths.
//!
//! ```text
//! cargo bench -p halfmq-storage                         # everything
//! cargo bench -p halfmq-storage -- append_async         # one group
//! HALFMQ_BENCH_RECOVERY_MB=1024 cargo bench -p halfmq-storage -- recovery
//! HALFMQ_BENCH_DIR=/path cargo bench ...                # where files go (default: temp dir)
//! ```
//! The sync group-commit bench also prints records per fdatasync.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use halfmq_storage::{FlushMode, Record, Store, StoreConfig};

fn bench_dir() -> tempfile::TempDir {
    match std::env::var("HALFMQ_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).expect("bench dir"),
        Err(_) => tempfile::tempdir().expect("temp dir"),
    }
}

fn record(body: &Bytes, queue_id: u32) -> Record {
    Record {
        topic: "bench".into(),
        queue_id,
        tag: "tag".into(),
        keys: vec!["key-1".into()],
        body: body.clone(),
        ..Record::default()
    }
}

fn body_1k() -> Bytes {
    Bytes::from(vec![0x5Au8; 1024])
}

fn codec(c: &mut Criterion) {
    let r = record(&body_1k(), 0);
    let enc = Bytes::from(r.encode().unwrap());
    let mut g = c.benchmark_group("record_1KiB");
    g.throughput(Throughput::Bytes(enc.len() as u64));
    let mut buf = Vec::with_capacity(4096);
    g.bench_function("encode", |b| {
        b.iter(|| {
            buf.clear();
            r.encode_into(&mut buf).unwrap()
        })
    });
    g.bench_function("decode", |b| {
        b.iter(|| Record::decode(enc.clone(), 0).unwrap())
    });
    g.finish();
}

fn append_async(c: &mut Criterion) {
    let dir = bench_dir();
    let mut cfg = StoreConfig::new(dir.path());
    cfg.flush = FlushMode::Async { interval_ms: 500 };
    let store = Store::open(cfg).unwrap();
    let body = body_1k();
    let size = record(&body, 0).encoded_len() as u64;
    let mut g = c.benchmark_group("append_async_1KiB");
    g.throughput(Throughput::Bytes(size));
    g.bench_function("one_record_per_append", |b| {
        b.iter(|| store.append(vec![record(&body, 0)]).unwrap())
    });
    g.throughput(Throughput::Bytes(size * 64));
    g.bench_function("64_records_per_append", |b| {
        b.iter_batched(
            || (0..64).map(|_| record(&body, 0)).collect::<Vec<_>>(),
            |batch| store.append(batch).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
    store.close().unwrap();
}

fn append_sync_64(c: &mut Criterion) {
    let dir = bench_dir();
    let store = Arc::new(Store::open(StoreConfig::new(dir.path())).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let body = body_1k();
    let appenders = 64u64;
    let mut g = c.benchmark_group("append_sync_1KiB");
    g.throughput(Throughput::Elements(1));
    g.measurement_time(Duration::from_secs(10));
    let mut fsyncs_total = 0u64;
    let mut records_total = 0u64;
    g.bench_function("64_concurrent_appenders", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(appenders);
            let fs0 = store.log().fsync_count();
            let start = Instant::now();
            rt.block_on(async {
                let mut hs = Vec::new();
                for t in 0..appenders {
                    let s = Arc::clone(&store);
                    let body = body.clone();
                    hs.push(tokio::spawn(async move {
                        for _ in 0..per {
                            s.append_durable(vec![record(&body, (t % 4) as u32)])
                                .await
                                .unwrap();
                        }
                    }));
                }
                for h in hs {
                    h.await.unwrap();
                }
            });
            let el = start.elapsed();
            fsyncs_total += store.log().fsync_count() - fs0;
            records_total += per * appenders;
            // Scale to the iterations criterion asked for.
            el.mul_f64(iters as f64 / (per * appenders) as f64)
        })
    });
    g.finish();
    if fsyncs_total > 0 {
        eprintln!(
            "append_sync_1KiB/64_concurrent_appenders: {records_total} records, {fsyncs_total} fdatasyncs, \
             {:.1} records per fdatasync",
            records_total as f64 / fsyncs_total as f64
        );
    }
    store.close().unwrap();
}

fn cq_lookup(c: &mut Criterion) {
    let dir = bench_dir();
    let mut cfg = StoreConfig::new(dir.path());
    cfg.flush = FlushMode::Async { interval_ms: 500 };
    let store = Store::open(cfg).unwrap();
    let body = body_1k();
    let n = 100_000u64;
    for _ in 0..n / 100 {
        store
            .append((0..100).map(|_| record(&body, 0)).collect())
            .unwrap();
    }
    let mut g = c.benchmark_group("consume_queue");
    let mut i = 0u64;
    g.bench_function("read_queue_random_1KiB", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            store.read_queue("bench", 0, i).unwrap()
        })
    });
    g.bench_function("entry_only", |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            store.queue_entry("bench", 0, i).unwrap()
        })
    });
    g.finish();
    store.close().unwrap();
}

fn recovery(c: &mut Criterion) {
    let mb: u64 = std::env::var("HALFMQ_BENCH_RECOVERY_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let dir = bench_dir();
    let mut cfg = StoreConfig::new(dir.path());
    cfg.flush = FlushMode::Async { interval_ms: 500 };
    {
        let store = Store::open(cfg.clone()).unwrap();
        let body = body_1k();
        let per = record(&body, 0).encoded_len() as u64;
        let total = mb * 1024 * 1024 / per;
        for b in 0..total / 256 {
            store
                .append(
                    (0..256)
                        .map(|i| record(&body, ((b * 256 + i) % 4) as u32))
                        .collect(),
                )
                .unwrap();
        }
        store.close().unwrap();
    }
    let mut g = c.benchmark_group("recovery");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(mb * 1024 * 1024));
    g.bench_function(format!("full_scan_and_rebuild_{mb}MiB"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // No checkpoint and no consume queues: scan everything, rebuild.
                let _ = std::fs::remove_dir_all(dir.path().join("meta"));
                let _ = std::fs::remove_dir_all(dir.path().join("consumequeue"));
                let start = Instant::now();
                let store = Store::open(cfg.clone()).unwrap();
                total += start.elapsed();
                drop(store);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    codec,
    append_async,
    append_sync_64,
    cq_lookup,
    recovery
);
criterion_main!(benches);
