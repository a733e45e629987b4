//! The store: commit log + consume queues + metadata, with recovery.
//!
//! ```text
//! <data_dir>/
//!   commitlog/       segment files (see crate::commitlog)
//!   consumequeue/    <topic>/<queue id>/<files> (see crate::consume_queue)
//!   meta/            sled database (see crate::meta)
//! ```
//!
//! # Append path
//! Under one writer lock: stamp store time, assign queue offsets to the
//! records that are dispatched (normal messages, transaction commits), append
//! to the commit log, write the consume-queue entries. Entries become visible
//! to readers once the commit log is durable up to their records (sync mode)
//! or at once (async mode): a consumer never sees a message that a power loss
//! could take back while its producer was told it failed.
//!
//! # Checkpoint and recovery
//! [`Store::checkpoint`] snapshots (log end, every queue's length) under the
//! writer lock, fdatasyncs the log and the consume queues, then saves the
//! snapshot in sled. On open, every queue is cut back to its checkpointed
//! length and the log is re-dispatched from the checkpoint's offset. A queue
//! shorter than its checkpoint (files lost or damaged), or a missing or
//! corrupt checkpoint, makes the store rebuild every consume queue from the
//! whole log.

use foldhash::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::commitlog::{CommitLog, LogOptions, RecoveryReport, SegmentInfo};
use crate::config::{FlushMode, StoreConfig};
use crate::consume_queue::{ConsumeQueue, CqEntry, Slot};
use crate::entry_index::{marker_pos, EntryIndex, EntryPos};

mod replica;
use crate::error::{Error, Result};
use crate::meta::{Checkpoint, Meta};
use crate::record::peek_len;
use crate::record::{tag_hash, Record, RecordKind, MIN_RECORD_BYTES};
use crate::retention;
use replica::open_entry_index;

type QueueKey = (String, u32);

/// Where an append put its records.
#[derive(Debug, Clone, Default)]
pub struct AppendReceipt {
    /// Physical offset of each record.
    pub offsets: Vec<u64>,
    /// Encoded size in bytes of each record.
    pub sizes: Vec<u32>,
    /// Queue offset given to each record (`None` for kinds not dispatched).
    pub queue_offsets: Vec<Option<u64>>,
    /// Physical offset one past the last record.
    pub end: u64,
}

/// A message read through a consume queue.
#[derive(Debug, Clone)]
pub struct QueueMessage {
    /// The queue offset it was read at.
    pub queue_offset: u64,
    /// Physical offset of the record holding the body (for a committed
    /// transaction: the half message's).
    pub physical_offset: u64,
    /// The record (for a committed transaction: the half message).
    pub record: Record,
}

/// What opening the metadata store (sled) found; see [`Store::meta_report`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetaReport {
    /// sled refused the database: where it was moved, and sled's error. A new
    /// one was started; everything derived was rebuilt from the log.
    pub set_aside: Option<(PathBuf, String)>,
    /// sled came back older than it was: `(log offset of its checkpoint, if
    /// any; log offset of the last checkpoint saved, from `meta.stamp`)`.
    /// sled drops what follows a damaged frame of its own log without an
    /// error, so this is how such a loss shows.
    pub lost_writes: Option<(Option<u64>, u64)>,
}

impl MetaReport {
    /// Whether the metadata was read as it was last saved.
    pub fn is_clean(&self) -> bool {
        self.set_aside.is_none() && self.lost_writes.is_none()
    }
}

/// File beside `meta/` with the log offset of the last checkpoint saved in
/// sled: `crc32 (4) | log_offset (8)`, little-endian.
const META_STAMP: &str = "meta.stamp";

fn read_stamp(root: &Path) -> Option<u64> {
    let b = std::fs::read(root.join(META_STAMP)).ok()?;
    let ok = b.len() == 12 && crc32fast::hash(&b[4..]).to_le_bytes() == b[..4];
    if !ok {
        tracing::warn!("{META_STAMP} is damaged; ignored");
        return None;
    }
    Some(u64::from_le_bytes(b[4..12].try_into().ok()?))
}

