//! Rust client for halfmq. Depends on `halfmq-proto` only, never on storage or
//! broker. Filled in by the broker/client issue.
