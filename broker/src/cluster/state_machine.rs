//! openraft's state machine over a replicated store: applying an entry
//! dispatches its records into the consume queues (`Store::dispatch_applied`)
//! and hands them to the broker core's [`Applier`]; the last applied log id
//! and membership travel with the store's checkpoint (its "applied note").
//!
//! Snapshots carry the state machine's description only so far; streaming
//! the retained segments with them is still to be built (ARCHITECTURE.md,
//! "Catch-up and snapshots"), so a snapshot is installed only on an empty
//! replica.

use std::io::{self, Cursor};
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
}

/// What a snapshot holds today (JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    membership: StoredMembership,
    /// Physical offset one past the last applied entry.
    log_end: u64,
}

/// The snapshot data handed to openraft.
pub type SnapshotData = Cursor<Vec<u8>>;
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
    current: Mutex<Option<(SnapshotMeta, Vec<u8>)>>,
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

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;

    async fn build_snapshot(&mut self) -> Result<Snapshot, io::Error> {
        let body = {
            let s = lock(&self.inner.state);
            SnapshotBody {
                last_applied: s.last_applied,
                membership: s.membership.clone(),
                log_end: self.inner.store.dispatched_end(),
            }
        };
        let meta = SnapshotMeta {
            last_log_id: body.last_applied,
            last_membership: body.membership.clone(),
        };
        let bytes = serde_json::to_vec(&body).map_err(io_err)?;
        *lock(&self.inner.current) = Some((meta.clone(), bytes.clone()));
        Ok(Snapshot {
            meta,
            snapshot: Cursor::new(bytes),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotData;
    type SnapshotBuilder = StateMachine;

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
        self.clone()
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotData,
    ) -> Result<(), io::Error> {
        let bytes = snapshot.into_inner();
        let body: SnapshotBody = serde_json::from_slice(&bytes).map_err(io_err)?;
        let store = &self.inner.store;
        let log = store.log();
        let empty = log.written_offset() == 0
            && store
                .entries()
                .is_some_and(|i| lock(i).is_empty() && lock(i).purged().is_none());
        if empty {
            log.restart_empty_at(body.log_end).map_err(io_err)?;
        } else if log.written_offset() != body.log_end {
            return Err(io_err(
                "installing a snapshot over existing entries is not supported yet: \
                 move this replica's data directory aside and let it catch up from the log",
            ));
        }
        let note = {
            let mut s = lock(&self.inner.state);
            s.last_applied = meta.last_log_id;
            s.membership = meta.last_membership.clone();
            s.membership_json = serde_json::to_vec(&s.membership).map_err(io_err)?;
            encode_note(&s)
        };
        store
            .dispatch_applied(&[], body.log_end, note)
            .map_err(io_err)?;
        *lock(&self.inner.current) = Some((meta.clone(), bytes));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, io::Error> {
        Ok(lock(&self.inner.current).clone().map(|(meta, b)| Snapshot {
            meta,
            snapshot: Cursor::new(b),
        }))
    }
}