fn write_stamp(root: &Path, log_offset: u64) -> Result<()> {
    let mut b = crc32fast::hash(&log_offset.to_le_bytes())
        .to_le_bytes()
        .to_vec();
    b.extend_from_slice(&log_offset.to_le_bytes());
    let tmp = root.join("meta.stamp.tmp");
    let path = root.join(META_STAMP);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        std::io::Write::write_all(&mut f, &b)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(root)?.sync_all()
    };
    write().map_err(|e| Error::io("write", &path, e))
}

/// Opens and recovers a store; see the module docs.
pub struct Store {
    cfg: StoreConfig,
    log: CommitLog,
    cq_root: PathBuf,
    queues: RwLock<HashMap<QueueKey, Arc<ConsumeQueue>>>,
    writer: Mutex<Option<Error>>,
    checkpoint_lock: Mutex<()>,
    meta: Meta,
    recovery: RecoveryReport,
    /// Queue → its length when it was last repaired from the log: entries
    /// below that already say what the log says.
    repaired: Mutex<HashMap<QueueKey, u64>>,
    meta_report: MetaReport,
    /// Replicated stores: the entry index (see [`crate::entry_index`]).
    entries: Option<Mutex<EntryIndex>>,
    /// Replicated stores: (physical offset one past the last applied
    /// entry, the replication layer's note on it); see
    /// [`Store::dispatch_applied`].
    applied: Mutex<(u64, Vec<u8>)>,
    /// The data directory held no store before this open.
    new_dir: bool,
    /// Held while the store is open: one store per data directory.
    _dir_lock: crate::lock::DirLock,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.cfg.data_dir)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain data intact.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since the Unix epoch by the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens the store at `cfg.data_dir`, recovering after any kind of stop.
    ///
    /// # Errors
    /// [`Error::Config`] for a bad configuration; I/O, metadata and
    /// [`Error::Corrupt`] errors as in [`CommitLog::open`].
    pub fn open(cfg: StoreConfig) -> Result<Store> {
        cfg.validate()?;
        let root = cfg.data_dir.clone();
        std::fs::create_dir_all(&root).map_err(|e| Error::io("create dir", &root, e))?;
        let dir_lock = crate::lock::DirLock::acquire(&root)?;
        let new_dir = !root.join("meta").exists() && !root.join("commitlog").exists();
        empty_trash(&root)?;
        let (meta, set_aside) = Meta::open_or_set_aside(&root.join("meta"))?;
        let cq_root = root.join("consumequeue");
        let checkpoint = meta.checkpoint()?;
        let lost_writes = match read_stamp(&root) {
            Some(s) if checkpoint.as_ref().is_none_or(|c| c.log_offset < s) => {
                let have = checkpoint.as_ref().map(|c| c.log_offset);
                tracing::error!(
                    checkpoint = ?have, last_saved = s,
                    "metadata store lost writes (older than its last save): consume queues are rebuilt from the log; consumer progress, topics and transaction state may be older (redeliveries, repeated checks)"
                );
                Some((have, s))
            }
            _ => None,
        };
        let meta_report = MetaReport {
            set_aside,
            lost_writes,
        };

        let mut queues: HashMap<QueueKey, Arc<ConsumeQueue>> = HashMap::default();
        let mut scan_from = None;
        if let Some(cp) = &checkpoint {
            let mut short = None;
            for (topic, qid, len) in &cp.queues {
                let cq = ConsumeQueue::open(&cq_root, topic, *qid, cfg.cq_entries_per_file)?;
                if cq.next_offset() < *len {
                    short = Some(format!(
                        "{topic}/{qid} has {} entries, checkpoint says {len}",
                        cq.next_offset()
                    ));
                    break;
                }
                cq.truncate(*len)?;
                queues.insert((topic.clone(), *qid), Arc::new(cq));
            }
            match short {
                Some(why) => {
                    tracing::warn!(%why, "consume queue behind its checkpoint; rebuilding all from the log");
                    queues.clear();
                }
                None => scan_from = Some(cp.log_offset),
            }
        }
        // Queues on disk the checkpoint does not list are newer than it:
        // drop their entries, the re-dispatch below writes them again.
        for (topic, qid) in list_queue_dirs(&cq_root)? {
            if scan_from.is_none() || !queues.contains_key(&(topic.clone(), qid)) {
                let cq = ConsumeQueue::open(&cq_root, &topic, qid, cfg.cq_entries_per_file)?;
                cq.truncate(0)?;
            }
        }

        let mut batcher = DispatchBatcher::default();
        let mut dispatch_err = None;
        // A replica dispatches at open only what was applied before the
        // checkpoint (when its queues had to be rebuilt); the rest is applied
        // again by the replication layer.
        let replicated = cfg.replicated;
        let dispatch_limit = if replicated {
            checkpoint.as_ref().map_or(0, |c| c.log_offset)
        } else {
            u64::MAX
        };
        let mut markers = Vec::new();
        let (log, recovery) = CommitLog::open(
            LogOptions {
                dir: root.join("commitlog"),
                segment_bytes: cfg.segment_bytes,
                max_record_bytes: cfg.max_record_bytes,
                flush: cfg.flush,
                min_free_disk_bytes: cfg.min_free_disk_bytes,
                preallocate_bytes: cfg.preallocate_bytes,
                read_cache_bytes: cfg.read_cache_bytes,
            },
            scan_from,
            &mut |offset, rec| {
                if replicated {
                    if let Some(p) = marker_pos(offset, rec) {
                        markers.push(p);
                    }
                }
                if dispatch_err.is_some() || offset >= dispatch_limit {
                    return;
                }
                if let Some((qo, entry)) = dispatch_entry(offset, rec) {
                    let key = (rec.topic.clone(), rec.queue_id);
                    if let Err(e) = batcher.push(&cq_root, &cfg, &mut queues, key, qo, entry) {
                        dispatch_err = Some(e);
                    }
                }
            },
        )?;
        if let Some(e) = dispatch_err {
            return Err(e);
        }
        batcher.flush_all(&queues)?;
        if let Some(cp) = &checkpoint {
            if replicated && log.written_offset() < cp.log_offset {
                return Err(Error::Corrupt {
                    offset: log.written_offset(),
                    reason: format!(
                        "this replica applied entries up to physical offset {} but its commit log ends at {}: \
                         it lost acknowledged entries; move its data directory aside to let it rejoin from the leader",
                        cp.log_offset,
                        log.written_offset()
                    ),
                });
            }
            if !replicated && scan_from.is_some() && recovery.scanned_from != cp.log_offset {
                // The checkpoint lay outside the recovered log (its tail was
                // lost or cut): the whole log was re-dispatched, so each queue
                // is exactly as long as what that scan saw.
                tracing::warn!(
                    checkpoint = cp.log_offset,
                    "checkpoint beyond the recovered log; consume queues cut to the re-dispatch"
                );
                for (key, cq) in &queues {
                    cq.truncate(batcher.seen.get(key).copied().unwrap_or(0))?;
                }
            }
        }
        for cq in queues.values() {
            let n = cq.next_offset();
            cq.publish(n, 0, false);
        }
        let (entries, applied) = if replicated {
            let applied_end = checkpoint.as_ref().map_or(0, |c| c.log_offset);
            let note = checkpoint
                .as_ref()
                .map(|c| c.applied.clone())
                .unwrap_or_default();
            let index = open_entry_index(&root, &log, &markers, applied_end)?;
            (Some(Mutex::new(index)), (applied_end, note))
        } else {
            (None, (0, Vec::new()))
        };
        let store = Store {
            cfg,
            log,
            cq_root,
            queues: RwLock::new(queues),
            writer: Mutex::new(None),
            checkpoint_lock: Mutex::new(()),
            meta,
            recovery,
            repaired: Mutex::new(HashMap::default()),
            meta_report,
            entries,
            applied: Mutex::new(applied),
            new_dir,
            _dir_lock: dir_lock,
        };
        store.check_consume_queues()?;
        Ok(store)
    }

    /// Start-up check of the consume-queue entries of each queue's last
    /// three files (as RocketMQ recovers its consume queues: start-up cost
    /// stays bounded however long the queues are) against what any entry
    /// must satisfy (a record size within limits, ending inside the log; a
    /// size of 0 only as a repair's hole marker);
    /// queues with an entry that cannot be right are repaired from the log.
    /// Older entries, and entries that pass but point at the wrong record,
    /// are caught when read (see [`Store::read_queue`]).
    fn check_consume_queues(&self) -> Result<()> {
        let end = self.log.written_offset();
        let max = self.cfg.max_record_bytes as u64;
        let mut bad: Vec<QueueKey> = Vec::new();
        for cq in self.all_queues() {
            let mut first_bad = None;
            cq.for_each_slot(3, |qo, slot| {
                let ok = match slot {
                    Slot::Entry(e) => {
                        let size = u64::from(e.size);
                        size >= MIN_RECORD_BYTES as u64
                            && size <= max
                            && e.physical_offset
                                .checked_add(size)
                                .is_some_and(|x| x <= end)
                    }
                    Slot::Hole => true,
                    Slot::Damaged => false,
                };
                if !ok && first_bad.is_none() {
                    first_bad = Some((qo, slot));
                }
            })?;
            if let Some((qo, slot)) = first_bad {
                tracing::error!(
                    topic = cq.topic(),
                    queue_id = cq.queue_id(),
                    queue_offset = qo,
                    entry = ?slot,
                    log_end = end,
                    "corrupt consume-queue entry; repairing the queue from the commit log"
                );
                bad.push((cq.topic().to_owned(), cq.queue_id()));
            }
        }
        if !bad.is_empty() {
            self.repair_queues(&bad)?;
        }
        Ok(())
    }

    /// Rewrites the entries of `keys` from the commit log: every dispatched
    /// record carries its topic, queue id and queue offset, so each entry is
    /// put back where it belongs. Safe while appends go on (an entry written
    /// twice gets the same value). Returns how many entries changed.
    ///
    /// # Errors
    /// I/O errors of the consume queues. Unreadable log ranges are stepped
    /// over (logged).
    pub fn repair_queues(&self, keys: &[QueueKey]) -> Result<u64> {
        let mut cqs: HashMap<QueueKey, Arc<ConsumeQueue>> = HashMap::default();
        for k in keys {
            if let Some(cq) = self.queue(&k.0, k.1) {
                lock(&self.repaired).insert(k.clone(), cq.next_offset());
                cqs.insert(k.clone(), cq);
            }
        }
        let mut changed = 0u64;
        let end = self.dispatched_end();
        for item in self.log.scan_from(self.log.min_offset()) {
            let (offset, rec) = match item {
                Ok(crate::commitlog::ScanItem::Record(o, r)) => (o, r),
                Ok(crate::commitlog::ScanItem::Skipped(r)) => {
                    tracing::error!(start = r.start, end = r.end, reason = %r.reason,
                        "consume-queue repair stepped over an unreadable commit-log range");
                    continue;
                }
                Err(e) => {
                    tracing::error!(error = %e, "consume-queue repair stopped at an I/O error");
                    break;
                }
            };
            if offset >= end {
                break;
            }
            let Some(cq) = cqs.get(&(rec.topic.clone(), rec.queue_id)) else {
                continue;
            };
            if let Some((qo, entry)) = dispatch_entry(offset, &rec) {
                if cq.get(qo)? != Some(entry) {
                    cq.put(qo, &[entry])?;
                    changed += 1;
                }
            }
        }
        for (k, cq) in &cqs {
            let holes = cq.mark_damaged_as_holes()?;
            if holes > 0 {
                tracing::error!(
                    topic = %k.0, queue_id = k.1, holes,
                    "queue offsets with no record in the commit log (lost to damage): marked as holes, skipped by consumers"
                );
            }
        }
        tracing::warn!(queues = ?keys, entries = changed, "consume queues repaired from the commit log");
        Ok(changed)
    }

    /// What recovery did when this store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// The configuration in force.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The metadata store.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The commit log.
    pub fn log(&self) -> &CommitLog {
        &self.log
    }

    /// Appends a batch, all or nothing. Store timestamps left at 0 are set to
    /// the system clock; records of dispatched kinds get the next queue
    /// offsets of their (topic, queue id), other kinds get none. The records
    /// are durable once [`Store::wait_durable`]`(receipt.end)` returns.
    ///
    /// # Errors
    /// As [`CommitLog::append`]; [`Error::Poisoned`] after a consume-queue
    /// write failed (restart to rebuild it); [`Error::Config`] on a
    /// replicated store.
    pub fn append(&self, mut records: Vec<Record>) -> Result<AppendReceipt> {
        if self.entries.is_some() {
            return Err(Error::Config {
                key: "replicated",
                reason:
                    "a replica's log takes whole entries from the replication layer, not appends"
                        .into(),
            });
        }
        let mut w = lock(&self.writer);
        if let Some(e) = &*w {
            return Err(Error::Poisoned(e.to_string()));
        }
        let now = now_ms();
        let mut next: HashMap<QueueKey, (Arc<ConsumeQueue>, u64)> = HashMap::default();
        for r in &mut records {
            if r.store_timestamp_ms == 0 {
                r.store_timestamp_ms = now;
            }
            r.queue_offset = None;
            if r.kind.is_dispatched() {
                let key = (r.topic.clone(), r.queue_id);
                let slot = match next.get_mut(&key) {
                    Some(s) => s,
                    None => {
                        let cq = self.queue_or_create(&r.topic, r.queue_id)?;
                        let n = cq.next_offset();
                        next.entry(key).or_insert((cq, n))
                    }
                };
                r.queue_offset = Some(slot.1);
                slot.1 += 1;
            }
        }
        // Allocate the consume-queue space first: once the log append is
        // done, a full disk must not be able to fail the dispatch.
        for (cq, next_free) in next.values() {
            let first = cq.next_offset();
            cq.reserve(first, next_free - first)?;
        }
        let appended = self.log.append(&records)?;

        // Dispatch: entries of one queue in one batch have consecutive offsets.
        let mut batches: HashMap<QueueKey, (u64, Vec<CqEntry>)> = HashMap::default();
        let mut queue_offsets = Vec::with_capacity(records.len());
        for (i, r) in records.iter().enumerate() {
            queue_offsets.push(r.queue_offset);
            if let Some((qo, entry)) = dispatch_entry(appended.offsets[i], r) {
                batches
                    .entry((r.topic.clone(), r.queue_id))
                    .or_insert_with(|| (qo, Vec::new()))
                    .1
                    .push(entry);
            }
        }
        let needs_flush = self.cfg.flush == FlushMode::Sync;
        for (key, (first, entries)) in batches {
            let cq = &next[&key].0;
            if let Err(e) = cq.put(first, &entries) {
                let msg = format!("consume queue write failed after the log append: {e}");
                tracing::error!(%msg, "store poisoned; restart rebuilds the consume queue");
                *w = Some(Error::Poisoned(msg));
                return Err(e);
            }
            cq.publish(first + entries.len() as u64, appended.end, needs_flush);
        }
        Ok(AppendReceipt {
            offsets: appended.offsets,
            sizes: appended.sizes,
            queue_offsets,
            end: appended.end,
        })
    }

    /// Waits until the log is durable up to `end` per the flush mode.
    ///
    /// # Errors
    /// As [`CommitLog::wait_durable`].
    pub async fn wait_durable(&self, end: u64) -> Result<()> {
        self.log.wait_durable(end).await
    }

    /// [`Store::append`] then [`Store::wait_durable`].
    ///
    /// # Errors
    /// As both.
    pub async fn append_durable(&self, records: Vec<Record>) -> Result<AppendReceipt> {
        let r = self.append(records)?;
        self.wait_durable(r.end).await?;
        Ok(r)
    }

    fn queue_or_create(&self, topic: &str, queue_id: u32) -> Result<Arc<ConsumeQueue>> {
        if let Some(q) = self.queue(topic, queue_id) {
            return Ok(q);
        }
        let mut qs = self.queues.write().unwrap_or_else(|e| e.into_inner());
        if let Some(q) = qs.get(&(topic.to_owned(), queue_id)) {
            return Ok(Arc::clone(q));
        }
        let cq = Arc::new(ConsumeQueue::open(
            &self.cq_root,
            topic,
            queue_id,
            self.cfg.cq_entries_per_file,
        )?);
        qs.insert((topic.to_owned(), queue_id), Arc::clone(&cq));
        Ok(cq)
    }

    /// Every consume queue (a snapshot of the set).
    fn all_queues(&self) -> Vec<Arc<ConsumeQueue>> {
        let qs = self.queues.read().unwrap_or_else(|e| e.into_inner());
        qs.values().cloned().collect()
    }

    /// The consume queue of (topic, queue id), if it has ever had an entry.
    pub fn queue(&self, topic: &str, queue_id: u32) -> Option<Arc<ConsumeQueue>> {
        let qs = self.queues.read().unwrap_or_else(|e| e.into_inner());
        qs.get(&(topic.to_owned(), queue_id)).cloned()
    }

    /// Every (topic, queue id) with a consume queue.
    pub fn queues(&self) -> Vec<(String, u32)> {
        let qs = self.queues.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = qs.keys().cloned().collect();
        v.sort();
        v
    }

    /// Queue offset one past the last message consumers may read from
    /// (topic, queue id); 0 for a queue that has none.
    pub fn max_queue_offset(&self, topic: &str, queue_id: u32) -> u64 {
        self.queue(topic, queue_id)
            .map_or(0, |q| q.visible_offset(self.log.flushed_offset()))
    }

    /// Reads the message at `queue_offset` of (topic, queue id).
    ///
    /// # Errors
    /// [`Error::QueueOffsetNotFound`] when there is no visible entry there (a
    /// hole, removed by retention, or not yet written or durable); commit-log
    /// read errors ([`Error::Corrupt`], [`Error::OffsetOutOfRange`]).
    pub fn read_queue(
        &self,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
    ) -> Result<QueueMessage> {
        let not_found = || Error::QueueOffsetNotFound {
            topic: topic.to_owned(),
            queue_id,
            queue_offset,
        };
        let cq = self.queue(topic, queue_id).ok_or_else(not_found)?;
        if queue_offset >= cq.visible_offset(self.log.flushed_offset()) {
            return Err(not_found());
        }
        let damaged_entry = || Error::QueueEntryDamaged {
            topic: topic.to_owned(),
            queue_id,
            queue_offset,
        };
        let read = || -> Result<QueueMessage> {
            let entry = match cq.slot(queue_offset)? {
                Some(Slot::Entry(e)) => e,
                Some(Slot::Damaged) => return Err(damaged_entry()),
                Some(Slot::Hole) | None => return Err(not_found()),
            };
            if entry.physical_offset < self.log.min_offset() {
                // Its segment was deleted by retention.
                return Err(not_found());
            }
            let record = self.log.read_sized(entry.physical_offset, entry.size)?;
            if !entry_matches(topic, queue_id, queue_offset, &record) {
                return Err(Error::Corrupt {
                    offset: entry.physical_offset,
                    reason: format!(
                        "consume queue {topic}/{queue_id} entry {queue_offset} points at a {:?} record of {}/{} queue offset {:?}",
                        record.kind, record.topic, record.queue_id, record.queue_offset
                    ),
                });
            }
            Ok(QueueMessage {
                queue_offset,
                physical_offset: entry.physical_offset,
                record,
            })
        };
        match read() {
            Err(
                e @ (Error::Corrupt { .. }
                | Error::OffsetOutOfRange { .. }
                | Error::QueueEntryDamaged { .. }),
            ) => {
                // The entry may be what is damaged: repair the queue from the
                // log once, then read again (a damaged record stays an error).
                let key = (topic.to_owned(), queue_id);
                let covered = lock(&self.repaired)
                    .get(&key)
                    .is_some_and(|&n| queue_offset < n);
                if covered {
                    return Err(e);
                }
                tracing::error!(error = %e, "unreadable through its consume queue; repairing the queue");
                self.repair_queues(&[key])?;
                read()
            }
            r => r,
        }
    }

    /// Reads the consume-queue entry at `queue_offset` without reading the
    /// record (for tag filtering by hash).
    ///
    /// # Errors
    /// I/O errors.
    pub fn queue_entry(
        &self,
        topic: &str,
        queue_id: u32,
        queue_offset: u64,
    ) -> Result<Option<CqEntry>> {
        match self.queue(topic, queue_id) {
            Some(cq) if queue_offset < cq.visible_offset(self.log.flushed_offset()) => {
                cq.get(queue_offset)
            }
            _ => Ok(None),
        }
    }

    /// Whether the data directory held no store before this open (no
    /// metadata store and no commit log): a first start, not a recovery.
    pub fn is_new(&self) -> bool {
        self.new_dir
    }

    /// What opening the metadata store found.
    pub fn meta_report(&self) -> &MetaReport {
        &self.meta_report
    }

    /// Saves a recovery checkpoint (see the module docs). Call it
    /// periodically (the broker does, every second) and before shutdown; it
    /// bounds how much of the log recovery re-reads.
    ///
    /// # Errors
    /// I/O and metadata errors; nothing is saved then.
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        let _g = lock(&self.checkpoint_lock);
        let (log_offset, queues, applied) = {
            let _w = lock(&self.writer);
            let qs = self.queues.read().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<(String, u32, u64, Arc<ConsumeQueue>)> = qs
                .iter()
                .map(|((t, q), cq)| (t.clone(), *q, cq.next_offset(), Arc::clone(cq)))
                .collect();
            v.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            if self.entries.is_some() {
                let a = lock(&self.applied);
                (a.0, v, a.1.clone())
            } else {
                (self.log.written_offset(), v, Vec::new())
            }
        };
        self.log.sync_now()?;
        if let Some(idx) = &self.entries {
            lock(idx).sync()?;
        }
        for (_, _, _, cq) in &queues {
            cq.sync()?;
        }
        let cp = Checkpoint {
            log_offset,
            queues: queues.into_iter().map(|(t, q, n, _)| (t, q, n)).collect(),
            applied,
        };
        self.meta.save_checkpoint(&cp)?;
        write_stamp(&self.cfg.data_dir, cp.log_offset)?;
        Ok(cp)
    }

    /// Deletes expired sealed segments (see [`retention::plan`]) that
    /// `can_delete` allows, then consume-queue files that only point into
    /// deleted segments. Returns the bases of the segments deleted.
    ///
    /// # Errors
    /// I/O errors; what was deleted before the error stays deleted.
    pub fn apply_retention(
        &self,
        now_ms: u64,
        can_delete: &dyn Fn(&SegmentInfo) -> bool,
    ) -> Result<Vec<u64>> {
        let segs = self.log.segments()?;
        let doomed = retention::plan(
            &segs,
            now_ms,
            self.cfg.retention_ms,
            self.cfg.retention_bytes,
            can_delete,
        );
        for base in &doomed {
            tracing::info!(base, "retention: deleting segment");
            self.log.delete_oldest_segment(*base)?;
        }
        if !doomed.is_empty() {
            let min = self.log.min_offset();
            for cq in self.all_queues() {
                cq.delete_expired(min)?;
            }
        }
        Ok(doomed)
    }

    /// Deletes every consume queue of each topic in `topics` (all queue ids)
    /// and returns how many there were. Under the writer lock the queues
    /// leave the store and their directories move to `<data_dir>/trash/`; a
    /// checkpoint then records the log offset past their last records (so a
    /// restart never dispatches those records again), and the moved
    /// directories are removed. A later append to the same topic starts a
    /// new queue at queue offset 0. The commit-log records stay until
    /// retention deletes their segments.
    ///
    /// # Errors
    /// I/O and metadata errors. Queues already moved stay deleted; a restart
    /// removes what is left in `trash/`.
    pub fn delete_queues(&self, topics: &[String]) -> Result<usize> {
        let trash = self.cfg.data_dir.join(TRASH_DIR);
        let stamp = format!("{}-{}", now_ms(), std::process::id());
        let mut removed = 0;
        {
            let _w = lock(&self.writer);
            let mut qs = self.queues.write().unwrap_or_else(|e| e.into_inner());
            let mut repaired = lock(&self.repaired);
            for topic in topics {
                let before = qs.len();
                qs.retain(|(t, _), _| t != topic);
                repaired.retain(|(t, _), _| t != topic);
                removed += before - qs.len();
                let dir = self.cq_root.join(topic);
                if dir.exists() {
                    let dest = trash.join(&stamp);
                    std::fs::create_dir_all(&dest)
                        .map_err(|e| Error::io("create dir", &dest, e))?;
                    let to = dest.join(topic);
                    std::fs::rename(&dir, &to).map_err(|e| Error::io("rename", &dir, e))?;
                }
            }
        }
        self.checkpoint()?;
        empty_trash(&self.cfg.data_dir)?;
        Ok(removed)
    }

    /// Checkpoints, stops the flusher after a last fdatasync, flushes sled.
    ///
    /// # Errors
    /// The first error met; the others are logged.
    pub fn close(&self) -> Result<()> {
        let cp = self.checkpoint();
        let log = self.log.close();
        let meta = self.meta.flush();
        cp.map(|_| ()).and(log).and(meta)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.cfg.data_dir
    }
}

