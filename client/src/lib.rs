//! Rust client for the halfmq broker. Depends on `halfmq-proto` only.
//!
//! # Layout
//! - [`Client`]: one connection (HTTP/2, many concurrent requests), connect
//!   and request timeouts, reconnect on the next request after a failure,
//!   retries with exponential backoff for calls that are safe to repeat.
//! - [`Producer`]: `send` and `send_batch`; concurrent `send`s are coalesced
//!   into batch requests (auto-batch) unless turned off.
//! - [`Consumer`]: explicit `receive` / `ack` / `nack` /
//!   `change_invisible_duration`, and a handler loop [`Consumer::run`].
//! - [`TransactionProducer`]: half messages, `commit` / `rollback`,
//!   `send_in_transaction` (concurrent half sends and ends are coalesced
//!   together into `TransactionBatch` requests), and the producer session
//!   answering check-backs with a [`TransactionChecker`].
//! - [`Admin`]: topics, stats, pending transactions.
//! - [`Cluster`]: a broker group's members, their roles and lag; membership
//!   changes. [`Client::connect_cluster`] follows the group's leader.
//!
//! # Example
//! ```no_run
//! # async fn demo() -> Result<(), halfmq_client::ClientError> {
//! use halfmq_client::{Client, Consumer, ConsumeResult, Message, Producer};
//! let client = Client::connect("127.0.0.1:8081").await?;
//! let producer = Producer::new(client.clone());
//! let receipt = producer.send(Message::new("orders", "order 42 created").with_tag("created")).await?;
//! println!("stored as {}", receipt.message_id);
//!
//! let consumer = Consumer::new(client, "billing", "orders");
//! for m in consumer.receive(16, std::time::Duration::from_secs(5)).await? {
//!     println!("{}: {:?}", m.message_id, m.body);
//!     consumer.ack(&m).await?;
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halfmq_proto::v1 as pb;

pub use halfmq_proto::v1::Code;

mod admin;
mod answer;
mod channel;
mod cluster;
mod coalesce;
mod consumer;
mod security;
mod transaction;
pub use admin::{Admin, ResetTo, TopicInfo};
use answer::Answer;
use channel::{open_channel, Ch};
pub use channel::{ClientOptions, Credentials, TlsOptions};
pub use cluster::{Cluster, NodeStatus, Unanswered};
use coalesce::{BatchLimits, Coalescer};
pub use consumer::{ConsumeResult, Consumer, ReceivedMessage};
/// A dead-lettered message (wire form), from [`Admin::list_dead_letters`].
pub use halfmq_proto::v1::DeadLetter;
/// Who ends a transaction (wire enum), for [`end_transaction`].
pub use halfmq_proto::v1::EndSource;
pub use security::{Rule, Security, UserInfo};
pub use transaction::{
    end_transaction, MessageView, PendingTransaction, Transaction, TransactionChecker,
    TransactionOutcome, TransactionProducer, TransactionResolution,
};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The broker refused or failed the request; `code` is the stable status
    /// code (README, "Status codes").
    #[error("broker: {code:?} ({}): {message}", *code as i32)]
    Broker {
        /// Status code.
        code: Code,
        /// The broker's message.
        message: String,
    },
    /// No connection to the broker could be opened (refused, no route, host
    /// name unknown, connect timeout): the request was not sent, so nothing
    /// of it was stored.
    #[error("cannot connect to {addr}: {reason} (is the broker running?)")]
    Unreachable {
        /// The broker address as given to [`Client::connect`].
        addr: String,
        /// Why, e.g. `connection refused`.
        reason: String,
    },
    /// The request did not reach the broker, or its answer did not come back
    /// (connection lost, timeout...). A send may or may not have been stored.
    #[error("transport: {}", describe_status(.0))]
    Transport(tonic::Status),
    /// Could not set up the connection (bad address), or the broker's answer
    /// made no sense.
    #[error("connect: {0}")]
    Connect(String),
}

/// A transport status in one line: its message, the code, and the deepest
/// cause when it adds something.
fn describe_status(s: &tonic::Status) -> String {
    let mut text = format!("{} ({:?})", s.message(), s.code());
    if let Some(root) = root_cause(s) {
        if !text.contains(&root) {
            text = format!("{}: {root} ({:?})", s.message(), s.code());
        }
    }
    text
}

