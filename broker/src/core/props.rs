//! System properties: what the broker itself keeps in a record's
//! properties (names start with `halfmq.`, which clients may not use), and
//! the helpers that read them.

use halfmq_storage::Record;

/// Prefix of system properties; user properties may not use it.
pub const SYSTEM_PROPERTY_PREFIX: &str = "halfmq.";
/// A half's producer group.
pub const PRODUCER_GROUP_PROPERTY: &str = "halfmq.producer_group";
/// When a delayed message or a retry falls due, ms since the epoch by the
/// broker's clock (one name, one meaning, for both).
pub const DELIVER_AT_PROPERTY: &str = "halfmq.deliver_at_ms";
/// A failed delivery: the consumer's last failure reason.
pub const REASON_PROPERTY: &str = "halfmq.reason";
/// A failed delivery: first delivery to the group, ms since the epoch.
pub const FIRST_DELIVERY_PROPERTY: &str = "halfmq.first_delivery_ms";
/// A failed delivery: last (failed) delivery, ms since the epoch.
pub const LAST_DELIVERY_PROPERTY: &str = "halfmq.last_delivery_ms";
/// A failed delivery: the message's original topic.
pub const TOPIC_PROPERTY: &str = "halfmq.topic";
/// A failed delivery: where the message was in its topic,
/// `<queue id>:<queue offset>`.
pub const ORIGIN_PROPERTY: &str = "halfmq.origin";
/// A failed delivery in a broker group: the consumer group it failed in.
pub const CONSUMER_GROUP_PROPERTY: &str = "halfmq.consumer_group";
/// A failed delivery in a broker group: the offset it was delivered from,
/// `<progress queue id>:<queue offset>` (the queue id carries
/// `RETRY_QUEUE_BIT` for a retry level), marked done where the hand-off is
/// applied (`core/handoff.rs`).
pub const SOURCE_PROPERTY: &str = "halfmq.source";
/// A progress record: the leader's applied end when it took the oldest of
/// the progress snapshots the record carries (`core/handoff.rs`).
pub const AS_OF_PROPERTY: &str = "halfmq.as_of";
/// A send's idempotency key (exactly-once publish, `core/idempotence.rs`).
pub const IDEMPOTENCY_KEY_PROPERTY: &str = "halfmq.idempotency_key";
/// A message's message group (FIFO delivery, `core/fifo.rs`).
pub const MESSAGE_GROUP_PROPERTY: &str = "halfmq.message_group";

/// A message sent by a client that names its own messages: the rest of its
/// `ClientOrigin` (the message id is the idempotency key), as
/// `<born ms>\n<client id>\n<born host>`.
pub const CLIENT_PROPERTY: &str = "halfmq.client";

/// A property's value, if the record has it.
pub fn prop<'a>(r: &'a Record, key: &str) -> Option<&'a str> {
    r.properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// A numeric property, 0 when absent or unreadable.
pub fn prop_u64(r: &Record, key: &str) -> u64 {
    prop(r, key).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// The delivery time of a delayed message's (or a retry's) record, if it
/// has one.
pub fn deliver_at(rec: &Record) -> Option<u64> {
    prop(rec, DELIVER_AT_PROPERTY).and_then(|v| v.parse().ok())
}

/// The client's naming of a message (`CLIENT_PROPERTY` and the
/// idempotency key), if it was sent with one.
pub fn client_origin(r: &Record) -> Option<crate::core::types::ClientOrigin> {
    let v = prop(r, CLIENT_PROPERTY)?;
    let mut it = v.splitn(3, '\n');
    let born_ms = it.next()?.parse().ok()?;
    let client_id = it.next()?.to_owned();
    let born_host = it.next().unwrap_or_default().to_owned();
    Some(crate::core::types::ClientOrigin {
        message_id: prop(r, IDEMPOTENCY_KEY_PROPERTY)?.to_owned(),
        client_id,
        born_host,
        born_ms,
    })
}

/// The value of `CLIENT_PROPERTY` for `o`.
pub fn client_property(o: &crate::core::types::ClientOrigin) -> String {
    format!("{}\n{}\n{}", o.born_ms, o.client_id, o.born_host)
}

/// Strips system properties before a message is shown to a consumer or checker.
pub fn user_properties(props: Vec<(String, String)>) -> Vec<(String, String)> {
    props
        .into_iter()
        .filter(|(k, _)| !k.starts_with(SYSTEM_PROPERTY_PREFIX))
        .collect()
}
