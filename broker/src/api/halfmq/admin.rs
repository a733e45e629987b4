//! The `Admin` service: topics, stats, pending transactions, dead letters,
//! offset resets.

use std::sync::Arc;

use halfmq_proto::v1 as pb;
use tonic::{Request, Response};

use super::{ok, parse_message_id, status, who, Rpc, Services};
use crate::auth::policy::{Action, Resource};
use crate::core::admin::ResetTo;
use crate::core::redelivery::DeadLetterContent;
use crate::error::BrokerError;

#[tonic::async_trait]
impl pb::admin_server::Admin for Services {
    #[tracing::instrument(skip_all, fields(topic = %req.get_ref().name))]
    async fn create_topic(
        &self,
        req: Request<pb::CreateTopicRequest>,
    ) -> Rpc<pb::CreateTopicResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(
            w.as_ref(),
            Action::Admin,
            Resource::Topic(&r.name),
            "CreateTopic",
        )?;
        let status = match self.broker.create_topic_everywhere(&r.name, r.queues).await {
            Ok(()) => ok(),
            Err(e) => status(&e),
        };
        self.audit(
            w.as_ref(),
            "create topic",
            &format!("topic:{}", r.name),
            &status,
        );
        Ok(Response::new(pb::CreateTopicResponse { status }))
    }

    async fn create_consumer_group(
        &self,
        req: Request<pb::CreateConsumerGroupRequest>,
    ) -> Rpc<pb::CreateConsumerGroupResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(
            w.as_ref(),
            Action::Admin,
            Resource::Group(&r.group),
            "CreateConsumerGroup",
        )?;
        let status = match self.broker.declare_consumer_group(&r.group, r.fifo).await {
            Ok(()) => ok(),
            Err(e) => status(&e),
        };
        self.audit(
            w.as_ref(),
            "create consumer group",
            &format!("group:{}", r.group),
            &status,
        );
        Ok(Response::new(pb::CreateConsumerGroupResponse { status }))
    }

    async fn list_consumer_groups(
        &self,
        req: Request<pb::ListConsumerGroupsRequest>,
    ) -> Rpc<pb::ListConsumerGroupsResponse> {
        let w = who(&req);
        Ok(Response::new(pb::ListConsumerGroupsResponse {
            status: ok(),
            groups: self
                .broker
                .list_consumer_groups()
                .into_iter()
                .filter(|g| {
                    self.sees(
                        w.as_ref(),
                        &[Action::Sub, Action::Admin],
                        Resource::Group(&g.group),
                    )
                })
                .map(|g| pb::ConsumerGroupInfo {
                    group: g.group,
                    fifo: g.fifo,
                })
                .collect(),
        }))
    }

    async fn list_topics(
        &self,
        req: Request<pb::ListTopicsRequest>,
    ) -> Rpc<pb::ListTopicsResponse> {
        let w = who(&req);
        Ok(Response::new(pb::ListTopicsResponse {
            status: ok(),
            topics: self
                .broker
                .list_topics()
                .into_iter()
                .filter(|t| self.sees(w.as_ref(), &Action::ALL, Resource::Topic(&t.name)))
                .map(|t| pb::TopicInfo {
                    name: t.name,
                    queues: t.queues,
                    messages: t.messages,
                })
                .collect(),
        }))
    }

    async fn list_transactions(
        &self,
        req: Request<pb::ListTransactionsRequest>,
    ) -> Rpc<pb::ListTransactionsResponse> {
        let w = who(&req);
        // The walk (delayed messages are skipped) and a log read per row run
        // off the async workers.
        let b = Arc::clone(&self.broker);
        let listed = match tokio::task::spawn_blocking(move || b.list_transactions(10_000)).await {
            Ok(v) => v,
            Err(e) => {
                let e = BrokerError::Internal(format!("listing transactions: {e}"));
                return Ok(Response::new(pb::ListTransactionsResponse {
                    status: status(&e),
                    transactions: Vec::new(),
                }));
            }
        };
        Ok(Response::new(pb::ListTransactionsResponse {
            status: ok(),
            transactions: listed
                .into_iter()
                .filter(|t| {
                    let pg = Resource::ProducerGroup(&t.producer_group);
                    self.sees(w.as_ref(), &[Action::Tx, Action::Admin], pg)
                })
                .map(|t| pb::PendingTransaction {
                    transaction_id: t.transaction_id,
                    message_id: t.message_id,
                    topic: t.topic,
                    producer_group: t.producer_group,
                    age_ms: t.age_ms,
                    check_times: t.check_times,
                    given_up: t.given_up,
                    note: t.note,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group))]
    async fn list_dead_letters(
        &self,
        req: Request<pb::ListDeadLettersRequest>,
    ) -> Rpc<pb::ListDeadLettersResponse> {
        let w = who(&req);
        let r = req.into_inner();
        let g = Resource::Group(&r.group);
        self.allow_any(
            w.as_ref(),
            &[Action::Sub, Action::Admin],
            g,
            "ListDeadLetters",
        )?;
        let limit = if r.limit == 0 {
            10_000
        } else {
            r.limit as usize
        };
        let id = match parse_message_id(&r.message_id) {
            Ok(id) => id,
            Err(e) => {
                return Ok(Response::new(pb::ListDeadLettersResponse {
                    status: status(&e),
                    dead_letters: vec![],
                }))
            }
        };
        let b = Arc::clone(&self.broker);
        let listed =
            tokio::task::spawn_blocking(move || b.dead_letters(&r.group, limit, r.with_bodies, id))
                .await
                .unwrap_or_else(|e| {
                    Err(BrokerError::Internal(format!("listing dead letters: {e}")))
                });
        Ok(Response::new(match listed {
            Ok(v) => pb::ListDeadLettersResponse {
                status: ok(),
                dead_letters: v
                    .into_iter()
                    .map(|d| {
                        let c = d.content.unwrap_or_else(|| DeadLetterContent {
                            body: bytes::Bytes::new(),
                            tag: String::new(),
                            keys: Vec::new(),
                            properties: Vec::new(),
                        });
                        pb::DeadLetter {
                            message_id: d.message_id.to_string(),
                            topic: d.topic,
                            reconsume_times: d.reconsume_times,
                            reason: d.reason,
                            first_delivery_ms: d.first_delivery_ms,
                            last_delivery_ms: d.last_delivery_ms,
                            dlq_offset: d.dlq_offset,
                            body: c.body,
                            tag: c.tag,
                            keys: c.keys,
                            properties: c.properties.into_iter().collect(),
                            queue_id: d.origin.map_or(0, |o| o.0),
                            queue_offset: d.origin.map(|o| o.1),
                            body_omitted: d.body_omitted,
                            copies: d.copies,
                        }
                    })
                    .collect(),
            },
            Err(e) => pb::ListDeadLettersResponse {
                status: status(&e),
                dead_letters: vec![],
            },
        }))
    }

    async fn dead_letter_counts(
        &self,
        req: Request<pb::DeadLetterCountsRequest>,
    ) -> Rpc<pb::DeadLetterCountsResponse> {
        let w = who(&req);
        Ok(Response::new(pb::DeadLetterCountsResponse {
            status: ok(),
            counts: self
                .broker
                .dead_letter_counts()
                .into_iter()
                .filter(|(g, _)| {
                    self.sees(
                        w.as_ref(),
                        &[Action::Sub, Action::Admin],
                        Resource::Group(g),
                    )
                })
                .map(|(group, count)| pb::DeadLetterCount { group, count })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group))]
    async fn redrive_dead_letters(
        &self,
        req: Request<pb::RedriveDeadLettersRequest>,
    ) -> Rpc<pb::RedriveDeadLettersResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(
            w.as_ref(),
            Action::Admin,
            Resource::Group(&r.group),
            "RedriveDeadLetters",
        )?;
        let id = parse_message_id(&r.message_id);
        let res = match id {
            Ok(id) => self.broker.redrive(&r.group, id).await,
            Err(e) => Err(e),
        };
        let outcome = res.as_ref().map_or_else(status, |_| ok());
        self.audit(
            w.as_ref(),
            "dlq redrive",
            &format!("group:{}", r.group),
            &outcome,
        );
        Ok(Response::new(match res {
            Ok(n) => pb::RedriveDeadLettersResponse {
                status: ok(),
                count: n as u64,
            },
            Err(e) => pb::RedriveDeadLettersResponse {
                status: status(&e),
                count: 0,
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group))]
    async fn purge_dead_letters(
        &self,
        req: Request<pb::PurgeDeadLettersRequest>,
    ) -> Rpc<pb::PurgeDeadLettersResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(
            w.as_ref(),
            Action::Admin,
            Resource::Group(&r.group),
            "PurgeDeadLetters",
        )?;
        let resp = match self.broker.purge_dead_letters_everywhere(&r.group).await {
            Ok(n) => pb::PurgeDeadLettersResponse {
                status: ok(),
                count: n as u64,
            },
            Err(e) => pb::PurgeDeadLettersResponse {
                status: status(&e),
                count: 0,
            },
        };
        self.audit(
            w.as_ref(),
            "dlq purge",
            &format!("group:{}", r.group),
            &resp.status,
        );
        Ok(Response::new(resp))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group, topic = %req.get_ref().topic))]
    async fn reset_offset(
        &self,
        req: Request<pb::ResetOffsetRequest>,
    ) -> Rpc<pb::ResetOffsetResponse> {
        let w = who(&req);
        let r = req.into_inner();
        self.allow(
            w.as_ref(),
            Action::Admin,
            Resource::Group(&r.group),
            "ResetOffset",
        )?;
        let to = match r.to {
            Some(pb::reset_offset_request::To::Earliest(true)) => Ok(ResetTo::Earliest),
            Some(pb::reset_offset_request::To::Latest(true)) => Ok(ResetTo::Latest),
            Some(pb::reset_offset_request::To::TimestampMs(t)) => Ok(ResetTo::Timestamp(t)),
            _ => Err(BrokerError::BadRequest(
                "say where to: earliest, latest or timestamp_ms".into(),
            )),
        };
        let res = match to {
            Ok(to) => {
                self.broker
                    .reset_offset_everywhere(&r.group, &r.topic, to)
                    .await
            }
            Err(e) => Err(e),
        };
        let outcome = res.as_ref().map_or_else(status, |_| ok());
        let what = format!("group:{} topic:{}", r.group, r.topic);
        self.audit(w.as_ref(), "reset offset", &what, &outcome);
        Ok(Response::new(match res {
            Ok(v) => pb::ResetOffsetResponse {
                status: ok(),
                offsets: v
                    .into_iter()
                    .map(|(queue_id, queue_offset)| pb::QueueOffset {
                        queue_id,
                        queue_offset,
                    })
                    .collect(),
            },
            Err(e) => pb::ResetOffsetResponse {
                status: status(&e),
                offsets: vec![],
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(topic = %req.get_ref().name))]
    async fn delete_topic(
        &self,
        req: Request<pb::DeleteTopicRequest>,
    ) -> Rpc<pb::DeleteTopicResponse> {
        let w = who(&req);
        let name = req.into_inner().name;
        self.allow(
            w.as_ref(),
            Action::Admin,
            Resource::Topic(&name),
            "DeleteTopic",
        )?;
        let status = match self.broker.delete_topic_everywhere(&name).await {
            Ok(()) => ok(),
            Err(e) => status(&e),
        };
        self.audit(
            w.as_ref(),
            "delete topic",
            &format!("topic:{name}"),
            &status,
        );
        Ok(Response::new(pb::DeleteTopicResponse { status }))
    }

    async fn stats(&self, req: Request<pb::StatsRequest>) -> Rpc<pb::StatsResponse> {
        self.allow(
            who(&req).as_ref(),
            Action::Admin,
            Resource::Cluster,
            "Stats",
        )?;
        let s = self.broker.stats();
        Ok(Response::new(pb::StatsResponse {
            status: ok(),
            messages_in: s.messages_in,
            bytes_in: s.bytes_in,
            messages_out: s.messages_out,
            bytes_out: s.bytes_out,
            acks: s.acks,
            redeliveries: s.redeliveries,
            groups: s
                .groups
                .into_iter()
                .map(|g| pb::GroupStats {
                    group: g.group,
                    topic: g.topic,
                    inflight: g.inflight,
                    lag: g.lag,
                    acked: g.acked,
                })
                .collect(),
            commit_log_bytes: s.commit_log_bytes,
            uptime_ms: s.uptime_ms,
            connections: s.connections,
            producer_sessions: s.producer_sessions,
            pending_halves: s.pending_halves,
            delayed_messages: s.delayed_messages,
            halves_in: s.halves_in,
            transactions_committed: s.transactions_committed,
            transactions_rolled_back: s.transactions_rolled_back,
            commit_log_fsyncs: s.commit_log_fsyncs,
            duplicates: s.duplicates,
            dedup_keys: s.dedup_keys,
            dedup_evicted: s.dedup_evicted,
        }))
    }
}
