//! Consumer progress: per (group, topic) the state of each queue and retry
//! level, its snapshot encoding in sled, loading at start-up, saving at
//! checkpoints.

use foldhash::HashMap;
use std::sync::{Arc, Mutex};

use halfmq_storage::Store;

use super::delivery::QueueProgress;
use super::redelivery::{retry_topic, RETRY_QUEUE_BIT};
use super::{lock, Broker};
use crate::error::BrokerError;

/// One consumer group's progress on one topic.
#[derive(Debug, Default)]
pub(crate) struct GroupTopic {
    /// Per queue id of the topic.
    pub(crate) queues: Vec<QueueProgress>,
    /// Per retry delay level (queue id of `%RETRY%<group>%<topic>`).
    pub(crate) retry: Vec<QueueProgress>,
    pub(crate) round_robin: usize,
    /// Changed since the last save.
    pub(crate) dirty: bool,
    /// Per queue id, for a FIFO consumer group (`fifo.rs`); `None` for an
    /// ordinary one.
    pub(crate) fifo: Option<Vec<super::fifo::FifoGate>>,
}

impl GroupTopic {
    /// The progress of a queue (`retry_level` None) or of a retry level.
    pub(crate) fn progress_mut(
        &mut self,
        retry_level: Option<u32>,
        queue_id: u32,
    ) -> Option<&mut QueueProgress> {
        match retry_level {
            Some(l) => self.retry.get_mut(l as usize),
            None => self.queues.get_mut(queue_id as usize),
        }
    }
}

/// (consumer group, topic).
pub(crate) type GroupKey = (String, String);
/// Every group's progress, by (consumer group, topic).
pub(crate) type Groups = HashMap<GroupKey, Arc<Mutex<GroupTopic>>>;
/// A progress snapshot waiting for the leader's next progress record:
/// (sled key, value, the leader's applied end when it was encoded).
pub(crate) type OutboxPair = (Vec<u8>, Vec<u8>, u64);
/// Keyspace of consumer progress in sled (see ARCHITECTURE.md).
pub(crate) const GROUPS_SPACE: &str = "groups";

impl Broker {
    /// Saves the store checkpoint and every changed consumer progress.
    ///
    /// # Errors
    /// Storage errors.
    pub fn save_state(&self) -> Result<(), BrokerError> {
        let groups: Vec<(GroupKey, Arc<Mutex<GroupTopic>>)> = lock(&self.groups)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        {
            // Topic deletion holds this while it forgets groups, so no
            // progress of a deleted topic is written back after.
            let _saving = lock(&self.progress_lock);
            for ((group, topic), gt) in groups {
                if self.topic(&topic).is_some() {
                    self.save_group(&group, &topic, &mut lock(&gt))?;
                }
            }
        }
        self.dlq.save(&self.store)?;
        self.tx.save(&self.store, || {
            self.store.checkpoint()?;
            Ok(())
        })
    }

    /// Writes one group's progress on one topic to sled if it changed (no
    /// flush).
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn save_group(
        &self,
        group: &str,
        topic: &str,
        g: &mut GroupTopic,
    ) -> Result<(), BrokerError> {
        if !g.dirty {
            return Ok(());
        }
        // A broker group's leader also hands the snapshots to the next
        // progress record, so that followers (and the next leader) have them.
        // With the group's lock held by the caller: a hand-off applied
        // after this read is not in the snapshot, and its entry ends after
        // `as_of` (core/handoff.rs).
        let as_of = self.store.dispatched_end();
        let mut outbox = self
            .replication()
            .filter(|_| self.serving())
            .map(|_| lock(&self.progress_outbox));
        let mut put = |key: Vec<u8>, value: Vec<u8>| -> Result<(), BrokerError> {
            self.store.meta().put(GROUPS_SPACE, &key, &value)?;
            if let Some(o) = outbox.as_mut() {
                o.push((key, value, as_of));
            }
            Ok(())
        };
        for (qid, p) in g.queues.iter().enumerate() {
            put(group_key(group, topic, qid as u32), encode_progress(p))?;
        }
        for (level, p) in g.retry.iter().enumerate() {
            put(
                group_key(group, topic, RETRY_QUEUE_BIT | level as u32),
                encode_progress(p),
            )?;
        }
        g.dirty = false;
        Ok(())
    }

