//! openraft's state machine over a replicated store: applying an entry
//! dispatches its records into the consume queues (`Store::dispatch_applied`)
//! and hands them to the broker core's [`Applier`]; the last applied log id
//! and membership travel with the store's checkpoint (its "applied note").
//!
//! A snapshot is the log itself: its description (last applied log id,
//! membership, the core's control records) is taken on the state machine's
//! task, and the entries it stands for are read from the commit log when it
//! is sent, from the first entry not purged up to the last applied one. A
//! replica installs it by writing those entries into its own log and
//! applying them as if they had just been committed (ARCHITECTURE.md,
//! "Catch-up and snapshots"). Only an empty replica installs a snapshot.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures_util::{Stream, TryStreamExt};
use halfmq_storage::{Record, Store};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};

use super::types::{
    io_err, Applied, CommittedLeaderId, LogId, Outcome, SnapshotMeta, StoredMembership, TypeConfig,
};

/// The broker core's side of apply: called for every committed normal
/// entry, in log order, on every replica. It decides what each record does
/// (the same way everywhere), dispatches what it keeps into the consume
/// queues and records the entry applied
/// (`Store::dispatch_applied(kept, end, note)`).
pub trait Applier: Send + Sync + 'static {
    /// Applies the records (`(physical offset, record)`) of the entry at
    /// `index` ending at `end`; returns one outcome per record.
    ///
    /// # Errors
    /// Storage errors (consensus stops on this replica: restart it).
    fn apply(
        &self,
        index: u64,
        records: &[(u64, Record)],
        end: u64,
        note: Vec<u8>,
    ) -> io::Result<Vec<Outcome>>;

    /// What a snapshot carries besides the log, as control records
    /// (topics, consumer groups, the group's key; consumer progress): the
    /// first list is applied before the log's entries, the second after.
    ///
    /// # Errors
    /// Storage errors.
    fn snapshot_records(&self) -> io::Result<(Vec<Record>, Vec<Record>)>;

    /// Applies control records of a snapshot being installed.
    ///
    /// # Errors
    /// Storage errors.
    fn apply_control(&self, records: Vec<Record>) -> io::Result<()>;

    /// Called once a snapshot's entries are applied: saves the whole state
    /// (a checkpoint), so that a restart resumes after the snapshot.
    ///
    /// # Errors
    /// Storage errors.
    fn installed(&self) -> io::Result<()>;
}

/// A snapshot's description (JSON): everything but the log's bytes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SnapshotBody {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Physical offset one past the last applied entry.
    log_end: u64,
    /// Encoded control records applied before the entries.
    #[serde(default)]
    before: Vec<Vec<u8>>,
    /// Encoded control records applied after the entries.
    #[serde(default)]
    after: Vec<Vec<u8>>,
}

/// The part of the log a snapshot carries, fixed when it is sent:
/// `[start, end)`, beginning with the entry after `purged`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRange {
    /// `(index, term)` of the entry before the first one carried.
    pub purged: Option<(u64, u64)>,
    /// Physical offset of the first byte carried.
    pub start: u64,
    /// Physical offset one past the last byte carried.
    pub end: u64,
}

impl LogRange {
    /// Bytes carried.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether no byte is carried.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Where a snapshot's log bytes are read from.
#[derive(Clone)]
enum Source {
    /// This replica's own log.
    Log(Arc<Store>),
    /// A file a snapshot stream was received into (bytes `range.start..`
    /// from its beginning).
    File { path: PathBuf, range: LogRange },
}

/// A snapshot as openraft handles it: its description and where its log
/// bytes are.
#[derive(Clone)]
pub struct SnapshotData {
    body: Arc<SnapshotBody>,
    source: Source,
}

impl SnapshotData {
    /// A received snapshot: its description (JSON) and the file holding
    /// its log bytes `range`.
    ///
    /// # Errors
    /// A description that does not parse.
    pub fn received(body_json: &[u8], path: PathBuf, range: LogRange) -> io::Result<SnapshotData> {
        let body: SnapshotBody = serde_json::from_slice(body_json).map_err(io_err)?;
        if body.log_end != range.end {
            return Err(io_err(format!(
                "the snapshot's log ends at {} but its description at {}",
                range.end, body.log_end
            )));
        }
        Ok(SnapshotData {
            body: Arc::new(body),
            source: Source::File { path, range },
        })
    }

