//! Deliveries to consumer groups: receive with long polling (due retries
//! first, then fresh messages), ack, nack, and invisible-duration changes.

use std::cell::RefCell;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use halfmq_storage::Record;

use super::delivery::{LeaseError, QueueProgress};
use super::fifo::{self, Bounds};
use super::names::{check_group, check_topic, TagFilter, MAX_PROPERTY_VALUE_BYTES};
use super::progress::GroupTopic;
use super::props::{client_origin, prop, MESSAGE_GROUP_PROPERTY};
use super::redelivery::{retry_topic, Failure};
use super::topics::TopicState;
use super::transactions::user_properties;
use super::types::{DeliveredMessage, Receipt, ReceiveRequest};
use super::{lock, Broker};
use crate::error::BrokerError;

impl Broker {
    /// The progress of `group` on `topic`, created (at the earliest retained
    /// message of each queue) if the group never consumed it.
    ///
    /// # Errors
    /// [`BrokerError::TooManyRequests`] when creating it would pass
    /// `max_consumer_groups` (group, topic) pairs.
    pub(crate) fn group_topic(
        &self,
        group: &str,
        topic: &str,
        queues: u32,
    ) -> Result<Arc<Mutex<GroupTopic>>, BrokerError> {
        let mut groups = lock(&self.groups);
        let key = (group.to_owned(), topic.to_owned());
        if !groups.contains_key(&key) && groups.len() >= self.cfg.max_consumer_groups as usize {
            return Err(BrokerError::TooManyRequests(format!(
                "max_consumer_groups {} (consumer group, topic) pairs reached; group {group} cannot start consuming {topic}",
                self.cfg.max_consumer_groups
            )));
        }
        let gt = groups.entry(key).or_insert_with(|| {
            Arc::new(Mutex::new(GroupTopic {
                fifo: self.is_fifo_group(group).then(Vec::new),
                ..GroupTopic::default()
            }))
        });
        let gt = Arc::clone(gt);
        drop(groups);
        {
            let mut g = lock(&gt);
            // A new group starts at the earliest retained message of each queue.
            while g.queues.len() < queues as usize {
                let qid = g.queues.len() as u32;
                let start = self.store.queue(topic, qid).map_or(0, |q| q.min_offset());
                g.queues.push(QueueProgress::starting_at(start));
                g.dirty = true;
            }
            let n = g.queues.len();
            if let Some(f) = &mut g.fifo {
                f.resize_with(n, Default::default);
            }
            let rt = retry_topic(group, topic);
            while g.retry.len() < self.retry.delays_ms.len() {
                let level = g.retry.len() as u32;
                let start = self.store.queue(&rt, level).map_or(0, |q| q.min_offset());
                g.retry.push(QueueProgress::starting_at(start));
                g.dirty = true;
            }
        }
        Ok(gt)
    }

