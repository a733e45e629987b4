//! The broker's core: topics, sends, consumer-group deliveries, progress
//! persistence, stats and background tasks. Domain types only; `service.rs`
//! converts to and from the wire.

use foldhash::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use halfmq_storage::{MessageId, Record, RecordKind, Store};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::config::{BrokerConfig, FlushSetting};
use crate::delivery::{LeaseError, QueueProgress};
use crate::error::BrokerError;
use crate::names::{check_group, check_message_fields, check_topic, TagFilter};
use crate::redelivery::{retry_topic, DlqState, Failure, RETRY_QUEUE_BIT};
use crate::retry::RetryPolicy;
use crate::transactions::{user_properties, TxState};

/// The broker's clock, injected so time-driven logic can be tested.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        halfmq_storage::now_ms()
    }
}

/// How a message picks its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueChoice {
    /// Round robin over the topic's queues.
    RoundRobin,
    /// This queue id.
    Id(u32),
    /// Hash of this key onto the queues (same key, same queue).
    Key(String),
}

/// A message to send, in domain form.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    /// Topic.
    pub topic: String,
    /// Queue choice.
    pub queue: QueueChoice,
    /// Tag; empty for none.
    pub tag: String,
    /// Business keys.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
    /// Delayed delivery: visible this many ms after it is stored; 0 = at
    /// once. Ordinary sends only; at most `max_delay_ms`.
    pub delay_ms: u64,
}

/// Where a sent message went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    /// Broker-assigned message id.
    pub message_id: MessageId,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset; `None` for a delayed message, which gets one when it
    /// becomes due.
    pub queue_offset: Option<u64>,
    /// When a delayed message becomes visible, broker clock, ms since the
    /// epoch; 0 for an ordinary one.
    pub deliver_at_ms: u64,
}

/// Identifies one delivery; encoded as the wire's receipt handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Topic (the consumer's, also for retries).
    pub topic: String,
    /// Queue id (for a retry: the delay level).
    pub queue_id: u32,
    /// Queue offset (for a retry: in the retry level's queue).
    pub queue_offset: u64,
    /// Lease sequence number.
    pub seq: u64,
    /// Whether this delivery came from the group's retry queue of level
    /// `queue_id`.
    pub retry: bool,
}

impl Receipt {
    /// `[R]<queue id>.<queue offset>.<seq>.<topic>` (topics contain no '.';
    /// `R` marks a retry delivery).
    pub fn encode(&self) -> String {
        format!(
            "{}{}.{}.{}.{}",
            if self.retry { "R" } else { "" },
            self.queue_id,
            self.queue_offset,
            self.seq,
            self.topic
        )
    }

    /// Parses [`Receipt::encode`]'s form.
    ///
    /// # Errors
    /// [`BrokerError::InvalidReceiptHandle`].
    pub fn decode(s: &str) -> Result<Receipt, BrokerError> {
        let bad = || BrokerError::InvalidReceiptHandle(s.to_owned());
        let (retry, rest) = match s.strip_prefix('R') {
            Some(r) => (true, r),
            None => (false, s),
        };
        let mut it = rest.splitn(4, '.');
        let queue_id = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let queue_offset = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let seq = it.next().and_then(|v| v.parse().ok()).ok_or_else(bad)?;
        let topic = it
            .next()
            .filter(|t| !t.is_empty())
            .ok_or_else(bad)?
            .to_owned();
        Ok(Receipt {
            topic,
            queue_id,
            queue_offset,
            seq,
            retry,
        })
    }

    fn level(&self) -> Option<u32> {
        self.retry.then_some(self.queue_id)
    }
}

/// A message delivered to a consumer.
#[derive(Debug, Clone)]
pub struct DeliveredMessage {
    /// Message id.
    pub message_id: MessageId,
    /// Topic.
    pub topic: String,
    /// Queue id.
    pub queue_id: u32,
    /// Queue offset.
    pub queue_offset: u64,
    /// Tag.
    pub tag: String,
    /// Keys.
    pub keys: Vec<String>,
    /// User properties.
    pub properties: Vec<(String, String)>,
    /// Body.
    pub body: Bytes,
    /// Failed deliveries to this group before this one.
    pub reconsume_times: u32,
    /// Receipt for ack / nack / change invisible duration.
    pub receipt: Receipt,
    /// Broker clock when stored, ms since the epoch.
    pub store_timestamp_ms: u64,
    /// When it becomes visible again unless acked, ms since the epoch.
    pub invisible_until_ms: u64,
    /// Whether this delivery comes from the group's retry queue (then
    /// `queue_offset` is its position there).
    pub retry: bool,
    /// For a retry: the message's queue offset in `queue_id` of its topic,
    /// when the retry record says (retries scheduled by older brokers do not).
    pub original_queue_offset: Option<u64>,
}

/// A receive request, in domain form.
#[derive(Debug, Clone)]
pub struct ReceiveRequest {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Tag expression (`*`, empty, or `a||b`).
    pub tag_expression: String,
    /// At most this many messages (0 = 1).
    pub max_messages: u32,
    /// Invisible duration, ms (0 = the configured default).
    pub invisible_duration_ms: u64,
    /// Long-poll wait, ms.
    pub wait_ms: u64,
}

/// Counters for `stats`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) messages_in: AtomicU64,
    pub(crate) bytes_in: AtomicU64,
    messages_out: AtomicU64,
    bytes_out: AtomicU64,
    acks: AtomicU64,
    redeliveries: AtomicU64,
    connections: AtomicU64,
    pub(crate) halves_in: AtomicU64,
    pub(crate) transactions_committed: AtomicU64,
    pub(crate) transactions_rolled_back: AtomicU64,
}

/// Per-group figures for `stats`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// Consumer group.
    pub group: String,
    /// Topic.
    pub topic: String,
    /// Messages in flight.
    pub inflight: u64,
    /// Visible messages not yet acked.
    pub lag: u64,
    /// Messages acked (consumer offsets summed plus acked above them).
    pub acked: u64,
}

/// A snapshot of the broker's counters.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Messages stored by sends.
    pub messages_in: u64,
    /// Body bytes stored by sends.
    pub bytes_in: u64,
    /// Messages delivered (redeliveries included).
    pub messages_out: u64,
    /// Body bytes delivered.
    pub bytes_out: u64,
    /// Acks accepted.
    pub acks: u64,
    /// Redeliveries (expired or nacked leases delivered again).
    pub redeliveries: u64,
    /// Per (group, topic).
    pub groups: Vec<GroupStats>,
    /// Bytes in the commit log.
    pub commit_log_bytes: u64,
    /// Since start, ms.
    pub uptime_ms: u64,
    /// Open client connections.
    pub connections: u64,
    /// Open producer sessions (check-back streams).
    pub producer_sessions: u64,
    /// Unresolved half messages (given-up ones included).
    pub pending_halves: u64,
    /// Delayed messages not yet due.
    pub delayed_messages: u64,
    /// Half messages stored since start.
    pub halves_in: u64,
    /// Transactions ended by commit since start (delayed messages not
    /// counted).
    pub transactions_committed: u64,
    /// Transactions ended by rollback since start.
    pub transactions_rolled_back: u64,
    /// fdatasyncs of the commit log since start.
    pub commit_log_fsyncs: u64,
}

