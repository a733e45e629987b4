//! The check-back driver: sends due checks to producer sessions, counts
//! replies that time out, gives halves up after `check_max`, and commits
//! delayed messages when they fall due. A background service: the state it
//! acts on is `core::transactions::TxState`'s.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::core::props::{client_origin, prop, user_properties, MESSAGE_GROUP_PROPERTY};
use crate::core::transactions::state::{lock, Session};
use crate::core::transactions::{CheckRequest, EndSource, Resolution, TransactionId, DELAY_GROUP};
use crate::core::txcheck::Due;
use crate::core::types::{DeliveredMessage, Receipt};
use crate::core::Broker;

impl Broker {
    /// One pass of the check driver: sends every due check. Returns when the
    /// next thing is due (ms), if anything is pending.
    pub async fn run_due_checks(&self) -> Option<u64> {
        // Checks and delayed messages are the leader's to send.
        self.check_serving().ok()?;
        let tx = self.tx();
        // Bounded per pass so one pass never runs long; the lock is taken per
        // chunk so sends and ends are never held up for long.
        for _chunk in 0..100 {
            let now = self.now_ms();
            let mut to_send = Vec::new();
            let mut to_deliver = Vec::new();
            let mut timed_out = Vec::new();
            let more = {
                let mut inner = tx.inner.lock();
                // Groups with a live session, read under the transaction
                // lock: a session registered after this read unparks (under
                // the same lock, in `open_session`) whatever this chunk
                // parks. Read once per pass instead, a session opening
                // between that read and the park was missed and its group's
                // halves stayed parked, unchecked, until another one opened.
                let live_ids: Vec<u32> = {
                    let sessions = lock(&tx.sessions);
                    let mut v: Vec<u32> = sessions.groups().map(|g| inner.strings.id(g)).collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                };
                let delay_group = inner.strings.id(DELAY_GROUP);
                let mut handled = 0;
                while handled < 1024 && to_send.len() < 64 {
                    let Some(due) = inner.sched.next_due(now) else {
                        break;
                    };
                    handled += 1;
                    match due {
                        Due::ReplyTimedOut { offset } => {
                            self.counters.check_timeouts.fetch_add(1, Ordering::Relaxed);
                            let holder = inner.outstanding.get(&offset).copied();
                            tx.release_outstanding(&mut inner, offset);
                            inner.dirty.insert(offset);
                            if holder.is_some_and(|sid| tx.session_timed_out(sid)) {
                                // A silent session is not the producer's
                                // answer: another instance gets the check.
                                inner.sched.check_lost(offset, now);
                            } else {
                                let given_up = inner.sched.answered_unknown(offset, now);
                                timed_out.push((offset, given_up));
                            }
                        }
                        Due::Check(offset) => {
                            let group = inner.sched.get(offset).map(|s| s.group);
                            if group == Some(delay_group) {
                                // A delayed message is due: commit it. Looked at
                                // again in 1 s should that fail.
                                inner.sched.defer(offset, now + 1_000);
                                to_deliver.push(offset);
                            } else if group.is_some_and(|g| live_ids.contains(&g)) {
                                // Defer it a moment so this loop moves on; send_check reschedules.
                                inner.sched.defer(offset, now + 1);
                                to_send.push(offset);
                            } else {
                                inner.sched.park(offset);
                            }
                        }
                    }
                }
                handled == 1024 || to_send.len() == 64
            };
            for (offset, given_up) in timed_out {
                tracing::debug!(offset, "check reply timed out; counted as UNKNOWN");
                if given_up {
                    self.give_up(offset).await;
                }
            }
            for offset in to_send {
                self.send_check(offset, now);
            }
            self.deliver_delayed(to_deliver).await;
            if !more {
                break;
            }
            tokio::task::yield_now().await;
        }
        tx.inner.lock().sched.next_due_ms()
    }

    /// Commits due delayed messages (one append, one durability wait).
    pub(crate) async fn deliver_delayed(&self, offsets: Vec<u64>) {
        if offsets.is_empty() {
            return;
        }
        let mut ends = Vec::with_capacity(offsets.len());
        for offset in offsets {
            match self.store().log().read(offset) {
                Ok(r) => ends.push((
                    TransactionId {
                        offset,
                        message_id: r.message_id,
                    }
                    .encode(&self.secret),
                    Resolution::Commit,
                )),
                Err(e) => {
                    tracing::error!(offset, error = %e, "cannot read a due delayed message; retrying")
                }
            }
        }
        let tids: Vec<String> = ends.iter().map(|(t, _)| t.clone()).collect();
        for (tid, r) in tids
            .iter()
            .zip(self.end_transactions(ends, EndSource::DelayTimer).await)
        {
            if let Err(e) = r {
                tracing::error!(transaction_id = %tid, error = %e, "delayed message not delivered yet; retrying");
            }
        }
    }

