//! Transactional messages: half messages, EndTransaction, check-back.
//!
//! # What is written
//! - A half message is one `Half` record (body, keys, properties; the producer
//!   group in the system property `halfmq.producer_group`). It gets no queue
//!   offset: no consumer can see it.
//! - A commit is one small `TxCommit` record (no body) pointing at the half;
//!   its consume-queue entry points at the half, so the body is written once.
//!   A rollback is one small `TxRollback` record. A half given up after
//!   `check_max` checks gets a small `System` record in the system topic
//!   `%TRANS_CHECK_MAX_TIME%`. Checking a half writes nothing.
//!
//! # State
//! In memory: the [`CheckScheduler`] (every unresolved half, deadline-ordered)
//! and a bounded cache of recent resolutions. In sled, saved at every broker
//! checkpoint: the pending halves that outlived a checkpoint (`tx_pending`)
//! and the log offset they reflect (`tx_meta/scan_from`). A half resolved
//! between two checkpoints costs no sled write at all. Resolutions live in
//! the log only: a repeated end of a half no longer pending is answered from
//! the cache, else by reading forward from the half to its end record.
//!
//! # Restart
//! Load `tx_pending` and `scan_from`, then replay every transactional record
//! of the commit log from `scan_from`: halves are added (unless already
//! known), ends remove them and record the resolution, give-up records mark
//! them. Every step is idempotent, so a checkpoint torn between sled trees is
//! harmless. Records of tx kinds are appended under the tx lock, so the
//! snapshot offset and the in-memory state always agree.
//!
//! # Transaction id
//! `<physical offset of the half, 16 hex digits><message id, 32 hex digits>`.

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use halfmq_storage::{MessageId, Record, RecordKind, ScanItem, Store};
use tokio::sync::{mpsc, Notify};

use crate::broker::{Broker, DeliveredMessage, OutgoingMessage, Receipt};
use crate::error::BrokerError;
use crate::names::check_group;
use crate::txcheck::{CheckConfig, CheckScheduler, Due, HalfState};

/// System property holding a half's producer group.
pub const PRODUCER_GROUP_PROPERTY: &str = "halfmq.producer_group";
/// Prefix of system properties; user properties may not use it.
pub const SYSTEM_PROPERTY_PREFIX: &str = "halfmq.";
/// System topic of given-up halves (RocketMQ: TRANS_CHECK_MAX_TIME_TOPIC).
pub const GIVEN_UP_TOPIC: &str = "%TRANS_CHECK_MAX_TIME%";
/// System producer group of delayed messages: a delayed send is stored as a
/// half of this group, due at its delivery time, and committed then by the
/// check driver instead of being checked (no client can use `%` names).
pub const DELAY_GROUP: &str = "%DELAY%";

/// Index entries [`Broker::list_transactions`] looks at per hold of the
/// transaction lock.
const LIST_SCAN_CHUNK: usize = 4_096;

/// System property holding a delayed message's delivery time, ms since the
/// epoch by the broker's clock: the one retries use (one name, one meaning).
pub use crate::redelivery::DELIVER_AT_PROPERTY;

/// The delivery time of a delayed message's record, if it is one.
fn deliver_at(rec: &Record) -> Option<u64> {
    rec.properties
        .iter()
        .find(|(k, _)| k == DELIVER_AT_PROPERTY)
        .and_then(|(_, v)| v.parse().ok())
}

const PENDING_SPACE: &str = "tx_pending";
const RESOLVED_SPACE: &str = "tx_resolved";
const META_SPACE: &str = "tx_meta";

/// How a transaction ended, or a checker's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Make the message visible.
    Commit,
    /// Discard it.
    Rollback,
    /// (Checker answers only.) Not known yet.
    Unknown,
}

/// Who ended a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndSource {
    /// The producer that sent the half.
    Producer,
    /// A check-back answer.
    Check,
    /// An operator (`halfmq tx end`).
    Operator,
}

/// A transaction id: the half's physical offset and its message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransactionId {
    /// Physical offset of the half record.
    pub offset: u64,
    /// The half's message id.
    pub message_id: MessageId,
}

impl TransactionId {
    /// 48 hex digits.
    pub fn encode(&self) -> String {
        format!("{:016X}{}", self.offset, self.message_id)
    }

    /// Parses [`TransactionId::encode`]'s form.
    ///
    /// # Errors
    /// [`BrokerError::InvalidTransactionId`].
    pub fn decode(s: &str) -> Result<TransactionId, BrokerError> {
        let bad = || BrokerError::InvalidTransactionId(s.to_owned());
        if s.len() != 48 || !s.is_ascii() {
            return Err(bad());
        }
        let offset = u64::from_str_radix(&s[..16], 16).map_err(|_| bad())?;
        let message_id = MessageId::from_hex(&s[16..]).ok_or_else(bad)?;
        Ok(TransactionId { offset, message_id })
    }
}