/// The consume-queue entry a record produces, with its queue offset.
/// Whether `rec`, read through entry `queue_offset` of (topic, queue id), is
/// the record that entry was written for: a message or redelivery carries
/// its own queue position; a half (read through its commit) its topic and
/// queue id.
fn entry_matches(topic: &str, queue_id: u32, queue_offset: u64, rec: &Record) -> bool {
    let place = rec.topic == topic && rec.queue_id == queue_id;
    match rec.kind {
        RecordKind::Normal | RecordKind::Redelivery => {
            place && rec.queue_offset == Some(queue_offset)
        }
        RecordKind::Half => place,
        _ => false,
    }
}

fn dispatch_entry(offset: u64, rec: &Record) -> Option<(u64, CqEntry)> {
    let qo = rec.queue_offset?;
    let (physical_offset, size) = match rec.kind {
        RecordKind::Normal | RecordKind::Redelivery => (offset, rec.encoded_len() as u32),
        RecordKind::TxCommit => (rec.ref_offset?, rec.ref_size),
        _ => return None,
    };
    Some((
        qo,
        CqEntry {
            physical_offset,
            size,
            tag_hash: tag_hash(&rec.tag),
        },
    ))
}

/// Where [`Store::delete_queues`] moves the directories of deleted queues
/// before removing them.
const TRASH_DIR: &str = "trash";

