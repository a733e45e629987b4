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
//!   handle from before a redelivery is refused. Sequence numbers are saved
//!   with the leases, so a handle stays valid across a restart.
//! - **After a crash** the saved progress is the last checkpoint's: acks taken
//!   since were lost, so a restored lease proves nothing about its consumer.
//!   [`QueueProgress::after_unclean_stop`] flags every restored lease; when a
//!   flagged lease expires it is not a failure: the offset is queued to be
//!   delivered again in place ([`QueueProgress::next_redelivery`]) with the
//!   same reconsume times, and never moves the message towards the DLQ.
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
    /// Restored at start-up after the broker stopped without a clean
    /// shutdown: its expiry is not counted as a failed delivery (the ack may
    /// have been taken and lost with the crash).
    pub restored_after_crash: bool,
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
    /// Offsets to deliver again in place, not as a retry: flagged leases
    /// (restored after a crash) that expired.
    redeliver: BTreeMap<u64, Again>,
    next_seq: u64,
}

/// Sequence numbers skipped at start-up after an unclean stop: leases handed
/// out after the last save (at most this many between two saves) must not
/// share a number with new ones, or a stale receipt handle could ack.
pub const SEQ_GAP_AFTER_CRASH: u64 = 1 << 32;

/// An offset queued to be delivered again in place: what its expired lease
/// carried over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Again {
    /// Failed deliveries so far (unchanged by the crash).
    pub reconsume_times: u32,
    /// Broker clock of the delivery whose lease expired, ms; 0 for an
    /// offset never delivered (passed over by a FIFO consumer group, see
    /// `fifo.rs`).
    pub delivered_ms: u64,
    /// Not to be delivered before this broker clock, ms (a FIFO retry's
    /// delay; kept in memory only, 0 after a restart).
    pub due_ms: u64,
}

