//! The halfmq broker: the only crate that opens listening sockets and owns
//! background tasks.
//!
//! # Layout
//! - [`core`]: the broker itself, [`Broker`]: topics, sends, deliveries,
//!   transactions, retries and DLQs, consumer progress, stats. Domain types
//!   only: no protobuf, no sockets. Its pure state machines
//!   ([`core::delivery`], [`core::retry`], [`core::txcheck`]) take `now`
//!   from the caller.
//! - [`api`]: the API edges, converting the wire to the core and back:
//!   [`api::halfmq`] (`halfmq.v1`).
//! - [`services`]: background work: checkpoints, retention, the check-back
//!   driver (the leader's, once there is replication).
//! - [`server`]: listener, connection limit, graceful shutdown.
//! - [`config`]: [`BrokerConfig`], defaults, TOML, validation; [`units`]:
//!   durations and sizes with units.
//! - [`logging`]: log set-up and one-line error reports for the binaries.
//! - [`error`]: the crate error type, [`BrokerError`].
//!
//! Dependencies point one way: `api`, `services` and `server` use `core`;
//! `core` uses none of them. Inside `core`, the module defining [`Broker`]
//! holds only state and its lifecycle; each operation module (`send`,
//! `receive`, `redelivery`, `transactions`, `admin`) extends it and uses
//! only lower modules and its siblings' operations.

pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod core;
pub mod error;
pub mod http;
pub mod logging;
pub mod server;
pub mod services;
pub mod units;

pub use config::{BrokerConfig, ConfigError, FlushSetting};
pub use core::{Broker, Clock, SystemClock};
pub use error::BrokerError;
pub use server::{serve, serve_member, start, start_with_clock, RunningBroker};
