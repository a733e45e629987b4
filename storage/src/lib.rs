//! halfmq's storage engine: a segmented, CRC-checked commit log, consume
//! queues derived from it, metadata in sled, and crash recovery.
//!
//! This crate knows nothing of the network or of protobuf. It owns one thread
//! per open log (the flusher, joined on close) and no other task.
//!
//! # Layout
//! - [`record`]: the record format (encode, decode, frame checks).
//! - [`commitlog`]: segment files, appends, group commit, reads, iteration,
//!   recovery of a torn tail.
//! - [`consume_queue`]: per (topic, queue id) index of 20-byte entries.
//! - [`entry_index`]: replicated log entries (entry index → their bytes in
//!   the commit log), and small atomically replaced state files (a vote).
//! - [`meta`]: sled-backed checkpoint, consumer offsets and small keyed state.
//! - [`retention`]: the pure policy choosing segments to delete.
//! - [`store`]: [`Store`], which ties them together and recovers at open.
//! - [`config`]: [`StoreConfig`] and [`FlushMode`].
//! - [`lock`]: the data directory's lock file (one store per directory).
//! - [`error`]: the crate's [`Error`].
//!
//! # Example
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use halfmq_storage::{Record, Store, StoreConfig};
//! let dir = tempfile::tempdir()?;
//! let store = Store::open(StoreConfig::new(dir.path()))?;
//! let receipt = store
//!     .append_durable(vec![Record { topic: "orders".into(), body: "hi".into(), ..Record::default() }])
//!     .await?;
//! assert_eq!(receipt.queue_offsets, vec![Some(0)]);
//! let msg = store.read_queue("orders", 0, 0)?;
//! assert_eq!(&msg.record.body[..], b"hi");
//! store.close()?;
//! # Ok(()) }
//! ```

pub mod commitlog;
pub mod config;
pub mod consume_queue;
pub mod entry_index;
pub mod error;
pub mod lock;
pub mod meta;
pub mod record;
pub mod retention;
pub mod store;

pub use commitlog::{
    CommitLog, CorruptRange, FlushObserver, LogScan, RecoveryReport, ScanItem, SegmentInfo,
};
pub use config::{FlushMode, StoreConfig};
pub use consume_queue::{ConsumeQueue, CqEntry, Slot};
pub use entry_index::{entry_marker, marker_pos, EntryIndex, EntryKind, EntryPos, StateFile};
pub use error::{Error, Result};
pub use meta::{Checkpoint, Meta};
pub use record::{tag_hash, MessageId, Record, RecordKind};
pub use store::{now_ms, AppendReceipt, MetaReport, QueueMessage, Store};
