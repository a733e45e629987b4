//! The broker's error type. Each variant maps to one stable wire status code
//! (see `service.rs` and README "Status codes").

/// Everything a broker operation can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Malformed request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Bad topic name.
    #[error("{0}")]
    InvalidTopic(String),
    /// Bad group name.
    #[error("{0}")]
    InvalidGroup(String),
    /// Bad tag expression.
    #[error("invalid tag expression {0}")]
    InvalidTagExpression(String),
    /// Queue id out of range.
    #[error("queue id {queue_id} is not below the {queues} queues of topic {topic}")]
    InvalidQueueId {
        /// Topic.
        topic: String,
        /// Asked for.
        queue_id: u32,
        /// The topic's queue count.
        queues: u32,
    },
    /// A receipt handle that cannot be parsed.
    #[error("invalid receipt handle {0:?}")]
    InvalidReceiptHandle(String),
    /// A `%`-prefixed name used by a client.
    #[error("{0}")]
    ReservedName(String),
    /// Unknown topic.
    #[error("topic {0} does not exist")]
    TopicNotFound(String),
    /// A transaction id that cannot be parsed.
    #[error("invalid transaction id {0:?}")]
    InvalidTransactionId(String),
    /// No such half message.
    #[error("transaction {0} not found")]
    TransactionNotFound(String),
    /// Already resolved the other way.
    #[error("{0}; the first resolution is final")]
    TransactionConflict(String),
    /// `max_pending_halves` reached.
    #[error("{0} unresolved half messages (max_pending_halves); resolve some first")]
    TooManyPendingHalves(usize),
    /// Stale or unknown receipt.
    #[error("receipt handle is stale: the message was acked or redelivered since")]
    ReceiptNotFound,
    /// Topic exists already.
    #[error("topic {0} exists already")]
    TopicExists(String),
    /// The topic cannot be deleted now (pending halves or delayed messages).
    #[error("{0}")]
    TopicBusy(String),
    /// A body over `max_message_bytes`.
    #[error("message body of {size_bytes} bytes exceeds max_message_bytes {limit_bytes}")]
    MessageTooLarge {
        /// Body size, bytes.
        size_bytes: u64,
        /// The limit, bytes.
        limit_bytes: u64,
    },
    /// A batch over a batch limit.
    #[error("{0}")]
    BatchTooLarge(String),
    /// A limit reached.
    #[error("{0}")]
    TooManyRequests(String),
    /// The storage engine failed (its messages say what and where).
    #[error(transparent)]
    Storage(#[from] halfmq_storage::Error),
    /// The configuration was rejected.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A broker bug.
    #[error("internal: {0}")]
    Internal(String),
    /// The broker is stopping.
    #[error("broker is shutting down")]
    ShuttingDown,
    /// This broker group member is not the leader (or not ready to serve
    /// as one yet); the leader's client address when known.
    #[error("not the leader of the broker group{}", match .0 { Some(l) => format!("; the leader is {l}"), None => "; no leader is known (an election may be under way)".to_owned() })]
    NotLeader(Option<String>),
    /// This member lost leadership while a write was being replicated: the
    /// next leader may or may not have it. Retried with the same
    /// idempotency keys, it is stored once either way.
    #[error("leadership was lost while this write was replicated; it may or may not be stored{}", .0.as_ref().map(|l| format!("; the leader is {l}")).unwrap_or_default())]
    LeadershipLost(Option<String>),
    /// No user of this name (security admin calls).
    #[error("user {0} does not exist")]
    UserNotFound(String),
    /// A user of this name exists already.
    #[error("user {0} exists already")]
    UserExists(String),
    /// The caller's policy does not allow this: the action and resource
    /// (gRPC `PERMISSION_DENIED`).
    #[error("permission denied: {action} on {resource}")]
    PermissionDenied {
        /// The action's policy name (`pub`, `sub`, `tx`, `admin`).
        action: &'static str,
        /// The resource, `topic:NAME`, `group:NAME`, `producer-group:NAME` or `cluster`.
        resource: String,
    },
}
