//! The broker's one configuration struct: defaults, TOML, validation.
//!
//! Every key, with its default and unit, is listed in README.md
//! ("Broker configuration"). Command-line flags override TOML keys (see
//! `main.rs`); [`BrokerConfig::validate`] runs before anything starts.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Flush policy as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlushSetting {
    /// A send is acknowledged after an fdatasync covers it (group commit).
    Sync,
    /// A send is acknowledged after the write; fdatasync every `flush_interval_ms`.
    Async,
}

/// Largest `worker_threads`.
pub const MAX_WORKER_THREADS: u32 = 1024;

/// Broker configuration. Field docs give defaults and units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Address to listen on, `HOST:PORT` (a host name such as `localhost`
    /// is resolved at start-up; its first IPv4 address is used when it has
    /// one). Port 0 picks a free port. Default `127.0.0.1:8081`.
    pub listen: String,
    /// Data directory. Default `./halfmq-data`.
    pub data_dir: PathBuf,
    /// Flush policy. Default `sync`.
    pub flush: FlushSetting,
    /// Async flush interval, ms. Default 500 (RocketMQ's flushIntervalCommitLog).
    #[serde(deserialize_with = "crate::units::ms")]
    pub flush_interval_ms: u64,
    /// Commit-log segment size, bytes. Default 1 GiB (RocketMQ's mappedFileSizeCommitLog).
    #[serde(deserialize_with = "crate::units::bytes")]
    pub segment_bytes: u64,
    /// Largest message body, bytes. Default 4 MiB (RocketMQ's maxMessageSize).
    #[serde(deserialize_with = "crate::units::bytes")]
    pub max_message_bytes: u64,
    /// Most messages in one send request. Default 1024.
    pub max_batch_messages: u32,
    /// Most body bytes in one send request. Default 16 MiB.
    #[serde(deserialize_with = "crate::units::bytes")]
    pub max_batch_bytes: u64,
    /// Create a topic on first send to it. Default true.
    pub auto_create_topics: bool,
    /// Queues of a topic created without a count. Default 4.
    pub default_queues: u32,
    /// Most queues per topic. Default 256.
    pub max_queues: u32,
    /// Most topics. Default 10,000.
    pub max_topics: u32,
    /// Invisible duration of a received message when the receive names none, ms.
    /// Default 30,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub default_invisible_duration_ms: u64,
    /// Longest invisible duration a consumer may ask for, ms. Default 12 h.
    #[serde(deserialize_with = "crate::units::ms")]
    pub max_invisible_duration_ms: u64,
    /// Most messages one receive returns. Default 256.
    pub max_receive_messages: u32,
    /// Most record bytes one receive returns: it returns fewer messages
    /// instead (always at least one). Default 16 MiB, at least
    /// `max_message_bytes`.
    #[serde(deserialize_with = "crate::units::bytes")]
    pub max_receive_bytes: u64,
    /// Longest a delivery may stay leased in all, from its delivery through
    /// every ChangeInvisibleDuration, ms: an extension past it is refused.
    /// Default 24 h.
    #[serde(deserialize_with = "crate::units::ms")]
    pub max_lease_total_ms: u64,
    /// Most long polls (receives waiting for messages) at once, broker-wide;
    /// further receives answer at once with what is there (nothing). Default
    /// 8,192 (about 6 KB each).
    pub max_long_polls: u32,
    /// Most producer sessions (check-back streams) at once, broker-wide;
    /// further ones are refused with TOO_MANY_REQUESTS. Default 4,096 (about
    /// 26 KB each).
    pub max_producer_sessions: u32,
    /// Most (consumer group, topic) pairs with consumer progress; a receive
    /// that would start a new one is refused with TOO_MANY_REQUESTS. Default
    /// 4,096 (up to about 125 KB each, memory and sled, on a 256-queue topic).
    pub max_consumer_groups: u32,
    /// A new connection must send the HTTP/2 preface within this long or it
    /// is closed; until then it holds no `max_connections` slot, only one of
    /// `max_handshaking_connections`, ms. Default 10,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub handshake_timeout_ms: u64,
    /// Most connections at once that have not sent the HTTP/2 preface yet;
    /// when all are taken, the oldest of them is closed for a new one (so
    /// sockets that never speak cannot keep clients out). Default 1,024.
    pub max_handshaking_connections: u32,
    /// A connection that sends nothing for this long is closed (live HTTP/2
    /// peers answer the broker's keep-alive pings, sent every 60 s or every
    /// third of this when that is shorter), ms. Default 600,000 (Kafka's
    /// connections.max.idle.ms).
    #[serde(deserialize_with = "crate::units::ms")]
    pub idle_timeout_ms: u64,
    /// Longest long-poll wait of a receive, ms. Default 30,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub max_receive_wait_ms: u64,
    /// Most messages in flight (delivered, not acked) per consumer group and
    /// queue. Default 4,096.
    pub max_inflight_per_queue: u32,
    /// Most queue offsets between a group's consumer offset and its next fresh
    /// delivery, per queue. Default 65,536.
    pub max_unacked_window: u64,
    /// Most client connections at once. Default 1,024.
    pub max_connections: u32,
    /// Most concurrent requests per connection. Default 1,024.
    pub max_requests_per_connection: u32,
    /// How often the store checkpoint and consumer progress are saved, ms.
    /// Default 1,000. Bounds recovery work and what kill -9 can redeliver.
    #[serde(deserialize_with = "crate::units::ms")]
    pub checkpoint_interval_ms: u64,
    /// Delete sealed commit-log segments older than this, ms. Default 72 h
    /// (RocketMQ's fileReservedTime).
    #[serde(deserialize_with = "crate::units::ms")]
    pub retention_ms: u64,
    /// Delete the oldest sealed segments while the log exceeds this, bytes;
    /// 0 = no size budget. Default 0.
    #[serde(deserialize_with = "crate::units::bytes")]
    pub retention_bytes: u64,
    /// How often retention runs, ms. Default 60,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub retention_check_interval_ms: u64,
    /// Writes are refused with `STORAGE_FULL` when they would leave less
    /// than this many bytes free on the data directory's filesystem, so the
    /// metadata and consume queues keep room and the broker goes on at once
    /// when space returns; 0 = no floor. Default 64 MiB (RocketMQ refuses
    /// writes past diskSpaceWarningLevelRatio, 90 % used).
    #[serde(deserialize_with = "crate::units::bytes")]
    pub min_free_disk_bytes: u64,
    /// Zero-filled space kept ahead of the commit log's end, bytes; 0 = off.
    /// Default 1 MiB, at most 64 MiB. Each fdatasync then skips the inode
    /// update of a growing file (RocketMQ preallocates whole segments).
    #[serde(deserialize_with = "crate::units::bytes")]
    pub preallocate_bytes: u64,
    /// The most recently appended commit-log bytes kept in memory, so that
    /// reads near the log's end (consumers keeping up, EndTransaction reading
    /// its half) need no `pread`, bytes; 0 = off. Default 16 MiB, at most
    /// 1 GiB. (RocketMQ reads its mmapped segments, in the page cache.)
    #[serde(deserialize_with = "crate::units::bytes")]
    pub read_cache_bytes: u64,
    /// Sync flush only: how long a request waiting for the fdatasync that
    /// covers its records keeps polling for it (yielding to other tasks
    /// between polls) before it sleeps, µs; 0 = off (sleep at once).
    /// Default 0, at most [`MAX_SYNC_WAIT_SPIN_US`]. Spinning spends CPU so
    /// that a runtime thread does not sleep and get woken for each
    /// fdatasync, which raised one-thread throughput on this project's VM
    /// (benches/README.md); it hurts when the host is short of CPU.
    #[serde(deserialize_with = "crate::units::us")]
    pub sync_wait_spin_us: u64,
    /// A half message younger than this is never checked back, ms. Default
    /// 6,000 (RocketMQ's transactionTimeOut).
    #[serde(deserialize_with = "crate::units::ms")]
    pub transaction_timeout_ms: u64,
    /// Wait between two check-backs of one half, ms. Default 30,000
    /// (RocketMQ's transactionCheckInterval).
    #[serde(deserialize_with = "crate::units::ms")]
    pub check_interval_ms: u64,
    /// Check-backs delivered before a half is given up. Default 15
    /// (RocketMQ's transactionCheckMax).
    pub check_max: u32,
    /// How long a delivered check may go unanswered before it counts as
    /// UNKNOWN, ms. Default 10,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub check_reply_timeout_ms: u64,
    /// Unanswered checks per producer session. Default 64.
    pub max_checks_inflight_per_session: u32,
    /// Most unresolved half messages; further half sends are refused.
    /// Default 2,000,000 (about 200 bytes of memory each).
    pub max_pending_halves: u64,
    /// Delay levels of consumer retries, ascending, with units. The n-th
    /// retry of a message uses level n + 2 (1-based). Default RocketMQ's:
    /// `"1s 5s 10s 30s 1m 2m 3m 4m 5m 6m 7m 8m 9m 10m 20m 30m 1h 2h"`.
    pub retry_delays: String,
    /// Failed deliveries (nacks, expired invisible durations) before a message
    /// goes to its group's dead-letter queue `%DLQ%<group>`. Default 16
    /// (RocketMQ's maxReconsumeTimes).
    pub max_reconsume_times: u32,
    /// How much of the commit log a restart may replay to rebuild the
    /// transaction state, bytes: pending halves (and delayed messages) older
    /// than that, or already checked, are saved in sled at checkpoints; the
    /// rest are found again in the log. Default 1 GiB (about a second of
    /// recovery here); 0 saves every pending half.
    #[serde(deserialize_with = "crate::units::bytes")]
    pub transaction_replay_bytes: u64,
    /// Longest delay a delayed send may ask for, ms. Default 3 days
    /// (RocketMQ 5's timerMaxDelaySec).
    #[serde(deserialize_with = "crate::units::ms")]
    pub max_delay_ms: u64,
    /// How long an idempotency key is remembered: a send repeating a key
    /// stored this recently on the same topic stores nothing and gets the
    /// first send's receipt, ms. Default 120,000 (NATS JetStream's
    /// `duplicate_window`).
    #[serde(deserialize_with = "crate::units::ms")]
    pub dedup_window_ms: u64,
    /// Most idempotency keys remembered (243 bytes of memory each, measured by
    /// `examples/dedup_memory.rs`);
    /// past it the oldest are forgotten before their window ends. Default
    /// 2,000,000
    /// (a full window at about 16,000 keyed sends a second).
    pub max_dedup_keys: u64,
    /// Threads of the async runtime (network, request handling); 0 = one per
    /// CPU core (tokio's default); 1 = tokio's current-thread scheduler.
    /// Default 0, at most 1,024. The commit-log flusher and blocking work
    /// have threads of their own.
    pub worker_threads: u32,
    /// This broker's node id in its broker group (`--node-id`); used only
    /// with `peers`. Default 0.
    pub node_id: u64,
    /// The members of the broker group at its first start, as
    /// `"ID=HOST:PORT,..."` (each member's client address, this one's
    /// included); empty = a single broker, no replication. Default empty.
    pub peers: String,
    /// This member joins a broker group that exists already (`--join`): it
    /// never proposes `peers` as a new group and waits until the leader
    /// adds it (`halfmq cluster add-learner`). Default false.
    pub join: bool,
    /// Raft: how often the leader sends heartbeats, ms. Default 100.
    #[serde(deserialize_with = "crate::units::ms")]
    pub raft_heartbeat_interval_ms: u64,
    /// Raft: a follower that hears no leader for a random time between this
    /// and `raft_election_timeout_max_ms` starts an election, ms. Default
    /// 500 (with the maximum: failover in about 2 s).
    #[serde(deserialize_with = "crate::units::ms")]
    pub raft_election_timeout_min_ms: u64,
    /// Raft: see `raft_election_timeout_min_ms`; also the leader's lease,
    /// ms. Default 1,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub raft_election_timeout_max_ms: u64,
    /// Raft: most entries in one AppendEntries message. Default 300
    /// (openraft's).
    pub raft_max_payload_entries: u64,
    /// Raft: bytes per chunk of a streamed snapshot. Default 3 MiB
    /// (openraft's).
    #[serde(deserialize_with = "crate::units::bytes")]
    pub raft_snapshot_chunk_bytes: u64,
    /// Raft: largest snapshot a replica accepts, in bytes of the log it
    /// carries (a snapshot is the leader's retained log: it must fit).
    /// Default 1 TiB.
    #[serde(deserialize_with = "crate::units::bytes")]
    pub raft_max_snapshot_bytes: u64,
    /// Raft: how long sending a snapshot may take, ms. Default 600,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub raft_install_snapshot_timeout_ms: u64,
    /// Raft: how long a connection attempt to a peer may take, ms. Default
    /// 1,000.
    #[serde(deserialize_with = "crate::units::ms")]
    pub raft_connect_timeout_ms: u64,
    /// The HTTP endpoint (`/metrics`, `/healthz`, `/readyz`), `HOST:PORT`;
    /// empty = off. Default `127.0.0.1:9081`.
    pub http_listen: String,
    /// With auth on, serve `/metrics` without credentials. Default false.
    pub metrics_anonymous: bool,
    /// How long a web console login lasts, ms (then it asks again).
    /// Default 28,800,000 (8 h).
    #[serde(deserialize_with = "crate::units::ms")]
    pub console_session_ttl_ms: u64,
    /// Most web console sessions at once; the oldest is dropped for a new
    /// one. Default 1,000.
    pub console_max_sessions: u32,
    /// Serve RocketMQ 5's gRPC API (`apache.rocketmq.v2.MessagingService`)
    /// on the same listener, for the official RocketMQ clients. Default true.
    pub rocketmq_enabled: bool,
    /// Most RocketMQ clients with a Telemetry stream open at once; further
    /// ones are refused with TOO_MANY_REQUESTS. Default 10,000.
    pub rocketmq_max_clients: u32,
    /// `[auth]`: users, signed requests, policies (README "Security").
    pub auth: crate::auth::config::AuthConfig,
    /// `[tls]`: TLS of the listener and of members' connections.
    pub tls: crate::auth::config::TlsConfig,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            listen: "127.0.0.1:8081".to_owned(),
            data_dir: PathBuf::from("./halfmq-data"),
            flush: FlushSetting::Sync,
            flush_interval_ms: 500,
            segment_bytes: 1 << 30,
            max_message_bytes: 4 << 20,
            max_batch_messages: 1024,
            max_batch_bytes: 16 << 20,
            auto_create_topics: true,
            rocketmq_enabled: true,
            http_listen: "127.0.0.1:9081".to_owned(),
            metrics_anonymous: false,
            console_session_ttl_ms: 8 * 3600 * 1000,
            console_max_sessions: 1000,
            rocketmq_max_clients: 10_000,
            default_queues: 4,
            max_queues: 256,
            max_topics: 10_000,
            default_invisible_duration_ms: 30_000,
            max_invisible_duration_ms: 12 * 3600 * 1000,
            max_receive_messages: 256,
            max_receive_wait_ms: 30_000,
            max_receive_bytes: 16 << 20,
            max_lease_total_ms: 24 * 3600 * 1000,
            max_long_polls: 8192,
            max_producer_sessions: 4096,
            max_consumer_groups: 4096,
            handshake_timeout_ms: 10_000,
            max_handshaking_connections: 1024,
            idle_timeout_ms: 600_000,
            max_inflight_per_queue: 4096,
            max_unacked_window: 65_536,
            max_connections: 1024,
            max_requests_per_connection: 1024,
            checkpoint_interval_ms: 1000,
            retention_ms: 72 * 3600 * 1000,
            retention_bytes: 0,
            retention_check_interval_ms: 60_000,
            min_free_disk_bytes: 64 << 20,
            preallocate_bytes: 1 << 20,
            read_cache_bytes: 16 << 20,
            sync_wait_spin_us: 0,
            max_delay_ms: 3 * 24 * 3600 * 1000,
            dedup_window_ms: 120_000,
            max_dedup_keys: 2_000_000,
            worker_threads: 0,
            node_id: 0,
            peers: String::new(),
            join: false,
            raft_heartbeat_interval_ms: 100,
            raft_election_timeout_min_ms: 500,
            raft_election_timeout_max_ms: 1000,
            raft_max_payload_entries: 300,
            raft_snapshot_chunk_bytes: 3 << 20,
            raft_max_snapshot_bytes: 1 << 40,
            raft_install_snapshot_timeout_ms: 600_000,
            raft_connect_timeout_ms: 1000,
            auth: Default::default(),
            tls: Default::default(),
            transaction_replay_bytes: 1 << 30,
            transaction_timeout_ms: 6_000,
            check_interval_ms: 30_000,
            check_max: 15,
            check_reply_timeout_ms: 10_000,
            max_checks_inflight_per_session: 64,
            max_pending_halves: 2_000_000,
            retry_delays: crate::core::retry::DEFAULT_RETRY_DELAYS.to_owned(),
            max_reconsume_times: crate::core::retry::DEFAULT_MAX_RECONSUME_TIMES,
        }
    }
}