/// A broker-clock time for people: RFC 3339, UTC, milliseconds.
fn clock_text(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Why a pending half is still pending, and what comes next, for
/// `tx pending`: every half gets a note.
fn pending_note(
    s: &HalfState,
    group: &str,
    has_session: bool,
    now: u64,
    cfg: &CheckConfig,
) -> String {
    let checks = match s.check_times {
        1 => "1 check".to_owned(),
        n => format!("{n} checks"),
    };
    if s.given_up {
        return format!(
            "given up after {checks} (check_max) went unanswered or answered unknown; \
             resolve with `halfmq tx end TRANSACTION_ID --commit|--rollback`"
        );
    }
    if s.checking {
        return format!(
            "check {} sent to a session of {group}, awaiting its answer until {}",
            s.check_times,
            clock_text(s.due_ms)
        );
    }
    let first_check = s.stored_ms + cfg.transaction_timeout_ms;
    if now < first_check {
        return format!(
            "younger than transaction_timeout ({} ms): first check at {}",
            cfg.transaction_timeout_ms,
            clock_text(first_check.max(s.due_ms))
        );
    }
    if !has_session {
        return format!(
            "no live session of producer group {group}; checks wait for one to open ({checks} so far)"
        );
    }
    if s.check_times == 0 {
        if s.due_ms <= now {
            format!("first check due now, waiting for a session of {group} with room")
        } else {
            format!("first check at {}", clock_text(s.due_ms))
        }
    } else if s.due_ms <= now {
        format!("answered unknown to {checks}; next check due now")
    } else {
        format!(
            "answered unknown (or unanswered) to {checks}; next check at {}",
            clock_text(s.due_ms)
        )
    }
}

/// A check request for a producer session.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    /// Transaction id.
    pub transaction_id: String,
    /// Producer group.
    pub producer_group: String,
    /// This check's number for the half: 1 for the first check-back.
    pub check_times: u32,
    /// The half message.
    pub message: DeliveredMessage,
}

/// An unresolved half for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTransaction {
    /// Transaction id.
    pub transaction_id: String,
    /// Message id.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Producer group.
    pub producer_group: String,
    /// Since stored, ms.
    pub age_ms: u64,
    /// Checks delivered.
    pub check_times: u32,
    /// Given up.
    pub given_up: bool,
    /// Why it is still pending.
    pub note: String,
}

/// Result of a half send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfReceipt {
    /// Transaction id.
    pub transaction_id: String,
    /// Message id.
    pub message_id: MessageId,
    /// Queue id it will be delivered in.
    pub queue_id: u32,
}

#[derive(Debug, Default)]
struct Interner {
    names: Vec<String>,
    ids: HashMap<String, u32>,
}

impl Interner {
    fn id(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.ids.get(s) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(s.to_owned());
        self.ids.insert(s.to_owned(), i);
        i
    }
    fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map_or("", String::as_str)
    }
    fn id_of(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
}

/// Resolutions kept in memory for repeated ends, most recent first out
/// last: about 40 bytes each. Older ones are found in the log.
const RESOLVED_CACHE_ENTRIES: usize = 65_536;

/// The last [`RESOLVED_CACHE_ENTRIES`] resolutions: half offset → commit?
#[derive(Default)]
struct ResolvedCache {
    map: HashMap<u64, bool>,
    order: std::collections::VecDeque<u64>,
}