/// The text of the innermost error under a status, if it has any.
fn root_cause(s: &tonic::Status) -> Option<String> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut last = None;
    while let Some(c) = cause {
        last = Some(c.to_string());
        cause = c.source();
    }
    last
}

/// Why a status says the connection could not be opened, if it does.
fn connect_failure(s: &tonic::Status) -> Option<String> {
    if s.code() != tonic::Code::Unavailable {
        return None;
    }
    let mut io_kind = None;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        cause = c.source();
    }
    let msg = s.message();
    let root = root_cause(s).unwrap_or_default();
    use std::io::ErrorKind as K;
    match io_kind {
        Some(K::ConnectionRefused) => return Some("connection refused".into()),
        Some(K::TimedOut) => return Some("connect timed out".into()),
        Some(K::HostUnreachable) => return Some("host unreachable".into()),
        Some(K::NetworkUnreachable) => return Some("network unreachable".into()),
        Some(K::AddrNotAvailable) => return Some("address not available".into()),
        _ => {}
    }
    if msg.contains("dns error") {
        return Some(format!("cannot resolve the host name ({root})"));
    }
    if msg.contains("connect error") {
        return Some(root);
    }
    if msg.contains("timeout") && root.contains("elapsed") {
        return Some("connect timed out".into());
    }
    None
}

impl ClientError {
    /// A copy for every waiter of a failed coalesced request.
    pub(crate) fn duplicate(&self) -> ClientError {
        match self {
            ClientError::Broker { code, message } => ClientError::Broker {
                code: *code,
                message: message.clone(),
            },
            ClientError::Unreachable { addr, reason } => ClientError::Unreachable {
                addr: addr.clone(),
                reason: reason.clone(),
            },
            ClientError::Transport(s) => {
                ClientError::Transport(tonic::Status::new(s.code(), describe_status(s)))
            }
            ClientError::Connect(m) => ClientError::Connect(m.clone()),
        }
    }

    /// The broker's status code, if the broker answered.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Broker { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// A request of several messages refused whole for its size is a batch
    /// refusal, not one message's.
    pub(crate) fn for_batch(self, messages: usize) -> ClientError {
        match self {
            ClientError::Broker {
                code: Code::MessageTooLarge,
                message,
            } if messages > 1 && message.starts_with(REQUEST_TOO_LARGE) => ClientError::Broker {
                code: Code::BatchTooLarge,
                message,
            },
            e => e,
        }
    }
}

/// How [`Client::transport_error`] starts the message of a request the
/// broker's transport refused for its size.
const REQUEST_TOO_LARGE: &str = "the request is larger than the broker reads";

fn check(status: Option<pb::Status>) -> Result<(), ClientError> {
    let s = status.unwrap_or_default();
    let code = Code::try_from(s.code).unwrap_or(Code::Unspecified);
    if code == Code::Ok {
        Ok(())
    } else {
        Err(ClientError::Broker {
            code,
            message: s.message,
        })
    }
}

/// A connection to a broker, or to the leader of a broker group. Cheap to
/// clone; clones share the connection.
#[derive(Debug, Clone)]
pub struct Client {
    conn: Arc<Conn>,
    opts: Arc<ClientOptions>,
}

/// The brokers a client knows and the one it talks to.
#[derive(Debug)]
struct Conn {
    /// Every address given, in order (one for a single broker).
    brokers: Vec<String>,
    /// (address, channel) of the broker requests go to now.
    current: std::sync::RwLock<(Arc<str>, Ch)>,
    /// Channels opened so far, by address (lazily connected).
    channels: std::sync::Mutex<HashMap<String, Ch>>,
    /// Addresses that failed to connect lately, and when: a `NOT_LEADER`
    /// hint naming one (a follower that has not noticed the leader died)
    /// is not followed for [`DOWN_FOR`].
    down: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// How long an address that could not be reached is passed over.
const DOWN_FOR: Duration = Duration::from_secs(2);

impl Client {
    /// Connects lazily to `addr` (`host:port`, or a full `http://` URL) with
    /// default options. The first request opens the connection; after a
    /// failure the next request reconnects. `addr` may also list the
    /// members of a broker group, comma-separated (see
    /// [`Client::connect_cluster`]).
    ///
    /// # Errors
    /// [`ClientError::Connect`] for an unusable address.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        Self::connect_with(addr, ClientOptions::default()).await
    }

