//! The index of replicated entries: entry index → (term, physical offset,
//! size) of the entry's bytes in the commit log.
//!
//! A replicated log entry (one Raft entry) is a contiguous byte range of the
//! commit log that starts with an **entry marker** record
//! ([`RecordKind::EntryMarker`]: `queue_offset` = entry index, `ref_offset` =
//! term, `ref_size` = bytes of the whole entry, marker included, `queue_id` =
//! [`EntryKind`]), followed by the entry's records. The index is derived data,
//! like a consume queue: rows are written without fdatasync, and at open
//! [`EntryIndex::reconcile`] cuts rows past the recovered log and adds the
//! rows of markers found after the last one, so a crash loses nothing the
//! commit log kept.
//!
//! # File (`<dir>/index`, little-endian)
//!
//! ```text
//!  header (40 bytes): magic "HMQIDX01" | purged index u64 | purged term u64 |
//!                     purged end u64 (physical offset one past the last purged
//!                     entry) | has_purged u32 | crc32 u32 of the 36 bytes before it
//!  rows (32 bytes):   index u64 | term u64 | physical offset u64 | size u32 |
//!                     crc32 u32 of the 28 bytes before it
//! ```
//!
//! Rows are consecutive by index. Purging rewrites the file (temporary file,
//! fdatasync, rename, directory fsync) without the purged rows.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::record::{Record, RecordKind};

const MAGIC: &[u8; 8] = b"HMQIDX01";
const HEADER_BYTES: u64 = 40;
const ROW_BYTES: u64 = 32;

/// What an entry carries, in its marker's `queue_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// No payload (a new leader's first entry).
    Blank,
    /// Records of the broker.
    Normal,
    /// A membership change; the marker's body holds it, serialized by the
    /// caller.
    Membership,
}

impl EntryKind {
    /// The marker's `queue_id` for this kind.
    pub fn as_u32(self) -> u32 {
        match self {
            EntryKind::Blank => 0,
            EntryKind::Normal => 1,
            EntryKind::Membership => 2,
        }
    }

    /// The kind of a marker's `queue_id`, if known.
    pub fn from_u32(v: u32) -> Option<EntryKind> {
        match v {
            0 => Some(EntryKind::Blank),
            1 => Some(EntryKind::Normal),
            2 => Some(EntryKind::Membership),
            _ => None,
        }
    }
}

/// Where one entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPos {
    /// Entry index (1-based in Raft, but any u64 is kept).
    pub index: u64,
    /// Term of the leader that created it.
    pub term: u64,
    /// Physical offset of its marker.
    pub offset: u64,
    /// Bytes of the whole entry, marker included.
    pub size: u32,
}

impl EntryPos {
    /// Physical offset one past the entry's last byte.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.size)
    }
}

/// The marker record of an entry of `kind` at (`index`, `term`) whose
/// records take `payload_bytes` bytes; `body` is the membership for
/// [`EntryKind::Membership`], else empty.
///
/// # Errors
/// [`Error::InvalidRecord`] when the entry would exceed `u32::MAX` bytes.
pub fn entry_marker(
    kind: EntryKind,
    index: u64,
    term: u64,
    payload_bytes: usize,
    body: Bytes,
) -> Result<Record> {
    let mut marker = Record {
        kind: RecordKind::EntryMarker,
        queue_id: kind.as_u32(),
        queue_offset: Some(index),
        ref_offset: Some(term),
        body,
        ..Record::default()
    };
    let total = marker.encoded_len() + payload_bytes;
    marker.ref_size = u32::try_from(total)
        .map_err(|_| Error::InvalidRecord(format!("an entry of {total} bytes exceeds 4 GiB")))?;
    Ok(marker)
}

/// The position an entry marker record at `offset` names, if it is one.
pub fn marker_pos(offset: u64, rec: &Record) -> Option<EntryPos> {
    if rec.kind != RecordKind::EntryMarker {
        return None;
    }
    Some(EntryPos {
        index: rec.queue_offset?,
        term: rec.ref_offset?,
        offset,
        size: rec.ref_size,
    })
}

