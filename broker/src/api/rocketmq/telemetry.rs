//! The Telemetry stream: a client's Settings (answered with the broker's),
//! and, for producers, halfmq's check-backs as
//! `RecoverOrphanedTransactionCommand`.
//!
//! A producer's stream opens one producer session per topic it publishes
//! (its halves' producer group is the topic, `producer.rs`), marked with
//! the client's id so that the halves it sent are checked with it first,
//! else with another live producer of the topic. Its answer comes back as
//! an EndTransaction with source `SOURCE_SERVER_CHECK`, matched here to
//! the session the check went out on. The live clients are counted
//! against `rocketmq_max_clients`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use halfmq_proto::rocketmq as rmq;
use tokio::sync::mpsc;

use super::convert::{duration, name_of, wire_message};
use super::{status_of, Caller, RocketMq, TelemetryStream};
use crate::auth::policy::{Action, Resource};
use crate::core::transactions::CheckRequest;
use crate::core::Broker;

/// Most topics one stream serves check-backs of.
const MAX_TOPICS_PER_STREAM: usize = 1024;
/// Most checks remembered as out to one client (older answers then end
/// the transaction like the producer's own EndTransaction).
const MAX_CHECKS_PER_CLIENT: usize = 65_536;
/// Messages per receive the broker suggests to consumers.
const SUGGESTED_BATCH: u32 = 32;

/// The live RocketMQ clients (those with a Telemetry stream open).
#[derive(Debug)]
pub(super) struct Clients {
    inner: Mutex<HashMap<String, Entry>>,
    next_stream: std::sync::atomic::AtomicU64,
    max: usize,
}

#[derive(Debug, Default)]
struct Entry {
    /// Its live streams: id, and where to ask it to serve another topic.
    streams: Vec<(u64, mpsc::Sender<String>)>,
    /// Checks out to it: transaction id -> producer session id.
    checks: HashMap<String, u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Clients {
    pub(super) fn new(max: usize) -> Clients {
        Clients {
            inner: Mutex::new(HashMap::new()),
            next_stream: std::sync::atomic::AtomicU64::new(1),
            max,
        }
    }

    /// Adds a stream of `client`; `None` when `rocketmq_max_clients`
    /// other clients are live.
    fn register(&self, client: &str, add: mpsc::Sender<String>) -> Option<u64> {
        let mut m = lock(&self.inner);
        if !m.contains_key(client) && m.len() >= self.max {
            return None;
        }
        let id = self
            .next_stream
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        m.entry(client.to_owned())
            .or_default()
            .streams
            .push((id, add));
        Some(id)
    }

    fn unregister(&self, client: &str, stream: u64) {
        let mut m = lock(&self.inner);
        if let Some(e) = m.get_mut(client) {
            e.streams.retain(|(id, _)| *id != stream);
            if e.streams.is_empty() {
                m.remove(client);
            }
        }
    }

    /// Asks a live stream of `client` to serve the check-backs of `topic`
    /// (it sent a half there); nothing if it has none.
    pub(super) fn serve_topic(&self, client: &str, topic: &str) {
        let m = lock(&self.inner);
        if let Some((_, add)) = m.get(client).and_then(|e| e.streams.first()) {
            let _ = add.try_send(topic.to_owned());
        }
    }

    fn note_check(&self, client: &str, transaction_id: &str, session: u64) {
        let mut m = lock(&self.inner);
        if let Some(e) = m.get_mut(client) {
            if e.checks.len() < MAX_CHECKS_PER_CLIENT {
                e.checks.insert(transaction_id.to_owned(), session);
            }
        }
    }

    /// The session a check of `transaction_id` went out on to `client`.
    pub(super) fn take_check(&self, client: &str, transaction_id: &str) -> Option<u64> {
        lock(&self.inner)
            .get_mut(client)
            .and_then(|e| e.checks.remove(transaction_id))
    }

    fn forget_sessions(&self, client: &str, sessions: &[u64]) {
        if let Some(e) = lock(&self.inner).get_mut(client) {
            e.checks.retain(|_, s| !sessions.contains(s));
        }
    }
}

/// One Telemetry stream's state.
struct Stream {
    broker: Arc<Broker>,
    clients: Arc<Clients>,
    caller: Caller,
    store_host: String,
    /// Topic -> producer session id.
    sessions: HashMap<String, u64>,
    checks_tx: mpsc::Sender<(u64, CheckRequest)>,
    out: mpsc::Sender<Result<rmq::TelemetryCommand, tonic::Status>>,
}

fn command(c: rmq::telemetry_command::Command) -> rmq::TelemetryCommand {
    rmq::TelemetryCommand {
        status: super::ok(),
        command: Some(c),
    }
}

impl Stream {
    fn allowed(&self, topic: &str) -> bool {
        crate::auth::authorize(
            self.broker.auth_users(),
            self.caller.who.as_ref(),
            Action::Tx,
            &Resource::ProducerGroup(topic),
            "Telemetry",
        )
        .is_ok()
    }

