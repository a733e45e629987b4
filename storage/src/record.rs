//! The commit-log record: its in-memory form, and its on-disk encoding.
//!
//! # On-disk format (version 1, all integers little-endian)
//!
//! ```text
//!  offset size field            meaning
//!  ------ ---- ---------------- -------------------------------------------------
//!       0    4 total_len        u32: bytes of the whole record, this field included
//!       4    4 crc32            u32: CRC-32 (IEEE, crc32fast) of bytes [0,4) ++ [8,total_len)
//!       8    1 magic            0xA7
//!       9    1 version          1
//!      10    1 kind             RecordKind (1 normal, 2 half, 3 tx commit, 4 tx rollback, 5 system, 6 redelivery)
//!      11    1 flags            reserved, 0
//!      12    4 queue_id         u32
//!      16    8 queue_offset     u64, u64::MAX = none (half messages, end records of rollbacks)
//!      24    8 store_ts_ms      u64: broker clock, milliseconds since the Unix epoch
//!      32    4 reconsume_times  u32
//!      36    8 ref_offset       u64: physical offset of a referenced record, u64::MAX = none
//!      44    4 ref_size         u32: size in bytes of the referenced record (0 = none)
//!      48   16 message_id       16 bytes, broker-assigned, stable across retry and DLQ
//!      64    2 topic_len        u16, then topic_len bytes of UTF-8
//!       .    2 tag_len          u16, then tag_len bytes of UTF-8
//!       .    2 keys_count       u16, then per key: u16 len + UTF-8 bytes
//!       .    2 props_count      u16, then per property: u16 key len + key, u32 value len + value
//!       .    4 body_len         u32, then body_len bytes
//! ```
//!
//! The CRC covers every byte of the record except itself, the length
//! included, so a torn or bit-flipped record is always detected (up to CRC-32's
//! collision odds). A transaction's commit is a small [`RecordKind::TxCommit`]
//! record whose `ref_offset`/`ref_size` point at the half message: the body is
//! never copied.

use bytes::Bytes;

use crate::error::{Error, Result};

/// First byte after the length and CRC of every record.
pub const MAGIC: u8 = 0xA7;
/// The record format version this build writes and reads.
pub const VERSION: u8 = 1;
/// Size in bytes of the fixed part of a record (everything before `topic_len`).
pub const FIXED_HEADER_BYTES: usize = 64;
/// Smallest possible encoded record, in bytes (fixed header plus empty
/// variable fields).
pub const MIN_RECORD_BYTES: usize = FIXED_HEADER_BYTES + 2 + 2 + 2 + 2 + 4;
/// Sentinel for "no queue offset" / "no referenced record".
pub const NONE_U64: u64 = u64::MAX;

/// What a record is. Stored as one byte; unknown values are kept as
/// [`RecordKind::Other`] so that a newer broker's records survive recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// A message visible in its topic/queue as soon as it is stored.
    Normal,
    /// A half message: stored, invisible to consumers until committed.
    Half,
    /// EndTransaction(commit): refers to the half (`ref_offset`) and makes it
    /// visible at `queue_offset` of its topic/queue. Carries no body.
    TxCommit,
    /// EndTransaction(rollback): refers to the half; nothing becomes visible.
    TxRollback,
    /// A broker-internal state record (consumer progress, check state...);
    /// never dispatched into a consume queue.
    System,
    /// Re-queues an earlier message (`ref_offset`/`ref_size`: the record
    /// holding the body) in a system topic: a consumer group's retry queue or
    /// dead-letter queue. Dispatched at its own offset; carries no body.
    Redelivery,
    /// The first record of a replicated log entry (see
    /// [`crate::entry_index`]): `queue_offset` = entry index, `ref_offset` =
    /// term, `ref_size` = the entry's bytes. Never dispatched.
    EntryMarker,
    /// A kind this build does not know. Kept, never dispatched.
    Other(u8),
}

