//! The gRPC services: convert wire types to domain types, call the broker,
//! convert back. Every broker decision is a `Status` in the response; gRPC
//! errors are left to transport failures.

use std::sync::Arc;

use halfmq_proto::v1 as pb;
use tonic::{Request, Response};

use crate::admin::ResetTo;
use crate::broker::{
    Broker, DeliveredMessage, OutgoingMessage, QueueChoice, Receipt, ReceiveRequest,
};
use crate::error::BrokerError;
use crate::redelivery::DeadLetterContent;
use crate::transactions::{EndSource, Resolution};

/// The wire status code of an error. Stable: see README "Status codes".
pub fn code_of(e: &BrokerError) -> pb::Code {
    use pb::Code;
    match e {
        BrokerError::BadRequest(_) | BrokerError::Config(_) => Code::BadRequest,
        BrokerError::InvalidTopic(_) => Code::InvalidTopic,
        BrokerError::InvalidGroup(_) => Code::InvalidGroup,
        BrokerError::InvalidTagExpression(_) => Code::InvalidTagExpression,
        BrokerError::InvalidQueueId { .. } => Code::InvalidQueueId,
        BrokerError::InvalidReceiptHandle(_) => Code::InvalidReceiptHandle,
        BrokerError::ReservedName(_) => Code::ReservedName,
        BrokerError::TopicNotFound(_) => Code::TopicNotFound,
        BrokerError::ReceiptNotFound => Code::ReceiptNotFound,
        BrokerError::InvalidTransactionId(_) => Code::InvalidTransactionId,
        BrokerError::TransactionNotFound(_) => Code::TransactionNotFound,
        BrokerError::TransactionConflict(_) => Code::TransactionConflict,
        BrokerError::TooManyPendingHalves(_) => Code::TooManyPendingHalves,
        BrokerError::TopicExists(_) => Code::TopicExists,
        BrokerError::TopicBusy(_) => Code::TopicBusy,
        BrokerError::MessageTooLarge { .. } => Code::MessageTooLarge,
        BrokerError::BatchTooLarge(_) => Code::BatchTooLarge,
        BrokerError::TooManyRequests(_) => Code::TooManyRequests,
        BrokerError::Storage(halfmq_storage::Error::RecordTooLarge { .. }) => Code::MessageTooLarge,
        BrokerError::Storage(e) if e.is_storage_full() => Code::StorageFull,
        BrokerError::Storage(_) => Code::StorageError,
        BrokerError::Internal(_) => Code::Internal,
        BrokerError::ShuttingDown => Code::ShuttingDown,
    }
}

fn ok() -> Option<pb::Status> {
    Some(pb::Status {
        code: pb::Code::Ok as i32,
        message: String::new(),
    })
}

fn status(e: &BrokerError) -> Option<pb::Status> {
    let code = code_of(e);
    if code == pb::Code::Internal || code == pb::Code::StorageError {
        tracing::error!(error = %e, "request failed");
    } else if code == pb::Code::StorageFull {
        tracing::warn!(error = %e, "request refused: disk full");
    } else {
        tracing::debug!(error = %e, "request refused");
    }
    Some(pb::Status {
        code: code as i32,
        message: e.to_string(),
    })
}

impl Services {
    /// Stores half messages all or nothing: (status, one receipt per half).
    async fn halves(
        &self,
        group: &str,
        msgs: Vec<pb::Message>,
    ) -> (Option<pb::Status>, Vec<pb::HalfReceipt>) {
        let msgs = msgs.into_iter().map(outgoing).collect();
        match self.broker.send_halves(group, msgs).await {
            Ok(hs) => (
                ok(),
                hs.into_iter()
                    .map(|h| pb::HalfReceipt {
                        transaction_id: h.transaction_id,
                        message_id: h.message_id.to_string(),
                        queue_id: h.queue_id,
                    })
                    .collect(),
            ),
            Err(e) => (status(&e), Vec::new()),
        }
    }