    /// Forgets every group's progress on `topic` (in memory); returns what
    /// was removed.
    pub(crate) fn remove_groups_of(&self, topic: &str) -> Vec<(GroupKey, Arc<Mutex<GroupTopic>>)> {
        let mut groups = lock(&self.groups);
        let keys: Vec<GroupKey> = groups.keys().filter(|(_, t)| t == topic).cloned().collect();
        keys.into_iter()
            .filter_map(|k| groups.remove(&k).map(|v| (k, v)))
            .collect()
    }
}

pub(crate) fn group_key(group: &str, topic: &str, queue_id: u32) -> Vec<u8> {
    halfmq_storage::meta::queue_key(group, topic, queue_id)
}

/// Snapshot of one queue's progress (little-endian):
/// `ack_offset u64 | acked_count u32 | acked u64* | lease_count u32 |
///  (queue_offset u64, invisible_until_ms u64, reconsume_times u32,
///  delivered_ms u64)*`, then (since session 6; older snapshots end here)
/// `last_seq u64 | (seq u64, flags u8)*` for the same leases in the same
/// order (flags bit 0: restored after a crash) `| redeliver_count u32 |
/// (queue_offset u64, reconsume_times u32, delivered_ms u64)*`.
pub(crate) fn encode_progress(p: &QueueProgress) -> Vec<u8> {
    let acked: Vec<u64> = p.acked().collect();
    let leases: Vec<_> = p.leases().collect();
    let again: Vec<_> = p.redeliveries().collect();
    let mut v = Vec::with_capacity(32 + acked.len() * 8 + leases.len() * 37 + again.len() * 20);
    v.extend_from_slice(&p.ack_offset().to_le_bytes());
    v.extend_from_slice(&(acked.len() as u32).to_le_bytes());
    for a in acked {
        v.extend_from_slice(&a.to_le_bytes());
    }
    v.extend_from_slice(&(leases.len() as u32).to_le_bytes());
    for (qo, l) in &leases {
        v.extend_from_slice(&qo.to_le_bytes());
        v.extend_from_slice(&l.invisible_until_ms.to_le_bytes());
        v.extend_from_slice(&l.reconsume_times.to_le_bytes());
        v.extend_from_slice(&l.delivered_ms.to_le_bytes());
    }
    v.extend_from_slice(&p.last_seq().to_le_bytes());
    for (_, l) in &leases {
        v.extend_from_slice(&l.seq.to_le_bytes());
        v.push(u8::from(l.restored_after_crash));
    }
    v.extend_from_slice(&(again.len() as u32).to_le_bytes());
    for (qo, l) in again {
        v.extend_from_slice(&qo.to_le_bytes());
        v.extend_from_slice(&l.reconsume_times.to_le_bytes());
        v.extend_from_slice(&l.delivered_ms.to_le_bytes());
    }
    v
}

pub(crate) fn decode_progress(b: &[u8]) -> Option<QueueProgress> {
    let mut rest = b;
    let mut take = |n: usize| -> Option<&[u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    };
    let u64_ = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    let u32_ = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
    let mut q = QueueProgress::starting_at(u64_(take(8)?));
    let n = u32_(take(4)?);
    let mut acked = Vec::new();
    for _ in 0..n {
        acked.push(u64_(take(8)?));
    }
    let n = u32_(take(4)?);
    let mut leases = Vec::new();
    for _ in 0..n {
        let qo = u64_(take(8)?);
        let until = u64_(take(8)?);
        let rt = u32_(take(4)?);
        let delivered_ms = u64_(take(8)?);
        leases.push((
            qo,
            crate::core::delivery::Lease {
                invisible_until_ms: until,
                reconsume_times: rt,
                seq: 0,
                delivered_ms,
                restored_after_crash: false,
            },
        ));
    }
    let mut again = Vec::new();
    // The older layout ends after the leases.
    let last_seq = take(8);
    if last_seq.is_none() {
        if take(1).is_some() {
            return None; // a torn trailer
        }
        // An older snapshot: no sequence numbers. Start past any handle an
        // older broker may have given out.
        q.restore_last_seq(crate::core::delivery::SEQ_GAP_AFTER_CRASH);
    } else {
        q.restore_last_seq(u64_(last_seq?));
        for (_, l) in &mut leases {
            l.seq = u64_(take(8)?);
            l.restored_after_crash = take(1)?[0] & 1 != 0;
        }
        let n = u32_(take(4)?);
        for _ in 0..n {
            let qo = u64_(take(8)?);
            let rt = u32_(take(4)?);
            let delivered_ms = u64_(take(8)?);
            again.push((
                qo,
                crate::core::delivery::Again {
                    reconsume_times: rt,
                    delivered_ms,
                    due_ms: 0,
                },
            ));
        }
        if take(1).is_some() {
            return None; // trailing bytes: not a snapshot this broker wrote
        }
    }
    for (qo, l) in leases {
        q.restore_lease(qo, l);
    }
    for (qo, l) in again {
        q.restore_redeliver(qo, l);
    }
    for a in acked {
        q.restore_acked(a);
    }
    q.account_for_gaps();
    Some(q)
}

