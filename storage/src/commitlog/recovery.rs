//! The recovery scan at open: frame checks, torn tails, preallocated zeros
//! and corrupt ranges (see the module docs of [`super`]).

use super::*;
/// Recovery scan; see the module docs.
pub(super) fn recover(
    dir: &Path,
    segments: &BTreeMap<u64, Arc<Segment>>,
    scan_from: Option<u64>,
    on_record: &mut dyn FnMut(u64, &Record),
) -> Result<RecoveryReport> {
    let (Some((&first_base, _)), Some(last)) =
        (segments.iter().next(), segments.values().next_back())
    else {
        return Err(Error::Corrupt {
            offset: 0,
            reason: format!("{} holds no segment to recover", dir.display()),
        });
    };
    let start = match scan_from {
        Some(o) if o >= first_base && o <= last.end() => o,
        Some(o) => {
            tracing::warn!(
                checkpoint = o,
                first = first_base,
                end = last.end(),
                "checkpoint outside the log; scanning the whole log"
            );
            first_base
        }
        None => first_base,
    };
    let mut report = RecoveryReport {
        scanned_from: start,
        ..RecoveryReport::default()
    };
    for seg in segments
        .range(..=start)
        .next_back()
        .into_iter()
        .chain(segments.range(start + 1..))
    {
        let seg = seg.1;
        let from = start.max(seg.base);
        let is_last = Arc::ptr_eq(seg, last);
        scan_segment(dir, seg, from, is_last, &mut report, on_record)?;
    }
    if report.truncated.is_some() || !report.corrupt.is_empty() {
        tracing::warn!(?report, "commit log recovery found damage");
    } else {
        tracing::info!(
            from = report.scanned_from,
            bytes = report.scanned_bytes,
            records = report.records,
            "commit log recovered"
        );
    }
    Ok(report)
}

pub(super) fn scan_segment(
    dir: &Path,
    seg: &Segment,
    from: u64,
    is_last: bool,
    report: &mut RecoveryReport,
    on_record: &mut dyn FnMut(u64, &Record),
) -> Result<()> {
    let end = seg.end();
    let mut pos = from;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_start = pos;
    // Reads [pos, pos + max(n, chunk)) clipped to the segment end.
    let fill = |buf: &mut Vec<u8>, buf_start: &mut u64, pos: u64, n: usize| -> Result<()> {
        let len = (n.max(SCAN_CHUNK_BYTES) as u64).min(end - pos) as usize;
        buf.resize(len, 0);
        seg.read_at(pos, buf)?;
        *buf_start = pos;
        Ok(())
    };
    let covers = |buf: &Vec<u8>, buf_start: u64, pos: u64, n: usize| {
        pos >= buf_start && pos + n as u64 <= buf_start + buf.len() as u64
    };
    while pos < end {
        if !covers(&buf, buf_start, pos, 8) {
            fill(&mut buf, &mut buf_start, pos, 8)?;
        }
        let rel = (pos - buf_start) as usize;
        if let Some(len) = peek_len(&buf[rel..]) {
            if pos + len as u64 <= end && !covers(&buf, buf_start, pos, len) {
                fill(&mut buf, &mut buf_start, pos, len)?;
            }
        }
        let rel = (pos - buf_start) as usize;
        let checked = check_frame(&buf[rel..], pos).and_then(|len| {
            Record::decode(Bytes::copy_from_slice(&buf[rel..rel + len]), pos).map(|r| (len, r))
        });
        match checked {
            Ok((len, rec)) => {
                on_record(pos, &rec);
                report.records += 1;
                report.scanned_bytes += len as u64;
                pos += len as u64;
            }
            Err(e) => {
                if is_last && zeros_to_end(seg, pos, end)? {
                    seg.end.store(pos, Ordering::Release);
                    report.preallocated_bytes = end - pos;
                    return Ok(());
                }
                return damaged(dir, seg, pos, end, is_last, e, report, on_record);
            }
        }
    }
    Ok(())
}

/// Whether every byte of `seg` in `[from, end)` is zero.
pub(super) fn zeros_to_end(seg: &Segment, from: u64, end: u64) -> Result<bool> {
    let mut buf = vec![0u8; SCAN_CHUNK_BYTES.min((end - from) as usize)];
    let mut pos = from;
    while pos < end {
        let n = buf.len().min((end - pos) as usize);
        seg.read_at(pos, &mut buf[..n])?;
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        pos += n as u64;
    }
    Ok(true)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn damaged(
    dir: &Path,
    seg: &Segment,
    bad: u64,
    end: u64,
    is_last: bool,
    err: Error,
    report: &mut RecoveryReport,
    on_record: &mut dyn FnMut(u64, &Record),
) -> Result<()> {
    let reason = err.to_string();
    let mut rest = vec![0u8; (end - bad) as usize];
    seg.read_at(bad, &mut rest)?;
    match find_next_frame(&rest[1..]) {
        Some(skip) => {
            let next = bad + 1 + skip as u64;
            tracing::error!(start = bad, end = next, %reason, "corrupt commit-log range left in place");
            report.corrupt.push(CorruptRange {
                start: bad,
                end: next,
                reason,
            });
            report.scanned_bytes += next - bad;
            scan_segment(dir, seg, next, is_last, report, on_record)
        }
        None if is_last => {
            let qdir = dir.join("quarantine");
            fs::create_dir_all(&qdir).map_err(|e| Error::io("create dir", &qdir, e))?;
            let qpath = qdir.join(format!("{}-{bad}.torn", segment_file_name(seg.base)));
            fs::write(&qpath, &rest).map_err(|e| Error::io("write quarantine", &qpath, e))?;
            File::open(&qpath)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io("fsync quarantine", &qpath, e))?;
            seg.truncate(bad)?;
            seg.sync()?;
            tracing::warn!(
                offset = bad,
                bytes = rest.len(),
                %reason,
                quarantine = %qpath.display(),
                "truncated torn commit-log tail"
            );
            report.truncated = Some((bad, rest.len() as u64, reason));
            Ok(())
        }
        None => {
            // A sealed segment was fsynced before the next one was created:
            // damage here is media corruption, not a torn write. Keep it.
            tracing::error!(start = bad, end, %reason, "corrupt end of sealed segment left in place");
            report.corrupt.push(CorruptRange {
                start: bad,
                end,
                reason,
            });
            report.scanned_bytes += end - bad;
            Ok(())
        }
    }
}

/// Finds the first position in `buf` where a complete valid record starts.
pub(super) fn find_next_frame(buf: &[u8]) -> Option<usize> {
    (0..buf.len().saturating_sub(MIN_RECORD_BYTES - 1)).find(|&i| {
        buf.get(i + 8) == Some(&MAGIC)
            && buf.get(i + 9) == Some(&VERSION)
            && check_frame(&buf[i..], 0).is_ok()
    })
}