    /// Ends transactions, each alone: one status per end. More than
    /// `max_batch_messages` ends are refused as a whole (the limit bounds how
    /// long one request holds the transaction lock).
    async fn ends(&self, ends: Vec<pb::EndTransactionRequest>) -> Vec<pb::Status> {
        let max = self.broker.config().max_batch_messages as usize;
        if ends.len() > max {
            let e = BrokerError::BadRequest(format!(
                "{} ends exceeds max_batch_messages {max}",
                ends.len()
            ));
            let s = status(&e).unwrap_or_default();
            return vec![s; ends.len()];
        }
        if ends.is_empty() {
            return Vec::new();
        }
        let source = match ends.first().map(|e| pb::EndSource::try_from(e.source)) {
            Some(Ok(pb::EndSource::Check)) => EndSource::Check,
            Some(Ok(pb::EndSource::Operator)) => EndSource::Operator,
            _ => EndSource::Producer,
        };
        let ends: Vec<(String, Resolution)> = ends
            .into_iter()
            .map(|e| {
                (
                    e.transaction_id,
                    resolution(e.resolution).unwrap_or(Resolution::Unknown),
                )
            })
            .collect();
        self.broker
            .end_transactions(ends, source)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(()) => ok().unwrap_or_default(),
                Err(e) => status(&e).unwrap_or_default(),
            })
            .collect()
    }
}

/// An optional message id: empty = none, else 32 hex digits.
fn parse_message_id(s: &str) -> Result<Option<halfmq_storage::MessageId>, BrokerError> {
    if s.is_empty() {
        return Ok(None);
    }
    halfmq_storage::MessageId::from_hex(s)
        .map(Some)
        .ok_or_else(|| BrokerError::BadRequest(format!("message id {s:?} is not 32 hex digits")))
}

fn outgoing(m: pb::Message) -> OutgoingMessage {
    let queue = match m.queue {
        Some(pb::message::Queue::QueueId(q)) => QueueChoice::Id(q),
        Some(pb::message::Queue::ShardingKey(k)) => QueueChoice::Key(k),
        None => QueueChoice::RoundRobin,
    };
    let mut properties: Vec<(String, String)> = m.properties.into_iter().collect();
    properties.sort();
    OutgoingMessage {
        topic: m.topic,
        queue,
        tag: m.tag,
        keys: m.keys,
        delay_ms: m.delay_ms,
        properties,
        body: m.body,
    }
}

/// Implements the `Producer`, `Consumer` and `Admin` services over a broker.
#[derive(Debug, Clone)]
pub struct Services {
    broker: Arc<Broker>,
}

impl Services {
    /// Services over `broker`.
    pub fn new(broker: Arc<Broker>) -> Self {
        Services { broker }
    }
}

type Rpc<T> = Result<Response<T>, tonic::Status>;

fn wire_message(m: DeliveredMessage, with_receipt: bool) -> pb::ReceivedMessage {
    pb::ReceivedMessage {
        message_id: m.message_id.to_string(),
        topic: m.topic,
        queue_id: m.queue_id,
        queue_offset: m.queue_offset,
        tag: m.tag,
        keys: m.keys,
        properties: m.properties.into_iter().collect(),
        body: m.body,
        reconsume_times: m.reconsume_times,
        receipt_handle: if with_receipt {
            m.receipt.encode()
        } else {
            String::new()
        },
        store_timestamp_ms: m.store_timestamp_ms,
        invisible_until_ms: m.invisible_until_ms,
        original_queue_offset: m.original_queue_offset,
        retry: m.retry,
    }
}

fn resolution(r: i32) -> Option<Resolution> {
    match pb::Resolution::try_from(r).ok()? {
        pb::Resolution::Commit => Some(Resolution::Commit),
        pb::Resolution::Rollback => Some(Resolution::Rollback),
        pb::Resolution::Unknown => Some(Resolution::Unknown),
        pb::Resolution::Unspecified => None,
    }
}

type SessionStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::SessionDown, tonic::Status>> + Send>,
>;

fn down(kind: pb::session_down::Kind) -> Result<pb::SessionDown, tonic::Status> {
    Ok(pb::SessionDown { kind: Some(kind) })
}

