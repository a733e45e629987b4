//! Failed deliveries: retry queues with delay levels, and dead-letter queues.
//!
//! # What is written
//! A failed delivery (a nack, or an invisible duration that expired) appends
//! one small `Redelivery` record (no body) pointing at the record that holds
//! the body, then acks the failed offset so the group's consumer offset moves
//! on. The record goes to
//! - `%RETRY%<group>%<topic>`, queue id = delay level (0-based): each level
//!   is a FIFO queue whose entries fall due in append order; or
//! - `%DLQ%<group>` (queue 0) once `max_reconsume_times` is used up.
//!
//! Its properties: `halfmq.deliver_at_ms`, `halfmq.reason`,
//! `halfmq.first_delivery_ms`, `halfmq.last_delivery_ms`, `halfmq.topic`
//! (the original topic). Its `reconsume_times` is the new count, its message
//! id the original's. Scheduled retries therefore live in the commit log:
//! they survive kill -9 per the flush policy, cost memory only per level, and
//! fire at start-up when due.
//!
//! The removal state of each group's DLQ is `dlq::DlqState`.

use foldhash::HashMap;
use std::sync::Mutex;

use halfmq_storage::{MessageId, Record, RecordKind};

use crate::core::delivery::Lease;
use crate::core::dlq::lock;
use crate::core::names::check_group;
use crate::core::props::{
    prop, prop_u64, DELIVER_AT_PROPERTY, FIRST_DELIVERY_PROPERTY, LAST_DELIVERY_PROPERTY,
    ORIGIN_PROPERTY, REASON_PROPERTY, TOPIC_PROPERTY,
};
use crate::core::retry::{RetryPolicy, Step};
use crate::core::{Broker, GroupTopic};
use crate::error::BrokerError;

/// Saved queue ids of retry levels carry this bit.
pub const RETRY_QUEUE_BIT: u32 = 0x8000_0000;

/// The retry topic of (group, topic).
pub fn retry_topic(group: &str, topic: &str) -> String {
    format!("%RETRY%{group}%{topic}")
}

/// The dead-letter topic of a group.
pub fn dlq_topic(group: &str) -> String {
    format!("%DLQ%{group}")
}

/// The (queue id, queue offset) a message had in its topic, as a
/// Redelivery record carries it (records of older brokers do not).
pub fn origin(r: &Record) -> Option<(u32, u64)> {
    let (q, o) = prop(r, ORIGIN_PROPERTY)?.split_once(':')?;
    Some((q.parse().ok()?, o.parse().ok()?))
}

fn origin_property(origin: (u32, u64)) -> (String, String) {
    (
        ORIGIN_PROPERTY.to_owned(),
        format!("{}:{}", origin.0, origin.1),
    )
}

/// When a Redelivery record falls due.
pub fn deliver_at_ms(r: &Record) -> u64 {
    prop_u64(r, DELIVER_AT_PROPERTY)
}

/// A delivery that failed, with what is needed to schedule its retry.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    /// Where the failed delivery came from: `None` = the topic's queue
    /// `queue_id`, `Some(level)` = that retry level.
    pub retry_level: Option<u32>,
    pub queue_id: u32,
    pub queue_offset: u64,
    pub lease: Lease,
    pub reason: String,
    pub custom_delay_ms: Option<u64>,
    /// Straight to the DLQ, whatever retries are left (a consumer that
    /// forwards it there: RocketMQ's ForwardMessageToDeadLetterQueue).
    pub dead_letter: bool,
}

impl Failure {
    /// What follows this failure under `policy`.
    fn step(&self, policy: &RetryPolicy) -> Step {
        if self.dead_letter {
            Step::DeadLetter
        } else {
            policy.after_failure(self.lease.reconsume_times, self.custom_delay_ms)
        }
    }
}

