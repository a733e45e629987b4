//! Small keyed metadata in sled (0.34): the recovery checkpoint, topic
//! configurations, consumer-group offsets, and any other small broker state.
//! The commit log itself is never stored here.
//!
//! # Checkpoint value (sled tree `checkpoint`, key `cp`, little-endian)
//!
//! ```text
//!  size field
//!     4 crc32        of everything after it
//!     8 log_offset   physical offset: the log is durable up to here, and every
//!                    consume queue is durable and consistent at this point
//!     4 queue_count
//!  per queue:
//!     2 topic_len, topic_len bytes of UTF-8
//!     4 queue_id
//!     8 next_queue_offset  the queue's length at log_offset
//!  optional (replicated stores):
//!     4 applied_len, applied_len bytes: the replication layer's note on the
//!       last entry applied at log_offset
//! ```

use crate::error::{Error, Result};

/// The point recovery starts from: at `log_offset` every consume queue had
/// exactly the lengths listed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// Physical offset up to which the log and the queues are durable.
    pub log_offset: u64,
    /// `(topic, queue id, queue length)` at that offset.
    pub queues: Vec<(String, u32, u64)>,
    /// For a replicated store: what the replication layer said about the
    /// last entry applied at `log_offset` (opaque here; empty otherwise).
    /// Written after the queues; absent in checkpoints of older versions.
    pub applied: Vec<u8>,
}

impl Checkpoint {
    fn encode(&self) -> Vec<u8> {
        let mut v = vec![0u8; 4];
        v.extend_from_slice(&self.log_offset.to_le_bytes());
        v.extend_from_slice(&(self.queues.len() as u32).to_le_bytes());
        for (t, q, n) in &self.queues {
            v.extend_from_slice(&(t.len() as u16).to_le_bytes());
            v.extend_from_slice(t.as_bytes());
            v.extend_from_slice(&q.to_le_bytes());
            v.extend_from_slice(&n.to_le_bytes());
        }
        if !self.applied.is_empty() {
            v.extend_from_slice(&(self.applied.len() as u32).to_le_bytes());
            v.extend_from_slice(&self.applied);
        }
        let crc = crc32fast::hash(&v[4..]);
        v[0..4].copy_from_slice(&crc.to_le_bytes());
        v
    }

    fn decode(b: &[u8]) -> Option<Checkpoint> {
        let crc = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?);
        if crc32fast::hash(b.get(4..)?) != crc {
            return None;
        }
        let mut p = 4usize;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = b.get(p..p + n)?;
            p += n;
            Some(s)
        };
        let log_offset = u64::from_le_bytes(take(8)?.try_into().ok()?);
        let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
        let mut queues = Vec::new();
        for _ in 0..count {
            let tl = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
            let topic = std::str::from_utf8(take(tl)?).ok()?.to_owned();
            let qid = u32::from_le_bytes(take(4)?.try_into().ok()?);
            let n = u64::from_le_bytes(take(8)?.try_into().ok()?);
            queues.push((topic, qid, n));
        }
        let mut applied = Vec::new();
        if let Some(len) = take(4) {
            let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
            applied = take(len)?.to_vec();
        }
        Some(Checkpoint {
            log_offset,
            queues,
            applied,
        })
    }
}

/// The metadata store.
#[derive(Debug, Clone)]
pub struct Meta {
    db: sled::Db,
}

const CHECKPOINT_TREE: &str = "checkpoint";
/// sled's page cache, bytes: metadata is small; sled's default (1 GiB) would
/// let a million saved pending halves sit in memory twice. 64 MiB.
pub const META_CACHE_BYTES: u64 = 64 << 20;
const CONSUMER_OFFSETS_TREE: &str = "consumer_offsets";

