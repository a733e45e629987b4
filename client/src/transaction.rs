//! Transactional producer: half messages, EndTransaction, and the producer
//! session on which the broker asks for check-backs.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halfmq_proto::v1 as pb;
use tokio::sync::{mpsc, watch};

use crate::coalesce::{BatchLimits, Coalescer};
use crate::{check, one, per_message_refusal, Client, ClientError, Message};

/// (transaction id, message id, queue id) of a stored half.
type HalfIds = (String, String, u32);
type EndCoalescer = Coalescer<(String, TransactionResolution), ()>;

/// The outcome of a local transaction, or a checker's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransactionResolution {
    /// Make the message visible to consumers.
    Commit,
    /// Discard it.
    Rollback,
    /// Not known yet: the broker checks again later.
    Unknown,
}

impl TransactionResolution {
    fn wire(self) -> pb::Resolution {
        match self {
            TransactionResolution::Commit => pb::Resolution::Commit,
            TransactionResolution::Rollback => pb::Resolution::Rollback,
            TransactionResolution::Unknown => pb::Resolution::Unknown,
        }
    }
}

/// A half message as shown to a [`TransactionChecker`].
#[derive(Debug, Clone)]
pub struct MessageView {
    /// Transaction id.
    pub transaction_id: String,
    /// Message id the message will have once committed.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Tag.
    pub tag: String,
    /// Keys.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: HashMap<String, String>,
    /// Body.
    pub body: Bytes,
    /// Checks delivered for this half before this one.
    pub check_times: u32,
}

/// Answers the broker's check-backs: looks up the local transaction of a half
/// message (e.g. "does order 42 exist in my database?").
pub trait TransactionChecker: Send + Sync + 'static {
    /// The local transaction's state for `msg`.
    fn check(&self, msg: MessageView) -> impl Future<Output = TransactionResolution> + Send;
}

impl<F, Fut> TransactionChecker for F
where
    F: Fn(MessageView) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = TransactionResolution> + Send,
{
    fn check(&self, msg: MessageView) -> impl Future<Output = TransactionResolution> + Send {
        self(msg)
    }
}

/// A half message waiting for its end.
#[derive(Debug, Clone)]
pub struct Transaction {
    client: Client,
    ends: Option<EndCoalescer>,
    /// Transaction id (48 hex digits).
    pub transaction_id: String,
    /// Message id the message has once committed.
    pub message_id: String,
    /// Queue id it will be delivered in.
    pub queue_id: u32,
}

impl Transaction {
    /// Commits: the message becomes visible, once, whatever the number of calls.
    ///
    /// # Errors
    /// [`crate::Code::TransactionConflict`] when it was rolled back already;
    /// transport errors (retried with backoff: ending is idempotent).
    pub async fn commit(&self) -> Result<(), ClientError> {
        self.end(TransactionResolution::Commit).await
    }

    async fn end(&self, r: TransactionResolution) -> Result<(), ClientError> {
        match &self.ends {
            Some(c) => c.call((self.transaction_id.clone(), r)).await,
            None => {
                end_transaction(
                    &self.client,
                    &self.transaction_id,
                    r,
                    pb::EndSource::Producer,
                )
                .await
            }
        }
    }

    /// Rolls back: the message is discarded.
    ///
    /// # Errors
    /// [`crate::Code::TransactionConflict`] when it was committed already;
    /// transport errors.
    pub async fn rollback(&self) -> Result<(), ClientError> {
        self.end(TransactionResolution::Rollback).await
    }
}

/// Ends a transaction by id (operators, `halfmq tx end`).
///
/// # Errors
/// [`crate::Code::TransactionNotFound`], [`crate::Code::TransactionConflict`],
/// transport errors.
pub async fn end_transaction(
    client: &Client,
    transaction_id: &str,
    resolution: TransactionResolution,
    source: pb::EndSource,
) -> Result<(), ClientError> {
    let req = pb::EndTransactionRequest {
        transaction_id: transaction_id.to_owned(),
        resolution: resolution.wire() as i32,
        source: source as i32,
    };
    let resp = client
        .call(req, Duration::ZERO, |r| {
            let mut c = client.producer();
            async move { c.end_transaction(r).await }
        })
        .await?;
    check(resp.status)
}

/// What [`TransactionProducer::send_in_transaction`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransactionOutcome {
    /// Transaction id.
    pub transaction_id: String,
    /// Message id.
    pub message_id: String,
    /// What was sent: Commit, Rollback, or Unknown (no end sent: the local
    /// transaction failed, panicked or said Unknown; the check-back decides).
    pub resolution: TransactionResolution,
}

/// Sends transactional messages for one producer group and answers the
/// broker's check-backs with its checker. Cheap to clone; the session ends
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct TransactionProducer {
    client: Client,
    group: String,
    halves: Coalescer<pb::Message, HalfIds>,
    ends: EndCoalescer,
    connected: watch::Receiver<bool>,
    _stop: Arc<watch::Sender<bool>>,
}

