//! Exactly-once publish: sends, batches, halves and delayed sends that
//! carry an idempotency key are stored once per `dedup_window_ms`; a repeat
//! stores nothing and gets the first send's receipt marked duplicate.
//!
//! The key travels in the record (system property
//! `halfmq.idempotency_key`), so the index costs no write of its own and is
//! rebuilt at start-up from the log records inside the window.

use halfmq_storage::{AppendReceipt, Record, RecordKind, ScanItem, Store};

use super::dedup::{key_id, Claim, DedupIndex, FirstSend, KeyId};
use super::props::{deliver_at, prop, IDEMPOTENCY_KEY_PROPERTY};
use super::{lock, Broker};
use crate::error::BrokerError;

/// What becomes of each message of a batch.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Fate {
    /// Stored now, as the n-th record appended.
    Store(usize),
    /// A key stored before, inside the window.
    Duplicate(FirstSend),
    /// The same key as the earlier message `i` of this batch.
    SameAs(usize),
}

/// The keys a batch claimed: released (and waiters woken) when dropped
/// without [`KeyClaims::stored`].
pub(crate) struct KeyClaims<'a> {
    broker: &'a Broker,
    /// Per input message.
    pub(crate) fates: Vec<Fate>,
    /// The key of each record to append (in append order).
    keys: Vec<Option<KeyId>>,
    settled: bool,
}

impl Broker {
    /// Sorts a validated batch into what to append and what is a
    /// duplicate, claiming the new keys; waits while another request is
    /// storing one of them. Returns the records to append.
    ///
    /// # Errors
    /// [`BrokerError::ShuttingDown`] while waiting.
    pub(crate) async fn claim_keys(
        &self,
        records: Vec<Record>,
    ) -> Result<(Vec<Record>, KeyClaims<'_>), BrokerError> {
        if records
            .iter()
            .all(|r| prop(r, IDEMPOTENCY_KEY_PROPERTY).is_none())
        {
            let n = records.len();
            return Ok((
                records,
                KeyClaims {
                    broker: self,
                    fates: (0..n).map(Fate::Store).collect(),
                    keys: vec![None; n],
                    settled: true,
                },
            ));
        }
        let ids: Vec<Option<KeyId>> = records
            .iter()
            .map(|r| prop(r, IDEMPOTENCY_KEY_PROPERTY).map(|k| key_id(&r.topic, k)))
            .collect();
        loop {
            let done = self.dedup_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            let now = self.clock.now_ms();
            let mut fates = Vec::with_capacity(records.len());
            let mut mine: Vec<KeyId> = Vec::new();
            let mut busy = false;
            {
                let mut d = lock(&self.dedup);
                let mut appended = 0;
                for (i, id) in ids.iter().enumerate() {
                    let Some(k) = *id else {
                        fates.push(Fate::Store(appended));
                        appended += 1;
                        continue;
                    };
                    if let Some(j) = ids[..i].iter().position(|e| *e == Some(k)) {
                        fates.push(Fate::SameAs(j));
                        continue;
                    }
                    match d.claim(k, now) {
                        Claim::Mine => {
                            mine.push(k);
                            fates.push(Fate::Store(appended));
                            appended += 1;
                        }
                        Claim::Duplicate(f) => fates.push(Fate::Duplicate(f)),
                        Claim::Busy => {
                            busy = true;
                            break;
                        }
                    }
                }
                if busy {
                    for k in &mine {
                        d.release(*k);
                    }
                }
            }
            if busy {
                self.dedup_done.notify_waiters();
                self.check_running()?;
                // The other request ends in at most one append and fsync.
                let _ = tokio::time::timeout(std::time::Duration::from_millis(100), done).await;
                continue;
            }
            let mut keys = Vec::new();
            let mut out = Vec::new();
            for (r, (f, id)) in records.into_iter().zip(fates.iter().zip(&ids)) {
                if matches!(f, Fate::Store(_)) {
                    keys.push(*id);
                    out.push(r);
                }
            }
            return Ok((
                out,
                KeyClaims {
                    broker: self,
                    fates,
                    keys,
                    settled: false,
                },
            ));
        }
    }
}