/// Removes what deleted queues left in `<data_dir>/trash/`.
fn empty_trash(data_dir: &Path) -> Result<()> {
    let trash = data_dir.join(TRASH_DIR);
    if trash.exists() {
        std::fs::remove_dir_all(&trash).map_err(|e| Error::io("remove", &trash, e))?;
    }
    Ok(())
}

fn list_queue_dirs(root: &Path) -> Result<Vec<(String, u32)>> {
    let mut out = Vec::new();
    if !root.exists() {
        return Ok(out);
    }
    for t in std::fs::read_dir(root).map_err(|e| Error::io("list", root, e))? {
        let t = t.map_err(|e| Error::io("list", root, e))?;
        let Some(topic) = t.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        let tdir = t.path();
        if !tdir.is_dir() {
            continue;
        }
        for q in std::fs::read_dir(&tdir).map_err(|e| Error::io("list", &tdir, e))? {
            let q = q.map_err(|e| Error::io("list", &tdir, e))?;
            if let Some(qid) = q.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                out.push((topic.clone(), qid));
            }
        }
    }
    Ok(out)
}

/// Groups recovery's re-dispatch into runs of consecutive queue offsets so
/// that a rebuild writes each consume queue in large pwrites.
#[derive(Default)]
struct DispatchBatcher {
    runs: HashMap<QueueKey, (u64, Vec<CqEntry>)>,
    /// Per queue, one past the highest queue offset dispatched.
    seen: HashMap<QueueKey, u64>,
}

