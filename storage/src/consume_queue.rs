//! Consume queues: per (topic, queue id), an index from queue offset to the
//! record in the commit log, so that "read queue offset n" is one `pread` of
//! 20 bytes plus one of the record.
//!
//! # On-disk format
//!
//! ```text
//! consumequeue/<topic>/<queue id>/<20-digit queue offset of the file's first entry>
//!
//! entry (20 bytes, little-endian), entry n of the queue at byte (n - file base) * 20:
//!  offset size field
//!       0    8 physical_offset   u64: where the record (for a commit: the half) starts
//!       8    4 size              u32: the record's size in bytes; 0 = no entry
//!      12    8 tag_hash          u64: [`crate::record::tag_hash`] of the tag
//! ```
//!
//! An entry with size 0 is a **hole** only when its physical offset is
//! `u64::MAX` (written by a repair that found no record for that queue
//! offset in the log). Any other size-0 entry below the queue's end was
//! damaged (zeroed bytes): it is repaired from the log like any entry that
//! cannot be right.
//!
//! Files hold `cq_entries_per_file` entries and start at multiples of it. A
//! consume queue is derived data: the store rebuilds it from the commit log
//! (entries past the checkpoint are re-dispatched at open; a queue found
//! shorter than its checkpoint is rebuilt from the whole log). Consume-queue
//! files are fsynced only at checkpoints, never on the append path.
//!
//! The last [`CQ_TAIL_CACHE_ENTRIES`] entries written are also kept in memory,
//! so a consumer keeping up with its queue reads its entries without a
//! `pread`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::commitlog::{segment_file_name, SEGMENT_NAME_DIGITS};
use crate::error::{Error, Result};

/// Size of one consume-queue entry in bytes.
pub const CQ_ENTRY_BYTES: u64 = 20;

/// One consume-queue entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CqEntry {
    /// Physical offset of the record to deliver.
    pub physical_offset: u64,
    /// Size of that record in bytes (never 0 for a real entry).
    pub size: u32,
    /// Hash of the message's tag.
    pub tag_hash: u64,
}

/// What one 20-byte slot of a consume queue holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// An entry.
    Entry(CqEntry),
    /// A known hole: a repair found no record for it in the log.
    Hole,
    /// Size 0 without the hole marker: damaged bytes, to repair.
    Damaged,
}

/// The bytes of a known hole: physical offset `u64::MAX`, size 0.
const HOLE_BYTES: [u8; 20] = {
    let mut b = [0u8; 20];
    let mut i = 0;
    while i < 8 {
        b[i] = 0xff;
        i += 1;
    }
    b
};

impl Slot {
    fn decode(b: &[u8]) -> Slot {
        match CqEntry::decode(b) {
            Some(e) => Slot::Entry(e),
            None if b[0..8] == HOLE_BYTES[0..8] => Slot::Hole,
            None => Slot::Damaged,
        }
    }

    /// The entry, if the slot holds one.
    pub fn entry(self) -> Option<CqEntry> {
        match self {
            Slot::Entry(e) => Some(e),
            _ => None,
        }
    }
}

impl CqEntry {
    fn encode(&self) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&self.physical_offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.size.to_le_bytes());
        b[12..20].copy_from_slice(&self.tag_hash.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<CqEntry> {
        let mut p = [0u8; 8];
        p.copy_from_slice(&b[0..8]);
        let mut s = [0u8; 4];
        s.copy_from_slice(&b[8..12]);
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[12..20]);
        let e = CqEntry {
            physical_offset: u64::from_le_bytes(p),
            size: u32::from_le_bytes(s),
            tag_hash: u64::from_le_bytes(t),
        };
        (e.size != 0).then_some(e)
    }
}

struct Files {
    files: BTreeMap<u64, Arc<File>>,
    dirty: BTreeSet<u64>,
    /// Visibility: (queue offset one past an entry batch, log end that batch
    /// needs flushed), oldest first.
    pending: VecDeque<(u64, u64)>,
    /// File base → bytes from the file's start whose disk space is allocated
    /// (see [`ConsumeQueue::reserve`]).
    reserved: BTreeMap<u64, u64>,
    /// Queue offset of `tail[0]`.
    tail_first: u64,
    /// The last entries written, contiguous from `tail_first`.
    tail: VecDeque<CqEntry>,
}

