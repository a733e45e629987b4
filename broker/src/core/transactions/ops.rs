//! The broker's transactional operations: half sends (and delayed sends,
//! stored as halves of `%DELAY%`), EndTransaction, check answers, listings.

use std::sync::atomic::Ordering;

use foldhash::HashMap;
use halfmq_storage::{MessageId, Record, RecordKind};

use super::notes::pending_note;
use super::state::TxState;
use super::{
    EndSource, HalfReceipt, PendingTransaction, Resolution, TransactionId, DELAY_GROUP,
    GIVEN_UP_TOPIC,
};
use crate::cluster::types::Outcome;
use crate::core::dedup::FirstSend;
use crate::core::idempotence::RecordMeta;
use crate::core::names::check_group;
use crate::core::props::{deliver_at, PRODUCER_GROUP_PROPERTY};
use crate::core::replicated::first_send;
use crate::core::send::duplicate_receipt;
use crate::core::txcheck::HalfState;
use crate::core::types::OutgoingMessage;
use crate::core::Broker;
use crate::error::BrokerError;

/// Index entries [`Broker::list_transactions`] looks at per hold of the
/// transaction lock.
const LIST_SCAN_CHUNK: usize = 4_096;

pub(crate) fn conflict_or_ok(
    transaction_id: &str,
    was_commit: bool,
    commit: bool,
) -> Result<(), BrokerError> {
    if was_commit == commit {
        Ok(())
    } else {
        Err(BrokerError::TransactionConflict(format!(
            "transaction {transaction_id} was already {}",
            if was_commit {
                "committed"
            } else {
                "rolled back"
            }
        )))
    }
}

/// Ends read and authorized, not yet written ([`Broker::prepare_ends`]).
#[derive(Debug)]
pub struct PreparedEnds {
    ends: Vec<(String, Resolution)>,
    source: EndSource,
    results: Vec<Option<Result<(), BrokerError>>>,
    items: Vec<Option<(TransactionId, Record, bool)>>,
}

impl Broker {
    pub(crate) fn tx(&self) -> &TxState {
        self.tx_state()
    }

    /// Stores a half message for `producer_group`; returns once durable.
    ///
    /// # Errors
    /// Validation errors, [`BrokerError::TooManyPendingHalves`], storage.
    pub async fn send_half(
        &self,
        producer_group: &str,
        msg: OutgoingMessage,
    ) -> Result<HalfReceipt, BrokerError> {
        let mut v = self.send_halves(producer_group, vec![msg]).await?;
        v.pop()
            .ok_or_else(|| BrokerError::Internal("no receipt for a half".into()))
    }