    /// Receives up to `max_messages` messages for a consumer group, waiting up
    /// to `wait_ms` (capped by `max_receive_wait_ms`) when none is ready.
    ///
    /// # Errors
    /// Invalid names or expression, unknown topic, shutting down.
    pub async fn receive(&self, req: ReceiveRequest) -> Result<Vec<DeliveredMessage>, BrokerError> {
        self.check_serving()?;
        self.check_running()?;
        check_group(&req.group)?;
        check_topic(&req.topic)?;
        let filter = TagFilter::parse(&req.tag_expression)?;
        let topic = self
            .topic(&req.topic)
            .ok_or_else(|| BrokerError::TopicNotFound(req.topic.clone()))?;
        let invisible_ms = match req.invisible_duration_ms {
            0 => self.cfg.default_invisible_duration_ms,
            d => self.check_invisible(d)?,
        };
        let max = req.max_messages.clamp(1, self.cfg.max_receive_messages) as usize;
        let wait = Duration::from_millis(req.wait_ms.min(self.cfg.max_receive_wait_ms));
        let deadline = tokio::time::Instant::now() + wait;
        let gt = self.group_topic(&req.group, &req.topic, topic.queues)?;
        // Held while this receive waits: at most max_long_polls wait at once.
        let mut waiting: Option<LongPoll<'_>> = None;
        loop {
            let notified = topic.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.hand_off_expired(&req.group, &req.topic, &gt).await?;
            let (msgs, next_deadline_ms) =
                self.try_receive(&req, &topic, &gt, &filter, invisible_ms, max)?;
            if !msgs.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(msgs);
            }
            self.check_running()?;
            if waiting.is_none() {
                match LongPoll::enter(self) {
                    Some(w) => waiting = Some(w),
                    // Too many waiting already: answer now with nothing.
                    None => return Ok(msgs),
                }
            }
            let mut wake = deadline;
            if let Some(d) = next_deadline_ms {
                let in_ms = d.saturating_sub(self.clock.now_ms());
                wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(in_ms));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Hands expired leases (main queues and retry levels) to the retry
    /// machinery: each failure schedules a retry or goes to the DLQ.
    pub(crate) async fn hand_off_expired(
        &self,
        group: &str,
        topic: &str,
        gt: &Mutex<GroupTopic>,
    ) -> Result<(), BrokerError> {
        let now = self.clock.now_ms();
        let failures: Vec<Failure> = {
            let mut g = lock(gt);
            let mut v = Vec::new();
            for (qid, p) in g.queues.iter_mut().enumerate() {
                for (qo, lease) in p.take_expired(now, 256) {
                    v.push(expired(None, qid as u32, qo, lease));
                }
            }
            for (level, p) in g.retry.iter_mut().enumerate() {
                for (qo, lease) in p.take_expired(now, 256) {
                    v.push(expired(Some(level as u32), level as u32, qo, lease));
                }
            }
            v
        };
        self.hand_off_failures(group, topic, gt, failures).await
    }

    /// One pass: due retries first, then the topic's queues. Returns the
    /// messages and when to look again (earliest lease deadline or retry due
    /// time), for the long poll.
    pub(crate) fn try_receive(
        &self,
        req: &ReceiveRequest,
        _topic: &TopicState,
        gt: &Mutex<GroupTopic>,
        filter: &TagFilter,
        invisible_ms: u64,
        max: usize,
    ) -> Result<(Vec<DeliveredMessage>, Option<u64>), BrokerError> {
        let mut out = Vec::new();
        let inflight_max = self.cfg.max_inflight_per_queue as usize;
        let window = self.cfg.max_unacked_window;
        let rt = retry_topic(&req.group, &req.topic);
        let mut next_look: Option<u64> = None;
        // Record bytes of what this response carries so far: it stops at
        // max_receive_bytes (the first message always goes, whatever its size).
        let max_bytes = self.cfg.max_receive_bytes;
        let mut used_bytes = 0u64;
        let mut full = false;
        // Bounded: each round either delivers, skips (filtered/unreadable) or stops.
        for _round in 0..64 {
            let now = self.clock.now_ms();
            // (retry level or None, queue id, delivery, the Redelivery record for retries or the message record the FIFO rule read)
            let mut picked: Vec<(
                Option<u32>,
                u32,
                crate::core::delivery::Delivery,
                Option<Record>,
            )> = Vec::new();
            let mut round_bytes = 0u64;
            // Whether one more record of `size` bytes fits this response.
            let mut fits = |size: u64, taken: usize| {
                if taken > 0 && used_bytes + round_bytes + size > max_bytes {
                    full = true;
                    return false;
                }
                round_bytes += size;
                true
            };
            {
                let mut g = lock(gt);
                for level in 0..g.retry.len() {
                    let l = level as u32;
                    let max_visible = self.store.max_queue_offset(&rt, l);
                    let min = self.store.queue(&rt, l).map_or(0, |q| q.min_offset());
                    let p = &mut g.retry[level];
                    p.skip_to(min);
                    // Offsets to deliver again in place (a crash-restored
                    // lease expired) were due already; then fresh ones, due.
                    while out.len() + picked.len() < max {
                        let Some(qo) = p.peek_next(max_visible, inflight_max, window) else {
                            break;
                        };
                        let head = self.store.read_queue(&rt, l, qo).map(|m| m.record);
                        let again = p.has_redelivery();
                        if let (Ok(r), false) = (&head, again) {
                            let due = crate::core::redelivery::deliver_at_ms(r);
                            if due > now {
                                next_look = Some(next_look.map_or(due, |n| n.min(due)));
                                break;
                            }
                        }
                        let size = head.as_ref().map_or(0, |r| u64::from(r.ref_size));
                        if !fits(size, out.len() + picked.len()) {
                            break;
                        }
                        let d = if again {
                            p.next_redelivery(now, invisible_ms, inflight_max)
                        } else {
                            p.next_delivery(now, invisible_ms, qo + 1, inflight_max, window)
                        };
                        match d {
                            Some(d) => picked.push((Some(l), l, d, head.ok())),
                            None => break,
                        }
                    }
                }
                let n = g.queues.len();
                let start = g.round_robin;
                g.round_robin = (start + 1) % n.max(1);
                for i in 0..n {
                    let qid = (start + i) % n;
                    let max_visible = self.store.max_queue_offset(&req.topic, qid as u32);
                    let min = self
                        .store
                        .queue(&req.topic, qid as u32)
                        .map_or(0, |q| q.min_offset());
                    let gg = &mut *g;
                    if let Some(gates) = gg.fifo.as_mut() {
                        // A FIFO consumer group: the message-group rule
                        // picks (fifo.rs).
                        let (p, gate) = (&mut gg.queues[qid], &mut gates[qid]);
                        p.skip_to(min);
                        let bounds = Bounds {
                            max_visible,
                            max_inflight: inflight_max,
                            max_window: window,
                        };
                        let (store, topic_name) = (&self.store, &req.topic);
                        // The last record read to learn its group: a fresh
                        // offset delivered right after is not read again.
                        let last: RefCell<Option<(u64, Record)>> = RefCell::new(None);
                        let group_of = |qo: u64| {
                            let m = store.read_queue(topic_name, qid as u32, qo).ok()?;
                            let g = prop(&m.record, MESSAGE_GROUP_PROPERTY).map(fifo::group_hash);
                            *last.borrow_mut() = Some((qo, m.record));
                            g
                        };
                        gate.prepare(p, group_of);
                        while out.len() + picked.len() < max {
                            let d = gate.next(p, now, invisible_ms, bounds, group_of);
                            let Some(d) = d else { break };
                            let size = store
                                .queue_entry(topic_name, qid as u32, d.queue_offset)
                                .ok()
                                .flatten()
                                .map_or(0, |e| u64::from(e.size));
                            if !fits(size, out.len() + picked.len()) {
                                gate.undo(p, &d);
                                break;
                            }
                            let read = last.borrow_mut().take();
                            let record = read.filter(|(qo, _)| *qo == d.queue_offset);
                            picked.push((None, qid as u32, d, record.map(|(_, r)| r)));
                        }
                        continue;
                    }
                    let p = &mut g.queues[qid];
                    p.skip_to(min);
                    while out.len() + picked.len() < max {
                        let Some(qo) = p.peek_next(max_visible, inflight_max, window) else {
                            break;
                        };
                        let size = self
                            .store
                            .queue_entry(&req.topic, qid as u32, qo)
                            .ok()
                            .flatten()
                            .map_or(0, |e| u64::from(e.size));
                        if !fits(size, out.len() + picked.len()) {
                            break;
                        }
                        let next =
                            p.next_redelivery(now, invisible_ms, inflight_max)
                                .or_else(|| {
                                    p.next_delivery(
                                        now,
                                        invisible_ms,
                                        max_visible,
                                        inflight_max,
                                        window,
                                    )
                                });
                        match next {
                            Some(d) => picked.push((None, qid as u32, d, None)),
                            None => break,
                        }
                    }
                }
                if !picked.is_empty() {
                    g.dirty = true;
                }
            }
            if picked.is_empty() {
                let g = lock(gt);
                let lease_min = g
                    .queues
                    .iter()
                    .chain(g.retry.iter())
                    .filter_map(QueueProgress::next_deadline_ms)
                    .chain(g.fifo.iter().flatten().filter_map(|f| f.next_due_ms(now)))
                    .min();
                let look = match (lease_min, next_look) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                return Ok((out, look));
            }
            let mut skipped = Vec::new();
            for (level, qid, d, redelivery) in picked {
                let read = match (&level, redelivery) {
                    // Read already by the FIFO rule (fifo.rs), or now.
                    (None, Some(r)) => Ok((r, d.lease.reconsume_times, None)),
                    (None, None) => self
                        .store
                        .read_queue(&req.topic, qid, d.queue_offset)
                        .map(|m| (m.record, d.lease.reconsume_times, None)),
                    (Some(_), Some(r)) => self
                        .store
                        .log()
                        .read_sized(r.ref_offset.unwrap_or(u64::MAX), r.ref_size)
                        .map(|orig| {
                            (
                                orig,
                                r.reconsume_times,
                                crate::core::redelivery::origin(&r).map(|(_, o)| o),
                            )
                        }),
                    (Some(_), None) => Err(halfmq_storage::Error::InvalidRecord(
                        "unreadable retry entry".into(),
                    )),
                };
                match read {
                    Ok((r, reconsume_times, original_queue_offset)) if filter.matches(&r.tag) => {
                        used_bytes += r.encoded_len() as u64;
                        if reconsume_times > 0 || d.again {
                            self.counters.redeliveries.fetch_add(1, Ordering::Relaxed);
                        }
                        self.counters.messages_out.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .bytes_out
                            .fetch_add(r.body.len() as u64, Ordering::Relaxed);
                        // A retry keeps the lease's own reconsume count.
                        if let Some(l) = level {
                            let mut g = lock(gt);
                            if let Some(p) = g.retry.get_mut(l as usize) {
                                p.set_reconsume_times(d.queue_offset, reconsume_times);
                            }
                        }
                        let message_group = prop(&r, MESSAGE_GROUP_PROPERTY).map(str::to_owned);
                        let origin = client_origin(&r);
                        out.push(DeliveredMessage {
                            message_id: r.message_id,
                            topic: req.topic.clone(),
                            queue_id: if level.is_some() { r.queue_id } else { qid },
                            queue_offset: d.queue_offset,
                            tag: r.tag,
                            keys: r.keys,
                            properties: user_properties(r.properties),
                            body: r.body,
                            reconsume_times,
                            receipt: Receipt {
                                topic: req.topic.clone(),
                                queue_id: qid,
                                queue_offset: d.queue_offset,
                                seq: d.lease.seq,
                                retry: level.is_some(),
                            },
                            store_timestamp_ms: r.store_timestamp_ms,
                            invisible_until_ms: d.lease.invisible_until_ms,
                            retry: level.is_some(),
                            original_queue_offset,
                            message_group,
                            origin,
                        });
                    }
                    Ok(_) => skipped.push((level, qid, d.queue_offset)),
                    Err(e) => {
                        tracing::error!(
                            topic = %req.topic, queue_id = qid, retry_level = ?level, queue_offset = d.queue_offset, error = %e,
                            "unreadable message skipped for this group"
                        );
                        skipped.push((level, qid, d.queue_offset));
                    }
                }
            }
            if !skipped.is_empty() {
                let mut g = lock(gt);
                for (level, qid, qo) in skipped {
                    if let Some(p) = g.progress_mut(level, qid) {
                        p.skip(qo);
                    }
                }
            }
            if out.len() >= max || full {
                break;
            }
        }
        Ok((out, None))
    }

    /// An invisible duration a consumer asked for, if within
    /// `max_invisible_duration_ms`.
    pub(crate) fn check_invisible(&self, ms: u64) -> Result<u64, BrokerError> {
        if ms > self.cfg.max_invisible_duration_ms {
            return Err(BrokerError::BadRequest(format!(
                "invisible duration {ms} ms exceeds max_invisible_duration_ms {}",
                self.cfg.max_invisible_duration_ms
            )));
        }
        Ok(ms)
    }

    pub(crate) fn with_lease<T>(
        &self,
        group: &str,
        receipt: &Receipt,
        f: impl FnOnce(&mut QueueProgress) -> Result<T, LeaseError>,
    ) -> Result<T, BrokerError> {
        check_group(group)?;
        let gt = self.existing_group_topic(group, &receipt.topic)?;
        let mut g = lock(&gt);
        let p = g
            .progress_mut(receipt.level(), receipt.queue_id)
            .ok_or(BrokerError::ReceiptNotFound)?;
        let r = f(p).map_err(|LeaseError::NotFound| BrokerError::ReceiptNotFound)?;
        g.dirty = true;
        let fifo = g.fifo.is_some();
        drop(g);
        if fifo {
            // An ack may free the next message of a message group.
            self.notify_topic(&receipt.topic);
        }
        Ok(r)
    }

    pub(crate) fn existing_group_topic(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Arc<Mutex<GroupTopic>>, BrokerError> {
        lock(&self.groups)
            .get(&(group.to_owned(), topic.to_owned()))
            .cloned()
            .ok_or(BrokerError::ReceiptNotFound)
    }

    /// Acks one delivery.
    ///
    /// # Errors
    /// [`BrokerError::ReceiptNotFound`] for a stale receipt.
    pub fn ack(&self, group: &str, receipt: &Receipt) -> Result<(), BrokerError> {
        self.check_serving()?;
        self.with_lease(group, receipt, |p| p.ack(receipt.queue_offset, receipt.seq))?;
        self.counters.acks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Fails a delivery: schedules its retry (reconsume times + 1) after the
    /// delay level its reconsume times choose, or after `delay_ms` rounded up
    /// to a level; or moves it to the DLQ when the retries are used up.
    /// Returns once the retry is durable.
    ///
    /// # Errors
    /// [`BrokerError::ReceiptNotFound`] for a stale receipt; storage errors
    /// (the delivery stays leased then).
    pub async fn nack(
        &self,
        group: &str,
        receipt: &Receipt,
        reason: &str,
        delay_ms: Option<u64>,
    ) -> Result<(), BrokerError> {
        self.fail(group, receipt, reason, delay_ms, false).await
    }

    /// Moves a delivery to the group's DLQ now, whatever retries are left
    /// (RocketMQ's ForwardMessageToDeadLetterQueue). Returns once durable.
    ///
    /// # Errors
    /// As [`Broker::nack`].
    pub async fn dead_letter(
        &self,
        group: &str,
        receipt: &Receipt,
        reason: &str,
    ) -> Result<(), BrokerError> {
        self.fail(group, receipt, reason, None, true).await
    }

    async fn fail(
        &self,
        group: &str,
        receipt: &Receipt,
        reason: &str,
        delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<(), BrokerError> {
        self.check_serving()?;
        if reason.len() > MAX_PROPERTY_VALUE_BYTES {
            return Err(BrokerError::BadRequest(format!(
                "nack reason of {} bytes exceeds {MAX_PROPERTY_VALUE_BYTES}",
                reason.len()
            )));
        }
        let lease = self.with_lease(group, receipt, |p| {
            p.release(receipt.queue_offset, receipt.seq)
        })?;
        let gt = self.existing_group_topic(group, &receipt.topic)?;
        let failure = Failure {
            retry_level: receipt.level(),
            queue_id: receipt.queue_id,
            queue_offset: receipt.queue_offset,
            lease,
            reason: reason.to_owned(),
            custom_delay_ms: delay_ms,
            dead_letter,
        };
        self.hand_off_failures(group, &receipt.topic, &gt, vec![failure])
            .await?;
        self.notify_topic(&receipt.topic);
        Ok(())
    }

    /// Changes the invisible duration of a delivery (from now); returns the
    /// new receipt and deadline. A delivery may be extended again and again,
    /// but never past `max_lease_total_ms` after it was delivered.
    ///
    /// # Errors
    /// [`BrokerError::ReceiptNotFound`] for a stale receipt;
    /// [`BrokerError::BadRequest`] past `max_invisible_duration_ms` or
    /// `max_lease_total_ms`.
    pub fn change_invisible_duration(
        &self,
        group: &str,
        receipt: &Receipt,
        invisible_ms: u64,
    ) -> Result<(Receipt, u64), BrokerError> {
        self.check_serving()?;
        let now = self.clock.now_ms();
        let d = self.check_invisible(invisible_ms)?;
        let max_total = self.cfg.max_lease_total_ms;
        let lease = self.with_lease(group, receipt, |p| {
            let held = p
                .lease(receipt.queue_offset, receipt.seq)
                .ok_or(LeaseError::NotFound)?;
            if (now + d).saturating_sub(held.delivered_ms) > max_total {
                return Ok(Err(BrokerError::BadRequest(format!(
                    "the delivery would stay leased {} ms in all, over max_lease_total_ms {max_total}: ack or nack it",
                    (now + d).saturating_sub(held.delivered_ms)
                ))));
            }
            p.change_invisible(receipt.queue_offset, receipt.seq, now, d)
                .map(Ok)
        })??;
        // A shorter invisible duration moves the lease's deadline earlier
        // than waiting long polls planned to look again: wake them (a
        // RocketMQ push consumer fails a message by setting it to 0).
        self.notify_topic(&receipt.topic);
        Ok((
            Receipt {
                seq: lease.seq,
                ..receipt.clone()
            },
            lease.invisible_until_ms,
        ))
    }
}

/// A receive that waits for messages, counted against `max_long_polls`
/// while it lives.
struct LongPoll<'a>(&'a Broker);

impl<'a> LongPoll<'a> {
    fn enter(b: &'a Broker) -> Option<LongPoll<'a>> {
        let max = b.cfg.max_long_polls as usize;
        b.long_polls
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| LongPoll(b))
    }
}

impl Drop for LongPoll<'_> {
    fn drop(&mut self) {
        self.0.long_polls.fetch_sub(1, Ordering::AcqRel);
    }
}

pub(crate) fn expired(
    retry_level: Option<u32>,
    queue_id: u32,
    queue_offset: u64,
    lease: crate::core::delivery::Lease,
) -> Failure {
    Failure {
        retry_level,
        queue_id,
        queue_offset,
        lease,
        reason: "invisible duration expired without an ack".to_owned(),
        dead_letter: false,
        custom_delay_ms: None,
    }
}
