//! The commit log: one append-only log split into segment files.
//!
//! # Segments
//!
//! ```text
//! commitlog/
//!   00000000000000000000      first segment, base physical offset 0
//!   00000000001073741790      next segment: base = previous base + previous length
//!   quarantine/               bytes cut off by recovery, kept for an operator
//! ```
//!
//! Each file is named by the 20-digit zero-padded physical offset of its first
//! byte and holds whole records back to back (see [`crate::record`]). Physical
//! offsets are contiguous across segments: a segment ends where its last record
//! ends, and a record that would push a segment past `segment_bytes` starts the
//! next one.
//!
//! The active segment keeps up to `preallocate_bytes` (default 1 MiB) of
//! zeros written ahead of its end, extended by the writer a step at a time:
//! an fdatasync of data written into space that is already allocated and
//! written needs no inode update, which halves its latency and CPU on this
//! project's disk. A sealed segment's file is cut to its end before it is
//! sealed, and [`CommitLog::close`] cuts the active one, so after a clean
//! shutdown a file's length is its end. After a crash the active file may end
//! in zeros; recovery takes a run of zeros reaching the end of the file for
//! preallocated space, not damage.
//!
//! # Write path and fsyncs
//!
//! 1. [`CommitLog::append`] encodes the batch and writes it with one `pwrite`
//!    per segment touched, under the writer lock. A failed write is undone
//!    (truncated away); if the undo fails too, the log is poisoned.
//! 2. When a segment is full, the writer fdatasyncs it before creating the
//!    next one (it is *sealed*): only the last segment can ever hold a torn write.
//! 3. The flusher thread fdatasyncs the active segment: in sync mode as soon
//!    as there is unflushed data (group commit: every append written while an
//!    fdatasync runs is covered by the next one), in async mode every
//!    `interval_ms`. It then publishes the flushed offset.
//! 4. [`CommitLog::wait_durable`] completes when the flushed offset passes the
//!    end of the caller's records (sync mode), at once in async mode.
//!
//! # Read path
//!
//! The last `read_cache_bytes` (default 16 MiB) of appended bytes are also
//! kept in memory, as the batches were written. A read that falls inside
//! one cached batch (a consumer keeping up with the log, an EndTransaction
//! reading its half) is served from there without a `pread`; any other read
//! goes to the segment file. The cache only ever holds bytes whose write
//! succeeded, so both paths return the same record.
//!
//! An fdatasync error poisons the log: every waiter and every later append
//! gets [`Error::Poisoned`]; the process must restart and recover from disk.
//!
//! # Recovery
//!
//! On open the log is scanned from a start offset (the store's checkpoint, or
//! the first segment's base) to its end, checking every record's frame. At the
//! first bad record the rest of the segment is searched for a valid frame:
//! - none: it is a torn tail; the bytes from the bad record on are copied to
//!   `quarantine/` and the segment is truncated there;
//! - one at `q`: the range up to `q` is reported corrupt, left in place (reads
//!   of it return [`Error::Corrupt`]) and the scan goes on at `q`.
//!
//! Nothing is ever deleted unaccounted for.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;

use crate::config::FlushMode;
use crate::error::{Error, Result};
use crate::record::{check_frame, peek_len, Record, MAGIC, MIN_RECORD_BYTES, VERSION};

mod flusher;
mod iter;
mod recovery;
mod replica;
mod segment;

use flusher::{flush_once, flusher_loop, poison, FlushControl, FlushStatus};
pub use iter::{LogIter, LogScan, ScanItem};
use recovery::recover;
pub(crate) use segment::Segment;
use segment::{sync_dir, write_chunk, FreeSpace, Prealloc, TailCache};

/// Width of a segment file name: 20 decimal digits.
pub const SEGMENT_NAME_DIGITS: usize = 20;

/// Read buffer used by sequential scans, in bytes.
const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// Bytes [`CommitLog::read`] reads at once when the record's size is
/// unknown: one pread for any record up to this size.
const READ_AHEAD_BYTES: usize = 4096;

/// Largest single zero-filling write, in bytes.
const ZERO_CHUNK_BYTES: usize = 1 << 20;