    /// The description, as JSON.
    ///
    /// # Errors
    /// Serialization errors.
    pub fn body_json(&self) -> io::Result<Vec<u8>> {
        serde_json::to_vec(&*self.body).map_err(io_err)
    }

    /// The log bytes carried: from the first entry the source log still
    /// holds up to the snapshot's last applied entry.
    ///
    /// # Errors
    /// When the log was purged past the snapshot (a newer one is due).
    pub fn range(&self) -> io::Result<LogRange> {
        match &self.source {
            Source::File { range, .. } => Ok(*range),
            Source::Log(store) => {
                let (purged, start) = match store.entries() {
                    Some(i) => {
                        let i = lock(i);
                        (i.purged(), i.end_of_purged())
                    }
                    None => (None, 0),
                };
                let last = self.body.last_applied.map(|l| l.index);
                if purged.is_some_and(|(p, _)| Some(p) > last) || start > self.body.log_end {
                    return Err(io_err(
                        "the log was purged past this snapshot; a newer one is needed",
                    ));
                }
                Ok(LogRange {
                    purged,
                    start,
                    end: self.body.log_end,
                })
            }
        }
    }

    /// The log bytes `[at, at + len)` of `range`.
    ///
    /// # Errors
    /// I/O errors; bytes the source does not hold any more.
    pub fn read(&self, range: &LogRange, at: u64, len: usize) -> io::Result<bytes::Bytes> {
        match &self.source {
            Source::Log(store) => store.log().read_raw(at, len).map_err(io_err),
            Source::File { path, .. } => {
                use std::os::unix::fs::FileExt;
                let f = std::fs::File::open(path)?;
                let mut buf = vec![0u8; len];
                f.read_exact_at(&mut buf, at - range.start)?;
                Ok(bytes::Bytes::from(buf))
            }
        }
    }
}

impl std::fmt::Debug for SnapshotData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotData")
            .field("last_applied", &self.body.last_applied)
            .field("log_end", &self.body.log_end)
            .finish()
    }
}

type Snapshot = openraft::Snapshot<CommittedLeaderId, u64, openraft::BasicNode, SnapshotData>;

#[derive(Default)]
struct Applied_ {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// The membership's JSON, cached for the applied note.
    membership_json: Vec<u8>,
}

/// The state machine (and its snapshot builder: clones share everything).
#[derive(Clone)]
pub struct StateMachine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<Store>,
    applier: Option<Arc<dyn Applier>>,
    state: Mutex<Applied_>,
    current: Mutex<Option<(SnapshotMeta, Arc<SnapshotBody>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The applied note: `term u64 | index u64 | has u8 | membership JSON`.
fn encode_note(s: &Applied_) -> Vec<u8> {
    let mut v = Vec::with_capacity(17 + s.membership_json.len());
    let (t, i) = s
        .last_applied
        .map_or((0, 0), |l| (l.leader_id.term, l.index));
    v.extend_from_slice(&t.to_le_bytes());
    v.extend_from_slice(&i.to_le_bytes());
    v.push(u8::from(s.last_applied.is_some()));
    v.extend_from_slice(&s.membership_json);
    v
}

fn decode_note(b: &[u8]) -> io::Result<Applied_> {
    if b.is_empty() {
        return Ok(Applied_::default());
    }
    if b.len() < 17 {
        return Err(io_err("the applied note is cut short"));
    }
    let u = |r: std::ops::Range<usize>| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[r]);
        u64::from_le_bytes(a)
    };
    let last_applied = (b[16] == 1).then(|| super::types::log_id(u(0..8), u(8..16)));
    let membership_json = b[17..].to_vec();
    let membership: StoredMembership = if membership_json.is_empty() {
        StoredMembership::default()
    } else {
        serde_json::from_slice(&membership_json).map_err(io_err)?
    };
    Ok(Applied_ {
        last_applied,
        membership,
        membership_json,
    })
}

