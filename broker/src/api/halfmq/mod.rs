//! The `halfmq.v1` gRPC services: convert wire types to domain types, call
//! the broker, convert back. Every broker decision is a `Status` in the
//! response; gRPC errors are left to transport failures.
//!
//! # Layout
//! - this module: [`Services`], status codes ([`code_of`]), conversions.
//! - `producer`, `consumer`, `admin`, `security`: one gRPC service each.

mod admin;
mod consumer;
mod producer;
mod security;

use std::sync::Arc;

use halfmq_proto::v1 as pb;
use tonic::Response;

use crate::auth::policy::{Action, Resource};
use crate::auth::verify::Principal;
use crate::core::transactions::Resolution;
use crate::core::types::{DeliveredMessage, OutgoingMessage, QueueChoice};
use crate::core::Broker;
use crate::error::BrokerError;

/// The wire status code of an error. Stable: see README "Status codes".
pub fn code_of(e: &BrokerError) -> pb::Code {
    use pb::Code;
    match e {
        BrokerError::BadRequest(_) | BrokerError::Config(_) => Code::BadRequest,
        BrokerError::InvalidTopic(_) => Code::InvalidTopic,
        BrokerError::InvalidGroup(_) => Code::InvalidGroup,
        BrokerError::InvalidTagExpression(_) => Code::InvalidTagExpression,
        BrokerError::InvalidQueueId { .. } => Code::InvalidQueueId,
        BrokerError::InvalidReceiptHandle(_) => Code::InvalidReceiptHandle,
        BrokerError::ReservedName(_) => Code::ReservedName,
        BrokerError::TopicNotFound(_) => Code::TopicNotFound,
        BrokerError::ReceiptNotFound => Code::ReceiptNotFound,
        BrokerError::InvalidTransactionId(_) => Code::InvalidTransactionId,
        BrokerError::TransactionNotFound(_) => Code::TransactionNotFound,
        BrokerError::TransactionConflict(_) => Code::TransactionConflict,
        BrokerError::TooManyPendingHalves(_) => Code::TooManyPendingHalves,
        BrokerError::TopicExists(_) => Code::TopicExists,
        BrokerError::TopicBusy(_) => Code::TopicBusy,
        BrokerError::MessageTooLarge { .. } => Code::MessageTooLarge,
        BrokerError::BatchTooLarge(_) => Code::BatchTooLarge,
        BrokerError::TooManyRequests(_) => Code::TooManyRequests,
        BrokerError::Storage(halfmq_storage::Error::RecordTooLarge { .. }) => Code::MessageTooLarge,
        BrokerError::Storage(e) if e.is_storage_full() => Code::StorageFull,
        BrokerError::Storage(_) => Code::StorageError,
        BrokerError::Internal(_) => Code::Internal,
        BrokerError::ShuttingDown => Code::ShuttingDown,
        BrokerError::NotLeader(_) => Code::NotLeader,
        BrokerError::LeadershipLost(_) => Code::LeadershipLost,
        BrokerError::UserNotFound(_) => Code::UserNotFound,
        BrokerError::UserExists(_) => Code::UserExists,
        // Answered as gRPC PERMISSION_DENIED before a response is made.
        BrokerError::PermissionDenied { .. } => Code::BadRequest,
    }
}

pub(super) fn ok() -> Option<pb::Status> {
    Some(pb::Status {
        code: pb::Code::Ok as i32,
        message: String::new(),
        leader: String::new(),
    })
}

pub(super) fn status(e: &BrokerError) -> Option<pb::Status> {
    let code = code_of(e);
    if code == pb::Code::Internal || code == pb::Code::StorageError {
        tracing::error!(error = %e, "request failed");
    } else if code == pb::Code::StorageFull {
        tracing::warn!(error = %e, "request refused: disk full");
    } else {
        tracing::debug!(error = %e, "request refused");
    }
    Some(pb::Status {
        code: code as i32,
        message: e.to_string(),
        leader: match e {
            BrokerError::NotLeader(Some(l)) | BrokerError::LeadershipLost(Some(l)) => l.clone(),
            _ => String::new(),
        },
    })
}

pub(super) use crate::core::names::parse_message_id;

pub(super) fn outgoing(m: pb::Message) -> OutgoingMessage {
    let queue = match m.queue {
        Some(pb::message::Queue::QueueId(q)) => QueueChoice::Id(q),
        Some(pb::message::Queue::ShardingKey(k)) => QueueChoice::Key(k),
        None => QueueChoice::RoundRobin,
    };
    let mut properties: Vec<(String, String)> = m.properties.into_iter().collect();
    properties.sort();
    OutgoingMessage {
        topic: m.topic,
        queue,
        tag: m.tag,
        keys: m.keys,
        delay_ms: m.delay_ms,
        properties,
        body: m.body,
        idempotency_key: m.idempotency_key,
        message_group: m.message_group,
        origin: None,
    }
}

