//! SendMessage and EndTransaction.
//!
//! A RocketMQ transaction message is a half message whose producer group is
//! its topic's name (RocketMQ 5 producers name no group): `tx` on
//! `producer-group:<topic>` lets a user send its halves, end them and
//! answer their check-backs.

use halfmq_proto::rocketmq as rmq;

use super::convert::{outgoing, SendKind};
use super::{ok, status, status_of, Caller, RocketMq};
use crate::auth::policy::{Action, Resource};
use crate::core::transactions::{EndSource, Resolution};
use crate::core::types::OutgoingMessage;
use crate::error::BrokerError;

/// One result entry per message, all with `status`.
fn entries_all(n: usize, ids: &[String], st: &Option<rmq::Status>) -> Vec<rmq::SendResultEntry> {
    (0..n.max(1))
        .map(|i| rmq::SendResultEntry {
            status: st.clone(),
            message_id: ids.get(i).cloned().unwrap_or_default(),
            transaction_id: String::new(),
            offset: 0,
        })
        .collect()
}

impl RocketMq {
    /// Converts and authorizes a batch: one kind and one topic.
    fn batch(
        &self,
        c: &Caller,
        msgs: Vec<rmq::Message>,
    ) -> Result<(Vec<OutgoingMessage>, SendKind, String), BrokerError> {
        let now = self.broker.now_ms();
        let mut out = Vec::with_capacity(msgs.len());
        let mut kind = None;
        for m in msgs {
            let (o, k) = outgoing(m, &c.client_id, now)?;
            if kind.is_some_and(|x| x != k) {
                return Err(BrokerError::BadRequest(
                    "a batch mixes transaction messages with others".into(),
                ));
            }
            kind = Some(k);
            out.push(o);
        }
        let Some(first) = out.first() else {
            return Err(BrokerError::BadRequest("no messages".into()));
        };
        let topic = first.topic.clone();
        if out.iter().any(|m| m.topic != topic) {
            return Err(BrokerError::BadRequest(
                "the messages of a batch must share one topic".into(),
            ));
        }
        let kind = kind.unwrap_or(SendKind::Plain);
        self.allow(c, Action::Pub, Resource::Topic(&topic), "SendMessage")?;
        if kind == SendKind::Half {
            self.allow(
                c,
                Action::Tx,
                Resource::ProducerGroup(&topic),
                "SendMessage",
            )?;
        }
        Ok((out, kind, topic))
    }

    pub(super) async fn send(
        &self,
        c: &Caller,
        r: rmq::SendMessageRequest,
    ) -> rmq::SendMessageResponse {
        let n = r.messages.len();
        let ids: Vec<String> = r
            .messages
            .iter()
            .map(|m| {
                m.system_properties
                    .as_ref()
                    .map(|s| s.message_id.clone())
                    .unwrap_or_default()
            })
            .collect();
        if let Some(s) = c.unauthenticated() {
            return rmq::SendMessageResponse {
                entries: entries_all(n, &ids, &s),
                status: s,
            };
        }
        let (msgs, kind, topic) = match self.batch(c, r.messages) {
            Ok(b) => b,
            Err(e) => {
                let s = status(&e);
                return rmq::SendMessageResponse {
                    entries: entries_all(n, &ids, &s),
                    status: s,
                };
            }
        };
        let result: Result<Vec<rmq::SendResultEntry>, BrokerError> = match kind {
            SendKind::Plain => self.broker.send(msgs).await.map(|receipts| {
                receipts
                    .into_iter()
                    .zip(&ids)
                    .map(|(r, id)| rmq::SendResultEntry {
                        status: ok(),
                        message_id: id.clone(),
                        transaction_id: String::new(),
                        offset: r
                            .queue_offset
                            .and_then(|o| i64::try_from(o).ok())
                            .unwrap_or(0),
                    })
                    .collect()
            }),
            SendKind::Half => {
                // Check-backs of these halves go to this client first.
                self.clients.serve_topic(&c.client_id, &topic);
                self.broker.send_halves(&topic, msgs).await.map(|halves| {
                    halves
                        .into_iter()
                        .zip(&ids)
                        .map(|(h, id)| rmq::SendResultEntry {
                            status: ok(),
                            message_id: id.clone(),
                            transaction_id: h.transaction_id,
                            offset: 0,
                        })
                        .collect()
                })
            }
        };
        match result {
            Ok(entries) => rmq::SendMessageResponse {
                status: ok(),
                entries,
            },
            Err(e) => {
                let s = status(&e);
                rmq::SendMessageResponse {
                    entries: entries_all(n, &ids, &s),
                    status: s,
                }
            }
        }
    }

    pub(super) async fn end(
        &self,
        c: &Caller,
        r: rmq::EndTransactionRequest,
    ) -> rmq::EndTransactionResponse {
        if let Some(s) = c.unauthenticated() {
            return rmq::EndTransactionResponse { status: s };
        }
        let resolution = match rmq::TransactionResolution::try_from(r.resolution) {
            Ok(rmq::TransactionResolution::Commit) => Resolution::Commit,
            Ok(rmq::TransactionResolution::Rollback) => Resolution::Rollback,
            // A checker that does not know yet (RocketMQ's UNKNOWN): the
            // half is checked again later.
            _ => Resolution::Unknown,
        };
        let from_check = r.source == rmq::TransactionSource::SourceServerCheck as i32;
        // The answer to a check out to this client: its session decides.
        if from_check {
            if let Some(sid) = self.clients.take_check(&c.client_id, &r.transaction_id) {
                self.broker
                    .check_answer(sid, &r.transaction_id, resolution)
                    .await;
                return rmq::EndTransactionResponse { status: ok() };
            }
        }
        if resolution == Resolution::Unknown {
            return rmq::EndTransactionResponse { status: ok() };
        }
        let source = if from_check {
            EndSource::Check
        } else {
            EndSource::Producer
        };
        let users = self.broker.auth_users();
        let who = c.who.as_ref();
        let may_end = |group: &str| {
            crate::auth::authorize(
                users,
                who,
                Action::Tx,
                &Resource::ProducerGroup(group),
                "EndTransaction",
            )
        };
        let results =
            match self
                .broker
                .prepare_ends(vec![(r.transaction_id, resolution)], source, &may_end)
            {
                Ok(p) => self.broker.finish_ends(p).await,
                Err(refused) => refused,
            };
        let status = match results.into_iter().next() {
            Some(Ok(())) => ok(),
            Some(Err(e)) => status(&e),
            None => status_of(rmq::Code::InternalServerError, "no result for an end"),
        };
        rmq::EndTransactionResponse { status }
    }
}