impl RecordKind {
    /// The on-disk byte.
    pub fn as_u8(self) -> u8 {
        match self {
            RecordKind::Normal => 1,
            RecordKind::Half => 2,
            RecordKind::TxCommit => 3,
            RecordKind::TxRollback => 4,
            RecordKind::System => 5,
            RecordKind::Redelivery => 6,
            RecordKind::EntryMarker => 7,
            RecordKind::Other(b) => b,
        }
    }

    /// Parses the on-disk byte.
    pub fn from_u8(b: u8) -> Self {
        match b {
            1 => RecordKind::Normal,
            2 => RecordKind::Half,
            3 => RecordKind::TxCommit,
            4 => RecordKind::TxRollback,
            5 => RecordKind::System,
            6 => RecordKind::Redelivery,
            7 => RecordKind::EntryMarker,
            other => RecordKind::Other(other),
        }
    }

    /// Whether a record of this kind gets a queue offset and a consume-queue
    /// entry in its (topic, queue id): normal messages, transaction commits
    /// and redeliveries.
    pub fn is_dispatched(self) -> bool {
        matches!(
            self,
            RecordKind::Normal | RecordKind::TxCommit | RecordKind::Redelivery
        )
    }
}

/// A 16-byte message id, assigned by the broker, printed as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MessageId(pub [u8; 16]);

impl MessageId {
    /// Parses 32 hex digits.
    ///
    /// # Errors
    /// `None` when `s` is not exactly 32 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 32 {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(MessageId(out))
    }
}

impl MessageId {
    /// The 32 upper-case hex digits of [`fmt::Display`](std::fmt::Display),
    /// without the formatter (this runs for every message sent and
    /// delivered).
    pub fn to_hex(&self) -> [u8; 32] {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let mut out = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = DIGITS[usize::from(b >> 4)];
            out[2 * i + 1] = DIGITS[usize::from(b & 0x0F)];
        }
        out
    }
}

impl std::fmt::Display for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = self.to_hex();
        // invariant: to_hex writes only ASCII hex digits
        f.write_str(std::str::from_utf8(&hex).map_err(|_| std::fmt::Error)?)
    }
}

impl std::fmt::Debug for MessageId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// One commit-log record in memory. See the module docs for the encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// What the record is.
    pub kind: RecordKind,
    /// Reserved flag bits, written as given.
    pub flags: u8,
    /// Queue id within `topic`.
    pub queue_id: u32,
    /// Position in the consume queue of (topic, queue id); `None` for kinds
    /// that are not dispatched. Assigned by [`crate::Store::append`].
    pub queue_offset: Option<u64>,
    /// Broker clock when stored, in milliseconds since the Unix epoch.
    /// Stamped by [`crate::Store::append`] when left at 0.
    pub store_timestamp_ms: u64,
    /// How many times this message has been delivered and not acked before
    /// (0 for a first delivery).
    pub reconsume_times: u32,
    /// Physical offset of a record this one refers to (a commit's half).
    pub ref_offset: Option<u64>,
    /// Size in bytes of the referenced record.
    pub ref_size: u32,
    /// Broker-assigned message id.
    pub message_id: MessageId,
    /// Topic name (UTF-8, at most 65,535 bytes here; the broker's limit is lower).
    pub topic: String,
    /// Tag used for server-side filtering; empty for none.
    pub tag: String,
    /// Business keys.
    pub keys: Vec<String>,
    /// User and system properties, in the order given.
    pub properties: Vec<(String, String)>,
    /// The payload.
    pub body: Bytes,
}

impl Default for Record {
    fn default() -> Self {
        Record {
            kind: RecordKind::Normal,
            flags: 0,
            queue_id: 0,
            queue_offset: None,
            store_timestamp_ms: 0,
            reconsume_times: 0,
            ref_offset: None,
            ref_size: 0,
            message_id: MessageId::default(),
            topic: String::new(),
            tag: String::new(),
            keys: Vec::new(),
            properties: Vec::new(),
            body: Bytes::new(),
        }
    }
}

