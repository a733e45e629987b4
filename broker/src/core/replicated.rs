//! The core of a broker group member (see ARCHITECTURE.md, "Replication"):
//! the leader's write path (queue offsets in log order, one proposal per
//! write) and apply, which every replica runs for every committed entry and
//! which alone changes the state the log determines: consume queues,
//! pending and resolved halves, the dedup index, topics.
//!
//! The replication layer is behind [`Replicator`], so that the core knows
//! nothing of openraft or of the network.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use bytes::Bytes;
use foldhash::HashMap;
use halfmq_storage::{AppendReceipt, MessageId, Record, RecordKind};

use super::dedup::{key_id, FirstSend};
use super::props::{deliver_at, prop, AS_OF_PROPERTY, IDEMPOTENCY_KEY_PROPERTY};
use super::transactions::state::apply_record;
use super::{lock, Broker};
use crate::cluster::types::{Applied, FirstSendWire, Outcome, Write};
use crate::cluster::ProposeError;
use crate::error::BrokerError;

/// A future the replication layer hands back.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the core needs of the replication layer.
pub trait Replicator: Send + Sync + 'static {
    /// Whether this replica may take writes and deliveries now: the leader,
    /// with everything committed before its term applied.
    fn serving(&self) -> bool;
    /// The current term.
    fn term(&self) -> u64;
    /// The leader's client address, when known.
    fn leader_address(&self) -> Option<String>;
    /// Submits a write behind every write submitted before; the returned
    /// future resolves once it is committed and applied here.
    fn submit(
        &self,
        w: Write,
    ) -> BoxFuture<'_, Result<BoxFuture<'static, Result<Applied, ProposeError>>, ProposeError>>;
    /// Retention agreed on through the log: this replica may drop what lies
    /// before physical offset `before` (entries from the log, then whole
    /// segments), in the background.
    fn compact_before(&self, before: u64);
}

/// Topic of the control records that create topics (property
/// `halfmq.topic` = name, `halfmq.queues` = queue count).
pub(crate) const TOPICS_TOPIC: &str = "%TOPICS%";
/// Topic of the leader's consumer-progress records: the body holds
/// `count u32 | (key_len u32, sled key, value_len u32, value)*` of keyspace
/// `groups`.
pub(crate) const PROGRESS_TOPIC: &str = "%PROGRESS%";
/// Topic of the control records declaring consumer groups (property
/// `halfmq.group` = name, `halfmq.fifo` = 1 or 0).
pub(crate) const GROUPS_TOPIC: &str = "%GROUPS%";
/// Topic of the control record that gives the group its MAC key (body: 32
/// bytes): the first one applied wins, on every member.
pub(crate) const SECRET_TOPIC: &str = "%SECRET%";
/// Topic of the leader's retention records (property `halfmq.before` = a
/// physical offset): every replica may delete what lies before it.
pub(crate) const RETAIN_TOPIC: &str = "%RETAIN%";
const BEFORE_PROPERTY: &str = "halfmq.before";
/// Present (sled keyspace `broker`) once this member took the group's key.
const GROUP_SECRET_KEY: &[u8] = b"group_secret";
const GROUP_PROPERTY: &str = "halfmq.group";
const FIFO_PROPERTY: &str = "halfmq.fifo";
const TOPIC_PROPERTY: &str = "halfmq.topic";
const QUEUES_PROPERTY: &str = "halfmq.queues";

/// The leader's sequencer: the next queue offset of each queue, counting
/// what was proposed and not yet applied. Valid for one term.
#[derive(Default)]
struct Sequencer {
    term: u64,
    next: HashMap<(String, u32), u64>,
}

/// A broker group member's replication state inside the core.
pub(crate) struct Replication {
    pub(crate) repl: Arc<dyn Replicator>,
    seq: tokio::sync::Mutex<Sequencer>,
    /// The retention boundary the leader's last retention pass found (a
    /// segment end), to be proposed.
    pub(crate) retain_wanted: AtomicU64,
    /// The highest retention boundary applied here since start-up.
    pub(crate) retain_applied: AtomicU64,
    /// The log's first offset when resolved halves were last pruned.
    pub(crate) pruned_at: AtomicU64,
}

