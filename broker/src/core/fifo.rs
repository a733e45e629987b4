//! Ordered delivery for FIFO consumer groups: the rule that keeps each
//! message group in send order. Pure (no I/O; `now_ms` and the message
//! group of an offset are passed in), beside one queue's [`QueueProgress`].
//!
//! In a FIFO consumer group a message group (hashed, [`group_hash`]) is
//! **busy** while one of its messages is leased. The rule:
//!
//! 1. At most one message of a message group is out (leased) at a time; no
//!    later message of a busy group is delivered to anyone in the group.
//! 2. A message passed over because its group was busy waits in the
//!    queue's redelivery set ([`QueueProgress::pass_over`]), so the
//!    consumer offset cannot pass it; later messages of other groups are
//!    still delivered (no head-of-line blocking across message groups,
//!    within `max_unacked_window`).
//! 3. A failed delivery (nack, lease expiry) waits in place too, with its
//!    reconsume times raised and a due time (the retry delay): it is the
//!    earliest message of its group, so nothing later of the group goes
//!    before it. After `max_reconsume_times` it goes to the DLQ instead
//!    (the caller's hand-off) and its group is free again.
//! 4. Waiting messages are served lowest offset first; a waiting message
//!    not yet due blocks the later ones of its group.
//!
//! Messages without a message group are delivered as in any group. The
//! busy map is memory only: it is rebuilt from the restored leases (their
//! groups read again) the first time the queue is served after start-up,
//! so a restart never frees a group whose earlier message is still out.

use std::collections::{BTreeMap, BTreeSet};

use foldhash::HashMap;

use super::delivery::{Again, Delivery, QueueProgress};

/// The hash a message group is known by: FNV-1a 64 of its UTF-8 bytes (the
/// same hash that picks its queue, see `send.rs`). Two groups with one hash
/// are ordered together, which is safe.
pub fn group_hash(group: &str) -> u64 {
    halfmq_storage::tag_hash(group)
}

/// The FIFO state of one (consumer group, topic, queue id): an index, by
/// message group, of the queue's waiting offsets (the progress's set of
/// offsets to deliver in place is the truth; this mirrors it), and the busy
/// groups. Memory only.
#[derive(Debug, Default, Clone)]
pub struct FifoGate {
    /// Message group -> the leased offset that makes it busy.
    busy: HashMap<u64, u64>,
    /// Leased offset -> its message group (`None`: no group).
    leased: HashMap<u64, Option<u64>>,
    /// Message group -> its waiting offsets, in order, with their due time.
    waiting: HashMap<u64, BTreeMap<u64, u64>>,
    /// Waiting offsets without a message group -> due time.
    ungrouped: BTreeMap<u64, u64>,
    /// (earliest waiting offset, group) of every group that is not busy
    /// and has waiting offsets: the candidates, lowest offset first.
    heads: BTreeSet<(u64, u64)>,
    /// Waiting offsets indexed (to notice ones queued behind the gate's
    /// back: crash-restored leases that expired, a snapshot at start-up).
    indexed: usize,
    /// Whether the leases restored at start-up have been looked at.
    primed: bool,
}

/// The bounds a delivery respects (from the broker's configuration).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// One past the last visible queue offset.
    pub max_visible: u64,
    /// `max_inflight_per_queue`.
    pub max_inflight: usize,
    /// `max_unacked_window`.
    pub max_window: u64,
}

impl FifoGate {
    /// Message groups busy now.
    pub fn busy_groups(&self) -> usize {
        self.busy.len()
    }

    /// When the next waiting offset that heads a free group falls due
    /// after `now_ms` (a retry's delay), if any: when to look again.
    pub fn next_due_ms(&self, now_ms: u64) -> Option<u64> {
        let grouped = self
            .heads
            .iter()
            .filter_map(|(qo, g)| self.waiting.get(g).and_then(|w| w.get(qo)));
        grouped
            .chain(self.ungrouped.values())
            .copied()
            .filter(|d| *d > now_ms)
            .min()
    }

    /// Forgets everything (an offset reset dropped the leases).
    pub fn reset(&mut self) {
        *self = FifoGate::default();
    }

    fn set_head(&mut self, g: u64) {
        if self.busy.contains_key(&g) {
            return;
        }
        if let Some(first) = self.waiting.get(&g).and_then(|w| w.keys().next()) {
            self.heads.insert((*first, g));
        }
    }

