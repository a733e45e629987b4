//! Sends: validation of a batch into records, queue choice, message ids,
//! the append and its durability wait.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use halfmq_storage::{MessageId, Record, RecordKind};

use super::fifo;
use super::idempotence::RecordMeta;
use super::names::{
    check_message_fields, check_topic, MAX_CLIENT_FIELD_BYTES, MAX_IDEMPOTENCY_KEY_BYTES,
    MAX_MESSAGE_GROUP_BYTES,
};
use super::props::{
    client_property, CLIENT_PROPERTY, IDEMPOTENCY_KEY_PROPERTY, MESSAGE_GROUP_PROPERTY,
};
use super::replicated::{first_send, topic_record};
use super::topics::TopicState;
use super::types::{OutgoingMessage, QueueChoice, SendReceipt};
use super::Broker;
use crate::cluster::types::Outcome;
use crate::error::BrokerError;

impl Broker {
    pub(crate) fn next_message_id(&self) -> MessageId {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.id_prefix.to_be_bytes());
        id[8..].copy_from_slice(&n.to_be_bytes());
        MessageId(id)
    }

    /// Validates a batch and turns it into records (no I/O but topic
    /// creation). The returned [`TopicsInUse`] holds the batch's topics until
    /// the records are appended; dropped without [`TopicsInUse::stored`], it
    /// removes the topics this batch auto-created if nothing else used them.
    pub(crate) fn build_records(
        &self,
        msgs: Vec<OutgoingMessage>,
        kind: RecordKind,
    ) -> Result<(Vec<Record>, TopicsInUse<'_>), BrokerError> {
        if msgs.is_empty() {
            return Err(BrokerError::BadRequest("no messages".into()));
        }
        if msgs.len() > self.cfg.max_batch_messages as usize {
            return Err(BrokerError::BatchTooLarge(format!(
                "{} messages exceeds max_batch_messages {}",
                msgs.len(),
                self.cfg.max_batch_messages
            )));
        }
        let total: u64 = msgs.iter().map(|m| m.body.len() as u64).sum();
        if total > self.cfg.max_batch_bytes {
            return Err(BrokerError::BatchTooLarge(format!(
                "{total} body bytes exceeds max_batch_bytes {}",
                self.cfg.max_batch_bytes
            )));
        }
        let now = self.clock.now_ms();
        let mut records = Vec::with_capacity(msgs.len());
        let mut in_use = TopicsInUse {
            broker: self,
            held: Vec::new(),
            created: Vec::new(),
        };
        for mut m in msgs {
            check_topic(&m.topic)?;
            if let Some(o) = &m.origin {
                if o.client_id.len() > MAX_CLIENT_FIELD_BYTES
                    || o.born_host.len() > MAX_CLIENT_FIELD_BYTES
                    || o.client_id.contains('\n')
                    || o.born_host.contains('\n')
                {
                    return Err(BrokerError::BadRequest(format!(
                        "a client id and a born host are at most {MAX_CLIENT_FIELD_BYTES} bytes, on one line"
                    )));
                }
                // The client's message id is the send's identity.
                m.idempotency_key = Some(o.message_id.clone());
            }
            if m.body.len() as u64 > self.cfg.max_message_bytes {
                return Err(BrokerError::MessageTooLarge {
                    size_bytes: m.body.len() as u64,
                    limit_bytes: self.cfg.max_message_bytes,
                });
            }
            check_message_fields(&m.tag, &m.keys, &m.properties)?;
            if let Some(k) = &m.idempotency_key {
                if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
                    return Err(BrokerError::BadRequest(format!(
                        "an idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_BYTES} bytes, not {}",
                        k.len()
                    )));
                }
            }
            let topic = match in_use.held.iter().find(|(n, _)| *n == m.topic) {
                Some((_, t)) => Arc::clone(t),
                None => {
                    let t = match self.topic(&m.topic) {
                        Some(t) => t,
                        None if self.cfg.auto_create_topics => {
                            let t = self.create_topic_unchecked(&m.topic, 0, false)?;
                            in_use.created.push(m.topic.clone());
                            t
                        }
                        None => return Err(BrokerError::TopicNotFound(m.topic)),
                    };
                    in_use.held.push((m.topic.clone(), Arc::clone(&t)));
                    t
                }
            };
            if let Some(g) = &m.message_group {
                if g.is_empty() || g.len() > MAX_MESSAGE_GROUP_BYTES {
                    return Err(BrokerError::BadRequest(format!(
                        "a message group must be 1 to {MAX_MESSAGE_GROUP_BYTES} bytes, not {}",
                        g.len()
                    )));
                }
            }
            let queue_id = match &m.queue {
                QueueChoice::Id(q) if *q < topic.queues => *q,
                QueueChoice::Id(q) => {
                    return Err(BrokerError::InvalidQueueId {
                        topic: m.topic,
                        queue_id: *q,
                        queues: topic.queues,
                    })
                }
                QueueChoice::Key(k) => {
                    (halfmq_storage::tag_hash(k) % u64::from(topic.queues)) as u32
                }
                QueueChoice::RoundRobin => match &m.message_group {
                    // A message group stays in one queue, in send order.
                    Some(g) => (fifo::group_hash(g) % u64::from(topic.queues)) as u32,
                    None => topic.round_robin.fetch_add(1, Ordering::Relaxed) % topic.queues,
                },
            };
            let mut properties = m.properties;
            if let Some(k) = m.idempotency_key {
                properties.push((IDEMPOTENCY_KEY_PROPERTY.to_owned(), k));
            }
            if let Some(g) = m.message_group {
                properties.push((MESSAGE_GROUP_PROPERTY.to_owned(), g));
            }
            if let Some(o) = &m.origin {
                properties.push((CLIENT_PROPERTY.to_owned(), client_property(o)));
            }
            let mut kind = kind;
            if m.delay_ms > 0 {
                if kind != RecordKind::Normal {
                    return Err(BrokerError::BadRequest(
                        "delay_ms applies to ordinary sends only".into(),
                    ));
                }
                if m.delay_ms > self.cfg.max_delay_ms {
                    return Err(BrokerError::BadRequest(format!(
                        "delay_ms {} exceeds max_delay_ms {}",
                        m.delay_ms, self.cfg.max_delay_ms
                    )));
                }
                // Stored like a half of the system producer group %DELAY%,
                // committed by the check driver when due (transactions.rs).
                kind = RecordKind::Half;
                properties.push((
                    crate::core::transactions::PRODUCER_GROUP_PROPERTY.to_owned(),
                    crate::core::transactions::DELAY_GROUP.to_owned(),
                ));
                properties.push((
                    crate::core::transactions::DELIVER_AT_PROPERTY.to_owned(),
                    (now + m.delay_ms).to_string(),
                ));
            }
            records.push(Record {
                kind,
                queue_id,
                store_timestamp_ms: now,
                message_id: self.next_message_id(),
                topic: m.topic,
                tag: m.tag,
                keys: m.keys,
                properties,
                body: m.body,
                ..Record::default()
            });
        }
        Ok((records, in_use))
    }

    /// Stores a batch of messages, all or nothing, and returns once they are
    /// durable per the flush policy.
    ///
    /// # Errors
    /// Validation errors (nothing stored), storage errors.
    pub async fn send(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<SendReceipt>, BrokerError> {
        self.check_running()?;
        if self.replication().is_some() {
            return self.send_replicated(msgs).await;
        }
        let (records, in_use) = self.build_records(msgs, RecordKind::Normal)?;
        if records.iter().any(|r| r.kind == RecordKind::Half) {
            return self.send_delayed(records, in_use).await;
        }
        let (records, mut claims) = self.claim_keys(records).await?;
        if claims.all_duplicates() {
            drop(in_use);
            self.wait_durable(claims.duplicates_end()).await?;
            return Ok(claims.receipts(Vec::new(), duplicate_receipt, |r| r.duplicate = true));
        }
        let bytes: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        let metas: Vec<RecordMeta> = records.iter().map(RecordMeta::of).collect();
        let ids: Vec<(MessageId, u32, String)> = records
            .iter()
            .map(|r| (r.message_id, r.queue_id, r.topic.clone()))
            .collect();
        let receipt = self.store.append(records)?;
        in_use.stored();
        claims.stored(&metas, &receipt);
        self.wait_durable(receipt.end.max(claims.duplicates_end()))
            .await?;
        self.counters
            .messages_in
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.counters.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        let mut out = Vec::with_capacity(ids.len());
        let mut last_topic: Option<&str> = None;
        for (i, (id, qid, topic)) in ids.iter().enumerate() {
            if last_topic != Some(topic.as_str()) {
                if let Some(t) = self.topic(topic) {
                    t.notify.notify_waiters();
                }
                last_topic = Some(topic.as_str());
            }
            out.push(SendReceipt {
                message_id: *id,
                queue_id: *qid,
                queue_offset: Some(receipt.queue_offsets[i].ok_or_else(|| {
                    BrokerError::Internal("a normal message got no queue offset".into())
                })?),
                deliver_at_ms: 0,
                duplicate: false,
            });
        }
        Ok(claims.receipts(out, duplicate_receipt, |r| r.duplicate = true))
    }
}