/// The file name of the segment whose first byte is at `base`.
pub fn segment_file_name(base: u64) -> String {
    format!("{base:0width$}", width = SEGMENT_NAME_DIGITS)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned mutex means a thread panicked while holding it; the data
    // it guards is plain offsets that stay consistent, so carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Facts about one segment, for retention and operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Physical offset of the first byte.
    pub base: u64,
    /// Physical offset one past the last byte.
    pub end: u64,
    /// Last modification time of the file, milliseconds since the Unix epoch.
    pub modified_ms: u64,
    /// Whether this is the active (last) segment, which is never deleted.
    pub active: bool,
}

/// A range of the log that recovery found corrupt and left in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRange {
    /// Physical offset of the first bad byte.
    pub start: u64,
    /// Physical offset of the next valid record (or segment end).
    pub end: u64,
    /// Why the record at `start` was rejected.
    pub reason: String,
}

/// What recovery did, for logs, tests and operators.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Physical offset the scan started at.
    pub scanned_from: u64,
    /// Bytes scanned.
    pub scanned_bytes: u64,
    /// Valid records found by the scan.
    pub records: u64,
    /// A torn tail cut off: (physical offset, bytes dropped, reason). The
    /// dropped bytes are kept under `commitlog/quarantine/`.
    pub truncated: Option<(u64, u64, String)>,
    /// Corrupt ranges found and left in place.
    pub corrupt: Vec<CorruptRange>,
    /// Zero bytes found after the last record of the last segment: space
    /// preallocated before a crash (see the module docs), not damage. Kept
    /// in the file and written over by later appends.
    pub preallocated_bytes: u64,
}

/// Where an append put its records.
#[derive(Debug, Clone, Default)]
pub struct Appended {
    /// Physical offset of each record, in order.
    pub offsets: Vec<u64>,
    /// Encoded size in bytes of each record, in order.
    pub sizes: Vec<u32>,
    /// Physical offset one past the last record; pass it to
    /// [`CommitLog::wait_durable`].
    pub end: u64,
}

struct Writer {
    active: Arc<Segment>,
    buf: Vec<u8>,
    space: FreeSpace,
    prealloc: Prealloc,
}

struct Inner {
    dir: PathBuf,
    segment_bytes: u64,
    max_record_bytes: usize,
    flush: FlushMode,
    segments: RwLock<BTreeMap<u64, Arc<Segment>>>,
    writer: Mutex<Writer>,
    /// End of all completed writes: the readable bound.
    written: AtomicU64,
    /// End of the data known to be on stable storage.
    flushed: AtomicU64,
    fsyncs: AtomicU64,
    /// Records written (appended or replicated), counted under the writer
    /// lock with `written`.
    records_written: AtomicU64,
    /// `records_written` as of the last fdatasync.
    records_flushed: AtomicU64,
    /// Told of every fdatasync of the active segment (metrics).
    flush_observer: std::sync::OnceLock<Arc<dyn FlushObserver>>,
    control: Mutex<FlushControl>,
    wake: Condvar,
    /// Sync mode: the flusher is (about to be) waiting on `wake` for data.
    /// Appends notify only then, so a busy flusher costs them no syscall.
    flusher_sleeping: AtomicBool,
    status: watch::Sender<FlushStatus>,
    poison: Mutex<Option<Arc<str>>>,
    tail: Mutex<TailCache>,
    /// Callbacks of [`CommitLog::on_durable`], by (end, registration number).
    durable_callbacks: Mutex<DurableCallbacks>,
}

/// Told of each group commit: one fdatasync of the active segment, how
/// long it took and how many records it made durable (records written
/// since the previous one). Runs on the flusher thread: keep it cheap.
pub trait FlushObserver: Send + Sync {
    /// One fdatasync took `seconds` and covered `records` records.
    fn flushed(&self, seconds: f64, records: u64);
}

/// A callback run once the log is durable up to an offset (or failed).
pub type DurableCallback = Box<dyn FnOnce(Result<()>) + Send>;

#[derive(Default)]
struct DurableCallbacks {
    next_seq: u64,
    waiting: BTreeMap<(u64, u64), DurableCallback>,
}

/// The segmented commit log. Cheap to share behind an `Arc`; all methods take
/// `&self`.
pub struct CommitLog {
    inner: Arc<Inner>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CommitLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitLog")
            .field("dir", &self.inner.dir)
            .field("written", &self.written_offset())
            .field("flushed", &self.flushed_offset())
            .finish()
    }
}