impl ResolvedCache {
    fn insert(&mut self, offset: u64, commit: bool) {
        if self.map.insert(offset, commit).is_none() {
            self.order.push_back(offset);
            while self.order.len() > RESOLVED_CACHE_ENTRIES {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    fn get(&self, offset: &u64) -> Option<&bool> {
        self.map.get(offset)
    }

    fn contains_key(&self, offset: &u64) -> bool {
        self.map.contains_key(offset)
    }
}

struct TxInner {
    sched: CheckScheduler,
    strings: Interner,
    /// Recent resolutions (bounded); the log holds them all.
    recent: ResolvedCache,
    /// Pending offsets whose saved form changed since the last save.
    dirty: foldhash::HashSet<u64>,
    /// Pending offsets present in sled's `tx_pending` (only those need a delete
    /// when resolved: a half resolved between two saves costs no sled write).
    saved: foldhash::HashSet<u64>,
    /// Outstanding checks: half offset -> session id.
    outstanding: HashMap<u64, u64>,
    /// Log offsets written at recent saves (record boundaries), oldest
    /// first; the first is where a restart replays from (see `save`).
    save_points: std::collections::VecDeque<u64>,
    /// No unsaved pending half lies below this offset (so a save whose
    /// replay start is not past it need not look for aged halves).
    unsaved_from: u64,
}

struct Session {
    id: u64,
    group: String,
    topics: Vec<String>,
    tx: mpsc::Sender<CheckRequest>,
    inflight: Arc<AtomicUsize>,
}

/// Transaction state of a broker.
pub struct TxState {
    cfg: CheckConfig,
    max_pending: usize,
    max_checks_per_session: usize,
    /// `transaction_replay_bytes`: how much log a restart may replay.
    replay_bytes: u64,
    /// parking_lot's: a long walk ([`Broker::list_transactions`]) can hand
    /// the lock to a waiter between chunks (`MutexGuard::bump`), which std's
    /// barging mutex cannot.
    inner: parking_lot::Mutex<TxInner>,
    sessions: Mutex<Vec<Session>>,
    next_session: AtomicU64,
    round_robin: AtomicUsize,
    /// Wakes the check driver (new half, new session).
    pub(crate) wake: Notify,
}

impl std::fmt::Debug for TxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxState").field("cfg", &self.cfg).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Mutations under these locks are a few map operations each; a panic
    // elsewhere cannot leave them half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn encode_half_state(s: &HalfState, group: &str, topic: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + group.len() + topic.len());
    v.extend_from_slice(&s.stored_ms.to_le_bytes());
    v.extend_from_slice(&s.check_times.to_le_bytes());
    v.extend_from_slice(&s.due_ms.to_le_bytes());
    v.push(u8::from(s.given_up));
    v.extend_from_slice(&(group.len() as u16).to_le_bytes());
    v.extend_from_slice(group.as_bytes());
    v.extend_from_slice(&(topic.len() as u16).to_le_bytes());
    v.extend_from_slice(topic.as_bytes());
    v
}

fn decode_half_state(b: &[u8]) -> Option<(u64, u32, u64, bool, String, String)> {
    let mut p = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(p..p + n)?;
        p += n;
        Some(s)
    };
    let stored = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let checks = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let due = u64::from_le_bytes(take(8)?.try_into().ok()?);
    let given_up = take(1)?[0] != 0;
    let gl = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
    let g = String::from_utf8(take(gl)?.to_vec()).ok()?;
    let tl = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
    let t = String::from_utf8(take(tl)?.to_vec()).ok()?;
    Some((stored, checks, due, given_up, g, t))
}

impl TxState {
    /// Rebuilds the transaction state from sled and the commit log.
    ///
    /// # Errors
    /// Storage errors.
    pub fn load(
        store: &Store,
        cfg: CheckConfig,
        max_pending: usize,
        max_checks_per_session: usize,
        replay_bytes: u64,
    ) -> Result<TxState, BrokerError> {
        let mut inner = TxInner {
            sched: CheckScheduler::new(cfg),
            strings: Interner::default(),
            recent: ResolvedCache::default(),
            dirty: foldhash::HashSet::default(),
            saved: foldhash::HashSet::default(),
            outstanding: HashMap::default(),
            save_points: std::collections::VecDeque::new(),
            unsaved_from: 0,
        };
        let meta = store.meta();
        let written = store.log().written_offset();
        for (k, v) in meta.scan_prefix(PENDING_SPACE, b"")? {
            let (Ok(kb), Some((stored, checks, due, given_up, g, t))) =
                (<[u8; 8]>::try_from(k.as_slice()), decode_half_state(&v))
            else {
                tracing::error!("unreadable pending-half entry in metadata; skipped");
                continue;
            };
            let offset = u64::from_be_bytes(kb);
            if offset >= written {
                // Saved only after the log was synced past it; a log cut
                // shorter than that lost the half (reported by recovery).
                tracing::error!(offset, "pending half beyond the recovered log; dropped");
                continue;
            }
            let (group, topic) = (inner.strings.id(&g), inner.strings.id(&t));
            inner.saved.insert(offset);
            inner.sched.restore(
                offset,
                HalfState {
                    group,
                    topic,
                    stored_ms: stored,
                    check_times: checks,
                    due_ms: due,
                    checking: false,
                    given_up,
                },
            );
        }
        let scan_from = match meta.get(META_SPACE, b"scan_from")? {
            Some(v) => <[u8; 8]>::try_from(v.as_slice()).map_or(0, u64::from_be_bytes),
            None => 0,
        };
        let scan_from = scan_from.max(store.log().min_offset()).min(written);
        inner.save_points.push_back(scan_from);
        let mut replayed = 0u64;
        let mut skipped_bytes = 0u64;
        for item in store.log().scan_from(scan_from) {
            match item {
                Ok(ScanItem::Record(offset, rec)) => {
                    replayed += 1;
                    apply_record(&mut inner, offset, &rec);
                }
                Ok(ScanItem::Skipped(r)) => {
                    // Whatever was in it (halves, ends, delayed messages) is
                    // unreadable; everything around it is replayed.
                    skipped_bytes += r.end - r.start;
                    tracing::error!(
                        start = r.start, end = r.end, reason = %r.reason,
                        "transaction replay stepped over an unreadable commit-log range: a half, end or delayed message in it is lost (an end lost there leaves its half pending: it is checked back)"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "transaction replay stopped at an I/O error");
                    break;
                }
            }
        }
        tracing::info!(
            pending = inner.sched.len(),
            scan_from,
            replayed,
            skipped_bytes,
            "transaction state rebuilt"
        );
        Ok(TxState {
            cfg,
            max_pending,
            max_checks_per_session,
            replay_bytes,
            inner: parking_lot::Mutex::new(inner),
            sessions: Mutex::new(Vec::new()),
            next_session: AtomicU64::new(1),
            round_robin: AtomicUsize::new(0),
            wake: Notify::new(),
        })
    }