impl StateMachine {
    /// The state machine of a replicated `store`, resuming from what its
    /// last checkpoint applied.
    ///
    /// # Errors
    /// A damaged applied note.
    pub fn open(store: Arc<Store>, applier: Option<Arc<dyn Applier>>) -> io::Result<StateMachine> {
        let state = decode_note(&store.applied_note())?;
        Ok(StateMachine {
            inner: Arc::new(Inner {
                store,
                applier,
                state: Mutex::new(state),
                current: Mutex::new(None),
            }),
        })
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    /// The last applied log id.
    pub fn last_applied(&self) -> Option<LogId> {
        lock(&self.inner.state).last_applied
    }

    /// Applies one entry: its records (normal entries) go to the consume
    /// queues and the applier; the store records it as applied.
    fn apply_one(&self, entry: &super::types::Entry) -> io::Result<Applied> {
        let store = &self.inner.store;
        let index = entry.log_id.index;
        let pos = store.entries().and_then(|i| lock(i).get(index));
        // A blank or membership entry carries nothing for the queues: one the
        // log does not hold (openraft's suite applies such entries directly)
        // only moves the applied log id.
        let end = match (&pos, &entry.payload) {
            (Some(p), _) => p.end(),
            (None, EntryPayload::Normal(_)) => {
                return Err(io_err(format!(
                    "applying entry {index}, which the log does not hold"
                )))
            }
            (None, _) => store.dispatched_end(),
        };
        let mut out = Applied {
            end,
            ..Applied::default()
        };
        let mut records = Vec::new();
        if let EntryPayload::Normal(w) = &entry.payload {
            let mut at = end - w.0.len() as u64;
            let mut rest = w.0.clone();
            while !rest.is_empty() {
                let n = halfmq_storage::record::peek_len(&rest)
                    .filter(|n| *n <= rest.len() && *n > 0)
                    .ok_or_else(|| io_err(format!("entry {index} holds a cut-off record")))?;
                let rec = Record::decode(rest.split_to(n), at).map_err(io_err)?;
                out.offsets.push(at);
                out.sizes.push(n as u32);
                records.push((at, rec));
                at += n as u64;
            }
        }
        let note = {
            let mut s = lock(&self.inner.state);
            s.last_applied = Some(entry.log_id);
            if let EntryPayload::Membership(m) = &entry.payload {
                s.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                s.membership_json = serde_json::to_vec(&s.membership).map_err(io_err)?;
            }
            encode_note(&s)
        };
        match &self.inner.applier {
            Some(a) if !records.is_empty() => {
                out.outcomes = a.apply(index, &records, end, note)?;
            }
            _ => {
                let refs: Vec<(u64, &Record)> = records.iter().map(|(o, r)| (*o, r)).collect();
                store.dispatch_applied(&refs, end, note).map_err(io_err)?;
            }
        }
        Ok(out)
    }
}

/// Builds the snapshot described when it was made (on the state
/// machine's task, between two applies).
pub struct SnapshotBuilder {
    sm: StateMachine,
    body: Result<SnapshotBody, String>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let body = Arc::new(
            std::mem::replace(
                &mut self.body,
                Err("this snapshot was built already".into()),
            )
            .map_err(io_err)?,
        );
        let meta = SnapshotMeta {
            last_log_id: body.last_applied,
            last_membership: body.membership.clone(),
        };
        *lock(&self.sm.inner.current) = Some((meta.clone(), Arc::clone(&body)));
        Ok(Snapshot {
            meta,
            snapshot: SnapshotData {
                body,
                source: Source::Log(Arc::clone(&self.sm.inner.store)),
            },
        })
    }
}

