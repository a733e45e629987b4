//! Helpers for halfmq's black-box integration tests (under `tests/tests/`).
