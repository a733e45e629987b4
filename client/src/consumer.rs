//! Consumers: [`Consumer`] (receive with long polling, ack, nack,
//! invisible durations, the handler loop) and what they receive.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halfmq_proto::v1 as pb;
use tokio::sync::Semaphore;

use crate::{check, Client, ClientError};

/// A message received by a consumer.
#[derive(Debug, Clone)]
pub struct ReceivedMessage {
    /// Message id, stable across redeliveries.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset.
    pub queue_offset: u64,
    /// Tag.
    pub tag: String,
    /// Keys.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: HashMap<String, String>,
    /// Body.
    pub body: Bytes,
    /// Failed deliveries to this group before this one.
    pub reconsume_times: u32,
    /// Receipt handle for ack / nack.
    pub receipt_handle: String,
    /// Broker clock when stored, ms since the epoch.
    pub store_timestamp_ms: u64,
    /// When it becomes visible again unless acked, ms since the epoch.
    pub invisible_until_ms: u64,
    /// Whether this delivery comes from the group's retry queue (a nack or
    /// an expired invisible duration before): `queue_offset` is then its
    /// position in the retry queue.
    pub retry: bool,
    /// For a retry, the message's queue offset in `queue_id` of its topic
    /// (`None` for retries scheduled by an older broker).
    pub original_queue_offset: Option<u64>,
    /// The message group it was sent with, if any.
    pub message_group: Option<String>,
}

/// What a handler of [`Consumer::run`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsumeResult {
    /// Done: ack it.
    Success,
    /// Failed: redeliver later (reconsume times + 1).
    Retry {
        /// Delay before redelivery; `None` lets the broker decide.
        delay: Option<Duration>,
        /// Why, kept with the message.
        reason: String,
    },
}

/// Receives from one topic as one consumer group. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Consumer {
    client: Client,
    group: String,
    topic: String,
    tag_expression: String,
    invisible_duration: Option<Duration>,
}

impl Consumer {
    /// A consumer of `topic` in `group`, all tags.
    pub fn new(client: Client, group: impl Into<String>, topic: impl Into<String>) -> Self {
        Consumer {
            client,
            group: group.into(),
            topic: topic.into(),
            tag_expression: "*".into(),
            invisible_duration: None,
        }
    }

    /// Filters by tag: `*` or `a||b`.
    pub fn with_tag_expression(mut self, expr: impl Into<String>) -> Self {
        self.tag_expression = expr.into();
        self
    }

    /// Invisible duration of received messages (default: the broker's, 30 s).
    pub fn with_invisible_duration(mut self, d: Duration) -> Self {
        self.invisible_duration = Some(d);
        self
    }