impl StateMachine {
    /// The description of a snapshot of what is applied now.
    fn describe(&self) -> io::Result<SnapshotBody> {
        let (before, after) = match &self.inner.applier {
            Some(a) => a.snapshot_records()?,
            None => (Vec::new(), Vec::new()),
        };
        let enc = |v: Vec<Record>| -> io::Result<Vec<Vec<u8>>> {
            v.iter().map(|r| r.encode().map_err(io_err)).collect()
        };
        let s = lock(&self.inner.state);
        Ok(SnapshotBody {
            last_applied: s.last_applied,
            membership: s.membership.clone(),
            log_end: self.inner.store.dispatched_end(),
            before: enc(before)?,
            after: enc(after)?,
        })
    }

    /// Installs `data` on this (empty) replica; see the module docs. A
    /// marker file (`raft/installing`) stands while it runs: a replica
    /// whose install was cut off refuses to start.
    fn install(&self, meta: &SnapshotMeta, data: &SnapshotData) -> io::Result<()> {
        let store = &self.inner.store;
        let log = store.log();
        let idx = store
            .entries()
            .ok_or_else(|| io_err("the store is not replicated"))?;
        // Nothing applied here yet: whatever the log holds (a member that
        // lost its data proposes the group again at start-up, an entry
        // never committed) is superseded by the snapshot.
        let empty = lock(&self.inner.state).last_applied.is_none()
            && store.dispatched_end() == 0
            && lock(idx).purged().is_none();
        let range = data.range()?;
        if empty && log.written_offset() > 0 {
            store.truncate_entries_after(None).map_err(io_err)?;
        }
        if !empty {
            if log.written_offset() == range.end && store.dispatched_end() == range.end {
                // What this replica has applied already (openraft's own
                // tests install a snapshot of an empty log this way).
                return self.finish_install(meta, range.end);
            }
            return Err(io_err(
                "a snapshot must be installed on this replica, which is not empty: \
                 it fell behind the group's retention. Stop it, move its data directory \
                 aside and start it again: it catches up from the leader",
            ));
        }
        let flag = installing_flag(store.data_dir());
        std::fs::write(&flag, b"installing a snapshot\n")?;
        log.restart_empty_at(range.start).map_err(io_err)?;
        if let Some((i, t)) = range.purged {
            lock(idx).purge(i, t, range.start).map_err(io_err)?;
        }
        copy_entries(store, data, &range)?;
        log.sync_now().map_err(io_err)?;
        let decode = |v: &[Vec<u8>]| -> io::Result<Vec<Record>> {
            v.iter()
                .map(|b| Record::decode(bytes::Bytes::copy_from_slice(b), 0).map_err(io_err))
                .collect()
        };
        let applier = self.inner.applier.as_ref();
        if let Some(a) = applier {
            a.apply_control(decode(&data.body.before)?)?;
        }
        let first = range.purged.map_or(0, |(i, _)| i + 1);
        let rows: Vec<halfmq_storage::EntryPos> = lock(idx).range(first, u64::MAX).to_vec();
        for p in &rows {
            let bytes = log.read_raw(p.offset, p.size as usize).map_err(io_err)?;
            let entry = super::log_store::decode_entry(p, bytes)?;
            self.apply_one(&entry)?;
        }
        if let Some(a) = applier {
            a.apply_control(decode(&data.body.after)?)?;
        }
        self.finish_install(meta, range.end)?;
        match applier {
            Some(a) => a.installed()?,
            None => {
                store.checkpoint().map_err(io_err)?;
            }
        }
        lock(idx).sync().map_err(io_err)?;
        std::fs::remove_file(&flag)?;
        tracing::info!(
            last = ?meta.last_log_id, entries = rows.len(), bytes = range.len(),
            "installed a snapshot"
        );
        Ok(())
    }