impl Broker {
    /// [`Broker::send`] of a broker group's leader: one proposal holding
    /// the batch (and the creation of topics it auto-created); apply decides
    /// duplicates the same way on every replica.
    async fn send_replicated(
        &self,
        msgs: Vec<OutgoingMessage>,
    ) -> Result<Vec<SendReceipt>, BrokerError> {
        self.check_serving()?;
        let (records, in_use) = self.build_records(msgs, RecordKind::Normal)?;
        let (records, mut claims) = self.claim_keys(records).await?;
        if claims.all_duplicates() {
            drop(in_use);
            return Ok(claims.receipts(Vec::new(), duplicate_receipt, |r| r.duplicate = true));
        }
        let mut batch: Vec<Record> = in_use
            .created
            .iter()
            .filter_map(|t| self.topic(t).map(|s| topic_record(t, s.queues)))
            .collect();
        let controls = batch.len();
        let bytes: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        let ids: Vec<(MessageId, u32, String, u64)> = records
            .iter()
            .map(|r| {
                let due = (r.kind == RecordKind::Half)
                    .then(|| crate::core::props::deliver_at(r))
                    .flatten()
                    .unwrap_or(0);
                (r.message_id, r.queue_id, r.topic.clone(), due)
            })
            .collect();
        batch.extend(records);
        let (receipt, outcomes) = self.replicate(batch).await?;
        in_use.stored();
        claims.settle();
        self.counters
            .messages_in
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.counters.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        let mut out = Vec::with_capacity(ids.len());
        for (i, (message_id, queue_id, _, due)) in ids.into_iter().enumerate() {
            let at = controls + i;
            out.push(match outcomes.get(at) {
                Some(Outcome::Duplicate(w)) => duplicate_receipt(&first_send(w)),
                _ => SendReceipt {
                    message_id,
                    queue_id,
                    queue_offset: receipt.queue_offsets.get(at).copied().flatten(),
                    deliver_at_ms: due,
                    duplicate: false,
                },
            });
        }
        Ok(claims.receipts(out, duplicate_receipt, |r| r.duplicate = true))
    }
}

