//! Validation of topic and group names, tags, keys and properties, and tag
//! expressions. Fixed limits here are part of the wire contract (README,
//! "Limits").

use crate::error::BrokerError;

/// Longest topic or group name, bytes (RocketMQ's limit).
pub const MAX_NAME_BYTES: usize = 127;
/// Longest tag, bytes.
pub const MAX_TAG_BYTES: usize = 127;
/// Most keys per message.
pub const MAX_KEYS: usize = 32;
/// Longest key, bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Most user properties per message.
pub const MAX_PROPERTIES: usize = 64;
/// Longest property name, bytes.
pub const MAX_PROPERTY_NAME_BYTES: usize = 256;
/// Longest property value, bytes.
pub const MAX_PROPERTY_VALUE_BYTES: usize = 16 * 1024;
/// Longest idempotency key, bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;
/// Longest message group name, bytes.
pub const MAX_MESSAGE_GROUP_BYTES: usize = 128;
/// Longest client id or born host of a client's naming of a message, bytes.
pub const MAX_CLIENT_FIELD_BYTES: usize = 256;

fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_BYTES
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'%' | b'|' | b'_' | b'-'))
}

/// Checks a user topic name: `^[%|a-zA-Z0-9_-]+$`, at most 127 bytes, not
/// starting with `%` (reserved for system topics).
///
/// # Errors
/// [`BrokerError::InvalidTopic`] or [`BrokerError::ReservedName`].
pub fn check_topic(s: &str) -> Result<(), BrokerError> {
    if !name_ok(s) {
        return Err(BrokerError::InvalidTopic(format!(
            "topic {s:?} must match ^[%|a-zA-Z0-9_-]+$ and be 1..={MAX_NAME_BYTES} bytes"
        )));
    }
    if s.starts_with('%') {
        return Err(BrokerError::ReservedName(format!(
            "topic {s:?}: names starting with '%' are reserved"
        )));
    }
    Ok(())
}

/// Checks a consumer or producer group name (same rule as topics).
///
/// # Errors
/// [`BrokerError::InvalidGroup`] or [`BrokerError::ReservedName`].
pub fn check_group(s: &str) -> Result<(), BrokerError> {
    if !name_ok(s) {
        return Err(BrokerError::InvalidGroup(format!(
            "group {s:?} must match ^[%|a-zA-Z0-9_-]+$ and be 1..={MAX_NAME_BYTES} bytes"
        )));
    }
    if s.starts_with('%') {
        return Err(BrokerError::ReservedName(format!(
            "group {s:?}: names starting with '%' are reserved"
        )));
    }
    Ok(())
}

/// Checks a message's tag, keys and properties against the fixed limits.
///
/// # Errors
/// [`BrokerError::BadRequest`] saying which field.
pub fn check_message_fields(
    tag: &str,
    keys: &[String],
    properties: &[(String, String)],
) -> Result<(), BrokerError> {
    let bad = |m: String| Err(BrokerError::BadRequest(m));
    if tag.len() > MAX_TAG_BYTES || tag.contains("||") || tag.trim() != tag || tag == "*" {
        return bad(format!(
            "tag {tag:?}: at most {MAX_TAG_BYTES} bytes, no '||', no surrounding spaces, not '*'"
        ));
    }
    if keys.len() > MAX_KEYS {
        return bad(format!("{} keys, at most {MAX_KEYS}", keys.len()));
    }
    if let Some(k) = keys.iter().find(|k| k.len() > MAX_KEY_BYTES) {
        return bad(format!("key of {} bytes, at most {MAX_KEY_BYTES}", k.len()));
    }
    if properties.len() > MAX_PROPERTIES {
        return bad(format!(
            "{} properties, at most {MAX_PROPERTIES}",
            properties.len()
        ));
    }
    for (k, v) in properties {
        if k.is_empty() || k.len() > MAX_PROPERTY_NAME_BYTES {
            return bad(format!(
                "property name of {} bytes, must be 1..={MAX_PROPERTY_NAME_BYTES}",
                k.len()
            ));
        }
        if k.starts_with("halfmq.") {
            return bad(format!(
                "property {k:?}: names starting with 'halfmq.' are reserved"
            ));
        }
        if v.len() > MAX_PROPERTY_VALUE_BYTES {
            return bad(format!(
                "property {k:?} value of {} bytes, at most {MAX_PROPERTY_VALUE_BYTES}",
                v.len()
            ));
        }
    }
    Ok(())
}

/// A parsed tag expression: all tags, or a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagFilter {
    /// `*` or empty: every message.
    All,
    /// `a||b||c`: messages whose tag is one of these.
    AnyOf(Vec<String>),
}

impl TagFilter {
    /// Parses `*`, `` (empty) or `a||b`.
    ///
    /// # Errors
    /// [`BrokerError::InvalidTagExpression`] for an empty or over-long tag in
    /// the list.
    pub fn parse(expr: &str) -> Result<TagFilter, BrokerError> {
        let e = expr.trim();
        if e.is_empty() || e == "*" {
            return Ok(TagFilter::All);
        }
        let tags: Vec<String> = e.split("||").map(|t| t.trim().to_owned()).collect();
        if tags
            .iter()
            .any(|t| t.is_empty() || t.len() > MAX_TAG_BYTES || t == "*")
        {
            return Err(BrokerError::InvalidTagExpression(format!(
                "{expr:?}: use '*' or tags separated by '||'"
            )));
        }
        Ok(TagFilter::AnyOf(tags))
    }

    /// Whether a message with `tag` passes.
    pub fn matches(&self, tag: &str) -> bool {
        match self {
            TagFilter::All => true,
            TagFilter::AnyOf(v) => v.iter().any(|t| t == tag),
        }
    }
}

/// A message id given as text: 32 hex digits, or empty for none (every
/// message).
///
/// # Errors
/// [`BrokerError::BadRequest`] naming the text.
pub fn parse_message_id(s: &str) -> Result<Option<halfmq_storage::MessageId>, BrokerError> {
    if s.is_empty() {
        return Ok(None);
    }
    halfmq_storage::MessageId::from_hex(s)
        .map(Some)
        .ok_or_else(|| BrokerError::BadRequest(format!("message id {s:?} is not 32 hex digits")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_topic("Orders_1-a|b").is_ok());
        assert!(matches!(
            check_topic("%DLQ%g"),
            Err(BrokerError::ReservedName(_))
        ));
        assert!(matches!(check_topic(""), Err(BrokerError::InvalidTopic(_))));
        assert!(matches!(
            check_topic("a b"),
            Err(BrokerError::InvalidTopic(_))
        ));
        assert!(matches!(
            check_topic("é"),
            Err(BrokerError::InvalidTopic(_))
        ));
        assert!(check_topic(&"a".repeat(127)).is_ok());
        assert!(check_topic(&"a".repeat(128)).is_err());
        assert!(matches!(
            check_group("g:1"),
            Err(BrokerError::InvalidGroup(_))
        ));
    }

    #[test]
    fn tag_filters() {
        assert_eq!(TagFilter::parse("*").unwrap(), TagFilter::All);
        assert_eq!(TagFilter::parse("").unwrap(), TagFilter::All);
        let f = TagFilter::parse("a || b").unwrap();
        assert!(f.matches("a") && f.matches("b") && !f.matches("c") && !f.matches(""));
        assert!(TagFilter::parse("a||").is_err());
    }
}