    /// [`Client::connect`] with options.
    ///
    /// # Errors
    /// [`ClientError::Connect`] for an unusable address.
    pub async fn connect_with(addr: &str, opts: ClientOptions) -> Result<Client, ClientError> {
        let addrs: Vec<&str> = addr
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .collect();
        Self::connect_cluster_with(&addrs, opts).await
    }

    /// Connects lazily to a broker group given some of its members'
    /// addresses: requests go to the leader, found by trying the addresses
    /// and following `NOT_LEADER` answers (which name it); after a failover
    /// they follow the new leader within `failover_timeout`. Sends whose
    /// messages carry idempotency keys ([`Producer`] gives them by default)
    /// and ends are retried across a failover and stored once.
    ///
    /// # Errors
    /// [`ClientError::Connect`] for no address or an unusable one.
    pub async fn connect_cluster(addrs: &[&str]) -> Result<Client, ClientError> {
        Self::connect_cluster_with(addrs, ClientOptions::default()).await
    }

    /// [`Client::connect_cluster`] with options.
    ///
    /// # Errors
    /// As [`Client::connect_cluster`].
    pub async fn connect_cluster_with(
        addrs: &[&str],
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        let Some(first) = addrs.first() else {
            return Err(ClientError::Connect("no broker address given".into()));
        };
        let mut channels = HashMap::new();
        for a in addrs {
            channels.insert((*a).to_owned(), open_channel(a, &opts)?);
        }
        let ch = channels[*first].clone();
        Ok(Client {
            conn: Arc::new(Conn {
                brokers: addrs.iter().map(|a| (*a).to_owned()).collect(),
                current: std::sync::RwLock::new((Arc::from(*first), ch)),
                channels: std::sync::Mutex::new(channels),
                down: std::sync::Mutex::new(HashMap::new()),
            }),
            opts: Arc::new(opts),
        })
    }

    /// The address of the broker requests go to now (for a broker group:
    /// the leader, once found).
    pub fn addr(&self) -> String {
        self.current().0.to_string()
    }

    /// The credentials requests are signed with, if any.
    pub fn credentials(&self) -> Option<&Credentials> {
        self.opts.credentials.as_ref()
    }

    /// Every broker address given.
    pub fn brokers(&self) -> &[String] {
        &self.conn.brokers
    }

