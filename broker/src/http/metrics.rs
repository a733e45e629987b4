//! `GET /metrics`: the broker's figures in the Prometheus text format
//! (prometheus-client), read from the core's counters at each scrape, so
//! that serving them costs the hot path nothing.
//!
//! Label cardinality: `group` and `topic` labels come from the (consumer
//! group, topic) pairs with progress, at most `max_consumer_groups`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::core::Broker;

/// The broker's figures at scrape time.
struct BrokerCollector {
    broker: Arc<Broker>,
    /// A group member's consensus, for the `halfmq_raft_*` figures.
    node: Option<crate::cluster::NodeHandle>,
}

impl std::fmt::Debug for BrokerCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCollector")
            .field("member", &self.node.is_some())
            .finish()
    }
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let c = ConstCounter::new(v);
    c.encode(e.encode_descriptor(name, help, None, c.metric_type())?)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    g.encode(e.encode_descriptor(name, help, None, g.metric_type())?)
}

/// A gauge family: one value per label set.
fn gauges(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&'static str, String)>, u64)],
) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

/// The free bytes of the file system holding `dir` (0 when unknown).
pub(super) fn disk_free_bytes(dir: &std::path::Path) -> u64 {
    rustix::fs::statvfs(dir).map_or(0, |s| s.f_bavail.saturating_mul(s.f_frsize))
}

impl Collector for BrokerCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let s = self.broker.stats();
        // Counters (prometheus-client adds `_total`).
        for (name, help, v) in [
            (
                "halfmq_messages_in",
                "Messages stored by sends since start.",
                s.messages_in,
            ),
            (
                "halfmq_messages_out",
                "Messages delivered since start, redeliveries included.",
                s.messages_out,
            ),
            (
                "halfmq_bytes_in",
                "Body bytes stored by sends and half messages since start.",
                s.bytes_in,
            ),
            (
                "halfmq_bytes_out",
                "Body bytes delivered since start.",
                s.bytes_out,
            ),
            ("halfmq_acks", "Acks accepted since start.", s.acks),
            (
                "halfmq_redeliveries",
                "Deliveries of expired or nacked leases since start.",
                s.redeliveries,
            ),
            (
                "halfmq_halves_in",
                "Half messages stored since start.",
                s.halves_in,
            ),
            (
                "halfmq_transactions_committed",
                "Transactions ended by commit since start.",
                s.transactions_committed,
            ),
            (
                "halfmq_transactions_rolled_back",
                "Transactions ended by rollback since start.",
                s.transactions_rolled_back,
            ),
            (
                "halfmq_commit_log_fsyncs",
                "fdatasyncs of the commit log since start.",
                s.commit_log_fsyncs,
            ),
            (
                "halfmq_duplicates",
                "Sends answered as duplicates of an idempotency key since start.",
                s.duplicates,
            ),
            (
                "halfmq_checks_sent",
                "Check-backs sent to producer sessions since start.",
                s.checks_sent,
            ),
            (
                "halfmq_checks_answered",
                "Check-backs answered by the session they went to since start.",
                s.checks_answered,
            ),
            (
                "halfmq_checks_timeouts",
                "Check-backs unanswered within check_reply_timeout_ms since start.",
                s.check_timeouts,
            ),
        ] {
            counter(&mut e, name, help, v)?;
        }
        for (name, help, v) in [
            (
                "halfmq_pending_halves",
                "Unresolved half messages, given-up ones included.",
                s.pending_halves,
            ),
            (
                "halfmq_given_up_halves",
                "Half messages given up after check_max checks, pending until resolved by hand.",
                s.given_up_halves,
            ),
            (
                "halfmq_delayed_messages",
                "Delayed messages not yet due.",
                s.delayed_messages,
            ),
            (
                "halfmq_retries_scheduled",
                "Retries in the consumer groups' retry queues not yet acked, due or not.",
                s.groups.iter().map(|g| g.retries_scheduled).sum(),
            ),
            (
                "halfmq_connections",
                "Open client connections.",
                s.connections,
            ),
            (
                "halfmq_producer_sessions",
                "Open producer sessions (check-back streams).",
                s.producer_sessions,
            ),
            (
                "halfmq_commit_log_bytes",
                "Bytes in the commit log.",
                s.commit_log_bytes,
            ),
            (
                "halfmq_dedup_keys",
                "Idempotency keys in the dedup index.",
                s.dedup_keys,
            ),
            (
                "halfmq_uptime_seconds",
                "Seconds since the broker started.",
                s.uptime_ms / 1000,
            ),
            (
                "halfmq_disk_free_bytes",
                "Free bytes of the file system holding the data directory.",
                disk_free_bytes(&self.broker.config().data_dir),
            ),
        ] {
            gauge(&mut e, name, help, v)?;
        }
        let pair = |g: &crate::core::GroupStats| {
            vec![("group", g.group.clone()), ("topic", g.topic.clone())]
        };
        let lag: Vec<_> = s.groups.iter().map(|g| (pair(g), g.lag)).collect();
        gauges(
            &mut e,
            "halfmq_consumer_lag",
            "Visible messages not yet acked, per consumer group and topic.",
            &lag,
        )?;
        let inflight: Vec<_> = s.groups.iter().map(|g| (pair(g), g.inflight)).collect();
        gauges(
            &mut e,
            "halfmq_inflight",
            "Messages delivered and not yet acked, per consumer group and topic.",
            &inflight,
        )?;
        let dlq: Vec<_> = self
            .broker
            .dead_letter_counts()
            .into_iter()
            .map(|(g, n)| (vec![("group", g)], n))
            .collect();
        gauges(
            &mut e,
            "halfmq_dlq_messages",
            "Live dead letters per consumer group.",
            &dlq,
        )?;
        if let Some(n) = &self.node {
            raft(&mut e, &n.status())?;
        }
        Ok(())
    }
}