impl Replication {
    pub(crate) fn new(repl: Arc<dyn Replicator>) -> Replication {
        Replication {
            repl,
            seq: tokio::sync::Mutex::new(Sequencer::default()),
            retain_wanted: AtomicU64::new(0),
            retain_applied: AtomicU64::new(0),
            pruned_at: AtomicU64::new(0),
        }
    }
}

/// The refusal of a replica that is not (yet) serving.
pub(crate) fn not_leader(r: &Replication) -> BrokerError {
    BrokerError::NotLeader(r.repl.leader_address())
}

impl From<ProposeError> for BrokerError {
    fn from(e: ProposeError) -> BrokerError {
        match e {
            ProposeError::NotLeader { leader } => BrokerError::NotLeader(leader),
            ProposeError::Stopped(m) => BrokerError::Internal(format!("replication stopped: {m}")),
        }
    }
}

/// The control record creating topic `name` with `queues` queues.
pub(crate) fn topic_record(name: &str, queues: u32) -> Record {
    Record {
        kind: RecordKind::System,
        topic: TOPICS_TOPIC.to_owned(),
        properties: vec![
            (TOPIC_PROPERTY.to_owned(), name.to_owned()),
            (QUEUES_PROPERTY.to_owned(), queues.to_string()),
        ],
        ..Record::default()
    }
}

/// The control record declaring consumer group `name`.
fn group_record(name: &str, fifo: bool) -> Record {
    Record {
        kind: RecordKind::System,
        topic: GROUPS_TOPIC.to_owned(),
        properties: vec![
            (GROUP_PROPERTY.to_owned(), name.to_owned()),
            (
                FIFO_PROPERTY.to_owned(),
                if fifo { "1" } else { "0" }.to_owned(),
            ),
        ],
        ..Record::default()
    }
}

/// The (sled key, value) pairs of a progress record's body.
pub(crate) fn decode_progress_pairs(body: &[u8]) -> Option<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = body.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let mut out = Vec::with_capacity((count as usize).min(1 << 16));
    for _ in 0..count {
        let kl = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let k = take(kl)?.to_vec();
        let vl = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let v = take(vl)?.to_vec();
        out.push((k, v));
    }
    Some(out)
}

/// A progress record of `pairs` (sled keyspace `groups`; see
/// [`PROGRESS_TOPIC`]) encoded when this member had applied up to `as_of`
/// (see `core/handoff.rs`).
fn progress_record(pairs: &[(Vec<u8>, Vec<u8>)], now_ms: u64, as_of: u64) -> Record {
    let mut body = Vec::new();
    body.extend_from_slice(&(pairs.len() as u32).to_le_bytes());
    for (k, v) in pairs {
        body.extend_from_slice(&(k.len() as u32).to_le_bytes());
        body.extend_from_slice(k);
        body.extend_from_slice(&(v.len() as u32).to_le_bytes());
        body.extend_from_slice(v);
    }
    Record {
        kind: RecordKind::System,
        topic: PROGRESS_TOPIC.to_owned(),
        body: Bytes::from(body),
        store_timestamp_ms: now_ms,
        properties: vec![(AS_OF_PROPERTY.to_owned(), as_of.to_string())],
        ..Record::default()
    }
}

fn wire(f: &FirstSend) -> FirstSendWire {
    FirstSendWire {
        offset: f.offset,
        end: f.end,
        message_id: f.message_id.0,
        queue_id: f.queue_id,
        queue_offset: f.queue_offset,
        deliver_at_ms: f.deliver_at_ms,
    }
}

/// The first send an [`Outcome::Duplicate`] names.
pub(crate) fn first_send(w: &FirstSendWire) -> FirstSend {
    FirstSend {
        offset: w.offset,
        end: w.end,
        message_id: MessageId(w.message_id),
        queue_id: w.queue_id,
        queue_offset: w.queue_offset,
        deliver_at_ms: w.deliver_at_ms,
    }
}

impl Broker {
    /// This member's replication, `None` for a single broker.
    pub(crate) fn replication(&self) -> Option<&Replication> {
        self.replication.get()
    }

    /// Connects the replication layer (once, at start-up).
    pub fn attach_replicator(&self, repl: Arc<dyn Replicator>) {
        if self.replication.set(Replication::new(repl)).is_err() {
            tracing::warn!("a replicator was attached twice; the first stays");
        }
    }

