//! The broker's domain types at its API edges: what is sent, where it went,
//! what is delivered and how a delivery is named (receipt handles). No
//! protobuf: the API modules convert.

use bytes::Bytes;
use halfmq_storage::MessageId;

use crate::core::secret::{hex, unhex, Domain, Secret, TAG_BYTES};
use crate::error::BrokerError;

/// How a message picks its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueChoice {
    /// Round robin over the topic's queues.
    RoundRobin,
    /// This queue id.
    Id(u32),
    /// Hash of this key onto the queues (same key, same queue).
    Key(String),
}

/// A message to send, in domain form.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Topic.
    pub topic: String,
    /// Queue choice.
    pub queue: QueueChoice,
    /// Tag; empty for none.
    pub tag: String,
    /// Business keys.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
    /// Delayed delivery: visible this many ms after it is stored; 0 = at
    /// once. Ordinary sends only; at most `max_delay_ms`.
    pub delay_ms: u64,
    /// Idempotency key (1 to 128 bytes), if any: see `dedup_window_ms`.
    pub idempotency_key: Option<String>,
    /// Message group (1 to 128 bytes), if any: picks the queue (unless
    /// one is chosen) and orders delivery in FIFO consumer groups
    /// (`fifo.rs`).
    pub message_group: Option<String>,
    /// The sending client's own naming of the message (RocketMQ clients),
    /// if any: kept with it and shown to clients that read it.
    pub origin: Option<ClientOrigin>,
}

/// How a client that names its own messages (RocketMQ 5 clients) named
/// one: its message id is the send's idempotency key (1 to 128 bytes), the
/// rest is kept in one system property (`props::CLIENT_PROPERTY`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientOrigin {
    /// The client's message id.
    pub message_id: String,
    /// The sending client's id (its `x-mq-client-id`, at most
    /// `MAX_CLIENT_FIELD_BYTES`): a half's check-backs go preferably to a
    /// session of that client.
    pub client_id: String,
    /// The host the client says it runs on (at most `MAX_CLIENT_FIELD_BYTES`).
    pub born_host: String,
    /// When the client made the message, by its clock, ms since the epoch.
    pub born_ms: u64,
}

/// Where a sent message went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// Broker-assigned message id.
    pub message_id: MessageId,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset; `None` for a delayed message, which gets one when it
    /// becomes due.
    pub queue_offset: Option<u64>,
    /// When a delayed message becomes visible, broker clock, ms since the
    /// epoch; 0 for an ordinary one.
    pub deliver_at_ms: u64,
    /// The idempotency key was stored before: this is the first send's
    /// receipt, nothing was stored now.
    pub duplicate: bool,
}

/// Identifies one delivery; encoded as the wire's receipt handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Topic (the consumer's, also for retries).
    pub topic: String,
    /// Queue id (for a retry: the delay level).
    pub queue_id: u32,
    /// Queue offset (for a retry: in the retry level's queue).
    pub queue_offset: u64,
    /// Lease sequence number.
    pub seq: u64,
    /// Whether this delivery came from the group's retry queue of level
    /// `queue_id`.
    pub retry: bool,
}

impl Receipt {
    /// `[R]<queue id>.<queue offset>.<seq>.<topic>` (topics contain no '.';
    /// `R` marks a retry delivery).
    pub fn encode(&self) -> String {
        format!(
            "{}{}.{}.{}.{}",
            if self.retry { "R" } else { "" },
            self.queue_id,
            self.queue_offset,
            self.seq,
            self.topic
        )
    }

    /// Parses [`Receipt::encode`]'s form.
    ///
    /// # Errors
    /// [`BrokerError::InvalidReceiptHandle`].
    pub fn decode(s: &str) -> Result<Receipt, BrokerError> {
        let bad = || BrokerError::InvalidReceiptHandle(s.to_owned());
        let (retry, rest) = match s.strip_prefix('R') {
            Some(r) => (true, r),
            None => (false, s),
        };
        let mut it = rest.splitn(4, '.');
        let queue_id = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let queue_offset = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let seq = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let topic = it
            .next()
            .filter(|t| !t.is_empty())
            .ok_or_else(bad)?
            .to_owned();
        Ok(Receipt {
            topic,
            queue_id,
            queue_offset,
            seq,
            retry,
        })
    }

