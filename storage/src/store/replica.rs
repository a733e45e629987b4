//! A broker group member's store: whole entries appended with their index
//! rows, consume queues written for applied entries only, the applied end,
//! and the entry index's reconciliation at open (see [`crate::entry_index`]).

use super::*;

impl Store {
    /// The entry index of a replicated store (`None` otherwise). Lock order:
    /// take it before nothing else of the store's.
    pub fn entries(&self) -> Option<&Mutex<EntryIndex>> {
        self.entries.as_ref()
    }

    /// Appends whole replicated entries at the log's end, as one write, and
    /// adds their index rows. Each is `(index, term, marker, payload)`: its
    /// encoded marker record (see [`crate::entry_marker`]) and its records
    /// encoded back to back; entries must follow the last row. Returns the
    /// physical offset one past the last entry; it is durable once
    /// [`CommitLog::on_durable`] says so.
    ///
    /// # Errors
    /// [`Error::Config`] on a store that is not replicated;
    /// [`Error::InvalidRecord`] when an entry does not follow the last one or
    /// its marker does not name it; otherwise as
    /// [`CommitLog::append_encoded`] (nothing is written then).
    pub fn append_entries(&self, entries: &[(u64, u64, &[u8], &[u8])]) -> Result<u64> {
        let Some(idx) = &self.entries else {
            return Err(Error::Config {
                key: "replicated",
                reason: "entries are appended only to a replicated store".into(),
            });
        };
        let mut idx = lock(idx);
        let start = self.log.written_offset();
        if start != idx.end() {
            return Err(Error::InvalidRecord(format!(
                "the log ends at {start} but its last entry at {}",
                idx.end()
            )));
        }
        let mut pos = Vec::with_capacity(entries.len());
        let mut parts: Vec<&[u8]> = Vec::with_capacity(entries.len() * 2);
        let mut at = start;
        for (index, term, marker, payload) in entries {
            let total = marker.len() + payload.len();
            let size = u32::try_from(total)
                .map_err(|_| Error::InvalidRecord(format!("entry {index} of {total} bytes")))?;
            match leading_marker(marker, at) {
                Some(m) if m.index == *index && m.term == *term && m.size == size => {}
                _ => {
                    return Err(Error::InvalidRecord(format!(
                        "entry {index} (term {term}) does not start with its own marker"
                    )))
                }
            }
            pos.push(EntryPos {
                index: *index,
                term: *term,
                offset: at,
                size,
            });
            at += u64::from(size);
            parts.push(marker);
            parts.push(payload);
        }
        let appended = self.log.append_encoded(&parts)?;
        debug_assert_eq!(appended.end, at);
        for p in pos {
            idx.append(p)?;
        }
        Ok(appended.end)
    }

    /// Cuts a replicated store's log after entry `index` (keeping it): the
    /// index rows and the log bytes of later entries go. Applied entries
    /// are never cut.
    ///
    /// # Errors
    /// [`Error::InvalidRecord`] when that would cut an applied entry or
    /// `index` is not held; I/O errors.
    pub fn truncate_entries_after(&self, index: Option<u64>) -> Result<()> {
        let Some(idx) = &self.entries else {
            return Ok(());
        };
        let mut idx = lock(idx);
        let cut_at = match index {
            Some(i) if idx.last().is_some_and(|l| l.index <= i) => return Ok(()),
            Some(i) => match idx.get(i) {
                Some(p) => p.end(),
                None if idx.purged().is_some_and(|(pi, _)| pi == i) => idx.end_of_purged(),
                None => {
                    return Err(Error::InvalidRecord(format!(
                        "cannot cut after entry {i}: not held"
                    )))
                }
            },
            None => {
                if idx.purged().is_some() {
                    return Err(Error::InvalidRecord(
                        "cannot cut the whole log: entries were purged".into(),
                    ));
                }
                0
            }
        };
        let applied_end = lock(&self.applied).0;
        if cut_at < applied_end {
            return Err(Error::InvalidRecord(format!(
                "cutting the log at {cut_at} would drop applied entries (applied up to {applied_end})"
            )));
        }
        let first_cut = index.map_or(0, |i| i + 1);
        idx.truncate_from(first_cut)?;
        self.log.truncate(cut_at)
    }