impl Files {
    /// The cached entry at `queue_offset`: `None` when not cached,
    /// `Some(None)` for a hole.
    fn cached(&self, queue_offset: u64) -> Option<Option<CqEntry>> {
        let i = usize::try_from(queue_offset.checked_sub(self.tail_first)?).ok()?;
        self.tail.get(i).map(|e| (e.size != 0).then_some(*e))
    }

    /// Records that `entries` were written from `first` on.
    fn cache(&mut self, first: u64, entries: &[CqEntry]) {
        if first != self.tail_first + self.tail.len() as u64 {
            self.forget();
            self.tail_first = first;
        }
        self.tail.extend(entries.iter().copied());
        while self.tail.len() > CQ_TAIL_CACHE_ENTRIES {
            self.tail.pop_front();
            self.tail_first += 1;
        }
    }

    fn forget(&mut self) {
        self.tail.clear();
    }
}

/// Entries of each consume queue kept in memory after they are written
/// (24 KiB of memory per queue at most).
pub const CQ_TAIL_CACHE_ENTRIES: usize = 1024;

/// Disk space a consume-queue file allocates at a time ahead of its writes,
/// in bytes (3,276 entries).
const RESERVE_CHUNK_BYTES: u64 = 64 * 1024;

/// The consume queue of one (topic, queue id).
pub struct ConsumeQueue {
    dir: PathBuf,
    topic: String,
    queue_id: u32,
    entries_per_file: u64,
    inner: Mutex<Files>,
    /// Queue offset of the next entry to be written.
    next: AtomicU64,
    /// Queue offset one past the last entry consumers may see.
    visible: AtomicU64,
}

