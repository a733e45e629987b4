//! RocketMQ wire messages to the core's domain types and back: resources
//! to names, system properties to an [`OutgoingMessage`], a
//! [`DeliveredMessage`] to a `Message` with its receipt handle, timestamps
//! and durations, body digests.

use std::time::Duration;

use halfmq_proto::rocketmq as rmq;
use md5::{Digest as _, Md5};

use crate::core::types::{ClientOrigin, DeliveredMessage, OutgoingMessage, QueueChoice};
use crate::error::BrokerError;

/// The broker name in routes (a single broker, or a broker group's leader).
pub(super) const BROKER_NAME: &str = "halfmq";

/// The message types every queue accepts.
pub(super) const ACCEPTED_TYPES: [rmq::MessageType; 4] = [
    rmq::MessageType::Normal,
    rmq::MessageType::Fifo,
    rmq::MessageType::Delay,
    rmq::MessageType::Transaction,
];

/// A resource's halfmq name: its `name`. Namespaces are not served.
///
/// # Errors
/// [`BrokerError::BadRequest`] for a missing resource or a namespace.
pub(super) fn name_of(r: Option<&rmq::Resource>, what: &str) -> Result<String, BrokerError> {
    let r = r.ok_or_else(|| BrokerError::BadRequest(format!("{what} is missing")))?;
    if !r.resource_namespace.is_empty() {
        return Err(BrokerError::BadRequest(format!(
            "{what} {:?} has namespace {:?}: halfmq serves no namespaces (leave it empty)",
            r.name, r.resource_namespace
        )));
    }
    Ok(r.name.clone())
}

/// The resource naming `name`.
pub(super) fn resource(name: &str) -> rmq::Resource {
    rmq::Resource {
        resource_namespace: String::new(),
        name: name.to_owned(),
    }
}

/// `seconds` and `nanos` in ms (negative = 0; saturating).
fn ms_of(seconds: i64, nanos: i32) -> u64 {
    u64::try_from(seconds).map_or(0, |s| {
        s.saturating_mul(1000)
            .saturating_add(u64::try_from(nanos).unwrap_or(0) / 1_000_000)
    })
}

/// A duration in ms (negative ones are 0; saturating).
pub(super) fn duration_ms(d: &prost_types::Duration) -> u64 {
    ms_of(d.seconds, d.nanos)
}

/// `ms` as a wire duration.
pub(super) fn duration(ms: u64) -> prost_types::Duration {
    let d = Duration::from_millis(ms);
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// ms since the epoch as a wire timestamp.
pub(super) fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A wire timestamp in ms since the epoch (before the epoch: 0).
pub(super) fn timestamp_ms(t: &prost_types::Timestamp) -> u64 {
    ms_of(t.seconds, t.nanos)
}

/// The upper-case hex MD5 of a body (RocketMQ's body digest).
pub(super) fn md5_hex(body: &[u8]) -> String {
    let d = Md5::digest(body);
    let mut s = String::with_capacity(32);
    for b in d {
        s.push_str(&format!("{b:02X}"));
    }
    s
}

/// What kind of send a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SendKind {
    /// Normal, FIFO or delayed: stored at once.
    Plain,
    /// A half message of a transaction.
    Half,
}