    /// Physical offset one past the last applied entry of a replicated store
    /// (the log's written end otherwise).
    pub fn dispatched_end(&self) -> u64 {
        if self.entries.is_some() {
            lock(&self.applied).0
        } else {
            self.log.written_offset()
        }
    }

    /// The replication layer's note saved with the last checkpoint (or the
    /// last [`Store::dispatch_applied`] since): what it said about the last
    /// applied entry. Empty when none.
    pub fn applied_note(&self) -> Vec<u8> {
        lock(&self.applied).1.clone()
    }

    /// Applies one committed entry of a replicated store: writes the
    /// consume-queue entries of its dispatched records (`(physical offset,
    /// record)`, with the queue offsets the leader gave them) and records
    /// `end` (one past the entry) and `note` as applied. A queue offset past
    /// the queue's end leaves holes before it (logged); one below it is not
    /// dispatched again (logged). Visible to readers at once: a committed
    /// entry is on a majority of replicas.
    ///
    /// # Errors
    /// I/O errors of the consume queues (the store is poisoned: restart to
    /// rebuild them).
    pub fn dispatch_applied(
        &self,
        records: &[(u64, &Record)],
        end: u64,
        note: Vec<u8>,
    ) -> Result<()> {
        let mut w = lock(&self.writer);
        if let Some(e) = &*w {
            return Err(Error::Poisoned(e.to_string()));
        }
        let mut batches: HashMap<QueueKey, (u64, Vec<CqEntry>)> = HashMap::default();
        for (offset, r) in records {
            let Some((qo, entry)) = dispatch_entry(*offset, r) else {
                continue;
            };
            let key = (r.topic.clone(), r.queue_id);
            match batches.get_mut(&key) {
                Some(b) if b.0 + b.1.len() as u64 == qo => b.1.push(entry),
                Some(_) => {
                    tracing::error!(topic = %r.topic, queue_id = r.queue_id, queue_offset = qo,
                        "an applied entry's queue offsets are not consecutive; dispatched one by one");
                    let (first, entries) = batches.remove(&key).unwrap_or_default();
                    self.put_applied(&key, first, &entries, &mut w)?;
                    batches.insert(key, (qo, vec![entry]));
                }
                None => {
                    batches.insert(key, (qo, vec![entry]));
                }
            }
        }
        for (key, (first, entries)) in batches {
            self.put_applied(&key, first, &entries, &mut w)?;
        }
        *lock(&self.applied) = (end, note);
        Ok(())
    }

    /// A broker group's retention on this replica: deletes the sealed
    /// segments that end at or before `before` (a physical offset every
    /// replica agreed on through the log), oldest first, then the
    /// consume-queue files that only point into them. Entries in those
    /// segments must have been purged from the entry index first; a segment
    /// holding an entry still indexed stops the deletion. Returns the bases
    /// of the segments deleted.
    ///
    /// # Errors
    /// I/O errors; what was deleted before the error stays deleted.
    pub fn delete_segments_before(&self, before: u64) -> Result<Vec<u64>> {
        let bound = match &self.entries {
            Some(idx) => before.min(lock(idx).end_of_purged()),
            None => before,
        };
        let mut deleted = Vec::new();
        for s in self.log.segments()? {
            if s.active || s.end > bound {
                break;
            }
            tracing::info!(base = s.base, end = s.end, "retention: deleting segment");
            self.log.delete_oldest_segment(s.base)?;
            deleted.push(s.base);
        }
        if !deleted.is_empty() {
            let min = self.log.min_offset();
            for cq in self.all_queues() {
                cq.delete_expired(min)?;
            }
        }
        Ok(deleted)
    }

