//! What a replicated log needs of the commit log: appends of encoded
//! records, callbacks once durable, truncation of an uncommitted suffix,
//! raw reads of entries (possibly across segments), and an empty log
//! restarted at a snapshot's offset.

use super::*;

impl CommitLog {
    /// Appends records already encoded (e.g. received from a leader), given
    /// as byte strings that are each zero or more whole records back to
    /// back, as one all-or-nothing batch. Every record's frame (length,
    /// magic, version, CRC) is checked before anything is written.
    ///
    /// # Errors
    /// [`Error::Corrupt`] when a part is not whole valid records;
    /// [`Error::RecordTooLarge`] past `max_record_bytes`; otherwise as
    /// [`CommitLog::append`].
    pub fn append_encoded(&self, parts: &[&[u8]]) -> Result<Appended> {
        let inner = &*self.inner;
        self.check_poison()?;
        let mut sizes = Vec::new();
        for part in parts {
            let mut at = 0usize;
            while at < part.len() {
                let n = check_frame(&part[at..], at as u64)?;
                if n > inner.max_record_bytes {
                    return Err(Error::RecordTooLarge {
                        size_bytes: n,
                        limit_bytes: inner.max_record_bytes,
                    });
                }
                sizes.push(n as u32);
                at += n;
            }
        }
        let mut w = lock(&inner.writer);
        let w = &mut *w;
        w.buf.clear();
        for part in parts {
            w.buf.extend_from_slice(part);
        }
        self.write_buffered(w, sizes)
    }

    /// Runs `f` once every byte before `end` is durable per the flush mode:
    /// on the flusher thread right after the fdatasync that covers it (sync
    /// mode; callbacks of one fdatasync run in order of `end`), at once when
    /// it already is or in async mode. `f` gets [`Error::Poisoned`] when an
    /// fdatasync fails and [`Error::Closed`] when the log closes first. A
    /// callback waiting when [`CommitLog::truncate`] cuts the log below its
    /// `end` stays: it runs once the log is durable past `end` again (what
    /// a replication layer that counts flushes as a watermark needs: it is
    /// never left without an answer). `f` must be quick: it runs on the
    /// flusher thread.
    pub fn on_durable(&self, end: u64, f: DurableCallback) {
        if let Err(e) = self.check_poison() {
            return f(Err(e));
        }
        if self.inner.flush != FlushMode::Sync {
            return f(Ok(()));
        }
        {
            let mut cbs = lock(&self.inner.durable_callbacks);
            // Checked under the lock the flusher drains under, after it
            // published the flushed offset: no callback is left behind.
            if self.flushed_offset() < end {
                let seq = cbs.next_seq;
                cbs.next_seq += 1;
                cbs.waiting.insert((end, seq), f);
                return;
            }
        }
        f(Ok(()))
    }