/// A topic's configuration and runtime state.
#[derive(Debug)]
pub struct TopicState {
    /// Number of queues.
    pub queues: u32,
    notify: Notify,
    round_robin: AtomicU32,
}

/// A topic for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Queues.
    pub queues: u32,
    /// Visible messages, summed over queues.
    pub messages: u64,
}

/// One consumer group's progress on one topic.
#[derive(Debug, Default)]
pub(crate) struct GroupTopic {
    /// Per queue id of the topic.
    pub(crate) queues: Vec<QueueProgress>,
    /// Per retry delay level (queue id of `%RETRY%<group>%<topic>`).
    pub(crate) retry: Vec<QueueProgress>,
    round_robin: usize,
    /// Changed since the last save.
    pub(crate) dirty: bool,
}

impl GroupTopic {
    /// The progress of a queue (`retry_level` None) or of a retry level.
    pub(crate) fn progress_mut(
        &mut self,
        retry_level: Option<u32>,
        queue_id: u32,
    ) -> Option<&mut QueueProgress> {
        match retry_level {
            Some(l) => self.retry.get_mut(l as usize),
            None => self.queues.get_mut(queue_id as usize),
        }
    }
}

/// (consumer group, topic).
pub(crate) type GroupKey = (String, String);

pub(crate) const TOPICS_SPACE: &str = "topics";
pub(crate) const GROUPS_SPACE: &str = "groups";
/// Keyspace of the broker's own flags.
const BROKER_SPACE: &str = "broker";
/// Present while stopped after a clean shutdown: written last at shutdown,
/// removed (durably) at start-up. Its absence at start-up means the last run
/// ended without one (kill -9, power loss, panic), so acks taken after the
/// last checkpoint may have been lost.
const CLEAN_STOP_KEY: &[u8] = b"clean_stop";

/// The broker.
pub struct Broker {
    cfg: BrokerConfig,
    store: Arc<Store>,
    clock: Arc<dyn Clock>,
    topics: RwLock<HashMap<String, Arc<TopicState>>>,
    groups: Mutex<HashMap<GroupKey, Arc<Mutex<GroupTopic>>>>,
    pub(crate) counters: Counters,
    id_prefix: u64,
    id_counter: AtomicU64,
    started: Instant,
    shutting_down: AtomicBool,
    shutdown_tx: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Held while consumer progress is written to sled and while a topic
    /// deletion forgets its groups.
    pub(crate) progress_lock: Mutex<()>,
    tx: TxState,
    retry: RetryPolicy,
    dlq: DlqState,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("data_dir", &self.cfg.data_dir)
            .finish()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves bookkeeping that is still
    // consistent (every mutation is a few field writes); carry on.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Topics that have consume queues but no entry in the metadata store (lost
/// with a damaged one) are restored, with as many queues as were seen.
fn restore_topics(
    store: &Store,
    topics: &mut HashMap<String, Arc<TopicState>>,
) -> Result<(), BrokerError> {
    let mut seen: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    for (t, q) in store.queues() {
        if !t.starts_with('%') {
            let n = seen.entry(t).or_default();
            *n = (*n).max(q.saturating_add(1));
        }
    }
    for (name, queues) in seen {
        if topics.contains_key(&name) {
            continue;
        }
        tracing::warn!(topic = %name, queues, "topic missing from the metadata store; restored from its consume queues");
        store
            .meta()
            .put(TOPICS_SPACE, name.as_bytes(), &queues.to_le_bytes())?;
        topics.insert(name, Arc::new(TopicState::new(queues)));
    }
    store.meta().flush()?;
    Ok(())
}

impl Broker {
    /// Opens the store (recovering it), loads topics and consumer progress.
    /// Call [`Broker::start_background`] inside a tokio runtime afterwards.
    ///
    /// # Errors
    /// Configuration and storage errors.
    pub fn open(cfg: BrokerConfig, clock: Arc<dyn Clock>) -> Result<Arc<Broker>, BrokerError> {
        cfg.validate()?;
        let store = Arc::new(Store::open(cfg.store_config())?);
        let mut topics = HashMap::default();
        for (k, v) in store.meta().scan_prefix(TOPICS_SPACE, b"")? {
            let (Ok(name), Ok(q)) = (String::from_utf8(k), <[u8; 4]>::try_from(v.as_slice()))
            else {
                tracing::error!("unreadable topic entry in metadata; skipped");
                continue;
            };
            topics.insert(name, Arc::new(TopicState::new(u32::from_le_bytes(q))));
        }
        restore_topics(&store, &mut topics)?;
        let clean_stop = store.meta().get(BROKER_SPACE, CLEAN_STOP_KEY)?.is_some();
        if clean_stop {
            store.meta().remove(BROKER_SPACE, CLEAN_STOP_KEY)?;
            store.meta().flush()?;
        } else if !store.is_new() {
            tracing::info!("the last run did not shut down cleanly: leases restored from the last checkpoint will not count as failed deliveries when they expire");
        }
        let groups = load_groups(&store, clean_stop)?;
        cut_progress_to_queues(&store, &groups);
        let dlq = DlqState::load(&store)?;
        let retry = cfg.retry_policy();
        let tx = TxState::load(
            &store,
            cfg.check_config(),
            cfg.max_pending_halves as usize,
            cfg.max_checks_inflight_per_session as usize,
            cfg.transaction_replay_bytes,
        )?;
        let (shutdown_tx, _) = watch::channel(false);
        let id_prefix = rand::random::<u64>();
        Ok(Arc::new(Broker {
            cfg,
            store,
            clock,
            topics: RwLock::new(topics),
            groups: Mutex::new(groups),
            counters: Counters::default(),
            id_prefix,
            id_counter: AtomicU64::new(0),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            shutdown_tx,
            tasks: Mutex::new(Vec::new()),
            progress_lock: Mutex::new(()),
            tx,
            retry,
            dlq,
        }))
    }

    /// The configuration in force.
    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Waits until the commit log is durable up to `end`, as
    /// [`Store::wait_durable`] does. With sync flush and
    /// `sync_wait_spin_us` > 0 it first polls the flushed offset for up to
    /// that long, yielding to the runtime's other tasks between polls, and
    /// sleeps only if the fdatasync has not completed by then.
    ///
    /// # Errors
    /// [`Store::wait_durable`]'s: a poisoned or closed log.
    pub(crate) async fn wait_durable(&self, end: u64) -> Result<(), BrokerError> {
        let spin_us = self.cfg.sync_wait_spin_us;
        if spin_us > 0 && self.cfg.flush == FlushSetting::Sync {
            let log = self.store.log();
            let until = Instant::now() + Duration::from_micros(spin_us);
            while log.flushed_offset() < end && Instant::now() < until {
                tokio::task::yield_now().await;
            }
        }
        // Covered at once when the spin saw the fdatasync complete; else
        // sleeps until it does. Poisoning is reported either way.
        self.store.wait_durable(end).await?;
        Ok(())
    }

    /// Completes (changes to `true`) when the broker begins shutting down.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// The retry policy in force.
    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    pub(crate) fn dlq_state(&self) -> &DlqState {
        &self.dlq
    }