    /// Receives up to `max` messages, waiting up to `wait` when none is ready
    /// (long polling; no busy loop). Retried with backoff on transport errors.
    ///
    /// # Errors
    /// Broker refusals (unknown topic, bad names), transport errors.
    pub async fn receive(
        &self,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<ReceivedMessage>, ClientError> {
        let req = pb::ReceiveRequest {
            group: self.group.clone(),
            topic: self.topic.clone(),
            tag_expression: self.tag_expression.clone(),
            max_messages: max,
            invisible_duration_ms: self.invisible_duration.map_or(0, |d| d.as_millis() as u64),
            wait_ms: wait.as_millis() as u64,
        };
        let resp = self
            .client
            .call(req, wait, |r| {
                let mut c = self.client.consumer();
                async move { c.receive(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp
            .messages
            .into_iter()
            .map(|m| ReceivedMessage {
                message_id: m.message_id,
                topic: m.topic,
                queue_id: m.queue_id,
                queue_offset: m.queue_offset,
                tag: m.tag,
                keys: m.keys,
                properties: m.properties,
                body: m.body,
                reconsume_times: m.reconsume_times,
                receipt_handle: m.receipt_handle,
                store_timestamp_ms: m.store_timestamp_ms,
                invisible_until_ms: m.invisible_until_ms,
                retry: m.retry,
                original_queue_offset: m.original_queue_offset,
                message_group: (!m.message_group.is_empty()).then_some(m.message_group),
            })
            .collect())
    }

    /// Acks a message.
    ///
    /// # Errors
    /// [`Code::ReceiptNotFound`](crate::Code::ReceiptNotFound) when the receipt is stale (acked already, or
    /// redelivered since); transport errors.
    pub async fn ack(&self, msg: &ReceivedMessage) -> Result<(), ClientError> {
        self.ack_handle(&msg.receipt_handle).await
    }

    /// Acks by receipt handle.
    ///
    /// # Errors
    /// As [`Consumer::ack`].
    pub async fn ack_handle(&self, handle: &str) -> Result<(), ClientError> {
        let req = pb::AckRequest {
            group: self.group.clone(),
            receipt_handles: vec![handle.to_owned()],
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.consumer();
                async move { c.ack(r).await }
            })
            .await?;
        check(resp.status)?;
        check(resp.results.into_iter().next())
    }

    /// Acks several messages in one request; one result per message, in order.
    ///
    /// # Errors
    /// Transport errors for the whole request.
    pub async fn ack_batch(
        &self,
        msgs: &[ReceivedMessage],
    ) -> Result<Vec<Result<(), ClientError>>, ClientError> {
        let req = pb::AckRequest {
            group: self.group.clone(),
            receipt_handles: msgs.iter().map(|m| m.receipt_handle.clone()).collect(),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.consumer();
                async move { c.ack(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp.results.into_iter().map(|s| check(Some(s))).collect())
    }

    /// Fails the delivery: the broker redelivers it later (reconsume times
    /// plus one) after the delay level its reconsume times choose, or after `delay`
    /// rounded up to a level; after `max_reconsume_times` failures it goes to
    /// the group's dead-letter queue. `reason` is kept with the message.
    ///
    /// # Errors
    /// As [`Consumer::ack`].
    pub async fn nack(
        &self,
        msg: &ReceivedMessage,
        reason: &str,
        delay: Option<Duration>,
    ) -> Result<(), ClientError> {
        let req = pb::NackRequest {
            group: self.group.clone(),
            receipt_handle: msg.receipt_handle.clone(),
            reason: reason.to_owned(),
            delay_ms: delay.map(|d| d.as_millis() as u64),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.consumer();
                async move { c.nack(r).await }
            })
            .await?;
        check(resp.status)
    }

    /// Extends (or shortens) how long `msg` stays invisible, from now. Updates
    /// `msg`'s receipt handle and deadline.
    ///
    /// # Errors
    /// As [`Consumer::ack`].
    pub async fn change_invisible_duration(
        &self,
        msg: &mut ReceivedMessage,
        d: Duration,
    ) -> Result<(), ClientError> {
        let req = pb::ChangeInvisibleDurationRequest {
            group: self.group.clone(),
            receipt_handle: msg.receipt_handle.clone(),
            invisible_duration_ms: d.as_millis() as u64,
        };
        let resp = self
            .client
            .consumer()
            .change_invisible_duration(self.client.request(req, Duration::ZERO))
            .await
            .map_err(|s| self.client.transport_error(s))?
            .into_inner();
        check(resp.status)?;
        msg.receipt_handle = resp.receipt_handle;
        msg.invisible_until_ms = resp.invisible_until_ms;
        Ok(())
    }

    /// Runs `handler` on every message until `shutdown` completes, with at
    /// most `concurrency` handlers at once; acks on [`ConsumeResult::Success`],
    /// nacks on [`ConsumeResult::Retry`]. Waits for running handlers before
    /// returning. Receive errors are logged and retried after a pause.
    pub async fn run<F, Fut>(
        &self,
        concurrency: usize,
        handler: F,
        shutdown: impl Future<Output = ()>,
    ) where
        F: Fn(ReceivedMessage) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ConsumeResult> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let slots = Arc::new(Semaphore::new(concurrency.max(1)));
        tokio::pin!(shutdown);
        loop {
            let free = slots.available_permits().max(1) as u32;
            let received = tokio::select! {
                _ = &mut shutdown => break,
                r = self.receive(free, Duration::from_secs(5)) => r,
            };
            let msgs = match received {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "receive failed; retrying");
                    tokio::select! {
                        _ = &mut shutdown => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                    }
                }
            };
            for m in msgs {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                    break;
                };
                let handler = Arc::clone(&handler);
                let me = self.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    let result = handler(m.clone()).await;
                    let outcome = match result {
                        ConsumeResult::Success => me.ack(&m).await,
                        ConsumeResult::Retry { delay, reason } => me.nack(&m, &reason, delay).await,
                    };
                    if let Err(e) = outcome {
                        tracing::warn!(message_id = %m.message_id, error = %e, "ack/nack failed");
                    }
                });
            }
        }
        let _ = slots.acquire_many(concurrency.max(1) as u32).await;
    }
}
