//! The halfmq broker: the only crate that opens sockets and owns background
//! tasks. Filled in by the broker/client issue.
