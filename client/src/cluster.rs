//! A broker group's membership as its members see it
//! (`halfmq.raft.v1.Raft/Status`, `ChangeMembership`): [`Cluster`].

use std::collections::BTreeMap;
use std::time::Duration;

use halfmq_proto::raft as pb;

use crate::{Client, ClientError};

/// One member's view of the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Node id.
    pub node_id: u64,
    /// Client address.
    pub address: String,
    /// `leader`, `follower`, `learner`, `candidate` or `shutdown`.
    pub role: String,
    /// Current term.
    pub term: u64,
    /// Index of the last entry applied.
    pub last_applied: u64,
    /// Index of the last entry in its log.
    pub last_log_index: u64,
    /// The leader it knows, if any.
    pub leader_id: Option<u64>,
    /// Entries this member is behind the leader's log (from the leader's
    /// replication state when it answered, else its own applied index).
    pub lag: Option<u64>,
    /// Voters, node id -> address (as this member knows them).
    pub voters: BTreeMap<u64, String>,
    /// Learners, node id -> address.
    pub learners: BTreeMap<u64, String>,
}

/// A member that did not answer [`Cluster::status`].
#[derive(Debug)]
pub struct Unanswered {
    /// Its node id, when known from another member's membership.
    pub node_id: Option<u64>,
    /// Its address.
    pub address: String,
    /// Why.
    pub error: ClientError,
}

/// Membership calls on a broker group.
#[derive(Debug, Clone)]
pub struct Cluster {
    client: Client,
}

fn raft_client(
    client: &Client,
    addr: &str,
) -> Result<pb::raft_client::RaftClient<crate::channel::Ch>, ClientError> {
    Ok(pb::raft_client::RaftClient::new(client.channel_to(addr)?))
}

impl Cluster {
    /// Membership calls over `client` (its addresses, and the members they
    /// name, are asked).
    pub fn new(client: Client) -> Cluster {
        Cluster { client }
    }

    async fn status_of(&self, addr: &str) -> Result<pb::NodeStatus, ClientError> {
        let mut c = raft_client(&self.client, addr)?;
        let mut req = tonic::Request::new(pb::NodeStatusRequest {});
        req.set_timeout(Duration::from_secs(3));
        match tokio::time::timeout(Duration::from_secs(4), c.status(req)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(self.client.transport_error(s)),
            Err(_) => Err(ClientError::Transport(tonic::Status::deadline_exceeded(
                "no status within 4 s",
            ))),
        }
    }

    /// Every member's view: the given addresses and every member they name,
    /// each asked once; members that do not answer are listed apart.
    /// `lag` comes from the leader's replication state when it answered.
    pub async fn status(&self) -> (Vec<NodeStatus>, Vec<Unanswered>) {
        let mut to_ask: Vec<(Option<u64>, String)> = self
            .client
            .brokers()
            .iter()
            .map(|a| (None, a.clone()))
            .collect();
        let mut asked: Vec<String> = Vec::new();
        let mut got: Vec<pb::NodeStatus> = Vec::new();
        let mut failed = Vec::new();
        while let Some((id, addr)) = to_ask.pop() {
            if asked.contains(&addr) {
                continue;
            }
            asked.push(addr.clone());
            match self.status_of(&addr).await {
                Ok(s) => {
                    for (i, a) in s.voters.iter().chain(s.learners.iter()) {
                        if !asked.contains(a) {
                            to_ask.push((Some(*i), a.clone()));
                        }
                    }
                    got.push(s);
                }
                Err(error) => failed.push(Unanswered {
                    node_id: id,
                    address: addr,
                    error,
                }),
            }
        }
        // Members answer once each, whichever address reached them.
        got.sort_by_key(|s| s.node_id);
        got.dedup_by_key(|s| s.node_id);
        let leader = got
            .iter()
            .filter(|s| s.role == "leader")
            .max_by_key(|s| s.term)
            .cloned();
        let nodes = got
            .into_iter()
            .map(|s| {
                let lag = match &leader {
                    Some(l) if l.node_id == s.node_id => Some(0),
                    Some(l) => l
                        .matched
                        .get(&s.node_id)
                        .map(|m| l.last_log_index.saturating_sub(*m))
                        .or_else(|| Some(l.last_log_index.saturating_sub(s.last_applied))),
                    None => None,
                };
                NodeStatus {
                    node_id: s.node_id,
                    address: s.address,
                    role: s.role,
                    term: s.term,
                    last_applied: s.last_applied,
                    last_log_index: s.last_log_index,
                    leader_id: s.leader_id,
                    lag,
                    voters: s.voters.into_iter().collect(),
                    learners: s.learners.into_iter().collect(),
                }
            })
            .collect();
        (nodes, failed)
    }

    async fn change(&self, action: u32, node_id: u64, address: String) -> Result<(), ClientError> {
        let (nodes, _) = self.status().await;
        let Some(leader) = nodes
            .iter()
            .filter(|n| n.role == "leader")
            .max_by_key(|n| n.term)
        else {
            return Err(ClientError::Connect(
                "no member of the broker group says it is the leader (an election may be under way; retry)".into(),
            ));
        };
        let mut c = raft_client(&self.client, &leader.address)?;
        let mut req = tonic::Request::new(pb::MembershipRequest {
            action,
            node_id,
            address,
        });
        req.set_timeout(Duration::from_secs(30));
        c.change_membership(req)
            .await
            .map(|_| ())
            .map_err(|s| ClientError::Connect(format!("{}: {}", leader.address, s.message())))
    }

    /// Adds node `node_id` at client address `address` as a learner (it
    /// catches up from the log; it does not vote). Returns once it has.
    ///
    /// # Errors
    /// No leader found; the leader's refusal.
    pub async fn add_learner(&self, node_id: u64, address: &str) -> Result<(), ClientError> {
        self.change(1, node_id, address.to_owned()).await
    }

    /// Makes learner `node_id` a voter.
    ///
    /// # Errors
    /// As [`Cluster::add_learner`].
    pub async fn promote(&self, node_id: u64) -> Result<(), ClientError> {
        self.change(2, node_id, String::new()).await
    }

    /// Removes member `node_id` (voter or learner) from the group.
    ///
    /// # Errors
    /// As [`Cluster::add_learner`].
    pub async fn remove(&self, node_id: u64) -> Result<(), ClientError> {
        self.change(3, node_id, String::new()).await
    }
}