impl DispatchBatcher {
    const RUN_MAX: usize = 4096;

    fn push(
        &mut self,
        root: &Path,
        cfg: &StoreConfig,
        queues: &mut HashMap<QueueKey, Arc<ConsumeQueue>>,
        key: QueueKey,
        qo: u64,
        entry: CqEntry,
    ) -> Result<()> {
        if !queues.contains_key(&key) {
            let cq = ConsumeQueue::open(root, &key.0, key.1, cfg.cq_entries_per_file)?;
            queues.insert(key.clone(), Arc::new(cq));
        }
        let seen = self.seen.entry(key.clone()).or_insert(0);
        *seen = (*seen).max(qo + 1);
        let run = self
            .runs
            .entry(key.clone())
            .or_insert_with(|| (qo, Vec::new()));
        if run.0 + run.1.len() as u64 != qo || run.1.len() >= Self::RUN_MAX {
            let (first, entries) = std::mem::replace(run, (qo, Vec::new()));
            if !entries.is_empty() {
                queues[&key].put(first, &entries)?;
            }
        }
        run.1.push(entry);
        Ok(())
    }

    fn flush_all(&mut self, queues: &HashMap<QueueKey, Arc<ConsumeQueue>>) -> Result<()> {
        for (key, (first, entries)) in self.runs.drain() {
            if !entries.is_empty() {
                queues[&key].put(first, &entries)?;
            }
        }
        Ok(())
    }
}
