//! Operators' changes in a broker group, made through the log so that every
//! member makes them and a failover keeps them: DLQ removals (purge,
//! redrive), consumer offset resets and topic deletions. On a single broker
//! each is made at once, as before.
//!
//! - **DLQ removals**: a `%DLQREMOVE%` control record (property
//!   `halfmq.consumer_group`, body: the DLQ queue offsets removed, u64
//!   little-endian each); a redrive proposes it in the same entry as the
//!   redriven messages. Applying it marks the offsets removed and saves the
//!   group's DLQ state to sled before the entry counts as applied.
//! - **Offset resets**: made on the leader, whose progress record is then
//!   proposed at once; the reset is acknowledged once that record is
//!   committed.
//! - **Topic deletions**: a `%TOPICDELETE%` control record (property
//!   `halfmq.topic`); every member deletes the topic when applying it (the
//!   leader checked first that no half or delayed message of it is pending;
//!   the check is made again, the same way everywhere, at apply).

use bytes::Bytes;
use halfmq_storage::{Record, RecordKind};

use super::admin::ResetTo;
use super::dlq::lock;
use super::props::{prop, CONSUMER_GROUP_PROPERTY, TOPIC_PROPERTY};
use super::Broker;
use crate::error::BrokerError;

/// Topic of DLQ removal records.
pub(crate) const DLQ_REMOVE_TOPIC: &str = "%DLQREMOVE%";
/// Topic of topic deletion records.
pub(crate) const TOPIC_DELETE_TOPIC: &str = "%TOPICDELETE%";

/// The record removing DLQ offsets `qos` of `group`.
pub(crate) fn dlq_removal_record(group: &str, qos: &[u64]) -> Record {
    let mut body = Vec::with_capacity(qos.len() * 8);
    for qo in qos {
        body.extend_from_slice(&qo.to_le_bytes());
    }
    Record {
        kind: RecordKind::System,
        topic: DLQ_REMOVE_TOPIC.to_owned(),
        properties: vec![(CONSUMER_GROUP_PROPERTY.to_owned(), group.to_owned())],
        body: Bytes::from(body),
        ..Record::default()
    }
}

/// What a control record of this module asks for.
pub(crate) enum GroupChange {
    /// DLQ offsets of a group removed.
    DlqRemoval(String, Vec<u64>),
    /// A topic deleted.
    TopicDeletion(String),
}

/// The change `r` asks for, if it is one of this module's records.
pub(crate) fn change_of(r: &Record) -> Option<GroupChange> {
    match r.topic.as_str() {
        DLQ_REMOVE_TOPIC => {
            let group = prop(r, CONSUMER_GROUP_PROPERTY)?.to_owned();
            let qos = r
                .body
                .chunks_exact(8)
                .filter_map(|c| c.try_into().ok().map(u64::from_le_bytes))
                .collect();
            Some(GroupChange::DlqRemoval(group, qos))
        }
        TOPIC_DELETE_TOPIC => Some(GroupChange::TopicDeletion(
            prop(r, TOPIC_PROPERTY)?.to_owned(),
        )),
        _ => None,
    }
}

impl Broker {
    /// Applies the changes of one entry, on every member, before its end
    /// counts as applied.
    pub(crate) fn apply_group_changes(&self, changes: Vec<GroupChange>) {
        for c in changes {
            match c {
                GroupChange::DlqRemoval(group, qos) => {
                    {
                        let mut removed = lock(&self.dlq_state().removed);
                        let p = removed.entry(group.clone()).or_default();
                        for qo in &qos {
                            p.skip(*qo);
                        }
                    }
                    if let Err(e) = self.dlq_state().save_group(&self.store, &group) {
                        tracing::error!(group, error = %e, "could not save the DLQ state");
                    }
                }
                GroupChange::TopicDeletion(name) => {
                    if self.topic(&name).is_none() {
                        continue;
                    }
                    if let Err(e) = self.delete_topic(&name) {
                        tracing::warn!(topic = %name, error = %e, "a replicated topic deletion was not made");
                    }
                }
            }
        }
    }

