//! The `halfmq-bench` load-test tool. Filled in by the bench issue.
