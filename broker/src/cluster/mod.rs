//! Replication: a broker group of replicas on openraft (issue #18; see
//! ARCHITECTURE.md, "Replication").
//!
//! # Layout
//! - [`types`]: the openraft type configuration (entries carry encoded records).
//! - [`log_store`]: openraft's log storage over the replica's commit log.
//! - [`state_machine`]: apply (consume queues, then the core's [`state_machine::Applier`]) and snapshots.
//! - [`network`]: the `halfmq.raft.v1` RPCs, client and server side.
//! - [`node`]: one replica: start-up, proposals, status, membership changes.

pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;
pub mod types;

pub use node::{ClusterConfig, NodeHandle, ProposeError, Raft};