    /// The transaction state.
    pub fn tx_state(&self) -> &TxState {
        &self.tx
    }

    /// The broker clock, ms since the epoch.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub(crate) fn notify_topic(&self, topic: &str) {
        if let Some(t) = self.topic(topic) {
            t.notify.notify_waiters();
        }
    }

    pub(crate) fn check_running_pub(&self) -> Result<(), BrokerError> {
        self.check_running()
    }

    pub(crate) fn build_records_pub(
        &self,
        msgs: Vec<OutgoingMessage>,
        kind: RecordKind,
    ) -> Result<Vec<Record>, BrokerError> {
        self.build_records(msgs, kind)
    }

    /// Starts the periodic checkpoint and retention tasks and the check driver.
    pub fn start_background(self: &Arc<Self>) {
        // The first save comes one interval after start-up (the state was
        // just loaded); retention runs at once (a restart may find expired
        // segments on a disk that is short of space).
        let checkpoint =
            self.spawn_periodic(self.cfg.checkpoint_interval_ms, false, "checkpoint", |b| {
                b.save_state()
            });
        let retention = self.spawn_periodic(
            self.cfg.retention_check_interval_ms,
            true,
            "retention",
            |b| b.apply_retention().map(|_| ()),
        );
        let mut tasks = lock(&self.tasks);
        tasks.push(checkpoint);
        tasks.push(retention);
        let stop = self.shutdown_tx.subscribe();
        tasks.push(tokio::spawn(crate::transactions::check_driver(
            Arc::clone(self),
            stop,
        )));
    }