impl std::fmt::Debug for ConsumeQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumeQueue")
            .field("topic", &self.topic)
            .field("queue_id", &self.queue_id)
            .field("next", &self.next_offset())
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoning only means another thread panicked; the maps stay valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConsumeQueue {
    /// Directory of a queue under the `consumequeue/` root.
    pub fn queue_dir(root: &Path, topic: &str, queue_id: u32) -> PathBuf {
        root.join(topic).join(queue_id.to_string())
    }

    /// Opens the queue's files (none is fine). A trailing partial entry is
    /// cut off.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(
        root: &Path,
        topic: &str,
        queue_id: u32,
        entries_per_file: u64,
    ) -> Result<ConsumeQueue> {
        let dir = Self::queue_dir(root, topic, queue_id);
        let mut files = BTreeMap::new();
        let mut next = 0;
        if dir.exists() {
            let mut bases = Vec::new();
            for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
                let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                if name.len() == SEGMENT_NAME_DIGITS {
                    if let Ok(b) = name.parse::<u64>() {
                        bases.push(b);
                    }
                }
            }
            bases.sort_unstable();
            for base in bases {
                let path = dir.join(segment_file_name(base));
                let f = open_rw(&path, false)?;
                let len = f.metadata().map_err(|e| Error::io("stat", &path, e))?.len();
                let whole = len - len % CQ_ENTRY_BYTES;
                let prev_full = next == 0 || next == base;
                if whole == 0 && !files.is_empty() && !prev_full {
                    // Created by `reserve` for an append that then failed
                    // (or never happened): the queue never reached `base`.
                    drop(f);
                    fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
                    continue;
                }
                if whole != len {
                    f.set_len(whole)
                        .map_err(|e| Error::io("truncate", &path, e))?;
                }
                next = next.max(base + whole / CQ_ENTRY_BYTES);
                files.insert(base, Arc::new(f));
            }
        }
        Ok(ConsumeQueue {
            dir,
            topic: topic.to_owned(),
            queue_id,
            entries_per_file,
            inner: Mutex::new(Files {
                files,
                dirty: BTreeSet::new(),
                pending: VecDeque::new(),
                reserved: BTreeMap::new(),
                tail_first: 0,
                tail: VecDeque::new(),
            }),
            next: AtomicU64::new(next),
            visible: AtomicU64::new(next),
        })
    }

    /// Topic name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Queue id.
    pub fn queue_id(&self) -> u32 {
        self.queue_id
    }

    /// Queue offset of the next entry to be written (the queue's length).
    pub fn next_offset(&self) -> u64 {
        self.next.load(Ordering::Acquire)
    }

    /// Queue offset of the first file still present (entries below it were
    /// removed by retention). Holes may still follow it.
    pub fn min_offset(&self) -> u64 {
        lock(&self.inner)
            .files
            .keys()
            .next()
            .copied()
            .unwrap_or_else(|| self.next_offset())
    }

    /// Writes `entries` at queue offsets `first..first + len`, overwriting
    /// what is there. Used by dispatch (in queue-offset order) and recovery.
    ///
    /// # Errors
    /// I/O errors.
    pub fn put(&self, first: u64, entries: &[CqEntry]) -> Result<()> {
        let mut inner = lock(&self.inner);
        // Whatever happens below, the cache must not keep an old entry
        // where the file may now hold a new one: re-filled on success.
        let written = self.put_files(&mut inner, first, entries);
        match written {
            Ok(()) => inner.cache(first, entries),
            Err(_) => inner.forget(),
        }
        written
    }

    fn put_files(&self, inner: &mut Files, first: u64, entries: &[CqEntry]) -> Result<()> {
        let mut qo = first;
        let mut rest = entries;
        while !rest.is_empty() {
            let base = qo - qo % self.entries_per_file;
            let room = (base + self.entries_per_file - qo) as usize;
            let (now, later) = rest.split_at(room.min(rest.len()));
            let file = self.file(inner, base)?;
            let mut bytes = Vec::with_capacity(now.len() * CQ_ENTRY_BYTES as usize);
            for e in now {
                bytes.extend_from_slice(&e.encode());
            }
            file.write_all_at(&bytes, (qo - base) * CQ_ENTRY_BYTES)
                .map_err(|e| Error::io("write consume queue", &self.dir, e))?;
            inner.dirty.insert(base);
            qo += now.len() as u64;
            rest = later;
        }
        self.next.fetch_max(qo, Ordering::AcqRel);
        Ok(())
    }

    /// Allocates the disk space for entries `first..first + n` ahead of
    /// time (`fallocate` keeping the file size, in chunks of 64 KiB), so
    /// that the [`ConsumeQueue::put`] that follows a commit-log append
    /// cannot fail for a full disk. Filesystems without `fallocate` are
    /// accepted as they are.
    ///
    /// # Errors
    /// I/O errors, among them a full disk ([`Error::is_storage_full`]).
    pub fn reserve(&self, first: u64, n: u64) -> Result<()> {
        let mut inner = lock(&self.inner);
        let file_bytes = self.entries_per_file * CQ_ENTRY_BYTES;
        let end = first + n;
        let mut qo = first;
        while qo < end {
            let base = qo - qo % self.entries_per_file;
            let upto = end.min(base + self.entries_per_file);
            let need = (upto - base) * CQ_ENTRY_BYTES;
            let have = inner.reserved.get(&base).copied().unwrap_or(0);
            if need > have {
                let file = self.file(&mut inner, base)?;
                let want = need.div_ceil(RESERVE_CHUNK_BYTES) * RESERVE_CHUNK_BYTES;
                let want = want.min(file_bytes);
                match rustix::fs::fallocate(
                    &*file,
                    rustix::fs::FallocateFlags::KEEP_SIZE,
                    have,
                    want - have,
                ) {
                    Ok(()) => {}
                    Err(e)
                        if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => {}
                    Err(e) => {
                        return Err(Error::io(
                            "allocate consume queue",
                            self.dir.join(segment_file_name(base)),
                            e.into(),
                        ))
                    }
                }
                inner.reserved.insert(base, want);
            }
            qo = upto;
        }
        Ok(())
    }

    /// The file holding entries from `base`, created when missing.
    fn file(&self, inner: &mut Files, base: u64) -> Result<Arc<File>> {
        if let Some(f) = inner.files.get(&base) {
            return Ok(Arc::clone(f));
        }
        fs::create_dir_all(&self.dir).map_err(|e| Error::io("create dir", &self.dir, e))?;
        let f = Arc::new(open_rw(&self.dir.join(segment_file_name(base)), true)?);
        inner.files.insert(base, Arc::clone(&f));
        Ok(f)
    }

    /// Marks entries below `queue_end` visible once the commit log is flushed
    /// to `log_end` (see [`ConsumeQueue::visible_offset`]).
    pub(crate) fn publish(&self, queue_end: u64, log_end: u64, needs_flush: bool) {
        if needs_flush {
            lock(&self.inner).pending.push_back((queue_end, log_end));
        } else {
            self.visible.fetch_max(queue_end, Ordering::AcqRel);
        }
    }

    /// Queue offset one past the last entry consumers may see, given the
    /// commit log's flushed offset: entries whose records are not yet durable
    /// (sync mode) stay hidden, so nothing that could be lost is delivered.
    pub fn visible_offset(&self, flushed: u64) -> u64 {
        let mut inner = lock(&self.inner);
        while let Some(&(q, l)) = inner.pending.front() {
            if l > flushed {
                break;
            }
            self.visible.fetch_max(q, Ordering::AcqRel);
            inner.pending.pop_front();
        }
        self.visible.load(Ordering::Acquire)
    }

    /// Reads the entry at `queue_offset`; `None` for a hole, a damaged slot
    /// or outside the queue.
    ///
    /// # Errors
    /// I/O errors.
    pub fn get(&self, queue_offset: u64) -> Result<Option<CqEntry>> {
        Ok(self.slot(queue_offset)?.and_then(Slot::entry))
    }

    /// Reads the slot at `queue_offset`; `None` outside the queue (past its
    /// end, or in a file retention deleted).
    ///
    /// # Errors
    /// I/O errors.
    pub fn slot(&self, queue_offset: u64) -> Result<Option<Slot>> {
        if queue_offset >= self.next_offset() {
            return Ok(None);
        }
        let base = queue_offset - queue_offset % self.entries_per_file;
        let file = {
            let inner = lock(&self.inner);
            if let Some(e) = inner.cached(queue_offset) {
                return Ok(Some(e.map_or(Slot::Damaged, Slot::Entry)));
            }
            match inner.files.get(&base) {
                Some(f) => Arc::clone(f),
                None => return Ok(None),
            }
        };
        let mut b = [0u8; 20];
        match file.read_exact_at(&mut b, (queue_offset - base) * CQ_ENTRY_BYTES) {
            Ok(()) => Ok(Some(Slot::decode(&b))),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(Error::io("read consume queue", &self.dir, e)),
        }
    }

    /// Marks every damaged slot of the queue (size 0 without the hole
    /// marker) as a known hole; returns how many. A repair calls it after
    /// rewriting every entry the log has, so what is left has no record.
    ///
    /// # Errors
    /// I/O errors.
    pub fn mark_damaged_as_holes(&self) -> Result<u64> {
        let mut damaged = Vec::new();
        self.for_each_slot(usize::MAX, |qo, s| {
            if s == Slot::Damaged {
                damaged.push(qo);
            }
        })?;
        let mut inner = lock(&self.inner);
        for &qo in &damaged {
            let base = qo - qo % self.entries_per_file;
            let file = self.file(&mut inner, base)?;
            file.write_all_at(&HOLE_BYTES, (qo - base) * CQ_ENTRY_BYTES)
                .map_err(|e| Error::io("write consume queue", &self.dir, e))?;
            inner.dirty.insert(base);
        }
        if !damaged.is_empty() {
            inner.forget();
        }
        Ok(damaged.len() as u64)
    }

    /// Calls `f(queue_offset, entry)` for every entry of the last
    /// `last_files` files, in order, reading each file whole.
    ///
    /// # Errors
    /// I/O errors.
    pub fn for_each_entry(&self, last_files: usize, mut f: impl FnMut(u64, CqEntry)) -> Result<()> {
        self.for_each_slot(last_files, |qo, s| {
            if let Slot::Entry(e) = s {
                f(qo, e);
            }
        })
    }

    /// Calls `f(queue_offset, slot)` for every slot below the queue's end in
    /// the last `last_files` files, in order, reading each file whole.
    ///
    /// # Errors
    /// I/O errors.
    pub fn for_each_slot(&self, last_files: usize, mut f: impl FnMut(u64, Slot)) -> Result<()> {
        let end = self.next_offset();
        let files: Vec<(u64, Arc<File>)> = lock(&self.inner)
            .files
            .iter()
            .rev()
            .take(last_files)
            .rev()
            .map(|(b, f)| (*b, Arc::clone(f)))
            .collect();
        let mut buf = vec![0u8; (self.entries_per_file * CQ_ENTRY_BYTES) as usize];
        for (base, file) in files {
            let n = read_up_to(&file, &mut buf)
                .map_err(|e| Error::io("read consume queue", &self.dir, e))?;
            for (i, b) in buf[..n - n % 20].chunks_exact(20).enumerate() {
                let qo = base + i as u64;
                if qo < end {
                    f(qo, Slot::decode(b));
                }
            }
        }
        Ok(())
    }

    /// Drops every entry at or past `len` (recovery back to a checkpoint).
    ///
    /// # Errors
    /// I/O errors.
    pub fn truncate(&self, len: u64) -> Result<()> {
        let mut inner = lock(&self.inner);
        inner.forget();
        let bases: Vec<u64> = inner
            .files
            .range(len - len % self.entries_per_file..)
            .map(|(b, _)| *b)
            .collect();
        for base in bases {
            let path = self.dir.join(segment_file_name(base));
            if base >= len {
                inner.files.remove(&base);
                inner.dirty.remove(&base);
                inner.reserved.remove(&base);
                fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
            } else if let Some(f) = inner.files.get(&base) {
                f.set_len((len - base) * CQ_ENTRY_BYTES)
                    .map_err(|e| Error::io("truncate", &path, e))?;
                inner.dirty.insert(base);
                inner.reserved.remove(&base); // truncation frees what was allocated
            }
        }
        inner.pending.retain(|&(q, _)| q <= len);
        self.next.store(len, Ordering::Release);
        self.visible.fetch_min(len, Ordering::AcqRel);
        Ok(())
    }

    /// Deletes whole files whose entries all point below `min_physical`
    /// (records removed by retention). Never deletes the file being written.
    ///
    /// # Errors
    /// I/O errors.
    pub fn delete_expired(&self, min_physical: u64) -> Result<usize> {
        let mut inner = lock(&self.inner);
        inner.forget();
        let next = self.next_offset();
        let mut removed = 0;
        let bases: Vec<u64> = inner.files.keys().copied().collect();
        for base in bases {
            if base + self.entries_per_file > next {
                break; // the file being written
            }
            let f = Arc::clone(&inner.files[&base]);
            let mut all = vec![0u8; (self.entries_per_file * CQ_ENTRY_BYTES) as usize];
            let n = read_up_to(&f, &mut all)
                .map_err(|e| Error::io("read consume queue", &self.dir, e))?;
            let max_phys = all[..n - n % 20]
                .chunks_exact(20)
                .filter_map(CqEntry::decode)
                .map(|e| e.physical_offset)
                .max();
            if max_phys.is_some_and(|m| m >= min_physical) {
                break;
            }
            let path = self.dir.join(segment_file_name(base));
            inner.files.remove(&base);
            inner.dirty.remove(&base);
            inner.reserved.remove(&base);
            fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Fsyncs the files written since the last call.
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&self) -> Result<()> {
        let (files, dirty): (Vec<Arc<File>>, BTreeSet<u64>) = {
            let mut inner = lock(&self.inner);
            let dirty = std::mem::take(&mut inner.dirty);
            (
                dirty
                    .iter()
                    .filter_map(|b| inner.files.get(b).cloned())
                    .collect(),
                dirty,
            )
        };
        for f in files {
            if let Err(e) = f.sync_data() {
                lock(&self.inner).dirty.extend(dirty);
                return Err(Error::io("fdatasync consume queue", &self.dir, e));
            }
        }
        Ok(())
    }
}