/// Stable 64-bit hash of a tag (FNV-1a), stored in consume-queue entries so
/// that tag filtering does not read the commit log. The empty tag hashes to 0.
pub fn tag_hash(tag: &str) -> u64 {
    if tag.is_empty() {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tag.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn checked_u16(len: usize, what: &str) -> Result<u16> {
    u16::try_from(len)
        .map_err(|_| Error::InvalidRecord(format!("{what} is {len} bytes, over 65535")))
}

fn checked_u32(len: usize, what: &str) -> Result<u32> {
    u32::try_from(len)
        .map_err(|_| Error::InvalidRecord(format!("{what} is {len} bytes, over 4 GiB")))
}

impl Record {
    /// Size in bytes of this record once encoded.
    pub fn encoded_len(&self) -> usize {
        FIXED_HEADER_BYTES
            + 2
            + self.topic.len()
            + 2
            + self.tag.len()
            + 2
            + self.keys.iter().map(|k| 2 + k.len()).sum::<usize>()
            + 2
            + self
                .properties
                .iter()
                .map(|(k, v)| 2 + k.len() + 4 + v.len())
                .sum::<usize>()
            + 4
            + self.body.len()
    }

    /// Appends the encoding of this record to `out` and returns its length in
    /// bytes. On error `out` is left as it was.
    ///
    /// # Errors
    /// [`Error::InvalidRecord`] when a field is too long for its length prefix.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<usize> {
        let len = self.encoded_len();
        let total = checked_u32(len, "record")?;
        // Validate every prefix before writing anything.
        let topic_len = checked_u16(self.topic.len(), "topic")?;
        let tag_len = checked_u16(self.tag.len(), "tag")?;
        let keys_count = checked_u16(self.keys.len(), "key count")?;
        for k in &self.keys {
            checked_u16(k.len(), "key")?;
        }
        let props_count = checked_u16(self.properties.len(), "property count")?;
        for (k, v) in &self.properties {
            checked_u16(k.len(), "property name")?;
            checked_u32(v.len(), "property value")?;
        }
        let body_len = checked_u32(self.body.len(), "body")?;

        let start = out.len();
        out.reserve(len);
        out.extend_from_slice(&total.to_le_bytes());
        out.extend_from_slice(&[0; 4]); // CRC, patched below
        out.extend_from_slice(&[MAGIC, VERSION, self.kind.as_u8(), self.flags]);
        out.extend_from_slice(&self.queue_id.to_le_bytes());
        out.extend_from_slice(&self.queue_offset.unwrap_or(NONE_U64).to_le_bytes());
        out.extend_from_slice(&self.store_timestamp_ms.to_le_bytes());
        out.extend_from_slice(&self.reconsume_times.to_le_bytes());
        out.extend_from_slice(&self.ref_offset.unwrap_or(NONE_U64).to_le_bytes());
        out.extend_from_slice(&self.ref_size.to_le_bytes());
        out.extend_from_slice(&self.message_id.0);
        debug_assert_eq!(out.len() - start, FIXED_HEADER_BYTES);
        out.extend_from_slice(&topic_len.to_le_bytes());
        out.extend_from_slice(self.topic.as_bytes());
        out.extend_from_slice(&tag_len.to_le_bytes());
        out.extend_from_slice(self.tag.as_bytes());
        out.extend_from_slice(&keys_count.to_le_bytes());
        for k in &self.keys {
            out.extend_from_slice(&(k.len() as u16).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
        }
        out.extend_from_slice(&props_count.to_le_bytes());
        for (k, v) in &self.properties {
            out.extend_from_slice(&(k.len() as u16).to_le_bytes());
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v.as_bytes());
        }
        out.extend_from_slice(&body_len.to_le_bytes());
        out.extend_from_slice(&self.body);
        debug_assert_eq!(out.len() - start, len);
        let crc = record_crc(&out[start..]);
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        Ok(len)
    }

    /// Encodes into a fresh buffer.
    ///
    /// # Errors
    /// As [`Record::encode_into`].
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.encode_into(&mut v)?;
        Ok(v)
    }

    /// Decodes one record that fills `buf` exactly (as returned by
    /// [`check_frame`]). `offset` is only used in error messages. The body is
    /// a zero-copy slice of `buf`.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when any check fails: length, magic, version, CRC,
    /// field bounds or UTF-8. Never panics and never allocates more than
    /// `buf.len()` bytes, whatever the input.
    pub fn decode(buf: Bytes, offset: u64) -> Result<Record> {
        let total = check_frame(&buf, offset)?;
        if total != buf.len() {
            return Err(corrupt(
                offset,
                format!("record length {total} != buffer {}", buf.len()),
            ));
        }
        let mut c = Cursor {
            buf: &buf,
            pos: FIXED_HEADER_BYTES,
            offset,
        };
        let kind = RecordKind::from_u8(buf[10]);
        let flags = buf[11];
        let queue_id = le_u32(&buf[12..16]);
        let queue_offset = some_u64(le_u64(&buf[16..24]));
        let store_timestamp_ms = le_u64(&buf[24..32]);
        let reconsume_times = le_u32(&buf[32..36]);
        let ref_offset = some_u64(le_u64(&buf[36..44]));
        let ref_size = le_u32(&buf[44..48]);
        let mut message_id = [0u8; 16];
        message_id.copy_from_slice(&buf[48..64]);

        let topic = c.string16("topic")?;
        let tag = c.string16("tag")?;
        let keys_count = c.u16("keys count")?;
        let mut keys = Vec::with_capacity(usize::from(keys_count).min(c.remaining() / 2));
        for _ in 0..keys_count {
            keys.push(c.string16("key")?);
        }
        let props_count = c.u16("properties count")?;
        let mut properties = Vec::with_capacity(usize::from(props_count).min(c.remaining() / 6));
        for _ in 0..props_count {
            let k = c.string16("property name")?;
            let vlen = c.u32("property value length")? as usize;
            let v = c.utf8(vlen, "property value")?;
            properties.push((k, v));
        }
        let body_len = c.u32("body length")? as usize;
        let body_start = c.pos;
        c.take(body_len, "body")?;
        if c.pos != buf.len() {
            return Err(corrupt(
                offset,
                format!("{} trailing bytes", buf.len() - c.pos),
            ));
        }
        let body = buf.slice(body_start..body_start + body_len);
        Ok(Record {
            kind,
            flags,
            queue_id,
            queue_offset,
            store_timestamp_ms,
            reconsume_times,
            ref_offset,
            ref_size,
            message_id: MessageId(message_id),
            topic,
            tag,
            keys,
            properties,
            body,
        })
    }
}

