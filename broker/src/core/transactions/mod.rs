//! Transactional messages: half messages, EndTransaction, check-back.
//!
//! # What is written
//! - A half message is one `Half` record (body, keys, properties; the producer
//!   group in the system property `halfmq.producer_group`). It gets no queue
//!   offset: no consumer can see it.
//! - A commit is one small `TxCommit` record (no body) pointing at the half;
//!   its consume-queue entry points at the half, so the body is written once.
//!   A rollback is one small `TxRollback` record. A half given up after
//!   `check_max` checks gets a small `System` record in the system topic
//!   `%TRANS_CHECK_MAX_TIME%`. Checking a half writes nothing.
//!
//! # State
//! In memory: the [`CheckScheduler`](crate::core::txcheck::CheckScheduler) (every unresolved half, deadline-ordered)
//! and a bounded cache of recent resolutions. In sled, saved at every broker
//! checkpoint: the pending halves that outlived a checkpoint (`tx_pending`)
//! and the log offset they reflect (`tx_meta/scan_from`). A half resolved
//! between two checkpoints costs no sled write at all. Resolutions live in
//! the log only: a repeated end of a half no longer pending is answered from
//! the cache, else by reading forward from the half to its end record.
//!
//! # Restart
//! Load `tx_pending` and `scan_from`, then replay every transactional record
//! of the commit log from `scan_from`: halves are added (unless already
//! known), ends remove them and record the resolution, give-up records mark
//! them. Every step is idempotent, so a checkpoint torn between sled trees is
//! harmless. Records of tx kinds are appended under the tx lock, so the
//! snapshot offset and the in-memory state always agree.
//!
//! # Transaction id
//! `<physical offset of the half, 16 hex digits><message id, 32 hex digits>`.
//!
//! # Layout
//! - [`state`]: [`TxState`], the transaction state and its persistence:
//!   what replaying the log rebuilds, producer sessions, saves.
//! - `ops`: the broker's transactional operations (half sends,
//!   EndTransaction, check answers, listings).
//! - `notes`: the operator's note on each pending half.
//! - The check-back driver is a background service: `crate::services::check_back`.

mod notes;
mod ops;
pub use ops::PreparedEnds;
pub mod state;

pub use state::TxState;

use halfmq_storage::MessageId;

use crate::core::secret::{hex, unhex, Domain, Secret};
use crate::core::types::DeliveredMessage;
use crate::error::BrokerError;

pub use crate::core::props::{user_properties, DELIVER_AT_PROPERTY};
pub use crate::core::props::{PRODUCER_GROUP_PROPERTY, SYSTEM_PROPERTY_PREFIX};

/// System topic of given-up halves (RocketMQ: TRANS_CHECK_MAX_TIME_TOPIC).
pub const GIVEN_UP_TOPIC: &str = "%TRANS_CHECK_MAX_TIME%";
/// System producer group of delayed messages: a delayed send is stored as a
/// half of this group, due at its delivery time, and committed then by the
/// check driver instead of being checked (no client can use `%` names).
pub const DELAY_GROUP: &str = "%DELAY%";

/// How a transaction ended, or a checker's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Make the message visible.
    Commit,
    /// Discard it.
    Rollback,
    /// (Checker answers only.) Not known yet.
    Unknown,
}

/// Who ended a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndSource {
    /// The producer that sent the half.
    Producer,
    /// A check-back answer.
    Check,
    /// An operator (`halfmq tx end`).
    Operator,
    /// The broker's timer delivering a due delayed message (never from a
    /// request: only it may end a delayed message).
    DelayTimer,
}

/// A transaction id: the half's physical offset and its message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionId {
    /// Physical offset of the half record.
    pub offset: u64,
    /// The half's message id.
    pub message_id: MessageId,
}

impl TransactionId {
    /// 80 hex digits: the offset (16), the message id (32) and the tag (32)
    /// of the broker secret over both, so that an id cannot be guessed from
    /// offsets and message ids that consumers see.
    pub fn encode(&self, secret: &Secret) -> String {
        let off = self.offset.to_be_bytes();
        let tag = secret.tag(Domain::Transaction, &[&off, &self.message_id.0]);
        format!("{:016X}{}{}", self.offset, self.message_id, hex(&tag))
    }

    /// Parses [`TransactionId::encode`]'s form and checks its tag (constant
    /// time) before anything is read.
    ///
    /// # Errors
    /// [`BrokerError::InvalidTransactionId`] for an id that is not 80 hex
    /// digits; [`BrokerError::TransactionNotFound`] for a wrong tag (as for a
    /// well-formed id of no half: a prober learns nothing).
    pub fn decode(s: &str, secret: &Secret) -> Result<TransactionId, BrokerError> {
        let bad = || BrokerError::InvalidTransactionId(s.to_owned());
        if s.len() != 80 || !s.is_ascii() {
            return Err(bad());
        }
        let offset = unhex::<8>(&s[..16])
            .map(u64::from_be_bytes)
            .ok_or_else(bad)?;
        let message_id = MessageId::from_hex(&s[16..48]).ok_or_else(bad)?;
        let tag = unhex::<16>(&s[48..]).ok_or_else(bad)?;
        let id = TransactionId { offset, message_id };
        let off = offset.to_be_bytes();
        if !secret.verify(Domain::Transaction, &[&off, &message_id.0], &tag) {
            return Err(BrokerError::TransactionNotFound(s.to_owned()));
        }
        Ok(id)
    }
}

/// A check request for a producer session.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    /// Transaction id.
    pub transaction_id: String,
    /// Producer group.
    pub producer_group: String,
    /// This check's number for the half: 1 for the first check-back.
    pub check_times: u32,
    /// The half message.
    pub message: DeliveredMessage,
}

/// An unresolved half for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTransaction {
    /// Transaction id.
    pub transaction_id: String,
    /// Message id.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Producer group.
    pub producer_group: String,
    /// Since stored, ms.
    pub age_ms: u64,
    /// Checks delivered.
    pub check_times: u32,
    /// Given up.
    pub given_up: bool,
    /// Why it is still pending.
    pub note: String,
}

/// Result of a half send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfReceipt {
    /// Transaction id.
    pub transaction_id: String,
    /// Message id.
    pub message_id: MessageId,
    /// Queue id it will be delivered in.
    pub queue_id: u32,
    /// The idempotency key was stored before: the first half's receipt.
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transaction_id_round_trip_and_forgeries() {
        let secret = Secret::random();
        let id = TransactionId {
            offset: 123_456,
            message_id: MessageId([0xAB; 16]),
        };
        let s = id.encode(&secret);
        assert_eq!(s.len(), 80);
        assert_eq!(TransactionId::decode(&s, &secret).unwrap(), id);
        assert_eq!(
            TransactionId::decode(&s.to_lowercase(), &secret).unwrap(),
            id
        );
        // The old, tagless form, a neighbour's offset, another broker's key.
        assert!(TransactionId::decode(&s[..48], &secret).is_err());
        let other = TransactionId {
            offset: 123_457,
            ..id
        };
        let forged = format!("{}{}", &other.encode(&Secret::random())[..48], &s[48..]);
        assert!(TransactionId::decode(&forged, &secret).is_err());
        assert!(TransactionId::decode(&id.encode(&Secret::random()), &secret).is_err());
        assert!(TransactionId::decode("zz", &secret).is_err());
        assert!(TransactionId::decode(&"G".repeat(80), &secret).is_err());
    }
}
