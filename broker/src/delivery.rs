//! Delivery bookkeeping for one consumer group on one queue: a pure state
//! machine, driven by events and the caller's `now_ms`, with no I/O.
//!
//! ```text
//!   queue offsets:  0 ........ ack_offset ......................... next_offset .... max visible
//!                   all acked  | leased (in flight) / acked / ready  | never delivered
//! ```
//!
//! - `ack_offset` is the group's **consumer offset**: every queue offset below
//!   it is acked (or filtered out). It only moves forward.
//! - Offsets in `[ack_offset, next_offset)` were delivered at least once; each
//!   is either acked (in `acked`) or leased (in `leases`) with an
//!   **invisible** deadline. A lease whose deadline passes (the consumer
//!   neither acked nor extended it) is taken out by
//!   [`QueueProgress::take_expired`]: the broker schedules a retry for it
//!   (see `retry.rs`) and then marks the offset done with
//!   [`QueueProgress::skip`], or puts the lease back if that failed.
//! - Every lease has a sequence number; a receipt handle carries it, so a
//!   handle from before a redelivery is refused.
//!
//! Bounds: at most `max_inflight` leases, and the window `next_offset -
//! ack_offset` at most `max_window`: fresh offsets are not handed out beyond
//! either (a message that keeps failing holds the window; the retry/DLQ work
//! moves such messages out of the way).

use std::collections::{BTreeMap, BTreeSet};

/// A delivery of one queue offset to the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Broker clock (ms since the epoch) when the message becomes visible again.
    pub invisible_until_ms: u64,
    /// Failed deliveries before this one.
    pub reconsume_times: u32,
    /// Sequence number of this lease; receipt handles carry it.
    pub seq: u64,
    /// Broker clock when this delivery was made, ms.
    pub delivered_ms: u64,
}

/// Why an ack, nack or change of invisible duration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseError {
    /// The offset is not leased under that sequence number: already acked,
    /// or redelivered since (the handle is stale).
    NotFound,
}

/// The state of one (consumer group, topic, queue id).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueProgress {
    ack_offset: u64,
    next_offset: u64,
    leases: BTreeMap<u64, Lease>,
    /// (invisible_until_ms, queue offset) of every lease: expiry order.
    deadlines: BTreeSet<(u64, u64)>,
    acked: BTreeSet<u64>,
    next_seq: u64,
}

/// A delivery decided by [`QueueProgress::next_delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The queue offset to deliver.
    pub queue_offset: u64,
    /// The lease taken for it.
    pub lease: Lease,
}

impl QueueProgress {
    /// A fresh progress starting at consumer offset `start`.
    pub fn starting_at(start: u64) -> Self {
        QueueProgress {
            ack_offset: start,
            next_offset: start,
            ..Self::default()
        }
    }

    /// The consumer offset: every queue offset below it is acked.
    pub fn ack_offset(&self) -> u64 {
        self.ack_offset
    }

    /// The next queue offset never delivered.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// Leases outstanding (messages in flight, including expired ones not
    /// yet redelivered).
    pub fn inflight(&self) -> usize {
        self.leases.len()
    }

    /// Acked offsets at or above the consumer offset.
    pub fn acked_count(&self) -> usize {
        self.acked.len()
    }

    /// The earliest lease deadline, if any (when to look again).
    pub fn next_deadline_ms(&self) -> Option<u64> {
        self.deadlines.iter().next().map(|(d, _)| *d)
    }

    /// Moves the start forward when retention removed offsets below it.
    pub fn skip_to(&mut self, min: u64) {
        if self.ack_offset < min {
            self.ack_offset = min;
            self.next_offset = self.next_offset.max(min);
            let stale: Vec<u64> = self.leases.range(..min).map(|(q, _)| *q).collect();
            for q in stale {
                self.remove_lease(q);
            }
            self.acked = self.acked.split_off(&min);
        }
    }

    /// Decides the next delivery: the next fresh offset below `max_visible`
    /// if the bounds allow. Takes a lease until `now_ms + invisible_ms`.
    pub fn next_delivery(
        &mut self,
        now_ms: u64,
        invisible_ms: u64,
        max_visible: u64,
        max_inflight: usize,
        max_window: u64,
    ) -> Option<Delivery> {
        if self.next_offset < max_visible
            && self.leases.len() < max_inflight
            && self.next_offset - self.ack_offset < max_window
        {
            let qo = self.next_offset;
            self.next_offset += 1;
            let lease = self.take_lease(qo, now_ms + invisible_ms, 0, now_ms);
            return Some(Delivery {
                queue_offset: qo,
                lease,
            });
        }
        None
    }

