//! One replica of a broker group: its openraft instance, configuration,
//! start-up (forming the group on first start), proposals, status and
//! membership changes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use halfmq_proto::raft as pb;
use halfmq_storage::Store;
use openraft::async_runtime::watch::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};

use super::log_store::LogStore;
use super::network::{members, Network};
use super::state_machine::{installing_flag, Applier, StateMachine};
use super::types::{Applied, TypeConfig, Write};

/// The openraft instance of a replica.
pub type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Settings of a replica (`--node-id`, `--peers` and the `raft_*` keys).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// This replica's node id (`--node-id`).
    pub node_id: u64,
    /// Every member's id and client address at first start (`--peers`),
    /// this node included.
    pub peers: BTreeMap<u64, String>,
    /// How often the leader sends heartbeats, in milliseconds. Default 100.
    pub heartbeat_interval_ms: u64,
    /// A follower that hears no leader for a random time in
    /// `[election_timeout_min_ms, election_timeout_max_ms)` starts an
    /// election; the maximum is also how long a leader's lease keeps
    /// followers from voting. Defaults 500 and 1,000: failover in about 2 s
    /// (lease, timeout, election), with room for a loaded machine where
    /// openraft's own 150/300 bring needless elections.
    pub election_timeout_min_ms: u64,
    /// See `election_timeout_min_ms`.
    pub election_timeout_max_ms: u64,
    /// Most entries in one AppendEntries. Default 300 (openraft's).
    pub max_payload_entries: u64,
    /// Bytes per chunk of a streamed snapshot. Default 3 MiB (openraft's).
    pub snapshot_chunk_bytes: usize,
    /// Largest snapshot a replica accepts, in bytes of log. Default 1 TiB.
    pub max_snapshot_bytes: usize,
    /// How long sending a snapshot may take, in milliseconds. Default 600,000.
    pub install_snapshot_timeout_ms: u64,
    /// How long a connection attempt to a peer may take, in milliseconds.
    /// Default 1,000.
    pub connect_timeout_ms: u64,
    /// The IP address connections to peers leave from: the listen
    /// address's, when it names one (not `0.0.0.0` or `::`). Default none
    /// (the system picks).
    pub local_ip: Option<std::net::IpAddr>,
    /// Joins a group that exists already (`join`): never proposes `peers`
    /// as a new group. Default false.
    pub join: bool,
    /// Signs this member's RPCs to the others (with the group's secret,
    /// when auth is on). Default: signs nothing.
    pub signer: halfmq_proto::auth::Signer,
    /// TLS of this member's connections to the others (`[tls]`). Default
    /// none: plaintext.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

impl ClusterConfig {
    /// Defaults for `node_id` among `peers`.
    pub fn new(node_id: u64, peers: BTreeMap<u64, String>) -> ClusterConfig {
        ClusterConfig {
            node_id,
            peers,
            heartbeat_interval_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            max_payload_entries: 300,
            snapshot_chunk_bytes: 3 << 20,
            max_snapshot_bytes: 1 << 40,
            install_snapshot_timeout_ms: 600_000,
            connect_timeout_ms: 1000,
            local_ip: None,
            join: false,
            signer: halfmq_proto::auth::Signer::none(),
            tls: None,
        }
    }

    /// This node's own client address, from `peers`.
    pub fn own_address(&self) -> Option<&str> {
        self.peers.get(&self.node_id).map(String::as_str)
    }