/// Consumer progress saved ahead of what recovery kept (the log's tail was
/// lost, so its queues are shorter) is cut back to the queues: new messages
/// take those queue offsets again and must not be taken for acked ones.
pub(crate) fn cut_progress_to_queues(
    store: &Store,
    groups: &HashMap<GroupKey, Arc<Mutex<GroupTopic>>>,
) {
    let len = |topic: &str, qid: usize| {
        store
            .queue(topic, qid as u32)
            .map_or(0, |q| q.next_offset())
    };
    for ((group, topic), gt) in groups {
        let mut g = lock(gt);
        let rt = retry_topic(group, topic);
        let mut cut = false;
        for (qid, p) in g.queues.iter_mut().enumerate() {
            cut |= p.truncate_to(len(topic, qid));
        }
        for (level, p) in g.retry.iter_mut().enumerate() {
            cut |= p.truncate_to(len(&rt, level));
        }
        if cut {
            tracing::error!(group, topic, "consumer progress was ahead of the recovered consume queues (the commit log lost its tail); cut back: messages there will be delivered again");
            g.dirty = true;
        }
    }
}

/// Consumer progress as last saved. After an unclean stop (`clean_stop`
/// false) every restored lease is flagged: see
/// [`QueueProgress::after_unclean_stop`].
/// Consumer progress as a start (or a new leader) takes it up: the declared
/// consumer groups, every group's progress from sled (leases flagged as cut
/// off by a crash unless `clean_stop`), FIFO groups with empty gates, and
/// progress cut back to the consume queues.
///
/// # Errors
/// Storage errors reading sled.
pub(crate) fn load_progress(
    store: &Store,
    clean_stop: bool,
) -> Result<(Groups, HashMap<String, bool>), BrokerError> {
    let consumer_groups = super::groups::load_consumer_groups(store)?;
    let mut groups = load_groups(store, clean_stop)?;
    for ((g, _), gt) in groups.iter_mut() {
        if consumer_groups.get(g) == Some(&true) {
            let mut gt = lock(gt);
            let n = gt.queues.len();
            gt.fifo = Some(vec![super::fifo::FifoGate::default(); n]);
        }
    }
    cut_progress_to_queues(store, &groups);
    Ok((groups, consumer_groups))
}