    fn clear_head(&mut self, g: u64) {
        if let Some(first) = self.waiting.get(&g).and_then(|w| w.keys().next()) {
            self.heads.remove(&(*first, g));
        }
    }

    fn add_waiting(&mut self, qo: u64, g: Option<u64>, due_ms: u64) {
        self.indexed += 1;
        match g {
            None => {
                self.ungrouped.insert(qo, due_ms);
            }
            Some(g) => {
                self.clear_head(g);
                self.waiting.entry(g).or_default().insert(qo, due_ms);
                self.set_head(g);
            }
        }
    }

    fn remove_waiting(&mut self, qo: u64, g: Option<u64>) {
        match g {
            None => {
                if self.ungrouped.remove(&qo).is_some() {
                    self.indexed -= 1;
                }
            }
            Some(g) => {
                self.clear_head(g);
                if let Some(w) = self.waiting.get_mut(&g) {
                    if w.remove(&qo).is_some() {
                        self.indexed -= 1;
                    }
                    if w.is_empty() {
                        self.waiting.remove(&g);
                    }
                }
                self.set_head(g);
            }
        }
    }

    fn take(&mut self, qo: u64, g: Option<u64>) {
        self.leased.insert(qo, g);
        if let Some(g) = g {
            self.clear_head(g);
            self.busy.insert(g, qo);
        }
    }

    fn free(&mut self, qo: u64) -> Option<Option<u64>> {
        let g = self.leased.remove(&qo)?;
        if let Some(h) = g {
            if self.busy.get(&h) == Some(&qo) {
                self.busy.remove(&h);
                self.set_head(h);
            }
        }
        Some(g)
    }

    /// Brings the gate up to date with `p` before a round of
    /// [`FifoGate::next`] (under the same lock): the first time, the
    /// groups of the restored leases are read; groups of offsets no longer
    /// out (acked, skipped, dead-lettered, or queued again after a crash)
    /// are freed; the waiting index is rebuilt when `p` queued offsets the
    /// gate did not see. `group_of(queue_offset)` reads an offset's message
    /// group hash.
    pub fn prepare(&mut self, p: &QueueProgress, mut group_of: impl FnMut(u64) -> Option<u64>) {
        if !self.primed {
            for (qo, _) in p.leases() {
                let g = group_of(qo);
                self.take(qo, g);
            }
            self.primed = true;
        }
        if self.leased.len() != p.inflight() || p.has_redelivery() {
            let gone: Vec<u64> = self
                .leased
                .keys()
                .copied()
                .filter(|qo| !p.is_leased(*qo))
                .filter(|qo| p.is_done(*qo) || p.is_waiting(*qo))
                .collect();
            for qo in gone {
                let g = self.free(qo).flatten();
                if p.is_waiting(qo) {
                    // A crash-restored lease expired: it waits again, first
                    // of its group.
                    self.add_waiting(qo, g, 0);
                }
            }
        }
        if self.indexed != p.redeliver_count() {
            let known: HashMap<u64, Option<u64>> = self
                .waiting
                .iter()
                .flat_map(|(g, w)| w.keys().map(move |qo| (*qo, Some(*g))))
                .chain(self.ungrouped.keys().map(|qo| (*qo, None)))
                .collect();
            self.waiting.clear();
            self.ungrouped.clear();
            self.heads.clear();
            self.indexed = 0;
            let all: Vec<(u64, Again)> = p.redeliveries().collect();
            for (qo, a) in all {
                let g = match known.get(&qo) {
                    Some(g) => *g,
                    None => group_of(qo),
                };
                self.add_waiting(qo, g, a.due_ms);
            }
        }
    }