    fn current(&self) -> (Arc<str>, Ch) {
        self.conn
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn channel(&self) -> Ch {
        self.current().1
    }

    /// The (lazily connected) channel to `addr`, opened once.
    pub(crate) fn channel_to(&self, addr: &str) -> Result<Ch, ClientError> {
        let mut chans = self.conn.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = chans.get(addr) {
            return Ok(c.clone());
        }
        let c = open_channel(addr, &self.opts)?;
        chans.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    /// Whether this client knows several brokers (a broker group).
    fn is_group(&self) -> bool {
        self.conn.brokers.len() > 1
    }

    /// The error of a failed call: [`ClientError::Unreachable`] when no
    /// connection could be opened, a `MESSAGE_TOO_LARGE` refusal when the
    /// broker's transport refused the request for its size (gRPC
    /// `OUT_OF_RANGE`: it is larger than `max_batch_bytes` plus 4 MiB),
    /// else [`ClientError::Transport`].
    pub(crate) fn transport_error(&self, s: tonic::Status) -> ClientError {
        if let Some(reason) = connect_failure(&s) {
            return ClientError::Unreachable {
                addr: self.addr(),
                reason,
            };
        }
        if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large") {
            return ClientError::Broker {
                code: Code::MessageTooLarge,
                message: format!("{REQUEST_TOO_LARGE}: {}", s.message()),
            };
        }
        ClientError::Transport(s)
    }

    fn producer(&self) -> pb::producer_client::ProducerClient<Ch> {
        pb::producer_client::ProducerClient::new(self.channel())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn consumer(&self) -> pb::consumer_client::ConsumerClient<Ch> {
        pb::consumer_client::ConsumerClient::new(self.channel())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn security(&self) -> pb::security_client::SecurityClient<Ch> {
        pb::security_client::SecurityClient::new(self.channel())
    }

    fn admin(&self) -> pb::admin_client::AdminClient<Ch> {
        pb::admin_client::AdminClient::new(self.channel())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    fn request<T>(&self, msg: T, extra: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.opts.request_timeout + extra);
        r
    }

    /// Calls one RPC with `req` (cloned for each attempt), `extra` added to
    /// the request timeout, retried like [`Client::retry_with`]; returns the
    /// response body.
    async fn call<Req, Resp, F, Fut>(
        &self,
        req: Req,
        extra: Duration,
        rpc: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        Resp: Answer,
        F: FnMut(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.call_with(false, req, extra, rpc).await
    }

    /// [`Client::call`], retried like [`Client::retry_with`] `idempotent`.
    pub(crate) async fn call_with<Req, Resp, F, Fut>(
        &self,
        idempotent: bool,
        req: Req,
        extra: Duration,
        mut rpc: F,
    ) -> Result<Resp, ClientError>
    where
        Req: Clone,
        Resp: Answer,
        F: FnMut(tonic::Request<Req>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
    {
        self.retry_with(idempotent, || {
            let fut = rpc(self.request(req.clone(), extra));
            self.timed(extra, fut)
        })
        .await
    }

    /// Awaits one RPC for at most the request timeout plus `extra` plus
    /// 1 s. The broker enforces the `grpc-timeout` it is sent; this bound
    /// covers a reply lost on the way (a proxy, a half-open connection),
    /// which becomes a `DEADLINE_EXCEEDED` transport error.
    pub(crate) async fn timed<T>(
        &self,
        extra: Duration,
        rpc: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, ClientError> {
        let limit = self.opts.request_timeout + extra + Duration::from_secs(1);
        match tokio::time::timeout(limit, rpc).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.transport_error(s)),
            Err(_) => Err(ClientError::Transport(tonic::Status::deadline_exceeded(
                format!("no reply within {limit:?}"),
            ))),
        }
    }

    /// Runs `call` until it succeeds, returns a broker status, or fails
    /// with a transport error `max_attempts` times; backs off between tries.
    /// Connection failures are retried; with `idempotent` (sends whose
    /// messages all carry idempotency keys, ends) a timeout is retried too:
    /// repeating the request cannot store or decide anything twice. With a
    /// broker group, a `NOT_LEADER` answer (nothing was done) is sent again
    /// to the leader it names, or to the next address; `LEADERSHIP_LOST`
    /// (the outcome is unknown) only when `idempotent`; connection failures
    /// move on to the next address; all within `failover_timeout`.
    pub(crate) async fn retry_with<T, F, Fut>(
        &self,
        idempotent: bool,
        mut call: F,
    ) -> Result<T, ClientError>
    where
        T: Answer,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut backoff = self.opts.initial_backoff;
        let mut attempt = 1;
        let deadline = std::time::Instant::now() + self.opts.failover_timeout;
        let group = self.is_group();
        loop {
            let in_time = group && std::time::Instant::now() < deadline;
            match call().await {
                Ok(resp) => match resp.redirect() {
                    Some((code, leader)) if in_time && (code == Code::NotLeader || idempotent) => {
                        tracing::debug!(?code, leader, "not the leader; following");
                        let to_leader = self.follow(&leader);
                        // An election leaves no leader for a moment: wait a
                        // little before asking again.
                        if !to_leader || code == Code::LeadershipLost {
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(250));
                        }
                    }
                    _ => return Ok(resp),
                },
                Err(e)
                    if (attempt < self.opts.max_attempts || in_time)
                        && match &e {
                            ClientError::Transport(s) => {
                                retryable(s)
                                    || (idempotent
                                        && matches!(
                                            s.code(),
                                            tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
                                        ))
                            }
                            ClientError::Unreachable { .. } => true,
                            _ => false,
                        } =>
                {
                    tracing::debug!(attempt, error = %e, "retrying after transport error");
                    if group {
                        // This member is gone (or going): try the others,
                        // and do not come back to it on a stale hint.
                        self.conn
                            .down
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(self.addr(), std::time::Instant::now());
                        let _ = self.follow("");
                    }
                    tokio::time::sleep(backoff).await;
                    let cap = if group {
                        Duration::from_millis(250)
                    } else {
                        Duration::from_secs(2)
                    };
                    backoff = (backoff * 2).min(cap);
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Runs `call` once, except that with a broker group a `NOT_LEADER`
    /// answer (nothing was done) is sent again to the leader, within
    /// `failover_timeout`: for requests that are not safe to repeat after a
    /// transport error.
    pub(crate) async fn redirected<T, F, Fut>(&self, mut call: F) -> Result<T, ClientError>
    where
        T: Answer,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let deadline = std::time::Instant::now() + self.opts.failover_timeout;
        let mut backoff = self.opts.initial_backoff;
        loop {
            let resp = call().await?;
            match resp.redirect() {
                Some((Code::NotLeader, leader))
                    if self.is_group() && std::time::Instant::now() < deadline =>
                {
                    if !self.follow(&leader) {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_millis(250));
                    }
                }
                _ => return Ok(resp),
            }
        }
    }
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
}

/// How a message picks its queue.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum QueueSelector {
    /// Round robin (the broker chooses).
    #[default]
    RoundRobin,
    /// This queue id.
    Id(u32),
    /// A key hashed onto the queues: messages with the same key share a queue.
    ShardingKey(String),
}

/// A message to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Queue choice.
    pub queue: QueueSelector,
    /// Tag for filtering; empty for none.
    pub tag: String,
    /// Business keys.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: HashMap<String, String>,
    /// Body.
    pub body: Bytes,
    /// Delayed delivery: consumers see it this long after the broker stored
    /// it (millisecond precision; at most the broker's `max_delay_ms`).
    /// Zero, the default: at once. Ordinary sends only.
    pub delay: Duration,
    /// Idempotency key (1 to 128 bytes): a send repeating a key the broker
    /// stored on this topic within its `dedup_window_ms` (2 min by default)
    /// stores nothing and returns the first send's receipt with
    /// `duplicate: true`. The key is the identity: the body is not compared.
    /// `None`: the producer sets an automatic one (see
    /// [`ProducerOptions::auto_idempotency_keys`]).
    pub idempotency_key: Option<String>,
    /// Message group (1 to 128 bytes): its messages go to one queue (FNV-1a
    /// 64 of the name modulo the topic's queue count, unless a queue id is
    /// set) and a FIFO consumer group receives them in send order, one at
    /// a time. `None`: no group.
    pub message_group: Option<String>,
}

impl Message {
    /// A message to `topic` with `body`.
    pub fn new(topic: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Message {
            topic: topic.into(),
            queue: QueueSelector::RoundRobin,
            tag: String::new(),
            keys: Vec::new(),
            properties: HashMap::new(),
            body: body.into(),
            delay: Duration::ZERO,
            idempotency_key: None,
            message_group: None,
        }
    }

    /// Sets the message group (see [`Message::message_group`]).
    pub fn with_message_group(mut self, group: impl Into<String>) -> Self {
        self.message_group = Some(group.into());
        self
    }

    /// Sets the idempotency key (see [`Message::idempotency_key`]).
    pub fn with_idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the tag.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tag = tag.into();
        self
    }

    /// Adds a key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.keys.push(key.into());
        self
    }

