//! Sequential readers: [`LogIter`] (stops at the first error) and
//! [`LogScan`] (steps over damaged ranges).

use super::*;
/// What [`CommitLog::scan_from`] yields.
#[derive(Debug)]
pub enum ScanItem {
    /// A valid record at its physical offset.
    Record(u64, Record),
    /// A damaged range that was stepped over (nothing in it is trusted).
    Skipped(CorruptRange),
}

/// Sequential reader over the log that steps over damaged ranges; see
/// [`CommitLog::scan_from`].
///
/// After a record fails its checks, reading resumes where the record's own
/// length says it ends if a valid record starts there (a flipped bit in a
/// body or header), else at the next complete valid frame of the segment,
/// else at the next segment. Like recovery's search, a body that embeds a
/// byte-exact valid record could be taken for one there; only a damaged
/// record right before it leads the scan into a body.
pub struct LogScan<'a> {
    pub(super) log: &'a CommitLog,
    pub(super) iter: LogIter<'a>,
}

impl Iterator for LogScan<'_> {
    type Item = Result<ScanItem>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.iter.next()? {
            Ok((offset, rec)) => Some(Ok(ScanItem::Record(offset, rec))),
            Err(Error::Corrupt { offset, reason }) => match self.log.resync(offset) {
                Ok(next) => {
                    self.iter = self.log.iter_from(next);
                    Some(Ok(ScanItem::Skipped(CorruptRange {
                        start: offset,
                        end: next,
                        reason,
                    })))
                }
                Err(e) => Some(Err(e)),
            },
            Err(e) => Some(Err(e)),
        }
    }
}

/// Sequential reader over the log; see [`CommitLog::iter_from`].
pub struct LogIter<'a> {
    pub(super) log: &'a CommitLog,
    pub(super) pos: u64,
    pub(super) buf: Vec<u8>,
    pub(super) buf_start: u64,
    pub(super) failed: bool,
}

impl LogIter<'_> {
    /// Physical offset of the next record to be yielded.
    pub fn position(&self) -> u64 {
        self.pos
    }
}

impl Iterator for LogIter<'_> {
    type Item = Result<(u64, Record)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.log.written_offset() {
            return None;
        }
        let res = (|| {
            let seg = self.log.segment_for(self.pos)?;
            let limit = seg.end().min(self.log.written_offset());
            let in_buf = |it: &Self, n: usize| {
                it.pos >= it.buf_start && it.pos + n as u64 <= it.buf_start + it.buf.len() as u64
            };
            if !in_buf(self, 4) {
                self.fill(&seg, limit, 4)?;
            }
            let rel = (self.pos - self.buf_start) as usize;
            let len = peek_len(&self.buf[rel..]).unwrap_or(0);
            if len < MIN_RECORD_BYTES || self.pos + len as u64 > limit {
                return Err(Error::Corrupt {
                    offset: self.pos,
                    reason: format!("length {len} does not fit the segment"),
                });
            }
            if !in_buf(self, len) {
                self.fill(&seg, limit, len)?;
            }
            let rel = (self.pos - self.buf_start) as usize;
            let rec = Record::decode(Bytes::copy_from_slice(&self.buf[rel..rel + len]), self.pos)?;
            let at = self.pos;
            self.pos += len as u64;
            Ok((at, rec))
        })();
        if res.is_err() {
            self.failed = true;
        }
        Some(res)
    }
}

impl LogIter<'_> {
    pub(super) fn fill(&mut self, seg: &Segment, limit: u64, at_least: usize) -> Result<()> {
        let n = (at_least.max(SCAN_CHUNK_BYTES) as u64).min(limit - self.pos) as usize;
        self.buf.resize(n, 0);
        seg.read_at(self.pos, &mut self.buf)?;
        self.buf_start = self.pos;
        Ok(())
    }
}