/// Validates the frame at the start of `buf` (length, magic, version, CRC) and
/// returns the record's total length in bytes. `buf` may extend past the record.
///
/// # Errors
/// [`Error::Corrupt`] when `buf` is shorter than the record claims (a torn
/// record), or any frame check fails.
pub fn check_frame(buf: &[u8], offset: u64) -> Result<usize> {
    if buf.len() < 8 {
        return Err(corrupt(
            offset,
            format!("only {} bytes, torn header", buf.len()),
        ));
    }
    let total = le_u32(&buf[0..4]) as usize;
    if total < MIN_RECORD_BYTES {
        return Err(corrupt(
            offset,
            format!("length {total} below minimum {MIN_RECORD_BYTES}"),
        ));
    }
    if buf.len() < total {
        return Err(corrupt(
            offset,
            format!("length {total} but only {} bytes present (torn)", buf.len()),
        ));
    }
    if buf[8] != MAGIC {
        return Err(corrupt(offset, format!("bad magic {:#04x}", buf[8])));
    }
    if buf[9] != VERSION {
        return Err(corrupt(offset, format!("unsupported version {}", buf[9])));
    }
    let stored = le_u32(&buf[4..8]);
    let computed = record_crc(&buf[..total]);
    if stored != computed {
        return Err(corrupt(
            offset,
            format!("CRC mismatch: stored {stored:#010x}, computed {computed:#010x}"),
        ));
    }
    Ok(total)
}

