//! Histograms recorded on the hot path, only while the HTTP endpoint is on
//! (`http_listen` not empty): `halfmq_fsync_seconds` and
//! `halfmq_group_commit_records` (told by the commit log's flusher of each
//! fdatasync), and `halfmq_request_seconds{rpc}` (a tower layer in front
//! of every gRPC service).
//!
//! `rpc` is the gRPC path without its leading `/`
//! (`halfmq.v1.Producer/Send`, `apache.rocketmq.v2.MessagingService/SendMessage`,
//! `halfmq.raft.v1.Raft/AppendEntries`): one series per RPC of the
//! broker's `.proto` files, read from them at build time, so a client
//! cannot add series; a path that is not one of them is not recorded.
//! For a streaming RPC (`Session`, `Telemetry`) the time is until the
//! stream is open; for a long poll (`Receive`) it includes the wait.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The `.proto` files whose RPCs get a `halfmq_request_seconds` series.
const PROTOS: [&str; 3] = [
    include_str!("../../../proto/proto/halfmq.proto"),
    include_str!("../../../proto/proto/raft.proto"),
    include_str!("../../../proto/proto/rocketmq/v2.proto"),
];

/// `/package.Service/Method` of every RPC declared in `proto` (its text).
fn rpc_paths(proto: &str) -> Vec<String> {
    let mut package = "";
    let mut service = "";
    let mut out = Vec::new();
    for line in proto.lines().map(str::trim) {
        if let Some(p) = line.strip_prefix("package ") {
            package = p.trim_end_matches(';').trim();
        } else if let Some(s) = line.strip_prefix("service ") {
            service = s.split_whitespace().next().unwrap_or("");
        } else if let Some(r) = line.strip_prefix("rpc ") {
            let method = r.split(['(', ' ']).next().unwrap_or("");
            if !method.is_empty() && !service.is_empty() {
                out.push(format!("/{package}.{service}/{method}"));
            }
        }
    }
    out
}

type RpcLabel = [(&'static str, String); 1];

/// The hot path's histograms.
#[derive(Debug)]
pub struct Recorders {
    fsync_seconds: Histogram,
    group_commit_records: Histogram,
    request_seconds: Family<RpcLabel, Histogram, fn() -> Histogram>,
    /// By gRPC path: the series of each known RPC, made up front.
    by_path: HashMap<String, Histogram>,
}

fn seconds_buckets() -> Histogram {
    // 50 us to about 13 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

impl Recorders {
    /// Empty histograms, a `halfmq_request_seconds` series for each RPC.
    pub fn new() -> Recorders {
        let request_seconds: Family<RpcLabel, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(seconds_buckets);
        let mut by_path = HashMap::new();
        for path in PROTOS.iter().flat_map(|p| rpc_paths(p)) {
            let label = [("rpc", path.trim_start_matches('/').to_owned())];
            let h = request_seconds.get_or_create(&label).clone();
            by_path.insert(path, h);
        }
        Recorders {
            // 50 us to about 1.6 s.
            fsync_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            // 1 to 16384 records.
            group_commit_records: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            request_seconds,
            by_path,
        }
    }

    /// Adds the histograms to `r`.
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "halfmq_fsync_seconds",
            "Duration of each fdatasync of the commit log's active segment, seconds.",
            self.fsync_seconds.clone(),
        );
        r.register(
            "halfmq_group_commit_records",
            "Records made durable by each fdatasync of the commit log (group commit size).",
            self.group_commit_records.clone(),
        );
        r.register(
            "halfmq_request_seconds",
            "gRPC request duration until the response headers, seconds, per RPC.",
            self.request_seconds.clone(),
        );
    }

    /// The series of the RPC at `path`, when it is one.
    fn request(&self, path: &str) -> Option<&Histogram> {
        self.by_path.get(path)
    }
}

impl Default for Recorders {
    fn default() -> Self {
        Recorders::new()
    }
}

impl halfmq_storage::FlushObserver for Recorders {
    fn flushed(&self, seconds: f64, records: u64) {
        self.fsync_seconds.observe(seconds);
        self.group_commit_records.observe(records as f64);
    }
}

/// A tower layer timing each gRPC request into `halfmq_request_seconds`;
/// with no recorders it passes requests through.
#[derive(Clone)]
pub struct RequestTimerLayer {
    recorders: Option<Arc<Recorders>>,
}

impl RequestTimerLayer {
    /// Times into `recorders` (none: off).
    pub fn new(recorders: Option<Arc<Recorders>>) -> RequestTimerLayer {
        RequestTimerLayer { recorders }
    }
}

impl<S> tower::Layer<S> for RequestTimerLayer {
    type Service = RequestTimer<S>;
    fn layer(&self, inner: S) -> RequestTimer<S> {
        RequestTimer {
            inner,
            recorders: self.recorders.clone(),
        }
    }
}

/// See [`RequestTimerLayer`].
#[derive(Clone)]
pub struct RequestTimer<S> {
    inner: S,
    recorders: Option<Arc<Recorders>>,
}

impl<S, B> tower::Service<http::Request<B>> for RequestTimer<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    /// Off (or a path that is not an RPC): the inner future as it is, no
    /// allocation; on: boxed with its timer.
    type Future = futures_util::future::Either<
        S::Future,
        Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let h = self
            .recorders
            .as_ref()
            .and_then(|r| r.request(req.uri().path()).cloned());
        let fut = self.inner.call(req);
        match h {
            None => futures_util::future::Either::Left(fut),
            Some(h) => {
                let started = Instant::now();
                futures_util::future::Either::Right(Box::pin(async move {
                    let r = fut.await;
                    h.observe(started.elapsed().as_secs_f64());
                    r
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rpc_of_the_protos_has_a_series() {
        let r = Recorders::new();
        for p in [
            "/halfmq.v1.Producer/Send",
            "/halfmq.v1.Producer/Session",
            "/halfmq.v1.Consumer/Receive",
            "/halfmq.v1.Admin/DeleteTopic",
            "/halfmq.v1.Security/Revoke",
            "/halfmq.raft.v1.Raft/AppendEntries",
            "/apache.rocketmq.v2.MessagingService/SendMessage",
            "/apache.rocketmq.v2.MessagingService/ChangeInvisibleDuration",
        ] {
            assert!(r.request(p).is_some(), "{p}");
        }
        assert!(r.request("/halfmq.v1.Producer/Nope").is_none());
        assert!(r.request("/x").is_none());
        // 7 + 4 + 12 + 5 (halfmq.v1) + 5 (raft) + 11 (RocketMQ).
        assert_eq!(r.by_path.len(), 44);
    }
}