    /// Adds a user property.
    pub fn with_property(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.properties.insert(k.into(), v.into());
        self
    }

    /// Routes by a sharding key.
    pub fn with_sharding_key(mut self, key: impl Into<String>) -> Self {
        self.queue = QueueSelector::ShardingKey(key.into());
        self
    }

    /// Routes to a queue id.
    pub fn with_queue_id(mut self, queue_id: u32) -> Self {
        self.queue = QueueSelector::Id(queue_id);
        self
    }

    /// Delays delivery by `delay` (see [`Message::delay`]).
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    fn into_wire(self) -> pb::Message {
        pb::Message {
            topic: self.topic,
            queue: match self.queue {
                QueueSelector::RoundRobin => None,
                QueueSelector::Id(q) => Some(pb::message::Queue::QueueId(q)),
                QueueSelector::ShardingKey(k) => Some(pb::message::Queue::ShardingKey(k)),
            },
            tag: self.tag,
            keys: self.keys,
            properties: self.properties,
            body: self.body,
            delay_ms: self.delay.as_millis().try_into().unwrap_or(u64::MAX),
            idempotency_key: self.idempotency_key,
            message_group: self.message_group,
        }
    }
}

/// Automatic idempotency keys: `<random producer id>-<sequence number>`, so
/// that a producer's own retries (timeouts, reconnects) never store a
/// message twice.
#[derive(Debug)]
pub(crate) struct AutoKeys {
    producer_id: String,
    seq: std::sync::atomic::AtomicU64,
}