/// A configuration key with a bad value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid configuration `{key}`: {reason}")]
pub struct ConfigError {
    /// The key at fault.
    pub key: String,
    /// Why.
    pub reason: String,
}

/// Largest accepted [`BrokerConfig::sync_wait_spin_us`]: 10 ms, far above
/// an fdatasync's usual latency.
pub const MAX_SYNC_WAIT_SPIN_US: u64 = 10_000;

/// Bytes a request may carry beyond `max_batch_bytes` of bodies: topics,
/// tags, keys and properties of a batch (see [`BrokerConfig::max_request_bytes`]).
pub const REQUEST_OVERHEAD_BYTES: u64 = 4 << 20;

/// Largest accepted `max_batch_bytes`: 1 GiB (a gRPC message's length is
/// a 32-bit number, and one request is held in memory whole).
pub const MAX_BATCH_BYTES: u64 = 1 << 30;

/// Extra bytes a record needs beyond its body (headers, topic, tag, keys,
/// properties are capped separately); used to derive the storage record limit.
pub const RECORD_OVERHEAD_BYTES: u64 = 64 * 1024;

impl BrokerConfig {
    /// Parses TOML text (unknown keys are errors).
    ///
    /// # Errors
    /// [`ConfigError`] naming the key when possible.
    pub fn from_toml(text: &str) -> Result<BrokerConfig, ConfigError> {
        let de = toml::Deserializer::new(text);
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.message().trim().to_owned();
            // An unknown key has no path of its own: toml names it in the
            // message between backticks.
            let key = if path.is_empty() || path == "." {
                message
                    .split('`')
                    .nth(1)
                    .map_or_else(|| "toml".to_owned(), str::to_owned)
            } else {
                path
            };
            let line = inner
                .span()
                .map(|sp| text[..sp.start.min(text.len())].lines().count().max(1));
            ConfigError {
                key,
                reason: match line {
                    Some(l) => format!("{message} (line {l})"),
                    None => message,
                },
            }
        })
    }

    /// The address [`BrokerConfig::listen`] names: its first IPv4 address
    /// when it resolves to several, else its first.
    ///
    /// # Errors
    /// [`ConfigError`] for `listen` when it is not `HOST:PORT` or does not
    /// resolve.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        let bad = |reason: String| ConfigError {
            key: "listen".into(),
            reason,
        };
        if let Ok(a) = self.listen.parse::<SocketAddr>() {
            return Ok(a);
        }
        let Some((host, port)) = self.listen.rsplit_once(':') else {
            return Err(bad(format!(
                "{:?} has no port: use HOST:PORT, e.g. 127.0.0.1:8081",
                self.listen
            )));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(bad(format!(
                "{:?} is not HOST:PORT, e.g. 127.0.0.1:8081",
                self.listen
            )));
        }
        let addrs: Vec<SocketAddr> = self
            .listen
            .to_socket_addrs()
            .map_err(|e| bad(format!("cannot resolve {:?}: {e}", self.listen)))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| bad(format!("{:?} resolves to no address", self.listen)))
    }

    /// The largest gRPC request the broker reads, bytes:
    /// `max_batch_bytes` plus [`REQUEST_OVERHEAD_BYTES`] for names, keys and
    /// properties. A larger request is refused by the transport before it is
    /// read (gRPC `OUT_OF_RANGE`; the Rust client reports it as
    /// `MESSAGE_TOO_LARGE` or `BATCH_TOO_LARGE`).
    pub fn max_request_bytes(&self) -> usize {
        usize::try_from(self.max_batch_bytes.saturating_add(REQUEST_OVERHEAD_BYTES))
            .unwrap_or(usize::MAX)
    }

    /// Checks every key.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, reason: String| {
            Err(ConfigError {
                key: key.to_owned(),
                reason,
            })
        };
        let at_least = |key: &str, v: u64, min: u64| {
            if v < min {
                bad(key, format!("{v} is below the minimum {min}"))
            } else {
                Ok(())
            }
        };
        let listen = self.listen_addr()?;
        self.cluster_config()?;
        crate::auth::config::validate(&self.auth, &self.tls, listen, !self.peers.is_empty())?;
        at_least("flush_interval_ms", self.flush_interval_ms, 1)?;
        at_least("segment_bytes", self.segment_bytes, 64 * 1024)?;
        at_least("max_message_bytes", self.max_message_bytes, 1)?;
        if self.max_message_bytes + RECORD_OVERHEAD_BYTES > self.segment_bytes {
            return bad(
                "max_message_bytes",
                format!(
                    "{} plus {RECORD_OVERHEAD_BYTES} bytes of headers must fit in segment_bytes {}",
                    self.max_message_bytes, self.segment_bytes
                ),
            );
        }
        if self.max_message_bytes + RECORD_OVERHEAD_BYTES > u64::from(u32::MAX) {
            return bad("max_message_bytes", "must be below 4 GiB".into());
        }
        if self.preallocate_bytes > halfmq_storage::config::MAX_PREALLOCATE_BYTES {
            return bad(
                "preallocate_bytes",
                format!(
                    "{} exceeds the most, {} (64 MiB)",
                    self.preallocate_bytes,
                    halfmq_storage::config::MAX_PREALLOCATE_BYTES
                ),
            );
        }
        if self.read_cache_bytes > halfmq_storage::config::MAX_READ_CACHE_BYTES {
            return bad(
                "read_cache_bytes",
                format!(
                    "{} exceeds the most, {} (1 GiB)",
                    self.read_cache_bytes,
                    halfmq_storage::config::MAX_READ_CACHE_BYTES
                ),
            );
        }
        if self.sync_wait_spin_us > MAX_SYNC_WAIT_SPIN_US {
            return bad(
                "sync_wait_spin_us",
                format!(
                    "{} exceeds the most, {MAX_SYNC_WAIT_SPIN_US} (10 ms)",
                    self.sync_wait_spin_us
                ),
            );
        }
        at_least("max_batch_messages", u64::from(self.max_batch_messages), 1)?;
        at_least(
            "max_batch_bytes",
            self.max_batch_bytes,
            self.max_message_bytes,
        )?;
        if self.max_batch_bytes > MAX_BATCH_BYTES {
            return bad(
                "max_batch_bytes",
                format!(
                    "{} exceeds the most, {MAX_BATCH_BYTES} (1 GiB)",
                    self.max_batch_bytes
                ),
            );
        }
        at_least("default_queues", u64::from(self.default_queues), 1)?;
        at_least(
            "max_queues",
            u64::from(self.max_queues),
            u64::from(self.default_queues),
        )?;
        at_least("max_topics", u64::from(self.max_topics), 1)?;
        at_least("max_delay_ms", self.max_delay_ms, 1)?;
        at_least("dedup_window_ms", self.dedup_window_ms, 1)?;
        at_least("max_dedup_keys", self.max_dedup_keys, 1)?;
        at_least(
            "default_invisible_duration_ms",
            self.default_invisible_duration_ms,
            1,
        )?;
        at_least(
            "max_invisible_duration_ms",
            self.max_invisible_duration_ms,
            self.default_invisible_duration_ms,
        )?;
        at_least(
            "max_receive_messages",
            u64::from(self.max_receive_messages),
            1,
        )?;
        at_least(
            "max_inflight_per_queue",
            u64::from(self.max_inflight_per_queue),
            1,
        )?;
        at_least("max_unacked_window", self.max_unacked_window, 1)?;
        at_least(
            "max_receive_bytes",
            self.max_receive_bytes,
            self.max_message_bytes,
        )?;
        at_least(
            "max_lease_total_ms",
            self.max_lease_total_ms,
            self.max_invisible_duration_ms,
        )?;
        at_least("max_long_polls", u64::from(self.max_long_polls), 1)?;
        at_least(
            "rocketmq_max_clients",
            u64::from(self.rocketmq_max_clients),
            1,
        )?;
        at_least("console_session_ttl_ms", self.console_session_ttl_ms, 1000)?;
        at_least(
            "console_max_sessions",
            u64::from(self.console_max_sessions),
            1,
        )?;
        at_least(
            "max_producer_sessions",
            u64::from(self.max_producer_sessions),
            1,
        )?;
        at_least(
            "max_consumer_groups",
            u64::from(self.max_consumer_groups),
            1,
        )?;
        at_least("handshake_timeout_ms", self.handshake_timeout_ms, 100)?;
        at_least(
            "max_handshaking_connections",
            u64::from(self.max_handshaking_connections),
            1,
        )?;
        at_least("idle_timeout_ms", self.idle_timeout_ms, 1_000)?;
        at_least("max_connections", u64::from(self.max_connections), 1)?;
        at_least(
            "max_requests_per_connection",
            u64::from(self.max_requests_per_connection),
            1,
        )?;
        at_least("checkpoint_interval_ms", self.checkpoint_interval_ms, 10)?;
        at_least("retention_ms", self.retention_ms, 1)?;
        at_least(
            "retention_check_interval_ms",
            self.retention_check_interval_ms,
            10,
        )?;
        at_least("transaction_timeout_ms", self.transaction_timeout_ms, 1)?;
        at_least("check_interval_ms", self.check_interval_ms, 1)?;
        at_least("check_max", u64::from(self.check_max), 1)?;
        at_least("check_reply_timeout_ms", self.check_reply_timeout_ms, 1)?;
        at_least(
            "max_checks_inflight_per_session",
            u64::from(self.max_checks_inflight_per_session),
            1,
        )?;
        at_least("max_pending_halves", self.max_pending_halves, 1)?;
        if self.worker_threads > MAX_WORKER_THREADS {
            return bad(
                "worker_threads",
                format!("{} is more than {MAX_WORKER_THREADS}", self.worker_threads),
            );
        }
        if let Err(reason) = crate::core::retry::parse_delays(&self.retry_delays) {
            return bad("retry_delays", reason);
        }
        Ok(())
    }

    /// The retry policy (call after [`BrokerConfig::validate`]).
    pub fn retry_policy(&self) -> crate::core::retry::RetryPolicy {
        crate::core::retry::RetryPolicy {
            delays_ms: crate::core::retry::parse_delays(&self.retry_delays).unwrap_or_default(),
            max_reconsume_times: self.max_reconsume_times,
        }
    }

    /// The check-back scheduler's settings.
    pub fn check_config(&self) -> crate::core::txcheck::CheckConfig {
        crate::core::txcheck::CheckConfig {
            transaction_timeout_ms: self.transaction_timeout_ms,
            check_interval_ms: self.check_interval_ms,
            check_max: self.check_max,
            check_reply_timeout_ms: self.check_reply_timeout_ms,
        }
    }

    /// The broker group's settings, `None` for a single broker (no `peers`).
    ///
    /// # Errors
    /// [`ConfigError`] for `peers` when it is not `ID=HOST:PORT,...` with
    /// distinct ids and addresses, or does not name `node_id`; for the
    /// `raft_*` keys openraft refuses.
    pub fn cluster_config(&self) -> Result<Option<crate::cluster::ClusterConfig>, ConfigError> {
        if self.peers.trim().is_empty() {
            return Ok(None);
        }
        let bad = |key: &str, reason: String| ConfigError {
            key: key.to_owned(),
            reason,
        };
        let mut peers = std::collections::BTreeMap::new();
        for part in self
            .peers
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let Some((id, addr)) = part.split_once('=') else {
                return Err(bad("peers", format!("{part:?} is not ID=HOST:PORT")));
            };
            let id: u64 = id
                .trim()
                .parse()
                .map_err(|_| bad("peers", format!("{part:?}: the node id is not a number")))?;
            let addr = addr.trim();
            if addr
                .rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
            {
                return Err(bad("peers", format!("{part:?}: {addr:?} is not HOST:PORT")));
            }
            if peers.values().any(|a: &String| a == addr) {
                return Err(bad("peers", format!("{addr} is named twice")));
            }
            if peers.insert(id, addr.to_owned()).is_some() {
                return Err(bad("peers", format!("node id {id} is named twice")));
            }
        }
        if !peers.contains_key(&self.node_id) {
            return Err(bad(
                "node_id",
                format!(
                    "{} is not among the peers ({}); give --node-id",
                    self.node_id,
                    peers
                        .keys()
                        .map(u64::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let mut c = crate::cluster::ClusterConfig::new(self.node_id, peers);
        c.heartbeat_interval_ms = self.raft_heartbeat_interval_ms;
        c.election_timeout_min_ms = self.raft_election_timeout_min_ms;
        c.election_timeout_max_ms = self.raft_election_timeout_max_ms;
        c.max_payload_entries = self.raft_max_payload_entries;
        c.snapshot_chunk_bytes =
            usize::try_from(self.raft_snapshot_chunk_bytes).unwrap_or(usize::MAX);
        c.max_snapshot_bytes = usize::try_from(self.raft_max_snapshot_bytes).unwrap_or(usize::MAX);
        c.install_snapshot_timeout_ms = self.raft_install_snapshot_timeout_ms;
        c.connect_timeout_ms = self.raft_connect_timeout_ms;
        c.join = self.join;
        // Connections to peers leave from the address this member listens
        // on, when it names one (firewall rules, several addresses).
        c.local_ip = self
            .listen
            .parse::<std::net::SocketAddr>()
            .ok()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified());
        if self.auth.enabled {
            if let Some(secret) = &self.auth.cluster_secret {
                c.signer = halfmq_proto::auth::Signer::new(
                    halfmq_proto::auth::MEMBER_USER,
                    secret.expose(),
                );
            }
        }
        if self.tls.enabled() {
            c.tls = Some(crate::auth::tls::peer_client(&self.tls)?);
        }
        c.validate()
            .map_err(|e| bad("raft_election_timeout_min_ms", e))?;
        Ok(Some(c))
    }

    /// The storage configuration this broker configuration implies.
    pub fn store_config(&self) -> halfmq_storage::StoreConfig {
        let mut s = halfmq_storage::StoreConfig::new(&self.data_dir);
        s.replicated = !self.peers.trim().is_empty();
        s.segment_bytes = self.segment_bytes;
        s.max_record_bytes = (self.max_message_bytes + RECORD_OVERHEAD_BYTES) as usize;
        s.flush = match self.flush {
            FlushSetting::Sync => halfmq_storage::FlushMode::Sync,
            FlushSetting::Async => halfmq_storage::FlushMode::Async {
                interval_ms: self.flush_interval_ms,
            },
        };
        s.retention_ms = self.retention_ms;
        s.retention_bytes = if self.retention_bytes == 0 {
            u64::MAX
        } else {
            self.retention_bytes
        };
        s.min_free_disk_bytes = self.min_free_disk_bytes;
        s.preallocate_bytes = self.preallocate_bytes;
        s.read_cache_bytes = self.read_cache_bytes;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_parsed_and_bad_ones_named() {
        let group = |node_id: u64, peers: &str, listen: &str| BrokerConfig {
            node_id,
            peers: peers.into(),
            listen: listen.into(),
            join: true,
            ..BrokerConfig::default()
        };
        assert!(group(0, " ", "127.0.0.1:1")
            .cluster_config()
            .unwrap()
            .is_none());
        let c = group(
            2,
            "1=127.0.0.1:8081, 2=127.0.0.2:8091,3=h:8101",
            "127.0.0.2:8091",
        )
        .cluster_config()
        .unwrap()
        .unwrap();
        assert_eq!(c.peers.len(), 3);
        assert_eq!(c.own_address(), Some("127.0.0.2:8091"));
        assert_eq!(c.local_ip, Some("127.0.0.2".parse().unwrap()));
        assert!(c.join);
        let any = group(1, "1=127.0.0.1:8081", "0.0.0.0:8081")
            .cluster_config()
            .unwrap()
            .unwrap();
        assert_eq!(any.local_ip, None);
        for (node, peers, key) in [
            (1, "1=127.0.0.1", "peers"),
            (1, "x=127.0.0.1:1", "peers"),
            (1, "1127.0.0.1:1", "peers"),
            (1, "1=a:1,2=a:1", "peers"),
            (1, "1=a:1,1=b:1", "peers"),
            (3, "1=a:1,2=b:1", "node_id"),
        ] {
            let e = group(node, peers, "127.0.0.1:1")
                .cluster_config()
                .unwrap_err();
            assert_eq!(e.key, key, "{peers}: {}", e.reason);
        }
    }

    #[test]
    fn defaults_are_valid_and_toml_overrides() {
        BrokerConfig::default().validate().unwrap();
        let c =
            BrokerConfig::from_toml("listen = \"127.0.0.1:9999\"\nflush = \"async\"\n").unwrap();
        assert_eq!(c.listen_addr().unwrap().port(), 9999);
        assert_eq!(c.flush, FlushSetting::Async);
        assert_eq!(c.default_queues, 4);
    }

    #[test]
    fn unknown_and_bad_keys_are_named() {
        let e = BrokerConfig::from_toml("no_such_key = 1").unwrap_err();
        assert_eq!(e.key, "no_such_key");
        let c = BrokerConfig {
            default_queues: 0,
            ..BrokerConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "default_queues");
        let c = BrokerConfig::from_toml("worker_threads = 1").unwrap();
        c.validate().unwrap();
        let c = BrokerConfig {
            worker_threads: MAX_WORKER_THREADS + 1,
            ..BrokerConfig::default()
        };
        assert_eq!(c.validate().unwrap_err().key, "worker_threads");
    }

    #[test]
    fn toml_takes_units_and_names_the_key_of_a_bad_value() {
        let c = BrokerConfig::from_toml(
            "check_interval_ms = \"2s\"\nsegment_bytes = \"64MiB\"\nsync_wait_spin_us = \"300us\"\nretention_ms = 1000\n",
        )
        .unwrap();
        assert_eq!(c.check_interval_ms, 2000);
        assert_eq!(c.segment_bytes, 64 << 20);
        assert_eq!(c.sync_wait_spin_us, 300);
        assert_eq!(c.retention_ms, 1000);
        let e = BrokerConfig::from_toml("flush = \"sync\"\ncheck_interval_ms = \"2 sec ago\"\n")
            .unwrap_err();
        assert_eq!(e.key, "check_interval_ms", "{e}");
        assert!(e.reason.contains("line 2"), "{e}");
        let e = BrokerConfig::from_toml("segment_bytes = true").unwrap_err();
        assert_eq!(e.key, "segment_bytes", "{e}");
        let e = BrokerConfig::from_toml("max_topics = \"many\"").unwrap_err();
        assert_eq!(e.key, "max_topics", "{e}");
    }

    #[test]
    fn listen_takes_host_names_and_needs_a_port() {
        let mut c = BrokerConfig {
            listen: "localhost:0".into(),
            ..BrokerConfig::default()
        };
        assert!(c.listen_addr().unwrap().ip().is_loopback());
        c.validate().unwrap();
        for bad in ["127.0.0.1", "localhost", ":8081", "127.0.0.1:http"] {
            c.listen = bad.into();
            assert_eq!(c.validate().unwrap_err().key, "listen", "{bad}");
        }
        c.listen = "[::1]:8081".into();
        assert!(c.listen_addr().unwrap().is_ipv6());
    }
}
