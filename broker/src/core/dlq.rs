//! The DLQ state of every group: which entries of `%DLQ%<group>` were
//! removed (redriven or purged), recorded per group as a
//! [`QueueProgress`] (its "acked" offsets) and saved in sled keyspace `dlq`.
//! Plain state: the operations on DLQs are in `redelivery`.

use foldhash::HashMap;
use std::sync::Mutex;

use crate::core::delivery::QueueProgress;
use crate::error::BrokerError;

const DLQ_SPACE: &str = "dlq";

/// DLQ removal state of every group.
#[derive(Debug, Default)]
pub(crate) struct DlqState {
    pub(crate) removed: Mutex<HashMap<String, QueueProgress>>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Bookkeeping maps only; a panic elsewhere cannot leave them half written.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DlqState {
    pub(crate) fn load(store: &halfmq_storage::Store) -> Result<DlqState, BrokerError> {
        let mut removed = HashMap::default();
        for (k, v) in store.meta().scan_prefix(DLQ_SPACE, b"")? {
            if let (Ok(g), Some(p)) = (
                String::from_utf8(k),
                crate::core::progress::decode_progress(&v),
            ) {
                removed.insert(g, p);
            }
        }
        Ok(DlqState {
            removed: Mutex::new(removed),
        })
    }

    /// Saves one group's removal state (no flush).
    pub(crate) fn save_group(
        &self,
        store: &halfmq_storage::Store,
        group: &str,
    ) -> Result<(), BrokerError> {
        let p = lock(&self.removed).get(group).cloned();
        if let Some(p) = p {
            store.meta().put(
                DLQ_SPACE,
                group.as_bytes(),
                &crate::core::progress::encode_progress(&p),
            )?;
        }
        Ok(())
    }

    pub(crate) fn save(&self, store: &halfmq_storage::Store) -> Result<(), BrokerError> {
        let removed = lock(&self.removed).clone();
        for (g, p) in removed {
            store.meta().put(
                DLQ_SPACE,
                g.as_bytes(),
                &crate::core::progress::encode_progress(&p),
            )?;
        }
        Ok(())
    }
}