    /// Checks the settings; the error names the key.
    ///
    /// # Errors
    /// A message naming the key at fault.
    pub fn validate(&self) -> Result<openraft::Config, String> {
        if self.own_address().is_none() {
            return Err(format!(
                "peers: node id {} (--node-id) is not among the peers",
                self.node_id
            ));
        }
        if self.peers.len().is_multiple_of(2) {
            tracing::warn!(
                members = self.peers.len(),
                "a broker group of an even number of replicas tolerates no more failures than one replica fewer"
            );
        }
        let c = openraft::Config {
            cluster_name: "halfmq".into(),
            heartbeat_interval: self.heartbeat_interval_ms,
            election_timeout_min: self.election_timeout_min_ms,
            election_timeout_max: self.election_timeout_max_ms,
            max_payload_entries: self.max_payload_entries,
            install_snapshot_timeout: self.install_snapshot_timeout_ms,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes as u64,
            // Snapshots are taken when retention needs the log purged
            // (`%RETAIN%` records, see `compactor`), not by entry count;
            // purging is ours too: openraft keeps every entry a snapshot
            // covers until the compactor asks.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: u64::MAX,
            // A member whose data directory was lost rejoins under its id
            // with an empty log; the leader then starts its replication
            // over instead of stopping (openraft refuses a log that went
            // back by default). README, "Broker groups", says what that
            // costs.
            allow_log_reversion: Some(true),
            ..Default::default()
        };
        c.validate()
            .map_err(|e| format!("raft_election_timeout_min_ms / raft_heartbeat_interval_ms: {e}"))
    }
}

/// Why a proposal failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProposeError {
    /// This replica is not the leader (or stopped being it before the entry
    /// was committed); `leader` is the current leader's address when known.
    #[error("not the leader{}", .leader.as_ref().map(|l| format!("; the leader is {l}")).unwrap_or_default())]
    NotLeader {
        /// The leader's client address, when known.
        leader: Option<String>,
    },
    /// The replica's consensus stopped (a storage error, shutdown).
    #[error("replication stopped: {0}")]
    Stopped(String),
}

fn write_error(e: ClientWriteError<TypeConfig>) -> ProposeError {
    match e {
        ClientWriteError::ForwardToLeader(f) | ClientWriteError::LogEntryDiscarded(f) => {
            ProposeError::NotLeader {
                leader: f.leader_node.map(|n| n.addr),
            }
        }
        other => ProposeError::Stopped(other.to_string()),
    }
}

/// A running replica. Cheap to clone.
#[derive(Clone)]
pub struct NodeHandle {
    inner: Arc<NodeInner>,
}

struct NodeInner {
    cfg: ClusterConfig,
    raft: Raft,
    sm: StateMachine,
    /// The highest retention boundary applied (see `compactor`).
    compact: tokio::sync::watch::Sender<u64>,
    /// Snapshots being sent now (their log bytes must stay).
    snapshot_sends: Arc<AtomicUsize>,
}

impl NodeHandle {
    /// Starts the replica on a replicated `store`; a replica whose log is
    /// empty proposes the group of `cfg.peers` (the first of them to reach a
    /// majority forms it; the others' proposals are refused and ignored).
    ///
    /// # Errors
    /// Invalid settings, storage errors reading the log or vote.
    pub async fn start(
        cfg: ClusterConfig,
        store: Arc<Store>,
        applier: Option<Arc<dyn Applier>>,
    ) -> Result<NodeHandle, String> {
        let rcfg = Arc::new(cfg.validate()?);
        let flag = installing_flag(store.data_dir());
        if flag.exists() {
            return Err(format!(
                "{} is present: installing a snapshot from the leader was cut off, and this \
                 data directory holds part of it. Move the data directory aside and start \
                 again: the replica catches up from the leader",
                flag.display()
            ));
        }
        let log = LogStore::open(Arc::clone(&store)).map_err(|e| e.to_string())?;
        let sm = StateMachine::open(Arc::clone(&store), applier).map_err(|e| e.to_string())?;
        let snapshot_sends = Arc::new(AtomicUsize::new(0));
        let net = Network {
            from: cfg.node_id,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            snapshot_chunk_bytes: cfg.snapshot_chunk_bytes,
            snapshot_sends: Arc::clone(&snapshot_sends),
            local_ip: cfg.local_ip,
            signer: cfg.signer.clone(),
            tls: cfg.tls.clone(),
        };
        let raft = Raft::new(cfg.node_id, rcfg, net, log, sm.clone())
            .await
            .map_err(|e| format!("starting replication: {e}"))?;
        if cfg.join {
            tracing::info!("joining an existing broker group: waiting to be added by its leader");
        } else if !raft.is_initialized().await.map_err(|e| e.to_string())? {
            let members: BTreeMap<u64, BasicNode> = cfg
                .peers
                .iter()
                .map(|(id, a)| (*id, BasicNode::new(a)))
                .collect();
            match raft.initialize(members).await {
                Ok(()) => tracing::info!(peers = ?cfg.peers, "proposed a new broker group"),
                Err(e) => tracing::info!(error = %e, "broker group already formed"),
            }
        }
        let (compact, rx) = tokio::sync::watch::channel(0u64);
        tokio::spawn(compactor(
            raft.clone(),
            store,
            Arc::clone(&snapshot_sends),
            rx,
        ));
        Ok(NodeHandle {
            inner: Arc::new(NodeInner {
                cfg,
                raft,
                sm,
                compact,
                snapshot_sends,
            }),
        })
    }