    /// Whether this member may serve writes and deliveries: always for a
    /// single broker; for a broker group member, only as the leader with its
    /// state complete.
    pub fn serving(&self) -> bool {
        self.replication().is_none_or(|r| r.repl.serving())
    }

    /// Refuses with `NOT_LEADER` unless [`Broker::serving`] and this
    /// member has taken up its leadership (reloaded consumer progress).
    ///
    /// # Errors
    /// [`BrokerError::NotLeader`] naming the leader when known.
    pub(crate) fn check_serving(&self) -> Result<(), BrokerError> {
        match self.replication() {
            Some(r)
                if !r.repl.serving()
                    || self.leader_term.load(Ordering::Acquire) != r.repl.term() =>
            {
                Err(not_leader(r))
            }
            _ => Ok(()),
        }
    }

    /// Takes up leadership of the current term: consumer progress is
    /// reloaded from what the progress records applied here say (every
    /// lease in it counts as cut off by a crash: delivered again, not
    /// failed), FIFO gates start empty. Blocking (sled reads).
    ///
    /// # Errors
    /// Storage errors reading the progress.
    pub(crate) fn take_up_leadership(&self, term: u64) -> Result<(), BrokerError> {
        // Held throughout: a hand-off applied meanwhile either lands in the
        // progress loaded or waits for the term to be taken up.
        let mut marks = lock(&self.handoff_marks);
        let (groups, consumer_groups) = super::progress::load_progress(&self.store, false)?;
        self.apply_held_marks(&groups, &mut marks);
        *lock(&self.groups) = groups;
        *lock(&self.consumer_groups) = consumer_groups;
        lock(&self.progress_outbox).clear();
        self.leader_term.store(term, Ordering::Release);
        drop(marks);
        tracing::info!(term, "took up leadership of the broker group");
        Ok(())
    }

    /// The leader's progress record: the consumer-progress snapshots saved
    /// since the last one, proposed as one record (none when nothing
    /// changed).
    ///
    /// # Errors
    /// As [`Broker::replicate`].
    pub(crate) async fn propose_progress(&self) -> Result<(), BrokerError> {
        if self.check_serving().is_err() {
            return Ok(());
        }
        let taken = std::mem::take(&mut *lock(&self.progress_outbox));
        let Some(as_of) = taken.iter().map(|(_, _, a)| *a).min() else {
            return Ok(());
        };
        let pairs: Vec<(Vec<u8>, Vec<u8>)> = taken.into_iter().map(|(k, v, _)| (k, v)).collect();
        let rec = progress_record(&pairs, self.now_ms(), as_of);
        self.replicate(vec![rec]).await.map(|_| ())
    }

    /// The leader's retention record, when its last retention pass found
    /// more to drop than was agreed on so far.
    ///
    /// # Errors
    /// As [`Broker::replicate`].
    pub(crate) async fn propose_retention(&self) -> Result<(), BrokerError> {
        let Some(r) = self.replication() else {
            return Ok(());
        };
        let wanted = r.retain_wanted.load(Ordering::Acquire);
        if wanted <= r.retain_applied.load(Ordering::Acquire) || self.check_serving().is_err() {
            return Ok(());
        }
        let rec = Record {
            kind: RecordKind::System,
            topic: RETAIN_TOPIC.to_owned(),
            properties: vec![(BEFORE_PROPERTY.to_owned(), wanted.to_string())],
            store_timestamp_ms: self.now_ms(),
            ..Record::default()
        };
        self.replicate(vec![rec]).await.map(|_| ())
    }

    /// A broker group member's retention pass (every
    /// `retention_check_interval_ms`, on every member): forgets resolutions
    /// of halves whose segments are gone; on the serving leader, also finds
    /// the next boundary to propose: the end of the last segment
    /// [`halfmq_storage::retention::plan`] would delete, never past what is
    /// applied here nor past an unresolved half.
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn group_retention(&self, r: &Replication) -> Result<(), BrokerError> {
        let min = self.store.log().min_offset();
        if min > r.pruned_at.swap(min, Ordering::AcqRel) {
            self.tx.prune_resolved(&self.store, min)?;
        }
        if self.check_serving().is_err() {
            return Ok(());
        }
        let min_pending = self.tx.min_pending_offset();
        let applied = self.store.dispatched_end();
        let segs = self.store.log().segments()?;
        let cfg = self.store.config();
        let doomed = halfmq_storage::retention::plan(
            &segs,
            self.clock.now_ms(),
            cfg.retention_ms,
            cfg.retention_bytes,
            &|s| s.end <= applied && min_pending.is_none_or(|m| s.end <= m),
        );
        if let Some(end) = doomed
            .last()
            .and_then(|b| segs.iter().find(|s| s.base == *b))
            .map(|s| s.end)
        {
            r.retain_wanted.fetch_max(end, Ordering::AcqRel);
        }
        Ok(())
    }