/// Implements the `Producer`, `Consumer` and `Admin` services over a broker.
#[derive(Debug, Clone)]
pub struct Services {
    broker: Arc<Broker>,
}

impl Services {
    /// Services over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Services { broker }
    }
}

pub(super) type Rpc<T> = Result<Response<T>, tonic::Status>;

/// Who sent a request (set by the auth gate; `None` with auth off).
pub(super) fn who<T>(req: &tonic::Request<T>) -> Option<Principal> {
    req.extensions().get::<Principal>().cloned()
}

/// The gRPC answer of a refusal: `PERMISSION_DENIED` for a denial.
pub(super) fn denied(e: BrokerError) -> tonic::Status {
    match e {
        BrokerError::PermissionDenied { .. } => tonic::Status::permission_denied(e.to_string()),
        e => tonic::Status::internal(e.to_string()),
    }
}

impl Services {
    /// Whether `who` may do `action` on `res` (always with auth off).
    ///
    /// # Errors
    /// gRPC `PERMISSION_DENIED` naming the action and resource; logged.
    pub(super) fn allow(
        &self,
        who: Option<&Principal>,
        action: Action,
        res: Resource<'_>,
        rpc: &str,
    ) -> Result<(), tonic::Status> {
        crate::auth::authorize(self.broker.auth_users(), who, action, &res, rpc).map_err(denied)
    }

    /// Whether `who` may do `action` on every topic of `msgs`.
    ///
    /// # Errors
    /// As [`Services::allow`], for the first topic refused.
    pub(super) fn allow_topics(
        &self,
        who: Option<&Principal>,
        action: Action,
        msgs: &[pb::Message],
        rpc: &str,
    ) -> Result<(), tonic::Status> {
        if self.broker.auth_users().is_none() {
            return Ok(());
        }
        let mut last: Option<&str> = None;
        for m in msgs {
            if last != Some(m.topic.as_str()) {
                self.allow(who, action, Resource::Topic(&m.topic), rpc)?;
                last = Some(&m.topic);
            }
        }
        Ok(())
    }

    /// Whether `who` may do one of `actions` on `res` (listings show only
    /// such resources; nothing is logged).
    pub(super) fn sees(
        &self,
        who: Option<&Principal>,
        actions: &[Action],
        res: Resource<'_>,
    ) -> bool {
        crate::auth::permits_any(self.broker.auth_users(), who, actions, &res)
    }

    /// Whether `who` may do one of `actions` on `res`.
    ///
    /// # Errors
    /// As [`Services::allow`], naming the first action.
    pub(super) fn allow_any(
        &self,
        who: Option<&Principal>,
        actions: &[Action],
        res: Resource<'_>,
        rpc: &str,
    ) -> Result<(), tonic::Status> {
        crate::auth::authorize_any(self.broker.auth_users(), who, actions, &res, rpc)
            .map_err(denied)
    }

    /// Logs an admin action of `who` (target `halfmq::audit`).
    pub(super) fn audit(
        &self,
        who: Option<&Principal>,
        action: &str,
        res: &str,
        status: &Option<pb::Status>,
    ) {
        let outcome = status
            .as_ref()
            .and_then(|s| pb::Code::try_from(s.code).ok())
            .map_or("?", |c| c.as_str_name());
        crate::auth::audit_admin(who.map_or("-", Principal::name), action, res, outcome);
    }
}

/// A delivered message on the wire, with `receipt_handle` (empty for a
/// check-back's copy of a half).
pub(super) fn wire_message(m: DeliveredMessage, receipt_handle: String) -> pb::ReceivedMessage {
    pb::ReceivedMessage {
        message_id: m.message_id.to_string(),
        topic: m.topic,
        queue_id: m.queue_id,
        queue_offset: m.queue_offset,
        tag: m.tag,
        keys: m.keys,
        properties: m.properties.into_iter().collect(),
        body: m.body,
        reconsume_times: m.reconsume_times,
        receipt_handle,
        store_timestamp_ms: m.store_timestamp_ms,
        invisible_until_ms: m.invisible_until_ms,
        original_queue_offset: m.original_queue_offset,
        retry: m.retry,
        message_group: m.message_group.unwrap_or_default(),
    }
}

pub(super) fn resolution(r: i32) -> Option<Resolution> {
    match pb::Resolution::try_from(r).ok()? {
        pb::Resolution::Commit => Some(Resolution::Commit),
        pb::Resolution::Rollback => Some(Resolution::Rollback),
        pb::Resolution::Unknown => Some(Resolution::Unknown),
        pb::Resolution::Unspecified => None,
    }
}

pub(super) type SessionStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::SessionDown, tonic::Status>> + Send>,
>;

pub(super) fn down(kind: pb::session_down::Kind) -> Result<pb::SessionDown, tonic::Status> {
    Ok(pb::SessionDown { kind: Some(kind) })
}