    /// Stores several half messages of `producer_group`, all or nothing, with
    /// one durability wait.
    ///
    /// # Errors
    /// Validation errors (nothing stored), [`BrokerError::TooManyPendingHalves`], storage.
    pub async fn send_halves(
        &self,
        producer_group: &str,
        msgs: Vec<OutgoingMessage>,
    ) -> Result<Vec<HalfReceipt>, BrokerError> {
        self.check_running()?;
        check_group(producer_group)?;
        self.check_serving()?;
        let (mut records, in_use) = self.build_records(msgs, RecordKind::Half)?;
        for r in &mut records {
            r.properties.push((
                PRODUCER_GROUP_PROPERTY.to_owned(),
                producer_group.to_owned(),
            ));
        }
        let (records, mut claims) = self.claim_keys(records).await?;
        let half_receipt = |f: &FirstSend| HalfReceipt {
            transaction_id: TransactionId {
                offset: f.offset,
                message_id: f.message_id,
            }
            .encode(&self.secret),
            message_id: f.message_id,
            queue_id: f.queue_id,
            duplicate: true,
        };
        if claims.all_duplicates() {
            drop(in_use);
            self.wait_durable(claims.duplicates_end()).await?;
            return Ok(claims.receipts(Vec::new(), half_receipt, |r| r.duplicate = true));
        }
        let metas: Vec<RecordMeta> = records.iter().map(RecordMeta::of).collect();
        let meta: Vec<(MessageId, u32, String, u64)> = records
            .iter()
            .map(|r| {
                (
                    r.message_id,
                    r.queue_id,
                    r.topic.clone(),
                    r.store_timestamp_ms,
                )
            })
            .collect();
        let tx = self.tx();
        if self.replication().is_some() {
            if tx.inner.lock().sched.len() + records.len() > tx.max_pending {
                return Err(BrokerError::TooManyPendingHalves(tx.max_pending));
            }
            let n = records.len();
            let (r, outcomes) = self.replicate(records).await?;
            in_use.stored();
            claims.settle();
            self.counters
                .halves_in
                .fetch_add(n as u64, Ordering::Relaxed);
            let stored = (0..n)
                .map(|i| match outcomes.get(i) {
                    Some(Outcome::Duplicate(w)) => half_receipt(&first_send(w)),
                    _ => {
                        let (message_id, queue_id, _, _) = meta[i].clone();
                        HalfReceipt {
                            transaction_id: TransactionId {
                                offset: r.offsets[i],
                                message_id,
                            }
                            .encode(&self.secret),
                            message_id,
                            queue_id,
                            duplicate: false,
                        }
                    }
                })
                .collect();
            return Ok(claims.receipts(stored, half_receipt, |r| r.duplicate = true));
        }
        let (offsets, end) = {
            let mut inner = tx.inner.lock();
            if inner.sched.len() + records.len() > tx.max_pending {
                return Err(BrokerError::TooManyPendingHalves(tx.max_pending));
            }
            let r = self.store().append(records)?;
            in_use.stored();
            claims.stored(&metas, &r);
            let g = inner.strings.id(producer_group);
            for (off, (_, _, topic, stored_ms)) in r.offsets.iter().zip(&meta) {
                let t = inner.strings.id(topic);
                inner.sched.add(*off, g, t, *stored_ms);
                inner.dirty.insert(*off);
            }
            (r.offsets, r.end)
        };
        self.wait_durable(end.max(claims.duplicates_end())).await?;
        self.counters
            .halves_in
            .fetch_add(offsets.len() as u64, Ordering::Relaxed);
        tx.wake.notify_one();
        let stored = offsets
            .into_iter()
            .zip(meta)
            .map(|(offset, (message_id, queue_id, _, _))| HalfReceipt {
                transaction_id: TransactionId { offset, message_id }.encode(&self.secret),
                message_id,
                queue_id,
                duplicate: false,
            })
            .collect();
        Ok(claims.receipts(stored, half_receipt, |r| r.duplicate = true))
    }

