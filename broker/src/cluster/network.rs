//! The RPCs between replicas (`halfmq.raft.v1.Raft`, on each broker's client
//! listener): conversions between openraft's messages and the wire, the
//! client side openraft calls ([`Network`]) and the server side
//! ([`RaftService`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halfmq_proto::raft as pb;
use openraft::errors::{
    NetworkError, RPCError, ReplicationClosed, StreamingError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, OptionalSend, RaftNetworkFactory, RaftNetworkV2};
use pb::raft_client::RaftClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A signed channel to a peer.
type PeerChannel = InterceptedService<Channel, halfmq_proto::auth::Signer>;

use super::state_machine::{LogRange, SnapshotData};
use super::types::{log_id, Entry, LogId, Node, SnapshotMeta, TypeConfig, Vote};

type Snapshot = openraft::Snapshot<super::types::CommittedLeaderId, u64, Node, SnapshotData>;

/// Largest RPC message between replicas, in bytes (AppendEntries batches
/// are cut by `raft_max_payload_entries`; this bounds what tonic decodes).
pub const MAX_RAFT_MESSAGE_BYTES: usize = 256 << 20;

/// Bytes of entries an AppendEntries request carries at most (one entry
/// larger than this goes alone): well within [`MAX_RAFT_MESSAGE_BYTES`].
const APPEND_CHUNK_BYTES: usize = 32 << 20;

/// An entry's bytes on the wire, about.
fn entry_bytes(e: &pb::Entry) -> usize {
    e.payload.len() + e.membership.len() + 32
}

pub(crate) fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        node_id: v.leader_id.voted_for,
        committed: v.committed,
    }
}

pub(crate) fn vote_from_pb(v: Option<pb::Vote>) -> Vote {
    let v = v.unwrap_or_default();
    if v.committed {
        Vote::new_committed(v.term, v.node_id)
    } else {
        Vote::new(v.term, v.node_id)
    }
}

fn log_id_to_pb(l: &LogId) -> pb::LogId {
    pb::LogId {
        term: l.leader_id.term,
        index: l.index,
    }
}

fn log_id_from_pb(l: pb::LogId) -> LogId {
    log_id(l.term, l.index)
}

fn entry_to_pb(e: &Entry) -> Result<pb::Entry, String> {
    let (kind, payload, membership) = match &e.payload {
        EntryPayload::Blank => (0, Bytes::new(), Bytes::new()),
        EntryPayload::Normal(w) => (1, w.0.clone(), Bytes::new()),
        EntryPayload::Membership(m) => (
            2,
            Bytes::new(),
            Bytes::from(serde_json::to_vec(m).map_err(|e| e.to_string())?),
        ),
    };
    Ok(pb::Entry {
        term: e.log_id.leader_id.term,
        index: e.log_id.index,
        kind,
        payload,
        membership,
    })
}

fn entry_from_pb(e: pb::Entry) -> Result<Entry, tonic::Status> {
    use openraft::entry::RaftEntry;
    let payload = match e.kind {
        0 => EntryPayload::Blank,
        1 => EntryPayload::Normal(super::types::Write(e.payload)),
        2 => EntryPayload::Membership(
            serde_json::from_slice(&e.membership)
                .map_err(|err| tonic::Status::invalid_argument(format!("membership: {err}")))?,
        ),
        k => return Err(tonic::Status::invalid_argument(format!("entry kind {k}"))),
    };
    Ok(Entry::new(log_id(e.term, e.index), payload))
}