impl TransactionProducer {
    /// A producer of `group` whose session answers checks with `checker` for
    /// every topic. The session (re)connects in the background with
    /// exponential backoff (100 ms to 5 s).
    pub fn new(client: Client, group: impl Into<String>, checker: impl TransactionChecker) -> Self {
        Self::with_topics(client, group, Vec::new(), checker)
    }

    /// Like [`TransactionProducer::new`], declaring the topics this instance
    /// can answer checks for (empty = all of its group's).
    pub fn with_topics(
        client: Client,
        group: impl Into<String>,
        topics: Vec<String>,
        checker: impl TransactionChecker,
    ) -> Self {
        let group = group.into();
        let (stop_tx, stop_rx) = watch::channel(false);
        let (conn_tx, conn_rx) = watch::channel(false);
        tokio::spawn(session_loop(
            client.clone(),
            group.clone(),
            topics,
            Arc::new(checker),
            stop_rx,
            conn_tx,
        ));
        let limits = BatchLimits {
            max_items: 256,
            max_weight: 4 << 20,
            max_inflight: crate::DEFAULT_MAX_INFLIGHT_BATCHES,
        };
        let (c, g) = (client.clone(), group.clone());
        let halves = Coalescer::spawn(
            limits,
            |m: &pb::Message| m.body.len(),
            move |msgs| {
                let (c, g) = (c.clone(), g.clone());
                async move { send_halves_coalesced(&c, &g, msgs).await }
            },
        );
        let c = client.clone();
        let ends = Coalescer::spawn(
            limits,
            |_| 1,
            move |ends| {
                let c = c.clone();
                async move { end_transactions(&c, ends).await }
            },
        );
        TransactionProducer {
            client,
            group,
            halves,
            ends,
            connected: conn_rx,
            _stop: Arc::new(stop_tx),
        }
    }

    /// The producer group.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Waits until the session is established (the broker can route checks
    /// here), at most `timeout`. Returns whether it is.
    pub async fn wait_session(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Sends a half message: stored durably, invisible to consumers.
    ///
    /// # Errors
    /// Broker refusals (nothing stored), transport errors (outcome unknown:
    /// an orphan half would be resolved by check-back).
    pub async fn send_half(&self, msg: Message) -> Result<Transaction, ClientError> {
        let (transaction_id, message_id, queue_id) = self.halves.call(msg.into_wire()).await?;
        Ok(Transaction {
            client: self.client.clone(),
            ends: Some(self.ends.clone()),
            transaction_id,
            message_id,
            queue_id,
        })
    }

    /// Sends the half, runs `local_transaction`, then commits or rolls back
    /// by its result. An `Err`, a panic, or `Unknown` sends no end: the
    /// broker's check-back resolves it later through the checker.
    ///
    /// # Errors
    /// Errors of the half send and of the end request.
    pub async fn send_in_transaction<F, Fut, E>(
        &self,
        msg: Message,
        local_transaction: F,
    ) -> Result<TransactionOutcome, ClientError>
    where
        F: FnOnce(Transaction) -> Fut,
        Fut: Future<Output = Result<TransactionResolution, E>> + Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let tx = self.send_half(msg).await?;
        let fut = local_transaction(tx.clone());
        let resolution = match tokio::spawn(fut).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(transaction_id = %tx.transaction_id, error = %e, "local transaction failed; left to check-back");
                TransactionResolution::Unknown
            }
            Err(e) => {
                tracing::warn!(transaction_id = %tx.transaction_id, error = %e, "local transaction panicked; left to check-back");
                TransactionResolution::Unknown
            }
        };
        match resolution {
            TransactionResolution::Commit => tx.commit().await?,
            TransactionResolution::Rollback => tx.rollback().await?,
            TransactionResolution::Unknown => {}
        }
        Ok(TransactionOutcome {
            transaction_id: tx.transaction_id,
            message_id: tx.message_id,
            resolution,
        })
    }
}

async fn send_halves_wire(
    client: &Client,
    group: &str,
    msgs: Vec<pb::Message>,
) -> Result<Vec<HalfIds>, ClientError> {
    let n = msgs.len();
    let req = pb::SendHalvesRequest {
        producer_group: group.to_owned(),
        messages: msgs,
    };
    let resp = client
        .producer()
        .send_halves(client.request(req, Duration::ZERO))
        .await?
        .into_inner();
    check(resp.status)?;
    if resp.receipts.len() != n {
        return Err(ClientError::Connect(format!(
            "broker returned {} receipts for {n} halves",
            resp.receipts.len()
        )));
    }
    Ok(resp
        .receipts
        .into_iter()
        .map(|r| (r.transaction_id, r.message_id, r.queue_id))
        .collect())
}

