//! Transactional producer: half messages, EndTransaction, and the producer
//! session on which the broker asks for check-backs.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use halfmq_proto::v1 as pb;
use tokio::sync::{mpsc, watch};

use crate::coalesce::{BatchLimits, Coalescer};
use crate::{check, one, per_message_refusal, AutoKeys, Client, ClientError, Message};

/// A stored half: transaction id, message id, queue id, and whether its
/// idempotency key had been stored before (the first send's ids).
#[derive(Debug)]
struct HalfIds {
    transaction_id: String,
    message_id: String,
    queue_id: u32,
    duplicate: bool,
}

impl From<pb::HalfReceipt> for HalfIds {
    fn from(r: pb::HalfReceipt) -> HalfIds {
        HalfIds {
            transaction_id: r.transaction_id,
            message_id: r.message_id,
            queue_id: r.queue_id,
            duplicate: r.duplicate,
        }
    }
}

/// One call coalesced into a `TransactionBatch` request.
#[derive(Debug)]
enum TxItem {
    Half(Box<pb::Message>),
    End(String, TransactionResolution),
}

/// The result of a [`TxItem`].
#[derive(Debug)]
enum TxDone {
    Half(HalfIds),
    Ended,
}

type TxCoalescer = Coalescer<TxItem, TxDone>;

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
    /// This check-back's number for the half: 1 for the first.
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
    batches: Option<TxCoalescer>,
    /// Transaction id (80 hex digits: physical offset, message id and a MAC
    /// tag of the broker; not guessable).
    pub transaction_id: String,
    /// Message id the message has once committed.
    pub message_id: String,
    /// Queue id it will be delivered in.
    pub queue_id: u32,
    /// The half's idempotency key had been stored before: these are the
    /// first send's ids, and nothing was stored now.
    pub duplicate: bool,
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
        match &self.batches {
            Some(c) => c
                .call(TxItem::End(self.transaction_id.clone(), r))
                .await
                .map(|_| ()),
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
        .call_with(true, req, Duration::ZERO, |r| {
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
    /// Half sends and ends, coalesced together into `TransactionBatch`
    /// requests: one request per flush where there were two.
    batches: TxCoalescer,
    /// Automatic idempotency keys for halves sent without one.
    keys: Arc<AutoKeys>,
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
        let unsupported = Arc::new(AtomicBool::new(false));
        let batches = Coalescer::spawn(
            limits,
            |item: &TxItem| match item {
                TxItem::Half(m) => m.body.len(),
                TxItem::End(..) => 1,
            },
            move |items| {
                let (c, g, u) = (c.clone(), g.clone(), Arc::clone(&unsupported));
                async move { send_transaction_batch(&c, &g, &u, items).await }
            },
        );
        TransactionProducer {
            client,
            group,
            batches,
            keys: Arc::new(AutoKeys::new()),
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

    /// Sends a half message: stored durably, invisible to consumers. A half
    /// without an idempotency key gets an automatic one, so the transport
    /// errors this retries (up to the client's `max_attempts`) never store
    /// it twice.
    ///
    /// # Errors
    /// Broker refusals (nothing stored), transport errors after the retries
    /// (outcome unknown: an orphan half would be resolved by check-back).
    pub async fn send_half(&self, mut msg: Message) -> Result<Transaction, ClientError> {
        self.keys.fill(&mut msg);
        let TxDone::Half(HalfIds {
            transaction_id,
            message_id,
            queue_id,
            duplicate,
        }) = self
            .batches
            .call(TxItem::Half(Box::new(msg.into_wire())))
            .await?
        else {
            return Err(ClientError::Connect(
                "a half send was answered as an end".into(),
            ));
        };
        Ok(Transaction {
            client: self.client.clone(),
            batches: Some(self.batches.clone()),
            transaction_id,
            message_id,
            queue_id,
            duplicate,
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
    let keyed = msgs.iter().all(|m| m.idempotency_key.is_some());
    let req = pb::SendHalvesRequest {
        producer_group: group.to_owned(),
        messages: msgs,
    };
    let once = || {
        let req = req.clone();
        async move {
            let mut c = client.producer();
            client
                .timed(
                    Duration::ZERO,
                    c.send_halves(client.request(req, Duration::ZERO)),
                )
                .await
        }
    };
    // Keyed halves are safe to send again: a stored one answers as a
    // duplicate with its first transaction id.
    let resp = if keyed {
        client.retry_with(true, once).await
    } else {
        client.redirected(once).await
    }
    .map_err(|e| e.for_batch(n))?;
    check(resp.status)?;
    if resp.receipts.len() != n {
        return Err(ClientError::Connect(format!(
            "broker returned {} receipts for {n} halves",
            resp.receipts.len()
        )));
    }
    Ok(resp.receipts.into_iter().map(HalfIds::from).collect())
}

async fn send_halves_coalesced(
    client: &Client,
    group: &str,
    msgs: Vec<pb::Message>,
) -> Vec<Result<HalfIds, ClientError>> {
    match send_halves_wire(client, group, msgs.clone()).await {
        Ok(v) => v.into_iter().map(Ok).collect(),
        Err(e) => halves_refused(client, group, msgs, e).await,
    }
}

/// A batch of halves was refused with `e` (nothing stored): on a refusal that
/// concerns one message, resends them one by one so only the culprit fails;
/// otherwise every half gets `e`.
async fn halves_refused(
    client: &Client,
    group: &str,
    msgs: Vec<pb::Message>,
    e: ClientError,
) -> Vec<Result<HalfIds, ClientError>> {
    match e {
        ClientError::Broker { code, .. } if msgs.len() > 1 && per_message_refusal(code) => {
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                out.push(one(send_halves_wire(client, group, vec![m]).await));
            }
            out
        }
        e => msgs.iter().map(|_| Err(e.duplicate())).collect(),
    }
}

/// Sends coalesced half sends and ends, in one `TransactionBatch` request when
/// there are both; one result per item, in order. `unsupported` is set (and
/// the two separate requests used from then on) when the broker predates
/// `TransactionBatch`.
async fn send_transaction_batch(
    client: &Client,
    group: &str,
    unsupported: &AtomicBool,
    items: Vec<TxItem>,
) -> Vec<Result<TxDone, ClientError>> {
    let mut halves = Vec::new();
    let mut ends = Vec::new();
    let kinds: Vec<bool> = items
        .into_iter()
        .map(|item| match item {
            TxItem::Half(m) => {
                halves.push(*m);
                true
            }
            TxItem::End(t, r) => {
                ends.push((t, r));
                false
            }
        })
        .collect();
    let (half_results, end_results) = if ends.is_empty() {
        (
            send_halves_coalesced(client, group, halves).await,
            Vec::new(),
        )
    } else if halves.is_empty() {
        (Vec::new(), end_transactions(client, ends).await)
    } else if unsupported.load(Ordering::Relaxed) {
        tokio::join!(
            send_halves_coalesced(client, group, halves),
            end_transactions(client, ends)
        )
    } else {
        halves_and_ends(client, group, unsupported, halves, ends).await
    };
    let mut h = half_results.into_iter();
    let mut e = end_results.into_iter();
    kinds
        .into_iter()
        .map(|is_half| {
            let r = if is_half {
                h.next().map(|r| r.map(TxDone::Half))
            } else {
                e.next().map(|r| r.map(|()| TxDone::Ended))
            };
            r.unwrap_or_else(|| {
                Err(ClientError::Connect(
                    "batch answered too few results".into(),
                ))
            })
        })
        .collect()
}

/// One `TransactionBatch` request (see [`send_transaction_batch`]).
async fn halves_and_ends(
    client: &Client,
    group: &str,
    unsupported: &AtomicBool,
    halves: Vec<pb::Message>,
    ends: Vec<(String, TransactionResolution)>,
) -> (
    Vec<Result<HalfIds, ClientError>>,
    Vec<Result<(), ClientError>>,
) {
    let (nh, ne) = (halves.len(), ends.len());
    let req = pb::TransactionBatchRequest {
        producer_group: group.to_owned(),
        halves: halves.clone(),
        ends: end_requests(&ends),
    };
    let mut c = client.producer();
    let resp = match client
        .timed(
            Duration::ZERO,
            c.transaction_batch(client.request(req, Duration::ZERO)),
        )
        .await
    {
        Ok(r) => r,
        Err(ClientError::Transport(s)) if s.code() == tonic::Code::Unimplemented => {
            unsupported.store(true, Ordering::Relaxed);
            return tokio::join!(
                send_halves_coalesced(client, group, halves),
                end_transactions(client, ends)
            );
        }
        Err(e) => {
            // Ends are idempotent and keyed halves are too: both are sent
            // again on their own, with the retries those requests get. An
            // unkeyed half's outcome is unknown (an orphan half is resolved
            // by check-back).
            if halves.iter().all(|m| m.idempotency_key.is_some()) {
                return tokio::join!(
                    send_halves_coalesced(client, group, halves),
                    end_transactions(client, ends)
                );
            }
            let e = e.for_batch(nh);
            let half_results = halves.iter().map(|_| Err(e.duplicate())).collect();
            return (half_results, end_transactions(client, ends).await);
        }
    };
    let half_results = match check(resp.halves_status) {
        Ok(()) if resp.receipts.len() == nh => resp
            .receipts
            .into_iter()
            .map(|r| Ok(HalfIds::from(r)))
            .collect(),
        Ok(()) => {
            let e = ClientError::Connect(format!(
                "broker returned {} receipts for {nh} halves",
                resp.receipts.len()
            ));
            halves.iter().map(|_| Err(e.duplicate())).collect()
        }
        Err(e) => halves_refused(client, group, halves, e).await,
    };
    let end_results = if resp.end_results.len() == ne {
        resp.end_results
            .into_iter()
            .map(|s| check(Some(s)))
            .collect()
    } else {
        let e = ClientError::Connect(format!(
            "broker returned {} results for {ne} ends",
            resp.end_results.len()
        ));
        (0..ne).map(|_| Err(e.duplicate())).collect()
    };
    (half_results, end_results)
}

fn end_requests(ends: &[(String, TransactionResolution)]) -> Vec<pb::EndTransactionRequest> {
    ends.iter()
        .map(|(t, r)| pb::EndTransactionRequest {
            transaction_id: t.clone(),
            resolution: r.wire() as i32,
            source: pb::EndSource::Producer as i32,
        })
        .collect()
}

/// Ends several transactions in one request (retried on transport errors:
/// ending is idempotent); one result per end.
async fn end_transactions(
    client: &Client,
    ends: Vec<(String, TransactionResolution)>,
) -> Vec<Result<(), ClientError>> {
    let n = ends.len();
    let req = pb::EndTransactionsRequest {
        ends: end_requests(&ends),
    };
    let resp = client
        .call_with(true, req, Duration::ZERO, |r| {
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
                            if s.code == pb::Code::NotLeader as i32 {
                                // A broker group member that is not (or no
                                // longer) the leader: go to the one it names.
                                tracing::debug!(leader = %s.leader, "producer session moves to the leader");
                                let _ = client.follow(&s.leader);
                                backoff = Duration::from_millis(50);
                            } else {
                                tracing::error!(code = s.code, message = %s.message, "producer session refused");
                            }
                            break;
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => {
                            // The broker went away: with a broker group,
                            // try the next member (it names the leader).
                            if client.brokers().len() > 1 {
                                let _ = client.follow("");
                                backoff = Duration::from_millis(50);
                            }
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "producer session could not open");
                if client.brokers().len() > 1 {
                    let _ = client.follow("");
                }
            }
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