    /// What a snapshot taken here carries besides the log, as control
    /// records: applied before the log's entries, every topic, consumer
    /// group and the group's key (their own records may be gone with
    /// retention); applied after them, the consumer progress saved here.
    ///
    /// # Errors
    /// Storage errors reading sled.
    pub(crate) fn snapshot_records(&self) -> Result<(Vec<Record>, Vec<Record>), BrokerError> {
        let mut before = Vec::new();
        if self.group_secret_adopted() {
            before.push(Record {
                kind: RecordKind::System,
                topic: SECRET_TOPIC.to_owned(),
                body: Bytes::copy_from_slice(&self.secret.key_bytes()),
                ..Record::default()
            });
        }
        before.push(super::security::auth_record(
            &self.users.snapshot(),
            self.now_ms(),
        )?);
        let mut topics: Vec<(String, u32)> = self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(n, t)| (n.clone(), t.queues))
            .collect();
        topics.sort();
        before.extend(topics.iter().map(|(n, q)| topic_record(n, *q)));
        let mut groups: Vec<(String, bool)> = lock(&self.consumer_groups)
            .iter()
            .map(|(n, f)| (n.clone(), *f))
            .collect();
        groups.sort();
        before.extend(groups.iter().map(|(n, f)| group_record(n, *f)));
        let pairs = self
            .store
            .meta()
            .scan_prefix(super::progress::GROUPS_SPACE, b"")?;
        let after = vec![progress_record(
            &pairs,
            self.now_ms(),
            self.store.dispatched_end(),
        )];
        Ok((before, after))
    }

    /// Whether this member has taken the broker group's MAC key.
    pub(crate) fn group_secret_adopted(&self) -> bool {
        matches!(
            self.store.meta().get(super::BROKER_SPACE, GROUP_SECRET_KEY),
            Ok(Some(_))
        )
    }

    /// The first leader of a group gives it its MAC key (its own): proposed
    /// before it serves, so that every transaction id and receipt handle is
    /// made with a key all members share.
    ///
    /// # Errors
    /// As [`Broker::replicate`].
    pub(crate) async fn propose_group_secret(&self) -> Result<(), BrokerError> {
        let rec = Record {
            kind: RecordKind::System,
            topic: SECRET_TOPIC.to_owned(),
            body: Bytes::copy_from_slice(&self.secret.key_bytes()),
            store_timestamp_ms: self.now_ms(),
            ..Record::default()
        };
        self.replicate(vec![rec]).await.map(|_| ())
    }

    fn apply_secret(&self, body: &[u8]) {
        if self.group_secret_adopted() {
            return;
        }
        let Ok(key) = <[u8; super::secret::KEY_BYTES]>::try_from(body) else {
            tracing::error!("a group key record of the wrong size; ignored");
            return;
        };
        let adopted = self.secret.adopt(&self.cfg.data_dir, key).and_then(|()| {
            self.store
                .meta()
                .put(super::BROKER_SPACE, GROUP_SECRET_KEY, b"1")?;
            self.store.meta().flush()?;
            Ok(())
        });
        match adopted {
            Ok(()) => {
                tracing::info!("took the broker group's key (transaction ids, receipt handles)")
            }
            Err(e) => tracing::error!(error = %e, "could not take the broker group's key"),
        }
    }

    /// Declares a consumer group through the broker group's log.
    ///
    /// # Errors
    /// As [`Broker::replicate`].
    pub(crate) async fn replicate_consumer_group(
        &self,
        group: &str,
        fifo: bool,
    ) -> Result<(), BrokerError> {
        self.replicate(vec![group_record(group, fifo)])
            .await
            .map(|_| ())
    }

    /// Creates a topic through the broker group's log (a single broker:
    /// at once).
    ///
    /// # Errors
    /// As [`Broker::create_topic`] and [`Broker::replicate`].
    pub async fn create_topic_everywhere(
        &self,
        name: &str,
        queues: u32,
    ) -> Result<(), BrokerError> {
        if self.replication().is_none() {
            return self.create_topic(name, queues).map(|_| ());
        }
        self.check_serving()?;
        super::names::check_topic(name)?;
        if self.topic(name).is_some() {
            return Err(BrokerError::TopicExists(name.to_owned()));
        }
        let queues = self.queue_count(queues)?;
        self.replicate(vec![topic_record(name, queues)])
            .await
            .map(|_| ())
    }

    /// The leader's write: gives the dispatched records their queue offsets
    /// (in log order), proposes them as one entry and waits until it is
    /// committed and applied here. Returns where the records went and what
    /// apply made of each.
    ///
    /// # Errors
    /// [`BrokerError::NotLeader`] when this member is not serving or lost
    /// leadership before the commit (the write may still be committed by
    /// the next leader: retry with the same idempotency keys);
    /// [`BrokerError::MessageTooLarge`] for a record past the store's limit.
    pub(crate) async fn replicate(
        &self,
        mut records: Vec<Record>,
    ) -> Result<(AppendReceipt, Vec<Outcome>), BrokerError> {
        let r = self
            .replication()
            .ok_or_else(|| BrokerError::Internal("not a broker group member".into()))?;
        if !r.repl.serving() {
            return Err(not_leader(r));
        }
        let max_record = self.store.config().max_record_bytes;
        let pending = {
            let mut seq = r.seq.lock().await;
            let term = r.repl.term();
            if seq.term != term {
                // A new term: whatever an earlier one proposed is applied or
                // gone, so the applied queues are where to count from.
                seq.next.clear();
                seq.term = term;
            }
            let mut buf = Vec::with_capacity(records.iter().map(Record::encoded_len).sum());
            let mut queue_offsets = Vec::with_capacity(records.len());
            // Next offsets of the queues this entry uses (several records of
            // one queue take consecutive offsets).
            let mut assigned: HashMap<(String, u32), u64> = HashMap::default();
            for rec in &mut records {
                rec.queue_offset = None;
                if rec.kind.is_dispatched() {
                    let key = (rec.topic.clone(), rec.queue_id);
                    let next = match assigned.get(&key).or_else(|| seq.next.get(&key)) {
                        Some(n) => *n,
                        None => self
                            .store
                            .queue(&rec.topic, rec.queue_id)
                            .map_or(0, |q| q.next_offset()),
                    };
                    rec.queue_offset = Some(next);
                    assigned.insert(key, next + 1);
                }
                queue_offsets.push(rec.queue_offset);
                let before = buf.len();
                let n = rec.encode_into(&mut buf)?;
                if n > max_record {
                    buf.truncate(before);
                    return Err(halfmq_storage::Error::RecordTooLarge {
                        size_bytes: n,
                        limit_bytes: max_record,
                    }
                    .into());
                }
            }
            let pending = r.repl.submit(Write(Bytes::from(buf))).await?;
            // Submitted: the offsets are taken (a failed entry leaves holes
            // at worst, never two messages at one offset).
            for (key, next) in assigned {
                seq.next.insert(key, next);
            }
            (pending, queue_offsets)
        };
        let (pending, queue_offsets) = pending;
        let applied = pending.await.map_err(|e| match e {
            ProposeError::NotLeader { leader } => BrokerError::LeadershipLost(leader),
            other => other.into(),
        })?;
        Ok((
            AppendReceipt {
                offsets: applied.offsets,
                sizes: applied.sizes,
                queue_offsets,
                end: applied.end,
            },
            applied.outcomes,
        ))
    }

    /// Forgets the leader's next queue offsets of `topic` (deleted: a
    /// topic of the same name starts its queues at 0 again).
    pub(crate) async fn forget_queue_offsets_of(&self, topic: &str) {
        if let Some(r) = self.replication() {
            r.seq.lock().await.next.retain(|(t, _), _| t != topic);
        }
    }

    /// Applies one committed entry on this replica (see the module docs);
    /// `records` are the entry's records, back to back up to `end`:
    /// decides each record's fate the same way on every replica, dispatches
    /// the kept ones and records the entry applied.
    ///
    /// # Errors
    /// Storage errors of the consume queues.
    pub(crate) fn apply_entry(
        &self,
        records: &[(u64, Record)],
        end: u64,
        note: Vec<u8>,
    ) -> Result<Vec<Outcome>, halfmq_storage::Error> {
        let tx = self.tx();
        let mut outcomes = Vec::with_capacity(records.len());
        let mut keep: Vec<(u64, &Record)> = Vec::with_capacity(records.len());
        let mut notify: Vec<&str> = Vec::new();
        let mut halves = 0u64;
        let mut topics_created: Vec<(String, u32)> = Vec::new();
        let mut progress_bodies: Vec<(&Bytes, u64)> = Vec::new();
        let mut handoffs: Vec<super::handoff::Mark> = Vec::new();
        let mut groups_declared: Vec<(String, bool)> = Vec::new();
        let mut secrets: Vec<&Bytes> = Vec::new();
        let mut security: Vec<&Bytes> = Vec::new();
        let mut retain: Option<u64> = None;
        let mut changes: Vec<super::group_admin::GroupChange> = Vec::new();
        {
            let mut inner = tx.inner.lock();
            let mut dedup = lock(&self.dedup);
            for (i, (offset, r)) in records.iter().enumerate() {
                // The entry's records lie back to back up to its end.
                let size = records.get(i + 1).map_or(end, |n| n.0) - offset;
                let outcome = match r.kind {
                    RecordKind::Normal | RecordKind::Half => {
                        let key = prop(r, IDEMPOTENCY_KEY_PROPERTY).map(|k| key_id(&r.topic, k));
                        match key.and_then(|k| dedup.stored_at(k, r.store_timestamp_ms)) {
                            Some(first) => Outcome::Duplicate(wire(&first)),
                            None => {
                                if let Some(k) = key {
                                    dedup.stored(
                                        k,
                                        r.store_timestamp_ms,
                                        FirstSend {
                                            offset: *offset,
                                            end: offset + size,
                                            message_id: r.message_id,
                                            queue_id: r.queue_id,
                                            queue_offset: r.queue_offset,
                                            deliver_at_ms: deliver_at(r).unwrap_or(0),
                                        },
                                    );
                                }
                                if r.kind == RecordKind::Half {
                                    apply_record(&mut inner, *offset, r);
                                    halves += 1;
                                } else {
                                    keep.push((*offset, r));
                                    notify.push(&r.topic);
                                }
                                Outcome::Applied
                            }
                        }
                    }
                    RecordKind::TxCommit | RecordKind::TxRollback => {
                        let commit = r.kind == RecordKind::TxCommit;
                        match r.ref_offset {
                            Some(half) if inner.sched.get(half).is_some() => {
                                apply_record(&mut inner, *offset, r);
                                tx.release_outstanding(&mut inner, half);
                                if commit {
                                    keep.push((*offset, r));
                                    notify.push(&r.topic);
                                }
                                Outcome::Applied
                            }
                            Some(half) => match inner.recent.get(&half) {
                                Some(c) if *c == commit => Outcome::AlreadyEnded,
                                Some(_) => Outcome::Conflict,
                                None => Outcome::NotPending,
                            },
                            None => Outcome::NotPending,
                        }
                    }
                    RecordKind::System if r.topic == SECRET_TOPIC => {
                        secrets.push(&r.body);
                        Outcome::Applied
                    }
                    RecordKind::System if r.topic == super::security::AUTH_TOPIC => {
                        security.push(&r.body);
                        Outcome::Applied
                    }
                    RecordKind::System if r.topic == PROGRESS_TOPIC => {
                        progress_bodies.push((&r.body, super::handoff::as_of(r)));
                        Outcome::Applied
                    }
                    RecordKind::System if r.topic == GROUPS_TOPIC => {
                        let name = prop(r, GROUP_PROPERTY).unwrap_or_default().to_owned();
                        groups_declared.push((name, prop(r, FIFO_PROPERTY) == Some("1")));
                        Outcome::Applied
                    }
                    RecordKind::System
                        if r.topic == super::group_admin::DLQ_REMOVE_TOPIC
                            || r.topic == super::group_admin::TOPIC_DELETE_TOPIC =>
                    {
                        changes.extend(super::group_admin::change_of(r));
                        Outcome::Applied
                    }
                    RecordKind::System if r.topic == super::check_counts::CHECKS_TOPIC => {
                        self.apply_check_counts(&mut inner, &r.body);
                        Outcome::Applied
                    }
                    RecordKind::System if r.topic == RETAIN_TOPIC => {
                        if let Some(b) = prop(r, BEFORE_PROPERTY).and_then(|b| b.parse().ok()) {
                            retain = retain.max(Some(b));
                        }
                        Outcome::Applied
                    }
                    RecordKind::System if r.topic == TOPICS_TOPIC => {
                        let name = prop(r, TOPIC_PROPERTY).unwrap_or_default().to_owned();
                        let queues = prop(r, QUEUES_PROPERTY)
                            .and_then(|q| q.parse().ok())
                            .unwrap_or(0);
                        topics_created.push((name, queues));
                        Outcome::Applied
                    }
                    RecordKind::System => {
                        apply_record(&mut inner, *offset, r);
                        Outcome::Applied
                    }
                    RecordKind::Redelivery => {
                        handoffs.extend(super::handoff::source(r));
                        keep.push((*offset, r));
                        notify.push(&r.topic);
                        Outcome::Applied
                    }
                    _ => Outcome::Applied,
                };
                outcomes.push(outcome);
            }
        }
        for (name, queues) in topics_created {
            if let Err(e) = self.create_topic_unchecked(&name, queues, false) {
                tracing::error!(topic = %name, error = %e, "a replicated topic could not be created here");
            }
        }
        for b in secrets {
            self.apply_secret(b);
        }
        for b in security {
            self.apply_security(b);
        }
        for (name, fifo) in groups_declared {
            if let Err(e) = self.create_consumer_group(&name, fifo) {
                tracing::error!(group = %name, error = %e, "a replicated consumer group could not be declared here");
            }
        }
        self.apply_group_changes(changes);
        self.apply_progress_changes(&progress_bodies, handoffs, end);
        self.store.dispatch_applied(&keep, end, note)?;
        if let (Some(before), Some(r)) = (retain, self.replication()) {
            r.retain_applied.fetch_max(before, Ordering::AcqRel);
            r.repl.compact_before(before);
        }
        if halves > 0 {
            tx.wake.notify_one();
        }
        let mut last: Option<&str> = None;
        for t in notify {
            if last != Some(t) {
                self.notify_topic(t);
                last = Some(t);
            }
        }
        Ok(outcomes)
    }
}