/// The record holding a failed delivery's body and where it is.
struct FailedOriginal {
    record: Record,
    /// Its physical offset and size, for the Redelivery record's reference.
    offset: u64,
    size: u32,
    /// First delivery to the group, ms since the epoch.
    first_delivery_ms: u64,
    /// (queue id, queue offset) in its topic, when known.
    origin: Option<(u32, u64)>,
}

/// A dead-lettered message, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// Message id.
    pub message_id: MessageId,
    /// Original topic.
    pub topic: String,
    /// Failed deliveries.
    pub reconsume_times: u32,
    /// The consumer's last failure reason.
    pub reason: String,
    /// First delivery to the group, ms since the epoch.
    pub first_delivery_ms: u64,
    /// Last failed delivery, ms since the epoch.
    pub last_delivery_ms: u64,
    /// Position in the DLQ (of the first copy).
    pub dlq_offset: u64,
    /// DLQ entries holding this message id (see [`Broker::dead_letters`]).
    pub copies: u32,
    /// The (queue id, queue offset) it had in its topic, when the DLQ record
    /// says (older brokers' do not).
    pub origin: Option<(u32, u64)>,
    /// Body, tag, keys and user properties, when asked for (see
    /// [`Broker::dead_letters`]).
    pub content: Option<DeadLetterContent>,
    /// Asked for with bodies, but left out to keep the listing within its
    /// byte budget.
    pub body_omitted: bool,
}

/// What a dead letter carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterContent {
    /// Body.
    pub body: bytes::Bytes,
    /// Tag.
    pub tag: String,
    /// Keys.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: Vec<(String, String)>,
}

impl Broker {
    /// The record holding the body of a failed delivery, and where it is.
    fn failed_original(
        &self,
        group: &str,
        topic: &str,
        f: &Failure,
    ) -> Result<FailedOriginal, BrokerError> {
        match f.retry_level {
            None => {
                let m = self.store().read_queue(topic, f.queue_id, f.queue_offset)?;
                let size = m.record.encoded_len() as u32;
                Ok(FailedOriginal {
                    record: m.record,
                    offset: m.physical_offset,
                    size,
                    first_delivery_ms: f.lease.delivered_ms,
                    origin: Some((f.queue_id, f.queue_offset)),
                })
            }
            Some(level) => {
                let r = self
                    .store()
                    .read_queue(&retry_topic(group, topic), level, f.queue_offset)?
                    .record;
                let (offset, size) = (r.ref_offset.unwrap_or(u64::MAX), r.ref_size);
                Ok(FailedOriginal {
                    record: self.store().log().read_sized(offset, size)?,
                    offset,
                    size,
                    first_delivery_ms: prop_u64(&r, FIRST_DELIVERY_PROPERTY),
                    origin: origin(&r),
                })
            }
        }
    }