pub(crate) fn load_groups(
    store: &Store,
    clean_stop: bool,
) -> Result<HashMap<GroupKey, Arc<Mutex<GroupTopic>>>, BrokerError> {
    let mut map: HashMap<GroupKey, GroupTopic> = HashMap::default();
    for (k, v) in store.meta().scan_prefix(GROUPS_SPACE, b"")? {
        let parts: Vec<&[u8]> = k.splitn(3, |b| *b == 0).collect();
        let (Some(g), Some(t), Some(q)) = (parts.first(), parts.get(1), parts.get(2)) else {
            continue;
        };
        let (Ok(g), Ok(t), Ok(q)) = (
            std::str::from_utf8(g),
            std::str::from_utf8(t),
            <[u8; 4]>::try_from(*q).map(u32::from_be_bytes),
        ) else {
            continue;
        };
        let Some(mut progress) = decode_progress(&v) else {
            tracing::error!(
                group = g,
                topic = t,
                queue_id = q,
                "unreadable consumer progress; starting over"
            );
            continue;
        };
        if !clean_stop {
            progress.after_unclean_stop();
        }
        let gt = map.entry((g.to_owned(), t.to_owned())).or_default();
        let (list, idx) = if q & RETRY_QUEUE_BIT != 0 {
            (&mut gt.retry, (q & !RETRY_QUEUE_BIT) as usize)
        } else {
            (&mut gt.queues, q as usize)
        };
        while list.len() <= idx {
            list.push(QueueProgress::starting_at(0));
        }
        list[idx] = progress;
    }
    Ok(map
        .into_iter()
        .map(|(k, v)| (k, Arc::new(Mutex::new(v))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_snapshot_round_trip() {
        let mut p = QueueProgress::starting_at(10);
        let a = p.next_delivery(0, 100, 20, 100, 100).unwrap();
        let b = p.next_delivery(0, 100, 20, 100, 100).unwrap();
        p.ack(b.queue_offset, b.lease.seq).unwrap();
        let q = decode_progress(&encode_progress(&p)).unwrap();
        assert_eq!(q.ack_offset(), 10);
        assert_eq!(q.inflight(), 1);
        assert_eq!(q.acked().collect::<Vec<_>>(), vec![11]);
        assert_eq!(q.leases().next().unwrap().0, a.queue_offset);
        assert!(decode_progress(&[1, 2, 3]).is_none());
    }

    #[test]
    fn progress_snapshot_keeps_seqs_crash_flags_and_queued_redeliveries() {
        let mut p = QueueProgress::starting_at(0);
        let a = p.next_delivery(0, 100, 20, 100, 100).unwrap();
        let b = p.next_delivery(0, 100, 20, 100, 100).unwrap();
        let c = p.next_delivery(0, 300, 20, 100, 100).unwrap();
        // Round trip through an unclean stop: every lease is flagged, and
        // one expires into the redelivery queue.
        let mut q = decode_progress(&encode_progress(&p)).unwrap();
        q.after_unclean_stop();
        assert!(q.take_expired(100, 10).is_empty());
        assert_eq!(q.redeliver_count(), 2);
        let q2 = decode_progress(&encode_progress(&q)).unwrap();
        assert_eq!(q2, q, "seqs, flags, queue and counter all survive");
        assert_eq!(
            q2.leases().collect::<Vec<_>>(),
            vec![(
                c.queue_offset,
                crate::core::delivery::Lease {
                    restored_after_crash: true,
                    ..c.lease
                }
            )]
        );
        assert_eq!(
            q2.redeliveries().map(|(o, _)| o).collect::<Vec<_>>(),
            vec![a.queue_offset, b.queue_offset]
        );
        // Torn or extended snapshots are refused, not half read.
        let full = encode_progress(&q);
        assert!(decode_progress(&full[..full.len() - 1]).is_none());
        let mut longer = full.clone();
        longer.push(0);
        assert!(decode_progress(&longer).is_none());
    }

    #[test]
    fn older_progress_snapshots_still_load() {
        // The layout before sequence numbers were saved: one lease at 3.
        let mut v = Vec::new();
        v.extend_from_slice(&2u64.to_le_bytes()); // ack_offset
        v.extend_from_slice(&1u32.to_le_bytes()); // acked count
        v.extend_from_slice(&4u64.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes()); // lease count
        v.extend_from_slice(&3u64.to_le_bytes());
        v.extend_from_slice(&900u64.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&800u64.to_le_bytes());
        let q = decode_progress(&v).unwrap();
        assert_eq!(
            (q.ack_offset(), q.next_offset(), q.acked_count()),
            (2, 5, 1)
        );
        let (qo, l) = q.leases().next().unwrap();
        assert_eq!((qo, l.invisible_until_ms, l.reconsume_times), (3, 900, 1));
        assert!(
            l.seq > crate::core::delivery::SEQ_GAP_AFTER_CRASH,
            "past any handle an older broker gave out"
        );
        assert!(decode_progress(&v[..v.len() - 1]).is_none());
    }
}