    /// The receipt handle given to consumer group `group`:
    /// `<tag>.<encode()>`, the tag (32 hex digits) of the broker secret over
    /// the group and the rest, so that a handle cannot be guessed and is
    /// valid only for the group that received it.
    pub fn handle(&self, group: &str, secret: &Secret) -> String {
        let body = self.encode();
        let tag = secret.tag(Domain::Receipt, &[group.as_bytes(), body.as_bytes()]);
        format!("{}.{body}", hex(&tag))
    }

    /// Parses a [`Receipt::handle`] of `group`, checking its tag (constant
    /// time).
    ///
    /// # Errors
    /// [`BrokerError::InvalidReceiptHandle`] for a malformed or forged
    /// handle, or one given to another group (the same error for all).
    pub fn from_handle(s: &str, group: &str, secret: &Secret) -> Result<Receipt, BrokerError> {
        let bad = || BrokerError::InvalidReceiptHandle(s.to_owned());
        let (tag, body) = s.split_once('.').ok_or_else(bad)?;
        let tag = unhex::<TAG_BYTES>(tag).ok_or_else(bad)?;
        if !secret.verify(Domain::Receipt, &[group.as_bytes(), body.as_bytes()], &tag) {
            return Err(bad());
        }
        Receipt::decode(body)
    }

    pub(crate) fn level(&self) -> Option<u32> {
        self.retry.then_some(self.queue_id)
    }
}

/// A message delivered to a consumer.
#[derive(Debug, Clone)]
pub struct DeliveredMessage {
    /// Message id.
    pub message_id: MessageId,
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
    pub properties: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
    /// Failed deliveries to this group before this one.
    pub reconsume_times: u32,
    /// Receipt for ack / nack / change invisible duration.
    pub receipt: Receipt,
    /// Broker clock when stored, ms since the epoch.
    pub store_timestamp_ms: u64,
    /// When it becomes visible again unless acked, ms since the epoch.
    pub invisible_until_ms: u64,
    /// Whether this delivery comes from the group's retry queue (then
    /// `queue_offset` is its position there).
    pub retry: bool,
    /// For a retry: the message's queue offset in `queue_id` of its topic,
    /// when the retry record says (retries scheduled by older brokers do not).
    pub original_queue_offset: Option<u64>,
    /// The message group it was sent with, if any.
    pub message_group: Option<String>,
    /// The sending client's naming of it, if it gave one.
    pub origin: Option<ClientOrigin>,
}

/// A receive request, in domain form.
#[derive(Debug, Clone)]
pub struct ReceiveRequest {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Tag expression (`*`, empty, or `a||b`).
    pub tag_expression: String,
    /// At most this many messages (0 = 1).
    pub max_messages: u32,
    /// Invisible duration, ms (0 = the configured default).
    pub invisible_duration_ms: u64,
    /// Long-poll wait, ms.
    pub wait_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_round_trip() {
        let r = Receipt {
            topic: "a-b_c".into(),
            queue_id: 3,
            queue_offset: 99,
            seq: 7,
            retry: false,
        };
        assert_eq!(Receipt::decode(&r.encode()).unwrap(), r);
        let rr = Receipt {
            retry: true,
            ..r.clone()
        };
        assert!(rr.encode().starts_with('R'));
        assert_eq!(Receipt::decode(&rr.encode()).unwrap(), rr);
        assert!(Receipt::decode("x.1.2.t").is_err());
        assert!(Receipt::decode("1.2.3.").is_err());
    }

    #[test]
    fn receipt_handles_are_bound_to_their_group_and_cannot_be_forged() {
        let secret = Secret::random();
        let r = Receipt {
            topic: "orders".into(),
            queue_id: 0,
            queue_offset: 5,
            seq: 1,
            retry: false,
        };
        let h = r.handle("billing", &secret);
        assert_eq!(Receipt::from_handle(&h, "billing", &secret).unwrap(), r);
        assert!(Receipt::from_handle(&h, "shipping", &secret).is_err());
        // The old untagged form, a neighbour's offset under the same tag,
        // and a handle of another broker.
        assert!(Receipt::from_handle(&r.encode(), "billing", &secret).is_err());
        let (tag, _) = h.split_once('.').unwrap();
        let next = Receipt {
            queue_offset: 6,
            ..r.clone()
        };
        let forged = format!("{tag}.{}", next.encode());
        assert!(Receipt::from_handle(&forged, "billing", &secret).is_err());
        let elsewhere = r.handle("billing", &Secret::random());
        assert!(Receipt::from_handle(&elsewhere, "billing", &secret).is_err());
        assert!(Receipt::from_handle("", "billing", &secret).is_err());
    }
}
