//! Wire types of the halfmq gRPC API (package `halfmq.v1`), generated from
//! `proto/halfmq.proto` by tonic/prost at build time with a vendored protoc.
//!
//! Generated code, and the signed-request scheme ([`auth`]) that is part of
//! the wire contract: no I/O, no domain logic. The broker and the client
//! convert these types to their own at the boundary.
//!
//! # Layout
//! - [`v1`]: messages, the [`v1::Code`] status codes, and the `producer`,
//!   `consumer` and `admin` services (clients and servers).
//! - [`raft`]: replica-to-replica RPCs of a broker group (`halfmq.raft.v1`).
//! - [`auth`]: how a request is signed (headers, key derivation, proof).
//! - [`rocketmq`]: the part of RocketMQ 5's gRPC API that halfmq serves
//!   (`apache.rocketmq.v2`, service `MessagingService`), written for halfmq
//!   with upstream's names and field numbers.

pub mod auth;

#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("halfmq.v1");
}

/// The RPCs between the replicas of a broker group (`halfmq.raft.v1`).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod raft {
    tonic::include_proto!("halfmq.raft.v1");
}

/// RocketMQ 5's gRPC API as halfmq serves it (`apache.rocketmq.v2`):
/// `proto/rocketmq/v2.proto`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod rocketmq {
    tonic::include_proto!("apache.rocketmq.v2");
}
