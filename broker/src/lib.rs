//! The halfmq broker: the only crate that opens listening sockets and owns
//! background tasks.
//!
//! # Layout
//! - [`config`]: [`BrokerConfig`], defaults, TOML, validation.
//! - [`names`]: topic/group name rules, tag expressions, fixed field limits.
//! - [`delivery`]: pure state machine of one consumer group on one queue
//!   (leases, invisible deadlines, acks, consumer offset).
//! - [`broker`]: [`Broker`]: topics, send, receive (long polling), ack, nack,
//!   progress persistence, stats, background checkpoint and retention.
//! - [`admin`]: operator actions: consumer-offset reset, topic deletion.
//! - [`txcheck`]: pure check-back scheduler (deadline-ordered pending halves).
//! - [`transactions`]: half messages, EndTransaction, producer sessions,
//!   the check driver, transaction state persistence and replay.
//! - [`retry`]: pure retry/DLQ policy (delay levels, max reconsume times).
//! - [`redelivery`]: retry queues and dead-letter queues: hand-off of failed
//!   deliveries, due retries, DLQ list / redrive / purge.
//! - [`service`]: gRPC services; wire types convert to domain types here.
//! - [`server`]: listener, connection limit, graceful shutdown.
//! - [`units`]: durations and sizes with units, for flags and TOML.
//! - [`logging`]: log set-up (colour only on a terminal) and one-line error reports for the binaries.
//! - [`error`]: the crate error type, [`BrokerError`].

pub mod admin;
pub mod broker;
pub mod config;
pub mod delivery;
pub mod error;
pub mod logging;
pub mod names;
pub mod redelivery;
pub mod retry;
pub mod server;
pub mod service;
pub mod transactions;
pub mod txcheck;
pub mod units;

pub use broker::{Broker, Clock, SystemClock};
pub use config::{BrokerConfig, ConfigError, FlushSetting};
pub use error::BrokerError;
pub use server::{serve, start, start_with_clock, RunningBroker};