    /// Schedules a retry (or the DLQ) for each failure with one durable
    /// append, then marks the failed offsets done. If the append fails the
    /// leases are put back (nothing is lost) and the error returned. A
    /// failure whose message can no longer be read (retention, corruption)
    /// is logged and dropped.
    pub(crate) async fn hand_off_failures(
        &self,
        group: &str,
        topic: &str,
        gt: &Mutex<GroupTopic>,
        failures: Vec<Failure>,
    ) -> Result<(), BrokerError> {
        if failures.is_empty() {
            return Ok(());
        }
        let now = self.now_ms();
        let policy = self.retry_policy();
        let failures = retry_fifo_in_place(gt, failures, now, policy);
        if failures.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(failures.len());
        let mut unreadable = Vec::new();
        let mut scheduled = Vec::new();
        for f in failures {
            let FailedOriginal {
                record: orig,
                offset: ref_offset,
                size: ref_size,
                first_delivery_ms: first_ms,
                origin: original_qo,
            } = match self.failed_original(group, topic, &f) {
                Ok(x) => x,
                Err(e) => {
                    tracing::error!(group, topic, queue_offset = f.queue_offset, error = %e,
                        "failed message unreadable; it cannot be retried");
                    unreadable.push(f);
                    continue;
                }
            };
            let reconsume_times = f.lease.reconsume_times + 1;
            let (dest, queue_id, deliver_at) = match f.step(policy) {
                Step::Retry { level, delay_ms } => {
                    (retry_topic(group, topic), level, now + delay_ms)
                }
                Step::DeadLetter => {
                    tracing::warn!(group, topic, message_id = %orig.message_id, reconsume_times,
                        reason = %f.reason, "message moved to the dead-letter queue");
                    (dlq_topic(group), 0, 0)
                }
            };
            records.push(Record {
                kind: RecordKind::Redelivery,
                topic: dest,
                queue_id,
                ref_offset: Some(ref_offset),
                ref_size,
                message_id: orig.message_id,
                tag: orig.tag,
                reconsume_times,
                properties: vec![
                    (DELIVER_AT_PROPERTY.to_owned(), deliver_at.to_string()),
                    (REASON_PROPERTY.to_owned(), f.reason.clone()),
                    (FIRST_DELIVERY_PROPERTY.to_owned(), first_ms.to_string()),
                    (
                        LAST_DELIVERY_PROPERTY.to_owned(),
                        f.lease.delivered_ms.to_string(),
                    ),
                    (TOPIC_PROPERTY.to_owned(), topic.to_owned()),
                ]
                .into_iter()
                .chain(original_qo.map(origin_property))
                .chain(super::handoff::source_properties(
                    group,
                    f.retry_level,
                    f.queue_id,
                    f.queue_offset,
                ))
                .collect(),
                ..Record::default()
            });
            scheduled.push(f);
        }
        let written = if records.is_empty() {
            Ok(())
        } else if self.replication().is_some() {
            self.replicate(records).await.map(|_| ())
        } else {
            match self.store().append(records) {
                Ok(r) => self.wait_durable(r.end).await,
                Err(e) => Err(e.into()),
            }
        };
        let mut g = lock(gt);
        for f in unreadable {
            if let Some(p) = g.progress_mut(f.retry_level, f.queue_id) {
                p.skip(f.queue_offset);
            }
        }
        match &written {
            Ok(()) => {
                for f in &scheduled {
                    if let Some(p) = g.progress_mut(f.retry_level, f.queue_id) {
                        p.skip(f.queue_offset);
                    }
                }
            }
            Err(e) => {
                tracing::error!(group, topic, error = %e, "could not schedule retries; leases restored");
                for f in &scheduled {
                    if let Some(p) = g.progress_mut(f.retry_level, f.queue_id) {
                        p.restore_lease(f.queue_offset, f.lease);
                    }
                }
            }
        }
        g.dirty = true;
        written
    }

    /// Live DLQ entries, oldest first, one per message id: a message can be
    /// dead-lettered twice after a kill -9 (the hand-off was durable, the
    /// ack of the failed offset not yet); the copies of one message id are
    /// listed once and removed together.
    pub(crate) fn dlq_live(&self, group: &str) -> Vec<(Vec<u64>, Record)> {
        let topic = dlq_topic(group);
        let max = self.store().max_queue_offset(&topic, 0);
        let removed = lock(&self.dlq_state().removed)
            .get(group)
            .cloned()
            .unwrap_or_default();
        let start = removed
            .ack_offset()
            .max(self.store().queue(&topic, 0).map_or(0, |q| q.min_offset()));
        let mut out: Vec<(Vec<u64>, Record)> = Vec::new();
        let mut index: HashMap<MessageId, usize> = HashMap::default();
        for qo in (start..max).filter(|qo| !removed.is_done(*qo)) {
            let Ok(m) = self.store().read_queue(&topic, 0, qo) else {
                continue;
            };
            match index.get(&m.record.message_id) {
                Some(&i) => out[i].0.push(qo),
                None => {
                    index.insert(m.record.message_id, out.len());
                    out.push((vec![qo], m.record));
                }
            }
        }
        out
    }