impl Meta {
    /// Opens (or creates) the sled database in `dir`. sled's own background
    /// flusher is off: the store flushes sled at every checkpoint (and
    /// [`Meta::flush`] does on demand), so no extra thread keeps the database
    /// open after the store is dropped. A lock still held by a just-dropped
    /// instance in this process is waited for, up to 3 s.
    ///
    /// # Errors
    /// [`Error::Meta`] when sled cannot open it (including another process
    /// holding it).
    pub fn open(dir: &std::path::Path) -> Result<Meta> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            match sled::Config::new()
                .path(dir)
                .flush_every_ms(None)
                .cache_capacity(META_CACHE_BYTES)
                .open()
            {
                Ok(db) => return Ok(Meta { db }),
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// [`Meta::open`]; when sled refuses the database for any reason but a
    /// lock held by another process (corrupt configuration, corrupt log,
    /// unreadable files), the directory is renamed to
    /// `<dir>.corrupt-<unix ms>` (kept for an operator, never deleted) and a
    /// new, empty database is opened in its place. Returns the renamed
    /// directory, if any, and sled's error.
    ///
    /// # Errors
    /// [`Error::Meta`] for a lock held by another process; I/O errors of
    /// the rename; errors opening the new database.
    pub fn open_or_set_aside(
        dir: &std::path::Path,
    ) -> Result<(Meta, Option<(std::path::PathBuf, String)>)> {
        match Meta::open(dir) {
            Ok(m) => Ok((m, None)),
            Err(Error::Meta(sled::Error::Io(e)))
                if e.to_string().contains("could not acquire lock") =>
            {
                Err(Error::Meta(sled::Error::Io(e)))
            }
            Err(e) => {
                let mut aside = dir.as_os_str().to_owned();
                aside.push(format!(".corrupt-{}", crate::store::now_ms()));
                let aside = std::path::PathBuf::from(aside);
                tracing::error!(
                    error = %e, dir = %dir.display(), moved_to = %aside.display(),
                    "metadata store unreadable; set aside, starting a new one (consume queues, topics and transaction state are rebuilt from the commit log; consumer progress is lost: groups start again from their earliest message)"
                );
                std::fs::rename(dir, &aside).map_err(|io| Error::io("rename", dir, io))?;
                Ok((Meta::open(dir)?, Some((aside, e.to_string()))))
            }
        }
    }

    /// The last saved checkpoint; `None` when there is none or it fails its CRC
    /// (recovery then rebuilds from the whole log).
    ///
    /// # Errors
    /// [`Error::Meta`].
    pub fn checkpoint(&self) -> Result<Option<Checkpoint>> {
        let t = self.db.open_tree(CHECKPOINT_TREE)?;
        Ok(match t.get(b"cp")? {
            None => None,
            Some(v) => {
                let cp = Checkpoint::decode(&v);
                if cp.is_none() {
                    tracing::error!(
                        "checkpoint fails its CRC; the whole log will be re-dispatched"
                    );
                }
                cp
            }
        })
    }

    /// Saves a checkpoint and flushes sled to disk.
    ///
    /// # Errors
    /// [`Error::Meta`].
    pub fn save_checkpoint(&self, cp: &Checkpoint) -> Result<()> {
        let t = self.db.open_tree(CHECKPOINT_TREE)?;
        t.insert(b"cp", cp.encode())?;
        self.db.flush()?;
        Ok(())
    }

    /// Stores `value` under `key` in the named keyspace (not flushed: call
    /// [`Meta::flush`] for durability).
    ///
    /// # Errors
    /// [`Error::Meta`].
    pub fn put(&self, space: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.db.open_tree(space)?.insert(key, value)?;
        Ok(())
    }

    /// Reads `key` from the named keyspace.
    ///
    /// # Errors
    /// [`Error::Meta`].
    pub fn get(&self, space: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.open_tree(space)?.get(key)?.map(|v| v.to_vec()))
    }

    /// Removes `key` from the named keyspace.
    ///
    /// # Errors
    /// [`Error::Meta`].
    pub fn remove(&self, space: &str, key: &[u8]) -> Result<()> {
        self.db.open_tree(space)?.remove(key)?;
        Ok(())
    }

    /// Every `(key, value)` of the keyspace whose key starts with `prefix`, in
    /// key order.
    ///
    /// # Errors
    /// [`Error::Meta`].
    pub fn scan_prefix(&self, space: &str, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.db
            .open_tree(space)?
            .scan_prefix(prefix)
            .map(|kv| {
                kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(Error::from)
            })
            .collect()
    }

    /// Saves a consumer group's consumer offset for one queue (not flushed).
    ///
    /// # Errors
    /// [`Error::Meta`].
    pub fn set_consumer_offset(
        &self,
        group: &str,
        topic: &str,
        queue_id: u32,
        offset: u64,
    ) -> Result<()> {
        self.put(
            CONSUMER_OFFSETS_TREE,
            &queue_key(group, topic, queue_id),
            &offset.to_le_bytes(),
        )
    }

    /// A consumer group's consumer offset for one queue, if one was saved.
    ///
    /// # Errors
    /// [`Error::Meta`]; [`Error::InvalidRecord`] for a malformed stored value.
    pub fn consumer_offset(&self, group: &str, topic: &str, queue_id: u32) -> Result<Option<u64>> {
        match self.get(CONSUMER_OFFSETS_TREE, &queue_key(group, topic, queue_id))? {
            None => Ok(None),
            Some(v) => v
                .try_into()
                .map(|a: [u8; 8]| Some(u64::from_le_bytes(a)))
                .map_err(|_| Error::InvalidRecord("consumer offset is not 8 bytes".into())),
        }
    }

    /// Flushes sled to disk.
    ///
    /// # Errors
    /// [`Error::Meta`].
    pub fn flush(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }
}

/// The key of one (consumer group, topic, queue id) in keyed metadata:
/// `group \0 topic \0 queue_id (u32 big-endian)`. Names cannot contain NUL.
pub fn queue_key(group: &str, topic: &str, queue_id: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(group.len() + topic.len() + 6);
    k.extend_from_slice(group.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&queue_id.to_be_bytes());
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_round_trip_and_crc() {
        let cp = Checkpoint {
            log_offset: 1234,
            queues: vec![("a".into(), 0, 5), ("bb".into(), 3, 9)],
            applied: Vec::new(),
        };
        let enc = cp.encode();
        assert_eq!(Checkpoint::decode(&enc), Some(cp.clone()));
        let with = Checkpoint {
            applied: b"entry 7".to_vec(),
            ..cp
        };
        assert_eq!(Checkpoint::decode(&with.encode()), Some(with));
        let mut bad = enc.clone();
        bad[10] ^= 1;
        assert_eq!(Checkpoint::decode(&bad), None);
        assert_eq!(Checkpoint::decode(&enc[..enc.len() - 1]), None);
    }

    #[test]
    fn consumer_offsets_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let m = Meta::open(dir.path()).unwrap();
            m.set_consumer_offset("g", "t", 2, 77).unwrap();
            m.flush().unwrap();
        }
        let m = Meta::open(dir.path()).unwrap();
        assert_eq!(m.consumer_offset("g", "t", 2).unwrap(), Some(77));
        assert_eq!(m.consumer_offset("g", "t", 1).unwrap(), None);
    }
}
