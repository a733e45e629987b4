//! The `Producer` service: sends, half messages, EndTransaction, and the
//! producer session on which check-backs go out.

use std::sync::Arc;

use halfmq_proto::v1 as pb;
use tonic::{Request, Response};

use super::{
    denied, down, ok, outgoing, resolution, status, who, wire_message, Rpc, Services, SessionStream,
};
use crate::auth::policy::{Action, Resource};
use crate::auth::verify::Principal;
use crate::core::transactions::{EndSource, PreparedEnds, Resolution};
use crate::error::BrokerError;

fn end_source(s: i32) -> EndSource {
    match pb::EndSource::try_from(s) {
        Ok(pb::EndSource::Check) => EndSource::Check,
        Ok(pb::EndSource::Operator) => EndSource::Operator,
        _ => EndSource::Producer,
    }
}

impl Services {
    /// Whether `who` may send half messages `msgs` of producer group
    /// `group`: `tx` on the group and `pub` on each topic.
    fn allow_halves(
        &self,
        who: Option<&Principal>,
        group: &str,
        msgs: &[pb::Message],
        rpc: &str,
    ) -> Result<(), tonic::Status> {
        if msgs.is_empty() {
            return Ok(());
        }
        self.allow(who, Action::Tx, Resource::ProducerGroup(group), rpc)?;
        self.allow_topics(who, Action::Pub, msgs, rpc)
    }

    /// Reads and authorizes ends of `who`: `tx` on each half's producer
    /// group, or `admin` for an operator's end of a given-up half. A
    /// refusal ends nothing (gRPC `PERMISSION_DENIED`).
    fn prepare_ends(
        &self,
        who: Option<&Principal>,
        ends: Vec<(String, Resolution)>,
        source: EndSource,
        rpc: &str,
    ) -> Result<Ends, tonic::Status> {
        let action = if source == EndSource::Operator {
            Action::Admin
        } else {
            Action::Tx
        };
        let users = self.broker.auth_users();
        let may_end = |group: &str| {
            crate::auth::authorize(users, who, action, &Resource::ProducerGroup(group), rpc)
        };
        let prepared = self.broker.prepare_ends(ends, source, &may_end);
        if let Err(results) = &prepared {
            if let Some(Err(BrokerError::PermissionDenied { action, resource })) = results
                .iter()
                .find(|r| matches!(r, Err(BrokerError::PermissionDenied { .. })))
            {
                return Err(denied(BrokerError::PermissionDenied {
                    action,
                    resource: resource.clone(),
                }));
            }
        }
        Ok(Ends { source, prepared })
    }

    /// Writes prepared ends; one result per end (operators' ends audited).
    async fn finish_ends(&self, who: Option<&Principal>, e: Ends) -> Vec<Result<(), BrokerError>> {
        let results = match e.prepared {
            Ok(p) => self.broker.finish_ends(p).await,
            Err(results) => results,
        };
        if e.source == EndSource::Operator {
            for r in &results {
                let outcome = if r.is_ok() { "OK" } else { "refused" };
                crate::auth::audit_admin(
                    who.map_or("-", Principal::name),
                    "tx end",
                    "transaction",
                    outcome,
                );
            }
        }
        results
    }