impl KeyClaims<'_> {
    /// The records are in the log (`receipt`; `records` are what was
    /// appended, in order): their keys now answer with these receipts.
    pub(crate) fn stored(&mut self, records: &[RecordMeta], receipt: &AppendReceipt) {
        if !self.settled {
            let mut d = lock(&self.broker.dedup);
            for (i, k) in self.keys.iter().enumerate() {
                let (Some(k), Some(m)) = (k, records.get(i)) else {
                    continue;
                };
                let offset = receipt.offsets[i];
                d.stored(
                    *k,
                    m.stored_ms,
                    FirstSend {
                        offset,
                        end: offset + u64::from(receipt.sizes[i]),
                        message_id: m.message_id,
                        queue_id: m.queue_id,
                        queue_offset: receipt.queue_offsets[i],
                        deliver_at_ms: m.deliver_at_ms,
                    },
                );
            }
            self.settled = true;
        }
        self.broker.dedup_done.notify_waiters();
    }

    /// A broker group member's apply stored the keys: only the claims are
    /// left to release (and waiters to wake).
    pub(crate) fn settle(&mut self) {
        if !self.settled {
            let mut d = lock(&self.broker.dedup);
            for k in self.keys.iter().flatten() {
                d.release(*k);
            }
            self.settled = true;
        }
        self.broker.dedup_done.notify_waiters();
    }

    /// Whether nothing is left to append (all duplicates).
    pub(crate) fn all_duplicates(&self) -> bool {
        self.fates.iter().all(|f| !matches!(f, Fate::Store(_)))
    }

    /// Once the first sends of the duplicates are durable: the end to wait
    /// for (0 when there are none).
    pub(crate) fn duplicates_end(&self) -> u64 {
        self.fates
            .iter()
            .filter_map(|f| match f {
                Fate::Duplicate(first) => Some(first.end),
                _ => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// One receipt per input message: `stored[n]` for the n-th appended,
    /// `dup(first)` for duplicates, and a copy marked by `mark` for a
    /// repeat inside the batch.
    pub(crate) fn receipts<T: Clone>(
        &self,
        stored: Vec<T>,
        dup: impl Fn(&FirstSend) -> T,
        mark: impl Fn(&mut T),
    ) -> Vec<T> {
        let dups = self
            .fates
            .iter()
            .filter(|f| !matches!(f, Fate::Store(_)))
            .count();
        if dups > 0 {
            self.broker
                .counters
                .duplicates
                .fetch_add(dups as u64, std::sync::atomic::Ordering::Relaxed);
        }
        let mut out: Vec<T> = Vec::with_capacity(self.fates.len());
        for f in &self.fates {
            let r = match f {
                Fate::Store(n) => stored[*n].clone(),
                Fate::Duplicate(first) => dup(first),
                Fate::SameAs(j) => {
                    let mut r = out[*j].clone();
                    mark(&mut r);
                    r
                }
            };
            out.push(r);
        }
        out
    }
}

impl Drop for KeyClaims<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut d = lock(&self.broker.dedup);
        for k in self.keys.iter().flatten() {
            d.release(*k);
        }
        drop(d);
        self.broker.dedup_done.notify_waiters();
    }
}

/// What [`KeyClaims::stored`] needs of an appended record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordMeta {
    pub(crate) message_id: halfmq_storage::MessageId,
    pub(crate) queue_id: u32,
    pub(crate) stored_ms: u64,
    pub(crate) deliver_at_ms: u64,
}

impl RecordMeta {
    pub(crate) fn of(r: &Record) -> RecordMeta {
        RecordMeta {
            message_id: r.message_id,
            queue_id: r.queue_id,
            stored_ms: r.store_timestamp_ms,
            deliver_at_ms: deliver_at(r).unwrap_or(0),
        }
    }
}

/// The dedup index of the records stored in the last `window_ms` before
/// `now_ms`: the log is read from the first segment that can hold one
/// (a sealed segment last written before the window began holds none).
///
/// # Errors
/// Storage errors listing the segments; damaged ranges are stepped over
/// (their keys are lost: such a send could be stored again).
pub(crate) fn rebuild(
    store: &Store,
    window_ms: u64,
    max_keys: usize,
    now_ms: u64,
) -> Result<DedupIndex, BrokerError> {
    let mut d = DedupIndex::new(window_ms, max_keys);
    let cutoff = now_ms.saturating_sub(window_ms);
    let segments = store.log().segments()?;
    let Some(from) = segments
        .iter()
        .find(|s| s.active || s.modified_ms >= cutoff)
        .map(|s| s.base.max(store.log().min_offset()))
    else {
        return Ok(d);
    };
    let mut keys = 0u64;
    let end = store.dispatched_end();
    for item in store.log().scan_from(from) {
        let (offset, r) = match item {
            Ok(ScanItem::Record(o, _)) if o >= end => break,
            Ok(ScanItem::Record(o, r)) => (o, r),
            Ok(ScanItem::Skipped(_)) => continue,
            Err(e) => {
                tracing::error!(error = %e, "dedup index rebuild stopped at an I/O error: sends of the rest of the window could be stored again");
                break;
            }
        };
        if r.store_timestamp_ms < cutoff
            || r.topic.starts_with('%')
            || !matches!(r.kind, RecordKind::Normal | RecordKind::Half)
        {
            continue;
        }
        let Some(k) = prop(&r, IDEMPOTENCY_KEY_PROPERTY) else {
            continue;
        };
        let id = key_id(&r.topic, k);
        let size = r.encoded_len() as u64;
        let m = RecordMeta::of(&r);
        d.stored(
            id,
            m.stored_ms,
            FirstSend {
                offset,
                end: offset + size,
                message_id: m.message_id,
                queue_id: m.queue_id,
                queue_offset: r.queue_offset,
                deliver_at_ms: m.deliver_at_ms,
            },
        );
        keys += 1;
    }
    d.expire(now_ms);
    if keys > 0 {
        tracing::info!(
            keys = d.len(),
            from_offset = from,
            "dedup index rebuilt from the log"
        );
    }
    Ok(d)
}