/// A wire message to send, as the core's [`OutgoingMessage`], with its
/// kind and the client's message id.
///
/// # Errors
/// [`BrokerError::BadRequest`] / [`BrokerError::InvalidTopic`] for what the
/// core would not take (missing message id, both a delay and a
/// transaction, a bad delivery time, a body encoding other than identity).
pub(super) fn outgoing(
    m: rmq::Message,
    client_id: &str,
    now_ms: u64,
) -> Result<(OutgoingMessage, SendKind), BrokerError> {
    let topic = name_of(m.topic.as_ref(), "the message's topic")?;
    let sp = m.system_properties.unwrap_or_default();
    if sp.message_id.is_empty() {
        return Err(BrokerError::BadRequest(
            "system_properties.message_id is missing".into(),
        ));
    }
    match rmq::Encoding::try_from(sp.body_encoding) {
        Ok(rmq::Encoding::Identity | rmq::Encoding::Unspecified) => {}
        _ => {
            return Err(BrokerError::BadRequest(
                "only identity body encoding is served (no GZIP)".into(),
            ))
        }
    }
    let kind = match rmq::MessageType::try_from(sp.message_type) {
        Ok(rmq::MessageType::Transaction) => SendKind::Half,
        _ => SendKind::Plain,
    };
    let delay_ms = match &sp.delivery_timestamp {
        Some(_) if kind == SendKind::Half => {
            return Err(BrokerError::BadRequest(
                "a transaction message cannot have a delivery timestamp".into(),
            ));
        }
        // A time already past is delivered at once.
        Some(t) => timestamp_ms(t).saturating_sub(now_ms),
        None => 0,
    };
    let mut properties: Vec<(String, String)> = m.user_properties.into_iter().collect();
    properties.sort();
    let queue = match u32::try_from(sp.queue_id) {
        // The client picked a queue of the route (FIFO: by its message
        // group's hash, so one group stays in one queue).
        Ok(q) => QueueChoice::Id(q),
        Err(_) => QueueChoice::RoundRobin,
    };
    let born_ms = sp.born_timestamp.as_ref().map_or(now_ms, timestamp_ms);
    let msg = OutgoingMessage {
        topic,
        queue,
        tag: sp.tag.unwrap_or_default(),
        keys: sp.keys,
        properties,
        body: m.body,
        delay_ms,
        idempotency_key: Some(sp.message_id.clone()),
        message_group: sp.message_group.filter(|g| !g.is_empty()),
        origin: Some(ClientOrigin {
            message_id: sp.message_id,
            client_id: client_id.to_owned(),
            born_host: sp.born_host,
            born_ms,
        }),
    };
    Ok((msg, kind))
}

/// The message id a RocketMQ client sees: its own when it sent the
/// message, else the broker's (32 hex digits).
pub(super) fn message_id_of(m: &DeliveredMessage) -> String {
    match &m.origin {
        Some(o) => o.message_id.clone(),
        None => m.message_id.to_string(),
    }
}

/// A delivered message on the wire. `receipt_handle` is empty for a
/// check-back's copy of a half; `store_host` is the broker's address.
pub(super) fn wire_message(
    m: DeliveredMessage,
    receipt_handle: Option<String>,
    message_type: rmq::MessageType,
    store_host: &str,
    now_ms: u64,
) -> rmq::Message {
    let message_id = message_id_of(&m);
    let (born_host, born_ms) = match &m.origin {
        Some(o) => (o.born_host.clone(), o.born_ms),
        None => (String::new(), m.store_timestamp_ms),
    };
    let message_type = if message_type == rmq::MessageType::Normal && m.message_group.is_some() {
        rmq::MessageType::Fifo
    } else {
        message_type
    };
    let sp = rmq::SystemProperties {
        tag: (!m.tag.is_empty()).then(|| m.tag.clone()),
        keys: m.keys,
        message_id,
        body_digest: Some(rmq::Digest {
            r#type: rmq::DigestType::Md5 as i32,
            checksum: md5_hex(&m.body),
        }),
        body_encoding: rmq::Encoding::Identity as i32,
        message_type: message_type as i32,
        born_timestamp: Some(timestamp(born_ms)),
        born_host,
        store_timestamp: Some(timestamp(m.store_timestamp_ms)),
        store_host: store_host.to_owned(),
        delivery_timestamp: None,
        queue_id: i32::try_from(m.queue_id).unwrap_or(i32::MAX),
        queue_offset: Some(i64::try_from(m.queue_offset).unwrap_or(i64::MAX)),
        invisible_duration: receipt_handle
            .as_ref()
            .map(|_| duration(m.invisible_until_ms.saturating_sub(now_ms))),
        receipt_handle,
        delivery_attempt: Some(
            i32::try_from(m.reconsume_times.saturating_add(1)).unwrap_or(i32::MAX),
        ),
        message_group: m.message_group,
        trace_context: None,
        orphaned_transaction_recovery_duration: None,
        dead_letter_queue: None,
    };
    rmq::Message {
        topic: Some(resource(&m.topic)),
        user_properties: m.properties.into_iter().collect(),
        system_properties: Some(sp),
        body: m.body,
    }
}