/// Options for [`CommitLog::open`].
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// Directory holding the segment files (created if missing).
    pub dir: PathBuf,
    /// Maximum bytes per segment.
    pub segment_bytes: u64,
    /// Largest encoded record, in bytes.
    pub max_record_bytes: usize,
    /// Flush policy.
    pub flush: FlushMode,
    /// Appends are refused with [`Error::DiskFull`] when they would leave
    /// less than this many bytes free on the log's filesystem; 0 = no floor.
    pub min_free_disk_bytes: u64,
    /// Zero-filled bytes kept ahead of the active segment's end; 0 = off.
    /// See the module docs.
    pub preallocate_bytes: u64,
    /// Most recently appended bytes kept in memory for reads; 0 = off. See
    /// the module docs.
    pub read_cache_bytes: u64,
}

impl CommitLog {
    /// Opens (or creates) the log and recovers its tail.
    ///
    /// `scan_from` is where the recovery scan starts (a record boundary known
    /// to be durable, e.g. the store's checkpoint); `None`, or an offset
    /// outside the log, scans the whole log. `on_record` sees every valid
    /// record from there to the end, in order.
    ///
    /// # Errors
    /// I/O errors; [`Error::Corrupt`] when segment files overlap or leave gaps
    /// (an operator must look: nothing is changed on disk in that case).
    pub fn open(
        opts: LogOptions,
        scan_from: Option<u64>,
        on_record: &mut dyn FnMut(u64, &Record),
    ) -> Result<(CommitLog, RecoveryReport)> {
        let dir = opts.dir.clone();
        fs::create_dir_all(&dir).map_err(|e| Error::io("create dir", &dir, e))?;
        let mut bases = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() == SEGMENT_NAME_DIGITS && name.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(base) = name.parse::<u64>() {
                    bases.push(base);
                }
            }
        }
        bases.sort_unstable();
        let mut segments = BTreeMap::new();
        let mut prev_end: Option<u64> = None;
        for base in bases {
            let seg = Segment::open(&dir, base, false)?;
            if let Some(pe) = prev_end {
                if pe != base {
                    return Err(Error::Corrupt {
                        offset: base,
                        reason: format!(
                            "segment {} starts at {base} but the previous one ends at {pe}; \
                             segments must be contiguous",
                            segment_file_name(base)
                        ),
                    });
                }
            }
            prev_end = Some(seg.end());
            segments.insert(base, Arc::new(seg));
        }
        if segments.is_empty() {
            let seg = Segment::open(&dir, 0, true)?;
            sync_dir(&dir)?;
            segments.insert(0, Arc::new(seg));
        }

        let report = recover(&dir, &segments, scan_from, on_record)?;

        let Some(active) = segments.values().next_back().cloned() else {
            // open() created a segment above when there was none.
            return Err(Error::Config {
                key: "data_dir",
                reason: "the commit log has no segment after opening".into(),
            });
        };
        // The recovered tail may sit only in the page cache (after a process
        // kill in async mode): make it durable before calling it flushed.
        active.sync()?;
        let end = active.end();
        let file_end = active.base
            + active
                .file
                .metadata()
                .map_err(|e| Error::io("stat segment", &active.path, e))?
                .len();
        let (status, _) = watch::channel(FlushStatus {
            flushed: end,
            error: None,
        });
        let inner = Arc::new(Inner {
            dir,
            segment_bytes: opts.segment_bytes,
            max_record_bytes: opts.max_record_bytes,
            flush: opts.flush,
            segments: RwLock::new(segments),
            writer: Mutex::new(Writer {
                active,
                buf: Vec::with_capacity(64 * 1024),
                space: FreeSpace {
                    min_free_bytes: opts.min_free_disk_bytes,
                    free_bytes: 0,
                    written_since: 0,
                    checked_at: None,
                },
                prealloc: Prealloc {
                    step_bytes: opts.preallocate_bytes,
                    file_end: file_end.max(end),
                    failed_at: None,
                    zeros: Vec::new(),
                },
            }),
            written: AtomicU64::new(end),
            flushed: AtomicU64::new(end),
            fsyncs: AtomicU64::new(0),
            records_written: AtomicU64::new(0),
            records_flushed: AtomicU64::new(0),
            flush_observer: std::sync::OnceLock::new(),
            control: Mutex::new(FlushControl::default()),
            wake: Condvar::new(),
            flusher_sleeping: AtomicBool::new(false),
            status,
            poison: Mutex::new(None),
            tail: Mutex::new(TailCache::new(
                usize::try_from(opts.read_cache_bytes).unwrap_or(usize::MAX),
            )),
            durable_callbacks: Mutex::new(DurableCallbacks::default()),
        });
        let flusher_inner = Arc::clone(&inner);
        let flusher = std::thread::Builder::new()
            .name("halfmq-flusher".into())
            .spawn(move || flusher_loop(&flusher_inner))
            .map_err(|e| Error::io("spawn flusher thread", &inner.dir, e))?;
        Ok((
            CommitLog {
                inner,
                flusher: Mutex::new(Some(flusher)),
            },
            report,
        ))
    }

    /// Appends `records` as one all-or-nothing batch and returns where they
    /// went. The records are readable at once; they are durable only after
    /// [`CommitLog::wait_durable`] (sync mode).
    ///
    /// # Errors
    /// [`Error::RecordTooLarge`] / [`Error::InvalidRecord`] before anything
    /// is written; I/O errors after undoing the partial write;
    /// [`Error::Poisoned`] when an earlier I/O error left the log unusable.
    pub fn append(&self, records: &[Record]) -> Result<Appended> {
        let inner = &*self.inner;
        self.check_poison()?;
        let mut w = lock(&inner.writer);
        let w = &mut *w;
        w.buf.clear();
        let mut sizes = Vec::with_capacity(records.len());
        for r in records {
            let before = w.buf.len();
            let n = r.encode_into(&mut w.buf)?;
            if n > inner.max_record_bytes {
                w.buf.truncate(before);
                return Err(Error::RecordTooLarge {
                    size_bytes: n,
                    limit_bytes: inner.max_record_bytes,
                });
            }
            sizes.push(n as u32);
        }
        self.write_buffered(w, sizes)
    }

    /// Writes `w.buf` (records of `sizes` bytes back to back) at the log's
    /// end, rolling segments as needed; see [`CommitLog::append`].
    fn write_buffered(&self, w: &mut Writer, sizes: Vec<u32>) -> Result<Appended> {
        let inner = &*self.inner;
        w.space.check(&inner.dir, w.buf.len() as u64)?;

        let first_active = Arc::clone(&w.active);
        let undo_end = first_active.end();
        let mut created: Vec<Arc<Segment>> = Vec::new();
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut chunk_start = 0usize; // index into buf of the pending chunk
        let mut pos = 0usize;
        let mut seg_end = w.active.end();
        let result: Result<()> = (|| {
            for &size in &sizes {
                let size = u64::from(size);
                if seg_end - w.active.base + size > inner.segment_bytes && seg_end > w.active.base {
                    // Flush the pending chunk into the full segment, cut its
                    // preallocated zeros, seal it, roll.
                    write_chunk(&w.active, &w.buf[chunk_start..pos])?;
                    chunk_start = pos;
                    w.active.cut_to_end()?;
                    w.active.sync()?;
                    let next = Arc::new(Segment::open(&inner.dir, seg_end, true)?);
                    sync_dir(&inner.dir)?;
                    created.push(Arc::clone(&next));
                    w.active = next;
                    w.prealloc.reset(seg_end);
                }
                offsets.push(seg_end);
                seg_end += size;
                pos += size as usize;
            }
            w.prealloc.ensure(&w.active, seg_end, inner.segment_bytes);
            write_chunk(&w.active, &w.buf[chunk_start..pos])
        })();
        if let Err(e) = result {
            // Undo: cut the first segment back and remove segments this batch created.
            let undo = (|| -> Result<()> {
                first_active.truncate(undo_end)?;
                for seg in &created {
                    fs::remove_file(&seg.path)
                        .map_err(|e| Error::io("remove segment", &seg.path, e))?;
                }
                Ok(())
            })();
            w.active = first_active;
            w.prealloc.file_end = undo_end;
            if let Err(undo_err) = undo {
                self.poison(format!(
                    "append failed ({e}) and could not be undone ({undo_err})"
                ));
            }
            return Err(e);
        }
        if !created.is_empty() {
            let mut segs = inner.segments.write().unwrap_or_else(|e| e.into_inner());
            for seg in created {
                segs.insert(seg.base, seg);
            }
        }
        // Still under the writer lock: chunks enter the cache in log order.
        lock(&inner.tail).push(undo_end, &w.buf);
        inner
            .records_written
            .fetch_add(sizes.len() as u64, Ordering::Relaxed);
        // SeqCst with the flusher's store of `flusher_sleeping` and load of
        // `written`: either it sees this end, or this sees it sleeping.
        inner.written.store(seg_end, Ordering::SeqCst);
        if inner.flush == FlushMode::Sync && inner.flusher_sleeping.load(Ordering::SeqCst) {
            let _c = lock(&inner.control);
            inner.wake.notify_one();
        }
        Ok(Appended {
            offsets,
            sizes,
            end: seg_end,
        })
    }

    /// Waits until every byte before `end` is durable per the flush mode: in
    /// sync mode until an fdatasync covers it; in async mode returns at once.
    ///
    /// # Errors
    /// [`Error::Poisoned`] when an fdatasync failed; [`Error::Closed`] when
    /// the log was closed before `end` was flushed.
    pub async fn wait_durable(&self, end: u64) -> Result<()> {
        self.check_poison()?;
        if self.inner.flush != FlushMode::Sync || self.flushed_offset() >= end {
            return Ok(());
        }
        let mut rx = self.inner.status.subscribe();
        let res = rx
            .wait_for(|s| s.flushed >= end || s.error.is_some())
            .await
            .map(|s| s.error.clone());
        match res {
            Ok(None) => Ok(()),
            Ok(Some(err)) => Err(Error::Poisoned(err.to_string())),
            Err(_) => Err(Error::Closed),
        }
    }

    /// Fdatasyncs everything written so far, on the caller's thread.
    ///
    /// # Errors
    /// I/O errors (which also poison the log).
    pub fn sync_now(&self) -> Result<()> {
        self.check_poison()?;
        flush_once(&self.inner).map(|_| ())
    }

    /// Reads the record at `offset`.
    ///
    /// # Errors
    /// [`Error::OffsetOutOfRange`] outside the log; [`Error::Corrupt`] when
    /// the bytes there are not a valid record; I/O errors.
    pub fn read(&self, offset: u64) -> Result<Record> {
        let seg = self.segment_for(offset)?;
        let limit = seg.end().min(self.written_offset());
        if offset + 4 > limit {
            return Err(self.out_of_range(offset));
        }
        if let Some(rec) = self.read_cached(offset, None) {
            return rec;
        }
        // One pread for records up to READ_AHEAD_BYTES (most messages): the
        // length prefix and the record together.
        let mut buf = vec![0u8; ((limit - offset) as usize).min(READ_AHEAD_BYTES)];
        seg.read_at(offset, &mut buf)?;
        // invariant: offset + 4 <= limit was checked above, so buf holds at least 4 bytes
        let len = u64::from(u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]));
        if len < MIN_RECORD_BYTES as u64 || offset + len > limit {
            return Err(Error::Corrupt {
                offset,
                reason: format!("length {len} does not fit the segment"),
            });
        }
        if len as usize <= buf.len() {
            buf.truncate(len as usize);
            return Record::decode(Bytes::from(buf), offset);
        }
        self.read_sized_in(&seg, offset, len as usize)
    }

    /// Reads the record at `offset` whose size is known (from a consume-queue
    /// entry): one `pread`.
    ///
    /// # Errors
    /// As [`CommitLog::read`].
    pub fn read_sized(&self, offset: u64, size: u32) -> Result<Record> {
        let seg = self.segment_for(offset)?;
        let limit = seg.end().min(self.written_offset());
        if offset + u64::from(size) > limit {
            return Err(self.out_of_range(offset));
        }
        if let Some(rec) = self.read_cached(offset, Some(size as usize)) {
            return rec;
        }
        self.read_sized_in(&seg, offset, size as usize)
    }

    /// The record at `offset` from the tail cache, when one cached chunk
    /// holds all of it (`size` when known, else its length prefix); `None`
    /// sends the caller to the file. The bytes are copied out, so a record
    /// kept long holds no cache memory.
    fn read_cached(&self, offset: u64, size: Option<usize>) -> Option<Result<Record>> {
        let tail = lock(&self.inner.tail);
        let held = tail.from(offset)?;
        drop(tail);
        let len = match size {
            Some(n) => n,
            None => peek_len(&held)?,
        };
        // A view of the cached chunk: the record (and its body) share it.
        let bytes = (len <= held.len()).then(|| held.slice(..len))?;
        Some(Record::decode(bytes, offset))
    }

    fn read_sized_in(&self, seg: &Segment, offset: u64, size: usize) -> Result<Record> {
        let mut buf = vec![0u8; size];
        seg.read_at(offset, &mut buf)?;
        Record::decode(Bytes::from(buf), offset)
    }

    /// Like [`CommitLog::iter_from`], but steps over damaged ranges instead
    /// of stopping at the first: each is yielded as a
    /// [`ScanItem::Skipped`], and the scan goes on at the next valid record
    /// (see [`LogScan`]). Stops after an I/O error.
    pub fn scan_from(&self, offset: u64) -> LogScan<'_> {
        LogScan {
            log: self,
            iter: self.iter_from(offset),
        }
    }

    /// Where reading can resume after the damaged record at `bad`: the end
    /// the record's own length field names, when a valid record (or its
    /// segment's end) is there; else the next position in the segment where
    /// a complete valid record starts; else the segment's end.
    fn resync(&self, bad: u64) -> Result<u64> {
        let seg = self.segment_for(bad)?;
        let limit = seg.end().min(self.written_offset());
        let valid_at = |pos: u64| -> Result<bool> {
            if pos == limit {
                return Ok(true);
            }
            if pos + MIN_RECORD_BYTES as u64 > limit {
                return Ok(false);
            }
            let mut head = [0u8; 10];
            seg.read_at(pos, &mut head)?;
            let len = peek_len(&head).unwrap_or(0);
            if head[8] != MAGIC
                || head[9] != VERSION
                || len < MIN_RECORD_BYTES
                || pos + len as u64 > limit
            {
                return Ok(false);
            }
            let mut frame = vec![0u8; len];
            seg.read_at(pos, &mut frame)?;
            Ok(check_frame(&frame, pos).is_ok())
        };
        // A flipped bit in the body or header leaves the length intact.
        if bad + 4 <= limit {
            let mut len = [0u8; 4];
            seg.read_at(bad, &mut len)?;
            let len = peek_len(&len).unwrap_or(0) as u64;
            if len >= MIN_RECORD_BYTES as u64 && bad + len <= limit && valid_at(bad + len)? {
                return Ok(bad + len);
            }
        }
        // Otherwise look for the next valid frame, a window at a time.
        let mut window_start = bad + 1;
        let mut buf = Vec::new();
        while window_start + MIN_RECORD_BYTES as u64 <= limit {
            let n = (SCAN_CHUNK_BYTES as u64).min(limit - window_start) as usize;
            buf.resize(n, 0);
            seg.read_at(window_start, &mut buf)?;
            for i in 0..n.saturating_sub(9) {
                if buf[i + 8] == MAGIC && buf[i + 9] == VERSION {
                    let pos = window_start + i as u64;
                    if valid_at(pos)? {
                        return Ok(pos);
                    }
                }
            }
            // Windows overlap by the 10 header bytes a candidate needs.
            window_start += n.saturating_sub(9).max(1) as u64;
        }
        Ok(limit)
    }

    /// Iterates over records from `offset` (a record boundary) to the end of
    /// what was written when each read happens. Yields `(physical offset,
    /// record)`; stops after the first error.
    pub fn iter_from(&self, offset: u64) -> LogIter<'_> {
        LogIter {
            log: self,
            pos: offset,
            buf: Vec::new(),
            buf_start: offset,
            failed: false,
        }
    }

    fn segment_for(&self, offset: u64) -> Result<Arc<Segment>> {
        let segs = self
            .inner
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner());
        segs.range(..=offset)
            .next_back()
            .map(|(_, s)| Arc::clone(s))
            .filter(|s| offset < s.end())
            .ok_or_else(|| self.out_of_range(offset))
    }

    fn out_of_range(&self, offset: u64) -> Error {
        Error::OffsetOutOfRange {
            offset,
            min: self.min_offset(),
            max: self.written_offset(),
        }
    }

    /// First physical offset still retained.
    pub fn min_offset(&self) -> u64 {
        let segs = self
            .inner
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner());
        segs.keys().next().copied().unwrap_or(0)
    }

    /// Physical offset one past the last written byte.
    pub fn written_offset(&self) -> u64 {
        self.inner.written.load(Ordering::Acquire)
    }

    /// Physical offset up to which the log is on stable storage.
    pub fn flushed_offset(&self) -> u64 {
        self.inner.flushed.load(Ordering::Acquire)
    }

    /// Number of fdatasyncs of the active segment so far (for benches).
    pub fn fsync_count(&self) -> u64 {
        self.inner.fsyncs.load(Ordering::Relaxed)
    }

    /// Has `o` told of every later fdatasync of the active segment (its
    /// duration and the records it covered). One observer per log: `false`
    /// when one was set before.
    pub fn set_flush_observer(&self, o: Arc<dyn FlushObserver>) -> bool {
        self.inner.flush_observer.set(o).is_ok()
    }

    /// The segments, oldest first.
    ///
    /// # Errors
    /// I/O errors reading file times.
    pub fn segments(&self) -> Result<Vec<SegmentInfo>> {
        let segs = self
            .inner
            .segments
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let last = segs.keys().next_back().copied();
        segs.values()
            .map(|s| {
                let meta = s
                    .file
                    .metadata()
                    .map_err(|e| Error::io("stat", &s.path, e))?;
                let modified_ms = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64);
                Ok(SegmentInfo {
                    base: s.base,
                    end: s.end(),
                    modified_ms,
                    active: Some(s.base) == last,
                })
            })
            .collect()
    }

    /// Deletes the sealed segment starting at `base`, which must be the
    /// oldest. Readers holding it finish their reads (the file stays open).
    ///
    /// # Errors
    /// [`Error::OffsetOutOfRange`] when `base` is not the oldest sealed
    /// segment; I/O errors.
    pub fn delete_oldest_segment(&self, base: u64) -> Result<()> {
        let mut segs = self
            .inner
            .segments
            .write()
            .unwrap_or_else(|e| e.into_inner());
        let oldest = segs.keys().next().copied();
        if oldest != Some(base) || segs.len() < 2 {
            return Err(Error::OffsetOutOfRange {
                offset: base,
                min: oldest.unwrap_or(0),
                max: oldest.unwrap_or(0),
            });
        }
        let Some(seg) = segs.remove(&base) else {
            return Err(Error::OffsetOutOfRange {
                offset: base,
                min: base,
                max: base,
            });
        };
        drop(segs);
        fs::remove_file(&seg.path).map_err(|e| Error::io("remove segment", &seg.path, e))?;
        sync_dir(&self.inner.dir)
    }

    /// Stops the flusher after a last fdatasync. Later appends fail with
    /// [`Error::Closed`] semantics via poisoning.
    ///
    /// # Errors
    /// The last fdatasync's error.
    pub fn close(&self) -> Result<()> {
        {
            let mut c = lock(&self.inner.control);
            c.shutdown = true;
            self.inner.wake.notify_all();
        }
        if let Some(h) = lock(&self.flusher).take() {
            let _ = h.join();
        }
        let res = if self.check_poison().is_ok() {
            flush_once(&self.inner).and_then(|_| {
                // Leave the file as long as the log: cut the preallocated
                // zeros and make the new length durable.
                let active = Arc::clone(&lock(&self.inner.writer).active);
                active.cut_to_end()?;
                active.sync()
            })
        } else {
            Ok(())
        };
        {
            let mut p = lock(&self.inner.poison);
            if p.is_none() {
                *p = Some(Arc::from("closed"));
            }
        }
        // Whatever the last fdatasync covered was completed by it.
        let rest = std::mem::take(&mut lock(&self.inner.durable_callbacks).waiting);
        for (_, f) in rest {
            f(Err(Error::Closed));
        }
        res
    }

    fn check_poison(&self) -> Result<()> {
        match &*lock(&self.inner.poison) {
            None => Ok(()),
            Some(m) if &**m == "closed" => Err(Error::Closed),
            Some(m) => Err(Error::Poisoned(m.to_string())),
        }
    }

    fn poison(&self, msg: String) {
        poison(&self.inner, msg);
    }
}

impl Drop for CommitLog {
    fn drop(&mut self) {
        {
            let mut c = lock(&self.inner.control);
            c.shutdown = true;
            self.inner.wake.notify_all();
        }
        if let Some(h) = lock(&self.flusher).take() {
            let _ = h.join();
        }
    }
}
