//! The transaction state of a broker: every unresolved half in the
//! check-back scheduler, recent resolutions, producer sessions, and what is
//! saved in sled so a restart rebuilds it (see the module docs of
//! `transactions`).

use foldhash::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use halfmq_storage::{Record, RecordKind, ScanItem, Store};
use tokio::sync::{mpsc, Notify};

use super::{CheckRequest, DELAY_GROUP, GIVEN_UP_TOPIC};
use crate::core::props::deliver_at;
use crate::core::props::PRODUCER_GROUP_PROPERTY;
use crate::core::txcheck::{CheckConfig, CheckScheduler, HalfState};
use crate::error::BrokerError;

const PENDING_SPACE: &str = "tx_pending";
const RESOLVED_SPACE: &str = "tx_resolved";
const META_SPACE: &str = "tx_meta";

#[derive(Debug, Default)]
pub(crate) struct Interner {
    pub(crate) names: Vec<String>,
    pub(crate) ids: HashMap<String, u32>,
}

impl Interner {
    pub(crate) fn id(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.ids.get(s) {
            return i;
        }
        let i = self.names.len() as u32;
        self.names.push(s.to_owned());
        self.ids.insert(s.to_owned(), i);
        i
    }
    pub(crate) fn name(&self, i: u32) -> &str {
        self.names.get(i as usize).map_or("", String::as_str)
    }
    pub(crate) fn id_of(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }
}

/// Resolutions kept in memory for repeated ends, most recent first out
/// last: about 40 bytes each. Older ones are found in the log.
const RESOLVED_CACHE_ENTRIES: usize = 65_536;

/// The last [`RESOLVED_CACHE_ENTRIES`] resolutions: half offset → commit?
#[derive(Default)]
pub(crate) struct ResolvedCache {
    pub(crate) map: HashMap<u64, bool>,
    pub(crate) order: std::collections::VecDeque<u64>,
}