/// The entry index; see the module docs. Rows are held in memory (32 bytes
/// each) and in the file.
#[derive(Debug)]
pub struct EntryIndex {
    path: PathBuf,
    file: File,
    /// (index, term, end) of the last purged entry.
    purged: Option<(u64, u64, u64)>,
    rows: Vec<EntryPos>,
}

/// Whether the last 4 bytes of `buf` are the CRC of the rest.
fn crc_ok(buf: &[u8]) -> bool {
    let (data, crc) = buf.split_at(buf.len() - 4);
    crc32fast::hash(data).to_le_bytes() == crc[..4]
}

fn encode_row(p: &EntryPos) -> [u8; ROW_BYTES as usize] {
    let mut b = [0u8; ROW_BYTES as usize];
    b[0..8].copy_from_slice(&p.index.to_le_bytes());
    b[8..16].copy_from_slice(&p.term.to_le_bytes());
    b[16..24].copy_from_slice(&p.offset.to_le_bytes());
    b[24..28].copy_from_slice(&p.size.to_le_bytes());
    let crc = crc32fast::hash(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

fn encode_header(purged: Option<(u64, u64, u64)>) -> [u8; HEADER_BYTES as usize] {
    let mut b = [0u8; HEADER_BYTES as usize];
    b[0..8].copy_from_slice(MAGIC);
    let (i, t, e) = purged.unwrap_or((0, 0, 0));
    b[8..16].copy_from_slice(&i.to_le_bytes());
    b[16..24].copy_from_slice(&t.to_le_bytes());
    b[24..32].copy_from_slice(&e.to_le_bytes());
    b[32..36].copy_from_slice(&u32::from(purged.is_some()).to_le_bytes());
    let crc = crc32fast::hash(&b[..36]);
    b[36..40].copy_from_slice(&crc.to_le_bytes());
    b
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

impl EntryIndex {
    /// Opens (or creates) the index in `dir`. A torn or damaged row ends the
    /// rows read (the rest is rebuilt by [`EntryIndex::reconcile`]).
    ///
    /// # Errors
    /// I/O errors; [`Error::Corrupt`] when the header is damaged (the purge
    /// point cannot be guessed; an operator must look).
    pub fn open(dir: &Path) -> Result<EntryIndex> {
        fs::create_dir_all(dir).map_err(|e| Error::io("create dir", dir, e))?;
        let path = dir.join("index");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open entry index", &path, e))?;
        let data = fs::read(&path).map_err(|e| Error::io("read entry index", &path, e))?;
        let mut idx = EntryIndex {
            path,
            file,
            purged: None,
            rows: Vec::new(),
        };
        if data.is_empty() {
            idx.rewrite()?;
            return Ok(idx);
        }
        let header = data.get(..HEADER_BYTES as usize);
        let Some(header) = header.filter(|h| &h[..8] == MAGIC && crc_ok(h)) else {
            return Err(Error::Corrupt {
                offset: 0,
                reason: format!("entry index {} has a damaged header", idx.path.display()),
            });
        };
        if u32_at(header, 32) != 0 {
            idx.purged = Some((u64_at(header, 8), u64_at(header, 16), u64_at(header, 24)));
        }
        let mut expect = idx.purged.and_then(|(i, _, _)| i.checked_add(1));
        for row in data[HEADER_BYTES as usize..].chunks_exact(ROW_BYTES as usize) {
            if !crc_ok(row) {
                break;
            }
            let p = EntryPos {
                index: u64_at(row, 0),
                term: u64_at(row, 8),
                offset: u64_at(row, 16),
                size: u32_at(row, 24),
            };
            if expect.is_some_and(|e| e != p.index) {
                break;
            }
            expect = p.index.checked_add(1);
            idx.rows.push(p);
        }
        let keep = HEADER_BYTES + idx.rows.len() as u64 * ROW_BYTES;
        if keep != data.len() as u64 {
            idx.file
                .set_len(keep)
                .map_err(|e| Error::io("truncate entry index", &idx.path, e))?;
        }
        Ok(idx)
    }

    /// Brings the rows in line with the recovered commit log: rows whose
    /// entry does not end inside `[min_offset, log_end]` are cut (with
    /// everything after them), and `markers` (entry markers the recovery scan
    /// met, in log order) add the rows that follow the last one kept.
    /// Returns how many rows were cut and added.
    ///
    /// # Errors
    /// I/O errors writing the file.
    pub fn reconcile(
        &mut self,
        min_offset: u64,
        log_end: u64,
        markers: &[EntryPos],
    ) -> Result<(usize, usize)> {
        let valid = self
            .rows
            .iter()
            .position(|p| p.offset < min_offset || p.end() > log_end)
            .unwrap_or(self.rows.len());
        let cut = self.rows.len() - valid;
        if cut > 0 {
            let index = self.rows[valid].index;
            self.truncate_from(index)?;
        }
        let mut added = 0;
        for m in markers {
            if m.end() > log_end {
                break;
            }
            let next = self.next_index();
            let follows = m.offset == self.end() || (self.rows.is_empty() && self.purged.is_none());
            if follows && next.is_none_or(|n| n == m.index) {
                self.append(*m)?;
                added += 1;
            }
        }
        Ok((cut, added))
    }

    /// The index the next row must have, when known (after a row or a purge).
    fn next_index(&self) -> Option<u64> {
        match self.rows.last() {
            Some(l) => Some(l.index + 1),
            None => self.purged.map(|(i, _, _)| i + 1),
        }
    }

    /// Physical offset one past the last entry held or purged; 0 for an
    /// index that never had one.
    pub fn end(&self) -> u64 {
        match self.rows.last() {
            Some(l) => l.end(),
            None => self.purged.map_or(0, |(_, _, e)| e),
        }
    }

    /// Adds the row of the entry following the last one.
    ///
    /// # Errors
    /// [`Error::InvalidRecord`] when `pos` does not follow the last row (its
    /// index, or its offset before the last entry's end); I/O errors.
    pub fn append(&mut self, pos: EntryPos) -> Result<()> {
        if let Some(n) = self.next_index() {
            if pos.index != n {
                return Err(Error::InvalidRecord(format!(
                    "entry {} does not follow entry {}",
                    pos.index,
                    n.wrapping_sub(1)
                )));
            }
        }
        if pos.offset != self.end() && !(self.rows.is_empty() && self.purged.is_none()) {
            return Err(Error::InvalidRecord(format!(
                "entry {} at offset {} does not start where the last entry ends ({})",
                pos.index,
                pos.offset,
                self.end()
            )));
        }
        let at = HEADER_BYTES + self.rows.len() as u64 * ROW_BYTES;
        self.file
            .write_all_at(&encode_row(&pos), at)
            .map_err(|e| Error::io("write entry index", &self.path, e))?;
        self.rows.push(pos);
        Ok(())
    }

    /// Removes the rows of `index` and after.
    ///
    /// # Errors
    /// I/O errors.
    pub fn truncate_from(&mut self, index: u64) -> Result<()> {
        let keep = self.rows.partition_point(|p| p.index < index);
        if keep == self.rows.len() {
            return Ok(());
        }
        self.rows.truncate(keep);
        self.file
            .set_len(HEADER_BYTES + keep as u64 * ROW_BYTES)
            .map_err(|e| Error::io("truncate entry index", &self.path, e))
    }

    /// Records that entries up to `(index, term)` are purged and drops their
    /// rows (rewriting the file). `end` is where the purged entry ends in the
    /// log, used when no row is left: the entry's row when held, else the
    /// caller's (e.g. a snapshot's) value.
    ///
    /// # Errors
    /// I/O errors.
    pub fn purge(&mut self, index: u64, term: u64, end: u64) -> Result<()> {
        if self.purged.is_some_and(|(i, _, _)| i >= index) {
            return Ok(());
        }
        let end = self.get(index).map_or(end, |p| p.end());
        let drop_n = self.rows.partition_point(|p| p.index <= index);
        self.rows.drain(..drop_n);
        self.purged = Some((index, term, end));
        self.rewrite()
    }

    fn rewrite(&mut self) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut buf =
            Vec::with_capacity((HEADER_BYTES + self.rows.len() as u64 * ROW_BYTES) as usize);
        buf.extend_from_slice(&encode_header(self.purged));
        for r in &self.rows {
            buf.extend_from_slice(&encode_row(r));
        }
        let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(&buf).map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
        fs::rename(&tmp, &self.path).map_err(|e| Error::io("rename", &self.path, e))?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| Error::io("fsync dir", dir, e))?;
        }
        self.file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| Error::io("open entry index", &self.path, e))?;
        Ok(())
    }

    /// Fdatasyncs the rows written so far (at checkpoints).
    ///
    /// # Errors
    /// I/O errors.
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync entry index", &self.path, e))
    }

    /// The row of `index`, if held.
    pub fn get(&self, index: u64) -> Option<EntryPos> {
        let first = self.rows.first()?.index;
        let i = usize::try_from(index.checked_sub(first)?).ok()?;
        self.rows.get(i).copied()
    }

    /// The rows of `[from, to)` that are held.
    pub fn range(&self, from: u64, to: u64) -> &[EntryPos] {
        let a = self.rows.partition_point(|p| p.index < from);
        let b = self.rows.partition_point(|p| p.index < to);
        &self.rows[a..b.max(a)]
    }

    /// The last row.
    pub fn last(&self) -> Option<EntryPos> {
        self.rows.last().copied()
    }

    /// The first row.
    pub fn first(&self) -> Option<EntryPos> {
        self.rows.first().copied()
    }

    /// Physical offset one past the last purged entry (0 when none).
    pub fn end_of_purged(&self) -> u64 {
        self.purged.map_or(0, |(_, _, e)| e)
    }

    /// `(index, term)` of the last purged entry.
    pub fn purged(&self) -> Option<(u64, u64)> {
        self.purged.map(|(i, t, _)| (i, t))
    }

    /// Number of rows held.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// A small file replaced atomically (temporary file, fdatasync, rename,