    /// The live entries of a group's dead-letter queue, oldest first, at
    /// most `limit`; only the one with `message_id` when given. With
    /// `with_bodies`, each carries its body, tag, keys and user properties,
    /// up to `max_batch_bytes` of bodies in all: later ones are marked
    /// `body_omitted` (ask for them by message id). A body that cannot be
    /// read (retention, corruption) is left out and logged.
    ///
    /// # Errors
    /// Invalid group name.
    pub fn dead_letters(
        &self,
        group: &str,
        limit: usize,
        with_bodies: bool,
        message_id: Option<MessageId>,
    ) -> Result<Vec<DeadLetter>, BrokerError> {
        check_group(group)?;
        let mut budget = self.config().max_batch_bytes;
        Ok(self
            .dlq_live(group)
            .into_iter()
            .filter(|(_, r)| message_id.is_none_or(|id| r.message_id == id))
            .take(limit)
            .map(|(qos, r)| {
                let mut body_omitted = false;
                let content = if !with_bodies {
                    None
                } else {
                    let orig = self
                        .store()
                        .log()
                        .read_sized(r.ref_offset.unwrap_or(u64::MAX), r.ref_size);
                    match orig {
                        Ok(o) if o.body.len() as u64 <= budget => {
                            budget -= o.body.len() as u64;
                            Some(DeadLetterContent {
                                body: o.body,
                                tag: o.tag,
                                keys: o.keys,
                                properties: crate::core::transactions::user_properties(o.properties),
                            })
                        }
                        Ok(_) => {
                            body_omitted = true;
                            None
                        }
                        Err(e) => {
                            tracing::error!(group, message_id = %r.message_id, error = %e, "dead letter's body unreadable");
                            None
                        }
                    }
                };
                DeadLetter {
                    message_id: r.message_id,
                    topic: prop(&r, TOPIC_PROPERTY).unwrap_or("").to_owned(),
                    reconsume_times: r.reconsume_times,
                    reason: prop(&r, REASON_PROPERTY).unwrap_or("").to_owned(),
                    first_delivery_ms: prop_u64(&r, FIRST_DELIVERY_PROPERTY),
                    last_delivery_ms: prop_u64(&r, LAST_DELIVERY_PROPERTY),
                    dlq_offset: qos[0],
                    copies: qos.len() as u32,
                    origin: origin(&r),
                    content,
                    body_omitted,
                }
            })
            .collect())
    }

    /// (group, live dead letters) for every group with a DLQ.
    pub fn dead_letter_counts(&self) -> Vec<(String, u64)> {
        self.store()
            .queues()
            .into_iter()
            .filter_map(|(t, q)| {
                (q == 0)
                    .then(|| t.strip_prefix("%DLQ%").map(str::to_owned))
                    .flatten()
            })
            .map(|g| {
                let live = self.dlq_live(&g).len() as u64;
                (g, live)
            })
            .collect()
    }