    /// Runs blocking `work` every `every_ms` on the blocking pool until
    /// shutdown, the first time at once when `at_start`, else after
    /// `every_ms`; failures are logged and retried at the next tick.
    fn spawn_periodic(
        self: &Arc<Self>,
        every_ms: u64,
        at_start: bool,
        what: &'static str,
        work: fn(&Broker) -> Result<(), BrokerError>,
    ) -> JoinHandle<()> {
        let b = Arc::clone(self);
        let mut stop = self.shutdown_tx.subscribe();
        tokio::spawn(async move {
            let period = Duration::from_millis(every_ms);
            let first =
                tokio::time::Instant::now() + if at_start { Duration::ZERO } else { period };
            let mut tick = tokio::time::interval_at(first, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.changed() => return,
                }
                let b2 = Arc::clone(&b);
                match tokio::task::spawn_blocking(move || work(&b2)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, task = what, "periodic task failed"),
                    Err(e) => tracing::error!(error = %e, task = what, "periodic task panicked"),
                }
            }
        })
    }

    /// Deletes expired segments, never one holding an unresolved half, then
    /// forgets saved resolutions of deleted halves.
    ///
    /// # Errors
    /// Storage errors.
    pub fn apply_retention(&self) -> Result<Vec<u64>, BrokerError> {
        let min_pending = self.tx.min_pending_offset();
        let deleted = self.store.apply_retention(self.clock.now_ms(), &|s| {
            min_pending.is_none_or(|m| s.end <= m)
        })?;
        if !deleted.is_empty() {
            self.tx
                .prune_resolved(&self.store, self.store.log().min_offset())?;
        }
        Ok(deleted)
    }

    /// Saves the store checkpoint and every changed consumer progress.
    ///
    /// # Errors
    /// Storage errors.
    pub fn save_state(&self) -> Result<(), BrokerError> {
        let groups: Vec<(GroupKey, Arc<Mutex<GroupTopic>>)> = lock(&self.groups)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        {
            // Topic deletion holds this while it forgets groups, so no
            // progress of a deleted topic is written back after.
            let _saving = lock(&self.progress_lock);
            for ((group, topic), gt) in groups {
                if self.topic(&topic).is_some() {
                    self.save_group(&group, &topic, &mut lock(&gt))?;
                }
            }
        }
        self.dlq.save(&self.store)?;
        self.tx.save(&self.store, || {
            self.store.checkpoint()?;
            Ok(())
        })
    }

    /// Writes one group's progress on one topic to sled if it changed (no
    /// flush).
    ///
    /// # Errors
    /// Storage errors.
    pub(crate) fn save_group(
        &self,
        group: &str,
        topic: &str,
        g: &mut GroupTopic,
    ) -> Result<(), BrokerError> {
        if !g.dirty {
            return Ok(());
        }
        for (qid, p) in g.queues.iter().enumerate() {
            self.store.meta().put(
                GROUPS_SPACE,
                &group_key(group, topic, qid as u32),
                &encode_progress(p),
            )?;
        }
        for (level, p) in g.retry.iter().enumerate() {
            self.store.meta().put(
                GROUPS_SPACE,
                &group_key(group, topic, RETRY_QUEUE_BIT | level as u32),
                &encode_progress(p),
            )?;
        }
        g.dirty = false;
        Ok(())
    }

    /// The topics map, for changes (topic deletion).
    pub(crate) fn topics_mut(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<TopicState>>> {
        self.topics.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets every group's progress on `topic` (in memory); returns what
    /// was removed.
    pub(crate) fn remove_groups_of(&self, topic: &str) -> Vec<(GroupKey, Arc<Mutex<GroupTopic>>)> {
        let mut groups = lock(&self.groups);
        let keys: Vec<GroupKey> = groups.keys().filter(|(_, t)| t == topic).cloned().collect();
        keys.into_iter()
            .filter_map(|k| groups.remove(&k).map(|v| (k, v)))
            .collect()
    }

    /// Stops background tasks, wakes long polls, saves state, closes the
    /// store (last checkpoint and fdatasync).
    ///
    /// # Errors
    /// Storage errors from the last save.
    pub async fn shutdown(&self) -> Result<(), BrokerError> {
        self.begin_shutdown();
        let tasks: Vec<_> = std::mem::take(&mut *lock(&self.tasks));
        for t in tasks {
            let _ = t.await;
        }
        let saved = self.save_state().and_then(|()| {
            self.store
                .meta()
                .put(BROKER_SPACE, CLEAN_STOP_KEY, b"1")
                .map_err(BrokerError::from)
        });
        let closed = self.store.close().map_err(BrokerError::from);
        saved.and(closed)
    }

    /// Refuses new work from now on and wakes every long poll, so that
    /// in-flight requests drain quickly.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.shutdown_tx.send_replace(true);
        for t in self
            .topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
        {
            t.notify.notify_waiters();
        }
    }

    fn check_running(&self) -> Result<(), BrokerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            Err(BrokerError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Creates a topic with `queues` queues (0 = `default_queues`).
    ///
    /// # Errors
    /// Invalid name, reserved name, exists already, too many queues or topics.
    pub fn create_topic(&self, name: &str, queues: u32) -> Result<Arc<TopicState>, BrokerError> {
        check_topic(name)?;
        self.create_topic_unchecked(name, queues, true)
    }

    fn create_topic_unchecked(
        &self,
        name: &str,
        queues: u32,
        fail_if_exists: bool,
    ) -> Result<Arc<TopicState>, BrokerError> {
        let queues = if queues == 0 {
            self.cfg.default_queues
        } else {
            queues
        };
        if queues > self.cfg.max_queues {
            return Err(BrokerError::BadRequest(format!(
                "{queues} queues exceeds max_queues {}",
                self.cfg.max_queues
            )));
        }
        let mut topics = self.topics.write().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = topics.get(name) {
            return if fail_if_exists {
                Err(BrokerError::TopicExists(name.to_owned()))
            } else {
                Ok(Arc::clone(t))
            };
        }
        if topics.len() >= self.cfg.max_topics as usize {
            return Err(BrokerError::TooManyRequests(format!(
                "max_topics {} reached",
                self.cfg.max_topics
            )));
        }
        self.store
            .meta()
            .put(TOPICS_SPACE, name.as_bytes(), &queues.to_le_bytes())?;
        self.store.meta().flush()?;
        let t = Arc::new(TopicState::new(queues));
        topics.insert(name.to_owned(), Arc::clone(&t));
        tracing::info!(topic = name, queues, "topic created");
        Ok(t)
    }

    /// The topic, if it exists.
    pub fn topic(&self, name: &str) -> Option<Arc<TopicState>> {
        self.topics
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Every topic with its visible message count, by name.
    pub fn list_topics(&self) -> Vec<TopicInfo> {
        let topics = self.topics.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<TopicInfo> = topics
            .iter()
            .map(|(name, t)| TopicInfo {
                name: name.clone(),
                queues: t.queues,
                messages: (0..t.queues)
                    .map(|q| self.store.max_queue_offset(name, q))
                    .sum(),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    fn next_message_id(&self) -> MessageId {
        let n = self.id_counter.fetch_add(1, Ordering::Relaxed);
        let mut id = [0u8; 16];
        id[..8].copy_from_slice(&self.id_prefix.to_be_bytes());
        id[8..].copy_from_slice(&n.to_be_bytes());
        MessageId(id)
    }

    /// Validates a batch and turns it into records (no I/O but topic creation).
    fn build_records(
        &self,
        msgs: Vec<OutgoingMessage>,
        kind: RecordKind,
    ) -> Result<Vec<Record>, BrokerError> {
        if msgs.is_empty() {
            return Err(BrokerError::BadRequest("no messages".into()));
        }
        if msgs.len() > self.cfg.max_batch_messages as usize {
            return Err(BrokerError::BatchTooLarge(format!(
                "{} messages exceeds max_batch_messages {}",
                msgs.len(),
                self.cfg.max_batch_messages
            )));
        }
        let total: u64 = msgs.iter().map(|m| m.body.len() as u64).sum();
        if total > self.cfg.max_batch_bytes {
            return Err(BrokerError::BatchTooLarge(format!(
                "{total} body bytes exceeds max_batch_bytes {}",
                self.cfg.max_batch_bytes
            )));
        }
        let now = self.clock.now_ms();
        let mut records = Vec::with_capacity(msgs.len());
        for m in msgs {
            check_topic(&m.topic)?;
            if m.body.len() as u64 > self.cfg.max_message_bytes {
                return Err(BrokerError::MessageTooLarge {
                    size_bytes: m.body.len() as u64,
                    limit_bytes: self.cfg.max_message_bytes,
                });
            }
            check_message_fields(&m.tag, &m.keys, &m.properties)?;
            let topic = match self.topic(&m.topic) {
                Some(t) => t,
                None if self.cfg.auto_create_topics => {
                    self.create_topic_unchecked(&m.topic, 0, false)?
                }
                None => return Err(BrokerError::TopicNotFound(m.topic)),
            };
            let queue_id = match &m.queue {
                QueueChoice::Id(q) if *q < topic.queues => *q,
                QueueChoice::Id(q) => {
                    return Err(BrokerError::InvalidQueueId {
                        topic: m.topic,
                        queue_id: *q,
                        queues: topic.queues,
                    })
                }
                QueueChoice::Key(k) => {
                    (halfmq_storage::tag_hash(k) % u64::from(topic.queues)) as u32
                }
                QueueChoice::RoundRobin => {
                    topic.round_robin.fetch_add(1, Ordering::Relaxed) % topic.queues
                }
            };
            let mut properties = m.properties;
            let mut kind = kind;
            if m.delay_ms > 0 {
                if kind != RecordKind::Normal {
                    return Err(BrokerError::BadRequest(
                        "delay_ms applies to ordinary sends only".into(),
                    ));
                }
                if m.delay_ms > self.cfg.max_delay_ms {
                    return Err(BrokerError::BadRequest(format!(
                        "delay_ms {} exceeds max_delay_ms {}",
                        m.delay_ms, self.cfg.max_delay_ms
                    )));
                }
                // Stored like a half of the system producer group %DELAY%,
                // committed by the check driver when due (transactions.rs).
                kind = RecordKind::Half;
                properties.push((
                    crate::transactions::PRODUCER_GROUP_PROPERTY.to_owned(),
                    crate::transactions::DELAY_GROUP.to_owned(),
                ));
                properties.push((
                    crate::transactions::DELIVER_AT_PROPERTY.to_owned(),
                    (now + m.delay_ms).to_string(),
                ));
            }
            records.push(Record {
                kind,
                queue_id,
                store_timestamp_ms: now,
                message_id: self.next_message_id(),
                topic: m.topic,
                tag: m.tag,
                keys: m.keys,
                properties,
                body: m.body,
                ..Record::default()
            });
        }
        Ok(records)
    }

    /// Stores a batch of messages, all or nothing, and returns once they are
    /// durable per the flush policy.
    ///
    /// # Errors
    /// Validation errors (nothing stored), storage errors.
    pub async fn send(&self, msgs: Vec<OutgoingMessage>) -> Result<Vec<SendReceipt>, BrokerError> {
        self.check_running()?;
        let records = self.build_records(msgs, RecordKind::Normal)?;
        if records.iter().any(|r| r.kind == RecordKind::Half) {
            return self.send_delayed(records).await;
        }
        let bytes: u64 = records.iter().map(|r| r.body.len() as u64).sum();
        let ids: Vec<(MessageId, u32, String)> = records
            .iter()
            .map(|r| (r.message_id, r.queue_id, r.topic.clone()))
            .collect();
        let receipt = self.store.append(records)?;
        self.wait_durable(receipt.end).await?;
        self.counters
            .messages_in
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.counters.bytes_in.fetch_add(bytes, Ordering::Relaxed);
        let mut out = Vec::with_capacity(ids.len());
        let mut last_topic: Option<&str> = None;
        for (i, (id, qid, topic)) in ids.iter().enumerate() {
            if last_topic != Some(topic.as_str()) {
                if let Some(t) = self.topic(topic) {
                    t.notify.notify_waiters();
                }
                last_topic = Some(topic.as_str());
            }
            out.push(SendReceipt {
                message_id: *id,
                queue_id: *qid,
                queue_offset: Some(receipt.queue_offsets[i].ok_or_else(|| {
                    BrokerError::Internal("a normal message got no queue offset".into())
                })?),
                deliver_at_ms: 0,
            });
        }
        Ok(out)
    }

    pub(crate) fn group_topic(
        &self,
        group: &str,
        topic: &str,
        queues: u32,
    ) -> Arc<Mutex<GroupTopic>> {
        let mut groups = lock(&self.groups);
        let gt = groups
            .entry((group.to_owned(), topic.to_owned()))
            .or_insert_with(|| Arc::new(Mutex::new(GroupTopic::default())));
        let gt = Arc::clone(gt);
        drop(groups);
        {
            let mut g = lock(&gt);
            // A new group starts at the earliest retained message of each queue.
            while g.queues.len() < queues as usize {
                let qid = g.queues.len() as u32;
                let start = self.store.queue(topic, qid).map_or(0, |q| q.min_offset());
                g.queues.push(QueueProgress::starting_at(start));
                g.dirty = true;
            }
            let rt = retry_topic(group, topic);
            while g.retry.len() < self.retry.delays_ms.len() {
                let level = g.retry.len() as u32;
                let start = self.store.queue(&rt, level).map_or(0, |q| q.min_offset());
                g.retry.push(QueueProgress::starting_at(start));
                g.dirty = true;
            }
        }
        gt
    }

    /// Receives up to `max_messages` messages for a consumer group, waiting up
    /// to `wait_ms` (capped by `max_receive_wait_ms`) when none is ready.
    ///
    /// # Errors
    /// Invalid names or expression, unknown topic, shutting down.
    pub async fn receive(&self, req: ReceiveRequest) -> Result<Vec<DeliveredMessage>, BrokerError> {
        self.check_running()?;
        check_group(&req.group)?;
        check_topic(&req.topic)?;
        let filter = TagFilter::parse(&req.tag_expression)?;
        let topic = self
            .topic(&req.topic)
            .ok_or_else(|| BrokerError::TopicNotFound(req.topic.clone()))?;
        let invisible_ms = match req.invisible_duration_ms {
            0 => self.cfg.default_invisible_duration_ms,
            d => self.check_invisible(d)?,
        };
        let max = req.max_messages.clamp(1, self.cfg.max_receive_messages) as usize;
        let wait = Duration::from_millis(req.wait_ms.min(self.cfg.max_receive_wait_ms));
        let deadline = tokio::time::Instant::now() + wait;
        let gt = self.group_topic(&req.group, &req.topic, topic.queues);
        loop {
            let notified = topic.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.hand_off_expired(&req.group, &req.topic, &gt).await?;
            let (msgs, next_deadline_ms) =
                self.try_receive(&req, &topic, &gt, &filter, invisible_ms, max)?;
            if !msgs.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(msgs);
            }
            self.check_running()?;
            let mut wake = deadline;
            if let Some(d) = next_deadline_ms {
                let in_ms = d.saturating_sub(self.clock.now_ms());
                wake = wake.min(tokio::time::Instant::now() + Duration::from_millis(in_ms));
            }
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Hands expired leases (main queues and retry levels) to the retry
    /// machinery: each failure schedules a retry or goes to the DLQ.
    async fn hand_off_expired(
        &self,
        group: &str,
        topic: &str,
        gt: &Mutex<GroupTopic>,
    ) -> Result<(), BrokerError> {
        let now = self.clock.now_ms();
        let failures: Vec<Failure> = {
            let mut g = lock(gt);
            let mut v = Vec::new();
            for (qid, p) in g.queues.iter_mut().enumerate() {
                for (qo, lease) in p.take_expired(now, 256) {
                    v.push(expired(None, qid as u32, qo, lease));
                }
            }
            for (level, p) in g.retry.iter_mut().enumerate() {
                for (qo, lease) in p.take_expired(now, 256) {
                    v.push(expired(Some(level as u32), level as u32, qo, lease));
                }
            }
            v
        };
        self.hand_off_failures(group, topic, gt, failures).await
    }

    /// One pass: due retries first, then the topic's queues. Returns the
    /// messages and when to look again (earliest lease deadline or retry due
    /// time), for the long poll.
    fn try_receive(
        &self,
        req: &ReceiveRequest,
        _topic: &TopicState,
        gt: &Mutex<GroupTopic>,
        filter: &TagFilter,
        invisible_ms: u64,
        max: usize,
    ) -> Result<(Vec<DeliveredMessage>, Option<u64>), BrokerError> {
        let mut out = Vec::new();
        let inflight_max = self.cfg.max_inflight_per_queue as usize;
        let window = self.cfg.max_unacked_window;
        let rt = retry_topic(&req.group, &req.topic);
        let mut next_look: Option<u64> = None;
        // Bounded: each round either delivers, skips (filtered/unreadable) or stops.
        for _round in 0..64 {
            let now = self.clock.now_ms();
            // (retry level or None, queue id, delivery, the Redelivery record for retries)
            let mut picked: Vec<(Option<u32>, u32, crate::delivery::Delivery, Option<Record>)> =
                Vec::new();
            {
                let mut g = lock(gt);
                for level in 0..g.retry.len() {
                    let l = level as u32;
                    let max_visible = self.store.max_queue_offset(&rt, l);
                    let min = self.store.queue(&rt, l).map_or(0, |q| q.min_offset());
                    let p = &mut g.retry[level];
                    p.skip_to(min);
                    // Offsets to deliver again in place (a crash-restored
                    // lease expired) were due already.
                    while out.len() + picked.len() < max {
                        let Some(d) = p.next_redelivery(now, invisible_ms, inflight_max) else {
                            break;
                        };
                        let head = self.store.read_queue(&rt, l, d.queue_offset);
                        picked.push((Some(l), l, d, head.ok().map(|m| m.record)));
                    }
                    while out.len() + picked.len() < max && p.next_offset() < max_visible {
                        let qo = p.next_offset();
                        let head = self.store.read_queue(&rt, l, qo).map(|m| m.record);
                        if let Ok(r) = &head {
                            let due = crate::redelivery::deliver_at_ms(r);
                            if due > now {
                                next_look = Some(next_look.map_or(due, |n| n.min(due)));
                                break;
                            }
                        }
                        match p.next_delivery(now, invisible_ms, qo + 1, inflight_max, window) {
                            Some(d) => picked.push((Some(l), l, d, head.ok())),
                            None => break,
                        }
                    }
                }
                let n = g.queues.len();
                let start = g.round_robin;
                g.round_robin = (start + 1) % n.max(1);
                for i in 0..n {
                    let qid = (start + i) % n;
                    let max_visible = self.store.max_queue_offset(&req.topic, qid as u32);
                    let min = self
                        .store
                        .queue(&req.topic, qid as u32)
                        .map_or(0, |q| q.min_offset());
                    let p = &mut g.queues[qid];
                    p.skip_to(min);
                    while out.len() + picked.len() < max {
                        let next =
                            p.next_redelivery(now, invisible_ms, inflight_max)
                                .or_else(|| {
                                    p.next_delivery(
                                        now,
                                        invisible_ms,
                                        max_visible,
                                        inflight_max,
                                        window,
                                    )
                                });
                        match next {
                            Some(d) => picked.push((None, qid as u32, d, None)),
                            None => break,
                        }
                    }
                }
                if !picked.is_empty() {
                    g.dirty = true;
                }
            }
            if picked.is_empty() {
                let g = lock(gt);
                let lease_min = g
                    .queues
                    .iter()
                    .chain(g.retry.iter())
                    .filter_map(QueueProgress::next_deadline_ms)
                    .min();
                let look = match (lease_min, next_look) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                return Ok((out, look));
            }
            let mut skipped = Vec::new();
            for (level, qid, d, redelivery) in picked {
                let read = match (&level, redelivery) {
                    (None, _) => self
                        .store
                        .read_queue(&req.topic, qid, d.queue_offset)
                        .map(|m| (m.record, d.lease.reconsume_times, None)),
                    (Some(_), Some(r)) => self
                        .store
                        .log()
                        .read_sized(r.ref_offset.unwrap_or(u64::MAX), r.ref_size)
                        .map(|orig| {
                            (
                                orig,
                                r.reconsume_times,
                                crate::redelivery::origin(&r).map(|(_, o)| o),
                            )
                        }),
                    (Some(_), None) => Err(halfmq_storage::Error::InvalidRecord(
                        "unreadable retry entry".into(),
                    )),
                };
                match read {
                    Ok((r, reconsume_times, original_queue_offset)) if filter.matches(&r.tag) => {
                        if reconsume_times > 0 || d.again {
                            self.counters.redeliveries.fetch_add(1, Ordering::Relaxed);
                        }
                        self.counters.messages_out.fetch_add(1, Ordering::Relaxed);
                        self.counters
                            .bytes_out
                            .fetch_add(r.body.len() as u64, Ordering::Relaxed);
                        // A retry keeps the lease's own reconsume count.
                        if let Some(l) = level {
                            let mut g = lock(gt);
                            if let Some(p) = g.retry.get_mut(l as usize) {
                                p.set_reconsume_times(d.queue_offset, reconsume_times);
                            }
                        }
                        out.push(DeliveredMessage {
                            message_id: r.message_id,
                            topic: req.topic.clone(),
                            queue_id: if level.is_some() { r.queue_id } else { qid },
                            queue_offset: d.queue_offset,
                            tag: r.tag,
                            keys: r.keys,
                            properties: user_properties(r.properties),
                            body: r.body,
                            reconsume_times,
                            receipt: Receipt {
                                topic: req.topic.clone(),
                                queue_id: qid,
                                queue_offset: d.queue_offset,
                                seq: d.lease.seq,
                                retry: level.is_some(),
                            },
                            store_timestamp_ms: r.store_timestamp_ms,
                            invisible_until_ms: d.lease.invisible_until_ms,
                            retry: level.is_some(),
                            original_queue_offset,
                        });
                    }
                    Ok(_) => skipped.push((level, qid, d.queue_offset)),
                    Err(e) => {
                        tracing::error!(
                            topic = %req.topic, queue_id = qid, retry_level = ?level, queue_offset = d.queue_offset, error = %e,
                            "unreadable message skipped for this group"
                        );
                        skipped.push((level, qid, d.queue_offset));
                    }
                }
            }
            if !skipped.is_empty() {
                let mut g = lock(gt);
                for (level, qid, qo) in skipped {
                    if let Some(p) = g.progress_mut(level, qid) {
                        p.skip(qo);
                    }
                }
            }
            if out.len() >= max {
                break;
            }
        }
        Ok((out, None))
    }

    /// An invisible duration a consumer asked for, if within
    /// `max_invisible_duration_ms`.
    fn check_invisible(&self, ms: u64) -> Result<u64, BrokerError> {
        if ms > self.cfg.max_invisible_duration_ms {
            return Err(BrokerError::BadRequest(format!(
                "invisible duration {ms} ms exceeds max_invisible_duration_ms {}",
                self.cfg.max_invisible_duration_ms
            )));
        }
        Ok(ms)
    }

    fn with_lease<T>(
        &self,
        group: &str,
        receipt: &Receipt,
        f: impl FnOnce(&mut QueueProgress) -> Result<T, LeaseError>,
    ) -> Result<T, BrokerError> {
        check_group(group)?;
        let gt = self.existing_group_topic(group, &receipt.topic)?;
        let mut g = lock(&gt);
        let p = g
            .progress_mut(receipt.level(), receipt.queue_id)
            .ok_or(BrokerError::ReceiptNotFound)?;
        let r = f(p).map_err(|LeaseError::NotFound| BrokerError::ReceiptNotFound)?;
        g.dirty = true;
        Ok(r)
    }

    fn existing_group_topic(
        &self,
        group: &str,
        topic: &str,
    ) -> Result<Arc<Mutex<GroupTopic>>, BrokerError> {
        lock(&self.groups)
            .get(&(group.to_owned(), topic.to_owned()))
            .cloned()
            .ok_or(BrokerError::ReceiptNotFound)
    }

    /// Acks one delivery.
    ///
    /// # Errors
    /// [`BrokerError::ReceiptNotFound`] for a stale receipt.
    pub fn ack(&self, group: &str, receipt: &Receipt) -> Result<(), BrokerError> {
        self.with_lease(group, receipt, |p| p.ack(receipt.queue_offset, receipt.seq))?;
        self.counters.acks.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Fails a delivery: schedules its retry (reconsume times + 1) after the
    /// delay level its reconsume times choose, or after `delay_ms` rounded up
    /// to a level; or moves it to the DLQ when the retries are used up.
    /// Returns once the retry is durable.
    ///
    /// # Errors
    /// [`BrokerError::ReceiptNotFound`] for a stale receipt; storage errors
    /// (the delivery stays leased then).
    pub async fn nack(
        &self,
        group: &str,
        receipt: &Receipt,
        reason: &str,
        delay_ms: Option<u64>,
    ) -> Result<(), BrokerError> {
        let lease = self.with_lease(group, receipt, |p| {
            p.release(receipt.queue_offset, receipt.seq)
        })?;
        let gt = self.existing_group_topic(group, &receipt.topic)?;
        let failure = Failure {
            retry_level: receipt.level(),
            queue_id: receipt.queue_id,
            queue_offset: receipt.queue_offset,
            lease,
            reason: reason.to_owned(),
            custom_delay_ms: delay_ms,
        };
        self.hand_off_failures(group, &receipt.topic, &gt, vec![failure])
            .await?;
        self.notify_topic(&receipt.topic);
        Ok(())
    }

    /// Changes the invisible duration of a delivery; returns the new receipt
    /// and deadline.
    ///
    /// # Errors
    /// [`BrokerError::ReceiptNotFound`] for a stale receipt.
    pub fn change_invisible_duration(
        &self,
        group: &str,
        receipt: &Receipt,
        invisible_ms: u64,
    ) -> Result<(Receipt, u64), BrokerError> {
        let now = self.clock.now_ms();
        let d = self.check_invisible(invisible_ms)?;
        let lease = self.with_lease(group, receipt, |p| {
            p.change_invisible(receipt.queue_offset, receipt.seq, now, d)
        })?;
        Ok((
            Receipt {
                seq: lease.seq,
                ..receipt.clone()
            },
            lease.invisible_until_ms,
        ))
    }

    /// Counters and per-group figures.
    pub fn stats(&self) -> Stats {
        let c = &self.counters;
        let groups: Vec<(GroupKey, Arc<Mutex<GroupTopic>>)> = lock(&self.groups)
            .iter()
            .map(|(k, v)| (k.clone(), Arc::clone(v)))
            .collect();
        let mut gs: Vec<GroupStats> = groups
            .into_iter()
            .map(|((group, topic), gt)| {
                let g = lock(&gt);
                let mut s = GroupStats {
                    group,
                    topic: topic.clone(),
                    inflight: 0,
                    lag: 0,
                    acked: 0,
                };
                for (qid, p) in g.queues.iter().enumerate() {
                    let max = self.store.max_queue_offset(&topic, qid as u32);
                    s.inflight += p.inflight() as u64;
                    let acked = p.ack_offset() + p.acked_count() as u64;
                    s.acked += acked;
                    s.lag += max.saturating_sub(acked);
                }
                s
            })
            .collect();
        gs.sort_by(|a, b| (&a.group, &a.topic).cmp(&(&b.group, &b.topic)));
        let log_bytes = self.store.log().written_offset() - self.store.log().min_offset();
        let (halves, delayed) = self.tx_state().pending_counts();
        Stats {
            messages_in: c.messages_in.load(Ordering::Relaxed),
            bytes_in: c.bytes_in.load(Ordering::Relaxed),
            messages_out: c.messages_out.load(Ordering::Relaxed),
            bytes_out: c.bytes_out.load(Ordering::Relaxed),
            acks: c.acks.load(Ordering::Relaxed),
            redeliveries: c.redeliveries.load(Ordering::Relaxed),
            groups: gs,
            commit_log_bytes: log_bytes,
            uptime_ms: self.started.elapsed().as_millis() as u64,
            connections: c.connections.load(Ordering::Relaxed),
            producer_sessions: self.tx_state().session_count() as u64,
            pending_halves: halves as u64,
            delayed_messages: delayed as u64,
            halves_in: c.halves_in.load(Ordering::Relaxed),
            transactions_committed: c.transactions_committed.load(Ordering::Relaxed),
            transactions_rolled_back: c.transactions_rolled_back.load(Ordering::Relaxed),
            commit_log_fsyncs: self.store.log().fsync_count(),
        }
    }

    /// A client connection was accepted (`open`) or closed; for `stats`.
    pub(crate) fn count_connection(&self, open: bool) {
        if open {
            self.counters.connections.fetch_add(1, Ordering::Relaxed);
        } else {
            self.counters.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl TopicState {
    /// Wakes every long poll waiting on the topic.
    pub(crate) fn wake_all(&self) {
        self.notify.notify_waiters();
    }

    fn new(queues: u32) -> Self {
        TopicState {
            queues,
            notify: Notify::new(),
            round_robin: AtomicU32::new(0),
        }
    }
}

fn group_key(group: &str, topic: &str, queue_id: u32) -> Vec<u8> {
    halfmq_storage::meta::queue_key(group, topic, queue_id)
}

fn expired(
    retry_level: Option<u32>,
    queue_id: u32,
    queue_offset: u64,
    lease: crate::delivery::Lease,
) -> Failure {
    Failure {
        retry_level,
        queue_id,
        queue_offset,
        lease,
        reason: "invisible duration expired without an ack".to_owned(),
        custom_delay_ms: None,
    }
}

/// Snapshot of one queue's progress (little-endian):
/// `ack_offset u64 | acked_count u32 | acked u64* | lease_count u32 |
///  (queue_offset u64, invisible_until_ms u64, reconsume_times u32,
///  delivered_ms u64)*`, then (since session 6; older snapshots end here)
/// `last_seq u64 | (seq u64, flags u8)*` for the same leases in the same
/// order (flags bit 0: restored after a crash) `| redeliver_count u32 |
/// (queue_offset u64, reconsume_times u32, delivered_ms u64)*`.
pub(crate) fn encode_progress(p: &QueueProgress) -> Vec<u8> {
    let acked: Vec<u64> = p.acked().collect();
    let leases: Vec<_> = p.leases().collect();
    let again: Vec<_> = p.redeliveries().collect();
    let mut v = Vec::with_capacity(32 + acked.len() * 8 + leases.len() * 37 + again.len() * 20);
    v.extend_from_slice(&p.ack_offset().to_le_bytes());
    v.extend_from_slice(&(acked.len() as u32).to_le_bytes());
    for a in acked {
        v.extend_from_slice(&a.to_le_bytes());
    }
    v.extend_from_slice(&(leases.len() as u32).to_le_bytes());
    for (qo, l) in &leases {
        v.extend_from_slice(&qo.to_le_bytes());
        v.extend_from_slice(&l.invisible_until_ms.to_le_bytes());
        v.extend_from_slice(&l.reconsume_times.to_le_bytes());
        v.extend_from_slice(&l.delivered_ms.to_le_bytes());
    }
    v.extend_from_slice(&p.last_seq().to_le_bytes());
    for (_, l) in &leases {
        v.extend_from_slice(&l.seq.to_le_bytes());
        v.push(u8::from(l.restored_after_crash));
    }
    v.extend_from_slice(&(again.len() as u32).to_le_bytes());
    for (qo, l) in again {
        v.extend_from_slice(&qo.to_le_bytes());
        v.extend_from_slice(&l.reconsume_times.to_le_bytes());
        v.extend_from_slice(&l.delivered_ms.to_le_bytes());
    }
    v
}

pub(crate) fn decode_progress(b: &[u8]) -> Option<QueueProgress> {
    let mut rest = b;
    let mut take = |n: usize| -> Option<&[u8]> {
        if rest.len() < n {
            return None;
        }
        let (head, tail) = rest.split_at(n);
        rest = tail;
        Some(head)
    };
    let u64_ = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
    let u32_ = |s: &[u8]| u32::from_le_bytes(s.try_into().unwrap_or([0; 4]));
    let mut q = QueueProgress::starting_at(u64_(take(8)?));
    let n = u32_(take(4)?);
    let mut acked = Vec::new();
    for _ in 0..n {
        acked.push(u64_(take(8)?));
    }
    let n = u32_(take(4)?);
    let mut leases = Vec::new();
    for _ in 0..n {
        let qo = u64_(take(8)?);
        let until = u64_(take(8)?);
        let rt = u32_(take(4)?);
        let delivered_ms = u64_(take(8)?);
        leases.push((
            qo,
            crate::delivery::Lease {
                invisible_until_ms: until,
                reconsume_times: rt,
                seq: 0,
                delivered_ms,
                restored_after_crash: false,
            },
        ));
    }
    let mut again = Vec::new();
    // The older layout ends after the leases.
    let last_seq = take(8);
    if last_seq.is_none() {
        if take(1).is_some() {
            return None; // a torn trailer
        }
        // An older snapshot: no sequence numbers. Start past any handle an
        // older broker may have given out.
        q.restore_last_seq(crate::delivery::SEQ_GAP_AFTER_CRASH);
    } else {
        q.restore_last_seq(u64_(last_seq?));
        for (_, l) in &mut leases {
            l.seq = u64_(take(8)?);
            l.restored_after_crash = take(1)?[0] & 1 != 0;
        }
        let n = u32_(take(4)?);
        for _ in 0..n {
            let qo = u64_(take(8)?);
            let rt = u32_(take(4)?);
            let delivered_ms = u64_(take(8)?);
            again.push((
                qo,
                crate::delivery::Again {
                    reconsume_times: rt,
                    delivered_ms,
                },
            ));
        }
        if take(1).is_some() {
            return None; // trailing bytes: not a snapshot this broker wrote
        }
    }
    for (qo, l) in leases {
        q.restore_lease(qo, l);
    }
    for (qo, l) in again {
        q.restore_redeliver(qo, l);
    }
    for a in acked {
        q.restore_acked(a);
    }
    Some(q)
}

/// Consumer progress saved ahead of what recovery kept (the log's tail was
/// lost, so its queues are shorter) is cut back to the queues: new messages
/// take those queue offsets again and must not be taken for acked ones.
fn cut_progress_to_queues(store: &Store, groups: &HashMap<GroupKey, Arc<Mutex<GroupTopic>>>) {
    let len = |topic: &str, qid: usize| {
        store
            .queue(topic, qid as u32)
            .map_or(0, |q| q.next_offset())
    };
    for ((group, topic), gt) in groups {
        let mut g = lock(gt);
        let rt = retry_topic(group, topic);
        let mut cut = false;
        for (qid, p) in g.queues.iter_mut().enumerate() {
            cut |= p.truncate_to(len(topic, qid));
        }
        for (level, p) in g.retry.iter_mut().enumerate() {
            cut |= p.truncate_to(len(&rt, level));
        }
        if cut {
            tracing::error!(group, topic, "consumer progress was ahead of the recovered consume queues (the commit log lost its tail); cut back: messages there will be delivered again");
            g.dirty = true;
        }
    }
}

/// Consumer progress as last saved. After an unclean stop (`clean_stop`
/// false) every restored lease is flagged: see
/// [`QueueProgress::after_unclean_stop`].
fn load_groups(
    store: &Store,
    clean_stop: bool,
) -> Result<HashMap<GroupKey, Arc<Mutex<GroupTopic>>>, BrokerError> {
    let mut map: HashMap<GroupKey, GroupTopic> = HashMap::default();
    for (k, v) in store.meta().scan_prefix(GROUPS_SPACE, b"")? {
        let parts: Vec<&[u8]> = k.splitn(3, |b| *b == 0).collect();
        let (Some(g), Some(t), Some(q)) = (parts.first(), parts.get(1), parts.get(2)) else {
            continue;
        };
        let (Ok(g), Ok(t), Ok(q)) = (
            std::str::from_utf8(g),
            std::str::from_utf8(t),
            <[u8; 4]>::try_from(*q).map(u32::from_be_bytes),
        ) else {
            continue;
        };
        let Some(mut progress) = decode_progress(&v) else {
            tracing::error!(
                group = g,
                topic = t,
                queue_id = q,
                "unreadable consumer progress; starting over"
            );
            continue;
        };
        if !clean_stop {
            progress.after_unclean_stop();
        }
        let gt = map.entry((g.to_owned(), t.to_owned())).or_default();
        let (list, idx) = if q & RETRY_QUEUE_BIT != 0 {
            (&mut gt.retry, (q & !RETRY_QUEUE_BIT) as usize)
        } else {
            (&mut gt.queues, q as usize)
        };
        while list.len() <= idx {
            list.push(QueueProgress::starting_at(0));
        }
        list[idx] = progress;
    }
    Ok(map
        .into_iter()
        .map(|(k, v)| (k, Arc::new(Mutex::new(v))))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_round_trip() {
        let r = Receipt {
            topic: "a-b_c".into(),
            queue_id: 3,
            queue_offset: 99,
            seq: 7,
            retry: false,
        };
        assert_eq!(Receipt::decode(&r.encode()).unwrap(), r);
        let rr = Receipt {
            retry: true,
            ..r.clone()
        };
        assert!(rr.encode().starts_with('R'));
        assert_eq!(Receipt::decode(&rr.encode()).unwrap(), rr);
        assert!(Receipt::decode("x.1.2.t").is_err());
        assert!(Receipt::decode("1.2.3.").is_err());
    }

    #[test]
    fn progress_snapshot_round_trip() {
        let mut p = QueueProgress::starting_at(10);
        let a = p.next_delivery(0, 100, 20, 100, 100).unwrap();
        let b = p.next_delivery(0, 100, 20, 100, 100).unwrap();
        p.ack(b.queue_offset, b.lease.seq).unwrap();
        let q = decode_progress(&encode_progress(&p)).unwrap();
        assert_eq!(q.ack_offset(), 10);
        assert_eq!(q.inflight(), 1);
        assert_eq!(q.acked().collect::<Vec<_>>(), vec![11]);
        assert_eq!(q.leases().next().unwrap().0, a.queue_offset);
        assert!(decode_progress(&[1, 2, 3]).is_none());
    }

    #[test]
    fn progress_snapshot_keeps_seqs_crash_flags_and_queued_redeliveries() {
        let mut p = QueueProgress::starting_at(0);
        let a = p.next_delivery(0, 100, 20, 100, 100).unwrap();
        let b = p.next_delivery(0, 100, 20, 100, 100).unwrap();
        let c = p.next_delivery(0, 300, 20, 100, 100).unwrap();
        // Round trip through an unclean stop: every lease is flagged, and
        // one expires into the redelivery queue.
        let mut q = decode_progress(&encode_progress(&p)).unwrap();
        q.after_unclean_stop();
        assert!(q.take_expired(100, 10).is_empty());
        assert_eq!(q.redeliver_count(), 2);
        let q2 = decode_progress(&encode_progress(&q)).unwrap();
        assert_eq!(q2, q, "seqs, flags, queue and counter all survive");
        assert_eq!(
            q2.leases().collect::<Vec<_>>(),
            vec![(
                c.queue_offset,
                crate::delivery::Lease {
                    restored_after_crash: true,
                    ..c.lease
                }
            )]
        );
        assert_eq!(
            q2.redeliveries().map(|(o, _)| o).collect::<Vec<_>>(),
            vec![a.queue_offset, b.queue_offset]
        );
        // Torn or extended snapshots are refused, not half read.
        let full = encode_progress(&q);
        assert!(decode_progress(&full[..full.len() - 1]).is_none());
        let mut longer = full.clone();
        longer.push(0);
        assert!(decode_progress(&longer).is_none());
    }

    #[test]
    fn older_progress_snapshots_still_load() {
        // The layout before sequence numbers were saved: one lease at 3.
        let mut v = Vec::new();
        v.extend_from_slice(&2u64.to_le_bytes()); // ack_offset
        v.extend_from_slice(&1u32.to_le_bytes()); // acked count
        v.extend_from_slice(&4u64.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes()); // lease count
        v.extend_from_slice(&3u64.to_le_bytes());
        v.extend_from_slice(&900u64.to_le_bytes());
        v.extend_from_slice(&1u32.to_le_bytes());
        v.extend_from_slice(&800u64.to_le_bytes());
        let q = decode_progress(&v).unwrap();
        assert_eq!(
            (q.ack_offset(), q.next_offset(), q.acked_count()),
            (2, 5, 1)
        );
        let (qo, l) = q.leases().next().unwrap();
        assert_eq!((qo, l.invisible_until_ms, l.reconsume_times), (3, 900, 1));
        assert!(
            l.seq > crate::delivery::SEQ_GAP_AFTER_CRASH,
            "past any handle an older broker gave out"
        );
        assert!(decode_progress(&v[..v.len() - 1]).is_none());
    }
}
