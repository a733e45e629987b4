//! Wire types of the halfmq gRPC API (package `halfmq.v1`).
//!
//! Generated code only; filled in by the broker/client issue. Nothing here
//! knows about storage.