    /// Removes every live entry of a group's DLQ, through the broker group's
    /// log in a group. Returns how many.
    ///
    /// # Errors
    /// Invalid group name; in a group, as [`Broker::replicate`].
    pub async fn purge_dead_letters_everywhere(&self, group: &str) -> Result<usize, BrokerError> {
        if self.replication().is_none() {
            return self.purge_dead_letters(group);
        }
        super::names::check_group(group)?;
        self.check_serving()?;
        let live = self.dlq_live(group);
        let qos: Vec<u64> = live.iter().flat_map(|(q, _)| q.iter().copied()).collect();
        if !qos.is_empty() {
            self.replicate(vec![dlq_removal_record(group, &qos)])
                .await?;
        }
        tracing::info!(group, count = live.len(), "dead letters purged");
        Ok(live.len())
    }

    /// Resets a group's consumer offsets on a topic (see
    /// [`Broker::reset_offset`]); in a group, acknowledged once the
    /// leader's progress record carrying the reset is committed.
    ///
    /// # Errors
    /// As [`Broker::reset_offset`]; in a group, as [`Broker::replicate`]
    /// (the reset may then be lost with a failover: try again).
    pub async fn reset_offset_everywhere(
        self: &std::sync::Arc<Self>,
        group: &str,
        topic: &str,
        to: ResetTo,
    ) -> Result<Vec<(u32, u64)>, BrokerError> {
        if self.replication().is_some() {
            self.check_serving()?;
        }
        let b = std::sync::Arc::clone(self);
        let (g, t) = (group.to_owned(), topic.to_owned());
        let offsets = tokio::task::spawn_blocking(move || b.reset_offset(&g, &t, to))
            .await
            .unwrap_or_else(|e| Err(BrokerError::Internal(format!("reset offset: {e}"))))?;
        if self.replication().is_some() {
            self.propose_progress().await?;
        }
        Ok(offsets)
    }

    /// Deletes a topic (see [`Broker::delete_topic`]); in a group, through
    /// the log, on every member.
    ///
    /// # Errors
    /// As [`Broker::delete_topic`]; in a group, as [`Broker::replicate`].
    pub async fn delete_topic_everywhere(
        self: &std::sync::Arc<Self>,
        name: &str,
    ) -> Result<(), BrokerError> {
        if self.replication().is_none() {
            let b = std::sync::Arc::clone(self);
            let n = name.to_owned();
            return tokio::task::spawn_blocking(move || b.delete_topic(&n))
                .await
                .unwrap_or_else(|e| Err(BrokerError::Internal(format!("delete topic: {e}"))));
        }
        super::names::check_topic(name)?;
        self.check_serving()?;
        if self.topic(name).is_none() {
            return Err(BrokerError::TopicNotFound(name.to_owned()));
        }
        let (halves, delayed) = self.tx_state().pending_in_topic(name);
        if halves + delayed > 0 {
            return Err(BrokerError::TopicBusy(format!(
                "topic {name} has {halves} pending half messages and {delayed} delayed messages: \
                 resolve them (halfmq tx pending / tx end) or wait until they are delivered, then delete it"
            )));
        }
        let rec = Record {
            kind: RecordKind::System,
            topic: TOPIC_DELETE_TOPIC.to_owned(),
            properties: vec![(TOPIC_PROPERTY.to_owned(), name.to_owned())],
            ..Record::default()
        };
        self.replicate(vec![rec]).await?;
        self.forget_queue_offsets_of(name).await;
        if self.topic(name).is_some() {
            return Err(BrokerError::TopicBusy(format!(
                "topic {name} got a pending half or delayed message before its deletion was applied; \
                 resolve it and delete it again"
            )));
        }
        Ok(())
    }
}

/// The removal record of the dead letters `chosen` (their DLQ offsets),
/// proposed with a redrive.
pub(crate) fn dlq_removal_for(group: &str, chosen: &[(Vec<u64>, Record)]) -> Record {
    let qos: Vec<u64> = chosen.iter().flat_map(|(q, _)| q.iter().copied()).collect();
    dlq_removal_record(group, &qos)
}