/// openraft's side of the network: one lazily connected gRPC channel per
/// peer.
#[derive(Clone)]
pub struct Network {
    /// This node's id (sent along for the receiver's logs).
    pub from: u64,
    /// Timeout of a connection attempt.
    pub connect_timeout: Duration,
    /// Bytes per chunk of a streamed snapshot.
    pub snapshot_chunk_bytes: usize,
    /// Snapshots being sent now, counted while their bytes are read.
    pub snapshot_sends: Arc<AtomicUsize>,
    /// The IP address connections leave from (`None`: the system picks).
    pub local_ip: Option<std::net::IpAddr>,
    /// Signs each RPC (auth on: with the group's secret).
    pub signer: halfmq_proto::auth::Signer,
    /// TLS to the peers, if the listeners speak it.
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// The connection to one peer.
pub struct PeerClient {
    from: u64,
    target: u64,
    client: Option<RaftClient<PeerChannel>>,
    addr: String,
    connect_timeout: Duration,
    snapshot_chunk_bytes: usize,
    snapshot_sends: Arc<AtomicUsize>,
    local_ip: Option<std::net::IpAddr>,
    signer: halfmq_proto::auth::Signer,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Counts one snapshot being sent while it lives.
struct Sending(Arc<AtomicUsize>);

impl Sending {
    fn new(c: &Arc<AtomicUsize>) -> Sending {
        c.fetch_add(1, Ordering::AcqRel);
        Sending(Arc::clone(c))
    }
}

impl Drop for Sending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn range_to_pb(r: &LogRange) -> pb::LogRange {
    pb::LogRange {
        purged: r.purged.map(|(index, term)| pb::LogId { term, index }),
        start: r.start,
        end: r.end,
    }
}

fn range_from_pb(r: pb::LogRange) -> LogRange {
    LogRange {
        purged: r.purged.map(|l| (l.index, l.term)),
        start: r.start,
        end: r.end,
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: u64, node: &Node) -> Self::Network {
        PeerClient {
            from: self.from,
            target,
            client: None,
            addr: node.addr.clone(),
            connect_timeout: self.connect_timeout,
            snapshot_chunk_bytes: self.snapshot_chunk_bytes,
            snapshot_sends: Arc::clone(&self.snapshot_sends),
            local_ip: self.local_ip,
            signer: self.signer.clone(),
            tls: self.tls.clone(),
        }
    }
}

impl PeerClient {
    fn client(&mut self) -> Result<RaftClient<PeerChannel>, Unreachable<TypeConfig>> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = if self.addr.contains("://") {
            self.addr.clone()
        } else {
            format!("{scheme}://{}", self.addr)
        };
        let mut ep =
            tonic::transport::Endpoint::from_shared(uri).map_err(|e| Unreachable::new(&e))?;
        if let Some(t) = &self.tls {
            ep = ep.tls_config(t.clone()).map_err(|e| Unreachable::new(&e))?;
        }
        let ep = ep
            .connect_timeout(self.connect_timeout)
            .local_address(self.local_ip)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let c = RaftClient::with_interceptor(ep.connect_lazy(), self.signer.clone())
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES);
        self.client = Some(c.clone());
        Ok(c)
    }

    fn timeout(&self, action: RPCTypes, ttl: Duration) -> Timeout<TypeConfig> {
        Timeout {
            action,
            id: self.from,
            target: self.target,
            timeout: ttl,
        }
    }