    fn put_applied(
        &self,
        key: &QueueKey,
        first: u64,
        entries: &[CqEntry],
        w: &mut Option<Error>,
    ) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let cq = self.queue_or_create(&key.0, key.1)?;
        let next = cq.next_offset();
        let (first, entries) = if first < next {
            let skip = ((next - first) as usize).min(entries.len());
            tracing::error!(topic = %key.0, queue_id = key.1, first, next,
                "an applied entry repeats queue offsets already dispatched; not dispatched again");
            (next, &entries[skip..])
        } else {
            (first, entries)
        };
        if entries.is_empty() {
            return Ok(());
        }
        let res = cq.put(first, entries).and_then(|()| {
            if first > next {
                if next == 0 {
                    // A replica that installed a snapshot: the queue's
                    // earlier offsets were removed by retention before.
                    tracing::info!(topic = %key.0, queue_id = key.1, first,
                        "a queue starts here at a later offset (installed snapshot)");
                } else {
                    tracing::error!(topic = %key.0, queue_id = key.1, from = next, to = first,
                        "queue offsets skipped by the leader: marked as holes");
                }
                cq.mark_damaged_as_holes().map(|_| ())
            } else {
                Ok(())
            }
        });
        if let Err(e) = res {
            let msg = format!("consume queue write failed while applying: {e}");
            tracing::error!(%msg, "store poisoned; restart rebuilds the consume queue");
            *w = Some(Error::Poisoned(msg));
            return Err(e);
        }
        cq.publish(first + entries.len() as u64, 0, false);
        Ok(())
    }
}

/// The entry marker at the start of `bytes` (an entry written at `at`).
fn leading_marker(bytes: &[u8], at: u64) -> Option<EntryPos> {
    let len = peek_len(bytes)?;
    let head = bytes.get(..len)?;
    let rec = Record::decode(bytes::Bytes::copy_from_slice(head), at).ok()?;
    marker_pos(at, &rec)
}

/// Opens a replica's entry index and brings it in line with the recovered
/// log: rows past the log are cut, rows of markers the scan met are added,
/// markers between the last row and the scan are found by reading from the
/// last row's end, and a partly written last entry (never acknowledged) is
/// cut off the log.
pub(super) fn open_entry_index(
    root: &Path,
    log: &CommitLog,
    markers: &[EntryPos],
    applied_end: u64,
) -> Result<EntryIndex> {
    let mut idx = EntryIndex::open(&root.join("raft"))?;
    let end = log.written_offset();
    let first_is_marker = || {
        log.read(log.min_offset())
            .ok()
            .and_then(|r| marker_pos(log.min_offset(), &r))
            .is_some()
    };
    if idx.is_empty() && idx.purged().is_none() && end > 0 && !first_is_marker() {
        return Err(Error::Corrupt {
            offset: 0,
            reason: "the commit log holds records of a single broker, not a replica's entries: \
                     a broker group member needs its own data directory"
                .into(),
        });
    }
    let (cut, added) = idx.reconcile(log.min_offset(), end, markers)?;
    if idx.end() < end {
        // Rows lost before the scan's start: read the markers from there.
        let mut more = Vec::new();
        let mut at = idx.end();
        while at < end {
            let Ok(rec) = log.read(at) else { break };
            let Some(p) = marker_pos(at, &rec) else { break };
            more.push(p);
            at = p.end();
        }
        idx.reconcile(log.min_offset(), end, &more)?;
    }
    if idx.end() < end {
        let from = idx.end();
        if from < applied_end {
            return Err(Error::Corrupt {
                offset: from,
                reason: format!(
                    "the entry index ends at {from}, before the applied entries ({applied_end})"
                ),
            });
        }
        tracing::warn!(
            from,
            to = end,
            "cutting a partly written last entry off the log (never acknowledged)"
        );
        log.truncate(from)?;
    }
    if cut > 0 || added > 0 {
        tracing::info!(cut, added, "entry index reconciled with the commit log");
    }
    Ok(idx)
}