    /// Stores a batch holding delayed messages (halves of [`DELAY_GROUP`])
    /// and possibly ordinary ones, all or nothing, with one durability wait.
    /// The delayed ones join the deadline-ordered index (and count against
    /// `max_pending_halves`); the check driver commits each when due.
    ///
    /// # Errors
    /// [`BrokerError::TooManyPendingHalves`], storage errors.
    pub(crate) async fn send_delayed(
        &self,
        records: Vec<Record>,
        in_use: crate::core::send::TopicsInUse<'_>,
    ) -> Result<Vec<crate::core::SendReceipt>, BrokerError> {
        let (records, mut claims) = self.claim_keys(records).await?;
        if claims.all_duplicates() {
            drop(in_use);
            self.wait_durable(claims.duplicates_end()).await?;
            return Ok(claims.receipts(Vec::new(), duplicate_receipt, |r| r.duplicate = true));
        }
        let metas: Vec<RecordMeta> = records.iter().map(RecordMeta::of).collect();
        let info: Vec<(MessageId, u32, String, u64, Option<u64>)> = records
            .iter()
            .map(|r| {
                let due = (r.kind == RecordKind::Half)
                    .then(|| deliver_at(r))
                    .flatten();
                (
                    r.message_id,
                    r.queue_id,
                    r.topic.clone(),
                    r.store_timestamp_ms,
                    due,
                )
            })
            .collect();
        let delayed = info.iter().filter(|i| i.4.is_some()).count();
        let body_bytes: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        let tx = self.tx();
        let receipt = {
            let mut inner = tx.inner.lock();
            if inner.sched.len() + delayed > tx.max_pending {
                return Err(BrokerError::TooManyPendingHalves(tx.max_pending));
            }
            let r = self.store().append(records)?;
            in_use.stored();
            claims.stored(&metas, &r);
            let g = inner.strings.id(DELAY_GROUP);
            for (off, (_, _, topic, stored_ms, due)) in r.offsets.iter().zip(&info) {
                if let Some(due) = due {
                    let t = inner.strings.id(topic);
                    inner.sched.add_at(*off, g, t, *stored_ms, *due);
                    inner.dirty.insert(*off);
                }
            }
            r
        };
        self.wait_durable(receipt.end.max(claims.duplicates_end()))
            .await?;
        tx.wake.notify_one();
        self.counters
            .messages_in
            .fetch_add(info.len() as u64, Ordering::Relaxed);
        self.counters
            .bytes_in
            .fetch_add(body_bytes, Ordering::Relaxed);
        let mut out = Vec::with_capacity(info.len());
        for (i, (message_id, queue_id, topic, _, due)) in info.into_iter().enumerate() {
            if due.is_none() {
                self.notify_topic(&topic);
            }
            out.push(crate::core::SendReceipt {
                message_id,
                queue_id,
                queue_offset: receipt.queue_offsets[i],
                deliver_at_ms: due.unwrap_or(0),
                duplicate: false,
            });
        }
        Ok(claims.receipts(out, duplicate_receipt, |r| r.duplicate = true))
    }

    /// Ends a transaction: commit makes the half visible once, rollback
    /// discards it. Idempotent; the first resolution is final.
    ///
    /// # Errors
    /// [`BrokerError::InvalidTransactionId`], [`BrokerError::TransactionNotFound`],
    /// [`BrokerError::TransactionConflict`], storage errors.
    pub async fn end_transaction(
        &self,
        transaction_id: &str,
        resolution: Resolution,
        source: EndSource,
    ) -> Result<(), BrokerError> {
        self.check_running()?;
        let mut v = self
            .end_transactions(vec![(transaction_id.to_owned(), resolution)], source)
            .await;
        v.pop()
            .unwrap_or_else(|| Err(BrokerError::Internal("no result for an end".into())))
    }

    /// Ends several transactions with one append and one durability wait;
    /// one result per end, in order (see [`Broker::end_transaction`]).
    pub async fn end_transactions(
        &self,
        ends: Vec<(String, Resolution)>,
        source: EndSource,
    ) -> Vec<Result<(), BrokerError>> {
        self.end_transactions_as(ends, source, &|_| Ok(())).await
    }

    /// [`Broker::end_transactions`] for a caller that `may_end` transactions
    /// of some producer groups: each half's producer group is checked once
    /// the half is read, before anything is written; when one is refused,
    /// nothing is ended and every result is that refusal.
    pub async fn end_transactions_as(
        &self,
        ends: Vec<(String, Resolution)>,
        source: EndSource,
        may_end: &(dyn Fn(&str) -> Result<(), BrokerError> + Sync),
    ) -> Vec<Result<(), BrokerError>> {
        match self.prepare_ends(ends, source, may_end) {
            Ok(p) => self.finish_ends(p).await,
            Err(refused) => refused,
        }
    }

