//! Operator actions on topics and consumer groups: consumer-offset reset and
//! topic deletion. Both are rare, take locks for a while and may fdatasync,
//! so callers run them off the async workers (`spawn_blocking`).

use std::sync::Arc;

use crate::core::names::{check_group, check_topic};
use crate::core::progress::{GroupKey, GroupTopic, GROUPS_SPACE};
use crate::core::redelivery::retry_topic;
use crate::core::topics::{TopicState, TOPICS_SPACE};
use crate::core::Broker;
use crate::error::BrokerError;

/// Where [`Broker::reset_offset`] moves a group's consumer offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The earliest retained message of each queue.
    Earliest,
    /// The end of each queue: only messages sent from now on are delivered.
    Latest,
    /// The first message of each queue stored at or after this time (broker
    /// clock, ms since the epoch); the end of the queue when there is none.
    Timestamp(u64),
}

impl Broker {
    /// Moves `group`'s consumer offsets on `topic` as `to` says and saves
    /// them at once. Its in-flight deliveries of the topic are dropped (their
    /// receipt handles go stale); scheduled retries are kept. A group that
    /// never consumed the topic is created at those offsets. Returns (queue
    /// id, new consumer offset) per queue.
    ///
    /// # Errors
    /// Invalid names, [`BrokerError::TopicNotFound`], storage errors (the
    /// offsets are moved in memory then, and saved at the next checkpoint).
    pub fn reset_offset(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<(u32, u64)>, BrokerError> {
        check_group(group)?;
        check_topic(topic)?;
        let t = self
            .topic(topic)
            .ok_or_else(|| BrokerError::TopicNotFound(topic.to_owned()))?;
        let targets: Vec<(u32, u64)> = (0..t.queues)
            .map(|qid| (qid, self.reset_target(topic, qid, to)))
            .collect();
        let gt = self.group_topic(group, topic, t.queues)?;
        {
            let mut g = crate::core::lock(&gt);
            for &(qid, offset) in &targets {
                if let Some(p) = g.queues.get_mut(qid as usize) {
                    p.reset_to(offset);
                }
                if let Some(gate) = g.fifo.as_mut().and_then(|f| f.get_mut(qid as usize)) {
                    gate.reset();
                }
            }
            g.dirty = true;
            self.save_group(group, topic, &mut g)?;
        }
        self.store().meta().flush()?;
        self.notify_topic(topic);
        tracing::info!(group, topic, ?to, offsets = ?targets, "consumer offsets reset");
        Ok(targets)
    }

    /// The queue offset [`ResetTo`] names in one queue.
    fn reset_target(&self, topic: &str, queue_id: u32, to: ResetTo) -> u64 {
        let min = self
            .store()
            .queue(topic, queue_id)
            .map_or(0, |q| q.min_offset());
        let end = self.store().max_queue_offset(topic, queue_id).max(min);
        match to {
            ResetTo::Earliest => min,
            ResetTo::Latest => end,
            ResetTo::Timestamp(ts) => {
                // Store times grow with queue offsets (one broker clock,
                // appends in order), so the first one at or after `ts` is
                // found by bisection. An unreadable entry counts as older:
                // the search moves past it.
                let (mut lo, mut hi) = (min, end);
                while lo < hi {
                    let mid = lo + (hi - lo) / 2;
                    let older = self
                        .store()
                        .read_queue(topic, queue_id, mid)
                        .map_or(true, |m| m.record.store_timestamp_ms < ts);
                    if older {
                        lo = mid + 1;
                    } else {
                        hi = mid;
                    }
                }
                lo
            }
        }
    }

    /// Deletes a topic: its consume queues, and every consumer group's
    /// progress and retry queues on it; its commit-log records stay until
    /// retention deletes their segments, and its dead letters stay in their
    /// groups' DLQs. A send to it afterwards creates it anew (when
    /// `auto_create_topics`), with queue offsets from 0.
    ///
    /// # Errors
    /// Invalid or reserved name, [`BrokerError::TopicNotFound`],
    /// [`BrokerError::TopicBusy`] while half messages or delayed messages of
    /// it are pending, storage errors.
    pub fn delete_topic(&self, name: &str) -> Result<(), BrokerError> {
        check_topic(name)?;
        self.delete_topic_if(name, None).map(|_| ())
    }

    /// Removes topic `name` that a refused send auto-created, if nothing
    /// used it meanwhile: the topic is still `ours`, no other request holds
    /// it (a send about to append, a long poll), and its queues are empty.
    /// Returns whether it was removed.
    ///
    /// # Errors
    /// Metadata and storage errors.
    pub(crate) fn remove_unused_topic(
        &self,
        name: &str,
        ours: &Arc<TopicState>,
    ) -> Result<bool, BrokerError> {
        self.delete_topic_if(name, Some(ours))
    }

    fn delete_topic_if(
        &self,
        name: &str,
        unused: Option<&Arc<TopicState>>,
    ) -> Result<bool, BrokerError> {
        let _saving = crate::core::lock(&self.progress_lock);
        {
            let mut topics = self.topics_mut();
            let Some(t) = topics.get(name) else {
                return match unused {
                    None => Err(BrokerError::TopicNotFound(name.to_owned())),
                    Some(_) => Ok(false),
                };
            };
            if let Some(ours) = unused {
                // The map's reference and the caller's: nobody else holds it.
                let untouched = Arc::ptr_eq(t, ours)
                    && Arc::strong_count(ours) == 2
                    && (0..t.queues).all(|q| self.store().max_queue_offset(name, q) == 0);
                if !untouched {
                    return Ok(false);
                }
            }
            let (halves, delayed) = self.tx_state().pending_in_topic(name);
            if halves + delayed > 0 {
                return Err(BrokerError::TopicBusy(format!(
                    "topic {name} has {halves} pending half messages and {delayed} delayed messages: \
                     resolve them (halfmq tx pending / tx end) or wait until they are delivered, then delete it"
                )));
            }
            if let Some(t) = topics.remove(name) {
                t.wake_all();
            }
            self.store().meta().remove(TOPICS_SPACE, name.as_bytes())?;
        }
        let groups: Vec<(GroupKey, Arc<std::sync::Mutex<GroupTopic>>)> =
            self.remove_groups_of(name);
        let mut queues = vec![name.to_owned()];
        for ((group, _), _) in &groups {
            queues.push(retry_topic(group, name));
        }
        for (k, _) in self.store().meta().scan_prefix(GROUPS_SPACE, b"")? {
            let mut parts = k.splitn(3, |b| *b == 0);
            let _group = parts.next();
            if parts.next() == Some(name.as_bytes()) {
                self.store().meta().remove(GROUPS_SPACE, &k)?;
            }
        }
        self.store().meta().flush()?;
        let n = self.store().delete_queues(&queues)?;
        tracing::info!(
            topic = name,
            groups = groups.len(),
            consume_queues = n,
            auto_created_unused = unused.is_some(),
            "topic deleted"
        );
        Ok(true)
    }
}