async fn send_halves_coalesced(
    client: &Client,
    group: &str,
    msgs: Vec<pb::Message>,
) -> Vec<Result<HalfIds, ClientError>> {
    let n = msgs.len();
    match send_halves_wire(client, group, msgs.clone()).await {
        Ok(v) => v.into_iter().map(Ok).collect(),
        Err(ClientError::Broker { code, .. }) if n > 1 && per_message_refusal(code) => {
            let mut out = Vec::with_capacity(n);
            for m in msgs {
                out.push(one(send_halves_wire(client, group, vec![m]).await));
            }
            out
        }
        Err(e) => (0..n).map(|_| Err(e.duplicate())).collect(),
    }
}

/// Ends several transactions in one request (retried on transport errors:
/// ending is idempotent); one result per end.
async fn end_transactions(
    client: &Client,
    ends: Vec<(String, TransactionResolution)>,
) -> Vec<Result<(), ClientError>> {
    let n = ends.len();
    let req = pb::EndTransactionsRequest {
        ends: ends
            .into_iter()
            .map(|(t, r)| pb::EndTransactionRequest {
                transaction_id: t,
                resolution: r.wire() as i32,
                source: pb::EndSource::Producer as i32,
            })
            .collect(),
    };
    let resp = client
        .call(req, Duration::ZERO, |r| {
            let mut c = client.producer();
            async move { c.end_transactions(r).await }
        })
        .await;
    match resp {
        Ok(r) => match check(r.status) {
            Ok(()) => r.results.into_iter().map(|s| check(Some(s))).collect(),
            Err(e) => (0..n).map(|_| Err(e.duplicate())).collect(),
        },
        Err(e) => (0..n).map(|_| Err(e.duplicate())).collect(),
    }
}

async fn session_loop<C: TransactionChecker>(
    client: Client,
    group: String,
    topics: Vec<String>,
    checker: Arc<C>,
    mut stop: watch::Receiver<bool>,
    connected: watch::Sender<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let (up_tx, up_rx) = mpsc::channel::<pb::SessionUp>(256);
        let hello = pb::SessionUp {
            kind: Some(pb::session_up::Kind::Hello(pb::Hello {
                producer_group: group.clone(),
                topics: topics.clone(),
            })),
        };
        if up_tx.send(hello).await.is_err() {
            return;
        }
        let mut producer = client.producer();
        let call = producer.session(tokio_stream::wrappers::ReceiverStream::new(up_rx));
        let opened = tokio::select! {
            r = call => r,
            _ = stop.changed() => return,
        };
        match opened {
            Ok(resp) => {
                let mut inbound = resp.into_inner();
                // Checker calls in progress; dropped (aborted) with the
                // session, so none keeps the stream open after it ends.
                let mut checks = tokio::task::JoinSet::new();
                loop {
                    while checks.try_join_next().is_some() {}
                    let msg = tokio::select! {
                        m = inbound.message() => m,
                        _ = stop.changed() => { let _ = connected.send(false); return; }
                    };
                    match msg {
                        Ok(Some(pb::SessionDown {
                            kind: Some(pb::session_down::Kind::Welcome(_)),
                        })) => {
                            backoff = Duration::from_millis(100);
                            let _ = connected.send(true);
                        }
                        Ok(Some(pb::SessionDown {
                            kind: Some(pb::session_down::Kind::Check(c)),
                        })) => {
                            let checker = Arc::clone(&checker);
                            let up = up_tx.clone();
                            checks.spawn(async move {
                                let m = c.message.unwrap_or_default();
                                let view = MessageView {
                                    transaction_id: c.transaction_id.clone(),
                                    message_id: m.message_id,
                                    topic: m.topic,
                                    tag: m.tag,
                                    keys: m.keys,
                                    properties: m.properties,
                                    body: m.body,
                                    check_times: c.check_times,
                                };
                                let r = checker.check(view).await;
                                let _ = up
                                    .send(pb::SessionUp {
                                        kind: Some(pb::session_up::Kind::Answer(pb::CheckAnswer {
                                            transaction_id: c.transaction_id,
                                            resolution: r.wire() as i32,
                                        })),
                                    })
                                    .await;
                            });
                        }
                        Ok(Some(pb::SessionDown {
                            kind: Some(pb::session_down::Kind::Error(s)),
                        })) => {
                            tracing::error!(code = s.code, message = %s.message, "producer session refused");
                            break;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "producer session could not open"),
        }
        let _ = connected.send(false);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// An unresolved half, as listed by [`crate::Admin::list_transactions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingTransaction {
    /// Transaction id.
    pub transaction_id: String,
    /// Message id.
    pub message_id: String,
    /// Topic.
    pub topic: String,
    /// Producer group.
    pub producer_group: String,
    /// Since stored, ms (broker clock).
    pub age_ms: u64,
    /// Checks delivered.
    pub check_times: u32,
    /// Given up after check_max checks.
    pub given_up: bool,
    /// Why it is still pending.
    pub note: String,
}