    /// Cuts the log back to `offset` (a record boundary at or past the
    /// first retained byte): later segments are removed, the one holding
    /// `offset` is truncated there and fdatasynced, so the cut bytes cannot
    /// come back after a crash. For a replica dropping an uncommitted
    /// suffix; whatever was derived from the cut records (consume queues)
    /// is the caller's to undo.
    ///
    /// # Errors
    /// [`Error::OffsetOutOfRange`] outside `[min_offset, written_offset]`;
    /// I/O errors (which poison the log).
    pub fn truncate(&self, offset: u64) -> Result<()> {
        let inner = &*self.inner;
        self.check_poison()?;
        let mut w = lock(&inner.writer);
        let written = inner.written.load(Ordering::Acquire);
        if offset == written {
            return Ok(());
        }
        let min = self.min_offset();
        if offset < min || offset > written {
            return Err(Error::OffsetOutOfRange {
                offset,
                min,
                max: written,
            });
        }
        let res = (|| -> Result<()> {
            let mut segs = inner.segments.write().unwrap_or_else(|e| e.into_inner());
            // The segment holding `offset`: the last with base <= offset, or,
            // when `offset` is a later segment's base, the one before it.
            let keep = segs
                .range(..=offset)
                .next_back()
                .map(|(b, s)| (*b, Arc::clone(s)))
                .ok_or_else(|| self.out_of_range(offset))?;
            let (keep_base, keep_seg) = if keep.0 == offset && keep.0 > min {
                let prev = segs
                    .range(..offset)
                    .next_back()
                    .map(|(b, s)| (*b, Arc::clone(s)))
                    .ok_or_else(|| self.out_of_range(offset))?;
                prev
            } else {
                keep
            };
            let later: Vec<u64> = segs.range(keep_base + 1..).map(|(b, _)| *b).collect();
            for b in later {
                if let Some(seg) = segs.remove(&b) {
                    fs::remove_file(&seg.path)
                        .map_err(|e| Error::io("remove segment", &seg.path, e))?;
                }
            }
            drop(segs);
            keep_seg.truncate(offset)?;
            keep_seg.sync()?;
            sync_dir(&inner.dir)?;
            w.prealloc.reset(keep_seg.base);
            w.prealloc.file_end = offset;
            w.active = keep_seg;
            Ok(())
        })();
        if let Err(e) = res {
            self.poison(format!("truncating the log to {offset} failed: {e}"));
            return Err(e);
        }
        lock(&inner.tail).cut(offset);
        inner.written.store(offset, Ordering::SeqCst);
        inner.flushed.fetch_min(offset, Ordering::AcqRel);
        inner
            .status
            .send_modify(|s| s.flushed = s.flushed.min(offset));
        Ok(())
    }

    /// Makes an empty log (nothing ever written) start at physical offset
    /// `base` instead of 0: its one empty segment is replaced by an empty
    /// segment named `base`. For a replica that installs a snapshot taken at
    /// `base`.
    ///
    /// # Errors
    /// [`Error::InvalidRecord`] when the log is not empty; I/O errors.
    pub fn restart_empty_at(&self, base: u64) -> Result<()> {
        let inner = &*self.inner;
        self.check_poison()?;
        let mut w = lock(&inner.writer);
        let mut segs = inner.segments.write().unwrap_or_else(|e| e.into_inner());
        let empty = inner.written.load(Ordering::Acquire) == 0
            && segs.len() == 1
            && segs.values().all(|s| s.base == 0 && s.end() == 0);
        if !empty {
            return Err(Error::InvalidRecord(
                "only an empty log can be restarted at another offset".into(),
            ));
        }
        if base == 0 {
            return Ok(());
        }
        let next = Arc::new(Segment::open(&inner.dir, base, true)?);
        let old = segs.remove(&0);
        segs.insert(base, Arc::clone(&next));
        if let Some(old) = old {
            fs::remove_file(&old.path).map_err(|e| Error::io("remove segment", &old.path, e))?;
        }
        sync_dir(&inner.dir)?;
        w.active = next;
        w.prealloc.reset(base);
        lock(&inner.tail).cut(0);
        inner.written.store(base, Ordering::SeqCst);
        inner.flushed.store(base, Ordering::SeqCst);
        inner.status.send_modify(|s| s.flushed = base);
        Ok(())
    }

    /// The bytes `[offset, offset + len)` of the written log (possibly across
    /// segments): a view of the tail cache when one cached chunk holds them,
    /// else `pread`s. Frames are not checked.
    ///
    /// # Errors
    /// [`Error::OffsetOutOfRange`] outside the written log; I/O errors.
    pub fn read_raw(&self, offset: u64, len: usize) -> Result<Bytes> {
        let end = offset
            .checked_add(len as u64)
            .ok_or_else(|| self.out_of_range(offset))?;
        if end > self.written_offset() || offset < self.min_offset() {
            return Err(self.out_of_range(offset));
        }
        if len == 0 {
            return Ok(Bytes::new());
        }
        if let Some(held) = lock(&self.inner.tail).from(offset) {
            if held.len() >= len {
                return Ok(held.slice(..len));
            }
        }
        let mut buf = vec![0u8; len];
        let mut at = offset;
        while at < end {
            let seg = self.segment_for(at)?;
            let upto = seg.end().min(end);
            let (a, b) = ((at - offset) as usize, (upto - offset) as usize);
            seg.read_at(at, &mut buf[a..b])?;
            at = upto;
        }
        Ok(Bytes::from(buf))
    }
}