    /// The first half of [`Broker::end_transactions_as`], synchronous:
    /// parses each end, reads its half and checks `may_end` on its producer
    /// group. Nothing is written yet; `Err` holds every end's result when
    /// the whole request is refused (shutting down, not the leader, denied).
    pub fn prepare_ends(
        &self,
        ends: Vec<(String, Resolution)>,
        source: EndSource,
        may_end: &(dyn Fn(&str) -> Result<(), BrokerError> + Sync),
    ) -> Result<PreparedEnds, Vec<Result<(), BrokerError>>> {
        if self.check_running().is_err() {
            return Err(ends
                .iter()
                .map(|_| Err(BrokerError::ShuttingDown))
                .collect());
        }
        if let Err(BrokerError::NotLeader(l)) = self.check_serving() {
            return Err(ends
                .iter()
                .map(|_| Err(BrokerError::NotLeader(l.clone())))
                .collect());
        }
        // 1. Parse and read each half outside the lock (one pread each).
        let mut results: Vec<Option<Result<(), BrokerError>>> = Vec::with_capacity(ends.len());
        let mut items: Vec<Option<(TransactionId, Record, bool)>> = Vec::with_capacity(ends.len());
        for (tid, resolution) in &ends {
            let parsed = (|| {
                let commit = match resolution {
                    Resolution::Commit => true,
                    Resolution::Rollback => false,
                    Resolution::Unknown => {
                        return Err(BrokerError::BadRequest(
                            "EndTransaction needs COMMIT or ROLLBACK".into(),
                        ))
                    }
                };
                let id = TransactionId::decode(tid, &self.secret)?;
                match self.store().log().read(id.offset) {
                    // A delayed message is a half of the broker's own group:
                    // only its timer ends it, whatever id a request brings.
                    Ok(r)
                        if r.kind == RecordKind::Half
                            && r.message_id == id.message_id
                            && is_delayed(&r) == (source == EndSource::DelayTimer) =>
                    {
                        Ok((id, r, commit))
                    }
                    Ok(_) | Err(halfmq_storage::Error::OffsetOutOfRange { .. }) => {
                        Err(BrokerError::TransactionNotFound(tid.clone()))
                    }
                    Err(e) => Err(e.into()),
                }
            })();
            match parsed {
                Ok(x) => {
                    results.push(None);
                    items.push(Some(x));
                }
                Err(e) => {
                    results.push(Some(Err(e)));
                    items.push(None);
                }
            }
        }
        for (_, half, _) in items.iter().flatten() {
            let group = crate::core::props::prop(half, PRODUCER_GROUP_PROPERTY).unwrap_or_default();
            if let Err(BrokerError::PermissionDenied { action, resource }) = may_end(group) {
                return Err(ends
                    .iter()
                    .map(|_| {
                        Err(BrokerError::PermissionDenied {
                            action,
                            resource: resource.clone(),
                        })
                    })
                    .collect());
            }
        }
        Ok(PreparedEnds {
            ends,
            source,
            results,
            items,
        })
    }