/// The core's apply as the replication layer's state machine calls it.
pub struct CoreApplier {
    broker: Weak<Broker>,
}

impl CoreApplier {
    /// The applier of `broker`.
    pub fn new(broker: &Arc<Broker>) -> CoreApplier {
        CoreApplier {
            broker: Arc::downgrade(broker),
        }
    }
}

impl crate::cluster::state_machine::Applier for CoreApplier {
    fn apply(
        &self,
        _index: u64,
        records: &[(u64, Record)],
        end: u64,
        note: Vec<u8>,
    ) -> std::io::Result<Vec<Outcome>> {
        let b = self.broker()?;
        b.apply_entry(records, end, note)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    fn snapshot_records(&self) -> std::io::Result<(Vec<Record>, Vec<Record>)> {
        self.broker()?.snapshot_records().map_err(io_err)
    }

    fn apply_control(&self, records: Vec<Record>) -> std::io::Result<()> {
        let b = self.broker()?;
        let at = b.store.dispatched_end();
        let placed: Vec<(u64, Record)> = records.into_iter().map(|r| (at, r)).collect();
        b.apply_entry(&placed, at, b.store.applied_note())
            .map(|_| ())
            .map_err(io_err)
    }

    fn installed(&self) -> std::io::Result<()> {
        self.broker()?.save_state().map_err(io_err)
    }
}

impl CoreApplier {
    fn broker(&self) -> std::io::Result<Arc<Broker>> {
        self.broker
            .upgrade()
            .ok_or_else(|| std::io::Error::other("the broker stopped"))
    }
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}