    /// Removes and returns up to `max` leases whose invisible deadline is at
    /// or before `now_ms`, oldest deadline first. The offsets stay unacked:
    /// call [`QueueProgress::skip`] once their retry is scheduled, or
    /// [`QueueProgress::restore_lease`] if that failed.
    pub fn take_expired(&mut self, now_ms: u64, max: usize) -> Vec<(u64, Lease)> {
        let due: Vec<(u64, u64)> = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now_ms)
            .take(max)
            .copied()
            .collect();
        due.into_iter()
            .filter_map(|(_, qo)| self.remove_lease(qo).map(|l| (qo, l)))
            .collect()
    }

    /// Removes the lease `seq` of `queue_offset` without acking it (a nack:
    /// the caller schedules the retry, then skips or restores).
    ///
    /// # Errors
    /// [`LeaseError::NotFound`] for a stale or unknown lease.
    pub fn release(&mut self, queue_offset: u64, seq: u64) -> Result<Lease, LeaseError> {
        match self.leases.get(&queue_offset) {
            Some(l) if l.seq == seq => Ok(self.remove_lease(queue_offset).expect("checked above")), // invariant: matched just above
            _ => Err(LeaseError::NotFound),
        }
    }

    /// Restores a lease (from a snapshot at start-up).
    pub fn restore_lease(&mut self, queue_offset: u64, lease: Lease) {
        if queue_offset < self.ack_offset || self.acked.contains(&queue_offset) {
            return;
        }
        self.next_offset = self.next_offset.max(queue_offset + 1);
        self.take_lease(
            queue_offset,
            lease.invisible_until_ms,
            lease.reconsume_times,
            lease.delivered_ms,
        );
    }

    /// Restores an acked offset (from a snapshot at start-up).
    pub fn restore_acked(&mut self, queue_offset: u64) {
        if queue_offset >= self.ack_offset && !self.leases.contains_key(&queue_offset) {
            self.next_offset = self.next_offset.max(queue_offset + 1);
            self.acked.insert(queue_offset);
            self.advance();
        }
    }

    /// Acks the lease `seq` of `queue_offset`.
    ///
    /// # Errors
    /// [`LeaseError::NotFound`] for a stale or unknown lease.
    pub fn ack(&mut self, queue_offset: u64, seq: u64) -> Result<(), LeaseError> {
        match self.leases.get(&queue_offset) {
            Some(l) if l.seq == seq => {
                self.remove_lease(queue_offset);
                self.acked.insert(queue_offset);
                self.advance();
                Ok(())
            }
            _ => Err(LeaseError::NotFound),
        }
    }

    /// Marks a delivered offset as done without a consumer ack (filtered out
    /// by tag, or unreadable and reported).
    pub fn skip(&mut self, queue_offset: u64) {
        if queue_offset >= self.ack_offset {
            self.remove_lease(queue_offset);
            self.acked.insert(queue_offset);
            self.advance();
        }
    }

    /// Sets the lease's deadline to `now_ms + invisible_ms`; returns the new
    /// lease (with a new sequence number).
    ///
    /// # Errors
    /// [`LeaseError::NotFound`] for a stale or unknown lease.
    pub fn change_invisible(
        &mut self,
        queue_offset: u64,
        seq: u64,
        now_ms: u64,
        invisible_ms: u64,
    ) -> Result<Lease, LeaseError> {
        match self.leases.get(&queue_offset) {
            Some(l) if l.seq == seq => {
                let old = self.remove_lease(queue_offset).expect("checked above"); // invariant: matched just above
                Ok(self.take_lease(
                    queue_offset,
                    now_ms + invisible_ms,
                    old.reconsume_times,
                    old.delivered_ms,
                ))
            }
            _ => Err(LeaseError::NotFound),
        }
    }

    /// Sets the reconsume times of the lease on `queue_offset` (a retry
    /// delivery carries the count of its retry record).
    pub fn set_reconsume_times(&mut self, queue_offset: u64, reconsume_times: u32) {
        if let Some(l) = self.leases.get_mut(&queue_offset) {
            l.reconsume_times = reconsume_times;
        }
    }

    /// Whether `queue_offset` is acked or skipped.
    pub fn is_done(&self, queue_offset: u64) -> bool {
        queue_offset < self.ack_offset || self.acked.contains(&queue_offset)
    }

    /// Every lease, for snapshots: (queue offset, lease).
    pub fn leases(&self) -> impl Iterator<Item = (u64, Lease)> + '_ {
        self.leases.iter().map(|(q, l)| (*q, *l))
    }

    /// Every acked offset at or above the consumer offset, for snapshots.
    pub fn acked(&self) -> impl Iterator<Item = u64> + '_ {
        self.acked.iter().copied()
    }

    fn take_lease(
        &mut self,
        qo: u64,
        invisible_until_ms: u64,
        reconsume_times: u32,
        delivered_ms: u64,
    ) -> Lease {
        self.next_seq += 1;
        let lease = Lease {
            invisible_until_ms,
            reconsume_times,
            seq: self.next_seq,
            delivered_ms,
        };
        self.leases.insert(qo, lease);
        self.deadlines.insert((invisible_until_ms, qo));
        lease
    }

    fn remove_lease(&mut self, qo: u64) -> Option<Lease> {
        let l = self.leases.remove(&qo)?;
        self.deadlines.remove(&(l.invisible_until_ms, qo));
        Some(l)
    }

    fn advance(&mut self) {
        while self.acked.remove(&self.ack_offset) {
            self.ack_offset += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INF: usize = usize::MAX;
    const WIN: u64 = u64::MAX;

    #[test]
    fn fresh_deliveries_then_ack_advances_consumer_offset() {
        let mut p = QueueProgress::starting_at(0);
        let d0 = p.next_delivery(0, 100, 3, INF, WIN).unwrap();
        let d1 = p.next_delivery(0, 100, 3, INF, WIN).unwrap();
        let d2 = p.next_delivery(0, 100, 3, INF, WIN).unwrap();
        assert_eq!(
            (d0.queue_offset, d1.queue_offset, d2.queue_offset),
            (0, 1, 2)
        );
        assert_eq!(
            p.next_delivery(0, 100, 3, INF, WIN),
            None,
            "nothing more visible"
        );
        p.ack(1, d1.lease.seq).unwrap();
        assert_eq!(p.ack_offset(), 0, "offset 0 still in flight");
        p.ack(0, d0.lease.seq).unwrap();
        assert_eq!(p.ack_offset(), 2);
        assert_eq!(
            p.ack(0, d0.lease.seq),
            Err(LeaseError::NotFound),
            "double ack"
        );
    }

    #[test]
    fn expired_leases_are_taken_out_for_retry() {
        let mut p = QueueProgress::starting_at(5);
        let d = p.next_delivery(1_000, 100, 7, INF, WIN).unwrap();
        let e = p.next_delivery(1_050, 100, 7, INF, WIN).unwrap();
        assert!(p.take_expired(1_099, 10).is_empty(), "still invisible");
        let x = p.take_expired(1_100, 10);
        assert_eq!(x, vec![(5, d.lease)]);
        assert_eq!(
            p.ack(5, d.lease.seq),
            Err(LeaseError::NotFound),
            "handed off"
        );
        assert_eq!(p.ack_offset(), 5, "not acked until the retry is scheduled");
        p.skip(5);
        assert_eq!(p.ack_offset(), 6);
        // A failed hand-off puts the lease back.
        let y = p.take_expired(2_000, 10);
        assert_eq!(y, vec![(6, e.lease)]);
        p.restore_lease(6, e.lease);
        assert_eq!(p.inflight(), 1);
        assert_eq!(
            p.next_delivery(2_000, 100, 7, INF, WIN),
            None,
            "nothing fresh, nothing re-leased in place"
        );
    }

    #[test]
    fn change_invisible_extends_and_release_hands_off() {
        let mut p = QueueProgress::starting_at(0);
        let d = p.next_delivery(0, 100, 1, INF, WIN).unwrap();
        let l = p.change_invisible(0, d.lease.seq, 50, 1_000).unwrap();
        assert_eq!(l.invisible_until_ms, 1_050);
        assert!(p.take_expired(500, 10).is_empty());
        assert_eq!(
            p.release(0, d.lease.seq),
            Err(LeaseError::NotFound),
            "old seq is stale"
        );
        let r = p.release(0, l.seq).unwrap();
        assert_eq!(r.delivered_ms, 0);
        p.skip(0);
        assert_eq!(p.ack_offset(), 1);
    }

    #[test]
    fn bounds_on_inflight_and_window() {
        let mut p = QueueProgress::starting_at(0);
        assert!(p.next_delivery(0, 10, 100, 2, WIN).is_some());
        assert!(p.next_delivery(0, 10, 100, 2, WIN).is_some());
        assert_eq!(p.next_delivery(0, 10, 100, 2, WIN), None, "max in flight");
        let mut p = QueueProgress::starting_at(0);
        let d = p.next_delivery(0, 10, 100, INF, 2).unwrap();
        let e = p.next_delivery(0, 10, 100, INF, 2).unwrap();
        p.ack(e.queue_offset, e.lease.seq).unwrap();
        assert_eq!(
            p.next_delivery(0, 10, 100, INF, 2),
            None,
            "window held by offset 0"
        );
        p.ack(d.queue_offset, d.lease.seq).unwrap();
        assert!(p.next_delivery(0, 10, 100, INF, 2).is_some());
    }

    #[test]
    fn skip_and_retention() {
        let mut p = QueueProgress::starting_at(0);
        let d = p.next_delivery(0, 10, 10, INF, WIN).unwrap();
        p.skip(d.queue_offset);
        assert_eq!(p.ack_offset(), 1);
        p.next_delivery(0, 10, 10, INF, WIN).unwrap();
        p.skip_to(5);
        assert_eq!((p.ack_offset(), p.next_offset(), p.inflight()), (5, 5, 0));
    }

    #[test]
    fn snapshot_restore() {
        let mut p = QueueProgress::starting_at(10);
        p.restore_acked(11);
        let lease = Lease {
            invisible_until_ms: 500,
            reconsume_times: 2,
            seq: 1,
            delivered_ms: 400,
        };
        p.restore_lease(10, lease);
        p.restore_acked(10); // ignored: leased
        assert_eq!((p.ack_offset(), p.next_offset(), p.inflight()), (10, 12, 1));
        let x = p.take_expired(500, 10);
        assert_eq!(x.len(), 1);
        assert_eq!(
            (x[0].0, x[0].1.reconsume_times, x[0].1.delivered_ms),
            (10, 2, 400)
        );
    }
}