#[tonic::async_trait]
impl pb::producer_server::Producer for Services {
    type SessionStream = SessionStream;

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().producer_group))]
    async fn send_half(&self, req: Request<pb::SendHalfRequest>) -> Rpc<pb::SendHalfResponse> {
        let r = req.into_inner();
        let Some(m) = r.message else {
            return Ok(Response::new(pb::SendHalfResponse {
                status: status(&BrokerError::BadRequest("message is missing".into())),
                ..Default::default()
            }));
        };
        Ok(Response::new(
            match self.broker.send_half(&r.producer_group, outgoing(m)).await {
                Ok(h) => pb::SendHalfResponse {
                    status: ok(),
                    transaction_id: h.transaction_id,
                    message_id: h.message_id.to_string(),
                    queue_id: h.queue_id,
                },
                Err(e) => pb::SendHalfResponse {
                    status: status(&e),
                    ..Default::default()
                },
            },
        ))
    }

    #[tracing::instrument(skip_all, fields(tx = %req.get_ref().transaction_id))]
    async fn end_transaction(
        &self,
        req: Request<pb::EndTransactionRequest>,
    ) -> Rpc<pb::EndTransactionResponse> {
        let r = req.into_inner();
        let source = match pb::EndSource::try_from(r.source) {
            Ok(pb::EndSource::Check) => EndSource::Check,
            Ok(pb::EndSource::Operator) => EndSource::Operator,
            _ => EndSource::Producer,
        };
        let res = match resolution(r.resolution) {
            Some(res @ (Resolution::Commit | Resolution::Rollback)) => {
                self.broker
                    .end_transaction(&r.transaction_id, res, source)
                    .await
            }
            _ => Err(BrokerError::BadRequest(
                "resolution must be COMMIT or ROLLBACK".into(),
            )),
        };
        Ok(Response::new(pb::EndTransactionResponse {
            status: match res {
                Ok(()) => ok(),
                Err(e) => status(&e),
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().producer_group, messages = req.get_ref().messages.len()))]
    async fn send_halves(
        &self,
        req: Request<pb::SendHalvesRequest>,
    ) -> Rpc<pb::SendHalvesResponse> {
        let r = req.into_inner();
        let (status, receipts) = self.halves(&r.producer_group, r.messages).await;
        Ok(Response::new(pb::SendHalvesResponse { status, receipts }))
    }

    #[tracing::instrument(skip_all, fields(ends = req.get_ref().ends.len()))]
    async fn end_transactions(
        &self,
        req: Request<pb::EndTransactionsRequest>,
    ) -> Rpc<pb::EndTransactionsResponse> {
        let results = self.ends(req.into_inner().ends).await;
        Ok(Response::new(pb::EndTransactionsResponse {
            status: ok(),
            results,
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().producer_group, halves = req.get_ref().halves.len(), ends = req.get_ref().ends.len()))]
    async fn transaction_batch(
        &self,
        req: Request<pb::TransactionBatchRequest>,
    ) -> Rpc<pb::TransactionBatchResponse> {
        let r = req.into_inner();
        // Both appends usually land before the same flush, so the two
        // durability waits end together.
        let ((halves_status, receipts), end_results) = tokio::join!(
            async {
                if r.halves.is_empty() {
                    (ok(), Vec::new())
                } else {
                    self.halves(&r.producer_group, r.halves).await
                }
            },
            self.ends(r.ends),
        );
        Ok(Response::new(pb::TransactionBatchResponse {
            halves_status,
            receipts,
            end_results,
        }))
    }

    async fn session(
        &self,
        req: Request<tonic::Streaming<pb::SessionUp>>,
    ) -> Rpc<Self::SessionStream> {
        let mut inbound = req.into_inner();
        let (out_tx, out_rx) =
            tokio::sync::mpsc::channel::<Result<pb::SessionDown, tonic::Status>>(16);
        let hello = match inbound.message().await? {
            Some(pb::SessionUp {
                kind: Some(pb::session_up::Kind::Hello(h)),
            }) => h,
            _ => {
                let _ = out_tx
                    .send(down(pb::session_down::Kind::Error(pb::Status {
                        code: pb::Code::BadRequest as i32,
                        message: "the first session message must be a hello".into(),
                    })))
                    .await;
                return Ok(Response::new(Box::pin(
                    tokio_stream::wrappers::ReceiverStream::new(out_rx),
                )));
            }
        };
        // A session opened once shutdown has begun would keep the drain waiting.
        let refused = self
            .broker
            .check_running_pub()
            .and_then(|()| crate::names::check_group(&hello.producer_group));
        if let Err(e) = refused {
            let _ = out_tx
                .send(down(pb::session_down::Kind::Error(
                    status(&e).unwrap_or_default(),
                )))
                .await;
            return Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(out_rx),
            )));
        }
        let broker = Arc::clone(&self.broker);
        let (sid, mut checks) = broker
            .tx_state()
            .open_session(hello.producer_group.clone(), hello.topics);
        let _ = out_tx
            .send(down(pb::session_down::Kind::Welcome(pb::Welcome {
                session_id: sid,
            })))
            .await;
        let mut stop = broker.shutdown_signal();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    c = checks.recv() => {
                        let Some(c) = c else { break };
                        let msg = pb::CheckRequest {
                            transaction_id: c.transaction_id,
                            producer_group: c.producer_group,
                            check_times: c.check_times,
                            message: Some(wire_message(c.message, false)),
                        };
                        if out_tx.send(down(pb::session_down::Kind::Check(msg))).await.is_err() {
                            break;
                        }
                    }
                    up = inbound.message() => match up {
                        Ok(Some(pb::SessionUp { kind: Some(pb::session_up::Kind::Answer(a)) })) => {
                            match resolution(a.resolution) {
                                Some(r) => broker.check_answer(sid, &a.transaction_id, r).await,
                                None => tracing::warn!(session = sid, "check answer without a resolution"),
                            }
                        }
                        Ok(Some(_)) => tracing::warn!(session = sid, "unexpected session message ignored"),
                        Ok(None) | Err(_) => break,
                    },
                    // wait_for, not changed: the shutdown may have begun before this
                    // receiver was made, and changed() would then never fire.
                    _ = async { stop.wait_for(|stopping| *stopping).await.map(|_| ()) } => break,
                }
            }
            broker.tx_state().close_session(sid);
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out_rx),
        )))
    }

    #[tracing::instrument(skip_all, fields(messages = req.get_ref().messages.len()))]
    async fn send(&self, req: Request<pb::SendRequest>) -> Rpc<pb::SendResponse> {
        let msgs = req
            .into_inner()
            .messages
            .into_iter()
            .map(outgoing)
            .collect();
        Ok(Response::new(match self.broker.send(msgs).await {
            Ok(receipts) => pb::SendResponse {
                status: ok(),
                receipts: receipts
                    .into_iter()
                    .map(|r| pb::SendReceipt {
                        message_id: r.message_id.to_string(),
                        queue_id: r.queue_id,
                        queue_offset: r.queue_offset,
                        deliver_at_ms: r.deliver_at_ms,
                    })
                    .collect(),
            },
            Err(e) => pb::SendResponse {
                status: status(&e),
                receipts: vec![],
            },
        }))
    }
}