impl ResolvedCache {
    pub(crate) fn insert(&mut self, offset: u64, commit: bool) {
        if self.map.insert(offset, commit).is_none() {
            self.order.push_back(offset);
            while self.order.len() > RESOLVED_CACHE_ENTRIES {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    pub(crate) fn get(&self, offset: &u64) -> Option<&bool> {
        self.map.get(offset)
    }

    pub(crate) fn contains_key(&self, offset: &u64) -> bool {
        self.map.contains_key(offset)
    }
}

pub(crate) struct TxInner {
    pub(crate) sched: CheckScheduler,
    pub(crate) strings: Interner,
    /// Recent resolutions (bounded); the log holds them all.
    pub(crate) recent: ResolvedCache,
    /// Pending offsets whose saved form changed since the last save.
    pub(crate) dirty: foldhash::HashSet<u64>,
    /// Pending offsets present in sled's `tx_pending` (only those need a delete
    /// when resolved: a half resolved between two saves costs no sled write).
    pub(crate) saved: foldhash::HashSet<u64>,
    /// Outstanding checks: half offset -> session id.
    pub(crate) outstanding: HashMap<u64, u64>,
    /// Log offsets written at recent saves (record boundaries), oldest
    /// first; the first is where a restart replays from (see `save`).
    pub(crate) save_points: std::collections::VecDeque<u64>,
    /// No unsaved pending half lies below this offset (so a save whose
    /// replay start is not past it need not look for aged halves).
    pub(crate) unsaved_from: u64,
}

pub(crate) struct Session {
    pub(crate) id: u64,
    pub(crate) group: String,
    pub(crate) topics: Vec<String>,
    /// The client it belongs to, when its API edge knows one (RocketMQ
    /// clients' `x-mq-client-id`): the halves that client sent are checked
    /// here first.
    pub(crate) client: Option<String>,
    pub(crate) tx: mpsc::Sender<CheckRequest>,
    pub(crate) inflight: Arc<AtomicUsize>,
    /// Checks sent to it whose reply timed out since its last answer.
    pub(crate) timeouts: u32,
}

/// A session whose checks timed out this many times in a row (no answer in
/// between) is **silent**: it gets checks only when every session of its
/// group is silent, and a check that times out on it while a session of the
/// group is not silent is sent again there without being counted.
pub const SILENT_AFTER_TIMEOUTS: u32 = 2;

impl Session {
    /// Whether it takes checks of `topic`.
    pub(crate) fn serves(&self, topic: &str) -> bool {
        self.topics.is_empty() || self.topics.iter().any(|t| t == topic)
    }

    /// See [`SILENT_AFTER_TIMEOUTS`].
    pub(crate) fn silent(&self) -> bool {
        self.timeouts >= SILENT_AFTER_TIMEOUTS
    }
}

/// The open producer sessions, by id and by producer group: opening and
/// closing one is O(log n), however many there are (50,000 closing at once
/// used to take seconds under this lock).
#[derive(Default)]
pub(crate) struct SessionTable {
    by_id: HashMap<u64, Session>,
    by_group: HashMap<String, std::collections::BTreeSet<u64>>,
}

impl SessionTable {
    pub(crate) fn insert(&mut self, s: Session) {
        self.by_group
            .entry(s.group.clone())
            .or_default()
            .insert(s.id);
        self.by_id.insert(s.id, s);
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<Session> {
        let s = self.by_id.remove(&id)?;
        if let Some(ids) = self.by_group.get_mut(&s.group) {
            ids.remove(&id);
            if ids.is_empty() {
                self.by_group.remove(&s.group);
            }
        }
        Some(s)
    }

    pub(crate) fn len(&self) -> usize {
        self.by_id.len()
    }

    pub(crate) fn get(&self, id: u64) -> Option<&Session> {
        self.by_id.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut Session> {
        self.by_id.get_mut(&id)
    }

    /// Producer groups with at least one session.
    pub(crate) fn groups(&self) -> impl Iterator<Item = &String> {
        self.by_group.keys()
    }

    pub(crate) fn has_group(&self, group: &str) -> bool {
        self.by_group.contains_key(group)
    }

    /// The sessions of `group`, in opening order.
    pub(crate) fn of_group<'a>(&'a self, group: &str) -> impl Iterator<Item = &'a Session> + 'a {
        self.by_group
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id))
    }
}

/// Transaction state of a broker.
pub struct TxState {
    pub(crate) cfg: CheckConfig,
    pub(crate) max_pending: usize,
    pub(crate) max_checks_per_session: usize,
    /// `transaction_replay_bytes`: how much log a restart may replay.
    pub(crate) replay_bytes: u64,
    /// parking_lot's: a long walk ([`Broker::list_transactions`]) can hand
    /// the lock to a waiter between chunks (`MutexGuard::bump`), which std's
    /// barging mutex cannot.
    pub(crate) inner: parking_lot::Mutex<TxInner>,
    pub(crate) sessions: Mutex<SessionTable>,
    pub(crate) next_session: AtomicU64,
    pub(crate) round_robin: AtomicUsize,
    /// Wakes the check driver (new half, new session).
    pub(crate) wake: Notify,
}

impl std::fmt::Debug for TxState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxState").field("cfg", &self.cfg).finish()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Mutations under these locks are a few map operations each; a panic
    // elsewhere cannot leave them half done.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn encode_half_state(s: &HalfState, group: &str, topic: &str) -> Vec<u8> {
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

pub(crate) fn decode_half_state(b: &[u8]) -> Option<(u64, u32, u64, bool, String, String)> {
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
        // What the state reflects: the log's end, or a replica's applied end
        // (the rest is applied again by the replication layer).
        let written = store.dispatched_end();
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
                Ok(ScanItem::Record(offset, _)) if offset >= written => break,
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
            sessions: Mutex::new(SessionTable::default()),
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
            let written = store.dispatched_end();
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
    pub(crate) fn resolution_of(
        &self,
        store: &Store,
        offset: u64,
    ) -> Result<Option<bool>, BrokerError> {
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

    /// Registers a producer session of `group` for `topics` (empty = all)
    /// and, if known, the `client` it belongs to; returns its id and the
    /// receiver of its check requests.
    ///
    /// # Errors
    /// [`BrokerError::TooManyRequests`] at `max_sessions`.
    pub fn open_session(
        &self,
        group: String,
        topics: Vec<String>,
        client: Option<String>,
        max_sessions: usize,
    ) -> Result<(u64, mpsc::Receiver<CheckRequest>), BrokerError> {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.max_checks_per_session.max(1));
        {
            let mut sessions = lock(&self.sessions);
            if sessions.len() >= max_sessions {
                return Err(BrokerError::TooManyRequests(format!(
                    "max_producer_sessions {max_sessions} reached; producer group {group} gets no session now (retry later)"
                )));
            }
            sessions.insert(Session {
                id,
                group: group.clone(),
                topics,
                client,
                tx,
                inflight: Arc::new(AtomicUsize::new(0)),
                timeouts: 0,
            });
        }
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
        Ok((id, rx))
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

    /// Given-up half messages (pending until resolved by hand). O(producer
    /// groups).
    pub fn given_up_count(&self) -> usize {
        self.inner.lock().sched.given_up_count()
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
        lock(&self.sessions).remove(id);
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

    pub(crate) fn has_session(&self, group: &str) -> bool {
        lock(&self.sessions).has_group(group)
    }

    /// A check sent to session `sid` timed out: counts it against the
    /// session, and returns whether another session of its group that is not
    /// silent can take the check instead (then the timeout is not counted
    /// against the half).
    pub(crate) fn session_timed_out(&self, sid: u64) -> bool {
        let mut sessions = lock(&self.sessions);
        let Some(s) = sessions.get_mut(sid) else {
            return false;
        };
        s.timeouts = s.timeouts.saturating_add(1);
        if s.timeouts == SILENT_AFTER_TIMEOUTS {
            tracing::warn!(session = sid, producer_group = %s.group, "producer session is silent (check-backs time out): it gets checks only when its group has no other");
        }
        let group = s.group.clone();
        let other = sessions
            .of_group(&group)
            .any(|o| o.id != sid && !o.silent());
        other
    }

    /// Session `sid` answered a check: it is not silent.
    pub(crate) fn session_answered(&self, sid: u64) {
        if let Some(s) = lock(&self.sessions).get_mut(sid) {
            s.timeouts = 0;
        }
    }

    /// The session a check of `offset` is out to, if any.
    pub(crate) fn check_holder(&self, offset: u64) -> Option<u64> {
        self.inner.lock().outstanding.get(&offset).copied()
    }

    pub(crate) fn release_outstanding(&self, inner: &mut TxInner, offset: u64) {
        if let Some(sid) = inner.outstanding.remove(&offset) {
            if let Some(s) = lock(&self.sessions).get(sid) {
                let _ = s
                    .inflight
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            }
        }
    }
}

/// Applies one replayed record to the state.
pub(crate) fn apply_record(inner: &mut TxInner, offset: u64, rec: &Record) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