/// A route's endpoints for `addr` (`HOST:PORT`).
pub(super) fn endpoints(addr: &str) -> rmq::Endpoints {
    let (host, port) = match addr.rsplit_once(':') {
        Some((h, p)) => (h.trim_matches(['[', ']']), p.parse().unwrap_or(0)),
        None => (addr, 0),
    };
    let scheme = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => rmq::AddressScheme::IPv4,
        Ok(std::net::IpAddr::V6(_)) => rmq::AddressScheme::IPv6,
        Err(_) => rmq::AddressScheme::DomainName,
    };
    rmq::Endpoints {
        scheme: scheme as i32,
        addresses: vec![rmq::Address {
            host: host.to_owned(),
            port,
        }],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_is_upper_case_hex() {
        assert_eq!(md5_hex(b""), "D41D8CD98F00B204E9800998ECF8427E");
        assert_eq!(md5_hex(b"hello"), "5D41402ABC4B2A76B9719D911017C592");
    }

    #[test]
    fn times_round_trip_in_ms() {
        let t = timestamp(1_700_000_123_456);
        assert_eq!((t.seconds, t.nanos), (1_700_000_123, 456_000_000));
        assert_eq!(timestamp_ms(&t), 1_700_000_123_456);
        assert_eq!(duration_ms(&duration(15_250)), 15_250);
        assert_eq!(
            duration_ms(&prost_types::Duration {
                seconds: -3,
                nanos: 0
            }),
            0
        );
    }

    #[test]
    fn namespaces_are_refused_and_names_kept() {
        assert_eq!(
            name_of(Some(&resource("orders")), "topic").unwrap(),
            "orders"
        );
        let ns = rmq::Resource {
            resource_namespace: "prod".into(),
            name: "orders".into(),
        };
        assert!(name_of(Some(&ns), "topic").is_err());
        assert!(name_of(None, "topic").is_err());
    }

    #[test]
    fn a_message_keeps_the_clients_id_and_picks_its_kind() {
        let m = rmq::Message {
            topic: Some(resource("orders")),
            user_properties: [("k".to_owned(), "v".to_owned())].into(),
            system_properties: Some(rmq::SystemProperties {
                message_id: "01ABCDEF".into(),
                message_type: rmq::MessageType::Transaction as i32,
                queue_id: 2,
                born_host: "h1".into(),
                ..Default::default()
            }),
            body: bytes::Bytes::from_static(b"x"),
        };
        let (o, kind) = outgoing(m.clone(), "c1", 1000).unwrap();
        assert_eq!(kind, SendKind::Half);
        assert_eq!(o.idempotency_key.as_deref(), Some("01ABCDEF"));
        assert_eq!(o.queue, QueueChoice::Id(2));
        let origin = o.origin.unwrap();
        assert_eq!(
            (origin.client_id.as_str(), origin.born_host.as_str()),
            ("c1", "h1")
        );
        let mut delayed = m.clone();
        if let Some(sp) = delayed.system_properties.as_mut() {
            sp.message_type = rmq::MessageType::Delay as i32;
            sp.delivery_timestamp = Some(timestamp(61_000));
        }
        let (o, kind) = outgoing(delayed, "c1", 1000).unwrap();
        assert_eq!((kind, o.delay_ms), (SendKind::Plain, 60_000));
        let mut no_id = m;
        if let Some(sp) = no_id.system_properties.as_mut() {
            sp.message_id.clear();
        }
        assert!(outgoing(no_id, "c1", 1000).is_err());
    }
}