/// directory fsync) holding `crc32 | bytes`, e.g. a Raft vote.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// The state file at `path`.
    pub fn new(path: impl Into<PathBuf>) -> StateFile {
        StateFile { path: path.into() }
    }

    /// The bytes last saved, `None` when never saved.
    ///
    /// # Errors
    /// I/O errors; [`Error::Corrupt`] when the checksum does not match (a
    /// vote must not be guessed).
    pub fn load(&self) -> Result<Option<Vec<u8>>> {
        let data = match fs::read(&self.path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", &self.path, e)),
        };
        if data.len() < 4 || crc32fast::hash(&data[4..]).to_le_bytes() != data[..4] {
            return Err(Error::Corrupt {
                offset: 0,
                reason: format!("state file {} fails its checksum", self.path.display()),
            });
        }
        Ok(Some(data[4..].to_vec()))
    }

    /// Replaces the saved bytes durably.
    ///
    /// # Errors
    /// I/O errors.
    pub fn save(&self, bytes: &[u8]) -> Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut buf = Vec::with_capacity(bytes.len() + 4);
        buf.extend_from_slice(&crc32fast::hash(bytes).to_le_bytes());
        buf.extend_from_slice(bytes);
        let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(&buf).map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_data().map_err(|e| Error::io("fdatasync", &tmp, e))?;
        fs::rename(&tmp, &self.path).map_err(|e| Error::io("rename", &self.path, e))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io("fsync dir", dir, e))
    }
}