    /// Maps a failed call: the peer cannot be reached (connection refused,
    /// reset) or answered with an error.
    fn failed(&mut self, s: tonic::Status) -> RPCError<TypeConfig> {
        if s.code() == tonic::Code::Unavailable || s.code() == tonic::Code::Unknown {
            // Drop the channel: the next call connects again.
            self.client = None;
            RPCError::Unreachable(Unreachable::from_string(format!(
                "{}: {}",
                self.addr,
                s.message()
            )))
        } else {
            RPCError::Network(NetworkError::from_string(format!(
                "{}: {}",
                self.addr,
                s.message()
            )))
        }
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotData;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let entries = rpc
            .entries
            .iter()
            .map(entry_to_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| RPCError::Network(NetworkError::from_string(e)))?;
        let ttl = option.hard_ttl();
        // Entries in requests of at most APPEND_CHUNK_BYTES each (openraft
        // sends up to `raft_max_payload_entries` at once, however large),
        // sent one after the other, each following the last one's entries.
        let mut prev = rpc.prev_log_id.as_ref().map(log_id_to_pb);
        let mut rest = entries;
        loop {
            let mut n = 0usize;
            let mut bytes = 0usize;
            while n < rest.len() && (n == 0 || bytes + entry_bytes(&rest[n]) <= APPEND_CHUNK_BYTES)
            {
                bytes += entry_bytes(&rest[n]);
                n += 1;
            }
            let later = rest.split_off(n);
            let now = std::mem::replace(&mut rest, later);
            let next_prev = now.last().map(|e| pb::LogId {
                term: e.term,
                index: e.index,
            });
            let later_empty = rest.is_empty();
            let req = pb::AppendEntriesRequest {
                vote: Some(vote_to_pb(&rpc.vote)),
                prev_log_id: prev,
                entries: now,
                leader_commit: rpc.leader_commit.as_ref().map(log_id_to_pb),
                from: self.from,
            };
            let resp = match tokio::time::timeout(ttl, client.append_entries(req)).await {
                Err(_) => {
                    return Err(RPCError::Timeout(
                        self.timeout(RPCTypes::AppendEntries, ttl),
                    ))
                }
                Ok(Err(s)) => return Err(self.failed(s)),
                Ok(Ok(r)) => r.into_inner(),
            };
            let r = match resp.result {
                0 => AppendEntriesResponse::Success,
                1 => AppendEntriesResponse::PartialSuccess(resp.matched.map(log_id_from_pb)),
                2 => AppendEntriesResponse::Conflict,
                _ => AppendEntriesResponse::HigherVote(vote_from_pb(resp.higher_vote)),
            };
            if later_empty || !matches!(r, AppendEntriesResponse::Success) {
                return Ok(r);
            }
            prev = next_prev;
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let mut client = self.client().map_err(RPCError::Unreachable)?;
        let req = pb::VoteRequest {
            vote: Some(vote_to_pb(&rpc.vote)),
            last_log_id: rpc.last_log_id.as_ref().map(log_id_to_pb),
            leadership_transfer: rpc.leadership_transfer,
            from: self.from,
        };
        let ttl = option.hard_ttl();
        let resp = match tokio::time::timeout(ttl, client.vote(req)).await {
            Err(_) => return Err(RPCError::Timeout(self.timeout(RPCTypes::Vote, ttl))),
            Ok(Err(s)) => return Err(self.failed(s)),
            Ok(Ok(r)) => r.into_inner(),
        };
        Ok(VoteResponse {
            vote: vote_from_pb(resp.vote),
            vote_granted: resp.vote_granted,
            last_log_id: resp.last_log_id.map(log_id_from_pb),
        })
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let mut client = self.client().map_err(StreamingError::Unreachable)?;
        let net = |e: &dyn std::fmt::Display| {
            StreamingError::Network(NetworkError::from_string(e.to_string()))
        };
        let meta = serde_json::to_vec(&snapshot.meta).map_err(|e| net(&e))?;
        let data = snapshot.snapshot;
        let range = data.range().map_err(|e| net(&e))?;
        let body = data.body_json().map_err(|e| net(&e))?;
        let chunk = self.snapshot_chunk_bytes.max(1) as u64;
        let first = pb::SnapshotChunk {
            vote: Some(vote_to_pb(&vote)),
            meta: Bytes::from(meta),
            data: Bytes::new(),
            from: self.from,
            body: Bytes::from(body),
            range: Some(range_to_pb(&range)),
        };
        let sending = Sending::new(&self.snapshot_sends);
        let target = self.target;
        // The first chunk, then the log bytes as they are read; a read that
        // fails ends the stream short, which the receiver refuses.
        let chunks = futures_util::stream::unfold(
            (Some(first), range.start, sending),
            move |(first, at, sending)| {
                let data = data.clone();
                async move {
                    if let Some(f) = first {
                        return Some((f, (None, at, sending)));
                    }
                    if at >= range.end {
                        return None;
                    }
                    let n = (range.end - at).min(chunk) as usize;
                    let read = tokio::task::spawn_blocking(move || data.read(&range, at, n)).await;
                    match read {
                        Ok(Ok(b)) => Some((
                            pb::SnapshotChunk {
                                data: b,
                                ..pb::SnapshotChunk::default()
                            },
                            (None, at + n as u64, sending),
                        )),
                        Ok(Err(e)) => {
                            tracing::warn!(target, at, error = %e, "snapshot read failed; sending stopped");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(target, error = %e, "snapshot read failed; sending stopped");
                            None
                        }
                    }
                }
            },
        );
        let call = client.install_snapshot(chunks);
        let resp = tokio::select! {
            r = call => r,
            closed = cancel => return Err(StreamingError::Closed(closed)),
        };
        match resp {
            Ok(r) => Ok(SnapshotResponse {
                vote: vote_from_pb(r.into_inner().vote),
            }),
            Err(s) => Err(match self.failed(s) {
                RPCError::Unreachable(u) => StreamingError::Unreachable(u),
                RPCError::Network(n) => StreamingError::Network(n),
                RPCError::Timeout(t) => StreamingError::Timeout(t),
                RPCError::RemoteError(e) => {
                    StreamingError::Network(NetworkError::from_string(e.to_string()))
                }
            }),
        }
    }
}

/// The server side: hands the RPCs to the local openraft instance.
#[derive(Clone)]
pub struct RaftService {
    raft: super::Raft,
    node: super::NodeHandle,
}

impl RaftService {
    /// The service of `node`.
    pub fn new(node: super::NodeHandle) -> RaftService {
        RaftService {
            raft: node.raft().clone(),
            node,
        }
    }