#[tonic::async_trait]
impl pb::consumer_server::Consumer for Services {
    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group, topic = %req.get_ref().topic))]
    async fn receive(&self, req: Request<pb::ReceiveRequest>) -> Rpc<pb::ReceiveResponse> {
        let r = req.into_inner();
        let res = self
            .broker
            .receive(ReceiveRequest {
                group: r.group,
                topic: r.topic,
                tag_expression: r.tag_expression,
                max_messages: r.max_messages,
                invisible_duration_ms: r.invisible_duration_ms,
                wait_ms: r.wait_ms,
            })
            .await;
        Ok(Response::new(match res {
            Ok(msgs) => pb::ReceiveResponse {
                status: ok(),
                messages: msgs.into_iter().map(|m| wire_message(m, true)).collect(),
            },
            Err(e) => pb::ReceiveResponse {
                status: status(&e),
                messages: vec![],
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group, handles = req.get_ref().receipt_handles.len()))]
    async fn ack(&self, req: Request<pb::AckRequest>) -> Rpc<pb::AckResponse> {
        let r = req.into_inner();
        let results = r
            .receipt_handles
            .iter()
            .map(
                |h| match Receipt::decode(h).and_then(|rc| self.broker.ack(&r.group, &rc)) {
                    Ok(()) => ok().unwrap_or_default(),
                    Err(e) => status(&e).unwrap_or_default(),
                },
            )
            .collect();
        Ok(Response::new(pb::AckResponse {
            status: ok(),
            results,
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group))]
    async fn nack(&self, req: Request<pb::NackRequest>) -> Rpc<pb::NackResponse> {
        let r = req.into_inner();
        let res = match Receipt::decode(&r.receipt_handle) {
            Ok(rc) => self.broker.nack(&r.group, &rc, &r.reason, r.delay_ms).await,
            Err(e) => Err(e),
        };
        Ok(Response::new(pb::NackResponse {
            status: match res {
                Ok(()) => ok(),
                Err(e) => status(&e),
            },
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group))]
    async fn change_invisible_duration(
        &self,
        req: Request<pb::ChangeInvisibleDurationRequest>,
    ) -> Rpc<pb::ChangeInvisibleDurationResponse> {
        let r = req.into_inner();
        let res = Receipt::decode(&r.receipt_handle).and_then(|rc| {
            self.broker
                .change_invisible_duration(&r.group, &rc, r.invisible_duration_ms)
        });
        Ok(Response::new(match res {
            Ok((rc, until)) => pb::ChangeInvisibleDurationResponse {
                status: ok(),
                receipt_handle: rc.encode(),
                invisible_until_ms: until,
            },
            Err(e) => pb::ChangeInvisibleDurationResponse {
                status: status(&e),
                ..Default::default()
            },
        }))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Services {
    #[tracing::instrument(skip_all, fields(topic = %req.get_ref().name))]
    async fn create_topic(
        &self,
        req: Request<pb::CreateTopicRequest>,
    ) -> Rpc<pb::CreateTopicResponse> {
        let r = req.into_inner();
        Ok(Response::new(pb::CreateTopicResponse {
            status: match self.broker.create_topic(&r.name, r.queues) {
                Ok(_) => ok(),
                Err(e) => status(&e),
            },
        }))
    }

    async fn list_topics(
        &self,
        _req: Request<pb::ListTopicsRequest>,
    ) -> Rpc<pb::ListTopicsResponse> {
        Ok(Response::new(pb::ListTopicsResponse {
            status: ok(),
            topics: self
                .broker
                .list_topics()
                .into_iter()
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
        _req: Request<pb::ListTransactionsRequest>,
    ) -> Rpc<pb::ListTransactionsResponse> {
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
        let r = req.into_inner();
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
        _req: Request<pb::DeadLetterCountsRequest>,
    ) -> Rpc<pb::DeadLetterCountsResponse> {
        Ok(Response::new(pb::DeadLetterCountsResponse {
            status: ok(),
            counts: self
                .broker
                .dead_letter_counts()
                .into_iter()
                .map(|(group, count)| pb::DeadLetterCount { group, count })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group))]
    async fn redrive_dead_letters(
        &self,
        req: Request<pb::RedriveDeadLettersRequest>,
    ) -> Rpc<pb::RedriveDeadLettersResponse> {
        let r = req.into_inner();
        let id = parse_message_id(&r.message_id);
        let res = match id {
            Ok(id) => self.broker.redrive(&r.group, id).await,
            Err(e) => Err(e),
        };
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
        let r = req.into_inner();
        Ok(Response::new(
            match self.broker.purge_dead_letters(&r.group) {
                Ok(n) => pb::PurgeDeadLettersResponse {
                    status: ok(),
                    count: n as u64,
                },
                Err(e) => pb::PurgeDeadLettersResponse {
                    status: status(&e),
                    count: 0,
                },
            },
        ))
    }

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().group, topic = %req.get_ref().topic))]
    async fn reset_offset(
        &self,
        req: Request<pb::ResetOffsetRequest>,
    ) -> Rpc<pb::ResetOffsetResponse> {
        let r = req.into_inner();
        let to = match r.to {
            Some(pb::reset_offset_request::To::Earliest(true)) => Ok(ResetTo::Earliest),
            Some(pb::reset_offset_request::To::Latest(true)) => Ok(ResetTo::Latest),
            Some(pb::reset_offset_request::To::TimestampMs(t)) => Ok(ResetTo::Timestamp(t)),
            _ => Err(BrokerError::BadRequest(
                "say where to: earliest, latest or timestamp_ms".into(),
            )),
        };
        let b = Arc::clone(&self.broker);
        let res = match to {
            Ok(to) => tokio::task::spawn_blocking(move || b.reset_offset(&r.group, &r.topic, to))
                .await
                .unwrap_or_else(|e| Err(BrokerError::Internal(format!("reset offset: {e}")))),
            Err(e) => Err(e),
        };
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
        let name = req.into_inner().name;
        let b = Arc::clone(&self.broker);
        let res = tokio::task::spawn_blocking(move || b.delete_topic(&name))
            .await
            .unwrap_or_else(|e| Err(BrokerError::Internal(format!("delete topic: {e}"))));
        Ok(Response::new(pb::DeleteTopicResponse {
            status: match res {
                Ok(()) => ok(),
                Err(e) => status(&e),
            },
        }))
    }

    async fn stats(&self, _req: Request<pb::StatsRequest>) -> Rpc<pb::StatsResponse> {
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
        }))
    }
}