    /// Opens a producer session for `topic`'s halves, if the caller may
    /// answer their checks.
    fn serve(&mut self, topic: &str) {
        if self.sessions.contains_key(topic)
            || self.sessions.len() >= MAX_TOPICS_PER_STREAM
            || crate::core::names::check_topic(topic).is_err()
            || !self.allowed(topic)
        {
            return;
        }
        let opened = self.broker.tx_state().open_session(
            topic.to_owned(),
            vec![topic.to_owned()],
            Some(self.caller.client_id.clone()),
            self.broker.config().max_producer_sessions as usize,
        );
        match opened {
            Ok((sid, mut rx)) => {
                self.sessions.insert(topic.to_owned(), sid);
                let tx = self.checks_tx.clone();
                tokio::spawn(async move {
                    while let Some(c) = rx.recv().await {
                        if tx.send((sid, c)).await.is_err() {
                            break;
                        }
                    }
                });
            }
            Err(e) => {
                tracing::warn!(client = %self.caller.client_id, topic, error = %e, "no producer session for a RocketMQ client");
            }
        }
    }

    fn close(&mut self, topics: &[String]) {
        let mut closed = Vec::new();
        for t in topics {
            if let Some(sid) = self.sessions.remove(t) {
                self.broker.tx_state().close_session(sid);
                closed.push(sid);
            }
        }
        self.clients
            .forget_sessions(&self.caller.client_id, &closed);
    }

    /// The broker's Settings for a client's.
    fn settings_reply(&self, s: &rmq::Settings) -> rmq::Settings {
        use rmq::settings::PubSub;
        let cfg = self.broker.config();
        let mut out = rmq::Settings {
            client_type: s.client_type,
            access_point: s.access_point.clone(),
            request_timeout: s.request_timeout,
            user_agent: s.user_agent.clone(),
            metric: Some(rmq::Metric {
                on: false,
                endpoints: None,
            }),
            ..Default::default()
        };
        match &s.pub_sub {
            Some(PubSub::Publishing(p)) => {
                // A failed send is retried by the client: 3 attempts,
                // 10 ms doubling to 1 s (RocketMQ's producer defaults).
                out.backoff_policy = Some(rmq::RetryPolicy {
                    max_attempts: 3,
                    strategy: Some(rmq::retry_policy::Strategy::ExponentialBackoff(
                        rmq::ExponentialBackoff {
                            initial: Some(duration(10)),
                            max: Some(duration(1000)),
                            multiplier: 2.0,
                        },
                    )),
                });
                out.pub_sub = Some(PubSub::Publishing(rmq::Publishing {
                    topics: p.topics.clone(),
                    max_body_size: i32::try_from(cfg.max_message_bytes).unwrap_or(i32::MAX),
                    validate_message_type: p.validate_message_type,
                }));
            }
            Some(PubSub::Subscription(sub)) => {
                let fifo = sub
                    .group
                    .as_ref()
                    .is_some_and(|g| self.broker.is_fifo_group(&g.name));
                let policy = self.broker.retry_policy();
                let last = policy.delays_ms.len().saturating_sub(1);
                // The delay before retry n (from 1) is level n + 1's, as
                // the core schedules it (core/retry.rs).
                let next = (1..=policy.max_reconsume_times as usize)
                    .filter_map(|n| policy.delays_ms.get((n + 1).min(last)))
                    .map(|ms| duration(*ms))
                    .collect();
                out.backoff_policy = Some(rmq::RetryPolicy {
                    max_attempts: i32::try_from(policy.max_reconsume_times.saturating_add(1))
                        .unwrap_or(i32::MAX),
                    strategy: Some(rmq::retry_policy::Strategy::CustomizedBackoff(
                        rmq::CustomizedBackoff { next },
                    )),
                });
                out.pub_sub = Some(PubSub::Subscription(rmq::Subscription {
                    group: sub.group.clone(),
                    subscriptions: sub.subscriptions.clone(),
                    fifo: Some(fifo),
                    receive_batch_size: Some(
                        i32::try_from(SUGGESTED_BATCH.min(cfg.max_receive_messages)).unwrap_or(1),
                    ),
                    long_polling_timeout: Some(duration(cfg.max_receive_wait_ms)),
                }));
            }
            None => {}
        }
        out
    }