    /// As a tonic service (message size limits for AppendEntries batches).
    pub fn into_server(self) -> pb::raft_server::RaftServer<RaftService> {
        pb::raft_server::RaftServer::new(self)
            .max_decoding_message_size(MAX_RAFT_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_RAFT_MESSAGE_BYTES)
    }
}

impl RaftService {
    /// Writes the log bytes of a snapshot stream into `path`: exactly
    /// `len` bytes, or an error (the stream ended short or ran long).
    async fn receive(
        &self,
        stream: &mut tonic::Streaming<pb::SnapshotChunk>,
        path: &std::path::Path,
        len: u64,
    ) -> Result<(), tonic::Status> {
        use tokio::io::AsyncWriteExt;
        let io = |e: std::io::Error| tonic::Status::internal(format!("snapshot staging file: {e}"));
        let mut f = tokio::fs::File::create(path).await.map_err(io)?;
        let mut got = 0u64;
        while let Some(chunk) = stream.message().await? {
            got += chunk.data.len() as u64;
            if got > len {
                return Err(tonic::Status::invalid_argument(format!(
                    "snapshot stream carries more than its {len} bytes of log"
                )));
            }
            f.write_all(&chunk.data).await.map_err(io)?;
        }
        if got != len {
            return Err(tonic::Status::invalid_argument(format!(
                "snapshot stream cut short: {got} of {len} bytes of log"
            )));
        }
        f.flush().await.map_err(io)
    }
}

fn fatal(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::internal(format!("raft: {e}"))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftService {
    async fn append_entries(
        &self,
        req: tonic::Request<pb::AppendEntriesRequest>,
    ) -> Result<tonic::Response<pb::AppendEntriesResponse>, tonic::Status> {
        let r = req.into_inner();
        let entries = r
            .entries
            .into_iter()
            .map(entry_from_pb)
            .collect::<Result<Vec<_>, _>>()?;
        let rpc = AppendEntriesRequest {
            vote: vote_from_pb(r.vote),
            prev_log_id: r.prev_log_id.map(log_id_from_pb),
            entries,
            leader_commit: r.leader_commit.map(log_id_from_pb),
        };
        let resp = self.raft.append_entries(rpc).await.map_err(fatal)?;
        let out = match resp {
            AppendEntriesResponse::Success => pb::AppendEntriesResponse {
                result: 0,
                ..Default::default()
            },
            AppendEntriesResponse::PartialSuccess(m) => pb::AppendEntriesResponse {
                result: 1,
                matched: m.as_ref().map(log_id_to_pb),
                higher_vote: None,
            },
            AppendEntriesResponse::Conflict => pb::AppendEntriesResponse {
                result: 2,
                ..Default::default()
            },
            AppendEntriesResponse::HigherVote(v) => pb::AppendEntriesResponse {
                result: 3,
                matched: None,
                higher_vote: Some(vote_to_pb(&v)),
            },
        };
        Ok(tonic::Response::new(out))
    }

    async fn vote(
        &self,
        req: tonic::Request<pb::VoteRequest>,
    ) -> Result<tonic::Response<pb::VoteResponse>, tonic::Status> {
        let r = req.into_inner();
        let rpc = VoteRequest {
            vote: vote_from_pb(r.vote),
            last_log_id: r.last_log_id.map(log_id_from_pb),
            leadership_transfer: r.leadership_transfer,
        };
        let resp = self.raft.vote(rpc).await.map_err(fatal)?;
        Ok(tonic::Response::new(pb::VoteResponse {
            vote: Some(vote_to_pb(&resp.vote)),
            vote_granted: resp.vote_granted,
            last_log_id: resp.last_log_id.as_ref().map(log_id_to_pb),
        }))
    }

    async fn install_snapshot(
        &self,
        req: tonic::Request<tonic::Streaming<pb::SnapshotChunk>>,
    ) -> Result<tonic::Response<pb::SnapshotResponse>, tonic::Status> {
        let mut stream = req.into_inner();
        let Some(first) = stream.message().await? else {
            return Err(tonic::Status::invalid_argument("empty snapshot stream"));
        };
        let vote = vote_from_pb(first.vote);
        let meta: SnapshotMeta = serde_json::from_slice(&first.meta)
            .map_err(|e| tonic::Status::invalid_argument(format!("snapshot meta: {e}")))?;
        let range =
            range_from_pb(first.range.ok_or_else(|| {
                tonic::Status::invalid_argument("snapshot without its log range")
            })?);
        if range.end < range.start {
            return Err(tonic::Status::invalid_argument(
                "snapshot log range ends before it starts",
            ));
        }
        let limit = self.node.max_snapshot_bytes() as u64;
        if range.len() > limit {
            return Err(tonic::Status::resource_exhausted(format!(
                "a snapshot of {} bytes of log is larger than raft_max_snapshot_bytes ({limit} bytes)",
                range.len()
            )));
        }
        let path = self.node.snapshot_staging_path(first.from);
        let received = self.receive(&mut stream, &path, range.len()).await;
        let res = match received {
            Ok(()) => match SnapshotData::received(&first.body, path.clone(), range) {
                Ok(data) => {
                    let snap = Snapshot {
                        meta,
                        snapshot: data,
                    };
                    self.raft
                        .install_full_snapshot(vote, snap)
                        .await
                        .map_err(fatal)
                }
                Err(e) => Err(tonic::Status::invalid_argument(format!(
                    "snapshot description: {e}"
                ))),
            },
            Err(e) => Err(e),
        };
        // Installed (its bytes are in the log now), refused or cut short:
        // the staging file has served either way.
        let _ = tokio::fs::remove_file(&path).await;
        let resp = res?;
        Ok(tonic::Response::new(pb::SnapshotResponse {
            vote: Some(vote_to_pb(&resp.vote)),
        }))
    }

    async fn status(
        &self,
        _req: tonic::Request<pb::NodeStatusRequest>,
    ) -> Result<tonic::Response<pb::NodeStatus>, tonic::Status> {
        Ok(tonic::Response::new(self.node.status()))
    }

    async fn change_membership(
        &self,
        req: tonic::Request<pb::MembershipRequest>,
    ) -> Result<tonic::Response<pb::MembershipResponse>, tonic::Status> {
        let r = req.into_inner();
        self.node
            .change_membership(r.action, r.node_id, r.address)
            .await?;
        Ok(tonic::Response::new(pb::MembershipResponse {}))
    }
}

/// Node id → address of every member in `m`.
pub(crate) fn members(
    m: &super::types::StoredMembership,
) -> (BTreeMap<u64, String>, BTreeMap<u64, String>) {
    let voters: std::collections::BTreeSet<u64> = m.voter_ids().collect();
    let mut v = BTreeMap::new();
    let mut l = BTreeMap::new();
    for (id, n) in m.nodes() {
        if voters.contains(id) {
            v.insert(*id, n.addr.clone());
        } else {
            l.insert(*id, n.addr.clone());
        }
    }
    (v, l)
}