    /// Retention agreed on through the log: drop what lies before physical
    /// offset `before`, in the background (see `compactor`).
    pub fn compact_before(&self, before: u64) {
        self.inner.compact.send_modify(|b| *b = (*b).max(before));
    }

    /// Where a snapshot being received is kept until it is installed: a
    /// file of its own under `<data_dir>/raft/`.
    pub fn snapshot_staging_path(&self, from: u64) -> std::path::PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.inner
            .sm
            .store()
            .data_dir()
            .join("raft")
            .join(format!("snapshot-from-{from}-{nanos}.incoming"))
    }

    /// Snapshots this replica is sending now.
    pub fn snapshot_sends(&self) -> usize {
        self.inner.snapshot_sends.load(Ordering::Acquire)
    }

    /// The openraft instance.
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// This replica's node id.
    pub fn id(&self) -> u64 {
        self.inner.cfg.node_id
    }

    /// The settings.
    pub fn config(&self) -> &ClusterConfig {
        &self.inner.cfg
    }

    /// Largest snapshot this replica accepts, in bytes.
    pub fn max_snapshot_bytes(&self) -> usize {
        self.inner.cfg.max_snapshot_bytes
    }

    /// Whether this replica is the leader now (by its own metrics).
    pub fn is_leader(&self) -> bool {
        self.inner.raft.metrics().borrow_watched().state == ServerState::Leader
    }

    /// The current leader's node id and client address, when known.
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .nodes()
            .find(|(n, _)| **n == id)
            .map(|(_, n)| n.addr.clone())
            .or_else(|| self.inner.cfg.peers.get(&id).cloned())?;
        Some((id, addr))
    }

    /// The last applied entry's index.
    pub fn last_applied_index(&self) -> u64 {
        self.inner.sm.last_applied().map_or(0, |l| l.index)
    }

    /// Proposes one write and waits until it is committed and applied here;
    /// returns where its records went.
    ///
    /// # Errors
    /// [`ProposeError::NotLeader`] on a follower or when leadership was lost
    /// before the commit; [`ProposeError::Stopped`] when consensus stopped.
    pub async fn propose(&self, w: Write) -> Result<Applied, ProposeError> {
        match self.inner.raft.client_write(w).await {
            Ok(r) => Ok(r.data),
            Err(e) => Err(self.propose_error(e)),
        }
    }

    fn propose_error(
        &self,
        e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
    ) -> ProposeError {
        match e {
            RaftError::APIError(e) => write_error(e),
            RaftError::Fatal(f) => ProposeError::Stopped(f.to_string()),
        }
    }

    /// Submits one write behind every write submitted before it and returns
    /// at once; the future it gives resolves when the write is committed and
    /// applied here. Callers that give records queue offsets submit under
    /// one lock, so that log order is assignment order.
    ///
    /// # Errors
    /// [`ProposeError::Stopped`] when consensus stopped; the future gives
    /// [`ProposeError::NotLeader`] when leadership was lost first.
    pub async fn submit(
        &self,
        w: Write,
    ) -> Result<
        impl std::future::Future<Output = Result<Applied, ProposeError>> + Send + 'static,
        ProposeError,
    > {
        let (responder, rx) = openraft::impls::ProgressResponder::complete_only();
        self.inner
            .raft
            .client_write_ff(w, Some(responder))
            .await
            .map_err(|e| ProposeError::Stopped(e.to_string()))?;
        Ok(async move {
            match rx.await {
                Ok(Ok(r)) => Ok(r.data),
                Ok(Err(e)) => Err(write_error(e)),
                Err(_) => Err(ProposeError::NotLeader { leader: None }),
            }
        })
    }

    /// Whether this replica may take writes now: it is the leader and has
    /// applied an entry of its own term (so everything committed before the
    /// term is applied: its state is complete).
    ///
    /// A leader that has not heard from a quorum for its lease
    /// (`election_timeout_max_ms`) does not serve either: cut off from the
    /// majority, it may have been replaced without knowing it yet, and must
    /// not hand out deliveries (its writes could not commit anyway).
    pub fn serving(&self) -> bool {
        use openraft::Instant as _;
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        let lease = Duration::from_millis(self.inner.cfg.election_timeout_max_ms);
        let alone = m.membership_config.voter_ids().count() <= 1;
        m.state == ServerState::Leader
            && m.last_applied
                .is_some_and(|l| l.leader_id.term == m.current_term)
            && (alone
                || m.last_quorum_acked
                    .as_ref()
                    .is_some_and(|t| t.elapsed() < lease))
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow_watched().current_term
    }

    /// This replica's view of the group, for `halfmq cluster status`.
    pub fn status(&self) -> pb::NodeStatus {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let role = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Learner => "learner",
            ServerState::Candidate => "candidate",
            ServerState::Shutdown => "shutdown",
        };
        let (voters, learners) = members(&m.membership_config);
        let address = voters
            .get(&m.id)
            .or_else(|| learners.get(&m.id))
            .cloned()
            .or_else(|| self.inner.cfg.own_address().map(str::to_owned))
            .unwrap_or_default();
        let leader_address = m
            .current_leader
            .and_then(|l| voters.get(&l).or_else(|| learners.get(&l)).cloned())
            .unwrap_or_default();
        let matched = m
            .replication
            .as_ref()
            .map(|r| {
                r.iter()
                    .map(|(id, l)| (*id, l.as_ref().map_or(0, |l| l.index)))
                    .collect()
            })
            .unwrap_or_default();
        pb::NodeStatus {
            node_id: m.id,
            address,
            role: role.into(),
            term: m.current_term,
            last_applied: m.last_applied.map_or(0, |l| l.index),
            last_log_index: m.last_log_index.unwrap_or(0),
            leader_id: m.current_leader,
            leader_address,
            matched,
            voters: voters.into_iter().collect(),
            learners: learners.into_iter().collect(),
        }
    }

    /// A membership change through this replica (the leader): 1 add a
    /// learner at `addr`, 2 promote a learner to voter, 3 remove a member.
    ///
    /// # Errors
    /// `FAILED_PRECONDITION` (`NOT_LEADER` in the message) on a follower;
    /// `INVALID_ARGUMENT` for an unknown action or a missing address;
    /// `FAILED_PRECONDITION` when openraft refuses the change.
    pub async fn change_membership(
        &self,
        action: u32,
        id: u64,
        addr: String,
    ) -> Result<(), tonic::Status> {
        let raft = &self.inner.raft;
        let res = match action {
            1 => {
                if addr.is_empty() {
                    return Err(tonic::Status::invalid_argument(
                        "add-learner needs an address",
                    ));
                }
                raft.add_learner(id, BasicNode::new(addr), true)
                    .await
                    .map(|_| ())
            }
            2 => {
                let voters: std::collections::BTreeSet<u64> = [id].into();
                raft.change_membership(ChangeMembers::AddVoterIds(voters), false)
                    .await
                    .map(|_| ())
            }
            3 => {
                let ids: std::collections::BTreeSet<u64> = [id].into();
                let m = raft.metrics().borrow_watched().membership_config.clone();
                let is_voter = m.voter_ids().any(|v| v == id);
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(ids)
                } else {
                    ChangeMembers::RemoveNodes(ids)
                };
                raft.change_membership(change, false).await.map(|_| ())
            }
            a => {
                return Err(tonic::Status::invalid_argument(format!(
                    "membership action {a}"
                )))
            }
        };
        res.map_err(|e| match self.propose_error(e) {
            ProposeError::NotLeader { leader } => tonic::Status::failed_precondition(format!(
                "NOT_LEADER: membership changes go to the leader{}",
                leader.map(|l| format!(" ({l})")).unwrap_or_default()
            )),
            ProposeError::Stopped(m) => tonic::Status::failed_precondition(m),
        })
    }

    /// Stops consensus on this replica.
    pub async fn shutdown(&self) {
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "replication did not stop cleanly");
        }
    }
}