impl AutoKeys {
    pub(crate) fn new() -> AutoKeys {
        AutoKeys {
            producer_id: format!("{:016x}", rand::random::<u64>()),
            seq: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Gives `m` a key unless it has one.
    pub(crate) fn fill(&self, m: &mut Message) {
        if m.idempotency_key.is_none() {
            let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            m.idempotency_key = Some(format!("{}-{n}", self.producer_id));
        }
    }
}

/// Where a sent message was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// Message id (32 hex digits).
    pub message_id: String,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset; `None` for a delayed message, which gets one when it
    /// becomes due.
    pub queue_offset: Option<u64>,
    /// When a delayed message becomes visible, broker clock, ms since the
    /// epoch; 0 for an ordinary message.
    pub deliver_at_ms: u64,
    /// The message's idempotency key was stored before: this is the first
    /// send's receipt, and nothing was stored now.
    pub duplicate: bool,
}

/// Producer options.
#[derive(Debug, Clone)]
pub struct ProducerOptions {
    /// Coalesce concurrent `send`s into batch requests. Default true.
    pub auto_batch: bool,
    /// Most messages in one coalesced request. Default 256 (the broker's
    /// `max_batch_messages` must be at least this).
    pub max_batch_messages: usize,
    /// Most body bytes in one coalesced request. Default 4 MiB.
    pub max_batch_bytes: usize,
    /// Coalesced requests in flight at once. Default 2
    /// ([`DEFAULT_MAX_INFLIGHT_BATCHES`]).
    pub max_inflight_batches: usize,
    /// Give every message without an idempotency key an automatic one, and
    /// retry sends after transport errors (up to the client's
    /// `max_attempts`): exactly-once publish. Default true. Off, a send whose
    /// reply is lost is not retried (its outcome is unknown).
    pub auto_idempotency_keys: bool,
}

/// Coalesced requests a producer keeps in flight at once (a `Producer`'s
/// sends; a `TransactionProducer`'s half sends and ends, which share one
/// queue and go out as `TransactionBatch` requests): 2. With sync flush every request of one group-commit
/// window waits for the same fdatasync, so more requests in flight only
/// split the same items into smaller batches. Measured with `halfmq-bench`
/// (1 KiB, 64 in flight, sync, interleaved runs): 2 instead of 4 gave about
/// 1.3x the transactions per second and 15 % less CPU per transaction; 1 was
/// as fast on average but stalled whenever one fdatasync was slow.
pub const DEFAULT_MAX_INFLIGHT_BATCHES: usize = 2;

impl Default for ProducerOptions {
    fn default() -> Self {
        ProducerOptions {
            auto_batch: true,
            max_batch_messages: 256,
            max_batch_bytes: 4 << 20,
            max_inflight_batches: DEFAULT_MAX_INFLIGHT_BATCHES,
            auto_idempotency_keys: true,
        }
    }
}

/// Sends messages. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Producer {
    client: Client,
    batcher: Option<Coalescer<pb::Message, SendReceipt>>,
    keys: Option<Arc<AutoKeys>>,
}

impl Producer {
    /// A producer with default options (auto-batch on).
    pub fn new(client: Client) -> Self {
        Self::with_options(client, ProducerOptions::default())
    }

    /// A producer with options. With auto-batch, a background task (ended
    /// when the last clone is dropped) gathers the `send`s queued while
    /// earlier requests are in flight into one request.
    pub fn with_options(client: Client, opts: ProducerOptions) -> Self {
        let batcher = opts.auto_batch.then(|| {
            let c = client.clone();
            Coalescer::spawn(
                BatchLimits {
                    max_items: opts.max_batch_messages,
                    max_weight: opts.max_batch_bytes,
                    max_inflight: opts.max_inflight_batches,
                },
                |m: &pb::Message| m.body.len(),
                move |msgs| {
                    let c = c.clone();
                    async move { send_coalesced(&c, msgs).await }
                },
            )
        });
        let keys = opts
            .auto_idempotency_keys
            .then(|| Arc::new(AutoKeys::new()));
        Producer {
            client,
            batcher,
            keys,
        }
    }