    /// Ends transactions of `who` ([`Services::prepare_ends`], then
    /// [`Services::finish_ends`]).
    async fn end_as(
        &self,
        who: Option<&Principal>,
        ends: Vec<(String, Resolution)>,
        source: EndSource,
        rpc: &str,
    ) -> Result<Vec<Result<(), BrokerError>>, tonic::Status> {
        let e = self.prepare_ends(who, ends, source, rpc)?;
        Ok(self.finish_ends(who, e).await)
    }

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
                        duplicate: h.duplicate,
                    })
                    .collect(),
            ),
            Err(e) => (status(&e), Vec::new()),
        }
    }

    /// Reads and authorizes wire ends, each alone (one status per end
    /// once finished). More than `max_batch_messages` ends are refused as a
    /// whole (the limit bounds how long one request holds the transaction
    /// lock).
    fn prepare_wire_ends(
        &self,
        who: Option<&Principal>,
        ends: Vec<pb::EndTransactionRequest>,
        rpc: &str,
    ) -> Result<Ends, tonic::Status> {
        let max = self.broker.config().max_batch_messages as usize;
        let Some(first) = ends.first() else {
            return Ok(Ends {
                source: EndSource::Producer,
                prepared: Err(Vec::new()),
            });
        };
        let source = end_source(first.source);
        if ends.len() > max {
            let n = ends.len();
            let refused = (0..n)
                .map(|_| {
                    Err(BrokerError::BadRequest(format!(
                        "{n} ends exceeds max_batch_messages {max}"
                    )))
                })
                .collect();
            return Ok(Ends {
                source,
                prepared: Err(refused),
            });
        }
        let ends: Vec<(String, Resolution)> = ends
            .into_iter()
            .map(|e| {
                (
                    e.transaction_id,
                    resolution(e.resolution).unwrap_or(Resolution::Unknown),
                )
            })
            .collect();
        self.prepare_ends(who, ends, source, rpc)
    }

    /// Writes what [`Services::prepare_wire_ends`] prepared: one status per end.
    async fn finish_wire_ends(&self, who: Option<&Principal>, e: Ends) -> Vec<pb::Status> {
        self.finish_ends(who, e)
            .await
            .into_iter()
            .map(|r| match r {
                Ok(()) => ok().unwrap_or_default(),
                Err(e) => status(&e).unwrap_or_default(),
            })
            .collect()
    }
}

/// Ends read and authorized, to be written (or their refusals).
struct Ends {
    source: EndSource,
    prepared: Result<PreparedEnds, Vec<Result<(), BrokerError>>>,
}

#[tonic::async_trait]
impl pb::producer_server::Producer for Services {
    type SessionStream = SessionStream;