fn open_rw(path: &Path, create: bool) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(|e| Error::io("open consume queue", path, e))
}

fn read_up_to(f: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], n as u64)? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(p: u64) -> CqEntry {
        CqEntry {
            physical_offset: p,
            size: 100,
            tag_hash: p * 7,
        }
    }

    #[test]
    fn reserve_keeps_the_length_and_a_file_it_created_for_nothing_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "t", 0, 4).unwrap();
        cq.reserve(0, 6).unwrap(); // files 0 and 4
        assert_eq!(cq.next_offset(), 0, "reserving writes no entry");
        cq.put(0, &[e(1), e(2)]).unwrap();
        drop(cq);
        // The append the reservation was for never happened: file 4 is empty,
        // after a file that is not full. It is removed; the length is 2.
        let cq = ConsumeQueue::open(dir.path(), "t", 0, 4).unwrap();
        assert_eq!(cq.next_offset(), 2);
        assert!(!ConsumeQueue::queue_dir(dir.path(), "t", 0)
            .join(segment_file_name(4))
            .exists());
        // An empty file after a full one is the queue's real end.
        cq.reserve(2, 3).unwrap();
        cq.put(2, &[e(3), e(4)]).unwrap();
        drop(cq);
        let cq = ConsumeQueue::open(dir.path(), "t", 0, 4).unwrap();
        assert_eq!(cq.next_offset(), 4);
        assert_eq!(cq.get(3).unwrap(), Some(e(4)));
    }

    #[test]
    fn the_last_entries_are_read_from_memory_and_forgotten_on_truncate() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "t", 0, 4096).unwrap();
        let n = CQ_TAIL_CACHE_ENTRIES as u64 + 100;
        let entries: Vec<_> = (1..=n).map(e).collect();
        for (i, chunk) in entries.chunks(64).enumerate() {
            cq.put(i as u64 * 64, chunk).unwrap();
        }
        // Zero the file behind the queue's back: from the file every entry
        // now reads as a hole.
        let path = ConsumeQueue::queue_dir(dir.path(), "t", 0).join(segment_file_name(0));
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&vec![0u8; (n * CQ_ENTRY_BYTES) as usize], 0)
            .unwrap();
        let first_cached = n - CQ_TAIL_CACHE_ENTRIES as u64;
        assert_eq!(
            cq.get(first_cached - 1).unwrap(),
            None,
            "evicted: from the file"
        );
        assert_eq!(cq.get(first_cached).unwrap(), Some(e(first_cached + 1)));
        assert_eq!(cq.get(n - 1).unwrap(), Some(e(n)));
        // An overwrite (recovery) replaces what is cached.
        cq.put(n - 2, &[e(7), e(8)]).unwrap();
        assert_eq!(cq.get(n - 1).unwrap(), Some(e(8)));
        assert_eq!(
            cq.get(n - 3).unwrap(),
            None,
            "no longer cached: from the file"
        );
        cq.truncate(n - 1).unwrap();
        assert_eq!(
            cq.get(n - 2).unwrap(),
            Some(e(7)),
            "written through to the file"
        );
        assert_eq!(cq.get(n - 1).unwrap(), None);
        f.write_all_at(&[0u8; CQ_ENTRY_BYTES as usize], (n - 2) * CQ_ENTRY_BYTES)
            .unwrap();
        assert_eq!(cq.get(n - 2).unwrap(), None, "truncate forgets the cache");
    }

    #[test]
    fn put_get_across_files_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "t", 1, 4).unwrap();
        let entries: Vec<_> = (0..10).map(|i| e(i * 100)).collect();
        cq.put(0, &entries[..3]).unwrap();
        cq.put(3, &entries[3..]).unwrap();
        assert_eq!(cq.next_offset(), 10);
        for i in 0..10 {
            assert_eq!(cq.get(i).unwrap(), Some(entries[i as usize]));
        }
        assert_eq!(cq.get(10).unwrap(), None);
        drop(cq);
        let cq = ConsumeQueue::open(dir.path(), "t", 1, 4).unwrap();
        assert_eq!(cq.next_offset(), 10);
        assert_eq!(cq.get(9).unwrap(), Some(entries[9]));
        cq.truncate(5).unwrap();
        assert_eq!(cq.next_offset(), 5);
        assert_eq!(cq.get(5).unwrap(), None);
        assert_eq!(cq.get(4).unwrap(), Some(entries[4]));
        drop(cq);
        let cq = ConsumeQueue::open(dir.path(), "t", 1, 4).unwrap();
        assert_eq!(cq.next_offset(), 5);
    }

    #[test]
    fn holes_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "t", 0, 100).unwrap();
        cq.put(5, &[e(1)]).unwrap();
        assert_eq!(cq.get(2).unwrap(), None);
        assert_eq!(cq.get(5).unwrap(), Some(e(1)));
    }

    #[test]
    fn visibility_waits_for_flush() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "t", 0, 100).unwrap();
        cq.put(0, &[e(0), e(100)]).unwrap();
        cq.publish(2, 200, true);
        assert_eq!(cq.visible_offset(100), 0);
        assert_eq!(cq.visible_offset(200), 2);
    }

    #[test]
    fn delete_expired_keeps_live_files() {
        let dir = tempfile::tempdir().unwrap();
        let cq = ConsumeQueue::open(dir.path(), "t", 0, 2).unwrap();
        cq.put(0, &[e(0), e(100), e(200), e(300), e(400)]).unwrap();
        assert_eq!(cq.delete_expired(150).unwrap(), 1);
        assert_eq!(cq.min_offset(), 2);
        assert_eq!(cq.get(0).unwrap(), None);
        assert_eq!(cq.get(2).unwrap(), Some(e(200)));
    }
}