    /// The second half of [`Broker::end_transactions_as`]: writes the end
    /// records of the ends [`Broker::prepare_ends`] read, waits until they
    /// are durable; one result per end, in order.
    pub async fn finish_ends(&self, p: PreparedEnds) -> Vec<Result<(), BrokerError>> {
        let PreparedEnds {
            ends,
            source,
            mut results,
            items,
        } = p;
        let tx = self.tx();
        // 2. Under the tx lock: end records for the pending ones, one append.
        let mut lookup_later: Vec<usize> = Vec::new();
        // (index, half offset, commit, topic, a delayed message)
        let mut appended: Vec<(usize, u64, bool, String, bool)> = Vec::new();
        let replicated = self.replication().is_some();
        let mut to_propose: Vec<Record> = Vec::new();
        let end = {
            let mut inner = tx.inner.lock();
            let mut records = Vec::new();
            let mut in_batch: HashMap<u64, bool> = HashMap::default();
            for (i, item) in items.iter().enumerate() {
                let Some((id, half, commit)) = item else {
                    continue;
                };
                let previous = in_batch
                    .get(&id.offset)
                    .copied()
                    .or_else(|| inner.recent.get(&id.offset).copied());
                if let Some(c) = previous {
                    results[i] = Some(conflict_or_ok(&ends[i].0, c, *commit));
                } else if inner.sched.get(id.offset).is_some() {
                    in_batch.insert(id.offset, *commit);
                    records.push(Record {
                        kind: if *commit {
                            RecordKind::TxCommit
                        } else {
                            RecordKind::TxRollback
                        },
                        queue_id: half.queue_id,
                        ref_offset: Some(id.offset),
                        ref_size: half.encoded_len() as u32,
                        message_id: half.message_id,
                        topic: half.topic.clone(),
                        tag: half.tag.clone(),
                        ..Record::default()
                    });
                    appended.push((
                        i,
                        id.offset,
                        *commit,
                        half.topic.clone(),
                        deliver_at(half).is_some(),
                    ));
                } else {
                    lookup_later.push(i);
                }
            }
            if records.is_empty() {
                None
            } else if replicated {
                // A broker group's apply resolves the halves, on every replica.
                to_propose = records;
                None
            } else {
                match self.store().append(records) {
                    Ok(r) => {
                        for (_, offset, commit, _, _) in &appended {
                            inner.sched.remove(*offset);
                            tx.release_outstanding(&mut inner, *offset);
                            inner.dirty.insert(*offset);
                            inner.recent.insert(*offset, *commit);
                        }
                        Some(Ok(r.end))
                    }
                    Err(e) => Some(Err(e.to_string())),
                }
            }
        };
        // 3. Resolved before this request: the saved resolution decides.
        for i in lookup_later {
            if let Some((id, _, commit)) = &items[i] {
                results[i] = Some(match tx.resolution_of(self.store(), id.offset) {
                    Ok(Some(c)) => conflict_or_ok(&ends[i].0, c, *commit),
                    Ok(None) => Err(BrokerError::TransactionNotFound(ends[i].0.clone())),
                    Err(e) => Err(e),
                });
            }
        }
        // 4. One durability wait for every end record (a broker group: one
        // proposal, and what apply made of each end).
        let mut outcomes: Option<Vec<Outcome>> = None;
        let durable = if replicated && !to_propose.is_empty() {
            match self.replicate(to_propose).await {
                Ok((_, o)) => {
                    outcomes = Some(o);
                    Ok(())
                }
                Err(BrokerError::NotLeader(l)) | Err(BrokerError::LeadershipLost(l)) => {
                    for (i, ..) in &appended {
                        results[*i] = Some(Err(BrokerError::LeadershipLost(l.clone())));
                    }
                    appended.clear();
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        } else {
            match end {
                None => Ok(()),
                Some(Ok(end)) => self.wait_durable(end).await.map_err(|e| e.to_string()),
                Some(Err(e)) => Err(e),
            }
        };
        let mut topics = std::collections::BTreeSet::new();
        for (k, (i, _, commit, topic, delayed)) in appended.into_iter().enumerate() {
            match outcomes.as_ref().and_then(|o| o.get(k)) {
                Some(Outcome::Conflict) => {
                    results[i] = Some(conflict_or_ok(&ends[i].0, !commit, commit));
                    continue;
                }
                Some(Outcome::NotPending) => {
                    results[i] = Some(Err(BrokerError::TransactionNotFound(ends[i].0.clone())));
                    continue;
                }
                Some(Outcome::AlreadyEnded) => {
                    results[i] = Some(Ok(()));
                    continue;
                }
                _ => {}
            }
            results[i] = Some(match &durable {
                Ok(()) => {
                    if !delayed {
                        let c = &self.counters;
                        if commit {
                            &c.transactions_committed
                        } else {
                            &c.transactions_rolled_back
                        }
                        .fetch_add(1, Ordering::Relaxed);
                    }
                    if commit {
                        topics.insert(topic);
                    }
                    Ok(())
                }
                Err(e) => Err(BrokerError::Storage(halfmq_storage::Error::Poisoned(
                    e.clone(),
                ))),
            });
        }
        for t in topics {
            self.notify_topic(&t);
        }
        tracing::debug!(ends = ends.len(), ?source, "transactions ended");
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(BrokerError::Internal("end not processed".into()))))
            .collect()
    }

