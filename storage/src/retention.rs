//! Retention policy: which sealed segments to delete. A pure function of the
//! segments, the clock and the configuration; the store does the deleting.

use crate::commitlog::SegmentInfo;

/// Chooses the segments to delete, oldest first. Only a prefix of the log is
/// ever chosen (the log must stay contiguous), never the active segment, and
/// never a segment `can_delete` refuses (e.g. one holding an unresolved half
/// message): the plan stops at the first refusal.
///
/// A segment goes when its last write is at least `retention_ms` old, or while
/// the log's total size exceeds `retention_bytes`.
pub fn plan(
    segments: &[SegmentInfo],
    now_ms: u64,
    retention_ms: u64,
    retention_bytes: u64,
    can_delete: &dyn Fn(&SegmentInfo) -> bool,
) -> Vec<u64> {
    let mut total: u64 = segments.iter().map(|s| s.end - s.base).sum();
    let mut out = Vec::new();
    for s in segments {
        if s.active {
            break;
        }
        let expired = now_ms.saturating_sub(s.modified_ms) >= retention_ms;
        let over_budget = total > retention_bytes;
        if !(expired || over_budget) || !can_delete(s) {
            break;
        }
        out.push(s.base);
        total -= s.end - s.base;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(base: u64, end: u64, modified_ms: u64, active: bool) -> SegmentInfo {
        SegmentInfo {
            base,
            end,
            modified_ms,
            active,
        }
    }

    #[test]
    fn time_budget_and_guard() {
        let segs = vec![
            seg(0, 100, 10, false),
            seg(100, 200, 20, false),
            seg(200, 300, 30, false),
            seg(300, 350, 40, true),
        ];
        // By time: segments last written at or before now - retention.
        assert_eq!(plan(&segs, 45, 25, u64::MAX, &|_| true), vec![0, 100]);
        // Never the active one, even when everything is old.
        assert_eq!(plan(&segs, 1000, 1, u64::MAX, &|_| true), vec![0, 100, 200]);
        // By size: 350 bytes in all, budget 200: drop until <= 200.
        assert_eq!(plan(&segs, 0, u64::MAX, 200, &|_| true), vec![0, 100]);
        // The guard stops the plan: nothing past a protected segment.
        assert_eq!(plan(&segs, 1000, 1, u64::MAX, &|s| s.base != 100), vec![0]);
        assert!(plan(&segs, 0, u64::MAX, u64::MAX, &|_| true).is_empty());
    }
}
