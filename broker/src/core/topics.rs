//! Topics: creation (explicit or on first send), lookup, listing, and the
//! restoration of topics a damaged metadata store lost.

use foldhash::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use halfmq_storage::Store;
use tokio::sync::Notify;

use super::names::check_topic;
use super::Broker;
use crate::error::BrokerError;

/// Keyspace of topics in sled: name -> queue count (u32 LE).
pub(crate) const TOPICS_SPACE: &str = "topics";

/// A topic's configuration and runtime state.
#[derive(Debug)]
pub struct TopicState {
    /// Number of queues.
    pub queues: u32,
    pub(crate) notify: Notify,
    pub(crate) round_robin: AtomicU32,
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

/// Topics that have consume queues but no entry in the metadata store (lost
/// with a damaged one) are restored, with as many queues as were seen.
pub(crate) fn restore_topics(
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
    /// Creates a topic with `queues` queues (0 = `default_queues`).
    ///
    /// # Errors
    /// Invalid name, reserved name, exists already, too many queues or topics.
    pub fn create_topic(&self, name: &str, queues: u32) -> Result<Arc<TopicState>, BrokerError> {
        check_topic(name)?;
        self.create_topic_unchecked(name, queues, true)
    }

    /// The queue count a topic created with `queues` gets (0 =
    /// `default_queues`).
    ///
    /// # Errors
    /// [`BrokerError::BadRequest`] past `max_queues`.
    pub(crate) fn queue_count(&self, queues: u32) -> Result<u32, BrokerError> {
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
        Ok(queues)
    }

    pub(crate) fn create_topic_unchecked(
        &self,
        name: &str,
        queues: u32,
        fail_if_exists: bool,
    ) -> Result<Arc<TopicState>, BrokerError> {
        let queues = self.queue_count(queues)?;
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

    /// The topics map, for changes (topic deletion).
    pub(crate) fn topics_mut(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<TopicState>>> {
        self.topics.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl TopicState {
    /// Wakes every long poll waiting on the topic.
    pub(crate) fn wake_all(&self) {
        self.notify.notify_waiters();
    }

    pub(crate) fn new(queues: u32) -> Self {
        TopicState {
            queues,
            notify: Notify::new(),
            round_robin: AtomicU32::new(0),
        }
    }
}