    #[tracing::instrument(skip_all, fields(group = %req.get_ref().producer_group))]
    async fn send_half(&self, req: Request<pb::SendHalfRequest>) -> Rpc<pb::SendHalfResponse> {
        let w = who(&req);
        let r = req.into_inner();
        let Some(m) = r.message else {
            return Ok(Response::new(pb::SendHalfResponse {
                status: status(&BrokerError::BadRequest("message is missing".into())),
                ..Default::default()
            }));
        };
        self.allow_halves(
            w.as_ref(),
            &r.producer_group,
            std::slice::from_ref(&m),
            "SendHalf",
        )?;
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
        let w = who(&req);
        let r = req.into_inner();
        let source = end_source(r.source);
        let res = match resolution(r.resolution) {
            Some(res @ (Resolution::Commit | Resolution::Rollback)) => self
                .end_as(
                    w.as_ref(),
                    vec![(r.transaction_id, res)],
                    source,
                    "EndTransaction",
                )
                .await?
                .pop()
                .unwrap_or_else(|| Err(BrokerError::Internal("no result for an end".into()))),
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
        let w = who(&req);
        let r = req.into_inner();
        self.allow_halves(w.as_ref(), &r.producer_group, &r.messages, "SendHalves")?;
        let (status, receipts) = self.halves(&r.producer_group, r.messages).await;
        Ok(Response::new(pb::SendHalvesResponse { status, receipts }))
    }

    #[tracing::instrument(skip_all, fields(ends = req.get_ref().ends.len()))]
    async fn end_transactions(
        &self,
        req: Request<pb::EndTransactionsRequest>,
    ) -> Rpc<pb::EndTransactionsResponse> {
        let w = who(&req);
        let e = self.prepare_wire_ends(w.as_ref(), req.into_inner().ends, "EndTransactions")?;
        let results = self.finish_wire_ends(w.as_ref(), e).await;
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
        let w = who(&req);
        let r = req.into_inner();
        self.allow_halves(w.as_ref(), &r.producer_group, &r.halves, "TransactionBatch")?;
        // The ends are read and authorized before the halves are stored,
        // so that a refusal stores nothing.
        let ends = self.prepare_wire_ends(w.as_ref(), r.ends, "TransactionBatch")?;
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
            self.finish_wire_ends(w.as_ref(), ends),
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
        let w = who(&req);
        let mut inbound = req.into_inner();
        let (out_tx, out_rx) =
            tokio::sync::mpsc::channel::<Result<pb::SessionDown, tonic::Status>>(16);
        let hello = match inbound.message().await? {
            Some(pb::SessionUp {
                kind: Some(pb::session_up::Kind::Hello(h)),
            }) => h,
            _ => {
                let refusal = pb::Status {
                    code: pb::Code::BadRequest as i32,
                    message: "the first session message must be a hello".into(),
                    leader: String::new(),
                };
                return Ok(refuse_session(out_tx, out_rx, refusal).await);
            }
        };
        // Only a user with `tx` on the group gets its check-backs and may
        // answer them.
        self.allow(
            w.as_ref(),
            Action::Tx,
            Resource::ProducerGroup(&hello.producer_group),
            "Session",
        )?;
        // A session opened once shutdown has begun would keep the drain waiting.
        let refused = self
            .broker
            .check_running()
            .and_then(|()| self.broker.check_serving())
            .and_then(|()| crate::core::names::check_group(&hello.producer_group));
        if let Err(e) = refused {
            return Ok(refuse_session(out_tx, out_rx, status(&e).unwrap_or_default()).await);
        }
        let broker = Arc::clone(&self.broker);
        let group = hello.producer_group.clone();
        let opened = broker.tx_state().open_session(
            hello.producer_group.clone(),
            hello.topics,
            None,
            broker.config().max_producer_sessions as usize,
        );
        let (sid, mut checks) = match opened {
            Ok(o) => o,
            Err(e) => {
                return Ok(refuse_session(out_tx, out_rx, status(&e).unwrap_or_default()).await)
            }
        };
        let _ = out_tx
            .send(down(pb::session_down::Kind::Welcome(pb::Welcome {
                session_id: sid,
            })))
            .await;
        let mut stop = broker.shutdown_signal();
        // A broker group member that stops being the leader ends its
        // sessions (with NOT_LEADER): their producers reconnect to the next
        // leader, whose check-backs they answer from then on.
        let mut leadership = tokio::time::interval(std::time::Duration::from_millis(200));
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = leadership.tick() => {
                        // A revoked `tx` ends the session too.
                        let allowed = crate::auth::authorize(
                            broker.auth_users(),
                            w.as_ref(),
                            Action::Tx,
                            &Resource::ProducerGroup(&group),
                            "Session",
                        );
                        if let Err(e) = broker.check_serving().and(allowed) {
                            let end = match e {
                                BrokerError::PermissionDenied { .. } => Err(denied(e)),
                                e => down(pb::session_down::Kind::Error(status(&e).unwrap_or_default())),
                            };
                            let _ = out_tx.send(end).await;
                            break;
                        }
                    }
                    c = checks.recv() => {
                        let Some(c) = c else { break };
                        let msg = pb::CheckRequest {
                            transaction_id: c.transaction_id,
                            producer_group: c.producer_group,
                            check_times: c.check_times,
                            message: Some(wire_message(c.message, String::new())),
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
        let w = who(&req);
        let msgs = req.into_inner().messages;
        self.allow_topics(w.as_ref(), Action::Pub, &msgs, "Send")?;
        let msgs = msgs.into_iter().map(outgoing).collect();
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
                        duplicate: r.duplicate,
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

/// Answers a session that is refused with one error message, then ends it.
async fn refuse_session(
    out_tx: tokio::sync::mpsc::Sender<Result<pb::SessionDown, tonic::Status>>,
    out_rx: tokio::sync::mpsc::Receiver<Result<pb::SessionDown, tonic::Status>>,
    refusal: pb::Status,
) -> Response<SessionStream> {
    let _ = out_tx
        .send(down(pb::session_down::Kind::Error(refusal)))
        .await;
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
        out_rx,
    )))
}
