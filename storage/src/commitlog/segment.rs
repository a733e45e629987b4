//! Segment files, the tail cache, zero-filled space ahead of the end and the
//! free-space floor.

use super::*;
/// One segment file.
#[derive(Debug)]
pub(crate) struct Segment {
    pub(super) base: u64,
    pub(super) path: PathBuf,
    pub(super) file: File,
    /// Physical offset one past the last byte written to this segment.
    pub(super) end: AtomicU64,
}

impl Segment {
    pub(super) fn open(dir: &Path, base: u64, create: bool) -> Result<Segment> {
        let path = dir.join(segment_file_name(base));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(&path)
            .map_err(|e| Error::io("open segment", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat segment", &path, e))?
            .len();
        Ok(Segment {
            base,
            path,
            file,
            end: AtomicU64::new(base + len),
        })
    }

    pub(super) fn end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }

    pub(super) fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset - self.base)
            .map_err(|e| Error::io("read segment", &self.path, e))
    }

    pub(super) fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("fdatasync segment", &self.path, e))
    }

    /// Cuts the file to the segment's end (dropping preallocated zeros).
    pub(super) fn cut_to_end(&self) -> Result<()> {
        self.file
            .set_len(self.end() - self.base)
            .map_err(|e| Error::io("truncate segment", &self.path, e))
    }

    pub(super) fn truncate(&self, offset: u64) -> Result<()> {
        self.file
            .set_len(offset - self.base)
            .map_err(|e| Error::io("truncate segment", &self.path, e))?;
        self.end.store(offset, Ordering::Release);
        Ok(())
    }
}

/// Recently appended bytes, kept in memory for reads near the log's end
/// (see the module docs).
pub(super) struct TailCache {
    /// Most bytes kept; 0 = off.
    pub(super) limit_bytes: usize,
    /// Bytes held in `chunks`.
    pub(super) held_bytes: usize,
    /// (physical offset of the first byte, the bytes of one append), oldest
    /// first, contiguous.
    pub(super) chunks: VecDeque<(u64, Bytes)>,
}

impl TailCache {
    pub(super) fn new(limit_bytes: usize) -> TailCache {
        TailCache {
            limit_bytes,
            held_bytes: 0,
            chunks: VecDeque::new(),
        }
    }

    /// Keeps `data`, written at physical offset `start`, dropping the oldest
    /// chunks beyond the limit.
    pub(super) fn push(&mut self, start: u64, data: &[u8]) {
        if self.limit_bytes == 0 || data.is_empty() {
            return;
        }
        if let Some((s, b)) = self.chunks.back() {
            if s + b.len() as u64 != start {
                // Not contiguous with what is held (never expected): start over.
                self.chunks.clear();
                self.held_bytes = 0;
            }
        }
        self.held_bytes += data.len();
        self.chunks.push_back((start, Bytes::copy_from_slice(data)));
        while self.held_bytes > self.limit_bytes {
            match self.chunks.pop_front() {
                Some((_, b)) => self.held_bytes -= b.len(),
                None => break,
            }
        }
    }

    /// Forgets every cached byte at or past `offset` (the log was cut there).
    pub(super) fn cut(&mut self, offset: u64) {
        while let Some((s, b)) = self.chunks.back() {
            let (s, len) = (*s, b.len());
            if s >= offset {
                self.held_bytes -= len;
                self.chunks.pop_back();
            } else {
                if s + len as u64 > offset {
                    let keep = (offset - s) as usize;
                    if let Some(last) = self.chunks.back_mut() {
                        last.1.truncate(keep);
                    }
                    self.held_bytes -= len - keep;
                }
                break;
            }
        }
    }

    /// The cached bytes from `offset` to the end of the chunk holding it: a
    /// view sharing the chunk's buffer, not a copy.
    pub(super) fn from(&self, offset: u64) -> Option<Bytes> {
        let i = self.chunks.partition_point(|(s, _)| *s <= offset);
        let (s, b) = self.chunks.get(i.checked_sub(1)?)?;
        let start = usize::try_from(offset - s).ok()?;
        (start <= b.len()).then(|| b.slice(start..))
    }
}

