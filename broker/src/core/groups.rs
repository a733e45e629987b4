//! Declared consumer groups: which are FIFO (`halfmq group create GROUP
//! --fifo`). Kept in sled (`consumer_groups`: name -> one byte, 1 = FIFO);
//! a group never declared is an ordinary one, created by its first receive.

use std::sync::Arc;

use foldhash::HashMap;
use halfmq_storage::Store;

use super::fifo::FifoGate;
use super::names::check_group;
use super::{lock, Broker};
use crate::error::BrokerError;

/// Keyspace of declared consumer groups in sled.
pub(crate) const CONSUMER_GROUPS_SPACE: &str = "consumer_groups";

/// A declared consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerGroupInfo {
    /// Name.
    pub group: String,
    /// Ordered delivery per message group.
    pub fifo: bool,
}

/// Loads the declared groups: name -> FIFO.
///
/// # Errors
/// Storage errors.
pub(crate) fn load_consumer_groups(store: &Store) -> Result<HashMap<String, bool>, BrokerError> {
    let mut out = HashMap::default();
    for (k, v) in store.meta().scan_prefix(CONSUMER_GROUPS_SPACE, b"")? {
        match String::from_utf8(k) {
            Ok(name) => {
                out.insert(name, v.first() == Some(&1));
            }
            Err(_) => tracing::error!("unreadable consumer group entry in metadata; skipped"),
        }
    }
    Ok(out)
}

impl Broker {
    /// Declares consumer group `group`, FIFO or not, durably. Declaring it
    /// again the same way does nothing. A group that has consumed already
    /// (as an ordinary one) may be declared FIFO: the rule applies from its
    /// next receive.
    ///
    /// # Errors
    /// An invalid name; [`BrokerError::BadRequest`] when it is declared
    /// already with the other kind; `max_consumer_groups` declared already;
    /// storage errors.
    pub fn create_consumer_group(&self, group: &str, fifo: bool) -> Result<(), BrokerError> {
        let mut declared = lock(&self.consumer_groups);
        if already_declared(&declared, group, fifo)? {
            return Ok(());
        }
        if declared.len() >= self.cfg.max_consumer_groups as usize {
            return Err(BrokerError::TooManyRequests(format!(
                "max_consumer_groups {} groups declared already",
                self.cfg.max_consumer_groups
            )));
        }
        self.store
            .meta()
            .put(CONSUMER_GROUPS_SPACE, group.as_bytes(), &[u8::from(fifo)])?;
        self.store.meta().flush()?;
        declared.insert(group.to_owned(), fifo);
        drop(declared);
        if fifo {
            let existing: Vec<_> = lock(&self.groups)
                .iter()
                .filter(|((g, _), _)| g == group)
                .map(|(_, gt)| Arc::clone(gt))
                .collect();
            for gt in existing {
                let mut g = lock(&gt);
                let n = g.queues.len();
                g.fifo = Some(vec![FifoGate::default(); n]);
            }
        }
        tracing::info!(group, fifo, "consumer group declared");
        Ok(())
    }

    /// [`Broker::create_consumer_group`] through the broker group's log
    /// (a single broker: at once); the same checks first.
    ///
    /// # Errors
    /// As [`Broker::create_consumer_group`]; `NOT_LEADER` on a follower.
    pub async fn declare_consumer_group(&self, group: &str, fifo: bool) -> Result<(), BrokerError> {
        if self.replication().is_none() {
            return self.create_consumer_group(group, fifo);
        }
        self.check_serving()?;
        if already_declared(&lock(&self.consumer_groups), group, fifo)? {
            return Ok(());
        }
        self.replicate_consumer_group(group, fifo).await
    }

    /// Whether `group` is declared FIFO.
    pub fn is_fifo_group(&self, group: &str) -> bool {
        lock(&self.consumer_groups)
            .get(group)
            .copied()
            .unwrap_or(false)
    }

    /// Declared consumer groups, by name.
    pub fn list_consumer_groups(&self) -> Vec<ConsumerGroupInfo> {
        let mut v: Vec<ConsumerGroupInfo> = lock(&self.consumer_groups)
            .iter()
            .map(|(g, f)| ConsumerGroupInfo {
                group: g.clone(),
                fifo: *f,
            })
            .collect();
        v.sort_by(|a, b| a.group.cmp(&b.group));
        v
    }
}

/// Whether `group` is declared already with `fifo` (then declaring it again
/// does nothing).
///
/// # Errors
/// An invalid or reserved name; [`BrokerError::BadRequest`] when it is
/// declared the other way.
fn already_declared(
    declared: &HashMap<String, bool>,
    group: &str,
    fifo: bool,
) -> Result<bool, BrokerError> {
    check_group(group)?;
    if group.starts_with('%') {
        return Err(BrokerError::ReservedName(format!(
            "consumer group {group:?}: names starting with % are the broker's"
        )));
    }
    match declared.get(group) {
        Some(&f) if f == fifo => Ok(true),
        Some(&f) => Err(BrokerError::BadRequest(format!(
            "consumer group {group} is declared already as {} group",
            if f { "a FIFO" } else { "an ordinary" }
        ))),
        None => Ok(false),
    }
}
