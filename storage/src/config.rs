//! Storage configuration, with defaults and validation.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::record::MIN_RECORD_BYTES;

/// When an append counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushMode {
    /// An append's durability future completes only after an fdatasync that
    /// covers it. Concurrent appends share one fdatasync (group commit).
    /// Survives process kill and power loss.
    Sync,
    /// Appends complete once written to the OS page cache; a flusher
    /// fdatasyncs every `interval_ms`. Survives process kill; power loss may
    /// lose the last `interval_ms` (plus one fdatasync's duration) of appends.
    Async {
        /// Milliseconds between background flushes (RocketMQ's
        /// flushIntervalCommitLog: 500 ms).
        interval_ms: u64,
    },
}

/// Configuration of a [`crate::Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Root directory; holds `commitlog/`, `consumequeue/` and `meta/`.
    pub data_dir: PathBuf,
    /// Maximum size of one commit-log segment file, in bytes. Default 1 GiB
    /// (RocketMQ's mappedFileSizeCommitLog). A record never spans two segments.
    pub segment_bytes: u64,
    /// Largest encoded record accepted, in bytes. Default 4 MiB (RocketMQ's
    /// maxMessageSize). Must not exceed `segment_bytes`.
    pub max_record_bytes: usize,
    /// Flush policy; default [`FlushMode::Sync`].
    pub flush: FlushMode,
    /// Entries per consume-queue file. Default 300,000 (RocketMQ's
    /// mappedFileSizeConsumeQueue / 20), i.e. 6,000,000 bytes per file.
    pub cq_entries_per_file: u64,
    /// Delete sealed segments whose last write is older than this, in
    /// milliseconds. Default 72 h (RocketMQ's fileReservedTime).
    pub retention_ms: u64,
    /// Delete the oldest sealed segments while the log is larger than this,
    /// in bytes. Default `u64::MAX` (no size budget).
    pub retention_bytes: u64,
    /// Appends are refused ([`Error::DiskFull`]) when they would leave less
    /// than this many bytes free on the data directory's filesystem, keeping
    /// room for metadata and consume queues. Default 64 MiB; 0 = no floor.
    pub min_free_disk_bytes: u64,
    /// Zero-filled space kept ahead of the active segment's end, in bytes;
    /// 0 = off. Default 1 MiB. Writing into space that is already allocated
    /// and written lets each fdatasync skip the inode update a growing file
    /// needs: on this project's disk that halves the fdatasync's latency and
    /// CPU (RocketMQ preallocates and pre-touches whole segments for the
    /// same reason). At most 64 MiB.
    pub preallocate_bytes: u64,
    /// The most recently appended commit-log bytes kept in memory, so that
    /// reads near the log's end (consumers keeping up, EndTransaction reading
    /// its half) need no `pread`, in bytes; 0 = off. Default 16 MiB (about
    /// half a second of writes at 30 MB/s). At most 1 GiB.
    pub read_cache_bytes: u64,
    /// The log is a replica's log of a broker group (see
    /// [`crate::entry_index`]): appends come whole from the replication
    /// layer ([`crate::Store::append_entries`]), consume queues are written
    /// only for applied entries ([`crate::Store::dispatch_applied`]), and
    /// recovery dispatches nothing past the checkpoint (the replication layer
    /// applies the rest again). Default false.
    pub replicated: bool,
}

/// Largest accepted [`StoreConfig::preallocate_bytes`].
pub const MAX_PREALLOCATE_BYTES: u64 = 64 << 20;

/// Largest accepted [`StoreConfig::read_cache_bytes`].
pub const MAX_READ_CACHE_BYTES: u64 = 1 << 30;

impl StoreConfig {
    /// Default configuration rooted at `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        StoreConfig {
            data_dir: data_dir.into(),
            segment_bytes: 1 << 30,
            max_record_bytes: 4 << 20,
            flush: FlushMode::Sync,
            cq_entries_per_file: 300_000,
            retention_ms: 72 * 3600 * 1000,
            retention_bytes: u64::MAX,
            min_free_disk_bytes: 64 << 20,
            preallocate_bytes: 1 << 20,
            read_cache_bytes: 16 << 20,
            replicated: false,
        }
    }

    /// Checks every key.
    ///
    /// # Errors
    /// [`Error::Config`] naming the first key at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |key, reason: String| Err(Error::Config { key, reason });
        if self.segment_bytes < 4096 {
            return bad(
                "segment_bytes",
                format!("{} is below 4096", self.segment_bytes),
            );
        }
        if self.max_record_bytes < MIN_RECORD_BYTES {
            return bad(
                "max_record_bytes",
                format!(
                    "{} is below the smallest record, {MIN_RECORD_BYTES}",
                    self.max_record_bytes
                ),
            );
        }
        if self.max_record_bytes as u64 > self.segment_bytes {
            return bad(
                "max_record_bytes",
                format!(
                    "{} exceeds segment_bytes {}",
                    self.max_record_bytes, self.segment_bytes
                ),
            );
        }
        if self.max_record_bytes > u32::MAX as usize {
            return bad("max_record_bytes", "must fit in 32 bits".into());
        }
        if let FlushMode::Async { interval_ms } = self.flush {
            if interval_ms == 0 {
                return bad("flush_interval_ms", "must be at least 1".into());
            }
        }
        if self.cq_entries_per_file == 0 {
            return bad("cq_entries_per_file", "must be at least 1".into());
        }
        if self.preallocate_bytes > MAX_PREALLOCATE_BYTES {
            return bad(
                "preallocate_bytes",
                format!(
                    "{} exceeds the most, {MAX_PREALLOCATE_BYTES}",
                    self.preallocate_bytes
                ),
            );
        }
        if self.read_cache_bytes > MAX_READ_CACHE_BYTES {
            return bad(
                "read_cache_bytes",
                format!(
                    "{} exceeds the most, {MAX_READ_CACHE_BYTES}",
                    self.read_cache_bytes
                ),
            );
        }
        Ok(())
    }
}