    /// A checker's answer from session `session_id`, applied only if the
    /// check of that transaction is out to it (else ignored and logged).
    pub async fn check_answer(
        &self,
        session_id: u64,
        transaction_id: &str,
        resolution: Resolution,
    ) {
        let Ok(id) = TransactionId::decode(transaction_id, &self.secret) else {
            tracing::warn!(
                session_id,
                transaction_id,
                "check answer with a malformed transaction id"
            );
            return;
        };
        // Only the session the check went to may answer it: another
        // session (of any group) cannot decide this transaction, and a late
        // answer after the check went elsewhere is the other session's to give.
        let tx = self.tx();
        if tx.check_holder(id.offset) != Some(session_id) {
            tracing::warn!(
                session_id,
                transaction_id,
                "check answer from a session the check is not out to; ignored"
            );
            return;
        }
        tx.session_answered(session_id);
        self.counters
            .checks_answered
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match resolution {
            Resolution::Commit | Resolution::Rollback => {
                if let Err(e) = self
                    .end_transaction(transaction_id, resolution, EndSource::Check)
                    .await
                {
                    tracing::warn!(transaction_id, error = %e, "check answer not applied");
                }
            }
            Resolution::Unknown => {
                let now = self.now_ms();
                let given_up = {
                    let mut inner = tx.inner.lock();
                    tx.release_outstanding(&mut inner, id.offset);
                    inner.dirty.insert(id.offset);
                    inner.sched.answered_unknown(id.offset, now)
                };
                if given_up {
                    self.give_up(id.offset).await;
                }
            }
        }
    }

    pub(crate) async fn give_up(&self, offset: u64) {
        let tx = self.tx();
        if self.replication().is_some() {
            let rec = Record {
                kind: RecordKind::System,
                topic: GIVEN_UP_TOPIC.to_owned(),
                ref_offset: Some(offset),
                ..Record::default()
            };
            match self.replicate(vec![rec]).await {
                Ok(_) => tracing::warn!(
                    offset,
                    check_max = tx.cfg.check_max,
                    "half message given up after check_max checks; resolve it with `halfmq tx end`"
                ),
                Err(e) => tracing::error!(offset, error = %e, "could not record a given-up half"),
            }
            return;
        }
        let res = {
            let mut inner = tx.inner.lock();
            inner.dirty.insert(offset);
            self.store().append(vec![Record {
                kind: RecordKind::System,
                topic: GIVEN_UP_TOPIC.to_owned(),
                ref_offset: Some(offset),
                ..Record::default()
            }])
        };
        match res {
            Ok(r) => {
                let _ = self.wait_durable(r.end).await;
                tracing::warn!(
                    offset,
                    check_max = tx.cfg.check_max,
                    "half message given up after check_max checks; resolve it with `halfmq tx end`"
                );
            }
            Err(e) => tracing::error!(offset, error = %e, "could not record a given-up half"),
        }
    }

    /// Unresolved halves (given-up ones included), oldest first, at most `limit`.
    /// Blocking: it walks the pending index and reads each listed half from
    /// the log, so async callers run it with `spawn_blocking`.
    pub fn list_transactions(&self, limit: usize) -> Vec<PendingTransaction> {
        self.list_transactions_in_chunks(limit, LIST_SCAN_CHUNK)
    }