    /// Smallest offset of an unresolved half (retention keeps its segment).
    pub fn min_pending_offset(&self) -> Option<u64> {
        self.inner.lock().sched.min_offset()
    }

    /// Number of unresolved halves.
    pub fn pending_count(&self) -> usize {
        self.inner.lock().sched.len()
    }

    /// Saves what a restart could not rebuild from the last
    /// `transaction_replay_bytes` of the log: pending halves that were
    /// checked or given up (their counts are not in the log), and every
    /// pending half older than the replay start. A restart loads those and
    /// replays the log from that start (a record boundary: the log end at an
    /// earlier save). Most halves are resolved long before they age out of
    /// the replay window and cost no sled write (sled's memory per key is
    /// large: ~290 bytes per saved half, measured). `sync_log` must make the
    /// log durable past every record the state reflects (the broker passes
    /// the store checkpoint).
    ///
    /// # Errors
    /// Storage errors.
    pub fn save(
        &self,
        store: &Store,
        sync_log: impl FnOnce() -> Result<(), BrokerError>,
    ) -> Result<(), BrokerError> {
        let (scan_from, pending, removed) = {
            let mut inner = self.inner.lock();
            let written = store.log().written_offset();
            let inner = &mut *inner;
            inner.save_points.push_back(written);
            let target = written.saturating_sub(self.replay_bytes);
            while inner.save_points.len() >= 2 && inner.save_points[1] <= target {
                inner.save_points.pop_front();
            }
            let scan_from = inner.save_points[0];
            let dirty = std::mem::take(&mut inner.dirty);
            let mut pending = Vec::new();
            let mut removed = Vec::new();
            let mut save = |inner: &mut TxInner, off: u64, s: &HalfState| {
                let v =
                    encode_half_state(s, inner.strings.name(s.group), inner.strings.name(s.topic));
                inner.saved.insert(off);
                pending.push((off, v));
            };
            for off in dirty {
                match inner.sched.get(off).copied() {
                    Some(s) => {
                        if inner.saved.contains(&off)
                            || s.check_times > 0
                            || s.given_up
                            || off < scan_from
                        {
                            save(inner, off, &s);
                        }
                    }
                    None => {
                        if inner.saved.remove(&off) {
                            removed.push(off);
                        }
                    }
                }
            }
            // Halves the replay start has passed since the last save (one
            // pass over the index, only when the start may have passed one).
            if scan_from > inner.unsaved_from {
                let mut lowest_left = written;
                let mut aged: Vec<(u64, HalfState)> = Vec::new();
                for (o, s) in inner.sched.iter() {
                    if inner.saved.contains(&o) {
                        continue;
                    }
                    if o < scan_from {
                        aged.push((o, *s));
                    } else {
                        lowest_left = lowest_left.min(o);
                    }
                }
                inner.unsaved_from = lowest_left;
                for (off, s) in aged {
                    save(inner, off, &s);
                }
            }
            (scan_from, pending, removed)
        };
        sync_log()?;
        let meta = store.meta();
        for (off, v) in &pending {
            meta.put(PENDING_SPACE, &off.to_be_bytes(), v)?;
        }
        for off in &removed {
            meta.remove(PENDING_SPACE, &off.to_be_bytes())?;
        }
        meta.put(META_SPACE, b"scan_from", &scan_from.to_be_bytes())?;
        meta.flush()?;
        Ok(())
    }

    /// Drops resolutions saved in sled by earlier versions (which kept every
    /// resolution there) for halves below `min_offset` (their segments were
    /// deleted by retention).
    ///
    /// # Errors
    /// Storage errors.
    pub fn prune_resolved(&self, store: &Store, min_offset: u64) -> Result<usize, BrokerError> {
        let meta = store.meta();
        let mut n = 0;
        for (k, _) in meta.scan_prefix(RESOLVED_SPACE, b"")? {
            match <[u8; 8]>::try_from(k.as_slice()) {
                Ok(b) if u64::from_be_bytes(b) < min_offset => {
                    meta.remove(RESOLVED_SPACE, &k)?;
                    n += 1;
                }
                Ok(_) => break, // big-endian keys: sorted by offset
                Err(_) => {}
            }
        }
        Ok(n)
    }

