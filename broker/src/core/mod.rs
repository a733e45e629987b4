//! The broker's core: topics, sends, consumer-group deliveries, transactions,
//! retries and DLQs, consumer progress and stats. Domain types only, no
//! protobuf and no sockets: the API edges (`crate::api`) convert to and from
//! the wire, `crate::server` owns the listener and `crate::services` the
//! background tasks.
//!
//! # Layout
//! - [`types`]: what is sent and delivered, receipt handles.
//! - [`names`]: name rules, tag expressions, fixed field limits; [`props`]: system properties.
//! - [`topics`], [`send`], [`receive`]: topics, sends, deliveries (ack, nack, invisible durations).
//! - [`delivery`] (pure): one group's leases on one queue.
//! - [`progress`]: consumer progress, its snapshots in sled.
//! - [`retry`] (pure) and [`redelivery`]: retry levels, the hand-off of failed deliveries, DLQs.
//! - [`txcheck`] (pure) and [`transactions`]: half messages, EndTransaction, producer sessions, transaction state.
//! - [`admin`]: offset reset, topic deletion.
//! - [`stats`]: the counters of `stats`.
//!
//! The pure state machines (`delivery`, `retry`, `txcheck`) take `now` as an
//! argument and depend on nothing else of the crate.

pub mod admin;
pub mod check_counts;
pub mod dedup;
pub mod delivery;
pub mod dlq;
pub mod fifo;
pub mod group_admin;
pub mod groups;
pub mod handoff;
pub mod idempotence;
pub mod names;
pub mod progress;
pub mod props;
pub mod receive;
pub mod redelivery;
pub mod replicated;
pub mod retry;
pub mod secret;
pub mod security;
pub mod send;
pub mod stats;
pub mod topics;
pub mod transactions;
pub mod txcheck;
pub mod types;

use foldhash::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use halfmq_storage::Store;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{BrokerConfig, FlushSetting};
use crate::error::BrokerError;
use dlq::DlqState;
use progress::{GroupKey, GroupTopic};
use retry::RetryPolicy;
use stats::Counters;
use topics::{restore_topics, TopicState, TOPICS_SPACE};
use transactions::TxState;

pub use stats::{GroupStats, QueueStats, Stats};
pub use topics::TopicInfo;
pub use types::{
    DeliveredMessage, OutgoingMessage, QueueChoice, Receipt, ReceiveRequest, SendReceipt,
};

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

/// Keyspace of the broker's own flags.
pub(crate) const BROKER_SPACE: &str = "broker";
/// Present while stopped after a clean shutdown: written last at shutdown,
/// removed (durably) at start-up. Its absence at start-up means the last run
/// ended without one (kill -9, power loss, panic), so acks taken after the
/// last checkpoint may have been lost.
const CLEAN_STOP_KEY: &[u8] = b"clean_stop";

/// The broker.
pub struct Broker {
    pub(crate) cfg: BrokerConfig,
    pub(crate) store: Arc<Store>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) topics: RwLock<HashMap<String, Arc<TopicState>>>,
    pub(crate) groups: Mutex<HashMap<GroupKey, Arc<Mutex<GroupTopic>>>>,
    /// Declared consumer groups: name -> FIFO (`groups.rs`).
    pub(crate) consumer_groups: Mutex<HashMap<String, bool>>,
    pub(crate) counters: Counters,
    pub(crate) id_prefix: u64,
    pub(crate) id_counter: AtomicU64,
    pub(crate) started: Instant,
    pub(crate) shutting_down: AtomicBool,
    pub(crate) shutdown_tx: watch::Sender<bool>,
    pub(crate) tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Held while consumer progress is written to sled and while a topic
    /// deletion forgets its groups.
    pub(crate) progress_lock: Mutex<()>,
    /// Receives waiting for messages now (see `max_long_polls`).
    pub(crate) long_polls: std::sync::atomic::AtomicUsize,
    /// MACs receipt handles and transaction ids (`broker.secret`).
    pub(crate) secret: secret::Secret,
    /// Idempotency keys of the last `dedup_window_ms`.
    pub(crate) dedup: Mutex<dedup::DedupIndex>,
    /// Woken when a claimed idempotency key is stored or released.
    pub(crate) dedup_done: tokio::sync::Notify,
    pub(crate) tx: TxState,
    pub(crate) retry: RetryPolicy,
    pub(crate) dlq: DlqState,
    /// A broker group member's replication (set once at start-up).
    pub(crate) replication: std::sync::OnceLock<replicated::Replication>,
    /// A broker group leader's consumer-progress snapshots (sled key,
    /// value) saved since its last progress record.
    pub(crate) progress_outbox: Mutex<Vec<progress::OutboxPair>>,
    /// A follower's hand-off done marks not yet covered by a progress
    /// record (`core/handoff.rs`).
    pub(crate) handoff_marks: Mutex<handoff::HandoffMarks>,
    /// The term whose leadership this member took up (progress reloaded,
    /// services started); 0 = none.
    pub(crate) leader_term: AtomicU64,
    /// Users and policies (`core/security.rs`).
    pub(crate) users: Arc<crate::auth::users::Users>,
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
        let (groups, consumer_groups) = progress::load_progress(&store, clean_stop)?;
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
        let secret = secret::Secret::load_or_create(&cfg.data_dir)?;
        let mut dedup = idempotence::rebuild(
            &store,
            cfg.dedup_window_ms,
            cfg.max_dedup_keys as usize,
            clock.now_ms(),
        )?;
        if store.config().replicated {
            dedup = dedup.replicated();
        }
        let users = Arc::new(crate::auth::users::Users::load(
            store.meta(),
            crate::auth::users::Limits {
                max_users: cfg.auth.max_users as usize,
                max_rules_per_user: cfg.auth.max_rules_per_user as usize,
            },
        )?);
        let broker = Arc::new(Broker {
            cfg,
            store,
            clock,
            topics: RwLock::new(topics),
            groups: Mutex::new(groups),
            consumer_groups: Mutex::new(consumer_groups),
            counters: Counters::default(),
            id_prefix,
            id_counter: AtomicU64::new(0),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            shutdown_tx,
            tasks: Mutex::new(Vec::new()),
            progress_lock: Mutex::new(()),
            long_polls: std::sync::atomic::AtomicUsize::new(0),
            secret,
            dedup: Mutex::new(dedup),
            dedup_done: tokio::sync::Notify::new(),
            tx,
            retry,
            dlq,
            replication: std::sync::OnceLock::new(),
            progress_outbox: Mutex::new(Vec::new()),
            handoff_marks: Mutex::new(handoff::HandoffMarks::default()),
            leader_term: AtomicU64::new(0),
            users,
        });
        broker.bootstrap_single()?;
        Ok(broker)
    }

    /// The key that MACs receipt handles and transaction ids.
    pub fn secret(&self) -> &secret::Secret {
        &self.secret
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

    pub(crate) fn check_running(&self) -> Result<(), BrokerError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            Err(BrokerError::ShuttingDown)
        } else {
            Ok(())
        }
    }
}