/// The zero-filled space ahead of the active segment's end; see the module
/// docs.
pub(super) struct Prealloc {
    /// Bytes to keep ahead of the end; 0 = off.
    pub(super) step_bytes: u64,
    /// Physical offset one past the active segment file's last byte (>= its
    /// end).
    pub(super) file_end: u64,
    /// When a zero-filling write last failed (e.g. no space): no more
    /// attempts for [`Prealloc::RETRY_AFTER`], so appends do not pay for
    /// them.
    pub(super) failed_at: Option<std::time::Instant>,
    pub(super) zeros: Vec<u8>,
}

impl Prealloc {
    const RETRY_AFTER: Duration = Duration::from_secs(10);

    /// Makes sure the active segment's file reaches `upto`, zero-filling up
    /// to `step_bytes` past it (clipped to the segment's size). Failures are
    /// logged, not returned: the data write that follows extends the file
    /// itself, as it would without preallocation.
    pub(super) fn ensure(&mut self, seg: &Segment, upto: u64, segment_bytes: u64) {
        if self.step_bytes == 0 || upto <= self.file_end {
            return;
        }
        if self
            .failed_at
            .is_some_and(|t| t.elapsed() < Self::RETRY_AFTER)
        {
            return;
        }
        let limit = seg.base + segment_bytes;
        let target = upto.saturating_add(self.step_bytes).min(limit).max(upto);
        // Zeros go only past both the file's end and the data's end.
        let mut at = self.file_end.max(seg.end());
        while at < target {
            let n = ((target - at) as usize).min(ZERO_CHUNK_BYTES);
            if self.zeros.len() < n {
                self.zeros.resize(n, 0);
            }
            if let Err(e) = seg.file.write_all_at(&self.zeros[..n], at - seg.base) {
                tracing::warn!(path = %seg.path.display(), error = %e,
                    "preallocating commit-log space failed; appends extend the file instead");
                self.failed_at = Some(std::time::Instant::now());
                // The file may have grown part of the way.
                self.file_end = self.file_end.max(at);
                return;
            }
            at += n as u64;
        }
        self.file_end = target;
    }

    /// A new active segment starting at `base`, with an empty file.
    pub(super) fn reset(&mut self, base: u64) {
        self.file_end = base;
        self.failed_at = None;
    }
}

/// The free-space floor: appends are refused while the filesystem would be
/// left with less than `min_free_bytes` free, so that the metadata store and
/// the consume queues always have room (RocketMQ refuses writes past
/// diskSpaceWarningLevelRatio for the same reason).
pub(super) struct FreeSpace {
    pub(super) min_free_bytes: u64,
    /// Free bytes at the last `statvfs`.
    pub(super) free_bytes: u64,
    /// Bytes appended since then.
    pub(super) written_since: u64,
    pub(super) checked_at: Option<std::time::Instant>,
}

impl FreeSpace {
    /// How often the free space is read again when far from the floor.
    const RECHECK: Duration = Duration::from_millis(100);

    pub(super) fn check(&mut self, dir: &Path, n: u64) -> Result<()> {
        if self.min_free_bytes == 0 {
            return Ok(());
        }
        let near = self.free_bytes.saturating_sub(self.written_since)
            < self.min_free_bytes + n + (16 << 20);
        if near || self.checked_at.is_none_or(|t| t.elapsed() >= Self::RECHECK) {
            let st = rustix::fs::statvfs(dir).map_err(|e| Error::io("statvfs", dir, e.into()))?;
            self.free_bytes = st.f_bavail.saturating_mul(st.f_frsize);
            self.written_since = 0;
            self.checked_at = Some(std::time::Instant::now());
        }
        let free = self.free_bytes.saturating_sub(self.written_since);
        if free < self.min_free_bytes + n {
            return Err(Error::DiskFull {
                free_bytes: free,
                min_free_bytes: self.min_free_bytes,
            });
        }
        self.written_since += n;
        Ok(())
    }
}

pub(super) fn write_chunk(seg: &Segment, bytes: &[u8]) -> Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let end = seg.end();
    seg.file
        .write_all_at(bytes, end - seg.base)
        .map_err(|e| Error::io("write segment", &seg.path, e))?;
    seg.end.store(end + bytes.len() as u64, Ordering::Release);
    Ok(())
}

pub(super) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("fsync dir", dir, e))
}