    /// [`Broker::list_transactions`], looking at no more than `chunk` index
    /// entries per hold of the transaction lock: delayed messages share the
    /// index and are skipped, and a million of them ahead of the first half
    /// must not stall sends and ends for the whole walk. Between chunks the
    /// lock goes to any waiting sender first (a fair hand-over: with an
    /// unfair unlock the walk would take the lock straight back).
    pub(crate) fn list_transactions_in_chunks(
        &self,
        limit: usize,
        chunk: usize,
    ) -> Vec<PendingTransaction> {
        let tx = self.tx();
        let now = self.now_ms();
        let chunk = chunk.max(1);
        // The index iterates in offset order: only `limit` rows are built,
        // however many halves are pending. Each chunk resumes at the offset
        // where the last stopped, so no row is listed twice.
        let mut rows: Vec<(u64, HalfState, String, String)> = Vec::new();
        let mut from = 0;
        let mut inner = tx.inner.lock();
        while rows.len() < limit {
            let delay_group = inner.strings.id_of(DELAY_GROUP);
            let mut resume_at = None;
            for (seen, (o, s)) in inner.sched.iter_from(from).enumerate() {
                if seen == chunk || rows.len() == limit {
                    resume_at = Some(o);
                    break;
                }
                if Some(s.group) != delay_group {
                    rows.push((
                        o,
                        *s,
                        inner.strings.name(s.group).to_owned(),
                        inner.strings.name(s.topic).to_owned(),
                    ));
                }
            }
            match resume_at {
                Some(o) => from = o,
                None => break,
            }
            parking_lot::MutexGuard::bump(&mut inner);
        }
        drop(inner);
        rows.drain(..)
            .map(|(offset, s, group, topic)| {
                let message_id = self
                    .store()
                    .log()
                    .read(offset)
                    .map(|r| r.message_id)
                    .unwrap_or_default();
                let note = pending_note(&s, &group, tx.has_session(&group), now, &tx.cfg);
                PendingTransaction {
                    transaction_id: TransactionId { offset, message_id }.encode(&self.secret),
                    message_id: message_id.to_string(),
                    topic,
                    producer_group: group,
                    age_ms: now.saturating_sub(s.stored_ms),
                    check_times: s.check_times,
                    given_up: s.given_up,
                    note,
                }
            })
            .collect()
    }
}

/// Whether a half record is a delayed message (a half of `%DELAY%`, or of
/// any group with '%', which clients cannot name).
fn is_delayed(half: &Record) -> bool {
    half.properties
        .iter()
        .find(|(k, _)| k == PRODUCER_GROUP_PROPERTY)
        .is_some_and(|(_, g)| g == DELAY_GROUP || g.contains('%'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BrokerConfig;
    use std::sync::Arc;

    fn message(body: &str, delay_ms: u64) -> OutgoingMessage {
        OutgoingMessage {
            topic: "orders".into(),
            queue: crate::core::QueueChoice::RoundRobin,
            tag: String::new(),
            keys: Vec::new(),
            properties: Vec::new(),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            delay_ms,
            idempotency_key: None,
            message_group: None,
            origin: None,
        }
    }

    #[tokio::test]
    async fn listing_skips_delayed_messages_and_resumes_between_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        };
        let b = Broker::open(cfg, Arc::new(crate::core::SystemClock)).unwrap();
        // Physical order: 3 delayed, half, 3 delayed, half, ... The delayed
        // messages share the offset-ordered index with the halves.
        let mut halves = Vec::new();
        for i in 0..4 {
            let delayed = (0..3).map(|_| message("later", 3_600_000)).collect();
            b.send(delayed).await.unwrap();
            let h = b.send_half("pg", message(&format!("half {i}"), 0)).await;
            halves.push(h.unwrap().transaction_id);
        }
        for chunk in [1, 2, 3, 4, 5, 4_096] {
            let ids = |limit| -> Vec<String> {
                b.list_transactions_in_chunks(limit, chunk)
                    .into_iter()
                    .map(|t| t.transaction_id)
                    .collect()
            };
            assert_eq!(ids(100), halves, "chunk {chunk}");
            assert_eq!(ids(3), halves[..3], "chunk {chunk}");
            assert_eq!(ids(1), halves[..1], "chunk {chunk}");
            assert!(ids(0).is_empty());
        }
        assert_eq!(b.list_transactions(100).len(), 4);
        b.shutdown().await.unwrap();
    }
}
