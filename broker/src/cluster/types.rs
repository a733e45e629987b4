//! The openraft type configuration of a broker group.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The payload of a normal entry: one write of the broker core, its records
/// encoded back to back in the commit-log format (see
/// `halfmq_storage::record`). A replica writes these bytes into its commit
/// log as they are.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Write(pub Bytes);

impl fmt::Debug for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Write({} bytes)", self.0.len())
    }
}

impl fmt::Display for Write {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl Serialize for Write {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Write {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v: Vec<u8> = serde::de::Deserialize::deserialize(d)?;
        Ok(Write(Bytes::from(v)))
    }
}

/// What applying one entry produced, for the leader's waiting request:
/// where each of its records went and what became of it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Physical offset of each record of the entry, in order.
    pub offsets: Vec<u64>,
    /// Encoded size in bytes of each record, in order.
    pub sizes: Vec<u32>,
    /// Physical offset one past the entry.
    pub end: u64,
    /// What apply did with each record, in order (empty when no applier
    /// looked at them: every record was dispatched).
    pub outcomes: Vec<Outcome>,
}

/// What apply did with one record. Decided the same way on every replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Applied (a message dispatched, a half pending, an end resolving its
    /// half, a control record in force).
    Applied,
    /// A send whose idempotency key was stored before, inside the window:
    /// nothing of it applied; the first send is this.
    Duplicate(FirstSendWire),
    /// An end of a half resolved before the same way: nothing applied.
    AlreadyEnded,
    /// An end of a half resolved before the other way: nothing applied.
    Conflict,
    /// An end of a half that is not pending (never stored, or resolved long
    /// ago): nothing applied.
    NotPending,
}

/// A first send as [`Outcome::Duplicate`] carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirstSendWire {
    /// Physical offset of its record.
    pub offset: u64,
    /// Physical offset one past it.
    pub end: u64,
    /// Message id.
    pub message_id: [u8; 16],
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset, for dispatched messages.
    pub queue_offset: Option<u64>,
    /// When a delayed message falls due (0 for others).
    pub deliver_at_ms: u64,
}

openraft::declare_raft_types!(
    /// A broker group's Raft types: u64 node ids, nodes known by their client
    /// address, one leader per term (standard Raft).
    pub TypeConfig:
        D = Write,
        R = Applied,
        NodeId = u64,
        Node = openraft::BasicNode,
        LeaderId = openraft::impls::leader_id_std::LeaderId<u64, u64>,
);

/// The committed form of a leader id: its term.
pub type CommittedLeaderId = openraft::vote::leader_id_std::CommittedLeaderId<u64>;
/// A log id: (term, index).
pub type LogId = openraft::LogId<CommittedLeaderId>;
/// A vote.
pub type Vote = <TypeConfig as openraft::RaftTypeConfig>::Vote;
/// A log entry.
pub type Entry = <TypeConfig as openraft::RaftTypeConfig>::Entry;
/// A node of the group.
pub type Node = openraft::BasicNode;
/// A membership as applied.
pub type StoredMembership = openraft::StoredMembership<CommittedLeaderId, u64, Node>;
/// A snapshot's description.
pub type SnapshotMeta = openraft::SnapshotMeta<CommittedLeaderId, u64, Node>;

/// The log id of (term, index).
pub fn log_id(term: u64, index: u64) -> LogId {
    LogId::new_term_index(term, index)
}

/// An `io::Error` carrying a storage error, as openraft's storage traits want.
pub(crate) fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
