//! Following a broker group's leader: [`Answer`] (what an answer says about
//! where a request should have gone), [`Client::follow`], and the channels.

use std::sync::Arc;

use halfmq_proto::v1 as pb;

use crate::channel::open_channel;
use crate::{Client, Code, DOWN_FOR};

impl Client {
    /// Points requests at `leader` when it is named (and not known to be
    /// down), else at the next known address after the current one. Returns
    /// whether it went to the named leader.
    pub(crate) fn follow(&self, leader: &str) -> bool {
        let (cur, _) = self.current();
        let is_down = |a: &str| {
            self.conn
                .down
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(a)
                .is_some_and(|t| t.elapsed() < DOWN_FOR)
        };
        let to_leader = !leader.is_empty() && !is_down(leader);
        let next = if to_leader {
            leader.to_owned()
        } else {
            let b = &self.conn.brokers;
            let start = b.iter().position(|a| **a == *cur).unwrap_or(0);
            // The next address that is not known to be down (else the next).
            (1..=b.len())
                .map(|k| &b[(start + k) % b.len()])
                .find(|a| !is_down(a))
                .unwrap_or(&b[(start + 1) % b.len()])
                .clone()
        };
        if *next == *cur {
            return to_leader;
        }
        let ch = {
            let mut chans = self.conn.channels.lock().unwrap_or_else(|e| e.into_inner());
            match chans.get(&next) {
                Some(c) => c.clone(),
                None => match open_channel(&next, &self.opts) {
                    Ok(c) => {
                        chans.insert(next.clone(), c.clone());
                        c
                    }
                    Err(e) => {
                        tracing::warn!(address = %next, error = %e, "cannot use the leader's address");
                        return false;
                    }
                },
            }
        };
        tracing::debug!(from = %cur, to = %next, "following the broker group's leader");
        *self.conn.current.write().unwrap_or_else(|e| e.into_inner()) =
            (Arc::from(next.as_str()), ch);
        to_leader
    }
}

/// An answer the client looks at before handing it on: whether it says
/// "not here" (a broker group member that is not the leader).
pub(crate) trait Answer {
    /// The redirecting status (`NOT_LEADER`, `LEADERSHIP_LOST`) and the
    /// leader it names (empty when none is known), if the answer is one.
    fn redirect(&self) -> Option<(Code, String)>;
}

pub(crate) fn redirect_of(s: Option<&pb::Status>) -> Option<(Code, String)> {
    let s = s?;
    match Code::try_from(s.code) {
        Ok(c @ (Code::NotLeader | Code::LeadershipLost)) => Some((c, s.leader.clone())),
        _ => None,
    }
}

macro_rules! answers {
    ($($t:ident),* $(,)?) => {
        $(impl Answer for pb::$t {
            fn redirect(&self) -> Option<(Code, String)> {
                redirect_of(self.status.as_ref())
            }
        })*
    };
}

answers!(
    SendResponse,
    ReceiveResponse,
    AckResponse,
    NackResponse,
    ChangeInvisibleDurationResponse,
    CreateTopicResponse,
    CreateConsumerGroupResponse,
    ListConsumerGroupsResponse,
    ListTopicsResponse,
    StatsResponse,
    SendHalfResponse,
    EndTransactionResponse,
    SendHalvesResponse,
    ListDeadLettersResponse,
    DeadLetterCountsResponse,
    RedriveDeadLettersResponse,
    PurgeDeadLettersResponse,
    ResetOffsetResponse,
    DeleteTopicResponse,
    ListTransactionsResponse,
    CreateUserResponse,
    DeleteUserResponse,
    ListUsersResponse,
    GrantResponse,
    RevokeResponse,
);

impl Answer for pb::EndTransactionsResponse {
    fn redirect(&self) -> Option<(Code, String)> {
        // Refused as a whole, or every end refused the same way.
        redirect_of(self.status.as_ref()).or_else(|| all_redirect(&self.results))
    }
}

/// The redirect all of `results` carry, if every one is one.
fn all_redirect(results: &[pb::Status]) -> Option<(Code, String)> {
    let first = redirect_of(results.first())?;
    results
        .iter()
        .all(|s| redirect_of(Some(s)).is_some())
        .then_some(first)
}

impl Answer for pb::TransactionBatchResponse {
    fn redirect(&self) -> Option<(Code, String)> {
        // Refused as a whole: the halves' status, or every end's.
        redirect_of(self.halves_status.as_ref()).or_else(|| all_redirect(&self.end_results))
    }
}
