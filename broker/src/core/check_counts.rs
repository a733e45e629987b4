//! Check counts in a broker group: how many checks each pending half has
//! had is the leader's bookkeeping (the check-back driver runs there), but
//! a new leader must go on counting where the old one stopped, or a half
//! would be checked up to `check_max` times again after each failover.
//!
//! With its progress record, every `checkpoint_interval_ms`, the leader
//! proposes a `%CHECKS%` control record of the counts that changed (body:
//! `(half offset u64, check count u32)*`, little-endian); followers set
//! them on their pending halves (saved with their transaction state). So a
//! new leader counts at most one interval's checks again. Giving up is a
//! record of its own (`GIVEN_UP_TOPIC`), applied everywhere.

use bytes::Bytes;
use halfmq_storage::{Record, RecordKind};

use super::transactions::state::TxInner;
use super::Broker;
use crate::error::BrokerError;

/// Topic of the leader's check-count records.
pub(crate) const CHECKS_TOPIC: &str = "%CHECKS%";

fn encode(counts: &[(u64, u32)]) -> Bytes {
    let mut b = Vec::with_capacity(counts.len() * 12);
    for (o, n) in counts {
        b.extend_from_slice(&o.to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
    }
    Bytes::from(b)
}

fn decode(body: &[u8]) -> impl Iterator<Item = (u64, u32)> + '_ {
    body.chunks_exact(12).filter_map(|c| {
        let o = u64::from_le_bytes(c[..8].try_into().ok()?);
        let n = u32::from_le_bytes(c[8..].try_into().ok()?);
        Some((o, n))
    })
}

impl Broker {
    /// The leader's check-count record, when counts changed.
    ///
    /// # Errors
    /// As [`Broker::replicate`] (the counts are then counted again from the
    /// last record after a failover).
    pub(crate) async fn propose_check_counts(&self) -> Result<(), BrokerError> {
        if self.check_serving().is_err() {
            return Ok(());
        }
        let counts = self.tx().inner.lock().sched.take_changed_counts();
        if counts.is_empty() {
            return Ok(());
        }
        let rec = Record {
            kind: RecordKind::System,
            topic: CHECKS_TOPIC.to_owned(),
            body: encode(&counts),
            store_timestamp_ms: self.now_ms(),
            ..Record::default()
        };
        self.replicate(vec![rec]).await.map(|_| ())
    }

    /// A member applying a check-count record: its pending halves take the
    /// leader's counts (the serving leader's own are ahead of them).
    pub(crate) fn apply_check_counts(&self, inner: &mut TxInner, body: &[u8]) {
        if self.check_serving().is_ok() {
            return;
        }
        for (offset, n) in decode(body) {
            if inner.sched.set_check_times(offset, n) {
                inner.dirty.insert(offset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_round_trip() {
        let c = vec![(7u64, 1u32), (u64::MAX, 15)];
        assert_eq!(decode(&encode(&c)).collect::<Vec<_>>(), c);
        // A cut-off tail is ignored, not misread.
        let b = encode(&c);
        assert_eq!(decode(&b[..20]).collect::<Vec<_>>(), vec![(7, 1)]);
    }
}
