//! Administration: [`Admin`] (topics, consumer groups, offsets, pending
//! transactions, dead letters, stats).

use std::time::Duration;

use halfmq_proto::v1 as pb;

use crate::{check, Client, ClientError, PendingTransaction};

/// Where [`Admin::reset_offset`] moves a group's consumer offsets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The earliest retained message of each queue.
    Earliest,
    /// The end of each queue: only messages sent from now on.
    Latest,
    /// The first message of each queue stored at or after this time (broker
    /// clock, ms since the epoch).
    Timestamp(u64),
}

/// A topic as listed by [`Admin::list_topics`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Queues.
    pub queues: u32,
    /// Visible messages, summed over queues.
    pub messages: u64,
}

/// Administration calls.
#[derive(Debug, Clone)]
pub struct Admin {
    client: Client,
}

impl Admin {
    /// Admin calls over `client`.
    pub fn new(client: Client) -> Self {
        Admin { client }
    }

    /// Creates a topic with `queues` queues (0 = the broker's default).
    ///
    /// # Errors
    /// [`Code::TopicExists`](crate::Code::TopicExists), [`Code::InvalidTopic`](crate::Code::InvalidTopic), transport errors.
    pub async fn create_topic(&self, name: &str, queues: u32) -> Result<(), ClientError> {
        let req = pb::CreateTopicRequest {
            name: name.to_owned(),
            queues,
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.create_topic(r).await }
            })
            .await?;
        check(resp.status)
    }

    /// Declares consumer group `group`; `fifo`: it receives each message
    /// group in send order, one message at a time. Again with the same
    /// kind: no-op.
    ///
    /// # Errors
    /// [`Code::BadRequest`](crate::Code::BadRequest) when declared already with the other kind,
    /// [`Code::InvalidGroup`](crate::Code::InvalidGroup), transport errors.
    pub async fn create_consumer_group(&self, group: &str, fifo: bool) -> Result<(), ClientError> {
        let req = pb::CreateConsumerGroupRequest {
            group: group.to_owned(),
            fifo,
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.create_consumer_group(r).await }
            })
            .await?;
        check(resp.status)
    }

    /// Declared consumer groups: (name, FIFO), by name.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn list_consumer_groups(&self) -> Result<Vec<(String, bool)>, ClientError> {
        let resp = self
            .client
            .call(pb::ListConsumerGroupsRequest {}, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.list_consumer_groups(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp.groups.into_iter().map(|g| (g.group, g.fifo)).collect())
    }

    /// Lists topics.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        let resp = self
            .client
            .call(pb::ListTopicsRequest {}, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.list_topics(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp
            .topics
            .into_iter()
            .map(|t| TopicInfo {
                name: t.name,
                queues: t.queues,
                messages: t.messages,
            })
            .collect())
    }

    /// Unresolved half messages (given-up ones included), oldest first.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn list_transactions(&self) -> Result<Vec<PendingTransaction>, ClientError> {
        let resp = self
            .client
            .call(pb::ListTransactionsRequest {}, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.list_transactions(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp
            .transactions
            .into_iter()
            .map(|t| PendingTransaction {
                transaction_id: t.transaction_id,
                message_id: t.message_id,
                topic: t.topic,
                producer_group: t.producer_group,
                age_ms: t.age_ms,
                check_times: t.check_times,
                given_up: t.given_up,
                note: t.note,
            })
            .collect())
    }

    /// A group's dead letters, oldest first (without bodies).
    ///
    /// # Errors
    /// [`Code::InvalidGroup`](crate::Code::InvalidGroup), transport errors.
    pub async fn list_dead_letters(&self, group: &str) -> Result<Vec<pb::DeadLetter>, ClientError> {
        self.dead_letters(group, false, None).await
    }

    /// A group's dead letters, oldest first, with body, tag, keys and
    /// properties; bodies past the broker's `max_batch_bytes` in all are
    /// left out (`body_omitted`): get those with [`Admin::dead_letter`].
    ///
    /// # Errors
    /// As [`Admin::list_dead_letters`].
    pub async fn list_dead_letters_with_bodies(
        &self,
        group: &str,
    ) -> Result<Vec<pb::DeadLetter>, ClientError> {
        self.dead_letters(group, true, None).await
    }

    /// One dead letter of a group by message id, with its body.
    ///
    /// # Errors
    /// As [`Admin::list_dead_letters`]; [`Code::BadRequest`](crate::Code::BadRequest) for a message id
    /// that is not 32 hex digits.
    pub async fn dead_letter(
        &self,
        group: &str,
        message_id: &str,
    ) -> Result<Option<pb::DeadLetter>, ClientError> {
        Ok(self
            .dead_letters(group, true, Some(message_id))
            .await?
            .into_iter()
            .next())
    }

    async fn dead_letters(
        &self,
        group: &str,
        with_bodies: bool,
        message_id: Option<&str>,
    ) -> Result<Vec<pb::DeadLetter>, ClientError> {
        let req = pb::ListDeadLettersRequest {
            group: group.to_owned(),
            limit: 0,
            with_bodies,
            message_id: message_id.unwrap_or_default().to_owned(),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.list_dead_letters(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp.dead_letters)
    }

    /// Moves `group`'s consumer offsets on `topic` (see [`ResetTo`]); its
    /// in-flight deliveries of the topic go stale. Returns (queue id, new
    /// consumer offset) per queue.
    ///
    /// # Errors
    /// [`Code::TopicNotFound`](crate::Code::TopicNotFound), bad names, transport errors.
    pub async fn reset_offset(
        &self,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<(u32, u64)>, ClientError> {
        use pb::reset_offset_request::To;
        let req = pb::ResetOffsetRequest {
            group: group.to_owned(),
            topic: topic.to_owned(),
            to: Some(match to {
                ResetTo::Earliest => To::Earliest(true),
                ResetTo::Latest => To::Latest(true),
                ResetTo::Timestamp(t) => To::TimestampMs(t),
            }),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.reset_offset(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp
            .offsets
            .into_iter()
            .map(|o| (o.queue_id, o.queue_offset))
            .collect())
    }

    /// Deletes a topic (its consume queues and every group's progress on it).
    ///
    /// # Errors
    /// [`Code::TopicNotFound`](crate::Code::TopicNotFound); [`Code::TopicBusy`](crate::Code::TopicBusy) while half messages or
    /// delayed messages of it are pending; transport errors.
    pub async fn delete_topic(&self, name: &str) -> Result<(), ClientError> {
        let req = pb::DeleteTopicRequest {
            name: name.to_owned(),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.delete_topic(r).await }
            })
            .await?;
        check(resp.status)
    }

    /// (group, dead letters) for every group with a dead-letter queue.
    ///
    /// # Errors
    /// Transport errors.
    pub async fn dead_letter_counts(&self) -> Result<Vec<(String, u64)>, ClientError> {
        let resp = self
            .client
            .call(pb::DeadLetterCountsRequest {}, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.dead_letter_counts(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp
            .counts
            .into_iter()
            .map(|c| (c.group, c.count))
            .collect())
    }

    /// Sends dead letters back to their group (one by message id, or all);
    /// returns how many.
    ///
    /// # Errors
    /// Bad group or message id, transport errors.
    pub async fn redrive_dead_letters(
        &self,
        group: &str,
        message_id: Option<&str>,
    ) -> Result<u64, ClientError> {
        let req = pb::RedriveDeadLettersRequest {
            group: group.to_owned(),
            message_id: message_id.unwrap_or_default().to_owned(),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.redrive_dead_letters(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp.count)
    }

    /// Removes every dead letter of a group; returns how many.
    ///
    /// # Errors
    /// Bad group, transport errors.
    pub async fn purge_dead_letters(&self, group: &str) -> Result<u64, ClientError> {
        let req = pb::PurgeDeadLettersRequest {
            group: group.to_owned(),
        };
        let resp = self
            .client
            .call(req, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.purge_dead_letters(r).await }
            })
            .await?;
        check(resp.status)?;
        Ok(resp.count)
    }

    /// The broker's counters (wire form: see `StatsResponse` in the proto).
    ///
    /// # Errors
    /// Transport errors.
    pub async fn stats(&self) -> Result<pb::StatsResponse, ClientError> {
        let resp = self
            .client
            .call(pb::StatsRequest {}, Duration::ZERO, |r| {
                let mut c = self.client.admin();
                async move { c.stats(r).await }
            })
            .await?;
        check(resp.status.clone())?;
        Ok(resp)
    }
}