/// Reads the length prefix of a record, if at least 4 bytes are present.
pub fn peek_len(buf: &[u8]) -> Option<usize> {
    buf.get(0..4).map(|b| le_u32(b) as usize)
}

fn record_crc(rec: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&rec[0..4]);
    h.update(&rec[8..]);
    h.finalize()
}

fn corrupt(offset: u64, reason: String) -> Error {
    Error::Corrupt { offset, reason }
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn some_u64(v: u64) -> Option<u64> {
    (v != NONE_U64).then_some(v)
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    offset: u64,
}

impl Cursor<'_> {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&[u8]> {
        if n > self.remaining() {
            return Err(corrupt(
                self.offset,
                format!("{what} needs {n} bytes, {} left", self.remaining()),
            ));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(le_u32(self.take(4, what)?))
    }

    fn utf8(&mut self, n: usize, what: &str) -> Result<String> {
        let offset = self.offset;
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|e| corrupt(offset, format!("{what} is not UTF-8: {e}")))
    }

    fn string16(&mut self, what: &str) -> Result<String> {
        let n = usize::from(self.u16(what)?);
        self.utf8(n, what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record {
            kind: RecordKind::Half,
            flags: 0,
            queue_id: 3,
            queue_offset: Some(42),
            store_timestamp_ms: 1_700_000_000_000,
            reconsume_times: 2,
            ref_offset: None,
            ref_size: 0,
            message_id: MessageId([7; 16]),
            topic: "orders".into(),
            tag: "created".into(),
            keys: vec!["order-1".into(), "user-9".into()],
            properties: vec![("k".into(), "v".into()), ("ü".into(), "ÿ".into())],
            body: Bytes::from_static(b"hello world"),
        }
    }

    #[test]
    fn round_trip() {
        let r = sample();
        let enc = r.encode().unwrap();
        assert_eq!(enc.len(), r.encoded_len());
        let d = Record::decode(Bytes::from(enc), 0).unwrap();
        assert_eq!(d, r);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let enc = sample().encode().unwrap();
        for byte in 0..enc.len() {
            for bit in 0..8 {
                let mut bad = enc.clone();
                bad[byte] ^= 1 << bit;
                assert!(
                    Record::decode(Bytes::from(bad), 0).is_err(),
                    "flip of bit {bit} in byte {byte} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let enc = sample().encode().unwrap();
        for cut in 0..enc.len() {
            assert!(check_frame(&enc[..cut], 0).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn overlong_field_is_an_error_not_a_panic() {
        let r = Record {
            topic: "t".repeat(70_000),
            ..Record::default()
        };
        let mut out = vec![1, 2, 3];
        assert!(matches!(
            r.encode_into(&mut out),
            Err(Error::InvalidRecord(_))
        ));
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn message_id_hex_round_trip() {
        let id = MessageId([0xAB; 16]);
        assert_eq!(MessageId::from_hex(&id.to_string()), Some(id));
        assert_eq!(MessageId::from_hex("zz"), None);
        let id = MessageId([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 0xFF]);
        assert_eq!(id.to_string(), "000102030405060708090A0B0C0D0EFF");
        assert_eq!(MessageId::from_hex(&id.to_string()), Some(id));
    }

    #[test]
    fn unknown_kind_is_kept() {
        let r = Record {
            kind: RecordKind::Other(200),
            ..sample()
        };
        let d = Record::decode(Bytes::from(r.encode().unwrap()), 0).unwrap();
        assert_eq!(d.kind, RecordKind::Other(200));
    }
}