    /// How the half at `offset` (no longer pending) was resolved: the
    /// recent-resolution cache, then sled (resolutions saved by earlier
    /// versions), then the log itself, read forward from the half to its end
    /// record (a resolved half always has one after it, so the scan is as
    /// long as the transaction was open). `None`: no end record found.
    fn resolution_of(&self, store: &Store, offset: u64) -> Result<Option<bool>, BrokerError> {
        if let Some(&c) = self.inner.lock().recent.get(&offset) {
            return Ok(Some(c));
        }
        if let Some(b) = store
            .meta()
            .get(RESOLVED_SPACE, &offset.to_be_bytes())?
            .and_then(|v| v.first().copied())
        {
            return Ok(Some(b == 1));
        }
        for item in store.log().scan_from(offset) {
            let rec = match item {
                Ok(ScanItem::Record(_, rec)) => rec,
                Ok(ScanItem::Skipped(_)) => continue,
                Err(_) => break,
            };
            if rec.ref_offset == Some(offset)
                && matches!(rec.kind, RecordKind::TxCommit | RecordKind::TxRollback)
            {
                let commit = rec.kind == RecordKind::TxCommit;
                self.inner.lock().recent.insert(offset, commit);
                return Ok(Some(commit));
            }
        }
        Ok(None)
    }

    /// Registers a producer session; returns its id and the receiver of its
    /// check requests.
    pub fn open_session(
        &self,
        group: String,
        topics: Vec<String>,
    ) -> (u64, mpsc::Receiver<CheckRequest>) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.max_checks_per_session.max(1));
        lock(&self.sessions).push(Session {
            id,
            group: group.clone(),
            topics,
            tx,
            inflight: Arc::new(AtomicUsize::new(0)),
        });
        tracing::info!(session = id, producer_group = %group, "producer session opened");
        {
            let mut inner = self.inner.lock();
            let g = inner.strings.id(&group);
            let n = inner.sched.unpark_group(g);
            if n > 0 {
                tracing::info!(producer_group = %group, halves = n, "producer group unparked: its halves are checked again");
            }
        }
        self.wake.notify_one();
        (id, rx)
    }

    /// (Unresolved half messages, delayed messages not yet due). O(1).
    pub fn pending_counts(&self) -> (usize, usize) {
        let inner = self.inner.lock();
        // A delayed message is never given up, so its group's queue holds
        // them all.
        let delayed = inner
            .strings
            .id_of(DELAY_GROUP)
            .map_or(0, |g| inner.sched.queued_in(g));
        (inner.sched.len() - delayed, delayed)
    }

    /// Pending (half messages, delayed messages) of `topic`. O(pending):
    /// for operator actions such as topic deletion.
    pub fn pending_in_topic(&self, topic: &str) -> (usize, usize) {
        let inner = self.inner.lock();
        let Some(t) = inner.strings.id_of(topic) else {
            return (0, 0);
        };
        let delay = inner.strings.id_of(DELAY_GROUP);
        let (mut halves, mut delayed) = (0, 0);
        for (_, s) in inner.sched.iter().filter(|(_, s)| s.topic == t) {
            if Some(s.group) == delay {
                delayed += 1;
            } else {
                halves += 1;
            }
        }
        (halves, delayed)
    }

    /// Open producer sessions.
    pub fn session_count(&self) -> usize {
        lock(&self.sessions).len()
    }

    /// Removes a session. Its unanswered checks are due again at once (for
    /// another session of the group, or parked when there is none) and are
    /// not counted: the producer may never have seen them.
    pub fn close_session(&self, id: u64) {
        lock(&self.sessions).retain(|s| s.id != id);
        let lost = {
            let mut inner = self.inner.lock();
            let offsets: Vec<u64> = inner
                .outstanding
                .iter()
                .filter(|&(_, &sid)| sid == id)
                .map(|(&o, _)| o)
                .collect();
            let now = halfmq_storage::now_ms();
            for &o in &offsets {
                inner.outstanding.remove(&o);
                inner.sched.check_lost(o, now);
                inner.dirty.insert(o);
            }
            offsets.len()
        };
        tracing::info!(
            session = id,
            unanswered_checks = lost,
            "producer session closed"
        );
        if lost > 0 {
            self.wake.notify_one();
        }
    }

    fn has_session(&self, group: &str) -> bool {
        lock(&self.sessions).iter().any(|s| s.group == group)
    }

    fn release_outstanding(&self, inner: &mut TxInner, offset: u64) {
        if let Some(sid) = inner.outstanding.remove(&offset) {
            if let Some(s) = lock(&self.sessions).iter().find(|s| s.id == sid) {
                let _ = s
                    .inflight
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
        }
    }
}