    async fn on_command(&mut self, cmd: rmq::TelemetryCommand) {
        use rmq::settings::PubSub;
        use rmq::telemetry_command::Command;
        // Answers to commands halfmq does not send, and anything else,
        // are ignored.
        let Some(Command::Settings(s)) = cmd.command else {
            return;
        };
        if s.client_type == Some(rmq::ClientType::Producer as i32) {
            if let Some(PubSub::Publishing(p)) = &s.pub_sub {
                for t in &p.topics {
                    if let Ok(name) = name_of(Some(t), "topic") {
                        self.serve(&name);
                    }
                }
            }
        }
        // The Rust 5.0.0 client reads no Settings reply (it logs an error
        // for one); the others wait for it.
        let rust = s
            .user_agent
            .as_ref()
            .is_some_and(|ua| ua.language == rmq::Language::Rust as i32);
        if !rust {
            let reply = command(Command::Settings(self.settings_reply(&s)));
            let _ = self.out.send(Ok(reply)).await;
        }
    }

    async fn on_check(&mut self, sid: u64, c: CheckRequest) -> bool {
        use rmq::telemetry_command::Command;
        let now = self.broker.now_ms();
        self.clients
            .note_check(&self.caller.client_id, &c.transaction_id, sid);
        let message = wire_message(
            c.message,
            None,
            rmq::MessageType::Transaction,
            &self.store_host,
            now,
        );
        let cmd = command(Command::RecoverOrphanedTransactionCommand(
            rmq::RecoverOrphanedTransactionCommand {
                message: Some(message),
                transaction_id: c.transaction_id,
            },
        ));
        self.out.send(Ok(cmd)).await.is_ok()
    }

    /// Closes sessions whose `tx` was revoked; false when this member no
    /// longer serves (a follower now): the stream ends.
    fn recheck(&mut self) -> bool {
        if self.broker.check_serving().is_err() {
            return false;
        }
        if self.broker.auth_users().is_some() {
            let revoked: Vec<String> = self
                .sessions
                .keys()
                .filter(|t| !self.allowed(t))
                .cloned()
                .collect();
            self.close(&revoked);
        }
        true
    }
}

impl RocketMq {
    /// Answers a Telemetry stream at once (the response headers; the Rust
    /// client waits for them with no deadline) and serves it in a task.
    pub(super) fn open_telemetry(
        &self,
        c: Caller,
        mut inbound: tonic::Streaming<rmq::TelemetryCommand>,
    ) -> TelemetryStream {
        let (out, out_rx) = mpsc::channel(16);
        let refusal = if let Some(s) = c.unauthenticated() {
            s
        } else if c.client_id.is_empty() {
            status_of(
                rmq::Code::ClientIdRequired,
                "the x-mq-client-id header is missing",
            )
        } else {
            None
        };
        let (add_tx, mut add_rx) = mpsc::channel::<String>(64);
        let stream_id = if refusal.is_none() {
            match self.clients.register(&c.client_id, add_tx) {
                Some(id) => Some(id),
                None => {
                    let s = status_of(
                        rmq::Code::TooManyRequests,
                        "rocketmq_max_clients clients are connected",
                    );
                    let _ = out.try_send(Ok(rmq::TelemetryCommand {
                        status: s,
                        command: None,
                    }));
                    return Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx));
                }
            }
        } else {
            None
        };
        let Some(stream_id) = stream_id else {
            let _ = out.try_send(Ok(rmq::TelemetryCommand {
                status: refusal,
                command: None,
            }));
            return Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx));
        };
        let (checks_tx, mut checks_rx) = mpsc::channel(64);
        let mut s = Stream {
            broker: Arc::clone(&self.broker),
            clients: Arc::clone(&self.clients),
            caller: c,
            store_host: self.advertised(),
            sessions: HashMap::new(),
            checks_tx,
            out,
        };
        let mut stop = self.broker.shutdown_signal();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    up = inbound.message() => match up {
                        Ok(Some(cmd)) => s.on_command(cmd).await,
                        Ok(None) | Err(_) => break,
                    },
                    Some((sid, c)) = checks_rx.recv() => {
                        if !s.on_check(sid, c).await {
                            break;
                        }
                    }
                    Some(topic) = add_rx.recv() => s.serve(&topic),
                    _ = tick.tick() => {
                        if !s.recheck() {
                            break;
                        }
                    }
                    _ = async { stop.wait_for(|stopping| *stopping).await.map(|_| ()) } => break,
                }
            }
            let topics: Vec<String> = s.sessions.keys().cloned().collect();
            s.close(&topics);
            s.clients.unregister(&s.caller.client_id, stream_id);
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(out_rx))
    }
}
