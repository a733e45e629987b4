//! The storage crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong in `halfmq-storage`.
///
/// Operating errors (I/O, corruption, bad input) are values of this enum;
/// programmer errors are assertions.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed. `op` says what we were doing, `path` on which file.
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing ("open", "write", "fdatasync", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A record failed validation (length, magic, version or CRC) at a
    /// physical offset. The bytes are never returned as a message.
    #[error("corrupt record at physical offset {offset}: {reason}")]
    Corrupt {
        /// Physical offset of the record's first byte.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// A record to append is larger than `max_record_bytes`.
    #[error("record of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes")]
    RecordTooLarge {
        /// Encoded size of the record, in bytes.
        size_bytes: usize,
        /// The configured limit (`max_record_bytes`), in bytes.
        limit_bytes: usize,
    },
    /// A field of a record to append cannot be encoded (e.g. a topic longer
    /// than 65,535 bytes).
    #[error("invalid record: {0}")]
    InvalidRecord(String),
    /// A physical offset outside the log: below its first retained byte,
    /// at or past its end, or not the start of a record.
    #[error("physical offset {offset} is out of range [{min}, {max})")]
    OffsetOutOfRange {
        /// The offset asked for.
        offset: u64,
        /// The first physical offset still retained.
        min: u64,
        /// The physical offset one past the last readable byte.
        max: u64,
    },
    /// A queue offset with no (or no longer any) entry in the consume queue.
    #[error("queue offset {queue_offset} of {topic}/{queue_id} is not available")]
    QueueOffsetNotFound {
        /// Topic name.
        topic: String,
        /// Queue id within the topic.
        queue_id: u32,
        /// The queue offset asked for.
        queue_offset: u64,
    },
    /// A consume-queue entry below the queue's end is zeroed (size 0 without
    /// the hole marker): damaged bytes, repaired from the log when read.
    #[error("consume-queue entry {queue_offset} of {topic}/{queue_id} is damaged (size 0)")]
    QueueEntryDamaged {
        /// Topic name.
        topic: String,
        /// Queue id within the topic.
        queue_id: u32,
        /// The queue offset of the entry.
        queue_offset: u64,
    },
    /// The configuration was rejected by [`crate::StoreConfig::validate`].
    #[error("invalid storage config `{key}`: {reason}")]
    Config {
        /// The configuration key at fault.
        key: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The metadata store (sled) failed.
    #[error("metadata store: {0}")]
    Meta(#[from] sled::Error),
    /// An earlier fsync or write failed; the log refuses further appends
    /// because the state of the file on disk is unknown (see "fsyncgate").
    /// Restart the process to recover from the commit log on disk.
    #[error("commit log is failed after an earlier I/O error: {0}")]
    Poisoned(String),
    /// Another open store (another broker process, or this one) holds the
    /// data directory's lock.
    #[error("data dir {} is in use by another broker{}", dir.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    DataDirInUse {
        /// The data directory.
        dir: PathBuf,
        /// The holder's process id, as it wrote it in the lock file.
        pid: Option<u32>,
    },
    /// The store has been closed.
    #[error("store is closed")]
    Closed,
    /// The append would leave less than `min_free_disk_bytes` free; nothing
    /// was written.
    #[error("disk full: {free_bytes} bytes free, appends need at least {min_free_bytes} left free (min_free_disk_bytes)")]
    DiskFull {
        /// Free bytes left (as last read, less what was appended since).
        free_bytes: u64,
        /// The configured floor, bytes.
        min_free_bytes: u64,
    },
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Builds an [`Error::Io`].
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }

    /// Whether this is the disk (or the user's quota) being full: `ENOSPC`
    /// or `EDQUOT`. Nothing was stored; the same call can succeed once
    /// space is freed.
    pub fn is_storage_full(&self) -> bool {
        match self {
            Error::DiskFull { .. } => true,
            Error::Io { source, .. } => {
                source.kind() == std::io::ErrorKind::StorageFull
                    || source.kind() == std::io::ErrorKind::QuotaExceeded
                    || matches!(source.raw_os_error(), Some(28) | Some(122))
            }
            _ => false,
        }
    }
}