/// A delivery decided by [`QueueProgress::next_delivery`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// The queue offset to deliver.
    pub queue_offset: u64,
    /// The lease taken for it.
    pub lease: Lease,
    /// Delivered before (an offset queued by a crash-restored lease's
    /// expiry), not fresh.
    pub again: bool,
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

    /// Offsets waiting to be delivered again in place (see
    /// [`QueueProgress::next_redelivery`]).
    pub fn redeliver_count(&self) -> usize {
        self.redeliver.len()
    }

    /// The sequence number the next lease gets, less one (for snapshots).
    pub fn last_seq(&self) -> u64 {
        self.next_seq
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
            self.redeliver = self.redeliver.split_off(&min);
        }
    }

    /// Cuts this progress back to a queue that now holds only `len` entries
    /// (its tail was lost with the commit log's: a power loss, a damaged
    /// tail). New messages will take those offsets again, so nothing at or
    /// above `len` may count as delivered or acked. Returns whether anything
    /// changed.
    pub fn truncate_to(&mut self, len: u64) -> bool {
        if self.next_offset <= len {
            return false;
        }
        let gone: Vec<u64> = self.leases.range(len..).map(|(q, _)| *q).collect();
        for q in gone {
            self.remove_lease(q);
        }
        self.acked.split_off(&len);
        self.redeliver.split_off(&len);
        self.next_offset = len;
        self.ack_offset = self.ack_offset.min(len);
        true
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
                again: false,
            });
        }
        None
    }

    /// Decides the next delivery of an offset queued to be delivered again
    /// in place (lowest first), if the in-flight bound allows: a new lease
    /// until `now_ms + invisible_ms` with the expired lease's reconsume
    /// times. Callers serve these before [`QueueProgress::next_delivery`].
    pub fn next_redelivery(
        &mut self,
        now_ms: u64,
        invisible_ms: u64,
        max_inflight: usize,
    ) -> Option<Delivery> {
        let qo = *self.redeliver.keys().next()?;
        self.redeliver_at(qo, now_ms, invisible_ms, max_inflight)
    }

    /// The queue offset the next delivery would take, without taking it: the
    /// lowest offset queued to be delivered again in place (see
    /// [`QueueProgress::next_redelivery`]), else the next fresh one if the
    /// bounds allow ([`QueueProgress::next_delivery`]).
    pub fn peek_next(&self, max_visible: u64, max_inflight: usize, max_window: u64) -> Option<u64> {
        if self.leases.len() >= max_inflight {
            return None;
        }
        if let Some((&qo, _)) = self.redeliver.first_key_value() {
            return Some(qo);
        }
        (self.next_offset < max_visible && self.next_offset - self.ack_offset < max_window)
            .then_some(self.next_offset)
    }

    /// Whether an offset is queued to be delivered again in place.
    pub fn has_redelivery(&self) -> bool {
        !self.redeliver.is_empty()
    }

    /// Whether `queue_offset` is queued to be delivered again in place.
    pub fn is_waiting(&self, queue_offset: u64) -> bool {
        self.redeliver.contains_key(&queue_offset)
    }

    /// Whether `queue_offset` is leased now.
    pub fn is_leased(&self, queue_offset: u64) -> bool {
        self.leases.contains_key(&queue_offset)
    }

    /// The next fresh offset if it is below `max_visible` and inside the
    /// window (leases and queued redeliveries aside).
    pub fn peek_fresh(&self, max_visible: u64, max_window: u64) -> Option<u64> {
        (self.next_offset < max_visible && self.next_offset - self.ack_offset < max_window)
            .then_some(self.next_offset)
    }

    /// Passes over the next fresh offset without delivering it: it waits,
    /// queued to be delivered in place later (a FIFO consumer group holds
    /// it while an earlier message of its message group is out).
    pub fn pass_over(&mut self) -> u64 {
        let qo = self.next_offset;
        self.next_offset += 1;
        self.redeliver.insert(qo, Again::default());
        qo
    }

    /// Delivers the queued offset `queue_offset` (any of them, not only the
    /// lowest) with a lease until `now_ms + invisible_ms`, if the in-flight
    /// bound allows.
    pub fn redeliver_at(
        &mut self,
        queue_offset: u64,
        now_ms: u64,
        invisible_ms: u64,
        max_inflight: usize,
    ) -> Option<Delivery> {
        if self.leases.len() >= max_inflight {
            return None;
        }
        let old = self.redeliver.remove(&queue_offset)?;
        let lease = self.take_lease(
            queue_offset,
            now_ms + invisible_ms,
            old.reconsume_times,
            now_ms,
        );
        Some(Delivery {
            queue_offset,
            lease,
            again: old.delivered_ms > 0,
        })
    }

    /// Offsets of the window that are neither leased, acked nor queued
    /// (a snapshot saved while a failed lease was being handed to its
    /// retry) are queued to be delivered again in place, so the consumer
    /// offset can pass them. Called at start-up.
    pub fn account_for_gaps(&mut self) {
        for qo in self.ack_offset..self.next_offset {
            if !self.leases.contains_key(&qo)
                && !self.acked.contains(&qo)
                && !self.redeliver.contains_key(&qo)
            {
                // Delivered before (a failed lease being handed off), its
                // time unknown: 1 marks it as not a first delivery.
                self.redeliver.insert(
                    qo,
                    Again {
                        delivered_ms: 1,
                        ..Again::default()
                    },
                );
            }
        }
    }

    /// Removes and returns up to `max` leases whose invisible deadline is at
    /// or before `now_ms`, oldest deadline first: each is a failed delivery.
    /// The offsets stay unacked: call [`QueueProgress::skip`] once their
    /// retry is scheduled, or [`QueueProgress::restore_lease`] if that
    /// failed. An expired lease flagged `restored_after_crash` is not
    /// returned: its offset is queued for [`QueueProgress::next_redelivery`].
    pub fn take_expired(&mut self, now_ms: u64, max: usize) -> Vec<(u64, Lease)> {
        let due: Vec<(u64, u64)> = self
            .deadlines
            .iter()
            .take_while(|(d, _)| *d <= now_ms)
            .take(max)
            .copied()
            .collect();
        let mut failed = Vec::with_capacity(due.len());
        for (_, qo) in due {
            match self.remove_lease(qo) {
                Some(l) if l.restored_after_crash => {
                    self.redeliver.insert(
                        qo,
                        Again {
                            reconsume_times: l.reconsume_times,
                            delivered_ms: l.delivered_ms,
                            due_ms: 0,
                        },
                    );
                }
                Some(l) => failed.push((qo, l)),
                None => {}
            }
        }
        failed
    }

    /// Called once at start-up, after restoring a snapshot, when the broker
    /// did not stop cleanly: flags every lease `restored_after_crash` and
    /// moves the sequence numbers [`SEQ_GAP_AFTER_CRASH`] ahead.
    pub fn after_unclean_stop(&mut self) {
        for l in self.leases.values_mut() {
            l.restored_after_crash = true;
        }
        self.next_seq = self.next_seq.saturating_add(SEQ_GAP_AFTER_CRASH);
    }

    /// Removes the lease `seq` of `queue_offset` without acking it (a nack:
    /// the caller schedules the retry, then skips or restores).
    ///
    /// # Errors
    /// [`LeaseError::NotFound`] for a stale or unknown lease.
    pub fn release(&mut self, queue_offset: u64, seq: u64) -> Result<Lease, LeaseError> {
        if self.lease(queue_offset, seq).is_none() {
            return Err(LeaseError::NotFound);
        }
        self.remove_lease(queue_offset).ok_or(LeaseError::NotFound)
    }

    /// Restores a lease (from a snapshot at start-up, or after a failed
    /// retry hand-off), keeping its sequence number; seq 0 (a snapshot that
    /// saved none) takes a new one.
    pub fn restore_lease(&mut self, queue_offset: u64, lease: Lease) {
        if queue_offset < self.ack_offset || self.acked.contains(&queue_offset) {
            return;
        }
        self.next_offset = self.next_offset.max(queue_offset + 1);
        self.redeliver.remove(&queue_offset);
        // A snapshot holds one lease per offset; replacing keeps the
        // deadline index consistent whatever it holds.
        self.remove_lease(queue_offset);
        let seq = if lease.seq == 0 {
            self.next_seq += 1;
            self.next_seq
        } else {
            self.next_seq = self.next_seq.max(lease.seq);
            lease.seq
        };
        self.insert_lease(queue_offset, Lease { seq, ..lease });
    }

    /// Restores an offset queued to be delivered again in place (from a
    /// snapshot at start-up).
    pub fn restore_redeliver(&mut self, queue_offset: u64, again: Again) {
        if self.is_done(queue_offset) || self.leases.contains_key(&queue_offset) {
            return;
        }
        self.next_offset = self.next_offset.max(queue_offset + 1);
        self.redeliver.insert(queue_offset, again);
    }

    /// Moves the consumer offset to `offset` (an operator's reset): every
    /// lease, ack above the offset and queued redelivery is dropped, so their
    /// receipt handles go stale; the sequence counter is kept, so no handle
    /// is ever given out twice.
    pub fn reset_to(&mut self, offset: u64) {
        *self = QueueProgress {
            next_seq: self.next_seq,
            ..QueueProgress::starting_at(offset)
        };
    }

    /// Restores the sequence counter (from a snapshot at start-up); never
    /// moves it back.
    pub fn restore_last_seq(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq);
    }

    /// Restores an acked offset (from a snapshot at start-up).
    pub fn restore_acked(&mut self, queue_offset: u64) {
        if queue_offset >= self.ack_offset
            && !self.leases.contains_key(&queue_offset)
            && !self.redeliver.contains_key(&queue_offset)
        {
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
            self.redeliver.remove(&queue_offset);
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
        if self.lease(queue_offset, seq).is_none() {
            return Err(LeaseError::NotFound);
        }
        let old = self
            .remove_lease(queue_offset)
            .ok_or(LeaseError::NotFound)?;
        Ok(self.take_lease(
            queue_offset,
            now_ms + invisible_ms,
            old.reconsume_times,
            old.delivered_ms,
        ))
    }

    /// Sets the reconsume times of the lease on `queue_offset` (a retry
    /// delivery carries the count of its retry record).
    pub fn set_reconsume_times(&mut self, queue_offset: u64, reconsume_times: u32) {
        if let Some(l) = self.leases.get_mut(&queue_offset) {
            l.reconsume_times = reconsume_times;
        }
    }

    /// The lease on `queue_offset` under sequence number `seq`, if it is
    /// current.
    pub fn lease(&self, queue_offset: u64, seq: u64) -> Option<Lease> {
        self.leases
            .get(&queue_offset)
            .filter(|l| l.seq == seq)
            .copied()
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

    /// Every offset queued to be delivered again in place, for snapshots.
    pub fn redeliveries(&self) -> impl Iterator<Item = (u64, Again)> + '_ {
        self.redeliver.iter().map(|(q, l)| (*q, *l))
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
            restored_after_crash: false,
        };
        self.insert_lease(qo, lease);
        lease
    }

    fn insert_lease(&mut self, qo: u64, lease: Lease) {
        self.leases.insert(qo, lease);
        self.deadlines.insert((lease.invisible_until_ms, qo));
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
    fn truncate_to_a_shorter_queue_forgets_what_lay_beyond() {
        let mut p = QueueProgress::starting_at(0);
        let d: Vec<Delivery> = (0..6)
            .map(|_| p.next_delivery(0, 10, 6, INF, WIN).unwrap())
            .collect();
        p.ack(0, d[0].lease.seq).unwrap();
        p.ack(4, d[4].lease.seq).unwrap();
        assert!(!p.truncate_to(6), "nothing beyond");
        assert!(p.truncate_to(3));
        assert_eq!((p.ack_offset(), p.next_offset()), (1, 3));
        assert_eq!(p.leases().map(|(q, _)| q).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(p.acked_count(), 0);
        assert_eq!(p.next_deadline_ms(), Some(10));
        // Offset 3 is delivered again as a fresh message.
        assert_eq!(p.next_delivery(0, 10, 4, INF, WIN).unwrap().queue_offset, 3);
        // Acked past the new end: the consumer offset comes back too.
        let mut q = QueueProgress::starting_at(0);
        for _ in 0..4 {
            let x = q.next_delivery(0, 10, 4, INF, WIN).unwrap();
            q.ack(x.queue_offset, x.lease.seq).unwrap();
        }
        assert!(q.truncate_to(2));
        assert_eq!((q.ack_offset(), q.next_offset()), (2, 2));
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
            restored_after_crash: false,
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

    fn restored(seq: u64, until: u64, reconsume_times: u32) -> Lease {
        Lease {
            invisible_until_ms: until,
            reconsume_times,
            seq,
            delivered_ms: 100,
            restored_after_crash: false,
        }
    }

    #[test]
    fn restored_leases_keep_their_sequence_numbers() {
        let mut p = QueueProgress::starting_at(0);
        p.restore_lease(0, restored(41, 500, 0));
        p.restore_lease(1, restored(0, 500, 0)); // an older snapshot: no seq
        p.restore_last_seq(50);
        assert_eq!(p.ack(0, 40), Err(LeaseError::NotFound), "another handle");
        p.ack(0, 41).expect("the handle from before the restart");
        let l1 = p.leases().next().unwrap().1;
        assert!(l1.seq > 0 && l1.seq != 41, "a fresh seq for the older form");
        let d = p.next_delivery(0, 10, 3, INF, WIN).unwrap();
        assert!(d.lease.seq > 50, "new leases continue after the saved seq");
    }

    #[test]
    fn after_a_clean_stop_an_expired_restored_lease_is_a_failure() {
        let mut p = QueueProgress::starting_at(0);
        p.restore_lease(0, restored(7, 500, 1));
        let x = p.take_expired(500, 10);
        assert_eq!(x.len(), 1);
        assert_eq!(x[0].1.reconsume_times, 1);
        assert_eq!(p.next_redelivery(500, 10, INF), None);
    }

    #[test]
    fn after_a_crash_an_expired_restored_lease_is_delivered_again_in_place() {
        let mut p = QueueProgress::starting_at(0);
        p.restore_lease(0, restored(7, 500, 1));
        p.restore_lease(2, restored(8, 900, 0));
        p.restore_acked(1);
        p.restore_last_seq(8);
        p.after_unclean_stop();
        assert_eq!(p.next_offset(), 3);
        // A consumer that still holds the lease may ack it.
        p.ack(2, 8).unwrap();
        assert!(p.take_expired(499, 10).is_empty());
        assert!(p.take_expired(500, 10).is_empty(), "not a failure");
        assert_eq!((p.inflight(), p.redeliver_count()), (0, 1));
        assert_eq!(p.next_delivery(600, 10, 3, INF, WIN), None, "nothing fresh");
        assert_eq!(p.next_redelivery(600, 10, 0), None, "in-flight bound");
        let d = p.next_redelivery(600, 10, INF).unwrap();
        assert_eq!(d.queue_offset, 0);
        assert!(d.again);
        assert_eq!(d.lease.reconsume_times, 1, "the same reconsume times");
        assert_eq!(d.lease.invisible_until_ms, 610);
        assert!(d.lease.seq > SEQ_GAP_AFTER_CRASH, "past any lost handle");
        assert!(!d.lease.restored_after_crash);
        assert_eq!(p.next_redelivery(600, 10, INF), None);
        assert_eq!(p.ack_offset(), 0);
        // Its expiry now counts: this delivery happened in this run.
        let x = p.take_expired(610, 10);
        assert_eq!(x, vec![(0, d.lease)]);
        p.skip(0);
        assert_eq!(p.ack_offset(), 3);
    }

    #[test]
    fn extending_a_crash_restored_lease_makes_it_count_again() {
        let mut p = QueueProgress::starting_at(0);
        p.restore_lease(0, restored(7, 500, 0));
        p.after_unclean_stop();
        let l = p.change_invisible(0, 7, 400, 200).unwrap();
        assert!(!l.restored_after_crash, "the consumer is alive");
        assert_eq!(p.take_expired(600, 10), vec![(0, l)]);
    }

    #[test]
    fn queued_redeliveries_go_with_skip_and_retention() {
        let mut p = QueueProgress::starting_at(0);
        for qo in 0..4 {
            p.restore_lease(qo, restored(qo + 1, 10, 0));
        }
        p.after_unclean_stop();
        assert!(p.take_expired(10, 10).is_empty());
        assert_eq!(p.redeliver_count(), 4);
        p.skip(0);
        assert_eq!((p.ack_offset(), p.redeliver_count()), (1, 3));
        p.skip_to(3);
        assert_eq!((p.ack_offset(), p.redeliver_count()), (3, 1));
        assert_eq!(p.next_redelivery(20, 10, INF).unwrap().queue_offset, 3);
        // A snapshot's queued offset is restored unless acked or leased.
        let mut q = QueueProgress::starting_at(0);
        q.restore_redeliver(
            5,
            Again {
                reconsume_times: 2,
                ..Again::default()
            },
        );
        q.restore_acked(5);
        assert_eq!(
            (q.redeliver_count(), q.acked_count(), q.next_offset()),
            (1, 0, 6)
        );
        assert_eq!(
            q.next_redelivery(0, 10, INF).unwrap().lease.reconsume_times,
            2
        );
    }

    #[test]
    fn reset_drops_leases_and_acks_but_never_reuses_a_sequence_number() {
        let mut p = QueueProgress::starting_at(0);
        let a = p.next_delivery(0, 100, 10, 100, 100).unwrap();
        let b = p.next_delivery(0, 100, 10, 100, 100).unwrap();
        p.ack(b.queue_offset, b.lease.seq).unwrap();
        p.reset_to(7);
        assert_eq!((p.ack_offset(), p.next_offset(), p.inflight()), (7, 7, 0));
        assert_eq!(p.acked_count(), 0);
        assert!(
            p.ack(a.queue_offset, a.lease.seq).is_err(),
            "old handle is stale"
        );
        let c = p.next_delivery(0, 100, 10, 100, 100).unwrap();
        assert_eq!(c.queue_offset, 7);
        assert!(c.lease.seq > b.lease.seq);
        p.reset_to(2);
        assert_eq!(
            p.next_delivery(0, 100, 10, 100, 100).unwrap().queue_offset,
            2
        );
    }
}