    fn finish_install(&self, meta: &SnapshotMeta, end: u64) -> io::Result<()> {
        let note = {
            let mut s = lock(&self.inner.state);
            s.last_applied = meta.last_log_id;
            s.membership = meta.last_membership.clone();
            s.membership_json = serde_json::to_vec(&s.membership).map_err(io_err)?;
            encode_note(&s)
        };
        self.inner
            .store
            .dispatch_applied(&[], end, note)
            .map_err(io_err)
    }
}

/// The file standing while a snapshot is installed.
pub fn installing_flag(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("raft").join("installing")
}

/// Bytes read from a snapshot's source at a time when copying it.
const COPY_CHUNK_BYTES: usize = 4 << 20;

/// Writes the entries of `range` from `data` into the (empty) log of
/// `store`, whole entries at a time.
fn copy_entries(store: &Store, data: &SnapshotData, range: &LogRange) -> io::Result<()> {
    let mut at = range.start;
    let mut want = COPY_CHUNK_BYTES;
    while at < range.end {
        let n = (range.end - at).min(want as u64) as usize;
        let buf = data.read(range, at, n)?;
        let mut entries: Vec<(u64, u64, bytes::Bytes, bytes::Bytes)> = Vec::new();
        let mut off = 0usize;
        while off < buf.len() {
            let rest = &buf[off..];
            let Some(mlen) = halfmq_storage::record::peek_len(rest).filter(|m| *m <= rest.len())
            else {
                break;
            };
            let marker =
                Record::decode(buf.slice(off..off + mlen), at + off as u64).map_err(io_err)?;
            let pos = halfmq_storage::marker_pos(at + off as u64, &marker).ok_or_else(|| {
                io_err(format!(
                    "the snapshot's log has no entry marker at offset {}",
                    at + off as u64
                ))
            })?;
            let size = pos.size as usize;
            if off + size > buf.len() {
                break;
            }
            entries.push((
                pos.index,
                pos.term,
                buf.slice(off..off + mlen),
                buf.slice(off + mlen..off + size),
            ));
            off += size;
        }
        if entries.is_empty() {
            if n as u64 == range.end - at {
                return Err(io_err(format!(
                    "the snapshot's log ends inside the entry at offset {at}"
                )));
            }
            // One entry larger than the chunk: read more at once.
            want = want.saturating_mul(2);
            continue;
        }
        let parts: Vec<(u64, u64, &[u8], &[u8])> = entries
            .iter()
            .map(|(i, t, m, p)| (*i, *t, &m[..], &p[..]))
            .collect();
        store.append_entries(&parts).map_err(io_err)?;
        at += off as u64;
        want = COPY_CHUNK_BYTES;
    }
    Ok(())
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        let s = lock(&self.inner.state);
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<S>(&mut self, mut entries: S) -> Result<(), io::Error>
    where
        S: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        while let Some((entry, responder)) = entries.try_next().await? {
            let applied = self.apply_one(&entry)?;
            if let Some(r) = responder {
                r.send(applied);
            }
        }
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            sm: self.clone(),
            body: self.describe().map_err(|e| e.to_string()),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let sm = self.clone();
        let m = meta.clone();
        let data = snapshot.clone();
        tokio::task::spawn_blocking(move || sm.install(&m, &data))
            .await
            .map_err(io_err)??;
        if let Source::File { path, .. } = &snapshot.source {
            let _ = std::fs::remove_file(path);
        }
        *lock(&self.inner.current) = Some((meta.clone(), Arc::clone(&snapshot.body)));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(lock(&self.inner.current)
            .clone()
            .map(|(meta, body)| Snapshot {
                meta,
                snapshot: SnapshotData {
                    body,
                    source: Source::Log(Arc::clone(&self.inner.store)),
                },
            }))
    }
}