/// A duplicate's receipt: the first send's.
pub(crate) fn duplicate_receipt(f: &crate::core::dedup::FirstSend) -> SendReceipt {
    SendReceipt {
        message_id: f.message_id,
        queue_id: f.queue_id,
        queue_offset: f.queue_offset,
        deliver_at_ms: f.deliver_at_ms,
        duplicate: true,
    }
}

/// The topics of a batch being stored, held until its records are appended
/// (see [`Broker::build_records`]).
pub(crate) struct TopicsInUse<'a> {
    broker: &'a Broker,
    held: Vec<(String, Arc<TopicState>)>,
    /// Topics this batch auto-created.
    pub(crate) created: Vec<String>,
}

impl TopicsInUse<'_> {
    /// The records are in the log: the topics stay.
    pub(crate) fn stored(mut self) {
        self.created.clear();
    }
}

impl Drop for TopicsInUse<'_> {
    fn drop(&mut self) {
        for name in std::mem::take(&mut self.created) {
            let Some(ours) = self.held.iter().find(|(n, _)| *n == name).map(|(_, t)| t) else {
                continue;
            };
            if let Err(e) = self.broker.remove_unused_topic(&name, ours) {
                tracing::warn!(topic = %name, error = %e, "an auto-created topic of a refused send was left behind");
            }
        }
    }
}