fn conflict_or_ok(transaction_id: &str, was_commit: bool, commit: bool) -> Result<(), BrokerError> {
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

/// Applies one replayed record to the state.
fn apply_record(inner: &mut TxInner, offset: u64, rec: &Record) {
    match rec.kind {
        RecordKind::Half
            if inner.sched.get(offset).is_none() && !inner.recent.contains_key(&offset) =>
        {
            let group = rec
                .properties
                .iter()
                .find(|(k, _)| k == PRODUCER_GROUP_PROPERTY)
                .map_or("", |(_, v)| v.as_str());
            let (g, t) = (inner.strings.id(group), inner.strings.id(&rec.topic));
            match deliver_at(rec) {
                Some(due) => inner
                    .sched
                    .add_at(offset, g, t, rec.store_timestamp_ms, due),
                None => inner.sched.add(offset, g, t, rec.store_timestamp_ms),
            }
            inner.dirty.insert(offset);
        }
        RecordKind::TxCommit | RecordKind::TxRollback => {
            if let Some(half) = rec.ref_offset {
                inner.sched.remove(half);
                inner.dirty.insert(half);
                inner.recent.insert(half, rec.kind == RecordKind::TxCommit);
            }
        }
        RecordKind::System if rec.topic == GIVEN_UP_TOPIC => {
            if let Some(half) = rec.ref_offset {
                if let Some(mut s) = inner.sched.get(half).copied() {
                    s.given_up = true;
                    inner.sched.restore(half, s);
                    inner.dirty.insert(half);
                }
            }
        }
        _ => {}
    }
}

/// Strips system properties before a message is shown to a consumer or checker.
pub fn user_properties(props: Vec<(String, String)>) -> Vec<(String, String)> {
    props
        .into_iter()
        .filter(|(k, _)| !k.starts_with(SYSTEM_PROPERTY_PREFIX))
        .collect()
}

impl Broker {
    fn tx(&self) -> &TxState {
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
        self.check_running_pub()?;
        check_group(producer_group)?;
        let mut records = self.build_records_pub(msgs, RecordKind::Half)?;
        for r in &mut records {
            r.properties.push((
                PRODUCER_GROUP_PROPERTY.to_owned(),
                producer_group.to_owned(),
            ));
        }
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
        let (offsets, end) = {
            let mut inner = tx.inner.lock();
            if inner.sched.len() + records.len() > tx.max_pending {
                return Err(BrokerError::TooManyPendingHalves(tx.max_pending));
            }
            let r = self.store().append(records)?;
            let g = inner.strings.id(producer_group);
            for (off, (_, _, topic, stored_ms)) in r.offsets.iter().zip(&meta) {
                let t = inner.strings.id(topic);
                inner.sched.add(*off, g, t, *stored_ms);
                inner.dirty.insert(*off);
            }
            (r.offsets, r.end)
        };
        self.wait_durable(end).await?;
        self.counters
            .halves_in
            .fetch_add(offsets.len() as u64, Ordering::Relaxed);
        tx.wake.notify_one();
        Ok(offsets
            .into_iter()
            .zip(meta)
            .map(|(offset, (message_id, queue_id, _, _))| HalfReceipt {
                transaction_id: TransactionId { offset, message_id }.encode(),
                message_id,
                queue_id,
            })
            .collect())
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
    ) -> Result<Vec<crate::broker::SendReceipt>, BrokerError> {
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
        self.wait_durable(receipt.end).await?;
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
            out.push(crate::broker::SendReceipt {
                message_id,
                queue_id,
                queue_offset: receipt.queue_offsets[i],
                deliver_at_ms: due.unwrap_or(0),
            });
        }
        Ok(out)
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
        self.check_running_pub()?;
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
        if self.check_running_pub().is_err() {
            return ends
                .iter()
                .map(|_| Err(BrokerError::ShuttingDown))
                .collect();
        }
        let tx = self.tx();
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
                let id = TransactionId::decode(tid)?;
                match self.store().log().read(id.offset) {
                    Ok(r) if r.kind == RecordKind::Half && r.message_id == id.message_id => {
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
        // 2. Under the tx lock: end records for the pending ones, one append.
        let mut lookup_later: Vec<usize> = Vec::new();
        // (index, half offset, commit, topic, a delayed message)
        let mut appended: Vec<(usize, u64, bool, String, bool)> = Vec::new();
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
        // 4. One durability wait for every end record.
        let durable = match end {
            None => Ok(()),
            Some(Ok(end)) => self.wait_durable(end).await.map_err(|e| e.to_string()),
            Some(Err(e)) => Err(e),
        };
        let mut topics = std::collections::BTreeSet::new();
        for (i, _, commit, topic, delayed) in appended {
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

    /// A checker's answer from session `session_id`.
    pub async fn check_answer(
        &self,
        session_id: u64,
        transaction_id: &str,
        resolution: Resolution,
    ) {
        let Ok(id) = TransactionId::decode(transaction_id) else {
            tracing::warn!(
                session_id,
                transaction_id,
                "check answer with a malformed transaction id"
            );
            return;
        };
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
                let tx = self.tx();
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

    async fn give_up(&self, offset: u64) {
        let tx = self.tx();
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
    fn list_transactions_in_chunks(&self, limit: usize, chunk: usize) -> Vec<PendingTransaction> {
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
                    transaction_id: TransactionId { offset, message_id }.encode(),
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

    /// One pass of the check driver: sends every due check. Returns when the
    /// next thing is due (ms), if anything is pending.
    pub async fn run_due_checks(&self) -> Option<u64> {
        let tx = self.tx();
        // Bounded per pass so one pass never runs long; the lock is taken per
        // chunk so sends and ends are never held up for long.
        for _chunk in 0..100 {
            let now = self.now_ms();
            let mut to_send = Vec::new();
            let mut to_deliver = Vec::new();
            let mut timed_out = Vec::new();
            let more = {
                let mut inner = tx.inner.lock();
                // Groups with a live session, read under the transaction
                // lock: a session registered after this read unparks (under
                // the same lock, in `open_session`) whatever this chunk
                // parks. Read once per pass instead, a session opening
                // between that read and the park was missed and its group's
                // halves stayed parked, unchecked, until another one opened.
                let live_ids: Vec<u32> = {
                    let sessions = lock(&tx.sessions);
                    let mut v: Vec<u32> = sessions
                        .iter()
                        .map(|s| inner.strings.id(&s.group))
                        .collect();
                    v.sort_unstable();
                    v.dedup();
                    v
                };
                let delay_group = inner.strings.id(DELAY_GROUP);
                let mut handled = 0;
                while handled < 1024 && to_send.len() < 64 {
                    let Some(due) = inner.sched.next_due(now) else {
                        break;
                    };
                    handled += 1;
                    match due {
                        Due::ReplyTimedOut { offset, given_up } => {
                            tx.release_outstanding(&mut inner, offset);
                            inner.dirty.insert(offset);
                            timed_out.push((offset, given_up));
                        }
                        Due::Check(offset) => {
                            let group = inner.sched.get(offset).map(|s| s.group);
                            if group == Some(delay_group) {
                                // A delayed message is due: commit it. Looked at
                                // again in 1 s should that fail.
                                inner.sched.defer(offset, now + 1_000);
                                to_deliver.push(offset);
                            } else if group.is_some_and(|g| live_ids.contains(&g)) {
                                // Defer it a moment so this loop moves on; send_check reschedules.
                                inner.sched.defer(offset, now + 1);
                                to_send.push(offset);
                            } else {
                                inner.sched.park(offset);
                            }
                        }
                    }
                }
                handled == 1024 || to_send.len() == 64
            };
            for (offset, given_up) in timed_out {
                tracing::debug!(offset, "check reply timed out; counted as UNKNOWN");
                if given_up {
                    self.give_up(offset).await;
                }
            }
            for offset in to_send {
                self.send_check(offset, now);
            }
            self.deliver_delayed(to_deliver).await;
            if !more {
                break;
            }
            tokio::task::yield_now().await;
        }
        tx.inner.lock().sched.next_due_ms()
    }

    /// Commits due delayed messages (one append, one durability wait).
    async fn deliver_delayed(&self, offsets: Vec<u64>) {
        if offsets.is_empty() {
            return;
        }
        let mut ends = Vec::with_capacity(offsets.len());
        for offset in offsets {
            match self.store().log().read(offset) {
                Ok(r) => ends.push((
                    TransactionId {
                        offset,
                        message_id: r.message_id,
                    }
                    .encode(),
                    Resolution::Commit,
                )),
                Err(e) => {
                    tracing::error!(offset, error = %e, "cannot read a due delayed message; retrying")
                }
            }
        }
        let tids: Vec<String> = ends.iter().map(|(t, _)| t.clone()).collect();
        for (tid, r) in tids
            .iter()
            .zip(self.end_transactions(ends, EndSource::Check).await)
        {
            if let Err(e) = r {
                tracing::error!(transaction_id = %tid, error = %e, "delayed message not delivered yet; retrying");
            }
        }
    }

    fn send_check(&self, offset: u64, now: u64) {
        let tx = self.tx();
        let (group, topic, check_times) = {
            let inner = tx.inner.lock();
            match inner.sched.get(offset) {
                Some(s) => (
                    inner.strings.name(s.group).to_owned(),
                    inner.strings.name(s.topic).to_owned(),
                    s.check_times,
                ),
                None => return,
            }
        };
        let half = match self.store().log().read(offset) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(offset, error = %e, "cannot read half for a check; retrying later");
                tx.inner.lock().sched.no_session(offset, now);
                return;
            }
        };
        let req = CheckRequest {
            transaction_id: TransactionId {
                offset,
                message_id: half.message_id,
            }
            .encode(),
            producer_group: group.clone(),
            // This check's number, from 1 (RocketMQ counts the same way).
            check_times: check_times + 1,
            message: DeliveredMessage {
                message_id: half.message_id,
                topic: half.topic.clone(),
                queue_id: half.queue_id,
                queue_offset: 0,
                tag: half.tag,
                keys: half.keys,
                properties: user_properties(half.properties),
                body: half.body,
                reconsume_times: 0,
                receipt: Receipt {
                    topic: half.topic,
                    queue_id: half.queue_id,
                    queue_offset: 0,
                    seq: 0,
                    retry: false,
                },
                store_timestamp_ms: half.store_timestamp_ms,
                invisible_until_ms: 0,
                retry: false,
                original_queue_offset: None,
            },
        };
        // Pick a live session of the group that declared this topic (or all
        // topics) and has room, round robin across instances.
        let sent_to = {
            let sessions = lock(&tx.sessions);
            let candidates: Vec<&Session> = sessions
                .iter()
                .filter(|s| s.group == group && (s.topics.is_empty() || s.topics.contains(&topic)))
                .collect();
            let start = tx.round_robin.fetch_add(1, Ordering::Relaxed);
            let mut sent = None;
            let mut any = false;
            for i in 0..candidates.len() {
                let s = candidates[(start + i) % candidates.len()];
                any = true;
                if s.inflight.load(Ordering::Acquire) >= tx.max_checks_per_session {
                    continue;
                }
                if s.tx.try_send(req.clone()).is_ok() {
                    s.inflight.fetch_add(1, Ordering::AcqRel);
                    sent = Some(s.id);
                    break;
                }
            }
            (sent, any)
        };
        let mut inner = tx.inner.lock();
        match sent_to {
            (Some(sid), _) => {
                inner.sched.check_sent(offset, now);
                inner.outstanding.insert(offset, sid);
                inner.dirty.insert(offset);
            }
            // Sessions exist but all are full: not an attempt, look again soon.
            (None, true) => inner.sched.defer(offset, now + 200),
            (None, false) => inner.sched.park(offset),
        }
    }
}

/// Runs the check driver until `stop` fires: wakes at the next due time,
/// on a new half or session, and at least every second.
pub(crate) async fn check_driver(
    broker: Arc<Broker>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let next = broker.run_due_checks().await;
        let wait_ms = next.map_or(1000, |d| d.saturating_sub(broker.now_ms()).clamp(1, 1000));
        let tx = broker.tx();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(wait_ms)) => {}
            _ = tx.wake.notified() => {}
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BrokerConfig;

    #[test]
    fn every_pending_half_gets_a_note() {
        let cfg = CheckConfig {
            transaction_timeout_ms: 6_000,
            check_interval_ms: 30_000,
            check_max: 3,
            check_reply_timeout_ms: 10_000,
        };
        let half = HalfState {
            group: 0,
            topic: 0,
            stored_ms: 1_000,
            check_times: 0,
            due_ms: 7_000,
            checking: false,
            given_up: false,
        };
        let note =
            |s: HalfState, session: bool, now: u64| pending_note(&s, "pg", session, now, &cfg);
        let young = note(half, true, 2_000);
        assert!(young.starts_with("younger than transaction_timeout (6000 ms): first check at 1970-01-01T00:00:07.000Z"), "{young}");
        assert!(note(half, false, 8_000).contains("no live session of producer group pg"));
        assert!(note(half, true, 8_000).contains("first check due now"));
        let checked = HalfState {
            check_times: 2,
            due_ms: 40_000,
            ..half
        };
        assert!(note(checked, true, 20_000)
            .contains("to 2 checks; next check at 1970-01-01T00:00:40.000Z"));
        let out = HalfState {
            checking: true,
            check_times: 1,
            due_ms: 18_000,
            ..half
        };
        assert!(note(out, true, 9_000)
            .starts_with("check 1 sent to a session of pg, awaiting its answer until"));
        let given_up = HalfState {
            given_up: true,
            check_times: 3,
            ..half
        };
        assert!(note(given_up, true, 99_000).contains("given up after 3 checks"));
        for (s, session, now) in [
            (half, true, 2_000),
            (half, false, 8_000),
            (half, true, 8_000),
            (checked, true, 20_000),
            (checked, true, 50_000),
            (out, true, 9_000),
            (given_up, false, 1),
        ] {
            assert!(!note(s, session, now).is_empty());
        }
    }

    #[test]
    fn transaction_id_round_trip() {
        let id = TransactionId {
            offset: 123_456,
            message_id: MessageId([0xAB; 16]),
        };
        let s = id.encode();
        assert_eq!(s.len(), 48);
        assert_eq!(TransactionId::decode(&s).unwrap(), id);
        assert!(TransactionId::decode("zz").is_err());
        assert!(TransactionId::decode(&"G".repeat(48)).is_err());
    }

    #[test]
    fn half_state_encoding() {
        let s = HalfState {
            group: 0,
            topic: 0,
            stored_ms: 5,
            check_times: 2,
            due_ms: 9,
            checking: false,
            given_up: true,
        };
        let d = decode_half_state(&encode_half_state(&s, "pg", "orders")).unwrap();
        assert_eq!(d, (5, 2, 9, true, "pg".into(), "orders".into()));
        assert!(decode_half_state(&[1, 2]).is_none());
    }

    fn message(body: &str, delay_ms: u64) -> OutgoingMessage {
        OutgoingMessage {
            topic: "orders".into(),
            queue: crate::broker::QueueChoice::RoundRobin,
            tag: String::new(),
            keys: Vec::new(),
            properties: Vec::new(),
            body: bytes::Bytes::copy_from_slice(body.as_bytes()),
            delay_ms,
        }
    }

    #[tokio::test]
    async fn listing_skips_delayed_messages_and_resumes_between_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = BrokerConfig {
            data_dir: dir.path().to_path_buf(),
            ..BrokerConfig::default()
        };
        let b = Broker::open(cfg, Arc::new(crate::broker::SystemClock)).unwrap();
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