/// How long the compactor waits for openraft to take a snapshot or purge
/// the log before it tries again.
const COMPACT_WAIT: Duration = Duration::from_secs(10);

/// Drops the log behind the highest retention boundary applied: takes a
/// snapshot covering the last entry that ends at or before it (unless one
/// does), has openraft purge the entries up to that one (a replica that
/// needs them later gets the snapshot), then deletes the sealed segments
/// that end at or before both the boundary and the purged entries, unless
/// a snapshot is being sent from them. Runs on every replica; retries
/// every second until done.
async fn compactor(
    raft: Raft,
    store: Arc<Store>,
    sends: Arc<AtomicUsize>,
    mut rx: tokio::sync::watch::Receiver<u64>,
) {
    let mut done = 0u64;
    loop {
        let before = *rx.borrow_and_update();
        if before > done {
            match compact(&raft, &store, &sends, before).await {
                Ok(true) => done = before,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, before, "compaction failed; retrying"),
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)), if before > done => {}
        }
    }
}

/// One compaction pass (see [`compactor`]); `Ok(false)` when it must be
/// tried again later.
async fn compact(
    raft: &Raft,
    store: &Arc<Store>,
    sends: &AtomicUsize,
    before: u64,
) -> Result<bool, String> {
    let bound = before.min(store.dispatched_end());
    let target = {
        let Some(idx) = store.entries() else {
            return Err("the store is not replicated".into());
        };
        let idx = idx.lock().unwrap_or_else(|e| e.into_inner());
        let rows = idx.range(0, u64::MAX);
        let n = rows.partition_point(|p| p.end() <= bound);
        n.checked_sub(1).map(|i| rows[i].index)
    };
    if let Some(t) = target {
        let m = raft.metrics().borrow_watched().clone();
        if m.snapshot.is_none_or(|s| s.index < t) {
            raft.trigger().snapshot().await.map_err(|e| e.to_string())?;
            let ok = raft
                .wait(Some(COMPACT_WAIT))
                .metrics(|m| m.snapshot.is_some_and(|s| s.index >= t), "snapshot")
                .await;
            if ok.is_err() {
                return Ok(false);
            }
        }
        raft.trigger()
            .purge_log(t)
            .await
            .map_err(|e| e.to_string())?;
        let ok = raft
            .wait(Some(COMPACT_WAIT))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= t), "purge")
            .await;
        if ok.is_err() {
            return Ok(false);
        }
    }
    if sends.load(Ordering::Acquire) > 0 {
        return Ok(false);
    }
    let s = Arc::clone(store);
    let deleted = tokio::task::spawn_blocking(move || s.delete_segments_before(before))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if !deleted.is_empty() {
        tracing::info!(
            before,
            segments = deleted.len(),
            "retention: segments deleted"
        );
    }
    Ok(true)
}

impl crate::core::replicated::Replicator for NodeHandle {
    fn compact_before(&self, before: u64) {
        NodeHandle::compact_before(self, before);
    }

    fn serving(&self) -> bool {
        NodeHandle::serving(self)
    }

    fn term(&self) -> u64 {
        NodeHandle::term(self)
    }

    fn leader_address(&self) -> Option<String> {
        self.leader().map(|(_, a)| a)
    }

    fn submit(
        &self,
        w: Write,
    ) -> crate::core::replicated::BoxFuture<
        '_,
        Result<
            crate::core::replicated::BoxFuture<'static, Result<Applied, ProposeError>>,
            ProposeError,
        >,
    > {
        Box::pin(async move {
            let f = NodeHandle::submit(self, w).await?;
            let f: crate::core::replicated::BoxFuture<'static, Result<Applied, ProposeError>> =
                Box::pin(f);
            Ok(f)
        })
    }
}