    fn wire(&self, mut m: Message) -> pb::Message {
        if let Some(k) = &self.keys {
            k.fill(&mut m);
        }
        m.into_wire()
    }

    /// Sends one message; returns once the broker has stored it durably per
    /// its flush policy.
    ///
    /// # Errors
    /// [`ClientError::Broker`] with the refusal (nothing stored);
    /// [`ClientError::Transport`] when the outcome is unknown.
    pub async fn send(&self, msg: Message) -> Result<SendReceipt, ClientError> {
        let m = self.wire(msg);
        match &self.batcher {
            Some(b) => b.call(m).await,
            None => one(send_wire(&self.client, vec![m]).await),
        }
    }

    /// Sends a batch, stored all or nothing, in one request.
    ///
    /// # Errors
    /// As [`Producer::send`].
    pub async fn send_batch(&self, msgs: Vec<Message>) -> Result<Vec<SendReceipt>, ClientError> {
        send_wire(
            &self.client,
            msgs.into_iter().map(|m| self.wire(m)).collect(),
        )
        .await
    }
}

/// The single result of a one-item batch.
pub(crate) fn one<R>(r: Result<Vec<R>, ClientError>) -> Result<R, ClientError> {
    r?.pop()
        .ok_or_else(|| ClientError::Connect("broker returned no receipt".into()))
}

/// Sends a coalesced batch; on a refusal that concerns one message, resends
/// message by message (nothing was stored) so only the culprit fails.
async fn send_coalesced(
    client: &Client,
    msgs: Vec<pb::Message>,
) -> Vec<Result<SendReceipt, ClientError>> {
    let n = msgs.len();
    match send_wire(client, msgs.clone()).await {
        Ok(receipts) => receipts.into_iter().map(Ok).collect(),
        Err(ClientError::Broker { code, .. }) if n > 1 && per_message_refusal(code) => {
            let mut out = Vec::with_capacity(n);
            for m in msgs {
                out.push(one(send_wire(client, vec![m]).await));
            }
            out
        }
        Err(e) => (0..n).map(|_| Err(e.duplicate())).collect(),
    }
}

/// Sends `msgs` in one request; when every message has an idempotency key
/// the send is safe to repeat, so transport errors are retried.
async fn send_wire(
    client: &Client,
    msgs: Vec<pb::Message>,
) -> Result<Vec<SendReceipt>, ClientError> {
    let n = msgs.len();
    let once = || {
        let req = pb::SendRequest {
            messages: msgs.clone(),
        };
        async move {
            let mut c = client.producer();
            client
                .timed(Duration::ZERO, c.send(client.request(req, Duration::ZERO)))
                .await
        }
    };
    let sent = if msgs.iter().all(|m| m.idempotency_key.is_some()) {
        client.retry_with(true, once).await
    } else {
        client.redirected(once).await
    };
    let resp = sent.map_err(|e| e.for_batch(n))?;
    check(resp.status)?;
    if resp.receipts.len() != n {
        return Err(ClientError::Connect(format!(
            "broker returned {} receipts for {n} messages",
            resp.receipts.len()
        )));
    }
    Ok(resp
        .receipts
        .into_iter()
        .map(|r| SendReceipt {
            message_id: r.message_id,
            queue_id: r.queue_id,
            queue_offset: r.queue_offset,
            deliver_at_ms: r.deliver_at_ms,
            duplicate: r.duplicate,
        })
        .collect())
}

/// Refusals that concern one message of a batch; nothing was stored, so the
/// batch is resent message by message to fail only the culprit.
pub(crate) fn per_message_refusal(code: Code) -> bool {
    matches!(
        code,
        Code::BadRequest
            | Code::InvalidTopic
            | Code::InvalidQueueId
            | Code::ReservedName
            | Code::TopicNotFound
            | Code::MessageTooLarge
            | Code::BatchTooLarge
    )
}