    /// The next delivery of this queue under the FIFO rule, with a lease
    /// until `now_ms + invisible_ms`: the lowest waiting offset that is due
    /// and heads a free group, else the next fresh offset whose group is
    /// free (fresh offsets of busy or waiting groups are passed over on the
    /// way). Call [`FifoGate::prepare`] first in each round.
    pub fn next(
        &mut self,
        p: &mut QueueProgress,
        now_ms: u64,
        invisible_ms: u64,
        b: Bounds,
        mut group_of: impl FnMut(u64) -> Option<u64>,
    ) -> Option<Delivery> {
        if p.inflight() >= b.max_inflight {
            return None;
        }
        let grouped = self
            .heads
            .iter()
            .find(|(qo, g)| {
                self.waiting
                    .get(g)
                    .and_then(|w| w.get(qo))
                    .is_some_and(|due| *due <= now_ms)
            })
            .map(|(qo, g)| (*qo, Some(*g)));
        let single = self
            .ungrouped
            .iter()
            .find(|(_, due)| **due <= now_ms)
            .map(|(qo, _)| (*qo, None));
        let pick = match (grouped, single) {
            (Some(a), Some(b)) => Some(if a.0 < b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        if let Some((qo, g)) = pick {
            self.remove_waiting(qo, g);
            let d = p.redeliver_at(qo, now_ms, invisible_ms, b.max_inflight)?;
            self.take(qo, g);
            return Some(d);
        }
        while let Some(qo) = p.peek_fresh(b.max_visible, b.max_window) {
            let g = group_of(qo);
            if let Some(h) = g {
                if self.busy.contains_key(&h) || self.waiting.contains_key(&h) {
                    p.pass_over();
                    self.add_waiting(qo, g, 0);
                    continue;
                }
            }
            let d = p.next_delivery(
                now_ms,
                invisible_ms,
                b.max_visible,
                b.max_inflight,
                b.max_window,
            )?;
            self.take(qo, g);
            return Some(d);
        }
        None
    }

    /// Takes back delivery `d` that [`FifoGate::next`] just made (it did
    /// not fit the response): the offset waits again, as it was.
    pub fn undo(&mut self, p: &mut QueueProgress, d: &Delivery) {
        if p.release(d.queue_offset, d.lease.seq).is_err() {
            return;
        }
        let g = self.free(d.queue_offset).flatten();
        p.restore_redeliver(
            d.queue_offset,
            Again {
                reconsume_times: d.lease.reconsume_times,
                delivered_ms: u64::from(d.again),
                due_ms: 0,
            },
        );
        self.add_waiting(d.queue_offset, g, 0);
    }

    /// A delivery of `queue_offset` failed (its lease is gone: nacked or
    /// expired) and will be delivered again in place, not before `due_ms`,
    /// with `reconsume_times`; its group stays blocked until then.
    pub fn retry_in_place(
        &mut self,
        p: &mut QueueProgress,
        queue_offset: u64,
        reconsume_times: u32,
        delivered_ms: u64,
        due_ms: u64,
    ) {
        let g = self.free(queue_offset).flatten();
        if p.is_done(queue_offset) || p.is_leased(queue_offset) {
            return;
        }
        p.restore_redeliver(
            queue_offset,
            Again {
                reconsume_times,
                delivered_ms: delivered_ms.max(1),
                due_ms,
            },
        );
        self.add_waiting(queue_offset, g, due_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Queue offset -> message group: A B A C B A (0..6).
    fn groups() -> Vec<Option<u64>> {
        ["A", "B", "A", "C", "B", "A"]
            .iter()
            .map(|g| Some(group_hash(g)))
            .collect()
    }

    fn bounds() -> Bounds {
        Bounds {
            max_visible: 6,
            max_inflight: 100,
            max_window: 100,
        }
    }

    fn deliver(f: &mut FifoGate, p: &mut QueueProgress, now: u64) -> Option<Delivery> {
        let gs = groups();
        f.prepare(p, |qo| gs[qo as usize]);
        f.next(p, now, 1_000, bounds(), |qo| gs[qo as usize])
    }

    fn next(f: &mut FifoGate, p: &mut QueueProgress, now: u64) -> Option<u64> {
        deliver(f, p, now).map(|d| d.queue_offset)
    }

    fn seq_of(p: &QueueProgress, qo: u64) -> u64 {
        p.leases().find(|(q, _)| *q == qo).unwrap().1.seq
    }

    #[test]
    fn one_message_per_group_out_and_no_head_of_line_blocking() {
        let (mut f, mut p) = (FifoGate::default(), QueueProgress::starting_at(0));
        // A0, B1, (A2 passed over) C3, (B4, A5 passed over).
        assert_eq!(next(&mut f, &mut p, 0), Some(0));
        assert_eq!(next(&mut f, &mut p, 0), Some(1));
        assert_eq!(next(&mut f, &mut p, 0), Some(3));
        assert_eq!(next(&mut f, &mut p, 0), None);
        assert_eq!(f.busy_groups(), 3);
        // Acking A0 frees A: A2 next, never A5 before it.
        p.ack(0, seq_of(&p, 0)).unwrap();
        assert_eq!(next(&mut f, &mut p, 1), Some(2));
        assert_eq!(next(&mut f, &mut p, 1), None);
        p.ack(1, seq_of(&p, 1)).unwrap();
        assert_eq!(next(&mut f, &mut p, 2), Some(4));
        p.ack(2, seq_of(&p, 2)).unwrap();
        assert_eq!(next(&mut f, &mut p, 3), Some(5));
        for qo in [3, 4, 5] {
            p.ack(qo, seq_of(&p, qo)).unwrap();
        }
        assert_eq!(p.ack_offset(), 6);
        assert_eq!(next(&mut f, &mut p, 4), None);
        assert_eq!(f.busy_groups(), 0);
    }

    #[test]
    fn a_failed_message_is_retried_in_place_before_the_rest_of_its_group() {
        let (mut f, mut p) = (FifoGate::default(), QueueProgress::starting_at(0));
        assert_eq!(next(&mut f, &mut p, 0), Some(0)); // A0
        assert_eq!(next(&mut f, &mut p, 0), Some(1)); // B1
                                                      // A0's lease expires at 1,000: retried in place, due at 1,500.
        let expired = p.take_expired(1_000, 10);
        assert_eq!(expired.len(), 2);
        for (qo, l) in expired {
            f.retry_in_place(&mut p, qo, l.reconsume_times + 1, l.delivered_ms, 1_500);
        }
        // Not due: A and B wait; C3 goes; A2, B4, A5 are passed over.
        assert_eq!(next(&mut f, &mut p, 1_100), Some(3));
        assert_eq!(next(&mut f, &mut p, 1_100), None);
        // The long poll wakes when they fall due.
        assert_eq!(f.next_due_ms(1_100), Some(1_500));
        // Due: A0 again (reconsume 1) before A2, B1 before B4.
        let d = deliver(&mut f, &mut p, 1_500).unwrap();
        assert_eq!(
            (d.queue_offset, d.lease.reconsume_times, d.again),
            (0, 1, true)
        );
        assert_eq!(next(&mut f, &mut p, 1_500), Some(1));
        assert_eq!(next(&mut f, &mut p, 1_500), None);
        // A0 acked: A2 (a passed-over message, first delivery).
        p.ack(0, seq_of(&p, 0)).unwrap();
        let d = deliver(&mut f, &mut p, 1_600).unwrap();
        assert_eq!(
            (d.queue_offset, d.lease.reconsume_times, d.again),
            (2, 0, false)
        );
    }

    #[test]
    fn a_dead_lettered_message_releases_its_group() {
        let (mut f, mut p) = (FifoGate::default(), QueueProgress::starting_at(0));
        assert_eq!(next(&mut f, &mut p, 0), Some(0)); // A0
        let l = p.release(0, seq_of(&p, 0)).unwrap();
        assert_eq!(l.reconsume_times, 0);
        // The hand-off moved it to the DLQ: the offset is done.
        p.skip(0);
        assert_eq!(next(&mut f, &mut p, 1), Some(1)); // B1
        assert_eq!(next(&mut f, &mut p, 1), Some(2)); // A2: A is free again
    }

    #[test]
    fn after_a_restart_restored_leases_keep_their_groups_busy() {
        let (mut f, mut p) = (FifoGate::default(), QueueProgress::starting_at(0));
        assert_eq!(next(&mut f, &mut p, 0), Some(0)); // A0
        assert_eq!(next(&mut f, &mut p, 0), Some(1)); // B1
        assert_eq!(next(&mut f, &mut p, 0), Some(3)); // C3, A2 passed over
                                                      // A snapshot round trip: the progress is restored, the gate is new.
        let mut q = QueueProgress::starting_at(0);
        for (qo, l) in p.leases() {
            q.restore_lease(qo, l);
        }
        for (qo, a) in p.redeliveries() {
            q.restore_redeliver(qo, a);
        }
        q.after_unclean_stop();
        let mut f = FifoGate::default();
        // A0, B1, C3 are still out: nothing of A, B or C may go.
        assert_eq!(next(&mut f, &mut q, 10), None);
        // A0's restored lease expires: it is delivered again, in place,
        // before A2.
        assert!(q.take_expired(1_000, 10).is_empty());
        let d = deliver(&mut f, &mut q, 1_000).unwrap();
        assert_eq!(d.queue_offset, 0);
    }
}
