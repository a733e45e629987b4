//! The broker's API edges: each converts its wire types to the core's
//! domain types and back, and maps core errors to its status codes. No core
//! type depends on them.
//!
//! - [`halfmq`]: the `halfmq.v1` gRPC services (Producer, Consumer, Admin).
//! - [`rocketmq`]: RocketMQ 5's `apache.rocketmq.v2.MessagingService`, for
//!   the official RocketMQ clients.

pub mod halfmq;
pub mod rocketmq;
