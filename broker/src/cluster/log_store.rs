//! openraft's log storage over the commit log: an entry is its marker record
//! and its records, written once into the replica's segmented commit log
//! (`Store::append_entries`); the store's entry index maps entry index →
//! bytes; the vote is a small fsynced file (`raft/vote`). See ARCHITECTURE.md,
//! "Replication".

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use halfmq_storage::{entry_marker, EntryKind, EntryPos, Record, StateFile, Store};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{EntryPayload, OptionalSend, RaftLogReader};

use super::types::{io_err, log_id, Entry, LogId, TypeConfig, Vote, Write};

/// The log store (and its reader: clones share everything).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    vote_file: StateFile,
    vote: Mutex<Option<Vote>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LogStore {
    /// The log store of a replicated `store` (opened with
    /// `StoreConfig::replicated`); reads the saved vote.
    ///
    /// # Errors
    /// When the store is not replicated, or the vote file is unreadable or
    /// fails its checksum (a vote is never guessed).
    pub fn open(store: Arc<Store>) -> io::Result<LogStore> {
        if store.entries().is_none() {
            return Err(io::Error::other("the store is not replicated"));
        }
        let vote_file = StateFile::new(store.data_dir().join("raft").join("vote"));
        let vote = match vote_file.load().map_err(io_err)? {
            Some(b) => Some(serde_json::from_slice(&b).map_err(io_err)?),
            None => None,
        };
        Ok(LogStore {
            inner: Arc::new(Inner {
                store,
                vote_file,
                vote: Mutex::new(vote),
            }),
        })
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    fn rows(&self, from: u64, to: u64) -> Vec<EntryPos> {
        self.inner
            .store
            .entries()
            .map(|i| lock(i).range(from, to).to_vec())
            .unwrap_or_default()
    }
}

/// Encodes the marker of `entry` and returns it with the payload bytes.
pub(crate) fn encode_entry(entry: &Entry) -> io::Result<(Vec<u8>, Bytes)> {
    let (term, index) = (entry.log_id.leader_id.term, entry.log_id.index);
    let (kind, body, payload) = match &entry.payload {
        EntryPayload::Blank => (EntryKind::Blank, Bytes::new(), Bytes::new()),
        EntryPayload::Normal(w) => (EntryKind::Normal, Bytes::new(), w.0.clone()),
        EntryPayload::Membership(m) => (
            EntryKind::Membership,
            Bytes::from(serde_json::to_vec(m).map_err(io_err)?),
            Bytes::new(),
        ),
    };
    let marker = entry_marker(kind, index, term, payload.len(), body).map_err(io_err)?;
    Ok((marker.encode().map_err(io_err)?, payload))
}

/// The entry whose bytes (marker and records) are `bytes`, at `pos`.
pub(crate) fn decode_entry(pos: &EntryPos, bytes: Bytes) -> io::Result<Entry> {
    let len = halfmq_storage::record::peek_len(&bytes)
        .filter(|n| *n <= bytes.len())
        .ok_or_else(|| io_err(format!("entry {} is cut short", pos.index)))?;
    let marker = Record::decode(bytes.slice(..len), pos.offset).map_err(io_err)?;
    let kind = EntryKind::from_u32(marker.queue_id).ok_or_else(|| {
        io_err(format!(
            "entry {} has unknown kind {}",
            pos.index, marker.queue_id
        ))
    })?;
    let payload = match kind {
        EntryKind::Blank => EntryPayload::Blank,
        EntryKind::Normal => EntryPayload::Normal(Write(bytes.slice(len..))),
        EntryKind::Membership => {
            EntryPayload::Membership(serde_json::from_slice(&marker.body).map_err(io_err)?)
        }
    };
    Ok(Entry::new(log_id(pos.term, pos.index), payload))
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let from = match range.start_bound() {
        Bound::Included(a) => *a,
        Bound::Excluded(a) => a.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let to = match range.end_bound() {
        Bound::Included(b) => b.saturating_add(1),
        Bound::Excluded(b) => *b,
        Bound::Unbounded => u64::MAX,
    };
    (from, to)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (from, to) = bounds(&range);
        let rows = self.rows(from, to);
        let log = self.inner.store.log();
        rows.iter()
            .map(|p| {
                let bytes = log.read_raw(p.offset, p.size as usize).map_err(io_err)?;
                decode_entry(p, bytes)
            })
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        Ok(*lock(&self.inner.vote))
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let Some(idx) = self.inner.store.entries() else {
            return Err(io_err("the store is not replicated"));
        };
        let idx = lock(idx);
        let purged = idx.purged().map(|(i, t)| log_id(t, i));
        let last = idx.last().map(|p| log_id(p.term, p.index)).or(purged);
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        // Returning marks every earlier append flushed too (openraft counts
        // flushes as a watermark): make them durable first.
        let inner = Arc::clone(&self.inner);
        let bytes = serde_json::to_vec(vote).map_err(io_err)?;
        tokio::task::spawn_blocking(move || -> io::Result<()> {
            inner.store.log().sync_now().map_err(io_err)?;
            inner.vote_file.save(&bytes).map_err(io_err)
        })
        .await
        .map_err(io_err)??;
        *lock(&self.inner.vote) = Some(*vote);
        Ok(())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for e in entries {
            let (marker, payload) = encode_entry(&e)?;
            encoded.push((e.log_id.index, e.log_id.leader_id.term, marker, payload));
        }
        let parts: Vec<(u64, u64, &[u8], &[u8])> = encoded
            .iter()
            .map(|(i, t, m, p)| (*i, *t, m.as_slice(), &p[..]))
            .collect();
        let end = self.inner.store.append_entries(&parts).map_err(io_err)?;
        self.inner.store.log().on_durable(
            end,
            Box::new(move |r| callback.io_completed(r.map_err(io_err))),
        );
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        self.inner
            .store
            .truncate_entries_after(last_log_id.map(|l| l.index))
            .map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        let Some(idx) = self.inner.store.entries() else {
            return Err(io_err("the store is not replicated"));
        };
        let end = self.inner.store.log().written_offset();
        lock(idx)
            .purge(log_id.index, log_id.leader_id.term, end)
            .map_err(io_err)
    }
}
