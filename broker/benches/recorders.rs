//! Criterion benches of what the HTTP endpoint's histograms add to the hot
//! path: a gRPC request through `RequestTimer` (path lookup, two clock
//! reads, a boxed future, one observation) against the same no-op service
//! without it, and one fdatasync's observation (`FlushObserver::flushed`).
//!
//! ```text
//! cargo bench -p halfmq-broker --bench recorders
//! ```
#![allow(missing_docs)]

use std::convert::Infallible;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt as _;
use halfmq_broker::http::{Recorders, RequestTimerLayer};
use halfmq_storage::FlushObserver as _;
use tower::{Layer as _, Service as _};

fn noop() -> impl tower::Service<
    http::Request<()>,
    Response = (),
    Error = Infallible,
    Future = std::future::Ready<Result<(), Infallible>>,
> + Clone {
    tower::service_fn(|_r: http::Request<()>| std::future::ready(Ok::<(), Infallible>(())))
}

fn request() -> http::Request<()> {
    http::Request::builder()
        .uri("/halfmq.v1.Producer/Send")
        .body(())
        .unwrap()
}

fn recorder_benches(c: &mut Criterion) {
    let rec = Arc::new(Recorders::new());
    let mut bare = noop();
    c.bench_function("request without the timer", |b| {
        b.iter(|| bare.call(request()).now_or_never())
    });
    let mut timed = RequestTimerLayer::new(Some(Arc::clone(&rec))).layer(noop());
    c.bench_function("request through RequestTimer (http_listen on)", |b| {
        b.iter(|| timed.call(request()).now_or_never())
    });
    let mut off = RequestTimerLayer::new(None).layer(noop());
    c.bench_function("request through RequestTimer (http_listen off)", |b| {
        b.iter(|| off.call(request()).now_or_never())
    });
    c.bench_function("FlushObserver::flushed", |b| {
        b.iter(|| rec.flushed(0.000_8, 64))
    });
}

criterion_group!(benches, recorder_benches);
criterion_main!(benches);