/// A group member's `halfmq_raft_*` figures. Label cardinality: the
/// group's members (`peer`) and the five roles.
fn raft(e: &mut DescriptorEncoder, st: &halfmq_proto::raft::NodeStatus) -> std::fmt::Result {
    gauge(e, "halfmq_raft_term", "Current Raft term.", st.term)?;
    let roles: Vec<_> = ["leader", "follower", "candidate", "learner", "shutdown"]
        .into_iter()
        .map(|r| (vec![("role", r.to_owned())], u64::from(st.role == r)))
        .collect();
    gauges(
        e,
        "halfmq_raft_role",
        "1 for this replica's Raft role, 0 for the others.",
        &roles,
    )?;
    gauge(
        e,
        "halfmq_raft_leader_id",
        "Node id of the leader this replica knows (0: none).",
        st.leader_id.unwrap_or(0),
    )?;
    gauge(
        e,
        "halfmq_raft_last_log_index",
        "Index of this replica's last Raft log entry.",
        st.last_log_index,
    )?;
    gauge(
        e,
        "halfmq_raft_last_applied_index",
        "Index of the last Raft entry this replica applied.",
        st.last_applied,
    )?;
    // The leader knows how far each member's log matches its own.
    let lag: Vec<_> = st
        .matched
        .iter()
        .filter(|(id, _)| **id != st.node_id)
        .map(|(id, m)| {
            (
                vec![("peer", id.to_string())],
                st.last_log_index.saturating_sub(*m),
            )
        })
        .collect();
    gauges(
        e,
        "halfmq_raft_replica_lag_entries",
        "On the leader: entries of its log each other member has not matched yet.",
        &lag,
    )
}

/// The registry of `broker`'s metrics, `recorders`' histograms and, for a
/// group member, its consensus' figures.
pub(super) fn registry(
    broker: Arc<Broker>,
    recorders: Option<&super::Recorders>,
    node: Option<crate::cluster::NodeHandle>,
) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(BrokerCollector { broker, node }));
    if let Some(rec) = recorders {
        rec.register(&mut r);
    }
    r
}

/// The text exposition of `r`.
///
/// # Errors
/// A metric that cannot be written (none are expected).
pub(super) fn render(r: &Registry) -> Result<String, std::fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r)?;
    Ok(out)
}
