//! Counters and per-group figures for `stats`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::progress::{GroupKey, GroupTopic};
use super::{lock, Broker};

/// Counters for `stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) messages_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    pub(crate) messages_out: AtomicU64,
    pub(crate) bytes_out: AtomicU64,
    pub(crate) acks: AtomicU64,
    pub(crate) redeliveries: AtomicU64,
    pub(crate) connections: AtomicU64,
    pub(crate) halves_in: AtomicU64,
    pub(crate) transactions_committed: AtomicU64,
    pub(crate) transactions_rolled_back: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) checks_sent: AtomicU64,
    pub(crate) checks_answered: AtomicU64,
    pub(crate) check_timeouts: AtomicU64,
}

/// Per-group figures for `stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Messages in flight.
    pub inflight: u64,
    /// Visible messages not yet acked.
    pub lag: u64,
    /// Messages acked (consumer offsets summed plus acked above them).
    pub acked: u64,
    /// Retries scheduled and not yet acked: entries of the group's retry
    /// queues (`%RETRY%<group>%<topic>`, one per delay level) above their
    /// acked offset, due or not.
    pub retries_scheduled: u64,
    /// The same figures per queue of the topic, by queue id.
    pub queues: Vec<QueueStats>,
}

/// One queue's figures within [`GroupStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// Queue id.
    pub queue_id: u32,
    /// The queue's next queue offset (messages ever stored in it).
    pub max_offset: u64,
    /// Messages of the queue the group acked.
    pub acked: u64,
    /// Messages of the queue in flight to the group.
    pub inflight: u64,
    /// `max_offset - acked`.
    pub lag: u64,
}

/// A snapshot of the broker's counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Messages stored by sends.
    pub messages_in: u64,
    /// Body bytes stored by sends.
    pub bytes_in: u64,
    /// Messages delivered (redeliveries included).
    pub messages_out: u64,
    /// Body bytes delivered.
    pub bytes_out: u64,
    /// Acks accepted.
    pub acks: u64,
    /// Redeliveries (expired or nacked leases delivered again).
    pub redeliveries: u64,
    /// Per (group, topic).
    pub groups: Vec<GroupStats>,
    /// Bytes in the commit log.
    pub commit_log_bytes: u64,
    /// Since start, ms.
    pub uptime_ms: u64,
    /// Open client connections.
    pub connections: u64,
    /// Open producer sessions (check-back streams).
    pub producer_sessions: u64,
    /// Unresolved half messages (given-up ones included).
    pub pending_halves: u64,
    /// Delayed messages not yet due.
    pub delayed_messages: u64,
    /// Half messages stored since start.
    pub halves_in: u64,
    /// Transactions ended by commit since start (delayed messages not
    /// counted).
    pub transactions_committed: u64,
    /// Transactions ended by rollback since start.
    pub transactions_rolled_back: u64,
    /// fdatasyncs of the commit log since start.
    pub commit_log_fsyncs: u64,
    /// Sends answered as duplicates since start.
    pub duplicates: u64,
    /// Idempotency keys in the dedup index now.
    pub dedup_keys: u64,
    /// Keys dropped early because of `max_dedup_keys`, since start.
    pub dedup_evicted: u64,
    /// Given-up half messages (pending until resolved by hand).
    pub given_up_halves: u64,
    /// Check-backs sent to producer sessions since start.
    pub checks_sent: u64,
    /// Check-backs answered by the session they went to, since start.
    pub checks_answered: u64,
    /// Check-backs whose answer did not come within
    /// `check_reply_timeout_ms`, since start.
    pub check_timeouts: u64,
}

/// Messages of a queue a group acked: its consumer offset plus those
/// acked above it.
fn acked_total(p: &super::delivery::QueueProgress) -> u64 {
    p.ack_offset() + p.acked_count() as u64
}

impl Broker {
    /// Counters and per-group figures.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let groups: Vec<(GroupKey, Arc<Mutex<GroupTopic>>)> = lock(&self.groups)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let mut gs: Vec<GroupStats> = groups
            .into_iter()
            .map(|((group, topic), gt)| {
                let g = lock(&gt);
                let mut s = GroupStats {
                    group,
                    topic: topic.clone(),
                    inflight: 0,
                    lag: 0,
                    acked: 0,
                    retries_scheduled: 0,
                    queues: Vec::with_capacity(g.queues.len()),
                };
                for (qid, p) in g.queues.iter().enumerate() {
                    let max = self.store.max_queue_offset(&topic, qid as u32);
                    let acked = acked_total(p);
                    let q = QueueStats {
                        queue_id: qid as u32,
                        max_offset: max,
                        acked,
                        inflight: p.inflight() as u64,
                        lag: max.saturating_sub(acked),
                    };
                    s.inflight += q.inflight;
                    s.acked += q.acked;
                    s.lag += q.lag;
                    s.queues.push(q);
                }
                if !g.retry.is_empty() {
                    let rt = super::redelivery::retry_topic(&s.group, &topic);
                    for (level, p) in g.retry.iter().enumerate() {
                        let max = self.store.max_queue_offset(&rt, level as u32);
                        s.retries_scheduled += max.saturating_sub(acked_total(p));
                    }
                }
                s
            })
            .collect();
        gs.sort_by(|a, b| (&a.group, &a.topic).cmp(&(&b.group, &b.topic)));
        let log_bytes = self.store.log().written_offset() - self.store.log().min_offset();
        let (halves, delayed) = self.tx_state().pending_counts();
        let (dedup_keys, dedup_evicted) = {
            let d = lock(&self.dedup);
            (d.len() as u64, d.evicted)
        };
        Stats {
            messages_in: c.messages_in.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            messages_out: c.messages_out.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            acks: c.acks.load(Ordering::Relaxed),
            redeliveries: c.redeliveries.load(Ordering::Relaxed),
            groups: gs,
            commit_log_bytes: log_bytes,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            connections: c.connections.load(Ordering::Relaxed),
            producer_sessions: self.tx_state().session_count() as u64,
            pending_halves: halves as u64,
            delayed_messages: delayed as u64,
            halves_in: c.halves_in.load(Ordering::Relaxed),
            transactions_committed: c.transactions_committed.load(Ordering::Relaxed),
            transactions_rolled_back: c.transactions_rolled_back.load(Ordering::Relaxed),
            commit_log_fsyncs: self.store.log().fsync_count(),
            duplicates: c.duplicates.load(Ordering::Relaxed),
            dedup_keys,
            dedup_evicted,
            given_up_halves: self.tx_state().given_up_count() as u64,
            checks_sent: c.checks_sent.load(Ordering::Relaxed),
            checks_answered: c.checks_answered.load(Ordering::Relaxed),
            check_timeouts: c.check_timeouts.load(Ordering::Relaxed),
        }
    }

    /// A client connection was accepted (`open`) or closed; for `stats`.
    pub(crate) fn count_connection(&self, open: bool) {
        if open {
            self.counters.connections.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}