    /// Sends dead letters back to their group as fresh deliveries (reconsume
    /// times reset): one by message id, or all. Returns how many.
    ///
    /// # Errors
    /// Invalid group name; storage errors (nothing is removed from the DLQ then).
    pub async fn redrive(
        &self,
        group: &str,
        message_id: Option<MessageId>,
    ) -> Result<usize, BrokerError> {
        check_group(group)?;
        let now = self.now_ms();
        let level0_ms = self.retry_policy().delays_ms.first().copied().unwrap_or(0);
        let chosen: Vec<(Vec<u64>, Record)> = self
            .dlq_live(group)
            .into_iter()
            .filter(|(_, r)| message_id.is_none_or(|id| r.message_id == id))
            .collect();
        if chosen.is_empty() {
            return Ok(0);
        }
        let mut topics = std::collections::BTreeSet::new();
        let records: Vec<Record> = chosen
            .iter()
            .map(|(_, r)| {
                let topic = prop(r, TOPIC_PROPERTY).unwrap_or("").to_owned();
                topics.insert(topic.clone());
                Record {
                    kind: RecordKind::Redelivery,
                    topic: retry_topic(group, &topic),
                    queue_id: 0,
                    ref_offset: r.ref_offset,
                    ref_size: r.ref_size,
                    message_id: r.message_id,
                    tag: r.tag.clone(),
                    reconsume_times: 0,
                    properties: vec![
                        // Level 0 is FIFO by due time: a redriven message falls due after its delay.
                        (
                            DELIVER_AT_PROPERTY.to_owned(),
                            (now + level0_ms).to_string(),
                        ),
                        (REASON_PROPERTY.to_owned(), String::new()),
                        (FIRST_DELIVERY_PROPERTY.to_owned(), "0".into()),
                        (LAST_DELIVERY_PROPERTY.to_owned(), "0".into()),
                        (TOPIC_PROPERTY.to_owned(), topic),
                    ]
                    .into_iter()
                    .chain(origin(r).map(origin_property))
                    .collect(),
                    ..Record::default()
                }
            })
            .collect();
        if self.replication().is_some() {
            // The removal goes with the redriven messages, in one entry.
            let mut records = records;
            records.push(super::group_admin::dlq_removal_for(group, &chosen));
            self.replicate(records).await?;
        } else {
            let r = self.store().append(records)?;
            self.wait_durable(r.end).await?;
        }
        {
            let mut removed = lock(&self.dlq_state().removed);
            let p = removed.entry(group.to_owned()).or_default();
            for qo in chosen.iter().flat_map(|(qos, _)| qos) {
                p.skip(*qo);
            }
        }
        for t in topics {
            self.notify_topic(&t);
        }
        tracing::info!(group, count = chosen.len(), "dead letters redriven");
        Ok(chosen.len())
    }

    /// Removes every live entry of a group's DLQ. Returns how many.
    ///
    /// # Errors
    /// Invalid group name.
    pub fn purge_dead_letters(&self, group: &str) -> Result<usize, BrokerError> {
        check_group(group)?;
        let live = self.dlq_live(group);
        let mut removed = lock(&self.dlq_state().removed);
        let p = removed.entry(group.to_owned()).or_default();
        for qo in live.iter().flat_map(|(qos, _)| qos) {
            p.skip(*qo);
        }
        tracing::info!(group, count = live.len(), "dead letters purged");
        Ok(live.len())
    }
}

/// A FIFO consumer group retries a failed message of its queues in place
/// (`fifo.rs`): it waits in its queue, due after the retry delay, ahead of
/// the later messages of its message group, instead of going to the retry
/// topic. Returns the failures left to hand off: retry levels, messages past
/// `max_reconsume_times` (to the DLQ), and every failure of an ordinary
/// group.
fn retry_fifo_in_place(
    gt: &Mutex<GroupTopic>,
    failures: Vec<Failure>,
    now_ms: u64,
    policy: &RetryPolicy,
) -> Vec<Failure> {
    let mut g = lock(gt);
    let gg = &mut *g;
    let Some(gates) = gg.fifo.as_mut() else {
        return failures;
    };
    let mut rest = Vec::new();
    for f in failures {
        let qid = f.queue_id as usize;
        let step = f.step(policy);
        match (
            f.retry_level,
            step,
            gg.queues.get_mut(qid),
            gates.get_mut(qid),
        ) {
            (None, Step::Retry { delay_ms, .. }, Some(p), Some(gate)) => {
                gate.retry_in_place(
                    p,
                    f.queue_offset,
                    f.lease.reconsume_times + 1,
                    f.lease.delivered_ms,
                    now_ms + delay_ms,
                );
                gg.dirty = true;
            }
            _ => rest.push(f),
        }
    }
    rest
}