    pub(crate) fn send_check(&self, offset: u64, now: u64) {
        let tx = self.tx();
        let (group, topic, check_times) = {
            let inner = tx.inner.lock();
            match inner.sched.get(offset) {
                Some(s) => (
                    inner.strings.name(s.group).to_owned(),
                    inner.strings.name(s.topic).to_owned(),
                    s.check_times,
                ),
                None => return,
            }
        };
        let half = match self.store().log().read(offset) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(offset, error = %e, "cannot read half for a check; retrying later");
                tx.inner.lock().sched.no_session(offset, now);
                return;
            }
        };
        let message_group = prop(&half, MESSAGE_GROUP_PROPERTY).map(str::to_owned);
        let origin = client_origin(&half);
        let req = CheckRequest {
            transaction_id: TransactionId {
                offset,
                message_id: half.message_id,
            }
            .encode(&self.secret),
            producer_group: group.clone(),
            // This check's number, from 1 (RocketMQ counts the same way).
            check_times: check_times + 1,
            message: DeliveredMessage {
                message_id: half.message_id,
                topic: half.topic.clone(),
                queue_id: half.queue_id,
                queue_offset: 0,
                tag: half.tag,
                keys: half.keys,
                properties: user_properties(half.properties),
                body: half.body,
                reconsume_times: 0,
                receipt: Receipt {
                    topic: half.topic,
                    queue_id: half.queue_id,
                    queue_offset: 0,
                    seq: 0,
                    retry: false,
                },
                store_timestamp_ms: half.store_timestamp_ms,
                invisible_until_ms: 0,
                retry: false,
                original_queue_offset: None,
                message_group,
                origin,
            },
        };
        // The client that sent the half, when it says so and is connected,
        // is asked first (it knows the transaction best).
        let sender = req.message.origin.as_ref().map(|o| o.client_id.as_str());
        // Pick a live session of the group that declared this topic (or all
        // topics) and has room, round robin across instances.
        let sent_to = {
            let sessions = lock(&tx.sessions);
            let serving: Vec<&Session> = sessions
                .of_group(&group)
                .filter(|s| s.serves(&topic))
                .collect();
            // Silent sessions only when there is nothing else.
            let awake: Vec<&Session> = serving.iter().copied().filter(|s| !s.silent()).collect();
            let mut candidates = if awake.is_empty() { serving } else { awake };
            if let Some(c) = sender {
                let own: Vec<&Session> = candidates
                    .iter()
                    .copied()
                    .filter(|s| s.client.as_deref() == Some(c))
                    .collect();
                if own
                    .iter()
                    .any(|s| s.inflight.load(Ordering::Acquire) < tx.max_checks_per_session)
                {
                    candidates = own;
                }
            }
            let start = tx.round_robin.fetch_add(1, Ordering::Relaxed);
            let mut sent = None;
            let mut any = false;
            for i in 0..candidates.len() {
                let s = candidates[(start + i) % candidates.len()];
                any = true;
                if s.inflight.load(Ordering::Acquire) >= tx.max_checks_per_session {
                    continue;
                }
                if s.tx.try_send(req.clone()).is_ok() {
                    s.inflight.fetch_add(1, Ordering::AcqRel);
                    sent = Some(s.id);
                    break;
                }
            }
            (sent, any)
        };
        let mut inner = tx.inner.lock();
        match sent_to {
            (Some(sid), _) => {
                self.counters.checks_sent.fetch_add(1, Ordering::Relaxed);
                inner.sched.check_sent(offset, now);
                inner.outstanding.insert(offset, sid);
                inner.dirty.insert(offset);
            }
            // Sessions exist but all are full: not an attempt, look again soon.
            (None, true) => inner.sched.defer(offset, now + 200),
            (None, false) => inner.sched.park(offset),
        }
    }
}

/// Runs the check driver until `stop` fires: wakes at the next due time,
/// on a new half or session, and at least every second.
pub(crate) async fn check_driver(
    broker: Arc<Broker>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let next = broker.run_due_checks().await;
        let wait_ms = next.map_or(1000, |d| d.saturating_sub(broker.now_ms()).clamp(1, 1000));
        let tx = broker.tx();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            _ = tx.wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}
